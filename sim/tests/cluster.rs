//! Simulation tests: a three-member cluster under a seeded fault schedule, with KV
//! clients and watchers whose histories must pass every checker.
//!
//! Seeds follow madsim's conventions: `MADSIM_TEST_SEED=N` replays seed N,
//! `MADSIM_TEST_NUM=K` runs K seeds from it, `MADSIM_TEST_CHECK_DETERMINISM=1` runs each
//! seed twice and compares. Without `MADSIM_TEST_SEED` madsim picks a seed from the
//! clock (printed on failure). `scripts/sim` runs CI's fixed range, replays seeds
//! and soaks. `RUST_LOG=metastore_sim=info` prints faults as they happen, without
//! changing the run (`run::init_logging`). Only the simulation build has these tests
//! (RUSTFLAGS="--cfg madsim").
#![cfg(madsim)]

use std::time::Duration;

use metastore_sim::faults::{FaultKind, FaultPlan};
use metastore_sim::run::{run, RunConfig, RunReport};

fn judge(report: &RunReport) {
    match report.verdict() {
        Ok(v) => eprintln!(
            "seed {}: {} ops ({} indeterminate), {} watch streams / {} events, {} leases ({} revoked, {} expired), revision {}, {} faults, {:.1}s simulated, trace {:016x}",
            madsim::runtime::Handle::current().seed(),
            v.operations,
            v.indeterminate,
            v.watch_streams,
            v.watch_events,
            v.leases,
            v.leases_revoked,
            v.leases_expired,
            v.final_revision,
            v.faults,
            v.simulated.as_secs_f64(),
            report.trace_hash()
        ),
        Err(why) => panic!("{why}"),
    }
}

/// Every fault kind, one at a time, for 30 simulated seconds.
#[madsim::test]
async fn faults_keep_histories_linearizable() {
    let report = run(RunConfig::default()).await;
    judge(&report);
}

/// Crashes only, often, with lost unsynced writes: recovery from what the disk kept.
#[madsim::test]
async fn crash_restart_recovers_from_synced_state() {
    let report = run(RunConfig {
        faults: FaultPlan {
            kinds: vec![FaultKind::Crash],
            gap: Duration::from_millis(100)..Duration::from_secs(1),
            hold: Duration::from_millis(100)..Duration::from_secs(3),
        },
        ..RunConfig::default()
    })
    .await;
    judge(&report);
}

/// Partitions only (symmetric, from peers, one-way), which is where stale reads and
/// split brains would show.
#[madsim::test]
async fn partitions_keep_histories_linearizable() {
    let report = run(RunConfig {
        faults: FaultPlan {
            kinds: vec![
                FaultKind::Isolate,
                FaultKind::PartitionFromPeers,
                FaultKind::OneWay,
            ],
            ..FaultPlan::default()
        },
        ..RunConfig::default()
    })
    .await;
    judge(&report);
}

/// Members removed and replaced by new members (new addresses, empty disks) that join
/// by snapshot, among crashes and leader moves.
#[madsim::test]
async fn membership_changes_keep_histories_linearizable() {
    let report = run(RunConfig {
        faults: FaultPlan {
            kinds: vec![
                FaultKind::ReplaceMember,
                FaultKind::ReplaceMember,
                FaultKind::Crash,
                FaultKind::MoveLeader,
            ],
            ..FaultPlan::default()
        },
        ..RunConfig::default()
    })
    .await;
    judge(&report);
}

/// Wall-clock jumps on single members (a day either way, often with a restart on the
/// jumped clock): nothing the cluster decides may depend on the wall clock.
#[madsim::test]
async fn clock_jumps_keep_histories_linearizable() {
    let report = run(RunConfig {
        faults: FaultPlan {
            kinds: vec![
                FaultKind::ClockJump,
                FaultKind::ClockJump,
                FaultKind::MoveLeader,
            ],
            ..FaultPlan::default()
        },
        ..RunConfig::default()
    })
    .await;
    judge(&report);
}
