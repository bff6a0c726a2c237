//! One client connection as its core sees it: where it is in its life (handshake, open,
//! closing), its frame decoder, its outbound queue, and its deadlines. No io_uring here: the
//! worker turns what this asks for into ring operations.

use std::collections::VecDeque;
use std::os::fd::RawFd;

use bytes::{Buf, Bytes, BytesMut};

use crate::protocol::close::CloseHandshake;
use crate::protocol::message::MessageDecoder;

use crate::ids::ConnId;
pub use crate::in_flight::InFlight;

/// What a connection is charged against the memory budget besides its buffers: its slot,
/// timer entry and bookkeeping. Measured at 1.5-2.1 KiB of RSS per idle connection
/// (ringway-bench idle, 10,000 connections).
pub const BASE_BYTES: usize = 2048;

/// What one queued frame costs besides its bytes: its `VecDeque` slot (a `Bytes`, 32 B), the
/// shared header a cloned `Bytes` gets (32 B) and the allocator's rounding of a small
/// allocation (up to ~32 B with mimalloc's size classes). Every frame `Core::encode` makes has
/// its own exact allocation, so nothing else is pinned (no shared arena chunk).
pub const ENTRY_BYTES: usize = 96;

/// What one subscription costs besides its topic name: its slot in `subscriptions`, its
/// entry in the core's topic table (key, Vec header, slot index) and the `Arc<str>` counts.
pub const SUBSCRIPTION_BYTES: usize = 96;

/// Bytes a connection's messages may have in flight to the relay (core backlog, channel and
/// the relay's hands) before its reads pause: `max(1 MiB, 4 x max_message_bytes)`.
pub fn relay_in_flight_limit(max_message_bytes: usize) -> usize {
    (1 << 20).max(max_message_bytes.saturating_mul(4))
}

#[derive(Debug)]
pub enum Phase {
    /// Waiting for the complete upgrade request; bytes so far.
    Handshake(BytesMut),
    /// Complete request held until the backend accepts or rejects it; `rest` holds any
    /// bytes the client sent after the request meanwhile.
    Authorizing {
        request: Box<crate::protocol::handshake::Request>,
        rest: BytesMut,
        until_ms: u64,
    },
    /// WebSocket frames flow.
    Open,
}

pub struct Connection {
    pub id: ConnId,
    pub fd: RawFd,
    pub phase: Phase,
    pub decoder: MessageDecoder,
    pub close: CloseHandshake,
    /// Input is no longer acted on, only drained (protocol error, refused handshake, close).
    pub reading_done: bool,
    /// The client closed its side (recv returned 0) or the socket failed.
    pub eof: bool,
    /// We sent FIN (`shutdown(SHUT_WR)`) after flushing, and drain input until the client's
    /// FIN or the linger time, so a close() with unread input cannot turn into an RST that
    /// destroys our last response or close frame. Since when, in ms.
    pub wr_shut_ms: Option<u64>,
    /// Since when we wait for the relay to hand back our close after earlier replies.
    pub fence_ms: Option<u64>,
    /// The client ended it (protocol error or its close): no close reply to wait for.
    pub closing_without_reply: bool,
    /// Drop TCP once the outbound queue is flushed.
    pub close_after_flush: bool,
    /// `shutdown(2)` was called; waiting for in-flight operations before `close(2)`.
    pub shut: bool,
    pub recv_armed: bool,
    pub send_in_flight: bool,
    /// The relay knows it (its `Open` went out): the relay gets `Closed` when the slot is
    /// freed, and a client's protocol error is fenced through the relay.
    pub counted_open: bool,
    /// Counted in `Shared::open` towards `max_connections`, from accept (handshaking) until
    /// the slot is freed.
    pub counted_limit: bool,
    /// Outbound bytes; the front `in_flight` items are being sent.
    pub out: VecDeque<Bytes>,
    pub out_bytes: usize,
    /// Close code we sent, or received, for the relay's `Closed` event; 1006 until then.
    pub close_code: u16,
    pub accepted_ms: u64,
    pub last_rx_ms: u64,
    pub last_message_ms: u64,
    pub ping_sent_ms: Option<u64>,
    pub close_sent_ms: Option<u64>,
    /// The time of this connection's earliest wheel entry, if any.
    pub wheel_at: Option<u64>,
    /// Queued on the core's list of connections with something to send.
    pub dirty: bool,
    /// Topics this connection is subscribed to (the core's topic table holds the reverse).
    pub subscriptions: Vec<crate::relay::Topic>,
    /// Index of the route its handshake path matched.
    pub route: u16,
    /// Its messages wait in the core's relay backlog: stop reading it.
    pub wants_pause: bool,
    /// Its multishot recv was cancelled for backpressure; re-armed when the backlog drains.
    pub paused: bool,
    pub ip: Option<std::net::IpAddr>,
    /// Counted by the core's per-IP limiter (released once when the slot is freed).
    pub counted_ip: bool,
    /// The route's message rate limit, if it has one.
    pub rate: Option<crate::policy::rate::MessageRate>,
    /// The subprotocol the 101 names (the companion of a token carried in one).
    pub protocol: Option<String>,
    /// Bytes charged to its core's memory meter, as of the last `footprint`.
    pub charged: usize,
    /// The last queued item is a pong not yet handed to the kernel: a newer pong replaces
    /// it (RFC 6455 §5.5.3), so a ping flood holds one pong, not one per ping.
    pub pong_queued: bool,
    /// How many of the front items of `out` the in-flight `sendmsg` covers.
    pub sending: usize,
    /// Paused because its outbound queue is over `send_queue_bytes`; since when, in ms.
    pub over_queue_ms: Option<u64>,
    /// Bytes of its messages the relay has not let go of yet (see `InFlight`).
    pub relay_in_flight: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// When its JWT expires, on the core's clock: then it is closed 1008 "token expired".
    pub token_expiry_ms: Option<u64>,
}

impl Connection {
    pub fn new(id: ConnId, fd: RawFd, decoder: MessageDecoder, now_ms: u64) -> Connection {
        Connection {
            id,
            fd,
            phase: Phase::Handshake(BytesMut::new()),
            decoder,
            close: CloseHandshake::default(),
            reading_done: false,
            eof: false,
            wr_shut_ms: None,
            fence_ms: None,
            closing_without_reply: false,
            close_after_flush: false,
            shut: false,
            recv_armed: false,
            send_in_flight: false,
            counted_open: false,
            counted_limit: false,
            out: VecDeque::new(),
            out_bytes: 0,
            close_code: crate::protocol::close::ABNORMAL,
            accepted_ms: now_ms,
            last_rx_ms: now_ms,
            last_message_ms: now_ms,
            ping_sent_ms: None,
            close_sent_ms: None,
            wheel_at: None,
            dirty: false,
            subscriptions: Vec::new(),
            route: 0,
            wants_pause: false,
            paused: false,
            ip: None,
            counted_ip: false,
            rate: None,
            protocol: None,
            charged: 0,
            pong_queued: false,
            sending: 0,
            over_queue_ms: None,
            relay_in_flight: std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            token_expiry_ms: None,
        }
    }

    /// Bytes this connection holds in the process now: its fixed share plus every buffer a
    /// client can make grow (request bytes, message assembly, queued output). Queued frames
    /// shared by a topic's subscribers are counted for each, so this errs high.
    pub fn footprint(&self) -> usize {
        let phase = match &self.phase {
            Phase::Handshake(buf) => buf.capacity(),
            Phase::Authorizing { request, rest, .. } => {
                let fields: usize = request
                    .headers
                    .iter()
                    .map(|(name, value)| name.len() + value.len())
                    .sum();
                // The parsed copies of path, key, protocols... are at most the fields again.
                std::mem::size_of::<crate::protocol::handshake::Request>()
                    + 2 * fields
                    + rest.capacity()
            }
            Phase::Open => 0,
        };
        // Outbound queue: limit `send_queue_bytes` (checked in `Core::queue_data` and for
        // control frames in `Core::queue_control`), charged here with per-entry overhead.
        let queue = self.out_bytes
            + self.out.len() * ENTRY_BYTES
            + self.out.capacity() * std::mem::size_of::<Bytes>();
        // Subscriptions: limit the route's `max_subscriptions` (topic length: the relay's
        // frame limit); charged here with the core's topic table share.
        let subscriptions: usize = self
            .subscriptions
            .iter()
            .map(|t| t.len() + SUBSCRIPTION_BYTES)
            .sum::<usize>()
            + self.subscriptions.capacity() * std::mem::size_of::<crate::relay::Topic>();
        let protocol = self.protocol.as_ref().map_or(0, String::capacity);
        BASE_BYTES + phase + self.decoder.heap_bytes() + queue + subscriptions + protocol
    }

    /// What shedding for the memory budget compares: its footprint plus its bytes in
    /// flight to the relay.
    pub fn holds(&self) -> usize {
        self.charged
            + self
                .relay_in_flight
                .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// What the outbound queue costs, as compared with `send_queue_bytes`: its bytes plus
    /// `ENTRY_BYTES` per queued frame (so 3-byte frames cannot hold 30x the cap).
    pub fn queued_cost(&self) -> usize {
        self.out_bytes + self.out.len() * ENTRY_BYTES
    }

    /// Queue a pong. Once more than `coalesce_past` bytes wait unsent (the client is not
    /// reading), it replaces a queued pong the kernel has not been handed yet (RFC 6455
    /// §5.5.3); below that every ping gets its pong, as peers such as Autobahn 2.10 expect.
    pub fn queue_pong(&mut self, bytes: Bytes, coalesce_past: usize) {
        if self.pong_queued && self.out.len() > self.sending && self.out_bytes > coalesce_past {
            if let Some(last) = self.out.pop_back() {
                self.out_bytes -= last.len();
            }
        }
        self.queue(bytes);
        self.pong_queued = true;
    }

    pub fn is_open(&self) -> bool {
        matches!(self.phase, Phase::Open)
    }

    pub fn queue(&mut self, bytes: Bytes) {
        self.pong_queued = false;
        self.out_bytes += bytes.len();
        self.out.push_back(bytes);
    }

    /// Account for `sent` bytes having left, dropping fully sent items.
    pub fn advance_out(&mut self, mut sent: usize) {
        self.out_bytes -= sent;
        self.sending = 0;
        while sent > 0 {
            let front = self.out.front_mut().expect("sent more than was queued");
            if front.len() <= sent {
                sent -= front.len();
                self.out.pop_front();
            } else {
                front.advance(sent);
                sent = 0;
                if self.out.len() == 1 {
                    // A partly sent pong is on the wire already: it must not be replaced.
                    self.pong_queued = false;
                }
            }
        }
        if self.out.is_empty() && self.out.capacity() > 16 {
            // An idle connection should not keep a large queue allocation.
            self.out = VecDeque::new();
        }
    }

    /// Everything queued has left and nothing more will be sent: time to send FIN.
    pub fn ready_to_shut(&self) -> bool {
        !self.shut
            && self.wr_shut_ms.is_none()
            && self.close_after_flush
            && self.out.is_empty()
            && !self.send_in_flight
    }

    /// Every ring operation on the socket has finished; the slot may be freed.
    pub fn finished(&self) -> bool {
        self.shut && !self.recv_armed && !self.send_in_flight
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frame::Role;
    use crate::protocol::message::Limits;

    fn conn() -> Connection {
        Connection::new(
            ConnId::new(0, 0, 0),
            -1,
            MessageDecoder::new(Role::Server, Limits::default()),
            0,
        )
    }

    #[test]
    fn short_writes_advance_through_the_queue() {
        let mut c = conn();
        c.queue(Bytes::from_static(b"abc"));
        c.queue(Bytes::from_static(b"defgh"));
        assert_eq!(c.out_bytes, 8);
        c.advance_out(4);
        assert_eq!(c.out.len(), 1);
        assert_eq!(&c.out[0][..], b"efgh");
        assert_eq!(c.out_bytes, 4);
        c.advance_out(4);
        assert!(c.out.is_empty());
        assert_eq!(c.out_bytes, 0);
    }

    #[test]
    fn footprint_follows_buffers() {
        let mut c = conn();
        let idle = c.footprint();
        assert!(idle >= BASE_BYTES);
        c.queue(Bytes::from(vec![0; 10_000]));
        assert!(
            c.footprint() >= idle + 10_000 + ENTRY_BYTES,
            "queued output counts"
        );
        c.advance_out(10_000);
        let slots = c.out.capacity() * std::mem::size_of::<Bytes>();
        assert_eq!(c.footprint(), idle + slots);
        // A half-received message: the assembly buffer counts.
        let mut wire = BytesMut::new();
        crate::protocol::frame::write_client_frame(
            &mut wire,
            true,
            crate::protocol::frame::OpCode::Binary,
            [1, 2, 3, 4],
            &[7; 20_000],
        );
        c.phase = Phase::Open;
        let (_, ev) = c.decoder.decode(&mut wire[..15_000]).unwrap();
        assert!(ev.is_none());
        assert!(c.footprint() >= idle + 14_000, "{}", c.footprint());
        c.phase = Phase::Handshake(BytesMut::with_capacity(4096));
        assert!(c.footprint() >= idle + 4096 + 14_000);
    }

    #[test]
    fn only_the_newest_unsent_pong_is_kept() {
        let mut c = conn();
        c.queue(Bytes::from_static(b"data"));
        for i in 0..1000u16 {
            c.queue_pong(Bytes::from(i.to_be_bytes().to_vec()), 0);
        }
        assert_eq!(c.out.len(), 2);
        assert_eq!(&c.out[1][..], &999u16.to_be_bytes());
        assert_eq!(c.out_bytes, 6);
        // A pong the kernel is sending stays; the next one is queued behind it.
        c.sending = 2;
        c.queue_pong(Bytes::from_static(b"zz"), 0);
        assert_eq!(c.out.len(), 3);
        // Partly sent: it is on the wire, never replaced.
        c.advance_out(5);
        assert_eq!(c.out.len(), 2);
        c.queue_pong(Bytes::from_static(b"yy"), 0);
        assert_eq!(&c.out[1][..], b"yy");
        c.advance_out(2);
        assert_eq!(c.out.len(), 1, "yy is partly sent");
        c.queue_pong(Bytes::from_static(b"xx"), 0);
        assert_eq!(c.out.len(), 2, "{:?}", c.out);
        assert_eq!(c.out_bytes, 3);
    }

    #[test]
    fn per_entry_overhead_is_charged() {
        let mut c = conn();
        let idle = c.footprint();
        for _ in 0..100 {
            c.queue(Bytes::from_static(b"abc"));
        }
        assert!(c.footprint() >= idle + 100 * (3 + ENTRY_BYTES));
        assert_eq!(c.queued_cost(), 100 * (3 + ENTRY_BYTES));
    }

    #[test]
    fn shut_only_after_flush() {
        let mut c = conn();
        c.close_after_flush = true;
        c.queue(Bytes::from_static(b"x"));
        assert!(!c.ready_to_shut());
        c.advance_out(1);
        assert!(c.ready_to_shut());
        c.send_in_flight = true;
        assert!(!c.ready_to_shut());
    }
}
