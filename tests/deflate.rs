//! permessage-deflate (RFC 7692) end to end: what `--compression shared` negotiates, that
//! big replies go compressed and small ones plain, that hostile compressed input closes with
//! the right code, and that a decompression bomb costs bounded memory.

mod common;
mod common_deflate;

use std::process::Command;

use common::{
    frame_bytes, masked_frame, rss_bytes, Gateway, RawWs, OP_BINARY, OP_CONT, OP_PING, OP_TEXT,
};
use common_deflate::{
    bomb, bomb_in_fragments_closes_1009, bomb_whole_closes_1009, deflate, inflate, KEY,
};

const OFFER: &str = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n";
const ANSWER: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

fn json(n: usize) -> Vec<u8> {
    let mut s = String::new();
    let mut i = 0;
    while s.len() < n {
        s.push_str(&format!(
            "{{\"id\":{i},\"user\":\"name{i}\",\"online\":true}},"
        ));
        i += 1;
    }
    s.truncate(n);
    s.into_bytes()
}

#[tokio::test]
async fn shared_mode_negotiates_and_compresses_big_replies_only() {
    let gw = Gateway::start(&["--upstream", "echo", "--compression", "shared"]);
    let (mut ws, resp) = RawWs::connect_headers(gw.addr, "/", OFFER).await;
    assert_eq!(resp.header("sec-websocket-extensions"), Some(ANSWER));
    let big = json(10_000);

    // A compressed text message in: echoed compressed (RSV1), and much smaller.
    ws.send(&frame_bytes(true, 4, OP_TEXT, Some(KEY), &deflate(&big)))
        .await;
    let f = ws.read_frame().await;
    assert_eq!((f.opcode, f.rsv), (OP_TEXT, 4));
    assert!(f.payload.len() < big.len() / 3, "{}", f.payload.len());
    assert_eq!(inflate(&f.payload), big);

    // Under compression_min_bytes (256): sent plain.
    ws.send(&frame_bytes(
        true,
        4,
        OP_TEXT,
        Some(KEY),
        &deflate(b"hello"),
    ))
    .await;
    let f = ws.read_frame().await;
    assert_eq!((f.rsv, &f.payload[..]), (0, &b"hello"[..]));

    // A plain message in is fine too; its big echo goes compressed.
    ws.send(&masked_frame(true, OP_BINARY, &big)).await;
    let f = ws.read_frame().await;
    assert_eq!((f.opcode, f.rsv), (OP_BINARY, 4));
    assert_eq!(inflate(&f.payload), big);

    // A compressed message in three frames: RSV1 on the first only (§6.1).
    let z = deflate(&big);
    let (a, rest) = z.split_at(z.len() / 3);
    let (b, c) = rest.split_at(rest.len() / 2);
    let mut wire = frame_bytes(false, 4, OP_TEXT, Some(KEY), a);
    wire.extend(frame_bytes(false, 0, OP_CONT, Some(KEY), b));
    wire.extend(frame_bytes(true, 0, OP_CONT, Some(KEY), c));
    ws.send(&wire).await;
    let f = ws.read_frame().await;
    assert_eq!(inflate(&f.payload), big);
}

#[tokio::test]
async fn off_declines_every_offer() {
    let gw = Gateway::start(&["--upstream", "echo"]);
    let (mut ws, resp) = RawWs::connect_headers(gw.addr, "/", OFFER).await;
    assert_eq!(resp.header("sec-websocket-extensions"), None);
    // Without the extension RSV1 is a protocol error, as before.
    ws.send(&frame_bytes(true, 4, OP_TEXT, Some(KEY), &deflate(b"hi")))
        .await;
    ws.expect_close(1002).await;
}

#[tokio::test]
async fn hostile_compressed_input_closes_with_the_right_code() {
    let gw = Gateway::start(&["--upstream", "echo", "--compression", "shared"]);
    let cases: Vec<(Vec<u8>, u16)> = vec![
        // RSV1 on a continuation frame (§6.1).
        (
            [
                frame_bytes(false, 0, OP_TEXT, Some(KEY), b"a"),
                frame_bytes(true, 4, OP_CONT, Some(KEY), b"b"),
            ]
            .concat(),
            1002,
        ),
        // RSV1 on a control frame.
        (frame_bytes(true, 4, OP_PING, Some(KEY), b""), 1002),
        // Not a deflate stream.
        (
            frame_bytes(true, 4, OP_BINARY, Some(KEY), &[0xff; 16]),
            1007,
        ),
        // Inflates to bytes that are not UTF-8, in a text message.
        (
            frame_bytes(true, 4, OP_TEXT, Some(KEY), &deflate(&[b'a', 0xff, 0xfe])),
            1007,
        ),
    ];
    for (wire, code) in cases {
        let (mut ws, _) = RawWs::connect_headers(gw.addr, "/", OFFER).await;
        ws.send(&wire).await;
        ws.expect_close(code).await;
    }
    let failures = "ringway_inflate_failures_total";
    for (reason, n) in [("corrupt", 1), ("invalid_utf8", 1), ("too_large", 0)] {
        let got = common::metric_sum(&gw, failures, &format!("reason=\"{reason}\"")).await;
        assert_eq!(got, n, "{reason}");
    }
}

#[tokio::test]
async fn a_decompression_bomb_closes_1009_with_bounded_memory() {
    let bomb = bomb();
    let gw = Gateway::start(&["--upstream", "echo", "--compression", "shared"]);
    // Warm up (the core's zlib state is made on first use).
    let (mut ws, _) = RawWs::connect_headers(gw.addr, "/", OFFER).await;
    ws.send(&frame_bytes(
        true,
        4,
        OP_TEXT,
        Some(KEY),
        &deflate(&json(1000)),
    ))
    .await;
    ws.read_frame().await;
    let before = rss_bytes(gw.pid());
    for _ in 0..3 {
        let (mut ws, _) = RawWs::connect_headers(gw.addr, "/", OFFER).await;
        bomb_whole_closes_1009(&mut ws, &bomb).await;
        let (mut ws, _) = RawWs::connect_headers(gw.addr, "/", OFFER).await;
        bomb_in_fragments_closes_1009(&mut ws, &bomb).await;
    }
    let after = rss_bytes(gw.pid());
    let growth = after.saturating_sub(before);
    assert!(growth < 32 << 20, "RSS grew {growth} bytes");
}

/// Python `websockets` (its permessage-deflate client) against the gateway, both
/// directions, big and small messages.
#[test]
fn python_websockets_negotiates_deflate_and_echoes() {
    let gw = Gateway::start(&[
        "--upstream",
        "echo",
        "--compression",
        "shared",
        "--max-message",
        "1048576",
    ]);
    let py = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv-py3/bin/python");
    let script = r#"
import asyncio, sys, websockets
async def main(url):
    async with websockets.connect(url, compression="deflate", max_size=2**20, open_timeout=10) as ws:
        ext = ws.response.headers.get("Sec-WebSocket-Extensions")
        assert ext.startswith("permessage-deflate"), ext
        for n in [1, 100, 255, 256, 300, 4096, 65536, 500000]:
            text = ('{"k":"value %d"},' * (n // 14 + 1))[:n]
            await ws.send(text)
            assert await asyncio.wait_for(ws.recv(), 10) == text, n
            data = text.encode()
            await ws.send(data)
            assert await asyncio.wait_for(ws.recv(), 10) == data, n
    print("ok", ext)
asyncio.run(main(sys.argv[1]))
"#;
    let out = Command::new(py)
        .args(["-c", script, &gw.url()])
        .output()
        .expect("run .venv-py3/bin/python (scripts/setup-test-deps.sh installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.starts_with("ok permessage-deflate"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Subprotocols per route: the server's preference among the client's offers is named in
/// the 101; `require_subprotocol` refuses a client offering none of them with 400.
#[tokio::test]
async fn route_subprotocols_are_selected_in_the_101_or_required() {
    let gw = Gateway::with_config(
        r#"
[[routes]]
path = "/gql"
subprotocols = ["graphql-transport-ws", "mqtt"]

[[routes]]
path = "/strict"
subprotocols = ["mqtt"]
require_subprotocol = true
compression = "shared"
"#,
        &["--upstream", "echo"],
    );
    let offer = "Sec-WebSocket-Protocol: mqtt, graphql-transport-ws\r\n";
    let (mut ws, resp) = RawWs::connect_headers(gw.addr, "/gql", offer).await;
    assert_eq!(
        resp.header("sec-websocket-protocol"),
        Some("graphql-transport-ws")
    );
    // This route leaves compression at the top-level default (off).
    assert_eq!(resp.header("sec-websocket-extensions"), None);
    ws.send(&masked_frame(true, OP_TEXT, b"ping")).await;
    assert_eq!(ws.read_frame().await.payload, b"ping");

    let (_, resp) = RawWs::connect_headers(gw.addr, "/gql", "").await;
    assert_eq!(resp.header("sec-websocket-protocol"), None);

    let both = format!("Sec-WebSocket-Protocol: mqtt\r\n{OFFER}");
    let (_, resp) = RawWs::connect_headers(gw.addr, "/strict", &both).await;
    assert_eq!(resp.header("sec-websocket-protocol"), Some("mqtt"));
    assert_eq!(resp.header("sec-websocket-extensions"), Some(ANSWER));

    let request = common::upgrade_request(gw.addr).replacen("GET /chat ", "GET /strict ", 1);
    let (resp, body) = common::http_exchange(gw.addr, request.as_bytes()).await;
    assert_eq!(resp.status, 400);
    assert!(body.contains("subprotocols"), "{body}");
}

/// A topic publish goes compressed to the subscribers that negotiated deflate and plain to
/// the others, the same message either way.
#[tokio::test]
async fn fanout_goes_compressed_to_deflate_subscribers_and_plain_to_others() {
    let gw = Gateway::start(&["--compression", "shared", "--workers", "1"]);
    let join = masked_frame(true, OP_TEXT, br#"{"action":"join","room":"lobby"}"#);
    let (mut z1, _) = RawWs::connect_headers(gw.addr, "/", OFFER).await;
    let (mut z2, _) = RawWs::connect_headers(gw.addr, "/", OFFER).await;
    let (mut plain, resp) = RawWs::connect_headers(gw.addr, "/", "").await;
    assert_eq!(resp.header("sec-websocket-extensions"), None);
    for ws in [&mut z1, &mut z2, &mut plain] {
        ws.send(&join).await;
        let joined = ws.read_frame().await;
        assert_eq!(joined.rsv, 0, "a small reply goes plain");
    }
    let text = "x".repeat(2000);
    let say = format!(r#"{{"action":"say","room":"lobby","text":"{text}"}}"#);
    plain
        .send(&masked_frame(true, OP_TEXT, say.as_bytes()))
        .await;
    let p = plain.read_frame().await;
    assert_eq!(p.rsv, 0);
    assert!(String::from_utf8_lossy(&p.payload).contains(&text));
    for ws in [&mut z1, &mut z2] {
        let f = ws.read_frame().await;
        assert_eq!((f.opcode, f.rsv), (OP_TEXT, 4));
        assert_eq!(inflate(&f.payload), p.payload);
    }
    // One compression for both subscribers on the one core; the two `joined` replies went
    // plain for their size.
    let messages = "ringway_deflate_messages_total";
    for (result, n) in [("compressed", 1), ("skipped", 2)] {
        let got = common::metric_sum(&gw, messages, &format!("result=\"{result}\"")).await;
        assert_eq!(got, n, "{result}");
    }
    let out_raw = "direction=\"out\",form=\"raw\"";
    let raw = common::metric_sum(&gw, "ringway_deflate_bytes_total", out_raw).await;
    assert_eq!(raw, p.payload.len() as u64);
}
