//! The storage seam: what the state machine needs from an engine (ordered buckets of
//! byte keys, atomic write batches, a size), and the in-memory engine.
//!
//! The state machine never does I/O itself; it calls a `Backend`. Engines that touch disk
//! (RocksDB) live in `runtime`. An engine must apply a `WriteBatch` atomically: after a
//! crash either all of a batch is visible or none of it, which is how the applied index
//! stays consistent with the data it describes.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, RwLock};

use crate::error::BackendError;

/// A named, ordered key space inside an engine (etcd calls these buckets).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Bucket {
    /// MVCC data: revision bytes -> encoded `mvccpb::KeyValue`.
    Key,
    /// Bookkeeping: applied index, compacted revision, ...
    Meta,
    Lease,
    Alarm,
    Auth,
    AuthUsers,
    AuthRoles,
    Members,
    MembersRemoved,
    /// The raft log, its hard state, conf state and compaction point (the runtime's).
    Log,
}

impl Bucket {
    pub const ALL: [Bucket; 10] = [
        Bucket::Key,
        Bucket::Meta,
        Bucket::Lease,
        Bucket::Alarm,
        Bucket::Auth,
        Bucket::AuthUsers,
        Bucket::AuthRoles,
        Bucket::Members,
        Bucket::MembersRemoved,
        Bucket::Log,
    ];

    /// The bucket's name: etcd's bucket names where etcd has the bucket, so hashes that
    /// include the name (HashKV hashes `key`) match etcd's.
    pub fn name(self) -> &'static str {
        match self {
            Bucket::Key => "key",
            Bucket::Meta => "meta",
            Bucket::Lease => "lease",
            Bucket::Alarm => "alarm",
            Bucket::Auth => "auth",
            Bucket::AuthUsers => "authUsers",
            Bucket::AuthRoles => "authRoles",
            Bucket::Members => "members",
            Bucket::MembersRemoved => "members_removed",
            Bucket::Log => "log",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchOp {
    Put {
        bucket: Bucket,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        bucket: Bucket,
        key: Vec<u8>,
    },
}

/// Mutations applied atomically, in order.
///
/// Durability, weakest first: a *volatile* batch may be lost in a crash even when later
/// batches survive (the engine keeps it out of its write-ahead log), until the next
/// [`Backend::flush`]; a plain batch is logged and survives a crash exactly when a later
/// synced batch or a flush made it durable (durability follows write order among logged
/// batches); a `sync` batch (never volatile) is durable when `write` returns, and so is
/// every logged batch before it. After a crash the engine holds a prefix of all batches
/// (what it had flushed, when asked or on its own) followed by the logged batches after
/// that prefix which had been made durable: never part of a batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteBatch {
    pub ops: Vec<BatchOp>,
    pub sync: bool,
    /// Only for writes that can be redone after a crash (state applied from a raft log
    /// that outlives them). Ignored when `sync` is set.
    pub volatile: bool,
}

impl WriteBatch {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn put(&mut self, bucket: Bucket, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push(BatchOp::Put {
            bucket,
            key: key.into(),
            value: value.into(),
        });
    }
    pub fn delete(&mut self, bucket: Bucket, key: impl Into<Vec<u8>>) {
        self.ops.push(BatchOp::Delete {
            bucket,
            key: key.into(),
        });
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// Visitor over a scan: return `false` to stop early.
pub type ScanVisitor<'a> = dyn FnMut(&[u8], &[u8]) -> bool + 'a;

pub trait Backend: Send + Sync + 'static {
    fn get(&self, bucket: Bucket, key: &[u8]) -> Result<Option<Vec<u8>>, BackendError>;
    /// Visits the keys of `bucket` in `[start, end)` in ascending byte order; `end: None`
    /// scans to the end of the bucket.
    fn scan(
        &self,
        bucket: Bucket,
        start: &[u8],
        end: Option<&[u8]>,
        visit: &mut ScanVisitor<'_>,
    ) -> Result<(), BackendError>;
    /// Applies the whole batch atomically.
    fn write(&self, batch: WriteBatch) -> Result<(), BackendError>;
    /// Makes every earlier write durable, volatile ones included.
    fn flush(&self) -> Result<(), BackendError> {
        Ok(())
    }
    /// Hands the engine any volatile batches a buffering wrapper still holds, so the
    /// engine underneath has every write made so far (an engine that does not buffer has
    /// nothing to do).
    fn write_pending(&self) -> Result<(), BackendError> {
        Ok(())
    }
    /// Approximate bytes the engine occupies (etcd's `db_size`).
    fn size_bytes(&self) -> u64;
    /// Short engine name for status and logs ("memory", "rocksdb").
    fn engine_name(&self) -> &'static str;
}

/// Every bucket's entries in one ordered map, keyed by (bucket, key).
type Entries = BTreeMap<(Bucket, Vec<u8>), Vec<u8>>;

/// A shared engine is an engine: the state machine and the log hold the same one, and a
/// test reopens a state machine over the bytes an earlier one left, as a restart does.
impl<B: Backend + ?Sized> Backend for Arc<B> {
    fn get(&self, bucket: Bucket, key: &[u8]) -> Result<Option<Vec<u8>>, BackendError> {
        (**self).get(bucket, key)
    }
    fn scan(
        &self,
        bucket: Bucket,
        start: &[u8],
        end: Option<&[u8]>,
        visit: &mut ScanVisitor<'_>,
    ) -> Result<(), BackendError> {
        (**self).scan(bucket, start, end, visit)
    }
    fn write(&self, batch: WriteBatch) -> Result<(), BackendError> {
        (**self).write(batch)
    }
    fn flush(&self) -> Result<(), BackendError> {
        (**self).flush()
    }
    fn write_pending(&self) -> Result<(), BackendError> {
        (**self).write_pending()
    }
    fn size_bytes(&self) -> u64 {
        (**self).size_bytes()
    }
    fn engine_name(&self) -> &'static str {
        (**self).engine_name()
    }
}

/// The in-memory engine: tests, `--engine memory`, and simulation. Nothing survives the
/// process.
#[derive(Default)]
pub struct MemoryBackend {
    buckets: RwLock<Entries>,
}

impl MemoryBackend {
    pub fn new() -> Self {
        Self::default()
    }

    /// An independent engine holding the same bytes (the simulated disk keeps its
    /// durable image this way).
    pub fn duplicate(&self) -> Self {
        let map = match self.buckets.read() {
            Ok(map) => map.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        Self {
            buckets: RwLock::new(map),
        }
    }
}

impl Backend for MemoryBackend {
    fn get(&self, bucket: Bucket, key: &[u8]) -> Result<Option<Vec<u8>>, BackendError> {
        let map = self.buckets.read().map_err(|_| poisoned())?;
        Ok(map.get(&(bucket, key.to_vec())).cloned())
    }

    fn scan(
        &self,
        bucket: Bucket,
        start: &[u8],
        end: Option<&[u8]>,
        visit: &mut ScanVisitor<'_>,
    ) -> Result<(), BackendError> {
        let map = self.buckets.read().map_err(|_| poisoned())?;
        let lower = Bound::Included((bucket, start.to_vec()));
        let upper = match end {
            Some(end) => Bound::Excluded((bucket, end.to_vec())),
            None => match next_bucket(bucket) {
                Some(next) => Bound::Excluded((next, Vec::new())),
                None => Bound::Unbounded,
            },
        };
        if let (Bound::Included(lo), Bound::Excluded(hi)) = (&lower, &upper) {
            if lo >= hi {
                return Ok(());
            }
        }
        for ((_, k), v) in map.range((lower, upper)) {
            if !visit(k, v) {
                break;
            }
        }
        Ok(())
    }

    fn write(&self, batch: WriteBatch) -> Result<(), BackendError> {
        let mut map = self.buckets.write().map_err(|_| poisoned())?;
        for op in batch.ops {
            match op {
                BatchOp::Put { bucket, key, value } => {
                    map.insert((bucket, key), value);
                }
                BatchOp::Delete { bucket, key } => {
                    map.remove(&(bucket, key));
                }
            }
        }
        Ok(())
    }

    fn size_bytes(&self) -> u64 {
        let map = match self.buckets.read() {
            Ok(map) => map,
            Err(_) => return 0,
        };
        map.iter()
            .map(|((_, k), v)| (k.len() + v.len()) as u64)
            .sum()
    }

    fn engine_name(&self) -> &'static str {
        "memory"
    }
}

fn next_bucket(bucket: Bucket) -> Option<Bucket> {
    let pos = Bucket::ALL.iter().position(|b| *b == bucket)?;
    Bucket::ALL.get(pos + 1).copied()
}

fn poisoned() -> BackendError {
    BackendError("memory engine lock poisoned".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_stays_inside_bucket_and_range() {
        let be = MemoryBackend::new();
        let mut b = WriteBatch::new();
        b.put(Bucket::Key, b"a".to_vec(), b"1".to_vec());
        b.put(Bucket::Key, b"b".to_vec(), b"2".to_vec());
        b.put(Bucket::Key, b"c".to_vec(), b"3".to_vec());
        b.put(Bucket::Meta, b"a".to_vec(), b"m".to_vec());
        be.write(b).unwrap();
        let mut seen = Vec::new();
        be.scan(Bucket::Key, b"", None, &mut |k, _| {
            seen.push(k.to_vec());
            true
        })
        .unwrap();
        assert_eq!(seen, vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
        seen.clear();
        be.scan(Bucket::Key, b"b", Some(b"c"), &mut |k, _| {
            seen.push(k.to_vec());
            true
        })
        .unwrap();
        assert_eq!(seen, vec![b"b".to_vec()]);
        seen.clear();
        be.scan(Bucket::Key, b"c", Some(b"a"), &mut |k, _| {
            seen.push(k.to_vec());
            true
        })
        .unwrap();
        assert!(seen.is_empty());
    }

    #[test]
    fn batch_is_applied_in_order() {
        let be = MemoryBackend::new();
        let mut b = WriteBatch::new();
        b.put(Bucket::Meta, b"k".to_vec(), b"1".to_vec());
        b.delete(Bucket::Meta, b"k".to_vec());
        b.put(Bucket::Meta, b"j".to_vec(), b"2".to_vec());
        be.write(b).unwrap();
        assert_eq!(be.get(Bucket::Meta, b"k").unwrap(), None);
        assert_eq!(be.get(Bucket::Meta, b"j").unwrap(), Some(b"2".to_vec()));
    }
}
