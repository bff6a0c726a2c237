//! A whole client connection from arbitrary bytes: the opening handshake (RFC 6455 §4.2.1)
//! against a route table with an exact route guarded by an Origin allowlist and an HS256
//! JWT, and a `/*` route with a JSON routing key; then the admission chain, the 101, and
//! every frame after the request through the MessageDecoder (with the route's limits) and
//! the routing-key selection. Nothing may panic, and each outcome must be one the edge can
//! act on: a well-formed refusal, or an admission that leaks no client-made claim or token.
#![no_main]
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use ringway::admission::{self, Refusal};
use ringway::config::Config;
use ringway::protocol::frame::{Role, MAX_CONTROL_PAYLOAD};
use ringway::protocol::handshake::{parse_request, response_101, HandshakeLimits, Parsed};
use ringway::protocol::message::{Event, Limits, MessageDecoder, MessageKind};
use ringway::route::{RouteError, RouteTable};

/// The fixed wall clock: the seed corpus's tokens expire long after it.
const NOW_S: u64 = 1_700_000_000;

const CONFIG: &str = r#"
[[upstreams]]
name = "a"
backends = ["tcp://127.0.0.1:9"]

[[upstreams]]
name = "b"
backends = ["unix:/nonexistent.sock"]

[[routes]]
path = "/admin"
upstream = "a"
origins = ["https://app.example.com", "https://*.example.org"]
allow_missing_origin = true
pass_headers = ["x-claim-sub", "x-request-id", "authorization"]
max_fragments = 4
[routes.jwt]
algorithm = "HS256"
secret = "ringway-fuzz-secret-0123456789abcdef"
leeway_s = 5
pass_claims = ["sub", "roles"]

[[routes]]
path = "/*"
upstream = "a"
route_key = "action"
actions = { join = "b", say = "a" }
pass_headers = ["x-claim-sub", "x-request-id"]
max_fragments = 8
"#;

fn table() -> &'static RouteTable {
    static TABLE: OnceLock<RouteTable> = OnceLock::new();
    TABLE.get_or_init(|| {
        let config: Config = toml::from_str(CONFIG).expect("fuzz config parses");
        RouteTable::from_config(&config).expect("fuzz routes compile")
    })
}

fuzz_target!(|data: &[u8]| {
    let routes = table();
    let limits = HandshakeLimits::default();
    let (request, consumed) = match parse_request(data, &limits) {
        Ok(Parsed::Partial) => {
            assert!(data.len() < limits.max_header_bytes);
            return;
        }
        Err(e) => {
            assert!(e
                .response()
                .starts_with(format!("HTTP/1.1 {} ", e.status()).as_bytes()));
            return;
        }
        Ok(Parsed::Complete { request, consumed }) => (request, consumed),
    };
    assert!(consumed <= data.len());

    let admitted = match admission::admit(&request, routes, NOW_S) {
        Err(refusal) => {
            let response = refusal.response();
            assert!(response.starts_with(format!("HTTP/1.1 {} ", refusal.status()).as_bytes()));
            match refusal {
                Refusal::NoRoute => unreachable!("`/*` matches every path"),
                Refusal::Origin => assert_eq!(refusal.status(), 403),
                // The fuzzed routes set no `require_subprotocol`.
                Refusal::Subprotocol => unreachable!("no route requires a subprotocol"),
                Refusal::Auth(_) => {
                    assert_eq!(refusal.status(), 401);
                    assert!(response
                        .windows(b"WWW-Authenticate: Bearer".len())
                        .any(|w| w == b"WWW-Authenticate: Bearer"));
                }
            }
            return;
        }
        Ok(a) => a,
    };
    let route = routes.route(admitted.route_id);
    let jwt = routes.policy(admitted.route_id).jwt.is_some();
    assert!(usize::from(admitted.route_id) < routes.routes().len());
    if jwt {
        // Only the edge speaks for claims: the x-claim-* headers are the verified ones, last,
        // without control characters; no credential or token goes on.
        let first_claim = admitted
            .headers
            .iter()
            .position(|(n, _)| admission::is_claim_header(n))
            .unwrap_or(admitted.headers.len());
        let (client, verified) = admitted.headers.split_at(first_claim);
        assert!(client
            .iter()
            .all(|(n, _)| !admission::is_claim_header(n) && n != "authorization"));
        assert!(verified.len() <= 2);
        for (name, value) in verified {
            assert!(name == "x-claim-sub" || name == "x-claim-roles", "{name}");
            assert!(!value.bytes().any(|b| b < 0x20 || b == 0x7f));
        }
        if let Some(q) = &admitted.query {
            assert!(!q
                .split('&')
                .any(|p| p == "token" || p.starts_with("token=")));
        }
        assert!(admitted.token_expiry_s.is_some());
    } else {
        assert_eq!(admitted.token_expiry_s, None);
        assert_eq!(admitted.query, request.query);
    }
    if let Some(p) = &admitted.protocol {
        assert!(request.protocols.contains(p));
    }
    let response = response_101(&request, admitted.protocol.as_deref());
    assert!(response.starts_with(b"HTTP/1.1 101 Switching Protocols\r\n"));
    assert!(response.ends_with(b"\r\n\r\n"));
    let _ =
        admission::expiry_deadline_ms(admitted.token_expiry_s.unwrap_or(u64::MAX), 0, NOW_S * 1000);

    // The frames the client pipelined after its request.
    let msg_limits = Limits {
        max_frame: 16 * 1024,
        max_message: 32 * 1024,
        max_fragments: route.max_fragments,
    };
    let mut decoder = MessageDecoder::new(Role::Server, msg_limits);
    let mut frames = data[consumed..].to_vec();
    let len = frames.len();
    let mut scratch = Vec::new();
    let mut off = 0;
    while off < len {
        let (n, event) = match decoder.decode(&mut frames[off..]) {
            Ok(r) => r,
            Err(e) => {
                assert!(matches!(e.close_code(), 1002 | 1007 | 1008 | 1009));
                return;
            }
        };
        assert!(n <= len - off);
        off += n;
        match event {
            None => {
                assert_eq!(off, len);
                break;
            }
            Some(Event::Message { kind, payload }) => {
                let payload = payload.as_slice();
                assert!(payload.len() as u64 <= msg_limits.max_message);
                if kind == MessageKind::Text {
                    assert!(std::str::from_utf8(payload).is_ok());
                }
                match routes.select(route, kind, payload, &mut scratch) {
                    Ok(upstream) => assert!(usize::from(upstream) < routes.upstreams().len()),
                    Err(e) => assert_eq!(e, RouteError::DuplicateKey),
                }
            }
            Some(Event::Ping(p)) | Some(Event::Pong(p)) => assert!(p.len() <= MAX_CONTROL_PAYLOAD),
            Some(Event::Close(Some((code, reason)))) => {
                assert!(ringway::protocol::close::is_valid_wire_code(code));
                assert!(reason.len() <= MAX_CONTROL_PAYLOAD - 2);
            }
            Some(Event::Close(None)) => {}
            // RSV1 is never allowed here (no extension negotiated): must not happen.
            Some(Event::Compressed { .. }) => panic!("compressed event without RSV1 allowed"),
        }
    }
});
