//! A session's outbound queue and what it costs: encoded frames (and HTTP responses)
//! waiting for the driver to hand them to the kernel, with the per-entry accounting the
//! send-queue cap and the memory budget compare, and pong coalescing (RFC 6455 §5.5.3).

use std::collections::VecDeque;

use bytes::{Buf, Bytes};

/// What one queued frame costs besides its bytes: its `VecDeque` slot (a `Bytes`, 32 B), the
/// shared header a cloned `Bytes` gets (32 B) and the allocator's rounding of a small
/// allocation (up to ~32 B with mimalloc's size classes). Every frame `encode` makes has
/// its own exact allocation, so nothing else is pinned (no shared arena chunk).
pub const ENTRY_BYTES: usize = 96;

#[derive(Debug, Default)]
pub(crate) struct Outbound {
    /// Outbound bytes; the front `sending` items are being sent.
    items: VecDeque<Bytes>,
    bytes: usize,
    /// The last queued item is a pong not yet handed to the kernel: a newer pong replaces
    /// it, so a ping flood holds one pong, not one per ping.
    pong_queued: bool,
    /// How many of the front items the driver's in-flight send covers (0: none in flight).
    sending: usize,
    /// Items ever taken off the front: with it, `heads` names items by a position that
    /// does not move as the front goes.
    popped: u64,
    /// Positions of frame headers queued apart from their payload (`push_split`): the two
    /// leave together or not at all. Empty unless a large owned payload is queued.
    heads: VecDeque<u64>,
    /// The front item is partly on the wire: it must be finished, never dropped.
    front_started: bool,
}

impl Outbound {
    pub fn push(&mut self, bytes: Bytes) {
        self.pong_queued = false;
        self.bytes += bytes.len();
        self.items.push_back(bytes);
    }

    /// Queue a frame as its header and, behind it, its payload as it is (no copy).
    pub fn push_split(&mut self, head: Bytes, body: Bytes) {
        self.heads.push_back(self.popped + self.items.len() as u64);
        self.push(head);
        self.push(body);
    }

    /// Queue a pong. Once more than `coalesce_past` bytes wait unsent (the client is not
    /// reading), it replaces a queued pong the kernel has not been handed yet; below that
    /// every ping gets its pong, as peers such as Autobahn 2.10 expect.
    pub fn push_pong(&mut self, bytes: Bytes, coalesce_past: usize) {
        if self.pong_queued && self.items.len() > self.sending && self.bytes > coalesce_past {
            if let Some(last) = self.items.pop_back() {
                self.bytes -= last.len();
            }
        }
        self.push(bytes);
        self.pong_queued = true;
    }

    pub fn items(&self) -> &VecDeque<Bytes> {
        &self.items
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The driver handed the front `n` items to the kernel.
    pub fn start_send(&mut self, n: usize) {
        self.sending = n;
    }

    /// Account for `sent` bytes having left, dropping fully sent items.
    pub fn advance(&mut self, mut sent: usize) {
        self.sending = 0;
        let sent_total = sent.min(self.bytes);
        while sent > 0 {
            let Some(front) = self.items.front_mut() else {
                break; // more than was queued: cannot happen, never panic on it
            };
            if front.len() <= sent {
                sent -= front.len();
                self.items.pop_front();
                self.popped += 1;
                self.front_started = false;
                while self.heads.front().is_some_and(|&h| h < self.popped) {
                    self.heads.pop_front();
                }
            } else {
                front.advance(sent);
                self.front_started = true;
                sent = 0;
                if self.items.len() == 1 {
                    // A partly sent pong is on the wire already: it must not be replaced.
                    self.pong_queued = false;
                }
            }
        }
        self.bytes -= sent_total;
        if self.items.is_empty() && self.items.capacity() > 16 {
            // An idle connection should not keep a large queue allocation.
            self.items = VecDeque::new();
        }
        if self.heads.is_empty() && self.heads.capacity() > 16 {
            self.heads = VecDeque::new();
        }
    }

    /// The send failed or ended: nothing queued will be delivered.
    pub fn clear(&mut self) {
        self.popped += self.items.len() as u64;
        self.items.clear();
        self.heads.clear();
        self.bytes = 0;
        self.sending = 0;
        self.front_started = false;
    }

    /// Let go of everything the kernel is not sending now, but never part of a frame: a
    /// frame partly sent, or whose header is being sent, is kept whole (what follows it on
    /// the wire, such as a close frame, must start at a frame boundary).
    pub fn drop_unsent(&mut self, send_in_flight: bool) {
        let mut keep = if send_in_flight { self.sending } else { 0 };
        if self.front_started {
            keep = keep.max(1);
        }
        if keep > 0 && self.heads.contains(&(self.popped + keep as u64 - 1)) {
            keep += 1;
        }
        let keep = keep.min(self.items.len());
        self.items.truncate(keep);
        let end = self.popped + keep as u64;
        self.heads.retain(|&h| h < end);
        self.bytes = self.items.iter().map(Bytes::len).sum();
        self.pong_queued = false;
    }

    /// What the queue costs, as compared with `send_queue_bytes`: its bytes plus
    /// `ENTRY_BYTES` per queued frame (so 3-byte frames cannot hold 30x the cap).
    pub fn cost(&self) -> usize {
        self.bytes + self.items.len() * ENTRY_BYTES
    }

    /// Bytes it holds in the process, slots included.
    pub fn heap_bytes(&self) -> usize {
        self.cost()
            + self.items.capacity() * std::mem::size_of::<Bytes>()
            + self.heads.capacity() * std::mem::size_of::<u64>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_writes_advance_through_the_queue() {
        let mut q = Outbound::default();
        q.push(Bytes::from_static(b"abc"));
        q.push(Bytes::from_static(b"defgh"));
        assert_eq!(q.bytes(), 8);
        q.advance(4);
        assert_eq!(q.items().len(), 1);
        assert_eq!(&q.items()[0][..], b"efgh");
        assert_eq!(q.bytes(), 4);
        q.advance(4);
        assert!(q.is_empty());
        assert_eq!(q.bytes(), 0);
    }

    #[test]
    fn only_the_newest_unsent_pong_is_kept() {
        let mut q = Outbound::default();
        q.push(Bytes::from_static(b"data"));
        for i in 0..1000u16 {
            q.push_pong(Bytes::from(i.to_be_bytes().to_vec()), 0);
        }
        assert_eq!(q.items().len(), 2);
        assert_eq!(&q.items()[1][..], &999u16.to_be_bytes());
        assert_eq!(q.bytes(), 6);
        // A pong the kernel is sending stays; the next one is queued behind it.
        q.start_send(2);
        q.push_pong(Bytes::from_static(b"zz"), 0);
        assert_eq!(q.items().len(), 3);
        // Partly sent: it is on the wire, never replaced.
        q.advance(5);
        assert_eq!(q.items().len(), 2);
        q.push_pong(Bytes::from_static(b"yy"), 0);
        assert_eq!(&q.items()[1][..], b"yy");
        q.advance(2);
        assert_eq!(q.items().len(), 1, "yy is partly sent");
        q.push_pong(Bytes::from_static(b"xx"), 0);
        assert_eq!(q.items().len(), 2, "{:?}", q.items());
        assert_eq!(q.bytes(), 3);
    }

    #[test]
    fn pongs_are_not_coalesced_below_the_threshold() {
        let mut q = Outbound::default();
        for _ in 0..10 {
            q.push_pong(Bytes::from_static(b"p"), 64 * 1024);
        }
        assert_eq!(q.items().len(), 10, "a reading client gets every pong");
    }

    fn items(q: &Outbound) -> Vec<&[u8]> {
        q.items().iter().map(|b| &b[..]).collect()
    }

    #[test]
    fn a_split_frame_is_never_cut_by_dropping_the_unsent() {
        let mut q = Outbound::default();
        q.push(Bytes::from_static(b"one"));
        q.push_split(Bytes::from_static(b"H"), Bytes::from_static(b"payload"));
        q.push(Bytes::from_static(b"two"));
        // The send in flight ends with the header: its payload stays with it.
        q.start_send(2);
        q.drop_unsent(true);
        assert_eq!(items(&q), [&b"one"[..], b"H", b"payload"]);
        // After a short write into the payload: the rest of it is kept.
        q.advance(3 + 1 + 2);
        q.drop_unsent(false);
        assert_eq!(items(&q), [&b"yload"[..]]);
        assert_eq!(q.bytes(), 5);
        q.advance(5);
        assert!(q.is_empty());
        // Positions survive the front moving on: a later split is found again.
        q.push(Bytes::from_static(b"x"));
        q.push_split(Bytes::from_static(b"H2"), Bytes::from_static(b"p2"));
        q.advance(1);
        q.start_send(1);
        q.drop_unsent(true);
        assert_eq!(items(&q), [&b"H2"[..], b"p2"]);
    }

    #[test]
    fn a_partly_sent_frame_is_kept_when_the_rest_is_dropped() {
        let mut q = Outbound::default();
        q.push(Bytes::from_static(b"abcdef"));
        q.push(Bytes::from_static(b"ghi"));
        q.advance(2);
        q.drop_unsent(false);
        assert_eq!(items(&q), [&b"cdef"[..]]);
        assert_eq!(q.bytes(), 4);
    }

    #[test]
    fn per_entry_overhead_is_charged() {
        let mut q = Outbound::default();
        for _ in 0..100 {
            q.push(Bytes::from_static(b"abc"));
        }
        assert_eq!(q.cost(), 100 * (3 + ENTRY_BYTES));
        q.start_send(3);
        q.drop_unsent(true);
        assert_eq!(
            (q.items().len(), q.bytes()),
            (3, 9),
            "what the kernel sends stays"
        );
        q.drop_unsent(false);
        assert!(q.is_empty());
    }
}
