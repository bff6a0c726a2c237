//! Arbitrary bytes as a client's opening handshake (RFC 6455 §4.2.1): the parser must answer
//! Partial, Complete or a refusal with a well-formed response, never panic, and never read
//! past what it reports as consumed.
#![no_main]
use libfuzzer_sys::fuzz_target;
use ringway::protocol::handshake::{parse_request, response_101, HandshakeLimits, Parsed};

fuzz_target!(|data: &[u8]| {
    let limits = HandshakeLimits::default();
    match parse_request(data, &limits) {
        Ok(Parsed::Partial) => assert!(data.len() < limits.max_header_bytes),
        Ok(Parsed::Complete { request, consumed }) => {
            assert!(consumed <= data.len() && consumed <= limits.max_header_bytes);
            let resp = response_101(&request, request.protocols.first().map(String::as_str));
            assert!(resp.starts_with(b"HTTP/1.1 101 Switching Protocols\r\n"));
            assert!(resp.ends_with(b"\r\n\r\n"));
        }
        Err(e) => {
            let resp = e.response();
            assert!(resp.starts_with(format!("HTTP/1.1 {} ", e.status()).as_bytes()));
        }
    }
});
