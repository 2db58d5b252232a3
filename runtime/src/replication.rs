//! The replicated log seam: what the services may ask of replication.
//!
//! This module owns the boundary between "a service has a write" and "the write is
//! durable, applied, and answered": the [`Replicator`] trait the services call, the
//! [`EventSink`] applied entries' watch events leave through, and the shared state
//! machine. The implementation is [`crate::raft::RaftNode`] (one member or many); tests
//! may substitute their own.
//!
//! An implementation must never answer a proposer before the entry is committed and
//! applied (an acknowledged write survives a crash, and a read started after the
//! acknowledgement sees it), never apply entries out of order or twice (the state
//! machine's applied index is the fence), and never interpret requests itself: what a
//! request does is core's call.

use std::sync::{Arc, RwLock, RwLockReadGuard};

use futures::future::BoxFuture;
use metastore_core::lease::LeaseChange;
use metastore_core::{ApplyResponse, StateMachine};
use metastore_proto::metastore::{InternalRequest, MemberChange};
use metastore_proto::mvccpb;

use crate::error::{Error, Result};

/// The state machine, shared between the log (the only writer) and the services
/// (readers).
pub type SharedState = Arc<RwLock<StateMachine>>;

/// Takes the state machine for reading. A poisoned lock means an apply panicked half way:
/// the state may be inconsistent, so nothing is served from it any more.
pub fn read_state(state: &SharedState) -> Result<RwLockReadGuard<'_, StateMachine>> {
    state.read().map_err(|_| Error::Stopped)
}

/// Receives the watch events of every applied entry, in log order, while the state
/// machine's write lock is still held. So a watcher that registers under the read lock at
/// revision R gets every event above R from the sink and none at or below it.
///
/// `publish` runs on the apply path: it must not block or wait on anything a service
/// holds, only hand the events on.
pub trait EventSink: Send + Sync + 'static {
    /// The events of one applied entry: one main revision, never empty.
    fn publish(&self, events: Vec<mvccpb::Event>);
    /// What one applied entry did to the lease table (never empty), on the same path
    /// and under the same lock as `publish`: the leader's expiry timers follow grants,
    /// revokes and checkpoints from here, whoever proposed them.
    fn leases_changed(&self, _changes: &[LeaseChange]) {}
    /// The whole state was replaced by a snapshot (a member that fell far behind): what
    /// a sink derived from earlier entries must be rebuilt from the state. Called under
    /// the state machine's write lock, like `publish`.
    fn restored(&self, _state: &StateMachine) {}
    /// Whether this sink reads `prev_kv` from the events (asked under the state
    /// machine's write lock before each apply; see `StateMachine::set_event_prev_kv`).
    fn wants_prev_kv(&self) -> bool {
        true
    }
}

/// Hands every applied entry's output to several sinks, in order (watch hub, lessor).
pub struct Fanout(pub Vec<Arc<dyn EventSink>>);

impl EventSink for Fanout {
    fn publish(&self, events: Vec<mvccpb::Event>) {
        if let Some((last, rest)) = self.0.split_last() {
            for sink in rest {
                sink.publish(events.clone());
            }
            last.publish(events);
        }
    }
    fn leases_changed(&self, changes: &[LeaseChange]) {
        for sink in &self.0 {
            sink.leases_changed(changes);
        }
    }
    fn restored(&self, state: &StateMachine) {
        for sink in &self.0 {
            sink.restored(state);
        }
    }
    fn wants_prev_kv(&self) -> bool {
        self.0.iter().any(|sink| sink.wants_prev_kv())
    }
}

/// A sink for members that serve no watchers.
pub struct NoEvents;

impl EventSink for NoEvents {
    fn publish(&self, _events: Vec<mvccpb::Event>) {}
}

/// What the services need to know about replication for Status and response headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaStatus {
    /// The current leader's member ID (0 when there is none).
    pub leader: u64,
    pub term: u64,
    /// Index of the last durable (committed) entry.
    pub commit_index: u64,
    /// Index of the last entry applied to the state machine.
    pub applied_index: u64,
    /// Whether this member is a learner (receives the log, does not vote).
    pub is_learner: bool,
}

/// The boundary between the services and replication.
pub trait Replicator: Send + Sync + 'static {
    /// Appends `request` to the log and resolves with its apply result once it is
    /// durable and applied. Dropping the future does not withdraw the proposal.
    fn propose(&self, request: InternalRequest) -> BoxFuture<'static, Result<ApplyResponse>>;
    /// Resolves when the local state machine reflects every write acknowledged before
    /// the call, so a linearizable read may be served locally.
    fn read_barrier(&self) -> BoxFuture<'static, Result<()>>;
    fn status(&self) -> ReplicaStatus;
    /// Proposes a change of the member set as a raft configuration change; resolves with
    /// the members after it once it is applied here.
    fn change_members(&self, change: MemberChange) -> BoxFuture<'static, Result<ApplyResponse>>;
    /// Hands leadership to `target` (etcd's MoveLeader); resolves once it leads.
    fn move_leader(&self, target: u64) -> BoxFuture<'static, Result<()>>;
    /// Whether this member leads now: only the leader decides lease expiry and renews
    /// leases. A change of leader shows as a change of `status().term` too.
    fn is_leader(&self) -> bool;
}
