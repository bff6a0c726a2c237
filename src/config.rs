//! Configuration: the TOML file (`--config FILE`) and its defaults. Every knob of the edge
//! runtime lives here, so the runtime itself never reads files or the environment.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::protocol::handshake::HandshakeLimits;
use crate::protocol::message::Limits;

/// Where client messages go when no `[[routes]]` are configured.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum Upstream {
    /// The embedded upstream behind the relay thread, through the whole data path: echo,
    /// plus the chat contract of docs/relay-protocol.md for chat actions.
    Echo,
    /// Echo inside each core, without the relay hop: measures the edge alone.
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
            "echo" => Ok(Upstream::Echo),
            "local-echo" => Ok(Upstream::LocalEcho),
            url if url.starts_with("tcp://") || url.starts_with("unix:") => {
                Ok(Upstream::Backend(url.to_string()))
            }
            other => Err(format!(
                "unknown upstream {other:?}: expected echo, local-echo, tcp://HOST:PORT or unix:PATH"
            )),
        }
    }
}

impl std::fmt::Display for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Upstream::Echo => f.write_str("echo"),
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

/// A named group of backends that messages can be routed to.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    pub name: String,
    /// `tcp://HOST:PORT`, `unix:PATH`, or the embedded `echo`.
    pub backends: Vec<String>,
    pub balance: Balance,
    /// Messages that wait while no backend is live; beyond it clients are closed 1013.
    pub buffer_messages: usize,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            name: String::new(),
            backends: Vec::new(),
            balance: Balance::RoundRobin,
            buffer_messages: 10_000,
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
        }
    }
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
    /// Outbound bytes queued per connection beyond which it is closed 1008 (slow consumer).
    pub send_queue_bytes: usize,
    /// Provided read buffers per core (a power of two) and their size.
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
    pub upstreams: Vec<UpstreamConfig>,
    pub routes: Vec<RouteConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            workers: None,
            upstream: Upstream::Echo,
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
            read_buffers: 1024,
            read_buffer_bytes: 16 * 1024,
            relay_queue: 65_536,
            max_subscriptions: 100,
            slow_consumer: SlowConsumer::Close,
            max_fragments: DEFAULT_MAX_FRAGMENTS,
            memory_budget_bytes: None,
            ip_limits: Default::default(),
            admin_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9091))),
            upstreams: Vec::new(),
            routes: Vec::new(),
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
    #[error("{origin}: `{key}` {problem}")]
    Invalid {
        origin: String,
        key: &'static str,
        problem: String,
    },
}

/// The 1-based line where top-level `key` is set in a TOML text, if it is.
fn line_of(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            l.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map(|i| i + 1)
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
            let origin = match line_of(&text, key) {
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
        let bad = |key, problem: &str| {
            Err(ConfigError::Invalid {
                origin: origin.to_string(),
                key,
                problem: problem.to_string(),
            })
        };
        if let Some(w) = self.workers {
            if w == 0 || w > 255 {
                return bad(
                    "workers",
                    "must be between 1 and 255 (leave it out for one per CPU)",
                );
            }
        }
        if !self.read_buffers.is_power_of_two() || self.read_buffers > 32768 {
            return bad(
                "read_buffers",
                "must be a power of two no larger than 32768",
            );
        }
        if !(512..=1 << 20).contains(&self.read_buffer_bytes) {
            return bad("read_buffer_bytes", "must be between 512 and 1048576");
        }
        if self.max_frame_bytes == 0 || self.max_message_bytes == 0 {
            return bad("max_message_bytes", "and max_frame_bytes must be positive");
        }
        if self.max_handshake_bytes < 256 {
            return bad("max_handshake_bytes", "must be at least 256");
        }
        if self.max_connections == 0 {
            return bad("max_connections", "must be positive");
        }
        if self.relay_queue == 0 {
            return bad("relay_queue", "must be positive");
        }
        if self.handshake_timeout_ms == 0 {
            return bad("handshake_timeout_ms", "must be positive");
        }
        if self
            .memory_budget_bytes
            .is_some_and(|b| b < MIN_MEMORY_BUDGET)
        {
            return bad(
                "memory_budget_bytes",
                "must be at least 65536 (leave it out for half of the memory available)",
            );
        }
        Ok(())
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
mod tests {
    use super::*;

    fn write(text: &str) -> tempfile_path::TempPath {
        tempfile_path::TempPath::new(text)
    }

    /// A throwaway file under the target dir; no extra dependency needed.
    mod tempfile_path {
        pub struct TempPath(pub std::path::PathBuf);
        impl TempPath {
            pub fn new(text: &str) -> TempPath {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "ringway-config-test-{}-{}.toml",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::write(&p, text).unwrap();
                TempPath(p)
            }
        }
        impl Drop for TempPath {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    #[test]
    fn empty_file_gives_defaults() {
        let f = write("");
        assert_eq!(Config::from_file(&f.0).unwrap(), Config::default());
    }

    #[test]
    fn values_override_defaults() {
        let f = write(
            "listen = \"0.0.0.0:9000\"\nupstream = \"local-echo\"\nmax_message_bytes = 1048576\n",
        );
        let c = Config::from_file(&f.0).unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.upstream, Upstream::LocalEcho);
        assert_eq!(c.message_limits().max_message, 1 << 20);
    }

    #[test]
    fn unknown_key_is_named_with_file_and_line() {
        let f = write("listen = \"127.0.0.1:1\"\nmax_mesage_bytes = 5\n");
        let err = Config::from_file(&f.0).unwrap_err().to_string();
        assert!(err.contains("max_mesage_bytes"), "{err}");
        assert!(err.contains(&f.0.display().to_string()), "{err}");
        assert!(err.contains("line 2"), "{err}");
    }

    /// Each bad file names the key and the line it is on.
    #[test]
    fn bad_files_name_key_and_line() {
        let cases = [
            (
                "backlog = 10\nmax_conections = 5\n",
                "max_conections",
                "line 2",
            ),
            (
                "workers = 2\n\nmax_message_bytes = \"big\"\n",
                "max_message_bytes",
                "line 3",
            ),
            ("listen = \"127.0.0.1\"\n", "listen", "line 1"),
            ("backlog = 10\nworkers = 0\n", "workers", "line 2"),
            ("read_buffers = 1000\n", "read_buffers", "line 1"),
            (
                "backlog = 10\nmemory_budget_bytes = 4096\n",
                "memory_budget_bytes",
                "line 2",
            ),
            ("[[routes]]\npath = \"/x\"\nfoo = 1\n", "foo", "line 3"),
        ];
        for (text, key, line) in cases {
            let f = write(text);
            let err = Config::from_file(&f.0).unwrap_err().to_string();
            assert!(err.contains(key), "{text:?}: {err}");
            assert!(err.contains(line), "{text:?}: {err}");
            assert!(err.contains(&f.0.display().to_string()), "{text:?}: {err}");
        }
    }

    #[test]
    fn bad_value_is_named() {
        let f = write("read_buffers = 1000\n");
        let err = Config::from_file(&f.0).unwrap_err().to_string();
        assert!(
            err.contains("read_buffers") && err.contains("power of two"),
            "{err}"
        );
    }

    #[test]
    fn missing_file_is_named() {
        let err = Config::from_file(Path::new("/nonexistent/ringway.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/ringway.toml"), "{err}");
    }
}
