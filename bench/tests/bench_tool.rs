//! `ringway-bench` end to end: against a spawned gateway it must report real throughput and
//! no errors; against a missing or misbehaving server it must fail loudly.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;

use bytes::BytesMut;
use ringway::protocol::frame::{write_server_frame, OpCode, Role};
use ringway::protocol::handshake::{parse_request, response_101, HandshakeLimits, Parsed};
use ringway::protocol::message::{Event, Limits, MessageDecoder};
use serde_json::Value;

// The gateway's own test helpers (they start the `ringway` binary of this workspace).
#[path = "../../tests/common/mod.rs"]
mod common;
use common::Gateway;

/// A one-core gateway with this upstream.
fn gateway(upstream: &str) -> Gateway {
    Gateway::start(&["--workers", "1", "--upstream", upstream])
}

/// Run the tool with `--json`; returns its exit code and parsed report.
fn bench(args: &[&str]) -> (i32, Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_ringway-bench"))
        .arg("--json")
        .args(args)
        .output()
        .expect("run ringway-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "bad JSON ({e}): {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), report)
}

#[test]
fn echo_against_the_gateway_reports_throughput_and_no_errors() {
    let gw = gateway("echo");
    let pid = gw.pid().to_string();
    let (code, r) = bench(&[
        "echo",
        "--url",
        &gw.url(),
        "--connections",
        "10",
        "--duration",
        "1s",
        "--warmup",
        "200ms",
        "--size",
        "1024",
        "--server-pid",
        &pid,
    ]);
    assert_eq!(r["errors"]["total"], 0, "{r:#}");
    assert_eq!(code, 0);
    assert_eq!(r["connected"], 10);
    assert!(r["msgs_per_sec"].as_f64().unwrap() > 0.0, "{r:#}");
    assert!(r["mib_per_sec"].as_f64().unwrap() > 0.0);
    let messages = r["messages"].as_u64().unwrap();
    assert_eq!(r["latency"]["samples"].as_u64().unwrap(), messages);
    let l = &r["latency"];
    assert!(l["p50_us"].as_f64().unwrap() > 0.0);
    assert!(l["p50_us"].as_f64() <= l["p99_us"].as_f64());
    assert!(l["p99_us"].as_f64() <= l["max_us"].as_f64());
    assert!(
        r["server"]["cpu_us_per_msg"].as_f64().unwrap() > 0.0,
        "{r:#}"
    );
}

#[test]
fn open_loop_sends_at_the_requested_rate() {
    let gw = gateway("local-echo");
    let (code, r) = bench(&[
        "rate",
        "--rate",
        "2000",
        "--url",
        &gw.url(),
        "--connections",
        "10",
        "--duration",
        "1s",
        "--warmup",
        "200ms",
        "--binary",
    ]);
    assert_eq!(r["errors"]["total"], 0, "{r:#}");
    assert_eq!(code, 0);
    // Messages scheduled in a 1 s window at 2000/s, each answered.
    assert_eq!(r["messages"].as_u64().unwrap(), 2000, "{r:#}");
    assert!(r["send_lag"]["samples"].as_u64().unwrap() >= 1990);
}

#[test]
fn idle_connections_from_spread_sources_are_held_and_measured() {
    let gw = gateway("echo");
    let pid = gw.pid().to_string();
    let (code, r) = bench(&[
        "idle",
        "--url",
        &gw.url(),
        "--connections",
        "50",
        "--hold",
        "300ms",
        "--spread-sources",
        "--server-pid",
        &pid,
    ]);
    assert_eq!(r["errors"]["total"], 0, "{r:#}");
    assert_eq!(code, 0);
    assert_eq!(r["connected"], 50);
    assert_eq!(r["spread_sources"], true);
    assert!(r["connects_per_sec"].as_f64().unwrap() > 0.0);
    assert!(r["server"]["after_kib"].as_u64().unwrap() > 0);
}

// ----- wss:// -----

/// A test CA's certificate (PEM) and a gateway serving wss:// with a leaf it signed for
/// `localhost` and 127.0.0.1; the files live in a scratch folder removed on drop.
struct TlsGateway {
    gw: Gateway,
    dir: std::path::PathBuf,
    ca: std::path::PathBuf,
    addr: std::net::SocketAddr,
}

impl TlsGateway {
    fn start(tag: &str, upstream: &str) -> TlsGateway {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let dir = std::env::temp_dir().join(format!("bench-tls-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = p.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&key, &ca_cert, &ca_key)
            .unwrap();
        let (ca, cert, keyfile) = (
            dir.join("ca.pem"),
            dir.join("cert.pem"),
            dir.join("key.pem"),
        );
        std::fs::write(&ca, ca_cert.pem()).unwrap();
        std::fs::write(&cert, leaf.pem()).unwrap();
        std::fs::write(&keyfile, key.serialize_pem()).unwrap();
        let gw = Gateway::start(&[
            "--workers",
            "1",
            "--upstream",
            upstream,
            "--listen-tls",
            "127.0.0.1:0",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            keyfile.to_str().unwrap(),
        ]);
        // The start-up line names both: `serving ws://A/ and wss://B/ ...`.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !gw.log().contains("wss://") {
            assert!(std::time::Instant::now() < deadline, "{}", gw.log());
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let log = gw.log();
        let rest = &log[log.find("wss://").unwrap() + 6..];
        let addr = rest[..rest.find('/').unwrap()].parse().unwrap();
        TlsGateway { gw, dir, ca, addr }
    }

    fn url(&self, host: &str) -> String {
        format!("wss://{host}:{}/", self.addr.port())
    }
}

impl Drop for TlsGateway {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A short echo run against `url` with these extra arguments.
fn wss_echo(url: &str, size: &str, extra: &[&str]) -> (i32, Value) {
    let mut args = vec![
        "echo",
        "--url",
        url,
        "--connections",
        "5",
        "--duration",
        "500ms",
        "--warmup",
        "100ms",
        "--size",
        size,
    ];
    args.extend_from_slice(extra);
    bench(&args)
}

#[test]
fn wss_echo_verified_with_the_ca_checks_every_reply() {
    let t = TlsGateway::start("ca", "echo");
    let ca = t.ca.to_str().unwrap().to_string();
    let pid = t.gw.pid().to_string();
    // By name and by IP address (both in the certificate); small and multi-record messages.
    for (host, size) in [("localhost", "1024"), ("127.0.0.1", "65536")] {
        let (code, r) = wss_echo(&t.url(host), size, &["--ca", &ca, "--server-pid", &pid]);
        assert_eq!(r["errors"]["total"], 0, "{r:#}");
        assert_eq!(code, 0);
        assert_eq!(r["connected"], 5);
        assert!(r["messages"].as_u64().unwrap() > 0, "{r:#}");
        assert!(r["server"]["cpu_us_per_msg"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn wss_without_the_ca_fails_verification_and_says_what_to_do() {
    let t = TlsGateway::start("noca", "echo");
    let (code, r) = wss_echo(&t.url("localhost"), "16", &[]);
    assert_eq!(code, 1);
    assert_eq!(r["connected"], 0);
    assert_eq!(r["errors"]["handshake_failed"], 5, "{r:#}");
    let example = r["errors"]["examples"][0].as_str().unwrap();
    assert!(example.contains("UnknownIssuer"), "{example}");
    assert!(example.contains("--ca FILE"), "{example}");
    // The gateway saw the client's alert about its certificate (counted as it arrives).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let metrics = http_metrics(&t.gw);
        if tls_failures(&metrics, "alert_received") == 5 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{metrics}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn wss_insecure_works_for_every_mode() {
    let t = TlsGateway::start("insecure", "local-echo");
    let url = t.url("localhost");
    let (code, r) = wss_echo(&url, "16", &["--insecure", "--in-flight", "4"]);
    assert_eq!((code, r["errors"]["total"].as_u64()), (0, Some(0)), "{r:#}");
    let (code, r) = bench(&[
        "rate",
        "--rate",
        "1000",
        "--url",
        &url,
        "--insecure",
        "--connections",
        "4",
        "--duration",
        "500ms",
        "--warmup",
        "100ms",
    ]);
    assert_eq!((code, r["errors"]["total"].as_u64()), (0, Some(0)), "{r:#}");
    assert_eq!(r["messages"], 500, "{r:#}");
    let pid = t.gw.pid().to_string();
    let (code, r) = bench(&[
        "idle",
        "--url",
        &url,
        "--insecure",
        "--connections",
        "50",
        "--hold",
        "200ms",
        "--server-pid",
        &pid,
    ]);
    assert_eq!((code, r["errors"]["total"].as_u64()), (0, Some(0)), "{r:#}");
    assert_eq!(r["connected"], 50);
    // Churn, with full handshakes only, then resuming sessions from tickets.
    for resume in [false, true] {
        let mut args = vec![
            "churn",
            "--url",
            &url,
            "--insecure",
            "--held",
            "5",
            "--rate",
            "100",
            "--duration",
            "500ms",
            "--warmup",
            "100ms",
            "--settle",
            "100ms",
            "--interval",
            "100ms",
        ];
        if !resume {
            args.push("--no-resume");
        }
        let (code, r) = bench(&args);
        assert_eq!((code, r["errors"]["total"].as_u64()), (0, Some(0)), "{r:#}");
        let churned = r["churn_connects"].as_u64().unwrap();
        assert!(churned >= 40, "{r:#}");
        let resumed = r["tls_resumed"].as_u64().unwrap();
        if resume {
            // The held set opens at once, before any ticket came back (full handshakes);
            // every churn connection after it finds a ticket.
            assert!(resumed >= churned, "{r:#}");
        } else {
            assert_eq!(resumed, 0, "{r:#}");
        }
    }
    assert_eq!(
        tls_failures(&http_metrics(&t.gw), ""),
        0,
        "the gateway counted no TLS failure"
    );
}

/// The admin endpoint's /metrics text (blocking).
fn http_metrics(gw: &Gateway) -> String {
    let mut s = std::net::TcpStream::connect(gw.admin_addr()).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// `ringway_tls_handshake_failures_total` summed over cores, for reasons containing `reason`.
fn tls_failures(metrics: &str, reason: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("ringway_tls_handshake_failures_total{") && l.contains(reason))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn refused_connections_fail_the_run() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("ws://127.0.0.1:{port}/");
    let (code, r) = bench(&[
        "echo",
        "--url",
        &url,
        "--connections",
        "5",
        "--duration",
        "200ms",
        "--warmup",
        "0s",
    ]);
    assert_eq!(code, 1);
    assert_eq!(r["errors"]["connect_failed"], 5, "{r:#}");
    assert_eq!(r["connected"], 0);
    assert!(r["errors"]["examples"][0]
        .as_str()
        .unwrap()
        .contains("refused"));
}

/// A server that completes the handshake, then echoes every message with its last byte
/// flipped, or with `silent` never answers at all.
fn bad_server(silent: bool) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("ws://{}/", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            std::thread::spawn(move || {
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                let request = loop {
                    let n = s.read(&mut buf).unwrap();
                    assert!(n > 0);
                    req.extend_from_slice(&buf[..n]);
                    if let Parsed::Complete { request: r, .. } =
                        parse_request(&req, &HandshakeLimits::default()).unwrap()
                    {
                        break r;
                    }
                };
                s.write_all(&response_101(&request, None)).unwrap();
                let mut dec = MessageDecoder::new(Role::Server, Limits::default());
                loop {
                    let Ok(n) = s.read(&mut buf) else { return };
                    if n == 0 {
                        return;
                    }
                    let mut out = BytesMut::new();
                    let mut pos = 0;
                    while pos < n {
                        let Ok((used, ev)) = dec.decode(&mut buf[pos..n]) else {
                            return;
                        };
                        pos += used;
                        match ev {
                            Some(Event::Message { .. }) if silent => {}
                            Some(Event::Message { payload, .. }) => {
                                let mut p = payload.as_slice().to_vec();
                                *p.last_mut().unwrap() ^= 1;
                                write_server_frame(&mut out, true, OpCode::Text, &p);
                            }
                            Some(Event::Close(_)) => {
                                write_server_frame(&mut out, true, OpCode::Close, &[3, 232]);
                            }
                            Some(_) => {}
                            None => break,
                        }
                    }
                    if s.write_all(&out).is_err() {
                        return;
                    }
                }
            });
        }
    });
    url
}

#[test]
fn corrupted_replies_fail_the_run_and_are_named() {
    let url = bad_server(false);
    let (code, r) = bench(&[
        "echo",
        "--url",
        &url,
        "--connections",
        "2",
        "--duration",
        "300ms",
        "--warmup",
        "0s",
        "--size",
        "64",
    ]);
    assert_eq!(code, 1);
    assert_eq!(r["errors"]["wrong_reply"], 2, "{r:#}");
    let example = r["errors"]["examples"][0].as_str().unwrap();
    assert!(
        example.contains("reply 0: body differs from byte 63"),
        "{example}"
    );
}

#[test]
fn unanswered_messages_fail_the_run_after_the_drain() {
    let url = bad_server(true);
    let (code, r) = bench(&[
        "echo",
        "--url",
        &url,
        "--connections",
        "3",
        "--in-flight",
        "2",
        "--duration",
        "200ms",
        "--warmup",
        "0s",
        "--drain",
        "200ms",
    ]);
    assert_eq!(code, 1);
    assert_eq!(r["messages"], 0);
    assert_eq!(r["errors"]["unanswered"], 6, "{r:#}");
    assert_eq!(r["errors"]["total"], 6);
}
