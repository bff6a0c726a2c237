//! The edge runtime: one io_uring event loop per core, each with its own SO_REUSEPORT
//! listener and provided-buffer ring. It accepts, receives, drives the sans-IO protocol core,
//! hands messages to the relay, and sends replies that come back through the core's inbox.
//!
//! Data path: `listener` (accept) -> `worker` (recv into `buffers`) -> `crate::session`
//! (handshake, frames; `connection` holds its fd and ring state) -> relay channel -> `inbox`
//! -> `worker` (send).

mod connection;
mod fd;
pub(crate) mod inbox;
pub(crate) mod listener;
pub mod panic;
pub mod stats;
mod timer;
mod uring;
pub(crate) mod worker;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};

pub use stats::CoreStats;

use crate::config::Config;
use crate::relay;
use crate::route::RouteTable;

/// State every core reads; written rarely (drain flag) or with relaxed counters.
#[derive(Debug, Default)]
pub struct Shared {
    pub draining: AtomicBool,
    /// Connections open or in their handshake across all cores, for the connection limit:
    /// taken at accept, given back when the connection's slot is freed (or at once when it
    /// is refused at accept).
    pub open: AtomicUsize,
    /// A reloaded configuration, and its generation: cores compare the generation (one
    /// relaxed load per loop turn) and take the new one when it moved.
    pub reload_generation: AtomicU64,
    pub reloaded: Mutex<Option<(Arc<Config>, Arc<RouteTable>)>>,
    /// Bytes of connection state and buffers across all cores: each core adds its change
    /// once per loop turn, so the sum lags by at most one batch of events per core.
    pub buffer_bytes: AtomicU64,
    /// Beyond `buffer_bytes` of this, new connections get 503 (resolved at start and reload).
    pub memory_budget: AtomicU64,
    /// What the relay holds for peers (inboxes, link queues, stored opens, chat rooms);
    /// its `bytes` count toward the memory budget with `buffer_bytes`.
    pub relay: Arc<relay::RelayGauges>,
}
