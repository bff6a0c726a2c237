//! The sans-IO protocol core: RFC 6455 over byte slices, with no sockets, threads or clocks.
//!
//! The edge runtime feeds it the bytes the kernel put in its buffers; it answers with
//! handshake outcomes, decoded (unmasked in place) frames and whole messages.

pub mod close;
pub mod deflate;
pub mod error;
pub mod frame;
pub mod handshake;
pub mod mask;
pub mod message;
pub mod path;

pub use error::ProtocolError;
