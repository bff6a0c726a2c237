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
use std::time::Duration;

use bytes::BytesMut;
use crossbeam_channel::{Receiver, SendTimeoutError, Sender, TrySendError};

use super::chat::ChatEcho;
use super::link::{Address, Link, LinkState, Outbound};
use super::protocol::{self, Frame};
use super::{EdgeSink, OpenInfo, ToEdge, ToUpstream, UpstreamId};
use crate::config::Balance;
use crate::edge::ConnId;
use crate::protocol::close;
use crate::route::{Backend, RouteTable};

/// How long a message may wait for a live backend that is not reading before its sender is
/// closed 1013. Meanwhile the cores' channel fills and they stop reading their clients.
const LIVE_BACKEND_PATIENCE: Duration = Duration::from_secs(2);

struct LinkHandle {
    tx: Sender<Outbound>,
    state: Arc<LinkState>,
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
    stop: Arc<AtomicBool>,
    scratch: BytesMut,
    pub stats: RelayStats,
}

impl<S: EdgeSink + Clone + Send + 'static> Router<S> {
    /// Start one link (two threads) per backend of every upstream that has them.
    pub fn new(table: &RouteTable, sink: S, max_frame: usize) -> Router<S> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let mut upstreams = Vec::new();
        for spec in table.upstreams() {
            let mut links = Vec::new();
            for backend in &spec.backends {
                let addr = match backend {
                    Backend::Embedded => continue,
                    Backend::Tcp(a) => Address::Tcp(a.clone()),
                    Backend::Unix(p) => Address::Unix(p.clone()),
                };
                let (tx, rx) = crossbeam_channel::bounded(spec.buffer_messages.max(1));
                let state = Arc::new(LinkState::default());
                let link = Link {
                    name: spec.name.clone(),
                    addr,
                    queue: rx,
                    state: state.clone(),
                    sink: sink.clone(),
                    max_frame,
                    stop: stop.clone(),
                };
                let handle = std::thread::Builder::new()
                    .name(format!("ringway-up-{}", spec.name))
                    .spawn(move || link.run())
                    .expect("spawning a backend link thread");
                threads.push(handle);
                links.push(LinkHandle { tx, state });
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
            chat: ChatEcho::default(),
            threads,
            stop,
            scratch: BytesMut::new(),
            stats: RelayStats::default(),
        }
    }

    /// Serve until every core has dropped its sender; then let the links flush and stop.
    pub fn run(mut self, rx: Receiver<ToUpstream>) -> RelayStats {
        while let Ok(first) = rx.recv() {
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
        // Dropping the senders lets each link write what it holds and end.
        self.upstreams.clear();
        for t in std::mem::take(&mut self.threads) {
            let _ = t.join();
        }
        self.stop.store(true, Ordering::Release);
        self.stats
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
                self.conns.insert(
                    conn,
                    Binding {
                        info: info.clone(),
                        bound: Vec::new(),
                    },
                );
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
            } => {
                if self.is_embedded(upstream) {
                    let sink = &mut self.sink;
                    self.chat.handle(
                        ToUpstream::Message {
                            conn,
                            upstream,
                            kind,
                            payload,
                        },
                        &mut |m| sink.send(m),
                    );
                    return;
                }
                let Some(link) = self.bind(conn, upstream) else {
                    return;
                };
                let mut out = std::mem::take(&mut self.scratch);
                protocol::encode(
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
                // Replies this thread produced are queued already; hand the close back.
                self.sink.send(ToEdge::Close { conn, code, reason });
            }
            ToUpstream::Closed { conn, code } => {
                if let Some(binding) = self.conns.remove(&conn) {
                    for (upstream, link) in binding.bound {
                        let mut out = BytesMut::new();
                        protocol::encode(
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
                }
                let sink = &mut self.sink;
                self.chat
                    .handle(ToUpstream::Closed { conn, code }, &mut |m| sink.send(m));
            }
        }
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
        let info = &binding.info;
        let mut out = BytesMut::new();
        protocol::encode(
            &Frame::Open {
                conn: conn.as_u64(),
                path: info.path.clone(),
                query: info.query.clone(),
                headers: info.headers.clone(),
                peer: info.peer.map(|p| p.to_string()),
                authorize: info.authorize,
                replay: false,
            },
            &mut out,
        );
        if !self.push(
            conn,
            upstream,
            link,
            Outbound::Open {
                conn: conn.as_u64(),
                frame: out.freeze(),
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
    fn push(&mut self, conn: ConnId, upstream: UpstreamId, link: usize, item: Outbound) -> bool {
        let UpstreamRt::Backends { links, .. } = &self.upstreams[usize::from(upstream)] else {
            return false;
        };
        let handle = &links[link];
        let full = if handle.state.live.load(Ordering::Acquire) {
            // A live backend that is slow to read: wait a little (the cores' channel fills
            // meanwhile and they stop reading their clients), then give up on this client.
            matches!(
                handle.tx.send_timeout(item, LIVE_BACKEND_PATIENCE),
                Err(SendTimeoutError::Timeout(_))
            )
        } else {
            matches!(handle.tx.try_send(item), Err(TrySendError::Full(_)))
        };
        if full {
            self.stats.refused += 1;
            tracing::debug!(conn = %conn, "upstream buffer full; closing the client 1013");
            self.sink.send(ToEdge::Close {
                conn,
                code: close::TRY_AGAIN_LATER,
                reason: "upstream unavailable".into(),
            });
            return false;
        }
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
