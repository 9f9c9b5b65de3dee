//! `grpc.health.v1`: SERVING while MongoDB answers a ping, NOT_SERVING while it does not, for the
//! whole server ("") and each eventjournal service. Checked every `server.health-check-interval`.

use std::time::Duration;

use mongodb::Database;
use proto::v1::durable_state_store_server::DurableStateStoreServer;
use proto::v1::journal_server::JournalServer;
use proto::v1::read_journal_server::ReadJournalServer;
use proto::v1::snapshot_store_server::SnapshotStoreServer;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::grpc::durable_state::DurableStateStoreService;
use crate::grpc::journal::JournalService;
use crate::grpc::read_journal::ReadJournalService;
use crate::grpc::snapshot::SnapshotStoreService;

/// The names health reports on: the whole server, then each service.
const SERVICES: [&str; 5] = [
    "",
    <JournalServer<JournalService> as NamedService>::NAME,
    <SnapshotStoreServer<SnapshotStoreService> as NamedService>::NAME,
    <DurableStateStoreServer<DurableStateStoreService> as NamedService>::NAME,
    <ReadJournalServer<ReadJournalService> as NamedService>::NAME,
];

pub(crate) async fn set_all(reporter: &HealthReporter, status: ServingStatus) {
    for service in SERVICES {
        reporter.set_service_status(service, status).await;
    }
}

/// Pings MongoDB every `interval` until `shutdown`; a ping slower than `interval` (at least
/// one second) counts as a failure. Logs each change once.
pub(crate) async fn monitor(
    database: Database,
    reporter: HealthReporter,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut serving = true;
    let patience = interval.max(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => {
                set_all(&reporter, ServingStatus::NotServing).await;
                return;
            }
            () = tokio::time::sleep(interval) => {}
        }
        let reachable = matches!(
            tokio::time::timeout(patience, mongo::ping(&database)).await,
            Ok(Ok(()))
        );
        if reachable != serving {
            serving = reachable;
            if serving {
                tracing::info!("mongodb reachable again; health SERVING");
                set_all(&reporter, ServingStatus::Serving).await;
            } else {
                tracing::warn!("mongodb unreachable; health NOT_SERVING");
                set_all(&reporter, ServingStatus::NotServing).await;
            }
        }
    }
}
