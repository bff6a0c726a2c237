//! Listening sockets: one SO_REUSEPORT listener per core, so the kernel spreads new
//! connections across cores and no core ever touches another's accept queue.

use std::io;
use std::net::{SocketAddr, TcpListener};

use socket2::{Domain, Protocol, Socket, Type};

/// Bind `count` listeners on `addr` with SO_REUSEPORT. With port 0 the first picks a free
/// port and the others join it, so all cores serve the same address.
pub fn bind_all(addr: SocketAddr, count: usize, backlog: i32) -> io::Result<Vec<TcpListener>> {
    let mut listeners = Vec::with_capacity(count);
    let mut addr = addr;
    for _ in 0..count {
        let l = bind_one(addr, backlog)?;
        addr = l.local_addr()?;
        listeners.push(l);
    }
    Ok(listeners)
}

fn bind_one(addr: SocketAddr, backlog: i32) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_listeners_share_the_port_picked_for_port_zero() {
        let ls = bind_all("127.0.0.1:0".parse().unwrap(), 3, 16).unwrap();
        let port = ls[0].local_addr().unwrap().port();
        assert_ne!(port, 0);
        assert!(ls.iter().all(|l| l.local_addr().unwrap().port() == port));
    }

    #[test]
    fn ipv6_loopback_binds() {
        // Hosts without IPv6 skip: that is the host's configuration, not ours to test.
        if std::net::TcpListener::bind("[::1]:0").is_err() {
            return;
        }
        let ls = bind_all("[::1]:0".parse().unwrap(), 2, 16).unwrap();
        assert!(ls[1].local_addr().unwrap().is_ipv6());
    }

    #[test]
    fn a_port_in_use_without_reuseport_is_an_error() {
        let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let err = bind_all(plain.local_addr().unwrap(), 1, 16).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    }
}
