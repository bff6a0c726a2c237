//! Frame headers (RFC 6455 §5.2): decoding what peers send and encoding what we send.
//!
//! First step of the receive path: `message::MessageDecoder` calls [`decode_header`] on the
//! bytes the kernel delivered, so every rule that can be judged from the header alone (RSV
//! bits, opcodes, control frame rules, masking, size limits) fails here, before any payload
//! is touched or any memory is reserved for it.
//!
//! Non-minimal length encodings (e.g. 5 bytes sent as `126, 0, 5`): §5.2 says "the minimal
//! number of bytes MUST be used" but that is a rule for the sender and no failure is
//! prescribed for the receiver; such a frame is unambiguous and harmless, Autobahn does not
//! test it, and common implementations accept it. We accept it too (see the
//! `non_minimal_lengths_are_accepted` test). Our own encoder always uses the minimal form.

use super::mask;
use super::ProtocolError;
use bytes::{BufMut, BytesMut};

/// The longest frame header: 2 bytes + 8 bytes of extended length + 4 bytes of mask key.
pub const MAX_HEADER_LEN: usize = 14;

/// Longest control frame payload (RFC 6455 §5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// Longest close reason: the control payload minus the 2-byte status code (§5.5.1).
pub const MAX_CLOSE_REASON: usize = MAX_CONTROL_PAYLOAD - 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum OpCode {
    Continuation = 0x0,
    Text = 0x1,
    Binary = 0x2,
    Close = 0x8,
    Ping = 0x9,
    Pong = 0xA,
}

impl OpCode {
    /// None for the reserved opcodes 0x3-0x7 and 0xB-0xF.
    pub fn from_u8(v: u8) -> Option<OpCode> {
        match v {
            0x0 => Some(OpCode::Continuation),
            0x1 => Some(OpCode::Text),
            0x2 => Some(OpCode::Binary),
            0x8 => Some(OpCode::Close),
            0x9 => Some(OpCode::Ping),
            0xA => Some(OpCode::Pong),
            _ => None,
        }
    }
    pub fn is_control(self) -> bool {
        (self as u8) & 0x8 != 0
    }
}

/// Which side of the connection is decoding: a server requires masked frames (§5.1), a
/// client requires unmasked ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Server,
    Client,
}

/// What the decoder enforces on every header.
#[derive(Debug, Clone, Copy)]
pub struct HeaderRules {
    pub role: Role,
    /// Largest payload of one frame; larger is `FrameTooLarge` (1009) before any allocation.
    pub max_frame: u64,
    /// RSV bits (as the 3-bit value RSV1<<2|RSV2<<1|RSV3) that a negotiated extension allows;
    /// 0 until an extension is accepted.
    pub allowed_rsv: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub fin: bool,
    /// RSV1<<2 | RSV2<<1 | RSV3.
    pub rsv: u8,
    pub opcode: OpCode,
    pub mask: Option<[u8; 4]>,
    pub payload_len: u64,
    /// Bytes the header took on the wire (2..=14).
    pub header_len: usize,
}

/// Decode one frame header from the start of `buf`. `Ok(None)`: not enough bytes yet.
///
/// A violation is reported as soon as the bytes that prove it are present, so the answer
/// never depends on how the stream was split: from byte 0 the RSV bits, the opcode and FIN
/// on a control frame; from byte 1 the control frame length (a 7-bit code of 126/127 is
/// reported as `ControlFrameTooLong(126 | 127)` without waiting for the extended length)
/// and masking per role (§5.1); from byte 2 the MSB of a 64-bit length; once the length is
/// complete, `max_frame` (before the mask key has even arrived).
#[inline]
pub fn decode_header(
    buf: &[u8],
    rules: &HeaderRules,
) -> Result<Option<FrameHeader>, ProtocolError> {
    let Some(&b0) = buf.first() else {
        return Ok(None);
    };
    let fin = b0 & 0x80 != 0;
    let rsv = (b0 >> 4) & 0x7;
    if rsv & !rules.allowed_rsv != 0 {
        return Err(ProtocolError::ReservedBits(rsv));
    }
    let op = b0 & 0x0F;
    let opcode = OpCode::from_u8(op).ok_or(ProtocolError::UnknownOpcode(op))?;
    // RFC 6455 §5.5: control frames MUST NOT be fragmented.
    if opcode.is_control() && !fin {
        return Err(ProtocolError::FragmentedControlFrame);
    }

    let Some(&b1) = buf.get(1) else {
        return Ok(None);
    };
    let masked = b1 & 0x80 != 0;
    let len7 = b1 & 0x7F;
    // RFC 6455 §5.5: control frames MUST have a payload length of 125 bytes or less.
    if opcode.is_control() && len7 as usize > MAX_CONTROL_PAYLOAD {
        return Err(ProtocolError::ControlFrameTooLong(len7 as u64));
    }
    // RFC 6455 §5.1: a server MUST close on an unmasked frame, a client on a masked one.
    match (rules.role, masked) {
        (Role::Server, false) => return Err(ProtocolError::UnmaskedFrame),
        (Role::Client, true) => return Err(ProtocolError::MaskedFrame),
        _ => {}
    }

    let (payload_len, ext_len) = match len7 {
        126 => {
            let Some(b) = buf.get(2..4) else {
                return Ok(None);
            };
            (u16::from_be_bytes([b[0], b[1]]) as u64, 2)
        }
        127 => {
            // RFC 6455 §5.2: the most significant bit of a 64-bit length MUST be 0.
            match buf.get(2) {
                None => return Ok(None),
                Some(b) if b & 0x80 != 0 => return Err(ProtocolError::InvalidLength),
                Some(_) => {}
            }
            let Some(b) = buf.get(2..10) else {
                return Ok(None);
            };
            let mut n = [0u8; 8];
            n.copy_from_slice(b);
            (u64::from_be_bytes(n), 8)
        }
        n => (n as u64, 0),
    };
    if payload_len > rules.max_frame {
        return Err(ProtocolError::FrameTooLarge {
            len: payload_len,
            limit: rules.max_frame,
        });
    }

    let mask_at = 2 + ext_len;
    let (mask, header_len) = if masked {
        let Some(m) = buf.get(mask_at..mask_at + 4) else {
            return Ok(None);
        };
        (Some([m[0], m[1], m[2], m[3]]), mask_at + 4)
    } else {
        (None, mask_at)
    };
    Ok(Some(FrameHeader {
        fin,
        rsv,
        opcode,
        mask,
        payload_len,
        header_len,
    }))
}

/// Write a header into `out`, returning its length. `mask` is Some for client frames.
/// Always the minimal length encoding (§5.2); RSV bits are 0.
pub fn encode_header(
    out: &mut [u8; MAX_HEADER_LEN],
    fin: bool,
    opcode: OpCode,
    mask: Option<[u8; 4]>,
    payload_len: u64,
) -> usize {
    out[0] = ((fin as u8) << 7) | opcode as u8;
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    let mut n = if payload_len <= 125 {
        out[1] = mask_bit | payload_len as u8;
        2
    } else if payload_len <= u16::MAX as u64 {
        out[1] = mask_bit | 126;
        out[2..4].copy_from_slice(&(payload_len as u16).to_be_bytes());
        4
    } else {
        out[1] = mask_bit | 127;
        out[2..10].copy_from_slice(&payload_len.to_be_bytes());
        10
    };
    if let Some(m) = mask {
        out[n..n + 4].copy_from_slice(&m);
        n += 4;
    }
    n
}

/// Append an unmasked (server) frame with `payload` to `dst`.
pub fn write_server_frame(dst: &mut BytesMut, fin: bool, opcode: OpCode, payload: &[u8]) {
    let mut h = [0u8; MAX_HEADER_LEN];
    let n = encode_header(&mut h, fin, opcode, None, payload.len() as u64);
    dst.reserve(n + payload.len());
    dst.put_slice(&h[..n]);
    dst.put_slice(payload);
}

/// Append a masked (client) frame with `payload` to `dst`, masking it with `mask`.
pub fn write_client_frame(
    dst: &mut BytesMut,
    fin: bool,
    opcode: OpCode,
    mask: [u8; 4],
    payload: &[u8],
) {
    let mut h = [0u8; MAX_HEADER_LEN];
    let n = encode_header(&mut h, fin, opcode, Some(mask), payload.len() as u64);
    dst.reserve(n + payload.len());
    dst.put_slice(&h[..n]);
    let start = dst.len();
    dst.put_slice(payload);
    // Masking is the same XOR as unmasking (§5.3).
    mask::unmask(&mut dst[start..], mask, 0);
}

/// The payload of a close frame: the code in network order, then the UTF-8 reason, cut to
/// fit the 125-byte control frame limit on a character boundary.
pub fn close_payload(code: u16, reason: &str) -> ([u8; MAX_CONTROL_PAYLOAD], usize) {
    let mut out = [0u8; MAX_CONTROL_PAYLOAD];
    out[..2].copy_from_slice(&code.to_be_bytes());
    let mut n = reason.len().min(MAX_CLOSE_REASON);
    // A cut inside a code point would make the reason invalid UTF-8 (1007 at the peer).
    while !reason.is_char_boundary(n) {
        n -= 1;
    }
    out[2..2 + n].copy_from_slice(&reason.as_bytes()[..n]);
    (out, 2 + n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::close;

    const SERVER: HeaderRules = HeaderRules {
        role: Role::Server,
        max_frame: 1 << 20,
        allowed_rsv: 0,
    };
    const CLIENT: HeaderRules = HeaderRules {
        role: Role::Client,
        max_frame: 1 << 20,
        allowed_rsv: 0,
    };

    fn err(buf: &[u8], rules: &HeaderRules) -> ProtocolError {
        decode_header(buf, rules).expect_err("header must be rejected")
    }

    #[test]
    fn opcodes_known_and_reserved() {
        for (v, op) in [
            (0x0, OpCode::Continuation),
            (0x1, OpCode::Text),
            (0x2, OpCode::Binary),
            (0x8, OpCode::Close),
            (0x9, OpCode::Ping),
            (0xA, OpCode::Pong),
        ] {
            assert_eq!(OpCode::from_u8(v), Some(op));
            assert_eq!(op as u8, v);
        }
        // RFC 6455 §5.2: %x3-7 and %xB-F are reserved.
        for v in (0x3..=0x7).chain(0xB..=0xF).chain([0x10, 0xFF]) {
            assert_eq!(OpCode::from_u8(v), None, "{v:#x}");
        }
        assert!(OpCode::Ping.is_control() && !OpCode::Text.is_control());
    }

    #[test]
    fn rfc_5_7_unmasked_hello_as_client() {
        let buf = [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f];
        let h = decode_header(&buf, &CLIENT).unwrap().unwrap();
        assert_eq!(
            h,
            FrameHeader {
                fin: true,
                rsv: 0,
                opcode: OpCode::Text,
                mask: None,
                payload_len: 5,
                header_len: 2
            }
        );
    }

    #[test]
    fn rfc_5_7_masked_hello_as_server() {
        let buf = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        let h = decode_header(&buf, &SERVER).unwrap().unwrap();
        assert_eq!(h.mask, Some([0x37, 0xfa, 0x21, 0x3d]));
        assert_eq!(
            (h.opcode, h.fin, h.payload_len, h.header_len),
            (OpCode::Text, true, 5, 6)
        );
        // Every strict prefix of the header asks for more bytes.
        for n in 0..6 {
            assert_eq!(decode_header(&buf[..n], &SERVER), Ok(None), "prefix {n}");
        }
    }

    #[test]
    fn rfc_5_7_extended_lengths() {
        // 256 bytes binary: 0x82 0x7E 0x0100.
        let h = decode_header(&[0x82, 0x7E, 0x01, 0x00], &CLIENT)
            .unwrap()
            .unwrap();
        assert_eq!(
            (h.opcode, h.payload_len, h.header_len),
            (OpCode::Binary, 256, 4)
        );
        assert_eq!(decode_header(&[0x82, 0x7E, 0x01], &CLIENT), Ok(None));
        // 64 KiB binary: 0x82 0x7F 0x0000000000010000.
        let buf = [0x82, 0x7F, 0, 0, 0, 0, 0, 0x01, 0x00, 0x00];
        let h = decode_header(&buf, &CLIENT).unwrap().unwrap();
        assert_eq!((h.payload_len, h.header_len), (65536, 10));
        assert_eq!(decode_header(&buf[..9], &CLIENT), Ok(None));
        // Same with a mask key: the header grows by 4.
        let buf = [0x82, 0xFF, 0, 0, 0, 0, 0, 0x01, 0x00, 0x00, 1, 2, 3, 4];
        let h = decode_header(&buf, &SERVER).unwrap().unwrap();
        assert_eq!(
            (h.payload_len, h.header_len, h.mask),
            (65536, 14, Some([1, 2, 3, 4]))
        );
    }

    #[test]
    fn non_minimal_lengths_are_accepted() {
        // 5 bytes encoded as 16-bit and as 64-bit lengths: lenient (see the module comment).
        let h = decode_header(&[0x81, 0x7E, 0x00, 0x05], &CLIENT)
            .unwrap()
            .unwrap();
        assert_eq!((h.payload_len, h.header_len), (5, 4));
        let h = decode_header(&[0x81, 0x7F, 0, 0, 0, 0, 0, 0, 0, 5], &CLIENT)
            .unwrap()
            .unwrap();
        assert_eq!((h.payload_len, h.header_len), (5, 10));
    }

    #[test]
    fn reserved_bits_rejected_unless_negotiated() {
        for (b0, rsv) in [(0xC1, 0b100), (0xA1, 0b010), (0x91, 0b001), (0xF1, 0b111)] {
            let e = err(&[b0], &SERVER);
            assert_eq!(e, ProtocolError::ReservedBits(rsv));
            assert_eq!(e.close_code(), close::PROTOCOL_ERROR);
        }
        // With RSV1 allowed (e.g. permessage-deflate), RSV1 passes and RSV2 still fails.
        let rules = HeaderRules {
            allowed_rsv: 0b100,
            ..SERVER
        };
        let h = decode_header(&[0xC1, 0x80, 1, 2, 3, 4], &rules)
            .unwrap()
            .unwrap();
        assert_eq!(h.rsv, 0b100);
        assert_eq!(err(&[0xE1], &rules), ProtocolError::ReservedBits(0b110));
    }

    #[test]
    fn reserved_opcodes_rejected_from_first_byte() {
        for op in (0x3..=0x7).chain(0xB..=0xF) {
            let e = err(&[0x80 | op], &SERVER);
            assert_eq!(e, ProtocolError::UnknownOpcode(op));
            assert_eq!(e.close_code(), close::PROTOCOL_ERROR);
        }
    }

    #[test]
    fn control_frames_must_be_final_and_short() {
        // RFC 6455 §5.5.
        for op in [0x8, 0x9, 0xA] {
            let e = err(&[op], &SERVER);
            assert_eq!(e, ProtocolError::FragmentedControlFrame);
            assert_eq!(e.close_code(), close::PROTOCOL_ERROR);
            // 125 is fine, 126 and 127 are rejected from the first 2 bytes.
            let h = decode_header(&[0x80 | op, 0xFD, 1, 2, 3, 4], &SERVER)
                .unwrap()
                .unwrap();
            assert_eq!(h.payload_len, 125);
            for len7 in [126u8, 127] {
                let e = err(&[0x80 | op, 0x80 | len7], &SERVER);
                assert_eq!(e, ProtocolError::ControlFrameTooLong(len7 as u64));
                assert_eq!(e.close_code(), close::PROTOCOL_ERROR);
            }
        }
    }

    #[test]
    fn masking_per_role_from_second_byte() {
        // RFC 6455 §5.1.
        let e = err(&[0x81, 0x05], &SERVER);
        assert_eq!(e, ProtocolError::UnmaskedFrame);
        assert_eq!(e.close_code(), close::PROTOCOL_ERROR);
        let e = err(&[0x81, 0x85], &CLIENT);
        assert_eq!(e, ProtocolError::MaskedFrame);
        assert_eq!(e.close_code(), close::PROTOCOL_ERROR);
        // Even when the extended length would follow.
        assert_eq!(err(&[0x82, 0x7F], &SERVER), ProtocolError::UnmaskedFrame);
    }

    #[test]
    fn length_msb_rejected_from_third_byte() {
        // RFC 6455 §5.2: the most significant bit MUST be 0.
        let e = err(&[0x82, 0xFF, 0x80], &SERVER);
        assert_eq!(e, ProtocolError::InvalidLength);
        assert_eq!(e.close_code(), close::PROTOCOL_ERROR);
        assert_eq!(decode_header(&[0x82, 0xFF, 0x7F], &SERVER), Ok(None));
    }

    #[test]
    fn frame_too_large_from_length_alone() {
        // A 4 GiB claim is rejected before the mask key (and any payload) arrives.
        let buf = [0x82, 0xFF, 0, 0, 0, 0x01, 0, 0, 0, 0];
        let e = err(&buf, &SERVER);
        assert_eq!(
            e,
            ProtocolError::FrameTooLarge {
                len: 1 << 32,
                limit: 1 << 20
            }
        );
        assert_eq!(e.close_code(), close::MESSAGE_TOO_BIG);
        // Exactly at the limit passes; one more is rejected, for each length encoding.
        let rules = HeaderRules {
            max_frame: 300,
            ..SERVER
        };
        assert!(decode_header(&[0x82, 0xFE, 0x01, 0x2C, 0, 0, 0, 0], &rules)
            .unwrap()
            .is_some());
        assert_eq!(
            err(&[0x82, 0xFE, 0x01, 0x2D], &rules),
            ProtocolError::FrameTooLarge {
                len: 301,
                limit: 300
            }
        );
        let rules = HeaderRules {
            max_frame: 10,
            ..SERVER
        };
        assert_eq!(
            err(&[0x82, 0x8B], &rules),
            ProtocolError::FrameTooLarge { len: 11, limit: 10 }
        );
    }

    #[test]
    fn encode_header_lengths_and_mask() {
        let mut h = [0u8; MAX_HEADER_LEN];
        let n = encode_header(&mut h, true, OpCode::Text, None, 5);
        assert_eq!(&h[..n], &[0x81, 0x05]);
        let n = encode_header(&mut h, false, OpCode::Binary, None, 256);
        assert_eq!(&h[..n], &[0x02, 0x7E, 0x01, 0x00]);
        let n = encode_header(&mut h, true, OpCode::Binary, Some([9, 8, 7, 6]), 65536);
        assert_eq!(&h[..n], &[0x82, 0xFF, 0, 0, 0, 0, 0, 1, 0, 0, 9, 8, 7, 6]);
        // Boundaries of each encoding decode back to the same header.
        for len in [0u64, 125, 126, 65535, 65536, 1 << 40] {
            for mask in [None, Some([1, 2, 3, 4])] {
                let n = encode_header(&mut h, true, OpCode::Binary, mask, len);
                let rules = HeaderRules {
                    role: if mask.is_some() {
                        Role::Server
                    } else {
                        Role::Client
                    },
                    max_frame: u64::MAX,
                    allowed_rsv: 0,
                };
                let d = decode_header(&h[..n], &rules).unwrap().unwrap();
                assert_eq!(
                    (d.payload_len, d.mask, d.header_len, d.fin),
                    (len, mask, n, true)
                );
            }
        }
    }

    #[test]
    fn rfc_5_7_frames_encode_exactly() {
        let mut out = BytesMut::new();
        write_server_frame(&mut out, true, OpCode::Text, b"Hello");
        assert_eq!(&out[..], &[0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]);
        let mut out = BytesMut::new();
        write_client_frame(
            &mut out,
            true,
            OpCode::Text,
            [0x37, 0xfa, 0x21, 0x3d],
            b"Hello",
        );
        assert_eq!(
            &out[..],
            &[0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58]
        );
        // Unmasked ping "Hello" and masked pong "Hello".
        let mut out = BytesMut::new();
        write_server_frame(&mut out, true, OpCode::Ping, b"Hello");
        assert_eq!(&out[..], &[0x89, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]);
        let mut out = BytesMut::new();
        write_client_frame(
            &mut out,
            true,
            OpCode::Pong,
            [0x37, 0xfa, 0x21, 0x3d],
            b"Hello",
        );
        assert_eq!(
            &out[..],
            &[0x8a, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58]
        );
    }

    #[test]
    fn close_payload_code_and_reason() {
        let (p, n) = close_payload(1000, "bye");
        assert_eq!(&p[..n], &[0x03, 0xE8, b'b', b'y', b'e']);
        let (p, n) = close_payload(1001, "");
        assert_eq!(&p[..n], &[0x03, 0xE9]);
    }

    #[test]
    fn close_payload_truncates_on_char_boundary() {
        // 122 ASCII bytes then a 2-byte 'é': 124 bytes of reason, 1 over the limit; cutting
        // at 123 would split 'é', so the reason keeps 122 bytes.
        let reason = format!("{}é", "a".repeat(122));
        let (p, n) = close_payload(1000, &reason);
        assert_eq!(n, 2 + 122);
        assert!(std::str::from_utf8(&p[2..n]).is_ok());
        // 4-byte characters: 30 of them (120 bytes) fit, the 31st would not.
        let reason = "😀".repeat(40);
        let (p, n) = close_payload(4000, &reason);
        assert_eq!(n, 2 + 120);
        assert_eq!(std::str::from_utf8(&p[2..n]).unwrap(), "😀".repeat(30));
        // Exactly 123 ASCII bytes fit whole: a 125-byte control payload.
        let reason = "b".repeat(130);
        let (_, n) = close_payload(1000, &reason);
        assert_eq!(n, MAX_CONTROL_PAYLOAD);
    }
}
