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
    /// Only the workloads whose name starts with one of these (`|`-separated: the names
    /// contain commas), e.g. `--only "put, 1|put, 64"`.
    #[arg(long, value_delimiter = '|')]
    only: Vec<String>,
    /// Runs each workload this many times, alternating etcd and MetaStore, and reports
    /// the run with the median MetaStore/etcd ratio: on a shared machine one run can land
    /// in a burst of someone else's load.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
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
    for c in CASES {
        if !a.only.is_empty() && !a.only.iter().any(|o| c.name.starts_with(o.as_str())) {
            continue;
        }
        let mut runs = Vec::new();
        for _ in 0..a.rounds.max(1) {
            let e = bench(&etcd, c, &a).await?;
            eprintln!("etcd      {}", e.line());
            let m = bench(&ms, c, &a).await?;
            eprintln!("metastore {}", m.line());
            eprintln!(
                "          ratio {:.2}x",
                m.ops_per_sec / e.ops_per_sec.max(1e-9)
            );
            runs.push((e, m));
        }
        runs.sort_by(|(e1, m1), (e2, m2)| {
            let r1 = m1.ops_per_sec / e1.ops_per_sec.max(1e-9);
            let r2 = m2.ops_per_sec / e2.ops_per_sec.max(1e-9);
            r1.total_cmp(&r2)
        });
        let (e, m) = runs.swap_remove(runs.len() / 2);
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
    drop(ms);
    drop(etcd);
    Ok(())
}
