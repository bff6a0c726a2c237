//! Input from a paused client: cancelling a multishot recv is not instant, and the kernel
//! may post several completions for it after the core decided to stop reading (a batch of
//! ring buffers, up to the socket's receive buffer). Decoding them at once would overshoot
//! the very limit that paused the client (its send queue, its relay in-flight bytes) by a
//! batch, and with big ring buffers that batch is megabytes. So they are copied out of the
//! ring (which gets its buffers back at once), charged to the core's memory meter as part
//! of the connection, and decoded in chunks when the client resumes, stopping again as
//! soon as a chunk pauses it. Order is kept: while a connection holds input it stays
//! paused, and everything it receives meanwhile (data, then its FIN) joins the queue.

use super::Worker;
use crate::edge::panic;

/// Held bytes decoded per step on resume: a pause can overshoot by at most this much.
const RESUME_CHUNK: usize = 16 * 1024;

impl Worker {
    /// A paused client may be read again: decode what it holds, chunk by chunk, until it is
    /// all decoded (then its recv is re-armed, or its held FIN acted on) or a chunk pauses
    /// it again (the rest stays held).
    pub(super) fn resume(&mut self, slot: u32) {
        let generation = self.slots[slot as usize].generation;
        let Some(conn) = self.slots[slot as usize].conn.as_mut() else {
            return;
        };
        conn.paused = false;
        conn.session.resumed();
        let Some(mut held) = conn.held.take() else {
            self.recv_rearm.push(slot);
            return;
        };
        loop {
            let Some(conn) = super::conn_in(&mut self.slots, slot, generation) else {
                return;
            };
            if conn.shut || conn.session.reading_done() {
                // Nothing more is read from it: what it held is dropped with the rest.
                self.after_event(slot);
                return;
            }
            if conn.paused {
                if !held.is_drained() || held.eof {
                    conn.held = Some(held);
                    self.after_event(slot);
                }
                return;
            }
            let Some(chunk) = held.next_chunk(RESUME_CHUNK) else {
                break;
            };
            let core = &mut self.core;
            let handled = panic::contain(|| conn.session.on_bytes(&mut core.cx(), chunk));
            self.dispatch_outputs(slot);
            if let Err(location) = handled {
                self.contained_panic(slot, &location);
            }
            self.after_event(slot);
        }
        let Some(conn) = super::conn_in(&mut self.slots, slot, generation) else {
            return;
        };
        if held.eof {
            let core = &mut self.core;
            conn.session.on_peer_closed(&mut core.cx(), false);
            self.dispatch_outputs(slot);
            self.after_event(slot);
        } else {
            self.recv_rearm.push(slot);
        }
    }
}
