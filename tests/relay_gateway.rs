//! End-to-end tests of the relay: the real `ringway` binary between tokio-tungstenite clients
//! and backends speaking docs/relay-protocol.md — the embedded upstream, the example chat
//! backends as separate processes (Python and Rust, TCP and Unix sockets), and fake backends
//! that die, send garbage, stop reading, or name connections that do not exist.
//!
//! Every wait is bounded; outcomes are what a client or a backend operator would see
//! (messages, close codes, the gateway's log, its resident memory).

mod common;
mod common_relay;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::{Gateway, WAIT};
use common_relay::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;

fn chat_url(gw: &Gateway, path: &str) -> String {
    format!("ws://{}{path}", gw.addr)
}

// ----- 1 and 2: the chat contract through every kind of upstream -----

/// Two clients in a room: both get every `said` (the sender too), with the sender's id;
/// an unknown action gets an error and leaves the connection usable.
async fn two_clients(url: &str) {
    let mut a = ws_connect(url).await;
    let mut b = ws_connect(url).await;
    join(&mut a, "R").await;
    join(&mut b, "R").await;

    send_text(&mut a, say_msg("R", "hello from a")).await;
    let (from_a, text) = said(&next_json(&mut a).await, "R");
    assert_eq!(text, "hello from a");
    assert_eq!(said(&next_json(&mut b).await, "R"), (from_a.clone(), text));

    send_text(&mut b, say_msg("R", "and from b")).await;
    let (from_b, text) = said(&next_json(&mut b).await, "R");
    assert_eq!(text, "and from b");
    assert_eq!(said(&next_json(&mut a).await, "R"), (from_b.clone(), text));
    assert_ne!(from_a, from_b, "two connections share an id");

    // Not a chat action: an error, to the sender only.
    send_text(&mut a, json!({"action": "dance", "room": "R"}).to_string()).await;
    let err = next_json(&mut a).await;
    assert_eq!(err["event"], "error", "{err}");
    assert!(
        err["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{err}"
    );
    // ... and the room still works for both, b getting nothing in between.
    send_text(&mut a, say_msg("R", "still here")).await;
    assert_eq!(
        said(&next_json(&mut a).await, "R"),
        (from_a.clone(), "still here".into())
    );
    assert_eq!(
        said(&next_json(&mut b).await, "R"),
        (from_a, "still here".into())
    );
}

/// `n` clients in one room each say `k` things at once: every client receives every `said`
/// exactly once, each sender's in the order it sent them, and each sender has one id.
async fn crowded_room(url: &str, n: usize, k: usize) {
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        let mut ws = ws_connect(url).await;
        join(&mut ws, "crowd").await;
        clients.push(ws);
    }
    // Everyone has joined before anyone speaks.
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut ws)| {
            tokio::spawn(async move {
                for j in 0..k {
                    send_text(&mut ws, say_msg("crowd", &format!("{i}/{j}"))).await;
                }
                let mut got = Vec::with_capacity(n * k);
                for _ in 0..n * k {
                    got.push(said(&next_json(&mut ws).await, "crowd"));
                }
                // Nothing more: no duplicates arrive late.
                if let Some(extra) = ws_next_within(&mut ws, Duration::from_millis(200)).await {
                    panic!("client {i} got more than {} messages: {extra:?}", n * k);
                }
                got
            })
        })
        .collect();
    let mut id_of_sender: HashMap<usize, String> = HashMap::new();
    for (receiver, task) in tasks.into_iter().enumerate() {
        let got = timeout(Duration::from_secs(30), task)
            .await
            .expect("a client did not finish")
            .expect("client task panicked");
        let mut per_sender: HashMap<usize, Vec<usize>> = HashMap::new();
        for (from, text) in got {
            let (i, j) = text.split_once('/').expect("our text");
            let (i, j): (usize, usize) = (i.parse().unwrap(), j.parse().unwrap());
            let id = id_of_sender.entry(i).or_insert_with(|| from.clone());
            assert_eq!(*id, from, "sender {i} appears under two ids");
            per_sender.entry(i).or_default().push(j);
        }
        for i in 0..n {
            assert_eq!(
                per_sender.get(&i).map(Vec::as_slice),
                Some(&(0..k).collect::<Vec<_>>()[..]),
                "client {receiver}: says of client {i} missing, repeated or out of order"
            );
        }
    }
    let ids: HashSet<_> = id_of_sender.values().collect();
    assert_eq!(ids.len(), n, "senders must have distinct ids");
}

async fn chat_contract(url: &str) {
    two_clients(url).await;
    crowded_room(url, 20, 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_through_embedded_upstream() {
    let gw = Gateway::start(&[]);
    chat_contract(&chat_url(&gw, "/chat")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_through_python_backend_over_tcp() {
    let backend = BackendProc::spawn(Example::Python, "127.0.0.1:0");
    let gw = Gateway::start(&["--upstream", &backend.upstream_url()]);
    chat_contract(&chat_url(&gw, "/chat")).await;
    wait_log(&gw, "backend link up", 1, WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_through_rust_backend_over_tcp() {
    let backend = BackendProc::spawn(Example::Rust, "127.0.0.1:0");
    let gw = Gateway::start(&["--upstream", &backend.upstream_url()]);
    chat_contract(&chat_url(&gw, "/chat")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_through_python_backend_over_unix_socket() {
    let dir = TempDir::new();
    let path = dir.0.join("chat.sock");
    let backend = BackendProc::spawn(Example::Python, &format!("unix:{}", path.display()));
    assert_eq!(backend.upstream_url(), format!("unix:{}", path.display()));
    let gw = Gateway::start(&["--upstream", &backend.upstream_url()]);
    chat_contract(&chat_url(&gw, "/chat")).await;
}

/// The documented contract's details (docs/relay-protocol.md, "The chat contract"): `leave`,
/// speaking without joining, and the exact error reasons. The brief says the embedded
/// upstream serves the same contract as the example backends for messages with an `action`
/// (it echoes everything else, by design), so `embedded` skips only those cases.
async fn contract_details(url: &str, embedded: bool) {
    let mut a = ws_connect(url).await;
    let mut b = ws_connect(url).await;
    join(&mut b, "D").await;
    // "a sender need not have joined to speak": b gets it, a (not a member) does not.
    send_text(&mut a, say_msg("D", "from outside")).await;
    match ws_next_within(&mut b, WAIT).await {
        Some(Got::Json(v)) => assert_eq!(said(&v, "D").1, "from outside"),
        other => panic!(
            "a member did not get a non-member's say ({other:?}); the sender got {:?}",
            ws_next_within(&mut a, Duration::from_millis(300)).await
        ),
    }
    assert!(
        ws_next_within(&mut a, Duration::from_millis(300))
            .await
            .is_none(),
        "a non-member got the room's message"
    );
    let without_action = [
        ("not json", "expected a JSON object"),
        ("[1,2]", "expected a JSON object"),
        (r#"{"room":"D"}"#, "unknown action"),
    ];
    let with_action = [
        (r#"{"action":"dance","room":"D"}"#, "unknown action"),
        (r#"{"action":"join"}"#, "missing room"),
        (r#"{"action":"join","room":""}"#, "missing room"),
        (r#"{"action":"say","room":"D"}"#, "missing text"),
    ];
    let cases = with_action.iter().chain(if embedded {
        &[][..]
    } else {
        &without_action[..]
    });
    for &(msg, reason) in cases {
        send_text(&mut a, msg.to_string()).await;
        assert_eq!(
            next_json(&mut a).await,
            json!({"event": "error", "reason": reason}),
            "answer to {msg}"
        );
    }
    if !embedded {
        timeout(WAIT, a.send(Message::Binary(vec![1, 2, 3])))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            next_json(&mut a).await,
            json!({"event": "error", "reason": "expected a text message"})
        );
    }
    send_text(&mut b, json!({"action": "leave", "room": "D"}).to_string()).await;
    assert_eq!(
        next_json(&mut b).await,
        json!({"event": "left", "room": "D"}),
        "answer to leave"
    );
    send_text(&mut a, say_msg("D", "after leave")).await;
    assert!(
        ws_next_within(&mut b, Duration::from_millis(300))
            .await
            .is_none(),
        "a member that left still gets the room's messages"
    );
}

#[tokio::test]
async fn documented_contract_details_python_backend() {
    let backend = BackendProc::spawn(Example::Python, "127.0.0.1:0");
    let gw = Gateway::start(&["--upstream", &backend.upstream_url()]);
    contract_details(&chat_url(&gw, "/chat"), false).await;
}

#[tokio::test]
async fn documented_contract_details_rust_backend() {
    let backend = BackendProc::spawn(Example::Rust, "127.0.0.1:0");
    let gw = Gateway::start(&["--upstream", &backend.upstream_url()]);
    contract_details(&chat_url(&gw, "/chat"), false).await;
}

#[tokio::test]
async fn documented_contract_details_embedded_upstream() {
    let gw = Gateway::start(&[]);
    contract_details(&chat_url(&gw, "/chat"), true).await;
}

// ----- 3: the backend dies mid-traffic and comes back -----

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Closed(Option<u16>, String),
    Ended(String),
    /// Neither a close nor the end of the stream before the deadline.
    Waiting,
}

/// Say something every 5 ms until the gateway closes the connection (or `limit` passes).
async fn flood_until_closed(mut ws: Ws, i: usize, limit: Duration) -> Outcome {
    let deadline = tokio::time::Instant::now() + limit;
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    let mut n = 0u64;
    let mut can_send = true;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return Outcome::Waiting,
            _ = tick.tick(), if can_send => {
                n += 1;
                let msg = Message::Text(say_msg("k", &format!("chatty {i} #{n}")));
                // A send may fail once the gateway closed; the close itself is what we wait for.
                if timeout(WAIT, ws.send(msg)).await.map_or(true, |r| r.is_err()) {
                    can_send = false;
                }
            }
            got = ws_next_within(&mut ws, Duration::from_secs(3600)) => match got {
                Some(Got::Close(code, reason)) => return Outcome::Closed(code, reason),
                Some(Got::Ended(why)) => return Outcome::Ended(why),
                _ => {}
            },
        }
    }
}

/// Read `said` events until every text in `want` arrived; returns them in arrival order,
/// with everything else that arrived in between.
async fn read_until_said(ws: &mut Ws, want: &[String], limit: Duration) -> Vec<String> {
    let deadline = Instant::now() + limit;
    let mut seen = Vec::new();
    while !want.iter().all(|w| seen.contains(w)) {
        let left = deadline.saturating_duration_since(Instant::now());
        match ws_next_within(ws, left).await {
            Some(Got::Json(v)) => seen.push(said(&v, "k").1),
            None => panic!("waited {limit:?} for {want:?}; got only {seen:?}"),
            Some(other) => panic!("waiting for {want:?} (got {seen:?}), then {other:?}"),
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_killed_mid_traffic_then_restarted() {
    let mut backend = BackendProc::spawn(Example::Python, "127.0.0.1:0");
    let addr = backend.addr.clone();
    let gw = Gateway::with_config(
        &format!(
            "[[upstreams]]\nname = \"chat\"\nbackends = [\"tcp://{addr}\"]\nbuffer_messages = 50\n\n\
             [[routes]]\npath = \"/chat\"\nupstream = \"chat\"\n"
        ),
        &[],
    );
    wait_log(&gw, "backend link up", 1, WAIT).await;
    let url = chat_url(&gw, "/chat");
    const QUIET: usize = 2;
    const CHATTY: usize = 3;
    let mut clients = Vec::new();
    for _ in 0..QUIET + CHATTY {
        let mut ws = ws_connect(&url).await;
        join(&mut ws, "k").await;
        clients.push(ws);
    }
    // Everything works before the backend dies.
    send_text(&mut clients[0], say_msg("k", "before")).await;
    for ws in &mut clients {
        assert_eq!(said(&next_json(ws).await, "k").1, "before");
    }

    backend.kill();
    wait_log(&gw, "backend link lost", 1, WAIT).await;
    // Let the link thread notice before the next writes (a write racing the loss may be lost
    // with the socket; the document promises buffering only while the link is down).
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Quiet clients say one thing each while the backend is away: it waits in the buffer.
    let mut chatty = clients.split_off(QUIET);
    let mut quiet = clients;
    let during: Vec<String> = (0..QUIET).map(|q| format!("quiet {q} during")).collect();
    for (ws, text) in quiet.iter_mut().zip(&during) {
        send_text(ws, say_msg("k", text)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Chatty clients flood: the 50-message buffer fills and they are closed 1013.
    let flooders: Vec<_> = chatty
        .drain(..)
        .enumerate()
        .map(|(i, ws)| tokio::spawn(flood_until_closed(ws, i, Duration::from_secs(15))))
        .collect();
    for (i, f) in flooders.into_iter().enumerate() {
        let outcome = f.await.expect("flooder panicked");
        match &outcome {
            Outcome::Closed(Some(1013), _) => {}
            other => panic!(
                "chatty client {i}: expected close 1013 once the buffer filled, got {other:?}"
            ),
        }
    }

    // The backend comes back on the same port; the gateway reconnects on its own.
    let _backend = BackendProc::spawn(Example::Python, &addr);
    let log = wait_log(&gw, "backend link up", 2, Duration::from_secs(15)).await;
    assert!(
        log.contains("backend unreachable"),
        "no failed reconnect attempt logged while the backend was down:\n{log}"
    );

    // The buffered messages reach the new backend (the quiet ones first: they were buffered
    // first), and the quiet clients' new messages are answered again.
    for (q, ws) in quiet.iter_mut().enumerate() {
        let seen = read_until_said(ws, &during, Duration::from_secs(15)).await;
        let mut first: Vec<_> = seen[..QUIET].to_vec();
        first.sort();
        assert_eq!(
            first, during,
            "quiet client {q}: buffered messages out of order: {seen:?}"
        );
    }
    for q in 0..QUIET {
        let after = format!("quiet {q} after");
        send_text(&mut quiet[q], say_msg("k", &after)).await;
        for ws in &mut quiet {
            read_until_said(ws, std::slice::from_ref(&after), WAIT).await;
        }
    }
}

// ----- 4: a backend that sends garbage -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_garbage_resets_the_link_and_gateway_keeps_serving() {
    let (listener, addr) = fake_listener();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    // The test tells the fake backend when the gateway has taken its hello (logged "backend
    // link up"): junk in the same read as the hello is lost (see frames_right_after_hello_are_read).
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let backend = std::thread::spawn(move || {
        // Link 1: text where a frame should be (its length prefix is ~1.2 GB, over the
        // limit); link 2: a well-sized frame of an unknown type. Each must be dropped.
        let mut dropped = Vec::new();
        for junk in [
            b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec(),
            relay_frame(0x7f, b"junk"),
        ] {
            let mut link = FakeLink::accept(&listener, WAIT).expect("a link");
            link.handshake();
            go_rx.recv_timeout(WAIT).expect("go");
            link.write(&junk);
            dropped.push(link.read_until_closed(WAIT).is_ok());
        }
        // Link 3: well-behaved; greets every client it is told about.
        let mut link = FakeLink::accept(&listener, Duration::from_secs(15)).expect("a third link");
        link.handshake();
        let mut greeted = 0;
        while done_rx.try_recv().is_err() {
            match link.read_non_ping(Duration::from_millis(100)) {
                Some(f) if f.ty == T_OPEN => {
                    link.write(&send_frame(f.conn(), r#"{"event":"welcome"}"#));
                    greeted += 1;
                }
                _ => {}
            }
        }
        (dropped, greeted)
    });
    let gw = Gateway::with_config(
        &format!(
            "[[upstreams]]\nname = \"bad\"\nbackends = [\"tcp://{addr}\"]\n\n\
             [[upstreams]]\nname = \"local\"\nbackends = [\"echo\"]\n\n\
             [[routes]]\npath = \"/chat\"\nupstream = \"bad\"\n\n\
             [[routes]]\npath = \"/echo\"\nupstream = \"local\"\n"
        ),
        &[],
    );
    for n in 1..=2 {
        wait_log(&gw, "backend link up", n, Duration::from_secs(15)).await;
        go_tx.send(()).unwrap();
        wait_log(&gw, "invalid frame", n, WAIT).await;
    }
    let log = wait_log(&gw, "backend link up", 3, Duration::from_secs(15)).await;
    // The embedded route was never affected.
    let mut echo = ws_connect(&chat_url(&gw, "/echo")).await;
    send_text(&mut echo, "plain echo".into()).await;
    match ws_next_within(&mut echo, WAIT).await {
        Some(Got::Other(Message::Text(t))) => assert_eq!(t, "plain echo"),
        other => panic!("expected the echo, got {other:?}"),
    }
    // A new client of the backend route connects and is served over the new link.
    let mut chat = ws_connect(&chat_url(&gw, "/chat")).await;
    assert_eq!(next_json(&mut chat).await, json!({"event": "welcome"}));
    done_tx.send(()).unwrap();
    let (dropped, greeted) = backend.join().expect("fake backend panicked");
    assert_eq!(
        dropped,
        [true, true],
        "the gateway kept a link after garbage"
    );
    assert_eq!(greeted, 1);
    assert!(
        log.lines()
            .any(|l| l.contains("invalid frame") && l.contains("ERROR")),
        "the invalid frame is logged as an error:\n{log}"
    );
}

/// docs/relay-protocol.md "Errors": the peer that sees a protocol error "sends `error` with a
/// reason if it can, logs it, and closes the link".
#[tokio::test]
async fn backend_garbage_is_answered_with_an_error_frame() {
    let (listener, addr) = fake_listener();
    let gw = Gateway::start(&["--upstream", &format!("tcp://{addr}")]);
    let mut link = FakeLink::accept(&listener, WAIT).expect("a link");
    link.handshake();
    wait_log(&gw, "backend link up", 1, WAIT).await;
    link.write(&relay_frame(0x7f, b"junk"));
    let frames = link
        .read_until_closed(WAIT)
        .expect("the gateway keeps the link open after garbage");
    let errors: Vec<String> = frames
        .iter()
        .filter(|f| f.ty == T_ERROR)
        .map(|f| String::from_utf8_lossy(&f.body[2..]).into_owned())
        .collect();
    assert!(
        errors.len() == 1 && !errors[0].is_empty(),
        "expected one `error` frame with a reason before the close, got {frames:?}; gateway log:\n{}",
        gw.log()
    );
}

// ----- 5: a slow consumer in a busy room -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_is_closed_1008_and_fast_one_unaffected() {
    // The close linger is long so the slow client, reading again late, still finds the close.
    let gw = Gateway::with_config("send_queue_bytes = 65536\nclose_linger_ms = 15000\n", &[]);
    let url = chat_url(&gw, "/chat");
    // A small receive buffer, so the kernel holds little for the client that stops reading.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(8192).unwrap();
    let stream = timeout(WAIT, socket.connect(gw.addr))
        .await
        .expect("connect timed out")
        .expect("connect");
    let (mut slow, _) = timeout(WAIT, tokio_tungstenite::client_async(url.as_str(), stream))
        .await
        .expect("handshake timed out")
        .expect("handshake");
    join(&mut slow, "big").await;
    let mut fast = ws_connect(&url).await;
    join(&mut fast, "big").await;

    // 200 says of 48 KiB: ~9.6 MiB, well past the slow client's kernel buffers and the 64 KiB
    // send queue. The fast client gets each of its own says back before the next.
    const N: usize = 200;
    let filler = "x".repeat(48 * 1024);
    let started = Instant::now();
    for i in 0..N {
        send_text(&mut fast, say_msg("big", &format!("{i:05} {filler}"))).await;
        let (_, text) = said(&next_json(&mut fast).await, "big");
        assert_eq!(
            &text[..5],
            format!("{i:05}"),
            "fast client's says out of order"
        );
    }
    let fast_took = started.elapsed();

    // The slow client reads again: an in-order prefix of the says, then close 1008.
    let mut got = 0;
    let close = loop {
        match ws_next_within(&mut slow, WAIT).await {
            Some(Got::Json(v)) => {
                let (_, text) = said(&v, "big");
                assert_eq!(
                    &text[..5],
                    format!("{got:05}"),
                    "slow client: gap or reorder"
                );
                got += 1;
            }
            Some(Got::Close(code, reason)) => break (code, reason),
            other => panic!("slow client after {got} says: expected close 1008, got {other:?}"),
        }
    };
    assert_eq!(close, (Some(1008), "slow consumer".to_string()));
    assert!(got < N, "the slow client was never behind ({got} of {N})");
    eprintln!("slow consumer: got {got} of {N} says before close 1008; fast client's {N} round trips took {fast_took:?}");
    // The fast client is still served.
    send_text(&mut fast, say_msg("big", "still fast")).await;
    assert_eq!(said(&next_json(&mut fast).await, "big").1, "still fast");
}

// ----- 6: inbound backpressure from a backend that stops reading -----

/// A backend that greets the gateway and then never reads again; it pings now and then so
/// the link is not dropped for silence.
struct StuckBackend {
    addr: std::net::SocketAddr,
    done: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl StuckBackend {
    fn start() -> StuckBackend {
        let (listener, addr) = fake_listener();
        let (done, done_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let mut link = FakeLink::accept(&listener, WAIT).expect("a link");
            link.handshake();
            while done_rx.recv_timeout(Duration::from_secs(2)).is_err() {
                link.write(&relay_frame(T_PING, &7u64.to_be_bytes()));
            }
        });
        StuckBackend { addr, done, thread }
    }

    fn stop(self) {
        self.done.send(()).unwrap();
        let _ = self.thread.join();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_that_stops_reading_bounds_gateway_memory() {
    let backend = StuckBackend::start();
    let addr = backend.addr;
    let gw = Gateway::with_config(
        &format!(
            "[[upstreams]]\nname = \"stuck\"\nbackends = [\"tcp://{addr}\"]\nbuffer_messages = 100\n\n\
             [[routes]]\npath = \"/*\"\nupstream = \"stuck\"\n"
        ),
        &[],
    );
    wait_log(&gw, "backend link up", 1, WAIT).await;
    let ws = ws_connect(&chat_url(&gw, "/flood")).await;
    let rss_before = proc_status_kib(gw.pid(), "VmRSS");

    let (mut tx, mut rx) = ws.split();
    let reader = tokio::spawn(async move {
        loop {
            match rx.next().await {
                Some(Ok(Message::Close(f))) => return Some(f.map(|f| u16::from(f.code))),
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return None,
            }
        }
    });
    const MSG: usize = 60 * 1024;
    const TOTAL: usize = 200 << 20;
    let payload = vec![0x5au8; MSG];
    let mut sent = 0usize;
    let started = Instant::now();
    let stalled = loop {
        if sent >= TOTAL || reader.is_finished() || started.elapsed() > Duration::from_secs(20) {
            break false;
        }
        match timeout(
            Duration::from_secs(2),
            tx.send(Message::Binary(payload.clone())),
        )
        .await
        {
            Err(_) => break true,
            Ok(Err(_)) => break false,
            Ok(Ok(())) => sent += MSG,
        }
    };
    let flood_took = started.elapsed();
    // Give a close that is on its way a moment to arrive.
    let close = timeout(Duration::from_secs(5), reader)
        .await
        .ok()
        .and_then(|r| r.ok())
        .flatten();
    let hwm = proc_status_kib(gw.pid(), "VmHWM");
    let rss_after = proc_status_kib(gw.pid(), "VmRSS");
    backend.stop();
    let grew_mib = hwm.saturating_sub(rss_before) / 1024;
    eprintln!(
        "inbound backpressure: client wrote {} MiB in {flood_took:?}; writes stalled: {stalled}; \
         close: {close:?}; RSS {} MiB before, peak {} MiB, {} MiB after",
        sent >> 20,
        rss_before / 1024,
        hwm / 1024,
        rss_after / 1024
    );
    assert!(
        grew_mib < 64,
        "gateway RSS grew by {grew_mib} MiB (peak) while the client wrote {} MiB to a backend \
         that reads nothing; stalled: {stalled}, close: {close:?}",
        sent >> 20
    );
    assert!(
        stalled || close == Some(Some(1013)),
        "the client neither stalled nor got 1013 (wrote {} MiB, close {close:?})",
        sent >> 20
    );
}

// ----- 7: `gone` for connections the backend should not name -----

fn subscribe_frame(conn: u64, topic: &str) -> Vec<u8> {
    let mut body = conn.to_be_bytes().to_vec();
    body.extend(rstring(topic));
    relay_frame(T_SUBSCRIBE, &body)
}

fn close_frame(conn: u64, code: u16) -> Vec<u8> {
    let mut body = conn.to_be_bytes().to_vec();
    body.extend_from_slice(&code.to_be_bytes());
    body.extend(rstring(""));
    relay_frame(T_CLOSE, &body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_for_unknown_connections_get_gone() {
    let (listener, addr) = fake_listener();
    let gw = Gateway::start(&["--upstream", &format!("tcp://{addr}")]);
    let mut link = FakeLink::accept(&listener, WAIT).expect("a link");
    link.handshake();
    // Only once the gateway has taken our hello (see frames_right_after_hello_are_read).
    wait_log(&gw, "backend link up", 1, WAIT).await;
    let never = 0x00de_adbe_ef00_1234u64;
    for (what, frame) in [
        ("send", send_frame(never, "{}")),
        ("subscribe", subscribe_frame(never, "room:x")),
        ("close", close_frame(never, 1000)),
        ("accept", relay_frame(T_ACCEPT, &never.to_be_bytes())),
    ] {
        link.write(&frame);
        let got = link.read_non_ping(WAIT);
        assert_eq!(
            got.as_ref().map(|f| (f.ty, f.conn())),
            Some((T_GONE, never)),
            "answer to `{what}` for a connection that never existed: {got:?}"
        );
    }

    // A connection that existed, then closed.
    let mut ws = ws_connect(&chat_url(&gw, "/chat")).await;
    let open = link.read_non_ping(WAIT).expect("open");
    assert_eq!(open.ty, T_OPEN, "{open:?}");
    let conn = open.conn();
    link.write(&send_frame(conn, r#"{"hi":1}"#));
    assert_eq!(next_json(&mut ws).await, json!({"hi": 1}));
    ws.close(None).await.unwrap();
    let closed = link.read_non_ping(WAIT).expect("close");
    assert_eq!((closed.ty, closed.conn()), (T_CLOSE, conn), "{closed:?}");
    link.write(&send_frame(conn, r#"{"too":"late"}"#));
    let got = link.read_non_ping(WAIT);
    assert_eq!(
        got.as_ref().map(|f| (f.ty, f.conn())),
        Some((T_GONE, conn)),
        "answer to `send` for a closed connection: {got:?}"
    );
    // The link survived all of it: no reconnect happened.
    assert_eq!(
        gw.log().matches("backend link up").count(),
        1,
        "{}",
        gw.log()
    );
}

/// docs/relay-protocol.md "Handshake": the backend answers with its hello, after which any
/// frame may follow at once. Here a ping shares the hello's write (and so, on loopback, the
/// gateway's read): it must still be answered.
#[test]
fn frames_right_after_hello_are_read() {
    let (listener, addr) = fake_listener();
    let gw = Gateway::start(&["--upstream", &format!("tcp://{addr}")]);
    let mut link = FakeLink::accept(&listener, WAIT).expect("a link");
    let hello = link.read_frame().expect("the gateway's hello");
    assert_eq!(hello.ty, T_HELLO);
    let nonce = 0x0123_4567_89ab_cdefu64;
    let mut bytes = hello_frame("eager-backend");
    bytes.extend(relay_frame(T_PING, &nonce.to_be_bytes()));
    link.write(&bytes);
    let got = link.read_non_ping(WAIT);
    assert_eq!(
        got,
        Some(RelayFrame {
            ty: T_PONG,
            body: nonce.to_be_bytes().to_vec()
        }),
        "the ping sent with the hello was not answered; gateway log:\n{}",
        gw.log()
    );
}

/// One backend that stops reading must not stall clients of other routes: the embedded echo
/// on `/echo` keeps answering while `/flood`'s backend is stuck.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_backend_does_not_stall_other_routes() {
    let backend = StuckBackend::start();
    let addr = backend.addr;
    let gw = Gateway::with_config(
        &format!(
            "[[upstreams]]\nname = \"stuck\"\nbackends = [\"tcp://{addr}\"]\nbuffer_messages = 100\n\n\
             [[upstreams]]\nname = \"local\"\nbackends = [\"echo\"]\n\n\
             [[routes]]\npath = \"/flood\"\nupstream = \"stuck\"\n\n\
             [[routes]]\npath = \"/echo\"\nupstream = \"local\"\n"
        ),
        &[],
    );
    wait_log(&gw, "backend link up", 1, WAIT).await;
    let mut echo = ws_connect(&chat_url(&gw, "/echo")).await;
    send_text(&mut echo, "before".into()).await;
    assert!(
        matches!(ws_next_within(&mut echo, WAIT).await, Some(Got::Other(Message::Text(t))) if t == "before")
    );

    // 64 MiB at the stuck backend: far more than the link's socket buffers and its
    // 100-message buffer hold.
    let mut flood = ws_connect(&chat_url(&gw, "/flood")).await;
    let payload = vec![0xa5u8; 60 * 1024];
    let started = Instant::now();
    let mut sent = 0usize;
    while sent < 64 << 20 && started.elapsed() < Duration::from_secs(10) {
        match timeout(
            Duration::from_secs(2),
            flood.send(Message::Binary(payload.clone())),
        )
        .await
        {
            Ok(Ok(())) => sent += payload.len(),
            _ => break,
        }
    }
    send_text(&mut echo, "during".into()).await;
    let got = ws_next_within(&mut echo, WAIT).await;
    backend.stop();
    assert!(
        matches!(&got, Some(Got::Other(Message::Text(t))) if t == "during"),
        "the echo route stalled behind a stuck backend ({} MiB sent to it): got {got:?}",
        sent >> 20
    );
}

/// docs/relay-protocol.md "Reconnects": after a reconnect the backend gets `open` with replay
/// for every live connection, then the waiting messages; "connections closed while the link
/// was down get their `close` on the new link after their replayed `open`" — here one closed
/// 1013 because the buffer filled, the case where the close is most likely to be dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_closed_during_outage_are_closed_after_reconnect() {
    let (listener, addr) = fake_listener();
    let gw = Gateway::with_config(
        &format!(
            "[[upstreams]]\nname = \"b\"\nbackends = [\"tcp://{addr}\"]\nbuffer_messages = 5\n\n\
             [[routes]]\npath = \"/chat\"\nupstream = \"b\"\n"
        ),
        &[],
    );
    let mut link = FakeLink::accept(&listener, WAIT).expect("a link");
    link.handshake();
    wait_log(&gw, "backend link up", 1, WAIT).await;
    let url = chat_url(&gw, "/chat");
    let flooder = ws_connect(&url).await;
    let a = link.read_non_ping(WAIT).expect("open for a");
    assert_eq!(a.ty, T_OPEN);
    let mut stayer = ws_connect(&url).await;
    let b = link.read_non_ping(WAIT).expect("open for b");
    assert_eq!(b.ty, T_OPEN);
    let (a, b) = (a.conn(), b.conn());

    // The backend goes away; its next connection attempt waits unanswered in our backlog.
    drop(link);
    wait_log(&gw, "backend link lost", 1, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    send_text(&mut stayer, "kept for later".into()).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let outcome = flood_until_closed(flooder, 0, Duration::from_secs(10)).await;
    assert!(
        matches!(outcome, Outcome::Closed(Some(1013), _)),
        "flooder: {outcome:?}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut link = FakeLink::accept(&listener, WAIT).expect("the reconnect");
    link.handshake();
    let mut frames = Vec::new();
    while let Some(f) = link.read_non_ping(Duration::from_secs(2)) {
        frames.push(f);
    }
    let summary: Vec<(u8, u64)> = frames.iter().map(|f| (f.ty, f.conn())).collect();
    // b: replayed (flag 0x02 set) first, and its waiting message delivered after.
    let b_open = frames
        .iter()
        .position(|f| f.ty == T_OPEN && f.conn() == b)
        .unwrap_or_else(|| panic!("no replayed open for the live connection: {summary:?}"));
    assert_eq!(frames[b_open].body[8] & 0x02, 0x02, "replay flag");
    let b_msg = frames
        .iter()
        .position(|f| f.ty == T_MESSAGE && f.conn() == b && f.body.ends_with(b"kept for later"))
        .unwrap_or_else(|| panic!("the buffered message of b is lost: {summary:?}"));
    assert!(b_open < b_msg, "message before its open: {summary:?}");
    // a: gone while the link was down, so either never replayed, or replayed then closed.
    let a_open = frames.iter().position(|f| f.ty == T_OPEN && f.conn() == a);
    let a_close = frames.iter().position(|f| f.ty == T_CLOSE && f.conn() == a);
    match (a_open, a_close) {
        (None, _) => {}
        (Some(o), Some(c)) if o < c => {}
        _ => panic!(
            "connection {a:#x}, closed 1013 during the outage, was replayed as open and never \
             closed (frames on the new link: {summary:?})"
        ),
    }
}

/// docs/relay-protocol.md "Handshake": the gateway "drops the link if [the backend's hello]
/// does not arrive within 5 seconds". Allow 8 s for a loaded machine.
#[test]
fn backend_that_never_says_hello_is_dropped_within_5_s() {
    let (listener, addr) = fake_listener();
    let gw = Gateway::start(&["--upstream", &format!("tcp://{addr}")]);
    let mut link = FakeLink::accept(&listener, WAIT).expect("a link");
    let hello = link.read_frame().expect("the gateway's hello");
    assert_eq!(hello.ty, T_HELLO);
    let started = Instant::now();
    let closed = link.read_until_closed(Duration::from_secs(8));
    assert!(
        closed.is_ok(),
        "the gateway still waits for our hello after {:?} (frames: {closed:?}); log:\n{}",
        started.elapsed(),
        gw.log()
    );
}

/// Connect authorization (docs/relay-protocol.md): the handshake waits for the upstream's
/// verdict; refused clients get its 401 and reason, accepted ones a working connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_authorization_accepts_and_rejects_at_the_handshake() {
    let config = "[[routes]]\npath = \"/private\"\nauthorize = true\n\n[[routes]]\npath = \"/*\"\n";
    let gw = Gateway::with_config(config, &[]);
    let request = |path: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
    };
    let (resp, body) = common::http_exchange(gw.addr, request("/private").as_bytes()).await;
    assert_eq!(resp.status, 401, "no token: {body}");
    assert!(body.contains("token required"), "{body}");

    let url = format!("ws://{}/private?token=abc", gw.addr);
    let (mut ws, _) = timeout(WAIT, tokio_tungstenite::connect_async(&url))
        .await
        .expect("handshake timed out")
        .expect("accepted with a token");
    ws.send(Message::text("hello")).await.unwrap();
    let reply = timeout(WAIT, ws.next())
        .await
        .expect("echo timed out")
        .unwrap()
        .unwrap();
    assert_eq!(reply, Message::text("hello"));

    // A path no route matches is refused at the handshake with 404.
    let config = "[[routes]]\npath = \"/only\"\n";
    let gw = Gateway::with_config(config, &[]);
    let (resp, body) = common::http_exchange(gw.addr, request("/other").as_bytes()).await;
    assert_eq!(resp.status, 404, "{body}");
}
