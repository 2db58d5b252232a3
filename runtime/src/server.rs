//! Assembling and running one member: engine, state machine, log, services, listeners,
//! compactor, and the orderly shutdown of all of them.
//!
//! This module owns start-up order and shutdown order. It must never hold request logic
//! (that is `api`) and must keep the shutdown order: stop accepting, let in-flight
//! requests finish, stop the compactor, drain the log, flush the engine. Reversing any
//! step could acknowledge a write that is then lost, or drop one that was accepted.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use metastore_core::{StateMachine, StateMachineConfig};
use metastore_proto::etcdserverpb::cluster_server::ClusterServer;
use metastore_proto::etcdserverpb::kv_server::KvServer;
use metastore_proto::etcdserverpb::lease_server::LeaseServer;
use metastore_proto::etcdserverpb::maintenance_server::MaintenanceServer;
use metastore_proto::etcdserverpb::watch_server::WatchServer;
use metastore_proto::metastore::peer_server::PeerServer;
use tokio::task::JoinHandle;

use crate::api::{
    Api, ClusterService, KvService, LeaseService, Limits, MaintenanceService, WatchService,
};
use crate::config::Config;
use crate::lessor::{LessorConfig, PrimaryLessor};
use crate::membership::member_id;
use crate::membership::Identity;
use crate::raft::{RaftConfig, RaftNode};
use crate::replication::{read_state, EventSink, Fanout, Replicator};
use crate::signal as watch;
use crate::storage::Engine;
use crate::watch::WatchHub;

/// How long shutdown waits for in-flight requests before it stops waiting.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a member could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("opening the {engine} engine: {error}")]
    Storage { engine: &'static str, error: String },
    #[error("opening the state machine: {0}")]
    State(String),
    #[error("recovering the log: {0}")]
    Log(String),
    #[error("joining the cluster: {0}")]
    Join(String),
    #[error("listen tcp {addr}: {error}")]
    Listen { addr: String, error: std::io::Error },
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
}

/// A running member. Dropping it does not stop it; call [`RunningServer::shutdown`].
pub struct RunningServer {
    /// The bound client addresses, in `--listen-client-urls` order (useful with port 0).
    pub client_addrs: Vec<SocketAddr>,
    identity: Identity,
    stop: watch::Sender<bool>,
    servers: Vec<JoinHandle<()>>,
    compactor: Option<JoinHandle<()>>,
    lessor: JoinHandle<()>,
    log: Arc<RaftNode>,
    engine: Engine,
    fatal: watch::Receiver<Option<String>>,
}

/// Binds the client listeners, opens storage, recovers the log and starts serving.
pub async fn start(config: Config) -> Result<RunningServer, StartError> {
    start_with(config, Injected::default()).await
}

/// What an embedder may supply instead of what the flags name (the simulation supplies
/// a disk that outlives the member and a wall clock it can jump).
#[derive(Default)]
pub struct Injected {
    /// Instead of the engine `--engine` names.
    pub engine: Option<Engine>,
    /// Instead of the machine's clock.
    pub wall_clock: Option<Arc<dyn crate::clock::WallClock>>,
}

/// [`start`] with injected parts.
pub async fn start_with(config: Config, injected: Injected) -> Result<RunningServer, StartError> {
    let Injected { engine, wall_clock } = injected;
    let wall_clock = wall_clock.unwrap_or_else(|| Arc::new(crate::clock::SystemClock));
    let mut identity = Identity::from_config(&config);
    // Listeners first, as etcd does: a port conflict fails before the data directory is
    // touched.
    let mut client_addrs = Vec::new();
    let mut listeners = Vec::new();
    for url in &config.listen_client_urls {
        let addr = url.socket_addr()?;
        let listen_err = |error| StartError::Listen {
            addr: addr.to_string(),
            error,
        };
        let listener = bind(addr).await.map_err(listen_err)?;
        let local = local_addr(&listener).map_err(listen_err)?;
        client_addrs.push(local);
        // A listen URL with port 0 (tests) is advertised with the port actually bound, so
        // MemberList hands clients an address they can dial.
        if url.port() == 0 {
            for advertised in identity.client_urls.iter_mut() {
                if advertised == url.as_str() {
                    *advertised = format!("http://{local}");
                }
            }
        }
        listeners.push((url.clone(), local, listener));
    }
    let mut peer_listeners = Vec::new();
    for url in &config.listen_peer_urls {
        let addr = url.socket_addr()?;
        let listen_err = |error| StartError::Listen {
            addr: addr.to_string(),
            error,
        };
        let listener = bind(addr).await.map_err(listen_err)?;
        peer_listeners.push(listener);
    }

    let engine = match engine {
        Some(engine) => engine,
        None => Engine::open(&config).map_err(|e| StartError::Storage {
            engine: engine_label(&config),
            error: e.0,
        })?,
    };
    let hub = WatchHub::new();
    let sm = StateMachine::open(
        engine.for_state_machine(),
        StateMachineConfig {
            max_txn_ops: config.max_txn_ops,
        },
    )
    .map_err(|e| StartError::State(e.to_string()))?;
    let state = Arc::new(RwLock::new(sm));
    let token = &config.initial_cluster_token;
    let members: std::collections::HashMap<u64, (String, Vec<String>)> = config
        .initial_cluster
        .iter()
        .map(|(name, urls)| {
            (
                member_id(urls, token),
                (
                    name.clone(),
                    urls.iter().map(|u| u.as_str().to_string()).collect(),
                ),
            )
        })
        .collect();
    identity.cluster_id = cluster_id_of(&config, &identity, &engine, &members).await?;
    let election_ticks = (config.election_timeout.as_millis()
        / config.heartbeat_interval.as_millis().max(1))
    .max(2) as usize;
    let raft_config = RaftConfig {
        wall_clock: wall_clock.clone(),
        member_id: identity.member_id,
        cluster_id: identity.cluster_id,
        members,
        bootstrap: config.initial_cluster_state == crate::config::ClusterState::New,
        heartbeat: config.heartbeat_interval,
        election_ticks,
        snapshot_count: config.snapshot_count,
        request_timeout: RaftConfig::request_timeout_for(config.election_timeout),
        attributes: metastore_proto::etcdserverpb::Member {
            id: identity.member_id,
            name: identity.name.clone(),
            client_ur_ls: identity.client_urls.clone(),
            ..Default::default()
        },
    };
    let lessor = Arc::new(PrimaryLessor::new(LessorConfig {
        extend: config.election_timeout,
        revoke_rate: config.lease_revoke_rate,
        checkpoint_interval: config.lease_checkpoint_interval,
    }));
    let sinks: Vec<Arc<dyn EventSink>> = vec![hub.clone(), lessor.clone()];
    let log = Arc::new(
        RaftNode::open(
            raft_config,
            state.clone(),
            engine.backend(),
            Arc::new(Fanout(sinks)),
        )
        .map_err(|e| StartError::Log(e.to_string()))?,
    );
    let fatal = log.fatal();
    let replica = log.status();
    tracing::info!(
        name = %identity.name,
        member_id = %format!("{:x}", identity.member_id),
        cluster_id = %format!("{:x}", identity.cluster_id),
        engine = engine.name(),
        data_dir = %config.data_dir.display(),
        term = replica.term,
        applied_index = replica.applied_index,
        "member ready to serve"
    );

    // The lessor takes over the lease table before the first request is served (etcd's
    // Promote on winning the first election): every lease gets its remaining TTL plus an
    // election timeout from now.
    if config.initial_cluster.len() == 1 {
        log.wait_leader(2 * config.election_timeout).await;
    }
    if log.is_leader() {
        let sm = read_state(&state).map_err(|e| StartError::State(e.to_string()))?;
        lessor.promote(&sm, log.status().term);
    }
    let api = Arc::new(
        Api::new(
            wall_clock,
            state,
            log.clone() as Arc<dyn Replicator>,
            engine.clone(),
            identity.clone(),
            Limits {
                max_request_bytes: config.max_request_bytes,
                max_txn_ops: config.max_txn_ops,
                quota_bytes: config.quota_backend_bytes,
            },
        )
        .with_leases(lessor.clone(), config.min_lease_ttl),
    );

    let (stop, stop_rx) = watch::channel(false);
    let mut servers = Vec::new();
    for listener in peer_listeners {
        let router = tonic::transport::Server::builder().add_service(
            PeerServer::new(log.peer_service())
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX),
        );
        servers.push(tokio::spawn(serve(listener, router, stop_rx.clone())));
    }
    #[cfg(not(madsim))]
    let leader_monitor = {
        let (monitor, task) = crate::require_leader::LeaderMonitor::spawn(
            log.clone() as Arc<dyn Replicator>,
            config.election_timeout,
            stop_rx.clone(),
        );
        servers.push(task);
        monitor
    };
    for (url, local, listener) in listeners {
        tracing::info!(address = %local, url = %url, "serving client traffic");
        let watch = WatchService::new(
            api.clone(),
            hub.clone(),
            config.watch_progress_notify_interval,
            stop_rx.clone(),
        );
        servers.push(tokio::spawn(serve_clients(
            listener,
            api.clone(),
            watch,
            ClientLimits {
                max_recv: config.grpc_max_recv_bytes(),
                #[cfg(not(madsim))]
                leader: leader_monitor.clone(),
            },
            stop_rx.clone(),
        )));
    }

    let compactor = config
        .auto_compaction
        .map(|mode| tokio::spawn(crate::compactor::run(mode, api.clone(), stop_rx.clone())));
    let lessor = tokio::spawn(crate::lessor::run(api.clone(), lessor, stop_rx.clone()));

    Ok(RunningServer {
        client_addrs,
        identity,
        stop,
        servers,
        compactor,
        lessor,
        log,
        engine,
        fatal,
    })
}

/// Where the cluster ID is kept once known: a member that joined an existing cluster
/// cannot derive it from its flags.
const CLUSTER_ID_KEY: &[u8] = b"s/cluster_id";

/// The cluster this member belongs to: stored from an earlier start; for a new cluster,
/// etcd's derivation from the initial members; for a member joining an existing
/// cluster, asked of the cluster's members (etcd's `GetClusterFromRemotePeers`).
async fn cluster_id_of(
    config: &Config,
    identity: &Identity,
    engine: &Engine,
    members: &std::collections::HashMap<u64, (String, Vec<String>)>,
) -> Result<u64, StartError> {
    use metastore_core::{Bucket, WriteBatch};
    let backend = engine.backend();
    let storage_err = |e: metastore_core::BackendError| StartError::Log(e.0);
    if let Some(v) = backend
        .get(Bucket::Log, CLUSTER_ID_KEY)
        .map_err(storage_err)?
    {
        let bytes: [u8; 8] = v
            .as_slice()
            .try_into()
            .map_err(|_| StartError::Log("malformed stored cluster ID".into()))?;
        return Ok(u64::from_be_bytes(bytes));
    }
    let cluster_id = if config.initial_cluster_state == crate::config::ClusterState::Existing {
        let urls: Vec<String> = members
            .iter()
            .filter(|(id, _)| **id != identity.member_id)
            .flat_map(|(_, (_, urls))| urls.clone())
            .collect();
        let deadline = tokio::time::Instant::now() + JOIN_TIMEOUT;
        // The member asked may not have applied the MemberAdd yet (it is committed on
        // the leader when `member add` answers): a list without this member is asked
        // again until the deadline before it counts as "not added".
        let info = loop {
            let answer = crate::raft::transport::fetch_cluster(&urls).await;
            let answered = answer.is_some();
            let me = identity.member_id;
            if let Some(info) = answer.filter(|i| i.members.iter().any(|m| m.id == me)) {
                break info;
            }
            if tokio::time::Instant::now() > deadline {
                return Err(StartError::Join(match answered {
                    true => format!(
                        "member {:x} has not been added to the cluster (use `etcdctl member add` first)",
                        identity.member_id
                    ),
                    false => "could not retrieve cluster information from the given URLs".into(),
                }));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        info.cluster_id
    } else {
        identity.cluster_id
    };
    let mut batch = WriteBatch::new();
    batch.put(
        Bucket::Log,
        CLUSTER_ID_KEY,
        cluster_id.to_be_bytes().to_vec(),
    );
    batch.sync = true;
    backend.write(batch).map_err(storage_err)?;
    Ok(cluster_id)
}

/// How long a joining member keeps asking the cluster's members who they are.
const JOIN_TIMEOUT: Duration = Duration::from_secs(30);

fn engine_label(config: &Config) -> &'static str {
    match config.engine {
        crate::config::Engine::Memory => "memory",
        #[cfg(feature = "rocksdb")]
        crate::config::Engine::RocksDb => "rocksdb",
    }
}

#[cfg(not(madsim))]
type Listener = tokio::net::TcpListener;

#[cfg(not(madsim))]
async fn bind(addr: SocketAddr) -> std::io::Result<Listener> {
    tokio::net::TcpListener::bind(addr).await
}

#[cfg(not(madsim))]
fn local_addr(listener: &Listener) -> std::io::Result<SocketAddr> {
    listener.local_addr()
}

/// Serves gRPC services on one listener until `stop` turns true, then lets in-flight
/// requests finish.
#[cfg(not(madsim))]
async fn serve(
    listener: Listener,
    router: tonic::transport::server::Router,
    mut stop: watch::Receiver<bool>,
) {
    use tonic::transport::server::TcpIncoming;
    // Small request/response pairs must not wait for Nagle's algorithm.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let result = router
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "gRPC server failed");
    }
}

/// What every client request passes before a service sees it.
struct ClientLimits {
    /// grpc-go's receive limit (see `recv_limit`).
    max_recv: usize,
    /// etcd's require-leader check (see `require_leader`).
    #[cfg(not(madsim))]
    leader: crate::require_leader::LeaderMonitor,
}

/// Serves the client services on one listener, behind grpc-go's receive limit and etcd's
/// require-leader check, until `stop` turns true.
#[cfg(not(madsim))]
async fn serve_clients(
    listener: Listener,
    api: Arc<Api>,
    watch: WatchService,
    limits: ClientLimits,
    mut stop: watch::Receiver<bool>,
) {
    use tokio_stream::StreamExt;
    use tonic::transport::server::TcpIncoming;
    // etcdctl's `--cluster` sends a URL as :authority, which h2 refuses (see authority.rs).
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .map(|conn| conn.map(crate::authority::RepairAuthority::new));
    let max_recv = limits.max_recv;
    let builder = tonic::transport::Server::builder()
        .layer(crate::recv_limit::RecvLimitLayer::new(max_recv))
        .layer(crate::require_leader::RequireLeaderLayer::new(
            limits.leader,
        ));
    let result = services(builder, api, watch, max_recv)
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "gRPC server failed");
    }
}

/// Under madsim there are no real sockets: the simulated server binds the address
/// itself, so port 0 is not supported there.
#[cfg(madsim)]
type Listener = SocketAddr;

#[cfg(madsim)]
async fn bind(addr: SocketAddr) -> std::io::Result<Listener> {
    Ok(addr)
}

#[cfg(madsim)]
fn local_addr(listener: &Listener) -> std::io::Result<SocketAddr> {
    Ok(*listener)
}

#[cfg(madsim)]
async fn serve(
    addr: Listener,
    router: tonic::transport::server::Router,
    mut stop: watch::Receiver<bool>,
) {
    let result = router
        .serve_with_shutdown(addr, async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "gRPC server failed");
    }
}

/// Under madsim the receive limit is tonic's own and there is no require-leader check
/// (both layers need real HTTP bodies, which madsim's tonic does not have).
#[cfg(madsim)]
async fn serve_clients(
    addr: Listener,
    api: Arc<Api>,
    watch: WatchService,
    limits: ClientLimits,
    stop: watch::Receiver<bool>,
) {
    let router = services(
        tonic::transport::Server::builder(),
        api,
        watch,
        limits.max_recv,
    );
    serve(addr, router, stop).await
}

/// The services every client listener offers. Services not added here (Auth, lock,
/// election) answer `Unimplemented`, as unknown services do in gRPC.
///
/// tonic's own decode limit stays at `max_recv` as a backstop (it also bounds a compressed
/// message once inflated); the receive-limit layer answers first for the wire length.
fn services<L: Clone>(
    builder: tonic::transport::Server<L>,
    api: Arc<Api>,
    watch: WatchService,
    max_recv: usize,
) -> tonic::transport::server::Router<L> {
    builder
        // etcd allows effectively unlimited concurrent streams per connection.
        .max_concurrent_streams(Some(u32::MAX))
        .add_service(
            KvServer::new(KvService::new(api.clone()))
                .max_decoding_message_size(max_recv)
                .max_encoding_message_size(usize::MAX),
        )
        .add_service(
            LeaseServer::new(LeaseService::new(api.clone()))
                .max_decoding_message_size(max_recv)
                .max_encoding_message_size(usize::MAX),
        )
        .add_service(
            MaintenanceServer::new(MaintenanceService::new(api.clone()))
                .max_decoding_message_size(max_recv)
                .max_encoding_message_size(usize::MAX),
        )
        .add_service(
            WatchServer::new(watch)
                .max_decoding_message_size(max_recv)
                .max_encoding_message_size(usize::MAX),
        )
        .add_service(
            ClusterServer::new(ClusterService::new(api))
                .max_decoding_message_size(max_recv)
                .max_encoding_message_size(usize::MAX),
        )
}

impl RunningServer {
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Resolves with the reason when the member fails fatally (storage failure, apply
    /// panic); it then stops serving writes and should be shut down.
    pub async fn failed(&mut self) -> String {
        loop {
            if let Some(why) = self.fatal.borrow_and_update().clone() {
                return why;
            }
            if self.fatal.changed().await.is_err() {
                // The log is gone without a reason: treat as stopped.
                return "log stopped".into();
            }
        }
    }

    /// Graceful shutdown: stop accepting, finish in-flight requests (up to a bound),
    /// stop the compactor, drain the log, flush the engine.
    pub async fn shutdown(self) -> Result<(), String> {
        tracing::info!("shutting down: no new connections, finishing in-flight requests");
        self.stop.send_replace(true);
        for server in self.servers {
            let abort = server.abort_handle();
            if tokio::time::timeout(DRAIN_TIMEOUT, server).await.is_err() {
                tracing::warn!("in-flight requests did not finish in time; closing connections");
                abort.abort();
            }
        }
        if let Some(compactor) = self.compactor {
            let _ = compactor.await;
        }
        // Revokes it already proposed are in the log queue and drain with it.
        let _ = self.lessor.await;
        self.log.close().await;
        let flushed = self.engine.flush().map_err(|e| e.0);
        let fatal = self.fatal.borrow().clone();
        match (flushed, fatal) {
            (Err(e), _) => Err(format!("flushing the engine: {e}")),
            (_, Some(why)) => Err(why),
            (Ok(()), None) => {
                tracing::info!("stopped cleanly");
                Ok(())
            }
        }
    }
}
