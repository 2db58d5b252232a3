//! A MetaStore cluster inside madsim: every member is a simulated node (its own IP) that
//! runs the real runtime (`metastore_runtime::start_with_engine`, Raft driver, gRPC
//! services, timers) on a [`SimDisk`] that outlives the node, so a crash and restart
//! recovers from what was synced.
//!
//! This module owns member lifecycle and the controls the fault schedule uses. It must
//! never reach into a member's state: everything it learns about a member (leader,
//! revision, hash) it asks over the member's gRPC API, as an operator would.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use madsim::rand::Rng;
use madsim::runtime::{Handle, NodeHandle};
use metastore_proto::etcdserverpb as pb;
use metastore_runtime::clock::OffsetClock;
use metastore_runtime::config::{Config, Flags};
use metastore_runtime::storage::Engine;
use pb::maintenance_client::MaintenanceClient;
use tonic::transport::Channel;

use crate::disk::{CrashChoice, SimDisk};
use crate::faults::FaultLog;

pub const CLIENT_PORT: u16 = 2379;
pub const PEER_PORT: u16 = 2380;

/// How long one control RPC (status, hash, move-leader) may take.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(3);

/// One slot of the cluster: the member currently in it (its node, its disk), and what
/// the harness has done to it. Removing a member and adding a new one puts the new
/// member, with new addresses and an empty disk, in the same slot.
pub struct SimMember {
    pub name: String,
    pub ip: IpAddr,
    pub node: NodeHandle,
    pub disk: Arc<SimDisk>,
    /// The member's wall clock: like the disk it outlives a crash, and it can jump.
    pub clock: Arc<OffsetClock>,
    /// How many members this slot has had before the current one.
    pub incarnation: u8,
    pub down: bool,
    pub paused: bool,
    /// Removed from the cluster and not replaced yet.
    pub removed: bool,
}

/// The client URL of every slot's current member, shared with the clients so that they
/// follow a slot to its new member.
#[derive(Clone, Default)]
pub struct Endpoints(Arc<std::sync::RwLock<Vec<String>>>);

impl Endpoints {
    pub fn len(&self) -> usize {
        self.0.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn url(&self, slot: usize) -> String {
        self.0.read().unwrap_or_else(|p| p.into_inner())[slot].clone()
    }

    fn set(&self, slot: usize, url: String) {
        let mut urls = self.0.write().unwrap_or_else(|p| p.into_inner());
        if urls.len() <= slot {
            urls.resize(slot + 1, String::new());
        }
        urls[slot] = url;
    }
}

/// A running cluster of `n` members.
pub struct SimCluster {
    pub members: Vec<SimMember>,
    endpoints: Endpoints,
    handle: Handle,
    /// Issues the harness's own RPCs (it needs an IP to connect from).
    control: NodeHandle,
    log: FaultLog,
}

/// A member's IP: slot `s`, incarnation `n` is 10.0.(1+n).(s+1). Clients live in
/// 10.0.250.0/24 and the control node is 10.0.251.1.
pub fn member_ip(slot: usize, incarnation: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 1 + incarnation, slot as u8 + 1))
}

fn client_url_of(ip: IpAddr) -> String {
    format!("http://{ip}:{CLIENT_PORT}")
}

fn peer_url_of(ip: IpAddr) -> String {
    format!("http://{ip}:{PEER_PORT}")
}

/// The flags of a member: `peers` are (name, peer URL) of every member of the cluster it
/// starts in or joins, itself included.
fn member_config(name: &str, ip: IpAddr, peers: &[(String, String)], existing: bool) -> Config {
    let cluster = peers
        .iter()
        .map(|(name, url)| format!("{name}={url}"))
        .collect::<Vec<_>>()
        .join(",");
    let flags = <Flags as clap::Parser>::parse_from([
        "metastore".to_string(),
        "--name".into(),
        name.to_string(),
        "--engine".into(),
        "memory".into(),
        "--listen-client-urls".into(),
        client_url_of(ip),
        "--advertise-client-urls".into(),
        client_url_of(ip),
        "--listen-peer-urls".into(),
        peer_url_of(ip),
        "--initial-advertise-peer-urls".into(),
        peer_url_of(ip),
        "--initial-cluster".into(),
        cluster,
        "--initial-cluster-state".into(),
        if existing { "existing" } else { "new" }.into(),
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
        let peers: Vec<(String, String)> = (0..size)
            .map(|slot| (format!("m{slot}"), peer_url_of(member_ip(slot, 0))))
            .collect();
        let endpoints = Endpoints::default();
        let members = (0..size)
            .map(|slot| {
                let member = launch(&handle, slot, 0, &peers, false);
                endpoints.set(slot, client_url_of(member.ip));
                member
            })
            .collect();
        let control = handle
            .create_node()
            .name("control")
            .ip(IpAddr::V4(Ipv4Addr::new(10, 0, 251, 1)))
            .build();
        let cluster = SimCluster {
            members,
            endpoints,
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

    /// The slots' client URLs, kept current across membership changes.
    pub fn endpoints(&self) -> Endpoints {
        self.endpoints.clone()
    }

    fn url(&self, slot: usize) -> String {
        self.endpoints.url(slot)
    }

    /// Removes slot `slot`'s member from the cluster (MemberRemove through the leader)
    /// and stops its node. Returns whether the cluster accepted the removal.
    pub async fn remove_member(&mut self, slot: usize) -> bool {
        let Some(id) = self
            .status(slot)
            .await
            .and_then(|s| s.header.map(|h| h.member_id))
        else {
            self.log
                .record(format!("remove m{slot}: it does not answer"));
            return false;
        };
        let Some(leader) = self.leader().await else {
            self.log.record(format!("remove m{slot}: no leader"));
            return false;
        };
        let url = self.url(leader);
        let result = self
            .control(move || async move {
                let mut client = pb::cluster_client::ClusterClient::new(connect(&url).await?);
                Some(
                    client
                        .member_remove(pb::MemberRemoveRequest { id })
                        .await
                        .map(|_| ()),
                )
            })
            .await;
        let outcome = match result {
            Some(Ok(())) => "done".to_string(),
            Some(Err(status)) => format!("answered {:?} {}", status.code(), status.message()),
            None => "no answer".to_string(),
        };
        // The answer does not settle it: the removal may have committed even when the
        // answer was lost (removing the leader closes its connections). The member list,
        // asked of the others, does.
        let mut removed = None;
        for _ in 0..10 {
            removed = self.member_listed(slot, id).await.map(|listed| !listed);
            if removed.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        match removed {
            Some(true) => {
                let member = &mut self.members[slot];
                self.handle.kill(member.node.id());
                member.removed = true;
                member.down = false;
                member.paused = false;
                self.log.record(format!(
                    "removed {} ({id:x}) from the cluster ({outcome})",
                    member.name
                ));
                true
            }
            Some(false) => {
                self.log
                    .record(format!("remove m{slot} did not happen ({outcome})"));
                false
            }
            None => {
                // Nobody can tell: leave the slot as it is; the end-of-run convergence
                // check fails if the member is in fact gone.
                self.log
                    .record(format!("remove m{slot}: outcome unknown ({outcome})"));
                false
            }
        }
    }

    /// Whether member `id` is in the member list as the other slots' members see it
    /// (a linearizable MemberList); `None` when none of them answers.
    async fn member_listed(&self, except: usize, id: u64) -> Option<bool> {
        for i in (0..self.size()).filter(|i| *i != except) {
            let m = &self.members[i];
            if m.down || m.paused || m.removed {
                continue;
            }
            let url = self.url(i);
            let listed = self
                .control(move || async move {
                    let mut client = pb::cluster_client::ClusterClient::new(connect(&url).await?);
                    let list = client
                        .member_list(pb::MemberListRequest { linearizable: true })
                        .await
                        .ok()?
                        .into_inner();
                    Some(list.members.iter().any(|m| m.id == id))
                })
                .await;
            if listed.is_some() {
                return listed;
            }
        }
        None
    }

    /// Adds a new member to the removed slot `slot` (MemberAdd through the leader, with
    /// new addresses) and starts it on an empty disk, joining the existing cluster.
    pub async fn add_member(&mut self, slot: usize) -> bool {
        let incarnation = self.members[slot].incarnation + 1;
        let ip = member_ip(slot, incarnation);
        let Some(leader) = self.leader().await else {
            self.log.record(format!("add m{slot}: no leader"));
            return false;
        };
        let url = self.url(leader);
        let peer = peer_url_of(ip);
        let result = self
            .control(move || async move {
                let mut client = pb::cluster_client::ClusterClient::new(connect(&url).await?);
                Some(
                    client
                        .member_add(pb::MemberAddRequest {
                            peer_ur_ls: vec![peer],
                            is_learner: false,
                        })
                        .await
                        .map(|r| r.into_inner()),
                )
            })
            .await;
        let response = match result {
            Some(Ok(response)) => response,
            Some(Err(status)) => {
                self.log
                    .record(format!("add m{slot} refused: {}", status.message()));
                return false;
            }
            None => {
                self.log.record(format!("add m{slot}: no answer"));
                return false;
            }
        };
        // The joiner's --initial-cluster names every member the cluster now has.
        let peers: Vec<(String, String)> = response
            .members
            .iter()
            .filter_map(|m| {
                let url = m.peer_ur_ls.first()?.clone();
                let name = if url == peer_url_of(ip) {
                    format!("m{slot}")
                } else {
                    self.members
                        .iter()
                        .find(|s| peer_url_of(s.ip) == url)
                        .map(|s| s.name.clone())?
                };
                Some((name, url))
            })
            .collect();
        let member = launch(&self.handle, slot, incarnation, &peers, true);
        self.endpoints.set(slot, client_url_of(member.ip));
        let id = response.member.map(|m| m.id).unwrap_or_default();
        self.log.record(format!(
            "added m{slot} again as {id:x} at {} (incarnation {incarnation})",
            member.ip
        ));
        self.members[slot] = member;
        true
    }

    pub fn log(&self) -> &FaultLog {
        &self.log
    }

    /// Crashes member `i`: its tasks stop at once and its disk loses a seeded suffix of
    /// the writes it had not synced.
    pub fn crash(&mut self, i: usize) {
        let member = &mut self.members[i];
        self.handle.kill(member.node.id());
        let (pending, logged) = member.disk.at_risk();
        let mut rng = madsim::rand::thread_rng();
        // Half the crashes find no flush by the engine since the last durable point
        // (every volatile write is lost); the others one at a seeded point.
        let flushed = if rng.gen_bool(0.5) {
            0
        } else {
            rng.gen_range(0..=pending)
        };
        let choice = CrashChoice {
            flushed,
            logged: rng.gen_range(0..=logged),
        };
        let lost = member.disk.crash(choice);
        member.down = true;
        member.paused = false;
        self.log.record(format!(
            "crash {} (lost {lost} of {pending} batches not yet durable)",
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

    /// Jumps member `i`'s wall clock by `by_secs` (negative: back).
    pub fn jump_clock(&mut self, i: usize, by_secs: i64) {
        let member = &self.members[i];
        member.clock.jump(by_secs * 1_000_000_000);
        self.log.record(format!(
            "clock of {} jumps {by_secs:+} s (now {:+} s off)",
            member.name,
            member.clock.offset() / 1_000_000_000
        ));
    }

    /// Puts every member's wall clock back on time (NTP catching up).
    pub fn reset_clocks(&mut self) {
        for member in &self.members {
            member.clock.reset();
        }
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
        if self.members[i].removed {
            return None;
        }
        let url = self.url(i);
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
            if self.members[i].down || self.members[i].paused || self.members[i].removed {
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
        let url = self.url(from);
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
        let url = self.url(i);
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
        let url = self.url(i);
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
            Some((
                r.kvs.into_iter().map(|kv| kv.key.to_vec()).collect(),
                revision,
            ))
        })
        .await
    }

    /// HashKV of member `i` at `revision`, as (hash, compact revision).
    pub async fn hash_kv(&self, i: usize, revision: i64) -> Option<(u32, i64)> {
        let url = self.url(i);
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

/// Creates the node of slot `slot`'s member (incarnation `incarnation`) on a new disk.
fn launch(
    handle: &Handle,
    slot: usize,
    incarnation: u8,
    peers: &[(String, String)],
    existing: bool,
) -> SimMember {
    let disk = Arc::new(SimDisk::new());
    let clock = Arc::new(OffsetClock::new());
    let ip = member_ip(slot, incarnation);
    let name = format!("m{slot}");
    let config = member_config(&name, ip, peers, existing);
    let node = handle
        .create_node()
        .name(format!("{name}.{incarnation}"))
        .ip(ip)
        .init({
            let disk = disk.clone();
            let clock = clock.clone();
            let name = name.clone();
            move || run_member(name.clone(), config.clone(), disk.clone(), clock.clone())
        })
        .build();
    SimMember {
        name,
        ip,
        node,
        disk,
        clock,
        incarnation,
        down: false,
        paused: false,
        removed: false,
    }
}

/// One run of a member's process: until the node is killed or the member fails.
async fn run_member(name: String, config: Config, disk: Arc<SimDisk>, clock: Arc<OffsetClock>) {
    let injected = metastore_runtime::Injected {
        engine: Some(Engine::Supplied(disk)),
        wall_clock: Some(clock),
    };
    match metastore_runtime::start_with(config, injected).await {
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
