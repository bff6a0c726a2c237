//! The driver's side of one client connection: its socket, the ring operations in flight
//! on it and the core-wide resources it holds, beside its sans-IO [`Session`] (the
//! connection's life). The worker turns what the session asks for into ring operations.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::fd::Socket;
use crate::session::Session;

/// Bytes a connection's messages may have in flight to the relay (core backlog, channel and
/// the relay's hands) before its reads pause: `max(1 MiB, 4 x max_message_bytes)`.
pub fn relay_in_flight_limit(max_message_bytes: usize) -> usize {
    (1 << 20).max(max_message_bytes.saturating_mul(4))
}

pub use crate::in_flight::InFlight;

/// One connection's slot contents: the session and what only the driver knows.
pub struct Conn {
    pub session: Session,
    pub socket: Socket,
    /// `shutdown(2)` was called; waiting for in-flight operations before `close(2)`.
    pub shut: bool,
    pub recv_armed: bool,
    pub send_in_flight: bool,
    /// Queued on the core's list of connections with something to send.
    pub dirty: bool,
    /// Its messages wait in the core's relay backlog (or it holds too much in flight, or
    /// its send queue is full): stop reading it.
    pub wants_pause: bool,
    /// Its multishot recv was cancelled for backpressure; re-armed when it may resume.
    pub paused: bool,
    /// What it sent after it was paused, decoded when it resumes (`worker/held.rs`).
    pub held: Option<Box<HeldInput>>,
    /// The time of this connection's earliest wheel entry, if any.
    pub wheel_at: Option<u64>,
    pub ip: Option<std::net::IpAddr>,
    /// Counted by the core's per-IP limiter (released once when the slot is freed).
    pub counted_ip: bool,
    /// Counted in `Shared::open` towards `max_connections`, from accept (handshaking) until
    /// the slot is freed.
    pub counted_limit: bool,
    /// Bytes charged to its core's memory meter, as of the last `Session::footprint`.
    pub charged: usize,
    /// Bytes of its messages the relay has not let go of yet (see `InFlight`).
    pub relay_in_flight: Arc<AtomicUsize>,
}

impl Conn {
    pub fn new(session: Session, socket: Socket) -> Conn {
        Conn {
            session,
            socket,
            shut: false,
            recv_armed: false,
            send_in_flight: false,
            dirty: false,
            wants_pause: false,
            paused: false,
            held: None,
            wheel_at: None,
            ip: None,
            counted_ip: false,
            counted_limit: false,
            charged: 0,
            relay_in_flight: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// What shedding for the memory budget compares: its footprint plus its bytes in
    /// flight to the relay.
    pub fn holds(&self) -> usize {
        self.charged + self.relay_in_flight.load(Ordering::Relaxed)
    }

    /// Every ring operation on the socket has finished; the slot may be freed.
    pub fn finished(&self) -> bool {
        self.shut && !self.recv_armed && !self.send_in_flight
    }
}

/// Bytes a paused client sent, not decoded yet (see `worker/held.rs`): one piece per
/// completion, exactly sized, so holding costs what was received and no growth slack.
#[derive(Default)]
pub struct HeldInput {
    pieces: VecDeque<Box<[u8]>>,
    /// Bytes of the front piece already decoded.
    read: usize,
    /// Bytes in `pieces`.
    held: usize,
    /// The client's FIN came after these bytes.
    pub eof: bool,
}

impl HeldInput {
    /// Heap bytes it holds (charged with the connection's footprint).
    pub fn footprint(held: &Option<Box<HeldInput>>) -> usize {
        held.as_ref().map_or(0, |h| {
            std::mem::size_of::<HeldInput>()
                + h.held
                + h.pieces.capacity() * std::mem::size_of::<Box<[u8]>>()
        })
    }

    pub fn push(held: &mut Option<Box<HeldInput>>, data: &[u8]) {
        debug_assert!(
            !data.is_empty(),
            "a completion with data holds at least a byte"
        );
        let held = held.get_or_insert_with(Box::default);
        held.held += data.len();
        held.pieces.push_back(data.into());
    }

    /// The FIN arrived behind held bytes: it is acted on once they are decoded.
    pub fn push_eof(held: &mut Option<Box<HeldInput>>) {
        held.get_or_insert_with(Box::default).eof = true;
    }

    /// The next at most `max` bytes not decoded yet, in arrival order (counted as decoded).
    pub fn next_chunk(&mut self, max: usize) -> Option<&mut [u8]> {
        while self.pieces.front().is_some_and(|p| p.len() == self.read) {
            let done = self.pieces.pop_front().expect("checked");
            self.held -= done.len();
            self.read = 0;
        }
        let front = self.pieces.front_mut()?;
        let start = self.read;
        self.read = front.len().min(start + max);
        Some(&mut front[start..self.read])
    }

    /// Whether every held byte was handed out by `next_chunk`: only a fully read front piece
    /// (or none) is left, since every piece holds at least one byte.
    pub fn is_drained(&self) -> bool {
        self.held == self.read
    }
}

#[cfg(test)]
mod tests {
    use super::HeldInput;

    #[test]
    fn held_input_comes_back_in_order_in_bounded_chunks_and_is_charged() {
        let mut held = None;
        assert_eq!(HeldInput::footprint(&held), 0);
        HeldInput::push(&mut held, &[1; 10]);
        HeldInput::push(&mut held, &[2; 3]);
        HeldInput::push_eof(&mut held);
        assert!(HeldInput::footprint(&held) >= 13);
        let h = held.as_mut().unwrap();
        let mut out = Vec::new();
        while let Some(chunk) = h.next_chunk(4) {
            assert!(chunk.len() <= 4 && !chunk.is_empty());
            out.extend_from_slice(chunk);
        }
        assert_eq!(out, [[1u8; 10].as_slice(), &[2; 3]].concat());
        assert!(h.is_drained() && h.eof);
        assert_eq!(h.held, 0, "decoded pieces are let go");
    }

    #[test]
    fn a_partly_decoded_hold_is_not_drained() {
        let mut held = None;
        HeldInput::push(&mut held, &[7; 8]);
        let h = held.as_mut().unwrap();
        assert_eq!(h.next_chunk(5).unwrap().len(), 5);
        assert!(!h.is_drained());
        assert_eq!(h.next_chunk(5).unwrap(), &[7; 3]);
        assert!(h.is_drained());
    }
}

#[cfg(test)]
mod size {
    use super::Conn;
    use crate::session::Session;

    /// What the driver adds to an idle connection's session (see the session's own
    /// accounting test): the fd, ring flags, the timer wheel's note, the peer IP for the
    /// limiter, the meter's charge and the relay in-flight counter's pointer.
    #[test]
    fn a_connection_is_its_session_plus_a_few_words() {
        let extra = std::mem::size_of::<Conn>() - std::mem::size_of::<Session>();
        assert!(
            extra <= 80,
            "the driver's part of a connection is {extra} B"
        );
    }
}
