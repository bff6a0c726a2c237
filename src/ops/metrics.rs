//! Prometheus text exposition (format 0.0.4), rendered at scrape time from what the data path
//! already counts: every core's [`CoreStats`] and every backend link's [`LinkState`]. Nothing is
//! registered or updated on the hot path; a scrape reads relaxed atomics and formats them.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::admission::PolicyRefusal;
use crate::edge::stats::{RouteTotals, CLOSE_CODE_LABELS, CLOSE_SIDES, IN, OUT};
use crate::edge::CoreStats;
use crate::relay::link::tls::BackendTlsFailure;
use crate::relay::link::LinkState;
use crate::relay::RelayGauges;
pub use crate::relay::UpstreamLink;
use crate::session::compression::InflateFailure;
use crate::session::TlsFailure;
use crate::telemetry::{Heartbeat, HistogramSnapshot};
use std::collections::BTreeMap;

/// `ringway_route_deflate_bytes` labels in the order of `CoreStats::route_deflate`'s arrays.
const ROUTE_DEFLATE_LABELS: [(&str, &str); 4] = [
    ("out", "raw"),
    ("out", "compressed"),
    ("in", "compressed"),
    ("in", "raw"),
];

/// The `Content-Type` of what [`render`] returns.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Reads a value at scrape time.
pub type Probe<T> = Arc<dyn Fn() -> T + Send + Sync>;

/// Everything a scrape reads. Cheap to clone (`Arc`s and names).
#[derive(Clone)]
pub struct Sources {
    /// Index in this vector = the `core` label.
    pub cores: Vec<Arc<CoreStats>>,
    pub links: Vec<UpstreamLink>,
    /// Connections open or in their handshake across all cores (what `max_connections`
    /// counts).
    pub open_connections: Probe<u64>,
    /// The memory budget in force, in bytes.
    pub memory_budget: Probe<u64>,
    /// The relay thread's heartbeat; `None` when no relay runs (`local-echo`).
    pub relay_heartbeat: Option<Arc<Heartbeat>>,
    /// What the relay holds for peers and what it refused or dropped.
    pub relay: Arc<RelayGauges>,
    /// (name, notAfter in Unix seconds) of every certificate in force.
    pub certificates: Probe<Vec<(String, i64)>>,
}

impl fmt::Debug for Sources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sources")
            .field("cores", &self.cores.len())
            .field("links", &self.links)
            .finish()
    }
}

/// The whole exposition for one scrape.
pub fn render(sources: &Sources) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(sources.clone()));
    let mut out = String::with_capacity(4096);
    // Writing to a String cannot fail and our collector returns no errors of its own.
    prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
        .expect("formatting metrics into a String");
    out
}

type Labels = Vec<(&'static str, String)>;

fn counters(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, u64)>,
) -> fmt::Result {
    let mut family = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in rows {
        ConstCounter::new(v).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn gauges(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, u64)>,
) -> fmt::Result {
    let mut family = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        ConstGauge::new(v).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn float_gauges(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, f64)>,
) -> fmt::Result {
    let mut family = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        ConstGauge::new(v).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Sources {
    /// `ringway_route_*` and `ringway_upstream_messages`: every core's per-route totals,
    /// summed by route path.
    fn encode_routes(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        let mut all: BTreeMap<String, RouteTotals> = BTreeMap::new();
        for core in &self.cores {
            let totals = core.routes.lock().unwrap_or_else(|e| e.into_inner());
            for (path, t) in totals.iter() {
                let sum = all.entry(path.clone()).or_default();
                sum.opened += t.opened;
                sum.closed += t.closed;
                for d in [IN, OUT] {
                    sum.messages[d] += t.messages[d];
                    sum.bytes[d] += t.bytes[d];
                }
                for (upstream, n) in &t.relayed {
                    *sum.relayed.entry(upstream.clone()).or_default() += n;
                }
            }
        }
        let route = |path: &String| -> Labels { vec![("route", path.clone())] };
        let each_way = |path: &String, read: &dyn Fn(usize) -> u64| {
            [(IN, "in"), (OUT, "out")].map(|(d, name)| {
                let mut labels = route(path);
                labels.push(("direction", name.to_string()));
                (labels, read(d))
            })
        };
        counters(
            e,
            "ringway_route_connections",
            "WebSocket connections opened (101 sent) per route (its path pattern)",
            all.iter().map(|(p, t)| (route(p), t.opened)),
        )?;
        gauges(
            e,
            "ringway_route_connections_open",
            "WebSocket connections open per route (a connection whose route a reload removed counts on the default route until it is gone)",
            all.iter()
                .map(|(p, t)| (route(p), t.opened.saturating_sub(t.closed))),
        )?;
        counters(
            e,
            "ringway_route_messages",
            "WebSocket data messages per route, from (in) and to (out) its clients",
            all.iter()
                .flat_map(|(p, t)| each_way(p, &|d| t.messages[d])),
        )?;
        counters(
            e,
            "ringway_route_bytes",
            "Socket bytes of WebSocket connections per route once the upgrade is accepted (the 101, frames, TLS records), from (in) and to (out) its clients",
            all.iter().flat_map(|(p, t)| each_way(p, &|d| t.bytes[d])),
        )?;
        counters(
            e,
            "ringway_upstream_messages",
            "Client messages handed to each upstream, per route",
            all.iter().flat_map(|(p, t)| {
                t.relayed.iter().map(move |(u, n)| {
                    let mut labels = route(p);
                    labels.push(("upstream", u.clone()));
                    (labels, *n)
                })
            }),
        )
    }

    /// Every event loop's heartbeat, labelled `loop` (`core0`, ..., `relay`).
    fn per_loop<T>(&self, read: impl Fn(&Heartbeat) -> T) -> Vec<(Labels, T)> {
        super::health::loops(&self.cores, self.relay_heartbeat.as_deref())
            .into_iter()
            .map(|(name, h)| (vec![("loop", name)], read(h)))
            .collect()
    }

    /// One row per core of `read(core)`, labelled `core` plus `extra`.
    fn per_core(
        &self,
        extra: &[(&'static str, &'static str)],
        read: impl Fn(&CoreStats) -> u64,
    ) -> Vec<(Labels, u64)> {
        self.cores
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let mut labels: Labels = vec![("core", i.to_string())];
                labels.extend(extra.iter().map(|&(k, v)| (k, v.to_string())));
                (labels, read(s))
            })
            .collect()
    }

    fn per_link(&self, read: impl Fn(&LinkState) -> u64) -> Vec<(Labels, u64)> {
        self.links
            .iter()
            .map(|l| {
                (
                    vec![
                        ("upstream", l.upstream.clone()),
                        ("backend", l.backend.clone()),
                    ],
                    read(&l.state),
                )
            })
            .collect()
    }
}

impl Sources {
    /// `ringway_cluster_*`, with `[cluster]` only (src/relay/cluster/).
    fn encode_cluster(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        use crate::relay::cluster::Drop;
        let c = &self.relay.cluster;
        gauges(
            e,
            "ringway_cluster_connected",
            "1 while the connection to NATS (the cluster bus) is up",
            [(
                Labels::new(),
                u64::from(c.connected.load(Ordering::Relaxed)),
            )],
        )?;
        gauges(
            e,
            "ringway_cluster_nodes",
            "Cluster nodes (this one included) whose heartbeat came through NATS in the last 3 s",
            [(Labels::new(), c.nodes.load(Ordering::Relaxed))],
        )?;
        counters(
            e,
            "ringway_cluster_messages",
            "Messages published to the cluster bus (out) and taken from it (in)",
            [
                (
                    vec![("direction", "out".to_string())],
                    c.sent.load(Ordering::Relaxed),
                ),
                (
                    vec![("direction", "in".to_string())],
                    c.received.load(Ordering::Relaxed),
                ),
            ],
        )?;
        counters(
            e,
            "ringway_cluster_dropped",
            "Cross-node messages dropped: buffer_full (relay -> NATS), inbound_full (NATS -> relay), disconnected (NATS unreachable), node_id_conflict, invalid (from NATS), publish_failed, unknown_node (no heartbeat from the addressed node), slow_consumer (the NATS client's per-subscription buffer was full)",
            Drop::ALL
                .iter()
                .map(|&d| (vec![("reason", d.label().to_string())], c.dropped(d))),
        )?;
        counters(
            e,
            "ringway_cluster_node_id_conflicts",
            "Heartbeats in which another node name claimed this node's id",
            [(Labels::new(), c.id_conflicts.load(Ordering::Relaxed))],
        )?;
        float_gauges(
            e,
            "ringway_cluster_ping_seconds",
            "The last round trip of a message through NATS (published by this node, received back), every second",
            [(
                Labels::new(),
                c.ping_us.load(Ordering::Relaxed) as f64 / 1e6,
            )],
        )
    }
}

impl Collector for Sources {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let e = &mut enc;
        counters(
            e,
            "ringway_connections_accepted",
            "TCP connections accepted",
            self.per_core(&[], |s| s.accepted.get()),
        )?;
        counters(
            e,
            "ringway_connections_closed",
            "Connections closed, for any reason and in any state",
            self.per_core(&[], |s| s.closed.get()),
        )?;
        gauges(
            e,
            "ringway_connections_open",
            "Connections open or in their handshake across all cores (what max_connections counts)",
            [(Labels::new(), (self.open_connections)())],
        )?;
        gauges(
            e,
            "ringway_connections_held",
            "Connections a core holds: handshaking, open or closing",
            self.per_core(&[], |s| s.live.get()),
        )?;
        let mut handshakes = self.per_core(&[("result", "ok")], |s| s.handshakes_ok.get());
        handshakes
            .extend(self.per_core(&[("result", "rejected")], |s| s.handshakes_rejected.get()));
        counters(
            e,
            "ringway_handshakes",
            "Opening handshakes answered: 101 (ok) or an HTTP error (rejected)",
            handshakes,
        )?;
        let mut messages = self.per_core(&[("direction", "in")], |s| s.messages_in.get());
        messages.extend(self.per_core(&[("direction", "out")], |s| s.messages_out.get()));
        counters(
            e,
            "ringway_messages",
            "WebSocket data messages received from (in) and sent to (out) clients",
            messages,
        )?;
        let mut bytes = self.per_core(&[("direction", "in")], |s| s.bytes_in.get());
        bytes.extend(self.per_core(&[("direction", "out")], |s| s.bytes_out.get()));
        counters(
            e,
            "ringway_bytes",
            "Bytes read from and written to client sockets (handshakes and frames)",
            bytes,
        )?;
        self.encode_routes(e)?;
        let mut closes = Vec::new();
        for (side_i, side) in CLOSE_SIDES.iter().enumerate() {
            for (code_i, code) in CLOSE_CODE_LABELS.iter().enumerate() {
                let n: u64 = self
                    .cores
                    .iter()
                    .map(|s| s.closes[side_i][code_i].get())
                    .sum();
                if n > 0 {
                    closes.push((
                        vec![("code", code.to_string()), ("side", side.to_string())],
                        n,
                    ));
                }
            }
        }
        counters(
            e,
            "ringway_closes",
            "WebSocket connections ended, by close code (1006: TCP ended without a close frame; 3xxx, 4xxx: the registered and private ranges) and by the side that closed first (client: its close frame, or its FIN or reset, came first)",
            closes,
        )?;
        counters(
            e,
            "ringway_protocol_errors",
            "Connections closed for breaking RFC 6455 (close 1002, 1007 or 1009)",
            self.per_core(&[], |s| s.protocol_errors.get()),
        )?;
        counters(
            e,
            "ringway_stale_replies",
            "Backend replies for connections that were already gone (dropped)",
            self.per_core(&[], |s| s.stale_replies.get()),
        )?;
        counters(
            e,
            "ringway_panics",
            "Panics contained to one connection, which was closed (1011, or 500 in its handshake)",
            self.per_core(&[], |s| s.panics.get()),
        )?;
        counters(
            e,
            "ringway_subscription_limit",
            "Subscriptions ignored because the connection reached max_subscriptions",
            self.per_core(&[], |s| s.subscription_limit.get()),
        )?;
        let refused = PolicyRefusal::ALL
            .into_iter()
            .flat_map(|why| self.per_core(&[("reason", why.label())], |s| s.refused(why).get()))
            .collect::<Vec<_>>();
        counters(
            e,
            "ringway_policy_refusals",
            "Clients refused by the edge policy: per-IP limits (429/503), Origin (403), token (401), message rate, fragments per message or token expiry (close 1008), memory budget (503, or close 1008 for the largest holders: memory_shed), connection limit (503)",
            refused,
        )?;
        let tls = TlsFailure::ALL
            .into_iter()
            .flat_map(|why| self.per_core(&[("reason", why.label())], |s| s.tls_failed(why).get()))
            .collect::<Vec<_>>();
        counters(
            e,
            "ringway_tls_handshake_failures",
            "TLS connections that failed, by reason: plaintext HTTP or other non-TLS bytes on the TLS port, no handshake within handshake_timeout_ms, no common ALPN protocol (h2 only), no common version or suite, an alert from the client, a protocol violation, the client closing TCP mid-handshake without an alert (eof_during_handshake)",
            tls,
        )?;
        gauges(
            e,
            "ringway_buffer_bytes",
            "Bytes of connection state and buffers a core holds (counted by the memory budget)",
            self.per_core(&[], |s| s.buffer_bytes.get()),
        )?;
        gauges(
            e,
            "ringway_relay_buffer_bytes",
            "Bytes the relay holds for peers: core inboxes, backend link queues, stored opens, chat rooms (counted by the memory budget)",
            [(Labels::new(), self.relay.held())],
        )?;
        counters(
            e,
            "ringway_relay_inbox_dropped",
            "Replies dropped because a core's inbox stayed full (messages, publishes, broadcasts, subscribes)",
            [(Labels::new(), self.relay.inbox_dropped.load(Ordering::Relaxed))],
        )?;
        counters(
            e,
            "ringway_relay_limit_refusals",
            "Refused by the relay's limits: topic or room names over 256 bytes, chat joins past the room limit, client messages past a backend's buffer (closed 1013)",
            [
                (
                    vec![("reason", "topic_length".to_string())],
                    self.relay.topic_refused.load(Ordering::Relaxed),
                ),
                (
                    vec![("reason", "rooms".to_string())],
                    self.relay.rooms_refused.load(Ordering::Relaxed),
                ),
                (
                    vec![("reason", "upstream_buffer".to_string())],
                    self.relay.buffer_refused.load(Ordering::Relaxed),
                ),
            ],
        )?;
        counters(
            e,
            "ringway_relay_forwarded",
            "Client messages the relay queued for a backend link",
            [(Labels::new(), self.relay.forwarded.load(Ordering::Relaxed))],
        )?;
        counters(
            e,
            "ringway_relay_misaddressed",
            "Backend replies naming a core this gateway does not have (corrupt or forged connection ids), dropped",
            [(Labels::new(), self.relay.misaddressed.load(Ordering::Relaxed))],
        )?;
        if self.relay.cluster.enabled.load(Ordering::Relaxed) {
            self.encode_cluster(e)?;
        }
        gauges(
            e,
            "ringway_memory_budget_bytes",
            "Connection buffers across all cores beyond which new connections get 503",
            [(Labels::new(), (self.memory_budget)())],
        )?;
        let mut z = self.per_core(&[("direction", "out"), ("form", "raw")], |s| {
            s.deflate_out_raw.get()
        });
        z.extend(
            self.per_core(&[("direction", "out"), ("form", "compressed")], |s| {
                s.deflate_out_compressed.get()
            }),
        );
        z.extend(
            self.per_core(&[("direction", "in"), ("form", "compressed")], |s| {
                s.deflate_in_compressed.get()
            }),
        );
        z.extend(self.per_core(&[("direction", "in"), ("form", "raw")], |s| {
            s.deflate_in_raw.get()
        }));
        counters(
            e,
            "ringway_deflate_bytes",
            "permessage-deflate payload bytes before (raw) and after (compressed) compression, out and in",
            z,
        )?;
        let mut m = self.per_core(&[("result", "compressed")], |s| s.deflate_compressed.get());
        m.extend(self.per_core(&[("result", "skipped")], |s| s.deflate_skipped.get()));
        m.extend(self.per_core(&[("result", "inflated")], |s| s.deflate_inflated.get()));
        counters(
            e,
            "ringway_deflate_messages",
            "permessage-deflate messages: compressed (a fan-out once per core), sent plain under compression_min_bytes, inflated",
            m,
        )?;
        let mut r = Vec::new();
        for (core, s) in self.cores.iter().enumerate() {
            let totals = s.route_deflate.lock().unwrap_or_else(|e| e.into_inner());
            for (route, bytes) in totals.iter() {
                for (i, (direction, form)) in ROUTE_DEFLATE_LABELS.iter().enumerate() {
                    let labels: Labels = vec![
                        ("core", core.to_string()),
                        ("route", route.clone()),
                        ("direction", direction.to_string()),
                        ("form", form.to_string()),
                    ];
                    r.push((labels, bytes[i]));
                }
            }
        }
        counters(
            e,
            "ringway_route_deflate_bytes",
            "permessage-deflate payload bytes per route before (raw) and after (compressed) compression: every connection's messages, so a fan-out compressed once per core counts once per recipient",
            r,
        )?;
        gauges(
            e,
            "ringway_deflate_dedicated_contexts",
            "compression = \"dedicated\": per-connection compressors and inflaters held now (each charged to the memory budget)",
            self.per_core(&[], |s| s.deflate_dedicated_contexts.get()),
        )?;
        counters(
            e,
            "ringway_deflate_dedicated_fallbacks",
            "compression = \"dedicated\" connections that got \"shared\": their core had compression_dedicated_per_core",
            self.per_core(&[], |s| s.deflate_dedicated_fallbacks.get()),
        )?;
        let mut f = Vec::new();
        for why in InflateFailure::ALL {
            f.extend(self.per_core(&[("reason", why.label())], |s| {
                s.inflate_failures[why as usize].get()
            }));
        }
        counters(
            e,
            "ringway_inflate_failures",
            "Compressed client messages refused: too_large (1009), corrupt or invalid_utf8 (1007)",
            f,
        )?;
        let mut slow = self.per_core(&[("action", "closed")], |s| s.overflow_closed.get());
        slow.extend(self.per_core(&[("action", "dropped")], |s| s.overflow_dropped.get()));
        counters(
            e,
            "ringway_slow_consumer",
            "Full send queues: client closed 1008, or a topic message dropped (drop-newest)",
            slow,
        )?;
        gauges(
            e,
            "ringway_upstream_up",
            "1 while the link to this backend is connected and greeted",
            self.per_link(|l| l.live.load(Ordering::Relaxed) as u64),
        )?;
        counters(
            e,
            "ringway_upstream_reconnects",
            "Times the link to this backend was re-established",
            self.per_link(|l| l.reconnects.load(Ordering::Relaxed)),
        )?;
        counters(
            e,
            "ringway_upstream_stalled",
            "Times the link to this backend was dropped because the backend did not read (pongs/gone piled up, or a write blocked past 5 s)",
            self.per_link(|l| l.stalled.load(Ordering::Relaxed)),
        )?;
        gauges(
            e,
            "ringway_upstream_queued_messages",
            "Messages waiting for this backend (limited by buffer_messages)",
            self.per_link(|l| l.queued.load(Ordering::Relaxed) as u64),
        )?;
        gauges(
            e,
            "ringway_upstream_queued_bytes",
            "Bytes of messages waiting for this backend",
            self.per_link(|l| l.queued_bytes.load(Ordering::Relaxed) as u64),
        )?;
        let tls_links = || {
            self.links
                .iter()
                .filter(|l| l.backend.starts_with("tls://"))
        };
        let backend_tls = BackendTlsFailure::ALL.into_iter().flat_map(|why| {
            tls_links().map(move |l| {
                let labels = vec![
                    ("upstream", l.upstream.clone()),
                    ("backend", l.backend.clone()),
                    ("reason", why.label().to_string()),
                ];
                (labels, l.state.tls_failed(why))
            })
        });
        counters(
            e,
            "ringway_backend_tls_failures",
            "TLS connections to a tls:// backend that failed (each retried with backoff), by reason: its certificate from another CA, for another name, expired or not yet valid, otherwise bad; an alert from it (such as our client certificate refused); a protocol error; closed or no handshake within 5 s",
            backend_tls.collect::<Vec<_>>(),
        )?;
        let now = crate::tls::expiry::unix_now();
        float_gauges(
            e,
            "ringway_tls_certificate_expiry_seconds",
            "Seconds until the certificate's notAfter (negative: expired); name is its first DNS name, else its file",
            (self.certificates)()
                .into_iter()
                .map(|(name, after)| (vec![("name", name)], (after - now) as f64)),
        )?;
        float_gauges(
            e,
            "ringway_loop_heartbeat_age_seconds",
            "Time since this event loop (a core or the relay) last turned; over 2 s /healthz says it stalled",
            self.per_loop(|h| h.age_ms() as f64 / 1000.0),
        )?;
        counters(
            e,
            "ringway_loop_turns",
            "Times this event loop (a core or the relay) turned",
            self.per_loop(|h| h.turns()),
        )?;
        let mut h = HistogramSnapshot::default();
        for core in &self.cores {
            core.handshake_latency.add_to(&mut h);
        }
        let mut family = e.encode_descriptor(
            "ringway_handshake_duration_seconds",
            "Time from accept to the 101 response (1 ms resolution: the core's loop clock)",
            None,
            MetricType::Histogram,
        )?;
        family.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            h.sum_seconds,
            h.count,
            &h.buckets,
            None,
        )?;
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::{BTreeMap, HashMap};

    /// `name{k="v",...} value` lines -> (name, sorted labels) -> value; checks every sample's
    /// family was declared with `# TYPE` first.
    pub(crate) fn parse(text: &str) -> HashMap<(String, BTreeMap<String, String>), f64> {
        let mut declared = std::collections::HashSet::new();
        let mut samples = HashMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split(' ');
                let name = parts.next().unwrap().to_string();
                let kind = parts.next().unwrap();
                assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
                declared.insert(name);
                continue;
            }
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect(line);
            let (name, labels) = match series.split_once('{') {
                Some((n, l)) => (n, l.strip_suffix('}').expect(line)),
                None => (series, ""),
            };
            let labels: BTreeMap<String, String> = labels
                .split(',')
                .filter(|l| !l.is_empty())
                .map(|l| {
                    let (k, v) = l.split_once('=').expect(line);
                    (k.to_string(), v.trim_matches('"').to_string())
                })
                .collect();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| declared.contains(*f)))
                .unwrap_or(name);
            assert!(
                declared.contains(family),
                "sample before its # TYPE: {line}"
            );
            let value = if value == "+Inf" {
                f64::INFINITY
            } else {
                value.parse().expect(line)
            };
            assert!(
                samples.insert((name.to_string(), labels), value).is_none(),
                "duplicate series: {line}"
            );
        }
        samples
    }

    pub(crate) fn get(
        samples: &HashMap<(String, BTreeMap<String, String>), f64>,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Option<f64> {
        let key = (
            name.to_string(),
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        samples.get(&key).copied()
    }

    pub(crate) fn sample_sources() -> Sources {
        let a = Arc::new(CoreStats::default());
        let b = Arc::new(CoreStats::default());
        a.accepted.add(10);
        b.accepted.add(3);
        a.handshakes_ok.add(9);
        a.handshakes_rejected.add(1);
        b.messages_in.add(5);
        b.messages_out.add(7);
        a.bytes_in.add(1234);
        b.bytes_out.add(99);
        b.protocol_errors.inc();
        a.stale_replies.add(2);
        b.overflow_closed.add(4);
        b.overflow_dropped.add(6);
        a.live.set(8);
        b.refused(PolicyRefusal::Memory).add(2);
        a.buffer_bytes.set(4096);
        let up = Arc::new(LinkState::default());
        up.live.store(true, Ordering::Relaxed);
        up.reconnects.store(3, Ordering::Relaxed);
        let down = Arc::new(LinkState::default());
        down.queued.store(12, Ordering::Relaxed);
        down.queued_bytes.store(3400, Ordering::Relaxed);
        Sources {
            cores: vec![a, b],
            links: vec![
                UpstreamLink {
                    upstream: "chat".into(),
                    backend: "tcp://10.0.0.5:9000".into(),
                    state: up,
                },
                UpstreamLink {
                    upstream: "chat".into(),
                    backend: "unix:/run/chat.sock".into(),
                    state: down,
                },
            ],
            open_connections: Arc::new(|| 42),
            memory_budget: Arc::new(|| 1 << 30),
            relay_heartbeat: Some(Arc::new(Heartbeat::default())),
            relay: {
                let r = Arc::new(RelayGauges::default());
                r.charge(777);
                r
            },
            certificates: Arc::new(|| {
                vec![("a.test".into(), crate::tls::expiry::unix_now() + 3600)]
            }),
        }
    }

    #[test]
    fn backend_tls_failures_and_certificate_expiry() {
        let mut sources = sample_sources();
        let state = Arc::new(LinkState::default());
        state.tls_failures[BackendTlsFailure::UnknownCa as usize].store(2, Ordering::Relaxed);
        let backend = "tls://b.test:443";
        let (upstream, state) = ("api".into(), state);
        sources.links.push(UpstreamLink {
            upstream,
            backend: backend.into(),
            state,
        });
        let s = parse(&render(&sources));
        let name = "ringway_backend_tls_failures_total";
        let at = |r| {
            get(
                &s,
                name,
                &[("upstream", "api"), ("backend", backend), ("reason", r)],
            )
        };
        assert_eq!((at("unknown_ca"), at("wrong_name")), (Some(2.0), Some(0.0)));
        let plain = [
            ("upstream", "chat"),
            ("backend", "tcp://10.0.0.5:9000"),
            ("reason", "unknown_ca"),
        ];
        assert_eq!(get(&s, name, &plain), None, "no TLS rows for plain links");
        let left = get(
            &s,
            "ringway_tls_certificate_expiry_seconds",
            &[("name", "a.test")],
        )
        .unwrap();
        assert!((3590.0..=3600.0).contains(&left), "{left}");
    }

    #[test]
    fn renders_every_counter_with_its_labels() {
        let text = render(&sample_sources());
        let s = parse(&text);
        let g = |name, labels: &[(&str, &str)]| get(&s, name, labels);
        for l in ["core0", "core1", "relay"] {
            let age = g("ringway_loop_heartbeat_age_seconds", &[("loop", l)]);
            assert!(age.is_some_and(|a| (0.0..1.0).contains(&a)), "{l}: {age:?}");
            assert_eq!(g("ringway_loop_turns_total", &[("loop", l)]), Some(0.0));
        }
        assert_eq!(
            g("ringway_connections_accepted_total", &[("core", "0")]),
            Some(10.0)
        );
        assert_eq!(
            g("ringway_connections_accepted_total", &[("core", "1")]),
            Some(3.0)
        );
        assert_eq!(g("ringway_connections_open", &[]), Some(42.0));
        assert_eq!(g("ringway_connections_held", &[("core", "0")]), Some(8.0));
        assert_eq!(g("ringway_buffer_bytes", &[("core", "0")]), Some(4096.0));
        assert_eq!(g("ringway_memory_budget_bytes", &[]), Some(1073741824.0));
        assert_eq!(
            g(
                "ringway_policy_refusals_total",
                &[("core", "1"), ("reason", "memory")]
            ),
            Some(2.0)
        );
        assert_eq!(
            g(
                "ringway_handshakes_total",
                &[("core", "0"), ("result", "rejected")]
            ),
            Some(1.0)
        );
        assert_eq!(
            g(
                "ringway_handshakes_total",
                &[("core", "0"), ("result", "ok")]
            ),
            Some(9.0)
        );
        assert_eq!(
            g(
                "ringway_messages_total",
                &[("core", "1"), ("direction", "out")]
            ),
            Some(7.0)
        );
        assert_eq!(
            g("ringway_bytes_total", &[("core", "0"), ("direction", "in")]),
            Some(1234.0)
        );
        assert_eq!(
            g("ringway_protocol_errors_total", &[("core", "1")]),
            Some(1.0)
        );
        assert_eq!(
            g("ringway_stale_replies_total", &[("core", "0")]),
            Some(2.0)
        );
        assert_eq!(
            g(
                "ringway_slow_consumer_total",
                &[("core", "1"), ("action", "dropped")]
            ),
            Some(6.0)
        );
        assert_eq!(
            g(
                "ringway_slow_consumer_total",
                &[("core", "1"), ("action", "closed")]
            ),
            Some(4.0)
        );
        let up = [("upstream", "chat"), ("backend", "tcp://10.0.0.5:9000")];
        let down = [("upstream", "chat"), ("backend", "unix:/run/chat.sock")];
        assert_eq!(g("ringway_upstream_up", &up), Some(1.0));
        assert_eq!(g("ringway_upstream_up", &down), Some(0.0));
        assert_eq!(g("ringway_upstream_reconnects_total", &up), Some(3.0));
        assert_eq!(g("ringway_upstream_queued_messages", &down), Some(12.0));
        assert_eq!(g("ringway_upstream_queued_bytes", &down), Some(3400.0));
        assert!(
            text.contains("# TYPE ringway_messages_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE ringway_upstream_up gauge\n"),
            "{text}"
        );
        // Always exposed (the cores time every 101); no handshake was recorded here.
        assert!(
            text.contains("ringway_handshake_duration_seconds_count 0\n"),
            "{text}"
        );
    }

    #[test]
    fn values_are_read_at_scrape_time() {
        let sources = sample_sources();
        let before = parse(&render(&sources));
        sources.cores[1].messages_in.add(100);
        sources.links[1].state.live.store(true, Ordering::Relaxed);
        let after = parse(&render(&sources));
        let key = [("core", "1"), ("direction", "in")];
        assert_eq!(get(&before, "ringway_messages_total", &key), Some(5.0));
        assert_eq!(get(&after, "ringway_messages_total", &key), Some(105.0));
        let down = [("upstream", "chat"), ("backend", "unix:/run/chat.sock")];
        assert_eq!(get(&after, "ringway_upstream_up", &down), Some(1.0));
    }

    #[test]
    fn label_values_are_escaped() {
        let mut sources = sample_sources();
        sources.links[0].backend = "unix:/run/we\"ird\\.sock".into();
        let text = render(&sources);
        assert!(
            text.contains(r#"backend="unix:/run/we\"ird\\.sock""#),
            "{text}"
        );
    }

    #[test]
    fn histogram_is_cumulative_with_inf() {
        let sources = sample_sources();
        // Summed over both cores: 5 within 1 ms, 3 within 10 ms, 1 beyond every bound.
        for _ in 0..3 {
            sources.cores[0].handshake_latency.record_ms(1);
        }
        for _ in 0..2 {
            sources.cores[1].handshake_latency.record_ms(0);
        }
        for _ in 0..3 {
            sources.cores[1].handshake_latency.record_ms(10);
        }
        sources.cores[0].handshake_latency.record_ms(20_000);
        let s = parse(&render(&sources));
        let b = |le| {
            get(
                &s,
                "ringway_handshake_duration_seconds_bucket",
                &[("le", le)],
            )
        };
        assert_eq!(b("0.001"), Some(5.0));
        assert_eq!(b("0.01"), Some(8.0));
        assert_eq!(b("+Inf"), Some(9.0));
        assert_eq!(
            get(&s, "ringway_handshake_duration_seconds_count", &[]),
            Some(9.0)
        );
        let sum = get(&s, "ringway_handshake_duration_seconds_sum", &[]).unwrap();
        assert!((sum - 20.033).abs() < 1e-9, "{sum}");
    }
}
