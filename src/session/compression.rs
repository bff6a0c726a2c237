//! permessage-deflate for the session: what a route's connection negotiates, the core's
//! one compressor and inflater (`SharedCodec`), lent to every session call through
//! `Context::codec` like the routing scratch, and a `dedicated` connection's own contexts
//! (`Contexts`: made on first use, charged in `Session::footprint`, dropped at shut).
//!
//! Receive path: a compressed message from the decoder is inflated here (capped at the
//! message limit, then UTF-8 checked) before routing. Send path: relay replies, echoes and
//! fan-out frames at or over `compression_min_bytes` are compressed here before queueing.

use bytes::{Bytes, BytesMut};

use crate::config::Compression;
use crate::protocol::deflate::takeover::{self, TakeoverDeflater, TakeoverInflater};
use crate::protocol::deflate::{self, Agreed, Deflater, InflateError, Inflater, Mode};
use crate::protocol::frame::{self, OpCode, MAX_HEADER_LEN};
use crate::protocol::handshake::Request;
use crate::protocol::message::{MessageKind, RSV1};
use crate::protocol::ProtocolError;
use crate::route::RouteId;

use super::{Context, Count, Meter, Session};

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

/// What a route's connection agrees to, from its handshake's offers. A `dedicated` one that
/// keeps a context either way takes one of the core's `compression_dedicated_per_core`
/// places (given back by [`SharedCodec::release`]); with none left it gets `shared`.
pub fn negotiate(
    mode: Compression,
    request: &Request,
    cx: &mut Context<'_>,
    own: &mut Contexts,
) -> Option<Agreed> {
    let offers = &request.extensions;
    match mode {
        Compression::Off => None,
        Compression::Shared => deflate::negotiate(offers, Mode::Shared),
        Compression::Dedicated if cx.codec.dedicated < cx.config.compression_dedicated_per_core => {
            let window_bits = cx.config.compression_window_bits;
            let agreed = deflate::negotiate(offers, Mode::Dedicated { window_bits });
            if agreed.is_some_and(|a| a.takes_over()) && !own.reserved {
                own.reserved = true;
                cx.codec.dedicated += 1;
            }
            agreed
        }
        Compression::Dedicated => {
            let agreed = deflate::negotiate(offers, Mode::Shared);
            if agreed.is_some() {
                cx.meter.count(Count::DedicatedFallback);
            }
            agreed
        }
    }
}

/// A `dedicated` connection's own compressor and inflater, each made on first use.
#[derive(Debug, Default)]
pub struct Contexts {
    deflater: Option<Box<TakeoverDeflater>>,
    inflater: Option<Box<TakeoverInflater>>,
    /// It holds one of the core's `compression_dedicated_per_core` places.
    reserved: bool,
}

/// What a connection gave back when it was shut (`SharedCodec::release`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Released {
    reserved: bool,
    contexts: usize,
}

impl Contexts {
    /// What its contexts hold, as measured for their window sizes.
    pub fn heap_bytes(&self, agreed: Option<&Agreed>) -> usize {
        let Some(a) = agreed else { return 0 };
        self.deflater
            .as_ref()
            .map_or(0, |_| takeover::deflater_bytes(a.server_window_bits))
            + self
                .inflater
                .as_ref()
                .map_or(0, |_| takeover::inflater_bytes(a.inflate_window_bits()))
    }

    /// Drop both contexts (the connection is shut); idempotent.
    pub fn release(&mut self) -> Released {
        let contexts = usize::from(self.deflater.take().is_some())
            + usize::from(self.inflater.take().is_some());
        Released {
            reserved: std::mem::take(&mut self.reserved),
            contexts,
        }
    }
}

/// One per core: the shared (no context takeover) deflater and inflater. zlib state is made
/// on first use, so a core that never compresses holds none.
#[derive(Debug, Default)]
pub struct SharedCodec {
    pub deflater: Deflater,
    pub inflater: Inflater,
    buf: Vec<u8>,
    /// Connections on this core that negotiated `dedicated` with a context either way.
    dedicated: usize,
    /// Their contexts made so far (`ringway_deflate_dedicated_contexts`).
    pub contexts: usize,
    /// Payload bytes per route (index: `RouteId`) not yet published, as
    /// [out raw, out compressed, in compressed, in raw]: each connection's own messages, so
    /// a fan-out compressed once counts for every recipient's route.
    route_bytes: Vec<[u64; 4]>,
    /// Some `route_bytes` are not zero (a loop turn without compression skips the scan).
    route_bytes_dirty: bool,
}

/// Indexes of [`SharedCodec::take_route_bytes`]' arrays.
pub const OUT_RAW: usize = 0;
pub const OUT_COMPRESSED: usize = 1;
pub const IN_COMPRESSED: usize = 2;
pub const IN_RAW: usize = 3;

/// The payload length of an unmasked server frame of `frame_len` bytes (RFC 6455 §5.2: a
/// 2-byte header up to 125, 4 up to 65,535, else 10).
pub fn payload_len(frame_len: usize) -> usize {
    match frame_len {
        0..=127 => frame_len.saturating_sub(2),
        128..=65_539 => frame_len - 4,
        _ => frame_len - 10,
    }
}

/// Frame compressed bytes as one server frame with RSV1 (RFC 7692 §6: on the first frame).
fn compressed_frame(opcode: OpCode, z: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(MAX_HEADER_LEN + z.len());
    frame::write_server_frame(&mut out, true, opcode, z);
    out[0] |= RSV1 << 4;
    out.freeze()
}

impl SharedCodec {
    /// A shut connection's place and contexts come back.
    pub fn release(&mut self, r: Released) {
        self.dedicated -= usize::from(r.reserved);
        self.contexts -= r.contexts;
    }

    /// Connections holding a `dedicated` place on this core.
    pub fn dedicated(&self) -> usize {
        self.dedicated
    }

    /// A compressed message went to (`out`) or came from a connection on `route`.
    pub fn count_route(&mut self, route: RouteId, out: bool, raw: usize, compressed: usize) {
        let i = usize::from(route);
        self.route_bytes_dirty = true;
        if self.route_bytes.len() <= i {
            self.route_bytes.resize(i + 1, [0; 4]);
        }
        let r = &mut self.route_bytes[i];
        if out {
            r[OUT_RAW] += raw as u64;
            r[OUT_COMPRESSED] += compressed as u64;
        } else {
            r[IN_COMPRESSED] += compressed as u64;
            r[IN_RAW] += raw as u64;
        }
    }

    /// The per-route byte counts since the last call (then zero), for publishing.
    pub fn take_route_bytes(&mut self) -> impl Iterator<Item = (RouteId, [u64; 4])> + '_ {
        let dirty = std::mem::take(&mut self.route_bytes_dirty);
        let n = if dirty { self.route_bytes.len() } else { 0 };
        self.route_bytes[..n]
            .iter_mut()
            .enumerate()
            .filter(|(_, r)| r.iter().any(|&v| v > 0))
            .map(|(i, r)| (i as RouteId, std::mem::take(r)))
    }

    /// A whole server frame for `payload`: compressed with RSV1 when the connection agreed to
    /// deflate (`bits`: our window) and the payload has at least `min_bytes`, else plain.
    pub fn encode(
        &mut self,
        meter: &dyn Meter,
        level: u8,
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
        self.deflater.set_level(level);
        self.deflater.compress(bits, payload, &mut self.buf);
        meter.count(Count::Compressed {
            before: payload.len(),
            after: self.buf.len(),
        });
        let out = compressed_frame(opcode, &self.buf);
        if self.buf.capacity() > KEEP_BUF_BYTES {
            self.buf = Vec::new();
        }
        out
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
        let out = self.inflater.inflate(payload, limit);
        checked(meter, kind, payload.len(), out)
    }
}

/// Count an inflate's outcome and map it to the close it calls for: over the limit 1009,
/// not deflate data 1007, text that is not UTF-8 1007.
fn checked(
    meter: &dyn Meter,
    kind: MessageKind,
    wire_len: usize,
    out: Result<Vec<u8>, InflateError>,
) -> Result<Bytes, ProtocolError> {
    let out = out.map_err(|e| match e {
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
        before: wire_len,
        after: out.len(),
    });
    Ok(Bytes::from(out))
}

impl Session {
    /// A whole server frame for a message to this client (see [`encode_message`]).
    pub fn encode_message(
        &mut self,
        cx: &mut Context<'_>,
        opcode: OpCode,
        payload: &[u8],
    ) -> Bytes {
        encode_message(
            &mut self.contexts,
            self.deflate,
            self.route,
            cx,
            opcode,
            payload,
        )
    }
}

/// A whole server frame for a message to a client: compressed with its own context
/// (`dedicated`), with the core's (`shared`), or plain (under `compression_min_bytes`, or
/// no deflate agreed).
pub(super) fn encode_message(
    own: &mut Contexts,
    agreed: Option<Agreed>,
    route: RouteId,
    cx: &mut Context<'_>,
    opcode: OpCode,
    payload: &[u8],
) -> Bytes {
    let min = cx.config.compression_min_bytes;
    let Some(agreed) = agreed else {
        return super::encode(opcode, payload);
    };
    if !agreed.server_takeover {
        let bits = Some(agreed.server_window_bits);
        let frame = cx.codec.encode(
            cx.meter,
            cx.config.compression_level,
            bits,
            min,
            opcode,
            payload,
        );
        if payload.len() >= min {
            cx.codec
                .count_route(route, true, payload.len(), payload_len(frame.len()));
        }
        return frame;
    }
    if payload.len() < min {
        cx.meter.count(Count::CompressionSkipped);
        return super::encode(opcode, payload);
    }
    let codec = &mut *cx.codec;
    let d = own.deflater.get_or_insert_with(|| {
        codec.contexts += 1;
        TakeoverDeflater::new(agreed.server_window_bits, cx.config.compression_level)
    });
    d.compress(payload, &mut codec.buf);
    cx.meter.count(Count::Compressed {
        before: payload.len(),
        after: codec.buf.len(),
    });
    let z = codec.buf.len();
    codec.count_route(route, true, payload.len(), z);
    let out = compressed_frame(opcode, &codec.buf);
    if codec.buf.capacity() > KEEP_BUF_BYTES {
        codec.buf = Vec::new();
    }
    out
}

/// Inflate a message whose frames had RSV1, with its own context when the client keeps its
/// window (`dedicated`), else the core's; the same cap and checks either way.
pub(super) fn inflate_message(
    own: &mut Contexts,
    agreed: Option<Agreed>,
    route: RouteId,
    cx: &mut Context<'_>,
    kind: MessageKind,
    payload: &[u8],
    limit: usize,
) -> Result<Bytes, ProtocolError> {
    let out = match agreed.filter(|a| a.client_takeover) {
        None => cx.codec.inflate(cx.meter, kind, payload, limit),
        Some(agreed) => {
            let codec = &mut *cx.codec;
            let i = own.inflater.get_or_insert_with(|| {
                codec.contexts += 1;
                TakeoverInflater::new(agreed.inflate_window_bits())
            });
            let out = i.inflate(codec.inflater.chunk(), payload, limit);
            checked(cx.meter, kind, payload.len(), out)
        }
    };
    if let Ok(raw) = &out {
        cx.codec.count_route(route, false, raw.len(), payload.len());
    }
    out
}
