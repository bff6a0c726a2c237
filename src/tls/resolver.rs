//! Choosing the certificate for one TLS handshake by its SNI name: exact names first, then
//! wildcards (`*.example.com` covers one label), else the first certificate. The set sits
//! behind a lock the resolver only reads (one uncontended read per handshake), so a reload
//! swaps it for new handshakes while open connections keep what they were given.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::certs::Loaded;

/// The certificates in force and their name index.
#[derive(Debug)]
pub struct CertSet {
    loaded: Vec<Loaded>,
    exact: HashMap<String, usize>,
    /// `example.com` for `*.example.com`.
    wildcard: HashMap<String, usize>,
}

impl CertSet {
    /// Index `loaded` (non-empty); a name two certificates list goes to the first.
    pub fn new(loaded: Vec<Loaded>) -> CertSet {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for (i, l) in loaded.iter().enumerate() {
            for name in &l.names {
                match name.strip_prefix("*.") {
                    Some(parent) => wildcard.entry(parent.to_string()).or_insert(i),
                    None => exact.entry(name.clone()).or_insert(i),
                };
            }
        }
        CertSet {
            loaded,
            exact,
            wildcard,
        }
    }

    /// The certificate for `sni`: exact, then wildcard, then the first (the default).
    pub fn pick(&self, sni: Option<&str>) -> Option<&Arc<CertifiedKey>> {
        let index = sni
            .map(|s| s.trim_end_matches('.').to_ascii_lowercase())
            .and_then(|name| {
                self.exact.get(&name).copied().or_else(|| {
                    let (_, parent) = name.split_once('.')?;
                    self.wildcard.get(parent).copied()
                })
            })
            .unwrap_or(0);
        self.loaded.get(index).map(|l| &l.key)
    }

    pub fn loaded(&self) -> &[Loaded] {
        &self.loaded
    }
}

/// rustls' certificate callback over the current [`CertSet`].
#[derive(Debug)]
pub struct Resolver {
    current: RwLock<Arc<CertSet>>,
}

impl Resolver {
    pub fn new(set: CertSet) -> Resolver {
        Resolver {
            current: RwLock::new(Arc::new(set)),
        }
    }

    /// New handshakes use `set` from now on.
    pub fn replace(&self, set: CertSet) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
    }

    pub fn current(&self) -> Arc<CertSet> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let set = self.current.read().unwrap_or_else(|e| e.into_inner());
        set.pick(hello.server_name()).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distinct keys are not needed to test the index: certificates are told apart by chain.
    fn loaded(names: &[&str], tag: u8) -> Loaded {
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let key = rcgen::KeyPair::generate().unwrap();
        let der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        let signing = provider.key_provider.load_private_key(der).unwrap();
        let chain = vec![rustls::pki_types::CertificateDer::from(vec![tag])];
        Loaded {
            key: Arc::new(CertifiedKey::new(chain, signing)),
            names: names.iter().map(|s| s.to_string()).collect(),
            cert_path: format!("cert{tag}.pem").into(),
            not_before: 0,
            not_after: i64::MAX,
        }
    }

    fn tag(set: &CertSet, sni: Option<&str>) -> u8 {
        set.pick(sni).unwrap().cert[0].as_ref()[0]
    }

    #[test]
    fn exact_then_wildcard_then_the_first() {
        let set = CertSet::new(vec![
            loaded(&["default.test"], 0),
            loaded(&["*.example.com", "example.com"], 1),
            loaded(&["api.example.com"], 2),
        ]);
        assert_eq!(tag(&set, None), 0, "no SNI: the first");
        assert_eq!(tag(&set, Some("unknown.test")), 0);
        assert_eq!(tag(&set, Some("example.com")), 1);
        assert_eq!(tag(&set, Some("www.example.com")), 1, "wildcard");
        assert_eq!(
            tag(&set, Some("API.Example.com.")),
            2,
            "exact beats wildcard"
        );
        assert_eq!(
            tag(&set, Some("a.b.example.com")),
            0,
            "a wildcard covers one label"
        );
    }
}
