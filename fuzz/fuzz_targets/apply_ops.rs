//! Structured operations (put, delete, txn, compaction, alarms) on a tiny key alphabet,
//! applied to a state machine: reaches deep states (many revisions per key, compaction
//! between generations, alarms refusing writes) that random protobuf bytes rarely reach.
//! After every operation apply must not panic, revisions must never go backwards, and at
//! the end a state machine reopened from the same bytes must agree with the live one
//! (revision, compacted revision, alarms, Hash and HashKV), as a restart requires.
#![no_main]

use std::sync::Arc;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use metastore_core::proto::etcdserverpb::{
    compare, request_op, AlarmRequest, CompactionRequest, Compare, DeleteRangeRequest, PutRequest,
    RangeRequest, RequestOp, TxnRequest,
};
use metastore_core::proto::metastore::{internal_request::Request, InternalRequest};
use metastore_core::{MemoryBackend, StateMachine, StateMachineConfig};

#[derive(Arbitrary, Debug)]
enum Op {
    Put {
        key: u8,
        value: u8,
        prev_kv: bool,
        ignore_value: bool,
    },
    Delete {
        key: u8,
        end: Option<u8>,
        prev_kv: bool,
    },
    Txn {
        key: u8,
        target: u8,
        result: u8,
        number: u8,
        success: Vec<Leaf>,
        failure: Vec<Leaf>,
    },
    Compact {
        back: u8,
    },
    Alarm {
        action: u8,
        alarm: u8,
    },
    Range {
        key: u8,
        end: Option<u8>,
        back: u8,
        limit: u8,
    },
}

#[derive(Arbitrary, Debug)]
enum Leaf {
    Put { key: u8, value: u8 },
    Delete { key: u8, end: Option<u8> },
    Range { key: u8, end: Option<u8> },
    Nested { key: u8, then: Vec<(u8, u8)> },
}

fn key(k: u8) -> Vec<u8> {
    // Four keys and the from-key form: collisions are what exercise the index.
    match k % 5 {
        4 => vec![0],
        k => vec![b'a' + k],
    }
}

fn end(e: Option<u8>) -> Vec<u8> {
    e.map(key).unwrap_or_default()
}

fn leaf(l: &Leaf) -> RequestOp {
    let request = match l {
        Leaf::Put { key: k, value } => request_op::Request::RequestPut(PutRequest {
            key: key(*k),
            value: vec![*value],
            ..Default::default()
        }),
        Leaf::Delete { key: k, end: e } => {
            request_op::Request::RequestDeleteRange(DeleteRangeRequest {
                key: key(*k),
                range_end: end(*e),
                ..Default::default()
            })
        }
        Leaf::Range { key: k, end: e } => request_op::Request::RequestRange(RangeRequest {
            key: key(*k),
            range_end: end(*e),
            ..Default::default()
        }),
        Leaf::Nested { key: k, then } => request_op::Request::RequestTxn(TxnRequest {
            compare: vec![Compare {
                key: key(*k),
                target: compare::CompareTarget::Version as i32,
                result: compare::CompareResult::Greater as i32,
                target_union: Some(compare::TargetUnion::Version(0)),
                ..Default::default()
            }],
            success: then
                .iter()
                .take(4)
                .map(|(k, v)| RequestOp {
                    request: Some(request_op::Request::RequestPut(PutRequest {
                        key: key(*k),
                        value: vec![*v],
                        ..Default::default()
                    })),
                })
                .collect(),
            failure: vec![],
        }),
    };
    RequestOp {
        request: Some(request),
    }
}

fn to_request(op: &Op, sm: &StateMachine) -> Request {
    match op {
        Op::Put {
            key: k,
            value,
            prev_kv,
            ignore_value,
        } => Request::Put(PutRequest {
            key: key(*k),
            value: if *ignore_value { vec![] } else { vec![*value] },
            prev_kv: *prev_kv,
            ignore_value: *ignore_value,
            ..Default::default()
        }),
        Op::Delete {
            key: k,
            end: e,
            prev_kv,
        } => Request::DeleteRange(DeleteRangeRequest {
            key: key(*k),
            range_end: end(*e),
            prev_kv: *prev_kv,
        }),
        Op::Txn {
            key: k,
            target,
            result,
            number,
            success,
            failure,
        } => {
            let target = i32::from(*target % 5);
            let target_union = match target {
                0 => compare::TargetUnion::Version(i64::from(*number % 4)),
                1 => compare::TargetUnion::CreateRevision(i64::from(*number % 16)),
                2 => compare::TargetUnion::ModRevision(i64::from(*number % 16)),
                3 => compare::TargetUnion::Value(vec![*number]),
                _ => compare::TargetUnion::Lease(0),
            };
            Request::Txn(TxnRequest {
                compare: vec![Compare {
                    key: key(*k),
                    target,
                    result: i32::from(*result % 4),
                    target_union: Some(target_union),
                    range_end: vec![],
                }],
                success: success.iter().take(6).map(leaf).collect(),
                failure: failure.iter().take(6).map(leaf).collect(),
            })
        }
        Op::Compact { back } => Request::Compaction(CompactionRequest {
            revision: sm.current_revision() - i64::from(*back % 8),
            physical: true,
        }),
        Op::Alarm { action, alarm } => Request::Alarm(AlarmRequest {
            action: i32::from(*action % 4),
            member_id: 1,
            alarm: i32::from(*alarm % 4),
        }),
        Op::Range {
            key: k,
            end: e,
            back,
            limit,
        } => Request::Range(RangeRequest {
            key: key(*k),
            range_end: end(*e),
            revision: (sm.current_revision() - i64::from(*back % 8)).max(0),
            limit: i64::from(*limit % 4),
            ..Default::default()
        }),
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let backend = Arc::new(MemoryBackend::new());
    let mut sm =
        StateMachine::open(Box::new(backend.clone()), StateMachineConfig::default()).expect("open");
    let mut index = 0;
    for op in ops.iter().take(64) {
        let request = InternalRequest {
            request: Some(to_request(op, &sm)),
            ..Default::default()
        };
        let before = sm.current_revision();
        index += 1;
        let applied = sm.apply(index, &request);
        assert_eq!(applied.index, index);
        assert!(sm.current_revision() >= before, "revision went backwards");
        assert_eq!(sm.applied_index(), index);
        if let Err(e) = &applied.result {
            assert!(
                !matches!(
                    e,
                    metastore_core::Error::Backend(_) | metastore_core::Error::Corrupt(_)
                ),
                "{op:?} failed internally: {e}"
            );
        }
    }
    // A restart: the same bytes must give the same state.
    let reopened =
        StateMachine::open(Box::new(backend), StateMachineConfig::default()).expect("reopen");
    assert_eq!(reopened.current_revision(), sm.current_revision());
    assert_eq!(reopened.compacted_revision(), sm.compacted_revision());
    assert_eq!(reopened.applied_index(), sm.applied_index());
    assert_eq!(reopened.alarms(), sm.alarms());
    assert_eq!(reopened.hash().expect("hash"), sm.hash().expect("hash"));
    assert_eq!(
        reopened.hash_kv(0).expect("hash_kv"),
        sm.hash_kv(0).expect("hash_kv")
    );
    let all = RangeRequest {
        key: vec![0],
        range_end: vec![0],
        ..Default::default()
    };
    assert_eq!(
        reopened.range(&all).expect("range"),
        sm.range(&all).expect("range")
    );
});
