//! Seeded generator of replicated requests over a small key set, so that conflicts,
//! overwrites, deletes of missing keys, range operations, nested transactions and
//! compactions all happen often. The same seed always yields the same requests.

use metastore_proto::etcdserverpb::{
    compare, request_op, CompactionRequest, Compare, DeleteRangeRequest, PutRequest, RangeRequest,
    RequestOp, TxnRequest,
};
use metastore_proto::metastore::{internal_request::Request, InternalRequest, RequestHeader};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Generates KV requests (put, delete, txn, compaction) from a seed.
pub struct KvWorkload {
    rng: StdRng,
    next_id: u64,
    /// Highest revision a generated compaction may name; the caller keeps it current
    /// with [`KvWorkload::observe_revision`] so most compactions are valid.
    revision: i64,
}

const KEYS: &[&[u8]] = &[b"a", b"b", b"b/1", b"b/2", b"c", b"d"];

impl KvWorkload {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            next_id: 0,
            revision: 1,
        }
    }

    /// Tells the generator the store's current revision.
    pub fn observe_revision(&mut self, revision: i64) {
        self.revision = revision;
    }

    pub fn next_request(&mut self) -> InternalRequest {
        self.next_id += 1;
        let request = match self.rng.gen_range(0..100) {
            0..=44 => Request::Put(self.put()),
            45..=64 => Request::DeleteRange(self.delete()),
            65..=94 => Request::Txn(self.txn(2)),
            _ => Request::Compaction(CompactionRequest {
                // Sometimes below an earlier compaction or above the current revision,
                // so the error paths are exercised too.
                revision: self.rng.gen_range(0..=self.revision + 1),
                physical: self.rng.gen_bool(0.5),
            }),
        };
        InternalRequest {
            header: Some(RequestHeader {
                id: self.next_id,
                ..Default::default()
            }),
            proposed_at_unix_nanos: 0,
            request: Some(request),
        }
    }

    fn key(&mut self) -> Vec<u8> {
        KEYS[self.rng.gen_range(0..KEYS.len())].to_vec()
    }

    /// A range end for `key`: none, a prefix end, or from-key.
    fn range_end(&mut self, key: &[u8]) -> Vec<u8> {
        match self.rng.gen_range(0..4) {
            0 => {
                let mut end = key.to_vec();
                if let Some(last) = end.last_mut() {
                    *last += 1;
                }
                end
            }
            1 => vec![0],
            _ => Vec::new(),
        }
    }

    fn put(&mut self) -> PutRequest {
        let value = format!("v{}", self.rng.gen_range(0..1000)).into_bytes();
        PutRequest {
            key: self.key(),
            value,
            prev_kv: self.rng.gen_bool(0.5),
            ..Default::default()
        }
    }

    fn delete(&mut self) -> DeleteRangeRequest {
        let key = self.key();
        DeleteRangeRequest {
            range_end: self.range_end(&key),
            key,
            prev_kv: self.rng.gen_bool(0.5),
        }
    }

    fn range(&mut self) -> RangeRequest {
        let key = self.key();
        RangeRequest {
            range_end: self.range_end(&key),
            key,
            limit: self.rng.gen_range(0..3),
            ..Default::default()
        }
    }

    fn txn(&mut self, depth: u32) -> TxnRequest {
        let compares = (0..self.rng.gen_range(0..3))
            .map(|_| {
                let key = self.key();
                let target = self.rng.gen_range(0..4);
                let target_union = match target {
                    0 => compare::TargetUnion::Version(self.rng.gen_range(0..3)),
                    1 => compare::TargetUnion::CreateRevision(
                        self.rng.gen_range(0..self.revision + 1),
                    ),
                    2 => {
                        compare::TargetUnion::ModRevision(self.rng.gen_range(0..self.revision + 1))
                    }
                    _ => compare::TargetUnion::Value(
                        format!("v{}", self.rng.gen_range(0..1000)).into_bytes(),
                    ),
                };
                Compare {
                    result: self.rng.gen_range(0..4),
                    target,
                    key,
                    range_end: Vec::new(),
                    target_union: Some(target_union),
                }
            })
            .collect();
        let success = self.ops(depth);
        let failure = self.ops(depth);
        TxnRequest {
            compare: compares,
            success,
            failure,
        }
    }

    /// Operations of one txn branch. Writes use distinct keys (etcd refuses duplicate
    /// keys in a branch before proposing, so such a request never reaches apply).
    fn ops(&mut self, depth: u32) -> Vec<RequestOp> {
        let mut ops = Vec::new();
        let mut written: Vec<Vec<u8>> = Vec::new();
        for _ in 0..self.rng.gen_range(0..4) {
            let op = match self.rng.gen_range(0..10) {
                0..=3 => {
                    let put = self.put();
                    if written.contains(&put.key) {
                        continue;
                    }
                    written.push(put.key.clone());
                    request_op::Request::RequestPut(put)
                }
                4..=5 => {
                    let key = self.key();
                    if written.contains(&key) {
                        continue;
                    }
                    written.push(key.clone());
                    request_op::Request::RequestDeleteRange(DeleteRangeRequest {
                        key,
                        ..Default::default()
                    })
                }
                6..=8 => request_op::Request::RequestRange(self.range()),
                _ if depth > 0 => {
                    // Nested txns only read, so they cannot collide with this branch's
                    // writes.
                    let mut nested = self.txn(depth - 1);
                    nested.success.retain(|op| {
                        matches!(op.request, Some(request_op::Request::RequestRange(_)))
                    });
                    nested.failure.retain(|op| {
                        matches!(op.request, Some(request_op::Request::RequestRange(_)))
                    });
                    request_op::Request::RequestTxn(nested)
                }
                _ => continue,
            };
            ops.push(RequestOp { request: Some(op) });
        }
        ops
    }
}
