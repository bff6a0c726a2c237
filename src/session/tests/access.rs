//! What a connection's access-log line is made of: its traffic, its path or why it was
//! refused, and which side closed first.

use super::*;

#[test]
fn an_open_connection_counts_its_traffic_and_keeps_its_path() {
    let mut sim = Sim::open(PLAIN, false);
    sim.with(|s, _| s.on_received(100));
    sim.frame(true, OpCode::Text, b"one");
    sim.frame(true, OpCode::Text, b"two");
    let opened = sim.s.traffic().bytes_out;
    assert!(opened > 100, "the 101 was sent: {opened} B");
    assert_eq!(sim.wire(), [text("one"), text("two")]);
    let t = sim.s.traffic();
    assert_eq!((t.messages_in, t.messages_out), (2, 2));
    assert_eq!(t.bytes_in, 100, "what the driver reported");
    assert_eq!(t.bytes_out, opened + 2 * 5, "two 3-byte frames sent");
    assert_eq!(sim.s.note(), Some("/chat"), "the request path");
}

#[test]
fn the_side_that_closed_first_is_known() {
    // The client's close frame first.
    let mut sim = Sim::open(PLAIN, false);
    sim.close_frame(1000, "bye");
    assert!(sim.s.closed_by_client());
    // Ours first (idle timeout), then the client's answer.
    let mut sim = Sim::open("ping_interval_ms = 0\nidle_timeout_ms = 5000\n", false);
    assert_eq!(sim.advance(5_000), Some(Timer::Idle));
    sim.close_frame(1001, "");
    assert!(!sim.s.closed_by_client());
    assert_eq!(sim.s.close_code(), close::GOING_AWAY);
    // No close frame either way: whoever ended TCP.
    let mut sim = Sim::open(PLAIN, false);
    sim.with(|s, cx| s.on_peer_closed(cx, true));
    assert!(sim.s.closed_by_client());
    assert_eq!(sim.s.close_code(), close::ABNORMAL);
    // A send the kernel refused (EPIPE/ECONNRESET): the client went away.
    let mut sim = Sim::open(PLAIN, false);
    assert!(!sim.s.closed_by_client());
    sim.s.on_send_failed();
    assert!(sim.s.closed_by_client());
}

#[test]
fn a_refusal_is_noted_with_its_status_and_bounded() {
    let mut sim = Sim::new(PLAIN, true);
    let long = "a".repeat(3 * NOTE_MAX);
    sim.feed(format!("GET /{long} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
    let note = sim.s.note().expect("a refusal is noted");
    assert!(note.starts_with("426 "), "{note}");
    assert!(note.len() <= NOTE_MAX);
    assert!(!sim.s.closed_by_client());
}
