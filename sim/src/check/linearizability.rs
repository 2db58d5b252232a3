//! Linearizability of KV histories, and the real-time order of revisions across keys.
//!
//! [`check_linearizable`] partitions a history by key (every `KvOp` touches one key, and
//! linearizability is compositional) and searches each partition for a linearization
//! accepted by [`KvModel`], a sequential etcd key. The search ([`search`]) is the
//! Wing & Gong backtracking search with Lowe's memoisation of (linearized set, model
//! state), as in Knossos and Porcupine, generic over a [`Model`]. It is bounded by a
//! budget of explored states and answers [`LinearizabilityResult::Inconclusive`] rather
//! than run away.
//!
//! [`check_revision_order`] is a cheap global check that ties the keys together: it sees
//! what no single-key search can (two keys' writes sharing a revision, a read on one key
//! served at a revision older than a write on another key that completed before it).
//!
//! This module owns the KV model's reading of etcd semantics. It must never panic on
//! any history (odd records are violations), and must never reject a history that a
//! correct etcd could produce: when in doubt the model allows.
//!
//! Assumption: the store is empty when the history starts (every key starts absent,
//! at revision 0).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::Hash;

use super::{show_bytes, CheckKind, Section, Violation};
use crate::history::{KvOp, KvOutcome, KvRecord, Versioned};

/// A sequential specification for [`search`].
pub trait Model {
    type State: Clone + Eq + Hash;
    type Op;
    type Outcome;

    fn init(&self) -> Self::State;

    /// The states `op` may lead to from `state` when it is linearized there with
    /// `outcome`; empty when it cannot be linearized there. With `outcome == None`
    /// (indeterminate), the states the operation leads to if it *took effect*: the
    /// search itself covers "it never took effect" by leaving it out, so returning the
    /// unchanged state is allowed but only wastes budget.
    fn step(
        &self,
        state: &Self::State,
        op: &Self::Op,
        outcome: Option<&Self::Outcome>,
    ) -> Vec<Self::State>;

    /// Whether `op`, taking effect as an indeterminate operation, leaves a state that
    /// makes any indeterminate operation linearized just before it pointless: the state
    /// reached without that earlier operation must permit everything the state reached
    /// with it permits (a blind overwrite). The search then never linearizes two such
    /// indeterminate operations in a row, which would otherwise explode with many
    /// pending indeterminate writes. The default, `false`, is always sound.
    fn overwrites(&self, op: &Self::Op) -> bool {
        let _ = op;
        false
    }

    /// The state for a report.
    fn describe(&self, state: &Self::State) -> String;
}

/// One operation for [`search`].
pub struct Operation<'a, M: Model> {
    pub op: &'a M::Op,
    /// `None`: indeterminate; it may be linearized any time after `invoked`, or never.
    pub outcome: Option<&'a M::Outcome>,
    pub invoked: u64,
    /// Ignored for indeterminate operations; use `u64::MAX` when unknown.
    pub returned: u64,
}

/// What [`search`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SearchOutcome {
    Linearizable,
    /// No linearization exists.
    NotLinearizable(Counterexample),
    /// The budget ran out after exploring this many states.
    BudgetExhausted {
        explored: usize,
    },
}

/// The longest partial linearization the search found, and where it got stuck.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counterexample {
    /// Indices (into the searched slice) of the longest linearizable prefix, in
    /// linearization order (indeterminate operations that took effect included).
    pub prefix: Vec<usize>,
    /// The model state after the prefix.
    pub state: String,
    /// Indices of the determinate operations that could come next, none of which could
    /// be linearized; the one that must be linearized first (earliest return) first.
    pub stuck: Vec<usize>,
    /// Indices of indeterminate operations pending at that point.
    pub pending: Vec<usize>,
}

/// A set of operation positions.
type Bits = Box<[u64]>;

fn bit(bits: &[u64], i: usize) -> bool {
    bits[i / 64] & (1 << (i % 64)) != 0
}

/// Wing & Gong / Lowe search for a linearization of `ops` under `model`, exploring at
/// most `budget` distinct (linearized set, state) pairs.
pub fn search<M: Model>(model: &M, ops: &[Operation<'_, M>], budget: usize) -> SearchOutcome {
    // Positions: determinate operations by invocation then return, then indeterminate
    // ones by invocation. Success is "every determinate operation linearized": an
    // indeterminate one left over never took effect.
    let mut order: Vec<usize> = (0..ops.len()).collect();
    order.sort_by_key(|&i| (ops[i].outcome.is_none(), ops[i].invoked, ops[i].returned, i));
    let det = order.iter().filter(|&&i| ops[i].outcome.is_some()).count();
    let inv: Vec<u64> = order.iter().map(|&i| ops[i].invoked).collect();
    // A return before the invocation (an odd record) is read as a return at invocation.
    let ret: Vec<u64> = order
        .iter()
        .map(|&i| ops[i].returned.max(ops[i].invoked))
        .collect();
    if det == 0 {
        return SearchOutcome::Linearizable;
    }
    let words = order.len().div_ceil(64);

    // The determinate positions that may be linearized next (the window of operations
    // invoked no later than the earliest return among those not yet linearized, whose
    // first element is the earliest-returning one), and that earliest return.
    let window = |bits: &[u64]| -> (Vec<usize>, u64) {
        let Some(first) = (0..det).find(|&p| !bit(bits, p)) else {
            return (Vec::new(), u64::MAX);
        };
        let mut min_ret = ret[first];
        let mut earliest = 0;
        let mut cands = Vec::new();
        let mut p = first;
        // Scanning by invocation: a later return lowering `min_ret` is still at or after
        // every earlier invocation, so every scanned position stays in the window.
        while p < det && inv[p] <= min_ret {
            if !bit(bits, p) {
                if ret[p] < min_ret {
                    min_ret = ret[p];
                    earliest = cands.len();
                }
                cands.push(p);
            }
            p += 1;
        }
        cands.swap(0, earliest);
        (cands, min_ret)
    };
    let pending = |bits: &[u64], min_ret: u64| -> Vec<usize> {
        (det..order.len())
            .filter(|&p| !bit(bits, p) && inv[p] <= min_ret)
            .collect()
    };
    // `after_indeterminate`: the last linearized operation was indeterminate, so an
    // overwriting indeterminate operation may not follow it (see `Model::overwrites`).
    let children = |bits: &[u64], state: &M::State, after_indeterminate: bool| {
        let (mut cands, min_ret) = window(bits);
        cands.extend(
            pending(bits, min_ret)
                .into_iter()
                .filter(|&p| !(after_indeterminate && model.overwrites(ops[order[p]].op))),
        );
        let mut out: Vec<(usize, M::State)> = Vec::new();
        for p in cands {
            let op = &ops[order[p]];
            for next in model.step(state, op.op, op.outcome) {
                out.push((p, next));
            }
        }
        out
    };

    struct Frame<S> {
        bits: Bits,
        via: Option<usize>,
        children: Vec<(usize, S)>,
        next: usize,
    }

    let root_bits: Bits = vec![0u64; words].into_boxed_slice();
    let root_state = model.init();
    let mut seen: HashSet<(Bits, M::State)> = HashSet::new();
    seen.insert((root_bits.clone(), root_state.clone()));
    let mut best = (
        0usize,
        Vec::<usize>::new(),
        root_bits.clone(),
        root_state.clone(),
    );
    let mut stack = vec![Frame {
        children: children(&root_bits, &root_state, false),
        bits: root_bits,
        via: None,
        next: 0,
    }];
    let mut done_det = vec![0usize];

    while let Some(top) = stack.last_mut() {
        let Some((p, next_state)) = top.children.get(top.next).cloned() else {
            stack.pop();
            done_det.pop();
            continue;
        };
        top.next += 1;
        let mut bits = top.bits.clone();
        bits[p / 64] |= 1 << (p % 64);
        if !seen.insert((bits.clone(), next_state.clone())) {
            continue;
        }
        if seen.len() > budget {
            return SearchOutcome::BudgetExhausted {
                explored: seen.len(),
            };
        }
        let done = done_det.last().copied().unwrap_or(0) + usize::from(p < det);
        if done == det {
            return SearchOutcome::Linearizable;
        }
        if done > best.0 {
            let mut path: Vec<usize> = stack.iter().filter_map(|f| f.via).collect();
            path.push(p);
            best = (done, path, bits.clone(), next_state.clone());
        }
        stack.push(Frame {
            children: children(&bits, &next_state, p >= det),
            bits,
            via: Some(p),
            next: 0,
        });
        done_det.push(done);
    }

    let (_, path, bits, state) = best;
    let (stuck, min_ret) = window(&bits);
    SearchOutcome::NotLinearizable(Counterexample {
        prefix: path.iter().map(|&p| order[p]).collect(),
        state: model.describe(&state),
        stuck: stuck.iter().map(|&p| order[p]).collect(),
        pending: pending(&bits, min_ret).iter().map(|&p| order[p]).collect(),
    })
}

/// A key's mod revision in the model.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ModRevision {
    Known(i64),
    /// Set by an indeterminate write linearized when the store's revision was at least
    /// `above`: the revision is greater than `above`, otherwise unknown until a read
    /// reports it.
    Unknown {
        above: i64,
    },
}

/// A key's value in the model.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Current {
    pub value: Vec<u8>,
    pub mod_revision: ModRevision,
}

/// The state of one key in [`KvModel`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyState {
    /// `None`: absent.
    pub current: Option<Current>,
    /// A lower bound of the store's revision at this point of the linearization: the
    /// highest revision a linearized operation wrote or was served at (plus one per
    /// indeterminate write since). A write must create a revision above it, a read must
    /// be served at or above it: the store's revision only grows.
    pub floor: i64,
}

/// One etcd key, as a sequential specification over `KvOp`/`KvOutcome`.
///
/// CAS on a key whose mod revision is unknown (an indeterminate write set it): a
/// success with expected revision `e` is allowed when `e != 0` and `e` lies between the
/// revision the unknown write is known to be above and the CAS's own revision; a
/// failure is allowed whenever the failure's `current` fits the state (which resolves
/// the unknown revision). Anything else would reject histories a correct store can
/// produce.
#[derive(Debug, Clone, Copy, Default)]
pub struct KvModel;

impl KvModel {
    /// The state after a read at header revision `header` observed `kv`, or `None` if
    /// `kv` cannot be what `current` holds.
    fn observe(
        current: &Option<Current>,
        kv: &Option<Versioned>,
        header: i64,
    ) -> Option<Option<Current>> {
        match (current, kv) {
            (None, None) => Some(None),
            (Some(cur), Some(seen)) => {
                let revision_fits = match cur.mod_revision {
                    ModRevision::Known(m) => m == seen.mod_revision,
                    ModRevision::Unknown { above } => seen.mod_revision > above,
                };
                (cur.value == seen.value && revision_fits && seen.mod_revision <= header).then(
                    || {
                        Some(Current {
                            value: seen.value.clone(),
                            mod_revision: ModRevision::Known(seen.mod_revision),
                        })
                    },
                )
            }
            _ => None,
        }
    }

    /// Whether a CAS expecting `expected` can succeed on `current`; `revision` is the
    /// CAS's own revision when known.
    fn cas_matches(current: &Option<Current>, expected: i64, revision: Option<i64>) -> bool {
        match current {
            None => expected == 0,
            Some(_) if expected == 0 => false,
            Some(cur) => match cur.mod_revision {
                ModRevision::Known(m) => m == expected,
                ModRevision::Unknown { above } => {
                    expected > above && revision.is_none_or(|r| expected < r)
                }
            },
        }
    }

    fn set(value: &[u8], mod_revision: ModRevision, floor: i64) -> KeyState {
        KeyState {
            current: Some(Current {
                value: value.to_vec(),
                mod_revision,
            }),
            floor,
        }
    }
}

impl Model for KvModel {
    type State = KeyState;
    type Op = KvOp;
    type Outcome = KvOutcome;

    fn init(&self) -> KeyState {
        KeyState {
            current: None,
            floor: 0,
        }
    }

    fn step(&self, s: &KeyState, op: &KvOp, outcome: Option<&KvOutcome>) -> Vec<KeyState> {
        let floor = s.floor;
        // An indeterminate write that took effect created some revision above `floor`.
        let unknown = ModRevision::Unknown { above: floor };
        let next = match (op, outcome) {
            (KvOp::Put { value, .. }, Some(KvOutcome::Put { revision })) => (*revision > floor)
                .then(|| Self::set(value, ModRevision::Known(*revision), *revision)),
            (KvOp::Put { value, .. }, None) => {
                Some(Self::set(value, unknown, floor.saturating_add(1)))
            }
            (KvOp::Get { .. }, Some(KvOutcome::Get { revision, kv })) => {
                if *revision < floor {
                    None
                } else {
                    Self::observe(&s.current, kv, *revision).map(|current| KeyState {
                        current,
                        floor: *revision,
                    })
                }
            }
            (KvOp::Delete { .. }, Some(KvOutcome::Delete { revision, deleted })) => match deleted {
                0 => (s.current.is_none() && *revision >= floor).then_some(KeyState {
                    current: None,
                    floor: *revision,
                }),
                1 => (s.current.is_some() && *revision > floor).then_some(KeyState {
                    current: None,
                    floor: *revision,
                }),
                // A single-key delete deletes at most one key.
                _ => None,
            },
            (KvOp::Delete { .. }, None) => s.current.is_some().then_some(KeyState {
                current: None,
                floor: floor.saturating_add(1),
            }),
            (
                KvOp::Cas {
                    expected_mod_revision,
                    value,
                    ..
                },
                Some(KvOutcome::Cas {
                    revision,
                    succeeded,
                    current,
                }),
            ) => {
                if *succeeded {
                    (*revision > floor
                        && Self::cas_matches(&s.current, *expected_mod_revision, Some(*revision)))
                    .then(|| Self::set(value, ModRevision::Known(*revision), *revision))
                } else if *revision < floor {
                    None
                } else {
                    // The else branch read `current`, which must be the state and must
                    // not match the expectation.
                    Self::observe(&s.current, current, *revision)
                        .filter(|seen| !Self::cas_matches(seen, *expected_mod_revision, None))
                        .map(|current| KeyState {
                            current,
                            floor: *revision,
                        })
                }
            }
            (
                KvOp::Cas {
                    expected_mod_revision,
                    value,
                    ..
                },
                None,
            ) => Self::cas_matches(&s.current, *expected_mod_revision, None)
                .then(|| Self::set(value, unknown, floor.saturating_add(1))),
            // An indeterminate read constrains nothing; an outcome of another operation's
            // kind cannot be linearized anywhere.
            _ => None,
        };
        next.into_iter().collect()
    }

    /// An indeterminate put or delete: the state after it is the same whatever came
    /// just before it (or, for a delete, the same as not applying either), with a floor
    /// and `Unknown::above` at least as permissive without the earlier operation. A CAS
    /// depends on the state before it, so it is not an overwrite.
    fn overwrites(&self, op: &KvOp) -> bool {
        matches!(op, KvOp::Put { .. } | KvOp::Delete { .. })
    }

    fn describe(&self, s: &KeyState) -> String {
        let value = match &s.current {
            None => "absent".to_string(),
            Some(Current {
                value,
                mod_revision: ModRevision::Known(m),
            }) => format!("{}@{m}", show_bytes(value)),
            Some(Current {
                value,
                mod_revision: ModRevision::Unknown { above },
            }) => format!("{}@? (> {above})", show_bytes(value)),
        };
        format!("{value}, store revision >= {}", s.floor)
    }
}

/// What [`check_linearizable`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinearizabilityResult {
    /// Every key's operations have a linearization.
    Ok,
    /// Some key's operations have none; the report names the key and shows the last
    /// operations of the longest linearizable prefix, the operations that could have
    /// come next (none fits) and the indeterminate writes pending then.
    Violation(Violation),
    /// No violation found, but the search for this key (the first such key) ran out of
    /// budget before deciding.
    Inconclusive { key: Vec<u8>, explored: usize },
}

impl LinearizabilityResult {
    pub fn is_ok(&self) -> bool {
        matches!(self, LinearizabilityResult::Ok)
    }
}

/// How many operations of the linearizable prefix a report shows.
const REPORT_PREFIX: usize = 6;
/// How many pending indeterminate operations a report shows.
const REPORT_PENDING: usize = 8;

/// Checks that every key's operations in `history` are linearizable against a
/// sequential etcd key, exploring at most `budget` states per key. A violation on any
/// key wins over an inconclusive key.
pub fn check_linearizable(history: &[KvRecord], budget: usize) -> LinearizabilityResult {
    let mut keys: BTreeMap<&[u8], Vec<&KvRecord>> = BTreeMap::new();
    for record in history {
        // An indeterminate read had no effect and constrains nothing.
        if record.outcome.is_none() && !record.op.is_write() {
            continue;
        }
        keys.entry(record.op.key()).or_default().push(record);
    }
    let mut inconclusive = None;
    for (key, records) in keys {
        let ops: Vec<Operation<'_, KvModel>> = records
            .iter()
            .map(|r| Operation {
                op: &r.op,
                outcome: r.outcome.as_ref(),
                invoked: r.invoked_ns,
                returned: r.completed_ns.unwrap_or(u64::MAX),
            })
            .collect();
        match search(&KvModel, &ops, budget) {
            SearchOutcome::Linearizable => {}
            SearchOutcome::BudgetExhausted { explored } => {
                inconclusive.get_or_insert((key.to_vec(), explored));
            }
            SearchOutcome::NotLinearizable(cx) => {
                return LinearizabilityResult::Violation(report(key, &records, &cx));
            }
        }
    }
    match inconclusive {
        Some((key, explored)) => LinearizabilityResult::Inconclusive { key, explored },
        None => LinearizabilityResult::Ok,
    }
}

fn report(key: &[u8], records: &[&KvRecord], cx: &Counterexample) -> Violation {
    let pick = |indices: &[usize]| -> Vec<KvRecord> {
        indices
            .iter()
            .filter_map(|&i| records.get(i).map(|r| (*r).clone()))
            .collect()
    };
    let shown = cx.prefix.len().saturating_sub(REPORT_PREFIX);
    let mut pending = pick(&cx.pending);
    let more_pending = pending.len().saturating_sub(REPORT_PENDING);
    pending.truncate(REPORT_PENDING);
    Violation::new(
        CheckKind::Linearizability,
        Some(key),
        format!(
            "no linearization of the {} operations on this key; the longest linearizable \
             prefix has {} operations and leaves the key {}, and none of the operations that \
             could come next fits",
            records.len(),
            cx.prefix.len(),
            cx.state
        ),
    )
    .with(Section::kv(
        format!(
            "end of the longest linearizable prefix (last {} of {}, in linearization order)",
            cx.prefix.len() - shown,
            cx.prefix.len()
        ),
        pick(&cx.prefix[shown..]),
    ))
    .with(Section::kv(
        "could come next, none fits (the first must come before the later ones' successors)",
        pick(&cx.stuck),
    ))
    .with(Section::kv(
        if more_pending > 0 {
            format!("indeterminate writes pending then (and {more_pending} more)")
        } else {
            "indeterminate writes pending then".to_string()
        },
        pending,
    ))
}

/// Checks revisions across keys against real time and against each other:
///
/// - distinct successful writes never share a revision;
/// - if A completed before B was invoked, B's header revision is at least A's, and
///   greater if B wrote (so writes' revisions follow real time, a read after a write is
///   served at or after it, and a write after a read creates a newer revision);
/// - a value a read returned with mod revision `m` (a `Get`, or a failed CAS's
///   `current`) is no newer than the read's header, and if a known write created `m`,
///   that write is a put (or CAS) of the same key and value.
///
/// Completion and invocation at the same instant count as concurrent.
pub fn check_revision_order(history: &[KvRecord]) -> Result<(), Violation> {
    let violation = |key: Option<&[u8]>, message: String, records: Vec<&KvRecord>| {
        Violation::new(CheckKind::RevisionOrder, key, message).with(Section::kv(
            "records",
            records.into_iter().cloned().collect(),
        ))
    };

    let mut writers: HashMap<i64, &KvRecord> = HashMap::new();
    for record in history {
        let Some(revision) = record
            .outcome
            .as_ref()
            .and_then(KvOutcome::written_revision)
        else {
            continue;
        };
        if let Some(other) = writers.insert(revision, record) {
            return Err(violation(
                None,
                format!("two writes created revision {revision}"),
                vec![other, record],
            ));
        }
    }

    for record in history {
        let observed = match &record.outcome {
            Some(KvOutcome::Get { kv: Some(v), .. }) => v,
            Some(KvOutcome::Cas {
                succeeded: false,
                current: Some(v),
                ..
            }) => v,
            _ => continue,
        };
        let header = record.outcome.as_ref().map_or(0, KvOutcome::revision);
        let key = record.op.key();
        if observed.mod_revision > header || observed.mod_revision < 1 {
            return Err(violation(
                Some(key),
                format!(
                    "read a mod revision {} outside 1..={header} (its header revision)",
                    observed.mod_revision
                ),
                vec![record],
            ));
        }
        let Some(writer) = writers.get(&observed.mod_revision) else {
            continue;
        };
        let matches = match &writer.op {
            KvOp::Put { key: k, value } | KvOp::Cas { key: k, value, .. } => {
                k.as_slice() == key && *value == observed.value
            }
            KvOp::Delete { .. } | KvOp::Get { .. } => false,
        };
        if !matches {
            return Err(violation(
                Some(key),
                format!(
                    "read {}@{} but revision {} was written by another operation",
                    show_bytes(&observed.value),
                    observed.mod_revision,
                    observed.mod_revision
                ),
                vec![writer, record],
            ));
        }
    }

    // Completed records by completion time, with the running maximum header revision.
    let mut completed: Vec<(u64, i64, &KvRecord)> = history
        .iter()
        .filter_map(|r| Some((r.completed_ns?, r.outcome.as_ref()?.revision(), r)))
        .collect();
    completed.sort_by_key(|&(t, _, _)| t);
    let mut running: Vec<(u64, i64, &KvRecord)> = Vec::with_capacity(completed.len());
    let mut max: Option<(i64, &KvRecord)> = None;
    for (t, revision, record) in completed {
        let (m, r) = match max {
            Some((m, r)) if m >= revision => (m, r),
            _ => (revision, record),
        };
        max = Some((m, r));
        running.push((t, m, r));
    }
    for record in history {
        let Some(outcome) = &record.outcome else {
            continue;
        };
        // Records that completed strictly before this one was invoked.
        let before = running.partition_point(|&(t, _, _)| t < record.invoked_ns);
        let Some(&(_, max, earlier)) = before.checked_sub(1).and_then(|i| running.get(i)) else {
            continue;
        };
        let revision = outcome.revision();
        let wrote = outcome.written_revision().is_some();
        if revision < max || (wrote && revision == max) {
            return Err(violation(
                None,
                format!(
                    "revision {revision} {} after an operation at revision {max} completed",
                    if wrote { "was written" } else { "was read" }
                ),
                vec![earlier, record],
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const BUDGET: usize = 1_000_000;

    fn rec(client: usize, op: KvOp, t: (u64, Option<u64>), outcome: Option<KvOutcome>) -> KvRecord {
        KvRecord {
            client,
            op,
            invoked_ns: t.0,
            completed_ns: t.1,
            outcome,
        }
    }

    fn put(c: usize, k: &str, v: &str, t: (u64, u64), revision: i64) -> KvRecord {
        let op = KvOp::Put {
            key: k.into(),
            value: v.into(),
        };
        rec(c, op, (t.0, Some(t.1)), Some(KvOutcome::Put { revision }))
    }

    fn put_lost(c: usize, k: &str, v: &str, invoked: u64) -> KvRecord {
        let op = KvOp::Put {
            key: k.into(),
            value: v.into(),
        };
        rec(c, op, (invoked, None), None)
    }

    fn vers(v: &str, m: i64) -> Option<Versioned> {
        Some(Versioned {
            value: v.into(),
            mod_revision: m,
        })
    }

    fn get(c: usize, k: &str, t: (u64, u64), revision: i64, kv: Option<Versioned>) -> KvRecord {
        let op = KvOp::Get { key: k.into() };
        rec(
            c,
            op,
            (t.0, Some(t.1)),
            Some(KvOutcome::Get { revision, kv }),
        )
    }

    fn del(c: usize, k: &str, t: (u64, u64), revision: i64, deleted: i64) -> KvRecord {
        let op = KvOp::Delete { key: k.into() };
        let outcome = KvOutcome::Delete { revision, deleted };
        rec(c, op, (t.0, Some(t.1)), Some(outcome))
    }

    fn cas_op(k: &str, expected: i64, v: &str) -> KvOp {
        KvOp::Cas {
            key: k.into(),
            expected_mod_revision: expected,
            value: v.into(),
        }
    }

    fn cas(
        c: usize,
        k: &str,
        expected: i64,
        v: &str,
        t: (u64, u64),
        revision: i64,
        current: Option<Option<Versioned>>,
    ) -> KvRecord {
        let outcome = KvOutcome::Cas {
            revision,
            succeeded: current.is_none(),
            current: current.flatten(),
        };
        rec(c, cas_op(k, expected, v), (t.0, Some(t.1)), Some(outcome))
    }

    fn accepts(h: &[KvRecord]) {
        let result = check_linearizable(h, BUDGET);
        assert!(result.is_ok(), "{result:?}");
        if let Err(v) = check_revision_order(h) {
            panic!("{v}");
        }
    }

    fn violation(h: &[KvRecord]) -> Violation {
        match check_linearizable(h, BUDGET) {
            LinearizabilityResult::Violation(v) => v,
            other => panic!("expected a violation, got {other:?}"),
        }
    }

    #[test]
    fn empty_and_sequential_histories_are_linearizable() {
        accepts(&[]);
        accepts(&[
            get(0, "a", (0, 1), 0, None),
            put(0, "a", "x", (2, 3), 1),
            get(0, "a", (4, 5), 1, vers("x", 1)),
            del(0, "a", (6, 7), 2, 1),
            del(0, "a", (8, 9), 2, 0),
            get(0, "a", (10, 11), 2, None),
        ]);
    }

    #[test]
    fn concurrent_ops_with_several_linearizations() {
        // Two overlapping puts and two reads seeing them in either order of reads.
        accepts(&[
            put(0, "a", "x", (0, 10), 1),
            put(1, "a", "y", (2, 12), 2),
            get(2, "a", (5, 15), 1, vers("x", 1)),
            get(3, "a", (6, 16), 2, vers("y", 2)),
            get(2, "a", (20, 30), 2, vers("y", 2)),
        ]);
        // The read may also precede both puts.
        accepts(&[
            put(0, "a", "x", (0, 10), 1),
            put(1, "a", "y", (2, 12), 2),
            get(2, "a", (1, 15), 0, None),
        ]);
    }

    #[test]
    fn indeterminate_writes_that_did_and_did_not_take_effect() {
        accepts(&[
            put_lost(0, "a", "x", 0),
            put_lost(1, "a", "z", 1),
            // "x" took effect at an unknown revision; the read tells which.
            get(2, "a", (10, 20), 3, vers("x", 3)),
            put(2, "a", "y", (21, 22), 4),
            get(2, "a", (23, 24), 4, vers("y", 4)),
        ]);
        // A lost put that never shows up, and one that shows up only after later writes.
        accepts(&[
            put_lost(0, "a", "x", 0),
            put(1, "a", "y", (5, 6), 1),
            get(1, "a", (7, 8), 1, vers("y", 1)),
            get(1, "a", (9, 10), 2, vers("x", 2)),
        ]);
        // An indeterminate delete that took effect.
        let lost_delete = rec(1, KvOp::Delete { key: "a".into() }, (3, None), None);
        accepts(&[
            put(0, "a", "x", (0, 1), 1),
            lost_delete,
            get(0, "a", (10, 11), 2, None),
        ]);
    }

    #[test]
    fn cas_race_one_wins() {
        accepts(&[
            put(0, "a", "x", (0, 5), 1),
            cas(1, "a", 1, "y", (10, 20), 2, None),
            cas(2, "a", 1, "z", (11, 21), 2, Some(vers("y", 2))),
            get(0, "a", (30, 40), 2, vers("y", 2)),
            // Create-if-absent on another key.
            cas(0, "b", 0, "p", (41, 42), 3, None),
            cas(0, "b", 0, "q", (43, 44), 3, Some(vers("p", 3))),
        ]);
    }

    #[test]
    fn indeterminate_cas_may_match_an_unknown_mod_revision() {
        accepts(&[
            put_lost(0, "a", "x", 0),
            rec(1, cas_op("a", 5, "y"), (1, None), None),
            get(1, "a", (20, 21), 6, vers("y", 6)),
        ]);
        // A CAS that succeeded against a value whose revision was unknown.
        accepts(&[
            put_lost(0, "a", "x", 0),
            cas(1, "a", 5, "y", (10, 11), 6, None),
        ]);
    }

    #[test]
    fn rejects_a_stale_read() {
        let v = violation(&[
            put(0, "a", "x", (0, 5), 1),
            put(0, "a", "y", (10, 15), 2),
            get(1, "a", (20, 25), 2, vers("x", 1)),
        ]);
        assert_eq!(v.key.as_deref(), Some(&b"a"[..]));
        let shown = v.to_string();
        assert!(shown.contains("get(a)"), "{shown}");
    }

    #[test]
    fn rejects_a_lost_write() {
        violation(&[put(0, "a", "x", (0, 5), 1), get(1, "a", (10, 15), 1, None)]);
    }

    #[test]
    fn rejects_a_value_never_written() {
        violation(&[
            put(0, "a", "x", (0, 5), 1),
            get(1, "a", (10, 15), 1, vers("q", 1)),
        ]);
        violation(&[
            put_lost(0, "a", "x", 0),
            get(1, "a", (10, 15), 1, vers("q", 1)),
        ]);
    }

    #[test]
    fn rejects_bad_cas_and_delete() {
        // Both CASes of a race succeed.
        violation(&[
            put(0, "a", "x", (0, 5), 1),
            cas(1, "a", 1, "y", (10, 20), 2, None),
            cas(2, "a", 1, "z", (11, 21), 3, None),
        ]);
        // A failed CAS whose `current` matched the expectation.
        violation(&[
            put(0, "a", "x", (0, 5), 1),
            cas(1, "a", 1, "y", (10, 20), 1, Some(vers("x", 1))),
        ]);
        // Deleting a key nobody wrote.
        violation(&[del(0, "a", (0, 1), 1, 1)]);
    }

    #[test]
    fn rejects_revisions_out_of_real_time_order() {
        // On one key: the model needs increasing revisions.
        violation(&[put(0, "a", "x", (0, 5), 5), put(1, "a", "y", (10, 15), 3)]);
        // Across keys: only the global check sees it.
        let h = [put(0, "a", "x", (0, 5), 5), put(1, "b", "y", (10, 15), 3)];
        assert!(check_linearizable(&h, BUDGET).is_ok());
        assert!(check_revision_order(&h).is_err());
        // A read served at an older revision than a completed write on another key.
        let h = [put(0, "a", "x", (0, 5), 5), get(1, "b", (10, 15), 4, None)];
        assert!(check_revision_order(&h).is_err());
        // Concurrent: fine either way.
        let h = [put(0, "a", "x", (0, 10), 5), put(1, "b", "y", (5, 15), 3)];
        assert!(check_revision_order(&h).is_ok());
    }

    #[test]
    fn rejects_two_writes_sharing_a_revision() {
        let h = [put(0, "a", "x", (0, 10), 2), put(1, "b", "y", (5, 15), 2)];
        let v = check_revision_order(&h).expect_err("shared revision");
        assert_eq!(v.kv_records().count(), 2);
        // A read of one key's revision with another key's write.
        let h = [
            put(0, "a", "x", (0, 10), 2),
            get(1, "b", (20, 30), 2, vers("x", 2)),
        ];
        assert!(check_revision_order(&h).is_err());
    }

    #[test]
    fn odd_records_do_not_panic() {
        let odd = [
            // A completion before the invocation, an outcome of the wrong kind, a
            // completed indeterminate op, a delete of two keys.
            put(0, "a", "x", (10, 5), 1),
            rec(
                1,
                KvOp::Get { key: "a".into() },
                (0, Some(1)),
                Some(KvOutcome::Put { revision: 1 }),
            ),
            rec(2, KvOp::Get { key: "a".into() }, (0, Some(1)), None),
            del(3, "b", (0, 1), 1, 2),
            get(4, "c", (0, 1), -1, vers("", -5)),
        ];
        for n in 0..=odd.len() {
            let _ = check_linearizable(&odd[..n], BUDGET);
            let _ = check_revision_order(&odd[..n]);
        }
    }

    #[test]
    fn budget_gives_inconclusive() {
        let h: Vec<KvRecord> = (0..8)
            .map(|i| put_lost(i, "a", &format!("v{i}"), 0))
            .chain([get(9, "a", (1, 2), 9, vers("nope", 9))])
            .collect();
        assert!(matches!(
            check_linearizable(&h, 3),
            LinearizabilityResult::Inconclusive { .. }
        ));
        assert!(matches!(
            check_linearizable(&h, BUDGET),
            LinearizabilityResult::Violation(_)
        ));
    }

    /// One operation of a generated sequential execution, at its true position.
    #[derive(Debug, Clone)]
    struct Gen {
        key: u8,
        kind: u8,
        /// 0: determinate; 1: indeterminate, took effect; 2: indeterminate, never did.
        fate: u8,
        before: u64,
        after: u64,
    }

    fn gen_op() -> impl Strategy<Value = Gen> {
        (
            0u8..3,
            0u8..4,
            prop_oneof![8 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8)],
            0u64..40,
            0u64..40,
        )
            .prop_map(|(key, kind, fate, before, after)| Gen {
                key,
                kind,
                fate,
                before,
                after,
            })
    }

    /// Runs `ops` sequentially on a real store, op `i` taking effect at time `10 * i +
    /// 5` inside an interval jittered around it, and returns the history with, for each
    /// record, the sequential position of the write that produced what it left.
    fn execute(ops: &[Gen]) -> Vec<KvRecord> {
        let mut store: BTreeMap<Vec<u8>, Versioned> = BTreeMap::new();
        let mut revision = 0i64;
        let mut out = Vec::new();
        for (i, g) in ops.iter().enumerate() {
            let key = vec![b'a' + g.key];
            let value = format!("v{i}").into_bytes();
            let at = 10 * i as u64 + 5 + 1_000;
            let invoked = at - g.before;
            let current = store.get(&key).cloned();
            let (op, outcome) = match g.kind {
                0 => (
                    KvOp::Get { key: key.clone() },
                    KvOutcome::Get {
                        revision,
                        kv: current,
                    },
                ),
                1 => {
                    if g.fate != 2 {
                        revision += 1;
                        store.insert(
                            key.clone(),
                            Versioned {
                                value: value.clone(),
                                mod_revision: revision,
                            },
                        );
                    }
                    (
                        KvOp::Put {
                            key: key.clone(),
                            value,
                        },
                        KvOutcome::Put { revision },
                    )
                }
                2 => {
                    let deleted = i64::from(current.is_some());
                    if g.fate != 2 && deleted == 1 {
                        revision += 1;
                        store.remove(&key);
                    }
                    (
                        KvOp::Delete { key: key.clone() },
                        KvOutcome::Delete { revision, deleted },
                    )
                }
                _ => {
                    // Expect the current revision half the time, a wrong one otherwise.
                    let actual = current.as_ref().map_or(0, |v| v.mod_revision);
                    let expected = if g.before % 2 == 0 {
                        actual
                    } else {
                        actual + 1
                    };
                    let succeeded = expected == actual;
                    if succeeded && g.fate != 2 {
                        revision += 1;
                        store.insert(
                            key.clone(),
                            Versioned {
                                value: value.clone(),
                                mod_revision: revision,
                            },
                        );
                    }
                    let op = KvOp::Cas {
                        key: key.clone(),
                        expected_mod_revision: expected,
                        value,
                    };
                    (
                        op,
                        KvOutcome::Cas {
                            revision,
                            succeeded,
                            current: if succeeded { None } else { current },
                        },
                    )
                }
            };
            let indeterminate = g.fate != 0 && op.is_write();
            out.push(KvRecord {
                client: i % 8,
                op,
                invoked_ns: invoked,
                completed_ns: (!indeterminate).then_some(at + g.after),
                outcome: (!indeterminate).then_some(outcome),
            });
        }
        out
    }

    /// A harness-sized history (3,000 operations over 3 keys, about 8 overlapping,
    /// 10% indeterminate writes) is decided well within the budget.
    #[test]
    fn decides_a_large_history() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let ops: Vec<Gen> = (0..3_000)
            .map(|_| Gen {
                key: rng.gen_range(0..3),
                kind: rng.gen_range(0..4),
                fate: if rng.gen_bool(0.1) {
                    rng.gen_range(1..3)
                } else {
                    0
                },
                before: rng.gen_range(0..40),
                after: rng.gen_range(0..40),
            })
            .collect();
        let h = execute(&ops);
        let result = check_linearizable(&h, 200_000);
        assert!(result.is_ok(), "{result:?}");
        assert!(check_revision_order(&h).is_ok());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn accepts_jittered_sequential_executions(ops in prop::collection::vec(gen_op(), 0..60)) {
            let h = execute(&ops);
            let result = check_linearizable(&h, BUDGET);
            prop_assert!(result.is_ok(), "{:?}", result);
            prop_assert!(check_revision_order(&h).is_ok());
        }

        /// A read returning a value never written, or a value with the wrong mod revision
        /// when its write's revision is known, is always caught; so is a stale value
        /// when the write that replaced it completed before the read was invoked.
        #[test]
        fn rejects_a_mutated_read(
            ops in prop::collection::vec(gen_op(), 1..60),
            pick in any::<prop::sample::Index>(),
            how in 0u8..3,
        ) {
            let mut h = execute(&ops);
            let reads: Vec<usize> = (0..h.len())
                .filter(|&i| matches!(h[i].outcome, Some(KvOutcome::Get { .. })))
                .collect();
            prop_assume!(!reads.is_empty());
            let r = reads[pick.index(reads.len())];
            let key = h[r].op.key().to_vec();
            let Some(KvOutcome::Get { revision, kv }) = h[r].outcome.clone() else { unreachable!() };
            let mutated = match how {
                0 => vers("never-written", kv.as_ref().map_or(1, |v| v.mod_revision)),
                1 => {
                    // Same value, another mod revision; only guaranteed wrong when the
                    // put that wrote the value is determinate.
                    let Some(v) = kv.clone() else { return Ok(()) };
                    let writer = h.iter().find(|w| matches!(&w.op, KvOp::Put { value, .. } | KvOp::Cas { value, .. } if *value == v.value));
                    prop_assume!(writer.is_some_and(|w| w.outcome.is_some()));
                    Some(Versioned { mod_revision: v.mod_revision - 1, ..v })
                }
                _ => {
                    // A stale value: one this key held earlier, replaced by a write that
                    // completed before the read was invoked.
                    let earlier: Vec<Versioned> = h[..r].iter().filter_map(|w| match (&w.op, &w.outcome) {
                        (KvOp::Get { key: k }, Some(KvOutcome::Get { kv: Some(v), .. })) if *k == key => Some(v.clone()),
                        _ => None,
                    }).filter(|v| Some(v) != kv.as_ref()).collect();
                    let Some(stale) = earlier.last().cloned() else { return Ok(()) };
                    // The first write to the key after `stale` took effect (by the
                    // sequential order, writes to a key have increasing positions).
                    let written_at = h.iter().position(|w| matches!(&w.op, KvOp::Put { value, .. } | KvOp::Cas { value, .. } if *value == stale.value));
                    let Some(written_at) = written_at else { return Ok(()) };
                    let replaced = h[written_at + 1..r].iter().find(|w| w.op.key() == key && w.op.is_write() && match &w.outcome {
                        None => true,
                        Some(o) => o.written_revision().is_some(),
                    });
                    let Some(replaced) = replaced else { return Ok(()) };
                    prop_assume!(replaced.completed_ns.is_some_and(|t| t < h[r].invoked_ns));
                    Some(stale)
                }
            };
            prop_assume!(mutated != kv);
            h[r].outcome = Some(KvOutcome::Get { revision, kv: mutated });
            let result = check_linearizable(&h, BUDGET);
            prop_assert!(matches!(result, LinearizabilityResult::Violation(_)), "{:?}", result);
        }
    }
}
