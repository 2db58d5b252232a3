//! A MetaStore cluster inside madsim: every member is a simulated node (its own IP) that
//! runs the real runtime (`metastore_runtime::start_with_engine`, Raft driver, gRPC
//! services, timers) on a [`SimDisk`] that outlives the node, so a crash and restart
//! recovers from what was synced.
//!
//! This module owns member lifecycle and the controls the fault schedule uses. It must
//! never reach into a member's state: everything it learns about a member (leader,
//! revision, hash) it asks over the member's gRPC API, as an operator would.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use madsim::rand::Rng;
use madsim::runtime::{Handle, NodeHandle};
use metastore_proto::etcdserverpb as pb;
use metastore_runtime::config::{Config, Flags};
use metastore_runtime::storage::Engine;
use pb::maintenance_client::MaintenanceClient;
use tonic::transport::Channel;

use crate::disk::SimDisk;
use crate::faults::FaultLog;

pub const CLIENT_PORT: u16 = 2379;
pub const PEER_PORT: u16 = 2380;

/// How long one control RPC (status, hash, move-leader) may take.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(3);

/// One member: its node, its disk, and whether the harness has it down.
pub struct SimMember {
    pub name: String,
    pub ip: IpAddr,
    pub node: NodeHandle,
    pub disk: Arc<SimDisk>,
    pub down: bool,
    pub paused: bool,
}

/// A running cluster of `n` members.
pub struct SimCluster {
    pub members: Vec<SimMember>,
    handle: Handle,
    /// Issues the harness's own RPCs (it needs an IP to connect from).
    control: NodeHandle,
    log: FaultLog,
}

/// The member's IP: members live in 10.0.1.0/24, clients in 10.0.2.0/24.
pub fn member_ip(index: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 1, index as u8 + 1))
}

pub fn client_url(index: usize) -> String {
    format!("http://{}:{CLIENT_PORT}", member_ip(index))
}

fn peer_url(index: usize) -> String {
    format!("http://{}:{PEER_PORT}", member_ip(index))
}

fn member_config(index: usize, size: usize) -> Config {
    let name = format!("m{index}");
    let cluster = (0..size)
        .map(|i| format!("m{i}={}", peer_url(i)))
        .collect::<Vec<_>>()
        .join(",");
    let flags = <Flags as clap::Parser>::parse_from([
        "metastore".to_string(),
        "--name".into(),
        name,
        "--engine".into(),
        "memory".into(),
        "--listen-client-urls".into(),
        client_url(index),
        "--advertise-client-urls".into(),
        client_url(index),
        "--listen-peer-urls".into(),
        peer_url(index),
        "--initial-advertise-peer-urls".into(),
        peer_url(index),
        "--initial-cluster".into(),
        cluster,
        "--initial-cluster-token".into(),
        "sim".into(),
        // Snapshots happen within a run, so lagging members get them.
        "--snapshot-count".into(),
        "200".into(),
    ]);
    Config::from_flags(flags).expect("simulation flags are valid")
}

impl SimCluster {
    /// Starts `size` members and waits until one of them leads.
    pub async fn start(size: usize, log: FaultLog) -> Self {
        let handle = Handle::current();
        let members = (0..size)
            .map(|index| {
                let disk = Arc::new(SimDisk::new());
                let ip = member_ip(index);
                let name = format!("m{index}");
                let node = handle
                    .create_node()
                    .name(&name)
                    .ip(ip)
                    .init({
                        let disk = disk.clone();
                        let name = name.clone();
                        move || run_member(name.clone(), member_config(index, size), disk.clone())
                    })
                    .build();
                SimMember {
                    name,
                    ip,
                    node,
                    disk,
                    down: false,
                    paused: false,
                }
            })
            .collect();
        let control = handle
            .create_node()
            .name("control")
            .ip(IpAddr::V4(Ipv4Addr::new(10, 0, 3, 1)))
            .build();
        let cluster = SimCluster {
            members,
            handle,
            control,
            log,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while cluster.leader().await.is_none() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no leader 30 s after start"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        cluster
    }

    pub fn size(&self) -> usize {
        self.members.len()
    }

    pub fn log(&self) -> &FaultLog {
        &self.log
    }

    /// Crashes member `i`: its tasks stop at once and its disk loses a seeded suffix of
    /// the writes it had not synced.
    pub fn crash(&mut self, i: usize) {
        let member = &mut self.members[i];
        self.handle.kill(member.node.id());
        let pending = member.disk.unsynced_batches();
        let keep = madsim::rand::thread_rng().gen_range(0..=pending);
        let lost = member.disk.crash(keep);
        member.down = true;
        member.paused = false;
        self.log.record(format!(
            "crash {} (lost {lost} of {pending} unsynced batches)",
            member.name
        ));
    }

    /// Starts a crashed member again on what its disk kept.
    pub fn restart(&mut self, i: usize) {
        let member = &mut self.members[i];
        self.handle.restart(member.node.id());
        member.down = false;
        self.log.record(format!("restart {}", member.name));
    }

    pub fn pause(&mut self, i: usize) {
        let member = &mut self.members[i];
        self.handle.pause(member.node.id());
        member.paused = true;
        self.log.record(format!("pause {}", member.name));
    }

    pub fn resume(&mut self, i: usize) {
        let member = &mut self.members[i];
        self.handle.resume(member.node.id());
        member.paused = false;
        self.log.record(format!("resume {}", member.name));
    }

    /// Node IDs of the members, for network faults.
    pub fn node_id(&self, i: usize) -> madsim::task::NodeId {
        self.members[i].node.id()
    }

    /// Runs a control RPC from the control node.
    async fn control<T, F>(&self, f: impl FnOnce() -> F + Send + 'static) -> Option<T>
    where
        F: std::future::Future<Output = Option<T>> + Send + 'static,
        T: Send + 'static,
    {
        self.control
            .spawn(async move {
                tokio::time::timeout(CONTROL_TIMEOUT, f())
                    .await
                    .ok()
                    .flatten()
            })
            .await
            .ok()
            .flatten()
    }

    /// Member `i`'s Status, if it answers.
    pub async fn status(&self, i: usize) -> Option<pb::StatusResponse> {
        let url = client_url(i);
        self.control(move || async move {
            let mut client = MaintenanceClient::new(connect(&url).await?);
            client
                .status(pb::StatusRequest {})
                .await
                .ok()
                .map(|r| r.into_inner())
        })
        .await
    }

    /// The index of the member every answering member agrees leads, if any.
    pub async fn leader(&self) -> Option<usize> {
        for i in 0..self.size() {
            if self.members[i].down || self.members[i].paused {
                continue;
            }
            if let Some(status) = self.status(i).await {
                let leader = status.leader;
                if leader != 0 && status.header.as_ref().map(|h| h.member_id) == Some(leader) {
                    return Some(i);
                }
            }
        }
        None
    }

    /// Asks the current leader to hand leadership to member `to` (etcd's move-leader),
    /// or to the member after it when `to` already leads.
    pub async fn move_leader(&self, to: usize) -> bool {
        let Some(from) = self.leader().await else {
            self.log.record("move leader: no leader".into());
            return false;
        };
        let to = if to == from {
            (to + 1) % self.size()
        } else {
            to
        };
        let Some(target) = self
            .status(to)
            .await
            .and_then(|s| s.header.map(|h| h.member_id))
        else {
            return false;
        };
        let url = client_url(from);
        let moved = self
            .control(move || async move {
                let mut client = MaintenanceClient::new(connect(&url).await?);
                client
                    .move_leader(pb::MoveLeaderRequest { target_id: target })
                    .await
                    .ok()
                    .map(|_| ())
            })
            .await
            .is_some();
        self.log.record(format!(
            "move leader m{from} -> m{to}: {}",
            if moved { "done" } else { "failed" }
        ));
        moved
    }

    /// The member's current revision (a serializable read: no quorum needed).
    pub async fn revision(&self, i: usize) -> Option<i64> {
        let url = client_url(i);
        self.control(move || async move {
            let mut client = pb::kv_client::KvClient::new(connect(&url).await?);
            let r = client
                .range(pb::RangeRequest {
                    key: b"\0".to_vec(),
                    serializable: true,
                    count_only: true,
                    ..Default::default()
                })
                .await
                .ok()?;
            r.into_inner().header.map(|h| h.revision)
        })
        .await
    }

    /// A linearizable range `[key, range_end)` on member `i`: the keys it returned, and
    /// the response header's revision.
    pub async fn range_keys(
        &self,
        i: usize,
        key: &[u8],
        range_end: &[u8],
    ) -> Option<(Vec<Vec<u8>>, i64)> {
        let url = client_url(i);
        let (key, range_end) = (key.to_vec(), range_end.to_vec());
        self.control(move || async move {
            let mut client = pb::kv_client::KvClient::new(connect(&url).await?);
            let r = client
                .range(pb::RangeRequest {
                    key,
                    range_end,
                    keys_only: true,
                    ..Default::default()
                })
                .await
                .ok()?
                .into_inner();
            let revision = r.header?.revision;
            Some((r.kvs.into_iter().map(|kv| kv.key).collect(), revision))
        })
        .await
    }

    /// HashKV of member `i` at `revision`, as (hash, compact revision).
    pub async fn hash_kv(&self, i: usize, revision: i64) -> Option<(u32, i64)> {
        let url = client_url(i);
        self.control(move || async move {
            let mut client = MaintenanceClient::new(connect(&url).await?);
            let r = client
                .hash_kv(pb::HashKvRequest { revision })
                .await
                .ok()?
                .into_inner();
            Some((r.hash, r.compact_revision))
        })
        .await
    }
}

/// One incarnation of a member: runs until the node is killed or the member fails.
async fn run_member(name: String, config: Config, disk: Arc<SimDisk>) {
    let engine = Engine::Supplied(disk);
    match metastore_runtime::start_with_engine(config, Some(engine)).await {
        Ok(mut server) => {
            let why = server.failed().await;
            tracing::warn!(member = %name, reason = %why, "member failed");
            let _ = server.shutdown().await;
        }
        Err(e) => tracing::warn!(member = %name, error = %e, "member did not start"),
    }
}

/// Connects to a client URL, giving up quickly (a down member must not stall a client).
pub async fn connect(url: &str) -> Option<Channel> {
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_string()).ok()?;
    tokio::time::timeout(Duration::from_secs(1), endpoint.connect())
        .await
        .ok()?
        .ok()
}

/// The socket address a member's clients use.
pub fn client_addr(index: usize) -> SocketAddr {
    SocketAddr::new(member_ip(index), CLIENT_PORT)
}
