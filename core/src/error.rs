//! The state machine's typed errors. Each variant is one of etcd's client-visible errors
//! (or an internal failure); `runtime` maps them to etcd's exact gRPC code and message in
//! one place. Messages here are etcd's text without the `etcdserver: ` prefix.

/// A failure of the storage engine underneath the state machine.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("backend: {0}")]
pub struct BackendError(pub String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("key is not provided")]
    EmptyKey,
    #[error("key not found")]
    KeyNotFound,
    #[error("value is provided")]
    ValueProvided,
    #[error("lease is provided")]
    LeaseProvided,
    #[error("too many operations in txn request")]
    TooManyOps,
    #[error("duplicate key given in txn request")]
    DuplicateKey,
    #[error("invalid sort option")]
    InvalidSortOption,
    #[error("mvcc: required revision has been compacted")]
    Compacted,
    #[error("mvcc: required revision is a future revision")]
    FutureRevision,
    #[error("mvcc: database space exceeded")]
    NoSpace,
    #[error("requested lease not found")]
    LeaseNotFound,
    #[error("lease already exists")]
    LeaseExists,
    #[error("too large lease TTL")]
    LeaseTtlTooLarge,
    #[error("request is too large")]
    RequestTooLarge,
    #[error("member ID already exist")]
    MemberExists,
    #[error("Peer URLs already exists")]
    PeerUrlExists,
    #[error("member not found")]
    MemberNotFound,
    #[error("can only promote a learner member")]
    MemberNotLearner,
    #[error("too many learner members in cluster")]
    TooManyLearners,
    /// A CORRUPT alarm is active: etcd's `ErrCorrupt`, "corrupt cluster".
    #[error("corrupt cluster")]
    CorruptAlarm,
    /// An Alarm request etcd cannot serve (unknown action, activating an unknown type):
    /// etcd crashes on these; MetaStore refuses them.
    #[error("{0}")]
    InvalidAlarm(String),
    /// `apply` was given an entry at or below the applied index: it was applied before
    /// (replay after a restart) and is ignored.
    #[error("entry {index} is already applied (applied index {applied})")]
    AlreadyApplied { index: u64, applied: u64 },
    /// The envelope carried a request kind whose capability has not landed yet.
    #[error("{0} is not implemented yet")]
    Unimplemented(&'static str),
    /// The envelope could not be decoded or had no request set.
    #[error("malformed internal request: {0}")]
    MalformedRequest(String),
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// Stored data violates an invariant (decoding failed, index and data disagree).
    #[error("corrupt state: {0}")]
    Corrupt(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
