//! Multi-member clusters of real server processes on loopback, for the Raft tests.
//!
//! Every member binds 127.0.0.1 client and peer ports chosen free, lives in its own
//! temporary data dir, and is killed by its PID when the cluster is dropped (or by its
//! watchdog when its bounded life runs out), like a single [`Server`].

use std::time::{Duration, Instant};

use metastore_proto::etcdserverpb::StatusRequest;

use crate::server::{Kind, Server};

pub struct Cluster {
    pub members: Vec<Server>,
}

/// How long a cluster may take to elect a leader and answer on every member.
pub const CLUSTER_STARTUP: Duration = Duration::from_secs(60);

impl Cluster {
    /// Starts `n` members (`m1`..`mn`) of one new cluster and waits until every member
    /// answers a linearizable read.
    pub async fn start(kind: Kind, n: usize, extra_args: &[&str]) -> Cluster {
        let mut members: Vec<Server> = (1..=n)
            .map(|i| Server::prepare(kind, &format!("m{i}"), extra_args))
            .collect();
        let initial = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        for m in &mut members {
            m.initial_cluster = Some(initial.clone());
            m.launch();
        }
        for m in &members {
            m.wait_ready().await;
        }
        Cluster { members }
    }

    /// The member each running member believes leads, if they agree on one; polls up to
    /// `limit`.
    pub async fn leader(&self, limit: Duration) -> usize {
        let deadline = Instant::now() + limit;
        loop {
            let mut seen = Vec::new();
            for m in self.members.iter().filter(|m| m.is_running()) {
                let status = async {
                    let mut c = m.maintenance().await;
                    c.status(StatusRequest {}).await
                };
                match tokio::time::timeout(Duration::from_secs(2), status).await {
                    Ok(Ok(s)) => seen.push(s.into_inner().leader),
                    _ => seen.push(0),
                }
            }
            if let Some(&first) = seen.first() {
                if first != 0 && seen.iter().all(|l| *l == first) {
                    if let Some(i) = self.index_of(first).await {
                        return i;
                    }
                }
            }
            if Instant::now() > deadline {
                panic!("members did not agree on a leader within {limit:?}: {seen:x?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The index of the member whose ID is `id`.
    pub async fn index_of(&self, id: u64) -> Option<usize> {
        for (i, m) in self.members.iter().enumerate() {
            if !m.is_running() {
                continue;
            }
            let mut c = m.maintenance().await;
            if let Ok(Ok(s)) =
                tokio::time::timeout(Duration::from_secs(2), c.status(StatusRequest {})).await
            {
                if s.into_inner().header.map(|h| h.member_id) == Some(id) {
                    return Some(i);
                }
            }
        }
        None
    }
}
