//! End-to-end tests: the real `ringway` binary, spoken to by an independent client
//! (tokio-tungstenite) and by raw bytes where a client library would refuse to send bad input.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn ws_connect(gw: &Gateway) -> Ws {
    ws_connect_with(gw, None).await
}

async fn ws_connect_with(gw: &Gateway, config: Option<WebSocketConfig>) -> Ws {
    let (ws, response) = timeout(
        WAIT,
        tokio_tungstenite::connect_async_with_config(gw.url(), config, true),
    )
    .await
    .expect("websocket connect timed out")
    .expect("websocket connect");
    assert_eq!(response.status().as_u16(), 101);
    ws
}

/// The next message that is not a ping (tungstenite answers pings itself).
async fn ws_next(ws: &mut Ws) -> Message {
    loop {
        match timeout(WAIT, ws.next()).await {
            Err(_) => panic!("no message within {WAIT:?}"),
            Ok(None) => panic!("stream ended"),
            Ok(Some(Err(e))) => panic!("websocket error: {e}"),
            Ok(Some(Ok(Message::Ping(_)))) => continue,
            Ok(Some(Ok(m))) => return m,
        }
    }
}

async fn ws_send(ws: &mut Ws, msg: Message) {
    timeout(WAIT, ws.send(msg))
        .await
        .expect("send timed out")
        .expect("send");
}

/// After our close was answered, the stream must end (the server closed TCP).
async fn ws_expect_end(ws: &mut Ws) {
    match timeout(WAIT, ws.next()).await {
        Err(_) => panic!("server kept the connection open after the close handshake"),
        Ok(None) => {}
        Ok(Some(Err(tokio_tungstenite::tungstenite::Error::ConnectionClosed))) => {}
        Ok(Some(other)) => panic!("expected the end of the stream, got {other:?}"),
    }
}

async fn echo_round_trips(upstream: &str) {
    let gw = Gateway::start(&["--upstream", upstream]);
    let mut ws = ws_connect(&gw).await;
    let messages = [
        Message::Text("hello, ringway".into()),
        Message::Binary(vec![0, 1, 2, 0xff, 0x80, 0x7f]),
        Message::Text("ünïcödé ✓ 🦀".into()),
        Message::Text(String::new()),
        Message::Binary(Vec::new()),
        Message::Binary((0..=255u8).cycle().take(70_000 / 2).collect()),
    ];
    for msg in &messages {
        ws_send(&mut ws, msg.clone()).await;
        assert_eq!(&ws_next(&mut ws).await, msg, "echo through {upstream}");
    }
    // Several in flight at once come back in order.
    for i in 0..50 {
        ws_send(&mut ws, Message::Text(format!("msg {i}"))).await;
    }
    for i in 0..50 {
        assert_eq!(ws_next(&mut ws).await, Message::Text(format!("msg {i}")));
    }
    // RFC 6455 §5.5.1: our close is answered with the same code, then TCP goes.
    ws_send(&mut ws, Message::Close(None)).await;
    match ws_next(&mut ws).await {
        Message::Close(_) => {}
        other => panic!("expected the close answer, got {other:?}"),
    }
    ws_expect_end(&mut ws).await;
}

#[tokio::test]
async fn echo_through_relay() {
    echo_round_trips("echo").await;
}

#[tokio::test]
async fn echo_local() {
    echo_round_trips("local-echo").await;
}

#[tokio::test]
async fn one_mib_message_with_raised_limit() {
    let gw = Gateway::start(&["--max-message", "2097152"]);
    let config = WebSocketConfig {
        max_message_size: Some(8 << 20),
        max_frame_size: Some(8 << 20),
        ..Default::default()
    };
    let mut ws = ws_connect_with(&gw, Some(config)).await;
    let big: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i * 31 + i / 251) as u8)
        .collect();
    ws_send(&mut ws, Message::Binary(big.clone())).await;
    match ws_next(&mut ws).await {
        Message::Binary(got) => {
            assert_eq!(got.len(), big.len());
            assert!(got == big, "1 MiB echo differs");
        }
        other => panic!("expected binary, got {other:?}"),
    }
    let text: String = "0123456789abcdef".repeat(1 << 16);
    ws_send(&mut ws, Message::Text(text.clone())).await;
    assert_eq!(ws_next(&mut ws).await, Message::Text(text));
}

#[tokio::test]
async fn fragmented_message_with_ping_between() {
    for upstream in ["echo", "local-echo"] {
        let gw = Gateway::start(&["--upstream", upstream]);
        let mut ws = RawWs::connect(gw.addr).await;
        // RFC 6455 §5.4: control frames may be injected in the middle of a fragmented message.
        let mut bytes = masked_frame(false, OP_TEXT, b"Hel");
        bytes.extend(masked_frame(true, OP_PING, b"ping-in-the-middle"));
        ws.send(&bytes).await;
        // Let the first fragments arrive alone so the server must hold a partial message.
        tokio::time::sleep(Duration::from_millis(50)).await;
        ws.send(&masked_frame(true, OP_CONT, b"lo")).await;
        let mut frames = vec![ws.read_frame().await, ws.read_frame().await];
        frames.sort_by_key(|f| f.opcode);
        assert_eq!(
            frames,
            vec![
                Frame {
                    fin: true,
                    rsv: 0,
                    opcode: OP_TEXT,
                    payload: b"Hello".to_vec()
                },
                Frame {
                    fin: true,
                    rsv: 0,
                    opcode: OP_PONG,
                    payload: b"ping-in-the-middle".to_vec()
                },
            ],
            "upstream {upstream}"
        );
    }
}

#[tokio::test]
async fn ping_gets_pong_with_same_payload() {
    let gw = Gateway::start(&[]);
    let mut ws = ws_connect(&gw).await;
    for payload in [b"".to_vec(), b"abc".to_vec(), vec![0xa5; 125]] {
        ws_send(&mut ws, Message::Ping(payload.clone())).await;
        assert_eq!(ws_next(&mut ws).await, Message::Pong(payload));
    }
    // And the connection still echoes afterwards.
    ws_send(&mut ws, Message::Text("after pings".into())).await;
    assert_eq!(ws_next(&mut ws).await, Message::Text("after pings".into()));
}

/// Send `bytes` after a valid handshake; expect a close frame with `code`, then TCP closed.
async fn bad_input_closes(gw: &Gateway, bytes: &[u8], code: u16) {
    let mut ws = RawWs::connect(gw.addr).await;
    ws.send(bytes).await;
    ws.expect_close(code).await;
    ws.expect_tcp_closed().await;
}

#[tokio::test]
async fn protocol_errors_close_1002() {
    let gw = Gateway::start(&[]);
    // RFC 6455 §5.1: a server closes on an unmasked client frame.
    bad_input_closes(&gw, &unmasked_frame(true, OP_TEXT, b"hello"), 1002).await;
    // §5.2: nonzero RSV bits without a negotiated extension.
    let rsv1 = frame_bytes(true, 4, OP_TEXT, Some([1, 2, 3, 4]), b"hello");
    bad_input_closes(&gw, &rsv1, 1002).await;
    // §5.2: reserved opcode 0x3.
    bad_input_closes(&gw, &masked_frame(true, 0x3, b""), 1002).await;
    // §5.5: a fragmented control frame.
    bad_input_closes(&gw, &masked_frame(false, OP_PING, b"x"), 1002).await;
    // §5.4: a continuation with no message started.
    bad_input_closes(&gw, &masked_frame(true, OP_CONT, b"x"), 1002).await;
    // §5.5: a control frame with more than 125 bytes of payload.
    bad_input_closes(&gw, &masked_frame(true, OP_PING, &[0; 126]), 1002).await;
    // §5.5.1: a close body of one byte cannot hold a status code.
    bad_input_closes(&gw, &masked_frame(true, OP_CLOSE, &[3]), 1002).await;
    // §7.4.1: 1005 must never appear on the wire; 999 is not a close code.
    for code in [1005u16, 999] {
        bad_input_closes(
            &gw,
            &masked_frame(true, OP_CLOSE, &code.to_be_bytes()),
            1002,
        )
        .await;
    }
    // The gateway still serves well-behaved clients afterwards.
    let mut ws = RawWs::connect(gw.addr).await;
    ws.send(&masked_frame(true, OP_TEXT, b"still here")).await;
    assert_eq!(ws.read_frame().await.payload, b"still here");
}

#[tokio::test]
async fn invalid_utf8_text_closes_1007() {
    let gw = Gateway::start(&[]);
    // §8.1: a text message that is not valid UTF-8.
    bad_input_closes(&gw, &masked_frame(true, OP_TEXT, b"ok \xff\xfe"), 1007).await;
    // Invalid only once the fragments are joined: a truncated 3-byte sequence at the end.
    let mut bytes = masked_frame(false, OP_TEXT, b"abc\xe2");
    bytes.extend(masked_frame(true, OP_CONT, b"\x82"));
    bad_input_closes(&gw, &bytes, 1007).await;
    // §5.5.1: a close reason must be UTF-8 too.
    let mut close = 1000u16.to_be_bytes().to_vec();
    close.extend_from_slice(b"bye\xc0");
    bad_input_closes(&gw, &masked_frame(true, OP_CLOSE, &close), 1007).await;
}

#[tokio::test]
async fn over_limit_closes_1009() {
    let gw = Gateway::start(&["--max-message", "1000"]);
    // One frame over the limit.
    bad_input_closes(&gw, &masked_frame(true, OP_BINARY, &[7; 1001]), 1009).await;
    // Fragments each under the limit, together over it.
    let mut bytes = masked_frame(false, OP_BINARY, &[1; 600]);
    bytes.extend(masked_frame(true, OP_CONT, &[2; 600]));
    bad_input_closes(&gw, &bytes, 1009).await;
    // Exactly at the limit is fine.
    let mut ws = RawWs::connect(gw.addr).await;
    ws.send(&masked_frame(true, OP_BINARY, &[9; 1000])).await;
    assert_eq!(ws.read_frame().await.payload, vec![9; 1000]);
}

#[tokio::test]
async fn four_gib_length_claim_closes_1009_without_waiting_for_payload() {
    let gw = Gateway::start(&[]);
    let mut ws = RawWs::connect(gw.addr).await;
    // A 64-bit length of 4 GiB and not one payload byte: the server must refuse on the header.
    ws.send(&frame_header(
        true,
        0,
        OP_BINARY,
        Some([9, 8, 7, 6]),
        4 << 30,
    ))
    .await;
    ws.expect_close(1009).await;
    ws.expect_tcp_closed().await;
}

const WS_HEADERS: &str =
    "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

#[tokio::test]
async fn handshake_split_across_writes_completes() {
    let gw = Gateway::start(&[]);
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let request = upgrade_request(gw.addr);
    let bytes = request.as_bytes();
    // Cut inside the request line, inside a header name, and just before the final CRLF.
    for piece in [
        &bytes[..5],
        &bytes[5..40],
        &bytes[40..bytes.len() - 2],
        &bytes[bytes.len() - 2..],
    ] {
        stream.write_all(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let (head, rest) = read_http_head(&mut stream).await;
    let resp = HttpResponse::parse(&head);
    assert_eq!(resp.status, 101, "{head}");
    assert_eq!(resp.header("sec-websocket-accept"), Some(SAMPLE_ACCEPT));
    assert!(rest.is_empty(), "bytes after the 101: {rest:?}");
}

#[tokio::test]
async fn handshake_missing_key_is_400() {
    let gw = Gateway::start(&[]);
    let req = format!(
        "GET / HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n",
        gw.addr
    );
    let (resp, _) = http_exchange(gw.addr, req.as_bytes()).await;
    assert_eq!(resp.status, 400);
    assert_eq!(resp.header("connection"), Some("close"));
}

#[tokio::test]
async fn handshake_version_8_is_426_naming_13() {
    let gw = Gateway::start(&[]);
    let req = format!(
        "GET / HTTP/1.1\r\nHost: {}\r\n{WS_HEADERS}Sec-WebSocket-Version: 8\r\n\r\n",
        gw.addr
    );
    let (resp, _) = http_exchange(gw.addr, req.as_bytes()).await;
    assert_eq!(resp.status, 426);
    // RFC 6455 §4.4: tell the client which version we speak.
    assert_eq!(resp.header("sec-websocket-version"), Some("13"));
    assert_eq!(resp.header("connection"), Some("close"));
}

#[tokio::test]
async fn handshake_headers_over_limit_is_431() {
    let gw = Gateway::start(&[]);
    let padding: String = (0..9)
        .map(|i| format!("X-Pad-{i}: {}\r\n", "p".repeat(1024)))
        .collect();
    let req = format!(
        "GET / HTTP/1.1\r\nHost: {}\r\n{WS_HEADERS}Sec-WebSocket-Version: 13\r\n{padding}\r\n",
        gw.addr
    );
    assert!(req.len() > 9 * 1024);
    let (resp, _) = http_exchange(gw.addr, req.as_bytes()).await;
    assert_eq!(resp.status, 431);
    assert_eq!(resp.header("connection"), Some("close"));
}

#[tokio::test]
async fn second_client_over_max_connections_is_503() {
    let gw = Gateway::with_config("max_connections = 1\n", &[]);
    let mut first = ws_connect(&gw).await;
    ws_send(&mut first, Message::Text("first".into())).await;
    assert_eq!(ws_next(&mut first).await, Message::Text("first".into()));

    let req = upgrade_request(gw.addr);
    let (resp, _) = http_exchange(gw.addr, req.as_bytes()).await;
    assert_eq!(resp.status, 503);
    assert_eq!(resp.header("connection"), Some("close"));

    // The first client is unaffected; once it leaves, its place is free again.
    ws_send(&mut first, Message::Text("still first".into())).await;
    assert_eq!(
        ws_next(&mut first).await,
        Message::Text("still first".into())
    );
    ws_send(&mut first, Message::Close(None)).await;
    let _ = ws_next(&mut first).await;
    ws_expect_end(&mut first).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        // The slot is released when the server has torn the first connection down, which
        // may lag our view of the TCP close a little.
        let mut stream = TcpStream::connect(gw.addr).await.unwrap();
        stream.write_all(req.as_bytes()).await.unwrap();
        let (head, _) = read_http_head(&mut stream).await;
        let status = HttpResponse::parse(&head).status;
        if status == 101 {
            break;
        }
        assert_eq!(status, 503, "{head}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the freed place was never reused"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn handshake_timeout_is_408() {
    let gw = Gateway::with_config("handshake_timeout_ms = 300\n", &[]);
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    // Half a request, then silence.
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let (resp, _) = http_response_then_eof(&mut stream).await;
    assert_eq!(resp.status, 408);
    assert_eq!(resp.header("connection"), Some("close"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_concurrent_connections_echo() {
    const CONNS: usize = 2000;
    const MESSAGES: usize = 3;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we pass.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
        0
    );
    assert!(
        limit.rlim_cur >= (CONNS + 500) as u64,
        "ulimit -n is {}; this test needs at least {} (client and gateway each hold {CONNS})",
        limit.rlim_cur,
        CONNS + 500
    );

    let gw = Gateway::start(&[]);
    let url = gw.url();
    let verified = Arc::new(AtomicUsize::new(0));
    let overall = timeout(Duration::from_secs(25), async {
        // Phase 1: open every connection, so all are live at once before any traffic.
        let connects: Vec<_> = (0..CONNS)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move {
                    tokio_tungstenite::connect_async_with_config(url, None, true)
                        .await
                        .map(|(ws, _)| ws)
                })
            })
            .collect();
        let mut sockets = Vec::with_capacity(CONNS);
        for (i, c) in connects.into_iter().enumerate() {
            match c.await.unwrap() {
                Ok(ws) => sockets.push(ws),
                Err(e) => panic!("connection {i} failed: {e}"),
            }
        }
        // Phase 2: every connection sends a few messages and checks the replies.
        let talks: Vec<_> = sockets
            .into_iter()
            .enumerate()
            .map(|(i, mut ws)| {
                let verified = Arc::clone(&verified);
                tokio::spawn(async move {
                    for m in 0..MESSAGES {
                        let msg = if m % 2 == 0 {
                            Message::Text(format!("conn {i} message {m}"))
                        } else {
                            Message::Binary(format!("{i}:{m}").into_bytes())
                        };
                        ws.send(msg.clone()).await.unwrap();
                        let reply = loop {
                            match ws.next().await {
                                Some(Ok(Message::Ping(_))) => continue,
                                Some(Ok(m)) => break m,
                                other => panic!("conn {i}: {other:?}"),
                            }
                        };
                        assert_eq!(reply, msg, "conn {i} got another's reply");
                        verified.fetch_add(1, Ordering::Relaxed);
                    }
                    ws.close(None).await.unwrap();
                    // Drain until the server's close answer and the end of the stream.
                    while let Some(Ok(_)) = ws.next().await {}
                })
            })
            .collect();
        for t in talks {
            t.await.unwrap();
        }
    })
    .await;
    assert!(overall.is_ok(), "2,000 connections did not finish in 25 s");
    assert_eq!(verified.load(Ordering::Relaxed), CONNS * MESSAGES);
}

#[tokio::test]
async fn idle_client_gets_1001() {
    let gw = Gateway::start(&["--idle-timeout-ms", "300"]);
    let mut ws = ws_connect(&gw).await;
    // Silent client: the server ends it (the default idle timeout is two minutes).
    let first = timeout(Duration::from_secs(5), ws_next(&mut ws))
        .await
        .expect("no close within 5 s of a 300 ms idle timeout");
    match first {
        Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::Away),
        other => panic!("expected close 1001, got {other:?}"),
    }
    ws_expect_end(&mut ws).await;
}

#[tokio::test]
async fn messages_keep_a_client_from_idling_out() {
    let gw = Gateway::start(&["--idle-timeout-ms", "1500"]);
    let mut ws = RawWs::connect(gw.addr).await;
    // Well past the idle timeout in total, but never silent for as long as it.
    for i in 0..10 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let text = format!("keepalive {i}");
        ws.send(&masked_frame(true, OP_TEXT, text.as_bytes())).await;
        let frame = ws.read_frame().await;
        assert_eq!(
            (frame.opcode, frame.payload),
            (OP_TEXT, text.into_bytes()),
            "closed while active"
        );
    }
}

#[tokio::test]
async fn silent_client_is_pinged_then_closed_without_pong() {
    let gw = Gateway::with_config("ping_interval_ms = 200\npong_timeout_ms = 400\n", &[]);
    let mut ws = RawWs::connect(gw.addr).await;
    let ping = ws.read_frame().await;
    assert_eq!(ping.opcode, OP_PING, "expected a server ping, got {ping:?}");
    // RFC 6455 §5.5.2: a ping from the server; we never answer, so it gives up on us.
    ws.expect_close(1001).await;
    ws.expect_tcp_closed().await;
}

#[tokio::test]
async fn answered_pings_keep_the_connection() {
    let gw = Gateway::with_config("ping_interval_ms = 200\npong_timeout_ms = 3000\n", &[]);
    let mut ws = RawWs::connect(gw.addr).await;
    for _ in 0..3 {
        let ping = ws.read_frame().await;
        assert_eq!(ping.opcode, OP_PING, "expected a server ping, got {ping:?}");
        ws.send(&masked_frame(true, OP_PONG, &ping.payload)).await;
    }
    ws.send(&masked_frame(true, OP_TEXT, b"alive")).await;
    loop {
        let f = ws.read_frame().await;
        if f.opcode == OP_PING {
            ws.send(&masked_frame(true, OP_PONG, &f.payload)).await;
            continue;
        }
        assert_eq!((f.opcode, f.payload), (OP_TEXT, b"alive".to_vec()));
        break;
    }
}

#[test]
fn sigterm_drains_with_1001_and_exits_0() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut gw = Gateway::start(&[]);
    let mut clients = rt.block_on(async {
        let mut clients = Vec::new();
        for i in 0..6 {
            let mut ws = ws_connect(&gw).await;
            let msg = Message::Text(format!("client {i}"));
            ws_send(&mut ws, msg.clone()).await;
            assert_eq!(ws_next(&mut ws).await, msg);
            clients.push(ws);
        }
        clients
    });
    gw.signal(libc::SIGTERM);
    rt.block_on(async {
        for ws in &mut clients {
            match ws_next(ws).await {
                Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::Away),
                other => panic!("expected close 1001, got {other:?}"),
            }
            // tungstenite queued its answer to the close; reading on sends it and sees EOF.
            ws_expect_end(ws).await;
        }
    });
    // The default grace is 10 s; every client answered, so the exit must come well before.
    let status = gw
        .wait_exit(Duration::from_secs(5))
        .expect("ringway still running 5 s after SIGTERM with every client gone");
    assert!(status.success(), "exit status {status:?}");
    assert!(gw.log().contains("SIGTERM"), "log:\n{}", gw.log());
}

#[test]
fn sigterm_with_silent_client_exits_after_grace() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut gw = Gateway::with_config("shutdown_grace_ms = 500\n", &[]);
    let mut ws = rt.block_on(RawWs::connect(gw.addr));
    gw.signal(libc::SIGTERM);
    rt.block_on(async {
        ws.expect_close(1001).await;
        // We never answer; the server drops us when the grace period ends.
        ws.expect_tcp_closed().await;
    });
    let status = gw
        .wait_exit(Duration::from_secs(5))
        .expect("ringway still running 5 s after SIGTERM with a 500 ms grace");
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test]
async fn pipelined_first_frame_is_echoed() {
    for upstream in ["echo", "local-echo"] {
        let gw = Gateway::start(&["--upstream", upstream]);
        // The first frame rides in the same write (and likely the same segment) as the request.
        let mut first = masked_frame(true, OP_TEXT, b"early bird");
        first.extend(masked_frame(true, OP_BINARY, &[1, 2, 3]));
        let mut ws = RawWs::connect_with(gw.addr, &first).await;
        let a = ws.read_frame().await;
        assert_eq!((a.opcode, a.payload), (OP_TEXT, b"early bird".to_vec()));
        let b = ws.read_frame().await;
        assert_eq!((b.opcode, b.payload), (OP_BINARY, vec![1, 2, 3]));
    }
}

#[tokio::test]
async fn client_close_is_answered_with_its_code() {
    let gw = Gateway::start(&[]);
    let mut ws = RawWs::connect(gw.addr).await;
    let mut payload = 4000u16.to_be_bytes().to_vec();
    payload.extend_from_slice(b"bye");
    ws.send(&masked_frame(true, OP_CLOSE, &payload)).await;
    // RFC 6455 §5.5.1: the answer echoes the status code; then the server closes TCP (§7.1.1).
    ws.expect_close(4000).await;
    ws.expect_tcp_closed().await;
}

/// Clients paused for backpressure and resumed before their receive was cancelled (a relay
/// queue of one message is full, then drained, within one loop turn, over and over) are
/// read again, and clients that pipeline faster than they read the echoes are slowed down,
/// not closed as slow consumers: every pipelined message comes back, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_paused_and_resumed_at_once_is_read_to_the_end() {
    let gw = Gateway::with_config("relay_queue = 1\n", &[]);
    const CLIENTS: usize = 8;
    const N: usize = 5_000;
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let ws = ws_connect(&gw).await;
        tasks.push(tokio::spawn(async move {
            let (mut tx, mut rx) = ws.split();
            let sender = tokio::spawn(async move {
                for i in 0..N {
                    let text = format!("{c}:{i}:{}", "x".repeat(2000));
                    tx.feed(Message::Text(text)).await.expect("send");
                }
                tx.flush().await.expect("flush");
                tx
            });
            let mut got = 0;
            while got < N {
                match timeout(WAIT, rx.next()).await {
                    Ok(Some(Ok(Message::Text(t)))) => {
                        assert!(t.starts_with(&format!("{c}:{got}:")), "out of order: {t}");
                        got += 1;
                    }
                    Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
                    other => {
                        return Err(format!("client {c}: {got} of {N} echoed, then {other:?}"))
                    }
                }
            }
            drop(sender.await);
            Ok(())
        }));
    }
    for t in tasks {
        if let Err(e) = t.await.unwrap() {
            panic!("{e}; stderr:\n{}", gw.log());
        }
    }
}
