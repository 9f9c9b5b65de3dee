//! Wiring: settings → MongoDB → stores → gRPC services → listener, and graceful shutdown.

use anyhow::Context;
use config::Settings;
use durable_state::DurableStateStore;
use journal::Journal;
use proto::v1::backup_service_server::BackupServiceServer;
use proto::v1::durable_state_store_server::DurableStateStoreServer;
use proto::v1::journal_server::JournalServer;
use proto::v1::read_journal_server::ReadJournalServer;
use proto::v1::snapshot_store_server::SnapshotStoreServer;
use query::ReadJournal;
use snapshot::SnapshotStore;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::grpc::backup::BackupService;
use crate::grpc::durable_state::DurableStateStoreService;
use crate::grpc::journal::JournalService;
use crate::grpc::read_journal::ReadJournalService;
use crate::grpc::snapshot::SnapshotStoreService;
use crate::linger::LingeringStream;
use crate::metrics;

/// Serves until `shutdown` is cancelled, then stops accepting calls and lets in-flight ones
/// finish for at most `server.shutdown-grace-period`.
pub async fn run(
    settings: Settings,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mongodb = &settings.mongodb;
    let database = crate::ops::connect(&settings).await?;

    if mongodb.create_indexes {
        crate::ops::indexes::create_missing(&database, &settings).await?;
    }
    // Every position this server writes is stamped here, and every query's horizon comes from
    // here (read-journal.horizon). It publishes until the last call is over, after shutdown.
    let publishing = CancellationToken::new();
    let watermarks = mongo::Watermarks::start(&database, &settings, publishing.clone())
        .await
        .context("joining the servers that publish read-journal watermarks")?;
    let journal = Journal::new(&database, &settings, watermarks.clone());
    let snapshots = SnapshotStore::new(&database, &settings);
    let durable_state = DurableStateStore::new(&database, &settings, watermarks.clone());
    // The read journal has a connection pool of its own (read-journal.max-pool-size), so
    // subscribers catching up can never take the connections writes need.
    let read_database = mongo::connect(&config::MongoSettings {
        max_pool_size: settings.read_journal.max_pool_size,
        min_pool_size: mongodb
            .min_pool_size
            .min(settings.read_journal.max_pool_size),
        ..mongodb.clone()
    })
    .await
    .context("invalid MongoDB connection settings")?;
    // Live queries end when the server shuts down, so graceful shutdown does not wait on them.
    let queries = Arc::new(ReadJournal::new(
        &read_database,
        &settings,
        watermarks.clone(),
        shutdown.clone(),
    ));

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    crate::health::set_all(&health_reporter, tonic_health::ServingStatus::Serving).await;
    tokio::spawn(crate::health::monitor(
        database.clone(),
        health_reporter,
        settings.server.health_check_interval,
        shutdown.clone(),
    ));
    // Reflection in both versions: grpcurl before 1.8.8, Postman and others still ask v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .context("building the reflection service")?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .context("building the reflection service")?;

    let max_message_size = settings.server.max_message_size.as_u64() as usize;
    // The connection's window several times a stream's: a stream that stops reading ahead
    // holds its own window, not its connection's (`server.http2-connection-window`).
    let mut builder = Server::builder()
        .initial_stream_window_size(settings.server.http2_stream_window.as_u64() as u32)
        .initial_connection_window_size(settings.server.http2_connection_window.as_u64() as u32);
    if !settings.server.keep_alive_interval.is_zero() {
        builder = builder
            .http2_keepalive_interval(Some(settings.server.keep_alive_interval))
            .http2_keepalive_timeout(Some(settings.server.keep_alive_timeout));
    }
    if let Some(tls) = tls_config(&settings.server.tls)? {
        builder = builder
            .tls_config(tls)
            .context("configuring TLS (server.tls)")?;
    }
    let router = builder
        .layer(crate::rpc_metrics::RpcMetricsLayer)
        .layer(crate::auth::AuthLayer::new(&settings.auth))
        .layer(crate::request_memory::RequestMemoryLayer::new(
            &settings.server,
        ))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            JournalServer::new(JournalService::new(journal, &settings))
                .max_decoding_message_size(max_message_size)
                .max_encoding_message_size(max_message_size),
        )
        .add_service(
            SnapshotStoreServer::new(SnapshotStoreService::new(snapshots))
                .max_decoding_message_size(max_message_size)
                .max_encoding_message_size(max_message_size),
        )
        .add_service(
            DurableStateStoreServer::new(DurableStateStoreService::new(durable_state))
                .max_decoding_message_size(max_message_size)
                .max_encoding_message_size(max_message_size),
        )
        .add_service(
            ReadJournalServer::new(ReadJournalService::new(queries))
                .max_encoding_message_size(max_message_size),
        )
        .add_service(BackupServiceServer::new(BackupService::new(
            &settings, &database,
        )));

    if let Some(address) = settings.server.metrics_listen {
        let metrics = TcpListener::bind(address)
            .await
            .with_context(|| format!("cannot listen on {address} (server.metrics-listen)"))?;
        tracing::info!(%address, "serving Prometheus metrics on /metrics");
        tokio::spawn(metrics::serve(metrics, shutdown.clone()));
    }

    let address = listener
        .local_addr()
        .context("reading the listen address")?;
    tracing::info!(%address, database = %mongodb.database, "eventjournal serving gRPC");
    // Responses go out at once: with Nagle's algorithm on, a response written in more than one
    // segment waits for the client's delayed ACK (40 ms). tonic sets TCP_NODELAY only on
    // connections it accepts itself, not on an incoming stream like this one.
    // Connections the server ends linger until their client has read everything (see linger).
    let lingering = TaskTracker::new();
    let incoming = TcpListenerStream::new(listener).map({
        let lingering = lingering.clone();
        move |connection| {
            connection.and_then(|connection| {
                connection.set_nodelay(true)?;
                Ok(LingeringStream::new(connection, lingering.clone()))
            })
        }
    });
    let serve = router.serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned());
    let grace_period = settings.server.shutdown_grace_period;
    let grace_over = async {
        shutdown.cancelled().await;
        tracing::info!(grace_period = %humantime_display(grace_period), "shutting down: finishing in-flight calls");
        tokio::time::sleep(grace_period).await;
    };
    tokio::pin!(grace_over);
    tokio::select! {
        served = serve => {
            served.context("gRPC server failed")?;
            // The last responses reach their clients: wait for the lingering connections.
            lingering.close();
            tokio::select! {
                () = lingering.wait() => {}
                () = &mut grace_over => tracing::warn!("shutdown grace period over; closing connections whose clients are still reading"),
            }
        }
        () = &mut grace_over => tracing::warn!("shutdown grace period over; exiting with calls still in flight"),
    }
    // No write of this server is in flight any more (or the grace period is over, and the
    // others retire it when its lease runs out): it stops holding queries back.
    publishing.cancel();
    watermarks.leave().await;
    tracing::info!("eventjournal stopped");
    Ok(())
}

/// The listener's TLS (rustls), or none when `server.tls.enabled` is off.
fn tls_config(tls: &config::ServerTlsSettings) -> anyhow::Result<Option<ServerTlsConfig>> {
    if !tls.enabled {
        return Ok(None);
    }
    let read = |key: &str, file: &Option<std::path::PathBuf>| -> anyhow::Result<Vec<u8>> {
        let file = file
            .as_ref()
            .with_context(|| format!("server.tls.enabled needs {key}"))?;
        std::fs::read(file).with_context(|| format!("reading {key} {}", file.display()))
    };
    let identity = Identity::from_pem(
        read("server.tls.certificate-file", &tls.certificate_file)?,
        read("server.tls.key-file", &tls.key_file)?,
    );
    let mut config = ServerTlsConfig::new().identity(identity);
    if tls.client_ca_file.is_some() {
        let ca = read("server.tls.client-ca-file", &tls.client_ca_file)?;
        config = config
            .client_ca_root(Certificate::from_pem(ca))
            .client_auth_optional(false);
    }
    Ok(Some(config))
}

fn humantime_display(duration: std::time::Duration) -> String {
    humantime::format_duration(duration).to_string()
}
