//! The cores' way into the relay: a bounded crossbeam channel of [`ToUpstream`] plus a
//! wake-up for the relay's event loop that costs a syscall only when the loop is asleep.
//!
//! The relay sets `sleeping` before it parks in `epoll_wait` and checks the channel once more
//! after; a sender checks `sleeping` after its message is in the channel. With a SeqCst fence
//! on both sides at least one of them sees the other (the Dekker pattern), so no message waits
//! for the relay's idle timeout, and a busy relay (never asleep) costs its senders one fence and
//! one load per message, no eventfd write.

use std::io;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};

use super::ToUpstream;

/// The token of the relay loop's wake-up in its `mio::Poll`.
pub(super) const WAKE: mio::Token = mio::Token(usize::MAX);

struct Alarm {
    sleeping: AtomicBool,
    /// mio allows one waker per poller: the resolvers share it.
    waker: Arc<mio::Waker>,
}

impl Alarm {
    fn ring(&self) {
        fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::Relaxed) && self.sleeping.swap(false, Ordering::Relaxed) {
            // An error would only mean the relay is gone; its sender then sees Disconnected.
            let _ = self.waker.wake();
        }
    }
}

/// A core's sender to the relay.
pub struct RelayTx {
    tx: Sender<ToUpstream>,
    alarm: Arc<Alarm>,
}

impl Clone for RelayTx {
    fn clone(&self) -> RelayTx {
        RelayTx {
            tx: self.tx.clone(),
            alarm: self.alarm.clone(),
        }
    }
}

impl RelayTx {
    /// Queue `msg` without waiting; a full channel hands it back (the core keeps a backlog).
    #[inline]
    pub fn try_send(&self, msg: ToUpstream) -> Result<(), TrySendError<ToUpstream>> {
        self.tx.try_send(msg)?;
        self.alarm.ring();
        Ok(())
    }
}

impl Drop for RelayTx {
    /// The last sender gone ends the relay: wake it to notice at once.
    fn drop(&mut self) {
        let _ = self.alarm.waker.wake();
    }
}

/// The relay's end: the channel and the loop's poller, which the links register with.
pub struct RelayRx {
    rx: Receiver<ToUpstream>,
    alarm: Arc<Alarm>,
    pub(super) poll: mio::Poll,
}

impl RelayRx {
    pub(super) fn try_recv(&self) -> Result<ToUpstream, TryRecvError> {
        self.rx.try_recv()
    }

    /// Announce that the loop is about to park; false (and not parked) when a message came
    /// in meanwhile, so the caller polls without waiting.
    pub(super) fn may_sleep(&self) -> bool {
        self.alarm.sleeping.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if self.rx.is_empty() {
            return true;
        }
        self.alarm.sleeping.store(false, Ordering::Relaxed);
        false
    }

    /// The loop is awake again: senders need not ring.
    pub(super) fn awake(&self) {
        self.alarm.sleeping.store(false, Ordering::Relaxed);
    }

    /// A handle that wakes the loop from another thread (a link's name resolver).
    pub(super) fn waker(&self) -> Arc<mio::Waker> {
        self.alarm.waker.clone()
    }
}

/// The channel from the cores to the relay, holding at most `cap` messages.
pub fn channel(cap: usize) -> io::Result<(RelayTx, RelayRx)> {
    let poll = mio::Poll::new()?;
    let waker = Arc::new(mio::Waker::new(poll.registry(), WAKE)?);
    let (tx, rx) = crossbeam_channel::bounded(cap);
    let alarm = Arc::new(Alarm {
        sleeping: AtomicBool::new(false),
        waker,
    });
    Ok((
        RelayTx {
            tx,
            alarm: alarm.clone(),
        },
        RelayRx { rx, alarm, poll },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn closed(n: u64) -> ToUpstream {
        ToUpstream::Closed {
            conn: crate::ids::ConnId::from_u64(n),
            code: 1000,
        }
    }

    /// A sleeping relay is woken by a send; a busy one is not (no wake-up pending after).
    #[test]
    fn a_send_wakes_the_relay_only_when_it_sleeps() {
        let (tx, mut rx) = channel(8).unwrap();
        let mut events = mio::Events::with_capacity(4);
        // Awake: the send leaves no wake-up behind.
        tx.try_send(closed(1)).unwrap();
        rx.poll
            .poll(&mut events, Some(Duration::from_millis(0)))
            .unwrap();
        assert!(events.is_empty(), "a busy relay was woken");
        assert!(!rx.may_sleep(), "a queued message keeps the relay awake");
        rx.try_recv().unwrap();
        assert!(rx.may_sleep());
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            tx.try_send(closed(2)).unwrap();
            tx
        });
        let t = Instant::now();
        rx.poll
            .poll(&mut events, Some(Duration::from_secs(5)))
            .unwrap();
        rx.awake();
        assert!(t.elapsed() < Duration::from_secs(4), "not woken");
        assert!(events.iter().any(|e| e.token() == WAKE));
        assert!(rx.try_recv().is_ok());
        drop(sender.join().unwrap());
        assert!(matches!(rx.try_recv(), Err(TryRecvError::Disconnected)));
    }
}
