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
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kind() -> impl Strategy<Value = MessageKind> {
        prop_oneof![Just(MessageKind::Text), Just(MessageKind::Binary)]
    }

    /// A payload valid for `kind`: any bytes for binary, UTF-8 for text.
    fn message() -> impl Strategy<Value = (MessageKind, Bytes)> {
        (
            kind(),
            any::<String>(),
            proptest::collection::vec(any::<u8>(), 0..64),
        )
            .prop_map(|(k, s, b)| match k {
                MessageKind::Text => (k, Bytes::from(s)),
                MessageKind::Binary => (k, Bytes::from(b)),
            })
    }

    fn topic() -> impl Strategy<Value = Topic> {
        any::<String>().prop_map(Topic::from)
    }

    fn frame() -> impl Strategy<Value = Frame> {
        let s = any::<String>;
        prop_oneof![
            s().prop_map(|name| Frame::Hello {
                version: VERSION,
                name
            }),
            any::<u64>().prop_map(Frame::Ping),
            any::<u64>().prop_map(Frame::Pong),
            s().prop_map(|reason| Frame::Error { reason }),
            (any::<u64>(), any::<u16>(), s()).prop_map(|(conn, code, reason)| Frame::Close {
                conn,
                code,
                reason
            }),
            (
                any::<u64>(),
                s(),
                proptest::option::of(s()),
                proptest::collection::vec((s(), s()), 0..4),
                proptest::option::of(s()),
                any::<bool>(),
                any::<bool>()
            )
                .prop_map(|(conn, path, query, headers, peer, authorize, replay)| {
                    Frame::Open {
                        conn,
                        path,
                        query,
                        headers,
                        peer,
                        authorize,
                        replay,
                    }
                }),
            (any::<u64>(), message()).prop_map(|(conn, (kind, payload))| Frame::Message {
                conn,
                kind,
                payload
            }),
            any::<u64>().prop_map(|conn| Frame::Gone { conn }),
            any::<u64>().prop_map(|conn| Frame::Accept { conn }),
            (any::<u64>(), any::<u16>(), s()).prop_map(|(conn, status, reason)| {
                Frame::Reject {
                    conn,
                    status,
                    reason,
                }
            }),
            (any::<u64>(), message()).prop_map(|(conn, (kind, payload))| Frame::Send {
                conn,
                kind,
                payload
            }),
            (any::<u64>(), topic()).prop_map(|(conn, topic)| Frame::Subscribe { conn, topic }),
            (any::<u64>(), topic()).prop_map(|(conn, topic)| Frame::Unsubscribe { conn, topic }),
            (topic(), message()).prop_map(|(topic, (kind, payload))| Frame::Publish {
                topic,
                kind,
                payload
            }),
            message().prop_map(|(kind, payload)| Frame::Broadcast { kind, payload }),
        ]
    }

    /// One frame of every type, with non-trivial field values.
    fn every_frame() -> Vec<Frame> {
        let t = || Topic::from("room:lobby");
        vec![
            Frame::Hello {
                version: VERSION,
                name: "ringway".into(),
            },
            Frame::Ping(7),
            Frame::Pong(u64::MAX),
            Frame::Error {
                reason: "unsupported protocol version 2".into(),
            },
            Frame::Close {
                conn: 1,
                code: 1006,
                reason: String::new(),
            },
            Frame::Open {
                conn: 0x0100_0000_0002_0003,
                path: "/chat".into(),
                query: Some("room=é".into()),
                headers: vec![("origin".into(), "https://example.com".into())],
                peer: Some("127.0.0.1:5000".into()),
                authorize: true,
                replay: false,
            },
            Frame::Open {
                conn: 2,
                path: "/".into(),
                query: None,
                headers: vec![],
                peer: None,
                authorize: false,
                replay: true,
            },
            Frame::Message {
                conn: 3,
                kind: MessageKind::Text,
                payload: Bytes::from_static(b"{\"action\":\"join\"}"),
            },
            Frame::Gone { conn: 4 },
            Frame::Accept { conn: 5 },
            Frame::Reject {
                conn: 6,
                status: 403,
                reason: "no token".into(),
            },
            Frame::Send {
                conn: 7,
                kind: MessageKind::Binary,
                payload: Bytes::from_static(&[0, 0xff, 0x80]),
            },
            Frame::Subscribe {
                conn: 8,
                topic: t(),
            },
            Frame::Unsubscribe {
                conn: 9,
                topic: t(),
            },
            Frame::Publish {
                topic: t(),
                kind: MessageKind::Text,
                payload: Bytes::from_static(b"hi"),
            },
            Frame::Broadcast {
                kind: MessageKind::Binary,
                payload: Bytes::new(),
            },
        ]
    }

    fn encoded(frames: &[Frame]) -> BytesMut {
        let mut out = BytesMut::new();
        for f in frames {
            encode(f, &mut out);
        }
        out
    }

    fn decode_all(dec: &mut Decoder, buf: &mut BytesMut) -> Vec<Frame> {
        let mut v = Vec::new();
        while let Some(f) = dec.decode(buf).unwrap() {
            v.push(f);
        }
        v
    }

    #[test]
    fn every_type_round_trips_and_has_its_documented_code() {
        let frames = every_frame();
        let mut seen: Vec<u8> = frames.iter().map(Frame::type_code).collect();
        seen.dedup();
        assert_eq!(seen.len(), 15, "one frame of each type");
        for f in &frames {
            let mut buf = encoded(std::slice::from_ref(f));
            assert_eq!(buf.len(), encoded_len(f));
            assert_eq!(buf[LEN_PREFIX], f.type_code());
            let len = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
            assert_eq!(len, buf.len() - LEN_PREFIX);
            assert_eq!(
                Decoder::default().decode(&mut buf).unwrap().as_ref(),
                Some(f)
            );
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn wire_layout_matches_the_document() {
        // docs/relay-protocol.md, "send" example: conn 7, binary, 3 bytes.
        let mut buf = BytesMut::new();
        encode(
            &Frame::Send {
                conn: 7,
                kind: MessageKind::Binary,
                payload: Bytes::from_static(&[0xaa, 0xbb, 0xcc]),
            },
            &mut buf,
        );
        assert_eq!(
            &buf[..],
            &[0, 0, 0, 17, 0x22, 0, 0, 0, 0, 0, 0, 0, 7, 2, 0, 0, 0, 3, 0xaa, 0xbb, 0xcc]
        );
        // hello "gw", version 1.
        let mut buf = BytesMut::new();
        encode(
            &Frame::Hello {
                version: 1,
                name: "gw".into(),
            },
            &mut buf,
        );
        assert_eq!(&buf[..], b"\0\0\0\x0b\x01RWAY\0\x01\0\x02gw");
    }

    #[test]
    fn a_stream_split_at_every_byte_decodes_the_same() {
        let frames = every_frame();
        let whole = encoded(&frames);
        for cut in 0..=whole.len() {
            let mut dec = Decoder::default();
            let mut buf = BytesMut::from(&whole[..cut]);
            let mut got = decode_all(&mut dec, &mut buf);
            buf.extend_from_slice(&whole[cut..]);
            got.extend(decode_all(&mut dec, &mut buf));
            assert_eq!(got, frames, "cut at {cut}");
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn byte_at_a_time_decodes_the_same() {
        let frames = every_frame();
        let whole = encoded(&frames);
        let mut dec = Decoder::default();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in whole.iter() {
            buf.extend_from_slice(&[*b]);
            got.extend(decode_all(&mut dec, &mut buf));
        }
        assert_eq!(got, frames);
    }

    #[test]
    fn payloads_are_taken_without_a_copy() {
        let mut buf = encoded(&[Frame::Send {
            conn: 1,
            kind: MessageKind::Binary,
            payload: Bytes::from(vec![9u8; 1000]),
        }]);
        let range = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len();
        let Some(Frame::Send { payload, .. }) = Decoder::default().decode(&mut buf).unwrap() else {
            panic!("not a send");
        };
        assert!(range.contains(&(payload.as_ptr() as usize)));
    }

    #[test]
    fn oversized_length_prefix_is_rejected_before_reserving() {
        for len in [1025u32, u32::MAX] {
            let mut buf = BytesMut::with_capacity(8);
            buf.extend_from_slice(&len.to_be_bytes());
            buf.extend_from_slice(&[ty::SEND]);
            let cap = buf.capacity();
            let err = Decoder::new(1024).decode(&mut buf).unwrap_err();
            assert_eq!(
                err,
                RelayError::FrameTooLarge {
                    len: len as usize,
                    max: 1024
                }
            );
            assert_eq!(buf.capacity(), cap, "nothing reserved for a rejected frame");
        }
        // At the limit it is fine, and the decoder reserves just what the frame needs.
        let f = Frame::Broadcast {
            kind: MessageKind::Binary,
            payload: Bytes::from(vec![1u8; 1024 - 6]),
        };
        let whole = encoded(std::slice::from_ref(&f));
        assert_eq!(whole.len(), LEN_PREFIX + 1024);
        let mut buf = BytesMut::from(&whole[..10]);
        let mut dec = Decoder::new(1024);
        assert_eq!(dec.decode(&mut buf).unwrap(), None);
        assert!(buf.capacity() >= whole.len());
        assert!(buf.capacity() < 2 * whole.len());
        buf.extend_from_slice(&whole[10..]);
        assert_eq!(dec.decode(&mut buf).unwrap(), Some(f));
    }

    /// `u32 len` + `body` (type byte first).
    fn raw(body: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        b.put_u32(body.len() as u32);
        b.put_slice(body);
        b
    }

    #[test]
    fn garbage_is_rejected_with_the_right_error() {
        use RelayError::*;
        let conn = [0u8, 0, 0, 0, 0, 0, 0, 1];
        let cat = |parts: &[&[u8]]| parts.concat();
        let cases: Vec<(Vec<u8>, RelayError)> = vec![
            (vec![], EmptyFrame),
            (vec![0x7f], UnknownType(0x7f)),
            (vec![0x00, 1, 2], UnknownType(0)),
            (b"\x01RWAX\0\x01\0\0".to_vec(), BadMagic(*b"RWAX")),
            (
                b"\x01RWAY\0\x02\0\0".to_vec(),
                BadVersion { got: 2, want: 1 },
            ),
            (
                b"\x01RWAY\0\x01\0\x05ab".to_vec(),
                Truncated {
                    frame: "hello",
                    field: "name",
                },
            ),
            (
                b"\x01RWAY\0\x01\0\x01\xff".to_vec(),
                InvalidUtf8 {
                    frame: "hello",
                    field: "name",
                },
            ),
            (
                vec![ty::PING, 1, 2, 3],
                Truncated {
                    frame: "ping",
                    field: "nonce",
                },
            ),
            (
                vec![ty::PONG, 0, 0, 0, 0, 0, 0, 0, 1, 0xee],
                TrailingBytes {
                    frame: "pong",
                    extra: 1,
                },
            ),
            (
                cat(&[&[ty::SEND], &conn, &[3, 0, 0, 0, 0]]),
                BadKind {
                    frame: "send",
                    kind: 3,
                },
            ),
            (
                cat(&[&[ty::SEND], &conn, &[1, 0, 0, 0, 2, 0xc3, 0x28]]),
                InvalidUtf8 {
                    frame: "send",
                    field: "payload",
                },
            ),
            (
                cat(&[&[ty::SEND], &conn, &[2, 0xff, 0xff, 0xff, 0xff, 1]]),
                Truncated {
                    frame: "send",
                    field: "payload",
                },
            ),
            (
                cat(&[&[ty::OPEN], &conn, &[0x04]]),
                BadFlag {
                    frame: "open",
                    field: "flags",
                    value: 4,
                },
            ),
            (
                cat(&[&[ty::OPEN], &conn, &[0, 0, 1, b'/', 2]]),
                BadFlag {
                    frame: "open",
                    field: "query",
                    value: 2,
                },
            ),
            (
                // 65535 headers claimed, none present.
                cat(&[&[ty::OPEN], &conn, &[0, 0, 1, b'/', 0, 0, 0xff, 0xff]]),
                Truncated {
                    frame: "open",
                    field: "headers",
                },
            ),
            (
                cat(&[&[ty::SUBSCRIBE], &conn, &[0, 2, 0xff, 0xfe]]),
                InvalidUtf8 {
                    frame: "subscribe",
                    field: "topic",
                },
            ),
        ];
        for (body, want) in cases {
            let mut buf = raw(&body);
            assert_eq!(
                Decoder::default().decode(&mut buf),
                Err(want.clone()),
                "body {body:02x?}"
            );
        }
    }

    #[test]
    fn unknown_type_is_reported_before_the_body_arrives() {
        // Only the prefix and type byte: no need to wait for (or reserve) 1 MiB of garbage.
        let mut buf = BytesMut::from(&[0u8, 0x10, 0, 0, 0x99][..]);
        assert_eq!(
            Decoder::default().decode(&mut buf),
            Err(RelayError::UnknownType(0x99))
        );
    }

    #[test]
    fn only_from_rejects_frames_of_the_other_side() {
        let gw = Decoder::default().only_from(Side::Backend);
        let be = Decoder::default().only_from(Side::Gateway);
        for f in every_frame() {
            let mut a = encoded(std::slice::from_ref(&f));
            let mut b = a.clone();
            let (ra, rb) = (gw.clone().decode(&mut a), be.clone().decode(&mut b));
            let wrong = Err(RelayError::WrongDirection { frame: f.name() });
            match f.sender() {
                None => assert!(ra.is_ok() && rb.is_ok(), "{}", f.name()),
                Some(Side::Gateway) => assert!(ra == wrong && rb.is_ok(), "{}", f.name()),
                Some(Side::Backend) => assert!(ra.is_ok() && rb == wrong, "{}", f.name()),
            }
        }
    }

    #[test]
    fn backend_frames_become_edge_messages() {
        let e = Frame::Publish {
            topic: Topic::from("room:a"),
            kind: MessageKind::Text,
            payload: Bytes::from_static(b"x"),
        }
        .into_edge();
        assert!(
            matches!(e, Some(ToEdge::Publish { ref topic, .. }) if &**topic == "room:a"),
            "{e:?}"
        );
        let e = Frame::Send {
            conn: 42,
            kind: MessageKind::Binary,
            payload: Bytes::new(),
        }
        .into_edge()
        .unwrap();
        assert_eq!(e.conn(), Some(ConnId::from_u64(42)));
        assert!(Frame::Ping(1).into_edge().is_none());
        assert!(Frame::Gone { conn: 1 }.into_edge().is_none());
    }

    #[test]
    fn over_long_strings_are_cut_on_a_character_boundary() {
        // 'é' is two bytes: 40000 of them cannot be cut at exactly 65535.
        let long = "é".repeat(40_000);
        let mut buf = encoded(&[Frame::Error { reason: long }]);
        let Some(Frame::Error { reason }) = Decoder::default().decode(&mut buf).unwrap() else {
            panic!()
        };
        assert_eq!(reason.len(), 65_534);
        assert!(reason.chars().all(|c| c == 'é'));
    }

    // Issue 11 item 1: multi-byte characters in every string field, cut at the u16 limit
    // and at every byte of the stream, decode to the same text (or wait), never a panic.
    #[test]
    fn non_ascii_strings_in_every_field_survive_the_wire() {
        let long = "\u{1F600}".repeat(MAX_STRING / 4 + 1); // 4-byte chars across the limit
        let frames = [
            Frame::Hello {
                version: VERSION,
                name: "gw-\u{e9}".into(),
            },
            Frame::Open {
                conn: u64::MAX,
                path: "/caf\u{e9}/\u{1F600}".into(),
                query: Some(long.clone()),
                headers: vec![
                    ("x-\u{e9}".into(), long.clone()),
                    (String::new(), "\u{0}".into()),
                ],
                peer: Some("[::1]:1".into()),
                authorize: true,
                replay: true,
            },
            Frame::Close {
                conn: 0,
                code: u16::MAX,
                reason: long.clone(),
            },
            Frame::Subscribe {
                conn: 1,
                topic: Topic::from(long.as_str()),
            },
            Frame::Reject {
                conn: 2,
                status: 0,
                reason: "\u{e9}".repeat(MAX_STRING),
            },
        ];
        let whole = encoded(&frames);
        for cut in [0, 1, 3, 4, 5, whole.len() / 2, whole.len() - 1, whole.len()] {
            let mut dec = Decoder::default();
            let mut buf = BytesMut::from(&whole[..cut]);
            let mut got = decode_all(&mut dec, &mut buf);
            buf.extend_from_slice(&whole[cut..]);
            got.extend(decode_all(&mut dec, &mut buf));
            assert_eq!(got.len(), frames.len(), "cut at {cut}");
            for f in &got {
                if let Frame::Open {
                    query,
                    headers,
                    path,
                    ..
                } = f
                {
                    assert_eq!(path, "/caf\u{e9}/\u{1F600}");
                    let q = query.as_deref().unwrap();
                    assert!(
                        q.len() <= MAX_STRING && long.starts_with(q),
                        "clipped on a boundary"
                    );
                    assert_eq!(headers[0].0, "x-\u{e9}");
                }
            }
        }
        // A string whose bytes stop in the middle of a character is invalid UTF-8: an error.
        let conn = [0u8; 8];
        let body = [
            &[ty::SUBSCRIBE][..],
            &conn,
            &[0, 3],
            "\u{e9}".as_bytes(),
            &[0xc3],
        ]
        .concat();
        assert_eq!(
            Decoder::default().decode(&mut raw(&body)),
            Err(RelayError::InvalidUtf8 {
                frame: "subscribe",
                field: "topic"
            })
        );
    }

    /// Writes the fuzz seed corpus (fuzz/corpus/relay/) when RINGWAY_WRITE_RELAY_CORPUS is
    /// set: each seed is the fuzz target's piece-size byte followed by encoded frames.
    #[test]
    fn write_fuzz_corpus() {
        if std::env::var_os("RINGWAY_WRITE_RELAY_CORPUS").is_none() {
            return;
        }
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/relay");
        std::fs::create_dir_all(&dir).unwrap();
        let frames = every_frame();
        for (i, f) in frames.iter().enumerate() {
            let mut seed = vec![0xff];
            seed.extend_from_slice(&encoded(std::slice::from_ref(f)));
            std::fs::write(dir.join(format!("{i:02}-{}", f.name())), seed).unwrap();
        }
        let mut all = vec![6];
        all.extend_from_slice(&encoded(&frames));
        std::fs::write(dir.join("session-in-pieces-of-7"), all).unwrap();
    }

    proptest! {
        #[test]
        fn round_trip(frames in proptest::collection::vec(frame(), 1..6), cut in any::<prop::sample::Index>()) {
            let whole = encoded(&frames);
            prop_assert_eq!(whole.len(), frames.iter().map(encoded_len).sum::<usize>());
            let cut = cut.index(whole.len() + 1);
            let mut dec = Decoder::default();
            let mut buf = BytesMut::from(&whole[..cut]);
            let mut got = decode_all(&mut dec, &mut buf);
            buf.extend_from_slice(&whole[cut..]);
            got.extend(decode_all(&mut dec, &mut buf));
            prop_assert_eq!(got, frames);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut buf = BytesMut::from(&bytes[..]);
            let mut dec = Decoder::new(200);
            while let Ok(Some(_)) = dec.decode(&mut buf) {}
            // At most one frame of the limit (growth may double it), never what a prefix claims.
            prop_assert!(buf.capacity() <= 2 * bytes.len().max(LEN_PREFIX + 200));
        }
    }
}
