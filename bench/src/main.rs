//! `ringway-bench`: a WebSocket load tool for the gateway's own benchmarks. It speaks the
//! client side through the protocol core (masked frames out, decoder in client role) but
//! none of the server's runtime, drives many nonblocking sockets per thread, checks every
//! reply byte for byte, and measures the server's CPU and memory from /proc.

mod churn;
mod client;
mod conn;
mod payload;
mod procfs;
mod report;
mod sys;
mod tls;
mod ws;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use mimalloc::MiMalloc;

use client::{Plan, Shared, Traffic, Worker, WorkerOutput};
use report::{
    new_histogram, CpuUse, ErrorTally, IdleReport, LatencySummary, LoadReport, ServerCpu, ServerRss,
};
use sys::{now_ns, sleep_until};

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

/// WebSocket load generator for ringway (loopback only). Exits 1 if any connection failed
/// or any reply was wrong or missing, 2 on bad arguments or setup failure.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Print the report as JSON on stdout.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// Closed loop: each connection keeps K messages in flight, sending one per reply.
    Echo(LoadArgs),
    /// Open loop at a fixed total rate; latency counts from each message's scheduled time.
    Rate(RateArgs),
    /// Open connections and hold them; reports connect rate and server RSS per connection.
    Idle(IdleArgs),
    /// Soak: hold connections that echo now and then while others connect, echo once and
    /// close at a fixed rate; reports the server's RSS and descriptors before and after.
    Churn(churn::ChurnArgs),
}

#[derive(Debug, Args)]
struct Common {
    /// Server URL (ws:// or wss://); its host must be a loopback address.
    #[arg(long, default_value = "ws://127.0.0.1:8080/")]
    url: String,
    #[command(flatten)]
    tls: tls::TlsArgs,
    /// Connections to open.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    connections: u32,
    /// Client threads, each driving its share of the connections.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    threads: u32,
    /// Server process to measure (CPU time from /proc/PID/stat, RSS from /proc/PID/status).
    #[arg(long, value_name = "PID")]
    server_pid: Option<u32>,
    /// Give up on a connection without a 101 after this long.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    connect_timeout: Duration,
    /// Connections per thread being set up at once.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    connect_concurrency: u32,
    /// Bind source addresses 127.0.0.2..=254 from the start (otherwise only once the
    /// ephemeral ports toward the server run out).
    #[arg(long)]
    spread_sources: bool,
}

#[derive(Debug, Args)]
struct LoadArgs {
    #[command(flatten)]
    common: Common,
    /// echo: messages kept in flight per connection [default 1]. rate: most unanswered
    /// messages per connection; later ones wait, their delay still counted [default 64].
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    in_flight: Option<u32>,
    /// Payload bytes per message (text payloads are ASCII).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(0..=16 << 20))]
    size: u32,
    /// Binary messages instead of text.
    #[arg(long)]
    binary: bool,
    /// Measured time, after the warm-up.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    duration: Duration,
    /// Traffic before the measurement starts.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    warmup: Duration,
    /// After the measurement, how long outstanding replies may take before they count as
    /// unanswered.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    drain: Duration,
}

#[derive(Debug, Args)]
struct RateArgs {
    /// Total messages per second over all connections.
    #[arg(long, value_parser = parse_rate)]
    rate: f64,
    /// Send-schedule granularity: messages due within one tick go out together on one
    /// wake-up (0: a wake-up per message; costly in CPU at high rates).
    #[arg(long, default_value = "1ms", value_parser = parse_duration)]
    tick: Duration,
    #[command(flatten)]
    load: LoadArgs,
}

#[derive(Debug, Args)]
struct IdleArgs {
    #[command(flatten)]
    common: Common,
    /// How long to hold the connections open once all are up.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    hold: Duration,
}

/// "5", "5s", "1.5s", "500ms", "100us", "2m"; at most an hour.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 5s, 500ms or 2m"))?;
    let secs = v * scale;
    if !(0.0..=3600.0).contains(&secs) {
        return Err(format!("{s:?}: must be between 0 and 1 hour"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let r: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !(r > 0.0 && r <= 100_000_000.0) {
        return Err(format!(
            "{s:?}: rate must be in (0, 1e8] messages per second"
        ));
    }
    Ok(r)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("ringway-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Ok(true) when the run was clean.
fn run(cli: Cli) -> anyhow::Result<bool> {
    sys::raise_nofile_limit().context("raising RLIMIT_NOFILE")?;
    let errors = match cli.mode {
        Mode::Echo(load) => {
            let r = run_load(load, None)?;
            print(&r, cli.json)?;
            r.errors
        }
        Mode::Rate(rate) => {
            let r = run_load(rate.load, Some((rate.rate, rate.tick)))?;
            print(&r, cli.json)?;
            r.errors
        }
        Mode::Idle(idle) => {
            let r = run_idle(idle)?;
            print(&r, cli.json)?;
            r.errors
        }
        Mode::Churn(args) => {
            let r = churn::run(args)?;
            print(&r, cli.json)?;
            r.errors
        }
    };
    if errors.total > 0 {
        eprintln!("ringway-bench: FAILED: {errors}");
    }
    Ok(errors.total == 0)
}

fn print<T: serde::Serialize + std::fmt::Display>(r: &T, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
    } else {
        println!("{r}");
    }
    Ok(())
}

fn plan(
    common: &Common,
    in_flight: usize,
    size: usize,
    binary: bool,
    drain: Duration,
) -> anyhow::Result<Plan> {
    let target = ws::target(&common.url, &common.tls).map_err(anyhow::Error::msg)?;
    Ok(Plan {
        target,
        in_flight,
        size,
        binary,
        connect_timeout_ns: common.connect_timeout.as_nanos() as u64,
        connect_concurrency: common.connect_concurrency as usize,
        spread_sources: common.spread_sources,
        drain_ns: drain.as_nanos() as u64,
        close_wait_ns: 2_000_000_000,
        tick_ns: 0,
    })
}

/// Connection ids of thread `t` of `threads`: every threads-th one.
fn share(connections: usize, threads: usize, t: usize) -> Vec<u32> {
    (t..connections)
        .step_by(threads)
        .map(|i| i as u32)
        .collect()
}

/// Run the workers; `coordinate` runs on this thread meanwhile and returns its findings.
fn run_workers<R>(
    plan: &Plan,
    connections: usize,
    threads: usize,
    traffic: impl Fn(usize) -> Traffic,
    coordinate: impl FnOnce(&Shared) -> R,
) -> anyhow::Result<(R, Vec<WorkerOutput>, usize)> {
    let shared = Shared::new();
    let threads = threads.min(connections).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let ids = share(connections, threads, t);
                let shared = &shared;
                let traffic = traffic(t);
                std::thread::Builder::new()
                    .name(format!("bench-{t}"))
                    .spawn_scoped(s, move || Worker::new(plan, shared, traffic, t, ids)?.run())
            })
            .collect::<Result<_, _>>()?;
        let found = coordinate(&shared);
        let mut outs = Vec::new();
        for h in handles {
            match h.join() {
                Ok(r) => outs.push(r.context("client thread")?),
                Err(_) => bail!("a client thread panicked"),
            }
        }
        Ok((found, outs, threads))
    })
}

/// Wait until every connection opened or failed; with nothing open, stop at once.
fn wait_settled(shared: &Shared, connections: usize) -> usize {
    while shared.settled.load(std::sync::atomic::Ordering::Relaxed) < connections {
        std::thread::sleep(Duration::from_millis(2));
    }
    let opened = shared.opened.load(std::sync::atomic::Ordering::Relaxed);
    if opened == 0 {
        shared
            .stop
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
    opened
}

struct Window {
    seconds: f64,
    own_cpu: f64,
    server_cpu: Option<f64>,
}

fn run_load(args: LoadArgs, open_loop: Option<(f64, Duration)>) -> anyhow::Result<LoadReport> {
    let rate = open_loop.map(|(r, _)| r);
    let c = &args.common;
    let connections = c.connections as usize;
    let threads = c.threads as usize;
    let in_flight = args
        .in_flight
        .unwrap_or(if rate.is_some() { 64 } else { 1 }) as usize;
    let mut plan = plan(c, in_flight, args.size as usize, args.binary, args.drain)?;
    plan.tick_ns = open_loop.map_or(0, |(_, tick)| tick.as_nanos() as u64);
    if let Some(pid) = c.server_pid {
        procfs::cpu_seconds(Some(pid)).with_context(|| format!("reading /proc/{pid}/stat"))?;
    }
    let eff_threads = threads.min(connections);
    let traffic = |t: usize| match rate {
        Some(r) => Traffic::Rate {
            per_second: r * share(connections, eff_threads, t).len() as f64 / connections as f64,
        },
        None => Traffic::Echo,
    };
    let warmup = args.warmup.as_nanos() as u64;
    let duration = args.duration.as_nanos() as u64;
    let server_pid = c.server_pid;
    let (window, outs, threads) = run_workers(&plan, connections, threads, traffic, |shared| {
        let opened = wait_settled(shared, connections);
        let now = now_ns() + client::RUN_START_LEAD_NS;
        let (ms, me) = (now + warmup, now + warmup + duration);
        shared.start(now, ms, me);
        if opened == 0 {
            return None;
        }
        sleep_until(ms);
        let cpu0 = procfs::cpu_seconds(None).ok();
        let srv0 = server_pid.and_then(|p| procfs::cpu_seconds(Some(p)).ok());
        let t0 = now_ns();
        sleep_until(me);
        let cpu1 = procfs::cpu_seconds(None).ok();
        let srv1 = server_pid.and_then(|p| procfs::cpu_seconds(Some(p)).ok());
        let t1 = now_ns();
        Some(Window {
            seconds: (t1 - t0) as f64 / 1e9,
            own_cpu: cpu1.zip(cpu0).map_or(0.0, |(a, b)| a - b),
            server_cpu: srv1.zip(srv0).map(|(a, b)| a - b),
        })
    })?;
    let mut hist = new_histogram();
    let mut errors = ErrorTally::default();
    let mut messages = 0;
    let mut lag = new_histogram();
    for o in &outs {
        hist.add(&o.hist).context("merging histograms")?;
        errors.merge(&o.errors);
        messages += o.messages;
        lag.add(&o.send_lag).context("merging histograms")?;
    }
    let seconds = window
        .as_ref()
        .map_or(args.duration.as_secs_f64(), |w| w.seconds);
    let msgs_per_sec = if seconds > 0.0 {
        messages as f64 / seconds
    } else {
        0.0
    };
    let server = match (server_pid, window.as_ref().and_then(|w| w.server_cpu)) {
        (Some(pid), Some(cpu)) => Some(ServerCpu {
            pid,
            cpu: CpuUse::over(cpu, seconds),
            cpu_us_per_msg: if messages > 0 {
                cpu * 1e6 / messages as f64
            } else {
                0.0
            },
        }),
        _ => None,
    };
    let connected = connections - errors.connect_failed as usize - errors.handshake_failed as usize;
    Ok(LoadReport {
        mode: if rate.is_some() { "rate" } else { "echo" },
        url: c.url.clone(),
        connections,
        connected,
        in_flight,
        size: args.size as usize,
        binary: args.binary,
        threads,
        target_rate: rate,
        tick_us: open_loop.map(|(_, t)| t.as_nanos() as f64 / 1000.0),
        send_lag: rate.map(|_| LatencySummary::from_histogram(&lag)),
        duration_s: seconds,
        messages,
        msgs_per_sec,
        mib_per_sec: msgs_per_sec * args.size as f64 / (1024.0 * 1024.0),
        latency: LatencySummary::from_histogram(&hist),
        client_cpu: CpuUse::over(window.as_ref().map_or(0.0, |w| w.own_cpu), seconds),
        server,
        errors,
    })
}

fn run_idle(args: IdleArgs) -> anyhow::Result<IdleReport> {
    let c = &args.common;
    let connections = c.connections as usize;
    let plan = plan(c, 1, 16, false, Duration::ZERO)?;
    let rss_before = match c.server_pid {
        Some(pid) => {
            Some(procfs::rss_kib(pid).with_context(|| format!("reading /proc/{pid}/status"))?)
        }
        None => None,
    };
    let hold = args.hold.as_nanos() as u64;
    let server_pid = c.server_pid;
    let t0 = now_ns();
    let ((opened, connect_s, rss_after, spread), outs, _) = run_workers(
        &plan,
        connections,
        c.threads as usize,
        |_| Traffic::Idle,
        |shared| {
            let opened = wait_settled(shared, connections);
            let connect_s = (now_ns() - t0) as f64 / 1e9;
            let now = now_ns();
            shared.start(now, now, now);
            let mut rss_after = None;
            if opened > 0 {
                sleep_until(now + hold);
                rss_after = server_pid.and_then(|p| procfs::rss_kib(p).ok());
                shared
                    .stop
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
            let spread = shared.spreading.load(std::sync::atomic::Ordering::Relaxed);
            (opened, connect_s, rss_after, spread)
        },
    )?;
    let mut errors = ErrorTally::default();
    for o in &outs {
        errors.merge(&o.errors);
    }
    let server = match (server_pid, rss_before, rss_after) {
        (Some(pid), Some(before), Some(after)) => Some(ServerRss {
            pid,
            before_kib: before,
            after_kib: after,
            bytes_per_connection: if opened > 0 {
                (after as f64 - before as f64) * 1024.0 / opened as f64
            } else {
                0.0
            },
        }),
        _ => None,
    };
    Ok(IdleReport {
        mode: "idle",
        url: c.url.clone(),
        connections,
        connected: opened,
        spread_sources: spread || c.spread_sources,
        connect_seconds: connect_s,
        connects_per_sec: if connect_s > 0.0 {
            opened as f64 / connect_s
        } else {
            0.0
        },
        hold_s: args.hold.as_secs_f64(),
        server,
        errors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("5").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("100us").unwrap(), Duration::from_micros(100));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("2h").is_err());
        assert!(parse_duration("61m").is_err());
    }

    #[test]
    fn rates_must_be_positive() {
        assert_eq!(parse_rate("1000").unwrap(), 1000.0);
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("NaN").is_err());
    }

    #[test]
    fn connections_are_shared_evenly_over_threads() {
        let all: Vec<Vec<u32>> = (0..3).map(|t| share(10, 3, t)).collect();
        assert_eq!(all[0], vec![0, 3, 6, 9]);
        assert_eq!(all[1], vec![1, 4, 7]);
        assert_eq!(all[2], vec![2, 5, 8]);
    }

    #[test]
    fn cli_parses_each_mode() {
        let cli = Cli::try_parse_from([
            "ringway-bench",
            "echo",
            "--connections",
            "10",
            "--in-flight",
            "4",
            "--size",
            "1024",
            "--binary",
            "--duration",
            "2s",
            "--json",
        ])
        .unwrap();
        assert!(cli.json);
        let Mode::Echo(a) = cli.mode else {
            panic!("not echo")
        };
        assert_eq!(
            (a.common.connections, a.in_flight, a.size, a.binary),
            (10, Some(4), 1024, true)
        );
        let cli = Cli::try_parse_from(["ringway-bench", "rate", "--rate", "5000"]).unwrap();
        assert!(matches!(cli.mode, Mode::Rate(RateArgs { rate, .. }) if rate == 5000.0));
        let cli =
            Cli::try_parse_from(["ringway-bench", "idle", "--hold", "1s", "--server-pid", "7"])
                .unwrap();
        assert!(matches!(
            cli.mode,
            Mode::Idle(IdleArgs {
                common: Common {
                    server_pid: Some(7),
                    ..
                },
                ..
            })
        ));
        assert!(Cli::try_parse_from(["ringway-bench", "echo", "--connections", "0"]).is_err());
    }
}
