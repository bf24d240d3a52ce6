//! The proxy's configuration: `proxy.toml` parsed with serde, then validated as a whole
//! before any port is bound.
//!
//! Owns the file format, the defaults and the validation messages. Does not own runtime
//! state: the parts read what they need from a validated [`Config`] at start-up.
//!
//! Every key is documented in `docs/configuration.md`; keep the two in step.

pub use crate::tls::TlsConfig;
use serde::Deserialize;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A configuration problem, with the key it concerns. Start-up exits with code 2 on it.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

/// A duration written with units ("30s", "500ms", "1m"), as in the config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map(HumanDuration)
            .map_err(|e| serde::de::Error::custom(format!("invalid duration {s:?}: {e}")))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// RESP listener.
    #[serde(default = "defaults::listen")]
    pub listen: SocketAddr,
    /// HTTP sidecar listener (visits API, health, metrics, admin).
    #[serde(default = "defaults::http_listen")]
    pub http_listen: SocketAddr,
    /// Most client connections at once; the next one is told
    /// `-ERR max number of clients reached` and closed, as Redis does.
    #[serde(default = "defaults::maxclients")]
    pub maxclients: usize,
    /// Standalone Redis servers behind the proxy. None: memory mode (counters live in the proxy).
    #[serde(default)]
    pub shards: Vec<ShardConfig>,
    #[serde(default)]
    pub ring: RingConfig,
    /// Sentinels for `master` shards.
    #[serde(default)]
    pub sentinel: SentinelConfig,
    /// A Redis Cluster behind the proxy instead of `[[shards]]` (see `cluster`).
    pub cluster: Option<ClusterConfig>,
    #[serde(default)]
    pub backend: BackendConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub counters: CountersConfig,
    #[serde(default)]
    pub durability: DurabilityConfig,
    #[serde(default)]
    pub windows: WindowsConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub rebalance: RebalanceConfig,
    /// Bearer token for `/admin/*`. Without one, admin routes answer loopback peers only.
    pub admin_token: Option<Secret>,
    /// Password of the default user, as in redis.conf. Clients must AUTH first when set.
    pub requirepass: Option<Secret>,
    /// Named users (`AUTH <name> <password>`), ACL-style but without per-command rules.
    #[serde(default)]
    pub users: Vec<UserConfig>,
    /// TLS on the RESP listener: with it, `listen` speaks TLS only.
    pub tls: Option<TlsConfig>,
    /// How long an orderly shutdown may take in all (finish commands, final flush, drain HTTP).
    #[serde(default = "defaults::shutdown_timeout")]
    pub shutdown_timeout: HumanDuration,
    /// Threads that run connections and lanes; 0: one fewer than the CPUs, at least one.
    #[serde(default)]
    pub worker_threads: usize,
    /// The wall clock for time windows: the system's, or a test's (never from the file).
    #[serde(skip)]
    pub clock: crate::clock::Clock,
}

/// A secret: the value itself, or where to read it, so that it need not sit in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Secret {
    Plain(String),
    Env { env: String },
    File { file: PathBuf },
}

impl From<&str> for Secret {
    fn from(s: &str) -> Secret {
        Secret::Plain(s.to_string())
    }
}

impl Secret {
    /// The secret's value; `what` names the key in errors (never the value).
    pub fn resolve(&self, what: &str) -> Result<String, String> {
        let v = self.read(what)?;
        if v.is_empty() {
            return Err(format!("{what}: must not be empty"));
        }
        Ok(v)
    }

    fn read(&self, what: &str) -> Result<String, String> {
        match self {
            Secret::Plain(s) => Ok(s.clone()),
            Secret::Env { env } => std::env::var(env)
                .map_err(|_| format!("{what}: environment variable {env} is not set")),
            Secret::File { file } => std::fs::read_to_string(file)
                .map(|s| s.trim_end_matches(['\r', '\n']).to_string())
                .map_err(|e| format!("{what}: cannot read {}: {e}", file.display())),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    pub password: Secret,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardConfig {
    /// `redis_<port>` when not given; `served_via` reports it. Required with `master`:
    /// the name is the shard's ring position, whichever server is its primary.
    pub name: Option<String>,
    /// The shard's Redis server, `ip:port`. Exactly one of `addr` and `master`.
    #[serde(default)]
    pub addr: String,
    /// A Sentinel master name instead of `addr`: the shard's primary is asked of
    /// `[sentinel] addrs` and followed through failovers (see `backend::follower`).
    pub master: Option<String>,
    /// Share of the ring relative to other shards (vnodes × weight points).
    #[serde(default = "defaults::weight")]
    pub weight: u32,
    /// Credentials sent on every (re)connect to this shard; default `[backend]`'s.
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// Speak TLS to this shard; default `[backend] tls`.
    pub tls: Option<bool>,
    /// Name the shard's certificate must carry; default its IP address.
    pub tls_server_name: Option<String>,
}

impl ShardConfig {
    pub fn socket_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.addr.parse().or_else(|_| {
            err(format!(
                "shards: addr {:?} is not an ip:port address",
                self.addr
            ))
        })
    }

    /// What the log and the ring record as the shard's address: `ip:port`, or
    /// `master:<name>` for a Sentinel-managed shard (see `spec::ShardSpec::master`).
    pub fn spec_addr(&self) -> Result<String, ConfigError> {
        match &self.master {
            Some(m) => Ok(format!("{}{m}", crate::spec::MASTER_PREFIX)),
            None => Ok(self.socket_addr()?.to_string()),
        }
    }

    /// The shard's name: as configured, or `redis_<port>`.
    pub fn resolved_name(&self) -> String {
        match &self.name {
            Some(n) => n.clone(),
            None => match self.addr.rsplit_once(':') {
                Some((_, port)) => format!("redis_{port}"),
                None => format!("redis_{}", self.addr),
            },
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RingConfig {
    /// Points on the ring per shard (per unit of weight). 160 is ketama's and twemproxy's.
    #[serde(default = "defaults::vnodes")]
    pub vnodes: u32,
}

impl Default for RingConfig {
    fn default() -> Self {
        RingConfig {
            vnodes: defaults::vnodes(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// Long-lived connections per shard for forwarded commands; requests are pipelined on them.
    #[serde(default = "defaults::pool_size")]
    pub pool_size: usize,
    /// A request with no reply by then is answered with an error naming the shard.
    #[serde(default = "defaults::request_timeout")]
    pub timeout: HumanDuration,
    /// Time allowed to open a connection to a shard.
    #[serde(default = "defaults::connect_timeout")]
    pub connect_timeout: HumanDuration,
    /// Requests queued per backend connection before callers are told the shard is busy.
    #[serde(default = "defaults::queue_depth")]
    pub queue_depth: usize,
    /// Health check period (PING).
    #[serde(default = "defaults::health_interval")]
    pub health_interval: HumanDuration,
    /// Consecutive failed checks before a shard is marked down.
    #[serde(default = "defaults::health_failures")]
    pub health_failures: u32,
    /// Credentials for shards that name none (also used for shards added at run time).
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// Speak TLS to shards (each may override with its own `tls`).
    #[serde(default)]
    pub tls: bool,
    /// PEM CA that shard certificates must chain to; required when any shard uses TLS.
    pub tls_ca_file: Option<PathBuf>,
    /// A flushed batch counts as landed only once `WAIT` confirms this many replicas have
    /// it (0: once the primary applied it). One meaning for the whole proxy.
    #[serde(default)]
    pub wait_replicas: u32,
    /// How long one `WAIT` may block; a batch it does not confirm is retried (same id).
    #[serde(default = "defaults::wait_timeout")]
    pub wait_timeout: HumanDuration,
    /// Dedicated shard connections open at once, for all clients: one per client holding a
    /// WATCH or running EXEC, one per subscribed client, one per blocked command. Past it
    /// those commands are refused with a clear error (never waited on).
    #[serde(default = "defaults::max_dedicated")]
    pub max_dedicated: usize,
}

/// A Redis Cluster behind the proxy: its nodes are learned from the seeds.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Any reachable nodes of the cluster, asked in turn for the slot map.
    pub seeds: Vec<SocketAddr>,
    /// As `[backend] wait_replicas`, for the cluster's primaries (default: `[backend]`'s).
    pub wait_replicas: Option<u32>,
    /// As `[backend] wait_timeout` (default: `[backend]`'s).
    pub wait_timeout: Option<HumanDuration>,
    /// How often the slot map is asked for when nothing prompts it.
    #[serde(default = "defaults::cluster_refresh")]
    pub refresh_interval: HumanDuration,
}

/// The Sentinels that know the primaries of `master` shards.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SentinelConfig {
    /// Asked in turn; one subscription at a time follows `+switch-master`.
    #[serde(default)]
    pub addrs: Vec<SocketAddr>,
    /// Credentials sent to every sentinel (`AUTH [username] password`).
    pub username: Option<String>,
    pub password: Option<Secret>,
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            pool_size: defaults::pool_size(),
            timeout: defaults::request_timeout(),
            connect_timeout: defaults::connect_timeout(),
            queue_depth: defaults::queue_depth(),
            health_interval: defaults::health_interval(),
            health_failures: defaults::health_failures(),
            username: None,
            password: None,
            tls: false,
            tls_ca_file: None,
            wait_replicas: 0,
            wait_timeout: defaults::wait_timeout(),
            max_dedicated: defaults::max_dedicated(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Longest bulk string a client may send: 512 MB, Redis's `proto-max-bulk-len`, so that
    /// what Redis accepts the proxy accepts; memory is protected by `max_input_bytes`.
    #[serde(default = "defaults::max_bulk_len")]
    pub max_bulk_len: usize,
    /// Most arguments in one command.
    #[serde(default = "defaults::max_array_len")]
    pub max_array_len: usize,
    /// Longest inline (telnet-style) command line.
    #[serde(default = "defaults::max_inline_len")]
    pub max_inline_len: usize,
    /// Most bytes one command may claim in all (sum of its arguments): the cap on one
    /// connection's request in progress.
    #[serde(default = "defaults::max_request_bytes")]
    pub max_request_bytes: usize,
    /// Most bytes all client connections may hold in their read buffers at once (each
    /// connection's first 64 KiB not counted); a connection that would pass it gets a
    /// protocol error and is closed.
    #[serde(default = "defaults::max_input_bytes")]
    pub max_input_bytes: usize,
    /// Commands of one client in flight at once; past it the proxy stops reading that
    /// client's socket until replies are written (back-pressure, not buffering).
    #[serde(default = "defaults::max_pipeline")]
    pub max_pipeline: usize,
    /// Replies held for one client before they are written out mid-burst; a client that
    /// does not read then stops being read (back-pressure), never buffered without bound.
    #[serde(default = "defaults::max_output_bytes")]
    pub max_output_bytes: usize,
    /// Close a client that sends nothing for this long; "0s" never (Redis's `timeout 0`).
    #[serde(default = "defaults::idle_timeout")]
    pub idle_timeout: HumanDuration,
    /// Close a client that has not taken its replies within this long.
    #[serde(default = "defaults::write_timeout")]
    pub write_timeout: HumanDuration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_bulk_len: defaults::max_bulk_len(),
            max_array_len: defaults::max_array_len(),
            max_inline_len: defaults::max_inline_len(),
            max_request_bytes: defaults::max_request_bytes(),
            max_input_bytes: defaults::max_input_bytes(),
            max_pipeline: defaults::max_pipeline(),
            max_output_bytes: defaults::max_output_bytes(),
            idle_timeout: defaults::idle_timeout(),
            write_timeout: defaults::write_timeout(),
        }
    }
}

/// Time-windowed counts (see `counter::windows`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowsConfig {
    /// Glob patterns of the counter keys that also count into time buckets. Empty: none.
    #[serde(rename = "match", default = "defaults::windows_match")]
    pub patterns: Vec<String>,
    /// How long per-second buckets are kept.
    #[serde(default = "defaults::keep_seconds")]
    pub seconds: Retention,
    /// How long per-minute buckets are kept.
    #[serde(default = "defaults::keep_minutes")]
    pub minutes: Retention,
    /// How long per-hour buckets are kept.
    #[serde(default = "defaults::keep_hours")]
    pub hours: Retention,
    /// How long per-day buckets are kept.
    #[serde(default = "defaults::keep_days")]
    pub days: Retention,
}

impl Default for WindowsConfig {
    fn default() -> Self {
        WindowsConfig {
            patterns: defaults::windows_match(),
            seconds: defaults::keep_seconds(),
            minutes: defaults::keep_minutes(),
            hours: defaults::keep_hours(),
            days: defaults::keep_days(),
        }
    }
}

/// How long one granularity of buckets is kept: `"off"`, `"forever"`, or a duration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    Off,
    For(Duration),
    Forever,
}

impl<'de> Deserialize<'de> for Retention {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "off" => Ok(Retention::Off),
            "forever" => Ok(Retention::Forever),
            _ => humantime::parse_duration(&s)
                .map(Retention::For)
                .map_err(|e| {
                    serde::de::Error::custom(format!(
                        "invalid retention {s:?} (a duration, \"off\" or \"forever\"): {e}"
                    ))
                }),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CounterMode {
    /// Increments are merged in memory and flushed exactly once.
    Batched,
    /// Increments go straight to Redis (strict INCR, e.g. ID generators).
    Direct,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CounterPattern {
    pub pattern: String,
    #[serde(default = "defaults::mode")]
    pub mode: CounterMode,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CountersConfig {
    /// Glob patterns, first match wins; keys matching none are plain keys (forwarded).
    #[serde(rename = "match", default = "defaults::counter_match")]
    pub patterns: Vec<CounterPattern>,
    /// How long a value read from a shard answers reads without asking the shard again.
    #[serde(default = "defaults::cache_ttl")]
    pub cache_ttl: HumanDuration,
    /// Period of the background flush of merged increments.
    #[serde(default = "defaults::flush_interval")]
    pub flush_interval: HumanDuration,
    /// Pending keys (all shards) that trigger an early flush.
    #[serde(default = "defaults::max_pending_keys")]
    pub max_pending_keys: usize,
    /// Keys sent in one flush round trip; larger flushes take several.
    #[serde(default = "defaults::flush_batch_keys")]
    pub flush_batch_keys: usize,
    /// The share of `flush_interval` a periodic flush spreads its batches over (0: as fast
    /// as the shards take them).
    #[serde(default = "defaults::flush_spread")]
    pub flush_spread: f64,
}

impl CountersConfig {
    /// How long a periodic flush spreads its batches over: `flush_spread` of the interval.
    pub fn flush_spread_time(&self) -> Duration {
        self.flush_interval.0.mul_f64(self.flush_spread)
    }
}

impl Default for CountersConfig {
    fn default() -> Self {
        CountersConfig {
            patterns: defaults::counter_match(),
            cache_ttl: defaults::cache_ttl(),
            flush_interval: defaults::flush_interval(),
            max_pending_keys: defaults::max_pending_keys(),
            flush_batch_keys: defaults::flush_batch_keys(),
            flush_spread: defaults::flush_spread(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fsync {
    Always,
    Everysec,
    No,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DurabilityConfig {
    /// Write-ahead log directory. Relative paths are relative to the working directory.
    #[serde(default = "defaults::wal_dir")]
    pub wal_dir: PathBuf,
    #[serde(default = "defaults::fsync")]
    pub fsync: Fsync,
    /// Segment size that triggers a checkpoint and the deletion of older segments.
    #[serde(default = "defaults::wal_segment_bytes")]
    pub segment_bytes: u64,
    /// Stable identity of this proxy in the shards' exactly-once records. Generated and
    /// stored in `wal_dir` when not given.
    pub proxy_id: Option<String>,
    /// Off: no log at all (increments between flushes are lost on a crash). For benchmarks.
    #[serde(default = "defaults::wal_enabled")]
    pub enabled: bool,
}

impl Default for DurabilityConfig {
    fn default() -> Self {
        DurabilityConfig {
            wal_dir: defaults::wal_dir(),
            fsync: defaults::fsync(),
            segment_bytes: defaults::wal_segment_bytes(),
            proxy_id: None,
            enabled: defaults::wal_enabled(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RebalanceConfig {
    /// Most keys moved per second by a rebalance, so that clients keep their latency.
    #[serde(default = "defaults::keys_per_second")]
    pub keys_per_second: u32,
}

impl Default for RebalanceConfig {
    fn default() -> Self {
        RebalanceConfig {
            keys_per_second: defaults::keys_per_second(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `RUST_LOG`-style filter; the `RUST_LOG` environment variable wins when set.
    #[serde(default = "defaults::log_level")]
    pub level: String,
    /// One JSON object per line instead of the human format.
    #[serde(default)]
    pub json: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: defaults::log_level(),
            json: false,
        }
    }
}

mod defaults {
    use super::*;
    pub fn listen() -> SocketAddr {
        "127.0.0.1:6380".parse().unwrap()
    }
    pub fn http_listen() -> SocketAddr {
        "127.0.0.1:8080".parse().unwrap()
    }
    pub fn maxclients() -> usize {
        10_000
    }
    pub fn weight() -> u32 {
        1
    }
    pub fn vnodes() -> u32 {
        160
    }
    pub fn pool_size() -> usize {
        2
    }
    pub fn request_timeout() -> HumanDuration {
        HumanDuration(Duration::from_secs(1))
    }
    pub fn connect_timeout() -> HumanDuration {
        HumanDuration(Duration::from_millis(500))
    }
    pub fn queue_depth() -> usize {
        4096
    }
    pub fn max_dedicated() -> usize {
        256
    }
    pub fn wait_timeout() -> HumanDuration {
        HumanDuration(Duration::from_secs(1))
    }
    pub fn health_interval() -> HumanDuration {
        HumanDuration(Duration::from_secs(1))
    }
    pub fn health_failures() -> u32 {
        3
    }
    pub fn cluster_refresh() -> HumanDuration {
        HumanDuration(Duration::from_secs(5))
    }

    pub fn max_bulk_len() -> usize {
        512 * 1024 * 1024
    }
    pub fn max_array_len() -> usize {
        1024 * 1024
    }
    pub fn max_inline_len() -> usize {
        64 * 1024
    }
    pub fn max_request_bytes() -> usize {
        1024 * 1024 * 1024
    }
    pub fn max_input_bytes() -> usize {
        1024 * 1024 * 1024
    }
    pub fn max_pipeline() -> usize {
        1024
    }
    pub fn max_output_bytes() -> usize {
        64 * 1024 * 1024
    }
    pub fn idle_timeout() -> HumanDuration {
        HumanDuration(Duration::ZERO)
    }
    pub fn write_timeout() -> HumanDuration {
        HumanDuration(Duration::from_secs(30))
    }
    pub fn mode() -> CounterMode {
        CounterMode::Batched
    }
    pub fn windows_match() -> Vec<String> {
        vec!["visits:*".into()]
    }
    pub fn keep_seconds() -> Retention {
        Retention::For(Duration::from_secs(3600))
    }
    pub fn keep_minutes() -> Retention {
        Retention::For(Duration::from_secs(7 * 86400))
    }
    pub fn keep_hours() -> Retention {
        Retention::For(Duration::from_secs(90 * 86400))
    }
    pub fn keep_days() -> Retention {
        Retention::Forever
    }
    pub fn counter_match() -> Vec<CounterPattern> {
        vec![CounterPattern {
            pattern: "*".into(),
            mode: CounterMode::Batched,
        }]
    }
    pub fn cache_ttl() -> HumanDuration {
        HumanDuration(Duration::from_secs(5))
    }
    pub fn flush_interval() -> HumanDuration {
        HumanDuration(Duration::from_secs(30))
    }
    pub fn max_pending_keys() -> usize {
        100_000
    }
    pub fn flush_batch_keys() -> usize {
        1000
    }
    pub fn flush_spread() -> f64 {
        0.5
    }
    pub fn wal_dir() -> PathBuf {
        PathBuf::from("data/wal")
    }
    pub fn fsync() -> Fsync {
        Fsync::Everysec
    }
    pub fn wal_segment_bytes() -> u64 {
        64 * 1024 * 1024
    }
    pub fn wal_enabled() -> bool {
        true
    }
    pub fn keys_per_second() -> u32 {
        5000
    }
    pub fn log_level() -> String {
        "info".into()
    }
    pub fn shutdown_timeout() -> HumanDuration {
        HumanDuration(Duration::from_secs(10))
    }
}

impl Default for Config {
    fn default() -> Self {
        Config::from_toml_str("").expect("the empty config is valid")
    }
}

impl Config {
    /// The runtime's worker threads: `worker_threads`, or with 0 one fewer than the CPUs
    /// (at least one). The proxy shares its machine with at least a shard or its clients
    /// (see docs/performance.md for the measurement behind the default).
    pub fn runtime_threads(&self) -> usize {
        match self.worker_threads {
            0 => std::thread::available_parallelism()
                .map(|n| n.get().saturating_sub(1).max(1))
                .unwrap_or(1),
            n => n,
        }
    }

    /// Parses and validates a whole config file's text.
    pub fn from_toml_str(s: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(s).map_err(|e| ConfigError(format!("config: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads, parses and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("config: cannot read {}: {e}", path.display())))?;
        Config::from_toml_str(&text).map_err(|e| ConfigError(format!("{}: {}", path.display(), e)))
    }

    /// The `[[shards]]` list as the log and the ring see it.
    /// Replicas that must confirm a flushed batch: `[cluster]`'s in cluster mode when it
    /// sets one, else `[backend]`'s.
    pub fn wait_replicas(&self) -> u32 {
        self.cluster
            .as_ref()
            .and_then(|c| c.wait_replicas)
            .unwrap_or(self.backend.wait_replicas)
    }

    pub fn wait_timeout(&self) -> Duration {
        self.cluster
            .as_ref()
            .and_then(|c| c.wait_timeout)
            .unwrap_or(self.backend.wait_timeout)
            .0
    }

    pub fn shard_specs(&self) -> Vec<crate::spec::ShardSpec> {
        self.shards
            .iter()
            .map(|s| crate::spec::ShardSpec {
                name: s.resolved_name(),
                addr: s.spec_addr().expect("validated"),
                weight: s.weight,
            })
            .collect()
    }

    /// The AUTH arguments for the shard named `name`: its own credentials, else
    /// `[backend]`'s; None when it needs none. A secret that cannot be read is an error,
    /// never a silent connection without AUTH.
    pub fn shard_auth(&self, name: &str) -> Result<Option<Vec<String>>, String> {
        let own = self.shards.iter().find(|s| s.resolved_name() == name);
        let (user, pw) = match own {
            Some(s) if s.password.is_some() || s.username.is_some() => {
                (s.username.clone(), s.password.as_ref())
            }
            _ => (
                self.backend.username.clone(),
                self.backend.password.as_ref(),
            ),
        };
        let Some(pw) = pw else {
            return match user {
                Some(_) => Err(format!("shard {name}: a username needs a password")),
                None => Ok(None),
            };
        };
        let pw = pw.resolve(&format!("password of shard {name}"))?;
        let mut args = vec!["AUTH".to_string()];
        args.extend(user);
        args.push(pw);
        Ok(Some(args))
    }

    /// The TLS connector and server name for the shard named `name`, when it speaks TLS.
    /// A TLS setting that cannot be honoured is an error, never a silent plain connection.
    #[allow(clippy::type_complexity)]
    pub fn shard_tls(
        &self,
        name: &str,
        addr: SocketAddr,
    ) -> Result<
        Option<(
            tokio_rustls::TlsConnector,
            tokio_rustls::rustls::pki_types::ServerName<'static>,
        )>,
        String,
    > {
        let own = self.shards.iter().find(|s| s.resolved_name() == name);
        if !own.and_then(|s| s.tls).unwrap_or(self.backend.tls) {
            return Ok(None);
        }
        let ca = self
            .backend
            .tls_ca_file
            .as_ref()
            .ok_or("backend.tls_ca_file is required when a shard uses TLS")?;
        let connector = crate::tls::connector(ca)?;
        let server = crate::tls::server_name(own.and_then(|s| s.tls_server_name.as_deref()), addr)?;
        Ok(Some((connector, server)))
    }

    /// Checks what serde cannot: uniqueness, ranges, and that values fit together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        /// Whether connecting to `addr` reaches the listener bound at `own`.
        fn is_own(own: std::net::SocketAddr, addr: std::net::SocketAddr) -> bool {
            own.port() != 0
                && own.port() == addr.port()
                && (own.ip() == addr.ip()
                    || (own.ip().is_unspecified()
                        && (addr.ip().is_loopback() || addr.ip().is_unspecified())))
        }
        if let Some(c) = &self.cluster {
            if !self.shards.is_empty() {
                return err("cluster: [cluster] and [[shards]] cannot both be given: the cluster's nodes are learned from its seeds");
            }
            if c.seeds.is_empty() {
                return err("cluster: seeds must name at least one node");
            }
            if let Some(own) = c
                .seeds
                .iter()
                .find(|a| is_own(self.listen, **a) || is_own(self.http_listen, **a))
            {
                return err(format!("cluster: seed {own} is the proxy's own listener"));
            }
            if c.refresh_interval.0 < Duration::from_millis(100) {
                return err("cluster: refresh_interval must be at least 100ms");
            }
            if self.wait_replicas() > 0
                && (self.wait_timeout().is_zero() || self.wait_timeout() > self.backend.timeout.0)
            {
                return err("cluster.wait_timeout must be above zero and at most backend.timeout");
            }
        }
        let mut names = HashSet::new();
        let mut addrs = HashSet::new();
        let mut masters = HashSet::new();
        for s in &self.shards {
            let name = s.resolved_name();
            if let Some(m) = &s.master {
                if !s.addr.is_empty() {
                    return err(format!(
                        "shards: {name:?} has both addr and master; give exactly one"
                    ));
                }
                if s.name.is_none() {
                    return err(format!(
                        "shards: the shard with master {m:?} needs a name (its ring position)"
                    ));
                }
                if m.is_empty() || m.contains(char::is_whitespace) {
                    return err(format!(
                        "shards: master {m:?} must be a Sentinel master name"
                    ));
                }
                if self.sentinel.addrs.is_empty() {
                    return err(format!(
                        "shards: {name:?} names master {m:?}, which needs [sentinel] addrs"
                    ));
                }
                if !names.insert(name.clone()) {
                    return err(format!("shards: duplicate shard name {name:?}"));
                }
                if !masters.insert(m.clone()) {
                    return err(format!("shards: duplicate master {m:?}"));
                }
                if s.weight == 0 || s.weight > 100 {
                    return err(format!("shards: weight of {name:?} must be 1-100"));
                }
                if s.tls.unwrap_or(self.backend.tls) && s.tls_server_name.is_none() {
                    return err(format!(
                        "shards: {name:?} uses TLS with a master whose address changes; give tls_server_name"
                    ));
                }
                continue;
            }
            if s.addr.is_empty() {
                return err(format!("shards: {name:?} needs addr (or master)"));
            }
            let addr = s.socket_addr()?;
            if name.is_empty() || name.len() > 64 || name.contains(char::is_whitespace) {
                return err(format!(
                    "shards: name {name:?} must be 1-64 characters without spaces"
                ));
            }
            if !names.insert(name.clone()) {
                return err(format!("shards: duplicate shard name {name:?}"));
            }
            if !addrs.insert(addr) {
                return err(format!("shards: duplicate shard addr {:?}", s.addr));
            }
            if s.weight == 0 || s.weight > 100 {
                return err(format!("shards: weight of {name:?} must be 1-100"));
            }
            // The proxy's own ports are never Redis (start-up asks every shard that answers
            // anyway, see `backend::identity`; this catches it before any port is bound).
            for (what, own) in [("listen", self.listen), ("http_listen", self.http_listen)] {
                if is_own(own, addr) {
                    return err(format!(
                        "shards: {name} at {addr} is this proxy's own {what} address, not a Redis server"
                    ));
                }
            }
        }
        if self.ring.vnodes == 0 || self.ring.vnodes > 10_000 {
            return err("ring.vnodes must be 1-10000");
        }
        if self.maxclients == 0 {
            return err("maxclients must be at least 1");
        }
        if self.worker_threads > 1024 {
            return err("worker_threads must be 0 (automatic) to 1024");
        }
        let w = &self.windows;
        for (name, r, unit) in [
            ("seconds", w.seconds, 1),
            ("minutes", w.minutes, 60),
            ("hours", w.hours, 3600),
            ("days", w.days, 86400),
        ] {
            if let Retention::For(d) = r {
                if d.as_secs() < unit {
                    return err(format!(
                        "windows.{name} must keep at least one bucket ({unit}s), \"off\" or \"forever\""
                    ));
                }
            }
        }
        if w.patterns.iter().any(|p| p.is_empty()) {
            return err("windows.match: patterns must not be empty");
        }
        let b = &self.backend;
        if b.pool_size == 0 || b.pool_size > 64 {
            return err("backend.pool_size must be 1-64");
        }
        if b.max_dedicated == 0 || b.max_dedicated > 100_000 {
            return err("backend.max_dedicated must be 1-100000");
        }
        if b.timeout.0.is_zero() {
            return err("backend.timeout must be above zero");
        }
        if b.connect_timeout.0.is_zero() {
            return err("backend.connect_timeout must be above zero");
        }
        if b.queue_depth == 0 {
            return err("backend.queue_depth must be at least 1");
        }
        if b.health_interval.0.is_zero() {
            return err("backend.health_interval must be above zero");
        }
        if b.health_failures == 0 {
            return err("backend.health_failures must be at least 1");
        }
        if b.wait_replicas > 0 && (b.wait_timeout.0.is_zero() || b.wait_timeout.0 > b.timeout.0) {
            return err("backend.wait_timeout must be above zero and at most backend.timeout");
        }
        if let Some(p) = &self.sentinel.password {
            p.resolve("sentinel.password").map_err(ConfigError)?;
        } else if self.sentinel.username.is_some() {
            return err("sentinel: a username needs a password");
        }
        let l = &self.limits;
        if l.max_bulk_len == 0 || l.max_bulk_len > 512 * 1024 * 1024 {
            return err("limits.max_bulk_len must be 1 byte to 512 MB");
        }
        if l.max_array_len == 0 {
            return err("limits.max_array_len must be at least 1");
        }
        if l.max_inline_len < 16 {
            return err("limits.max_inline_len must be at least 16");
        }
        if l.max_request_bytes < l.max_bulk_len {
            return err("limits.max_request_bytes must be at least limits.max_bulk_len");
        }
        if l.max_input_bytes < l.max_bulk_len {
            return err("limits.max_input_bytes must be at least limits.max_bulk_len");
        }
        if l.max_pipeline == 0 {
            return err("limits.max_pipeline must be at least 1");
        }
        let c = &self.counters;
        for p in &c.patterns {
            if p.pattern.is_empty() {
                return err("counters.match: empty pattern");
            }
        }
        if c.cache_ttl.0 < Duration::from_millis(10) {
            return err("counters.cache_ttl must be at least 10ms");
        }
        if c.flush_interval.0.is_zero() {
            return err("counters.flush_interval must be above zero");
        }
        if c.max_pending_keys == 0 {
            return err("counters.max_pending_keys must be at least 1");
        }
        if c.flush_batch_keys == 0 || c.flush_batch_keys > 100_000 {
            return err("counters.flush_batch_keys must be 1-100000");
        }
        if !(0.0..=1.0).contains(&c.flush_spread) {
            return err("counters.flush_spread must be 0-1");
        }
        if self.rebalance.keys_per_second == 0 {
            return err("rebalance.keys_per_second must be at least 1");
        }
        let mut user_names = HashSet::new();
        for u in &self.users {
            if u.name.is_empty()
                || u.name == "default"
                || !u.name.bytes().all(|b| b.is_ascii_graphic())
            {
                return err(format!(
                    "users: name {:?} must be printable and not \"default\" (use requirepass)",
                    u.name
                ));
            }
            if !user_names.insert(u.name.clone()) {
                return err(format!("users: duplicate user {:?}", u.name));
            }
            u.password
                .resolve(&format!("users.{}.password", u.name))
                .map_err(ConfigError)?;
        }
        for s in &self.shards {
            if let Some(p) = &s.password {
                p.resolve(&format!("shards.{}.password", s.resolved_name()))
                    .map_err(ConfigError)?;
            }
        }
        if let Some(p) = &self.backend.password {
            p.resolve("backend.password").map_err(ConfigError)?;
        }
        if let Some(p) = &self.requirepass {
            p.resolve("requirepass").map_err(ConfigError)?;
        }
        if let Some(t) = &self.tls {
            crate::tls::acceptor(t).map_err(ConfigError)?;
        }
        if let Some(ca) = &self.backend.tls_ca_file {
            crate::tls::connector(ca).map_err(ConfigError)?;
        }
        for s in &self.shards {
            let name = s.resolved_name();
            let addr = match &s.master {
                Some(_) => SocketAddr::from(([127, 0, 0, 1], 0)),
                None => s.socket_addr()?,
            };
            self.shard_tls(&name, addr).map_err(ConfigError)?;
            self.shard_auth(&name).map_err(ConfigError)?;
        }
        if self.backend.tls && self.backend.tls_ca_file.is_none() {
            return err("backend.tls_ca_file is required when a shard uses TLS");
        }
        if self.limits.write_timeout.0.is_zero() {
            return err("limits.write_timeout must be above zero");
        }
        if self.limits.max_output_bytes < 4096 {
            return err("limits.max_output_bytes must be at least 4096");
        }
        if let Some(t) = &self.admin_token {
            if t.resolve("admin_token").map_err(ConfigError)?.len() < 16 {
                return err("admin_token must be at least 16 characters");
            }
        }
        if self.durability.segment_bytes < 4096 {
            return err("durability.segment_bytes must be at least 4096");
        }
        if let Some(id) = &self.durability.proxy_id {
            if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_graphic()) {
                return err("durability.proxy_id must be 1-64 printable characters");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_retention_is_configurable_off_or_forever_and_checked() {
        let d = Config::default();
        assert_eq!(d.windows.patterns, vec!["visits:*".to_string()]);
        assert_eq!(d.windows.seconds, Retention::For(Duration::from_secs(3600)));
        assert_eq!(
            d.windows.minutes,
            Retention::For(Duration::from_secs(7 * 86400))
        );
        assert_eq!(
            d.windows.hours,
            Retention::For(Duration::from_secs(90 * 86400))
        );
        assert_eq!(d.windows.days, Retention::Forever);
        let c = Config::from_toml_str(
            "[windows]\nmatch = [\"page:*\", \"visits:*\"]\nseconds = \"off\"\nminutes = \"36h\"\ndays = \"400d\"\n",
        )
        .unwrap();
        assert_eq!(c.windows.patterns.len(), 2);
        assert_eq!(c.windows.seconds, Retention::Off);
        assert_eq!(
            c.windows.minutes,
            Retention::For(Duration::from_secs(36 * 3600))
        );
        assert_eq!(
            c.windows.hours,
            Retention::For(Duration::from_secs(90 * 86400))
        );
        assert_eq!(
            c.windows.days,
            Retention::For(Duration::from_secs(400 * 86400))
        );
        for (toml, err) in [
            (
                "[windows]\nminutes = \"30s\"\n",
                "windows.minutes must keep at least one bucket (60s)",
            ),
            (
                "[windows]\ndays = \"23h\"\n",
                "windows.days must keep at least one bucket (86400s)",
            ),
            (
                "[windows]\nhours = \"soon\"\n",
                "invalid retention \"soon\"",
            ),
            (
                "[windows]\nmatch = [\"\"]\n",
                "windows.match: patterns must not be empty",
            ),
        ] {
            let e = Config::from_toml_str(toml).unwrap_err().0;
            assert!(e.contains(err), "{toml}: {e}");
        }
    }

    #[test]
    fn the_empty_config_has_the_documented_defaults() {
        let c = Config::default();
        assert_eq!(c.listen.to_string(), "127.0.0.1:6380");
        assert_eq!(c.http_listen.to_string(), "127.0.0.1:8080");
        assert!(c.shards.is_empty());
        assert_eq!(c.ring.vnodes, 160);
        assert_eq!(c.backend.pool_size, 2);
        assert_eq!(c.backend.max_dedicated, 256);
        assert_eq!(c.backend.timeout.0, Duration::from_secs(1));
        assert_eq!(c.counters.cache_ttl.0, Duration::from_secs(5));
        assert_eq!(c.counters.flush_interval.0, Duration::from_secs(30));
        assert_eq!(c.counters.patterns[0].pattern, "*");
        assert_eq!(c.durability.fsync, Fsync::Everysec);
    }

    #[test]
    fn the_repository_proxy_toml_is_valid() {
        let text = include_str!("../proxy.toml");
        let c = Config::from_toml_str(text).unwrap();
        let names: Vec<_> = c.shards.iter().map(|s| s.resolved_name()).collect();
        assert_eq!(names, ["redis_7070", "redis_7071"]);
    }

    #[test]
    fn the_compose_ha_profile_config_is_valid_and_keeps_the_ring_names() {
        let c = Config::from_toml_str(include_str!("../deploy/docker/proxy-ha.toml")).unwrap();
        let names: Vec<_> = c.shards.iter().map(|s| s.resolved_name()).collect();
        assert_eq!(names, ["redis_7070", "redis_7071"]);
        assert!(c.shards.iter().all(|s| s.master.is_some()));
        assert_eq!(c.sentinel.addrs.len(), 3);
    }

    fn error_of(text: &str) -> String {
        Config::from_toml_str(text).unwrap_err().0
    }

    #[test]
    fn errors_name_the_key() {
        assert!(error_of("listn = \"x\"").contains("listn"));
        assert!(error_of("[ring]\nvnodes = 0").contains("ring.vnodes"));
        assert!(error_of("[[shards]]\naddr = \"nohost\"").contains("nohost"));
        let dup = "[[shards]]\naddr = \"127.0.0.1:1\"\n[[shards]]\naddr = \"127.0.0.1:1\"";
        assert!(error_of(dup).contains("duplicate"));
        let dup_name = "[[shards]]\nname=\"a\"\naddr = \"127.0.0.1:1\"\n[[shards]]\nname=\"a\"\naddr = \"127.0.0.1:2\"";
        assert!(error_of(dup_name).contains("duplicate shard name"));
        let own = "listen = \"127.0.0.1:6390\"\n[[shards]]\naddr = \"127.0.0.1:6390\"";
        assert!(
            error_of(own).contains("own listen address"),
            "{}",
            error_of(own)
        );
        let own = "http_listen = \"0.0.0.0:8090\"\n[[shards]]\naddr = \"127.0.0.1:8090\"";
        assert!(error_of(own).contains("own http_listen address"));
        assert!(error_of("[counters]\ncache_ttl = \"5 parsecs\"").contains("duration"));
        assert!(error_of("[durability]\nfsync = \"sometimes\"").contains("fsync"));
    }

    #[test]
    fn a_cluster_replaces_the_shard_list() {
        let c = Config::from_toml_str(
            "[cluster]\nseeds = [\"127.0.0.1:7000\"]\nwait_replicas = 1\nwait_timeout = \"200ms\"\n",
        )
        .unwrap();
        assert_eq!(c.wait_replicas(), 1);
        assert_eq!(c.wait_timeout(), Duration::from_millis(200));
        assert_eq!(
            c.cluster.as_ref().unwrap().refresh_interval.0,
            Duration::from_secs(5)
        );
        assert!(error_of(
            "[cluster]\nseeds = [\"127.0.0.1:7000\"]\n[[shards]]\naddr = \"127.0.0.1:7070\"\n"
        )
        .contains("cannot both be given"));
        assert!(error_of("[cluster]\nseeds = []\n").contains("at least one node"));
        assert!(error_of("[cluster]\nseeds = [\"127.0.0.1:6380\"]\n").contains("own listener"));
        assert!(error_of(
            "[cluster]\nseeds = [\"127.0.0.1:7000\"]\nwait_replicas = 1\nwait_timeout = \"1h\"\n"
        )
        .contains("cluster.wait_timeout"));
    }

    #[test]
    fn master_shards_need_a_name_sentinels_and_no_addr() {
        let error_of = |s: &str| Config::from_toml_str(s).unwrap_err().0;
        let ok = "[sentinel]\naddrs = [\"127.0.0.1:26379\"]\n\
                  [[shards]]\nname = \"redis_a\"\nmaster = \"shard-a\"\n\
                  [[shards]]\naddr = \"127.0.0.1:7071\"\n\
                  [backend]\nwait_replicas = 1\nwait_timeout = \"500ms\"\n";
        let c = Config::from_toml_str(ok).unwrap();
        let specs = c.shard_specs();
        assert_eq!(specs[0].name, "redis_a");
        assert_eq!(specs[0].addr, "master:shard-a");
        assert_eq!(specs[0].master(), Some("shard-a"));
        assert_eq!(specs[1].master(), None);
        assert_eq!(c.backend.wait_replicas, 1);
        let d = Config::from_toml_str("").unwrap();
        assert_eq!(d.backend.wait_replicas, 0);
        assert_eq!(d.backend.wait_timeout.0, Duration::from_secs(1));
        assert!(d.sentinel.addrs.is_empty());

        let sentinel = "[sentinel]\naddrs = [\"127.0.0.1:26379\"]\n";
        assert!(
            error_of(&format!("{sentinel}[[shards]]\nmaster = \"shard-a\"\n"))
                .contains("needs a name")
        );
        assert!(error_of("[[shards]]\nname = \"a\"\nmaster = \"shard-a\"\n")
            .contains("needs [sentinel] addrs"));
        assert!(error_of(&format!(
            "{sentinel}[[shards]]\nname = \"a\"\nmaster = \"m\"\naddr = \"127.0.0.1:7070\"\n"
        ))
        .contains("exactly one"));
        assert!(error_of("[[shards]]\nname = \"a\"\n").contains("needs addr"));
        assert!(error_of(&format!(
            "{sentinel}[[shards]]\nname = \"a\"\nmaster = \"m\"\n[[shards]]\nname = \"b\"\nmaster = \"m\"\n"
        ))
        .contains("duplicate master"));
        assert!(error_of(&format!(
            "{sentinel}[[shards]]\nname = \"a\"\nmaster = \"m\"\n[[shards]]\nname = \"a\"\naddr = \"127.0.0.1:7070\"\n"
        ))
        .contains("duplicate shard name"));
        assert!(
            error_of("[backend]\nwait_replicas = 1\nwait_timeout = \"5s\"\n")
                .contains("wait_timeout")
        );
    }
}
