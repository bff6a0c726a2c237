//! The driver's side of one client connection: its socket, the ring operations in flight
//! on it and the core-wide resources it holds, beside its sans-IO [`Session`] (the
//! connection's life). The worker turns what the session asks for into ring operations.

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
