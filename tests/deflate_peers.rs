//! permessage-deflate against independent peers: Node `ws`, a real headless Chromium (through
//! playwright-core, tests/peers/) and Python `websockets` negotiate deflate with the real
//! binary on `--compression shared` and echo text and binary from 0 B to 1 MiB, byte for
//! byte, in both directions. Each test also checks what the gateway counted in /metrics:
//! every echo at or over compression_min_bytes (256) went out compressed, smaller ones plain,
//! and the peer's compressed messages were inflated.
//!
//! The JS peers need `scripts/setup-test-deps.sh` (nodejs, chromium, `npm ci` in tests/peers).

mod common;
mod common_peers;

use std::process::Command;
use std::time::Duration;

use common::Gateway;
use common_peers::{node_peer, peers_dir, run_peer};
use serde_json::Value;

/// What `shared` answers to every offer (RFC 7692 §7.1.1.1, §7.1.1.2).
const ANSWER: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// Up to 1 MiB messages; an incompressible 1 MiB message deflates to slightly more than
/// 1 MiB, so the frame limit needs some room above it.
const MAX_MESSAGE: &str = "2097152";

fn gateway() -> Gateway {
    Gateway::start(&[
        "--upstream",
        "echo",
        "--compression",
        "shared",
        "--max-message",
        MAX_MESSAGE,
    ])
}

/// What the gateway counted for one peer's run of echoes.
#[derive(Debug, PartialEq)]
struct Counted {
    compressed: u64,
    skipped: u64,
    inflated: u64,
    /// Payload bytes of the compressed replies, before compression.
    out_raw: u64,
    /// Payload bytes of the inflated messages, after inflating.
    in_raw: u64,
}

async fn counted(gw: &Gateway) -> Counted {
    let messages = "ringway_deflate_messages_total";
    let bytes = "ringway_deflate_bytes_total";
    Counted {
        compressed: gw.metric(messages, "result=\"compressed\"").await,
        skipped: gw.metric(messages, "result=\"skipped\"").await,
        inflated: gw.metric(messages, "result=\"inflated\"").await,
        out_raw: gw.metric(bytes, "direction=\"out\",form=\"raw\"").await,
        in_raw: gw.metric(bytes, "direction=\"in\",form=\"raw\"").await,
    }
}

fn n(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("no {key} in {v}"))
}

/// Every echo at or over 256 B went out compressed and every smaller one plain; the byte
/// counter saw exactly the payloads of the compressed ones.
fn assert_send_side(c: &Counted, peer: &Value, big_bytes: u64) {
    assert_eq!(c.compressed, n(peer, "big"), "{c:?} {peer}");
    assert_eq!(
        c.skipped,
        n(peer, "messages") - n(peer, "big"),
        "{c:?} {peer}"
    );
    assert_eq!(c.out_raw, big_bytes, "{c:?} {peer}");
}

/// Sum of the sizes (in `harness.SIZES` and the UTF-8 case) at or over 256 B, for the byte
/// counter: each size is echoed twice (text and binary).
fn big_bytes(peer: &Value) -> u64 {
    peer["bytes_big"]
        .as_u64()
        .unwrap_or_else(|| panic!("{peer}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn node_ws_negotiates_deflate_and_echoes_0_b_to_1_mib() {
    let gw = gateway();
    let url = gw.url();
    let peer = tokio::task::spawn_blocking(move || {
        node_peer("node-ws-echo.js", &url, Duration::from_secs(60))
    })
    .await
    .unwrap();
    // The header the client saw, and what `ws` made of it.
    assert_eq!(peer["extension"], ANSWER, "{peer}");
    assert_eq!(peer["negotiated"], "permessage-deflate", "{peer}");
    let c = counted(&gw).await;
    assert_send_side(&c, &peer, big_bytes(&peer));
    // `ws` with threshold 0 compresses every message, the empty one included.
    assert_eq!(c.inflated, n(&peer, "messages"), "{c:?} {peer}");
    assert_eq!(c.in_raw, n(&peer, "bytes"), "{c:?} {peer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn chromium_negotiates_deflate_and_echoes_0_b_to_1_mib() {
    let gw = gateway();
    let url = gw.url();
    let peer = tokio::task::spawn_blocking(move || {
        node_peer("chromium-echo.js", &url, Duration::from_secs(90))
    })
    .await
    .unwrap();
    // `WebSocket.extensions` is the server's answer as the browser accepted it.
    assert_eq!(peer["negotiated"], ANSWER, "{peer}");
    let c = counted(&gw).await;
    assert_send_side(&c, &peer, big_bytes(&peer));
    // Chromium compresses what it sends: every message arrived compressed and was inflated.
    assert_eq!(c.inflated, n(&peer, "messages"), "{c:?} {peer}");
    assert_eq!(c.in_raw, n(&peer, "bytes"), "{c:?} {peer}");
}

/// Python `websockets` over the same sizes as the JS peers (tests/deflate.rs has a shorter
/// run without the counters).
#[tokio::test(flavor = "multi_thread")]
async fn python_websockets_echoes_0_b_to_1_mib_and_is_counted() {
    let gw = gateway();
    let py = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv-py3/bin/python");
    let script = r#"
import asyncio, json, random, sys, websockets
SIZES = [0, 1, 100, 255, 256, 257, 1000, 4096, 65536, 300000, 1 << 20]
def text(n):
    s, i = "", n
    while len(s) < n:
        s += '{"id":%d,"user":"name%d","online":%s},' % (i, i % 97, str(i % 3 == 0).lower())
        i += 1
    return s[:n]
async def main(url):
    async with websockets.connect(url, compression="deflate", max_size=4 << 20,
                                  open_timeout=10) as ws:
        ext = ws.response.headers.get("Sec-WebSocket-Extensions")
        cases = []
        for n in SIZES:
            cases.append(text(n))
            cases.append(random.Random(n).randbytes(n))
        cases.append("ünïcødé €𝄞 " * 400)
        total = big = bytes_big = 0
        for c in cases:
            await ws.send(c)
            got = await asyncio.wait_for(ws.recv(), 20)
            assert type(got) is type(c) and got == c, (type(c), len(c))
            n = len(c.encode() if isinstance(c, str) else c)
            total += n
            if n >= 256:
                big += 1
                bytes_big += n
    print(json.dumps({"ok": True, "extension": ext, "messages": len(cases), "big": big,
                      "bytes": total, "bytes_big": bytes_big}))
asyncio.run(asyncio.wait_for(main(sys.argv[1]), 60))
"#;
    let mut cmd = Command::new(py);
    cmd.args(["-c", script, &gw.url()]);
    let peer = tokio::task::spawn_blocking(move || run_peer(cmd, Duration::from_secs(70)))
        .await
        .unwrap();
    assert!(
        peer["extension"]
            .as_str()
            .is_some_and(|e| e.starts_with(ANSWER)),
        "{peer}"
    );
    let c = counted(&gw).await;
    assert_send_side(&c, &peer, big_bytes(&peer));
    // websockets compresses every message it sends.
    assert_eq!(c.inflated, n(&peer, "messages"), "{c:?} {peer}");
    assert_eq!(c.in_raw, n(&peer, "bytes"), "{c:?} {peer}");
}

/// A room of 1,000 deflate subscribers spread over two cores: each publish is compressed
/// once per core (not per subscriber), every subscriber gets it compressed, and a compressed
/// frame inflates to the same message the plain publisher got (tests/peers/fanout.js).
#[tokio::test(flavor = "multi_thread")]
async fn a_publish_to_1000_deflate_subscribers_is_compressed_once_per_core() {
    let gw = Gateway::start(&["--compression", "shared", "--workers", "2"]);
    let (addr, admin, pid) = (gw.addr.to_string(), gw.admin_addr().to_string(), gw.pid());
    let publishes = 5u64;
    let subscribers = 1000u64;
    let peer = tokio::task::spawn_blocking(move || {
        let dir = peers_dir();
        let mut cmd = Command::new("node");
        cmd.current_dir(&dir).args([
            "fanout.js",
            &addr,
            &admin,
            &pid.to_string(),
            "--deflate",
            "1",
            "--connections",
            &subscribers.to_string(),
            "--publishes",
            &publishes.to_string(),
        ]);
        run_peer(cmd, Duration::from_secs(90))
    })
    .await
    .unwrap();
    assert_eq!(peer["extensions"], serde_json::json!([ANSWER]), "{peer}");
    assert_eq!(
        n(&peer, "compressed_frames"),
        subscribers * publishes,
        "{peer}"
    );
    let by_core = peer["compress_calls_per_publish_by_core"]
        .as_object()
        .unwrap_or_else(|| panic!("{peer}"));
    assert_eq!(by_core.len(), 2, "{peer}");
    for (core, calls) in by_core {
        assert_eq!(calls.as_f64(), Some(1.0), "core {core}: {peer}");
    }
    // JSON-like text compresses several times over on the wire.
    let per_subscriber = peer["wire_bytes_per_subscriber"].as_f64().unwrap();
    assert!(
        per_subscriber * 3.0 < n(&peer, "payload_bytes") as f64,
        "{peer}"
    );
}
