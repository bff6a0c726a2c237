//! What an idle connection's session holds, accounted.

use super::*;

/// Every byte an idle open connection keeps in its session, part by part (RSS per idle
/// connection is measured by `benches/compare.sh`; this keeps the parts from growing
/// unnoticed). Busy-only state is boxed or on the heap only while in use: assembly of a
/// split message, queued frames, a control frame cut by a read, a fence, an authorization.
#[test]
fn an_idle_sessions_state_is_accounted_part_by_part() {
    use std::mem::size_of;
    let parts = [
        ("decoder", size_of::<MessageDecoder>(), 136),
        ("outbound queue", size_of::<Outbound>(), 96),
        ("lifecycle", size_of::<Lifecycle>(), 56),
        ("message rate", size_of::<Option<MessageRate>>(), 32),
        ("peer address", size_of::<Option<SocketAddr>>(), 32),
        (
            "compression contexts",
            size_of::<compression::Contexts>(),
            24,
        ),
        ("subscriptions", size_of::<Vec<Topic>>(), 24),
        ("subprotocol", size_of::<Option<String>>(), 24),
        ("fence (boxed)", size_of::<Option<Box<Fence>>>(), 8),
        ("transport", size_of::<transport::Transport>(), 8),
        ("traffic (access log)", size_of::<Traffic>(), 32),
        (
            "path or refusal (access log)",
            size_of::<Option<Box<str>>>(),
            16,
        ),
    ];
    for (name, size, cap) in parts {
        assert!(size <= cap, "{name}: {size} B, was {cap} B");
    }
    let listed: usize = parts.iter().map(|p| p.1).sum();
    // The rest: id, route, close state, flags and the timestamps of its timers.
    let session = size_of::<Session>();
    assert!(session <= 608, "Session is {session} B");
    assert!(
        session - listed <= 136,
        "unlisted fields take {} B",
        session - listed
    );

    // Open and idle after a message each way: nothing on the heap but the outbound queue's
    // slots, and the footprint charged is the base.
    let mut sim = Sim::open(PLAIN, false);
    sim.frame(false, OpCode::Text, b"hel");
    sim.frame(true, OpCode::Continuation, b"lo");
    assert_eq!(sim.wire(), [text("hello")]);
    assert_eq!(sim.s.decoder.heap_bytes(), 0, "the assembly is let go");
    assert_eq!(sim.s.out.cost(), 0);
    let slots = sim.s.out.heap_bytes();
    assert!(
        slots <= 4 * size_of::<Bytes>() + 4 * 8,
        "queue slots {slots} B"
    );
    let path = sim.s.note().map_or(0, str::len);
    assert!(path > 0, "the path is kept for the access log");
    assert_eq!(sim.s.footprint(), BASE_BYTES + slots + path);
}
