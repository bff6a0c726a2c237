//! Handshake-time admission as one pure function: given a parsed request, the route table
//! and the wall clock, [`admit`] decides which route serves the connection and what its
//! backend is told, or why the client is refused.
//!
//! The chain, in order: route match (404) -> `Origin` (403) -> JWT (401) -> what passes on
//! (headers, verified claims, query, subprotocol, token expiry). Sans-IO: no sockets, no
//! clock (`now_unix_s` is passed in), no counters; the edge counts the refusal by
//! [`Refusal::metric`], checks its connection limit, and sends the `open` event.
//!
//! On a route that verifies a JWT, nothing the client wrote can pose as a verified claim:
//! client-sent `x-claim-*` headers are dropped (even when named in `pass_headers`), the
//! credentials (`Authorization`, `Sec-WebSocket-Protocol`) stay at the edge, and any
//! `token` query parameter is stripped, wherever the token actually came from.

use bytes::Bytes;

use crate::policy::auth::{self, AuthError, TokenFrom};
use crate::protocol::handshake::{self, Request};
use crate::route::{RouteId, RouteTable};

/// Verified claims reach the backend as `x-claim-<name>` headers in `open`.
pub const CLAIM_HEADER_PREFIX: &str = "x-claim-";

/// A handshake the policy lets through, and what the backend's `open` carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    pub route_id: RouteId,
    /// The subprotocol the 101 must select (a token carried in `Sec-WebSocket-Protocol`).
    pub protocol: Option<String>,
    /// The query passed on (without `token` parameters on a JWT route).
    pub query: Option<String>,
    /// `pass_headers` as sent (names lower-cased), then the verified claims as `x-claim-*`.
    pub headers: Vec<(String, String)>,
    /// Unix seconds (`exp` + leeway) at which the open connection is closed 1008 "token
    /// expired"; `None` without a JWT or with `close_at_token_expiry = false`.
    pub token_expiry_s: Option<u64>,
}

/// Why a handshake is refused: the status, the reason for the body, extra response headers
/// and the metric label it is counted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no route for this path")]
    NoRoute,
    #[error("origin not allowed")]
    Origin,
    /// The route has `require_subprotocol` and the client offered none of its `subprotocols`.
    #[error("none of this route's subprotocols offered")]
    Subprotocol,
    #[error("{0}")]
    Auth(AuthError),
}

impl Refusal {
    pub fn status(&self) -> u16 {
        match self {
            Refusal::NoRoute => 404,
            Refusal::Origin => 403,
            Refusal::Subprotocol => 400,
            Refusal::Auth(e) => e.status(),
        }
    }

    /// The response body; never echoes what the client sent.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::NoRoute => "no route for this path",
            Refusal::Origin => "origin not allowed",
            Refusal::Subprotocol => "none of this route's subprotocols offered",
            Refusal::Auth(e) => e.reason(),
        }
    }

    /// Extra response headers (RFC 6750 §3: a 401 names the scheme it wants).
    pub fn headers(&self) -> &'static [(&'static str, &'static str)] {
        match self {
            Refusal::Auth(_) => &[("WWW-Authenticate", "Bearer")],
            _ => &[],
        }
    }

    /// What it is counted under in `ringway_policy_refusals_total`, where it is counted.
    pub fn metric(&self) -> Option<PolicyRefusal> {
        match self {
            Refusal::NoRoute | Refusal::Subprotocol => None,
            Refusal::Origin => Some(PolicyRefusal::Origin),
            Refusal::Auth(_) => Some(PolicyRefusal::Auth),
        }
    }

    /// The whole HTTP response.
    pub fn response(&self) -> Bytes {
        handshake::error_response(self.status(), self.reason(), self.headers())
    }
}

/// Every `reason` label of `ringway_policy_refusals_total`: each refusal the edge's policy
/// makes, at accept, in the handshake or on a message, is counted under exactly one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PolicyRefusal {
    /// Per-IP connection rate or concurrency (429/503 at accept).
    IpLimit,
    /// `Origin` not allowed (403).
    Origin,
    /// Missing or bad JWT (401).
    Auth,
    /// A message over the route's message rate (close 1008).
    MessageRate,
    /// An open connection's token expired (close 1008).
    TokenExpired,
    /// A message in more fragments than the route allows (close 1008).
    Fragments,
    /// A new connection while over the memory budget (503).
    Memory,
    /// The largest holders closed to get back under the memory budget (close 1008).
    MemoryShed,
    /// `max_connections` reached (503).
    ConnectionLimit,
}

impl PolicyRefusal {
    pub const ALL: [PolicyRefusal; 9] = [
        PolicyRefusal::IpLimit,
        PolicyRefusal::Origin,
        PolicyRefusal::Auth,
        PolicyRefusal::MessageRate,
        PolicyRefusal::TokenExpired,
        PolicyRefusal::Fragments,
        PolicyRefusal::Memory,
        PolicyRefusal::MemoryShed,
        PolicyRefusal::ConnectionLimit,
    ];

    /// The metric's `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            PolicyRefusal::IpLimit => "ip_limit",
            PolicyRefusal::Origin => "origin",
            PolicyRefusal::Auth => "auth",
            PolicyRefusal::MessageRate => "message_rate",
            PolicyRefusal::TokenExpired => "token_expired",
            PolicyRefusal::Fragments => "fragments",
            PolicyRefusal::Memory => "memory",
            PolicyRefusal::MemoryShed => "memory_shed",
            PolicyRefusal::ConnectionLimit => "connection_limit",
        }
    }
}

/// Why a connection is refused at accept, before its request is read: answered with the
/// status, reason and `Retry-After` once the request arrives.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AcceptRefusal {
    #[error("server memory budget exhausted")]
    Memory,
    #[error("connection limit reached")]
    ConnectionLimit,
    #[error("{0}")]
    Ip(crate::policy::rate::Refusal),
}

impl AcceptRefusal {
    pub fn status(&self) -> u16 {
        match self {
            AcceptRefusal::Memory | AcceptRefusal::ConnectionLimit => 503,
            AcceptRefusal::Ip(r) => r.status(),
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            AcceptRefusal::Memory => "server memory budget exhausted",
            AcceptRefusal::ConnectionLimit => "connection limit reached",
            AcceptRefusal::Ip(r) => r.reason(),
        }
    }

    pub fn retry_after_secs(&self) -> u64 {
        match self {
            AcceptRefusal::Memory | AcceptRefusal::ConnectionLimit => 5,
            AcceptRefusal::Ip(r) => r.retry_after_secs(),
        }
    }

    pub fn metric(&self) -> PolicyRefusal {
        match self {
            AcceptRefusal::Memory => PolicyRefusal::Memory,
            AcceptRefusal::ConnectionLimit => PolicyRefusal::ConnectionLimit,
            AcceptRefusal::Ip(_) => PolicyRefusal::IpLimit,
        }
    }

    /// The whole HTTP response, with `Retry-After`.
    pub fn response(&self) -> Bytes {
        let retry_after = self.retry_after_secs().to_string();
        handshake::error_response(
            self.status(),
            self.reason(),
            &[("Retry-After", &retry_after)],
        )
    }
}

/// Why a client message is refused: the connection is closed with [`close_code`]
/// (docs/relay-protocol.md, "Close").
///
/// [`close_code`]: MessageRefusal::close_code
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MessageRefusal {
    #[error("message rate exceeded")]
    Rate,
    /// The JSON routing key appears twice (parsers disagree on which one wins).
    #[error("the routing key appears more than once in the message")]
    DuplicateRouteKey,
    #[error("message could not be routed")]
    Unroutable,
}

impl MessageRefusal {
    pub fn close_code(&self) -> u16 {
        crate::protocol::close::POLICY_VIOLATION
    }

    /// What it is counted under in `ringway_policy_refusals_total`, if anything.
    pub fn metric(&self) -> Option<PolicyRefusal> {
        match self {
            MessageRefusal::Rate => Some(PolicyRefusal::MessageRate),
            MessageRefusal::DuplicateRouteKey | MessageRefusal::Unroutable => None,
        }
    }
}

impl From<crate::route::RouteError> for MessageRefusal {
    fn from(e: crate::route::RouteError) -> MessageRefusal {
        match e {
            crate::route::RouteError::DuplicateKey => MessageRefusal::DuplicateRouteKey,
            _ => MessageRefusal::Unroutable,
        }
    }
}

/// Whether a header name is in the `x-claim-` namespace (any case), compared as bytes.
pub fn is_claim_header(name: &str) -> bool {
    name.as_bytes()
        .get(..CLAIM_HEADER_PREFIX.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(CLAIM_HEADER_PREFIX.as_bytes()))
}

/// Run the handshake policy chain for `request` at `now_unix_s` (wall-clock Unix seconds,
/// for the token's `exp`/`nbf`).
pub fn admit(request: &Request, routes: &RouteTable, now_unix_s: u64) -> Result<Admitted, Refusal> {
    let (route_id, route) = routes.match_path(&request.path).ok_or(Refusal::NoRoute)?;
    let policy = routes.policy(route_id);
    if !policy.origins.allows(request.origin.as_deref()) {
        return Err(Refusal::Origin);
    }
    let mut claims = Vec::new();
    let mut protocol = None;
    let mut query = request.query.clone();
    let mut token_expiry_s = None;
    if let Some(verifier) = &policy.jwt {
        let source = auth::extract_token(
            &request.headers,
            request.query.as_deref(),
            &request.protocols,
        )
        .ok_or(Refusal::Auth(AuthError::Missing))?;
        let verified = verifier
            .verify(&source.token, now_unix_s)
            .map_err(Refusal::Auth)?;
        claims = verified.pass;
        if let TokenFrom::Subprotocol { select, .. } = source.from {
            protocol = Some(select);
        }
        // URLs get logged: no token reaches the backend, whatever carried the real one.
        query = query.as_deref().and_then(auth::strip_token_param);
        token_expiry_s = policy
            .close_at_token_expiry
            .then(|| verified.expires_at_s.saturating_add(verifier.leeway_s()));
    }
    let jwt = policy.jwt.is_some();
    let mut headers: Vec<(String, String)> = request
        .headers
        .iter()
        .filter(|(name, _)| {
            // Credentials the edge verified stay at the edge, and only the edge speaks
            // for the verified claims.
            let withheld = jwt
                && (name.eq_ignore_ascii_case("authorization")
                    || name.eq_ignore_ascii_case("sec-websocket-protocol")
                    || is_claim_header(name));
            !withheld
                && route
                    .pass_headers
                    .iter()
                    .any(|p| p.eq_ignore_ascii_case(name))
        })
        .map(|(name, value)| {
            (
                name.to_ascii_lowercase(),
                String::from_utf8_lossy(value).into_owned(),
            )
        })
        .collect();
    headers.extend(
        claims
            .into_iter()
            .map(|(k, v)| (format!("{CLAIM_HEADER_PREFIX}{k}"), v)),
    );
    // The JWT companion (a token carried in a subprotocol) keeps its place; otherwise the
    // route's first subprotocol, in its order of preference, that the client offered.
    if protocol.is_none() && !route.subprotocols.is_empty() {
        protocol = select_subprotocol(&route.subprotocols, &request.protocols);
        match &protocol {
            None if route.require_subprotocol => return Err(Refusal::Subprotocol),
            None => {}
            Some(p) => {
                // The backend learns the one selected, not the client's whole list.
                headers.retain(|(name, _)| name != "sec-websocket-protocol");
                headers.push(("sec-websocket-protocol".into(), p.clone()));
            }
        }
    }
    Ok(Admitted {
        route_id,
        protocol,
        query,
        headers,
        token_expiry_s,
    })
}

/// The server's most preferred subprotocol among those offered (RFC 6455 §4.2.2 step 5.5:
/// the server picks; names compare exactly, they are tokens).
fn select_subprotocol(preference: &[String], offered: &[String]) -> Option<String> {
    preference
        .iter()
        .find(|p| offered.iter().any(|o| o == *p))
        .cloned()
}

/// A token expiry (Unix seconds) as a deadline on the core's monotonic clock: `now_ms` on
/// that clock is `unix_now_ms` on the wall clock. Saturates instead of wrapping; an expiry
/// already past is due at once.
pub fn expiry_deadline_ms(expiry_unix_s: u64, now_ms: u64, unix_now_ms: u64) -> u64 {
    now_ms.saturating_add(
        expiry_unix_s
            .saturating_mul(1000)
            .saturating_sub(unix_now_ms),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::protocol::handshake::{parse_request, HandshakeLimits, Parsed};
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use serde_json::json;

    const SECRET: &str = "0123456789abcdef0123456789abcdef-admission";
    const NOW: u64 = 1_700_000_000;

    fn table(toml_text: &str) -> RouteTable {
        let config: Config = toml::from_str(toml_text).unwrap();
        RouteTable::from_config(&config).unwrap()
    }

    fn routes() -> RouteTable {
        table(&format!(
            r#"
[[routes]]
path = "/admin"
origins = ["https://app.example.com"]
pass_headers = ["x-claim-sub", "x-request-id", "authorization"]
[routes.jwt]
algorithm = "HS256"
secret = "{SECRET}"
leeway_s = 5
pass_claims = ["sub", "tenant"]

[[routes]]
path = "/lax"
close_at_token_expiry = false
[routes.jwt]
algorithm = "HS256"
secret = "{SECRET}"

[[routes]]
path = "/*"
pass_headers = ["x-claim-sub", "x-request-id"]
"#
        ))
    }

    fn token(claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    fn request(target: &str, extra: &str) -> Request {
        let text = format!(
            "GET {target} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        );
        match parse_request(text.as_bytes(), &HandshakeLimits::default()).unwrap() {
            Parsed::Complete { request, .. } => request,
            Parsed::Partial => panic!("partial"),
        }
    }

    const ORIGIN: &str = "Origin: https://app.example.com\r\n";

    #[test]
    fn route_subprotocols_select_by_server_preference() {
        let routes = table(
            r#"
[[routes]]
path = "/gql"
subprotocols = ["graphql-transport-ws", "mqtt"]

[[routes]]
path = "/strict"
subprotocols = ["mqtt"]
require_subprotocol = true

[[routes]]
path = "/*"
"#,
        );
        let admit = |target: &str, extra: &str| admit(&request(target, extra), &routes, NOW);
        // The server's order wins over the client's.
        let a = admit(
            "/gql",
            "Sec-WebSocket-Protocol: mqtt, graphql-transport-ws\r\n",
        )
        .unwrap();
        assert_eq!(a.protocol.as_deref(), Some("graphql-transport-ws"));
        // The backend's `open` carries the one selected.
        assert_eq!(
            a.headers,
            vec![(
                "sec-websocket-protocol".into(),
                "graphql-transport-ws".into()
            )]
        );
        let a = admit("/gql", "Sec-WebSocket-Protocol: stomp, mqtt\r\n").unwrap();
        assert_eq!(a.protocol.as_deref(), Some("mqtt"));
        // None offered, or none of the route's: no subprotocol, unless required.
        let a = admit("/gql", "Sec-WebSocket-Protocol: stomp\r\n").unwrap();
        assert_eq!((a.protocol, a.headers.len()), (None, 0));
        assert_eq!(admit("/gql", "").unwrap().protocol, None);
        assert_eq!(
            admit("/strict", "Sec-WebSocket-Protocol: stomp\r\n"),
            Err(Refusal::Subprotocol)
        );
        let e = admit("/strict", "").unwrap_err();
        assert_eq!(
            (e.status(), e.reason()),
            (400, "none of this route's subprotocols offered")
        );
        assert_eq!(
            admit("/strict", "Sec-WebSocket-Protocol: mqtt\r\n")
                .unwrap()
                .protocol
                .as_deref(),
            Some("mqtt")
        );
        // A route without a list selects none, as before.
        assert_eq!(
            admit("/x", "Sec-WebSocket-Protocol: mqtt\r\n")
                .unwrap()
                .protocol,
            None
        );
    }

    #[test]
    fn verified_claims_replace_client_sent_claim_headers() {
        let t = token(json!({"sub": "alice", "tenant": "acme", "exp": NOW + 60}));
        let req = request(
            "/admin?token=SECRET&a=1",
            &format!(
                "{ORIGIN}Authorization: Bearer {t}\r\nX-Claim-Sub: admin\r\nx-claim-tenant: evil\r\n\
                 X-Request-Id: r1\r\n"
            ),
        );
        let a = admit(&req, &routes(), NOW).unwrap();
        assert_eq!(a.route_id, 0);
        assert_eq!(
            a.headers,
            [
                ("x-request-id".to_string(), "r1".to_string()),
                ("x-claim-sub".to_string(), "alice".to_string()),
                ("x-claim-tenant".to_string(), "acme".to_string()),
            ],
            "no client-sent x-claim-*, no Authorization"
        );
        assert_eq!(
            a.query.as_deref(),
            Some("a=1"),
            "token stripped from a Bearer request"
        );
        assert_eq!(a.protocol, None);
        assert_eq!(a.token_expiry_s, Some(NOW + 65), "exp + leeway");
    }

    #[test]
    fn without_jwt_claim_headers_are_ordinary_headers() {
        let req = request("/open?token=abc", "X-Claim-Sub: admin\r\n");
        let a = admit(&req, &routes(), NOW).unwrap();
        assert_eq!(a.route_id, 2);
        assert_eq!(
            a.headers,
            [("x-claim-sub".to_string(), "admin".to_string())]
        );
        assert_eq!(
            a.query.as_deref(),
            Some("token=abc"),
            "not a JWT route: untouched"
        );
        assert_eq!(a.token_expiry_s, None);
    }

    #[test]
    fn refusals_in_chain_order() {
        let r = routes();
        let valid = token(json!({"sub": "alice", "exp": NOW + 60}));
        // No route at all.
        let empty = table("[[routes]]\npath = \"/only\"\n");
        let e = admit(&request("/other", ""), &empty, NOW).unwrap_err();
        assert_eq!((e, e.status(), e.metric()), (Refusal::NoRoute, 404, None));
        // Origin before the token: a good token from a bad origin is still a 403.
        let e = admit(
            &request(
                "/admin",
                &format!("Origin: https://evil.example.com\r\nAuthorization: Bearer {valid}\r\n"),
            ),
            &r,
            NOW,
        )
        .unwrap_err();
        assert_eq!(
            (e, e.status(), e.metric()),
            (Refusal::Origin, 403, Some(PolicyRefusal::Origin))
        );
        assert!(e.response().starts_with(b"HTTP/1.1 403 "));
        // Token problems are 401s with the WWW-Authenticate challenge.
        let cases = [
            (String::new(), AuthError::Missing),
            ("Authorization: abcdefé\r\n".to_string(), AuthError::Missing),
            (
                "Authorization: Bearer é\r\n".to_string(),
                AuthError::Malformed,
            ),
            (
                format!(
                    "Authorization: Bearer {}\r\n",
                    token(json!({"exp": NOW - 5}))
                ),
                AuthError::Expired,
            ),
            (
                format!(
                    "Authorization: Bearer {}\r\n",
                    token(json!({"exp": NOW + 60, "sub": "alice\r\nx-admin: 1"}))
                ),
                AuthError::ClaimControlCharacters,
            ),
        ];
        for (extra, want) in cases {
            let e = admit(&request("/admin", &format!("{ORIGIN}{extra}")), &r, NOW).unwrap_err();
            assert_eq!(e, Refusal::Auth(want), "{extra:?}");
            assert_eq!((e.status(), e.metric()), (401, Some(PolicyRefusal::Auth)));
            let resp = e.response();
            let text = String::from_utf8_lossy(&resp);
            assert!(text.contains("WWW-Authenticate: Bearer\r\n"), "{text}");
            assert!(
                text.ends_with(&format!("\r\n\r\n{}\n", want.reason())),
                "{text}"
            );
        }
        assert_eq!(
            Refusal::Auth(AuthError::ClaimControlCharacters).reason(),
            "token claim has control characters"
        );
    }

    #[test]
    fn token_sources_protocol_query_and_expiry_switch() {
        let r = routes();
        let t = token(json!({"sub": "bob", "exp": NOW + 10}));
        // From the query: stripped, and the rest kept.
        let a = admit(&request(&format!("/lax?room=1&token={t}"), ""), &r, NOW).unwrap();
        assert_eq!(a.query.as_deref(), Some("room=1"));
        assert_eq!(a.token_expiry_s, None, "close_at_token_expiry = false");
        // From a subprotocol, with a second token in the query that is stripped too.
        let a = admit(
            &request(
                "/lax?token=SECRET",
                &format!("Sec-WebSocket-Protocol: access_token.{t}, chat\r\n"),
            ),
            &r,
            NOW,
        )
        .unwrap();
        assert_eq!(a.protocol.as_deref(), Some("chat"));
        assert_eq!(a.query, None);
    }

    #[test]
    fn claim_header_names_compare_as_bytes() {
        assert!(is_claim_header("X-Claim-Sub"));
        assert!(is_claim_header("x-claim-"));
        assert!(!is_claim_header("x-claim"));
        assert!(!is_claim_header("x-claimé"));
        assert!(!is_claim_header("éééé"));
        assert!(!is_claim_header(""));
    }

    #[test]
    fn expiry_deadline_saturates() {
        assert_eq!(expiry_deadline_ms(NOW + 2, 500, NOW * 1000), 2_500);
        assert_eq!(expiry_deadline_ms(NOW + 2, 500, NOW * 1000 + 750), 1_750);
        assert_eq!(
            expiry_deadline_ms(NOW, 500, NOW * 1000 + 750),
            500,
            "past: due now"
        );
        assert_eq!(expiry_deadline_ms(u64::MAX, 500, 0), u64::MAX);
        assert_eq!(expiry_deadline_ms(u64::MAX, u64::MAX, 0), u64::MAX);
        assert_eq!(expiry_deadline_ms(0, 0, u64::MAX), 0);
    }
}
