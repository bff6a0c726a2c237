//! Issue 11, relay side: nothing a backend (or a chat client through the embedded upstream)
//! does may stop, stall or grow the gateway. Each test runs the real binary against fake
//! backends (tests/common_relay), states the attack, checks the exact outcome (exit code and
//! time, close code, log line, counter in /metrics, RSS growth) and that another client is
//! still served.

mod common;
mod common_relay;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Gateway, WAIT};
use common_relay::*;
use futures_util::SinkExt;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;

const GRACE_MS: u64 = 1000;

fn url(gw: &Gateway, path: &str) -> String {
    format!("ws://{}{path}", gw.addr)
}

/// The text the embedded echo sends back, skipping anything else (broadcasts).
async fn echoed(ws: &mut Ws, text: &str, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match ws_next_within(ws, left).await {
            Some(Got::Other(Message::Text(t))) if t == text => return true,
            Some(Got::Close(..) | Got::Ended(_)) | None => return false,
            Some(_) => {}
        }
    }
    false
}

// ----- 1: bounded shutdown whatever the backend does -----

enum BackendFate {
    /// Accepts and serves the link, then dies (listener and link closed) before SIGTERM.
    Killed,
    /// Nothing ever listened on the port.
    NeverListened,
    /// Accepts, greets, then never reads again while clients send it megabytes.
    NeverReads,
}

/// Clients connected, the backend in `fate`, then SIGTERM: the process exits 0 within
/// `shutdown_grace_ms` + 1 s and every client got close 1001.
async fn shutdown_is_bounded(fate: BackendFate) {
    let (listener, addr) = fake_listener();
    let stop = Arc::new(AtomicBool::new(false));
    let backend = match fate {
        BackendFate::NeverListened => {
            drop(listener);
            None
        }
        BackendFate::Killed | BackendFate::NeverReads => {
            let reads = matches!(fate, BackendFate::Killed);
            let stop = stop.clone();
            Some(std::thread::spawn(move || {
                let mut link = FakeLink::accept(&listener, WAIT).expect("a link");
                link.handshake();
                while !stop.load(Ordering::Relaxed) {
                    if reads {
                        let _ = link.read_non_ping(Duration::from_millis(50));
                    } else {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
                // Killed: the link and the listener go away here.
                drop(link);
                drop(listener);
            }))
        }
    };
    let upstream = format!("tcp://{addr}");
    let mut gw = Gateway::with_config(
        &format!("shutdown_grace_ms = {GRACE_MS}\n"),
        &["--upstream", &upstream],
    );
    if backend.is_some() {
        wait_log(&gw, "backend link up", 1, WAIT).await;
    }
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(ws_connect(&gw.url()).await);
    }
    if matches!(fate, BackendFate::NeverReads) {
        // Far more than the socket buffers hold: the link's writer blocks on the backend.
        let payload = vec![0x5au8; 60 * 1024];
        for ws in clients.iter_mut() {
            for _ in 0..40 {
                let _ = timeout(
                    Duration::from_secs(2),
                    ws.send(Message::Binary(payload.clone())),
                )
                .await;
            }
        }
    }
    if matches!(fate, BackendFate::Killed) {
        stop.store(true, Ordering::Relaxed);
        if let Some(b) = backend {
            b.join().unwrap();
        }
        wait_log(&gw, "backend link lost", 1, WAIT).await;
    }
    // The clients answer the gateway's close while the process drains.
    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                loop {
                    match ws_next_within(&mut ws, WAIT).await {
                        Some(Got::Close(code, _)) => return code,
                        Some(Got::Ended(_)) | None => return None,
                        Some(_) => {}
                    }
                }
            })
        })
        .collect();
    let started = Instant::now();
    gw.signal(libc::SIGTERM);
    let limit = Duration::from_millis(GRACE_MS + 1000);
    let (gw, status) = tokio::task::spawn_blocking(move || {
        let status = gw.wait_exit(limit + Duration::from_secs(10));
        (gw, status)
    })
    .await
    .unwrap();
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut codes = Vec::new();
    for r in readers {
        codes.push(r.await.unwrap());
    }
    eprintln!("exit {status:?} after {took:?}; clients got {codes:?}");
    let status =
        status.unwrap_or_else(|| panic!("still running 11 s after SIGTERM:\n{}", gw.log()));
    assert!(status.success(), "exit status {status:?}:\n{}", gw.log());
    assert!(
        took <= limit,
        "exit took {took:?}, more than grace + 1 s ({limit:?}):\n{}",
        gw.log()
    );
    assert!(
        codes.iter().all(|c| *c == Some(1001)),
        "every client must get 1001: {codes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_killed_backend_exits_in_grace_plus_1s() {
    shutdown_is_bounded(BackendFate::Killed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_backend_that_never_listened_exits_in_grace_plus_1s() {
    shutdown_is_bounded(BackendFate::NeverListened).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_backend_that_never_reads_exits_in_grace_plus_1s() {
    shutdown_is_bounded(BackendFate::NeverReads).await;
}

// ----- 2: a backend that floods pings and never reads its pongs -----

/// `/fake` to the fake backend at `addr`, `/echo` to the embedded upstream; `route` is added
/// to both routes.
fn two_routes(addr: std::net::SocketAddr, route: &str) -> String {
    format!(
        "[[upstreams]]\nname = \"fake\"\nbackends = [\"tcp://{addr}\"]\n\n\
         [[upstreams]]\nname = \"local\"\nbackends = [\"echo\"]\n\n\
         [[routes]]\npath = \"/fake\"\nupstream = \"fake\"\n{route}\n\n\
         [[routes]]\npath = \"/echo\"\nupstream = \"local\"\n{route}\n"
    )
}

/// The backend writes pings as fast as it can for 3 s and reads nothing: the link is dropped
/// ("does not read what we send"), counted in ringway_upstream_stalled, re-established (the
/// second link behaves), RSS grows < 64 MiB, and an echo client is served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_flood_without_reading_resets_the_link_and_bounds_memory() {
    let (listener, addr) = fake_listener();
    let flooding = std::thread::spawn(move || {
        let mut link = FakeLink::accept(&listener, WAIT).expect("a link");
        link.handshake();
        let mut batch = Vec::new();
        for i in 0..4096u64 {
            batch.extend(relay_frame(T_PING, &i.to_be_bytes()));
        }
        let started = Instant::now();
        let mut sent = 0usize;
        while started.elapsed() < Duration::from_secs(3) {
            use std::io::Write;
            match link.stream.write_all(&batch) {
                Ok(()) => sent += 4096,
                Err(_) => break,
            }
        }
        // The gateway comes back on a new link; this one reads and answers.
        let second = FakeLink::accept(&listener, WAIT);
        (
            sent,
            second.map(|mut l| {
                l.handshake();
                l
            }),
        )
    });
    let gw = Gateway::with_config(&two_routes(addr, ""), &["--admin", "127.0.0.1:0"]);
    let admin = admin_addr(&gw);
    wait_log(&gw, "backend link up", 1, WAIT).await;
    let mut echo = ws_connect(&url(&gw, "/echo")).await;
    let rss_before = proc_status_kib(gw.pid(), "VmRSS");
    let started = Instant::now();
    let mut served = 0;
    while started.elapsed() < Duration::from_secs(3) {
        let text = format!("tick {served}");
        send_text(&mut echo, text.clone()).await;
        assert!(echoed(&mut echo, &text, WAIT).await, "echo stalled");
        served += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (sent, second) = tokio::task::spawn_blocking(move || flooding.join().unwrap())
        .await
        .unwrap();
    let hwm = proc_status_kib(gw.pid(), "VmHWM");
    let grew_mib = hwm.saturating_sub(rss_before) / 1024;
    eprintln!(
        "ping flood: {sent} pings sent; RSS {} MiB before, peak {} MiB; {served} echoes",
        rss_before / 1024,
        hwm / 1024
    );
    let log = wait_log(&gw, "backend does not read what we send", 1, WAIT).await;
    assert!(grew_mib < 64, "RSS grew {grew_mib} MiB under a ping flood");
    assert!(second.is_some(), "the link was not re-established:\n{log}");
    wait_log(&gw, "backend link up", 2, WAIT).await;
    let stalled = scrape(
        &admin,
        &format!("ringway_upstream_stalled_total{{upstream=\"fake\",backend=\"tcp://{addr}\"}}"),
    );
    assert!(
        stalled >= Some(1.0),
        "ringway_upstream_stalled: {stalled:?}"
    );
    // A client of the re-established link is served.
    let mut link = second.unwrap();
    let _client = ws_connect(&url(&gw, "/fake")).await;
    // (The batch whose write failed, pongs included, is sent again first.)
    let open = tokio::task::spawn_blocking(move || loop {
        match link.read_non_ping(WAIT) {
            Some(f) if f.ty == T_PONG => continue,
            other => return other,
        }
    })
    .await
    .unwrap()
    .expect("an open on the new link");
    assert_eq!(open.ty, T_OPEN, "{open:?}");
    send_text(&mut echo, "after".into()).await;
    assert!(echoed(&mut echo, "after", WAIT).await);
}

// ----- 3: a backend broadcast flood to slow readers -----

/// 50 clients that never read (kept: `slow_consumer = "drop-newest"`, so their 1 MiB queues stay
/// full); the backend floods 64 KiB broadcasts for 3 s. The inboxes are bounded (the link
/// reader waits, so TCP slows the backend), RSS grows < 160 MiB, and a fresh client is
/// answered by the embedded echo.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_flood_to_slow_readers_bounds_memory() {
    let (listener, addr) = fake_listener();
    let gw = Gateway::with_config(
        &two_routes(addr, "slow_consumer = \"drop-newest\""),
        &["--admin", "127.0.0.1:0"],
    );
    let admin = admin_addr(&gw);
    let flooding = std::thread::spawn(move || {
        let mut link = FakeLink::accept(&listener, WAIT).expect("a link");
        link.handshake();
        link.stream
            .set_write_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        let frame = broadcast_frame(&vec![0xb7u8; 64 * 1024]);
        let started = Instant::now();
        let mut sent = 0usize;
        while started.elapsed() < Duration::from_secs(3) {
            use std::io::Write;
            match link.stream.write_all(&frame) {
                Ok(()) => sent += 1,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => break,
            }
        }
        (sent, link)
    });
    wait_log(&gw, "backend link up", 1, WAIT).await;
    let mut slow = Vec::new();
    for _ in 0..50 {
        slow.push(ws_connect(&url(&gw, "/fake")).await);
    }
    let rss_before = proc_status_kib(gw.pid(), "VmRSS");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // While the flood goes on, a fresh client is served.
    let t = Instant::now();
    let mut fresh = ws_connect(&url(&gw, "/echo")).await;
    send_text(&mut fresh, "fresh".into()).await;
    let answered = echoed(&mut fresh, "fresh", WAIT).await;
    let took = t.elapsed();
    let (sent, _link) = tokio::task::spawn_blocking(move || flooding.join().unwrap())
        .await
        .unwrap();
    let hwm = proc_status_kib(gw.pid(), "VmHWM");
    let grew_mib = hwm.saturating_sub(rss_before) / 1024;
    let dropped = scrape(&admin, "ringway_relay_inbox_dropped_total");
    eprintln!(
        "broadcast flood: {sent} x 64 KiB sent; RSS {} MiB before, peak {} MiB; fresh client \
         answered {answered} in {took:?}; inbox dropped {dropped:?}",
        rss_before / 1024,
        hwm / 1024
    );
    assert!(answered, "a fresh client was not answered during the flood");
    assert!(
        grew_mib < 160,
        "RSS grew {grew_mib} MiB under a broadcast flood"
    );
    drop(slow);
}

// ----- 4: state a client can make large in the relay -----

/// One client sends 100 chat joins with ~64 KiB room names: each is refused with the chat
/// contract's error "room name too long" and counted; 101 short joins: the 101st gets "too
/// many rooms" (max_subscriptions = 100). RSS grows < 32 MiB; ringway_relay_buffer_bytes
/// shows the bytes held (the connections' stored opens and the 100 rooms) and nothing for
/// the refused names; another client is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_room_names_are_refused_and_held_bytes_are_metered() {
    let gw = Gateway::start(&["--admin", "127.0.0.1:0"]);
    let admin = admin_addr(&gw);
    let mut ws = ws_connect(&gw.url()).await;
    let rss_before = proc_status_kib(gw.pid(), "VmRSS");
    let deadline = Instant::now() + WAIT;
    let held_before = loop {
        // The connection's stored open is held once the relay has it.
        let held = scrape(&admin, "ringway_relay_buffer_bytes").expect("the relay gauge");
        if held > 0.0 {
            break held;
        }
        assert!(
            Instant::now() < deadline,
            "no bytes held for an open connection"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for i in 0..100 {
        let room = format!("{i:03}{}", "r".repeat(65_000));
        send_text(&mut ws, join_msg(&room)).await;
        let got = next_json(&mut ws).await;
        assert_eq!(
            got,
            serde_json::json!({"event": "error", "reason": "room name too long"}),
            "join {i}"
        );
    }
    let rss_after = proc_status_kib(gw.pid(), "VmRSS");
    let refused = scrape(
        &admin,
        "ringway_relay_limit_refusals_total{reason=\"topic_length\"}",
    );
    assert_eq!(refused, Some(100.0));
    let held = scrape(&admin, "ringway_relay_buffer_bytes").unwrap();
    assert!(
        held < held_before + 4096.0,
        "refused names are not held: {held_before} -> {held}"
    );
    for i in 0..100 {
        join(&mut ws, &format!("room-{i}")).await;
    }
    send_text(&mut ws, join_msg("one-too-many")).await;
    assert_eq!(
        next_json(&mut ws).await,
        serde_json::json!({"event": "error", "reason": "too many rooms"})
    );
    assert_eq!(
        scrape(
            &admin,
            "ringway_relay_limit_refusals_total{reason=\"rooms\"}"
        ),
        Some(1.0)
    );
    let held_rooms = scrape(&admin, "ringway_relay_buffer_bytes").unwrap();
    assert!(
        held_rooms >= held + 100.0 * 6.0,
        "100 rooms are metered: {held} -> {held_rooms}"
    );
    let grew_mib = rss_after.saturating_sub(rss_before) / 1024;
    eprintln!(
        "long rooms: RSS {} -> {} KiB; relay bytes {held_before} -> {held} -> {held_rooms}",
        rss_before, rss_after
    );
    assert!(grew_mib < 32, "RSS grew {grew_mib} MiB");
    let mut other = ws_connect(&gw.url()).await;
    send_text(&mut other, "still here".into()).await;
    assert!(echoed(&mut other, "still here", WAIT).await);
    // Closing releases what the relay held for the first client.
    drop(ws);
    let deadline = Instant::now() + WAIT;
    loop {
        let now = scrape(&admin, "ringway_relay_buffer_bytes").unwrap();
        if now <= held_before {
            break;
        }
        assert!(Instant::now() < deadline, "still held after close: {now}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A backend that subscribes a connection to a 64 KiB topic and publishes to one: both are
/// ignored and counted (ringway_relay_limit_refusals{reason="topic_length"}), the link stays
/// up and the client still gets the backend's next message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_over_long_topics_are_ignored_and_counted() {
    let (listener, addr) = fake_listener();
    let upstream = format!("tcp://{addr}");
    let gw = Gateway::start(&["--upstream", &upstream, "--admin", "127.0.0.1:0"]);
    let admin = admin_addr(&gw);
    let mut link = tokio::task::spawn_blocking(move || {
        let mut l = FakeLink::accept(&listener, WAIT).expect("a link");
        l.handshake();
        l
    })
    .await
    .unwrap();
    let mut ws = ws_connect(&gw.url()).await;
    let (open, mut link) = tokio::task::spawn_blocking(move || (link.read_non_ping(WAIT), link))
        .await
        .unwrap();
    let conn = open.expect("open").conn();
    let long = "t".repeat(64 * 1024 - 1);
    let mut sub = conn.to_be_bytes().to_vec();
    sub.extend(rstring(&long));
    link.write(&relay_frame(T_SUBSCRIBE, &sub));
    let mut publish = rstring(&long);
    publish.push(1);
    publish.extend_from_slice(&2u32.to_be_bytes());
    publish.extend_from_slice(b"hi");
    link.write(&relay_frame(T_PUBLISH, &publish));
    link.write(&send_frame(conn, "after"));
    match ws_next_within(&mut ws, WAIT).await {
        Some(Got::Other(Message::Text(t))) => assert_eq!(t, "after"),
        other => panic!("expected the backend's send, got {other:?}"),
    }
    assert_eq!(
        scrape(
            &admin,
            "ringway_relay_limit_refusals_total{reason=\"topic_length\"}"
        ),
        Some(2.0)
    );
    assert!(!gw.log().contains("backend link lost"), "{}", gw.log());
    let _ = ws.close(None).await;
}
