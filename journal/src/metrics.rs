//! Write-path metrics (Prometheus default registry, prefix `eventjournal_write_`).

use std::sync::LazyLock;

use prometheus::{
    Histogram, IntCounter, IntGauge, register_histogram, register_int_counter, register_int_gauge,
};

/// Events per MongoDB insert: how much the group commit combines.
pub static BATCH_EVENTS: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "eventjournal_write_batch_events",
        "Events per MongoDB insert of the group commit",
        vec![
            1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0
        ]
    )
    .expect("metric registered once")
});

pub static BATCHES_IN_FLIGHT: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "eventjournal_write_batches_in_flight",
        "Group-commit batches sent to MongoDB and not yet answered"
    )
    .expect("metric registered once")
});

pub static QUEUED_EVENTS: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "eventjournal_write_queued_events",
        "Events received and waiting for a group-commit batch"
    )
    .expect("metric registered once")
});

/// Reads of a persistence id's highest sequence number before a write: what the server did
/// not know (first write of an id here, knowledge expired, or a write not continuing it).
pub static SEQUENCE_NR_READS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "eventjournal_write_sequence_nr_reads_total",
        "Highest sequence numbers read before writing, because this server did not know them"
    )
    .expect("metric registered once")
});

/// Writes not sent to MongoDB, or not sent again, because their caller had gone (cancelled
/// the call, passed its deadline, or closed its stream) while they waited for a batch, or
/// before their batch inserted them or sent them again.
pub static ABANDONED_WRITES: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "eventjournal_write_abandoned_total",
        "Writes not sent to MongoDB (or not sent again) because their caller had gone"
    )
    .expect("metric registered once")
});
