//! What a core reports about its connections besides the hot-path counters: the memory and
//! per-route totals it publishes once per loop turn, and, when a connection's slot is freed,
//! how it ended (`ringway_closes_total`) and its access-log line.

use std::sync::atomic::Ordering;

use crate::edge::connection::Conn;
use crate::session::DEMO_PAGE_NOTE;

use super::CoreState;

/// The access log's `tracing` target: filter on it (`RINGWAY_LOG=info,ringway::access=off`).
pub const ACCESS_TARGET: &str = "ringway::access";

impl CoreState {
    /// Bring the shared total up to date with this core's connections; once per loop turn.
    pub(super) fn publish_memory(&mut self) {
        let total = self.total();
        if total != self.published {
            if total > self.published {
                self.shared
                    .buffer_bytes
                    .fetch_add(total - self.published, Ordering::Relaxed);
            } else {
                self.shared
                    .buffer_bytes
                    .fetch_sub(self.published - total, Ordering::Relaxed);
            }
            self.published = total;
            self.meter.stats.buffer_bytes.set(total);
        }
        self.meter
            .stats
            .deflate_dedicated_contexts
            .set(self.codec.contexts as u64);
        self.publish_route_counts();
    }

    /// Add this core's per-route counts to the totals a scrape reads (by route path, which
    /// outlives a reload's renumbering); a lock per loop turn only when there were any.
    pub(super) fn publish_route_counts(&mut self) {
        self.meter
            .routes
            .publish(&self.routes, &self.meter.stats.routes);
        let mut pending = self.codec.take_route_bytes().peekable();
        if pending.peek().is_none() {
            return;
        }
        let mut totals = self
            .meter
            .stats
            .route_deflate
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for (route, bytes) in pending {
            let path = &self.routes.route(route).path;
            let t = match totals.get_mut(path.as_str()) {
                Some(t) => t,
                None => totals.entry(path.clone()).or_default(),
            };
            for (t, b) in t.iter_mut().zip(bytes) {
                *t += b;
            }
        }
    }

    /// `conn`'s slot is being freed: count how it ended and write its access-log line.
    pub(super) fn finished(&mut self, conn: &Conn) {
        let s = &conn.session;
        let opened = s.is_open();
        let by_client = s.closed_by_client();
        if opened {
            self.meter.stats.closed_with(s.close_code(), by_client);
            self.meter.routes.closed(s.route());
        }
        if !self.config.access_log {
            return;
        }
        let t = s.traffic();
        let peer = s.peer().map(tracing::field::display);
        let duration_ms = self.now_ms.saturating_sub(s.accepted_ms());
        let conn_id = tracing::field::display(s.id());
        let tls = s.is_tls();
        if opened {
            let route = self.routes.route(s.route());
            let upstream = self
                .routes
                .upstreams()
                .get(route.upstream as usize)
                .map_or("", |u| u.name.as_str());
            tracing::info!(
                target: ACCESS_TARGET,
                conn = conn_id,
                peer,
                tls,
                path = s.note().unwrap_or(""),
                route = route.path.as_str(),
                upstream,
                duration_ms,
                messages_in = t.messages_in,
                messages_out = t.messages_out,
                bytes_in = t.bytes_in,
                bytes_out = t.bytes_out,
                close_code = s.close_code(),
                closed_by = if by_client { "client" } else { "server" },
                "connection closed"
            );
        } else {
            // Never opened: it got the demo page, or a refusal (with why).
            let page = s.note() == Some(DEMO_PAGE_NOTE);
            let refused = (!page).then(|| s.note().unwrap_or("no complete request"));
            let outcome = if page {
                "demo page served"
            } else {
                "handshake refused"
            };
            tracing::info!(
                target: ACCESS_TARGET,
                conn = conn_id,
                peer,
                tls,
                duration_ms,
                bytes_in = t.bytes_in,
                bytes_out = t.bytes_out,
                refused,
                "{outcome}"
            );
        }
    }
}
