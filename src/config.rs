//! Configuration: the TOML file (`--config FILE`) and its defaults. Every knob of the edge
//! runtime lives here, so the runtime itself never reads files or the environment.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::protocol::handshake::HandshakeLimits;
use crate::protocol::message::Limits;

/// Where client messages go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Upstream {
    /// The embedded echo backend behind the relay thread: the whole data path.
    Echo,
    /// Echo inside each core, without the relay hop: measures the edge alone.
    LocalEcho,
}

impl std::str::FromStr for Upstream {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "echo" => Ok(Upstream::Echo),
            "local-echo" => Ok(Upstream::LocalEcho),
            other => Err(format!(
                "unknown upstream {other:?}: expected echo or local-echo"
            )),
        }
    }
}

impl std::fmt::Display for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Upstream::Echo => "echo",
            Upstream::LocalEcho => "local-echo",
        })
    }
}

/// The whole runtime configuration, with the defaults users of uWS, Centrifugo and Pushpin
/// expect (see ARCHITECTURE.md).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub listen: SocketAddr,
    /// Event-loop threads, one per core; 0 means one per CPU the process may use.
    pub workers: usize,
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
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            workers: 0,
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
        config.validate(&path.display().to_string())?;
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
        if self.workers > 255 {
            return bad("workers", "must be at most 255");
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
        Ok(())
    }

    pub fn message_limits(&self) -> Limits {
        Limits {
            max_frame: self.max_frame_bytes.min(self.max_message_bytes),
            max_message: self.max_message_bytes,
        }
    }

    pub fn handshake_limits(&self) -> HandshakeLimits {
        HandshakeLimits {
            max_header_bytes: self.max_handshake_bytes,
            ..HandshakeLimits::default()
        }
    }

    pub fn worker_count(&self) -> usize {
        if self.workers > 0 {
            self.workers
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
