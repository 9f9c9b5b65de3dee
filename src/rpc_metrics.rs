//! Per-RPC Prometheus metrics, as a tower layer around every gRPC service: calls by service,
//! method and final status code, and their duration (for a streaming call, until its stream
//! ends). The final status of a gRPC call is in the response headers when the call fails at
//! once, and otherwise in the trailers at the end of the body, so the body is watched.

use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;
use http_body::{Body, Frame};
use prometheus::{
    HistogramVec, IntCounterVec, exponential_buckets, register_histogram_vec,
    register_int_counter_vec,
};

pub static RPC_CALLS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "eventjournal_grpc_calls_total",
        "gRPC calls by service, method and final status code (CANCELLED: the client left)",
        &["service", "method", "code"]
    )
    .expect("metric registered once")
});

pub static RPC_DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "eventjournal_grpc_call_duration_seconds",
        "Duration of gRPC calls until their final status (streams: until they end)",
        &["service", "method"],
        exponential_buckets(0.0005, 2.5, 14).expect("valid buckets")
    )
    .expect("metric registered once")
});

/// One call being measured; records once, when its final status is known.
struct Call {
    service: String,
    method: String,
    started: Instant,
    recorded: bool,
}

impl Call {
    fn new(path: &str) -> Self {
        let (service, method) = crate::grpc::service_and_method(path);
        Self {
            service: service.to_owned(),
            method: method.to_owned(),
            started: Instant::now(),
            recorded: false,
        }
    }

    fn record(&mut self, code: tonic::Code) {
        if self.recorded {
            return;
        }
        self.recorded = true;
        let code = format!("{code:?}");
        RPC_CALLS
            .with_label_values(&[&self.service, &self.method, &code])
            .inc();
        RPC_DURATION
            .with_label_values(&[&self.service, &self.method])
            .observe(self.started.elapsed().as_secs_f64());
    }
}

impl Drop for Call {
    /// The body was dropped before its trailers: the client went away.
    fn drop(&mut self) {
        self.record(tonic::Code::Cancelled);
    }
}

fn status_in(headers: &http::HeaderMap) -> Option<tonic::Code> {
    let value = headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .parse::<i32>()
        .ok()?;
    Some(tonic::Code::from_i32(value))
}

#[derive(Clone, Default)]
pub struct RpcMetricsLayer;

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetrics { inner }
    }
}

#[derive(Clone)]
pub struct RpcMetrics<S> {
    inner: S,
}

impl<S, B, R> tower::Service<http::Request<B>> for RpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Body + Unpin + Send + 'static,
{
    type Response = http::Response<Measured<R>>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let mut call = Call::new(request.uri().path());
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            if let Some(code) = status_in(response.headers()) {
                call.record(code);
            }
            Ok(response.map(|body| Measured { body, call }))
        })
    }
}

/// A response body that records the call's status from its trailers.
pub struct Measured<B> {
    body: B,
    call: Call,
}

impl<B: Body + Unpin> Body for Measured<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(context);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(status_in) {
                    self.call.record(code);
                }
            }
            Poll::Ready(Some(Err(_))) => self.call.record(tonic::Code::Internal),
            Poll::Ready(None) => self.call.record(tonic::Code::Ok),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
