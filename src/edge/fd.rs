//! A client's socket as an owned file descriptor: the worker wraps every accepted fd at once
//! (`uring::accepted_socket`, as the accept completes), so closing it is `Drop` and the socket
//! calls the connection's life needs (shutdown, TCP_NODELAY, peer address) are safe methods.
//! No `unsafe` here: ownership comes in as an `OwnedFd`, the calls go through socket2.

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

/// One connection's socket; closed when dropped. The ring refers to it by its raw fd, so the
/// owner keeps it until every ring operation on it has completed.
#[derive(Debug)]
pub struct Socket(socket2::Socket);

impl Socket {
    /// Stop sending (FIN after what is queued in the kernel) or all traffic.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.0.shutdown(how)
    }

    /// Turn off Nagle's algorithm: frames leave as soon as they are written.
    pub fn set_nodelay(&self) -> io::Result<()> {
        self.0.set_nodelay(true)
    }

    /// The client's address (None for a socket that is not IP, or already reset).
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.0.peer_addr().ok()?.as_socket()
    }
}

impl From<OwnedFd> for Socket {
    fn from(fd: OwnedFd) -> Socket {
        Socket(socket2::Socket::from(fd))
    }
}

impl AsRawFd for Socket {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl AsFd for Socket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    fn pair() -> (Socket, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (Socket::from(OwnedFd::from(server)), client)
    }

    #[test]
    fn nodelay_and_peer_addr_on_a_loopback_socket() {
        let (server, client) = pair();
        server.set_nodelay().unwrap();
        assert!(server.0.nodelay().unwrap());
        assert_eq!(server.peer_addr(), Some(client.local_addr().unwrap()));
    }

    #[test]
    fn shutdown_write_sends_fin_and_both_stops_everything() {
        let (server, mut client) = pair();
        server.shutdown(Shutdown::Write).unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(client.read(&mut buf).unwrap(), 0, "FIN seen");
        // The read side still works after a write shutdown.
        client.write_all(b"hi").unwrap();
        let mut got = [0u8; 2];
        (&server.0).read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hi");
        server.shutdown(Shutdown::Both).unwrap();
        assert_eq!((&server.0).read(&mut buf).unwrap(), 0);
    }

    #[test]
    fn drop_closes_the_fd() {
        let (server, mut client) = pair();
        drop(server);
        let mut buf = [0u8; 1];
        assert_eq!(client.read(&mut buf).unwrap(), 0, "closed: EOF at the peer");
    }
}
