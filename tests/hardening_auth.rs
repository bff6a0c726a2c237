//! Hostile tokens and claims at the edge (issue 11, items 1 and 7): an `Authorization` value
//! that is not ASCII, client-made `x-claim-*` headers, claims with control characters, a
//! stray `?token=`, and tokens that expire while their connection is open. Each with the
//! exact outcome, and another client still served.

mod common;
mod common_relay;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Gateway, WAIT};
use common_relay::{fake_listener, wait_log, FakeLink, T_OPEN};
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "a-test-secret-that-is-at-least-32-bytes-long";

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token_with(claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn token(sub: &str, exp: u64) -> String {
    token_with(serde_json::json!({"sub": sub, "exp": exp}))
}

fn upgrade(target: &str, extra: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    )
    .into_bytes();
    r.extend_from_slice(extra);
    r.extend_from_slice(b"\r\n");
    r
}

fn jwt_route(path: &str, extra: &str) -> String {
    format!(
        "[[routes]]\npath = \"{path}\"\n{extra}\n[routes.jwt]\nalgorithm = \"HS256\"\nsecret = \"{SECRET}\"\npass_claims = [\"sub\"]\n"
    )
}

/// Connect with a Bearer token, send one text message and require its echo.
async fn echo_with_token(url: &str, token: &str) {
    let mut ws = connect_bearer(url, token).await;
    ws.send(Message::text("still served")).await.unwrap();
    let reply = timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(reply, Message::text("still served"));
}

async fn connect_bearer(url: &str, token: &str) -> common_relay::Ws {
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse().unwrap());
    let (ws, resp) = timeout(WAIT, tokio_tungstenite::connect_async(req))
        .await
        .expect("handshake timed out")
        .expect("handshake");
    assert_eq!(resp.status(), 101);
    ws
}

/// The critical one: `Authorization: abcdefé` (a non-ASCII byte at the scheme's end) used to
/// panic the core thread. Every such value, on both cores, is a 401 and the gateway serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_ascii_authorization_is_401_and_the_cores_keep_serving() {
    let gw = Gateway::with_config(&jwt_route("/*", ""), &["--admin", "127.0.0.1:0"]);
    let values: Vec<Vec<u8>> = vec![
        "abcdefé".into(),
        "abcdeé".into(),
        "Beareré".into(),
        "Bearer é".into(),
        "ééééééééé".into(),
        "\u{1F600}\u{1F600}".into(),
        b"Bearer \xff\xfe\xfd".to_vec(),
        b"abcdef\xc3".to_vec(),
        "é".repeat(2000).into_bytes(),
    ];
    // Several of each, so both cores (SO_REUSEPORT spreads connections) see them.
    let mut n = 0;
    for round in 0..3 {
        for value in &values {
            let mut extra = b"Authorization: ".to_vec();
            extra.extend_from_slice(value);
            extra.extend_from_slice(b"\r\n");
            let mut stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
            stream.write_all(&upgrade("/", &extra)).await.unwrap();
            let (resp, body) = common::http_response_then_eof(&mut stream).await;
            assert_eq!(
                resp.status,
                401,
                "round {round}, {:?}: {body}",
                String::from_utf8_lossy(value)
            );
            assert_eq!(resp.header("www-authenticate"), Some("Bearer"));
            assert!(
                body == "missing token\n" || body == "malformed token\n",
                "{body:?}"
            );
            n += 1;
        }
    }
    assert_eq!(
        common::metric_total(&gw, "ringway_policy_refusals_total", "reason=\"auth\"").await,
        n,
        "every refusal counted"
    );
    // Every core still serves: several fresh clients with a valid token get 101 and echo.
    let good = token("user-7", now_s() + 3600);
    for _ in 0..6 {
        echo_with_token(&gw.url(), &good).await;
    }
    let log = gw.log();
    assert!(!log.contains("panicked"), "{log}");
    assert!(!log.contains("abcdef"), "no header value in the log: {log}");
}

/// Start a gateway whose default upstream is a fake backend, and take its link.
async fn gateway_with_fake_backend(routes: &str) -> (Gateway, FakeLink) {
    let (listener, addr) = fake_listener();
    let config = format!("upstream = \"tcp://{addr}\"\n{routes}");
    let gw = Gateway::with_config(&config, &["--admin", "127.0.0.1:0"]);
    let mut link = FakeLink::accept(&listener, WAIT).expect("the gateway's link");
    link.handshake();
    wait_log(&gw, "backend link up", 1, WAIT).await;
    (gw, link)
}

/// Complete a raw handshake (101 expected) and keep the stream open.
async fn raw_upgrade(gw: &Gateway, target: &str, extra: &str) -> tokio::net::TcpStream {
    let mut stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    stream
        .write_all(&upgrade(target, extra.as_bytes()))
        .await
        .unwrap();
    let (resp, _) = common::read_http_response(&mut stream).await;
    assert_eq!(resp.status, 101, "{target} {extra:?}");
    stream
}

/// The backend's next `open` (pings answered), blocking, off the async runtime.
async fn next_open(link: &mut FakeLink) -> common_relay::OpenEvent {
    tokio::task::block_in_place(|| link.read_non_ping(WAIT))
        .map(|f| {
            assert_eq!(f.ty, T_OPEN, "{f:?}");
            f.open()
        })
        .expect("an open event")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_sent_claim_headers_never_reach_the_backend() {
    let routes = jwt_route("/*", "pass_headers = [\"x-claim-sub\", \"x-request-id\"]");
    let (gw, mut link) = gateway_with_fake_backend(&routes).await;
    let alice = token("alice", now_s() + 3600);
    let _client = raw_upgrade(
        &gw,
        "/room",
        &format!(
            "X-Claim-Sub: admin\r\nx-claim-SUB: root\r\nX-Request-Id: r-1\r\n\
             Authorization: Bearer {alice}\r\n"
        ),
    )
    .await;
    let open = next_open(&mut link).await;
    assert_eq!(open.path, "/room");
    assert_eq!(
        open.headers,
        [
            ("x-request-id".to_string(), "r-1".to_string()),
            ("x-claim-sub".to_string(), "alice".to_string()),
        ],
        "only the verified claim, and no Authorization"
    );
    // Another client is still served, with its own verified claim.
    let _bob = raw_upgrade(
        &gw,
        "/",
        &format!("Authorization: Bearer {}\r\n", token("bob", now_s() + 3600)),
    )
    .await;
    let open = next_open(&mut link).await;
    assert_eq!(
        open.headers,
        [("x-claim-sub".to_string(), "bob".to_string())]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_with_control_characters_is_401_and_never_opened() {
    let routes = jwt_route("/*", "pass_headers = [\"x-request-id\"]");
    let (gw, mut link) = gateway_with_fake_backend(&routes).await;
    let exp = now_s() + 3600;
    for sub in [
        "alice\r\nx-admin: 1",
        "alice\n",
        "nul\0",
        "del\u{7f}",
        "tab\t",
    ] {
        let bad = token(sub, exp);
        let (resp, body) = common::http_exchange(
            gw.addr,
            &upgrade("/", format!("Authorization: Bearer {bad}\r\n").as_bytes()),
        )
        .await;
        assert_eq!(resp.status, 401, "{sub:?}: {body}");
        assert_eq!(body, "token claim has control characters\n", "{sub:?}");
    }
    assert_eq!(
        common::metric_total(&gw, "ringway_policy_refusals_total", "reason=\"auth\"").await,
        5
    );
    // The backend heard of none of them: the next open is the good client's.
    let _ok = raw_upgrade(
        &gw,
        "/",
        &format!("Authorization: Bearer {}\r\n", token("alice", exp)),
    )
    .await;
    let open = next_open(&mut link).await;
    assert_eq!(
        open.headers,
        [("x-claim-sub".to_string(), "alice".to_string())]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_query_parameter_is_stripped_whatever_the_source() {
    let (gw, mut link) = gateway_with_fake_backend(&jwt_route("/*", "")).await;
    let t = token("alice", now_s() + 3600);
    // Bearer header: the stray ?token=SECRET is not passed on, the rest is.
    let _a = raw_upgrade(
        &gw,
        "/q?token=SECRET&a=1&%74oken=SECRET2",
        &format!("Authorization: Bearer {t}\r\n"),
    )
    .await;
    let open = next_open(&mut link).await;
    assert_eq!(open.query.as_deref(), Some("a=1"));
    // Subprotocol: same.
    let _b = raw_upgrade(
        &gw,
        "/q?a=2&token=SECRET",
        &format!("Sec-WebSocket-Protocol: access_token.{t}, chat\r\n"),
    )
    .await;
    let open = next_open(&mut link).await;
    assert_eq!(open.query.as_deref(), Some("a=2"));
    // Query: the token itself is stripped, nothing is left.
    let _c = raw_upgrade(&gw, &format!("/q?token={t}"), "").await;
    let open = next_open(&mut link).await;
    assert_eq!(open.query, None);
    let frames = format!("{:?}", open);
    assert!(!frames.contains("SECRET"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_is_closed_1008_when_its_token_expires() {
    let config = format!(
        "{}\n{}",
        jwt_route("/strict", ""),
        jwt_route("/lax", "close_at_token_expiry = false")
    );
    let gw = Gateway::with_config(&config, &["--admin", "127.0.0.1:0"]);
    let base = format!("ws://{}", gw.addr);
    let exp = now_s() + 2;
    let short = token("short", exp);
    let started = Instant::now();
    let mut strict = connect_bearer(&format!("{base}/strict"), &short).await;
    let mut lax = connect_bearer(&format!("{base}/lax"), &short).await;
    let long = token("long", now_s() + 3600);
    let mut other = connect_bearer(&format!("{base}/strict"), &long).await;

    // The strict connection is closed 1008 "token expired" at exp (1-2 s from now).
    let close = match timeout(Duration::from_secs(4), strict.next())
        .await
        .expect("no close within 4 s of the token's expiry")
    {
        Some(Ok(Message::Close(Some(f)))) => f,
        other => panic!("expected a close frame first, got {other:?}"),
    };
    let elapsed = started.elapsed();
    assert_eq!(close.code, CloseCode::Policy);
    assert_eq!(&*close.reason, "token expired");
    let exp_at = UNIX_EPOCH + Duration::from_secs(exp);
    let late = SystemTime::now()
        .duration_since(exp_at)
        .unwrap_or(Duration::ZERO);
    assert!(
        late < Duration::from_millis(1000),
        "closed {late:?} after exp ({elapsed:?} after connecting)"
    );
    assert!(
        SystemTime::now() >= exp_at,
        "closed before exp ({elapsed:?} after connecting)"
    );
    assert_eq!(
        common::metric_total(
            &gw,
            "ringway_policy_refusals_total",
            "reason=\"token_expired\""
        )
        .await,
        1
    );

    // Past exp (+1 s): the lax route's connection and the long-token one still echo.
    while SystemTime::now() < exp_at + Duration::from_secs(1) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for ws in [&mut lax, &mut other] {
        ws.send(Message::text("after exp")).await.unwrap();
        let reply = timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(reply, Message::text("after exp"));
    }
    // A new client is admitted as usual.
    echo_with_token(&format!("{base}/strict"), &long).await;
    // The expired token itself is refused at a new handshake.
    let (resp, body) = common::http_exchange(
        gw.addr,
        &upgrade(
            "/strict",
            format!("Authorization: Bearer {short}\r\n").as_bytes(),
        ),
    )
    .await;
    assert_eq!((resp.status, body.as_str()), (401, "token expired\n"));
}
