//! The demo page in a real browser: a plain `ringway` (embedded upstream, no routes) serves
//! its chat page at `GET /`; two headless Chromium pages (Debian's, driven by playwright-core
//! from tests/peers/) join one room through it and each sees both pages' lines. The
//! screenshot is kept under target/ and its path printed, for CI to keep as an artifact.

mod common;
mod common_peers;
mod common_tls;

use std::path::Path;
use std::time::Duration;

use common::{http_exchange, Gateway};
use common_peers::node_peer_with;
use common_tls::{s, Ca, Dir};

/// Both pages' logs hold every line either sent.
fn every_line_in_every_log(peer: &serde_json::Value) {
    let lines = peer["lines"].as_array().unwrap();
    for (i, log) in peer["logs"].as_array().unwrap().iter().enumerate() {
        let log: Vec<&str> = log
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l.as_str().unwrap())
            .collect();
        for line in lines {
            let line = line.as_str().unwrap();
            assert!(
                log.iter().any(|l| l.ends_with(line)),
                "page {i} lacks {line:?}: {log:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_browsers_chat_in_one_room_through_the_demo_page() {
    let gw = Gateway::start(&[]);
    let url = format!("http://{}/", gw.addr);
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("demo-page.png");
    let _ = std::fs::remove_file(&shot);
    let args = [url.clone(), shot.display().to_string()];
    let peer = tokio::task::spawn_blocking(move || {
        node_peer_with("demo-chat.js", &args, Duration::from_secs(60))
    })
    .await
    .unwrap();
    every_line_in_every_log(&peer);
    assert_eq!(peer["title"], "ringway demo chat");
    let png = std::fs::read(&shot).expect("the screenshot was written");
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
        "a real PNG"
    );
    println!("demo page screenshot: {}", shot.display());
    // The gateway counted two page views as such: no refused handshake, four WebSockets
    // (two pages; the page reconnects only when dropped) with their chat messages.
    let log = gw.log_with("demo page served", 2).await;
    assert_eq!(log.matches("demo page served").count(), 2, "{log}");
    assert_eq!(
        gw.metric("ringway_handshakes_total", "result=\"rejected\"")
            .await,
        0
    );
    assert_eq!(gw.metric("ringway_route_connections_total", "").await, 2);
}

/// Served over https:// (the TLS listener), the page connects back over wss://.
#[tokio::test(flavor = "multi_thread")]
async fn the_page_served_over_tls_chats_over_wss() {
    let ca = Ca::new("ringway demo page test CA");
    let dir = Dir::new("demo-tls");
    let (cert, key) = dir.write("server", &ca.leaf(&["localhost", "127.0.0.1"]));
    let gw = Gateway::start(&[
        "--listen-tls",
        "127.0.0.1:0",
        "--tls-cert",
        s(&cert),
        "--tls-key",
        s(&key),
    ]);
    let args = [format!("https://{}/", gw.wss_addr())];
    let peer = tokio::task::spawn_blocking(move || {
        node_peer_with("demo-chat.js", &args, Duration::from_secs(60))
    })
    .await
    .unwrap();
    every_line_in_every_log(&peer);
    // The browser is gone: two page views and the two WebSockets they opened, all four
    // over TLS (access log), none refused.
    let log = gw.log_with("tls=true", 4).await;
    let access: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("ringway::access"))
        .collect();
    assert_eq!(access.len(), 4, "{log}");
    assert!(access.iter().all(|l| l.contains("tls=true")), "{log}");
    let closed = access.iter().filter(|l| l.contains("connection closed"));
    assert_eq!(closed.count(), 2, "{log}");
    assert_eq!(
        gw.metric("ringway_tls_handshake_failures_total", "").await,
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn routes_turn_the_demo_page_off_unless_asked_for() {
    let page = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    let gw = Gateway::with_config("[[routes]]\npath = \"/chat\"\n", &[]);
    let (resp, _) = http_exchange(gw.addr, page).await;
    assert_eq!(resp.status, 426, "routes configured: no page");
    let gw = Gateway::with_config("demo_page = true\n[[routes]]\npath = \"/*\"\n", &[]);
    let (resp, body) = http_exchange(gw.addr, page).await;
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert!(body.contains("data-testid=\"send\""), "{body}");
    let gw = Gateway::start(&["--upstream", "local-echo"]);
    let (resp, _) = http_exchange(gw.addr, page).await;
    assert_eq!(
        resp.status, 426,
        "local-echo does not speak the chat contract"
    );
}
