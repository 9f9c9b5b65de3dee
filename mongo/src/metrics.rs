//! MongoDB metrics (Prometheus default registry, prefix `eventjournal_mongodb_`).

use std::sync::LazyLock;

use prometheus::{IntCounterVec, register_int_counter_vec};

/// Retried attempts, by operation and error code (`network` for errors without a code).
pub static RETRIES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "eventjournal_mongodb_retries_total",
        "MongoDB operations retried, by operation and error code",
        &["operation", "code"]
    )
    .expect("metric registered once")
});
