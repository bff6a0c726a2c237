//! The admin HTTP server: `/metrics` for Prometheus, `/healthz` (every event loop turns) and
//! `/readyz` (it should get traffic) for load balancers and orchestrators. Deliberately
//! small and off the data path: one thread running one mio event loop over non-blocking
//! sockets, one request per connection, bounded in size and in time (a whole-request
//! deadline from accept, the answer's write included), and up to [`MAX_CONNECTIONS`] at once,
//! so slow clients can neither hurt the cores nor starve the probes.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use super::metrics::{self, Sources, UpstreamLink};
use crate::edge::CoreStats;

/// Request head limit; a larger request gets 431.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// From accept, a client must send its whole request and take our whole answer within this;
/// then it gets 408 (or, while our answer is being written, is closed).
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// Connections served at once. A new one beyond this closes the oldest, so clients that hold
/// connections open cannot lock out a probe.
pub const MAX_CONNECTIONS: usize = 1024;
/// After an error answer, how long (and how many bytes) we keep reading what the client still
/// sends, so closing does not reset the connection before it reads the answer.
const LINGER: Duration = Duration::from_millis(500);
const LINGER_BYTES: usize = 64 * 1024;

/// What the admin endpoints read. Shared with the code that starts, reloads and drains the
/// gateway, which flips `ready` and may swap the sources.
#[derive(Debug)]
pub struct AdminState {
    /// True once the gateway serves; set false when draining so load balancers move away.
    pub ready: AtomicBool,
    sources: RwLock<Sources>,
}

impl AdminState {
    /// Not ready until the caller says so.
    pub fn new(sources: Sources) -> AdminState {
        AdminState {
            ready: AtomicBool::new(false),
            sources: RwLock::new(sources),
        }
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    /// After a reload replaced the backend links.
    pub fn set_links(&self, links: Vec<UpstreamLink>) {
        self.sources
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .links = links;
    }

    /// After a restart of the cores.
    pub fn set_cores(&self, cores: Vec<Arc<CoreStats>>) {
        self.sources
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .cores = cores;
    }

    fn sources(&self) -> Sources {
        self.sources
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The Prometheus exposition, read now.
    pub fn metrics(&self) -> String {
        metrics::render(&self.sources())
    }

    /// Live: every core and the relay turned within `health::STALL_AFTER`.
    pub fn liveness(&self) -> Result<(), String> {
        let sources = self.sources();
        super::health::liveness(&sources.cores, sources.relay_heartbeat.as_deref())
    }

    /// Ready: live, the flag is set (listeners open, not draining) and every upstream that has backend links has at least one
    /// live one (embedded upstreams have no links and are always up). Otherwise the reason.
    pub fn readiness(&self) -> Result<(), String> {
        self.liveness()?;
        if !self.ready.load(Ordering::Acquire) {
            return Err("not ready: starting or draining".into());
        }
        let sources = self.sources();
        let mut upstreams: Vec<(&str, bool)> = Vec::new();
        for link in &sources.links {
            let live = link.state.live.load(Ordering::Relaxed);
            match upstreams.iter_mut().find(|(n, _)| *n == link.upstream) {
                Some((_, any)) => *any |= live,
                None => upstreams.push((&link.upstream, live)),
            }
        }
        let down: Vec<&str> = upstreams
            .iter()
            .filter(|(_, live)| !live)
            .map(|(n, _)| *n)
            .collect();
        if down.is_empty() {
            Ok(())
        } else {
            Err(format!("no live backend for upstream {}", down.join(", ")))
        }
    }
}

/// Bind `addr` and serve on a thread of its own until the process exits. Returns the bound
/// address (useful with port 0).
pub fn spawn(addr: SocketAddr, state: Arc<AdminState>) -> io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let poll = Poll::new()?;
    let handle = std::thread::Builder::new()
        .name("ringway-admin".into())
        .spawn(move || Server::new(listener, poll, state).serve())?;
    Ok((local, handle))
}

const LISTENER: Token = Token(usize::MAX);

enum Phase {
    /// Reading the request head into `buf`.
    Reading,
    /// Writing `out` from `sent`.
    Writing,
    /// Answer written and our side shut: swallow what the client still sends, then close.
    Lingering { until: Instant, left: usize },
}

struct Conn {
    stream: TcpStream,
    accepted: Instant,
    buf: Vec<u8>,
    out: Vec<u8>,
    sent: usize,
    /// The answer was an error: linger after writing it.
    linger: bool,
    phase: Phase,
}

impl Conn {
    fn deadline(&self) -> Instant {
        match self.phase {
            Phase::Lingering { until, .. } => until,
            _ => self.accepted + REQUEST_DEADLINE,
        }
    }

    fn answer(&mut self, r: &Response) {
        self.out = encode(r);
        self.sent = 0;
        self.linger = r.status >= 400;
        self.phase = Phase::Writing;
    }
}

enum Step {
    Keep,
    Close,
}

struct Server {
    listener: mio::net::TcpListener,
    poll: Poll,
    state: Arc<AdminState>,
    conns: HashMap<usize, Conn>,
    next_token: usize,
    /// Accepting failed for lack of descriptors (or similar): try again at this time.
    accept_retry: Option<Instant>,
}

impl Server {
    fn new(listener: TcpListener, poll: Poll, state: Arc<AdminState>) -> Server {
        Server {
            listener: mio::net::TcpListener::from_std(listener),
            poll,
            state,
            conns: HashMap::new(),
            next_token: 0,
            accept_retry: None,
        }
    }

    fn serve(mut self) {
        if let Err(e) =
            self.poll
                .registry()
                .register(&mut self.listener, LISTENER, Interest::READABLE)
        {
            tracing::error!("admin listener: cannot poll the listening socket: {e}");
            return;
        }
        let mut events = Events::with_capacity(256);
        loop {
            let now = Instant::now();
            let next = self
                .conns
                .values()
                .map(Conn::deadline)
                .chain(self.accept_retry)
                .min();
            let wait = next.map_or(Duration::from_secs(1), |d| {
                d.saturating_duration_since(now).min(Duration::from_secs(1))
            });
            if let Err(e) = self.poll.poll(&mut events, Some(wait)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::warn!("admin poll: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
                continue;
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    Token(t) => self.drive(t),
                }
            }
            if self.accept_retry.is_some_and(|at| Instant::now() >= at) {
                self.accept_retry = None;
                self.accept();
            }
            self.expire();
        }
    }

    fn accept(&mut self) {
        loop {
            let (mut stream, _) = match self.listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("admin accept: {e}");
                    self.accept_retry = Some(Instant::now() + Duration::from_millis(100));
                    return;
                }
            };
            if self.conns.len() >= MAX_CONNECTIONS {
                self.close_oldest();
            }
            let token = self.next_token;
            self.next_token = (self.next_token + 1) % (usize::MAX - 1);
            if let Err(e) = self.poll.registry().register(
                &mut stream,
                Token(token),
                Interest::READABLE | Interest::WRITABLE,
            ) {
                tracing::warn!("admin: cannot poll a connection: {e}");
                continue;
            }
            self.conns.insert(
                token,
                Conn {
                    stream,
                    accepted: Instant::now(),
                    buf: Vec::new(),
                    out: Vec::new(),
                    sent: 0,
                    linger: false,
                    phase: Phase::Reading,
                },
            );
            // Data may have arrived with the connection; edge-triggered polling would not
            // report it again.
            self.drive(token);
        }
    }

    fn close_oldest(&mut self) {
        let oldest = self
            .conns
            .iter()
            .min_by_key(|(_, c)| c.accepted)
            .map(|(&t, _)| t);
        if let Some(t) = oldest {
            tracing::debug!("admin: {MAX_CONNECTIONS} connections open; closing the oldest");
            self.close(t);
        }
    }

    fn close(&mut self, token: usize) {
        if let Some(mut c) = self.conns.remove(&token) {
            let _ = self.poll.registry().deregister(&mut c.stream);
        }
    }

    fn drive(&mut self, token: usize) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        let step = match step(conn, &self.state) {
            Ok(step) => step,
            Err(e) => {
                tracing::debug!("admin connection: {e}");
                Step::Close
            }
        };
        if matches!(step, Step::Close) {
            self.close(token);
        }
    }

    /// Past its deadline: a request still unread gets 408 if the socket takes it at once, an
    /// answer still being written is cut off, a lingering connection is closed.
    fn expire(&mut self) {
        let now = Instant::now();
        let late: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline() <= now)
            .map(|(&t, _)| t)
            .collect();
        for token in late {
            if let Some(c) = self.conns.get_mut(&token) {
                if matches!(c.phase, Phase::Reading) {
                    // Take what it sent so closing sends FIN, not RST, then try the 408 once.
                    let mut sink = [0u8; 4096];
                    while matches!(c.stream.read(&mut sink), Ok(n) if n > 0) {}
                    let _ = c.stream.write_all(&encode(&Response::text(
                        408,
                        "request not received within 5 s",
                    )));
                    let _ = c.stream.shutdown(std::net::Shutdown::Write);
                }
            }
            self.close(token);
        }
    }
}

/// Advance one connection as far as its socket allows without blocking.
fn step(conn: &mut Conn, state: &AdminState) -> io::Result<Step> {
    if matches!(conn.phase, Phase::Reading) {
        let mut chunk = [0u8; 4096];
        loop {
            let room = MAX_REQUEST_BYTES - conn.buf.len();
            if room == 0 {
                conn.answer(&Response::text(431, "request headers larger than 8 KiB"));
                break;
            }
            let n = match conn.stream.read(&mut chunk[..room.min(4096)]) {
                Ok(0) => return Ok(Step::Close), // gave up before finishing the request
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Step::Keep),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            conn.buf.extend_from_slice(&chunk[..n]);
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut headers);
            let response = match req.parse(&conn.buf) {
                Ok(httparse::Status::Complete(_)) => {
                    route(req.method.unwrap_or(""), req.path.unwrap_or(""), state)
                }
                Ok(httparse::Status::Partial) => continue,
                Err(httparse::Error::TooManyHeaders) => {
                    Response::text(431, "more than 64 request headers")
                }
                Err(e) => Response::text(400, &format!("bad request: {e}")),
            };
            conn.answer(&response);
            break;
        }
    }
    if matches!(conn.phase, Phase::Writing) {
        while conn.sent < conn.out.len() {
            match conn.stream.write(&conn.out[conn.sent..]) {
                Ok(0) => return Ok(Step::Close),
                Ok(n) => conn.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Step::Keep),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        let _ = conn.stream.shutdown(std::net::Shutdown::Write);
        if !conn.linger {
            return Ok(Step::Close);
        }
        // Closing with unread input sends RST, which can discard our answer before the client
        // reads it: swallow a bounded amount of what it still sends first.
        conn.phase = Phase::Lingering {
            until: (Instant::now() + LINGER).min(conn.accepted + REQUEST_DEADLINE + LINGER),
            left: LINGER_BYTES,
        };
    }
    if let Phase::Lingering { left, .. } = &mut conn.phase {
        let mut sink = [0u8; 4096];
        while *left > 0 {
            match conn.stream.read(&mut sink) {
                Ok(0) => return Ok(Step::Close),
                Ok(n) => *left = left.saturating_sub(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Step::Keep),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return Ok(Step::Close),
            }
        }
        return Ok(Step::Close);
    }
    Ok(Step::Keep)
}

struct Response {
    status: u16,
    content_type: &'static str,
    body: String,
    allow: bool,
}

impl Response {
    fn text(status: u16, body: &str) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: format!("{body}\n"),
            allow: false,
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "",
    }
}

fn encode(r: &Response) -> Vec<u8> {
    let allow = if r.allow { "Allow: GET\r\n" } else { "" };
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{allow}Cache-Control: no-store\r\nConnection: close\r\n\r\n",
        r.status,
        reason(r.status),
        r.content_type,
        r.body.len()
    )
    .into_bytes();
    out.extend_from_slice(r.body.as_bytes());
    out
}

fn route(method: &str, target: &str, state: &AdminState) -> Response {
    let path = target.split(['?', '#']).next().unwrap_or("");
    let known = matches!(path, "/metrics" | "/healthz" | "/readyz");
    if !known {
        return Response::text(
            404,
            &format!("no such endpoint {path:?}; try /metrics, /healthz, /readyz"),
        );
    }
    if method != "GET" {
        let mut r = Response::text(405, &format!("{method} is not allowed; use GET"));
        r.allow = true;
        return r;
    }
    match path {
        "/metrics" => Response {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: state.metrics(),
            allow: false,
        },
        "/healthz" => match state.liveness() {
            Ok(()) => Response::text(200, "ok"),
            Err(why) => Response::text(503, &why),
        },
        _ => match state.readiness() {
            Ok(()) => Response::text(200, "ready"),
            Err(why) => Response::text(503, &why),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::metrics::tests::{get, parse, sample_sources};
    use std::net::TcpStream;

    fn request(addr: SocketAddr, raw: &[u8]) -> (u16, String, String) {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(raw).unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").expect(&text);
        let status = head[9..12].parse().unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .expect(head)
            .parse()
            .unwrap();
        assert_eq!(len, body.len(), "{head}");
        assert!(head.contains("\r\nConnection: close"), "{head}");
        (status, head.to_string(), body.to_string())
    }

    fn get_path(addr: SocketAddr, path: &str) -> (u16, String, String) {
        request(
            addr,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        )
    }

    fn start() -> (SocketAddr, Arc<AdminState>) {
        let state = Arc::new(AdminState::new(sample_sources()));
        let (addr, _) = spawn("127.0.0.1:0".parse().unwrap(), state.clone()).unwrap();
        (addr, state)
    }

    #[test]
    fn serves_metrics_and_health() {
        let (addr, state) = start();
        let (status, head, body) = get_path(addr, "/metrics");
        assert_eq!(status, 200);
        assert!(
            head.contains("Content-Type: text/plain; version=0.0.4"),
            "{head}"
        );
        let s = parse(&body);
        assert_eq!(get(&s, "ringway_connections_open", &[]), Some(42.0));
        state.set_cores(vec![]);
        let (_, _, body) = get_path(addr, "/metrics?x=1");
        assert!(!body.contains("core=\"0\""), "{body}");

        assert_eq!(
            get_path(addr, "/healthz"),
            (200, get_path(addr, "/healthz").1, "ok\n".into())
        );
    }

    #[test]
    fn readiness_needs_the_flag_and_a_live_backend_per_upstream() {
        let (addr, state) = start();
        let (status, _, body) = get_path(addr, "/readyz");
        assert_eq!(status, 503);
        assert!(body.contains("starting or draining"), "{body}");

        // One of chat's two backends is live: ready.
        state.set_ready(true);
        assert_eq!(get_path(addr, "/readyz").0, 200);

        let mut links = sample_sources().links;
        links[0].upstream = "presence".into(); // the live one now serves another upstream
        state.set_links(links);
        let (status, _, body) = get_path(addr, "/readyz");
        assert_eq!(status, 503);
        assert!(body.contains("no live backend for upstream chat"), "{body}");

        state.set_links(vec![]); // embedded upstreams only
        assert_eq!(get_path(addr, "/readyz").0, 200);
        state.set_ready(false); // draining
        assert_eq!(get_path(addr, "/readyz").0, 503);
    }

    #[test]
    fn unknown_paths_methods_and_bad_requests() {
        let (addr, _) = start();
        assert_eq!(get_path(addr, "/").0, 404);
        assert_eq!(get_path(addr, "/metricsz").0, 404);
        let (status, head, _) = request(
            addr,
            b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        );
        assert_eq!(status, 405);
        assert!(head.contains("\r\nAllow: GET"), "{head}");
        assert_eq!(request(addr, b"GET\x01 / HTTP/1.1\r\n\r\n").0, 400);
        // Headers that never end within 8 KiB.
        let mut big = b"GET /metrics HTTP/1.1\r\nX-Pad: ".to_vec();
        big.resize(MAX_REQUEST_BYTES + 100, b'a');
        assert_eq!(request(addr, &big).0, 431);
    }

    #[test]
    fn a_stalled_client_gets_408_and_others_are_still_served() {
        let (addr, _) = start();
        let mut stalled = TcpStream::connect(addr).unwrap();
        stalled.write_all(b"GET /healthz HTTP/1.1\r\n").unwrap();
        // Served meanwhile, by another thread.
        assert_eq!(get_path(addr, "/healthz").0, 200);
        stalled
            .set_read_timeout(Some(REQUEST_DEADLINE + Duration::from_secs(5)))
            .unwrap();
        let mut out = String::new();
        stalled.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 408 "), "{out}");
    }
}
