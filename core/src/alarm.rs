//! Alarms: the replicated set of active (member, alarm type) pairs, etcd's `AlarmStore`,
//! and what an active alarm forbids.
//!
//! This module owns the alarm set and its encoding in the `alarm` bucket (the key is the
//! encoded `AlarmMember`, the value empty, as etcd stores it). It must never decide
//! *when* an alarm is raised (the runtime proposes NOSPACE when the quota check fails)
//! and never touch the key space; it only answers, for each request kind, whether the
//! active alarms refuse it (etcd's `applierV3Capped` and `applierV3Corrupt`).

use std::collections::BTreeSet;

use metastore_proto::etcdserverpb as pb;
use metastore_proto::metastore::internal_request::Request;
use prost::Message;

use crate::backend::{Backend, Bucket, WriteBatch};
use crate::error::{Error, Result};

/// The active alarms, ordered by (alarm type, member ID): etcd lists them in Go map
/// order, which is random; a fixed order keeps every member's answer identical.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Alarms {
    active: BTreeSet<(i32, u64)>,
}

impl Alarms {
    /// Loads the alarms persisted in the `alarm` bucket.
    pub fn open(backend: &dyn Backend) -> Result<Self> {
        let mut active = BTreeSet::new();
        let mut bad = None;
        backend.scan(
            Bucket::Alarm,
            b"",
            None,
            &mut |k, _| match pb::AlarmMember::decode(k) {
                Ok(m) => {
                    active.insert((m.alarm, m.member_id));
                    true
                }
                Err(e) => {
                    bad = Some(e.to_string());
                    false
                }
            },
        )?;
        if let Some(e) = bad {
            return Err(Error::Corrupt(format!("alarm bucket entry: {e}")));
        }
        Ok(Alarms { active })
    }

    pub fn is_empty(&self) -> bool {
        self.active.is_empty()
    }

    fn has(&self, alarm: pb::AlarmType) -> bool {
        self.active.iter().any(|(a, _)| *a == alarm as i32)
    }

    /// etcd's `AlarmStore.Get`: every alarm for `NONE`, else the alarms of that type.
    pub fn get(&self, alarm: i32) -> Vec<pb::AlarmMember> {
        self.active
            .iter()
            .filter(|(a, _)| alarm == pb::AlarmType::None as i32 || *a == alarm)
            .map(|&(alarm, member_id)| pb::AlarmMember { member_id, alarm })
            .collect()
    }

    /// Whether the active alarms refuse `request` at apply, and with which error.
    /// CORRUPT is checked first: etcd wraps the capped applier inside the corrupt one.
    /// Reads served outside the log (Range, read-only Txn) are not affected, as in etcd,
    /// whose read path uses the unwrapped applier.
    pub fn refusal(&self, request: &Request) -> Option<Error> {
        if self.active.is_empty() {
            return None;
        }
        if self.has(pb::AlarmType::Corrupt) {
            let refused = matches!(
                request,
                Request::Put(_)
                    | Request::DeleteRange(_)
                    | Request::Txn(_)
                    | Request::Range(_)
                    | Request::Compaction(_)
                    | Request::LeaseGrant(_)
                    | Request::LeaseRevoke(_)
            );
            if refused {
                return Some(Error::CorruptAlarm);
            }
        }
        if self.has(pb::AlarmType::Nospace) {
            let refused = match request {
                Request::Put(_) | Request::LeaseGrant(_) => true,
                Request::Txn(t) => txn_cost(t) > 0,
                _ => false,
            };
            if refused {
                return Some(Error::NoSpace);
            }
        }
        None
    }

    /// Applies an Alarm request (etcd's `applierV3backend.Alarm`): GET lists, ACTIVATE
    /// adds (answering with the alarm, new or already active), DEACTIVATE removes
    /// (answering with the alarm if it was active). Changes go into `batch`; the caller
    /// writes it and then calls [`Alarms::commit`] with the returned change.
    pub fn apply(
        &self,
        r: &pb::AlarmRequest,
        batch: &mut WriteBatch,
    ) -> Result<(pb::AlarmResponse, Option<AlarmChange>)> {
        validate(r)?;
        let mut resp = pb::AlarmResponse::default();
        let member = pb::AlarmMember {
            member_id: r.member_id,
            alarm: r.alarm,
        };
        let pair = (r.alarm, r.member_id);
        let change = match pb::alarm_request::AlarmAction::try_from(r.action) {
            Ok(pb::alarm_request::AlarmAction::Get) => {
                resp.alarms = self.get(r.alarm);
                None
            }
            Ok(pb::alarm_request::AlarmAction::Activate) => {
                if r.alarm == pb::AlarmType::None as i32 {
                    None
                } else {
                    resp.alarms.push(member);
                    if self.active.contains(&pair) {
                        None
                    } else {
                        batch.put(Bucket::Alarm, member.encode_to_vec(), Vec::new());
                        Some(AlarmChange::Activate(pair))
                    }
                }
            }
            Ok(pb::alarm_request::AlarmAction::Deactivate) => {
                if self.active.contains(&pair) {
                    resp.alarms.push(member);
                    batch.delete(Bucket::Alarm, member.encode_to_vec());
                    Some(AlarmChange::Deactivate(pair))
                } else {
                    None
                }
            }
            Err(_) => unreachable!("validate refused unknown actions"),
        };
        Ok((resp, change))
    }

    /// Records a change whose batch was written.
    pub fn commit(&mut self, change: AlarmChange) {
        match change {
            AlarmChange::Activate(p) => {
                self.active.insert(p);
            }
            AlarmChange::Deactivate(p) => {
                self.active.remove(&p);
            }
        }
    }
}

/// A change to the alarm set, applied in memory once its batch is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlarmChange {
    Activate((i32, u64)),
    Deactivate((i32, u64)),
}

/// etcd's pre-conditions an Alarm request must meet. etcd itself crashes on an unknown
/// action (a nil response) or on activating an unknown alarm type (it panics in apply);
/// MetaStore refuses both before they reach the log, and again at apply.
pub fn validate(r: &pb::AlarmRequest) -> Result<()> {
    let Ok(action) = pb::alarm_request::AlarmAction::try_from(r.action) else {
        return Err(Error::InvalidAlarm(format!(
            "unknown alarm action {}",
            r.action
        )));
    };
    if action == pb::alarm_request::AlarmAction::Activate
        && pb::AlarmType::try_from(r.alarm).is_err()
    {
        return Err(Error::InvalidAlarm(format!(
            "unknown alarm type {}",
            r.alarm
        )));
    }
    Ok(())
}

/// etcd's `kvOverhead`: what the quota charges a put beyond its key and value.
pub const KV_OVERHEAD: u64 = 256;
/// etcd's `leaseOverhead`: what the quota charges a lease grant.
pub const LEASE_OVERHEAD: u64 = 64;

/// etcd's `costPut`.
pub fn put_cost(r: &pb::PutRequest) -> u64 {
    KV_OVERHEAD + r.key.len() as u64 + r.value.len() as u64
}

/// etcd's `costTxn`: the costlier branch's puts. Only the branch's own puts count; a
/// nested transaction costs nothing, exactly as in etcd (3.4 to 3.6), so a put inside a
/// nested txn passes both the quota check and the NOSPACE alarm there too.
pub fn txn_cost(r: &pb::TxnRequest) -> u64 {
    fn branch(ops: &[pb::RequestOp]) -> u64 {
        ops.iter()
            .map(|op| match &op.request {
                Some(pb::request_op::Request::RequestPut(p)) => put_cost(p),
                _ => 0,
            })
            .sum()
    }
    branch(&r.success).max(branch(&r.failure))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemoryBackend;
    use pb::alarm_request::AlarmAction;

    fn req(action: AlarmAction, member_id: u64, alarm: pb::AlarmType) -> pb::AlarmRequest {
        pb::AlarmRequest {
            action: action as i32,
            member_id,
            alarm: alarm as i32,
        }
    }

    fn run(
        alarms: &mut Alarms,
        be: &MemoryBackend,
        r: pb::AlarmRequest,
    ) -> Result<pb::AlarmResponse> {
        let mut batch = WriteBatch::new();
        let (resp, change) = alarms.apply(&r, &mut batch)?;
        be.write(batch).unwrap();
        if let Some(c) = change {
            alarms.commit(c);
        }
        Ok(resp)
    }

    #[test]
    fn activate_get_deactivate_persist() {
        let be = MemoryBackend::new();
        let mut a = Alarms::open(&be).unwrap();
        let r = run(
            &mut a,
            &be,
            req(AlarmAction::Activate, 7, pb::AlarmType::Nospace),
        )
        .unwrap();
        assert_eq!(r.alarms.len(), 1);
        // Activating again answers with the alarm and changes nothing.
        let r = run(
            &mut a,
            &be,
            req(AlarmAction::Activate, 7, pb::AlarmType::Nospace),
        )
        .unwrap();
        assert_eq!(r.alarms.len(), 1);
        run(
            &mut a,
            &be,
            req(AlarmAction::Activate, 3, pb::AlarmType::Corrupt),
        )
        .unwrap();
        // NONE activates nothing.
        let r = run(
            &mut a,
            &be,
            req(AlarmAction::Activate, 3, pb::AlarmType::None),
        )
        .unwrap();
        assert!(r.alarms.is_empty());
        let all = run(&mut a, &be, req(AlarmAction::Get, 0, pb::AlarmType::None)).unwrap();
        assert_eq!(
            all.alarms,
            vec![
                pb::AlarmMember {
                    member_id: 7,
                    alarm: 1
                },
                pb::AlarmMember {
                    member_id: 3,
                    alarm: 2
                }
            ]
        );
        let only = run(
            &mut a,
            &be,
            req(AlarmAction::Get, 0, pb::AlarmType::Corrupt),
        )
        .unwrap();
        assert_eq!(only.alarms.len(), 1);
        // Reopening from the bucket gives the same set.
        assert_eq!(Alarms::open(&be).unwrap(), a);
        let r = run(
            &mut a,
            &be,
            req(AlarmAction::Deactivate, 7, pb::AlarmType::Nospace),
        )
        .unwrap();
        assert_eq!(r.alarms.len(), 1);
        let r = run(
            &mut a,
            &be,
            req(AlarmAction::Deactivate, 7, pb::AlarmType::Nospace),
        )
        .unwrap();
        assert!(r.alarms.is_empty());
        assert_eq!(Alarms::open(&be).unwrap(), a);
        assert_eq!(a.get(0).len(), 1);
    }

    #[test]
    fn bad_requests_are_refused_without_change() {
        let be = MemoryBackend::new();
        let mut a = Alarms::open(&be).unwrap();
        let bad_action = pb::AlarmRequest {
            action: 9,
            ..Default::default()
        };
        assert!(matches!(
            run(&mut a, &be, bad_action),
            Err(Error::InvalidAlarm(_))
        ));
        let bad_type = pb::AlarmRequest {
            action: AlarmAction::Activate as i32,
            member_id: 1,
            alarm: 42,
        };
        assert!(matches!(
            run(&mut a, &be, bad_type),
            Err(Error::InvalidAlarm(_))
        ));
        // Listing or deactivating an unknown type is harmless and answers nothing.
        let get = pb::AlarmRequest {
            action: AlarmAction::Get as i32,
            member_id: 0,
            alarm: 42,
        };
        assert!(run(&mut a, &be, get).unwrap().alarms.is_empty());
        assert!(a.is_empty());
    }

    #[test]
    fn what_each_alarm_refuses() {
        use pb::request_op::Request as Op;
        let put = pb::PutRequest {
            key: b"k".to_vec(),
            ..Default::default()
        };
        let txn_put = pb::TxnRequest {
            success: vec![pb::RequestOp {
                request: Some(Op::RequestPut(put.clone())),
            }],
            ..Default::default()
        };
        let txn_nested_put = pb::TxnRequest {
            success: vec![pb::RequestOp {
                request: Some(Op::RequestTxn(txn_put.clone())),
            }],
            ..Default::default()
        };
        let txn_delete = pb::TxnRequest {
            failure: vec![pb::RequestOp {
                request: Some(Op::RequestDeleteRange(pb::DeleteRangeRequest {
                    key: b"k".to_vec(),
                    ..Default::default()
                })),
            }],
            ..Default::default()
        };
        let kinds = [
            Request::Put(put),
            Request::Txn(txn_put),
            Request::Txn(txn_nested_put),
            Request::Txn(txn_delete),
            Request::DeleteRange(Default::default()),
            Request::Range(Default::default()),
            Request::Compaction(Default::default()),
            Request::LeaseGrant(Default::default()),
            Request::LeaseRevoke(Default::default()),
            Request::Alarm(Default::default()),
        ];
        let refusals = |alarms: &Alarms| -> Vec<Option<Error>> {
            kinds.iter().map(|k| alarms.refusal(k)).collect()
        };
        let none = Alarms::default();
        assert!(refusals(&none).iter().all(Option::is_none));
        let nospace = Alarms {
            active: [(pb::AlarmType::Nospace as i32, 1)].into(),
        };
        let ns = Some(Error::NoSpace);
        assert_eq!(
            refusals(&nospace),
            vec![
                ns.clone(),
                ns.clone(),
                None,
                None,
                None,
                None,
                None,
                ns,
                None,
                None
            ]
        );
        let corrupt = Alarms {
            active: [(pb::AlarmType::Corrupt as i32, 1)].into(),
        };
        let c = Some(Error::CorruptAlarm);
        assert_eq!(
            refusals(&corrupt),
            vec![
                c.clone(),
                c.clone(),
                c.clone(),
                c.clone(),
                c.clone(),
                c.clone(),
                c.clone(),
                c.clone(),
                c,
                None
            ]
        );
    }

    #[test]
    fn costs_follow_etcd() {
        use pb::request_op::Request as Op;
        let put = |k: &str, v: &str| pb::RequestOp {
            request: Some(Op::RequestPut(pb::PutRequest {
                key: k.into(),
                value: v.into(),
                ..Default::default()
            })),
        };
        let txn = pb::TxnRequest {
            compare: vec![],
            success: vec![put("a", "1"), put("bb", "22")],
            failure: vec![pb::RequestOp {
                request: Some(Op::RequestTxn(pb::TxnRequest {
                    success: vec![put("c", "333333")],
                    ..Default::default()
                })),
            }],
        };
        assert_eq!(txn_cost(&txn), 256 * 2 + 2 + 4);
        assert_eq!(txn_cost(&pb::TxnRequest::default()), 0);
    }
}
