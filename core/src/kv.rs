//! What each KV request does, over a transaction of the key space (etcd's
//! `applierV3backend.Range/Put/DeleteRange/Txn` and the compare logic).
//!
//! Owns request semantics: range options (limit, sort, revision filters, count, keys
//! only), put flags (prev_kv, ignore_value, ignore_lease, lease), delete ranges, and
//! transactions (compares, branch choice, nested transactions, per-op response headers).
//! It never decides revisions or storage layout (that is `mvcc`) and never writes to the
//! backend. Every check that can fail runs before the first write, as in etcd, so a
//! failing request changes nothing.

use metastore_proto::etcdserverpb as pb;
use metastore_proto::mvccpb;
use pb::compare::{CompareResult, CompareTarget, TargetUnion};
use pb::range_request::{SortOrder, SortTarget};
use pb::request_op::Request;
use pb::response_op::Response;

use crate::error::{Error, Result};
use crate::gosort;
use crate::index::RangeEnd;
use crate::mvcc::{KvTxn, RangeOptions};

/// etcd's `mkGteRange`: an empty range end is the single key, `"\0"` means every key from
/// `key` on, anything else is the exclusive end.
pub fn range_end(end: &[u8]) -> RangeEnd<'_> {
    match end {
        [] => None,
        [0] => Some(&[]),
        e => Some(e),
    }
}

fn header(revision: i64) -> Option<pb::ResponseHeader> {
    Some(pb::ResponseHeader {
        revision,
        ..Default::default()
    })
}

pub fn range(txn: &dyn KvTxn, r: &pb::RangeRequest) -> Result<pb::RangeResponse> {
    let filtered = r.min_mod_revision != 0
        || r.max_mod_revision != 0
        || r.min_create_revision != 0
        || r.max_create_revision != 0;
    // Sorting and filtering need every match; otherwise fetch one extra for `more`.
    let mut limit = r.limit;
    if r.sort_order != SortOrder::None as i32 || filtered {
        limit = 0;
    }
    if limit > 0 {
        limit = limit.saturating_add(1);
    }
    let ro = RangeOptions {
        limit,
        rev: r.revision,
        count: r.count_only,
    };
    let rr = txn.range(&r.key, range_end(&r.range_end), ro)?;
    let mut kvs = rr.kvs;

    if r.max_mod_revision != 0 {
        kvs.retain(|kv| kv.mod_revision <= r.max_mod_revision);
    }
    if r.min_mod_revision != 0 {
        kvs.retain(|kv| kv.mod_revision >= r.min_mod_revision);
    }
    if r.max_create_revision != 0 {
        kvs.retain(|kv| kv.create_revision <= r.max_create_revision);
    }
    if r.min_create_revision != 0 {
        kvs.retain(|kv| kv.create_revision >= r.min_create_revision);
    }

    let mut order = SortOrder::try_from(r.sort_order).map_err(|_| Error::InvalidSortOption)?;
    let target = SortTarget::try_from(r.sort_target).map_err(|_| Error::InvalidSortOption)?;
    // The index returns keys in ascending key order already, so only a non-key target
    // sorts by default — and it sorts ascending.
    if target != SortTarget::Key && order == SortOrder::None {
        order = SortOrder::Ascend;
    }
    if order != SortOrder::None {
        sort_kvs(&mut kvs, target, order == SortOrder::Descend);
    }

    let mut more = false;
    if r.limit > 0 && kvs.len() as u64 > r.limit as u64 {
        kvs.truncate(r.limit as usize);
        more = true;
    }
    if r.keys_only {
        for kv in &mut kvs {
            kv.value.clear();
        }
    }
    Ok(pb::RangeResponse {
        header: header(rr.rev),
        kvs,
        more,
        count: rr.count,
    })
}

/// Sorts like etcd: Go's unstable `sort.Sort`, with `sort.Reverse` for descending order.
/// Integer targets compare by the sign of the difference, as etcd's `Less` does.
fn sort_kvs(kvs: &mut [mvccpb::KeyValue], target: SortTarget, descend: bool) {
    let less = |a: &mvccpb::KeyValue, b: &mvccpb::KeyValue| -> bool {
        match target {
            SortTarget::Key => a.key < b.key,
            SortTarget::Version => a.version.wrapping_sub(b.version) < 0,
            SortTarget::Create => a.create_revision.wrapping_sub(b.create_revision) < 0,
            SortTarget::Mod => a.mod_revision.wrapping_sub(b.mod_revision) < 0,
            SortTarget::Value => a.value < b.value,
        }
    };
    if descend {
        gosort::sort_by(kvs, |a, b| less(b, a));
    } else {
        gosort::sort_by(kvs, less);
    }
}

/// A Put. `standalone` is a Put that is its own request: it checks its lease first (inside
/// a transaction that check already ran for the whole transaction).
pub fn put(txn: &mut dyn KvTxn, p: &pb::PutRequest, standalone: bool) -> Result<pb::PutResponse> {
    if standalone && p.lease != 0 && !txn.lease_exists(p.lease) {
        return Err(Error::LeaseNotFound);
    }
    let mut prev = None;
    if p.ignore_value || p.ignore_lease || p.prev_kv {
        let rr = txn.range(&p.key, None, RangeOptions::default())?;
        prev = rr.kvs.into_iter().next();
    }
    if (p.ignore_value || p.ignore_lease) && prev.is_none() {
        return Err(Error::KeyNotFound);
    }
    let mut value = p.value.as_slice();
    let mut lease = p.lease;
    if let Some(prev) = &prev {
        if p.ignore_value {
            value = &prev.value;
        }
        if p.ignore_lease {
            lease = prev.lease;
        }
    }
    let value = value.to_vec();
    let revision = txn.put(&p.key, &value, lease)?;
    Ok(pb::PutResponse {
        header: header(revision),
        prev_kv: if p.prev_kv { prev } else { None },
    })
}

pub fn delete_range(
    txn: &mut dyn KvTxn,
    d: &pb::DeleteRangeRequest,
) -> Result<pb::DeleteRangeResponse> {
    let end = range_end(&d.range_end);
    let mut prev_kvs = Vec::new();
    if d.prev_kv {
        prev_kvs = txn.range(&d.key, end, RangeOptions::default())?.kvs;
    }
    let (deleted, revision) = txn.delete_range(&d.key, end)?;
    Ok(pb::DeleteRangeResponse {
        header: header(revision),
        deleted,
        prev_kvs,
    })
}

/// A transaction. `txn` must be a write transaction unless the request only reads.
///
/// Order of work, as in etcd: evaluate the compares of this transaction and of every
/// nested transaction on the branches that will run (all against the state before any
/// write), check puts (missing key for ignore flags, unknown lease) and range revisions,
/// then run the operations.
pub fn txn(txn: &mut dyn KvTxn, rt: &pb::TxnRequest, is_write: bool) -> Result<pb::TxnResponse> {
    let mut path = Vec::new();
    compare_to_path(&*txn, rt, &mut path)?;
    if is_write {
        check_requests(&*txn, rt, &path, &mut 0, &check_put)?;
    }
    check_requests(&*txn, rt, &path, &mut 0, &check_range)?;
    let mut resp = apply_txn(txn, rt, &path, &mut 0)?;
    let mut rev = txn.rev();
    if txn.changed() {
        rev += 1;
    }
    resp.header = header(rev);
    Ok(resp)
}

fn branch(rt: &pb::TxnRequest, succeeded: bool) -> &[pb::RequestOp] {
    if succeeded {
        &rt.success
    } else {
        &rt.failure
    }
}

fn next_step(path: &[bool], pos: &mut usize) -> Result<bool> {
    let step = path
        .get(*pos)
        .copied()
        .ok_or_else(|| Error::MalformedRequest("transaction path out of step".into()))?;
    *pos += 1;
    Ok(step)
}

/// The branch taken by this transaction and, in pre-order, by each nested one that runs.
fn compare_to_path(view: &dyn KvTxn, rt: &pb::TxnRequest, path: &mut Vec<bool>) -> Result<()> {
    let ok = apply_compares(view, &rt.compare)?;
    path.push(ok);
    for op in branch(rt, ok) {
        if let Some(Request::RequestTxn(nested)) = &op.request {
            compare_to_path(view, nested, path)?;
        }
    }
    Ok(())
}

fn apply_compares(view: &dyn KvTxn, cmps: &[pb::Compare]) -> Result<bool> {
    for c in cmps {
        if !apply_compare(view, c)? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// One compare: every key in the range must satisfy it. With no key in the range, a
/// VALUE compare fails (a missing value cannot be told from an empty one) and the others
/// compare against zeroes.
fn apply_compare(view: &dyn KvTxn, c: &pb::Compare) -> Result<bool> {
    let rr = match view.range(&c.key, range_end(&c.range_end), RangeOptions::default()) {
        Ok(rr) => rr,
        // etcd treats a failed read as a failed compare.
        Err(Error::Backend(e)) => return Err(Error::Backend(e)),
        Err(Error::Corrupt(e)) => return Err(Error::Corrupt(e)),
        Err(_) => return Ok(false),
    };
    if rr.kvs.is_empty() {
        if c.target == CompareTarget::Value as i32 {
            return Ok(false);
        }
        return Ok(compare_kv(c, &mvccpb::KeyValue::default()));
    }
    Ok(rr.kvs.iter().all(|kv| compare_kv(c, kv)))
}

fn compare_kv(c: &pb::Compare, kv: &mvccpb::KeyValue) -> bool {
    use std::cmp::Ordering;
    let int = |actual: i64, want: Option<i64>| actual.cmp(&want.unwrap_or(0));
    let ord = match CompareTarget::try_from(c.target) {
        Ok(CompareTarget::Value) => {
            let want: &[u8] = match &c.target_union {
                Some(TargetUnion::Value(v)) => v,
                _ => &[],
            };
            kv.value.as_ref().cmp(want)
        }
        Ok(CompareTarget::Create) => int(
            kv.create_revision,
            match c.target_union {
                Some(TargetUnion::CreateRevision(v)) => Some(v),
                _ => None,
            },
        ),
        Ok(CompareTarget::Mod) => int(
            kv.mod_revision,
            match c.target_union {
                Some(TargetUnion::ModRevision(v)) => Some(v),
                _ => None,
            },
        ),
        Ok(CompareTarget::Version) => int(
            kv.version,
            match c.target_union {
                Some(TargetUnion::Version(v)) => Some(v),
                _ => None,
            },
        ),
        Ok(CompareTarget::Lease) => int(
            kv.lease,
            match c.target_union {
                Some(TargetUnion::Lease(v)) => Some(v),
                _ => None,
            },
        ),
        // An unknown target compares as equal, as in etcd.
        Err(_) => Ordering::Equal,
    };
    match CompareResult::try_from(c.result) {
        Ok(CompareResult::Equal) => ord == Ordering::Equal,
        Ok(CompareResult::NotEqual) => ord != Ordering::Equal,
        Ok(CompareResult::Greater) => ord == Ordering::Greater,
        Ok(CompareResult::Less) => ord == Ordering::Less,
        // An unknown result holds, as in etcd.
        Err(_) => true,
    }
}

type CheckFn = dyn Fn(&dyn KvTxn, &pb::RequestOp) -> Result<()>;

/// Runs `f` on every non-transaction operation that will run, nested ones included.
fn check_requests(
    view: &dyn KvTxn,
    rt: &pb::TxnRequest,
    path: &[bool],
    pos: &mut usize,
    f: &CheckFn,
) -> Result<()> {
    let ok = next_step(path, pos)?;
    for op in branch(rt, ok) {
        if let Some(Request::RequestTxn(nested)) = &op.request {
            check_requests(view, nested, path, pos, f)?;
            continue;
        }
        f(view, op)?;
    }
    Ok(())
}

fn check_put(view: &dyn KvTxn, op: &pb::RequestOp) -> Result<()> {
    let Some(Request::RequestPut(p)) = &op.request else {
        return Ok(());
    };
    if p.ignore_value || p.ignore_lease {
        let rr = view.range(&p.key, None, RangeOptions::default())?;
        if rr.kvs.is_empty() {
            return Err(Error::KeyNotFound);
        }
    }
    if p.lease != 0 && !view.lease_exists(p.lease) {
        return Err(Error::LeaseNotFound);
    }
    Ok(())
}

/// A range revision must be readable: not above the current revision, not below the
/// compacted one. (Against etcd's `FirstRev`, which is -1 before any compaction, so a
/// revision below -1 inside a transaction fails as compacted — etcd does the same.)
fn check_range(view: &dyn KvTxn, op: &pb::RequestOp) -> Result<()> {
    let Some(Request::RequestRange(r)) = &op.request else {
        return Ok(());
    };
    if r.revision == 0 {
        Ok(())
    } else if r.revision > view.rev() {
        Err(Error::FutureRevision)
    } else if r.revision < view.first_rev() {
        Err(Error::Compacted)
    } else {
        Ok(())
    }
}

/// Runs the branch chosen by `path`. Each operation's response carries its own header
/// revision, as etcd fills it: a put's is the transaction's revision, a range's the
/// revision it read at, a delete's the transaction's revision once anything changed. A
/// nested transaction's response has an empty header (revision 0), as in etcd.
fn apply_txn(
    txn: &mut dyn KvTxn,
    rt: &pb::TxnRequest,
    path: &[bool],
    pos: &mut usize,
) -> Result<pb::TxnResponse> {
    let succeeded = next_step(path, pos)?;
    let ops = branch(rt, succeeded);
    let mut responses = Vec::with_capacity(ops.len());
    for op in ops {
        let response = match &op.request {
            Some(Request::RequestRange(r)) => Some(Response::ResponseRange(range(&*txn, r)?)),
            Some(Request::RequestPut(p)) => Some(Response::ResponsePut(put(txn, p, false)?)),
            Some(Request::RequestDeleteRange(d)) => {
                Some(Response::ResponseDeleteRange(delete_range(txn, d)?))
            }
            Some(Request::RequestTxn(nested)) => {
                let mut resp = apply_txn(txn, nested, path, pos)?;
                resp.header = Some(pb::ResponseHeader::default());
                Some(Response::ResponseTxn(resp))
            }
            None => None,
        };
        responses.push(pb::ResponseOp { response });
    }
    Ok(pb::TxnResponse {
        header: None,
        succeeded,
        responses,
    })
}
