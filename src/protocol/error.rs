//! Every way a peer can break RFC 6455 after the handshake, each mapped to the close code
//! the peer is told (RFC 6455 §7.4.1).

use super::close;

/// A protocol violation found while decoding frames or messages.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("reserved bits {0:#05b} set without a negotiated extension")]
    ReservedBits(u8),
    #[error("unknown opcode {0:#x}")]
    UnknownOpcode(u8),
    #[error("client frame is not masked")]
    UnmaskedFrame,
    #[error("server frame is masked")]
    MaskedFrame,
    #[error("control frame payload of {0} bytes is longer than 125")]
    ControlFrameTooLong(u64),
    #[error("control frame is fragmented")]
    FragmentedControlFrame,
    #[error("64-bit payload length has its most significant bit set")]
    InvalidLength,
    #[error("frame payload of {len} bytes exceeds the limit of {limit}")]
    FrameTooLarge { len: u64, limit: u64 },
    #[error("message of at least {len} bytes exceeds the limit of {limit}")]
    MessageTooLarge { len: u64, limit: u64 },
    #[error("message spans more than {limit} frames")]
    TooManyFragments { limit: u32 },
    #[error("continuation frame without a message in progress")]
    UnexpectedContinuation,
    #[error("new data frame while a fragmented message is in progress")]
    ExpectedContinuation,
    #[error("text message is not valid UTF-8")]
    InvalidUtf8,
    #[error("close frame payload of 1 byte")]
    InvalidClosePayload,
    #[error("invalid close code {0}")]
    InvalidCloseCode(u16),
    #[error("close reason is not valid UTF-8")]
    InvalidCloseReason,
    /// permessage-deflate data that does not inflate (RFC 7692 §8.2.3.6 leaves the code to
    /// us; 1007 says "data inconsistent with the message type").
    #[error("compressed message does not inflate")]
    InvalidCompressedData,
}

impl ProtocolError {
    /// The close code to send the peer for this violation.
    pub fn close_code(&self) -> u16 {
        match self {
            ProtocolError::FrameTooLarge { .. } | ProtocolError::MessageTooLarge { .. } => {
                close::MESSAGE_TOO_BIG
            }
            ProtocolError::InvalidUtf8
            | ProtocolError::InvalidCloseReason
            | ProtocolError::InvalidCompressedData => close::INVALID_PAYLOAD,
            ProtocolError::TooManyFragments { .. } => close::POLICY_VIOLATION,
            _ => close::PROTOCOL_ERROR,
        }
    }
}
