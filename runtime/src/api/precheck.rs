//! Pre-proposal request checks: forwards to core's `validate` module, which owns etcd's
//! checks (`checkRangeRequest`, `checkPutRequest`, `checkTxnRequest`, `checkIntervals`,
//! `isTxnReadonly`). Kept as one seam so the services call the checks the same way
//! whatever their home.
//!
//! This module must never grow checks of its own: a rule about what a request may
//! contain belongs to core, where the fuzzers and the reference model see it.

pub use metastore_core::validate::{delete_range, is_txn_read_only, put, range, txn};
