//! Issue 11, health and supervision against the real binary: `/healthz`, `/readyz` and the
//! systemd watchdog follow the cores' and the relay's heartbeats; a core or relay whose
//! event loop dies takes the process down (exit 70, one ERROR line); the admin listener keeps
//! answering probes while many slow clients hold connections.
//!
//! Faults are injected with the test-only hooks of src/test_hooks.rs.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{http_get_timed as get, Gateway};

/// A notify socket the gateway sends READY=1 and WATCHDOG=1 to.
struct NotifySocket {
    dir: PathBuf,
    path: PathBuf,
    sock: UnixDatagram,
}

impl NotifySocket {
    fn new(name: &str) -> NotifySocket {
        let dir = std::env::temp_dir().join(format!("ringway-hops-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        NotifySocket { dir, path, sock }
    }

    /// Count WATCHDOG=1 datagrams received during `span`.
    fn watchdog_pings(&self, span: Duration) -> usize {
        let end = Instant::now() + span;
        let mut buf = [0u8; 4096];
        let mut n = 0;
        while Instant::now() < end {
            if let Ok(len) = self.sock.recv(&mut buf) {
                if String::from_utf8_lossy(&buf[..len])
                    .lines()
                    .any(|l| l == "WATCHDOG=1")
                {
                    n += 1;
                }
            }
        }
        n
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A gateway with an admin listener, a notify socket and a 400 ms watchdog (pinged every
/// 200 ms while healthy), plus `env`.
fn gateway(notify: &NotifySocket, env: &[(&str, &str)]) -> (Gateway, SocketAddr) {
    let path = notify.path.to_str().unwrap();
    let mut all = vec![("NOTIFY_SOCKET", path), ("WATCHDOG_USEC", "400000")];
    all.extend_from_slice(env);
    let gw = Gateway::start_with_env(&["--admin", "127.0.0.1:0"], &all);
    let admin = gw.admin_addr();
    (gw, admin)
}

#[test]
fn a_healthy_gateway_is_live_ready_and_feeds_the_watchdog() {
    let notify = NotifySocket::new("healthy");
    let (gw, admin) = gateway(&notify, &[]);
    assert_eq!(get(admin, "/healthz").0, 200);
    assert_eq!(get(admin, "/readyz").0, 200);
    let pings = notify.watchdog_pings(Duration::from_secs(2));
    assert!(pings >= 5, "{pings} WATCHDOG=1 in 2 s");
    let (status, metrics, _) = get(admin, "/metrics");
    assert_eq!(status, 200);
    for l in ["core0", "core1", "relay"] {
        let line = metrics
            .lines()
            .find(|x| {
                x.starts_with(&format!(
                    "ringway_loop_heartbeat_age_seconds{{loop=\"{l}\"}}"
                ))
            })
            .unwrap_or_else(|| panic!("no heartbeat age for {l}:\n{metrics}"));
        let age: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(age < 1.0, "{line}");
    }
    assert_eq!(get(admin, "/healthz").0, 200);
    drop(gw);
}

#[test]
fn a_stalled_core_fails_healthz_and_readyz_and_starves_the_watchdog() {
    let notify = NotifySocket::new("stall");
    let (gw, admin) = gateway(
        &notify,
        &[
            ("RINGWAY_TEST_STALL_CORE", "1"),
            ("RINGWAY_TEST_HOOK_AFTER_MS", "1500"),
        ],
    );
    // The process started before `gateway` returned, so the stall began before 1.5 s from
    // here; healthz must say so by 2 s (the limit) plus a poll later.
    let started = Instant::now();
    let mut seen_ok = false;
    let deadline = Instant::now() + Duration::from_secs(15);
    let body = loop {
        let (status, body, _) = get(admin, "/healthz");
        if status == 200 {
            seen_ok = true;
        } else {
            assert_eq!(status, 503, "{body}");
            break body;
        }
        assert!(Instant::now() < deadline, "healthz stayed 200");
        std::thread::sleep(Duration::from_millis(50));
    };
    let noticed = started.elapsed();
    assert!(seen_ok, "healthz was never 200 before the stall");
    assert!(body.starts_with("core 1 stalled for "), "{body}");
    assert!(!body.contains("core 0"), "{body}");
    let (status, ready, _) = get(admin, "/readyz");
    assert_eq!(status, 503, "{ready}");
    assert!(ready.contains("core 1 stalled"), "{ready}");
    // Pings sent before the stall was noticed may still be queued; after that, none.
    notify.watchdog_pings(Duration::from_millis(300));
    let pings = notify.watchdog_pings(Duration::from_secs(2));
    assert_eq!(pings, 0, "the watchdog was fed while core 1 is stalled");
    // Core 0 still serves /metrics' data and the age grows for core 1 only.
    let (_, metrics, _) = get(admin, "/metrics");
    let age = |l: &str| -> f64 {
        metrics
            .lines()
            .find(|x| {
                x.starts_with(&format!(
                    "ringway_loop_heartbeat_age_seconds{{loop=\"{l}\"}}"
                ))
            })
            .and_then(|x| x.rsplit(' ').next()?.parse().ok())
            .unwrap()
    };
    assert!(age("core1") > 2.0 && age("core0") < 1.0, "{metrics}");
    eprintln!("stall (at 1.5 s) reported {noticed:?} after start: {body}");
    assert!(noticed < Duration::from_millis(1500 + 3000), "{noticed:?}");
    drop(gw);
}

fn expect_loop_death(env: &[(&str, &str)], name: &str) {
    let notify = NotifySocket::new(&format!("panic-{}", name.replace(' ', "")));
    let (mut gw, admin) = gateway(&notify, env);
    let started = Instant::now();
    assert_eq!(get(admin, "/healthz").0, 200);
    let status = gw
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("still running after {name} panicked:\n{}", gw.log()));
    let took = started.elapsed();
    assert_eq!(status.code(), Some(70), "{status:?}\n{}", gw.log());
    let log = gw.log_with_blocking(&format!("{name} stopped: its event loop panicked"), 1);
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "{log}");
    assert!(
        errors[0].contains(&format!("{name} stopped: its event loop panicked")),
        "{log}"
    );
    // The hook fires 1 s after start; the exit follows at once.
    eprintln!("{name}: exit 70 {took:?} after the first 200");
    assert!(took < Duration::from_secs(3), "{took:?}");
}

#[test]
fn a_core_whose_loop_panics_takes_the_process_down() {
    expect_loop_death(
        &[
            ("RINGWAY_TEST_PANIC_CORE", "1"),
            ("RINGWAY_TEST_HOOK_AFTER_MS", "1000"),
        ],
        "core 1",
    );
}

#[test]
fn a_relay_whose_loop_panics_takes_the_process_down() {
    expect_loop_death(
        &[
            ("RINGWAY_TEST_PANIC_RELAY", "1"),
            ("RINGWAY_TEST_HOOK_AFTER_MS", "1000"),
        ],
        "relay",
    );
}

#[test]
fn fifty_trickling_clients_do_not_starve_the_probes() {
    let gw = Gateway::start(&["--admin", "127.0.0.1:0"]);
    let admin = gw.admin_addr();
    let mut tricklers: Vec<TcpStream> = (0..50)
        .map(|_| {
            let mut s = TcpStream::connect(admin).unwrap();
            s.write_all(b"G").unwrap();
            s
        })
        .collect();
    let accepted = Instant::now();
    let mut worst = Duration::ZERO;
    // Three rounds of probes while the tricklers send a byte every 2 s.
    for round in 0..2 {
        for path in ["/healthz", "/readyz", "/metrics"] {
            let (status, body, took) = get(admin, path);
            assert_eq!(status, 200, "{path}: {body}");
            assert!(took < Duration::from_millis(100), "{path} took {took:?}");
            worst = worst.max(took);
        }
        std::thread::sleep(Duration::from_secs(2));
        for s in &mut tricklers {
            s.write_all(b"E")
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
        }
    }
    for path in ["/healthz", "/readyz", "/metrics"] {
        let (status, _, took) = get(admin, path);
        assert_eq!(status, 200);
        assert!(took < Duration::from_millis(100), "{path} took {took:?}");
        worst = worst.max(took);
    }
    // Each trickler is closed by the 5 s deadline (with 408), whatever it keeps sending.
    for s in &mut tricklers {
        s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let text = String::from_utf8_lossy(&out);
        assert!(
            out.is_empty() || text.starts_with("HTTP/1.1 408 "),
            "{text}"
        );
    }
    let closed = accepted.elapsed();
    eprintln!("worst probe {worst:?}; all 50 tricklers closed {closed:?} after accept");
    assert!(closed < Duration::from_millis(6500), "{closed:?}");
    assert_eq!(get(admin, "/healthz").0, 200);
}
