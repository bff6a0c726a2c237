//! Message assembly (RFC 6455 §5.4, §5.5, §8.1): frames in, whole messages and control
//! frames out, unmasked in place, UTF-8 checked as early as the bytes arrive.
//!
//! STUB API (bodies to be written): keep these signatures; add what you need.

use super::frame::{HeaderRules, Role};
use super::ProtocolError;
use bytes::{Bytes, BytesMut};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame payload (1009 beyond it).
    pub max_frame: u64,
    /// Largest message, all fragments together (1009 beyond it).
    pub max_message: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame: 64 * 1024,
            max_message: 64 * 1024,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    Text,
    Binary,
}

/// A message's bytes: borrowed where a whole message sat in one input buffer (unmasked in
/// place, no copy), owned where it was assembled from several frames or buffers.
#[derive(Debug)]
pub enum Payload<'a> {
    Borrowed(&'a [u8]),
    Owned(Bytes),
}

impl Payload<'_> {
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Payload::Borrowed(b) => b,
            Payload::Owned(b) => b,
        }
    }
    /// The payload as `Bytes`: free when owned, one copy when borrowed.
    pub fn into_bytes(self) -> Bytes {
        match self {
            Payload::Borrowed(b) => Bytes::copy_from_slice(b),
            Payload::Owned(b) => b,
        }
    }
}

#[derive(Debug)]
pub enum Event<'a> {
    Message {
        kind: MessageKind,
        payload: Payload<'a>,
    },
    Ping(&'a [u8]),
    Pong(&'a [u8]),
    /// A valid close frame: None when it carried no status code (then 1005 applies locally).
    Close(Option<(u16, &'a str)>),
}

/// Streaming decoder for one connection. Small (a few hundred bytes) and holds no heap
/// buffer between messages, so an idle connection costs almost nothing.
#[derive(Debug)]
pub struct MessageDecoder {
    rules: HeaderRules,
    limits: Limits,
    assembly: BytesMut,
}

impl MessageDecoder {
    pub fn new(role: Role, limits: Limits) -> Self {
        MessageDecoder {
            rules: HeaderRules {
                role,
                max_frame: limits.max_frame,
                allowed_rsv: 0,
            },
            limits,
            assembly: BytesMut::new(),
        }
    }

    /// Change the limits, e.g. on config reload; applies from the next frame.
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
        self.rules.max_frame = limits.max_frame;
    }

    /// Decode the next event from `input`, unmasking in place. Returns the bytes consumed
    /// and the event; with `None` the whole input was consumed (kept as needed) and more
    /// bytes are wanted. After an error the decoder must not be used again.
    pub fn decode<'a>(
        &'a mut self,
        input: &'a mut [u8],
    ) -> Result<(usize, Option<Event<'a>>), ProtocolError> {
        todo!(
            "{} {:?} {:?}",
            input.len(),
            self.limits,
            self.assembly.len()
        )
    }
}
