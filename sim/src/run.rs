//! One simulated run: start a cluster, run KV clients and watchers while the fault
//! schedule plays, heal, let the cluster settle, and hand back everything observed for
//! the checkers, with a trace hash that two runs of one seed must share.
//!
//! This module owns the order of a run's phases. It must never judge the history (that
//! is `check`); it only reports what it saw and whether the cluster converged.

use std::hash::{Hash, Hasher};
use std::time::Duration;

use metastore_runtime::signal as watch;

use crate::clients::{client_ip, kv_client, watcher, Recorder};
use crate::cluster::SimCluster;
use crate::faults::{run_schedule, FaultLog, FaultPlan};
use crate::history::History;
use crate::leases::{lease_client, lease_client_ip, LEASE_KEY_PREFIX, LEASE_KEY_PREFIX_END};

/// The shape of a run.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub members: usize,
    pub kv_clients: usize,
    pub watchers: usize,
    /// Lease users (grant, attach a key, keep alive, revoke or let expire).
    pub lease_clients: usize,
    pub keys: usize,
    /// How long the workload and the fault schedule run (simulated time).
    pub duration: Duration,
    pub faults: FaultPlan,
    /// Test-only: serve linearizable reads without ReadIndex (the checkers must notice).
    pub stale_reads_bug: bool,
    /// Compact every few seconds keeping this many revisions (`None`: never compact).
    pub compact_keep: Option<i64>,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            members: 3,
            kv_clients: 5,
            watchers: 3,
            lease_clients: 2,
            keys: 4,
            duration: Duration::from_secs(30),
            faults: FaultPlan::default(),
            stale_reads_bug: false,
            compact_keep: Some(300),
        }
    }
}

/// What a run observed.
pub struct RunReport {
    pub history: History,
    pub faults: FaultLog,
    /// The revision every member agreed on at the end (0 when they did not converge).
    pub final_revision: i64,
    /// `Err` says how the members differ at the end (revision or HashKV), or which
    /// watcher never caught up after the heal.
    pub convergence: Result<(), String>,
    /// The lease keys a linearizable range found after the heal (once every lease had had
    /// time to expire), and when that range was invoked (the history's clock); `Err`
    /// when no member answered it.
    pub lease_keys: Result<(Vec<Vec<u8>>, u64), String>,
    /// Simulated time the run took.
    pub elapsed: Duration,
}

impl RunReport {
    /// A hash of everything observed: the same seed must give the same hash.
    pub fn trace_hash(&self) -> u64 {
        // DefaultHasher::new() has fixed keys: the hash is stable within one build.
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.history.kv.hash(&mut hasher);
        for watch in &self.history.watches {
            let mut watch = watch.clone();
            // Streams the workload stops all end at one instant, and how many polls
            // teardown takes can differ by one between two runs of a seed (madsim
            // advances 50-100 ns per poll): that instant is not part of the trace.
            if watch.end == crate::history::WatchEnd::Stopped {
                watch.ended_ns = 0;
            }
            watch.hash(&mut hasher);
        }
        self.history.leases.hash(&mut hasher);
        if let Ok(keys) = &self.lease_keys {
            keys.hash(&mut hasher);
        }
        for (at, what) in self.faults.entries() {
            at.hash(&mut hasher);
            what.hash(&mut hasher);
        }
        self.final_revision.hash(&mut hasher);
        hasher.finish()
    }
}

/// How long the cluster gets after the heal to agree on one revision and hash.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long past its TTL an unrenewed lease may keep its key on the healed cluster (a
/// new leader extends every lease by an election timeout, and spreads piles of
/// expiries).
pub const LEASE_GRACE: Duration = Duration::from_secs(10);

/// What a new leader adds to every lease on promotion: one election timeout (the
/// simulated members run with etcd's default, 1 s).
const PROMOTION_EXTENSION: Duration = Duration::from_secs(1);

/// Time for an expired lease's revoke to go through the log on a healthy cluster.
const REVOKE_MARGIN: Duration = Duration::from_secs(2);

/// Installs the log subscriber every run uses, filtered by `RUST_LOG` (default: off).
/// It is installed whether or not anything is logged, so that turning logs on does not
/// change the run: the subscriber's own allocations draw from the per-thread hash-map
/// seeds the runtime's maps use too.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

pub async fn run(config: RunConfig) -> RunReport {
    init_logging();
    metastore_runtime::api::injected_bugs::STALE_READS.with(|on| on.set(config.stale_reads_bug));
    let started = tokio::time::Instant::now();
    let log = FaultLog::new();
    let mut cluster = SimCluster::start(config.members, log.clone()).await;
    log.record(format!("cluster of {} up", config.members));

    let recorder = Recorder::new();
    let (kv_stop, kv_stop_rx) = watch::channel(false);
    let (watch_stop, watch_stop_rx) = watch::channel(false);
    let handle = madsim::runtime::Handle::current();
    let mut tasks = Vec::new();
    for c in 0..config.kv_clients {
        let node = handle
            .create_node()
            .name(format!("client{c}"))
            .ip(client_ip(c))
            .build();
        tasks.push(node.spawn(kv_client(
            c,
            cluster.endpoints(),
            config.keys,
            recorder.clone(),
            kv_stop_rx.clone(),
        )));
    }
    for w in 0..config.watchers {
        let node = handle
            .create_node()
            .name(format!("watcher{w}"))
            .ip(client_ip(100 + w))
            .build();
        // The first watcher sees everything from revision 1; the others start from "now"
        // or from an early revision, so streams of every kind are compared.
        let start = match w % 3 {
            0 => 1,
            1 => 0,
            _ => 2,
        };
        tasks.push(node.spawn(watcher(
            w,
            cluster.endpoints(),
            start,
            recorder.clone(),
            watch_stop_rx.clone(),
        )));
    }

    if let Some(keep) = config.compact_keep {
        let node = handle
            .create_node()
            .name("compactor")
            .ip(client_ip(200))
            .build();
        tasks.push(node.spawn(crate::clients::compactor(
            cluster.endpoints(),
            keep,
            log.clone(),
            kv_stop_rx.clone(),
        )));
    }

    let mut lease_tasks = Vec::new();
    for l in 0..config.lease_clients {
        let node = handle
            .create_node()
            .name(format!("leases{l}"))
            .ip(lease_client_ip(l))
            .build();
        lease_tasks.push(node.spawn(lease_client(
            l,
            cluster.endpoints(),
            recorder.clone(),
            kv_stop_rx.clone(),
        )));
    }

    run_schedule(&mut cluster, &config.faults, config.duration).await;
    // Clients keep going for a while on the healed cluster: their retries land, and
    // indeterminate operations get followed by determinate ones.
    tokio::time::sleep(Duration::from_secs(3)).await;
    kv_stop.send_replace(true);
    // A client mid-operation finishes it (bounded by its own timeout).
    tokio::time::sleep(Duration::from_secs(4)).await;
    for task in lease_tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }
    // Every lease stopped being renewed: give the last ones time to expire, so the final
    // check covers them all.
    let expired_by = recorder
        .history()
        .leases
        .iter()
        .map(|l| {
            l.renewed_until_ns.max(l.grant_completed_ns) + l.ttl.clamp(0, 60) as u64 * 1_000_000_000
        })
        .max()
        .map_or(0, |t| t + LEASE_GRACE.as_nanos() as u64 + 1);
    let now = recorder.now_ns();
    if expired_by > now {
        tokio::time::sleep(Duration::from_nanos(expired_by - now)).await;
    }

    let (final_revision, mut convergence) = settle(&cluster).await;
    // A lease whose deadline passed while the cluster had no leader is revoked only
    // after a new leader's promotion, which extends it by its TTL and an election
    // timeout (etcd does the same). Once a leader is known, waiting that long (plus a
    // margin for the revoke itself) lets every unrenewed lease go before the range.
    let leader_by = tokio::time::Instant::now() + SETTLE_TIMEOUT;
    while cluster.leader().await.is_none() && tokio::time::Instant::now() < leader_by {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let max_ttl = recorder
        .history()
        .leases
        .iter()
        .map(|l| l.ttl.clamp(0, 60) as u64)
        .max()
        .unwrap_or(0);
    tokio::time::sleep(Duration::from_secs(max_ttl) + PROMOTION_EXTENSION + REVOKE_MARGIN).await;
    let lease_keys = lease_keys(&cluster, &recorder).await;
    log.record(format!("settled at revision {final_revision}"));
    if convergence.is_ok() {
        // Watchers need a moment to deliver the last revisions after the heal.
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    watch_stop.send_replace(true);
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }
    let history = recorder.history();
    if convergence.is_ok() {
        convergence = watchers_caught_up(&history, config.watchers, final_revision);
    }
    RunReport {
        history,
        faults: log,
        final_revision,
        convergence,
        lease_keys,
        elapsed: started.elapsed(),
    }
}

/// Waits until every member reports the same revision, then compares their HashKV at it.
async fn settle(cluster: &SimCluster) -> (i64, Result<(), String>) {
    let deadline = tokio::time::Instant::now() + SETTLE_TIMEOUT;
    loop {
        let mut revisions = Vec::new();
        for i in 0..cluster.size() {
            revisions.push(cluster.revision(i).await);
        }
        let first = revisions[0];
        let last = if first.is_some() && revisions.iter().all(|r| *r == first) {
            let revision = first.unwrap_or_default();
            let mut hashes = Vec::new();
            for i in 0..cluster.size() {
                hashes.push(cluster.hash_kv(i, revision).await);
            }
            if hashes[0].is_some() && hashes.iter().all(|h| *h == hashes[0]) {
                return (revision, Ok(()));
            }
            format!("revision {revision} everywhere, HashKV {hashes:?}")
        } else {
            format!("revisions {revisions:?}")
        };
        if tokio::time::Instant::now() > deadline {
            return (
                0,
                Err(format!(
                    "members did not converge within {SETTLE_TIMEOUT:?}: {last}"
                )),
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The lease keys, by a linearizable range on the first member that answers, and when
/// it was invoked.
async fn lease_keys(
    cluster: &SimCluster,
    recorder: &crate::clients::Recorder,
) -> Result<(Vec<Vec<u8>>, u64), String> {
    for i in 0..cluster.size() {
        let invoked = recorder.now_ns();
        if let Some((keys, _)) = cluster
            .range_keys(i, LEASE_KEY_PREFIX, LEASE_KEY_PREFIX_END)
            .await
        {
            return Ok((keys, invoked));
        }
    }
    Err("no member answered the final range of lease keys".into())
}

/// After the heal every watcher must have delivered every revision up to the final one
/// (every revision of the run is a write to the watched key set).
fn watchers_caught_up(
    history: &History,
    watchers: usize,
    final_revision: i64,
) -> Result<(), String> {
    for w in 0..watchers {
        let records: Vec<_> = history.watches.iter().filter(|r| r.watcher == w).collect();
        let delivered = records
            .iter()
            .flat_map(|r| r.responses.iter())
            .flat_map(|(_, events)| events.iter())
            .map(|e| e.revision)
            .max()
            .unwrap_or(0);
        let first = records.first().map_or(0, |r| r.first_revision());
        let canceled = records
            .iter()
            .any(|r| matches!(r.end, crate::history::WatchEnd::Canceled { .. }));
        if !canceled && final_revision >= first.max(2) && delivered < final_revision {
            return Err(format!(
                "watcher {w} delivered up to revision {delivered}, the cluster is at {final_revision}"
            ));
        }
    }
    Ok(())
}

/// How many states the linearizability search may explore per key before it gives up
/// (and the run fails as inconclusive: an undecided history is not a pass).
pub const SEARCH_BUDGET: usize = 2_000_000;

/// What a run that passed every check covered.
#[derive(Debug, Clone, Copy)]
pub struct Verdict {
    pub operations: usize,
    pub indeterminate: usize,
    pub watch_streams: usize,
    pub watch_events: usize,
    pub leases: usize,
    /// Leases whose revoke was acknowledged.
    pub leases_revoked: usize,
    /// Leases the client let expire and saw gone (a read or a TTL-0 keep-alive).
    pub leases_expired: usize,
    pub final_revision: i64,
    pub faults: usize,
    pub simulated: Duration,
}

impl RunReport {
    /// Runs every checker over the run. On failure the text holds the failed check's
    /// excerpt of the history and the fault log, enough to understand the seed before
    /// replaying it.
    pub fn verdict(&self) -> Result<Verdict, String> {
        use crate::check::{
            check_lease_expiry, check_leases, check_linearizable, check_revision_order,
            check_watches, LinearizabilityResult,
        };
        let fail = |what: String| {
            Err(format!(
                "{what}\n\nfault log:\n{}\nrun: {} operations, {} watch streams, final revision {}",
                self.faults,
                self.history.kv.len(),
                self.history.watches.len(),
                self.final_revision
            ))
        };
        // The watch streams settle most indeterminate writes (see `check::resolve`); the
        // revision-order check below still sees the records as the clients left them.
        let (kv, _) = crate::check::resolve::resolve_indeterminate(
            &self.history,
            if self.convergence.is_ok() {
                self.final_revision
            } else {
                0
            },
        );
        match check_linearizable(&kv, SEARCH_BUDGET) {
            LinearizabilityResult::Ok => {}
            LinearizabilityResult::Violation(v) => return fail(format!("{v}")),
            LinearizabilityResult::Inconclusive { key, explored } => {
                return fail(format!(
                    "linearizability of key {} undecided after {explored} states",
                    String::from_utf8_lossy(&key)
                ))
            }
        }
        if let Err(v) = check_revision_order(&self.history.kv) {
            return fail(format!("{v}"));
        }
        if let Err(v) = check_watches(&self.history) {
            return fail(format!("{v}"));
        }
        if let Err(v) = check_leases(&self.history) {
            return fail(format!("{v}"));
        }
        if let Err(why) = &self.convergence {
            return fail(format!("convergence: {why}"));
        }
        match &self.lease_keys {
            Ok((keys, checked_ns)) => {
                if let Err(v) = check_lease_expiry(
                    &self.history.leases,
                    keys,
                    *checked_ns,
                    LEASE_GRACE.as_nanos() as u64,
                ) {
                    return fail(format!("lease expiry after the heal: {v}"));
                }
            }
            Err(why) => return fail(format!("lease expiry after the heal: {why}")),
        }
        let leases = &self.history.leases;
        Ok(Verdict {
            operations: self.history.kv.len(),
            indeterminate: self
                .history
                .kv
                .iter()
                .filter(|r| r.outcome.is_none())
                .count(),
            watch_streams: self.history.watches.len(),
            watch_events: self
                .history
                .watches
                .iter()
                .flat_map(|w| w.responses.iter())
                .map(|(_, events)| events.len())
                .sum(),
            leases: leases.len(),
            leases_revoked: leases
                .iter()
                .filter(|l| l.revoke.as_ref().is_some_and(|r| r.revoked == Some(true)))
                .count(),
            leases_expired: leases
                .iter()
                .filter(|l| {
                    l.revoke.is_none()
                        && (l.reads.iter().any(|r| !r.present)
                            || l.keep_alives.iter().any(|k| k.ttl <= 0))
                })
                .count(),
            final_revision: self.final_revision,
            faults: self.faults.entries().len(),
            simulated: self.elapsed,
        })
    }
}
