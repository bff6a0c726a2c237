//! Per-core counters (the [`Counter`] and [`Heartbeat`] types are in `crate::telemetry`, shared
//! with the relay). Each core writes only its own (a plain load and store, no locked
//! instruction on the hot path); the metrics endpoint reads all of them at scrape time.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use crate::admission::PolicyRefusal;
use crate::ids::UpstreamId;
use crate::route::{RouteId, RouteTable};
use crate::session::compression::InflateFailure;
use crate::session::{Count, Meter, TlsFailure};
use crate::telemetry::{Counter, Heartbeat, LatencyHistogram};

/// `ringway_closes_total{code}` labels: the codes RFC 6455 and IANA define one by one, the
/// registered and private ranges as one label each (a client picks any code in them, and a
/// label per code would let it grow the exposition), and anything else.
pub const CLOSE_CODE_LABELS: [&str; 19] = [
    "1000", "1001", "1002", "1003", "1004", "1005", "1006", "1007", "1008", "1009", "1010", "1011",
    "1012", "1013", "1014", "1015", "3xxx", "4xxx", "other",
];

/// The index of `code`'s label in [`CLOSE_CODE_LABELS`].
pub fn close_code_index(code: u16) -> usize {
    match code {
        1000..=1015 => (code - 1000) as usize,
        3000..=3999 => 16,
        4000..=4999 => 17,
        _ => 18,
    }
}

/// Which side closed first, as the `side` label: `client` or `server`.
pub const CLOSE_SIDES: [&str; 2] = ["client", "server"];

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

impl CoreStats {
    /// A WebSocket connection ended with close `code`, `by_client` first or not.
    pub fn closed_with(&self, code: u16, by_client: bool) {
        self.closes[usize::from(!by_client)][close_code_index(code)].inc();
    }
}

impl Meter for CoreStats {
    fn count(&self, what: Count) {
        match what {
            Count::HandshakeOk { latency_ms, .. } => {
                self.handshakes_ok.inc();
                self.handshake_latency.record_ms(latency_ms);
            }
            Count::HandshakeRejected => self.handshakes_rejected.inc(),
            Count::MessageIn { .. } => self.messages_in.inc(),
            Count::MessageOut { .. } => self.messages_out.inc(),
            Count::Relayed { .. } => {}
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
    /// WebSocket connections ended, by side that closed first (`CLOSE_SIDES`) and close code
    /// (`close_code_index`).
    pub closes: [[Counter; CLOSE_CODE_LABELS.len()]; 2],
    /// Per-route traffic by route path (which outlives a reload's renumbering), added by
    /// the core once per loop turn when it has any ([`RouteTraffic::publish`]).
    pub routes: Mutex<HashMap<String, RouteTotals>>,
}

/// Index of the `in` (from clients) and `out` (to clients) direction in per-route arrays.
pub const IN: usize = 0;
pub const OUT: usize = 1;

/// One route's traffic since start on one core, as a scrape reads it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RouteTotals {
    /// WebSocket connections opened (101 sent) and, of those, ended.
    pub opened: u64,
    pub closed: u64,
    /// Data messages and socket bytes of its open connections, [in, out].
    pub messages: [u64; 2],
    pub bytes: [u64; 2],
    /// Client messages handed to each upstream, by upstream name.
    pub relayed: BTreeMap<String, u64>,
}

/// What one core counted per route since it last published, by route id of the core's
/// table. Only its core touches it (cells, no atomics); [`RouteTraffic::publish`] moves it
/// into the shared [`CoreStats::routes`] once per loop turn.
#[derive(Debug, Default)]
pub struct RouteTraffic {
    routes: Vec<RouteCells>,
    dirty: Cell<bool>,
}

#[derive(Debug, Default)]
struct RouteCells {
    opened: Cell<u64>,
    closed: Cell<u64>,
    messages: [Cell<u64>; 2],
    bytes: [Cell<u64>; 2],
    /// By upstream id.
    relayed: Vec<Cell<u64>>,
}

impl RouteCells {
    fn is_zero(&self) -> bool {
        let cells = [&self.opened, &self.closed];
        cells
            .into_iter()
            .chain(&self.messages)
            .chain(&self.bytes)
            .chain(&self.relayed)
            .all(|c| c.get() == 0)
    }
}

fn bump(c: &Cell<u64>, n: u64) {
    c.set(c.get() + n);
}

impl RouteTraffic {
    /// Empty counts for every route and upstream of `table`.
    pub fn for_table(table: &RouteTable) -> RouteTraffic {
        let upstreams = table.upstreams().len();
        RouteTraffic {
            routes: (0..table.routes().len())
                .map(|_| RouteCells {
                    relayed: (0..upstreams).map(|_| Cell::new(0)).collect(),
                    ..Default::default()
                })
                .collect(),
            dirty: Cell::new(false),
        }
    }

    fn cells(&self, route: RouteId) -> Option<&RouteCells> {
        self.dirty.set(true);
        self.routes.get(route as usize)
    }

    pub fn opened(&self, route: RouteId) {
        if let Some(c) = self.cells(route) {
            bump(&c.opened, 1);
        }
    }

    pub fn closed(&self, route: RouteId) {
        if let Some(c) = self.cells(route) {
            bump(&c.closed, 1);
        }
    }

    /// A data message each way (`IN` or `OUT`).
    pub fn message(&self, route: RouteId, direction: usize) {
        if let Some(c) = self.cells(route) {
            bump(&c.messages[direction], 1);
        }
    }

    /// Socket bytes of an open connection each way (`IN` or `OUT`).
    pub fn bytes(&self, route: RouteId, direction: usize, n: usize) {
        if let Some(c) = self.cells(route) {
            bump(&c.bytes[direction], n as u64);
        }
    }

    pub fn relayed(&self, route: RouteId, upstream: UpstreamId) {
        if let Some(c) = self
            .cells(route)
            .and_then(|c| c.relayed.get(upstream as usize))
        {
            bump(c, 1);
        }
    }

    /// Add what was counted since the last call to `into`, by the path and upstream names
    /// of `table` (the table the counts were made with), and start again from zero.
    pub fn publish(&self, table: &RouteTable, into: &Mutex<HashMap<String, RouteTotals>>) {
        if !self.dirty.replace(false) {
            return;
        }
        let mut totals = into.lock().unwrap_or_else(|e| e.into_inner());
        for (route, c) in table.routes().iter().zip(&self.routes) {
            if c.is_zero() {
                // Untouched this turn: no lookup (a table may have hundreds of routes).
                continue;
            }
            let t = match totals.get_mut(route.path.as_str()) {
                Some(t) => t,
                None => totals.entry(route.path.clone()).or_default(),
            };
            t.opened += c.opened.take();
            t.closed += c.closed.take();
            for d in [IN, OUT] {
                t.messages[d] += c.messages[d].take();
                t.bytes[d] += c.bytes[d].take();
            }
            for (upstream, n) in table.upstreams().iter().zip(&c.relayed) {
                let n = n.take();
                if n > 0 {
                    *t.relayed.entry(upstream.name.clone()).or_default() += n;
                }
            }
        }
    }
}

/// A core's [`Meter`]: its shared counters, and its per-route counts.
#[derive(Debug)]
pub struct CoreMeter {
    pub stats: Arc<CoreStats>,
    pub routes: RouteTraffic,
}

impl Meter for CoreMeter {
    fn count(&self, what: Count) {
        self.stats.count(what);
        match what {
            Count::HandshakeOk { route, .. } => self.routes.opened(route),
            Count::MessageIn { route } => self.routes.message(route, IN),
            Count::MessageOut { route } => self.routes.message(route, OUT),
            Count::Relayed { route, upstream } => self.routes.relayed(route, upstream),
            _ => {}
        }
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

    #[test]
    fn close_codes_get_a_bounded_set_of_labels() {
        assert_eq!(CLOSE_CODE_LABELS[close_code_index(1000)], "1000");
        assert_eq!(CLOSE_CODE_LABELS[close_code_index(1015)], "1015");
        assert_eq!(CLOSE_CODE_LABELS[close_code_index(3001)], "3xxx");
        assert_eq!(CLOSE_CODE_LABELS[close_code_index(4999)], "4xxx");
        for odd in [0, 999, 1016, 2999, 5000, u16::MAX] {
            assert_eq!(CLOSE_CODE_LABELS[close_code_index(odd)], "other");
        }
        let s = CoreStats::default();
        s.closed_with(4321, true);
        s.closed_with(1001, false);
        assert_eq!(s.closes[0][17].get(), 1, "client, 4xxx");
        assert_eq!(s.closes[1][1].get(), 1, "server, 1001");
    }

    #[test]
    fn route_counts_reach_the_totals_by_path_and_upstream_name_once() {
        let config: crate::config::Config = toml::from_str(
            r#"
            [[upstreams]]
            name = "chat"
            backends = ["tcp://127.0.0.1:9"]
            [[routes]]
            path = "/a"
            upstream = "chat"
            [[routes]]
            path = "/b"
            "#,
        )
        .unwrap();
        let table = RouteTable::from_config(&config).unwrap();
        let (a, _) = table.match_path("/a").unwrap();
        let chat = table.routes()[a as usize].upstream;
        let meter = CoreMeter {
            stats: Arc::new(CoreStats::default()),
            routes: RouteTraffic::for_table(&table),
        };
        meter.count(Count::HandshakeOk {
            latency_ms: 1,
            route: a,
        });
        meter.count(Count::MessageIn { route: a });
        meter.count(Count::Relayed {
            route: a,
            upstream: chat,
        });
        meter.count(Count::MessageOut { route: a });
        meter.routes.bytes(a, IN, 10);
        meter.routes.bytes(a, OUT, 7);
        // Ids from a hostile or stale source count nowhere and panic nowhere.
        meter.routes.relayed(a, UpstreamId::MAX);
        meter.routes.message(RouteId::MAX, IN);
        meter.routes.publish(&table, &meter.stats.routes);
        meter.routes.publish(&table, &meter.stats.routes);
        let totals = meter.stats.routes.lock().unwrap();
        let t = &totals["/a"];
        assert_eq!((t.opened, t.closed), (1, 0));
        assert_eq!((t.messages, t.bytes), ([1, 1], [10, 7]));
        assert_eq!(t.relayed, BTreeMap::from([("chat".to_string(), 1)]));
        assert!(
            !totals.contains_key("/b"),
            "a route that saw nothing is not listed"
        );
        assert_eq!(meter.stats.messages_in.get(), 1, "the core's counters too");
    }
}
