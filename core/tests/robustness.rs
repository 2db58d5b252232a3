//! Bad input never panics: arbitrary requests (any field values, unknown enum numbers,
//! empty and odd keys, nested transactions, extreme revisions and limits) and arbitrary
//! bytes decoded as envelopes are applied and read; each entry either answers or fails
//! with an error, the applied index always advances, and the store re-opens to the same
//! state.

mod common;

use common::{env, open, Shared};
use metastore_core::proto::etcdserverpb as pb;
use metastore_core::proto::metastore::internal_request::Request;
use metastore_core::proto::metastore::InternalRequest;
use pb::request_op::Request as Op;
use proptest::prelude::*;
use prost::Message;

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(vec![]),
        Just(vec![0]),
        Just(b"a".to_vec()),
        Just(b"b".to_vec()),
        Just(vec![0xff]),
        prop::collection::vec(any::<u8>(), 0..4),
    ]
}

fn int() -> impl Strategy<Value = i64> {
    prop_oneof![
        Just(0i64),
        Just(-1),
        Just(i64::MIN),
        Just(i64::MAX),
        -3i64..12,
        any::<i64>(),
    ]
}

fn enum_num() -> impl Strategy<Value = i32> {
    prop_oneof![0i32..6, any::<i32>()]
}

fn range() -> impl Strategy<Value = pb::RangeRequest> {
    (
        bytes(),
        bytes(),
        int(),
        int(),
        enum_num(),
        enum_num(),
        any::<[bool; 3]>(),
        [int(), int(), int(), int()],
    )
        .prop_map(
            |(key, range_end, limit, revision, so, st, flags, mm)| pb::RangeRequest {
                key,
                range_end,
                limit,
                revision,
                sort_order: so,
                sort_target: st,
                serializable: flags[0],
                keys_only: flags[1],
                count_only: flags[2],
                min_mod_revision: mm[0],
                max_mod_revision: mm[1],
                min_create_revision: mm[2],
                max_create_revision: mm[3],
            },
        )
}

fn put() -> impl Strategy<Value = pb::PutRequest> {
    (
        bytes(),
        bytes(),
        prop_oneof![Just(0i64), int()],
        any::<[bool; 3]>(),
    )
        .prop_map(|(key, value, lease, f)| pb::PutRequest {
            key,
            value,
            lease,
            prev_kv: f[0],
            ignore_value: f[1],
            ignore_lease: f[2],
        })
}

fn delete() -> impl Strategy<Value = pb::DeleteRangeRequest> {
    (bytes(), bytes(), any::<bool>()).prop_map(|(key, range_end, prev_kv)| pb::DeleteRangeRequest {
        key,
        range_end,
        prev_kv,
    })
}

fn compare() -> impl Strategy<Value = pb::Compare> {
    use pb::compare::TargetUnion;
    (
        bytes(),
        bytes(),
        enum_num(),
        enum_num(),
        int(),
        bytes(),
        0..6u8,
    )
        .prop_map(|(key, range_end, result, target, n, v, u)| {
            let target_union = match u {
                0 => None,
                1 => Some(TargetUnion::Version(n)),
                2 => Some(TargetUnion::CreateRevision(n)),
                3 => Some(TargetUnion::ModRevision(n)),
                4 => Some(TargetUnion::Value(v)),
                _ => Some(TargetUnion::Lease(n)),
            };
            pb::Compare {
                result,
                target,
                key,
                target_union,
                range_end,
            }
        })
}

fn txn() -> impl Strategy<Value = pb::TxnRequest> {
    let leaf = prop_oneof![
        range().prop_map(|r| pb::RequestOp {
            request: Some(Op::RequestRange(r))
        }),
        put().prop_map(|p| pb::RequestOp {
            request: Some(Op::RequestPut(p))
        }),
        delete().prop_map(|d| pb::RequestOp {
            request: Some(Op::RequestDeleteRange(d))
        }),
        Just(pb::RequestOp { request: None }),
    ];
    let ops = leaf.prop_recursive(3, 24, 4, |inner| {
        (
            prop::collection::vec(compare(), 0..3),
            prop::collection::vec(inner.clone(), 0..4),
            prop::collection::vec(inner, 0..3),
        )
            .prop_map(|(compare, success, failure)| pb::RequestOp {
                request: Some(Op::RequestTxn(pb::TxnRequest {
                    compare,
                    success,
                    failure,
                })),
            })
    });
    (
        prop::collection::vec(compare(), 0..3),
        prop::collection::vec(ops.clone(), 0..4),
        prop::collection::vec(ops, 0..3),
    )
        .prop_map(|(compare, success, failure)| pb::TxnRequest {
            compare,
            success,
            failure,
        })
}

fn request() -> impl Strategy<Value = InternalRequest> {
    prop_oneof![
        4 => put().prop_map(|p| env(Request::Put(p))),
        2 => delete().prop_map(|d| env(Request::DeleteRange(d))),
        3 => txn().prop_map(|t| env(Request::Txn(t))),
        1 => (int(), any::<bool>()).prop_map(|(revision, physical)| env(Request::Compaction(pb::CompactionRequest { revision, physical }))),
        2 => range().prop_map(|r| env(Request::Range(r))),
        1 => Just(InternalRequest::default()),
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(|b| InternalRequest::decode(b.as_slice()).unwrap_or_default()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_requests_never_panic(reqs in prop::collection::vec(request(), 1..30), reads in prop::collection::vec(range(), 0..6), txns in prop::collection::vec(txn(), 0..3)) {
        let be = Shared::default();
        let mut sm = open(&be);
        for (i, req) in reqs.iter().enumerate() {
            let index = i as u64 + 1;
            let a = sm.apply(index, req);
            prop_assert_eq!(a.index, index);
            prop_assert_eq!(sm.applied_index(), index);
            if a.result.is_err() {
                prop_assert!(a.events.is_empty());
            }
            if let Err(e) = &a.result {
                prop_assert!(!matches!(e, metastore_core::Error::Corrupt(_) | metastore_core::Error::Backend(_)), "{:?}", e);
            }
            for rev in [-1, 0, 1, sm.current_revision(), sm.current_revision() + 1] {
                let _ = sm.hash_kv(rev);
            }
        }
        for r in &reads {
            let _ = sm.range(r);
        }
        for t in &txns {
            let _ = metastore_core::validate::txn(t, 128);
            let _ = sm.read_txn(t);
        }
        let reopened = open(&be);
        prop_assert_eq!(reopened.current_revision(), sm.current_revision());
        prop_assert_eq!(reopened.hash_kv(0).unwrap(), sm.hash_kv(0).unwrap());
        prop_assert_eq!(reopened.hash().unwrap(), sm.hash().unwrap());
    }
}
