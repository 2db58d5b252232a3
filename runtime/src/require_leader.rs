//! etcd's "require leader" gRPC metadata: a client that sends `hasleader: true`
//! (clientv3's `WithRequireLeader`, etcd-client's `ConnectOptions::with_require_leader`)
//! is refused at once with `etcdserver: no leader` while this member knows no leader,
//! instead of waiting out the request timeout; and its open streams (Watch,
//! LeaseKeepAlive, Snapshot) end with that error once the member has had no leader for
//! three election timeouts in a row, so the client moves to a member that has one.
//! This is etcd's gRPC interceptor and `monitorLeader` (v3rpc/interceptor.go).
//!
//! This module owns that check and the end of such streams. It must never alter a
//! request or response of a client that did not ask (no metadata, no wrapping), never
//! end a unary call in flight (etcd only refuses new ones), and it renders its error only
//! through [`crate::status`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tonic::codegen::http;

use crate::replication::Replicator;
use crate::signal as watch;
use crate::status::EtcdError;

/// The metadata key and value clientv3 sends (`rpctypes.MetadataRequireLeaderKey`).
pub const KEY: &str = "hasleader";
pub const VALUE: &str = "true";
/// etcd's `maxNoLeaderCnt`: checks without a leader before open streams are ended.
const MAX_NO_LEADER_CHECKS: u32 = 3;

/// Whether this member knows a leader, and a count of the times it went without one for
/// long enough to end require-leader streams.
#[derive(Clone)]
pub struct LeaderMonitor {
    log: Arc<dyn Replicator>,
    lost: watch::Receiver<u64>,
}

impl LeaderMonitor {
    /// The monitor, and the task that checks once per election timeout until `stop`.
    pub fn spawn(
        log: Arc<dyn Replicator>,
        election_timeout: Duration,
        mut stop: watch::Receiver<bool>,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (lost_tx, lost) = watch::channel(0u64);
        let monitor = Self {
            log: log.clone(),
            lost,
        };
        let task = tokio::spawn(async move {
            let mut without_leader = 0u32;
            loop {
                tokio::select! {
                    biased;
                    _ = stop.wait_for(|s| *s) => return,
                    _ = tokio::time::sleep(election_timeout) => {}
                }
                if log.status().leader == 0 {
                    without_leader += 1;
                } else {
                    without_leader = 0;
                }
                // Like etcd, every check past the limit ends the streams opened since.
                if without_leader >= MAX_NO_LEADER_CHECKS {
                    let epoch = *lost_tx.borrow() + 1;
                    lost_tx.send_replace(epoch);
                }
            }
        });
        (monitor, task)
    }

    fn has_leader(&self) -> bool {
        self.log.status().leader != 0
    }
}

/// The RPCs whose response is a stream etcd's stream interceptor watches.
fn is_stream(path: &str) -> bool {
    matches!(
        path,
        "/etcdserverpb.Watch/Watch"
            | "/etcdserverpb.Lease/LeaseKeepAlive"
            | "/etcdserverpb.Maintenance/Snapshot"
    )
}

fn requires_leader<B>(req: &http::Request<B>) -> bool {
    req.headers()
        .get_all(KEY)
        .iter()
        .next()
        .is_some_and(|v| v.as_bytes() == VALUE.as_bytes())
}

/// A tower layer that applies [`RequireLeader`] to every client request.
#[derive(Clone)]
pub struct RequireLeaderLayer {
    monitor: LeaderMonitor,
}

impl RequireLeaderLayer {
    pub fn new(monitor: LeaderMonitor) -> Self {
        Self { monitor }
    }
}

impl<S> tower_layer::Layer<S> for RequireLeaderLayer {
    type Service = RequireLeader<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequireLeader {
            inner,
            monitor: self.monitor.clone(),
        }
    }
}

/// The service [`RequireLeaderLayer`] builds.
#[derive(Clone)]
pub struct RequireLeader<S> {
    inner: S,
    monitor: LeaderMonitor,
}

type ResponseFuture<E> =
    Pin<Box<dyn Future<Output = Result<http::Response<tonic::body::Body>, E>> + Send>>;

impl<S> tower_service::Service<http::Request<tonic::body::Body>> for RequireLeader<S>
where
    S: tower_service::Service<
        http::Request<tonic::body::Body>,
        Response = http::Response<tonic::body::Body>,
    >,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        if !requires_leader(&req) {
            return Box::pin(self.inner.call(req));
        }
        if !self.monitor.has_leader() {
            let refused = EtcdError::NoLeader.status().into_http();
            return Box::pin(std::future::ready(Ok(refused)));
        }
        if !is_stream(req.uri().path()) {
            return Box::pin(self.inner.call(req));
        }
        let mut lost = self.monitor.lost.clone();
        // Only a loss after the stream opened ends it.
        lost.borrow_and_update();
        let response = self.inner.call(req);
        Box::pin(async move {
            let response = response.await?;
            let ended = Box::pin(async move {
                // A closed monitor means the member is stopping: the server ends the
                // stream itself then.
                if lost.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            });
            Ok(response.map(|body| {
                tonic::body::Body::new(LeaderBoundBody {
                    inner: body,
                    ended: Some(ended),
                })
            }))
        })
    }
}

/// A response stream that ends with `etcdserver: no leader` when the member loses its
/// leader for too long.
struct LeaderBoundBody {
    inner: tonic::body::Body,
    /// Resolves when the stream must end; `None` once it has.
    ended: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl Body for LeaderBoundBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let Some(ended) = self.ended.as_mut() else {
            return Poll::Ready(None);
        };
        if ended.as_mut().poll(cx).is_ready() {
            self.ended = None;
            let mut trailers = http::HeaderMap::new();
            // Cannot fail: the message is plain ASCII.
            let _ = EtcdError::NoLeader.status().add_header(&mut trailers);
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.ended = None,
            Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => self.ended = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.ended.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
