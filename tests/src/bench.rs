//! The load generator behind `metastore-bench` and `metastore-bench-compare`: N clients
//! over M shared gRPC channels drive any etcd-API endpoint (MetaStore or a real etcd) with
//! put, range (linearizable or serializable) or txn requests, bounded by a request count
//! and a duration, and report throughput and latency percentiles (hdrhistogram).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use metastore_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use metastore_proto::etcdserverpb::kv_client::KvClient;
use metastore_proto::etcdserverpb::request_op::Request;
use metastore_proto::etcdserverpb::{Compare, PutRequest, RangeRequest, RequestOp, TxnRequest};
use tonic::transport::{Channel, Endpoint};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// Put of a random key in the key space.
    Put,
    /// Linearizable Range of one random key (key space populated first).
    RangeLinearizable,
    /// Serializable Range of one random key (key space populated first).
    RangeSerializable,
    /// Txn: if version(key) >= 0 (always) then put key else range key.
    Txn,
    /// One writer, N watchers (`--watchers`, `--same-key`): see `watch_bench`.
    Watch,
    /// Grant `--total` leases with one key each and time their expiry
    /// ([`crate::lease_bench`], not [`run`]).
    Lease,
}

impl Workload {
    pub fn name(&self) -> &'static str {
        match self {
            Workload::Put => "put",
            Workload::RangeLinearizable => "range-linearizable",
            Workload::RangeSerializable => "range-serializable",
            Workload::Txn => "txn",
            Workload::Watch => "watch",
            Workload::Lease => "lease",
        }
    }
}

/// One benchmark run's parameters.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// `host:port` or `http://host:port`, requests spread over them round-robin.
    pub endpoints: Vec<String>,
    pub clients: usize,
    pub conns: usize,
    pub workload: Workload,
    /// Stop after this many requests...
    pub total: u64,
    /// ...or after this long, whichever comes first.
    pub duration: Duration,
    pub key_size: usize,
    pub value_size: usize,
    pub key_space: u64,
}

/// What a run measured.
#[derive(Clone, Debug)]
pub struct BenchReport {
    pub workload: Workload,
    pub clients: usize,
    pub conns: usize,
    pub ops: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub elapsed: Duration,
    pub ops_per_sec: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

impl BenchReport {
    pub fn line(&self) -> String {
        format!(
            "workload={} clients={} conns={} ops={} errors={} elapsed={:.2}s ops/s={:.0} \
             p50={:.3}ms p99={:.3}ms max={:.3}ms",
            self.workload.name(),
            self.clients,
            self.conns,
            self.ops,
            self.errors,
            self.elapsed.as_secs_f64(),
            self.ops_per_sec,
            self.p50_us as f64 / 1000.0,
            self.p99_us as f64 / 1000.0,
            self.max_us as f64 / 1000.0
        )
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "workload": self.workload.name(),
            "clients": self.clients,
            "conns": self.conns,
            "ops": self.ops,
            "errors": self.errors,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "ops_per_sec": self.ops_per_sec,
            "p50_ms": self.p50_us as f64 / 1000.0,
            "p99_ms": self.p99_us as f64 / 1000.0,
            "max_ms": self.max_us as f64 / 1000.0,
            "first_error": self.first_error,
        })
    }
}

fn url(ep: &str) -> String {
    if ep.starts_with("http://") || ep.starts_with("https://") {
        ep.to_string()
    } else {
        format!("http://{ep}")
    }
}

/// The key of index `i`, exactly `size` bytes (zero-padded decimal, truncated from the left).
pub fn key_of(i: u64, size: usize) -> Vec<u8> {
    let s = format!("{i:0size$}");
    s.as_bytes()[s.len() - size.min(s.len())..].to_vec()
}

/// splitmix64 step, per client, for key choice.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

async fn connect(cfg: &BenchConfig) -> Result<Vec<Channel>> {
    if cfg.endpoints.is_empty() || cfg.clients == 0 || cfg.conns == 0 {
        bail!("need at least one endpoint, client and connection");
    }
    let mut chans = Vec::new();
    for i in 0..cfg.conns {
        let ep = url(&cfg.endpoints[i % cfg.endpoints.len()]);
        let ch = Endpoint::from_shared(ep.clone())?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("connect to {ep}"))?;
        chans.push(ch);
    }
    Ok(chans)
}

/// Puts every key of the key space once (not measured), for the range workloads.
pub async fn populate(cfg: &BenchConfig) -> Result<()> {
    let chans = connect(cfg).await?;
    let next_key = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..cfg.clients.min(64) {
        let mut kv = KvClient::new(chans[c % chans.len()].clone());
        let next_key = next_key.clone();
        let cfg = cfg.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next_key.fetch_add(1, Ordering::Relaxed);
                if i >= cfg.key_space {
                    return Ok::<_, anyhow::Error>(());
                }
                kv.put(PutRequest {
                    key: key_of(i, cfg.key_size),
                    value: vec![b'v'; cfg.value_size],
                    ..Default::default()
                })
                .await
                .context("populate put")?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// Runs one benchmark and reports.
pub async fn run(cfg: &BenchConfig) -> Result<BenchReport> {
    if cfg.workload == Workload::Watch {
        bail!("the watch workload runs through watch_bench::run_watch");
    }
    if cfg.workload == Workload::Lease {
        bail!("the lease workload runs through lease_bench::run");
    }
    if matches!(
        cfg.workload,
        Workload::RangeLinearizable | Workload::RangeSerializable
    ) {
        populate(cfg).await?;
    }
    let chans = connect(cfg).await?;
    let issued = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + cfg.duration;
    let mut tasks = Vec::new();
    for c in 0..cfg.clients {
        let mut kv = KvClient::new(chans[c % chans.len()].clone());
        let issued = issued.clone();
        let cfg = cfg.clone();
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3).unwrap();
            let mut errors = 0u64;
            let mut first_error = None;
            let mut rng = 0x1234_5678u64 ^ ((c as u64) << 32);
            let value = vec![b'v'; cfg.value_size];
            loop {
                if issued.fetch_add(1, Ordering::Relaxed) >= cfg.total || Instant::now() >= deadline
                {
                    break;
                }
                let key = key_of(next(&mut rng) % cfg.key_space.max(1), cfg.key_size);
                let t0 = Instant::now();
                let res = match cfg.workload {
                    Workload::Watch => unreachable!("refused above"),
                    Workload::Put => kv
                        .put(PutRequest {
                            key,
                            value: value.clone(),
                            ..Default::default()
                        })
                        .await
                        .map(|_| ()),
                    Workload::RangeLinearizable | Workload::RangeSerializable => kv
                        .range(RangeRequest {
                            key,
                            serializable: cfg.workload == Workload::RangeSerializable,
                            ..Default::default()
                        })
                        .await
                        .map(|_| ()),
                    Workload::Txn => kv
                        .txn(TxnRequest {
                            compare: vec![Compare {
                                result: CompareResult::Greater as i32,
                                target: CompareTarget::Version as i32,
                                key: key.clone(),
                                target_union: Some(TargetUnion::Version(-1)),
                                range_end: vec![],
                            }],
                            success: vec![RequestOp {
                                request: Some(Request::RequestPut(PutRequest {
                                    key: key.clone(),
                                    value: value.clone(),
                                    ..Default::default()
                                })),
                            }],
                            failure: vec![RequestOp {
                                request: Some(Request::RequestRange(RangeRequest {
                                    key,
                                    ..Default::default()
                                })),
                            }],
                        })
                        .await
                        .map(|_| ()),
                    // Refused at the top of `run`.
                    Workload::Lease => Ok(()),
                };
                match res {
                    Ok(()) => {
                        let us = t0.elapsed().as_micros().max(1) as u64;
                        hist.saturating_record(us);
                    }
                    Err(e) => {
                        errors += 1;
                        if first_error.is_none() {
                            first_error = Some(format!("{:?}: {}", e.code(), e.message()));
                        }
                    }
                }
            }
            (hist, errors, first_error)
        }));
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3).unwrap();
    let mut errors = 0;
    let mut first_error = None;
    for t in tasks {
        let (h, e, f) = t.await?;
        hist.add(&h).ok();
        errors += e;
        if first_error.is_none() {
            first_error = f;
        }
    }
    let elapsed = start.elapsed();
    let ops = hist.len();
    Ok(BenchReport {
        workload: cfg.workload,
        clients: cfg.clients,
        conns: cfg.conns,
        ops,
        errors,
        first_error,
        elapsed,
        ops_per_sec: ops as f64 / elapsed.as_secs_f64(),
        p50_us: hist.value_at_quantile(0.50),
        p99_us: hist.value_at_quantile(0.99),
        max_us: hist.max(),
    })
}
