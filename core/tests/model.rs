//! Property test: random sequences of put / delete / txn / compact / range applied to the
//! state machine and to a small reference model of etcd's KV semantics give the same
//! responses, revisions, versions, create/mod revisions and errors. Also: two fresh
//! engines fed the same sequence hash alike, and re-opening an engine rebuilds the same
//! state.
//!
//! The model keeps a full copy of the key space per revision, which is slow and obviously
//! right; it knows nothing of generations, tombstones or key layouts.

mod common;

use std::collections::BTreeMap;

use common::{env, open, Shared};
use metastore_core::proto::etcdserverpb as pb;
use metastore_core::proto::metastore::internal_request::Request;
use metastore_core::proto::mvccpb::KeyValue;
use metastore_core::{ApplyResponse, Error};
use pb::compare::{CompareResult, CompareTarget, TargetUnion};
use pb::request_op::Request as Op;
use pb::response_op::Response as OpResp;
use proptest::prelude::*;

type State = BTreeMap<Vec<u8>, KeyValue>;

struct Model {
    /// history[r] is the key space at revision r (history[0] unused, history[1] empty).
    history: Vec<State>,
    compacted: i64,
}

#[derive(Debug, Clone, Copy)]
enum End {
    Single,
    Range(u8),
    FromKey,
    Prefix,
}

fn end_bytes(key: &[u8], end: End) -> Vec<u8> {
    match end {
        End::Single => vec![],
        End::Range(c) => vec![c],
        End::FromKey => vec![0],
        End::Prefix => {
            let mut e = key.to_vec();
            if let Some(last) = e.last_mut() {
                *last += 1;
            }
            e
        }
    }
}

fn in_range(k: &[u8], key: &[u8], end: &[u8]) -> bool {
    match end {
        [] => k == key,
        [0] => k >= key,
        e => k >= key && k < e,
    }
}

impl Model {
    fn new() -> Self {
        Model {
            history: vec![State::new(), State::new()],
            compacted: -1,
        }
    }
    fn cur(&self) -> i64 {
        self.history.len() as i64 - 1
    }

    fn range(
        &self,
        r: &pb::RangeRequest,
        working: Option<&State>,
        read_rev: i64,
    ) -> Result<pb::RangeResponse, Error> {
        if r.revision > read_rev {
            return Err(Error::FutureRevision);
        }
        let rev = if r.revision <= 0 {
            read_rev
        } else {
            r.revision
        };
        if rev < self.compacted {
            return Err(Error::Compacted);
        }
        let state = match working {
            Some(w) if rev == read_rev => w,
            _ => &self.history[rev as usize],
        };
        let all: Vec<KeyValue> = state
            .iter()
            .filter(|(k, _)| in_range(k, &r.key, &r.range_end))
            .map(|(_, v)| v.clone())
            .collect();
        let count = all.len() as i64;
        if r.count_only {
            return Ok(pb::RangeResponse {
                header: hdr(read_rev),
                kvs: vec![],
                more: false,
                count,
            });
        }
        let mut kvs = all;
        // etcd fetches limit+1 in key order when it will not sort explicitly.
        if r.sort_order == 0 && r.limit > 0 {
            kvs.truncate(r.limit as usize + 1);
        }
        let order = if r.sort_target != 0 && r.sort_order == 0 {
            1
        } else {
            r.sort_order
        };
        if order != 0 {
            // Stable, and descending by comparing the other way round: up to 12 keys Go's
            // sort is an insertion sort, which keeps ties in key order both ways.
            if order == 2 {
                kvs.sort_by_key(|kv| std::cmp::Reverse(target_of(kv, r.sort_target)));
            } else {
                kvs.sort_by_key(|kv| target_of(kv, r.sort_target));
            }
        }
        let mut more = false;
        if r.limit > 0 && kvs.len() > r.limit as usize {
            kvs.truncate(r.limit as usize);
            more = true;
        }
        if r.keys_only {
            kvs.iter_mut().for_each(|kv| kv.value.clear());
        }
        Ok(pb::RangeResponse {
            header: hdr(read_rev),
            kvs,
            more,
            count,
        })
    }

    fn put(
        &self,
        p: &pb::PutRequest,
        working: &mut State,
        rev: i64,
    ) -> Result<pb::PutResponse, Error> {
        let prev = working.get(&p.key).cloned();
        if p.ignore_value && prev.is_none() {
            return Err(Error::KeyNotFound);
        }
        let value = if p.ignore_value {
            prev.as_ref().map(|k| k.value.clone()).unwrap_or_default()
        } else {
            p.value.clone().into()
        };
        let kv = KeyValue {
            key: p.key.clone().into(),
            create_revision: prev.as_ref().map_or(rev, |k| k.create_revision),
            mod_revision: rev,
            version: prev.as_ref().map_or(0, |k| k.version) + 1,
            value,
            lease: 0,
        };
        working.insert(p.key.clone(), kv);
        Ok(pb::PutResponse {
            header: hdr(rev),
            prev_kv: if p.prev_kv { prev } else { None },
        })
    }

    fn delete(&self, d: &pb::DeleteRangeRequest, working: &mut State) -> Vec<KeyValue> {
        let keys: Vec<Vec<u8>> = working
            .keys()
            .filter(|k| in_range(k, &d.key, &d.range_end))
            .cloned()
            .collect();
        keys.iter().filter_map(|k| working.remove(k)).collect()
    }

    fn commit(&mut self, working: State, changed: bool) {
        if changed {
            self.history.push(working);
        }
    }

    fn apply(&mut self, req: &Request) -> Result<ApplyResponse, Error> {
        let cur = self.cur();
        match req {
            Request::Put(p) => {
                let mut w = self.history[cur as usize].clone();
                let resp = self.put(p, &mut w, cur + 1)?;
                self.commit(w, true);
                Ok(ApplyResponse::Put(resp))
            }
            Request::DeleteRange(d) => {
                let mut w = self.history[cur as usize].clone();
                let gone = self.delete(d, &mut w);
                let changed = !gone.is_empty();
                let resp = pb::DeleteRangeResponse {
                    header: hdr(if changed { cur + 1 } else { cur }),
                    deleted: gone.len() as i64,
                    prev_kvs: if d.prev_kv { gone } else { vec![] },
                };
                self.commit(w, changed);
                Ok(ApplyResponse::DeleteRange(resp))
            }
            Request::Range(r) => self.range(r, None, cur).map(ApplyResponse::Range),
            Request::Compaction(c) => {
                if c.revision <= self.compacted {
                    return Err(Error::Compacted);
                }
                if c.revision > cur {
                    return Err(Error::FutureRevision);
                }
                self.compacted = c.revision;
                Ok(ApplyResponse::Compaction(pb::CompactionResponse {
                    header: hdr(cur),
                }))
            }
            Request::Txn(t) => self.txn(t).map(ApplyResponse::Txn),
            _ => unreachable!(),
        }
    }

    fn txn(&mut self, t: &pb::TxnRequest) -> Result<pb::TxnResponse, Error> {
        let cur = self.cur();
        let state = &self.history[cur as usize];
        let ok = t.compare.iter().all(|c| {
            let kvs: Vec<&KeyValue> = state
                .iter()
                .filter(|(k, _)| in_range(k, &c.key, &c.range_end))
                .map(|(_, v)| v)
                .collect();
            if kvs.is_empty() {
                if c.target == CompareTarget::Value as i32 {
                    return false;
                }
                return compare(c, &KeyValue::default());
            }
            kvs.iter().all(|kv| compare(c, kv))
        });
        let ops = if ok { &t.success } else { &t.failure };
        // Duplicate keys, in both branches (single-level txns only in this test).
        for branch in [&t.success, &t.failure] {
            let mut puts = std::collections::HashSet::new();
            for op in branch.iter() {
                if let Some(Op::RequestPut(p)) = &op.request {
                    if !puts.insert(p.key.clone()) {
                        return Err(Error::DuplicateKey);
                    }
                    for other in branch.iter() {
                        if let Some(Op::RequestDeleteRange(d)) = &other.request {
                            if d.range_end != [0] && in_range(&p.key, &d.key, &d.range_end) {
                                return Err(Error::DuplicateKey);
                            }
                        }
                    }
                }
            }
        }
        let is_write = t
            .success
            .iter()
            .chain(t.failure.iter())
            .any(|op| !matches!(op.request, Some(Op::RequestRange(_))));
        if is_write {
            for op in ops {
                if let Some(Op::RequestPut(p)) = &op.request {
                    if p.ignore_value && !state.contains_key(&p.key) {
                        return Err(Error::KeyNotFound);
                    }
                }
            }
        }
        for op in ops {
            if let Some(Op::RequestRange(r)) = &op.request {
                if r.revision != 0 && r.revision > cur {
                    return Err(Error::FutureRevision);
                }
                if r.revision != 0 && r.revision < self.compacted {
                    return Err(Error::Compacted);
                }
            }
        }
        let mut w = state.clone();
        let mut changed = false;
        let mut responses = vec![];
        for op in ops {
            let read_rev = if changed { cur + 1 } else { cur };
            let resp = match &op.request {
                Some(Op::RequestRange(r)) => {
                    OpResp::ResponseRange(self.range(r, Some(&w), read_rev)?)
                }
                Some(Op::RequestPut(p)) => {
                    changed = true;
                    OpResp::ResponsePut(self.put(p, &mut w, cur + 1)?)
                }
                Some(Op::RequestDeleteRange(d)) => {
                    let gone = self.delete(d, &mut w);
                    changed |= !gone.is_empty();
                    OpResp::ResponseDeleteRange(pb::DeleteRangeResponse {
                        header: hdr(if changed { cur + 1 } else { cur }),
                        deleted: gone.len() as i64,
                        prev_kvs: if d.prev_kv { gone } else { vec![] },
                    })
                }
                _ => unreachable!(),
            };
            responses.push(pb::ResponseOp {
                response: Some(resp),
            });
        }
        self.commit(w, changed);
        Ok(pb::TxnResponse {
            header: hdr(if changed { cur + 1 } else { cur }),
            succeeded: ok,
            responses,
        })
    }
}

fn target_of(kv: &KeyValue, target: i32) -> (i64, Vec<u8>) {
    match target {
        0 => (0, kv.key.to_vec()),
        1 => (kv.version, vec![]),
        2 => (kv.create_revision, vec![]),
        3 => (kv.mod_revision, vec![]),
        _ => (0, kv.value.to_vec()),
    }
}

fn compare(c: &pb::Compare, kv: &KeyValue) -> bool {
    use std::cmp::Ordering;
    let ord = match (CompareTarget::try_from(c.target).unwrap(), &c.target_union) {
        (CompareTarget::Value, Some(TargetUnion::Value(v))) => kv.value.as_ref().cmp(&v[..]),
        (CompareTarget::Version, Some(TargetUnion::Version(v))) => kv.version.cmp(v),
        (CompareTarget::Create, Some(TargetUnion::CreateRevision(v))) => kv.create_revision.cmp(v),
        (CompareTarget::Mod, Some(TargetUnion::ModRevision(v))) => kv.mod_revision.cmp(v),
        _ => unreachable!(),
    };
    match CompareResult::try_from(c.result).unwrap() {
        CompareResult::Equal => ord == Ordering::Equal,
        CompareResult::NotEqual => ord != Ordering::Equal,
        CompareResult::Greater => ord == Ordering::Greater,
        CompareResult::Less => ord == Ordering::Less,
    }
}

fn hdr(revision: i64) -> Option<pb::ResponseHeader> {
    Some(pb::ResponseHeader {
        revision,
        ..Default::default()
    })
}

// ---- generators ----------------------------------------------------------------------

fn key() -> impl Strategy<Value = Vec<u8>> {
    prop::sample::select(vec!["a", "ab", "abc", "b", "ba", "c", "d"])
        .prop_map(|s| s.as_bytes().to_vec())
}

fn end() -> impl Strategy<Value = End> {
    prop_oneof![
        4 => Just(End::Single),
        1 => prop::sample::select(vec![b'b', b'c', b'e']).prop_map(End::Range),
        1 => Just(End::FromKey),
        1 => Just(End::Prefix),
    ]
}

fn value() -> impl Strategy<Value = Vec<u8>> {
    prop::sample::select(vec!["", "1", "2", "x"]).prop_map(|s| s.as_bytes().to_vec())
}

fn put() -> impl Strategy<Value = pb::PutRequest> {
    (key(), value(), any::<bool>(), prop::bool::weighted(0.15)).prop_map(
        |(key, value, prev_kv, ignore_value)| pb::PutRequest {
            key,
            value: if ignore_value { vec![] } else { value },
            prev_kv,
            ignore_value,
            ..Default::default()
        },
    )
}

fn delete() -> impl Strategy<Value = pb::DeleteRangeRequest> {
    (key(), end(), any::<bool>()).prop_map(|(key, e, prev_kv)| pb::DeleteRangeRequest {
        range_end: end_bytes(&key, e),
        key,
        prev_kv,
    })
}

fn range() -> impl Strategy<Value = pb::RangeRequest> {
    (
        key(),
        end(),
        0i64..12,
        0i64..4,
        0i32..3,
        0i32..5,
        any::<bool>(),
        prop::bool::weighted(0.2),
    )
        .prop_map(
            |(key, e, revision, limit, sort_order, sort_target, keys_only, count_only)| {
                pb::RangeRequest {
                    range_end: end_bytes(&key, e),
                    key,
                    revision,
                    limit,
                    sort_order,
                    sort_target,
                    keys_only,
                    count_only,
                    ..Default::default()
                }
            },
        )
}

fn compare_strategy() -> impl Strategy<Value = pb::Compare> {
    (
        key(),
        0i32..4,
        0i32..4,
        0i64..6,
        value(),
        prop::bool::weighted(0.2),
    )
        .prop_map(|(key, result, target, n, v, ranged)| {
            let target_union = match target {
                0 => TargetUnion::Version(n),
                1 => TargetUnion::CreateRevision(n),
                2 => TargetUnion::ModRevision(n),
                _ => TargetUnion::Value(v),
            };
            pb::Compare {
                range_end: if ranged {
                    end_bytes(&key, End::Prefix)
                } else {
                    vec![]
                },
                key,
                result,
                target,
                target_union: Some(target_union),
            }
        })
}

fn op() -> impl Strategy<Value = pb::RequestOp> {
    prop_oneof![
        put().prop_map(|p| pb::RequestOp {
            request: Some(Op::RequestPut(p))
        }),
        delete().prop_map(|d| pb::RequestOp {
            request: Some(Op::RequestDeleteRange(d))
        }),
        range().prop_map(|r| pb::RequestOp {
            request: Some(Op::RequestRange(r))
        }),
    ]
}

fn txn() -> impl Strategy<Value = pb::TxnRequest> {
    (
        prop::collection::vec(compare_strategy(), 0..3),
        prop::collection::vec(op(), 0..4),
        prop::collection::vec(op(), 0..3),
    )
        .prop_map(|(compare, success, failure)| pb::TxnRequest {
            compare,
            success,
            failure,
        })
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        6 => put().prop_map(Request::Put),
        2 => delete().prop_map(Request::DeleteRange),
        3 => txn().prop_map(Request::Txn),
        1 => (-1i64..14).prop_map(|revision| Request::Compaction(pb::CompactionRequest { revision, physical: false })),
        2 => range().prop_map(Request::Range),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn state_machine_matches_model(reqs in prop::collection::vec(request(), 1..40)) {
        let be = Shared::default();
        let mut sm = open(&be);
        let twin_be = Shared::default();
        let mut twin = open(&twin_be);
        let mut model = Model::new();
        for (i, req) in reqs.iter().enumerate() {
            let index = i as u64 + 1;
            let got = sm.apply(index, &env(req.clone()));
            let twin_got = twin.apply(index, &env(req.clone()));
            prop_assert_eq!(&got, &twin_got);
            let want = model.apply(req);
            prop_assert_eq!(got.result, want, "request {} {:?}", i, req);
            prop_assert_eq!(sm.current_revision(), model.cur());
            prop_assert_eq!(sm.compacted_revision(), model.compacted.max(0));
        }
        // Every readable revision still reads what the model says.
        let all = pb::RangeRequest { key: vec![0], range_end: vec![0], ..Default::default() };
        for rev in model.compacted.max(1)..=model.cur() {
            let got = sm.range(&pb::RangeRequest { revision: rev, ..all.clone() }).unwrap();
            let want: Vec<KeyValue> = model.history[rev as usize].values().cloned().collect();
            prop_assert_eq!(got.kvs, want);
        }
        // Same log, same hashes, on two engines.
        prop_assert_eq!(sm.hash_kv(0).unwrap(), twin.hash_kv(0).unwrap());
        prop_assert_eq!(sm.hash().unwrap(), twin.hash().unwrap());
        // Re-opening rebuilds the same state.
        let reopened = open(&be);
        prop_assert_eq!(reopened.current_revision(), sm.current_revision());
        prop_assert_eq!(reopened.compacted_revision(), sm.compacted_revision());
        prop_assert_eq!(reopened.applied_index(), sm.applied_index());
        prop_assert_eq!(reopened.hash_kv(0).unwrap(), sm.hash_kv(0).unwrap());
        for rev in model.compacted.max(1)..=model.cur() {
            let q = pb::RangeRequest { revision: rev, ..all.clone() };
            prop_assert_eq!(reopened.range(&q).unwrap(), sm.range(&q).unwrap());
        }
        // And the reopened machine carries on identically.
        let mut reopened = reopened;
        let next = sm.applied_index() + 1;
        let p = Request::Put(pb::PutRequest { key: b"a".to_vec(), value: b"z".to_vec(), ..Default::default() });
        prop_assert_eq!(reopened.apply(next, &env(p.clone())), sm.apply(next, &env(p)));
        prop_assert_eq!(reopened.hash_kv(0).unwrap(), sm.hash_kv(0).unwrap());
    }
}
