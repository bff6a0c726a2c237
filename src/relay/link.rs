//! One backend link: a connection to one backend (TCP or Unix) that many client connections
//! share. It connects, says hello, and reconnects with exponential backoff and jitter; while
//! it is down, outbound frames wait in its bounded queue. On reconnect it first replays an
//! `open` for every client connection it carries, so the backend knows them again.
//!
//! Two threads per link: the writer (this module's `run`) drains the queue in batches; the
//! reader turns the backend's frames into [`ToEdge`] messages for the cores.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use crossbeam_channel::{Receiver, Sender};

use super::protocol::{self, Decoder, Frame};
use super::{EdgeSink, OpenInfo, ToEdge};

/// Where a backend listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Tcp(String),
    Unix(PathBuf),
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Tcp(a) => write!(f, "tcp://{a}"),
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A frame on its way to the backend. Opens come unencoded: the link keeps each one to
/// replay it, flagged, after a reconnect; closes are tagged so it can forget them.
#[derive(Debug)]
pub enum Outbound {
    Open { conn: u64, info: Box<OpenInfo> },
    Close { conn: u64, frame: Bytes },
    Frame(Bytes),
}

/// What the router and the metrics see of a link.
#[derive(Debug, Default)]
pub struct LinkState {
    pub live: AtomicBool,
    pub reconnects: AtomicU64,
    /// Message frames waiting in the queue, and their bytes: the buffer the route's limit
    /// applies to. Opens and closes are not counted: they must always get through, in order.
    pub queued: AtomicUsize,
    pub queued_bytes: AtomicUsize,
}

/// The link's heartbeat: a ping after this long without writing, and the link is dropped
/// after `DEAD_AFTER` without reading anything.
pub const PING_EVERY: Duration = Duration::from_secs(5);
pub const DEAD_AFTER: Duration = Duration::from_secs(15);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// The backend must answer our hello within this.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn connect(addr: &Address) -> io::Result<Stream> {
        Ok(match addr {
            Address::Tcp(a) => {
                let s = TcpStream::connect(a)?;
                s.set_nodelay(true)?;
                Stream::Tcp(s)
            }
            Address::Unix(p) => Stream::Unix(UnixStream::connect(p)?),
        })
    }
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }
    fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Everything a link needs; `sink` is its own clone of the way back to the cores.
pub struct Link<S: EdgeSink + Clone + 'static> {
    pub name: String,
    pub addr: Address,
    pub queue: Receiver<Outbound>,
    pub state: Arc<LinkState>,
    pub sink: S,
    pub max_frame: usize,
    pub stop: Arc<AtomicBool>,
}

impl<S: EdgeSink + Clone + 'static> Link<S> {
    /// Serve the link until the queue's senders are gone (the gateway stops) or `stop`.
    pub fn run(self) {
        let opens: Opens = Arc::new(Mutex::new(HashMap::new()));
        // A batch whose write failed: sent again, after the replayed opens, on the next link.
        let mut unsent = BytesMut::new();
        let mut backoff = BACKOFF_MIN;
        let mut seed = (Instant::now().elapsed().as_nanos() as u64) ^ (std::process::id() as u64);
        loop {
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            let (stream, leftover) = match self.connect() {
                Ok(s) => s,
                Err(e) => {
                    // Exponential backoff with full jitter, so a fleet of gateways does not
                    // reconnect in lockstep when a backend comes back.
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let wait =
                        backoff.mul_f64(0.5 + (seed >> 11) as f64 / (1u64 << 53) as f64 * 0.5);
                    tracing::warn!(
                        upstream = %self.name, backend = %self.addr,
                        "backend unreachable: {e}; retrying in {} ms", wait.as_millis()
                    );
                    if !self.sleep(wait) {
                        return;
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            };
            backoff = BACKOFF_MIN;
            self.state.live.store(true, Ordering::Release);
            let carried = opens.lock().map(|o| o.len()).unwrap_or(0);
            tracing::info!(upstream = %self.name, backend = %self.addr, carried, "backend link up");
            let keep_going = self.serve(stream, leftover, &opens, &mut unsent);
            self.state.live.store(false, Ordering::Release);
            self.state.reconnects.fetch_add(1, Ordering::Relaxed);
            if !keep_going {
                return;
            }
        }
    }

    /// Sleep through a backoff while outbound frames wait, bounded, in the queue.
    fn sleep(&self, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        loop {
            if self.stop.load(Ordering::Acquire) {
                return false;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            std::thread::sleep(left.min(Duration::from_millis(20)));
        }
    }

    /// Connect and exchange hellos; returns the stream and whatever the backend sent after
    /// its hello in the same read.
    fn connect(&self) -> io::Result<(Stream, BytesMut)> {
        let mut stream = Stream::connect(&self.addr)?;
        let mut out = BytesMut::new();
        protocol::encode(
            &Frame::Hello {
                version: protocol::VERSION,
                name: "ringway".into(),
            },
            &mut out,
        );
        stream.write_all(&out)?;
        // The backend must answer hello before anything else, and soon.
        stream.set_read_timeout(Some(HELLO_TIMEOUT))?;
        let deadline = Instant::now() + HELLO_TIMEOUT;
        let mut decoder = Decoder::new(self.max_frame);
        let mut buf = BytesMut::with_capacity(4096);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(Frame::Hello { version, .. })) if version == protocol::VERSION => break,
                Ok(Some(Frame::Hello { version, .. })) => {
                    return Err(io::Error::other(format!(
                        "backend speaks relay protocol version {version}, we speak {}",
                        protocol::VERSION
                    )))
                }
                Ok(Some(other)) => {
                    return Err(io::Error::other(format!(
                        "backend sent {other:?} before hello"
                    )))
                }
                Ok(None) => {}
                Err(e) => return Err(io::Error::other(format!("bad hello from backend: {e}"))),
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no hello from the backend within 5 s",
                ));
            }
            read_more(&mut stream, &mut buf)?;
        }
        stream.set_read_timeout(Some(DEAD_AFTER))?;
        Ok((stream, buf))
    }

    /// One connected period. Returns false when the gateway is stopping.
    fn serve(
        &self,
        stream: Stream,
        leftover: BytesMut,
        opens: &Opens,
        unsent: &mut BytesMut,
    ) -> bool {
        let reader_stream = match stream.try_clone() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(upstream = %self.name, "cannot clone backend socket: {e}");
                return true;
            }
        };
        // The reader's answers that must go out on this link (pongs, gone events).
        let (ctl_tx, ctl_rx) = crossbeam_channel::unbounded::<Frame>();
        let reader_alive = Arc::new(AtomicBool::new(true));
        let reader = {
            let ctx = ReadLoop {
                sink: self.sink.clone(),
                max_frame: self.max_frame,
                name: self.name.clone(),
                addr: self.addr.to_string(),
                alive: reader_alive.clone(),
                opens: opens.clone(),
                ctl: ctl_tx,
            };
            std::thread::Builder::new()
                .name(format!("ringway-link-{}", self.name))
                .spawn(move || ctx.run(reader_stream, leftover))
        };
        let mut stream = stream;
        let mut out = BytesMut::new();
        replay_opens(opens, &mut out);
        out.extend_from_slice(unsent);
        unsent.clear();
        let mut last_write = Instant::now();
        let ok = loop {
            if !out.is_empty() {
                if let Err(e) = stream.write_all(&out) {
                    tracing::warn!(upstream = %self.name, backend = %self.addr, "backend link lost while writing: {e}");
                    *unsent = out;
                    break true;
                }
                out.clear();
                last_write = Instant::now();
            }
            if !reader_alive.load(Ordering::Acquire) {
                // Last words (an `error` frame) before the link goes.
                while let Ok(frame) = ctl_rx.try_recv() {
                    protocol::encode(&frame, &mut out);
                }
                let _ = stream.write_all(&out);
                out.clear();
                break true;
            }
            crossbeam_channel::select! {
                recv(self.queue) -> item => match item {
                    Ok(item) => {
                        self.take(item, opens, &mut out);
                        // Batch: everything already queued leaves in one write.
                        while out.len() < 256 * 1024 {
                            match self.queue.try_recv() {
                                Ok(item) => self.take(item, opens, &mut out),
                                Err(_) => break,
                            }
                        }
                    }
                    Err(_) => break false,
                },
                recv(ctl_rx) -> frame => {
                    if let Ok(frame) = frame {
                        protocol::encode(&frame, &mut out);
                    }
                }
                default(Duration::from_millis(200)) => {
                    if self.stop.load(Ordering::Acquire) {
                        break false;
                    }
                    if last_write.elapsed() >= PING_EVERY {
                        protocol::encode(&Frame::Ping(0), &mut out);
                    }
                }
            }
        };
        stream.shutdown();
        if let Ok(r) = reader {
            let _ = r.join();
        }
        ok
    }

    fn take(&self, item: Outbound, opens: &Opens, out: &mut BytesMut) {
        match item {
            Outbound::Open { conn, info } => send_open(conn, *info, opens, out),
            Outbound::Close { conn, frame } => {
                out.extend_from_slice(&frame);
                if let Ok(mut t) = opens.lock() {
                    t.remove(&conn);
                }
            }
            Outbound::Frame(frame) => {
                self.state.queued.fetch_sub(1, Ordering::Relaxed);
                self.state
                    .queued_bytes
                    .fetch_sub(frame.len(), Ordering::Relaxed);
                out.extend_from_slice(&frame)
            }
        }
    }
}

/// The client connections a link carries, each with its `open` as it is replayed: a
/// [`Frame::Open`] with the replay flag set.
type Opens = Arc<Mutex<HashMap<u64, Frame>>>;

/// Encode `conn`'s first `open` into `out` and keep it, flagged, for replay.
fn send_open(conn: u64, info: OpenInfo, opens: &Opens, out: &mut BytesMut) {
    let mut open = Frame::Open {
        conn,
        path: info.path,
        query: info.query,
        headers: info.headers,
        peer: info.peer.map(|p| p.to_string()),
        authorize: info.authorize,
        replay: false,
    };
    protocol::encode(&open, out);
    if let Frame::Open { replay, .. } = &mut open {
        *replay = true;
    }
    if let Ok(mut t) = opens.lock() {
        t.insert(conn, open);
    }
}

/// Encode the replayed `open` of every connection the link carries into `out`.
fn replay_opens(opens: &Opens, out: &mut BytesMut) {
    if let Ok(table) = opens.lock() {
        for open in table.values() {
            protocol::encode(open, out);
        }
    }
}

fn read_more(stream: &mut Stream, buf: &mut BytesMut) -> io::Result<()> {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(64 * 1024);
    }
    let spare = buf.spare_capacity_mut();
    // Zero-initialise the spare part once: reading into uninitialised memory would need unsafe.
    let n = spare.len().min(64 * 1024);
    let start = buf.len();
    buf.resize(start + n, 0);
    match stream.read(&mut buf[start..]) {
        Ok(0) => {
            buf.truncate(start);
            Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "backend closed the link",
            ))
        }
        Ok(k) => {
            buf.truncate(start + k);
            Ok(())
        }
        Err(e) => {
            buf.truncate(start);
            Err(e)
        }
    }
}

struct ReadLoop<S> {
    sink: S,
    max_frame: usize,
    name: String,
    addr: String,
    alive: Arc<AtomicBool>,
    opens: Opens,
    ctl: Sender<Frame>,
}

impl<S: EdgeSink> ReadLoop<S> {
    /// Read the backend's frames and hand them to the cores until the link fails.
    fn run(mut self, mut stream: Stream, leftover: BytesMut) {
        let mut decoder = Decoder::new(self.max_frame).only_from(protocol::Side::Backend);
        let mut buf = leftover;
        loop {
            loop {
                match decoder.decode(&mut buf) {
                    Ok(Some(frame)) => self.on_frame(frame),
                    Ok(None) => break,
                    Err(e) => {
                        tracing::error!(
                            upstream = %self.name, backend = %self.addr,
                            "backend sent an invalid frame ({e}); resetting the link"
                        );
                        self.sink.flush();
                        // The writer sends this, then drops the link.
                        let _ = self.ctl.send(Frame::Error {
                            reason: format!("invalid frame: {e}"),
                        });
                        self.alive.store(false, Ordering::Release);
                        return;
                    }
                }
            }
            self.sink.flush();
            if let Err(e) = read_more(&mut stream, &mut buf) {
                if self.alive.load(Ordering::Acquire) {
                    tracing::warn!(upstream = %self.name, backend = %self.addr, "backend link lost: {e}");
                }
                self.alive.store(false, Ordering::Release);
                stream.shutdown();
                return;
            }
        }
    }

    fn on_frame(&mut self, frame: Frame) {
        match frame {
            Frame::Ping(nonce) => {
                let _ = self.ctl.send(Frame::Pong(nonce));
            }
            Frame::Pong(_) | Frame::Hello { .. } => {}
            frame => {
                let Some(msg) = frame.into_edge() else { return };
                if let Some(conn) = msg.conn() {
                    let known = self
                        .opens
                        .lock()
                        .map(|t| t.contains_key(&conn.as_u64()))
                        .unwrap_or(true);
                    if !known {
                        // A connection this link never carried or already closed.
                        let _ = self.ctl.send(Frame::Gone {
                            conn: conn.as_u64(),
                        });
                        // A backend's answer to our close crosses the removal: the core
                        // still waits for it (or ignores it if the client is gone).
                        if !matches!(msg, ToEdge::Close { .. }) {
                            return;
                        }
                    }
                }
                self.sink.send(msg);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(path: &str) -> OpenInfo {
        OpenInfo {
            path: path.into(),
            query: Some("room=1".into()),
            headers: vec![("x-user".into(), "ann".into())],
            peer: Some("127.0.0.1:4000".parse().unwrap()),
            authorize: true,
        }
    }

    fn open(conn: u64, path: &str, replay: bool) -> Frame {
        Frame::Open {
            conn,
            path: path.into(),
            query: Some("room=1".into()),
            headers: vec![("x-user".into(), "ann".into())],
            peer: Some("127.0.0.1:4000".into()),
            authorize: true,
            replay,
        }
    }

    fn decode_all(mut buf: BytesMut) -> Vec<Frame> {
        let mut decoder = Decoder::new(1 << 20);
        let mut frames = Vec::new();
        while let Some(f) = decoder.decode(&mut buf).expect("a valid frame") {
            frames.push(f);
        }
        assert!(buf.is_empty(), "trailing bytes: {buf:?}");
        frames
    }

    /// docs/relay-protocol.md "Reconnects": every carried connection's `open` is sent again
    /// with the replay flag, otherwise as it was first sent.
    #[test]
    fn opens_go_out_unflagged_and_replay_flagged_with_the_same_fields() {
        let opens: Opens = Arc::default();
        let mut out = BytesMut::new();
        send_open(7, info("/a"), &opens, &mut out);
        send_open(9, info("/b"), &opens, &mut out);
        assert_eq!(
            decode_all(out),
            vec![open(7, "/a", false), open(9, "/b", false)]
        );

        // Replayed on every reconnect, not only the first.
        for _ in 0..2 {
            let mut out = BytesMut::new();
            replay_opens(&opens, &mut out);
            let mut replayed = decode_all(out);
            replayed.sort_by_key(|f| match f {
                Frame::Open { conn, .. } => *conn,
                _ => u64::MAX,
            });
            assert_eq!(replayed, vec![open(7, "/a", true), open(9, "/b", true)]);
        }
    }
}
