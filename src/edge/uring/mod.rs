//! The ring side of the edge: the only place (with `edge::fd`) where the edge talks to the
//! kernel through raw pointers. The worker builds operations; this module puts them on the
//! submission queue, owns the memory in-flight operations point at (the provided-buffer ring,
//! the `sendmsg` headers and the bytes they send), and, before any of that memory is freed,
//! cancels and reaps every operation still in flight.

#![allow(unsafe_code)]

pub mod buf_ring;
pub mod send;

use std::io;
use std::time::{Duration, Instant};

use std::os::fd::{FromRawFd, OwnedFd};

use io_uring::{opcode, squeue, types, IoUring};

use super::fd::Socket;

pub use buf_ring::{BufferRing, GROUP};
pub use send::Sends;

/// Put every pending entry on the submission queue, submitting whenever it is full.
///
/// The entries' pointers are the caller's promise: every entry the worker builds points only
/// at memory that outlives the operation. Socket fds stay open until the operation's
/// completion has been seen (`Conn::finished`); send iovecs and the bytes they point into are
/// held by [`Sends`] until the send completes; the tick timespec and the wake buffer are boxed
/// fields of the worker, which [`quiesce`]s the ring before it drops them.
pub fn submit_all(ring: &mut IoUring, pending: &mut Vec<squeue::Entry>) -> io::Result<()> {
    let mut i = 0;
    while i < pending.len() {
        {
            let mut sq = ring.submission();
            while i < pending.len() {
                // SAFETY: see above: each entry's buffers and fds outlive its operation (the
                // worker's construction rules, and `quiesce` before the worker's memory goes).
                // Covered by `tests::submit_all_spills_past_a_full_queue`.
                if unsafe { sq.push(&pending[i]) }.is_err() {
                    break;
                }
                i += 1;
            }
        }
        if i < pending.len() {
            ring.submit()?;
        }
    }
    pending.clear();
    Ok(())
}

/// The socket an accept completion handed over.
pub fn accepted_socket(fd: i32) -> Socket {
    // SAFETY: a non-negative accept result is a new file descriptor that nothing else in the
    // process owns; wrapping it makes its close the `Socket`'s Drop. Covered by
    // `tests::an_accepted_fd_becomes_an_owned_socket`.
    Socket::from(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// user_data of the cancel-everything operation [`quiesce`] submits.
const QUIESCE: u64 = u64::MAX;

/// Cancel every operation in flight on `ring` and reap completions until none is left (or
/// `within` has passed), so the memory they point at can be freed. Returns how many
/// completions were reaped; pending entries not yet submitted are discarded. `on_completion`
/// sees each reaped completion's `user_data`, so the owner can release what it held for it.
pub fn quiesce(
    ring: &mut IoUring,
    pending: &mut Vec<squeue::Entry>,
    within: Duration,
    mut on_completion: impl FnMut(u64),
) -> usize {
    pending.clear();
    let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::any().all())
        .build()
        .user_data(QUIESCE);
    let mut pushed = vec![cancel];
    if submit_all(ring, &mut pushed).is_err() {
        return 0;
    }
    let deadline = Instant::now() + within;
    let mut reaped = 0;
    // How many operations the cancel caught (its own result), once its completion is in,
    // and how many of those have posted their -ECANCELED completion since.
    let mut cancelled: Option<usize> = None;
    let mut cancelled_seen = 0;
    loop {
        let ts = types::Timespec::from(Duration::from_millis(10));
        let args = types::SubmitArgs::new().timespec(&ts);
        let _ = ring.submitter().submit_with_args(1, &args);
        for cqe in ring.completion() {
            if cqe.user_data() == QUIESCE {
                // A kernel without IORING_ASYNC_CANCEL_ANY answers -EINVAL: nothing of ours
                // was cancelled, so only the deadline bounds the wait.
                cancelled = Some(usize::try_from(cqe.result()).unwrap_or(usize::MAX));
                continue;
            }
            reaped += 1;
            if cqe.result() == -libc::ECANCELED {
                cancelled_seen += 1;
            }
            on_completion(cqe.user_data());
        }
        if cancelled.is_some_and(|n| cancelled_seen >= n) {
            return reaped;
        }
        if Instant::now() >= deadline {
            tracing::warn!(
                reaped,
                "ring operations still in flight at exit after {within:?}"
            );
            return reaped;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    #[test]
    fn submit_all_spills_past_a_full_queue() {
        let Ok(mut ring) = IoUring::new(4) else {
            return;
        };
        let mut pending: Vec<_> = (0..10)
            .map(|i| opcode::Nop::new().build().user_data(i))
            .collect();
        submit_all(&mut ring, &mut pending).unwrap();
        assert!(pending.is_empty());
        ring.submit_and_wait(1).unwrap();
        let mut seen = 0;
        while seen < 10 {
            seen += ring.completion().count();
            if seen < 10 {
                ring.submit_and_wait(1).unwrap();
            }
        }
        assert_eq!(seen, 10);
    }

    #[test]
    fn an_accepted_fd_becomes_an_owned_socket() {
        use std::os::fd::IntoRawFd;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let socket = accepted_socket(server.into_raw_fd());
        assert_eq!(socket.peer_addr(), Some(client.local_addr().unwrap()));
        drop(socket);
        // Closed on drop: the client reads end-of-stream.
        let mut byte = [0u8; 1];
        assert_eq!(std::io::Read::read(&mut client, &mut byte).unwrap(), 0);
    }

    #[test]
    fn quiesce_cancels_a_pending_recv_and_reaps_it() {
        let Ok(mut ring) = IoUring::new(8) else {
            return;
        };
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let mut buf = Box::new([0u8; 64]);
        // A recv that will never complete by itself: the client sends nothing.
        let recv = opcode::Recv::new(types::Fd(server.as_raw_fd()), buf.as_mut_ptr(), 64)
            .build()
            .user_data(7);
        submit_all(&mut ring, &mut vec![recv]).unwrap();
        ring.submit().unwrap();
        let mut seen = Vec::new();
        let n = quiesce(&mut ring, &mut Vec::new(), Duration::from_secs(1), |ud| {
            seen.push(ud)
        });
        assert_eq!((n, seen), (1, vec![7]), "the recv was cancelled and reaped");
        drop(buf); // only now: the kernel no longer holds the pointer
    }
}
