//! Deterministic simulation of MetaStore.
//!
//! This crate owns running the real runtime as a cluster inside madsim (`cluster`, on
//! the simulated disk of `disk`), the seeded fault schedule (`faults`), the workload
//! clients that record what they see (`clients`, `leases`, into `history`), the phases of
//! a run (`run`), and the checkers that judge the records (`check`). It also keeps the
//! older determinism checks of the state machine alone (`workload`,
//! `tests/determinism.rs`). The harness modules exist only in the simulation build
//! (RUSTFLAGS="--cfg madsim"); the checkers and the disk build and test everywhere.
//! `docs/simulation.md` is the guide.
//!
//! It must never read the wall clock or an unseeded random source (randomness comes
//! from `madsim::rand`), and never look at a member's state behind its API: every run
//! is replayable from its seed, and what is checked is what a client could see.

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
