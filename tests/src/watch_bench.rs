//! The `watch` workload of `metastore-bench`: one writer, N watchers (on one key, or
//! one distinct key each) spread over a number of streams and connections; reports
//! delivered events per second, put-to-event latency percentiles, and the server's
//! memory per idle watcher (VmRSS delta / N, when the server's PID is known).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::channel::mpsc;
use futures::StreamExt;
use hdrhistogram::Histogram;
use metastore_proto::etcdserverpb::kv_client::KvClient;
use metastore_proto::etcdserverpb::watch_client::WatchClient;
use metastore_proto::etcdserverpb::watch_request::RequestUnion;
use metastore_proto::etcdserverpb::{PutRequest, WatchCreateRequest, WatchRequest};
use tonic::transport::{Channel, Endpoint};

#[derive(Clone, Debug)]
pub struct WatchBenchConfig {
    pub endpoint: String,
    pub watchers: usize,
    /// Every watcher on the same key (each write reaches all of them) or one key each
    /// (each write reaches one).
    pub same_key: bool,
    /// Watch streams the watchers are spread over.
    pub streams: usize,
    /// gRPC connections the streams are spread over.
    pub conns: usize,
    /// Puts by the single writer.
    pub writes: u64,
    pub value_size: usize,
    /// Bound on the whole measured phase.
    pub duration: Duration,
    /// The server's PID, for memory per watcher.
    pub server_pid: Option<u32>,
}

#[derive(Clone, Debug)]
pub struct WatchBenchReport {
    pub watchers: usize,
    pub same_key: bool,
    pub writes: u64,
    pub expected: u64,
    pub delivered: u64,
    pub elapsed: Duration,
    pub events_per_sec: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    /// VmRSS growth per idle watcher, in bytes.
    pub bytes_per_watcher: Option<f64>,
    /// Server CPU seconds (user + system) spent in the measured phase: on a shared
    /// machine, events per server CPU second is the fairer efficiency figure.
    pub server_cpu_s: Option<f64>,
}

impl WatchBenchReport {
    pub fn line(&self) -> String {
        format!(
            "workload=watch watchers={} keys={} writes={} delivered={}/{} elapsed={:.2}s \
             events/s={:.0} p50={:.3}ms p99={:.3}ms mem/watcher={} server_cpu={}",
            self.watchers,
            if self.same_key { "same" } else { "distinct" },
            self.writes,
            self.delivered,
            self.expected,
            self.elapsed.as_secs_f64(),
            self.events_per_sec,
            self.p50_us as f64 / 1000.0,
            self.p99_us as f64 / 1000.0,
            self.bytes_per_watcher
                .map(|b| format!("{b:.0}B"))
                .unwrap_or_else(|| "n/a".into()),
            self.server_cpu_s
                .map(|c| format!("{c:.2}s"))
                .unwrap_or_else(|| "n/a".into())
        )
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "workload": "watch",
            "watchers": self.watchers,
            "same_key": self.same_key,
            "writes": self.writes,
            "expected": self.expected,
            "delivered": self.delivered,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "events_per_sec": self.events_per_sec,
            "p50_ms": self.p50_us as f64 / 1000.0,
            "p99_ms": self.p99_us as f64 / 1000.0,
            "bytes_per_watcher": self.bytes_per_watcher,
            "server_cpu_s": self.server_cpu_s,
        })
    }
}

/// VmRSS of a process, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// User + system CPU seconds a process has used (from /proc/<pid>/stat, in clock
/// ticks of 1/100 s, Linux's USER_HZ).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the 14th and
    // 15th fields of the whole line.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

fn key(i: usize, same: bool) -> Vec<u8> {
    if same {
        b"watch-bench/k".to_vec()
    } else {
        format!("watch-bench/{i:06}").into_bytes()
    }
}

async fn channel(endpoint: &str) -> Result<Channel> {
    let url = if endpoint.starts_with("http") {
        endpoint.to_string()
    } else {
        format!("http://{endpoint}")
    };
    Endpoint::from_shared(url.clone())?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .initial_connection_window_size(Some(16 << 20))
        .initial_stream_window_size(Some(4 << 20))
        .connect()
        .await
        .with_context(|| format!("connect to {url}"))
}

/// Runs the watch workload.
pub async fn run_watch(cfg: &WatchBenchConfig) -> Result<WatchBenchReport> {
    if cfg.watchers == 0 || cfg.streams == 0 || cfg.conns == 0 {
        bail!("need at least one watcher, stream and connection");
    }
    let mut chans = Vec::new();
    for _ in 0..cfg.conns {
        chans.push(channel(&cfg.endpoint).await?);
    }
    let rss_before = cfg.server_pid.and_then(rss_kib);
    let base = Instant::now();
    let received = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let streams = cfg.streams.min(cfg.watchers);
    let mut tasks = Vec::new();
    let mut ready = Vec::new();
    for s in 0..streams {
        let mine: Vec<usize> = (s..cfg.watchers).step_by(streams).collect();
        let mut client =
            WatchClient::new(chans[s % chans.len()].clone()).max_decoding_message_size(256 << 20);
        let (tx, rx) = mpsc::unbounded();
        let same = cfg.same_key;
        for i in &mine {
            tx.unbounded_send(WatchRequest {
                request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                    key: key(*i, same),
                    ..Default::default()
                })),
            })
            .ok();
        }
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
        ready.push(ready_rx);
        let received = received.clone();
        let mut stop = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).unwrap();
            let mut inbound = client.watch(rx).await?.into_inner();
            let mut created = 0;
            let mut ready_tx = Some(ready_tx);
            let _keep_open = tx;
            loop {
                let msg = tokio::select! {
                    m = inbound.next() => m,
                    _ = stop.changed() => break,
                };
                let Some(msg) = msg else { break };
                let r = msg?;
                if r.created {
                    created += 1;
                    if created == mine.len() {
                        if let Some(t) = ready_tx.take() {
                            let _ = t.send(());
                        }
                    }
                    continue;
                }
                let now = base.elapsed().as_micros() as u64;
                for e in &r.events {
                    let v = &e.kv.as_ref().map(|kv| kv.value.as_ref()).unwrap_or(&[]);
                    if v.len() >= 8 {
                        let sent = u64::from_be_bytes(v[..8].try_into().unwrap());
                        hist.saturating_record(now.saturating_sub(sent).max(1));
                    }
                }
                received.fetch_add(r.events.len() as u64, Ordering::Relaxed);
            }
            Ok::<_, anyhow::Error>(hist)
        }));
    }
    for r in ready {
        tokio::time::timeout(Duration::from_secs(300), r)
            .await
            .context("watchers not created in time")?
            .context("a watch stream failed while creating")?;
    }
    // Let the server settle, then measure memory of the idle watchers.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let bytes_per_watcher = match (rss_before, cfg.server_pid.and_then(rss_kib)) {
        (Some(b), Some(a)) => Some((a.saturating_sub(b) * 1024) as f64 / cfg.watchers as f64),
        _ => None,
    };

    let mut kv = KvClient::new(chans[0].clone());
    let cpu_before = cfg.server_pid.and_then(cpu_seconds);
    let start = Instant::now();
    let deadline = start + cfg.duration;
    let mut writes = 0;
    let mut value = vec![b'v'; cfg.value_size.max(8)];
    while writes < cfg.writes && Instant::now() < deadline {
        let i = writes as usize % cfg.watchers;
        value[..8].copy_from_slice(&(base.elapsed().as_micros() as u64).to_be_bytes());
        kv.put(PutRequest {
            key: key(i, cfg.same_key),
            value: value.clone(),
            ..Default::default()
        })
        .await?;
        writes += 1;
    }
    let expected = if cfg.same_key {
        writes * cfg.watchers as u64
    } else {
        writes
    };
    let mut last = received.load(Ordering::Relaxed);
    let mut last_change = Instant::now();
    while received.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let now = received.load(Ordering::Relaxed);
        if now != last {
            last = now;
            last_change = Instant::now();
        } else if last_change.elapsed() > Duration::from_secs(10) {
            break;
        }
    }
    let elapsed = start.elapsed();
    let delivered = received.load(Ordering::Relaxed);
    let server_cpu_s = match (cpu_before, cfg.server_pid.and_then(cpu_seconds)) {
        (Some(b), Some(a)) => Some(a - b),
        _ => None,
    };
    let _ = stop_tx.send(true);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).unwrap();
    for t in tasks {
        if let Ok(Ok(h)) = t.await {
            hist.add(&h).ok();
        }
    }
    Ok(WatchBenchReport {
        watchers: cfg.watchers,
        same_key: cfg.same_key,
        writes,
        expected,
        delivered,
        elapsed,
        events_per_sec: delivered as f64 / elapsed.as_secs_f64(),
        p50_us: hist.value_at_quantile(0.50),
        p99_us: hist.value_at_quantile(0.99),
        bytes_per_watcher,
        server_cpu_s,
    })
}
