//! TLS to backends: `tls://HOST:PORT` in `[[upstreams]]`, verified against the upstream's
//! `ca_file` and the host name, with an optional client certificate (mutual TLS). Every test
//! makes its CAs in the test (rcgen), runs the real binary, and serves the relay protocol
//! (docs/relay-protocol.md, frames built by hand in tests/common_relay) from a std + rustls
//! TLS backend of its own.

mod common;
mod common_relay;
mod common_tls;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Gateway, WAIT};
use common_relay::{
    hello_frame, relay_frame, send_frame, send_text, wait_log, ws_connect, ws_next_within, Got,
    T_HELLO, T_MESSAGE, T_PING, T_PONG,
};
use common_tls::{provider, s, Ca, Dir, Leaf};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection, StreamOwned};
use serde_json::json;

// ----- a TLS backend speaking the relay protocol -----

/// A backend on 127.0.0.1 that terminates TLS with a configuration the test may swap, says
/// hello, answers pings and echoes every text message back to its connection.
struct TlsBackend {
    addr: SocketAddr,
    config: Arc<Mutex<Arc<ServerConfig>>>,
    /// Handshakes completed, and why the others failed.
    handshakes: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

fn server_config(leaf: &Leaf, client_ca: Option<&Ca>) -> Arc<ServerConfig> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            roots.add(ca.der()).unwrap();
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider())
                .build()
                .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    Arc::new(
        builder
            .with_single_cert(vec![leaf.der.clone()], leaf.key())
            .unwrap(),
    )
}

impl TlsBackend {
    fn spawn(config: Arc<ServerConfig>) -> TlsBackend {
        TlsBackend::spawn_with(config, false)
    }

    /// `slow`: a small receive buffer and a pause after every read, so the gateway's
    /// socket fills and its link must wait for room.
    fn spawn_with(config: Arc<ServerConfig>, slow: bool) -> TlsBackend {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        if slow {
            socket2::SockRef::from(&listener)
                .set_recv_buffer_size(4096)
                .unwrap();
        }
        let b = TlsBackend {
            addr: listener.local_addr().unwrap(),
            config: Arc::new(Mutex::new(config)),
            handshakes: Arc::default(),
            failures: Arc::default(),
            stop: Arc::default(),
        };
        let (config, handshakes, failures, stop) = (
            b.config.clone(),
            b.handshakes.clone(),
            b.failures.clone(),
            b.stop.clone(),
        );
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(90);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((sock, _)) => {
                        let cfg = config.lock().unwrap().clone();
                        let (h, f, st) = (handshakes.clone(), failures.clone(), stop.clone());
                        std::thread::spawn(move || serve(sock, cfg, &h, &f, &st, slow));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(_) => return,
                }
            }
        });
        b
    }

    fn set_config(&self, config: Arc<ServerConfig>) {
        *self.config.lock().unwrap() = config;
    }

    fn failures(&self) -> Vec<String> {
        self.failures.lock().unwrap().clone()
    }
}

impl Drop for TlsBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn timed_out(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// One link: the TLS handshake, then relay frames until EOF, an error or `stop`.
fn serve(
    sock: TcpStream,
    config: Arc<ServerConfig>,
    handshakes: &AtomicUsize,
    failures: &Mutex<Vec<String>>,
    stop: &AtomicBool,
    slow: bool,
) {
    sock.set_nonblocking(false).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut tls = StreamOwned::new(ServerConnection::new(config).unwrap(), sock);
    let deadline = Instant::now() + WAIT;
    while tls.conn.is_handshaking() {
        match tls.conn.complete_io(&mut tls.sock) {
            Ok(_) => {}
            Err(e) if timed_out(&e) && Instant::now() < deadline => {}
            Err(e) => {
                // The alert rustls queued (bad certificate, certificate required).
                let _ = tls.conn.complete_io(&mut tls.sock);
                failures.lock().unwrap().push(e.to_string());
                return;
            }
        }
    }
    handshakes.fetch_add(1, Ordering::Relaxed);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    while !stop.load(Ordering::Relaxed) {
        while buf.len() >= 5 {
            let len = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
            if buf.len() < 4 + len {
                break;
            }
            let (ty, body) = (buf[4], buf[5..4 + len].to_vec());
            buf.drain(..4 + len);
            let answer = match ty {
                T_HELLO => hello_frame("tls-backend"),
                T_PING => relay_frame(T_PONG, &body),
                // conn u64, kind u8, u32 length, payload
                T_MESSAGE => {
                    let conn = u64::from_be_bytes(body[..8].try_into().unwrap());
                    send_frame(conn, &String::from_utf8_lossy(&body[13..]))
                }
                _ => continue,
            };
            if tls.write_all(&answer).is_err() {
                return;
            }
        }
        match tls.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if timed_out(&e) => {}
            Err(_) => return,
        }
        if slow {
            std::thread::sleep(Duration::from_micros(500));
        }
    }
}

// ----- the gateway -----

/// One upstream `secure` with `backend`, its `ca_file` and `extra` keys, routed from `/*`.
fn config(backend: &str, ca_file: &std::path::Path, extra: &str) -> String {
    format!(
        "[[upstreams]]\nname = \"secure\"\nbackends = [\"{backend}\"]\nca_file = \"{}\"\n{extra}\
         [[routes]]\npath = \"/*\"\nupstream = \"secure\"\n",
        s(ca_file)
    )
}

/// A message through the gateway to the backend and back.
async fn echo(gw: &Gateway, n: u32, limit: Duration) {
    let mut ws = ws_connect(&gw.url()).await;
    send_text(&mut ws, json!({ "n": n }).to_string()).await;
    match ws_next_within(&mut ws, limit).await {
        Some(Got::Json(v)) => assert_eq!(v, json!({ "n": n })),
        other => panic!("expected the echo, got {other:?}; stderr:\n{}", gw.log()),
    }
}

async fn failures(gw: &Gateway, reason: &str) -> u64 {
    gw.metric(
        "ringway_backend_tls_failures_total",
        &format!("reason=\"{reason}\""),
    )
    .await
}

// ----- tests -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_through_a_tls_backend_verified_by_ip_address() {
    let ca = Ca::new("backend CA");
    let dir = Dir::new("tlsup-echo");
    let ca_file = dir.file("ca.pem", &ca.pem());
    let backend = TlsBackend::spawn(server_config(&ca.leaf(&["127.0.0.1"]), None));
    let url = format!("tls://{}", backend.addr);
    let gw = Gateway::with_config(&config(&url, &ca_file, ""), &[]);
    wait_log(&gw, "backend link up", 1, WAIT).await;
    for n in 0..3 {
        echo(&gw, n, WAIT).await;
    }
    let up = format!("backend=\"{url}\"");
    assert_eq!(gw.metric("ringway_upstream_up", &up).await, 1);
    for reason in ["unknown_ca", "wrong_name", "peer_alert", "protocol"] {
        assert_eq!(failures(&gw, reason).await, 0, "{reason}");
    }
    assert_eq!(backend.handshakes.load(Ordering::Relaxed), 1, "one link");
    assert!(backend.failures().is_empty(), "{:?}", backend.failures());
}

/// A backend whose certificate another CA signed is refused, logged at WARN with the
/// upstream, backend and reason, counted, and retried with backoff; once it serves a
/// certificate from the trusted CA the link comes up and the message that waited goes
/// through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_is_refused_counted_and_retried() {
    let (ca, other) = (Ca::new("trusted CA"), Ca::new("another CA"));
    let dir = Dir::new("tlsup-ca");
    let ca_file = dir.file("ca.pem", &ca.pem());
    let backend = TlsBackend::spawn(server_config(&other.leaf(&["127.0.0.1"]), None));
    let url = format!("tls://{}", backend.addr);
    let gw = Gateway::with_config(&config(&url, &ca_file, ""), &[]);
    let log = wait_log(&gw, "TLS failed (unknown_ca)", 2, WAIT).await;
    let line = log
        .lines()
        .find(|l| l.contains("TLS failed (unknown_ca)"))
        .unwrap();
    assert!(line.contains("WARN"), "{line}");
    assert!(
        line.contains("upstream=secure") && line.contains(&url) && line.contains("retrying in"),
        "{line}"
    );
    assert!(failures(&gw, "unknown_ca").await >= 2);
    assert_eq!(backend.handshakes.load(Ordering::Relaxed), 0);
    assert!(
        backend.failures().iter().any(|f| f.contains("alert")),
        "the backend was told why: {:?}",
        backend.failures()
    );

    // A message sent while the link is down waits; the good certificate lets it through.
    let mut ws = ws_connect(&gw.url()).await;
    send_text(&mut ws, json!({ "n": 7 }).to_string()).await;
    backend.set_config(server_config(&ca.leaf(&["127.0.0.1"]), None));
    match ws_next_within(&mut ws, WAIT).await {
        Some(Got::Json(v)) => assert_eq!(v, json!({ "n": 7 })),
        other => panic!("expected the echo, got {other:?}; stderr:\n{}", gw.log()),
    }
    assert_eq!(backend.handshakes.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_another_host_name_is_refused() {
    let ca = Ca::new("backend CA");
    let dir = Dir::new("tlsup-name");
    let ca_file = dir.file("ca.pem", &ca.pem());
    let backend = TlsBackend::spawn(server_config(&ca.leaf(&["other.test"]), None));
    let url = format!("tls://{}", backend.addr);
    let gw = Gateway::with_config(&config(&url, &ca_file, ""), &[]);
    wait_log(&gw, "TLS failed (wrong_name)", 2, WAIT).await;
    assert!(failures(&gw, "wrong_name").await >= 2);
    assert_eq!(failures(&gw, "unknown_ca").await, 0);
    assert_eq!(backend.handshakes.load(Ordering::Relaxed), 0);
    assert_eq!(
        gw.metric("ringway_upstream_up", "upstream=\"secure\"")
            .await,
        0
    );
}

/// A backend that requires a client certificate signed by its client CA: the gateway with
/// `client_cert`/`client_key` gets through (by DNS name, `localhost`); one without is
/// refused by the backend, and that is counted as the backend's alert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_and_without_a_client_certificate() {
    let (ca, client_ca) = (Ca::new("backend CA"), Ca::new("client CA"));
    let dir = Dir::new("tlsup-mtls");
    let ca_file = dir.file("ca.pem", &ca.pem());
    let (cert, key) = dir.write("gateway", &client_ca.client_leaf("gateway.test"));
    let backend = TlsBackend::spawn(server_config(&ca.leaf(&["localhost"]), Some(&client_ca)));
    let url = format!("tls://localhost:{}", backend.addr.port());

    let with = format!(
        "client_cert = \"{}\"\nclient_key = \"{}\"\n",
        s(&cert),
        s(&key)
    );
    let gw = Gateway::with_config(&config(&url, &ca_file, &with), &[]);
    wait_log(&gw, "backend link up", 1, WAIT).await;
    echo(&gw, 1, WAIT).await;
    assert_eq!(backend.handshakes.load(Ordering::Relaxed), 1);
    drop(gw);

    let gw = Gateway::with_config(&config(&url, &ca_file, ""), &[]);
    wait_log(&gw, "TLS failed (peer_alert)", 2, WAIT).await;
    assert!(failures(&gw, "peer_alert").await >= 2);
    assert!(
        !gw.log().contains("backend link up"),
        "no link without a client certificate"
    );
    assert!(
        backend
            .failures()
            .iter()
            .any(|f| f.contains("no certificate") || f.contains("NoCertificatesPresented")),
        "{:?}",
        backend.failures()
    );
}

#[test]
fn tls_backend_settings_are_checked_naming_key_file_and_line() {
    let dir = Dir::new("tlsup-config");
    let cfg = |name: &str, text: &str| {
        let p = dir.file(name, text);
        let out = common::run_to_exit(&["check-config", s(&p)]);
        assert!(!out.status.success(), "{text}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let up = "[[upstreams]]\nname = \"secure\"\nbackends = [\"tls://127.0.0.1:9443\"]\n";
    let err = cfg("no-ca.toml", up);
    assert!(
        err.contains("upstreams[0].ca_file") && err.contains("no-ca.toml, line 1"),
        "{err}"
    );
    assert!(err.contains("system roots are not used"), "{err}");

    let err = cfg(
        "gone.toml",
        &format!("{up}ca_file = \"/nonexistent/ca.pem\"\n"),
    );
    assert!(
        err.contains("upstreams[0].ca_file")
            && err.contains("line 4")
            && err.contains("cannot read /nonexistent/ca.pem"),
        "{err}"
    );

    let ca = dir.file("ca.pem", &Ca::new("c").pem());
    let half = format!(
        "{up}ca_file = \"{}\"\nclient_cert = \"{}\"\n",
        s(&ca),
        s(&ca)
    );
    let err = cfg("half.toml", &half);
    assert!(
        err.contains("upstreams[0].client_key") && err.contains("must be set with client_cert"),
        "{err}"
    );

    let junk = dir.file("junk.pem", "not a certificate\n");
    let err = cfg("junk.toml", &format!("{up}ca_file = \"{}\"\n", s(&junk)));
    assert!(
        err.contains("upstreams[0].ca_file") && err.contains("junk.pem"),
        "{err}"
    );

    // The top-level upstream (and --upstream) has no place for a CA: it says where to go.
    let out = common::run_to_exit(&["--upstream", "tls://127.0.0.1:9443"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("[[upstreams]]") && err.contains("ca_file"),
        "{err}"
    );
}

/// Messages larger than a TLS record, and a burst larger than the link's TLS buffer
/// (64 KiB) and the socket's, arrive whole and in order: records are split and joined, and
/// a full socket only makes the link wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_and_a_burst_cross_the_tls_link_intact() {
    let ca = Ca::new("backend CA");
    let dir = Dir::new("tlsup-burst");
    let ca_file = dir.file("ca.pem", &ca.pem());
    let leaf = ca.leaf(&["127.0.0.1"]);
    let backend = TlsBackend::spawn_with(server_config(&leaf, None), true);
    let url = format!("tls://{}", backend.addr);
    // Room for every echo while the client sends before it reads.
    let toml = format!(
        "send_queue_bytes = 16777216\n{}",
        config(&url, &ca_file, "")
    );
    let gw = Gateway::with_config(&toml, &[]);
    wait_log(&gw, "backend link up", 1, WAIT).await;
    let mut ws = ws_connect(&gw.url()).await;
    const N: usize = 120;
    let big = |i: usize| json!({ "i": i, "pad": "x".repeat(50_000 + i) }).to_string();
    // All at once (6 MB: far over the TLS buffer and what the slow backend's socket takes),
    // then every echo.
    for i in 0..N {
        send_text(&mut ws, big(i)).await;
    }
    // The backend reads slowly on purpose; on a loaded 2-core machine one echo can take
    // longer than WAIT to come through, so each gets three times that.
    for i in 0..N {
        match ws_next_within(&mut ws, WAIT * 3).await {
            Some(Got::Json(v)) => {
                assert_eq!(v["i"], json!(i));
                assert_eq!(v["pad"].as_str().map(str::len), Some(50_000 + i));
            }
            other => panic!("message {i}: {other:?}; stderr:\n{}", gw.log()),
        }
    }
    assert_eq!(
        backend.handshakes.load(Ordering::Relaxed),
        1,
        "one link throughout"
    );
}

/// A backend that accepts TCP but never answers the ClientHello: the handshake times out
/// (5 s), is counted as `timeout`, and retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_never_answers_the_handshake_times_out() {
    let dir = Dir::new("tlsup-stall");
    let ca_file = dir.file("ca.pem", &Ca::new("backend CA").pem());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("tls://{}", listener.local_addr().unwrap());
    let held = std::thread::spawn(move || {
        // Hold each connection open, silent, until the gateway gives up on it.
        let (first, _) = listener.accept().unwrap();
        let (second, _) = listener.accept().unwrap();
        (first, second)
    });
    let gw = Gateway::with_config(&config(&url, &ca_file, ""), &[]);
    let log = wait_log(&gw, "TLS failed (timeout)", 1, Duration::from_secs(9)).await;
    assert!(log.contains("no TLS handshake within 5 s"), "{log}");
    assert_eq!(failures(&gw, "timeout").await, 1);
    // Retried: a second connection arrives after the backoff.
    let _ = tokio::task::spawn_blocking(move || held.join().unwrap())
        .await
        .unwrap();
}

/// An expired backend certificate from the trusted CA is refused as `expired`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_backend_certificate_is_refused() {
    let ca = Ca::new("backend CA");
    let dir = Dir::new("tlsup-expired");
    let ca_file = dir.file("ca.pem", &ca.pem());
    let names = ["127.0.0.1"];
    let leaf = ca.make(&common_tls::LeafSpec {
        expired_ago: Some(Duration::from_secs(3_600)),
        ..common_tls::LeafSpec::server(&names)
    });
    let backend = TlsBackend::spawn(server_config(&leaf, None));
    let url = format!("tls://{}", backend.addr);
    let gw = Gateway::with_config(&config(&url, &ca_file, ""), &[]);
    wait_log(&gw, "TLS failed (expired)", 1, WAIT).await;
    assert!(failures(&gw, "expired").await >= 1);
    assert_eq!(backend.handshakes.load(Ordering::Relaxed), 0);
}
