//! The `[cluster]` table: how this gateway joins a cluster of gateways on NATS (the relay's
//! cluster bus, src/relay/cluster/). Absent, the gateway is a single node and no NATS code runs.
//!
//! Node ids: every `ConnId` carries its node's id in 8 bits, so a reply can be routed to the
//! node that owns the connection. `node_id` (1-255) may be set explicitly; by default it is
//! derived from the node name (a hash onto 1..=255). Two nodes with the same id would hand out
//! the same connection ids, so each node announces `name` and `id` on the heartbeat subject; a
//! node that hears another name with its own id logs an error, counts it
//! (`ringway_cluster_dropped_total{reason="node_id_conflict"}`) and refuses to send to that
//! id until the other node is gone, rather than misdeliver. Set `node_id` explicitly on every
//! node of a cluster larger than a handful of nodes: hashes of 20 names onto 255 ids collide
//! with a probability of about 50 %.

use std::path::PathBuf;

use serde::Deserialize;

/// Messages that may wait between the relay and the NATS thread, each way, by default.
pub const DEFAULT_CLUSTER_BUFFER: usize = 65_536;
/// `cluster.buffer_messages`.
pub const MAX_CLUSTER_BUFFER: usize = 1 << 22;
/// `cluster.node`: the name goes into every heartbeat.
pub const MAX_NODE_NAME: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// The NATS servers (`nats://HOST:PORT` or `tls://HOST:PORT`); the client fails over
    /// between them.
    pub nats: Vec<String>,
    /// This node's name; absent means the host name and the listen port (`host:8080`).
    pub node: Option<String>,
    /// This node's id in its connection ids, 1-255; absent means derived from the name.
    pub node_id: Option<u32>,
    /// NATS credentials: a token, or a user and password.
    pub token: Option<String>,
    pub user: Option<String>,
    pub password: Option<String>,
    /// PEM CA certificates for a TLS connection to NATS (then required by the servers).
    pub ca_file: Option<PathBuf>,
    /// Messages that may wait for the NATS connection (and from it for the relay); past
    /// this, cross-node messages are dropped and counted.
    pub buffer_messages: usize,
}

impl ClusterConfig {
    /// A cluster config that only names NATS servers (`--cluster`).
    pub fn with_servers(nats: Vec<String>) -> ClusterConfig {
        ClusterConfig {
            nats,
            ..ClusterConfig::default()
        }
    }

    /// This node's name: `node`, else `HOSTNAME:PORT`.
    pub fn node_name(&self, listen_port: u16) -> String {
        match &self.node {
            Some(n) => n.clone(),
            None => {
                let host = host_name();
                format!("{host}:{listen_port}")
            }
        }
    }

    /// This node's id: `node_id`, else a hash of the name onto 1..=255 (never 0: 0 is a
    /// single gateway's).
    pub fn node_id(&self, name: &str) -> u8 {
        match self.node_id {
            Some(id) => id.clamp(1, 255) as u8,
            None => derive_node_id(name),
        }
    }

    /// The first key out of bounds (relative to `cluster.`), and why.
    pub(crate) fn check(&self) -> Result<(), (String, String)> {
        let k = |name: &str| format!("cluster.{name}");
        if self.nats.is_empty() {
            return Err((
                k("nats"),
                "must list at least one NATS server (\"nats://HOST:PORT\")".into(),
            ));
        }
        for url in &self.nats {
            check_server(url).map_err(|p| (k("nats"), p))?;
        }
        if let Some(node) = &self.node {
            if node.is_empty() || node.len() > MAX_NODE_NAME || node.chars().any(char::is_control) {
                return Err((
                    k("node"),
                    format!(
                        "must be 1 to {MAX_NODE_NAME} bytes without control characters, not {node:?}"
                    ),
                ));
            }
        }
        if let Some(id) = self.node_id {
            if !(1..=255).contains(&id) {
                return Err((
                    k("node_id"),
                    format!("must be between 1 and 255, not {id} (0 is a single gateway's)"),
                ));
            }
        }
        if self.token.is_some() && (self.user.is_some() || self.password.is_some()) {
            return Err((k("token"), "cannot be set with user/password".into()));
        }
        match (&self.user, &self.password) {
            (Some(_), None) => return Err((k("password"), "must be set with user".into())),
            (None, Some(_)) => return Err((k("user"), "must be set with password".into())),
            _ => {}
        }
        if let Some(p) = &self.ca_file {
            if let Err(e) = std::fs::File::open(p) {
                return Err((k("ca_file"), format!("cannot read {}: {e}", p.display())));
            }
        }
        if !(1..=MAX_CLUSTER_BUFFER).contains(&self.buffer_messages) {
            return Err((
                k("buffer_messages"),
                format!(
                    "must be between 1 and {MAX_CLUSTER_BUFFER}, not {}",
                    self.buffer_messages
                ),
            ));
        }
        Ok(())
    }
}

/// `nats://HOST:PORT` (or `tls://`), with a port.
pub fn check_server(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("nats://")
        .or_else(|| url.strip_prefix("tls://"))
        .ok_or_else(|| format!("{url:?}: expected nats://HOST:PORT or tls://HOST:PORT"))?;
    let hostport = rest.rsplit('@').next().unwrap_or(rest);
    match hostport.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {
            Ok(())
        }
        _ => Err(format!("{url:?}: expected nats://HOST:PORT (with a port)")),
    }
}

/// FNV-1a of the name onto 1..=255.
pub fn derive_node_id(name: &str) -> u8 {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h % 255 + 1) as u8
}

/// The kernel's host name (as `hostname` prints it).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "ringway".into())
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            nats: Vec::new(),
            node: None,
            node_id: None,
            token: None,
            user: None,
            password: None,
            ca_file: None,
            buffer_messages: DEFAULT_CLUSTER_BUFFER,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> ClusterConfig {
        ClusterConfig::with_servers(vec!["nats://127.0.0.1:4222".into()])
    }

    #[test]
    fn derived_ids_are_never_zero_and_stable() {
        for name in ["", "a", "host:8080", "node-2", "ünïcode"] {
            let id = derive_node_id(name);
            assert_ne!(id, 0, "{name}");
            assert_eq!(id, derive_node_id(name));
        }
        assert_ne!(derive_node_id("a:1"), derive_node_id("a:2"));
        let mut c = ok();
        c.node_id = Some(7);
        assert_eq!(c.node_id("whatever"), 7);
    }

    #[test]
    fn bad_values_name_their_key() {
        type Edit = Box<dyn Fn(&mut ClusterConfig)>;
        let cases: Vec<(Edit, &str)> = vec![
            (Box::new(|c| c.nats.clear()), "cluster.nats"),
            (
                Box::new(|c| c.nats = vec!["127.0.0.1:4222".into()]),
                "cluster.nats",
            ),
            (
                Box::new(|c| c.nats = vec!["nats://host".into()]),
                "cluster.nats",
            ),
            (Box::new(|c| c.node_id = Some(0)), "cluster.node_id"),
            (Box::new(|c| c.node_id = Some(256)), "cluster.node_id"),
            (Box::new(|c| c.node = Some(String::new())), "cluster.node"),
            (Box::new(|c| c.user = Some("u".into())), "cluster.password"),
            (Box::new(|c| c.password = Some("p".into())), "cluster.user"),
            (
                Box::new(|c| {
                    c.token = Some("t".into());
                    c.user = Some("u".into());
                    c.password = Some("p".into());
                }),
                "cluster.token",
            ),
            (
                Box::new(|c| c.ca_file = Some("/nonexistent/ca.pem".into())),
                "cluster.ca_file",
            ),
            (
                Box::new(|c| c.buffer_messages = 0),
                "cluster.buffer_messages",
            ),
        ];
        for (set, want) in cases {
            let mut c = ok();
            set(&mut c);
            assert_eq!(c.check().map_err(|e| e.0), Err(want.to_string()), "{c:?}");
        }
        assert_eq!(ok().check(), Ok(()));
        let mut c = ok();
        c.nats = vec!["nats://a:1".into(), "tls://user:pw@b:4222".into()];
        assert_eq!(c.check(), Ok(()));
    }
}

#[cfg(test)]
mod file_tests {
    use crate::config::Config;

    fn load(text: &str) -> Result<Config, String> {
        let path = std::env::temp_dir().join(format!(
            "ringway-cluster-{}-{:?}.toml",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(&path, text).unwrap();
        let r = Config::from_file(&path).map_err(|e| e.to_string());
        let _ = std::fs::remove_file(&path);
        r
    }

    #[test]
    fn cluster_table_parses_with_defaults() {
        let c = load("[cluster]\nnats = [\"nats://127.0.0.1:4222\", \"nats://127.0.0.1:4223\"]\nnode = \"a\"\n")
            .unwrap();
        let cl = c.cluster.unwrap();
        assert_eq!(cl.nats.len(), 2);
        assert_eq!(cl.node_name(8080), "a");
        assert_eq!(cl.buffer_messages, super::DEFAULT_CLUSTER_BUFFER);
        assert!(load("").unwrap().cluster.is_none());
        let unnamed = super::ClusterConfig::with_servers(vec!["nats://h:1".into()]);
        assert!(unnamed.node_name(9000).ends_with(":9000"));
    }

    #[test]
    fn cluster_errors_name_key_file_and_line() {
        let err =
            load("backlog = 10\n\n[cluster]\nnats = [\"nats://h:1\"]\nnode_id = 0\n").unwrap_err();
        assert!(err.contains("cluster.node_id"), "{err}");
        assert!(err.contains("line 5"), "{err}");
        assert!(err.contains("ringway-cluster-"), "{err}");
        let err = load("[cluster]\nnats = [\"localhost:4222\"]\n").unwrap_err();
        assert!(
            err.contains("cluster.nats") && err.contains("line 2"),
            "{err}"
        );
        let err = load("[cluster]\nnats = [\"nats://h:1\"]\nnode_name = \"x\"\n").unwrap_err();
        assert!(err.contains("node_name") && err.contains("line 3"), "{err}");
    }
}
