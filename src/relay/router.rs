//! The relay thread: takes every core's [`ToUpstream`] messages, sticks each client
//! connection to one backend of each upstream it talks to, and queues encoded frames on that
//! backend's link. Embedded upstreams are answered right here.
//!
//! Nothing is dropped silently: a message that cannot be queued for its backend (the link is
//! down and its buffer full, or the backend stopped reading for too long) closes its sender
//! with 1013 "try again later".

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use crossbeam_channel::{Receiver, Sender};

use super::embedded::ChatEcho;
use super::link::{Address, Link, LinkState, Outbound};
use super::wire::{self, Frame};
use super::{EdgeSink, OpenInfo, RelayGauges, ToEdge, ToUpstream, UpstreamId, ENTRY_OVERHEAD};
use crate::config::Balance;
use crate::ids::ConnId;
use crate::protocol::close;
use crate::route::{Backend, RouteTable};

/// Bytes of messages that may wait for one backend link, whatever their count.
pub const LINK_BUFFER_BYTES: usize = 16 * 1024 * 1024;

/// At shutdown, how long the links get to write what they hold once the cores are gone,
/// and then how long they get to notice `stop`; a link still busy after both (a write or
/// connect the OS has not returned from) is left behind, so the process exits in time.
const LINK_FLUSH: Duration = Duration::from_millis(300);
const LINK_STOP: Duration = Duration::from_millis(300);

struct LinkHandle {
    tx: Sender<Outbound>,
    state: Arc<LinkState>,
    /// Messages that may wait in the queue (`buffer_messages`).
    limit: usize,
}

enum UpstreamRt {
    Embedded,
    Backends {
        links: Vec<LinkHandle>,
        balance: Balance,
        next: usize,
    },
}

struct Binding {
    info: Box<OpenInfo>,
    /// Our close went to its backends already (a fence); `Closed` sends no second one.
    close_sent: bool,
    /// (upstream, link index) pairs this connection was opened on.
    bound: Vec<(UpstreamId, usize)>,
}

/// Counters of the relay thread.
#[derive(Debug, Default, Clone)]
pub struct RelayStats {
    pub forwarded: u64,
    /// Senders closed 1013 because their upstream could not take the message.
    pub refused: u64,
}

pub struct Router<S: EdgeSink + Clone + 'static> {
    sink: S,
    upstreams: Vec<UpstreamRt>,
    conns: HashMap<ConnId, Binding>,
    chat: ChatEcho,
    threads: Vec<JoinHandle<()>>,
    links: Vec<super::UpstreamLink>,
    stop: Arc<AtomicBool>,
    scratch: BytesMut,
    gauges: Arc<RelayGauges>,
    pub stats: RelayStats,
    heartbeat: Arc<crate::telemetry::Heartbeat>,
}

impl<S: EdgeSink + Clone + Send + 'static> Router<S> {
    /// Start one link (two threads) per backend of every upstream that has them.
    pub fn new(
        table: &RouteTable,
        sink: S,
        max_frame: usize,
        gauges: Arc<RelayGauges>,
    ) -> Router<S> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let mut upstreams = Vec::new();
        let mut described = Vec::new();
        for spec in table.upstreams() {
            let mut links = Vec::new();
            for backend in &spec.backends {
                let addr = match backend {
                    Backend::Embedded => continue,
                    Backend::Tcp(a) => Address::Tcp(a.clone()),
                    Backend::Unix(p) => Address::Unix(p.clone()),
                };
                // Unbounded channel, bounded by the counters in LinkState: opens and closes
                // must never be refused, messages are limited in count and bytes.
                let (tx, rx) = crossbeam_channel::unbounded();
                let state = Arc::new(LinkState::default());
                let link = Link {
                    name: spec.name.clone(),
                    addr,
                    queue: rx,
                    state: state.clone(),
                    sink: sink.clone(),
                    max_frame,
                    stop: stop.clone(),
                    index: threads.len(),
                    gauges: gauges.clone(),
                };
                let handle = std::thread::Builder::new()
                    .name(format!("ringway-up-{}", spec.name))
                    .spawn(move || link.run())
                    .expect("spawning a backend link thread");
                threads.push(handle);
                described.push(super::UpstreamLink {
                    upstream: spec.name.clone(),
                    backend: match backend {
                        Backend::Tcp(a) => format!("tcp://{a}"),
                        Backend::Unix(p) => format!("unix:{}", p.display()),
                        Backend::Embedded => "echo".into(),
                    },
                    state: state.clone(),
                });
                links.push(LinkHandle {
                    tx,
                    state,
                    limit: spec.buffer_messages.max(1),
                });
            }
            upstreams.push(if links.is_empty() {
                UpstreamRt::Embedded
            } else {
                UpstreamRt::Backends {
                    links,
                    balance: spec.balance,
                    next: 0,
                }
            });
        }
        Router {
            sink,
            upstreams,
            conns: HashMap::new(),
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
            threads,
            links: described,
            stop,
            scratch: BytesMut::new(),
            gauges,
            stats: RelayStats::default(),
            heartbeat: Arc::default(),
        }
    }

    /// Every backend link, for metrics and readiness.
    pub fn links(&self) -> Vec<super::UpstreamLink> {
        self.links.clone()
    }

    /// The relay loop's heartbeat (one beat per turn, at least every `health::RELAY_TURN`).
    pub fn heartbeat(&self) -> Arc<crate::telemetry::Heartbeat> {
        self.heartbeat.clone()
    }

    /// Serve until every core has dropped its sender; then let the links flush and stop.
    pub fn run(mut self, rx: Receiver<ToUpstream>) -> RelayStats {
        loop {
            // A bounded wait, so the relay turns (and its heartbeat beats) even when idle.
            self.heartbeat.beat();
            crate::test_hooks::on_loop_turn(crate::test_hooks::Loop::Relay);
            let first = match rx.recv_timeout(crate::telemetry::RELAY_TURN) {
                Ok(m) => m,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            };
            let mut next = Some(first);
            let mut batch = 0;
            while let Some(msg) = next {
                self.handle(msg);
                batch += 1;
                next = if batch < 1024 {
                    rx.try_recv().ok()
                } else {
                    None
                };
            }
            self.sink.flush();
        }
        self.stop_links();
        self.stats
    }

    /// Dropping the senders lets each link write what it holds and end; `stop` then ends
    /// links that are connecting, backing off or blocked on a backend that does not read.
    /// Bounded: the process must exit within the shutdown grace plus one second.
    fn stop_links(&mut self) {
        self.upstreams.clear();
        let threads = std::mem::take(&mut self.threads);
        let flushed = Instant::now() + LINK_FLUSH;
        while Instant::now() < flushed && !threads.iter().all(JoinHandle::is_finished) {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.stop.store(true, Ordering::Release);
        let stopped = Instant::now() + LINK_STOP;
        while Instant::now() < stopped && !threads.iter().all(JoinHandle::is_finished) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut left = 0;
        for t in threads {
            if t.is_finished() {
                let _ = t.join();
            } else {
                left += 1;
            }
        }
        if left > 0 {
            tracing::warn!(
                links = left,
                "backend links still blocked at shutdown; exiting without them"
            );
        }
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
                self.gauges.charge(info.held_bytes() + ENTRY_OVERHEAD);
                if let Some(old) = self.conns.insert(
                    conn,
                    Binding {
                        info: info.clone(),
                        close_sent: false,
                        bound: Vec::new(),
                    },
                ) {
                    self.gauges.release(old.info.held_bytes() + ENTRY_OVERHEAD);
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
                    let sink = &mut self.sink;
                    self.chat.handle(
                        ToUpstream::Open {
                            conn,
                            upstream,
                            info,
                        },
                        &mut |m| sink.send(m),
                    );
                } else {
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
                    let sink = &mut self.sink;
                    self.chat.handle(
                        ToUpstream::Message {
                            conn,
                            upstream,
                            kind,
                            payload,
                            guard,
                        },
                        &mut |m| sink.send(m),
                    );
                    return;
                }
                let Some(link) = self.bind(conn, upstream) else {
                    return;
                };
                let mut out = std::mem::take(&mut self.scratch);
                wire::encode(
                    &Frame::Message {
                        conn: conn.as_u64(),
                        kind,
                        payload,
                    },
                    &mut out,
                );
                let frame = out.split().freeze();
                self.scratch = out;
                if self.push(conn, upstream, link, Outbound::Frame(frame)) {
                    self.stats.forwarded += 1;
                }
            }
            ToUpstream::Fence { conn, code, reason } => {
                let bound = self.conns.get_mut(&conn).map(|b| {
                    b.close_sent = true;
                    b.bound.clone()
                });
                match bound {
                    // The backends answer our close after their last send for it; their
                    // answer is the fence (docs/relay-protocol.md, "Closing").
                    Some(bound) if !bound.is_empty() => {
                        for (upstream, link) in bound {
                            self.send_close(conn, upstream, link, code);
                        }
                    }
                    // Embedded: replies this thread produced are queued already.
                    _ => self.sink.send(ToEdge::Close { conn, code, reason }),
                }
            }
            ToUpstream::Closed { conn, code } => {
                if let Some(binding) = self.conns.remove(&conn) {
                    self.gauges
                        .release(binding.info.held_bytes() + ENTRY_OVERHEAD);
                    if binding.close_sent {
                        // Each side sends exactly one close per connection.
                    } else {
                        for (upstream, link) in binding.bound {
                            self.send_close(conn, upstream, link, code);
                        }
                    }
                }
                let sink = &mut self.sink;
                self.chat
                    .handle(ToUpstream::Closed { conn, code }, &mut |m| sink.send(m));
            }
        }
    }

    fn send_close(&mut self, conn: ConnId, upstream: UpstreamId, link: usize, code: u16) {
        let mut out = BytesMut::new();
        wire::encode(
            &Frame::Close {
                conn: conn.as_u64(),
                code,
                reason: String::new(),
            },
            &mut out,
        );
        self.push(
            conn,
            upstream,
            link,
            Outbound::Close {
                conn: conn.as_u64(),
                frame: out.freeze(),
            },
        );
    }

    /// The link `conn` uses for `upstream`, opening it there first if needed.
    fn bind(&mut self, conn: ConnId, upstream: UpstreamId) -> Option<usize> {
        let binding = self.conns.get(&conn)?;
        if let Some(&(_, link)) = binding.bound.iter().find(|(u, _)| *u == upstream) {
            return Some(link);
        }
        let UpstreamRt::Backends {
            links,
            balance,
            next,
        } = &mut self.upstreams[usize::from(upstream)]
        else {
            return None;
        };
        let n = links.len();
        let link = match balance {
            Balance::Hash => (mix(conn.as_u64()) % n as u64) as usize,
            Balance::RoundRobin => {
                // The next live backend in turn; any backend when none is live (the message
                // then waits in that backend's buffer for it to come back).
                let start = *next;
                let live = (0..n)
                    .map(|i| (start + i) % n)
                    .find(|&i| links[i].state.live.load(Ordering::Acquire));
                let chosen = live.unwrap_or(start % n);
                *next = (chosen + 1) % n;
                chosen
            }
        };
        let info = binding.info.clone();
        if !self.push(
            conn,
            upstream,
            link,
            Outbound::Open {
                conn: conn.as_u64(),
                info,
            },
        ) {
            return None;
        }
        if let Some(b) = self.conns.get_mut(&conn) {
            b.bound.push((upstream, link));
        }
        Some(link)
    }

    /// Queue `item` on a link; false (and the client told 1013) when it cannot take it.
    /// Never blocks: a backend that is down or not reading must not stall other routes.
    fn push(&mut self, conn: ConnId, upstream: UpstreamId, link: usize, item: Outbound) -> bool {
        let UpstreamRt::Backends { links, .. } = &self.upstreams[usize::from(upstream)] else {
            return false;
        };
        let handle = &links[link];
        if let Outbound::Frame(frame) = &item {
            let queued = handle.state.queued.load(Ordering::Relaxed);
            let bytes = handle.state.queued_bytes.load(Ordering::Relaxed);
            if queued >= handle.limit || bytes.saturating_add(frame.len()) > LINK_BUFFER_BYTES {
                self.stats.refused += 1;
                tracing::debug!(conn = %conn, queued, bytes, "upstream buffer full; closing the client 1013");
                self.sink.send(ToEdge::Close {
                    conn,
                    code: close::TRY_AGAIN_LATER,
                    reason: "upstream unavailable".into(),
                });
                // Tell the core now, not after the batch: it must stop feeding us.
                self.sink.flush();
                return false;
            }
            handle.state.queued.fetch_add(1, Ordering::Relaxed);
            handle
                .state
                .queued_bytes
                .fetch_add(frame.len(), Ordering::Relaxed);
            self.gauges.charge(frame.len() + ENTRY_OVERHEAD);
        }
        // The link's receiver lives as long as this router.
        let _ = handle.tx.send(item);
        true
    }
}

/// A cheap integer hash so sequential connection ids spread over backends.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51afd7ed558ccd);
    x ^= x >> 33;
    x
}
