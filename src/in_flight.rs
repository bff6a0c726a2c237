//! Bytes a client's message holds while it crosses from its core to the relay. The core
//! charges the payload to the connection's and the core's counters when it hands the message
//! over; the relay drops the guard when it is done with the payload, which gives them back.
//! The edge pauses reading a connection with too much in flight. It lives below both `edge`
//! and `relay` because it travels inside [`crate::relay::ToUpstream::Message`] and both ends
//! touch it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A count of bytes some holder still has, decremented when the holder lets go: the relay
/// drops the `ToUpstream::Message` carrying this once it is done with its payload.
#[derive(Debug)]
pub struct InFlight {
    counters: [Arc<AtomicUsize>; 2],
    bytes: usize,
}

impl InFlight {
    /// Charge `bytes` to the connection's and the core's counters until dropped.
    pub fn new(conn: &Arc<AtomicUsize>, core: &Arc<AtomicUsize>, bytes: usize) -> InFlight {
        conn.fetch_add(bytes, Ordering::Relaxed);
        core.fetch_add(bytes, Ordering::Relaxed);
        InFlight {
            counters: [conn.clone(), core.clone()],
            bytes,
        }
    }

    /// A guard that charges nothing (for tests and relay-made messages).
    pub fn none() -> InFlight {
        let zero = Arc::new(AtomicUsize::new(0));
        InFlight {
            counters: [zero.clone(), zero],
            bytes: 0,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        for c in &self.counters {
            c.fetch_sub(self.bytes, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_guard_subtracts_on_drop() {
        let (a, b) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let g = InFlight::new(&a, &b, 100);
        let h = InFlight::new(&a, &b, 50);
        assert_eq!(
            (a.load(Ordering::Relaxed), b.load(Ordering::Relaxed)),
            (150, 150)
        );
        drop(g);
        assert_eq!(a.load(Ordering::Relaxed), 50);
        drop(h);
        assert_eq!(b.load(Ordering::Relaxed), 0);
    }
}
