//! Certificate validity as an operator sees it: whether a loaded leaf is expired, not yet
//! valid or close to its notAfter, the ERROR/WARN lines at start and on SIGHUP, and the
//! label and seconds `ringway_tls_certificate_expiry_seconds` reports. No IO beyond logging.

use super::certs::Loaded;

/// A leaf that expires within this many seconds (14 days) is warned about.
pub const WARN_WITHIN_S: i64 = 14 * 86_400;

/// Where a leaf stands at a given time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    NotYetValid,
    Expired,
    /// Valid, expiring within [`WARN_WITHIN_S`].
    ExpiresSoon,
    Valid,
}

pub fn standing(l: &Loaded, now: i64) -> Standing {
    if now < l.not_before {
        Standing::NotYetValid
    } else if now > l.not_after {
        Standing::Expired
    } else if l.not_after - now <= WARN_WITHIN_S {
        Standing::ExpiresSoon
    } else {
        Standing::Valid
    }
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A Unix time as `Dec  3 05:37:40 2026 +00:00` (the ASN.1 time's own rendering).
pub fn date(t: i64) -> String {
    x509_parser::time::ASN1Time::from_timestamp(t)
        .map(|a| a.to_string())
        .unwrap_or_else(|_| format!("@{t}"))
}

/// The metric's `name` label: the leaf's first DNS name, else its file.
pub fn label(l: &Loaded) -> String {
    l.names
        .first()
        .cloned()
        .unwrap_or_else(|| l.cert_path.display().to_string())
}

/// One line per leaf that needs attention: ERROR when expired (it is still served: a
/// client may accept it, and refusing to start would take everything down), WARN when not
/// yet valid or expiring within 14 days.
pub fn log_standing<'a>(loaded: impl IntoIterator<Item = &'a Loaded>) {
    let now = unix_now();
    for l in loaded {
        let file = l.cert_path.display();
        let after = date(l.not_after);
        match standing(l, now) {
            Standing::Expired => tracing::error!(
                file = %file, names = ?l.names,
                "TLS certificate expired at {after}; still served until it is replaced"
            ),
            Standing::NotYetValid => tracing::warn!(
                file = %file, names = ?l.names,
                "TLS certificate is not valid before {}", date(l.not_before)
            ),
            Standing::ExpiresSoon => tracing::warn!(
                file = %file, names = ?l.names,
                "TLS certificate expires at {after}, in {} days", (l.not_after - now) / 86_400
            ),
            Standing::Valid => {}
        }
    }
}

/// (label, notAfter) rows for the expiry metric; a label seen twice keeps the earlier
/// notAfter (the one to act on first).
pub fn expiry_rows<'a>(loaded: impl IntoIterator<Item = &'a Loaded>) -> Vec<(String, i64)> {
    let mut rows: Vec<(String, i64)> = Vec::new();
    for l in loaded {
        let name = label(l);
        match rows.iter_mut().find(|(n, _)| *n == name) {
            Some(row) => row.1 = row.1.min(l.not_after),
            None => rows.push((name, l.not_after)),
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(names: &[&str], not_before: i64, not_after: i64) -> Loaded {
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let key = rcgen::KeyPair::generate().unwrap();
        let der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        let signing = provider.key_provider.load_private_key(der).unwrap();
        let chain = vec![rustls::pki_types::CertificateDer::from(vec![0])];
        Loaded {
            key: std::sync::Arc::new(rustls::sign::CertifiedKey::new(chain, signing)),
            names: names.iter().map(|s| s.to_string()).collect(),
            cert_path: "/etc/ringway/leaf.pem".into(),
            not_before,
            not_after,
        }
    }

    #[test]
    fn standing_at_the_edges() {
        let l = leaf(&["a.test"], 1_000, 1_000 + 30 * 86_400);
        assert_eq!(standing(&l, 999), Standing::NotYetValid);
        assert_eq!(standing(&l, 1_000), Standing::Valid);
        assert_eq!(
            standing(&l, l.not_after - WARN_WITHIN_S - 1),
            Standing::Valid
        );
        assert_eq!(
            standing(&l, l.not_after - WARN_WITHIN_S),
            Standing::ExpiresSoon
        );
        assert_eq!(standing(&l, l.not_after), Standing::ExpiresSoon);
        assert_eq!(standing(&l, l.not_after + 1), Standing::Expired);
    }

    #[test]
    fn labels_are_the_first_name_or_the_file_and_repeats_keep_the_earliest() {
        let rows = expiry_rows(&[
            leaf(&["a.test", "b.test"], 0, 500),
            leaf(&[], 0, 700),
            leaf(&["a.test"], 0, 300),
        ]);
        assert_eq!(
            rows,
            vec![
                ("a.test".to_string(), 300),
                ("/etc/ringway/leaf.pem".to_string(), 700)
            ]
        );
        assert_eq!(date(0), "Jan  1 00:00:00 1970 +00:00");
    }
}
