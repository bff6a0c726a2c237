//! Helpers for the end-to-end tests: start the real `ringway` binary, and speak raw
//! WebSocket/HTTP bytes to it where a client library would refuse to send bad input.
//!
//! Nothing here knows the gateway's internals: frames are built and parsed by hand from
//! RFC 6455 §5.2, so a bug shared by the gateway's codec and these helpers cannot hide.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// How long any single wait may take before the test fails instead of hanging. Generous: the
/// machine is small, shared and noisy.
pub const WAIT: Duration = Duration::from_secs(10);

/// The RFC 6455 §1.3 sample key and the accept value the RFC gives for it.
pub const SAMPLE_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
pub const SAMPLE_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// A running `ringway` process serving on a free port; killed (SIGKILL by PID) on drop.
pub struct Gateway {
    child: Child,
    pub addr: SocketAddr,
    log: Arc<Mutex<String>>,
    config_path: Option<PathBuf>,
    exit: Option<ExitStatus>,
}

static NEXT_CONFIG: AtomicU64 = AtomicU64::new(0);

impl Gateway {
    /// Start with these extra command-line arguments (on top of a free port and 2 workers).
    pub fn start(args: &[&str]) -> Gateway {
        Gateway::spawn(None, args, &[])
    }

    /// Like [`Gateway::start`], with extra environment variables for the process.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Gateway {
        Gateway::spawn(None, args, env)
    }

    /// Start with `toml` written to a config file passed as `--config`, plus `args`.
    pub fn with_config(toml: &str, args: &[&str]) -> Gateway {
        let path = std::env::temp_dir().join(format!(
            "ringway-itest-{}-{}.toml",
            std::process::id(),
            NEXT_CONFIG.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, toml).expect("writing the test config file");
        Gateway::spawn(Some(path), args, &[])
    }

    fn spawn(config_path: Option<PathBuf>, args: &[&str], env: &[(&str, &str)]) -> Gateway {
        let mut cmd = Command::new(ringway_binary());
        cmd.args(["--listen", "127.0.0.1:0"]);
        if !args.contains(&"--workers") {
            cmd.args(["--workers", "2"]);
        }
        if let Some(path) = &config_path {
            cmd.arg("--config").arg(path);
        }
        // The admin listener on a port of its own, never the default 9091 that another
        // gateway on this machine (or a parallel test) may hold.
        let config_sets_admin = config_path
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .is_some_and(|toml| toml.contains("admin_listen"));
        if !args.contains(&"--admin") && !config_sets_admin {
            cmd.args(["--admin", "127.0.0.1:0"]);
        }
        cmd.envs(env.iter().copied());
        cmd.args(args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if std::env::var_os("RINGWAY_LOG").is_none() {
            cmd.env("RINGWAY_LOG", "info");
        }
        let mut child = cmd.spawn().expect("spawning the ringway binary");
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        {
            let log = Arc::clone(&log);
            // Drain stderr for the whole life of the process so the pipe never fills.
            std::thread::spawn(move || {
                let mut tx = Some(tx);
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    let line = strip_ansi(&line);
                    if let Some(addr) = serving_addr(&line) {
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(addr);
                        }
                    }
                    let mut log = log.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
            });
        }
        let mut gw = Gateway {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log,
            config_path,
            exit: None,
        };
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => gw.addr = addr,
            Err(_) => {
                let status = gw.child.try_wait().ok().flatten();
                panic!(
                    "ringway did not report its address (exit: {status:?}); stderr:\n{}",
                    gw.log()
                );
            }
        }
        gw
    }

    /// The config file passed as `--config`, for reload tests to rewrite.
    #[allow(dead_code)]
    pub fn config_path(&self) -> Option<&std::path::Path> {
        self.config_path.as_deref()
    }

    pub fn url(&self) -> String {
        format!("ws://{}/", self.addr)
    }

    pub fn pid(&self) -> libc::pid_t {
        self.child.id() as libc::pid_t
    }

    /// Everything the process wrote to stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The log once `text` is in it `count` times (lines come through a pipe and a reader
    /// thread, so after what they report is seen), or as it is after `WAIT`.
    pub async fn log_with(&self, text: &str, count: usize) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let log = self.log();
            if log.matches(text).count() >= count || Instant::now() >= deadline {
                return log;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `log_with` for code outside a runtime (after the process exited, say).
    pub fn log_with_blocking(&self, text: &str, count: usize) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let log = self.log();
            if log.matches(text).count() >= count || Instant::now() >= deadline {
                return log;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) has no memory preconditions; the pid is our own child, not yet
        // reaped (we only reap in `wait_exit`/drop), so it cannot name another process.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill({}, {sig}) failed", self.pid());
    }

    /// The admin listener's address, from the start-up log (start with `--admin 127.0.0.1:0`).
    #[allow(dead_code)]
    pub fn admin_addr(&self) -> SocketAddr {
        // The admin line follows the serving line: wait for it.
        let deadline = Instant::now() + WAIT;
        loop {
            let log = self.log();
            if let Some(i) = log.find("admin: http://") {
                let rest = &log[i + "admin: http://".len()..];
                return rest[..rest.find('/').unwrap()].parse().unwrap();
            }
            assert!(
                Instant::now() < deadline,
                "no admin listener: started with --admin?"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The wss:// listener's address, from the start-up line `serving ws://A/ and wss://B/
    /// ...` (start with `--listen-tls 127.0.0.1:0`).
    #[allow(dead_code)]
    pub fn wss_addr(&self) -> SocketAddr {
        // The line may reach the log just after the ws:// address was reported.
        let deadline = Instant::now() + WAIT;
        loop {
            let log = self.log();
            if let Some(i) = log.find("wss://") {
                let rest = &log[i + "wss://".len()..];
                return rest[..rest.find('/').unwrap()].parse().unwrap();
            }
            assert!(Instant::now() < deadline, "no wss:// in the log:\n{log}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The text of `GET /metrics` from the admin listener.
    #[allow(dead_code)]
    pub async fn metrics(&self) -> String {
        let mut s = timeout(WAIT, TcpStream::connect(self.admin_addr()))
            .await
            .expect("admin connect timed out")
            .expect("admin connect");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut text = String::new();
        timeout(WAIT, s.read_to_string(&mut text))
            .await
            .expect("/metrics timed out")
            .expect("reading /metrics");
        text
    }

    /// The sum of the samples of `metric` (exact name, with or without labels) whose labels
    /// contain `labels`, from `/metrics`.
    #[allow(dead_code)]
    pub async fn metric(&self, metric: &str, labels: &str) -> u64 {
        let text = self.metrics().await;
        text.lines()
            .filter(|l| {
                l.strip_prefix(metric)
                    .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
                    && l.contains(labels)
            })
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    }

    /// Wait up to `limit` for the process to exit; None if it is still running.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("waitpid") {
                self.exit = Some(status);
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if let Some(path) = &self.config_path {
            let _ = std::fs::remove_file(path);
        }
        if std::thread::panicking() {
            eprintln!("---- ringway stderr ----\n{}", self.log());
        }
    }
}

/// The gateway binary under test: cargo names it for this package's tests; the bench crate's
/// tests (bench/tests/, which share this file) find it beside their own executable in the
/// workspace's target directory (`cargo test --workspace` builds it).
pub fn ringway_binary() -> PathBuf {
    if let Some(path) = option_env!("CARGO_BIN_EXE_ringway") {
        return PathBuf::from(path);
    }
    // target/<profile>/deps/<test>-<hash> -> target/<profile>/ringway
    let exe = std::env::current_exe().expect("the test's own path");
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("ringway"))
        .expect("a test executable inside target/<profile>/deps");
    assert!(
        path.exists(),
        "{} is missing: build the gateway first (cargo build --release) or run \
         cargo test --workspace",
        path.display()
    );
    path
}

/// Run the binary with `args` to its exit (killed after 20 s: a gateway that serves instead
/// of failing then fails the caller on its exit status).
#[allow(dead_code)]
pub fn run_to_exit(args: &[&str]) -> std::process::Output {
    let mut child = Command::new(ringway_binary())
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning the ringway binary");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("waitpid").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("collecting its output")
}

/// The address from the startup line `... serving ws://127.0.0.1:PORT/ with ...`.
fn serving_addr(line: &str) -> Option<SocketAddr> {
    let rest = &line[line.find("serving ws://")? + "serving ws://".len()..];
    rest[..rest.find('/')?].parse().ok()
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ params final-byte(@..~)
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

// ----- raw frames (RFC 6455 §5.2) -----

/// A client frame: masked with a fixed, non-trivial key (§5.3).
pub fn masked_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    frame_bytes(fin, 0, opcode, Some([0x37, 0xfa, 0x21, 0x3d]), payload)
}

/// One text message in exactly `n` frames.
pub fn fragmented_text(text: &[u8], n: usize) -> Vec<u8> {
    let mut wire = Vec::new();
    for i in 0..n {
        let op = if i == 0 { OP_TEXT } else { OP_CONT };
        let piece = &text[i * text.len() / n..(i + 1) * text.len() / n];
        wire.extend(masked_frame(i + 1 == n, op, piece));
    }
    wire
}

/// A frame with the MASK bit clear, which a server must refuse from a client (§5.1).
pub fn unmasked_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    frame_bytes(fin, 0, opcode, None, payload)
}

/// Any frame: `rsv` is the three RSV bits (0..=7), `mask` the masking key if any.
pub fn frame_bytes(
    fin: bool,
    rsv: u8,
    opcode: u8,
    mask: Option<[u8; 4]>,
    payload: &[u8],
) -> Vec<u8> {
    let mut out = frame_header(fin, rsv, opcode, mask, payload.len() as u64);
    match mask {
        Some(key) => out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4])),
        None => out.extend_from_slice(payload),
    }
    out
}

/// Only the header (with the masking key) claiming `len` payload bytes.
pub fn frame_header(fin: bool, rsv: u8, opcode: u8, mask: Option<[u8; 4]>, len: u64) -> Vec<u8> {
    let mut out = vec![(u8::from(fin) << 7) | ((rsv & 7) << 4) | (opcode & 0x0f)];
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    if len < 126 {
        out.push(mask_bit | len as u8);
    } else if len <= u64::from(u16::MAX) {
        out.push(mask_bit | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(mask_bit | 127);
        out.extend_from_slice(&len.to_be_bytes());
    }
    if let Some(key) = mask {
        out.extend_from_slice(&key);
    }
    out
}

/// A frame as the server sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    pub rsv: u8,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The status code of a close frame (§5.5.1), None if it carries none.
    pub fn close_code(&self) -> Option<u16> {
        assert_eq!(self.opcode, OP_CLOSE, "not a close frame: {self:?}");
        (self.payload.len() >= 2).then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }

    pub fn close_reason(&self) -> String {
        String::from_utf8_lossy(self.payload.get(2..).unwrap_or_default()).into_owned()
    }
}

/// A WebSocket client over a plain TcpStream, after a successful handshake.
pub struct RawWs {
    pub stream: TcpStream,
    /// Bytes read but not yet parsed.
    buf: Vec<u8>,
}

/// The request a conforming client sends (RFC 6455 §4.1), with the RFC's sample key.
pub fn upgrade_request(addr: SocketAddr) -> String {
    format!(
        "GET /chat HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {SAMPLE_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

impl RawWs {
    /// Connect and complete the opening handshake, checking the 101 response.
    pub async fn connect(addr: SocketAddr) -> RawWs {
        RawWs::connect_with(addr, &[]).await
    }

    /// Connect and send the upgrade request followed by `pipelined` in the same write.
    pub async fn connect_with(addr: SocketAddr, pipelined: &[u8]) -> RawWs {
        RawWs::connect_path(addr, "/chat", pipelined).await
    }

    /// Connect to `path`, sending `pipelined` right after the upgrade request.
    pub async fn connect_path(addr: SocketAddr, path: &str, pipelined: &[u8]) -> RawWs {
        let mut stream = timeout(WAIT, TcpStream::connect(addr))
            .await
            .expect("connect timed out")
            .expect("connect");
        stream.set_nodelay(true).unwrap();
        let mut request = upgrade_request(addr)
            .replacen("GET /chat ", &format!("GET {path} "), 1)
            .into_bytes();
        request.extend_from_slice(pipelined);
        stream.write_all(&request).await.expect("write request");
        let (head, rest) = read_http_head(&mut stream).await;
        let response = HttpResponse::parse(&head);
        assert_eq!(response.status, 101, "expected 101, got {head:?}");
        assert_eq!(
            response.header("sec-websocket-accept"),
            Some(SAMPLE_ACCEPT),
            "wrong accept in {head:?}"
        );
        RawWs { stream, buf: rest }
    }

    /// Connect to `path` with `extra` header lines (each ending in CRLF) in the upgrade
    /// request; returns the client and the 101 (its headers, e.g. the extensions answer).
    #[allow(dead_code)]
    pub async fn connect_headers(
        addr: SocketAddr,
        path: &str,
        extra: &str,
    ) -> (RawWs, HttpResponse) {
        let mut stream = timeout(WAIT, TcpStream::connect(addr))
            .await
            .expect("connect timed out")
            .expect("connect");
        stream.set_nodelay(true).unwrap();
        let request = upgrade_request(addr)
            .replacen("GET /chat ", &format!("GET {path} "), 1)
            .replacen("\r\n\r\n", &format!("\r\n{extra}\r\n"), 1);
        stream
            .write_all(request.as_bytes())
            .await
            .expect("write request");
        let (head, rest) = read_http_head(&mut stream).await;
        let response = HttpResponse::parse(&head);
        assert_eq!(response.status, 101, "expected 101, got {head:?}");
        (RawWs { stream, buf: rest }, response)
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        timeout(WAIT, self.stream.write_all(bytes))
            .await
            .expect("write timed out")
            .expect("write");
    }

    /// Read the next whole frame, failing the test if none arrives within `WAIT`.
    pub async fn read_frame(&mut self) -> Frame {
        match timeout(WAIT, self.next_frame()).await {
            Ok(Some(f)) => f,
            Ok(None) => panic!("connection ended before a frame arrived"),
            Err(_) => panic!("no frame within {WAIT:?}"),
        }
    }

    /// The next frame, or None if the server closed TCP (EOF or reset) first.
    pub async fn next_frame(&mut self) -> Option<Frame> {
        loop {
            if let Some((frame, used)) = parse_server_frame(&self.buf) {
                self.buf.drain(..used);
                return Some(frame);
            }
            let mut chunk = [0u8; 64 * 1024];
            match self.stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Read the next frame and require a close frame with `code`.
    pub async fn expect_close(&mut self, code: u16) -> Frame {
        let frame = self.read_frame().await;
        assert_eq!(
            frame.opcode, OP_CLOSE,
            "expected close {code}, got {frame:?}"
        );
        assert_eq!(
            frame.close_code(),
            Some(code),
            "close reason: {:?}",
            frame.close_reason()
        );
        frame
    }

    /// Require the server to close TCP within `WAIT` without sending anything else.
    pub async fn expect_tcp_closed(&mut self) {
        assert!(
            self.buf.is_empty(),
            "unparsed bytes before EOF: {:?}",
            self.buf
        );
        expect_eof(&mut self.stream).await;
    }
}

/// Require the peer to close TCP (read returns 0, or the connection is reset) within
/// `WAIT`, sending nothing more.
pub async fn expect_eof(stream: &mut TcpStream) {
    let mut chunk = [0u8; 4096];
    match timeout(WAIT, stream.read(&mut chunk)).await {
        Err(_) => panic!("server kept the TCP connection open for {WAIT:?}"),
        Ok(Ok(0)) => {}
        Ok(Ok(n)) => panic!(
            "expected EOF, got {n} more bytes: {:?}",
            String::from_utf8_lossy(&chunk[..n])
        ),
        // A reset also ends the connection, e.g. when the server closes with bytes we sent
        // still unread in its receive queue.
        Ok(Err(e)) => assert_eq!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset,
            "read failed: {e}"
        ),
    }
}

/// Parse one server frame from the front of `buf`: (frame, bytes used), None if incomplete.
/// Server frames must not be masked (§5.1).
pub fn parse_server_frame(buf: &[u8]) -> Option<(Frame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let fin = buf[0] & 0x80 != 0;
    let rsv = (buf[0] >> 4) & 7;
    let opcode = buf[0] & 0x0f;
    assert_eq!(buf[1] & 0x80, 0, "server frame is masked: {:?}", &buf[..2]);
    let (len, mut at) = match buf[1] & 0x7f {
        126 => {
            if buf.len() < 4 {
                return None;
            }
            (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
        }
        127 => {
            if buf.len() < 10 {
                return None;
            }
            (u64::from_be_bytes(buf[2..10].try_into().unwrap()), 10)
        }
        n => (u64::from(n), 2),
    };
    let len = usize::try_from(len).expect("frame length fits in memory");
    if buf.len() < at + len {
        return None;
    }
    let payload = buf[at..at + len].to_vec();
    at += len;
    Some((
        Frame {
            fin,
            rsv,
            opcode,
            payload,
        },
        at,
    ))
}

// ----- raw HTTP -----

/// Read up to and including the blank line ending the response head; returns the head and
/// any bytes that came after it.
pub async fn read_http_head(stream: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return (
                String::from_utf8(buf).expect("response head is UTF-8"),
                rest,
            );
        }
        let n = match timeout(WAIT, stream.read(&mut chunk)).await {
            Err(_) => panic!("no complete HTTP response within {WAIT:?}; got {buf:?}"),
            Ok(Err(e)) => panic!("reading the HTTP response: {e}; got {buf:?}"),
            Ok(Ok(n)) => n,
        };
        assert!(
            n > 0,
            "connection closed before the response head ended: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
}

impl HttpResponse {
    pub fn parse(head: &str) -> HttpResponse {
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        let mut parts = status_line.splitn(3, ' ');
        assert_eq!(
            parts.next(),
            Some("HTTP/1.1"),
            "status line {status_line:?}"
        );
        let status = parts
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("status line {status_line:?}"));
        let headers = lines
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (name, value) = l.split_once(':').unwrap_or_else(|| panic!("header {l:?}"));
                (name.trim().to_ascii_lowercase(), value.trim().to_string())
            })
            .collect();
        HttpResponse { status, headers }
    }

    /// The value of header `name` (lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Send `request` on a fresh connection, read the response head and its body
/// (Content-Length), and require the server to close TCP after it.
pub async fn http_exchange(addr: SocketAddr, request: &[u8]) -> (HttpResponse, String) {
    let mut stream = timeout(WAIT, TcpStream::connect(addr))
        .await
        .expect("connect timed out")
        .expect("connect");
    stream.write_all(request).await.expect("write request");
    http_response_then_eof(&mut stream).await
}

/// Read a response head and, unless it is a 101, its Content-Length body; bytes after a
/// 101 (the first frames) are returned as they are.
pub async fn read_http_response(stream: &mut TcpStream) -> (HttpResponse, Vec<u8>) {
    let (head, mut body) = read_http_head(stream).await;
    let response = HttpResponse::parse(&head);
    if response.status == 101 {
        return (response, body);
    }
    let len: usize = response
        .header("content-length")
        .map_or(0, |v| v.parse().expect("numeric Content-Length"));
    while body.len() < len {
        let mut chunk = [0u8; 4096];
        let n = timeout(WAIT, stream.read(&mut chunk))
            .await
            .expect("body timed out")
            .expect("reading the body");
        assert!(n > 0, "connection closed inside the body");
        body.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(body.len(), len, "bytes after the body: {body:?}");
    (response, body)
}

/// Read a whole response (head and Content-Length body) then require EOF.
pub async fn http_response_then_eof(stream: &mut TcpStream) -> (HttpResponse, String) {
    let (response, body) = read_http_response(stream).await;
    assert!(
        body.is_empty() || response.status != 101,
        "bytes after the 101: {body:?}"
    );
    expect_eof(stream).await;
    (response, String::from_utf8_lossy(&body).into_owned())
}

/// [`metric_sum`] under the name the auth tests use.
pub async fn metric_total(gw: &Gateway, metric: &str, labels: &str) -> u64 {
    metric_sum(gw, metric, labels).await
}

/// [`metric_sum`] under the name the panic tests use.
pub async fn admin_metric_sum(gw: &Gateway, metric: &str, labels: &str) -> u64 {
    metric_sum(gw, metric, labels).await
}

/// An HS256 JWT over `claims` signed with `secret`, for routes with `[routes.jwt]`.
pub fn hs256_token(secret: &str, claims: &serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("signing a test token")
}

/// Seconds since the Unix epoch, for `exp` claims.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// Resident set size of process `pid`, in bytes (`VmRSS:` of /proc/PID/status).
pub fn rss_bytes(pid: libc::pid_t) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("reading status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS line");
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

/// The sum over cores of the samples of `metric` whose labels contain `labels`, read from
/// the admin listener of a gateway started with `--admin 127.0.0.1:0`.
pub async fn metric_sum(gw: &Gateway, metric: &str, labels: &str) -> u64 {
    let text = gw.metrics().await;
    let prefix = format!("{metric}{{");
    text.lines()
        .filter(|l| l.starts_with(&prefix) && l.contains(labels))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

/// One blocking GET on a fresh connection to the admin listener: (status, body, time taken).
#[allow(dead_code)]
pub fn http_get_timed(addr: impl std::net::ToSocketAddrs, path: &str) -> (u16, String, Duration) {
    let t = Instant::now();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    std::io::Write::write_fmt(
        &mut s,
        format_args!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n"),
    )
    .unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut s, &mut text).unwrap();
    let took = t.elapsed();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body, took)
}
