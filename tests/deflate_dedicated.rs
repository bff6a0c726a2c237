//! permessage-deflate `dedicated` end to end: context takeover both ways with capped
//! windows, the contexts charged to the memory meter and counted while the connection
//! lives (and given back when it closes), the same hard inflate cap as `shared`, and the
//! per-core cap beyond which connections get `shared`.

mod common;
mod common_deflate;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{frame_bytes, rss_bytes, Gateway, RawWs, OP_BINARY, OP_TEXT};
use common_deflate::{
    bomb, bomb_in_fragments_closes_1009, bomb_whole_closes_1009, ClientCodec, KEY,
};
use ringway::protocol::deflate::takeover;

const CHROME: &str = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n";
const DEDICATED: &str = "permessage-deflate; server_max_window_bits=12; client_max_window_bits=12";
const SHARED: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

fn json(n: usize) -> Vec<u8> {
    let mut s = String::new();
    let mut i = 0;
    while s.len() < n {
        s.push_str(&format!(
            "{{\"id\":{i},\"user\":\"name{}\",\"seen\":{}}},",
            i % 13,
            i * 7919 % 10007
        ));
        i += 1;
    }
    s.truncate(n);
    s.into_bytes()
}

/// Poll a metric (summed over cores) until `ok` holds, for up to 5 s; the cores publish
/// their gauges once per loop turn.
async fn metric_until(gw: &Gateway, metric: &str, ok: impl Fn(u64) -> bool) -> u64 {
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let v = common::metric_sum(gw, metric, "").await;
        if ok(v) || Instant::now() > end {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn dedicated_takes_over_context_and_charges_the_meter() {
    let gw = Gateway::start(&[
        "--upstream",
        "echo",
        "--compression",
        "dedicated",
        "--workers",
        "1",
    ]);
    let (mut ws, resp) = RawWs::connect_headers(gw.addr, "/", CHROME).await;
    // Context takeover both ways: no *_no_context_takeover in the answer, windows capped.
    assert_eq!(resp.header("sec-websocket-extensions"), Some(DEDICATED));
    let idle = metric_until(&gw, "ringway_buffer_bytes", |_| true).await;
    assert_eq!(
        common::metric_sum(&gw, "ringway_deflate_dedicated_contexts", "").await,
        0
    );

    let mut client = ClientCodec::new(12);
    let msg = json(3000);
    let mut sizes = Vec::new();
    for _ in 0..3 {
        let z = client.deflate(&msg);
        sizes.push(z.len());
        ws.send(&frame_bytes(true, 4, OP_TEXT, Some(KEY), &z)).await;
        let f = ws.read_frame().await;
        assert_eq!((f.opcode, f.rsv), (OP_TEXT, 4));
        assert_eq!(client.inflate(&f.payload), msg);
        sizes.push(f.payload.len());
    }
    // Both compressors kept their windows: the repeats are a fraction of the first.
    assert!(
        sizes[2] * 5 < sizes[0] && sizes[3] * 5 < sizes[1],
        "{sizes:?}"
    );
    // Small messages go plain, big ones keep going compressed.
    ws.send(&frame_bytes(
        true,
        4,
        OP_TEXT,
        Some(KEY),
        &client.deflate(b"hi"),
    ))
    .await;
    let f = ws.read_frame().await;
    assert_eq!((f.rsv, &f.payload[..]), (0, &b"hi"[..]));
    let big = json(200_000)[..60_000].to_vec();
    ws.send(&frame_bytes(
        true,
        4,
        OP_BINARY,
        Some(KEY),
        &client.deflate(&big),
    ))
    .await;
    let f = ws.read_frame().await;
    assert_eq!(client.inflate(&f.payload), big);

    // The two contexts are counted and charged at their measured size.
    let contexts = metric_until(&gw, "ringway_deflate_dedicated_contexts", |v| v == 2).await;
    assert_eq!(contexts, 2);
    let charged = takeover::deflater_bytes(12) + takeover::inflater_bytes(12);
    // `idle` may still hold the handshake's transient bytes (a few hundred more or less from
    // one run to the next), so the bound is the contexts' charge itself, and at most that
    // plus the idle figure and one 16 KiB chunk of buffers.
    let charged = charged as u64;
    let busy = metric_until(&gw, "ringway_buffer_bytes", |v| v >= charged).await;
    assert!(
        busy >= charged && busy <= idle + charged + 16 * 1024,
        "idle {idle}, with contexts {busy}, contexts' charge {charged}"
    );

    // Closed: contexts freed, the charge given back.
    drop(ws);
    assert_eq!(
        metric_until(&gw, "ringway_deflate_dedicated_contexts", |v| v == 0).await,
        0
    );
    assert_eq!(
        metric_until(&gw, "ringway_buffer_bytes", |v| v == 0).await,
        0
    );
}

#[tokio::test]
async fn beyond_the_per_core_cap_connections_get_shared() {
    let gw = Gateway::with_config(
        "compression = \"dedicated\"\ncompression_dedicated_per_core = 2\n",
        &["--upstream", "echo", "--workers", "1"],
    );
    let (a, ra) = RawWs::connect_headers(gw.addr, "/", CHROME).await;
    let (_b, rb) = RawWs::connect_headers(gw.addr, "/", CHROME).await;
    let (mut c, rc) = RawWs::connect_headers(gw.addr, "/", CHROME).await;
    assert_eq!(ra.header("sec-websocket-extensions"), Some(DEDICATED));
    assert_eq!(rb.header("sec-websocket-extensions"), Some(DEDICATED));
    assert_eq!(rc.header("sec-websocket-extensions"), Some(SHARED));
    let fallbacks = "ringway_deflate_dedicated_fallbacks_total";
    assert_eq!(common::metric_sum(&gw, fallbacks, "").await, 1);
    // The shared one works as shared: a fresh context per message.
    let mut fresh = ClientCodec::new(15);
    let msg = json(2000);
    for _ in 0..2 {
        ws_echo(&mut c, &mut fresh, &msg).await;
        fresh = ClientCodec::new(15);
    }
    // A dedicated connection closing gives its place back.
    drop(a);
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let (_d, rd) = RawWs::connect_headers(gw.addr, "/", CHROME).await;
        if rd.header("sec-websocket-extensions") == Some(DEDICATED) {
            break;
        }
        assert!(
            Instant::now() < end,
            "the closed connection's place did not come back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn ws_echo(ws: &mut RawWs, codec: &mut ClientCodec, msg: &[u8]) {
    ws.send(&frame_bytes(
        true,
        4,
        OP_TEXT,
        Some(KEY),
        &codec.deflate(msg),
    ))
    .await;
    let f = ws.read_frame().await;
    assert_eq!(f.rsv, 4);
    assert_eq!(codec.inflate(&f.payload), msg);
}

#[tokio::test]
async fn a_decompression_bomb_closes_1009_in_dedicated_too() {
    let bomb = bomb();
    let gw = Gateway::start(&["--upstream", "echo", "--compression", "dedicated"]);
    let before = rss_bytes(gw.pid());
    for _ in 0..3 {
        // Whole, after a good message: the connection's inflater exists and holds a
        // window (the bomb is a new deflate stream, which may follow a sync flush).
        let (mut ws, _) = RawWs::connect_headers(gw.addr, "/", CHROME).await;
        let mut codec = ClientCodec::new(12);
        ws_echo(&mut ws, &mut codec, &json(1000)).await;
        bomb_whole_closes_1009(&mut ws, &bomb).await;
        let (mut ws, _) = RawWs::connect_headers(gw.addr, "/", CHROME).await;
        bomb_in_fragments_closes_1009(&mut ws, &bomb).await;
    }
    let growth = rss_bytes(gw.pid()).saturating_sub(before);
    assert!(growth < 32 << 20, "RSS grew {growth} bytes");
    let failures = "ringway_inflate_failures_total";
    let too_large = common::metric_sum(&gw, failures, "reason=\"too_large\"").await;
    assert_eq!(too_large, 6);
}

/// Python `websockets` (context takeover, client_max_window_bits) against `dedicated`,
/// both directions, big and small, the same text repeated so takeover matters.
#[test]
fn python_websockets_echoes_with_dedicated() {
    let gw = Gateway::start(&[
        "--upstream",
        "echo",
        "--compression",
        "dedicated",
        "--max-message",
        "1048576",
    ]);
    let py = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv-py3/bin/python");
    let script = r#"
import asyncio, sys, websockets
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
async def main(url):
    f = ClientPerMessageDeflateFactory(client_max_window_bits=True)
    async with websockets.connect(url, extensions=[f], compression=None, max_size=2**20, open_timeout=10) as ws:
        ext = ws.response.headers.get("Sec-WebSocket-Extensions")
        assert "no_context_takeover" not in ext, ext
        for n in [1, 255, 256, 4096, 4096, 65536, 500000, 300, 300]:
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
        out.status.success() && stdout.trim() == format!("ok {DEDICATED}"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Per-route byte counters: a topic message compressed once per core for `shared`
/// subscribers and once per `dedicated` one is counted for each recipient's route, raw and
/// compressed as it went on the wire; inbound compressed messages too.
#[tokio::test]
async fn deflate_bytes_are_counted_per_route_and_recipient() {
    let gw = Gateway::with_config(
        r#"
[[routes]]
path = "/a"
compression = "shared"

[[routes]]
path = "/b"
compression = "dedicated"
"#,
        &["--workers", "1"],
    );
    let join = br#"{"action":"join","room":"lobby"}"#;
    let (mut a1, _) = RawWs::connect_headers(gw.addr, "/a", CHROME).await;
    let (mut a2, _) = RawWs::connect_headers(gw.addr, "/a", CHROME).await;
    let (mut b1, rb) = RawWs::connect_headers(gw.addr, "/b", CHROME).await;
    assert_eq!(rb.header("sec-websocket-extensions"), Some(DEDICATED));
    let mut b_codec = ClientCodec::new(12);
    for ws in [&mut a1, &mut a2] {
        ws.send(&common::masked_frame(true, OP_TEXT, join)).await;
        ws.read_frame().await;
    }
    // b1 joins with a compressed message (under 256 B: its reply goes plain).
    let z_join = b_codec.deflate(join);
    b1.send(&frame_bytes(true, 4, OP_TEXT, Some(KEY), &z_join))
        .await;
    b1.read_frame().await;
    let text = "y".repeat(3000);
    let say = format!(r#"{{"action":"say","room":"lobby","text":"{text}"}}"#);
    a1.send(&common::masked_frame(true, OP_TEXT, say.as_bytes()))
        .await;
    let mut got = Vec::new();
    for ws in [&mut a1, &mut a2, &mut b1] {
        let f = ws.read_frame().await;
        assert_eq!(f.rsv, 4);
        got.push(f.payload);
    }
    let raw = b_codec.inflate(&got[2]);
    let metric = "ringway_route_deflate_bytes_total";
    let v = |route: &'static str, dir: &'static str, form: &'static str| {
        let labels = format!("route=\"{route}\",direction=\"{dir}\",form=\"{form}\"");
        let gw = &gw;
        async move { common::metric_sum(gw, metric, &labels).await }
    };
    // Published once per loop turn: wait for the last recipient's count.
    let end = Instant::now() + Duration::from_secs(5);
    while v("/b", "out", "raw").await == 0 && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // /a: two recipients of the one shared compression.
    assert_eq!(v("/a", "out", "raw").await, 2 * raw.len() as u64);
    assert_eq!(
        v("/a", "out", "compressed").await,
        (got[0].len() + got[1].len()) as u64
    );
    // /b: its own compression, and its compressed join on the way in.
    assert_eq!(v("/b", "out", "raw").await, raw.len() as u64);
    assert_eq!(v("/b", "out", "compressed").await, got[2].len() as u64);
    assert_eq!(v("/b", "in", "compressed").await, z_join.len() as u64);
    assert_eq!(v("/b", "in", "raw").await, join.len() as u64);
    assert_eq!(v("/a", "in", "raw").await, 0);
    // The core's own counters count compression work: once for /a's two, once for /b.
    let core_raw = "direction=\"out\",form=\"raw\"";
    let work = common::metric_sum(&gw, "ringway_deflate_bytes_total", core_raw).await;
    assert_eq!(work, 2 * raw.len() as u64);
}
