//! Operations: systemd notifications through a life cycle, and /metrics after real traffic
//! parsed by an independent Prometheus text parser (Python's prometheus_client).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Gateway, WAIT};
use futures_util::{SinkExt, StreamExt};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;

/// Wait for a datagram containing `want`, collecting everything received.
fn expect_notify(sock: &UnixDatagram, want: &str, seen: &mut Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut buf = [0u8; 4096];
    while !seen
        .iter()
        .any(|m| m.lines().any(|l| l == want || l.starts_with(want)))
    {
        assert!(Instant::now() < deadline, "no {want} in {seen:?}");
        if let Ok(n) = sock.recv(&mut buf) {
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
}

#[test]
fn sd_notify_ready_status_reloading_stopping() {
    let dir = std::env::temp_dir().join(format!("ringway-notify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("notify.sock");
    let _ = std::fs::remove_file(&path);
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let config = dir.join("ringway.toml");
    std::fs::write(&config, "max_message_bytes = 1000\n").unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ringway"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--admin",
            "127.0.0.1:0",
            "--config",
        ])
        .arg(&config)
        .env("NOTIFY_SOCKET", &path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let mut seen = Vec::new();
    expect_notify(&sock, "READY=1", &mut seen);
    expect_notify(&sock, "STATUS=serving ws://127.0.0.1:", &mut seen);
    // SAFETY: pid is our child, still running (it answered READY=1 and was not waited for).
    unsafe { libc::kill(pid, libc::SIGHUP) };
    expect_notify(&sock, "RELOADING=1", &mut seen);
    assert!(
        seen.iter().any(|m| m.contains("MONOTONIC_USEC=")),
        "{seen:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 4096];
    while seen.iter().filter(|m| m.contains("READY=1")).count() < 2 {
        assert!(
            Instant::now() < deadline,
            "no READY=1 after the reload: {seen:?}"
        );
        if let Ok(n) = sock.recv(&mut buf) {
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    expect_notify(&sock, "STOPPING=1", &mut seen);
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn http_get(addr: &str, path: &str) -> (u16, String) {
    let (status, body, _) = common::http_get_timed(addr, path);
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_the_clients_did() {
    let gw = Gateway::start(&["--admin", "127.0.0.1:0"]);
    let deadline = Instant::now() + WAIT;
    let admin = loop {
        let log = gw.log();
        if let Some(i) = log.find("admin: http://") {
            let rest = &log[i + "admin: http://".len()..];
            break rest[..rest.find('/').unwrap()].to_string();
        }
        assert!(Instant::now() < deadline, "no admin line:\n{log}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut clients = Vec::new();
    for _ in 0..3 {
        let (ws, _) = timeout(WAIT, tokio_tungstenite::connect_async(gw.url()))
            .await
            .unwrap()
            .unwrap();
        clients.push(ws);
    }
    for ws in clients.iter_mut() {
        for i in 0..5 {
            ws.send(Message::text(format!("m{i}"))).await.unwrap();
            timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
        }
    }
    let (status, _) = http_get(&admin, "/healthz");
    assert_eq!(status, 200);
    let (status, body) = http_get(&admin, "/readyz");
    assert_eq!(status, 200, "{body}");
    let (status, body) = http_get(&admin, "/metrics");
    assert_eq!(status, 200);
    // An independent parser reads the exposition and sums over cores.
    let py = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv-py3/bin/python");
    let script = r#"
import sys
from prometheus_client.parser import text_string_to_metric_families
want = {}
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        key = s.name + "".join(f"|{k}={v}" for k, v in sorted(s.labels.items()) if k != "core")
        want[key] = want.get(key, 0) + s.value
for k in sorted(want):
    print(k, int(want[k]))
"#;
    let mut child = Command::new(py)
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run .venv-py3/bin/python (scripts/setup-test-deps.sh installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the parser rejected the exposition:\n{body}"
    );
    let parsed: std::collections::HashMap<String, i64> = BufReader::new(&out.stdout[..])
        .lines()
        .map(|l| {
            let l = l.unwrap();
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect();
    let get = |k: &str| {
        *parsed
            .get(k)
            .unwrap_or_else(|| panic!("no {k} in {parsed:?}"))
    };
    assert_eq!(get("ringway_messages_total|direction=in"), 15);
    assert_eq!(get("ringway_messages_total|direction=out"), 15);
    assert_eq!(get("ringway_connections_accepted_total"), 3);
    assert_eq!(get("ringway_handshakes_total|result=ok"), 3);
    assert_eq!(get("ringway_connections_open"), 3);
    // Every 101 was timed from its accept; all three within the last bucket.
    assert_eq!(get("ringway_handshake_duration_seconds_count"), 3);
    assert_eq!(get("ringway_handshake_duration_seconds_bucket|le=10"), 3);
}
