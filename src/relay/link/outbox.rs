//! A backend link's out buffer: the encoded records waiting for the backend, in order, with
//! what each one is, so that a written record can be accounted for and a lost link can
//! carry what it had not written to the next one. Part of the relay's path to a backend
//! (router -> link -> **outbox** -> socket).

use std::collections::VecDeque;

use bytes::BytesMut;

use crate::relay::wire::{self, Record};

/// An emptied link buffer bigger than this is let go rather than kept: a burst of large
/// messages must not pin up to `LINK_BUFFER_BYTES` per link for the life of the process.
const KEEP_BUFFER_BYTES: usize = 256 * 1024;

/// Empty `buf` for reuse, or give its allocation back when a burst made it large.
pub(super) fn reset_buffer(buf: &mut BytesMut) {
    if buf.capacity() > KEEP_BUFFER_BYTES {
        *buf = BytesMut::new();
    } else {
        buf.clear();
    }
}

/// What one record in the out buffer is, for accounting once it is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// A client message: counted in `queued`, charged to the gauges.
    Message,
    /// A connection's first `open`: once written, replayed after a reconnect.
    Open(u64),
    Close,
    /// Pong, gone, ping, error: for this link only, not carried to the next.
    Control,
    /// A replayed open: made again from the table at each reconnect.
    Replay,
}

/// The encoded records waiting for the backend, front first, with where each ends.
#[derive(Default)]
pub(super) struct Outbox {
    pub(super) buf: BytesMut,
    pub(super) records: VecDeque<(usize, Kind)>,
    /// Bytes of the front records already written (the front one may be partly written).
    pub(super) written: usize,
    /// Control records in `records`.
    pub(super) control: usize,
}

impl Outbox {
    pub(super) fn push(&mut self, kind: Kind, record: &Record) {
        let start = self.buf.len();
        wire::encode(record, &mut self.buf);
        self.records.push_back((self.buf.len() - start, kind));
        if kind == Kind::Control {
            self.control += 1;
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// What survives a lost link: every record not completely written (a partly written one
    /// from its start), minus the link's own control records and replays.
    pub(super) fn carry(&mut self) {
        let old = std::mem::take(self);
        let mut at = 0;
        for (len, kind) in old.records {
            if !matches!(kind, Kind::Control | Kind::Replay) {
                self.buf.extend_from_slice(&old.buf[at..at + len]);
                self.records.push_back((len, kind));
            }
            at += len;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A buffer a burst made large is let go once empty; a small one keeps its allocation.
    #[test]
    fn emptied_large_buffers_are_let_go() {
        let mut big = BytesMut::with_capacity(4 * KEEP_BUFFER_BYTES);
        big.extend_from_slice(&[1; 1000]);
        reset_buffer(&mut big);
        assert_eq!((big.len(), big.capacity()), (0, 0));
        let mut small = BytesMut::with_capacity(4096);
        small.extend_from_slice(&[1; 1000]);
        reset_buffer(&mut small);
        assert_eq!(small.len(), 0);
        assert!(small.capacity() >= 4096);
    }
}
