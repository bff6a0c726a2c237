//! Per-core counters (the [`Counter`] and [`Heartbeat`] types are in `crate::telemetry`, shared
//! with the relay). Each core writes only its own (a plain load and store, no locked
//! instruction on the hot path); the metrics endpoint reads all of them at scrape time.

use crate::admission::PolicyRefusal;
use crate::session::compression::InflateFailure;
use crate::session::{Count, Meter, TlsFailure};
use crate::telemetry::{Counter, Heartbeat, LatencyHistogram};

impl CoreStats {
    /// The counter of one `ringway_policy_refusals_total` reason.
    pub fn refused(&self, why: PolicyRefusal) -> &Counter {
        &self.refusals[why as usize]
    }

    /// The counter of one `ringway_tls_handshake_failures_total` reason.
    pub fn tls_failed(&self, why: TlsFailure) -> &Counter {
        &self.tls_failures[why as usize]
    }
}

impl Meter for CoreStats {
    fn count(&self, what: Count) {
        match what {
            Count::HandshakeOk { latency_ms } => {
                self.handshakes_ok.inc();
                self.handshake_latency.record_ms(latency_ms);
            }
            Count::HandshakeRejected => self.handshakes_rejected.inc(),
            Count::MessageIn => self.messages_in.inc(),
            Count::MessageOut => self.messages_out.inc(),
            Count::ProtocolError => self.protocol_errors.inc(),
            Count::Refused(why) => self.refused(why).inc(),
            Count::SlowConsumerClosed => self.overflow_closed.inc(),
            Count::SlowConsumerDropped => self.overflow_dropped.inc(),
            Count::Compressed { before, after } => {
                self.deflate_compressed.inc();
                self.deflate_out_raw.add(before as u64);
                self.deflate_out_compressed.add(after as u64);
            }
            Count::CompressionSkipped => self.deflate_skipped.inc(),
            Count::DedicatedFallback => self.deflate_dedicated_fallbacks.inc(),
            Count::Inflated { before, after } => {
                self.deflate_inflated.inc();
                self.deflate_in_compressed.add(before as u64);
                self.deflate_in_raw.add(after as u64);
            }
            Count::InflateFailed(why) => self.inflate_failures[why as usize].inc(),
            Count::TlsFailure(why) => self.tls_failed(why).inc(),
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
    /// TLS failures, one counter per `reason` label of `ringway_tls_handshake_failures_total`
    /// (indexed by `TlsFailure`; see `tls_failed`).
    pub tls_failures: [Counter; TlsFailure::ALL.len()],
    /// Bytes of connection state and buffers this core holds (a gauge).
    pub buffer_bytes: Counter,
    /// Connections currently held by this core (handshaking, open or closing).
    pub live: Counter,
    /// The core's event loop: one beat per turn (at least every tick, 50 ms).
    pub heartbeat: Heartbeat,
    /// Time from accept to the 101 response (on the core's loop clock), for
    /// `ringway_handshake_duration_seconds`.
    pub handshake_latency: LatencyHistogram,
    /// permessage-deflate: messages compressed once each (a fan-out counts once per core),
    /// sent plain for their size, and inflated; bytes before and after, each way.
    pub deflate_compressed: Counter,
    pub deflate_skipped: Counter,
    pub deflate_inflated: Counter,
    pub deflate_out_raw: Counter,
    pub deflate_out_compressed: Counter,
    pub deflate_in_compressed: Counter,
    pub deflate_in_raw: Counter,
    /// `dedicated`: contexts (compressors and inflaters) held now, a gauge set once per
    /// loop turn; connections that got `shared` for the per-core cap.
    pub deflate_dedicated_contexts: Counter,
    pub deflate_dedicated_fallbacks: Counter,
    /// permessage-deflate payload bytes by route path, as
    /// [out raw, out compressed, in compressed, in raw] (`session::compression::OUT_RAW`...):
    /// each connection's own messages. Written once per loop turn, read by a scrape.
    pub route_deflate: std::sync::Mutex<std::collections::HashMap<String, [u64; 4]>>,
    /// Indexed by `InflateFailure`.
    pub inflate_failures: [Counter; InflateFailure::ALL.len()],
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
