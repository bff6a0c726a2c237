//! What a run found: latency percentiles from the HDR histogram, error tallies, and the
//! text and JSON renderings of both reports.

use std::fmt;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latencies are recorded in nanoseconds, from 1 ns to 100 s, at 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("static histogram bounds are valid")
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    pub samples: u64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p99_9_us: f64,
    pub max_us: f64,
}

impl LatencySummary {
    pub fn from_histogram(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return LatencySummary::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        LatencySummary {
            samples: h.len(),
            mean_us: h.mean() / 1000.0,
            p50_us: us(h.value_at_quantile(0.5)),
            p90_us: us(h.value_at_quantile(0.9)),
            p99_us: us(h.value_at_quantile(0.99)),
            p99_9_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Connect,
    Handshake,
    Closed,
    Protocol,
    WrongReply,
    Unanswered,
}

/// Failures by kind, with the first few described (connection number and what happened).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ErrorTally {
    pub total: u64,
    /// Connections that could not connect (refused, timed out, no address).
    pub connect_failed: u64,
    /// Connections whose upgrade was not a valid 101.
    pub handshake_failed: u64,
    /// Connections the server closed or reset during the run.
    pub closed_by_server: u64,
    /// Connections that received frames our decoder rejects.
    pub protocol_error: u64,
    /// Replies that differ from the message they should echo (the connection is dropped).
    pub wrong_reply: u64,
    /// Messages still unanswered when the drain time ran out.
    pub unanswered: u64,
    pub examples: Vec<String>,
}

const MAX_EXAMPLES: usize = 10;

impl ErrorTally {
    pub fn note(&mut self, kind: ErrorKind, count: u64, example: String) {
        let slot = match kind {
            ErrorKind::Connect => &mut self.connect_failed,
            ErrorKind::Handshake => &mut self.handshake_failed,
            ErrorKind::Closed => &mut self.closed_by_server,
            ErrorKind::Protocol => &mut self.protocol_error,
            ErrorKind::WrongReply => &mut self.wrong_reply,
            ErrorKind::Unanswered => &mut self.unanswered,
        };
        *slot += count;
        self.total += count;
        if self.examples.len() < MAX_EXAMPLES {
            self.examples.push(example);
        }
    }

    pub fn merge(&mut self, o: &ErrorTally) {
        self.total += o.total;
        self.connect_failed += o.connect_failed;
        self.handshake_failed += o.handshake_failed;
        self.closed_by_server += o.closed_by_server;
        self.protocol_error += o.protocol_error;
        self.wrong_reply += o.wrong_reply;
        self.unanswered += o.unanswered;
        for e in &o.examples {
            if self.examples.len() < MAX_EXAMPLES {
                self.examples.push(e.clone());
            }
        }
    }
}

impl fmt::Display for ErrorTally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.total == 0 {
            return write!(f, "none");
        }
        let parts = [
            ("connect failed", self.connect_failed),
            ("handshake failed", self.handshake_failed),
            ("closed by server", self.closed_by_server),
            ("protocol error", self.protocol_error),
            ("wrong reply", self.wrong_reply),
            ("unanswered", self.unanswered),
        ];
        let list: Vec<String> = parts
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| format!("{n} {k}"))
            .collect();
        write!(f, "{}", list.join(", "))?;
        for e in &self.examples {
            write!(f, "\n    {e}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CpuUse {
    pub seconds: f64,
    /// Of one core over the measured window.
    pub percent_of_core: f64,
}

impl CpuUse {
    pub fn over(seconds: f64, window_s: f64) -> Self {
        CpuUse {
            seconds,
            percent_of_core: if window_s > 0.0 {
                100.0 * seconds / window_s
            } else {
                0.0
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ServerCpu {
    pub pid: u32,
    pub cpu: CpuUse,
    /// Server CPU time per echoed message: the efficiency figure.
    pub cpu_us_per_msg: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoadReport {
    pub mode: &'static str,
    pub url: String,
    pub connections: usize,
    pub connected: usize,
    pub in_flight: usize,
    pub size: usize,
    pub binary: bool,
    pub threads: usize,
    /// Open loop only: the requested total rate.
    pub target_rate: Option<f64>,
    /// Open loop only: send-schedule granularity.
    pub tick_us: Option<f64>,
    /// Open loop only: how late the tool queued messages after their scheduled time. When
    /// this is large the tool (or the machine), not the server, is behind.
    pub send_lag: Option<LatencySummary>,
    pub duration_s: f64,
    /// Replies counted in the window (received in it, or for `rate` scheduled in it).
    pub messages: u64,
    pub msgs_per_sec: f64,
    /// Payload bytes per second each way.
    pub mib_per_sec: f64,
    pub latency: LatencySummary,
    pub client_cpu: CpuUse,
    pub server: Option<ServerCpu>,
    pub errors: ErrorTally,
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.binary { "binary" } else { "text" };
        writeln!(
            f,
            "{} {}: {}/{} connections x {} in flight, {} B {kind}, {:.2} s, {} thread(s)",
            self.mode,
            self.url,
            self.connected,
            self.connections,
            self.in_flight,
            self.size,
            self.duration_s,
            self.threads
        )?;
        if let Some(r) = self.target_rate {
            write!(f, "  target     {r:.0} msgs/s")?;
            if let Some(t) = self.tick_us {
                write!(f, " in {} ticks", fmt_us(t))?;
            }
            if let Some(lag) = &self.send_lag {
                write!(
                    f,
                    "; tool send lag p50 {}  p99 {}  max {}",
                    fmt_us(lag.p50_us),
                    fmt_us(lag.p99_us),
                    fmt_us(lag.max_us)
                )?;
            }
            writeln!(f)?;
        }
        writeln!(
            f,
            "  throughput {:.0} msgs/s, {:.2} MiB/s each way ({} messages)",
            self.msgs_per_sec, self.mib_per_sec, self.messages
        )?;
        let l = &self.latency;
        writeln!(
            f,
            "  latency    p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (mean {}, n={})",
            fmt_us(l.p50_us),
            fmt_us(l.p90_us),
            fmt_us(l.p99_us),
            fmt_us(l.p99_9_us),
            fmt_us(l.max_us),
            fmt_us(l.mean_us),
            l.samples
        )?;
        writeln!(
            f,
            "  tool cpu   {:.2} s ({:.0}% of a core)",
            self.client_cpu.seconds, self.client_cpu.percent_of_core
        )?;
        if let Some(s) = &self.server {
            writeln!(
                f,
                "  server cpu {:.2} s ({:.0}% of a core), {:.2} us per message [pid {}]",
                s.cpu.seconds, s.cpu.percent_of_core, s.cpu_us_per_msg, s.pid
            )?;
        }
        write!(f, "  errors     {}", self.errors)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ServerRss {
    pub pid: u32,
    pub before_kib: u64,
    pub after_kib: u64,
    /// (after - before) / connected.
    pub bytes_per_connection: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IdleReport {
    pub mode: &'static str,
    pub url: String,
    pub connections: usize,
    pub connected: usize,
    /// Whether source addresses were spread over 127.0.0.2..=254.
    pub spread_sources: bool,
    pub connect_seconds: f64,
    pub connects_per_sec: f64,
    pub hold_s: f64,
    pub server: Option<ServerRss>,
    pub errors: ErrorTally,
}

impl fmt::Display for IdleReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "idle {}: {}/{} connections open, held {:.1} s{}",
            self.url,
            self.connected,
            self.connections,
            self.hold_s,
            if self.spread_sources {
                " (sources spread over 127.0.0.2-254)"
            } else {
                ""
            }
        )?;
        writeln!(
            f,
            "  connect    {:.2} s, {:.0} connections/s",
            self.connect_seconds, self.connects_per_sec
        )?;
        if let Some(s) = &self.server {
            writeln!(
                f,
                "  server rss {} KiB -> {} KiB, {:.0} bytes per connection [pid {}]",
                s.before_kib, s.after_kib, s.bytes_per_connection, s.pid
            )?;
        }
        write!(f, "  errors     {}", self.errors)
    }
}

/// Microseconds, switching to milliseconds from 10 ms on.
pub fn fmt_us(us: f64) -> String {
    if us >= 10_000.0 {
        format!("{:.1} ms", us / 1000.0)
    } else if us >= 100.0 {
        format!("{us:.0} us")
    } else {
        format!("{us:.1} us")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_uniform_distribution() {
        let mut h = new_histogram();
        // 1..=10_000 us, once each.
        for us in 1..=10_000u64 {
            h.record(us * 1000).unwrap();
        }
        let s = LatencySummary::from_histogram(&h);
        assert_eq!(s.samples, 10_000);
        let close = |got: f64, want: f64| (got - want).abs() <= want * 0.002;
        assert!(close(s.p50_us, 5_000.0), "p50 {}", s.p50_us);
        assert!(close(s.p90_us, 9_000.0), "p90 {}", s.p90_us);
        assert!(close(s.p99_us, 9_900.0), "p99 {}", s.p99_us);
        assert!(close(s.p99_9_us, 9_990.0), "p99.9 {}", s.p99_9_us);
        assert!(close(s.max_us, 10_000.0), "max {}", s.max_us);
        assert!(close(s.mean_us, 5_000.5), "mean {}", s.mean_us);
    }

    #[test]
    fn one_slow_outlier_shows_only_in_the_tail() {
        let mut h = new_histogram();
        for _ in 0..999 {
            h.record(50_000).unwrap();
        }
        h.record(80_000_000).unwrap();
        let s = LatencySummary::from_histogram(&h);
        assert!((s.p99_us - 50.0).abs() < 0.1);
        assert!(s.p99_9_us < 51.0);
        assert!((s.max_us - 80_000.0).abs() < 80.0);
    }

    #[test]
    fn empty_histogram_reports_zeros() {
        assert_eq!(
            LatencySummary::from_histogram(&new_histogram()),
            LatencySummary::default()
        );
    }

    #[test]
    fn errors_are_counted_by_kind_and_examples_are_capped() {
        let mut a = ErrorTally::default();
        for i in 0..12 {
            a.note(ErrorKind::Connect, 1, format!("conn {i}: refused"));
        }
        let mut b = ErrorTally::default();
        b.note(ErrorKind::WrongReply, 1, "conn 3: body differs".into());
        b.note(ErrorKind::Unanswered, 7, "conn 4: 7 unanswered".into());
        a.merge(&b);
        assert_eq!(a.total, 20);
        assert_eq!(a.connect_failed, 12);
        assert_eq!(a.wrong_reply, 1);
        assert_eq!(a.unanswered, 7);
        assert_eq!(a.examples.len(), 10);
        let text = a.to_string();
        assert!(text.starts_with("12 connect failed, 1 wrong reply, 7 unanswered"));
        assert_eq!(ErrorTally::default().to_string(), "none");
    }

    fn sample_report() -> LoadReport {
        let mut h = new_histogram();
        for ns in [40_000, 50_000, 60_000, 20_000_000] {
            h.record(ns).unwrap();
        }
        LoadReport {
            mode: "echo",
            url: "ws://127.0.0.1:9/".into(),
            connections: 100,
            connected: 100,
            in_flight: 1,
            size: 16,
            binary: false,
            threads: 1,
            target_rate: None,
            tick_us: None,
            send_lag: None,
            duration_s: 5.0,
            messages: 500_000,
            msgs_per_sec: 100_000.0,
            mib_per_sec: 100_000.0 * 16.0 / 1048576.0,
            latency: LatencySummary::from_histogram(&h),
            client_cpu: CpuUse::over(2.5, 5.0),
            server: Some(ServerCpu {
                pid: 42,
                cpu: CpuUse::over(4.0, 5.0),
                cpu_us_per_msg: 8.0,
            }),
            errors: ErrorTally::default(),
        }
    }

    #[test]
    fn text_report_shows_the_figures() {
        let text = sample_report().to_string();
        assert!(text.contains("100/100 connections x 1 in flight, 16 B text"));
        assert!(text.contains("100000 msgs/s, 1.53 MiB/s each way"));
        assert!(text.contains("p50 50.0 us"), "{text}");
        assert!(text.contains("max 20.0 ms"), "{text}");
        assert!(text.contains("tool cpu   2.50 s (50% of a core)"));
        assert!(text.contains("8.00 us per message [pid 42]"));
        assert!(text.ends_with("errors     none"));
    }

    #[test]
    fn json_report_has_machine_readable_fields() {
        let v: serde_json::Value = serde_json::to_value(sample_report()).unwrap();
        assert_eq!(v["msgs_per_sec"], 100_000.0);
        assert_eq!(v["errors"]["total"], 0);
        assert_eq!(v["server"]["cpu_us_per_msg"], 8.0);
        assert!((v["latency"]["p50_us"].as_f64().unwrap() - 50.0).abs() < 0.1);
        assert!(v["target_rate"].is_null());
    }

    #[test]
    fn microseconds_format_by_magnitude() {
        assert_eq!(fmt_us(12.345), "12.3 us");
        assert_eq!(fmt_us(950.0), "950 us");
        assert_eq!(fmt_us(25_000.0), "25.0 ms");
    }
}
