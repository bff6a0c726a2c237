//! Runs the independent peers of tests/peers/ (Node `ws`, headless Chromium through
//! playwright-core) and Python scripts for the end-to-end tests, each under a deadline of its
//! own and ours beyond it, and hands back the JSON result line they print.
//!
//! The JS peers need `scripts/setup-test-deps.sh` (nodejs, chromium, `npm ci` in tests/peers).

#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers")
}

/// Runs `program args...`, killing it (by PID) if it outlives `limit`; returns the JSON of
/// its last stdout line, which must say `"ok": true`.
pub fn run_peer(mut cmd: Command, limit: Duration) -> Value {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: {e} (scripts/setup-test-deps.sh installs it)"));
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waitpid") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    let last = out.lines().last().unwrap_or("");
    let value: Value = serde_json::from_str(last).unwrap_or(Value::Null);
    assert!(
        status.is_some_and(|s| s.success()) && value["ok"] == true,
        "{what}: exit {status:?} (None: killed after {limit:?})\nstdout:\n{out}\nstderr:\n{err}"
    );
    value
}

/// A node script from tests/peers against `url`, with its own deadline and ours beyond it.
pub fn node_peer(script: &str, url: &str, limit: Duration) -> Value {
    node_peer_with(script, &[url.to_string()], limit)
}

/// [`node_peer`] with more arguments: `script args[0] deadline-ms args[1..]`.
pub fn node_peer_with(script: &str, args: &[String], limit: Duration) -> Value {
    let dir = peers_dir();
    assert!(
        dir.join("node_modules/ws").is_dir() && dir.join("node_modules/playwright-core").is_dir(),
        "tests/peers/node_modules is missing: run scripts/setup-test-deps.sh"
    );
    let mut cmd = Command::new("node");
    cmd.current_dir(&dir)
        .arg(script)
        .arg(&args[0])
        .arg(limit.as_millis().to_string())
        .args(&args[1..]);
    run_peer(cmd, limit + Duration::from_secs(10))
}
