//! etcd's Watch service: one bidirectional stream carrying many watchers.
//!
//! This module owns the two halves of a stream: the receiver, which turns create,
//! cancel and progress requests into hub calls (and stops reading while the stream's
//! outgoing queue is full, so a client that writes without reading cannot grow memory),
//! and the response stream gRPC polls, which drains the stream's queue, fills headers,
//! splits fragmented responses, runs history catch-up when the queue is empty, and sends
//! the periodic progress notifications. It must never decide which events a watcher sees
//! (that is the hub's and core's business) and never block the log.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::signal as watch;
use futures::Stream;
use metastore_proto::etcdserverpb as pb;
use metastore_proto::etcdserverpb::watch_server::Watch;
use tonic::{Request, Response, Status, Streaming};

use super::Api;
use crate::replication::read_state;
use crate::watch::{fragments, Outgoing, StreamQueue, WatchHub, WatchSpec};

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
    /// Starts the receiving half as a task and returns the sending half.
    fn open(&self, request: Request<Streaming<pb::WatchRequest>>) -> ResponseStream {
        let inbound = request.into_inner();
        let stream = self.hub.open_stream();
        tokio::spawn(receive(
            inbound,
            self.api.clone(),
            self.hub.clone(),
            stream.clone(),
        ));
        let mut ticker = tokio::time::interval_at(
            tokio::time::Instant::now() + self.progress_interval,
            self.progress_interval,
        );
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stop = self.stop.clone();
        Box::pin(Outbound {
            api: self.api.clone(),
            hub: self.hub.clone(),
            stream,
            pending: VecDeque::new(),
            ticker,
            stop: Box::pin(async move {
                let _ = stop.wait_for(|s| *s).await;
            }),
            done: false,
        })
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
        // `biased`: an unbiased select draws from tokio's per-thread RNG, whose seed
        // depends on a process-wide counter, so simulation runs would not replay.
        let message = tokio::select! {
            biased;
            _ = stream.wait_closed() => return,
            m = inbound.message() => m,
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

/// The sending half, polled by gRPC itself: drains the stream's queue in order, catching
/// up unsynced watchers whenever the queue is empty, sending the periodic progress
/// notifications, until the client goes away (then it is dropped) or the member stops.
struct Outbound {
    api: Arc<Api>,
    hub: Arc<WatchHub>,
    stream: Arc<StreamQueue>,
    /// Responses taken from the queue (and split into fragments) but not yet sent; at
    /// most one batch.
    pending: VecDeque<pb::WatchResponse>,
    ticker: tokio::time::Interval,
    stop: Pin<Box<dyn Future<Output = ()> + Send>>,
    done: bool,
}

impl Stream for Outbound {
    type Item = Result<pb::WatchResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if this.stop.as_mut().poll(cx).is_ready() || this.stream.is_closed() {
            this.finish();
            return Poll::Ready(None);
        }
        loop {
            if let Some(r) = this.pending.pop_front() {
                return Poll::Ready(Some(Ok(r)));
            }
            // Register before looking, so a push after the look wakes us.
            this.stream.register(cx.waker());
            let batch = this.stream.pop_many(SEND_BATCH, SEND_BATCH_BYTES);
            if !batch.is_empty() {
                let term = this.api.log.status().term;
                let max_bytes = this.api.limits.max_request_bytes;
                for Outgoing { response, fragment } in batch {
                    let pieces = if fragment {
                        fragments(response, max_bytes)
                    } else {
                        vec![response]
                    };
                    for mut piece in pieces {
                        fill(&this.api, term, &mut piece.header);
                        this.pending.push_back(piece);
                    }
                }
                continue;
            }
            if this.stream.has_unsynced() {
                let caught_up = match read_state(&this.api.state) {
                    Ok(sm) => {
                        this.hub.catch_up(&sm, &this.stream);
                        true
                    }
                    Err(_) => false,
                };
                if !caught_up {
                    this.finish();
                    return Poll::Ready(None);
                }
                if this.stream.queued_bytes() > 0 {
                    continue;
                }
                // Nothing to send yet (every event filtered out): come back soon
                // without starving the connection's other streams.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            if this.ticker.poll_tick(cx).is_ready() {
                if let Ok(sm) = read_state(&this.api.state) {
                    this.hub.progress_tick(&sm, &this.stream);
                }
                continue;
            }
            return Poll::Pending;
        }
    }
}

impl Outbound {
    fn finish(&mut self) {
        self.done = true;
        self.hub.close_stream(&self.stream);
    }
}

impl Drop for Outbound {
    /// The client went away (or the member stopped): forget the stream's watchers.
    fn drop(&mut self) {
        if !self.done {
            self.finish();
        }
    }
}

/// The header of a watch response: the revision the hub chose (0 stays 0, as etcd
/// leaves it out of a compaction cancel) plus this member's identity and term.
fn fill(api: &Api, term: u64, header: &mut Option<pb::ResponseHeader>) {
    let h = header.get_or_insert_with(Default::default);
    h.cluster_id = api.identity.cluster_id;
    h.member_id = api.identity.member_id;
    h.raft_term = term;
}
