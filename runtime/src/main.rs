//! The `metastore` binary: parse etcd-compatible flags, start one member, serve until
//! SIGINT or SIGTERM, then shut down gracefully.
//!
//! It owns process concerns only (exit codes, logging set-up, signals) and must never
//! contain server logic: everything it starts lives in the library so tests can run it
//! in-process.

// Simulation builds (RUSTFLAGS="--cfg madsim") run members inside `metastore-sim`; there
// is no process, no signal and no real runtime to start, so the binary is a stub there.
#[cfg(madsim)]
fn main() {
    eprintln!("metastore: this is a simulation build; run members through metastore-sim");
}

#[cfg(not(madsim))]
use std::process::ExitCode;

/// mimalloc rather than glibc's malloc: the server allocates small buffers on one thread
/// (apply, watch fan-out) that gRPC frees on another, which glibc's arenas handle poorly
/// (see docs/benchmarks.md).
#[cfg(not(madsim))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(not(madsim))]
use clap::Parser;
#[cfg(not(madsim))]
use metastore_runtime::config::{Config, Flags, LogLevel};
#[cfg(not(madsim))]
use tracing_subscriber::EnvFilter;

#[cfg(not(madsim))]
fn init_tracing(level: LogLevel) {
    // --log-level sets our level; RUST_LOG, when set, refines it. The gRPC stack is
    // chatty at debug level, so it stays at warn unless RUST_LOG asks otherwise.
    let default = format!(
        "{level},h2=warn,hyper=warn,hyper_util=warn,tower=warn,tonic=warn",
        level = level.as_str()
    );
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal: logs captured to files stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

#[cfg(all(unix, not(madsim)))]
async fn terminated() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return "SIGINT";
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

#[cfg(all(not(unix), not(madsim)))]
async fn terminated() -> &'static str {
    let _ = tokio::signal::ctrl_c().await;
    "interrupt"
}

#[cfg(not(madsim))]
fn main() -> ExitCode {
    let flags = Flags::parse();
    let config = match Config::from_flags(flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("metastore: {e}");
            return ExitCode::from(1);
        }
    };
    init_tracing(config.log_level);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    // With tokio's LIFO slot, a task woken by a running task runs right after it: each
    // gRPC stream that gets its answer wakes its connection's task, which then writes that
    // one response at once (a `writev` per response). Without it, the connection task
    // queues behind the other answered streams and writes their responses together: a
    // third of the `writev`s and about a tenth less CPU per put (docs/benchmarks.md,
    // session 5). The option is unstable in tokio, hence the cfg set in
    // .cargo/config.toml; a build without it only loses this.
    #[cfg(tokio_unstable)]
    builder.disable_lifo_slot();
    // One core is left to the threads outside tokio's workers: the raft log writer
    // (fdatasync), RocksDB's flushes and compactions, and the blocking pool. When the
    // raft loop persisted and applied on a blocking thread, this made 64-client puts a
    // third faster on two cores shared with a load generator (docs/benchmarks.md,
    // session 5); since the log writer took over (session 8) two workers measure the
    // same as one there. TOKIO_WORKER_THREADS still overrides it.
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        builder.worker_threads(cores.saturating_sub(1).max(1));
    }
    let runtime = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("metastore: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async move {
        let mut server = match metastore_runtime::start(config).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "failed to start");
                eprintln!("metastore: {e}");
                return ExitCode::from(1);
            }
        };
        let failure = tokio::select! {
            signal = terminated() => {
                tracing::info!(signal, "received signal");
                None
            }
            why = server.failed() => Some(why),
        };
        let result = server.shutdown().await;
        match (failure, result) {
            (None, Ok(())) => ExitCode::SUCCESS,
            (Some(why), _) | (None, Err(why)) => {
                tracing::error!(error = %why, "exiting after a failure");
                ExitCode::from(2)
            }
        }
    })
}
