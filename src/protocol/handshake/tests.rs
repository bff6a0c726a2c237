use super::*;

/// RFC 6455 §1.3 sample client handshake.
const RFC_SAMPLE: &[u8] = b"GET /chat HTTP/1.1\r\n\
    Host: server.example.com\r\n\
    Upgrade: websocket\r\n\
    Connection: Upgrade\r\n\
    Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
    Origin: http://example.com\r\n\
    Sec-WebSocket-Protocol: chat, superchat\r\n\
    Sec-WebSocket-Version: 13\r\n\r\n";

const GOOD_HEADERS: &[(&str, &str)] = &[
    ("Host", "server.example.com"),
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ("Sec-WebSocket-Version", "13"),
];

/// A request line plus `headers` (less those named in `drop`), then `add`.
fn build(line: &str, headers: &[(&str, &str)], drop: &[&str], add: &[(&str, &str)]) -> Vec<u8> {
    let mut s = format!("{line}\r\n");
    let kept = headers
        .iter()
        .filter(|(n, _)| !drop.iter().any(|d| d.eq_ignore_ascii_case(n)));
    for (n, v) in kept.chain(add) {
        s.push_str(&format!("{n}: {v}\r\n"));
    }
    s.push_str("\r\n");
    s.into_bytes()
}

fn good_with(drop: &[&str], add: &[(&str, &str)]) -> Vec<u8> {
    build("GET /chat HTTP/1.1", GOOD_HEADERS, drop, add)
}

fn parse(buf: &[u8]) -> Result<Parsed, HandshakeError> {
    parse_request(buf, &HandshakeLimits::default())
}

fn complete(buf: &[u8]) -> (Request, usize) {
    match parse(buf) {
        Ok(Parsed::Complete { request, consumed }) => (request, consumed),
        other => panic!("expected Complete, got {other:?}"),
    }
}

fn refused(buf: &[u8]) -> HandshakeError {
    match parse(buf) {
        Err(e) => e,
        other => panic!("expected an error, got {other:?}"),
    }
}

/// Splits a response into (status line, header lines, body).
fn split_response(resp: &[u8]) -> (String, Vec<String>, String) {
    let text = std::str::from_utf8(resp).expect("responses are UTF-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("blank line");
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().to_owned();
    (status, lines.map(str::to_owned).collect(), body.to_owned())
}

fn has_header(resp: &[u8], line: &str) -> bool {
    split_response(resp).1.iter().any(|l| l == line)
}

// RFC 6455 §1.3 / §4.2.2 step 5.4.
#[test]
fn accept_key_matches_rfc_sample() {
    assert_eq!(
        accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
        "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    );
}

// RFC 6455 §1.3 sample request, §4.2.1 fields exposed.
#[test]
fn rfc_sample_request_is_accepted_with_fields() {
    let (req, consumed) = complete(RFC_SAMPLE);
    assert_eq!(consumed, RFC_SAMPLE.len());
    assert_eq!(req.path, "/chat");
    assert_eq!(req.query, None);
    assert_eq!(req.host, "server.example.com");
    assert_eq!(req.origin.as_deref(), Some("http://example.com"));
    assert_eq!(req.key, "dGhlIHNhbXBsZSBub25jZQ==");
    assert_eq!(req.protocols, ["chat", "superchat"]);
    assert!(req.extensions.is_empty());
    assert_eq!(req.headers.len(), 7);
    assert_eq!(
        req.headers[0],
        ("Host".to_owned(), b"server.example.com".to_vec())
    );
    assert_eq!(
        req.headers[6],
        ("Sec-WebSocket-Version".to_owned(), b"13".to_vec())
    );
}

// RFC 6455 §1.3 sample server handshake, with the chosen subprotocol.
#[test]
fn response_101_matches_rfc_sample() {
    let (req, _) = complete(RFC_SAMPLE);
    let resp = response_101(&req, Some("chat"));
    assert_eq!(
        &resp[..],
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: chat\r\n\r\n"
    );
    let plain = response_101(&req, None);
    assert!(!split_response(&plain)
        .1
        .iter()
        .any(|l| l.starts_with("Sec-WebSocket-Protocol")));
    assert!(plain.ends_with(b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"));
    // A non-token protocol could smuggle header lines; it is left out.
    let evil = response_101(&req, Some("chat\r\nSet-Cookie: x=1"));
    assert_eq!(evil, plain);
}

#[test]
fn path_and_query_are_split() {
    let (req, _) = complete(&build("GET /a/b?x=1&y=2 HTTP/1.1", GOOD_HEADERS, &[], &[]));
    assert_eq!(req.path, "/a/b");
    assert_eq!(req.query.as_deref(), Some("x=1&y=2"));
    let (req, _) = complete(&build("GET /?x HTTP/1.1", GOOD_HEADERS, &[], &[]));
    assert_eq!((req.path.as_str(), req.query.as_deref()), ("/", Some("x")));
    let (req, _) = complete(&build("GET /p? HTTP/1.1", GOOD_HEADERS, &[], &[]));
    assert_eq!((req.path.as_str(), req.query.as_deref()), ("/p", Some("")));
}

// RFC 6455 §4.2.1: the whole request is needed before any answer; it arrives in pieces.
#[test]
fn one_byte_at_a_time_is_partial_until_the_last_byte() {
    for end in 0..RFC_SAMPLE.len() {
        assert!(
            matches!(parse(&RFC_SAMPLE[..end]), Ok(Parsed::Partial)),
            "prefix of {end} bytes"
        );
    }
    let (req, consumed) = complete(RFC_SAMPLE);
    assert_eq!(consumed, RFC_SAMPLE.len());
    assert_eq!(req.key, "dGhlIHNhbXBsZSBub25jZQ==");
}

// RFC 6455 §5.2: a client may send its first (masked) frame right behind the request.
#[test]
fn pipelined_frame_bytes_are_not_consumed() {
    let frame = [
        0x81u8, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
    ];
    let mut buf = RFC_SAMPLE.to_vec();
    buf.extend_from_slice(&frame);
    let (req, consumed) = complete(&buf);
    assert_eq!(consumed, RFC_SAMPLE.len());
    assert_eq!(&buf[consumed..], &frame);
    assert_eq!(req.path, "/chat");
}

#[test]
fn header_bytes_limit_while_partial() {
    let limits = HandshakeLimits::default();
    // No blank line within 8 KiB: refused without waiting for more.
    let mut buf = b"GET /chat HTTP/1.1\r\nX-Filler: ".to_vec();
    buf.resize(limits.max_header_bytes - 1, b'a');
    assert!(matches!(parse(&buf), Ok(Parsed::Partial)));
    buf.push(b'a');
    assert_eq!(
        refused(&buf),
        HandshakeError::HeadersTooLarge { limit: 8192 }
    );
    buf.extend_from_slice(&[b'a'; 10_000]);
    let e = refused(&buf);
    assert_eq!(e.status(), 431);
    assert!(e
        .response()
        .starts_with(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"));
}

#[test]
fn header_bytes_limit_when_complete() {
    let limits = HandshakeLimits::default();
    let base = good_with(&[], &[("X-Filler", "")]).len();
    // Exactly at the limit is accepted, one byte over is refused.
    let fill = "f".repeat(limits.max_header_bytes - base);
    let at_limit = good_with(&[], &[("X-Filler", &fill)]);
    assert_eq!(at_limit.len(), limits.max_header_bytes);
    assert_eq!(complete(&at_limit).1, limits.max_header_bytes);
    let fill = "f".repeat(limits.max_header_bytes - base + 1);
    let over = good_with(&[], &[("X-Filler", &fill)]);
    assert_eq!(
        refused(&over),
        HandshakeError::HeadersTooLarge { limit: 8192 }
    );
    // Pipelined frame bytes past an in-limit request do not count against it.
    let mut pipelined = at_limit.clone();
    pipelined.extend_from_slice(&[0x81; 4096]);
    assert_eq!(complete(&pipelined).1, limits.max_header_bytes);
}

#[test]
fn too_many_header_fields_is_431() {
    let extra: Vec<(String, String)> = (0..60)
        .map(|i| (format!("X-H{i}"), "v".to_owned()))
        .collect();
    let extra: Vec<(&str, &str)> = extra
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    // 5 required + 59 = 64 fields: accepted.
    complete(&good_with(&[], &extra[..59]));
    let e = refused(&good_with(&[], &extra));
    assert_eq!(e, HandshakeError::TooManyHeaders { limit: 64 });
    assert_eq!(e.status(), 431);
    // A custom, larger limit (heap slots) applies too.
    let limits = HandshakeLimits {
        max_header_bytes: 8192,
        max_headers: 100,
    };
    assert!(matches!(
        parse_request(&good_with(&[], &extra), &limits),
        Ok(Parsed::Complete { .. })
    ));
    let tight = HandshakeLimits {
        max_header_bytes: 8192,
        max_headers: 4,
    };
    assert_eq!(
        parse_request(RFC_SAMPLE, &tight).unwrap_err(),
        HandshakeError::TooManyHeaders { limit: 4 }
    );
}

#[test]
fn huge_max_headers_is_bounded_by_bytes() {
    for max_header_bytes in [8192, usize::MAX] {
        let limits = HandshakeLimits {
            max_header_bytes,
            max_headers: usize::MAX,
        };
        assert!(matches!(
            parse_request(RFC_SAMPLE, &limits),
            Ok(Parsed::Complete { .. })
        ));
        // 200 fields on the heap path: still counted against the limit exactly.
        let extra: Vec<(String, String)> =
            (0..200).map(|i| (format!("X-{i}"), "v".into())).collect();
        let extra: Vec<(&str, &str)> = extra
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        let req = good_with(&[], &extra);
        assert!(matches!(
            parse_request(&req, &limits),
            Ok(Parsed::Complete { .. })
        ));
        let tight = HandshakeLimits {
            max_header_bytes,
            max_headers: 204,
        };
        assert_eq!(
            parse_request(&req, &tight).unwrap_err(),
            HandshakeError::TooManyHeaders { limit: 204 }
        );
    }
}

// RFC 6455 §4.2.1 item 1; RFC 9110 §15.5.6: a 405 names the allowed methods.
#[test]
fn non_get_is_405_with_allow() {
    let e = refused(&build("POST /chat HTTP/1.1", GOOD_HEADERS, &[], &[]));
    assert_eq!(e, HandshakeError::MethodNotAllowed("POST".into()));
    assert_eq!(e.status(), 405);
    let resp = e.response();
    assert!(resp.starts_with(b"HTTP/1.1 405 Method Not Allowed\r\n"));
    assert!(has_header(&resp, "Allow: GET"));
    // Methods are case-sensitive (RFC 9110 §9.1).
    assert_eq!(
        refused(&build("get /chat HTTP/1.1", GOOD_HEADERS, &[], &[])).status(),
        405
    );
}

#[test]
fn http_1_0_is_400() {
    let e = refused(&build("GET /chat HTTP/1.0", GOOD_HEADERS, &[], &[]));
    assert_eq!(e, HandshakeError::HttpVersion);
    assert_eq!(e.status(), 400);
    assert!(e.response().starts_with(b"HTTP/1.1 400 Bad Request\r\n"));
}

#[test]
fn bad_request_targets_are_400() {
    let cases: &[(&str, HandshakeError)] = &[
        (
            "GET ws://server.example.com/chat HTTP/1.1",
            HandshakeError::AbsoluteTarget,
        ),
        (
            "GET http://server.example.com/chat HTTP/1.1",
            HandshakeError::AbsoluteTarget,
        ),
        ("GET chat HTTP/1.1", HandshakeError::InvalidTarget),
        ("GET * HTTP/1.1", HandshakeError::InvalidTarget),
        (
            "GET server.example.com:80 HTTP/1.1",
            HandshakeError::InvalidTarget,
        ),
        // RFC 6455 §3: fragment identifiers MUST NOT be used.
        ("GET /chat#frag HTTP/1.1", HandshakeError::FragmentInTarget),
    ];
    for (line, want) in cases {
        let e = refused(&build(line, GOOD_HEADERS, &[], &[]));
        assert_eq!(&e, want, "{line}");
        assert_eq!(e.status(), 400);
    }
}

#[test]
fn malformed_http_is_400() {
    for bad in [
        &b"GET /chat HTTP/1.1\r\nHost server\r\n\r\n"[..],
        b"GET /chat HTTP/1.1\r\nBad Name: x\r\n\r\n",
        b"GET /chat HTTP/2.0\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        b"GET /ch\x00at HTTP/1.1\r\n\r\n",
    ] {
        let e = refused(bad);
        assert!(matches!(e, HandshakeError::Malformed(_)), "{bad:?}: {e:?}");
        assert_eq!(e.status(), 400);
        assert!(e.response().starts_with(b"HTTP/1.1 400 Bad Request\r\n"));
    }
}

// RFC 6455 §4.2.1 item 2.
#[test]
fn host_is_required_once_and_visible_ascii() {
    assert_eq!(
        refused(&good_with(&["Host"], &[])),
        HandshakeError::MissingHost
    );
    assert_eq!(
        refused(&good_with(&[], &[("Host", "evil.example")])),
        HandshakeError::DuplicateHeader("Host")
    );
    assert_eq!(
        refused(&good_with(&["Host"], &[("Host", "")])),
        HandshakeError::InvalidHeaderValue("Host")
    );
    assert_eq!(
        refused(&good_with(&["Host"], &[("Host", "a b")])),
        HandshakeError::InvalidHeaderValue("Host")
    );
    assert_eq!(refused(&good_with(&["Host"], &[])).status(), 400);
}

// RFC 6455 §4.2.1 item 3, §4.2.2 step 4; RFC 9110 §15.5.22.
#[test]
fn missing_websocket_upgrade_is_426_with_upgrade() {
    for req in [
        good_with(&["Upgrade"], &[]),
        good_with(&["Upgrade"], &[("Upgrade", "h2c")]),
        good_with(&["Upgrade"], &[("Upgrade", "websocketx")]),
    ] {
        let e = refused(&req);
        assert_eq!(e, HandshakeError::NotWebSocketUpgrade);
        assert_eq!(e.status(), 426);
        let resp = e.response();
        assert!(resp.starts_with(b"HTTP/1.1 426 Upgrade Required\r\n"));
        assert!(has_header(&resp, "Upgrade: websocket"));
        assert!(has_header(&resp, "Connection: close"));
        // RFC 6455 §4.4, and README's table: every 426 says which version we speak.
        assert!(has_header(&resp, "Sec-WebSocket-Version: 13"));
    }
    // `Upgrade: h2c` with no version at all (issue 11) is the same 426.
    let e = refused(&good_with(
        &["Upgrade", "Sec-WebSocket-Version"],
        &[("Upgrade", "h2c")],
    ));
    assert_eq!(e, HandshakeError::NotWebSocketUpgrade);
    assert!(has_header(&e.response(), "Sec-WebSocket-Version: 13"));
}

// RFC 3986 §6.2.2: the request carries the normal form; the query is left as sent.
#[test]
fn the_path_is_normalised_and_the_query_kept() {
    for (target, path, query) in [
        ("/chat//room/./x", "/chat/room/x", None),
        (
            "/api/%2e%2e/%61dmin?token=a%2Fb&x=..//",
            "/admin",
            Some("token=a%2Fb&x=..//"),
        ),
        ("//?", "/", Some("")),
        ("/caf%c3%a9?q=%3F", "/caf%C3%A9", Some("q=%3F")),
    ] {
        let line = format!("GET {target} HTTP/1.1");
        let (req, _) = complete(&build(&line, GOOD_HEADERS, &[], &[]));
        assert_eq!(
            (req.path.as_str(), req.query.as_deref()),
            (path, query),
            "{target}"
        );
    }
}

#[test]
fn paths_without_a_safe_normal_form_are_400_with_a_reason() {
    for (target, reason) in [
        ("/admin%2f", "percent-encoded `/` not accepted"),
        ("/admin%3Fx=1", "percent-encoded `?` not accepted"),
        ("/admin;x", "`;` path parameters not accepted"),
        ("/a\\b", "`\\` not accepted"),
        ("/a%00", "control character"),
        ("/a%zz", "`%` not followed by two hex digits"),
        ("/caf\u{e9}", "raw non-ASCII byte; percent-encode it"),
    ] {
        let e = refused(&build(
            &format!("GET {target} HTTP/1.1"),
            GOOD_HEADERS,
            &[],
            &[],
        ));
        assert!(
            matches!(e, HandshakeError::InvalidPath(_)),
            "{target}: {e:?}"
        );
        assert_eq!(e.status(), 400);
        let (status, _, body) = split_response(&e.response());
        assert_eq!(status, "HTTP/1.1 400 Bad Request");
        assert_eq!(
            body,
            format!("invalid request path: {reason}\n"),
            "{target}"
        );
    }
}

// Issue 11 item 1: bytes >= 0x80 anywhere a field is read, at every position, and
// limits at their edges, give an answer and never a panic.
#[test]
fn non_ascii_and_boundary_inputs_never_panic() {
    let fields = [
        "Host",
        "Upgrade",
        "Connection",
        "Sec-WebSocket-Key",
        "Sec-WebSocket-Version",
        "Origin",
        "Sec-WebSocket-Protocol",
        "Sec-WebSocket-Extensions",
        "Content-Length",
        "Authorization",
    ];
    let values = [
        "\u{e9}",
        "abcdef\u{e9}",
        "\u{1F600}13",
        "13\u{e9}",
        "websocket\u{e9}, websocket",
        "permessage-deflate; a=\"\u{e9}\"",
        "permessage-deflate; a=\"\\\u{e9}\"",
        "x;\u{e9}=1",
        "\"",
        "\\",
        "dGhlIHNhbXBsZSBub25jZQ\u{e9}",
        "",
        " \t ",
    ];
    for field in fields {
        for value in values {
            let mut req = good_with(&[field], &[]);
            let at = req.len() - 2;
            req.splice(at..at, format!("{field}: {value}\r\n").into_bytes());
            // Anything is fine except a panic; a refusal names no header value.
            if let Err(e) = parse(&req) {
                assert!(!e.to_string().contains('\u{e9}'), "{field}: {value:?}: {e}");
            }
            for cut in 0..req.len() {
                let _ = parse(&req[..cut]);
            }
        }
    }
    for limit in [0, 1, 3, 17, RFC_SAMPLE.len() - 1, RFC_SAMPLE.len()] {
        for headers in [0, 1, 7] {
            let limits = HandshakeLimits {
                max_header_bytes: limit,
                max_headers: headers,
            };
            let _ = parse_request(RFC_SAMPLE, &limits);
            let _ = parse_request(b"", &limits);
        }
    }
}

// RFC 6455 §4.2.1 item 4.
#[test]
fn missing_connection_upgrade_is_400() {
    for req in [
        good_with(&["Connection"], &[]),
        good_with(&["Connection"], &[("Connection", "keep-alive")]),
        good_with(&["Connection"], &[("Connection", "upgrade-please")]),
    ] {
        let e = refused(&req);
        assert_eq!(e, HandshakeError::MissingConnectionUpgrade);
        assert_eq!(e.status(), 400);
    }
}

// RFC 6455 §4.2.1 items 3 and 4: ASCII case-insensitive tokens in comma lists.
#[test]
fn token_lists_are_case_insensitive() {
    let req = good_with(
        &["Upgrade", "Connection"],
        &[
            ("upgrade", "h2c, WebSocket"),
            ("CONNECTION", "keep-alive,UPGRADE"),
        ],
    );
    complete(&req);
    let req = good_with(
        &["Upgrade", "Connection"],
        &[
            ("Upgrade", "WEBSOCKET"),
            ("connection", " keep-alive ,\tuPgRaDe , "),
        ],
    );
    complete(&req);
    // The token may come in a second instance of the field.
    let req = good_with(
        &["Connection"],
        &[("Connection", "keep-alive"), ("Connection", "Upgrade")],
    );
    complete(&req);
}

// RFC 6455 §4.2.1 item 6, §4.4.
#[test]
fn version_must_be_13_else_426_with_version() {
    for (req, want) in [
        (
            good_with(&["Sec-WebSocket-Version"], &[]),
            HandshakeError::MissingVersion,
        ),
        (
            good_with(
                &["Sec-WebSocket-Version"],
                &[("Sec-WebSocket-Version", "8")],
            ),
            HandshakeError::UnsupportedVersion("8".into()),
        ),
        (
            good_with(
                &["Sec-WebSocket-Version"],
                &[("Sec-WebSocket-Version", "13, 8")],
            ),
            HandshakeError::UnsupportedVersion("13, 8".into()),
        ),
    ] {
        let e = refused(&req);
        assert_eq!(e, want);
        assert_eq!(e.status(), 426);
        let resp = e.response();
        assert!(resp.starts_with(b"HTTP/1.1 426 Upgrade Required\r\n"));
        assert!(has_header(&resp, "Sec-WebSocket-Version: 13"));
        assert!(has_header(&resp, "Upgrade: websocket"));
    }
    let e = refused(&good_with(&[], &[("Sec-WebSocket-Version", "13")]));
    assert_eq!(e, HandshakeError::DuplicateHeader("Sec-WebSocket-Version"));
    assert_eq!(e.status(), 400);
}

// RFC 6455 §4.2.1 item 5.
#[test]
fn key_must_be_one_base64_of_16_bytes() {
    let e = refused(&good_with(&["Sec-WebSocket-Key"], &[]));
    assert_eq!((e.clone(), e.status()), (HandshakeError::MissingKey, 400));
    let e = refused(&good_with(
        &[],
        &[("Sec-WebSocket-Key", "AAAAAAAAAAAAAAAAAAAAAA==")],
    ));
    assert_eq!(
        (e.clone(), e.status()),
        (HandshakeError::DuplicateHeader("Sec-WebSocket-Key"), 400)
    );
    for bad in [
        "",
        "dGhlIHNhbXBsZSBub25jZQ",       // unpadded
        "dGhlIHNhbXBsZSBub25jZQ=",      // short padding
        "dGhlIHNhbXBsZSBub25jZSE=",     // 17 bytes
        "dGhlIHNhbXBsZSBub25j",         // 15 bytes
        "dGhlIHNhbXBsZSBub25jZR==",     // non-canonical trailing bits
        "dGhlIHNhbXBsZSBub25jZQ==dGhl", // trailing data
        "dGhlIHNhbXBsZSBub25j*Q==",     // not base64
    ] {
        let e = refused(&good_with(
            &["Sec-WebSocket-Key"],
            &[("Sec-WebSocket-Key", bad)],
        ));
        assert_eq!(e, HandshakeError::InvalidKey, "{bad:?}");
        assert_eq!(e.status(), 400);
    }
}

#[test]
fn request_body_is_400() {
    for add in [("Content-Length", "5"), ("Transfer-Encoding", "chunked")] {
        assert_eq!(
            refused(&good_with(&[], &[add])),
            HandshakeError::BodyNotAllowed
        );
    }
    complete(&good_with(&[], &[("Content-Length", "0")]));
}

#[test]
fn origin_is_optional_single_and_ascii() {
    assert_eq!(complete(&good_with(&[], &[])).0.origin, None);
    assert_eq!(
        complete(&good_with(&[], &[("Origin", "null")]))
            .0
            .origin
            .as_deref(),
        Some("null")
    );
    assert_eq!(
        refused(&good_with(
            &[],
            &[("Origin", "https://a"), ("origin", "https://b")]
        )),
        HandshakeError::DuplicateHeader("Origin")
    );
}

// RFC 6455 §4.2.1 item 8, §11.3.4.
#[test]
fn protocols_across_repeated_headers_trimmed() {
    let req = good_with(
        &[],
        &[
            ("Sec-WebSocket-Protocol", " chat ,superchat,, "),
            ("sec-websocket-protocol", "v2.mqtt"),
        ],
    );
    assert_eq!(complete(&req).0.protocols, ["chat", "superchat", "v2.mqtt"]);
    let e = refused(&good_with(&[], &[("Sec-WebSocket-Protocol", "chat, a/b")]));
    assert_eq!(
        e,
        HandshakeError::InvalidProtocol("subprotocol is not a token")
    );
    assert_eq!(e.status(), 400);
}

// RFC 6455 §9.1 ABNF; RFC 7692 §7 parameters.
#[test]
fn extension_offers_are_parsed() {
    let req = good_with(
        &[],
        &[
            (
                "Sec-WebSocket-Extensions",
                "permessage-deflate; client_max_window_bits; server_max_window_bits=10, \
                 permessage-deflate ;client_max_window_bits=\"15\"",
            ),
            ("Sec-WebSocket-Extensions", "x-foo;a=\"b\\c\";d = e,,"),
        ],
    );
    let ext = complete(&req).0.extensions;
    let p = |n: &str, v: Option<&str>| (n.to_owned(), v.map(str::to_owned));
    assert_eq!(
        ext,
        [
            ExtensionOffer {
                name: "permessage-deflate".into(),
                params: vec![
                    p("client_max_window_bits", None),
                    p("server_max_window_bits", Some("10"))
                ],
            },
            ExtensionOffer {
                name: "permessage-deflate".into(),
                params: vec![p("client_max_window_bits", Some("15"))],
            },
            ExtensionOffer {
                name: "x-foo".into(),
                params: vec![p("a", Some("bc")), p("d", Some("e"))]
            },
        ]
    );
}

#[test]
fn malformed_extension_offers_are_400() {
    for (value, reason) in [
        ("; a", "expected an extension name"),
        ("deflate;", "expected a parameter name"),
        ("deflate; a=", "expected a parameter value"),
        ("deflate; a=\"15", "unterminated quoted string"),
        (
            "deflate; a=\"1 5\"",
            "quoted parameter value is not a token",
        ),
        ("deflate; a=\"\"", "quoted parameter value is not a token"),
        ("deflate x", "unexpected character"),
        ("deflate; a=b c", "unexpected character"),
    ] {
        let e = refused(&good_with(&[], &[("Sec-WebSocket-Extensions", value)]));
        assert_eq!(e, HandshakeError::InvalidExtensions(reason), "{value:?}");
        assert_eq!(e.status(), 400);
    }
}

#[test]
fn error_response_shape() {
    let resp = error_response(503, "too many connections", &[("Retry-After", "5")]);
    let (status, headers, body) = split_response(&resp);
    assert_eq!(status, "HTTP/1.1 503 Service Unavailable");
    assert_eq!(
        headers,
        [
            "Content-Type: text/plain; charset=utf-8",
            "Content-Length: 21",
            "Connection: close",
            "Retry-After: 5"
        ]
    );
    assert_eq!(body, "too many connections\n");
    // Multi-line text cannot break out of the body or a header line.
    let resp = error_response(403, "a\r\nb", &[("X-A", "1\r\nSet-Cookie: x")]);
    let (_, headers, body) = split_response(&resp);
    assert_eq!(body, "a  b\n");
    assert_eq!(headers.last().unwrap(), "X-A: 1  Set-Cookie: x");
    // A status the table lacks still yields a well-formed status line.
    assert!(error_response(0, "x", &[]).starts_with(b"HTTP/1.1 500 Internal Server Error\r\n"));
}

#[test]
fn reason_phrases_cover_edge_statuses() {
    for (code, phrase) in [
        (400, "Bad Request"),
        (401, "Unauthorized"),
        (403, "Forbidden"),
        (404, "Not Found"),
        (405, "Method Not Allowed"),
        (426, "Upgrade Required"),
        (429, "Too Many Requests"),
        (431, "Request Header Fields Too Large"),
        (500, "Internal Server Error"),
        (503, "Service Unavailable"),
    ] {
        let resp = error_response(code, "r", &[]);
        assert_eq!(split_response(&resp).0, format!("HTTP/1.1 {code} {phrase}"));
    }
}

#[test]
fn every_refusal_body_is_its_reason() {
    let e = HandshakeError::MissingKey;
    let (_, headers, body) = split_response(&e.response());
    assert_eq!(body, "missing Sec-WebSocket-Key header\n");
    assert!(headers.contains(&format!("Content-Length: {}", body.len())));
}
