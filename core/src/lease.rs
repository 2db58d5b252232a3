//! The lease table: which leases exist and which keys are attached to each (etcd's
//! `lessor`, minus everything about time).
//!
//! Owns lease existence, granted TTLs, the last checkpointed remaining TTL, and key
//! attachment as the key space sees them: a Put naming a lease that is not here fails with
//! `LeaseNotFound`, and a key written with a lease is attached to it so that revoking the
//! lease deletes it. Leases are persisted in the Lease bucket as etcd does (8-byte
//! big-endian ID -> `leasepb.Lease`), in the same batch as the entry that changed them;
//! attachments are not persisted but rebuilt from the keys' `lease` field on open, as etcd
//! rebuilds them. The Lease bucket is part of the engine, so whatever carries the engine's
//! buckets (a snapshot) carries the lease table.
//!
//! It must never read a clock, decide expiry or choose IDs: the ID of a grant is chosen by
//! the proposer, the minimum TTL is raised by the proposer (it is a per-member flag), and
//! expiry is decided by the leader in `runtime` and arrives as a replicated revoke. What
//! changed is reported as [`LeaseChange`]s so the leader's timers can follow the table.

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

impl LeaseRecord {
    pub fn of(lease: &Lease) -> Self {
        Self {
            id: lease.id,
            ttl: lease.ttl,
            remaining_ttl: lease.remaining_ttl,
        }
    }
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

/// etcd's `MaxLeaseTTL`: the largest TTL a grant may ask for, in seconds.
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;

/// What one applied entry did to the lease table, in apply order: what the leader's
/// expiry timers in `runtime` follow (they never scan the table while leading).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseChange {
    Granted {
        id: i64,
        ttl: i64,
    },
    Revoked {
        id: i64,
    },
    /// A checkpoint stored this remaining TTL (0 clears it).
    Checkpointed {
        id: i64,
        remaining_ttl: i64,
    },
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

    /// etcd's checks of a grant, in etcd's order (`lessor.Grant`): the ID must not be
    /// `NoLease`, the TTL must not exceed [`MAX_LEASE_TTL`], the ID must be free.
    pub fn check_grant(&self, id: i64, ttl: i64) -> Result<()> {
        if id == 0 {
            return Err(Error::LeaseNotFound);
        }
        if ttl > MAX_LEASE_TTL {
            return Err(Error::LeaseTtlTooLarge);
        }
        if self.leases.contains_key(&id) {
            return Err(Error::LeaseExists);
        }
        Ok(())
    }

    /// Adds a granted lease (after `check_grant` passed and its record was written).
    pub fn insert(&mut self, id: i64, ttl: i64) {
        self.leases.insert(
            id,
            Lease {
                id,
                ttl,
                remaining_ttl: 0,
                keys: BTreeSet::new(),
            },
        );
    }

    /// Removes a lease and every attachment to it; returns what it was.
    pub fn remove(&mut self, id: i64) -> Option<Lease> {
        let lease = self.leases.remove(&id)?;
        for key in &lease.keys {
            if self.key_lease.get(key) == Some(&id) {
                self.key_lease.remove(key);
            }
        }
        Some(lease)
    }

    /// Records a checkpointed remaining TTL; false when the lease does not exist.
    pub fn set_remaining_ttl(&mut self, id: i64, remaining_ttl: i64) -> bool {
        match self.leases.get_mut(&id) {
            Some(lease) => {
                lease.remaining_ttl = remaining_ttl;
                true
            }
            None => false,
        }
    }

    /// Every live lease, in ID order.
    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.leases.values()
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
    fn grant_checks_follow_etcd_order() {
        let mut l = Lessor::default();
        assert_eq!(l.check_grant(0, 10), Err(Error::LeaseNotFound));
        assert_eq!(
            l.check_grant(0, MAX_LEASE_TTL + 1),
            Err(Error::LeaseNotFound)
        );
        assert_eq!(
            l.check_grant(1, MAX_LEASE_TTL + 1),
            Err(Error::LeaseTtlTooLarge)
        );
        assert_eq!(l.check_grant(1, MAX_LEASE_TTL), Ok(()));
        l.insert(1, 5);
        assert_eq!(l.check_grant(1, 5), Err(Error::LeaseExists));
        assert_eq!(
            l.check_grant(1, MAX_LEASE_TTL + 1),
            Err(Error::LeaseTtlTooLarge)
        );
        assert_eq!(l.check_grant(-3, 5), Ok(()));
    }

    #[test]
    fn remove_drops_attachments() {
        let mut l = Lessor::default();
        l.insert(1, 5);
        l.insert(2, 5);
        l.attach(1, b"a").unwrap();
        l.attach(2, b"b").unwrap();
        assert!(l.set_remaining_ttl(1, 3));
        assert!(!l.set_remaining_ttl(9, 3));
        let gone = l.remove(1).unwrap();
        assert_eq!(gone.remaining_ttl, 3);
        assert_eq!(gone.keys.len(), 1);
        assert_eq!(l.lease_of(b"a"), 0);
        assert_eq!(l.lease_of(b"b"), 2);
        assert!(l.remove(1).is_none());
        assert_eq!(l.leases().map(|l| l.id).collect::<Vec<_>>(), vec![2]);
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
