//! TLS for the wss:// listener, with no IO on the data path: the rustls `ServerConfig` every
//! core's TLS connections share (aws-lc-rs, TLS 1.2 and 1.3 with rustls' default suites,
//! ALPN `http/1.1`, no 0-RTT, rotating ticket keys and a bounded session cache), the
//! certificates behind it (PEM files, chosen by SNI) and their reload. The session's
//! transport (`session::transport`) drives one `ServerConnection` per client from this.
//!
//! Data path: gateway (start, SIGHUP) -> **tls** (files -> `ServerConfig`) -> edge worker
//! (one `ServerConnection` per accepted wss client) -> session transport.

mod certs;
pub mod client;
pub mod expiry;
mod resolver;

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::ServerSessionMemoryCache;
use rustls::ServerConfig;

use crate::config::CertificateConfig;

pub use certs::{CertError, Loaded};
pub use resolver::{CertSet, Resolver};

/// TLS sessions (TLS 1.2 session ids) one process remembers for resumption; TLS 1.3 and
/// ticket-capable TLS 1.2 clients resume from tickets, which cost the server nothing.
pub const SESSION_CACHE_ENTRIES: usize = 16_384;

/// The ALPN protocol we speak; a client that offers only others (`h2`) gets the
/// no_application_protocol alert.
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// `tls.certificates[i]`: what is wrong with its files.
    #[error("tls.certificates[{index}]: {source}")]
    Certificate {
        index: usize,
        #[source]
        source: CertError,
    },
    #[error(
        "no TLS certificate configured: give --tls-cert and --tls-key, or [[tls.certificates]]"
    )]
    NoCertificates,
    #[error("cannot set up rustls: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The TLS side of the gateway: the shared server configuration and its certificates.
#[derive(Debug, Clone)]
pub struct TlsServer {
    config: Arc<ServerConfig>,
    resolver: Arc<Resolver>,
    provider: Arc<CryptoProvider>,
}

/// Load every certificate of `files` (all or nothing).
pub fn load_all(
    files: &[CertificateConfig],
    provider: &CryptoProvider,
) -> Result<CertSet, TlsError> {
    if files.is_empty() {
        return Err(TlsError::NoCertificates);
    }
    let loaded = files
        .iter()
        .enumerate()
        .map(|(index, f)| {
            certs::load(&f.cert, &f.key, provider)
                .map_err(|source| TlsError::Certificate { index, source })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(CertSet::new(loaded))
}

impl TlsServer {
    /// Read the certificates and build the configuration every core shares.
    pub fn new(files: &[CertificateConfig]) -> Result<TlsServer, TlsError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let set = load_all(files, &provider)?;
        let resolver = Arc::new(Resolver::new(set));
        let mut config = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
        // No 0-RTT: early data can be replayed, and an upgrade request must not be.
        config.max_early_data_size = 0;
        config.send_half_rtt_data = false;
        // Ticket keys rotate (every 6 hours, the previous key still accepted for as long).
        config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()?;
        config.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE_ENTRIES);
        Ok(TlsServer {
            config: Arc::new(config),
            resolver,
            provider,
        })
    }

    /// What each new TLS connection is built from.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.config.clone()
    }

    /// Re-read every certificate file: new handshakes get the new certificates, open
    /// connections keep theirs. On any error the certificates in force stay.
    pub fn reload(&self, files: &[CertificateConfig]) -> Result<(), TlsError> {
        let set = load_all(files, &self.provider)?;
        for l in set.loaded() {
            tracing::info!(
                file = %l.cert_path.display(),
                names = ?l.names,
                "TLS certificate loaded"
            );
        }
        expiry::log_standing(set.loaded());
        self.resolver.replace(set);
        Ok(())
    }

    /// The certificates in force.
    pub fn certificates(&self) -> Arc<CertSet> {
        self.resolver.current()
    }
}
