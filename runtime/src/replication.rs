//! The replicated log seam, and its single-member implementation.
//!
//! This module owns the path from "a service has a write" to "the write is durable,
//! applied, and answered": the [`Replicator`] trait the services call, and [`SingleLog`],
//! which appends proposals to `Bucket::Log` with one synced write per group of queued
//! proposals (group commit), applies them to the state machine in log order, and answers
//! each proposer. The Raft issue replaces `SingleLog` with a Raft-driven implementation of
//! the same trait; the services must not notice.
//!
//! It must never answer a proposer before the entry is durable and applied (an
//! acknowledged write survives a crash, and a read started after the acknowledgement sees
//! it), never apply entries out of order or twice (the state machine's applied index is
//! the fence), and never interpret requests itself: what a request does is core's call.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use futures::future::BoxFuture;
use metastore_core::lease::LeaseChange;
use metastore_core::{ApplyResponse, Backend, Bucket, StateMachine, WriteBatch};
use metastore_proto::metastore::{InternalRequest, LogEntry};
use metastore_proto::mvccpb;
use prost::Message;
use tokio::sync::{mpsc, oneshot, watch};

use crate::error::{Error, Result};

/// The state machine, shared between the log (the only writer) and the services
/// (readers).
pub type SharedState = Arc<RwLock<StateMachine>>;

/// Takes the state machine for reading. A poisoned lock means an apply panicked half way:
/// the state may be inconsistent, so nothing is served from it any more.
pub fn read_state(state: &SharedState) -> Result<RwLockReadGuard<'_, StateMachine>> {
    state.read().map_err(|_| Error::Stopped)
}

fn write_state(state: &SharedState) -> Result<RwLockWriteGuard<'_, StateMachine>> {
    state.write().map_err(|_| Error::Stopped)
}

/// Receives the watch events of every applied entry, in log order, while the state
/// machine's write lock is still held. So a watcher that registers under the read lock at
/// revision R gets every event above R from the sink and none at or below it.
///
/// `publish` runs on the apply path: it must not block or wait on anything a service
/// holds, only hand the events on.
pub trait EventSink: Send + Sync + 'static {
    /// The events of one applied entry: one main revision, never empty.
    fn publish(&self, events: Vec<mvccpb::Event>);
    /// What one applied entry did to the lease table (never empty), on the same path
    /// and under the same lock as `publish`: the leader's expiry timers follow grants,
    /// revokes and checkpoints from here, whoever proposed them.
    fn leases_changed(&self, _changes: &[LeaseChange]) {}
}

/// Hands every applied entry's output to several sinks, in order (watch hub, lessor).
pub struct Fanout(pub Vec<Arc<dyn EventSink>>);

impl EventSink for Fanout {
    fn publish(&self, events: Vec<mvccpb::Event>) {
        if let Some((last, rest)) = self.0.split_last() {
            for sink in rest {
                sink.publish(events.clone());
            }
            last.publish(events);
        }
    }
    fn leases_changed(&self, changes: &[LeaseChange]) {
        for sink in &self.0 {
            sink.leases_changed(changes);
        }
    }
}

/// A sink for members that serve no watchers (tests of the log alone).
pub struct NoEvents;

impl EventSink for NoEvents {
    fn publish(&self, _events: Vec<mvccpb::Event>) {}
}

/// What the services need to know about replication for Status and response headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaStatus {
    /// The current leader's member ID (0 when there is none).
    pub leader: u64,
    pub term: u64,
    /// Index of the last durable (committed) entry.
    pub commit_index: u64,
    /// Index of the last entry applied to the state machine.
    pub applied_index: u64,
}

/// The boundary between the services and replication.
pub trait Replicator: Send + Sync + 'static {
    /// Appends `request` to the log and resolves with its apply result once it is
    /// durable and applied. Dropping the future does not withdraw the proposal.
    fn propose(&self, request: InternalRequest) -> BoxFuture<'static, Result<ApplyResponse>>;
    /// Resolves when the local state machine reflects every write acknowledged before
    /// the call, so a linearizable read may be served locally.
    fn read_barrier(&self) -> BoxFuture<'static, Result<()>>;
    fn status(&self) -> ReplicaStatus;
    /// Whether this member leads now: only the leader decides lease expiry and renews
    /// leases. A change of leader shows as a change of `status().term` too.
    fn is_leader(&self) -> bool;
}

/// Key of log entry `index` in `Bucket::Log`: a tag byte and the big-endian index, so
/// entries sort by index and stay apart from the hard state keys.
fn entry_key(index: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = b'e';
    key[1..].copy_from_slice(&index.to_be_bytes());
    key
}
const ENTRY_END: &[u8] = b"f";
const TERM_KEY: &[u8] = b"h/term";

/// The term a freshly bootstrapped single-member etcd reports: it starts at term 1 and
/// wins its first election into term 2. Every restart is another election, as in etcd.
const FIRST_TERM: u64 = 2;

/// At most this many proposals share one durable write; bounds the latency of a group
/// and the time the state machine's write lock is held while applying it.
const MAX_GROUP: usize = 1024;
/// Proposals waiting for the log task; a full queue makes proposers wait (backpressure).
const QUEUE_DEPTH: usize = 8192;

struct Proposal {
    request: InternalRequest,
    reply: oneshot::Sender<Result<ApplyResponse>>,
}

enum Msg {
    Propose(Proposal),
    Close(oneshot::Sender<()>),
}

struct Shared {
    member_id: u64,
    term: AtomicU64,
    commit_index: AtomicU64,
    applied_index: AtomicU64,
    stopped: AtomicBool,
    fatal: watch::Sender<Option<String>>,
}

impl Shared {
    fn fail(&self, why: String) {
        tracing::error!(error = %why, "log stopped after a fatal failure");
        self.stopped.store(true, Ordering::SeqCst);
        self.fatal.send_replace(Some(why));
    }
}

/// The single-member log: durable append, then apply.
pub struct SingleLog {
    tx: mpsc::Sender<Msg>,
    shared: Arc<Shared>,
}

impl SingleLog {
    /// Replays entries the state machine has not applied yet, starts a new term, and
    /// spawns the task that owns the log. Must be called inside a tokio runtime.
    pub fn open(
        state: SharedState,
        engine: Arc<dyn Backend>,
        member_id: u64,
        events: Arc<dyn EventSink>,
    ) -> Result<Self> {
        let (last_index, applied, term) = recover(&state, &*engine)?;
        let (fatal, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            member_id,
            term: AtomicU64::new(term),
            commit_index: AtomicU64::new(last_index),
            applied_index: AtomicU64::new(applied),
            stopped: AtomicBool::new(false),
            fatal,
        });
        let writer = Writer {
            state,
            engine,
            events,
            shared: shared.clone(),
            term,
            last_index,
            untrimmed_from: last_index + 1,
        };
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        tokio::spawn(run(rx, writer));
        Ok(Self { tx, shared })
    }

    /// Stops taking proposals, finishes the ones already queued, and waits for the log
    /// task to exit. Later proposals fail with `Error::Stopped`.
    pub async fn close(&self) {
        let (ack, done) = oneshot::channel();
        if self.tx.send(Msg::Close(ack)).await.is_ok() {
            let _ = done.await;
        }
        self.shared.stopped.store(true, Ordering::SeqCst);
    }

    /// Carries the reason once the log has failed fatally (storage error, apply panic);
    /// the server stops when it does.
    pub fn fatal(&self) -> watch::Receiver<Option<String>> {
        self.shared.fatal.subscribe()
    }
}

impl Replicator for SingleLog {
    fn propose(&self, request: InternalRequest) -> BoxFuture<'static, Result<ApplyResponse>> {
        let tx = self.tx.clone();
        Box::pin(async move {
            let (reply, answer) = oneshot::channel();
            tx.send(Msg::Propose(Proposal { request, reply }))
                .await
                .map_err(|_| Error::Stopped)?;
            // A dropped reply means the log task died with the proposal in hand.
            answer.await.map_err(|_| Error::Stopped)?
        })
    }

    fn read_barrier(&self) -> BoxFuture<'static, Result<()>> {
        // With one member, every acknowledged write was applied before it was
        // acknowledged, so the local state is already linearizable.
        let stopped = self.shared.stopped.load(Ordering::SeqCst);
        Box::pin(async move {
            if stopped {
                Err(Error::Stopped)
            } else {
                Ok(())
            }
        })
    }

    fn is_leader(&self) -> bool {
        // The only member always leads.
        true
    }

    fn status(&self) -> ReplicaStatus {
        ReplicaStatus {
            leader: self.shared.member_id,
            term: self.shared.term.load(Ordering::SeqCst),
            commit_index: self.shared.commit_index.load(Ordering::SeqCst),
            applied_index: self.shared.applied_index.load(Ordering::SeqCst),
        }
    }
}

/// Brings the state machine up to the end of the durable log and starts the next term.
/// Returns (last log index, applied index, term).
fn recover(state: &SharedState, engine: &dyn Backend) -> Result<(u64, u64, u64)> {
    let mut sm = write_state(state)?;
    let applied = sm.applied_index();

    let mut stale = Vec::new();
    engine.scan(
        Bucket::Log,
        &entry_key(0),
        Some(&entry_key(applied + 1)),
        &mut |k, _| {
            stale.push(k.to_vec());
            true
        },
    )?;
    let mut pending = Vec::new();
    let mut decode_error = None;
    engine.scan(
        Bucket::Log,
        &entry_key(applied + 1),
        Some(ENTRY_END),
        &mut |k, v| match LogEntry::decode(v) {
            Ok(entry) if k == entry_key(entry.index) => {
                pending.push(entry);
                true
            }
            Ok(entry) => {
                decode_error = Some(format!(
                    "log entry {} stored under a wrong key",
                    entry.index
                ));
                false
            }
            Err(e) => {
                decode_error = Some(format!("undecodable log entry: {e}"));
                false
            }
        },
    )?;
    if let Some(e) = decode_error {
        return Err(Error::Storage(e));
    }

    let mut last = applied;
    for entry in &pending {
        if entry.index != last + 1 {
            return Err(Error::Storage(format!(
                "log has a gap: entry {} follows {last}",
                entry.index
            )));
        }
        let request = InternalRequest::decode(entry.data.as_slice())
            .map_err(|e| Error::Storage(format!("log entry {}: {e}", entry.index)))?;
        let applied = sm.apply(entry.index, &request);
        if let Err(e) = &applied.result {
            if is_fatal(e) {
                return Err(Error::Storage(format!(
                    "replaying entry {}: {e}",
                    entry.index
                )));
            }
        }
        last = entry.index;
        // Applied now; its apply writes precede the batch below that deletes it.
        stale.push(entry_key(entry.index).to_vec());
    }
    if !pending.is_empty() {
        tracing::info!(from = applied + 1, to = last, "replayed log entries");
    }
    let applied = sm.applied_index();
    drop(sm);

    let term = match engine.get(Bucket::Log, TERM_KEY)? {
        Some(bytes) => {
            let bytes: [u8; 8] = bytes
                .as_slice()
                .try_into()
                .map_err(|_| Error::Storage("malformed stored term".into()))?;
            u64::from_be_bytes(bytes) + 1
        }
        None => FIRST_TERM,
    };
    let mut batch = WriteBatch::new();
    for key in stale {
        batch.delete(Bucket::Log, key);
    }
    batch.put(Bucket::Log, TERM_KEY.to_vec(), term.to_be_bytes().to_vec());
    batch.sync = true;
    engine.write(batch)?;
    Ok((last.max(applied), applied, term))
}

/// An apply error after which the state machine can no longer be trusted.
fn is_fatal(e: &metastore_core::Error) -> bool {
    matches!(
        e,
        metastore_core::Error::Backend(_) | metastore_core::Error::Corrupt(_)
    )
}

/// The log's mutable half, owned by the log task and lent to a blocking thread for each
/// group.
struct Writer {
    state: SharedState,
    engine: Arc<dyn Backend>,
    events: Arc<dyn EventSink>,
    shared: Arc<Shared>,
    term: u64,
    last_index: u64,
    /// First entry that is applied but still stored; the next group's batch deletes it.
    untrimmed_from: u64,
}

impl Writer {
    /// Makes a group durable with one synced write, applies it, and answers the
    /// proposers. Returns false when the log must stop.
    fn commit(&mut self, group: Vec<Proposal>) -> bool {
        let first = self.last_index + 1;
        let mut batch = WriteBatch::new();
        batch.sync = true;
        // Entries applied by earlier groups are no longer needed. Deleting them in this
        // later batch is safe: their apply writes went to the same engine before this
        // batch, and the engine makes writes durable in order.
        for index in self.untrimmed_from..first {
            batch.delete(Bucket::Log, entry_key(index).to_vec());
        }
        for (i, p) in group.iter().enumerate() {
            let index = first + i as u64;
            let entry = LogEntry {
                index,
                term: self.term,
                data: p.request.encode_to_vec(),
            };
            batch.put(
                Bucket::Log,
                entry_key(index).to_vec(),
                entry.encode_to_vec(),
            );
        }
        if let Err(e) = self.engine.write(batch) {
            let why = format!("appending to the log: {e}");
            for p in group {
                let _ = p.reply.send(Err(Error::Storage(why.clone())));
            }
            self.shared.fail(why);
            return false;
        }
        self.untrimmed_from = first;
        self.last_index = first + group.len() as u64 - 1;
        self.shared
            .commit_index
            .store(self.last_index, Ordering::SeqCst);

        let mut answers = Vec::with_capacity(group.len());
        let mut fatal = None;
        match write_state(&self.state) {
            Ok(mut sm) => {
                for (i, p) in group.into_iter().enumerate() {
                    let index = first + i as u64;
                    if fatal.is_some() {
                        answers.push((p.reply, Err(Error::Stopped)));
                        continue;
                    }
                    let mut applied = sm.apply(index, &p.request);
                    if !applied.events.is_empty() {
                        self.events.publish(std::mem::take(&mut applied.events));
                    }
                    if !applied.lease_changes.is_empty() {
                        self.events.leases_changed(&applied.lease_changes);
                    }
                    if let Err(e) = &applied.result {
                        if is_fatal(e) {
                            fatal = Some(format!("applying entry {index}: {e}"));
                        }
                    }
                    answers.push((p.reply, applied.result.map_err(Error::Core)));
                }
                let applied = sm.applied_index();
                self.shared.applied_index.store(applied, Ordering::SeqCst);
            }
            Err(_) => {
                fatal = Some("state machine lock poisoned".into());
                for p in group {
                    answers.push((p.reply, Err(Error::Stopped)));
                }
            }
        }
        for (reply, answer) in answers {
            let _ = reply.send(answer);
        }
        if let Some(why) = fatal {
            self.shared.fail(why);
            return false;
        }
        true
    }
}

/// The log task: takes every queued proposal as one group, commits it off the async
/// threads, and repeats. While one group is being synced the next one queues up, which is
/// what makes concurrent writers share an fsync.
async fn run(mut rx: mpsc::Receiver<Msg>, writer: Writer) {
    let shared = writer.shared.clone();
    let mut writer = Some(writer);
    let mut closing = None;
    while let Some(msg) = rx.recv().await {
        let mut group = Vec::new();
        match msg {
            Msg::Propose(p) => group.push(p),
            Msg::Close(ack) => closing = Some(ack),
        }
        while closing.is_none() && group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(Msg::Propose(p)) => group.push(p),
                Ok(Msg::Close(ack)) => closing = Some(ack),
                Err(_) => break,
            }
        }
        if !group.is_empty() {
            let Some(mut w) = writer.take() else { break };
            let done = tokio::task::spawn_blocking(move || {
                let ok = w.commit(group);
                (w, ok)
            })
            .await;
            match done {
                Ok((w, true)) => writer = Some(w),
                Ok((_, false)) => break,
                Err(e) => {
                    // The apply panicked; its proposers' reply channels were dropped with
                    // the thread, so they see `Stopped`.
                    shared.fail(format!("log task panicked: {e}"));
                    break;
                }
            }
        }
        if closing.is_some() {
            break;
        }
    }
    // Refuse whatever is still queued, then let `close` return.
    shared.stopped.store(true, Ordering::SeqCst);
    rx.close();
    while let Ok(msg) = rx.try_recv() {
        match msg {
            Msg::Propose(p) => {
                let _ = p.reply.send(Err(Error::Stopped));
            }
            Msg::Close(ack) => {
                let _ = ack.send(());
            }
        }
    }
    if let Some(ack) = closing {
        let _ = ack.send(());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use metastore_core::backend::ScanVisitor;
    use metastore_core::{BackendError, BatchOp, MemoryBackend, StateMachineConfig};
    use metastore_proto::etcdserverpb::{PutRequest, RangeRequest};
    use metastore_proto::metastore::internal_request::Request;

    use super::*;

    /// A memory engine that counts durable log appends and can be told to fail writes.
    #[derive(Clone, Default)]
    struct Counting {
        inner: Arc<MemoryBackend>,
        log_syncs: Arc<AtomicUsize>,
        fail: Arc<AtomicBool>,
    }

    impl Backend for Counting {
        fn get(&self, bucket: Bucket, key: &[u8]) -> Result<Option<Vec<u8>>, BackendError> {
            self.inner.get(bucket, key)
        }
        fn scan(
            &self,
            bucket: Bucket,
            start: &[u8],
            end: Option<&[u8]>,
            visit: &mut ScanVisitor<'_>,
        ) -> Result<(), BackendError> {
            self.inner.scan(bucket, start, end, visit)
        }
        fn write(&self, batch: WriteBatch) -> Result<(), BackendError> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(BackendError("injected failure".into()));
            }
            let appends = batch.ops.iter().any(
                |op| matches!(op, BatchOp::Put { bucket: Bucket::Log, key, .. } if key[0] == b'e'),
            );
            if batch.sync && appends {
                self.log_syncs.fetch_add(1, Ordering::SeqCst);
            }
            self.inner.write(batch)
        }
        fn size_bytes(&self) -> u64 {
            self.inner.size_bytes()
        }
        fn engine_name(&self) -> &'static str {
            "counting"
        }
    }

    fn open(engine: &Counting) -> (SharedState, SingleLog) {
        let sm =
            StateMachine::open(Box::new(engine.clone()), StateMachineConfig::default()).unwrap();
        let state = Arc::new(RwLock::new(sm));
        let log = SingleLog::open(
            state.clone(),
            Arc::new(engine.clone()),
            7,
            Arc::new(NoEvents),
        )
        .unwrap();
        (state, log)
    }

    fn put(key: &str) -> InternalRequest {
        InternalRequest {
            request: Some(Request::Put(PutRequest {
                key: key.as_bytes().to_vec(),
                value: b"v".to_vec(),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    fn log_keys(engine: &Counting) -> Vec<u64> {
        let mut keys = Vec::new();
        engine
            .scan(Bucket::Log, &entry_key(0), Some(ENTRY_END), &mut |k, _| {
                keys.push(u64::from_be_bytes(k[1..].try_into().unwrap()));
                true
            })
            .unwrap();
        keys
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_proposals_share_durable_writes() {
        let engine = Counting::default();
        let (state, log) = open(&engine);
        let log = Arc::new(log);
        let n = 200;
        let proposals: Vec<_> = (0..n).map(|i| log.propose(put(&format!("k{i}")))).collect();
        let results = futures::future::join_all(proposals).await;
        assert!(results
            .iter()
            .all(|r| matches!(r, Ok(ApplyResponse::Put(_)))));
        let syncs = engine.log_syncs.load(Ordering::SeqCst);
        assert!(syncs < n / 4, "{syncs} durable appends for {n} proposals");
        let status = log.status();
        assert_eq!(status.commit_index, n as u64);
        assert_eq!(status.applied_index, n as u64);
        assert_eq!(status.term, FIRST_TERM);
        assert_eq!(status.leader, 7);
        assert_eq!(read_state(&state).unwrap().current_revision(), 1 + n as i64);
        log.close().await;
        assert!(matches!(
            log.propose(put("late")).await,
            Err(Error::Stopped)
        ));
    }

    #[tokio::test]
    async fn applied_entries_are_trimmed_by_the_next_append() {
        let engine = Counting::default();
        let (_state, log) = open(&engine);
        log.propose(put("a")).await.unwrap();
        assert_eq!(log_keys(&engine), vec![1]);
        log.propose(put("b")).await.unwrap();
        assert_eq!(log_keys(&engine), vec![2]);
        log.close().await;
    }

    #[tokio::test]
    async fn unapplied_entries_are_replayed_on_open_and_terms_advance() {
        let engine = Counting::default();
        {
            let (_state, log) = open(&engine);
            log.propose(put("a")).await.unwrap();
            log.close().await;
        }
        // An entry that became durable but was never applied (a crash between the
        // append and the apply).
        let entry = LogEntry {
            index: 2,
            term: FIRST_TERM,
            data: put("b").encode_to_vec(),
        };
        let mut batch = WriteBatch::new();
        batch.put(Bucket::Log, entry_key(2).to_vec(), entry.encode_to_vec());
        engine.write(batch).unwrap();

        let (state, log) = open(&engine);
        let status = log.status();
        assert_eq!(status.applied_index, 2);
        assert_eq!(status.commit_index, 2);
        assert_eq!(status.term, FIRST_TERM + 1);
        let resp = read_state(&state)
            .unwrap()
            .range(&RangeRequest {
                key: b"b".to_vec(),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(resp.kvs.len(), 1);
        // Stale entries at or below the applied index were removed at open.
        assert!(log_keys(&engine).iter().all(|i| *i > 2));
        // New proposals continue the index sequence.
        log.propose(put("c")).await.unwrap();
        assert_eq!(log.status().commit_index, 3);
        log.close().await;
    }

    /// Collects published events, as the watch hub would.
    #[derive(Default)]
    struct Recording(std::sync::Mutex<Vec<Vec<mvccpb::Event>>>);

    impl EventSink for Recording {
        fn publish(&self, events: Vec<mvccpb::Event>) {
            self.0.lock().unwrap().push(events);
        }
    }

    #[tokio::test]
    async fn applied_events_reach_the_sink_in_log_order() {
        let engine = Counting::default();
        let sm =
            StateMachine::open(Box::new(engine.clone()), StateMachineConfig::default()).unwrap();
        let state = Arc::new(RwLock::new(sm));
        let sink = Arc::new(Recording::default());
        let log = SingleLog::open(state, Arc::new(engine.clone()), 7, sink.clone()).unwrap();
        let log = Arc::new(log);
        let proposals: Vec<_> = (0..50)
            .map(|i| log.propose(put(&format!("k{i}"))))
            .collect();
        futures::future::join_all(proposals).await;
        // A read produces no events and publishes nothing.
        log.propose(InternalRequest {
            request: Some(Request::Range(RangeRequest {
                key: b"k1".to_vec(),
                ..Default::default()
            })),
            ..Default::default()
        })
        .await
        .unwrap();
        log.close().await;
        let published = sink.0.lock().unwrap();
        assert_eq!(published.len(), 50);
        for (i, events) in published.iter().enumerate() {
            assert_eq!(events.len(), 1);
            assert_eq!(events[0].kv.as_ref().unwrap().mod_revision, 2 + i as i64);
        }
    }

    #[tokio::test]
    async fn a_failed_append_stops_the_log() {
        let engine = Counting::default();
        let (_state, log) = open(&engine);
        let mut fatal = log.fatal();
        engine.fail.store(true, Ordering::SeqCst);
        assert!(matches!(
            log.propose(put("a")).await,
            Err(Error::Storage(_))
        ));
        fatal.wait_for(Option::is_some).await.unwrap();
        assert!(matches!(log.propose(put("b")).await, Err(Error::Stopped)));
        assert!(log.read_barrier().await.is_err());
    }
}
