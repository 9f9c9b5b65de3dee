//! gRPC handlers, one module per service.

pub(crate) mod backup;
pub(crate) mod durable_state;
pub(crate) mod journal;
pub(crate) mod read_journal;
pub(crate) mod snapshot;

/// Messages buffered per server-streaming call: a slow reader is back-pressured through gRPC
/// flow control, and at most this many messages wait in memory for it.
pub(crate) const STREAM_BUFFER: usize = 16;

/// `(service, method)` of a gRPC request path `/package.Service/Method` (empty parts when the
/// path has another shape).
pub(crate) fn service_and_method(path: &str) -> (&str, &str) {
    let path = path.trim_start_matches('/');
    path.split_once('/').unwrap_or((path, ""))
}
