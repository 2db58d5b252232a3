//! etcd's Lease service: LeaseGrant, LeaseRevoke, LeaseKeepAlive, LeaseTimeToLive,
//! LeaseLeases.
//!
//! This module owns what the proposer stamps into a grant (the server-chosen ID, the TTL
//! raised to the member's minimum), the keep-alive stream, and how lease answers are
//! assembled from the lease table (core) and the leader's timers (`lessor`). It must never
//! change the lease table except through the log, and never decide expiry (the lessor's
//! task does). Renewals and time-to-live are the leader's: a member that does not lead
//! forwards them to the leader (see `api::forward`).

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use metastore_core::lease::MAX_LEASE_TTL;
use metastore_core::ApplyResponse;
use metastore_proto::etcdserverpb as pb;
use metastore_proto::etcdserverpb::lease_client::LeaseClient;
use metastore_proto::etcdserverpb::lease_server::Lease;
use metastore_proto::metastore::internal_request::Request as Envelope;
use metastore_proto::metastore::LeaseGrant;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use super::forward;
use super::{mismatched, Api};
use crate::error::Error;
use crate::lessor::Renewal;
use crate::status::EtcdError;

impl Api {
    /// Whether this member's lessor is (or, having just won an election, soon becomes)
    /// the primary: the lessor task notices a new leadership within its poll interval.
    async fn settle_primary(&self) -> bool {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
        while !self.lessor.is_primary() {
            if !self.log.is_leader() || tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        true
    }

    /// Renews on the leader for a member that does not lead.
    async fn forward_renew(&self, id: i64) -> Result<i64, Status> {
        let mut client = LeaseClient::new(self.leader_channel().await?);
        let mut request = Request::new(futures::stream::iter([pb::LeaseKeepAliveRequest { id }]));
        forward::mark(&mut request);
        let mut answers = client.lease_keep_alive(request).await?.into_inner();
        match answers.message().await? {
            Some(answer) => Ok(answer.ttl),
            None => Err(EtcdError::NotLeader.status()),
        }
    }
}

/// etcd's `leaseOverhead`: what the quota charges a grant.
const LEASE_OVERHEAD: u64 = 64;
/// Keep-alive answers waiting for a slow reader; a full queue stops reading requests.
const KEEPALIVE_QUEUE: usize = 16;

pub struct LeaseService {
    api: Arc<Api>,
}

impl LeaseService {
    pub fn new(api: Arc<Api>) -> Self {
        Self { api }
    }
}

impl Api {
    /// etcd's `ensureLeadership` (3.5): a ReadIndex round proves this member still leads,
    /// in `term` when given (the term whose lease table made a decision).
    pub async fn ensure_leadership(&self, term: Option<u64>) -> bool {
        self.log.read_barrier().await.is_ok()
            && self.log.is_leader()
            && term.is_none_or(|t| self.log.status().term == t)
    }

    /// etcd's `LeaseRenew` on the leader: the lease's TTL after renewing, 0 when it does
    /// not exist or ran out (after its revoke has gone through, as etcd waits for it).
    pub async fn renew(&self, id: i64, forwarded: bool) -> Result<i64, Status> {
        // A leader cut off from the others keeps believing it leads until its
        // check-quorum tick, and a renewal it grants then is unknown to the new leader,
        // which may revoke the lease before the TTL the client was told. If this member
        // no longer leads, the client hears "not leader" and moves on to another member.
        // (Found by the simulation's lease check.)
        if self.lessor.is_primary() && !self.ensure_leadership(None).await {
            return Err(EtcdError::NotLeader.status());
        }
        match self.lessor.renew(id) {
            Renewal::Renewed {
                ttl,
                clear_checkpoint,
            } => {
                if clear_checkpoint {
                    // etcd replicates a checkpoint of 0 before answering, so a later
                    // leader does not restore the stale remaining TTL.
                    let cp = pb::LeaseCheckpointRequest {
                        checkpoints: vec![pb::LeaseCheckpoint {
                            id,
                            remaining_ttl: 0,
                        }],
                    };
                    self.propose(Envelope::LeaseCheckpoint(cp)).await?;
                }
                Ok(ttl)
            }
            Renewal::NotFound => Ok(0),
            Renewal::Expired => {
                // Revoke it now rather than wait for the expiry task: the answer must not
                // come before the keys are gone. A revoke that lost the race finds nothing.
                match self
                    .propose_internal(Envelope::LeaseRevoke(pb::LeaseRevokeRequest { id }))
                    .await
                {
                    Ok(_) | Err(Error::Core(metastore_core::Error::LeaseNotFound)) => Ok(0),
                    Err(e) => Err(e.into()),
                }
            }
            Renewal::NotPrimary if self.settle_primary().await => {
                Box::pin(self.renew(id, forwarded)).await
            }
            Renewal::NotPrimary if forwarded => Err(EtcdError::NotLeader.status()),
            Renewal::NotPrimary => self.forward_renew(id).await,
        }
    }
}

type KeepAliveStream =
    Pin<Box<dyn Stream<Item = Result<pb::LeaseKeepAliveResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Lease for LeaseService {
    async fn lease_grant(
        &self,
        request: Request<pb::LeaseGrantRequest>,
    ) -> Result<Response<pb::LeaseGrantResponse>, Status> {
        let r = request.into_inner();
        self.api.check_quota(LEASE_OVERHEAD).await?;
        // Checked before proposing as well as at apply: the same order as etcd's Grant
        // (TTL first), so a too-large TTL never costs a log entry.
        if r.ttl > MAX_LEASE_TTL {
            return Err(EtcdError::LeaseTtlTooLarge.status());
        }
        let mut id = r.id;
        while id == 0 {
            // etcd: "only use positive int64 id's".
            id = (self.api.next_id() & (i64::MAX as u64)) as i64;
        }
        let ttl = r.ttl.max(self.api.min_lease_ttl);
        match self
            .api
            .propose(Envelope::LeaseGrant(LeaseGrant { id, ttl }))
            .await?
        {
            ApplyResponse::LeaseGrant(mut resp) => {
                self.api.fill(&mut resp.header);
                Ok(Response::new(resp))
            }
            other => Err(mismatched("lease grant", &other)),
        }
    }

    async fn lease_revoke(
        &self,
        request: Request<pb::LeaseRevokeRequest>,
    ) -> Result<Response<pb::LeaseRevokeResponse>, Status> {
        let r = request.into_inner();
        match self.api.propose(Envelope::LeaseRevoke(r)).await? {
            ApplyResponse::LeaseRevoke(mut resp) => {
                self.api.fill(&mut resp.header);
                Ok(Response::new(resp))
            }
            other => Err(mismatched("lease revoke", &other)),
        }
    }

    // The madsim stubs name the stream type; the tonic ones fix it to a boxed stream,
    // which is what `KeepAliveStream` is.
    #[cfg(madsim)]
    type LeaseKeepAliveStream = KeepAliveStream;

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<pb::LeaseKeepAliveRequest>>,
    ) -> Result<Response<KeepAliveStream>, Status> {
        let forwarded = forward::is_forwarded(&request);
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(KEEPALIVE_QUEUE);
        let api = self.api.clone();
        tokio::spawn(async move {
            loop {
                let req = match inbound.message().await {
                    Ok(Some(req)) => req,
                    // The client closed its side: the stream ends normally, as in etcd.
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(error = %e, "keep-alive stream broke");
                        break;
                    }
                };
                let answer = match api.renew(req.id, forwarded).await {
                    Ok(ttl) => {
                        let mut resp = pb::LeaseKeepAliveResponse {
                            header: None,
                            id: req.id,
                            ttl,
                        };
                        api.fill(&mut resp.header);
                        Ok(resp)
                    }
                    Err(status) => Err(status),
                };
                let failed = answer.is_err();
                if tx.send(answer).await.is_err() || failed {
                    break;
                }
            }
        });
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<pb::LeaseTimeToLiveRequest>,
    ) -> Result<Response<pb::LeaseTimeToLiveResponse>, Status> {
        let forwarded = forward::is_forwarded(&request);
        let r = request.into_inner();
        let lessor = self.api.lessor.clone();
        if !lessor.is_primary() && !self.api.settle_primary().await {
            // The leader's timers answer, as in etcd (a follower's table may lag).
            if forwarded {
                return Err(EtcdError::NotLeader.status());
            }
            let mut client = LeaseClient::new(self.api.leader_channel().await?);
            let mut ask = Request::new(r);
            forward::mark(&mut ask);
            let mut resp = client.lease_time_to_live(ask).await?.into_inner();
            self.api.fill(&mut resp.header);
            return Ok(Response::new(resp));
        }
        // The table and the timers are read under one state lock, so a revoke cannot
        // land between them.
        let mut resp = self.api.read(|sm| {
            let Some(lease) = sm.lessor().lookup(r.id) else {
                // etcd answers an unknown lease with TTL -1, not an error.
                return Ok(Some(pb::LeaseTimeToLiveResponse {
                    header: None,
                    id: r.id,
                    ttl: -1,
                    granted_ttl: 0,
                    keys: Vec::new(),
                }));
            };
            let Some(remaining) = lessor.remaining_secs(r.id) else {
                return Ok(None);
            };
            Ok(Some(pb::LeaseTimeToLiveResponse {
                header: None,
                id: r.id,
                ttl: remaining,
                granted_ttl: lease.ttl,
                keys: if r.keys {
                    lease.keys.iter().cloned().collect()
                } else {
                    Vec::new()
                },
            }))
        })?;
        match resp.as_mut() {
            Some(resp) => {
                self.api.fill(&mut resp.header);
            }
            // Demoted between the check above and the read.
            None => return Err(EtcdError::NotLeader.status()),
        }
        Ok(Response::new(resp.take().unwrap_or_default()))
    }

    async fn lease_leases(
        &self,
        _request: Request<pb::LeaseLeasesRequest>,
    ) -> Result<Response<pb::LeaseLeasesResponse>, Status> {
        let mut ids = self
            .api
            .read(|sm| Ok(sm.lessor().leases().map(|l| l.id).collect::<Vec<i64>>()))?;
        self.api.lessor.sort_by_expiry(&mut ids);
        let mut resp = pb::LeaseLeasesResponse {
            header: None,
            leases: ids.into_iter().map(|id| pb::LeaseStatus { id }).collect(),
        };
        self.api.fill(&mut resp.header);
        Ok(Response::new(resp))
    }
}
