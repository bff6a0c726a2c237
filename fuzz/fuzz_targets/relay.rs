//! Arbitrary bytes from a relay peer into the streaming Decoder, delivered in fuzzer-chosen
//! pieces: it must never panic, never hold more than one frame's limit of buffer, and every
//! frame it accepts must re-encode to the bytes it came from.
#![no_main]
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use ringway::relay::wire::{encode, encoded_len, Decoder, LEN_PREFIX};

/// Small, so that the fuzzer reaches the limit; the check is the same at 16 MiB.
const MAX_FRAME: usize = 4096;

fuzz_target!(|data: &[u8]| {
    // The first byte chooses the piece size; the rest is the stream.
    let (step, stream) = match data {
        [s, rest @ ..] => (*s as usize + 1, rest),
        _ => return,
    };
    let mut dec = Decoder::new(MAX_FRAME);
    let mut buf = BytesMut::new();
    let mut consumed = 0;
    for piece in stream.chunks(step) {
        buf.extend_from_slice(piece);
        loop {
            let before = buf.len();
            match dec.decode(&mut buf) {
                Ok(Some(frame)) => {
                    let len = before - buf.len();
                    assert!(len <= LEN_PREFIX + MAX_FRAME);
                    assert_eq!(encoded_len(&frame), len);
                    let mut again = BytesMut::new();
                    encode(&frame, &mut again);
                    assert_eq!(&again[..], &stream[consumed..consumed + len]);
                    consumed += len;
                }
                Ok(None) => break,
                // The link is dropped after an error; nothing more is decoded.
                Err(_) => return,
            }
        }
        // A partial frame is held, with room reserved for at most its declared length
        // (which was checked against the limit); growth may at most double that.
        assert!(buf.capacity() <= 2 * (LEN_PREFIX + MAX_FRAME + step));
    }
});
