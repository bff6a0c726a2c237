//! The relay: the hop between the edge cores and the upstreams. Cores send it what their
//! clients said ([`ToUpstream`]); upstreams answer through each core's inbox ([`ToEdge`]):
//! to one connection, to a topic's subscribers, or to everyone.

pub mod chat;
pub mod link;
pub mod protocol;
pub mod router;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;

use crate::edge::ConnId;
use crate::protocol::message::MessageKind;

/// Index of an upstream in the configuration's upstream list (0 is the route's default when
/// only one is configured).
pub type UpstreamId = u16;

/// What a client's connection looked like at its handshake, for the backend's `open` event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenInfo {
    pub path: String,
    pub query: Option<String>,
    /// The header fields the route chose to pass on (lower-case names).
    pub headers: Vec<(String, String)>,
    pub peer: Option<SocketAddr>,
    /// The core holds the handshake until the backend answers `accept` or `reject`.
    pub authorize: bool,
}

/// What a core tells the relay.
#[derive(Debug)]
pub enum ToUpstream {
    /// A client completed its handshake (or, with `authorize`, asks to).
    Open {
        conn: ConnId,
        upstream: UpstreamId,
        info: Box<OpenInfo>,
    },
    /// A client message, for the upstream the route (and its JSON routing key) chose.
    Message {
        conn: ConnId,
        upstream: UpstreamId,
        kind: MessageKind,
        payload: Bytes,
        /// Charges the payload to its connection's and core's relay in-flight bytes until
        /// dropped (the edge pauses a connection with too much in flight).
        guard: crate::edge::InFlight,
    },
    /// The core reads nothing more from this connection: hand back a `ToEdge::Close` with
    /// this code once every reply passed on before it is on its way, so the client gets
    /// those replies before the close.
    Fence {
        conn: ConnId,
        code: u16,
        reason: String,
    },
    /// The client's connection is gone (close code as sent or received; 1006 if none).
    Closed { conn: ConnId, code: u16 },
}

/// A topic name; shared so that fanning a publish out to every core copies no string.
pub type Topic = Arc<str>;

/// What the relay tells a core.
#[derive(Debug, Clone)]
pub enum ToEdge {
    Send {
        conn: ConnId,
        kind: MessageKind,
        payload: Bytes,
    },
    Close {
        conn: ConnId,
        code: u16,
        reason: String,
    },
    /// Connect authorization granted: complete the handshake with 101.
    Accept {
        conn: ConnId,
    },
    /// Connect authorization refused: answer the handshake with `status` (401/403) and reason.
    Reject {
        conn: ConnId,
        status: u16,
        reason: String,
    },
    Subscribe {
        conn: ConnId,
        topic: Topic,
    },
    Unsubscribe {
        conn: ConnId,
        topic: Topic,
    },
    /// To every subscriber of `topic`; sent once to every core.
    Publish {
        topic: Topic,
        kind: MessageKind,
        payload: Bytes,
    },
    /// To every open connection; sent once to every core.
    Broadcast {
        kind: MessageKind,
        payload: Bytes,
    },
}

impl ToEdge {
    /// The connection this is for; None for messages every core gets.
    pub fn conn(&self) -> Option<ConnId> {
        match self {
            ToEdge::Send { conn, .. }
            | ToEdge::Close { conn, .. }
            | ToEdge::Accept { conn }
            | ToEdge::Reject { conn, .. }
            | ToEdge::Subscribe { conn, .. }
            | ToEdge::Unsubscribe { conn, .. } => Some(*conn),
            ToEdge::Publish { .. } | ToEdge::Broadcast { .. } => None,
        }
    }
}

/// The way back to every core: one channel per core plus a wake-up for its event loop.
pub trait EdgeSink: Send {
    /// Queue `msg` for the core that owns `msg.conn()`, or for every core when it has none;
    /// cores are woken by [`EdgeSink::flush`].
    fn send(&mut self, msg: ToEdge);
    /// Wake every core that was sent something since the last flush.
    fn flush(&mut self);
}
