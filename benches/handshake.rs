//! Cost of accepting one WebSocket connection's opening handshake (RFC 6455 §4.2): parse and
//! validate a typical browser request, then build the 101 response.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use ringway::protocol::handshake::{
    accept_key, parse_request, response_101, HandshakeLimits, Parsed,
};

/// What Chrome sends for `new WebSocket("wss://.../socket?room=42", ["chat.v2"])`.
const CHROME: &[u8] = b"GET /socket?room=42 HTTP/1.1\r\n\
Host: edge.example.com\r\n\
Connection: Upgrade\r\n\
Pragma: no-cache\r\n\
Cache-Control: no-cache\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36\r\n\
Upgrade: websocket\r\n\
Origin: https://app.example.com\r\n\
Sec-WebSocket-Version: 13\r\n\
Accept-Encoding: gzip, deflate, br, zstd\r\n\
Accept-Language: en-US,en;q=0.9\r\n\
Cookie: session=3f9a1c2e8b7d4a60\r\n\
Sec-WebSocket-Key: x3JJHMbDL1EzLkh9GBhXDw==\r\n\
Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\
Sec-WebSocket-Protocol: chat.v2\r\n\
\r\n";

fn handshake(c: &mut Criterion) {
    let limits = HandshakeLimits::default();
    let mut g = c.benchmark_group("handshake");
    g.throughput(Throughput::Elements(1));
    g.bench_function(format!("parse+101 chrome {}B", CHROME.len()), |b| {
        b.iter(|| match parse_request(black_box(CHROME), &limits) {
            Ok(Parsed::Complete { request, .. }) => {
                let proto = request.protocols.first().map(String::as_str);
                response_101(&request, proto)
            }
            other => panic!("benchmark request refused: {other:?}"),
        })
    });
    g.bench_function("parse only", |b| {
        b.iter(|| parse_request(black_box(CHROME), &limits))
    });
    g.bench_function("accept_key only", |b| {
        b.iter(|| accept_key(black_box(b"x3JJHMbDL1EzLkh9GBhXDw==")))
    });
    g.finish();
}

criterion_group!(benches, handshake);
criterion_main!(benches);
