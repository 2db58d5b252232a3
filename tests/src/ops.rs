//! Short constructors for raw etcdserverpb requests.

use metastore_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use metastore_proto::etcdserverpb::request_op::Request;
use metastore_proto::etcdserverpb::{
    Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
};

pub fn b(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

/// The end of the range of keys starting with `prefix` (etcd's `GetPrefixRangeEnd`).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.last_mut() {
        if *last < 0xff {
            *last += 1;
            return end;
        }
        end.pop();
    }
    vec![0]
}

pub fn put(k: &str, v: &str) -> PutRequest {
    PutRequest {
        key: b(k),
        value: b(v),
        ..Default::default()
    }
}

pub fn put_prev(k: &str, v: &str) -> PutRequest {
    PutRequest {
        prev_kv: true,
        ..put(k, v)
    }
}

pub fn get(k: &str) -> RangeRequest {
    RangeRequest {
        key: b(k),
        ..Default::default()
    }
}

pub fn get_range(k: &str, end: &str) -> RangeRequest {
    RangeRequest {
        key: b(k),
        range_end: b(end),
        ..Default::default()
    }
}

pub fn get_prefix(p: &str) -> RangeRequest {
    RangeRequest {
        key: b(p),
        range_end: prefix_end(p.as_bytes()),
        ..Default::default()
    }
}

pub fn get_from(k: &str) -> RangeRequest {
    RangeRequest {
        key: b(k),
        range_end: vec![0],
        ..Default::default()
    }
}

pub fn get_all() -> RangeRequest {
    RangeRequest {
        key: vec![0],
        range_end: vec![0],
        ..Default::default()
    }
}

pub fn del(k: &str) -> DeleteRangeRequest {
    DeleteRangeRequest {
        key: b(k),
        ..Default::default()
    }
}

pub fn del_prev(k: &str) -> DeleteRangeRequest {
    DeleteRangeRequest {
        key: b(k),
        prev_kv: true,
        ..Default::default()
    }
}

pub fn del_range(k: &str, end: &str, prev_kv: bool) -> DeleteRangeRequest {
    DeleteRangeRequest {
        key: b(k),
        range_end: b(end),
        prev_kv,
    }
}

pub fn del_prefix(p: &str, prev_kv: bool) -> DeleteRangeRequest {
    DeleteRangeRequest {
        key: b(p),
        range_end: prefix_end(p.as_bytes()),
        prev_kv,
    }
}

pub fn op_put(r: PutRequest) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestPut(r)),
    }
}

pub fn op_get(r: RangeRequest) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestRange(r)),
    }
}

pub fn op_del(r: DeleteRangeRequest) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestDeleteRange(r)),
    }
}

pub fn op_txn(r: TxnRequest) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestTxn(r)),
    }
}

pub fn txn(compare: Vec<Compare>, success: Vec<RequestOp>, failure: Vec<RequestOp>) -> TxnRequest {
    TxnRequest {
        compare,
        success,
        failure,
    }
}

fn cmp(k: &str, result: CompareResult, target: CompareTarget, u: TargetUnion) -> Compare {
    Compare {
        result: result as i32,
        target: target as i32,
        key: b(k),
        target_union: Some(u),
        range_end: vec![],
    }
}

pub fn cmp_version(k: &str, r: CompareResult, v: i64) -> Compare {
    cmp(k, r, CompareTarget::Version, TargetUnion::Version(v))
}

pub fn cmp_create(k: &str, r: CompareResult, v: i64) -> Compare {
    cmp(k, r, CompareTarget::Create, TargetUnion::CreateRevision(v))
}

pub fn cmp_mod(k: &str, r: CompareResult, v: i64) -> Compare {
    cmp(k, r, CompareTarget::Mod, TargetUnion::ModRevision(v))
}

pub fn cmp_value(k: &str, r: CompareResult, v: &str) -> Compare {
    cmp(k, r, CompareTarget::Value, TargetUnion::Value(b(v)))
}

pub fn cmp_lease(k: &str, r: CompareResult, v: i64) -> Compare {
    cmp(k, r, CompareTarget::Lease, TargetUnion::Lease(v))
}

/// The same compare over `[key, range_end)`.
pub fn over(mut c: Compare, range_end: Vec<u8>) -> Compare {
    c.range_end = range_end;
    c
}
