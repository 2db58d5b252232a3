//! Pure checks of KV requests, made before a request is proposed (etcd's v3rpc
//! `checkRangeRequest`, `checkPutRequest`, `checkDeleteRequest`, `checkTxnRequest` and
//! `checkIntervals`).
//!
//! Owns every rule about what a KV request may contain. It must never look at the key
//! space (those checks — unknown lease, missing key for `ignore_value`, compacted range
//! revision — happen at apply, against the state of the moment) and never depend on
//! anything but the request and the limit it is given.
//!
//! The range sort-option check is etcd 3.6's (etcd 3.5 lets an unknown sort target
//! through to the apply path, where it would panic).

use std::collections::HashSet;

use metastore_proto::etcdserverpb as pb;
use pb::request_op::Request;

use crate::error::{Error, Result};

pub fn range(r: &pb::RangeRequest) -> Result<()> {
    if r.key.is_empty() {
        return Err(Error::EmptyKey);
    }
    if pb::range_request::SortOrder::try_from(r.sort_order).is_err() {
        return Err(Error::InvalidSortOption);
    }
    if pb::range_request::SortTarget::try_from(r.sort_target).is_err() {
        return Err(Error::InvalidSortOption);
    }
    Ok(())
}

pub fn put(r: &pb::PutRequest) -> Result<()> {
    if r.key.is_empty() {
        return Err(Error::EmptyKey);
    }
    if r.ignore_value && !r.value.is_empty() {
        return Err(Error::ValueProvided);
    }
    if r.ignore_lease && r.lease != 0 {
        return Err(Error::LeaseProvided);
    }
    Ok(())
}

pub fn delete_range(r: &pb::DeleteRangeRequest) -> Result<()> {
    if r.key.is_empty() {
        return Err(Error::EmptyKey);
    }
    Ok(())
}

/// Checks a transaction: operation counts, empty keys and empty operations at every
/// nesting level, then that no two writes of one branch touch the same key.
///
/// `max_txn_ops` bounds each of compare/success/failure; a nested transaction gets what
/// its parent's longest list left over (etcd's rule, so nesting cannot multiply the limit).
pub fn txn(r: &pb::TxnRequest, max_txn_ops: usize) -> Result<()> {
    check_txn_request(r, max_txn_ops)?;
    // Overlap checks come after the cheap checks, so a huge request is refused for its
    // size before the quadratic work.
    check_intervals(&r.success)?;
    check_intervals(&r.failure)?;
    Ok(())
}

/// Whether etcd serves this transaction without a log entry (etcd's `isTxnReadonly`):
/// every operation of both branches is a Range. A nested transaction counts as a write
/// even if it only reads, exactly as in etcd.
pub fn is_txn_read_only(r: &pb::TxnRequest) -> bool {
    r.success
        .iter()
        .chain(r.failure.iter())
        .all(|op| matches!(op.request, Some(Request::RequestRange(_))))
}

fn check_txn_request(r: &pb::TxnRequest, max_txn_ops: usize) -> Result<()> {
    let opc = r.compare.len().max(r.success.len()).max(r.failure.len());
    if opc > max_txn_ops {
        return Err(Error::TooManyOps);
    }
    if r.compare.iter().any(|c| c.key.is_empty()) {
        return Err(Error::EmptyKey);
    }
    let left = max_txn_ops - opc;
    for op in r.success.iter().chain(r.failure.iter()) {
        check_request_op(op, left)?;
    }
    Ok(())
}

fn check_request_op(op: &pb::RequestOp, max_txn_ops: usize) -> Result<()> {
    match &op.request {
        Some(Request::RequestRange(r)) => range(r),
        Some(Request::RequestPut(r)) => put(r),
        Some(Request::RequestDeleteRange(r)) => delete_range(r),
        Some(Request::RequestTxn(t)) => check_txn_request(t, max_txn_ops),
        // etcd answers an empty operation with "key not found".
        None => Err(Error::KeyNotFound),
    }
}

/// A deleted interval `[begin, end)`; a single-key delete is `[key, key + "\0")`.
struct Interval {
    begin: Vec<u8>,
    end: Vec<u8>,
}

impl Interval {
    fn of(d: &pb::DeleteRangeRequest) -> Self {
        let end = if d.range_end.is_empty() {
            let mut e = d.key.clone();
            e.push(0);
            e
        } else {
            d.range_end.clone()
        };
        Interval {
            begin: d.key.clone(),
            end,
        }
    }

    /// Whether the interval holds `key`. The range end is taken literally: a from-key
    /// delete (`range_end = "\0"`) is the interval `[key, "\0")`, which holds nothing, so
    /// etcd lets it share a transaction with puts it will in fact delete; we keep that.
    fn contains(&self, key: &[u8]) -> bool {
        self.begin.as_slice() <= key && key < self.end.as_slice()
    }
}

fn intersects(dels: &[Interval], key: &[u8]) -> bool {
    dels.iter().any(|iv| iv.contains(key))
}

/// etcd's `checkIntervals`: the keys put and the intervals deleted by a list of
/// operations (nested transactions included), or `DuplicateKey` when a put meets another
/// put or a delete of the same list. The two branches of a nested transaction may put the
/// same key, since only one of them runs.
fn check_intervals(reqs: &[pb::RequestOp]) -> Result<(HashSet<Vec<u8>>, Vec<Interval>)> {
    let mut dels: Vec<Interval> = reqs
        .iter()
        .filter_map(|op| match &op.request {
            Some(Request::RequestDeleteRange(d)) => Some(Interval::of(d)),
            _ => None,
        })
        .collect();

    let mut puts: HashSet<Vec<u8>> = HashSet::new();
    for op in reqs {
        let Some(Request::RequestTxn(t)) = &op.request else {
            continue;
        };
        let (puts_then, dels_then) = check_intervals(&t.success)?;
        let (puts_else, dels_else) = check_intervals(&t.failure)?;
        for k in &puts_then {
            if puts.contains(k) || intersects(&dels, k) {
                return Err(Error::DuplicateKey);
            }
            puts.insert(k.clone());
        }
        for k in &puts_else {
            if puts.contains(k) && !puts_then.contains(k) {
                return Err(Error::DuplicateKey);
            }
            if intersects(&dels, k) {
                return Err(Error::DuplicateKey);
            }
            puts.insert(k.clone());
        }
        dels.extend(dels_then);
        dels.extend(dels_else);
    }

    for op in reqs {
        let Some(Request::RequestPut(p)) = &op.request else {
            continue;
        };
        if puts.contains(&p.key) || intersects(&dels, &p.key) {
            return Err(Error::DuplicateKey);
        }
        puts.insert(p.key.clone());
    }
    Ok((puts, dels))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put_op(k: &str) -> pb::RequestOp {
        pb::RequestOp {
            request: Some(Request::RequestPut(pb::PutRequest {
                key: k.into(),
                ..Default::default()
            })),
        }
    }
    fn del_op(k: &str, end: &str) -> pb::RequestOp {
        pb::RequestOp {
            request: Some(Request::RequestDeleteRange(pb::DeleteRangeRequest {
                key: k.into(),
                range_end: end.into(),
                ..Default::default()
            })),
        }
    }
    fn range_op(k: &str) -> pb::RequestOp {
        pb::RequestOp {
            request: Some(Request::RequestRange(pb::RangeRequest {
                key: k.into(),
                ..Default::default()
            })),
        }
    }
    fn txn_op(success: Vec<pb::RequestOp>, failure: Vec<pb::RequestOp>) -> pb::RequestOp {
        pb::RequestOp {
            request: Some(Request::RequestTxn(pb::TxnRequest {
                compare: vec![],
                success,
                failure,
            })),
        }
    }
    fn txn(success: Vec<pb::RequestOp>) -> pb::TxnRequest {
        pb::TxnRequest {
            compare: vec![],
            success,
            failure: vec![],
        }
    }

    #[test]
    fn simple_requests() {
        assert_eq!(range(&pb::RangeRequest::default()), Err(Error::EmptyKey));
        let mut r = pb::RangeRequest {
            key: b"a".to_vec(),
            sort_order: 3,
            ..Default::default()
        };
        assert_eq!(range(&r), Err(Error::InvalidSortOption));
        r.sort_order = 2;
        r.sort_target = 5;
        assert_eq!(range(&r), Err(Error::InvalidSortOption));
        r.sort_target = 4;
        assert_eq!(range(&r), Ok(()));

        let mut p = pb::PutRequest {
            key: b"a".to_vec(),
            value: b"v".to_vec(),
            ignore_value: true,
            ..Default::default()
        };
        assert_eq!(put(&p), Err(Error::ValueProvided));
        p.value.clear();
        p.ignore_lease = true;
        p.lease = 5;
        assert_eq!(put(&p), Err(Error::LeaseProvided));
        p.key.clear();
        assert_eq!(put(&p), Err(Error::EmptyKey));
        assert_eq!(
            delete_range(&pb::DeleteRangeRequest::default()),
            Err(Error::EmptyKey)
        );
    }

    #[test]
    fn op_counts_and_nesting_budget() {
        let t = txn((0..3).map(|i| put_op(&format!("k{i}"))).collect());
        assert_eq!(super::txn(&t, 3), Ok(()));
        assert_eq!(super::txn(&t, 2), Err(Error::TooManyOps));
        // The nested txn gets 3 - 2 = 1 op of budget.
        let t = txn(vec![
            put_op("a"),
            txn_op(vec![put_op("b"), put_op("c")], vec![]),
        ]);
        assert_eq!(super::txn(&t, 3), Err(Error::TooManyOps));
        assert_eq!(super::txn(&t, 4), Ok(()));
        // Empty op, empty compare key, empty key inside nested ops.
        let t = txn(vec![pb::RequestOp { request: None }]);
        assert_eq!(super::txn(&t, 128), Err(Error::KeyNotFound));
        let mut t = txn(vec![]);
        t.compare.push(pb::Compare::default());
        assert_eq!(super::txn(&t, 128), Err(Error::EmptyKey));
        let t = txn(vec![txn_op(vec![], vec![range_op("")])]);
        assert_eq!(super::txn(&t, 128), Err(Error::EmptyKey));
    }

    #[test]
    fn duplicate_keys() {
        let dup = |ops| super::txn(&txn(ops), 128);
        assert_eq!(
            dup(vec![put_op("a"), put_op("a")]),
            Err(Error::DuplicateKey)
        );
        assert_eq!(dup(vec![put_op("a"), put_op("b")]), Ok(()));
        assert_eq!(
            dup(vec![put_op("b"), del_op("a", "c")]),
            Err(Error::DuplicateKey)
        );
        assert_eq!(dup(vec![put_op("c"), del_op("a", "c")]), Ok(()));
        assert_eq!(
            dup(vec![put_op("a"), del_op("a", "")]),
            Err(Error::DuplicateKey)
        );
        // Deletes may overlap each other; ranges never conflict.
        assert_eq!(
            dup(vec![del_op("a", "c"), del_op("b", "d"), range_op("b")]),
            Ok(())
        );
        // A from-key delete never conflicts (etcd quirk).
        assert_eq!(dup(vec![put_op("b"), del_op("a", "\0")]), Ok(()));
        // Nested: then/else may put the same key; the parent may not.
        assert_eq!(
            dup(vec![txn_op(vec![put_op("a")], vec![put_op("a")])]),
            Ok(())
        );
        assert_eq!(
            dup(vec![put_op("a"), txn_op(vec![put_op("a")], vec![])]),
            Err(Error::DuplicateKey)
        );
        assert_eq!(
            dup(vec![del_op("a", ""), txn_op(vec![], vec![put_op("a")])]),
            Err(Error::DuplicateKey)
        );
        assert_eq!(
            dup(vec![put_op("a"), txn_op(vec![del_op("a", "b")], vec![])]),
            Err(Error::DuplicateKey)
        );
        assert_eq!(
            dup(vec![
                txn_op(vec![put_op("a")], vec![]),
                txn_op(vec![put_op("a")], vec![])
            ]),
            Err(Error::DuplicateKey)
        );
        // etcd checks a nested put only against deletes seen before it: a later sibling's
        // delete of the same key passes.
        assert_eq!(
            dup(vec![
                txn_op(vec![put_op("a")], vec![]),
                txn_op(vec![del_op("a", "")], vec![])
            ]),
            Ok(())
        );
        assert_eq!(
            dup(vec![
                txn_op(vec![del_op("a", "")], vec![]),
                txn_op(vec![put_op("a")], vec![])
            ]),
            Err(Error::DuplicateKey)
        );
        // The failure branch is checked on its own.
        let mut t = txn(vec![put_op("a")]);
        t.failure = vec![put_op("x"), put_op("x")];
        assert_eq!(super::txn(&t, 128), Err(Error::DuplicateKey));
    }

    #[test]
    fn read_only_detection() {
        assert!(is_txn_read_only(&txn(vec![range_op("a")])));
        assert!(is_txn_read_only(&txn(vec![])));
        assert!(!is_txn_read_only(&txn(vec![put_op("a")])));
        assert!(!is_txn_read_only(&txn(vec![txn_op(
            vec![range_op("a")],
            vec![]
        )])));
        assert!(!is_txn_read_only(&txn(vec![pb::RequestOp {
            request: None
        }])));
    }
}
