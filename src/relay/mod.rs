//! The relay: the hop between the edge cores and the upstreams. Cores send it what their
//! clients said ([`ToUpstream`]); upstreams answer through each core's inbox ([`ToEdge`]):
//! to one connection, to a topic's subscribers, or to everyone.

pub mod cluster;
mod conn_table;
pub mod embedded;
pub mod inlet;
pub mod link;
pub mod router;
pub mod wire;

pub use inlet::{channel, RelayRx, RelayTx};

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use crate::ids::ConnId;
use crate::protocol::message::MessageKind;

/// Index of an upstream in the configuration's upstream list (0 is the route's default when
/// only one is configured).
pub use crate::ids::{Topic, UpstreamId};

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

/// Longest topic name the relay accepts (bytes), from a backend's `subscribe`,
/// `unsubscribe` or `publish` and for the embedded chat's `room:NAME` topics. Longer ones are
/// refused and counted (`ringway_relay_limit_refusals{reason="topic_length"}`).
pub const MAX_TOPIC_BYTES: usize = 256;

/// What the relay holds on behalf of peers and how much it refused or dropped; shared by the
/// relay's threads, read by the cores' memory budget and by the metrics.
#[derive(Debug, Default)]
pub struct RelayGauges {
    /// Bytes the relay holds for peers: messages in the cores' inboxes, messages queued on
    /// backend links, stored copies of each connection's `open` (path, query, headers) and
    /// the embedded chat's rooms. Charged to the memory budget.
    pub bytes: AtomicU64,
    /// Replies dropped because a core's inbox stayed full past the wait.
    pub inbox_dropped: AtomicU64,
    /// Topic names over [`MAX_TOPIC_BYTES`] refused (backend frames or chat rooms).
    pub topic_refused: AtomicU64,
    /// Chat joins refused because the connection is in as many rooms as its route allows.
    pub rooms_refused: AtomicU64,
    /// Client messages queued on a backend link (written by the relay thread only).
    pub forwarded: AtomicU64,
    /// Client messages refused (sender closed 1013) because their backend's buffer was full.
    pub buffer_refused: AtomicU64,
    /// Replies addressed to a core that does not exist (a backend's corrupt or forged id).
    pub misaddressed: AtomicU64,
    /// The cluster bus's state (only shown with `[cluster]`).
    pub cluster: cluster::ClusterGauges,
}

impl RelayGauges {
    pub fn charge(&self, n: usize) {
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
    pub fn release(&self, n: usize) {
        let n = n as u64;
        let _ = self
            .bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(n))
            });
    }
    pub fn held(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// One backend link as the metrics and readiness see it: built by the router, read by `ops`.
#[derive(Debug, Clone)]
pub struct UpstreamLink {
    /// The `[[upstreams]]` name (or `default` for the top-level `upstream`).
    pub upstream: String,
    /// The backend URL as configured (`tcp://HOST:PORT`, `unix:PATH`).
    pub backend: String,
    pub state: std::sync::Arc<link::LinkState>,
}

/// Bookkeeping bytes charged per stored item on top of its strings (map entry, allocation
/// headers): an estimate, so that many small items are not charged as nothing.
pub const ENTRY_OVERHEAD: usize = 64;

impl OpenInfo {
    /// Bytes this copy holds, as charged to [`RelayGauges::bytes`]. The handshake limit
    /// (`max_handshake_bytes`, 8 KiB by default, at most 64 KiB) bounds path, query and headers:
    /// they are slices of the request head, which the handshake parser never reads past it.
    pub fn held_bytes(&self) -> usize {
        std::mem::size_of::<OpenInfo>()
            + self.path.len()
            + self.query.as_ref().map_or(0, String::len)
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len() + ENTRY_OVERHEAD)
                .sum::<usize>()
    }
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
        guard: crate::in_flight::InFlight,
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
    /// With `[cluster]` only: this core's subscriber list for `topic` became non-empty
    /// (`on`) or empty, so the node subscribes to the topic on the cluster bus while any
    /// core has subscribers.
    Interest { topic: Topic, on: bool },
}

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
    /// Bytes this message holds while it waits in a core's inbox (payload, strings and a
    /// fixed per-entry overhead).
    pub fn held_bytes(&self) -> usize {
        ENTRY_OVERHEAD
            + match self {
                ToEdge::Send { payload, .. }
                | ToEdge::Publish { payload, .. }
                | ToEdge::Broadcast { payload, .. } => payload.len(),
                ToEdge::Close { reason, .. } | ToEdge::Reject { reason, .. } => reason.len(),
                ToEdge::Subscribe { topic, .. } | ToEdge::Unsubscribe { topic, .. } => topic.len(),
                ToEdge::Accept { .. } => 0,
            }
            + match self {
                ToEdge::Publish { topic, .. } => topic.len(),
                _ => 0,
            }
    }

    /// Whether this may be dropped when a core's inbox stays full: messages and
    /// subscriptions may (counted); closes, accepts, rejects and unsubscribes may not, so
    /// no client is left waiting for a close or a handshake answer that never comes.
    pub fn droppable(&self) -> bool {
        matches!(
            self,
            ToEdge::Send { .. }
                | ToEdge::Publish { .. }
                | ToEdge::Broadcast { .. }
                | ToEdge::Subscribe { .. }
        )
    }

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
    /// cores are woken by [`EdgeSink::flush`]. A full inbox is waited on, briefly.
    fn send(&mut self, msg: ToEdge);
    /// Like `send`, but never waits: what a full inbox cannot take is dropped if it may be.
    fn send_now(&mut self, msg: ToEdge) {
        self.send(msg)
    }
    /// Whether every inbox `msg` goes to has room for it now (a link holds a backend's
    /// record, and stops reading, while not).
    fn has_room(&self, _msg: &ToEdge) -> bool {
        true
    }
    /// Wake every core that was sent something since the last flush.
    fn flush(&mut self);
}

/// The cores' message for a backend record that acts on clients; None for link-level
/// records (hello, ping, pong, error) and gateway -> backend ones. The wire codec knows
/// nothing of the edge: this is where its records become [`ToEdge`] (used by the links, which read the records, and the router).
pub(crate) fn to_edge(record: wire::Record) -> Option<ToEdge> {
    use wire::Record;
    let c = ConnId::from_u64;
    Some(match record {
        Record::Accept { conn } => ToEdge::Accept { conn: c(conn) },
        Record::Reject {
            conn,
            status,
            reason,
        } => ToEdge::Reject {
            conn: c(conn),
            status,
            reason,
        },
        Record::Send {
            conn,
            kind,
            payload,
        } => ToEdge::Send {
            conn: c(conn),
            kind,
            payload,
        },
        Record::Close { conn, code, reason } => ToEdge::Close {
            conn: c(conn),
            code,
            reason,
        },
        Record::Subscribe { conn, topic } => ToEdge::Subscribe {
            conn: c(conn),
            topic,
        },
        Record::Unsubscribe { conn, topic } => ToEdge::Unsubscribe {
            conn: c(conn),
            topic,
        },
        Record::Publish {
            topic,
            kind,
            payload,
        } => ToEdge::Publish {
            topic,
            kind,
            payload,
        },
        Record::Broadcast { kind, payload } => ToEdge::Broadcast { kind, payload },
        Record::Hello { .. }
        | Record::Ping(_)
        | Record::Pong(_)
        | Record::Error { .. }
        | Record::Open { .. }
        | Record::Message { .. }
        | Record::Gone { .. } => return None,
    })
}
