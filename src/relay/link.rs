//! One backend link: a non-blocking connection to one backend (TCP or Unix) that many client
//! connections share, driven by the relay thread's event loop (`router`). No thread of its
//! own: the loop hands it socket readiness and the time, and it connects, says hello,
//! reconnects with exponential backoff and jitter, pings, notices a dead or stalled backend,
//! and reads the backend's records straight into the cores' inboxes.
//!
//! Outbound records are encoded by the relay thread directly into the link's out buffer
//! (bounded: the router refuses messages past the route's `buffer_messages` and
//! [`LINK_BUFFER_BYTES`]) and written once per loop turn, so a burst leaves in
//! one `write`. While the link is down they wait there; on reconnect it first replays an `open`
//! for every client connection it carries, so the backend knows them again, then sends what
//! waited.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use crossbeam_channel::Receiver;
use mio::{Interest, Registry, Token};

use super::wire::{self, Decoder, Record};
use super::{EdgeSink, OpenInfo, RelayGauges, ToEdge, ENTRY_OVERHEAD, MAX_TOPIC_BYTES};
use crate::protocol::message::MessageKind;

mod outbox;
mod stream;
pub mod tls;
use outbox::{reset_buffer, Kind, Outbox};
use stream::Stream;
use tls::{BackendTlsFailure, TlsClient, TlsStream};

/// Bytes of messages that may wait for one backend link, whatever their count.
pub const LINK_BUFFER_BYTES: usize = 16 * 1024 * 1024;

/// Where a backend listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Tcp(String),
    /// `HOST:PORT`, over TLS.
    Tls(String),
    Unix(PathBuf),
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Tcp(a) => write!(f, "tcp://{a}"),
            Address::Tls(a) => write!(f, "tls://{a}"),
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// What the router and the metrics see of a link.
#[derive(Debug, Default)]
pub struct LinkState {
    pub live: AtomicBool,
    pub reconnects: AtomicU64,
    /// Message records waiting in the link's out buffer, and their bytes: the buffer the
    /// route's limit applies to. Opens and closes are not counted: they must always get
    /// through, in order.
    pub queued: AtomicUsize,
    pub queued_bytes: AtomicUsize,
    /// Links dropped because the backend did not read what we sent: its pongs/`gone`s piled
    /// up past [`CTL_QUEUE`] or the out buffer made no progress for [`WRITE_TIMEOUT`].
    pub stalled: AtomicU64,
    /// TLS handshakes (or their verdict, read with the backend's hello) that failed, by
    /// [`BackendTlsFailure`] in `ALL` order.
    pub tls_failures: [AtomicU64; BackendTlsFailure::ALL.len()],
}

impl LinkState {
    pub fn tls_failed(&self, why: BackendTlsFailure) -> u64 {
        self.tls_failures[why as usize].load(Ordering::Relaxed)
    }
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
/// An out buffer that makes no progress for this long drops the link (the backend is not
/// reading); it is re-established with backoff.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Link-level answers (pongs, `gone`s) that may wait unwritten; a backend that makes more
/// without reading them is not reading, and its link is dropped.
pub const CTL_QUEUE: usize = 1024;
/// How long a link holds a backend record for a full core inbox (not reading its socket, so
/// TCP slows the backend) before it drops what may be dropped and reads on.
pub const INBOX_WAIT: Duration = Duration::from_secs(1);
/// A link blocked on a full inbox looks again this often.
pub const INBOX_RETRY: Duration = Duration::from_millis(1);
/// Reads per link per loop turn: a busy backend does not starve the others.
const READS_PER_TURN: usize = 4;

/// Where the link is in its life.
enum Phase {
    /// Waiting to (re)connect at the given time.
    Down(Instant),
    /// A host name being resolved on a helper thread (getaddrinfo blocks).
    Resolving(Receiver<io::Result<Vec<SocketAddr>>>),
    /// A non-blocking connect in progress; `rest` are the other resolved addresses.
    Connecting {
        stream: Stream,
        rest: Vec<SocketAddr>,
        deadline: Instant,
    },
    /// Connected to a `tls://` backend; the TLS handshake in progress.
    Handshaking {
        stream: Stream,
        deadline: Instant,
    },
    /// Connected; our hello sent (what of it is left in `hello`), waiting for the backend's.
    Greeting {
        stream: Stream,
        hello: BytesMut,
        deadline: Instant,
    },
    Up(Stream),
}

/// A connection's `open` as the link replays it, and whether its first one was written.
struct Stored {
    replay: Record,
    bytes: usize,
    sent: bool,
}

/// What a link's turn needs from the loop.
pub(super) struct Ctx<'a, S> {
    pub registry: &'a Registry,
    pub sink: &'a mut S,
    pub gauges: &'a RelayGauges,
    /// Wakes the loop when a name is resolved.
    pub waker: &'a Arc<mio::Waker>,
    /// The loop's read buffer, shared by every link.
    pub scratch: &'a mut [u8],
    pub now: Instant,
    /// With `[cluster]`: where publishes also go, and replies for other nodes' connections.
    pub cluster: Option<&'a super::cluster::ClusterBus>,
}

pub(super) struct Link {
    pub upstream: String,
    addr: Address,
    /// For `tls://` backends.
    tls: Option<TlsClient>,
    pub state: Arc<LinkState>,
    token: Token,
    phase: Phase,
    seed: u64,
    backoff: Duration,
    max_frame: usize,
    out: Outbox,
    inbuf: BytesMut,
    readable: bool,
    writable: bool,
    last_read: Instant,
    last_write: Instant,
    /// Since when the out buffer waits without a byte written.
    waiting_since: Option<Instant>,
    opens: HashMap<u64, Stored>,
    /// A backend record waiting for room in a full core inbox, and since when.
    held: Option<(ToEdge, Instant)>,
    /// When an over-long topic was last logged (one line per second at most).
    last_topic_log: Option<Instant>,
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

/// Bytes a stored `open` holds, as charged to the relay gauge.
fn open_bytes(info: &OpenInfo) -> usize {
    info.held_bytes() + ENTRY_OVERHEAD
}

/// Why a message was not queued: the link's buffer is at its limit.
#[derive(Debug, Clone, Copy)]
pub(super) struct Full {
    pub queued: usize,
    pub bytes: usize,
}

impl Link {
    pub(super) fn new(
        index: usize,
        upstream: String,
        addr: Address,
        tls: Option<TlsClient>,
        state: Arc<LinkState>,
        max_frame: usize,
        now: Instant,
    ) -> Link {
        Link {
            upstream,
            seed: jitter_seed(index, &addr),
            addr,
            tls,
            state,
            token: Token(index),
            phase: Phase::Down(now),
            backoff: BACKOFF_MIN,
            max_frame,
            out: Outbox::default(),
            inbuf: BytesMut::new(),
            readable: false,
            writable: false,
            last_read: now,
            last_write: now,
            waiting_since: None,
            opens: HashMap::new(),
            held: None,
            last_topic_log: None,
        }
    }

    // ----- what the router queues -----

    /// Queue `conn`'s first `open` and keep it, flagged, for replay.
    pub(super) fn push_open(&mut self, conn: u64, info: OpenInfo, gauges: &RelayGauges) {
        let bytes = open_bytes(&info);
        let mut open = Record::Open {
            conn,
            path: info.path,
            query: info.query,
            headers: info.headers,
            peer: info.peer.map(|p| p.to_string()),
            authorize: info.authorize,
            replay: false,
        };
        self.out.push(Kind::Open(conn), &open);
        if let Record::Open { replay, .. } = &mut open {
            *replay = true;
        }
        gauges.charge(bytes);
        let stored = Stored {
            replay: open,
            bytes,
            sent: false,
        };
        if let Some(old) = self.opens.insert(conn, stored) {
            gauges.release(old.bytes);
        }
    }

    /// Queue our `close` for `conn` and forget its `open`.
    /// A `gone` from the node that owns `conn` (cluster): like our own, a control record;
    /// past [`CTL_QUEUE`] unwritten ones it is dropped (the backend is not reading).
    pub(super) fn push_gone(&mut self, conn: u64) {
        if self.out.control < CTL_QUEUE {
            self.out.push(Kind::Control, &Record::Gone { conn });
        }
    }

    pub(super) fn push_close(&mut self, conn: u64, code: u16, gauges: &RelayGauges) {
        self.out.push(
            Kind::Close,
            &Record::Close {
                conn,
                code,
                reason: String::new(),
            },
        );
        if let Some(stored) = self.opens.remove(&conn) {
            gauges.release(stored.bytes);
        }
    }

    /// Queue a client message unless the link already holds `limit` messages or
    /// [`LINK_BUFFER_BYTES`] of them.
    pub(super) fn push_message(
        &mut self,
        conn: u64,
        kind: MessageKind,
        payload: Bytes,
        limit: usize,
        gauges: &RelayGauges,
    ) -> Result<(), Full> {
        let record = Record::Message {
            conn,
            kind,
            payload,
        };
        let len = wire::encoded_len(&record);
        let queued = self.state.queued.load(Ordering::Relaxed);
        let bytes = self.state.queued_bytes.load(Ordering::Relaxed);
        if queued >= limit || bytes.saturating_add(len) > LINK_BUFFER_BYTES {
            return Err(Full { queued, bytes });
        }
        // Only this thread writes these: plain stores, no locked instruction per message.
        self.state.queued.store(queued + 1, Ordering::Relaxed);
        self.state
            .queued_bytes
            .store(bytes + len, Ordering::Relaxed);
        gauges.charge(len + ENTRY_OVERHEAD);
        self.out.push(Kind::Message, &record);
        Ok(())
    }

    pub(super) fn is_live(&self) -> bool {
        matches!(self.phase, Phase::Up(_))
    }

    pub(super) fn is_down(&self) -> bool {
        matches!(self.phase, Phase::Down(_))
    }

    pub(super) fn has_unsent(&self) -> bool {
        !self.out.is_empty() || matches!(&self.phase, Phase::Up(s) if s.has_pending())
    }

    // ----- what the loop drives -----

    /// Readiness from the poller.
    pub(super) fn on_event(&mut self, readable: bool, writable: bool) {
        self.readable |= readable;
        self.writable |= writable;
    }

    /// When the loop must turn for this link at the latest, and whether it has work now.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        if let Some((_, since)) = &self.held {
            return Some(*since.max(&self.last_read) + INBOX_RETRY);
        }
        match &self.phase {
            Phase::Down(at) => Some(*at),
            Phase::Resolving(_) => None,
            Phase::Connecting { deadline, .. }
            | Phase::Handshaking { deadline, .. }
            | Phase::Greeting { deadline, .. } => Some(*deadline),
            Phase::Up(_) => {
                let mut t = (self.last_read + DEAD_AFTER).min(self.last_write + PING_EVERY);
                if let Some(w) = self.waiting_since {
                    t = t.min(w + WRITE_TIMEOUT);
                }
                Some(t)
            }
        }
    }

    /// Whether a read budget ran out with the socket still readable: turn again at once.
    pub(super) fn busy(&self) -> bool {
        self.is_live() && self.readable && self.held.is_none()
    }

    /// One loop turn: advance the connect, read and deliver the backend's records, run the
    /// heartbeat and stall timers. Writing is [`Link::flush`]'s, once per turn.
    pub(super) fn turn<S: EdgeSink>(&mut self, cx: &mut Ctx<'_, S>) {
        match &mut self.phase {
            Phase::Down(at) => {
                if cx.now >= *at {
                    self.start_connect(cx);
                }
            }
            Phase::Resolving(rx) => match rx.try_recv() {
                Ok(Ok(addrs)) => self.connect_next(addrs, cx),
                Ok(Err(e)) => self.connect_failed(e, cx),
                Err(crossbeam_channel::TryRecvError::Empty) => {}
                Err(crossbeam_channel::TryRecvError::Disconnected) => {
                    self.connect_failed(io::Error::other("name resolver gone"), cx)
                }
            },
            Phase::Connecting { .. } => self.on_connecting(cx),
            Phase::Handshaking { .. } => self.on_handshaking(cx),
            Phase::Greeting { .. } => self.on_greeting(cx),
            Phase::Up(_) => self.on_up(cx),
        }
    }

    fn start_connect<S: EdgeSink>(&mut self, cx: &mut Ctx<'_, S>) {
        match &self.addr {
            Address::Tcp(a) | Address::Tls(a) => {
                if let Ok(sa) = a.parse::<SocketAddr>() {
                    return self.connect_next(vec![sa], cx);
                }
                let (tx, rx) = crossbeam_channel::bounded(1);
                let name = a.clone();
                let waker = cx.waker.clone();
                let spawned = std::thread::Builder::new()
                    .name("ringway-resolve".into())
                    .spawn(move || {
                        let result = name.to_socket_addrs().map(|i| i.collect::<Vec<_>>());
                        let _ = tx.send(result);
                        let _ = waker.wake();
                    });
                match spawned {
                    Ok(_) => self.phase = Phase::Resolving(rx),
                    Err(e) => self.connect_failed(e, cx),
                }
            }
            Address::Unix(p) => match mio::net::UnixStream::connect(p) {
                Ok(s) => self.connecting(Stream::Unix(s), Vec::new(), cx),
                Err(e) => self.connect_failed(e, cx),
            },
        }
    }

    /// Connect to the first of `addrs`, keeping the rest for if it fails.
    fn connect_next<S: EdgeSink>(&mut self, mut addrs: Vec<SocketAddr>, cx: &mut Ctx<'_, S>) {
        if addrs.is_empty() {
            let e = io::Error::other(format!("{} resolves to no address", self.addr));
            return self.connect_failed(e, cx);
        }
        let sa = addrs.remove(0);
        match mio::net::TcpStream::connect(sa) {
            Ok(s) => self.connecting(Stream::Tcp(s), addrs, cx),
            Err(e) if !addrs.is_empty() => {
                tracing::debug!(backend = %self.addr, "connect to {sa} failed: {e}");
                self.connect_next(addrs, cx)
            }
            Err(e) => self.connect_failed(e, cx),
        }
    }

    fn connecting<S: EdgeSink>(
        &mut self,
        mut stream: Stream,
        rest: Vec<SocketAddr>,
        cx: &mut Ctx<'_, S>,
    ) {
        if let Err(e) = cx.registry.register(
            stream.source(),
            self.token,
            Interest::READABLE | Interest::WRITABLE,
        ) {
            return self.connect_failed(e, cx);
        }
        self.readable = false;
        self.writable = false;
        self.phase = Phase::Connecting {
            stream,
            rest,
            deadline: cx.now + CONNECT_TIMEOUT,
        };
        // A Unix connect (and, rarely, a loopback one) may be complete already.
        self.on_connecting(cx);
    }

    fn on_connecting<S: EdgeSink>(&mut self, cx: &mut Ctx<'_, S>) {
        let Phase::Connecting {
            stream, deadline, ..
        } = &mut self.phase
        else {
            return;
        };
        let outcome = match stream.connected() {
            Ok(true) => Ok(()),
            Ok(false) if cx.now >= *deadline => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect timed out after {} ms", CONNECT_TIMEOUT.as_millis()),
            )),
            Ok(false) => return,
            Err(e) => Err(e),
        };
        let Phase::Connecting {
            mut stream, rest, ..
        } = std::mem::replace(&mut self.phase, Phase::Down(cx.now))
        else {
            unreachable!("matched above")
        };
        match outcome {
            Ok(()) => {
                if let Stream::Tcp(s) = &stream {
                    if let Err(e) = s.set_nodelay(true) {
                        let _ = cx.registry.deregister(stream.source());
                        return self.connect_failed(e, cx);
                    }
                }
                let stream = match stream {
                    Stream::Tcp(mut sock) if matches!(self.addr, Address::Tls(_)) => {
                        let conn = match &self.tls {
                            Some(client) => tls::connection(client),
                            None => Err(io::Error::other("no TLS client configuration")),
                        };
                        match conn {
                            Ok(conn) => Stream::Tls(Box::new(TlsStream::new(sock, conn))),
                            Err(e) => {
                                let _ = cx.registry.deregister(&mut sock);
                                return self.connect_failed(e, cx);
                            }
                        }
                    }
                    stream => return self.greet(stream, cx),
                };
                self.phase = Phase::Handshaking {
                    stream,
                    deadline: cx.now + HELLO_TIMEOUT,
                };
                self.on_handshaking(cx);
            }
            Err(e) => {
                let _ = cx.registry.deregister(stream.source());
                drop(stream);
                if rest.is_empty() {
                    self.connect_failed(e, cx)
                } else {
                    self.connect_next(rest, cx)
                }
            }
        }
    }

    /// Drive the TLS handshake; once done, greet. A failure is retried like a refused
    /// connect, counted by reason.
    fn on_handshaking<S: EdgeSink>(&mut self, cx: &mut Ctx<'_, S>) {
        let Phase::Handshaking { stream, deadline } = &mut self.phase else {
            return;
        };
        let Stream::Tls(tls) = stream else {
            return;
        };
        let outcome = match tls.handshake() {
            Ok(false) if cx.now >= *deadline => Err(tls::failed(
                BackendTlsFailure::Timeout,
                format!("no TLS handshake within {} s", HELLO_TIMEOUT.as_secs()),
            )),
            Ok(false) => return,
            other => other,
        };
        let Phase::Handshaking { mut stream, .. } =
            std::mem::replace(&mut self.phase, Phase::Down(cx.now))
        else {
            unreachable!("matched above")
        };
        match outcome {
            Ok(_) => self.greet(stream, cx),
            Err(e) => {
                let _ = cx.registry.deregister(stream.source());
                self.connect_failed(e, cx)
            }
        }
    }

    /// Connected (and TLS done): send our hello.
    fn greet<S: EdgeSink>(&mut self, stream: Stream, cx: &mut Ctx<'_, S>) {
        let mut hello = BytesMut::new();
        wire::encode(
            &Record::Hello {
                version: wire::VERSION,
                name: "ringway".into(),
            },
            &mut hello,
        );
        self.inbuf.clear();
        self.phase = Phase::Greeting {
            stream,
            hello,
            deadline: cx.now + HELLO_TIMEOUT,
        };
        self.writable = true;
        self.readable = true;
        self.on_greeting(cx);
    }

    /// Write our hello, read theirs; anything after it in the same read stays in `inbuf`.
    fn on_greeting<S: EdgeSink>(&mut self, cx: &mut Ctx<'_, S>) {
        let Phase::Greeting {
            stream,
            hello,
            deadline,
        } = &mut self.phase
        else {
            return;
        };
        let result = (|| -> io::Result<bool> {
            while !hello.is_empty() && self.writable {
                match stream.write(hello) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => hello.advance(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable = false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            let mut decoder = Decoder::new(self.max_frame);
            loop {
                match decoder.decode(&mut self.inbuf) {
                    Ok(Some(Record::Hello { .. })) => return Ok(true),
                    Ok(Some(other)) => {
                        return Err(io::Error::other(format!(
                            "backend sent {other:?} before hello"
                        )))
                    }
                    Ok(None) => {}
                    Err(e) => return Err(io::Error::other(format!("bad hello from backend: {e}"))),
                }
                if !self.readable {
                    break;
                }
                match read_into(stream, &mut self.inbuf, cx.scratch) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.readable = false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            if cx.now >= *deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no hello from the backend within 5 s",
                ));
            }
            Ok(false)
        })();
        match result {
            Ok(false) => {}
            Ok(true) => self.up(cx),
            Err(e) => {
                if let Phase::Greeting { mut stream, .. } =
                    std::mem::replace(&mut self.phase, Phase::Down(cx.now))
                {
                    let _ = cx.registry.deregister(stream.source());
                }
                self.connect_failed(e, cx);
            }
        }
    }

    fn connect_failed<S: EdgeSink>(&mut self, e: io::Error, cx: &mut Ctx<'_, S>) {
        // Exponential backoff with full jitter, so a fleet of gateways does not reconnect in
        // lockstep when a backend comes back.
        let wait = jittered(self.backoff, &mut self.seed);
        if let Some(why) = tls::reason_of(&e) {
            self.state.tls_failures[why as usize].fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                upstream = %self.upstream, backend = %self.addr, reason = why.label(),
                "backend refused over TLS: {e}; retrying in {} ms", wait.as_millis()
            );
        } else {
            tracing::warn!(
                upstream = %self.upstream, backend = %self.addr,
                "backend unreachable: {e}; retrying in {} ms", wait.as_millis()
            );
        }
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        self.phase = Phase::Down(cx.now + wait);
    }

    /// The hellos are exchanged: replay every carried connection's `open`, then what waited.
    fn up<S: EdgeSink>(&mut self, cx: &mut Ctx<'_, S>) {
        let Phase::Greeting { stream, .. } =
            std::mem::replace(&mut self.phase, Phase::Down(cx.now))
        else {
            return;
        };
        self.phase = Phase::Up(stream);
        self.backoff = BACKOFF_MIN;
        self.state.live.store(true, Ordering::Release);
        let carried = self.opens.values().filter(|s| s.sent).count();
        tracing::info!(upstream = %self.upstream, backend = %self.addr, carried, "backend link up");
        let waiting = std::mem::take(&mut self.out);
        for stored in self.opens.values().filter(|s| s.sent) {
            self.out.push(Kind::Replay, &stored.replay);
        }
        self.out.buf.extend_from_slice(&waiting.buf);
        self.out.records.extend(waiting.records);
        self.out.control += waiting.control;
        self.last_read = cx.now;
        self.last_write = cx.now;
        self.waiting_since = None;
        self.on_up(cx);
    }

    fn on_up<S: EdgeSink>(&mut self, cx: &mut Ctx<'_, S>) {
        if let Err(why) = self.read_and_deliver(cx) {
            return self.lost(why, cx);
        }
        if cx.now.saturating_duration_since(self.last_read) >= DEAD_AFTER {
            return self.lost(
                Lost::Io(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("read nothing for {} s", DEAD_AFTER.as_secs()),
                )),
                cx,
            );
        }
        if let Some(since) = self.waiting_since {
            if cx.now.saturating_duration_since(since) >= WRITE_TIMEOUT {
                return self.lost(
                    Lost::Stalled(format!(
                        "the backend read nothing for {} ms",
                        WRITE_TIMEOUT.as_millis()
                    )),
                    cx,
                );
            }
        }
        if self.out.is_empty() && cx.now.saturating_duration_since(self.last_write) >= PING_EVERY {
            self.out.push(Kind::Control, &Record::Ping(0));
        }
    }

    /// Deliver what waits, then read while there is room in the inboxes.
    fn read_and_deliver<S: EdgeSink>(&mut self, cx: &mut Ctx<'_, S>) -> Result<(), Lost> {
        if let Some((msg, since)) = self.held.take() {
            if cx.sink.has_room(&msg) {
                cx.sink.send(msg);
            } else if cx.now.saturating_duration_since(since) >= INBOX_WAIT {
                // Waited long enough: drop it if it may be dropped (counted), and read on.
                cx.sink.send_now(msg);
            } else {
                self.held = Some((msg, since));
                return Ok(());
            }
        }
        let mut decoder = Decoder::new(self.max_frame).only_from(wire::Side::Backend);
        let mut reads = 0;
        loop {
            while self.held.is_none() {
                match decoder.decode(&mut self.inbuf) {
                    Ok(Some(record)) => self.on_record(record, cx)?,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::error!(
                            upstream = %self.upstream, backend = %self.addr,
                            "backend sent an invalid frame ({e}); resetting the link"
                        );
                        return Err(Lost::Invalid(e.to_string()));
                    }
                }
            }
            if self.inbuf.is_empty() {
                reset_buffer(&mut self.inbuf);
            }
            if self.held.is_some() || !self.readable || reads == READS_PER_TURN {
                return Ok(());
            }
            let Phase::Up(stream) = &mut self.phase else {
                return Ok(());
            };
            reads += 1;
            match read_into(stream, &mut self.inbuf, cx.scratch) {
                Ok(()) => self.last_read = cx.now,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.readable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Lost::Io(e)),
            }
        }
    }

    /// A link-level answer; past [`CTL_QUEUE`] unwritten ones (after trying to write them)
    /// the backend is not reading.
    fn answer<S: EdgeSink>(&mut self, record: Record, cx: &mut Ctx<'_, S>) -> Result<(), Lost> {
        if self.out.control >= CTL_QUEUE {
            self.flush(cx.now, cx.gauges).map_err(Lost::Io)?;
            if self.out.control >= CTL_QUEUE {
                return Err(Lost::Stalled(format!("{CTL_QUEUE} pongs/gone waiting")));
            }
        }
        self.out.push(Kind::Control, &record);
        Ok(())
    }

    /// Handle one backend record.
    fn on_record<S: EdgeSink>(&mut self, record: Record, cx: &mut Ctx<'_, S>) -> Result<(), Lost> {
        let topic_len = match &record {
            Record::Subscribe { topic, .. }
            | Record::Unsubscribe { topic, .. }
            | Record::Publish { topic, .. } => topic.len(),
            _ => 0,
        };
        if topic_len > MAX_TOPIC_BYTES {
            cx.gauges.topic_refused.fetch_add(1, Ordering::Relaxed);
            if self
                .last_topic_log
                .is_none_or(|t| cx.now.saturating_duration_since(t) >= Duration::from_secs(1))
            {
                self.last_topic_log = Some(cx.now);
                tracing::warn!(
                    upstream = %self.upstream, backend = %self.addr,
                    "backend sent {} with a {topic_len}-byte topic (limit {MAX_TOPIC_BYTES}); ignored",
                    record.name()
                );
            }
            return Ok(());
        }
        match record {
            Record::Ping(nonce) => return self.answer(Record::Pong(nonce), cx),
            Record::Pong(_) | Record::Hello { .. } => {}
            record => {
                let Some(msg) = super::to_edge(record) else {
                    return Ok(());
                };
                if let Some(bus) = cx.cluster {
                    if bus.is_remote(&msg) {
                        // Another node's connection: its node answers `gone` if need be
                        // (or ours, when it cannot get there).
                        let conn = msg.conn().map_or(0, |c| c.as_u64());
                        if !bus.to_node(msg, Some(self.token.0 as u32)) {
                            self.answer(Record::Gone { conn }, cx)?;
                        }
                        return Ok(());
                    }
                    bus.fan_out(&msg);
                }
                if let Some(conn) = msg.conn() {
                    if !self.opens.contains_key(&conn.as_u64()) {
                        // A connection this link never carried or already closed.
                        self.answer(
                            Record::Gone {
                                conn: conn.as_u64(),
                            },
                            cx,
                        )?;
                        // A backend's answer to our close crosses the removal: the core
                        // still waits for it (or ignores it if the client is gone).
                        if !matches!(msg, ToEdge::Close { .. }) {
                            return Ok(());
                        }
                    }
                }
                if cx.sink.has_room(&msg) {
                    cx.sink.send(msg);
                } else {
                    // Stop reading this backend until the core makes room: TCP slows it.
                    self.held = Some((msg, cx.now));
                }
            }
        }
        Ok(())
    }

    /// Write what waits, once per loop turn. Errors mean the link is lost.
    pub(super) fn flush(&mut self, now: Instant, gauges: &RelayGauges) -> io::Result<()> {
        let Phase::Up(stream) = &mut self.phase else {
            return Ok(());
        };
        if self.writable && stream.has_pending() {
            match stream.push() {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable = false,
                Err(e) => return Err(e),
            }
        }
        let out = &mut self.out;
        if out.is_empty() {
            return Ok(());
        }
        let mut progress = false;
        while self.writable && out.written < out.buf.len() {
            match stream.write(&out.buf[out.written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    out.written += n;
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if progress {
            self.last_write = now;
            // Account for every record now completely written.
            let (mut done, mut messages, mut message_bytes) = (0, 0, 0);
            while let Some(&(len, kind)) = out.records.front() {
                if done + len > out.written {
                    break;
                }
                out.records.pop_front();
                done += len;
                match kind {
                    Kind::Message => {
                        messages += 1;
                        message_bytes += len;
                    }
                    Kind::Open(conn) => {
                        if let Some(stored) = self.opens.get_mut(&conn) {
                            stored.sent = true;
                        }
                    }
                    Kind::Control => out.control -= 1,
                    Kind::Close | Kind::Replay => {}
                }
            }
            out.buf.advance(done);
            out.written -= done;
            if out.buf.is_empty() {
                // Start again at the front of the allocation (or without one).
                reset_buffer(&mut out.buf);
            }
            if messages > 0 {
                let q = self.state.queued.load(Ordering::Relaxed);
                let b = self.state.queued_bytes.load(Ordering::Relaxed);
                self.state
                    .queued
                    .store(q.saturating_sub(messages), Ordering::Relaxed);
                self.state
                    .queued_bytes
                    .store(b.saturating_sub(message_bytes), Ordering::Relaxed);
                gauges.release(message_bytes + messages * ENTRY_OVERHEAD);
            }
        }
        self.waiting_since = if out.is_empty() {
            None
        } else if progress {
            Some(now)
        } else {
            Some(self.waiting_since.unwrap_or(now))
        };
        Ok(())
    }

    /// A write failed: the link is lost.
    pub(super) fn write_failed(&mut self, e: io::Error, registry: &Registry, now: Instant) {
        tracing::warn!(upstream = %self.upstream, backend = %self.addr, "backend link lost while writing: {e}");
        self.drop_link(registry, now);
    }

    fn lost<S: EdgeSink>(&mut self, why: Lost, cx: &mut Ctx<'_, S>) {
        match why {
            Lost::Io(e) => {
                tracing::warn!(upstream = %self.upstream, backend = %self.addr, "backend link lost: {e}")
            }
            Lost::Stalled(what) => {
                self.state.stalled.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    upstream = %self.upstream, backend = %self.addr,
                    "backend does not read what we send ({what}); resetting the link"
                );
            }
            Lost::Invalid(reason) => {
                // Last words before the link goes: one attempt, never a wait.
                self.out.push(
                    Kind::Control,
                    &Record::Error {
                        reason: format!("invalid frame: {reason}"),
                    },
                );
                let _ = self.flush(cx.now, cx.gauges);
            }
        }
        self.drop_link(cx.registry, cx.now);
    }

    /// Close the socket and reconnect at once; what was not written waits for the next link.
    fn drop_link(&mut self, registry: &Registry, now: Instant) {
        if let Phase::Up(mut stream) = std::mem::replace(&mut self.phase, Phase::Down(now)) {
            let _ = registry.deregister(stream.source());
        }
        self.state.live.store(false, Ordering::Release);
        self.state.reconnects.fetch_add(1, Ordering::Relaxed);
        self.out.carry();
        self.inbuf = BytesMut::new();
        self.waiting_since = None;
        self.readable = false;
        self.writable = false;
    }

    /// The gateway stops: close the socket, release what the link holds.
    pub(super) fn close(&mut self, registry: &Registry, gauges: &RelayGauges) {
        if let Phase::Up(mut s)
        | Phase::Connecting { stream: mut s, .. }
        | Phase::Handshaking { stream: mut s, .. }
        | Phase::Greeting { stream: mut s, .. } =
            std::mem::replace(&mut self.phase, Phase::Down(Instant::now()))
        {
            let _ = registry.deregister(s.source());
        }
        self.state.live.store(false, Ordering::Release);
        let opens: usize = self.opens.drain().map(|(_, s)| s.bytes).sum();
        gauges.release(opens);
        let bytes = self.state.queued_bytes.swap(0, Ordering::Relaxed);
        let n = self.state.queued.swap(0, Ordering::Relaxed);
        gauges.release(bytes + n * ENTRY_OVERHEAD);
        self.out = Outbox::default();
    }

    #[cfg(test)]
    fn outbox_bytes(&self) -> BytesMut {
        self.out.buf.clone()
    }
}

/// Why an up link is dropped.
enum Lost {
    Io(io::Error),
    /// The backend does not read what we send.
    Stalled(String),
    /// The backend sent an invalid record: it gets an `error` first.
    Invalid(String),
}

/// One read into `buf` through the loop's scratch (no zero-filling per read, no unsafe).
fn read_into(stream: &mut Stream, buf: &mut BytesMut, scratch: &mut [u8]) -> io::Result<()> {
    match stream.read(scratch) {
        Ok(0) => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "backend closed the link",
        )),
        Ok(n) => {
            buf.extend_from_slice(&scratch[..n]);
            Ok(())
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests;
