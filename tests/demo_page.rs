//! The demo page in a real browser: a plain `ringway` (embedded upstream, no routes) serves
//! its chat page at `GET /`; two headless Chromium pages (Debian's, driven by playwright-core
//! from tests/peers/) join one room through it and each sees both pages' lines. The
//! screenshot is kept under target/ and its path printed, for CI to keep as an artifact.

mod common;
mod common_peers;

use std::path::Path;
use std::time::Duration;

use common::{http_exchange, Gateway};
use common_peers::node_peer_with;

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
