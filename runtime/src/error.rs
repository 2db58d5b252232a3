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
    /// A gRPC message whose length prefix is above the receive limit
    /// (`--max-request-bytes` + 512 KiB); refused before it is read.
    #[error("received message larger than max ({len} vs. {max})")]
    MessageTooLarge { len: usize, max: usize },
    /// A bug: an invariant of the runtime itself did not hold.
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<metastore_core::BackendError> for Error {
    fn from(e: metastore_core::BackendError) -> Self {
        Error::Storage(e.0)
    }
}
