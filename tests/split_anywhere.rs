//! The decoder's answer must not depend on how the kernel happened to split the byte stream
//! (RFC 6455 §5.2 framing over a TCP byte stream): every cut, byte-at-a-time delivery and
//! random multi-cuts give the same events, and the same error, as the whole stream at once.

use bytes::BytesMut;
use proptest::prelude::*;
use ringway::protocol::frame::{close_payload, write_client_frame, OpCode, Role};
use ringway::protocol::message::{Event, Limits, MessageDecoder, MessageKind};
use ringway::protocol::ProtocolError;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Ev {
    Msg(MessageKind, Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<(u16, String)>),
}

fn own(ev: Event<'_>) -> Ev {
    match ev {
        Event::Message { kind, payload } => Ev::Msg(kind, payload.as_slice().to_vec()),
        Event::Ping(p) => Ev::Ping(p.to_vec()),
        Event::Pong(p) => Ev::Pong(p.to_vec()),
        Event::Compressed { .. } => panic!("RSV1 is not allowed here: no compressed events"),
        Event::Close(c) => Ev::Close(c.map(|(code, r)| (code, r.to_string()))),
    }
}

/// What decoding produced: the events, and the error with the index of the piece that
/// raised it.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    events: Vec<Ev>,
    error: Option<(usize, ProtocolError)>,
}

const LIMITS: Limits = Limits {
    max_frame: 1 << 20,
    max_message: 1 << 20,
    max_fragments: 0,
};

fn decode_pieces(pieces: &[&[u8]], limits: Limits) -> Outcome {
    let mut dec = MessageDecoder::new(Role::Server, limits);
    let mut events = Vec::new();
    for (i, piece) in pieces.iter().enumerate() {
        let mut buf = piece.to_vec();
        let mut off = 0;
        loop {
            match dec.decode(&mut buf[off..]) {
                Ok((n, Some(ev))) => {
                    off += n;
                    events.push(own(ev));
                }
                Ok((n, None)) => {
                    assert_eq!(off + n, buf.len(), "None must consume the whole input");
                    break;
                }
                Err(e) => {
                    return Outcome {
                        events,
                        error: Some((i, e)),
                    }
                }
            }
        }
    }
    Outcome {
        events,
        error: None,
    }
}

fn cut_at(stream: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut cuts = cuts.to_vec();
    cuts.sort_unstable();
    let mut out = Vec::new();
    let mut prev = 0;
    for c in cuts.into_iter().chain([stream.len()]) {
        out.push(stream[prev..c].to_vec());
        prev = c;
    }
    out
}

fn decode_cuts(stream: &[u8], cuts: &[usize], limits: Limits) -> Outcome {
    let pieces = cut_at(stream, cuts);
    let refs: Vec<&[u8]> = pieces.iter().map(|p| &p[..]).collect();
    decode_pieces(&refs, limits)
}

struct Stream {
    bytes: Vec<u8>,
    mask: u32,
}

impl Stream {
    fn new() -> Self {
        Stream {
            bytes: Vec::new(),
            mask: 0x1234_5678,
        }
    }
    fn frame(&mut self, fin: bool, op: OpCode, payload: &[u8]) -> &mut Self {
        let mut b = BytesMut::new();
        // A different mask for each frame, as a real client would.
        self.mask = self.mask.wrapping_mul(0x9E37_79B9).wrapping_add(1);
        write_client_frame(&mut b, fin, op, self.mask.to_be_bytes(), payload);
        self.bytes.extend_from_slice(&b);
        self
    }
}

/// Text with multi-byte UTF-8 across fragment boundaries, binary with 7- and 16-bit lengths,
/// fragmented messages with interleaved control frames, empty frames, and a close.
fn rich_stream() -> (Vec<u8>, Vec<Ev>) {
    let mut s = Stream::new();
    let mut want = Vec::new();
    s.frame(true, OpCode::Text, "Hello, wörld 😀".as_bytes());
    want.push(Ev::Msg(MessageKind::Text, "Hello, wörld 😀".into()));

    let bin: Vec<u8> = (0..300u32).map(|i| (i * 31 + 7) as u8).collect();
    s.frame(true, OpCode::Binary, &bin);
    want.push(Ev::Msg(MessageKind::Binary, bin.clone()));

    // "κόσμε 😀 €" cut inside the 2-byte, the 4-byte and the 3-byte characters, with
    // control frames and an empty fragment in between.
    let t = "κόσμε 😀 €".as_bytes();
    s.frame(false, OpCode::Text, &t[..1]);
    s.frame(true, OpCode::Ping, b"ping-1");
    s.frame(false, OpCode::Continuation, &t[1..13]);
    s.frame(false, OpCode::Continuation, &t[13..15]);
    s.frame(true, OpCode::Pong, b"");
    s.frame(false, OpCode::Continuation, b"");
    s.frame(false, OpCode::Continuation, &t[15..18]);
    s.frame(true, OpCode::Continuation, &t[18..]);
    want.push(Ev::Ping(b"ping-1".to_vec()));
    want.push(Ev::Pong(vec![]));
    want.push(Ev::Msg(MessageKind::Text, t.to_vec()));

    // Fragmented binary with a 16-bit-length fragment and a 125-byte ping in the middle.
    let big: Vec<u8> = (0..700u32).map(|i| (i % 251) as u8).collect();
    s.frame(false, OpCode::Binary, &big[..10]);
    s.frame(true, OpCode::Ping, &[0xAB; 125]);
    s.frame(true, OpCode::Continuation, &big[10..]);
    want.push(Ev::Ping(vec![0xAB; 125]));
    want.push(Ev::Msg(MessageKind::Binary, big));

    s.frame(true, OpCode::Text, b"");
    want.push(Ev::Msg(MessageKind::Text, vec![]));
    let (p, n) = close_payload(1000, "bye ✓");
    s.frame(true, OpCode::Close, &p[..n]);
    want.push(Ev::Close(Some((1000, "bye ✓".into()))));
    (s.bytes, want)
}

#[test]
fn whole_stream_decodes_to_the_expected_events() {
    let (stream, want) = rich_stream();
    assert_eq!(
        decode_cuts(&stream, &[], LIMITS),
        Outcome {
            events: want,
            error: None
        }
    );
}

#[test]
fn every_single_cut_gives_the_same_events() {
    let (stream, want) = rich_stream();
    for cut in 0..=stream.len() {
        let got = decode_cuts(&stream, &[cut], LIMITS);
        assert_eq!(
            got,
            Outcome {
                events: want.clone(),
                error: None
            },
            "cut at {cut}"
        );
    }
}

#[test]
fn byte_at_a_time_gives_the_same_events() {
    let (stream, want) = rich_stream();
    let pieces: Vec<&[u8]> = stream.chunks(1).collect();
    assert_eq!(
        decode_pieces(&pieces, LIMITS),
        Outcome {
            events: want,
            error: None
        }
    );
}

#[test]
fn sixty_four_bit_length_split_anywhere_in_its_header() {
    let body: Vec<u8> = (0..70_000u32).map(|i| (i * 13) as u8).collect();
    let mut s = Stream::new();
    s.frame(true, OpCode::Binary, &body);
    s.frame(true, OpCode::Ping, b"after");
    let want = vec![
        Ev::Msg(MessageKind::Binary, body),
        Ev::Ping(b"after".to_vec()),
    ];
    // Every cut inside the 14-byte header, a few in the payload, all in the trailing ping.
    let n = s.bytes.len();
    for cut in (0..=16).chain([1000, 35_001, 70_013]).chain(n - 12..=n) {
        let got = decode_cuts(&s.bytes, &[cut], LIMITS);
        assert_eq!(
            got,
            Outcome {
                events: want.clone(),
                error: None
            },
            "cut at {cut}"
        );
    }
}

/// A stream that breaks a rule after some valid frames.
struct Bad {
    name: &'static str,
    bytes: Vec<u8>,
    /// Length of the prefix that proves the violation: the decoder must fail on the piece
    /// that holds byte `decides - 1`.
    decides: usize,
    /// The events of the valid frames before the violation.
    events: Vec<Ev>,
    error: ProtocolError,
    limits: Limits,
}

fn bad(
    name: &'static str,
    bytes: Vec<u8>,
    decides: usize,
    events: Vec<Ev>,
    error: ProtocolError,
) -> Bad {
    Bad {
        name,
        bytes,
        decides,
        events,
        error,
        limits: LIMITS,
    }
}

fn bad_streams() -> Vec<Bad> {
    let mut out = Vec::new();
    let prelude = |s: &mut Stream| {
        s.frame(true, OpCode::Text, "ok ✓".as_bytes());
        s.frame(true, OpCode::Ping, b"p");
    };
    let prelude_events = vec![
        Ev::Msg(MessageKind::Text, "ok ✓".into()),
        Ev::Ping(b"p".to_vec()),
    ];

    // Invalid byte in the middle of the second fragment's payload, a ping in between.
    let mut s = Stream::new();
    prelude(&mut s);
    s.frame(false, OpCode::Text, "ab€".as_bytes());
    s.frame(true, OpCode::Ping, b"q");
    let mut second = "cd".as_bytes().to_vec();
    second.push(0xFF);
    second.extend_from_slice(&[b'z'; 40]);
    let start = s.bytes.len();
    s.frame(true, OpCode::Continuation, &second);
    let decides = start + 6 + 3;
    let mut ev = prelude_events.clone();
    ev.push(Ev::Ping(b"q".to_vec()));
    out.push(bad(
        "0xFF mid-fragment",
        s.bytes,
        decides,
        ev,
        ProtocolError::InvalidUtf8,
    ));

    // A code point cut by a fragment boundary whose continuation is wrong: E2 82 | 41.
    let mut s = Stream::new();
    prelude(&mut s);
    s.frame(false, OpCode::Text, b"x\xe2\x82");
    let start = s.bytes.len();
    s.frame(true, OpCode::Continuation, b"Ayyyy");
    let decides = start + 6 + 1;
    out.push(bad(
        "bad continuation across fragments",
        s.bytes,
        decides,
        prelude_events.clone(),
        ProtocolError::InvalidUtf8,
    ));

    // Surrogate (ED A0 80) inside one unfragmented frame.
    let mut s = Stream::new();
    prelude(&mut s);
    let start = s.bytes.len();
    s.frame(true, OpCode::Text, b"hello\xed\xa0\x80world");
    let decides = start + 6 + 7;
    out.push(bad(
        "surrogate",
        s.bytes,
        decides,
        prelude_events.clone(),
        ProtocolError::InvalidUtf8,
    ));

    // Message ends inside a code point: only the last byte decides.
    let mut s = Stream::new();
    prelude(&mut s);
    s.frame(true, OpCode::Text, b"abc\xf0\x9f\x98");
    let decides = s.bytes.len();
    out.push(bad(
        "truncated code point",
        s.bytes,
        decides,
        prelude_events.clone(),
        ProtocolError::InvalidUtf8,
    ));

    // Reserved opcode: its first byte decides.
    let mut s = Stream::new();
    prelude(&mut s);
    let start = s.bytes.len();
    s.frame(true, OpCode::Binary, b"zzz");
    s.bytes[start] = 0x83;
    out.push(bad(
        "reserved opcode",
        s.bytes,
        start + 1,
        prelude_events.clone(),
        ProtocolError::UnknownOpcode(3),
    ));

    // Ping with a 16-bit length: the second byte decides.
    let mut s = Stream::new();
    prelude(&mut s);
    let start = s.bytes.len();
    s.bytes
        .extend_from_slice(&[0x89, 0xFE, 0x00, 0x7E, 1, 2, 3, 4]);
    out.push(bad(
        "long ping",
        s.bytes,
        start + 2,
        prelude_events.clone(),
        ProtocolError::ControlFrameTooLong(126),
    ));

    // One-byte close payload.
    let mut s = Stream::new();
    prelude(&mut s);
    s.frame(true, OpCode::Close, &[0x03]);
    let decides = s.bytes.len();
    out.push(bad(
        "1-byte close",
        s.bytes,
        decides,
        prelude_events.clone(),
        ProtocolError::InvalidClosePayload,
    ));

    // A 2-fragment message over the limit: the second header decides, before its payload.
    let mut s = Stream::new();
    prelude(&mut s);
    s.frame(false, OpCode::Binary, &[1; 100]);
    let start = s.bytes.len();
    s.frame(true, OpCode::Continuation, &[2; 100]);
    let err = ProtocolError::MessageTooLarge {
        len: 200,
        limit: 150,
    };
    // Judged from the whole header (mask key included), still before any of its payload.
    let mut b = bad("message too large", s.bytes, start + 6, prelude_events, err);
    b.limits = Limits {
        max_frame: 1000,
        max_message: 150,
        max_fragments: 0,
    };
    out.push(b);
    out
}

#[test]
fn errors_are_the_same_at_every_cut_and_fail_fast() {
    for Bad {
        name,
        bytes: stream,
        decides,
        events,
        error: err,
        limits,
    } in bad_streams()
    {
        let whole = decode_cuts(&stream, &[], limits);
        assert_eq!(
            whole,
            Outcome {
                events: events.clone(),
                error: Some((0, err.clone()))
            },
            "{name}"
        );
        for cut in 0..=stream.len() {
            let got = decode_cuts(&stream, &[cut], limits);
            // The first piece holds the deciding byte exactly when cut >= decides.
            let piece = if cut >= decides { 0 } else { 1 };
            assert_eq!(
                got.error,
                Some((piece, err.clone())),
                "{name}: cut at {cut}"
            );
            // Every event before the bad frame is still delivered, in order, nothing more.
            assert_eq!(got.events, events, "{name}: cut at {cut}");
        }
        // Byte by byte: the error comes with the deciding byte itself.
        let pieces: Vec<&[u8]> = stream.chunks(1).collect();
        let got = decode_pieces(&pieces, limits);
        assert_eq!(
            got,
            Outcome {
                events,
                error: Some((decides - 1, err))
            },
            "{name}: byte at a time"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_cuts_give_the_same_events(cuts in prop::collection::vec(any::<prop::sample::Index>(), 1..=2)) {
        let (stream, want) = rich_stream();
        let cuts: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
        prop_assert_eq!(decode_cuts(&stream, &cuts, LIMITS), Outcome { events: want, error: None });
    }

    #[test]
    fn random_cuts_give_the_same_error(which in 0usize..8, cuts in prop::collection::vec(any::<prop::sample::Index>(), 1..=2)) {
        let bad = bad_streams();
        let b = &bad[which % bad.len()];
        let cuts: Vec<usize> = cuts.iter().map(|i| i.index(b.bytes.len() + 1)).collect();
        let got = decode_cuts(&b.bytes, &cuts, b.limits);
        // The failing piece is the one that holds the deciding byte.
        let mut sorted = cuts.clone();
        sorted.sort_unstable();
        let piece = sorted.iter().filter(|&&c| c < b.decides).count();
        prop_assert_eq!(got.error, Some((piece, b.error.clone())), "{}", b.name);
        prop_assert_eq!(&got.events, &b.events);
    }
}
