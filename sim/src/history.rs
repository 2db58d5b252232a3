//! What simulated clients saw: every KV operation with the simulated times it was invoked
//! and completed and the outcome the client learned, and every watch stream's responses.
//! The checkers judge these records; the harness only appends to them.
//!
//! A record must hold only what a client could observe over the wire: never a value read
//! from a member's state behind the API, or the checkers would be checking the harness.

use std::fmt;

/// A key-value pair as the store returned it: the value and its `mod_revision`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Versioned {
    pub value: Vec<u8>,
    pub mod_revision: i64,
}

/// A KV operation on one key, as a client issued it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KvOp {
    /// `Put(key, value)`.
    Put { key: Vec<u8>, value: Vec<u8> },
    /// Linearizable `Range(key)` of a single key.
    Get { key: Vec<u8> },
    /// `DeleteRange(key)` of a single key.
    Delete { key: Vec<u8> },
    /// Compare-and-swap: `Txn(if mod_revision(key) == expected then Put(key, value) else
    /// Range(key))`; `expected == 0` means "the key does not exist".
    Cas {
        key: Vec<u8>,
        expected_mod_revision: i64,
        value: Vec<u8>,
    },
}

impl KvOp {
    pub fn key(&self) -> &[u8] {
        match self {
            KvOp::Put { key, .. }
            | KvOp::Get { key }
            | KvOp::Delete { key }
            | KvOp::Cas { key, .. } => key,
        }
    }

    /// Whether the operation can change the store (reads that fail are dropped from a
    /// history: they had no effect).
    pub fn is_write(&self) -> bool {
        !matches!(self, KvOp::Get { .. })
    }
}

/// What the client learned from a successful response. `revision` is always the
/// response header's revision.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KvOutcome {
    /// The put created revision `revision` (which is the key's new `mod_revision`).
    Put { revision: i64 },
    Get {
        revision: i64,
        kv: Option<Versioned>,
    },
    /// `deleted` is 0 or 1; a delete of a missing key does not create a revision.
    Delete { revision: i64, deleted: i64 },
    /// `succeeded` says which branch ran; on failure `current` is what the else-branch
    /// range returned.
    Cas {
        revision: i64,
        succeeded: bool,
        current: Option<Versioned>,
    },
}

impl KvOutcome {
    pub fn revision(&self) -> i64 {
        match self {
            KvOutcome::Put { revision }
            | KvOutcome::Get { revision, .. }
            | KvOutcome::Delete { revision, .. }
            | KvOutcome::Cas { revision, .. } => *revision,
        }
    }

    /// The revision this operation's own write created, if it wrote.
    pub fn written_revision(&self) -> Option<i64> {
        match self {
            KvOutcome::Put { revision } => Some(*revision),
            KvOutcome::Delete { revision, deleted } if *deleted > 0 => Some(*revision),
            KvOutcome::Cas {
                revision,
                succeeded: true,
                ..
            } => Some(*revision),
            _ => None,
        }
    }
}

/// One KV operation in a history. Times are simulated nanoseconds since the start of the
/// run; a client invokes at most one operation at a time.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KvRecord {
    pub client: usize,
    pub op: KvOp,
    pub invoked_ns: u64,
    /// When the client got its answer; `None` with an indeterminate outcome.
    pub completed_ns: Option<u64>,
    /// `None`: the client never learned whether a write took effect (timeout, lost
    /// connection, an error after the request may have been proposed). Such a write may
    /// take effect at any time after `invoked_ns`, or never.
    pub outcome: Option<KvOutcome>,
}

impl fmt::Display for KvRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let end = match self.completed_ns {
            Some(t) => format!("{:.3}s", t as f64 / 1e9),
            None => "?".into(),
        };
        write!(
            f,
            "client {} [{:.3}s..{end}] {} -> ",
            self.client,
            self.invoked_ns as f64 / 1e9,
            show_op(&self.op)
        )?;
        match &self.outcome {
            None => write!(f, "indeterminate"),
            Some(o) => write!(f, "{}", show_outcome(o)),
        }
    }
}

fn show_bytes(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn show_versioned(v: &Option<Versioned>) -> String {
    match v {
        None => "none".into(),
        Some(v) => format!("{}@{}", show_bytes(&v.value), v.mod_revision),
    }
}

fn show_op(op: &KvOp) -> String {
    match op {
        KvOp::Put { key, value } => format!("put({}, {})", show_bytes(key), show_bytes(value)),
        KvOp::Get { key } => format!("get({})", show_bytes(key)),
        KvOp::Delete { key } => format!("delete({})", show_bytes(key)),
        KvOp::Cas {
            key,
            expected_mod_revision,
            value,
        } => format!(
            "cas({}, mod={expected_mod_revision}, {})",
            show_bytes(key),
            show_bytes(value)
        ),
    }
}

fn show_outcome(o: &KvOutcome) -> String {
    match o {
        KvOutcome::Put { revision } => format!("ok rev {revision}"),
        KvOutcome::Get { revision, kv } => format!("{} (rev {revision})", show_versioned(kv)),
        KvOutcome::Delete { revision, deleted } => format!("deleted {deleted} (rev {revision})"),
        KvOutcome::Cas {
            revision,
            succeeded,
            current,
        } => {
            if *succeeded {
                format!("swapped rev {revision}")
            } else {
                format!(
                    "failed, current {} (rev {revision})",
                    show_versioned(current)
                )
            }
        }
    }
}

/// One event of a watch response.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WatchedEvent {
    pub key: Vec<u8>,
    pub deleted: bool,
    /// The event's revision: the key's `mod_revision` (for a delete, the revision of the
    /// delete).
    pub revision: i64,
    /// The value written (empty for a delete).
    pub value: Vec<u8>,
    /// `prev_kv` when the watcher asked for it and the key existed before.
    pub prev: Option<Versioned>,
}

/// How a watch stream ended.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum WatchEnd {
    /// The workload stopped it (cancel or end of run): it was healthy until then.
    Stopped,
    /// The server canceled it; `compact_revision > 0` when its start had been compacted.
    Canceled { compact_revision: i64 },
    /// The stream broke (member down, partition, timeout). The watcher resumes with a new
    /// record starting after the last revision it saw.
    Broken,
}

/// One watch stream: what it asked for and every response's events in arrival order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WatchRecord {
    pub watcher: usize,
    /// The member it talked to (for the report).
    pub member: usize,
    /// The watched range `[key, range_end)` (`range_end` empty: the single key).
    pub key: Vec<u8>,
    pub range_end: Vec<u8>,
    /// `start_revision` as sent; 0 means "from the revision after the current one".
    pub start_revision: i64,
    /// The header revision of the creation response: with `start_revision == 0` the
    /// stream covers everything after it.
    pub created_revision: i64,
    pub prev_kv: bool,
    /// Every response that carried events, in order, as (header revision, events).
    pub responses: Vec<(i64, Vec<WatchedEvent>)>,
    pub end: WatchEnd,
    pub started_ns: u64,
    pub ended_ns: u64,
}

impl WatchRecord {
    /// The first revision this stream promised to deliver.
    pub fn first_revision(&self) -> i64 {
        if self.start_revision > 0 {
            self.start_revision
        } else {
            self.created_revision + 1
        }
    }

    /// Whether `key` lies in the watched range.
    pub fn covers_key(&self, key: &[u8]) -> bool {
        if self.range_end.is_empty() {
            key == self.key.as_slice()
        } else if self.range_end == [0] {
            key >= self.key.as_slice()
        } else {
            key >= self.key.as_slice() && key < self.range_end.as_slice()
        }
    }
}

/// One keep-alive the client got an answer to: the lease's TTL after renewing, as the
/// leader answered it (0: the lease no longer exists).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeepAlive {
    pub invoked_ns: u64,
    pub completed_ns: u64,
    pub ttl: i64,
}

/// A `LeaseRevoke` the client issued.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LeaseRevoke {
    pub invoked_ns: u64,
    /// `None` when no answer came (or an error did): the revoke may or may not happen.
    pub completed_ns: Option<u64>,
    /// `Some(true)`: acknowledged; `Some(false)`: "lease not found" (it had already gone);
    /// `None`: unknown.
    pub revoked: Option<bool>,
}

/// A linearizable `Range` of the lease's own key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LeaseRead {
    pub invoked_ns: u64,
    pub completed_ns: u64,
    pub present: bool,
    /// The response header's revision.
    pub revision: i64,
}

/// One lease as its client used it: granted, a key attached, kept alive for a while,
/// then revoked or left to expire, and its key read afterwards.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LeaseRecord {
    pub client: usize,
    pub id: i64,
    /// The TTL the grant answered, seconds.
    pub ttl: i64,
    pub grant_invoked_ns: u64,
    pub grant_completed_ns: u64,
    /// The key put with the lease (no other client writes it) and its unique value.
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    /// The put's revision when acknowledged; `None` when its outcome is unknown.
    pub put_revision: Option<i64>,
    /// Every answered keep-alive, in order.
    pub keep_alives: Vec<KeepAlive>,
    /// Invocation times of keep-alives that got no answer (error, timeout, broken
    /// stream): each may or may not have renewed the lease.
    pub unanswered_keep_alives: Vec<u64>,
    /// When the client stopped renewing: no keep-alive was sent after this instant
    /// (when the workload's stop ended the lease: the last keep-alive sent, or the grant).
    pub renewed_until_ns: u64,
    pub revoke: Option<LeaseRevoke>,
    /// Reads of the key, in order.
    pub reads: Vec<LeaseRead>,
}

impl LeaseRecord {
    /// The latest instant before which the lease cannot have expired, as far as this
    /// client knows: `invoked + TTL` of the grant and of every keep-alive that renewed
    /// it (the leader starts a TTL no earlier than it receives the request).
    pub fn alive_until_ns(&self) -> u64 {
        let secs = |ttl: i64| (ttl.max(0) as u64).saturating_mul(1_000_000_000);
        self.keep_alives
            .iter()
            .filter(|k| k.ttl > 0)
            .map(|k| k.invoked_ns.saturating_add(secs(k.ttl)))
            .chain(std::iter::once(
                self.grant_invoked_ns.saturating_add(secs(self.ttl)),
            ))
            .max()
            .unwrap_or(0)
    }

    /// Whether the client asked to revoke the lease before `ns`.
    pub fn revoke_invoked_before(&self, ns: u64) -> bool {
        self.revoke.as_ref().is_some_and(|r| r.invoked_ns < ns)
    }
}

fn secs_of(ns: u64) -> String {
    format!("{:.3}s", ns as f64 / 1e9)
}

impl fmt::Display for LeaseRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "lease {:x} of client {} (TTL {}s) granted [{}..{}], key {} put ",
            self.id,
            self.client,
            self.ttl,
            secs_of(self.grant_invoked_ns),
            secs_of(self.grant_completed_ns),
            show_bytes(&self.key)
        )?;
        match self.put_revision {
            Some(r) => write!(f, "at rev {r}")?,
            None => write!(f, "indeterminate")?,
        }
        write!(f, "; keep-alives:")?;
        for k in &self.keep_alives {
            write!(
                f,
                " [{}..{}] ttl {}",
                secs_of(k.invoked_ns),
                secs_of(k.completed_ns),
                k.ttl
            )?;
        }
        for k in &self.unanswered_keep_alives {
            write!(f, " [{}..?]", secs_of(*k))?;
        }
        write!(f, "; renewed until {}", secs_of(self.renewed_until_ns))?;
        if let Some(r) = &self.revoke {
            let end = r.completed_ns.map_or("?".into(), secs_of);
            let what = match r.revoked {
                Some(true) => "revoked",
                Some(false) => "not found",
                None => "indeterminate",
            };
            write!(f, "; revoke [{}..{end}] {what}", secs_of(r.invoked_ns))?;
        }
        if !self.reads.is_empty() {
            write!(f, "; reads:")?;
            for r in &self.reads {
                write!(
                    f,
                    " [{}..{}] {} (rev {})",
                    secs_of(r.invoked_ns),
                    secs_of(r.completed_ns),
                    if r.present { "present" } else { "absent" },
                    r.revision
                )?;
            }
        }
        Ok(())
    }
}

/// A whole run's observations.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct History {
    pub kv: Vec<KvRecord>,
    pub watches: Vec<WatchRecord>,
    pub leases: Vec<LeaseRecord>,
}
