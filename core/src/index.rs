//! The in-memory key index: for every key, its generations of revisions (etcd's
//! `keyIndex` / `treeIndex`).
//!
//! Owns the answer to "which revision of key K is visible at revision R" and "which
//! revisions does a compaction keep". It holds no values: values live in the Key bucket,
//! addressed by revision. It is rebuilt from the Key bucket on open, so it must never hold
//! anything that cannot be derived from stored data. Invariant violations that etcd
//! answers with a panic are returned as `Error::Corrupt` here.
//!
//! A key's history is a list of generations. A generation starts with the put that
//! creates the key and ends with the tombstone that deletes it; the last generation is the
//! open one (empty when the key is currently deleted). Example, for
//! put(1) put(2) del(3) put(4) del(5): `{1,2,3t} {4,5t} {}`.

use std::collections::{BTreeMap, HashSet};
use std::ops::Bound;

use crate::error::{Error, Result};
use crate::revision::Revision;

/// One life of a key, from creation to tombstone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Generation {
    /// Number of puts in this generation, including ones compacted away (the version of
    /// the latest put).
    pub ver: i64,
    /// Main revision that created this generation (the key's create_revision).
    pub created: i64,
    /// Revisions of this generation, ascending; the last one of a closed generation is
    /// its tombstone.
    pub revs: Vec<Revision>,
}

impl Generation {
    fn is_empty(&self) -> bool {
        self.revs.is_empty()
    }

    /// Position of the newest revision for which `stop` returns true, walking from the
    /// newest down (etcd's `walk` with the predicate inverted).
    fn newest_where(&self, stop: impl Fn(Revision) -> bool) -> Option<usize> {
        self.revs.iter().rposition(|r| stop(*r))
    }
}

/// What `get` found for a key at a revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    /// The revision holding the visible value.
    pub modified: Revision,
    /// Main revision of the key's creation.
    pub created: i64,
    pub version: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyIndex {
    /// The last revision that touched the key (put or tombstone).
    pub modified: Revision,
    pub generations: Vec<Generation>,
}

impl KeyIndex {
    fn new() -> Self {
        Self {
            modified: Revision::default(),
            generations: Vec::new(),
        }
    }

    /// True when the key has nothing left but an empty open generation.
    pub fn is_empty(&self) -> bool {
        self.generations.len() == 1 && self.generations[0].is_empty()
    }

    fn put(&mut self, rev: Revision) -> Result<()> {
        if rev <= self.modified {
            return Err(Error::Corrupt(format!(
                "put at {rev:?} is not after the key's last modification {:?}",
                self.modified
            )));
        }
        if self.generations.is_empty() {
            self.generations.push(Generation::default());
        }
        let g = self
            .generations
            .last_mut()
            .ok_or_else(|| Error::Corrupt("key index without generations".into()))?;
        if g.revs.is_empty() {
            g.created = rev.main;
        }
        g.revs.push(rev);
        g.ver += 1;
        self.modified = rev;
        Ok(())
    }

    /// Seeds a key from the first stored revision seen while rebuilding (its earlier
    /// history may have been compacted away, so creation and version come from the value).
    fn restore(&mut self, created: i64, modified: Revision, ver: i64) {
        self.modified = modified;
        self.generations.push(Generation {
            ver,
            created,
            revs: vec![modified],
        });
    }

    /// Seeds a key whose first stored revision is a tombstone: the creation was compacted
    /// away, so it is unknown (0), as in etcd.
    fn restore_tombstone(&mut self, rev: Revision) {
        self.restore(0, rev, 1);
        self.generations.push(Generation::default());
    }

    fn tombstone(&mut self, rev: Revision) -> Result<()> {
        match self.generations.last() {
            Some(g) if !g.is_empty() => {}
            _ => return Err(Error::Corrupt("tombstone of a key that is not live".into())),
        }
        self.put(rev)?;
        self.generations.push(Generation::default());
        Ok(())
    }

    /// The generation visible at `rev`, if the key was live then (etcd's `findGeneration`).
    fn find_generation(&self, rev: i64) -> Option<&Generation> {
        let last = self.generations.len().checked_sub(1)?;
        for (i, g) in self.generations.iter().enumerate().rev() {
            let (Some(first), Some(tomb)) = (g.revs.first(), g.revs.last()) else {
                continue;
            };
            // A closed generation whose tombstone is at or before `rev`: the key was
            // deleted at `rev` (a later generation would have been found first).
            if i != last && tomb.main <= rev {
                return None;
            }
            if first.main <= rev {
                return Some(g);
            }
        }
        None
    }

    /// The revision visible at `at_rev`, with creation and version (etcd's `get`).
    pub fn get(&self, at_rev: i64) -> Option<Found> {
        let g = self.find_generation(at_rev)?;
        let n = g.newest_where(|r| r.main <= at_rev)?;
        Some(Found {
            modified: g.revs[n],
            created: g.created,
            version: g.ver - (g.revs.len() - n - 1) as i64,
        })
    }

    /// Finds the generation and position a compaction at `at_rev` starts from, adding the
    /// revision it keeps to `available` (etcd's `doCompact`).
    fn do_compact(&self, at_rev: i64, available: &mut HashSet<Revision>) -> (usize, Option<usize>) {
        let mut gen_idx = 0;
        // Skip whole generations that were deleted before `at_rev`: nothing of them is
        // visible at or after it.
        while gen_idx + 1 < self.generations.len() {
            let next_starts_by_at_rev = self.generations[gen_idx + 1]
                .revs
                .first()
                .is_some_and(|r| r.main <= at_rev);
            match self.generations[gen_idx].revs.last() {
                Some(tomb) if tomb.main > at_rev => break,
                // Deviation from etcd, which stops here whenever the tombstone is at
                // `at_rev`: if the key was re-created in that same revision (a txn with a
                // from-key delete and a put of the same key, which etcd's duplicate check
                // lets through), etcd keeps the tombstone and physically deletes the live
                // re-created value. We move on to the generation holding it instead.
                Some(tomb) if tomb.main == at_rev && !next_starts_by_at_rev => break,
                _ => gen_idx += 1,
            }
        }
        let g = &self.generations[gen_idx];
        let pos = g.newest_where(|r| r.main <= at_rev);
        if let Some(p) = pos {
            available.insert(g.revs[p]);
        }
        (gen_idx, pos)
    }

    /// Drops the revisions a compaction at `at_rev` supersedes (etcd's `compact`). A
    /// tombstone exactly at `at_rev` is kept, as etcd >= 3.5.16 does; the next compaction
    /// above it removes it.
    fn compact(&mut self, at_rev: i64, available: &mut HashSet<Revision>) {
        if self.generations.is_empty() {
            return;
        }
        let (gen_idx, pos) = self.do_compact(at_rev, available);
        if let Some(p) = pos {
            self.generations[gen_idx].revs.drain(..p);
        }
        self.generations.drain(..gen_idx);
    }

    /// Adds the revision a compaction at `at_rev` would keep for this key, except a
    /// tombstone (etcd's `keep`, used by HashKV so hashes do not depend on whether a
    /// tombstone at the compaction revision was physically kept).
    fn keep(&self, at_rev: i64, available: &mut HashSet<Revision>) {
        if self.generations.is_empty() || self.is_empty() {
            return;
        }
        let (gen_idx, pos) = self.do_compact(at_rev, available);
        let g = &self.generations[gen_idx];
        if let Some(p) = pos {
            if p + 1 == g.revs.len() && gen_idx + 1 != self.generations.len() {
                available.remove(&g.revs[p]);
            }
        }
    }
}

/// The tail of a key's index before a change, enough to undo that change: changes only
/// ever append (a revision, and for a tombstone a new generation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    modified: Revision,
    generations: usize,
    /// (ver, created, number of revisions) of the last generation.
    last: Option<(i64, i64, usize)>,
}

fn mark_of(ki: &KeyIndex) -> Mark {
    Mark {
        modified: ki.modified,
        generations: ki.generations.len(),
        last: ki
            .generations
            .last()
            .map(|g| (g.ver, g.created, g.revs.len())),
    }
}

/// Every key's index, ordered by key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TreeIndex {
    tree: BTreeMap<Vec<u8>, KeyIndex>,
}

/// The end of a key range: `None` is the single key, `Some(empty)` every key from the
/// start on, otherwise `[key, end)`.
pub type RangeEnd<'a> = Option<&'a [u8]>;

impl TreeIndex {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.tree.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }

    /// A key's whole index.
    pub fn key_index(&self, key: &[u8]) -> Option<&KeyIndex> {
        self.tree.get(key)
    }

    /// Records a key's index tail before a change (`None`: the key is not indexed).
    pub fn mark(&self, key: &[u8]) -> Option<Mark> {
        self.tree.get(key).map(mark_of)
    }

    /// Restores a key's index to a `mark` taken before later changes. Marks must be
    /// rolled back newest first.
    pub fn rollback(&mut self, key: &[u8], mark: Option<Mark>) {
        let Some(mark) = mark else {
            self.tree.remove(key);
            return;
        };
        if let Some(ki) = self.tree.get_mut(key) {
            ki.modified = mark.modified;
            ki.generations.truncate(mark.generations);
            if let (Some(g), Some((ver, created, n))) = (ki.generations.last_mut(), mark.last) {
                g.ver = ver;
                g.created = created;
                g.revs.truncate(n);
            }
        }
    }

    /// [`Self::put`] in one lookup of the key, returning what a write needs from before
    /// it: the key's mark (for [`Self::rollback`]) and what a read at `read_at` finds.
    /// On an error nothing changed.
    pub fn put_returning(
        &mut self,
        key: &[u8],
        rev: Revision,
        read_at: i64,
    ) -> Result<(Option<Mark>, Option<Found>)> {
        match self.tree.get_mut(key) {
            Some(ki) => {
                let before = (Some(mark_of(ki)), ki.get(read_at));
                ki.put(rev)?;
                Ok(before)
            }
            None => {
                let mut ki = KeyIndex::new();
                ki.put(rev)?;
                self.tree.insert(key.to_vec(), ki);
                Ok((None, None))
            }
        }
    }

    pub fn put(&mut self, key: &[u8], rev: Revision) -> Result<()> {
        match self.tree.get_mut(key) {
            Some(ki) => ki.put(rev),
            None => {
                let mut ki = KeyIndex::new();
                ki.put(rev)?;
                self.tree.insert(key.to_vec(), ki);
                Ok(())
            }
        }
    }

    pub fn tombstone(&mut self, key: &[u8], rev: Revision) -> Result<()> {
        match self.tree.get_mut(key) {
            Some(ki) => ki.tombstone(rev),
            None => Err(Error::Corrupt("tombstone of an unknown key".into())),
        }
    }

    /// Adds one stored revision while rebuilding the index from the Key bucket, in
    /// revision order (etcd's `restoreIntoIndex`).
    pub fn restore(
        &mut self,
        key: &[u8],
        rev: Revision,
        tombstone: bool,
        created: i64,
        version: i64,
    ) -> Result<()> {
        match self.tree.get_mut(key) {
            Some(ki) if tombstone => ki.tombstone(rev),
            Some(ki) => ki.put(rev),
            None => {
                let mut ki = KeyIndex::new();
                if tombstone {
                    ki.restore_tombstone(rev);
                } else {
                    ki.restore(created, rev, version);
                }
                self.tree.insert(key.to_vec(), ki);
                Ok(())
            }
        }
    }

    pub fn get(&self, key: &[u8], at_rev: i64) -> Option<Found> {
        self.tree.get(key).and_then(|ki| ki.get(at_rev))
    }

    /// Visits the keys of a range in key order; the visitor returns false to stop.
    fn visit<'a>(
        &'a self,
        key: &[u8],
        end: RangeEnd<'_>,
        mut f: impl FnMut(&'a [u8], &'a KeyIndex) -> bool,
    ) {
        let Some(end) = end else {
            if let Some((k, ki)) = self.tree.get_key_value(key) {
                f(k, ki);
            }
            return;
        };
        // `range` panics on an inverted range, so bound only the start and stop by hand.
        for (k, ki) in self
            .tree
            .range::<[u8], _>((Bound::Included(key), Bound::Unbounded))
        {
            if !end.is_empty() && k.as_slice() >= end {
                break;
            }
            if !f(k, ki) {
                break;
            }
        }
    }

    /// Revisions visible at `at_rev` in the range, at most `limit` of them (0 = all), and
    /// how many keys matched in total (etcd's `Revisions`).
    pub fn revisions(
        &self,
        key: &[u8],
        end: RangeEnd<'_>,
        at_rev: i64,
        limit: usize,
    ) -> (Vec<Revision>, usize) {
        let mut revs = Vec::new();
        let mut total = 0;
        self.visit(key, end, |_, ki| {
            if let Some(found) = ki.get(at_rev) {
                if limit == 0 || revs.len() < limit {
                    revs.push(found.modified);
                }
                total += 1;
            }
            true
        });
        (revs, total)
    }

    /// Number of keys live at `at_rev` in the range (etcd's `CountRevisions`).
    pub fn count_revisions(&self, key: &[u8], end: RangeEnd<'_>, at_rev: i64) -> usize {
        let mut total = 0;
        self.visit(key, end, |_, ki| {
            if ki.get(at_rev).is_some() {
                total += 1;
            }
            true
        });
        total
    }

    /// Keys live at `at_rev` in the range with their visible revisions (etcd's `Range`).
    pub fn range(&self, key: &[u8], end: RangeEnd<'_>, at_rev: i64) -> Vec<(Vec<u8>, Found)> {
        let mut out = Vec::new();
        self.visit(key, end, |k, ki| {
            if let Some(found) = ki.get(at_rev) {
                out.push((k.to_vec(), found));
            }
            true
        });
        out
    }

    /// Compacts every key at `rev` and returns the revisions to keep; keys left with
    /// nothing are removed (etcd's `Compact`).
    pub fn compact(&mut self, rev: i64) -> HashSet<Revision> {
        let mut available = HashSet::new();
        self.tree.retain(|_, ki| {
            ki.compact(rev, &mut available);
            !ki.is_empty() && !ki.generations.is_empty()
        });
        available
    }

    /// The revisions `compact(rev)` will keep, computed without changing anything, so the
    /// backend deletes can be written before the index is touched.
    pub fn compaction_keep(&self, rev: i64) -> HashSet<Revision> {
        let mut available = HashSet::new();
        for ki in self.tree.values() {
            if !ki.generations.is_empty() {
                ki.do_compact(rev, &mut available);
            }
        }
        available
    }

    /// The revisions a compaction at `rev` would keep for hashing, without changing
    /// anything (etcd's `Keep`).
    pub fn keep(&self, rev: i64) -> HashSet<Revision> {
        let mut available = HashSet::new();
        for ki in self.tree.values() {
            ki.keep(rev, &mut available);
        }
        available
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(main: i64, sub: i64) -> Revision {
        Revision::new(main, sub)
    }

    #[test]
    fn put_returning_is_get_mark_and_put_in_one() {
        let mut t = TreeIndex::new();
        assert_eq!(t.put_returning(b"k", r(2, 0), 2).unwrap(), (None, None));
        let mut reference = t.clone();
        let expected = (reference.mark(b"k"), reference.get(b"k", 3));
        reference.put(b"k", r(3, 0)).unwrap();
        let got = t.put_returning(b"k", r(3, 0), 3).unwrap();
        assert_eq!(got.1.as_ref().map(|f| (f.created, f.version)), Some((2, 1)));
        assert_eq!(got, expected);
        assert_eq!(t, reference);
        // Not after the key's last modification: refused, nothing changed.
        assert!(t.put_returning(b"k", r(3, 0), 3).is_err());
        assert_eq!(t, reference);
        // The mark rolls the put back.
        t.rollback(b"k", got.0);
        let mut once = TreeIndex::new();
        once.put(b"k", r(2, 0)).unwrap();
        assert_eq!(t, once);
    }

    /// put(1) put(2) del(3) put(4) del(5) on one key, the example of etcd's key_index.go.
    fn example() -> TreeIndex {
        let mut t = TreeIndex::new();
        t.put(b"foo", r(1, 0)).unwrap();
        t.put(b"foo", r(2, 0)).unwrap();
        t.tombstone(b"foo", r(3, 0)).unwrap();
        t.put(b"foo", r(4, 0)).unwrap();
        t.tombstone(b"foo", r(5, 0)).unwrap();
        t
    }

    #[test]
    fn get_follows_generations() {
        let t = example();
        assert_eq!(t.get(b"foo", 0), None);
        let f = t.get(b"foo", 1).unwrap();
        assert_eq!((f.modified, f.created, f.version), (r(1, 0), 1, 1));
        let f = t.get(b"foo", 2).unwrap();
        assert_eq!((f.modified, f.created, f.version), (r(2, 0), 1, 2));
        assert_eq!(t.get(b"foo", 3), None);
        let f = t.get(b"foo", 4).unwrap();
        assert_eq!((f.modified, f.created, f.version), (r(4, 0), 4, 1));
        assert_eq!(t.get(b"foo", 5), None);
        assert_eq!(t.get(b"foo", 100), None);
        assert_eq!(t.get(b"bar", 100), None);
    }

    #[test]
    fn compaction_matches_etcd_example() {
        let mut t = example();
        let keep = t.compact(2);
        assert_eq!(keep, HashSet::from([r(2, 0)]));
        let ki = t.key_index(b"foo").unwrap();
        assert_eq!(ki.generations[0].revs, vec![r(2, 0), r(3, 0)]);

        let keep = t.compact(4);
        assert_eq!(keep, HashSet::from([r(4, 0)]));
        assert_eq!(t.key_index(b"foo").unwrap().generations.len(), 2);

        // A tombstone exactly at the compaction revision is kept (etcd >= 3.5.16) ...
        let keep = t.compact(5);
        assert_eq!(keep, HashSet::from([r(5, 0)]));
        assert_eq!(
            t.key_index(b"foo").unwrap().generations[0].revs,
            vec![r(5, 0)]
        );
        // ... but not by `keep`, which HashKV uses.
        assert!(t.keep(5).is_empty());

        // The next compaction removes the key altogether.
        let keep = t.compact(6);
        assert!(keep.is_empty());
        assert!(t.is_empty());
    }

    #[test]
    fn compaction_keep_predicts_compact() {
        for rev in 0..8 {
            let mut t = example();
            t.put(b"bar", r(6, 0)).unwrap();
            let predicted = t.compaction_keep(rev);
            assert_eq!(t.compact(rev), predicted, "rev {rev}");
        }
    }

    #[test]
    fn rollback_restores_marks_newest_first() {
        let mut t = TreeIndex::new();
        t.put(b"k", r(2, 0)).unwrap();
        let before = t.clone();
        let m1 = t.mark(b"k");
        t.tombstone(b"k", r(3, 0)).unwrap();
        let m2 = t.mark(b"k");
        t.put(b"k", r(3, 1)).unwrap();
        let m3 = t.mark(b"new");
        t.put(b"new", r(3, 2)).unwrap();
        t.rollback(b"new", m3);
        t.rollback(b"k", m2);
        t.rollback(b"k", m1);
        assert_eq!(t, before);
    }

    #[test]
    fn tombstone_of_dead_key_is_corrupt() {
        let mut t = example();
        assert!(matches!(
            t.tombstone(b"foo", r(6, 0)),
            Err(Error::Corrupt(_))
        ));
        assert!(matches!(
            t.tombstone(b"nope", r(6, 0)),
            Err(Error::Corrupt(_))
        ));
        assert!(matches!(t.put(b"foo", r(5, 0)), Err(Error::Corrupt(_))));
    }

    #[test]
    fn ranges_and_counts() {
        let mut t = TreeIndex::new();
        t.put(b"a", r(2, 0)).unwrap();
        t.put(b"b", r(3, 0)).unwrap();
        t.put(b"c", r(4, 0)).unwrap();
        t.tombstone(b"b", r(5, 0)).unwrap();
        assert_eq!(
            t.revisions(b"a", Some(b""), 5, 0),
            (vec![r(2, 0), r(4, 0)], 2)
        );
        assert_eq!(t.revisions(b"a", Some(b""), 4, 1), (vec![r(2, 0)], 3));
        assert_eq!(t.revisions(b"b", None, 4, 0), (vec![r(3, 0)], 1));
        assert_eq!(t.count_revisions(b"a", Some(b"c"), 4), 2);
        // An inverted range is empty, not a panic.
        assert_eq!(t.revisions(b"c", Some(b"a"), 5, 0), (vec![], 0));
        assert_eq!(t.range(b"a", Some(b"z"), 5).len(), 2);
    }
}
