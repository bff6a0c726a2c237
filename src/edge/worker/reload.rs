//! Taking a reloaded configuration on one core: every session's route is found again by its
//! pattern (new limits reach its decoder from its next frame); a connection whose route is
//! gone is closed 1001.

use std::sync::atomic::Ordering;

use crate::edge::stats::RouteTraffic;
use crate::protocol::close;
use crate::session;

use super::Worker;

impl Worker {
    /// Take the reloaded configuration, if its generation moved.
    pub(super) fn check_reload(&mut self) {
        let generation = self.core.shared.reload_generation.load(Ordering::Acquire);
        if generation != self.reload_generation {
            self.reload_generation = generation;
            self.apply_reload();
        }
    }

    fn apply_reload(&mut self) {
        let reloaded = self
            .core
            .shared
            .reloaded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some((config, routes)) = reloaded else {
            return;
        };
        // Route ids are indexes into the table: find each open connection's route again by
        // its pattern. A connection whose route is gone is closed 1001.
        let mut gone = Vec::new();
        for (slot, s) in self.slots.iter_mut().enumerate() {
            let Some(conn) = s.conn.as_mut() else {
                continue;
            };
            let pattern = &self.core.routes.route(conn.session.route()).path;
            let probe = match pattern.strip_suffix("/*") {
                Some("") => "/",
                Some(prefix) => prefix,
                None => pattern,
            };
            match routes.match_path(probe) {
                Some((id, route)) => conn
                    .session
                    .set_route(id, session::route_limits(&config, route.max_fragments)),
                None => {
                    if conn.session.is_open() {
                        // It ends on its route's count; route 0 counts it until it is gone.
                        self.core.meter.routes.closed(conn.session.route());
                        gone.push(slot as u32);
                    }
                    // Route 0 always exists; a connection still handshaking gets its route then.
                    conn.session.set_route(0, config.message_limits());
                }
            }
        }
        self.core
            .ip_limiter
            .set_limits(config.ip_limits.per_core(self.core.workers));
        self.core.config = config;
        // Route ids change with the table: what was counted under the old ones goes first.
        self.core.publish_route_counts();
        self.core.meter.routes = RouteTraffic::for_table(&routes);
        for _ in &gone {
            self.core.meter.routes.opened(0);
        }
        self.core.routes = routes;
        for &slot in &gone {
            let conn = self.slots[slot as usize]
                .conn
                .as_mut()
                .expect("listed above");
            tracing::info!(conn = %conn.session.id(), "route removed by reload: closing 1001");
            conn.session.close_after_replies(
                &mut self.core.cx(),
                close::GOING_AWAY,
                "route removed",
            );
            self.dispatch_outputs(slot);
            self.after_event(slot);
        }
        tracing::debug!(core = self.index, "configuration reloaded");
    }
}
