//! Arbitrary bytes into the server-side MessageDecoder, split at fuzzer-chosen points: it
//! must never panic, never hand out more than the limits allow, and never hold more heap
//! than a message may need.
#![no_main]
use libfuzzer_sys::fuzz_target;
use ringway::protocol::frame::{Role, MAX_CONTROL_PAYLOAD};
use ringway::protocol::message::{Event, Limits, MessageDecoder};

fuzz_target!(|data: &[u8]| {
    // The first two bytes choose two cut points; the rest is the stream.
    let (cuts, stream) = match data {
        [a, b, rest @ ..] => ([*a as usize, *b as usize], rest),
        _ => return,
    };
    let limits = Limits {
        max_fragments: 8,
        ..Limits::default()
    };
    let mut c1 = cuts[0].min(stream.len());
    let mut c2 = (c1 + cuts[1]).min(stream.len());
    if c1 > c2 {
        std::mem::swap(&mut c1, &mut c2);
    }
    let mut dec = MessageDecoder::new(Role::Server, limits);
    for piece in [&stream[..c1], &stream[c1..c2], &stream[c2..]] {
        let mut buf = piece.to_vec();
        let len = buf.len();
        let mut off = 0;
        loop {
            let (n, ev) = match dec.decode(&mut buf[off..]) {
                Ok(r) => r,
                // After an error the connection is closed; the decoder is not used again.
                Err(e) => {
                    assert!(matches!(e.close_code(), 1002 | 1007 | 1008 | 1009));
                    return;
                }
            };
            assert!(n <= len - off);
            off += n;
            match ev {
                None => {
                    assert_eq!(off, len);
                    break;
                }
                Some(Event::Message { kind, payload }) => {
                    assert!(payload.as_slice().len() as u64 <= limits.max_message);
                    if kind == ringway::protocol::message::MessageKind::Text {
                        assert!(std::str::from_utf8(payload.as_slice()).is_ok());
                    }
                }
                Some(Event::Ping(p)) | Some(Event::Pong(p)) => {
                    assert!(p.len() <= MAX_CONTROL_PAYLOAD)
                }
                Some(Event::Close(Some((code, reason)))) => {
                    assert!(ringway::protocol::close::is_valid_wire_code(code));
                    assert!(reason.len() <= MAX_CONTROL_PAYLOAD - 2);
                }
                Some(Event::Close(None)) => {}
                // RSV1 is never allowed here (no extension negotiated): must not happen.
                Some(Event::Compressed { .. }) => panic!("compressed event without RSV1 allowed"),
            }
            assert!(dec.heap_bytes() as u64 <= 2 * limits.max_message);
        }
    }
});
