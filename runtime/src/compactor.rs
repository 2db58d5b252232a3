//! Auto-compaction with etcd's semantics (`server/etcdserver/api/v3compactor`): periodic
//! (keep about `retention` of wall-clock history) and revision (keep the last `retention`
//! revisions).
//!
//! This module owns *when* to compact and *which* revision. It must never compact by
//! itself: it proposes a Compaction through the log like a client would, so every member
//! (once there are several) compacts at the same log position. The decisions are plain
//! state machines fed with instants and revisions, so tests drive them without a clock.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use crate::signal as watch;
use metastore_proto::etcdserverpb::CompactionRequest;
use metastore_proto::metastore::internal_request::Request as Envelope;
use tokio::time::Instant;

use crate::api::Api;
use crate::config::AutoCompaction;
use crate::error::Error;

/// etcd's periodic compactor. With period P (capped at one hour for the cadence), it
/// samples the revision every P/10, waits P after start (or after the last success), then
/// compacts to the revision sampled about P ago and repeats every min(P, 1h).
#[derive(Debug)]
pub struct Periodic {
    period: Duration,
    retry_interval: Duration,
    compact_interval: Duration,
    retentions: usize,
    revs: VecDeque<i64>,
    last_success: Instant,
    base_interval: Duration,
}

impl Periodic {
    pub fn new(period: Duration, now: Instant) -> Self {
        let capped = period.min(Duration::from_secs(3600));
        let retry_interval = (capped / 10).max(Duration::from_millis(1));
        let retentions = (period.as_nanos() / retry_interval.as_nanos()) as usize + 1;
        Self {
            period,
            retry_interval,
            compact_interval: capped,
            retentions,
            revs: VecDeque::with_capacity(retentions + 1),
            last_success: now,
            base_interval: period,
        }
    }

    /// How long to wait between rounds.
    pub fn retry_interval(&self) -> Duration {
        self.retry_interval
    }

    /// Start of a round: remember the current revision; the oldest sample kept is the
    /// revision of about one period ago.
    pub fn record(&mut self, revision: i64) {
        self.revs.push_back(revision);
        if self.revs.len() > self.retentions {
            self.revs.pop_front();
        }
    }

    /// After a round's wait: the revision to compact to, if one is due.
    pub fn due(&mut self, now: Instant) -> Option<i64> {
        if now.saturating_duration_since(self.last_success) < self.base_interval {
            return None;
        }
        // The first compaction waits a whole period; later ones come every
        // min(period, 1h).
        if self.base_interval == self.period {
            self.base_interval = self.compact_interval;
        }
        self.revs.front().copied()
    }

    /// The compaction succeeded (or the revision was already compacted).
    pub fn succeeded(&mut self, now: Instant) {
        self.last_success = now;
    }
}

/// etcd's revision compactor: every 5 minutes, compact to `current - retention` unless
/// that is not positive or was the last revision compacted.
#[derive(Debug)]
pub struct RevisionMode {
    retention: i64,
    last: i64,
}

/// How often the revision compactor looks (etcd's `revInterval`).
pub const REVISION_INTERVAL: Duration = Duration::from_secs(5 * 60);

impl RevisionMode {
    pub fn new(retention: i64) -> Self {
        Self { retention, last: 0 }
    }

    pub fn due(&self, current: i64) -> Option<i64> {
        let rev = current - self.retention;
        (rev > 0 && rev != self.last).then_some(rev)
    }

    pub fn succeeded(&mut self, revision: i64) {
        self.last = revision;
    }
}

/// Proposes one compaction. A revision compacted already counts as success, as in etcd.
async fn compact(api: &Api, revision: i64) -> Result<(), Error> {
    let started = Instant::now();
    let result = api
        .propose_internal(Envelope::Compaction(CompactionRequest {
            revision,
            physical: false,
        }))
        .await;
    match result {
        Ok(_) | Err(Error::Core(metastore_core::Error::Compacted)) => {
            tracing::info!(revision, took = ?started.elapsed(), "completed auto compaction");
            Ok(())
        }
        Err(e) => {
            tracing::warn!(revision, error = %e, "failed auto compaction");
            Err(e)
        }
    }
}

/// Runs the compactor until `stop` turns true.
pub async fn run(mode: AutoCompaction, api: Arc<Api>, mut stop: watch::Receiver<bool>) {
    // Also covers a dropped sender: the server is gone.
    macro_rules! sleep_or_stop {
        ($d:expr) => {
            // `biased`: replayable under simulation (see api::watch).
            tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => return,
                _ = tokio::time::sleep($d) => {}
            }
        };
    }
    match mode {
        AutoCompaction::Periodic(period) => {
            tracing::info!(?period, "auto periodic compaction enabled");
            let mut p = Periodic::new(period, Instant::now());
            loop {
                p.record(api.current_revision());
                sleep_or_stop!(p.retry_interval());
                if let Some(rev) = p.due(Instant::now()) {
                    tracing::info!(revision = rev, compact_period = ?period, "starting auto periodic compaction");
                    if compact(&api, rev).await.is_ok() {
                        p.succeeded(Instant::now());
                    }
                }
            }
        }
        AutoCompaction::Revision(retention) => {
            tracing::info!(retention, "auto revision compaction enabled");
            let mut r = RevisionMode::new(retention);
            loop {
                sleep_or_stop!(REVISION_INTERVAL);
                if let Some(rev) = r.due(api.current_revision()) {
                    tracing::info!(
                        revision = rev,
                        retention,
                        "starting auto revision compaction"
                    );
                    if compact(&api, rev).await.is_ok() {
                        r.succeeded(rev);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives a periodic compactor like its loop does, with the revision growing by
    /// `rate` per retry interval, and returns (round, compacted revision) pairs.
    fn simulate(period: Duration, rounds: usize, rate: i64) -> Vec<(usize, i64)> {
        let start = Instant::now();
        let mut p = Periodic::new(period, start);
        let mut rev = 1;
        let mut out = Vec::new();
        for round in 1..=rounds {
            p.record(rev);
            let now = start + p.retry_interval() * round as u32;
            rev += rate;
            if let Some(r) = p.due(now) {
                out.push((round, r));
                p.succeeded(now);
            }
        }
        out
    }

    #[test]
    fn periodic_waits_one_period_then_compacts_every_period() {
        // 10 s period: samples every 1 s; the first compaction at 10 s goes to the
        // revision sampled at start, then one every 10 s to the revision of 10 s before.
        let out = simulate(Duration::from_secs(10), 30, 1);
        assert_eq!(out, vec![(10, 1), (20, 10), (30, 20)]);
    }

    #[test]
    fn periodic_over_an_hour_compacts_hourly_keeping_the_period() {
        // 2 h period: samples every 6 min, 21 samples kept (2 h), compaction hourly after
        // the first 2 h.
        let p = Periodic::new(Duration::from_secs(7200), Instant::now());
        assert_eq!(p.retry_interval(), Duration::from_secs(360));
        assert_eq!(p.retentions, 21);
        let out = simulate(Duration::from_secs(7200), 40, 1);
        assert_eq!(out, vec![(20, 1), (30, 10), (40, 20)]);
    }

    #[test]
    fn periodic_retries_after_a_failure_at_the_next_round() {
        let start = Instant::now();
        let mut p = Periodic::new(Duration::from_secs(10), start);
        for round in 1..=10 {
            p.record(round);
            let due = p.due(start + Duration::from_secs(round as u64));
            if round < 10 {
                assert_eq!(due, None);
            } else {
                assert_eq!(due, Some(1)); // fails: no succeeded() call
            }
        }
        p.record(11);
        assert_eq!(p.due(start + Duration::from_secs(11)), Some(1));
    }

    #[test]
    fn revision_mode_keeps_the_last_n_revisions() {
        let mut r = RevisionMode::new(100);
        assert_eq!(r.due(50), None);
        assert_eq!(r.due(100), None);
        assert_eq!(r.due(150), Some(50));
        r.succeeded(50);
        assert_eq!(r.due(150), None); // nothing new since
        assert_eq!(r.due(151), Some(51));
    }
}
