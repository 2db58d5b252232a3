//! Raft's durable log and hard state, kept in the `log` bucket of the member's engine, and
//! the state-machine snapshots raft asks for.
//!
//! This module owns the on-disk layout of the raft log: entry `i` under `r` + big-endian
//! `i`, the hard state, the conf state and the compaction point under `s/...` keys. It
//! keeps the terms of the stored entries in memory (raft asks for them constantly) and a
//! bounded copy of the log's tail (the entries raft reads back right after appending
//! them: to apply them, and to send them to followers), and reads older entries from the
//! engine. It must never make a write durable on its own: the
//! driver collects each change into the `WriteBatch` of its `Ready`, which the log writer
//! (`persist`) syncs once, so entries and hard state become durable together; and it must
//! never hand raft an entry from the engine that the tail could still be replacing:
//! memory is updated before the batch is written (raft reads new entries back before
//! they are durable), so entries not yet applied are served from the tail only, and the
//! engine is read only below the tail, where everything is applied and written.

use std::collections::VecDeque;

use metastore_core::state::snapshot::state_bucket;
use metastore_core::{Backend, Bucket, WriteBatch};
use metastore_proto::metastore::{SnapshotRecord, StateSnapshot};
use prost::Message as _;
use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError};

use crate::error::{Error, Result};
use crate::replication::{read_state, SharedState};

/// One record of a snapshot: bucket, key, value.
pub type Record = (Bucket, Vec<u8>, Vec<u8>);

/// A new cluster's log starts after this index: the initial member set is state applied
/// at it, so a member that joins later is sent a snapshot carrying it, never a log that
/// lacks it.
pub const BOOTSTRAP_INDEX: u64 = 1;

const HARD_STATE_KEY: &[u8] = b"s/hard";
const CONF_STATE_KEY: &[u8] = b"s/conf";
/// The last entry removed by compaction (or installed by a snapshot): its index and term.
const COMPACTED_KEY: &[u8] = b"s/compacted";

fn entry_key(index: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = b'r';
    key[1..].copy_from_slice(&index.to_be_bytes());
    key
}
const ENTRY_END: &[u8] = b"s";

fn storage_error(e: impl std::fmt::Display) -> raft::Error {
    raft::Error::Store(StorageError::Other(Box::new(Error::Storage(e.to_string()))))
}

/// The raft log of one member.
pub struct RaftStorage {
    engine: std::sync::Arc<dyn Backend>,
    state: SharedState,
    hard_state: HardState,
    conf_state: ConfState,
    /// Index and term of the last compacted (or snapshot-installed) entry.
    compacted: (u64, u64),
    /// Terms of the stored entries, `compacted.0 + 1 ..= last`.
    terms: VecDeque<u64>,
    /// The last entry applied to the state machine and its term, for snapshots.
    applied: (u64, u64),
    /// The newest stored entries, `last - tail.len() + 1 ..= last`: every entry not yet
    /// applied (those may still be on their way to the engine), and applied ones up to
    /// [`TAIL_CACHE_BYTES`] of entry data in all (and always the last entry appended).
    tail: VecDeque<Entry>,
    tail_bytes: usize,
}

/// How much of the log's tail is kept in memory. Committed entries are read back once
/// to apply and once per follower to send, usually within a few milliseconds of their
/// append; 16 MiB holds far more than that window at any rate the disk sustains, and
/// bounds the memory an unreachable follower's backlog can pin.
const TAIL_CACHE_BYTES: usize = 16 << 20;

impl RaftStorage {
    /// Loads the log from the engine. `bootstrap` gives the conf state (and a starting
    /// term) for a member whose log is empty and that starts a new cluster.
    pub fn open(
        engine: std::sync::Arc<dyn Backend>,
        state: SharedState,
        bootstrap: Option<(ConfState, u64)>,
    ) -> Result<Self> {
        let decode_err = |what: &str, e: protobuf::ProtobufError| {
            Error::Storage(format!("undecodable raft {what}: {e}"))
        };
        let mut hard_state = match engine.get(Bucket::Log, HARD_STATE_KEY)? {
            Some(b) => HardState::parse_from_bytes(&b).map_err(|e| decode_err("hard state", e))?,
            None => HardState::default(),
        };
        let mut conf_state = match engine.get(Bucket::Log, CONF_STATE_KEY)? {
            Some(b) => ConfState::parse_from_bytes(&b).map_err(|e| decode_err("conf state", e))?,
            None => ConfState::default(),
        };
        let mut compacted = match engine.get(Bucket::Log, COMPACTED_KEY)? {
            Some(b) if b.len() == 16 => (
                u64::from_be_bytes(b[..8].try_into().unwrap()),
                u64::from_be_bytes(b[8..].try_into().unwrap()),
            ),
            Some(_) => return Err(Error::Storage("malformed raft compaction point".into())),
            None => (0, 0),
        };
        let mut terms = VecDeque::new();
        let mut expected = compacted.0 + 1;
        let mut bad = None;
        engine.scan(
            Bucket::Log,
            &entry_key(expected),
            Some(ENTRY_END),
            &mut |k, v| match Entry::parse_from_bytes(v) {
                Ok(e) if k == entry_key(e.index) && e.index == expected => {
                    terms.push_back(e.term);
                    expected += 1;
                    true
                }
                Ok(e) => {
                    bad = Some(format!("raft log entry {} out of place", e.index));
                    false
                }
                Err(e) => {
                    bad = Some(format!("undecodable raft log entry: {e}"));
                    false
                }
            },
        )?;
        if let Some(bad) = bad {
            return Err(Error::Storage(bad));
        }
        let applied_index = read_state(&state)?.applied_index();
        let mut storage = Self {
            engine,
            state,
            hard_state: HardState::default(),
            conf_state: ConfState::default(),
            compacted,
            terms,
            applied: (0, 0),
            tail: VecDeque::new(),
            tail_bytes: 0,
        };
        if conf_state == ConfState::default() {
            if let Some((initial, term)) = bootstrap {
                let mut batch = WriteBatch::new();
                conf_state = initial;
                hard_state.term = hard_state.term.max(term);
                if compacted == (0, 0) && storage.terms.is_empty() {
                    compacted = (BOOTSTRAP_INDEX, term);
                    hard_state.commit = hard_state.commit.max(BOOTSTRAP_INDEX);
                    batch.put(
                        Bucket::Log,
                        COMPACTED_KEY,
                        compaction_point(BOOTSTRAP_INDEX, term),
                    );
                }
                batch.put(
                    Bucket::Log,
                    CONF_STATE_KEY,
                    conf_state.write_to_bytes().unwrap(),
                );
                batch.put(
                    Bucket::Log,
                    HARD_STATE_KEY,
                    hard_state.write_to_bytes().unwrap(),
                );
                batch.sync = true;
                storage.engine.write(batch)?;
            }
        }
        storage.hard_state = hard_state;
        storage.conf_state = conf_state;
        storage.compacted = compacted;
        let applied_term = storage
            .term_of(applied_index)
            .unwrap_or(storage.compacted.1);
        storage.applied = (applied_index, applied_term);
        Ok(storage)
    }

    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    /// Whether this member has ever been part of a configuration (a member started with
    /// `--initial-cluster-state existing` has not, until a snapshot arrives).
    pub fn initialized(&self) -> bool {
        self.conf_state != ConfState::default()
    }

    pub fn first(&self) -> u64 {
        self.compacted.0 + 1
    }

    pub fn last(&self) -> u64 {
        self.compacted.0 + self.terms.len() as u64
    }

    fn term_of(&self, index: u64) -> Option<u64> {
        if index == self.compacted.0 {
            return Some(self.compacted.1);
        }
        if index < self.compacted.0 || index > self.last() {
            return None;
        }
        self.terms
            .get((index - self.compacted.0 - 1) as usize)
            .copied()
    }

    /// Appends entries (replacing any conflicting suffix) into `batch`.
    pub fn append(&mut self, entries: &[Entry], batch: &mut WriteBatch) -> Result<()> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        if first.index <= self.compacted.0 || first.index > self.last() + 1 {
            return Err(Error::Internal(format!(
                "raft appended entry {} to a log holding {}..={}",
                first.index,
                self.first(),
                self.last()
            )));
        }
        for index in first.index..=self.last() {
            batch.delete(Bucket::Log, entry_key(index).to_vec());
        }
        self.terms
            .truncate((first.index - self.compacted.0 - 1) as usize);
        // The conflicting suffix leaves the tail too (which stays contiguous up to `last`).
        while self.tail.back().is_some_and(|e| e.index >= first.index) {
            self.pop_tail(false);
        }
        for e in entries {
            batch.put(
                Bucket::Log,
                entry_key(e.index).to_vec(),
                e.write_to_bytes()
                    .map_err(|e| Error::Internal(e.to_string()))?,
            );
            self.terms.push_back(e.term);
            self.tail_bytes += e.data.len();
            self.tail.push_back(e.clone());
        }
        self.trim_tail();
        Ok(())
    }

    /// Drops the tail's oldest entries beyond the size bound, but only applied ones: an
    /// entry raft has not applied may not be in the engine yet (the log writer persists
    /// behind the raft loop, see `persist`), and an applied one is durable there.
    fn trim_tail(&mut self) {
        while self.tail.len() > 1
            && self.tail_bytes > TAIL_CACHE_BYTES
            && self.tail.front().is_some_and(|e| e.index <= self.applied.0)
        {
            self.pop_tail(true);
        }
    }

    /// Drops the tail's oldest (`front`) or newest entry.
    fn pop_tail(&mut self, front: bool) {
        let gone = if front {
            self.tail.pop_front()
        } else {
            self.tail.pop_back()
        };
        if let Some(e) = gone {
            self.tail_bytes -= e.data.len();
        }
    }

    fn clear_tail(&mut self) {
        self.tail.clear();
        self.tail_bytes = 0;
    }

    /// The first index the in-memory tail holds (`last + 1` when it is empty).
    fn tail_first(&self) -> u64 {
        self.tail.front().map_or(self.last() + 1, |e| e.index)
    }

    pub fn set_hard_state(&mut self, hs: HardState, batch: &mut WriteBatch) {
        batch.put(Bucket::Log, HARD_STATE_KEY, hs.write_to_bytes().unwrap());
        self.hard_state = hs;
    }

    pub fn set_commit(&mut self, commit: u64, batch: &mut WriteBatch) {
        let mut hs = self.hard_state.clone();
        hs.commit = commit;
        self.set_hard_state(hs, batch);
    }

    pub fn set_conf_state(&mut self, cs: ConfState, batch: &mut WriteBatch) {
        batch.put(Bucket::Log, CONF_STATE_KEY, cs.write_to_bytes().unwrap());
        self.conf_state = cs;
    }

    /// Notes the last applied entry (snapshots are taken at it).
    pub fn set_applied(&mut self, index: u64) {
        if let Some(term) = self.term_of(index) {
            self.applied = (index, term);
        }
        self.trim_tail();
    }

    /// Removes entries up to and including `index` (which must be applied).
    pub fn compact(&mut self, index: u64, batch: &mut WriteBatch) -> Result<()> {
        if index <= self.compacted.0 {
            return Ok(());
        }
        if index > self.applied.0 {
            return Err(Error::Internal(format!(
                "compacting the raft log to {index} beyond the applied {}",
                self.applied.0
            )));
        }
        let term = self.term_of(index).expect("applied entries are stored");
        for i in self.first()..=index {
            batch.delete(Bucket::Log, entry_key(i).to_vec());
        }
        self.terms.drain(..(index - self.compacted.0) as usize);
        while self.tail.front().is_some_and(|e| e.index <= index) {
            self.pop_tail(true);
        }
        self.compacted = (index, term);
        batch.put(Bucket::Log, COMPACTED_KEY, compaction_point(index, term));
        Ok(())
    }

    /// Takes an installed snapshot's place in the log: every entry goes, the log restarts
    /// after the snapshot.
    pub fn install_snapshot(&mut self, meta: &SnapshotMetadata, batch: &mut WriteBatch) {
        for i in self.first()..=self.last() {
            batch.delete(Bucket::Log, entry_key(i).to_vec());
        }
        self.terms.clear();
        self.clear_tail();
        self.compacted = (meta.index, meta.term);
        self.applied = (meta.index, meta.term);
        batch.put(
            Bucket::Log,
            COMPACTED_KEY,
            compaction_point(meta.index, meta.term),
        );
        let mut hs = self.hard_state.clone();
        hs.term = hs.term.max(meta.term);
        hs.commit = hs.commit.max(meta.index);
        self.set_hard_state(hs, batch);
        self.set_conf_state(meta.get_conf_state().clone(), batch);
    }

    /// Encodes the whole replicated state at the applied index as a raft snapshot.
    fn build_snapshot(&self) -> Result<Snapshot> {
        let sm = read_state(&self.state)?;
        let mut records = Vec::new();
        sm.snapshot_records(&mut |bucket, key, value| {
            records.push(SnapshotRecord {
                bucket: bucket.name().to_string(),
                key: key.to_vec(),
                value: value.to_vec(),
            })
        })?;
        let mut snapshot = Snapshot {
            data: StateSnapshot { records }.encode_to_vec().into(),
            ..Default::default()
        };
        let meta = snapshot.mut_metadata();
        meta.index = self.applied.0;
        meta.term = self.applied.1;
        meta.set_conf_state(self.conf_state.clone());
        Ok(snapshot)
    }
}

fn compaction_point(index: u64, term: u64) -> Vec<u8> {
    let mut v = index.to_be_bytes().to_vec();
    v.extend_from_slice(&term.to_be_bytes());
    v
}

/// Decodes a received snapshot's data into the records `StateMachine::restore` takes.
pub fn snapshot_records(data: &[u8]) -> Result<Vec<Record>> {
    let snapshot = StateSnapshot::decode(data)
        .map_err(|e| Error::Storage(format!("undecodable snapshot: {e}")))?;
    snapshot
        .records
        .into_iter()
        .map(|r| {
            let bucket = state_bucket(&r.bucket)
                .ok_or_else(|| Error::Storage(format!("snapshot bucket {:?}", r.bucket)))?;
            Ok((bucket, r.key, r.value))
        })
        .collect()
}

impl raft::Storage for RaftStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low <= self.compacted.0 {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let max_size = max_size.into();
        let mut entries = Vec::with_capacity((high - low) as usize);
        let mut size = 0u64;
        let tail_first = self.tail_first();
        // Below the tail from the engine, the rest from the tail. The engine is never read
        // at or above the tail's first index: there it may still hold entries a
        // conflicting append replaced whose deletes are not written yet.
        if low < tail_first {
            let (complete, read) =
                self.engine_entries(low, high.min(tail_first), max_size, &mut entries)?;
            if !complete {
                if entries.is_empty() {
                    return Err(raft::Error::Store(StorageError::Unavailable));
                }
                return Ok(entries);
            }
            size = read;
        }
        let skip = low.saturating_sub(tail_first) as usize;
        let wanted = (high - low) as usize - entries.len();
        for e in self.tail.iter().skip(skip).take(wanted) {
            // Sized as encoded, like the engine path and raft's `limit_size`.
            size += u64::from(e.compute_size());
            if !entries.is_empty() && max_size.is_some_and(|m| size > m) {
                break;
            }
            entries.push(e.clone());
        }
        if entries.is_empty() && low < high {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(entries)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx < self.compacted.0 {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        self.term_of(idx)
            .ok_or(raft::Error::Store(StorageError::Unavailable))
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, _request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        self.build_snapshot().map_err(storage_error)
    }
}

impl RaftStorage {
    /// Reads entries `low..high` (all below the tail) from the engine into `entries`,
    /// stopping at `max_size` bytes (after at least one entry). Returns whether every
    /// entry of the range was read, and the encoded bytes read.
    fn engine_entries(
        &self,
        low: u64,
        high: u64,
        max_size: Option<u64>,
        entries: &mut Vec<Entry>,
    ) -> raft::Result<(bool, u64)> {
        let mut size = 0u64;
        let mut failed = None;
        let mut expected = low;
        self.engine
            .scan(
                Bucket::Log,
                &entry_key(low),
                Some(&entry_key(high)),
                &mut |_, v| match Entry::parse_from_bytes(v) {
                    Ok(e) if e.index == expected => {
                        // Like raft's `limit_size`: always at least one entry.
                        if !entries.is_empty()
                            && max_size.is_some_and(|m| size + v.len() as u64 > m)
                        {
                            return false;
                        }
                        size += v.len() as u64;
                        entries.push(e);
                        expected += 1;
                        true
                    }
                    Ok(e) => {
                        failed = Some(format!(
                            "raft log entry {} where {expected} belongs",
                            e.index
                        ));
                        false
                    }
                    Err(e) => {
                        failed = Some(e.to_string());
                        false
                    }
                },
            )
            .map_err(storage_error)?;
        if let Some(e) = failed {
            return Err(storage_error(e));
        }
        Ok((expected == high, size))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, RwLock};

    use metastore_core::{MemoryBackend, StateMachine, StateMachineConfig};
    use raft::Storage as _;

    use super::*;

    fn open(engine: &Arc<MemoryBackend>) -> RaftStorage {
        let sm =
            StateMachine::open(Box::new(engine.clone()), StateMachineConfig::default()).unwrap();
        let state = Arc::new(RwLock::new(sm));
        let cs = ConfState {
            voters: vec![1],
            ..Default::default()
        };
        RaftStorage::open(engine.clone(), state, Some((cs, 1))).unwrap()
    }

    fn entry(index: u64, term: u64, size: usize) -> Entry {
        Entry {
            index,
            term,
            data: vec![index as u8; size].into(),
            ..Default::default()
        }
    }

    fn append(log: &mut RaftStorage, engine: &MemoryBackend, entries: &[Entry]) {
        let mut batch = WriteBatch::new();
        log.append(entries, &mut batch).unwrap();
        engine.write(batch).unwrap();
    }

    fn read(log: &RaftStorage, low: u64, high: u64, max: Option<u64>) -> Vec<(u64, u64)> {
        log.entries(low, high, max, GetEntriesContext::empty(false))
            .unwrap()
            .iter()
            .map(|e| (e.index, e.term))
            .collect()
    }

    /// What the engine alone holds, through a fresh open (no tail in memory).
    fn read_reopened(engine: &Arc<MemoryBackend>, low: u64, high: u64) -> Vec<(u64, u64)> {
        let log = open(engine);
        assert_eq!(log.tail_first(), log.last() + 1);
        read(&log, low, high, None)
    }

    #[test]
    fn the_tail_serves_what_the_engine_holds() {
        let engine = Arc::new(MemoryBackend::new());
        let mut log = open(&engine);
        let first = log.first();
        let entries: Vec<Entry> = (first..first + 10).map(|i| entry(i, 2, 10)).collect();
        append(&mut log, &engine, &entries);
        assert_eq!(log.tail_first(), first);
        let all = read(&log, first, first + 10, None);
        assert_eq!(all.len(), 10);
        assert_eq!(all, read_reopened(&engine, first, first + 10));
        assert_eq!(
            read(&log, first + 3, first + 5, None),
            vec![(first + 3, 2), (first + 4, 2)]
        );
        // A size limit gives at least one entry, then as many as fit.
        assert_eq!(read(&log, first, first + 10, Some(0)).len(), 1);
        let size = u64::from(entries[0].compute_size());
        assert_eq!(read(&log, first, first + 10, Some(3 * size)).len(), 3);
        assert_eq!(
            read(&log, first, first + 10, Some(3 * size)),
            read_reopened(&engine, first, first + 3)
        );
    }

    #[test]
    fn a_conflicting_append_replaces_the_tail_suffix() {
        let engine = Arc::new(MemoryBackend::new());
        let mut log = open(&engine);
        let first = log.first();
        let entries: Vec<Entry> = (first..first + 6).map(|i| entry(i, 2, 10)).collect();
        append(&mut log, &engine, &entries);
        append(
            &mut log,
            &engine,
            &[entry(first + 3, 3, 10), entry(first + 4, 3, 10)],
        );
        let expected = vec![
            (first, 2),
            (first + 1, 2),
            (first + 2, 2),
            (first + 3, 3),
            (first + 4, 3),
        ];
        assert_eq!(log.last(), first + 4);
        assert_eq!(read(&log, first, first + 5, None), expected);
        assert_eq!(read_reopened(&engine, first, first + 5), expected);
    }

    #[test]
    fn entries_beyond_the_tail_bound_come_from_the_engine() {
        let engine = Arc::new(MemoryBackend::new());
        let mut log = open(&engine);
        let first = log.first();
        // Four entries of a quarter of the bound each, then one more: the oldest leaves
        // the tail, and reads spanning it go to the engine.
        let big = TAIL_CACHE_BYTES / 4;
        for i in first..first + 5 {
            append(&mut log, &engine, &[entry(i, 2, big)]);
            log.set_applied(i);
        }
        assert!(log.tail_bytes <= TAIL_CACHE_BYTES);
        assert!(log.tail_first() > first);
        let all = read(&log, first, first + 5, None);
        assert_eq!(all, (first..first + 5).map(|i| (i, 2)).collect::<Vec<_>>());
        // One entry larger than the bound stays (raft reads it back at once).
        append(
            &mut log,
            &engine,
            &[entry(first + 5, 2, TAIL_CACHE_BYTES + 1)],
        );
        assert_eq!(log.tail_first(), first + 5);
        assert_eq!(read(&log, first + 5, first + 6, None), vec![(first + 5, 2)]);
    }

    #[test]
    fn unapplied_entries_stay_in_the_tail_and_the_engine_is_read_only_below_it() {
        let engine = Arc::new(MemoryBackend::new());
        let mut log = open(&engine);
        let first = log.first();
        // Past the bound, but nothing is applied: nothing leaves the tail (the writer may
        // not have written these yet).
        let big = TAIL_CACHE_BYTES / 4;
        let mut pending = WriteBatch::new();
        for i in first..first + 6 {
            log.append(&[entry(i, 2, big)], &mut pending).unwrap();
        }
        assert_eq!(log.tail_first(), first);
        assert_eq!(read(&log, first, first + 6, None).len(), 6);
        engine.write(pending).unwrap();
        // Once applied, the oldest go back to the bound.
        log.set_applied(first + 3);
        assert!(log.tail_bytes <= TAIL_CACHE_BYTES);
        let tail_first = log.tail_first();
        assert!(tail_first > first && tail_first <= first + 4);
        // A conflicting append whose write is still queued: the engine holds the old
        // entries at those indexes, a read spanning engine and tail gets the new ones.
        let mut queued = WriteBatch::new();
        log.append(&[entry(first + 5, 3, 10)], &mut queued).unwrap();
        let expected: Vec<(u64, u64)> = (first..first + 5)
            .map(|i| (i, 2))
            .chain([(first + 5, 3)])
            .collect();
        assert_eq!(read(&log, first, first + 6, None), expected);
        engine.write(queued).unwrap();
        assert_eq!(read_reopened(&engine, first, first + 6), expected);
    }

    #[test]
    fn compaction_and_snapshot_install_trim_the_tail() {
        let engine = Arc::new(MemoryBackend::new());
        let mut log = open(&engine);
        let first = log.first();
        let entries: Vec<Entry> = (first..first + 6).map(|i| entry(i, 2, 10)).collect();
        append(&mut log, &engine, &entries);
        log.set_applied(first + 3);
        let mut batch = WriteBatch::new();
        log.compact(first + 2, &mut batch).unwrap();
        engine.write(batch).unwrap();
        assert_eq!(log.tail_first(), first + 3);
        assert!(log
            .entries(first + 2, first + 4, None, GetEntriesContext::empty(false))
            .is_err());
        assert_eq!(
            read(&log, first + 3, first + 6, None),
            vec![(first + 3, 2), (first + 4, 2), (first + 5, 2)]
        );
        let meta = SnapshotMetadata {
            index: first + 20,
            term: 4,
            ..Default::default()
        };
        let mut batch = WriteBatch::new();
        log.install_snapshot(&meta, &mut batch);
        engine.write(batch).unwrap();
        assert!(log.tail.is_empty());
        assert_eq!(log.tail_bytes, 0);
        append(&mut log, &engine, &[entry(first + 21, 4, 10)]);
        assert_eq!(
            read(&log, first + 21, first + 22, None),
            vec![(first + 21, 4)]
        );
    }
}
