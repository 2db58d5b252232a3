//! MetaStore's state machine: the MVCC key space, transactions, compaction and hashing,
//! applied from the replicated request envelope.
//!
//! This crate owns every decision about what a request does to the key space. It must
//! never do I/O, spawn threads, read a clock or draw random numbers: time and generated
//! values arrive inside the `InternalRequest` being applied, and storage is reached only
//! through the [`backend::Backend`] trait. The same sequence of applied entries must give
//! byte-identical state and the same `hash_kv` on every member and every engine.
//!
//! Modules, from the bottom up: `backend` (the storage seam), `revision` (Key bucket key
//! layout), `index` (per-key generations of revisions), `lease` (lease table and key
//! attachment), `mvcc` (revisions, read/write transactions, compaction, HashKV), `kv`
//! (what Range/Put/DeleteRange/Txn do), `validate` (pre-proposal request checks), `state`
//! (the apply entry point), `alarm` (active alarms and what they refuse). `gosort` reproduces Go's sort so sorted ranges match etcd's
//! order exactly.

pub mod alarm;
pub mod backend;
pub mod error;
mod gosort;
pub mod index;
mod kv;
pub mod lease;
pub mod mvcc;
pub mod revision;
pub mod state;
pub mod validate;

pub use backend::{Backend, BatchOp, Bucket, MemoryBackend, WriteBatch};
pub use error::{BackendError, Error, Result};
pub use metastore_proto as proto;
pub use state::{Applied, ApplyResponse, HashKv, StateMachine, StateMachineConfig};
