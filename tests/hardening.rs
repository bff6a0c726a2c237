//! Hostile clients at the edge: each defence with its hostile input and the exact outcome,
//! and other clients unaffected.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{metric_sum, Gateway, WAIT};
use futures_util::{SinkExt, StreamExt};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "a-test-secret-that-is-at-least-32-bytes-long";

fn token(exp_offset: i64, secret: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let claims = serde_json::json!({"sub": "user-7", "exp": now + exp_offset, "tenant": "acme"});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn upgrade(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// The sum over cores of `ringway_policy_refusals_total{reason}`.
async fn refusals(gw: &Gateway, reason: &str) -> u64 {
    metric_sum(
        gw,
        "ringway_policy_refusals_total",
        &format!("reason=\"{reason}\""),
    )
    .await
}

async fn echo_works(url: &str) {
    let (mut ws, _) = timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .unwrap()
        .unwrap();
    ws.send(Message::text("still served")).await.unwrap();
    let reply = timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(reply, Message::text("still served"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_outside_the_allowlist_gets_403() {
    let config = "[[routes]]\npath = \"/*\"\norigins = [\"https://app.example.com\", \"https://*.example.org\"]\n";
    let gw = Gateway::with_config(config, &[]);
    let (resp, body) = common::http_exchange(
        gw.addr,
        upgrade("/", "Origin: https://evil.example.com\r\n").as_bytes(),
    )
    .await;
    assert_eq!(resp.status, 403, "{body}");
    assert!(body.contains("origin not allowed"), "{body}");
    let (resp, _) = common::http_exchange(
        gw.addr,
        upgrade("/", "Origin: https://example.org.evil.net\r\n").as_bytes(),
    )
    .await;
    assert_eq!(resp.status, 403);
    assert_eq!(
        refusals(&gw, "origin").await,
        2,
        "both refusals are counted"
    );
    // Allowed origins connect.
    let mut req = format!("ws://{}/", gw.addr).into_client_request().unwrap();
    req.headers_mut()
        .insert("Origin", "https://eu.example.org".parse().unwrap());
    let (mut ws, _) = timeout(WAIT, tokio_tungstenite::connect_async(req))
        .await
        .unwrap()
        .unwrap();
    ws.send(Message::text("hi")).await.unwrap();
    assert_eq!(
        timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap(),
        Message::text("hi")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_verified_at_the_edge() {
    let config = format!(
        "[[routes]]\npath = \"/*\"\n[routes.jwt]\nalgorithm = \"HS256\"\nsecret = \"{SECRET}\"\npass_claims = [\"tenant\"]\n"
    );
    let gw = Gateway::with_config(&config, &["--admin", "127.0.0.1:0"]);
    let cases = [
        ("no token", String::new()),
        (
            "expired",
            format!("Authorization: Bearer {}\r\n", token(-3600, SECRET)),
        ),
        (
            "wrong signature",
            format!(
                "Authorization: Bearer {}\r\n",
                token(3600, "another-secret-that-is-also-32-bytes-long!")
            ),
        ),
        ("garbage", "Authorization: Bearer not.a.jwt\r\n".to_string()),
    ];
    for (what, header) in cases {
        let (resp, body) = common::http_exchange(gw.addr, upgrade("/", &header).as_bytes()).await;
        assert_eq!(resp.status, 401, "{what}: {body}");
        assert_eq!(resp.header("www-authenticate"), Some("Bearer"), "{what}");
        assert!(!body.trim().is_empty(), "{what}: a reason is given");
    }
    assert_eq!(
        refusals(&gw, "auth").await,
        4,
        "every failed token is counted"
    );
    // A valid token, from the header, the query and a subprotocol.
    let mut req = format!("ws://{}/", gw.addr).into_client_request().unwrap();
    req.headers_mut().insert(
        "Authorization",
        format!("Bearer {}", token(3600, SECRET)).parse().unwrap(),
    );
    let (mut ws, _) = timeout(WAIT, tokio_tungstenite::connect_async(req))
        .await
        .unwrap()
        .unwrap();
    ws.send(Message::text("ok")).await.unwrap();
    assert_eq!(
        timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap(),
        Message::text("ok")
    );
    echo_works(&format!("ws://{}/?token={}", gw.addr, token(3600, SECRET))).await;
    let mut req = format!("ws://{}/", gw.addr).into_client_request().unwrap();
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        // No space after the comma: tungstenite compares its offers untrimmed.
        format!("access_token.{},chat", token(3600, SECRET))
            .parse()
            .unwrap(),
    );
    let (_ws, resp) = timeout(WAIT, tokio_tungstenite::connect_async(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        resp.headers().get("Sec-WebSocket-Protocol").unwrap(),
        "chat",
        "the companion protocol is selected"
    );
    assert!(gw.log().is_empty() || !gw.log().contains("panicked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_flood_is_closed_1008_and_others_are_unaffected() {
    let config = "[[routes]]\npath = \"/*\"\nmessages_per_sec = 20\nmessage_burst = 20\n";
    let gw = Gateway::with_config(config, &["--admin", "127.0.0.1:0"]);
    let (mut flood, _) = timeout(WAIT, tokio_tungstenite::connect_async(gw.url()))
        .await
        .unwrap()
        .unwrap();
    for i in 0..200 {
        if flood.send(Message::text(format!("{i}"))).await.is_err() {
            break;
        }
    }
    let code = loop {
        match timeout(WAIT, flood.next())
            .await
            .expect("no close for the flood")
        {
            Some(Ok(Message::Close(Some(f)))) => break f.code,
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(code, CloseCode::Policy);
    assert_eq!(
        refusals(&gw, "message_rate").await,
        1,
        "the flood is counted once"
    );
    echo_works(&gw.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_flood_from_one_ip_gets_429() {
    let config = "[ip_limits]\nconnects_per_sec = 5\nconnect_burst = 5\n";
    let gw = Gateway::with_config(config, &["--workers", "1", "--admin", "127.0.0.1:0"]);
    let mut statuses = Vec::new();
    for _ in 0..30 {
        let (resp, _) = common::http_exchange(gw.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        statuses.push(resp.status);
    }
    let limited = statuses.iter().filter(|&&s| s == 429).count();
    assert!(
        limited >= 20,
        "most of a 30-connection burst is refused with 429: {statuses:?}"
    );
    // After the bucket refills, the same IP is served again.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    echo_works(&gw.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_connections_per_ip_are_capped_with_503() {
    let config = "[ip_limits]\nmax_concurrent = 3\n";
    let gw = Gateway::with_config(config, &["--workers", "1"]);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(
            timeout(WAIT, tokio_tungstenite::connect_async(gw.url()))
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let (resp, body) = common::http_exchange(gw.addr, upgrade("/", "").as_bytes()).await;
    assert_eq!(resp.status, 503, "{body}");
    drop(held);
    tokio::time::sleep(Duration::from_millis(300)).await;
    echo_works(&gw.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_of_too_many_fragments_is_closed_1008() {
    let config = "[[routes]]\npath = \"/*\"\nmax_fragments = 4\n";
    let gw = Gateway::with_config(config, &["--admin", "127.0.0.1:0"]);
    // Four frames are within the limit and echo as one message.
    let mut ok = common::RawWs::connect(gw.addr).await;
    ok.send(&common::fragmented_text(b"abcd", 4)).await;
    let reply = ok.read_frame().await;
    assert_eq!(
        (reply.opcode, &reply.payload[..]),
        (common::OP_TEXT, &b"abcd"[..])
    );

    // A stream of empty continuation frames (no message ever completes) is cut off at the
    // fifth frame, from its header.
    let mut hostile = common::RawWs::connect(gw.addr).await;
    let mut wire = common::masked_frame(false, common::OP_BINARY, b"");
    for _ in 0..1000 {
        wire.extend(common::masked_frame(false, common::OP_CONT, b""));
    }
    hostile.send(&wire).await;
    let close = hostile.expect_close(1008).await;
    assert!(
        close.close_reason().contains("more than 4 frames"),
        "{}",
        close.close_reason()
    );
    hostile.expect_tcp_closed().await;
    assert_eq!(refusals(&gw, "fragments").await, 1);

    // The well-behaved client is still served.
    ok.send(&common::masked_frame(true, common::OP_TEXT, b"again"))
        .await;
    assert_eq!(ok.read_frame().await.payload, b"again");
    echo_works(&gw.url()).await;
}

/// Send an upgrade request on a fresh connection: the response, and the body of a refusal
/// (the TCP connection of a 101 is simply dropped).
async fn try_upgrade(addr: std::net::SocketAddr) -> (common::HttpResponse, String) {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(upgrade("/", "").as_bytes()).await.unwrap();
    let (resp, body) = common::read_http_response(&mut stream).await;
    (resp, String::from_utf8_lossy(&body).into_owned())
}

/// A client that sends most of a large message and then stalls holds its assembly buffer.
async fn hog(addr: std::net::SocketAddr, claim: usize, send: usize) -> common::RawWs {
    let mut ws = common::RawWs::connect(addr).await;
    let mask = [1, 2, 3, 4];
    let mut wire = common::frame_header(true, 0, common::OP_BINARY, Some(mask), claim as u64);
    wire.extend((0..send).map(|i| (i as u8) ^ mask[i % 4]));
    ws.send(&wire).await;
    ws
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_budget_refuses_new_connections_with_503() {
    let config = "memory_budget_bytes = 262144\nmax_message_bytes = 1048576\n\
                  max_frame_bytes = 1048576\n";
    let gw = Gateway::with_config(config, &["--workers", "1", "--admin", "127.0.0.1:0"]);
    let (mut early, _) = timeout(WAIT, tokio_tungstenite::connect_async(gw.url()))
        .await
        .unwrap()
        .unwrap();
    // Stalled 200 KB messages hold at least 150 KB of assembly buffer each: the first fits in
    // the 256 KiB budget, by the second the budget is used up and new clients get 503.
    let mut hogs = Vec::new();
    let mut status = 0;
    let mut body = String::new();
    for _ in 0..3 {
        let (resp, b) = try_upgrade(gw.addr).await;
        (status, body) = (resp.status, b);
        if status == 503 {
            assert_eq!(resp.header("retry-after"), Some("5"));
            break;
        }
        assert!(hogs.len() < 2, "{} hogs admitted", hogs.len());
        let before = metric_sum(&gw, "ringway_buffer_bytes", "").await;
        hogs.push(hog(gw.addr, 200_000, 150_000).await);
        // Wait until the core has read it and published its total (once per loop turn).
        let deadline = std::time::Instant::now() + WAIT;
        while metric_sum(&gw, "ringway_buffer_bytes", "").await < before + 150_000 {
            assert!(
                std::time::Instant::now() < deadline,
                "the hog's bytes were never counted"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    assert!(!hogs.is_empty(), "refused before any memory was held");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("memory budget"), "{body}");
    assert!(refusals(&gw, "memory").await >= 1);
    let log = gw.log_with("memory budget reached", 1).await;
    assert!(
        log.contains("memory budget reached"),
        "the refusal is logged: {log}"
    );

    // Connections admitted before are still served.
    early.send(Message::text("still here")).await.unwrap();
    let reply = timeout(WAIT, early.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(reply, Message::text("still here"));

    // Once the hogs go, their memory is released and new clients are admitted again.
    drop(hogs);
    let mut admitted = false;
    for _ in 0..100 {
        let (resp, _) = try_upgrade(gw.addr).await;
        if resp.status == 101 {
            admitted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(admitted, "memory was not released");
    echo_works(&gw.url()).await;
    let log = gw.log_with("below the memory budget again", 1).await;
    assert!(log.contains("below the memory budget again"), "{log}");
}
