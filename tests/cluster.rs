//! A cluster of gateways on NATS (issue 15, docs/cluster.md): two or three `ringway`
//! processes joined with `--cluster`, each test with its own `nats-server` on an ephemeral
//! 127.0.0.1 port (stopped by PID). Cross-node chat through the embedded upstream with each
//! message exactly once to every member, a backend's publish, broadcast and send reaching
//! another node's clients and its `gone`, and an outage of NATS: local chat goes on, nobody
//! is disconnected, drops are counted, and cross-node delivery resumes after NATS returns.
//!
//! Needs `nats-server` on PATH (scripts/setup-test-deps.sh installs it); without it every
//! test here fails saying so, unless `RINGWAY_SKIP_NATS=1` asks to skip them (and says so).

mod common;
mod common_relay;

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Gateway, WAIT};
use common_relay::{
    broadcast_frame, fake_listener, join, next_json, rstring, said, say_msg, send_frame, send_text,
    ws_connect, ws_next_within, FakeLink, Got, Ws, T_GONE, T_OPEN, T_PUBLISH,
};

/// A `nats-server` on 127.0.0.1; killed by PID on drop.
struct Nats {
    child: Option<Child>,
    port: u16,
}

impl Nats {
    /// None when `nats-server` is not installed.
    fn start() -> Option<Nats> {
        Nats::start_on(free_port())
    }

    fn start_on(port: u16) -> Option<Nats> {
        Nats::start_with(port, &[])
    }

    fn start_with(port: u16, extra: &[&str]) -> Option<Nats> {
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let nats = Nats {
            child: Some(child),
            port,
        };
        let deadline = Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(nats)
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// SIGKILL by PID: an outage, not a goodbye.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn nats_or_skip() -> Option<Nats> {
    let n = Nats::start();
    if n.is_none() {
        no_nats_server();
    }
    n
}

/// Without `nats-server` the cluster tests fail, or skip when `RINGWAY_SKIP_NATS=1`.
fn no_nats_server() {
    assert!(
        std::env::var("RINGWAY_SKIP_NATS").is_ok_and(|v| v == "1"),
        "nats-server is not installed: run scripts/setup-test-deps.sh (or set RINGWAY_SKIP_NATS=1 to skip the cluster tests)"
    );
    eprintln!("nats-server is not installed and RINGWAY_SKIP_NATS=1: skipping");
}

fn node(nats: &Nats, name: &str, extra: &[&str]) -> Gateway {
    let url = nats.url();
    let mut args = vec!["--cluster", url.as_str(), "--node-name", name];
    args.extend_from_slice(extra);
    Gateway::start(&args)
}

/// Wait until every gateway is connected to NATS and hears `n` nodes.
async fn wait_for_cluster(gws: &[&Gateway], n: u64) {
    let deadline = Instant::now() + WAIT;
    for gw in gws {
        loop {
            let up = gw.metric("ringway_cluster_connected", "").await == 1;
            if up && gw.metric("ringway_cluster_nodes", "").await == n {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "cluster of {n} not formed:\n{}",
                gw.metrics().await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Subscriptions travel core -> relay -> NATS thread -> NATS asynchronously.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(700)).await;
}

/// Every `said` a client gets within `quiet` of the previous one: text -> (from, count).
async fn collect_said(ws: &mut Ws, room: &str, quiet: Duration) -> BTreeMap<String, (String, u32)> {
    let mut got: BTreeMap<String, (String, u32)> = BTreeMap::new();
    loop {
        match ws_next_within(ws, quiet).await {
            None => return got,
            Some(Got::Json(v)) => {
                let (from, text) = said(&v, room);
                got.entry(text).or_insert((from, 0)).1 += 1;
            }
            Some(other) => panic!("expected said, got {other:?}"),
        }
    }
}

/// A client's own connection id: the `from` of its own `say`, through the gateway.
async fn own_id(ws: &mut Ws, room: &str) -> u64 {
    send_text(ws, say_msg(room, "whoami")).await;
    let v = next_json(ws).await;
    let (from, text) = said(&v, room);
    assert_eq!(text, "whoami");
    from.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_across_three_nodes_reaches_every_member_exactly_once() {
    let Some(nats) = nats_or_skip() else { return };
    let (a, b, c) = (
        node(&nats, "a", &[]),
        node(&nats, "b", &[]),
        node(&nats, "c", &[]),
    );
    wait_for_cluster(&[&a, &b, &c], 3).await;
    let mut clients = vec![
        ws_connect(&format!("{}/chat", a.url())).await,
        ws_connect(&format!("{}/chat", a.url())).await,
        ws_connect(&format!("{}/chat", b.url())).await,
        ws_connect(&format!("{}/chat", c.url())).await,
    ];
    // Someone on another room on node b must not see the lobby.
    let mut elsewhere = ws_connect(&format!("{}/chat", b.url())).await;
    join(&mut elsewhere, "kitchen").await;
    for ws in &mut clients {
        join(ws, "lobby").await;
    }
    settle().await;
    for (i, ws) in clients.iter_mut().enumerate() {
        send_text(ws, say_msg("lobby", &format!("hello from {i}"))).await;
    }
    let mut senders = BTreeMap::new();
    for (i, ws) in clients.iter_mut().enumerate() {
        let got = collect_said(ws, "lobby", Duration::from_millis(1500)).await;
        let texts: BTreeSet<&str> = got.keys().map(String::as_str).collect();
        let want: BTreeSet<String> = (0..4).map(|j| format!("hello from {j}")).collect();
        assert_eq!(
            texts,
            want.iter().map(String::as_str).collect(),
            "client {i} got {got:?}"
        );
        for (text, (from, n)) in &got {
            assert_eq!(*n, 1, "client {i} got {text:?} {n} times");
            let prev = senders.insert(text.clone(), from.clone());
            assert!(prev.is_none_or(|p| p == *from), "{text:?} with two senders");
        }
    }
    // Each node's connections carry their own node id (the top 8 bits), never 0.
    let node_of = |text: &str| senders[text].parse::<u64>().unwrap() >> 56;
    assert_eq!(node_of("hello from 0"), node_of("hello from 1"));
    let nodes: BTreeSet<u64> = ["hello from 0", "hello from 2", "hello from 3"]
        .iter()
        .map(|t| node_of(t))
        .collect();
    assert_eq!(nodes.len(), 3, "node ids {senders:?}");
    assert!(!nodes.contains(&0));
    assert!(
        ws_next_within(&mut elsewhere, Duration::from_millis(300))
            .await
            .is_none(),
        "a member of another room got lobby traffic"
    );
    assert!(
        a.metric("ringway_cluster_messages_total", "direction=\"out\"")
            .await
            >= 2
    );
    assert!(
        b.metric("ringway_cluster_messages_total", "direction=\"in\"")
            .await
            >= 3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_on_one_node_publishes_broadcasts_and_sends_to_another_nodes_clients() {
    let Some(nats) = nats_or_skip() else { return };
    let (listener, addr) = fake_listener();
    let upstream = format!("tcp://{addr}");
    let a = node(&nats, "a", &["--upstream", &upstream]);
    let b = node(&nats, "b", &[]);
    let mut link = FakeLink::accept(&listener, WAIT).expect("node a's backend link");
    link.handshake();
    wait_for_cluster(&[&a, &b], 2).await;

    // A client of node b in room "x" (the topic "room:x"), and a client of node a.
    let mut bx = ws_connect(&format!("{}/chat", b.url())).await;
    join(&mut bx, "x").await;
    let bx_id = own_id(&mut bx, "x").await;
    let mut on_a = ws_connect(&a.url()).await;
    let open = link.read_frame().expect("open from node a");
    assert_eq!(open.ty, T_OPEN);
    settle().await;

    // publish "room:x" from the backend on node a reaches node b's member.
    let mut body = rstring("room:x");
    body.push(1);
    body.extend_from_slice(&5u32.to_be_bytes());
    body.extend_from_slice(b"hi-bx");
    link.write(&common_relay::relay_frame(T_PUBLISH, &body));
    match ws_next_within(&mut bx, WAIT).await {
        Some(Got::Other(tokio_tungstenite::tungstenite::Message::Text(t))) => {
            assert_eq!(t.as_str(), "hi-bx")
        }
        other => panic!("node b's member expected the publish, got {other:?}"),
    }

    // broadcast reaches both nodes' clients, once each.
    link.write(&broadcast_frame(b"to-all"));
    for ws in [&mut bx, &mut on_a] {
        match ws_next_within(ws, WAIT).await {
            Some(Got::Other(tokio_tungstenite::tungstenite::Message::Binary(p))) => {
                assert_eq!(&p[..], b"to-all")
            }
            other => panic!("expected the broadcast, got {other:?}"),
        }
        assert!(
            ws_next_within(ws, Duration::from_millis(400))
                .await
                .is_none(),
            "a second copy"
        );
    }

    // send to node b's connection, by the id node b gave it.
    assert_ne!(bx_id >> 56, 0);
    link.write(&send_frame(bx_id, "direct"));
    match ws_next_within(&mut bx, WAIT).await {
        Some(Got::Other(tokio_tungstenite::tungstenite::Message::Text(t))) => {
            assert_eq!(t.as_str(), "direct")
        }
        other => panic!("expected the direct send, got {other:?}"),
    }

    // Once that client is gone, the backend on node a gets `gone` for it from node b.
    drop(bx);
    tokio::time::sleep(Duration::from_millis(500)).await;
    link.write(&send_frame(bx_id, "too late"));
    let deadline = Instant::now() + WAIT;
    loop {
        let f = link.read_frame().expect("gone from node b");
        if f.ty == T_GONE {
            assert_eq!(f.conn(), bx_id);
            break;
        }
        assert!(Instant::now() < deadline, "no gone");
    }
    drop(on_a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_outage_keeps_local_chat_and_cross_node_delivery_resumes() {
    let Some(mut nats) = nats_or_skip() else {
        return;
    };
    let port = nats.port;
    let (a, b) = (node(&nats, "a", &[]), node(&nats, "b", &[]));
    wait_for_cluster(&[&a, &b], 2).await;
    let mut a1 = ws_connect(&format!("{}/chat", a.url())).await;
    let mut a2 = ws_connect(&format!("{}/chat", a.url())).await;
    let mut b1 = ws_connect(&format!("{}/chat", b.url())).await;
    for ws in [&mut a1, &mut a2, &mut b1] {
        join(ws, "r").await;
    }
    settle().await;
    send_text(&mut a1, say_msg("r", "before")).await;
    for ws in [&mut a1, &mut a2, &mut b1] {
        let got = collect_said(ws, "r", Duration::from_millis(800)).await;
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got["before"].1, 1);
    }

    nats.kill();
    let deadline = Instant::now() + WAIT;
    while a.metric("ringway_cluster_connected", "").await != 0 {
        assert!(
            Instant::now() < deadline,
            "node a did not notice the outage"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Local chat goes on; node b's member misses it (at most once, dropped and counted).
    for i in 0..5 {
        send_text(&mut a1, say_msg("r", &format!("during {i}"))).await;
    }
    for ws in [&mut a1, &mut a2] {
        let got = collect_said(ws, "r", Duration::from_millis(800)).await;
        assert_eq!(got.len(), 5, "{got:?}");
        assert!(got.values().all(|(_, n)| *n == 1), "{got:?}");
    }
    assert!(
        a.metric("ringway_cluster_dropped_total", "reason=\"disconnected\"")
            .await
            >= 5
    );
    let (status, _, _) = common::http_get_timed(a.admin_addr(), "/readyz");
    assert_eq!(status, 200, "/readyz during the outage");

    let _nats = Nats::start_on(port).expect("nats-server again");
    wait_for_cluster(&[&a, &b], 2).await;
    // Delivery resumes within 10 s: keep saying until node b's member hears one.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut said_n = 0;
    let mut heard: BTreeMap<String, u32> = BTreeMap::new();
    while heard.is_empty() {
        assert!(
            Instant::now() < deadline,
            "cross-node delivery did not resume"
        );
        send_text(&mut a1, say_msg("r", &format!("after {said_n}"))).await;
        said_n += 1;
        for (t, (_, n)) in collect_said(&mut b1, "r", Duration::from_millis(300)).await {
            assert!(
                t.starts_with("after "),
                "{t:?} reached node b after the outage"
            );
            *heard.entry(t).or_default() += n;
        }
    }
    for (t, (_, n)) in collect_said(&mut b1, "r", Duration::from_millis(800)).await {
        *heard.entry(t).or_default() += n;
    }
    assert!(heard.values().all(|n| *n == 1), "duplicates: {heard:?}");
    // Nobody was disconnected: every client still chats, locally and across.
    send_text(&mut b1, say_msg("r", "b is back")).await;
    for ws in [&mut a1, &mut a2, &mut b1] {
        let got = collect_said(ws, "r", Duration::from_millis(1000)).await;
        assert_eq!(got.get("b is back").map(|x| x.1), Some(1), "{got:?}");
    }
}

/// Keep saying `text-N` from `from` until `to` hears one (within 10 s); then no message
/// reached `to` twice.
async fn until_heard(from: &mut Ws, to: &mut Ws, room: &str, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut heard: BTreeMap<String, u32> = BTreeMap::new();
    let mut n = 0;
    while heard.is_empty() {
        assert!(
            Instant::now() < deadline,
            "{text}: cross-node delivery did not resume"
        );
        send_text(from, say_msg(room, &format!("{text}-{n}"))).await;
        n += 1;
        for (t, (_, k)) in collect_said(to, room, Duration::from_millis(300)).await {
            if t.starts_with(text) {
                *heard.entry(t).or_default() += k;
            }
        }
    }
    for (t, (_, k)) in collect_said(to, room, Duration::from_millis(600)).await {
        if t.starts_with(text) {
            *heard.entry(t).or_default() += k;
        }
    }
    assert!(heard.values().all(|k| *k == 1), "duplicates: {heard:?}");
    // Drain what the sender heard of its own.
    collect_said(from, room, Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_fails_over_to_the_second_nats_server_of_its_list() {
    if Command::new("nats-server")
        .arg("--version")
        .output()
        .is_err()
    {
        no_nats_server();
        return;
    }
    // Two NATS servers routed into one NATS cluster.
    let (p1, p2, r1, r2) = (free_port(), free_port(), free_port(), free_port());
    let route = |p: u16| format!("nats://127.0.0.1:{p}");
    let (c1, c2, to1, to2) = (route(r1), route(r2), route(r2), route(r1));
    let mut n1 = Nats::start_with(
        p1,
        &["--cluster_name", "t", "--cluster", &c1, "--routes", &to1],
    )
    .expect("nats-server 1");
    let _n2 = Nats::start_with(
        p2,
        &["--cluster_name", "t", "--cluster", &c2, "--routes", &to2],
    )
    .expect("nats-server 2");
    let a = Gateway::with_config(
        &format!(
            "[cluster]\nnats = [\"nats://127.0.0.1:{p1}\", \"nats://127.0.0.1:{p2}\"]\nnode = \"a\"\nnode_id = 1\n"
        ),
        &[],
    );
    let b = Gateway::start(&[
        "--cluster",
        &format!("nats://127.0.0.1:{p2}"),
        "--node-name",
        "b",
    ]);
    // Both hear each other once the NATS servers' route is up.
    wait_for_cluster(&[&a, &b], 2).await;
    let mut a1 = ws_connect(&format!("{}/chat", a.url())).await;
    let mut b1 = ws_connect(&format!("{}/chat", b.url())).await;
    join(&mut a1, "f").await;
    join(&mut b1, "f").await;
    settle().await;
    until_heard(&mut b1, &mut a1, "f", "before").await;
    n1.kill();
    until_heard(&mut b1, &mut a1, "f", "after").await;
    until_heard(&mut a1, &mut b1, "f", "back").await;
    assert_eq!(a.metric("ringway_cluster_connected", "").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_leaves_stops_receiving_and_the_others_keep_serving() {
    let Some(nats) = nats_or_skip() else { return };
    let (a, mut b, c) = (
        node(&nats, "a", &[]),
        node(&nats, "b", &[]),
        node(&nats, "c", &[]),
    );
    wait_for_cluster(&[&a, &b, &c], 3).await;
    let mut a1 = ws_connect(&format!("{}/chat", a.url())).await;
    let mut b1 = ws_connect(&format!("{}/chat", b.url())).await;
    let mut c1 = ws_connect(&format!("{}/chat", c.url())).await;
    for ws in [&mut a1, &mut b1, &mut c1] {
        join(ws, "l").await;
    }
    settle().await;
    b.signal(libc::SIGTERM);
    assert!(
        b.wait_exit(Duration::from_secs(15)).is_some(),
        "node b did not exit"
    );
    // Node b's client was closed 1001 by its own node, not by the others.
    let deadline = Instant::now() + WAIT;
    while a.metric("ringway_cluster_nodes", "").await != 2 {
        assert!(Instant::now() < deadline, "node b still counted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    send_text(&mut a1, say_msg("l", "still here")).await;
    for ws in [&mut a1, &mut c1] {
        let got = collect_said(ws, "l", Duration::from_millis(1000)).await;
        assert_eq!(got.get("still here").map(|x| x.1), Some(1), "{got:?}");
    }
    drop(b1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_with_one_id_are_reported_and_not_sent_to() {
    let Some(nats) = nats_or_skip() else { return };
    let url = nats.url();
    let conf =
        |name: &str| format!("[cluster]\nnats = [\"{url}\"]\nnode = \"{name}\"\nnode_id = 7\n");
    let a = Gateway::with_config(&conf("x"), &[]);
    let b = Gateway::with_config(&conf("y"), &[]);
    let deadline = Instant::now() + WAIT;
    while a
        .metric("ringway_cluster_node_id_conflicts_total", "")
        .await
        == 0
    {
        assert!(
            Instant::now() < deadline,
            "no conflict reported:\n{}",
            a.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = Instant::now() + WAIT;
    while !a.log().contains("another node uses this node's id") {
        assert!(Instant::now() < deadline, "no ERROR logged");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        b.metric("ringway_cluster_node_id_conflicts_total", "")
            .await
            > 0
    );
    // A third node refuses to send to id 7: it cannot tell which of the two is meant.
    let (listener, addr) = fake_listener();
    let c = node(&nats, "c", &["--upstream", &format!("tcp://{addr}")]);
    let mut link = FakeLink::accept(&listener, WAIT).expect("node c's backend link");
    link.handshake();
    wait_for_cluster(&[&c], 3).await;
    link.write(&send_frame((7u64 << 56) | 1, "to whom?"));
    let deadline = Instant::now() + WAIT;
    while c
        .metric(
            "ringway_cluster_dropped_total",
            "reason=\"node_id_conflict\"",
        )
        .await
        == 0
    {
        assert!(Instant::now() < deadline, "the send was not refused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        c.metric("ringway_cluster_messages_total", "direction=\"out\"")
            .await,
        0,
        "published anyway"
    );
}

#[test]
fn cluster_flags_are_checked() {
    let out = common::run_to_exit(&["--cluster", "127.0.0.1:4222"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--cluster") && err.contains("nats://HOST:PORT"),
        "{err}"
    );
    let out = common::run_to_exit(&["--node-name", "a"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--cluster"));
    // A nats:// backend needs [cluster] (and is its upstream's only backend).
    let path = std::env::temp_dir().join(format!("ringway-cluster-{}.toml", std::process::id()));
    for (text, want) in [
        (
            "[[upstreams]]\nname = \"q\"\nbackends = [\"nats://b.chat\"]\n",
            "needs [cluster]",
        ),
        (
            "[cluster]\nnats = [\"nats://h:1\"]\n[[upstreams]]\nname = \"q\"\nbackends = [\"nats://b.*\"]\n",
            "no wildcards",
        ),
    ] {
        std::fs::write(&path, text).unwrap();
        let out = common::run_to_exit(&["check-config", path.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{text}");
        assert!(err.contains("upstreams[0].backends") && err.contains(want), "{err}");
    }
    let _ = std::fs::remove_file(&path);
}

/// 1,000 members of one room over 3 nodes; a burst of 20 `say`s from one node: every member
/// gets every message exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_reaches_a_thousand_members_on_three_nodes_exactly_once() {
    let Some(nats) = nats_or_skip() else { return };
    let gws = [
        node(&nats, "a", &[]),
        node(&nats, "b", &[]),
        node(&nats, "c", &[]),
    ];
    wait_for_cluster(&[&gws[0], &gws[1], &gws[2]], 3).await;
    const MEMBERS: usize = 1000;
    const BURST: usize = 20;
    let mut members = Vec::with_capacity(MEMBERS);
    for i in 0..MEMBERS {
        let mut ws = ws_connect(&format!("{}/chat", gws[i % 3].url())).await;
        join(&mut ws, "crowd").await;
        members.push(ws);
    }
    settle().await;
    let mut speaker = ws_connect(&format!("{}/chat", gws[0].url())).await;
    for n in 0..BURST {
        send_text(&mut speaker, say_msg("crowd", &format!("m{n}"))).await;
    }
    let tasks: Vec<_> = members
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(30);
                let mut got: BTreeMap<String, u32> = BTreeMap::new();
                while got.len() < BURST && Instant::now() < deadline {
                    match ws_next_within(&mut ws, Duration::from_secs(5)).await {
                        Some(Got::Json(v)) => *got.entry(said(&v, "crowd").1).or_default() += 1,
                        other => panic!("expected said, got {other:?}"),
                    }
                }
                // Anything more within a moment would be a duplicate.
                while let Some(Got::Json(v)) =
                    ws_next_within(&mut ws, Duration::from_millis(300)).await
                {
                    *got.entry(said(&v, "crowd").1).or_default() += 1;
                }
                got
            })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        let got = t.await.unwrap();
        assert_eq!(got.len(), BURST, "member {i} (node {}) got {got:?}", i % 3);
        assert!(
            got.values().all(|n| *n == 1),
            "member {i} got duplicates {got:?}"
        );
    }
}

/// `[cluster]` is fixed at start: a SIGHUP that changes it is refused (the node keeps its id
/// and its NATS connection); one that leaves it alone is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_may_not_change_the_cluster() {
    let Some(nats) = nats_or_skip() else { return };
    let conf = |node: &str, idle: u64| {
        format!(
            "idle_timeout_ms = {idle}\n[cluster]\nnats = [\"{}\"]\nnode = \"{node}\"\n",
            nats.url()
        )
    };
    let gw = Gateway::with_config(&conf("a", 120_000), &[]);
    wait_for_cluster(&[&gw], 1).await;
    let path = gw.config_path().unwrap().to_path_buf();
    std::fs::write(&path, conf("renamed", 120_000)).unwrap();
    gw.signal(libc::SIGHUP);
    common_relay::wait_log(&gw, "reload refused", 1, WAIT).await;
    assert!(
        gw.log().contains("cluster, which need a restart"),
        "{}",
        gw.log()
    );
    std::fs::write(&path, conf("a", 60_000)).unwrap();
    gw.signal(libc::SIGHUP);
    common_relay::wait_log(&gw, "configuration reloaded", 1, WAIT).await;
    assert_eq!(gw.metric("ringway_cluster_connected", "").await, 1);
}

/// One instance of a backend over NATS: answers each `message` with a `send` of
/// `NAME:PAYLOAD` to the connection's node; counts the `open`s it saw.
async fn nats_backend(
    url: String,
    name: &'static str,
    opens: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    use futures_util::StreamExt;
    let client = async_nats::connect(url)
        .await
        .expect("backend connects to NATS");
    let mut sub = client
        .queue_subscribe("backends.chat.in", "chat".into())
        .await
        .unwrap();
    client.flush().await.unwrap();
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            let h = m.headers.clone().unwrap_or_default();
            let get = |k: &str| h.get(k).map(|v| v.as_str().to_string()).unwrap_or_default();
            match get("Ringway-Op").as_str() {
                "open" => {
                    let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
                    assert_eq!(v["path"], "/q", "{v}");
                    opens.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                "message" => {
                    let mut reply = async_nats::HeaderMap::new();
                    reply.insert("Ringway-Op", "send");
                    reply.insert("Ringway-Conn", get("Ringway-Conn").as_str());
                    let mut body = format!("{name}:").into_bytes();
                    body.extend_from_slice(&m.payload);
                    client
                        .publish_with_headers(
                            format!("ringway.node.{}", get("Ringway-Origin")),
                            reply,
                            body.into(),
                        )
                        .await
                        .unwrap();
                }
                _ => {}
            }
        }
    })
}

/// Send `n` texts `TAGi`, each answered `WHO:TAGi`: how many each instance answered.
async fn exchange(ws: &mut Ws, n: usize, tag: &str) -> BTreeMap<String, usize> {
    use tokio_tungstenite::tungstenite::Message;
    let mut by: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..n {
        send_text(ws, format!("{tag}{i}")).await;
        match ws_next_within(ws, WAIT).await {
            Some(Got::Other(Message::Text(t))) => {
                let (who, what) = t.split_once(':').unwrap();
                assert_eq!(what, format!("{tag}{i}"));
                *by.entry(who.to_string()).or_default() += 1;
            }
            other => panic!("no answer to {tag}{i}: {other:?}"),
        }
    }
    by
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_over_nats_share_the_messages_and_one_takes_over_from_the_other() {
    let Some(nats) = nats_or_skip() else { return };
    let gw = Gateway::with_config(
        &format!(
            "[cluster]\nnats = [\"{}\"]\nnode = \"a\"\nnode_id = 3\n\n[[upstreams]]\nname = \"q\"\nbackends = [\"nats://backends.chat\"]\n\n[[routes]]\npath = \"/q\"\nupstream = \"q\"\n",
            nats.url()
        ),
        &[],
    );
    wait_for_cluster(&[&gw], 1).await;
    let opens = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let one = nats_backend(nats.url(), "one", opens.clone()).await;
    let _two = nats_backend(nats.url(), "two", opens.clone()).await;
    let mut ws = ws_connect(&format!("{}/q", gw.url())).await;
    let shared = exchange(&mut ws, 30, "m").await;
    assert_eq!(shared.len(), 2, "both instances answer: {shared:?}");
    assert_eq!(
        opens.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "one open"
    );
    one.abort();
    let _ = one.await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = exchange(&mut ws, 10, "k").await;
    assert_eq!(
        after.get("two"),
        Some(&10),
        "the other takes over: {after:?}"
    );
}

/// docs/cluster.md "Push from anywhere": a plain NATS client (no ringway headers but the
/// documented ones) publishes to a topic by its base64url token, broadcasts, and sends to
/// and closes one connection by its id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_nats_client_can_publish_broadcast_and_send_to_one_connection() {
    use tokio_tungstenite::tungstenite::Message;
    let Some(nats) = nats_or_skip() else { return };
    let gw = node(&nats, "a", &[]);
    wait_for_cluster(&[&gw], 1).await;
    let mut member = ws_connect(&format!("{}/chat", gw.url())).await;
    join(&mut member, "a b.*>").await;
    let id = own_id(&mut member, "a b.*>").await;
    settle().await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    // base64url("room:a b.*>") without padding, as the doc computes it.
    let subject = "ringway.topic.cm9vbTphIGIuKj4";
    client.publish(subject, "to the room".into()).await.unwrap();
    let mut h = async_nats::HeaderMap::new();
    h.insert("Ringway-Kind", "binary");
    client
        .publish_with_headers("ringway.broadcast", h, vec![0u8, 1].into())
        .await
        .unwrap();
    let mut h = async_nats::HeaderMap::new();
    h.insert("Ringway-Op", "send");
    h.insert("Ringway-Conn", id.to_string().as_str());
    let node_subject = format!("ringway.node.{}", id >> 56);
    client
        .publish_with_headers(node_subject.clone(), h, "just you".into())
        .await
        .unwrap();
    let mut h = async_nats::HeaderMap::new();
    h.insert("Ringway-Op", "close");
    h.insert("Ringway-Conn", id.to_string().as_str());
    h.insert("Ringway-Code", "4000");
    client
        .publish_with_headers(node_subject, h, "bye".into())
        .await
        .unwrap();
    client.flush().await.unwrap();
    let mut seen = Vec::new();
    loop {
        match ws_next_within(&mut member, WAIT).await {
            Some(Got::Other(Message::Text(t))) => seen.push(t.to_string()),
            Some(Got::Other(Message::Binary(b))) => seen.push(format!("{:?}", &b[..])),
            Some(Got::Close(code, reason)) => {
                assert_eq!((code, reason.as_str()), (Some(4000), "bye"));
                break;
            }
            other => panic!("after {seen:?}: {other:?}"),
        }
    }
    // Different subjects have no order between them; the send and the close share one.
    seen.sort();
    assert_eq!(seen, ["[0, 1]", "just you", "to the room"]);
}

/// Every text and binary message a client gets until `quiet` passes without one.
async fn drain_texts(ws: &mut Ws, quiet: Duration) -> Vec<String> {
    use tokio_tungstenite::tungstenite::Message;
    let mut seen = Vec::new();
    loop {
        match ws_next_within(ws, quiet).await {
            None => return seen,
            Some(Got::Other(Message::Text(t))) => seen.push(t.to_string()),
            Some(Got::Other(Message::Binary(b))) => seen.push(format!("{:?}", &b[..])),
            Some(Got::Json(v)) => seen.push(v.to_string()),
            Some(other) => panic!("after {seen:?}: {other:?}"),
        }
    }
}

/// docs/cluster.md "Backends over NATS": a backend answers `publish` and `broadcast` on the
/// node subject like its other operations; the node delivers them to its own clients and
/// once to the other nodes, so members on both nodes get each exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_backend_publishes_and_broadcasts_through_the_node_subject() {
    let Some(nats) = nats_or_skip() else { return };
    let a = node(&nats, "a", &[]);
    let b = node(&nats, "b", &[]);
    wait_for_cluster(&[&a, &b], 2).await;
    let mut on_a = ws_connect(&format!("{}/chat", a.url())).await;
    join(&mut on_a, "x").await;
    let node_a = own_id(&mut on_a, "x").await >> 56;
    // The `whoami` also crosses the bus to node b: let it land there before node b's member
    // joins room x, or that member may count it among what it hears below.
    settle().await;
    let mut on_b = ws_connect(&format!("{}/chat", b.url())).await;
    join(&mut on_b, "x").await;
    let mut elsewhere = ws_connect(&format!("{}/chat", b.url())).await;
    join(&mut elsewhere, "y").await;
    settle().await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    let subject = format!("ringway.node.{node_a}");
    let mut h = async_nats::HeaderMap::new();
    h.insert("Ringway-Op", "publish");
    h.insert("Ringway-Topic", "room:x");
    client
        .publish_with_headers(subject.clone(), h, "to room x".into())
        .await
        .unwrap();
    let mut h = async_nats::HeaderMap::new();
    h.insert("Ringway-Op", "broadcast");
    h.insert("Ringway-Kind", "binary");
    client
        .publish_with_headers(subject.clone(), h, vec![7u8].into())
        .await
        .unwrap();
    // Without a topic a publish cannot be delivered: counted as invalid, nothing sent.
    let mut h = async_nats::HeaderMap::new();
    h.insert("Ringway-Op", "publish");
    client
        .publish_with_headers(subject, h, "nowhere".into())
        .await
        .unwrap();
    client.flush().await.unwrap();
    let quiet = Duration::from_millis(1500);
    let mut got_a = drain_texts(&mut on_a, quiet).await;
    let mut got_b = drain_texts(&mut on_b, quiet).await;
    got_a.sort();
    got_b.sort();
    assert_eq!(got_a, ["[7]", "to room x"], "node a's member");
    assert_eq!(got_b, ["[7]", "to room x"], "node b's member, once");
    assert_eq!(drain_texts(&mut elsewhere, quiet).await, ["[7]"]);
    assert_eq!(
        a.metric("ringway_cluster_dropped_total", "reason=\"invalid\"")
            .await,
        1
    );
}

/// examples/chat_backend_nats.py, run with .venv-py3's Python (nats-py, from
/// scripts/setup-test-deps.sh); killed by PID on drop.
struct PyBackend(Child);

impl PyBackend {
    /// None (after saying why) when the venv has no nats-py and RINGWAY_SKIP_NATS=1.
    fn start(nats: &Nats) -> Option<PyBackend> {
        use std::io::BufRead;
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let python = root.join(".venv-py3/bin/python");
        let has_nats = Command::new(&python)
            .args(["-c", "import nats"])
            .status()
            .is_ok_and(|s| s.success());
        if !has_nats {
            assert!(
                std::env::var("RINGWAY_SKIP_NATS").is_ok_and(|v| v == "1"),
                "{} has no nats-py: run scripts/setup-test-deps.sh",
                python.display()
            );
            eprintln!("no nats-py and RINGWAY_SKIP_NATS=1: skipping");
            return None;
        }
        let mut child = Command::new(&python)
            .arg(root.join("examples/chat_backend_nats.py"))
            .args(["--nats", &nats.url(), "--prefix", "chat"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning examples/chat_backend_nats.py");
        let mut line = String::new();
        let out = child.stdout.take().unwrap();
        let mut out = std::io::BufReader::new(out);
        // It prints this line once subscribed (and flushed to NATS); EOF if it died.
        out.read_line(&mut line).unwrap();
        let backend = PyBackend(child);
        assert!(
            line.starts_with("listening on chat.in"),
            "backend said {line:?}"
        );
        Some(backend)
    }
}

impl Drop for PyBackend {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// docs/cluster.md "Backends over NATS", the example: two nodes whose `/room` upstream is
/// `nats://chat`, served by examples/chat_backend_nats.py; a member on each node chats
/// through it, each `said` reaching both members exactly once, in a plain room and in one
/// whose name no NATS header can carry (the example then publishes to the topic subject).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_nats_chat_backend_serves_members_on_two_nodes() {
    let Some(nats) = nats_or_skip() else { return };
    let config = |name: &str, id: u8| {
        format!(
            "[cluster]\nnats = [\"{}\"]\nnode = \"{name}\"\nnode_id = {id}\n\n[[upstreams]]\nname = \"chat\"\nbackends = [\"nats://chat\"]\n\n[[routes]]\npath = \"/room\"\nupstream = \"chat\"\n",
            nats.url()
        )
    };
    let a = Gateway::with_config(&config("a", 1), &[]);
    let b = Gateway::with_config(&config("b", 2), &[]);
    wait_for_cluster(&[&a, &b], 2).await;
    let Some(_backend) = PyBackend::start(&nats) else {
        return;
    };
    let mut on_a = ws_connect(&format!("{}/room", a.url())).await;
    let mut on_b = ws_connect(&format!("{}/room", b.url())).await;
    send_text(&mut on_a, "not json".into()).await;
    assert_eq!(
        next_json(&mut on_a).await,
        serde_json::json!({"event": "error", "reason": "expected a JSON object"})
    );
    let odd = " two\nlines";
    for ws in [&mut on_a, &mut on_b] {
        join(ws, "lobby").await;
        join(ws, odd).await;
    }
    settle().await;
    send_text(&mut on_a, say_msg("lobby", "hello from a")).await;
    send_text(&mut on_b, say_msg("lobby", "hello from b")).await;
    let quiet = Duration::from_millis(1500);
    let got_a = collect_said(&mut on_a, "lobby", quiet).await;
    let got_b = collect_said(&mut on_b, "lobby", quiet).await;
    for got in [&got_a, &got_b] {
        let texts: Vec<(&str, u32)> = got.iter().map(|(t, (_, n))| (t.as_str(), *n)).collect();
        assert_eq!(texts, [("hello from a", 1), ("hello from b", 1)]);
    }
    let id_a: u64 = got_a["hello from a"].0.parse().unwrap();
    let id_b: u64 = got_a["hello from b"].0.parse().unwrap();
    assert_eq!((id_a >> 56, id_b >> 56), (1, 2), "`from` names each node");
    send_text(&mut on_b, say_msg(odd, "odd")).await;
    for ws in [&mut on_a, &mut on_b] {
        let got = collect_said(ws, odd, quiet).await;
        assert_eq!(got.get("odd").map(|(_, n)| *n), Some(1), "{got:?}");
        assert_eq!(got.len(), 1);
    }
}

/// Read the link's frames until a `gone` for `conn` (other frames, pings, are skipped).
fn expect_gone(link: &mut FakeLink, conn: u64, what: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let f = link
            .read_frame()
            .unwrap_or_else(|| panic!("no gone: {what}"));
        if f.ty == T_GONE {
            assert_eq!(f.conn(), conn, "{what}");
            return;
        }
        assert!(Instant::now() < deadline, "no gone: {what}");
    }
}

/// A backend's `send` or `close` to a connection of a node no heartbeat came from, or
/// while NATS is unreachable, cannot be delivered: the backend gets `gone` for it at once
/// (and the drop is counted), as for a stale id on one gateway, instead of silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_to_a_missing_node_or_during_an_outage_get_gone() {
    let Some(mut nats) = nats_or_skip() else {
        return;
    };
    let (listener, addr) = fake_listener();
    let upstream = format!("tcp://{addr}");
    let a = node(&nats, "a", &["--upstream", &upstream]);
    let mut link = FakeLink::accept(&listener, WAIT).expect("node a's backend link");
    link.handshake();
    wait_for_cluster(&[&a], 1).await;
    // Past the grace after connecting in which nodes not heard yet are not taken as missing.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let nowhere = (77u64 << 56) | 5;
    link.write(&send_frame(nowhere, "hello?"));
    expect_gone(&mut link, nowhere, "send to node 77");
    link.write(&common_relay::close_frame_for(nowhere + 1, 4000));
    expect_gone(&mut link, nowhere + 1, "close to node 77");
    assert_eq!(
        a.metric("ringway_cluster_dropped_total", "reason=\"unknown_node\"")
            .await,
        2
    );

    nats.kill();
    let deadline = Instant::now() + WAIT;
    while a.metric("ringway_cluster_connected", "").await != 0 {
        assert!(Instant::now() < deadline, "still connected after the kill");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = a
        .metric("ringway_cluster_dropped_total", "reason=\"disconnected\"")
        .await;
    let other = (2u64 << 56) | 9;
    link.write(&send_frame(other, "during the outage"));
    expect_gone(&mut link, other, "send during the outage");
    assert_eq!(
        a.metric("ringway_cluster_dropped_total", "reason=\"disconnected\"")
            .await,
        before + 1
    );
}

/// A backend over NATS (or any NATS client) that gives its operations a NATS reply subject
/// hears `gone` there for a connection that is not open on its node, as a relay link does;
/// an open connection's operations are delivered and answered with nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_sender_with_a_reply_subject_hears_gone() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let Some(nats) = nats_or_skip() else { return };
    let gw = node(&nats, "a", &[]);
    wait_for_cluster(&[&gw], 1).await;
    let mut member = ws_connect(&format!("{}/chat", gw.url())).await;
    join(&mut member, "r").await;
    let id = own_id(&mut member, "r").await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await.unwrap();
    client.flush().await.unwrap();
    let node_subject = format!("ringway.node.{}", id >> 56);
    let op = |op: &str, conn: u64| {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Ringway-Op", op);
        h.insert("Ringway-Conn", conn.to_string().as_str());
        h
    };
    // The same slot in another generation: a connection that was, and is no more.
    let stale = id ^ (1 << 24);
    for (name, payload) in [("send", "anyone?"), ("close", "bye"), ("subscribe", "t")] {
        client
            .publish_with_reply_and_headers(
                node_subject.clone(),
                inbox.clone(),
                op(name, stale),
                payload.into(),
            )
            .await
            .unwrap();
        let m = tokio::time::timeout(WAIT, replies.next())
            .await
            .unwrap_or_else(|_| panic!("no gone for a {name} within {WAIT:?}"))
            .unwrap();
        let h = m.headers.expect("headers");
        assert_eq!(
            h.get("Ringway-Op").map(|v| v.as_str()),
            Some("gone"),
            "{name}"
        );
        assert_eq!(
            h.get("Ringway-Conn").map(|v| v.as_str().to_string()),
            Some(stale.to_string()),
            "{name}"
        );
    }
    client
        .publish_with_reply_and_headers(node_subject, inbox, op("send", id), "just you".into())
        .await
        .unwrap();
    client.flush().await.unwrap();
    loop {
        match ws_next_within(&mut member, WAIT).await {
            Some(Got::Other(Message::Text(t))) if t.as_str() == "just you" => break,
            Some(Got::Other(_)) => {}
            other => panic!("the send to the open connection: {other:?}"),
        }
    }
    let late = tokio::time::timeout(Duration::from_millis(500), replies.next()).await;
    assert!(
        late.is_err(),
        "an open connection's send answered: {late:?}"
    );
}
