//! Per-core counters (the [`Counter`] and [`Heartbeat`] types are in `crate::telemetry`, shared
//! with the relay). Each core writes only its own (a plain load and store, no locked
//! instruction on the hot path); the metrics endpoint reads all of them at scrape time.

use crate::telemetry::{Counter, Heartbeat, LatencyHistogram};

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
    /// Refused by the per-IP limits (429/503), a disallowed Origin (403), a failed token
    /// (401), or closed 1008 for exceeding the message rate.
    pub ip_refused: Counter,
    pub origin_refused: Counter,
    pub auth_failed: Counter,
    pub rate_limited: Counter,
    /// Open connections closed 1008 "token expired" when their JWT's `exp` passed.
    pub token_expired: Counter,
    /// Closed 1008 for a message of more frames than the route's max_fragments.
    pub fragment_limited: Counter,
    /// Refused with 503 because connection buffers used the whole memory budget.
    pub memory_refused: Counter,
    /// Connections closed 1008 "server memory budget" to bring the core back under it.
    pub memory_shed: Counter,
    /// Refused with 503 at accept because `max_connections` were open or handshaking.
    pub limit_refused: Counter,
    /// Bytes of connection state and buffers this core holds (a gauge).
    pub buffer_bytes: Counter,
    /// Connections currently held by this core (handshaking, open or closing).
    pub live: Counter,
    /// The core's event loop: one beat per turn (at least every tick, 50 ms).
    pub heartbeat: Heartbeat,
    /// Time from accept to the 101 response (on the core's loop clock), for
    /// `ringway_handshake_duration_seconds`.
    pub handshake_latency: LatencyHistogram,
}

impl CoreStats {
    /// A 101 went out for a connection accepted at `accepted_ms` (both on the core's loop
    /// clock).
    #[inline]
    pub fn record_handshake(&self, accepted_ms: u64, now_ms: u64) {
        self.handshake_latency
            .record_ms(now_ms.saturating_sub(accepted_ms));
    }
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
}
