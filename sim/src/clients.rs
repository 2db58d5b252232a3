//! Simulated etcd clients: KV clients doing put/get/delete/compare-and-swap on a small key
//! set, and watchers over the whole key set that resume after broken streams. Each runs
//! on its own simulated node and talks to members only through the generated etcd gRPC
//! clients, recording what it saw into the shared [`Recorder`].
//!
//! A client must record only what it observed, and must mark an operation indeterminate
//! whenever it cannot know whether the operation took effect (any error or timeout of a
//! write): recording a guess would make the checkers judge the client, not the store.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use madsim::rand::Rng;
use metastore_proto::etcdserverpb as pb;
use metastore_proto::mvccpb;
use metastore_runtime::signal as watch;
use pb::kv_client::KvClient;
use pb::watch_client::WatchClient;
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::cluster::{connect, Endpoints};
use crate::history::{
    History, KvOp, KvOutcome, KvRecord, LeaseRecord, Versioned, WatchEnd, WatchRecord, WatchedEvent,
};

/// How long a client waits for one answer before it gives up on it.
pub(crate) const OP_TIMEOUT: Duration = Duration::from_secs(3);

/// Every key the workload touches starts with this prefix; watchers watch all of them.
pub const KEY_PREFIX: &[u8] = b"k";
pub(crate) const KEY_PREFIX_END: &[u8] = b"l";

/// The shared, append-only record of a run.
#[derive(Clone)]
pub struct Recorder {
    history: Arc<Mutex<History>>,
    start: Instant,
}

impl Recorder {
    pub fn new() -> Self {
        Self {
            history: Arc::new(Mutex::new(History::default())),
            start: Instant::now(),
        }
    }

    pub fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, History> {
        self.history.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn kv(&self, record: KvRecord) {
        self.lock().kv.push(record);
    }

    fn watch(&self, record: WatchRecord) {
        self.lock().watches.push(record);
    }

    pub(crate) fn lease(&self, record: LeaseRecord) {
        self.lock().leases.push(record);
    }

    /// The records so far, in a canonical order (records of different clients that end
    /// at the same simulated instant have no order of their own).
    pub fn history(&self) -> History {
        let mut history = self.lock().clone();
        history.kv.sort_by_key(|r| (r.invoked_ns, r.client));
        history.watches.sort_by_key(|r| (r.watcher, r.started_ns));
        history
            .leases
            .sort_by_key(|r| (r.client, r.grant_invoked_ns));
        history
    }
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

/// The node a client runs on.
pub fn client_ip(index: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 250, index as u8 + 1))
}

pub fn key(i: usize) -> Vec<u8> {
    let mut k = KEY_PREFIX.to_vec();
    k.extend_from_slice(format!("{i}").as_bytes());
    k
}

/// One KV client: issues one operation at a time until `stop` turns true. It starts on
/// member `client % members` and moves to the next member after any failure, as etcd's
/// clients fail over between endpoints.
pub async fn kv_client(
    client: usize,
    endpoints: Endpoints,
    keys: usize,
    recorder: Recorder,
    stop: watch::Receiver<bool>,
) {
    let members = endpoints.len();
    let mut member = client % members;
    let mut channel: Option<KvClient<Channel>> = None;
    let mut counter = 0u64;
    // What this client last saw of each key's mod_revision, for plausible CAS guesses.
    let mut seen = vec![0i64; keys];
    while !*stop.borrow() {
        let pause = Duration::from_millis(madsim::rand::thread_rng().gen_range(0..40));
        tokio::time::sleep(pause).await;
        let kv = match channel.as_mut() {
            Some(kv) => kv,
            None => match connect(&endpoints.url(member)).await {
                Some(c) => channel.insert(KvClient::new(c)),
                None => {
                    member = (member + 1) % members;
                    continue;
                }
            },
        };
        let k = madsim::rand::thread_rng().gen_range(0..keys);
        counter += 1;
        let value = format!("c{client}-{counter}").into_bytes();
        let op = match madsim::rand::thread_rng().gen_range(0..100) {
            0..=34 => KvOp::Put { key: key(k), value },
            35..=64 => KvOp::Get { key: key(k) },
            65..=74 => KvOp::Delete { key: key(k) },
            _ => KvOp::Cas {
                key: key(k),
                // Mostly what this client saw last (often still current), sometimes 0.
                expected_mod_revision: if madsim::rand::thread_rng().gen_bool(0.8) {
                    seen[k]
                } else {
                    0
                },
                value,
            },
        };
        let invoked_ns = recorder.now_ns();
        let result = tokio::time::timeout(OP_TIMEOUT, execute(kv, &op)).await;
        let outcome = match result {
            Ok(Ok(outcome)) => Some(outcome),
            _ => None,
        };
        if outcome.is_none() {
            // Fail over, and never reuse a connection that may be stuck.
            channel = None;
            member = (member + 1) % members;
            if !op.is_write() {
                // A failed read had no effect: it is not part of the history.
                continue;
            }
        }
        match &outcome {
            Some(KvOutcome::Put { revision }) => seen[k] = *revision,
            Some(KvOutcome::Get { kv, .. }) => seen[k] = kv.as_ref().map_or(0, |v| v.mod_revision),
            Some(KvOutcome::Cas {
                revision,
                succeeded: true,
                ..
            }) => seen[k] = *revision,
            Some(KvOutcome::Cas { current, .. }) => {
                seen[k] = current.as_ref().map_or(0, |v| v.mod_revision)
            }
            Some(KvOutcome::Delete { .. }) => seen[k] = 0,
            None => {}
        }
        recorder.kv(KvRecord {
            client,
            op,
            invoked_ns,
            completed_ns: outcome.as_ref().map(|_| recorder.now_ns()),
            outcome,
        });
    }
}

fn header_revision(header: &Option<pb::ResponseHeader>) -> Result<i64, tonic::Status> {
    header
        .as_ref()
        .map(|h| h.revision)
        .ok_or_else(|| tonic::Status::internal("response without header"))
}

fn versioned(kvs: &[mvccpb::KeyValue]) -> Option<Versioned> {
    kvs.first().map(|kv| Versioned {
        value: kv.value.to_vec(),
        mod_revision: kv.mod_revision,
    })
}

async fn execute(kv: &mut KvClient<Channel>, op: &KvOp) -> Result<KvOutcome, tonic::Status> {
    match op {
        KvOp::Put { key, value } => {
            let r = kv
                .put(pb::PutRequest {
                    key: key.clone(),
                    value: value.clone(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            Ok(KvOutcome::Put {
                revision: header_revision(&r.header)?,
            })
        }
        KvOp::Get { key } => {
            let r = kv
                .range(pb::RangeRequest {
                    key: key.clone(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            Ok(KvOutcome::Get {
                revision: header_revision(&r.header)?,
                kv: versioned(&r.kvs),
            })
        }
        KvOp::Delete { key } => {
            let r = kv
                .delete_range(pb::DeleteRangeRequest {
                    key: key.clone(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            Ok(KvOutcome::Delete {
                revision: header_revision(&r.header)?,
                deleted: r.deleted,
            })
        }
        KvOp::Cas {
            key,
            expected_mod_revision,
            value,
        } => {
            let r = kv
                .txn(pb::TxnRequest {
                    compare: vec![pb::Compare {
                        result: pb::compare::CompareResult::Equal as i32,
                        target: pb::compare::CompareTarget::Mod as i32,
                        key: key.clone(),
                        target_union: Some(pb::compare::TargetUnion::ModRevision(
                            *expected_mod_revision,
                        )),
                        ..Default::default()
                    }],
                    success: vec![pb::RequestOp {
                        request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                            key: key.clone(),
                            value: value.clone(),
                            ..Default::default()
                        })),
                    }],
                    failure: vec![pb::RequestOp {
                        request: Some(pb::request_op::Request::RequestRange(pb::RangeRequest {
                            key: key.clone(),
                            ..Default::default()
                        })),
                    }],
                })
                .await?
                .into_inner();
            let current = if r.succeeded {
                None
            } else {
                match r.responses.first().and_then(|op| op.response.as_ref()) {
                    Some(pb::response_op::Response::ResponseRange(range)) => versioned(&range.kvs),
                    _ => return Err(tonic::Status::internal("txn else-branch without range")),
                }
            };
            Ok(KvOutcome::Cas {
                revision: header_revision(&r.header)?,
                succeeded: r.succeeded,
                current,
            })
        }
    }
}

/// One watcher of the whole key set. Its first stream starts at `start_revision`; when a
/// stream breaks it resumes, on the next member, right after the last revision it got.
/// Stops when `stop` turns true.
pub async fn watcher(
    watcher: usize,
    endpoints: Endpoints,
    start_revision: i64,
    recorder: Recorder,
    mut stop: watch::Receiver<bool>,
) {
    let members = endpoints.len();
    let mut member = watcher % members;
    let mut next = start_revision;
    while !*stop.borrow() {
        let mut record = WatchRecord {
            watcher,
            member,
            key: KEY_PREFIX.to_vec(),
            range_end: KEY_PREFIX_END.to_vec(),
            start_revision: next,
            created_revision: 0,
            prev_kv: true,
            responses: Vec::new(),
            end: WatchEnd::Broken,
            started_ns: recorder.now_ns(),
            ended_ns: 0,
        };
        let Some(channel) = connect(&endpoints.url(member)).await else {
            member = (member + 1) % members;
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        record.end = watch_stream(channel, &mut record, &mut stop).await;
        record.ended_ns = recorder.now_ns();
        if let Some((_, events)) = record.responses.last() {
            if let Some(last) = events.last() {
                next = last.revision + 1;
            }
        } else if next == 0 && record.created_revision > 0 {
            // Nothing arrived: resume exactly where this stream promised to start.
            next = record.created_revision + 1;
        }
        let end = record.end.clone();
        recorder.watch(record);
        if end != WatchEnd::Stopped {
            member = (member + 1) % members;
        }
        match end {
            // Its start was compacted away: what an etcd client does is start again
            // from the oldest revision still there.
            WatchEnd::Canceled { compact_revision } if compact_revision > 0 => {
                next = compact_revision;
            }
            WatchEnd::Canceled { .. } => return,
            _ => {}
        }
    }
}

/// Compacts the store every few seconds, keeping the last `keep` revisions, as
/// `--auto-compaction-mode revision` would; errors (no leader, a partition) are ignored.
pub async fn compactor(
    endpoints: Endpoints,
    keep: i64,
    log: crate::faults::FaultLog,
    stop: watch::Receiver<bool>,
) {
    let mut member = 0;
    while !*stop.borrow() {
        let pause = Duration::from_millis(madsim::rand::thread_rng().gen_range(3000..8000));
        tokio::time::sleep(pause).await;
        member = (member + 1) % endpoints.len();
        let Some(channel) = connect(&endpoints.url(member)).await else {
            continue;
        };
        let mut kv = KvClient::new(channel);
        let compacted = tokio::time::timeout(OP_TIMEOUT, async {
            let current = kv
                .range(pb::RangeRequest {
                    key: KEY_PREFIX.to_vec(),
                    count_only: true,
                    ..Default::default()
                })
                .await
                .ok()?
                .into_inner()
                .header?
                .revision;
            if current - keep > 1 {
                kv.compact(pb::CompactionRequest {
                    revision: current - keep,
                    physical: false,
                })
                .await
                .ok()?;
                return Some(current - keep);
            }
            None
        })
        .await;
        if let Ok(Some(revision)) = compacted {
            log.record(format!("compacted at revision {revision}"));
        }
    }
}

async fn watch_stream(
    channel: Channel,
    record: &mut WatchRecord,
    stop: &mut watch::Receiver<bool>,
) -> WatchEnd {
    let mut client = WatchClient::new(channel);
    let create = pb::WatchRequest {
        request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
            pb::WatchCreateRequest {
                key: record.key.clone(),
                range_end: record.range_end.clone(),
                start_revision: record.start_revision,
                prev_kv: record.prev_kv,
                ..Default::default()
            },
        )),
    };
    // The request stream stays open (a closed one would end the watch).
    let requests = futures::StreamExt::chain(
        futures::stream::iter(vec![create]),
        futures::stream::pending(),
    );
    let mut responses = match tokio::time::timeout(OP_TIMEOUT, client.watch(requests)).await {
        Ok(Ok(r)) => r.into_inner(),
        _ => return WatchEnd::Broken,
    };
    loop {
        // `biased`: an unbiased select draws from tokio's RNG, which is not the seed's.
        let message = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => return WatchEnd::Stopped,
            m = responses.message() => m,
        };
        let response = match message {
            Ok(Some(r)) => r,
            _ => return WatchEnd::Broken,
        };
        let revision = response.header.as_ref().map_or(0, |h| h.revision);
        if response.created {
            record.created_revision = revision;
        }
        if response.canceled {
            return WatchEnd::Canceled {
                compact_revision: response.compact_revision,
            };
        }
        if response.events.is_empty() {
            continue;
        }
        let events = response
            .events
            .iter()
            .map(|e| {
                let kv = e.kv.clone().unwrap_or_default();
                WatchedEvent {
                    key: kv.key.to_vec(),
                    deleted: e.r#type == mvccpb::event::EventType::Delete as i32,
                    revision: kv.mod_revision,
                    value: kv.value.to_vec(),
                    prev: e.prev_kv.as_ref().map(|p| Versioned {
                        value: p.value.to_vec(),
                        mod_revision: p.mod_revision,
                    }),
                }
            })
            .collect();
        record.responses.push((revision, events));
    }
}
