//! Watch streams against each other and against the KV history.
//!
//! [`check_watches`] checks, for every `WatchRecord` of a `History`:
//!
//! - order: events in strictly increasing revision across responses, non-decreasing
//!   within one, no duplicate (revision, key), all events of a revision in a single
//!   response, nothing below the stream's first revision, nothing outside its range,
//!   nothing newer than the response's header revision;
//! - agreement: two streams that delivered the same (revision, key) agree on the event
//!   (and on `prev_kv` when both asked for it); an acknowledged write with a known
//!   revision appears, at that revision, as that write and nothing else; a value a read
//!   returned with mod revision `m` appears at `m` as a put of that key and value;
//! - no gaps: every write known to exist (from any stream's events, from a KV write's
//!   revision, or from a read's mod revision) at a revision between the stream's first
//!   revision and the highest revision it delivered, on a key it covers, was delivered;
//! - `prev_kv`: where the key's history before an event is fully known (streams
//!   covering the key delivered every revision since a point where the key's state is
//!   known: revision 0 where the store is empty, an event, a KV write or a read), the
//!   event's `prev` is that state.
//!
//! It does not check anything after the highest revision a stream delivered (a
//! stopped stream may have ended before later events were sent), events of revisions
//! nobody else observed beyond the stream's own ordering, or that a canceled stream
//! should have been canceled. It must never panic, and never rely on values being
//! unique. Assumption: the store is empty when the history starts.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::{show_bytes, show_event, CheckKind, Section, Violation, WatchExcerpt};
use crate::history::{
    History, KvOp, KvOutcome, KvRecord, Versioned, WatchEnd, WatchRecord, WatchedEvent,
};

/// Where a (revision, key) was first seen by a stream: record and response index.
type Origin = (usize, usize);

/// Every (revision, key) some stream delivered, with the first stream's event.
type Reference<'h> = BTreeMap<i64, BTreeMap<&'h [u8], (&'h WatchedEvent, Origin)>>;
/// Every (revision, key)'s `prev_kv`, as the first stream that asked for it saw it.
type Prevs<'h> = HashMap<(i64, &'h [u8]), (Option<&'h Versioned>, Origin)>;

/// What the event says happened, without `prev`.
fn body(e: &WatchedEvent) -> (bool, &[u8]) {
    // A delete's value carries no meaning.
    (e.deleted, if e.deleted { &[] } else { e.value.as_slice() })
}

/// What a key was at some revision, and who says so.
#[derive(Clone)]
enum Anchor<'h> {
    Start,
    Event(Origin),
    Kv(&'h KvRecord),
}

pub fn check_watches(history: &History) -> Result<(), Violation> {
    let watches = &history.watches;
    for (i, record) in watches.iter().enumerate() {
        check_stream(i, record)?;
    }

    // The reference: every (revision, key) some stream delivered, with its event.
    let mut reference: Reference<'_> = BTreeMap::new();
    let mut prevs: Prevs<'_> = HashMap::new();
    for (i, record) in watches.iter().enumerate() {
        let restarted = restarted_at_compaction(watches, record);
        for (ri, (_, events)) in record.responses.iter().enumerate() {
            for e in events {
                let at = reference.entry(e.revision).or_default();
                match at.get(e.key.as_slice()) {
                    Some(&(other, origin)) if body(other) != body(e) => {
                        return Err(disagree(watches, e, origin, (i, ri), "the event"));
                    }
                    Some(_) => {}
                    None => {
                        at.insert(&e.key, (e, (i, ri)));
                    }
                }
                if record.prev_kv && !(restarted && prev_compacted_away(record, e)) {
                    match prevs.get(&(e.revision, e.key.as_slice())) {
                        Some(&(other, origin)) if other != e.prev.as_ref() => {
                            return Err(disagree(watches, e, origin, (i, ri), "prev_kv"));
                        }
                        Some(_) => {}
                        None => {
                            prevs.insert((e.revision, &e.key), (e.prev.as_ref(), (i, ri)));
                        }
                    }
                }
            }
        }
    }

    // Writes known from the KV history: by written revision, and reads' mod revisions.
    let mut writes: BTreeMap<i64, &KvRecord> = BTreeMap::new();
    let mut observed: Vec<(&KvRecord, &Versioned)> = Vec::new();
    for r in &history.kv {
        if let Some(revision) = r.outcome.as_ref().and_then(KvOutcome::written_revision) {
            writes.entry(revision).or_insert(r);
        }
        if let Some(v) = read_value(r) {
            observed.push((r, v));
        }
    }
    for (&revision, &w) in &writes {
        let Some(at) = reference.get(&revision) else {
            continue;
        };
        for (key, &(e, origin)) in at {
            let fits = *key == w.op.key()
                && match &w.op {
                    KvOp::Put { value, .. } | KvOp::Cas { value, .. } => {
                        !e.deleted && e.value == *value
                    }
                    KvOp::Delete { .. } => e.deleted,
                    KvOp::Get { .. } => false,
                };
            if !fits {
                return Err(against_kv(
                    watches,
                    e,
                    origin,
                    w,
                    "disagrees with the acknowledged write of its revision",
                ));
            }
        }
    }
    for &(r, v) in &observed {
        let key = r.op.key();
        let Some(&(e, origin)) = reference.get(&v.mod_revision).and_then(|at| at.get(key)) else {
            continue;
        };
        if e.deleted || e.value != v.value {
            return Err(against_kv(
                watches,
                e,
                origin,
                r,
                "disagrees with a read of the value that revision wrote",
            ));
        }
    }

    // Every write known to exist, by revision: key -> evidence.
    let mut known: BTreeMap<i64, BTreeMap<&[u8], Evidence<'_>>> = BTreeMap::new();
    for (&revision, at) in &reference {
        for (&key, &(_, origin)) in at {
            known
                .entry(revision)
                .or_default()
                .insert(key, Evidence::Event(origin));
        }
    }
    for (&revision, &w) in &writes {
        known
            .entry(revision)
            .or_default()
            .entry(w.op.key())
            .or_insert(Evidence::Kv(w));
    }
    for &(r, v) in &observed {
        known
            .entry(v.mod_revision)
            .or_default()
            .entry(r.op.key())
            .or_insert(Evidence::Kv(r));
    }
    for (i, record) in watches.iter().enumerate() {
        check_gaps(watches, i, record, &known)?;
    }

    check_prev_kv(history, &reference, &writes)
}

/// Why a write is known to exist.
#[derive(Clone, Copy)]
enum Evidence<'h> {
    Event(Origin),
    Kv(&'h KvRecord),
}

/// What a read returned, if it returned a value.
fn read_value(r: &KvRecord) -> Option<&Versioned> {
    match &r.outcome {
        Some(KvOutcome::Get { kv: Some(v), .. }) => Some(v),
        Some(KvOutcome::Cas {
            succeeded: false,
            current: Some(v),
            ..
        }) => Some(v),
        _ => None,
    }
}

/// The highest revision a stream delivered.
fn last_delivered(record: &WatchRecord) -> Option<i64> {
    record
        .responses
        .iter()
        .flat_map(|(_, events)| events.iter().map(|e| e.revision))
        .max()
}

fn stream_violation(
    i: usize,
    record: &WatchRecord,
    responses: &[usize],
    key: Option<&[u8]>,
    message: String,
) -> Violation {
    Violation::new(CheckKind::Watch, key, message).with(Section::watch(
        "responses",
        responses
            .iter()
            .map(|&ri| WatchExcerpt::response(i, record, ri))
            .collect(),
    ))
}

/// Order, range and duplicate checks of one stream on its own.
fn check_stream(i: usize, record: &WatchRecord) -> Result<(), Violation> {
    let first = record.first_revision();
    let mut seen: HashMap<(i64, &[u8]), usize> = HashMap::new();
    // The last revision of the previous response that had events, and its index.
    let mut previous: Option<(i64, usize)> = None;
    for (ri, (header, events)) in record.responses.iter().enumerate() {
        let mut last_in_response: Option<i64> = None;
        for e in events {
            let key = Some(e.key.as_slice());
            let fail = |responses: &[usize], message: String| {
                Err(stream_violation(i, record, responses, key, message))
            };
            if let Some(&earlier) = seen.get(&(e.revision, e.key.as_slice())) {
                return fail(
                    &[earlier, ri],
                    format!("duplicate event: {}", show_event(e)),
                );
            }
            seen.insert((e.revision, &e.key), ri);
            if !record.covers_key(&e.key) {
                return fail(
                    &[ri],
                    format!("event outside the watched range: {}", show_event(e)),
                );
            }
            if e.revision < first || e.revision < 1 {
                return fail(
                    &[ri],
                    format!(
                        "event below the stream's first revision {first}: {}",
                        show_event(e)
                    ),
                );
            }
            if e.revision > *header {
                return fail(
                    &[ri],
                    format!("event newer than its response's header revision {header}"),
                );
            }
            match last_in_response {
                Some(last) if e.revision < last => {
                    return fail(
                        &[ri],
                        format!(
                            "events out of order within a response: {} after revision {last}",
                            show_event(e)
                        ),
                    );
                }
                Some(_) => {}
                None => {
                    if let Some((last, pri)) = previous {
                        if e.revision == last {
                            return fail(
                                &[pri, ri],
                                format!(
                                    "the events of revision {last} are split across two responses"
                                ),
                            );
                        }
                        if e.revision < last {
                            return fail(
                                &[pri, ri],
                                format!(
                                    "events out of order: {} after revision {last}",
                                    show_event(e)
                                ),
                            );
                        }
                    }
                }
            }
            last_in_response = Some(e.revision);
        }
        if let Some(last) = last_in_response {
            previous = Some((last, ri));
        }
    }
    Ok(())
}

fn excerpt_of(watches: &[WatchRecord], (i, ri): Origin, e: &WatchedEvent) -> Vec<WatchExcerpt> {
    watches
        .get(i)
        .map(|r| {
            let mut x = WatchExcerpt::response(i, r, ri);
            x.events.retain(|o| o.revision == e.revision);
            x
        })
        .into_iter()
        .collect()
}

fn disagree(
    watches: &[WatchRecord],
    e: &WatchedEvent,
    first: Origin,
    second: Origin,
    what: &str,
) -> Violation {
    Violation::new(
        CheckKind::Watch,
        Some(&e.key),
        format!(
            "two streams disagree on {what} of key {} at revision {}",
            show_bytes(&e.key),
            e.revision
        ),
    )
    .with(Section::watch(
        "first stream (events of that revision)",
        excerpt_of(watches, first, e),
    ))
    .with(Section::watch(
        "second stream",
        excerpt_of(watches, second, e),
    ))
}

fn against_kv(
    watches: &[WatchRecord],
    e: &WatchedEvent,
    origin: Origin,
    kv: &KvRecord,
    what: &str,
) -> Violation {
    Violation::new(
        CheckKind::Watch,
        Some(&e.key),
        format!("watch event {} {what}", show_event(e)),
    )
    .with(Section::watch(
        "stream (events of that revision)",
        excerpt_of(watches, origin, e),
    ))
    .with(Section::kv("KV record", vec![kv.clone()]))
}

/// Every known write on a covered key between the stream's first revision and the
/// highest revision it delivered was delivered.
fn check_gaps(
    watches: &[WatchRecord],
    i: usize,
    record: &WatchRecord,
    known: &BTreeMap<i64, BTreeMap<&[u8], Evidence<'_>>>,
) -> Result<(), Violation> {
    let Some(last) = last_delivered(record) else {
        return Ok(());
    };
    let first = record.first_revision();
    if first > last {
        return Ok(()); // check_stream already rejected events below `first`
    }
    let delivered: HashSet<(i64, &[u8])> = record
        .responses
        .iter()
        .flat_map(|(_, events)| events.iter().map(|e| (e.revision, e.key.as_slice())))
        .collect();
    for (&revision, keys) in known.range(first..=last) {
        for (&key, evidence) in keys {
            if !record.covers_key(key) || delivered.contains(&(revision, key)) {
                continue;
            }
            let mut violation = Violation::new(
                CheckKind::Watch,
                Some(key),
                format!(
                    "stream missed the write of key {} at revision {revision} (it delivered \
                     revisions {first}..={last} of its range)",
                    show_bytes(key)
                ),
            );
            // The responses around the gap.
            let around: Vec<usize> = record
                .responses
                .iter()
                .enumerate()
                .filter(|(_, (_, events))| events.iter().any(|e| e.revision >= revision))
                .map(|(ri, _)| ri)
                .take(1)
                .collect();
            let before = record
                .responses
                .iter()
                .enumerate()
                .rev()
                .find(|(_, (_, events))| events.iter().any(|e| e.revision < revision))
                .map(|(ri, _)| ri);
            violation = violation.with(Section::watch(
                "stream (responses around the gap)",
                before
                    .into_iter()
                    .chain(around)
                    .map(|ri| WatchExcerpt::response(i, record, ri))
                    .collect(),
            ));
            violation = match *evidence {
                Evidence::Event((j, rj)) => {
                    let shown: Vec<WatchExcerpt> = watches
                        .get(j)
                        .map(|r| {
                            let mut x = WatchExcerpt::response(j, r, rj);
                            x.events.retain(|e| e.revision == revision);
                            x
                        })
                        .into_iter()
                        .collect();
                    violation.with(Section::watch("delivered by", shown))
                }
                Evidence::Kv(r) => violation.with(Section::kv("known from", vec![r.clone()])),
            };
            return Err(violation);
        }
    }
    Ok(())
}

/// Merged, sorted, disjoint inclusive intervals.
fn merge(mut intervals: Vec<(i64, i64)>) -> Vec<(i64, i64)> {
    intervals.sort_unstable();
    let mut out: Vec<(i64, i64)> = Vec::new();
    for (lo, hi) in intervals {
        match out.last_mut() {
            Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
}

/// Whether `[lo, hi]` (empty when `lo > hi`) lies inside one merged interval.
fn covered(intervals: &[(i64, i64)], lo: i64, hi: i64) -> bool {
    if lo > hi {
        return true;
    }
    let i = intervals.partition_point(|&(_, end)| end < lo);
    intervals
        .get(i)
        .is_some_and(|&(start, end)| start <= lo && hi <= end)
}

/// Whether `record` is a watcher's restart at the revision its previous stream was
/// canceled for (`compact_revision`): it starts exactly at the compaction.
fn restarted_at_compaction(watches: &[WatchRecord], record: &WatchRecord) -> bool {
    record.start_revision > 0
        && watches
            .iter()
            .filter(|w| w.watcher == record.watcher && w.started_ns < record.started_ns)
            .max_by_key(|w| w.started_ns)
            .is_some_and(|w| {
                w.end
                    == WatchEnd::Canceled {
                        compact_revision: record.start_revision,
                    }
            })
}

/// An event at the compacted revision a stream starts from has no `prev_kv` in etcd: the
/// previous version is read at `revision - 1`, which the compaction removed
/// (etcd's watch server sends the event without it).
fn prev_compacted_away(record: &WatchRecord, e: &WatchedEvent) -> bool {
    e.prev.is_none() && e.revision == record.start_revision
}

fn check_prev_kv(
    history: &History,
    reference: &Reference<'_>,
    writes: &BTreeMap<i64, &KvRecord>,
) -> Result<(), Violation> {
    let watches = &history.watches;
    if !watches.iter().any(|w| w.prev_kv) {
        return Ok(());
    }
    // Per key, the states known at revisions: events first (they win a tie, as the
    // other sources at the same revision must agree with them or were reported).
    type State = Option<(Vec<u8>, i64)>;
    let mut anchors: BTreeMap<&[u8], BTreeMap<i64, (State, Anchor<'_>)>> = BTreeMap::new();
    for (&revision, at) in reference {
        for (&key, &(e, origin)) in at {
            let state = (!e.deleted).then(|| (e.value.clone(), revision));
            anchors
                .entry(key)
                .or_default()
                .insert(revision, (state, Anchor::Event(origin)));
        }
    }
    for (&revision, &w) in writes {
        let state = match &w.op {
            KvOp::Put { value, .. } | KvOp::Cas { value, .. } => Some((value.clone(), revision)),
            _ => None,
        };
        anchors
            .entry(w.op.key())
            .or_default()
            .entry(revision)
            .or_insert((state, Anchor::Kv(w)));
    }
    for r in &history.kv {
        // A read's header revision: the key's state then is what it returned.
        let state = match &r.outcome {
            Some(KvOutcome::Get { revision, kv }) => Some((*revision, kv.as_ref())),
            Some(KvOutcome::Cas {
                revision,
                succeeded: false,
                current,
            }) => Some((*revision, current.as_ref())),
            Some(KvOutcome::Delete {
                revision,
                deleted: 0,
            }) => Some((*revision, None)),
            _ => None,
        };
        if let Some((revision, kv)) = state {
            anchors
                .entry(r.op.key())
                .or_default()
                .entry(revision)
                .or_insert((kv.map(|v| (v.value.clone(), v.mod_revision)), Anchor::Kv(r)));
        }
    }
    let mut coverage: HashMap<&[u8], Vec<(i64, i64)>> = HashMap::new();
    for (&key, per_key) in anchors.iter_mut() {
        per_key.entry(0).or_insert((None, Anchor::Start));
        let intervals = watches
            .iter()
            .filter(|w| w.covers_key(key))
            .filter_map(|w| Some((w.first_revision(), last_delivered(w)?)))
            .collect();
        coverage.insert(key, merge(intervals));
    }

    for (i, record) in watches.iter().enumerate() {
        if !record.prev_kv {
            continue;
        }
        let restarted = restarted_at_compaction(watches, record);
        for (_, events) in &record.responses {
            for e in events {
                if restarted && prev_compacted_away(record, e) {
                    continue;
                }
                let key = e.key.as_slice();
                let (Some(per_key), Some(intervals)) = (anchors.get(key), coverage.get(key)) else {
                    continue;
                };
                let Some((&at, (state, anchor))) = per_key.range(..e.revision).next_back() else {
                    continue;
                };
                if !covered(
                    intervals,
                    at.saturating_add(1),
                    e.revision.saturating_sub(1),
                ) {
                    continue;
                }
                let expected = state.as_ref().map(|(value, m)| Versioned {
                    value: value.clone(),
                    mod_revision: *m,
                });
                if e.prev == expected {
                    continue;
                }
                let mut violation = Violation::new(
                    CheckKind::Watch,
                    Some(key),
                    format!(
                        "wrong prev_kv in {}: the key was {} before revision {} (its history \
                         since revision {at} is fully known from the streams covering it)",
                        show_event(e),
                        super::show_versioned(expected.as_ref()),
                        e.revision
                    ),
                )
                .with(Section::watch(
                    "stream",
                    vec![WatchExcerpt::stream(i, record).with_events(vec![e.clone()])],
                ));
                violation = match anchor {
                    Anchor::Start => violation,
                    Anchor::Event(origin) => violation.with(Section::watch(
                        "state known from",
                        excerpt_of(
                            watches,
                            *origin,
                            &WatchedEvent {
                                revision: at,
                                ..e.clone()
                            },
                        ),
                    )),
                    Anchor::Kv(r) => {
                        violation.with(Section::kv("state known from", vec![(*r).clone()]))
                    }
                };
                return Err(violation);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::WatchEnd;

    fn ev(
        key: &str,
        revision: i64,
        value: Option<&str>,
        prev: Option<(&str, i64)>,
    ) -> WatchedEvent {
        WatchedEvent {
            key: key.into(),
            deleted: value.is_none(),
            revision,
            value: value.unwrap_or("").into(),
            prev: prev.map(|(v, m)| Versioned {
                value: v.into(),
                mod_revision: m,
            }),
        }
    }

    fn stream(
        watcher: usize,
        key: &str,
        start: i64,
        prev_kv: bool,
        responses: Vec<Vec<WatchedEvent>>,
    ) -> WatchRecord {
        WatchRecord {
            watcher,
            member: 0,
            key: key.into(),
            range_end: if key.is_empty() { vec![0] } else { Vec::new() },
            start_revision: start,
            created_revision: 0,
            prev_kv,
            responses: responses
                .into_iter()
                .map(|events| (events.iter().map(|e| e.revision).max().unwrap_or(0), events))
                .collect(),
            end: WatchEnd::Stopped,
            started_ns: 0,
            ended_ns: 100,
        }
    }

    fn put(key: &str, value: &str, revision: i64) -> KvRecord {
        KvRecord {
            client: 0,
            op: KvOp::Put {
                key: key.into(),
                value: value.into(),
            },
            invoked_ns: revision as u64 * 10,
            completed_ns: Some(revision as u64 * 10 + 5),
            outcome: Some(KvOutcome::Put { revision }),
        }
    }

    /// Revisions 1..=4: put a=x, put b=y, put a=z, delete a.
    fn good() -> History {
        History {
            kv: vec![put("a", "x", 1), put("b", "y", 2), put("a", "z", 3)],
            watches: vec![
                // Everything, with prev_kv, one revision per response.
                stream(
                    0,
                    "",
                    1,
                    true,
                    vec![
                        vec![ev("a", 1, Some("x"), None)],
                        vec![ev("b", 2, Some("y"), None)],
                        vec![ev("a", 3, Some("z"), Some(("x", 1)))],
                        vec![ev("a", 4, None, Some(("z", 3)))],
                    ],
                ),
                // Key a only, batched, broken then resumed.
                stream(
                    1,
                    "a",
                    1,
                    false,
                    vec![vec![
                        ev("a", 1, Some("x"), None),
                        ev("a", 3, Some("z"), None),
                    ]],
                ),
                stream(
                    1,
                    "a",
                    4,
                    true,
                    vec![vec![ev("a", 4, None, Some(("z", 3)))]],
                ),
                // Key b from its creation, never saw anything else.
                stream(2, "b", 2, true, vec![vec![ev("b", 2, Some("y"), None)]]),
            ],
            leases: Vec::new(),
        }
    }

    fn rejects(h: &History, needle: &str) -> Violation {
        let v = check_watches(h).expect_err("a violation");
        let shown = v.to_string();
        assert!(shown.contains(needle), "expected {needle:?} in:\n{shown}");
        v
    }

    #[test]
    fn accepts_consistent_streams() {
        let h = good();
        if let Err(v) = check_watches(&h) {
            panic!("{v}");
        }
        assert!(check_watches(&History::default()).is_ok());
    }

    #[test]
    fn accepts_a_multi_key_revision_in_one_response() {
        let mut h = good();
        h.watches.push(stream(
            3,
            "",
            5,
            false,
            vec![vec![
                ev("c", 5, Some("1"), None),
                ev("d", 5, Some("2"), None),
            ]],
        ));
        assert!(check_watches(&h).is_ok());
    }

    #[test]
    fn rejects_a_duplicate_event() {
        let mut h = good();
        h.watches[1]
            .responses
            .push((3, vec![ev("a", 3, Some("z"), None)]));
        rejects(&h, "duplicate event");
    }

    #[test]
    fn rejects_a_gap() {
        let mut h = good();
        h.watches[1].responses[0].1.remove(0); // drops revision 1
        rejects(&h, "missed the write of key a at revision 1");
        // Known only from the KV history.
        let mut h = good();
        h.kv.push(put("b", "w", 5));
        h.watches[0]
            .responses
            .push((6, vec![ev("a", 6, Some("q"), Some(("", 0)))]));
        rejects(&h, "revision 5");
    }

    #[test]
    fn rejects_events_out_of_order() {
        let mut h = good();
        h.watches[0].responses.swap(0, 1);
        rejects(&h, "out of order");
        let mut h = good();
        h.watches[1].responses[0].1.swap(0, 1);
        rejects(&h, "out of order within a response");
    }

    #[test]
    fn rejects_a_revision_split_across_responses() {
        let mut h = good();
        h.watches.push(stream(
            3,
            "",
            5,
            false,
            vec![
                vec![ev("c", 5, Some("1"), None)],
                vec![ev("d", 5, Some("2"), None)],
            ],
        ));
        rejects(&h, "split across two responses");
    }

    #[test]
    fn rejects_an_event_disagreeing_with_an_acknowledged_put() {
        let mut h = good();
        h.kv[2] = put("a", "other", 3);
        rejects(&h, "acknowledged write");
    }

    #[test]
    fn a_restart_at_the_compacted_revision_may_lack_prev_kv() {
        // Watcher 2 is canceled (start compacted at 3), restarts at 3: etcd reads the
        // previous version at revision 2, compacted away, and sends the event without it.
        let mut h = good();
        let mut canceled = stream(2, "", 1, true, vec![]);
        canceled.end = WatchEnd::Canceled {
            compact_revision: 3,
        };
        let mut restarted = stream(2, "", 3, true, vec![vec![ev("a", 3, Some("z"), None)]]);
        restarted.started_ns = 50;
        h.watches.push(canceled);
        h.watches.push(restarted.clone());
        assert_eq!(check_watches(&h), Ok(()));
        // The same missing prev_kv without the compaction is wrong.
        let mut h = good();
        h.watches.push(restarted);
        assert!(check_watches(&h).is_err());
    }

    #[test]
    fn rejects_a_wrong_prev_kv() {
        let mut h = good();
        h.watches[0].responses[2].1[0].prev = Some(Versioned {
            value: "y".into(),
            mod_revision: 2,
        });
        rejects(&h, "wrong prev_kv");
        // An unknown history before the event: nothing to say.
        let mut h = good();
        h.kv.clear();
        h.watches = vec![stream(
            0,
            "a",
            3,
            true,
            vec![vec![ev("a", 3, Some("z"), Some(("anything", 2)))]],
        )];
        assert!(check_watches(&h).is_ok());
    }

    #[test]
    fn rejects_two_watchers_disagreeing() {
        let mut h = good();
        h.watches[1].responses[0].1[1].value = "zz".into();
        h.kv.clear(); // the disagreement alone must be found
        rejects(&h, "two streams disagree");
    }

    #[test]
    fn odd_streams_do_not_panic() {
        let mut h = good();
        h.watches.push(WatchRecord {
            end: WatchEnd::Canceled {
                compact_revision: 3,
            },
            ..stream(
                4,
                "a",
                -5,
                true,
                vec![
                    vec![],
                    vec![ev("a", i64::MIN, None, None)],
                    vec![ev("a", i64::MAX, Some(""), None)],
                ],
            )
        });
        let _ = check_watches(&h);
        h.watches.push(WatchRecord {
            range_end: vec![1],
            ..stream(5, "\u{ff}", i64::MAX, true, vec![])
        });
        let _ = check_watches(&h);
    }
}
