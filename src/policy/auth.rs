//! JWT verification at the handshake, so a client without a valid token is refused with a
//! 401 at the edge and never reaches a backend. The verified claims a route names are handed
//! to the backend with the `open` event.
//!
//! Sans-IO: `verify` takes `now_s` (Unix seconds) and checks `exp`/`nbf` itself; the
//! library's own time checks, which read the system clock, are turned off. Keys are parsed
//! once, at config load, by [`JwtVerifier::new`].
//!
//! Where a token may come from ([`extract_token`]), first match wins:
//! 1. `Authorization: Bearer <jwt>` (RFC 6750 §2.1), for non-browser clients;
//! 2. a `Sec-WebSocket-Protocol` entry `access_token.<jwt>`, for browsers, whose WebSocket
//!    API cannot set headers; the 101 must then select a protocol the client offered
//!    ([`TokenFrom::Subprotocol`] says which), or the browser fails the handshake;
//! 3. `?token=<jwt>` in the query (percent-decoded), the fallback: URLs get logged, so
//!    strip it with [`strip_token_param`] before the query is passed to a backend.

use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

/// The `Sec-WebSocket-Protocol` entry prefix that carries a token: `access_token.<jwt>`.
/// JWT characters (base64url and `.`) are all valid in a protocol token (RFC 6455 §4.1).
pub const TOKEN_PROTOCOL_PREFIX: &str = "access_token.";

/// The `Authorization` auth-scheme (and its separating space) that carries a token.
const BEARER: &[u8] = b"bearer ";

/// The query parameter that carries a token.
pub const TOKEN_QUERY_PARAM: &str = "token";

/// Longer tokens are refused as malformed before any crypto is spent on them.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// HS256 secrets shorter than the hash output are refused (RFC 7518 §3.2).
const MIN_HS256_SECRET_BYTES: usize = 32;

/// A route's JWT settings, as written in the route config.
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// `HS256`, `RS256` or `ES256`; tokens signed with any other algorithm are refused.
    pub algorithm: String,
    /// The shared secret for HS256 (at least 32 bytes).
    #[serde(default)]
    pub secret: Option<String>,
    /// The public key for RS256/ES256, PEM (`BEGIN PUBLIC KEY`, or `BEGIN RSA PUBLIC KEY`).
    #[serde(default)]
    pub public_key_pem: Option<String>,
    /// Required `iss`, when set.
    #[serde(default)]
    pub issuer: Option<String>,
    /// Required `aud` (or one of its entries), when set. Unset accepts any `aud`.
    #[serde(default)]
    pub audience: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    #[serde(default)]
    pub leeway_s: u64,
    /// Claims passed to the backend's `open` event, in this order, when present.
    #[serde(default)]
    pub pass_claims: Vec<String>,
}

/// Keeps the secret out of logs.
impl std::fmt::Debug for JwtConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtConfig")
            .field("algorithm", &self.algorithm)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("public_key_pem", &self.public_key_pem.is_some())
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway_s", &self.leeway_s)
            .field("pass_claims", &self.pass_claims)
            .finish()
    }
}

/// A JWT config the verifier cannot use (reported at config load).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtConfigError {
    #[error("jwt algorithm {0:?} is not supported (HS256, RS256 or ES256)")]
    UnsupportedAlgorithm(String),
    #[error("jwt algorithm HS256 needs `secret`")]
    MissingSecret,
    #[error("jwt `secret` must be at least 32 bytes for HS256 (RFC 7518 §3.2)")]
    ShortSecret,
    #[error("jwt algorithm {0} needs `public_key_pem`")]
    MissingPublicKey(&'static str),
    #[error("jwt algorithm {0} takes {1}, not {2}")]
    WrongKeyKind(&'static str, &'static str, &'static str),
    #[error("jwt public key for {0} cannot be read: {1}")]
    BadKey(&'static str, String),
}

/// Why a token was refused: each is a 401 with [`AuthError::reason`] as the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing token")]
    Missing,
    #[error("malformed token")]
    Malformed,
    #[error("bad token signature")]
    BadSignature,
    #[error("token has no expiry")]
    MissingExpiry,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("wrong token issuer")]
    WrongIssuer,
    #[error("wrong token audience")]
    WrongAudience,
    #[error("unsupported token algorithm")]
    UnsupportedAlgorithm,
    /// A claim the route passes to its backend holds a control character (CR, LF, NUL,
    /// another C0 or DEL): forwarded, it could split a header or a log line downstream.
    #[error("token claim has control characters")]
    ClaimControlCharacters,
}

impl AuthError {
    /// Always 401 (RFC 6750 §3.1 `invalid_token`, or no token at all).
    pub fn status(&self) -> u16 {
        401
    }

    /// Short reason for the 401 body; says which check failed, never the token.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing token",
            AuthError::Malformed => "malformed token",
            AuthError::BadSignature => "bad token signature",
            AuthError::MissingExpiry => "token has no expiry",
            AuthError::Expired => "token expired",
            AuthError::NotYetValid => "token not yet valid",
            AuthError::WrongIssuer => "wrong token issuer",
            AuthError::WrongAudience => "wrong token audience",
            AuthError::UnsupportedAlgorithm => "unsupported token algorithm",
            AuthError::ClaimControlCharacters => "token claim has control characters",
        }
    }
}

/// What a verified token tells the edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// `sub`, if it is a string.
    pub subject: Option<String>,
    /// `exp` (Unix seconds, without leeway): when the edge may close the connection.
    pub expires_at_s: u64,
    /// The route's `pass_claims` that are present, in config order: strings as they are,
    /// other JSON values as JSON text.
    pub pass: Vec<(String, String)>,
}

/// Where the token was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenFrom {
    AuthorizationHeader,
    /// The offered protocol at `index` carried the token. The 101 MUST carry
    /// `Sec-WebSocket-Protocol: <select>`: the first offered protocol that is not a token
    /// entry (the client's real subprotocol, e.g. `access_token.<jwt>, chat` selects
    /// `chat`), or, when the client offered only token entries, the token entry itself,
    /// since a browser fails a handshake whose response selects none of its offers.
    Subprotocol {
        index: usize,
        select: String,
    },
    /// Percent-decoded from `?token=`; strip it from the query passed on.
    Query,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSource {
    pub token: String,
    pub from: TokenFrom,
}

/// Whether an offered subprotocol is a token carrier (leave such entries out of anything
/// passed to a backend or logged).
pub fn is_token_protocol(protocol: &str) -> bool {
    protocol.len() > TOKEN_PROTOCOL_PREFIX.len()
        && protocol.as_bytes()[..TOKEN_PROTOCOL_PREFIX.len()]
            .eq_ignore_ascii_case(TOKEN_PROTOCOL_PREFIX.as_bytes())
}

/// Find the token in a handshake: header fields as sent (any case), the raw query (without
/// `?`) and the offered subprotocols in order. `None` is [`AuthError::Missing`].
pub fn extract_token(
    headers: &[(String, Vec<u8>)],
    query: Option<&str>,
    protocols: &[String],
) -> Option<TokenSource> {
    for (name, value) in headers {
        if !name.eq_ignore_ascii_case("authorization") {
            continue;
        }
        // Bytes, not text: the value is the client's, and slicing a `str` at a byte that is
        // not a character boundary would panic (`Authorization: abcdefé`).
        let value = value.trim_ascii();
        // The auth-scheme is case-insensitive (RFC 9110 §11.1).
        let Some((scheme, rest)) = value.split_at_checked(BEARER.len()) else {
            continue;
        };
        if !scheme.eq_ignore_ascii_case(BEARER) {
            continue;
        }
        let Ok(token) = std::str::from_utf8(rest.trim_ascii()) else {
            continue;
        };
        if !token.is_empty() {
            return Some(TokenSource {
                token: token.to_string(),
                from: TokenFrom::AuthorizationHeader,
            });
        }
    }
    if let Some(index) = protocols.iter().position(|p| is_token_protocol(p)) {
        let select = protocols
            .iter()
            .find(|p| !is_token_protocol(p))
            .unwrap_or(&protocols[index])
            .clone();
        // `is_token_protocol` matched an ASCII prefix, so its end is a character boundary;
        // `get` keeps that from being a panic if it ever changes.
        let token = protocols[index]
            .get(TOKEN_PROTOCOL_PREFIX.len()..)
            .unwrap_or_default();
        return Some(TokenSource {
            token: token.to_string(),
            from: TokenFrom::Subprotocol { index, select },
        });
    }
    let token = query?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, v)| *k == TOKEN_QUERY_PARAM && !v.is_empty())
        .map(|(_, v)| percent_decode(v))?;
    Some(TokenSource {
        token,
        from: TokenFrom::Query,
    })
}

/// The query without its `token` parameters, to pass to a backend; `None` if nothing is left.
/// A name that percent-decodes to `token` (`%74oken=`) is stripped too: a backend that
/// decodes the query would read it as the token.
pub fn strip_token_param(query: &str) -> Option<String> {
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let name = pair.split_once('=').map_or(*pair, |(k, _)| k);
            !pair.is_empty()
                && name != TOKEN_QUERY_PARAM
                && percent_decode(name) != TOKEN_QUERY_PARAM
        })
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

/// `%XX` decoding; a malformed escape is kept as written (the token then fails to parse).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Verifies tokens for one route; built once at config load.
#[derive(Clone)]
pub struct JwtVerifier {
    algorithm: Algorithm,
    algorithm_name: &'static str,
    key: DecodingKey,
    validation: Validation,
    issuer: Option<String>,
    audience: Option<String>,
    leeway_s: u64,
    pass_claims: Vec<String>,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("algorithm", &self.algorithm)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway_s", &self.leeway_s)
            .field("pass_claims", &self.pass_claims)
            .finish_non_exhaustive()
    }
}

impl JwtVerifier {
    pub fn new(config: &JwtConfig) -> Result<JwtVerifier, JwtConfigError> {
        let (algorithm, name) = match config.algorithm.as_str() {
            "HS256" => (Algorithm::HS256, "HS256"),
            "RS256" => (Algorithm::RS256, "RS256"),
            "ES256" => (Algorithm::ES256, "ES256"),
            other => return Err(JwtConfigError::UnsupportedAlgorithm(other.to_string())),
        };
        let key = match algorithm {
            Algorithm::HS256 => {
                if config.public_key_pem.is_some() {
                    return Err(JwtConfigError::WrongKeyKind(
                        name,
                        "`secret`",
                        "`public_key_pem`",
                    ));
                }
                let secret = config
                    .secret
                    .as_ref()
                    .ok_or(JwtConfigError::MissingSecret)?;
                if secret.len() < MIN_HS256_SECRET_BYTES {
                    return Err(JwtConfigError::ShortSecret);
                }
                DecodingKey::from_secret(secret.as_bytes())
            }
            _ => {
                if config.secret.is_some() {
                    return Err(JwtConfigError::WrongKeyKind(
                        name,
                        "`public_key_pem`",
                        "`secret`",
                    ));
                }
                let pem = config
                    .public_key_pem
                    .as_ref()
                    .ok_or(JwtConfigError::MissingPublicKey(name))?;
                if pem.contains("PRIVATE KEY") {
                    return Err(JwtConfigError::BadKey(
                        name,
                        "a private key; give the public key".into(),
                    ));
                }
                let parsed = if algorithm == Algorithm::RS256 {
                    DecodingKey::from_rsa_pem(pem.as_bytes())
                } else {
                    DecodingKey::from_ec_pem(pem.as_bytes())
                };
                parsed.map_err(|e| JwtConfigError::BadKey(name, e.to_string()))?
            }
        };
        // Signature and algorithm only: claims (including exp/nbf against `now_s`) are
        // checked in `verify`, without the system clock.
        let mut validation = Validation::new(algorithm);
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        validation.leeway = 0;
        Ok(JwtVerifier {
            algorithm,
            algorithm_name: name,
            key,
            validation,
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            leeway_s: config.leeway_s,
            pass_claims: config.pass_claims.clone(),
        })
    }

    /// Seconds past `exp` a token is still accepted: it expires at `exp + leeway_s`.
    pub fn leeway_s(&self) -> u64 {
        self.leeway_s
    }

    /// Check the token's algorithm, signature, `exp` (required), `nbf`, `iss` and `aud` at
    /// `now_s` (Unix seconds).
    pub fn verify(&self, token: &str, now_s: u64) -> Result<Claims, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Malformed);
        }
        // The header's `alg` first, so `none` or a different algorithm is reported as such
        // and never reaches a key of the wrong kind.
        if header_alg(token)? != self.algorithm_name {
            return Err(AuthError::UnsupportedAlgorithm);
        }
        let data = jsonwebtoken::decode::<serde_json::Map<String, Value>>(
            token,
            &self.key,
            &self.validation,
        )
        .map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                    AuthError::UnsupportedAlgorithm
                }
                _ => AuthError::Malformed,
            }
        })?;
        let claims = data.claims;

        let exp = match claims.get("exp") {
            None => return Err(AuthError::MissingExpiry),
            Some(v) => numeric_date(v)?,
        };
        // RFC 7519 §4.1.4: valid only before `exp`.
        if now_s >= exp.saturating_add(self.leeway_s) {
            return Err(AuthError::Expired);
        }
        // RFC 7519 §4.1.5: valid from `nbf` on.
        if let Some(v) = claims.get("nbf") {
            if now_s.saturating_add(self.leeway_s) < numeric_date(v)? {
                return Err(AuthError::NotYetValid);
            }
        }
        if let Some(want) = &self.issuer {
            if claims.get("iss").and_then(Value::as_str) != Some(want.as_str()) {
                return Err(AuthError::WrongIssuer);
            }
        }
        if let Some(want) = &self.audience {
            // RFC 7519 §4.1.3: a string or an array of strings.
            let ok = match claims.get("aud") {
                Some(Value::String(aud)) => aud == want,
                Some(Value::Array(auds)) => auds.iter().any(|a| a.as_str() == Some(want)),
                _ => false,
            };
            if !ok {
                return Err(AuthError::WrongAudience);
            }
        }
        let pass: Vec<(String, String)> = self
            .pass_claims
            .iter()
            .filter_map(|name| {
                let value = match claims.get(name)? {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                Some((name.clone(), value))
            })
            .collect();
        // JSON text escapes control characters; a string claim is passed as it is.
        if pass
            .iter()
            .any(|(_, v)| v.bytes().any(|b| b < 0x20 || b == 0x7f))
        {
            return Err(AuthError::ClaimControlCharacters);
        }
        Ok(Claims {
            subject: claims.get("sub").and_then(Value::as_str).map(str::to_owned),
            expires_at_s: exp,
            pass,
        })
    }
}

/// The `alg` of a compact JWS header (RFC 7515 §4.1.1).
fn header_alg(token: &str) -> Result<String, AuthError> {
    let (header, _) = token.split_once('.').ok_or(AuthError::Malformed)?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| AuthError::Malformed)?;
    let header: Value = serde_json::from_slice(&json).map_err(|_| AuthError::Malformed)?;
    match header.get("alg") {
        Some(Value::String(alg)) => Ok(alg.clone()),
        _ => Err(AuthError::Malformed),
    }
}

/// A NumericDate (RFC 7519 §2): seconds, possibly fractional; negative or non-numbers are
/// malformed. Fractions are dropped (toward an earlier `exp`, a later-by-less-than-1s `nbf`).
fn numeric_date(value: &Value) -> Result<u64, AuthError> {
    if let Some(n) = value.as_u64() {
        return Ok(n);
    }
    match value.as_f64() {
        Some(f) if f.is_finite() && f >= 0.0 => Ok(f as u64),
        _ => Err(AuthError::Malformed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    const SECRET: &str = "0123456789abcdef0123456789abcdef-test-secret";
    const NOW: u64 = 1_700_000_000;

    const RS_PRIVATE: &str = include_str!("../../tests/keys/rs256_private.pem");
    const RS_PUBLIC: &str = include_str!("../../tests/keys/rs256_public.pem");
    const ES_PRIVATE: &str = include_str!("../../tests/keys/es256_private.pem");
    const ES_PUBLIC: &str = include_str!("../../tests/keys/es256_public.pem");

    fn hs_config() -> JwtConfig {
        JwtConfig {
            algorithm: "HS256".into(),
            secret: Some(SECRET.into()),
            public_key_pem: None,
            issuer: None,
            audience: None,
            leeway_s: 0,
            pass_claims: vec![],
        }
    }

    fn hs_token(claims: &Value, secret: &str) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn hs(claims: Value) -> String {
        hs_token(&claims, SECRET)
    }

    #[test]
    fn hs256_valid_token_passes_named_claims() {
        let v = JwtVerifier::new(&JwtConfig {
            pass_claims: vec![
                "sub".into(),
                "roles".into(),
                "tenant".into(),
                "absent".into(),
            ],
            ..hs_config()
        })
        .unwrap();
        let token = hs(json!({"sub": "u1", "exp": NOW + 60, "roles": ["a", "b"], "tenant": 7}));
        let claims = v.verify(&token, NOW).unwrap();
        assert_eq!(claims.subject.as_deref(), Some("u1"));
        assert_eq!(claims.expires_at_s, NOW + 60);
        assert_eq!(
            claims.pass,
            [
                ("sub".to_string(), "u1".to_string()),
                ("roles".to_string(), r#"["a","b"]"#.to_string()),
                ("tenant".to_string(), "7".to_string()),
            ]
        );
    }

    #[test]
    fn hs256_expiry_is_checked_against_now_with_leeway() {
        let v = JwtVerifier::new(&hs_config()).unwrap();
        let token = hs(json!({"exp": NOW}));
        assert_eq!(v.verify(&token, NOW - 1).map(|_| ()), Ok(()));
        assert_eq!(v.verify(&token, NOW), Err(AuthError::Expired));
        // A fixed `now_s` decides, not the system clock: far-past tokens pass at their time.
        assert!(v.verify(&hs(json!({"exp": 100})), 99).is_ok());

        let lenient = JwtVerifier::new(&JwtConfig {
            leeway_s: 30,
            ..hs_config()
        })
        .unwrap();
        assert!(lenient.verify(&token, NOW + 29).is_ok());
        assert_eq!(lenient.verify(&token, NOW + 30), Err(AuthError::Expired));

        assert_eq!(
            v.verify(&hs(json!({"sub": "x"})), NOW),
            Err(AuthError::MissingExpiry)
        );
        assert_eq!(
            v.verify(&hs(json!({"exp": "soon"})), NOW),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            v.verify(&hs(json!({"exp": -5})), NOW),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            v.verify(&hs(json!({"exp": u64::MAX})), NOW)
                .map(|c| c.expires_at_s),
            Ok(u64::MAX)
        );
    }

    #[test]
    fn hs256_not_before() {
        let v = JwtVerifier::new(&JwtConfig {
            leeway_s: 5,
            ..hs_config()
        })
        .unwrap();
        let token = hs(json!({"exp": NOW + 100, "nbf": NOW + 10}));
        assert_eq!(v.verify(&token, NOW), Err(AuthError::NotYetValid));
        assert!(v.verify(&token, NOW + 5).is_ok());
    }

    #[test]
    fn hs256_wrong_secret_and_tampering_are_bad_signatures() {
        let v = JwtVerifier::new(&hs_config()).unwrap();
        let other = hs_token(
            &json!({"exp": NOW + 60}),
            "another-secret-of-at-least-32-bytes!!",
        );
        assert_eq!(v.verify(&other, NOW), Err(AuthError::BadSignature));

        // Swap in a payload claiming more, keeping the signature.
        let token = hs(json!({"exp": NOW + 60, "admin": false}));
        let parts: Vec<&str> = token.split('.').collect();
        let forged_payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(br#"{"exp":1700000060,"admin":true}"#);
        let forged = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
        assert_eq!(v.verify(&forged, NOW), Err(AuthError::BadSignature));

        // Flip one signature character.
        let mut sig = parts[2].to_string();
        let c = if sig.starts_with('A') { "B" } else { "A" };
        sig.replace_range(0..1, c);
        let flipped = format!("{}.{}.{}", parts[0], parts[1], sig);
        assert_eq!(v.verify(&flipped, NOW), Err(AuthError::BadSignature));
    }

    #[test]
    fn malformed_and_foreign_algorithms() {
        let v = JwtVerifier::new(&hs_config()).unwrap();
        assert_eq!(v.verify("", NOW), Err(AuthError::Missing));
        assert_eq!(v.verify("abc", NOW), Err(AuthError::Malformed));
        assert_eq!(v.verify("a.b.c", NOW), Err(AuthError::Malformed));
        assert_eq!(
            v.verify(&"x".repeat(MAX_TOKEN_BYTES + 1), NOW),
            Err(AuthError::Malformed)
        );
        // `alg: none` with an empty signature (RFC 7519 §6 unsecured JWT).
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let none = format!(
            "{}.{}.",
            b64(r#"{"alg":"none"}"#),
            b64(r#"{"exp":9999999999}"#)
        );
        assert_eq!(v.verify(&none, NOW), Err(AuthError::UnsupportedAlgorithm));
        // A valid HS384 token is refused for an HS256 route.
        let hs384 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS384),
            &json!({"exp": NOW + 60}),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert_eq!(v.verify(&hs384, NOW), Err(AuthError::UnsupportedAlgorithm));
        // A payload that is not a JSON object.
        let bad_payload = format!("{}.{}.sig", b64(r#"{"alg":"HS256"}"#), b64("[1]"));
        assert!(matches!(
            v.verify(&bad_payload, NOW),
            Err(AuthError::Malformed | AuthError::BadSignature)
        ));
    }

    #[test]
    fn issuer_and_audience() {
        let v = JwtVerifier::new(&JwtConfig {
            issuer: Some("https://idp.example.com".into()),
            audience: Some("ringway".into()),
            ..hs_config()
        })
        .unwrap();
        let ok = |claims: Value| v.verify(&hs(claims), NOW).map(|_| ());
        let exp = NOW + 60;
        assert_eq!(
            ok(json!({"exp": exp, "iss": "https://idp.example.com", "aud": "ringway"})),
            Ok(())
        );
        assert_eq!(
            ok(json!({"exp": exp, "iss": "https://idp.example.com", "aud": ["other", "ringway"]})),
            Ok(())
        );
        assert_eq!(
            ok(json!({"exp": exp, "iss": "https://evil.example.com", "aud": "ringway"})),
            Err(AuthError::WrongIssuer)
        );
        assert_eq!(
            ok(json!({"exp": exp, "aud": "ringway"})),
            Err(AuthError::WrongIssuer)
        );
        assert_eq!(
            ok(json!({"exp": exp, "iss": "https://idp.example.com", "aud": "other"})),
            Err(AuthError::WrongAudience)
        );
        assert_eq!(
            ok(json!({"exp": exp, "iss": "https://idp.example.com"})),
            Err(AuthError::WrongAudience)
        );
        // Without a configured audience, any `aud` is accepted.
        let open = JwtVerifier::new(&hs_config()).unwrap();
        assert!(open
            .verify(&hs(json!({"exp": exp, "aud": "x"})), NOW)
            .is_ok());
    }

    fn asym_config(alg: &str, pem: &str) -> JwtConfig {
        JwtConfig {
            algorithm: alg.into(),
            secret: None,
            public_key_pem: Some(pem.into()),
            ..hs_config()
        }
    }

    #[test]
    fn rs256_and_es256() {
        for (alg, algorithm, private, public) in [
            ("RS256", Algorithm::RS256, RS_PRIVATE, RS_PUBLIC),
            ("ES256", Algorithm::ES256, ES_PRIVATE, ES_PUBLIC),
        ] {
            let v = JwtVerifier::new(&asym_config(alg, public)).unwrap();
            let key = if algorithm == Algorithm::RS256 {
                EncodingKey::from_rsa_pem(private.as_bytes()).unwrap()
            } else {
                EncodingKey::from_ec_pem(private.as_bytes()).unwrap()
            };
            let sign = |claims: Value| {
                jsonwebtoken::encode(&Header::new(algorithm), &claims, &key).unwrap()
            };
            let token = sign(json!({"exp": NOW + 60, "sub": "s"}));
            assert_eq!(
                v.verify(&token, NOW).unwrap().subject.as_deref(),
                Some("s"),
                "{alg}"
            );
            assert_eq!(v.verify(&token, NOW + 60), Err(AuthError::Expired), "{alg}");
            let parts: Vec<&str> = token.split('.').collect();
            let other = sign(json!({"exp": NOW + 600, "sub": "admin"}));
            let spliced = format!(
                "{}.{}.{}",
                parts[0],
                other.split('.').nth(1).unwrap(),
                parts[2]
            );
            assert_eq!(
                v.verify(&spliced, NOW),
                Err(AuthError::BadSignature),
                "{alg}"
            );
            // An HS256 token, signed with the public key text as the secret (the classic
            // algorithm confusion attack), is refused.
            let confused = hs_token(&json!({"exp": NOW + 60}), public);
            assert_eq!(
                v.verify(&confused, NOW),
                Err(AuthError::UnsupportedAlgorithm),
                "{alg}"
            );
        }
    }

    #[test]
    fn config_errors() {
        let err = |c: JwtConfig| JwtVerifier::new(&c).unwrap_err();
        assert_eq!(
            err(JwtConfig {
                algorithm: "none".into(),
                ..hs_config()
            }),
            JwtConfigError::UnsupportedAlgorithm("none".into())
        );
        assert_eq!(
            err(JwtConfig {
                secret: None,
                ..hs_config()
            }),
            JwtConfigError::MissingSecret
        );
        assert_eq!(
            err(JwtConfig {
                secret: Some("short".into()),
                ..hs_config()
            }),
            JwtConfigError::ShortSecret
        );
        assert_eq!(
            err(JwtConfig {
                public_key_pem: None,
                ..asym_config("RS256", RS_PUBLIC)
            }),
            JwtConfigError::MissingPublicKey("RS256")
        );
        assert!(matches!(
            err(asym_config("RS256", "garbage")),
            JwtConfigError::BadKey("RS256", _)
        ));
        assert!(matches!(
            err(asym_config("ES256", RS_PUBLIC)),
            JwtConfigError::BadKey("ES256", _)
        ));
        assert!(matches!(
            err(asym_config("ES256", ES_PRIVATE)),
            JwtConfigError::BadKey("ES256", _)
        ));
        assert!(matches!(
            err(JwtConfig {
                secret: Some(SECRET.into()),
                ..asym_config("RS256", RS_PUBLIC)
            }),
            JwtConfigError::WrongKeyKind(..)
        ));
        // Debug output never shows the secret.
        assert!(!format!("{:?}", hs_config()).contains(SECRET));
    }

    #[test]
    fn config_deserializes_and_rejects_unknown_fields() {
        let c: JwtConfig = toml::from_str(
            "algorithm = \"HS256\"\nsecret = \"s\"\nleeway_s = 5\npass_claims = [\"sub\"]",
        )
        .unwrap();
        assert_eq!(c.leeway_s, 5);
        assert_eq!(c.pass_claims, ["sub"]);
        assert!(toml::from_str::<JwtConfig>("algorithm = \"HS256\"\nsecrt = \"s\"").is_err());
    }

    fn header(name: &str, value: &str) -> (String, Vec<u8>) {
        (name.to_string(), value.as_bytes().to_vec())
    }

    #[test]
    fn token_from_authorization_header() {
        let headers = [
            header("Host", "x"),
            header("AUTHORIZATION", "bearer   abc.def.ghi "),
        ];
        let t = extract_token(&headers, Some("token=q"), &["access_token.p".into()]).unwrap();
        assert_eq!(t.token, "abc.def.ghi");
        assert_eq!(t.from, TokenFrom::AuthorizationHeader);
        // Other schemes are not tokens; the next source is used.
        let basic = [header("Authorization", "Basic dXNlcjpwYXNz")];
        assert_eq!(
            extract_token(&basic, Some("token=q"), &[]).unwrap().from,
            TokenFrom::Query
        );
        assert_eq!(
            extract_token(&[header("Authorization", "Bearer ")], None, &[]),
            None
        );
        assert_eq!(extract_token(&[], None, &[]), None);
    }

    #[test]
    fn token_from_subprotocol_says_what_to_select() {
        let offered: Vec<String> = vec!["access_token.abc.def.ghi".into(), "chat.v1".into()];
        let t = extract_token(&[], Some("token=q"), &offered).unwrap();
        assert_eq!(t.token, "abc.def.ghi");
        assert_eq!(
            t.from,
            TokenFrom::Subprotocol {
                index: 0,
                select: "chat.v1".into()
            }
        );
        // Only the token entry offered: echo it, or the browser fails the handshake.
        let alone: Vec<String> = vec!["access_token.abc.def.ghi".into()];
        let t = extract_token(&[], None, &alone).unwrap();
        assert_eq!(
            t.from,
            TokenFrom::Subprotocol {
                index: 0,
                select: "access_token.abc.def.ghi".into()
            }
        );
        assert!(!is_token_protocol("access_token."));
        assert!(!is_token_protocol("chat"));
    }

    #[test]
    fn token_from_query_is_percent_decoded_and_strippable() {
        let t = extract_token(&[], Some("room=1&token=a%2Eb.c%zz&x=2"), &[]).unwrap();
        assert_eq!(t.token, "a.b.c%zz");
        assert_eq!(t.from, TokenFrom::Query);
        assert_eq!(extract_token(&[], Some("token=&mytoken=x"), &[]), None);
        assert_eq!(
            strip_token_param("room=1&token=abc&x=2").as_deref(),
            Some("room=1&x=2")
        );
        assert_eq!(strip_token_param("token=abc"), None);
        assert_eq!(strip_token_param("mytoken=1").as_deref(), Some("mytoken=1"));
        assert_eq!(percent_decode("%41%4"), "A%4");
    }

    #[test]
    fn verified_end_to_end_from_each_source() {
        let v = JwtVerifier::new(&hs_config()).unwrap();
        let token = hs(json!({"exp": NOW + 60, "sub": "u"}));
        let sources = [
            extract_token(
                &[header("Authorization", &format!("Bearer {token}"))],
                None,
                &[],
            ),
            extract_token(&[], None, &[format!("access_token.{token}"), "chat".into()]),
            extract_token(&[], Some(&format!("token={token}")), &[]),
        ];
        for source in sources {
            let source = source.unwrap();
            assert_eq!(
                v.verify(&source.token, NOW).unwrap().subject.as_deref(),
                Some("u")
            );
        }
    }

    #[test]
    fn authorization_values_that_are_not_ascii_never_panic() {
        // Non-ASCII at and around the scheme's end (byte 7), empty, huge, and invalid UTF-8.
        let mut values: Vec<Vec<u8>> = vec![
            "abcdefé".into(),
            "abcdeé".into(),
            "Bearer é".into(),
            "Beareré x".into(),
            "é".into(),
            "ééééééééé".into(),
            "\u{1F600}\u{1F600}".into(),
            b"Bearer \xff\xfe".to_vec(),
            b"\xff\xff\xff\xff\xff\xff\xff\xff".to_vec(),
            Vec::new(),
            b"       ".to_vec(),
            vec![b'a'; 1 << 20],
        ];
        for n in 0..12 {
            let mut v = b"Bearer ".to_vec();
            v.truncate(n.min(7));
            v.extend_from_slice("é".as_bytes());
            values.push(v);
        }
        for value in values {
            let headers = [("Authorization".to_string(), value.clone())];
            let found = extract_token(&headers, None, &[]);
            assert!(
                found.is_none() || value.starts_with(b"Bearer "),
                "{:?}",
                String::from_utf8_lossy(&value)
            );
        }
        // A non-ASCII token after a real scheme is found (and then fails verification).
        let t = extract_token(&[header("Authorization", "Bearer é.é.é")], None, &[]).unwrap();
        assert_eq!(t.token, "é.é.é");
        let v = JwtVerifier::new(&hs_config()).unwrap();
        assert_eq!(v.verify(&t.token, NOW), Err(AuthError::Malformed));
        // Subprotocol entries that are not ASCII.
        let offered: Vec<String> = vec!["access_tokené".into(), "é".into(), String::new()];
        assert_eq!(extract_token(&[], None, &offered), None);
        let offered: Vec<String> = vec!["access_token.é".into()];
        assert_eq!(extract_token(&[], None, &offered).unwrap().token, "é");
        // Query values that are not ASCII or hold broken escapes.
        for q in [
            "token=%",
            "token=%é",
            "token=é%4",
            "é=é&token=%f",
            "&&&",
            "",
        ] {
            let _ = extract_token(&[], Some(q), &[]);
            let _ = strip_token_param(q);
        }
    }

    #[test]
    fn passed_claims_with_control_characters_are_refused() {
        let v = JwtVerifier::new(&JwtConfig {
            pass_claims: vec!["sub".into(), "roles".into()],
            ..hs_config()
        })
        .unwrap();
        for bad in [
            "alice\r\nX-Admin: 1",
            "a\nb",
            "nul\0",
            "bell\u{7}",
            "del\u{7f}",
            "\t",
        ] {
            assert_eq!(
                v.verify(&hs(json!({"exp": NOW + 60, "sub": bad})), NOW),
                Err(AuthError::ClaimControlCharacters),
                "{bad:?}"
            );
        }
        assert_eq!(
            AuthError::ClaimControlCharacters.reason(),
            "token claim has control characters"
        );
        // Inside a non-string claim, JSON text escapes them: passed as `"a\nb"`.
        let c = v
            .verify(&hs(json!({"exp": NOW + 60, "roles": ["a\nb"]})), NOW)
            .unwrap();
        assert_eq!(c.pass, [("roles".to_string(), r#"["a\nb"]"#.to_string())]);
        // Claims the route does not pass are not checked (they go nowhere).
        assert!(v
            .verify(&hs(json!({"exp": NOW + 60, "other": "a\r\n"})), NOW)
            .is_ok());
        // Non-ASCII text is not a control character.
        assert!(v
            .verify(&hs(json!({"exp": NOW + 60, "sub": "zoë ✓"})), NOW)
            .is_ok());
    }

    #[test]
    fn token_param_is_stripped_even_when_percent_encoded() {
        assert_eq!(
            strip_token_param("%74oken=SECRET&a=1&token=x").as_deref(),
            Some("a=1")
        );
        assert_eq!(strip_token_param("tok%65n").as_deref(), None);
        assert_eq!(strip_token_param("tokens=1").as_deref(), Some("tokens=1"));
    }

    #[test]
    fn huge_times_and_leeway_saturate() {
        let v = JwtVerifier::new(&JwtConfig {
            leeway_s: u64::MAX,
            ..hs_config()
        })
        .unwrap();
        assert_eq!(v.leeway_s(), u64::MAX);
        let token = hs(json!({"exp": u64::MAX, "nbf": u64::MAX}));
        assert!(v.verify(&token, u64::MAX - 1).is_ok());
        // `exp + leeway` saturates at u64::MAX: expired there, never wrapped to the past.
        assert_eq!(v.verify(&token, u64::MAX), Err(AuthError::Expired));
        assert!(v.verify(&hs(json!({"exp": 1e300})), NOW).is_ok());
        assert!(v.verify(&hs(json!({"exp": 0})), 0).is_ok());
    }
}
