//! The route table: compiled once from the config, consulted by the edge twice per
//! connection lifetime and message. At the handshake, [`RouteTable::match_path`] picks the
//! route (which upstream, authorization, headers, limits); per client message,
//! [`RouteTable::select`] picks the upstream, reading a JSON routing key only when the route
//! has `actions` and the message is a text JSON object.

use std::cell::RefCell;
use std::path::PathBuf;

use simd_json::{Buffers, Node, Tape, INPUT_PADDING};

use crate::config::{Balance, Compression, Config, RouteConfig, SlowConsumer, Upstream};
use crate::ids::UpstreamId;
use crate::policy::auth::JwtVerifier;
use crate::policy::origin::OriginPolicy;
use crate::protocol::handshake;
use crate::protocol::message::MessageKind;

/// Index of a route in [`RouteTable::routes`] (config order).
pub type RouteId = u16;

/// The name of the upstream built from the top-level `upstream` setting, used when no
/// routes are configured or a route leaves `upstream` empty.
pub const DEFAULT_UPSTREAM: &str = "default";

/// A config the route table cannot be built from (naming the offending key), or a message
/// that must not be routed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("`{key}`: unknown upstream {name:?}")]
    UnknownUpstream { key: String, name: String },
    #[error("`{key}`: bad backend {url:?}: {problem}")]
    BadBackend {
        key: String,
        url: String,
        problem: &'static str,
    },
    #[error("`{key}`: bad path pattern {pattern:?}: {problem}")]
    BadPath {
        key: String,
        pattern: String,
        problem: &'static str,
    },
    #[error("`{key}`: upstream {name:?} has no backends")]
    NoBackends { key: String, name: String },
    #[error("`{key}`: duplicate upstream name {name:?}")]
    DuplicateUpstream { key: String, name: String },
    #[error("`{key}`: duplicate route path {path:?}")]
    DuplicateRoute { key: String, path: String },
    #[error("`{key}`: {problem}")]
    Invalid { key: String, problem: &'static str },
    /// The routing key appears twice at the top level of a message. JSON parsers disagree
    /// on which one wins (first, last, error), so routing on either could let a client
    /// reach an upstream the backend behind it would not expect: the edge closes 1008.
    #[error("the routing key appears more than once in the message")]
    DuplicateKey,
    #[error("`{key}`: {problem}")]
    Policy { key: String, problem: String },
}

/// Where an upstream's backend lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// `tcp://HOST:PORT`, kept as `HOST:PORT` (resolved when connecting, not here).
    Tcp(String),
    /// `tls://HOST:PORT`: `addr` is `HOST:PORT`, `name` the HOST its certificate must name
    /// (a DNS name or an IP address, without brackets).
    Tls { addr: String, name: String },
    /// `unix:PATH`.
    Unix(PathBuf),
    /// The embedded upstream (`echo`: the chat contract plus echo), in the relay's process.
    Embedded,
    /// `nats://PREFIX`: backends in a NATS queue group on `PREFIX.in` (docs/cluster.md);
    /// needs `[cluster]` and is its upstream's only backend.
    Nats(String),
}

/// An upstream as the relay needs it; its [`UpstreamId`] is its index in
/// [`RouteTable::upstreams`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamSpec {
    pub name: String,
    pub backends: Vec<Backend>,
    pub balance: Balance,
    pub buffer_messages: usize,
    /// The TLS client files, when some backend is `tls://`.
    pub tls: Option<crate::tls::client::ClientFiles>,
}

/// A route's routing key and its value -> upstream table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteKey {
    /// The top-level JSON field to read.
    pub key: Box<str>,
    /// Sorted by value, for binary search.
    actions: Vec<(Box<str>, UpstreamId)>,
}

impl RouteKey {
    /// The upstream a routing-key value names, if any.
    pub fn lookup(&self, value: &str) -> Option<UpstreamId> {
        self.actions
            .binary_search_by(|(v, _)| (**v).cmp(value))
            .ok()
            .map(|i| self.actions[i].1)
    }

    /// Value -> upstream pairs, sorted by value.
    pub fn actions(&self) -> impl Iterator<Item = (&str, UpstreamId)> {
        self.actions.iter().map(|(v, u)| (&**v, *u))
    }
}

/// One compiled `[[routes]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The pattern as configured (`/chat`, `/api/*`).
    pub path: String,
    /// Where messages go when no action routes them elsewhere.
    pub upstream: UpstreamId,
    /// Present only when the route has `actions`.
    pub route_key: Option<RouteKey>,
    pub authorize: bool,
    pub authorize_timeout_ms: u64,
    /// Lower-cased header names.
    pub pass_headers: Vec<String>,
    pub max_subscriptions: usize,
    pub slow_consumer: SlowConsumer,
    /// Frames one message may span (0: no limit).
    pub max_fragments: u32,
    /// permessage-deflate (the route's, else the top-level setting).
    pub compression: Compression,
    /// Subprotocols it selects, in the server's order of preference.
    pub subprotocols: Vec<String>,
    pub require_subprotocol: bool,
}

/// How a compiled pattern matches.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Exact(String),
    /// `PREFIX/*`, stored without `/*`: matches `PREFIX` and everything under `PREFIX/`.
    Prefix(String),
}

/// The routes and upstreams of a config, resolved to ids.
#[derive(Debug, Clone)]
pub struct RouteTable {
    upstreams: Vec<UpstreamSpec>,
    routes: Vec<Route>,
    patterns: Vec<Pattern>,
    policies: Vec<RoutePolicy>,
}

/// A route's admission policy, compiled once: who may connect and how fast they may talk.
#[derive(Debug, Clone)]
pub struct RoutePolicy {
    pub origins: OriginPolicy,
    pub jwt: Option<JwtVerifier>,
    /// With `jwt`: close the connection 1008 when its token expires.
    pub close_at_token_expiry: bool,
    pub messages_per_sec: u32,
    pub message_burst: u32,
}

impl RouteTable {
    /// Resolve names to ids and check everything the edge would otherwise trip on later.
    /// Without `[[routes]]`, one route `/*` goes to an upstream named "default" built from
    /// the top-level `upstream` (local-echo maps to the embedded upstream: the edge
    /// short-circuits it before routing). A route with an empty `upstream` uses "default"
    /// too: a configured upstream of that name, else the one built from `upstream`.
    pub fn from_config(config: &Config) -> Result<RouteTable, RouteError> {
        let mut upstreams = Vec::with_capacity(config.upstreams.len() + 1);
        for (i, u) in config.upstreams.iter().enumerate() {
            let key = format!("upstreams[{i}]");
            if u.name.is_empty() {
                return Err(RouteError::Invalid {
                    key: format!("{key}.name"),
                    problem: "must not be empty",
                });
            }
            if upstreams.iter().any(|s: &UpstreamSpec| s.name == u.name) {
                return Err(RouteError::DuplicateUpstream {
                    key: format!("{key}.name"),
                    name: u.name.clone(),
                });
            }
            if u.backends.is_empty() {
                return Err(RouteError::NoBackends {
                    key: format!("{key}.backends"),
                    name: u.name.clone(),
                });
            }
            let backends = u
                .backends
                .iter()
                .enumerate()
                .map(|(j, url)| parse_backend(&format!("{key}.backends[{j}]"), url))
                .collect::<Result<Vec<_>, _>>()?;
            let nats = backends.iter().any(|b| matches!(b, Backend::Nats(_)));
            if nats && (backends.len() > 1 || config.cluster.is_none()) {
                return Err(RouteError::BadBackend {
                    key: format!("{key}.backends"),
                    url: u.backends.join(", "),
                    problem:
                        "a nats:// backend needs [cluster] and must be its upstream's only backend",
                });
            }
            let tls = backends
                .iter()
                .any(|b| matches!(b, Backend::Tls { .. }))
                .then(|| crate::tls::client::ClientFiles {
                    key: key.clone(),
                    ca_file: u.ca_file.clone().unwrap_or_default(),
                    client_cert: u.client_cert.clone().zip(u.client_key.clone()),
                });
            upstreams.push(UpstreamSpec {
                name: u.name.clone(),
                backends,
                balance: u.balance,
                buffer_messages: u.buffer_messages,
                tls,
            });
        }

        let implicit = [RouteConfig {
            path: "/*".into(),
            upstream: DEFAULT_UPSTREAM.into(),
            max_subscriptions: config.max_subscriptions,
            slow_consumer: config.slow_consumer,
            max_fragments: config.max_fragments,
            ..RouteConfig::default()
        }];
        let configs: &[RouteConfig] = if config.routes.is_empty() {
            &implicit
        } else {
            &config.routes
        };

        let mut table = RouteTable {
            upstreams,
            routes: Vec::with_capacity(configs.len()),
            patterns: Vec::with_capacity(configs.len()),
            policies: Vec::with_capacity(configs.len()),
        };
        for (i, r) in configs.iter().enumerate() {
            let key = format!("routes[{i}]");
            let pattern = parse_pattern(&format!("{key}.path"), &r.path)?;
            if table.patterns.contains(&pattern) {
                return Err(RouteError::DuplicateRoute {
                    key: format!("{key}.path"),
                    path: r.path.clone(),
                });
            }
            let upstream = table.resolve(config, &format!("{key}.upstream"), &r.upstream)?;
            if r.subprotocols
                .iter()
                .any(|p| !handshake::is_token(p.as_bytes()))
            {
                return Err(RouteError::Invalid {
                    key: format!("{key}.subprotocols"),
                    problem: "each subprotocol must be an HTTP token (RFC 6455 §4.1)",
                });
            }
            let route_key = if r.actions.is_empty() {
                None
            } else {
                if r.route_key.is_empty() {
                    return Err(RouteError::Invalid {
                        key: format!("{key}.route_key"),
                        problem: "must not be empty when `actions` are set",
                    });
                }
                let mut actions = Vec::with_capacity(r.actions.len());
                // BTreeMap order: already sorted by value.
                for (value, name) in &r.actions {
                    let id = table.resolve(config, &format!("{key}.actions.{value}"), name)?;
                    actions.push((Box::from(value.as_str()), id));
                }
                Some(RouteKey {
                    key: r.route_key.as_str().into(),
                    actions,
                })
            };
            let mut origins =
                OriginPolicy::from_patterns(&r.origins).map_err(|e| RouteError::Policy {
                    key: format!("{key}.origins"),
                    problem: e.to_string(),
                })?;
            origins.allow_missing = origins.is_allow_all() || r.allow_missing_origin;
            let jwt = match &r.jwt {
                Some(j) => Some(JwtVerifier::new(j).map_err(|e| RouteError::Policy {
                    key: format!("{key}.jwt"),
                    problem: e.to_string(),
                })?),
                None => None,
            };
            table.policies.push(RoutePolicy {
                origins,
                jwt,
                close_at_token_expiry: r.close_at_token_expiry,
                messages_per_sec: r.messages_per_sec,
                message_burst: r.message_burst.max(r.messages_per_sec),
            });
            table.patterns.push(pattern);
            table.routes.push(Route {
                path: r.path.clone(),
                upstream,
                route_key,
                authorize: r.authorize,
                authorize_timeout_ms: r.authorize_timeout_ms,
                pass_headers: r
                    .pass_headers
                    .iter()
                    .map(|h| h.to_ascii_lowercase())
                    .collect(),
                max_subscriptions: r.max_subscriptions,
                slow_consumer: r.slow_consumer,
                max_fragments: r.max_fragments,
                compression: r.compression.unwrap_or(config.compression),
                subprotocols: r.subprotocols.clone(),
                require_subprotocol: r.require_subprotocol,
            });
        }
        if table.routes.len() > usize::from(RouteId::MAX) + 1 {
            return Err(RouteError::Invalid {
                key: "routes".into(),
                problem: "too many routes",
            });
        }
        Ok(table)
    }

    /// An upstream name to its id; the default upstream is added the first time it is named.
    fn resolve(
        &mut self,
        config: &Config,
        key: &str,
        name: &str,
    ) -> Result<UpstreamId, RouteError> {
        let name = if name.is_empty() {
            DEFAULT_UPSTREAM
        } else {
            name
        };
        let index = match self.upstreams.iter().position(|u| u.name == name) {
            Some(i) => i,
            None if name == DEFAULT_UPSTREAM => {
                let backend = match &config.upstream {
                    Upstream::Embedded | Upstream::LocalEcho => Backend::Embedded,
                    Upstream::Backend(url) => parse_backend("upstream", url)?,
                };
                self.upstreams.push(UpstreamSpec {
                    name: DEFAULT_UPSTREAM.into(),
                    backends: vec![backend],
                    balance: Balance::RoundRobin,
                    buffer_messages: crate::config::UpstreamConfig::default().buffer_messages,
                    tls: None,
                });
                self.upstreams.len() - 1
            }
            None => {
                return Err(RouteError::UnknownUpstream {
                    key: key.into(),
                    name: name.into(),
                })
            }
        };
        UpstreamId::try_from(index).map_err(|_| RouteError::Invalid {
            key: "upstreams".into(),
            problem: "too many upstreams",
        })
    }

    /// Every upstream, indexed by [`UpstreamId`]; only those some route can reach when the
    /// implicit default was added, plus every configured one.
    pub fn upstreams(&self) -> &[UpstreamSpec] {
        &self.upstreams
    }

    /// Every route, indexed by [`RouteId`], in config order.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    pub fn policy(&self, id: RouteId) -> &RoutePolicy {
        &self.policies[usize::from(id)]
    }

    pub fn route(&self, id: RouteId) -> &Route {
        &self.routes[usize::from(id)]
    }

    /// The route for a handshake's request path (any `?query` is ignored): an exact
    /// pattern first (an exact `/x` also governs `/x/`, unless `/x/` is a route of its own),
    /// else the longest matching `PREFIX/*`. None: answer the handshake 404.
    ///
    /// `path` is the normal form the handshake made ([`crate::protocol::path::normalize`]);
    /// patterns are checked to be in normal form when the table is built, so `//admin`,
    /// `/%61dmin` or `/api/../admin` cannot reach past an exact `/admin` through `/*`.
    pub fn match_path(&self, path: &str) -> Option<(RouteId, &Route)> {
        let path = path.split_once('?').map_or(path, |(p, _)| p);
        let without_slash = path.strip_suffix('/').filter(|p| !p.is_empty());
        let mut slash_exact: Option<usize> = None;
        let mut best: Option<(usize, usize)> = None; // (index, prefix length)
        for (i, pattern) in self.patterns.iter().enumerate() {
            match pattern {
                Pattern::Exact(p) if p == path => {
                    return Some((i as RouteId, &self.routes[i]));
                }
                Pattern::Exact(p) if without_slash == Some(p.as_str()) => {
                    slash_exact.get_or_insert(i);
                }
                // Bytes and `get`, no indexing: nothing here can panic whatever `path` holds.
                Pattern::Prefix(p)
                    if path.as_bytes().starts_with(p.as_bytes())
                        && matches!(path.as_bytes().get(p.len()), None | Some(b'/'))
                        && best.is_none_or(|(_, len)| p.len() > len) =>
                {
                    best = Some((i, p.len()));
                }
                _ => {}
            }
        }
        slash_exact
            .or(best.map(|(i, _)| i))
            .map(|i| (i as RouteId, &self.routes[i]))
    }

    /// The upstream for one client message. Binary messages, routes without actions and
    /// text that does not start with `{` cost nothing; otherwise the message is copied into
    /// `scratch` (simd-json unescapes in place) and parsed. Only a top-level string value of
    /// the routing key is looked up in `actions`; anything else goes to the route's default.
    pub fn select(
        &self,
        route: &Route,
        kind: MessageKind,
        payload: &[u8],
        scratch: &mut Vec<u8>,
    ) -> Result<UpstreamId, RouteError> {
        let Some(rk) = &route.route_key else {
            return Ok(route.upstream);
        };
        if kind == MessageKind::Binary || !starts_with_brace(payload) {
            return Ok(route.upstream);
        }
        scratch.clear();
        scratch.reserve(payload.len() + INPUT_PADDING);
        scratch.extend_from_slice(payload);
        scratch.resize(payload.len() + INPUT_PADDING, 0);
        let found = PARSER
            .try_with(|p| {
                let mut p = p.borrow_mut();
                let p = &mut *p;
                let mut tape: Tape<'_> = std::mem::replace(&mut p.tape, Tape(Vec::new())).reset();
                let found = match simd_json::fill_tape_padded(
                    scratch,
                    payload.len(),
                    &mut p.buffers,
                    &mut tape,
                ) {
                    Ok(()) => {
                        top_level_string(&tape.0, &rk.key).map(|v| v.and_then(|v| rk.lookup(v)))
                    }
                    Err(_) => Ok(None),
                };
                p.tape = tape.reset();
                found
            })
            .unwrap_or(Ok(None))?;
        Ok(found.unwrap_or(route.upstream))
    }
}

/// Parser state reused across messages on a core, so routing a message allocates nothing
/// once the buffers have grown to the largest message seen.
struct Parser {
    buffers: Buffers,
    tape: Tape<'static>,
}

thread_local! {
    static PARSER: RefCell<Parser> = RefCell::new(Parser {
        buffers: Buffers::new(1024),
        tape: Tape(Vec::new()),
    });
}

/// JSON whitespace (RFC 8259 §2) then `{`.
fn starts_with_brace(payload: &[u8]) -> bool {
    payload
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        == Some(&b'{')
}

/// The value of `key` in the top-level object of a parsed tape: `Ok(Some(s))` for a string,
/// `Ok(None)` when absent or not a string, `Err(DuplicateKey)` when present twice. Keys on
/// the tape are already unescaped, so `"\u0061ction"` counts as `action`.
fn top_level_string<'i>(nodes: &[Node<'i>], key: &str) -> Result<Option<&'i str>, RouteError> {
    let Some(&Node::Object { len, .. }) = nodes.first() else {
        return Ok(None);
    };
    let mut seen = false;
    let mut found = None;
    let mut i = 1;
    for _ in 0..len {
        let (Some(Node::String(k)), Some(v)) = (nodes.get(i), nodes.get(i + 1)) else {
            return Ok(None);
        };
        if *k == key {
            if seen {
                return Err(RouteError::DuplicateKey);
            }
            seen = true;
            if let Node::String(s) = v {
                found = Some(*s);
            }
        }
        i += 1 + match v {
            Node::Object { count, .. } | Node::Array { count, .. } => count + 1,
            _ => 1,
        };
    }
    Ok(found)
}

fn parse_pattern(key: &str, pattern: &str) -> Result<Pattern, RouteError> {
    let bad = |problem| RouteError::BadPath {
        key: key.into(),
        pattern: pattern.into(),
        problem,
    };
    if !pattern.starts_with('/') {
        return Err(bad("must start with `/`"));
    }
    let (compiled, path) = match pattern.strip_suffix("/*") {
        Some(prefix) if !prefix.contains('*') => {
            (Pattern::Prefix(prefix.into()), format!("{prefix}/"))
        }
        None if !pattern.contains('*') => (Pattern::Exact(pattern.into()), pattern.into()),
        _ => return Err(bad("`*` is only allowed as a trailing `/*`")),
    };
    // Request paths are matched in normal form, so a pattern in any other form could never
    // match (or would mean something else than it seems to).
    match crate::protocol::path::normalize(&path) {
        Ok(n) if n == path => Ok(compiled),
        Ok(_) => Err(bad(
            "not in normal form (no `//`, `.` or `..` segments, escapes only where needed, \
             upper-case hex)",
        )),
        Err(_) => Err(bad(
            "not a valid path (no `;`, `\\`, control characters, raw non-ASCII or \
             percent-encoded `/ ? # \\ ; %`)",
        )),
    }
}

fn parse_backend(key: &str, url: &str) -> Result<Backend, RouteError> {
    let bad = |problem| RouteError::BadBackend {
        key: key.into(),
        url: url.into(),
        problem,
    };
    if url == "echo" {
        return Ok(Backend::Embedded);
    }
    let tls = url.strip_prefix("tls://");
    if let Some(addr) = url.strip_prefix("tcp://").or(tls) {
        let Some((host, port)) = addr.rsplit_once(':') else {
            return Err(bad("expected tcp://HOST:PORT or tls://HOST:PORT"));
        };
        if host.is_empty() || host == "[]" {
            return Err(bad("missing host"));
        }
        if host.contains(['/', ' ']) || (host.contains(':') && !host.starts_with('[')) {
            return Err(bad("bad host (IPv6 addresses go in brackets)"));
        }
        match port.parse::<u16>() {
            Ok(p) if p > 0 && tls.is_some() => {
                let name = host.trim_start_matches('[').trim_end_matches(']');
                rustls::pki_types::ServerName::try_from(name)
                    .map_err(|_| bad("the host is not a valid DNS name or IP address"))?;
                let name = name.to_string();
                Ok(Backend::Tls {
                    addr: addr.into(),
                    name,
                })
            }
            Ok(p) if p > 0 => Ok(Backend::Tcp(addr.into())),
            _ => Err(bad("port must be 1-65535")),
        }
    } else if let Some(prefix) = url.strip_prefix("nats://") {
        let token_ok = |t: &str| !t.is_empty() && !t.contains(['*', '>', ' ', '\t']);
        if !prefix.split('.').all(token_ok) || !prefix.is_ascii() {
            return Err(bad(
                "expected nats://SUBJECT.PREFIX (ASCII, no wildcards or spaces)",
            ));
        }
        Ok(Backend::Nats(prefix.into()))
    } else if let Some(path) = url.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(bad("missing socket path"));
        }
        Ok(Backend::Unix(PathBuf::from(path)))
    } else {
        Err(bad(
            "expected echo, tcp://HOST:PORT, tls://HOST:PORT or unix:PATH",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(toml_text: &str) -> Config {
        toml::from_str(toml_text).unwrap()
    }

    fn table(toml_text: &str) -> RouteTable {
        RouteTable::from_config(&config(toml_text)).unwrap()
    }

    fn err(toml_text: &str) -> RouteError {
        RouteTable::from_config(&config(toml_text)).unwrap_err()
    }

    const CHAT: &str = r#"
        [[upstreams]]
        name = "chat"
        backends = ["tcp://127.0.0.1:9001", "unix:/run/chat.sock"]
        balance = "hash"
        buffer_messages = 5
        [[upstreams]]
        name = "game"
        backends = ["echo"]
        [[upstreams]]
        name = "billing"
        backends = ["tcp://[::1]:9002"]
        [[routes]]
        path = "/chat"
        upstream = "chat"
        actions = { move = "game", pay = "billing" }
        pass_headers = ["Authorization", "X-Request-ID"]
        authorize = true
        max_subscriptions = 7
        slow_consumer = "drop-newest"
        max_fragments = 16
        [[routes]]
        path = "/api/*"
        upstream = "billing"
        [[routes]]
        path = "/api/v2/*"
        upstream = "game"
        route_key = "type"
        actions = { chat = "chat" }
        [[routes]]
        path = "/api/exact"
        upstream = "chat"
    "#;

    fn select(
        t: &RouteTable,
        path: &str,
        kind: MessageKind,
        msg: &str,
    ) -> Result<UpstreamId, RouteError> {
        let (_, route) = t.match_path(path).unwrap();
        t.select(route, kind, msg.as_bytes(), &mut Vec::new())
    }

    fn text(t: &RouteTable, msg: &str) -> Result<UpstreamId, RouteError> {
        select(t, "/chat", MessageKind::Text, msg)
    }

    const CHAT_ID: UpstreamId = 0;
    const GAME: UpstreamId = 1;
    const BILLING: UpstreamId = 2;

    #[test]
    fn no_routes_means_everything_goes_to_the_default_upstream() {
        for (upstream, backend) in [
            ("echo", Backend::Embedded),
            ("local-echo", Backend::Embedded),
            ("tcp://backend:9000", Backend::Tcp("backend:9000".into())),
            ("unix:/run/b.sock", Backend::Unix("/run/b.sock".into())),
        ] {
            let t = table(&format!(
                "upstream = {upstream:?}\nmax_subscriptions = 3\nmax_fragments = 0"
            ));
            assert_eq!(t.upstreams().len(), 1);
            assert_eq!(t.upstreams()[0].name, "default");
            assert_eq!(t.upstreams()[0].backends, vec![backend]);
            for path in ["/", "/chat", "/a/b/c?x=1"] {
                let (id, route) = t.match_path(path).unwrap();
                assert_eq!((id, route.upstream), (0, 0), "{upstream} {path}");
                assert_eq!(route.route_key, None);
                assert_eq!(route.max_subscriptions, 3);
                assert_eq!(route.max_fragments, 0, "the top-level limit applies");
            }
        }
    }

    #[test]
    fn upstreams_and_routes_are_compiled_in_config_order() {
        let t = table(CHAT);
        let names: Vec<_> = t.upstreams().iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["chat", "game", "billing"]);
        let chat = &t.upstreams()[usize::from(CHAT_ID)];
        assert_eq!(
            chat.backends,
            vec![
                Backend::Tcp("127.0.0.1:9001".into()),
                Backend::Unix("/run/chat.sock".into())
            ]
        );
        assert_eq!((chat.balance, chat.buffer_messages), (Balance::Hash, 5));
        assert_eq!(
            t.upstreams()[2].backends,
            vec![Backend::Tcp("[::1]:9002".into())]
        );
        let tls = "[[upstreams]]\nname = \"t\"\nbackends = [\"tls://[::1]:9\"]\nca_file = \"/ca\"";
        let t2 = RouteTable::from_config(&config(tls)).unwrap();
        let name = "::1".into();
        assert_eq!(
            t2.upstreams()[0].backends,
            [Backend::Tls {
                addr: "[::1]:9".into(),
                name
            }]
        );
        assert_eq!(
            t2.upstreams()[0].tls.as_ref().unwrap().ca_file,
            PathBuf::from("/ca")
        );

        let (id, r) = t.match_path("/chat").unwrap();
        assert_eq!(id, 0);
        assert_eq!(r.upstream, CHAT_ID);
        assert_eq!(r.pass_headers, ["authorization", "x-request-id"]);
        assert!(r.authorize);
        assert_eq!(r.max_subscriptions, 7);
        assert_eq!(r.slow_consumer, SlowConsumer::DropNewest);
        assert_eq!(r.max_fragments, 16);
        assert_eq!(
            t.match_path("/api/x").unwrap().1.max_fragments,
            crate::config::DEFAULT_MAX_FRAGMENTS,
            "a route without its own limit has the default"
        );
        let rk = r.route_key.as_ref().unwrap();
        assert_eq!(&*rk.key, "action");
        assert_eq!(
            rk.actions().collect::<Vec<_>>(),
            [("move", GAME), ("pay", BILLING)]
        );
        assert_eq!(t.routes().len(), 4);
        assert_eq!(t.route(1).path, "/api/*");
    }

    #[test]
    fn exact_paths_win_then_the_longest_prefix() {
        let t = table(CHAT);
        let id = |p: &str| t.match_path(p).map(|(id, _)| id);
        assert_eq!(id("/chat"), Some(0));
        assert_eq!(id("/chat?token=1"), Some(0));
        assert_eq!(
            id("/chat/"),
            Some(0),
            "an exact route governs its trailing slash"
        );
        assert_eq!(id("/chat//"), None);
        assert_eq!(id("/chatroom"), None);
        assert_eq!(id("/api"), Some(1));
        assert_eq!(id("/api/"), Some(1));
        assert_eq!(id("/api/v1/x"), Some(1));
        assert_eq!(id("/apix"), None);
        assert_eq!(id("/api/v2"), Some(2));
        assert_eq!(id("/api/v2/deep/er"), Some(2));
        assert_eq!(id("/api/v2x"), Some(1));
        assert_eq!(id("/api/exact"), Some(3));
        assert_eq!(id("/"), None);
    }

    /// An exact `/admin` behind a JWT, beside `/api/*` and `/*` without one.
    const ADMIN: &str = r#"
        [[routes]]
        path = "/admin"
        [routes.jwt]
        algorithm = "HS256"
        secret = "a-test-secret-that-is-at-least-32-bytes-long"
        [[routes]]
        path = "/api/*"
        [[routes]]
        path = "/*"
    "#;

    /// The handshake's answer for a request to `target`: the route it reaches, or the status
    /// it is refused with before routing.
    fn route_of(t: &RouteTable, target: &str) -> Result<Option<RouteId>, u16> {
        use crate::protocol::handshake::{parse_request, HandshakeLimits, Parsed};
        let req = format!(
            "GET {target} HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        match parse_request(req.as_bytes(), &HandshakeLimits::default()) {
            Ok(Parsed::Complete { request, .. }) => {
                Ok(t.match_path(&request.path).map(|(id, _)| id))
            }
            Ok(Parsed::Partial) => panic!("{target}: partial"),
            Err(e) => Err(e.status()),
        }
    }

    // Issue 11: each of these once reached `/*` or `/api/*` and skipped `/admin`'s JWT.
    #[test]
    fn no_spelling_of_admin_bypasses_its_exact_route() {
        let t = table(ADMIN);
        assert!(t.policy(0).jwt.is_some() && t.policy(1).jwt.is_none());
        for target in [
            "/admin",
            "/admin/",
            "//admin",
            "/%61dmin",
            "/%61%64%6D%69%6E",
            "/admin%2f",
            "/admin/.",
            "/api/../admin",
            "/api/%2e%2e/admin",
            "/api/.%2E/admin/",
            "/api//..//admin",
            "/admin;x",
            "/admin%3Fx=1",
            "/admin%3fx=1",
            "/admin%23",
            "/admin%5c",
            "/admin\\",
            "/admin%00",
            "/%2561dmin",
            "/admin?token=x",
            "/./admin",
            "/../admin",
        ] {
            match route_of(&t, target) {
                Ok(Some(0)) | Err(400) => {}
                other => panic!("{target}: {other:?} (must be route 0, /admin, or 400)"),
            }
        }
        // Refusals are 400 (not routed at all); these normalise onto /admin.
        assert_eq!(route_of(&t, "/admin%2f"), Err(400));
        assert_eq!(route_of(&t, "/admin;x"), Err(400));
        assert_eq!(route_of(&t, "/admin%3Fx=1"), Err(400));
        assert_eq!(route_of(&t, "/api/%2e%2e/admin"), Ok(Some(0)));
        // What is not /admin still goes where it should.
        assert_eq!(route_of(&t, "/admins"), Ok(Some(2)));
        assert_eq!(route_of(&t, "/admin/x"), Ok(Some(2)));
        assert_eq!(route_of(&t, "/admin//"), Ok(Some(0)));
        assert_eq!(route_of(&t, "/api/x/../y"), Ok(Some(1)));
        assert_eq!(route_of(&t, "/api/%61dmin"), Ok(Some(1)));
        assert_eq!(route_of(&t, "/"), Ok(Some(2)));
    }

    #[test]
    fn an_exact_route_with_its_own_trailing_slash_keeps_it() {
        let t = table(
            "[[routes]]\npath = \"/x\"\n[[routes]]\npath = \"/x/\"\n[[routes]]\npath = \"/*\"",
        );
        let id = |p: &str| t.match_path(p).map(|(id, _)| id);
        assert_eq!(
            (id("/x"), id("/x/"), id("/y/")),
            (Some(0), Some(1), Some(2))
        );
        let t = table("[[routes]]\npath = \"/\"\n[[routes]]\npath = \"/x/*\"");
        let id = |p: &str| t.match_path(p).map(|(id, _)| id);
        assert_eq!((id("/"), id("/x/"), id("/y")), (Some(0), Some(1), None));
    }

    #[test]
    fn prefixes_compare_bytes_whatever_the_path_holds() {
        // A prefix length that falls inside a multi-byte character must not panic.
        let t = table("[[routes]]\npath = \"/ab/*\"");
        for p in ["/a\u{e9}", "/\u{e9}\u{e9}", "/ab\u{e9}", "/a", ""] {
            assert_eq!(t.match_path(p).map(|(id, _)| id), None, "{p:?}");
        }
        assert_eq!(t.match_path("/ab/\u{e9}").map(|(id, _)| id), Some(0));
    }

    #[test]
    fn patterns_must_be_in_normal_form() {
        for bad in [
            "//admin",
            "/a//*",
            "/a/./b",
            "/a/../b",
            "/%61dmin",
            "/caf%c3%a9",
            "/a;b",
            "/a%2Fb",
            "/caf\u{e9}",
            "/a\\b",
            "/a/.",
        ] {
            let e = err(&format!("[[routes]]\npath = {bad:?}"));
            assert!(
                matches!(&e, RouteError::BadPath { key, .. } if key == "routes[0].path"),
                "{bad}: {e}"
            );
        }
        table("[[routes]]\npath = \"/caf%C3%A9\"\n[[routes]]\npath = \"/a%20b/*\"");
    }

    #[test]
    fn a_route_without_upstream_uses_the_top_level_one() {
        let t = table(
            r#"
            upstream = "tcp://b:1"
            [[upstreams]]
            name = "x"
            backends = ["echo"]
            [[routes]]
            path = "/x"
            upstream = "x"
            [[routes]]
            path = "/*"
            "#,
        );
        assert_eq!(t.upstreams()[1].name, "default");
        assert_eq!(t.upstreams()[1].backends, vec![Backend::Tcp("b:1".into())]);
        assert_eq!(t.match_path("/y").unwrap().1.upstream, 1);
        assert_eq!(t.match_path("/x").unwrap().1.upstream, 0);
    }

    #[test]
    fn config_errors_name_the_offending_key() {
        let up = "[[upstreams]]\nname = \"a\"\nbackends = [\"echo\"]\n";
        let cases = [
            (
                format!("{up}[[routes]]\npath = \"/\"\nupstream = \"b\""),
                "`routes[0].upstream`: unknown upstream \"b\"",
            ),
            (
                format!("{up}[[routes]]\npath = \"/\"\nupstream = \"a\"\nactions = {{ go = \"nope\" }}"),
                "`routes[0].actions.go`: unknown upstream \"nope\"",
            ),
            (
                "[[upstreams]]\nname = \"a\"\nbackends = [\"echo\", \"http://x\"]".into(),
                "`upstreams[0].backends[1]`: bad backend \"http://x\"",
            ),
            (
                "[[upstreams]]\nname = \"a\"\nbackends = [\"tcp://host\"]".into(),
                "`upstreams[0].backends[0]`: bad backend \"tcp://host\"",
            ),
            (
                "[[upstreams]]\nname = \"a\"\nbackends = [\"tcp://host:99999\"]".into(),
                "port must be 1-65535",
            ),
            (
                "[[upstreams]]\nname = \"a\"\nbackends = [\"tcp://::1:80\"]".into(),
                "IPv6 addresses go in brackets",
            ),
            (
                "[[upstreams]]\nname = \"a\"\nbackends = [\"unix:\"]".into(),
                "missing socket path",
            ),
            (
                "[[upstreams]]\nname = \"a\"\nbackends = [\"tls://a_b!:443\"]".into(),
                "not a valid DNS name or IP address",
            ),
            (
                "upstream = \"tcp://:80\"".into(),
                "`upstream`: bad backend \"tcp://:80\": missing host",
            ),
            (
                "[[upstreams]]\nname = \"a\"".into(),
                "`upstreams[0].backends`: upstream \"a\" has no backends",
            ),
            (
                format!("{up}{up}"),
                "`upstreams[1].name`: duplicate upstream name \"a\"",
            ),
            (
                format!("{up}[[routes]]\npath = \"/x\"\nupstream = \"a\"\n[[routes]]\npath = \"/x\"\nupstream = \"a\""),
                "`routes[1].path`: duplicate route path \"/x\"",
            ),
            (
                format!("{up}[[routes]]\npath = \"/\"\nupstream = \"a\"\nroute_key = \"\"\nactions = {{ go = \"a\" }}"),
                "`routes[0].route_key`: must not be empty",
            ),
        ];
        for (toml_text, expected) in cases {
            let e = err(&toml_text).to_string();
            assert!(e.contains(expected), "{toml_text}\n=> {e}");
        }
    }

    #[test]
    fn path_patterns_must_start_with_slash_and_only_end_in_a_wildcard() {
        for bad in ["chat", "*", "/a*", "/a/*/b", "/a*/*", "/**", ""] {
            let e = err(&format!("[[routes]]\npath = {bad:?}"));
            assert!(
                matches!(&e, RouteError::BadPath { key, pattern, .. } if key == "routes[0].path" && pattern == bad),
                "{bad}: {e}"
            );
        }
        for good in ["/", "/*", "/a/*", "/a/b"] {
            table(&format!("[[routes]]\npath = {good:?}"));
        }
    }

    #[test]
    fn the_routing_key_picks_the_upstream_wherever_it_sits() {
        let t = table(CHAT);
        assert_eq!(text(&t, r#"{"action":"move","x":1}"#), Ok(GAME));
        assert_eq!(
            text(&t, r#"{"x":{"a":[1,{"b":2}]},"y":[[],{}],"action":"pay"}"#),
            Ok(BILLING)
        );
        assert_eq!(text(&t, " \r\n\t{ \"action\" : \"pay\" } "), Ok(BILLING));
        // Values are unescaped before lookup.
        assert_eq!(text(&t, r#"{"action":"p\u0061y"}"#), Ok(BILLING));
        // A route with its own key name.
        assert_eq!(
            select(
                &t,
                "/api/v2/x",
                MessageKind::Text,
                r#"{"action":"x","type":"chat"}"#
            ),
            Ok(CHAT_ID)
        );
        assert_eq!(
            select(&t, "/api/v2/x", MessageKind::Text, r#"{"action":"chat"}"#),
            Ok(GAME)
        );
    }

    #[test]
    fn escaped_keys_count_as_the_key_they_spell() {
        let t = table(CHAT);
        assert_eq!(text(&t, r#"{"\u0061ction":"move"}"#), Ok(GAME));
        assert_eq!(text(&t, r#"{"act\u0069on":"move","text":"hi"}"#), Ok(GAME));
    }

    #[test]
    fn a_duplicated_routing_key_is_refused_however_it_is_spelled() {
        let t = table(CHAT);
        for msg in [
            r#"{"action":"move","action":"pay"}"#,
            r#"{"action":"move","x":[1,2],"action":"move"}"#,
            r#"{"action":"move","\u0061ction":"pay"}"#,
            r#"{"\u0061ction":"move","a\u0063tion":"pay"}"#,
            r#"{"action":5,"action":"pay"}"#,
            r#"{"action":{"action":1},"action":null}"#,
        ] {
            assert_eq!(text(&t, msg), Err(RouteError::DuplicateKey), "{msg}");
        }
        // Only the route's key: other duplicates are the backend's business.
        assert_eq!(text(&t, r#"{"x":1,"x":2,"action":"pay"}"#), Ok(BILLING));
    }

    #[test]
    fn nested_routing_keys_do_not_count() {
        let t = table(CHAT);
        assert_eq!(text(&t, r#"{"data":{"action":"pay"}}"#), Ok(CHAT_ID));
        assert_eq!(
            text(&t, r#"{"data":[{"action":"pay"}],"action":"move"}"#),
            Ok(GAME)
        );
        assert_eq!(
            text(&t, r#"{"data":{"action":"pay"},"action":"move"}"#),
            Ok(GAME)
        );
        // Nested duplicates are not top-level duplicates.
        assert_eq!(
            text(&t, r#"{"action":"move","d":{"action":"pay","action":"x"}}"#),
            Ok(GAME)
        );
    }

    #[test]
    fn anything_unroutable_goes_to_the_default_upstream() {
        let t = table(CHAT);
        for msg in [
            "",
            "   ",
            "hello",
            r#"["action","pay"]"#,
            r#""{\"action\":\"pay\"}""#,
            r#"{"action":"pay""#,
            r#"{"action":"pay"} trailing"#,
            r#"{"action":"pay",}"#,
            r#"{action:"pay"}"#,
            r#"{"action":"unknown"}"#,
            r#"{"action":"PAY"}"#,
            r#"{"action":7}"#,
            r#"{"action":["pay"]}"#,
            r#"{"action":null}"#,
            r#"{"other":"pay"}"#,
            "{}",
        ] {
            assert_eq!(text(&t, msg), Ok(CHAT_ID), "{msg}");
        }
        // Binary messages are never parsed.
        assert_eq!(
            select(&t, "/chat", MessageKind::Binary, r#"{"action":"pay"}"#),
            Ok(CHAT_ID)
        );
        // Routes without actions never parse, even a duplicate key.
        assert_eq!(
            select(
                &t,
                "/api/x",
                MessageKind::Text,
                r#"{"action":"a","action":"b"}"#
            ),
            Ok(BILLING)
        );
        // Invalid UTF-8 inside a string.
        let (_, r) = t.match_path("/chat").unwrap();
        assert_eq!(
            t.select(
                r,
                MessageKind::Text,
                b"{\"action\":\"p\xffy\"}",
                &mut Vec::new()
            ),
            Ok(CHAT_ID)
        );
    }

    #[test]
    fn deep_nesting_goes_to_the_default_without_overflowing() {
        let t = table(CHAT);
        let deep = format!(
            "{{\"a\":{}1{}, \"action\":\"pay\"}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert_eq!(text(&t, &deep), Ok(CHAT_ID));
    }

    #[test]
    fn scratch_and_parser_state_are_reused_across_messages_of_any_size() {
        let t = table(CHAT);
        let (_, r) = t.match_path("/chat").unwrap();
        let mut scratch = Vec::new();
        let big = format!(r#"{{"pad":"{}","action":"move"}}"#, "x".repeat(100_000));
        for _ in 0..3 {
            for (msg, want) in [
                (big.as_str(), GAME),
                (r#"{"action":"pay"}"#, BILLING),
                ("{not json", CHAT_ID),
                (r#"{"action":"move"}"#, GAME),
            ] {
                assert_eq!(
                    t.select(r, MessageKind::Text, msg.as_bytes(), &mut scratch),
                    Ok(want)
                );
            }
        }
    }
}
