//! Message payloads that check themselves: each carries its sequence number as hex digits
//! up front and a fixed per-connection body after it, so a reply is verified byte for byte
//! against what was sent without keeping a copy of every message in flight.

use thiserror::Error;

/// At most this many hex digits of the sequence number (all of a u64).
const MAX_DIGITS: usize = 16;

/// Why a reply is not the message it should echo.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Mismatch {
    #[error("expected a {expected} message, got {got}")]
    Kind {
        expected: &'static str,
        got: &'static str,
    },
    #[error("expected {expected} bytes, got {got}")]
    Length { expected: usize, got: usize },
    #[error("expected sequence {expected:#x}, got {got:?}")]
    Sequence { expected: u64, got: String },
    #[error("body differs from byte {offset} on")]
    Body { offset: usize },
}

/// One connection's payload: the send buffer is reused, only its sequence digits change.
#[derive(Debug, Clone)]
pub struct PayloadGen {
    buf: Vec<u8>,
    digits: usize,
    binary: bool,
}

impl PayloadGen {
    /// `seed` makes each connection's body differ, so a reply routed to the wrong
    /// connection is caught too. Text bodies are ASCII letters (valid UTF-8 by construction);
    /// binary bodies use every byte value.
    pub fn new(size: usize, binary: bool, seed: u64) -> Self {
        let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let buf = (0..size)
            .map(|_| {
                let r = xorshift(&mut rng);
                if binary {
                    (r >> 32) as u8
                } else {
                    b'a' + ((r >> 32) % 26) as u8
                }
            })
            .collect();
        PayloadGen {
            buf,
            digits: size.min(MAX_DIGITS),
            binary,
        }
    }

    pub fn is_binary(&self) -> bool {
        self.binary
    }

    /// The payload of message `seq` (only the low `min(size, 16)` hex digits are carried, so
    /// tiny payloads wrap; replies are still checked in order).
    pub fn with_seq(&mut self, seq: u64) -> &[u8] {
        write_digits(&mut self.buf[..self.digits], seq);
        &self.buf
    }

    /// Check a reply against message `seq`.
    pub fn check(&self, seq: u64, binary: bool, got: &[u8]) -> Result<(), Mismatch> {
        if binary != self.binary {
            return Err(Mismatch::Kind {
                expected: kind_name(self.binary),
                got: kind_name(binary),
            });
        }
        if got.len() != self.buf.len() {
            return Err(Mismatch::Length {
                expected: self.buf.len(),
                got: got.len(),
            });
        }
        let mut want = [0u8; MAX_DIGITS];
        write_digits(&mut want[..self.digits], seq);
        if got[..self.digits] != want[..self.digits] {
            return Err(Mismatch::Sequence {
                expected: seq,
                got: String::from_utf8_lossy(&got[..self.digits]).into_owned(),
            });
        }
        let body = &self.buf[self.digits..];
        if got[self.digits..] != *body {
            let offset = self.digits
                + body
                    .iter()
                    .zip(&got[self.digits..])
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
            return Err(Mismatch::Body { offset });
        }
        Ok(())
    }
}

fn kind_name(binary: bool) -> &'static str {
    if binary {
        "binary"
    } else {
        "text"
    }
}

/// Low nibbles of `seq` as lowercase hex, most significant first.
fn write_digits(out: &mut [u8], seq: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let n = out.len();
    for (i, d) in out.iter_mut().enumerate() {
        let shift = 4 * (n - 1 - i);
        *d = HEX[((seq >> shift) & 0xF) as usize];
    }
}

/// xorshift64: cheap randomness for masks, keys and bodies (no cryptographic need here).
pub fn xorshift(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_payload_is_ascii_and_carries_the_sequence() {
        let mut g = PayloadGen::new(32, false, 7);
        let p = g.with_seq(0x1234).to_vec();
        assert_eq!(p.len(), 32);
        assert!(p.is_ascii());
        assert_eq!(&p[..16], b"0000000000001234");
        assert_eq!(g.check(0x1234, false, &p), Ok(()));
    }

    #[test]
    fn corrupted_body_byte_is_detected_at_its_offset() {
        let mut g = PayloadGen::new(1024, true, 3);
        let mut p = g.with_seq(99).to_vec();
        p[700] ^= 0x01;
        assert_eq!(g.check(99, true, &p), Err(Mismatch::Body { offset: 700 }));
    }

    #[test]
    fn reply_to_another_message_is_detected() {
        let mut g = PayloadGen::new(16, false, 3);
        let p = g.with_seq(5).to_vec();
        assert!(matches!(
            g.check(6, false, &p),
            Err(Mismatch::Sequence { expected: 6, .. })
        ));
    }

    #[test]
    fn reply_from_another_connection_is_detected() {
        let mut a = PayloadGen::new(64, false, 1);
        let b = PayloadGen::new(64, false, 2);
        let p = a.with_seq(1).to_vec();
        assert!(matches!(b.check(1, false, &p), Err(Mismatch::Body { .. })));
    }

    #[test]
    fn truncated_and_wrong_kind_replies_are_detected() {
        let mut g = PayloadGen::new(64, false, 1);
        let p = g.with_seq(1).to_vec();
        assert_eq!(
            g.check(1, false, &p[..63]),
            Err(Mismatch::Length {
                expected: 64,
                got: 63
            })
        );
        assert!(matches!(g.check(1, true, &p), Err(Mismatch::Kind { .. })));
    }

    #[test]
    fn tiny_payloads_carry_the_low_digits() {
        let mut g = PayloadGen::new(2, false, 1);
        assert_eq!(g.with_seq(0x1ab), b"ab");
        let p = g.with_seq(0x1ab).to_vec();
        assert_eq!(g.check(0x2ab, false, &p), Ok(()));
        assert!(g.check(0x1ac, false, &p).is_err());
    }
}
