//! The apply entry point and the read surface of the state machine.
//!
//! Owns the contract with the log: one entry in, one backend batch out (the entry's
//! changes and its index together), a response and the watch events back. It must never
//! let a failed request write anything but the applied index, never apply an entry twice,
//! and never depend on anything but the entries applied so far.

use metastore_proto::etcdserverpb as pb;
use metastore_proto::metastore::internal_request::Request;
use metastore_proto::metastore::{InternalRequest, LeaseGrant};
use metastore_proto::mvccpb;

use crate::alarm::Alarms;
use crate::backend::{Backend, BatchOp, Bucket, WriteBatch};
use crate::error::{Error, Result};
use crate::kv;
use crate::lease::{lease_key, LeaseChange, LeaseRecord, Lessor};
use crate::mvcc::{self, KvTxn, ReadTxn, Store, WriteTxn};
use crate::revision::Revision;
use crate::validate;

pub mod members;
pub mod snapshot;

/// Meta bucket key of the applied (consistent) index, etcd's name and 8-byte big-endian
/// encoding.
pub const CONSISTENT_INDEX_KEY: &[u8] = b"consistent_index";
/// Meta bucket key etcd keeps the Raft term under; like the applied index it differs
/// between members at the same state, so `hash` ignores it.
pub const TERM_KEY: &[u8] = b"term";

/// Limits the state machine enforces (etcd's server flags that affect apply).
#[derive(Debug, Clone)]
pub struct StateMachineConfig {
    /// etcd's `--max-txn-ops` (128). Enforced by `validate::txn` before proposing, never at
    /// apply: members with different flags must still apply the same log identically.
    pub max_txn_ops: usize,
}

impl Default for StateMachineConfig {
    fn default() -> Self {
        Self { max_txn_ops: 128 }
    }
}

/// The response of one applied entry, by request kind.
#[derive(Debug, Clone, PartialEq)]
pub enum ApplyResponse {
    Put(pb::PutResponse),
    DeleteRange(pb::DeleteRangeResponse),
    Txn(pb::TxnResponse),
    Compaction(pb::CompactionResponse),
    Range(pb::RangeResponse),
    /// A membership change: the members after it.
    Members(Vec<pb::Member>),
    LeaseGrant(pb::LeaseGrantResponse),
    LeaseRevoke(pb::LeaseRevokeResponse),
    LeaseCheckpoint(pb::LeaseCheckpointResponse),
    Alarm(pb::AlarmResponse),
}

/// What applying one log entry produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    /// The log index that was applied.
    pub index: u64,
    /// The response to the proposer, or the etcd error it must see.
    pub result: Result<ApplyResponse>,
    /// Watch events this entry produced, in revision order (all share one main revision).
    pub events: Vec<mvccpb::Event>,
    /// What this entry did to the lease table (grants, revokes, checkpoints), for the
    /// leader's expiry timers; empty for most entries.
    pub lease_changes: Vec<LeaseChange>,
}

impl Applied {
    fn new(index: u64, result: Result<ApplyResponse>) -> Self {
        Self {
            index,
            result,
            events: Vec::new(),
            lease_changes: Vec::new(),
        }
    }
}

/// Result of `hash_kv`, etcd's HashKV.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashKv {
    pub hash: u32,
    /// The compacted revision the hash was computed against: -1 before any compaction,
    /// as etcd reports it.
    pub compact_revision: i64,
    pub hash_revision: i64,
}

pub struct StateMachine {
    backend: Box<dyn Backend>,
    config: StateMachineConfig,
    store: Store,
    alarms: Alarms,
    applied_index: u64,
    event_prev_kv: bool,
}

impl StateMachine {
    /// Opens the state machine over `backend`, rebuilding in-memory indexes from what is
    /// stored (an empty backend gives revision 1, applied index 0).
    pub fn open(backend: Box<dyn Backend>, config: StateMachineConfig) -> Result<Self> {
        let applied_index = match backend.get(Bucket::Meta, CONSISTENT_INDEX_KEY)? {
            None => 0,
            Some(v) => {
                let bytes: [u8; 8] = v
                    .as_slice()
                    .try_into()
                    .map_err(|_| Error::Corrupt(format!("applied index of {} bytes", v.len())))?;
                u64::from_be_bytes(bytes)
            }
        };
        let store = Store::open(&*backend)?;
        let alarms = Alarms::open(&*backend)?;
        Ok(Self {
            backend,
            config,
            store,
            alarms,
            applied_index,
            event_prev_kv: true,
        })
    }
    /// The engine underneath (the runtime's log shares it).
    pub fn backend(&self) -> &dyn Backend {
        &*self.backend
    }
    pub fn config(&self) -> &StateMachineConfig {
        &self.config
    }
    /// Index of the last applied log entry (persisted with the data it describes).
    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }
    /// Current revision (1 on an empty store).
    pub fn current_revision(&self) -> i64 {
        self.store.current_rev
    }
    /// Revision of the last compaction (0 if none).
    pub fn compacted_revision(&self) -> i64 {
        self.store.compact_rev.max(0)
    }
    /// The lease table (leases, granted and checkpointed TTLs, attached keys).
    pub fn lessor(&self) -> &Lessor {
        &self.store.lessor
    }

    /// Revision of the last compaction as etcd's store keeps it: -1 before the first
    /// one (what a watch canceled for compaction reports as `compact_revision`).
    pub fn store_compact_revision(&self) -> i64 {
        self.store.compact_rev
    }

    /// The active alarms (etcd's `AlarmStore.Get(NONE)`), in (type, member) order.
    pub fn alarms(&self) -> Vec<pb::AlarmMember> {
        self.alarms.get(pb::AlarmType::None as i32)
    }
    /// The lease a key is attached to (0 = none).
    pub fn lease_of(&self, key: &[u8]) -> i64 {
        self.store.lessor.lease_of(key)
    }

    /// Applies one log entry. Entries must come in increasing index order (gaps are
    /// allowed: the log may hold entries that are not requests); entries at or below the
    /// applied index are ignored and answered with `Error::AlreadyApplied`, so replay
    /// after a restart is idempotent.
    pub fn apply(&mut self, index: u64, request: &InternalRequest) -> Applied {
        if index <= self.applied_index {
            return Applied::new(
                index,
                Err(Error::AlreadyApplied {
                    index,
                    applied: self.applied_index,
                }),
            );
        }
        let Some(req) = &request.request else {
            return self.finish_without_changes(
                index,
                Err(Error::MalformedRequest("no request set".into())),
            );
        };
        // An active alarm refuses some requests whole (etcd's capped and corrupt appliers).
        if let Some(e) = self.alarms.refusal(req) {
            return self.finish_without_changes(index, Err(e));
        }
        // Requests are validated before they are proposed; validating again here keeps a
        // malformed entry (old proposer, corrupted log) from reaching the key space. The
        // op-count limit is left out on purpose: it is a per-member flag.
        match req {
            Request::Put(p) => match validate::put(p) {
                Ok(()) => self.apply_write(index, |w| kv::put(w, p, true).map(ApplyResponse::Put)),
                Err(e) => self.finish_without_changes(index, Err(e)),
            },
            Request::DeleteRange(d) => match validate::delete_range(d) {
                Ok(()) => self.apply_write(index, |w| {
                    kv::delete_range(w, d).map(ApplyResponse::DeleteRange)
                }),
                Err(e) => self.finish_without_changes(index, Err(e)),
            },
            Request::Txn(t) => match validate::txn(t, usize::MAX) {
                Ok(()) if validate::is_txn_read_only(t) => {
                    let result = self.read_txn(t).map(ApplyResponse::Txn);
                    self.finish_without_changes(index, result)
                }
                Ok(()) => self.apply_write(index, |w| kv::txn(w, t, true).map(ApplyResponse::Txn)),
                Err(e) => self.finish_without_changes(index, Err(e)),
            },
            Request::Range(r) => {
                let result = self.range(r).map(ApplyResponse::Range);
                self.finish_without_changes(index, result)
            }
            Request::Compaction(c) => self.apply_compaction(index, c),
            Request::LeaseGrant(g) => self.apply_lease_grant(index, g),
            Request::LeaseRevoke(r) => self.apply_lease_revoke(index, r.id),
            Request::LeaseCheckpoint(c) => self.apply_lease_checkpoint(index, c),
            Request::Alarm(a) => self.apply_alarm(index, a),
            Request::AuthEnable(_) => self.unimplemented(index, "auth enable"),
            Request::AuthDisable(_) => self.unimplemented(index, "auth disable"),
            Request::AuthUserAdd(_) => self.unimplemented(index, "auth user add"),
            Request::AuthUserDelete(_) => self.unimplemented(index, "auth user delete"),
            Request::AuthUserChangePassword(_) => {
                self.unimplemented(index, "auth user change password")
            }
            Request::AuthUserGrantRole(_) => self.unimplemented(index, "auth user grant role"),
            Request::AuthUserRevokeRole(_) => self.unimplemented(index, "auth user revoke role"),
            Request::AuthRoleAdd(_) => self.unimplemented(index, "auth role add"),
            Request::AuthRoleDelete(_) => self.unimplemented(index, "auth role delete"),
            Request::AuthRoleGrantPermission(_) => {
                self.unimplemented(index, "auth role grant permission")
            }
            Request::AuthRoleRevokePermission(_) => {
                self.unimplemented(index, "auth role revoke permission")
            }
            Request::MemberAttributes(m) => self.apply_member_attributes(index, m),
            Request::MemberUpdate(m) => self.apply_member_update(index, m),
        }
    }

    fn unimplemented(&mut self, index: u64, what: &'static str) -> Applied {
        self.finish_without_changes(index, Err(Error::Unimplemented(what)))
    }

    fn index_op(index: u64) -> BatchOp {
        BatchOp::Put {
            bucket: Bucket::Meta,
            key: CONSISTENT_INDEX_KEY.to_vec(),
            value: index.to_be_bytes().to_vec(),
        }
    }

    /// Records an entry that changes nothing in the key space: only the applied index is
    /// written.
    fn finish_without_changes(&mut self, index: u64, result: Result<ApplyResponse>) -> Applied {
        let batch = WriteBatch {
            ops: vec![Self::index_op(index)],
            ..Default::default()
        };
        match self.backend.write(batch) {
            Ok(()) => {
                self.applied_index = index;
                Applied::new(index, result)
            }
            Err(e) => Applied::new(index, Err(e.into())),
        }
    }

    /// Whether the events of the writes applied from now on carry `prev_kv` (true
    /// unless told otherwise): the runtime turns it off while no watcher of the member
    /// wants `prev_kv`, which saves reading the value every put overwrites. Events are
    /// member-local, so members may differ here and still apply identically.
    pub fn set_event_prev_kv(&mut self, on: bool) {
        self.event_prev_kv = on;
    }

    /// Runs `f` in a write transaction; its changes and the applied index go to the
    /// backend in one batch, or, if `f` fails, only the applied index does.
    fn apply_write(
        &mut self,
        index: u64,
        f: impl FnOnce(&mut WriteTxn<'_>) -> Result<ApplyResponse>,
    ) -> Applied {
        let prev_kv = self.event_prev_kv;
        let mut w = WriteTxn::begin(&mut self.store, &*self.backend).event_prev_kv(prev_kv);
        match f(&mut w) {
            Ok(resp) => match w.commit(vec![Self::index_op(index)]) {
                Ok(committed) => {
                    self.applied_index = index;
                    Applied {
                        events: committed.events,
                        ..Applied::new(index, Ok(resp))
                    }
                }
                Err(e) => Applied::new(index, Err(e)),
            },
            Err(e) => {
                w.abort();
                self.finish_without_changes(index, Err(e))
            }
        }
    }

    /// etcd's Alarm: the alarm set changes in the entry's batch, in memory once written.
    fn apply_alarm(&mut self, index: u64, r: &pb::AlarmRequest) -> Applied {
        let mut batch = WriteBatch::new();
        let (resp, change) = match self.alarms.apply(r, &mut batch) {
            Ok(done) => done,
            Err(e) => return self.finish_without_changes(index, Err(e)),
        };
        batch.ops.push(Self::index_op(index));
        if let Err(e) = self.backend.write(batch) {
            return Applied {
                index,
                result: Err(e.into()),
                events: Vec::new(),
                lease_changes: Vec::new(),
            };
        }
        if let Some(change) = change {
            self.alarms.commit(change);
        }
        self.applied_index = index;
        Applied {
            index,
            result: Ok(ApplyResponse::Alarm(resp)),
            events: Vec::new(),
            lease_changes: Vec::new(),
        }
    }

    /// etcd's Compact, done at once: the compacted revision and the physical removal of
    /// superseded revisions are written in the entry's batch (so `physical` is always
    /// honoured).
    fn apply_compaction(&mut self, index: u64, c: &pb::CompactionRequest) -> Applied {
        let rev = c.revision;
        if rev <= self.store.compact_rev {
            return self.finish_without_changes(index, Err(Error::Compacted));
        }
        if rev > self.store.current_rev {
            return self.finish_without_changes(index, Err(Error::FutureRevision));
        }
        let keep = self.store.index.compaction_keep(rev);
        let deletes = match mvcc::compaction_deletes(&*self.backend, rev, &keep) {
            Ok(d) => d,
            Err(e) => return Applied::new(index, Err(e)),
        };
        let rev_bytes = Revision::new(rev, 0).to_bytes(false);
        let mut batch = WriteBatch::new();
        batch.put(Bucket::Meta, mvcc::SCHEDULED_COMPACT_KEY, rev_bytes.clone());
        for key in deletes {
            batch.delete(Bucket::Key, key);
        }
        batch.put(Bucket::Meta, mvcc::FINISHED_COMPACT_KEY, rev_bytes);
        batch.ops.push(Self::index_op(index));
        if let Err(e) = self.backend.write(batch) {
            return Applied::new(index, Err(e.into()));
        }
        self.store.index.compact(rev);
        self.store.compact_rev = rev;
        self.applied_index = index;
        Applied::new(
            index,
            Ok(ApplyResponse::Compaction(pb::CompactionResponse {
                header: Some(pb::ResponseHeader {
                    revision: self.store.current_rev,
                    ..Default::default()
                }),
            })),
        )
    }

    fn header(&self) -> Option<pb::ResponseHeader> {
        Some(pb::ResponseHeader {
            revision: self.store.current_rev,
            ..Default::default()
        })
    }

    /// etcd's `LeaseGrant` apply with the ID and (already raised) TTL the proposer chose:
    /// the lease record and the applied index in one batch; the revision does not move.
    fn apply_lease_grant(&mut self, index: u64, g: &LeaseGrant) -> Applied {
        if let Err(e) = self.store.lessor.check_grant(g.id, g.ttl) {
            return self.finish_without_changes(index, Err(e));
        }
        if g.ttl <= 0 {
            // The proposer raises every TTL to the member's minimum before proposing.
            return self.finish_without_changes(
                index,
                Err(Error::MalformedRequest(format!(
                    "lease grant with TTL {} (the proposer raises TTLs to the minimum)",
                    g.ttl
                ))),
            );
        }
        let record = LeaseRecord {
            id: g.id,
            ttl: g.ttl,
            remaining_ttl: 0,
        };
        let mut batch = WriteBatch::new();
        batch.put(
            Bucket::Lease,
            lease_key(g.id),
            prost::Message::encode_to_vec(&record),
        );
        batch.ops.push(Self::index_op(index));
        if let Err(e) = self.backend.write(batch) {
            return Applied::new(index, Err(e.into()));
        }
        self.store.lessor.insert(g.id, g.ttl);
        self.applied_index = index;
        Applied {
            lease_changes: vec![LeaseChange::Granted {
                id: g.id,
                ttl: g.ttl,
            }],
            ..Applied::new(
                index,
                Ok(ApplyResponse::LeaseGrant(pb::LeaseGrantResponse {
                    header: self.header(),
                    id: g.id,
                    ttl: g.ttl,
                    error: String::new(),
                })),
            )
        }
    }

    /// etcd's `Revoke`: every attached key is deleted in one write transaction (one
    /// revision, in key order, as etcd sorts them), and the lease record goes in the same
    /// batch. A lease with no keys changes no revision.
    fn apply_lease_revoke(&mut self, index: u64, id: i64) -> Applied {
        let keys: Vec<Vec<u8>> = match self.store.lessor.lookup(id) {
            Some(lease) => lease.keys.iter().cloned().collect(),
            None => return self.finish_without_changes(index, Err(Error::LeaseNotFound)),
        };
        let prev_kv = self.event_prev_kv;
        let mut w = WriteTxn::begin(&mut self.store, &*self.backend).event_prev_kv(prev_kv);
        for key in &keys {
            if let Err(e) = w.delete_range(key, None) {
                w.abort();
                return self.finish_without_changes(index, Err(e));
            }
        }
        let extra = vec![
            BatchOp::Delete {
                bucket: Bucket::Lease,
                key: lease_key(id).to_vec(),
            },
            Self::index_op(index),
        ];
        match w.commit(extra) {
            Ok(committed) => {
                self.store.lessor.remove(id);
                self.applied_index = index;
                Applied {
                    events: committed.events,
                    lease_changes: vec![LeaseChange::Revoked { id }],
                    ..Applied::new(
                        index,
                        Ok(ApplyResponse::LeaseRevoke(pb::LeaseRevokeResponse {
                            header: self.header(),
                        })),
                    )
                }
            }
            Err(e) => Applied::new(index, Err(e)),
        }
    }

    /// etcd's `Checkpoint`: stores each existing lease's remaining TTL (unknown IDs are
    /// skipped, as etcd skips them); the expiry itself stays the leader's business.
    fn apply_lease_checkpoint(&mut self, index: u64, c: &pb::LeaseCheckpointRequest) -> Applied {
        let mut batch = WriteBatch::new();
        let mut changes = Vec::new();
        for cp in &c.checkpoints {
            if let Some(lease) = self.store.lessor.lookup(cp.id) {
                let mut record = LeaseRecord::of(lease);
                record.remaining_ttl = cp.remaining_ttl;
                batch.put(
                    Bucket::Lease,
                    lease_key(cp.id),
                    prost::Message::encode_to_vec(&record),
                );
                changes.push(LeaseChange::Checkpointed {
                    id: cp.id,
                    remaining_ttl: cp.remaining_ttl,
                });
            }
        }
        batch.ops.push(Self::index_op(index));
        if let Err(e) = self.backend.write(batch) {
            return Applied::new(index, Err(e.into()));
        }
        for change in &changes {
            if let LeaseChange::Checkpointed { id, remaining_ttl } = *change {
                self.store.lessor.set_remaining_ttl(id, remaining_ttl);
            }
        }
        self.applied_index = index;
        Applied {
            lease_changes: changes,
            ..Applied::new(
                index,
                Ok(ApplyResponse::LeaseCheckpoint(
                    pb::LeaseCheckpointResponse {
                        header: self.header(),
                    },
                )),
            )
        }
    }

    /// A read of the key space at the request's revision (serializable semantics; the
    /// runtime decides linearizability by when it calls this).
    pub fn range(&self, request: &pb::RangeRequest) -> Result<pb::RangeResponse> {
        validate::range(request)?;
        let view = ReadTxn::new(&self.store, &*self.backend);
        kv::range(&view, request)
    }
    /// A transaction whose every operation is a Range (`validate::is_txn_read_only`; a
    /// nested transaction makes it a write, as in etcd): served from the local state
    /// without a log entry and without bumping the revision. Others are refused with
    /// `MalformedRequest`.
    pub fn read_txn(&self, request: &pb::TxnRequest) -> Result<pb::TxnResponse> {
        if !validate::is_txn_read_only(request) {
            return Err(Error::MalformedRequest(
                "read_txn given a transaction that writes".into(),
            ));
        }
        let mut view = ReadTxn::new(&self.store, &*self.backend);
        kv::txn(&mut view, request, false)
    }
    /// The watch events of revisions `from_rev..` on keys in `[key, end)` from the
    /// stored history, in bounded chunks (see [`mvcc::history`]). `end`: `None` for one
    /// key, empty for every key from `key`.
    pub fn history(
        &self,
        key: &[u8],
        end: Option<&[u8]>,
        from_rev: i64,
        prev_kv: bool,
        limits: mvcc::HistoryLimits,
    ) -> Result<mvcc::HistoryChunk> {
        mvcc::history(
            &self.store,
            &*self.backend,
            key,
            end,
            from_rev,
            prev_kv,
            limits,
        )
    }
    /// etcd's HashKV at `revision` (0 = current).
    pub fn hash_kv(&self, revision: i64) -> Result<HashKv> {
        let compact_rev = self.store.compact_rev;
        let current = self.store.current_rev;
        if revision > 0 && revision < compact_rev {
            return Err(Error::Compacted);
        }
        if revision > 0 && revision > current {
            return Err(Error::FutureRevision);
        }
        let rev = if revision == 0 { current } else { revision };
        let keep = self.store.index.keep(rev);
        let hash = mvcc::hash_by_rev(&*self.backend, compact_rev, rev, &keep)?;
        Ok(HashKv {
            hash,
            compact_revision: compact_rev,
            hash_revision: rev,
        })
    }
    /// etcd's Hash: a CRC-32C over every bucket of the backend — its name, then each key
    /// and value — in bucket-name order. Left out, as etcd leaves them out: the applied
    /// index and term (they differ between members in the same state) and the log
    /// (each member's own).
    pub fn hash(&self) -> Result<u32> {
        let mut buckets: Vec<Bucket> = Bucket::ALL
            .into_iter()
            .filter(|b| *b != Bucket::Log)
            .collect();
        buckets.sort_by_key(|b| b.name());
        let mut crc = 0u32;
        for bucket in buckets {
            crc = crc32c::crc32c_append(crc, bucket.name().as_bytes());
            self.backend.scan(bucket, b"", None, &mut |k, v| {
                if bucket == Bucket::Meta && (k == CONSISTENT_INDEX_KEY || k == TERM_KEY) {
                    return true;
                }
                crc = crc32c::crc32c_append(crc, k);
                crc = crc32c::crc32c_append(crc, v);
                true
            })?;
        }
        Ok(crc)
    }
}
