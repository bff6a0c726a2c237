//! The TLS-then-WebSocket path of one session (src/session/transport.rs with the gateway's
//! own rustls configuration from src/tls/): a `Session::with_tls` driven sans-IO as the edge
//! worker drives it (on_bytes, seal_output, the driver's sends, timers, shutdown). rustls
//! parses the records; what is fuzzed is our glue around it. The first byte picks a mode:
//!
//! 0. arbitrary bytes as ciphertext, split at fuzzed points;
//! 1. a real rustls client's ClientHello, cut at a fuzzed length, then a fuzzed tail;
//! 2. a real client completes the handshake in memory, then sends the fuzzed bytes as
//!    plaintext (HTTP upgrade and frames) in records of fuzzed sizes, one ciphertext byte
//!    optionally flipped; the server's records go back to the client, which must read them.
//!
//! Nothing may panic; bytes that are not TLS are never answered; the session's queue stays
//! bounded; every failure is counted once and ends the connection.
#![no_main]
use std::cell::RefCell;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use ringway::config::{CertificateConfig, Config, Upstream};
use ringway::ids::ConnId;
use ringway::route::RouteTable;
use ringway::session::compression::SharedCodec;
use ringway::session::{Context, Count, Meter, Output, Session};
use ringway::tls::TlsServer;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, ServerConnection};

struct Fixed {
    config: Config,
    routes: RouteTable,
    server: Arc<rustls::ServerConfig>,
    client: Arc<ClientConfig>,
    /// A ClientHello as a real client sends it (recorded once).
    hello: Vec<u8>,
}

fn fixed() -> &'static Fixed {
    static FIXED: OnceLock<Fixed> = OnceLock::new();
    FIXED.get_or_init(|| {
        let keys = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/keys/tls");
        let server = TlsServer::new(&[CertificateConfig {
            cert: keys.join("ec-sec1.pem"),
            key: keys.join("ec-sec1.key"),
        }])
        .expect("fixture certificate loads")
        .config();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut client = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
            .with_no_client_auth();
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        let client = Arc::new(client);
        let mut c = new_client(&client);
        let mut hello = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut hello).unwrap();
        }
        let config = Config {
            upstream: Upstream::LocalEcho,
            handshake_timeout_ms: 1000,
            ..Config::default()
        };
        let routes = RouteTable::from_config(&config).unwrap();
        Fixed {
            config,
            routes,
            server,
            client,
            hello,
        }
    })
}

fn new_client(config: &Arc<ClientConfig>) -> ClientConnection {
    ClientConnection::new(config.clone(), ServerName::try_from("sec1.test").unwrap()).unwrap()
}

#[derive(Default)]
struct Tally(RefCell<Vec<Count>>);

impl Meter for Tally {
    fn count(&self, what: Count) {
        self.0.borrow_mut().push(what);
    }
}

impl Tally {
    fn tls_failures(&self) -> usize {
        self.0
            .borrow()
            .iter()
            .filter(|c| matches!(c, Count::TlsFailure(_)))
            .count()
    }
}

/// One session over TLS and what its driver holds.
struct Driver {
    s: Session,
    meter: Tally,
    scratch: Vec<u8>,
    codec: SharedCodec,
    out: Vec<Output>,
    now: u64,
    /// Every byte the session put on the wire.
    wire: Vec<u8>,
}

impl Driver {
    fn new(f: &Fixed) -> Driver {
        let s = Session::new(ConnId::new(0, 1, 0), None, f.config.message_limits(), 0)
            .with_tls(ServerConnection::new(f.server.clone()).unwrap());
        Driver {
            s,
            meter: Tally::default(),
            scratch: Vec::new(),
            codec: SharedCodec::default(),
            out: Vec::new(),
            now: 0,
            wire: Vec::new(),
        }
    }

    /// Ciphertext from the client, as one ring buffer's worth; then what the worker does
    /// after every event: seal, send everything queued (completing at once), poll shutdown.
    fn feed(&mut self, f: &Fixed, bytes: &[u8]) {
        if self.s.reading_done() {
            return;
        }
        let mut data = bytes.to_vec();
        let mut cx = Context {
            now_ms: self.now,
            unix_ms: 1_700_000_000_000 + self.now,
            config: &f.config,
            routes: &f.routes,
            meter: &self.meter,
            relay: false,
            scratch: &mut self.scratch,
            codec: &mut self.codec,
            panic_on: None,
            out: &mut self.out,
        };
        self.s.on_bytes(&mut cx, &mut data);
        self.out.clear();
        self.send();
    }

    fn send(&mut self) {
        self.s.seal_output();
        // The records rustls made plus the session's own queue stay bounded.
        assert!(self.s.footprint() <= 4 << 20, "{}", self.s.footprint());
        while !self.s.queued().is_empty() {
            let mut bytes = 0;
            for item in self.s.queued() {
                self.wire.extend_from_slice(item);
                bytes += item.len();
            }
            self.s.start_send(self.s.queued().len());
            self.s.on_sent(bytes);
            self.s.seal_output();
        }
        let _ = self.s.poll_shutdown(self.now, false);
    }

    /// The client's FIN (if `eof`), then the handshake deadline passes: a session still
    /// handshaking must end, its failure counted once.
    fn expire(&mut self, f: &Fixed, eof: bool) {
        self.now += f.config.handshake_timeout_ms + 1;
        let mut cx = Context {
            now_ms: self.now,
            unix_ms: 1_700_000_000_000 + self.now,
            config: &f.config,
            routes: &f.routes,
            meter: &self.meter,
            relay: false,
            scratch: &mut self.scratch,
            codec: &mut self.codec,
            panic_on: None,
            out: &mut self.out,
        };
        if eof {
            self.s.on_peer_closed(&mut cx, false);
        }
        for _ in 0..8 {
            if self.s.handle_timeout(&mut cx, None).is_none() {
                break;
            }
        }
        self.out.clear();
        self.send();
    }
}

/// Split `data` into pieces whose sizes come from `sizes` (cycled), 1..=4096 bytes each.
fn pieces<'a>(data: &'a [u8], sizes: &[u8]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    let mut k = 0;
    while !rest.is_empty() {
        let want = match sizes.get(k % sizes.len().max(1)) {
            Some(&b) => 1 + (b as usize) * 16,
            None => rest.len(),
        };
        let (a, b) = rest.split_at(want.min(rest.len()));
        out.push(a);
        rest = b;
        k += 1;
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    let f = fixed();
    let (sizes, body) = data.split_at(data.len().min(4));
    let mut d = Driver::new(f);
    match mode % 3 {
        0 => {
            for p in pieces(body, sizes) {
                d.feed(f, p);
            }
            if body.first().is_some_and(|&b| b != 0x16) {
                // Not a TLS record: dropped unread, unanswered, counted once.
                assert!(d.wire.is_empty());
                assert!(d.s.reading_done());
                assert_eq!(d.meter.tls_failures(), 1);
            }
        }
        1 => {
            let cut = match sizes.first() {
                Some(&b) => f.hello.len() * b as usize / 255,
                None => f.hello.len(),
            };
            let mut input = f.hello[..cut].to_vec();
            input.extend_from_slice(body);
            for p in pieces(&input, &sizes[sizes.len().min(1)..]) {
                d.feed(f, p);
            }
        }
        _ => live(f, &mut d, sizes, body),
    }
    d.expire(f, sizes.get(1).is_some_and(|b| b & 1 == 1));
    // However it went, TLS failed at most once and a failed session reads nothing more.
    let failures = d.meter.tls_failures();
    assert!(failures <= 1);
    if failures == 1 {
        assert!(d.s.reading_done());
    }
});

/// Mode 2: a real handshake, then fuzzed plaintext in records of fuzzed sizes.
fn live(f: &Fixed, d: &mut Driver, sizes: &[u8], body: &[u8]) {
    let mut c = new_client(&f.client);
    let mut rounds = 0;
    while c.is_handshaking() {
        rounds += 1;
        assert!(rounds < 10, "handshake does not finish");
        let mut buf = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut buf).unwrap();
        }
        d.feed(f, &buf);
        to_client(&mut c, &mut d.wire).expect("the server's handshake records are valid");
    }
    assert_eq!(d.meter.tls_failures(), 0);
    // Plaintext in records of the fuzzed sizes (each write() is one record or more).
    for p in pieces(body, sizes) {
        c.writer().write_all(p).unwrap();
    }
    let mut cipher = Vec::new();
    while c.wants_write() {
        c.write_tls(&mut cipher).unwrap();
    }
    let flip = sizes.first().map(|&b| b as usize * 7919);
    if let Some(at) = flip.filter(|at| at % 5 == 0 && !cipher.is_empty()) {
        let i = at % cipher.len();
        cipher[i] ^= 0x40;
    }
    for p in pieces(&cipher, &sizes[sizes.len().min(2)..]) {
        d.feed(f, p);
    }
    // Whatever the session answered (101 or 400, frames, close, alert) is valid TLS unless
    // it was an alert after our flipped byte.
    let before = d.meter.tls_failures();
    let read = to_client(&mut c, &mut d.wire);
    if before == 0 {
        let plain = read.expect("the server's records are valid");
        assert!(
            plain.is_empty() || plain.starts_with(b"HTTP/1.1 "),
            "{:?}",
            String::from_utf8_lossy(&plain[..plain.len().min(64)])
        );
    }
}

/// The session's records to the client; the plaintext it read.
fn to_client(c: &mut ClientConnection, wire: &mut Vec<u8>) -> Result<Vec<u8>, rustls::Error> {
    let bytes = std::mem::take(wire);
    let mut input = &bytes[..];
    let mut plain = Vec::new();
    while !input.is_empty() {
        match c.read_tls(&mut input) {
            Ok(0) => break,
            Ok(_) => {}
            Err(_) => break,
        }
        c.process_new_packets()?;
        let _ = c.reader().read_to_end(&mut plain);
    }
    Ok(plain)
}

/// The fuzz client trusts any certificate; handshake signatures are still checked.
#[derive(Debug)]
struct AnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
