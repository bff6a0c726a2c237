//! The NATS thread: one current-thread tokio runtime running the `async-nats` client. It
//! publishes what the relay hands it (a bounded crossbeam channel, woken by a `Notify`),
//! holds one subscription per topic with local subscribers plus this node's own subjects,
//! and hands what arrives to the relay (a bounded crossbeam channel and the relay loop's
//! `mio::Waker`). Every second it publishes a heartbeat (name and id), counts the nodes
//! heard in the last 3 s, checks that no other node name claims this node's id, and
//! measures a round trip through NATS.
//!
//! While NATS is unreachable the client reconnects (every 250 ms to 1 s, forever) and what
//! the relay hands over is dropped and counted: nothing waits for the outage to end.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::{Client, HeaderMap, Subscriber};
use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};
use futures_util::StreamExt;
use tokio::task::JoinHandle;

use super::subject::{self as s, H_CODE, H_CONN, H_KIND, H_LINK, H_NAME, H_OP, H_ORIGIN, H_TOPIC};
use super::{BackendEvent, ConnOp, Drop, GoneTo, In, Out};
use crate::config::ClusterConfig;
use crate::ids::ConnId;
use crate::relay::{RelayGauges, ToEdge, Topic};

/// How often a node announces itself and pings through NATS.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// A node not heard for this long is no longer counted.
const NODE_EXPIRY: Duration = Duration::from_secs(3);
/// Messages the client may hold for one subscription before it drops (async-nats counts
/// them as a slow consumer).
const SUBSCRIPTION_CAPACITY: usize = 16 * 1024;

pub(super) struct Thread {
    pub config: ClusterConfig,
    pub name: String,
    pub node: u8,
    pub out: Receiver<Out>,
    pub notify: Arc<tokio::sync::Notify>,
    pub incoming: Sender<In>,
    pub wake: Arc<mio::Waker>,
    pub gauges: Arc<RelayGauges>,
    /// Since when the client is connected (None while not), so that a node not heard yet
    /// is not taken for a missing one right after a (re)connect.
    pub up_since: std::cell::Cell<Option<Instant>>,
}

/// After a (re)connect, every live node's heartbeat has come through within this.
const HEARD_ALL_AFTER: Duration = Duration::from_secs(2);

/// What the subscription tasks share: the way into the relay.
#[derive(Clone)]
struct Inlet {
    node: u8,
    tx: Sender<In>,
    wake: Arc<mio::Waker>,
    gauges: Arc<RelayGauges>,
}

impl Inlet {
    fn deliver(&self, msg: In) {
        self.gauges.cluster.received.fetch_add(1, Ordering::Relaxed);
        self.hand_over(msg);
    }

    fn hand_over(&self, msg: In) {
        match self.tx.try_send(msg) {
            Ok(()) => {
                let _ = self.wake.wake();
            }
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.gauges.cluster.drop(Drop::InFull)
            }
        }
    }
}

/// Node name per id, with when each was last heard.
type Nodes = Arc<Mutex<HashMap<u8, HashMap<String, Instant>>>>;

impl Thread {
    pub(super) fn run(self) {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!("cluster: cannot start the NATS thread's runtime: {e}");
                return;
            }
        };
        rt.block_on(self.serve());
    }

    fn options(&self) -> async_nats::ConnectOptions {
        let gauges = self.gauges.clone();
        let mut o = async_nats::ConnectOptions::new()
            .name(format!("ringway {}", self.name))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((250 * attempts as u64).clamp(250, 1000))
            })
            .connection_timeout(Duration::from_secs(2))
            .subscription_capacity(SUBSCRIPTION_CAPACITY)
            .event_callback(move |event| {
                let gauges = gauges.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            gauges.cluster.connected.store(true, Ordering::Relaxed);
                            tracing::info!("cluster: connected to NATS");
                        }
                        async_nats::Event::Disconnected | async_nats::Event::Closed => {
                            gauges.cluster.connected.store(false, Ordering::Relaxed);
                            gauges.cluster.ping_us.store(0, Ordering::Relaxed);
                            tracing::warn!(
                                "cluster: NATS unreachable; serving local clients only, \
                                 cross-node messages are dropped until it is back"
                            );
                        }
                        async_nats::Event::SlowConsumer(sid) => {
                            // One per dropped message: counted, and logged at 1, 2, 4, 8...
                            // so a flood of them cannot flood the log too.
                            let dropped = gauges.cluster.count_drop(Drop::SlowConsumer);
                            if dropped.is_power_of_two() {
                                tracing::warn!(
                                    subscription = sid,
                                    dropped,
                                    "cluster: the NATS client dropped messages from NATS: this \
                                     node reads them slower than they come (slow consumer)"
                                );
                            }
                        }
                        other => tracing::warn!("cluster: NATS: {other}"),
                    }
                }
            });
        if let Some(t) = &self.config.token {
            o = o.token(t.clone());
        }
        if let (Some(u), Some(p)) = (&self.config.user, &self.config.password) {
            o = o.user_and_password(u.clone(), p.clone());
        }
        if let Some(ca) = &self.config.ca_file {
            o = o.add_root_certificates(ca.clone()).require_tls(true);
        }
        o
    }

    async fn serve(self) {
        let client = match self.options().connect(self.config.nats.clone()).await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(
                    "cluster: cannot use the NATS servers {:?}: {e}",
                    self.config.nats
                );
                return;
            }
        };
        tracing::info!(node = %self.name, id = self.node, servers = ?self.config.nats, "cluster: joining");
        let inlet = Inlet {
            node: self.node,
            tx: self.incoming.clone(),
            wake: self.wake.clone(),
            gauges: self.gauges.clone(),
        };
        let nodes: Nodes = Arc::default();
        let mut fixed = Vec::new();
        for subject in [s::BROADCAST.to_string(), s::node_subject(self.node)] {
            match client.subscribe(subject.clone()).await {
                Ok(sub) => fixed.push(tokio::spawn(relay_from(sub, inlet.clone()))),
                Err(e) => tracing::error!("cluster: cannot subscribe to {subject}: {e}"),
            }
        }
        if let Ok(sub) = client.subscribe(s::HEARTBEAT).await {
            fixed.push(tokio::spawn(hear(sub, nodes.clone())));
        }
        let ping_subject = format!("{}{}", s::PING_PREFIX, self.node);
        let (pong_tx, mut pong_rx) = tokio::sync::mpsc::channel::<()>(4);
        if let Ok(mut sub) = client.subscribe(ping_subject.clone()).await {
            fixed.push(tokio::spawn(async move {
                while sub.next().await.is_some() {
                    let _ = pong_tx.try_send(());
                }
            }));
        }
        let mut topics: HashMap<Topic, JoinHandle<()>> = HashMap::new();
        let mut tick = tokio::time::interval(HEARTBEAT);
        let mut ping_sent: Option<Instant> = None;
        let mut conflict_logged: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = self.notify.notified() => {
                    loop {
                        match self.out.try_recv() {
                            Ok(msg) => self.publish(&client, msg, &mut topics, &inlet, &nodes).await,
                            Err(TryRecvError::Empty) => break,
                            Err(TryRecvError::Disconnected) => {
                                // The relay ended: the gateway is shutting down.
                                let _ = client.flush().await;
                                return;
                            }
                        }
                    }
                }
                Some(()) = pong_rx.recv() => {
                    if let Some(t) = ping_sent.take() {
                        let us = t.elapsed().as_micros().max(1) as u64;
                        self.gauges.cluster.ping_us.store(us, Ordering::Relaxed);
                    }
                }
                _ = tick.tick() => {
                    self.settled(&client);
                    self.beat(&client, &nodes, &mut conflict_logged).await;
                    if connected(&client) {
                        ping_sent = Some(Instant::now());
                        let _ = client.publish(ping_subject.clone(), Bytes::new()).await;
                    }
                    // The relay may be gone without a wake-up to tell it.
                    match self.out.try_recv() {
                        Ok(msg) => self.publish(&client, msg, &mut topics, &inlet, &nodes).await,
                        Err(TryRecvError::Disconnected) => return,
                        Err(TryRecvError::Empty) => {}
                    }
                }
            }
        }
    }

    /// Announce this node; count the nodes heard lately; report a second name on this id.
    async fn beat(&self, client: &Client, nodes: &Nodes, logged: &mut Option<Instant>) {
        if connected(client) {
            let mut h = HeaderMap::new();
            h.insert(H_ORIGIN, self.node.to_string().as_str());
            h.insert(H_NAME, self.name.as_str());
            let _ = client
                .publish_with_headers(s::HEARTBEAT, h, Bytes::new())
                .await;
        }
        let now = Instant::now();
        let mut map = nodes.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, names| {
            names.retain(|_, seen| now.duration_since(*seen) < NODE_EXPIRY);
            !names.is_empty()
        });
        let count: usize = map.values().map(HashMap::len).sum();
        self.gauges
            .cluster
            .nodes
            .store(count as u64, Ordering::Relaxed);
        if let Some(names) = map.get(&self.node) {
            let others: Vec<&String> = names.keys().filter(|n| **n != self.name).collect();
            if !others.is_empty() {
                self.gauges
                    .cluster
                    .id_conflicts
                    .fetch_add(1, Ordering::Relaxed);
                if logged.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10)) {
                    *logged = Some(now);
                    tracing::error!(
                        node = %self.name, id = self.node, others = ?others,
                        "cluster: another node uses this node's id; connection ids are \
                         ambiguous and sends to this id are refused: give every node its own \
                         cluster.node_id"
                    );
                }
            }
        }
    }

    async fn publish(
        &self,
        client: &Client,
        msg: Out,
        topics: &mut HashMap<Topic, JoinHandle<()>>,
        inlet: &Inlet,
        nodes: &Nodes,
    ) {
        let (subject, headers, payload) = match msg {
            Out::Interest { topic, on: true } => {
                if let std::collections::hash_map::Entry::Vacant(slot) = topics.entry(topic) {
                    match client.subscribe(s::topic_subject(slot.key())).await {
                        Ok(sub) => {
                            slot.insert(tokio::spawn(relay_from(sub, inlet.clone())));
                        }
                        Err(e) => tracing::warn!("cluster: cannot subscribe to a topic: {e}"),
                    }
                }
                return;
            }
            Out::Interest { topic, on: false } => {
                // Dropping the subscriber (with its task) unsubscribes.
                if let Some(task) = topics.remove(&topic) {
                    task.abort();
                }
                return;
            }
            Out::Publish {
                topic,
                kind,
                payload,
            } => {
                let mut h = self.headers();
                h.insert(H_KIND, s::kind_name(kind));
                (s::topic_subject(&topic), h, payload)
            }
            Out::Backend {
                prefix,
                conn,
                event,
            } => {
                let mut h = self.headers();
                h.insert(H_CONN, conn.to_string().as_str());
                let payload = match event {
                    BackendEvent::Open(info) => {
                        h.insert(H_OP, "open");
                        open_json(&info)
                    }
                    BackendEvent::Message { kind, payload } => {
                        h.insert(H_OP, "message");
                        h.insert(H_KIND, s::kind_name(kind));
                        payload
                    }
                    BackendEvent::Close { code } => {
                        h.insert(H_OP, "close");
                        h.insert(H_CODE, code.to_string().as_str());
                        Bytes::new()
                    }
                };
                (format!("{prefix}.in"), h, payload)
            }
            Out::Broadcast { kind, payload } => {
                let mut h = self.headers();
                h.insert(H_KIND, s::kind_name(kind));
                (s::BROADCAST.to_string(), h, payload)
            }
            Out::GoneTo { subject, conn } => {
                let mut h = self.headers();
                h.insert(H_OP, "gone");
                h.insert(H_CONN, conn.to_string().as_str());
                (subject, h, Bytes::new())
            }
            Out::ToNode {
                node,
                conn,
                op,
                link,
            } => {
                // What cannot reach a connection's node answers `gone` to the backend
                // link that asked, as a stale id on one gateway does.
                let refuse = |why: Drop| {
                    self.gauges.cluster.drop(why);
                    if let (Some(link), false) = (link, matches!(op, ConnOp::Gone { .. })) {
                        inlet.hand_over(In::Gone { conn, link });
                    }
                };
                if !connected(client) {
                    return refuse(Drop::Disconnected);
                }
                if conflicted(nodes, node) {
                    return refuse(Drop::NodeIdConflict);
                }
                if self.settled(client) && !heard(nodes, node) {
                    return refuse(Drop::UnknownNode);
                }
                let mut h = self.headers();
                h.insert(H_CONN, conn.to_string().as_str());
                if let Some(link) = link {
                    h.insert(H_LINK, link.to_string().as_str());
                }
                let payload = match op {
                    ConnOp::Send { kind, payload } => {
                        h.insert(H_OP, "send");
                        h.insert(H_KIND, s::kind_name(kind));
                        payload
                    }
                    ConnOp::Close { code, reason } => {
                        h.insert(H_OP, "close");
                        h.insert(H_CODE, code.to_string().as_str());
                        Bytes::from(reason)
                    }
                    ConnOp::Subscribe { topic } => {
                        h.insert(H_OP, "subscribe");
                        Bytes::copy_from_slice(topic.as_bytes())
                    }
                    ConnOp::Unsubscribe { topic } => {
                        h.insert(H_OP, "unsubscribe");
                        Bytes::copy_from_slice(topic.as_bytes())
                    }
                    ConnOp::Gone { link } => {
                        h.insert(H_OP, "gone");
                        h.insert(H_LINK, link.to_string().as_str());
                        Bytes::new()
                    }
                };
                (s::node_subject(node), h, payload)
            }
        };
        if !connected(client) {
            self.gauges.cluster.drop(Drop::Disconnected);
            return;
        }
        match client.publish_with_headers(subject, headers, payload).await {
            Ok(()) => {
                self.gauges.cluster.sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.gauges.cluster.drop(Drop::PublishFailed);
                tracing::debug!("cluster: publish failed: {e}");
            }
        }
    }

    /// Whether the client has been connected long enough to have heard every live node.
    fn settled(&self, client: &Client) -> bool {
        if !connected(client) {
            self.up_since.set(None);
            return false;
        }
        let since = self.up_since.get().unwrap_or_else(Instant::now);
        self.up_since.set(Some(since));
        since.elapsed() >= HEARD_ALL_AFTER
    }

    fn headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(H_ORIGIN, self.node.to_string().as_str());
        h
    }
}

/// An `open` for NATS backends: the handshake as JSON.
fn open_json(info: &crate::relay::OpenInfo) -> Bytes {
    let headers: serde_json::Map<String, serde_json::Value> = info
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    let v = serde_json::json!({
        "path": info.path,
        "query": info.query,
        "peer": info.peer.map(|p| p.to_string()),
        "headers": headers,
        "authorize": info.authorize,
    });
    Bytes::from(v.to_string())
}

fn connected(client: &Client) -> bool {
    client.connection_state() == async_nats::connection::State::Connected
}

/// Whether two node names claim `node` (sends to it would be ambiguous).
fn conflicted(nodes: &Nodes, node: u8) -> bool {
    let map = nodes.lock().unwrap_or_else(|p| p.into_inner());
    map.get(&node).is_some_and(|names| names.len() > 1)
}

/// Whether a heartbeat of `node` came lately (within [`NODE_EXPIRY`], give or take a beat).
fn heard(nodes: &Nodes, node: u8) -> bool {
    let map = nodes.lock().unwrap_or_else(|p| p.into_inner());
    map.contains_key(&node)
}

/// Heartbeats: who is out there.
async fn hear(mut sub: Subscriber, nodes: Nodes) {
    while let Some(m) = sub.next().await {
        let h = m.headers.as_ref();
        let id = h
            .and_then(|h| h.get(H_ORIGIN))
            .and_then(|v| v.as_str().parse::<u8>().ok());
        let name = h
            .and_then(|h| h.get(H_NAME))
            .map(|v| v.as_str().to_string());
        if let (Some(id), Some(name)) = (id, name) {
            let mut map = nodes.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(id).or_default().insert(name, Instant::now());
        }
    }
}

/// One subscription's messages, into the relay.
async fn relay_from(mut sub: Subscriber, inlet: Inlet) {
    while let Some(m) = sub.next().await {
        match decode(inlet.node, &m) {
            Some(Some(msg)) => inlet.deliver(msg),
            // This node's own publish, back from NATS.
            Some(None) => {}
            None => inlet.gauges.cluster.drop(Drop::Invalid),
        }
    }
}

/// What a message from NATS means here: Some(None) for this node's own echo, None when it
/// cannot be used.
fn decode(node: u8, m: &async_nats::Message) -> Option<Option<In>> {
    let get = |k: &str| {
        m.headers
            .as_ref()
            .and_then(|h| h.get(k))
            .map(|v| v.as_str().to_string())
    };
    let origin = get(H_ORIGIN).and_then(|v| v.parse::<u8>().ok());
    let subject = m.subject.as_str();
    if subject.starts_with(s::TOPIC_PREFIX) || subject == s::BROADCAST {
        if origin == Some(node) {
            return Some(None);
        }
        let kind = s::kind_of(get(H_KIND).as_deref())?;
        let payload = m.payload.clone();
        let msg = if subject == s::BROADCAST {
            ToEdge::Broadcast { kind, payload }
        } else {
            let topic = s::subject_topic(subject)?;
            if topic.len() > crate::relay::MAX_TOPIC_BYTES {
                return None;
            }
            ToEdge::Publish {
                topic: Topic::from(topic),
                kind,
                payload,
            }
        };
        return Some(Some(In::Fanout(msg)));
    }
    // This node's own subject: a backend's publish or broadcast (for every node, through
    // this one), or an operation on one of its connections.
    let op = get(H_OP)?;
    match op.as_str() {
        "publish" => {
            let topic = get(H_TOPIC)?;
            if topic.len() > crate::relay::MAX_TOPIC_BYTES {
                return None;
            }
            return Some(Some(In::Emit(ToEdge::Publish {
                topic: Topic::from(topic),
                kind: s::kind_of(get(H_KIND).as_deref())?,
                payload: m.payload.clone(),
            })));
        }
        "broadcast" => {
            return Some(Some(In::Emit(ToEdge::Broadcast {
                kind: s::kind_of(get(H_KIND).as_deref())?,
                payload: m.payload.clone(),
            })));
        }
        _ => {}
    }
    let conn_raw = get(H_CONN)?.parse::<u64>().ok()?;
    let conn = ConnId::from_u64(conn_raw);
    let link = get(H_LINK).and_then(|v| v.parse::<u32>().ok());
    if op == "gone" {
        return Some(Some(In::Gone {
            conn: conn_raw,
            link: link?,
        }));
    }
    if conn.node() != node {
        return None;
    }
    let text = || std::str::from_utf8(&m.payload).ok().map(str::to_string);
    let msg = match op.as_str() {
        "send" => ToEdge::Send {
            conn,
            kind: s::kind_of(get(H_KIND).as_deref())?,
            payload: m.payload.clone(),
        },
        "close" => ToEdge::Close {
            conn,
            code: get(H_CODE)
                .and_then(|c| c.parse::<u16>().ok())
                .unwrap_or(1000),
            reason: text()?,
        },
        "accept" => ToEdge::Accept { conn },
        "reject" => ToEdge::Reject {
            conn,
            status: get(H_CODE)
                .and_then(|c| c.parse::<u16>().ok())
                .filter(|s| matches!(s, 401 | 403))
                .unwrap_or(403),
            reason: text()?,
        },
        "subscribe" | "unsubscribe" => {
            let topic = text()?;
            if topic.len() > crate::relay::MAX_TOPIC_BYTES {
                return None;
            }
            let topic = Topic::from(topic);
            if op == "subscribe" {
                ToEdge::Subscribe { conn, topic }
            } else {
                ToEdge::Unsubscribe { conn, topic }
            }
        }
        _ => return None,
    };
    // A relay link's operation forwarded by its node names the link; anyone else may give
    // a NATS reply subject to hear `gone` on.
    let reply = match (origin.zip(link), &m.reply) {
        (Some((node, link)), _) => Some(GoneTo::Link { node, link }),
        (None, Some(subject)) => Some(GoneTo::Subject(subject.to_string())),
        (None, None) => None,
    };
    Some(Some(In::ForConn { msg, reply }))
}
