//! Helpers shared by core's integration tests.
#![allow(dead_code)]

use std::sync::Arc;

use metastore_core::backend::ScanVisitor;
use metastore_core::proto::etcdserverpb as pb;
use metastore_core::proto::metastore::{internal_request::Request, InternalRequest};
use metastore_core::{
    Backend, BackendError, Bucket, MemoryBackend, StateMachine, StateMachineConfig, WriteBatch,
};

/// A memory engine that outlives the state machine using it, so a test can re-open a
/// state machine over the same stored bytes.
#[derive(Clone, Default)]
pub struct Shared(pub Arc<MemoryBackend>);

impl Backend for Shared {
    fn get(&self, bucket: Bucket, key: &[u8]) -> Result<Option<Vec<u8>>, BackendError> {
        self.0.get(bucket, key)
    }
    fn scan(
        &self,
        bucket: Bucket,
        start: &[u8],
        end: Option<&[u8]>,
        visit: &mut ScanVisitor<'_>,
    ) -> Result<(), BackendError> {
        self.0.scan(bucket, start, end, visit)
    }
    fn write(&self, batch: WriteBatch) -> Result<(), BackendError> {
        self.0.write(batch)
    }
    fn size_bytes(&self) -> u64 {
        self.0.size_bytes()
    }
    fn engine_name(&self) -> &'static str {
        "shared-memory"
    }
}

impl Shared {
    /// Every (bucket, key, value) stored, in order.
    pub fn dump(&self) -> Vec<(Bucket, Vec<u8>, Vec<u8>)> {
        let mut out = Vec::new();
        for b in Bucket::ALL {
            self.0
                .scan(b, b"", None, &mut |k, v| {
                    out.push((b, k.to_vec(), v.to_vec()));
                    true
                })
                .unwrap();
        }
        out
    }
}

pub fn open(be: &Shared) -> StateMachine {
    StateMachine::open(Box::new(be.clone()), StateMachineConfig::default()).unwrap()
}

pub fn put_req(k: &str, v: &str) -> pb::PutRequest {
    pb::PutRequest {
        key: k.into(),
        value: v.into(),
        ..Default::default()
    }
}

pub fn env(r: Request) -> InternalRequest {
    InternalRequest {
        request: Some(r),
        ..Default::default()
    }
}
