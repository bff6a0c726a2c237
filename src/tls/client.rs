//! TLS to backends (`tls://HOST:PORT` in `[[upstreams]]`): the rustls `ClientConfig` one
//! upstream's links share, built from its `ca_file` (the only roots trusted: never the
//! system's) and, for mutual TLS, its `client_cert` and `client_key`. No IO on the data path:
//! the relay's links (`relay::link::tls`) drive one `ClientConnection` each from this.
//!
//! Data path: gateway (start) -> **tls::client** (files -> `ClientConfig`) -> relay link
//! (one `ClientConnection` per backend connection) -> backend.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::ResolvesClientCert;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, SignatureScheme};

use super::certs::{self, CertError, Loaded};

/// The files behind one upstream's TLS client; `key` names the upstream in the config
/// (`upstreams[2]`) for errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFiles {
    pub key: String,
    pub ca_file: PathBuf,
    /// Both or neither (the config check refuses one alone).
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// Why an upstream's TLS client cannot be built; names the key and the file.
#[derive(Debug, thiserror::Error)]
pub enum ClientTlsError {
    #[error("`{key}.ca_file`: {problem}")]
    Ca { key: String, problem: String },
    #[error("`{key}.client_cert`: {source}")]
    ClientCert {
        key: String,
        #[source]
        source: CertError,
    },
    #[error("`{key}`: cannot set up rustls: {source}")]
    Rustls {
        key: String,
        #[source]
        source: rustls::Error,
    },
}

/// One upstream's TLS client: what its links connect with, and the client certificate (for
/// check-config and the expiry metric).
#[derive(Debug, Clone)]
pub struct TlsClient {
    pub config: Arc<ClientConfig>,
    pub client_cert: Option<Loaded>,
    /// The CA certificates trusted, in file order (DER).
    pub roots: Vec<CertificateDer<'static>>,
}

/// The CA certificates of `ca_file`: at least one, every one usable as a trust anchor.
fn read_roots(
    files: &ClientFiles,
) -> Result<(RootCertStore, Vec<CertificateDer<'static>>), ClientTlsError> {
    let path = files.ca_file.display();
    let err = |problem: String| ClientTlsError::Ca {
        key: files.key.clone(),
        problem,
    };
    let pem = std::fs::read(&files.ca_file).map_err(|e| err(format!("cannot read {path}: {e}")))?;
    let ders = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(format!("{path} is not valid PEM: {e}")))?;
    if ders.is_empty() {
        return Err(err(format!("{path} holds no CERTIFICATE block")));
    }
    let mut roots = RootCertStore::empty();
    for (i, der) in ders.iter().enumerate() {
        roots
            .add(der.clone())
            .map_err(|e| err(format!("{path}: certificate {i} is not a usable CA: {e}")))?;
    }
    Ok((roots, ders))
}

/// Build the client configuration of one upstream: TLS 1.3 and 1.2, rustls' default suites,
/// the server verified against `ca_file` and the backend's host name, session resumption.
pub fn client_config(files: &ClientFiles) -> Result<TlsClient, ClientTlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let (roots, ders) = read_roots(files)?;
    let rustls_err = |source| ClientTlsError::Rustls {
        key: files.key.clone(),
        source,
    };
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(rustls_err)?
        .with_root_certificates(roots);
    let (config, client_cert) = match &files.client_cert {
        Some((cert, key)) => {
            let loaded =
                certs::load(cert, key, &provider).map_err(|source| ClientTlsError::ClientCert {
                    key: files.key.clone(),
                    source,
                })?;
            let resolver = Arc::new(FixedClientCert(loaded.key.clone()));
            (builder.with_client_cert_resolver(resolver), Some(loaded))
        }
        None => (builder.with_no_client_auth(), None),
    };
    Ok(TlsClient {
        config: Arc::new(config),
        client_cert,
        roots: ders,
    })
}

/// The one client certificate an upstream presents, to any server that asks.
#[derive(Debug)]
struct FixedClientCert(Arc<CertifiedKey>);

impl ResolvesClientCert for FixedClientCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(ca: &str) -> ClientFiles {
        ClientFiles {
            key: "upstreams[1]".into(),
            ca_file: PathBuf::from(ca),
            client_cert: None,
        }
    }

    #[test]
    fn a_missing_ca_file_names_the_key_and_the_file() {
        let err = client_config(&files("/nonexistent/ca.pem"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("`upstreams[1].ca_file`: cannot read /nonexistent/ca.pem"),
            "{err}"
        );
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let path = std::env::temp_dir().join(format!("ringway-ca-{}.pem", std::process::id()));
        std::fs::write(&path, "no pem here\n").unwrap();
        let err = client_config(&files(path.to_str().unwrap()))
            .unwrap_err()
            .to_string();
        let _ = std::fs::remove_file(&path);
        assert!(err.contains("holds no CERTIFICATE block"), "{err}");
    }

    /// A leaf certificate (not a CA) can still anchor trust in rustls; what matters here is
    /// that the client certificate's key is checked against it.
    #[test]
    fn a_client_key_of_another_certificate_is_refused() {
        let fixture = |n: &str| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/keys/tls")
                .join(n)
        };
        let f = ClientFiles {
            key: "upstreams[0]".into(),
            ca_file: fixture("ec-sec1.pem"),
            client_cert: Some((fixture("ec-sec1.pem"), fixture("rsa-pkcs1.key"))),
        };
        let err = client_config(&f).unwrap_err().to_string();
        assert!(err.starts_with("`upstreams[0].client_cert`"), "{err}");
        assert!(err.contains("does not match"), "{err}");
    }
}
