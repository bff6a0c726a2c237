//! Latency of one chat message through the gateway: to a member of the room on the same node,
//! and to a member on another node (node A -> NATS -> node B), each iteration one `say` and
//! its arrival at the member (and the sender's own copy). Two `ringway` processes (the
//! `ringway` binary of this build) and a `nats-server` on ephemeral 127.0.0.1 ports; without
//! `nats-server` on PATH the benchmark says so and measures nothing.
//!
//! `cargo bench --bench cluster -- --warm-up-time 1 --measurement-time 3`

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Kills its process by PID on drop.
struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_listen(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "port {port} never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn gateway(nats: u16, name: &str) -> (Proc, u16) {
    let (listen, admin) = (port(), port());
    let child = Command::new(env!("CARGO_BIN_EXE_ringway"))
        .args(["--listen", &format!("127.0.0.1:{listen}")])
        .args(["--admin", &format!("127.0.0.1:{admin}")])
        .args(["--workers", "1"])
        .args(["--cluster", &format!("nats://127.0.0.1:{nats}")])
        .args(["--node-name", name])
        .env("RINGWAY_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting ringway");
    wait_listen(listen);
    (Proc(child), listen)
}

async fn client(port: u16, room: &str) -> Ws {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/chat"))
        .await
        .unwrap();
    let join = serde_json::json!({"action": "join", "room": room}).to_string();
    ws.send(Message::Text(join)).await.unwrap();
    next_text(&mut ws).await;
    ws
}

async fn next_text(ws: &mut Ws) -> String {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return t.to_string(),
            Ok(Some(Ok(_))) => continue,
            other => panic!("no message: {other:?}"),
        }
    }
}

/// One `say` from `from`, until `to` and `from` both have it.
async fn round(from: &mut Ws, to: &mut Ws, room: &str) {
    let say = serde_json::json!({"action": "say", "room": room, "text": "x"}).to_string();
    from.send(Message::Text(say)).await.unwrap();
    next_text(to).await;
    next_text(from).await;
}

fn cluster(c: &mut Criterion) {
    if Command::new("nats-server")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("nats-server is not installed (scripts/setup-test-deps.sh): nothing measured");
        return;
    }
    let nats_port = port();
    let _nats = Proc(
        Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &nats_port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_listen(nats_port);
    let (_a, pa) = gateway(nats_port, "a");
    let (_b, pb) = gateway(nats_port, "b");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (mut s1, mut same, mut s2, mut across) = rt.block_on(async {
        // Wait for both nodes to be on NATS: a cross-node say must arrive.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let s1 = client(pa, "same").await;
        let same = client(pa, "same").await;
        let s2 = client(pa, "across").await;
        let across = client(pb, "across").await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        (s1, same, s2, across)
    });
    let mut g = c.benchmark_group("chat say -> member");
    g.bench_function("same node", |b| {
        b.iter(|| rt.block_on(round(&mut s1, &mut same, "same")))
    });
    g.bench_function("other node via NATS", |b| {
        b.iter(|| rt.block_on(round(&mut s2, &mut across, "across")))
    });
    g.finish();
}

criterion_group!(benches, cluster);
criterion_main!(benches);
