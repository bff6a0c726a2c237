//! Helpers for the relay end-to-end tests: backend processes (the example chat backends),
//! fake backends that speak just enough of docs/relay-protocol.md to misbehave on purpose,
//! WebSocket chat clients, and the gateway's log and memory as a user would observe them.
//!
//! The fake backends encode and parse relay frames by hand from the document, not with the
//! crate's codec, so a bug shared by the gateway's codec and these helpers cannot hide.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::common::{Gateway, WAIT};

pub type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

// ----- backend processes -----

/// Which example backend to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Example {
    Python,
    Rust,
}

/// A running example chat backend; killed (SIGKILL by PID) on drop.
pub struct BackendProc {
    child: Option<Child>,
    /// What it printed as `listening on ADDR`: `127.0.0.1:PORT` or `unix:PATH`.
    pub addr: String,
    log: Arc<Mutex<String>>,
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// target/<profile>/examples/chat_backend: this test binary lives in target/<profile>/deps/.
pub fn rust_backend_path() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary in target/<profile>/deps");
    let path = profile_dir.join("examples").join("chat_backend");
    // Always (once per run): a stale binary would test old code.
    build_rust_backend(profile_dir);
    assert!(
        path.exists(),
        "{} missing: `cargo test` builds it (or `cargo build --example chat_backend`)",
        path.display()
    );
    path
}

/// `cargo test --test relay_gateway` builds no examples: build the one we need (a no-op when
/// fresh), once, with
/// the same cargo and profile (cargo releases its build lock before running tests).
fn build_rust_backend(profile_dir: &Path) {
    static BUILD: std::sync::Once = std::sync::Once::new();
    BUILD.call_once(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let profile = profile_dir
            .file_name()
            .and_then(|p| p.to_str())
            .unwrap_or("debug");
        let mut cmd = Command::new(cargo);
        cmd.current_dir(repo())
            .args(["build", "--quiet", "--example", "chat_backend"]);
        if profile != "debug" {
            cmd.args(["--profile", profile]);
        }
        if let Some(target_dir) = profile_dir.parent() {
            cmd.env("CARGO_TARGET_DIR", target_dir);
        }
        let status = cmd
            .status()
            .expect("running cargo build --example chat_backend");
        assert!(
            status.success(),
            "building the example backend failed: {status}"
        );
    });
}

impl BackendProc {
    /// Start `which` with `--listen listen` and wait (bounded) for its `listening on` line.
    pub fn spawn(which: Example, listen: &str) -> BackendProc {
        let mut cmd = match which {
            Example::Python => {
                let mut c = Command::new("python3");
                c.arg(repo().join("examples/chat_backend.py"));
                c
            }
            Example::Rust => Command::new(rust_backend_path()),
        };
        let mut child = cmd
            .args(["--listen", listen])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning the {which:?} backend: {e}"));
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr is piped");
        {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    let mut log = log.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
            });
        }
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            // Keep draining so the backend never blocks on a full pipe.
            for _ in lines {}
        });
        let mut proc = BackendProc {
            child: Some(child),
            addr: String::new(),
            log,
        };
        // Python's start-up can be slow on a loaded machine.
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => {
                proc.addr = line
                    .trim()
                    .strip_prefix("listening on ")
                    .unwrap_or_else(|| panic!("{which:?} backend printed {line:?}"))
                    .to_string();
            }
            Err(_) => panic!(
                "{which:?} backend did not print its listening line; stderr:\n{}",
                proc.log()
            ),
        }
        proc
    }

    /// The gateway's `--upstream` / `backends` value for this backend.
    pub fn upstream_url(&self) -> String {
        if self.addr.starts_with("unix:") {
            self.addr.clone()
        } else {
            format!("tcp://{}", self.addr)
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("backend running").id()
    }

    /// SIGKILL by PID (std's `Child::kill`) and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for BackendProc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- backend {} stderr ----\n{}", self.addr, self.log());
        }
    }
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "ringway-relay-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("creating a temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ----- the gateway as observed from outside -----

/// Wait (polling, without blocking the runtime) until the gateway's stderr has `count`
/// lines containing `needle`.
pub async fn wait_log(gw: &Gateway, needle: &str, count: usize, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let log = gw.log();
        if log.lines().filter(|l| l.contains(needle)).count() >= count {
            return log;
        }
        if Instant::now() >= deadline {
            panic!("gateway did not log {count} x {needle:?} within {limit:?}; stderr:\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A field of /proc/PID/status in KiB (`VmRSS`, `VmHWM`).
pub fn proc_status_kib(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

// ----- WebSocket chat clients -----

pub async fn ws_connect(url: &str) -> Ws {
    let (ws, response) = match timeout(WAIT, tokio_tungstenite::connect_async(url)).await {
        Err(_) => panic!("websocket connect to {url} timed out"),
        Ok(Err(e)) => panic!("websocket connect to {url}: {e}"),
        Ok(Ok(pair)) => pair,
    };
    assert_eq!(response.status().as_u16(), 101);
    ws
}

/// What a client saw next, pings aside (tungstenite answers those itself).
#[derive(Debug)]
pub enum Got {
    Json(Value),
    Close(Option<u16>, String),
    Other(Message),
    /// The stream ended or failed without a close frame.
    Ended(String),
}

pub async fn ws_next_within<S>(ws: &mut WebSocketStream<S>, limit: Duration) -> Option<Got>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let next = match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return None,
            Ok(n) => n,
        };
        return Some(match next {
            None => Got::Ended("stream ended".into()),
            Some(Err(e)) => Got::Ended(e.to_string()),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Text(t))) => match serde_json::from_str(&t) {
                Ok(v) => Got::Json(v),
                Err(_) => Got::Other(Message::Text(t)),
            },
            Some(Ok(Message::Close(frame))) => match frame {
                Some(f) => Got::Close(Some(u16::from(f.code)), f.reason.into_owned()),
                None => Got::Close(None, String::new()),
            },
            Some(Ok(m)) => Got::Other(m),
        });
    }
}

/// The next message, which must be a JSON text, within `WAIT`.
pub async fn next_json<S>(ws: &mut WebSocketStream<S>) -> Value
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match ws_next_within(ws, WAIT).await {
        Some(Got::Json(v)) => v,
        None => panic!("no message within {WAIT:?}"),
        Some(other) => panic!("expected a JSON text message, got {other:?}"),
    }
}

pub async fn send_text<S>(ws: &mut WebSocketStream<S>, text: String)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    timeout(WAIT, ws.send(Message::Text(text)))
        .await
        .expect("send timed out")
        .expect("send");
}

pub fn join_msg(room: &str) -> String {
    serde_json::json!({"action": "join", "room": room}).to_string()
}

pub fn say_msg(room: &str, text: &str) -> String {
    serde_json::json!({"action": "say", "room": room, "text": text}).to_string()
}

/// Join `room` and require `joined` as the very next message.
pub async fn join<S>(ws: &mut WebSocketStream<S>, room: &str)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    send_text(ws, join_msg(room)).await;
    let got = next_json(ws).await;
    assert_eq!(
        got,
        serde_json::json!({"event": "joined", "room": room}),
        "answer to join"
    );
}

/// A `said` event's (from, text), checking its shape and room.
pub fn said(v: &Value, room: &str) -> (String, String) {
    assert_eq!(v["event"], "said", "expected said, got {v}");
    assert_eq!(v["room"], room, "said for another room: {v}");
    let from = v["from"]
        .as_str()
        .unwrap_or_else(|| panic!("`from` must be a string: {v}"));
    assert!(
        !from.is_empty() && from.bytes().all(|b| b.is_ascii_digit()),
        "`from` must be a decimal connection id: {v}"
    );
    let text = v["text"]
        .as_str()
        .unwrap_or_else(|| panic!("`text` must be a string: {v}"));
    (from.to_string(), text.to_string())
}

// ----- fake backends (raw relay protocol, docs/relay-protocol.md) -----

pub const T_HELLO: u8 = 0x01;
pub const T_PING: u8 = 0x02;
pub const T_PONG: u8 = 0x03;
pub const T_ERROR: u8 = 0x04;
pub const T_CLOSE: u8 = 0x05;
pub const T_OPEN: u8 = 0x10;
pub const T_MESSAGE: u8 = 0x11;
pub const T_GONE: u8 = 0x12;
pub const T_ACCEPT: u8 = 0x20;
pub const T_SEND: u8 = 0x22;
pub const T_SUBSCRIBE: u8 = 0x23;
pub const T_PUBLISH: u8 = 0x25;

/// `u32 length` (type + fields), `u8 type`, fields.
pub fn relay_frame(ty: u8, body: &[u8]) -> Vec<u8> {
    let mut out = ((body.len() + 1) as u32).to_be_bytes().to_vec();
    out.push(ty);
    out.extend_from_slice(body);
    out
}

pub fn rstring(s: &str) -> Vec<u8> {
    let mut out = (s.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(s.as_bytes());
    out
}

pub fn hello_frame(name: &str) -> Vec<u8> {
    let mut body = b"RWAY".to_vec();
    body.extend_from_slice(&1u16.to_be_bytes());
    body.extend(rstring(name));
    relay_frame(T_HELLO, &body)
}

/// `send` of a text message to `conn`.
pub fn send_frame(conn: u64, text: &str) -> Vec<u8> {
    let mut body = conn.to_be_bytes().to_vec();
    body.push(1);
    body.extend_from_slice(&(text.len() as u32).to_be_bytes());
    body.extend_from_slice(text.as_bytes());
    relay_frame(T_SEND, &body)
}

/// A frame as the gateway sent it: its type and the bytes after the type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayFrame {
    pub ty: u8,
    pub body: Vec<u8>,
}

impl RelayFrame {
    /// The `conn` field that leads `open`, `message`, `close` and `gone`.
    pub fn conn(&self) -> u64 {
        u64::from_be_bytes(self.body[..8].try_into().expect("conn field"))
    }
}

/// The backend's end of one link, over blocking std sockets.
pub struct FakeLink {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl FakeLink {
    /// Accept the gateway's next link within `limit` (None if it does not come).
    pub fn accept(listener: &TcpListener, limit: Duration) -> Option<FakeLink> {
        listener.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + limit;
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false).unwrap();
                    stream.set_read_timeout(Some(WAIT)).unwrap();
                    return Some(FakeLink {
                        stream,
                        buf: Vec::new(),
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return None;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
    }

    /// Read the gateway's hello (checking magic and version) and answer ours.
    pub fn handshake(&mut self) {
        let hello = self.read_frame().expect("the gateway's hello");
        assert_eq!(hello.ty, T_HELLO, "first frame from the gateway: {hello:?}");
        assert_eq!(&hello.body[..4], b"RWAY", "magic");
        assert_eq!(&hello.body[4..6], &[0, 1], "version 1");
        self.write(&hello_frame("fake-backend"));
    }

    pub fn write(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .expect("writing to the gateway");
    }

    /// The next frame within the read timeout; None on EOF, reset or timeout.
    pub fn read_frame(&mut self) -> Option<RelayFrame> {
        loop {
            if let Some(f) = self.parse_buffered() {
                return Some(f);
            }
            let mut chunk = [0u8; 16 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Every frame until the gateway closes the link: Ok(frames) on EOF or reset, Err(frames)
    /// if it kept the link open for `limit`.
    pub fn read_until_closed(
        &mut self,
        limit: Duration,
    ) -> Result<Vec<RelayFrame>, Vec<RelayFrame>> {
        let deadline = Instant::now() + limit;
        let mut frames = Vec::new();
        loop {
            if let Some(f) = self.parse_buffered() {
                frames.push(f);
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(frames);
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 16 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(frames),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return Ok(frames),
            }
        }
    }

    fn parse_buffered(&mut self) -> Option<RelayFrame> {
        if self.buf.len() < 5 {
            return None;
        }
        let len = u32::from_be_bytes(self.buf[..4].try_into().unwrap()) as usize;
        assert!(
            (1..=16_842_752).contains(&len),
            "gateway sent frame length {len}"
        );
        if self.buf.len() < 4 + len {
            return None;
        }
        let ty = self.buf[4];
        let body = self.buf[5..4 + len].to_vec();
        self.buf.drain(..4 + len);
        Some(RelayFrame { ty, body })
    }

    /// The next frame that is not a ping (pings are answered), within `limit`.
    pub fn read_non_ping(&mut self, limit: Duration) -> Option<RelayFrame> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            let f = self.read_frame()?;
            if f.ty == T_PING {
                let pong = relay_frame(T_PONG, &f.body);
                self.write(&pong);
                continue;
            }
            return Some(f);
        }
    }
}

pub fn fake_listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").expect("binding a fake backend");
    let addr = l.local_addr().unwrap();
    (l, addr)
}

/// `broadcast` of a binary message to every client.
pub fn broadcast_frame(payload: &[u8]) -> Vec<u8> {
    let mut body = vec![2u8];
    body.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    body.extend_from_slice(payload);
    relay_frame(0x26, &body)
}

// ----- the admin listener -----

/// The admin address from the gateway's `admin: http://ADDR/metrics` line (started with
/// `--admin 127.0.0.1:0`).
pub fn admin_addr(gw: &Gateway) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let log = gw.log();
        if let Some(i) = log.find("admin: http://") {
            let rest = &log[i + "admin: http://".len()..];
            return rest[..rest.find('/').expect("admin URL")].to_string();
        }
        assert!(Instant::now() < deadline, "no admin line:\n{log}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// GET /metrics and return the value of the sample `name` (exact, labels included, e.g.
/// `ringway_relay_limit_refusals_total{reason="rooms"}`); None if absent.
pub fn scrape(admin: &str, name: &str) -> Option<f64> {
    let mut s = TcpStream::connect(admin).expect("connecting to the admin listener");
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}
