//! The member set: who is in the cluster, with which peer and client URLs, as voter or
//! learner, and which IDs were removed (they may never come back).
//!
//! This module owns the member records in the `members` and `members_removed` buckets and
//! etcd's checks of a membership change (`ValidateConfigurationChange`). Records change
//! only by applying log entries (a raft configuration change's `MemberChange`, or a
//! member's published attributes), in the batch that records the entry's index, so every
//! member holds the same set at the same index. It must never decide raft's own
//! configuration: the runtime applies a change to raft only if this module accepted it.

use metastore_proto::etcdserverpb as pb;
use metastore_proto::metastore::member_change::Change;
use metastore_proto::metastore::MemberChange;
use prost::Message;

use super::{Applied, ApplyResponse, StateMachine, CONSISTENT_INDEX_KEY};
use crate::backend::{Bucket, WriteBatch};
use crate::error::{Error, Result};

/// etcd's default `--max-learners`.
pub const MAX_LEARNERS: usize = 1;

fn member_key(id: u64) -> [u8; 8] {
    id.to_be_bytes()
}

impl StateMachine {
    /// Every member, in ID order.
    pub fn members(&self) -> Result<Vec<pb::Member>> {
        let mut members = Vec::new();
        let mut bad = None;
        self.backend.scan(Bucket::Members, b"", None, &mut |_, v| {
            match pb::Member::decode(v) {
                Ok(m) => members.push(m),
                Err(e) => bad = Some(e.to_string()),
            }
            bad.is_none()
        })?;
        match bad {
            Some(e) => Err(Error::Corrupt(format!("member record: {e}"))),
            None => Ok(members),
        }
    }

    pub fn member(&self, id: u64) -> Result<Option<pb::Member>> {
        match self.backend.get(Bucket::Members, &member_key(id))? {
            Some(v) => pb::Member::decode(v.as_slice())
                .map(Some)
                .map_err(|e| Error::Corrupt(format!("member record: {e}"))),
            None => Ok(None),
        }
    }

    pub fn is_removed(&self, id: u64) -> Result<bool> {
        Ok(self
            .backend
            .get(Bucket::MembersRemoved, &member_key(id))?
            .is_some())
    }

    /// Records the initial members of a new cluster as applied at `index` (the index the
    /// raft log starts after). Every initial member computes the same records from the
    /// same `--initial-cluster`. Does nothing if the state machine is past `index`.
    pub fn bootstrap_members(&mut self, index: u64, members: &[pb::Member]) -> Result<()> {
        if self.applied_index >= index {
            return Ok(());
        }
        let mut batch = WriteBatch::new();
        for m in members {
            batch.put(Bucket::Members, member_key(m.id), m.encode_to_vec());
        }
        batch.put(
            Bucket::Meta,
            CONSISTENT_INDEX_KEY,
            index.to_be_bytes().to_vec(),
        );
        batch.sync = true;
        self.backend.write(batch)?;
        self.applied_index = index;
        Ok(())
    }

    /// etcd's `ValidateConfigurationChange`: whether `change` may be applied now.
    pub fn check_member_change(&self, change: &MemberChange) -> Result<()> {
        let members = self.members()?;
        match &change.change {
            Some(Change::Add(new)) => {
                // Peer URLs first: our IDs derive from the peer URLs alone (etcd adds the
                // time), so a reused URL must report the URL, as etcd does.
                let taken = members
                    .iter()
                    .flat_map(|m| &m.peer_ur_ls)
                    .any(|u| new.peer_ur_ls.contains(u));
                if taken {
                    return Err(Error::PeerUrlExists);
                }
                if self.is_removed(new.id)? || members.iter().any(|m| m.id == new.id) {
                    return Err(Error::MemberExists);
                }
                if new.is_learner && members.iter().filter(|m| m.is_learner).count() >= MAX_LEARNERS
                {
                    return Err(Error::TooManyLearners);
                }
            }
            Some(Change::Remove(id)) => {
                if !members.iter().any(|m| m.id == *id) {
                    return Err(Error::MemberNotFound);
                }
            }
            Some(Change::Promote(id)) => match members.iter().find(|m| m.id == *id) {
                None => return Err(Error::MemberNotFound),
                Some(m) if !m.is_learner => return Err(Error::MemberNotLearner),
                Some(_) => {}
            },
            None => return Err(Error::MalformedRequest("empty member change".into())),
        }
        Ok(())
    }

    /// Applies a configuration change's member change at `index`: on success the member
    /// records change with the index; on failure only the index is recorded. Answers the
    /// member list after the change.
    pub fn apply_member_change(&mut self, index: u64, change: &MemberChange) -> Applied {
        if index <= self.applied_index {
            return Applied {
                index,
                result: Err(Error::AlreadyApplied {
                    index,
                    applied: self.applied_index,
                }),
                events: Vec::new(),
                lease_changes: Vec::new(),
            };
        }
        if let Err(e) = self.check_member_change(change) {
            return self.finish_without_changes(index, Err(e));
        }
        let mut batch = WriteBatch::new();
        match &change.change {
            Some(Change::Add(new)) => {
                let record = pb::Member {
                    id: new.id,
                    name: String::new(),
                    peer_ur_ls: new.peer_ur_ls.clone(),
                    client_ur_ls: Vec::new(),
                    is_learner: new.is_learner,
                };
                batch.put(Bucket::Members, member_key(new.id), record.encode_to_vec());
            }
            Some(Change::Remove(id)) => {
                batch.delete(Bucket::Members, member_key(*id));
                batch.put(Bucket::MembersRemoved, member_key(*id), Vec::new());
            }
            Some(Change::Promote(id)) => {
                let mut m = match self.member(*id) {
                    Ok(Some(m)) => m,
                    Ok(None) => {
                        return self.finish_without_changes(index, Err(Error::MemberNotFound))
                    }
                    Err(e) => return self.finish_without_changes(index, Err(e)),
                };
                m.is_learner = false;
                batch.put(Bucket::Members, member_key(*id), m.encode_to_vec());
            }
            None => unreachable!("checked above"),
        }
        self.finish_member_batch(index, batch)
    }

    /// A member's published name and client URLs (etcd's attributes). Unknown members
    /// are ignored, as etcd does for a member removed meanwhile.
    pub(super) fn apply_member_attributes(&mut self, index: u64, attrs: &pb::Member) -> Applied {
        let mut batch = WriteBatch::new();
        match self.member(attrs.id) {
            Ok(Some(mut m)) => {
                m.name = attrs.name.clone();
                m.client_ur_ls = attrs.client_ur_ls.clone();
                batch.put(Bucket::Members, member_key(m.id), m.encode_to_vec());
            }
            Ok(None) => {}
            Err(e) => return self.finish_without_changes(index, Err(e)),
        }
        self.finish_member_batch(index, batch)
    }

    /// etcd's MemberUpdate: new peer URLs for an existing member.
    pub(super) fn apply_member_update(&mut self, index: u64, update: &pb::Member) -> Applied {
        let members = match self.members() {
            Ok(m) => m,
            Err(e) => return self.finish_without_changes(index, Err(e)),
        };
        let Some(mut m) = members.iter().find(|m| m.id == update.id).cloned() else {
            return self.finish_without_changes(index, Err(Error::MemberNotFound));
        };
        let taken = members
            .iter()
            .filter(|o| o.id != update.id)
            .flat_map(|o| &o.peer_ur_ls)
            .any(|u| update.peer_ur_ls.contains(u));
        if taken {
            return self.finish_without_changes(index, Err(Error::PeerUrlExists));
        }
        m.peer_ur_ls = update.peer_ur_ls.clone();
        let mut batch = WriteBatch::new();
        batch.put(Bucket::Members, member_key(m.id), m.encode_to_vec());
        self.finish_member_batch(index, batch)
    }

    fn finish_member_batch(&mut self, index: u64, mut batch: WriteBatch) -> Applied {
        batch.put(
            Bucket::Meta,
            CONSISTENT_INDEX_KEY,
            index.to_be_bytes().to_vec(),
        );
        if let Err(e) = self.backend.write(batch) {
            return Applied {
                index,
                result: Err(e.into()),
                events: Vec::new(),
                lease_changes: Vec::new(),
            };
        }
        self.applied_index = index;
        let result = self.members().map(ApplyResponse::Members);
        Applied {
            index,
            result,
            events: Vec::new(),
            lease_changes: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::backend::MemoryBackend;
    use crate::state::StateMachineConfig;

    fn member(id: u64, url: &str, learner: bool) -> pb::Member {
        pb::Member {
            id,
            name: String::new(),
            peer_ur_ls: vec![url.to_string()],
            client_ur_ls: Vec::new(),
            is_learner: learner,
        }
    }

    fn change(c: Change) -> MemberChange {
        MemberChange { change: Some(c) }
    }

    fn ids(a: &Applied) -> Vec<(u64, bool)> {
        match &a.result {
            Ok(ApplyResponse::Members(m)) => m.iter().map(|m| (m.id, m.is_learner)).collect(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn member_changes_follow_etcds_rules() {
        let be = Arc::new(MemoryBackend::new());
        let mut sm =
            StateMachine::open(Box::new(be.clone()), StateMachineConfig::default()).unwrap();
        sm.bootstrap_members(
            1,
            &[member(1, "http://a", false), member(2, "http://b", false)],
        )
        .unwrap();
        assert_eq!(sm.applied_index(), 1);
        // Bootstrapping again (a restart) changes nothing.
        sm.bootstrap_members(1, &[member(9, "http://z", false)])
            .unwrap();
        assert_eq!(sm.members().unwrap().len(), 2);

        let a = sm.apply_member_change(2, &change(Change::Add(member(3, "http://c", true))));
        assert_eq!(ids(&a), vec![(1, false), (2, false), (3, true)]);
        let a = sm.apply_member_change(3, &change(Change::Add(member(4, "http://d", true))));
        assert_eq!(a.result, Err(Error::TooManyLearners));
        let a = sm.apply_member_change(4, &change(Change::Add(member(4, "http://a", false))));
        assert_eq!(a.result, Err(Error::PeerUrlExists));
        let a = sm.apply_member_change(5, &change(Change::Add(member(2, "http://x", false))));
        assert_eq!(a.result, Err(Error::MemberExists));
        let a = sm.apply_member_change(5, &change(Change::Add(member(2, "http://b", false))));
        assert_eq!(
            a.result,
            Err(Error::AlreadyApplied {
                index: 5,
                applied: 5
            })
        );
        let a = sm.apply_member_change(6, &change(Change::Promote(2)));
        assert_eq!(a.result, Err(Error::MemberNotLearner));
        let a = sm.apply_member_change(7, &change(Change::Promote(3)));
        assert_eq!(ids(&a), vec![(1, false), (2, false), (3, false)]);
        let a = sm.apply_member_change(8, &change(Change::Remove(2)));
        assert_eq!(ids(&a), vec![(1, false), (3, false)]);
        let a = sm.apply_member_change(9, &change(Change::Remove(2)));
        assert_eq!(a.result, Err(Error::MemberNotFound));
        // A removed ID can never come back.
        let a = sm.apply_member_change(10, &change(Change::Add(member(2, "http://b", false))));
        assert_eq!(a.result, Err(Error::MemberExists));
        assert!(sm.is_removed(2).unwrap());
        assert_eq!(sm.applied_index(), 10);

        // Attributes and peer URL updates travel as ordinary entries.
        let attrs = pb::Member {
            id: 3,
            name: "m3".into(),
            client_ur_ls: vec!["http://c:2379".into()],
            ..Default::default()
        };
        sm.apply_member_attributes(11, &attrs).result.unwrap();
        let update = pb::Member {
            id: 3,
            peer_ur_ls: vec!["http://a".into()],
            ..Default::default()
        };
        assert_eq!(
            sm.apply_member_update(12, &update).result,
            Err(Error::PeerUrlExists)
        );
        let update = pb::Member {
            id: 3,
            peer_ur_ls: vec!["http://c2".into()],
            ..Default::default()
        };
        sm.apply_member_update(13, &update).result.unwrap();
        let m3 = sm.member(3).unwrap().unwrap();
        assert_eq!(
            (
                m3.name.as_str(),
                m3.client_ur_ls.clone(),
                m3.peer_ur_ls.clone()
            ),
            (
                "m3",
                vec!["http://c:2379".to_string()],
                vec!["http://c2".to_string()]
            )
        );
        // Replays are refused without effect.
        let a = sm.apply_member_change(5, &change(Change::Remove(1)));
        assert!(matches!(a.result, Err(Error::AlreadyApplied { .. })));
        assert_eq!(sm.members().unwrap().len(), 2);
        // Everything survives a reopen.
        let sm = StateMachine::open(Box::new(be), StateMachineConfig::default()).unwrap();
        assert_eq!(sm.members().unwrap().len(), 2);
        assert_eq!(sm.applied_index(), 13);
    }
}
