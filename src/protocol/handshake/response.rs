//! What the gateway answers a handshake: the 101 that switches protocols (with the accept
//! key), or an HTTP error response whose reason is sanitised so no request byte is echoed raw.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bytes::{BufMut, Bytes, BytesMut};
use sha1::{Digest, Sha1};
use std::fmt::Write as _;

use super::{is_token, Request};

/// The magic GUID of RFC 6455 §1.3 / §4.2.2 step 5.4.
const WS_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// `Sec-WebSocket-Accept` for a client key (RFC 6455 §4.2.2 step 5.4).
pub fn accept_key(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(WS_GUID);
    STANDARD.encode(sha.finalize())
}

/// The 101 Switching Protocols response; `protocol` is the chosen subprotocol, if any.
///
/// `protocol` should be one of `request.protocols` (RFC 6455 §4.2.2 step 5.5); one that is
/// not a token is left out rather than written into the header block.
pub fn response_101(request: &Request, protocol: Option<&str>) -> Bytes {
    response_101_with(request, protocol, None)
}

/// [`response_101`] with a `Sec-WebSocket-Extensions` answer (built by `protocol::deflate`,
/// never from request bytes); one holding CR or LF is left out.
pub fn response_101_with(
    request: &Request,
    protocol: Option<&str>,
    extensions: Option<&str>,
) -> Bytes {
    let accept = accept_key(request.key.as_bytes());
    let protocol = protocol.filter(|p| is_token(p.as_bytes()));
    let extensions = extensions.filter(|e| !e.bytes().any(|b| b == b'\r' || b == b'\n'));
    let mut out = BytesMut::with_capacity(
        160 + protocol.map_or(0, str::len) + extensions.map_or(0, |e| e.len() + 28),
    );
    out.put_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Accept: ",
    );
    out.put_slice(accept.as_bytes());
    out.put_slice(b"\r\n");
    if let Some(p) = protocol {
        out.put_slice(b"Sec-WebSocket-Protocol: ");
        out.put_slice(p.as_bytes());
        out.put_slice(b"\r\n");
    }
    if let Some(e) = extensions {
        out.put_slice(b"Sec-WebSocket-Extensions: ");
        out.put_slice(e.as_bytes());
        out.put_slice(b"\r\n");
    }
    out.put_slice(b"\r\n");
    out.freeze()
}

/// The standard reason phrase for the statuses the edge sends (RFC 9110 §15, RFC 6585).
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => match status / 100 {
            4 => "Client Error",
            5 => "Server Error",
            _ => "Error",
        },
    }
}

/// Control characters (CR, LF, ...) become spaces so no caller text can end a header line.
fn push_sanitized(out: &mut String, text: &str) {
    out.extend(text.chars().map(|c| if c.is_control() { ' ' } else { c }));
}

/// An error response with `status`, a short plain-text `reason` as body, `Connection: close`
/// and any `extra` headers (e.g. `Sec-WebSocket-Version: 13` with 426).
///
/// A status outside 400..=599 is a caller bug; it is sent as 500 rather than as a
/// malformed status line.
pub fn error_response(status: u16, reason: &str, extra: &[(&str, &str)]) -> Bytes {
    let status = if (400..=599).contains(&status) {
        status
    } else {
        500
    };
    let mut body = String::with_capacity(reason.len() + 1);
    push_sanitized(&mut body, reason);
    body.push('\n');
    let mut out = String::with_capacity(160 + body.len());
    // Writing to a String cannot fail.
    let _ = write!(
        out,
        "HTTP/1.1 {status} {}\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n",
        reason_phrase(status),
        body.len()
    );
    for (name, value) in extra {
        push_sanitized(&mut out, name);
        out.push_str(": ");
        push_sanitized(&mut out, value);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out.push_str(&body);
    Bytes::from(out)
}
