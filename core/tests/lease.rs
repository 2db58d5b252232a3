//! Leases in the state machine: grant, revoke, checkpoint and key attachment case by case
//! (etcd's results and errors), and a property test: grants, revokes, attachments,
//! checkpoints and expiries (revokes) in random order never leave a key attached to a
//! missing lease, a revoke deletes exactly the attached keys in one revision, and a
//! re-opened engine rebuilds the same lease table.

mod common;

use std::collections::BTreeMap;

use common::{env, open, Shared};
use metastore_core::lease::{LeaseChange, MAX_LEASE_TTL};
use metastore_core::proto::etcdserverpb as pb;
use metastore_core::proto::metastore::internal_request::Request;
use metastore_core::proto::metastore::LeaseGrant;
use metastore_core::proto::mvccpb;
use metastore_core::{Applied, ApplyResponse, Bucket, Error, StateMachine};
use pb::compare::{CompareResult, CompareTarget, TargetUnion};
use pb::request_op::Request as Op;
use proptest::prelude::*;

struct H {
    be: Shared,
    sm: StateMachine,
    idx: u64,
}

impl H {
    fn new() -> Self {
        let be = Shared::default();
        let sm = open(&be);
        H { be, sm, idx: 0 }
    }
    fn apply(&mut self, r: Request) -> Applied {
        self.idx += 1;
        let a = self.sm.apply(self.idx, &env(r));
        assert_eq!(self.sm.applied_index(), self.idx);
        a
    }
    fn grant(&mut self, id: i64, ttl: i64) -> Result<pb::LeaseGrantResponse, Error> {
        self.apply(Request::LeaseGrant(LeaseGrant { id, ttl }))
            .result
            .map(|r| match r {
                ApplyResponse::LeaseGrant(g) => g,
                other => panic!("{other:?}"),
            })
    }
    fn revoke(&mut self, id: i64) -> Applied {
        self.apply(Request::LeaseRevoke(pb::LeaseRevokeRequest { id }))
    }
    fn put(&mut self, k: &str, lease: i64) -> Result<pb::PutResponse, Error> {
        self.put_req(pb::PutRequest {
            key: k.into(),
            value: b"v".to_vec(),
            lease,
            ..Default::default()
        })
    }
    fn put_req(&mut self, p: pb::PutRequest) -> Result<pb::PutResponse, Error> {
        self.apply(Request::Put(p)).result.map(|r| match r {
            ApplyResponse::Put(p) => p,
            other => panic!("{other:?}"),
        })
    }
    fn checkpoint(&mut self, cps: &[(i64, i64)]) -> Applied {
        self.apply(Request::LeaseCheckpoint(pb::LeaseCheckpointRequest {
            checkpoints: cps
                .iter()
                .map(|&(id, remaining_ttl)| pb::LeaseCheckpoint { id, remaining_ttl })
                .collect(),
        }))
    }
    /// Every live key and the lease its newest value names.
    fn live(&self) -> BTreeMap<Vec<u8>, i64> {
        self.sm
            .range(&pb::RangeRequest {
                key: vec![0],
                range_end: vec![0],
                ..Default::default()
            })
            .unwrap()
            .kvs
            .into_iter()
            .map(|kv| (kv.key.to_vec(), kv.lease))
            .collect()
    }
    fn lease_bucket_len(&self) -> usize {
        self.be
            .dump()
            .iter()
            .filter(|(b, _, _)| *b == Bucket::Lease)
            .count()
    }
}

#[test]
fn grant_answers_and_persists_without_a_revision() {
    let mut h = H::new();
    let g = h.grant(7, 10).unwrap();
    assert_eq!((g.id, g.ttl, g.error.as_str()), (7, 10, ""));
    assert_eq!(g.header.unwrap().revision, 1);
    assert_eq!(h.sm.current_revision(), 1);
    assert_eq!(h.lease_bucket_len(), 1);
    // Client-chosen negative IDs are IDs like any other.
    assert_eq!(h.grant(-2, 5).unwrap().id, -2);
    // etcd's errors, in etcd's order.
    assert_eq!(h.grant(7, 10), Err(Error::LeaseExists));
    assert_eq!(h.grant(8, MAX_LEASE_TTL + 1), Err(Error::LeaseTtlTooLarge));
    assert_eq!(h.grant(7, MAX_LEASE_TTL + 1), Err(Error::LeaseTtlTooLarge));
    assert_eq!(h.grant(0, 10), Err(Error::LeaseNotFound));
    assert!(matches!(h.grant(9, 0), Err(Error::MalformedRequest(_))));
    assert_eq!(h.grant(9, MAX_LEASE_TTL).unwrap().ttl, MAX_LEASE_TTL);
    assert_eq!(h.lease_bucket_len(), 3);
    let a = h.apply(Request::LeaseGrant(LeaseGrant { id: 11, ttl: 3 }));
    assert_eq!(
        a.lease_changes,
        vec![LeaseChange::Granted { id: 11, ttl: 3 }]
    );
    assert!(a.events.is_empty());

    let sm2 = open(&h.be);
    assert_eq!(sm2.lessor(), h.sm.lessor());
    assert_eq!(sm2.lessor().lookup(7).unwrap().ttl, 10);
}

#[test]
fn puts_attach_detach_and_keep_leases() {
    let mut h = H::new();
    h.grant(1, 10).unwrap();
    h.grant(2, 10).unwrap();
    assert_eq!(h.put("a", 99), Err(Error::LeaseNotFound));
    assert_eq!(h.sm.current_revision(), 1, "a refused put writes nothing");
    h.put("a", 1).unwrap();
    assert_eq!(h.sm.lease_of(b"a"), 1);
    // ignore_lease keeps the attachment.
    h.put_req(pb::PutRequest {
        key: "a".into(),
        value: b"w".to_vec(),
        ignore_lease: true,
        ..Default::default()
    })
    .unwrap();
    assert_eq!(h.sm.lease_of(b"a"), 1);
    assert_eq!(h.live()[b"a".as_slice()], 1);
    // Another lease moves it.
    h.put("a", 2).unwrap();
    assert_eq!(h.sm.lease_of(b"a"), 2);
    assert!(h.sm.lessor().lookup(1).unwrap().keys.is_empty());
    // No lease detaches.
    h.put("a", 0).unwrap();
    assert_eq!(h.sm.lease_of(b"a"), 0);
    assert!(h.sm.lessor().lookup(2).unwrap().keys.is_empty());
    // A delete detaches too.
    h.put("b", 1).unwrap();
    h.apply(Request::DeleteRange(pb::DeleteRangeRequest {
        key: "b".into(),
        ..Default::default()
    }));
    assert!(h.sm.lessor().lookup(1).unwrap().keys.is_empty());

    // Txn: a put with an unknown lease fails the whole txn; a LEASE compare works.
    h.put("c", 2).unwrap();
    let rev = h.sm.current_revision();
    let put_op = |k: &str, lease: i64| pb::RequestOp {
        request: Some(Op::RequestPut(pb::PutRequest {
            key: k.into(),
            lease,
            ..Default::default()
        })),
    };
    let t = h.apply(Request::Txn(pb::TxnRequest {
        success: vec![put_op("x", 1), put_op("y", 42)],
        ..Default::default()
    }));
    assert_eq!(t.result, Err(Error::LeaseNotFound));
    assert_eq!(h.sm.current_revision(), rev);
    let cmp = |lease: i64| pb::Compare {
        result: CompareResult::Equal as i32,
        target: CompareTarget::Lease as i32,
        key: "c".into(),
        target_union: Some(TargetUnion::Lease(lease)),
        ..Default::default()
    };
    for (lease, want) in [(2, true), (1, false)] {
        let t = h.apply(Request::Txn(pb::TxnRequest {
            compare: vec![cmp(lease)],
            success: vec![put_op("z", 1)],
            ..Default::default()
        }));
        match t.result.unwrap() {
            ApplyResponse::Txn(r) => assert_eq!(r.succeeded, want),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(h.sm.lease_of(b"z"), 1);
    // Attachments are rebuilt from the keys on open.
    let sm2 = open(&h.be);
    assert_eq!(sm2.lessor(), h.sm.lessor());
}

#[test]
fn revoke_deletes_attached_keys_in_one_revision() {
    let mut h = H::new();
    h.grant(1, 10).unwrap();
    h.grant(2, 10).unwrap();
    for k in ["c", "a", "b"] {
        h.put(k, 1).unwrap();
    }
    h.put("other", 2).unwrap();
    h.put("plain", 0).unwrap();
    let rev = h.sm.current_revision();
    let a = h.revoke(1);
    match a.result.as_ref().unwrap() {
        ApplyResponse::LeaseRevoke(r) => {
            assert_eq!(r.header.as_ref().unwrap().revision, rev + 1)
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(h.sm.current_revision(), rev + 1);
    assert_eq!(a.lease_changes, vec![LeaseChange::Revoked { id: 1 }]);
    // One DELETE event per key, in key order, all at the new revision.
    let deleted: Vec<_> = a
        .events
        .iter()
        .map(|e| {
            assert_eq!(e.r#type, mvccpb::event::EventType::Delete as i32);
            let kv = e.kv.as_ref().unwrap();
            assert_eq!(kv.mod_revision, rev + 1);
            kv.key.clone()
        })
        .collect();
    assert_eq!(deleted, vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
    assert_eq!(
        h.live().into_keys().collect::<Vec<_>>(),
        vec![b"other".to_vec(), b"plain".to_vec()]
    );
    assert!(h.sm.lessor().lookup(1).is_none());
    assert_eq!(h.lease_bucket_len(), 1);
    assert_eq!(h.revoke(1).result, Err(Error::LeaseNotFound));
    // A lease without keys: no revision.
    h.grant(3, 10).unwrap();
    let a = h.revoke(3);
    assert!(a.result.is_ok());
    assert!(a.events.is_empty());
    assert_eq!(h.sm.current_revision(), rev + 1);
    // Put with a revoked lease fails.
    assert_eq!(h.put("a", 1), Err(Error::LeaseNotFound));
    let sm2 = open(&h.be);
    assert_eq!(sm2.lessor(), h.sm.lessor());
}

#[test]
fn checkpoints_persist_remaining_ttl() {
    let mut h = H::new();
    h.grant(1, 100).unwrap();
    let a = h.checkpoint(&[(1, 40), (5, 3)]);
    assert!(matches!(a.result, Ok(ApplyResponse::LeaseCheckpoint(_))));
    assert_eq!(
        a.lease_changes,
        vec![LeaseChange::Checkpointed {
            id: 1,
            remaining_ttl: 40
        }]
    );
    assert_eq!(h.sm.lessor().lookup(1).unwrap().remaining_ttl, 40);
    assert!(h.sm.lessor().lookup(5).is_none());
    assert_eq!(h.sm.current_revision(), 1);
    let sm2 = open(&h.be);
    assert_eq!(sm2.lessor().lookup(1).unwrap().remaining_ttl, 40);
    assert_eq!(sm2.lessor().lookup(1).unwrap().ttl, 100);
    // Clearing it (what a renewal does).
    h.checkpoint(&[(1, 0)]);
    assert_eq!(open(&h.be).lessor().lookup(1).unwrap().remaining_ttl, 0);
}

#[derive(Debug, Clone)]
enum LeaseOp {
    Grant(i64),
    Revoke(i64),
    Put(u8, i64),
    PutIgnoreLease(u8),
    Delete(u8),
    TxnPut(u8, u8, i64),
    Checkpoint(i64, i64),
    Reopen,
}

fn lease_op() -> impl Strategy<Value = LeaseOp> {
    let id = 1i64..6;
    let lease = 0i64..7; // 6 is never granted... unless it is: ids go to 5
    let key = 0u8..8;
    prop_oneof![
        2 => id.clone().prop_map(LeaseOp::Grant),
        1 => id.clone().prop_map(LeaseOp::Revoke),
        4 => (key.clone(), lease.clone()).prop_map(|(k, l)| LeaseOp::Put(k, l)),
        1 => key.clone().prop_map(LeaseOp::PutIgnoreLease),
        1 => key.clone().prop_map(LeaseOp::Delete),
        1 => (key.clone(), key, lease).prop_map(|(a, b, l)| LeaseOp::TxnPut(a, b, l)),
        1 => (id, 0i64..50).prop_map(|(i, r)| LeaseOp::Checkpoint(i, r)),
        1 => Just(LeaseOp::Reopen),
    ]
}

fn key_of(k: u8) -> Vec<u8> {
    vec![b'k', b'0' + k]
}

/// No key is attached to a missing lease; the table's attachments are exactly the live
/// keys' lease fields.
fn check_attachments(h: &H) {
    let live = h.live();
    let lessor = h.sm.lessor();
    for (key, lease) in &live {
        if *lease != 0 {
            let l = lessor
                .lookup(*lease)
                .unwrap_or_else(|| panic!("key {key:?} names missing lease {lease}"));
            assert!(l.keys.contains(key));
        }
        assert_eq!(lessor.lease_of(key), *lease);
    }
    for l in lessor.leases() {
        for key in &l.keys {
            assert_eq!(live.get(key), Some(&l.id), "stale attachment of {key:?}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn leases_and_keys_stay_consistent(ops in proptest::collection::vec(lease_op(), 1..60)) {
        let mut h = H::new();
        for op in ops {
            match op {
                LeaseOp::Grant(id) => {
                    let existed = h.sm.lessor().lookup(id).is_some();
                    let r = h.grant(id, 10);
                    prop_assert_eq!(r.is_ok(), !existed);
                }
                LeaseOp::Revoke(id) => {
                    let before = h.live();
                    let rev = h.sm.current_revision();
                    let attached: Vec<Vec<u8>> = before
                        .iter()
                        .filter(|(_, l)| **l == id)
                        .map(|(k, _)| k.clone())
                        .collect();
                    let existed = h.sm.lessor().lookup(id).is_some();
                    let a = h.revoke(id);
                    prop_assert_eq!(a.result.is_ok(), existed);
                    let after = h.live();
                    // Exactly the attached keys are gone, in one revision (none if no key).
                    let mut expect = before.clone();
                    expect.retain(|_, l| *l != id || !existed);
                    prop_assert_eq!(&after, &expect);
                    let bump = i64::from(existed && !attached.is_empty());
                    prop_assert_eq!(h.sm.current_revision(), rev + bump);
                    if existed {
                        let mut evs: Vec<Vec<u8>> = a.events.iter()
                            .map(|e| e.kv.as_ref().unwrap().key.to_vec()).collect();
                        evs.sort();
                        prop_assert_eq!(evs, attached);
                    }
                }
                LeaseOp::Put(k, lease) => {
                    let exists = lease == 0 || h.sm.lessor().lookup(lease).is_some();
                    prop_assert_eq!(h.put_req(pb::PutRequest {
                        key: key_of(k), lease, ..Default::default()
                    }).is_ok(), exists);
                }
                LeaseOp::PutIgnoreLease(k) => {
                    let before = h.live().get(&key_of(k)).copied();
                    let r = h.put_req(pb::PutRequest {
                        key: key_of(k), ignore_lease: true, ..Default::default()
                    });
                    prop_assert_eq!(r.is_ok(), before.is_some());
                    prop_assert_eq!(h.live().get(&key_of(k)).copied(), before);
                }
                LeaseOp::Delete(k) => {
                    h.apply(Request::DeleteRange(pb::DeleteRangeRequest {
                        key: key_of(k), ..Default::default()
                    }));
                }
                LeaseOp::TxnPut(a, b, lease) => {
                    let op = |k: u8, l: i64| pb::RequestOp {
                        request: Some(Op::RequestPut(pb::PutRequest {
                            key: key_of(k), lease: l, ..Default::default()
                        })),
                    };
                    h.apply(Request::Txn(pb::TxnRequest {
                        success: vec![op(a, 0), op(b, lease)],
                        ..Default::default()
                    }));
                }
                LeaseOp::Checkpoint(id, rem) => {
                    h.checkpoint(&[(id, rem)]);
                    if let Some(l) = h.sm.lessor().lookup(id) {
                        prop_assert_eq!(l.remaining_ttl, rem);
                    }
                }
                LeaseOp::Reopen => {
                    let sm2 = open(&h.be);
                    prop_assert_eq!(sm2.lessor(), h.sm.lessor());
                    h.sm = sm2;
                }
            }
            check_attachments(&h);
        }
        // Two fresh engines fed the same log hash alike (lease bucket included).
        let reopened = open(&h.be);
        prop_assert_eq!(reopened.hash().unwrap(), h.sm.hash().unwrap());
    }
}
