//! Certificate checks as an operator meets them: `ringway check-config` lists every leaf
//! (names, notAfter) and fails on an expired, not-yet-valid, unparsable or mismatched one;
//! the running gateway logs an expired leaf at ERROR and one close to expiry at WARN (at
//! start and on SIGHUP) and reports `ringway_tls_certificate_expiry_seconds{name}`.

mod common;
mod common_relay;
mod common_tls;

use std::path::Path;
use std::time::Duration;

use common::{Gateway, WAIT};
use common_relay::wait_log;
use common_tls::{s, Ca, Dir, LeafSpec};

const DAY: u64 = 86_400;

fn tls_toml(certs: &[(&Path, &Path)]) -> String {
    let mut toml = "listen_tls = \"127.0.0.1:0\"\n".to_string();
    for (cert, key) in certs {
        toml += &format!(
            "[[tls.certificates]]\ncert = \"{}\"\nkey = \"{}\"\n",
            s(cert),
            s(key)
        );
    }
    toml
}

/// check-config on `toml`: (success, stdout, stderr).
fn check(dir: &Dir, toml: &str) -> (bool, String, String) {
    let path = dir.file("ringway.toml", toml);
    let out = common::run_to_exit(&["check-config", s(&path)]);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_lists_each_leaf_and_fails_on_bad_ones() {
    let ca = Ca::new("test CA");
    let dir = Dir::new("certs-check");
    let days = |n: u64| Some(Duration::from_secs(n * DAY));
    let good = dir.write(
        "good",
        &ca.make(&LeafSpec {
            valid_for: days(30),
            ..LeafSpec::server(&["ws.example.com", "*.example.org"])
        }),
    );
    let (ok, out, err) = check(&dir, &tls_toml(&[(&good.0, &good.1)]));
    assert!(ok, "{out}{err}");
    let line = out.lines().find(|l| l.contains("good.pem")).expect(&out);
    assert!(
        line.contains("ws.example.com") && line.contains("*.example.org"),
        "{line}"
    );
    let year = |secs: u64| 1970 + secs / (365 * DAY + DAY / 4);
    let now = common::unix_now() as u64;
    let expected_year = year(now + 30 * DAY).to_string();
    assert!(
        line.contains("notAfter") && line.contains(&expected_year),
        "{line}"
    );
    assert!(!out.contains("warning"), "{out}");

    let soon = dir.write(
        "soon",
        &ca.make(&LeafSpec {
            valid_for: days(5),
            ..LeafSpec::server(&["soon.test"])
        }),
    );
    let (ok, out, err) = check(&dir, &tls_toml(&[(&good.0, &good.1), (&soon.0, &soon.1)]));
    assert!(ok, "expiring soon still passes: {out}{err}");
    assert!(
        out.contains("soon.pem: warning: expires in 4 days")
            || out.contains("soon.pem: warning: expires in 5 days"),
        "{out}"
    );

    let expired = dir.write(
        "expired",
        &ca.make(&LeafSpec {
            expired_ago: days(2),
            ..LeafSpec::server(&["old.test"])
        }),
    );
    let (ok, _, err) = check(
        &dir,
        &tls_toml(&[(&good.0, &good.1), (&expired.0, &expired.1)]),
    );
    assert!(!ok);
    assert!(
        err.contains(s(&expired.0)) && err.contains("expired at"),
        "{err}"
    );

    let later = dir.write(
        "later",
        &ca.make(&LeafSpec {
            starts_in: days(3),
            ..LeafSpec::server(&["later.test"])
        }),
    );
    let (ok, _, err) = check(&dir, &tls_toml(&[(&later.0, &later.1)]));
    assert!(!ok);
    assert!(
        err.contains(s(&later.0)) && err.contains("not valid before"),
        "{err}"
    );

    // The key of another certificate, and a file that is not a certificate.
    let (ok, _, err) = check(&dir, &tls_toml(&[(&good.0, &soon.1)]));
    assert!(!ok);
    assert!(
        err.contains(s(&soon.1)) && err.contains("does not match"),
        "{err}"
    );
    let junk = dir.file(
        "junk.pem",
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    );
    let (ok, _, err) = check(&dir, &tls_toml(&[(&junk, &good.1)]));
    assert!(!ok);
    assert!(err.contains(s(&junk)), "{err}");
}

/// A backend client certificate is checked like a served one.
#[test]
fn check_config_checks_backend_client_certificates_too() {
    let ca = Ca::new("test CA");
    let dir = Dir::new("certs-client");
    let ca_file = dir.file("ca.pem", &ca.pem());
    let upstream = |cert: &Path, key: &Path| {
        format!(
            "[[upstreams]]\nname = \"b\"\nbackends = [\"tls://b.test:9443\"]\nca_file = \"{}\"\n\
             client_cert = \"{}\"\nclient_key = \"{}\"\n[[routes]]\npath = \"/*\"\nupstream = \"b\"\n",
            s(&ca_file),
            s(cert),
            s(key)
        )
    };
    let good = dir.write("client", &ca.client_leaf("gw.test"));
    let (ok, out, err) = check(&dir, &upstream(&good.0, &good.1));
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("upstreams[0]: ca_file") && out.contains("1 CA certificate"),
        "{out}"
    );
    assert!(out.contains("client.pem: names [\"gw.test\"]"), "{out}");
    let old = dir.write(
        "old",
        &ca.make(&LeafSpec {
            client: true,
            expired_ago: Some(Duration::from_secs(DAY)),
            ..LeafSpec::server(&["gw.test"])
        }),
    );
    let (ok, _, err) = check(&dir, &upstream(&old.0, &old.1));
    assert!(!ok);
    assert!(
        err.contains(s(&old.0)) && err.contains("expired at"),
        "{err}"
    );
}

fn expiry(metrics: &str, name: &str) -> Option<f64> {
    let series = format!("ringway_tls_certificate_expiry_seconds{{name=\"{name}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&series)?.trim().parse().ok())
}

/// The running gateway: an expired leaf is logged at ERROR and still served, one expiring
/// within 14 days at WARN; the metric says how long each has left, and follows a SIGHUP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_is_logged_and_reported_at_start_and_on_reload() {
    let ca = Ca::new("test CA");
    let dir = Dir::new("certs-run");
    let days = |n: u64| Some(Duration::from_secs(n * DAY));
    let main = dir.write(
        "main",
        &ca.make(&LeafSpec {
            valid_for: days(30),
            ..LeafSpec::server(&["ws.test"])
        }),
    );
    let soon = dir.write(
        "soon",
        &ca.make(&LeafSpec {
            valid_for: days(5),
            ..LeafSpec::server(&["soon.test"])
        }),
    );
    let gw = Gateway::with_config(&tls_toml(&[(&main.0, &main.1), (&soon.0, &soon.1)]), &[]);
    let log = wait_log(&gw, "TLS certificate expires at", 1, WAIT).await;
    let line = log.lines().find(|l| l.contains("expires at")).unwrap();
    assert!(line.contains("WARN") && line.contains("soon.pem"), "{line}");
    assert!(!log.contains(" ERROR "), "nothing expired yet: {log}");

    let text = gw.metrics().await;
    let left = expiry(&text, "ws.test").expect(&text);
    let month = (30 * DAY) as f64;
    assert!((month - 120.0..=month).contains(&left), "{left}");
    let soon_left = expiry(&text, "soon.test").expect(&text);
    assert!(
        (5.0 * DAY as f64 - 120.0..=5.0 * DAY as f64).contains(&soon_left),
        "{soon_left}"
    );

    // Reload with the second certificate replaced by an expired one: ERROR, still served,
    // and its remaining time is negative.
    let expired = ca.make(&LeafSpec {
        expired_ago: days(1),
        ..LeafSpec::server(&["soon.test"])
    });
    dir.write("soon", &expired);
    gw.signal(libc::SIGHUP);
    let log = wait_log(&gw, "TLS certificate expired at", 1, WAIT).await;
    let line = log.lines().find(|l| l.contains("expired at")).unwrap();
    assert!(
        line.contains("ERROR") && line.contains("still served"),
        "{line}"
    );
    wait_log(&gw, "SIGHUP: configuration reloaded", 1, WAIT).await;
    let text = gw.metrics().await;
    let left = expiry(&text, "soon.test").expect(&text);
    assert!(
        (-(DAY as f64) - 120.0..=-(DAY as f64) + 1.0).contains(&left),
        "{left}"
    );
}
