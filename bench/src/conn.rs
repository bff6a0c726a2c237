//! One client connection as both load modes drive it: connect, send the upgrade, check the
//! 101, decode frames, check every reply against what was sent, answer pings, finish the
//! closing handshake, over TCP or TLS (wss://). What a mode does on a 101 and on a checked reply goes through [`Mode`],
//! so the echo/rate/idle engine and the churn soak cannot drift apart on the wire.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;

use bytes::{Buf, BytesMut};
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use ringway::protocol::frame::{write_client_frame, OpCode, Role};
use ringway::protocol::message::{Event, Limits, MessageDecoder, MessageKind};
use rustls::{ClientConnection, HandshakeKind};
use socket2::{Domain, Protocol, Socket, Type};

use crate::payload::{xorshift, PayloadGen};
use crate::report::ErrorKind;
use crate::sys::set_bind_address_no_port;
use crate::tls::describe;
use crate::ws::{self, Target};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Connecting,
    Handshaking,
    Open,
    Closing,
}

pub type Failure = (ErrorKind, String);

pub enum Flow {
    Keep,
    Done,
}

/// How error messages name a connection: churn ids carry their thread in the high bits, so
/// they read best in hex.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnId {
    pub n: u64,
    pub hex: bool,
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.hex {
            write!(f, "conn {:#x}", self.n)
        } else {
            write!(f, "conn {}", self.n)
        }
    }
}

pub struct Conn<X> {
    pub stream: TcpStream,
    /// wss://: the TLS layer; `wbuf` then holds plaintext that [`Conn::flush`] encrypts.
    /// Boxed: an idle connection keeps it (its state and a 4 KiB record buffer) and
    /// nothing else of size.
    tls: Option<Box<ClientConnection>>,
    /// wss://: the TLS handshake resumed an earlier session (known by the 101).
    pub tls_resumed: bool,
    pub id: ConnId,
    pub state: State,
    /// When the current state's deadline started counting.
    pub since: u64,
    key: String,
    hs: Vec<u8>,
    dec: MessageDecoder,
    pub wbuf: BytesMut,
    pub gen: PayloadGen,
    /// Next sequence number to send.
    pub next_seq: u64,
    /// Sequence number the next reply must carry.
    pub recv_seq: u64,
    /// Send (or scheduled) time of each message from `recv_seq` on: the first
    /// `next_seq - recv_seq` are on the wire, any others wait for the mode to send them.
    pub times: VecDeque<u64>,
    token: Token,
    /// Registered for writability: only while a write is pending, so that the ACKs of
    /// every message do not wake the loop.
    want_write: bool,
    /// What only one mode keeps per connection.
    pub ext: X,
}

/// A nonblocking connect, bound to `src` if given (without reserving a port at bind time).
pub fn connect(addr: SocketAddr, src: Option<Ipv4Addr>) -> io::Result<TcpStream> {
    let s = Socket::new(
        Domain::IPV4,
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    s.set_nodelay(true)?;
    if let Some(ip) = src {
        set_bind_address_no_port(s.as_raw_fd())?;
        s.bind(&SocketAddr::V4(SocketAddrV4::new(ip, 0)).into())?;
    }
    match s.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(std::net::TcpStream::from(s)))
}

/// A fresh client masking key (RFC 6455 §5.3).
pub fn mask(rng: &mut u64) -> [u8; 4] {
    (xorshift(rng) as u32).to_ne_bytes()
}

impl<X> Conn<X> {
    /// A connection whose connect() is in progress (with its TLS client for wss://),
    /// registered as `token` for both directions. `payload` is the message size and
    /// whether messages are binary.
    pub fn new(
        (stream, tls): (TcpStream, Option<Box<ClientConnection>>),
        token: Token,
        id: ConnId,
        payload: (usize, bool),
        rng: &mut u64,
        now: u64,
        ext: X,
    ) -> Self {
        let (size, binary) = payload;
        let max = size.max(1024) as u64;
        Conn {
            stream,
            tls,
            tls_resumed: false,
            id,
            state: State::Connecting,
            since: now,
            key: ws::new_key(rng),
            hs: Vec::new(),
            dec: MessageDecoder::new(
                Role::Client,
                Limits {
                    max_frame: max,
                    max_message: max,
                    max_fragments: 0,
                },
            ),
            wbuf: BytesMut::new(),
            gen: PayloadGen::new(size, binary, id.n + 1),
            next_seq: 0,
            recv_seq: 0,
            times: VecDeque::new(),
            token,
            want_write: true,
            ext,
        }
    }

    /// Normal closure (RFC 6455 §7.1.2, code 1000 per §7.4.1); done when the server's close
    /// frame or EOF arrives.
    pub fn start_close(&mut self, rng: &mut u64, now: u64) {
        write_client_frame(
            &mut self.wbuf,
            true,
            OpCode::Close,
            mask(rng),
            &1000u16.to_be_bytes(),
        );
        self.state = State::Closing;
        self.since = now;
    }

    /// Write what is queued (over TLS: encrypt it, then write the records, handshake ones
    /// included); writability is watched only while something is left over.
    pub fn flush(&mut self, registry: &Registry) -> Result<(), Failure> {
        if let Some(tls) = &mut self.tls {
            loop {
                while !self.wbuf.is_empty() {
                    match tls.writer().write(&self.wbuf) {
                        Ok(0) => break, // rustls' buffer limit: its records go first
                        Ok(n) => self.wbuf.advance(n),
                        Err(e) => {
                            return Err((ErrorKind::Closed, format!("{}: TLS: {e}", self.id)))
                        }
                    }
                }
                if !tls.wants_write() {
                    break;
                }
                match tls.write_tls(&mut self.stream) {
                    Ok(0) => {
                        return Err((ErrorKind::Closed, format!("{}: write returned 0", self.id)))
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        let kind = closed_kind(self.state);
                        return Err((kind, format!("{}: write: {e}", self.id)));
                    }
                }
            }
        } else {
            while !self.wbuf.is_empty() {
                match self.stream.write(&self.wbuf) {
                    Ok(0) => {
                        return Err((ErrorKind::Closed, format!("{}: write returned 0", self.id)))
                    }
                    Ok(n) => self.wbuf.advance(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err((self.closed_kind(), format!("{}: write: {e}", self.id))),
                }
            }
        }
        let pending = !self.wbuf.is_empty() || self.tls.as_ref().is_some_and(|t| t.wants_write());
        if pending != self.want_write && self.state != State::Connecting {
            let interest = if pending {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            registry
                .reregister(&mut self.stream, self.token, interest)
                .map_err(|e| (self.closed_kind(), format!("{}: epoll: {e}", self.id)))?;
            self.want_write = pending;
        }
        Ok(())
    }

    fn closed_kind(&self) -> ErrorKind {
        closed_kind(self.state)
    }
}

fn closed_kind(state: State) -> ErrorKind {
    match state {
        State::Connecting => ErrorKind::Connect,
        State::Handshaking => ErrorKind::Handshake,
        _ => ErrorKind::Closed,
    }
}

/// What a load mode adds to the shared driver.
pub trait Mode {
    /// Per-connection state of the mode, kept in [`Conn::ext`].
    type Ext;
    /// Stop reading at a short read: it emptied the socket and epoll reports the next
    /// arrival as a new edge. Saves a read per wake, but a FIN that came with the data is
    /// only seen with the next arrival, so a mode that must notice the server hanging up
    /// reads until EAGAIN instead.
    const STOP_AT_SHORT_READ: bool;
    /// A read error after our close frame went out ends the connection like a clean close,
    /// instead of counting as an error.
    const READ_ERROR_AFTER_CLOSE_IS_DONE: bool;
    /// Restart [`Conn::since`] when TCP connects, so the 101 gets its own deadline rather
    /// than sharing one with the connect.
    const RESTART_CLOCK_ON_CONNECT: bool;

    fn target(&self) -> &Target;
    fn registry(&self) -> &Registry;
    fn rng(&mut self) -> &mut u64;
    /// A valid 101 arrived; the connection is open and its key and header buffer gone.
    fn opened(&mut self, c: &mut Conn<Self::Ext>, now: u64);
    /// A reply matched the message it echoes; `sent_at` is that message's time.
    fn replied(&mut self, c: &mut Conn<Self::Ext>, sent_at: Option<u64>, now: u64);
    /// The server answered our close frame (RFC 6455 §5.5.1).
    fn close_answered(&mut self, _c: &Conn<Self::Ext>) -> Result<Flow, Failure> {
        Ok(Flow::Done)
    }
}

/// Handle one epoll event of `c`: finish the connect and send the upgrade, write what is
/// pending, read what came, and flush again if the connection lives on.
pub fn drive<M: Mode>(
    m: &mut M,
    c: &mut Conn<M::Ext>,
    scratch: &mut [u8],
    readable: bool,
    writable: bool,
    now: u64,
) -> Result<Flow, Failure> {
    let mut read = readable;
    if c.state == State::Connecting {
        if let Ok(Some(e)) | Err(e) = c.stream.take_error() {
            return Err((ErrorKind::Connect, format!("{}: connect: {e}", c.id)));
        }
        match c.stream.peer_addr() {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(Flow::Keep),
            Err(e) => return Err((ErrorKind::Connect, format!("{}: connect: {e}", c.id))),
        }
        c.state = State::Handshaking;
        if M::RESTART_CLOCK_ON_CONNECT {
            c.since = now;
        }
        c.wbuf
            .extend_from_slice(ws::request(m.target(), &c.key).as_bytes());
        c.flush(m.registry())?;
        // The response may be in already.
        read = true;
    } else if writable {
        c.flush(m.registry())?;
    }
    let flow = if read {
        read_all(m, c, scratch, now)?
    } else {
        Flow::Keep
    };
    if let Flow::Keep = flow {
        c.flush(m.registry())?;
    }
    Ok(flow)
}

fn read_all<M: Mode>(
    m: &mut M,
    c: &mut Conn<M::Ext>,
    scratch: &mut [u8],
    now: u64,
) -> Result<Flow, Failure> {
    if let Some(mut tls) = c.tls.take() {
        let r = read_all_tls(m, c, &mut tls, scratch, now);
        c.tls = Some(tls);
        return r;
    }
    loop {
        let n = match c.stream.read(scratch) {
            Ok(0) => return at_eof(c),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Flow::Keep),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) if M::READ_ERROR_AFTER_CLOSE_IS_DONE && c.state == State::Closing => {
                return Ok(Flow::Done)
            }
            Err(e) => return Err((c.closed_kind(), format!("{}: read: {e}", c.id))),
        };
        let framed = c.state != State::Handshaking;
        if let Flow::Done = on_plaintext(m, c, &mut scratch[..n], now)? {
            return Ok(Flow::Done);
        }
        if M::STOP_AT_SHORT_READ && framed && n < scratch.len() {
            return Ok(Flow::Keep);
        }
    }
}

/// wss://: records are read into the first half of `scratch` and decrypted into the
/// second, where frames are parsed as for ws://. `c.tls` is lent out meanwhile: nothing
/// here flushes (the caller does, handshake records included).
fn read_all_tls<M: Mode>(
    m: &mut M,
    c: &mut Conn<M::Ext>,
    tls: &mut ClientConnection,
    scratch: &mut [u8],
    now: u64,
) -> Result<Flow, Failure> {
    let (cipher, plain) = scratch.split_at_mut(scratch.len() / 2);
    loop {
        let n = match c.stream.read(cipher) {
            Ok(0) if tls.is_handshaking() => {
                let kind = c.closed_kind();
                return Err((kind, format!("{}: closed during the TLS handshake", c.id)));
            }
            Ok(0) => return at_eof(c),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Flow::Keep),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) if M::READ_ERROR_AFTER_CLOSE_IS_DONE && c.state == State::Closing => {
                return Ok(Flow::Done)
            }
            Err(e) => return Err((c.closed_kind(), format!("{}: read: {e}", c.id))),
        };
        let mut input = &cipher[..n];
        while !input.is_empty() {
            if let Err(e) = tls.read_tls(&mut input) {
                return Err((c.closed_kind(), format!("{}: TLS: {e}", c.id)));
            }
            let io = match tls.process_new_packets() {
                Ok(io) if c.state == State::Handshaking && !tls.is_handshaking() => {
                    c.tls_resumed = tls.handshake_kind() == Some(HandshakeKind::Resumed);
                    io
                }
                Ok(io) => io,
                Err(e) => {
                    // Our alert, if the socket takes it; the error is what counts.
                    let _ = tls.write_tls(&mut c.stream);
                    return Err((c.closed_kind(), format!("{}: {}", c.id, describe(&e))));
                }
            };
            loop {
                match tls.reader().read(plain) {
                    Ok(0) => break,
                    Ok(k) => {
                        if let Flow::Done = on_plaintext(m, c, &mut plain[..k], now)? {
                            return Ok(Flow::Done);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err((c.closed_kind(), format!("{}: TLS: {e}", c.id))),
                }
            }
            if io.peer_has_closed() {
                // close_notify: the server sends nothing more; the FIN follows.
                return at_eof(c);
            }
        }
        if M::STOP_AT_SHORT_READ && c.state != State::Handshaking && n < cipher.len() {
            return Ok(Flow::Keep);
        }
    }
}

/// The server ended the stream (TCP EOF, or TLS close_notify).
fn at_eof<X>(c: &Conn<X>) -> Result<Flow, Failure> {
    match c.state {
        State::Closing => Ok(Flow::Done),
        State::Handshaking => Err((
            ErrorKind::Handshake,
            format!("{}: closed before the 101 response", c.id),
        )),
        _ => Err((
            ErrorKind::Closed,
            format!(
                "{}: server closed the connection ({} messages unanswered)",
                c.id,
                c.times.len()
            ),
        )),
    }
}

/// Plaintext from the server: the 101 (and what follows it) while handshaking, frames after.
fn on_plaintext<M: Mode>(
    m: &mut M,
    c: &mut Conn<M::Ext>,
    data: &mut [u8],
    now: u64,
) -> Result<Flow, Failure> {
    if c.state != State::Handshaking {
        return on_data(m, c, data, now);
    }
    c.hs.extend_from_slice(data);
    let len = match ws::check_101(&c.hs, &c.key) {
        Ok(None) => return Ok(Flow::Keep),
        Ok(Some(len)) => len,
        Err(e) => return Err((ErrorKind::Handshake, format!("{}: {e}", c.id))),
    };
    c.state = State::Open;
    c.since = now;
    c.key = String::new();
    let mut rest = std::mem::take(&mut c.hs);
    m.opened(c, now);
    on_data(m, c, &mut rest[len..], now)
}

fn on_data<M: Mode>(
    m: &mut M,
    c: &mut Conn<M::Ext>,
    data: &mut [u8],
    now: u64,
) -> Result<Flow, Failure> {
    let mut pos = 0;
    while pos < data.len() {
        let (used, ev) = c
            .dec
            .decode(&mut data[pos..])
            .map_err(|e| (ErrorKind::Protocol, format!("{}: {e}", c.id)))?;
        pos += used;
        let Some(ev) = ev else {
            break;
        };
        match ev {
            Event::Message { kind, payload } => {
                let got = payload.as_slice();
                if c.recv_seq == c.next_seq {
                    return Err((
                        ErrorKind::WrongReply,
                        format!("{}: a {}-byte message nobody sent", c.id, got.len()),
                    ));
                }
                c.gen
                    .check(c.recv_seq, kind == MessageKind::Binary, got)
                    .map_err(|e| {
                        (
                            ErrorKind::WrongReply,
                            format!("{}: reply {}: {e}", c.id, c.recv_seq),
                        )
                    })?;
                let sent_at = c.times.pop_front();
                c.recv_seq += 1;
                m.replied(c, sent_at, now);
            }
            Event::Ping(p) => {
                write_client_frame(&mut c.wbuf, true, OpCode::Pong, mask(m.rng()), p);
            }
            Event::Pong(_) => {}
            // The load tool offers no extension, so RSV1 stays forbidden and this cannot occur.
            Event::Compressed { .. } => {
                return Err((
                    ErrorKind::Protocol,
                    format!("{}: compressed message without permessage-deflate", c.id),
                ));
            }
            Event::Close(_) if c.state == State::Closing => return m.close_answered(c),
            Event::Close(code) => {
                return Err((
                    ErrorKind::Closed,
                    format!(
                        "{}: server sent close {:?} ({} messages unanswered)",
                        c.id,
                        code.map(|(c, r)| format!("{c} {r}")),
                        c.times.len()
                    ),
                ))
            }
        }
    }
    Ok(Flow::Keep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_messages_name_connections_as_each_mode_numbers_them() {
        let echo = ConnId { n: 42, hex: false };
        let churn = ConnId {
            n: (3 << 40) | 5,
            hex: true,
        };
        assert_eq!(format!("{echo}: read"), "conn 42: read");
        assert_eq!(format!("{churn}: read"), "conn 0x30000000005: read");
    }
}
