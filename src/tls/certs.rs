//! Reading one certificate chain and its private key from PEM files into what rustls signs
//! handshakes with, and the DNS names (exact and wildcard) the leaf's subjectAltName lists,
//! which the SNI resolver picks it by. Errors name the file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

/// Why a certificate or key file cannot be used; every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot read {what} file {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate file {path}: {problem}")]
    Cert { path: PathBuf, problem: String },
    #[error("key file {path}: {problem}")]
    Key { path: PathBuf, problem: String },
    #[error("key file {key} does not match the certificate in {cert}: {problem}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        problem: String,
    },
}

/// One loaded certificate: the chain and key rustls serves, and the names it answers for.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub key: Arc<CertifiedKey>,
    /// Lower-case DNS names from the leaf's subjectAltName; wildcards as `*.example.com`.
    pub names: Vec<String>,
    /// Where it came from, for logs.
    pub cert_path: PathBuf,
    /// The leaf's validity, in seconds since the Unix epoch.
    pub not_before: i64,
    pub not_after: i64,
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|source| CertError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Load `cert` (PEM: the leaf, then its chain) and `key` (PEM: PKCS#8, SEC1 or PKCS#1),
/// check that the key signs for the leaf, and read the leaf's names.
pub fn load(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<Loaded, CertError> {
    let cert_pem = read("certificate", cert)?;
    let cert_err = |problem: String| CertError::Cert {
        path: cert.to_path_buf(),
        problem,
    };
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(format!("not valid PEM: {e}")))?;
    if chain.is_empty() {
        return Err(cert_err("holds no CERTIFICATE block".into()));
    }
    let names = leaf_names(&chain[0]).map_err(cert_err)?;
    let (not_before, not_after) = validity(&chain[0]).map_err(cert_err)?;

    let key_pem = read("key", key)?;
    let key_err = |problem: String| CertError::Key {
        path: key.to_path_buf(),
        problem,
    };
    let der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            key_err("holds no PRIVATE KEY, EC PRIVATE KEY or RSA PRIVATE KEY block".into())
        }
        e => key_err(format!("not valid PEM: {e}")),
    })?;
    let signing = provider
        .key_provider
        .load_private_key(der)
        .map_err(|e| key_err(format!("unusable private key: {e}")))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| CertError::Mismatch {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        problem: e.to_string(),
    })?;
    Ok(Loaded {
        key: Arc::new(certified),
        names,
        cert_path: cert.to_path_buf(),
        not_before,
        not_after,
    })
}

/// The leaf's notBefore and notAfter (Unix seconds).
fn validity(leaf: &CertificateDer<'_>) -> Result<(i64, i64), String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| format!("the first certificate cannot be parsed: {e}"))?;
    let v = parsed.validity();
    Ok((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// The DNS names of a leaf certificate's subjectAltName, lower-cased.
fn leaf_names(leaf: &CertificateDer<'_>) -> Result<Vec<String>, String> {
    let parsed = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| format!("the first certificate cannot be parsed: {e}"))?;
    let mut names: Vec<String> = parsed
        .valid_dns_names()
        .map(|n| n.trim_end_matches('.').to_ascii_lowercase())
        .collect();
    names.dedup();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_file_is_named() {
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let err = load(
            Path::new("/nonexistent/cert.pem"),
            Path::new("/nonexistent/key.pem"),
            &provider,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("/nonexistent/cert.pem"), "{err}");
        assert!(err.starts_with("cannot read certificate file"), "{err}");
    }

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/keys/tls")
            .join(name)
    }

    /// Keys as `openssl ecparam -genkey` (SEC1) and `openssl genrsa -traditional` (PKCS#1)
    /// write them; PKCS#8 is what rcgen writes (tests/tls.rs).
    #[test]
    fn sec1_and_pkcs1_keys_load_and_their_names_are_read() {
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let ec = load(&fixture("ec-sec1.pem"), &fixture("ec-sec1.key"), &provider).unwrap();
        assert_eq!(ec.names, ["sec1.test"]);
        let rsa = load(
            &fixture("rsa-pkcs1.pem"),
            &fixture("rsa-pkcs1.key"),
            &provider,
        )
        .unwrap();
        assert_eq!(rsa.names, ["pkcs1.test", "*.pkcs1.test"]);
    }

    #[test]
    fn a_key_of_another_certificate_is_refused_naming_both_files() {
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let err = load(
            &fixture("ec-sec1.pem"),
            &fixture("rsa-pkcs1.key"),
            &provider,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("rsa-pkcs1.key") && err.contains("ec-sec1.pem"),
            "{err}"
        );
        assert!(err.contains("does not match"), "{err}");
    }

    #[test]
    fn a_file_without_pem_blocks_is_refused() {
        let dir = std::env::temp_dir().join(format!("ringway-certs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cert = dir.join("empty-cert.pem");
        std::fs::write(&cert, "not a certificate\n").unwrap();
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let err = load(&cert, &cert, &provider).unwrap_err().to_string();
        assert!(err.contains("empty-cert.pem"), "{err}");
        assert!(err.contains("no CERTIFICATE"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
