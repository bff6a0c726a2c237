//! The load engine. Each thread drives its share of the connections as nonblocking sockets
//! on one edge-triggered epoll (mio): connect, upgrade, send, check every reply, close. No
//! locks or allocation per message; sends are corked into one write per connection per wake.

use std::collections::VecDeque;
use std::io;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token};
use ringway::protocol::frame::{write_client_frame, OpCode};

use crate::conn::{self, connect, drive, mask, ConnId, Flow, Mode, State};
use crate::report::{new_histogram, ErrorKind, ErrorTally};
use crate::sys::{now_ns, set_timer_slack_ns, TimerFd};
use crate::ws::Target;

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

/// `times` holds the send (echo) or scheduled (rate) time of each message; those past the
/// first `next_seq - recv_seq` wait for the in-flight cap.
type Conn = conn::Conn<Extra>;

struct Extra {
    /// Queued in the worker's list of connections to flush after this wake.
    dirty: bool,
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
    registry: Registry,
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
            let tls = &self.ctx.plan.target.tls;
            let (stream, tls) = match res.and_then(|mut s| {
                let tls = tls.as_ref().map(|t| t.start()).transpose();
                let tls = tls.map_err(io::Error::other)?;
                self.poll.registry().register(
                    &mut s,
                    Token(local),
                    Interest::READABLE | Interest::WRITABLE,
                )?;
                Ok((s, tls))
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
            let plan = self.ctx.plan;
            self.conns[local] = Some(Conn::new(
                (stream, tls),
                Token(local),
                ConnId {
                    n: id.into(),
                    hex: false,
                },
                (plan.size, plan.binary),
                &mut self.ctx.rng,
                now_ns(),
                Extra { dirty: false },
            ));
            self.ctx.connecting += 1;
            self.live += 1;
        }
    }

    fn handle(&mut self, local: usize, readable: bool, writable: bool, now: u64) {
        let Some(c) = self.conns.get_mut(local).and_then(Option::as_mut) else {
            return;
        };
        match drive(&mut self.ctx, c, &mut self.scratch, readable, writable, now) {
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
                State::Connecting => (ErrorKind::Connect, format!("{}: connect timed out", c.id)),
                State::Handshaking => (
                    ErrorKind::Handshake,
                    format!("{}: no 101 response in time", c.id),
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
            if !c.ext.dirty {
                c.ext.dirty = true;
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
            c.ext.dirty = false;
            if let Err((kind, msg)) = c.flush(&self.ctx.registry) {
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
                        "{}: {} messages unanswered from sequence {}",
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
                    c.start_close(&mut self.ctx.rng, now);
                    if c.flush(&self.ctx.registry).is_err() {
                        self.remove(local);
                    }
                }
                State::Connecting | State::Handshaking => {
                    let id = c.id;
                    self.ctx.errors.note(
                        ErrorKind::Connect,
                        1,
                        format!("{id}: still connecting when the run ended"),
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
        write_client_frame(&mut c.wbuf, true, op, mask(rng), c.gen.with_seq(c.next_seq));
        c.next_seq += 1;
    }
}

impl Mode for Ctx<'_> {
    type Ext = Extra;
    const STOP_AT_SHORT_READ: bool = true;
    const READ_ERROR_AFTER_CLOSE_IS_DONE: bool = true;
    const RESTART_CLOCK_ON_CONNECT: bool = true;

    fn target(&self) -> &Target {
        &self.plan.target
    }

    fn registry(&self) -> &Registry {
        &self.registry
    }

    fn rng(&mut self) -> &mut u64 {
        &mut self.rng
    }

    fn opened(&mut self, c: &mut Conn, now: u64) {
        self.connecting -= 1;
        self.shared.settled.fetch_add(1, Ordering::Relaxed);
        self.shared.opened.fetch_add(1, Ordering::Relaxed);
        if self.running && self.traffic == Traffic::Echo && now < self.me {
            c.times
                .extend(std::iter::repeat_n(now, self.plan.in_flight));
            pump(c, self.plan.in_flight, &mut self.rng);
        }
    }

    fn replied(&mut self, c: &mut Conn, sent_at: Option<u64>, now: u64) {
        self.record(sent_at.unwrap_or(now), now);
        if self.traffic == Traffic::Echo && now < self.me && c.state == State::Open {
            c.times.push_back(now);
        }
        if c.state == State::Open {
            pump(c, self.plan.in_flight, &mut self.rng);
        }
    }
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
