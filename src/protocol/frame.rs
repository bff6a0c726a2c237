//! Frame headers (RFC 6455 §5.2): decoding what peers send and encoding what we send.
//!
//! STUB API (bodies to be written): keep these signatures; add what you need.

use super::ProtocolError;
use bytes::{BufMut, BytesMut};

/// The longest frame header: 2 bytes + 8 bytes of extended length + 4 bytes of mask key.
pub const MAX_HEADER_LEN: usize = 14;

/// Longest control frame payload (RFC 6455 §5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

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
        todo!("{v}")
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
/// Checks, in wire order: RSV bits, opcode, control frame rules (FIN set, <= 125), 64-bit
/// length MSB, masking per role, then `max_frame`.
pub fn decode_header(
    buf: &[u8],
    rules: &HeaderRules,
) -> Result<Option<FrameHeader>, ProtocolError> {
    todo!("{} {:?}", buf.len(), rules)
}

/// Write a header into `out`, returning its length. `mask` is Some for client frames.
pub fn encode_header(
    out: &mut [u8; MAX_HEADER_LEN],
    fin: bool,
    opcode: OpCode,
    mask: Option<[u8; 4]>,
    payload_len: u64,
) -> usize {
    todo!("{} {fin} {opcode:?} {mask:?} {payload_len}", out.len())
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
    todo!("{} {fin} {opcode:?} {mask:?} {}", dst.len(), payload.len())
}

/// The payload of a close frame: the code in network order, then the UTF-8 reason, cut to
/// fit the 125-byte control frame limit on a character boundary.
pub fn close_payload(code: u16, reason: &str) -> ([u8; MAX_CONTROL_PAYLOAD], usize) {
    todo!("{code} {reason}")
}
