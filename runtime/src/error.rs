//! The runtime's error type: what a proposal, a read or a service call can fail with.
//!
//! This module only names failures. It must never decide gRPC codes or messages: every
//! client-visible rendering lives in [`crate::status`], so that the exact etcd texts
//! clients match on are kept in one place.

/// A failure inside the runtime.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The state machine refused the request (etcd's client-visible errors live here).
    #[error(transparent)]
    Core(#[from] metastore_core::Error),
    /// The log or the server is shutting down, or stopped after a fatal failure.
    #[error("server stopped")]
    Stopped,
    /// The storage engine failed underneath the log; the member stops serving writes.
    #[error("storage failure: {0}")]
    Storage(String),
    /// The cluster did not commit a proposal, or confirm a linearizable read, within the
    /// request timeout (no leader, no quorum).
    #[error("request timed out")]
    Timeout,
    /// A proposal that never reached a leader before the request timeout: etcd's raft
    /// holds proposals while there is no leader, and the request then ends with its
    /// context's deadline.
    #[error("context deadline exceeded")]
    ProposalDeadline,
    /// A membership or leadership request this member cannot serve (etcd's cluster
    /// errors that are decided outside the state machine).
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// A gRPC message whose length prefix is above the receive limit
    /// (`--max-request-bytes` + 512 KiB); refused before it is read.
    #[error("received message larger than max ({len} vs. {max})")]
    MessageTooLarge { len: usize, max: usize },
    /// A bug: an invariant of the runtime itself did not hold.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Membership and leadership refusals decided by the runtime (raft progress, roles).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    #[error("not leader")]
    NotLeader,
    #[error("bad leader transferee")]
    BadLeaderTransferee,
    #[error("request timed out, leader transfer took too long")]
    LeaderTransferTimeout,
    #[error("can only promote a learner member which is in sync with leader")]
    LearnerNotReady,
    #[error("re-configuration failed due to not enough started members")]
    NotEnoughStarted,
    #[error("rpc not supported for learner")]
    NotSupportedForLearner,
    #[error("the member has been permanently removed from the cluster")]
    Removed,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<metastore_core::BackendError> for Error {
    fn from(e: metastore_core::BackendError) -> Self {
        Error::Storage(e.0)
    }
}
