//! TLS to one backend (`tls://HOST:PORT`): a rustls `ClientConnection` over the link's
//! non-blocking mio socket. The link drives the handshake ([`TlsStream::handshake`]) in a
//! phase of its own, then reads and writes relay frames through it as through a plain
//! socket. Every rustls error leaves here as an `io::Error` carrying a [`TlsFailed`] with the
//! reason the metrics count (`ringway_backend_tls_failures_total{reason}`).
//!
//! Memory per link is bounded: rustls holds at most [`TLS_BUFFER_BYTES`] of records to send
//! (`set_buffer_limit`) and its own default limit of received plaintext (16 KiB), which the
//! link drains on every read.

use std::io::{self, Read, Write};
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{CertificateError, ClientConfig, ClientConnection};

/// Encrypted records one link may hold unwritten (on top of its own out buffer).
pub const TLS_BUFFER_BYTES: usize = 64 * 1024;

/// What a link connects with: its upstream's configuration and the name the backend's
/// certificate must carry.
#[derive(Debug, Clone)]
pub struct TlsClient {
    pub config: Arc<ClientConfig>,
    pub name: ServerName<'static>,
}

/// Why a TLS connection to a backend failed, as the metric's `reason` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendTlsFailure {
    /// The certificate does not chain to `ca_file`.
    UnknownCa,
    /// The certificate does not name the backend's host.
    WrongName,
    Expired,
    NotYetValid,
    /// Any other certificate problem (bad signature, wrong purpose, unparsable).
    BadCertificate,
    /// The backend refused us with an alert (for example: no or an unknown client
    /// certificate).
    PeerAlert,
    /// A TLS protocol error (no common version or suite, a backend that does not speak TLS).
    Protocol,
    /// The backend closed the connection during the handshake.
    Closed,
    /// No complete handshake within the link's hello timeout.
    Timeout,
}

impl BackendTlsFailure {
    pub const ALL: [BackendTlsFailure; 9] = [
        BackendTlsFailure::UnknownCa,
        BackendTlsFailure::WrongName,
        BackendTlsFailure::Expired,
        BackendTlsFailure::NotYetValid,
        BackendTlsFailure::BadCertificate,
        BackendTlsFailure::PeerAlert,
        BackendTlsFailure::Protocol,
        BackendTlsFailure::Closed,
        BackendTlsFailure::Timeout,
    ];

    pub fn label(self) -> &'static str {
        match self {
            BackendTlsFailure::UnknownCa => "unknown_ca",
            BackendTlsFailure::WrongName => "wrong_name",
            BackendTlsFailure::Expired => "expired",
            BackendTlsFailure::NotYetValid => "not_yet_valid",
            BackendTlsFailure::BadCertificate => "bad_certificate",
            BackendTlsFailure::PeerAlert => "peer_alert",
            BackendTlsFailure::Protocol => "protocol",
            BackendTlsFailure::Closed => "closed",
            BackendTlsFailure::Timeout => "timeout",
        }
    }

    fn of(e: &rustls::Error) -> BackendTlsFailure {
        use CertificateError as C;
        match e {
            rustls::Error::InvalidCertificate(c) => match c {
                C::UnknownIssuer => BackendTlsFailure::UnknownCa,
                C::NotValidForName | C::NotValidForNameContext { .. } => {
                    BackendTlsFailure::WrongName
                }
                C::Expired | C::ExpiredContext { .. } => BackendTlsFailure::Expired,
                C::NotValidYet | C::NotValidYetContext { .. } => BackendTlsFailure::NotYetValid,
                _ => BackendTlsFailure::BadCertificate,
            },
            rustls::Error::AlertReceived(_) => BackendTlsFailure::PeerAlert,
            _ => BackendTlsFailure::Protocol,
        }
    }
}

/// A TLS failure inside an `io::Error`, so the link's one error path can tell it apart.
#[derive(Debug, thiserror::Error)]
#[error("TLS failed ({}): {detail}", reason.label())]
pub struct TlsFailed {
    pub reason: BackendTlsFailure,
    detail: String,
}

pub fn failed(reason: BackendTlsFailure, detail: impl Into<String>) -> io::Error {
    let kind = match reason {
        BackendTlsFailure::Timeout => io::ErrorKind::TimedOut,
        BackendTlsFailure::Closed => io::ErrorKind::UnexpectedEof,
        _ => io::ErrorKind::InvalidData,
    };
    io::Error::new(
        kind,
        TlsFailed {
            reason,
            detail: detail.into(),
        },
    )
}

fn from_rustls(e: rustls::Error) -> io::Error {
    failed(BackendTlsFailure::of(&e), e.to_string())
}

/// The TLS reason behind `e`, if it is a TLS failure.
pub fn reason_of(e: &io::Error) -> Option<BackendTlsFailure> {
    Some(e.get_ref()?.downcast_ref::<TlsFailed>()?.reason)
}

pub struct TlsStream {
    pub(super) sock: mio::net::TcpStream,
    pub(super) conn: ClientConnection,
}

/// A new client connection to one backend, its send buffer bounded.
pub fn connection(client: &TlsClient) -> io::Result<ClientConnection> {
    let mut conn =
        ClientConnection::new(client.config.clone(), client.name.clone()).map_err(from_rustls)?;
    conn.set_buffer_limit(Some(TLS_BUFFER_BYTES));
    Ok(conn)
}

impl TlsStream {
    pub fn new(sock: mio::net::TcpStream, conn: ClientConnection) -> TlsStream {
        TlsStream { sock, conn }
    }

    /// Advance the handshake as far as the socket allows: Ok(true) once it is complete.
    pub fn handshake(&mut self) -> io::Result<bool> {
        loop {
            match self.push() {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if !self.conn.is_handshaking() {
                return Ok(true);
            }
            match self.conn.read_tls(&mut self.sock) {
                Ok(0) => {
                    return Err(failed(
                        BackendTlsFailure::Closed,
                        "the backend closed the connection during the TLS handshake",
                    ))
                }
                Ok(_) => self.process()?,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn process(&mut self) -> io::Result<()> {
        if let Err(e) = self.conn.process_new_packets() {
            // The alert rustls queued for the backend: one attempt.
            let _ = self.push();
            return Err(from_rustls(e));
        }
        Ok(())
    }

    /// Write every record that waits; `WouldBlock` when the socket is full.
    pub fn push(&mut self) -> io::Result<()> {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut self.sock) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl Read for TlsStream {
    /// Plaintext rustls holds first, then the socket; `WouldBlock` only when both are empty,
    /// so an edge-triggered reader misses nothing. `Ok(0)`: the backend closed the link.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.conn.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            match self.conn.read_tls(&mut self.sock) {
                Ok(0) => return Ok(0),
                Ok(_) => {
                    self.process()?;
                    // An answer rustls owes the backend (a key update): sent when it can be.
                    match self.push() {
                        Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Err(e),
                        _ => {}
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl Write for TlsStream {
    /// Encrypt what fits in the bounded record buffer and send it; `WouldBlock` while
    /// earlier records still wait for the socket.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.push()?;
        let n = self.conn.writer().write(buf)?;
        match self.push() {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Err(e),
            _ => {}
        }
        if n == 0 && !buf.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rustls_errors_map_to_reasons_and_survive_io_error() {
        let cases = [
            (
                rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
                "unknown_ca",
            ),
            (
                rustls::Error::InvalidCertificate(CertificateError::NotValidForName),
                "wrong_name",
            ),
            (
                rustls::Error::InvalidCertificate(CertificateError::Expired),
                "expired",
            ),
            (
                rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired),
                "peer_alert",
            ),
            (rustls::Error::DecryptError, "protocol"),
        ];
        for (e, label) in cases {
            let io = from_rustls(e);
            assert_eq!(reason_of(&io).map(BackendTlsFailure::label), Some(label));
            assert!(
                io.to_string()
                    .starts_with(&format!("TLS failed ({label}): ")),
                "{io}"
            );
        }
        assert_eq!(reason_of(&io::Error::other("refused")), None);
        let labels: std::collections::HashSet<_> =
            BackendTlsFailure::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(labels.len(), BackendTlsFailure::ALL.len());
    }
}
