//! The Raft-replicated log: the [`Replicator`] every member runs, driving raft-rs's
//! `RawNode` over the member's engine and the peer transport.
//!
//! This module owns the raft loop: ticks, proposals, `Ready` handling, the apply of
//! committed entries to the state machine in log order, ReadIndex for linearizable reads
//! (one raft round shared by every reader that queued before it), log compaction and
//! snapshot install. Entries and hard state are made durable by the log writer
//! ([`persist`]) behind the loop, which goes on proposing and applying meanwhile; raft
//! hands out for apply only entries the writer reported durable.
//!
//! It must never answer a proposer before its entry is committed and applied, never
//! apply an entry twice or out of order (the state machine's applied index is the fence),
//! never apply an entry before it is durable in the log, never remove from the log an
//! entry whose applied state is not yet durable (the state machine writes volatile
//! batches, see `storage::Engine::for_state_machine`: a crash loses them and the log
//! replays them, so log compaction, snapshot install and conf state writes flush the
//! engine first), and never block on the network: messages go out through
//! [`transport::Transport`]'s bounded queues. Applied state may become durable (by a
//! flush) ahead of the hard state's commit index, which the writer may not have written
//! yet: every applied entry is committed and durable in the log, so a restart clamps
//! raft's applied index to the stored commit and the state machine skips the entries it
//! already holds when raft hands them out again.

mod logger;
mod persist;
pub mod storage;
pub mod transport;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use metastore_core::{ApplyResponse, Backend, WriteBatch};
use metastore_proto::etcdserverpb as pb;
use metastore_proto::metastore::internal_request::Request as Envelope;
use metastore_proto::metastore::member_change::Change;
use metastore_proto::metastore::{InternalRequest, MemberChange};
use prost::Message as _;
use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType, Message, Snapshot,
};
use raft::{RawNode, Ready, SnapshotStatus, StateRole};
use tokio::sync::{mpsc, oneshot};

use crate::signal as watch;

use crate::blocking;
use crate::error::{ClusterError, Error, Result};
use crate::replication::{read_state, EventSink, ReplicaStatus, Replicator, SharedState};
use persist::{Persister, Report};
use storage::RaftStorage;
use transport::Transport;

/// What the raft loop is asked to do.
pub enum Input {
    Propose(InternalRequest, oneshot::Sender<Result<ApplyResponse>>),
    /// A linearizable read wants to know when the local state is current.
    Read(oneshot::Sender<Result<()>>),
    Step(Message),
    Unreachable(u64),
    SnapshotStatus(u64, SnapshotStatus),
    ChangeMembers(MemberChange, oneshot::Sender<Result<ApplyResponse>>),
    MoveLeader(u64, oneshot::Sender<Result<()>>),
    /// The background engine flush that log compaction waits for is done: the log may
    /// forget the entries up to this index (or the flush failed).
    Flushed(u64, std::result::Result<(), String>),
    Close(oneshot::Sender<()>),
}

/// How a member runs raft.
#[derive(Debug, Clone)]
pub struct RaftConfig {
    /// Seeds the request ID generator and stamps proposals (never used for timing).
    pub wall_clock: Arc<dyn crate::clock::WallClock>,
    pub member_id: u64,
    pub cluster_id: u64,
    /// The initial cluster: every member's name and peer URLs, this one's included. A
    /// new cluster starts with them; a joining member reaches the cluster through them.
    pub members: HashMap<u64, (String, Vec<String>)>,
    /// This member's name and client URLs, published to the others through the log.
    pub attributes: pb::Member,
    /// Start a new cluster from `members` when the log is empty (`--initial-cluster-state
    /// new`); otherwise wait to be sent the cluster's state.
    pub bootstrap: bool,
    pub heartbeat: Duration,
    pub election_ticks: usize,
    pub snapshot_count: u64,
    /// etcd's request timeout: how long a proposal or a read may wait for the cluster.
    pub request_timeout: Duration,
}

impl RaftConfig {
    /// etcd's `ReqTimeout`: 5 s plus two election timeouts.
    pub fn request_timeout_for(election_timeout: Duration) -> Duration {
        Duration::from_secs(5) + 2 * election_timeout
    }
}

/// The term a freshly bootstrapped etcd member starts in (its bootstrap entries are in
/// term 1), so the first election makes term 2, as with etcd.
const BOOTSTRAP_TERM: u64 = 1;
/// Entries kept behind a log compaction so a slightly lagging follower catches up from
/// the log, not a snapshot (etcd's `SnapshotCatchUpEntries`, capped by the snapshot
/// count so small `--snapshot-count` values take effect).
const CATCH_UP_ENTRIES: u64 = 5000;
/// Inputs handled per loop turn before raft's `Ready` is processed.
const MAX_INPUTS_PER_TURN: usize = 4096;
const INBOX_DEPTH: usize = 16384;

struct Shared {
    member_id: u64,
    leader: AtomicU64,
    term: AtomicU64,
    commit_index: AtomicU64,
    applied_index: AtomicU64,
    is_learner: AtomicBool,
    stopped: AtomicBool,
    fatal: watch::Sender<Option<String>>,
    next_id: AtomicU64,
}

impl Shared {
    fn fail(&self, why: String) {
        tracing::error!(error = %why, "raft stopped after a fatal failure");
        self.stopped.store(true, Ordering::SeqCst);
        self.fatal.send_replace(Some(why));
    }
}

/// A member's handle on its raft group.
pub struct RaftNode {
    inbox: mpsc::Sender<Input>,
    shared: Arc<Shared>,
    request_timeout: Duration,
    /// Transport and its peer service share the inbox; kept here for `peer_service`.
    cluster_id: u64,
    state: SharedState,
}

impl RaftNode {
    /// Opens the raft log over `engine`, replays what the state machine has not applied,
    /// and starts the raft loop and the transport. Must be called inside a tokio runtime.
    pub fn open(
        config: RaftConfig,
        state: SharedState,
        engine: Arc<dyn Backend>,
        events: Arc<dyn EventSink>,
    ) -> Result<Self> {
        let mut voters: Vec<u64> = config.members.keys().copied().collect();
        voters.sort_unstable();
        let bootstrap = config.bootstrap.then(|| {
            let cs = ConfState {
                voters: voters.clone(),
                ..Default::default()
            };
            (cs, BOOTSTRAP_TERM)
        });
        if config.bootstrap {
            // The initial members are state, recorded as applied at the index the raft
            // log starts after, so a member added later gets them in a snapshot.
            let mut initial: Vec<pb::Member> = config
                .members
                .iter()
                .map(|(id, (name, urls))| pb::Member {
                    id: *id,
                    name: name.clone(),
                    peer_ur_ls: urls.clone(),
                    client_ur_ls: Vec::new(),
                    is_learner: false,
                })
                .collect();
            initial.sort_by_key(|m| m.id);
            state
                .write()
                .map_err(|_| Error::Stopped)?
                .bootstrap_members(storage::BOOTSTRAP_INDEX, &initial)?;
            read_state(&state)?.backend().write_pending()?;
        }
        let storage = RaftStorage::open(engine.clone(), state.clone(), bootstrap)?;
        let applied = read_state(&state)?.applied_index();
        // The applied state is never durable ahead of the persisted commit index (see the
        // module invariant), but an engine restored from an older snapshot could be; raft
        // asserts applied <= commit.
        let commit = storage.hard_state().commit;
        let applied = applied.min(commit.max(storage.first().saturating_sub(1)));
        let raft_config = raft::Config {
            id: config.member_id,
            election_tick: config.election_ticks,
            heartbeat_tick: 1,
            applied,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            check_quorum: true,
            pre_vote: true,
            read_only_option: raft::ReadOnlyOption::Safe,
            ..Default::default()
        };
        raft_config
            .validate()
            .map_err(|e| Error::Internal(format!("raft config: {e}")))?;
        let sole_voter = storage.conf_state().voters == [config.member_id]
            && storage.conf_state().learners.is_empty();
        let mut node = RawNode::new(&raft_config, storage, &logger::logger(config.member_id))
            .map_err(|e| Error::Storage(format!("starting raft: {e}")))?;
        if sole_voter {
            // Nobody else could win: don't wait out an election timeout.
            let _ = node.campaign();
        }

        let (fatal, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            member_id: config.member_id,
            leader: AtomicU64::new(0),
            term: AtomicU64::new(node.raft.term),
            commit_index: AtomicU64::new(node.raft.raft_log.committed),
            applied_index: AtomicU64::new(applied),
            is_learner: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            fatal,
            // etcd's request ID generator: the low 16 bits of the member ID on top, then
            // the start time in milliseconds, then a counter, so IDs stay unique across
            // restarts.
            next_id: AtomicU64::new(
                (config.member_id & 0xffff) << 48
                    | ((config.wall_clock.unix_nanos() as u64 / 1_000_000) << 8 & ((1 << 48) - 1)),
            ),
        });
        let (tx, rx) = mpsc::channel(INBOX_DEPTH);
        let initial_peers: HashMap<u64, Vec<String>> = config
            .members
            .iter()
            .map(|(id, (_, urls))| (*id, urls.clone()))
            .collect();
        let transport = Transport::new(config.member_id, config.cluster_id, tx.clone());
        let (persister, reports) = Persister::start(engine.clone(), transport.clone())
            .map_err(|e| Error::Internal(format!("starting the raft log writer: {e}")))?;
        let peer_state = state.clone();
        let mut driver = Driver {
            node,
            state,
            engine,
            events,
            shared: shared.clone(),
            transport,
            persister,
            last_ready: 0,
            waiters: HashMap::new(),
            stalled: Vec::new(),
            reads: Reads::default(),
            snapshot_count: config.snapshot_count,
            compacted_at: applied,
            compaction: Compaction::Idle,
            inbox: tx.clone(),
            election_ticks: config.election_ticks as u64,
            ticks: 0,
            initial_peers,
            transfer: None,
            attributes: config.attributes.clone(),
            attributes_proposed_at: None,
            wall_clock: config.wall_clock.clone(),
            #[cfg(madsim)]
            election_salt: tokio::madsim::rand::random(),
        };
        driver.refresh_peers()?;
        tokio::spawn(run(driver, rx, reports, config.heartbeat));
        Ok(Self {
            state: peer_state,
            inbox: tx,
            shared,
            request_timeout: config.request_timeout,
            cluster_id: config.cluster_id,
        })
    }

    /// Waits (up to `limit`) until this member leads; true if it does. A member that is
    /// its cluster's only voter elects itself at once, so waiting lets it serve its first
    /// request as the leader, as etcd does.
    pub async fn wait_leader(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while !self.is_leader() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        true
    }

    /// The gRPC service peers send raft messages to.
    pub fn peer_service(&self) -> transport::PeerService {
        transport::PeerService {
            member_id: self.shared.member_id,
            cluster_id: self.cluster_id,
            inbox: self.inbox.clone(),
            state: self.state.clone(),
        }
    }

    /// Stops the raft loop after the inputs already queued. Later calls fail with
    /// `Error::Stopped`.
    pub async fn close(&self) {
        let (ack, done) = oneshot::channel();
        if self.inbox.send(Input::Close(ack)).await.is_ok() {
            let _ = done.await;
        }
        self.shared.stopped.store(true, Ordering::SeqCst);
    }

    pub fn fatal(&self) -> watch::Receiver<Option<String>> {
        self.shared.fatal.subscribe()
    }
}

impl RaftNode {
    /// Hands an input carrying a reply channel to the raft loop and waits for the answer,
    /// at most the request timeout; `timed_out` says what a timeout means for this input.
    fn ask<T: Send + 'static>(
        &self,
        input: impl FnOnce(oneshot::Sender<Result<T>>) -> Input + Send + 'static,
        timed_out: impl FnOnce(&Shared) -> Error + Send + 'static,
    ) -> BoxFuture<'static, Result<T>> {
        let inbox = self.inbox.clone();
        let timeout = self.request_timeout;
        let shared = self.shared.clone();
        Box::pin(async move {
            let (reply, answer) = oneshot::channel();
            inbox.send(input(reply)).await.map_err(|_| Error::Stopped)?;
            match tokio::time::timeout(timeout, answer).await {
                // A dropped reply means the raft loop stopped with the input in hand.
                Ok(answer) => answer.map_err(|_| Error::Stopped)?,
                Err(_) => Err(timed_out(&shared)),
            }
        })
    }
}

impl Replicator for RaftNode {
    fn propose(&self, mut request: InternalRequest) -> BoxFuture<'static, Result<ApplyResponse>> {
        // One ID space per member for everything it proposes (requests, configuration
        // changes, attributes): a waiter is found by the ID its entry carries.
        let header = request.header.get_or_insert_with(Default::default);
        header.id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        self.ask(
            |reply| Input::Propose(request, reply),
            |shared| {
                if shared.leader.load(Ordering::SeqCst) == 0 {
                    // Still no leader: the proposal never left this member (etcd's raft
                    // holds it the same way, and its request ends with the deadline).
                    Error::ProposalDeadline
                } else {
                    Error::Timeout
                }
            },
        )
    }

    fn read_barrier(&self) -> BoxFuture<'static, Result<()>> {
        self.ask(Input::Read, |_| Error::Timeout)
    }

    fn status(&self) -> ReplicaStatus {
        ReplicaStatus {
            leader: self.shared.leader.load(Ordering::SeqCst),
            term: self.shared.term.load(Ordering::SeqCst),
            commit_index: self.shared.commit_index.load(Ordering::SeqCst),
            applied_index: self.shared.applied_index.load(Ordering::SeqCst),
            is_learner: self.shared.is_learner.load(Ordering::SeqCst),
        }
    }

    fn is_leader(&self) -> bool {
        self.shared.leader.load(Ordering::SeqCst) == self.shared.member_id
            && !self.shared.stopped.load(Ordering::SeqCst)
    }

    fn change_members(&self, change: MemberChange) -> BoxFuture<'static, Result<ApplyResponse>> {
        self.ask(
            |reply| Input::ChangeMembers(change, reply),
            |_| Error::Timeout,
        )
    }

    fn move_leader(&self, target: u64) -> BoxFuture<'static, Result<()>> {
        self.ask(
            move |reply| Input::MoveLeader(target, reply),
            |_| ClusterError::LeaderTransferTimeout.into(),
        )
    }
}

type Readers = Vec<oneshot::Sender<Result<()>>>;

/// Linearizable readers waiting on ReadIndex rounds.
#[derive(Default)]
struct Reads {
    /// Arrived since the current round was issued: they need the next round.
    queued: Readers,
    /// The round in flight: its context, its readers, and the tick it was issued at.
    inflight: Option<(u64, Readers, u64)>,
    /// Rounds answered by raft, waiting for the apply index to reach theirs.
    confirmed: VecDeque<(u64, Readers)>,
    next_ctx: u64,
}

/// Where the raft log compaction is: it waits for a background flush of the engine.
enum Compaction {
    Idle,
    /// A flush is running; it reports back with the index it covers (`Input::Flushed`).
    Flushing,
    /// The flush is done: these entries may go at the next Ready.
    Ready(u64),
    /// The flush failed; the next Ready stops the member with this.
    Failed(String),
}

struct Driver {
    node: RawNode<RaftStorage>,
    state: SharedState,
    engine: Arc<dyn Backend>,
    events: Arc<dyn EventSink>,
    shared: Arc<Shared>,
    transport: Transport,
    /// Writes each `Ready`'s entries and hard state, in order, behind the loop.
    persister: Persister,
    /// The number of the newest `Ready` handled.
    last_ready: u64,
    /// Local proposers by request ID, answered when their entry is applied here.
    waiters: HashMap<u64, oneshot::Sender<Result<ApplyResponse>>>,
    /// Proposals raft refused for lack of a leader; retried when one is known.
    stalled: Vec<(u64, Vec<u8>)>,
    reads: Reads,
    snapshot_count: u64,
    /// The applied index at the last raft log compaction (or where this run started).
    compacted_at: u64,
    compaction: Compaction,
    /// This loop's own inbox, for the background flush to report back.
    inbox: mpsc::Sender<Input>,
    election_ticks: u64,
    ticks: u64,
    /// Peer URLs from the flags, used until the member set is known from the state.
    initial_peers: HashMap<u64, Vec<String>>,
    /// A MoveLeader in progress: its target, its caller, and the tick it gives up at.
    transfer: Option<(u64, oneshot::Sender<Result<()>>, u64)>,
    /// This member's name and client URLs, and when they were last proposed.
    attributes: pb::Member,
    attributes_proposed_at: Option<u64>,
    wall_clock: Arc<dyn crate::clock::WallClock>,
    /// Simulation only: this member's share of the seed for election timeouts.
    #[cfg(madsim)]
    election_salt: u64,
}

async fn run(
    mut driver: Driver,
    mut inbox: mpsc::Receiver<Input>,
    mut reports: mpsc::UnboundedReceiver<Report>,
    heartbeat: Duration,
) {
    let mut ticker = tokio::time::interval(heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut closing = None;
    let shared = driver.shared.clone();
    // A Ready left over from the last turn: the next turn must not wait for an input.
    let mut leftover = false;
    'turns: loop {
        // `biased` (replayable under simulation: see api::watch); the ticker goes first
        // because it is rarely ready, so a busy inbox cannot starve it, and the writer's
        // reports before new inputs, because they release applies and answers.
        tokio::select! {
            biased;
            _ = ticker.tick() => driver.tick(),
            report = reports.recv() => {
                let Some(report) = report else {
                    shared.fail("the raft log writer stopped".into());
                    break;
                };
                if let Err(e) = driver.on_report(report) {
                    shared.fail(e.to_string());
                    break;
                }
            }
            input = inbox.recv() => {
                let Some(input) = input else { break };
                if let Some(ack) = driver.handle(input) {
                    closing = Some(ack);
                }
                let mut handled = 1;
                while closing.is_none() && handled < MAX_INPUTS_PER_TURN {
                    match inbox.try_recv() {
                        Ok(input) => {
                            if let Some(ack) = driver.handle(input) {
                                closing = Some(ack);
                            }
                            handled += 1;
                        }
                        Err(_) => break,
                    }
                }
            }
            _ = std::future::ready(()), if leftover => {}
        }
        while let Ok(report) = reports.try_recv() {
            if let Err(e) = driver.on_report(report) {
                shared.fail(e.to_string());
                break 'turns;
            }
        }
        // A handled Ready can leave another behind (raft's own follow-up messages); a
        // few rounds, then whatever else is ready (the next turn comes straight back).
        for _ in 0..4 {
            if !driver.node.has_ready() {
                break;
            }
            let ready = driver.node.ready();
            let result = if in_order(&ready) {
                driver.on_ready(ready)
            } else {
                // A snapshot to install or a membership change to apply: done as before
                // the writer existed, once everything queued is written, on a blocking
                // thread (installing and flushing take a while).
                driver.persister.barrier().await;
                let done = blocking(move || {
                    let result = driver.on_ready_in_place(ready);
                    (driver, result)
                })
                .await;
                match done {
                    Ok((d, result)) => {
                        driver = d;
                        result
                    }
                    Err(why) => {
                        shared.fail(format!("raft loop panicked: {why}"));
                        // The driver went with the panic; nothing is left to write.
                        shared.stopped.store(true, Ordering::SeqCst);
                        refuse_queued(inbox, closing);
                        return;
                    }
                }
            };
            if let Err(e) = result {
                shared.fail(e.to_string());
                break 'turns;
            }
        }
        if closing.is_some() {
            break;
        }
        leftover = driver.node.has_ready();
    }
    shared.stopped.store(true, Ordering::SeqCst);
    // What was acknowledged to peers or queued before the stop reaches the engine before
    // the member reports itself closed (a restart reopens the same engine).
    driver.persister.barrier().await;
    refuse_queued(inbox, closing);
}

/// Answers what is still queued for a stopped loop, then the close request if any.
fn refuse_queued(mut inbox: mpsc::Receiver<Input>, closing: Option<oneshot::Sender<()>>) {
    inbox.close();
    while let Ok(input) = inbox.try_recv() {
        match input {
            Input::Propose(_, reply) => {
                let _ = reply.send(Err(Error::Stopped));
            }
            Input::Read(reply) => {
                let _ = reply.send(Err(Error::Stopped));
            }
            Input::Close(ack) => {
                let _ = ack.send(());
            }
            _ => {}
        }
    }
    if let Some(ack) = closing {
        let _ = ack.send(());
    }
}

/// Whether `ready` can be handled by the loop with its writes queued to the log writer:
/// anything but a snapshot to install or a membership change to apply, which are handled
/// in place once the writer has caught up (both flush the engine and rewrite raft's
/// configuration, which must not race queued writes).
fn in_order(ready: &Ready) -> bool {
    ready.snapshot().is_empty()
        && ready
            .committed_entries()
            .iter()
            .all(|e| e.get_entry_type() == EntryType::EntryNormal)
}

impl Driver {
    /// raft-rs draws each randomized election timeout from `rand::thread_rng()`, which
    /// seeds itself with a raw `getrandom` syscall that madsim cannot intercept, so under
    /// simulation elections would not replay from the seed. Before every tick the
    /// timeout is replaced by one derived from the seed, the term, the role and the
    /// current election period: still spread over raft's range, different per member
    /// and per term, and the same on every replay.
    #[cfg(madsim)]
    fn pin_election_timeout(&mut self) {
        let raft = &mut self.node.raft;
        let min = raft.election_timeout();
        let span = min as u64; // raft-rs draws from [min, 2 * min)
        let role = raft.state as u64;
        let mut x = self.election_salt
            ^ raft.term.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ role.wrapping_mul(0xBF58_476D_1CE4_E5B9)
            ^ (self.ticks / self.election_ticks.max(1)).wrapping_mul(0x94D0_49BB_1331_11EB);
        // splitmix64's finaliser: spreads every input bit over the result.
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^= x >> 31;
        raft.set_randomized_election_timeout(min + (x % span.max(1)) as usize);
    }

    fn tick(&mut self) {
        self.ticks += 1;
        #[cfg(madsim)]
        self.pin_election_timeout();
        self.node.tick();
        let leader = self.node.raft.leader_id;
        if leader != 0 && !self.stalled.is_empty() {
            for (id, data) in std::mem::take(&mut self.stalled) {
                // A proposer that gave up (timed out) takes its proposal with it.
                if self.waiters.get(&id).is_none_or(|w| w.is_closed()) {
                    self.waiters.remove(&id);
                    continue;
                }
                if self.node.propose(Vec::new(), data.clone()).is_err() {
                    self.stalled.push((id, data));
                }
            }
        }
        // A ReadIndex round can be lost (no leader, a dropped message): ask again.
        if let Some((_, _, issued)) = &self.reads.inflight {
            if self.ticks - issued >= self.election_ticks {
                let (_, readers, _) = self.reads.inflight.take().unwrap();
                self.reads.queued.splice(0..0, readers);
                self.issue_read();
            }
        }
        self.check_transfer();
        self.maybe_publish_attributes();
        if self.ticks.is_multiple_of(64) {
            self.waiters.retain(|_, reply| !reply.is_closed());
            self.reads.queued.retain(|r| !r.is_closed());
        }
        self.publish_status();
    }

    /// Handles one input; returns the acknowledgement channel of a close request.
    fn handle(&mut self, input: Input) -> Option<oneshot::Sender<()>> {
        match input {
            Input::Propose(request, reply) => {
                let id = request.header.as_ref().map_or(0, |h| h.id);
                let data = request.encode_to_vec();
                self.waiters.insert(id, reply);
                if self.node.propose(Vec::new(), data.clone()).is_err() {
                    // No leader known yet: hold it until there is one (the proposer's
                    // timeout bounds the wait).
                    self.stalled.push((id, data));
                }
            }
            Input::Read(reply) => {
                self.reads.queued.push(reply);
                if self.reads.inflight.is_none() {
                    self.issue_read();
                }
            }
            Input::Step(message) => {
                let _ = self.node.step(message);
            }
            Input::Unreachable(id) => self.node.report_unreachable(id),
            Input::SnapshotStatus(id, status) => self.node.report_snapshot(id, status),
            Input::ChangeMembers(change, reply) => self.change_members(change, reply),
            Input::MoveLeader(target, reply) => self.move_leader(target, reply),
            Input::Flushed(to, result) => {
                self.compaction = match result {
                    Ok(()) => Compaction::Ready(to),
                    Err(why) => Compaction::Failed(why),
                }
            }
            Input::Close(ack) => return Some(ack),
        }
        None
    }

    fn issue_read(&mut self) {
        if self.reads.queued.is_empty() {
            return;
        }
        self.reads.next_ctx += 1;
        let ctx = self.reads.next_ctx;
        let readers = std::mem::take(&mut self.reads.queued);
        self.reads.inflight = Some((ctx, readers, self.ticks));
        self.node.read_index(ctx.to_be_bytes().to_vec());
    }

    fn publish_status(&self) {
        let raft = &self.node.raft;
        let leader = if raft.state == StateRole::Leader {
            self.shared.member_id
        } else {
            raft.leader_id
        };
        self.shared.leader.store(leader, Ordering::SeqCst);
        self.shared.term.store(raft.term, Ordering::SeqCst);
        self.shared
            .commit_index
            .store(raft.raft_log.committed, Ordering::SeqCst);
    }

    /// Handles a report of the log writer.
    fn on_report(&mut self, report: Report) -> Result<()> {
        match report {
            Report::Persisted(number) => {
                // Once everything submitted is durable, so is every Ready handled since
                // (those wrote nothing), and raft may forget them all.
                let upto = if self.persister.persisted(number) {
                    self.last_ready
                } else {
                    number
                };
                self.node.on_persist_ready(upto);
                Ok(())
            }
            Report::Failed(why) => Err(Error::Storage(why)),
        }
    }

    /// Handles a `Ready` whose writes go to the log writer: sends what may leave now,
    /// queues entries and hard state (and the messages that must wait for them), applies
    /// the committed entries raft hands out (all durable already), and answers.
    fn on_ready(&mut self, mut ready: Ready) -> Result<()> {
        let number = ready.number();
        self.last_ready = number;
        // A leader may send before persisting (raft's thesis, 10.2.1).
        self.transport.send(ready.take_messages());
        let mut batch = WriteBatch::new();
        self.node.mut_store().append(ready.entries(), &mut batch)?;
        if let Some(hs) = ready.hs() {
            self.node.mut_store().set_hard_state(hs.clone(), &mut batch);
        }
        // etcd's MustSync: entries, a term or a vote must be durable before anything
        // that depends on them leaves; a commit index alone need not (raft learns it
        // again), so it is written without waiting for the disk.
        let must_sync = ready.must_sync();
        let waiting = ready.take_persisted_messages();
        let committed = ready.take_committed_entries();
        let read_states = ready.take_read_states();
        // raft reads the new entries back from the storage's memory until they are
        // written (see `storage`).
        self.node.advance_append_async(ready);
        if must_sync {
            batch.sync = true;
            self.persister.submit(number, batch, waiting);
        } else {
            if !batch.is_empty() {
                // A commit index alone: queued, but nobody waits for it.
                batch.volatile = true;
                self.persister.submit_unnumbered(batch);
            }
            if self.persister.drained() {
                // Nothing to wait for: every earlier Ready that wrote is durable.
                self.transport.send(waiting);
                self.node.on_persist_ready(number);
            } else if !waiting.is_empty() {
                // Behind the writes still queued.
                self.persister.submit(number, WriteBatch::new(), waiting);
            }
        }
        self.publish_status();
        self.apply(committed)?;
        self.node.advance_apply();
        self.confirm_reads(read_states);
        self.release_reads();
        self.maybe_compact()?;
        self.publish_status();
        Ok(())
    }

    /// Handles a `Ready` entirely here, its writes made durable before it returns; only
    /// once every write queued to the log writer is done (a snapshot install and a
    /// membership change rewrite what those writes would otherwise race).
    fn on_ready_in_place(&mut self, mut ready: Ready) -> Result<()> {
        self.last_ready = ready.number();
        // A leader may send before persisting (raft's thesis, 10.2.1).
        self.transport.send(ready.take_messages());

        if !ready.snapshot().is_empty() {
            self.install_snapshot(ready.snapshot().clone())?;
        }

        // One durable write per Ready: new entries and the hard state together. It goes
        // before the apply below, so applied state is never durable ahead of the commit
        // index that covers it.
        let mut batch = WriteBatch::new();
        // etcd's MustSync: entries, a term or a vote must be durable before anything that
        // depends on them leaves; a commit index alone need not (raft learns it again),
        // so a Ready that only moves it writes without waiting for the disk.
        let previous = self.node.store().hard_state().clone();
        let must_sync = !ready.entries().is_empty()
            || ready
                .hs()
                .is_some_and(|hs| hs.term != previous.term || hs.vote != previous.vote);
        self.node.mut_store().append(ready.entries(), &mut batch)?;
        if let Some(hs) = ready.hs() {
            self.node.mut_store().set_hard_state(hs.clone(), &mut batch);
        }
        if !batch.is_empty() {
            batch.sync = must_sync;
            // A commit index written alone may be lost like the applies after it; the
            // applied state still never outlives it, since only a flush makes applies
            // durable and a flush takes every earlier write along.
            batch.volatile = !must_sync;
            self.engine.write(batch)?;
        }
        // What may only leave once the entries are durable (a follower's append
        // acknowledgements, votes) goes now, not after the apply: the leader's commit
        // should not wait for this member's apply.
        self.transport.send(ready.take_persisted_messages());
        // Status must never show an applied index above the committed one.
        self.publish_status();
        self.apply(ready.take_committed_entries())?;
        self.confirm_reads(ready.take_read_states());

        let mut light = self.node.advance(ready);
        if let Some(commit) = light.commit_index() {
            let mut batch = WriteBatch::new();
            self.node.mut_store().set_commit(commit, &mut batch);
            // Volatile, as above.
            batch.volatile = true;
            self.engine.write(batch)?;
            self.publish_status();
        }
        self.transport.send(light.take_messages());
        self.apply(light.take_committed_entries())?;
        self.node.advance_apply();
        self.release_reads();
        self.maybe_compact()?;
        self.publish_status();
        Ok(())
    }

    fn install_snapshot(&mut self, snapshot: Snapshot) -> Result<()> {
        let meta = snapshot.get_metadata().clone();
        let records = storage::snapshot_records(&snapshot.data)?;
        tracing::info!(
            index = meta.index,
            term = meta.term,
            "installing a snapshot"
        );
        // The restore replaces the state wholesale with a synced write; what it replaces
        // must not come back after a crash, so the volatile applies before it go to disk
        // first.
        self.engine.flush()?;
        {
            let mut sm = self.state.write().map_err(|_| Error::Stopped)?;
            sm.restore(meta.index, records)?;
            self.events.restored(&sm);
        }
        let mut batch = WriteBatch::new();
        self.node.mut_store().install_snapshot(&meta, &mut batch);
        batch.sync = true;
        self.engine.write(batch)?;
        self.shared
            .applied_index
            .store(meta.index, Ordering::SeqCst);
        self.refresh_peers()
    }

    /// Applies committed entries in order and answers their local proposers.
    fn apply(&mut self, entries: Vec<Entry>) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut answers = Vec::new();
        let mut conf_batch = WriteBatch::new();
        let mut last = 0;
        let mut members_changed = false;
        let mut removed = false;
        {
            let mut sm = self.state.write().map_err(|_| Error::Stopped)?;
            // Under the write lock: a watcher registered (under the read lock) before
            // this is counted, so no event it should get lacks `prev_kv`.
            sm.set_event_prev_kv(self.events.wants_prev_kv());
            for entry in entries {
                last = entry.index;
                match entry.get_entry_type() {
                    EntryType::EntryNormal if entry.data.is_empty() => sm.skip(entry.index)?,
                    EntryType::EntryNormal => {
                        let request = InternalRequest::decode(&entry.data[..]).map_err(|e| {
                            Error::Storage(format!("raft entry {}: {e}", entry.index))
                        })?;
                        let mut applied = sm.apply(entry.index, &request);
                        if let Err(e) = &applied.result {
                            if matches!(
                                e,
                                metastore_core::Error::Backend(_)
                                    | metastore_core::Error::Corrupt(_)
                            ) {
                                return Err(Error::Storage(format!(
                                    "applying entry {}: {e}",
                                    entry.index
                                )));
                            }
                        }
                        if !applied.events.is_empty() {
                            self.events.publish(std::mem::take(&mut applied.events));
                        }
                        if !applied.lease_changes.is_empty() {
                            self.events.leases_changed(&applied.lease_changes);
                        }
                        if matches!(request.request, Some(Envelope::MemberUpdate(_)))
                            && applied.result.is_ok()
                        {
                            members_changed = true;
                        }
                        let id = request.header.as_ref().map_or(0, |h| h.id);
                        if let Some(reply) = self.waiters.remove(&id) {
                            answers.push((reply, applied.result.map_err(Error::Core)));
                        }
                    }
                    EntryType::EntryConfChange => {
                        let cc = ConfChange::parse_from_bytes(&entry.data).map_err(|e| {
                            Error::Storage(format!("raft entry {}: {e}", entry.index))
                        })?;
                        let change = MemberChange::decode(&cc.context[..]).map_err(|e| {
                            Error::Storage(format!("raft entry {}: {e}", entry.index))
                        })?;
                        // The member records decide; raft's configuration follows only an
                        // accepted change (etcd turns a refused one into a no-op).
                        let applied = sm.apply_member_change(entry.index, &change);
                        tracing::info!(
                            index = entry.index,
                            change = ?change.change,
                            result = ?applied.result.as_ref().map(|_| ()),
                            "applied a membership change"
                        );
                        if applied.result.is_ok() {
                            match self.node.apply_conf_change(&cc) {
                                Ok(cs) => self.node.mut_store().set_conf_state(cs, &mut conf_batch),
                                Err(e) => tracing::warn!(error = %e, "raft refused a conf change"),
                            }
                            members_changed = true;
                            if change.change == Some(Change::Remove(self.shared.member_id)) {
                                removed = true;
                            }
                        }
                        if let Some(reply) = self.waiters.remove(&cc.id) {
                            answers.push((reply, applied.result.map_err(Error::Core)));
                        }
                    }
                    EntryType::EntryConfChangeV2 => {
                        // This member never proposes joint changes; keep the index moving.
                        let _ = ConfChangeV2::parse_from_bytes(&entry.data)
                            .map_err(|e| Error::Storage(e.to_string()))?;
                        sm.skip(entry.index)?;
                    }
                }
            }
            // The group's volatile writes reach the engine as one write, before anyone
            // is answered, the lock lets readers in, or a flush is asked of the engine.
            sm.backend().write_pending()?;
            self.shared
                .applied_index
                .store(sm.applied_index(), Ordering::SeqCst);
        }
        if !conf_batch.is_empty() {
            // raft's configuration must never be durable ahead of the member records the
            // same entries changed (volatile until flushed): a restart would replay a
            // change raft already holds.
            self.engine.flush()?;
            self.engine.write(conf_batch)?;
        }
        self.node.mut_store().set_applied(last);
        for (reply, answer) in answers {
            let _ = reply.send(answer);
        }
        if removed {
            return Err(ClusterError::Removed.into());
        }
        if members_changed {
            self.refresh_peers()?;
        }
        Ok(())
    }

    /// Points the transport at the current members (from the state once it knows any,
    /// else from the flags) and notes this member's role.
    fn refresh_peers(&mut self) -> Result<()> {
        let members = read_state(&self.state)?.members()?;
        let me = self.shared.member_id;
        let peers: HashMap<u64, Vec<String>> = if members.is_empty() {
            self.initial_peers.clone()
        } else {
            members
                .iter()
                .map(|m| (m.id, m.peer_ur_ls.clone()))
                .collect()
        };
        let learner = members.iter().any(|m| m.id == me && m.is_learner);
        self.shared.is_learner.store(learner, Ordering::SeqCst);
        self.transport
            .set_peers(peers.into_iter().filter(|(id, _)| *id != me).collect());
        Ok(())
    }

    fn change_members(
        &mut self,
        change: MemberChange,
        reply: oneshot::Sender<Result<ApplyResponse>>,
    ) {
        let raft = &self.node.raft;
        let (change_type, node_id) = match &change.change {
            Some(Change::Add(m)) if m.is_learner => (ConfChangeType::AddLearnerNode, m.id),
            Some(Change::Add(m)) => (ConfChangeType::AddNode, m.id),
            Some(Change::Remove(id)) => (ConfChangeType::RemoveNode, *id),
            Some(Change::Promote(id)) => {
                // etcd promotes only a learner whose log is within 10% of the leader's.
                if raft.state == StateRole::Leader {
                    let leader_match = raft.raft_log.last_index();
                    let ready = raft
                        .prs()
                        .get(*id)
                        .is_some_and(|p| p.matched as f64 >= leader_match as f64 * 0.9);
                    if !ready && raft.prs().get(*id).is_some() {
                        let _ = reply.send(Err(ClusterError::LearnerNotReady.into()));
                        return;
                    }
                }
                (ConfChangeType::AddNode, *id)
            }
            None => {
                let _ = reply.send(Err(Error::Internal("empty member change".into())));
                return;
            }
        };
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let cc = ConfChange {
            id,
            change_type,
            node_id,
            context: change.encode_to_vec().into(),
            ..Default::default()
        };
        self.waiters.insert(id, reply);
        if let Err(e) = self.node.propose_conf_change(Vec::new(), cc) {
            if let Some(reply) = self.waiters.remove(&id) {
                let why = match e {
                    raft::Error::ProposalDropped => Error::Timeout,
                    other => Error::Internal(other.to_string()),
                };
                let _ = reply.send(Err(why));
            }
        }
    }

    fn move_leader(&mut self, target: u64, reply: oneshot::Sender<Result<()>>) {
        let raft = &self.node.raft;
        if raft.state != StateRole::Leader {
            let _ = reply.send(Err(ClusterError::NotLeader.into()));
            return;
        }
        if !self.node.store().conf_state().voters.contains(&target) {
            let _ = reply.send(Err(ClusterError::BadLeaderTransferee.into()));
            return;
        }
        if target == self.shared.member_id {
            let _ = reply.send(Ok(()));
            return;
        }
        self.node.transfer_leader(target);
        let deadline = self.ticks + 5 * self.election_ticks;
        self.transfer = Some((target, reply, deadline));
    }

    fn check_transfer(&mut self) {
        let Some((target, _, deadline)) = &self.transfer else {
            return;
        };
        let leader = self.node.raft.leader_id;
        if leader == *target || self.ticks >= *deadline {
            let (target, reply, _) = self.transfer.take().unwrap();
            let _ = reply.send(if leader == target {
                Ok(())
            } else {
                Err(ClusterError::LeaderTransferTimeout.into())
            });
        }
    }

    /// Publishes this member's name and client URLs through the log (etcd's
    /// `publish`) until its record shows them; retried every few election timeouts.
    fn maybe_publish_attributes(&mut self) {
        if self.node.raft.leader_id == 0 {
            return;
        }
        if let Some(at) = self.attributes_proposed_at {
            if self.ticks < at + 3 * self.election_ticks {
                return;
            }
        }
        let current = match read_state(&self.state)
            .and_then(|sm| sm.member(self.shared.member_id).map_err(Error::Core))
        {
            Ok(Some(m)) => m,
            _ => return,
        };
        if current.name == self.attributes.name
            && current.client_ur_ls == self.attributes.client_ur_ls
        {
            return;
        }
        let request = InternalRequest {
            header: Some(metastore_proto::metastore::RequestHeader {
                id: self.shared.next_id.fetch_add(1, Ordering::Relaxed),
                ..Default::default()
            }),
            proposed_at_unix_nanos: self.wall_clock.unix_nanos(),
            request: Some(Envelope::MemberAttributes(self.attributes.clone())),
        };
        let _ = self.node.propose(Vec::new(), request.encode_to_vec());
        self.attributes_proposed_at = Some(self.ticks);
    }

    fn confirm_reads(&mut self, states: Vec<raft::ReadState>) {
        for rs in states {
            let Ok(ctx) = <[u8; 8]>::try_from(rs.request_ctx.as_slice()) else {
                continue;
            };
            let ctx = u64::from_be_bytes(ctx);
            if matches!(&self.reads.inflight, Some((c, _, _)) if *c == ctx) {
                let (_, readers, _) = self.reads.inflight.take().unwrap();
                self.reads.confirmed.push_back((rs.index, readers));
            }
        }
    }

    /// Answers readers whose read index is applied, and starts the next round.
    fn release_reads(&mut self) {
        let applied = self.shared.applied_index.load(Ordering::SeqCst);
        while let Some((index, _)) = self.reads.confirmed.front() {
            if *index > applied {
                break;
            }
            let (_, readers) = self.reads.confirmed.pop_front().unwrap();
            for r in readers {
                let _ = r.send(Ok(()));
            }
        }
        if self.reads.inflight.is_none() {
            self.issue_read();
        }
    }

    /// Compacts the raft log once `--snapshot-count` entries were applied since the last
    /// compaction (etcd's snapshot trigger), keeping some entries for followers that lag
    /// a little. Counting from the last compaction, not from the log's first entry,
    /// keeps it to one compaction (and one engine flush) per `--snapshot-count` entries
    /// even when fewer than that are kept.
    ///
    /// Two steps: a flush of the engine in the background (the entries are about to
    /// become unreplayable, so their applied state must be durable first), then, at the
    /// first Ready handled after it, the removal of the entries up to the index applied
    /// before the flush began. Flushing the memtables takes ~200 ms here, which the raft
    /// loop, and every client with it, used to wait for.
    fn maybe_compact(&mut self) -> Result<()> {
        match std::mem::replace(&mut self.compaction, Compaction::Idle) {
            Compaction::Idle => {}
            Compaction::Flushing => {
                self.compaction = Compaction::Flushing;
                return Ok(());
            }
            Compaction::Ready(to) => {
                // A snapshot installed meanwhile may have replaced these entries already
                // (`compact` then has nothing to do).
                let mut batch = WriteBatch::new();
                self.node.mut_store().compact(to, &mut batch)?;
                // Tens of thousands of deletes: the writer takes them, behind the
                // entries queued before (raft no longer reads what they remove).
                self.persister.submit_unnumbered(batch);
                tracing::info!(compacted_to = to, "compacted the raft log");
            }
            Compaction::Failed(why) => {
                return Err(Error::Storage(format!(
                    "flushing before log compaction: {why}"
                )))
            }
        }
        let applied = self.shared.applied_index.load(Ordering::SeqCst);
        if applied < self.compacted_at.saturating_add(self.snapshot_count) {
            return Ok(());
        }
        self.compacted_at = applied;
        let first = self.node.store().first();
        let keep = CATCH_UP_ENTRIES.min(self.snapshot_count);
        let to = applied.saturating_sub(keep);
        if to < first {
            return Ok(());
        }
        self.compaction = Compaction::Flushing;
        let engine = self.engine.clone();
        let inbox = self.inbox.clone();
        tokio::spawn(async move {
            let result = blocking(move || engine.flush().map_err(|e| e.to_string()))
                .await
                .and_then(|flushed| flushed);
            // A stopped loop no longer needs to know.
            let _ = inbox.send(Input::Flushed(to, result)).await;
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::RwLock;

    use metastore_core::backend::ScanVisitor;
    use metastore_core::{
        BackendError, BatchOp, Bucket, MemoryBackend, StateMachine, StateMachineConfig,
    };
    use metastore_proto::etcdserverpb::{PutRequest, RangeRequest};
    use metastore_proto::metastore::internal_request::Request;
    use metastore_proto::mvccpb;

    use super::*;
    use crate::replication::NoEvents;

    /// A memory engine that counts durable raft log appends and flushes, and can be told
    /// to fail writes or flushes (the log writer's tests use it too).
    #[derive(Clone, Default)]
    pub(super) struct Counting {
        inner: Arc<MemoryBackend>,
        log_syncs: Arc<AtomicUsize>,
        flushes: Arc<AtomicUsize>,
        pub(super) fail: Arc<AtomicBool>,
        fail_flush: Arc<AtomicBool>,
    }

    impl Backend for Counting {
        fn get(
            &self,
            bucket: Bucket,
            key: &[u8],
        ) -> std::result::Result<Option<Vec<u8>>, BackendError> {
            self.inner.get(bucket, key)
        }
        fn scan(
            &self,
            bucket: Bucket,
            start: &[u8],
            end: Option<&[u8]>,
            visit: &mut ScanVisitor<'_>,
        ) -> std::result::Result<(), BackendError> {
            self.inner.scan(bucket, start, end, visit)
        }
        fn write(&self, batch: WriteBatch) -> std::result::Result<(), BackendError> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(BackendError("injected failure".into()));
            }
            let appends = batch.ops.iter().any(
                |op| matches!(op, BatchOp::Put { bucket: Bucket::Log, key, .. } if key[0] == b'r'),
            );
            if batch.sync && appends {
                self.log_syncs.fetch_add(1, Ordering::SeqCst);
            }
            self.inner.write(batch)
        }
        fn flush(&self) -> std::result::Result<(), BackendError> {
            if self.fail_flush.load(Ordering::SeqCst) {
                return Err(BackendError("injected flush failure".into()));
            }
            self.flushes.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn size_bytes(&self) -> u64 {
            self.inner.size_bytes()
        }
        fn engine_name(&self) -> &'static str {
            "counting"
        }
    }

    const ME: u64 = 7;

    /// The indexes of the raft log entries stored in `engine`, in order.
    fn log_indexes(engine: &Counting) -> Vec<u64> {
        let mut indexes = Vec::new();
        engine
            .scan(Bucket::Log, b"r", Some(b"s"), &mut |k, _| {
                indexes.push(u64::from_be_bytes(k[1..].try_into().unwrap()));
                true
            })
            .unwrap();
        indexes
    }

    fn config() -> RaftConfig {
        RaftConfig {
            wall_clock: Arc::new(crate::clock::SystemClock),
            member_id: ME,
            cluster_id: 1,
            members: HashMap::from([(
                ME,
                ("me".to_string(), vec!["http://127.0.0.1:1".to_string()]),
            )]),
            // The same as the bootstrap record, so nothing is published and the log
            // holds only what a test proposes.
            attributes: pb::Member {
                id: ME,
                name: "me".into(),
                ..Default::default()
            },
            bootstrap: true,
            heartbeat: Duration::from_millis(10),
            election_ticks: 10,
            snapshot_count: 100_000,
            request_timeout: Duration::from_secs(5),
        }
    }

    fn open_with(
        engine: &Counting,
        config: RaftConfig,
        events: Arc<dyn EventSink>,
    ) -> (SharedState, RaftNode) {
        let sm =
            StateMachine::open(Box::new(engine.clone()), StateMachineConfig::default()).unwrap();
        let state = Arc::new(RwLock::new(sm));
        let node = RaftNode::open(config, state.clone(), Arc::new(engine.clone()), events).unwrap();
        (state, node)
    }

    fn open(engine: &Counting) -> (SharedState, RaftNode) {
        open_with(engine, config(), Arc::new(NoEvents))
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_proposals_share_durable_writes() {
        let engine = Counting::default();
        let (state, node) = open(&engine);
        let node = Arc::new(node);
        // The sole voter elects itself and commits its empty entry first.
        node.read_barrier().await.unwrap();
        let before = engine.log_syncs.load(Ordering::SeqCst);
        let n = 200;
        let proposals: Vec<_> = (0..n)
            .map(|i| node.propose(put(&format!("k{i}"))))
            .collect();
        let results = futures::future::join_all(proposals).await;
        assert!(results
            .iter()
            .all(|r| matches!(r, Ok(ApplyResponse::Put(_)))));
        let syncs = engine.log_syncs.load(Ordering::SeqCst) - before;
        assert!(syncs < n / 4, "{syncs} durable appends for {n} proposals");
        let status = node.status();
        assert_eq!(status.leader, ME);
        // Bootstrapped in term 1, elected in term 2, as etcd reports a new member.
        assert_eq!(status.term, 2);
        assert_eq!(status.applied_index, status.commit_index);
        assert_eq!(read_state(&state).unwrap().current_revision(), 1 + n as i64);
        node.close().await;
        assert!(matches!(
            node.propose(put("late")).await,
            Err(Error::Stopped)
        ));
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
        let sink = Arc::new(Recording::default());
        let (_state, node) = open_with(&engine, config(), sink.clone());
        let node = Arc::new(node);
        let proposals: Vec<_> = (0..50)
            .map(|i| node.propose(put(&format!("k{i}"))))
            .collect();
        futures::future::join_all(proposals).await;
        // A read produces no events and publishes nothing.
        node.propose(InternalRequest {
            request: Some(Request::Range(RangeRequest {
                key: b"k1".to_vec(),
                ..Default::default()
            })),
            ..Default::default()
        })
        .await
        .unwrap();
        node.close().await;
        let published = sink.0.lock().unwrap();
        assert_eq!(published.len(), 50);
        for (i, events) in published.iter().enumerate() {
            assert_eq!(events.len(), 1);
            assert_eq!(events[0].kv.as_ref().unwrap().mod_revision, 2 + i as i64);
        }
    }

    #[tokio::test]
    async fn a_restart_keeps_the_log_and_starts_a_new_term() {
        let engine = Counting::default();
        {
            let (_state, node) = open(&engine);
            for i in 0..10 {
                node.propose(put(&format!("k{i}"))).await.unwrap();
            }
            node.close().await;
        }
        let (state, node) = open(&engine);
        node.read_barrier().await.unwrap();
        let status = node.status();
        assert_eq!(status.term, 3);
        assert_eq!(read_state(&state).unwrap().current_revision(), 11);
        node.propose(put("after")).await.unwrap();
        assert_eq!(read_state(&state).unwrap().current_revision(), 12);
        node.close().await;
    }

    #[tokio::test]
    async fn committed_entries_not_yet_applied_are_applied_on_restart() {
        let engine = Counting::default();
        let (state, node) = open(&engine);
        node.propose(put("a")).await.unwrap();
        node.close().await;
        // Roll the state machine back to before the put, as if the apply batch had been
        // lost in a crash after the log append was synced.
        let applied = read_state(&state).unwrap().applied_index();
        let mut batch = WriteBatch::new();
        let mut keys = Vec::new();
        engine
            .scan(Bucket::Key, b"", None, &mut |k, _| {
                keys.push(k.to_vec());
                true
            })
            .unwrap();
        for k in keys {
            batch.delete(Bucket::Key, k);
        }
        batch.put(
            Bucket::Meta,
            metastore_core::state::CONSISTENT_INDEX_KEY.to_vec(),
            (applied - 1).to_be_bytes().to_vec(),
        );
        engine.write(batch).unwrap();

        let (state, node) = open(&engine);
        node.read_barrier().await.unwrap();
        {
            let sm = read_state(&state).unwrap();
            assert!(sm.applied_index() >= applied);
            let r = sm
                .range(&RangeRequest {
                    key: b"a".to_vec(),
                    ..Default::default()
                })
                .unwrap();
            assert_eq!(r.kvs.len(), 1);
        }
        node.close().await;
    }

    #[tokio::test]
    async fn a_small_snapshot_count_compacts_the_log() {
        let engine = Counting::default();
        let mut config = config();
        config.snapshot_count = 10;
        let (_state, node) = open_with(&engine, config, Arc::new(NoEvents));
        for i in 0..40 {
            node.propose(put(&format!("k{i}"))).await.unwrap();
        }
        node.close().await;
        let entries = log_indexes(&engine);
        assert!(entries.len() <= 21, "{entries:?}");
        // One compaction, and one engine flush, per 10 entries, not one per Ready.
        let flushes = engine.flushes.load(Ordering::SeqCst);
        assert!((2..=5).contains(&flushes), "{flushes} flushes");
        // The compacted log still restarts.
        let (state, node) = open(&engine);
        node.read_barrier().await.unwrap();
        assert_eq!(read_state(&state).unwrap().current_revision(), 41);
        node.close().await;
    }

    #[tokio::test]
    async fn a_failed_write_stops_the_member() {
        let engine = Counting::default();
        let (_state, node) = open(&engine);
        node.read_barrier().await.unwrap();
        let mut fatal = node.fatal();
        engine.fail.store(true, Ordering::SeqCst);
        let result = node.propose(put("a")).await;
        assert!(matches!(result, Err(Error::Stopped)), "{result:?}");
        fatal.wait_for(Option::is_some).await.unwrap();
        assert!(matches!(node.propose(put("b")).await, Err(Error::Stopped)));
        assert!(node.read_barrier().await.is_err());
    }

    #[tokio::test]
    async fn a_failed_flush_before_log_compaction_stops_the_member_with_the_log_whole() {
        let engine = Counting::default();
        engine.fail_flush.store(true, Ordering::SeqCst);
        let mut config = config();
        config.snapshot_count = 10;
        let (_state, node) = open_with(&engine, config, Arc::new(NoEvents));
        node.read_barrier().await.unwrap();
        let first = log_indexes(&engine).first().copied();
        assert!(first.is_some());
        let mut fatal = node.fatal();
        let mut stopped = None;
        for i in 0..40 {
            if let Err(e) = node.propose(put(&format!("k{i}"))).await {
                stopped = Some((i, e));
                break;
            }
        }
        let (i, e) = stopped.expect("the member went on after its flush failed");
        assert!(matches!(e, Error::Stopped), "{e:?}");
        assert!(
            i >= 10,
            "stopped at proposal {i}, before any compaction was due"
        );
        fatal.wait_for(Option::is_some).await.unwrap();
        let why = fatal.borrow().clone().unwrap();
        assert!(why.contains("injected flush failure"), "{why}");
        // Nothing was compacted: the log still starts where it did.
        assert_eq!(log_indexes(&engine).first().copied(), first);
    }
}
