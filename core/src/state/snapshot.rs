//! Whole-state snapshots: what a member sends a lagging or new member, and how the
//! receiver replaces its state with it; plus recording log entries that carry no request.
//!
//! This module owns which buckets are replicated state (all but the log) and the
//! atomicity of an install: the old state, the new state and the new applied index change
//! in one batch, so a crash during an install leaves either the old or the new state. It
//! must never touch the log bucket: the log belongs to the runtime.

use super::{StateMachine, CONSISTENT_INDEX_KEY};
use crate::backend::{Bucket, WriteBatch};
use crate::error::{Error, Result};
use crate::mvcc::Store;

/// Receives one record of a snapshot: its bucket, key and value.
pub type RecordVisitor<'a> = dyn FnMut(Bucket, &[u8], &[u8]) + 'a;

/// The buckets a snapshot carries: the replicated state, in a fixed order.
pub fn state_buckets() -> impl Iterator<Item = Bucket> {
    Bucket::ALL.into_iter().filter(|b| *b != Bucket::Log)
}

/// The bucket with this name among the replicated ones.
pub fn state_bucket(name: &str) -> Option<Bucket> {
    state_buckets().find(|b| b.name() == name)
}

impl StateMachine {
    /// Records a log entry that carries no request (an empty entry of a new leader, a
    /// configuration change): only the applied index moves. Already-applied indexes are
    /// ignored, as `apply` does.
    pub fn skip(&mut self, index: u64) -> Result<()> {
        if index <= self.applied_index {
            return Ok(());
        }
        let mut batch = WriteBatch::new();
        batch.put(
            Bucket::Meta,
            CONSISTENT_INDEX_KEY.to_vec(),
            index.to_be_bytes().to_vec(),
        );
        self.backend.write(batch)?;
        self.applied_index = index;
        Ok(())
    }

    /// Visits every record of the replicated state, bucket by bucket. The caller holds the
    /// state machine, so the records are those at `applied_index()`.
    pub fn snapshot_records(&self, visit: &mut RecordVisitor<'_>) -> Result<()> {
        for bucket in state_buckets() {
            self.backend.scan(bucket, b"", None, &mut |k, v| {
                visit(bucket, k, v);
                true
            })?;
        }
        Ok(())
    }

    /// Replaces the whole replicated state with a snapshot's records taken at `index`, in
    /// one batch, and rebuilds the in-memory indexes from it. The snapshot's own applied
    /// index record is overwritten with `index`.
    pub fn restore(
        &mut self,
        index: u64,
        records: impl IntoIterator<Item = (Bucket, Vec<u8>, Vec<u8>)>,
    ) -> Result<()> {
        let mut batch = WriteBatch::new();
        for bucket in state_buckets() {
            let mut keys = Vec::new();
            self.backend.scan(bucket, b"", None, &mut |k, _| {
                keys.push(k.to_vec());
                true
            })?;
            for key in keys {
                batch.delete(bucket, key);
            }
        }
        for (bucket, key, value) in records {
            if bucket == Bucket::Log {
                return Err(Error::Corrupt(
                    "a snapshot may not carry log records".into(),
                ));
            }
            batch.put(bucket, key, value);
        }
        batch.put(
            Bucket::Meta,
            CONSISTENT_INDEX_KEY.to_vec(),
            index.to_be_bytes().to_vec(),
        );
        batch.sync = true;
        self.backend.write(batch)?;
        self.store = Store::open(&*self.backend)?;
        self.alarms = super::Alarms::open(&*self.backend)?;
        self.applied_index = index;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use metastore_proto::etcdserverpb::PutRequest;
    use metastore_proto::metastore::internal_request::Request;
    use metastore_proto::metastore::InternalRequest;

    use super::*;
    use crate::backend::{Backend, MemoryBackend};
    use crate::state::StateMachineConfig;

    fn put(k: &str) -> InternalRequest {
        InternalRequest {
            request: Some(Request::Put(PutRequest {
                key: k.as_bytes().to_vec(),
                value: b"v".to_vec(),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    fn open(be: &Arc<MemoryBackend>) -> StateMachine {
        StateMachine::open(Box::new(be.clone()), StateMachineConfig::default()).unwrap()
    }

    #[test]
    fn a_restored_member_equals_the_source_and_keeps_its_log() {
        let source = Arc::new(MemoryBackend::new());
        let mut sm = open(&source);
        for i in 1..=20u64 {
            sm.apply(i, &put(&format!("k{}", i % 7)));
        }
        sm.skip(21).unwrap();
        let mut records = Vec::new();
        sm.snapshot_records(&mut |b, k, v| records.push((b, k.to_vec(), v.to_vec())))
            .unwrap();

        let target = Arc::new(MemoryBackend::new());
        let mut other = open(&target);
        other.apply(1, &put("stale"));
        let mut log = WriteBatch::new();
        log.put(Bucket::Log, b"r1".to_vec(), b"entry".to_vec());
        target.write(log).unwrap();

        other.restore(21, records).unwrap();
        assert_eq!(other.applied_index(), 21);
        assert_eq!(other.current_revision(), sm.current_revision());
        assert_eq!(other.hash().unwrap(), sm.hash().unwrap());
        assert_eq!(other.hash_kv(0).unwrap(), sm.hash_kv(0).unwrap());
        assert_eq!(
            target.get(Bucket::Log, b"r1").unwrap(),
            Some(b"entry".to_vec())
        );
        // A reopened state machine sees the restored state.
        let reopened = open(&target);
        assert_eq!(reopened.applied_index(), 21);
        assert_eq!(reopened.hash().unwrap(), sm.hash().unwrap());
        // Entries after the snapshot apply on top of it.
        other.apply(22, &put("after"));
        assert_eq!(other.current_revision(), sm.current_revision() + 1);
    }

    #[test]
    fn skipped_entries_advance_the_applied_index_only() {
        let be = Arc::new(MemoryBackend::new());
        let mut sm = open(&be);
        let before = sm.hash().unwrap();
        sm.skip(3).unwrap();
        sm.skip(2).unwrap();
        assert_eq!(sm.applied_index(), 3);
        assert_eq!(sm.hash().unwrap(), before);
        assert_eq!(open(&be).applied_index(), 3);
    }

    #[test]
    fn a_snapshot_with_log_records_is_refused_whole() {
        let be = Arc::new(MemoryBackend::new());
        let mut sm = open(&be);
        sm.apply(1, &put("a"));
        let before = sm.hash().unwrap();
        let err = sm.restore(5, vec![(Bucket::Log, b"x".to_vec(), b"y".to_vec())]);
        assert!(matches!(err, Err(Error::Corrupt(_))));
        assert_eq!(sm.hash().unwrap(), before);
        assert_eq!(sm.applied_index(), 1);
    }
}
