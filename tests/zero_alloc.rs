//! The hot path allocates nothing: a whole masked frame in one buffer is unmasked in place,
//! UTF-8 checked and handed out borrowed. Counted by a global allocator that tallies the
//! allocations of the current thread (the test harness runs tests on several threads).

use bytes::BytesMut;
use ringway::protocol::frame::{close_payload, write_client_frame, OpCode, Role};
use ringway::protocol::message::{Event, Limits, MessageDecoder, MessageKind, Payload};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct Counting;

thread_local! {
    // const-initialized and without Drop: reading it never allocates.
    static ALLOCS: Cell<usize> = const { Cell::new(0) };
}

fn bump() {
    let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so
// `System`'s guarantees carry over; the counter is a thread-local Cell, touched without
// allocating.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        bump();
        // SAFETY: forwarded verbatim; the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        bump();
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        bump();
        // SAFETY: as above; `ptr` came from this allocator, i.e. from `System`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocs() -> usize {
    ALLOCS.with(|c| c.get())
}

fn masked(fin: bool, op: OpCode, payload: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::new();
    write_client_frame(&mut b, fin, op, [0x5A, 0xC3, 0x0F, 0x96], payload);
    b.to_vec()
}

fn text_of(len: usize) -> String {
    "Grüße, κόσμε! 😀 "
        .chars()
        .cycle()
        .scan(0, |n, c| {
            *n += c.len_utf8();
            (*n <= len).then_some(c)
        })
        .collect()
}

/// Decode one whole frame and return the allocations the decode itself made.
fn allocs_for(wire: &[u8], check: impl Fn(Event<'_>)) -> usize {
    let limits = Limits {
        max_frame: 1 << 20,
        max_message: 1 << 20,
        max_fragments: 0,
    };
    let mut dec = MessageDecoder::new(Role::Server, limits);
    let mut buf = wire.to_vec();
    let before = allocs();
    let (n, ev) = dec.decode(&mut buf).expect("valid frame");
    assert_eq!(n, wire.len());
    check(ev.expect("a whole frame gives an event"));
    allocs() - before
}

fn expect_borrowed(kind: MessageKind, want: &[u8]) -> impl Fn(Event<'_>) + '_ {
    move |ev| match ev {
        Event::Message {
            kind: k,
            payload: Payload::Borrowed(p),
        } => {
            assert_eq!(k, kind);
            assert!(p == want, "payload differs");
        }
        other => panic!("expected a borrowed message, got {other:?}"),
    }
}

#[test]
fn counter_sees_allocations() {
    // Guard against a counter that cannot fail: a boxed value is counted.
    let before = allocs();
    let b = std::hint::black_box(Box::new([0u8; 64]));
    assert!(allocs() > before);
    drop(b);
}

#[test]
fn whole_text_frames_allocate_nothing() {
    for len in [16, 1024, 64 * 1024] {
        let text = text_of(len);
        assert!(text.len() > len - 4 && text.len() <= len);
        let wire = masked(true, OpCode::Text, text.as_bytes());
        assert_eq!(
            allocs_for(&wire, expect_borrowed(MessageKind::Text, text.as_bytes())),
            0,
            "{len} B text"
        );
    }
}

#[test]
fn whole_binary_frames_allocate_nothing() {
    for len in [16, 1024, 64 * 1024] {
        let data: Vec<u8> = (0..len).map(|i| (i * 89 + 3) as u8).collect();
        let wire = masked(true, OpCode::Binary, &data);
        assert_eq!(
            allocs_for(&wire, expect_borrowed(MessageKind::Binary, &data)),
            0,
            "{len} B binary"
        );
    }
}

#[test]
fn control_frames_allocate_nothing() {
    let wire = masked(true, OpCode::Ping, b"are you there?");
    let n = allocs_for(&wire, |ev| {
        assert!(matches!(ev, Event::Ping(p) if p == b"are you there?"))
    });
    assert_eq!(n, 0, "ping");
    let wire = masked(true, OpCode::Pong, &[7; 125]);
    let n = allocs_for(&wire, |ev| {
        assert!(matches!(ev, Event::Pong(p) if p == [7; 125]))
    });
    assert_eq!(n, 0, "pong");
    let (p, len) = close_payload(1001, "going away ✓");
    let wire = masked(true, OpCode::Close, &p[..len]);
    let n = allocs_for(&wire, |ev| {
        assert!(matches!(ev, Event::Close(Some((1001, "going away ✓")))))
    });
    assert_eq!(n, 0, "close");
}

#[test]
fn a_buffer_of_many_frames_allocates_nothing() {
    let mut wire = Vec::new();
    for i in 0..50u8 {
        wire.extend(masked(
            true,
            OpCode::Text,
            format!("message {i}").as_bytes(),
        ));
        wire.extend(masked(true, OpCode::Ping, &[i]));
    }
    let mut dec = MessageDecoder::new(Role::Server, Limits::default());
    let mut buf = wire.clone();
    let mut off = 0;
    let mut events = 0;
    let before = allocs();
    loop {
        let (n, ev) = dec.decode(&mut buf[off..]).unwrap();
        off += n;
        if ev.is_none() {
            break;
        }
        events += 1;
    }
    let made = allocs() - before;
    assert_eq!((events, off, made), (100, wire.len(), 0));
}

#[test]
fn control_frames_split_across_inputs_allocate_one_buffer_while_they_last() {
    // A partial header is kept inline; a partial control payload in one boxed buffer, made
    // when a read first splits one, reused by the next ones and let go by a data frame
    // (an idle connection does not carry it).
    let wire = masked(true, OpCode::Ping, &[9; 100]);
    let mut dec = MessageDecoder::new(Role::Server, Limits::default());
    let split_ping = |dec: &mut MessageDecoder| {
        let mut a = wire[..3].to_vec();
        let mut b = wire[3..50].to_vec();
        let mut c = wire[50..].to_vec();
        let before = allocs();
        assert!(dec.decode(&mut a).unwrap().1.is_none());
        assert!(dec.decode(&mut b).unwrap().1.is_none());
        let (_, ev) = dec.decode(&mut c).unwrap();
        let made = allocs() - before;
        assert!(matches!(ev, Some(Event::Ping(p)) if p == [9; 100]));
        made
    };
    assert_eq!(split_ping(&mut dec), 1);
    assert_eq!(split_ping(&mut dec), 0, "the buffer is reused");
    assert!(dec.heap_bytes() > 0);
    let mut text = masked(true, OpCode::Text, b"hi");
    assert!(matches!(
        dec.decode(&mut text).unwrap().1,
        Some(Event::Message { .. })
    ));
    assert_eq!(dec.heap_bytes(), 0, "a data frame lets it go");
}

#[test]
fn assembled_messages_do_allocate() {
    // The slow path copies into an owned buffer; this shows the counter sees the decoder's
    // allocations, so the zeros above mean something.
    let mut wire = masked(false, OpCode::Binary, b"abc");
    wire.extend(masked(true, OpCode::Continuation, b"def"));
    let mut dec = MessageDecoder::new(Role::Server, Limits::default());
    let mut buf = wire.clone();
    let before = allocs();
    let (_, ev) = dec.decode(&mut buf).unwrap();
    let made = allocs() - before;
    assert!(
        matches!(ev, Some(Event::Message { payload: Payload::Owned(ref b), .. }) if &b[..] == b"abcdef")
    );
    assert!(made >= 1, "assembly must allocate, counted {made}");
}
