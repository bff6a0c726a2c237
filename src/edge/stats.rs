//! Per-core counters. Each core writes only its own (a plain load and store, no locked
//! instruction on the hot path); the metrics endpoint reads all of them at scrape time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use crate::admission::PolicyRefusal;
use crate::session::{Count, Meter};

/// A counter with one writer (its core) and any number of readers.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Only the owning core calls this, so load + store cannot lose an increment.
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

impl CoreStats {
    /// The counter of one `ringway_policy_refusals_total` reason.
    pub fn refused(&self, why: PolicyRefusal) -> &Counter {
        &self.refusals[why as usize]
    }
}

impl Meter for CoreStats {
    fn count(&self, what: Count) {
        match what {
            Count::HandshakeOk => self.handshakes_ok.inc(),
            Count::HandshakeRejected => self.handshakes_rejected.inc(),
            Count::MessageIn => self.messages_in.inc(),
            Count::MessageOut => self.messages_out.inc(),
            Count::ProtocolError => self.protocol_errors.inc(),
            Count::Refused(why) => self.refused(why).inc(),
            Count::SlowConsumerClosed => self.overflow_closed.inc(),
            Count::SlowConsumerDropped => self.overflow_dropped.inc(),
        }
    }
}

/// What one core counts.
#[derive(Debug, Default)]
pub struct CoreStats {
    pub accepted: Counter,
    pub handshakes_ok: Counter,
    pub handshakes_rejected: Counter,
    pub messages_in: Counter,
    pub messages_out: Counter,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    pub protocol_errors: Counter,
    /// Replies for connections that were already gone (dropped, never misdelivered).
    pub stale_replies: Counter,
    /// Panics contained to one connection (that connection was closed 1011 or 500).
    pub panics: Counter,
    pub subscription_limit: Counter,
    /// Clients closed 1008 "slow consumer".
    pub overflow_closed: Counter,
    /// Topic or broadcast messages dropped for a full send queue (drop-newest policy).
    pub overflow_dropped: Counter,
    pub closed: Counter,
    /// Refused by the edge's policy, one counter per `reason` label of
    /// `ringway_policy_refusals_total` (indexed by `PolicyRefusal`; see `refused`).
    pub refusals: [Counter; PolicyRefusal::ALL.len()],
    /// Bytes of connection state and buffers this core holds (a gauge).
    pub buffer_bytes: Counter,
    /// Connections currently held by this core (handshaking, open or closing).
    pub live: Counter,
    /// The core's event loop: one beat per turn (at least every tick, 50 ms).
    pub heartbeat: Heartbeat,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_visible_to_other_threads() {
        let s = std::sync::Arc::new(CoreStats::default());
        let w = s.clone();
        std::thread::spawn(move || {
            for _ in 0..1000 {
                w.messages_in.inc();
            }
            w.bytes_in.add(5);
        })
        .join()
        .unwrap();
        assert_eq!(s.messages_in.get(), 1000);
        assert_eq!(s.bytes_in.get(), 5);
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
}
