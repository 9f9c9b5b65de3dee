//! Clients such as grpcurl discover the API by reflection, in v1 or in the older v1alpha.

mod common;

use std::time::Duration;

use common::{TestServer, grpc_status, raw_send, stalled_request};
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

/// Input tonic's decoder refuses (a message over reflection's 4 MiB limit, one with its
/// compression flag set, one that does not decode) ends a reflection call with tonic's status
/// for it, as it ends any other call, not with the OK reflection's handler ends with.
#[tokio::test]
async fn a_reflection_message_tonic_refuses_ends_the_call_with_the_reason() {
    let server = TestServer::start("reflection_input").await;
    let over_the_limit = [&[0u8][..], &(5u32 << 20).to_be_bytes(), &[0; 100]].concat();
    let (code, message) = raw_call(&server, REFLECTION_V1, over_the_limit, false).await;
    assert_eq!(code, "11", "OUT_OF_RANGE, not OK: {message}");
    assert!(
        message.contains("message of 5.0 MiB is over reflection's limit of 4.0 MiB"),
        "{message}"
    );
    // A list-services request (field 7, empty), compressed though reflection takes no
    // compression.
    let compressed = vec![1, 0, 0, 0, 2, 0x3a, 0];
    let (code, message) = raw_call(&server, REFLECTION_V1ALPHA, compressed, true).await;
    assert_eq!(code, "13", "INTERNAL, not OK: {message}");
    assert!(message.contains("compression flag 1"), "{message}");
    let undecodable = [&[0u8][..], &10u32.to_be_bytes(), &[0xff; 10]].concat();
    let (code, message) = raw_call(&server, REFLECTION_V1, undecodable, true).await;
    assert_eq!(code, "13", "INTERNAL, not OK: {message}");
    assert!(
        message.contains("does not decode as a ServerReflectionRequest"),
        "{message}"
    );
    // The same request uncompressed is answered: the checks refuse only what tonic refuses.
    let (code, message) = raw_call(
        &server,
        REFLECTION_V1ALPHA,
        vec![0, 0, 0, 0, 2, 0x3a, 0],
        true,
    )
    .await;
    assert_eq!(code, "0", "{message}");
    let names = list_services!(v1, server);
    assert!(
        names.iter().any(|name| name == "eventjournal.v1.Journal"),
        "{names:?}"
    );
}

/// Sends `bytes` as the body of a call to `method` on a connection of its own (ending the body
/// when `end`) and returns the call's `grpc-status` and `grpc-message`.
async fn raw_call(
    server: &TestServer,
    method: &str,
    bytes: Vec<u8>,
    end: bool,
) -> (String, String) {
    let (response, _body, _connection) = raw_send(server, method, bytes, end).await;
    let response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .expect("answered within 10 s")
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), grpc_status(response))
        .await
        .unwrap_or_else(|_| panic!("{method}: ended within 10 s"))
}
