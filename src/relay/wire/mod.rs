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

//!
//! Split in three: this file holds the record types, constants and errors; [`encode`] and
//! [`decode`] the two directions. The codec knows nothing of the gateway's own types: the
//! router maps decoded records to what it sends the cores.

mod decode;
mod encode;
#[cfg(test)]
mod tests;

pub use decode::Decoder;
pub use encode::{encode, encoded_len};

use bytes::Bytes;

use crate::ids::Topic;
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

/// Record type codes (the `u8` after the length prefix).
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
pub enum Record {
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

impl Record {
    /// The frame's type code.
    pub fn type_code(&self) -> u8 {
        match self {
            Record::Hello { .. } => ty::HELLO,
            Record::Ping(_) => ty::PING,
            Record::Pong(_) => ty::PONG,
            Record::Error { .. } => ty::ERROR,
            Record::Close { .. } => ty::CLOSE,
            Record::Open { .. } => ty::OPEN,
            Record::Message { .. } => ty::MESSAGE,
            Record::Gone { .. } => ty::GONE,
            Record::Accept { .. } => ty::ACCEPT,
            Record::Reject { .. } => ty::REJECT,
            Record::Send { .. } => ty::SEND,
            Record::Subscribe { .. } => ty::SUBSCRIBE,
            Record::Unsubscribe { .. } => ty::UNSUBSCRIBE,
            Record::Publish { .. } => ty::PUBLISH,
            Record::Broadcast { .. } => ty::BROADCAST,
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
