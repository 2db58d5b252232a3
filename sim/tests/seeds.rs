//! Properties of the simulation itself, over explicit seed ranges (these tests build
//! their own madsim runtimes, so `MADSIM_TEST_SEED` does not apply):
//! - the same seed gives the same trace hash (everything observed, and the fault log);
//! - a deliberately injected bug (linearizable reads served locally, without ReadIndex)
//!   is caught within a bounded number of seeds.
#![cfg(madsim)]

use std::time::Duration;

use metastore_sim::faults::{FaultKind, FaultPlan};
use metastore_sim::history::{WatchEnd, WatchRecord};
use metastore_sim::run::{run, RunConfig};

/// Runs `config` under `seed` on a fresh thread (madsim's own runner does the same, so
/// thread-local state such as raft-rs's `thread_rng` starts fresh for every seed).
fn run_seed(seed: u64, config: RunConfig) -> metastore_sim::run::RunReport {
    std::thread::spawn(move || {
        let runtime =
            madsim::runtime::Runtime::with_seed_and_config(seed, madsim::Config::default());
        runtime.block_on(run(config))
    })
    .join()
    .unwrap_or_else(|_| panic!("seed {seed} panicked"))
}

fn short(kinds: Vec<FaultKind>) -> RunConfig {
    RunConfig {
        duration: Duration::from_secs(15),
        faults: FaultPlan {
            kinds,
            ..FaultPlan::default()
        },
        ..RunConfig::default()
    }
}

#[test]
fn same_seed_same_trace() {
    for seed in [7, 8] {
        let a = run_seed(seed, short(FaultKind::ALL.to_vec()));
        let b = run_seed(seed, short(FaultKind::ALL.to_vec()));
        assert!(!a.history.kv.is_empty());
        if let Some(i) = (0..a.history.kv.len().min(b.history.kv.len()))
            .find(|i| a.history.kv[*i] != b.history.kv[*i])
        {
            panic!(
                "seed {seed}: KV record {i} differs between runs:\n{:?}\n{:?}",
                a.history.kv[i], b.history.kv[i]
            );
        }
        let same_stream = |x: &WatchRecord, y: &WatchRecord| {
            // See RunReport::trace_hash: the instant stopped streams end is not traced.
            x.end == WatchEnd::Stopped && y.end == WatchEnd::Stopped && {
                let (mut x, mut y) = (x.clone(), y.clone());
                x.ended_ns = 0;
                y.ended_ns = 0;
                x == y
            } || x == y
        };
        if let Some(i) = (0..a.history.watches.len().min(b.history.watches.len()))
            .find(|i| !same_stream(&a.history.watches[*i], &b.history.watches[*i]))
        {
            let (x, y) = (&a.history.watches[i], &b.history.watches[i]);
            let response = (0..x.responses.len().min(y.responses.len()))
                .find(|j| x.responses[*j] != y.responses[*j])
                .map(|j| format!("response {j}: {:?} / {:?}", x.responses[j], y.responses[j]));
            panic!(
                "seed {seed}: watch record {i} differs between runs: {:?} / {:?}; {} vs {} responses, ended {} / {}; {response:?}",
                (x.watcher, x.member, x.start_revision, x.created_revision, &x.end, x.started_ns),
                (y.watcher, y.member, y.start_revision, y.created_revision, &y.end, y.started_ns),
                x.responses.len(),
                y.responses.len(),
                x.ended_ns,
                y.ended_ns
            );
        }
        if let Some(i) = (0..a.history.leases.len().min(b.history.leases.len()))
            .find(|i| a.history.leases[*i] != b.history.leases[*i])
        {
            panic!(
                "seed {seed}: lease record {i} differs between runs:\n{}\n{}",
                a.history.leases[i], b.history.leases[i]
            );
        }
        assert_eq!(
            a.lease_keys, b.lease_keys,
            "seed {seed}: the final lease keys differ between runs"
        );
        assert_eq!(
            a.trace_hash(),
            b.trace_hash(),
            "seed {seed} gave two different traces; fault logs:\n{}\n---\n{}",
            a.faults,
            b.faults
        );
    }
    // And different seeds differ (the hash is not constant).
    assert_ne!(
        run_seed(7, short(vec![])).trace_hash(),
        run_seed(9, short(vec![])).trace_hash()
    );
}

/// How many seeds the injected bug may survive. Measured when written: caught at the
/// first seed it reached in every range tried (see docs/simulation.md).
const STALE_READ_SEEDS: u64 = 10;

#[test]
fn injected_stale_reads_are_caught() {
    for seed in 1..=STALE_READ_SEEDS {
        let mut config = short(vec![FaultKind::PartitionFromPeers, FaultKind::Isolate]);
        config.stale_reads_bug = true;
        let report = run_seed(seed, config);
        if let Err(why) = report.verdict() {
            eprintln!("stale reads caught at seed {seed}:\n{why}");
            return;
        }
    }
    panic!("serving reads without ReadIndex went unnoticed for {STALE_READ_SEEDS} seeds");
}

/// The same switch off: the same seeds pass (the catch above is the bug's, not noise).
#[test]
fn without_the_bug_the_same_seeds_pass() {
    for seed in 1..=3 {
        let report = run_seed(
            seed,
            short(vec![FaultKind::PartitionFromPeers, FaultKind::Isolate]),
        );
        if let Err(why) = report.verdict() {
            panic!("seed {seed}:\n{why}");
        }
    }
}
