//! wss:// with a real browser: headless Chromium (Debian's, driven by playwright-core from
//! tests/peers/) opens a WebSocket to the TLS listener with its own TLS stack, negotiates
//! permessage-deflate over it, and echoes text and binary from 0 B to 1 MiB byte for byte.
//! The gateway must count the handshake as done (no TLS failure of any reason) and the
//! compression of every echo over compression_min_bytes.

mod common;
mod common_peers;
mod common_tls;

use std::time::Duration;

use common::Gateway;
use common_peers::node_peer;
use common_tls::{s, Ca, Dir};

#[tokio::test(flavor = "multi_thread")]
async fn chromium_echoes_over_wss_with_deflate() {
    let ca = Ca::new("ringway browser test CA");
    let dir = Dir::new("tls-browser");
    let (cert, key) = dir.write("server", &ca.leaf(&["localhost", "127.0.0.1"]));
    let gw = Gateway::start(&[
        "--listen-tls",
        "127.0.0.1:0",
        "--tls-cert",
        s(&cert),
        "--tls-key",
        s(&key),
        "--compression",
        "shared",
        "--max-message",
        "2097152",
    ]);
    let url = format!("wss://{}/", gw.wss_addr());
    assert!(
        url.starts_with("wss://127.0.0.1:") && url.ends_with('/'),
        "{url}"
    );
    let target = url.clone();
    let peer = tokio::task::spawn_blocking(move || {
        node_peer("chromium-echo.js", &target, Duration::from_secs(90))
    })
    .await
    .unwrap();
    assert_eq!(peer["url"], url.as_str(), "{peer}");
    assert_eq!(
        peer["negotiated"],
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
        "{peer}"
    );
    let messages = peer["messages"].as_u64().unwrap();
    let big = peer["big"].as_u64().unwrap();
    assert!(messages >= 20 && big > 0, "{peer}");
    let text = gw.metrics().await;
    assert!(
        text.contains("reason=\"eof_during_handshake\"}"),
        "no TLS failure counters in /metrics:\n{text}"
    );
    let failures = gw.metric("ringway_tls_handshake_failures_total", "").await;
    assert_eq!(
        failures, 0,
        "TLS failures counted for a browser that echoed everything"
    );
    let compressed = gw
        .metric("ringway_deflate_messages_total", "result=\"compressed\"")
        .await;
    assert_eq!(compressed, big, "{peer}");
}
