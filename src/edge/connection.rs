//! One client connection as its core sees it: where it is in its life (handshake, open,
//! closing), its frame decoder, its outbound queue, and its deadlines. No io_uring here: the
//! worker turns what this asks for into ring operations.

use std::collections::VecDeque;
use std::os::fd::RawFd;

use bytes::{Buf, Bytes, BytesMut};

use crate::protocol::close::CloseHandshake;
use crate::protocol::message::MessageDecoder;

use super::ConnId;

/// What a connection is charged against the memory budget besides its buffers: its slot,
/// timer entry and bookkeeping. Measured at 1.5-2.1 KiB of RSS per idle connection
/// (ringway-bench idle, 10,000 connections).
pub const BASE_BYTES: usize = 2048;

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
        BASE_BYTES + phase + self.decoder.heap_bytes() + self.out_bytes
    }

    pub fn is_open(&self) -> bool {
        matches!(self.phase, Phase::Open)
    }

    pub fn queue(&mut self, bytes: Bytes) {
        self.out_bytes += bytes.len();
        self.out.push_back(bytes);
    }

    /// Account for `sent` bytes having left, dropping fully sent items.
    pub fn advance_out(&mut self, mut sent: usize) {
        self.out_bytes -= sent;
        while sent > 0 {
            let front = self.out.front_mut().expect("sent more than was queued");
            if front.len() <= sent {
                sent -= front.len();
                self.out.pop_front();
            } else {
                front.advance(sent);
                sent = 0;
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
        assert_eq!(c.footprint(), idle + 10_000, "queued output counts");
        c.advance_out(10_000);
        assert_eq!(c.footprint(), idle);
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
