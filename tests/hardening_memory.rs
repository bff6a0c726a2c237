//! Issue 11, item 3 (edge side): every byte a client can make a core hold is bounded and
//! charged to `ringway_buffer_bytes`, the memory budget's meter. Each test: the attack, the
//! outcome (RSS bounded, meter following RSS, close code, counter, time bound), and that a
//! fresh client is still served.

mod common;

use std::time::{Duration, Instant};

use common::{metric_sum, rss_bytes, Gateway, RawWs, WAIT};
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;

const MIB: u64 = 1 << 20;
/// RSS the allocator may add without any client holding anything: mimalloc's segment and
/// page granularity and the core's first touch of pages (measured 0.5-7 MiB between runs).
const SLACK: u64 = 8 * MIB;

async fn meter(gw: &Gateway) -> u64 {
    metric_sum(gw, "ringway_buffer_bytes", "").await
}

/// A fresh client's echo round trip.
async fn echo_rtt(url: &str) -> Duration {
    let (mut ws, _) = timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("connect timed out")
        .expect("connect");
    let t = Instant::now();
    ws.send(Message::text("still served")).await.unwrap();
    let reply = timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(reply, Message::text("still served"));
    t.elapsed()
}

/// The peak RSS growth over `rss0` and the peak meter, sampled every 50 ms for `secs`.
async fn sample_peaks(gw: &Gateway, rss0: u64, secs: u64) -> (u64, u64) {
    let end = Instant::now() + Duration::from_secs(secs);
    let (mut rss, mut metered) = (0, 0);
    while Instant::now() < end {
        rss = rss.max(rss_bytes(gw.pid()).saturating_sub(rss0));
        metered = metered.max(meter(gw).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (rss, metered)
}

/// Write `frame` over and over for `secs`, never reading; returns the bytes written. Stops
/// early when writes block for a second (the gateway stopped reading) or fail (closed).
async fn flood(ws: &mut RawWs, frame: &[u8], secs: u64) -> (u64, bool) {
    let batch: Vec<u8> = frame.repeat((64 * 1024 / frame.len()).max(1));
    let end = Instant::now() + Duration::from_secs(secs);
    let mut written = 0;
    let mut blocked = false;
    while Instant::now() < end {
        match timeout(Duration::from_secs(1), ws.stream.write_all(&batch)).await {
            Ok(Ok(())) => written += batch.len() as u64,
            Ok(Err(_)) => break,
            Err(_) => {
                blocked = true;
                break;
            }
        }
    }
    (written, blocked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_flood_without_reading_is_bounded_and_charged() {
    let config = "send_queue_bytes = 262144\nread_buffers = 64\nread_buffer_bytes = 16384\n";
    let gw = Gateway::with_config(config, &["--workers", "1", "--admin", "127.0.0.1:0"]);
    echo_rtt(&gw.url()).await;
    let rss0 = rss_bytes(gw.pid());
    let meter0 = meter(&gw).await;
    let mut flooder = RawWs::connect(gw.addr).await;
    let ping = common::masked_frame(true, common::OP_PING, &[7u8; 125]);
    let ((written, _), (rss, metered)) =
        tokio::join!(flood(&mut flooder, &ping, 4), sample_peaks(&gw, rss0, 4));
    assert!(written > 4 * MIB, "the flood got going: {written} bytes");
    let metered = metered.saturating_sub(meter0);
    eprintln!("ping flood: {written} B written, RSS +{rss} B, meter +{metered} B");
    // Only the newest unanswered pong is queued: RSS stays within twice the send queue cap.
    assert!(rss < 2 * 262_144 + SLACK, "RSS grew {rss} B");
    assert!(metered < 262_144 + 64 * 1024, "meter {metered} B");
    // The meter follows RSS: within 2x plus a few KiB for the connection (and allocator noise).
    assert!(
        rss <= 2 * metered + SLACK,
        "RSS +{rss} B vs meter +{metered} B"
    );
    let rtt = echo_rtt(&gw.url()).await;
    assert!(rtt < Duration::from_millis(500), "fresh echo took {rtt:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_flood_without_reading_is_paused_then_closed_1008() {
    let config = "send_queue_bytes = 262144\nread_buffers = 64\nread_buffer_bytes = 16384\n";
    let gw = Gateway::with_config(
        config,
        &[
            "--workers",
            "1",
            "--upstream",
            "local-echo",
            "--admin",
            "127.0.0.1:0",
        ],
    );
    echo_rtt(&gw.url()).await;
    let rss0 = rss_bytes(gw.pid());
    let mut flooder = RawWs::connect(gw.addr).await;
    // Tiny messages and pings: per-entry overhead dominates, and it is charged.
    let mut wire = common::masked_frame(true, common::OP_TEXT, b"abc");
    wire.extend(common::masked_frame(true, common::OP_PING, b""));
    let ((written, _), (rss, metered)) =
        tokio::join!(flood(&mut flooder, &wire, 3), sample_peaks(&gw, rss0, 3));
    eprintln!("echo flood: {written} B written, RSS +{rss} B, meter {metered} B");
    assert!(rss < 2 * 262_144 + SLACK, "RSS grew {rss} B");
    assert!(
        rss <= 2 * metered + SLACK,
        "RSS +{rss} B vs meter {metered} B"
    );
    assert!(
        metric_sum(&gw, "ringway_slow_consumer_total", "closed").await >= 1,
        "counted as a slow consumer"
    );
    let rtt = echo_rtt(&gw.url()).await;
    assert!(rtt < Duration::from_millis(500), "fresh echo took {rtt:?}");
    // Reading at last, the flooder finds its replies up to the cap, then close 1008.
    let end = Instant::now() + WAIT;
    loop {
        assert!(Instant::now() < end, "no close frame");
        let Some(f) = flooder.next_frame().await else {
            panic!("TCP closed without a close frame")
        };
        if f.opcode == common::OP_CLOSE {
            assert_eq!(f.close_code(), Some(1008));
            assert_eq!(f.close_reason(), "slow consumer");
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_fast_client_cannot_stall_others_through_the_relay() {
    let gw = Gateway::with_config(
        "read_buffers = 64\nread_buffer_bytes = 16384\n",
        &[
            "--workers",
            "1",
            "--upstream",
            "echo",
            "--admin",
            "127.0.0.1:0",
        ],
    );
    echo_rtt(&gw.url()).await;
    let rss0 = rss_bytes(gw.pid());
    let addr = gw.addr;
    let flooder = tokio::spawn(async move {
        let mut ws = RawWs::connect(addr).await;
        let mut json = br#"{"x":""#.to_vec();
        json.resize(64 * 1024 - 2, b'a');
        json.extend(br#""}"#);
        let frame = common::masked_frame(true, common::OP_TEXT, &json);
        // Reads its replies too (as fast as it can), so it is the relay that is flooded.
        let (mut rd, mut wr) = ws.stream.split();
        let reader = async {
            let mut buf = vec![0u8; 256 * 1024];
            let end = Instant::now() + Duration::from_secs(4);
            while Instant::now() < end {
                use tokio::io::AsyncReadExt;
                match timeout(Duration::from_millis(200), rd.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    _ => {}
                }
            }
        };
        let writer = async {
            let end = Instant::now() + Duration::from_secs(3);
            let mut sent = 0u64;
            while Instant::now() < end {
                match timeout(Duration::from_millis(500), wr.write_all(&frame)).await {
                    Ok(Ok(())) => sent += frame.len() as u64,
                    Ok(Err(_)) => break,
                    Err(_) => {}
                }
            }
            sent
        };
        let (sent, ()) = tokio::join!(writer, reader);
        sent
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut rtts = Vec::new();
    let mut peak_rss = 0;
    let mut peak_meter = 0;
    for _ in 0..50 {
        rtts.push(echo_rtt(&gw.url()).await);
        peak_rss = peak_rss.max(rss_bytes(gw.pid()).saturating_sub(rss0));
        peak_meter = peak_meter.max(meter(&gw).await);
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let sent = flooder.await.unwrap();
    rtts.sort();
    let p99 = rtts[rtts.len() * 99 / 100 - 1];
    eprintln!(
        "relay flood: {sent} B sent, echo p50 {:?} p99 {p99:?} max {:?}, RSS +{peak_rss} B, meter peak {peak_meter} B",
        rtts[rtts.len() / 2],
        rtts[rtts.len() - 1]
    );
    assert!(sent > 8 * MIB, "the flood got going: {sent} B");
    assert!(p99 < Duration::from_millis(100), "echo p99 {p99:?}");
    assert!(peak_rss < 64 * MIB, "RSS grew {peak_rss} B");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_to_long_topics_are_charged() {
    let gw = Gateway::start(&[
        "--workers",
        "1",
        "--upstream",
        "echo",
        "--admin",
        "127.0.0.1:0",
    ]);
    let meter0 = meter(&gw).await;
    let (mut ws, _) = timeout(WAIT, tokio_tungstenite::connect_async(gw.url()))
        .await
        .unwrap()
        .unwrap();
    // Room names are at most 251 bytes (the relay's topic limit): many long-ish rooms.
    let joins = 90;
    let name_len = 240;
    for i in 0..joins {
        let topic = format!("{i:04}{}", "t".repeat(name_len - 4));
        let join = serde_json::json!({"action": "join", "room": topic}).to_string();
        ws.send(Message::text(join)).await.unwrap();
        let _ = timeout(WAIT, ws.next()).await.unwrap();
    }
    let end = Instant::now() + WAIT;
    let mut metered = 0;
    while Instant::now() < end {
        metered = meter(&gw).await.saturating_sub(meter0);
        if metered >= joins * name_len as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("{joins} joins of {name_len} B topics: meter +{metered} B");
    assert!(
        metered >= joins * name_len as u64,
        "topics not charged: {metered} B"
    );
    echo_rtt(&gw.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_budget_the_largest_holder_is_shed_1008() {
    // A 16 MiB message may be assembled, but the budget is 8 MiB.
    let config = "memory_budget_bytes = 8388608\nmax_message_bytes = 16777216\n\
                  max_frame_bytes = 16777216\n";
    let gw = Gateway::with_config(config, &["--workers", "1", "--admin", "127.0.0.1:0"]);
    let mut hog = RawWs::connect(gw.addr).await;
    let claim = 16 * MIB;
    let mask = [1, 2, 3, 4];
    hog.send(&common::frame_header(
        true,
        0,
        common::OP_BINARY,
        Some(mask),
        claim,
    ))
    .await;
    let chunk = vec![0x55u8; 256 * 1024];
    let mut sent = 0u64;
    let end = Instant::now() + WAIT;
    let mut closed = None;
    while sent < 12 * MIB && Instant::now() < end {
        // Generous per write: on a loaded 2-core machine the gateway's one core can be off
        // the CPU for a while; the loop is bounded by `end` all the same.
        if timeout(Duration::from_secs(3), hog.stream.write_all(&chunk))
            .await
            .is_ok_and(|r| r.is_ok())
        {
            sent += chunk.len() as u64;
        } else {
            break;
        }
    }
    // The hog is cut off with 1008 "server memory budget".
    let t = Instant::now();
    while t.elapsed() < WAIT {
        match timeout(Duration::from_millis(500), hog.next_frame()).await {
            Ok(Some(f)) if f.opcode == common::OP_CLOSE => {
                closed = Some(f);
                break;
            }
            Ok(None) => break,
            _ => {}
        }
    }
    let f = closed.unwrap_or_else(|| panic!("no close after {sent} B: {}", gw.log()));
    assert_eq!(f.close_code(), Some(1008));
    assert_eq!(f.close_reason(), "server memory budget");
    assert!(
        metric_sum(
            &gw,
            "ringway_policy_refusals_total",
            "reason=\"memory_shed\""
        )
        .await
            >= 1
    );
    // The WARN line is written before the close, but reaches the test through the
    // gateway's stderr pipe and a reader thread: give it a moment on a loaded machine.
    let t = Instant::now();
    while !gw.log().contains("closing the largest holder") && t.elapsed() < WAIT {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        gw.log().contains("closing the largest holder"),
        "{}",
        gw.log()
    );
    // A new client gets its 101 and its echo.
    let end = Instant::now() + WAIT;
    loop {
        let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(common::upgrade_request(gw.addr).as_bytes())
            .await
            .unwrap();
        let (resp, _) = common::read_http_response(&mut s).await;
        if resp.status == 101 {
            break;
        }
        assert!(Instant::now() < end, "still refused: {}", resp.status);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    echo_rtt(&gw.url()).await;
}
