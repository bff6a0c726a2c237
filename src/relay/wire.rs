//! The relay wire protocol between the gateway and its backends (docs/relay-protocol.md):
//! length-prefixed binary frames over a TCP or Unix stream socket.
//!
//! Sans-IO, like `crate::protocol`: [`encode`] appends a frame to an output buffer and
//! [`Decoder::decode`] takes whole frames off the front of a read buffer. The relay runtime
//! owns the sockets; backends written in Rust (see examples/chat_backend.rs) reuse this codec.
//! Payloads come out of the read buffer without a copy (`split_to(..).freeze()`), and a
//! frame's length prefix is checked against the limit before a byte is reserved for it, so a
//! hostile peer can make the decoder hold at most one `max_frame` of memory.
//!
//! Layout of every frame: `u32 length` (big-endian, of everything after it) `u8 type`, then
//! the type's fields. Integers are big-endian; strings are `u16 length` + UTF-8; payloads are
//! `u32 length` + bytes; optional strings are `u8 present (0|1)` [+ string].

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::{ToEdge, Topic};
use crate::ids::ConnId;
use crate::protocol::message::MessageKind;

/// The four bytes every `hello` starts with.
pub const MAGIC: [u8; 4] = *b"RWAY";
/// The protocol version this codec speaks.
pub const VERSION: u16 = 1;
/// Largest payload a peer may send in one frame.
pub const MAX_PAYLOAD: usize = 16 * 1024 * 1024;
/// Default largest frame (the length prefix's value): a largest payload plus room for its
/// connection id, topic and other fields.
pub const DEFAULT_MAX_FRAME: usize = MAX_PAYLOAD + 64 * 1024;
/// Bytes of the length prefix.
pub const LEN_PREFIX: usize = 4;
/// Longest string the `u16` length of a string field can carry.
pub const MAX_STRING: usize = u16::MAX as usize;

/// Frame type codes (the `u8` after the length prefix).
pub mod ty {
    // Either way.
    pub const HELLO: u8 = 0x01;
    pub const PING: u8 = 0x02;
    pub const PONG: u8 = 0x03;
    pub const ERROR: u8 = 0x04;
    pub const CLOSE: u8 = 0x05;
    // Gateway -> backend.
    pub const OPEN: u8 = 0x10;
    pub const MESSAGE: u8 = 0x11;
    pub const GONE: u8 = 0x12;
    // Backend -> gateway.
    pub const ACCEPT: u8 = 0x20;
    pub const REJECT: u8 = 0x21;
    pub const SEND: u8 = 0x22;
    pub const SUBSCRIBE: u8 = 0x23;
    pub const UNSUBSCRIBE: u8 = 0x24;
    pub const PUBLISH: u8 = 0x25;
    pub const BROADCAST: u8 = 0x26;
}

/// Wire values of a message kind: the WebSocket opcodes (RFC 6455 §5.2).
const KIND_TEXT: u8 = 1;
const KIND_BINARY: u8 = 2;

/// `open` flag bits; the others must be zero.
const FLAG_AUTHORIZE: u8 = 0x01;
const FLAG_REPLAY: u8 = 0x02;

/// Which end of a link sends a frame type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Gateway,
    Backend,
}

/// One relay frame. Connection ids are the gateway's `ConnId::as_u64`, opaque to backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// First frame each way. A decoded `Hello` always has `version == VERSION` (anything
    /// else is [`RelayError::BadVersion`]).
    Hello {
        version: u16,
        name: String,
    },
    Ping(u64),
    Pong(u64),
    /// A fatal link error; the sender closes the link after it.
    Error {
        reason: String,
    },
    /// Gateway -> backend: the client's connection is closing or gone (code as sent or
    /// received, 1006 if none). Backend -> gateway: close the client's connection.
    Close {
        conn: u64,
        code: u16,
        reason: String,
    },
    Open {
        conn: u64,
        path: String,
        query: Option<String>,
        headers: Vec<(String, String)>,
        peer: Option<String>,
        /// The gateway holds the handshake until `accept` or `reject`.
        authorize: bool,
        /// Re-sent after a link reconnect for a connection that was already open.
        replay: bool,
    },
    Message {
        conn: u64,
        kind: MessageKind,
        payload: Bytes,
    },
    /// The connection a backend named no longer exists.
    Gone {
        conn: u64,
    },
    Accept {
        conn: u64,
    },
    Reject {
        conn: u64,
        status: u16,
        reason: String,
    },
    Send {
        conn: u64,
        kind: MessageKind,
        payload: Bytes,
    },
    Subscribe {
        conn: u64,
        topic: Topic,
    },
    Unsubscribe {
        conn: u64,
        topic: Topic,
    },
    Publish {
        topic: Topic,
        kind: MessageKind,
        payload: Bytes,
    },
    Broadcast {
        kind: MessageKind,
        payload: Bytes,
    },
}

impl Frame {
    /// The frame's type code.
    pub fn type_code(&self) -> u8 {
        match self {
            Frame::Hello { .. } => ty::HELLO,
            Frame::Ping(_) => ty::PING,
            Frame::Pong(_) => ty::PONG,
            Frame::Error { .. } => ty::ERROR,
            Frame::Close { .. } => ty::CLOSE,
            Frame::Open { .. } => ty::OPEN,
            Frame::Message { .. } => ty::MESSAGE,
            Frame::Gone { .. } => ty::GONE,
            Frame::Accept { .. } => ty::ACCEPT,
            Frame::Reject { .. } => ty::REJECT,
            Frame::Send { .. } => ty::SEND,
            Frame::Subscribe { .. } => ty::SUBSCRIBE,
            Frame::Unsubscribe { .. } => ty::UNSUBSCRIBE,
            Frame::Publish { .. } => ty::PUBLISH,
            Frame::Broadcast { .. } => ty::BROADCAST,
        }
    }

    /// The frame's name as the protocol document spells it.
    pub fn name(&self) -> &'static str {
        type_name(self.type_code()).unwrap_or("?")
    }

    /// Who may send this frame; None for frames sent either way.
    pub fn sender(&self) -> Option<Side> {
        sender_of(self.type_code())
    }

    /// The gateway's in-process message for a backend frame that acts on clients; None for
    /// link-level frames (hello, ping, pong, error) and gateway -> backend frames.
    pub fn into_edge(self) -> Option<ToEdge> {
        let c = ConnId::from_u64;
        Some(match self {
            Frame::Accept { conn } => ToEdge::Accept { conn: c(conn) },
            Frame::Reject {
                conn,
                status,
                reason,
            } => ToEdge::Reject {
                conn: c(conn),
                status,
                reason,
            },
            Frame::Send {
                conn,
                kind,
                payload,
            } => ToEdge::Send {
                conn: c(conn),
                kind,
                payload,
            },
            Frame::Close { conn, code, reason } => ToEdge::Close {
                conn: c(conn),
                code,
                reason,
            },
            Frame::Subscribe { conn, topic } => ToEdge::Subscribe {
                conn: c(conn),
                topic,
            },
            Frame::Unsubscribe { conn, topic } => ToEdge::Unsubscribe {
                conn: c(conn),
                topic,
            },
            Frame::Publish {
                topic,
                kind,
                payload,
            } => ToEdge::Publish {
                topic,
                kind,
                payload,
            },
            Frame::Broadcast { kind, payload } => ToEdge::Broadcast { kind, payload },
            _ => return None,
        })
    }
}

/// The protocol document's name for a type code.
pub fn type_name(code: u8) -> Option<&'static str> {
    Some(match code {
        ty::HELLO => "hello",
        ty::PING => "ping",
        ty::PONG => "pong",
        ty::ERROR => "error",
        ty::CLOSE => "close",
        ty::OPEN => "open",
        ty::MESSAGE => "message",
        ty::GONE => "gone",
        ty::ACCEPT => "accept",
        ty::REJECT => "reject",
        ty::SEND => "send",
        ty::SUBSCRIBE => "subscribe",
        ty::UNSUBSCRIBE => "unsubscribe",
        ty::PUBLISH => "publish",
        ty::BROADCAST => "broadcast",
        _ => return None,
    })
}

fn sender_of(code: u8) -> Option<Side> {
    match code {
        ty::OPEN | ty::MESSAGE | ty::GONE => Some(Side::Gateway),
        ty::ACCEPT..=ty::BROADCAST => Some(Side::Backend),
        _ => None,
    }
}

/// Why a byte stream is not a valid relay stream. Every one is fatal to the link: after it
/// the stream's frame boundaries are unknown or the peer is not speaking this protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelayError {
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge { len: usize, max: usize },
    #[error("frame length 0 (no type byte)")]
    EmptyFrame,
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    #[error("{frame} frame truncated in field {field}")]
    Truncated {
        frame: &'static str,
        field: &'static str,
    },
    #[error("{frame} frame has {extra} bytes after its last field")]
    TrailingBytes { frame: &'static str, extra: usize },
    #[error("{frame} frame field {field} is not valid UTF-8")]
    InvalidUtf8 {
        frame: &'static str,
        field: &'static str,
    },
    #[error("hello does not start with \"RWAY\" (got {0:02x?})")]
    BadMagic([u8; 4]),
    #[error("unsupported protocol version {got} (this end speaks {want})")]
    BadVersion { got: u16, want: u16 },
    #[error("{frame} frame has unknown message kind {kind}")]
    BadKind { frame: &'static str, kind: u8 },
    #[error("{frame} frame field {field} has invalid value 0x{value:02x}")]
    BadFlag {
        frame: &'static str,
        field: &'static str,
        value: u8,
    },
    #[error("{frame} frame may not be sent by this peer")]
    WrongDirection { frame: &'static str },
}

/// Append `frame` to `out`.
///
/// Never fails: a string longer than [`MAX_STRING`] bytes is cut at the last character
/// boundary before it and a payload beyond `u32::MAX` bytes at that length. Neither happens
/// for values the gateway produces (handshakes, reasons and decoded topics are far shorter,
/// messages are bounded by `max_message`); check [`encoded_len`] against the peer's limit
/// before sending a large payload.
pub fn encode(frame: &Frame, out: &mut BytesMut) {
    let len = encoded_len(frame);
    out.reserve(len);
    out.put_u32((len - LEN_PREFIX) as u32);
    out.put_u8(frame.type_code());
    match frame {
        Frame::Hello { version, name } => {
            out.put_slice(&MAGIC);
            out.put_u16(*version);
            put_str(out, name);
        }
        Frame::Ping(n) | Frame::Pong(n) => out.put_u64(*n),
        Frame::Error { reason } => put_str(out, reason),
        Frame::Close { conn, code, reason } => {
            out.put_u64(*conn);
            out.put_u16(*code);
            put_str(out, reason);
        }
        Frame::Open {
            conn,
            path,
            query,
            headers,
            peer,
            authorize,
            replay,
        } => {
            out.put_u64(*conn);
            let mut flags = 0;
            if *authorize {
                flags |= FLAG_AUTHORIZE;
            }
            if *replay {
                flags |= FLAG_REPLAY;
            }
            out.put_u8(flags);
            put_str(out, path);
            put_opt_str(out, query.as_deref());
            put_opt_str(out, peer.as_deref());
            let n = headers.len().min(u16::MAX as usize);
            out.put_u16(n as u16);
            for (name, value) in &headers[..n] {
                put_str(out, name);
                put_str(out, value);
            }
        }
        Frame::Message {
            conn,
            kind,
            payload,
        }
        | Frame::Send {
            conn,
            kind,
            payload,
        } => {
            out.put_u64(*conn);
            out.put_u8(kind_code(*kind));
            put_payload(out, payload);
        }
        Frame::Gone { conn } | Frame::Accept { conn } => out.put_u64(*conn),
        Frame::Reject {
            conn,
            status,
            reason,
        } => {
            out.put_u64(*conn);
            out.put_u16(*status);
            put_str(out, reason);
        }
        Frame::Subscribe { conn, topic } | Frame::Unsubscribe { conn, topic } => {
            out.put_u64(*conn);
            put_str(out, topic);
        }
        Frame::Publish {
            topic,
            kind,
            payload,
        } => {
            put_str(out, topic);
            out.put_u8(kind_code(*kind));
            put_payload(out, payload);
        }
        Frame::Broadcast { kind, payload } => {
            out.put_u8(kind_code(*kind));
            put_payload(out, payload);
        }
    }
}

/// Bytes [`encode`] appends for `frame`, length prefix included.
pub fn encoded_len(frame: &Frame) -> usize {
    let body = match frame {
        Frame::Hello { name, .. } => 4 + 2 + str_len(name),
        Frame::Ping(_) | Frame::Pong(_) => 8,
        Frame::Error { reason } => str_len(reason),
        Frame::Close { reason, .. } => 8 + 2 + str_len(reason),
        Frame::Open {
            path,
            query,
            headers,
            peer,
            ..
        } => {
            let n = headers.len().min(u16::MAX as usize);
            8 + 1
                + str_len(path)
                + opt_str_len(query.as_deref())
                + opt_str_len(peer.as_deref())
                + 2
                + headers[..n]
                    .iter()
                    .map(|(k, v)| str_len(k) + str_len(v))
                    .sum::<usize>()
        }
        Frame::Message { payload, .. } | Frame::Send { payload, .. } => {
            8 + 1 + payload_len(payload)
        }
        Frame::Gone { .. } | Frame::Accept { .. } => 8,
        Frame::Reject { reason, .. } => 8 + 2 + str_len(reason),
        Frame::Subscribe { topic, .. } | Frame::Unsubscribe { topic, .. } => 8 + str_len(topic),
        Frame::Publish { topic, payload, .. } => str_len(topic) + 1 + payload_len(payload),
        Frame::Broadcast { payload, .. } => 1 + payload_len(payload),
    };
    LEN_PREFIX + 1 + body
}

fn kind_code(kind: MessageKind) -> u8 {
    match kind {
        MessageKind::Text => KIND_TEXT,
        MessageKind::Binary => KIND_BINARY,
    }
}

/// `s` cut to at most [`MAX_STRING`] bytes on a character boundary.
fn clip(s: &str) -> &str {
    if s.len() <= MAX_STRING {
        return s;
    }
    let mut end = MAX_STRING;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn str_len(s: &str) -> usize {
    2 + clip(s).len()
}

fn opt_str_len(s: Option<&str>) -> usize {
    1 + s.map_or(0, str_len)
}

fn payload_len(p: &[u8]) -> usize {
    4 + p.len().min(u32::MAX as usize)
}

fn put_str(out: &mut BytesMut, s: &str) {
    let s = clip(s);
    out.put_u16(s.len() as u16);
    out.put_slice(s.as_bytes());
}

fn put_opt_str(out: &mut BytesMut, s: Option<&str>) {
    match s {
        None => out.put_u8(0),
        Some(s) => {
            out.put_u8(1);
            put_str(out, s);
        }
    }
}

fn put_payload(out: &mut BytesMut, p: &[u8]) {
    let p = &p[..p.len().min(u32::MAX as usize)];
    out.put_u32(p.len() as u32);
    out.put_slice(p);
}

/// Takes whole frames off the front of a read buffer.
///
/// Holds no state between frames beyond its settings: feed it the same buffer after every
/// read. After an error the link must be dropped; the stream cannot be resynchronised.
#[derive(Debug, Clone)]
pub struct Decoder {
    max_frame: usize,
    from: Option<Side>,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new(DEFAULT_MAX_FRAME)
    }
}

impl Decoder {
    /// A decoder accepting frames whose length prefix is at most `max_frame`, of any type.
    pub fn new(max_frame: usize) -> Decoder {
        Decoder {
            max_frame,
            from: None,
        }
    }

    /// Accept only frames `side` may send (plus those sent either way): the gateway decodes
    /// with `only_from(Side::Backend)`, a backend with `only_from(Side::Gateway)`.
    pub fn only_from(mut self, side: Side) -> Decoder {
        self.from = Some(side);
        self
    }

    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Take the next whole frame off the front of `buf`; `Ok(None)` when `buf` does not yet
    /// hold one, after reserving room for the rest of it (never more than `max_frame`).
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, RelayError> {
        if buf.len() < LEN_PREFIX {
            return Ok(None);
        }
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        // Checked before reserving anything: a hostile prefix costs nothing.
        if len > self.max_frame {
            return Err(RelayError::FrameTooLarge {
                len,
                max: self.max_frame,
            });
        }
        if len == 0 {
            return Err(RelayError::EmptyFrame);
        }
        // Cannot overflow on 64-bit (len fits in u32); saturates on smaller targets, where a
        // frame that large could never be buffered anyway.
        let total = LEN_PREFIX.saturating_add(len);
        let Some(&code) = buf.get(LEN_PREFIX) else {
            buf.reserve(total - buf.len());
            return Ok(None);
        };
        let name = type_name(code).ok_or(RelayError::UnknownType(code))?;
        if let (Some(want), Some(sent_by)) = (self.from, sender_of(code)) {
            if want != sent_by {
                return Err(RelayError::WrongDirection { frame: name });
            }
        }
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        let mut body = buf.split_to(total);
        body.advance(LEN_PREFIX + 1);
        let mut r = Reader { body, frame: name };
        let frame = r.frame(code)?;
        if !r.body.is_empty() {
            return Err(RelayError::TrailingBytes {
                frame: name,
                extra: r.body.len(),
            });
        }
        Ok(Some(frame))
    }
}

/// A cursor over one frame's body that names the field it failed on.
struct Reader {
    body: BytesMut,
    frame: &'static str,
}

impl Reader {
    fn frame(&mut self, code: u8) -> Result<Frame, RelayError> {
        Ok(match code {
            ty::HELLO => {
                let magic: [u8; 4] = self.take(4, "magic")?[..].try_into().unwrap_or_default();
                if magic != MAGIC {
                    return Err(RelayError::BadMagic(magic));
                }
                let version = self.u16("version")?;
                // Checked before the rest: a later version may lay out its hello differently
                // after the version field.
                if version != VERSION {
                    return Err(RelayError::BadVersion {
                        got: version,
                        want: VERSION,
                    });
                }
                Frame::Hello {
                    version,
                    name: self.string("name")?,
                }
            }
            ty::PING => Frame::Ping(self.u64("nonce")?),
            ty::PONG => Frame::Pong(self.u64("nonce")?),
            ty::ERROR => Frame::Error {
                reason: self.string("reason")?,
            },
            ty::CLOSE => Frame::Close {
                conn: self.u64("conn")?,
                code: self.u16("code")?,
                reason: self.string("reason")?,
            },
            ty::OPEN => {
                let conn = self.u64("conn")?;
                let flags = self.u8("flags")?;
                if flags & !(FLAG_AUTHORIZE | FLAG_REPLAY) != 0 {
                    return Err(RelayError::BadFlag {
                        frame: self.frame,
                        field: "flags",
                        value: flags,
                    });
                }
                let path = self.string("path")?;
                let query = self.opt_string("query")?;
                let peer = self.opt_string("peer")?;
                let n = self.u16("header count")?;
                // Each header takes at least 4 bytes, so a bogus count is caught here
                // instead of reserving room for it.
                if self.body.len() < n as usize * 4 {
                    return Err(self.truncated("headers"));
                }
                let mut headers = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    let name = self.string("header name")?;
                    let value = self.string("header value")?;
                    headers.push((name, value));
                }
                Frame::Open {
                    conn,
                    path,
                    query,
                    headers,
                    peer,
                    authorize: flags & FLAG_AUTHORIZE != 0,
                    replay: flags & FLAG_REPLAY != 0,
                }
            }
            ty::MESSAGE => {
                let conn = self.u64("conn")?;
                let (kind, payload) = self.message()?;
                Frame::Message {
                    conn,
                    kind,
                    payload,
                }
            }
            ty::GONE => Frame::Gone {
                conn: self.u64("conn")?,
            },
            ty::ACCEPT => Frame::Accept {
                conn: self.u64("conn")?,
            },
            ty::REJECT => Frame::Reject {
                conn: self.u64("conn")?,
                status: self.u16("status")?,
                reason: self.string("reason")?,
            },
            ty::SEND => {
                let conn = self.u64("conn")?;
                let (kind, payload) = self.message()?;
                Frame::Send {
                    conn,
                    kind,
                    payload,
                }
            }
            ty::SUBSCRIBE => Frame::Subscribe {
                conn: self.u64("conn")?,
                topic: self.topic()?,
            },
            ty::UNSUBSCRIBE => Frame::Unsubscribe {
                conn: self.u64("conn")?,
                topic: self.topic()?,
            },
            ty::PUBLISH => {
                let topic = self.topic()?;
                let (kind, payload) = self.message()?;
                Frame::Publish {
                    topic,
                    kind,
                    payload,
                }
            }
            ty::BROADCAST => {
                let (kind, payload) = self.message()?;
                Frame::Broadcast { kind, payload }
            }
            other => return Err(RelayError::UnknownType(other)),
        })
    }

    fn truncated(&self, field: &'static str) -> RelayError {
        RelayError::Truncated {
            frame: self.frame,
            field,
        }
    }

    fn take(&mut self, n: usize, field: &'static str) -> Result<BytesMut, RelayError> {
        if self.body.len() < n {
            return Err(self.truncated(field));
        }
        Ok(self.body.split_to(n))
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, RelayError> {
        if self.body.is_empty() {
            return Err(self.truncated(field));
        }
        Ok(self.body.get_u8())
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, RelayError> {
        if self.body.len() < 2 {
            return Err(self.truncated(field));
        }
        Ok(self.body.get_u16())
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, RelayError> {
        if self.body.len() < 8 {
            return Err(self.truncated(field));
        }
        Ok(self.body.get_u64())
    }

    fn str_bytes(&mut self, field: &'static str) -> Result<BytesMut, RelayError> {
        let n = self.u16(field)? as usize;
        self.take(n, field)
    }

    fn string(&mut self, field: &'static str) -> Result<String, RelayError> {
        let b = self.str_bytes(field)?;
        match std::str::from_utf8(&b) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => Err(self.bad_utf8(field)),
        }
    }

    fn topic(&mut self) -> Result<Topic, RelayError> {
        let b = self.str_bytes("topic")?;
        match std::str::from_utf8(&b) {
            Ok(s) => Ok(Topic::from(s)),
            Err(_) => Err(self.bad_utf8("topic")),
        }
    }

    fn bad_utf8(&self, field: &'static str) -> RelayError {
        RelayError::InvalidUtf8 {
            frame: self.frame,
            field,
        }
    }

    fn opt_string(&mut self, field: &'static str) -> Result<Option<String>, RelayError> {
        match self.u8(field)? {
            0 => Ok(None),
            1 => self.string(field).map(Some),
            value => Err(RelayError::BadFlag {
                frame: self.frame,
                field,
                value,
            }),
        }
    }

    /// `u8 kind` + `u32 length` + payload, taken without a copy. Text must be UTF-8: the
    /// gateway hands it to clients as a text frame (RFC 6455 §8.1).
    fn message(&mut self) -> Result<(MessageKind, Bytes), RelayError> {
        let kind = match self.u8("kind")? {
            KIND_TEXT => MessageKind::Text,
            KIND_BINARY => MessageKind::Binary,
            kind => {
                return Err(RelayError::BadKind {
                    frame: self.frame,
                    kind,
                })
            }
        };
        if self.body.len() < 4 {
            return Err(self.truncated("payload"));
        }
        let n = self.body.get_u32() as usize;
        let payload = self.take(n, "payload")?.freeze();
        if kind == MessageKind::Text && simdutf8::basic::from_utf8(&payload).is_err() {
            return Err(self.bad_utf8("payload"));
        }
        Ok((kind, payload))
    }
}

#[cfg(test)]
mod tests;
