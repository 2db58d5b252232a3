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
use metastore_proto::etcdserverpb::maintenance_server::MaintenanceServer;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::{Api, ClusterService, KvService, Limits, MaintenanceService};
use crate::config::Config;
use crate::membership::Identity;
use crate::replication::{NoEvents, Replicator, SingleLog};
use crate::storage::Engine;

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
    log: Arc<SingleLog>,
    engine: Engine,
    fatal: watch::Receiver<Option<String>>,
}

/// Binds the client listeners, opens storage, recovers the log and starts serving.
pub async fn start(config: Config) -> Result<RunningServer, StartError> {
    let mut identity = Identity::from_config(&config);
    if config.initial_cluster_state == crate::config::ClusterState::Existing {
        tracing::warn!(
            "--initial-cluster-state=existing: joining a running cluster arrives with Raft; \
             starting as the only member"
        );
    }

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

    let engine = Engine::open(&config).map_err(|e| StartError::Storage {
        engine: engine_label(&config),
        error: e.0,
    })?;
    let sm = StateMachine::open(
        engine.boxed(),
        StateMachineConfig {
            max_txn_ops: config.max_txn_ops,
        },
    )
    .map_err(|e| StartError::State(e.to_string()))?;
    let state = Arc::new(RwLock::new(sm));
    let log = Arc::new(
        SingleLog::open(
            state.clone(),
            engine.backend(),
            identity.member_id,
            Arc::new(NoEvents),
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

    let api = Arc::new(Api::new(
        state,
        log.clone() as Arc<dyn Replicator>,
        engine.clone(),
        identity.clone(),
        Limits {
            max_request_bytes: config.max_request_bytes,
            max_txn_ops: config.max_txn_ops,
            quota_bytes: config.quota_backend_bytes,
        },
    ));

    let (stop, stop_rx) = watch::channel(false);
    let mut servers = Vec::new();
    for (url, local, listener) in listeners {
        tracing::info!(address = %local, url = %url, "serving client traffic");
        servers.push(tokio::spawn(serve(
            listener,
            api.clone(),
            config.grpc_max_recv_bytes(),
            stop_rx.clone(),
        )));
    }

    let compactor = config
        .auto_compaction
        .map(|mode| tokio::spawn(crate::compactor::run(mode, api.clone(), stop_rx.clone())));

    Ok(RunningServer {
        client_addrs,
        identity,
        stop,
        servers,
        compactor,
        log,
        engine,
        fatal,
    })
}

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

/// Serves the gRPC services on one listener until `stop` turns true, then lets in-flight
/// requests finish.
#[cfg(not(madsim))]
async fn serve(
    listener: Listener,
    api: Arc<Api>,
    max_recv: usize,
    mut stop: watch::Receiver<bool>,
) {
    use tonic::transport::server::TcpIncoming;
    // Small request/response pairs must not wait for Nagle's algorithm.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    // grpc-go's receive limit and error, ahead of tonic's decoder (see recv_limit).
    let builder =
        tonic::transport::Server::builder().layer(crate::recv_limit::RecvLimitLayer::new(max_recv));
    let result = services(builder, api, max_recv)
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
async fn serve(addr: Listener, api: Arc<Api>, max_recv: usize, mut stop: watch::Receiver<bool>) {
    let result = services(tonic::transport::Server::builder(), api, max_recv)
        .serve_with_shutdown(addr, async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "gRPC server failed");
    }
}

/// The services every client listener offers. Services not added here (Watch, Lease,
/// Auth, lock, election) answer `Unimplemented`, as unknown services do in gRPC.
///
/// tonic's own decode limit stays at `max_recv` as a backstop (it also bounds a compressed
/// message once inflated); the receive-limit layer answers first for the wire length.
fn services<L: Clone>(
    builder: tonic::transport::Server<L>,
    api: Arc<Api>,
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
            MaintenanceServer::new(MaintenanceService::new(api.clone()))
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
