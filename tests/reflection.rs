//! Clients such as grpcurl discover the API by reflection, in v1 or in the older v1alpha.

mod common;

use common::TestServer;
use tonic_reflection::pb::{v1, v1alpha};

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
