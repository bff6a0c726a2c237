//! Tests of the configuration: parsing, defaults, and errors that name the key, the file
//! and the line.

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
            "backlog = 10\ncompression_window_bits = 8\n",
            "compression_window_bits",
            "line 2",
        ),
        ("compression_level = 0\n", "compression_level", "line 1"),
        ("compression_level = 10\n", "compression_level", "line 1"),
        (
            "backlog = 10\nmemory_budget_bytes = 4096\n",
            "memory_budget_bytes",
            "line 2",
        ),
        ("[[routes]]\npath = \"/x\"\nfoo = 1\n", "foo", "line 3"),
        // Bounds (issue 11): every timeout, size and count has a maximum.
        // u64::MAX (which wrapped deadline additions) is not a TOML integer; i64::MAX is.
        (
            "idle_timeout_ms = 18446744073709551615\n",
            "idle_timeout_ms",
            "line 1",
        ),
        (
            "idle_timeout_ms = 9223372036854775807\n",
            "`idle_timeout_ms` must be between 0 and 86400000",
            "line 1",
        ),
        (
            "backlog = 10\nhandshake_timeout_ms = 300001\n",
            "`handshake_timeout_ms`",
            "line 2",
        ),
        ("handshake_timeout_ms = 0\n", "`handshake_timeout_ms`", "line 1"),
        ("ping_interval_ms = 1\n", "must be 0 (off) or between 100", "line 1"),
        ("ping_interval_ms = 86400001\n", "`ping_interval_ms`", "line 1"),
        ("pong_timeout_ms = 86400001\n", "`pong_timeout_ms`", "line 1"),
        ("close_linger_ms = 60001\n", "`close_linger_ms`", "line 1"),
        ("shutdown_grace_ms = 600001\n", "`shutdown_grace_ms`", "line 1"),
        ("max_message_bytes = 1073741825\n", "`max_message_bytes`", "line 1"),
        ("max_frame_bytes = 0\n", "`max_frame_bytes`", "line 1"),
        ("send_queue_bytes = 1073741825\n", "`send_queue_bytes`", "line 1"),
        ("send_queue_bytes = 0\n", "`send_queue_bytes`", "line 1"),
        (
            "read_buffers = 32768\nread_buffer_bytes = 1048576\n",
            "`read_buffers` makes read_buffers * read_buffer_bytes",
            "line 1",
        ),
        (
            "backlog = 10\nread_buffers = 4096\nread_buffer_bytes = 131072\n",
            "`read_buffers` makes",
            "line 2",
        ),
        ("read_buffer_bytes = 1000\n", "power of two", "line 1"),
        ("read_buffer_bytes = 256\n", "`read_buffer_bytes`", "line 1"),
        ("relay_queue = 0\n", "`relay_queue`", "line 1"),
        ("relay_queue = 1048577\n", "`relay_queue`", "line 1"),
        ("max_connections = 10000001\n", "`max_connections`", "line 1"),
        ("max_connections = 0\n", "`max_connections`", "line 1"),
        ("workers = 256\n", "`workers`", "line 1"),
        ("backlog = 0\n", "`backlog`", "line 1"),
        ("backlog = 65536\n", "`backlog`", "line 1"),
        ("max_handshake_bytes = 65537\n", "`max_handshake_bytes`", "line 1"),
        ("max_subscriptions = 10001\n", "`max_subscriptions`", "line 1"),
        ("max_fragments = 1048577\n", "`max_fragments`", "line 1"),
        (
            "memory_budget_bytes = 17592186044417\n",
            "`memory_budget_bytes`",
            "line 1",
        ),
        (
            "backlog = 10\nip_limits = { max_concurrent = 3, connects_per_sec = 1000001 }\n",
            "`ip_limits.connects_per_sec`",
            "line 2",
        ),
        (
            "[ip_limits]\nmax_concurrent = 3\nmax_tracked_ips = 0\n",
            "`ip_limits.max_tracked_ips`",
            "line 3",
        ),
        (
            "[[upstreams]]\nname = \"a\"\nbackends = [\"echo\"]\nbuffer_messages = 1000001\n",
            "`upstreams[0].buffer_messages`",
            "line 4",
        ),
        (
            "[[routes]]\npath = \"/a\"\n\n[[routes]]\npath = \"/b\"\n#authorize_timeout_ms = 5000\nauthorize_timeout_ms = 0\n",
            "`routes[1].authorize_timeout_ms`",
            "line 7",
        ),
        (
            "max_subscriptions = 5\n[[routes]]\npath = \"/x\"\nmax_subscriptions = 20000\n",
            "`routes[0].max_subscriptions`",
            "line 4",
        ),
        (
            "[[routes]]\npath = \"/x\"\nmax_fragments = 2000000\n",
            "`routes[0].max_fragments`",
            "line 3",
        ),
        (
            "[[routes]]\npath = \"/x\"\nmessages_per_sec = 5\nmessage_burst = 1000001\n",
            "`routes[0].message_burst`",
            "line 4",
        ),
        (
            "[[routes]]\npath = \"/x\"\nmessages_per_sec = 1000001\n",
            "`routes[0].messages_per_sec`",
            "line 3",
        ),
        (
            "[[routes]]\npath = \"/x\"\njwt = { algorithm = \"HS256\", leeway_s = 3601 }\n",
            "`routes[0].jwt.leeway_s`",
            "line 3",
        ),
    ];
    for (text, key, line) in cases {
        let f = write(text);
        let err = Config::from_file(&f.0).unwrap_err().to_string();
        assert!(err.contains(key), "{text:?}: {err}");
        assert!(err.contains(line), "{text:?}: {err}");
        assert!(err.contains(&f.0.display().to_string()), "{text:?}: {err}");
    }
}

/// `listen_tls` and `[[tls.certificates]]` go together; a bad entry is named with its line.
#[test]
fn tls_keys_are_checked_together() {
    let f = write(
        "listen_tls = \"127.0.0.1:8443\"\n[[tls.certificates]]\ncert = \"a.pem\"\nkey = \"a.key\"\n",
    );
    let c = Config::from_file(&f.0).unwrap();
    assert_eq!(c.listen_tls, Some("127.0.0.1:8443".parse().unwrap()));
    assert_eq!(c.tls.certificates[0].key, std::path::PathBuf::from("a.key"));
    let cases = [
        (
            "listen_tls = \"127.0.0.1:8443\"\n",
            "`tls.certificates` must list at least one certificate",
        ),
        (
            "[[tls.certificates]]\ncert = \"a.pem\"\nkey = \"a.key\"\n",
            "`listen_tls` must be set",
        ),
        (
            "listen = \"127.0.0.1:9\"\nlisten_tls = \"127.0.0.1:9\"\n[[tls.certificates]]\ncert = \"a\"\nkey = \"b\"\n",
            "`listen_tls` must differ from listen",
        ),
        (
            "listen_tls = \"127.0.0.1:8443\"\n[[tls.certificates]]\ncert = \"a.pem\"\n\nkey = \"\"\n",
            "line 5: `tls.certificates[0].key` must name a PEM file",
        ),
        (
            "listen_tls = \"127.0.0.1:8443\"\n[[tls.certificates]]\ncert = \"a.pem\"\nkey = \"a.key\"\nchain = 1\n",
            "chain",
        ),
    ];
    for (text, want) in cases {
        let f = write(text);
        let err = Config::from_file(&f.0).unwrap_err().to_string();
        assert!(err.contains(want), "{text:?}: {err}");
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

/// Nested keys are found in their own `[[table]]`, not in another of the same name.
#[test]
fn line_of_finds_nested_keys() {
    let text = "max_fragments = 1\n\
                ip_limits = { max_concurrent = 2 }\n\
                [[upstreams]]\n\
                name = \"a\"\n\
                [[routes]]\n\
                max_fragments = 3\n\
                [routes.jwt]\n\
                leeway_s = 4\n\
                [[routes]]\n\
                path = \"/b\"\n";
    assert_eq!(line_of(text, "max_fragments"), Some(1));
    assert_eq!(line_of(text, "ip_limits.max_concurrent"), Some(2));
    assert_eq!(line_of(text, "upstreams[0].name"), Some(4));
    assert_eq!(line_of(text, "routes[0].max_fragments"), Some(6));
    assert_eq!(line_of(text, "routes[0].jwt.leeway_s"), Some(8));
    // Not set in that route: the route's header.
    assert_eq!(line_of(text, "routes[1].max_fragments"), Some(9));
    assert_eq!(line_of(text, "routes[2].max_fragments"), None);
    assert_eq!(line_of(text, "backlog"), None);
}

/// Every bound holds the default, and the bounds themselves are accepted.
#[test]
fn bounds_are_inclusive_and_hold_the_defaults() {
    Config::default().validate("default").unwrap();
    let at_max = Config {
        workers: Some(MAX_WORKERS),
        backlog: MAX_BACKLOG,
        max_connections: MAX_CONNECTIONS,
        max_message_bytes: MAX_MESSAGE_BYTES,
        max_frame_bytes: MAX_MESSAGE_BYTES,
        max_handshake_bytes: MAX_HANDSHAKE_BYTES,
        handshake_timeout_ms: MAX_HANDSHAKE_TIMEOUT_MS,
        ping_interval_ms: MAX_CONNECTION_TIMER_MS,
        pong_timeout_ms: MAX_CONNECTION_TIMER_MS,
        idle_timeout_ms: MAX_CONNECTION_TIMER_MS,
        close_linger_ms: MAX_CLOSE_LINGER_MS,
        shutdown_grace_ms: MAX_SHUTDOWN_GRACE_MS,
        send_queue_bytes: MAX_SEND_QUEUE_BYTES,
        read_buffers: 256,
        read_buffer_bytes: MAX_READ_BUFFER_BYTES,
        relay_queue: MAX_RELAY_QUEUE,
        max_subscriptions: MAX_SUBSCRIPTIONS,
        max_fragments: MAX_FRAGMENTS,
        memory_budget_bytes: Some(MAX_MEMORY_BUDGET),
        ..Config::default()
    };
    at_max.validate("max").unwrap();
    let at_min = Config {
        workers: Some(1),
        backlog: 1,
        max_connections: 1,
        max_message_bytes: 1,
        max_frame_bytes: 1,
        max_handshake_bytes: MIN_HANDSHAKE_BYTES,
        handshake_timeout_ms: MIN_HANDSHAKE_TIMEOUT_MS,
        ping_interval_ms: MIN_PING_INTERVAL_MS,
        pong_timeout_ms: 0,
        idle_timeout_ms: 0,
        close_linger_ms: 0,
        shutdown_grace_ms: 0,
        send_queue_bytes: MIN_SEND_QUEUE_BYTES,
        read_buffers: 1,
        read_buffer_bytes: MIN_READ_BUFFER_BYTES,
        relay_queue: 1,
        memory_budget_bytes: Some(MIN_MEMORY_BUDGET),
        ..Config::default()
    };
    at_min.validate("min").unwrap();
    // 32768 buffers fit when small enough.
    let many = Config {
        read_buffers: MAX_READ_BUFFERS,
        read_buffer_bytes: 8192,
        ..Config::default()
    };
    many.validate("many").unwrap();
}

/// The command line's values get the same bounds, named with where they came from.
#[test]
fn validate_names_the_origin() {
    let c = Config {
        idle_timeout_ms: u64::MAX,
        ..Config::default()
    };
    let err = c.validate("command line").unwrap_err().to_string();
    assert!(
        err.starts_with("command line: `idle_timeout_ms` must be between 0 and 86400000"),
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
