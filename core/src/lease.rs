//! The lease table: which leases exist and which keys are attached to each (etcd's
//! `lessor`, minus everything about time).
//!
//! Owns lease existence and key attachment as the key space sees them: a Put naming a
//! lease that is not here fails with `LeaseNotFound`, and a key written with a lease is
//! attached to it so that revoking the lease can delete it. Leases are persisted in the
//! Lease bucket as etcd does (8-byte big-endian ID -> `leasepb.Lease`); attachments are
//! not persisted but rebuilt from the keys' `lease` field on open, as etcd rebuilds them.
//!
//! It must never read a clock or decide expiry: expiry is decided by the leader in
//! `runtime` and arrives as a replicated revoke. Granting, revoking, checkpointing and
//! TTL bookkeeping land with the lease issue; until then no lease can exist, so every Put
//! with a lease fails exactly as etcd fails for an unknown lease.

use std::collections::{BTreeMap, BTreeSet};

use crate::backend::{Backend, Bucket};
use crate::error::{Error, Result};

/// A lease as stored in the Lease bucket: etcd's `leasepb.Lease`, field for field, so a
/// stored lease table has etcd's bytes.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct LeaseRecord {
    #[prost(int64, tag = "1")]
    pub id: i64,
    #[prost(int64, tag = "2")]
    pub ttl: i64,
    /// The last checkpointed remaining TTL (0 = never checkpointed).
    #[prost(int64, tag = "3")]
    pub remaining_ttl: i64,
}

/// Key of a lease in the Lease bucket (etcd's `int64ToBytes`).
pub fn lease_key(id: i64) -> [u8; 8] {
    (id as u64).to_be_bytes()
}

/// One live lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub id: i64,
    /// Granted TTL in seconds.
    pub ttl: i64,
    /// Last checkpointed remaining TTL in seconds (0 = none).
    pub remaining_ttl: i64,
    /// Keys currently attached.
    pub keys: BTreeSet<Vec<u8>>,
}

/// The lease table. `0` is never a lease ID (etcd's `NoLease`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lessor {
    leases: BTreeMap<i64, Lease>,
    /// Key -> the lease it is attached to (etcd's `itemMap`).
    key_lease: BTreeMap<Vec<u8>, i64>,
}

impl Lessor {
    /// Loads the lease table from the Lease bucket (attachments come later, from the key
    /// space, through `attach`).
    pub fn load(backend: &dyn Backend) -> Result<Self> {
        let mut lessor = Lessor::default();
        let mut failure = None;
        backend.scan(Bucket::Lease, b"", None, &mut |k, v| {
            match <LeaseRecord as prost::Message>::decode(v) {
                Ok(rec) if k == lease_key(rec.id) => {
                    lessor.leases.insert(
                        rec.id,
                        Lease {
                            id: rec.id,
                            ttl: rec.ttl,
                            remaining_ttl: rec.remaining_ttl,
                            keys: BTreeSet::new(),
                        },
                    );
                    true
                }
                Ok(_) => {
                    failure = Some(Error::Corrupt("lease stored under another ID".into()));
                    false
                }
                Err(e) => {
                    failure = Some(Error::Corrupt(format!("undecodable lease: {e}")));
                    false
                }
            }
        })?;
        match failure {
            Some(e) => Err(e),
            None => Ok(lessor),
        }
    }

    /// The lease with this ID, if it exists (etcd's `Lookup`).
    pub fn lookup(&self, id: i64) -> Option<&Lease> {
        self.leases.get(&id)
    }

    /// The lease a key is attached to, 0 if none (etcd's `GetLease`).
    pub fn lease_of(&self, key: &[u8]) -> i64 {
        self.key_lease.get(key).copied().unwrap_or(0)
    }

    /// Attaches `key` to lease `id`. An unknown lease is `LeaseNotFound`; callers check
    /// existence before writing, so this only fails on inconsistent state.
    pub fn attach(&mut self, id: i64, key: &[u8]) -> Result<()> {
        let lease = self.leases.get_mut(&id).ok_or(Error::LeaseNotFound)?;
        lease.keys.insert(key.to_vec());
        self.key_lease.insert(key.to_vec(), id);
        Ok(())
    }

    /// Detaches `key` from whatever lease holds it (no-op when none).
    pub fn detach(&mut self, key: &[u8]) {
        if let Some(id) = self.key_lease.remove(key) {
            if let Some(lease) = self.leases.get_mut(&id) {
                lease.keys.remove(key);
            }
        }
    }

    /// Number of live leases.
    pub fn len(&self) -> usize {
        self.leases.len()
    }

    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{MemoryBackend, WriteBatch};

    #[test]
    fn empty_table_knows_no_lease() {
        let l = Lessor::load(&MemoryBackend::new()).unwrap();
        assert!(l.lookup(5).is_none());
        assert_eq!(l.lease_of(b"k"), 0);
        let mut l = l;
        assert_eq!(l.attach(5, b"k"), Err(Error::LeaseNotFound));
        l.detach(b"k");
    }

    #[test]
    fn stored_leases_load_and_attach() {
        let be = MemoryBackend::new();
        let rec = LeaseRecord {
            id: 7,
            ttl: 10,
            remaining_ttl: 0,
        };
        let mut b = WriteBatch::new();
        b.put(
            Bucket::Lease,
            lease_key(7),
            prost::Message::encode_to_vec(&rec),
        );
        be.write(b).unwrap();
        let mut l = Lessor::load(&be).unwrap();
        assert_eq!(l.lookup(7).map(|l| l.ttl), Some(10));
        l.attach(7, b"a").unwrap();
        assert_eq!(l.lease_of(b"a"), 7);
        l.detach(b"a");
        assert_eq!(l.lease_of(b"a"), 0);
        assert!(l.lookup(7).unwrap().keys.is_empty());
    }

    #[test]
    fn garbage_in_lease_bucket_is_corrupt() {
        let be = MemoryBackend::new();
        let mut b = WriteBatch::new();
        b.put(Bucket::Lease, lease_key(1), vec![0xff, 0xff, 0xff]);
        be.write(b).unwrap();
        assert!(matches!(Lessor::load(&be), Err(Error::Corrupt(_))));
    }
}
