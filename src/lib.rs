//! ringway: a WebSocket edge gateway for Linux.
//!
//! The data path, in module order: `edge` accepts connections and receives bytes on per-core
//! io_uring loops; `protocol` (sans-IO) turns those bytes into handshakes, frames and messages;
//! `relay` carries messages to upstreams and brings replies back to the owning core.

pub mod admission;
pub mod config;
pub mod edge;
pub mod ids;
pub mod ops;
pub mod policy;
pub mod protocol;
pub mod relay;
pub mod route;
pub mod session;
