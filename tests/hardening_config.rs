//! Issue 11, config bounds and the connection limit: out-of-range values stop the gateway
//! with the key, the file and the line; the longest allowed timers close nobody early; and
//! connections still in their handshake count toward `max_connections`.

mod common;

use std::time::{Duration, Instant};

use common::{Gateway, WAIT};
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::{self, Message};

/// A raw TCP client that sends an upgrade request: the response and its body.
async fn try_upgrade(gw: &Gateway) -> (common::HttpResponse, String) {
    let mut stream = timeout(WAIT, TcpStream::connect(gw.addr))
        .await
        .unwrap()
        .unwrap();
    stream
        .write_all(common::upgrade_request(gw.addr).as_bytes())
        .await
        .unwrap();
    let (resp, body) = common::read_http_response(&mut stream).await;
    (resp, String::from_utf8_lossy(&body).into_owned())
}

/// Connect (retrying while the answer is 503, for at most `WAIT`) and check the echo.
async fn connect_and_echo(gw: &Gateway) {
    let deadline = Instant::now() + WAIT;
    let mut ws = loop {
        match timeout(WAIT, tokio_tungstenite::connect_async(gw.url()))
            .await
            .unwrap()
        {
            Ok((ws, _)) => break ws,
            Err(tungstenite::Error::Http(resp)) if resp.status() == 503 => {
                assert!(
                    Instant::now() < deadline,
                    "the freed place was never reused"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("handshake failed: {e}"),
        }
    };
    ws.send(Message::text("served")).await.unwrap();
    let reply = timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(reply, Message::text("served"));
}

/// Poll `ringway_connections_open` until it is `want` (at most `WAIT`).
async fn wait_open(gw: &Gateway, want: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let open = gw.metric("ringway_connections_open", "").await;
        if open == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "ringway_connections_open stayed {open}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Three raw TCP connections that never send a request take all three places: the fourth
/// client is refused 503 with Retry-After and the reason at once, and its refusal is counted;
/// once one idle handshaker goes, a new client gets 101 and its echo.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshaking_connections_count_toward_max_connections() {
    let gw = Gateway::with_config("max_connections = 3\n", &["--admin", "127.0.0.1:0"]);
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(
            timeout(WAIT, TcpStream::connect(gw.addr))
                .await
                .unwrap()
                .unwrap(),
        );
    }
    // Accepted (and counted) by the cores, though not one byte was sent.
    wait_open(&gw, 3).await;

    let started = Instant::now();
    let (resp, body) = try_upgrade(&gw).await;
    let took = started.elapsed();
    assert_eq!(resp.status, 503, "{body}");
    assert_eq!(resp.header("retry-after"), Some("5"));
    assert_eq!(resp.header("connection"), Some("close"));
    assert!(body.contains("connection limit reached"), "{body}");
    assert!(took < Duration::from_secs(1), "refusal took {took:?}");
    assert_eq!(
        gw.metric(
            "ringway_policy_refusals_total",
            "reason=\"connection_limit\""
        )
        .await,
        1
    );
    // The refused client took no place.
    wait_open(&gw, 3).await;

    // One idle handshaker leaves: its place is given back when its slot is freed.
    drop(idle.remove(0));
    wait_open(&gw, 2).await;
    connect_and_echo(&gw).await;
    // The two handshakers left are still held (and counted) until their handshake timeout.
    wait_open(&gw, 2).await;
    assert_eq!(
        gw.metric(
            "ringway_policy_refusals_total",
            "reason=\"connection_limit\""
        )
        .await,
        1,
        "no further refusal"
    );
}

/// Handshakers that never finish lose their place at `handshake_timeout_ms` (408), and the
/// place goes to the next client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timed_out_handshakers_give_their_place_back() {
    let gw = Gateway::with_config(
        "max_connections = 2\nhandshake_timeout_ms = 300\n",
        &["--admin", "127.0.0.1:0"],
    );
    let mut idle = Vec::new();
    for _ in 0..2 {
        let mut s = timeout(WAIT, TcpStream::connect(gw.addr))
            .await
            .unwrap()
            .unwrap();
        // Half a request, then silence.
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        idle.push(s);
    }
    wait_open(&gw, 2).await;
    let (resp, body) = try_upgrade(&gw).await;
    assert_eq!(resp.status, 503, "{body}");
    assert!(body.contains("connection limit reached"), "{body}");

    let started = Instant::now();
    for s in &mut idle {
        let (resp, _) = common::http_response_then_eof(s).await;
        assert_eq!(resp.status, 408);
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "408 after {took:?}");
    connect_and_echo(&gw).await;
}

/// The largest timers the config allows keep connections alive (the u64 wrap that once
/// closed every connection at once cannot come back): nobody is closed, echo works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_longest_allowed_timers_close_nobody() {
    let config = "idle_timeout_ms = 86400000\nping_interval_ms = 86400000\n\
                  pong_timeout_ms = 86400000\nhandshake_timeout_ms = 300000\n\
                  close_linger_ms = 60000\nshutdown_grace_ms = 600000\n";
    let gw = Gateway::with_config(config, &["--admin", "127.0.0.1:0"]);
    let (mut ws, _) = timeout(WAIT, tokio_tungstenite::connect_async(gw.url()))
        .await
        .unwrap()
        .unwrap();
    for i in 0..5 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let text = format!("still here {i}");
        ws.send(Message::text(text.clone())).await.unwrap();
        let reply = timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(reply, Message::text(text));
    }
    assert_eq!(gw.metric("ringway_connections_closed_total", "").await, 0);
    connect_and_echo(&gw).await;
}

/// Write `text` to a fresh config file; removed on drop.
struct ConfigFile(std::path::PathBuf);

impl ConfigFile {
    fn new(tag: &str, text: &str) -> ConfigFile {
        let p =
            std::env::temp_dir().join(format!("ringway-bounds-{}-{tag}.toml", std::process::id()));
        std::fs::write(&p, text).unwrap();
        ConfigFile(p)
    }
    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Out-of-range values in a file: both `check-config` and a start exit 1 at once with the
/// key, the file, the line and the allowed range; nothing is served.
#[test]
fn out_of_range_values_stop_the_gateway_naming_key_file_and_line() {
    let cases = [
        (
            "idle",
            "# far too long\nidle_timeout_ms = 9223372036854775807\n",
            "`idle_timeout_ms` must be between 0 and 86400000",
            "line 2",
        ),
        (
            "buffers",
            "read_buffers = 32768\nread_buffer_bytes = 1048576\n",
            "at most 268435456",
            "line 1",
        ),
        (
            "route",
            "[[routes]]\npath = \"/x\"\nauthorize = true\nauthorize_timeout_ms = 86400000\n",
            "`routes[0].authorize_timeout_ms` must be between 1 and 300000",
            "line 4",
        ),
        (
            "upstream",
            "[[upstreams]]\nname = \"a\"\nbackends = [\"echo\"]\nbuffer_messages = 5000000\n",
            "`upstreams[0].buffer_messages` must be between 0 and 1000000",
            "line 4",
        ),
    ];
    for (tag, text, problem, line) in cases {
        let file = ConfigFile::new(tag, text);
        for args in [
            vec!["check-config", file.path()],
            vec![
                "--listen",
                "127.0.0.1:0",
                "--admin",
                "127.0.0.1:0",
                "--config",
                file.path(),
            ],
        ] {
            let started = Instant::now();
            let out = common::run_to_exit(&args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
            assert!(started.elapsed() < Duration::from_secs(5), "{args:?}");
            assert!(stderr.contains(problem), "{args:?}: {stderr}");
            assert!(stderr.contains(line), "{args:?}: {stderr}");
            assert!(stderr.contains(file.path()), "{args:?}: {stderr}");
            assert!(!stderr.contains("serving ws://"), "{args:?}: {stderr}");
        }
    }
}

/// The command-line flags have the same bounds as their keys, and say so naming the flag.
#[test]
fn out_of_range_flags_are_refused() {
    let cases: [(&[&str], &str); 4] = [
        (
            &["--idle-timeout-ms", "18446744073709551615"],
            "--idle-timeout-ms must be between 0 and 86400000, not 18446744073709551615",
        ),
        (
            &["--workers", "256"],
            "--workers must be between 1 and 255, not 256",
        ),
        (
            &["--max-message", "2147483648"],
            "--max-message must be between 1 and 1073741824, not 2147483648",
        ),
        (
            &["--max-fragments", "2000000"],
            "--max-fragments must be between 0 and 1048576, not 2000000",
        ),
    ];
    for (flags, problem) in cases {
        let mut args = vec!["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"];
        args.extend_from_slice(flags);
        let started = Instant::now();
        let out = common::run_to_exit(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{flags:?}: {stderr}");
        assert!(started.elapsed() < Duration::from_secs(5), "{flags:?}");
        assert!(stderr.contains(problem), "{flags:?}: {stderr}");
        assert!(!stderr.contains("serving ws://"), "{flags:?}: {stderr}");
    }
}
