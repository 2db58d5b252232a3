//! The simulated disk: a storage engine that survives a simulated crash of its member but
//! loses the writes that were not synced, as a real disk does on power loss.
//!
//! It keeps the engine contract the runtime relies on (`storage` module): a batch is
//! atomic, and durability follows write order, so a crash keeps the synced image plus
//! some *prefix* of the unsynced batches written after it, never a later batch without an
//! earlier one and never part of a batch. It must never decide by itself how much to
//! lose: the harness passes the choice in, drawn from the seed.

use std::sync::{Arc, Mutex};

use metastore_core::backend::ScanVisitor;
use metastore_core::{Backend, BackendError, MemoryBackend, WriteBatch};

/// A disk that outlives the member using it. Share it with `Arc` between the harness and
/// successive incarnations of one member.
#[derive(Default)]
pub struct SimDisk {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// What survives a crash.
    durable: MemoryBackend,
    /// What readers see: `durable` plus every batch in `unsynced`. Readers clone the
    /// `Arc` and let go of the disk's lock before reading, because a scan's visitor may
    /// read the disk again (MVCC history loads values while scanning the index).
    visible: Arc<MemoryBackend>,
    /// Batches written since the last sync, oldest first.
    unsynced: Vec<WriteBatch>,
    stats: DiskStats,
}

/// Counters for the fault log and the docs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DiskStats {
    pub writes: u64,
    pub syncs: u64,
    pub crashes: u64,
    /// Batches lost to crashes so far.
    pub lost_batches: u64,
}

impl SimDisk {
    pub fn new() -> Self {
        Self::default()
    }

    /// How many batches a crash right now could lose.
    pub fn unsynced_batches(&self) -> usize {
        self.lock().unsynced.len()
    }

    /// Power loss: keeps the synced image plus the first `keep` unsynced batches (clamped)
    /// and drops the rest. Returns how many batches were lost.
    pub fn crash(&self, keep: usize) -> usize {
        let mut inner = self.lock();
        let unsynced = std::mem::take(&mut inner.unsynced);
        let keep = keep.min(unsynced.len());
        let lost = unsynced.len() - keep;
        for batch in unsynced.into_iter().take(keep) {
            apply(&inner.durable, batch);
        }
        inner.visible = Arc::new(inner.durable.duplicate());
        inner.stats.crashes += 1;
        inner.stats.lost_batches += lost as u64;
        lost
    }

    pub fn stats(&self) -> DiskStats {
        self.lock().stats
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data (every mutation below is
        // one call on a MemoryBackend), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn apply(engine: &MemoryBackend, batch: WriteBatch) {
    // The memory engine's write cannot fail except on a poisoned lock, which its own
    // methods never leave behind.
    let _ = engine.write(batch);
}

impl Backend for SimDisk {
    fn get(
        &self,
        bucket: metastore_core::Bucket,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, BackendError> {
        let visible = self.lock().visible.clone();
        visible.get(bucket, key)
    }

    fn scan(
        &self,
        bucket: metastore_core::Bucket,
        start: &[u8],
        end: Option<&[u8]>,
        visit: &mut ScanVisitor<'_>,
    ) -> Result<(), BackendError> {
        let visible = self.lock().visible.clone();
        visible.scan(bucket, start, end, visit)
    }

    fn write(&self, batch: WriteBatch) -> Result<(), BackendError> {
        let mut inner = self.lock();
        inner.stats.writes += 1;
        inner.visible.write(batch.clone())?;
        if batch.sync {
            inner.stats.syncs += 1;
            let unsynced = std::mem::take(&mut inner.unsynced);
            for earlier in unsynced {
                apply(&inner.durable, earlier);
            }
            apply(&inner.durable, batch);
        } else {
            inner.unsynced.push(batch);
        }
        Ok(())
    }

    fn size_bytes(&self) -> u64 {
        let visible = self.lock().visible.clone();
        visible.size_bytes()
    }

    fn engine_name(&self) -> &'static str {
        "simdisk"
    }
}

#[cfg(test)]
mod tests {
    use metastore_core::Bucket;

    use super::*;

    fn put(disk: &SimDisk, key: &str, sync: bool) {
        let mut batch = WriteBatch::new();
        batch.put(Bucket::Key, key.as_bytes(), b"v".to_vec());
        batch.sync = sync;
        disk.write(batch).unwrap();
    }

    fn has(disk: &SimDisk, key: &str) -> bool {
        disk.get(Bucket::Key, key.as_bytes()).unwrap().is_some()
    }

    #[test]
    fn a_crash_keeps_synced_writes_and_a_prefix_of_the_rest() {
        let disk = SimDisk::new();
        put(&disk, "a", false);
        put(&disk, "b", true); // makes "a" durable too: durability follows write order
        put(&disk, "c", false);
        put(&disk, "d", false);
        put(&disk, "e", false);
        assert!(
            has(&disk, "e"),
            "unsynced writes are visible before a crash"
        );
        assert_eq!(disk.crash(1), 2);
        assert!(has(&disk, "a") && has(&disk, "b") && has(&disk, "c"));
        assert!(!has(&disk, "d") && !has(&disk, "e"));
        assert_eq!(disk.unsynced_batches(), 0);
        // A second crash with nothing pending loses nothing.
        assert_eq!(disk.crash(0), 0);
        assert!(has(&disk, "c"));
    }

    #[test]
    fn a_scan_visitor_may_read_the_disk() {
        let disk = SimDisk::new();
        put(&disk, "a", false);
        put(&disk, "b", true);
        let mut seen = 0;
        disk.scan(Bucket::Key, b"", None, &mut |k, _| {
            seen += usize::from(disk.get(Bucket::Key, k).unwrap().is_some());
            true
        })
        .unwrap();
        assert_eq!(seen, 2);
    }

    #[test]
    fn a_batch_is_lost_or_kept_whole() {
        let disk = SimDisk::new();
        let mut batch = WriteBatch::new();
        batch.put(Bucket::Key, b"x".to_vec(), b"1".to_vec());
        batch.put(Bucket::Meta, b"y".to_vec(), b"2".to_vec());
        disk.write(batch).unwrap();
        disk.crash(0);
        assert!(disk.get(Bucket::Key, b"x").unwrap().is_none());
        assert!(disk.get(Bucket::Meta, b"y").unwrap().is_none());
        assert_eq!(disk.stats().lost_batches, 1);
    }
}
