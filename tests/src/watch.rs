//! A raw etcdserverpb Watch stream for tests: send requests, collect responses with
//! member-specific header fields masked.

use std::time::Duration;

use futures::channel::mpsc;
use futures::StreamExt;
use metastore_proto::etcdserverpb::watch_client::WatchClient;
use metastore_proto::etcdserverpb::{
    watch_request::RequestUnion, WatchCancelRequest, WatchCreateRequest, WatchProgressRequest,
    WatchRequest, WatchResponse,
};
use tonic::transport::Channel;

/// One bidirectional Watch stream.
pub struct RawWatch {
    tx: mpsc::UnboundedSender<WatchRequest>,
    rx: tokio::sync::mpsc::Receiver<Result<WatchResponse, tonic::Status>>,
    task: tokio::task::JoinHandle<()>,
}

impl RawWatch {
    /// Opens a stream on `channel`. The call runs in the background: a gRPC server may
    /// send the response headers only with its first message (grpc-go does), which
    /// comes after the first request. Responses are read from the stream only as fast as
    /// [`RawWatch::next`] takes them, so a test can stop reading.
    pub async fn open(channel: Channel) -> RawWatch {
        let mut client = WatchClient::new(channel).max_decoding_message_size(64 << 20);
        let (tx, rx) = mpsc::unbounded();
        let (out_tx, out_rx) = tokio::sync::mpsc::channel(1);
        let task = tokio::spawn(async move {
            match client.watch(rx).await {
                Ok(resp) => {
                    let mut inbound = resp.into_inner();
                    while let Some(m) = inbound.next().await {
                        if out_tx.send(m).await.is_err() {
                            return;
                        }
                    }
                }
                Err(status) => {
                    let _ = out_tx.send(Err(status)).await;
                }
            }
        });
        RawWatch {
            tx,
            rx: out_rx,
            task,
        }
    }

    pub fn send(&self, r: RequestUnion) {
        self.tx
            .unbounded_send(WatchRequest {
                request_union: Some(r),
            })
            .expect("watch stream closed");
    }

    /// A request with no `request_union` (what an unknown oneof case decodes to).
    pub fn send_empty(&self) {
        self.tx
            .unbounded_send(WatchRequest {
                request_union: None,
            })
            .expect("watch stream closed");
    }

    pub fn create(&self, c: WatchCreateRequest) {
        self.send(RequestUnion::CreateRequest(c));
    }

    pub fn cancel(&self, watch_id: i64) {
        self.send(RequestUnion::CancelRequest(WatchCancelRequest { watch_id }));
    }

    pub fn progress(&self) {
        self.send(RequestUnion::ProgressRequest(WatchProgressRequest {}));
    }

    /// The next response, or None if none arrives within `wait` (or the stream ended).
    pub async fn next(&mut self, wait: Duration) -> Option<WatchResponse> {
        match tokio::time::timeout(wait, self.rx.recv()).await {
            Ok(Some(Ok(r))) => Some(r),
            Ok(Some(Err(status))) => panic!("watch stream failed: {status:?}"),
            Ok(None) | Err(_) => None,
        }
    }

    /// Every response until none arrives for `quiet`.
    pub async fn drain(&mut self, quiet: Duration) -> Vec<WatchResponse> {
        let mut out = Vec::new();
        while let Some(r) = self.next(quiet).await {
            out.push(r);
        }
        out
    }
}

impl Drop for RawWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Zeroes the header fields that differ between two single-member clusters.
pub fn mask(mut r: WatchResponse) -> WatchResponse {
    if let Some(h) = r.header.as_mut() {
        h.cluster_id = 0;
        h.member_id = 0;
        h.raft_term = 0;
    }
    r
}
