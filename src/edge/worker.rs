//! One core's event loop: accepts on its own listener, receives into its provided-buffer
//! ring, drives the protocol core over the bytes where the kernel put them, sends what
//! connections queued, and answers the relay's replies from its inbox.
//!
//! Completions are matched by `user_data = op (8 bits) | generation (24 bits) | slot (32 bits)`.

use std::collections::VecDeque;
use std::io;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use crossbeam_channel::TrySendError;
use io_uring::{cqueue, opcode, squeue, types, IoUring};

use crate::admission;
use crate::config::{Config, SlowConsumer, Upstream};
use crate::policy::rate::{MessageRate, PerIpLimiter};
use crate::protocol::close;
use crate::protocol::frame::{self, OpCode, Role, MAX_HEADER_LEN};
use crate::protocol::handshake::{self, Parsed};
use crate::protocol::message::{Event, Limits, MessageDecoder, MessageKind};
use crate::protocol::ProtocolError;
use crate::relay::{OpenInfo, RelayTx, ToEdge, ToUpstream, Topic};
use crate::route::RouteTable;
use std::collections::HashMap;

use super::buffers::{self, BufferRing};
use super::connection::{Connection, Phase};
use super::inbox::Waker;
use super::panic;
use super::stats::CoreStats;
use super::timer::{self, TimerWheel};
use super::Shared;
use crate::ids::{self, ConnId, GENERATION_MASK};

const OP_ACCEPT: u64 = 1;
const OP_RECV: u64 = 2;
const OP_SEND: u64 = 3;
const OP_TICK: u64 = 4;
const OP_WAKE: u64 = 5;
const OP_CANCEL: u64 = 6;

const TICK_MS: u64 = 50;
/// Unsent bytes past which a new pong replaces a queued one (see `Connection::queue_pong`).
const PONG_COALESCE_PAST: usize = 64 * 1024;
/// Bytes of one core's client messages that may be in flight to the relay (its backlog, the
/// channel and the relay thread) before its connections stop being read.
const CORE_RELAY_IN_FLIGHT: usize = 16 << 20;
/// What one relayed message costs besides its payload: the `ToUpstream` and its guard.
const RELAY_ENTRY_BYTES: usize = 128;
/// A client paused because its outbound queue is over `send_queue_bytes` is closed 1008
/// "slow consumer" if it is still over after this long.
const SLOW_CONSUMER_GRACE_MS: u64 = 5_000;
const MAX_IOV: usize = 64;

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

/// The iovecs and header of one in-flight `sendmsg`; boxed so their addresses stay put
/// until the kernel completes the send.
struct SendBuf {
    msg: libc::msghdr,
    iov: [libc::iovec; MAX_IOV],
}

impl SendBuf {
    fn new() -> Box<SendBuf> {
        Box::new(SendBuf {
            // SAFETY: msghdr is a plain C struct for which all-zero is the empty value.
            msg: unsafe { std::mem::zeroed() },
            iov: [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; MAX_IOV],
        })
    }
}

/// Everything a worker thread needs, prepared by the thread that starts the gateway.
pub struct WorkerSetup {
    pub index: usize,
    pub workers: usize,
    pub stats: Arc<CoreStats>,
    pub routes: Arc<RouteTable>,
    pub cpu: Option<core_affinity::CoreId>,
    pub listener: TcpListener,
    pub config: Arc<Config>,
    pub relay: Option<RelayTx>,
    pub inbox: super::inbox::Inbox,
    pub waker: Arc<Waker>,
    pub shared: Arc<Shared>,
}

struct Slot {
    generation: u32,
    conn: Option<Connection>,
}

pub struct Worker {
    index: usize,
    core: Core,
    // Field order matters for Drop: the buffer ring is unregistered (explicitly, in `run`)
    // and unmapped before the io_uring goes.
    buffers: BufferRing,
    ring: IoUring,
    listener: Option<TcpListener>,
    slots: Vec<Slot>,
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
    send_pool: Vec<Box<SendBuf>>,
    in_flight_sends: Vec<Option<Box<SendBuf>>>,
    dirty: Vec<u32>,
    /// Connections paused for inbound backpressure.
    paused: Vec<(u32, u32)>,
    /// Topic -> slots of this core's subscribers.
    topics: HashMap<Topic, Vec<u32>>,
    recv_rearm: Vec<u32>,
    accept_armed: bool,
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
        Ok(Worker {
            index: setup.index,
            core: Core {
                workers: setup.workers,
                ip_limiter: PerIpLimiter::new(setup.config.ip_limits.per_core(setup.workers)),
                config: setup.config,
                routes: setup.routes,
                scratch: Vec::new(),
                shared: setup.shared,
                relay: setup.relay,
                relay_backlog: VecDeque::new(),
                relay_in_flight: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
                stats: setup.stats,
                now_ms: 0,
                charged: 0,
                published: 0,
                over_budget: false,
                panic_on: panic_hook_from_env(),
            },
            buffers,
            ring,
            listener: Some(setup.listener),
            slots: Vec::new(),
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
            send_pool: Vec::new(),
            in_flight_sends: Vec::new(),
            dirty: Vec::new(),
            topics: HashMap::new(),
            paused: Vec::new(),
            recv_rearm: Vec::new(),
            accept_armed: false,
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
        let result = self.event_loop();
        self.buffers.unregister(&self.ring);
        result
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
            self.flush_relay_backlog();
            self.shed_for_budget();
            self.run_timers();
            self.rearm_recvs();
            self.flush_sends();
            self.buffers.publish();
            self.core.publish_memory();
            // Liveness for /healthz, /readyz and the watchdog (src/ops/health.rs).
            self.core.stats.heartbeat.beat();
            super::test_hooks::on_loop_turn(super::test_hooks::Loop::Core(self.index));
            let generation = self.core.shared.reload_generation.load(Ordering::Acquire);
            if generation != self.reload_generation {
                self.reload_generation = generation;
                self.apply_reload();
            }
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
        let mut i = 0;
        while i < self.pending_sqes.len() {
            {
                let mut sq = self.ring.submission();
                while i < self.pending_sqes.len() {
                    // SAFETY: every entry built by this worker points only at memory that
                    // outlives the operation: the socket fds stay open until the operation's
                    // completion has been seen (`Connection::finished`), send iovecs live in a
                    // boxed SendBuf held in `in_flight_sends` until the send completes, and the
                    // tick timespec and wake buffer are boxed fields of the worker, which waits
                    // for every operation before it returns.
                    if unsafe { sq.push(&self.pending_sqes[i]) }.is_err() {
                        break;
                    }
                    i += 1;
                }
            }
            if i < self.pending_sqes.len() {
                self.ring.submit()?;
            }
        }
        self.pending_sqes.clear();
        Ok(())
    }

    fn arm_accept(&mut self) {
        if let Some(l) = &self.listener {
            let sqe = opcode::AcceptMulti::new(types::Fd(l.as_raw_fd()))
                .flags(libc::SOCK_CLOEXEC)
                .build()
                .user_data(user_data(OP_ACCEPT, 0, 0));
            self.push(sqe);
            self.accept_armed = true;
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
        if conn.recv_armed || conn.shut || conn.eof || conn.paused {
            return;
        }
        conn.recv_armed = true;
        let sqe = opcode::RecvMulti::new(types::Fd(conn.fd), buffers::GROUP)
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
            OP_ACCEPT => self.on_accept(res, flags),
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

    fn on_accept(&mut self, res: i32, flags: u32) {
        if !cqueue::more(flags) {
            self.accept_armed = false;
        }
        if res >= 0 {
            self.new_connection(res);
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
        if !self.accept_armed && self.draining.is_none() && self.listener.is_some() {
            // Retry on the next tick rather than spin on a persistent error.
            if res < 0 {
                self.accept_retry = true;
            } else {
                self.arm_accept();
            }
        }
    }

    fn new_connection(&mut self, fd: RawFd) {
        self.core.stats.accepted.inc();
        if self.draining.is_some() {
            // SAFETY: fd was just accepted and is owned by nobody else.
            unsafe { libc::close(fd) };
            return;
        }
        set_nodelay(fd);
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(Slot {
                    generation: 0,
                    conn: None,
                });
                self.slots.len() as u32 - 1
            }
        };
        let generation = self.slots[slot as usize].generation;
        let id = ConnId::new(self.index as u8, slot, generation);
        let decoder = MessageDecoder::new(Role::Server, self.core.config.message_limits());
        let mut conn = Connection::new(id, fd, decoder, self.core.now_ms);
        // Admission before anything is read: a refused client gets its answer (503 or 429
        // with a reason) once its request arrives, and costs nothing more.
        conn.ip = peer_addr(fd).map(|a| a.ip());
        let refusal = if !self.core.memory_admits() {
            self.core.stats.memory_refused.inc();
            Some((503, "server memory budget exhausted", 5))
        } else if !self.core.count_toward_limit(&mut conn) {
            self.core.stats.limit_refused.inc();
            Some((503, "connection limit reached", 5))
        } else if let Some(ip) = conn.ip {
            match self.core.ip_limiter.try_open(ip, self.core.now_ms) {
                Ok(()) => {
                    conn.counted_ip = true;
                    None
                }
                Err(r) => {
                    self.core.stats.ip_refused.inc();
                    Some((r.status(), r.reason(), r.retry_after_secs()))
                }
            }
        } else {
            None
        };
        if let Some((status, reason, retry_after)) = refusal {
            tracing::debug!(conn = %id, ip = ?conn.ip, "refused: {reason}");
            // A refused client takes no place under max_connections while its answer leaves.
            self.core.release_limit(&mut conn);
            let retry_after = retry_after.to_string();
            conn.queue(handshake::error_response(
                status,
                reason,
                &[("Retry-After", &retry_after)],
            ));
            conn.reading_done = true;
            conn.close_after_flush = true;
            conn.dirty = true;
            self.dirty.push(slot);
        }
        conn.charged = conn.footprint();
        self.core.charged += conn.charged as u64;
        self.slots[slot as usize].conn = Some(conn);
        self.live += 1;
        self.core.stats.live.set(self.live as u64);
        tracing::debug!(conn = %id, "accepted");
        self.arm_recv(slot);
        self.arm_timer(slot);
    }

    fn on_recv(&mut self, slot: u32, generation: u32, res: i32, flags: u32) {
        let bid = cqueue::buffer_select(flags);
        let more = cqueue::more(flags);
        let now = self.core.now_ms;
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
            self.core.stats.bytes_in.add(res as u64);
            let bid = bid.expect("a multishot recv with data names its buffer");
            if !conn.reading_done && !conn.shut {
                conn.last_rx_ms = now;
                let data = self.buffers.filled(bid, res as usize);
                // Split the borrow: the buffer ring lends the bytes, the context does the rest.
                let conn = self.slots[slot as usize]
                    .conn
                    .as_mut()
                    .expect("checked above");
                let core = &mut self.core;
                if let Err(location) = panic::contain(|| core.on_bytes(conn, data)) {
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
            if res == -libc::ECANCELED {
                // We cancelled it: to pause a client for backpressure, or to close.
                if conn.paused && !conn.shut {
                    // Re-armed when the relay backlog drains.
                }
            } else {
                conn.reading_done = true;
                conn.eof = true;
                if !conn.shut {
                    tracing::debug!(conn = %conn.id, "peer closed the TCP connection");
                    // Nothing more will come in; send what is queued, then drop TCP.
                    conn.close_after_flush = true;
                    if res < 0 {
                        conn.out.clear();
                        conn.out_bytes = 0;
                    }
                }
            }
        }
        self.after_event(slot);
    }

    fn on_send(&mut self, slot: u32, generation: u32, res: i32) {
        if let Some(buf) = self
            .in_flight_sends
            .get_mut(slot as usize)
            .and_then(Option::take)
        {
            self.send_pool.push(buf);
        }
        let Some(conn) = conn_in(&mut self.slots, slot, generation) else {
            return;
        };
        conn.send_in_flight = false;
        conn.sending = 0;
        if res < 0 {
            // EPIPE/ECONNRESET: the client is gone; what is queued cannot be delivered.
            conn.out.clear();
            conn.out_bytes = 0;
            conn.reading_done = true;
            conn.close_after_flush = true;
        } else {
            self.core.stats.bytes_out.add(res as u64);
            conn.advance_out(res as usize);
            if !conn.out.is_empty() && !conn.dirty {
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
        while let Ok(msg) = self.inbox.try_recv() {
            self.on_reply(msg);
        }
        self.arm_wake();
    }

    fn on_reply(&mut self, msg: ToEdge) {
        let Some(id) = msg.conn() else {
            self.on_fanout(msg);
            return;
        };
        let slot = id.slot();
        let open = conn_in(&mut self.slots, slot, id.generation())
            .filter(|c| c.id == id && !c.close.close_sent() && !c.shut)
            .filter(|c| c.is_open() || matches!(c.phase, Phase::Authorizing { .. }));
        let Some(conn) = open else {
            self.core.stats.stale_replies.inc();
            return;
        };
        let (core, topics) = (&mut self.core, &mut self.topics);
        let handled = panic::contain(|| match msg {
            ToEdge::Send { kind, payload, .. } => {
                let frame = core.encode(opcode_for(kind), &payload);
                core.queue_data(conn, frame);
            }
            ToEdge::Close { code, reason, .. } => core.on_relay_close(conn, code, &reason),
            ToEdge::Subscribe { topic, .. } => {
                if conn.subscriptions.contains(&topic) {
                    // Already subscribed: nothing to do.
                } else if conn.subscriptions.len()
                    >= core.routes.route(conn.route).max_subscriptions
                {
                    // Ignored and counted (docs/relay-protocol.md): the backend asked too much,
                    // the client did nothing wrong.
                    core.stats.subscription_limit.inc();
                    tracing::debug!(conn = %conn.id, topic = %topic, "subscription limit reached; ignored");
                } else {
                    conn.subscriptions.push(topic.clone());
                    topics.entry(topic).or_default().push(slot);
                }
            }
            ToEdge::Unsubscribe { topic, .. } => {
                if let Some(i) = conn.subscriptions.iter().position(|t| *t == topic) {
                    conn.subscriptions.swap_remove(i);
                    unsubscribe(topics, &topic, slot);
                }
            }
            ToEdge::Accept { .. } => core.on_authorization(conn, Ok(())),
            ToEdge::Reject { status, reason, .. } => {
                core.on_authorization(conn, Err((status, reason)))
            }
            ToEdge::Publish { .. } | ToEdge::Broadcast { .. } => {
                unreachable!("fan-out has no conn")
            }
        });
        if let Err(location) = handled {
            self.contained_panic(slot, &location);
        }
        self.after_event(slot);
    }

    /// A publish or broadcast: encoded once, the same bytes queued to every recipient here.
    fn on_fanout(&mut self, msg: ToEdge) {
        let (recipients, kind, payload): (Vec<u32>, _, _) = match msg {
            ToEdge::Publish {
                topic,
                kind,
                payload,
            } => match self.topics.get(&topic) {
                Some(slots) => (slots.clone(), kind, payload),
                None => return,
            },
            ToEdge::Broadcast { kind, payload } => {
                let open = (0..self.slots.len() as u32)
                    .filter(|&s| {
                        self.slots[s as usize]
                            .conn
                            .as_ref()
                            .is_some_and(Connection::is_open)
                    })
                    .collect();
                (open, kind, payload)
            }
            _ => return,
        };
        let frame = self.core.encode(opcode_for(kind), &payload);
        for slot in recipients {
            let Some(conn) = self.slots[slot as usize].conn.as_mut() else {
                continue;
            };
            if !conn.is_open() || conn.close.close_sent() || conn.shut {
                continue;
            }
            let core = &mut self.core;
            if let Err(location) = panic::contain(|| core.queue_fanout(conn, frame.clone())) {
                self.contained_panic(slot, &location);
            }
            self.after_event(slot);
        }
    }

    /// After anything happened on a connection: schedule its send, its timer, or its end.
    fn after_event(&mut self, slot: u32) {
        let generation = self.slots[slot as usize].generation;
        let Some(conn) = self.slots[slot as usize].conn.as_mut() else {
            return;
        };
        let now = conn.footprint();
        self.core.charged = self.core.charged - conn.charged as u64 + now as u64;
        conn.charged = now;
        if conn.queued_cost() > self.core.config.send_queue_bytes && !conn.close.close_sent() {
            // Over its outbound queue: read nothing more until it drains (closed 1008 after
            // SLOW_CONSUMER_GRACE_MS, in `flush_relay_backlog`).
            conn.wants_pause = true;
            conn.over_queue_ms.get_or_insert(self.core.now_ms);
        }
        if std::mem::take(&mut conn.wants_pause) && !conn.paused && !conn.shut && !conn.eof {
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
        if !conn.out.is_empty() && !conn.send_in_flight && !conn.dirty && !conn.shut {
            conn.dirty = true;
            self.dirty.push(slot);
        }
        if conn.ready_to_shut() {
            if conn.eof {
                self.shut(slot);
            } else {
                // SAFETY: shutdown(2) on a socket fd we own has no memory preconditions.
                unsafe { libc::shutdown(conn.fd, libc::SHUT_WR) };
                conn.wr_shut_ms = Some(self.core.now_ms);
            }
        } else if conn.eof && conn.wr_shut_ms.is_some() {
            self.shut(slot);
        }
        let finished = self.slots[slot as usize]
            .conn
            .as_ref()
            .is_some_and(Connection::finished);
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
        self.core.stats.panics.inc();
        // Every frame has its own allocation (`Core::encode`); only the routing scratch is
        // shared and must not carry a half-parsed message into the next one.
        self.core.scratch.clear();
        let now = self.core.now_ms;
        let Some(conn) = self.slots[slot as usize].conn.as_mut() else {
            return;
        };
        tracing::error!(conn = %conn.id, location, "panic while handling this connection; closing it");
        conn.reading_done = true;
        conn.closing_without_reply = true;
        conn.wants_pause = false;
        let sendable = if conn.shut || conn.eof {
            false
        } else if conn.is_open() {
            let can = !conn.close.close_sent();
            if can {
                self.core
                    .start_close(conn, close::INTERNAL_ERROR, "internal error");
            }
            can
        } else if conn.out.is_empty() && !conn.send_in_flight {
            // In its handshake (or held for authorization): nothing sent yet, so a 500 fits.
            conn.phase = Phase::Handshake(BytesMut::new());
            self.core.stats.handshakes_rejected.inc();
            conn.queue(handshake::error_response(500, "internal error", &[]));
            conn.close_code = close::INTERNAL_ERROR;
            true
        } else {
            false
        };
        if sendable {
            conn.close_after_flush = true;
            conn.close_sent_ms.get_or_insert(now);
        } else {
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
        conn.reading_done = true;
        // SAFETY: shutdown(2) on a socket fd we own has no memory preconditions.
        unsafe { libc::shutdown(conn.fd, libc::SHUT_RDWR) };
        if conn.recv_armed {
            let sqe = opcode::AsyncCancel::new(user_data(OP_RECV, slot, generation))
                .build()
                .user_data(user_data(OP_CANCEL, slot, generation));
            self.push(sqe);
        }
    }

    fn free_slot(&mut self, slot: u32) {
        let s = &mut self.slots[slot as usize];
        let Some(conn) = s.conn.take() else { return };
        self.core.charged -= conn.charged as u64;
        for topic in &conn.subscriptions {
            unsubscribe(&mut self.topics, topic, slot);
        }
        if let (true, Some(ip)) = (conn.counted_ip, conn.ip) {
            self.core.ip_limiter.closed(ip, self.core.now_ms);
        }
        s.generation = (s.generation + 1) & GENERATION_MASK;
        self.free.push(slot);
        self.live -= 1;
        self.core.stats.live.set(self.live as u64);
        self.core.stats.closed.inc();
        // SAFETY: every ring operation on this fd has completed (`Connection::finished`), and
        // the fd is owned by this connection alone.
        unsafe { libc::close(conn.fd) };
        if conn.counted_limit {
            self.core.shared.open.fetch_sub(1, Ordering::Relaxed);
        }
        if conn.counted_open {
            if let Some(relay) = &self.core.relay {
                let event = ToUpstream::Closed {
                    conn: conn.id,
                    code: conn.close_code,
                };
                if let Err(TrySendError::Full(event)) = relay.try_send(event) {
                    self.core.relay_backlog.push_back(event);
                }
            }
        }
        tracing::debug!(conn = %conn.id, code = conn.close_code, "closed");
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
        if conn.send_in_flight || conn.out.is_empty() || conn.shut {
            return;
        }
        let mut buf = self.send_pool.pop().unwrap_or_else(SendBuf::new);
        let mut n = 0;
        for item in conn.out.iter().take(MAX_IOV) {
            buf.iov[n] = libc::iovec {
                iov_base: item.as_ptr() as *mut libc::c_void,
                iov_len: item.len(),
            };
            n += 1;
        }
        buf.msg.msg_iov = buf.iov.as_mut_ptr();
        buf.msg.msg_iovlen = n as _;
        conn.send_in_flight = true;
        conn.sending = n;
        let sqe = opcode::SendMsg::new(types::Fd(conn.fd), &buf.msg)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build()
            .user_data(user_data(OP_SEND, slot, generation));
        if self.in_flight_sends.len() <= slot as usize {
            self.in_flight_sends.resize_with(slot as usize + 1, || None);
        }
        // The queued Bytes the iovecs point at stay in `conn.out`, untouched, until completion.
        self.in_flight_sends[slot as usize] = Some(buf);
        self.push(sqe);
    }

    fn flush_relay_backlog(&mut self) {
        self.drain_relay_backlog();
        if !self.paused.is_empty() {
            let now = self.core.now_ms;
            let mut touched = Vec::new();
            for (slot, generation) in std::mem::take(&mut self.paused) {
                let Some(conn) = conn_in(&mut self.slots, slot, generation) else {
                    continue;
                };
                if !conn.paused {
                    continue;
                }
                if self.core.may_resume(conn) || conn.shut {
                    conn.paused = false;
                    conn.over_queue_ms = None;
                    self.recv_rearm.push(slot);
                    continue;
                }
                if conn
                    .over_queue_ms
                    .is_some_and(|t| now.saturating_sub(t) >= SLOW_CONSUMER_GRACE_MS)
                    && !conn.close.close_sent()
                {
                    tracing::debug!(conn = %conn.id, queued = conn.out_bytes, "slow consumer");
                    self.core.stats.overflow_closed.inc();
                    self.core
                        .start_close(conn, close::POLICY_VIOLATION, "slow consumer");
                    conn.reading_done = true;
                    conn.closing_without_reply = true;
                    conn.close_after_flush = true;
                    touched.push(slot);
                }
                self.paused.push((slot, generation));
            }
            for slot in touched {
                self.after_event(slot);
            }
        }
    }

    /// Over the memory budget: close this core's largest holder 1008 "server memory budget"
    /// (one per loop turn, until the published total is back under the budget).
    fn shed_for_budget(&mut self) {
        if !self.core.over_memory_budget() {
            return;
        }
        let largest = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.conn.as_ref().map(|c| (i as u32, c)))
            .filter(|(_, c)| {
                c.is_open()
                    && !c.shut
                    && !c.reading_done
                    && c.holds() > 4 * super::connection::BASE_BYTES
            })
            .max_by_key(|(_, c)| c.holds())
            .map(|(i, _)| i);
        let Some(slot) = largest else { return };
        let conn = self.slots[slot as usize]
            .conn
            .as_mut()
            .expect("found above");
        self.core.shed(conn);
        self.after_event(slot);
    }

    fn drain_relay_backlog(&mut self) {
        let Some(relay) = &self.core.relay else {
            return;
        };
        while let Some(msg) = self.core.relay_backlog.pop_front() {
            match relay.try_send(msg) {
                Ok(()) => {}
                Err(TrySendError::Full(msg)) => {
                    self.core.relay_backlog.push_front(msg);
                    break;
                }
                Err(TrySendError::Disconnected(_)) => {
                    tracing::error!(
                        core = self.index,
                        "the relay thread is gone; dropping its queue"
                    );
                    self.core.relay_backlog.clear();
                    break;
                }
            }
        }
    }

    // ----- timers -----

    fn arm_timer(&mut self, slot: u32) {
        let generation = self.slots[slot as usize].generation;
        let Some(conn) = self.slots[slot as usize].conn.as_mut() else {
            return;
        };
        let Some(at) = next_deadline(conn, &self.core.config, self.draining) else {
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
            if entry.at_ms <= now {
                let fire =
                    next_deadline(conn, &self.core.config, draining).is_some_and(|d| d <= now);
                if fire {
                    if let Err(location) = panic::contain(|| self.on_deadline(entry.slot)) {
                        self.contained_panic(entry.slot, &location);
                    }
                }
            }
            self.after_event(entry.slot);
        }
        self.due = due;
    }

    fn on_deadline(&mut self, slot: u32) {
        let now = self.core.now_ms;
        let conn = self.slots[slot as usize]
            .conn
            .as_mut()
            .expect("caller checked");
        if conn.fence_ms.is_some()
            || conn.wr_shut_ms.is_some()
            || conn.close_sent_ms.is_some()
            || conn.close_after_flush
        {
            // The client did not answer our close, or will not read what we queued.
            tracing::debug!(conn = %conn.id, "close linger expired; dropping TCP");
            self.shut(slot);
            return;
        }
        match conn.phase {
            Phase::Handshake(_) => {
                tracing::debug!(conn = %conn.id, "handshake timed out");
                self.core.stats.handshakes_rejected.inc();
                conn.queue(handshake::error_response(
                    408,
                    "handshake not completed in time",
                    &[],
                ));
                conn.reading_done = true;
                conn.close_after_flush = true;
                // Give the 408 one linger period to leave, then drop regardless.
                conn.close_sent_ms = Some(now);
            }
            Phase::Authorizing { .. } => {
                tracing::debug!(conn = %conn.id, "backend did not authorize in time");
                self.core
                    .on_authorization(conn, Err((503, "authorization timed out".into())));
                conn.close_sent_ms = Some(now);
            }
            Phase::Open => {
                if conn.token_expiry_ms.is_some_and(|t| now >= t) {
                    self.core.stats.token_expired.inc();
                    self.core
                        .start_close(conn, close::POLICY_VIOLATION, "token expired");
                    return;
                }
                let cfg = self.core.config.clone();
                if let Some(sent) = conn.ping_sent_ms {
                    if cfg.pong_timeout_ms > 0 && now >= sent.saturating_add(cfg.pong_timeout_ms) {
                        self.core
                            .start_close(conn, close::GOING_AWAY, "no pong received");
                        return;
                    }
                }
                if cfg.idle_timeout_ms > 0
                    && now >= conn.last_message_ms.saturating_add(cfg.idle_timeout_ms)
                {
                    self.core
                        .start_close(conn, close::GOING_AWAY, "idle timeout");
                    return;
                }
                if cfg.ping_interval_ms > 0
                    && conn.ping_sent_ms.is_none()
                    && now >= conn.last_rx_ms.saturating_add(cfg.ping_interval_ms)
                {
                    let ping = self.core.encode(OpCode::Ping, b"");
                    conn.queue(ping);
                    conn.ping_sent_ms = Some(now);
                }
            }
        }
    }

    /// Take the reloaded configuration: new limits reach every decoder from its next frame.
    fn apply_reload(&mut self) {
        let reloaded = self
            .core
            .shared
            .reloaded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some((config, routes)) = reloaded else {
            return;
        };
        // Route ids are indexes into the table: find each open connection's route again by
        // its pattern. A connection whose route is gone is closed 1001.
        let mut gone = Vec::new();
        for (slot, s) in self.slots.iter_mut().enumerate() {
            let Some(conn) = s.conn.as_mut() else {
                continue;
            };
            let pattern = &self.core.routes.route(conn.route).path;
            let probe = match pattern.strip_suffix("/*") {
                Some("") => "/",
                Some(prefix) => prefix,
                None => pattern,
            };
            match routes.match_path(probe) {
                Some((id, route)) => {
                    conn.route = id;
                    conn.decoder
                        .set_limits(route_limits(&config, route.max_fragments));
                }
                None => {
                    // Route 0 always exists; a connection still handshaking gets its route then.
                    conn.route = 0;
                    conn.decoder.set_limits(config.message_limits());
                    if conn.is_open() {
                        gone.push(slot as u32);
                    }
                }
            }
        }
        self.core
            .ip_limiter
            .set_limits(config.ip_limits.per_core(self.core.workers));
        self.core.config = config;
        self.core.routes = routes;
        for &slot in &gone {
            let conn = self.slots[slot as usize]
                .conn
                .as_mut()
                .expect("listed above");
            tracing::info!(conn = %conn.id, "route removed by reload: closing 1001");
            self.core
                .close_after_replies(conn, close::GOING_AWAY, "route removed");
            self.after_event(slot);
        }
        tracing::debug!(core = self.index, "configuration reloaded");
    }

    // ----- shutdown -----

    fn begin_drain(&mut self) {
        let deadline = self
            .core
            .now_ms
            .saturating_add(self.core.config.shutdown_grace_ms);
        self.draining = Some(deadline);
        if self.accept_armed {
            let sqe = opcode::AsyncCancel::new(user_data(OP_ACCEPT, 0, 0))
                .build()
                .user_data(user_data(OP_CANCEL, 0, 0));
            self.push(sqe);
        }
        // Closing our listener makes the kernel send new connections to no one on this core;
        // the ring keeps its own reference until the accept is cancelled.
        self.listener = None;
        for slot in 0..self.slots.len() as u32 {
            let Some(conn) = self.slots[slot as usize].conn.as_mut() else {
                continue;
            };
            if conn.shut {
                continue;
            }
            if conn.is_open() && !conn.close_after_flush {
                self.core
                    .start_close(conn, close::GOING_AWAY, "server shutting down");
            } else if !conn.is_open() {
                self.shut(slot);
            }
            // Deadlines moved: the wheel must look at this connection by the drain deadline.
            if let Some(conn) = self.slots[slot as usize].conn.as_mut() {
                conn.wheel_at = None;
            }
            self.after_event(slot);
        }
        tracing::info!(
            core = self.index,
            open = self.live,
            "draining: sent 1001 to every client"
        );
    }

    fn force_close_all(&mut self) {
        for slot in 0..self.slots.len() as u32 {
            if self.slots[slot as usize].conn.is_some() {
                self.shut(slot);
                self.after_event(slot);
            }
        }
    }
}

fn unsubscribe(topics: &mut HashMap<Topic, Vec<u32>>, topic: &Topic, slot: u32) {
    if let Some(slots) = topics.get_mut(topic) {
        if let Some(i) = slots.iter().position(|&s| s == slot) {
            slots.swap_remove(i);
        }
        if slots.is_empty() {
            topics.remove(topic);
        }
    }
}

/// The connection in `slot` if it is still the same generation.
fn conn_in(slots: &mut [Slot], slot: u32, generation: u32) -> Option<&mut Connection> {
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

/// Wall-clock Unix seconds, for token expiry (the loop's clock is monotonic).
fn unix_now_s() -> u64 {
    unix_now_ms() / 1000
}

/// Wall-clock Unix milliseconds, to turn a token's expiry into a deadline on the loop's clock.
fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The client's address, for the backend's `open` event.
fn peer_addr(fd: RawFd) -> Option<std::net::SocketAddr> {
    // SAFETY: fd is a live socket owned by the connection for the duration of this call.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    socket2::SockRef::from(&borrowed)
        .peer_addr()
        .ok()?
        .as_socket()
}

fn set_nodelay(fd: RawFd) {
    let one: libc::c_int = 1;
    // SAFETY: fd is a TCP socket we own; the option value points at a live c_int of the
    // length given.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        tracing::debug!("TCP_NODELAY failed: {}", io::Error::last_os_error());
    }
}

/// A connection's message limits once its route is known: the route sets the fragments.
fn route_limits(config: &Config, max_fragments: u32) -> Limits {
    Limits {
        max_fragments,
        ..config.message_limits()
    }
}

fn opcode_for(kind: MessageKind) -> OpCode {
    match kind {
        MessageKind::Text => OpCode::Text,
        MessageKind::Binary => OpCode::Binary,
    }
}

/// When the wheel must next look at `conn`, given where it is in its life.
fn next_deadline(conn: &Connection, config: &Config, draining: Option<u64>) -> Option<u64> {
    if conn.shut {
        return None;
    }
    if let Some(t) = conn.wr_shut_ms.or(conn.fence_ms) {
        return Some(t.saturating_add(config.close_linger_ms));
    }
    if conn.close_sent_ms.is_some() || conn.close_after_flush {
        let linger = conn
            .close_sent_ms
            .unwrap_or(conn.last_rx_ms)
            .saturating_add(config.close_linger_ms);
        return Some(match draining {
            Some(d) if conn.is_open() && !conn.close.close_received() => d.max(linger),
            _ => linger,
        });
    }
    match conn.phase {
        Phase::Handshake(_) => Some(conn.accepted_ms.saturating_add(config.handshake_timeout_ms)),
        Phase::Authorizing { until_ms, .. } => Some(until_ms),
        Phase::Open => {
            let mut at: Option<u64> = None;
            let mut consider = |t: u64| at = Some(at.map_or(t, |a| a.min(t)));
            if config.ping_interval_ms > 0 {
                match conn.ping_sent_ms {
                    Some(sent) if config.pong_timeout_ms > 0 => {
                        consider(sent.saturating_add(config.pong_timeout_ms))
                    }
                    Some(_) => {}
                    None => consider(conn.last_rx_ms.saturating_add(config.ping_interval_ms)),
                }
            }
            if config.idle_timeout_ms > 0 {
                consider(conn.last_message_ms.saturating_add(config.idle_timeout_ms));
            }
            if let Some(t) = conn.token_expiry_ms {
                consider(t);
            }
            at
        }
    }
}

/// What processing a connection's bytes needs from its core, kept apart from the connection
/// slab and the buffer ring so both can be borrowed at once.
struct Core {
    workers: usize,
    config: Arc<Config>,
    /// This core's share of the per-IP limits.
    ip_limiter: PerIpLimiter,
    routes: Arc<RouteTable>,
    /// simd-json parses in place: messages are routed on a copy.
    scratch: Vec<u8>,
    shared: Arc<Shared>,
    relay: Option<RelayTx>,
    relay_backlog: VecDeque<ToUpstream>,
    /// Bytes of this core's client messages the relay has not let go of (core backlog,
    /// channel, relay thread): limit `CORE_RELAY_IN_FLIGHT`, charged in `publish_memory`.
    relay_in_flight: Arc<std::sync::atomic::AtomicUsize>,
    stats: Arc<CoreStats>,
    now_ms: u64,
    /// Bytes its connections hold (`Connection::footprint`), and how much of that the
    /// shared total already includes.
    charged: u64,
    published: u64,
    /// Refusing for the memory budget: logged once when it starts and once when it ends.
    over_budget: bool,
    /// Test-only (`RINGWAY_TEST_PANIC_ON`): a text message equal to these bytes, or a
    /// handshake for `/__panic`, panics, to exercise panic containment.
    panic_on: Option<Vec<u8>>,
}

impl Core {
    /// Bring the shared total up to date with this core's connections; once per loop turn.
    fn publish_memory(&mut self) {
        let total = self.total();
        if total != self.published {
            if total > self.published {
                self.shared
                    .buffer_bytes
                    .fetch_add(total - self.published, Ordering::Relaxed);
            } else {
                self.shared
                    .buffer_bytes
                    .fetch_sub(self.published - total, Ordering::Relaxed);
            }
            self.published = total;
            self.stats.buffer_bytes.set(total);
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

    /// Encode a server frame into an allocation of its own, sized to the frame: a queued
    /// tiny frame pins its few bytes (charged with `connection::ENTRY_BYTES`), never a
    /// shared arena chunk.
    fn encode(&mut self, opcode: OpCode, payload: &[u8]) -> Bytes {
        let mut buf = BytesMut::with_capacity(MAX_HEADER_LEN + payload.len());
        frame::write_server_frame(&mut buf, true, opcode, payload);
        buf.freeze()
    }

    /// Bytes this core holds for its clients: connection footprints plus relay in-flight.
    fn total(&self) -> u64 {
        self.charged + self.relay_in_flight.load(Ordering::Relaxed) as u64
    }

    /// Whether a connection must stop being read: its outbound queue is over
    /// `send_queue_bytes`, or it (or its core) has too much in flight to the relay.
    fn must_pause(&self, conn: &Connection) -> bool {
        conn.queued_cost() > self.config.send_queue_bytes
            || conn.relay_in_flight.load(Ordering::Relaxed)
                > super::connection::relay_in_flight_limit(self.config.max_message_bytes as usize)
            || self.relay_in_flight.load(Ordering::Relaxed) > CORE_RELAY_IN_FLIGHT
    }

    /// Whether a paused connection may be read again (with hysteresis on the relay counts).
    fn may_resume(&self, conn: &Connection) -> bool {
        self.relay_backlog.is_empty()
            && conn.queued_cost() <= self.config.send_queue_bytes
            && conn.relay_in_flight.load(Ordering::Relaxed)
                <= super::connection::relay_in_flight_limit(self.config.max_message_bytes as usize)
                    / 2
            && self.relay_in_flight.load(Ordering::Relaxed) <= CORE_RELAY_IN_FLIGHT / 2
    }

    /// Close a connection 1008 "server memory budget" and let go of what it holds now:
    /// its unsent queue (what the kernel is sending stays) and its message assembly.
    fn shed(&mut self, conn: &mut Connection) {
        self.stats.memory_shed.inc();
        tracing::warn!(conn = %conn.id, holds = conn.holds(), "over the memory budget: closing the largest holder 1008");
        let keep = if conn.send_in_flight { conn.sending } else { 0 };
        conn.out.truncate(keep);
        conn.out_bytes = conn.out.iter().map(Bytes::len).sum();
        conn.pong_queued = false;
        conn.decoder = MessageDecoder::new(Role::Server, self.config.message_limits());
        conn.reading_done = true;
        conn.closing_without_reply = true;
        conn.close_after_flush = true;
        self.start_close(conn, close::POLICY_VIOLATION, "server memory budget");
        if conn.close.close_sent() {
            conn.close_after_flush = true;
        }
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

    /// A single message larger than the cap is still sent when nothing else is queued: the
    /// cap is for clients that do not read, not a second message size limit.
    fn queue_data(&mut self, conn: &mut Connection, frame: Bytes) {
        if conn.out_bytes > 0
            && conn.queued_cost() + frame.len() + super::connection::ENTRY_BYTES
                > self.config.send_queue_bytes
        {
            tracing::debug!(conn = %conn.id, queued = conn.out_bytes, "slow consumer");
            self.stats.overflow_closed.inc();
            self.start_close(conn, close::POLICY_VIOLATION, "slow consumer");
            return;
        }
        self.stats.messages_out.inc();
        conn.queue(frame);
    }

    /// Queue a topic or broadcast frame, applying the slow-consumer policy on overflow.
    fn queue_fanout(&mut self, conn: &mut Connection, frame: Bytes) {
        let full = conn.out_bytes > 0
            && conn.queued_cost() + frame.len() + super::connection::ENTRY_BYTES
                > self.config.send_queue_bytes;
        if full && self.routes.route(conn.route).slow_consumer == SlowConsumer::DropNewest {
            self.stats.overflow_dropped.inc();
            return;
        }
        self.queue_data(conn, frame);
    }

    /// Send our close frame (once) and wait for the client's, up to the linger time.
    /// End the connection because of what the client sent (a protocol error, or its close):
    /// read nothing more, send our close once the replies to its earlier messages are queued,
    /// and drop TCP after it. Through the relay that means a fence: the relay hands the close
    /// back after every reply it had already passed on.
    fn close_after_replies(&mut self, conn: &mut Connection, code: u16, reason: &str) {
        conn.reading_done = true;
        conn.closing_without_reply = true;
        if self.relay.is_some() && conn.counted_open {
            if conn.fence_ms.is_none() {
                conn.fence_ms = Some(self.now_ms);
                self.send_to_relay(ToUpstream::Fence {
                    conn: conn.id,
                    code,
                    reason: reason.to_string(),
                });
            }
        } else {
            self.start_close(conn, code, reason);
            conn.close_after_flush = true;
        }
    }

    /// End the connection for the client's protocol error or a refused message: queue the
    /// close frame (code and reason) at once, read nothing more, and tell the relay it is
    /// closed (after everything already sent for it); TCP goes after the client's answer or
    /// the linger time. Unlike a fence, replies the backend had not yet sent are not waited
    /// for (docs/relay-protocol.md, "Closing").
    fn close_for_error(&mut self, conn: &mut Connection, code: u16, reason: &str) {
        conn.reading_done = true;
        conn.closing_without_reply = true;
        self.start_close(conn, code, reason);
        conn.close_after_flush = true;
        if self.relay.is_some() && conn.counted_open {
            self.send_to_relay(ToUpstream::Closed {
                conn: conn.id,
                code,
            });
            self.release_open(conn);
        }
    }

    /// The relay handed back a close, a fence's or a backend's.
    fn on_relay_close(&mut self, conn: &mut Connection, code: u16, reason: &str) {
        let fenced = conn.fence_ms.take().is_some();
        // A backend may not put a reserved code on the wire (RFC 6455 §7.4.1); echoing the
        // client's own code-less close (1005) is the one exception.
        // 1012-1014 (restart, try again later, bad gateway) are registered since RFC 6455 and
        // are what a gateway says; clients may not send them (Autobahn 7.9), we may.
        let ours = (1012..=1014).contains(&code);
        let code =
            if close::is_valid_wire_code(code) || ours || (fenced && code == close::NO_STATUS) {
                code
            } else {
                close::INTERNAL_ERROR
            };
        self.start_close(conn, code, reason);
        if fenced && conn.closing_without_reply {
            conn.close_after_flush = true;
        }
    }

    fn start_close(&mut self, conn: &mut Connection, code: u16, reason: &str) {
        if conn.close.send() {
            let (payload, len) = if code == close::NO_STATUS {
                // Echoing a close that carried no code: ours carries none either.
                ([0; frame::MAX_CONTROL_PAYLOAD], 0)
            } else {
                frame::close_payload(code, reason)
            };
            let f = self.encode(OpCode::Close, &payload[..len]);
            conn.queue(f);
            conn.close_code = code;
            conn.close_sent_ms = Some(self.now_ms);
        }
        if conn.close.is_done() {
            conn.close_after_flush = true;
        }
    }

    fn on_bytes(&mut self, conn: &mut Connection, data: &mut [u8]) {
        match &mut conn.phase {
            Phase::Handshake(buf) => {
                buf.extend_from_slice(data);
                let mut request_bytes = std::mem::take(buf);
                self.on_handshake_bytes(conn, &mut request_bytes);
            }
            Phase::Authorizing { rest, .. } => {
                // Frames pipelined before the 101; bounded like one message.
                if rest.len() + data.len() > self.config.max_message_bytes as usize + 14 {
                    conn.reading_done = true;
                    conn.close_after_flush = true;
                    conn.out.clear();
                    conn.out_bytes = 0;
                } else {
                    rest.extend_from_slice(data);
                }
            }
            Phase::Open => self.on_frames(conn, data),
        }
    }

    fn on_handshake_bytes(&mut self, conn: &mut Connection, buf: &mut BytesMut) {
        match handshake::parse_request(buf, &self.config.handshake_limits()) {
            Ok(Parsed::Partial) => conn.phase = Phase::Handshake(std::mem::take(buf)),
            Err(e) => self.refuse(conn, e.response(), &e),
            Ok(Parsed::Complete { request, consumed }) => {
                if self.panic_on.is_some() && request.path == "/__panic" {
                    // The message quotes input, as a real panic's might: it must not be logged.
                    panic!("test hook: handshake with {:?}", request.headers);
                }
                let routes = self.routes.clone();
                let admitted = match admission::admit(&request, &routes, unix_now_s()) {
                    Ok(admitted) => admitted,
                    Err(refusal) => {
                        self.count_refusal(&refusal);
                        self.refuse(conn, refusal.response(), &refusal);
                        return;
                    }
                };
                let route_id = admitted.route_id;
                let route = routes.route(route_id);
                let policy = routes.policy(route_id);
                // Its place under max_connections was taken at accept (`count_toward_limit`).
                conn.counted_open = true;
                conn.route = route_id;
                conn.decoder
                    .set_limits(route_limits(&self.config, route.max_fragments));
                let authorize = route.authorize && self.relay.is_some();
                conn.rate = MessageRate::new(policy.messages_per_sec, policy.message_burst);
                conn.protocol = admitted.protocol;
                conn.token_expiry_ms = admitted
                    .token_expiry_s
                    .map(|s| admission::expiry_deadline_ms(s, self.now_ms, unix_now_ms()));
                let info = OpenInfo {
                    path: request.path.clone(),
                    query: admitted.query,
                    headers: admitted.headers,
                    peer: peer_addr(conn.fd),
                    authorize,
                };
                self.send_to_relay(ToUpstream::Open {
                    conn: conn.id,
                    upstream: route.upstream,
                    info: Box::new(info),
                });
                let rest = buf.split_off(consumed);
                if authorize {
                    // Hold the handshake until the backend answers accept or reject.
                    conn.phase = Phase::Authorizing {
                        request: Box::new(request),
                        rest,
                        until_ms: self.now_ms.saturating_add(route.authorize_timeout_ms),
                    };
                } else {
                    self.complete_handshake(conn, &request, rest);
                }
            }
        }
    }

    /// Send 101 and start reading frames, beginning with any the client pipelined.
    fn complete_handshake(
        &mut self,
        conn: &mut Connection,
        request: &handshake::Request,
        mut rest: BytesMut,
    ) {
        self.stats.handshakes_ok.inc();
        conn.queue(handshake::response_101(request, conn.protocol.as_deref()));
        conn.phase = Phase::Open;
        conn.last_message_ms = self.now_ms;
        tracing::debug!(conn = %conn.id, path = %request.path, "open");
        if !rest.is_empty() {
            self.on_frames(conn, &mut rest);
        }
    }

    /// Count a handshake refused by the admission policy under its metric.
    fn count_refusal(&self, refusal: &admission::Refusal) {
        match refusal {
            admission::Refusal::Origin => self.stats.origin_refused.inc(),
            admission::Refusal::Auth(_) => self.stats.auth_failed.inc(),
            admission::Refusal::NoRoute => {}
        }
    }

    /// Answer the handshake with an HTTP error and close after it.
    fn refuse(&mut self, conn: &mut Connection, response: Bytes, why: &dyn std::fmt::Display) {
        tracing::debug!(conn = %conn.id, "handshake refused: {why}");
        self.stats.handshakes_rejected.inc();
        conn.queue(response);
        conn.reading_done = true;
        conn.close_after_flush = true;
    }

    /// The backend's answer to a held handshake.
    fn on_authorization(&mut self, conn: &mut Connection, verdict: Result<(), (u16, String)>) {
        let Phase::Authorizing { .. } = conn.phase else {
            return;
        };
        let Phase::Authorizing { request, rest, .. } =
            std::mem::replace(&mut conn.phase, Phase::Open)
        else {
            unreachable!()
        };
        match verdict {
            Ok(()) => self.complete_handshake(conn, &request, rest),
            Err((status, reason)) => {
                // Only refusals make sense here; anything else from a backend is its bug.
                let status = if matches!(status, 401 | 403 | 503) {
                    status
                } else {
                    403
                };
                conn.phase = Phase::Handshake(BytesMut::new());
                self.refuse(
                    conn,
                    handshake::error_response(status, &reason, &[]),
                    &reason,
                );
                self.send_to_relay(ToUpstream::Closed {
                    conn: conn.id,
                    code: close::POLICY_VIOLATION,
                });
                self.release_open(conn);
            }
        }
    }

    /// The relay was told `Closed`: it must not hear of this connection again. Its place
    /// under max_connections stays taken until its slot is freed.
    fn release_open(&mut self, conn: &mut Connection) {
        conn.counted_open = false;
    }

    /// Take a place under `max_connections` for a connection just accepted (handshaking
    /// connections count); false, and nothing taken, when every place is taken.
    fn count_toward_limit(&mut self, conn: &mut Connection) -> bool {
        let open = self.shared.open.fetch_add(1, Ordering::Relaxed);
        if open >= self.config.max_connections {
            self.shared.open.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        conn.counted_limit = true;
        true
    }

    /// Give back the place `count_toward_limit` took, if it took one.
    fn release_limit(&mut self, conn: &mut Connection) {
        if std::mem::take(&mut conn.counted_limit) {
            self.shared.open.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Decode frames where they lie, unmasking in place, and act on each event.
    fn on_frames(&mut self, conn: &mut Connection, data: &mut [u8]) {
        let mut off = 0;
        while off < data.len() && !conn.reading_done {
            let accepts_data = conn.close.accepts_data();
            let (n, event) = match conn.decoder.decode(&mut data[off..]) {
                Ok(r) => r,
                Err(e) => {
                    self.stats.protocol_errors.inc();
                    if let ProtocolError::TooManyFragments { .. } = e {
                        self.stats.fragment_limited.inc();
                    }
                    tracing::debug!(conn = %conn.id, "protocol error: {e}");
                    let reason = e.to_string();
                    self.close_for_error(conn, e.close_code(), &reason);
                    return;
                }
            };
            off += n;
            let Some(event) = event else { break };
            let action = match event {
                Event::Message {
                    kind: MessageKind::Text,
                    payload,
                } if self.panic_on.as_deref() == Some(payload.as_slice()) => {
                    panic!("test hook: message {:?}", payload.as_slice())
                }
                Event::Message { .. }
                    if conn
                        .rate
                        .as_mut()
                        .is_some_and(|r| !r.on_message(self.now_ms)) =>
                {
                    self.stats.rate_limited.inc();
                    Action::Refuse("message rate exceeded".into())
                }
                Event::Message { kind, payload } => {
                    self.stats.messages_in.inc();
                    if !accepts_data {
                        Action::None
                    } else {
                        match self.config.upstream {
                            Upstream::LocalEcho => {
                                Action::Data(self.encode(opcode_for(kind), payload.as_slice()))
                            }
                            _ => {
                                let route = self.routes.route(conn.route);
                                match self.routes.select(
                                    route,
                                    kind,
                                    payload.as_slice(),
                                    &mut self.scratch,
                                ) {
                                    Ok(upstream) => {
                                        let payload = payload.into_bytes();
                                        // Relay in-flight: limit `relay_in_flight_limit` per
                                        // connection, `CORE_RELAY_IN_FLIGHT` per core;
                                        // charged until the relay drops the guard.
                                        let guard = super::connection::InFlight::new(
                                            &conn.relay_in_flight,
                                            &self.relay_in_flight,
                                            payload.len() + RELAY_ENTRY_BYTES,
                                        );
                                        Action::Relay(ToUpstream::Message {
                                            conn: conn.id,
                                            upstream,
                                            kind,
                                            payload,
                                            guard,
                                        })
                                    }
                                    Err(e) => Action::Refuse(e.to_string()),
                                }
                            }
                        }
                    }
                }
                Event::Ping(p) if !conn.close.close_sent() => {
                    Action::Control(self.encode(OpCode::Pong, p))
                }
                Event::Ping(_) => Action::None,
                Event::Pong(_) => Action::Pong,
                Event::Close(c) => {
                    let (code, reason) = c.map_or((close::NO_STATUS, String::new()), |(c, r)| {
                        (c, r.to_string())
                    });
                    Action::Close(code, reason)
                }
            };
            match action {
                Action::None => {}
                Action::Data(frame) => {
                    conn.last_message_ms = self.now_ms;
                    self.queue_data(conn, frame);
                }
                Action::Relay(msg) => {
                    conn.last_message_ms = self.now_ms;
                    if !self.send_to_relay(msg) || self.must_pause(conn) {
                        // The relay is behind, or this client has too much in flight to it:
                        // stop reading this client until it catches up.
                        conn.wants_pause = true;
                    }
                }
                Action::Refuse(reason) => {
                    self.stats.protocol_errors.inc();
                    tracing::debug!(conn = %conn.id, "message refused: {reason}");
                    self.close_for_error(conn, close::POLICY_VIOLATION, &reason);
                    return;
                }
                Action::Control(frame) => {
                    // Only the newest unanswered pong is kept (RFC 6455 §5.5.3); a queue over
                    // `send_queue_bytes` stops reading (`after_event`).
                    conn.queue_pong(frame, PONG_COALESCE_PAST);
                }
                Action::Pong => conn.ping_sent_ms = None,
                Action::Close(code, reason) => {
                    tracing::debug!(conn = %conn.id, code, reason = %reason, "client sent close");
                    conn.close.receive();
                    conn.close_code = code;
                    // RFC 6455 §5.5.1: answer with a close echoing the status code, after the
                    // replies to what the client sent before it.
                    self.close_after_replies(conn, code, "");
                }
            }
        }
    }
}

enum Action {
    None,
    Refuse(String),
    Data(Bytes),
    Relay(ToUpstream),
    Control(Bytes),
    Pong,
    Close(u16, String),
}
