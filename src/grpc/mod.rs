//! gRPC handlers, one module per service.

pub(crate) mod durable_state;
pub(crate) mod journal;
pub(crate) mod read_journal;
pub(crate) mod snapshot;

/// Messages buffered per server-streaming call: a slow reader is back-pressured through gRPC
/// flow control, and at most this many messages wait in memory for it.
pub(crate) const STREAM_BUFFER: usize = 16;
