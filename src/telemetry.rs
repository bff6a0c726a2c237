//! What every event loop publishes about itself for `ops` to read: single-writer counters,
//! a heartbeat per loop, and latency histograms. It sits below `edge`, `relay` and `ops` so
//! that a core and the relay can both beat and count without importing each other or the
//! admin side: the loops write here, `ops` reads here, and nothing here knows who is who.
//! Writers pay a relaxed load and store per update (no locked instruction on the hot path).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A counter with one writer (its loop) and any number of readers.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Only the owning loop calls this, so load + store cannot lose an increment.
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }
    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }
    /// For gauges (values that go down too).
    #[inline]
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Milliseconds since the first call in this process (a monotonic clock every thread shares),
/// so a heartbeat written by one thread can be aged by another.
pub fn uptime_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// The relay's receive wait is bounded by this, so it turns (and beats) even when idle.
/// (A core turns at least every tick, 50 ms.)
pub const RELAY_TURN: Duration = Duration::from_millis(100);

/// An event loop's heartbeat: how many times it turned and when it last did. Written by its
/// loop only (once per turn: two relaxed stores), read by `/healthz`, `/readyz`, the systemd
/// watchdog and `/metrics`.
#[derive(Debug)]
pub struct Heartbeat {
    turns: AtomicU64,
    last_ms: AtomicU64,
}

impl Default for Heartbeat {
    /// A loop that has not turned yet ages from its creation.
    fn default() -> Heartbeat {
        Heartbeat {
            turns: AtomicU64::new(0),
            last_ms: AtomicU64::new(uptime_ms()),
        }
    }
}

impl Heartbeat {
    /// One loop turn. Only the owning loop calls this.
    #[inline]
    pub fn beat(&self) {
        self.turns.store(
            self.turns.load(Ordering::Relaxed).wrapping_add(1),
            Ordering::Relaxed,
        );
        self.last_ms.store(uptime_ms(), Ordering::Relaxed);
    }

    pub fn turns(&self) -> u64 {
        self.turns.load(Ordering::Relaxed)
    }

    /// Milliseconds since the last turn (saturating: never negative).
    pub fn age_ms(&self) -> u64 {
        uptime_ms().saturating_sub(self.last_ms.load(Ordering::Relaxed))
    }
}

/// Upper bounds of [`LatencyHistogram`]'s buckets, in milliseconds (the Prometheus `le`
/// labels are these in seconds); a final `+Inf` bucket holds the rest.
pub const LATENCY_BOUNDS_MS: [u64; 13] =
    [1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000];

/// A latency histogram with one writer (its loop), in whole milliseconds: the cores time
/// with their loop clock, which moves once per turn, so finer buckets would be fiction.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// `buckets[i]` counts values in `(LATENCY_BOUNDS_MS[i-1], LATENCY_BOUNDS_MS[i]]`; the last
    /// one counts values above every bound.
    buckets: [Counter; LATENCY_BOUNDS_MS.len() + 1],
    sum_ms: Counter,
    count: Counter,
}

impl LatencyHistogram {
    /// One observation. Only the owning loop calls this: a few relaxed stores.
    #[inline]
    pub fn record_ms(&self, ms: u64) {
        let i = LATENCY_BOUNDS_MS.partition_point(|&bound| bound < ms);
        self.buckets[i].inc();
        self.sum_ms.add(ms);
        self.count.inc();
    }

    /// Add this histogram's counts to `into` (for a sum over every core).
    pub fn add_to(&self, into: &mut HistogramSnapshot) {
        if into.buckets.is_empty() {
            into.buckets = LATENCY_BOUNDS_MS
                .iter()
                .map(|&ms| (ms as f64 / 1000.0, 0))
                .collect();
        }
        for (slot, counter) in into.buckets.iter_mut().zip(&self.buckets) {
            slot.1 += counter.get();
        }
        // Values over the last bound are in `count` only: the exposition's `+Inf` bucket.
        into.sum_seconds += self.sum_ms.get() as f64 / 1000.0;
        into.count += self.count.get();
    }
}

/// A latency histogram read at scrape time. `buckets` are `(upper bound in seconds, count in
/// that bucket alone)` in increasing order; a final `+Inf` bucket is added from `count`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HistogramSnapshot {
    pub buckets: Vec<(f64, u64)>,
    pub sum_seconds: f64,
    pub count: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_visible_to_other_threads() {
        let c = std::sync::Arc::new(Counter::default());
        let w = c.clone();
        std::thread::spawn(move || {
            for _ in 0..1000 {
                w.inc();
            }
            w.add(5);
        })
        .join()
        .unwrap();
        assert_eq!(c.get(), 1005);
    }

    #[test]
    fn heartbeat_ages_until_the_next_beat() {
        let h = Heartbeat::default();
        assert_eq!(h.turns(), 0);
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert!(h.age_ms() >= 30, "{}", h.age_ms());
        h.beat();
        assert_eq!(h.turns(), 1);
        assert!(h.age_ms() < 30, "{}", h.age_ms());
    }

    #[test]
    fn latency_lands_in_the_first_bucket_that_holds_it_and_sums_over_cores() {
        let (a, b) = (LatencyHistogram::default(), LatencyHistogram::default());
        a.record_ms(0);
        a.record_ms(1);
        a.record_ms(2);
        b.record_ms(3);
        b.record_ms(60_000);
        let mut s = HistogramSnapshot::default();
        a.add_to(&mut s);
        b.add_to(&mut s);
        assert_eq!(s.buckets.len(), LATENCY_BOUNDS_MS.len());
        assert_eq!(s.buckets[0], (0.001, 2));
        assert_eq!(s.buckets[1], (0.002, 1));
        assert_eq!(s.buckets[2], (0.005, 1));
        assert_eq!(s.buckets.iter().map(|b| b.1).sum::<u64>(), 4);
        assert_eq!(s.count, 5);
        assert!((s.sum_seconds - 60.006).abs() < 1e-9, "{}", s.sum_seconds);
    }
}
