//! Origin checks at the handshake: a browser page on another site must not open a
//! WebSocket with the user's cookies (cross-site WebSocket hijacking; RFC 6455 §10.2 leaves
//! the check to the server). Runs once per handshake, before the request reaches a backend;
//! a refusal is a 403.
//!
//! Patterns: `*` allows any origin (and a missing one); `https://app.example.com[:port]`
//! allows that origin exactly (scheme and host compared lower-case, a trailing dot dropped,
//! default ports 443/80 implied); `https://*.example.com[:port]` allows any subdomain of
//! example.com (at any depth) but not example.com itself. No pattern may name the opaque
//! origin `null` (sandboxed frames, `file:` pages): any site can produce it.

use std::collections::HashSet;

/// A pattern the policy cannot use, with the offending text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OriginError {
    #[error("origin pattern {0:?}: expected scheme://host[:port] with scheme http or https")]
    BadSyntax(String),
    #[error(
        "origin pattern {0:?}: a wildcard must be the whole first label, as https://*.example.com"
    )]
    BadWildcard(String),
    #[error("origin pattern {0:?}: a wildcard needs at least two labels after it (https://*.example.com)")]
    WildcardTooBroad(String),
    #[error(
        "origin pattern {0:?}: the opaque origin null can come from any site and cannot be allowed"
    )]
    NullOrigin(String),
}

/// An origin reduced to compare as browsers serialize it (RFC 6454 §6.2).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Normalized {
    https: bool,
    host: String,
    port: u16,
}

/// Parse `scheme://host[:port]` (an optional `/` after it), lower-casing and dropping a
/// trailing dot. `None` when it is not such an origin.
fn parse(text: &str) -> Option<Normalized> {
    let (scheme, rest) = text.split_once("://")?;
    let https = if scheme.eq_ignore_ascii_case("https") {
        true
    } else if scheme.eq_ignore_ascii_case("http") {
        false
    } else {
        return None;
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (addr, after) = v6.split_once(']')?;
        if addr.is_empty()
            || !addr
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return None;
        }
        (format!("[{}]", addr.to_ascii_lowercase()), after)
    } else {
        let end = rest.find(':').unwrap_or(rest.len());
        let host = &rest[..end];
        let host = host.strip_suffix('.').unwrap_or(host);
        let valid = !host.is_empty()
            && host.split('.').all(|l| {
                !l.is_empty()
                    && l.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'*')
            });
        if !valid {
            return None;
        }
        (host.to_ascii_lowercase(), &rest[end..])
    };
    let port = match port.strip_prefix(':') {
        None if port.is_empty() => {
            if https {
                443
            } else {
                80
            }
        }
        None => return None,
        Some(p) if !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()) => {
            p.parse::<u16>().ok()?
        }
        Some(_) => return None,
    };
    Some(Normalized { https, host, port })
}

/// Which `Origin` header values a route accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginPolicy {
    allow_all: bool,
    exact: HashSet<Normalized>,
    /// (https, ".example.com", port): the host must end with the suffix and have a label before it.
    wildcard: Vec<(bool, String, u16)>,
    /// Whether a request without `Origin` passes. Browsers always send it on a WebSocket
    /// handshake, so a missing one means a non-browser client, which origin checks cannot
    /// restrain anyway (it can send any value); refuse it only to keep such clients out.
    pub allow_missing: bool,
}

impl OriginPolicy {
    /// Allows everything, with or without `Origin`: the policy when none is configured.
    pub fn allow_all() -> OriginPolicy {
        OriginPolicy {
            allow_all: true,
            exact: HashSet::new(),
            wildcard: Vec::new(),
            allow_missing: true,
        }
    }

    /// Build from configured patterns. An empty list or a `*` entry allows everything;
    /// `allow_missing` starts `false` (set the field to let non-browser clients in).
    pub fn from_patterns(patterns: &[String]) -> Result<OriginPolicy, OriginError> {
        if patterns.is_empty() || patterns.iter().any(|p| p.trim() == "*") {
            // Still reject broken entries next to `*`: they are likely a typo.
            for p in patterns.iter().filter(|p| p.trim() != "*") {
                Self::from_patterns(std::slice::from_ref(p))?;
            }
            return Ok(Self::allow_all());
        }
        let mut policy = OriginPolicy {
            allow_all: false,
            exact: HashSet::new(),
            wildcard: Vec::new(),
            allow_missing: false,
        };
        for raw in patterns {
            let p = raw.trim();
            if p.eq_ignore_ascii_case("null") {
                return Err(OriginError::NullOrigin(raw.clone()));
            }
            let origin = parse(p).ok_or_else(|| OriginError::BadSyntax(raw.clone()))?;
            if let Some(suffix) = origin.host.strip_prefix('*') {
                if !suffix.starts_with('.') || suffix.contains('*') {
                    return Err(OriginError::BadWildcard(raw.clone()));
                }
                if suffix[1..].split('.').count() < 2 {
                    return Err(OriginError::WildcardTooBroad(raw.clone()));
                }
                policy
                    .wildcard
                    .push((origin.https, suffix.to_string(), origin.port));
            } else if origin.host.contains('*') {
                return Err(OriginError::BadWildcard(raw.clone()));
            } else {
                policy.exact.insert(origin);
            }
        }
        Ok(policy)
    }

    /// Whether a handshake with this `Origin` value (or none) may proceed; a `false` is a
    /// 403. The opaque `null` and anything that is not `scheme://host[:port]` never match a
    /// pattern.
    pub fn allows(&self, origin: Option<&str>) -> bool {
        if self.allow_all {
            return true;
        }
        let Some(value) = origin else {
            return self.allow_missing;
        };
        let value = value.trim();
        // Browsers send the origin without a path, so a trailing `/` is not accepted here.
        if value.ends_with('/') {
            return false;
        }
        let Some(o) = parse(value) else {
            return false;
        };
        if o.host.contains('*') {
            return false;
        }
        if self.exact.contains(&o) {
            return true;
        }
        self.wildcard.iter().any(|(https, suffix, port)| {
            *https == o.https
                && *port == o.port
                && o.host.len() > suffix.len()
                && o.host.ends_with(suffix.as_str())
        })
    }

    /// Whether every origin passes (no check configured).
    pub fn is_allow_all(&self) -> bool {
        self.allow_all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(patterns: &[&str]) -> OriginPolicy {
        OriginPolicy::from_patterns(&patterns.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap()
    }

    fn error(pattern: &str) -> OriginError {
        OriginPolicy::from_patterns(&[pattern.to_string()]).unwrap_err()
    }

    #[test]
    fn exact_origin_matches_normalized_forms_only() {
        let p = policy(&["https://App.Example.com"]);
        assert!(p.allows(Some("https://app.example.com")));
        assert!(p.allows(Some("HTTPS://APP.EXAMPLE.COM")));
        assert!(p.allows(Some("https://app.example.com:443")));
        assert!(p.allows(Some("https://app.example.com.")));
        assert!(!p.allows(Some("http://app.example.com")));
        assert!(!p.allows(Some("https://app.example.com:8443")));
        assert!(!p.allows(Some("https://app.example.com.evil.com")));
        assert!(!p.allows(Some("https://evilapp.example.com")));
        assert!(!p.allows(Some("https://app.example.com/")));
        assert!(!p.allows(Some("https://app.example.com/path")));
        assert!(!p.allows(Some("https://user@app.example.com")));
        assert!(!p.allows(Some("null")));
        assert!(!p.allows(Some("")));
        assert!(!p.allows(None));
    }

    #[test]
    fn explicit_ports_and_default_ports() {
        let p = policy(&["http://localhost:3000", "https://a.example.com:443/"]);
        assert!(p.allows(Some("http://localhost:3000")));
        assert!(!p.allows(Some("http://localhost")));
        assert!(!p.allows(Some("http://localhost:30000")));
        assert!(p.allows(Some("https://a.example.com")));
        let p = policy(&["http://example.com"]);
        assert!(p.allows(Some("http://example.com:80")));
        assert!(!p.allows(Some("http://example.com:65536")));
        assert!(!p.allows(Some("http://example.com:")));
    }

    #[test]
    fn wildcard_matches_subdomains_not_apex_or_lookalikes() {
        let p = policy(&["https://*.example.com"]);
        assert!(p.allows(Some("https://app.example.com")));
        assert!(p.allows(Some("https://a.b.example.com")));
        assert!(p.allows(Some("https://APP.Example.COM.")));
        assert!(!p.allows(Some("https://example.com")));
        assert!(!p.allows(Some("https://.example.com")));
        assert!(!p.allows(Some("https://evil-example.com")));
        assert!(!p.allows(Some("https://example.com.evil.com")));
        assert!(!p.allows(Some("https://app.example.com.evil.com")));
        assert!(!p.allows(Some("http://app.example.com")));
        assert!(!p.allows(Some("https://app.example.com:8443")));
        assert!(!p.allows(Some("https://*.example.com")));
    }

    #[test]
    fn ipv6_hosts() {
        let p = policy(&["http://[::1]:8080"]);
        assert!(p.allows(Some("http://[::1]:8080")));
        assert!(!p.allows(Some("http://[::2]:8080")));
    }

    #[test]
    fn star_and_empty_allow_everything_including_missing() {
        for p in [policy(&["*"]), policy(&[]), OriginPolicy::allow_all()] {
            assert!(p.is_allow_all());
            assert!(p.allows(None));
            assert!(p.allows(Some("null")));
            assert!(p.allows(Some("https://anything.test")));
        }
    }

    #[test]
    fn missing_origin_needs_the_flag() {
        let mut p = policy(&["https://app.example.com"]);
        assert!(!p.allows(None));
        p.allow_missing = true;
        assert!(p.allows(None));
        // The flag does not let a wrong origin in.
        assert!(!p.allows(Some("https://evil.com")));
    }

    #[test]
    fn bad_patterns_are_refused_with_a_reason() {
        assert_eq!(error("null"), OriginError::NullOrigin("null".into()));
        assert!(matches!(
            error("app.example.com"),
            OriginError::BadSyntax(_)
        ));
        assert!(matches!(
            error("ftp://example.com"),
            OriginError::BadSyntax(_)
        ));
        assert!(matches!(
            error("https://example.com/app"),
            OriginError::BadSyntax(_)
        ));
        assert!(matches!(
            error("https://exa mple.com"),
            OriginError::BadSyntax(_)
        ));
        assert!(matches!(error("https://"), OriginError::BadSyntax(_)));
        assert!(matches!(
            error("https://*example.com"),
            OriginError::BadWildcard(_)
        ));
        assert!(matches!(
            error("https://a.*.com"),
            OriginError::BadWildcard(_)
        ));
        assert!(matches!(
            error("https://*.*.com"),
            OriginError::BadWildcard(_)
        ));
        assert!(matches!(
            error("https://*.com"),
            OriginError::WildcardTooBroad(_)
        ));
        // A typo next to `*` is still reported.
        let typo = ["*".to_string(), "htps://x.com".to_string()];
        assert!(OriginPolicy::from_patterns(&typo).is_err());
        // The message names the pattern, for the config error.
        assert!(error("nope").to_string().contains("\"nope\""));
    }

    #[test]
    fn hostile_origin_values_never_panic_and_never_match() {
        let p = policy(&["https://app.example.com", "https://*.example.org:8443"]);
        let huge_host = format!("https://{}.example.org:8443", "a".repeat(1 << 20));
        let values = [
            "",
            ":",
            "://",
            "https://",
            "https://:",
            "https://[",
            "https://[]",
            "https://[é]",
            "https://app.example.com:",
            "https://app.example.com:99999",
            "https://app.example.com:4é3",
            "https://app.example.com:é",
            "https://appé.example.com",
            "é://app.example.com",
            "https://é",
            "https://ééé:é",
            "https://*.example.org:8443",
            "https://.example.org:8443",
            "https://app.example.com\0",
            "https://app.example.com\r\nX: y",
            "\u{1F600}",
        ];
        for v in values {
            assert!(!p.allows(Some(v)), "{v:?}");
        }
        assert!(!p.allows(Some(&"é".repeat(1 << 16))));
        // A huge but well-formed subdomain is matched without trouble.
        assert!(p.allows(Some(&huge_host)));
        // Patterns with the same shapes are refused at config load, not panicked on.
        for bad in [
            "",
            "é",
            "https://é",
            "https://*.é",
            "https://*é.example.com",
            "https://[",
            "https://*.",
            "https://a:é",
        ] {
            assert!(
                OriginPolicy::from_patterns(&[bad.to_string()]).is_err(),
                "{bad:?}"
            );
        }
    }
}
