//! metastore-bench: a load generator for any etcd v3 endpoint (MetaStore or etcd).
//!
//! ```text
//! metastore-bench --endpoints 127.0.0.1:2379 --clients 64 --conns 8 --workload put \
//!     --total 100000 --duration 60 --key-size 8 --value-size 256 --key-space 10000
//! ```
//! Prints ops/s and p50/p99/max latency (add `--json` for one JSON line).
//!
//! ```text
//! metastore-bench --endpoints 127.0.0.1:2379 --workload watch --watchers 10000 \
//!     [--same-key] --streams 100 --conns 8 --total 1000 --server-pid <pid>
//! ```
//! One writer puts `--total` times; prints delivered events/s, put-to-event latency and
//! the server's memory per idle watcher.
//! `--workload lease --total 100000 --lease-ttl 60 [--server-pid PID]` grants that many
//! leases with one key each and reports the delay from TTL end to deletion (p50/p99) and,
//! with the server's PID, its memory (see `metastore_tests::lease_bench`).

use std::time::Duration;

use clap::Parser;
use metastore_tests::bench::{run, BenchConfig, Workload};
use metastore_tests::lease_bench::{self, LeaseBenchConfig};
use metastore_tests::watch_bench::{run_watch, WatchBenchConfig};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Load generator for etcd-API endpoints (MetaStore or etcd)"
)]
struct Args {
    /// Comma-separated endpoints (host:port or http://host:port).
    #[arg(long, default_value = "127.0.0.1:2379", value_delimiter = ',')]
    endpoints: Vec<String>,
    /// Concurrent clients (each with one request in flight).
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// gRPC connections shared by the clients.
    #[arg(long, default_value_t = 1)]
    conns: usize,
    #[arg(long, value_enum, default_value_t = Workload::Put)]
    workload: Workload,
    /// Stop after this many requests.
    #[arg(long, default_value_t = 10_000)]
    total: u64,
    /// Stop after this many seconds, whatever the count.
    #[arg(long, default_value_t = 60.0)]
    duration: f64,
    #[arg(long, default_value_t = 8)]
    key_size: usize,
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    /// Number of distinct keys.
    #[arg(long, default_value_t = 10_000)]
    key_space: u64,
    /// Lease workload: TTL of every lease, seconds (must outlast granting and attaching).
    #[arg(long, default_value_t = 60)]
    lease_ttl: i64,
    /// Print the result as one JSON line.
    #[arg(long)]
    json: bool,
    /// watch workload: number of watchers.
    #[arg(long, default_value_t = 100)]
    watchers: usize,
    /// watch workload: every watcher on one key (else one key each).
    #[arg(long)]
    same_key: bool,
    /// watch workload: watch streams the watchers are spread over.
    #[arg(long, default_value_t = 100)]
    streams: usize,
    /// watch and lease workloads: the server's PID, to report its memory (per idle
    /// watcher, or with the leases loaded).
    #[arg(long)]
    server_pid: Option<u32>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    if a.workload == Workload::Watch {
        let cfg = WatchBenchConfig {
            endpoint: a.endpoints[0].clone(),
            watchers: a.watchers,
            same_key: a.same_key,
            streams: a.streams,
            conns: a.conns,
            writes: a.total,
            value_size: a.value_size,
            duration: Duration::from_secs_f64(a.duration),
            server_pid: a.server_pid,
        };
        let r = run_watch(&cfg).await?;
        if a.json {
            println!("{}", r.json());
        } else {
            println!("{}", r.line());
        }
        return Ok(());
    }
    if a.workload == Workload::Lease {
        let r = lease_bench::run(&LeaseBenchConfig {
            endpoint: a.endpoints[0].clone(),
            clients: a.clients,
            conns: a.conns,
            leases: a.total,
            ttl: a.lease_ttl,
            poll: Duration::from_millis(10),
            server_pid: a.server_pid,
            give_up: Duration::from_secs_f64(a.duration),
        })
        .await?;
        println!("{}", r.line());
        return Ok(());
    }
    let cfg = BenchConfig {
        endpoints: a.endpoints,
        clients: a.clients,
        conns: a.conns,
        workload: a.workload,
        total: a.total,
        duration: Duration::from_secs_f64(a.duration),
        key_size: a.key_size,
        value_size: a.value_size,
        key_space: a.key_space,
    };
    let r = run(&cfg).await?;
    if a.json {
        println!("{}", r.json());
    } else {
        println!("{}", r.line());
        if let Some(e) = &r.first_error {
            println!("first error: {e}");
        }
    }
    Ok(())
}
