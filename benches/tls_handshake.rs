//! Server-side cost of a TLS handshake with the gateway's own rustls configuration
//! (`ringway::tls::TlsServer`: aws-lc-rs, tickets, session cache) and an ECDSA P-256
//! certificate, in memory: a rustls client on the other side of byte vectors, and only the
//! server's calls timed (`iter_custom`), so 1 / time is handshakes per second on one core
//! without the kernel's TCP or the WebSocket upgrade. Full and resumed, TLS 1.3 and 1.2.
//!
//! `cargo bench --bench tls_handshake -- --warm-up-time 1 --measurement-time 3`

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use ringway::config::CertificateConfig;
use ringway::tls::TlsServer;
use rustls::client::Resumption;
use rustls::{ClientConfig, ClientConnection, HandshakeKind, RootCertStore, ServerConnection};

/// Live heap bytes, to weigh what one idle `ServerConnection` keeps after its handshake.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        // SAFETY: `p` came from `alloc` above with this layout.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

struct Setup {
    server: Arc<rustls::ServerConfig>,
    roots: RootCertStore,
}

fn setup() -> Setup {
    // rcgen's default key: ECDSA P-256 with SHA-256. Self-signed, not a CA: its own anchor.
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let dir = std::env::temp_dir().join(format!("ringway-bench-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    let server = TlsServer::new(&[CertificateConfig { cert: c, key: k }])
        .unwrap()
        .config();
    std::fs::remove_dir_all(&dir).unwrap();
    let mut roots = RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    Setup { server, roots }
}

/// A client for `version`; `x25519_only` offers only X25519 instead of rustls' default list
/// (X25519MLKEM768 first, which the server then picks).
fn client(
    s: &Setup,
    version: &'static rustls::SupportedProtocolVersion,
    resume: bool,
    x25519_only: bool,
) -> Arc<ClientConfig> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    if x25519_only {
        provider.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::X25519];
    }
    let provider = Arc::new(provider);
    let mut c = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(s.roots.clone())
        .with_no_client_auth();
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    if !resume {
        c.resumption = Resumption::disabled();
    }
    Arc::new(c)
}

/// One handshake to completion (and the server's tickets read by the client); returns the
/// time spent in the server's calls and how the server saw the handshake.
fn handshake(
    server: &Arc<rustls::ServerConfig>,
    client: &Arc<ClientConfig>,
) -> (Duration, HandshakeKind) {
    let (t, kind, _) = connect(server, client);
    (t, kind)
}

/// [`handshake`], also handing back the server's connection, open and idle.
fn connect(
    server: &Arc<rustls::ServerConfig>,
    client: &Arc<ClientConfig>,
) -> (Duration, HandshakeKind, ServerConnection) {
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut c = ClientConnection::new(client.clone(), name).unwrap();
    let t0 = Instant::now();
    let mut s = ServerConnection::new(server.clone()).unwrap();
    let mut in_server = t0.elapsed();
    let mut buf = Vec::with_capacity(4096);
    for _ in 0..8 {
        buf.clear();
        while c.wants_write() {
            c.write_tls(&mut buf).unwrap();
        }
        let t = Instant::now();
        let mut input = &buf[..];
        while !input.is_empty() {
            s.read_tls(&mut input).unwrap();
            s.process_new_packets().unwrap();
        }
        buf.clear();
        while s.wants_write() {
            s.write_tls(&mut buf).unwrap();
        }
        in_server += t.elapsed();
        let mut input = &buf[..];
        while !input.is_empty() {
            c.read_tls(&mut input).unwrap();
            c.process_new_packets().unwrap();
        }
        if !s.is_handshaking() && !c.is_handshaking() && !c.wants_write() {
            break;
        }
    }
    assert!(!s.is_handshaking(), "handshake did not finish");
    let kind = s.handshake_kind().unwrap();
    (in_server, kind, s)
}

fn bench(c: &mut Criterion) {
    let s = setup();
    for (label, version) in [
        ("1.3", &rustls::version::TLS13),
        ("1.2", &rustls::version::TLS12),
    ] {
        let (_, _, conn) = connect(&s.server, &client(&s, version, false, false));
        let held = LIVE.load(Ordering::Relaxed);
        drop(conn);
        eprintln!(
            "TLS {label}: an idle ServerConnection after its handshake holds {} B of heap \
             ({} B inline, boxed in the session; the rest is rustls' record buffer and keys)",
            held - LIVE.load(Ordering::Relaxed),
            std::mem::size_of::<ServerConnection>()
        );
    }
    let mut g = c.benchmark_group("tls_handshake_server_side");
    let cases = [
        ("tls13", &rustls::version::TLS13, false),
        ("tls13_x25519", &rustls::version::TLS13, true),
        ("tls12", &rustls::version::TLS12, false),
    ];
    for (label, version, x25519) in cases {
        let full = client(&s, version, false, x25519);
        g.bench_function(format!("{label}_full"), |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| {
                        let (t, kind) = handshake(&s.server, &full);
                        assert_eq!(kind, HandshakeKind::Full);
                        t
                    })
                    .sum()
            })
        });
        let resuming = client(&s, version, true, x25519);
        handshake(&s.server, &resuming);
        g.bench_function(format!("{label}_resumed"), |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| {
                        let (t, kind) = handshake(&s.server, &resuming);
                        assert_eq!(kind, HandshakeKind::Resumed);
                        t
                    })
                    .sum()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
