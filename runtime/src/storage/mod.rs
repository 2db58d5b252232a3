//! Storage engines behind core's `Backend` trait, and the handle the runtime keeps on the
//! engine it opened.
//!
//! This module owns opening, sizing and flushing engines. It must never interpret the
//! bytes it stores (that is core's job for the key space and `raft::storage`'s for the
//! log), and it must keep the engine properties the rest of the runtime relies on (see
//! `metastore_core::WriteBatch`): a batch is applied atomically; logged batches become
//! durable in the order they were made (a synced batch makes every earlier logged batch
//! durable too); a volatile batch is durable only after a flush.

use std::sync::Arc;

use std::sync::Mutex;

use metastore_core::{Backend, BackendError, BatchOp, Bucket, MemoryBackend, WriteBatch};

use crate::config::{Config, Engine as EngineKind};

#[cfg(feature = "rocksdb")]
pub mod rocks;

/// The engine a member runs on. Cloning shares the same engine.
#[derive(Clone)]
pub enum Engine {
    Memory(Arc<MemoryBackend>),
    #[cfg(feature = "rocksdb")]
    RocksDb(Arc<rocks::RocksBackend>),
    /// An engine the embedder opened and passes to [`crate::server::start_with`]
    /// (the simulation's disk, which survives a simulated crash).
    Supplied(Arc<dyn Backend>),
}

impl Engine {
    /// Opens the engine the configuration names; RocksDB lives in
    /// `<data-dir>/member/rocksdb` (etcd keeps its data under `<data-dir>/member` too).
    pub fn open(config: &Config) -> Result<Self, BackendError> {
        match config.engine {
            EngineKind::Memory => Ok(Engine::Memory(Arc::new(MemoryBackend::new()))),
            #[cfg(feature = "rocksdb")]
            EngineKind::RocksDb => {
                let dir = config.data_dir.join("member");
                create_private_dir(&dir)?;
                let db = rocks::RocksBackend::open(&dir.join("rocksdb"))?;
                Ok(Engine::RocksDb(Arc::new(db)))
            }
        }
    }

    /// The engine as core sees it.
    pub fn backend(&self) -> Arc<dyn Backend> {
        match self {
            Engine::Memory(m) => m.clone(),
            #[cfg(feature = "rocksdb")]
            Engine::RocksDb(r) => r.clone(),
            Engine::Supplied(b) => b.clone(),
        }
    }

    /// The engine as `StateMachine::open` gets it, shared with the log: the batches the
    /// state machine does not sync are written volatile, because every one of them
    /// applies a raft log entry that is durable before it is applied and stays in the log
    /// until a flush has made the applied state durable (`raft`'s module invariant), so
    /// after a crash the log replays whatever was lost. It saves a WAL record per applied
    /// entry. Volatile batches are also gathered (see [`Replayed`]) until the raft loop
    /// calls `write_pending` at the end of each group of applies: one engine write per
    /// group instead of one per entry.
    pub fn for_state_machine(&self) -> Box<dyn Backend> {
        Box::new(Replayed {
            engine: self.backend(),
            pending: Mutex::new(Vec::new()),
        })
    }

    /// Bytes physically occupied (etcd's `db_size`).
    pub fn size(&self) -> u64 {
        self.backend().size_bytes()
    }

    /// Bytes holding live data (etcd's `db_size_in_use`).
    pub fn size_in_use(&self) -> u64 {
        match self {
            Engine::Memory(m) => m.size_bytes(),
            #[cfg(feature = "rocksdb")]
            Engine::RocksDb(r) => r.size_in_use(),
            Engine::Supplied(b) => b.size_bytes(),
        }
    }

    /// Makes every write so far durable, volatile ones included (at shutdown, so a
    /// clean restart replays nothing).
    pub fn flush(&self) -> Result<(), BackendError> {
        self.backend().flush()
    }

    pub fn name(&self) -> &'static str {
        self.backend().engine_name()
    }
}

/// See [`Engine::for_state_machine`]. Owns the volatile batches not yet handed to the
/// engine, and must never let a read miss them: a `get` looks at them first (newest
/// first), and a `scan`, a synced write or a flush hands them to the engine before it
/// goes on, in their order and as one atomic write (a superset of atomic batches is
/// atomic). At most [`PENDING_OPS`] operations wait, which bounds both the memory and
/// what a `get` searches.
struct Replayed {
    engine: Arc<dyn Backend>,
    pending: Mutex<Vec<BatchOp>>,
}

/// Operations gathered before they go to the engine unasked.
const PENDING_OPS: usize = 512;

impl Replayed {
    fn pending(&self) -> Result<std::sync::MutexGuard<'_, Vec<BatchOp>>, BackendError> {
        self.pending
            .lock()
            .map_err(|_| BackendError("pending writes: lock poisoned".into()))
    }

    fn write_out(&self, pending: &mut Vec<BatchOp>) -> Result<(), BackendError> {
        if pending.is_empty() {
            return Ok(());
        }
        let mut batch = WriteBatch::new();
        batch.ops = std::mem::take(pending);
        batch.volatile = true;
        self.engine.write(batch)
    }
}

impl Backend for Replayed {
    fn get(&self, bucket: Bucket, key: &[u8]) -> Result<Option<Vec<u8>>, BackendError> {
        {
            let pending = self.pending()?;
            for op in pending.iter().rev() {
                match op {
                    BatchOp::Put {
                        bucket: b,
                        key: k,
                        value,
                    } if *b == bucket && k == key => {
                        return Ok(Some(value.clone()));
                    }
                    BatchOp::Delete { bucket: b, key: k } if *b == bucket && k == key => {
                        return Ok(None);
                    }
                    _ => {}
                }
            }
        }
        self.engine.get(bucket, key)
    }

    fn scan(
        &self,
        bucket: Bucket,
        start: &[u8],
        end: Option<&[u8]>,
        visit: &mut metastore_core::backend::ScanVisitor<'_>,
    ) -> Result<(), BackendError> {
        self.write_out(&mut *self.pending()?)?;
        self.engine.scan(bucket, start, end, visit)
    }

    fn write(&self, mut batch: WriteBatch) -> Result<(), BackendError> {
        let mut pending = self.pending()?;
        if batch.sync {
            self.write_out(&mut pending)?;
            return self.engine.write(batch);
        }
        pending.append(&mut batch.ops);
        if pending.len() >= PENDING_OPS {
            self.write_out(&mut pending)?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), BackendError> {
        self.write_out(&mut *self.pending()?)?;
        self.engine.flush()
    }

    fn write_pending(&self) -> Result<(), BackendError> {
        self.write_out(&mut *self.pending()?)
    }

    fn size_bytes(&self) -> u64 {
        self.engine.size_bytes()
    }

    fn engine_name(&self) -> &'static str {
        self.engine.engine_name()
    }
}

#[cfg(feature = "rocksdb")]
fn create_private_dir(dir: &std::path::Path) -> Result<(), BackendError> {
    // etcd creates its data directory with 0700: the data may hold credentials.
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|e| {
        BackendError(format!(
            "cannot create data directory {}: {e}",
            dir.display()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replayed() -> (Arc<MemoryBackend>, Box<dyn Backend>) {
        let engine = Arc::new(MemoryBackend::new());
        let wrapped = Engine::Supplied(engine.clone()).for_state_machine();
        (engine, wrapped)
    }

    fn batch(ops: &[(&[u8], Option<&[u8]>)]) -> WriteBatch {
        let mut b = WriteBatch::new();
        for (key, value) in ops {
            match value {
                Some(v) => b.put(Bucket::Key, key.to_vec(), v.to_vec()),
                None => b.delete(Bucket::Key, key.to_vec()),
            }
        }
        b
    }

    fn keys(backend: &dyn Backend) -> Vec<Vec<u8>> {
        let mut seen = Vec::new();
        backend
            .scan(Bucket::Key, b"", None, &mut |k, _| {
                seen.push(k.to_vec());
                true
            })
            .unwrap();
        seen
    }

    #[test]
    fn volatile_writes_wait_and_reads_see_them() {
        let (engine, sm) = replayed();
        sm.write(batch(&[(b"a", Some(b"1")), (b"b", Some(b"2"))]))
            .unwrap();
        sm.write(batch(&[(b"a", None), (b"c", Some(b"3"))]))
            .unwrap();
        // Nothing reached the engine yet; the wrapper's reads see it all, newest first.
        assert_eq!(engine.get(Bucket::Key, b"b").unwrap(), None);
        assert_eq!(sm.get(Bucket::Key, b"a").unwrap(), None);
        assert_eq!(sm.get(Bucket::Key, b"b").unwrap(), Some(b"2".to_vec()));
        assert_eq!(sm.get(Bucket::Meta, b"b").unwrap(), None);
        sm.write_pending().unwrap();
        assert_eq!(keys(&*engine), vec![b"b".to_vec(), b"c".to_vec()]);
        assert_eq!(sm.get(Bucket::Key, b"c").unwrap(), Some(b"3".to_vec()));
    }

    #[test]
    fn scans_synced_writes_and_flushes_take_the_pending_writes_first() {
        let (engine, sm) = replayed();
        sm.write(batch(&[(b"a", Some(b"1"))])).unwrap();
        assert_eq!(keys(&*sm), vec![b"a".to_vec()]);
        assert_eq!(keys(&*engine), vec![b"a".to_vec()]);

        sm.write(batch(&[(b"b", Some(b"1"))])).unwrap();
        // A synced batch lands after the pending ones (its delete wins).
        let mut synced = batch(&[(b"b", None)]);
        synced.sync = true;
        sm.write(synced).unwrap();
        assert_eq!(keys(&*engine), vec![b"a".to_vec()]);

        sm.write(batch(&[(b"c", Some(b"1"))])).unwrap();
        sm.flush().unwrap();
        assert_eq!(keys(&*engine), vec![b"a".to_vec(), b"c".to_vec()]);
    }

    #[test]
    fn at_most_a_bounded_number_of_operations_wait() {
        let (engine, sm) = replayed();
        for i in 0..PENDING_OPS as u32 + 10 {
            sm.write(batch(&[(&i.to_be_bytes(), Some(b"v"))])).unwrap();
        }
        assert!(keys(&*engine).len() >= PENDING_OPS);
        sm.write_pending().unwrap();
        assert_eq!(keys(&*engine).len(), PENDING_OPS + 10);
    }
}
