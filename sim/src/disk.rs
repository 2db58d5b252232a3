//! The simulated disk: a storage engine that survives a simulated crash of its member but
//! loses what a real engine loses on power loss.
//!
//! It keeps the engine contract the runtime relies on (`metastore_core::WriteBatch`): a
//! batch is atomic; logged batches become durable in write order (a synced batch makes
//! every earlier logged batch durable); a volatile batch becomes durable only through a
//! flush, the runtime's or one the engine does on its own (RocksDB flushes full
//! memtables). So a crash keeps the image as of the last flush, then a seeded prefix of
//! all later batches (as if the engine had flushed there by itself), then the later
//! logged batches that were synced plus a seeded prefix of the unsynced ones; never part
//! of a batch. It must never decide by itself how much to lose: the harness passes the
//! choices in, drawn from the seed.

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
    /// What survives any crash: the image as of the last point where every earlier write
    /// was durable (a flush, or a sync with no volatile batch pending).
    durable: MemoryBackend,
    /// What readers see: `durable` plus every batch in `pending`. Readers clone the
    /// `Arc` and let go of the disk's lock before reading, because a scan's visitor may
    /// read the disk again (MVCC history loads values while scanning the index).
    visible: Arc<MemoryBackend>,
    /// Batches written since `durable`, oldest first.
    pending: Vec<WriteBatch>,
    /// The logged batches among `pending[..synced]` are durable (a sync came after them).
    synced: usize,
    stats: DiskStats,
}

/// Counters for the fault log and the docs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DiskStats {
    pub writes: u64,
    pub syncs: u64,
    pub flushes: u64,
    pub crashes: u64,
    /// Batches lost to crashes so far.
    pub lost_batches: u64,
}

/// What a crash keeps of the batches written since the last point where everything was
/// durable; see [`SimDisk::crash`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrashChoice {
    /// The engine had flushed the first `flushed` pending batches on its own (clamped).
    pub flushed: usize,
    /// Of the logged batches after those that no sync covered, the first `logged` made
    /// it to disk (clamped).
    pub logged: usize,
}

fn is_volatile(batch: &WriteBatch) -> bool {
    batch.volatile && !batch.sync
}

impl SimDisk {
    pub fn new() -> Self {
        Self::default()
    }

    /// How a crash right now could go: (batches pending since the last durable point,
    /// the most logged batches that could be lost).
    pub fn at_risk(&self) -> (usize, usize) {
        let inner = self.lock();
        let logged_unsynced = inner.pending[inner.synced..]
            .iter()
            .filter(|b| !is_volatile(b))
            .count();
        (inner.pending.len(), logged_unsynced)
    }

    /// Power loss: keeps what `choice` says survives (see the module docs) and drops the
    /// rest. Returns how many batches were lost.
    pub fn crash(&self, choice: CrashChoice) -> usize {
        let mut inner = self.lock();
        let pending = std::mem::take(&mut inner.pending);
        let synced = std::mem::take(&mut inner.synced);
        let flushed = choice.flushed.min(pending.len());
        let mut logged_unsynced = 0;
        let mut lost = 0;
        for (i, batch) in pending.into_iter().enumerate() {
            let keep = if i < flushed {
                true
            } else if is_volatile(&batch) {
                false
            } else if i < synced {
                true
            } else {
                logged_unsynced += 1;
                logged_unsynced <= choice.logged
            };
            if keep {
                apply(&inner.durable, batch);
            } else {
                lost += 1;
            }
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

impl Inner {
    /// Everything pending becomes durable.
    fn settle(&mut self) {
        for batch in std::mem::take(&mut self.pending) {
            apply(&self.durable, batch);
        }
        self.synced = 0;
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
        let sync = batch.sync;
        inner.pending.push(batch);
        if sync {
            inner.stats.syncs += 1;
            inner.synced = inner.pending.len();
            // Nothing volatile in the way: the whole prefix is durable.
            if !inner.pending.iter().any(is_volatile) {
                inner.settle();
            }
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), BackendError> {
        let mut inner = self.lock();
        inner.stats.flushes += 1;
        inner.settle();
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

    #[derive(Clone, Copy)]
    enum Kind {
        Volatile,
        Logged,
        Synced,
    }

    fn put(disk: &SimDisk, key: &str, kind: Kind) {
        let mut batch = WriteBatch::new();
        batch.put(Bucket::Key, key.as_bytes(), b"v".to_vec());
        batch.sync = matches!(kind, Kind::Synced);
        batch.volatile = matches!(kind, Kind::Volatile);
        disk.write(batch).unwrap();
    }

    fn has(disk: &SimDisk, key: &str) -> bool {
        disk.get(Bucket::Key, key.as_bytes()).unwrap().is_some()
    }

    fn crash(disk: &SimDisk, flushed: usize, logged: usize) -> usize {
        disk.crash(CrashChoice { flushed, logged })
    }

    #[test]
    fn a_crash_keeps_synced_writes_and_a_prefix_of_the_rest() {
        let disk = SimDisk::new();
        put(&disk, "a", Kind::Logged);
        put(&disk, "b", Kind::Synced); // makes "a" durable too: durability follows write order
        put(&disk, "c", Kind::Logged);
        put(&disk, "d", Kind::Logged);
        put(&disk, "e", Kind::Logged);
        assert!(
            has(&disk, "e"),
            "unsynced writes are visible before a crash"
        );
        assert_eq!(disk.at_risk(), (3, 3));
        assert_eq!(crash(&disk, 0, 1), 2);
        assert!(has(&disk, "a") && has(&disk, "b") && has(&disk, "c"));
        assert!(!has(&disk, "d") && !has(&disk, "e"));
        assert_eq!(disk.at_risk(), (0, 0));
        // A second crash with nothing pending loses nothing.
        assert_eq!(crash(&disk, 0, 0), 0);
        assert!(has(&disk, "c"));
    }

    #[test]
    fn volatile_writes_survive_only_a_flush() {
        let disk = SimDisk::new();
        put(&disk, "v1", Kind::Volatile);
        put(&disk, "s1", Kind::Synced); // does not make "v1" durable
        put(&disk, "v2", Kind::Volatile);
        put(&disk, "l1", Kind::Logged);
        assert_eq!(disk.at_risk(), (4, 1));
        assert_eq!(crash(&disk, 0, 1), 2);
        assert!(has(&disk, "s1") && has(&disk, "l1"));
        assert!(!has(&disk, "v1") && !has(&disk, "v2"));

        put(&disk, "v3", Kind::Volatile);
        disk.flush().unwrap();
        put(&disk, "v4", Kind::Volatile);
        assert_eq!(crash(&disk, 0, 0), 1);
        assert!(has(&disk, "v3") && !has(&disk, "v4"));
    }

    #[test]
    fn an_engine_flush_keeps_a_prefix_of_everything() {
        let disk = SimDisk::new();
        put(&disk, "v1", Kind::Volatile);
        put(&disk, "l1", Kind::Logged);
        put(&disk, "v2", Kind::Volatile);
        put(&disk, "l2", Kind::Logged);
        // Flushed on its own after the first two; of the logged rest, nothing reached disk.
        assert_eq!(crash(&disk, 2, 0), 2);
        assert!(has(&disk, "v1") && has(&disk, "l1"));
        assert!(!has(&disk, "v2") && !has(&disk, "l2"));
    }

    #[test]
    fn a_scan_visitor_may_read_the_disk() {
        let disk = SimDisk::new();
        put(&disk, "a", Kind::Logged);
        put(&disk, "b", Kind::Synced);
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
        crash(&disk, 0, 0);
        assert!(disk.get(Bucket::Key, b"x").unwrap().is_none());
        assert!(disk.get(Bucket::Meta, b"y").unwrap().is_none());
        assert_eq!(disk.stats().lost_batches, 1);
    }
}
