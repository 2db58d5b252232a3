//! The state machine is a pure function of the log: for every seed, the same requests
//! give the same responses and the same hashes, and reopening the engine mid-run (as a
//! restart does) changes nothing.

use std::sync::Arc;

use metastore_core::{Applied, Backend, MemoryBackend, StateMachine, StateMachineConfig};
use metastore_sim::{seeds, KvWorkload};

const STEPS: usize = 400;

fn open(backend: impl Backend) -> StateMachine {
    StateMachine::open(Box::new(backend), StateMachineConfig::default()).expect("open")
}

/// Applies `steps` requests of `workload`, starting at log index `first_index`.
fn run(
    sm: &mut StateMachine,
    workload: &mut KvWorkload,
    first_index: u64,
    steps: usize,
) -> Vec<Applied> {
    (0..steps as u64)
        .map(|i| {
            let request = workload.next_request();
            let applied = sm.apply(first_index + i, &request);
            workload.observe_revision(sm.current_revision());
            applied
        })
        .collect()
}

#[test]
fn same_seed_gives_identical_responses_and_hashes() {
    for seed in seeds(20) {
        let mut a = open(MemoryBackend::new());
        let mut b = open(MemoryBackend::new());
        let ra = run(&mut a, &mut KvWorkload::new(seed), 1, STEPS);
        let rb = run(&mut b, &mut KvWorkload::new(seed), 1, STEPS);
        assert_eq!(ra, rb, "seed {seed}: responses differ");
        assert_eq!(a.hash_kv(0), b.hash_kv(0), "seed {seed}: hash_kv differs");
        assert_eq!(
            a.hash().unwrap(),
            b.hash().unwrap(),
            "seed {seed}: hash differs"
        );
        assert_eq!(a.applied_index(), STEPS as u64, "seed {seed}");
        // The workload must actually move the store, or this test proves nothing.
        assert!(
            a.current_revision() > 50,
            "seed {seed}: workload wrote too little"
        );
    }
}

#[test]
fn reopening_the_engine_mid_run_changes_nothing() {
    for seed in seeds(20) {
        let mut straight = open(MemoryBackend::new());
        let expected = run(&mut straight, &mut KvWorkload::new(seed), 1, STEPS);

        // Arc-shared, so the engine outlives the state machine, as a data dir does.
        let backend = Arc::new(MemoryBackend::new());
        let mut workload = KvWorkload::new(seed);
        let mut sm = open(backend.clone());
        let mut got = run(&mut sm, &mut workload, 1, STEPS / 2);
        let state_before = (
            sm.current_revision(),
            sm.compacted_revision(),
            sm.hash_kv(0),
        );
        drop(sm);
        let mut sm = open(backend.clone());
        assert_eq!(sm.applied_index(), (STEPS / 2) as u64, "seed {seed}");
        let state_after = (
            sm.current_revision(),
            sm.compacted_revision(),
            sm.hash_kv(0),
        );
        assert_eq!(
            state_after, state_before,
            "seed {seed}: reopen changed the state"
        );
        got.extend(run(
            &mut sm,
            &mut workload,
            (STEPS / 2 + 1) as u64,
            STEPS - STEPS / 2,
        ));

        assert_eq!(got, expected, "seed {seed}: responses differ after reopen");
        assert_eq!(sm.hash_kv(0), straight.hash_kv(0), "seed {seed}");
        assert_eq!(sm.hash().unwrap(), straight.hash().unwrap(), "seed {seed}");
    }
}

/// Replaying an already-applied entry (a restart that re-reads the log) is a no-op.
#[test]
fn replayed_entries_are_ignored() {
    for seed in seeds(5) {
        let mut sm = open(MemoryBackend::new());
        let mut workload = KvWorkload::new(seed);
        let requests: Vec<_> = (0..50).map(|_| workload.next_request()).collect();
        for (i, r) in requests.iter().enumerate() {
            sm.apply(i as u64 + 1, r);
        }
        let before = (sm.hash().unwrap(), sm.current_revision());
        for (i, r) in requests.iter().enumerate() {
            sm.apply(i as u64 + 1, r);
        }
        assert_eq!(
            (sm.hash().unwrap(), sm.current_revision()),
            before,
            "seed {seed}"
        );
    }
}
