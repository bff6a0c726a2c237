//! Close codes (RFC 6455 §7.4) and the close handshake (§5.5.1, §7.1.2): which codes a peer may
//! send, and when a connection is finished.

pub const NORMAL: u16 = 1000;
pub const GOING_AWAY: u16 = 1001;
pub const PROTOCOL_ERROR: u16 = 1002;
pub const UNSUPPORTED_DATA: u16 = 1003;
/// Never sent on the wire: "no status code was present".
pub const NO_STATUS: u16 = 1005;
/// Never sent on the wire: "closed abnormally".
pub const ABNORMAL: u16 = 1006;
pub const INVALID_PAYLOAD: u16 = 1007;
pub const POLICY_VIOLATION: u16 = 1008;
pub const MESSAGE_TOO_BIG: u16 = 1009;
pub const MANDATORY_EXTENSION: u16 = 1010;
pub const INTERNAL_ERROR: u16 = 1011;
pub const TRY_AGAIN_LATER: u16 = 1013;

/// Whether a peer may send `code` in a close frame (RFC 6455 §7.4.1, §7.4.2): 1000-1003,
/// 1007-1011, and the registered/private range 3000-4999. 1004-1006, 1015 and the rest are
/// reserved or never sent on the wire.
pub fn is_valid_wire_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999)
}

/// The close handshake seen from one endpoint (RFC 6455 §7.1.2 - §7.1.4).
///
/// Once we have sent a close, data frames from the peer are ignored; when both closes have
/// been seen the WebSocket connection is closed and the TCP connection may go.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CloseHandshake {
    sent: bool,
    received: bool,
    /// The peer's close frame came before we sent ours.
    received_first: bool,
}

impl CloseHandshake {
    /// Record that we are sending a close frame. Returns false if one was already sent:
    /// an endpoint sends at most one close frame.
    pub fn send(&mut self) -> bool {
        !std::mem::replace(&mut self.sent, true)
    }

    /// Record a close frame from the peer. Returns true when we must answer it with our own
    /// close (we had not sent one yet).
    pub fn receive(&mut self) -> bool {
        self.received = true;
        self.received_first |= !self.sent;
        !self.sent
    }

    /// Whether data messages from the peer are still to be delivered.
    pub fn accepts_data(&self) -> bool {
        !self.sent && !self.received
    }

    /// The peer started the closing handshake.
    pub fn peer_closed_first(&self) -> bool {
        self.received_first
    }

    pub fn close_sent(&self) -> bool {
        self.sent
    }

    pub fn close_received(&self) -> bool {
        self.received
    }

    /// Both closes seen: the WebSocket connection is closed.
    pub fn is_done(&self) -> bool {
        self.sent && self.received
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_codes_per_rfc_7_4() {
        for code in [
            1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 4999,
        ] {
            assert!(is_valid_wire_code(code), "{code} must be valid");
        }
        for code in [
            0, 999, 1004, 1005, 1006, 1012, 1013, 1014, 1015, 1016, 2999, 5000, 65535,
        ] {
            assert!(!is_valid_wire_code(code), "{code} must be invalid");
        }
    }

    #[test]
    fn peer_initiated_close_is_answered_once() {
        let mut c = CloseHandshake::default();
        assert!(c.accepts_data());
        assert!(c.receive(), "first close from the peer must be answered");
        assert!(!c.accepts_data());
        assert!(c.send());
        assert!(c.is_done());
        assert!(!c.send(), "a second close frame must never be sent");
    }

    #[test]
    fn our_close_then_peer_close_is_done_without_reply() {
        let mut c = CloseHandshake::default();
        assert!(c.send());
        assert!(!c.accepts_data(), "after our close, data is ignored");
        assert!(!c.is_done());
        assert!(!c.receive(), "peer's close after ours needs no answer");
        assert!(c.is_done());
    }
}
