//! SIGHUP reload: new limits apply to the next message, nobody is disconnected, and a bad
//! file is refused with the running configuration kept.

mod common;

use std::time::Duration;

use common::{Gateway, WAIT};
use futures_util::{SinkExt, StreamExt};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn echo(ws: &mut Ws, text: String) {
    ws.send(Message::text(text.clone())).await.expect("send");
    let reply = timeout(WAIT, ws.next())
        .await
        .expect("echo timed out")
        .expect("stream ended")
        .expect("ws error");
    assert_eq!(reply, Message::text(text));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_traffic_changes_the_limit_and_disconnects_nobody() {
    let gw = Gateway::with_config("max_message_bytes = 1000\nmax_frame_bytes = 1000\n", &[]);
    let path = gw.config_path().unwrap().to_path_buf();
    let mut clients = Vec::new();
    for _ in 0..200 {
        let (ws, _) = timeout(WAIT, tokio_tungstenite::connect_async(gw.url()))
            .await
            .unwrap()
            .unwrap();
        clients.push(ws);
    }
    // Traffic before, during and after the reload.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (i, mut ws) in clients.into_iter().enumerate() {
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                echo(&mut ws, format!("client {i} message {n}")).await;
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (ws, n)
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::write(&path, "max_message_bytes = 5000\nmax_frame_bytes = 5000\n").unwrap();
    gw.signal(libc::SIGHUP);
    let log_deadline = std::time::Instant::now() + WAIT;
    while !gw.log().contains("configuration reloaded") {
        assert!(
            std::time::Instant::now() < log_deadline,
            "no reload logged:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut clients = Vec::new();
    for t in tasks {
        let (ws, n) = t.await.expect("a client failed during the reload");
        assert!(n > 0);
        clients.push(ws);
    }
    // The new limit applies to the next message: 3000 bytes pass now (1000 did not fit before).
    for ws in clients.iter_mut().take(10) {
        echo(ws, "x".repeat(3000)).await;
    }
    // And it is still a limit: 6000 bytes get 1009.
    let ws = &mut clients[10];
    ws.send(Message::text("y".repeat(6000))).await.unwrap();
    match timeout(WAIT, ws.next()).await.unwrap() {
        Some(Ok(Message::Close(Some(f)))) => assert_eq!(f.code, CloseCode::Size),
        other => panic!("expected close 1009, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_reload_is_refused_and_the_old_config_stays() {
    let gw = Gateway::with_config("max_message_bytes = 1000\nmax_frame_bytes = 1000\n", &[]);
    let (mut ws, _) = timeout(WAIT, tokio_tungstenite::connect_async(gw.url()))
        .await
        .unwrap()
        .unwrap();
    std::fs::write(gw.config_path().unwrap(), "max_message_bytes = \"lots\"\n").unwrap();
    gw.signal(libc::SIGHUP);
    let deadline = std::time::Instant::now() + WAIT;
    while !gw.log().contains("reload refused") {
        assert!(
            std::time::Instant::now() < deadline,
            "no refusal logged:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        gw.log().contains("max_message_bytes"),
        "names the key:\n{}",
        gw.log()
    );
    echo(&mut ws, "still here".into()).await;
    ws.send(Message::text("z".repeat(2000))).await.unwrap();
    match timeout(WAIT, ws.next()).await.unwrap() {
        Some(Ok(Message::Close(Some(f)))) => {
            assert_eq!(f.code, CloseCode::Size, "old limit in force")
        }
        other => panic!("expected close 1009, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_that_removes_a_route_closes_its_clients_1001_and_keeps_the_others() {
    let before = "[[routes]]\npath = \"/a\"\nmax_fragments = 2\n\
                  [[routes]]\npath = \"/b/*\"\nmax_fragments = 2\n";
    let gw = Gateway::with_config(before, &["--workers", "1"]);
    let mut on_a = common::RawWs::connect_path(gw.addr, "/a", &[]).await;
    let mut on_b = common::RawWs::connect_path(gw.addr, "/b/x", &[]).await;
    on_b.send(&common::fragmented_text(b"two frames", 2)).await;
    assert_eq!(on_b.read_frame().await.payload, b"two frames");

    // "/a" goes; "/b/*" moves to the first place and allows 6 frames per message.
    std::fs::write(
        gw.config_path().unwrap(),
        "[[routes]]\npath = \"/b/*\"\nmax_fragments = 6\n",
    )
    .unwrap();
    gw.signal(libc::SIGHUP);
    let close = on_a.expect_close(1001).await;
    assert_eq!(close.close_reason(), "route removed");

    // The other client keeps its connection and gets its route's new limit.
    on_b.send(&common::fragmented_text(b"now in five frames", 5))
        .await;
    let reply = on_b.read_frame().await;
    assert_eq!(reply.payload, b"now in five frames");
    on_b.send(&common::fragmented_text(b"but not in seven frames", 7))
        .await;
    on_b.expect_close(1008).await;
    // And the core is alive: new clients are served.
    let (mut ws, _) = timeout(WAIT, tokio_tungstenite::connect_async(gw.url() + "b/y"))
        .await
        .unwrap()
        .unwrap();
    echo(&mut ws, "after the reload".into()).await;
}
