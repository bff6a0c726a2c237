//! The session with simulated time and no sockets: bytes in, then what the wire would see
//! (the queued bytes, parsed back into responses and frames), what the relay would be told
//! and what was counted. Every transition, close path and timer.

use std::cell::RefCell;

use bytes::BytesMut;

use super::*;
use crate::config::Upstream;
use crate::protocol::frame::write_client_frame;

#[derive(Default)]
struct Recorder(RefCell<Vec<Count>>);

impl Meter for Recorder {
    fn count(&self, what: Count) {
        self.0.borrow_mut().push(what);
    }
}

/// What the client would read: an HTTP response (status) or a server frame.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Wire {
    Http(u16),
    /// A close frame with a code (its reason left out).
    Close(u16),
    Frame(OpCode, Vec<u8>),
}

fn parse(item: &[u8]) -> Wire {
    if let Some(rest) = item.strip_prefix(b"HTTP/1.1 ") {
        let status = std::str::from_utf8(&rest[..3]).unwrap().parse().unwrap();
        return Wire::Http(status);
    }
    let opcode = OpCode::from_u8(item[0] & 0x0f).expect("an opcode");
    assert_eq!(item[1] & 0x80, 0, "server frames are not masked");
    let (len, at) = lengths(item);
    assert_eq!(item.len(), at + len, "one frame per queued item");
    match (opcode, &item[at..]) {
        (OpCode::Close, [a, b, ..]) => Wire::Close(u16::from_be_bytes([*a, *b])),
        (_, payload) => Wire::Frame(opcode, payload.to_vec()),
    }
}

/// A server frame's payload length and header length, from its header.
fn lengths(frame: &[u8]) -> (usize, usize) {
    match frame[1] & 0x7f {
        126 => (u16::from_be_bytes([frame[2], frame[3]]) as usize, 4),
        127 => (
            u64::from_be_bytes(frame[2..10].try_into().unwrap()) as usize,
            10,
        ),
        n => (n as usize, 2),
    }
}

/// The queued items with every header-only item joined to the payload item after it (a
/// large payload the session owns is queued as it is, behind its header).
fn whole_items(queued: &std::collections::VecDeque<Bytes>) -> Vec<Vec<u8>> {
    let mut items: Vec<Vec<u8>> = Vec::new();
    let mut header_only = false;
    for item in queued {
        if header_only {
            items.last_mut().unwrap().extend_from_slice(item);
            header_only = false;
            continue;
        }
        header_only = !item.starts_with(b"HTTP/") && item.len() >= 2 && {
            let (len, at) = lengths(item);
            len > 0 && item.len() == at
        };
        items.push(item.to_vec());
    }
    items
}

const REQUEST: &str =
    "GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
     Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

struct Sim {
    config: Config,
    routes: RouteTable,
    meter: Recorder,
    scratch: Vec<u8>,
    codec: super::compression::SharedCodec,
    out: Vec<Output>,
    now: u64,
    relay: bool,
    draining: Option<u64>,
    s: Session,
}

impl Sim {
    /// With the embedded upstream behind a relay (`relay = true`) or local echo.
    fn new(toml_text: &str, relay: bool) -> Sim {
        let mut config: Config = toml::from_str(toml_text).unwrap();
        if !relay {
            config.upstream = Upstream::LocalEcho;
        }
        let routes = RouteTable::from_config(&config).unwrap();
        let s = Session::new(ConnId::new(0, 1, 0), None, config.message_limits(), 0);
        Sim {
            config,
            routes,
            meter: Recorder::default(),
            scratch: Vec::new(),
            codec: Default::default(),
            out: Vec::new(),
            now: 0,
            relay,
            draining: None,
            s,
        }
    }

    /// Open (101 read off the wire, `Open` taken from the relay's outputs).
    fn open(toml_text: &str, relay: bool) -> Sim {
        let mut sim = Sim::new(toml_text, relay);
        sim.feed(REQUEST.as_bytes());
        assert_eq!(sim.wire(), [Wire::Http(101)]);
        assert_eq!(sim.s.state(), State::Open);
        let out = sim.outputs();
        assert!(
            matches!(out[..], [Output::Relay(ToUpstream::Open { .. })]),
            "{out:?}"
        );
        sim.meter.0.borrow_mut().clear();
        sim
    }

    fn with<R>(&mut self, f: impl FnOnce(&mut Session, &mut Context<'_>) -> R) -> R {
        let mut cx = Context {
            now_ms: self.now,
            unix_ms: 1_700_000_000_000 + self.now,
            config: &self.config,
            routes: &self.routes,
            meter: &self.meter,
            relay: self.relay,
            scratch: &mut self.scratch,
            codec: &mut self.codec,
            panic_on: None,
            out: &mut self.out,
        };
        f(&mut self.s, &mut cx)
    }

    fn feed(&mut self, bytes: &[u8]) {
        let mut data = bytes.to_vec();
        self.with(|s, cx| s.on_bytes(cx, &mut data));
    }

    fn frame(&mut self, fin: bool, opcode: OpCode, payload: &[u8]) {
        let mut buf = BytesMut::new();
        write_client_frame(&mut buf, fin, opcode, [1, 2, 3, 4], payload);
        self.feed(&buf);
    }

    fn close_frame(&mut self, code: u16, reason: &str) {
        let (p, n) = frame::close_payload(code, reason);
        self.frame(true, OpCode::Close, &p[..n]);
    }

    /// Everything queued, as the client reads it; the driver's send completes at once.
    fn wire(&mut self) -> Vec<Wire> {
        let items: Vec<Wire> = whole_items(self.s.queued())
            .iter()
            .map(|b| parse(b))
            .collect();
        let n = self.s.queued().len();
        let bytes = self.s.queued_bytes();
        self.s.start_send(n);
        self.s.on_sent(bytes);
        items
    }

    fn outputs(&mut self) -> Vec<Output> {
        std::mem::take(&mut self.out)
    }

    fn counted(&self) -> Vec<Count> {
        self.meter.0.borrow().clone()
    }

    /// Move the clock to `now` and fire what is due, as the driver's wheel would.
    fn advance(&mut self, now: u64) -> Option<Timer> {
        self.now = now;
        let draining = self.draining;
        self.with(|s, cx| s.handle_timeout(cx, draining))
    }

    fn next_timer(&self) -> Option<(Timer, u64)> {
        let t = self.s.timers(&self.config, self.draining);
        let at = t.next()?;
        Some((t.expired(at).unwrap(), at))
    }

    fn shutdown(&mut self) -> Option<Shutdown> {
        self.s.poll_shutdown(self.now, false)
    }

    fn relay_send(&mut self, text: &str) {
        self.with(|s, cx| s.on_relay_send(cx, MessageKind::Text, text.as_bytes()));
    }

    fn relay_close(&mut self, code: u16) {
        self.with(|s, cx| s.on_relay_close(cx, code, ""));
    }
}

fn text(payload: &str) -> Wire {
    Wire::Frame(OpCode::Text, payload.as_bytes().to_vec())
}

const PLAIN: &str = "";

// ----- handshake -----

#[test]
fn handshake_opens_and_tells_the_relay() {
    let mut sim = Sim::new(PLAIN, true);
    assert_eq!(sim.s.state(), State::Handshaking);
    sim.feed(&REQUEST.as_bytes()[..20]);
    assert_eq!((sim.s.state(), sim.wire()), (State::Handshaking, vec![]));
    sim.feed(&REQUEST.as_bytes()[20..]);
    assert_eq!(sim.wire(), [Wire::Http(101)]);
    assert_eq!(sim.s.state(), State::Open);
    assert!(sim.s.counted_open());
    assert!(matches!(
        sim.outputs()[..],
        [Output::Relay(ToUpstream::Open { .. })]
    ));
    assert!(matches!(sim.counted()[..], [Count::HandshakeOk { .. }]));
}

#[test]
fn frames_pipelined_after_the_request_are_read() {
    let mut sim = Sim::new(PLAIN, false);
    let mut bytes = BytesMut::from(REQUEST.as_bytes());
    write_client_frame(&mut bytes, true, OpCode::Text, [9; 4], b"early");
    sim.feed(&bytes);
    assert_eq!(sim.wire(), [Wire::Http(101), text("early")]);
}

#[test]
fn bad_request_is_refused_then_tcp_goes_after_the_flush() {
    let mut sim = Sim::new(PLAIN, true);
    sim.feed(b"GET /chat HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(sim.s.state(), State::Draining);
    assert_eq!(sim.s.poll_shutdown(0, false), None, "not flushed yet");
    let wire = sim.wire();
    assert!(matches!(wire[..], [Wire::Http(400..=426)]), "{wire:?}");
    assert_eq!(sim.s.poll_shutdown(0, true), None, "send still in flight");
    assert_eq!(sim.shutdown(), Some(Shutdown::Write));
    assert_eq!(sim.shutdown(), None, "FIN once");
    assert_eq!(sim.counted(), [Count::HandshakeRejected]);
    assert!(sim.outputs().is_empty(), "the relay never heard of it");
    // The client's FIN ends it.
    sim.with(|s, cx| s.on_peer_closed(cx, false));
    assert_eq!(sim.shutdown(), Some(Shutdown::Both));
    sim.s.on_shut();
    assert_eq!(sim.s.state(), State::Closed);
    assert_eq!(sim.s.poll_timeout(&sim.config, None), None);
}

#[test]
fn policy_refusals_are_counted_under_their_label() {
    let routes = r#"
[[routes]]
path = "/chat"
origins = ["https://ok.example"]
[[routes]]
path = "/jwt"
[routes.jwt]
algorithm = "HS256"
secret = "0123456789abcdef0123456789abcdef-session"
"#;
    let mut sim = Sim::new(routes, true);
    sim.feed(
        REQUEST
            .replace("Host: x", "Host: x\r\nOrigin: https://evil.example")
            .as_bytes(),
    );
    assert_eq!(sim.wire(), [Wire::Http(403)]);
    assert_eq!(
        sim.counted(),
        [
            Count::Refused(PolicyRefusal::Origin),
            Count::HandshakeRejected
        ]
    );
    let mut sim = Sim::new(routes, true);
    sim.feed(REQUEST.replace("/chat", "/jwt").as_bytes());
    assert_eq!(sim.wire(), [Wire::Http(401)]);
    assert_eq!(sim.counted()[0], Count::Refused(PolicyRefusal::Auth));
    assert_eq!(PolicyRefusal::Auth.label(), "auth");
}

#[test]
fn refused_at_accept_answers_once_the_request_arrives() {
    let mut sim = Sim::new(PLAIN, true);
    sim.s.refuse_at_accept(&AcceptRefusal::ConnectionLimit);
    sim.feed(REQUEST.as_bytes());
    assert_eq!(sim.wire(), [Wire::Http(503)]);
    assert_eq!(sim.shutdown(), Some(Shutdown::Write));
    assert!(sim.outputs().is_empty());
}

#[test]
fn handshake_timeout_is_408_then_the_linger_drops_tcp() {
    let mut sim = Sim::new(PLAIN, true);
    sim.feed(b"GET /chat HTTP/1.1\r\n");
    assert_eq!(sim.next_timer(), Some((Timer::Handshake, 10_000)));
    assert_eq!(sim.advance(9_999), None);
    assert_eq!(sim.advance(10_000), Some(Timer::Handshake));
    assert_eq!(sim.s.state(), State::Draining);
    // The client does not read: the 408 stays queued, and the linger ends it.
    assert_eq!(sim.shutdown(), None);
    assert_eq!(sim.next_timer(), Some((Timer::CloseLinger, 12_000)));
    assert_eq!(sim.advance(12_000), Some(Timer::CloseLinger));
    assert_eq!(sim.shutdown(), Some(Shutdown::Both));
    assert_eq!(sim.wire(), [Wire::Http(408)]);
}

// ----- authorization -----

const AUTHORIZE: &str = r#"
[[routes]]
path = "/*"
authorize = true
authorize_timeout_ms = 3000
"#;

#[test]
fn a_held_handshake_opens_on_accept_with_its_pipelined_frames() {
    let mut sim = Sim::new(AUTHORIZE, true);
    let mut bytes = BytesMut::from(REQUEST.as_bytes());
    write_client_frame(&mut bytes, true, OpCode::Text, [9; 4], b"early");
    sim.feed(&bytes);
    assert_eq!(sim.s.state(), State::Authorizing);
    assert!(sim.wire().is_empty());
    assert!(sim.s.accepts_replies());
    assert!(
        matches!(&sim.outputs()[..], [Output::Relay(ToUpstream::Open { info, .. })] if info.authorize)
    );
    sim.with(|s, cx| s.on_authorization(cx, Ok(())));
    assert_eq!(sim.wire(), [Wire::Http(101)]);
    assert!(
        matches!(&sim.outputs()[..], [Output::Message { payload, .. }] if &payload[..] == b"early")
    );
}

#[test]
fn a_rejected_handshake_is_refused_and_the_relay_told_closed() {
    let mut sim = Sim::new(AUTHORIZE, true);
    sim.feed(REQUEST.as_bytes());
    sim.outputs();
    sim.with(|s, cx| s.on_authorization(cx, Err((200, "no".into()))));
    assert_eq!(
        sim.wire(),
        [Wire::Http(403)],
        "only refusals: 200 becomes 403"
    );
    assert!(matches!(
        sim.outputs()[..],
        [Output::Relay(ToUpstream::Closed { code: 1008, .. })]
    ));
    assert!(!sim.s.counted_open(), "the relay must not hear of it again");
}

#[test]
fn authorization_timeout_is_503() {
    let mut sim = Sim::new(AUTHORIZE, true);
    sim.feed(REQUEST.as_bytes());
    assert_eq!(sim.next_timer(), Some((Timer::Authorize, 3_000)));
    assert_eq!(sim.advance(3_000), Some(Timer::Authorize));
    assert_eq!(sim.wire(), [Wire::Http(503)]);
    assert_eq!(sim.next_timer(), Some((Timer::CloseLinger, 5_000)));
}

// ----- messages -----

#[test]
fn messages_go_to_the_relay_or_are_echoed_locally() {
    let mut sim = Sim::open(PLAIN, true);
    sim.frame(true, OpCode::Text, b"hi");
    assert!(
        matches!(&sim.outputs()[..], [Output::Message { kind: MessageKind::Text, payload, .. }] if &payload[..] == b"hi")
    );
    sim.relay_send("reply");
    assert_eq!(sim.wire(), [text("reply")]);
    assert_eq!(
        sim.counted(),
        [
            Count::MessageIn { route: 0 },
            Count::Relayed {
                route: 0,
                upstream: 0
            },
            Count::MessageOut { route: 0 }
        ]
    );

    let mut sim = Sim::open(PLAIN, false);
    sim.frame(false, OpCode::Text, b"he");
    sim.frame(true, OpCode::Continuation, b"llo");
    assert_eq!(sim.wire(), [text("hello")]);
    assert!(sim.outputs().is_empty());
}

#[test]
fn pings_get_pongs_and_pongs_clear_our_ping() {
    let mut sim = Sim::open(PLAIN, false);
    sim.frame(true, OpCode::Ping, b"p1");
    sim.frame(true, OpCode::Ping, b"p2");
    assert_eq!(
        sim.wire(),
        [
            Wire::Frame(OpCode::Pong, b"p1".to_vec()),
            Wire::Frame(OpCode::Pong, b"p2".to_vec())
        ]
    );
}

/// A message gathered across reads is echoed from its own memory: the queue holds the
/// header and then the very bytes that were assembled (no copy), which read back as one
/// frame; a message that arrived in one read is copied into one frame, as before.
#[test]
fn a_gathered_large_message_is_echoed_without_a_copy() {
    let mut sim = Sim::open(PLAIN, false);
    let payload: Vec<u8> = (0..SEND_PAYLOAD_AS_IS_FROM + 5000)
        .map(|i| i as u8)
        .collect();
    let mut buf = BytesMut::new();
    write_client_frame(&mut buf, true, OpCode::Binary, [1, 2, 3, 4], &payload);
    let (a, b) = buf.split_at(3000);
    sim.feed(a);
    sim.feed(b);
    let items: Vec<Bytes> = sim.s.queued().iter().cloned().collect();
    assert_eq!(items.len(), 2, "header, then the payload as assembled");
    assert_eq!(items[0].len(), 4, "a 16-bit length header");
    let whole: Vec<u8> = items.concat();
    assert_eq!(parse(&whole), Wire::Frame(OpCode::Binary, payload.clone()));
    assert_eq!(sim.s.queued_cost(), whole.len() + 2 * ENTRY_BYTES);
    sim.wire();
    // The same message in one read is borrowed from the read buffer: copied, one item.
    sim.feed(&buf);
    assert_eq!(sim.s.queued().len(), 1);
    assert_eq!(sim.wire(), [Wire::Frame(OpCode::Binary, payload)]);
    // Small gathered messages are still one frame.
    let mut small = BytesMut::new();
    write_client_frame(&mut small, true, OpCode::Text, [1, 2, 3, 4], b"hello there");
    sim.feed(&small[..5]);
    sim.feed(&small[5..]);
    assert_eq!(sim.wire(), [text("hello there")]);
}

// ----- close paths -----

#[test]
fn client_close_is_echoed_then_fin() {
    let mut sim = Sim::open(PLAIN, false);
    sim.frame(true, OpCode::Text, b"before");
    sim.close_frame(1000, "bye");
    assert_eq!(sim.s.state(), State::Draining);
    assert_eq!(sim.wire(), [text("before"), Wire::Close(1000)]);
    assert_eq!(sim.s.close_code(), 1000);
    assert_eq!(sim.shutdown(), Some(Shutdown::Write));
    sim.with(|s, cx| s.on_peer_closed(cx, false));
    assert_eq!(sim.shutdown(), Some(Shutdown::Both));
}

#[test]
fn client_close_without_code_is_answered_without_code() {
    let mut sim = Sim::open(PLAIN, false);
    sim.frame(true, OpCode::Close, b"");
    assert_eq!(
        sim.wire(),
        [Wire::Frame(OpCode::Close, vec![])],
        "RFC 6455 §5.5.1"
    );
    assert_eq!(sim.s.close_code(), close::NO_STATUS);
}

#[test]
fn client_close_through_the_relay_waits_for_the_fence() {
    let mut sim = Sim::open(PLAIN, true);
    sim.frame(true, OpCode::Text, b"q");
    sim.close_frame(1000, "");
    let out = sim.outputs();
    assert!(
        matches!(
            out[..],
            [
                Output::Message { .. },
                Output::Relay(ToUpstream::Fence { code: 1000, .. })
            ]
        ),
        "{out:?}"
    );
    assert_eq!(sim.s.state(), State::Closing);
    assert!(
        sim.s.accepts_replies(),
        "replies before the fence still count"
    );
    sim.relay_send("answer");
    sim.relay_close(1000);
    assert_eq!(sim.wire(), [text("answer"), Wire::Close(1000)]);
    assert_eq!(sim.shutdown(), Some(Shutdown::Write));
}

#[test]
fn a_fence_the_relay_never_returns_drops_tcp_after_the_linger() {
    let mut sim = Sim::open(PLAIN, true);
    sim.now = 100;
    sim.close_frame(1000, "");
    assert_eq!(sim.next_timer(), Some((Timer::CloseLinger, 2_100)));
    assert_eq!(sim.advance(2_100), Some(Timer::CloseLinger));
    assert_eq!(sim.shutdown(), Some(Shutdown::Both));
}

/// Autobahn 3.2, 4.1.3, 5.15...: the echo of a message the client sent before its bad frame
/// reaches it before our 1002, though the echo was still in the relay.
#[test]
fn protocol_error_closes_1002_after_replies_already_routed() {
    let mut sim = Sim::open(PLAIN, true);
    sim.frame(true, OpCode::Text, b"Hello, world!");
    let mut bad = BytesMut::new();
    write_client_frame(&mut bad, true, OpCode::Text, [1; 4], b"x");
    bad[0] |= 0x20; // RSV2
    write_client_frame(&mut bad, true, OpCode::Ping, [1; 4], b"");
    sim.feed(&bad);
    let out = sim.outputs();
    assert!(
        matches!(
            out[..],
            [
                Output::Message { .. },
                Output::Relay(ToUpstream::Fence { code: 1002, .. })
            ]
        ),
        "{out:?}"
    );
    assert!(sim.wire().is_empty(), "no close before the replies");
    assert!(sim.s.reading_done(), "nothing more is read: no pong");
    sim.relay_send("Hello, world!");
    // The relay's answer (a backend's own code) does not change ours.
    sim.relay_close(1000);
    assert_eq!(sim.wire(), [text("Hello, world!"), Wire::Close(1002)]);
    assert_eq!(sim.s.close_code(), 1002);
    assert_eq!(sim.shutdown(), Some(Shutdown::Write));
    assert_eq!(
        sim.counted(),
        [
            Count::MessageIn { route: 0 },
            Count::Relayed {
                route: 0,
                upstream: 0
            },
            Count::ProtocolError,
            Count::MessageOut { route: 0 }
        ]
    );
}

#[test]
fn protocol_error_after_our_close_needs_no_fence_and_tells_the_relay_closed() {
    let mut sim = Sim::open(PLAIN, true);
    sim.relay_close(1012);
    assert_eq!(sim.wire(), [Wire::Close(1012)]);
    // 1012 is ours to send, not the client's (Autobahn 7.9): a protocol error.
    sim.close_frame(1012, "");
    assert!(matches!(
        sim.outputs()[..],
        [Output::Relay(ToUpstream::Closed { code: 1002, .. })]
    ));
    assert!(sim.wire().is_empty(), "one close per side");
    assert_eq!(sim.s.close_code(), 1012, "what we sent");
    assert_eq!(sim.shutdown(), Some(Shutdown::Write));
}

/// A backend's answer to `close` is not waited for (docs/relay-protocol.md, "Close").
#[test]
fn protocol_error_with_a_backend_closes_at_once_and_tells_the_relay_closed() {
    let backend = "[[upstreams]]\nname = \"b\"\nbackends = [\"tcp://127.0.0.1:9\"]\n\
                   [[routes]]\npath = \"/*\"\nupstream = \"b\"\n";
    let mut sim = Sim::open(backend, true);
    sim.frame(true, OpCode::Text, &[0xff]);
    assert_eq!(sim.wire(), [Wire::Close(close::INVALID_PAYLOAD)]);
    assert!(matches!(
        sim.outputs()[..],
        [Output::Relay(ToUpstream::Closed { code: 1007, .. })]
    ));
    assert!(!sim.s.counted_open());
}

#[test]
fn protocol_error_fence_timeout_still_sends_the_close() {
    let mut sim = Sim::open(PLAIN, true);
    sim.frame(true, OpCode::Continuation, b"x");
    assert_eq!(
        sim.s.close_code(),
        1002,
        "the relay's Closed carries it even if TCP goes"
    );
    assert!(sim.wire().is_empty());
    assert_eq!(sim.advance(2_000), Some(Timer::CloseLinger));
    assert_eq!(sim.wire(), [Wire::Close(1002)]);
    assert_eq!(sim.shutdown(), Some(Shutdown::Write));
    // And the late fence changes nothing.
    sim.relay_close(1000);
    assert!(sim.wire().is_empty());
}

#[test]
fn protocol_errors_without_a_relay_close_at_once_with_their_code() {
    for (payload, code) in [
        (&[0xff, 0xfe][..], close::INVALID_PAYLOAD), // 1007: not UTF-8
        (b"x" as &[u8], close::PROTOCOL_ERROR),
    ] {
        let mut sim = Sim::open(PLAIN, false);
        if code == close::PROTOCOL_ERROR {
            sim.frame(true, OpCode::Continuation, payload);
        } else {
            sim.frame(true, OpCode::Text, payload);
        }
        assert_eq!(sim.wire(), [Wire::Close(code)]);
        assert_eq!(sim.s.state(), State::Draining);
        assert!(sim.counted().contains(&Count::ProtocolError));
    }
}

#[test]
fn oversized_message_closes_1009() {
    let mut sim = Sim::open("max_message_bytes = 1024\n", false);
    sim.frame(true, OpCode::Binary, &[0; 2048]);
    assert_eq!(sim.wire(), [Wire::Close(close::MESSAGE_TOO_BIG)]);
}

#[test]
fn message_rate_closes_1008_and_is_counted() {
    let routes = "[[routes]]\npath = \"/*\"\nmessages_per_sec = 1\nmessage_burst = 1\n";
    let mut sim = Sim::open(routes, false);
    sim.frame(true, OpCode::Text, b"1");
    sim.frame(true, OpCode::Text, b"2");
    assert_eq!(
        sim.wire(),
        [text("1"), Wire::Close(close::POLICY_VIOLATION)]
    );
    assert!(sim
        .counted()
        .contains(&Count::Refused(PolicyRefusal::MessageRate)));
}

#[test]
fn too_many_fragments_close_1008_and_are_counted() {
    let routes = "[[routes]]\npath = \"/*\"\nmax_fragments = 2\n";
    let mut sim = Sim::open(routes, false);
    sim.frame(false, OpCode::Text, b"a");
    sim.frame(false, OpCode::Continuation, b"b");
    sim.frame(true, OpCode::Continuation, b"c");
    assert_eq!(sim.wire(), [Wire::Close(close::POLICY_VIOLATION)]);
    assert!(sim
        .counted()
        .contains(&Count::Refused(PolicyRefusal::Fragments)));
}

#[test]
fn duplicate_route_key_closes_1008() {
    let routes = r#"
[[upstreams]]
name = "a"
backends = ["tcp://127.0.0.1:9"]
[[routes]]
path = "/*"
route_key = "action"
actions = { x = "a" }
"#;
    let mut sim = Sim::open(routes, true);
    sim.frame(true, OpCode::Text, br#"{"action":"x","action":"y"}"#);
    assert!(matches!(
        sim.outputs()[..],
        [Output::Relay(ToUpstream::Fence { code: 1008, .. })]
    ));
    sim.relay_close(1008);
    let reason = MessageRefusal::DuplicateRouteKey.to_string();
    assert!(
        sim.s.queued()[0].ends_with(reason.as_bytes()),
        "the reason says why"
    );
    assert_eq!(sim.wire(), [Wire::Close(close::POLICY_VIOLATION)]);
}

#[test]
fn relay_close_codes_are_checked() {
    for (from_backend, on_wire) in [(1000, 1000), (4000, 4000), (1012, 1012), (1006, 1011)] {
        let mut sim = Sim::open(PLAIN, true);
        sim.relay_close(from_backend);
        assert_eq!(sim.wire(), [Wire::Close(on_wire)], "{from_backend}");
        assert_eq!(
            sim.s.state(),
            State::Closing,
            "waits for the client's close"
        );
        assert!(!sim.s.accepts_replies());
        sim.close_frame(1000, "");
        assert!(sim.wire().is_empty(), "one close per side");
        let out = sim.outputs();
        assert!(
            out.is_empty(),
            "nothing to fence: the backend closed: {out:?}"
        );
        assert_eq!(sim.s.state(), State::Draining);
        assert_eq!(sim.shutdown(), Some(Shutdown::Write));
    }
}

#[test]
fn our_close_unanswered_drops_tcp_after_the_linger() {
    let mut sim = Sim::open(PLAIN, true);
    sim.now = 50;
    sim.relay_close(1000);
    assert_eq!(sim.next_timer(), Some((Timer::CloseLinger, 2_050)));
    assert_eq!(sim.advance(2_050), Some(Timer::CloseLinger));
    assert_eq!(sim.shutdown(), Some(Shutdown::Both));
}

#[test]
fn after_fin_the_linger_ends_the_wait_for_the_clients_fin() {
    let mut sim = Sim::open(PLAIN, false);
    sim.close_frame(1000, "");
    sim.wire();
    sim.now = 10;
    assert_eq!(sim.shutdown(), Some(Shutdown::Write));
    assert_eq!(sim.next_timer(), Some((Timer::CloseLinger, 2_010)));
    assert_eq!(sim.advance(2_010), Some(Timer::CloseLinger));
    assert_eq!(sim.shutdown(), Some(Shutdown::Both));
}

#[test]
fn a_reset_drops_what_is_queued() {
    let mut sim = Sim::open(PLAIN, true);
    sim.relay_send("lost");
    sim.with(|s, cx| s.on_peer_closed(cx, true));
    assert!(sim.s.peer_closed() && sim.s.queued().is_empty());
    assert_eq!(sim.shutdown(), Some(Shutdown::Both));
    let mut sim = Sim::open(PLAIN, true);
    sim.relay_send("lost");
    sim.s.on_send_failed();
    assert_eq!(sim.shutdown(), Some(Shutdown::Write));
}

#[test]
fn drain_sends_1001_and_waits_until_the_drain_deadline() {
    let mut sim = Sim::open(PLAIN, true);
    sim.draining = Some(10_000);
    assert!(!sim.s.begin_drain(0));
    assert_eq!(sim.wire(), [Wire::Close(close::GOING_AWAY)]);
    assert_eq!(sim.next_timer(), Some((Timer::Drain, 10_000)));
    assert_eq!(sim.advance(10_000), Some(Timer::Drain));
    assert_eq!(sim.shutdown(), Some(Shutdown::Both));
    // A client that answers is done at once.
    let mut sim = Sim::open(PLAIN, false);
    sim.draining = Some(10_000);
    sim.s.begin_drain(0);
    sim.close_frame(1001, "");
    sim.wire();
    assert_eq!(sim.shutdown(), Some(Shutdown::Write));
    // One still handshaking is dropped.
    let mut sim = Sim::new(PLAIN, true);
    assert!(sim.s.begin_drain(0));
}

#[test]
fn reload_removing_the_route_closes_1001_after_replies() {
    let mut sim = Sim::open(PLAIN, false);
    sim.with(|s, cx| s.close_after_replies(cx, close::GOING_AWAY, "route removed"));
    assert_eq!(sim.wire(), [Wire::Close(close::GOING_AWAY)]);
}

#[test]
fn a_panic_closes_1011_when_open_and_500_in_the_handshake() {
    let mut sim = Sim::open(PLAIN, true);
    assert!(sim.with(|s, cx| s.on_panic(cx, false)));
    assert_eq!(sim.wire(), [Wire::Close(close::INTERNAL_ERROR)]);
    assert_eq!(sim.s.state(), State::Draining);
    let mut sim = Sim::new(PLAIN, true);
    assert!(sim.with(|s, cx| s.on_panic(cx, false)));
    assert_eq!(sim.wire(), [Wire::Http(500)]);
    assert_eq!(sim.s.close_code(), close::INTERNAL_ERROR);
    // Mid-send in its handshake: nothing fits; the driver drops TCP.
    let mut sim = Sim::new(PLAIN, true);
    sim.s.refuse_at_accept(&AcceptRefusal::Memory);
    assert!(!sim.with(|s, cx| s.on_panic(cx, true)));
}

#[test]
fn shedding_closes_1008_and_lets_go_of_the_queue() {
    let mut sim = Sim::open(PLAIN, true);
    for _ in 0..10 {
        sim.relay_send("queued");
    }
    sim.with(|s, cx| s.shed(cx, false));
    assert_eq!(sim.wire(), [Wire::Close(close::POLICY_VIOLATION)]);
    assert!(sim
        .counted()
        .contains(&Count::Refused(PolicyRefusal::MemoryShed)));
}

// ----- timers of an open connection -----

const TIMERS: &str = "ping_interval_ms = 1000\npong_timeout_ms = 500\nidle_timeout_ms = 5000\n";

#[test]
fn ping_after_silence_then_no_pong_closes_1001() {
    let mut sim = Sim::open(TIMERS, false);
    assert_eq!(sim.next_timer(), Some((Timer::Ping, 1_000)));
    assert_eq!(sim.advance(999), None);
    assert_eq!(sim.advance(1_000), Some(Timer::Ping));
    assert_eq!(sim.wire(), [Wire::Frame(OpCode::Ping, vec![])]);
    assert_eq!(sim.next_timer(), Some((Timer::Pong, 1_500)));
    assert_eq!(sim.advance(1_500), Some(Timer::Pong));
    assert_eq!(sim.wire(), [Wire::Close(close::GOING_AWAY)]);
}

#[test]
fn a_pong_rearms_the_ping() {
    let mut sim = Sim::open(TIMERS, false);
    sim.advance(1_000);
    sim.wire();
    sim.now = 1_200;
    sim.frame(true, OpCode::Pong, b"");
    assert_eq!(sim.next_timer(), Some((Timer::Ping, 2_200)));
}

#[test]
fn idle_timeout_closes_1001_despite_pongs() {
    let mut sim = Sim::open("ping_interval_ms = 0\nidle_timeout_ms = 5000\n", false);
    sim.now = 4_000;
    sim.frame(true, OpCode::Ping, b"");
    assert_eq!(
        sim.next_timer(),
        Some((Timer::Idle, 5_000)),
        "control frames are not messages"
    );
    sim.now = 4_500;
    sim.frame(true, OpCode::Text, b"m");
    assert_eq!(sim.next_timer(), Some((Timer::Idle, 9_500)));
    sim.wire();
    assert_eq!(sim.advance(9_500), Some(Timer::Idle));
    assert_eq!(sim.wire(), [Wire::Close(close::GOING_AWAY)]);
}

#[test]
fn token_expiry_closes_1008_and_is_counted() {
    let mut sim = Sim::open(PLAIN, false);
    sim.s.token_expiry_ms = Some(700);
    assert_eq!(sim.next_timer(), Some((Timer::TokenExpiry, 700)));
    assert_eq!(sim.advance(700), Some(Timer::TokenExpiry));
    assert_eq!(sim.wire(), [Wire::Close(close::POLICY_VIOLATION)]);
    assert_eq!(sim.counted(), [Count::Refused(PolicyRefusal::TokenExpired)]);
}

#[test]
fn slow_consumer_over_the_queue_for_the_grace_closes_1008() {
    let mut sim = Sim::open("send_queue_bytes = 1024\n", true);
    // One message larger than the cap is queued (alone), and the client does not read.
    sim.relay_send(&"0123456789".repeat(200));
    assert!(sim.s.queued_cost() > 1024);
    assert!(sim.s.over_send_queue(100, 1024), "the driver pauses it");
    assert_eq!(
        sim.next_timer(),
        Some((Timer::SlowConsumer, 100 + SLOW_CONSUMER_GRACE_MS))
    );
    // Resumed in time: the grace starts over.
    sim.s.resumed();
    assert_ne!(sim.next_timer().map(|t| t.0), Some(Timer::SlowConsumer));
    sim.s.over_send_queue(200, 1024);
    assert_eq!(
        sim.advance(200 + SLOW_CONSUMER_GRACE_MS),
        Some(Timer::SlowConsumer)
    );
    let wire = sim.wire();
    assert_eq!(wire.last().unwrap(), &Wire::Close(close::POLICY_VIOLATION));
    assert!(sim.counted().contains(&Count::SlowConsumerClosed));
}

#[test]
fn a_reply_over_the_queue_cap_closes_1008_but_one_big_message_passes() {
    let mut sim = Sim::open("send_queue_bytes = 1024\n", true);
    let big = "x".repeat(5000);
    sim.relay_send(&big);
    assert_eq!(sim.s.queued().len(), 1, "alone in the queue: sent");
    sim.relay_send("more");
    let wire = sim.wire();
    assert_eq!(wire.len(), 2);
    assert_eq!(wire[1], Wire::Close(close::POLICY_VIOLATION));
}

#[test]
fn replies_may_fill_four_queues_while_paused_but_topic_frames_one() {
    // Replies already on their way back when the driver paused the client are queued up
    // to 4 x send_queue_bytes; the one past that closes 1008 at once.
    let mut sim = Sim::open("send_queue_bytes = 1024\n", true);
    for _ in 0..3 {
        sim.relay_send(&"r".repeat(1000));
    }
    assert!(sim.s.queued_cost() > 2 * 1024, "{}", sim.s.queued_cost());
    assert!(!sim.s.close_sent(), "within the reply slack");
    sim.relay_send(&"r".repeat(1000));
    assert!(sim.s.close_sent(), "past 4 x the cap");
    assert!(sim.counted().contains(&Count::SlowConsumerClosed));

    // A topic frame gets no slack: the second one over the cap closes.
    let mut sim = Sim::open("send_queue_bytes = 1024\n", true);
    let frame = encode(OpCode::Text, &[b'x'; 900]);
    sim.with(|s, cx| s.queue_fanout(cx, frame.clone()));
    sim.with(|s, cx| s.queue_fanout(cx, frame.clone()));
    assert!(sim.s.close_sent());
}

#[test]
fn fanout_past_the_cap_is_dropped_with_drop_newest() {
    let routes =
        "send_queue_bytes = 1024\n[[routes]]\npath = \"/*\"\nslow_consumer = \"drop-newest\"\n";
    let mut sim = Sim::open(routes, true);
    let frame = encode(OpCode::Text, &[b'x'; 900]);
    sim.with(|s, cx| s.queue_fanout(cx, frame.clone()));
    sim.with(|s, cx| s.queue_fanout(cx, frame.clone()));
    assert_eq!(sim.s.queued().len(), 1);
    assert!(sim.counted().contains(&Count::SlowConsumerDropped));
    assert!(!sim.s.close_sent());
}

// ----- accounting -----

#[test]
fn footprint_follows_buffers() {
    let mut sim = Sim::open(PLAIN, true);
    let idle = sim.s.footprint();
    assert!(idle >= BASE_BYTES);
    sim.relay_send(&"y".repeat(10_000));
    assert!(sim.s.footprint() >= idle + 10_000 + ENTRY_BYTES);
    sim.wire();
    // A half-received message: the assembly buffer counts.
    let mut wire = BytesMut::new();
    write_client_frame(&mut wire, true, OpCode::Binary, [1, 2, 3, 4], &[7; 20_000]);
    sim.feed(&wire[..15_000]);
    assert!(sim.s.footprint() >= idle + 14_000, "{}", sim.s.footprint());
}

#[test]
fn subscriptions_are_bounded() {
    let mut sim = Sim::open(PLAIN, true);
    let a: Topic = "a".into();
    let b: Topic = "b".into();
    assert_eq!(sim.s.subscribe(&a, 1), Subscribed::New);
    assert_eq!(sim.s.subscribe(&a, 1), Subscribed::Already);
    assert_eq!(sim.s.subscribe(&b, 1), Subscribed::Limit);
    assert!(sim.s.unsubscribe(&a));
    assert!(!sim.s.unsubscribe(&a));
}

#[test]
fn every_refusal_label_is_distinct() {
    let labels: std::collections::HashSet<_> =
        PolicyRefusal::ALL.iter().map(|r| r.label()).collect();
    assert_eq!(labels.len(), PolicyRefusal::ALL.len());
    for (i, r) in PolicyRefusal::ALL.iter().enumerate() {
        assert_eq!(
            *r as usize, i,
            "ALL is in declaration order (stats index by it)"
        );
    }
}

// ----- the lifecycle as a whole -----

/// One step of a connection's life, for the property test below.
#[derive(Debug, Clone)]
enum Step {
    Request,
    Text,
    BadFrame,
    ClientClose,
    RelaySend,
    RelayClose(u16),
    Accept,
    Advance(u64),
    PeerClosed(bool),
    Flush,
    Drain,
    Shed,
    SendFailed,
    Panic,
}

fn rank(state: State) -> u8 {
    match state {
        State::Handshaking => 0,
        State::Authorizing => 1,
        State::Open => 2,
        State::Closing => 3,
        State::Draining => 4,
        State::Closed => 5,
    }
}

fn step() -> impl proptest::strategy::Strategy<Value = Step> {
    use proptest::prelude::*;
    prop_oneof![
        3 => Just(Step::Request),
        3 => Just(Step::Text),
        1 => Just(Step::BadFrame),
        1 => Just(Step::ClientClose),
        2 => Just(Step::RelaySend),
        1 => prop_oneof![Just(1000u16), Just(1011), Just(1005), Just(999)].prop_map(Step::RelayClose),
        1 => Just(Step::Accept),
        1 => (1u64..40_000).prop_map(Step::Advance),
        1 => any::<bool>().prop_map(Step::PeerClosed),
        3 => Just(Step::Flush),
        1 => Just(Step::Drain),
        1 => Just(Step::Shed),
        1 => Just(Step::SendFailed),
        1 => Just(Step::Panic),
    ]
}

proptest::proptest! {
    /// Whatever happens, in whatever order: the stored lifecycle only moves forward, a
    /// connection that is not closed always has a deadline (none can live forever), and a
    /// draining one whose queue is flushed is told to shut within one linger period.
    #[test]
    fn the_lifecycle_only_moves_forward_and_always_has_a_deadline(
        authorize in proptest::bool::ANY,
        relay in proptest::bool::ANY,
        steps in proptest::collection::vec(step(), 1..40),
    ) {
        let toml_text = if authorize { AUTHORIZE } else { PLAIN };
        let mut sim = Sim::new(toml_text, relay);
        let mut shut = false;
        let mut last = rank(sim.s.state());
        for step in steps {
            match step {
                Step::Request => sim.feed(REQUEST.as_bytes()),
                Step::Text => sim.frame(true, OpCode::Text, b"hi"),
                Step::BadFrame => sim.feed(&[0x8f, 0x80, 0, 0, 0, 0]),
                Step::ClientClose => sim.close_frame(1000, ""),
                Step::RelaySend => {
                    if sim.s.accepts_replies() {
                        sim.relay_send("reply")
                    }
                }
                Step::RelayClose(code) => {
                    if sim.s.accepts_replies() || sim.s.state() == State::Closing {
                        sim.relay_close(code)
                    }
                }
                Step::Accept => sim.with(|s, cx| s.on_authorization(cx, Ok(()))),
                Step::Advance(ms) => {
                    // As the driver does: fire what is due, then ask what the socket needs.
                    sim.now += ms;
                    let now = sim.now;
                    for _ in 0..8 {
                        if shut || sim.advance(now).is_none() {
                            break;
                        }
                        if sim.shutdown() == Some(Shutdown::Both) {
                            shut = true;
                        }
                    }
                }
                Step::PeerClosed(reset) => sim.with(|s, cx| s.on_peer_closed(cx, reset)),
                Step::Flush => {
                    sim.wire();
                }
                Step::Drain => {
                    sim.draining = Some(sim.now + 1_000);
                    if sim.s.begin_drain(sim.now) {
                        shut = true;
                    }
                }
                Step::Shed => {
                    if !shut {
                        sim.with(|s, cx| s.shed(cx, false))
                    }
                }
                Step::SendFailed => sim.s.on_send_failed(),
                Step::Panic => {
                    if !sim.with(|s, cx| s.on_panic(cx, false)) {
                        shut = true;
                    }
                }
            }
            if !shut {
                match sim.shutdown() {
                    Some(Shutdown::Both) => shut = true,
                    Some(Shutdown::Write) | None => {}
                }
            }
            if shut {
                sim.s.on_shut();
            }
            let now = rank(sim.s.state());
            proptest::prop_assert!(now >= last, "went back from {last} to {now} after {step:?}");
            last = now;
            if sim.s.state() != State::Closed {
                let due = sim.s.poll_timeout(&sim.config, sim.draining);
                proptest::prop_assert!(due.is_some(), "no deadline in {:?}", sim.s.state());
            }
        }
        // A draining connection, flushed, is shut within a linger period (plus a drain's).
        if sim.s.state() == State::Draining {
            sim.wire();
            let end = sim.now + sim.config.close_linger_ms + 2_000;
            while !shut && sim.now < end {
                if let Some(Shutdown::Both) = sim.shutdown() {
                    shut = true;
                    break;
                }
                let next = sim.s.poll_timeout(&sim.config, sim.draining).unwrap_or(end);
                let at = next.max(sim.now + 1).min(end);
                sim.advance(at);
            }
            proptest::prop_assert!(shut, "a flushed draining connection was never shut");
        }
    }
}

// ----- permessage-deflate, dedicated -----

#[test]
fn dedicated_contexts_are_made_on_use_charged_and_given_back() {
    use crate::protocol::deflate::takeover::{self, TakeoverDeflater, TakeoverInflater};
    let cfg = "compression = \"dedicated\"\ncompression_dedicated_per_core = 1\n";
    let offer = REQUEST.replace(
        "\r\n\r\n",
        "\r\nSec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n",
    );
    let mut sim = Sim::new(cfg, false);
    sim.feed(offer.as_bytes());
    assert_eq!(sim.wire(), [Wire::Http(101)]);
    assert_eq!((sim.codec.dedicated(), sim.codec.contexts), (1, 0));
    let idle = sim.s.footprint();

    // A compressed message in, its echo out: both contexts made, and charged.
    let (mut client, mut back) = (TakeoverDeflater::new(12, 1), TakeoverInflater::new(12));
    let msg: String = (0..40u32)
        .map(|i| format!("{{\"id\":{},\"seen\":{}}},", i * 7919 % 10007, i * 31 % 97))
        .collect();
    let mut z = Vec::new();
    let mut chunk = Vec::new();
    let mut sizes = Vec::new();
    for _ in 0..2 {
        client.compress(msg.as_bytes(), &mut z);
        let mut buf = BytesMut::new();
        write_client_frame(&mut buf, true, OpCode::Text, [1, 2, 3, 4], &z);
        buf[0] |= 0x40;
        sim.feed(&buf);
        let Wire::Frame(OpCode::Text, echoed) = &sim.wire()[0] else {
            panic!("an echo")
        };
        sizes.push(echoed.len());
        assert_eq!(
            back.inflate(&mut chunk, echoed, 1 << 20).unwrap(),
            msg.as_bytes()
        );
    }
    // Our compressor kept its window: the repeat is a fraction of the first.
    assert!(sizes[1] * 4 < sizes[0], "{sizes:?}");
    assert_eq!(sim.codec.contexts, 2);
    let charged = takeover::deflater_bytes(12) + takeover::inflater_bytes(12);
    assert_eq!(sim.s.footprint(), idle + charged);

    // The core's one place is taken: the next connection gets `shared`, counted.
    let first = std::mem::replace(
        &mut sim.s,
        Session::new(ConnId::new(0, 2, 0), None, sim.config.message_limits(), 0),
    );
    sim.feed(offer.as_bytes());
    assert_eq!(sim.wire(), [Wire::Http(101)]);
    assert!(sim.counted().contains(&Count::DedicatedFallback));
    assert!(sim.s.deflate_bits().is_some() && !sim.s.compresses_alone());

    // Shut: the contexts go, the charge with them, and the place is free again.
    let mut first = first;
    sim.codec.release(first.release_compression());
    assert_eq!((sim.codec.dedicated(), sim.codec.contexts), (0, 0));
    assert_eq!(first.footprint(), idle);
    // Releasing twice gives nothing back twice.
    sim.codec.release(first.release_compression());
    assert_eq!(sim.codec.dedicated(), 0);
}

mod access;
mod demo_page;
mod idle;
