//! MetaStore's runtime: everything that touches the world around the deterministic state
//! machine — flags, storage engines, the replicated log, the gRPC services, timers.
//!
//! This crate owns I/O, time and concurrency. It must never decide what a request does
//! to the key space (that is `metastore-core`, reached through `StateMachine::apply` and
//! its read methods), and every client-visible error goes through [`status`].
//!
//! Layers, outside in: [`config`] → [`server`] (assembly, shutdown) → [`api`] (services)
//! → [`replication`] (the log seam) → core's `StateMachine` → [`storage`] (engines).
//! Beside them run the timers: [`compactor`] and [`lessor`] (the leader's lease expiry).

pub mod api;
#[cfg(not(madsim))]
pub mod authority;
pub mod clock;
pub mod compactor;
pub mod config;
pub mod error;
pub mod lessor;
pub mod membership;
pub mod raft;
#[cfg(not(madsim))]
pub mod recv_limit;
pub mod replication;
#[cfg(not(madsim))]
pub mod require_leader;
pub mod server;
pub mod signal;
pub mod status;
pub mod storage;
pub mod watch;

pub use config::{Config, Flags};

/// Runs storage, apply and whole-store work off the async worker threads. Under
/// simulation there are no blocking threads (madsim refuses OS threads), so it runs
/// inline, which also keeps the run deterministic.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> std::result::Result<T, String> {
    #[cfg(not(madsim))]
    {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| e.to_string())
    }
    #[cfg(madsim)]
    {
        Ok(f())
    }
}
pub use error::{Error, Result};
pub use server::{start, start_with, Injected, RunningServer, StartError};
