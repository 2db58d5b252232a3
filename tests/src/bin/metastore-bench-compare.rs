//! metastore-bench-compare: starts a real etcd (/usr/bin/etcd) and MetaStore on free
//! loopback ports with temporary data dirs, runs the same workloads against each in one
//! run, prints a side-by-side table with ratios, and stops both.
//!
//! The metastore binary is found as in the tests (METASTORE_BIN, else next to this
//! executable's profile dir, ...): build both in release for meaningful numbers, which
//! `tests/bench/compare.sh` does.

use std::time::Duration;

use clap::Parser;
use metastore_tests::bench::{run, BenchConfig, BenchReport, Workload};
use metastore_tests::lease_bench::{self, fmt_kib, LeaseBenchConfig, LeaseReport};
use metastore_tests::{metastore_bin, Engine, Kind, Server};

#[derive(Parser, Debug)]
#[command(about = "Run the same workloads against etcd and MetaStore and compare")]
struct Args {
    /// Multiplies every workload's request count.
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Upper bound on each single run, in seconds.
    #[arg(long, default_value_t = 30.0)]
    duration: f64,
    /// MetaStore storage engine.
    #[arg(long, default_value = "rocksdb")]
    engine: String,
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    /// Also run the lease workload with this many leases (one key each); 0 skips it.
    #[arg(long, default_value_t = 0)]
    leases: u64,
    /// TTL of the lease workload's leases, seconds.
    #[arg(long, default_value_t = 60)]
    lease_ttl: i64,
    /// Only run the lease workload.
    #[arg(long)]
    lease_only: bool,
}

async fn lease_case(s: &Server, a: &Args) -> anyhow::Result<LeaseReport> {
    lease_bench::run(&LeaseBenchConfig {
        endpoint: s.endpoint(),
        clients: 64,
        conns: 8,
        leases: a.leases,
        ttl: a.lease_ttl,
        poll: Duration::from_millis(10),
        server_pid: s.pid(),
        give_up: Duration::from_secs(120),
    })
    .await
}

struct Case {
    name: &'static str,
    workload: Workload,
    clients: usize,
    conns: usize,
    total: u64,
}

const CASES: &[Case] = &[
    Case {
        name: "put, 1 client (sequential)",
        workload: Workload::Put,
        clients: 1,
        conns: 1,
        total: 2_000,
    },
    Case {
        name: "put, 64 clients",
        workload: Workload::Put,
        clients: 64,
        conns: 8,
        total: 30_000,
    },
    Case {
        name: "range linearizable, 64 clients",
        workload: Workload::RangeLinearizable,
        clients: 64,
        conns: 8,
        total: 50_000,
    },
    Case {
        name: "range serializable, 64 clients",
        workload: Workload::RangeSerializable,
        clients: 64,
        conns: 8,
        total: 50_000,
    },
    Case {
        name: "txn (put), 64 clients",
        workload: Workload::Txn,
        clients: 64,
        conns: 8,
        total: 30_000,
    },
];

async fn bench(s: &Server, c: &Case, a: &Args) -> anyhow::Result<BenchReport> {
    let cfg = BenchConfig {
        endpoints: vec![s.endpoint()],
        clients: c.clients,
        conns: c.conns,
        workload: c.workload,
        total: ((c.total as f64) * a.scale).max(1.0) as u64,
        duration: Duration::from_secs_f64(a.duration),
        key_size: 8,
        value_size: a.value_size,
        key_space: 10_000,
    };
    run(&cfg).await
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let engine = match a.engine.as_str() {
        "rocksdb" => Engine::RocksDb,
        "memory" => Engine::Memory,
        e => anyhow::bail!("--engine {e}: rocksdb or memory"),
    };
    eprintln!("metastore binary: {}", metastore_bin().display());
    let etcd = Server::start(Kind::Etcd).await;
    let ms = Server::start(Kind::Metastore(engine)).await;
    eprintln!(
        "etcd on {} (pid {:?}), metastore on {} (pid {:?})",
        etcd.endpoint(),
        etcd.pid(),
        ms.endpoint(),
        ms.pid()
    );
    let mut rows = Vec::new();
    let cases: &[Case] = if a.lease_only { &[] } else { CASES };
    for c in cases {
        let e = bench(&etcd, c, &a).await?;
        eprintln!("etcd      {}", e.line());
        let m = bench(&ms, c, &a).await?;
        eprintln!("metastore {}", m.line());
        rows.push((c.name, e, m));
    }
    println!();
    println!(
        "| workload | etcd ops/s | metastore ops/s | ratio | etcd p50 / p99 ms | metastore p50 / p99 ms | errors (etcd/ms) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (name, e, m) in &rows {
        println!(
            "| {name} | {:.0} | {:.0} | {:.2}x | {:.2} / {:.2} | {:.2} / {:.2} | {}/{} |",
            e.ops_per_sec,
            m.ops_per_sec,
            m.ops_per_sec / e.ops_per_sec.max(1e-9),
            e.p50_us as f64 / 1000.0,
            e.p99_us as f64 / 1000.0,
            m.p50_us as f64 / 1000.0,
            m.p99_us as f64 / 1000.0,
            e.errors,
            m.errors
        );
    }
    for (name, e, m) in &rows {
        for (who, r) in [("etcd", e), ("metastore", m)] {
            if let Some(err) = &r.first_error {
                println!("{name}: {who} first error: {err}");
            }
        }
    }
    if a.leases > 0 {
        let e = lease_case(&etcd, &a).await?;
        eprintln!("etcd      {}", e.line());
        let m = lease_case(&ms, &a).await?;
        eprintln!("metastore {}", m.line());
        println!();
        println!(
            "| lease workload ({} leases, TTL {} s) | grant s | put s | RSS before | RSS loaded | TTL end to delete p50 / p99 / max ms | drain s | left |",
            a.leases, a.lease_ttl
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|");
        for (who, r) in [("etcd", &e), ("metastore", &m)] {
            println!(
                "| {who} | {:.1} | {:.1} | {} | {} | {:.0} / {:.0} / {:.0} | {:.2} | {} |",
                r.grant_secs,
                r.put_secs,
                fmt_kib(r.rss_before_kib),
                fmt_kib(r.rss_loaded_kib),
                r.p50_ms,
                r.p99_ms,
                r.max_ms,
                r.drain_secs,
                r.left_over
            );
        }
    }
    drop(ms);
    drop(etcd);
    Ok(())
}
