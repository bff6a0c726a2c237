//! The relay thread: one event loop for the hop between the cores and every upstream. It
//! takes every core's [`ToUpstream`] messages, sticks each client connection to one backend
//! of each upstream it talks to, encodes its records straight into that backend link's out
//! buffer, and drives every link's socket (`link`) itself; embedded upstreams are answered
//! right here. A message to a backend crosses one thread hand-off (core -> relay, on the
//! `inlet` channel), a reply one (relay -> core inbox).
//!
//! Why epoll (via `mio`) and not io_uring like the cores: the relay serves a handful of
//! long-lived sockets with batched writes, so it makes few syscalls per message already
//! (one `write` per link per turn, one `read` per readable link, one `epoll_wait` when idle);
//! io_uring's wins (multishot accept/recv over thousands of sockets, provided buffers) do not
//! apply, while readiness plus plain `read`/`write` needs no `unsafe`, no buffers pinned
//! across calls and no cancel-and-reap at shutdown, and works where io_uring is disabled for
//! everything but the cores.
//!
//! Nothing is dropped silently: a message that cannot be queued for its backend (the link is
//! down and its buffer full, or the backend stopped reading for too long) closes its sender
//! with 1013 "try again later".

use super::conn_table::ConnTable;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::TryRecvError;
use mio::Events;

use super::embedded::ChatEcho;
use super::inlet::{RelayRx, WAKE};
use super::link::tls::TlsClient;
use super::link::{Address, Ctx, Link, LinkState};
#[cfg(test)]
use super::to_edge;
#[cfg(test)]
use super::wire::Record;
use super::{EdgeSink, OpenInfo, RelayGauges, ToEdge, ToUpstream, UpstreamId, ENTRY_OVERHEAD};
use crate::config::Balance;
use crate::ids::ConnId;
use crate::protocol::close;
use crate::route::{Backend, RouteTable};
use rustls::pki_types::ServerName;
use rustls::ClientConfig;

pub use super::link::LINK_BUFFER_BYTES;

/// At shutdown, how long the links get to write what they hold once the cores are gone (and
/// to finish a connect that is under way); what is still unwritten then is left behind, so
/// the process exits in time.
const LINK_FLUSH: Duration = Duration::from_millis(600);

/// Messages taken from the cores' channel per loop turn before the links get their turn.
const BATCH: usize = 1024;

/// The loop's read buffer (one for every link: the loop reads one socket at a time).
const SCRATCH: usize = 64 * 1024;

enum UpstreamRt {
    Embedded,
    /// `nats://PREFIX`: events to the queue group on `PREFIX.in` over the cluster bus.
    Nats(Arc<str>),
    Backends {
        /// Indices into `Router::links`.
        links: Vec<usize>,
        /// Messages that may wait for one backend (`buffer_messages`).
        limit: usize,
        balance: Balance,
        next: usize,
    },
}

struct Binding {
    /// Its `open`, re-sent to a backend it is bound to later (and after a reconnect); kept
    /// only when some upstream is not the embedded one, which never needs it again.
    info: Option<Box<OpenInfo>>,
    /// Our close went to its backends already (a fence); `Closed` sends no second one.
    close_sent: bool,
    /// (upstream, index into `Router::links`) pairs this connection was opened on.
    bound: Vec<(UpstreamId, usize)>,
    /// The `nats://` upstreams this connection was opened on.
    nats: Vec<UpstreamId>,
}

impl Binding {
    /// Bytes charged to the relay's gauge for it.
    fn held_bytes(&self) -> usize {
        ENTRY_OVERHEAD + self.info.as_ref().map_or(0, |i| i.held_bytes())
    }
}

pub struct Router<S: EdgeSink + 'static> {
    sink: S,
    upstreams: Vec<UpstreamRt>,
    /// Every backend link of every upstream; a link's index is its poll token.
    links: Vec<Link>,
    conns: ConnTable<Binding>,
    /// Some upstream has backends or is `nats://`: bindings keep each connection's `open`.
    keeps_open_info: bool,
    chat: ChatEcho,
    described: Vec<super::UpstreamLink>,
    gauges: Arc<RelayGauges>,
    heartbeat: Arc<crate::telemetry::Heartbeat>,
    /// The cluster bus, with `[cluster]` (src/relay/cluster/).
    cluster: Option<super::cluster::ClusterRelay>,
}

impl<S: EdgeSink + 'static> Router<S> {
    /// One link per backend of every upstream that has them; they connect once [`Router::run`]
    /// turns. `client_tls[u]` is what upstream `u`'s `tls://` backends connect with.
    pub fn new(
        table: &RouteTable,
        sink: S,
        max_frame: usize,
        gauges: Arc<RelayGauges>,
        client_tls: &[Option<Arc<ClientConfig>>],
    ) -> Router<S> {
        let now = Instant::now();
        let mut upstreams = Vec::new();
        let mut links = Vec::new();
        let mut described = Vec::new();
        for spec in table.upstreams() {
            let mut mine = Vec::new();
            for backend in &spec.backends {
                let mut tls = None;
                let addr = match backend {
                    Backend::Embedded | Backend::Nats(_) => continue,
                    Backend::Tcp(a) => Address::Tcp(a.clone()),
                    Backend::Tls { addr, name } => {
                        let config = client_tls.get(upstreams.len()).cloned().flatten();
                        let name = ServerName::try_from(name.clone()).ok();
                        tls = config
                            .zip(name)
                            .map(|(config, name)| TlsClient { config, name });
                        Address::Tls(addr.clone())
                    }
                    Backend::Unix(p) => Address::Unix(p.clone()),
                };
                let state = Arc::new(LinkState::default());
                described.push(super::UpstreamLink {
                    upstream: spec.name.clone(),
                    backend: addr.to_string(),
                    state: state.clone(),
                });
                mine.push(links.len());
                links.push(Link::new(
                    links.len(),
                    spec.name.clone(),
                    addr,
                    tls,
                    state,
                    max_frame,
                    now,
                ));
            }
            let nats = spec.backends.iter().find_map(|b| match b {
                Backend::Nats(prefix) => Some(Arc::<str>::from(prefix.as_str())),
                _ => None,
            });
            upstreams.push(if let Some(prefix) = nats {
                UpstreamRt::Nats(prefix)
            } else if mine.is_empty() {
                UpstreamRt::Embedded
            } else {
                UpstreamRt::Backends {
                    links: mine,
                    limit: spec.buffer_messages.max(1),
                    balance: spec.balance,
                    next: 0,
                }
            });
        }
        let keeps_open_info = upstreams.iter().any(|u| !matches!(u, UpstreamRt::Embedded));
        Router {
            sink,
            upstreams,
            links,
            conns: ConnTable::default(),
            keeps_open_info,
            // The embedded chat answers a join past this with an error; the core holds the
            // subscriptions themselves to each route's own max_subscriptions.
            chat: ChatEcho::with_limits(
                table
                    .routes()
                    .iter()
                    .map(|r| r.max_subscriptions)
                    .max()
                    .unwrap_or(super::embedded::DEFAULT_MAX_ROOMS),
                gauges.clone(),
            ),
            described,
            gauges,
            heartbeat: Arc::default(),
            cluster: None,
        }
    }

    /// Join the cluster bus: publishes and broadcasts also go to the other nodes, replies
    /// for their connections go to them, and what they send is delivered here.
    pub fn with_cluster(mut self, cluster: super::cluster::ClusterRelay) -> Router<S> {
        self.cluster = Some(cluster);
        self
    }

    /// Every backend link, for metrics and readiness.
    pub fn links(&self) -> Vec<super::UpstreamLink> {
        self.described.clone()
    }

    /// The relay loop's heartbeat (one beat per turn, at least every `health::RELAY_TURN`).
    pub fn heartbeat(&self) -> Arc<crate::telemetry::Heartbeat> {
        self.heartbeat.clone()
    }

    /// The relay's event loop: serve until every core has dropped its sender, then give the
    /// links [`LINK_FLUSH`] to write what they hold, and end.
    ///
    /// Each turn takes up to [`BATCH`] messages from the cores and encodes them into their
    /// links' out buffers, lets every link read its socket (records straight into the cores'
    /// inboxes) and run its timers, writes each link's out buffer once, and wakes the cores
    /// it gave something. Then it parks in `epoll_wait` until a socket is ready, a core
    /// rings (only when the loop is asleep, see `inlet`), a timer is due or
    /// `health::RELAY_TURN` has passed.
    pub fn run(mut self, mut rx: RelayRx) {
        let mut events = Events::with_capacity(256);
        let mut scratch = vec![0u8; SCRATCH];
        let waker = rx.waker();
        let mut closing: Option<Instant> = None;
        loop {
            self.heartbeat.beat();
            crate::test_hooks::on_loop_turn(crate::test_hooks::Loop::Relay);
            let mut more = false;
            if closing.is_none() {
                for n in 0.. {
                    if n == BATCH {
                        more = true;
                        break;
                    }
                    match rx.try_recv() {
                        Ok(msg) => self.handle(msg),
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => {
                            closing = Some(Instant::now() + LINK_FLUSH);
                            break;
                        }
                    }
                }
            }
            more |= self.take_from_cluster();
            let now = Instant::now();
            let registry = rx.poll.registry();
            let mut next = now + crate::telemetry::RELAY_TURN;
            for link in &mut self.links {
                let mut cx = Ctx {
                    registry,
                    sink: &mut self.sink,
                    gauges: &self.gauges,
                    waker: &waker,
                    scratch: &mut scratch,
                    now,
                    cluster: self.cluster.as_ref().map(|c| &c.bus),
                };
                link.turn(&mut cx);
                if let Err(e) = link.flush(now, &self.gauges) {
                    link.write_failed(e, registry, now);
                }
                more |= link.busy();
                if let Some(t) = link.next_deadline() {
                    next = next.min(t);
                }
            }
            self.sink.flush();
            if let Some(until) = closing {
                // Done when every link wrote what it holds, or has no backend to write to.
                let pending = self
                    .links
                    .iter()
                    .filter(|l| l.has_unsent() && !l.is_down())
                    .count();
                if pending == 0 || now >= until {
                    if pending > 0 {
                        tracing::warn!(
                            links = pending,
                            "backend links still blocked at shutdown; exiting without them"
                        );
                    }
                    break;
                }
                next = next.min(until);
            }
            let timeout = if more {
                Duration::ZERO
            } else {
                next.saturating_duration_since(Instant::now())
            };
            let timeout = if timeout.is_zero() || closing.is_some() || rx.may_sleep() {
                timeout
            } else {
                Duration::ZERO
            };
            let polled = rx.poll.poll(&mut events, Some(timeout));
            rx.awake();
            if let Err(e) = polled {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    tracing::error!("relay event loop: poll failed: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            for event in events.iter() {
                if event.token() == WAKE {
                    continue;
                }
                if let Some(link) = self.links.get_mut(event.token().0) {
                    link.on_event(
                        event.is_readable() || event.is_read_closed() || event.is_error(),
                        event.is_writable() || event.is_write_closed() || event.is_error(),
                    );
                }
            }
        }
        let registry = rx.poll.registry();
        for link in &mut self.links {
            link.close(registry, &self.gauges);
        }
    }

    /// What other nodes sent (up to [`BATCH`] messages): publishes and broadcasts to every
    /// core, operations on this node's connections to their core, or `gone` back to the
    /// node that asked when the connection is not open here. True when more may wait.
    fn take_from_cluster(&mut self) -> bool {
        use super::cluster::In;
        let Some(cluster) = &self.cluster else {
            return false;
        };
        for _ in 0..BATCH {
            let Ok(msg) = cluster.incoming.try_recv() else {
                return false;
            };
            match msg {
                In::Fanout(m) => self.sink.send_now(m),
                In::Emit(m) => {
                    cluster.bus.fan_out(&m);
                    self.sink.send_now(m);
                }
                In::ForConn { msg, reply } => {
                    let conn = msg.conn().unwrap_or(ConnId::from_u64(0));
                    if self.conns.contains(conn) {
                        self.sink.send_now(msg);
                    } else if let Some(to) = reply {
                        cluster.bus.gone(to, conn.as_u64());
                    }
                }
                In::Gone { conn, link } => {
                    if let Some(l) = self.links.get_mut(link as usize) {
                        l.push_gone(conn);
                    }
                }
            }
        }
        true
    }

    fn is_embedded(&self, upstream: UpstreamId) -> bool {
        matches!(
            self.upstreams.get(usize::from(upstream)),
            None | Some(UpstreamRt::Embedded)
        )
    }

    fn handle(&mut self, msg: ToUpstream) {
        match msg {
            ToUpstream::Open {
                conn,
                upstream,
                info,
            } => {
                let binding = Binding {
                    info: self.keeps_open_info.then(|| info.clone()),
                    close_sent: false,
                    bound: Vec::new(),
                    nats: Vec::new(),
                };
                self.gauges.charge(binding.held_bytes());
                if let Some(old) = self.conns.insert(conn, binding) {
                    self.gauges.release(old.held_bytes());
                }
                if self.is_embedded(upstream) && info.authorize {
                    // The embedded upstream's authorization rule, as the example backends:
                    // a non-empty `token` query parameter (docs/relay-protocol.md).
                    let token = info
                        .query
                        .as_deref()
                        .unwrap_or("")
                        .split('&')
                        .any(|p| p.strip_prefix("token=").is_some_and(|v| !v.is_empty()));
                    self.sink.send(if token {
                        ToEdge::Accept { conn }
                    } else {
                        ToEdge::Reject {
                            conn,
                            status: 401,
                            reason: "token required".into(),
                        }
                    });
                }
                if self.is_embedded(upstream) {
                    let (sink, bus) = (&mut self.sink, self.cluster.as_ref().map(|c| &c.bus));
                    self.chat.handle(
                        ToUpstream::Open {
                            conn,
                            upstream,
                            info,
                        },
                        &mut |m| emit(sink, bus, m),
                    );
                } else if !self.open_nats(conn, upstream) {
                    self.bind(conn, upstream);
                }
            }
            ToUpstream::Message {
                conn,
                upstream,
                kind,
                payload,
                guard,
            } => {
                if self.is_embedded(upstream) {
                    let (sink, bus) = (&mut self.sink, self.cluster.as_ref().map(|c| &c.bus));
                    self.chat.handle(
                        ToUpstream::Message {
                            conn,
                            upstream,
                            kind,
                            payload,
                            guard,
                        },
                        &mut |m| emit(sink, bus, m),
                    );
                    return;
                }
                if self.open_nats(conn, upstream) {
                    if let (Some(c), Some(UpstreamRt::Nats(prefix))) =
                        (&self.cluster, self.upstreams.get(usize::from(upstream)))
                    {
                        let event = super::cluster::BackendEvent::Message { kind, payload };
                        c.bus.to_backend(prefix, conn, event);
                        self.gauges.forwarded.fetch_add(1, Ordering::Relaxed);
                    }
                    drop(guard);
                    return;
                }
                let Some(link) = self.bind(conn, upstream) else {
                    return;
                };
                let limit = match &self.upstreams[usize::from(upstream)] {
                    UpstreamRt::Backends { limit, .. } => *limit,
                    UpstreamRt::Embedded | UpstreamRt::Nats(_) => return,
                };
                // The payload is encoded into the link's buffer here: the guard (the core's
                // in-flight charge) ends with this message.
                match self.links[link].push_message(
                    conn.as_u64(),
                    kind,
                    payload,
                    limit,
                    &self.gauges,
                ) {
                    Ok(()) => {
                        let n = self.gauges.forwarded.load(Ordering::Relaxed);
                        self.gauges.forwarded.store(n + 1, Ordering::Relaxed);
                    }
                    Err(full) => self.refuse(conn, full.queued, full.bytes),
                }
                drop(guard);
            }
            ToUpstream::Fence { conn, code, reason } => {
                let bound = self.conns.get_mut(conn).map(|b| {
                    b.close_sent = true;
                    (b.bound.clone(), std::mem::take(&mut b.nats))
                });
                // NATS backends are told, but not waited for: at most once, their answer
                // may never come.
                let bound = bound.map(|(bound, nats)| {
                    self.close_nats(conn, code, &nats);
                    bound
                });
                match bound {
                    // The backends answer our close after their last send for it; their
                    // answer is the fence (docs/relay-protocol.md, "Closing").
                    Some(bound) if !bound.is_empty() => {
                        for (_, link) in bound {
                            self.links[link].push_close(conn.as_u64(), code, &self.gauges);
                        }
                    }
                    // Embedded: replies this thread produced are queued already.
                    _ => self.sink.send(ToEdge::Close { conn, code, reason }),
                }
            }
            ToUpstream::Interest { topic, on } => {
                if let Some(c) = &mut self.cluster {
                    c.interest(topic, on);
                }
            }
            ToUpstream::Closed { conn, code } => {
                if let Some(binding) = self.conns.remove(conn) {
                    self.gauges.release(binding.held_bytes());
                    if binding.close_sent {
                        // Each side sends exactly one close per connection.
                    } else {
                        self.close_nats(conn, code, &binding.nats);
                        for (_, link) in binding.bound {
                            self.links[link].push_close(conn.as_u64(), code, &self.gauges);
                        }
                    }
                }
                let (sink, bus) = (&mut self.sink, self.cluster.as_ref().map(|c| &c.bus));
                self.chat
                    .handle(ToUpstream::Closed { conn, code }, &mut |m| {
                        emit(sink, bus, m)
                    });
            }
        }
    }

    /// Whether `upstream` is a `nats://` one; if so, `conn` is opened on it first if need be
    /// (an `open` to its queue group).
    fn open_nats(&mut self, conn: ConnId, upstream: UpstreamId) -> bool {
        let Some(UpstreamRt::Nats(prefix)) = self.upstreams.get(usize::from(upstream)) else {
            return false;
        };
        let Some(binding) = self.conns.get_mut(conn) else {
            return true;
        };
        if !binding.nats.contains(&upstream) {
            binding.nats.push(upstream);
            if let (Some(c), Some(info)) = (&self.cluster, &binding.info) {
                let event = super::cluster::BackendEvent::Open(info.clone());
                c.bus.to_backend(prefix, conn, event);
            }
        }
        true
    }

    /// Tell the `nats://` upstreams `conn` was opened on that it is closing.
    fn close_nats(&self, conn: ConnId, code: u16, nats: &[UpstreamId]) {
        let Some(c) = &self.cluster else { return };
        for &u in nats {
            if let Some(UpstreamRt::Nats(prefix)) = self.upstreams.get(usize::from(u)) {
                c.bus
                    .to_backend(prefix, conn, super::cluster::BackendEvent::Close { code });
            }
        }
    }

    /// A message its backend's buffer cannot take: the client is closed 1013.
    fn refuse(&mut self, conn: ConnId, queued: usize, bytes: usize) {
        self.gauges.buffer_refused.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(conn = %conn, queued, bytes, "upstream buffer full; closing the client 1013");
        self.sink.send(ToEdge::Close {
            conn,
            code: close::TRY_AGAIN_LATER,
            reason: "upstream unavailable".into(),
        });
        // Tell the core now, not after the batch: it must stop feeding us.
        self.sink.flush();
    }

    /// The link `conn` uses for `upstream`, opening it there first if needed.
    fn bind(&mut self, conn: ConnId, upstream: UpstreamId) -> Option<usize> {
        let binding = self.conns.get(conn)?;
        if let Some(&(_, link)) = binding.bound.iter().find(|(u, _)| *u == upstream) {
            return Some(link);
        }
        let UpstreamRt::Backends {
            links,
            balance,
            next,
            ..
        } = &mut self.upstreams[usize::from(upstream)]
        else {
            return None;
        };
        let n = links.len();
        let link = match balance {
            Balance::Hash => links[(mix(conn.as_u64()) % n as u64) as usize],
            Balance::RoundRobin => {
                // The next live backend in turn; any backend when none is live (the message
                // then waits in that backend's buffer for it to come back).
                let start = *next;
                let live = (0..n)
                    .map(|i| (start + i) % n)
                    .find(|&i| self.links[links[i]].is_live());
                let chosen = live.unwrap_or(start % n);
                *next = (chosen + 1) % n;
                links[chosen]
            }
        };
        // Kept for every connection whenever an upstream has backends, as this one does.
        let info = binding.info.as_deref()?.clone();
        self.links[link].push_open(conn.as_u64(), info, &self.gauges);
        if let Some(b) = self.conns.get_mut(conn) {
            b.bound.push((upstream, link));
        }
        Some(link)
    }
}

/// A reply of the embedded upstream: to the cores, and a publish or broadcast to the other
/// nodes of the cluster too.
fn emit<S: EdgeSink>(sink: &mut S, bus: Option<&super::cluster::ClusterBus>, m: ToEdge) {
    if let Some(bus) = bus {
        bus.fan_out(&m);
    }
    sink.send(m);
}

/// A cheap integer hash so sequential connection ids spread over backends.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51afd7ed558ccd);
    x ^= x >> 33;
    x
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Topic;
    use crate::protocol::message::MessageKind;
    use bytes::Bytes;

    #[test]
    fn backend_records_become_edge_messages() {
        let e = to_edge(Record::Publish {
            topic: Topic::from("room:a"),
            kind: MessageKind::Text,
            payload: Bytes::from_static(b"x"),
        });
        assert!(
            matches!(e, Some(ToEdge::Publish { ref topic, .. }) if &**topic == "room:a"),
            "{e:?}"
        );
        let e = to_edge(Record::Send {
            conn: 42,
            kind: MessageKind::Binary,
            payload: Bytes::new(),
        })
        .unwrap();
        assert_eq!(e.conn(), Some(ConnId::from_u64(42)));
        assert!(to_edge(Record::Ping(1)).is_none());
        assert!(to_edge(Record::Gone { conn: 1 }).is_none());
    }
}
