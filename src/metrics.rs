//! The Prometheus `/metrics` endpoint, on its own HTTP listener (`server.metrics-listen`).

use axum::Router;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{Encoder, TextEncoder};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub(crate) async fn serve(listener: TcpListener, shutdown: CancellationToken) {
    let app = Router::new().route("/metrics", get(metrics));
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
    if let Err(error) = served {
        tracing::error!(%error, "metrics listener failed");
    }
}

async fn metrics() -> impl IntoResponse {
    let encoder = TextEncoder::new();
    let mut body = Vec::new();
    if let Err(error) = encoder.encode(&prometheus::gather(), &mut body) {
        tracing::error!(%error, "encoding metrics failed");
    }
    ([(CONTENT_TYPE, encoder.format_type().to_owned())], body)
}

/// The server's own metrics (prefix `eventjournal_`, plus Akka's `akka_event_persistence_time_ns`).
pub(crate) mod server {
    use std::sync::LazyLock;

    use prometheus::{
        Histogram, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, exponential_buckets,
        register_histogram, register_int_counter, register_int_counter_vec, register_int_gauge,
        register_int_gauge_vec,
    };

    pub(crate) static EVENTS_WRITTEN: LazyLock<IntCounter> = LazyLock::new(|| {
        register_int_counter!(
            "eventjournal_events_written_total",
            "Events written (acknowledged)"
        )
        .expect("metric registered once")
    });

    pub(crate) static EVENT_BYTES_WRITTEN: LazyLock<IntCounter> = LazyLock::new(|| {
        register_int_counter!(
            "eventjournal_event_bytes_written_total",
            "Payload and metadata bytes of the events written"
        )
        .expect("metric registered once")
    });

    /// `source`: `replay` (the write side's recovery) or `query` (the read journal).
    pub(crate) static EVENTS_READ: LazyLock<IntCounterVec> = LazyLock::new(|| {
        register_int_counter_vec!(
            "eventjournal_events_read_total",
            "Events sent to clients",
            &["source"]
        )
        .expect("metric registered once")
    });

    pub(crate) static EVENT_BYTES_READ: LazyLock<IntCounterVec> = LazyLock::new(|| {
        register_int_counter_vec!(
            "eventjournal_event_bytes_read_total",
            "Payload and metadata bytes of the events sent to clients",
            &["source"]
        )
        .expect("metric registered once")
    });

    /// Akka's name: from receiving a write to its durable (write-concern) acknowledgement.
    pub(crate) static PERSISTENCE_TIME: LazyLock<Histogram> = LazyLock::new(|| {
        register_histogram!(
            "akka_event_persistence_time_ns",
            "Nanoseconds from receiving an atomic write to its durable acknowledgement",
            exponential_buckets(100_000.0, 2.0, 18).expect("valid buckets")
        )
        .expect("metric registered once")
    });

    pub(crate) static LIVE_SUBSCRIBERS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
        register_int_gauge_vec!(
            "eventjournal_live_subscribers",
            "Open live read-journal queries",
            &["query"]
        )
        .expect("metric registered once")
    });

    /// Bytes of request messages held now (see `request_memory`).
    pub(crate) static REQUEST_MEMORY: LazyLock<IntGauge> = LazyLock::new(|| {
        register_int_gauge!(
            "eventjournal_request_memory_bytes",
            "Bytes of request messages the server holds now (bounded by server.max-request-memory)"
        )
        .expect("metric registered once")
    });

    pub(crate) static REQUEST_MEMORY_REFUSALS: LazyLock<IntCounter> = LazyLock::new(|| {
        register_int_counter!(
            "eventjournal_request_memory_refusals_total",
            "Request messages refused with UNAVAILABLE because server.max-request-memory was held"
        )
        .expect("metric registered once")
    });

    pub(crate) static REQUEST_MESSAGE_STALLS: LazyLock<IntCounter> = LazyLock::new(|| {
        register_int_counter!(
            "eventjournal_request_message_stalls_total",
            "Calls failed with UNAVAILABLE because a request message stopped arriving for \
             server.message-idle-timeout"
        )
        .expect("metric registered once")
    });

    pub(crate) fn event_bytes(event: &model::PersistentEvent) -> u64 {
        (event.payload.data.len()
            + event
                .metadata
                .as_ref()
                .map_or(0, |metadata| metadata.data.len())) as u64
    }

    pub(crate) fn count_read(source: &str, event: &model::PersistentEvent) {
        EVENTS_READ.with_label_values(&[source]).inc();
        EVENT_BYTES_READ
            .with_label_values(&[source])
            .inc_by(event_bytes(event));
    }

    /// Counts one open live query until dropped.
    pub(crate) struct Subscriber(&'static str);

    impl Subscriber {
        pub(crate) fn open(query: &'static str) -> Self {
            LIVE_SUBSCRIBERS.with_label_values(&[query]).inc();
            Self(query)
        }
    }

    impl Drop for Subscriber {
        fn drop(&mut self) {
            LIVE_SUBSCRIBERS.with_label_values(&[self.0]).dec();
        }
    }
}

/// `eventjournal backup schedule`'s metrics (`kind`: full or incremental).
pub(crate) mod backup {
    use std::sync::LazyLock;

    use prometheus::{GaugeVec, IntCounterVec, register_gauge_vec, register_int_counter_vec};

    /// `outcome`: success or failure.
    pub(crate) static RUNS: LazyLock<IntCounterVec> = LazyLock::new(|| {
        register_int_counter_vec!(
            "eventjournal_backup_runs_total",
            "Scheduled backups run",
            &["kind", "outcome"]
        )
        .expect("metric registered once")
    });

    pub(crate) static MISSED: LazyLock<IntCounterVec> = LazyLock::new(|| {
        register_int_counter_vec!(
            "eventjournal_backup_missed_runs_total",
            "Scheduled backups not run because an earlier run or a stall of the process took past their time",
            &["kind"]
        )
        .expect("metric registered once")
    });

    pub(crate) static LAST_SUCCESS: LazyLock<GaugeVec> = LazyLock::new(|| {
        register_gauge_vec!(
            "eventjournal_backup_last_success_timestamp_seconds",
            "When the last scheduled backup of the kind completed (Unix time)",
            &["kind"]
        )
        .expect("metric registered once")
    });

    pub(crate) static LAST_DURATION: LazyLock<GaugeVec> = LazyLock::new(|| {
        register_gauge_vec!(
            "eventjournal_backup_last_duration_seconds",
            "How long the last scheduled backup of the kind took",
            &["kind"]
        )
        .expect("metric registered once")
    });
}
