//! Draining one core for shutdown: the listener goes, open clients get 1001, and at the
//! drain deadline everything still there is dropped.

use io_uring::opcode;

use super::{user_data, Worker, OP_ACCEPT, OP_ACCEPT_TLS, OP_CANCEL};

impl Worker {
    pub(super) fn begin_drain(&mut self) {
        let deadline = self
            .core
            .now_ms
            .saturating_add(self.core.config.shutdown_grace_ms);
        self.draining = Some(deadline);
        for (armed, op) in [
            (self.accept_armed, OP_ACCEPT),
            (self.tls_accept_armed, OP_ACCEPT_TLS),
        ] {
            if armed {
                let sqe = opcode::AsyncCancel::new(user_data(op, 0, 0))
                    .build()
                    .user_data(user_data(OP_CANCEL, 0, 0));
                self.push(sqe);
            }
        }
        // Closing our listeners makes the kernel send new connections to no one on this
        // core; the ring keeps its own reference until the accept is cancelled.
        self.listener = None;
        self.tls_listener = None;
        for slot in 0..self.slots.len() as u32 {
            let Some(conn) = self.slots[slot as usize].conn.as_mut() else {
                continue;
            };
            if conn.shut {
                continue;
            }
            if conn.session.begin_drain(self.core.now_ms) {
                self.shut(slot);
            }
            // Deadlines moved: the wheel must look at this connection by the drain deadline.
            if let Some(conn) = self.slots[slot as usize].conn.as_mut() {
                conn.wheel_at = None;
            }
            self.after_event(slot);
        }
        tracing::info!(
            core = self.index,
            open = self.live,
            "draining: sent 1001 to every client"
        );
    }

    pub(super) fn force_close_all(&mut self) {
        for slot in 0..self.slots.len() as u32 {
            if self.slots[slot as usize].conn.is_some() {
                self.shut(slot);
                self.after_event(slot);
            }
        }
    }
}
