//! The composition root: starts every core (`edge`), the relay and its links (`relay`) and
//! hands `ops` what it reads (counters, heartbeats, link states); applies a reload to every
//! core; reports every event loop that ends; joins them at shutdown. The only module besides
//! `main.rs` that knows every other one, so that none of them has to know each other:
//! `edge` and `relay` meet only through the relay's channel types, and `ops` only reads.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::config::{Config, Upstream};
use crate::edge::{self, CoreStats, Shared};
use crate::ops;
use crate::relay::{self, UpstreamLink};
use crate::route::RouteTable;
use crate::telemetry::Heartbeat;
use crate::tls::{TlsError, TlsServer};

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(
        "io_uring is unavailable ({0}). ringway needs io_uring (Linux 6.0 or later): set \
         `sysctl kernel.io_uring_disabled=0` (or 1 with this user in kernel.io_uring_group), \
         and in containers allow io_uring_setup, io_uring_enter and io_uring_register in the \
         seccomp profile"
    )]
    IoUringUnavailable(io::Error),
    #[error(
        "this kernel's io_uring lacks provided-buffer rings or multishot receive ({0}); \
         ringway needs Linux 6.0 or later"
    )]
    KernelTooOld(io::Error),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("core {core}: {source}")]
    Worker { core: usize, source: io::Error },
    #[error("core {0} stopped abnormally (panic); see the log above")]
    WorkerPanicked(usize),
    #[error("cannot start the gateway: {0}")]
    Setup(io::Error),
    #[error(
        "the new configuration changes listen, listen_tls, workers, backlog, read buffers, \
         relay_queue, upstreams or cluster, which need a restart; keeping the running \
         configuration"
    )]
    NeedsRestart,
    #[error("invalid routes: {0}")]
    Routes(#[from] crate::route::RouteError),
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("TLS to backends: {0}")]
    BackendTls(#[from] crate::tls::client::ClientTlsError),
}

/// A running gateway: its cores, its relay, and the address it serves.
pub struct Gateway {
    local_addr: SocketAddr,
    /// The wss:// listener's address, when TLS is configured.
    local_tls_addr: Option<SocketAddr>,
    tls: Option<TlsServer>,
    /// The client certificates `tls://` backends are shown (fixed at start).
    client_certs: Arc<Vec<crate::tls::Loaded>>,
    upstream_links: Vec<UpstreamLink>,
    config: Arc<Config>,
    routes: Arc<RouteTable>,
    workers: Vec<JoinHandle<io::Result<()>>>,
    stats: Vec<Arc<CoreStats>>,
    relay: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
    wakers: Vec<Arc<edge::inbox::Waker>>,
    /// The relay loop's heartbeat, when a relay serves (not with `local-echo`).
    relay_heartbeat: Option<Arc<Heartbeat>>,
    /// One message per core or relay thread that ended (see [`LoopEnded`]).
    ended: crossbeam_channel::Receiver<LoopEnded>,
}

/// A core's or the relay's thread ended: normally while draining, or by an error or panic
/// of its event loop, which the binary turns into an exit (src/main.rs).
#[derive(Debug, Clone)]
pub struct LoopEnded {
    /// `core 1`, `relay`.
    pub name: String,
    /// `returned`, `failed: <error>`, `panicked`.
    pub how: String,
}

/// Lives on a core's or the relay's thread; reports how the thread ended when dropped, which
/// happens however it ends, unwinding from a panic included.
struct EndGuard {
    name: String,
    how: Option<String>,
    tx: crossbeam_channel::Sender<LoopEnded>,
}

impl EndGuard {
    fn new(name: String, tx: &crossbeam_channel::Sender<LoopEnded>) -> EndGuard {
        EndGuard {
            name,
            how: None,
            tx: tx.clone(),
        }
    }

    fn finished<T, E: std::fmt::Display>(mut self, result: &Result<T, E>) {
        self.how = Some(match result {
            Ok(_) => "returned".into(),
            Err(e) => format!("failed: {e}"),
        });
    }
}

impl Drop for EndGuard {
    fn drop(&mut self) {
        let how = self.how.take().unwrap_or_else(|| "panicked".into());
        let _ = self.tx.send(LoopEnded {
            name: std::mem::take(&mut self.name),
            how,
        });
    }
}

/// Fail early, with a message an operator can act on, when io_uring cannot be used at all.
pub fn check_io_uring() -> Result<(), GatewayError> {
    match io_uring::IoUring::new(2) {
        Ok(_) => Ok(()),
        Err(e) => match e.raw_os_error() {
            Some(libc::EPERM) | Some(libc::ENOSYS) | Some(libc::EACCES) => {
                Err(GatewayError::IoUringUnavailable(e))
            }
            _ => Err(GatewayError::Setup(e)),
        },
    }
}

/// The configured memory budget, or half of what the process may use; logged, since it
/// decides when new connections start getting 503.
fn resolve_memory_budget(config: &Config) -> u64 {
    let budget = config
        .memory_budget_bytes
        .unwrap_or_else(ops::memory::default_budget);
    let how = if config.memory_budget_bytes.is_some() {
        "memory_budget_bytes"
    } else {
        "half of the memory available"
    };
    tracing::info!(
        "memory budget for connection buffers: {budget} bytes ({} MiB, {how}); beyond it new \
         connections get 503",
        budget >> 20
    );
    budget
}

/// Each upstream's TLS client configuration (for its `tls://` backends), indexed like the
/// table's upstreams, and the client certificates among them.
type BackendTls = (
    Vec<Option<Arc<rustls::ClientConfig>>>,
    Vec<crate::tls::Loaded>,
);

fn backend_tls(routes: &RouteTable) -> Result<BackendTls, GatewayError> {
    let (mut configs, mut certs) = (Vec::new(), Vec::new());
    for spec in routes.upstreams() {
        let Some(files) = &spec.tls else {
            configs.push(None);
            continue;
        };
        let client = crate::tls::client::client_config(files)?;
        certs.extend(client.client_cert);
        configs.push(Some(client.config));
    }
    crate::tls::expiry::log_standing(&certs);
    Ok((configs, certs))
}

impl Gateway {
    /// Bind every core's listener, start the cores and the relay, and return once every core
    /// is serving (or the first error any of them hit).
    pub fn start(config: Config) -> Result<Gateway, GatewayError> {
        check_io_uring()?;
        let routes = Arc::new(RouteTable::from_config(&config).map_err(GatewayError::Routes)?);
        let (client_tls, client_certs) = backend_tls(&routes)?;
        let config = Arc::new(config);
        let count = config.worker_count();
        let listeners =
            edge::listener::bind_all(config.listen, count, config.backlog).map_err(|source| {
                GatewayError::Bind {
                    addr: config.listen,
                    source,
                }
            })?;
        let local_addr = listeners[0].local_addr().map_err(GatewayError::Setup)?;
        // TLS only when configured: without it no core holds any TLS state.
        let (tls, mut tls_listeners): (_, Vec<Option<std::net::TcpListener>>) =
            match config.listen_tls {
                Some(addr) => {
                    let tls = TlsServer::new(&config.tls.certificates)?;
                    for l in tls.certificates().loaded() {
                        tracing::info!(
                            file = %l.cert_path.display(),
                            names = ?l.names,
                            "TLS certificate loaded"
                        );
                    }
                    crate::tls::expiry::log_standing(tls.certificates().loaded());
                    let bound = edge::listener::bind_all(addr, count, config.backlog)
                        .map_err(|source| GatewayError::Bind { addr, source })?;
                    (Some(tls), bound.into_iter().map(Some).collect())
                }
                None => (None, Vec::new()),
            };
        let local_tls_addr = match tls_listeners.first() {
            Some(Some(l)) => Some(l.local_addr().map_err(GatewayError::Setup)?),
            _ => None,
        };
        let shared = Arc::new(Shared::default());
        shared
            .memory_budget
            .store(resolve_memory_budget(&config), Ordering::Relaxed);
        let cpus = core_affinity::get_core_ids().unwrap_or_default();

        let (relay_tx, relay_rx) =
            relay::channel(config.relay_queue).map_err(GatewayError::Setup)?;
        let mut inbox_txs = Vec::with_capacity(count);
        let mut wakers = Vec::with_capacity(count);
        let (ready_tx, ready_rx) = crossbeam_channel::bounded(count);
        let (ended_tx, ended) = crossbeam_channel::unbounded();
        let mut workers = Vec::with_capacity(count);
        let mut stats = Vec::with_capacity(count);
        for (index, listener) in listeners.into_iter().enumerate() {
            let (inbox_tx, inbox_rx) = edge::inbox::channel(shared.relay.clone());
            let waker = Arc::new(edge::inbox::Waker::new().map_err(GatewayError::Setup)?);
            inbox_txs.push(inbox_tx);
            wakers.push(waker.clone());
            let core_stats = Arc::new(CoreStats::default());
            stats.push(core_stats.clone());
            let setup = edge::worker::WorkerSetup {
                index,
                workers: count,
                stats: core_stats,
                routes: routes.clone(),
                cpu: (!cpus.is_empty()).then(|| cpus[index % cpus.len()]),
                listener,
                tls_listener: tls_listeners.get_mut(index).and_then(Option::take),
                tls: tls.as_ref().map(TlsServer::config),
                config: config.clone(),
                relay: (config.upstream != Upstream::LocalEcho).then(|| relay_tx.clone()),
                inbox: inbox_rx,
                waker,
                shared: shared.clone(),
            };
            let ready = ready_tx.clone();
            let guard = EndGuard::new(format!("core {index}"), &ended_tx);
            let handle = std::thread::Builder::new()
                .name(format!("ringway-core-{index}"))
                .spawn(move || match edge::worker::Worker::new(setup) {
                    Ok(w) => {
                        let _ = ready.send(Ok(()));
                        let result = w.run();
                        guard.finished(&result);
                        result
                    }
                    Err(e) => {
                        let _ = ready.send(Err(io::Error::new(e.kind(), e.to_string())));
                        let result = Err(e);
                        guard.finished(&result);
                        result
                    }
                })
                .map_err(GatewayError::Setup)?;
            workers.push(handle);
        }
        drop(relay_tx);
        let links = edge::inbox::CoreLinks::new(inbox_txs, wakers.clone(), shared.relay.clone());
        let router = relay::router::Router::new(
            &routes,
            links,
            relay::wire::DEFAULT_MAX_FRAME,
            shared.relay.clone(),
            &client_tls,
        );
        let router = match relay::cluster::start(&config, &relay_rx, shared.relay.clone())
            .map_err(GatewayError::Setup)?
        {
            Some(cluster) => router.with_cluster(cluster),
            None => router,
        };
        let upstream_links = router.links();
        // With `local-echo` no core holds a relay sender, so the relay ends at once: then it
        // is neither watched nor reported.
        let relay_used = config.upstream != Upstream::LocalEcho;
        let relay_heartbeat = relay_used.then(|| router.heartbeat());
        let relay_guard = relay_used.then(|| EndGuard::new("relay".into(), &ended_tx));
        drop(ended_tx);
        let relay = std::thread::Builder::new()
            .name("ringway-relay".into())
            .spawn(move || {
                router.run(relay_rx);
                if let Some(g) = relay_guard {
                    g.finished(&Ok::<(), &str>(()));
                }
            })
            .map_err(GatewayError::Setup)?;

        let gateway = Gateway {
            local_addr,
            local_tls_addr,
            tls,
            client_certs: Arc::new(client_certs),
            config: config.clone(),
            routes: routes.clone(),
            upstream_links,
            workers,
            stats,
            relay: Some(relay),
            shared,
            wakers,
            relay_heartbeat,
            ended,
        };
        for core in 0..count {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    gateway.begin_shutdown();
                    let _ = gateway.join();
                    let einval = e.raw_os_error() == Some(libc::EINVAL)
                        || e.kind() == io::ErrorKind::InvalidInput;
                    return Err(if einval {
                        GatewayError::KernelTooOld(e)
                    } else {
                        GatewayError::Worker { core, source: e }
                    });
                }
                Err(_) => return Err(GatewayError::WorkerPanicked(core)),
            }
        }
        Ok(gateway)
    }

    /// Apply a new configuration to every core without closing any connection: limits,
    /// timeouts and routes take effect from the next message or event. The listen address,
    /// worker count and upstream set are fixed at start; a change to them is refused.
    pub fn reload(&self, config: Config) -> Result<(), GatewayError> {
        let routes = RouteTable::from_config(&config)?;
        let current = self.config.clone();
        if config.listen != current.listen
            || config.listen_tls != current.listen_tls
            || config.worker_count() != current.worker_count()
            || config.backlog != current.backlog
            || config.read_buffers != current.read_buffers
            || config.read_buffer_bytes != current.read_buffer_bytes
            || config.relay_queue != current.relay_queue
            || config.upstream != current.upstream
            || config.cluster != current.cluster
            || routes.upstreams() != self.routes.upstreams()
        {
            return Err(GatewayError::NeedsRestart);
        }
        // Certificates first: a bad file keeps the running certificates and configuration.
        if let Some(tls) = &self.tls {
            tls.reload(&config.tls.certificates)?;
        }
        // The backends' client certificates stay those read at start; their expiry is told
        // again with the served ones'.
        crate::tls::expiry::log_standing(self.client_certs.iter());
        self.shared
            .memory_budget
            .store(resolve_memory_budget(&config), Ordering::Relaxed);
        *self
            .shared
            .reloaded
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some((Arc::new(config), Arc::new(routes)));
        self.shared
            .reload_generation
            .fetch_add(1, Ordering::Release);
        for w in &self.wakers {
            w.wake();
        }
        Ok(())
    }

    /// (name, notAfter) of every certificate in force, read at scrape time: the wss://
    /// listener's (as last reloaded) and the client certificates shown to backends.
    pub fn certificate_expiry(&self) -> Arc<dyn Fn() -> Vec<(String, i64)> + Send + Sync> {
        let tls = self.tls.clone();
        let clients = self.client_certs.clone();
        Arc::new(move || {
            let current = tls.as_ref().map(TlsServer::certificates);
            let served = current.iter().flat_map(|c| c.loaded());
            crate::tls::expiry::expiry_rows(served.chain(clients.iter()))
        })
    }

    /// Every backend link, for metrics and readiness.
    pub fn upstream_links(&self) -> &[UpstreamLink] {
        &self.upstream_links
    }

    /// Connections open or in their handshake across all cores (what max_connections counts).
    pub fn open_connections(&self) -> u64 {
        self.shared.open.load(Ordering::Relaxed) as u64
    }

    /// The shared state, for probes that outlive a borrow of the gateway.
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The wss:// listener's address, when TLS is configured.
    pub fn local_tls_addr(&self) -> Option<SocketAddr> {
        self.local_tls_addr
    }

    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    /// Stop accepting, send 1001 to every client, and let the cores finish within the grace
    /// period. Returns at once; [`Gateway::join`] waits.
    pub fn begin_shutdown(&self) {
        self.shared.draining.store(true, Ordering::Release);
        for w in &self.wakers {
            w.wake();
        }
    }

    /// The relay loop's heartbeat; `None` when no relay serves (`local-echo`).
    pub fn relay_heartbeat(&self) -> Option<Arc<Heartbeat>> {
        self.relay_heartbeat.clone()
    }

    /// Reports every core or relay thread that ends. Outside a drain, any report means the
    /// gateway lost a loop: the binary logs it and exits non-zero.
    pub fn loop_endings(&self) -> crossbeam_channel::Receiver<LoopEnded> {
        self.ended.clone()
    }

    /// Ok while every core and the relay turned recently; otherwise which ones are stuck.
    pub fn liveness(&self) -> Result<(), String> {
        ops::health::liveness(&self.stats, self.relay_heartbeat.as_deref())
    }

    /// Every core's counters, for metrics and the exit summary.
    pub fn stats(&self) -> &[Arc<CoreStats>] {
        &self.stats
    }

    /// Wait for every core and the relay to finish. Returns the cores' counters.
    pub fn join(mut self) -> Result<Vec<Arc<CoreStats>>, GatewayError> {
        let mut first_error = None;
        for (core, handle) in std::mem::take(&mut self.workers).into_iter().enumerate() {
            match handle.join() {
                Ok(Ok(())) => {}
                Ok(Err(source)) => {
                    first_error.get_or_insert(GatewayError::Worker { core, source });
                }
                Err(_) => {
                    first_error.get_or_insert(GatewayError::WorkerPanicked(core));
                }
            }
        }
        // Every core dropped its relay sender, so the relay's receive loop ends.
        if let Some(relay) = self.relay.take() {
            let _ = relay.join();
        }
        let stats = std::mem::take(&mut self.stats);
        first_error.map_or(Ok(stats), Err)
    }
}
