//! One backend link: a connection to one backend (TCP or Unix) that many client connections
//! share. It connects, says hello, and reconnects with exponential backoff and jitter; while
//! it is down, outbound frames wait in its bounded queue. On reconnect it first replays an
//! `open` for every client connection it carries, so the backend knows them again.
//!
//! Two threads per link: the writer (this module's `run`) drains the queue in batches; the
//! reader turns the backend's frames into [`ToEdge`] messages for the cores.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use crossbeam_channel::{Receiver, Sender};

use super::wire::{self, Decoder, Frame};
use super::{EdgeSink, OpenInfo, RelayGauges, ToEdge, ENTRY_OVERHEAD, MAX_TOPIC_BYTES};

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
    /// Links dropped because the backend did not read what we sent: its pongs/`gone`s piled
    /// up past [`CTL_QUEUE`] or a write blocked for [`WRITE_TIMEOUT`].
    pub stalled: AtomicU64,
}

/// The link's heartbeat: a ping after this long without writing, and the link is dropped
/// after `DEAD_AFTER` without reading anything.
pub const PING_EVERY: Duration = Duration::from_secs(5);
pub const DEAD_AFTER: Duration = Duration::from_secs(15);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// The backend must answer our hello within this.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A TCP connect must complete within this (a backend whose accept queue is full, a
/// blackholed address).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A write to the backend that makes no progress for this long drops the link (the backend
/// is not reading); it is re-established with backoff.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Link-level answers (pongs, `gone`s) that may wait for the writer; a backend that makes
/// more without reading them is not reading, and its link is dropped.
pub const CTL_QUEUE: usize = 1024;
/// Every blocking socket call on a link returns at least this often, to check `stop`.
const POLL: Duration = Duration::from_millis(100);

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    /// Connect within [`CONNECT_TIMEOUT`] (per resolved address); writes return at least
    /// every [`POLL`] so a stalled backend is noticed and `stop` is checked.
    fn connect(addr: &Address) -> io::Result<Stream> {
        let stream = match addr {
            Address::Tcp(a) => {
                let mut last = io::Error::other(format!("{a} resolves to no address"));
                let mut connected = None;
                for sa in a.to_socket_addrs()? {
                    match TcpStream::connect_timeout(&sa, CONNECT_TIMEOUT) {
                        Ok(s) => {
                            connected = Some(s);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                let s = connected.ok_or(last)?;
                s.set_nodelay(true)?;
                Stream::Tcp(s)
            }
            Address::Unix(p) => Stream::Unix(UnixStream::connect(p)?),
        };
        match &stream {
            Stream::Tcp(s) => s.set_write_timeout(Some(POLL))?,
            Stream::Unix(s) => s.set_write_timeout(Some(POLL))?,
        }
        Ok(stream)
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
    /// This link's index among all links, for its backoff jitter seed.
    pub index: usize,
    pub gauges: Arc<RelayGauges>,
}

/// A per-link seed for the backoff jitter: links (and gateways) that lose their backends
/// together must not retry in lockstep.
fn jitter_seed(index: usize, addr: &Address) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    index.hash(&mut h);
    addr.to_string().hash(&mut h);
    std::process::id().hash(&mut h);
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
        .hash(&mut h);
    h.finish()
}

/// The next wait: `backoff` scaled by a factor in [0.5, 1) from the seed's sequence.
fn jittered(backoff: Duration, seed: &mut u64) -> Duration {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    backoff.mul_f64(0.5 + (*seed >> 11) as f64 / (1u64 << 53) as f64 * 0.5)
}

/// Why a write to the backend did not complete.
#[derive(Debug, thiserror::Error)]
enum WriteError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the backend read nothing for {} ms", WRITE_TIMEOUT.as_millis())]
    Stalled,
    #[error("the link is being reset")]
    Reset,
    #[error("the gateway is stopping")]
    Stopping,
}

impl<S: EdgeSink + Clone + 'static> Link<S> {
    /// Serve the link until the queue's senders are gone (the gateway stops) or `stop`.
    pub fn run(self) {
        let opens: Opens = Arc::new(Mutex::new(HashMap::new()));
        // A batch whose write failed: sent again, after the replayed opens, on the next link.
        let mut unsent = BytesMut::new();
        let mut backoff = BACKOFF_MIN;
        let mut seed = jitter_seed(self.index, &self.addr);
        loop {
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            let (stream, leftover) = match self.connect() {
                Ok(s) => s,
                Err(e) => {
                    // Exponential backoff with full jitter, so a fleet of gateways does not
                    // reconnect in lockstep when a backend comes back.
                    let wait = jittered(backoff, &mut seed);
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
        wire::encode(
            &Frame::Hello {
                version: wire::VERSION,
                name: "ringway".into(),
            },
            &mut out,
        );
        self.write_bounded(&mut stream, &out, &AtomicBool::new(true))
            .map_err(|e| match e {
                WriteError::Io(e) => e,
                other => io::Error::other(other.to_string()),
            })?;
        // The backend must answer hello before anything else, and soon; read in short
        // slices so a stop is noticed.
        stream.set_read_timeout(Some(POLL))?;
        let deadline = Instant::now() + HELLO_TIMEOUT;
        let mut decoder = Decoder::new(self.max_frame);
        let mut buf = BytesMut::with_capacity(4096);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(Frame::Hello { version, .. })) if version == wire::VERSION => break,
                Ok(Some(Frame::Hello { version, .. })) => {
                    return Err(io::Error::other(format!(
                        "backend speaks relay protocol version {version}, we speak {}",
                        wire::VERSION
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
            if self.stop.load(Ordering::Acquire) {
                return Err(io::Error::other("the gateway is stopping"));
            }
            match read_more(&mut stream, &mut buf) {
                Ok(()) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e),
            }
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
        let (ctl_tx, ctl_rx) = crossbeam_channel::bounded::<Frame>(CTL_QUEUE);
        let reader_alive = Arc::new(AtomicBool::new(true));
        let reader = {
            let ctx = ReadLoop {
                sink: self.sink.for_link(),
                state: self.state.clone(),
                gauges: self.gauges.clone(),
                reset: reader_stream.try_clone().ok(),
                max_frame: self.max_frame,
                name: self.name.clone(),
                addr: self.addr.to_string(),
                alive: reader_alive.clone(),
                opens: opens.clone(),
                ctl: ctl_tx,
                last_topic_log: None,
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
                match self.write_bounded(&mut stream, &out, &reader_alive) {
                    Ok(()) => {}
                    Err(WriteError::Stopping) => break false,
                    Err(e) => {
                        if matches!(e, WriteError::Stalled) {
                            self.state.stalled.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(upstream = %self.name, backend = %self.addr, "backend does not read what we send ({e}); resetting the link");
                        } else if !matches!(e, WriteError::Reset) {
                            tracing::warn!(upstream = %self.name, backend = %self.addr, "backend link lost while writing: {e}");
                        }
                        *unsent = out;
                        break true;
                    }
                }
                out.clear();
                last_write = Instant::now();
            }
            if !reader_alive.load(Ordering::Acquire) {
                // Last words (an `error` frame) before the link goes.
                while let Ok(frame) = ctl_rx.try_recv() {
                    wire::encode(&frame, &mut out);
                }
                let _ = self.write_bounded(&mut stream, &out, &AtomicBool::new(true));
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
                        wire::encode(&frame, &mut out);
                    }
                }
                default(Duration::from_millis(200)) => {
                    if self.stop.load(Ordering::Acquire) {
                        break false;
                    }
                    if last_write.elapsed() >= PING_EVERY {
                        wire::encode(&Frame::Ping(0), &mut out);
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

    /// Write all of `buf`, giving up when no byte went out for [`WRITE_TIMEOUT`], when
    /// `alive` goes false (the reader reset the link) or when the gateway stops.
    fn write_bounded(
        &self,
        stream: &mut Stream,
        buf: &[u8],
        alive: &AtomicBool,
    ) -> Result<(), WriteError> {
        let mut done = 0;
        let mut progress = Instant::now();
        while done < buf.len() {
            match stream.write(&buf[done..]) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
                Ok(n) => {
                    done += n;
                    progress = Instant::now();
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if self.stop.load(Ordering::Acquire) {
                        return Err(WriteError::Stopping);
                    }
                    if !alive.load(Ordering::Acquire) {
                        return Err(WriteError::Reset);
                    }
                    if progress.elapsed() >= WRITE_TIMEOUT {
                        return Err(WriteError::Stalled);
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn take(&self, item: Outbound, opens: &Opens, out: &mut BytesMut) {
        match item {
            Outbound::Open { conn, info } => send_open(conn, *info, opens, out, &self.gauges),
            Outbound::Close { conn, frame } => {
                out.extend_from_slice(&frame);
                forget_open(conn, opens, &self.gauges);
            }
            Outbound::Frame(frame) => {
                self.state.queued.fetch_sub(1, Ordering::Relaxed);
                self.state
                    .queued_bytes
                    .fetch_sub(frame.len(), Ordering::Relaxed);
                self.gauges.release(frame.len() + ENTRY_OVERHEAD);
                out.extend_from_slice(&frame)
            }
        }
    }
}

/// The client connections a link carries, each with its `open` as it is replayed: a
/// [`Frame::Open`] with the replay flag set.
type Opens = Arc<Mutex<HashMap<u64, (Frame, usize)>>>;

/// Bytes a stored `open` holds, as charged to the relay gauge.
fn open_bytes(info: &OpenInfo) -> usize {
    info.held_bytes() + ENTRY_OVERHEAD
}

/// Forget `conn`'s stored `open` (its close went out), releasing its charge.
fn forget_open(conn: u64, opens: &Opens, gauges: &RelayGauges) {
    if let Ok(mut t) = opens.lock() {
        if let Some((_, bytes)) = t.remove(&conn) {
            gauges.release(bytes);
        }
    }
}

/// Encode `conn`'s first `open` into `out` and keep it, flagged, for replay.
fn send_open(conn: u64, info: OpenInfo, opens: &Opens, out: &mut BytesMut, gauges: &RelayGauges) {
    let bytes = open_bytes(&info);
    let mut open = Frame::Open {
        conn,
        path: info.path,
        query: info.query,
        headers: info.headers,
        peer: info.peer.map(|p| p.to_string()),
        authorize: info.authorize,
        replay: false,
    };
    wire::encode(&open, out);
    if let Frame::Open { replay, .. } = &mut open {
        *replay = true;
    }
    if let Ok(mut t) = opens.lock() {
        gauges.charge(bytes);
        if let Some((_, old)) = t.insert(conn, (open, bytes)) {
            gauges.release(old);
        }
    }
}

/// Encode the replayed `open` of every connection the link carries into `out`.
fn replay_opens(opens: &Opens, out: &mut BytesMut) {
    if let Ok(table) = opens.lock() {
        for (open, _) in table.values() {
            wire::encode(open, out);
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
    state: Arc<LinkState>,
    gauges: Arc<RelayGauges>,
    /// A handle on the link's socket, to cut it when the backend must be dropped.
    reset: Option<Stream>,
    max_frame: usize,
    name: String,
    addr: String,
    alive: Arc<AtomicBool>,
    opens: Opens,
    ctl: Sender<Frame>,
    /// When an over-long topic was last logged (one line per second at most).
    last_topic_log: Option<Instant>,
}

impl<S: EdgeSink> ReadLoop<S> {
    /// Read the backend's frames and hand them to the cores until the link fails.
    fn run(mut self, mut stream: Stream, leftover: BytesMut) {
        let mut decoder = Decoder::new(self.max_frame).only_from(wire::Side::Backend);
        let mut buf = leftover;
        loop {
            loop {
                match decoder.decode(&mut buf) {
                    Ok(Some(frame)) => {
                        if !self.on_frame(frame) {
                            self.sink.flush();
                            return;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::error!(
                            upstream = %self.name, backend = %self.addr,
                            "backend sent an invalid frame ({e}); resetting the link"
                        );
                        self.sink.flush();
                        // The writer sends this, then drops the link.
                        let _ = self.ctl.try_send(Frame::Error {
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

    /// Queue a link-level answer for the writer; false (and the link reset) when the backend
    /// let [`CTL_QUEUE`] of them pile up: it is not reading.
    fn answer(&mut self, frame: Frame) -> bool {
        match self.ctl.try_send(frame) {
            Ok(()) | Err(crossbeam_channel::TrySendError::Disconnected(_)) => true,
            Err(crossbeam_channel::TrySendError::Full(_)) => {
                self.state.stalled.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    upstream = %self.name, backend = %self.addr,
                    "backend does not read what we send ({CTL_QUEUE} pongs/gone waiting); resetting the link"
                );
                self.alive.store(false, Ordering::Release);
                if let Some(s) = &self.reset {
                    s.shutdown();
                }
                false
            }
        }
    }

    /// Handle one backend frame; false when the link must be dropped.
    fn on_frame(&mut self, frame: Frame) -> bool {
        let topic_len = match &frame {
            Frame::Subscribe { topic, .. }
            | Frame::Unsubscribe { topic, .. }
            | Frame::Publish { topic, .. } => topic.len(),
            _ => 0,
        };
        if topic_len > MAX_TOPIC_BYTES {
            self.gauges.topic_refused.fetch_add(1, Ordering::Relaxed);
            if self
                .last_topic_log
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
            {
                self.last_topic_log = Some(Instant::now());
                tracing::warn!(
                    upstream = %self.name, backend = %self.addr,
                    "backend sent {} with a {topic_len}-byte topic (limit {MAX_TOPIC_BYTES}); ignored",
                    frame.name()
                );
            }
            return true;
        }
        match frame {
            Frame::Ping(nonce) => return self.answer(Frame::Pong(nonce)),
            Frame::Pong(_) | Frame::Hello { .. } => {}
            frame => {
                let Some(msg) = frame.into_edge() else {
                    return true;
                };
                if let Some(conn) = msg.conn() {
                    let known = self
                        .opens
                        .lock()
                        .map(|t| t.contains_key(&conn.as_u64()))
                        .unwrap_or(true);
                    if !known {
                        // A connection this link never carried or already closed.
                        if !self.answer(Frame::Gone {
                            conn: conn.as_u64(),
                        }) {
                            return false;
                        }
                        // A backend's answer to our close crosses the removal: the core
                        // still waits for it (or ignores it if the client is gone).
                        if !matches!(msg, ToEdge::Close { .. }) {
                            return true;
                        }
                    }
                }
                self.sink.send(msg);
            }
        }
        true
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
        let gauges = RelayGauges::default();
        let mut out = BytesMut::new();
        send_open(7, info("/a"), &opens, &mut out, &gauges);
        send_open(9, info("/b"), &opens, &mut out, &gauges);
        let held = gauges.held();
        assert_eq!(held, 2 * (info("/a").held_bytes() + ENTRY_OVERHEAD) as u64);
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
        forget_open(7, &opens, &gauges);
        forget_open(7, &opens, &gauges);
        assert_eq!(gauges.held(), held / 2, "a close releases its open once");
    }

    /// Two links that start together draw different first backoff delays (their seeds mix
    /// the link index and address, not a shared clock reading).
    #[test]
    fn two_links_first_backoff_delays_differ() {
        let addr = Address::Tcp("127.0.0.1:9".into());
        let mut a = jitter_seed(0, &addr);
        let mut b = jitter_seed(1, &addr);
        let mut c = jitter_seed(0, &Address::Tcp("127.0.0.1:10".into()));
        let (da, db, dc) = (
            jittered(BACKOFF_MIN, &mut a),
            jittered(BACKOFF_MIN, &mut b),
            jittered(BACKOFF_MIN, &mut c),
        );
        assert_ne!(da, db);
        assert_ne!(da, dc);
        for d in [da, db, dc] {
            assert!(d >= BACKOFF_MIN / 2 && d < BACKOFF_MIN, "{d:?}");
        }
    }
}
