//! Command-line flags and the validated server configuration.
//!
//! This module owns the translation from etcd's flag names, defaults and `ETCD_*`
//! environment variables into a [`Config`] the rest of the runtime trusts. It must never
//! open files, bind sockets or start tasks: it only parses and checks, so that a bad
//! command line fails before anything touches the data directory.
//!
//! Flags keep etcd's names and defaults so that scripts written for a one-member etcd
//! start MetaStore unchanged. The clustering flags are parsed and checked for consistency
//! the way etcd checks them (the initial cluster must name this member with its advertised
//! peer URLs).

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// The etcd API version MetaStore reports (Status, `--version`). Clients compare it to
/// decide which features they may use, so it names the etcd release whose API we follow.
pub const ETCD_API_VERSION: &str = "3.5.0";

/// etcd's default `--max-request-bytes` (1.5 MiB).
pub const DEFAULT_MAX_REQUEST_BYTES: u32 = 1024 * 1024 + 512 * 1024;
/// gRPC framing allowance on top of `--max-request-bytes`, as etcd adds (512 KiB): a
/// message between the two limits reaches our handler and gets etcd's "request is too
/// large" instead of a transport error.
pub const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;
/// etcd's default backend quota when `--quota-backend-bytes` is 0 (2 GiB).
pub const DEFAULT_QUOTA_BYTES: u64 = 2 * 1024 * 1024 * 1024;
/// etcd's default member name.
pub const DEFAULT_NAME: &str = "default";
const DEFAULT_LISTEN_CLIENT_URLS: &str = "http://localhost:2379";
const DEFAULT_LISTEN_PEER_URLS: &str = "http://localhost:2380";
const DEFAULT_INITIAL_CLUSTER_TOKEN: &str = "etcd-cluster";

#[cfg(feature = "rocksdb")]
const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    "\netcd API version: 3.5.0\nengines: rocksdb (default), memory"
);
#[cfg(not(feature = "rocksdb"))]
const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    "\netcd API version: 3.5.0\nengines: memory"
);

/// The `metastore` command line. Every flag can also be given as `ETCD_<FLAG>` in the
/// environment (`--data-dir` is `ETCD_DATA_DIR`), as etcd allows; a flag on the command
/// line wins over the environment.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "metastore",
    version,
    long_version = LONG_VERSION,
    about = "MetaStore: a metadata store that speaks the etcd v3 API"
)]
pub struct Flags {
    /// Human-readable name for this member.
    #[arg(long, env = "ETCD_NAME", default_value = DEFAULT_NAME)]
    pub name: String,
    /// Path to the data directory [default: ${name}.etcd in the current folder].
    #[arg(long, env = "ETCD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// List of URLs to listen on for client traffic (comma-separated).
    #[arg(long, env = "ETCD_LISTEN_CLIENT_URLS", value_name = "URLS")]
    pub listen_client_urls: Option<String>,
    /// List of this member's client URLs to advertise to the public (comma-separated)
    /// [default: http://localhost:2379, or the listen client URLs when those are set].
    #[arg(long, env = "ETCD_ADVERTISE_CLIENT_URLS", value_name = "URLS")]
    pub advertise_client_urls: Option<String>,
    /// List of URLs to listen on for peer (raft) traffic.
    #[arg(long, env = "ETCD_LISTEN_PEER_URLS", value_name = "URLS",
          default_value = DEFAULT_LISTEN_PEER_URLS)]
    pub listen_peer_urls: String,
    /// List of this member's peer URLs to advertise to the rest of the cluster.
    #[arg(long, env = "ETCD_INITIAL_ADVERTISE_PEER_URLS", value_name = "URLS",
          default_value = DEFAULT_LISTEN_PEER_URLS)]
    pub initial_advertise_peer_urls: String,
    /// Initial cluster configuration for bootstrapping (name=peer-url,...)
    /// [default: default=http://localhost:2380, or ${name}=<advertised peer URLs> when
    /// --name is set].
    #[arg(long, env = "ETCD_INITIAL_CLUSTER", value_name = "NAME=URL,...")]
    pub initial_cluster: Option<String>,
    /// Initial cluster state ('new' or 'existing').
    #[arg(long, env = "ETCD_INITIAL_CLUSTER_STATE", default_value = "new",
          value_parser = ["new", "existing"])]
    pub initial_cluster_state: String,
    /// Initial cluster token for the cluster during bootstrap (part of the member and
    /// cluster IDs).
    #[arg(long, env = "ETCD_INITIAL_CLUSTER_TOKEN", default_value = DEFAULT_INITIAL_CLUSTER_TOKEN)]
    pub initial_cluster_token: String,
    /// Maximum client request size in bytes the server will accept.
    #[arg(long, env = "ETCD_MAX_REQUEST_BYTES", default_value_t = DEFAULT_MAX_REQUEST_BYTES)]
    pub max_request_bytes: u32,
    /// Maximum number of operations permitted in a transaction.
    #[arg(long, env = "ETCD_MAX_TXN_OPS", default_value_t = 128)]
    pub max_txn_ops: u32,
    /// Maximum size in bytes the backend may occupy before writes are refused; 0 means
    /// the default 2 GiB, a negative value disables the quota.
    #[arg(
        long,
        env = "ETCD_QUOTA_BACKEND_BYTES",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    pub quota_backend_bytes: i64,
    /// Interpret --auto-compaction-retention as a duration ('periodic') or a number of
    /// revisions ('revision').
    #[arg(long, env = "ETCD_AUTO_COMPACTION_MODE", default_value = "periodic",
          value_parser = ["periodic", "revision"])]
    pub auto_compaction_mode: String,
    /// Auto compaction retention: hours or a duration like '30m' in periodic mode, a
    /// revision count in revision mode. 0 disables auto compaction.
    #[arg(long, env = "ETCD_AUTO_COMPACTION_RETENTION", default_value = "0")]
    pub auto_compaction_retention: String,
    /// Log level: debug, info, warn, error, panic or fatal.
    #[arg(long, env = "ETCD_LOG_LEVEL", default_value = "info",
          value_parser = ["debug", "info", "warn", "error", "panic", "fatal"])]
    pub log_level: String,
    /// Storage engine: 'rocksdb' (durable, the default when built in) or 'memory'
    /// (nothing survives the process).
    #[arg(long, env = "ETCD_ENGINE", default_value = default_engine_name())]
    pub engine: String,
    /// Duration of periodic watch progress notifications (etcd's experimental flag).
    #[arg(
        long,
        env = "ETCD_EXPERIMENTAL_WATCH_PROGRESS_NOTIFY_INTERVAL",
        default_value = "10m"
    )]
    pub experimental_watch_progress_notify_interval: String,

    /// Time (in milliseconds) of a heartbeat interval.
    #[arg(long, env = "ETCD_HEARTBEAT_INTERVAL", default_value_t = 100)]
    pub heartbeat_interval: u64,
    /// Time (in milliseconds) for an election to timeout.
    #[arg(long, env = "ETCD_ELECTION_TIMEOUT", default_value_t = 1000)]
    pub election_timeout: u64,
    /// Enable the primary lessor to persist lease remaining TTLs (lease checkpoints), so a
    /// new leader (or a restart) does not start long-lived leases over at their full TTL.
    #[arg(long, env = "ETCD_EXPERIMENTAL_ENABLE_LEASE_CHECKPOINT", default_value_t = false,
          num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub experimental_enable_lease_checkpoint: bool,
    /// How often the leader checkpoints each lease's remaining TTL when lease checkpoints
    /// are enabled (a Go duration; etcd's built-in default is 5m).
    #[arg(
        long,
        env = "ETCD_EXPERIMENTAL_LEASE_CHECKPOINT_INTERVAL",
        default_value = "5m"
    )]
    pub experimental_lease_checkpoint_interval: String,
    /// Number of committed transactions to trigger a snapshot to disk (and a raft log
    /// compaction).
    #[arg(long, env = "ETCD_SNAPSHOT_COUNT", default_value_t = 100_000)]
    pub snapshot_count: u64,

    // Accepted so that etcd command lines start unchanged.
    /// etcd's logger choice (accepted; MetaStore always logs structured text to stderr).
    #[arg(long, env = "ETCD_LOGGER", hide = true)]
    pub logger: Option<String>,
    /// etcd's log outputs (accepted; MetaStore logs to stderr).
    #[arg(long, env = "ETCD_LOG_OUTPUTS", hide = true)]
    pub log_outputs: Option<String>,
}

fn default_engine_name() -> &'static str {
    if cfg!(feature = "rocksdb") {
        "rocksdb"
    } else {
        "memory"
    }
}

/// Which storage engine holds the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Memory,
    #[cfg(feature = "rocksdb")]
    RocksDb,
}

/// `--log-level`, as a tracing level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Debug,
    Info,
    Warn,
    Error,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        }
    }
}

/// `--initial-cluster-state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterState {
    New,
    Existing,
}

/// `--auto-compaction-mode` with a non-zero `--auto-compaction-retention`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoCompaction {
    /// Keep roughly this much wall-clock history.
    Periodic(Duration),
    /// Keep this many revisions behind the current one.
    Revision(i64),
}

/// An `http://host:port` URL as etcd accepts it: a scheme, a host with a port, nothing
/// else. The text is kept exactly as etcd would print it, because member IDs hash it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct HttpUrl {
    text: String,
    host: String,
    port: u16,
}

impl HttpUrl {
    /// Parses one URL with etcd's rules (`types.NewURLs`): http or https with host:port
    /// and no path. https is refused for now because TLS is not implemented: serving
    /// plaintext on a URL that promises TLS would mislead clients.
    pub fn parse(input: &str) -> Result<Self, ConfigError> {
        let input = input.trim();
        let bad = |why: &str| ConfigError(format!("{why}: {input}"));
        let (scheme, rest) = input
            .split_once("://")
            .ok_or_else(|| bad("URL scheme must be http, https, unix, or unixs"))?;
        let scheme = scheme.to_ascii_lowercase();
        match scheme.as_str() {
            "http" => {}
            "https" => {
                return Err(bad(
                    "TLS is not supported yet (https URLs are refused; use http)",
                ))
            }
            "unix" | "unixs" => return Err(bad("unix socket URLs are not supported yet")),
            _ => return Err(bad("URL scheme must be http, https, unix, or unixs")),
        }
        if rest.contains(['/', '?', '#']) {
            return Err(bad("URL must not contain a path"));
        }
        if rest.contains('@') {
            return Err(bad("URL must not contain user information"));
        }
        let (host, port) = split_host_port(rest)
            .ok_or_else(|| bad("URL address does not have the form \"host:port\""))?;
        let port: u16 = port
            .parse()
            .map_err(|_| bad("URL address does not have the form \"host:port\""))?;
        Ok(Self {
            text: format!("{scheme}://{rest}"),
            host: host.to_string(),
            port,
        })
    }

    /// Parses a comma-separated list, sorted as etcd sorts URLs (by their text).
    pub fn parse_list(input: &str) -> Result<Vec<Self>, ConfigError> {
        let mut urls = input
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(Self::parse)
            .collect::<Result<Vec<_>, _>>()?;
        if urls.is_empty() {
            return Err(ConfigError("no valid URLs given".into()));
        }
        urls.sort();
        Ok(urls)
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The socket address to bind for this URL. `localhost` binds the IPv4 loopback, as
    /// etcd's listener ends up doing; other names are resolved once at start.
    pub fn socket_addr(&self) -> Result<SocketAddr, ConfigError> {
        let host = self.host.trim_start_matches('[').trim_end_matches(']');
        if host.eq_ignore_ascii_case("localhost") {
            return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), self.port));
        }
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(SocketAddr::new(ip, self.port));
        }
        (host, self.port)
            .to_socket_addrs()
            .ok()
            .and_then(|mut addrs| addrs.next())
            .ok_or_else(|| ConfigError(format!("cannot resolve the host of {}", self.text)))
    }
}

impl fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

fn split_host_port(s: &str) -> Option<(&str, &str)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = after.strip_prefix(':')?;
        (!host.is_empty() && !port.is_empty()).then_some((&s[..host.len() + 2], port))
    } else {
        let (host, port) = s.rsplit_once(':')?;
        if host.contains(':') || port.is_empty() {
            return None;
        }
        Some((host, port))
    }
}

/// A configuration the runtime can start from: every flag parsed, defaulted and checked.
#[derive(Debug, Clone)]
pub struct Config {
    pub name: String,
    pub data_dir: PathBuf,
    pub listen_client_urls: Vec<HttpUrl>,
    pub advertise_client_urls: Vec<HttpUrl>,
    pub listen_peer_urls: Vec<HttpUrl>,
    pub initial_advertise_peer_urls: Vec<HttpUrl>,
    /// Member name -> its peer URLs (sorted), from `--initial-cluster`.
    pub initial_cluster: BTreeMap<String, Vec<HttpUrl>>,
    pub initial_cluster_state: ClusterState,
    pub initial_cluster_token: String,
    pub max_request_bytes: usize,
    pub max_txn_ops: usize,
    /// Backend quota in bytes; `None` when disabled (negative flag value).
    pub quota_backend_bytes: Option<u64>,
    pub auto_compaction: Option<AutoCompaction>,
    pub log_level: LogLevel,
    pub engine: Engine,
    pub heartbeat_interval: std::time::Duration,
    pub election_timeout: std::time::Duration,
    pub snapshot_count: u64,
    /// How often a watcher that asked for progress notifications and got no events
    /// hears the current revision.
    pub watch_progress_notify_interval: Duration,
    /// etcd's minimum lease TTL in seconds: 1.5 election timeouts (in whole heartbeat
    /// ticks), rounded up to a second (2 with the defaults). Grants below it are raised.
    pub min_lease_ttl: i64,
    /// Lease checkpoint interval when `--experimental-enable-lease-checkpoint` is on.
    pub lease_checkpoint_interval: Option<Duration>,
    /// etcd's `leaseRevokeRate`: at most this many expired leases revoked per second.
    pub lease_revoke_rate: u32,
}

/// A configuration error, worded for the operator; `main` prints it and exits non-zero.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Resolves defaults the way etcd does and checks the flags for consistency.
    pub fn from_flags(flags: Flags) -> Result<Self, ConfigError> {
        let name = flags.name.clone();
        let data_dir = flags
            .data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("{name}.etcd")));

        let listen_client_urls = HttpUrl::parse_list(
            flags
                .listen_client_urls
                .as_deref()
                .unwrap_or(DEFAULT_LISTEN_CLIENT_URLS),
        )
        .map_err(|e| ConfigError(format!("--listen-client-urls: {e}")))?;
        // etcd refuses --listen-client-urls without --advertise-client-urls. We advertise
        // the listen URLs instead: a single member has nobody to mislead, and a test
        // script that only sets the listen URL still starts.
        let advertise_client_urls = match (&flags.advertise_client_urls, &flags.listen_client_urls)
        {
            (Some(adv), _) => HttpUrl::parse_list(adv)
                .map_err(|e| ConfigError(format!("--advertise-client-urls: {e}")))?,
            (None, Some(_)) => listen_client_urls.clone(),
            (None, None) => HttpUrl::parse_list(DEFAULT_LISTEN_CLIENT_URLS)?,
        };
        let listen_peer_urls = HttpUrl::parse_list(&flags.listen_peer_urls)
            .map_err(|e| ConfigError(format!("--listen-peer-urls: {e}")))?;
        let initial_advertise_peer_urls =
            HttpUrl::parse_list(&flags.initial_advertise_peer_urls)
                .map_err(|e| ConfigError(format!("--initial-advertise-peer-urls: {e}")))?;

        // etcd: when only --name is given, the initial cluster becomes
        // "<name>=<advertised peer URLs>"; otherwise the default is
        // "default=http://localhost:2380".
        let initial_cluster_text = match &flags.initial_cluster {
            Some(text) => text.clone(),
            None if name != DEFAULT_NAME => {
                initial_cluster_from_name(&name, &initial_advertise_peer_urls)
            }
            None => format!("{DEFAULT_NAME}={DEFAULT_LISTEN_PEER_URLS}"),
        };
        let initial_cluster = parse_initial_cluster(&initial_cluster_text)?;
        check_local_member(&name, &initial_cluster, &initial_advertise_peer_urls)?;
        // etcd's checks of the raft timing flags, with its wording.
        if flags.heartbeat_interval == 0 {
            return Err(ConfigError("--heartbeat-interval must be positive".into()));
        }
        if 5 * flags.heartbeat_interval > flags.election_timeout {
            return Err(ConfigError(format!(
                "--election-timeout[{}ms] should be at least as 5 times as \
                 --heartbeat-interval[{}ms]",
                flags.election_timeout, flags.heartbeat_interval
            )));
        }
        if flags.election_timeout > 50_000 {
            return Err(ConfigError(format!(
                "--election-timeout[{}ms] is too long, and should be set less than 50000ms",
                flags.election_timeout
            )));
        }
        if flags.snapshot_count == 0 {
            return Err(ConfigError("--snapshot-count must be positive".into()));
        }

        let initial_cluster_state = match flags.initial_cluster_state.as_str() {
            "new" => ClusterState::New,
            "existing" => ClusterState::Existing,
            other => return Err(ConfigError(format!("unexpected clusterState {other:?}"))),
        };

        if flags.max_request_bytes == 0 {
            return Err(ConfigError("--max-request-bytes must be positive".into()));
        }
        if flags.max_txn_ops == 0 {
            return Err(ConfigError("--max-txn-ops must be positive".into()));
        }
        let quota_backend_bytes = match flags.quota_backend_bytes {
            q if q < 0 => None,
            0 => Some(DEFAULT_QUOTA_BYTES),
            q => Some(q as u64),
        };
        let auto_compaction = parse_auto_compaction(
            &flags.auto_compaction_mode,
            &flags.auto_compaction_retention,
        )?;
        let log_level = match flags.log_level.as_str() {
            "debug" => LogLevel::Debug,
            "info" => LogLevel::Info,
            "warn" => LogLevel::Warn,
            // etcd's panic and fatal levels only log errors (and worse).
            "error" | "panic" | "fatal" => LogLevel::Error,
            other => return Err(ConfigError(format!("unknown --log-level {other:?}"))),
        };
        let engine = match flags.engine.as_str() {
            "memory" => Engine::Memory,
            #[cfg(feature = "rocksdb")]
            "rocksdb" => Engine::RocksDb,
            #[cfg(not(feature = "rocksdb"))]
            "rocksdb" => {
                return Err(ConfigError(
                    "--engine rocksdb: this binary was built without the rocksdb feature".into(),
                ))
            }
            other => {
                return Err(ConfigError(format!(
                    "unknown --engine {other:?} (expected rocksdb or memory)"
                )))
            }
        };

        let watch_progress_notify_interval =
            parse_go_duration(&flags.experimental_watch_progress_notify_interval)
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    ConfigError(format!(
                        "--experimental-watch-progress-notify-interval: invalid duration {:?}",
                        flags.experimental_watch_progress_notify_interval
                    ))
                })?;
        let min_lease_ttl = min_lease_ttl(flags.heartbeat_interval, flags.election_timeout);
        let lease_checkpoint_interval = if flags.experimental_enable_lease_checkpoint {
            let text = flags.experimental_lease_checkpoint_interval.trim();
            match parse_go_duration(text) {
                Some(d) if !d.is_zero() => Some(d),
                _ => {
                    return Err(ConfigError(format!(
                        "--experimental-lease-checkpoint-interval: invalid duration {text:?}"
                    )))
                }
            }
        } else {
            None
        };

        Ok(Self {
            min_lease_ttl,
            lease_checkpoint_interval,
            lease_revoke_rate: DEFAULT_LEASE_REVOKE_RATE,
            name,
            data_dir,
            listen_client_urls,
            advertise_client_urls,
            listen_peer_urls,
            initial_advertise_peer_urls,
            initial_cluster,
            initial_cluster_state,
            initial_cluster_token: flags.initial_cluster_token,
            max_request_bytes: flags.max_request_bytes as usize,
            max_txn_ops: flags.max_txn_ops as usize,
            quota_backend_bytes,
            auto_compaction,
            log_level,
            engine,
            heartbeat_interval: std::time::Duration::from_millis(flags.heartbeat_interval),
            election_timeout: std::time::Duration::from_millis(flags.election_timeout),
            snapshot_count: flags.snapshot_count,
            watch_progress_notify_interval,
        })
    }

    /// A single in-memory member on an ephemeral loopback port, for tests.
    pub fn for_tests() -> Self {
        let flags = Flags::parse_from([
            "metastore",
            "--engine",
            "memory",
            "--listen-client-urls",
            "http://127.0.0.1:0",
            "--listen-peer-urls",
            "http://127.0.0.1:0",
        ]);
        let mut config = Self::from_flags(flags).expect("test flags are valid");
        config.data_dir = PathBuf::from("unused-by-the-memory-engine");
        config
    }

    /// The gRPC receive limit: etcd's `--max-request-bytes` plus the framing allowance.
    pub fn grpc_max_recv_bytes(&self) -> usize {
        self.max_request_bytes + GRPC_OVERHEAD_BYTES
    }

    /// This member's peer URLs as the initial cluster lists them (what its ID hashes).
    pub fn local_peer_urls(&self) -> &[HttpUrl] {
        self.initial_cluster
            .get(&self.name)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }
}

/// etcd's `leaseRevokeRate`.
pub const DEFAULT_LEASE_REVOKE_RATE: u32 = 1000;

/// etcd's minimum lease TTL: `(3 * electionTicks / 2) * heartbeat`, with electionTicks =
/// election timeout / heartbeat interval (integer ticks), rounded up to whole seconds.
pub fn min_lease_ttl(heartbeat_ms: u64, election_timeout_ms: u64) -> i64 {
    let ticks = election_timeout_ms / heartbeat_ms.max(1);
    let min_ms = (3 * ticks / 2) * heartbeat_ms;
    // A TTL of 0 cannot be granted (core refuses it), whatever the timing flags say.
    (min_ms.div_ceil(1000) as i64).max(1)
}

fn initial_cluster_from_name(name: &str, peer_urls: &[HttpUrl]) -> String {
    peer_urls
        .iter()
        .map(|u| format!("{name}={u}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Parses `name=url,name=url,...` (a name may repeat to give several URLs), with etcd's
/// duplicate-URL check.
fn parse_initial_cluster(text: &str) -> Result<BTreeMap<String, Vec<HttpUrl>>, ConfigError> {
    let mut raw: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, url) = pair.split_once('=').ok_or_else(|| {
            ConfigError(format!(
                "--initial-cluster: expected name=url, got {pair:?}"
            ))
        })?;
        raw.entry(name.to_string())
            .or_default()
            .push(url.to_string());
    }
    if raw.is_empty() {
        return Err(ConfigError(
            "initial cluster unset and no discovery URL found".into(),
        ));
    }
    let mut cluster = BTreeMap::new();
    let mut seen = std::collections::BTreeSet::new();
    for (name, urls) in raw {
        let urls = HttpUrl::parse_list(&urls.join(","))
            .map_err(|e| ConfigError(format!("--initial-cluster: {e}")))?;
        for u in &urls {
            if !seen.insert(u.as_str().to_string()) {
                return Err(ConfigError(format!(
                    "initial cluster {text} has duplicate url"
                )));
            }
        }
        cluster.insert(name, urls);
    }
    Ok(cluster)
}

/// etcd's `hasLocalMember` and `advertiseMatchesCluster`, with etcd's wording.
fn check_local_member(
    name: &str,
    cluster: &BTreeMap<String, Vec<HttpUrl>>,
    advertised: &[HttpUrl],
) -> Result<(), ConfigError> {
    let Some(listed) = cluster.get(name) else {
        return Err(ConfigError(format!(
            "couldn't find local name {name:?} in the initial cluster configuration"
        )));
    };
    if listed == advertised {
        return Ok(());
    }
    let advertised_text = advertised
        .iter()
        .map(HttpUrl::as_str)
        .collect::<Vec<_>>()
        .join(",");
    let missing: Vec<String> = listed
        .iter()
        .filter(|u| !advertised.contains(u))
        .map(|u| format!("{name}={u}"))
        .collect();
    if !missing.is_empty() {
        return Err(ConfigError(format!(
            "--initial-cluster has {} but missing from --initial-advertise-peer-urls={}",
            missing.join(","),
            advertised_text
        )));
    }
    let extra: Vec<&str> = advertised
        .iter()
        .filter(|u| !listed.contains(u))
        .map(HttpUrl::as_str)
        .collect();
    Err(ConfigError(format!(
        "--initial-advertise-peer-urls has {} but missing from --initial-cluster={}",
        extra.join(","),
        initial_cluster_from_name(name, advertised)
    )))
}

/// etcd's `parseCompactionRetention`: a bare integer is hours (periodic) or revisions
/// (revision); otherwise a Go-style duration ("30m", "1h30m", "5s"). Zero disables.
fn parse_auto_compaction(
    mode: &str,
    retention: &str,
) -> Result<Option<AutoCompaction>, ConfigError> {
    let retention = retention.trim();
    let parsed = match retention.parse::<i64>() {
        Ok(n) if n >= 0 => match mode {
            "revision" => AutoCompaction::Revision(n),
            _ => AutoCompaction::Periodic(Duration::from_secs(n as u64 * 3600)),
        },
        _ => {
            let d = parse_go_duration(retention).ok_or_else(|| {
                ConfigError(format!(
                    "error parsing CompactionRetention: invalid duration {retention:?}"
                ))
            })?;
            match mode {
                // etcd converts the duration to a count of nanoseconds and uses that as
                // a revision count; nobody means that, so refuse it clearly.
                "revision" => {
                    return Err(ConfigError(format!(
                        "--auto-compaction-retention={retention:?}: revision mode takes a \
                         number of revisions"
                    )))
                }
                _ => AutoCompaction::Periodic(d),
            }
        }
    };
    Ok(match parsed {
        AutoCompaction::Periodic(d) if d.is_zero() => None,
        AutoCompaction::Revision(0) => None,
        other => Some(other),
    })
}

/// A subset of Go's `time.ParseDuration`: a sequence of decimal numbers with units
/// h, m, s, ms, us/µs, ns (e.g. "1h30m", "2.5s"). Negative durations are refused.
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    if s.is_empty() {
        return None;
    }
    let mut rest = s;
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let value: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let nanos_per = match unit {
            "h" => 3_600e9,
            "m" => 60e9,
            "s" => 1e9,
            "ms" => 1e6,
            "us" | "µs" | "μs" => 1e3,
            "ns" => 1.0,
            _ => return None,
        };
        total += value * nanos_per;
    }
    Some(Duration::from_nanos(total.round() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let mut full = vec!["metastore"];
        full.extend_from_slice(args);
        Config::from_flags(Flags::try_parse_from(full).map_err(|e| ConfigError(e.to_string()))?)
    }

    #[test]
    fn defaults_match_etcd() {
        let c = parse(&["--engine", "memory"]).unwrap();
        assert_eq!(c.name, "default");
        assert_eq!(c.data_dir, PathBuf::from("default.etcd"));
        assert_eq!(c.listen_client_urls[0].as_str(), "http://localhost:2379");
        assert_eq!(
            c.listen_client_urls[0].socket_addr().unwrap(),
            "127.0.0.1:2379".parse().unwrap()
        );
        assert_eq!(c.advertise_client_urls[0].as_str(), "http://localhost:2379");
        assert_eq!(c.local_peer_urls()[0].as_str(), "http://localhost:2380");
        assert_eq!(c.initial_cluster_token, "etcd-cluster");
        assert_eq!(c.max_request_bytes, 1_572_864);
        assert_eq!(c.grpc_max_recv_bytes(), 1_572_864 + 524_288);
        assert_eq!(c.max_txn_ops, 128);
        assert_eq!(c.quota_backend_bytes, Some(2 * 1024 * 1024 * 1024));
        assert_eq!(c.auto_compaction, None);
        assert_eq!(c.initial_cluster_state, ClusterState::New);
        assert_eq!(c.log_level, LogLevel::Info);
        assert_eq!(c.min_lease_ttl, 2);
        assert_eq!(c.election_timeout, Duration::from_secs(1));
        assert_eq!(c.lease_checkpoint_interval, None);
        assert_eq!(c.lease_revoke_rate, 1000);
    }

    #[test]
    fn lease_flags() {
        // etcd: (3 * ticks / 2) * heartbeat, rounded up to seconds.
        assert_eq!(min_lease_ttl(100, 1000), 2);
        assert_eq!(min_lease_ttl(100, 500), 1);
        assert_eq!(min_lease_ttl(100, 3000), 5);
        assert_eq!(min_lease_ttl(300, 1000), 2); // 3 ticks -> 4 * 300 ms
        assert_eq!(min_lease_ttl(1000, 100), 1);
        let c = parse(&["--engine", "memory", "--election-timeout", "3000"]).unwrap();
        assert_eq!(c.min_lease_ttl, 5);
        let c = parse(&[
            "--engine",
            "memory",
            "--experimental-enable-lease-checkpoint",
        ])
        .unwrap();
        assert_eq!(c.lease_checkpoint_interval, Some(Duration::from_secs(300)));
        let c = parse(&[
            "--engine",
            "memory",
            "--experimental-enable-lease-checkpoint=true",
            "--experimental-lease-checkpoint-interval",
            "2s",
        ])
        .unwrap();
        assert_eq!(c.lease_checkpoint_interval, Some(Duration::from_secs(2)));
        assert!(parse(&[
            "--engine",
            "memory",
            "--experimental-enable-lease-checkpoint",
            "--experimental-lease-checkpoint-interval",
            "soon",
        ])
        .is_err());
    }

    #[cfg(feature = "rocksdb")]
    #[test]
    fn rocksdb_is_the_default_engine() {
        assert_eq!(parse(&[]).unwrap().engine, Engine::RocksDb);
    }

    #[test]
    fn name_only_derives_initial_cluster_and_data_dir() {
        let c = parse(&["--name", "infra1", "--engine", "memory"]).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("infra1.etcd"));
        assert_eq!(c.initial_cluster.keys().collect::<Vec<_>>(), vec!["infra1"]);
    }

    #[test]
    fn initial_cluster_must_name_this_member() {
        let e = parse(&[
            "--name",
            "a",
            "--initial-cluster",
            "b=http://localhost:2380",
        ])
        .unwrap_err();
        assert_eq!(
            e.0,
            "couldn't find local name \"a\" in the initial cluster configuration"
        );
    }

    #[test]
    fn initial_cluster_must_match_advertised_peer_urls() {
        let e = parse(&["--initial-advertise-peer-urls", "http://127.0.0.1:12380"]).unwrap_err();
        assert_eq!(
            e.0,
            "--initial-cluster has default=http://localhost:2380 but missing from \
             --initial-advertise-peer-urls=http://127.0.0.1:12380"
        );
        parse(&[
            "--engine",
            "memory",
            "--initial-advertise-peer-urls",
            "http://127.0.0.1:12380",
            "--initial-cluster",
            "default=http://127.0.0.1:12380",
        ])
        .unwrap();
    }

    #[test]
    fn multi_member_cluster_and_raft_timing() {
        let c = parse(&[
            "--name",
            "a",
            "--initial-advertise-peer-urls",
            "http://10.0.0.1:2380",
            "--initial-cluster",
            "a=http://10.0.0.1:2380,b=http://10.0.0.2:2380",
            "--heartbeat-interval",
            "50",
            "--election-timeout",
            "500",
        ])
        .unwrap();
        assert_eq!(c.initial_cluster.len(), 2);
        assert_eq!(c.heartbeat_interval, Duration::from_millis(50));
        assert_eq!(c.election_timeout, Duration::from_millis(500));
        assert_eq!(c.snapshot_count, 100_000);
        let e = parse(&["--heartbeat-interval", "300", "--election-timeout", "1000"]).unwrap_err();
        assert_eq!(
            e.0,
            "--election-timeout[1000ms] should be at least as 5 times as --heartbeat-interval[300ms]"
        );
        assert!(parse(&["--snapshot-count", "0"]).is_err());
    }

    #[test]
    fn urls_follow_etcd_rules() {
        assert!(HttpUrl::parse("https://127.0.0.1:2379")
            .unwrap_err()
            .0
            .contains("TLS"));
        assert!(HttpUrl::parse("http://127.0.0.1")
            .unwrap_err()
            .0
            .contains("host:port"));
        assert!(HttpUrl::parse("http://127.0.0.1:2379/x")
            .unwrap_err()
            .0
            .contains("path"));
        assert!(HttpUrl::parse("ftp://127.0.0.1:2379")
            .unwrap_err()
            .0
            .contains("scheme"));
        let v6 = HttpUrl::parse("http://[::1]:2379").unwrap();
        assert_eq!(v6.socket_addr().unwrap(), "[::1]:2379".parse().unwrap());
        let list = HttpUrl::parse_list("http://b:1,http://a:1").unwrap();
        assert_eq!(list[0].as_str(), "http://a:1");
    }

    #[test]
    fn listen_client_urls_alone_are_advertised() {
        let c = parse(&[
            "--engine",
            "memory",
            "--listen-client-urls",
            "http://127.0.0.1:23790",
        ])
        .unwrap();
        assert_eq!(
            c.advertise_client_urls[0].as_str(),
            "http://127.0.0.1:23790"
        );
    }

    #[test]
    fn compaction_retention_parses_like_etcd() {
        use AutoCompaction::*;
        let p = |m, r| parse_auto_compaction(m, r).unwrap();
        assert_eq!(
            p("periodic", "1"),
            Some(Periodic(Duration::from_secs(3600)))
        );
        assert_eq!(
            p("periodic", "30m"),
            Some(Periodic(Duration::from_secs(1800)))
        );
        assert_eq!(
            p("periodic", "1h30m"),
            Some(Periodic(Duration::from_secs(5400)))
        );
        assert_eq!(p("periodic", "0"), None);
        assert_eq!(p("revision", "1000"), Some(Revision(1000)));
        assert_eq!(p("revision", "0"), None);
        assert!(parse_auto_compaction("periodic", "abc").is_err());
        assert!(parse_auto_compaction("revision", "5m").is_err());
    }

    #[test]
    fn quota_zero_means_default_and_negative_disables() {
        let c = parse(&["--engine", "memory", "--quota-backend-bytes", "-1"]).unwrap();
        assert_eq!(c.quota_backend_bytes, None);
        let c = parse(&["--engine", "memory", "--quota-backend-bytes", "1000"]).unwrap();
        assert_eq!(c.quota_backend_bytes, Some(1000));
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("2.5s"), Some(Duration::from_millis(2500)));
        assert_eq!(parse_go_duration("100ms"), Some(Duration::from_millis(100)));
        assert_eq!(parse_go_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_go_duration("5"), None);
        assert_eq!(parse_go_duration("-5s"), None);
    }
}
