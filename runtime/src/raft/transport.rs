//! The peer transport: raft messages between members over a gRPC stream per ordered pair.
//!
//! This module owns connections to peers (lazy, with reconnection and capped backoff),
//! chunking of large messages (snapshots), and the receiving `Peer` service. It must never
//! block the raft driver: sending is a `try_send` into a bounded per-peer queue, and a
//! full queue or a dead peer drops messages (raft retransmits) and reports the peer
//! unreachable, so one member being down does not slow the others. It must never deliver
//! a message from another cluster or one addressed to another member.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use metastore_proto::metastore::peer_client::PeerClient;
use metastore_proto::metastore::peer_server::Peer;
use metastore_proto::metastore::{ClusterInfo, ClusterInfoRequest, PeerAck, PeerMessage};
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use raft::SnapshotStatus;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use super::Input;

/// A raft message is cut into chunks of at most this size on the wire.
const CHUNK_BYTES: usize = 1 << 20;
/// Messages queued for one peer before new ones are dropped.
const PEER_QUEUE: usize = 4096;
/// The largest raft message a member accepts (a snapshot is one message).
const MAX_MESSAGE_BYTES: usize = 8 << 30;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Per peer: its URLs and the queue of its sending task.
type Peers = HashMap<u64, (Vec<String>, mpsc::Sender<Message>)>;

/// Senders to every other member. Clones share the peers: the raft loop sends what may
/// leave at once, the log writer what must wait until its entries are durable.
#[derive(Clone)]
pub struct Transport {
    member_id: u64,
    cluster_id: u64,
    peers: Arc<RwLock<Peers>>,
    inbox: mpsc::Sender<Input>,
}

impl Transport {
    pub fn new(member_id: u64, cluster_id: u64, inbox: mpsc::Sender<Input>) -> Self {
        Self {
            member_id,
            cluster_id,
            peers: Arc::default(),
            inbox,
        }
    }

    /// Makes the set of peers `peers` (member ID → peer URLs, self excluded): starts a
    /// sending task for each new peer or changed URLs; a dropped peer's task ends when
    /// its queue closes.
    pub fn set_peers(&mut self, peers: HashMap<u64, Vec<String>>) {
        // Only this method writes; a poisoned lock means a sender panicked mid-send,
        // which leaves the map whole.
        let mut current = self.peers.write().unwrap_or_else(|p| p.into_inner());
        current.retain(|id, (urls, _)| peers.get(id).is_some_and(|u| u == urls));
        for (id, urls) in peers {
            if current.contains_key(&id) {
                continue;
            }
            let (tx, rx) = mpsc::channel(PEER_QUEUE);
            tokio::spawn(send_loop(
                Link {
                    from: self.member_id,
                    to: id,
                    cluster_id: self.cluster_id,
                    urls: urls.clone(),
                    inbox: self.inbox.clone(),
                },
                rx,
            ));
            current.insert(id, (urls, tx));
        }
    }

    /// Queues messages for their peers; never waits.
    pub fn send(&self, messages: Vec<Message>) {
        if messages.is_empty() {
            return;
        }
        let peers = self.peers.read().unwrap_or_else(|p| p.into_inner());
        for m in messages {
            let to = m.to;
            let snapshot = m.get_msg_type() == MessageType::MsgSnapshot;
            let queued = match peers.get(&to) {
                Some((_, tx)) => tx.try_send(m).is_ok(),
                None => false,
            };
            if !queued {
                let _ = self.inbox.try_send(Input::Unreachable(to));
                if snapshot {
                    let _ = self
                        .inbox
                        .try_send(Input::SnapshotStatus(to, SnapshotStatus::Failure));
                }
            }
        }
    }
}

struct Link {
    from: u64,
    to: u64,
    cluster_id: u64,
    urls: Vec<String>,
    inbox: mpsc::Sender<Input>,
}

impl Link {
    fn failed(&self, message: &Message) {
        let _ = self.inbox.try_send(Input::Unreachable(self.to));
        if message.get_msg_type() == MessageType::MsgSnapshot {
            let _ = self
                .inbox
                .try_send(Input::SnapshotStatus(self.to, SnapshotStatus::Failure));
        }
    }

    async fn connect(&self) -> Option<PeerClient<tonic::transport::Channel>> {
        for url in &self.urls {
            let Ok(endpoint) = tonic::transport::Endpoint::from_shared(url.clone()) else {
                continue;
            };
            let endpoint = endpoint.connect_timeout(CONNECT_TIMEOUT).tcp_nodelay(true);
            if let Ok(channel) = endpoint.connect().await {
                return Some(
                    PeerClient::new(channel)
                        .max_encoding_message_size(usize::MAX)
                        .max_decoding_message_size(usize::MAX),
                );
            }
        }
        None
    }
}

/// Asks the members at `urls` for the cluster this member is joining; the first answer
/// wins. Used once, by a member started with `--initial-cluster-state existing` and no
/// state of its own.
pub async fn fetch_cluster(urls: &[String]) -> Option<ClusterInfo> {
    for url in urls {
        let Ok(endpoint) = tonic::transport::Endpoint::from_shared(url.clone()) else {
            continue;
        };
        let Ok(channel) = endpoint.connect_timeout(CONNECT_TIMEOUT).connect().await else {
            continue;
        };
        let mut client = PeerClient::new(channel);
        let call = client.cluster(ClusterInfoRequest {});
        if let Ok(Ok(info)) = tokio::time::timeout(Duration::from_secs(3), call).await {
            return Some(info.into_inner());
        }
    }
    None
}

/// Sends one peer's messages, reconnecting with backoff when the stream breaks.
async fn send_loop(link: Link, mut queue: mpsc::Receiver<Message>) {
    let mut backoff = Duration::from_millis(50);
    let mut pending: Option<Message> = None;
    loop {
        let first = match pending.take() {
            Some(m) => m,
            None => match queue.recv().await {
                Some(m) => m,
                None => return,
            },
        };
        let Some(mut client) = link.connect().await else {
            link.failed(&first);
            // Whatever queued up meanwhile is stale; raft will resend what matters.
            while let Ok(m) = queue.try_recv() {
                link.failed(&m);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
            continue;
        };
        backoff = Duration::from_millis(50);
        let (tx, rx) = mpsc::channel::<PeerMessage>(64);
        let call = tokio::spawn(async move {
            client
                .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        });
        let mut next = Some(first);
        loop {
            let message = match next.take() {
                Some(m) => m,
                None => match queue.recv().await {
                    Some(m) => m,
                    None => {
                        call.abort();
                        return;
                    }
                },
            };
            if !send_chunks(&link, &tx, &message).await {
                link.failed(&message);
                break;
            }
            if message.get_msg_type() == MessageType::MsgSnapshot {
                let _ = link
                    .inbox
                    .send(Input::SnapshotStatus(link.to, SnapshotStatus::Finish))
                    .await;
            }
        }
        call.abort();
        tokio::time::sleep(backoff).await;
    }
}

async fn send_chunks(link: &Link, tx: &mpsc::Sender<PeerMessage>, message: &Message) -> bool {
    let Ok(bytes) = message.write_to_bytes() else {
        return false;
    };
    let mut chunks = bytes.chunks(CHUNK_BYTES).peekable();
    if chunks.peek().is_none() {
        return tx
            .send(PeerMessage {
                cluster_id: link.cluster_id,
                from: link.from,
                chunk: Vec::new(),
                more: false,
            })
            .await
            .is_ok();
    }
    while let Some(chunk) = chunks.next() {
        let more = chunks.peek().is_some();
        let sent = tx
            .send(PeerMessage {
                cluster_id: link.cluster_id,
                from: link.from,
                chunk: chunk.to_vec(),
                more,
            })
            .await;
        if sent.is_err() {
            return false;
        }
    }
    true
}

/// The receiving side: reassembles messages and steps them into the local raft node, and
/// tells a joining member which cluster it joins.
pub struct PeerService {
    pub member_id: u64,
    pub cluster_id: u64,
    pub inbox: mpsc::Sender<Input>,
    pub state: crate::replication::SharedState,
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn cluster(
        &self,
        _request: Request<ClusterInfoRequest>,
    ) -> Result<Response<ClusterInfo>, Status> {
        let members = crate::replication::read_state(&self.state)
            .map_err(Status::from)?
            .members()
            .map_err(|e| Status::from(crate::error::Error::Core(e)))?;
        Ok(Response::new(ClusterInfo {
            cluster_id: self.cluster_id,
            members,
        }))
    }

    async fn stream(
        &self,
        request: Request<Streaming<PeerMessage>>,
    ) -> Result<Response<PeerAck>, Status> {
        let mut stream = request.into_inner();
        let mut buffer = Vec::new();
        while let Some(part) = stream.message().await? {
            if part.cluster_id != self.cluster_id {
                return Err(Status::failed_precondition(format!(
                    "cluster ID mismatch: this member is in cluster {:x}, the sender {:x} in {:x}",
                    self.cluster_id, part.from, part.cluster_id
                )));
            }
            if buffer.len() + part.chunk.len() > MAX_MESSAGE_BYTES {
                return Err(Status::resource_exhausted("raft message too large"));
            }
            buffer.extend_from_slice(&part.chunk);
            if part.more {
                continue;
            }
            let message = Message::parse_from_bytes(&buffer)
                .map_err(|e| Status::invalid_argument(format!("undecodable raft message: {e}")))?;
            buffer.clear();
            if message.to != self.member_id || message.from != part.from {
                continue;
            }
            if self.inbox.send(Input::Step(message)).await.is_err() {
                return Err(Status::unavailable("member stopping"));
            }
        }
        Ok(Response::new(PeerAck {}))
    }
}
