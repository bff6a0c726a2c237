//! Client side of the opening handshake (RFC 6455 §4.1) and the `ws://` / `wss://` URL,
//! loopback only.

use std::net::{SocketAddr, ToSocketAddrs};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ringway::protocol::handshake::accept_key;

use crate::tls::{TlsArgs, TlsClient};

/// Largest 101 response we wait for before giving up on the handshake.
const MAX_RESPONSE: usize = 8192;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub addr: SocketAddr,
    /// Host header value, as written in the URL.
    pub host: String,
    pub path: String,
    /// wss://: every connection speaks TLS with this client configuration.
    pub tls: Option<TlsClient>,
}

/// `ws://HOST:PORT/PATH` or `wss://HOST:PORT/PATH` where HOST resolves to a loopback
/// address; `tls` says how wss:// verifies the server (and must be empty for ws://).
pub fn target(url: &str, tls: &TlsArgs) -> Result<Target, String> {
    let (mut t, secure) = parse_url(url)?;
    if secure {
        let host = match t.host.rsplit_once(':') {
            Some((h, p)) if p.parse::<u16>().is_ok() => h,
            _ => &t.host,
        };
        t.tls = Some(TlsClient::new(host, tls)?);
    } else if tls.ca.is_some() || tls.insecure || tls.no_resume {
        return Err(format!(
            "{url:?}: --ca, --insecure and --no-resume are for wss:// URLs"
        ));
    }
    Ok(t)
}

/// The URL's address, Host and path, and whether it is wss://.
fn parse_url(url: &str) -> Result<(Target, bool), String> {
    let (rest, secure) = if let Some(r) = url.strip_prefix("ws://") {
        (r, false)
    } else if let Some(r) = url.strip_prefix("wss://") {
        (r, true)
    } else {
        return Err(format!("{url:?}: only ws:// and wss:// URLs are supported"));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(format!("{url:?}: no host"));
    }
    let with_port = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        authority.to_string()
    } else {
        format!("{authority}:{}", if secure { 443 } else { 80 })
    };
    let addr = with_port
        .to_socket_addrs()
        .map_err(|e| format!("{url:?}: {e}"))?
        .find(SocketAddr::is_ipv4)
        .ok_or_else(|| format!("{url:?}: no IPv4 address"))?;
    if !addr.ip().is_loopback() {
        return Err(format!("{url:?}: {} is not a loopback address", addr.ip()));
    }
    Ok((
        Target {
            addr,
            host: authority.to_string(),
            path: path.to_string(),
            tls: None,
        },
        secure,
    ))
}

/// A fresh Sec-WebSocket-Key (§4.1: 16 random bytes, base64).
pub fn new_key(rng: &mut u64) -> String {
    let mut raw = [0u8; 16];
    for chunk in raw.chunks_mut(8) {
        let r = crate::payload::xorshift(rng).to_le_bytes();
        chunk.copy_from_slice(&r[..chunk.len()]);
    }
    STANDARD.encode(raw)
}

pub fn request(target: &Target, key: &str) -> String {
    format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n",
        target.path, target.host
    )
}

/// Check the server's response (§4.1, client requirements 1-4). `Ok(None)`: incomplete;
/// `Ok(Some(n))`: valid 101 of `n` bytes (frames may follow).
pub fn check_101(buf: &[u8], key: &str) -> Result<Option<usize>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let n = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_RESPONSE => return Ok(None),
        Ok(httparse::Status::Partial) => return Err("response header too large".into()),
        Err(e) => return Err(format!("malformed response: {e}")),
    };
    if resp.code != Some(101) {
        return Err(format!(
            "status {} {}",
            resp.code.unwrap_or(0),
            resp.reason.unwrap_or("")
        ));
    }
    let header = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_string())
    };
    if !header("upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket")) {
        return Err("101 without Upgrade: websocket".into());
    }
    if !header("connection").is_some_and(|v| {
        v.split(',')
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
    }) {
        return Err("101 without Connection: Upgrade".into());
    }
    let want = accept_key(key.as_bytes());
    match header("sec-websocket-accept") {
        Some(got) if got == want => Ok(Some(n)),
        Some(got) => Err(format!("Sec-WebSocket-Accept {got:?}, expected {want:?}")),
        None => Err("101 without Sec-WebSocket-Accept".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(accept: &str) -> String {
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {accept}\r\n\r\n"
        )
    }

    #[test]
    fn valid_101_is_accepted_and_its_length_returned() {
        // RFC 6455 §1.3 sample key and accept value.
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let mut r = response("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=").into_bytes();
        let n = r.len();
        r.extend_from_slice(&[0x81, 0x00]);
        assert_eq!(check_101(&r, key), Ok(Some(n)));
        assert_eq!(check_101(&r[..n - 3], key), Ok(None));
    }

    #[test]
    fn wrong_accept_or_status_is_rejected() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let r = response("AAAAAAAAAAAAAAAAAAAAAAAAAAA=");
        assert!(check_101(r.as_bytes(), key)
            .unwrap_err()
            .contains("Sec-WebSocket-Accept"));
        let r = "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(
            check_101(r.as_bytes(), key),
            Err("status 400 Bad Request".into())
        );
        let huge = vec![b'x'; MAX_RESPONSE + 1];
        assert!(check_101(&huge, key).is_err());
    }

    fn plain(url: &str) -> Result<Target, String> {
        target(url, &TlsArgs::default())
    }

    #[test]
    fn urls_must_be_ws_or_wss_and_loopback() {
        let t = plain("ws://127.0.0.1:9001/chat?x=1").unwrap();
        assert_eq!(t.addr, "127.0.0.1:9001".parse().unwrap());
        assert_eq!(t.host, "127.0.0.1:9001");
        assert_eq!(t.path, "/chat?x=1");
        assert!(t.tls.is_none());
        assert_eq!(plain("ws://127.0.0.1:9001").unwrap().path, "/");
        assert!(plain("http://127.0.0.1:9001/").is_err());
        assert!(plain("ws://10.1.2.3:80/").unwrap_err().contains("loopback"));
        assert!(plain("ws:///").is_err());
    }

    #[test]
    fn wss_urls_get_a_tls_client_and_port_443() {
        let t = plain("wss://127.0.0.1:9443/").unwrap();
        assert!(t.tls.is_some());
        assert_eq!(t.addr.port(), 9443);
        assert_eq!(plain("wss://127.0.0.1/").unwrap().addr.port(), 443);
        let insecure = TlsArgs {
            insecure: true,
            ..TlsArgs::default()
        };
        assert!(target("wss://localhost:1/", &insecure)
            .unwrap()
            .tls
            .is_some());
        // TLS options on a ws:// URL are a mistake worth saying so.
        assert!(target("ws://127.0.0.1:1/", &insecure)
            .unwrap_err()
            .contains("wss://"));
    }

    #[test]
    fn request_carries_key_and_version() {
        let mut rng = 1;
        let key = new_key(&mut rng);
        assert_eq!(STANDARD.decode(&key).unwrap().len(), 16);
        let t = plain("ws://127.0.0.1:1/p").unwrap();
        let req = request(&t, &key);
        assert!(req.starts_with("GET /p HTTP/1.1\r\nHost: 127.0.0.1:1\r\n"));
        assert!(req.contains(&format!("Sec-WebSocket-Key: {key}\r\n")));
        assert!(req.ends_with("Sec-WebSocket-Version: 13\r\n\r\n"));
    }
}
