//! Configuration: the TOML file (`--config FILE`) and its defaults. Every knob of the edge
//! runtime lives here, so the runtime itself never reads files or the environment.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::protocol::handshake::HandshakeLimits;
use crate::protocol::message::Limits;

pub mod cluster;
pub use cluster::ClusterConfig;

/// Where client messages go when no `[[routes]]` are configured.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum Upstream {
    /// The embedded upstream (typed `echo`): in-process, behind the relay thread, so a message
    /// takes the whole data path; it serves the chat contract of docs/relay-protocol.md and
    /// echoes everything else (src/relay/ holds it).
    Embedded,
    /// Echo inside each core (typed `local-echo`), without the relay hop: measures the edge
    /// alone. Not an upstream the relay knows: its routes map to the embedded upstream.
    LocalEcho,
    /// A backend speaking the relay protocol: `tcp://HOST:PORT` or `unix:PATH`.
    Backend(String),
}

impl TryFrom<String> for Upstream {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl std::str::FromStr for Upstream {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "echo" => Ok(Upstream::Embedded),
            "local-echo" => Ok(Upstream::LocalEcho),
            url if url.starts_with("tcp://") || url.starts_with("unix:") => {
                Ok(Upstream::Backend(url.to_string()))
            }
            url if url.starts_with("tls://") => Err(format!(
                "{url:?}: a tls:// backend needs its CA (ca_file): declare it in [[upstreams]] \
                 with backends = [{url:?}] and ca_file = \"FILE\", and name that upstream in \
                 [[routes]]"
            )),
            other => Err(format!(
                "unknown upstream {other:?}: expected echo, local-echo, tcp://HOST:PORT or unix:PATH"
            )),
        }
    }
}

impl std::fmt::Display for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Upstream::Embedded => f.write_str("echo"),
            Upstream::LocalEcho => f.write_str("local-echo"),
            Upstream::Backend(url) => f.write_str(url),
        }
    }
}

/// How a connection is spread over an upstream's backends; either way it sticks to one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    #[default]
    RoundRobin,
    /// By connection id.
    Hash,
}

/// What happens when a client's send queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SlowConsumer {
    /// Close 1008 "slow consumer".
    #[default]
    Close,
    /// Drop the newest topic or broadcast message (direct sends still close).
    DropNewest,
}

/// permessage-deflate (RFC 7692) for a route's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Compression {
    /// Decline every offer: frames go as today.
    #[default]
    Off,
    /// Both `no_context_takeover` parameters, one compressor and inflater per core: no
    /// compression memory per connection.
    Shared,
    /// Context takeover with a capped window (`compression_window_bits`): a compressor and
    /// inflater per connection, charged to the memory budget; past
    /// `compression_dedicated_per_core` on a core, new connections get `shared`.
    Dedicated,
}

/// A named group of backends that messages can be routed to.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    pub name: String,
    /// `tcp://HOST:PORT`, `tls://HOST:PORT`, `unix:PATH`, or the embedded `echo`.
    pub backends: Vec<String>,
    pub balance: Balance,
    /// Messages that wait while no backend is live; beyond it clients are closed 1013.
    pub buffer_messages: usize,
    /// PEM CA certificates the `tls://` backends' certificates must chain to (required with
    /// them: system roots are never trusted).
    pub ca_file: Option<std::path::PathBuf>,
    /// PEM certificate and key presented to `tls://` backends that ask (mutual TLS); both
    /// or neither.
    pub client_cert: Option<std::path::PathBuf>,
    pub client_key: Option<std::path::PathBuf>,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            name: String::new(),
            backends: Vec::new(),
            balance: Balance::RoundRobin,
            buffer_messages: 10_000,
            ca_file: None,
            client_cert: None,
            client_key: None,
        }
    }
}

/// Which handshake paths a route serves and where their messages go.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouteConfig {
    /// Exact path (`/chat`), or a prefix ending in `/*` (`/api/*`; `/*` matches all).
    pub path: String,
    /// The upstream (by name) for messages no action routes elsewhere.
    pub upstream: String,
    /// The JSON field whose value picks an entry of `actions`.
    pub route_key: String,
    /// Routing-key value -> upstream name.
    pub actions: std::collections::BTreeMap<String, String>,
    /// Hold the handshake until the backend answers `accept` or `reject`.
    pub authorize: bool,
    pub authorize_timeout_ms: u64,
    /// Request headers passed to the backend in `open` (case-insensitive names).
    pub pass_headers: Vec<String>,
    pub max_subscriptions: usize,
    pub slow_consumer: SlowConsumer,
    /// Frames one message may span (0: no limit); beyond it close 1008.
    pub max_fragments: u32,
    /// Allowed `Origin`s: exact (`https://app.example.com`) or `https://*.example.com`;
    /// empty or `"*"` allows every origin. Others get 403.
    pub origins: Vec<String>,
    /// With `origins` set: whether a request without `Origin` (a non-browser client) passes.
    pub allow_missing_origin: bool,
    /// Verify a JWT at the edge (Authorization: Bearer, `?token=`, or a subprotocol
    /// `access_token.<jwt>`); failures get 401.
    pub jwt: Option<crate::policy::auth::JwtConfig>,
    /// With `jwt`: close an open connection 1008 "token expired" once its token's `exp`
    /// (plus `leeway_s`) passes. `false` lets it outlive the token.
    pub close_at_token_expiry: bool,
    /// Messages per second one connection may send (0: no limit); beyond it close 1008.
    pub messages_per_sec: u32,
    pub message_burst: u32,
    /// permessage-deflate for this route; absent: the top-level `compression`.
    pub compression: Option<Compression>,
    /// Subprotocols this route selects, in the server's order of preference.
    pub subprotocols: Vec<String>,
    /// With `subprotocols`: a client offering none of them gets 400 instead of none.
    pub require_subprotocol: bool,
}

impl Default for RouteConfig {
    fn default() -> Self {
        RouteConfig {
            path: "/*".into(),
            upstream: String::new(),
            route_key: "action".into(),
            actions: Default::default(),
            authorize: false,
            authorize_timeout_ms: 5_000,
            pass_headers: Vec::new(),
            max_subscriptions: 100,
            slow_consumer: SlowConsumer::Close,
            max_fragments: DEFAULT_MAX_FRAGMENTS,
            origins: Vec::new(),
            allow_missing_origin: false,
            jwt: None,
            close_at_token_expiry: true,
            messages_per_sec: 0,
            message_burst: 0,
            compression: None,
            subprotocols: Vec::new(),
            require_subprotocol: false,
        }
    }
}

/// One certificate for the wss:// listener: `[[tls.certificates]]`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CertificateConfig {
    /// PEM: the leaf certificate, then its chain.
    pub cert: std::path::PathBuf,
    /// PEM: the private key (PKCS#8, SEC1 or PKCS#1).
    pub key: std::path::PathBuf,
}

/// The `[tls]` table: what `listen_tls` serves.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// Chosen by SNI from the names in each certificate; the first is the default.
    pub certificates: Vec<CertificateConfig>,
}

/// Browsers never fragment what they send; other clients fragment large messages into a
/// handful of frames. 1,024 frames of a 64 KiB message average 64 bytes each.
pub const DEFAULT_MAX_FRAGMENTS: u32 = 1024;

/// The smallest memory budget that lets a few connections work at all.
pub const MIN_MEMORY_BUDGET: u64 = 64 * 1024;

/// The whole runtime configuration, with the defaults users of uWS, Centrifugo and Pushpin
/// expect (see ARCHITECTURE.md).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub listen: SocketAddr,
    /// The wss:// listener (TLS on every core, beside `listen`); needs `tls.certificates`.
    pub listen_tls: Option<SocketAddr>,
    pub tls: TlsConfig,
    /// Event-loop threads, one per core; absent means one per CPU the process may use.
    pub workers: Option<usize>,
    pub upstream: Upstream,
    pub backlog: i32,
    /// Open WebSocket connections across all cores; more get 503 at the handshake.
    pub max_connections: usize,
    pub max_message_bytes: u64,
    pub max_frame_bytes: u64,
    pub max_handshake_bytes: usize,
    pub handshake_timeout_ms: u64,
    /// A ping goes out after this long without traffic from the client; 0 disables.
    pub ping_interval_ms: u64,
    /// Close when a ping goes unanswered this long.
    pub pong_timeout_ms: u64,
    /// Close when the client sent no message this long; 0 disables.
    pub idle_timeout_ms: u64,
    /// After we send a close frame, how long we wait for the client's before dropping TCP.
    pub close_linger_ms: u64,
    /// On SIGTERM/SIGINT, how long clients get to answer our 1001 close.
    pub shutdown_grace_ms: u64,
    /// Outbound bytes queued per connection beyond which it stops being read and is a slow
    /// consumer (closed 1008: at once, or after a grace; see `Session::queue_data`).
    pub send_queue_bytes: usize,
    /// Provided read buffers per core (a power of two) and their size. Default 128 x 128 KiB
    /// (16 MiB): a message up to the default 64 KiB limit lands in one buffer and is decoded
    /// there with no gathering copy (1024 x 16 KiB cost ~5% more CPU per 64 KiB echo and was
    /// no better at 5,000 busy clients, measured side by side).
    pub read_buffers: u16,
    pub read_buffer_bytes: usize,
    /// Capacity of each core's channel to the relay.
    pub relay_queue: usize,
    /// Topics one connection may subscribe to (when no route sets its own).
    pub max_subscriptions: usize,
    /// Slow-consumer policy when no route sets its own.
    pub slow_consumer: SlowConsumer,
    /// Frames one message may span when no route sets its own (0: no limit).
    pub max_fragments: u32,
    /// Bytes of connection state and buffers (handshake, message assembly, send queues)
    /// across all cores beyond which new connections get 503; absent means half the memory
    /// this process may use (RAM, or the cgroup's memory.max when lower).
    pub memory_budget_bytes: Option<u64>,
    /// Per-client-IP limits on concurrent and new connections (IPv6 by /64), split over cores.
    pub ip_limits: crate::policy::rate::IpLimits,
    /// The admin listener (/metrics, /healthz, /readyz); keep it off public interfaces.
    pub admin_listen: Option<SocketAddr>,
    /// permessage-deflate for routes that do not set their own.
    pub compression: Compression,
    /// Outbound messages smaller than this go uncompressed (RSV1 clear, RFC 7692 §6.1).
    pub compression_min_bytes: usize,
    /// zlib level of our compressors, 1 (fastest) to 9 (smallest).
    pub compression_level: u8,
    /// `dedicated`: our compressor's window (9..=15; zlib cannot do a raw 8-bit window),
    /// and the client's when its offer lets us name one.
    pub compression_window_bits: u8,
    /// `dedicated`: connections per core with their own contexts; beyond it, `shared`.
    pub compression_dedicated_per_core: usize,
    pub upstreams: Vec<UpstreamConfig>,
    pub routes: Vec<RouteConfig>,
    /// `[cluster]`: join a cluster of gateways on NATS (src/config/cluster.rs).
    pub cluster: Option<ClusterConfig>,
    /// Serve the demo chat page at a plain `GET /`; unset: only with the embedded upstream
    /// and no routes configured (see [`Config::serves_demo_page`]).
    pub demo_page: Option<bool>,
    /// One INFO line per finished connection (target `ringway::access`).
    pub access_log: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            listen_tls: None,
            tls: TlsConfig::default(),
            workers: None,
            upstream: Upstream::Embedded,
            backlog: 4096,
            max_connections: 1_000_000,
            max_message_bytes: 64 * 1024,
            max_frame_bytes: 64 * 1024,
            max_handshake_bytes: 8 * 1024,
            handshake_timeout_ms: 10_000,
            ping_interval_ms: 30_000,
            pong_timeout_ms: 10_000,
            idle_timeout_ms: 120_000,
            close_linger_ms: 2_000,
            shutdown_grace_ms: 10_000,
            send_queue_bytes: 1024 * 1024,
            read_buffers: 128,
            read_buffer_bytes: 128 * 1024,
            relay_queue: 65_536,
            max_subscriptions: 100,
            slow_consumer: SlowConsumer::Close,
            max_fragments: DEFAULT_MAX_FRAGMENTS,
            memory_budget_bytes: None,
            ip_limits: Default::default(),
            admin_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9091))),
            compression: Compression::Off,
            compression_min_bytes: 256,
            compression_level: crate::protocol::deflate::DEFAULT_LEVEL,
            compression_window_bits: 12,
            compression_dedicated_per_core: 256,
            upstreams: Vec::new(),
            routes: Vec::new(),
            cluster: None,
            demo_page: None,
            access_log: true,
        }
    }
}

/// A configuration that cannot be used, naming the file and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    /// `key` is a path into the file: `read_buffers`, `ip_limits.max_concurrent`,
    /// `routes[1].authorize_timeout_ms`, `upstreams[0].buffer_messages`.
    #[error("{origin}: `{key}` {problem}")]
    Invalid {
        origin: String,
        key: String,
        problem: String,
    },
}

// Bounds of every timeout, size and count. deploy/ringway.toml states each beside its key's
// default; `Config::validate` refuses values outside them, naming the key.

/// One day: the longest any connection timer may be.
pub const DAY_MS: u64 = 86_400_000;
/// 1 GiB: the largest message, frame or send queue.
pub const GIB: u64 = 1 << 30;
/// `workers`: a connection id keeps its core in 8 bits.
pub const MAX_WORKERS: usize = 255;
/// `backlog`: what listen(2) can use (net.core.somaxconn caps it further).
pub const MAX_BACKLOG: i32 = 65_535;
/// `max_connections` (and `ip_limits.max_concurrent`).
pub const MAX_CONNECTIONS: usize = 10_000_000;
/// `max_message_bytes`, `max_frame_bytes`.
pub const MAX_MESSAGE_BYTES: u64 = GIB;
/// `max_handshake_bytes`, at least [`MIN_HANDSHAKE_BYTES`].
pub const MIN_HANDSHAKE_BYTES: usize = 256;
pub const MAX_HANDSHAKE_BYTES: usize = 64 * 1024;
/// `handshake_timeout_ms`: a handshake that takes minutes is an attack, not a client.
pub const MIN_HANDSHAKE_TIMEOUT_MS: u64 = 100;
pub const MAX_HANDSHAKE_TIMEOUT_MS: u64 = 300_000;
/// `ping_interval_ms` when not 0: pinging every client more often is a ping storm.
pub const MIN_PING_INTERVAL_MS: u64 = 100;
/// `ping_interval_ms`, `pong_timeout_ms`, `idle_timeout_ms`.
pub const MAX_CONNECTION_TIMER_MS: u64 = DAY_MS;
/// `close_linger_ms`.
pub const MAX_CLOSE_LINGER_MS: u64 = 60_000;
/// `shutdown_grace_ms`.
pub const MAX_SHUTDOWN_GRACE_MS: u64 = 600_000;
/// `send_queue_bytes`: below a close frame and a small message nothing could be sent.
pub const MIN_SEND_QUEUE_BYTES: usize = 1024;
pub const MAX_SEND_QUEUE_BYTES: usize = GIB as usize;
/// `read_buffers` (what a provided-buffer ring takes), `read_buffer_bytes` (powers of two),
/// and their product per core.
pub const MAX_READ_BUFFERS: u16 = 32_768;
pub const MIN_READ_BUFFER_BYTES: usize = 512;
pub const MAX_READ_BUFFER_BYTES: usize = 1 << 20;
pub const MAX_READ_BUFFER_MEMORY: usize = 256 << 20;
/// `relay_queue` (messages per core).
pub const MAX_RELAY_QUEUE: usize = 1 << 20;
/// `max_subscriptions` (top level and per route).
pub const MAX_SUBSCRIPTIONS: usize = 10_000;
/// `max_fragments` (top level and per route) when not 0.
pub const MAX_FRAGMENTS: u32 = 1 << 20;
/// `memory_budget_bytes`: 16 TiB.
pub const MAX_MEMORY_BUDGET: u64 = 1 << 44;
/// Rates and bursts: `messages_per_sec`, `message_burst`, `ip_limits.connects_per_sec`,
/// `ip_limits.connect_burst`.
pub const MAX_RATE: u32 = 1_000_000;
/// `ip_limits.max_tracked_ips`.
pub const MAX_TRACKED_IPS: usize = 1 << 24;
/// `upstreams[].buffer_messages`.
pub const MAX_BUFFER_MESSAGES: usize = 1_000_000;
/// `routes[].authorize_timeout_ms`.
pub const MAX_AUTHORIZE_TIMEOUT_MS: u64 = 300_000;
/// `routes[].jwt.leeway_s`: clock skew of more than an hour is a broken clock.
pub const MAX_JWT_LEEWAY_S: u64 = 3_600;

/// Whether a trimmed line sets `key` (`key = ...`, `key=...`).
fn sets_key(line: &str, key: &str) -> bool {
    line.trim_start()
        .strip_prefix(key)
        .is_some_and(|rest| rest.trim_start().starts_with('='))
}

/// The name in a table header line: `routes` for `[[routes]]`, `ip_limits` for
/// `[ip_limits]`, `routes.jwt` for `[routes.jwt]`; `None` for other lines.
fn header_of(line: &str) -> Option<(&str, bool)> {
    let l = line.trim();
    if let Some(rest) = l.strip_prefix("[[") {
        return Some((rest.split("]]").next()?.trim(), true));
    }
    let rest = l.strip_prefix('[')?;
    Some((rest.split(']').next()?.trim(), false))
}

/// The 1-based line where `key` (a path as in [`ConfigError::Invalid`]) is set in a TOML
/// text: the key's own line, else the line of the inline table or `[[table]]` that holds it.
fn line_of(text: &str, key: &str) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let segments: Vec<&str> = key.split('.').collect();
    // `tls.certificates[0].cert`: the array of tables is `[[tls.certificates]]`.
    let joined = match segments.iter().position(|s| s.contains('[')) {
        Some(i) if i > 0 => i + 1,
        _ => 1,
    };
    let first_owned = segments[..joined].join(".");
    let first = first_owned.as_str();
    let rest: Vec<&str> = segments[joined..].to_vec();
    let (name, index) = match first.split_once('[') {
        Some((name, i)) => (name, Some(i.trim_end_matches(']').parse::<usize>().ok()?)),
        None => (first, None),
    };
    let next_header = |from: usize, within: &str| {
        (from..lines.len())
            .find(|&i| {
                header_of(lines[i])
                    .is_some_and(|(h, _)| h != within && !h.starts_with(&format!("{within}.")))
            })
            .unwrap_or(lines.len())
    };
    // The lines that may hold the key: [start, end), and the line to fall back to.
    let (start, end, fallback) = if let Some(index) = index {
        let header = (0..lines.len())
            .filter(|&i| header_of(lines[i]) == Some((name, true)))
            .nth(index)?;
        (header + 1, next_header(header + 1, name), Some(header))
    } else if let Some(header) = (!rest.is_empty())
        .then(|| (0..lines.len()).find(|&i| header_of(lines[i]) == Some((name, false))))
        .flatten()
    {
        (header + 1, next_header(header + 1, name), Some(header))
    } else {
        // Top level: only before the first table, where a route's key of the same name
        // cannot be mistaken for it.
        let end = (0..lines.len())
            .find(|&i| header_of(lines[i]).is_some())
            .unwrap_or(lines.len());
        let line = (0..end).find(|&i| sets_key(lines[i], name))?;
        if rest.is_empty() {
            return Some(line + 1);
        }
        (line, line + 1, Some(line))
    };
    let region = start..end;
    let own = rest.last().copied().unwrap_or(name);
    region
        .clone()
        .filter(|&i| !lines[i].trim_start().starts_with('#'))
        .find(|&i| sets_key(lines[i], own) || lines[i].contains(&format!(" {own} =")))
        .or_else(|| {
            let table = rest.first()?;
            region.clone().find(|&i| sets_key(lines[i], table))
        })
        .or(fallback)
        .map(|i| i + 1)
}

/// `ca_file` is required by `tls://` backends; `client_cert` and `client_key` go together;
/// every file named must be readable (its contents are checked at start).
fn check_upstream_tls(i: usize, u: &UpstreamConfig) -> Result<(), (String, String)> {
    let k = |name: &str| format!("upstreams[{i}].{name}");
    let tls = u.backends.iter().any(|b| b.starts_with("tls://"));
    if tls && u.ca_file.is_none() {
        let problem = "must name a PEM file of the CA certificates that sign the tls:// \
                       backends' certificates (system roots are not used)";
        return Err((k("ca_file"), problem.into()));
    }
    match (&u.client_cert, &u.client_key) {
        (Some(_), None) => return Err((k("client_key"), "must be set with client_cert".into())),
        (None, Some(_)) => return Err((k("client_cert"), "must be set with client_key".into())),
        _ => {}
    }
    let files = [
        ("ca_file", &u.ca_file),
        ("client_cert", &u.client_cert),
        ("client_key", &u.client_key),
    ];
    for (name, path) in files {
        if let Some(p) = path {
            if let Err(e) = std::fs::File::open(p) {
                return Err((k(name), format!("cannot read {}: {e}", p.display())));
            }
        }
    }
    Ok(())
}

/// `value` within `range`, else the problem to report.
fn within<T: PartialOrd + std::fmt::Display + Copy>(
    value: T,
    min: T,
    max: T,
) -> Result<(), String> {
    if value < min || value > max {
        Err(format!("must be between {min} and {max}, not {value}"))
    } else {
        Ok(())
    }
}

/// 0 (off), or within `min..=max`.
fn off_or_within<T: PartialOrd + std::fmt::Display + Copy + Default>(
    value: T,
    min: T,
    max: T,
) -> Result<(), String> {
    if value == T::default() {
        return Ok(());
    }
    within(value, min, max)
        .map_err(|_| format!("must be 0 (off) or between {min} and {max}, not {value}"))
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let config: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        if let Err(ConfigError::Invalid { key, problem, .. }) = config.validate("") {
            let origin = match line_of(&text, &key) {
                Some(line) => format!("config file {}, line {line}", path.display()),
                None => format!("config file {}", path.display()),
            };
            return Err(ConfigError::Invalid {
                origin,
                key,
                problem,
            });
        }
        Ok(config)
    }

    /// Reject values the runtime cannot honour; `origin` names where they came from.
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        self.check().map_err(|(key, problem)| ConfigError::Invalid {
            origin: origin.to_string(),
            key,
            problem,
        })
    }

    /// The first key out of its bounds, and why.
    fn check(&self) -> Result<(), (String, String)> {
        fn key<T>(name: &str, r: Result<T, String>) -> Result<T, (String, String)> {
            r.map_err(|p| (name.to_string(), p))
        }
        if let Some(w) = self.workers {
            key(
                "workers",
                within(w, 1, MAX_WORKERS)
                    .map_err(|p| format!("{p} (leave it out for one per CPU)")),
            )?;
        }
        key("backlog", within(self.backlog, 1, MAX_BACKLOG))?;
        if let Some(c) = &self.cluster {
            c.check()?;
        }
        self.check_tls()?;
        key(
            "max_connections",
            within(self.max_connections, 1, MAX_CONNECTIONS),
        )?;
        if !self.read_buffers.is_power_of_two() || self.read_buffers > MAX_READ_BUFFERS {
            key(
                "read_buffers",
                Err(format!(
                    "must be a power of two no larger than {MAX_READ_BUFFERS}, not {}",
                    self.read_buffers
                )),
            )?;
        }
        if !self.read_buffer_bytes.is_power_of_two()
            || !(MIN_READ_BUFFER_BYTES..=MAX_READ_BUFFER_BYTES).contains(&self.read_buffer_bytes)
        {
            key(
                "read_buffer_bytes",
                Err(format!(
                    "must be a power of two between {MIN_READ_BUFFER_BYTES} and \
                     {MAX_READ_BUFFER_BYTES}, not {}",
                    self.read_buffer_bytes
                )),
            )?;
        }
        let per_core = usize::from(self.read_buffers) * self.read_buffer_bytes;
        if per_core > MAX_READ_BUFFER_MEMORY {
            // Name the one of the two that was changed from its default.
            let name = if self.read_buffers != Config::default().read_buffers {
                "read_buffers"
            } else {
                "read_buffer_bytes"
            };
            key(
                name,
                Err(format!(
                    "makes read_buffers * read_buffer_bytes {per_core} bytes per core; at \
                     most {MAX_READ_BUFFER_MEMORY} (256 MiB)"
                )),
            )?;
        }
        key(
            "max_message_bytes",
            within(self.max_message_bytes, 1, MAX_MESSAGE_BYTES),
        )?;
        key(
            "max_frame_bytes",
            within(self.max_frame_bytes, 1, MAX_MESSAGE_BYTES),
        )?;
        key(
            "max_handshake_bytes",
            within(
                self.max_handshake_bytes,
                MIN_HANDSHAKE_BYTES,
                MAX_HANDSHAKE_BYTES,
            ),
        )?;
        key(
            "send_queue_bytes",
            within(
                self.send_queue_bytes,
                MIN_SEND_QUEUE_BYTES,
                MAX_SEND_QUEUE_BYTES,
            ),
        )?;
        key("relay_queue", within(self.relay_queue, 1, MAX_RELAY_QUEUE))?;
        key(
            "handshake_timeout_ms",
            within(
                self.handshake_timeout_ms,
                MIN_HANDSHAKE_TIMEOUT_MS,
                MAX_HANDSHAKE_TIMEOUT_MS,
            ),
        )?;
        key(
            "ping_interval_ms",
            off_or_within(
                self.ping_interval_ms,
                MIN_PING_INTERVAL_MS,
                MAX_CONNECTION_TIMER_MS,
            ),
        )?;
        key(
            "pong_timeout_ms",
            within(self.pong_timeout_ms, 0, MAX_CONNECTION_TIMER_MS),
        )?;
        key(
            "idle_timeout_ms",
            within(self.idle_timeout_ms, 0, MAX_CONNECTION_TIMER_MS),
        )?;
        key(
            "close_linger_ms",
            within(self.close_linger_ms, 0, MAX_CLOSE_LINGER_MS),
        )?;
        key(
            "shutdown_grace_ms",
            within(self.shutdown_grace_ms, 0, MAX_SHUTDOWN_GRACE_MS),
        )?;
        key(
            "max_subscriptions",
            within(self.max_subscriptions, 0, MAX_SUBSCRIPTIONS),
        )?;
        key(
            "max_fragments",
            within(self.max_fragments, 0, MAX_FRAGMENTS),
        )?;
        if let Some(b) = self.memory_budget_bytes {
            key(
                "memory_budget_bytes",
                within(b, MIN_MEMORY_BUDGET, MAX_MEMORY_BUDGET)
                    .map_err(|p| format!("{p} (leave it out for half of the memory available)")),
            )?;
        }
        key(
            "compression_window_bits",
            within(self.compression_window_bits, 9, 15),
        )?;
        key("compression_level", within(self.compression_level, 1, 9))?;
        key(
            "compression_dedicated_per_core",
            within(self.compression_dedicated_per_core, 0, MAX_CONNECTIONS),
        )?;
        let ip = &self.ip_limits;
        key(
            "ip_limits.max_concurrent",
            within(ip.max_concurrent as usize, 0, MAX_CONNECTIONS),
        )?;
        key(
            "ip_limits.connects_per_sec",
            within(ip.connects_per_sec, 0, MAX_RATE),
        )?;
        key(
            "ip_limits.connect_burst",
            within(ip.connect_burst, 0, MAX_RATE),
        )?;
        key(
            "ip_limits.max_tracked_ips",
            within(ip.max_tracked_ips, 1, MAX_TRACKED_IPS),
        )?;
        for (i, u) in self.upstreams.iter().enumerate() {
            key(
                &format!("upstreams[{i}].buffer_messages"),
                within(u.buffer_messages, 0, MAX_BUFFER_MESSAGES),
            )?;
            check_upstream_tls(i, u)?;
        }
        for (i, r) in self.routes.iter().enumerate() {
            let k = |name: &str| format!("routes[{i}].{name}");
            key(
                &k("authorize_timeout_ms"),
                within(r.authorize_timeout_ms, 1, MAX_AUTHORIZE_TIMEOUT_MS),
            )?;
            key(
                &k("max_subscriptions"),
                within(r.max_subscriptions, 0, MAX_SUBSCRIPTIONS),
            )?;
            key(
                &k("max_fragments"),
                within(r.max_fragments, 0, MAX_FRAGMENTS),
            )?;
            key(
                &k("messages_per_sec"),
                within(r.messages_per_sec, 0, MAX_RATE),
            )?;
            key(&k("message_burst"), within(r.message_burst, 0, MAX_RATE))?;
            if let Some(jwt) = &r.jwt {
                key(
                    &k("jwt.leeway_s"),
                    within(jwt.leeway_s, 0, MAX_JWT_LEEWAY_S),
                )?;
            }
        }
        Ok(())
    }

    /// `listen_tls` and `tls.certificates` go together; the files are read at start.
    fn check_tls(&self) -> Result<(), (String, String)> {
        let certs = &self.tls.certificates;
        match self.listen_tls {
            // Port 0 picks a free port for each.
            Some(addr) if addr == self.listen && addr.port() != 0 => {
                return Err((
                    "listen_tls".into(),
                    format!("must differ from listen ({addr})"),
                ))
            }
            Some(_) if certs.is_empty() => {
                return Err((
                    "tls.certificates".into(),
                    "must list at least one certificate to serve listen_tls:                      [[tls.certificates]] with `cert` and `key`, or --tls-cert and --tls-key"
                        .into(),
                ))
            }
            None if !certs.is_empty() => {
                return Err((
                    "listen_tls".into(),
                    "must be set to serve the certificates of [[tls.certificates]]                      (for example listen_tls = \"0.0.0.0:443\")"
                        .into(),
                ))
            }
            _ => {}
        }
        for (i, c) in certs.iter().enumerate() {
            for (name, path) in [("cert", &c.cert), ("key", &c.key)] {
                if path.as_os_str().is_empty() {
                    return Err((
                        format!("tls.certificates[{i}].{name}"),
                        "must name a PEM file".into(),
                    ));
                }
            }
        }
        Ok(())
    }

    /// With `[cluster]`: this node's name and id (its connection ids' NODE field).
    pub fn cluster_node(&self) -> Option<(String, u8)> {
        let c = self.cluster.as_ref()?;
        let name = c.node_name(self.listen.port());
        let id = c.node_id(&name);
        Some((name, id))
    }

    /// Whether a plain `GET /` gets the demo chat page: as `demo_page` says, or when unset,
    /// only where the page works and nothing else was asked for (embedded upstream, whose
    /// chat contract it speaks, and no routes).
    pub fn serves_demo_page(&self) -> bool {
        self.demo_page
            .unwrap_or(self.upstream == Upstream::Embedded && self.routes.is_empty())
    }

    pub fn message_limits(&self) -> Limits {
        Limits {
            max_frame: self.max_frame_bytes.min(self.max_message_bytes),
            max_message: self.max_message_bytes,
            max_fragments: self.max_fragments,
        }
    }

    pub fn handshake_limits(&self) -> HandshakeLimits {
        HandshakeLimits {
            max_header_bytes: self.max_handshake_bytes,
            ..HandshakeLimits::default()
        }
    }

    pub fn worker_count(&self) -> usize {
        if let Some(w) = self.workers {
            w
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .min(255)
        }
    }

    pub fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }
}

#[cfg(test)]
mod tests;
