//! metastore-bench-compare: starts a real etcd (/usr/bin/etcd) and MetaStore on free
//! loopback ports with temporary data dirs (single servers, or `--members 3` clusters),
//! runs the same workloads against each in one run, prints a side-by-side table with
//! ratios, and stops both.
//!
//! The metastore binary is found as in the tests (METASTORE_BIN, else next to this
//! executable's profile dir, ...): build both in release for meaningful numbers, which
//! `tests/bench/compare.sh` does.

use std::time::Duration;

use clap::Parser;
use metastore_tests::bench::{run, BenchConfig, BenchReport, Workload};
use metastore_tests::cluster::Cluster;
use metastore_tests::lease_bench::{self, fmt_kib, LeaseBenchConfig, LeaseReport};
use metastore_tests::watch_bench::{run_watch, WatchBenchConfig, WatchBenchReport};
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
    /// Members per cluster: 1 compares single servers; 3 compares two three-member
    /// clusters, the clients spread over every member's endpoint.
    #[arg(long, default_value_t = 1)]
    members: usize,
    /// Which tables to produce: kv, watch or all.
    #[arg(long, default_value = "all")]
    workloads: String,
    /// Also run the lease workload with this many leases (one key each); 0 skips it.
    #[arg(long, default_value_t = 0)]
    leases: u64,
    /// TTL of the lease workload's leases, seconds.
    #[arg(long, default_value_t = 60)]
    lease_ttl: i64,
    /// Only run the lease workload.
    #[arg(long)]
    lease_only: bool,
    /// Only the workloads whose name starts with one of these (`|`-separated: the names
    /// contain commas), e.g. `--only "put, 1|put, 64"`.
    #[arg(long, value_delimiter = '|')]
    only: Vec<String>,
    /// Runs each workload this many times, alternating etcd and MetaStore, and reports
    /// the run with the median MetaStore/etcd ratio: on a shared machine one run can land
    /// in a burst of someone else's load.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Threads of the load generator's own runtime: 1 runs every client on one thread
    /// (no cross-thread wake-ups, so the generator takes less of the CPU the servers share
    /// with it); 0 is tokio's default, a worker per core.
    #[arg(long, default_value_t = 0)]
    client_threads: usize,
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

/// A watch case: watchers, on one key or one key each, and the writer's put count.
struct WatchCase {
    watchers: usize,
    same_key: bool,
    writes: u64,
}

const WATCH_CASES: &[WatchCase] = &[
    WatchCase {
        watchers: 1,
        same_key: true,
        writes: 2_000,
    },
    WatchCase {
        watchers: 100,
        same_key: true,
        writes: 2_000,
    },
    WatchCase {
        watchers: 10_000,
        same_key: true,
        writes: 200,
    },
    WatchCase {
        watchers: 100,
        same_key: false,
        writes: 2_000,
    },
    WatchCase {
        watchers: 10_000,
        same_key: false,
        writes: 2_000,
    },
];

async fn watch_bench(s: &Server, c: &WatchCase, a: &Args) -> anyhow::Result<WatchBenchReport> {
    let cfg = WatchBenchConfig {
        endpoint: s.endpoint(),
        watchers: c.watchers,
        same_key: c.same_key,
        streams: c.watchers.min(100),
        conns: 8,
        writes: ((c.writes as f64) * a.scale).max(1.0) as u64,
        value_size: a.value_size,
        duration: Duration::from_secs_f64(a.duration.max(60.0)),
        server_pid: s.pid(),
    };
    run_watch(&cfg).await
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

async fn bench(endpoints: &[String], c: &Case, a: &Args) -> anyhow::Result<BenchReport> {
    let cfg = BenchConfig {
        endpoints: endpoints.to_vec(),
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

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let mut builder = match a.client_threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    if a.client_threads > 1 {
        builder.worker_threads(a.client_threads);
    }
    let runtime = builder.enable_all().build()?;
    runtime.block_on(compare(a))
}

async fn compare(a: Args) -> anyhow::Result<()> {
    let engine = match a.engine.as_str() {
        "rocksdb" => Engine::RocksDb,
        "memory" => Engine::Memory,
        e => anyhow::bail!("--engine {e}: rocksdb or memory"),
    };
    eprintln!("metastore binary: {}", metastore_bin().display());
    let (etcd, ms) = if a.members <= 1 {
        (
            vec![Server::start(Kind::Etcd).await],
            vec![Server::start(Kind::Metastore(engine)).await],
        )
    } else {
        (
            Cluster::start(Kind::Etcd, a.members, &[]).await.members,
            Cluster::start(Kind::Metastore(engine), a.members, &[])
                .await
                .members,
        )
    };
    let etcd_eps: Vec<String> = etcd.iter().map(|s| s.endpoint()).collect();
    let ms_eps: Vec<String> = ms.iter().map(|s| s.endpoint()).collect();
    eprintln!(
        "etcd on {etcd_eps:?} (pids {:?}), metastore on {ms_eps:?} (pids {:?})",
        etcd.iter().map(|s| s.pid()).collect::<Vec<_>>(),
        ms.iter().map(|s| s.pid()).collect::<Vec<_>>(),
    );
    let mut rows = Vec::new();
    let kv_cases: &[Case] = if a.workloads == "watch" || a.lease_only {
        &[]
    } else {
        CASES
    };
    for c in kv_cases {
        if !a.only.is_empty() && !a.only.iter().any(|o| c.name.starts_with(o.as_str())) {
            continue;
        }
        let mut runs = Vec::new();
        for _ in 0..a.rounds.max(1) {
            let e = bench(&etcd_eps, c, &a).await?;
            eprintln!("etcd      {}", e.line());
            let m = bench(&ms_eps, c, &a).await?;
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
    if a.workloads != "kv" && !a.lease_only {
        let mut wrows = Vec::new();
        for c in WATCH_CASES {
            // A fresh pair per case, so memory per watcher is not skewed by earlier cases.
            let etcd = Server::start(Kind::Etcd).await;
            let ms = Server::start(Kind::Metastore(engine)).await;
            let e = watch_bench(&etcd, c, &a).await?;
            eprintln!("etcd      {}", e.line());
            let m = watch_bench(&ms, c, &a).await?;
            eprintln!("metastore {}", m.line());
            wrows.push((e, m));
        }
        println!();
        println!(
            "| watchers | keys | etcd events/s | metastore events/s | ratio | etcd / metastore events per server CPU-s | etcd p50 / p99 ms | metastore p50 / p99 ms | etcd B/watcher | metastore B/watcher | delivered (etcd/ms) |"
        );
        println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for (e, m) in &wrows {
            let mem = |r: &WatchBenchReport| {
                r.bytes_per_watcher
                    .map(|b| format!("{b:.0}"))
                    .unwrap_or_else(|| "n/a".into())
            };
            let per_cpu = |r: &WatchBenchReport| {
                r.server_cpu_s
                    .filter(|c| *c > 0.0)
                    .map(|c| format!("{:.0}", r.delivered as f64 / c))
                    .unwrap_or_else(|| "n/a".into())
            };
            println!(
                "| {} | {} | {:.0} | {:.0} | {:.2}x | {} / {} | {:.2} / {:.2} | {:.2} / {:.2} | {} | {} | {}/{} of {}/{} |",
                e.watchers,
                if e.same_key { "same" } else { "distinct" },
                e.events_per_sec,
                m.events_per_sec,
                m.events_per_sec / e.events_per_sec.max(1e-9),
                per_cpu(e),
                per_cpu(m),
                e.p50_us as f64 / 1000.0,
                e.p99_us as f64 / 1000.0,
                m.p50_us as f64 / 1000.0,
                m.p99_us as f64 / 1000.0,
                mem(e),
                mem(m),
                e.delivered,
                m.delivered,
                e.expected,
                m.expected
            );
        }
    }
    if a.leases > 0 {
        let e = lease_case(&etcd[0], &a).await?;
        eprintln!("etcd      {}", e.line());
        let m = lease_case(&ms[0], &a).await?;
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
