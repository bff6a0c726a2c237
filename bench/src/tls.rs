//! The client side of wss://: one rustls `ClientConfig` per run, shared by every connection,
//! that trusts the CA given with `--ca` (none otherwise, so an unverifiable server fails with
//! a clear error) or, with `--insecure`, verifies nothing but the handshake signatures. Each
//! connection owns one boxed `ClientConnection`; the driver in conn.rs moves its records.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::Resumption;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

/// How wss:// connections verify the server (ignored for ws://, where giving them is an error).
#[derive(Debug, Clone, Default, Args)]
pub struct TlsArgs {
    /// PEM file of the CA(s) that signed the server's certificate (wss:// only).
    #[arg(long, value_name = "FILE", conflicts_with = "insecure")]
    pub ca: Option<PathBuf>,
    /// Do not verify the server's certificate at all (wss:// only; for self-signed tests).
    #[arg(long)]
    pub insecure: bool,
    /// Full TLS handshake on every connection: no session resumption (wss:// only).
    #[arg(long)]
    pub no_resume: bool,
}

/// What every wss:// connection of a run is built from.
#[derive(Debug, Clone)]
pub struct TlsClient {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl PartialEq for TlsClient {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.config, &other.config) && self.name == other.name
    }
}

impl Eq for TlsClient {}

impl TlsClient {
    /// `host` is the URL's host (without the port): the SNI name and the name verified.
    pub fn new(host: &str, args: &TlsArgs) -> Result<TlsClient, String> {
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| format!("{host:?} is not a valid TLS server name: {e}"))?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?;
        let mut config = if args.insecure {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
                .with_no_client_auth()
        } else {
            let mut roots = RootCertStore::empty();
            if let Some(path) = &args.ca {
                let certs = CertificateDer::pem_file_iter(path)
                    .map_err(|e| format!("--ca {}: {e}", path.display()))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("--ca {}: {e}", path.display()))?;
                if certs.is_empty() {
                    return Err(format!("--ca {}: no certificate in it", path.display()));
                }
                for c in certs {
                    roots
                        .add(c)
                        .map_err(|e| format!("--ca {}: {e}", path.display()))?;
                }
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        if args.no_resume {
            config.resumption = Resumption::disabled();
        }
        Ok(TlsClient {
            config: Arc::new(config),
            name,
        })
    }

    /// A fresh client connection; its ClientHello is ready to write.
    pub fn start(&self) -> Result<Box<ClientConnection>, rustls::Error> {
        ClientConnection::new(self.config.clone(), self.name.clone()).map(Box::new)
    }
}

/// Why a TLS handshake failed, with what to do about it when it is the certificate.
pub fn describe(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(_) => format!(
            "TLS: {e} (the server's certificate does not verify: pass --ca FILE with the CA \
             that signed it, or --insecure)"
        ),
        _ => format!("TLS: {e}"),
    }
}

/// `--insecure`: any certificate is accepted; handshake signatures are still checked, so the
/// server still proves it holds the key of the certificate it sent.
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_empty_ca_file_is_named() {
        let args = TlsArgs {
            ca: Some("/nonexistent/ca.pem".into()),
            ..TlsArgs::default()
        };
        let err = TlsClient::new("localhost", &args).unwrap_err();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
        let empty = std::env::temp_dir().join(format!("bench-empty-ca-{}", std::process::id()));
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let args = TlsArgs {
            ca: Some(empty.clone()),
            ..TlsArgs::default()
        };
        let err = TlsClient::new("localhost", &args).unwrap_err();
        std::fs::remove_file(&empty).unwrap();
        assert!(err.contains("no certificate"), "{err}");
    }

    #[test]
    fn ip_and_dns_hosts_are_server_names() {
        let args = TlsArgs {
            insecure: true,
            ..TlsArgs::default()
        };
        assert!(TlsClient::new("127.0.0.1", &args).unwrap().start().is_ok());
        assert!(TlsClient::new("localhost", &args).unwrap().start().is_ok());
        assert!(TlsClient::new("bad name!", &args).is_err());
    }
}
