//! What one `dedicated` connection's compression contexts really hold, measured with a
//! counting global allocator (live bytes of this thread), against the figures the session
//! charges to the memory budget (`takeover::deflater_bytes`, `takeover::inflater_bytes`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use ringway::protocol::deflate::takeover::{self, TakeoverDeflater, TakeoverInflater};

struct Counting;

thread_local! {
    // const-initialized and without Drop: touching it never allocates.
    static LIVE: Cell<isize> = const { Cell::new(0) };
}

fn track(delta: isize) {
    let _ = LIVE.try_with(|c| c.set(c.get() + delta));
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so
// `System`'s guarantees carry over; the tally is a thread-local Cell, touched without
// allocating.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        track(layout.size() as isize);
        // SAFETY: forwarded verbatim; the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        track(layout.size() as isize);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        track(new_size as isize - layout.size() as isize);
        // SAFETY: as above; `ptr` came from this allocator, i.e. from `System`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        track(-(layout.size() as isize));
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn live() -> isize {
    LIVE.with(|c| c.get())
}

fn json(n: usize) -> Vec<u8> {
    let mut s = String::new();
    let mut i = 0;
    while s.len() < n {
        s.push_str(&format!("{{\"id\":{i},\"name\":\"user{i}\",\"ok\":true}},"));
        i += 1;
    }
    s.truncate(n);
    s.into_bytes()
}

/// Live bytes a context holds after it was made and used for two messages (zlib makes
/// some state on first use), with every buffer the caller owns made beforehand.
#[test]
fn dedicated_contexts_hold_what_the_meter_is_charged() {
    let msg = json(40_000);
    let mut rows = Vec::new();
    for bits in 9..=15u8 {
        let mut z1 = Vec::with_capacity(1 << 20);
        let mut z2 = Vec::with_capacity(1 << 20);
        let before = live();
        let mut d = TakeoverDeflater::new(bits, ringway::protocol::deflate::DEFAULT_LEVEL);
        d.compress(&msg, &mut z1);
        d.compress(&msg, &mut z2);
        let deflater = live() - before;
        assert!(z1.capacity() == 1 << 20 && z2.capacity() == 1 << 20);

        let mut chunk = vec![0u8; 16 * 1024];
        let before = live();
        let mut i = TakeoverInflater::new(bits);
        let back = i.inflate(&mut chunk, &z1, 1 << 20).unwrap();
        assert_eq!(back, msg);
        drop(back);
        let back = i.inflate(&mut chunk, &z2, 1 << 20).unwrap();
        assert_eq!(back, msg);
        drop(back);
        let inflater = live() - before;
        rows.push((bits, deflater, inflater));
        drop((d, i));
    }
    for (bits, d, i) in &rows {
        eprintln!("window {bits}: compressor {d} B, inflater {i} B");
    }
    for (bits, d, i) in rows {
        assert_eq!(
            d as usize,
            takeover::deflater_bytes(bits),
            "compressor, window {bits}"
        );
        assert_eq!(
            i as usize,
            takeover::inflater_bytes(bits),
            "inflater, window {bits}"
        );
    }
}
