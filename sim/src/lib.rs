//! Deterministic simulation of MetaStore.
//!
//! Today this crate owns the seeded workload generator and the determinism checks of the
//! state machine: a seed fully determines a sequence of replicated requests, and applying
//! it must give byte-identical state however often, on whichever engine, and across a
//! reopen of the engine. It also owns the history checkers (`check`) that judge what
//! simulated clients observed against etcd's guarantees. The madsim cluster harness
//! (issue 7) builds on the same workload.
//!
//! It must never read the wall clock or an unseeded random source: every run is replayable
//! from its seed (`METASTORE_SIM_SEED=N` replays one seed of the seed-range tests).

pub mod check;
#[cfg(madsim)]
pub mod clients;
#[cfg(madsim)]
pub mod cluster;
pub mod disk;
#[cfg(madsim)]
pub mod faults;
pub mod history;
#[cfg(madsim)]
pub mod leases;
#[cfg(madsim)]
pub mod run;
pub mod workload;

pub use workload::KvWorkload;

/// Seeds a test runs: `METASTORE_SIM_SEED=N` replays exactly seed N; otherwise
/// `METASTORE_SIM_SEEDS=N` (default `default_count`) seeds starting at 1.
pub fn seeds(default_count: u64) -> Vec<u64> {
    if let Some(seed) = std::env::var("METASTORE_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return vec![seed];
    }
    let count = std::env::var("METASTORE_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default_count);
    (1..=count).collect()
}
