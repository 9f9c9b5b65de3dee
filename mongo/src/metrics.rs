//! MongoDB metrics (Prometheus default registry, prefix `eventjournal_mongodb_`).

use std::sync::LazyLock;
use std::sync::atomic::{AtomicBool, Ordering};

use mongodb::event::EventHandler;
use mongodb::event::sdam::SdamEvent;
use prometheus::{
    IntCounter, IntCounterVec, IntGauge, register_int_counter, register_int_counter_vec,
    register_int_gauge,
};

/// Retried attempts, by operation and error code (`network` for errors without a code).
pub static RETRIES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "eventjournal_mongodb_retries_total",
        "MongoDB operations retried, by operation and error code",
        &["operation", "code"]
    )
    .expect("metric registered once")
});

/// Elections the server's MongoDB client learned of: the replica set's election id changed.
pub static ELECTIONS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "eventjournal_mongodb_elections_total",
        "Primary elections seen by the MongoDB client (the replica set's electionId changed)"
    )
    .expect("metric registered once")
});

/// 1 while the client knows a primary it can write to, 0 while writes wait for an election.
pub static WRITABLE_PRIMARY: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "eventjournal_mongodb_writable_primary",
        "1 while the MongoDB client knows a writable primary, 0 during an election or without a majority"
    )
    .expect("metric registered once")
});

/// Servers whose watermarks bound this server's read horizon, itself included (watermark mode).
pub static WATERMARK_SERVERS: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "eventjournal_mongodb_watermark_servers",
        "Servers whose published watermarks bound this server's read horizon, itself included"
    )
    .expect("metric registered once")
});

/// Servers this one retired because their watermark lease ran out.
pub static WATERMARK_RETIREMENTS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "eventjournal_mongodb_watermark_retirements_total",
        "Servers this one retired because their watermark lease ran out (they stopped holding queries back)"
    )
    .expect("metric registered once")
});

/// Times this server found itself retired (its lease ran out) and joined again.
pub static WATERMARK_REJOINS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "eventjournal_mongodb_watermark_rejoins_total",
        "Times this server found another had retired it (its watermark lease ran out) and joined again"
    )
    .expect("metric registered once")
});

/// The client had a writable primary and lost it (so finding one again is worth a log line).
static LOST_PRIMARY: AtomicBool = AtomicBool::new(false);

/// The driver's topology events, turned into [`ELECTIONS`] and [`WRITABLE_PRIMARY`], with a log
/// line for each election and each loss of the primary.
pub(crate) fn topology_watcher() -> EventHandler<SdamEvent> {
    // Exported from the start, at 0.
    LazyLock::force(&ELECTIONS);
    LazyLock::force(&WRITABLE_PRIMARY);
    EventHandler::callback(|event: SdamEvent| {
        let SdamEvent::TopologyDescriptionChanged(change) = event else {
            return;
        };
        let (before, after) = (&change.previous_description, &change.new_description);
        let writable = after.has_writable_server();
        if writable != before.has_writable_server() {
            WRITABLE_PRIMARY.set(i64::from(writable));
            // The first discovery at start-up is not news.
            if writable && LOST_PRIMARY.swap(false, Ordering::Relaxed) {
                tracing::info!("mongodb: a writable primary is known again");
            } else if !writable {
                LOST_PRIMARY.store(true, Ordering::Relaxed);
                tracing::warn!("mongodb: no writable primary; writes wait for an election");
            }
        }
        let (old, new) = (before.max_election_id(), after.max_election_id());
        if old.is_some() && new.is_some() && old != new {
            ELECTIONS.inc();
            tracing::info!(election_id = %new.unwrap_or_default(), "mongodb: a new primary was elected");
        }
    })
}
