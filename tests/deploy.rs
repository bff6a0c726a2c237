//! The files in deploy/ are what operators install, so they are tested like code: the unit
//! passes `systemd-analyze verify` without a single warning, and ringway.toml documents every
//! configuration key with its real default.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use ringway::config::{Balance, Config, RouteConfig, SlowConsumer, UpstreamConfig};
use serde::de::{self, DeserializeOwned, Visitor};

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(file)
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("ringway-deploy-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---- the systemd unit ----------------------------------------------------------------------

fn unit_text() -> String {
    std::fs::read_to_string(deploy("ringway.service")).unwrap()
}

/// `Key=value` of the unit (last one wins, as systemd does for scalar settings).
fn unit_setting(text: &str, key: &str) -> Option<String> {
    text.lines()
        .rev()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(str::to_string)
}

#[test]
fn unit_passes_systemd_analyze_verify_without_warnings() {
    // verify insists that ExecStart's binary exists: check a copy that runs the one cargo
    // built, under the same file name (the unit name is part of what is checked).
    let text = unit_text();
    let exec = "ExecStart=/usr/local/bin/ringway ";
    assert!(
        text.contains(exec),
        "the unit must start /usr/local/bin/ringway"
    );
    let dir = TempDir::new("unit");
    let copy = dir.0.join("ringway.service");
    let built = format!("ExecStart={} ", env!("CARGO_BIN_EXE_ringway"));
    std::fs::write(&copy, text.replace(exec, &built)).unwrap();

    let out = match Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            panic!("cannot run systemd-analyze ({e}); install it with `apt-get install -y systemd`")
        }
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{stderr}"
    );
    // Unknown keys, bad values and unknown syscall groups are only warnings with exit 0.
    assert!(
        stderr.trim().is_empty(),
        "systemd-analyze verify warned:\n{stderr}"
    );
}

#[test]
fn unit_gives_the_drain_time_to_finish_and_keeps_io_uring() {
    let text = unit_text();
    let stop: u64 = unit_setting(&text, "TimeoutStopSec")
        .expect("TimeoutStopSec")
        .parse()
        .expect("TimeoutStopSec in plain seconds");
    let grace_s = Config::default().shutdown_grace_ms.div_ceil(1000);
    assert!(
        stop >= grace_s + 5,
        "TimeoutStopSec={stop} leaves no margin over shutdown_grace_ms ({grace_s} s)"
    );
    assert_eq!(unit_setting(&text, "Type").as_deref(), Some("notify"));
    assert!(unit_setting(&text, "WatchdogSec").is_some());
    assert_eq!(
        unit_setting(&text, "LimitNOFILE").as_deref(),
        Some("1048576")
    );
    // Every io_uring syscall is allowed by the positive filter and not denied by a later one.
    let filters: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("SystemCallFilter="))
        .collect();
    for call in ["io_uring_setup", "io_uring_enter", "io_uring_register"] {
        assert!(
            filters
                .iter()
                .any(|f| !f.starts_with('~') && f.split(' ').any(|c| c == call)),
            "{call} not allowed"
        );
        assert!(
            !filters
                .iter()
                .any(|f| f.starts_with('~') && f.contains(call)),
            "{call} denied"
        );
    }
}

// ---- ringway.toml --------------------------------------------------------------------------

/// A serde Deserializer that only records the field names a struct asks for, so the test
/// learns the config keys from the code instead of a list that could go stale.
struct FieldNames<'a>(&'a mut &'static [&'static str]);

impl<'de> de::Deserializer<'de> for FieldNames<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("not a struct"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = fields;
        Err(de::Error::custom("fields recorded"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

fn fields_of<T: DeserializeOwned>() -> BTreeSet<&'static str> {
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(FieldNames(&mut fields));
    assert!(!fields.is_empty(), "no fields recorded");
    fields.iter().copied().collect()
}

fn toml_text() -> String {
    std::fs::read_to_string(deploy("ringway.toml")).unwrap()
}

/// Lines of the form `#key = value` (no space after `#`) are documented defaults; prose
/// comments start with `# `.
fn commented_key(line: &str) -> Option<&str> {
    let rest = line.strip_prefix('#')?;
    let (key, _) = rest.split_once(" = ")?;
    key.chars()
        .all(|c| c.is_ascii_lowercase() || c == '_')
        .then_some(key)
        .filter(|k| !k.is_empty())
}

/// Keys (set or documented) per section: "" for the top level, else the `[[table]]` name.
fn documented_keys(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut keys: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut section = String::new();
    keys.entry(section.clone()).or_default();
    for line in text.lines() {
        if let Some(name) = line.strip_prefix("[[").and_then(|l| l.strip_suffix("]]")) {
            keys.get_mut("").unwrap().insert(name.to_string());
            section = name.to_string();
            keys.entry(section.clone()).or_default();
            continue;
        }
        let key = commented_key(line).or_else(|| {
            let (k, _) = line.split_once(" = ")?;
            (!k.starts_with('#')).then_some(k)
        });
        if let Some(key) = key {
            keys.get_mut(&section).unwrap().insert(key.to_string());
        }
    }
    keys
}

fn load(text: &str, tag: &str) -> Config {
    let dir = TempDir::new(tag);
    let path = dir.0.join("ringway.toml");
    std::fs::write(&path, text).unwrap();
    Config::from_file(&path).unwrap_or_else(|e| panic!("{e}"))
}

/// What deploy/ringway.toml says: the defaults plus its example upstreams and routes.
fn expected() -> Config {
    Config {
        upstreams: vec![
            UpstreamConfig {
                name: "chat".into(),
                backends: vec!["tcp://127.0.0.1:9000".into()],
                ..UpstreamConfig::default()
            },
            UpstreamConfig {
                name: "presence".into(),
                backends: vec!["unix:/run/presence/presence.sock".into()],
                balance: Balance::Hash,
                buffer_messages: 1000,
                ..UpstreamConfig::default()
            },
        ],
        routes: vec![
            RouteConfig {
                path: "/chat".into(),
                upstream: "chat".into(),
                actions: [("heartbeat".to_string(), "presence".to_string())].into(),
                authorize: true,
                pass_headers: vec!["authorization".into(), "x-request-id".into()],
                compression: Some(ringway::config::Compression::Shared),
                ..RouteConfig::default()
            },
            RouteConfig {
                path: "/*".into(),
                ..RouteConfig::default()
            },
        ],
        ..Config::default()
    }
}

#[test]
fn example_config_is_the_defaults_plus_its_routes() {
    let config = Config::from_file(&deploy("ringway.toml")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config, expected());
    // And the route table the gateway would build from it is valid.
    ringway::route::RouteTable::from_config(&config).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.routes[1].slow_consumer, SlowConsumer::Close);
}

#[test]
fn every_commented_value_is_the_real_default() {
    let text = toml_text();
    let mut uncommented = 0;
    let all: String = text
        .lines()
        .map(|l| {
            if commented_key(l).is_some() {
                uncommented += 1;
                &l[1..]
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert!(uncommented > 20, "only {uncommented} documented defaults");
    // A commented value that differs from the default would change the result; one that
    // duplicates a set key would not parse.
    // `workers` has no value for its default (one per CPU): the documented example is checked
    // as an example, everything else must equal the default.
    // The upstream TLS files (no default) must exist to load: any readable file will do.
    let readable = deploy("ringway.toml");
    let mut all = all;
    for example in [
        "/etc/ringway/backend-ca.pem",
        "/etc/ringway/gateway-client.pem",
        "/etc/ringway/gateway-client.key",
    ] {
        assert!(all.contains(example), "the documented {example}");
        all = all.replace(example, readable.to_str().unwrap());
    }
    let mut loaded = load(&all, "uncommented");
    for u in &mut loaded.upstreams[..1] {
        assert_eq!(
            u.ca_file.as_deref(),
            Some(readable.as_path()),
            "the documented example"
        );
        (u.ca_file, u.client_cert, u.client_key) = (None, None, None);
    }
    assert_eq!(loaded.workers, Some(4), "the documented example");
    loaded.workers = None;
    // Likewise `memory_budget_bytes` (its default depends on the machine).
    assert_eq!(
        loaded.memory_budget_bytes,
        Some(1 << 30),
        "the documented example"
    );
    loaded.memory_budget_bytes = None;
    // Likewise wss:// (off by default): the documented example, both keys together.
    assert_eq!(
        loaded.listen_tls,
        Some("[::]:443".parse().unwrap()),
        "the documented example"
    );
    assert_eq!(loaded.tls.certificates.len(), 1, "the documented example");
    loaded.listen_tls = None;
    loaded.tls = Default::default();
    // Likewise `cluster` (off by default): the documented example, two NATS servers.
    assert_eq!(
        loaded.cluster.as_ref().map(|c| (c.nats.len(), c.node_id)),
        Some((2, Some(1))),
        "the documented cluster example"
    );
    loaded.cluster = None;
    // Likewise `demo_page` (unset: decided by upstream and routes).
    assert_eq!(loaded.demo_page, Some(false), "the documented example");
    loaded.demo_page = None;
    // Likewise `jwt` (off by default): its documented example must parse and build.
    assert!(
        loaded.routes.iter().any(|r| r.jwt.is_some()),
        "the documented jwt example"
    );
    ringway::route::RouteTable::from_config(&loaded).expect("the documented jwt example is usable");
    for r in &mut loaded.routes {
        r.jwt = None;
    }
    assert_eq!(loaded, expected());
}

#[test]
fn every_config_key_is_documented() {
    let keys = documented_keys(&toml_text());
    let check = |section: &str, fields: BTreeSet<&'static str>| {
        let have = &keys[section];
        let missing: Vec<_> = fields.iter().filter(|f| !have.contains(**f)).collect();
        assert!(
            missing.is_empty(),
            "deploy/ringway.toml does not document {missing:?} (section {section:?})"
        );
    };
    check("", fields_of::<Config>());
    check("upstreams", fields_of::<UpstreamConfig>());
    check("routes", fields_of::<RouteConfig>());
}

// ---- sysctl.d ------------------------------------------------------------------------------

#[test]
fn sysctl_keys_exist_on_this_kernel() {
    let text = std::fs::read_to_string(deploy("sysctl.d/90-ringway.conf")).unwrap();
    let mut count = 0;
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let (key, value) = line.split_once('=').expect(line);
        let (optional, key) = match key.trim().strip_prefix('-') {
            Some(k) => (true, k),
            None => (false, key.trim()),
        };
        assert!(!value.trim().is_empty(), "no value: {line}");
        let path = Path::new("/proc/sys").join(key.replace('.', "/"));
        assert!(
            optional || path.exists(),
            "{key} does not exist on this kernel (typo? prefix optional keys with -)"
        );
        count += 1;
    }
    assert!(count >= 9, "only {count} settings");
}
