//! Revisions and their byte encoding in the Key bucket.
//!
//! Owns the layout of MVCC keys: 8-byte big-endian main revision, `_`, 8-byte big-endian
//! sub revision, and a trailing `t` for tombstones — byte-for-byte etcd's layout, so that
//! `hash_kv` (which hashes these keys) matches etcd's HashKV. It must never accept a
//! malformed key silently: decoding stored bytes returns `Error::Corrupt`.

use crate::error::{Error, Result};

/// Length of an encoded revision without the tombstone mark.
pub const REV_BYTES_LEN: usize = 8 + 1 + 8;
/// Length of an encoded revision with the tombstone mark.
pub const MARKED_REV_BYTES_LEN: usize = REV_BYTES_LEN + 1;
const MARK_TOMBSTONE: u8 = b't';

/// A point in the history: `main` is the write transaction, `sub` the change within it.
/// The derived order (main, then sub) is etcd's `GreaterThan` order, and matches the
/// byte order of the encoding because revisions are never negative in storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Revision {
    pub main: i64,
    pub sub: i64,
}

impl Revision {
    pub const fn new(main: i64, sub: i64) -> Self {
        Self { main, sub }
    }

    /// The Key bucket key of this revision (`tombstone` appends etcd's `t` mark).
    pub fn to_bytes(self, tombstone: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(MARKED_REV_BYTES_LEN);
        out.extend_from_slice(&(self.main as u64).to_be_bytes());
        out.push(b'_');
        out.extend_from_slice(&(self.sub as u64).to_be_bytes());
        if tombstone {
            out.push(MARK_TOMBSTONE);
        }
        out
    }

    /// Decodes a Key bucket key into the revision and whether it marks a tombstone.
    pub fn from_bytes(bytes: &[u8]) -> Result<(Revision, bool)> {
        let tombstone = match bytes.len() {
            REV_BYTES_LEN => false,
            MARKED_REV_BYTES_LEN if bytes[REV_BYTES_LEN] == MARK_TOMBSTONE => true,
            _ => {
                return Err(Error::Corrupt(format!(
                    "malformed revision key of {} bytes",
                    bytes.len()
                )))
            }
        };
        let mut main = [0u8; 8];
        let mut sub = [0u8; 8];
        main.copy_from_slice(&bytes[0..8]);
        sub.copy_from_slice(&bytes[9..17]);
        Ok((
            Revision {
                main: u64::from_be_bytes(main) as i64,
                sub: u64::from_be_bytes(sub) as i64,
            },
            tombstone,
        ))
    }
}

/// Whether a Key bucket key carries the tombstone mark (etcd's `isTombstone`).
pub fn is_tombstone(bytes: &[u8]) -> bool {
    bytes.len() == MARKED_REV_BYTES_LEN && bytes[REV_BYTES_LEN] == MARK_TOMBSTONE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_is_etcds_layout() {
        let b = Revision::new(5, 2).to_bytes(false);
        assert_eq!(b, [0, 0, 0, 0, 0, 0, 0, 5, b'_', 0, 0, 0, 0, 0, 0, 0, 2]);
        let t = Revision::new(5, 2).to_bytes(true);
        assert_eq!(t.len(), 18);
        assert_eq!(t[17], b't');
        assert!(is_tombstone(&t));
        assert!(!is_tombstone(&b));
    }

    #[test]
    fn roundtrip_and_order() {
        for (main, sub) in [(1, 0), (2, 7), (i64::MAX, i64::MAX)] {
            let r = Revision::new(main, sub);
            assert_eq!(
                Revision::from_bytes(&r.to_bytes(false)).unwrap(),
                (r, false)
            );
            assert_eq!(Revision::from_bytes(&r.to_bytes(true)).unwrap(), (r, true));
        }
        let a = Revision::new(3, 9);
        let b = Revision::new(4, 0);
        assert!(a < b);
        assert!(a.to_bytes(false) < b.to_bytes(false));
    }

    #[test]
    fn malformed_keys_are_corrupt() {
        assert!(matches!(
            Revision::from_bytes(b"short"),
            Err(Error::Corrupt(_))
        ));
        let mut bad = Revision::new(1, 0).to_bytes(false);
        bad.push(b'x');
        assert!(matches!(Revision::from_bytes(&bad), Err(Error::Corrupt(_))));
    }
}
