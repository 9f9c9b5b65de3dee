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
