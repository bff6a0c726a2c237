//! The HTTP/1.1 Upgrade handshake (RFC 6455 §4.2): request bytes in, a parsed request or a
//! refusal with a status and reason out; the 101 response built for the accepted ones.
//!
//! STUB API (bodies to be written): keep these signatures; add what you need.

use bytes::Bytes;

#[derive(Debug, Clone, Copy)]
pub struct HandshakeLimits {
    /// Request line plus headers, up to and including the blank line; more is 431.
    pub max_header_bytes: usize,
    /// Number of header fields; more is 431.
    pub max_headers: usize,
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        HandshakeLimits {
            max_header_bytes: 8 * 1024,
            max_headers: 64,
        }
    }
}

/// One `Sec-WebSocket-Extensions` offer, e.g. `permessage-deflate; client_max_window_bits`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtensionOffer {
    pub name: String,
    pub params: Vec<(String, Option<String>)>,
}

/// A valid WebSocket upgrade request, with what later policy (routing, origin, auth) needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub path: String,
    pub query: Option<String>,
    pub host: String,
    pub origin: Option<String>,
    pub key: String,
    pub protocols: Vec<String>,
    pub extensions: Vec<ExtensionOffer>,
    /// All header fields as sent (name as sent, value bytes), for policy that needs others.
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Why a request is refused; each maps to a status code and a short reason for the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("request headers exceed {limit} bytes")]
    HeadersTooLarge { limit: usize },
    #[error("malformed HTTP request: {0}")]
    Malformed(String),
}

impl HandshakeError {
    /// The HTTP status for this refusal (400, 405, 426, 431, ...).
    pub fn status(&self) -> u16 {
        todo!()
    }
    /// The full HTTP response to send before closing the TCP connection.
    pub fn response(&self) -> Bytes {
        todo!()
    }
}

#[derive(Debug)]
pub enum Parsed {
    /// No blank line yet and still under the limits: read more.
    Partial,
    /// A valid request; `consumed` bytes of the input were the request, the rest (if any)
    /// are already WebSocket frames the client pipelined.
    Complete { request: Request, consumed: usize },
}

/// Parse the upgrade request at the start of `buf` (everything received so far).
pub fn parse_request(buf: &[u8], limits: &HandshakeLimits) -> Result<Parsed, HandshakeError> {
    todo!("{} {limits:?}", buf.len())
}

/// `Sec-WebSocket-Accept` for a client key (RFC 6455 §4.2.2 step 5.4).
pub fn accept_key(key: &[u8]) -> String {
    todo!("{}", key.len())
}

/// The 101 Switching Protocols response; `protocol` is the chosen subprotocol, if any.
pub fn response_101(request: &Request, protocol: Option<&str>) -> Bytes {
    todo!("{request:?} {protocol:?}")
}

/// An error response with `status`, a short plain-text `reason` as body, `Connection: close`
/// and any `extra` headers (e.g. `Sec-WebSocket-Version: 13` with 426).
pub fn error_response(status: u16, reason: &str, extra: &[(&str, &str)]) -> Bytes {
    todo!("{status} {reason} {extra:?}")
}
