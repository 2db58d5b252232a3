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
    let children = |bits: &[u64], state: &M::State| -> Vec<(usize, M::State)> {
        let (mut cands, min_ret) = window(bits);
        cands.extend(pending(bits, min_ret));
        let mut out = Vec::new();
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
        children: children(&root_bits, &root_state),
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
            children: children(&bits, &next_state),
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
            (KvOp::Put { value, .. }, None) => Some(Self::set(value, unknown, floor + 1)),
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
                floor: floor + 1,
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
                .then(|| Self::set(value, unknown, floor + 1)),
            // An indeterminate read constrains nothing; an outcome of another operation's
            // kind cannot be linearized anywhere.
            _ => None,
        };
        next.into_iter().collect()
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
