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
use std::io::{ErrorKind, Read, Write};

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
    Other,
}

impl TlsFailure {
    pub const ALL: [TlsFailure; 8] = [
        TlsFailure::PlaintextHttp,
        TlsFailure::NotTls,
        TlsFailure::HandshakeTimeout,
        TlsFailure::NoApplicationProtocol,
        TlsFailure::PeerIncompatible,
        TlsFailure::AlertReceived,
        TlsFailure::ProtocolViolation,
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
            loop {
                let Transport::Tls(tls) = &mut self.transport else {
                    break;
                };
                match tls.conn.reader().read(&mut plain) {
                    // 0: the client's close_notify; its TCP FIN follows.
                    Ok(0) => break,
                    Ok(n) => self.on_plaintext(cx, &mut plain[..n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => break,
                }
            }
        }
        PLAIN.set(plain);
        self.seal_output();
    }

    /// The TLS layer failed: count and log it, and end the connection: at once when the
    /// peer does not speak TLS (or stalled), else after rustls' alert leaves.
    fn tls_failed(&mut self, cx: &mut Context<'_>, why: TlsFailure, err: &dyn std::fmt::Display) {
        cx.meter.count(Count::TlsFailure(why));
        tracing::debug!(conn = %self.id, reason = why.label(), "TLS failed: {err}");
        if let Transport::Tls(tls) = &mut self.transport {
            tls.failed = true;
        }
        self.reading_done = true;
        self.out.clear();
        match why {
            TlsFailure::PlaintextHttp | TlsFailure::NotTls | TlsFailure::HandshakeTimeout => {
                self.abort = true
            }
            _ => self.close_after_flush = true,
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
        if self.close_after_flush && self.out.is_empty() && !tls.notified {
            tls.notified = true;
            tls.conn.send_close_notify();
            tls.flush_records();
        }
    }
}
