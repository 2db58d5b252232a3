//! The state machine through its public API: etcd's KV semantics case by case, hashes
//! against values a real etcd produced for the same operations, re-opening, and the
//! apply contract (idempotence, failed requests write only the applied index).

mod common;

use common::{env, open, put_req, Shared};
use metastore_core::proto::etcdserverpb as pb;
use metastore_core::proto::metastore::internal_request::Request;
use metastore_core::proto::mvccpb;
use metastore_core::{Applied, ApplyResponse, Bucket, Error, StateMachine};
use pb::compare::{CompareResult, CompareTarget, TargetUnion};
use pb::request_op::Request as Op;
use pb::response_op::Response as OpResp;

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
        assert_eq!(
            self.sm.applied_index(),
            self.idx,
            "applied index advances even on failure"
        );
        a
    }
    fn put(&mut self, k: &str, v: &str) -> pb::PutResponse {
        match self.apply(Request::Put(put_req(k, v))).result.unwrap() {
            ApplyResponse::Put(p) => p,
            other => panic!("{other:?}"),
        }
    }
    fn put_req(&mut self, p: pb::PutRequest) -> Result<pb::PutResponse, Error> {
        self.apply(Request::Put(p)).result.map(|r| match r {
            ApplyResponse::Put(p) => p,
            other => panic!("{other:?}"),
        })
    }
    fn del(&mut self, k: &str, end: &str) -> Result<pb::DeleteRangeResponse, Error> {
        let d = pb::DeleteRangeRequest {
            key: k.into(),
            range_end: end.into(),
            prev_kv: true,
        };
        self.apply(Request::DeleteRange(d)).result.map(|r| match r {
            ApplyResponse::DeleteRange(p) => p,
            other => panic!("{other:?}"),
        })
    }
    fn txn(&mut self, t: pb::TxnRequest) -> Result<pb::TxnResponse, Error> {
        self.apply(Request::Txn(t)).result.map(|r| match r {
            ApplyResponse::Txn(p) => p,
            other => panic!("{other:?}"),
        })
    }
    fn compact(&mut self, rev: i64) -> Result<(), Error> {
        self.apply(Request::Compaction(pb::CompactionRequest {
            revision: rev,
            physical: true,
        }))
        .result
        .map(|_| ())
    }
    fn get(&self, r: pb::RangeRequest) -> Result<pb::RangeResponse, Error> {
        self.sm.range(&r)
    }
    fn keys(&self, r: pb::RangeRequest) -> Vec<String> {
        self.get(r)
            .unwrap()
            .kvs
            .iter()
            .map(|kv| String::from_utf8(kv.key.to_vec()).unwrap())
            .collect()
    }
}

fn rr(k: &str, end: &str) -> pb::RangeRequest {
    pb::RangeRequest {
        key: k.into(),
        range_end: end.into(),
        ..Default::default()
    }
}

fn kv(k: &str, v: &str, create: i64, modr: i64, ver: i64) -> mvccpb::KeyValue {
    mvccpb::KeyValue {
        key: k.to_string().into(),
        value: v.to_string().into(),
        create_revision: create,
        mod_revision: modr,
        version: ver,
        lease: 0,
    }
}

fn op_put(k: &str, v: &str) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(Op::RequestPut(put_req(k, v))),
    }
}
fn op_get(k: &str) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(Op::RequestRange(rr(k, ""))),
    }
}
fn op_del(k: &str, end: &str) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(Op::RequestDeleteRange(pb::DeleteRangeRequest {
            key: k.into(),
            range_end: end.into(),
            prev_kv: false,
        })),
    }
}
fn op_txn(t: pb::TxnRequest) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(Op::RequestTxn(t)),
    }
}
fn cmp(k: &str, result: CompareResult, target: CompareTarget, u: TargetUnion) -> pb::Compare {
    pb::Compare {
        key: k.into(),
        result: result as i32,
        target: target as i32,
        target_union: Some(u),
        range_end: vec![],
    }
}

#[test]
fn empty_store() {
    let h = H::new();
    assert_eq!(h.sm.current_revision(), 1);
    assert_eq!(h.sm.applied_index(), 0);
    assert_eq!(h.sm.compacted_revision(), 0);
    let hk = h.sm.hash_kv(0).unwrap();
    // etcd 3.4.23 on an empty data dir: hash 1084519789, compact_revision -1.
    assert_eq!(
        (hk.hash, hk.compact_revision, hk.hash_revision),
        (1084519789, -1, 1)
    );
    let r = h.get(rr("a", "")).unwrap();
    assert_eq!(
        (r.header.unwrap().revision, r.count, r.kvs.len()),
        (1, 0, 0)
    );
}

#[test]
fn hash_kv_matches_real_etcd() {
    // The same operations were run against etcd 3.4.23; the hashes are what it reported.
    let mut h = H::new();
    h.put("a", "1");
    assert_eq!(h.sm.hash_kv(0).unwrap().hash, 2587454935);
    h.put("b", "2");
    h.put("a", "3");
    h.del("b", "").unwrap();
    h.put("c", "4");
    assert_eq!(h.sm.current_revision(), 6);
    assert_eq!(h.sm.hash_kv(0).unwrap().hash, 2750537463);
    assert_eq!(h.sm.hash_kv(4).unwrap().hash, 2069675932);
    h.compact(5).unwrap();
    let hk = h.sm.hash_kv(0).unwrap();
    assert_eq!((hk.hash, hk.compact_revision), (168415639, 5));
    h.put("d", "5");
    assert_eq!(h.sm.hash_kv(0).unwrap().hash, 896931956);
    assert_eq!(h.sm.hash_kv(6).unwrap().hash, 168415639);
    h.compact(7).unwrap();
    assert_eq!(h.sm.hash_kv(0).unwrap().hash, 896931956);
    h.put("a", "9");
    h.del("a", "").unwrap();
    h.compact(9).unwrap();
    assert_eq!(h.sm.hash_kv(0).unwrap().hash, 2095815140);
    assert_eq!(h.sm.hash_kv(3), Err(Error::Compacted));
    assert_eq!(h.sm.hash_kv(10), Err(Error::FutureRevision));
}

#[test]
fn sort_order_of_ties_matches_real_etcd() {
    // 30 keys; some rewritten. etcd 3.4.23 (Go 1.19 sort.Sort) returned these orders.
    let mut h = H::new();
    for i in 0..30 {
        h.put(&format!("k{i:02}"), &format!("v{}", i % 3));
    }
    for i in [3, 7, 11, 15, 19, 23, 27, 5, 14] {
        h.put(&format!("k{i:02}"), &format!("v{}", i % 3));
    }
    for i in [7, 15, 23] {
        h.put(&format!("k{i:02}"), "x");
    }
    let sorted = |order: pb::range_request::SortOrder, target: pb::range_request::SortTarget| {
        let mut r = rr("k", "l");
        r.sort_order = order as i32;
        r.sort_target = target as i32;
        h.keys(r).join(" ")
    };
    use pb::range_request::{SortOrder::*, SortTarget::*};
    assert_eq!(
        sorted(Ascend, Version),
        "k10 k04 k21 k12 k25 k28 k06 k26 k08 k09 k02 k01 k29 k13 k00 k24 k16 k17 k18 k22 k20 k14 k19 k11 k27 k05 k03 k23 k15 k07"
    );
    assert_eq!(
        sorted(Ascend, Value),
        "k12 k03 k09 k24 k21 k27 k06 k00 k18 k28 k01 k22 k19 k13 k25 k04 k16 k10 k14 k17 k20 k11 k08 k26 k05 k02 k29 k15 k23 k07"
    );
    assert_eq!(
        sorted(Descend, Version),
        "k07 k23 k15 k14 k11 k05 k27 k03 k19 k16 k20 k09 k12 k13 k00 k02 k04 k17 k18 k08 k10 k21 k22 k01 k24 k25 k26 k06 k28 k29"
    );
    assert_eq!(
        sorted(Descend, Value),
        "k07 k23 k15 k14 k02 k05 k29 k26 k08 k20 k17 k11 k16 k25 k28 k13 k04 k10 k01 k19 k22 k21 k09 k18 k24 k12 k03 k27 k00 k06"
    );
    // Key order descending, and the default (no order, KEY target) is ascending keys.
    let mut r = rr("k0", "k1");
    r.sort_order = Descend as i32;
    assert_eq!(
        h.keys(r).join(" "),
        "k09 k08 k07 k06 k05 k04 k03 k02 k01 k00"
    );
}

#[test]
fn put_revisions_versions_and_prev_kv() {
    let mut h = H::new();
    let p = h.put("a", "1");
    assert_eq!(p.header.unwrap().revision, 2);
    let p = h
        .put_req(pb::PutRequest {
            prev_kv: true,
            ..put_req("a", "2")
        })
        .unwrap();
    assert_eq!(p.header.unwrap().revision, 3);
    assert_eq!(p.prev_kv, Some(kv("a", "1", 2, 2, 1)));
    let r = h.get(rr("a", "")).unwrap();
    assert_eq!(r.kvs, vec![kv("a", "2", 2, 3, 2)]);
    // prev_kv of a new key is absent.
    let p = h
        .put_req(pb::PutRequest {
            prev_kv: true,
            ..put_req("b", "x")
        })
        .unwrap();
    assert_eq!(p.prev_kv, None);
    // Delete resets version and creation.
    h.del("a", "").unwrap();
    h.put("a", "3");
    assert_eq!(h.get(rr("a", "")).unwrap().kvs, vec![kv("a", "3", 6, 6, 1)]);
}

#[test]
fn ignore_value_and_lease_errors_write_nothing() {
    let mut h = H::new();
    let before = h.be.dump();
    let e = h.put_req(pb::PutRequest {
        key: "a".into(),
        ignore_value: true,
        ..Default::default()
    });
    assert_eq!(e, Err(Error::KeyNotFound));
    let e = h.put_req(pb::PutRequest {
        key: "a".into(),
        ignore_lease: true,
        ..Default::default()
    });
    assert_eq!(e, Err(Error::KeyNotFound));
    let e = h.put_req(pb::PutRequest {
        lease: 42,
        ..put_req("a", "v")
    });
    assert_eq!(e, Err(Error::LeaseNotFound));
    // Lease is checked before the key: etcd's order.
    let e = h.put_req(pb::PutRequest {
        key: "a".into(),
        lease: 42,
        ignore_value: true,
        ..Default::default()
    });
    assert_eq!(e, Err(Error::LeaseNotFound));
    // Validation errors at apply too.
    assert_eq!(h.put_req(put_req("", "v")), Err(Error::EmptyKey));
    assert_eq!(
        h.put_req(pb::PutRequest {
            ignore_value: true,
            ..put_req("a", "v")
        }),
        Err(Error::ValueProvided)
    );
    let after = h.be.dump();
    let changed: Vec<_> = after.iter().filter(|e| !before.contains(e)).collect();
    assert_eq!(
        changed.len(),
        1,
        "only the applied index changed: {changed:?}"
    );
    assert_eq!(changed[0].0, Bucket::Meta);
    assert_eq!(h.sm.current_revision(), 1);

    h.put("a", "1");
    let p = h
        .put_req(pb::PutRequest {
            key: "a".into(),
            ignore_value: true,
            prev_kv: true,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(p.prev_kv.unwrap().value, &b"1"[..]);
    assert_eq!(h.get(rr("a", "")).unwrap().kvs, vec![kv("a", "1", 2, 3, 2)]);
}

#[test]
fn delete_ranges() {
    let mut h = H::new();
    for k in ["a", "b", "c", "d"] {
        h.put(k, k);
    }
    // Deleting nothing does not bump the revision.
    let d = h.del("x", "").unwrap();
    assert_eq!((d.deleted, d.header.unwrap().revision), (0, 5));
    assert_eq!(h.sm.current_revision(), 5);
    let d = h.del("b", "d").unwrap();
    assert_eq!((d.deleted, d.header.unwrap().revision), (2, 6));
    assert_eq!(d.prev_kvs.len(), 2);
    assert_eq!(h.keys(rr("a", "\0")), vec!["a", "d"]);
    // From-key delete.
    let d = h.del("b", "\0").unwrap();
    assert_eq!(d.deleted, 1);
    assert_eq!(h.keys(rr("a", "\0")), vec!["a"]);
    // An inverted range deletes nothing.
    assert_eq!(h.del("z", "a").unwrap().deleted, 0);
    // History is still readable.
    assert_eq!(
        h.keys(pb::RangeRequest {
            revision: 5,
            ..rr("a", "\0")
        }),
        vec!["a", "b", "c", "d"]
    );
}

#[test]
fn range_options() {
    let mut h = H::new();
    for (k, v) in [("a", "3"), ("b", "1"), ("c", "2"), ("d", "0")] {
        h.put(k, v);
    }
    h.put("b", "1"); // b: version 2, mod 6
                     // limit + more + count
    let r = h
        .get(pb::RangeRequest {
            limit: 2,
            ..rr("a", "\0")
        })
        .unwrap();
    assert_eq!((r.kvs.len(), r.more, r.count), (2, true, 4));
    let r = h
        .get(pb::RangeRequest {
            limit: 4,
            ..rr("a", "\0")
        })
        .unwrap();
    assert_eq!((r.kvs.len(), r.more, r.count), (4, false, 4));
    let r = h
        .get(pb::RangeRequest {
            limit: -1,
            ..rr("a", "\0")
        })
        .unwrap();
    assert_eq!((r.kvs.len(), r.more), (4, false));
    // count_only, keys_only
    let r = h
        .get(pb::RangeRequest {
            count_only: true,
            ..rr("a", "c")
        })
        .unwrap();
    assert_eq!((r.kvs.len(), r.count, r.more), (0, 2, false));
    let r = h
        .get(pb::RangeRequest {
            keys_only: true,
            ..rr("a", "")
        })
        .unwrap();
    assert!(r.kvs[0].value.is_empty());
    assert_eq!(r.kvs[0].version, 1);
    // Filters prune kvs but not the count (etcd counts before filtering).
    let r = h
        .get(pb::RangeRequest {
            min_mod_revision: 4,
            ..rr("a", "\0")
        })
        .unwrap();
    assert_eq!(
        r.kvs.iter().map(|k| k.key.clone()).collect::<Vec<_>>(),
        vec![b"b".to_vec(), b"c".to_vec(), b"d".to_vec()]
    );
    assert_eq!(r.count, 4);
    let r = h
        .get(pb::RangeRequest {
            max_create_revision: 3,
            ..rr("a", "\0")
        })
        .unwrap();
    assert_eq!(r.kvs.len(), 2);
    let r = h
        .get(pb::RangeRequest {
            max_mod_revision: 5,
            min_create_revision: 3,
            ..rr("a", "\0")
        })
        .unwrap();
    assert_eq!(
        r.kvs.iter().map(|k| k.key.clone()).collect::<Vec<_>>(),
        vec![b"c".to_vec(), b"d".to_vec()]
    );
    // Sort by value with a limit: sorted over everything, then cut.
    let r = h
        .get(pb::RangeRequest {
            sort_order: 1,
            sort_target: 4,
            limit: 2,
            ..rr("a", "\0")
        })
        .unwrap();
    assert_eq!(
        r.kvs.iter().map(|k| k.value.clone()).collect::<Vec<_>>(),
        vec![b"0".to_vec(), b"1".to_vec()]
    );
    assert!(r.more);
    // A non-key target with order NONE sorts ascending, but (etcd quirk) over only the
    // first limit+1 keys fetched in key order.
    let r = h
        .get(pb::RangeRequest {
            sort_target: 4,
            limit: 2,
            ..rr("a", "\0")
        })
        .unwrap();
    assert_eq!(
        r.kvs.iter().map(|k| k.value.clone()).collect::<Vec<_>>(),
        vec![b"1".to_vec(), b"2".to_vec()]
    );
    // Historical, compacted, future.
    let r = h
        .get(pb::RangeRequest {
            revision: 2,
            ..rr("a", "\0")
        })
        .unwrap();
    assert_eq!((r.kvs.len(), r.header.unwrap().revision), (1, 6));
    assert_eq!(
        h.get(pb::RangeRequest {
            revision: 7,
            ..rr("a", "")
        }),
        Err(Error::FutureRevision)
    );
    h.compact(3).unwrap();
    assert_eq!(
        h.get(pb::RangeRequest {
            revision: 2,
            ..rr("a", "")
        }),
        Err(Error::Compacted)
    );
    assert_eq!(
        h.get(pb::RangeRequest {
            revision: 3,
            ..rr("a", "\0")
        })
        .unwrap()
        .kvs
        .len(),
        2
    );
    // Validation.
    assert_eq!(h.get(rr("", "")), Err(Error::EmptyKey));
    assert_eq!(
        h.get(pb::RangeRequest {
            sort_order: 9,
            ..rr("a", "")
        }),
        Err(Error::InvalidSortOption)
    );
}

#[test]
fn txn_semantics() {
    let mut h = H::new();
    h.put("a", "1"); // rev 2
    use CompareResult::*;
    use CompareTarget::*;
    // Compare success with writes and reads: per-op headers as etcd fills them.
    let t = pb::TxnRequest {
        compare: vec![cmp("a", Equal, Value, TargetUnion::Value(b"1".to_vec()))],
        success: vec![
            op_get("a"),
            op_del("zz", ""),
            op_put("b", "2"),
            op_get("b"),
            op_del("zz", ""),
        ],
        failure: vec![],
    };
    let r = h.txn(t).unwrap();
    assert!(r.succeeded);
    assert_eq!(r.header.unwrap().revision, 3);
    let revs: Vec<i64> = r
        .responses
        .iter()
        .map(|op| match op.response.as_ref().unwrap() {
            OpResp::ResponseRange(x) => x.header.unwrap().revision,
            OpResp::ResponsePut(x) => x.header.unwrap().revision,
            OpResp::ResponseDeleteRange(x) => x.header.unwrap().revision,
            OpResp::ResponseTxn(x) => x.header.unwrap().revision,
        })
        .collect();
    assert_eq!(revs, vec![2, 2, 3, 3, 3]);
    // The range after the put saw the put.
    match r.responses[3].response.as_ref().unwrap() {
        OpResp::ResponseRange(x) => assert_eq!(x.kvs, vec![kv("b", "2", 3, 3, 1)]),
        other => panic!("{other:?}"),
    }

    // Failing compare runs failure; a txn that changes nothing keeps the revision.
    let t = pb::TxnRequest {
        compare: vec![cmp("a", Greater, Version, TargetUnion::Version(5))],
        success: vec![op_put("x", "y")],
        failure: vec![op_del("nothing", "")],
    };
    let r = h.txn(t).unwrap();
    assert!(!r.succeeded);
    assert_eq!(r.header.unwrap().revision, 3);
    assert_eq!(h.sm.current_revision(), 3);

    // Compare over a range: every key must hold. VALUE on no key fails; others compare 0.
    let all = |c: pb::Compare, h: &mut H| {
        h.txn(pb::TxnRequest {
            compare: vec![c],
            success: vec![],
            failure: vec![],
        })
        .unwrap()
        .succeeded
    };
    let mut c = cmp("a", Greater, Create, TargetUnion::CreateRevision(1));
    c.range_end = b"c".to_vec();
    assert!(all(c.clone(), &mut h));
    c.target_union = Some(TargetUnion::CreateRevision(2));
    assert!(!all(c, &mut h));
    assert!(!all(
        cmp("nokey", NotEqual, Value, TargetUnion::Value(b"x".to_vec())),
        &mut h
    ));
    assert!(all(
        cmp("nokey", Equal, Version, TargetUnion::Version(0)),
        &mut h
    ));
    assert!(all(
        cmp("nokey", Equal, Mod, TargetUnion::ModRevision(0)),
        &mut h
    ));
    assert!(all(
        cmp("a", Less, Mod, TargetUnion::ModRevision(3)),
        &mut h
    ));
    assert!(all(cmp("a", Equal, Lease, TargetUnion::Lease(0)), &mut h));
    // A target union of the wrong kind compares against zero.
    assert!(all(
        cmp("a", Greater, Mod, TargetUnion::Version(100)),
        &mut h
    ));

    // Nested txn: its compare sees the state before the outer txn wrote anything; its
    // response header is empty.
    let inner = pb::TxnRequest {
        compare: vec![cmp("c", Equal, Version, TargetUnion::Version(0))],
        success: vec![op_put("d", "from-inner")],
        failure: vec![op_put("d", "from-inner-failure")],
    };
    let t = pb::TxnRequest {
        compare: vec![],
        success: vec![op_put("c", "1"), op_txn(inner)],
        failure: vec![],
    };
    let r = h.txn(t).unwrap();
    assert_eq!(r.header.unwrap().revision, 4);
    match r.responses[1].response.as_ref().unwrap() {
        OpResp::ResponseTxn(x) => {
            assert!(x.succeeded);
            assert_eq!(x.header, Some(pb::ResponseHeader::default()));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        h.get(rr("d", "")).unwrap().kvs,
        vec![kv("d", "from-inner", 4, 4, 1)]
    );

    // Read-only txns go through read_txn without bumping anything.
    let t = pb::TxnRequest {
        compare: vec![],
        success: vec![op_get("a")],
        failure: vec![],
    };
    let r = h.sm.read_txn(&t).unwrap();
    assert_eq!(r.header.unwrap().revision, 4);
    assert!(h
        .sm
        .read_txn(&pb::TxnRequest {
            success: vec![op_put("a", "b")],
            ..Default::default()
        })
        .is_err());
}

#[test]
fn txn_errors_write_nothing() {
    let mut h = H::new();
    h.put("a", "1");
    h.put("k", "v");
    let before = h.be.dump();
    // Duplicate key.
    let t = pb::TxnRequest {
        compare: vec![],
        success: vec![op_put("x", "1"), op_put("x", "2")],
        failure: vec![],
    };
    assert_eq!(h.txn(t), Err(Error::DuplicateKey));
    // ignore_value on a missing key, checked before any write.
    let put_ignore = |k: &str| pb::RequestOp {
        request: Some(Op::RequestPut(pb::PutRequest {
            key: k.into(),
            ignore_value: true,
            ..Default::default()
        })),
    };
    let t = pb::TxnRequest {
        compare: vec![],
        success: vec![op_put("x", "1"), put_ignore("missing")],
        failure: vec![],
    };
    assert_eq!(h.txn(t), Err(Error::KeyNotFound));
    // Future revision in a range.
    let t = pb::TxnRequest {
        compare: vec![],
        success: vec![
            op_put("x", "1"),
            pb::RequestOp {
                request: Some(Op::RequestRange(pb::RangeRequest {
                    revision: 99,
                    ..rr("a", "")
                })),
            },
        ],
        failure: vec![],
    };
    assert_eq!(h.txn(t), Err(Error::FutureRevision));
    // etcd quirk: a from-key delete does not conflict with a put in validation, so this
    // passes the checks, deletes "k", then finds it missing for ignore_value. etcd panics
    // here; we fail the request and roll the delete back.
    let t = pb::TxnRequest {
        compare: vec![],
        success: vec![op_del("j", "\0"), put_ignore("k")],
        failure: vec![],
    };
    assert_eq!(h.txn(t), Err(Error::KeyNotFound));
    let after = h.be.dump();
    let changed: Vec<_> = after.iter().filter(|e| !before.contains(e)).collect();
    assert_eq!(
        changed.len(),
        1,
        "only the applied index changed: {changed:?}"
    );
    assert_eq!(h.sm.current_revision(), 3);
    assert_eq!(h.keys(rr("a", "\0")), vec!["a", "k"]);
    // The index was rolled back too: the next write carries on normally.
    h.put("k", "w");
    assert_eq!(h.get(rr("k", "")).unwrap().kvs, vec![kv("k", "w", 3, 4, 2)]);
    let h2 = open(&h.be);
    assert_eq!(h2.get_all(), h.get(rr("a", "\0")).unwrap().kvs);
}

trait GetAll {
    fn get_all(&self) -> Vec<mvccpb::KeyValue>;
}
impl GetAll for StateMachine {
    fn get_all(&self) -> Vec<mvccpb::KeyValue> {
        self.range(&rr("\0", "\0")).unwrap().kvs
    }
}

#[test]
fn compaction() {
    let mut h = H::new();
    h.put("a", "1"); // 2
    h.put("a", "2"); // 3
    h.put("b", "1"); // 4
    h.del("b", "").unwrap(); // 5
    h.put("c", "1"); // 6
    assert_eq!(h.compact(7), Err(Error::FutureRevision));
    assert_eq!(h.compact(-3), Err(Error::Compacted));
    h.compact(5).unwrap();
    assert_eq!(h.sm.compacted_revision(), 5);
    assert_eq!(h.compact(5), Err(Error::Compacted));
    assert_eq!(h.compact(4), Err(Error::Compacted));
    // Revision 2 of "a" is gone from the backend; 3 stays; b's tombstone at 5 stays.
    let keys: Vec<Vec<u8>> =
        h.be.dump()
            .into_iter()
            .filter(|e| e.0 == Bucket::Key)
            .map(|e| e.1)
            .collect();
    assert_eq!(keys.len(), 3, "{keys:?}");
    assert_eq!(
        h.keys(pb::RangeRequest {
            revision: 5,
            ..rr("a", "\0")
        }),
        vec!["a"]
    );
    assert_eq!(
        h.get(pb::RangeRequest {
            revision: 4,
            ..rr("a", "")
        }),
        Err(Error::Compacted)
    );
    // Versions survive compaction.
    h.put("a", "3");
    assert_eq!(h.get(rr("a", "")).unwrap().kvs, vec![kv("a", "3", 2, 7, 3)]);
    // Compacting above the tombstone drops it.
    h.compact(6).unwrap();
    let keys: Vec<Vec<u8>> =
        h.be.dump()
            .into_iter()
            .filter(|e| e.0 == Bucket::Key)
            .map(|e| e.1)
            .collect();
    assert_eq!(keys.len(), 3, "a@3, c@6, a@7: {keys:?}");
    // Compaction at the current revision when the last write was a delete: the revision
    // must survive a restart.
    h.del("c", "").unwrap(); // 8
    h.del("a", "").unwrap(); // 9
    h.compact(9).unwrap();
    h.compact_reopen_check();
    // Compaction response header.
    let a = h.apply(Request::Compaction(pb::CompactionRequest {
        revision: 0,
        physical: false,
    }));
    assert_eq!(a.result, Err(Error::Compacted));
}

impl H {
    fn compact_reopen_check(&mut self) {
        let sm2 = open(&self.be);
        assert_eq!(sm2.current_revision(), self.sm.current_revision());
        assert_eq!(sm2.compacted_revision(), self.sm.compacted_revision());
        assert_eq!(sm2.hash_kv(0), self.sm.hash_kv(0));
    }
}

#[test]
fn compaction_keeps_a_key_recreated_in_the_revision_of_its_delete() {
    // A from-key delete and a put of the same key pass etcd's duplicate check, so one
    // revision can hold both a key's tombstone and its re-creation. etcd's compaction at
    // that revision keeps the tombstone and drops the live value; we keep the value.
    let mut h = H::new();
    h.put("abc", "1"); // 2
    h.put("a", "1"); // 3
    let t = pb::TxnRequest {
        compare: vec![],
        success: vec![op_del("a", "\0"), op_put("abc", "2")],
        failure: vec![],
    };
    h.txn(t).unwrap(); // 4
    assert_eq!(
        h.get(rr("abc", "")).unwrap().kvs,
        vec![kv("abc", "2", 4, 4, 1)]
    );
    h.compact(4).unwrap();
    assert_eq!(
        h.get(rr("abc", "")).unwrap().kvs,
        vec![kv("abc", "2", 4, 4, 1)]
    );
    h.compact_reopen_check();
    h.put("z", "1");
    h.compact(5).unwrap();
    assert_eq!(h.keys(rr("a", "\0")), vec!["abc", "z"]);
}

#[test]
fn compaction_at_zero_is_accepted_once() {
    // etcd starts with compacted revision -1, so revision 0 compacts once.
    let mut h = H::new();
    h.compact(0).unwrap();
    assert_eq!(h.compact(0), Err(Error::Compacted));
    assert_eq!(h.sm.hash_kv(0).unwrap().compact_revision, 0);
}

#[test]
fn events() {
    let mut h = H::new();
    let a = h.apply(Request::Put(put_req("a", "1")));
    assert_eq!(
        a.events,
        vec![mvccpb::Event {
            r#type: 0,
            kv: Some(kv("a", "1", 2, 2, 1)),
            prev_kv: None
        }]
    );
    let a = h.apply(Request::Put(put_req("a", "2")));
    assert_eq!(a.events[0].prev_kv, Some(kv("a", "1", 2, 2, 1)));
    let t = pb::TxnRequest {
        compare: vec![],
        success: vec![op_del("a", ""), op_put("b", "x")],
        failure: vec![],
    };
    let a = h.apply(Request::Txn(t));
    assert_eq!(a.events.len(), 2);
    assert_eq!(a.events[0].r#type, mvccpb::event::EventType::Delete as i32);
    assert_eq!(
        a.events[0].kv,
        Some(mvccpb::KeyValue {
            key: b"a".to_vec().into(),
            mod_revision: 4,
            ..Default::default()
        })
    );
    assert_eq!(a.events[0].prev_kv, Some(kv("a", "2", 2, 3, 2)));
    assert_eq!(a.events[1].kv, Some(kv("b", "x", 4, 4, 1)));
    // Failed and read-only entries produce none.
    assert!(h.apply(Request::Put(put_req("", "x"))).events.is_empty());
    assert!(h.apply(Request::Range(rr("a", ""))).events.is_empty());
}

#[test]
fn apply_is_idempotent_and_envelope_kinds() {
    let mut h = H::new();
    h.put("a", "1");
    let again = h.sm.apply(1, &env(Request::Put(put_req("a", "2"))));
    assert!(matches!(
        again.result,
        Err(Error::AlreadyApplied {
            index: 1,
            applied: 1
        })
    ));
    assert_eq!(h.sm.current_revision(), 2);
    // Gaps are allowed (non-request log entries).
    let a = h.sm.apply(5, &env(Request::Put(put_req("a", "2"))));
    assert!(a.result.is_ok());
    assert_eq!(h.sm.applied_index(), 5);
    h.idx = 5;
    // No request set.
    let a = h.sm.apply(6, &Default::default());
    assert!(matches!(a.result, Err(Error::MalformedRequest(_))));
    assert_eq!(h.sm.applied_index(), 6);
    h.idx = 6;
    // Later kinds are refused loudly.
    // A grant without an ID is etcd's NoLease: not found.
    let a = h.apply(Request::LeaseGrant(Default::default()));
    assert_eq!(a.result, Err(Error::LeaseNotFound));
    let a = h.apply(Request::AuthEnable(Default::default()));
    assert!(matches!(a.result, Err(Error::Unimplemented(_))));
    // A range through the log.
    let a = h.apply(Request::Range(rr("a", "")));
    match a.result.unwrap() {
        ApplyResponse::Range(r) => assert_eq!(r.kvs[0].value, &b"2"[..]),
        other => panic!("{other:?}"),
    }
    // Reopen: applied index and state persisted.
    let sm2 = open(&h.be);
    assert_eq!(sm2.applied_index(), h.sm.applied_index());
    assert_eq!(sm2.current_revision(), 3);
}

#[test]
fn hash_is_engine_independent_and_ignores_applied_index() {
    let mut a = H::new();
    let mut b = H::new();
    a.put("x", "1");
    b.put("x", "1");
    assert_eq!(a.sm.hash().unwrap(), b.sm.hash().unwrap());
    // A failed entry moves only the applied index, which the hash leaves out.
    b.put_req(put_req("", "")).unwrap_err();
    assert_eq!(a.sm.hash().unwrap(), b.sm.hash().unwrap());
    b.put("x", "2");
    assert_ne!(a.sm.hash().unwrap(), b.sm.hash().unwrap());
}

#[test]
fn corrupt_store_is_an_error_not_a_panic() {
    let be = Shared::default();
    let mut batch = metastore_core::WriteBatch::new();
    batch.put(Bucket::Key, b"garbage".to_vec(), b"x".to_vec());
    metastore_core::Backend::write(&*be.0, batch).unwrap();
    assert!(matches!(
        StateMachine::open(Box::new(be.0), Default::default()),
        Err(Error::Corrupt(_))
    ));
    let be = Shared::default();
    let mut batch = metastore_core::WriteBatch::new();
    batch.put(Bucket::Meta, b"consistent_index".to_vec(), b"x".to_vec());
    metastore_core::Backend::write(&*be.0, batch).unwrap();
    assert!(matches!(
        StateMachine::open(Box::new(be.0), Default::default()),
        Err(Error::Corrupt(_))
    ));
    let be = Shared::default();
    let mut batch = metastore_core::WriteBatch::new();
    batch.put(
        Bucket::Key,
        metastore_core::revision::Revision::new(2, 0).to_bytes(false),
        vec![0xff; 4],
    );
    metastore_core::Backend::write(&*be.0, batch).unwrap();
    assert!(matches!(
        StateMachine::open(Box::new(be.0), Default::default()),
        Err(Error::Corrupt(_))
    ));
}
