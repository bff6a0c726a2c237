//! ringway: a WebSocket edge gateway for Linux.
//!
//! The data path, in module order: `edge` accepts connections and receives bytes on per-core
//! io_uring loops; `protocol` (sans-IO) turns those bytes into handshakes, frames and messages;
//! `route` picks a message's upstream; `relay` carries messages to upstreams (the embedded one,
//! or backends) and brings replies back to the owning core. `gateway` wires them together and
//! `ops` watches them through `telemetry`.
//!
//! Imports go one way (checked by scripts/check-imports.py): `ids`, `config`, `protocol`,
//! `policy`, `route`, `admission`, `tls`, `telemetry`, `in_flight`, `test_hooks` at the bottom; then
//! `edge` and `relay` (the edge may use the relay's channel types, the relay never names the
//! edge); then `ops`, which only reads; then `gateway`; then the binary.
//!
//! `unsafe` is denied crate-wide and allowed only in `protocol::mask` (SIMD unmasking) and
//! `edge::uring` (the ring and the memory its operations point at); `edge::fd` needs none.

#![deny(unsafe_code)]

pub mod admission;
pub mod config;
pub mod edge;
pub mod gateway;
pub mod ids;
pub mod in_flight;
pub mod ops;
pub mod policy;
pub mod protocol;
pub mod relay;
pub mod route;
pub mod session;
pub mod slab;
pub mod telemetry;
pub mod test_hooks;
pub mod tls;
