//! The HTTP/1.1 Upgrade handshake (RFC 6455 §4.2): request bytes in, a parsed request or a
//! refusal with a status and reason out; the 101 response built for the accepted ones
//! (`response`). Tests in `tests.rs`.
//!
//! First stop of every connection's bytes. The edge calls [`parse_request`] with everything
//! received so far on each read (no parser state to keep per connection); once it is
//! `Complete`, the bytes past `consumed` go to the frame decoder. Header bytes and field counts
//! are capped by [`HandshakeLimits`], so a slow or hostile client costs bounded memory.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bytes::Bytes;

use super::path::{self, PathError};

mod response;
pub use response::{accept_key, error_response, reason_phrase, response_101, response_101_with};

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
    /// Parameters in order; quoted-string values are unescaped (RFC 6455 §9.1).
    pub params: Vec<(String, Option<String>)>,
}

/// A valid WebSocket upgrade request, with what later policy (routing, origin, auth) needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The path in its normal form (RFC 3986 §6.2.2, [`path::normalize`]), without the
    /// query: what routes are matched on and what the backend's `open` carries.
    pub path: String,
    /// Everything after the first `?`, exactly as sent.
    pub query: Option<String>,
    pub host: String,
    pub origin: Option<String>,
    pub key: String,
    /// Offered subprotocols in the client's order of preference (RFC 6455 §4.2.1 item 8).
    pub protocols: Vec<String>,
    pub extensions: Vec<ExtensionOffer>,
    /// All header fields as sent (name as sent, value bytes), for policy that needs others.
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Why a request is refused; each maps to a status code and a short reason for the client.
///
/// The `Display` text is the body sent to the client, so it never echoes header values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("request headers exceed {limit} bytes")]
    HeadersTooLarge { limit: usize },
    #[error("more than {limit} request header fields")]
    TooManyHeaders { limit: usize },
    #[error("malformed HTTP request: {0}")]
    Malformed(String),
    #[error("method {0} not allowed; a WebSocket handshake uses GET")]
    MethodNotAllowed(String),
    #[error("HTTP/1.1 required")]
    HttpVersion,
    #[error("absolute-form request target not accepted; send the path")]
    AbsoluteTarget,
    #[error("request target must be a path starting with /")]
    InvalidTarget,
    #[error("request target must not contain a fragment")]
    FragmentInTarget,
    /// The path has no safe normal form (RFC 3986 §6.2.2; see [`super::path`]).
    #[error("invalid request path: {0}")]
    InvalidPath(#[from] PathError),
    #[error("missing Host header")]
    MissingHost,
    #[error("duplicate {0} header")]
    DuplicateHeader(&'static str),
    #[error("invalid {0} header")]
    InvalidHeaderValue(&'static str),
    #[error("Upgrade: websocket required")]
    NotWebSocketUpgrade,
    #[error("Connection header must include Upgrade")]
    MissingConnectionUpgrade,
    #[error("missing Sec-WebSocket-Version header")]
    MissingVersion,
    /// Holds the offered version for logs; the client is only told what we speak.
    #[error("unsupported Sec-WebSocket-Version; this server speaks 13")]
    UnsupportedVersion(String),
    #[error("missing Sec-WebSocket-Key header")]
    MissingKey,
    #[error("Sec-WebSocket-Key must be base64 of 16 bytes")]
    InvalidKey,
    #[error("a handshake request must not have a body")]
    BodyNotAllowed,
    #[error("invalid Sec-WebSocket-Protocol: {0}")]
    InvalidProtocol(&'static str),
    #[error("invalid Sec-WebSocket-Extensions: {0}")]
    InvalidExtensions(&'static str),
}

impl HandshakeError {
    /// The HTTP status for this refusal (400, 405, 426, 431, ...).
    pub fn status(&self) -> u16 {
        use HandshakeError::*;
        match self {
            HeadersTooLarge { .. } | TooManyHeaders { .. } => 431,
            MethodNotAllowed(_) => 405,
            // RFC 6455 §4.2.2 step 4 / §4.4: tell the client which version we speak.
            NotWebSocketUpgrade | MissingVersion | UnsupportedVersion(_) => 426,
            Malformed(_)
            | HttpVersion
            | AbsoluteTarget
            | InvalidTarget
            | FragmentInTarget
            | InvalidPath(_)
            | MissingHost
            | DuplicateHeader(_)
            | InvalidHeaderValue(_)
            | MissingConnectionUpgrade
            | MissingKey
            | InvalidKey
            | BodyNotAllowed
            | InvalidProtocol(_)
            | InvalidExtensions(_) => 400,
        }
    }

    /// The full HTTP response to send before closing the TCP connection.
    pub fn response(&self) -> Bytes {
        use HandshakeError::*;
        let extra: &[(&str, &str)] = match self {
            MethodNotAllowed(_) => &[("Allow", "GET")],
            // RFC 9110 §15.5.22: a 426 carries `Upgrade`; RFC 6455 §4.4 adds the version,
            // for every 426 (the client may not speak WebSocket 13, or not yet say so).
            NotWebSocketUpgrade | MissingVersion | UnsupportedVersion(_) => {
                &[("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13")]
            }
            _ => &[],
        };
        error_response(self.status(), &self.to_string(), extra)
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

/// Header slots kept on the stack; larger `max_headers` limits use the heap.
const STACK_HEADERS: usize = 64;

/// Parse the upgrade request at the start of `buf` (everything received so far).
pub fn parse_request(buf: &[u8], limits: &HandshakeLimits) -> Result<Parsed, HandshakeError> {
    // Only the first `max_header_bytes` can belong to an acceptable request, so the parser
    // never looks further; if no blank line fits in them, the request is too large.
    let window = &buf[..buf.len().min(limits.max_header_bytes)];
    // The shortest header line is `a:\n` (3 bytes), so the bytes received can never hold
    // more fields than this: neither a huge `max_headers` nor a huge `max_header_bytes` can
    // make us allocate more slots than the bytes at hand justify.
    let slots = limits.max_headers.min(window.len() / 3 + 1);
    if slots <= STACK_HEADERS {
        let mut headers = [httparse::EMPTY_HEADER; STACK_HEADERS];
        parse_with(buf.len(), window, &mut headers[..slots], limits)
    } else {
        let mut headers = vec![httparse::EMPTY_HEADER; slots];
        parse_with(buf.len(), window, &mut headers, limits)
    }
}

/// The request target of the complete request at the start of `buf` (`/`, `/?x=1`) if it is
/// a plain page request: no sign of an upgrade (`Upgrade`, `Sec-WebSocket-Key`,
/// `Sec-WebSocket-Version`). For a refused request that may still deserve an HTTP answer of
/// its own (the demo page); a client that tried to upgrade gets its 426 instead.
pub fn page_target<'b>(buf: &'b [u8], limits: &HandshakeLimits) -> Option<&'b str> {
    let window = &buf[..buf.len().min(limits.max_header_bytes)];
    let mut headers = [httparse::EMPTY_HEADER; STACK_HEADERS];
    let mut req = httparse::Request::new(&mut headers[..limits.max_headers.min(STACK_HEADERS)]);
    match req.parse(window) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return None,
    }
    let upgrading = req.headers.iter().any(|h| {
        ["upgrade", "sec-websocket-key", "sec-websocket-version"]
            .iter()
            .any(|n| h.name.eq_ignore_ascii_case(n))
    });
    if upgrading {
        None
    } else {
        req.path
    }
}

fn parse_with<'b>(
    total: usize,
    window: &'b [u8],
    slots: &mut [httparse::Header<'b>],
    limits: &HandshakeLimits,
) -> Result<Parsed, HandshakeError> {
    let mut req = httparse::Request::new(slots);
    let consumed = match req.parse(window) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            // At the limit with no blank line yet: any completion would exceed it.
            if total >= limits.max_header_bytes {
                return Err(HandshakeError::HeadersTooLarge {
                    limit: limits.max_header_bytes,
                });
            }
            return Ok(Parsed::Partial);
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HandshakeError::TooManyHeaders {
                limit: limits.max_headers,
            })
        }
        Err(e) => return Err(HandshakeError::Malformed(e.to_string())),
    };
    // Complete: httparse always fills method, path and version.
    let method = req.method.unwrap_or("");
    let target = req.path.unwrap_or("");
    let version = req.version.unwrap_or(0);
    let request = validate(method, target, version, req.headers)?;
    Ok(Parsed::Complete { request, consumed })
}

/// The single-valued fields and list flags gathered in one pass over the headers.
#[derive(Default)]
struct Seen<'a> {
    host: Option<&'a [u8]>,
    host_dup: bool,
    origin: Option<&'a [u8]>,
    origin_dup: bool,
    key: Option<&'a [u8]>,
    key_dup: bool,
    version: Option<&'a [u8]>,
    version_dup: bool,
    upgrade_websocket: bool,
    connection_upgrade: bool,
    has_body: bool,
}

fn set_once<'a>(slot: &mut Option<&'a [u8]>, dup: &mut bool, value: &'a [u8]) {
    if slot.is_some() {
        *dup = true;
    } else {
        *slot = Some(value);
    }
}

/// RFC 6455 §4.2.1, checked in a fixed order so the same request always gets the same answer
/// whatever its header order.
fn validate(
    method: &str,
    target: &str,
    version: u8,
    headers: &[httparse::Header<'_>],
) -> Result<Request, HandshakeError> {
    // §4.2.1 item 1: "An HTTP/1.1 or higher GET request".
    if method != "GET" {
        return Err(HandshakeError::MethodNotAllowed(method.to_owned()));
    }
    if version != 1 {
        return Err(HandshakeError::HttpVersion);
    }
    let (raw_path, query) = split_target(target)?;
    // Before anything looks at it: routes, policy, logs and the backend see one normal form.
    let path = path::normalize(raw_path)?;

    let mut seen = Seen::default();
    for h in headers {
        let name = h.name;
        let value = h.value;
        if name.eq_ignore_ascii_case("host") {
            set_once(&mut seen.host, &mut seen.host_dup, value);
        } else if name.eq_ignore_ascii_case("upgrade") {
            seen.upgrade_websocket |= list_has_token(value, b"websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            seen.connection_upgrade |= list_has_token(value, b"upgrade");
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            set_once(&mut seen.key, &mut seen.key_dup, value);
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            set_once(&mut seen.version, &mut seen.version_dup, value);
        } else if name.eq_ignore_ascii_case("origin") {
            set_once(&mut seen.origin, &mut seen.origin_dup, value);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            seen.has_body = true;
        } else if name.eq_ignore_ascii_case("content-length") {
            seen.has_body |= trim_ows(value) != b"0";
        }
    }

    // §4.2.1 item 2.
    if seen.host_dup {
        return Err(HandshakeError::DuplicateHeader("Host"));
    }
    let host = match seen.host {
        None => return Err(HandshakeError::MissingHost),
        Some(v) => ascii_field(v, "Host")?,
    };
    // §4.2.1 item 3; §4.2.2 step 4 answers a non-upgrade request with 426.
    if !seen.upgrade_websocket {
        return Err(HandshakeError::NotWebSocketUpgrade);
    }
    // §4.2.1 item 4.
    if !seen.connection_upgrade {
        return Err(HandshakeError::MissingConnectionUpgrade);
    }
    // §4.2.1 item 6, checked before the key: a client of another version (e.g. hixie-76,
    // which has no Sec-WebSocket-Key) should learn from the 426 that we speak 13 (§4.4).
    if seen.version_dup {
        return Err(HandshakeError::DuplicateHeader("Sec-WebSocket-Version"));
    }
    match seen.version {
        None => return Err(HandshakeError::MissingVersion),
        Some(v) if trim_ows(v) == b"13" => {}
        Some(v) => {
            return Err(HandshakeError::UnsupportedVersion(
                String::from_utf8_lossy(v).into_owned(),
            ))
        }
    }
    // §4.2.1 item 5.
    if seen.key_dup {
        return Err(HandshakeError::DuplicateHeader("Sec-WebSocket-Key"));
    }
    let key = match seen.key {
        None => return Err(HandshakeError::MissingKey),
        Some(v) => valid_key(v)?,
    };
    // Bytes after the blank line are frames; a declared body would be misread as frames.
    if seen.has_body {
        return Err(HandshakeError::BodyNotAllowed);
    }
    // §4.2.1 item 7. A second Origin would let policy and logs disagree on who is asking.
    if seen.origin_dup {
        return Err(HandshakeError::DuplicateHeader("Origin"));
    }
    let origin = seen.origin.map(|v| ascii_field(v, "Origin")).transpose()?;

    // §4.2.1 items 8, 9 and 10: list fields (possibly repeated) and everything as sent.
    let mut protocols = Vec::new();
    let mut extensions = Vec::new();
    let mut all = Vec::with_capacity(headers.len());
    for h in headers {
        if h.name.eq_ignore_ascii_case("sec-websocket-protocol") {
            parse_protocols(h.value, &mut protocols).map_err(HandshakeError::InvalidProtocol)?;
        } else if h.name.eq_ignore_ascii_case("sec-websocket-extensions") {
            parse_extensions(h.value, &mut extensions)
                .map_err(HandshakeError::InvalidExtensions)?;
        }
        all.push((h.name.to_owned(), h.value.to_vec()));
    }

    Ok(Request {
        path,
        query: query.map(str::to_owned),
        host,
        origin,
        key,
        protocols,
        extensions,
        headers: all,
    })
}

/// Origin-form only (`/path?query`); RFC 6455 §3 forbids fragments in WebSocket URIs.
fn split_target(target: &str) -> Result<(&str, Option<&str>), HandshakeError> {
    if !target.starts_with('/') {
        return Err(if target.contains("://") {
            HandshakeError::AbsoluteTarget
        } else {
            HandshakeError::InvalidTarget
        });
    }
    if target.contains('#') {
        return Err(HandshakeError::FragmentInTarget);
    }
    Ok(match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    })
}

/// A single-valued field we hand to policy as text: non-empty visible ASCII.
fn ascii_field(value: &[u8], name: &'static str) -> Result<String, HandshakeError> {
    let v = trim_ows(value);
    if v.is_empty() || !v.iter().all(u8::is_ascii_graphic) {
        return Err(HandshakeError::InvalidHeaderValue(name));
    }
    // All bytes are ASCII, so this never replaces anything.
    Ok(String::from_utf8_lossy(v).into_owned())
}

/// §4.2.1 item 5: canonical base64 (24 characters with `==`) of exactly 16 bytes.
fn valid_key(value: &[u8]) -> Result<String, HandshakeError> {
    let v = trim_ows(value);
    if v.len() != 24 {
        return Err(HandshakeError::InvalidKey);
    }
    let mut out = [0u8; 18];
    match STANDARD.decode_slice(v, &mut out) {
        Ok(16) => Ok(String::from_utf8_lossy(v).into_owned()),
        _ => Err(HandshakeError::InvalidKey),
    }
}

fn is_ows(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = v {
        if !is_ows(*first) {
            break;
        }
        v = rest;
    }
    while let [rest @ .., last] = v {
        if !is_ows(*last) {
            break;
        }
        v = rest;
    }
    v
}

/// RFC 9110 §5.6.2 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// An RFC 9110 token: what a subprotocol name must be (RFC 6455 §4.1).
pub fn is_token(v: &[u8]) -> bool {
    !v.is_empty() && v.iter().all(|&b| is_tchar(b))
}

/// Whether a comma-separated field value (`Connection: keep-alive, Upgrade`) names `token`,
/// compared ASCII case-insensitively as §4.2.1 items 3 and 4 require.
fn list_has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|item| trim_ows(item).eq_ignore_ascii_case(token))
}

/// `Sec-WebSocket-Protocol = 1#token` (RFC 6455 §11.3.4); empty list elements are skipped.
fn parse_protocols(value: &[u8], out: &mut Vec<String>) -> Result<(), &'static str> {
    for item in value.split(|&b| b == b',') {
        let item = trim_ows(item);
        if item.is_empty() {
            continue;
        }
        if !is_token(item) {
            return Err("subprotocol is not a token");
        }
        out.push(String::from_utf8_lossy(item).into_owned());
    }
    Ok(())
}

/// A cursor over one `Sec-WebSocket-Extensions` value (RFC 6455 §9.1 ABNF).
struct Cursor<'a> {
    v: &'a [u8],
    i: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.v.get(self.i).copied()
    }
    fn skip_ows(&mut self) {
        while self.peek().is_some_and(is_ows) {
            self.i += 1;
        }
    }
    fn token(&mut self) -> Option<&'a str> {
        let start = self.i;
        while self.peek().is_some_and(is_tchar) {
            self.i += 1;
        }
        // tchar is ASCII, so the slice is valid UTF-8.
        std::str::from_utf8(&self.v[start..self.i])
            .ok()
            .filter(|t| !t.is_empty())
    }
    /// RFC 9110 §5.6.4 quoted-string, returned unescaped; the cursor is on the opening quote.
    fn quoted(&mut self) -> Result<String, &'static str> {
        self.i += 1;
        let mut s = Vec::new();
        loop {
            match self.peek() {
                None => return Err("unterminated quoted string"),
                Some(b'"') => {
                    self.i += 1;
                    break;
                }
                Some(b'\\') => {
                    self.i += 1;
                    match self.peek() {
                        Some(b) if b == b'\t' || b >= 0x20 && b != 0x7f => s.push(b),
                        _ => return Err("bad escape in quoted string"),
                    }
                    self.i += 1;
                }
                Some(b) if b == b'\t' || b >= 0x20 && b != 0x7f => {
                    s.push(b);
                    self.i += 1;
                }
                Some(_) => return Err("control character in quoted string"),
            }
        }
        // §9.1: after unescaping, a quoted value MUST still be a token.
        if !is_token(&s) {
            return Err("quoted parameter value is not a token");
        }
        Ok(String::from_utf8_lossy(&s).into_owned())
    }
}

/// `extension-list = 1#extension; extension = token *( ";" token [ "=" (token | quoted) ] )`.
fn parse_extensions(value: &[u8], out: &mut Vec<ExtensionOffer>) -> Result<(), &'static str> {
    let mut c = Cursor { v: value, i: 0 };
    loop {
        c.skip_ows();
        match c.peek() {
            None => return Ok(()),
            Some(b',') => {
                c.i += 1;
                continue;
            }
            Some(_) => {}
        }
        let name = c.token().ok_or("expected an extension name")?.to_owned();
        let mut params = Vec::new();
        c.skip_ows();
        while c.peek() == Some(b';') {
            c.i += 1;
            c.skip_ows();
            let pname = c.token().ok_or("expected a parameter name")?.to_owned();
            c.skip_ows();
            let pvalue = if c.peek() == Some(b'=') {
                c.i += 1;
                c.skip_ows();
                let v = if c.peek() == Some(b'"') {
                    c.quoted()?
                } else {
                    c.token().ok_or("expected a parameter value")?.to_owned()
                };
                c.skip_ows();
                Some(v)
            } else {
                None
            };
            params.push((pname, pvalue));
        }
        match c.peek() {
            None | Some(b',') => out.push(ExtensionOffer { name, params }),
            Some(_) => return Err("unexpected character"),
        }
    }
}

#[cfg(test)]
mod tests;
