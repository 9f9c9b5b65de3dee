//! Read-journal metrics (Prometheus default registry, prefix `eventjournal_read_journal_`).

use std::sync::LazyLock;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus::{HistogramVec, IntCounter, register_histogram_vec, register_int_counter};

/// Label value of the live mechanism.
pub const POLLING: &str = "polling";
pub const CHANGE_STREAM: &str = "change_stream";

/// How far behind now live queries run: for each event a shared poller or the shared change
/// stream hands to subscribers, `now - writtenAt`.
pub static DELIVERY_LAG: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "eventjournal_read_journal_delivery_lag_seconds",
        "Time from an event's writtenAt to its hand-over to live subscribers",
        &["mode"],
        vec![
            0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0
        ]
    )
    .expect("metric registered once")
});

pub static CHANGE_STREAM_RESTARTS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "eventjournal_read_journal_change_stream_restarts_total",
        "Restarts of the shared change stream after an error or invalidation"
    )
    .expect("metric registered once")
});

pub static CHANGE_STREAM_FALLBACKS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "eventjournal_read_journal_change_stream_fallbacks_total",
        "Subscribers that left the shared change stream (gap or lag) to resume on their own"
    )
    .expect("metric registered once")
});

pub static PRIVATE_CHANGE_STREAMS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "eventjournal_read_journal_private_change_streams_total",
        "Private change streams opened by subscribers the shared stream's recent changes did not \
         reach back for (an old offset, a long gap)"
    )
    .expect("metric registered once")
});

pub(crate) fn observe_lag(mode: &str, written_at_millis: i64) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as i64);
    DELIVERY_LAG
        .with_label_values(&[mode])
        .observe((now - written_at_millis).max(0) as f64 / 1000.0);
}
