//! The RocksDB engine: core's buckets as RocksDB column families in one database.
//!
//! This module owns the mapping from `Backend` calls to RocksDB. It must never write
//! outside a `WriteBatch` (atomicity across buckets comes from one RocksDB write batch
//! over column families that share a single write-ahead log) and never skip the WAL: the
//! WAL's ordering is what makes "a synced batch implies all earlier batches" true.

use std::path::{Path, PathBuf};

use metastore_core::backend::ScanVisitor;
use metastore_core::{Backend, BackendError, BatchOp, Bucket, WriteBatch};
use rocksdb::{ColumnFamily, ColumnFamilyDescriptor, Options, ReadOptions, WriteOptions, DB};

pub struct RocksBackend {
    db: DB,
    path: PathBuf,
}

fn err(context: &str, e: rocksdb::Error) -> BackendError {
    BackendError(format!("rocksdb {context}: {e}"))
}

impl RocksBackend {
    /// Opens (or creates) the database at `path` with one column family per bucket.
    pub fn open(path: &Path) -> Result<Self, BackendError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // Two cores on the target machines: one flush and one compaction at a time.
        opts.set_max_background_jobs(2);
        // Recover to the last consistent point after a crash: a torn WAL tail holds only
        // writes that were never acknowledged (acknowledged ones were synced).
        opts.set_wal_recovery_mode(rocksdb::DBRecoveryMode::PointInTime);
        // Volatile batches (state applied from the raft log) skip the WAL and reach disk
        // only when memtables are flushed. A batch spans column families, so every flush
        // must take all of them at once, or a crash could keep half a batch.
        opts.set_atomic_flush(true);
        let cfs = Bucket::ALL
            .iter()
            .map(|b| ColumnFamilyDescriptor::new(b.name(), Options::default()));
        let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(|e| err("open", e))?;
        Ok(Self {
            db,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn cf(&self, bucket: Bucket) -> Result<&ColumnFamily, BackendError> {
        self.db.cf_handle(bucket.name()).ok_or_else(|| {
            BackendError(format!("rocksdb: column family {} missing", bucket.name()))
        })
    }

    fn sum_property(&self, name: &str) -> u64 {
        Bucket::ALL
            .iter()
            .filter_map(|b| self.cf(*b).ok())
            .filter_map(|cf| self.db.property_int_value_cf(cf, name).ok().flatten())
            .sum()
    }

    /// Bytes of live SST files and memtables: what the data currently needs.
    pub fn size_in_use(&self) -> u64 {
        self.sum_property("rocksdb.live-sst-files-size")
            + self.sum_property("rocksdb.cur-size-all-mem-tables")
    }
}

impl Backend for RocksBackend {
    fn get(&self, bucket: Bucket, key: &[u8]) -> Result<Option<Vec<u8>>, BackendError> {
        self.db
            .get_cf(self.cf(bucket)?, key)
            .map_err(|e| err("get", e))
    }

    fn scan(
        &self,
        bucket: Bucket,
        start: &[u8],
        end: Option<&[u8]>,
        visit: &mut ScanVisitor<'_>,
    ) -> Result<(), BackendError> {
        if let Some(end) = end {
            if start >= end {
                return Ok(());
            }
        }
        let mut read = ReadOptions::default();
        if let Some(end) = end {
            // The bound lets RocksDB stop at the range's end instead of reading on into
            // the next keys (and tombstones) of the column family.
            read.set_iterate_upper_bound(end.to_vec());
        }
        let mut it = self.db.raw_iterator_cf_opt(self.cf(bucket)?, read);
        it.seek(start);
        while it.valid() {
            let (Some(k), Some(v)) = (it.key(), it.value()) else {
                break;
            };
            if !visit(k, v) {
                return Ok(());
            }
            it.next();
        }
        it.status().map_err(|e| err("scan", e))
    }

    fn write(&self, batch: WriteBatch) -> Result<(), BackendError> {
        let mut wb = rocksdb::WriteBatch::default();
        for op in &batch.ops {
            match op {
                BatchOp::Put { bucket, key, value } => wb.put_cf(self.cf(*bucket)?, key, value),
                BatchOp::Delete { bucket, key } => wb.delete_cf(self.cf(*bucket)?, key),
            }
        }
        let mut opts = WriteOptions::default();
        opts.disable_wal(batch.volatile && !batch.sync);
        self.db.write_opt(wb, &opts).map_err(|e| err("write", e))?;
        if batch.sync {
            // Synced after the write rather than by it: a synced write holds RocksDB's
            // write queue for its fsync, and every write behind it (the state machine's
            // applies, on the raft loop) would wait that long; SyncWAL lets them through
            // while it syncs. Either way the batch, and every logged batch before it, is
            // durable when this returns.
            self.db.flush_wal(true).map_err(|e| err("sync wal", e))?;
        }
        Ok(())
    }

    /// Writes the memtables of every column family out (atomically, see `open`), which
    /// makes volatile batches durable, then syncs the WAL for the logged ones.
    fn flush(&self) -> Result<(), BackendError> {
        let cfs: Vec<&ColumnFamily> = Bucket::ALL
            .iter()
            .map(|b| self.cf(*b))
            .collect::<Result<_, _>>()?;
        let mut opts = rocksdb::FlushOptions::default();
        opts.set_wait(true);
        self.db
            .flush_cfs_opt(&cfs, &opts)
            .map_err(|e| err("flush", e))?;
        self.db.flush_wal(true).map_err(|e| err("flush wal", e))
    }

    fn size_bytes(&self) -> u64 {
        self.sum_property("rocksdb.total-sst-files-size")
            + self.sum_property("rocksdb.cur-size-all-mem-tables")
    }

    fn engine_name(&self) -> &'static str {
        "rocksdb"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(
        be: &RocksBackend,
        bucket: Bucket,
        start: &[u8],
        end: Option<&[u8]>,
    ) -> Vec<Vec<u8>> {
        let mut seen = Vec::new();
        be.scan(bucket, start, end, &mut |k, _| {
            seen.push(k.to_vec());
            true
        })
        .unwrap();
        seen
    }

    #[test]
    fn buckets_are_separate_and_scans_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let be = RocksBackend::open(dir.path()).unwrap();
        let mut b = WriteBatch::new();
        b.put(Bucket::Key, b"a".to_vec(), b"1".to_vec());
        b.put(Bucket::Key, b"b".to_vec(), b"2".to_vec());
        b.put(Bucket::Key, b"c".to_vec(), b"3".to_vec());
        b.put(Bucket::Meta, b"a".to_vec(), b"m".to_vec());
        b.sync = true;
        be.write(b).unwrap();
        assert_eq!(collect(&be, Bucket::Key, b"", None).len(), 3);
        assert_eq!(
            collect(&be, Bucket::Key, b"b", Some(b"c")),
            vec![b"b".to_vec()]
        );
        assert!(collect(&be, Bucket::Key, b"c", Some(b"a")).is_empty());
        assert_eq!(collect(&be, Bucket::Meta, b"", None), vec![b"a".to_vec()]);
        assert_eq!(be.get(Bucket::Meta, b"a").unwrap(), Some(b"m".to_vec()));
        assert_eq!(be.get(Bucket::Log, b"a").unwrap(), None);
        // Early stop.
        let mut n = 0;
        be.scan(Bucket::Key, b"", None, &mut |_, _| {
            n += 1;
            false
        })
        .unwrap();
        assert_eq!(n, 1);
    }

    #[test]
    fn batches_apply_in_order_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let be = RocksBackend::open(dir.path()).unwrap();
            let mut b = WriteBatch::new();
            b.put(Bucket::Meta, b"k".to_vec(), b"1".to_vec());
            b.delete(Bucket::Meta, b"k".to_vec());
            b.put(Bucket::Meta, b"j".to_vec(), b"2".to_vec());
            b.sync = true;
            be.write(b).unwrap();
            assert!(be.size_bytes() > 0);
        }
        let be = RocksBackend::open(dir.path()).unwrap();
        assert_eq!(be.get(Bucket::Meta, b"k").unwrap(), None);
        assert_eq!(be.get(Bucket::Meta, b"j").unwrap(), Some(b"2".to_vec()));
    }

    #[test]
    fn a_second_open_of_the_same_dir_fails_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let _first = RocksBackend::open(dir.path()).unwrap();
        let second = RocksBackend::open(dir.path());
        assert!(second.is_err());
    }
}
