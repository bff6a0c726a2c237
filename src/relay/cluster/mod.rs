//! The cluster bus: what crosses between gateways of one cluster, on NATS (docs/cluster.md).
//! The relay thread keeps this module's [`ClusterRelay`]: it passes topic publishes and
//! broadcasts to NATS once (beside its own cores), sends a backend's replies for a
//! connection of another node to that node's subject, tells the NATS thread which topics the
//! cores have subscribers for (interest), and delivers what other nodes sent to the local
//! cores only. The NATS client itself (`async-nats`, tokio) runs on a small thread of its own
//! (`nats`), bridged both ways by bounded crossbeam channels: what does not fit is dropped
//! and counted, never queued without bound. Delivery across nodes is at most once.

mod nats;
pub mod subject;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, TrySendError};

use super::{ToEdge, Topic};
use crate::config::ClusterConfig;
use crate::protocol::message::MessageKind;

/// Why a cross-node message was dropped (the `reason` label of
/// `ringway_cluster_dropped_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    /// The relay -> NATS buffer (`cluster.buffer_messages`) was full.
    OutFull = 0,
    /// NATS was unreachable: the message could not be published.
    Disconnected = 1,
    /// The NATS -> relay buffer was full.
    InFull = 2,
    /// Addressed to a node id that two node names claim.
    NodeIdConflict = 3,
    /// A message from NATS the gateway cannot use (bad headers, a subject it does not know).
    Invalid = 4,
    /// The NATS client refused the publish (payload over the server's max_payload, ...).
    PublishFailed = 5,
    /// Addressed to a node id whose heartbeat was not heard (no such node, or it left).
    UnknownNode = 6,
    /// The NATS client's own buffer for one subscription (`SUBSCRIPTION_CAPACITY`) was full:
    /// it dropped a message from NATS (its slow-consumer event; a lower bound, as the
    /// client may drop the events too when they come faster than it reports them).
    SlowConsumer = 7,
}

impl Drop {
    pub const ALL: [Drop; 8] = [
        Drop::OutFull,
        Drop::Disconnected,
        Drop::InFull,
        Drop::NodeIdConflict,
        Drop::Invalid,
        Drop::PublishFailed,
        Drop::UnknownNode,
        Drop::SlowConsumer,
    ];
    pub fn label(self) -> &'static str {
        match self {
            Drop::OutFull => "buffer_full",
            Drop::Disconnected => "disconnected",
            Drop::InFull => "inbound_full",
            Drop::NodeIdConflict => "node_id_conflict",
            Drop::Invalid => "invalid",
            Drop::PublishFailed => "publish_failed",
            Drop::UnknownNode => "unknown_node",
            Drop::SlowConsumer => "slow_consumer",
        }
    }
}

/// The cluster's state for metrics (`ringway_cluster_*`), written by the relay and the NATS
/// thread.
#[derive(Debug, Default)]
pub struct ClusterGauges {
    /// A `[cluster]` is configured (the metrics are only shown then).
    pub enabled: AtomicBool,
    pub connected: AtomicBool,
    /// Nodes whose heartbeat was seen in the last 3 s, this one included.
    pub nodes: AtomicU64,
    /// Messages published to NATS / taken from NATS.
    pub sent: AtomicU64,
    pub received: AtomicU64,
    pub dropped: [AtomicU64; Drop::ALL.len()],
    /// The last round trip of a ping through NATS, in microseconds (0: none yet).
    pub ping_us: AtomicU64,
    /// Heartbeats from another node name claiming this node's id.
    pub id_conflicts: AtomicU64,
}

impl ClusterGauges {
    pub fn drop(&self, why: Drop) {
        self.count_drop(why);
    }
    /// Count one drop; returns the count with it.
    pub fn count_drop(&self, why: Drop) -> u64 {
        self.dropped[why as usize].fetch_add(1, Ordering::Relaxed) + 1
    }
    pub fn dropped(&self, why: Drop) -> u64 {
        self.dropped[why as usize].load(Ordering::Relaxed)
    }
}

/// An operation on one connection, sent to the node that owns it.
#[derive(Debug, Clone, PartialEq)]
pub enum ConnOp {
    Send {
        kind: MessageKind,
        payload: Bytes,
    },
    Close {
        code: u16,
        reason: String,
    },
    Subscribe {
        topic: Topic,
    },
    Unsubscribe {
        topic: Topic,
    },
    /// The connection is not open on its node: for the backend link `link` of the node the
    /// operation came from.
    Gone {
        link: u32,
    },
}

/// Relay -> NATS thread.
#[derive(Debug)]
pub(crate) enum Out {
    Publish {
        topic: Topic,
        kind: MessageKind,
        payload: Bytes,
    },
    Broadcast {
        kind: MessageKind,
        payload: Bytes,
    },
    ToNode {
        node: u8,
        conn: u64,
        op: ConnOp,
        /// The backend link on this node that asked, for a `gone`.
        link: Option<u32>,
    },
    /// The cores have local subscribers for `topic` now / no longer.
    Interest {
        topic: Topic,
        on: bool,
    },
    /// The connection an operation from NATS named is not open here: `gone` to the reply
    /// subject its sender gave (a backend over NATS, or any NATS client).
    GoneTo {
        subject: String,
        conn: u64,
    },
    /// An event of a client of a `nats://PREFIX` upstream, for its queue group on
    /// `PREFIX.in`.
    Backend {
        prefix: Arc<str>,
        conn: u64,
        event: BackendEvent,
    },
}

/// What a `nats://` upstream's backends hear (docs/cluster.md, "Backends over NATS").
#[derive(Debug)]
pub enum BackendEvent {
    Open(Box<super::OpenInfo>),
    Message { kind: MessageKind, payload: Bytes },
    Close { code: u16 },
}

/// NATS thread -> relay.
#[derive(Debug)]
pub(crate) enum In {
    /// For every local core (a publish or broadcast from another node).
    Fanout(ToEdge),
    /// A publish or broadcast of a backend over NATS, sent to this node: for the local cores
    /// and, once, the other nodes (as a relay link's).
    Emit(ToEdge),
    /// For a connection of this node; if it is not open here, `gone` goes back to
    /// `reply`.
    ForConn { msg: ToEdge, reply: Option<GoneTo> },
    /// A `gone` for backend link `link` of this node.
    Gone { conn: u64, link: u32 },
}

/// Who hears `gone` for an operation from NATS on a connection that is not open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum GoneTo {
    /// Backend link `link` of node `node` (a relay link's operation forwarded by its node).
    Link { node: u8, link: u32 },
    /// The NATS reply subject of the message (a backend over NATS, or any NATS client).
    Subject(String),
}

/// The relay's end of the bus: usable through `&self` from the links' context.
pub struct ClusterBus {
    node: u8,
    out: Sender<Out>,
    notify: Arc<tokio::sync::Notify>,
    gauges: Arc<super::RelayGauges>,
}

impl ClusterBus {
    /// This node's id (the NODE field of its connection ids).
    pub fn node(&self) -> u8 {
        self.node
    }

    /// False when it did not fit (counted).
    fn push(&self, msg: Out) -> bool {
        match self.out.try_send(msg) {
            Ok(()) => {
                self.notify.notify_one();
                true
            }
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.gauges.cluster.drop(Drop::OutFull);
                false
            }
        }
    }

    /// A publish or broadcast made on this node: to the other nodes too (once).
    pub fn fan_out(&self, msg: &ToEdge) {
        let _ = match msg {
            ToEdge::Publish {
                topic,
                kind,
                payload,
            } => self.push(Out::Publish {
                topic: topic.clone(),
                kind: *kind,
                payload: payload.clone(),
            }),
            ToEdge::Broadcast { kind, payload } => self.push(Out::Broadcast {
                kind: *kind,
                payload: payload.clone(),
            }),
            _ => true,
        };
    }

    /// Whether `msg` is for a connection of another node (then it goes there, not to a
    /// local core).
    pub fn is_remote(&self, msg: &ToEdge) -> bool {
        msg.conn().is_some_and(|c| c.node() != self.node)
    }

    /// A backend's operation on a connection of another node, from backend link `link`;
    /// accept and reject only ever go to the link that carried the `open`, so they are not
    /// carried. False when the buffer to NATS was full: the caller answers `gone`.
    pub fn to_node(&self, msg: ToEdge, link: Option<u32>) -> bool {
        let Some(conn) = msg.conn() else { return true };
        let op = match msg {
            ToEdge::Send { kind, payload, .. } => ConnOp::Send { kind, payload },
            ToEdge::Close { code, reason, .. } => ConnOp::Close { code, reason },
            ToEdge::Subscribe { topic, .. } => ConnOp::Subscribe { topic },
            ToEdge::Unsubscribe { topic, .. } => ConnOp::Unsubscribe { topic },
            _ => return true,
        };
        self.push(Out::ToNode {
            node: conn.node(),
            conn: conn.as_u64(),
            op,
            link,
        })
    }

    /// An event for the backends of a `nats://PREFIX` upstream.
    pub fn to_backend(&self, prefix: &Arc<str>, conn: crate::ids::ConnId, event: BackendEvent) {
        self.push(Out::Backend {
            prefix: prefix.clone(),
            conn: conn.as_u64(),
            event,
        });
    }

    /// The connection `conn` an operation from NATS named is not open on this node.
    pub(crate) fn gone(&self, to: GoneTo, conn: u64) {
        self.push(match to {
            GoneTo::Link { node, link } => Out::ToNode {
                node,
                conn,
                op: ConnOp::Gone { link },
                link: None,
            },
            GoneTo::Subject(subject) => Out::GoneTo { subject, conn },
        });
    }
}

/// What the relay thread holds of the cluster: the bus, what came from NATS, and how many
/// cores have subscribers for each topic.
pub struct ClusterRelay {
    pub bus: ClusterBus,
    pub(crate) incoming: Receiver<In>,
    interest: HashMap<Topic, u32>,
}

impl ClusterRelay {
    /// Core `on` (or no longer) has subscribers for `topic`: the node subscribes to the
    /// topic's subject with the first such core and unsubscribes with the last.
    pub fn interest(&mut self, topic: Topic, on: bool) {
        if on {
            let n = self.interest.entry(topic.clone()).or_insert(0);
            *n += 1;
            if *n == 1 {
                self.bus.push(Out::Interest { topic, on: true });
            }
        } else if let Some(n) = self.interest.get_mut(&topic) {
            *n -= 1;
            if *n == 0 {
                self.interest.remove(&topic);
                self.bus.push(Out::Interest { topic, on: false });
            }
        }
    }

    /// Topics with local subscribers (for tests and introspection).
    pub fn topics(&self) -> usize {
        self.interest.len()
    }
}

/// With `[cluster]`: start the NATS thread and return the relay's end (None without). The
/// relay loop of `rx` is woken when something comes from NATS. Failing to reach NATS is not
/// an error: the client keeps trying, and the node serves its own clients meanwhile.
pub fn start(
    config: &crate::config::Config,
    rx: &super::RelayRx,
    gauges: Arc<super::RelayGauges>,
) -> std::io::Result<Option<ClusterRelay>> {
    let (Some(cluster), Some((name, node))) = (&config.cluster, config.cluster_node()) else {
        return Ok(None);
    };
    start_thread(cluster, name, node, rx.waker(), gauges).map(Some)
}

fn start_thread(
    config: &ClusterConfig,
    name: String,
    node: u8,
    wake: Arc<mio::Waker>,
    gauges: Arc<super::RelayGauges>,
) -> std::io::Result<ClusterRelay> {
    gauges.cluster.enabled.store(true, Ordering::Relaxed);
    let cap = config.buffer_messages;
    let (out_tx, out_rx) = crossbeam_channel::bounded(cap);
    let (in_tx, in_rx) = crossbeam_channel::bounded(cap);
    let notify = Arc::new(tokio::sync::Notify::new());
    let thread = nats::Thread {
        config: config.clone(),
        name,
        node,
        out: out_rx,
        notify: notify.clone(),
        incoming: in_tx,
        wake,
        gauges: gauges.clone(),
        up_since: std::cell::Cell::new(None),
    };
    std::thread::Builder::new()
        .name("ringway-cluster".into())
        .spawn(move || thread.run())?;
    Ok(ClusterRelay {
        bus: ClusterBus {
            node,
            out: out_tx,
            notify,
            gauges,
        },
        incoming: in_rx,
        interest: HashMap::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay(cap: usize) -> (ClusterRelay, Receiver<Out>) {
        let (out, rx) = crossbeam_channel::bounded(cap);
        let (_in_tx, incoming) = crossbeam_channel::bounded(1);
        let r = ClusterRelay {
            bus: ClusterBus {
                node: 3,
                out,
                notify: Arc::default(),
                gauges: Arc::default(),
            },
            incoming,
            interest: HashMap::new(),
        };
        (r, rx)
    }

    #[test]
    fn interest_follows_the_first_and_last_core() {
        let (mut r, rx) = relay(16);
        let t = Topic::from("room:a");
        r.interest(t.clone(), true);
        r.interest(t.clone(), true);
        r.interest(t.clone(), false);
        assert!(matches!(rx.try_recv(), Ok(Out::Interest { on: true, .. })));
        assert!(rx.try_recv().is_err(), "a second core does not resubscribe");
        r.interest(t.clone(), false);
        assert!(
            matches!(rx.try_recv(), Ok(Out::Interest { on: false, ref topic }) if **topic == *"room:a")
        );
        assert_eq!(r.topics(), 0);
        // A stray "off" (never on) changes nothing.
        r.interest(t, false);
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn remote_connections_go_to_their_node_and_overflow_is_counted() {
        let (r, rx) = relay(1);
        let local = crate::ids::ConnId::on_node(3, 0, 1, 1);
        let remote = crate::ids::ConnId::on_node(9, 0, 1, 1);
        let send = |conn| ToEdge::Send {
            conn,
            kind: MessageKind::Text,
            payload: Bytes::from_static(b"hi"),
        };
        assert!(!r.bus.is_remote(&send(local)));
        assert!(r.bus.is_remote(&send(remote)));
        assert!(r.bus.to_node(send(remote), Some(4)));
        assert!(matches!(
            rx.try_recv(),
            Ok(Out::ToNode {
                node: 9,
                link: Some(4),
                op: ConnOp::Send { .. },
                ..
            })
        ));
        assert!(r.bus.to_node(send(remote), None));
        assert!(
            !r.bus.to_node(send(remote), None),
            "a full buffer says so (the link answers gone)"
        );
        assert_eq!(r.bus.gauges.cluster.dropped(Drop::OutFull), 1);
    }
}
