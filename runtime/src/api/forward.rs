//! Requests only the leader can answer, sent on to it by a member that does not lead:
//! lease renewals and time-to-live (the leader's timers), and MemberPromote (the
//! leader's view of the learner's log). etcd forwards these over its peer HTTP API; here
//! they go to the leader's client URL as the same gRPC call, marked [`FORWARDED`].
//!
//! This module owns finding the leader's client URL and keeping one channel to it. It
//! must never forward a request that was itself forwarded (a member that receives one
//! and does not lead answers "not leader"), so a stale view of the leader can never make
//! requests circle.

use tonic::Status;

use super::Api;
use crate::status::EtcdError;

/// Marks a request forwarded by another member.
pub const FORWARDED: &str = "metastore-forwarded";
/// How long a member without a known leader waits for one before answering "no leader".
const LEADER_WAIT: std::time::Duration = std::time::Duration::from_secs(3);
/// How long a forwarding member keeps trying when leadership moves under it (etcd's
/// request timeout, less its election-dependent part).
pub const RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(5);

/// A channel to the current leader's client URL, kept while the leader stays the same.
#[derive(Default)]
pub struct LeaderLink {
    cached: std::sync::Mutex<Option<(u64, tonic::transport::Channel)>>,
}

impl Api {
    /// A channel to the current leader's client URL, waiting a little for a leader to be
    /// elected and to publish its URL. "not leader" if this member itself leads.
    pub(super) async fn leader_channel(&self) -> Result<tonic::transport::Channel, Status> {
        // A member may know the leader before it knows the leader's client URL (published
        // through the log after the election): wait a little for both.
        let deadline = tokio::time::Instant::now() + LEADER_WAIT;
        let (leader, url) = loop {
            let leader = self.log.status().leader;
            if leader == self.identity.member_id {
                return Err(EtcdError::NotLeader.status());
            }
            if leader != 0 {
                if let Some((id, channel)) = self.leader_link.cached.lock().unwrap().as_ref() {
                    if *id == leader {
                        return Ok(channel.clone());
                    }
                }
                let url = self
                    .read(|sm| sm.member(leader))?
                    .and_then(|m| m.client_ur_ls.first().cloned());
                if let Some(url) = url {
                    break (leader, url);
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(EtcdError::NoLeader.status());
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        let channel = tonic::transport::Endpoint::from_shared(url)
            .map_err(|_| EtcdError::NoLeader.status())?
            .connect_timeout(std::time::Duration::from_secs(1))
            .connect_lazy();
        *self.leader_link.cached.lock().unwrap() = Some((leader, channel.clone()));
        Ok(channel)
    }
}

/// Marks `request` as forwarded.
pub fn mark<T>(request: &mut tonic::Request<T>) {
    request
        .metadata_mut()
        .insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
}

/// Whether `request` was forwarded by another member.
pub fn is_forwarded<T>(request: &tonic::Request<T>) -> bool {
    request.metadata().contains_key(FORWARDED)
}
