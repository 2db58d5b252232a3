//! etcd's Watch service: one bidirectional stream carrying many watchers.
//!
//! This module owns the two halves of a stream: the receiver, which turns create,
//! cancel and progress requests into hub calls (and stops reading while the stream's
//! outgoing queue is full, so a client that writes without reading cannot grow memory),
//! and the sender, which drains the stream's queue to gRPC, fills headers, splits
//! fragmented responses, runs history catch-up when the queue has room, and sends the
//! periodic progress notifications. It must never decide which events a watcher sees
//! (that is the hub's and core's business) and never block the log.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use metastore_proto::etcdserverpb as pb;
use metastore_proto::etcdserverpb::watch_server::Watch;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::Api;
use crate::replication::read_state;
use crate::watch::{fragments, Outgoing, StreamQueue, WatchHub, WatchSpec};

/// Responses handed to gRPC but not yet written to the connection. Small: the real
/// buffer is the stream's queue in the hub, which is bounded in bytes.
const GRPC_BUFFER: usize = 16;
/// Responses taken from the stream's queue at a time (one lock for many).
const SEND_BATCH: usize = 64;
const SEND_BATCH_BYTES: usize = 64 << 10;

pub struct WatchService {
    api: Arc<Api>,
    hub: Arc<WatchHub>,
    progress_interval: Duration,
    stop: watch::Receiver<bool>,
}

impl WatchService {
    pub fn new(
        api: Arc<Api>,
        hub: Arc<WatchHub>,
        progress_interval: Duration,
        stop: watch::Receiver<bool>,
    ) -> Self {
        Self {
            api,
            hub,
            progress_interval,
            stop,
        }
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

impl WatchService {
    /// Starts both halves of a new stream.
    fn open(&self, request: Request<Streaming<pb::WatchRequest>>) -> ResponseStream {
        let inbound = request.into_inner();
        let stream = self.hub.open_stream();
        let (tx, rx) = mpsc::channel(GRPC_BUFFER);
        tokio::spawn(receive(
            inbound,
            self.api.clone(),
            self.hub.clone(),
            stream.clone(),
        ));
        tokio::spawn(send(
            tx,
            self.api.clone(),
            self.hub.clone(),
            stream,
            self.progress_interval,
            self.stop.clone(),
        ));
        Box::pin(ReceiverStream::new(rx))
    }
}

// The real and the simulated stub generators shape a streaming method differently.
#[cfg(not(madsim))]
#[tonic::async_trait]
impl Watch for WatchService {
    async fn watch(
        &self,
        request: Request<Streaming<pb::WatchRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        Ok(Response::new(self.open(request)))
    }
}

#[cfg(madsim)]
#[tonic::async_trait]
impl Watch for WatchService {
    type WatchStream = ResponseStream;

    async fn watch(
        &self,
        request: Request<Streaming<pb::WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Ok(Response::new(self.open(request)))
    }
}

/// The receiving half: requests in order, one at a time, each answered through the
/// stream's queue. A half-closed stream keeps delivering events, as etcd's does.
async fn receive(
    mut inbound: Streaming<pb::WatchRequest>,
    api: Arc<Api>,
    hub: Arc<WatchHub>,
    stream: Arc<StreamQueue>,
) {
    use pb::watch_request::RequestUnion;
    loop {
        // Backpressure: a client that sends requests without reading responses waits
        // here instead of filling the queue with `created` responses.
        while stream.is_full() && !stream.is_closed() {
            stream.room.notified().await;
        }
        if stream.is_closed() {
            return;
        }
        let message = tokio::select! {
            m = inbound.message() => m,
            _ = stream.wait_closed() => return,
        };
        let request = match message {
            Ok(Some(r)) => r,
            // The client closed its sending side: keep sending until it goes away.
            Ok(None) => return,
            Err(status) => {
                tracing::debug!(error = %status, "watch stream receive failed");
                stream.close();
                return;
            }
        };
        let Ok(sm) = read_state(&api.state) else {
            stream.close();
            return;
        };
        match request.request_union {
            Some(RequestUnion::CreateRequest(c)) => {
                hub.create(&sm, &stream, WatchSpec::from_request(&c));
            }
            Some(RequestUnion::CancelRequest(c)) => {
                hub.cancel(&sm, &stream, c.watch_id);
            }
            Some(RequestUnion::ProgressRequest(_)) => hub.request_progress(&sm, &stream),
            // etcd ignores a request it does not understand rather than end the stream.
            None => {}
        }
    }
}

/// The sending half: drains the queue in order, catching up unsynced watchers whenever
/// the queue is short, until the client goes away or the member stops.
async fn send(
    tx: mpsc::Sender<Result<pb::WatchResponse, Status>>,
    api: Arc<Api>,
    hub: Arc<WatchHub>,
    stream: Arc<StreamQueue>,
    progress_interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(progress_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick of an interval fires at once.
    ticker.tick().await;
    let max_bytes = api.limits.max_request_bytes;
    'outer: loop {
        if *stop.borrow() || stream.is_closed() {
            break;
        }
        let batch = stream.pop_many(SEND_BATCH, SEND_BATCH_BYTES);
        if !batch.is_empty() {
            let term = api.log.status().term;
            for Outgoing { response, fragment } in batch {
                let pieces = if fragment {
                    fragments(response, max_bytes)
                } else {
                    vec![response]
                };
                for mut piece in pieces {
                    fill(&api, term, &mut piece.header);
                    // A client that does not read must not keep the member from stopping.
                    tokio::select! {
                        sent = tx.send(Ok(piece)) => if sent.is_err() {
                            break 'outer;
                        },
                        _ = stop.wait_for(|s| *s) => break 'outer,
                    }
                }
            }
            continue;
        }
        if stream.has_unsynced() {
            match read_state(&api.state) {
                Ok(sm) => hub.catch_up(&sm, &stream),
                Err(_) => break,
            }
            if stream.queued_bytes() > 0 {
                continue;
            }
            // Nothing to send yet (e.g. every event filtered out): go on catching up
            // without starving the runtime.
            tokio::task::yield_now().await;
            continue;
        }
        tokio::select! {
            _ = stream.ready.notified() => {}
            _ = ticker.tick() => {
                if let Ok(sm) = read_state(&api.state) {
                    hub.progress_tick(&sm, &stream);
                }
            }
            _ = stop.changed() => {}
            _ = tx.closed() => break,
        }
    }
    hub.close_stream(&stream);
}

/// The header of a watch response: the revision the hub chose (0 stays 0, as etcd
/// leaves it out of a compaction cancel) plus this member's identity and term.
fn fill(api: &Api, term: u64, header: &mut Option<pb::ResponseHeader>) {
    let h = header.get_or_insert_with(Default::default);
    h.cluster_id = api.identity.cluster_id;
    h.member_id = api.identity.member_id;
    h.raft_term = term;
}
