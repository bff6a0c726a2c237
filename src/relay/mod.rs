//! The relay. STUB.
