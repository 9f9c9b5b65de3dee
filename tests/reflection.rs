//! Clients such as grpcurl discover the API by reflection, in v1 or in the older v1alpha.

mod common;

use std::time::Duration;

use common::{TestServer, grpc_status, stalled_request};
use tonic_reflection::pb::{v1, v1alpha};

const REFLECTION_V1: &str = "grpc.reflection.v1.ServerReflection/ServerReflectionInfo";
const REFLECTION_V1ALPHA: &str = "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo";

const EXPECTED: [&str; 5] = [
    "eventjournal.v1.DurableStateStore",
    "eventjournal.v1.Journal",
    "eventjournal.v1.ReadJournal",
    "eventjournal.v1.SnapshotStore",
    "grpc.health.v1.Health",
];

/// The services a reflection client of the given version (`v1` or `v1alpha`) lists; the two
/// versions have the same shape but distinct generated types.
macro_rules! list_services {
    ($version:ident, $server:expr) => {{
        use $version::server_reflection_request::MessageRequest;
        use $version::server_reflection_response::MessageResponse;
        let channel = $server.channel().await;
        let mut client = $version::server_reflection_client::ServerReflectionClient::new(channel);
        let request = $version::ServerReflectionRequest {
            message_request: Some(MessageRequest::ListServices(String::new())),
            ..Default::default()
        };
        let mut responses = client
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        match responses.message().await.unwrap().unwrap().message_response {
            Some(MessageResponse::ListServicesResponse(list)) => list
                .service
                .into_iter()
                .map(|service| service.name)
                .collect::<Vec<String>>(),
            other => panic!("unexpected reflection response: {other:?}"),
        }
    }};
}

#[tokio::test]
async fn both_reflection_versions_list_every_service() {
    let server = TestServer::start("reflection").await;
    let v1_names = list_services!(v1, server);
    let v1alpha_names = list_services!(v1alpha, server);
    for expected in EXPECTED {
        assert!(
            v1_names.iter().any(|name| name == expected),
            "v1: {expected} missing from {v1_names:?}"
        );
        assert!(
            v1alpha_names.iter().any(|name| name == expected),
            "v1alpha: {expected} missing from {v1alpha_names:?}"
        );
    }
}

/// Waits up to `within` for the end of a raw call, which must be `UNAVAILABLE` (not OK) with a
/// message that says `reason`.
async fn unavailable_within(call: h2::client::ResponseFuture, within: Duration, reason: &str) {
    let (code, message) =
        tokio::time::timeout(within, async { grpc_status(call.await.unwrap()).await })
            .await
            .unwrap_or_else(|_| panic!("the call did not end within {within:?} ({reason})"));
    assert_eq!(code, "14", "UNAVAILABLE, not OK: {message}");
    assert!(message.contains(reason), "{message}");
}

/// Reflection's own handler ends its stream with OK on any failure of its input; a message the
/// server refuses for want of room, or one that stops arriving, must end the call with that
/// reason instead, as any other call does.
#[tokio::test]
async fn a_reflection_message_refused_or_stalled_ends_the_call_with_the_reason() {
    const IDLE: Duration = Duration::from_secs(3);
    let server = TestServer::start_with("reflection_budget", |settings| {
        settings.server.max_message_size = bytesize::ByteSize::mib(1);
        settings.server.max_request_memory = bytesize::ByteSize::kib(1536);
        settings.server.message_idle_timeout = IDLE;
    })
    .await;
    // A v1 reflection request stalls inside a 10 KiB message.
    let (stalled, _stalled_body, _stalled_connection) =
        stalled_request(&server, REFLECTION_V1, 10 << 10, 1 << 10).await;
    // A v1alpha one of 1.6 MiB (reflection takes up to 4 MiB) does not fit in the 1.5 MiB:
    // refused at once, with the reason.
    let (refused, _refused_body, _refused_connection) =
        stalled_request(&server, REFLECTION_V1ALPHA, 1600 << 10, 0).await;
    unavailable_within(
        refused,
        IDLE / 2,
        "server.max-request-memory is 1.5 MiB: no room",
    )
    .await;
    // The stalled reflection request ends after the idle timeout, naming it.
    unavailable_within(stalled, IDLE * 5, "server.message-idle-timeout").await;
    // Reflection itself still answers.
    let names = list_services!(v1, server);
    assert!(
        names.iter().any(|name| name == "eventjournal.v1.Journal"),
        "{names:?}"
    );
}
