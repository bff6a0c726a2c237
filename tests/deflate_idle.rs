//! permessage-deflate `shared` keeps no compression state per connection: 2,000 idle
//! connections that negotiated deflate cost the gateway no more memory each than 2,000 that
//! did not (within 256 B), both in RSS and in the gateway's own exact accounting
//! (`ringway_buffer_bytes`, what the memory budget counts).
//!
//! RSS moves in pages and with the allocator's arenas, so each batch gets a fresh gateway,
//! batches of the two kinds are interleaved, and the medians of 3 are compared. Two settings
//! make RSS fine enough for a 256 B comparison (seen here): `MIMALLOC_ALLOW_THP=0`, since
//! mimalloc asks for transparent huge pages and RSS then moves in 2 MiB steps (1 KiB per
//! connection at 2,000); and one worker, since with two, SO_REUSEPORT splits each batch
//! differently and batches of one kind spread by ~500 B per connection (~70 B with one).

mod common;

use std::time::{Duration, Instant};

use common::{rss_bytes, Gateway, RawWs};
use futures_util::future::join_all;

const N: usize = 2000;
/// Connections opened (and used for one echo) before the baseline, so first-use
/// allocations on each core are not counted as the batch's.
const WARM: usize = 8;
/// Handshakes in flight at once while opening a batch.
const AT_ONCE: usize = 100;
const OFFER: &str = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n";
const ANSWER: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// Room for the test's client sockets and the gateway's (it inherits the limit).
fn raise_fd_limit(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed by pointer.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    if lim.rlim_cur < want {
        assert!(
            lim.rlim_max >= want,
            "the hard fd limit {} is under the {want} this test needs",
            lim.rlim_max
        );
        lim.rlim_cur = want;
        // SAFETY: as above.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
    }
}

/// One connection of the batch's kind; checks what it negotiated.
async fn open(gw: &Gateway, deflate: bool) -> RawWs {
    let (ws, resp) = RawWs::connect_headers(gw.addr, "/", if deflate { OFFER } else { "" }).await;
    let want = deflate.then_some(ANSWER);
    assert_eq!(resp.header("sec-websocket-extensions"), want);
    ws
}

async fn open_gauge_reaches(gw: &Gateway, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let open = gw.metric("ringway_connections_open", "").await;
        if open == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{open} connections open, want {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Memory per idle connection for one batch on a fresh gateway: (RSS, accounted) bytes.
async fn batch(deflate: bool) -> (f64, f64) {
    let gw = Gateway::start_with_env(
        &[
            "--upstream",
            "echo",
            "--compression",
            "shared",
            "--workers",
            "1",
        ],
        &[("MIMALLOC_ALLOW_THP", "0")],
    );
    let mut warm = Vec::new();
    for _ in 0..WARM {
        let mut ws = open(&gw, deflate).await;
        ws.send(&common::masked_frame(true, common::OP_TEXT, b"warm"))
            .await;
        assert_eq!(ws.read_frame().await.payload, b"warm");
        warm.push(ws);
    }
    open_gauge_reaches(&gw, WARM as u64).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let rss0 = rss_bytes(gw.pid());
    let acct0 = gw.metric("ringway_buffer_bytes", "").await;

    let mut idle = Vec::with_capacity(N);
    while idle.len() < N {
        let k = AT_ONCE.min(N - idle.len());
        idle.extend(join_all((0..k).map(|_| open(&gw, deflate))).await);
    }
    open_gauge_reaches(&gw, (WARM + N) as u64).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss1 = rss_bytes(gw.pid());
    let acct1 = gw.metric("ringway_buffer_bytes", "").await;
    // The gateway goes first, so the TIME_WAIT sockets are its (on its own port), not
    // 2,000 of the machine's ephemeral ports.
    drop(gw);
    drop(idle);
    drop(warm);
    let per = |a: u64, b: u64| (b as f64 - a as f64) / N as f64;
    (per(rss0, rss1), per(acct0, acct1))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_deflate_connections_cost_no_more_than_plain_ones() {
    raise_fd_limit(3 * N as u64 + 1024);
    let run = async {
        let (mut plain, mut deflate) = (Vec::new(), Vec::new());
        // Interleaved, each kind first in turn: P D, D P, P D.
        for round in 0..3 {
            for kind in if round % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            } {
                let m = batch(kind).await;
                eprintln!(
                    "round {round} {}: {:.0} B RSS, {:.0} B accounted per connection",
                    if kind { "deflate" } else { "plain" },
                    m.0,
                    m.1
                );
                if kind { &mut deflate } else { &mut plain }.push(m);
            }
        }
        (plain, deflate)
    };
    let (plain, deflate) = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the six batches took over 60 s");
    let rss = |v: &[(f64, f64)]| median(v.iter().map(|m| m.0).collect());
    let acct = |v: &[(f64, f64)]| median(v.iter().map(|m| m.1).collect());
    let (rss_plain, rss_deflate) = (rss(&plain), rss(&deflate));
    let (acct_plain, acct_deflate) = (acct(&plain), acct(&deflate));
    eprintln!(
        "medians per connection: RSS plain {rss_plain:.0} B, deflate {rss_deflate:.0} B; \
         accounted plain {acct_plain:.0} B, deflate {acct_deflate:.0} B"
    );
    // The measures see connections at all (else the comparison below proves nothing).
    assert!(rss_plain > 0.0 && acct_plain > 0.0, "{plain:?}");
    assert!(
        rss_deflate <= rss_plain + 256.0,
        "RSS per deflate connection {rss_deflate:.0} B vs plain {rss_plain:.0} B: {deflate:?} {plain:?}"
    );
    assert!(
        acct_deflate <= acct_plain + 256.0,
        "accounted per deflate connection {acct_deflate:.0} B vs plain {acct_plain:.0} B"
    );
}
