//! One core's event loop: accepts on its own listener, receives into its provided-buffer
//! ring, drives the protocol core over the bytes where the kernel put them, sends what
//! connections queued, and answers the relay's replies from its inbox.
//!
//! This is the driver of each connection's sans-IO `Session`: ring completions in, session
//! calls, ring operations out. Fan-out and reload are in `worker/`.
//!
//! Completions are matched by `user_data = op (8 bits) | generation (24 bits) | slot (32 bits)`.

use std::collections::VecDeque;
use std::io;
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::TrySendError;
use io_uring::{cqueue, opcode, squeue, types, IoUring};

use crate::admission::AcceptRefusal;
use crate::config::Config;
use crate::policy::rate::PerIpLimiter;
use crate::relay::{RelayTx, ToEdge, ToUpstream, Topic};
use crate::route::RouteTable;
use crate::session::{Context, Count, Meter, Output, Session, Shutdown, Subscribed};
use std::collections::HashMap;

use super::connection::{Conn, HeldInput, InFlight};
use super::fd::Socket;
use super::inbox::Waker;
use super::panic;
use super::stats::{CoreMeter, CoreStats, RouteTraffic, IN, OUT};
use super::timer::{self, TimerWheel};
use super::uring::{self, BufferRing};
use super::Shared;
use crate::ids::{self, ConnId, GENERATION_MASK};
use crate::slab::Slab;

const OP_ACCEPT: u64 = 1;
const OP_RECV: u64 = 2;
const OP_SEND: u64 = 3;
const OP_TICK: u64 = 4;
const OP_WAKE: u64 = 5;
const OP_CANCEL: u64 = 6;
const OP_ACCEPT_TLS: u64 = 7;

mod access;
mod backpressure;
mod drain;
mod fanout;
mod held;
mod reload;

const TICK_MS: u64 = 50;
/// Bytes of one core's client messages that may be in flight to the relay (its backlog, the
/// channel and the relay thread) before its connections stop being read.
const CORE_RELAY_IN_FLIGHT: usize = 16 << 20;
/// What one relayed message costs besides its payload: the `ToUpstream` and its guard.
const RELAY_ENTRY_BYTES: usize = 128;

/// The operation kind in a completion's `user_data`, beside the connection's slot and
/// generation (the same fields, and so the same packing, as its `ConnId`).
const OP: ids::Field = ids::Field::new(56, 8);

fn user_data(op: u64, slot: u32, generation: u32) -> u64 {
    OP.put(op) | ids::GENERATION.put(u64::from(generation)) | ids::SLOT.put(u64::from(slot))
}

fn split_user_data(ud: u64) -> (u64, u32, u32) {
    (
        OP.get(ud),
        ids::SLOT.get(ud) as u32,
        ids::GENERATION.get(ud) as u32,
    )
}

/// Everything a worker thread needs, prepared by the thread that starts the gateway.
pub struct WorkerSetup {
    pub index: usize,
    pub workers: usize,
    pub stats: Arc<CoreStats>,
    pub routes: Arc<RouteTable>,
    pub cpu: Option<core_affinity::CoreId>,
    pub listener: TcpListener,
    /// The wss:// listener and what its connections' TLS is built from.
    pub tls_listener: Option<TcpListener>,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub config: Arc<Config>,
    pub relay: Option<RelayTx>,
    pub inbox: super::inbox::Inbox,
    pub waker: Arc<Waker>,
    pub shared: Arc<Shared>,
}

struct Slot {
    generation: u32,
    conn: Option<Conn>,
}

pub struct Worker {
    index: usize,
    core: CoreState,
    // Field order matters for Drop: the buffer ring is unregistered (explicitly, in `run`)
    // and unmapped before the io_uring goes.
    buffers: BufferRing,
    ring: IoUring,
    listener: Option<TcpListener>,
    tls_listener: Option<TcpListener>,
    slots: Slab<Slot>,
    free: Vec<u32>,
    live: usize,
    wheel: TimerWheel,
    due: Vec<timer::Entry>,
    pending_sqes: Vec<squeue::Entry>,
    cqes: Vec<(u64, i32, u32)>,
    inbox: super::inbox::Inbox,
    waker: Arc<Waker>,
    wake_buf: Box<u64>,
    tick: Box<types::Timespec>,
    // Boxed on purpose: the kernel holds the iovecs' addresses until the send completes.
    #[allow(clippy::vec_box)]
    /// The memory of each connection's in-flight `sendmsg` (iovecs and the `Bytes` they
    /// point into), held until its completion.
    sends: uring::Sends,
    dirty: Vec<u32>,
    /// Connections paused for inbound backpressure.
    paused: Vec<(u32, u32)>,
    /// Topic -> slots of this core's subscribers.
    topics: HashMap<Topic, Vec<u32>>,
    /// The cluster node id in this core's connection ids (0 without `[cluster]`), and
    /// whether the relay wants to hear when a topic gets its first or loses its last local
    /// subscriber here (`ToUpstream::Interest`, with `[cluster]` only).
    node: u8,
    cluster: bool,
    recv_rearm: Vec<u32>,
    accept_armed: bool,
    tls_accept_armed: bool,
    accept_retry: bool,
    start: Instant,
    draining: Option<u64>,
    reload_generation: u64,
    last_sweep_ms: u64,
}

/// Build the ring with the cheapest completion model the kernel offers.
fn build_ring() -> io::Result<IoUring> {
    let attempts: [fn(&mut io_uring::Builder); 3] = [
        |b| {
            b.setup_single_issuer()
                .setup_defer_taskrun()
                .setup_coop_taskrun();
        },
        |b| {
            b.setup_coop_taskrun();
        },
        |_| {},
    ];
    let mut last = None;
    for configure in attempts {
        let mut builder = IoUring::builder();
        builder.setup_cqsize(16384);
        configure(&mut builder);
        match builder.build(4096) {
            Ok(ring) => return Ok(ring),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("io_uring setup failed")))
}

/// On every way out of a core's loop (its end, an error, a panic unwinding through `run`):
/// cancel and reap every ring operation still in flight, then take the provided buffers back
/// from the kernel, before the fields (the slab, the send buffers, the buffer ring, the tick
/// and wake buffers) are freed.
impl Drop for Worker {
    fn drop(&mut self) {
        let reaped = uring::quiesce(
            &mut self.ring,
            &mut self.pending_sqes,
            std::time::Duration::from_secs(1),
            |_| {},
        );
        tracing::debug!(core = self.index, reaped, "ring quiesced");
        if let Err(e) = self.buffers.unregister(&self.ring) {
            tracing::warn!(
                core = self.index,
                "could not unregister the buffer ring: {e}"
            );
        }
    }
}

impl Worker {
    pub fn new(setup: WorkerSetup) -> io::Result<Worker> {
        if let Some(cpu) = setup.cpu {
            core_affinity::set_for_current(cpu);
        }
        let ring = build_ring()?;
        let buffers = BufferRing::new(
            &ring,
            setup.config.read_buffers,
            setup.config.read_buffer_bytes,
        )?;
        let start = Instant::now();
        let node = setup.config.cluster_node().map_or(0, |(_, id)| id);
        let cluster = setup.config.cluster.is_some();
        let route_traffic = RouteTraffic::for_table(&setup.routes);
        Ok(Worker {
            index: setup.index,
            core: CoreState {
                workers: setup.workers,
                ip_limiter: PerIpLimiter::new(setup.config.ip_limits.per_core(setup.workers)),
                config: setup.config,
                routes: setup.routes,
                scratch: Vec::new(),
                codec: Default::default(),
                outputs: Vec::new(),
                shared: setup.shared,
                relay: setup.relay,
                relay_backlog: VecDeque::new(),
                relay_in_flight: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
                meter: CoreMeter {
                    stats: setup.stats,
                    routes: route_traffic,
                },
                now_ms: 0,
                unix_ms: unix_now_ms(),
                charged: 0,
                published: 0,
                over_budget: false,
                panic_on: panic_hook_from_env(),
                tls: setup.tls,
            },
            buffers,
            ring,
            listener: Some(setup.listener),
            tls_listener: setup.tls_listener,
            slots: Slab::default(),
            free: Vec::new(),
            live: 0,
            wheel: TimerWheel::new(0, TICK_MS, 4096),
            due: Vec::new(),
            pending_sqes: Vec::new(),
            cqes: Vec::with_capacity(1024),
            inbox: setup.inbox,
            waker: setup.waker,
            wake_buf: Box::new(0),
            tick: Box::new(types::Timespec::new().nsec((TICK_MS * 1_000_000) as u32)),
            sends: uring::Sends::default(),
            dirty: Vec::new(),
            topics: HashMap::new(),
            node,
            cluster,
            paused: Vec::new(),
            recv_rearm: Vec::new(),
            accept_armed: false,
            tls_accept_armed: false,
            accept_retry: false,
            start,
            draining: None,
            reload_generation: 0,
            last_sweep_ms: 0,
        })
    }

    /// Serve until the gateway drains and every connection is gone.
    pub fn run(mut self) -> io::Result<()> {
        self.arm_accept();
        self.arm_wake();
        self.arm_tick();
        self.event_loop()
        // Drop cancels and reaps what is still in flight before any memory goes.
    }

    fn event_loop(&mut self) -> io::Result<()> {
        loop {
            self.flush_sqes()?;
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => return Err(e),
            }
            self.core.now_ms = self.start.elapsed().as_millis() as u64;
            self.core.unix_ms = unix_now_ms();
            self.cqes.clear();
            self.cqes.extend(
                self.ring
                    .completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
            let cqes = std::mem::take(&mut self.cqes);
            for &(ud, res, flags) in &cqes {
                self.complete(ud, res, flags);
            }
            self.cqes = cqes;
            // Replies posted since the wake-up was read count in their clients' queues
            // before any paused client is judged able to resume.
            self.take_replies();
            self.flush_relay_backlog();
            self.shed_for_budget();
            self.run_timers();
            self.rearm_recvs();
            self.flush_sends();
            self.buffers.publish();
            self.core.publish_memory();
            // Liveness for /healthz, /readyz and the watchdog (src/ops/health.rs).
            self.core.meter.stats.heartbeat.beat();
            crate::test_hooks::on_loop_turn(crate::test_hooks::Loop::Core(self.index));
            self.check_reload();
            if self.draining.is_none() && self.core.shared.draining.load(Ordering::Acquire) {
                self.begin_drain();
            }
            if let Some(deadline) = self.draining {
                if self.live == 0 {
                    return Ok(());
                }
                if self.core.now_ms >= deadline {
                    self.force_close_all();
                }
            }
        }
    }

    // ----- ring plumbing -----

    fn push(&mut self, sqe: squeue::Entry) {
        self.pending_sqes.push(sqe);
    }

    fn flush_sqes(&mut self) -> io::Result<()> {
        uring::submit_all(&mut self.ring, &mut self.pending_sqes)
    }

    /// Arm a multishot accept on each listener that has none.
    fn arm_accept(&mut self) {
        let accept = |l: &TcpListener, op| {
            opcode::AcceptMulti::new(types::Fd(l.as_raw_fd()))
                .flags(libc::SOCK_CLOEXEC)
                .build()
                .user_data(user_data(op, 0, 0))
        };
        if let (Some(l), false) = (&self.listener, self.accept_armed) {
            let sqe = accept(l, OP_ACCEPT);
            self.push(sqe);
            self.accept_armed = true;
        }
        if let (Some(l), false) = (&self.tls_listener, self.tls_accept_armed) {
            let sqe = accept(l, OP_ACCEPT_TLS);
            self.push(sqe);
            self.tls_accept_armed = true;
        }
    }

    fn arm_wake(&mut self) {
        let buf: *mut u64 = &mut *self.wake_buf;
        let sqe = opcode::Read::new(types::Fd(self.waker.raw_fd()), buf.cast(), 8)
            .build()
            .user_data(user_data(OP_WAKE, 0, 0));
        self.push(sqe);
    }

    fn arm_tick(&mut self) {
        let ts: *const types::Timespec = &*self.tick;
        let sqe = opcode::Timeout::new(ts)
            .build()
            .user_data(user_data(OP_TICK, 0, 0));
        self.push(sqe);
    }

    fn arm_recv(&mut self, slot: u32) {
        let generation = self.slots[slot as usize].generation;
        let Some(conn) = self.slots[slot as usize].conn.as_mut() else {
            return;
        };
        if conn.recv_armed || conn.shut || conn.session.peer_closed() || conn.paused {
            return;
        }
        conn.recv_armed = true;
        let sqe = opcode::RecvMulti::new(types::Fd(conn.socket.as_raw_fd()), uring::GROUP)
            .build()
            .user_data(user_data(OP_RECV, slot, generation));
        self.push(sqe);
    }

    fn rearm_recvs(&mut self) {
        let slots = std::mem::take(&mut self.recv_rearm);
        for &slot in &slots {
            self.arm_recv(slot);
        }
        self.recv_rearm = slots;
        self.recv_rearm.clear();
    }

    // ----- completions -----

    fn complete(&mut self, ud: u64, res: i32, flags: u32) {
        let (op, slot, generation) = split_user_data(ud);
        match op {
            OP_ACCEPT => self.on_accept(res, flags, false),
            OP_ACCEPT_TLS => self.on_accept(res, flags, true),
            OP_RECV => self.on_recv(slot, generation, res, flags),
            OP_SEND => self.on_send(slot, generation, res),
            OP_TICK => {
                if self.draining.is_none() || self.live > 0 {
                    self.arm_tick();
                }
                if self.accept_retry {
                    self.accept_retry = false;
                    self.arm_accept();
                }
            }
            OP_WAKE => self.on_wake(res),
            OP_CANCEL => {}
            _ => tracing::error!(core = self.index, ud, "completion with unknown user_data"),
        }
    }

    fn on_accept(&mut self, res: i32, flags: u32, tls: bool) {
        if !cqueue::more(flags) {
            if tls {
                self.tls_accept_armed = false;
            } else {
                self.accept_armed = false;
            }
        }
        if res >= 0 {
            self.new_connection(uring::accepted_socket(res), tls);
        } else if res != -libc::ECANCELED {
            let err = io::Error::from_raw_os_error(-res);
            match -res {
                libc::EMFILE | libc::ENFILE => tracing::warn!(
                    core = self.index,
                    "accept failed: {err}; raise LimitNOFILE / fs.file-max; retrying"
                ),
                _ => tracing::warn!(core = self.index, "accept failed: {err}"),
            }
        }
        let armed = if tls {
            self.tls_accept_armed || self.tls_listener.is_none()
        } else {
            self.accept_armed || self.listener.is_none()
        };
        if !armed && self.draining.is_none() {
            // Retry on the next tick rather than spin on a persistent error.
            if res < 0 {
                self.accept_retry = true;
            } else {
                self.arm_accept();
            }
        }
    }

    fn new_connection(&mut self, socket: Socket, tls: bool) {
        self.core.meter.stats.accepted.inc();
        if self.draining.is_some() {
            return; // dropping the socket closes it
        }
        // A wss:// client gets its own rustls connection (the config and its certificates
        // are shared); a plain one has no TLS state at all.
        let tls = match (tls, &self.core.tls) {
            (false, _) => None,
            (true, Some(config)) => match rustls::ServerConnection::new(config.clone()) {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(core = self.index, "cannot start a TLS connection: {e}");
                    return;
                }
            },
            (true, None) => return,
        };
        if let Err(e) = socket.set_nodelay() {
            tracing::debug!("TCP_NODELAY failed: {e}");
        }
        let slot = match self.free.pop() {
            Some(s) => s,
            None => self.slots.push(Slot {
                generation: 0,
                conn: None,
            }) as u32,
        };
        let generation = self.slots[slot as usize].generation;
        let id = ConnId::on_node(self.node, self.index as u8, slot, generation);
        let peer = socket.peer_addr();
        let mut session = Session::new(
            id,
            peer,
            self.core.config.message_limits(),
            self.core.now_ms,
        );
        if let Some(tls) = tls {
            session = session.with_tls(tls);
        }
        let mut conn = Conn::new(session, socket);
        // Admission before anything is read: a refused client gets its answer (503 or 429
        // with a reason) once its request arrives, and costs nothing more.
        conn.ip = peer.map(|a| a.ip());
        if let Err(refusal) = self.core.admit_at_accept(&mut conn) {
            tracing::debug!(conn = %id, ip = ?conn.ip, "refused: {refusal}");
            self.core
                .meter
                .stats
                .count(Count::Refused(refusal.metric()));
            // A refused client takes no place under max_connections while its answer leaves.
            self.core.release_limit(&mut conn);
            conn.session.refuse_at_accept(&refusal);
            conn.dirty = true;
            self.dirty.push(slot);
        }
        conn.charged = conn.session.footprint();
        self.core.charged += conn.charged as u64;
        self.slots[slot as usize].conn = Some(conn);
        self.live += 1;
        self.core.meter.stats.live.set(self.live as u64);
        tracing::debug!(conn = %id, "accepted");
        self.arm_recv(slot);
        self.arm_timer(slot);
    }

    fn on_recv(&mut self, slot: u32, generation: u32, res: i32, flags: u32) {
        let bid = cqueue::buffer_select(flags);
        let more = cqueue::more(flags);
        let Some(conn) = conn_in(&mut self.slots, slot, generation) else {
            if let Some(bid) = bid {
                self.buffers.recycle(bid);
            }
            return;
        };
        if !more {
            conn.recv_armed = false;
        }
        if res > 0 {
            self.core.meter.stats.bytes_in.add(res as u64);
            conn.session.on_received(res as usize);
            if conn.session.is_open() {
                let route = conn.session.route();
                self.core.meter.routes.bytes(route, IN, res as usize);
            }
            let bid = bid.expect("a multishot recv with data names its buffer");
            if conn.shut || conn.session.reading_done() {
                // Nothing more is read from it.
            } else if conn.paused || conn.held.is_some() {
                HeldInput::push(&mut conn.held, self.buffers.filled(bid, res as usize));
            } else {
                let data = self.buffers.filled(bid, res as usize);
                // Split the borrow: the buffer ring lends the bytes, the session does the rest.
                let conn = self.slots[slot as usize]
                    .conn
                    .as_mut()
                    .expect("checked above");
                let core = &mut self.core;
                let handled = panic::contain(|| conn.session.on_bytes(&mut core.cx(), data));
                self.dispatch_outputs(slot);
                if let Err(location) = handled {
                    self.contained_panic(slot, &location);
                }
            }
            self.buffers.recycle(bid);
            if !more {
                self.recv_rearm.push(slot);
            }
        } else if res == -libc::ENOBUFS {
            // The ring ran dry within this batch; the buffers are back once it is processed.
            self.recv_rearm.push(slot);
        } else {
            // 0: the client closed its side; < 0: reset or cancelled.
            if let Some(bid) = bid {
                self.buffers.recycle(bid);
            }
            let conn = self.slots[slot as usize]
                .conn
                .as_mut()
                .expect("checked above");
            // ECANCELED: we cancelled it, to pause a client for backpressure or to close.
            // The pause may already be over (resumed in the turn that paused it, while this
            // recv was still armed, so nothing was re-armed then): re-arm now unless it is
            // still paused or closing (`arm_recv` checks), or the client is never read again.
            if res == -libc::ECANCELED {
                self.recv_rearm.push(slot);
            } else if res == 0 && conn.held.is_some() {
                // Its FIN follows bytes it sent while paused: acted on after them.
                HeldInput::push_eof(&mut conn.held);
            } else {
                conn.held = None;
                let core = &mut self.core;
                conn.session.on_peer_closed(&mut core.cx(), res < 0);
                self.dispatch_outputs(slot);
            }
        }
        self.after_event(slot);
    }

    fn on_send(&mut self, slot: u32, generation: u32, res: i32) {
        self.sends.done(slot);
        let Some(conn) = conn_in(&mut self.slots, slot, generation) else {
            return;
        };
        conn.send_in_flight = false;
        if res < 0 {
            // EPIPE/ECONNRESET: the client is gone; what is queued cannot be delivered.
            conn.session.on_send_failed();
        } else {
            self.core.meter.stats.bytes_out.add(res as u64);
            if conn.session.is_open() {
                let route = conn.session.route();
                self.core.meter.routes.bytes(route, OUT, res as usize);
            }
            conn.session.on_sent(res as usize);
            if !conn.session.queued().is_empty() && !conn.dirty {
                conn.dirty = true;
                self.dirty.push(slot);
            }
        }
        self.after_event(slot);
    }

    fn on_wake(&mut self, res: i32) {
        if res < 0 && res != -libc::EINTR {
            tracing::error!(
                core = self.index,
                "inbox wake-up read failed: {}",
                io::Error::from_raw_os_error(-res)
            );
        }
        self.take_replies();
        self.arm_wake();
    }

    fn take_replies(&mut self) {
        while let Ok(msg) = self.inbox.try_recv() {
            self.on_reply(msg);
        }
    }

    fn on_reply(&mut self, msg: ToEdge) {
        let Some(id) = msg.conn() else {
            self.on_fanout(msg);
            return;
        };
        let slot = id.slot();
        let open = conn_in(&mut self.slots, slot, id.generation())
            .filter(|c| c.session.id() == id && !c.shut && c.session.accepts_replies());
        let Some(conn) = open else {
            self.core.meter.stats.stale_replies.inc();
            return;
        };
        let watched = fanout::watch_interest(&self.topics, self.cluster, &msg);
        let (core, topics) = (&mut self.core, &mut self.topics);
        let session = &mut conn.session;
        let handled = panic::contain(|| match msg {
            ToEdge::Send { kind, payload, .. } => {
                session.on_relay_send(&mut core.cx(), kind, &payload)
            }
            ToEdge::Close { code, reason, .. } => {
                session.on_relay_close(&mut core.cx(), code, &reason)
            }
            ToEdge::Subscribe { topic, .. } => {
                let max = core.routes.route(session.route()).max_subscriptions;
                match session.subscribe(&topic, max) {
                    Subscribed::New => topics.entry(topic).or_default().push(slot),
                    Subscribed::Already => {}
                    // Ignored and counted (docs/relay-protocol.md): the backend asked too
                    // much, the client did nothing wrong.
                    Subscribed::Limit => core.meter.stats.subscription_limit.inc(),
                }
            }
            ToEdge::Unsubscribe { topic, .. } => {
                if session.unsubscribe(&topic) {
                    fanout::unsubscribe(topics, &topic, slot);
                }
            }
            ToEdge::Accept { .. } => session.on_authorization(&mut core.cx(), Ok(())),
            ToEdge::Reject { status, reason, .. } => {
                session.on_authorization(&mut core.cx(), Err((status, reason)))
            }
            ToEdge::Publish { .. } | ToEdge::Broadcast { .. } => {
                unreachable!("fan-out has no conn")
            }
        });
        self.report_interest(watched);
        self.dispatch_outputs(slot);
        if let Err(location) = handled {
            self.contained_panic(slot, &location);
        }
        self.after_event(slot);
    }

    /// Carry out what a session call handed over: relay events in order, client messages
    /// charged to the connection's relay in-flight bytes.
    fn dispatch_outputs(&mut self, slot: u32) {
        if self.core.outputs.is_empty() {
            return;
        }
        let mut outputs = std::mem::take(&mut self.core.outputs);
        let conn = self.slots[slot as usize].conn.as_mut();
        let mut pause = false;
        for output in outputs.drain(..) {
            match output {
                Output::Relay(msg) => {
                    self.core.send_to_relay(msg);
                }
                Output::Message {
                    upstream,
                    kind,
                    payload,
                } => {
                    let Some(conn) = conn.as_deref() else {
                        continue;
                    };
                    // Relay in-flight: limit `relay_in_flight_limit` per connection,
                    // `CORE_RELAY_IN_FLIGHT` per core; charged until the relay drops the guard.
                    let guard = InFlight::new(
                        &conn.relay_in_flight,
                        &self.core.relay_in_flight,
                        payload.len() + RELAY_ENTRY_BYTES,
                    );
                    let sent = self.core.send_to_relay(ToUpstream::Message {
                        conn: conn.session.id(),
                        upstream,
                        kind,
                        payload,
                        guard,
                    });
                    // The relay is behind, or this client has too much in flight to it:
                    // stop reading this client until it catches up.
                    pause |= !sent || self.core.must_pause(conn);
                }
            }
        }
        self.core.outputs = outputs;
        if let (true, Some(conn)) = (pause, self.slots[slot as usize].conn.as_mut()) {
            conn.wants_pause = true;
        }
    }

    /// After anything happened on a connection: schedule its send, its timer, or its end.
    fn after_event(&mut self, slot: u32) {
        let generation = self.slots[slot as usize].generation;
        let Some(conn) = self.slots[slot as usize].conn.as_mut() else {
            return;
        };
        // TLS: encrypt what this event queued (nothing to do for plain TCP).
        conn.session.seal_output();
        let now = conn.session.footprint() + HeldInput::footprint(&conn.held);
        self.core.charged = self.core.charged - conn.charged as u64 + now as u64;
        conn.charged = now;
        if conn
            .session
            .over_send_queue(self.core.now_ms, self.core.config.send_queue_bytes)
        {
            // Over its outbound queue: read nothing more until it drains (closed 1008
            // after SLOW_CONSUMER_GRACE_MS by the session's timer).
            conn.wants_pause = true;
        }
        let eof = conn.session.peer_closed();
        if std::mem::take(&mut conn.wants_pause) && !conn.paused && !conn.shut && !eof {
            // Inbound backpressure: cancel its multishot recv so the kernel's socket buffer
            // fills and TCP flow control slows the client down.
            conn.paused = true;
            self.paused.push((slot, generation));
            if conn.recv_armed {
                let sqe = opcode::AsyncCancel::new(user_data(OP_RECV, slot, generation))
                    .build()
                    .user_data(user_data(OP_CANCEL, slot, generation));
                self.pending_sqes.push(sqe);
            }
        }
        let Some(conn) = self.slots[slot as usize].conn.as_mut() else {
            return;
        };
        if !conn.session.queued().is_empty() && !conn.send_in_flight && !conn.dirty && !conn.shut {
            conn.dirty = true;
            self.dirty.push(slot);
        }
        match conn
            .session
            .poll_shutdown(self.core.now_ms, conn.send_in_flight)
        {
            Some(Shutdown::Write) => {
                let _ = conn.socket.shutdown(std::net::Shutdown::Write);
            }
            Some(Shutdown::Both) => self.shut(slot),
            None => {}
        }
        let finished = self.slots[slot as usize]
            .conn
            .as_ref()
            .is_some_and(Conn::finished);
        if finished {
            self.free_slot(slot);
        } else {
            self.arm_timer(slot);
        }
    }

    /// A panic in this connection's handling was caught: close it (1011 if open, 500 in its
    /// handshake, dropped when neither can be sent), count it and log one line without the
    /// panic's message. It reads nothing more and ends through the normal freeing path; the
    /// core serves everyone else.
    fn contained_panic(&mut self, slot: u32, location: &str) {
        self.core.meter.stats.panics.inc();
        // Every frame has its own allocation (`session::encode`); only the routing scratch
        // is shared and must not carry a half-parsed message into the next one.
        self.core.scratch.clear();
        let Some(conn) = self.slots[slot as usize].conn.as_mut() else {
            return;
        };
        tracing::error!(conn = %conn.session.id(), location, "panic while handling this connection; closing it");
        conn.wants_pause = false;
        let sendable = !conn.shut
            && conn
                .session
                .on_panic(&mut self.core.cx(), conn.send_in_flight);
        self.core.outputs.clear();
        if !sendable {
            self.shut(slot);
        }
    }

    /// Stop all traffic on the socket; the slot is freed once in-flight operations complete.
    fn shut(&mut self, slot: u32) {
        let generation = self.slots[slot as usize].generation;
        let Some(conn) = self.slots[slot as usize].conn.as_mut() else {
            return;
        };
        if conn.shut {
            return;
        }
        conn.shut = true;
        conn.session.on_shut();
        // Nothing more is compressed or inflated for it: its contexts go now.
        let released = conn.session.release_compression();
        self.core.codec.release(released);
        let _ = conn.socket.shutdown(std::net::Shutdown::Both);
        if conn.recv_armed {
            let sqe = opcode::AsyncCancel::new(user_data(OP_RECV, slot, generation))
                .build()
                .user_data(user_data(OP_CANCEL, slot, generation));
            self.push(sqe);
        }
    }

    fn free_slot(&mut self, slot: u32) {
        let s = &mut self.slots[slot as usize];
        let Some(mut conn) = s.conn.take() else {
            return;
        };
        self.core.charged -= conn.charged as u64;
        let released = conn.session.release_compression();
        self.core.codec.release(released);
        let mut emptied = Vec::new();
        for topic in conn.session.subscriptions() {
            if fanout::unsubscribe(&mut self.topics, topic, slot) && self.cluster {
                emptied.push(topic.clone());
            }
        }
        if let (true, Some(ip)) = (conn.counted_ip, conn.ip) {
            self.core.ip_limiter.closed(ip, self.core.now_ms);
        }
        s.generation = (s.generation + 1) & GENERATION_MASK;
        self.free.push(slot);
        self.live -= 1;
        self.core.meter.stats.live.set(self.live as u64);
        self.core.meter.stats.closed.inc();
        // Every ring operation on the socket has completed (`Conn::finished`): `conn`'s
        // socket is closed when it is dropped at the end of this function.
        if conn.counted_limit {
            self.core.shared.open.fetch_sub(1, Ordering::Relaxed);
        }
        let id = conn.session.id();
        let code = conn.session.close_code();
        if conn.session.counted_open() {
            if let Some(relay) = &self.core.relay {
                let event = ToUpstream::Closed { conn: id, code };
                if let Err(TrySendError::Full(event)) = relay.try_send(event) {
                    self.core.relay_backlog.push_back(event);
                }
            }
        }
        for topic in emptied {
            self.report_interest(Some((topic, true)));
        }
        self.core.finished(&conn);
        tracing::debug!(conn = %id, code, "closed");
    }

    fn flush_sends(&mut self) {
        let dirty = std::mem::take(&mut self.dirty);
        for &slot in &dirty {
            self.start_send(slot);
        }
        self.dirty = dirty;
        self.dirty.clear();
    }

    /// One `sendmsg` per connection in flight; everything queued meanwhile leaves together.
    fn start_send(&mut self, slot: u32) {
        let generation = self.slots[slot as usize].generation;
        let Some(conn) = self.slots[slot as usize].conn.as_mut() else {
            return;
        };
        conn.dirty = false;
        conn.session.seal_output();
        if conn.send_in_flight || conn.session.queued().is_empty() || conn.shut {
            return;
        }
        // The SendBuf holds its own reference to every `Bytes` it points at, so the queue
        // may be cleared (a failed recv, a reset) while the kernel still reads them.
        let Some((sqe, n)) = self.sends.prepare(
            slot,
            conn.socket.as_raw_fd(),
            conn.session.queued().iter(),
            user_data(OP_SEND, slot, generation),
        ) else {
            return;
        };
        conn.send_in_flight = true;
        conn.session.start_send(n);
        self.push(sqe);
    }

    // ----- timers -----

    fn arm_timer(&mut self, slot: u32) {
        let generation = self.slots[slot as usize].generation;
        let Some(conn) = self.slots[slot as usize].conn.as_mut() else {
            return;
        };
        if conn.shut {
            return;
        }
        let Some(at) = conn.session.poll_timeout(&self.core.config, self.draining) else {
            return;
        };
        if conn.wheel_at.is_none_or(|t| at < t) {
            conn.wheel_at = Some(at);
            self.wheel.schedule(timer::Entry {
                slot,
                generation,
                at_ms: at,
            });
        }
    }

    fn run_timers(&mut self) {
        if self.core.now_ms >= self.last_sweep_ms.saturating_add(1000) {
            self.last_sweep_ms = self.core.now_ms;
            self.core.ip_limiter.sweep(self.core.now_ms);
        }
        let mut due = std::mem::take(&mut self.due);
        self.wheel.advance(self.core.now_ms, &mut due);
        for entry in due.drain(..) {
            let now = self.core.now_ms;
            let draining = self.draining;
            let Some(conn) = conn_in(&mut self.slots, entry.slot, entry.generation) else {
                continue;
            };
            if conn.wheel_at != Some(entry.at_ms) {
                continue; // superseded by an earlier entry
            }
            conn.wheel_at = None;
            if entry.at_ms <= now && !conn.shut {
                let core = &mut self.core;
                let session = &mut conn.session;
                let fired = panic::contain(|| session.handle_timeout(&mut core.cx(), draining));
                self.dispatch_outputs(entry.slot);
                if let Err(location) = fired {
                    self.contained_panic(entry.slot, &location);
                }
            }
            self.after_event(entry.slot);
        }
        self.due = due;
    }
}

/// The connection in `slot` if it is still the same generation.
fn conn_in(slots: &mut Slab<Slot>, slot: u32, generation: u32) -> Option<&mut Conn> {
    let s = slots.get_mut(slot as usize)?;
    if s.generation != generation {
        return None;
    }
    s.conn.as_mut()
}

/// The test-only panic hook: `RINGWAY_TEST_PANIC_ON=<text>`, read once per worker at start.
/// Never set it in production: it lets a client crash its own connection on purpose.
fn panic_hook_from_env() -> Option<Vec<u8>> {
    std::env::var_os("RINGWAY_TEST_PANIC_ON").map(|v| v.into_encoded_bytes())
}

/// Wall-clock Unix milliseconds, for token expiry (the loop's clock is monotonic).
fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The core's own state beside its connection slab and ring (configuration, relay channel
/// and backlog, limits, counters, memory meter), kept apart so a session and this can be
/// borrowed at once.
struct CoreState {
    workers: usize,
    config: Arc<Config>,
    /// This core's share of the per-IP limits.
    ip_limiter: PerIpLimiter,
    routes: Arc<RouteTable>,
    /// simd-json parses in place: messages are routed on a copy.
    scratch: Vec<u8>,
    /// The core's one permessage-deflate compressor and inflater (`compression = "shared"`).
    pub(super) codec: crate::session::compression::SharedCodec,
    /// What the last session call handed over (`Worker::dispatch_outputs`).
    outputs: Vec<Output>,
    shared: Arc<Shared>,
    relay: Option<RelayTx>,
    relay_backlog: VecDeque<ToUpstream>,
    /// Bytes of this core's client messages the relay has not let go of (core backlog,
    /// channel, relay thread): limit `CORE_RELAY_IN_FLIGHT`, charged in `publish_memory`.
    relay_in_flight: Arc<std::sync::atomic::AtomicUsize>,
    /// The core's counters (`meter.stats`, shared with scrapes) and per-route counts; the
    /// sessions' `Meter`.
    meter: CoreMeter,
    now_ms: u64,
    /// Wall-clock Unix ms at `now_ms` (read once per loop turn).
    unix_ms: u64,
    /// Bytes its connections hold (`Session::footprint`), and how much of that the
    /// shared total already includes.
    charged: u64,
    published: u64,
    /// Refusing for the memory budget: logged once when it starts and once when it ends.
    over_budget: bool,
    /// Test-only (`RINGWAY_TEST_PANIC_ON`): a text message equal to these bytes, or a
    /// handshake for `/__panic`, panics, to exercise panic containment.
    panic_on: Option<Vec<u8>>,
    /// What a wss:// connection's rustls state is built from (shared by every core).
    tls: Option<Arc<rustls::ServerConfig>>,
}

impl CoreState {
    /// What a session call needs from this core.
    fn cx(&mut self) -> Context<'_> {
        Context {
            now_ms: self.now_ms,
            unix_ms: self.unix_ms,
            config: &self.config,
            routes: &self.routes,
            meter: &self.meter,
            relay: self.relay.is_some(),
            scratch: &mut self.scratch,
            codec: &mut self.codec,
            panic_on: self.panic_on.as_deref(),
            out: &mut self.outputs,
        }
    }

    /// Whether the gateway is over its memory budget (as of the published totals).
    fn over_memory_budget(&self) -> bool {
        self.shared.buffer_bytes.load(Ordering::Relaxed)
            > self.shared.memory_budget.load(Ordering::Relaxed)
    }

    /// Whether a new connection fits in the memory budget, counting this core's unpublished
    /// growth too; says so in the log when that changes.
    fn memory_admits(&mut self) -> bool {
        let others = self
            .shared
            .buffer_bytes
            .load(Ordering::Relaxed)
            .saturating_sub(self.published);
        // What the relay holds for peers counts too (inboxes, link queues, opens, rooms).
        let used = others + self.total() + self.shared.relay.held();
        let budget = self.shared.memory_budget.load(Ordering::Relaxed);
        let admits = used < budget;
        if admits == self.over_budget {
            self.over_budget = !admits;
            if admits {
                tracing::info!(
                    used,
                    budget,
                    "below the memory budget again: accepting new connections"
                );
            } else {
                tracing::warn!(
                    used,
                    budget,
                    "memory budget reached: new connections get 503 until buffers are released"
                );
            }
        }
        admits
    }

    /// The accept-time links of the admission chain: memory budget, connection limit,
    /// per-IP limits (the handshake-time links are `admission::admit`, in the session).
    fn admit_at_accept(&mut self, conn: &mut Conn) -> Result<(), AcceptRefusal> {
        if !self.memory_admits() {
            return Err(AcceptRefusal::Memory);
        }
        if !self.count_toward_limit(conn) {
            return Err(AcceptRefusal::ConnectionLimit);
        }
        if let Some(ip) = conn.ip {
            self.ip_limiter
                .try_open(ip, self.now_ms)
                .map_err(AcceptRefusal::Ip)?;
            conn.counted_ip = true;
        }
        Ok(())
    }

    /// Bytes this core holds for its clients: connection footprints plus relay in-flight.
    fn total(&self) -> u64 {
        self.charged + self.relay_in_flight.load(Ordering::Relaxed) as u64
    }

    /// Whether a connection must stop being read: its outbound queue plus what it has in
    /// flight to the relay is over `send_queue_bytes` (the replies to what is in flight are
    /// still to come: a client that pipelines faster than it reads them is slowed down, not
    /// closed 1008), or it (or its core) has too much in flight to the relay.
    fn must_pause(&self, conn: &Conn) -> bool {
        let in_flight = conn.relay_in_flight.load(Ordering::Relaxed);
        conn.session.queued_cost() + in_flight > self.config.send_queue_bytes
            || in_flight
                > super::connection::relay_in_flight_limit(self.config.max_message_bytes as usize)
            || self.relay_in_flight.load(Ordering::Relaxed) > CORE_RELAY_IN_FLIGHT
    }

    /// Whether a paused connection may be read again (with hysteresis on the relay counts).
    fn may_resume(&self, conn: &Conn) -> bool {
        let in_flight = conn.relay_in_flight.load(Ordering::Relaxed);
        self.relay_backlog.is_empty()
            && conn.session.queued_cost() + in_flight <= self.config.send_queue_bytes
            && in_flight
                <= super::connection::relay_in_flight_limit(self.config.max_message_bytes as usize)
                    / 2
            && self.relay_in_flight.load(Ordering::Relaxed) <= CORE_RELAY_IN_FLIGHT / 2
    }

    /// Pass a message to the relay; false when it had to wait in the core's backlog.
    fn send_to_relay(&mut self, msg: ToUpstream) -> bool {
        let Some(relay) = &self.relay else {
            return true;
        };
        if !self.relay_backlog.is_empty() {
            self.relay_backlog.push_back(msg);
            return false;
        }
        match relay.try_send(msg) {
            Ok(()) => true,
            Err(TrySendError::Full(msg)) => {
                self.relay_backlog.push_back(msg);
                false
            }
            Err(TrySendError::Disconnected(_)) => true,
        }
    }

    /// Take a place under `max_connections` for a connection just accepted (handshaking
    /// connections count); false, and nothing taken, when every place is taken.
    fn count_toward_limit(&mut self, conn: &mut Conn) -> bool {
        let open = self.shared.open.fetch_add(1, Ordering::Relaxed);
        if open >= self.config.max_connections {
            self.shared.open.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        conn.counted_limit = true;
        true
    }

    /// Give back the place `count_toward_limit` took, if it took one.
    fn release_limit(&mut self, conn: &mut Conn) {
        if std::mem::take(&mut conn.counted_limit) {
            self.shared.open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}
