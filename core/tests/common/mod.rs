//! Helpers shared by core's integration tests.
#![allow(dead_code)]

use std::sync::Arc;

use metastore_core::proto::etcdserverpb as pb;
use metastore_core::proto::metastore::{internal_request::Request, InternalRequest};
use metastore_core::{Backend, Bucket, MemoryBackend, StateMachine, StateMachineConfig};

/// A memory engine that outlives the state machine using it, so a test can re-open a
/// state machine over the same stored bytes.
#[derive(Clone, Default)]
pub struct Shared(pub Arc<MemoryBackend>);

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
    StateMachine::open(Box::new(be.0.clone()), StateMachineConfig::default()).unwrap()
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
