//! The load engine. Each thread drives its share of the connections as nonblocking sockets
//! on one edge-triggered epoll (mio): connect, upgrade, send, check every reply, close. No
//! locks or allocation per message; sends are corked into one write per connection per wake.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use ringway::protocol::frame::{write_client_frame, OpCode, Role};
use ringway::protocol::message::{Event, Limits, MessageDecoder, MessageKind};
use socket2::{Domain, Protocol, Socket, Type};

use crate::payload::{xorshift, PayloadGen};
use crate::report::{new_histogram, ErrorKind, ErrorTally};
use crate::sys::{now_ns, set_bind_address_no_port, set_timer_slack_ns, TimerFd};
use crate::ws::{self, Target};

/// Not yet published by the coordinating thread.
pub const UNSET: u64 = u64::MAX;
const TIMER: Token = Token(usize::MAX - 1);
const READ_CHUNK: usize = 64 * 1024;
/// Longest a worker sleeps before re-checking the clock and the shared phase.
const TICK_NS: u64 = 50_000_000;
/// How far ahead of time the traffic start is published: more than a tick, so every
/// worker has seen it before it is due.
pub const RUN_START_LEAD_NS: u64 = TICK_NS + 20_000_000;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Traffic {
    /// Closed loop: a reply triggers the next message.
    Echo,
    /// Open loop: this thread's share of the total rate, in messages per second.
    Rate { per_second: f64 },
    /// Connect and hold, answering pings.
    Idle,
}

/// What every worker does, fixed before the run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub target: Target,
    pub in_flight: usize,
    pub size: usize,
    pub binary: bool,
    pub connect_timeout_ns: u64,
    /// Connections per thread between connect() and a valid 101 at any time, so a burst
    /// of SYNs does not overflow the server's listen backlog.
    pub connect_concurrency: usize,
    pub spread_sources: bool,
    pub drain_ns: u64,
    pub close_wait_ns: u64,
    /// Open loop: granularity of the send schedule.
    pub tick_ns: u64,
}

/// Published by the coordinating thread, read by the workers once per wake.
pub struct Shared {
    /// Traffic starts here; set once every connection has opened or failed.
    pub run_start: AtomicU64,
    pub measure_start: AtomicU64,
    pub measure_end: AtomicU64,
    /// Close everything now (idle hold over, or nothing connected).
    pub stop: AtomicBool,
    /// Connections that opened or failed.
    pub settled: AtomicUsize,
    pub opened: AtomicUsize,
    /// Some connect() ran out of ephemeral ports: bind sources from then on.
    pub spreading: AtomicBool,
}

impl Shared {
    pub fn new() -> Self {
        Shared {
            run_start: AtomicU64::new(UNSET),
            measure_start: AtomicU64::new(UNSET),
            measure_end: AtomicU64::new(UNSET),
            stop: AtomicBool::new(false),
            settled: AtomicUsize::new(0),
            opened: AtomicUsize::new(0),
            spreading: AtomicBool::new(false),
        }
    }

    /// Publish the schedule; workers see `run_start` last, so the window is set by then.
    pub fn start(&self, run_start: u64, measure_start: u64, measure_end: u64) {
        self.measure_start.store(measure_start, Ordering::Relaxed);
        self.measure_end.store(measure_end, Ordering::Relaxed);
        self.run_start.store(run_start, Ordering::Release);
    }
}

pub struct WorkerOutput {
    pub hist: Histogram<u64>,
    pub messages: u64,
    pub errors: ErrorTally,
    /// Open loop: how late the tool itself queued each measured message after its
    /// scheduled time (its own timer and CPU lag, not the server's).
    pub send_lag: Histogram<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Connecting,
    Handshaking,
    Open,
    Closing,
}

struct Conn {
    stream: TcpStream,
    id: u32,
    state: State,
    since: u64,
    key: String,
    hs: Vec<u8>,
    dec: MessageDecoder,
    wbuf: BytesMut,
    gen: PayloadGen,
    /// Next sequence number to send.
    next_seq: u64,
    /// Sequence number the next reply must carry.
    recv_seq: u64,
    /// Send (echo) or scheduled (rate) time of each message from `recv_seq` on: the first
    /// `next_seq - recv_seq` are on the wire, the rest wait for the in-flight cap.
    times: VecDeque<u64>,
    dirty: bool,
    token: Token,
    /// Registered for writability: only while a write is pending, so that the ACKs of
    /// every message do not wake the loop.
    want_write: bool,
}

type Failure = (ErrorKind, String);

enum Flow {
    Keep,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Setup,
    Running,
    Draining { deadline: u64 },
    Closing { deadline: u64 },
}

/// Everything but the connection table, so a connection and the counters can be borrowed
/// mutably together.
struct Ctx<'a> {
    plan: &'a Plan,
    registry: mio::Registry,
    shared: &'a Shared,
    traffic: Traffic,
    rng: u64,
    hist: Histogram<u64>,
    messages: u64,
    errors: ErrorTally,
    send_lag: Histogram<u64>,
    running: bool,
    ms: u64,
    me: u64,
    connecting: usize,
}

impl Ctx<'_> {
    /// Echo counts replies received in the window; rate counts messages scheduled in it,
    /// whenever their replies come, so a late reply cannot leave the sample.
    fn record(&mut self, sent_at: u64, now: u64) {
        let t = match self.traffic {
            Traffic::Rate { .. } => sent_at,
            _ => now,
        };
        if t >= self.ms && t < self.me {
            self.hist
                .saturating_record(now.saturating_sub(sent_at).max(1));
            self.messages += 1;
        }
    }
}

/// Open-loop schedule: slot k is due at start + k * interval, round-robin over connections.
struct Scheduler {
    start: u64,
    interval_ns: f64,
    tick_ns: u64,
    k: u64,
    rr: usize,
    end: u64,
}

impl Scheduler {
    /// Slots are rounded up to whole ticks, so messages go out in small bursts on one
    /// wake-up per tick rather than one wake-up each (a wake-up costs far more CPU than a
    /// send); latency still counts from the rounded slot.
    fn slot(&self) -> u64 {
        let t = (self.k as f64 * self.interval_ns) as u64;
        self.start + t.div_ceil(self.tick_ns) * self.tick_ns
    }
}

pub struct Worker<'a> {
    ctx: Ctx<'a>,
    conns: Vec<Option<Conn>>,
    ids: Vec<u32>,
    pending: VecDeque<usize>,
    live: usize,
    scratch: Vec<u8>,
    dirty: Vec<usize>,
    poll: Poll,
    src_next: usize,
}

impl<'a> Worker<'a> {
    pub fn new(
        plan: &'a Plan,
        shared: &'a Shared,
        traffic: Traffic,
        index: usize,
        ids: Vec<u32>,
    ) -> io::Result<Self> {
        let n = ids.len();
        let poll = Poll::new()?;
        Ok(Worker {
            ctx: Ctx {
                plan,
                registry: poll.registry().try_clone()?,
                shared,
                traffic,
                rng: 0x2545_F491_4F6C_DD1D ^ ((index as u64 + 1) << 32) ^ now_ns(),
                hist: new_histogram(),
                messages: 0,
                errors: ErrorTally::default(),
                send_lag: new_histogram(),
                running: false,
                ms: UNSET,
                me: UNSET,
                connecting: 0,
            },
            conns: (0..n).map(|_| None).collect(),
            ids,
            pending: (0..n).collect(),
            live: 0,
            scratch: vec![0; READ_CHUNK],
            dirty: Vec::new(),
            poll,
            src_next: index * 37,
        })
    }

    pub fn run(mut self) -> io::Result<WorkerOutput> {
        let timer = match self.ctx.traffic {
            Traffic::Rate { .. } => {
                set_timer_slack_ns(1_000)?;
                let t = TimerFd::new()?;
                self.poll.registry().register(
                    &mut SourceFd(&t.raw_fd()),
                    TIMER,
                    Interest::READABLE,
                )?;
                Some(t)
            }
            _ => None,
        };
        let mut sched: Option<Scheduler> = None;
        let mut events = Events::with_capacity(1024);
        let mut phase = Phase::Setup;
        let mut next_sweep = 0;
        loop {
            if phase == Phase::Setup {
                self.open_more();
            }
            let now = now_ns();
            let until = match phase {
                Phase::Setup => now + TICK_NS,
                Phase::Running if self.ctx.traffic != Traffic::Idle => self.ctx.me,
                Phase::Running => now + TICK_NS,
                Phase::Draining { deadline } | Phase::Closing { deadline } => deadline,
            };
            let wait = until.saturating_sub(now).clamp(1, TICK_NS);
            match self
                .poll
                .poll(&mut events, Some(Duration::from_nanos(wait)))
            {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            for ev in events.iter() {
                if ev.token() == TIMER {
                    if let Some(t) = &timer {
                        t.clear();
                    }
                    continue;
                }
                let readable = ev.is_readable() || ev.is_read_closed() || ev.is_error();
                let writable = ev.is_writable() || ev.is_error();
                self.handle(ev.token().0, readable, writable, now_ns());
            }
            let now = now_ns();
            let stop = self.ctx.shared.stop.load(Ordering::Relaxed);
            let was_running = phase == Phase::Running;
            phase = match phase {
                Phase::Setup if stop => self.begin_closing(now),
                Phase::Setup => {
                    // Published ahead of time (see `RUN_START_LEAD_NS`), so the first slot of
                    // an open-loop schedule is not late just because this thread was asleep.
                    let rs = self.ctx.shared.run_start.load(Ordering::Acquire);
                    if rs != UNSET {
                        self.ctx.ms = self.ctx.shared.measure_start.load(Ordering::Relaxed);
                        self.ctx.me = self.ctx.shared.measure_end.load(Ordering::Relaxed);
                        self.ctx.running = true;
                        match self.ctx.traffic {
                            Traffic::Echo => self.start_echo(now),
                            Traffic::Rate { per_second } => {
                                sched = Some(Scheduler {
                                    start: rs,
                                    interval_ns: 1e9 / per_second,
                                    tick_ns: self.ctx.plan.tick_ns.max(1),
                                    k: 0,
                                    rr: 0,
                                    end: self.ctx.me,
                                })
                            }
                            Traffic::Idle => {}
                        }
                        Phase::Running
                    } else {
                        if now >= next_sweep {
                            self.sweep_timeouts(now);
                            next_sweep = now + TICK_NS;
                        }
                        Phase::Setup
                    }
                }
                Phase::Running if stop => self.begin_closing(now),
                Phase::Running => {
                    if self.ctx.traffic != Traffic::Idle && now >= self.ctx.me {
                        Phase::Draining {
                            deadline: self.ctx.me + self.ctx.plan.drain_ns,
                        }
                    } else {
                        Phase::Running
                    }
                }
                Phase::Draining { deadline } => {
                    let idle = self
                        .conns
                        .iter()
                        .flatten()
                        .all(|c| c.state != State::Open || c.times.is_empty());
                    if idle || stop {
                        self.begin_closing(now)
                    } else if now >= deadline {
                        self.note_unanswered();
                        self.begin_closing(now)
                    } else {
                        phase
                    }
                }
                Phase::Closing { deadline } => {
                    if now >= deadline {
                        // The server did not answer our close in time; just drop TCP.
                        for slot in &mut self.conns {
                            *slot = None;
                        }
                        self.live = 0;
                    }
                    phase
                }
            };
            // Every slot due before the end is queued, also on the wake that ends the run.
            if phase == Phase::Running || (was_running && matches!(phase, Phase::Draining { .. })) {
                if let (Some(s), Some(t)) = (sched.as_mut(), timer.as_ref()) {
                    let now = now_ns();
                    if let Some(next) = self.fire(s, now) {
                        t.fire_in(next.saturating_sub(now))?;
                    }
                }
            }
            self.flush_dirty();
            if matches!(phase, Phase::Closing { .. }) && self.live == 0 {
                break;
            }
        }
        Ok(WorkerOutput {
            hist: self.ctx.hist,
            messages: self.ctx.messages,
            errors: self.ctx.errors,
            send_lag: self.ctx.send_lag,
        })
    }

    fn source(&mut self) -> Option<Ipv4Addr> {
        let plan = self.ctx.plan;
        if plan.spread_sources || self.ctx.shared.spreading.load(Ordering::Relaxed) {
            let k = self.src_next;
            self.src_next += 1;
            Some(Ipv4Addr::new(127, 0, 0, 2 + (k % 253) as u8))
        } else {
            None
        }
    }

    fn open_more(&mut self) {
        while self.ctx.connecting < self.ctx.plan.connect_concurrency {
            let Some(local) = self.pending.pop_front() else {
                return;
            };
            let id = self.ids[local];
            let src = self.source();
            let addr = self.ctx.plan.target.addr;
            let res = match connect(addr, src) {
                Err(e) if src.is_none() && e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {
                    // Ephemeral ports toward the server are used up: spread sources.
                    self.ctx.shared.spreading.store(true, Ordering::Relaxed);
                    let src = self.source();
                    connect(addr, src)
                }
                r => r,
            };
            let mut stream = match res.and_then(|mut s| {
                self.poll.registry().register(
                    &mut s,
                    Token(local),
                    Interest::READABLE | Interest::WRITABLE,
                )?;
                Ok(s)
            }) {
                Ok(s) => s,
                Err(e) => {
                    self.ctx
                        .errors
                        .note(ErrorKind::Connect, 1, format!("conn {id}: connect: {e}"));
                    self.ctx.shared.settled.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            };
            let _ = &mut stream;
            let plan = self.ctx.plan;
            let max = plan.size.max(1024) as u64;
            self.conns[local] = Some(Conn {
                stream,
                id,
                state: State::Connecting,
                since: now_ns(),
                key: ws::new_key(&mut self.ctx.rng),
                hs: Vec::new(),
                dec: MessageDecoder::new(
                    Role::Client,
                    Limits {
                        max_frame: max,
                        max_message: max,
                        max_fragments: 0,
                    },
                ),
                wbuf: BytesMut::new(),
                gen: PayloadGen::new(plan.size, plan.binary, id as u64 + 1),
                next_seq: 0,
                recv_seq: 0,
                times: VecDeque::new(),
                dirty: false,
                token: Token(local),
                want_write: true,
            });
            self.ctx.connecting += 1;
            self.live += 1;
        }
    }

    fn handle(&mut self, local: usize, readable: bool, writable: bool, now: u64) {
        let Some(c) = self.conns.get_mut(local).and_then(Option::as_mut) else {
            return;
        };
        match drive(&mut self.ctx, &mut self.scratch, c, readable, writable, now) {
            Ok(Flow::Keep) => {}
            Ok(Flow::Done) => self.remove(local),
            Err((kind, msg)) => {
                self.ctx.errors.note(kind, 1, msg);
                self.remove(local);
            }
        }
    }

    fn remove(&mut self, local: usize) {
        if let Some(c) = self.conns[local].take() {
            if matches!(c.state, State::Connecting | State::Handshaking) {
                self.ctx.connecting -= 1;
                self.ctx.shared.settled.fetch_add(1, Ordering::Relaxed);
            }
            self.live -= 1;
        }
    }

    fn sweep_timeouts(&mut self, now: u64) {
        let timeout = self.ctx.plan.connect_timeout_ns;
        for local in 0..self.conns.len() {
            let Some(c) = &self.conns[local] else {
                continue;
            };
            if now.saturating_sub(c.since) < timeout {
                continue;
            }
            let failure = match c.state {
                State::Connecting => (
                    ErrorKind::Connect,
                    format!("conn {}: connect timed out", c.id),
                ),
                State::Handshaking => (
                    ErrorKind::Handshake,
                    format!("conn {}: no 101 response in time", c.id),
                ),
                _ => continue,
            };
            self.ctx.errors.note(failure.0, 1, failure.1);
            self.remove(local);
        }
    }

    fn start_echo(&mut self, now: u64) {
        let k = self.ctx.plan.in_flight;
        for local in 0..self.conns.len() {
            if let Some(c) = self.conns[local]
                .as_mut()
                .filter(|c| c.state == State::Open)
            {
                c.times.extend(std::iter::repeat_n(now, k));
                pump(c, k, &mut self.ctx.rng);
                self.mark_dirty(local);
            }
        }
    }

    fn mark_dirty(&mut self, local: usize) {
        if let Some(c) = self.conns[local].as_mut() {
            if !c.dirty {
                c.dirty = true;
                self.dirty.push(local);
            }
        }
    }

    fn flush_dirty(&mut self) {
        let mut dirty = std::mem::take(&mut self.dirty);
        for local in dirty.drain(..) {
            let Some(c) = self.conns[local].as_mut() else {
                continue;
            };
            c.dirty = false;
            if let Err((kind, msg)) = flush(c, &self.ctx.registry) {
                self.ctx.errors.note(kind, 1, msg);
                self.remove(local);
            }
        }
        self.dirty = dirty;
    }

    /// Queue every slot that is due; returns when the next one is, if any is left.
    fn fire(&mut self, s: &mut Scheduler, now: u64) -> Option<u64> {
        let n = self.conns.len();
        loop {
            let slot = s.slot();
            if slot >= s.end {
                return None;
            }
            if slot > now {
                return Some(slot);
            }
            let mut found = None;
            for _ in 0..n {
                let i = s.rr;
                s.rr = (s.rr + 1) % n;
                if self.conns[i]
                    .as_ref()
                    .is_some_and(|c| c.state == State::Open)
                {
                    found = Some(i);
                    break;
                }
            }
            let local = found?;
            let c = self.conns[local].as_mut().expect("checked open above");
            c.times.push_back(slot);
            pump(c, self.ctx.plan.in_flight, &mut self.ctx.rng);
            if slot >= self.ctx.ms {
                self.ctx.send_lag.saturating_record((now - slot).max(1));
            }
            self.mark_dirty(local);
            s.k += 1;
        }
    }

    fn note_unanswered(&mut self) {
        for c in self.conns.iter().flatten() {
            if c.state == State::Open && !c.times.is_empty() {
                self.ctx.errors.note(
                    ErrorKind::Unanswered,
                    c.times.len() as u64,
                    format!(
                        "conn {}: {} messages unanswered from sequence {}",
                        c.id,
                        c.times.len(),
                        c.recv_seq
                    ),
                );
            }
        }
    }

    /// Send a normal close (RFC 6455 §7.1.2) on open connections and give up on the rest.
    fn begin_closing(&mut self, now: u64) -> Phase {
        for local in std::mem::take(&mut self.pending) {
            let id = self.ids[local];
            self.ctx.errors.note(
                ErrorKind::Connect,
                1,
                format!("conn {id}: not attempted before the run ended"),
            );
            self.ctx.shared.settled.fetch_add(1, Ordering::Relaxed);
        }
        for local in 0..self.conns.len() {
            let Some(c) = self.conns[local].as_mut() else {
                continue;
            };
            match c.state {
                State::Open => {
                    let mask = (xorshift(&mut self.ctx.rng) as u32).to_ne_bytes();
                    write_client_frame(
                        &mut c.wbuf,
                        true,
                        OpCode::Close,
                        mask,
                        &1000u16.to_be_bytes(),
                    );
                    c.state = State::Closing;
                    if flush(c, &self.ctx.registry).is_err() {
                        self.remove(local);
                    }
                }
                State::Connecting | State::Handshaking => {
                    let id = c.id;
                    self.ctx.errors.note(
                        ErrorKind::Connect,
                        1,
                        format!("conn {id}: still connecting when the run ended"),
                    );
                    self.remove(local);
                }
                State::Closing => {}
            }
        }
        Phase::Closing {
            deadline: now + self.ctx.plan.close_wait_ns,
        }
    }
}

fn connect(addr: SocketAddr, src: Option<Ipv4Addr>) -> io::Result<TcpStream> {
    let s = Socket::new(
        Domain::IPV4,
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    s.set_nodelay(true)?;
    if let Some(ip) = src {
        set_bind_address_no_port(s.as_raw_fd())?;
        s.bind(&SocketAddr::V4(SocketAddrV4::new(ip, 0)).into())?;
    }
    match s.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(std::net::TcpStream::from(s)))
}

/// Write queued messages while they fit; up to K messages go out in one write.
fn pump(c: &mut Conn, in_flight: usize, rng: &mut u64) {
    let op = if c.gen.is_binary() {
        OpCode::Binary
    } else {
        OpCode::Text
    };
    loop {
        let on_wire = (c.next_seq - c.recv_seq) as usize;
        if on_wire >= in_flight || on_wire >= c.times.len() {
            return;
        }
        let mask = (xorshift(rng) as u32).to_ne_bytes();
        write_client_frame(&mut c.wbuf, true, op, mask, c.gen.with_seq(c.next_seq));
        c.next_seq += 1;
    }
}

fn flush(c: &mut Conn, registry: &mio::Registry) -> Result<(), Failure> {
    write_out(c)?;
    let pending = !c.wbuf.is_empty();
    if pending != c.want_write && c.state != State::Connecting {
        let interest = if pending {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        registry
            .reregister(&mut c.stream, c.token, interest)
            .map_err(|e| (closed_kind(c), format!("conn {}: epoll: {e}", c.id)))?;
        c.want_write = pending;
    }
    Ok(())
}

fn write_out(c: &mut Conn) -> Result<(), Failure> {
    while !c.wbuf.is_empty() {
        match c.stream.write(&c.wbuf) {
            Ok(0) => {
                return Err((
                    ErrorKind::Closed,
                    format!("conn {}: write returned 0", c.id),
                ))
            }
            Ok(n) => c.wbuf.advance(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err((closed_kind(c), format!("conn {}: write: {e}", c.id))),
        }
    }
    Ok(())
}

fn closed_kind(c: &Conn) -> ErrorKind {
    match c.state {
        State::Connecting => ErrorKind::Connect,
        State::Handshaking => ErrorKind::Handshake,
        _ => ErrorKind::Closed,
    }
}

fn drive(
    ctx: &mut Ctx<'_>,
    scratch: &mut [u8],
    c: &mut Conn,
    readable: bool,
    writable: bool,
    now: u64,
) -> Result<Flow, Failure> {
    if c.state == State::Connecting {
        if let Ok(Some(e)) | Err(e) = c.stream.take_error() {
            return Err((ErrorKind::Connect, format!("conn {}: connect: {e}", c.id)));
        }
        match c.stream.peer_addr() {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(Flow::Keep),
            Err(e) => return Err((ErrorKind::Connect, format!("conn {}: connect: {e}", c.id))),
        }
        c.state = State::Handshaking;
        c.since = now;
        c.wbuf
            .extend_from_slice(ws::request(&ctx.plan.target, &c.key).as_bytes());
        flush(c, &ctx.registry)?;
        return handshake_read(ctx, scratch, c, now);
    }
    if writable {
        flush(c, &ctx.registry)?;
    }
    let flow = if !readable {
        Flow::Keep
    } else if c.state == State::Handshaking {
        handshake_read(ctx, scratch, c, now)?
    } else {
        read_frames(ctx, scratch, c, now)?
    };
    flush(c, &ctx.registry)?;
    Ok(flow)
}

fn handshake_read(
    ctx: &mut Ctx<'_>,
    scratch: &mut [u8],
    c: &mut Conn,
    now: u64,
) -> Result<Flow, Failure> {
    loop {
        let n = match c.stream.read(scratch) {
            Ok(0) => {
                return Err((
                    ErrorKind::Handshake,
                    format!("conn {}: closed before the 101 response", c.id),
                ))
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Flow::Keep),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err((ErrorKind::Handshake, format!("conn {}: read: {e}", c.id))),
        };
        c.hs.extend_from_slice(&scratch[..n]);
        let len = match ws::check_101(&c.hs, &c.key) {
            Ok(None) => continue,
            Ok(Some(len)) => len,
            Err(e) => return Err((ErrorKind::Handshake, format!("conn {}: {e}", c.id))),
        };
        c.state = State::Open;
        ctx.connecting -= 1;
        ctx.shared.settled.fetch_add(1, Ordering::Relaxed);
        ctx.shared.opened.fetch_add(1, Ordering::Relaxed);
        let mut rest = std::mem::take(&mut c.hs);
        c.key = String::new();
        if ctx.running && ctx.traffic == Traffic::Echo && now < ctx.me {
            c.times.extend(std::iter::repeat_n(now, ctx.plan.in_flight));
            pump(c, ctx.plan.in_flight, &mut ctx.rng);
        }
        if rest.len() > len {
            if let Flow::Done = on_data(ctx, c, &mut rest[len..], now)? {
                return Ok(Flow::Done);
            }
        }
        return read_frames(ctx, scratch, c, now);
    }
}

fn read_frames(
    ctx: &mut Ctx<'_>,
    scratch: &mut [u8],
    c: &mut Conn,
    now: u64,
) -> Result<Flow, Failure> {
    loop {
        let n = match c.stream.read(scratch) {
            Ok(0) if c.state == State::Closing => return Ok(Flow::Done),
            Ok(0) => {
                return Err((
                    ErrorKind::Closed,
                    format!(
                        "conn {}: server closed the connection ({} messages unanswered)",
                        c.id,
                        c.times.len()
                    ),
                ))
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Flow::Keep),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) if c.state == State::Closing => return Ok(Flow::Done),
            Err(e) => return Err((ErrorKind::Closed, format!("conn {}: read: {e}", c.id))),
        };
        if let Flow::Done = on_data(ctx, c, &mut scratch[..n], now)? {
            return Ok(Flow::Done);
        }
        // A short read emptied the socket; epoll reports the next arrival as a new edge,
        // so the extra read that would only return EAGAIN is skipped.
        if n < scratch.len() {
            return Ok(Flow::Keep);
        }
    }
}

fn on_data(ctx: &mut Ctx<'_>, c: &mut Conn, data: &mut [u8], now: u64) -> Result<Flow, Failure> {
    let mut pos = 0;
    while pos < data.len() {
        let (used, ev) = c
            .dec
            .decode(&mut data[pos..])
            .map_err(|e| (ErrorKind::Protocol, format!("conn {}: {e}", c.id)))?;
        pos += used;
        let Some(ev) = ev else {
            break;
        };
        match ev {
            Event::Message { kind, payload } => {
                let got = payload.as_slice();
                if c.recv_seq == c.next_seq {
                    return Err((
                        ErrorKind::WrongReply,
                        format!("conn {}: a {}-byte message nobody sent", c.id, got.len()),
                    ));
                }
                c.gen
                    .check(c.recv_seq, kind == MessageKind::Binary, got)
                    .map_err(|m| {
                        (
                            ErrorKind::WrongReply,
                            format!("conn {}: reply {}: {m}", c.id, c.recv_seq),
                        )
                    })?;
                let sent_at = c.times.pop_front().unwrap_or(now);
                c.recv_seq += 1;
                ctx.record(sent_at, now);
                if ctx.traffic == Traffic::Echo && now < ctx.me && c.state == State::Open {
                    c.times.push_back(now);
                }
                if c.state == State::Open {
                    pump(c, ctx.plan.in_flight, &mut ctx.rng);
                }
            }
            Event::Ping(p) => {
                let mask = (xorshift(&mut ctx.rng) as u32).to_ne_bytes();
                write_client_frame(&mut c.wbuf, true, OpCode::Pong, mask, p);
            }
            Event::Pong(_) => {}
            Event::Close(_) if c.state == State::Closing => return Ok(Flow::Done),
            Event::Close(code) => {
                return Err((
                    ErrorKind::Closed,
                    format!(
                        "conn {}: server sent close {:?} ({} messages unanswered)",
                        c.id,
                        code.map(|(c, r)| format!("{c} {r}")),
                        c.times.len()
                    ),
                ))
            }
        }
    }
    Ok(Flow::Keep)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(interval_ns: f64, tick_ns: u64, n: u64) -> Vec<u64> {
        let mut s = Scheduler {
            start: 1_000,
            interval_ns,
            tick_ns,
            k: 0,
            rr: 0,
            end: u64::MAX,
        };
        (0..n)
            .map(|k| {
                s.k = k;
                s.slot() - 1_000
            })
            .collect()
    }

    #[test]
    fn schedule_is_exact_without_a_tick() {
        assert_eq!(slots(333.5, 1, 4), vec![0, 333, 667, 1000]);
    }

    #[test]
    fn schedule_rounds_up_to_whole_ticks_keeping_the_rate() {
        // Two messages per tick at half-tick intervals; none is scheduled early.
        assert_eq!(slots(500.0, 1000, 6), vec![0, 1000, 1000, 2000, 2000, 3000]);
        // Slower than the tick: each message on the tick at or after its exact time.
        assert_eq!(slots(2500.0, 1000, 4), vec![0, 3000, 5000, 8000]);
    }
}
