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

use metastore_core::{Backend, BackendError, MemoryBackend};

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
    /// entry.
    pub fn for_state_machine(&self) -> Box<dyn Backend> {
        Box::new(Replayed(self.backend()))
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

/// See [`Engine::for_state_machine`].
struct Replayed(Arc<dyn Backend>);

impl Backend for Replayed {
    fn get(
        &self,
        bucket: metastore_core::Bucket,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, BackendError> {
        self.0.get(bucket, key)
    }

    fn scan(
        &self,
        bucket: metastore_core::Bucket,
        start: &[u8],
        end: Option<&[u8]>,
        visit: &mut metastore_core::backend::ScanVisitor<'_>,
    ) -> Result<(), BackendError> {
        self.0.scan(bucket, start, end, visit)
    }

    fn write(&self, mut batch: metastore_core::WriteBatch) -> Result<(), BackendError> {
        batch.volatile = !batch.sync;
        self.0.write(batch)
    }

    fn flush(&self) -> Result<(), BackendError> {
        self.0.flush()
    }

    fn size_bytes(&self) -> u64 {
        self.0.size_bytes()
    }

    fn engine_name(&self) -> &'static str {
        self.0.engine_name()
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
