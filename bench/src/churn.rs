//! `churn` mode, the soak load: a held set of connections that each echo a small message
//! every few seconds, while other connections open at a fixed rate, exchange one message and
//! close. The server's RSS and open descriptors are read before and after the churn with the
//! held set open both times, so what the churn leaves behind shows up as a difference.
//!
//! Every connection binds a source address in 127.0.0.2..=254: the churn closes tens of
//! thousands of connections, and spreading them keeps TIME_WAIT from using up the ephemeral
//! ports toward the server.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;
use std::io;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use mio::{Events, Interest, Poll, Registry, Token};
use ringway::protocol::frame::{write_client_frame, OpCode};
use serde::Serialize;

use crate::conn::{self, connect, drive, mask, ConnId, Failure, Flow, Mode, State};
use crate::payload::xorshift;
use crate::procfs;
use crate::report::{ErrorKind, ErrorTally};
use crate::sys::{now_ns, sleep_until};
use crate::ws::{self, Target};

const UNSET: u64 = u64::MAX;
/// Longest a worker sleeps: the granularity of the churn schedule and the held sends.
const TICK_NS: u64 = 5_000_000;
const READ_CHUNK: usize = 64 * 1024;
/// How long the held set has to close once the run is over.
const CLOSE_WAIT_NS: u64 = 10_000_000_000;

#[derive(Debug, Args)]
pub struct ChurnArgs {
    /// Server URL (ws:// or wss://); its host must be a loopback address.
    #[arg(long, default_value = "ws://127.0.0.1:8080/")]
    url: String,
    #[command(flatten)]
    tls: crate::tls::TlsArgs,
    /// Connections held open for the whole run.
    #[arg(long, default_value_t = 15_000, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    held: u32,
    /// Churn connections opened per second (each sends one message, checks the echo, closes).
    #[arg(long, default_value_t = 1000.0, value_parser = parse_rate)]
    rate: f64,
    /// How long the churn runs.
    #[arg(long, default_value = "60s", value_parser = crate::parse_duration)]
    duration: Duration,
    /// Held-set traffic before the pre-churn measurement.
    #[arg(long, default_value = "5s", value_parser = crate::parse_duration)]
    warmup: Duration,
    /// Held-set traffic after the churn, before the post-churn measurement.
    #[arg(long, default_value = "5s", value_parser = crate::parse_duration)]
    settle: Duration,
    /// Each held connection sends a message this often.
    #[arg(long, default_value = "2s", value_parser = crate::parse_duration)]
    interval: Duration,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(0..=65536))]
    size: u32,
    /// Client threads, each driving its share of the held set and of the churn rate.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    threads: u32,
    /// Server process to measure (VmRSS from /proc/PID/status, descriptors in /proc/PID/fd).
    #[arg(long, value_name = "PID")]
    server_pid: Option<u32>,
    /// Give up on a connection without a 101 after this long.
    #[arg(long, default_value = "10s", value_parser = crate::parse_duration)]
    connect_timeout: Duration,
    /// A message unanswered this long (or a churn connection not closed this long after
    /// its 101) is an error.
    #[arg(long, default_value = "10s", value_parser = crate::parse_duration)]
    reply_timeout: Duration,
    /// Held connections per thread being set up at once.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    connect_concurrency: u32,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let r: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !(0.0..=1_000_000.0).contains(&r) {
        return Err(format!("{s:?}: rate must be in [0, 1e6] per second"));
    }
    Ok(r)
}

/// The server's memory and descriptors at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Snapshot {
    pub rss_kib: u64,
    pub fds: u64,
}

fn snapshot(pid: u32) -> io::Result<Snapshot> {
    Ok(Snapshot {
        rss_kib: procfs::rss_kib(pid)?,
        fds: std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64,
    })
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChurnReport {
    pub mode: &'static str,
    pub url: String,
    pub threads: usize,
    pub held: usize,
    pub held_connected: usize,
    pub target_rate: f64,
    pub duration_s: f64,
    /// Valid 101s, held and churn.
    pub connects: u64,
    pub churn_connects: u64,
    /// wss://: connections whose TLS handshake resumed a session (ticket or session id).
    pub tls_resumed: u64,
    pub churn_per_sec: f64,
    /// Closing handshakes completed (RFC 6455 §7.1.2), held and churn.
    pub disconnects: u64,
    /// Echo replies received and checked.
    pub messages: u64,
    /// Held set open, after the warm-up, just before the churn.
    pub pre_churn: Option<Snapshot>,
    /// Held set open, `settle` after the churn ended.
    pub post_churn: Option<Snapshot>,
    pub errors: ErrorTally,
}

impl fmt::Display for ChurnReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "churn {} ({} thread(s))", self.url, self.threads)?;
        writeln!(
            f,
            "  held:         {} of {}",
            self.held_connected, self.held
        )?;
        writeln!(
            f,
            "  churn:        {} connects in {:.1} s = {:.0}/s (target {:.0}/s)",
            self.churn_connects, self.duration_s, self.churn_per_sec, self.target_rate
        )?;
        writeln!(f, "  connects:     {}", self.connects)?;
        if self.tls_resumed > 0 {
            writeln!(f, "  TLS resumed:  {}", self.tls_resumed)?;
        }
        writeln!(f, "  disconnects:  {}", self.disconnects)?;
        writeln!(f, "  messages:     {}", self.messages)?;
        if let (Some(a), Some(b)) = (self.pre_churn, self.post_churn) {
            writeln!(
                f,
                "  server RSS:   {} KiB before churn, {} KiB after ({:+.1}%)",
                a.rss_kib,
                b.rss_kib,
                (b.rss_kib as f64 - a.rss_kib as f64) * 100.0 / a.rss_kib.max(1) as f64
            )?;
            writeln!(f, "  server fds:   {} before churn, {} after", a.fds, b.fds)?;
        }
        write!(f, "  errors:       {}", self.errors)
    }
}

struct Shared {
    held_settled: AtomicUsize,
    held_open: AtomicUsize,
    churn_start: AtomicU64,
    churn_end: AtomicU64,
    stop: AtomicBool,
}

struct Cfg {
    target: Target,
    size: usize,
    interval_ns: u64,
    connect_timeout_ns: u64,
    reply_timeout_ns: u64,
    connect_concurrency: usize,
}

#[derive(Debug, Default)]
struct Counts {
    connects: u64,
    churn_connects: u64,
    tls_resumed: u64,
    disconnects: u64,
    messages: u64,
    errors: ErrorTally,
}

pub fn run(args: ChurnArgs) -> anyhow::Result<ChurnReport> {
    let target = ws::target(&args.url, &args.tls).map_err(anyhow::Error::msg)?;
    if let Some(pid) = args.server_pid {
        snapshot(pid).with_context(|| format!("reading /proc/{pid}"))?;
    }
    if args.interval.is_zero() {
        bail!("--interval must be positive");
    }
    let cfg = Cfg {
        target,
        size: args.size as usize,
        interval_ns: args.interval.as_nanos() as u64,
        connect_timeout_ns: args.connect_timeout.as_nanos() as u64,
        reply_timeout_ns: args.reply_timeout.as_nanos() as u64,
        connect_concurrency: args.connect_concurrency as usize,
    };
    let shared = Shared {
        held_settled: AtomicUsize::new(0),
        held_open: AtomicUsize::new(0),
        churn_start: AtomicU64::new(UNSET),
        churn_end: AtomicU64::new(UNSET),
        stop: AtomicBool::new(false),
    };
    let held = args.held as usize;
    let threads = args.threads as usize;
    let pid = args.server_pid;
    let (pre, post, churn_s, outs) = std::thread::scope(|s| -> anyhow::Result<_> {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let n = (t..held).step_by(threads).count();
                let rate = args.rate / threads as f64;
                let (cfg, shared) = (&cfg, &shared);
                std::thread::Builder::new()
                    .name(format!("churn-{t}"))
                    .spawn_scoped(s, move || Worker::new(cfg, shared, t, n, rate)?.run())
            })
            .collect::<Result<_, _>>()?;
        // A worker that failed outright (its epoll broke) never settles its share.
        while shared.held_settled.load(Ordering::Relaxed) < held
            && !handles
                .iter()
                .any(|h: &std::thread::ScopedJoinHandle<_>| h.is_finished())
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(args.warmup);
        let pre = pid.and_then(|p| snapshot(p).ok());
        let start = now_ns() + TICK_NS;
        let end = start + args.duration.as_nanos() as u64;
        shared.churn_end.store(end, Ordering::Relaxed);
        shared.churn_start.store(start, Ordering::Release);
        sleep_until(end);
        let churn_s = (now_ns().max(end) - start) as f64 / 1e9;
        std::thread::sleep(args.settle);
        let post = pid.and_then(|p| snapshot(p).ok());
        shared.stop.store(true, Ordering::Relaxed);
        let mut outs = Vec::new();
        for h in handles {
            match h.join() {
                Ok(r) => outs.push(r.context("client thread")?),
                Err(_) => bail!("a client thread panicked"),
            }
        }
        Ok((pre, post, churn_s, outs))
    })?;
    let mut total = Counts::default();
    for o in &outs {
        total.connects += o.connects;
        total.churn_connects += o.churn_connects;
        total.tls_resumed += o.tls_resumed;
        total.disconnects += o.disconnects;
        total.messages += o.messages;
        total.errors.merge(&o.errors);
    }
    Ok(ChurnReport {
        mode: "churn",
        url: args.url,
        threads,
        held,
        held_connected: shared.held_open.load(Ordering::Relaxed),
        target_rate: args.rate,
        duration_s: churn_s,
        connects: total.connects,
        churn_connects: total.churn_connects,
        tls_resumed: total.tls_resumed,
        churn_per_sec: total.churn_connects as f64 / churn_s.max(1e-9),
        disconnects: total.disconnects,
        messages: total.messages,
        pre_churn: pre,
        post_churn: post,
        errors: total.errors,
    })
}

/// `since` counts from connect() until the 101 (the connect timeout), then from the 101
/// (a churn connection must finish within the reply timeout).
type Conn = conn::Conn<Extra>;

struct Extra {
    held: bool,
}

/// The pieces of a worker the shared driver needs while one connection is borrowed.
struct Ctx<'a> {
    cfg: &'a Cfg,
    registry: &'a Registry,
    counts: &'a mut Counts,
    rng: &'a mut u64,
}

impl Mode for Ctx<'_> {
    type Ext = Extra;
    // The soak must see a server hang-up when it happens, and an error while closing is one.
    const STOP_AT_SHORT_READ: bool = false;
    const READ_ERROR_AFTER_CLOSE_IS_DONE: bool = false;
    const RESTART_CLOCK_ON_CONNECT: bool = false;

    fn target(&self) -> &Target {
        &self.cfg.target
    }

    fn registry(&self) -> &Registry {
        self.registry
    }

    fn rng(&mut self) -> &mut u64 {
        self.rng
    }

    fn opened(&mut self, c: &mut Conn, now: u64) {
        self.counts.connects += 1;
        self.counts.tls_resumed += u64::from(c.tls_resumed);
        if !c.ext.held {
            self.counts.churn_connects += 1;
            send_message(c, self.rng, now);
        }
    }

    fn replied(&mut self, c: &mut Conn, _sent_at: Option<u64>, now: u64) {
        self.counts.messages += 1;
        if !c.ext.held && c.state == State::Open {
            c.start_close(self.rng, now);
        }
    }

    fn close_answered(&mut self, c: &Conn) -> Result<Flow, Failure> {
        if !c.times.is_empty() {
            return Err((
                ErrorKind::Unanswered,
                format!("{}: closed with {} replies missing", c.id, c.times.len()),
            ));
        }
        Ok(Flow::Done)
    }
}

struct Worker<'a> {
    cfg: &'a Cfg,
    shared: &'a Shared,
    poll: Poll,
    registry: Registry,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    live: usize,
    rng: u64,
    next_id: u64,
    src_next: usize,
    held_to_open: usize,
    held_connecting: usize,
    /// Held sends by due time: (due, slot, connection id).
    sends: BinaryHeap<Reverse<(u64, usize, u64)>>,
    /// Churn schedule of this thread: connection k is due at start + k * churn_gap_ns.
    churn_gap_ns: f64,
    churn_k: u64,
    scratch: Vec<u8>,
    counts: Counts,
}

impl<'a> Worker<'a> {
    fn new(
        cfg: &'a Cfg,
        shared: &'a Shared,
        index: usize,
        held: usize,
        rate: f64,
    ) -> io::Result<Self> {
        let poll = Poll::new()?;
        Ok(Worker {
            cfg,
            shared,
            registry: poll.registry().try_clone()?,
            poll,
            conns: Vec::new(),
            free: Vec::new(),
            live: 0,
            rng: 0x2545_F491_4F6C_DD1D ^ ((index as u64 + 1) << 32) ^ now_ns(),
            next_id: (index as u64) << 40,
            src_next: index * 37,
            held_to_open: held,
            held_connecting: 0,
            sends: BinaryHeap::new(),
            churn_gap_ns: if rate > 0.0 {
                1e9 / rate
            } else {
                f64::INFINITY
            },
            churn_k: 0,
            scratch: vec![0; READ_CHUNK],
            counts: Counts::default(),
        })
    }

    fn run(mut self) -> io::Result<Counts> {
        let mut events = Events::with_capacity(1024);
        let mut close_deadline = None;
        let mut next_sweep = 0;
        loop {
            let now = now_ns();
            match close_deadline {
                None if self.shared.stop.load(Ordering::Relaxed) => {
                    self.begin_closing(now);
                    close_deadline = Some(now + CLOSE_WAIT_NS);
                }
                None => {
                    self.open_held(now);
                    self.open_churn(now);
                    self.send_due(now);
                }
                Some(d) if now >= d => {
                    for slot in 0..self.conns.len() {
                        if let Some(c) = &self.conns[slot] {
                            let msg = format!(
                                "{}: no close handshake in {} s",
                                c.id,
                                CLOSE_WAIT_NS / 1_000_000_000
                            );
                            self.counts.errors.note(ErrorKind::Closed, 1, msg);
                            self.remove(slot);
                        }
                    }
                }
                Some(_) => {}
            }
            if close_deadline.is_some() && self.live == 0 {
                break;
            }
            if now >= next_sweep {
                self.sweep(now);
                next_sweep = now + 100_000_000;
            }
            match self
                .poll
                .poll(&mut events, Some(Duration::from_nanos(TICK_NS)))
            {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            for ev in events.iter() {
                let readable = ev.is_readable() || ev.is_read_closed() || ev.is_error();
                let writable = ev.is_writable() || ev.is_error();
                self.handle(ev.token().0, readable, writable, now_ns());
            }
        }
        Ok(self.counts)
    }

    fn source(&mut self) -> Ipv4Addr {
        let k = self.src_next;
        self.src_next += 1;
        Ipv4Addr::new(127, 0, 0, 2 + (k % 253) as u8)
    }

    /// Connect a new connection into a free slot; false (error noted) if connect failed.
    fn open(&mut self, held: bool, now: u64) -> bool {
        let id = self.next_id;
        self.next_id += 1;
        let slot = self.free.pop().unwrap_or_else(|| {
            self.conns.push(None);
            self.conns.len() - 1
        });
        let src = self.source();
        let tls = &self.cfg.target.tls;
        let res = connect(self.cfg.target.addr, Some(src)).and_then(|mut s| {
            let tls = tls.as_ref().map(|t| t.start()).transpose();
            let tls = tls.map_err(io::Error::other)?;
            self.poll.registry().register(
                &mut s,
                Token(slot),
                Interest::READABLE | Interest::WRITABLE,
            )?;
            Ok((s, tls))
        });
        let (stream, tls) = match res {
            Ok(s) => s,
            Err(e) => {
                self.free.push(slot);
                self.counts.errors.note(
                    ErrorKind::Connect,
                    1,
                    format!("conn {id:#x} from {src}: connect: {e}"),
                );
                return false;
            }
        };
        self.conns[slot] = Some(Conn::new(
            (stream, tls),
            Token(slot),
            ConnId { n: id, hex: true },
            (self.cfg.size, false),
            &mut self.rng,
            now,
            Extra { held },
        ));
        self.live += 1;
        true
    }

    fn open_held(&mut self, now: u64) {
        while self.held_to_open > 0 && self.held_connecting < self.cfg.connect_concurrency {
            self.held_to_open -= 1;
            if self.open(true, now) {
                self.held_connecting += 1;
            } else {
                self.shared.held_settled.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn open_churn(&mut self, now: u64) {
        let start = self.shared.churn_start.load(Ordering::Acquire);
        if start == UNSET {
            return;
        }
        let end = self.shared.churn_end.load(Ordering::Relaxed);
        loop {
            let due = start + (self.churn_k as f64 * self.churn_gap_ns) as u64;
            if due > now || due >= end {
                return;
            }
            self.churn_k += 1;
            self.open(false, now);
        }
    }

    fn send_due(&mut self, now: u64) {
        while let Some(&Reverse((due, slot, id))) = self.sends.peek() {
            if due > now {
                return;
            }
            self.sends.pop();
            let Some(c) = self.conns[slot]
                .as_mut()
                .filter(|c| c.id.n == id && c.state == State::Open)
            else {
                continue;
            };
            send_message(c, &mut self.rng, now);
            let r = c.flush(&self.registry);
            self.sends
                .push(Reverse((now + self.cfg.interval_ns, slot, id)));
            if let Err((kind, msg)) = r {
                self.counts.errors.note(kind, 1, msg);
                self.remove(slot);
            }
        }
    }

    /// Connects and handshakes past the connect timeout, replies and churn closes past the
    /// reply timeout.
    fn sweep(&mut self, now: u64) {
        for slot in 0..self.conns.len() {
            let Some(c) = &self.conns[slot] else {
                continue;
            };
            let failure = match c.state {
                State::Connecting | State::Handshaking
                    if now - c.since >= self.cfg.connect_timeout_ns =>
                {
                    Some((
                        ErrorKind::Connect,
                        format!("{}: no 101 response in time", c.id),
                    ))
                }
                State::Open | State::Closing
                    if c.times
                        .front()
                        .is_some_and(|&t| now - t >= self.cfg.reply_timeout_ns) =>
                {
                    Some((
                        ErrorKind::Unanswered,
                        format!("{}: reply {} missing", c.id, c.recv_seq),
                    ))
                }
                State::Open | State::Closing
                    if !c.ext.held && now - c.since >= self.cfg.reply_timeout_ns =>
                {
                    Some((
                        ErrorKind::Closed,
                        format!("{}: churn connection did not finish", c.id),
                    ))
                }
                _ => None,
            };
            if let Some((kind, msg)) = failure {
                self.counts.errors.note(kind, 1, msg);
                self.remove(slot);
            }
        }
    }

    /// Close the held set (churn connections finish on their own); give up on connects.
    fn begin_closing(&mut self, now: u64) {
        for _ in 0..std::mem::take(&mut self.held_to_open) {
            self.shared.held_settled.fetch_add(1, Ordering::Relaxed);
        }
        for slot in 0..self.conns.len() {
            let Some(c) = self.conns[slot].as_mut() else {
                continue;
            };
            match c.state {
                State::Open if c.ext.held => {
                    c.start_close(&mut self.rng, now);
                    if let Err((kind, msg)) = c.flush(&self.registry) {
                        self.counts.errors.note(kind, 1, msg);
                        self.remove(slot);
                    }
                }
                State::Connecting | State::Handshaking if c.ext.held => {
                    let msg = format!("{}: still connecting at the end", c.id);
                    self.counts.errors.note(ErrorKind::Connect, 1, msg);
                    self.remove(slot);
                }
                _ => {}
            }
        }
    }

    fn handle(&mut self, slot: usize, readable: bool, writable: bool, now: u64) {
        let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let was = c.state;
        let mut ctx = Ctx {
            cfg: self.cfg,
            registry: &self.registry,
            counts: &mut self.counts,
            rng: &mut self.rng,
        };
        let r = drive(&mut ctx, c, &mut self.scratch, readable, writable, now);
        let (held, id, state) = (c.ext.held, c.id.n, c.state);
        let opened = matches!(was, State::Connecting | State::Handshaking)
            && matches!(state, State::Open | State::Closing);
        if opened && held {
            self.held_connecting -= 1;
            self.shared.held_settled.fetch_add(1, Ordering::Relaxed);
            self.shared.held_open.fetch_add(1, Ordering::Relaxed);
            let first = now + xorshift(&mut self.rng) % self.cfg.interval_ns;
            self.sends.push(Reverse((first, slot, id)));
        }
        match r {
            Ok(Flow::Keep) => {}
            Ok(Flow::Done) => {
                self.counts.disconnects += 1;
                self.remove(slot);
            }
            Err((kind, msg)) => {
                self.counts.errors.note(kind, 1, msg);
                self.remove(slot);
            }
        }
    }

    fn remove(&mut self, slot: usize) {
        if let Some(c) = self.conns[slot].take() {
            if c.ext.held && matches!(c.state, State::Connecting | State::Handshaking) {
                self.held_connecting -= 1;
                self.shared.held_settled.fetch_add(1, Ordering::Relaxed);
            }
            self.live -= 1;
            self.free.push(slot);
        }
    }
}

fn send_message(c: &mut Conn, rng: &mut u64, now: u64) {
    write_client_frame(
        &mut c.wbuf,
        true,
        OpCode::Text,
        mask(rng),
        c.gen.with_seq(c.next_seq),
    );
    c.next_seq += 1;
    c.times.push_back(now);
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn churn_defaults_fit_the_soak() {
        let cli = crate::Cli::try_parse_from(["ringway-bench", "churn"]).unwrap();
        let crate::Mode::Churn(a) = cli.mode else {
            panic!("not churn")
        };
        assert_eq!((a.held, a.rate), (15_000, 1000.0));
        assert_eq!(a.duration, Duration::from_secs(60));
        assert_eq!(a.interval, Duration::from_secs(2));
        assert!(crate::Cli::try_parse_from(["ringway-bench", "churn", "--rate", "-1"]).is_err());
    }

    #[test]
    fn snapshot_counts_open_descriptors() {
        let before = snapshot(std::process::id()).unwrap();
        let files: Vec<_> = (0..64)
            .map(|_| std::fs::File::open("/proc/self/status").unwrap())
            .collect();
        let during = snapshot(std::process::id()).unwrap();
        drop(files);
        assert!(before.rss_kib > 0);
        // Other test threads may open or close a few files meanwhile: a loose bound.
        assert!(during.fds >= before.fds + 32, "{before:?} -> {during:?}");
    }
}
