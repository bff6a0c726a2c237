//! The memory of in-flight `sendmsg` operations: per connection slot, one boxed header and
//! iovec array plus a clone of every `Bytes` the iovecs point into. The kernel reads those
//! bytes until the send completes; because the `SendBuf` owns its own references (refcount
//! bumps, not copies), the connection may drop or rewrite its queue at any time meanwhile.

use bytes::Bytes;
use io_uring::{opcode, squeue, types};

/// At most this many queued items leave in one `sendmsg`.
pub const MAX_IOV: usize = 64;

/// One `sendmsg`'s header and iovecs, boxed so their addresses stay put until completion,
/// and the `Bytes` they point into, held until then.
pub struct SendBuf {
    msg: libc::msghdr,
    iov: [libc::iovec; MAX_IOV],
    held: Vec<Bytes>,
}

impl SendBuf {
    fn new() -> Box<SendBuf> {
        Box::new(SendBuf {
            // SAFETY: msghdr is a plain C struct (pointers, lengths, flags) for which all-zero
            // is the valid empty value. Covered by `sendmsg_of_several_bytes_outlives_the_queue`.
            msg: unsafe { std::mem::zeroed() },
            iov: [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; MAX_IOV],
            held: Vec::with_capacity(MAX_IOV),
        })
    }

    /// Point the iovecs at up to [`MAX_IOV`] items, holding a reference to each; returns
    /// how many.
    fn fill<'a>(&mut self, items: impl IntoIterator<Item = &'a Bytes>) -> usize {
        self.held.clear();
        for item in items.into_iter().take(MAX_IOV) {
            self.iov[self.held.len()] = libc::iovec {
                iov_base: item.as_ptr() as *mut libc::c_void,
                iov_len: item.len(),
            };
            self.held.push(item.clone());
        }
        let n = self.held.len();
        self.msg.msg_iov = self.iov.as_mut_ptr();
        self.msg.msg_iovlen = n as _;
        n
    }
}

/// The send buffers of one ring: a pool, and the one in flight per connection slot.
#[derive(Default)]
pub struct Sends {
    // Boxed on purpose: the kernel holds the header's and iovecs' addresses until completion.
    #[allow(clippy::vec_box)]
    pool: Vec<Box<SendBuf>>,
    in_flight: Vec<Option<Box<SendBuf>>>,
}

impl Sends {
    /// Prepare the `sendmsg` of up to [`MAX_IOV`] of `items` on `fd` for `slot`, or `None`
    /// when `items` is empty or `slot` already has a send in flight (whose memory must stay).
    /// The entry points into the `SendBuf` now held for `slot` until [`Sends::done`].
    pub fn prepare<'a>(
        &mut self,
        slot: u32,
        fd: std::os::fd::RawFd,
        items: impl IntoIterator<Item = &'a Bytes>,
        user_data: u64,
    ) -> Option<(squeue::Entry, usize)> {
        let slot = slot as usize;
        if self.in_flight.len() <= slot {
            self.in_flight.resize_with(slot + 1, || None);
        }
        if self.in_flight[slot].is_some() {
            tracing::error!(slot, "a second sendmsg for one connection; not sent");
            return None;
        }
        let mut buf = self.pool.pop().unwrap_or_else(SendBuf::new);
        let n = buf.fill(items);
        if n == 0 {
            self.pool.push(buf);
            return None;
        }
        let sqe = opcode::SendMsg::new(types::Fd(fd), &buf.msg)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build()
            .user_data(user_data);
        self.in_flight[slot] = Some(buf);
        Some((sqe, n))
    }

    /// The send of `slot` completed: its memory goes back to the pool, its references go.
    pub fn done(&mut self, slot: u32) {
        if let Some(mut buf) = self.in_flight.get_mut(slot as usize).and_then(Option::take) {
            buf.held.clear();
            self.pool.push(buf);
        }
    }

    /// Whether `slot` has a send in flight.
    #[cfg(test)]
    pub fn is_in_flight(&self, slot: u32) -> bool {
        self.in_flight
            .get(slot as usize)
            .is_some_and(Option::is_some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use io_uring::IoUring;
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    #[test]
    fn sendmsg_of_several_bytes_outlives_the_queue() {
        let Ok(mut ring) = IoUring::new(8) else {
            return;
        };
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let mut sends = Sends::default();
        let mut queue: Vec<Bytes> = vec![
            Bytes::from(b"one ".to_vec()),
            Bytes::from(b"two ".to_vec()),
            Bytes::from(b"three".to_vec()),
        ];
        let (sqe, n) = sends
            .prepare(3, server.as_raw_fd(), queue.iter(), 42)
            .unwrap();
        assert_eq!(n, 3);
        assert!(sends.is_in_flight(3));
        assert!(
            sends
                .prepare(3, server.as_raw_fd(), queue.iter(), 43)
                .is_none(),
            "one send per slot"
        );
        // The connection's queue goes away before the kernel has even seen the send: the
        // SendBuf's own references keep the bytes alive.
        queue.clear();
        crate::edge::uring::submit_all(&mut ring, &mut vec![sqe]).unwrap();
        ring.submit_and_wait(1).unwrap();
        let cqe = ring.completion().next().unwrap();
        assert_eq!((cqe.user_data(), cqe.result()), (42, 13));
        sends.done(3);
        assert!(!sends.is_in_flight(3));
        let mut got = [0u8; 13];
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"one two three");
    }
}
