//! Settling indeterminate writes with the watch streams, before the linearizability
//! search: every put and compare-and-swap of the workload writes a unique value, so a
//! watch event carrying that value on that key proves the write took effect, at the
//! event's revision. And when the streams together delivered every revision of the run,
//! a value no event carries was never written.
//!
//! This only narrows what the search must guess (each indeterminate write doubles its
//! branching); it must never invent an outcome the streams do not prove. Streams that
//! lie are `check_watches`'s to catch, and a KV history and streams that disagree still
//! fail one check or the other.

use std::collections::{BTreeSet, HashMap};

use crate::history::{History, KvOp, KvOutcome, KvRecord};

/// What [`resolve_indeterminate`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resolved {
    /// Indeterminate writes shown to have happened (now with their revision).
    pub happened: usize,
    /// Indeterminate writes shown not to have happened (dropped from the KV history).
    pub never: usize,
}

/// The KV history with indeterminate puts and compare-and-swaps settled where the watch
/// streams prove their fate. `final_revision` is the store's revision at the end (0 when
/// unknown, which disables the "never written" half).
pub fn resolve_indeterminate(history: &History, final_revision: i64) -> (Vec<KvRecord>, Resolved) {
    let mut written: HashMap<(&[u8], &[u8]), i64> = HashMap::new();
    let mut delivered: BTreeSet<i64> = BTreeSet::new();
    for record in &history.watches {
        for (_, events) in &record.responses {
            for e in events {
                delivered.insert(e.revision);
                if !e.deleted {
                    written.entry((&e.key, &e.value)).or_insert(e.revision);
                }
            }
        }
    }
    // Revision 1 is the empty store's; every later one is a write some stream must
    // have delivered for the record of writes to be complete.
    let complete = final_revision > 1 && (2..=final_revision).all(|r| delivered.contains(&r));
    let mut resolved = Resolved::default();
    let mut out = Vec::with_capacity(history.kv.len());
    for record in &history.kv {
        if record.outcome.is_some() {
            out.push(record.clone());
            continue;
        }
        let (key, value) = match &record.op {
            KvOp::Put { key, value } | KvOp::Cas { key, value, .. } => (key, value),
            _ => {
                out.push(record.clone());
                continue;
            }
        };
        match written.get(&(key.as_slice(), value.as_slice())) {
            Some(&revision) => {
                resolved.happened += 1;
                let outcome = match record.op {
                    KvOp::Put { .. } => KvOutcome::Put { revision },
                    _ => KvOutcome::Cas {
                        revision,
                        succeeded: true,
                        current: None,
                    },
                };
                // Still no completion time: it may have taken effect any time after
                // its invocation.
                out.push(KvRecord {
                    outcome: Some(outcome),
                    ..record.clone()
                });
            }
            // A put that never happened, or a swap that failed or never ran: no effect.
            None if complete => resolved.never += 1,
            None => out.push(record.clone()),
        }
    }
    (out, resolved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{WatchEnd, WatchRecord, WatchedEvent};

    fn indeterminate_put(value: &str) -> KvRecord {
        KvRecord {
            client: 0,
            op: KvOp::Put {
                key: b"k".to_vec(),
                value: value.into(),
            },
            invoked_ns: 10,
            completed_ns: None,
            outcome: None,
        }
    }

    fn stream(events: Vec<(i64, &str)>) -> WatchRecord {
        WatchRecord {
            watcher: 0,
            member: 0,
            key: b"k".to_vec(),
            range_end: Vec::new(),
            start_revision: 1,
            created_revision: 1,
            prev_kv: false,
            responses: events
                .into_iter()
                .map(|(revision, value)| {
                    (
                        revision,
                        vec![WatchedEvent {
                            key: b"k".to_vec(),
                            deleted: false,
                            revision,
                            value: value.into(),
                            prev: None,
                        }],
                    )
                })
                .collect(),
            end: WatchEnd::Stopped,
            started_ns: 0,
            ended_ns: 100,
        }
    }

    #[test]
    fn a_watched_value_settles_its_write_and_a_missing_one_drops_it() {
        let history = History {
            kv: vec![indeterminate_put("a"), indeterminate_put("b")],
            watches: vec![stream(vec![(2, "a")])],
            ..Default::default()
        };
        let (kv, resolved) = resolve_indeterminate(&history, 2);
        assert_eq!(
            resolved,
            Resolved {
                happened: 1,
                never: 1
            }
        );
        assert_eq!(kv.len(), 1);
        assert_eq!(kv[0].outcome, Some(KvOutcome::Put { revision: 2 }));
        assert_eq!(kv[0].completed_ns, None);
    }

    #[test]
    fn an_incomplete_watch_record_drops_nothing() {
        let history = History {
            kv: vec![indeterminate_put("b")],
            // Revision 3 exists (final revision 3) but no stream delivered it.
            watches: vec![stream(vec![(2, "a")])],
            ..Default::default()
        };
        let (kv, resolved) = resolve_indeterminate(&history, 3);
        assert_eq!(resolved, Resolved::default());
        assert_eq!(kv, history.kv);
    }
}
