//! The core's provided-buffer ring: read buffers registered with the kernel, which multishot
//! recv fills on demand. A connection holds a buffer only from the completion that names it
//! until the protocol core has consumed it, so an idle connection pins no read memory.
//!
//! The kernel may write into these buffers until the group is unregistered, so the mappings
//! are unmapped only after [`BufferRing::unregister`] succeeded; a ring dropped while still
//! registered leaks its memory rather than free what the kernel can still reach.

use std::io;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;
use io_uring::IoUring;

/// The buffer group id; each core has its own io_uring, so one group per ring suffices.
pub const GROUP: u16 = 0;

/// One anonymous private mapping, unmapped on drop unless leaked.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> io::Result<Mapping> {
        // SAFETY: an anonymous private mapping with no address hint has no preconditions; the
        // result is checked against MAP_FAILED before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            ptr: ptr.cast(),
            len,
        })
    }
}

impl Mapping {
    /// Never unmap this mapping: the kernel may still write to it.
    fn leak(&mut self) {
        self.ptr = std::ptr::null_mut();
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.ptr.is_null() {
            return;
        }
        // SAFETY: ptr/len are exactly what mmap returned, and nothing borrows the mapping any
        // more: `BufferRing` owns both mappings and lends out only borrows tied to `&mut self`;
        // it lets a mapping drop only once the kernel has let go of the group (see its Drop).
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

/// A ring of `count` buffers of `size` bytes each, registered as buffer group [`GROUP`].
pub struct BufferRing {
    entries: Mapping,
    buffers: Mapping,
    count: u16,
    size: usize,
    /// Our copy of the ring tail; published to the kernel with a release store.
    tail: u16,
    registered: bool,
}

// A BufferRing is created and used on one core's thread only; it is never shared.

impl BufferRing {
    /// Map the ring and its buffers and hand every buffer to the kernel. `count` must be a
    /// power of two no larger than 32768 (the kernel's limit).
    pub fn new(ring: &IoUring, count: u16, size: usize) -> io::Result<BufferRing> {
        if !count.is_power_of_two() || count > 32768 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("buffer count {count} must be a power of two no larger than 32768"),
            ));
        }
        if size == 0 || size > u32::MAX as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("buffer size {size} must be between 1 byte and 4 GiB"),
            ));
        }
        let entries = Mapping::new(usize::from(count) * std::mem::size_of::<BufRingEntry>())?;
        let buffers = Mapping::new(usize::from(count) * size)?;
        let mut this = BufferRing {
            entries,
            buffers,
            count,
            size,
            tail: 0,
            registered: false,
        };
        for bid in 0..count {
            this.push(bid);
        }
        this.publish();
        // SAFETY: the entries mapping is page-aligned (mmap), holds `count` entries, and lives
        // until the group is unregistered: Drop unmaps only after a successful `unregister`
        // (the owning `Ring` does that once every operation is reaped) and leaks otherwise.
        // Covered by `kernel_fills_a_provided_buffer_and_we_recycle_it`.
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                this.entries.ptr as u64,
                count,
                GROUP,
                0,
            )?;
        }
        this.registered = true;
        Ok(this)
    }

    /// The first `len` bytes of buffer `bid`, which the kernel filled and handed to us in a
    /// completion. Until [`BufferRing::recycle`] is called for `bid` the kernel will not touch it.
    pub fn filled(&mut self, bid: u16, len: usize) -> &mut [u8] {
        assert!(
            bid < self.count && len <= self.size,
            "buffer {bid} len {len} out of range"
        );
        // SAFETY: bid < count and len <= size, so the range lies inside the buffers mapping.
        // The kernel wrote this buffer and posted its completion; it does not reuse a buffer
        // until it is pushed back to the ring, which needs `&mut self`, so this borrow is
        // exclusive for its lifetime.
        unsafe {
            std::slice::from_raw_parts_mut(self.buffers.ptr.add(usize::from(bid) * self.size), len)
        }
    }

    /// Give buffer `bid` back to the kernel. Visible to it after the next [`BufferRing::publish`].
    pub fn recycle(&mut self, bid: u16) {
        self.push(bid);
    }

    fn push(&mut self, bid: u16) {
        let mask = self.count - 1;
        let index = usize::from(self.tail & mask);
        // SAFETY: index < count, so the entry lies inside the entries mapping. The kernel only
        // reads entries between its head and the published tail; this one is past the tail,
        // so we are its only user until `publish`.
        let entry = unsafe { &mut *self.entries.ptr.cast::<BufRingEntry>().add(index) };
        // SAFETY: bid < count (callers pass ids from 0..count or from a completion), so the
        // address is inside the buffers mapping.
        let addr = unsafe { self.buffers.ptr.add(usize::from(bid) * self.size) };
        entry.set_addr(addr as u64);
        entry.set_len(self.size as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Publish the pushed entries to the kernel.
    pub fn publish(&mut self) {
        // SAFETY: the entries mapping starts with a valid BufRingEntry whose `resv` field is
        // the ring tail (io_uring ABI); it is u16-aligned, and the kernel reads it atomically.
        unsafe {
            let tail =
                BufRingEntry::tail(self.entries.ptr.cast::<BufRingEntry>()) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }

    /// Take the group back from the kernel; after this the memory may be freed. Call only
    /// when no operation that could select a buffer is in flight any more.
    pub fn unregister(&mut self, ring: &IoUring) -> io::Result<()> {
        if self.registered {
            ring.submitter().unregister_buf_ring(GROUP)?;
            self.registered = false;
        }
        Ok(())
    }

    /// Whether the kernel still holds the group (and so may write into the buffers).
    #[cfg(test)]
    pub fn is_registered(&self) -> bool {
        self.registered
    }
}

impl Drop for BufferRing {
    fn drop(&mut self) {
        if self.registered {
            // Still registered: the kernel may select and fill a buffer at any time until the
            // io_uring itself is gone, so this memory must outlive us. Leak it (one core's
            // read buffers, once, on an exit that already went wrong).
            tracing::error!(
                bytes = self.buffers.len + self.entries.len,
                "provided-buffer ring dropped while registered; leaking its memory"
            );
            self.entries.leak();
            self.buffers.leak();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_geometry() {
        let Ok(ring) = IoUring::new(8) else { return };
        assert!(
            BufferRing::new(&ring, 3, 4096).is_err(),
            "count must be a power of two"
        );
        assert!(
            BufferRing::new(&ring, 16, 0).is_err(),
            "size must be positive"
        );
    }

    #[test]
    fn kernel_fills_a_provided_buffer_and_we_recycle_it() {
        use io_uring::{cqueue, opcode, types};
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let mut ring = IoUring::new(8).expect("io_uring available");
        let mut bufs = BufferRing::new(&ring, 2, 64).unwrap();
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        for round in 0..4u8 {
            let msg = [round; 10];
            a.write_all(&msg).unwrap();
            let sqe = opcode::Recv::new(types::Fd(b.as_raw_fd()), std::ptr::null_mut(), 64)
                .buf_group(GROUP)
                .build()
                .flags(io_uring::squeue::Flags::BUFFER_SELECT)
                .user_data(7);
            // SAFETY: the entry references no memory of ours; the buffer comes from the ring.
            unsafe { ring.submission().push(&sqe).unwrap() };
            ring.submit_and_wait(1).unwrap();
            let cqe = ring.completion().next().unwrap();
            assert_eq!(cqe.result(), 10);
            let bid = cqueue::buffer_select(cqe.flags()).expect("a provided buffer");
            assert_eq!(bufs.filled(bid, 10), &msg);
            bufs.recycle(bid);
            bufs.publish();
        }
        bufs.unregister(&ring).unwrap();
        assert!(!bufs.is_registered());
        drop(bufs); // unmapped: the kernel no longer knows the group
        let sqe = opcode::Recv::new(types::Fd(b.as_raw_fd()), std::ptr::null_mut(), 64)
            .buf_group(GROUP)
            .build()
            .flags(io_uring::squeue::Flags::BUFFER_SELECT)
            .user_data(8);
        a.write_all(b"late").unwrap();
        // SAFETY: as above; the group is gone, so the kernel must refuse to select a buffer.
        unsafe { ring.submission().push(&sqe).unwrap() };
        ring.submit_and_wait(1).unwrap();
        let cqe = ring.completion().next().unwrap();
        assert_eq!(cqe.result(), -libc::ENOBUFS, "no buffer after unregister");
    }

    /// Dropped while still registered: the memory is leaked, so a recv that selects one of
    /// its buffers afterwards writes into memory that is still mapped.
    #[test]
    fn a_registered_ring_is_leaked_not_freed() {
        use io_uring::{cqueue, opcode, types};
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let mut ring = IoUring::new(8).expect("io_uring available");
        let bufs = BufferRing::new(&ring, 2, 64).unwrap();
        assert!(bufs.is_registered());
        drop(bufs);
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.write_all(b"after drop").unwrap();
        let sqe = opcode::Recv::new(types::Fd(b.as_raw_fd()), std::ptr::null_mut(), 64)
            .buf_group(GROUP)
            .build()
            .flags(io_uring::squeue::Flags::BUFFER_SELECT)
            .user_data(9);
        // SAFETY: the entry references no memory of ours; the kernel picks a buffer of the
        // leaked (still mapped) group.
        unsafe { ring.submission().push(&sqe).unwrap() };
        ring.submit_and_wait(1).unwrap();
        let cqe = ring.completion().next().unwrap();
        assert_eq!(cqe.result(), 10);
        assert!(cqueue::buffer_select(cqe.flags()).is_some());
    }
}
