//! The `lease` benchmark: grant N leases with one key each, then measure how long after
//! each lease's TTL end its key is gone, when all of them run out together; plus the
//! server's resident memory with the leases in place.
//!
//! Method. Grants run first (all clients), then one put per lease; a lease's TTL end is
//! the moment its grant was answered plus its TTL, so the TTL must outlast both phases
//! (it is checked). Deletion is observed by polling a count-only range over the key
//! prefix every `poll` (Watch is not available on MetaStore yet): when a poll sees `c`
//! keys left, the first `N - c` leases in TTL-end order are taken as gone at that poll.
//! That attribution is exact when the server revokes in expiry order (both etcd and
//! MetaStore do, up to rate limiting); its resolution is the poll period plus one
//! count-only range. Memory is the server process's VmRSS from /proc, before granting and
//! with every lease and key in place.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use metastore_proto::etcdserverpb::kv_client::KvClient;
use metastore_proto::etcdserverpb::lease_client::LeaseClient;
use metastore_proto::etcdserverpb::{LeaseGrantRequest, PutRequest, RangeRequest};
use tonic::transport::{Channel, Endpoint};

#[derive(Clone, Debug)]
pub struct LeaseBenchConfig {
    pub endpoint: String,
    pub clients: usize,
    pub conns: usize,
    /// Leases to grant (one key each).
    pub leases: u64,
    /// TTL of every lease, seconds.
    pub ttl: i64,
    /// Period of the deletion polls.
    pub poll: Duration,
    /// The server's PID, to read its memory (None: not reported).
    pub server_pid: Option<u32>,
    /// Give up waiting for the deletions after this long past the last TTL end.
    pub give_up: Duration,
}

#[derive(Clone, Debug)]
pub struct LeaseReport {
    pub leases: u64,
    pub ttl: i64,
    pub grant_secs: f64,
    pub put_secs: f64,
    pub rss_before_kib: Option<u64>,
    pub rss_loaded_kib: Option<u64>,
    /// Delay from TTL end to observed deletion.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// From the first TTL end to the moment no key was left.
    pub drain_secs: f64,
    pub left_over: u64,
}

impl LeaseReport {
    pub fn line(&self) -> String {
        format!(
            "lease: leases={} ttl={}s grant={:.2}s put={:.2}s rss_before={} rss_loaded={} \
             ttl_end_to_delete p50={:.0}ms p99={:.0}ms max={:.0}ms drain={:.2}s left_over={}",
            self.leases,
            self.ttl,
            self.grant_secs,
            self.put_secs,
            fmt_kib(self.rss_before_kib),
            fmt_kib(self.rss_loaded_kib),
            self.p50_ms,
            self.p99_ms,
            self.max_ms,
            self.drain_secs,
            self.left_over
        )
    }
}

pub fn fmt_kib(k: Option<u64>) -> String {
    match k {
        Some(k) => format!("{:.1}MiB", k as f64 / 1024.0),
        None => "n/a".into(),
    }
}

/// VmRSS of a process, KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

const PREFIX: &str = "lease-bench/";

fn key(rank: u64) -> Vec<u8> {
    format!("{PREFIX}{rank:08}").into_bytes()
}

async fn connect(cfg: &LeaseBenchConfig) -> Result<Vec<Channel>> {
    let ep = if cfg.endpoint.starts_with("http") {
        cfg.endpoint.clone()
    } else {
        format!("http://{}", cfg.endpoint)
    };
    let mut chans = Vec::new();
    for _ in 0..cfg.conns.max(1) {
        chans.push(
            Endpoint::from_shared(ep.clone())?
                .connect_timeout(Duration::from_secs(5))
                .timeout(Duration::from_secs(30))
                .tcp_nodelay(true)
                .connect()
                .await
                .with_context(|| format!("connect to {ep}"))?,
        );
    }
    Ok(chans)
}

pub async fn run(cfg: &LeaseBenchConfig) -> Result<LeaseReport> {
    if cfg.leases == 0 || cfg.clients == 0 {
        bail!("need at least one lease and one client");
    }
    let chans = connect(cfg).await?;
    let rss_before_kib = cfg.server_pid.and_then(rss_kib);

    // Grants: each answered grant gets its TTL end.
    let granted: Arc<Mutex<Vec<(Instant, i64)>>> =
        Arc::new(Mutex::new(Vec::with_capacity(cfg.leases as usize)));
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..cfg.clients {
        let mut lc = LeaseClient::new(chans[c % chans.len()].clone());
        let (next, granted, cfg) = (next.clone(), granted.clone(), cfg.clone());
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < cfg.leases {
                let r = lc
                    .lease_grant(LeaseGrantRequest {
                        ttl: cfg.ttl,
                        id: 0,
                    })
                    .await
                    .context("grant")?
                    .into_inner();
                let end = Instant::now() + Duration::from_secs(cfg.ttl as u64);
                granted.lock().unwrap().push((end, r.id));
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks.drain(..) {
        t.await??;
    }
    let grant_secs = start.elapsed().as_secs_f64();
    let mut leases = std::mem::take(&mut *granted.lock().unwrap());
    leases.sort();
    let leases = Arc::new(leases);

    // One key per lease, named by its rank in TTL-end order.
    let put_start = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    for c in 0..cfg.clients {
        let mut kv = KvClient::new(chans[c % chans.len()].clone());
        let (next, leases) = (next.clone(), leases.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let rank = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(_, id)) = leases.get(rank as usize) else {
                    return Ok(());
                };
                kv.put(PutRequest {
                    key: key(rank),
                    value: b"v".to_vec(),
                    lease: id,
                    ..Default::default()
                })
                .await
                .context("put")?;
            }
        }));
    }
    for t in tasks.drain(..) {
        t.await??;
    }
    let put_secs = put_start.elapsed().as_secs_f64();
    let first_end = leases[0].0;
    let last_end = leases[leases.len() - 1].0;
    if Instant::now() >= first_end {
        bail!(
            "granting and attaching took {:.1}s, longer than the TTL of {}s: use a longer --lease-ttl",
            grant_secs + put_secs,
            cfg.ttl
        );
    }
    let rss_loaded_kib = cfg.server_pid.and_then(rss_kib);

    // Poll the number of keys left until none is.
    let mut kv = KvClient::new(chans[0].clone());
    let n = leases.len() as u64;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 3_600_000, 3).unwrap();
    let mut deleted = 0u64;
    let mut left = n;
    let count_req = RangeRequest {
        key: PREFIX.as_bytes().to_vec(),
        range_end: {
            let mut e = PREFIX.as_bytes().to_vec();
            *e.last_mut().unwrap() += 1;
            e
        },
        count_only: true,
        serializable: true,
        ..Default::default()
    };
    tokio::time::sleep_until((first_end - Duration::from_millis(200)).into()).await;
    while left > 0 {
        let r = kv
            .range(count_req.clone())
            .await
            .context("count")?
            .into_inner();
        let seen = Instant::now();
        left = r.count as u64;
        let now_deleted = n - left.min(n);
        while deleted < now_deleted {
            let end = leases[deleted as usize].0;
            let delay = seen.saturating_duration_since(end).as_millis().max(1) as u64;
            hist.saturating_record(delay);
            deleted += 1;
        }
        if seen > last_end + cfg.give_up {
            break;
        }
        if left > 0 {
            tokio::time::sleep(cfg.poll).await;
        }
    }
    let drain_secs = Instant::now()
        .saturating_duration_since(first_end)
        .as_secs_f64();
    Ok(LeaseReport {
        leases: n,
        ttl: cfg.ttl,
        grant_secs,
        put_secs,
        rss_before_kib,
        rss_loaded_kib,
        p50_ms: hist.value_at_quantile(0.50) as f64,
        p99_ms: hist.value_at_quantile(0.99) as f64,
        max_ms: hist.max() as f64,
        drain_secs,
        left_over: left,
    })
}
