//! Issue 11, path normalisation and the 426: hostile spellings of a protected path against
//! the real binary, each with its exact answer, and ordinary clients still served.

mod common;
mod common_relay;

use std::time::Duration;

use common::{Gateway, WAIT};
use common_relay::{fake_listener, FakeLink, T_OPEN};
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "a-test-secret-that-is-at-least-32-bytes-long";

/// An exact `/admin` behind a JWT, beside `/api/*` and `/*` that need none (issue 11: each
/// spelling below once reached `/*` or `/api/*` and skipped the JWT).
const ADMIN_CONFIG: &str = "[[routes]]\npath = \"/admin\"\n[routes.jwt]\nalgorithm = \"HS256\"\n\
    secret = \"a-test-secret-that-is-at-least-32-bytes-long\"\n\
    [[routes]]\npath = \"/api/*\"\n[[routes]]\npath = \"/*\"\n";

fn upgrade(target: &str, extra: &str) -> String {
    format!(
        "GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n",
        common::SAMPLE_KEY
    )
}

/// Send `request` and read the response head (and its body unless it is a 101).
async fn answer(gw: &Gateway, request: &str) -> (common::HttpResponse, String) {
    let mut s = timeout(WAIT, TcpStream::connect(gw.addr))
        .await
        .expect("connect timed out")
        .expect("connect");
    s.write_all(request.as_bytes()).await.unwrap();
    let (resp, body) = common::read_http_response(&mut s).await;
    (resp, String::from_utf8_lossy(&body).into_owned())
}

async fn echo_works(url: &str) {
    let (mut ws, _) = timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("connect timed out")
        .expect("connect");
    ws.send(Message::text("still served")).await.unwrap();
    let reply = timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(reply, Message::text("still served"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_spelling_of_an_exact_jwt_route_gets_past_its_token_check() {
    let gw = Gateway::with_config(ADMIN_CONFIG, &[]);
    // (spelling, its exact answer): 401 means routed to /admin and its JWT asked for, 400
    // means no safe normal form (with the reason).
    let cases = [
        ("/admin", 401, ""),
        ("/admin/", 401, ""),
        ("//admin", 401, ""),
        ("/%61dmin", 401, ""),
        ("/admin/.", 401, ""),
        ("/api/../admin", 401, ""),
        ("/api/%2e%2e/admin", 401, ""),
        ("/api//%2E%2e//admin/", 401, ""),
        ("/admin?x=1", 401, ""),
        (
            "/admin%2f",
            400,
            "invalid request path: percent-encoded `/` not accepted",
        ),
        (
            "/admin;x",
            400,
            "invalid request path: `;` path parameters not accepted",
        ),
        (
            "/admin%3Fx=1",
            400,
            "invalid request path: percent-encoded `?` not accepted",
        ),
        (
            "/admin%5c",
            400,
            "invalid request path: percent-encoded `\\` not accepted",
        ),
        ("/admin\\", 400, "invalid request path: `\\` not accepted"),
        ("/admin%00", 400, "invalid request path: control character"),
        (
            "/adm%zzin",
            400,
            "invalid request path: `%` not followed by two hex digits",
        ),
        (
            "/%2561dmin",
            400,
            "invalid request path: percent-encoded `%` not accepted",
        ),
    ];
    for (target, status, reason) in cases {
        let (resp, body) = answer(&gw, &upgrade(target, "")).await;
        assert_eq!(resp.status, status, "{target}: {body}");
        if status == 401 {
            assert_eq!(resp.header("www-authenticate"), Some("Bearer"), "{target}");
        } else {
            assert_eq!(body.trim_end(), reason, "{target}");
        }
    }
    // Routed, not merely refused: with a valid token a normalised spelling is served by
    // /admin, and what is not /admin still reaches the open routes.
    let token = common::hs256_token(
        SECRET,
        &serde_json::json!({"sub": "ops", "exp": common::unix_now() + 3600}),
    );
    let (resp, _) = answer(
        &gw,
        &upgrade(
            "/api/../admin/",
            &format!("Authorization: Bearer {token}\r\n"),
        ),
    )
    .await;
    assert_eq!(resp.status, 101);
    echo_works(&format!("ws://{}/", gw.addr)).await;
    echo_works(&format!("ws://{}/api/x", gw.addr)).await;
    echo_works(&format!("ws://{}/admins", gw.addr)).await;
    assert!(!gw.log().contains("panicked"), "{}", gw.log());
}

// RFC 6455 §4.2.2 step 4 / §4.4, README's table: a 426 names the version we speak.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_other_than_websocket_gets_426_with_version_13() {
    let gw = Gateway::start(&[]);
    for request in [
        // h2c and no Sec-WebSocket-Version at all (issue 11).
        "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade, HTTP2-Settings\r\n\
         Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
            .to_string(),
        // No Upgrade header.
        format!(
            "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\n\r\n",
            common::SAMPLE_KEY
        ),
    ] {
        let (resp, body) = common::http_exchange(gw.addr, request.as_bytes()).await;
        assert_eq!(resp.status, 426, "{body}");
        assert_eq!(resp.header("sec-websocket-version"), Some("13"));
        assert_eq!(resp.header("upgrade"), Some("websocket"));
        assert_eq!(body.trim_end(), "Upgrade: websocket required");
    }
    echo_works(&format!("ws://{}/", gw.addr)).await;
}

/// The `open` frame's path and query: `conn u64, u8 flags, string path, opt string query`.
fn open_path_and_query(body: &[u8]) -> (String, Option<String>) {
    let len = usize::from(u16::from_be_bytes([body[9], body[10]]));
    let path = String::from_utf8(body[11..11 + len].to_vec()).unwrap();
    let rest = &body[11 + len..];
    let query = (rest[0] == 1).then(|| {
        let n = usize::from(u16::from_be_bytes([rest[1], rest[2]]));
        String::from_utf8(rest[3..3 + n].to_vec()).unwrap()
    });
    (path, query)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_sees_the_normalised_path_and_the_query_as_sent() {
    let (listener, addr) = fake_listener();
    let gw = Gateway::start(&["--upstream", &format!("tcp://{addr}")]);
    let mut link = FakeLink::accept(&listener, WAIT).expect("a link");
    link.handshake();
    common_relay::wait_log(&gw, "backend link up", 1, WAIT).await;

    // A path without a safe normal form never reaches the backend.
    let (resp, _) = answer(&gw, &upgrade("/chat%2F..%2Fadmin", "")).await;
    assert_eq!(resp.status, 400);

    let target = "/chat//room/./x/../%79?q=a%2F..//b&r=%2e%2e";
    let _ws = common::RawWs::connect_path(gw.addr, target, &[]).await;
    let link = tokio::task::spawn_blocking(move || {
        let open = link
            .read_non_ping(Duration::from_secs(5))
            .expect("an open frame");
        (link, open)
    });
    let (_link, open) = timeout(WAIT, link).await.unwrap().unwrap();
    assert_eq!(
        open.ty, T_OPEN,
        "the refused request sent nothing first: {open:?}"
    );
    let (path, query) = open_path_and_query(&open.body);
    assert_eq!(path, "/chat/room/y");
    assert_eq!(query.as_deref(), Some("q=a%2F..//b&r=%2e%2e"));
    assert!(!gw.log().contains("panicked"), "{}", gw.log());
}
