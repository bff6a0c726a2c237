//! Certificates for the TLS tests, made in the test (rcgen): a CA, leaf certificates it signs
//! (server or client, with chosen names and validity), and a scratch folder for their PEM
//! files. Nothing here talks to the gateway.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A test CA that signs leaf certificates.
pub struct Ca {
    pub cert: rcgen::Certificate,
    key: KeyPair,
}

/// A leaf certificate and its key as PEM, and as DER for a rustls server or client.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
    pub key_der: Vec<u8>,
}

impl Leaf {
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::try_from(self.key_der.clone()).expect("a PKCS#8 key")
    }
}

/// What a leaf is for and when it is valid.
pub struct LeafSpec<'a> {
    pub names: &'a [&'a str],
    pub client: bool,
    /// Valid until `now + valid_for` (None: rcgen's default, 4096).
    pub valid_for: Option<Duration>,
    /// Expired `expired_ago` ago (valid for the day before).
    pub expired_ago: Option<Duration>,
    /// Valid only from `now + later`.
    pub starts_in: Option<Duration>,
}

impl<'a> LeafSpec<'a> {
    pub fn server(names: &'a [&'a str]) -> LeafSpec<'a> {
        LeafSpec {
            names,
            client: false,
            valid_for: None,
            expired_ago: None,
            starts_in: None,
        }
    }
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    pub fn der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    /// A server certificate for `names` (DNS names or IP addresses), valid for years.
    pub fn leaf(&self, names: &[&str]) -> Leaf {
        self.make(&LeafSpec::server(names))
    }

    /// A client certificate (clientAuth) for `name`.
    pub fn client_leaf(&self, name: &str) -> Leaf {
        let names = [name];
        self.make(&LeafSpec {
            client: true,
            ..LeafSpec::server(&names)
        })
    }

    pub fn make(&self, spec: &LeafSpec<'_>) -> Leaf {
        let names: Vec<String> = spec.names.iter().map(|s| s.to_string()).collect();
        let mut p = CertificateParams::new(names).unwrap();
        p.distinguished_name.push(DnType::CommonName, spec.names[0]);
        p.extended_key_usages = vec![if spec.client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        let now = SystemTime::now();
        if let Some(d) = spec.valid_for {
            p.not_after = (now + d).into();
        }
        if let Some(d) = spec.expired_ago {
            p.not_before = (now - d - Duration::from_secs(86_400)).into();
            p.not_after = (now - d).into();
        }
        if let Some(d) = spec.starts_in {
            p.not_before = (now + d).into();
            p.not_after = (now + d + Duration::from_secs(86_400 * 365)).into();
        }
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
            key_der: key.serialize_der(),
        }
    }
}

/// A scratch folder for certificate files, removed on drop.
pub struct Dir(pub PathBuf);

impl Dir {
    pub fn new(tag: &str) -> Dir {
        let p = std::env::temp_dir().join(format!("ringway-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }

    /// Write `leaf` as `<name>.pem` / `<name>.key`; returns both paths. Each is written
    /// beside and renamed into place, as a certificate manager does (a reload never sees
    /// half a file).
    pub fn write(&self, name: &str, leaf: &Leaf) -> (PathBuf, PathBuf) {
        let cert = self.0.join(format!("{name}.pem"));
        let key = self.0.join(format!("{name}.key"));
        std::fs::write(self.0.join("tmp.pem"), &leaf.cert_pem).unwrap();
        std::fs::write(self.0.join("tmp.key"), &leaf.key_pem).unwrap();
        std::fs::rename(self.0.join("tmp.pem"), &cert).unwrap();
        std::fs::rename(self.0.join("tmp.key"), &key).unwrap();
        (cert, key)
    }

    /// Write `text` to `name` in the folder.
    pub fn file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

pub fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}
