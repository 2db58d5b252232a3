//! The watch hub: every watcher of this member, which of them are in step with the log
//! ("synced") and which are catching up from history, and each watch stream's bounded
//! queue of outgoing responses.
//!
//! The log publishes each applied entry's events here ([`EventSink`]) while it holds
//! the state machine's write lock; a watcher is registered, and caught up, while the
//! state machine's read lock is held. So a watcher registered at revision R gets every
//! event above R from `publish` and reads the ones at or below R from history: no gap,
//! no duplicate. Lock order is always state machine, then hub, then a stream's queue.
//!
//! This module must never block in `publish` (it only queues or demotes), never let a
//! stream's queue grow past its bound (a watcher whose stream does not drain is demoted
//! to catch up from history later, or canceled with the compacted revision), and never
//! decide what an event is: events come from core, whole.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use metastore_core::mvcc::{key_in_range, HistoryLimits};
use metastore_core::StateMachine;
use metastore_proto::etcdserverpb as pb;
use metastore_proto::mvccpb;
use tokio::sync::Notify;

use crate::replication::EventSink;

/// The bounds of the hub's buffers.
#[derive(Debug, Clone, Copy)]
pub struct HubLimits {
    /// A stream stops taking events for its synced watchers once this many bytes of
    /// responses wait to be sent; its watchers then catch up from history.
    pub queue_bytes: usize,
    /// One history read: bounded so the read lock (which writers wait on) is held
    /// briefly.
    pub history: HistoryLimits,
}

impl Default for HubLimits {
    fn default() -> Self {
        Self {
            queue_bytes: 1 << 20,
            history: HistoryLimits {
                max_scanned: 1000,
                max_bytes: 256 << 10,
            },
        }
    }
}
/// etcd's `clientv3.InvalidWatchID`: the watch ID of a stream-wide progress response.
pub const PROGRESS_WATCH_ID: i64 = -1;

/// etcd's mvcc errors a create is answered with (`cancel_reason`).
pub const ERR_EMPTY_RANGE: &str = "mvcc: watcher range is empty";
pub const ERR_DUPLICATE_ID: &str = "mvcc: duplicate watch ID provided on the WatchStream";

/// A response waiting in a stream's queue. The header carries only the revision; the
/// sender fills in the member's identity and term.
#[derive(Debug)]
pub struct Outgoing {
    pub response: pb::WatchResponse,
    /// The watcher asked for large responses to be split (etcd's `fragment`).
    pub fragment: bool,
}

/// A queued response and its encoded size (what the queue's bound counts).
struct Queued {
    out: Outgoing,
    bytes: usize,
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Queued>,
    bytes: usize,
    /// Watchers of this stream that must catch up from history.
    unsynced: BTreeSet<i64>,
    /// A RequestProgress waits for every watcher of the stream to be synced.
    progress_deferred: bool,
    closed: bool,
}

/// One watch stream's outgoing side, shared by the hub (which queues events) and the
/// stream's response stream (which drains it).
pub struct StreamQueue {
    id: u64,
    limit: usize,
    queue: Mutex<Queue>,
    /// Woken when something was queued, a watcher needs catching up, or the stream
    /// closed (the response stream polls the queue directly).
    ready: futures::task::AtomicWaker,
    /// The queue shrank: the receiving half may read the next request.
    pub room: Notify,
    closed: crate::signal::Sender<bool>,
}

impl StreamQueue {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, q: &mut Queue, out: Outgoing) {
        let bytes = prost::Message::encoded_len(&out.response);
        q.bytes += bytes;
        q.items.push_back(Queued { out, bytes });
        self.ready.wake();
    }

    /// Takes the next response to send.
    pub fn pop(&self) -> Option<Outgoing> {
        let mut batch = self.pop_many(1, usize::MAX);
        batch.pop()
    }

    /// Takes up to `n` responses to send, oldest first, stopping once `max_bytes` are
    /// taken (at least one is, whatever its size).
    pub fn pop_many(&self, n: usize, max_bytes: usize) -> Vec<Outgoing> {
        let mut q = self.lock();
        let n = n.min(q.items.len());
        let mut out = Vec::with_capacity(n);
        let mut taken = 0;
        while out.len() < n && (out.is_empty() || taken < max_bytes) {
            let Some(item) = q.items.pop_front() else {
                break;
            };
            q.bytes -= item.bytes;
            taken += item.bytes;
            out.push(item.out);
        }
        if !out.is_empty() && q.bytes < self.limit {
            self.room.notify_one();
        }
        out
    }

    pub fn queued_bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Whether the queue is at its bound (the receiving half then waits).
    pub fn is_full(&self) -> bool {
        self.lock().bytes >= self.limit
    }

    pub fn has_unsynced(&self) -> bool {
        !self.lock().unsynced.is_empty()
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Registers the task to wake when the queue changes.
    pub fn register(&self, waker: &std::task::Waker) {
        self.ready.register(waker);
    }

    /// Marks the stream closed and wakes both halves.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.wake();
        self.room.notify_one();
        self.closed.send_replace(true);
    }

    /// Resolves once the stream is closed.
    pub async fn wait_closed(&self) {
        let mut rx = self.closed.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }
}

/// What a create request asks for, after etcd's key normalisation.
#[derive(Debug, Clone)]
pub struct WatchSpec {
    pub key: Vec<u8>,
    /// `None`: the key alone; empty: every key from `key`; else `[key, end)`.
    pub end: Option<Vec<u8>>,
    pub start_revision: i64,
    pub prev_kv: bool,
    pub fragment: bool,
    pub progress_notify: bool,
    pub no_put: bool,
    pub no_delete: bool,
    /// 0 asks the stream to pick an ID (etcd's `AutoWatchID`).
    pub watch_id: i64,
}

impl WatchSpec {
    /// etcd's v3rpc normalisation: an empty key is `\0` (the smallest key), an empty
    /// range end watches one key, and a range end of `\0` watches every key from `key`.
    pub fn from_request(r: &pb::WatchCreateRequest) -> Self {
        use pb::watch_create_request::FilterType;
        let key = if r.key.is_empty() {
            vec![0]
        } else {
            r.key.clone()
        };
        let end = match r.range_end.as_slice() {
            [] => None,
            [0] => Some(Vec::new()),
            e => Some(e.to_vec()),
        };
        let has = |f: FilterType| r.filters.contains(&(f as i32));
        Self {
            key,
            end,
            start_revision: r.start_revision,
            prev_kv: r.prev_kv,
            fragment: r.fragment,
            progress_notify: r.progress_notify,
            no_put: has(FilterType::Noput),
            no_delete: has(FilterType::Nodelete),
            watch_id: r.watch_id,
        }
    }

    fn matches(&self, key: &[u8]) -> bool {
        key_in_range(key, &self.key, self.end.as_deref())
    }

    /// The events this watcher sees, with prev_kv only when asked for.
    fn filter<'a>(&self, events: impl Iterator<Item = &'a mvccpb::Event>) -> Vec<mvccpb::Event> {
        let put = mvccpb::event::EventType::Put as i32;
        events
            .filter(|e| {
                let is_put = e.r#type == put;
                !(is_put && self.no_put || !is_put && self.no_delete)
            })
            .map(|e| mvccpb::Event {
                r#type: e.r#type,
                kv: e.kv.clone(),
                prev_kv: if self.prev_kv {
                    e.prev_kv.clone()
                } else {
                    None
                },
            })
            .collect()
    }
}

type WatcherRef = (u64, i64);

struct Watcher {
    spec: WatchSpec,
    /// The first revision not yet queued for this watcher.
    next_rev: i64,
    synced: bool,
    /// An event response was queued since the last progress tick.
    active: bool,
    stream: Arc<StreamQueue>,
}

#[derive(Default)]
struct Hub {
    watchers: HashMap<WatcherRef, Watcher>,
    /// Synced watchers of a single key, by key.
    by_key: HashMap<Vec<u8>, HashSet<WatcherRef>>,
    /// Synced watchers of a range.
    ranges: HashSet<WatcherRef>,
    /// Next automatic watch ID per stream (etcd's `nextID`).
    next_auto: HashMap<u64, i64>,
    /// Watch IDs per stream.
    streams: HashMap<u64, BTreeSet<i64>>,
    /// Watchers that want `prev_kv` (`EventSink::wants_prev_kv`).
    prev_kv_watchers: usize,
}

impl Hub {
    fn index(&mut self, r: WatcherRef, spec: &WatchSpec) {
        match spec.end {
            None => {
                self.by_key.entry(spec.key.clone()).or_default().insert(r);
            }
            Some(_) => {
                self.ranges.insert(r);
            }
        }
    }

    fn unindex(&mut self, r: WatcherRef, spec: &WatchSpec) {
        match spec.end {
            None => {
                if let Some(set) = self.by_key.get_mut(&spec.key) {
                    set.remove(&r);
                    if set.is_empty() {
                        self.by_key.remove(&spec.key);
                    }
                }
            }
            Some(_) => {
                self.ranges.remove(&r);
            }
        }
    }

    fn insert(&mut self, r: WatcherRef, w: Watcher) {
        if w.spec.prev_kv {
            self.prev_kv_watchers += 1;
        }
        self.watchers.insert(r, w);
    }

    fn remove(&mut self, r: WatcherRef) -> Option<Watcher> {
        let w = self.watchers.remove(&r)?;
        if w.spec.prev_kv {
            self.prev_kv_watchers -= 1;
        }
        if let Some(ids) = self.streams.get_mut(&r.0) {
            ids.remove(&r.1);
        }
        if w.synced {
            self.unindex(r, &w.spec);
        }
        Some(w)
    }
}

/// The result of asking for a watcher.
pub enum Created {
    /// Registered under this ID; the `created` response is already queued.
    Ok(i64),
    /// Refused; the `created` + `canceled` response is already queued.
    Refused,
}

/// Every watcher of one member. Cheap to share; one per member.
#[derive(Default)]
pub struct WatchHub {
    inner: Mutex<Hub>,
    next_stream: AtomicU64,
    limits: HubLimits,
}

fn header(revision: i64) -> Option<pb::ResponseHeader> {
    Some(pb::ResponseHeader {
        revision,
        ..Default::default()
    })
}

impl WatchHub {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn with_limits(limits: HubLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            ..Self::default()
        })
    }

    fn lock(&self) -> MutexGuard<'_, Hub> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new stream's queue.
    pub fn open_stream(&self) -> Arc<StreamQueue> {
        Arc::new(StreamQueue {
            id: self.next_stream.fetch_add(1, Ordering::Relaxed),
            limit: self.limits.queue_bytes,
            queue: Mutex::new(Queue::default()),
            ready: futures::task::AtomicWaker::new(),
            room: Notify::new(),
            closed: crate::signal::channel(false).0,
        })
    }

    /// Forgets every watcher of a stream that ended.
    pub fn close_stream(&self, stream: &Arc<StreamQueue>) {
        stream.close();
        let mut hub = self.lock();
        let ids = hub.streams.remove(&stream.id).unwrap_or_default();
        for id in ids {
            hub.remove((stream.id, id));
        }
        hub.next_auto.remove(&stream.id);
    }

    /// How many watchers exist (for tests and metrics).
    pub fn watcher_count(&self) -> usize {
        self.lock().watchers.len()
    }

    /// etcd's create: queues the `created` response (header revision = the current
    /// revision), then registers the watcher, all under the state machine's read lock
    /// so that no event can slip in between or come before `created`.
    pub fn create(&self, sm: &StateMachine, stream: &Arc<StreamQueue>, spec: WatchSpec) -> Created {
        let current = sm.current_revision();
        let mut hub = self.lock();
        let mut q = stream.lock();
        let refuse = |q: &mut Queue, reason: &str| {
            stream.push(
                q,
                Outgoing {
                    response: pb::WatchResponse {
                        header: header(current),
                        watch_id: -1,
                        created: true,
                        canceled: true,
                        cancel_reason: reason.to_string(),
                        ..Default::default()
                    },
                    fragment: false,
                },
            );
            Created::Refused
        };
        if let Some(end) = &spec.end {
            if !end.is_empty() && spec.key.as_slice() >= end.as_slice() {
                return refuse(&mut q, ERR_EMPTY_RANGE);
            }
        }
        let id = if spec.watch_id == 0 {
            let next = hub.next_auto.entry(stream.id).or_insert(0);
            let mut id = *next;
            while hub.watchers.contains_key(&(stream.id, id)) {
                id += 1;
            }
            hub.next_auto.insert(stream.id, id + 1);
            id
        } else if hub.watchers.contains_key(&(stream.id, spec.watch_id)) {
            return refuse(&mut q, ERR_DUPLICATE_ID);
        } else {
            spec.watch_id
        };
        let start = if spec.start_revision == 0 {
            current + 1
        } else {
            spec.start_revision
        };
        stream.push(
            &mut q,
            Outgoing {
                response: pb::WatchResponse {
                    header: header(current),
                    watch_id: id,
                    created: true,
                    ..Default::default()
                },
                fragment: false,
            },
        );
        // etcd: a watcher starting after the current revision is synced at once and
        // skips events below its start.
        let synced = start > current;
        let r = (stream.id, id);
        if synced {
            hub.index(r, &spec);
        } else {
            q.unsynced.insert(id);
            stream.ready.wake();
        }
        hub.streams.entry(stream.id).or_default().insert(id);
        // Under the state machine's read lock (`sm`): every apply from now on sees the
        // `prev_kv` demand this watcher may add (`wants_prev_kv`).
        hub.insert(
            r,
            Watcher {
                spec,
                next_rev: start,
                synced,
                active: false,
                stream: stream.clone(),
            },
        );
        Created::Ok(id)
    }

    /// etcd's cancel: an unknown ID is ignored; a known one is removed and answered with
    /// `canceled` at the current revision, after any events already queued for it.
    pub fn cancel(&self, sm: &StateMachine, stream: &Arc<StreamQueue>, watch_id: i64) -> bool {
        let current = sm.current_revision();
        let mut hub = self.lock();
        if hub.remove((stream.id, watch_id)).is_none() {
            return false;
        }
        let mut q = stream.lock();
        q.unsynced.remove(&watch_id);
        stream.push(
            &mut q,
            Outgoing {
                response: pb::WatchResponse {
                    header: header(current),
                    watch_id,
                    canceled: true,
                    ..Default::default()
                },
                fragment: false,
            },
        );
        true
    }

    /// etcd 3.5's RequestProgress: a response with watch ID -1 at the current revision
    /// once every watcher of the stream is synced (so the revision promises that every
    /// earlier event was sent); deferred until then otherwise.
    pub fn request_progress(&self, sm: &StateMachine, stream: &Arc<StreamQueue>) {
        let current = sm.current_revision();
        let _hub = self.lock();
        let mut q = stream.lock();
        if q.unsynced.is_empty() {
            q.progress_deferred = false;
            stream.push(&mut q, progress(PROGRESS_WATCH_ID, current));
        } else {
            q.progress_deferred = true;
        }
    }

    /// The periodic progress notification: every synced watcher of the stream that
    /// asked for it and got no events since the last tick hears the current revision.
    pub fn progress_tick(&self, sm: &StateMachine, stream: &Arc<StreamQueue>) {
        let current = sm.current_revision();
        let mut hub = self.lock();
        let mut q = stream.lock();
        let hub = &mut *hub;
        let mut ids: Vec<i64> = Vec::new();
        for id in hub.streams.get(&stream.id).into_iter().flatten() {
            let Some(w) = hub.watchers.get_mut(&(stream.id, *id)) else {
                continue;
            };
            if !w.spec.progress_notify {
                continue;
            }
            if w.synced && !w.active {
                ids.push(*id);
            }
            w.active = false;
        }
        for id in ids {
            stream.push(&mut q, progress(id, current));
        }
    }

    /// Reads the next history chunk for each of the stream's catching-up watchers, while
    /// the queue has room; a watcher that reaches the current revision becomes synced
    /// (under the read lock, so the next published event is its next one). A watcher
    /// whose next revision was compacted is canceled with the compacted revision.
    pub fn catch_up(&self, sm: &StateMachine, stream: &Arc<StreamQueue>) {
        let current = sm.current_revision();
        let mut hub = self.lock();
        let pending: Vec<i64> = stream.lock().unsynced.iter().copied().collect();
        for id in pending {
            if stream.is_full() {
                break;
            }
            let r = (stream.id, id);
            let Some(w) = hub.watchers.get_mut(&r) else {
                stream.lock().unsynced.remove(&id);
                continue;
            };
            let chunk = sm.history(
                &w.spec.key,
                w.spec.end.as_deref(),
                w.next_rev,
                // Events are filtered after the read; prev_kv only costs when asked.
                w.spec.prev_kv,
                self.limits.history,
            );
            let mut q = stream.lock();
            match chunk {
                Ok(chunk) => {
                    let events = w.spec.filter(chunk.events.iter());
                    if !events.is_empty() {
                        w.active = true;
                        let fragment = w.spec.fragment;
                        stream.push(
                            &mut q,
                            Outgoing {
                                response: pb::WatchResponse {
                                    header: header(current),
                                    watch_id: id,
                                    events,
                                    ..Default::default()
                                },
                                fragment,
                            },
                        );
                    }
                    w.next_rev = chunk.next_rev;
                    if chunk.next_rev > current {
                        w.synced = true;
                        q.unsynced.remove(&id);
                        let spec = w.spec.clone();
                        drop(q);
                        hub.index(r, &spec);
                    }
                }
                Err(metastore_core::Error::Compacted) => {
                    // etcd's compaction cancel carries no header revision.
                    stream.push(
                        &mut q,
                        Outgoing {
                            response: pb::WatchResponse {
                                header: header(0),
                                watch_id: id,
                                canceled: true,
                                // etcd reports -1 for a negative start revision before
                                // any compaction.
                                compact_revision: sm.store_compact_revision(),
                                ..Default::default()
                            },
                            fragment: false,
                        },
                    );
                    q.unsynced.remove(&id);
                    drop(q);
                    hub.remove(r);
                }
                Err(e) => {
                    tracing::error!(error = %e, watch_id = id, "reading watch history failed");
                    stream.push(
                        &mut q,
                        Outgoing {
                            response: pb::WatchResponse {
                                header: header(current),
                                watch_id: id,
                                canceled: true,
                                cancel_reason: e.to_string(),
                                ..Default::default()
                            },
                            fragment: false,
                        },
                    );
                    q.unsynced.remove(&id);
                    drop(q);
                    hub.remove(r);
                }
            }
        }
        let mut q = stream.lock();
        if q.progress_deferred && q.unsynced.is_empty() {
            q.progress_deferred = false;
            stream.push(&mut q, progress(PROGRESS_WATCH_ID, current));
        }
    }
}

fn progress(watch_id: i64, revision: i64) -> Outgoing {
    Outgoing {
        response: pb::WatchResponse {
            header: header(revision),
            watch_id,
            ..Default::default()
        },
        fragment: false,
    }
}

impl EventSink for WatchHub {
    fn wants_prev_kv(&self) -> bool {
        self.lock().prev_kv_watchers > 0
    }

    /// A snapshot replaced the state: the events between a synced watcher's position and
    /// the snapshot never passed through `publish`, so every synced watcher catches up
    /// from the new state's history (or is canceled if that history is compacted).
    fn restored(&self, _state: &StateMachine) {
        let mut hub = self.lock();
        let hub = &mut *hub;
        let synced: Vec<WatcherRef> = hub
            .watchers
            .iter()
            .filter(|(_, w)| w.synced)
            .map(|(r, _)| *r)
            .collect();
        for r in synced {
            let Some(w) = hub.watchers.get_mut(&r) else {
                continue;
            };
            w.synced = false;
            let spec = w.spec.clone();
            let stream = w.stream.clone();
            {
                let mut q = stream.lock();
                q.unsynced.insert(r.1);
            }
            stream.ready.wake();
            hub.unindex(r, &spec);
        }
    }

    fn publish(&self, events: Vec<mvccpb::Event>) {
        let Some(rev) = events
            .first()
            .and_then(|e| e.kv.as_ref())
            .map(|kv| kv.mod_revision)
        else {
            return;
        };
        let mut hub = self.lock();
        let hub = &mut *hub;
        // Which synced watchers see any event of this revision, in a stable order.
        let mut targets: Vec<WatcherRef> = Vec::new();
        for e in &events {
            let Some(kv) = &e.kv else { continue };
            if let Some(set) = hub.by_key.get(kv.key.as_ref()) {
                targets.extend(set.iter().copied());
            }
        }
        for r in &hub.ranges {
            let Some(w) = hub.watchers.get(r) else {
                continue;
            };
            if events
                .iter()
                .any(|e| e.kv.as_ref().is_some_and(|kv| w.spec.matches(&kv.key)))
            {
                targets.push(*r);
            }
        }
        targets.sort_unstable();
        targets.dedup();
        for r in targets {
            let Some(w) = hub.watchers.get_mut(&r) else {
                continue;
            };
            if !w.synced || rev < w.next_rev {
                continue;
            }
            let mine = w.spec.filter(
                events
                    .iter()
                    .filter(|e| e.kv.as_ref().is_some_and(|kv| w.spec.matches(&kv.key))),
            );
            if mine.is_empty() {
                w.next_rev = rev + 1;
                continue;
            }
            let stream = w.stream.clone();
            let mut q = stream.lock();
            if q.closed {
                continue;
            }
            if q.bytes < stream.limit {
                w.next_rev = rev + 1;
                w.active = true;
                let fragment = w.spec.fragment;
                stream.push(
                    &mut q,
                    Outgoing {
                        response: pb::WatchResponse {
                            header: header(rev),
                            watch_id: r.1,
                            events: mine,
                            ..Default::default()
                        },
                        fragment,
                    },
                );
            } else {
                // The stream is not draining: demote the watcher; it catches up from
                // history (from this revision) once the stream has room again.
                w.synced = false;
                q.unsynced.insert(r.1);
                stream.ready.wake();
                drop(q);
                let spec = w.spec.clone();
                hub.unindex(r, &spec);
            }
        }
    }
}

/// etcd's `sendFragments`: splits a response that is at least `max_bytes` and has more
/// than one event into pieces of at least one event each, all but the last marked
/// `fragment`.
pub fn fragments(response: pb::WatchResponse, max_bytes: usize) -> Vec<pb::WatchResponse> {
    use prost::Message;
    if response.encoded_len() < max_bytes || response.events.len() < 2 {
        return vec![response];
    }
    let mut template = response.clone();
    template.events = Vec::new();
    template.fragment = true;
    let mut out = Vec::new();
    let mut events = response.events.into_iter().peekable();
    while events.peek().is_some() {
        let mut cur = template.clone();
        while let Some(e) = events.peek() {
            cur.events.push(e.clone());
            if cur.events.len() > 1 && cur.encoded_len() >= max_bytes {
                cur.events.pop();
                break;
            }
            events.next();
        }
        if events.peek().is_none() {
            cur.fragment = false;
        }
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    //! The hub driven like the log drives it (apply, then publish under the same
    //! exclusive access), with tiny queues and history chunks so that watchers are
    //! demoted, caught up and compacted all the time: every watcher must receive exactly
    //! the events MVCC history implies, in order, once, or a prefix of them followed by a
    //! compaction cancel.
    use super::*;
    use metastore_core::{MemoryBackend, StateMachineConfig};
    use metastore_proto::metastore::internal_request::Request;
    use metastore_proto::metastore::InternalRequest;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Put(u8),
        Del(u8, u8),
        Txn(u8, u8),
        Compact(u8),
        Watch {
            stream: u8,
            start: u8,
            range: u8,
            a: u8,
            prev_kv: bool,
            filter: u8,
        },
        Cancel(u8, u8),
        Drain(u8, u8),
        CatchUp(u8),
        /// Entries that reach this member inside a snapshot: applied without being
        /// published, then the state is reinstalled and the hub told.
        Snapshot(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => any::<u8>().prop_map(Op::Put),
            2 => (any::<u8>(), any::<u8>()).prop_map(|(a, b)| Op::Del(a, b)),
            2 => (any::<u8>(), any::<u8>()).prop_map(|(a, b)| Op::Txn(a, b)),
            1 => any::<u8>().prop_map(Op::Compact),
            3 => (0u8..3, any::<u8>(), 0u8..4, any::<u8>(), any::<bool>(), 0u8..6).prop_map(
                |(stream, start, range, a, prev_kv, filter)| Op::Watch {
                    stream, start, range, a, prev_kv, filter
                }
            ),
            1 => (0u8..3, any::<u8>()).prop_map(|(s, w)| Op::Cancel(s, w)),
            3 => (0u8..3, 0u8..6).prop_map(|(s, n)| Op::Drain(s, n)),
            2 => (0u8..3).prop_map(Op::CatchUp),
            1 => any::<u8>().prop_map(Op::Snapshot),
        ]
    }

    fn key(k: u8) -> Vec<u8> {
        format!("k{}", k % 5).into_bytes()
    }

    fn env(r: Request) -> InternalRequest {
        InternalRequest {
            request: Some(r),
            ..Default::default()
        }
    }

    struct Watch {
        stream: usize,
        id: i64,
        spec: WatchSpec,
        start: i64,
        canceled_by_client: bool,
    }

    fn run(ops: Vec<Op>, queue_bytes: usize, max_scanned: usize) -> Result<(), TestCaseError> {
        let hub = WatchHub::with_limits(HubLimits {
            queue_bytes,
            history: HistoryLimits {
                max_scanned,
                max_bytes: 1 << 20,
            },
        });
        // The member's state machine computes `prev_kv` only while the hub asks for it;
        // the expected events come from a twin that always computes it.
        let mut sm = StateMachine::open(
            Box::new(MemoryBackend::default()),
            StateMachineConfig::default(),
        )
        .unwrap();
        let mut twin = StateMachine::open(
            Box::new(MemoryBackend::default()),
            StateMachineConfig::default(),
        )
        .unwrap();
        let streams: Vec<Arc<StreamQueue>> = (0..3).map(|_| hub.open_stream()).collect();
        let mut received: Vec<Vec<pb::WatchResponse>> = vec![Vec::new(); 3];
        let mut watches: Vec<Watch> = Vec::new();
        let mut emitted: Vec<mvccpb::Event> = Vec::new();
        let mut idx = 0;
        let hidden = std::cell::Cell::new(false);
        let mut apply = |sm: &mut StateMachine, r: Request, emitted: &mut Vec<mvccpb::Event>| {
            idx += 1;
            sm.set_event_prev_kv(hub.wants_prev_kv());
            let a = sm.apply(idx, &env(r.clone()));
            let full = twin.apply(idx, &env(r));
            if !a.events.is_empty() {
                emitted.extend(full.events);
                if !hidden.get() {
                    hub.publish(a.events);
                }
            }
        };
        for op in ops {
            match op {
                Op::Put(k) => apply(
                    &mut sm,
                    Request::Put(pb::PutRequest {
                        key: key(k),
                        value: vec![k; (k % 7) as usize * 10],
                        ..Default::default()
                    }),
                    &mut emitted,
                ),
                Op::Del(a, b) => {
                    let (a, b) = (key(a), key(b));
                    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
                    apply(
                        &mut sm,
                        Request::DeleteRange(pb::DeleteRangeRequest {
                            key: lo,
                            range_end: hi,
                            prev_kv: false,
                        }),
                        &mut emitted,
                    )
                }
                Op::Txn(a, b) => {
                    use pb::request_op::Request as R;
                    let mut ops = vec![pb::RequestOp {
                        request: Some(R::RequestPut(pb::PutRequest {
                            key: key(a),
                            value: b"t".to_vec(),
                            ..Default::default()
                        })),
                    }];
                    if key(a) != key(b) {
                        ops.push(pb::RequestOp {
                            request: Some(R::RequestDeleteRange(pb::DeleteRangeRequest {
                                key: key(b),
                                ..Default::default()
                            })),
                        });
                    }
                    apply(
                        &mut sm,
                        Request::Txn(pb::TxnRequest {
                            compare: vec![],
                            success: ops,
                            failure: vec![],
                        }),
                        &mut emitted,
                    )
                }
                Op::Snapshot(n) => {
                    hidden.set(true);
                    for i in 0..=(n % 3) {
                        apply(
                            &mut sm,
                            Request::Put(pb::PutRequest {
                                key: key(n.wrapping_add(i)),
                                value: b"s".to_vec(),
                                ..Default::default()
                            }),
                            &mut emitted,
                        );
                    }
                    hidden.set(false);
                    let mut records = Vec::new();
                    sm.snapshot_records(&mut |b, k, v| records.push((b, k.to_vec(), v.to_vec())))
                        .unwrap();
                    let at = sm.applied_index();
                    sm.restore(at, records).unwrap();
                    hub.restored(&sm);
                }
                Op::Compact(r) => {
                    let cur = sm.current_revision();
                    apply(
                        &mut sm,
                        Request::Compaction(pb::CompactionRequest {
                            revision: 1 + r as i64 % cur,
                            physical: false,
                        }),
                        &mut emitted,
                    )
                }
                Op::Watch {
                    stream,
                    start,
                    range,
                    a,
                    prev_kv,
                    filter,
                } => {
                    let cur = sm.current_revision();
                    let start_revision = start as i64 % (cur + 3);
                    let (key, end) = match range {
                        0 => (key(a), None),
                        1 => (key(a), Some(Vec::new())),
                        2 => (b"k1".to_vec(), Some(b"k3".to_vec())),
                        _ => (b"k".to_vec(), Some(b"l".to_vec())),
                    };
                    let spec = WatchSpec {
                        key,
                        end,
                        start_revision,
                        prev_kv,
                        fragment: false,
                        progress_notify: false,
                        no_put: filter == 1,
                        no_delete: filter == 2,
                        watch_id: 0,
                    };
                    let s = stream as usize;
                    if let Created::Ok(id) = hub.create(&sm, &streams[s], spec.clone()) {
                        watches.push(Watch {
                            stream: s,
                            id,
                            start: if start_revision == 0 {
                                cur + 1
                            } else {
                                start_revision
                            },
                            spec,
                            canceled_by_client: false,
                        });
                    }
                }
                Op::Cancel(s, w) => {
                    let mine: Vec<usize> = (0..watches.len())
                        .filter(|i| watches[*i].stream == s as usize)
                        .collect();
                    if !mine.is_empty() {
                        let i = mine[w as usize % mine.len()];
                        if hub.cancel(&sm, &streams[s as usize], watches[i].id) {
                            watches[i].canceled_by_client = true;
                        }
                    }
                }
                Op::Drain(s, n) => {
                    for _ in 0..n {
                        match streams[s as usize].pop() {
                            Some(o) => received[s as usize].push(o.response),
                            None => break,
                        }
                    }
                }
                Op::CatchUp(s) => hub.catch_up(&sm, &streams[s as usize]),
            }
            for q in &streams {
                // The bound holds (one response may overshoot it).
                let bytes = q.queued_bytes();
                prop_assert!(bytes < queue_bytes + 4096, "queue at {} bytes", bytes);
            }
        }
        // Let every stream drain and catch up completely.
        for _ in 0..100_000 {
            let mut busy = false;
            for (s, q) in streams.iter().enumerate() {
                while let Some(o) = q.pop() {
                    received[s].push(o.response);
                    busy = true;
                }
                if q.has_unsynced() {
                    hub.catch_up(&sm, q);
                    busy = true;
                }
            }
            if !busy {
                break;
            }
        }
        let compacted = sm.compacted_revision();
        for w in &watches {
            let mine: Vec<&pb::WatchResponse> = received[w.stream]
                .iter()
                .filter(|r| r.watch_id == w.id)
                .collect();
            prop_assert!(
                mine.first().is_some_and(|r| r.created),
                "created comes first"
            );
            let mut got: Vec<mvccpb::Event> = Vec::new();
            let mut cancel: Option<&pb::WatchResponse> = None;
            let mut last_rev = 0;
            for r in &mine[1..] {
                prop_assert!(cancel.is_none(), "nothing after a cancel: {:?}", r);
                if r.canceled {
                    cancel = Some(r);
                    continue;
                }
                for e in &r.events {
                    let rev = e.kv.as_ref().unwrap().mod_revision;
                    prop_assert!(rev >= last_rev);
                    last_rev = rev;
                }
                got.extend(r.events.iter().cloned());
            }
            let want: Vec<mvccpb::Event> = emitted
                .iter()
                .filter(|e| {
                    let kv = e.kv.as_ref().unwrap();
                    kv.mod_revision >= w.start && w.spec.matches(&kv.key)
                })
                .cloned()
                .collect();
            let want = w.spec.filter(want.iter());
            // prev_kv may be missing where a compaction made it unreadable (as in etcd).
            let strip = |v: &[mvccpb::Event]| -> Vec<mvccpb::Event> {
                v.iter()
                    .map(|e| mvccpb::Event {
                        prev_kv: None,
                        ..e.clone()
                    })
                    .collect()
            };
            for (g, x) in got.iter().zip(&want) {
                if let Some(p) = &g.prev_kv {
                    prop_assert_eq!(Some(p), x.prev_kv.as_ref());
                } else if w.spec.prev_kv && x.prev_kv.is_some() {
                    prop_assert!(x.kv.as_ref().unwrap().mod_revision - 1 < compacted);
                }
            }
            match cancel {
                None if w.canceled_by_client => {}
                Some(c) if w.canceled_by_client && c.compact_revision == 0 => {}
                None => prop_assert_eq!(strip(&got), strip(&want), "watcher {}", w.id),
                Some(c) => {
                    prop_assert!(c.compact_revision != 0 && c.compact_revision <= compacted);
                    prop_assert!(got.len() <= want.len());
                }
            }
            let n = got.len().min(want.len());
            prop_assert_eq!(
                strip(&got),
                strip(&want[..n]),
                "watcher {} gets a prefix",
                w.id
            );
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
        #[test]
        fn delivered_events_equal_history(
            ops in proptest::collection::vec(op(), 1..80),
            queue_bytes in prop_oneof![Just(1usize), 64usize..600, Just(1 << 20)],
            max_scanned in 1usize..6,
        ) {
            run(ops, queue_bytes, max_scanned)?;
        }
    }

    #[test]
    fn a_closed_stream_leaves_no_watchers() {
        let sm = StateMachine::open(
            Box::new(MemoryBackend::default()),
            StateMachineConfig::default(),
        )
        .unwrap();
        let hub = WatchHub::new();
        let a = hub.open_stream();
        let b = hub.open_stream();
        let spec = |key: &[u8], end: Option<Vec<u8>>| WatchSpec {
            key: key.to_vec(),
            end,
            start_revision: 0,
            prev_kv: false,
            fragment: false,
            progress_notify: false,
            no_put: false,
            no_delete: false,
            watch_id: 0,
        };
        for _ in 0..3 {
            assert!(matches!(
                hub.create(&sm, &a, spec(b"k", None)),
                Created::Ok(_)
            ));
            assert!(matches!(
                hub.create(&sm, &a, spec(b"k", Some(Vec::new()))),
                Created::Ok(_)
            ));
        }
        assert!(matches!(
            hub.create(&sm, &b, spec(b"k", None)),
            Created::Ok(0)
        ));
        assert_eq!(hub.watcher_count(), 7);
        hub.close_stream(&a);
        assert_eq!(hub.watcher_count(), 1);
        let h = hub.lock();
        assert_eq!(h.by_key.get(b"k".as_slice()).map(|s| s.len()), Some(1));
        assert!(h.ranges.is_empty());
        assert!(!h.streams.contains_key(&a.id));
    }

    #[test]
    fn fragments_split_like_etcd() {
        let ev = |n: usize| mvccpb::Event {
            kv: Some(mvccpb::KeyValue {
                key: b"k".to_vec().into(),
                value: vec![b'x'; n].into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let r = pb::WatchResponse {
            watch_id: 3,
            events: vec![ev(100), ev(100), ev(100)],
            ..Default::default()
        };
        let whole = fragments(r.clone(), 10_000);
        assert_eq!(whole, vec![r.clone()]);
        let parts = fragments(r.clone(), 150);
        assert_eq!(parts.len(), 3);
        assert!(parts[0].fragment && parts[1].fragment && !parts[2].fragment);
        assert!(parts.iter().all(|p| p.events.len() == 1 && p.watch_id == 3));
        // A single event is never split, however large.
        let one = pb::WatchResponse {
            events: vec![ev(1000)],
            ..Default::default()
        };
        assert_eq!(fragments(one.clone(), 10), vec![one]);
    }
}
