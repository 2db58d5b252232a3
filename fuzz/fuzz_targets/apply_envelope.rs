//! Arbitrary bytes as log entries: decode each as a replicated request envelope and apply
//! it to a state machine that already holds some keys. Whatever the bytes, apply must
//! neither panic nor leave the store inconsistent (the hash is recomputed, and every
//! historical read of the revisions that exist must succeed or fail with compaction).
#![no_main]

use libfuzzer_sys::fuzz_target;
use metastore_core::proto::etcdserverpb::{PutRequest, RangeRequest};
use metastore_core::proto::metastore::{internal_request::Request, InternalRequest};
use metastore_core::{Error, MemoryBackend, StateMachine, StateMachineConfig};
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let mut sm = StateMachine::open(
        Box::new(MemoryBackend::new()),
        StateMachineConfig::default(),
    )
    .expect("open");
    let mut index = 0;
    for key in [&b"a"[..], b"b", b"c"] {
        index += 1;
        let put = InternalRequest {
            request: Some(Request::Put(PutRequest {
                key: key.to_vec(),
                value: b"seed".to_vec(),
                ..Default::default()
            })),
            ..Default::default()
        };
        sm.apply(index, &put).result.expect("seed put");
    }
    // Entries are length-prefixed by one byte so one input can hold several.
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let len = (len as usize).min(tail.len());
        let (entry, tail) = tail.split_at(len);
        rest = tail;
        if let Ok(request) = InternalRequest::decode(entry) {
            index += 1;
            let _ = sm.apply(index, &request);
        }
    }
    let _ = sm.hash().expect("hash");
    for revision in 1..=sm.current_revision() {
        let read = sm.range(&RangeRequest {
            key: vec![0],
            range_end: vec![0],
            revision,
            ..Default::default()
        });
        match read {
            Ok(_) | Err(Error::Compacted) => {}
            Err(e) => panic!("read at revision {revision} failed: {e}"),
        }
    }
});
