//! Operations around the data path, never on it: telling systemd where we are (`notify`),
//! exposing the per-core counters and link states to Prometheus (`metrics`), and the small
//! admin HTTP server that serves them with health and readiness checks (`admin`), plus how
//! much memory the process may use, for the default memory budget (`memory`), and whether
//! every event loop still turns (`health`). All of it only reads what the cores and the relay
//! already count; nothing here slows a core down.

pub mod admin;
pub mod health;
pub mod memory;
pub mod metrics;
pub mod notify;
