//! Each core's inbox: the relay's replies travel on a crossbeam channel, and an eventfd wakes
//! the core's ring when something arrived. The relay drains its input before waking, so a
//! burst costs one wake-up per core, not one per message.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use crossbeam_channel::Sender;

use crate::relay::{EdgeSink, ToEdge};

/// A core's wake-up: writing to it completes the read its ring keeps pending.
#[derive(Debug)]
pub struct Waker {
    file: File,
}

impl Waker {
    pub fn new() -> io::Result<Waker> {
        // SAFETY: eventfd has no memory preconditions; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by eventfd and is owned by nobody else.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
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
    senders: Vec<Sender<ToEdge>>,
    wakers: Vec<Arc<Waker>>,
    pending: Vec<bool>,
    /// Replies addressed to a core that does not exist (a forged or corrupt id).
    pub misaddressed: u64,
}

impl CoreLinks {
    pub fn new(senders: Vec<Sender<ToEdge>>, wakers: Vec<Arc<Waker>>) -> CoreLinks {
        let pending = vec![false; senders.len()];
        CoreLinks {
            senders,
            wakers,
            pending,
            misaddressed: 0,
        }
    }
}

impl EdgeSink for CoreLinks {
    fn send(&mut self, msg: ToEdge) {
        match msg.conn() {
            Some(conn) => {
                let core = conn.core();
                match self.senders.get(core) {
                    // The receiver lives as long as the core; an error means it is exiting.
                    Some(tx) => {
                        if tx.send(msg).is_ok() {
                            self.pending[core] = true;
                        }
                    }
                    None => self.misaddressed += 1,
                }
            }
            None => {
                // A publish or broadcast: each core gets it once and fans it out itself.
                for (core, tx) in self.senders.iter().enumerate() {
                    if tx.send(msg.clone()).is_ok() {
                        self.pending[core] = true;
                    }
                }
            }
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
    use crate::edge::ConnId;
    use std::io::Read;

    #[test]
    fn replies_reach_the_owning_core_and_wake_it_once_per_flush() {
        let (tx0, rx0) = crossbeam_channel::unbounded();
        let (tx1, rx1) = crossbeam_channel::unbounded();
        let w0 = Arc::new(Waker::new().unwrap());
        let w1 = Arc::new(Waker::new().unwrap());
        let mut links = CoreLinks::new(vec![tx0, tx1], vec![w0.clone(), w1.clone()]);
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
        assert_eq!(rx1.len(), 3);
        assert!(rx0.is_empty());
        assert_eq!(links.misaddressed, 1);
        let mut buf = [0u8; 8];
        (&w1.file).read_exact(&mut buf).unwrap();
        assert_eq!(u64::from_ne_bytes(buf), 1, "one wake for the batch");
    }
}
