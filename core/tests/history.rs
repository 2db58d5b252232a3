//! The watch history read (`StateMachine::history`): for random writes and compactions,
//! the events read back from history in bounded chunks equal exactly the events the
//! applies emitted for the same revisions and key range, in order, once.

mod common;

use common::{env, open, put_req, Shared};
use metastore_core::mvcc::{key_in_range, HistoryLimits};
use metastore_core::proto::etcdserverpb as pb;
use metastore_core::proto::metastore::internal_request::Request;
use metastore_core::proto::mvccpb;
use metastore_core::{Error, StateMachine};
use pb::request_op::Request as Op;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum W {
    Put(u8, u8),
    Del(u8, u8),
    Txn(Vec<u8>),
    Compact(u8),
}

fn key(k: u8) -> String {
    format!("k{}", k % 6)
}

fn w() -> impl Strategy<Value = W> {
    prop_oneof![
        5 => (any::<u8>(), any::<u8>()).prop_map(|(k, v)| W::Put(k, v)),
        2 => (any::<u8>(), any::<u8>()).prop_map(|(a, b)| W::Del(a, b)),
        2 => proptest::collection::vec(any::<u8>(), 1..4).prop_map(W::Txn),
        1 => any::<u8>().prop_map(W::Compact),
    ]
}

struct Run {
    sm: StateMachine,
    idx: u64,
    /// Every event any apply emitted, in apply order.
    emitted: Vec<mvccpb::Event>,
}

impl Run {
    fn apply(&mut self, r: Request) {
        self.idx += 1;
        let applied = self.sm.apply(self.idx, &env(r));
        self.emitted.extend(applied.events);
    }
    fn run(&mut self, op: &W) {
        match op {
            W::Put(k, v) => self.apply(Request::Put(put_req(&key(*k), &format!("v{v}")))),
            W::Del(a, b) => {
                let (a, b) = (key(*a), key(*b));
                let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
                self.apply(Request::DeleteRange(pb::DeleteRangeRequest {
                    key: lo.into(),
                    range_end: hi.into(),
                    prev_kv: false,
                }))
            }
            W::Txn(ks) => {
                let mut seen = std::collections::BTreeSet::new();
                let success = ks
                    .iter()
                    .filter(|k| seen.insert(key(**k)))
                    .map(|k| pb::RequestOp {
                        request: Some(Op::RequestPut(put_req(&key(*k), "t"))),
                    })
                    .collect();
                self.apply(Request::Txn(pb::TxnRequest {
                    compare: vec![],
                    success,
                    failure: vec![],
                }))
            }
            W::Compact(r) => {
                let cur = self.sm.current_revision();
                let rev = 1 + (*r as i64) % cur.max(1);
                self.apply(Request::Compaction(pb::CompactionRequest {
                    revision: rev,
                    physical: false,
                }))
            }
        }
    }
}

/// Reads history from `from` to the end in chunks, as a catching-up watcher would.
fn read_all(
    sm: &StateMachine,
    k: &[u8],
    end: Option<&[u8]>,
    from: i64,
    prev_kv: bool,
    limits: HistoryLimits,
) -> Result<Vec<mvccpb::Event>, Error> {
    let mut out = Vec::new();
    let mut next = from;
    loop {
        let chunk = sm.history(k, end, next, prev_kv, limits)?;
        assert!(chunk.next_rev > next || chunk.next_rev == sm.current_revision() + 1);
        // Chunks end at revision boundaries.
        if let Some(last) = chunk.events.last() {
            assert!(last.kv.as_ref().unwrap().mod_revision < chunk.next_rev);
        }
        out.extend(chunk.events);
        if chunk.next_rev > sm.current_revision() {
            return Ok(out);
        }
        next = chunk.next_rev;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]
    #[test]
    fn history_equals_emitted_events(
        ops in proptest::collection::vec(w(), 1..40),
        from_pick in any::<u16>(),
        range_pick in 0u8..4,
        a in any::<u8>(),
        b in any::<u8>(),
        max_scanned in 1usize..8,
        prev_kv in any::<bool>(),
    ) {
        let be = Shared::default();
        let mut run = Run { sm: open(&be), idx: 0, emitted: Vec::new() };
        for op in &ops {
            run.run(op);
        }
        let sm = &run.sm;
        let cur = sm.current_revision();
        let from = 1 + (from_pick as i64) % (cur + 1);
        let (ka, kb) = (key(a), key(b));
        let (lo, hi) = if ka <= kb { (ka, kb) } else { (kb, ka) };
        let (start, end): (Vec<u8>, Option<Vec<u8>>) = match range_pick {
            0 => (lo.into_bytes(), None),
            1 => (lo.into_bytes(), Some(Vec::new())),
            2 => (lo.into_bytes(), Some(hi.into_bytes())),
            _ => (b"k".to_vec(), Some(b"l".to_vec())),
        };
        let limits = HistoryLimits { max_scanned, max_bytes: 1 << 20 };
        let got = read_all(sm, &start, end.as_deref(), from, prev_kv, limits);
        let compacted = sm.compacted_revision();
        if from < compacted {
            prop_assert_eq!(got, Err(Error::Compacted));
            return Ok(());
        }
        let got = got.unwrap();
        let want: Vec<mvccpb::Event> = run
            .emitted
            .iter()
            .filter(|e| {
                let kv = e.kv.as_ref().unwrap();
                kv.mod_revision >= from && key_in_range(&kv.key, &start, end.as_deref())
            })
            .cloned()
            .map(|mut e| {
                let kv = e.kv.as_ref().unwrap();
                // etcd's prev_kv read fails silently below the compacted revision.
                if !prev_kv || kv.mod_revision - 1 < compacted {
                    e.prev_kv = None;
                }
                e
            })
            .collect();
        prop_assert_eq!(got, want);
    }
}

#[test]
fn history_of_a_future_revision_is_empty_and_waits_there() {
    let be = Shared::default();
    let mut run = Run {
        sm: open(&be),
        idx: 0,
        emitted: Vec::new(),
    };
    run.run(&W::Put(0, 0));
    let limits = HistoryLimits {
        max_scanned: 10,
        max_bytes: 1 << 20,
    };
    let chunk = run.sm.history(b"k0", None, 10, false, limits).unwrap();
    assert!(chunk.events.is_empty());
    assert_eq!(chunk.next_rev, 10);
}

#[test]
fn a_revision_is_never_split_across_chunks() {
    let be = Shared::default();
    let mut run = Run {
        sm: open(&be),
        idx: 0,
        emitted: Vec::new(),
    };
    run.run(&W::Txn(vec![0, 1, 2, 3]));
    run.run(&W::Put(0, 1));
    let limits = HistoryLimits {
        max_scanned: 1,
        max_bytes: 1,
    };
    let chunk = run.sm.history(b"k", Some(b"l"), 2, false, limits).unwrap();
    assert_eq!(chunk.events.len(), 4);
    assert_eq!(chunk.next_rev, 3);
}
