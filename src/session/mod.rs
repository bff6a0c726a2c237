//! The sans-IO life of one client connection, between the protocol core and the edge's
//! io_uring driver: bytes in (`on_bytes`), relay replies in (`on_relay_*`), deadlines asked
//! for (`poll_timeout`) and fired (`handle_timeout`); out come bytes to transmit (`queued`),
//! events for the relay (`Output`), and what to do with the socket (`poll_shutdown`).
//! No sockets, rings or clocks: time is passed in (`Context::now_ms`, `Context::unix_ms`).
//!
//! Data path: ring -> worker -> **session** (handshake -> admission -> frames -> message)
//! -> route -> relay -> inbox -> **session** (outbound queue) -> worker -> ring.
//!
//! It owns the lifecycle ([`State`]), the close and fence rules, the per-connection timers
//! (one [`TimerTable`]), what each frame means (pong, close reply, message to route) and the
//! outbound queue's accounting. The driver keeps the fd and the ring state (recv armed,
//! send in flight, shut) beside it.
#![forbid(unsafe_code)]

pub mod compression;
mod demo_page;
mod frames;
mod queue;
#[cfg(test)]
mod tests;
mod timers;
mod transport;

use std::collections::VecDeque;
use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};

use crate::admission::{self, AcceptRefusal, MessageRefusal, PolicyRefusal};
use crate::config::{Config, SlowConsumer};
use crate::ids::{ConnId, UpstreamId};
use crate::policy::rate::MessageRate;
use crate::protocol::close::{self, CloseHandshake};
use crate::protocol::deflate::Agreed;
use crate::protocol::frame::{self, OpCode, Role, MAX_HEADER_LEN};
use crate::protocol::handshake::{self, Parsed, Request};
use crate::protocol::message::{Limits, MessageDecoder, MessageKind, RSV1};
use crate::relay::{OpenInfo, ToUpstream, Topic};
use crate::route::{Backend, RouteId, RouteTable};

use queue::Outbound;
pub use queue::ENTRY_BYTES;
pub use timers::{Timer, TimerTable};
pub use transport::{TlsFailure, TLS_BUFFER_LIMIT, TLS_HANDSHAKE_BYTES, TLS_OPEN_BYTES};

/// What a connection is charged against the memory budget besides its buffers: its slot,
/// timer entry and bookkeeping. Measured at 1.5-2.1 KiB of RSS per idle connection
/// (ringway-bench idle, 10,000 connections).
pub const BASE_BYTES: usize = 2048;

/// What one subscription costs besides its topic name: its slot in `subscriptions`, its
/// entry in the core's topic table (key, Vec header, slot index) and the `Arc<str>` counts.
pub const SUBSCRIPTION_BYTES: usize = 96;

/// Unsent bytes past which a new pong replaces a queued one (see `Outbound::push_pong`).
pub const PONG_COALESCE_PAST: usize = 64 * 1024;

/// A client paused because its outbound queue is over `send_queue_bytes` is closed 1008
/// "slow consumer" if it is still over after this long.
pub const SLOW_CONSUMER_GRACE_MS: u64 = 5_000;
/// How many times `send_queue_bytes` the relay's sends to a client may fill its queue before
/// it is closed at once (topic and broadcast frames, local echoes: once): see `queue_data`.
const REPLY_SLACK: usize = 4;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Waiting for the complete upgrade request.
    Handshaking,
    /// The request is held until the backend accepts or rejects it.
    Authorizing,
    /// WebSocket frames flow both ways.
    Open,
    /// Ending: a close frame went out or came in, or we wait for the relay to hand back
    /// our close after earlier replies (a fence). Input is drained, not acted on, once the
    /// client broke the protocol or closed.
    Closing,
    /// Nothing more will be queued: the last bytes leave, then FIN, then we wait for the
    /// client's FIN (or the linger time).
    Draining,
    /// The driver shut the socket; the slot goes once its ring operations finish.
    Closed,
}

/// What the socket needs, as the session sees it (`Session::poll_shutdown`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// Everything is flushed: send FIN (`shutdown(SHUT_WR)`) and drain input.
    Write,
    /// Stop all traffic and free the slot once ring operations finish.
    Both,
}

/// What a session hands its driver besides bytes to transmit.
#[derive(Debug)]
pub enum Output {
    /// For the relay: `Open`, `Fence` or `Closed` (in order with the messages).
    Relay(ToUpstream),
    /// A client message for `upstream`; the driver charges it to the connection's relay
    /// in-flight bytes and passes it on.
    Message {
        upstream: UpstreamId,
        kind: MessageKind,
        payload: Bytes,
    },
}

/// What a session counts; the driver's core statistics implement it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    /// A 101 went out, this long after the connection was accepted.
    HandshakeOk {
        latency_ms: u64,
        route: RouteId,
    },
    HandshakeRejected,
    MessageIn {
        route: RouteId,
    },
    MessageOut {
        route: RouteId,
    },
    /// A client message handed to `upstream` (counted per route and upstream).
    Relayed {
        route: RouteId,
        upstream: UpstreamId,
    },
    ProtocolError,
    /// Refused by the edge's policy (`ringway_policy_refusals_total`).
    Refused(PolicyRefusal),
    /// Closed 1008 "slow consumer".
    SlowConsumerClosed,
    /// A topic or broadcast frame dropped for a full send queue (drop-newest).
    SlowConsumerDropped,
    /// permessage-deflate: an outbound message compressed (bytes before and after), or sent
    /// plain for being under `compression_min_bytes`.
    Compressed {
        before: usize,
        after: usize,
    },
    CompressionSkipped,
    /// A `dedicated` route's connection got `shared`: its core had
    /// `compression_dedicated_per_core` already.
    DedicatedFallback,
    /// An inbound compressed message inflated (bytes on the wire and inflated), or refused.
    Inflated {
        before: usize,
        after: usize,
    },
    InflateFailed(compression::InflateFailure),
    /// The TLS layer failed (`ringway_tls_handshake_failures_total`).
    TlsFailure(TlsFailure),
}

pub trait Meter {
    fn count(&self, what: Count);
}

/// What a session call needs from its core: the time, the configuration and routes, where
/// to count, and where to put its outputs.
pub struct Context<'a> {
    /// The core's monotonic clock, ms.
    pub now_ms: u64,
    /// Wall-clock Unix ms as of `now_ms` (token `exp`/`nbf`).
    pub unix_ms: u64,
    pub config: &'a Config,
    pub routes: &'a RouteTable,
    pub meter: &'a dyn Meter,
    /// A relay is attached: messages go to it, and closes are fenced through it.
    pub relay: bool,
    /// simd-json parses in place: messages are routed on a copy here.
    pub scratch: &'a mut Vec<u8>,
    /// The core's permessage-deflate compressor and inflater, shared by its connections.
    pub codec: &'a mut compression::SharedCodec,
    /// Test-only panic hook (`RINGWAY_TEST_PANIC_ON`).
    pub panic_on: Option<&'a [u8]>,
    pub out: &'a mut Vec<Output>,
}

/// The lifecycle as stored: [`State`] with what each stage alone holds. It only moves
/// forward (Handshaking -> Authorizing -> Open -> Closing -> Draining -> Closed, skipping
/// stages where the life is cut short); `enter_closing`, `drain`, `abort` and `on_shut` are
/// the only ways past Open.
#[derive(Debug)]
enum Lifecycle {
    /// Bytes of the request so far.
    Handshaking(BytesMut),
    /// Complete request held until the backend answers; `rest` holds bytes the client sent
    /// after the request meanwhile.
    Authorizing {
        request: Box<Request>,
        rest: BytesMut,
        until_ms: u64,
    },
    Open,
    /// A close frame went out or came in, a fence is pending, or input is no longer acted on.
    Closing,
    /// Nothing more is queued: the rest leaves, then FIN (`fin_sent_ms`), then the client's
    /// FIN or the linger time. `abort`: the linger expired, drop TCP flushed or not.
    Draining {
        fin_sent_ms: Option<u64>,
        abort: bool,
    },
    Closed,
}

/// Waiting for the relay to hand back our close after every reply it passed on before.
#[derive(Debug)]
struct Fence {
    since_ms: u64,
    /// The client broke the protocol (or a message was refused): this close goes out when
    /// the fence returns, whatever the relay's code, or when it times out.
    error: Option<(u16, String)>,
}

/// Whether a `subscribe` took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subscribed {
    New,
    Already,
    /// Over the route's `max_subscriptions`: ignored (and counted by the driver).
    Limit,
}

/// One client connection's state. See the module docs.
#[derive(Debug)]
pub struct Session {
    id: ConnId,
    peer: Option<SocketAddr>,
    state: Lifecycle,
    /// The 101 went out: its frames flow (through Closing and Draining too).
    opened: bool,
    decoder: MessageDecoder,
    close: CloseHandshake,
    /// Input is no longer acted on, only drained (protocol error, refused handshake, close).
    reading_done: bool,
    /// The client closed its side (recv returned 0) or the socket failed.
    eof: bool,
    /// A send failed (EPIPE/ECONNRESET): the client went away.
    send_failed: bool,
    fence: Option<Box<Fence>>,
    /// The client ended it (protocol error or its close): no close reply to wait for.
    closing_without_reply: bool,
    /// The relay knows it (its `Open` went out): the relay gets `Closed` when the slot is
    /// freed, and a client's protocol error is fenced through the relay.
    counted_open: bool,
    /// It is bound to (or sent a message to) an upstream outside this process, whose
    /// answer to a fence a client's protocol error does not wait for.
    uses_backend: bool,
    out: Outbound,
    /// Close code we sent, or received, for the relay's `Closed` event; 1006 until then.
    close_code: u16,
    accepted_ms: u64,
    last_rx_ms: u64,
    last_message_ms: u64,
    ping_sent_ms: Option<u64>,
    close_sent_ms: Option<u64>,
    /// Over its send queue (and paused by the driver) since when.
    over_queue_ms: Option<u64>,
    /// When its JWT expires, on the core's clock.
    token_expiry_ms: Option<u64>,
    /// Topics it is subscribed to (the core's topic table holds the reverse).
    subscriptions: Vec<Topic>,
    /// Index of the route its handshake path matched.
    route: RouteId,
    rate: Option<MessageRate>,
    /// The subprotocol the 101 names (the companion of a token carried in one).
    protocol: Option<String>,
    /// permessage-deflate as agreed in the handshake (shared: no state of its own).
    deflate: Option<Agreed>,
    /// `dedicated`: its own compressor and inflater, made on first use.
    contexts: compression::Contexts,
    /// Plain TCP, or TLS (`transport.rs`): what `queued` hands the driver.
    transport: transport::Transport,
    /// What it did, for its access-log line.
    traffic: Traffic,
    /// For its access-log line: the request path once open, or why it was refused
    /// (bounded: [`NOTE_MAX`]).
    note: Option<Box<str>>,
}

/// The note of a connection that got the demo page.
pub const DEMO_PAGE_NOTE: &str = "200 demo page";

/// The most of a path or refusal an access-log note keeps.
pub const NOTE_MAX: usize = 256;

/// What one connection did, as its access-log line reports it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Traffic {
    pub messages_in: u64,
    pub messages_out: u64,
    /// Bytes read from and written to its socket (handshake, frames, TLS records).
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// `text` cut to at most `NOTE_MAX` bytes (at a character boundary).
fn bounded_note(text: &str) -> Box<str> {
    let mut end = text.len().min(NOTE_MAX);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].into()
}

/// Encode a server frame into an allocation of its own, sized to the frame: a queued tiny
/// frame pins its few bytes (charged with `ENTRY_BYTES`), never a shared arena chunk.
pub fn encode(opcode: OpCode, payload: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(MAX_HEADER_LEN + payload.len());
    frame::write_server_frame(&mut buf, true, opcode, payload);
    buf.freeze()
}

/// From this size on, a message whose payload the session owns outright (assembled from
/// several read buffers) leaves as two iovecs, header and payload, instead of being copied
/// into a frame: a copy of 64 KiB costs more than the second queue entry it saves.
pub const SEND_PAYLOAD_AS_IS_FROM: usize = 8 * 1024;

/// An outbound frame: its header and payload in one allocation (`body` empty), or, for a
/// large payload the session owns, the header alone and the payload as it came.
#[derive(Debug)]
pub(crate) struct OutFrame {
    head: Bytes,
    body: Bytes,
}

impl OutFrame {
    fn len(&self) -> usize {
        self.head.len() + self.body.len()
    }

    /// Queue entries it takes.
    fn entries(&self) -> usize {
        1 + usize::from(!self.body.is_empty())
    }
}

impl From<Bytes> for OutFrame {
    fn from(frame: Bytes) -> OutFrame {
        OutFrame {
            head: frame,
            body: Bytes::new(),
        }
    }
}

/// A server frame for `payload`, which the caller owns exactly (its own allocation, e.g. a
/// message assembled across read buffers): large ones are not copied.
pub(crate) fn encode_owned(opcode: OpCode, payload: Bytes) -> OutFrame {
    if payload.len() < SEND_PAYLOAD_AS_IS_FROM {
        return encode(opcode, &payload).into();
    }
    let mut h = [0u8; MAX_HEADER_LEN];
    let n = frame::encode_header(&mut h, true, opcode, None, payload.len() as u64);
    OutFrame {
        head: Bytes::copy_from_slice(&h[..n]),
        body: payload,
    }
}

pub fn opcode_for(kind: MessageKind) -> OpCode {
    match kind {
        MessageKind::Text => OpCode::Text,
        MessageKind::Binary => OpCode::Binary,
    }
}

/// A connection's message limits once its route is known: the route sets the fragments.
pub fn route_limits(config: &Config, max_fragments: u32) -> Limits {
    Limits {
        max_fragments,
        ..config.message_limits()
    }
}

/// Whether every backend of `upstream` is in this process (the embedded echo/chat): the
/// relay hands a fence back at once, after the replies it produced.
fn in_process(routes: &RouteTable, upstream: UpstreamId) -> bool {
    routes
        .upstreams()
        .get(usize::from(upstream))
        .is_some_and(|u| u.backends.iter().all(|b| *b == Backend::Embedded))
}

/// What one frame means for the session.
enum Action {
    None,
    Refuse(MessageRefusal),
    Data(OutFrame),
    Relay(UpstreamId, MessageKind, Bytes),
    Pong(Bytes),
    PongReceived,
    Close(u16, String),
}

impl Session {
    pub fn new(id: ConnId, peer: Option<SocketAddr>, limits: Limits, now_ms: u64) -> Session {
        Session {
            id,
            peer,
            state: Lifecycle::Handshaking(BytesMut::new()),
            opened: false,
            decoder: MessageDecoder::new(Role::Server, limits),
            close: CloseHandshake::default(),
            reading_done: false,
            eof: false,
            send_failed: false,
            fence: None,
            closing_without_reply: false,
            counted_open: false,
            uses_backend: false,
            out: Outbound::default(),
            close_code: close::ABNORMAL,
            accepted_ms: now_ms,
            last_rx_ms: now_ms,
            last_message_ms: now_ms,
            ping_sent_ms: None,
            close_sent_ms: None,
            over_queue_ms: None,
            token_expiry_ms: None,
            subscriptions: Vec::new(),
            route: 0,
            rate: None,
            protocol: None,
            deflate: None,
            contexts: Default::default(),
            transport: transport::Transport::Plain,
            traffic: Traffic::default(),
            note: None,
        }
    }

    // ----- what the driver reads -----

    pub fn id(&self) -> ConnId {
        self.id
    }

    pub fn state(&self) -> State {
        match self.state {
            Lifecycle::Handshaking(_) => State::Handshaking,
            Lifecycle::Authorizing { .. } => State::Authorizing,
            Lifecycle::Open => State::Open,
            Lifecycle::Closing => State::Closing,
            Lifecycle::Draining { .. } => State::Draining,
            Lifecycle::Closed => State::Closed,
        }
    }

    /// Its frames flow (it may be closing too).
    pub fn is_open(&self) -> bool {
        self.opened
    }

    fn is_closed(&self) -> bool {
        matches!(self.state, Lifecycle::Closed)
    }

    /// Past Closing: nothing more will be queued.
    fn is_draining(&self) -> bool {
        matches!(self.state, Lifecycle::Draining { .. } | Lifecycle::Closed)
    }

    /// Whether a reply from the relay (send, close, subscribe, accept...) still applies:
    /// open (or held for authorization), not shut, and our close not sent. Replies that
    /// precede a fence still reach a closing client, and one whose TCP input ended still
    /// gets what is queued before its FIN.
    pub fn accepts_replies(&self) -> bool {
        !self.is_closed()
            && !self.close.close_sent()
            && (self.opened || matches!(self.state, Lifecycle::Authorizing { .. }))
    }

    /// Whether a topic or broadcast frame is queued to it.
    pub fn accepts_fanout(&self) -> bool {
        self.opened && !self.is_closed() && !self.close.close_sent()
    }

    /// Its input is drained, not acted on.
    pub fn reading_done(&self) -> bool {
        // A TLS handshake still runs: a refusal queued at accept leaves after it.
        self.reading_done && !self.transport.handshaking()
    }

    /// The client closed its side or the socket failed: nothing more will come in.
    pub fn peer_closed(&self) -> bool {
        self.eof
    }

    pub fn close_sent(&self) -> bool {
        self.close.close_sent()
    }

    /// The relay must hear `Closed` with [`Session::close_code`] when the slot is freed.
    pub fn counted_open(&self) -> bool {
        self.counted_open
    }

    pub fn close_code(&self) -> u16 {
        self.close_code
    }

    /// The client ended it: its close frame came before ours, or it closed or reset TCP
    /// before any close frame went either way.
    pub fn closed_by_client(&self) -> bool {
        self.close.peer_closed_first()
            || (!self.close.close_sent() && (self.eof || self.send_failed))
    }

    /// What it did so far, for its access-log line.
    pub fn traffic(&self) -> Traffic {
        self.traffic
    }

    /// The request path once open; why it was refused if it was.
    pub fn note(&self) -> Option<&str> {
        self.note.as_deref()
    }

    /// The client's address (the TCP peer).
    pub fn peer(&self) -> Option<SocketAddr> {
        self.peer
    }

    /// When the driver accepted it, on the core's clock.
    pub fn accepted_ms(&self) -> u64 {
        self.accepted_ms
    }

    /// `n` bytes came in on its socket.
    pub fn on_received(&mut self, n: usize) {
        self.traffic.bytes_in += n as u64;
    }

    /// Our compressor's window when it agreed to permessage-deflate without context
    /// takeover on our side (fan-out compresses once per core for these).
    pub fn deflate_bits(&self) -> Option<u8> {
        self.deflate
            .filter(|a| !a.server_takeover)
            .map(|a| a.server_window_bits)
    }

    /// It compresses with its own context (`dedicated`): fan-out encodes for it alone.
    pub fn compresses_alone(&self) -> bool {
        self.deflate.is_some_and(|a| a.server_takeover)
    }

    /// Drop its compression contexts (it is shut): what the core gets back.
    pub fn release_compression(&mut self) -> compression::Released {
        self.contexts.release()
    }

    pub fn route(&self) -> RouteId {
        self.route
    }

    pub fn subscriptions(&self) -> &[Topic] {
        &self.subscriptions
    }

    /// Bytes to transmit, in order; the driver sends a prefix and reports with `on_sent`.
    pub fn queued(&self) -> &VecDeque<Bytes> {
        self.wire().items()
    }

    pub fn queued_bytes(&self) -> usize {
        self.out.bytes() + self.transport.records().map_or(0, Outbound::bytes)
    }

    /// The outbound queue's cost as compared with `send_queue_bytes`.
    pub fn queued_cost(&self) -> usize {
        self.out.cost() + self.transport.records().map_or(0, Outbound::cost)
    }

    /// Bytes this connection holds in the process now: its fixed share plus every buffer a
    /// client can make grow (request bytes, message assembly, queued output). Queued frames
    /// shared by a topic's subscribers are counted for each, so this errs high.
    pub fn footprint(&self) -> usize {
        let phase = match &self.state {
            Lifecycle::Handshaking(buf) => buf.capacity(),
            Lifecycle::Authorizing { request, rest, .. } => {
                let fields: usize = request
                    .headers
                    .iter()
                    .map(|(name, value)| name.len() + value.len())
                    .sum();
                // The parsed copies of path, key, protocols... are at most the fields again.
                std::mem::size_of::<Request>() + 2 * fields + rest.capacity()
            }
            _ => 0,
        };
        // Outbound queue: limit `send_queue_bytes` (checked in `queue_data`), charged here
        // with per-entry overhead. Subscriptions: limit the route's `max_subscriptions`.
        let subscriptions: usize = self
            .subscriptions
            .iter()
            .map(|t| t.len() + SUBSCRIPTION_BYTES)
            .sum::<usize>()
            + self.subscriptions.capacity() * std::mem::size_of::<Topic>();
        let protocol = self.protocol.as_ref().map_or(0, String::capacity);
        let note = self.note.as_ref().map_or(0, |n| n.len());
        BASE_BYTES
            + phase
            + note
            + self.decoder.heap_bytes()
            + self.out.heap_bytes()
            + subscriptions
            + protocol
            + self.transport.heap_bytes()
            + self.contexts.heap_bytes(self.deflate.as_ref())
    }

    // ----- the lifecycle's transitions (forward only) -----

    /// Input is no longer acted on, only drained: a handshake or open connection is closing.
    fn stop_reading(&mut self) {
        self.reading_done = true;
        self.enter_closing();
    }

    fn enter_closing(&mut self) {
        if matches!(
            self.state,
            Lifecycle::Handshaking(_) | Lifecycle::Authorizing { .. } | Lifecycle::Open
        ) {
            self.state = Lifecycle::Closing;
        }
    }

    /// Queue nothing more: drop TCP once the outbound queue is flushed.
    fn drain(&mut self) {
        if !self.is_draining() {
            self.state = Lifecycle::Draining {
                fin_sent_ms: None,
                abort: false,
            };
        }
    }

    /// A linger expired: drop TCP now, flushed or not.
    fn abort(&mut self) {
        match &mut self.state {
            Lifecycle::Closed => {}
            Lifecycle::Draining { abort, .. } => *abort = true,
            _ => {
                self.state = Lifecycle::Draining {
                    fin_sent_ms: None,
                    abort: true,
                }
            }
        }
    }

    // ----- what the driver reports -----

    /// Refused at accept: the answer goes out once the request arrives, then TCP.
    pub fn refuse_at_accept(&mut self, refusal: &AcceptRefusal) {
        let response = refusal.response();
        self.note_refusal(&response, refusal);
        self.out.push(response);
        self.stop_reading();
        self.drain();
    }

    /// The driver handed the front `n` queued items to the kernel.
    pub fn start_send(&mut self, n: usize) {
        self.wire_mut().start_send(n);
    }

    /// `sent` bytes of the in-flight send left.
    pub fn on_sent(&mut self, sent: usize) {
        self.traffic.bytes_out += sent as u64;
        self.wire_mut().advance(sent);
        self.seal_output();
    }

    /// The send failed (EPIPE/ECONNRESET): the client is gone; what is queued cannot be
    /// delivered.
    pub fn on_send_failed(&mut self) {
        self.send_failed = true;
        self.out.clear();
        self.wire_mut().clear();
        self.stop_reading();
        self.drain();
    }

    /// recv returned 0 (`reset == false`) or an error: nothing more will come in; send what
    /// is queued (unless reset), then drop TCP. EOF in a TLS handshake is a counted failure.
    pub fn on_peer_closed(&mut self, cx: &mut Context<'_>, reset: bool) {
        if !reset {
            self.tls_eof(cx);
        }
        self.stop_reading();
        self.eof = true;
        if !self.is_closed() {
            tracing::debug!(conn = %self.id, "peer closed the TCP connection");
            self.drain();
            if reset {
                self.out.clear();
                self.wire_mut().clear();
            }
        }
    }

    /// The driver shut the socket.
    pub fn on_shut(&mut self) {
        self.state = Lifecycle::Closed;
        self.reading_done = true;
    }

    /// What the socket needs now. `Write` is answered once: the session records the FIN.
    pub fn poll_shutdown(&mut self, now_ms: u64, send_in_flight: bool) -> Option<Shutdown> {
        let flushed = self.out.is_empty() && self.wire().is_empty() && !send_in_flight;
        let eof = self.eof;
        match &mut self.state {
            Lifecycle::Draining { abort: true, .. } => Some(Shutdown::Both),
            Lifecycle::Draining {
                fin_sent_ms: fin @ None,
                ..
            } if flushed => {
                if eof {
                    return Some(Shutdown::Both);
                }
                *fin = Some(now_ms);
                Some(Shutdown::Write)
            }
            Lifecycle::Draining {
                fin_sent_ms: Some(_),
                ..
            } if eof => Some(Shutdown::Both),
            _ => None,
        }
    }

    /// Its send queue is over `send_queue_bytes`: true when the driver should stop reading
    /// it (closed 1008 after `SLOW_CONSUMER_GRACE_MS` if it stays over).
    pub fn over_send_queue(&mut self, now_ms: u64, cap: usize) -> bool {
        if self.out.cost() > cap && !self.close.close_sent() {
            self.over_queue_ms.get_or_insert(now_ms);
            return true;
        }
        false
    }

    /// The driver reads it again: the slow-consumer grace starts over.
    pub fn resumed(&mut self) {
        self.over_queue_ms = None;
    }

    // ----- bytes from the client -----

    /// Plaintext from the client (from the socket, or decrypted by the transport).
    fn on_plaintext(&mut self, cx: &mut Context<'_>, data: &mut [u8]) {
        if self.reading_done {
            return;
        }
        self.last_rx_ms = cx.now_ms;
        match &mut self.state {
            Lifecycle::Handshaking(buf) => {
                buf.extend_from_slice(data);
                let mut request_bytes = std::mem::take(buf);
                self.on_handshake_bytes(cx, &mut request_bytes);
            }
            Lifecycle::Authorizing { rest, .. } => {
                // Frames pipelined before the 101; bounded like one message.
                if rest.len() + data.len() > cx.config.max_message_bytes as usize + 14 {
                    self.stop_reading();
                    self.drain();
                    self.out.clear();
                } else {
                    rest.extend_from_slice(data);
                }
            }
            _ if self.opened => self.on_frames(cx, data),
            // Not reached: input stops (`reading_done`) before any other stage.
            _ => {}
        }
    }

    fn on_handshake_bytes(&mut self, cx: &mut Context<'_>, buf: &mut BytesMut) {
        match handshake::parse_request(buf, &cx.config.handshake_limits()) {
            Ok(Parsed::Partial) => self.state = Lifecycle::Handshaking(std::mem::take(buf)),
            Err(handshake::HandshakeError::NotWebSocketUpgrade)
                if cx.config.serves_demo_page()
                    && handshake::page_target(buf, &cx.config.handshake_limits())
                        .is_some_and(demo_page::is_page_target) =>
            {
                self.serve_demo_page();
            }
            Err(e) => self.refuse(cx, e.response(), &e),
            Ok(Parsed::Complete { request, consumed }) => {
                if cx.panic_on.is_some() && request.path == "/__panic" {
                    // The message quotes input, as a real panic's might: it must not be logged.
                    panic!("test hook: handshake with {:?}", request.headers);
                }
                let admitted = match admission::admit(&request, cx.routes, cx.unix_ms / 1000) {
                    Ok(admitted) => admitted,
                    Err(refusal) => {
                        if let Some(metric) = refusal.metric() {
                            cx.meter.count(Count::Refused(metric));
                        }
                        self.refuse(cx, refusal.response(), &refusal);
                        return;
                    }
                };
                let route_id = admitted.route_id;
                let route = cx.routes.route(route_id);
                let policy = cx.routes.policy(route_id);
                // Its place under max_connections was taken at accept by the driver.
                self.counted_open = true;
                self.uses_backend = !in_process(cx.routes, route.upstream);
                self.route = route_id;
                self.decoder
                    .set_limits(route_limits(cx.config, route.max_fragments));
                let authorize = route.authorize && cx.relay;
                self.rate = MessageRate::new(policy.messages_per_sec, policy.message_burst);
                self.protocol = admitted.protocol;
                self.deflate =
                    compression::negotiate(route.compression, &request, cx, &mut self.contexts);
                if self.deflate.is_some() {
                    self.decoder.set_allowed_rsv(RSV1);
                }
                self.token_expiry_ms = admitted
                    .token_expiry_s
                    .map(|s| admission::expiry_deadline_ms(s, cx.now_ms, cx.unix_ms));
                let info = OpenInfo {
                    path: request.path.clone(),
                    query: admitted.query,
                    headers: admitted.headers,
                    peer: self.peer,
                    authorize,
                };
                cx.out.push(Output::Relay(ToUpstream::Open {
                    conn: self.id,
                    upstream: route.upstream,
                    info: Box::new(info),
                }));
                let rest = buf.split_off(consumed);
                if authorize {
                    // Hold the handshake until the backend answers accept or reject.
                    self.state = Lifecycle::Authorizing {
                        request: Box::new(request),
                        rest,
                        until_ms: cx.now_ms.saturating_add(route.authorize_timeout_ms),
                    };
                } else {
                    self.complete_handshake(cx, &request, rest);
                }
            }
        }
    }

    /// Send 101 and start reading frames, beginning with any the client pipelined.
    fn complete_handshake(&mut self, cx: &mut Context<'_>, request: &Request, mut rest: BytesMut) {
        cx.meter.count(Count::HandshakeOk {
            latency_ms: cx.now_ms.saturating_sub(self.accepted_ms),
            route: self.route,
        });
        self.note = Some(bounded_note(&request.path));
        let extensions = self.deflate.map(|a| a.response_value());
        self.out.push(handshake::response_101_with(
            request,
            self.protocol.as_deref(),
            extensions.as_deref(),
        ));
        self.state = Lifecycle::Open;
        self.opened = true;
        self.last_message_ms = cx.now_ms;
        tracing::debug!(conn = %self.id, path = %request.path, "open");
        if !rest.is_empty() {
            self.on_frames(cx, &mut rest);
        }
    }

    /// Answer a plain `GET /` with the demo page and close after it (not a refusal).
    fn serve_demo_page(&mut self) {
        tracing::debug!(conn = %self.id, "demo page served");
        self.note = Some(DEMO_PAGE_NOTE.into());
        for part in demo_page::response() {
            self.out.push(part);
        }
        self.stop_reading();
        self.drain();
    }

    /// Keep why it was refused for its access-log line: the status and the reason, both
    /// ours (a refusal's text never quotes a token or a query).
    fn note_refusal(&mut self, response: &[u8], why: &dyn std::fmt::Display) {
        let status = response
            .get(9..12)
            .and_then(|s| std::str::from_utf8(s).ok())
            .unwrap_or("---");
        self.note = Some(bounded_note(&format!("{status} {why}")));
    }

    /// Answer the handshake with an HTTP error and close after it.
    fn refuse(&mut self, cx: &mut Context<'_>, response: Bytes, why: &dyn std::fmt::Display) {
        tracing::debug!(conn = %self.id, "handshake refused: {why}");
        cx.meter.count(Count::HandshakeRejected);
        self.note_refusal(&response, why);
        self.out.push(response);
        self.stop_reading();
        self.drain();
    }

    // ----- the outbound queue -----

    /// A single message larger than the cap is still sent when nothing else is queued: the
    /// cap is for clients that do not read, not a second message size limit.
    ///
    /// The relay's sends may take the queue to `REPLY_SLACK` times `send_queue_bytes`: the
    /// driver stops reading the client once its queue is over the cap, but the replies to
    /// what it sent before are already on their way back through the relay, and a client
    /// that pipelines requests faster than it reads the answers must be slowed down, not
    /// closed at once. Still over the cap after `SLOW_CONSUMER_GRACE_MS`, it is closed all
    /// the same.
    fn queue_data(&mut self, cx: &mut Context<'_>, frame: OutFrame, slack: usize) {
        if self.out.bytes() > 0
            && self.out.cost() + frame.len() + frame.entries() * ENTRY_BYTES
                > cx.config.send_queue_bytes.saturating_mul(slack)
        {
            tracing::debug!(conn = %self.id, queued = self.out.bytes(), "slow consumer");
            cx.meter.count(Count::SlowConsumerClosed);
            self.start_close(cx.now_ms, close::POLICY_VIOLATION, "slow consumer");
            return;
        }
        cx.meter.count(Count::MessageOut { route: self.route });
        self.traffic.messages_out += 1;
        if frame.body.is_empty() {
            self.out.push(frame.head);
        } else {
            self.out.push_split(frame.head, frame.body);
        }
    }

    /// A message the relay sends this client.
    pub fn on_relay_send(&mut self, cx: &mut Context<'_>, kind: MessageKind, payload: &[u8]) {
        let frame = self.encode_message(cx, opcode_for(kind), payload);
        self.queue_data(cx, frame.into(), REPLY_SLACK);
    }

    /// Queue a topic or broadcast frame, applying the route's slow-consumer policy.
    pub fn queue_fanout(&mut self, cx: &mut Context<'_>, frame: Bytes) {
        let full = self.out.bytes() > 0
            && self.out.cost() + frame.len() + ENTRY_BYTES > cx.config.send_queue_bytes;
        if full && cx.routes.route(self.route).slow_consumer == SlowConsumer::DropNewest {
            cx.meter.count(Count::SlowConsumerDropped);
            return;
        }
        self.queue_data(cx, frame.into(), 1);
    }

    pub fn subscribe(&mut self, topic: &Topic, max: usize) -> Subscribed {
        if self.subscriptions.contains(topic) {
            Subscribed::Already
        } else if self.subscriptions.len() >= max {
            tracing::debug!(conn = %self.id, topic = %topic, "subscription limit reached; ignored");
            Subscribed::Limit
        } else {
            self.subscriptions.push(topic.clone());
            Subscribed::New
        }
    }

    /// True when it was subscribed.
    pub fn unsubscribe(&mut self, topic: &Topic) -> bool {
        match self.subscriptions.iter().position(|t| t == topic) {
            Some(i) => {
                self.subscriptions.swap_remove(i);
                true
            }
            None => false,
        }
    }

    // ----- authorization -----

    /// The backend's answer to a held handshake.
    pub fn on_authorization(&mut self, cx: &mut Context<'_>, verdict: Result<(), (u16, String)>) {
        let Lifecycle::Authorizing { .. } = self.state else {
            return;
        };
        let Lifecycle::Authorizing { request, rest, .. } =
            std::mem::replace(&mut self.state, Lifecycle::Handshaking(BytesMut::new()))
        else {
            unreachable!("checked above")
        };
        match verdict {
            Ok(()) => self.complete_handshake(cx, &request, rest),
            Err((status, reason)) => self.refuse_held(cx, status, &reason),
        }
    }

    fn refuse_held(&mut self, cx: &mut Context<'_>, status: u16, reason: &str) {
        // Only refusals make sense here; anything else from a backend is its bug.
        let status = if matches!(status, 401 | 403 | 503) {
            status
        } else {
            403
        };
        self.refuse(cx, handshake::error_response(status, reason, &[]), &reason);
        cx.out.push(Output::Relay(ToUpstream::Closed {
            conn: self.id,
            code: close::POLICY_VIOLATION,
        }));
        // The relay was told `Closed`: it must not hear of this connection again.
        self.counted_open = false;
    }

    // ----- the close and fence rules -----

    /// Send our close frame (once) and wait for the client's, up to the linger time.
    fn start_close(&mut self, now_ms: u64, code: u16, reason: &str) {
        if self.close.send() {
            let (payload, len) = if code == close::NO_STATUS {
                // Echoing a close that carried no code: ours carries none either.
                ([0; frame::MAX_CONTROL_PAYLOAD], 0)
            } else {
                frame::close_payload(code, reason)
            };
            self.out.push(encode(OpCode::Close, &payload[..len]));
            self.close_code = code;
            self.close_sent_ms = Some(now_ms);
            self.enter_closing();
        }
        if self.close.is_done() {
            self.drain();
        }
    }

    /// End the connection because of what the client sent (its close, or a reload that
    /// removed its route): read nothing more, send our close once the replies to its
    /// earlier messages are queued, and drop TCP after it. Through the relay that means a
    /// fence: the relay hands the close back after every reply it had already passed on.
    pub fn close_after_replies(&mut self, cx: &mut Context<'_>, code: u16, reason: &str) {
        self.stop_reading();
        self.closing_without_reply = true;
        // Our close went out already (the backend's, or a timer's): the client's answer
        // completes the handshake, and there is nothing left to fence.
        if cx.relay && self.counted_open && !self.close.close_sent() {
            self.fence(cx, code, reason, None);
        } else {
            self.start_close(cx.now_ms, code, reason);
            self.drain();
        }
    }

    fn fence(&mut self, cx: &mut Context<'_>, code: u16, reason: &str, error: Option<u16>) {
        if self.fence.is_none() {
            self.enter_closing();
            self.fence = Some(Box::new(Fence {
                since_ms: cx.now_ms,
                error: error.map(|c| (c, reason.to_string())),
            }));
            cx.out.push(Output::Relay(ToUpstream::Fence {
                conn: self.id,
                code,
                reason: reason.to_string(),
            }));
        }
    }

    /// End the connection for the client's protocol error or a refused message: read
    /// nothing more, and send our close frame (code and reason) once the replies to the
    /// messages it already had routed are queued. Through the relay to in-process upstreams
    /// only, that is a fence with this code, whose return (or timeout) sends our close
    /// whatever the relay answers. A backend's answer is not waited for
    /// (docs/relay-protocol.md, "Close"): the close goes at once and the relay is told
    /// `Closed`, after everything already sent for the connection.
    /// TCP goes after the client's answer or the linger time.
    fn close_for_error(&mut self, cx: &mut Context<'_>, code: u16, reason: &str) {
        self.stop_reading();
        self.closing_without_reply = true;
        if cx.relay && self.counted_open && !self.close.close_sent() && !self.uses_backend {
            // What the relay's `Closed` carries even if TCP goes before our close does.
            self.close_code = code;
            self.fence(cx, code, reason, Some(code));
            return;
        }
        self.start_close(cx.now_ms, code, reason);
        self.drain();
        if cx.relay && self.counted_open {
            cx.out.push(Output::Relay(ToUpstream::Closed {
                conn: self.id,
                code,
            }));
            // The relay was told `Closed`: it must not hear of this connection again.
            self.counted_open = false;
        }
    }

    /// The relay handed back a close, a fence's or a backend's.
    pub fn on_relay_close(&mut self, cx: &mut Context<'_>, code: u16, reason: &str) {
        let fence = self.fence.take().map(|f| *f);
        if let Some(Fence {
            error: Some((code, reason)),
            ..
        }) = fence
        {
            // The client's error decides the code, not the backend's answer.
            self.start_close(cx.now_ms, code, &reason);
            self.drain();
            return;
        }
        let fenced = fence.is_some();
        // A backend may not put a reserved code on the wire (RFC 6455 §7.4.1); echoing the
        // client's own code-less close (1005) is the one exception.
        // 1012-1014 (restart, try again later, bad gateway) are registered since RFC 6455 and
        // are what a gateway says; clients may not send them (Autobahn 7.9), we may.
        let ours = (1012..=1014).contains(&code);
        let code =
            if close::is_valid_wire_code(code) || ours || (fenced && code == close::NO_STATUS) {
                code
            } else {
                close::INTERNAL_ERROR
            };
        self.start_close(cx.now_ms, code, reason);
        if fenced && self.closing_without_reply {
            self.drain();
        }
    }

    /// The gateway drains: an open client gets 1001; one still handshaking is dropped (true:
    /// the driver shuts it now).
    pub fn begin_drain(&mut self, now_ms: u64) -> bool {
        if self.is_closed() {
            return false;
        }
        if self.is_open() && !self.is_draining() {
            self.start_close(now_ms, close::GOING_AWAY, "server shutting down");
            false
        } else {
            !self.is_open()
        }
    }

    /// Over the memory budget: close 1008 "server memory budget" and let go of what it
    /// holds now: its unsent queue (what the kernel is sending stays), its message
    /// assembly and its compression contexts.
    pub fn shed(&mut self, cx: &mut Context<'_>, send_in_flight: bool) {
        cx.meter.count(Count::Refused(PolicyRefusal::MemoryShed));
        self.out.drop_unsent(send_in_flight);
        self.decoder = MessageDecoder::new(Role::Server, cx.config.message_limits());
        // Its `dedicated` contexts are the largest thing it holds; nothing more is
        // compressed (the close goes plain) or inflated (reading stops).
        cx.codec.release(self.contexts.release());
        self.stop_reading();
        self.closing_without_reply = true;
        self.drain();
        self.start_close(cx.now_ms, close::POLICY_VIOLATION, "server memory budget");
    }

    /// A panic in this connection's handling was caught: close it 1011 if open, 500 in its
    /// handshake. False when neither can be sent: the driver drops TCP.
    pub fn on_panic(&mut self, cx: &mut Context<'_>, send_in_flight: bool) -> bool {
        self.stop_reading();
        self.closing_without_reply = true;
        let sendable = if self.is_closed() || self.eof {
            false
        } else if self.is_open() {
            let can = !self.close.close_sent();
            if can {
                self.start_close(cx.now_ms, close::INTERNAL_ERROR, "internal error");
            }
            can
        } else if self.out.is_empty() && !send_in_flight {
            // In its handshake (or held for authorization): nothing sent yet, so a 500 fits.
            cx.meter.count(Count::HandshakeRejected);
            let response = handshake::error_response(500, "internal error", &[]);
            self.note_refusal(&response, &"internal error");
            self.out.push(response);
            self.close_code = close::INTERNAL_ERROR;
            true
        } else {
            false
        };
        if sendable {
            self.drain();
            self.close_sent_ms.get_or_insert(cx.now_ms);
        }
        sendable
    }

    /// A reload moved its route (or removed it: route 0 with the global limits).
    pub fn set_route(&mut self, route: RouteId, limits: Limits) {
        self.route = route;
        self.decoder.set_limits(limits);
    }
}
