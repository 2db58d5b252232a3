//! Storage engines behind core's `Backend` trait, and the handle the runtime keeps on the
//! engine it opened.
//!
//! This module owns opening, sizing and flushing engines. It must never interpret the
//! bytes it stores (that is core's job for the key space and `log`'s for log entries), and
//! it must keep two engine properties the rest of the runtime relies on: a `WriteBatch` is
//! applied atomically, and writes become durable in the order they were made (a synced
//! batch makes every earlier batch durable too), which is what lets the log trim entries
//! in a later batch than the one that applied them.

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
    /// (the simulation's disk, which survives a simulated crash). `flush` syncs it with an
    /// empty synced batch, which makes every earlier write durable (see above).
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

    /// A boxed handle for `StateMachine::open`, sharing the engine with the log.
    pub fn boxed(&self) -> Box<dyn Backend> {
        Box::new(self.backend())
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

    /// Makes every write so far durable (used at shutdown; apply batches are not synced
    /// one by one because the log entry they come from already is).
    pub fn flush(&self) -> Result<(), BackendError> {
        match self {
            Engine::Memory(_) => Ok(()),
            #[cfg(feature = "rocksdb")]
            Engine::RocksDb(r) => r.flush(),
            Engine::Supplied(b) => {
                let mut batch = metastore_core::WriteBatch::new();
                batch.sync = true;
                b.write(batch)
            }
        }
    }

    pub fn name(&self) -> &'static str {
        self.backend().engine_name()
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
