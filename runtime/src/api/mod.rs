//! The gRPC services (KV, Watch, Lease, Maintenance, Cluster) and what they share.
//!
//! This module owns the client-facing request path: size and quota limits, etcd's
//! pre-proposal checks, stamping the replicated envelope, choosing between a log proposal
//! and a local read, and filling every response header. It must never change the key
//! space except through [`Replicator::propose`], never read it except through the state
//! machine's read methods, and never render an error except through [`crate::status`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

// etcd's `costPut` and `costTxn` (nested transactions cost nothing, as in etcd).
use metastore_core::alarm::{put_cost as cost_put, txn_cost as cost_txn};
use metastore_core::{ApplyResponse, StateMachine};
use metastore_proto::etcdserverpb as pb;
use metastore_proto::metastore::{internal_request, InternalRequest, RequestHeader};
use tonic::Status;

use crate::error::Error;
use crate::lessor::{LessorConfig, PrimaryLessor};
use crate::membership::Identity;
use crate::replication::{read_state, Replicator, SharedState};
use crate::status::EtcdError;
use crate::storage::Engine;

pub mod cluster;
mod forward;
pub mod kv;
pub mod lease;
pub mod maintenance;
mod precheck;
pub mod watch;

pub use cluster::ClusterService;
pub use kv::KvService;
pub use lease::LeaseService;
pub use maintenance::MaintenanceService;
pub use watch::WatchService;

/// Limits from the command line that the request path enforces.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `--max-request-bytes`: the largest envelope a write may propose.
    pub max_request_bytes: usize,
    /// `--max-txn-ops`.
    pub max_txn_ops: usize,
    /// `--quota-backend-bytes` resolved; `None` disables the quota.
    pub quota_bytes: Option<u64>,
}

/// State shared by every service of one member.
pub struct Api {
    pub state: SharedState,
    pub log: Arc<dyn Replicator>,
    pub engine: Engine,
    pub identity: Identity,
    pub limits: Limits,
    /// The leader's lease timers (renewals, time to live, expiry).
    pub lessor: Arc<PrimaryLessor>,
    /// etcd's minimum lease TTL in seconds; grants below it are raised before proposing.
    pub min_lease_ttl: i64,
    /// etcd's ID generator (`idutil.Generator`), for lease IDs the server chooses.
    next_request_id: AtomicU64,
    /// Where renewals and time-to-live questions go when another member leads.
    pub leader_link: forward::LeaderLink,
    /// The engine size the quota check last saw, and when (ms since `started`): sizing
    /// an engine is not free (the memory engine walks every key), so writes share one
    /// reading per `SIZE_REFRESH`.
    quota_size: AtomicU64,
    quota_size_at_ms: AtomicU64,
    started: Instant,
    /// Seeds `next_request_id` and stamps proposals (never used for timing).
    wall_clock: Arc<dyn crate::clock::WallClock>,
}

/// How stale the engine size used by the quota check may be. etcd's quota is a soft
/// bound too: it charges an estimate of each write against the current size.
const SIZE_REFRESH: Duration = Duration::from_millis(100);

impl Api {
    pub fn new(
        wall_clock: Arc<dyn crate::clock::WallClock>,
        state: SharedState,
        log: Arc<dyn Replicator>,
        engine: Engine,
        identity: Identity,
        limits: Limits,
    ) -> Self {
        // etcd's ID generator: the low 16 bits of the member ID on top, then the start
        // time in milliseconds, then a counter, so IDs stay unique across restarts.
        let prefix = (identity.member_id & 0xffff) << 48;
        let suffix = (wall_clock.unix_nanos() as u64 / 1_000_000) << 8 & ((1 << 48) - 1);
        Self {
            state,
            log,
            engine,
            identity,
            limits,
            lessor: Arc::new(PrimaryLessor::new(LessorConfig::default())),
            min_lease_ttl: 2,
            next_request_id: AtomicU64::new(prefix | suffix),
            wall_clock,
            leader_link: forward::LeaderLink::default(),
            quota_size: AtomicU64::new(0),
            quota_size_at_ms: AtomicU64::new(u64::MAX),
            started: Instant::now(),
        }
    }

    /// Uses `lessor` (the one the apply path reports lease changes to) and the minimum
    /// lease TTL from the flags.
    pub fn with_leases(mut self, lessor: Arc<PrimaryLessor>, min_lease_ttl: i64) -> Self {
        self.lessor = lessor;
        self.min_lease_ttl = min_lease_ttl;
        self
    }

    /// A fresh ID from etcd's request ID generator (also what server-chosen lease IDs
    /// are drawn from).
    pub fn next_id(&self) -> u64 {
        self.next_request_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Fills a response header the way etcd's `header.fill` does: identity and term
    /// always, the revision only when the state machine did not set one.
    pub fn fill(&self, header: &mut Option<pb::ResponseHeader>) {
        let term = self.log.status().term;
        let h = header.get_or_insert_with(Default::default);
        h.cluster_id = self.identity.cluster_id;
        h.member_id = self.identity.member_id;
        h.raft_term = term;
        if h.revision == 0 {
            h.revision = self.current_revision();
        }
    }

    pub fn current_revision(&self) -> i64 {
        read_state(&self.state)
            .map(|sm| sm.current_revision())
            .unwrap_or(0)
    }

    /// Runs a read against the local state machine.
    pub fn read<T>(
        &self,
        f: impl FnOnce(&StateMachine) -> metastore_core::Result<T>,
    ) -> Result<T, Status> {
        let sm = read_state(&self.state).map_err(Status::from)?;
        f(&sm).map_err(|e| Error::Core(e).into())
    }

    /// etcd's learner guard (`isRPCSupportedForLearner`): a learner serves only Status and
    /// serializable Range; everything else is refused before any other check.
    pub fn refuse_learner(&self) -> Result<(), Status> {
        if self.log.status().is_learner {
            return Err(Error::Cluster(crate::error::ClusterError::NotSupportedForLearner).into());
        }
        Ok(())
    }

    /// Waits until a linearizable read may be served locally.
    pub async fn read_barrier(&self) -> Result<(), Status> {
        #[cfg(madsim)]
        if injected_bugs::STALE_READS.with(|on| on.get()) {
            return Ok(());
        }
        self.log.read_barrier().await.map_err(Status::from)
    }

    /// etcd's quota check (`quotaAlarmer.check`): a write that costs something is refused
    /// once the engine plus the write would reach the quota, and the refusal raises the
    /// NOSPACE alarm through the log first (as etcd does, waiting for it), so that every
    /// member stops accepting writes that cost space until the alarm is disarmed. Costs:
    /// [`metastore_core::alarm::put_cost`], `txn_cost`, and `LEASE_OVERHEAD` for a lease
    /// grant.
    pub async fn check_quota(&self, cost: u64) -> Result<(), Status> {
        match self.limits.quota_bytes {
            Some(quota) if cost > 0 => {
                let size = self.engine_size_for_quota();
                if size + cost >= quota {
                    tracing::warn!(
                        db_size = size,
                        quota,
                        "refusing a write: database space exceeded; raising the NOSPACE alarm"
                    );
                    let raise = pb::AlarmRequest {
                        action: pb::alarm_request::AlarmAction::Activate as i32,
                        member_id: self.identity.member_id,
                        alarm: pb::AlarmType::Nospace as i32,
                    };
                    // etcd ignores the outcome of raising the alarm: the client gets
                    // "database space exceeded" either way.
                    if let Err(e) = self
                        .propose_internal(internal_request::Request::Alarm(raise))
                        .await
                    {
                        tracing::warn!(error = %e, "raising the NOSPACE alarm failed");
                    }
                    return Err(EtcdError::NoSpace.status());
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn engine_size_for_quota(&self) -> u64 {
        let now_ms = self.started.elapsed().as_millis() as u64;
        let at = self.quota_size_at_ms.load(Ordering::Relaxed);
        if at != u64::MAX && now_ms.saturating_sub(at) < SIZE_REFRESH.as_millis() as u64 {
            return self.quota_size.load(Ordering::Relaxed);
        }
        let size = self.engine.size();
        self.quota_size.store(size, Ordering::Relaxed);
        self.quota_size_at_ms.store(now_ms, Ordering::Relaxed);
        size
    }

    /// Wraps a request in the replicated envelope, stamped with a fresh request ID and
    /// the proposer's clock, checks its size, and proposes it.
    pub async fn propose(
        &self,
        request: internal_request::Request,
    ) -> Result<ApplyResponse, Status> {
        self.propose_internal(request).await.map_err(Status::from)
    }

    /// `propose` for callers inside the runtime (the compactor) that match on errors.
    pub async fn propose_internal(
        &self,
        request: internal_request::Request,
    ) -> Result<ApplyResponse, Error> {
        let envelope = InternalRequest {
            // The request ID is the replicator's to assign (one ID space per member).
            header: Some(RequestHeader::default()),
            proposed_at_unix_nanos: self.wall_clock.unix_nanos(),
            request: Some(request),
        };
        // etcd measures the marshalled internal request against --max-request-bytes.
        if prost::Message::encoded_len(&envelope) > self.limits.max_request_bytes {
            return Err(Error::Core(metastore_core::Error::RequestTooLarge));
        }
        self.log.propose(envelope).await
    }
}

/// A response of the wrong kind for the request: a bug between runtime and core.
fn mismatched(what: &str, got: &ApplyResponse) -> Status {
    Status::from(Error::Internal(format!(
        "{what} answered with {:?}",
        std::mem::discriminant(got)
    )))
}

/// Whether every Range of a read-only transaction asked for a serializable read (etcd's
/// `isTxnSerializable`); then no read barrier is needed.
fn txn_is_serializable(r: &pb::TxnRequest) -> bool {
    r.success
        .iter()
        .chain(&r.failure)
        .all(|op| match &op.request {
            Some(pb::request_op::Request::RequestRange(range)) => range.serializable,
            _ => false,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::request_op::Request as Op;

    fn op(r: Op) -> pb::RequestOp {
        pb::RequestOp { request: Some(r) }
    }

    #[test]
    fn serializable_txns() {
        let range = |s: bool| {
            op(Op::RequestRange(pb::RangeRequest {
                key: b"k".to_vec(),
                serializable: s,
                ..Default::default()
            }))
        };
        let ro = pb::TxnRequest {
            success: vec![range(true)],
            failure: vec![range(true)],
            ..Default::default()
        };
        assert!(txn_is_serializable(&ro));
        let linear = pb::TxnRequest {
            success: vec![range(true), range(false)],
            ..Default::default()
        };
        assert!(!txn_is_serializable(&linear));
    }
}

/// Bugs the simulation injects on purpose to prove its checkers catch them. Only the
/// simulation build has them; a production build cannot turn them on.
/// They are per thread: a simulation runs every node of one seed on one thread, and other
/// tests of the same binary run on other threads.
#[cfg(madsim)]
pub mod injected_bugs {
    use std::cell::Cell;

    thread_local! {
        /// Serve linearizable reads from local state without ReadIndex (a partitioned
        /// member then answers stale values).
        pub static STALE_READS: Cell<bool> = const { Cell::new(false) };
    }
}
