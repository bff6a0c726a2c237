//! Backpressure and memory on one core: the relay backlog is flushed and paused clients
//! re-read when they may resume; over the memory budget the largest holder is shed.

use crossbeam_channel::TrySendError;

use crate::session;

use super::{conn_in, Worker};

impl Worker {
    /// Send what waits in the core's relay backlog, then re-read paused clients that may
    /// resume.
    pub(super) fn flush_relay_backlog(&mut self) {
        self.drain_relay_backlog();
        if self.paused.is_empty() {
            return;
        }
        for (slot, generation) in std::mem::take(&mut self.paused) {
            let Some(conn) = conn_in(&mut self.slots, slot, generation) else {
                continue;
            };
            if !conn.paused {
                continue;
            }
            if self.core.may_resume(conn) || conn.shut {
                self.resume(slot);
                continue;
            }
            self.paused.push((slot, generation));
        }
    }

    /// Over the memory budget: close this core's largest holder 1008 "server memory budget"
    /// (one per loop turn, until the published total is back under the budget).
    pub(super) fn shed_for_budget(&mut self) {
        if !self.core.over_memory_budget() {
            return;
        }
        let largest = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.conn.as_ref().map(|c| (i as u32, c)))
            .filter(|(_, c)| {
                c.session.is_open()
                    && !c.shut
                    && !c.session.reading_done()
                    && c.holds() > 4 * session::BASE_BYTES
            })
            .max_by_key(|(_, c)| c.holds())
            .map(|(i, _)| i);
        let Some(slot) = largest else { return };
        let conn = self.slots[slot as usize]
            .conn
            .as_mut()
            .expect("found above");
        tracing::warn!(conn = %conn.session.id(), holds = conn.holds(), "over the memory budget: closing the largest holder 1008");
        conn.session.shed(&mut self.core.cx(), conn.send_in_flight);
        self.after_event(slot);
    }

    fn drain_relay_backlog(&mut self) {
        let Some(relay) = &self.core.relay else {
            return;
        };
        while let Some(msg) = self.core.relay_backlog.pop_front() {
            match relay.try_send(msg) {
                Ok(()) => {}
                Err(TrySendError::Full(msg)) => {
                    self.core.relay_backlog.push_front(msg);
                    break;
                }
                Err(TrySendError::Disconnected(_)) => {
                    tracing::error!(
                        core = self.index,
                        "the relay thread is gone; dropping its queue"
                    );
                    self.core.relay_backlog.clear();
                    break;
                }
            }
        }
    }
}
