//! Each core's inbox: the relay's replies travel on a crossbeam channel, and an eventfd wakes
//! the core's ring when something arrived. The relay drains its input before waking, so a
//! burst costs one wake-up per core, not one per message.
//!
//! Each inbox is bounded in messages ([`INBOX_MESSAGES`]) and bytes ([`INBOX_BYTES`]). A
//! backend link that finds it full ([`EdgeSink::has_room`]) holds the record and stops
//! reading its backend, so TCP slows the backend down; the relay's own answers (embedded
//! upstream, 1013 closes) wake the core and wait briefly ([`RELAY_INBOX_WAIT`]). What is still
//! full after the wait is dropped if it may be ([`ToEdge::droppable`]), counted
//! (`ringway_relay_inbox_dropped`) and logged; closes and handshake answers always go, up to
//! twice the message bound.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};

use crate::relay::{EdgeSink, RelayGauges, ToEdge};

/// Messages one core's inbox holds before producers wait.
pub const INBOX_MESSAGES: usize = 65_536;
/// Bytes (payloads, strings, per-entry overhead) one core's inbox holds before producers
/// wait; a single message larger than this still goes when the inbox is empty.
pub const INBOX_BYTES: u64 = 32 * 1024 * 1024;
/// How long the relay thread (embedded upstream, 1013 closes) waits: short, since it serves
/// every route.
pub const RELAY_INBOX_WAIT: Duration = Duration::from_millis(100);

/// What one inbox holds now.
#[derive(Debug, Default)]
struct Fill {
    messages: AtomicUsize,
    bytes: AtomicU64,
    /// The core's end is gone: nobody will make room.
    closed: AtomicBool,
}

/// A core's end of its inbox.
#[derive(Debug)]
pub struct Inbox {
    rx: Receiver<ToEdge>,
    fill: Arc<Fill>,
    gauges: Arc<RelayGauges>,
}

impl Inbox {
    pub fn try_recv(&self) -> Result<ToEdge, TryRecvError> {
        let msg = self.rx.try_recv()?;
        let n = msg.held_bytes();
        self.fill.messages.fetch_sub(1, Ordering::Relaxed);
        self.fill.bytes.fetch_sub(n as u64, Ordering::Relaxed);
        self.gauges.release(n);
        Ok(msg)
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        // Whatever is still queued is freed with the channel: stop charging it.
        self.fill.closed.store(true, Ordering::Release);
        while self.try_recv().is_ok() {}
    }
}

/// The relay's end of one core's inbox.
#[derive(Debug, Clone)]
pub struct InboxSender {
    tx: Sender<ToEdge>,
    fill: Arc<Fill>,
}

/// A new inbox whose contents are charged to `gauges`.
pub fn channel(gauges: Arc<RelayGauges>) -> (InboxSender, Inbox) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let fill = Arc::new(Fill::default());
    (
        InboxSender {
            tx,
            fill: fill.clone(),
        },
        Inbox { rx, fill, gauges },
    )
}

/// A core's wake-up: writing to it completes the read its ring keeps pending.
#[derive(Debug)]
pub struct Waker {
    file: File,
}

impl Waker {
    pub fn new() -> io::Result<Waker> {
        let owned = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC)?;
        Ok(Waker {
            file: File::from(owned),
        })
    }

    pub fn wake(&self) {
        // A full counter (2^64-2 pending wakes) cannot happen: the core reads it down each
        // time it wakes. Any error here would only mean a lost wake of a core that is exiting.
        let _ = (&self.file).write_all(&1u64.to_ne_bytes());
    }

    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// The relay's side of every core's inbox.
#[derive(Clone)]
pub struct CoreLinks {
    senders: Vec<InboxSender>,
    wakers: Vec<Arc<Waker>>,
    pending: Vec<bool>,
    gauges: Arc<RelayGauges>,
    /// How long a send waits for room in a full inbox.
    wait: Duration,
    /// When this producer last logged a drop (one line per second at most).
    last_drop_log: Option<Instant>,
}

impl CoreLinks {
    pub fn new(
        senders: Vec<InboxSender>,
        wakers: Vec<Arc<Waker>>,
        gauges: Arc<RelayGauges>,
    ) -> CoreLinks {
        let pending = vec![false; senders.len()];
        CoreLinks {
            senders,
            wakers,
            pending,
            gauges,
            wait: RELAY_INBOX_WAIT,
            last_drop_log: None,
        }
    }

    /// Queue `msg` for `core`, waiting up to `self.wait` for room.
    fn send_to(&mut self, core: usize, msg: ToEdge) {
        let Some(inbox) = self.senders.get(core) else {
            // Counted (`ringway_relay_misaddressed`): a backend named a core we do not have.
            self.gauges.misaddressed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let size = msg.held_bytes();
        let mut deadline = None;
        loop {
            let queued = inbox.fill.messages.load(Ordering::Relaxed);
            let bytes = inbox.fill.bytes.load(Ordering::Relaxed);
            if queued == 0 || (queued < INBOX_MESSAGES && bytes + size as u64 <= INBOX_BYTES) {
                break;
            }
            // Full: make sure the core is awake to drain it, then wait (backpressure).
            self.wakers[core].wake();
            self.pending[core] = false;
            let now = Instant::now();
            let until = *deadline.get_or_insert(now + self.wait);
            if now >= until {
                if !msg.droppable() && queued < 2 * INBOX_MESSAGES {
                    break;
                }
                self.gauges.inbox_dropped.fetch_add(1, Ordering::Relaxed);
                if self
                    .last_drop_log
                    .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
                {
                    self.last_drop_log = Some(now);
                    tracing::warn!(
                        core,
                        queued,
                        bytes,
                        dropped_total = self.gauges.inbox_dropped.load(Ordering::Relaxed),
                        "core inbox full for {} ms; dropping a reply",
                        self.wait.as_millis()
                    );
                }
                return;
            }
            if inbox.fill.closed.load(Ordering::Acquire) {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        inbox.fill.messages.fetch_add(1, Ordering::Relaxed);
        inbox.fill.bytes.fetch_add(size as u64, Ordering::Relaxed);
        self.gauges.charge(size);
        match inbox.tx.send(msg) {
            Ok(()) => self.pending[core] = true,
            // The core is exiting: nothing will read it.
            Err(_) => {
                inbox.fill.messages.fetch_sub(1, Ordering::Relaxed);
                inbox.fill.bytes.fetch_sub(size as u64, Ordering::Relaxed);
                self.gauges.release(size);
            }
        }
    }

    /// Whether `core`'s inbox takes `size` more bytes now without waiting (a core that does
    /// not exist, or is gone, takes anything: it is dropped on sending).
    fn room(&self, core: usize, size: usize) -> bool {
        let Some(inbox) = self.senders.get(core) else {
            return true;
        };
        let queued = inbox.fill.messages.load(Ordering::Relaxed);
        let bytes = inbox.fill.bytes.load(Ordering::Relaxed);
        queued == 0
            || (queued < INBOX_MESSAGES && bytes + size as u64 <= INBOX_BYTES)
            || inbox.fill.closed.load(Ordering::Relaxed)
    }

    /// This producer waits up to `wait` for room in a full inbox.
    #[cfg(test)]
    pub fn with_wait(mut self, wait: Duration) -> CoreLinks {
        self.wait = wait;
        self
    }
}

impl EdgeSink for CoreLinks {
    fn send(&mut self, msg: ToEdge) {
        match msg.conn() {
            Some(conn) => self.send_to(conn.core(), msg),
            None => {
                // A publish or broadcast: each core gets it once and fans it out itself.
                for core in 0..self.senders.len() {
                    self.send_to(core, msg.clone());
                }
            }
        }
    }

    fn send_now(&mut self, msg: ToEdge) {
        let wait = std::mem::replace(&mut self.wait, Duration::ZERO);
        self.send(msg);
        self.wait = wait;
    }

    fn has_room(&self, msg: &ToEdge) -> bool {
        let size = msg.held_bytes();
        match msg.conn() {
            Some(conn) => self.room(conn.core(), size),
            None => (0..self.senders.len()).all(|core| self.room(core, size)),
        }
    }

    fn flush(&mut self) {
        for (core, pending) in self.pending.iter_mut().enumerate() {
            if std::mem::take(pending) {
                self.wakers[core].wake();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::ConnId;
    use std::io::Read;

    #[test]
    fn replies_reach_the_owning_core_and_wake_it_once_per_flush() {
        let gauges = Arc::new(RelayGauges::default());
        let (tx0, rx0) = channel(gauges.clone());
        let (tx1, rx1) = channel(gauges.clone());
        let w0 = Arc::new(Waker::new().unwrap());
        let w1 = Arc::new(Waker::new().unwrap());
        let mut links =
            CoreLinks::new(vec![tx0, tx1], vec![w0.clone(), w1.clone()], gauges.clone());
        for _ in 0..3 {
            links.send(ToEdge::Close {
                conn: ConnId::new(1, 4, 2),
                code: 1000,
                reason: String::new(),
            });
        }
        links.send(ToEdge::Close {
            conn: ConnId::new(9, 0, 0),
            code: 1000,
            reason: String::new(),
        });
        links.flush();
        assert_eq!(rx1.rx.len(), 3);
        assert!(rx0.rx.is_empty());
        assert_eq!(gauges.misaddressed.load(Ordering::Relaxed), 1);
        let mut buf = [0u8; 8];
        (&w1.file).read_exact(&mut buf).unwrap();
        assert_eq!(u64::from_ne_bytes(buf), 1, "one wake for the batch");
    }

    fn close(core: u8) -> ToEdge {
        ToEdge::Close {
            conn: ConnId::new(core, 1, 1),
            code: 1000,
            reason: String::new(),
        }
    }

    fn send(core: u8, n: usize) -> ToEdge {
        ToEdge::Send {
            conn: ConnId::new(core, 1, 1),
            kind: crate::protocol::message::MessageKind::Binary,
            payload: bytes::Bytes::from(vec![0u8; n]),
        }
    }

    /// A full inbox (bytes) makes the producer wait, then drop what may be dropped (counted)
    /// and still deliver closes; what is queued is charged to the relay gauge and released
    /// when the core takes it.
    #[test]
    fn a_full_inbox_waits_then_drops_data_but_not_closes() {
        let gauges = Arc::new(RelayGauges::default());
        let (tx, rx) = channel(gauges.clone());
        let w = Arc::new(Waker::new().unwrap());
        let mut links =
            CoreLinks::new(vec![tx], vec![w], gauges.clone()).with_wait(Duration::from_millis(30));
        let big = (INBOX_BYTES / 4) as usize - crate::relay::ENTRY_OVERHEAD;
        for _ in 0..4 {
            assert!(links.has_room(&send(0, big)));
            links.send(send(0, big));
        }
        assert_eq!(rx.rx.len(), 4);
        assert!(
            !links.has_room(&send(0, big)),
            "full: a link would hold its record"
        );
        let held = gauges.held();
        assert!(held >= INBOX_BYTES, "{held}");
        let t = Instant::now();
        links.send(send(0, big));
        assert!(t.elapsed() >= Duration::from_millis(30), "waited for room");
        assert_eq!(gauges.inbox_dropped.load(Ordering::Relaxed), 1);
        assert_eq!(rx.rx.len(), 4, "the data message was dropped");
        let t = Instant::now();
        links.send_now(send(0, big));
        assert!(
            t.elapsed() < Duration::from_millis(30),
            "send_now does not wait"
        );
        assert_eq!(gauges.inbox_dropped.load(Ordering::Relaxed), 2);
        links.send(close(0));
        assert_eq!(rx.rx.len(), 5, "a close always goes");
        while rx.try_recv().is_ok() {}
        assert_eq!(gauges.held(), 0, "everything taken is released");
    }

    /// A producer waiting on a full inbox gets through as soon as the core drains it.
    #[test]
    fn a_waiting_producer_proceeds_when_the_core_drains() {
        let gauges = Arc::new(RelayGauges::default());
        let (tx, rx) = channel(gauges.clone());
        let w = Arc::new(Waker::new().unwrap());
        let mut links =
            CoreLinks::new(vec![tx], vec![w], gauges.clone()).with_wait(Duration::from_secs(5));
        for _ in 0..INBOX_MESSAGES {
            links.send(send(0, 0));
        }
        let drain = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            for _ in 0..INBOX_MESSAGES {
                rx.try_recv().unwrap();
            }
            rx
        });
        links.send(send(0, 0));
        let rx = drain.join().unwrap();
        assert_eq!(rx.rx.len(), 1);
        assert_eq!(gauges.inbox_dropped.load(Ordering::Relaxed), 0);
    }
}
