//! deploy/grafana-dashboard.json is what operators import into Grafana, so it is tested like
//! code: it parses, it has the shape Grafana 10/11 imports (title, uid, schemaVersion, a
//! Prometheus data source variable every panel and query uses, unique panel ids, a grid that
//! fits), and every metric its queries name is a family the real gateway's `/metrics` serves
//! with the right type (`_total` on a counter, `_bucket`/`_sum`/`_count` on a histogram, a
//! bare name on a gauge), with the labels the queries group by. Non-cluster metrics are
//! checked against a gateway without `[cluster]`; `ringway_cluster_*` against one joined to a
//! real `nats-server` on an ephemeral 127.0.0.1 port (stopped by PID), as tests/cluster.rs
//! does. Without `nats-server` the cluster half fails, unless `RINGWAY_SKIP_NATS=1`.

mod common;
mod common_relay;

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Gateway, WAIT};
use common_relay::{send_text, ws_connect, ws_next_within, Got};
use serde_json::Value;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

fn dashboard() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana-dashboard.json");
    let text = std::fs::read_to_string(&path).expect("deploy/grafana-dashboard.json");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every panel, rows' nested ones (a collapsed row holds its panels) included.
fn all_panels(dash: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for p in list.as_array().expect("panels is an array") {
            out.push(p);
            if let Some(nested) = p.get("panels") {
                walk(nested, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(&dash["panels"], &mut out);
    out
}

/// The PromQL of every query: (panel title, expr), and the series selector of each
/// `label_values(SELECTOR, label)` variable.
fn exprs(dash: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for v in dash["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] != "query" {
            continue;
        }
        let name = format!("variable {}", v["name"]);
        let q = v["query"]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: query is not a string"));
        let args = q
            .strip_prefix("label_values(")
            .and_then(|a| a.strip_suffix(')'))
            .unwrap_or_else(|| panic!("{name}: not label_values(SELECTOR, label): {q}"));
        let (selector, _label) = args
            .rsplit_once(',')
            .expect("label_values(SELECTOR, label)");
        out.push((name, selector.trim().to_string()));
    }
    for p in all_panels(dash) {
        for t in p["targets"].as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("?").to_string();
            let expr = t["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("{title}: a target without expr"));
            out.push((title, expr.to_string()));
        }
    }
    out
}

const DS_VARS: [&str; 2] = ["${datasource}", "${DS_PROMETHEUS}"];

fn is_prometheus_ds(v: &Value) -> bool {
    v["type"] == "prometheus" && v["uid"].as_str().is_some_and(|u| DS_VARS.contains(&u))
}

#[test]
fn dashboard_has_the_shape_grafana_imports() {
    let dash = dashboard();
    assert!(
        dash["title"].as_str().is_some_and(|t| !t.is_empty()),
        "no title"
    );
    assert!(dash["uid"]
        .as_str()
        .is_some_and(|u| !u.is_empty() && u.len() <= 40));
    // Grafana 10.0 writes 38, 11.x 39-41; older numbers get migrated, newer ones are refused.
    let schema = dash["schemaVersion"].as_u64().expect("schemaVersion");
    assert!((36..=41).contains(&schema), "schemaVersion {schema}");

    // The data source is a variable (chosen at import, switchable later), not a fixed uid.
    let vars = dash["templating"]["list"]
        .as_array()
        .expect("templating.list");
    let has_ds_var = vars.iter().any(|v| {
        v["type"] == "datasource" && v["name"] == "datasource" && v["query"] == "prometheus"
    });
    let has_input = dash["__inputs"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|i| i["name"] == "DS_PROMETHEUS" && i["pluginId"] == "prometheus");
    assert!(
        has_ds_var || has_input,
        "no `datasource` variable of type datasource (prometheus) and no DS_PROMETHEUS input"
    );
    for v in vars.iter().filter(|v| v["type"] == "query") {
        assert!(
            is_prometheus_ds(&v["datasource"]),
            "variable {} uses another data source",
            v["name"]
        );
    }

    let panels = all_panels(&dash);
    assert!(panels.len() >= 20, "only {} panels", panels.len());
    let mut ids = BTreeSet::new();
    let mut kinds = BTreeSet::new();
    for p in &panels {
        let title = p["title"]
            .as_str()
            .unwrap_or_else(|| panic!("a panel without title: {p}"));
        let kind = p["type"]
            .as_str()
            .unwrap_or_else(|| panic!("{title}: no type"));
        kinds.insert(kind);
        let id = p["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("{title}: no numeric id"));
        assert!(ids.insert(id), "{title}: panel id {id} used twice");
        let g = &p["gridPos"];
        let (x, w, h) = (g["x"].as_u64(), g["w"].as_u64(), g["h"].as_u64());
        let (Some(x), Some(w), Some(h), Some(_)) = (x, w, h, g["y"].as_u64()) else {
            panic!("{title}: gridPos needs x, y, w, h: {g}");
        };
        assert!(
            w >= 1 && x + w <= 24 && h >= 1,
            "{title}: gridPos {g} off the 24-column grid"
        );
        if kind == "row" {
            assert!(p.get("targets").is_none(), "{title}: a row has no queries");
            continue;
        }
        assert!(
            [
                "timeseries",
                "stat",
                "gauge",
                "bargauge",
                "table",
                "state-timeline"
            ]
            .contains(&kind),
            "{title}: panel type {kind} is not a core Grafana 10 panel"
        );
        assert!(
            is_prometheus_ds(&p["datasource"]),
            "{title}: datasource must be {{type: prometheus, uid: one of {DS_VARS:?}}}, is {}",
            p["datasource"]
        );
        let targets = p["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("{title}: no targets"));
        assert!(!targets.is_empty(), "{title}: no queries");
        let mut refs = BTreeSet::new();
        for t in targets {
            assert!(
                is_prometheus_ds(&t["datasource"]),
                "{title}: a query with another data source"
            );
            let r = t["refId"]
                .as_str()
                .unwrap_or_else(|| panic!("{title}: a query without refId"));
            assert!(refs.insert(r), "{title}: refId {r} twice");
            let expr = t["expr"].as_str().unwrap_or_default();
            assert!(!expr.trim().is_empty(), "{title}: empty expr");
            // Each query follows the instance picker.
            assert!(
                expr.contains("$instance"),
                "{title}: {expr} ignores $instance"
            );
        }
    }
    assert!(
        kinds.contains("row") && kinds.contains("timeseries"),
        "{kinds:?}"
    );
}

// ---- PromQL: the metric names and grouping labels a query uses -------------------------

/// Functions and aggregations the dashboard may call (an identifier followed by `(`).
const FUNCTIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "topk",
    "bottomk",
    "quantile",
    "stddev",
    "group",
    "rate",
    "irate",
    "increase",
    "delta",
    "idelta",
    "deriv",
    "histogram_quantile",
    "abs",
    "clamp_min",
    "clamp_max",
    "max_over_time",
    "min_over_time",
    "avg_over_time",
    "time",
    "vector",
    "scalar",
    "absent",
    "changes",
    "resets",
    "label_replace",
    "round",
    "ceil",
    "floor",
    "sort",
    "sort_desc",
    "timestamp",
];
const KEYWORDS: &[&str] = &["and", "or", "unless", "bool", "offset"];
/// Followed by a parenthesised list of label names.
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

#[derive(Debug, Default)]
struct Query {
    metrics: BTreeSet<String>,
    grouped_by: BTreeSet<String>,
}

/// A small PromQL scanner: skips strings, label matchers `{...}` and ranges `[...]`, takes
/// the labels of `by (...)`-like lists, checks every called identifier is a known function,
/// and returns every other identifier as a metric name.
fn scan(expr: &str) -> Query {
    let b = expr.as_bytes();
    let mut q = Query::default();
    let mut i = 0;
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    let skip_to = |i: &mut usize, close: u8| {
        let mut in_str = false;
        while *i < b.len() {
            let c = b[*i];
            *i += 1;
            match c {
                b'\\' if in_str => *i += 1,
                b'"' => in_str = !in_str,
                c if c == close && !in_str => return,
                _ => {}
            }
        }
        panic!("{expr}: unclosed {}", close as char);
    };
    while i < b.len() {
        let c = b[i];
        match c {
            b'"' => {
                i += 1;
                skip_to(&mut i, b'"');
            }
            b'{' => {
                i += 1;
                skip_to(&mut i, b'}');
            }
            b'[' => {
                i += 1;
                skip_to(&mut i, b']');
            }
            c if c.is_ascii_digit() || c == b'.' => {
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                    i += 1;
                }
            }
            c if ident(c) => {
                let start = i;
                while i < b.len() && ident(b[i]) {
                    i += 1;
                }
                let word = &expr[start..i];
                let mut j = i;
                while j < b.len() && b[j] == b' ' {
                    j += 1;
                }
                // `sum by (le) (...)`: an aggregation with its grouping before the argument.
                let next_word = &expr[j..j + expr[j..].bytes().take_while(|&c| ident(c)).count()];
                let called = (j < b.len() && b[j] == b'(')
                    || (!LABEL_LISTS.contains(&word) && ["by", "without"].contains(&next_word));
                if LABEL_LISTS.contains(&word) {
                    assert!(called, "{expr}: `{word}` without a label list");
                    let close = expr[j..].find(')').expect("closing )") + j;
                    for label in expr[j + 1..close].split(',') {
                        let label = label.trim();
                        if !label.is_empty() {
                            q.grouped_by.insert(label.to_string());
                        }
                    }
                    i = close + 1;
                } else if called {
                    assert!(FUNCTIONS.contains(&word), "{expr}: unknown function {word}");
                } else if !KEYWORDS.contains(&word) {
                    q.metrics.insert(word.to_string());
                }
            }
            _ => i += 1,
        }
    }
    q
}

#[test]
fn the_scanner_finds_metrics_and_grouping_labels() {
    let q = scan(
        r#"histogram_quantile(0.99, sum by (le, route) (rate(ringway_x_bucket{instance=~"$instance", a="b}"}[$__rate_interval])))"#,
    );
    assert_eq!(q.metrics, BTreeSet::from(["ringway_x_bucket".to_string()]));
    assert_eq!(
        q.grouped_by,
        BTreeSet::from(["le".to_string(), "route".to_string()])
    );
    let q = scan("sum(rate(a_total[5m])) by (code) / max without (core) (b) > 0.5");
    assert_eq!(
        q.metrics,
        BTreeSet::from(["a_total".to_string(), "b".to_string()])
    );
    assert_eq!(
        q.grouped_by,
        BTreeSet::from(["code".to_string(), "core".to_string()])
    );
}

// ---- /metrics ------------------------------------------------------------------------------

/// What a scrape serves: family -> type (`# TYPE`), and sample name -> label names seen.
struct Scrape {
    families: BTreeMap<String, String>,
    samples: BTreeMap<String, BTreeSet<String>>,
}

fn parse_scrape(text: &str) -> Scrape {
    let body = text.split_once("\r\n\r\n").map_or(text, |(_, b)| b);
    let mut families = BTreeMap::new();
    let mut samples: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name type");
            families.insert(name.to_string(), kind.to_string());
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            let labels = samples.entry(line[..end].to_string()).or_default();
            if line[end..].starts_with('{') {
                let close = line.rfind('}').expect("closing }");
                // Label values here never hold `=` followed by `"` inside them.
                for pair in line[end + 1..close].split("\",") {
                    if let Some((k, _)) = pair.split_once('=') {
                        labels.insert(k.trim().to_string());
                    }
                }
            }
        }
    }
    assert!(families.len() > 10, "not a metrics page:\n{text}");
    Scrape { families, samples }
}

/// Why `name` (as a query writes it) is not served with the type its spelling asks for.
fn missing(scrape: &Scrape, name: &str) -> Option<String> {
    let f = &scrape.families;
    let typed = |family: &str, kind: &str| f.get(family).is_some_and(|k| k == kind);
    if let Some(base) = name.strip_suffix("_total") {
        if typed(base, "counter") || typed(name, "counter") {
            return None;
        }
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if typed(base, "histogram") {
                return None;
            }
        }
    }
    match f.get(name).map(String::as_str) {
        Some("gauge") => None,
        Some(kind) => Some(format!("{name}: a {kind} family, queried by its bare name")),
        None if typed(&format!("{name}_total"), "counter") => {
            Some(format!("{name}: a counter, served as {name}_total"))
        }
        None => Some(format!("{name}: no `# TYPE` family in /metrics")),
    }
}

/// Every metric the dashboard queries (filtered by `pick`) is served by `gw`, and every label
/// a query groups by is on the samples of the metrics it aggregates, where they have samples.
async fn check_against(gw: &Gateway, pick: impl Fn(&str) -> bool) -> usize {
    let dash = dashboard();
    let scrape = parse_scrape(&gw.metrics().await);
    let mut problems = BTreeSet::new();
    let mut checked = BTreeSet::new();
    for (title, expr) in exprs(&dash) {
        let q = scan(&expr);
        assert!(!q.metrics.is_empty(), "{title}: no metric in {expr}");
        for m in q.metrics.iter().filter(|m| pick(m)) {
            assert!(
                m.starts_with("ringway_"),
                "{title}: {m} is not a ringway metric"
            );
            checked.insert(m.clone());
            if let Some(why) = missing(&scrape, m) {
                problems.insert(why);
                continue;
            }
            // instance/job come from Prometheus' target labels, not the page.
            let Some(have) = scrape.samples.get(m.as_str()) else {
                continue;
            };
            for label in q
                .grouped_by
                .iter()
                .filter(|l| !["instance", "job"].contains(&l.as_str()))
            {
                if !have.contains(label) {
                    problems.insert(format!(
                        "{title}: groups {m} by `{label}`, which its samples lack (they have {have:?})"
                    ));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "the dashboard queries what /metrics does not serve:\n  {}",
        problems.into_iter().collect::<Vec<_>>().join("\n  ")
    );
    checked.len()
}

/// A WebSocket client's whole life on `path`: a message, its echo (when `echo`), a close 1000.
async fn traffic(gw: &Gateway, path: &str, echo: bool) {
    let mut ws = ws_connect(&format!("ws://{}{path}", gw.addr)).await;
    send_text(&mut ws, "dashboard".to_string()).await;
    if echo {
        match ws_next_within(&mut ws, WAIT).await {
            Some(Got::Other(Message::Text(t))) => assert_eq!(t, "dashboard"),
            other => panic!("expected the echo, got {other:?}"),
        }
    }
    let close = CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    };
    timeout(WAIT, ws.close(Some(close)))
        .await
        .expect("close timed out")
        .expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_queries_is_served_without_cluster() {
    // Routes and a backend link, so that per-route and per-link families carry samples: the
    // backend accepts (the kernel does) and never greets, so its link stays down.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let toml = format!(
        "[[upstreams]]\nname = \"silent\"\nbackends = [\"tcp://{}\"]\n\n\
         [[routes]]\npath = \"/silent\"\nupstream = \"silent\"\n\n[[routes]]\npath = \"/*\"\n",
        silent.local_addr().unwrap()
    );
    let gw = Gateway::with_config(&toml, &[]);
    traffic(&gw, "/", true).await;
    traffic(&gw, "/silent", false).await;
    // Both closes counted before the scrape.
    let deadline = Instant::now() + WAIT;
    while common::metric_total(&gw, "ringway_connections_closed_total", "").await < 2 {
        assert!(
            Instant::now() < deadline,
            "closes not counted:\n{}",
            gw.metrics().await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let n = check_against(&gw, |m| !m.starts_with("ringway_cluster_")).await;
    assert!(n >= 25, "only {n} metrics checked");
    let scrape = parse_scrape(&gw.metrics().await);
    assert!(
        !scrape.families.keys().any(|f| f.starts_with("ringway_cluster_")),
        "cluster families without [cluster]: the dashboard's cluster row says 'only with [cluster]'"
    );
}

/// A `nats-server` on 127.0.0.1; killed by PID on drop.
struct Nats {
    child: Child,
    port: u16,
}

impl Nats {
    fn start() -> Option<Nats> {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let nats = Nats { child, port };
        let deadline = Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(nats)
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cluster_metric_the_dashboard_queries_is_served_with_cluster() {
    let Some(nats) = Nats::start() else {
        assert!(
            std::env::var("RINGWAY_SKIP_NATS").is_ok_and(|v| v == "1"),
            "nats-server is not installed: run scripts/setup-test-deps.sh (or set RINGWAY_SKIP_NATS=1 to skip)"
        );
        eprintln!("nats-server is not installed and RINGWAY_SKIP_NATS=1: skipping");
        return;
    };
    let url = format!("nats://127.0.0.1:{}", nats.port);
    let gw = Gateway::start(&["--cluster", &url, "--node-name", "a"]);
    let deadline = Instant::now() + WAIT;
    while gw.metric("ringway_cluster_connected", "").await != 1 {
        assert!(
            Instant::now() < deadline,
            "not connected to NATS:\n{}",
            gw.metrics().await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let n = check_against(&gw, |m| m.starts_with("ringway_cluster_")).await;
    assert!(n >= 4, "only {n} cluster metrics checked");
}
