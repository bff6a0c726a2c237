//! The admin HTTP server: `/metrics` for Prometheus, `/healthz` (the process answers) and
//! `/readyz` (it should get traffic) for load balancers and orchestrators. Deliberately
//! small and off the data path: std threads and blocking sockets, one request per
//! connection, bounded in size, time and concurrency, so a bad client cannot hurt the cores.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use super::metrics::{self, Sources, UpstreamLink};
use crate::edge::CoreStats;

/// Request head limit; a larger request gets 431.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// A client must send its whole request within this, and take our answer within it.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests served at once; more get 503 at once instead of a thread each.
pub const MAX_CONCURRENT: usize = 16;

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

    /// Ready: the flag is set and every upstream that has backend links has at least one
    /// live one (embedded upstreams have no links and are always up). Otherwise the reason.
    pub fn readiness(&self) -> Result<(), String> {
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
    let handle = std::thread::Builder::new()
        .name("ringway-admin".into())
        .spawn(move || serve(listener, state))?;
    Ok((local, handle))
}

fn serve(listener: TcpListener, state: Arc<AdminState>) {
    let busy = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("admin accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if busy.fetch_add(1, Ordering::AcqRel) >= MAX_CONCURRENT {
            busy.fetch_sub(1, Ordering::AcqRel);
            let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
            let _ = respond(&mut stream, &Response::text(503, "too many admin requests"));
            continue;
        }
        let state = state.clone();
        let guard = Busy(busy.clone());
        let spawned = std::thread::Builder::new()
            .name("ringway-admin-conn".into())
            .spawn(move || {
                let _guard = guard;
                if let Err(e) = handle(&mut stream, &state) {
                    tracing::debug!("admin connection: {e}");
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("admin: cannot start a thread: {e}");
        }
    }
}

/// Releases a concurrency slot however the connection thread ends.
struct Busy(Arc<AtomicUsize>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
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

fn respond(stream: &mut TcpStream, r: &Response) -> io::Result<()> {
    let allow = if r.allow { "Allow: GET\r\n" } else { "" };
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{allow}Cache-Control: no-store\r\nConnection: close\r\n\r\n",
        r.status,
        reason(r.status),
        r.content_type,
        r.body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(r.body.as_bytes())?;
    stream.flush()
}

/// Read one request head (the body of a GET is ignored), answer it, close.
fn handle(stream: &mut TcpStream, state: &AdminState) -> io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut buf = vec![0u8; MAX_REQUEST_BYTES];
    let mut len = 0;
    let response = loop {
        if len == buf.len() {
            break Response::text(431, "request headers larger than 8 KiB");
        }
        let n = match stream.read(&mut buf[len..]) {
            Ok(0) => return Ok(()), // gave up before finishing the request
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                break Response::text(408, "request not received within 5 s");
            }
            Err(e) => return Err(e),
        };
        len += n;
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf[..len]) {
            Ok(httparse::Status::Complete(_)) => {
                break route(req.method.unwrap_or(""), req.path.unwrap_or(""), state)
            }
            Ok(httparse::Status::Partial) => continue,
            Err(httparse::Error::TooManyHeaders) => {
                break Response::text(431, "more than 64 request headers")
            }
            Err(e) => break Response::text(400, &format!("bad request: {e}")),
        }
    };
    respond(stream, &response)?;
    let _ = stream.shutdown(std::net::Shutdown::Write);
    if response.status >= 400 {
        // Closing with unread input sends RST, which can discard our answer before the client
        // reads it: swallow a bounded amount of what it still sends first.
        stream.set_read_timeout(Some(Duration::from_millis(500)))?;
        let mut sink = [0u8; 4096];
        let mut left: usize = 64 * 1024;
        while left > 0 {
            match stream.read(&mut sink) {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    }
    Ok(())
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
        "/healthz" => Response::text(200, "ok"),
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
            .set_read_timeout(Some(IO_TIMEOUT + Duration::from_secs(5)))
            .unwrap();
        let mut out = String::new();
        stalled.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 408 "), "{out}");
    }
}
