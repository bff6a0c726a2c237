//! The relay: the hop between the edge cores and the upstreams. Cores send it what their
//! clients said ([`ToUpstream`]); it answers through each core's inbox ([`ToEdge`]).
//!
//! For now the only upstream is the embedded `echo`, which sends every message back to its
//! sender through the whole path (core -> relay -> core inbox -> send).

pub mod echo;

use bytes::Bytes;

use crate::edge::ConnId;
use crate::protocol::message::MessageKind;

/// What a core tells the relay.
#[derive(Debug)]
pub enum ToUpstream {
    /// A client completed its handshake.
    Open { conn: ConnId, path: String },
    Message {
        conn: ConnId,
        kind: MessageKind,
        payload: Bytes,
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

/// What the relay tells a core.
#[derive(Debug)]
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
}

impl ToEdge {
    pub fn conn(&self) -> ConnId {
        match self {
            ToEdge::Send { conn, .. } | ToEdge::Close { conn, .. } => *conn,
        }
    }
}

/// The way back to every core: one channel per core plus a wake-up for its event loop.
pub trait EdgeSink: Send {
    /// Queue `msg` for the core that owns `msg.conn()`; the core is woken by [`EdgeSink::flush`].
    fn send(&mut self, msg: ToEdge);
    /// Wake every core that was sent something since the last flush.
    fn flush(&mut self);
}
