//! Issue 11, items 1 (panic containment) and 6 (the client hears its own protocol error
//! first), against the real binary: the attack, the exact outcome, and other clients served.

mod common;
mod common_relay;

use std::time::{Duration, Instant};

use common::{
    admin_metric_sum, masked_frame, read_http_response, Gateway, RawWs, OP_CLOSE, OP_TEXT, WAIT,
};
use common_relay::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// The test-only hook's trigger (RINGWAY_TEST_PANIC_ON): a text message of these bytes panics.
const TRIGGER: &str = "please-panic-7f3a";
/// A credential the handshake panic's message quotes; it must never reach the log.
const SECRET: &str = "Bearer s3cr3t-t0ken-do-not-log";

async fn echoes(ws: &mut RawWs, text: &str) {
    ws.send(&masked_frame(true, OP_TEXT, text.as_bytes())).await;
    let f = ws.read_frame().await;
    assert_eq!(
        f.opcode, OP_TEXT,
        "expected the echo of {text:?}, got {f:?}"
    );
    assert_eq!(f.payload, text.as_bytes());
}

async fn panics_total(gw: &Gateway) -> u64 {
    admin_metric_sum(gw, "ringway_panics_total", "").await
}

/// One ERROR line per contained panic, naming the connection and the code location, and
/// neither the panic's message nor any header value anywhere in the log.
fn check_panic_log(log: &str, want: usize) {
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("panic while handling this connection"))
        .collect();
    assert_eq!(lines.len(), want, "panic lines:\n{log}");
    for l in &lines {
        assert!(l.contains("ERROR"), "not an ERROR line: {l}");
        assert!(l.contains("conn="), "no connection id: {l}");
        // The hooks panic in the connection's session (src/session/mod.rs, frames.rs).
        assert!(
            l.contains("session/mod.rs:") || l.contains("session/frames.rs:"),
            "no location: {l}"
        );
    }
    assert!(
        !log.contains("s3cr3t"),
        "a header value reached the log:\n{log}"
    );
    assert!(
        !log.contains("test hook"),
        "a panic message reached the log:\n{log}"
    );
    assert!(
        !log.contains("panicked at"),
        "the hook printed a contained panic:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_in_one_connection_is_contained_1011_or_500_and_the_core_serves_on() {
    let gw = Gateway::start_with_env(
        &["--workers", "1", "--admin", "127.0.0.1:0"],
        &[("RINGWAY_TEST_PANIC_ON", TRIGGER)],
    );
    // Connected before, on the same (only) core.
    let mut before = RawWs::connect(gw.addr).await;
    echoes(&mut before, "before").await;
    assert_eq!(panics_total(&gw).await, 0);

    // 1. A panic while the connection is open: close 1011 "internal error", then TCP closed.
    let mut victim = RawWs::connect(gw.addr).await;
    echoes(&mut victim, "fine so far").await;
    victim
        .send(&masked_frame(true, OP_TEXT, TRIGGER.as_bytes()))
        .await;
    let f = victim.read_frame().await;
    assert_eq!(f.opcode, OP_CLOSE, "{f:?}");
    assert_eq!(f.close_code(), Some(1011));
    assert_eq!(f.close_reason(), "internal error");
    victim.expect_tcp_closed().await;
    assert_eq!(panics_total(&gw).await, 1);
    echoes(&mut before, "still here").await;

    // 2. A panic in handshake handling: 500, then TCP closed.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let request = format!(
        "GET /__panic HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: {SECRET}\r\n\r\n"
    );
    s.write_all(request.as_bytes()).await.unwrap();
    let (response, _) = read_http_response(&mut s).await;
    assert_eq!(response.status, 500);
    common::expect_eof(&mut s).await;
    assert_eq!(panics_total(&gw).await, 2);

    // Everyone else is served: the client from before, and a new one.
    echoes(&mut before, "after both").await;
    let mut after = RawWs::connect(gw.addr).await;
    echoes(&mut after, "new client").await;
    check_panic_log(
        &gw.log_with("panic while handling this connection", 2).await,
        2,
    );
    // The open-connection count came back down: the two victims were freed.
    let deadline = Instant::now() + WAIT;
    loop {
        let open = admin_metric_sum(&gw, "ringway_connections_held", "").await;
        if open == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "ringway_connections_held stayed {open}, want 2"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A client sends invalid UTF-8 on a route whose backend treats `close` as `on_close` says:
/// it gets close 1007 with a reason within 100 ms, the backend gets `close` 1007, and
/// another client is still served.
async fn protocol_error_is_heard_first(on_close: OnClose) {
    let (listener, addr) = fake_listener();
    let (frames, stop, backend) = spawn_echo_backend(listener, on_close, Duration::from_secs(30));
    let gw = Gateway::start(&["--workers", "1", "--upstream", &format!("tcp://{addr}")]);
    wait_log(&gw, "backend link up", 1, Duration::from_secs(15)).await;
    let mut other = RawWs::connect(gw.addr).await;
    echoes(&mut other, "other").await;
    let mut victim = RawWs::connect(gw.addr).await;
    echoes(&mut victim, "victim").await;

    let sent = Instant::now();
    victim
        .send(&masked_frame(true, OP_TEXT, &[b'o', b'k', 0xff, 0xfe]))
        .await;
    let f = victim.read_frame().await;
    let took = sent.elapsed();
    assert_eq!(f.opcode, OP_CLOSE, "{f:?}");
    assert_eq!(f.close_code(), Some(1007), "reason {:?}", f.close_reason());
    assert!(!f.close_reason().is_empty(), "the close carries no reason");
    assert!(
        took < Duration::from_millis(100),
        "close 1007 took {took:?}"
    );
    // The client answers our close; TCP then ends.
    victim
        .send(&masked_frame(true, OP_CLOSE, &1007u16.to_be_bytes()))
        .await;
    victim.expect_tcp_closed().await;

    // The backend was told: `close` with 1007 for the victim (the second `open`).
    let deadline = Instant::now() + WAIT;
    let mut opens = Vec::new();
    let close = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let f = frames
            .recv_timeout(left)
            .expect("the backend got close 1007");
        match f.ty {
            T_OPEN => opens.push(f.conn()),
            T_CLOSE => break f,
            _ => {}
        }
    };
    assert_eq!(opens.len(), 2, "opens seen: {opens:?}");
    assert_eq!(close.conn(), opens[1], "close for the victim");
    assert_eq!(u16::from_be_bytes([close.body[8], close.body[9]]), 1007);

    // Another client on the same core is still served, and so is a new one.
    echoes(&mut other, "other again").await;
    let mut fresh = RawWs::connect(gw.addr).await;
    echoes(&mut fresh, "fresh").await;
    drop(stop);
    drop(gw);
    backend.join().expect("fake backend panicked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_closes_1007_at_once_when_the_backend_ignores_close() {
    protocol_error_is_heard_first(OnClose::Ignore).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_closes_1007_with_its_reason_when_the_backend_echoes_close() {
    protocol_error_is_heard_first(OnClose::Answer).await;
}
