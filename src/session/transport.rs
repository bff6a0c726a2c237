//! A session's transport: plain TCP, or TLS with one rustls `ServerConnection`. Sans-IO like
//! the rest of the session: ciphertext comes in as a slice of the ring's buffer
//! (`on_bytes`), its plaintext goes to the frame path (`Session::on_plaintext`, which parses
//! and unmasks in place as for plain TCP); the plaintext the session queued (101, frames,
//! errors) is encrypted into records the driver sends (`seal_output`, `queued`).
//!
//! Data path: ring -> worker -> **transport** (read_tls -> process_new_packets -> plaintext)
//! -> frames -> message ...; outbound queue -> **transport** (records) -> worker -> ring.
//!
//! A topic frame is still encoded once per core: each subscriber's transport encrypts the
//! same shared bytes. The TLS handshake is part of the opening handshake: it counts against
//! `handshake_timeout_ms`; a stalled one is dropped at the deadline; bytes that are not a
//! TLS record (plaintext HTTP) are dropped without reading further; every failure is counted
//! by reason (`ringway_tls_handshake_failures_total`) and logged at debug without secrets.

use std::cell::Cell;
use std::io::{Read, Write};

use bytes::Bytes;
use rustls::ServerConnection;

use super::queue::Outbound;
use super::{Context, Count, Session};

/// What a TLS connection is charged against the memory budget besides its queued records,
/// while handshaking: the handshake state, the transcript and the record buffer, which
/// holds up to one 16 KiB record.
pub const TLS_HANDSHAKE_BYTES: usize = 24 * 1024;

/// The same once open: the record layer's keys and state, and the read buffer (records
/// are decrypted where they lie, then handed on).
pub const TLS_OPEN_BYTES: usize = 8 * 1024;

/// rustls' own outbound buffers (plaintext waiting for the handshake, records not yet
/// taken) are bounded by this; the session moves records out at once.
pub const TLS_BUFFER_LIMIT: usize = 64 * 1024;

/// Records queued for the kernel beyond which no more plaintext is encrypted until some
/// leave: the rest waits in the session's queue, where the send-queue cap sees it.
const WIRE_HIGH: usize = 64 * 1024;

/// The per-core buffer plaintext is decrypted into before the frame path parses it.
const PLAIN_CHUNK: usize = 32 * 1024;

/// The first byte of a TLS handshake record (RFC 8446 §5.1, ContentType handshake).
const HANDSHAKE_RECORD: u8 = 0x16;

thread_local! {
    /// One plaintext buffer per core thread, lent to one connection at a time.
    static PLAIN: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

/// Every `reason` label of `ringway_tls_handshake_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TlsFailure {
    /// The first bytes looked like plaintext HTTP, not a TLS record.
    PlaintextHttp,
    /// The first bytes were neither TLS nor HTTP.
    NotTls,
    /// No complete TLS handshake within `handshake_timeout_ms`.
    HandshakeTimeout,
    /// The client offered only ALPN protocols we do not speak (`h2`).
    NoApplicationProtocol,
    /// No TLS version, cipher suite, group or signature scheme in common.
    PeerIncompatible,
    /// The client sent an alert (for instance: it does not trust our certificate).
    AlertReceived,
    /// Malformed or out-of-order TLS messages, or records that do not decrypt.
    ProtocolViolation,
    /// The client closed TCP before the handshake finished, without an alert (a port
    /// probe, a client that gave up, half a ClientHello).
    EofDuringHandshake,
    Other,
}

impl TlsFailure {
    pub const ALL: [TlsFailure; 9] = [
        TlsFailure::PlaintextHttp,
        TlsFailure::NotTls,
        TlsFailure::HandshakeTimeout,
        TlsFailure::NoApplicationProtocol,
        TlsFailure::PeerIncompatible,
        TlsFailure::AlertReceived,
        TlsFailure::ProtocolViolation,
        TlsFailure::EofDuringHandshake,
        TlsFailure::Other,
    ];

    pub fn label(self) -> &'static str {
        match self {
            TlsFailure::PlaintextHttp => "plaintext_http",
            TlsFailure::NotTls => "not_tls",
            TlsFailure::HandshakeTimeout => "handshake_timeout",
            TlsFailure::NoApplicationProtocol => "no_application_protocol",
            TlsFailure::PeerIncompatible => "peer_incompatible",
            TlsFailure::AlertReceived => "alert_received",
            TlsFailure::ProtocolViolation => "protocol_violation",
            TlsFailure::EofDuringHandshake => "eof_during_handshake",
            TlsFailure::Other => "other",
        }
    }

    fn of(e: &rustls::Error) -> TlsFailure {
        use rustls::Error as E;
        match e {
            E::NoApplicationProtocol => TlsFailure::NoApplicationProtocol,
            E::PeerIncompatible(_) => TlsFailure::PeerIncompatible,
            E::AlertReceived(_) => TlsFailure::AlertReceived,
            E::InvalidMessage(_)
            | E::InappropriateMessage { .. }
            | E::InappropriateHandshakeMessage { .. }
            | E::PeerMisbehaved(_)
            | E::DecryptError => TlsFailure::ProtocolViolation,
            _ => TlsFailure::Other,
        }
    }
}

/// How the session's bytes travel.
#[derive(Debug, Default)]
pub(super) enum Transport {
    #[default]
    Plain,
    Tls(Box<Tls>),
}

#[derive(Debug)]
pub(super) struct Tls {
    conn: ServerConnection,
    /// Records for the kernel, in order; the driver sends these instead of the plaintext.
    wire: Outbound,
    /// Something arrived (the first byte decides TLS or not).
    started: bool,
    /// The TLS layer failed: nothing more is read or encrypted (an alert may still leave).
    failed: bool,
    /// Our close_notify is queued.
    notified: bool,
}

impl Tls {
    /// Move every record rustls has ready (handshake messages, alerts, data) to `wire`.
    fn flush_records(&mut self) {
        if !self.conn.wants_write() {
            return;
        }
        let mut buf = Vec::new();
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        if !buf.is_empty() {
            self.wire.push(Bytes::from(buf));
        }
    }
}

impl Transport {
    /// A TLS handshake is in progress (and has not failed).
    pub(super) fn handshaking(&self) -> bool {
        matches!(self, Transport::Tls(t) if !t.failed && t.conn.is_handshaking())
    }

    /// Bytes the transport holds: rustls' state and buffers, and queued records.
    pub(super) fn heap_bytes(&self) -> usize {
        match self {
            Transport::Plain => 0,
            Transport::Tls(t) => {
                let state = if t.conn.is_handshaking() {
                    TLS_HANDSHAKE_BYTES
                } else {
                    TLS_OPEN_BYTES
                };
                state + t.wire.heap_bytes()
            }
        }
    }

    /// Records waiting for the kernel (TLS only).
    pub(super) fn records(&self) -> Option<&Outbound> {
        match self {
            Transport::Plain => None,
            Transport::Tls(t) => Some(&t.wire),
        }
    }
}

impl Session {
    /// Serve this connection over TLS with `conn` (built from the listener's `ServerConfig`).
    pub fn with_tls(mut self, mut conn: ServerConnection) -> Session {
        conn.set_buffer_limit(Some(TLS_BUFFER_LIMIT));
        self.transport = Transport::Tls(Box::new(Tls {
            conn,
            wire: Outbound::default(),
            started: false,
            failed: false,
            notified: false,
        }));
        self
    }

    pub fn is_tls(&self) -> bool {
        matches!(self.transport, Transport::Tls(_))
    }

    /// The queue whose bytes go on the wire: the session's own, or the TLS records.
    pub(super) fn wire(&self) -> &Outbound {
        match &self.transport {
            Transport::Plain => &self.out,
            Transport::Tls(t) => &t.wire,
        }
    }

    pub(super) fn wire_mut(&mut self) -> &mut Outbound {
        match &mut self.transport {
            Transport::Plain => &mut self.out,
            Transport::Tls(t) => &mut t.wire,
        }
    }

    /// Bytes from the client, where the kernel put them: plaintext goes straight to the
    /// frame path, TLS records through rustls first.
    pub fn on_bytes(&mut self, cx: &mut Context<'_>, data: &mut [u8]) {
        match self.transport {
            Transport::Plain => self.on_plaintext(cx, data),
            Transport::Tls(_) => self.on_records(cx, data),
        }
    }

    fn on_records(&mut self, cx: &mut Context<'_>, data: &[u8]) {
        let Transport::Tls(tls) = &mut self.transport else {
            return;
        };
        if tls.failed {
            return;
        }
        if !tls.started {
            tls.started = true;
            if data.first() != Some(&HANDSHAKE_RECORD) {
                // Not a ClientHello: nothing more is read, no alert is sent.
                let why = if data.first().is_some_and(u8::is_ascii_alphabetic) {
                    TlsFailure::PlaintextHttp
                } else {
                    TlsFailure::NotTls
                };
                self.tls_failed(cx, why, &"the first bytes are not a TLS record");
                return;
            }
        }
        self.last_rx_ms = cx.now_ms;
        let mut plain = PLAIN.take();
        plain.resize(PLAIN_CHUNK, 0);
        let mut input = data;
        while !input.is_empty() {
            let Transport::Tls(tls) = &mut self.transport else {
                break;
            };
            match tls.conn.read_tls(&mut input) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    self.tls_failed(cx, TlsFailure::Other, &e);
                    break;
                }
            }
            let state = tls.conn.process_new_packets();
            // Handshake messages and alerts leave whatever happened.
            tls.flush_records();
            if let Err(e) = state {
                self.tls_failed(cx, TlsFailure::of(&e), &e);
                break;
            }
            // Ok(0) is the client's close_notify (its TCP FIN follows); WouldBlock: all read.
            while let Transport::Tls(tls) = &mut self.transport {
                match tls.conn.reader().read(&mut plain) {
                    Ok(n) if n > 0 => self.on_plaintext(cx, &mut plain[..n]),
                    _ => break,
                }
            }
        }
        PLAIN.set(plain);
        self.seal_output();
    }

    /// The TLS layer failed: count and log it, and end the connection: at once when the
    /// peer does not speak TLS (or stalled), else after rustls' alert leaves.
    fn tls_failed(&mut self, cx: &mut Context<'_>, why: TlsFailure, err: &dyn std::fmt::Display) {
        self.record_tls_failure(cx, why, err);
        self.out.clear();
        self.stop_reading();
        match why {
            TlsFailure::PlaintextHttp | TlsFailure::NotTls | TlsFailure::HandshakeTimeout => {
                self.abort()
            }
            _ => self.drain(),
        }
    }

    /// TCP EOF from the client (no alert came, or the failure is counted already): a TLS
    /// handshake still unfinished has failed. Counted once; nothing more is read.
    pub(super) fn tls_eof(&mut self, cx: &mut Context<'_>) {
        if !self.transport.handshaking() {
            return;
        }
        let why = TlsFailure::EofDuringHandshake;
        self.record_tls_failure(cx, why, &"closed during the handshake");
    }

    /// Count, log and note (for the access log) a TLS failure, and mark the layer failed.
    fn record_tls_failure(
        &mut self,
        cx: &mut Context<'_>,
        why: TlsFailure,
        err: &dyn std::fmt::Display,
    ) {
        cx.meter.count(Count::TlsFailure(why));
        tracing::debug!(conn = %self.id, reason = why.label(), "TLS failed: {err}");
        self.note = Some(format!("tls {}", why.label()).into());
        if let Transport::Tls(tls) = &mut self.transport {
            tls.failed = true;
        }
    }

    /// The handshake deadline passed with the TLS handshake unfinished.
    pub(super) fn tls_handshake_timed_out(&mut self, cx: &mut Context<'_>) {
        self.tls_failed(
            cx,
            TlsFailure::HandshakeTimeout,
            &"TLS handshake not completed in time",
        );
    }

    /// Encrypt what the session queued into records for the driver to send (up to
    /// `WIRE_HIGH` of them at a time), and our close_notify once the last bytes are in.
    /// Nothing for plain TCP. The driver calls it after every event, before it sends.
    pub fn seal_output(&mut self) {
        // Nothing more will be queued: once the rest is in, our close_notify follows.
        let draining = self.is_draining();
        let Transport::Tls(tls) = &mut self.transport else {
            return;
        };
        if tls.failed || tls.conn.is_handshaking() {
            tls.flush_records();
            return;
        }
        while !self.out.is_empty() && tls.wire.bytes() < WIRE_HIGH {
            let mut progressed = false;
            while let Some(front) = self.out.items().front().cloned() {
                let n = tls.conn.writer().write(&front).unwrap_or(0);
                if n == 0 {
                    break;
                }
                self.out.advance(n);
                progressed = true;
                if n < front.len() {
                    break; // rustls' buffer limit: take its records first
                }
            }
            tls.flush_records();
            if !progressed {
                break;
            }
        }
        if draining && self.out.is_empty() && !tls.notified {
            tls.notified = true;
            tls.conn.send_close_notify();
            tls.flush_records();
        }
    }
}

/// The transport with no sockets: a rustls client on the other side of byte vectors, split
/// anywhere, through the session's frame path (local echo) and timers.
#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::sync::Arc;

    use bytes::BytesMut;
    use rustls::pki_types::{PrivateKeyDer, ServerName};
    use rustls::ClientConnection;

    use super::*;
    use crate::config::{Config, Upstream};
    use crate::ids::ConnId;
    use crate::protocol::frame::{write_client_frame, OpCode};
    use crate::route::RouteTable;
    use crate::session::{Meter, Shutdown};

    #[derive(Default)]
    struct Recorder(RefCell<Vec<Count>>);

    impl Meter for Recorder {
        fn count(&self, what: Count) {
            self.0.borrow_mut().push(what);
        }
    }

    fn configs() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
            )
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der().clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    }

    struct Pipe {
        config: Config,
        routes: RouteTable,
        meter: Recorder,
        scratch: Vec<u8>,
        codec: super::super::compression::SharedCodec,
        out: Vec<super::super::Output>,
        now: u64,
        s: Session,
        client: ClientConnection,
        /// Server bytes are fed to the session in pieces of this size.
        piece: usize,
    }

    impl Pipe {
        fn new(piece: usize) -> Pipe {
            let (server, client) = configs();
            let config = Config {
                upstream: Upstream::LocalEcho,
                handshake_timeout_ms: 1000,
                ..Config::default()
            };
            let routes = RouteTable::from_config(&config).unwrap();
            let s = Session::new(ConnId::new(0, 1, 0), None, config.message_limits(), 0)
                .with_tls(ServerConnection::new(server).unwrap());
            let name = ServerName::try_from("localhost").unwrap();
            Pipe {
                config,
                routes,
                meter: Recorder::default(),
                scratch: Vec::new(),
                codec: Default::default(),
                out: Vec::new(),
                now: 0,
                s,
                client: ClientConnection::new(client, name).unwrap(),
                piece,
            }
        }

        fn with<R>(&mut self, f: impl FnOnce(&mut Session, &mut Context<'_>) -> R) -> R {
            let mut cx = Context {
                now_ms: self.now,
                unix_ms: 1_700_000_000_000 + self.now,
                config: &self.config,
                routes: &self.routes,
                meter: &self.meter,
                relay: false,
                scratch: &mut self.scratch,
                codec: &mut self.codec,
                panic_on: None,
                out: &mut self.out,
            };
            f(&mut self.s, &mut cx)
        }

        /// Raw bytes to the session, in pieces.
        fn feed(&mut self, bytes: &[u8]) {
            for piece in bytes.chunks(self.piece) {
                let mut data = piece.to_vec();
                self.with(|s, cx| s.on_bytes(cx, &mut data));
                self.s.seal_output();
            }
        }

        /// Whatever the client has to send, to the session.
        fn client_to_server(&mut self) {
            let mut buf = Vec::new();
            while self.client.wants_write() {
                self.client.write_tls(&mut buf).unwrap();
            }
            self.feed(&buf);
        }

        /// Everything the session queued, to the client (the driver's sends complete at
        /// once); returns the plaintext the client read.
        fn server_to_client(&mut self) -> Vec<u8> {
            let mut wire = Vec::new();
            while !self.s.queued().is_empty() {
                for item in self.s.queued() {
                    wire.extend_from_slice(item);
                }
                let (n, bytes) = (self.s.queued().len(), self.s.wire().bytes());
                self.s.start_send(n);
                self.s.on_sent(bytes);
            }
            let mut input = &wire[..];
            let mut plain = Vec::new();
            while !input.is_empty() {
                self.client.read_tls(&mut input).unwrap();
                self.client.process_new_packets().unwrap();
                let _ = self.client.reader().read_to_end(&mut plain);
            }
            plain
        }

        fn open(&mut self) {
            while self.client.is_handshaking() {
                self.client_to_server();
                self.server_to_client();
            }
            self.client
                .writer()
                .write_all(
                    b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
                      Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                      Sec-WebSocket-Version: 13\r\n\r\n",
                )
                .unwrap();
            self.client_to_server();
            let head = self.server_to_client();
            assert!(head.starts_with(b"HTTP/1.1 101"), "{head:?}");
            assert!(!self.s.transport.handshaking());
            self.meter.0.borrow_mut().clear();
        }

        fn send_frame(&mut self, opcode: OpCode, payload: &[u8], writes: usize) {
            let mut buf = BytesMut::new();
            write_client_frame(&mut buf, true, opcode, [9, 8, 7, 6], payload);
            // Several writes: several TLS records for one frame.
            let step = buf.len().div_ceil(writes);
            for part in buf.chunks(step) {
                self.client.writer().write_all(part).unwrap();
            }
            self.client_to_server();
        }
    }

    /// The server frame at the front of `plain`: (opcode bits, payload).
    fn server_frame(plain: &[u8]) -> (u8, Vec<u8>) {
        let (len, at) = match plain[1] & 0x7f {
            126 => (u16::from_be_bytes([plain[2], plain[3]]) as usize, 4),
            127 => (
                u64::from_be_bytes(plain[2..10].try_into().unwrap()) as usize,
                10,
            ),
            n => (n as usize, 2),
        };
        assert_eq!(plain.len(), at + len, "one frame");
        (plain[0] & 0x0f, plain[at..].to_vec())
    }

    #[test]
    fn frames_split_across_records_and_reads_are_echoed() {
        for piece in [1, 7, 100, 16 * 1024 + 5, 1 << 20] {
            let mut p = Pipe::new(piece);
            p.open();
            let payload: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
            p.send_frame(OpCode::Binary, &payload, 3);
            let (op, echoed) = server_frame(&p.server_to_client());
            assert_eq!((op, echoed == payload), (0x2, true), "piece {piece}");
            p.send_frame(OpCode::Text, b"small", 1);
            assert_eq!(
                server_frame(&p.server_to_client()),
                (0x1, b"small".to_vec())
            );
            assert!(p
                .meter
                .0
                .borrow()
                .iter()
                .all(|c| !matches!(c, Count::TlsFailure(_))));
        }
    }

    #[test]
    fn a_close_is_answered_then_close_notify_then_fin() {
        let mut p = Pipe::new(4096);
        p.open();
        p.send_frame(OpCode::Close, &1000u16.to_be_bytes(), 1);
        let (op, body) = server_frame(&p.server_to_client());
        assert_eq!((op, &body[..2]), (0x8, &1000u16.to_be_bytes()[..]));
        // The client read our close_notify: its reader reports a clean end.
        let mut rest = Vec::new();
        assert_eq!(p.client.reader().read_to_end(&mut rest).unwrap(), 0);
        assert_eq!(p.s.poll_shutdown(p.now, false), Some(Shutdown::Write));
    }

    #[test]
    fn plaintext_http_is_dropped_unread_and_counted() {
        let mut p = Pipe::new(4096);
        p.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(p.s.queued().is_empty(), "nothing is answered");
        assert_eq!(p.s.poll_shutdown(0, false), Some(Shutdown::Both));
        assert_eq!(
            p.meter.0.borrow()[..],
            [Count::TlsFailure(TlsFailure::PlaintextHttp)]
        );
    }

    #[test]
    fn a_stalled_tls_handshake_is_dropped_at_the_deadline() {
        let mut p = Pipe::new(4096);
        // Half a ClientHello.
        let mut hello = Vec::new();
        while p.client.wants_write() {
            p.client.write_tls(&mut hello).unwrap();
        }
        p.feed(&hello[..hello.len() / 2]);
        assert!(p.s.transport.handshaking());
        assert_eq!(
            p.s.poll_timeout(&p.config, None),
            Some(p.config.handshake_timeout_ms)
        );
        p.now = p.config.handshake_timeout_ms;
        p.with(|s, cx| s.handle_timeout(cx, None));
        assert_eq!(p.s.poll_shutdown(p.now, false), Some(Shutdown::Both));
        assert_eq!(
            p.meter.0.borrow()[..],
            [Count::TlsFailure(TlsFailure::HandshakeTimeout)]
        );
    }

    #[test]
    fn eof_during_the_tls_handshake_is_counted_once() {
        // Half a ClientHello, then FIN; and FIN with nothing sent at all.
        for half in [true, false] {
            let mut p = Pipe::new(4096);
            if half {
                let mut hello = Vec::new();
                while p.client.wants_write() {
                    p.client.write_tls(&mut hello).unwrap();
                }
                p.feed(&hello[..hello.len() / 2]);
            }
            p.with(|s, cx| s.on_peer_closed(cx, false));
            assert_eq!(
                p.meter.0.borrow()[..],
                [Count::TlsFailure(TlsFailure::EofDuringHandshake)]
            );
            assert!(!p.s.transport.handshaking());
            // The handshake deadline then finds nothing left to count.
            p.now = p.config.handshake_timeout_ms;
            p.with(|s, cx| s.handle_timeout(cx, None));
            assert_eq!(p.meter.0.borrow().len(), 1);
            assert_eq!(p.s.poll_shutdown(p.now, false), Some(Shutdown::Both));
        }
        // After the handshake, EOF is no TLS failure.
        let mut p = Pipe::new(4096);
        p.open();
        p.with(|s, cx| s.on_peer_closed(cx, false));
        assert!(p.meter.0.borrow().is_empty());
    }

    #[test]
    fn a_corrupted_record_is_a_counted_protocol_violation_with_an_alert() {
        let mut p = Pipe::new(4096);
        p.open();
        let mut buf = BytesMut::new();
        write_client_frame(&mut buf, true, OpCode::Text, [1, 2, 3, 4], b"hello");
        p.client.writer().write_all(&buf).unwrap();
        let mut record = Vec::new();
        while p.client.wants_write() {
            p.client.write_tls(&mut record).unwrap();
        }
        let last = record.len() - 1;
        record[last] ^= 0x55;
        p.feed(&record);
        assert_eq!(
            p.meter.0.borrow()[..],
            [Count::TlsFailure(TlsFailure::ProtocolViolation)]
        );
        assert!(!p.s.queued().is_empty(), "the alert leaves");
        assert!(p.s.reading_done());
    }
}
