//! The multi-version key space: the key index, the current and compacted revisions, and
//! read and write transactions over them (etcd's `store`, `storeTxnRead`,
//! `storeTxnWrite`).
//!
//! Owns how revisions are assigned (one main revision per write transaction that changes
//! something, one sub revision per change inside it), how values are laid out in the Key
//! bucket, and how the index is rebuilt on open. It never writes to the backend by itself:
//! a write transaction collects its batch operations and hands them to the caller, who
//! writes them together with the applied index; until then the transaction can be rolled
//! back so that a failed request leaves no trace.

use std::collections::HashMap;

use metastore_proto::mvccpb;
use prost::Message;

use crate::backend::{Backend, BatchOp, Bucket, WriteBatch};
use crate::error::{Error, Result};
use crate::index::{Mark, RangeEnd, TreeIndex};
use crate::lease::Lessor;
use crate::revision::{is_tombstone, Revision};

/// Meta bucket key of the last compaction that was requested (etcd's name).
pub const SCHEDULED_COMPACT_KEY: &[u8] = b"scheduledCompactRev";
/// Meta bucket key of the last compaction that finished (etcd's name).
pub const FINISHED_COMPACT_KEY: &[u8] = b"finishedCompactRev";

/// Options of a key-space read (etcd's `RangeOptions`).
#[derive(Debug, Clone, Copy, Default)]
pub struct RangeOptions {
    /// At most this many values (0 or less = all).
    pub limit: i64,
    /// Revision to read at (0 or less = the transaction's revision).
    pub rev: i64,
    /// Only count the keys.
    pub count: bool,
}

/// Result of a key-space read (etcd's `RangeResult`).
#[derive(Debug, Clone, Default)]
pub struct RangeResult {
    pub kvs: Vec<mvccpb::KeyValue>,
    /// Keys that matched, before any limit.
    pub count: i64,
    /// The revision the read was served at (the transaction's, not `RangeOptions::rev`).
    pub rev: i64,
}

/// The key space's in-memory state: everything else is in the backend.
#[derive(Debug, Clone)]
pub struct Store {
    pub index: TreeIndex,
    pub lessor: Lessor,
    /// Revision of the last write transaction that changed something (1 when empty).
    pub current_rev: i64,
    /// Revision of the last compaction; -1 before the first one, as in etcd (so that a
    /// compaction at revision 0 is accepted once).
    pub compact_rev: i64,
}

impl Store {
    /// Rebuilds the key space from the backend: the compacted revision from the Meta
    /// bucket, the index and the current revision from the Key bucket, lease attachments
    /// from the keys' lease fields (etcd's `restore`).
    pub fn open(backend: &dyn Backend) -> Result<Self> {
        let compact_rev = match backend.get(Bucket::Meta, FINISHED_COMPACT_KEY)? {
            Some(v) => Revision::from_bytes(&v)?.0.main,
            None => -1,
        };
        let scheduled = match backend.get(Bucket::Meta, SCHEDULED_COMPACT_KEY)? {
            Some(v) => Revision::from_bytes(&v)?.0.main,
            None => 0,
        };
        let mut index = TreeIndex::new();
        let mut current_rev = 1;
        let mut key_lease: HashMap<Vec<u8>, i64> = HashMap::new();
        let mut failure: Option<Error> = None;
        backend.scan(Bucket::Key, b"", None, &mut |k, v| {
            let step = (|| -> Result<()> {
                let (rev, tombstone) = Revision::from_bytes(k)?;
                let kv = decode_kv(v)?;
                index.restore(&kv.key, rev, tombstone, kv.create_revision, kv.version)?;
                current_rev = rev.main;
                if tombstone || kv.lease == 0 {
                    key_lease.remove(kv.key.as_ref());
                } else {
                    key_lease.insert(kv.key.to_vec(), kv.lease);
                }
                Ok(())
            })();
            match step {
                Ok(()) => true,
                Err(e) => {
                    failure = Some(e);
                    false
                }
            }
        })?;
        if let Some(e) = failure {
            return Err(e);
        }
        // Compaction may have removed every revision up to the compacted one (the last
        // write was a delete that got compacted): the revision must not go back.
        current_rev = current_rev.max(compact_rev).max(scheduled);

        let mut lessor = Lessor::load(backend)?;
        let mut attached: Vec<_> = key_lease.into_iter().collect();
        attached.sort();
        for (key, id) in attached {
            // etcd logs and carries on when a key names a lease that is gone.
            let _ = lessor.attach(id, &key);
        }
        Ok(Store {
            index,
            lessor,
            current_rev,
            compact_rev,
        })
    }
}

pub fn decode_kv(bytes: &[u8]) -> Result<mvccpb::KeyValue> {
    mvccpb::KeyValue::decode(bytes)
        .map_err(|e| Error::Corrupt(format!("undecodable key-value: {e}")))
}

/// Reads one stored revision's value.
fn load_kv(backend: &dyn Backend, rev: Revision) -> Result<mvccpb::KeyValue> {
    match backend.get(Bucket::Key, &rev.to_bytes(false))? {
        Some(v) => decode_kv(&v),
        None => Err(Error::Corrupt(format!(
            "index names revision {rev:?} but the Key bucket has no value for it"
        ))),
    }
}

/// etcd's `rangeKeys`: the read shared by read and write transactions. `pending` holds
/// values a write transaction has written but not yet committed.
fn range_keys(
    store: &Store,
    backend: &dyn Backend,
    pending: Option<&HashMap<Revision, mvccpb::KeyValue>>,
    key: &[u8],
    end: RangeEnd<'_>,
    cur_rev: i64,
    ro: RangeOptions,
) -> Result<RangeResult> {
    let mut rev = ro.rev;
    if rev > cur_rev {
        return Err(Error::FutureRevision);
    }
    if rev <= 0 {
        rev = cur_rev;
    }
    if rev < store.compact_rev {
        return Err(Error::Compacted);
    }
    if ro.count {
        let total = store.index.count_revisions(key, end, rev);
        return Ok(RangeResult {
            kvs: Vec::new(),
            count: total as i64,
            rev: cur_rev,
        });
    }
    let limit = if ro.limit > 0 { ro.limit as usize } else { 0 };
    let (revs, total) = store.index.revisions(key, end, rev, limit);
    let mut kvs = Vec::with_capacity(revs.len());
    for r in revs {
        match pending.and_then(|p| p.get(&r)) {
            Some(kv) => kvs.push(kv.clone()),
            None => kvs.push(load_kv(backend, r)?),
        }
    }
    Ok(RangeResult {
        kvs,
        count: total as i64,
        rev: cur_rev,
    })
}

/// What a transaction can do to the key space. Reads see the transaction's own writes.
pub trait KvTxn {
    /// The revision the transaction started from (etcd's `Rev`).
    fn rev(&self) -> i64;
    /// The compacted revision when the transaction started (etcd's `FirstRev`).
    fn first_rev(&self) -> i64;
    fn range(&self, key: &[u8], end: RangeEnd<'_>, ro: RangeOptions) -> Result<RangeResult>;
    fn lease_exists(&self, id: i64) -> bool;
    /// Writes a key; returns the revision of the write.
    fn put(&mut self, key: &[u8], value: &[u8], lease: i64) -> Result<i64>;
    /// Deletes a range; returns how many keys were deleted and the response revision.
    fn delete_range(&mut self, key: &[u8], end: RangeEnd<'_>) -> Result<(i64, i64)>;
    /// Whether the transaction has changed anything yet.
    fn changed(&self) -> bool;
}

/// A read-only view at the current revision.
pub struct ReadTxn<'a> {
    store: &'a Store,
    backend: &'a dyn Backend,
}

impl<'a> ReadTxn<'a> {
    pub fn new(store: &'a Store, backend: &'a dyn Backend) -> Self {
        Self { store, backend }
    }
}

impl KvTxn for ReadTxn<'_> {
    fn rev(&self) -> i64 {
        self.store.current_rev
    }
    fn first_rev(&self) -> i64 {
        self.store.compact_rev
    }
    fn range(&self, key: &[u8], end: RangeEnd<'_>, ro: RangeOptions) -> Result<RangeResult> {
        range_keys(
            self.store,
            self.backend,
            None,
            key,
            end,
            self.store.current_rev,
            ro,
        )
    }
    fn lease_exists(&self, id: i64) -> bool {
        self.store.lessor.lookup(id).is_some()
    }
    fn put(&mut self, _: &[u8], _: &[u8], _: i64) -> Result<i64> {
        Err(Error::MalformedRequest(
            "write inside a read-only transaction".into(),
        ))
    }
    fn delete_range(&mut self, _: &[u8], _: RangeEnd<'_>) -> Result<(i64, i64)> {
        Err(Error::MalformedRequest(
            "write inside a read-only transaction".into(),
        ))
    }
    fn changed(&self) -> bool {
        false
    }
}

/// One change of a write transaction.
#[derive(Debug, Clone)]
struct Change {
    /// For a put, the stored value; for a delete, the key and the delete's mod_revision
    /// (what a watch DELETE event carries).
    kv: mvccpb::KeyValue,
    tombstone: bool,
}

/// A write transaction: all its changes share main revision `begin_rev + 1`.
pub struct WriteTxn<'a> {
    store: &'a mut Store,
    backend: &'a dyn Backend,
    begin_rev: i64,
    changes: Vec<Change>,
    /// Values written by this transaction, readable before commit.
    pending: HashMap<Revision, mvccpb::KeyValue>,
    ops: Vec<BatchOp>,
    /// Index state before each change, newest last, to roll back an aborted transaction.
    undo: Vec<(Vec<u8>, Option<Mark>)>,
    /// Whether the watch events carry `prev_kv` (a read per overwritten key).
    event_prev_kv: bool,
}

/// What a committed write transaction produced.
#[derive(Debug, Default)]
pub struct Committed {
    pub events: Vec<mvccpb::Event>,
}

impl<'a> WriteTxn<'a> {
    pub fn begin(store: &'a mut Store, backend: &'a dyn Backend) -> Self {
        let begin_rev = store.current_rev;
        Self {
            store,
            backend,
            begin_rev,
            changes: Vec::new(),
            pending: HashMap::new(),
            ops: Vec::new(),
            undo: Vec::new(),
            event_prev_kv: true,
        }
    }

    /// Leaves `prev_kv` out of the watch events when `on` is false (nobody would read
    /// it): saves loading the previous value of every overwritten key.
    pub fn event_prev_kv(mut self, on: bool) -> Self {
        self.event_prev_kv = on;
        self
    }

    fn write_rev(&self) -> i64 {
        self.begin_rev + 1
    }

    /// The revision reads inside the transaction are served at: its own once it has
    /// written something.
    fn read_rev(&self) -> i64 {
        if self.changes.is_empty() {
            self.begin_rev
        } else {
            self.begin_rev + 1
        }
    }

    fn remember(&mut self, key: &[u8]) {
        let mark = self.store.index.mark(key);
        self.undo.push((key.to_vec(), mark));
    }

    fn delete_one(&mut self, key: &[u8]) -> Result<()> {
        let idx_rev = Revision::new(self.write_rev(), self.changes.len() as i64);
        // The stored tombstone holds only the key, as in etcd.
        let stored = mvccpb::KeyValue {
            key: key.to_vec().into(),
            ..Default::default()
        };
        self.remember(key);
        self.store.index.tombstone(key, idx_rev)?;
        self.ops.push(BatchOp::Put {
            bucket: Bucket::Key,
            key: idx_rev.to_bytes(true),
            value: stored.encode_to_vec(),
        });
        self.changes.push(Change {
            kv: mvccpb::KeyValue {
                key: key.to_vec().into(),
                mod_revision: idx_rev.main,
                ..Default::default()
            },
            tombstone: true,
        });
        Ok(())
    }

    /// Undoes every index change; nothing reached the backend.
    pub fn abort(mut self) {
        self.rollback();
    }

    fn rollback(&mut self) {
        while let Some((key, mark)) = self.undo.pop() {
            self.store.index.rollback(&key, mark);
        }
    }

    /// Writes the transaction's changes plus `extra` (the applied index) as one batch,
    /// then advances the revision and lease attachments. On a backend failure the index
    /// is rolled back and nothing changed.
    pub fn commit(mut self, extra: Vec<BatchOp>) -> Result<Committed> {
        let result = self.try_commit(extra);
        if result.is_err() {
            self.rollback();
        }
        result
    }

    fn try_commit(&mut self, extra: Vec<BatchOp>) -> Result<Committed> {
        // Every lease a put names must exist: checked before writing, because nothing can
        // be undone after.
        for c in &self.changes {
            if !c.tombstone && c.kv.lease != 0 && self.store.lessor.lookup(c.kv.lease).is_none() {
                return Err(Error::LeaseNotFound);
            }
        }
        let events = self.events()?;
        let mut batch = WriteBatch::new();
        batch.ops = std::mem::take(&mut self.ops);
        batch.ops.extend(extra);
        if let Err(e) = self.backend.write(batch) {
            return Err(e.into());
        }
        if !self.changes.is_empty() {
            self.store.current_rev = self.begin_rev + 1;
        }
        for c in &self.changes {
            self.store.lessor.detach(&c.kv.key);
            if !c.tombstone && c.kv.lease != 0 {
                // Cannot fail: every named lease was found above.
                let _ = self.store.lessor.attach(c.kv.lease, &c.kv.key);
            }
        }
        self.undo.clear();
        Ok(Committed { events })
    }

    /// Watch events of this transaction. `prev_kv` is the key as of the revision before
    /// the transaction — what etcd's watch fetches at `mod_revision - 1` — and is left out
    /// for a put that creates the key, as etcd leaves it out (and when not asked for).
    fn events(&self) -> Result<Vec<mvccpb::Event>> {
        let mut events = Vec::with_capacity(self.changes.len());
        for c in &self.changes {
            let is_create = !c.tombstone && c.kv.create_revision == c.kv.mod_revision;
            let prev_kv = if is_create || !self.event_prev_kv {
                None
            } else {
                match self.store.index.get(&c.kv.key, self.begin_rev) {
                    Some(found) => Some(load_kv(self.backend, found.modified)?),
                    None => None,
                }
            };
            events.push(mvccpb::Event {
                r#type: if c.tombstone {
                    mvccpb::event::EventType::Delete as i32
                } else {
                    mvccpb::event::EventType::Put as i32
                },
                kv: Some(c.kv.clone()),
                prev_kv,
            });
        }
        Ok(events)
    }
}

impl KvTxn for WriteTxn<'_> {
    fn rev(&self) -> i64 {
        self.begin_rev
    }
    fn first_rev(&self) -> i64 {
        self.store.compact_rev
    }
    fn range(&self, key: &[u8], end: RangeEnd<'_>, ro: RangeOptions) -> Result<RangeResult> {
        range_keys(
            self.store,
            self.backend,
            Some(&self.pending),
            key,
            end,
            self.read_rev(),
            ro,
        )
    }
    fn lease_exists(&self, id: i64) -> bool {
        self.store.lessor.lookup(id).is_some()
    }

    fn put(&mut self, key: &[u8], value: &[u8], lease: i64) -> Result<i64> {
        let rev = self.write_rev();
        let idx_rev = Revision::new(rev, self.changes.len() as i64);
        // A key that is live (even if written earlier in this transaction) keeps its
        // creation revision and counts on from its version.
        let (mark, found) = self.store.index.put_returning(key, idx_rev, rev)?;
        self.undo.push((key.to_vec(), mark));
        let (created, version) = match found {
            Some(found) => (found.created, found.version),
            None => (rev, 0),
        };
        let kv = mvccpb::KeyValue {
            key: key.to_vec().into(),
            create_revision: created,
            mod_revision: rev,
            version: version + 1,
            value: value.to_vec().into(),
            lease,
        };
        self.ops.push(BatchOp::Put {
            bucket: Bucket::Key,
            key: idx_rev.to_bytes(false),
            value: kv.encode_to_vec(),
        });
        self.pending.insert(idx_rev, kv.clone());
        self.changes.push(Change {
            kv,
            tombstone: false,
        });
        Ok(rev)
    }

    fn delete_range(&mut self, key: &[u8], end: RangeEnd<'_>) -> Result<(i64, i64)> {
        let keys = self.store.index.range(key, end, self.read_rev());
        for (k, _) in &keys {
            self.delete_one(k)?;
        }
        let n = keys.len() as i64;
        if n != 0 || !self.changes.is_empty() {
            Ok((n, self.begin_rev + 1))
        } else {
            Ok((0, self.begin_rev))
        }
    }

    fn changed(&self) -> bool {
        !self.changes.is_empty()
    }
}

/// The Key bucket revisions a compaction at `rev` removes, given the revisions it keeps
/// (etcd's `scheduleCompaction`: every revision up to `rev` not in `keep`).
pub fn compaction_deletes(
    backend: &dyn Backend,
    rev: i64,
    keep: &std::collections::HashSet<Revision>,
) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    let mut failure = None;
    let end = Revision::new(rev.saturating_add(1), 0).to_bytes(false);
    backend.scan(
        Bucket::Key,
        b"",
        Some(&end),
        &mut |k, _| match Revision::from_bytes(k) {
            Ok((r, _)) => {
                if !keep.contains(&r) {
                    out.push(k.to_vec());
                }
                true
            }
            Err(e) => {
                failure = Some(e);
                false
            }
        },
    )?;
    match failure {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// etcd's HashKV over the Key bucket: CRC-32C of the bucket name, then of every key and
/// value with a revision up to `rev`, skipping revisions at or below the compacted one
/// that a compaction would not keep, and a tombstone at exactly the compacted revision
/// (which etcd versions disagree on keeping).
pub fn hash_by_rev(
    backend: &dyn Backend,
    compact_rev: i64,
    rev: i64,
    keep: &std::collections::HashSet<Revision>,
) -> Result<u32> {
    let mut crc = crc32c::crc32c(Bucket::Key.name().as_bytes());
    let mut failure = None;
    let end = (rev >= 0).then(|| Revision::new(rev.saturating_add(1), 0).to_bytes(false));
    backend.scan(Bucket::Key, b"", end.as_deref(), &mut |k, v| {
        let kr = match Revision::from_bytes(k) {
            Ok((r, _)) => r,
            Err(e) => {
                failure = Some(e);
                return false;
            }
        };
        if kr.main > rev {
            return false;
        }
        if kr.main <= compact_rev && !keep.is_empty() && !keep.contains(&kr) {
            return true;
        }
        if kr.main == compact_rev && is_tombstone(k) {
            return true;
        }
        crc = crc32c::crc32c_append(crc, k);
        crc = crc32c::crc32c_append(crc, v);
        true
    })?;
    match failure {
        Some(e) => Err(e),
        None => Ok(crc),
    }
}

/// Bounds on one history read for a watcher, so a catch-up never holds the state long.
#[derive(Debug, Clone, Copy)]
pub struct HistoryLimits {
    /// Stop (at a revision boundary) once this many stored revisions were scanned.
    pub max_scanned: usize,
    /// Stop (at a revision boundary) once the matching events reach this many bytes.
    pub max_bytes: usize,
}

/// A piece of the event history (what etcd's `syncWatchers` reads for one watcher).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HistoryChunk {
    /// Matching events, in revision order; every revision is complete.
    pub events: Vec<mvccpb::Event>,
    /// The first revision this chunk did not cover: `current revision + 1` once the
    /// history is exhausted.
    pub next_rev: i64,
}

/// Whether `key` is in the watched range: a single key (`end` None), every key from
/// `start` (`end` empty) or `[start, end)`.
pub fn key_in_range(key: &[u8], start: &[u8], end: RangeEnd<'_>) -> bool {
    match end {
        None => key == start,
        Some([]) => key >= start,
        Some(e) => key >= start && key < e,
    }
}

/// The events of revisions `from_rev..` on keys in `[key, end)`, as stored in the Key
/// bucket: puts carry the stored value, deletes the key and the delete's revision. With
/// `prev_kv`, each event except a creation carries the key as of the revision before it,
/// when that revision is not compacted (etcd reads it with a Range that fails silently
/// below the compacted revision). Fails with `Compacted` when `from_rev` is below the
/// compacted revision, as etcd cancels such a watcher.
pub fn history(
    store: &Store,
    backend: &dyn Backend,
    key: &[u8],
    end: RangeEnd<'_>,
    from_rev: i64,
    prev_kv: bool,
    limits: HistoryLimits,
) -> Result<HistoryChunk> {
    if from_rev < store.compact_rev {
        return Err(Error::Compacted);
    }
    let from_rev = from_rev.max(1);
    let cur = store.current_rev;
    if from_rev > cur {
        return Ok(HistoryChunk {
            events: Vec::new(),
            next_rev: from_rev,
        });
    }
    let start = Revision::new(from_rev, 0).to_bytes(false);
    let stop = Revision::new(cur.saturating_add(1), 0).to_bytes(false);
    let mut events = Vec::new();
    let mut scanned = 0usize;
    let mut bytes = 0usize;
    let mut last_main = from_rev;
    let mut next_rev = cur + 1;
    let mut failure = None;
    backend.scan(Bucket::Key, &start, Some(&stop), &mut |k, v| {
        let step = (|| -> Result<bool> {
            let (rev, tombstone) = Revision::from_bytes(k)?;
            if rev.main != last_main {
                if scanned >= limits.max_scanned || bytes >= limits.max_bytes {
                    next_rev = rev.main;
                    return Ok(false);
                }
                last_main = rev.main;
            }
            scanned += 1;
            let mut kv = decode_kv(v)?;
            if !key_in_range(&kv.key, key, end) {
                return Ok(true);
            }
            let r#type = if tombstone {
                kv.mod_revision = rev.main;
                mvccpb::event::EventType::Delete
            } else {
                mvccpb::event::EventType::Put
            };
            let is_create = !tombstone && kv.create_revision == kv.mod_revision;
            let prev = if prev_kv && !is_create && rev.main > store.compact_rev {
                match store.index.get(&kv.key, rev.main - 1) {
                    Some(found) => Some(load_kv(backend, found.modified)?),
                    None => None,
                }
            } else {
                None
            };
            let event = mvccpb::Event {
                r#type: r#type as i32,
                kv: Some(kv),
                prev_kv: prev,
            };
            bytes += event.encoded_len();
            events.push(event);
            Ok(true)
        })();
        match step {
            Ok(go_on) => go_on,
            Err(e) => {
                failure = Some(e);
                false
            }
        }
    })?;
    match failure {
        Some(e) => Err(e),
        None => Ok(HistoryChunk { events, next_rev }),
    }
}
