//! Arbitrary bytes as client requests: decoding and the API layer's validation must never
//! panic, and a request that passes validation must apply without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use metastore_core::proto::etcdserverpb::TxnRequest;
use metastore_core::proto::metastore::{internal_request::Request, InternalRequest};
use metastore_core::{validate, MemoryBackend, StateMachine, StateMachineConfig};
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(txn) = TxnRequest::decode(data) else {
        return;
    };
    if validate::txn(&txn, 128).is_err() {
        return;
    }
    let mut sm = StateMachine::open(
        Box::new(MemoryBackend::new()),
        StateMachineConfig::default(),
    )
    .expect("open");
    let _ = sm.read_txn(&txn);
    let request = InternalRequest {
        request: Some(Request::Txn(txn)),
        ..Default::default()
    };
    let _ = sm.apply(1, &request);
});
