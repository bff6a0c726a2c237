//! permessage-deflate for the session: what a route's connection negotiates, and the core's
//! one compressor and inflater (`SharedCodec`), lent to every session call through
//! `Context::codec` like the routing scratch, so a connection holds no compression state.
//!
//! Receive path: a compressed message from the decoder is inflated here (capped at the
//! message limit, then UTF-8 checked) before routing. Send path: relay replies, echoes and
//! fan-out frames at or over `compression_min_bytes` are compressed here before queueing.

use bytes::{Bytes, BytesMut};

use crate::config::Compression;
use crate::protocol::deflate::{self, Agreed, Deflater, InflateError, Inflater};
use crate::protocol::frame::{self, OpCode, MAX_HEADER_LEN};
use crate::protocol::handshake::Request;
use crate::protocol::message::{MessageKind, RSV1};
use crate::protocol::ProtocolError;

use super::{Count, Meter};

/// Why an inbound compressed message was refused (`ringway_inflate_failures_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflateFailure {
    /// Over the message limit once inflated (1009).
    TooLarge,
    /// Not a deflate stream (1007).
    Corrupt,
    /// Inflated text that is not UTF-8 (1007).
    InvalidUtf8,
}

impl InflateFailure {
    pub const ALL: [InflateFailure; 3] = [
        InflateFailure::TooLarge,
        InflateFailure::Corrupt,
        InflateFailure::InvalidUtf8,
    ];

    /// The `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            InflateFailure::TooLarge => "too_large",
            InflateFailure::Corrupt => "corrupt",
            InflateFailure::InvalidUtf8 => "invalid_utf8",
        }
    }
}

/// The compressor output buffer is kept between messages up to this size.
const KEEP_BUF_BYTES: usize = 256 * 1024;

/// What a route's connection agrees to, from its handshake's offers.
pub fn negotiate(mode: Compression, request: &Request) -> Option<Agreed> {
    match mode {
        Compression::Off => None,
        // `dedicated` is not built yet; it runs as `shared` (config warns at start-up).
        Compression::Shared | Compression::Dedicated => deflate::negotiate(&request.extensions),
    }
}

/// One per core: the shared (no context takeover) deflater and inflater. zlib state is made
/// on first use, so a core that never compresses holds none.
#[derive(Debug, Default)]
pub struct SharedCodec {
    pub deflater: Deflater,
    pub inflater: Inflater,
    buf: Vec<u8>,
}

impl SharedCodec {
    /// A whole server frame for `payload`: compressed with RSV1 when the connection agreed to
    /// deflate (`bits`: our window) and the payload has at least `min_bytes`, else plain.
    pub fn encode(
        &mut self,
        meter: &dyn Meter,
        bits: Option<u8>,
        min_bytes: usize,
        opcode: OpCode,
        payload: &[u8],
    ) -> Bytes {
        let Some(bits) = bits else {
            return super::encode(opcode, payload);
        };
        if payload.len() < min_bytes {
            meter.count(Count::CompressionSkipped);
            return super::encode(opcode, payload);
        }
        self.deflater.compress(bits, payload, &mut self.buf);
        meter.count(Count::Compressed {
            before: payload.len(),
            after: self.buf.len(),
        });
        let mut out = BytesMut::with_capacity(MAX_HEADER_LEN + self.buf.len());
        frame::write_server_frame(&mut out, true, opcode, &self.buf);
        // RFC 7692 §6: RSV1 on the first (here the only) frame marks it compressed.
        out[0] |= RSV1 << 4;
        if self.buf.capacity() > KEEP_BUF_BYTES {
            self.buf = Vec::new();
        }
        out.freeze()
    }

    /// Inflate a message whose frames had RSV1, never past `limit` bytes (1009), refusing
    /// data that does not inflate (1007) and, for text, inflated bytes that are not UTF-8.
    pub fn inflate(
        &mut self,
        meter: &dyn Meter,
        kind: MessageKind,
        payload: &[u8],
        limit: usize,
    ) -> Result<Bytes, ProtocolError> {
        let out = self.inflater.inflate(payload, limit).map_err(|e| match e {
            InflateError::TooLarge { limit } => {
                meter.count(Count::InflateFailed(InflateFailure::TooLarge));
                ProtocolError::MessageTooLarge {
                    len: limit as u64 + 1,
                    limit: limit as u64,
                }
            }
            InflateError::Corrupt => {
                meter.count(Count::InflateFailed(InflateFailure::Corrupt));
                ProtocolError::InvalidCompressedData
            }
        })?;
        if kind == MessageKind::Text && simdutf8::basic::from_utf8(&out).is_err() {
            meter.count(Count::InflateFailed(InflateFailure::InvalidUtf8));
            return Err(ProtocolError::InvalidUtf8);
        }
        meter.count(Count::Inflated {
            before: payload.len(),
            after: out.len(),
        });
        Ok(Bytes::from(out))
    }
}
