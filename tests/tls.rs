//! wss://: TLS terminated on the gateway's cores. Every test makes its own CA and
//! certificates (rcgen), starts the real binary with `--listen-tls`, and talks to it with
//! independent TLS clients: rustls (sync, to look at the handshake), tokio-rustls +
//! tokio-tungstenite, and Python's `websockets` over `ssl`.

mod common;
mod common_tls;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{masked_frame, parse_server_frame, Gateway, OP_TEXT, WAIT};
use common_tls::{provider, s, Ca, Dir};
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, HandshakeKind, RootCertStore, StreamOwned};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;

// ----- the gateway -----

/// Start the gateway with `--listen` and `--listen-tls` serving `cert`/`key`, plus `extra`.
fn start(cert: &Path, key: &Path, extra: &[&str]) -> Gateway {
    let mut args = vec![
        "--listen-tls",
        "127.0.0.1:0",
        "--tls-cert",
        s(cert),
        "--tls-key",
        s(key),
    ];
    args.extend_from_slice(extra);
    Gateway::start(&args)
}

/// A configuration file serving wss:// on a free port with `certs` (cert, key) in order
/// (the first is the default without SNI), after the top-level keys in `head`.
fn tls_config(head: &str, certs: &[(&Path, &Path)]) -> String {
    let mut toml = format!("{head}listen_tls = \"127.0.0.1:0\"\n");
    for (cert, key) in certs {
        toml += &format!(
            "[[tls.certificates]]\ncert = \"{}\"\nkey = \"{}\"\n",
            s(cert),
            s(key)
        );
    }
    toml
}

// ----- clients -----

/// A client config trusting `ca`, for `versions`, offering `alpn`.
fn client_config(
    ca: &Ca,
    versions: &[&'static rustls::SupportedProtocolVersion],
    alpn: &[&str],
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.der()).unwrap();
    let mut c = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    c.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Arc::new(c)
}

fn default_client(ca: &Ca) -> Arc<ClientConfig> {
    client_config(ca, rustls::DEFAULT_VERSIONS, &["http/1.1"])
}

type Tls = StreamOwned<ClientConnection, TcpStream>;

/// Connect and finish the TLS handshake (blocking, bounded by `WAIT`).
fn tls_connect(addr: SocketAddr, config: &Arc<ClientConfig>, name: &str) -> Result<Tls, String> {
    let tcp = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    tcp.set_write_timeout(Some(WAIT)).unwrap();
    let server = ServerName::try_from(name.to_string()).unwrap();
    let conn = ClientConnection::new(config.clone(), server).unwrap();
    let mut tls = StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn
            .complete_io(&mut tls.sock)
            .map_err(|e| e.to_string())?;
    }
    Ok(tls)
}

/// The WebSocket upgrade over an established TLS stream; returns the response head.
fn upgrade(tls: &mut Tls) -> String {
    tls.write_all(common::upgrade_request("127.0.0.1:1".parse().unwrap()).as_bytes())
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tls.read(&mut byte).expect("reading the 101");
        assert!(n > 0, "closed during the upgrade: {head:?}");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    head
}

/// One text message there and back over a raw TLS WebSocket.
fn echo_raw(tls: &mut Tls, text: &str) {
    tls.write_all(&masked_frame(true, OP_TEXT, text.as_bytes()))
        .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some((frame, _)) = parse_server_frame(&buf) {
            assert_eq!(frame.opcode, OP_TEXT);
            assert_eq!(frame.payload, text.as_bytes());
            return;
        }
        let n = tls.read(&mut chunk).expect("reading the echo");
        assert!(n > 0, "closed before the echo");
        buf.extend_from_slice(&chunk[..n]);
    }
}

type Wss =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// A wss:// client: tokio-rustls under tokio-tungstenite.
async fn wss(addr: SocketAddr, config: &Arc<ClientConfig>, name: &str) -> Wss {
    let tcp = timeout(WAIT, tokio::net::TcpStream::connect(addr))
        .await
        .unwrap()
        .unwrap();
    let server = ServerName::try_from(name.to_string()).unwrap();
    let tls = timeout(
        WAIT,
        tokio_rustls::TlsConnector::from(config.clone()).connect(server, tcp),
    )
    .await
    .expect("TLS handshake timed out")
    .expect("TLS handshake");
    let url = format!("wss://{name}:{}/", addr.port());
    let (ws, _) = timeout(
        WAIT,
        tokio_tungstenite::client_async_with_config(
            url,
            tls,
            Some(tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
                max_message_size: Some(4 << 20),
                max_frame_size: Some(4 << 20),
                ..Default::default()
            }),
        ),
    )
    .await
    .expect("upgrade timed out")
    .expect("upgrade");
    ws
}

async fn echo(ws: &mut Wss, msg: Message) {
    ws.send(msg.clone()).await.expect("send");
    let reply = timeout(WAIT, ws.next())
        .await
        .expect("echo timed out")
        .expect("stream ended")
        .expect("ws error");
    assert_eq!(reply, msg);
}

/// The leaf certificate a full handshake with SNI `name` is served (a client config of its
/// own: a resumed session would report the certificate of the session it resumes).
fn served(addr: SocketAddr, ca: &Ca, name: &str) -> CertificateDer<'static> {
    let tls = tls_connect(addr, &default_client(ca), name).expect("TLS handshake");
    assert_eq!(tls.conn.handshake_kind(), Some(HandshakeKind::Full));
    tls.conn.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

/// Require the server to end the connection within `limit`, sending nothing; how long it
/// took.
fn expect_closed_silently(tcp: &mut TcpStream, limit: Duration) -> Duration {
    let started = Instant::now();
    tcp.set_read_timeout(Some(limit)).unwrap();
    let mut chunk = [0u8; 4096];
    match tcp.read(&mut chunk) {
        Ok(0) => {}
        Ok(n) => panic!(
            "expected the connection closed, got {n} bytes: {:?}",
            String::from_utf8_lossy(&chunk[..n])
        ),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("not closed within {limit:?}: {e}"),
    }
    started.elapsed()
}

fn wait_for_log(gw: &Gateway, text: &str, count: usize) {
    let deadline = Instant::now() + WAIT;
    while gw.log().matches(text).count() < count {
        assert!(
            Instant::now() < deadline,
            "no {text:?} in the log:\n{}",
            gw.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ----- tests -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_echo_text_binary_a_large_message_and_many_small_ones() {
    let ca = Ca::new("ringway test CA");
    let dir = Dir::new("echo");
    let (cert, key) = dir.write("server", &ca.leaf(&["localhost", "127.0.0.1"]));
    let gw = start(&cert, &key, &["--max-message", "2097152"]);
    let addr = gw.wss_addr();
    let mut ws = wss(addr, &default_client(&ca), "localhost").await;
    echo(&mut ws, Message::text("hello over TLS")).await;
    echo(&mut ws, Message::binary(vec![0u8, 1, 2, 255, 254])).await;
    // 1 MiB: many TLS records each way, reassembled into one frame.
    let big: Vec<u8> = (0..1 << 20).map(|i| (i * 7 % 251) as u8).collect();
    echo(&mut ws, Message::binary(big)).await;
    // Many small ones, pipelined: all come back, in order.
    for i in 0..2000 {
        ws.feed(Message::text(format!("m{i}"))).await.unwrap();
    }
    ws.flush().await.unwrap();
    for i in 0..2000 {
        let reply = timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(reply, Message::text(format!("m{i}")));
    }
    ws.close(None).await.unwrap();
    assert_eq!(
        gw.metric("ringway_tls_handshake_failures_total", "").await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_and_tls_listeners_serve_side_by_side() {
    let ca = Ca::new("ringway test CA");
    let dir = Dir::new("side");
    let (cert, key) = dir.write("server", &ca.leaf(&["localhost"]));
    let gw = start(&cert, &key, &[]);
    let tls_addr = gw.wss_addr();
    assert_ne!(tls_addr, gw.addr);
    let (mut plain, _) = timeout(WAIT, tokio_tungstenite::connect_async(gw.url()))
        .await
        .unwrap()
        .unwrap();
    let mut secure = wss(tls_addr, &default_client(&ca), "localhost").await;
    for i in 0..20 {
        let m = Message::text(format!("both {i}"));
        plain.send(m.clone()).await.unwrap();
        let r = timeout(WAIT, plain.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(r, m);
        echo(&mut secure, m).await;
    }
    // A TLS client on the plain port fails (the gateway answers HTTP 400, not TLS).
    assert!(tls_connect(gw.addr, &default_client(&ca), "localhost").is_err());
}

#[test]
fn tls_1_2_and_1_3_both_work_and_alpn_is_http_1_1() {
    let ca = Ca::new("ringway test CA");
    let dir = Dir::new("versions");
    let (cert, key) = dir.write("server", &ca.leaf(&["localhost"]));
    let gw = start(&cert, &key, &[]);
    let addr = gw.wss_addr();
    for (version, want) in [
        (&rustls::version::TLS12, rustls::ProtocolVersion::TLSv1_2),
        (&rustls::version::TLS13, rustls::ProtocolVersion::TLSv1_3),
    ] {
        let config = client_config(&ca, &[version], &["h2", "http/1.1"]);
        let mut tls = tls_connect(addr, &config, "localhost").expect("TLS handshake");
        assert_eq!(tls.conn.protocol_version(), Some(want));
        assert_eq!(tls.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
        upgrade(&mut tls);
        echo_raw(&mut tls, &format!("over {want:?}"));
    }
    // No ALPN offered at all is fine too.
    let config = client_config(&ca, rustls::DEFAULT_VERSIONS, &[]);
    let mut tls = tls_connect(addr, &config, "localhost").expect("TLS handshake");
    assert_eq!(tls.conn.alpn_protocol(), None);
    upgrade(&mut tls);
    echo_raw(&mut tls, "no alpn");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_only_client_gets_no_application_protocol() {
    let ca = Ca::new("ringway test CA");
    let dir = Dir::new("alpn");
    let (cert, key) = dir.write("server", &ca.leaf(&["localhost"]));
    let gw = start(&cert, &key, &[]);
    let addr = gw.wss_addr();
    let config = client_config(&ca, rustls::DEFAULT_VERSIONS, &["h2"]);
    let err = tls_connect(addr, &config, "localhost").unwrap_err();
    assert!(
        err.contains("NoApplicationProtocol"),
        "expected the no_application_protocol alert, got: {err}"
    );
    let deadline = Instant::now() + WAIT;
    while gw
        .metric(
            "ringway_tls_handshake_failures_total",
            "reason=\"no_application_protocol\"",
        )
        .await
        != 1
    {
        assert!(Instant::now() < deadline, "{}", gw.metrics().await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn sni_picks_the_certificate_that_lists_the_name() {
    let ca = Ca::new("ringway test CA");
    let dir = Dir::new("sni");
    let a = ca.leaf(&["a.test", "127.0.0.1"]);
    let b = ca.leaf(&["b.test", "*.b.test"]);
    let (a_cert, a_key) = dir.write("a", &a);
    let (b_cert, b_key) = dir.write("b", &b);
    let toml = tls_config("", &[(&a_cert, &a_key), (&b_cert, &b_key)]);
    let gw = Gateway::with_config(&toml, &[]);
    let addr = gw.wss_addr();
    let config = default_client(&ca);
    assert_eq!(served(addr, &ca, "a.test"), a.der);
    assert_eq!(served(addr, &ca, "b.test"), b.der);
    assert_eq!(served(addr, &ca, "www.b.test"), b.der, "wildcard");
    // An IP address sends no SNI: the first certificate is the default.
    assert_eq!(served(addr, &ca, "127.0.0.1"), a.der);
    // And the chosen certificate really serves WebSocket.
    let mut tls = tls_connect(addr, &config, "www.b.test").unwrap();
    upgrade(&mut tls);
    echo_raw(&mut tls, "picked by SNI");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_http_to_the_tls_port_is_closed_unanswered() {
    let ca = Ca::new("ringway test CA");
    let dir = Dir::new("plain");
    let (cert, key) = dir.write("server", &ca.leaf(&["localhost"]));
    let gw = start(&cert, &key, &[]);
    let addr = gw.wss_addr();
    let mut tcp = TcpStream::connect(addr).unwrap();
    let request = common::upgrade_request(addr);
    tcp.write_all(request.as_bytes()).unwrap();
    let took = expect_closed_silently(&mut tcp, Duration::from_secs(3));
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert_eq!(
        gw.metric(
            "ringway_tls_handshake_failures_total",
            "reason=\"plaintext_http\""
        )
        .await,
        1
    );
    // The TLS port still serves TLS.
    let mut ws = wss(addr, &default_client(&ca), "localhost").await;
    echo(&mut ws, Message::text("still serving")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_hello_is_closed_at_the_handshake_timeout_and_counted() {
    let ca = Ca::new("ringway test CA");
    let dir = Dir::new("stall");
    let (cert, key) = dir.write("server", &ca.leaf(&["localhost"]));
    let toml = tls_config("handshake_timeout_ms = 600\n", &[(&cert, &key)]);
    let gw = Gateway::with_config(&toml, &[]);
    let addr = gw.wss_addr();
    // One client sends nothing; one sends the first bytes of a ClientHello and stops.
    let mut silent = TcpStream::connect(addr).unwrap();
    let mut partial = TcpStream::connect(addr).unwrap();
    partial
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .unwrap();
    let took = expect_closed_silently(&mut silent, Duration::from_secs(5));
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_millis(2500),
        "closed after {took:?}, the deadline is 600 ms"
    );
    expect_closed_silently(&mut partial, Duration::from_secs(3));
    let deadline = Instant::now() + WAIT;
    while gw
        .metric(
            "ringway_tls_handshake_failures_total",
            "reason=\"handshake_timeout\"",
        )
        .await
        != 2
    {
        assert!(Instant::now() < deadline, "{}", gw.metrics().await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A prompt client is served meanwhile.
    let mut ws = wss(addr, &default_client(&ca), "localhost").await;
    echo(&mut ws, Message::text("prompt")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_closing_mid_handshake_is_counted_as_eof_during_handshake() {
    let ca = Ca::new("ringway test CA");
    let dir = Dir::new("eof");
    let (cert, key) = dir.write("server", &ca.leaf(&["localhost"]));
    let gw = start(&cert, &key, &["--workers", "1"]);
    let addr = gw.wss_addr();
    // Half of a real ClientHello, then FIN; and a connection that sends nothing before FIN.
    let mut client = ClientConnection::new(
        default_client(&ca),
        ServerName::try_from("localhost").unwrap(),
    )
    .unwrap();
    let mut hello = Vec::new();
    while client.wants_write() {
        client.write_tls(&mut hello).unwrap();
    }
    let mut half = TcpStream::connect(addr).unwrap();
    half.write_all(&hello[..hello.len() / 2]).unwrap();
    half.shutdown(std::net::Shutdown::Write).unwrap();
    let mut nothing = TcpStream::connect(addr).unwrap();
    nothing.shutdown(std::net::Shutdown::Write).unwrap();
    // Closed at once, with no alert: well before the 10 s handshake deadline.
    assert!(expect_closed_silently(&mut half, Duration::from_secs(3)) < Duration::from_secs(3));
    expect_closed_silently(&mut nothing, Duration::from_secs(3));
    let eof = "reason=\"eof_during_handshake\"";
    let deadline = Instant::now() + WAIT;
    while gw.metric("ringway_tls_handshake_failures_total", eof).await != 2 {
        assert!(Instant::now() < deadline, "{}", gw.metrics().await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Nothing else was counted for them, and a client that finishes is not counted at all.
    let mut ws = wss(addr, &default_client(&ca), "localhost").await;
    echo(&mut ws, Message::text("after the quitters")).await;
    ws.close(None).await.unwrap();
    drop(ws);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        gw.metric("ringway_tls_handshake_failures_total", "").await,
        2,
        "{}",
        gw.metrics().await
    );
}

#[test]
fn a_second_connection_resumes_the_session() {
    let ca = Ca::new("ringway test CA");
    let dir = Dir::new("resume");
    let (cert, key) = dir.write("server", &ca.leaf(&["localhost"]));
    let gw = start(&cert, &key, &[]);
    let addr = gw.wss_addr();
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let config = client_config(&ca, &[version], &["http/1.1"]);
        let mut first = tls_connect(addr, &config, "localhost").unwrap();
        assert_eq!(first.conn.handshake_kind(), Some(HandshakeKind::Full));
        // Reading the 101 also reads the session tickets sent after the handshake.
        upgrade(&mut first);
        echo_raw(&mut first, "first");
        let mut second = tls_connect(addr, &config, "localhost").unwrap();
        assert_eq!(
            second.conn.handshake_kind(),
            Some(HandshakeKind::Resumed),
            "{version:?}"
        );
        upgrade(&mut second);
        echo_raw(&mut second, "resumed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rotates_the_certificate_and_keeps_open_connections() {
    let ca = Ca::new("ringway test CA");
    let dir = Dir::new("rotate");
    let old = ca.leaf(&["localhost"]);
    let (cert, key) = dir.write("server", &old);
    let gw = start(&cert, &key, &[]);
    let addr = gw.wss_addr();
    let config = default_client(&ca);
    let mut open = wss(addr, &config, "localhost").await;
    echo(&mut open, Message::text("before")).await;
    assert_eq!(served(addr, &ca, "localhost"), old.der);

    let new = ca.leaf(&["localhost"]);
    dir.write("server", &new);
    gw.signal(libc::SIGHUP);
    wait_for_log(&gw, "configuration reloaded", 1);
    assert_eq!(served(addr, &ca, "localhost"), new.der, "new handshakes");
    echo(&mut open, Message::text("after the rotation")).await;

    // A bad file: refused, logged with its name, the new certificate stays in force.
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nbroken\n").unwrap();
    gw.signal(libc::SIGHUP);
    wait_for_log(&gw, "reload refused", 1);
    let log = gw.log();
    let line = log.lines().find(|l| l.contains("reload refused")).unwrap();
    assert!(line.contains("ERROR"), "{line}");
    assert!(line.contains(s(&cert)), "the file is named: {line}");
    assert_eq!(served(addr, &ca, "localhost"), new.der);
    echo(&mut open, Message::text("after a bad reload")).await;
    let mut fresh = wss(addr, &config, "localhost").await;
    echo(&mut fresh, Message::text("fresh")).await;
}

#[test]
fn python_websockets_over_wss() {
    let ca = Ca::new("ringway test CA");
    let dir = Dir::new("python");
    let (cert, key) = dir.write("server", &ca.leaf(&["localhost", "127.0.0.1"]));
    std::fs::write(dir.path("ca.pem"), ca.cert.pem()).unwrap();
    let gw = start(&cert, &key, &[]);
    let addr = gw.wss_addr();
    let py = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv-py3/bin/python");
    let script = r#"
import ssl, sys
from websockets.sync.client import connect
ctx = ssl.create_default_context(cafile=sys.argv[2])
with connect(sys.argv[1], ssl=ctx, open_timeout=10, close_timeout=5, max_size=2**20) as ws:
    ws.send("hello from python")
    assert ws.recv(timeout=10) == "hello from python"
    data = bytes(range(256)) * 200
    ws.send(data)
    assert ws.recv(timeout=10) == data
    for i in range(200):
        ws.send(f"n{i}")
    for i in range(200):
        assert ws.recv(timeout=10) == f"n{i}"
    print("ok", ws.socket.version())
"#;
    let out = std::process::Command::new(py)
        .args(["-c", script, &format!("wss://127.0.0.1:{}/", addr.port())])
        .arg(dir.path("ca.pem"))
        .output()
        .expect("run .venv-py3/bin/python (scripts/setup-test-deps.sh installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.starts_with("ok TLSv1."), "{stdout}");
}

#[test]
fn bad_tls_settings_stop_the_gateway_with_a_clear_error() {
    let dir = Dir::new("bad");
    let missing = dir.path("missing.pem");
    let out = common::run_to_exit(&[
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--listen-tls",
        "127.0.0.1:0",
        "--tls-cert",
        s(&missing),
        "--tls-key",
        s(&missing),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains(s(&missing)), "names the file: {err}");
    // listen_tls without any certificate names the key.
    let out = common::run_to_exit(&[
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--listen-tls",
        "127.0.0.1:0",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("tls.certificates"), "{err}");
}

/// What `ringway_buffer_bytes` says once it has settled (it is published once per loop turn).
async fn settled_buffer_bytes(gw: &Gateway) -> u64 {
    let mut last = gw.metric("ringway_buffer_bytes", "").await;
    loop {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let now = gw.metric("ringway_buffer_bytes", "").await;
        if now == last {
            return now;
        }
        last = now;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_tls_connections_are_charged_to_the_memory_budget() {
    let ca = Ca::new("ringway test CA");
    let dir = Dir::new("memory");
    let (cert, key) = dir.write("server", &ca.leaf(&["localhost"]));
    let gw = start(&cert, &key, &[]);
    let addr = gw.wss_addr();
    const N: u64 = 20;
    let base = settled_buffer_bytes(&gw).await;
    let mut plain = Vec::new();
    for _ in 0..N {
        let (mut ws, _) = timeout(WAIT, tokio_tungstenite::connect_async(gw.url()))
            .await
            .unwrap()
            .unwrap();
        ws.send(Message::text("x")).await.unwrap();
        timeout(WAIT, ws.next()).await.unwrap();
        plain.push(ws);
    }
    let with_plain = settled_buffer_bytes(&gw).await;
    let config = default_client(&ca);
    let mut secure = Vec::new();
    for _ in 0..N {
        let mut ws = wss(addr, &config, "localhost").await;
        echo(&mut ws, Message::text("x")).await;
        secure.push(ws);
    }
    let with_tls = settled_buffer_bytes(&gw).await;
    let per_plain = (with_plain - base) / N;
    let per_tls = (with_tls - with_plain) / N;
    assert!(
        per_tls >= per_plain + ringway::session::TLS_OPEN_BYTES as u64,
        "a wss connection is charged {per_tls} bytes, a ws one {per_plain}"
    );
    drop((plain, secure));
}

/// The response head to an upgrade request over `tls`, whatever its status.
fn response_head(tls: &mut Tls) -> String {
    tls.write_all(common::upgrade_request("127.0.0.1:1".parse().unwrap()).as_bytes())
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tls.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            other => panic!("closed during the response ({other:?}): {head:?}"),
        }
    }
    String::from_utf8(head).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_refused_at_accept_gets_its_503_over_tls() {
    let ca = Ca::new("ringway test CA");
    let dir = Dir::new("refused");
    let (cert, key) = dir.write("server", &ca.leaf(&["localhost"]));
    let toml = tls_config("max_connections = 1\n", &[(&cert, &key)]);
    let gw = Gateway::with_config(&toml, &[]);
    let addr = gw.wss_addr();
    let mut first = wss(addr, &default_client(&ca), "localhost").await;
    echo(&mut first, Message::text("the one place")).await;
    // The refusal is decided at accept, and still answered after the TLS handshake.
    let ca_ref = &ca;
    let head = tokio::task::block_in_place(|| {
        let mut tls = tls_connect(addr, &default_client(ca_ref), "localhost").unwrap();
        response_head(&mut tls)
    });
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    echo(&mut first, Message::text("still served")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_sends_1001_to_wss_clients() {
    let ca = Ca::new("ringway test CA");
    let dir = Dir::new("drain");
    let (cert, key) = dir.write("server", &ca.leaf(&["localhost"]));
    let mut gw = start(&cert, &key, &[]);
    let addr = gw.wss_addr();
    let mut ws = wss(addr, &default_client(&ca), "localhost").await;
    echo(&mut ws, Message::text("before")).await;
    gw.signal(libc::SIGTERM);
    let frame = timeout(WAIT, ws.next())
        .await
        .expect("no close within WAIT")
        .expect("stream ended")
        .expect("ws error");
    match frame {
        Message::Close(Some(c)) => assert_eq!(u16::from(c.code), 1001),
        other => panic!("expected close 1001, got {other:?}"),
    }
    // Reading on sends tungstenite's queued answer, then sees the end (close_notify, FIN).
    let ended = timeout(WAIT, async { while let Some(Ok(_)) = ws.next().await {} }).await;
    assert!(ended.is_ok(), "the connection did not end");
    drop(ws);
    // Every client answered: well before the 10 s grace.
    let status = gw
        .wait_exit(Duration::from_secs(5))
        .expect("the gateway did not exit");
    assert!(status.success(), "{status:?}");
}

#[test]
fn check_config_loads_the_certificates() {
    let ca = Ca::new("ringway test CA");
    let dir = Dir::new("check");
    let (cert, key) = dir.write("server", &ca.leaf(&["ws.example.com", "*.example.org"]));
    let config = dir.path("ringway.toml");
    let toml = |key: &Path| {
        format!(
            "listen_tls = \"127.0.0.1:8443\"\n[[tls.certificates]]\ncert = \"{}\"\nkey = \"{}\"\n",
            s(&cert),
            s(key)
        )
    };
    std::fs::write(&config, toml(&key)).unwrap();
    let out = common::run_to_exit(&["check-config", s(&config)]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("ws.example.com") && stdout.contains("*.example.org"),
        "the names each certificate serves: {stdout}"
    );
    // A key that belongs to another certificate: refused, naming both files.
    let (_, other_key) = dir.write("other", &ca.leaf(&["other.test"]));
    std::fs::write(&config, toml(&other_key)).unwrap();
    let out = common::run_to_exit(&["check-config", s(&config)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(s(&other_key)) && stderr.contains("does not match"),
        "{stderr}"
    );
}
