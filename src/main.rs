//! The `ringway` binary: parse the command line, load the config, start the gateway, and
//! drain it on SIGINT/SIGTERM. Wiring only.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use mimalloc::MiMalloc;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use ringway::config::{self, Config, Upstream};
use ringway::gateway::Gateway;
use ringway::ops::admin::{self, AdminState};
use ringway::ops::metrics::Sources;
use ringway::ops::notify::Notifier;
use std::sync::Arc;

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

/// A WebSocket edge gateway for Linux. With no arguments it serves ws://127.0.0.1:8080/ with
/// the embedded upstream (`echo`).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Address to serve WebSocket clients on [default: 127.0.0.1:8080].
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<SocketAddr>,
    /// Address to serve wss:// (TLS) clients on, beside --listen; needs --tls-cert and
    /// --tls-key (or [[tls.certificates]] in the config file).
    #[arg(long, value_name = "ADDR:PORT")]
    listen_tls: Option<SocketAddr>,
    /// PEM file with the TLS certificate, then its chain (replaces [[tls.certificates]]).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM file with the certificate's private key (PKCS#8, SEC1 or PKCS#1).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Event-loop threads, one per core (1-255) [default: one per CPU the process may use].
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
    /// Where client messages go: `echo` (the embedded upstream, through the relay),
    /// `local-echo` (inside each core), or a backend `tcp://HOST:PORT` / `unix:PATH`
    /// (`tls://` backends need a `ca_file`: declare them in the config's [[upstreams]]).
    #[arg(long, value_name = "NAME")]
    upstream: Option<Upstream>,
    /// TOML configuration file; command-line flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Largest message (all fragments together) and frame a client may send, in bytes
    /// (at most 1 GiB).
    #[arg(long, value_name = "BYTES")]
    max_message: Option<u64>,
    /// Frames one message may span (0: no limit; at most 1048576), for every route.
    #[arg(long, value_name = "N")]
    max_fragments: Option<u32>,
    /// permessage-deflate for every route: `off`, `shared` (one compressor per core) or
    /// `dedicated` (context takeover, a compressor and inflater per connection).
    #[arg(long, value_name = "MODE")]
    compression: Option<config::Compression>,
    /// Close connections that sent no message for this long, in milliseconds (0: never; at
    /// most one day, 86400000).
    #[arg(long, value_name = "MS")]
    idle_timeout_ms: Option<u64>,
    /// Join a cluster of gateways on this NATS server (`nats://HOST:PORT`; replaces
    /// `cluster.nats` of the config file, whose other `[cluster]` keys still apply).
    #[arg(long, value_name = "URL")]
    cluster: Option<String>,
    /// This node's name in the cluster [default: host name and listen port].
    #[arg(long, value_name = "NAME", requires = "cluster")]
    node_name: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
    /// Admin listener for /metrics, /healthz and /readyz [default: 127.0.0.1:9091].
    #[arg(long, value_name = "ADDR:PORT")]
    admin: Option<SocketAddr>,
    /// Log format: `text` or `json`.
    #[arg(long, default_value = "text", value_name = "FORMAT")]
    log_format: String,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Validate a configuration file (syntax, values, routes, upstreams, and every
    /// certificate, key and CA file with each leaf's names and notAfter) and exit: 0 when it
    /// can be used, 1 with a message naming the key, file and line (or the certificate file:
    /// expired, not yet valid, unparsable, key not matching) when not.
    CheckConfig { file: PathBuf },
}

fn main() {
    // Panic messages can quote input (a header, a credential): print the location only.
    ringway::edge::panic::install_hook();
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    if let Err(e) = run(cli) {
        tracing::error!("{e:#}");
        std::process::exit(1);
    }
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RINGWAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// The configuration: the file (if any), then the command-line flags over it.
fn load_config(cli: &Cli) -> anyhow::Result<Config> {
    let mut config = match &cli.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(listen) = cli.listen {
        config.listen = listen;
    }
    if let Some(listen) = cli.listen_tls {
        config.listen_tls = Some(listen);
    }
    if let (Some(cert), Some(key)) = (&cli.tls_cert, &cli.tls_key) {
        config.tls.certificates = vec![config::CertificateConfig {
            cert: cert.clone(),
            key: key.clone(),
        }];
    }
    if let Some(workers) = cli.workers {
        anyhow::ensure!(workers > 0, "--workers must be at least 1");
        flag_within("--workers", workers, 1, config::MAX_WORKERS)?;
        config.workers = Some(workers);
    }
    if let Some(upstream) = &cli.upstream {
        config.upstream = upstream.clone();
    }
    if let Some(max) = cli.max_message {
        flag_within("--max-message", max, 1, config::MAX_MESSAGE_BYTES)?;
        config.max_message_bytes = max;
        config.max_frame_bytes = max;
    }
    if let Some(n) = cli.max_fragments {
        flag_within("--max-fragments", n, 0, config::MAX_FRAGMENTS)?;
        config.max_fragments = n;
        for route in &mut config.routes {
            route.max_fragments = n;
        }
    }
    if let Some(mode) = cli.compression {
        config.compression = mode;
        for route in &mut config.routes {
            route.compression = Some(mode);
        }
    }
    if let Some(ms) = cli.idle_timeout_ms {
        flag_within("--idle-timeout-ms", ms, 0, config::MAX_CONNECTION_TIMER_MS)?;
        config.idle_timeout_ms = ms;
    }
    if let Some(admin) = cli.admin {
        config.admin_listen = Some(admin);
    }
    if let Some(url) = &cli.cluster {
        config::cluster::check_server(url).map_err(|p| anyhow::anyhow!("--cluster: {p}"))?;
        let cluster = config
            .cluster
            .get_or_insert_with(|| config::ClusterConfig::with_servers(Vec::new()));
        cluster.nats = vec![url.clone()];
    }
    if let Some(name) = &cli.node_name {
        if let Some(cluster) = config.cluster.as_mut() {
            cluster.node = Some(name.clone());
        }
    }
    config.validate("command line")?;
    Ok(config)
}

/// A flag's value within the bounds of its config key (src/config.rs), else an error naming
/// the flag.
fn flag_within<T: PartialOrd + std::fmt::Display>(
    flag: &str,
    value: T,
    min: T,
    max: T,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        value >= min && value <= max,
        "{flag} must be between {min} and {max}, not {value}"
    );
    Ok(())
}

/// The admin listener. The default address failing to bind (another ringway, a test run)
/// is logged and skipped; an address the operator asked for must work.
fn start_admin(
    cli: &Cli,
    config: &Config,
    gateway: &Gateway,
) -> anyhow::Result<Option<Arc<AdminState>>> {
    let Some(addr) = config.admin_listen else {
        return Ok(None);
    };
    let shared = gateway.shared();
    let budget = gateway.shared();
    let state = Arc::new(AdminState::new(Sources {
        cores: gateway.stats().to_vec(),
        links: gateway.upstream_links().to_vec(),
        open_connections: Arc::new(move || {
            shared.open.load(std::sync::atomic::Ordering::Relaxed) as u64
        }),
        memory_budget: Arc::new(move || {
            budget
                .memory_budget
                .load(std::sync::atomic::Ordering::Relaxed)
        }),
        relay_heartbeat: gateway.relay_heartbeat(),
        relay: gateway.shared().relay.clone(),
        certificates: gateway.certificate_expiry(),
    }));
    match admin::spawn(addr, state.clone()) {
        Ok((bound, _)) => {
            tracing::info!("admin: http://{bound}/metrics, /healthz, /readyz");
            state.set_ready(true);
            Ok(Some(state))
        }
        Err(e) if cli.admin.is_none() && config.admin_listen == Config::default().admin_listen => {
            tracing::warn!("admin listener not started: cannot listen on {addr}: {e}; set --admin to choose another address");
            Ok(None)
        }
        Err(e) => Err(anyhow::anyhow!(
            "cannot listen on {addr} for the admin listener: {e}"
        )),
    }
}

/// STATUS= for `systemctl status`: what is served and how many are connected.
fn spawn_status(n: Arc<Notifier>, shared: Arc<ringway::edge::Shared>, addr: SocketAddr) {
    let _ = std::thread::Builder::new()
        .name("ringway-status".into())
        .spawn(move || loop {
            std::thread::sleep(std::time::Duration::from_secs(2));
            if shared.draining.load(std::sync::atomic::Ordering::Relaxed) {
                return;
            }
            let open = shared.open.load(std::sync::atomic::Ordering::Relaxed);
            n.status(&format!("serving ws://{addr}/, {open} connections open"));
        });
}

/// A core or the relay whose thread ends while we are not draining (its event loop returned
/// an error or panicked) leaves a process that can no longer serve: log it once and exit
/// non-zero at once, so the service manager restarts us (never a running process without
/// its cores).
fn spawn_supervisor(gateway: &Gateway) -> anyhow::Result<()> {
    /// EX_SOFTWARE (sysexits.h): an internal error.
    const LOOP_DIED: i32 = 70;
    let endings = gateway.loop_endings();
    let shared = gateway.shared();
    std::thread::Builder::new()
        .name("ringway-supervisor".into())
        .spawn(move || {
            for ended in endings.iter() {
                if shared.draining.load(std::sync::atomic::Ordering::Acquire) {
                    continue;
                }
                tracing::error!(
                    "{} stopped: its event loop {}; exiting with code {LOOP_DIED} so the service manager restarts ringway",
                    ended.name,
                    ended.how
                );
                std::process::exit(LOOP_DIED);
            }
        })
        .context("starting the supervisor thread")?;
    Ok(())
}

/// Everything a start would read: the file, the routes, every certificate and key (the
/// wss:// listener's, the backends' CA files and client certificates). Each leaf is listed
/// with its names and notAfter; an expired or not-yet-valid one fails the check.
fn check_config(file: &std::path::Path) -> anyhow::Result<()> {
    use ringway::tls::expiry::{self, Standing};
    let config = Config::from_file(file)?;
    let in_file =
        |e: &dyn std::fmt::Display| anyhow::anyhow!("config file {}: {e}", file.display());
    let routes = ringway::route::RouteTable::from_config(&config).map_err(|e| in_file(&e))?;
    let mut leaves = Vec::new();
    if config.listen_tls.is_some() {
        let tls =
            ringway::tls::TlsServer::new(&config.tls.certificates).map_err(|e| in_file(&e))?;
        leaves.extend(tls.certificates().loaded().iter().cloned());
    }
    for spec in routes.upstreams() {
        if let Some(files) = &spec.tls {
            let client = ringway::tls::client::client_config(files).map_err(|e| in_file(&e))?;
            let (ca, n) = (files.ca_file.display(), client.roots.len());
            println!("{}: ca_file {ca}: {n} CA certificate(s)", files.key);
            leaves.extend(client.client_cert);
        }
    }
    let now = expiry::unix_now();
    for l in &leaves {
        let (path, after) = (l.cert_path.display(), expiry::date(l.not_after));
        println!("{path}: names {:?}, notAfter {after}", l.names);
        match expiry::standing(l, now) {
            Standing::Expired => anyhow::bail!("certificate file {path}: expired at {after}"),
            Standing::NotYetValid => anyhow::bail!(
                "certificate file {path}: not valid before {}",
                expiry::date(l.not_before)
            ),
            Standing::ExpiresSoon => {
                println!(
                    "{path}: warning: expires in {} days",
                    (l.not_after - now) / 86_400
                )
            }
            Standing::Valid => {}
        }
    }
    println!("{}: ok", file.display());
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(Command::CheckConfig { file }) = &cli.command {
        return check_config(file);
    }
    if cli.log_format != "text" && cli.log_format != "json" {
        anyhow::bail!(
            "--log-format must be `text` or `json`, not {:?}",
            cli.log_format
        );
    }
    let config = load_config(&cli)?;

    // Block the signals before any thread starts so only the signal thread sees them.
    let mut signals =
        Signals::new([SIGINT, SIGTERM, SIGHUP]).context("installing signal handlers")?;
    let gateway = Gateway::start(config.clone())?;
    let wss = gateway
        .local_tls_addr()
        .map(|a| format!(" and wss://{a}/"))
        .unwrap_or_default();
    tracing::info!(
        "ringway {} serving ws://{}/{wss} with upstream {} on {} worker(s)",
        env!("CARGO_PKG_VERSION"),
        gateway.local_addr(),
        config.upstream,
        gateway.workers()
    );
    spawn_supervisor(&gateway)?;
    let admin = start_admin(&cli, &config, &gateway)?;
    let notifier = Notifier::from_env().map(Arc::new);
    if let Some(n) = &notifier {
        n.ready();
        n.status(&format!(
            "serving ws://{}/, 0 connections open",
            gateway.local_addr()
        ));
        spawn_status(n.clone(), gateway.shared(), gateway.local_addr());
        // Fed only while every core and the relay turn (the /healthz condition).
        let cores = gateway.stats().to_vec();
        let relay = gateway.relay_heartbeat();
        ringway::ops::notify::spawn_watchdog(n.clone(), move || {
            ringway::ops::health::liveness(&cores, relay.as_deref()).is_ok()
        });
    }
    let mut grace = config.shutdown_grace_ms;
    for signal in signals.forever() {
        if signal == SIGHUP {
            // Reload without closing anyone; a bad file leaves the running config in force.
            if let Some(n) = &notifier {
                n.reloading();
            }
            let result = load_config(&cli).and_then(|new| {
                let g = new.shutdown_grace_ms;
                gateway.reload(new)?;
                Ok(g)
            });
            if let Some(n) = &notifier {
                n.ready();
            }
            match result {
                Ok(g) => {
                    grace = g;
                    tracing::info!("SIGHUP: configuration reloaded");
                }
                Err(e) => tracing::error!(
                    "SIGHUP: reload refused, the running configuration stays: {e:#}"
                ),
            }
            continue;
        }
        let name = if signal == SIGINT {
            "SIGINT"
        } else {
            "SIGTERM"
        };
        tracing::info!("{name}: draining; clients get close 1001 and up to {grace} ms to answer");
        break;
    }
    if let Some(a) = &admin {
        a.set_ready(false);
    }
    if let Some(n) = &notifier {
        n.stopping();
    }
    gateway.begin_shutdown();
    let stats = gateway.join()?;
    let closed: u64 = stats.iter().map(|s| s.closed.get()).sum();
    let stale: u64 = stats.iter().map(|s| s.stale_replies.get()).sum();
    tracing::info!(closed, stale_replies = stale, "stopped");
    Ok(())
}
