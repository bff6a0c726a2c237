//! Edge policy, checked by a core before a connection costs a backend anything: per-IP
//! connection limits at accept (`rate`), the `Origin` check and JWT verification at the
//! handshake (`origin`, `auth`), and per-connection message rates after it (`rate`).
//!
//! Sans-IO like `protocol`: no sockets, clocks or locks; time is passed in (`now_ms` for
//! rates, `now_s` for token expiry). Each refusal carries the HTTP status (or close code)
//! and a short reason for the response body.

pub mod auth;
pub mod origin;
pub mod rate;

pub use auth::{AuthError, Claims, JwtConfig, JwtConfigError, JwtVerifier, TokenFrom, TokenSource};
pub use origin::{OriginError, OriginPolicy};
pub use rate::{IpKey, IpLimits, MessageRate, PerIpLimiter, Refusal, TokenBucket};
