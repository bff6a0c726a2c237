//! The byte stream under one backend link: plain TCP, a Unix socket, or TLS over TCP. The
//! link reads and writes relay frames through it without knowing which; readiness comes
//! from the relay loop's mio poller (edge-triggered: every read and write goes on until
//! `WouldBlock`).

use std::io::{self, Read, Write};

use super::tls::TlsStream;

pub(super) enum Stream {
    Tcp(mio::net::TcpStream),
    Unix(mio::net::UnixStream),
    /// Boxed: a rustls connection is a few KiB, the other variants a file descriptor.
    Tls(Box<TlsStream>),
}

impl Stream {
    pub(super) fn source(&mut self) -> &mut dyn mio::event::Source {
        match self {
            Stream::Tcp(s) => s,
            Stream::Unix(s) => s,
            Stream::Tls(t) => &mut t.sock,
        }
    }

    /// The connect's outcome: Ok(true) done, Ok(false) still in progress.
    pub(super) fn connected(&self) -> io::Result<bool> {
        let (err, peer) = match self {
            Stream::Tcp(s) => (s.take_error()?, s.peer_addr().map(|_| ())),
            Stream::Unix(s) => (s.take_error()?, s.peer_addr().map(|_| ())),
            Stream::Tls(t) => (t.sock.take_error()?, t.sock.peer_addr().map(|_| ())),
        };
        if let Some(e) = err {
            return Err(e);
        }
        match peer {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// TLS records waiting for the socket (always false for plain streams).
    pub(super) fn has_pending(&self) -> bool {
        matches!(self, Stream::Tls(t) if t.conn.wants_write())
    }

    /// Write TLS records that wait (a no-op for plain streams); `WouldBlock` when the
    /// socket is full.
    pub(super) fn push(&mut self) -> io::Result<()> {
        match self {
            Stream::Tls(t) => t.push(),
            _ => Ok(()),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
            Stream::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
            Stream::Tls(t) => t.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
