//! The edge runtime (io_uring). STUB.
