//! Server processes under test: start, wait until ready, stop, kill -9, restart.

use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use metastore_proto::etcdserverpb::kv_client::KvClient;
use metastore_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use metastore_proto::etcdserverpb::RangeRequest;
use metastore_proto::etcdserverpb::StatusRequest;
use tonic::transport::{Channel, Endpoint};

/// The real etcd the tests compare against (Debian `etcd-server`).
pub const ETCD_BIN: &str = "/usr/bin/etcd";

/// How long a server may take to answer its first request after being started.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// A server is killed by its watchdog after this long, whatever the test is doing.
pub const DEFAULT_MAX_LIFE: Duration = Duration::from_secs(600);

/// Storage engine of a metastore server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    RocksDb,
    Memory,
}

/// Which server to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A real etcd from [`ETCD_BIN`].
    Etcd,
    /// The `metastore` binary of this workspace.
    Metastore(Engine),
}

impl Kind {
    pub fn label(&self) -> &'static str {
        match self {
            Kind::Etcd => "etcd",
            Kind::Metastore(Engine::RocksDb) => "metastore",
            Kind::Metastore(Engine::Memory) => "metastore(memory)",
        }
    }

    /// The server the differential tests check against etcd: metastore (RocksDB engine)
    /// unless `METASTORE_TESTS_SUBJECT=etcd` (to validate the tests themselves against a
    /// second etcd) or `METASTORE_TESTS_SUBJECT=memory` (metastore's memory engine).
    pub fn subject() -> Kind {
        match std::env::var("METASTORE_TESTS_SUBJECT").as_deref() {
            Ok("etcd") => Kind::Etcd,
            Ok("memory") => Kind::Metastore(Engine::Memory),
            Ok("metastore") | Ok("") | Err(_) => Kind::Metastore(Engine::RocksDb),
            Ok(other) => {
                panic!("METASTORE_TESTS_SUBJECT={other:?} is not one of etcd, metastore, memory")
            }
        }
    }

    /// Whether a restart keeps the data (false only for the memory engine).
    pub fn durable(&self) -> bool {
        !matches!(self, Kind::Metastore(Engine::Memory))
    }
}

/// Locates the `metastore` binary: `$METASTORE_BIN`, else `$CARGO_TARGET_DIR/debug/metastore`,
/// else `target/debug/metastore` in the workspace. Panics with instructions if missing.
pub fn metastore_bin() -> PathBuf {
    let mut tried = Vec::new();
    if let Ok(p) = std::env::var("METASTORE_BIN") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return p;
        }
        panic!(
            "METASTORE_BIN={} does not name a file. Build the server with \
             `cargo build -p metastore-runtime --bin metastore` or fix METASTORE_BIN.",
            p.display()
        );
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate lives inside the workspace")
        .to_path_buf();
    let mut candidates = Vec::new();
    // The target dir this test binary was built into is the most reliable guess: the test
    // executable lives in <target>/<profile>/deps/.
    if let Ok(exe) = std::env::current_exe() {
        if let Some(profile_dir) = exe.parent().and_then(|d| d.parent()) {
            candidates.push(profile_dir.join("metastore"));
            if let Some(target) = profile_dir.parent() {
                candidates.push(target.join("debug").join("metastore"));
            }
        }
    }
    if let Ok(t) = std::env::var("CARGO_TARGET_DIR") {
        let t = PathBuf::from(t);
        let t = if t.is_absolute() {
            t
        } else {
            workspace.join(t)
        };
        candidates.push(t.join("debug").join("metastore"));
    }
    candidates.push(workspace.join("target").join("debug").join("metastore"));
    for c in candidates {
        if c.is_file() {
            return c;
        }
        tried.push(c.display().to_string());
    }
    panic!(
        "the metastore binary was not found (tried: {}). Build it first with \
         `cargo build -p metastore-runtime --bin metastore` (same CARGO_TARGET_DIR), or set \
         METASTORE_BIN to its path. The black-box tests never skip.",
        tried.join(", ")
    );
}

fn etcd_bin() -> PathBuf {
    let p = PathBuf::from(std::env::var("ETCD_BIN").unwrap_or_else(|_| ETCD_BIN.to_string()));
    if !p.is_file() {
        panic!(
            "{} not found: the differential tests compare against a real etcd 3.4. Install \
             Debian's etcd-server (scripts/setup does), or set ETCD_BIN.",
            p.display()
        );
    }
    p
}

fn handed_out() -> &'static Mutex<HashSet<u16>> {
    static PORTS: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    PORTS.get_or_init(|| Mutex::new(HashSet::new()))
}

/// A free TCP port on 127.0.0.1 (bind :0), never the same twice in one process.
pub fn free_port() -> u16 {
    for _ in 0..100 {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = l.local_addr().expect("local_addr").port();
        drop(l);
        if handed_out().lock().unwrap().insert(port) {
            return port;
        }
    }
    panic!("could not find a free loopback port");
}

/// A running (or stopped) server with its ports, data dir and log file.
pub struct Server {
    pub kind: Kind,
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    extra_args: Vec<String>,
    /// `--initial-cluster` when this server is one member of several.
    pub initial_cluster: Option<String>,
    child: Arc<Mutex<Option<Child>>>,
    watchdog: Option<(mpsc::Sender<()>, JoinHandle<()>)>,
    /// Owns data dir and log; removed on drop after the process is dead.
    _dir: tempfile::TempDir,
}

impl Server {
    /// Starts a server of `kind` and waits until it answers a linearizable read.
    pub async fn start(kind: Kind) -> Server {
        Self::start_with(kind, &[]).await
    }

    /// Like [`Server::start`], with extra command-line flags.
    pub async fn start_with(kind: Kind, extra_args: &[&str]) -> Server {
        let mut s = Self::prepare(kind, "n1", extra_args);
        s.launch();
        s.wait_ready().await;
        s
    }

    /// A server with its ports and data dir chosen, not started yet (see `launch`).
    pub fn prepare(kind: Kind, name: &str, extra_args: &[&str]) -> Server {
        let dir = tempfile::Builder::new()
            .prefix(&format!("mst-{}-", kind.label().replace(['(', ')'], "-")))
            .tempdir()
            .expect("create temp dir");
        Server {
            kind,
            name: name.to_string(),
            client_port: free_port(),
            peer_port: free_port(),
            data_dir: dir.path().join("data"),
            log_path: dir.path().join("server.log"),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            initial_cluster: None,
            child: Arc::new(Mutex::new(None)),
            watchdog: None,
            _dir: dir,
        }
    }

    /// Starts the prepared process (with its watchdog) without waiting for it.
    pub fn launch(&mut self) {
        self.spawn();
        self.start_watchdog(DEFAULT_MAX_LIFE);
    }

    /// `http://127.0.0.1:peer_port`
    pub fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    fn command(&self) -> Command {
        let bin = match self.kind {
            Kind::Etcd => etcd_bin(),
            Kind::Metastore(_) => metastore_bin(),
        };
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new(bin);
        cmd.arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen-client-urls")
            .arg(&client)
            .arg("--advertise-client-urls")
            .arg(&client)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(
                self.initial_cluster
                    .clone()
                    .unwrap_or_else(|| format!("{}={}", self.name, peer)),
            );
        match self.kind {
            Kind::Etcd => {}
            Kind::Metastore(Engine::RocksDb) => {
                cmd.arg("--engine").arg("rocksdb");
            }
            Kind::Metastore(Engine::Memory) => {
                cmd.arg("--engine").arg("memory");
            }
        }
        cmd.args(&self.extra_args);
        // Keep the environment from steering either server (etcd reads ETCD_* flags).
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("ETCD_") {
                cmd.env_remove(k);
            }
        }
        cmd
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open server log");
        let mut cmd = self.command();
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log fd"))
            .stderr(log);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("failed to start {}: {e} ({:?})", self.kind.label(), cmd));
        *self.child.lock().unwrap() = Some(child);
    }

    fn start_watchdog(&mut self, max_life: Duration) {
        let (tx, rx) = mpsc::channel::<()>();
        let child = self.child.clone();
        let label = self.kind.label();
        let h = std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(max_life) {
                if let Some(c) = child.lock().unwrap().as_mut() {
                    eprintln!(
                        "watchdog: {label} (pid {}) outlived {max_life:?}, killing",
                        c.id()
                    );
                    let _ = c.kill();
                    let _ = c.wait();
                }
            }
        });
        self.watchdog = Some((tx, h));
    }

    /// `127.0.0.1:port`
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// `http://127.0.0.1:port`
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// PID of the running process, if any.
    pub fn pid(&self) -> Option<u32> {
        self.child.lock().unwrap().as_ref().map(|c| c.id())
    }

    /// The last `n` bytes of the server's log (stdout and stderr).
    pub fn log_tail(&self, n: u64) -> String {
        let mut f = match File::open(&self.log_path) {
            Ok(f) => f,
            Err(e) => return format!("<no log: {e}>"),
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(n)));
        let mut buf = Vec::new();
        let _ = f.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// A new gRPC channel to this server (with connect and request timeouts).
    pub async fn channel(&self) -> Channel {
        let ep = Endpoint::from_shared(self.url())
            .expect("endpoint")
            .connect_timeout(Duration::from_secs(5))
            .timeout(crate::CALL_TIMEOUT);
        match tokio::time::timeout(Duration::from_secs(10), ep.connect()).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => panic!("connect to {} at {}: {e:?}", self.kind.label(), self.url()),
            Err(_) => panic!(
                "connect to {} at {} timed out",
                self.kind.label(),
                self.url()
            ),
        }
    }

    /// Raw KV stub with generous message limits (the tests send oversize requests).
    pub async fn kv(&self) -> KvClient<Channel> {
        KvClient::new(self.channel().await)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    /// Raw Maintenance stub.
    pub async fn maintenance(&self) -> MaintenanceClient<Channel> {
        MaintenanceClient::new(self.channel().await).max_decoding_message_size(64 << 20)
    }

    /// This server's member ID, as its Status response header carries it.
    pub async fn member_id(&self) -> u64 {
        let mut m = self.maintenance().await;
        let status = crate::bounded("status", m.status(StatusRequest {}))
            .await
            .unwrap_or_else(|e| panic!("status of {}: {e:?}", self.name));
        status.into_inner().header.map_or(0, |h| h.member_id)
    }

    /// An `etcd-client` crate client connected to this server.
    pub async fn etcd_client(&self) -> etcd_client::Client {
        self.etcd_client_with(false).await
    }

    /// An `etcd-client` crate client connected to this server that sends etcd's
    /// "require leader" metadata with every call (clientv3's `WithRequireLeader`).
    pub async fn etcd_client_requiring_leader(&self) -> etcd_client::Client {
        self.etcd_client_with(true).await
    }

    async fn etcd_client_with(&self, require_leader: bool) -> etcd_client::Client {
        let opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(crate::CALL_TIMEOUT)
            .with_require_leader(require_leader);
        match tokio::time::timeout(
            Duration::from_secs(10),
            etcd_client::Client::connect([self.url()], Some(opts)),
        )
        .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => panic!("etcd-client connect to {}: {e:?}", self.kind.label()),
            Err(_) => panic!("etcd-client connect to {} timed out", self.kind.label()),
        }
    }

    /// Runs etcdctl against this server.
    pub fn etcdctl(&self, args: &[&str]) -> crate::CmdOutput {
        crate::etcdctl(&self.endpoint(), args, None)
    }

    /// Runs etcdctl against this server with `stdin` as its standard input.
    pub fn etcdctl_stdin(&self, args: &[&str], stdin: &str) -> crate::CmdOutput {
        crate::etcdctl(&self.endpoint(), args, Some(stdin))
    }

    fn exited(&self) -> Option<ExitStatus> {
        let mut g = self.child.lock().unwrap();
        match g.as_mut() {
            None => None,
            Some(c) => c.try_wait().ok().flatten(),
        }
    }

    /// Waits (bounded by [`STARTUP_TIMEOUT`]) until the server answers a linearizable
    /// Range; panics with the log tail if it exits or never answers.
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let mut last_err = String::from("never connected");
        loop {
            if let Some(st) = self.exited() {
                panic!(
                    "{} exited during startup with {st}; command: {:?}\n--- log tail ---\n{}",
                    self.kind.label(),
                    self.command(),
                    self.log_tail(4000)
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "{} did not answer within {STARTUP_TIMEOUT:?} on {} (last error: {last_err})\n\
                     --- log tail ---\n{}",
                    self.kind.label(),
                    self.url(),
                    self.log_tail(4000)
                );
            }
            if std::net::TcpStream::connect_timeout(
                &format!("127.0.0.1:{}", self.client_port).parse().unwrap(),
                Duration::from_millis(200),
            )
            .is_ok()
            {
                let attempt = async {
                    let ch = Endpoint::from_shared(self.url())
                        .unwrap()
                        .connect_timeout(Duration::from_secs(1))
                        .timeout(Duration::from_secs(2))
                        .connect()
                        .await
                        .map_err(|e| format!("{e:?}"))?;
                    KvClient::new(ch)
                        .range(RangeRequest {
                            key: b"health".to_vec(),
                            ..Default::default()
                        })
                        .await
                        .map_err(|e| format!("{e:?}"))
                };
                match tokio::time::timeout(Duration::from_secs(3), attempt).await {
                    Ok(Ok(_)) => return,
                    Ok(Err(e)) => last_err = e,
                    Err(_) => last_err = "range timed out".into(),
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL the process and reap it.
    pub fn kill9(&mut self) {
        let mut g = self.child.lock().unwrap();
        if let Some(mut c) = g.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM the process and wait (bounded) for it to exit; returns its exit status.
    /// Panics (after a SIGKILL) if it does not exit within `timeout`.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let mut g = self.child.lock().unwrap();
        let Some(mut c) = g.take() else {
            panic!("{} is not running", self.kind.label())
        };
        if let Ok(Some(st)) = c.try_wait() {
            return st;
        }
        // The child has not been reaped (try_wait said so), so its PID is still ours.
        unsafe {
            libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                drop(g);
                panic!(
                    "{} did not exit within {timeout:?} of SIGTERM\n--- log tail ---\n{}",
                    self.kind.label(),
                    self.log_tail(4000)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the process again with the same flags, ports and data dir, and waits
    /// until it answers. The previous process must have been stopped.
    pub async fn restart(&mut self) {
        self.relaunch();
        self.wait_ready().await;
    }

    /// Starts the process again with the same flags, ports and data dir, without
    /// waiting. The previous process must have been stopped.
    pub fn relaunch(&mut self) {
        assert!(
            self.child.lock().unwrap().is_none(),
            "restart of a running server"
        );
        self.spawn();
    }

    /// Whether the process is running.
    pub fn is_running(&self) -> bool {
        self.child.lock().unwrap().is_some() && self.exited().is_none()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
        if let Some((tx, h)) = self.watchdog.take() {
            let _ = tx.send(());
            let _ = h.join();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- {} log tail ({}) ---\n{}",
                self.kind.label(),
                self.log_path.display(),
                self.log_tail(3000)
            );
        }
    }
}
