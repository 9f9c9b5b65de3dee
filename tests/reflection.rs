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

#[tokio::test]
async fn both_reflection_versions_list_every_service() {
    let server = TestServer::start("reflection").await;

    let mut client =
        v1::server_reflection_client::ServerReflectionClient::new(server.channel().await);
    let request = v1::ServerReflectionRequest {
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
        ..Default::default()
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        response.message_response
    else {
        panic!("unexpected v1 reflection response");
    };
    let names: Vec<String> = list
        .service
        .into_iter()
        .map(|service| service.name)
        .collect();
    for expected in EXPECTED {
        assert!(
            names.iter().any(|name| name == expected),
            "v1: {expected} missing from {names:?}"
        );
    }

    let mut client =
        v1alpha::server_reflection_client::ServerReflectionClient::new(server.channel().await);
    let request = v1alpha::ServerReflectionRequest {
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
        ..Default::default()
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        response.message_response
    else {
        panic!("unexpected v1alpha reflection response");
    };
    let names: Vec<String> = list
        .service
        .into_iter()
        .map(|service| service.name)
        .collect();
    for expected in EXPECTED {
        assert!(
            names.iter().any(|name| name == expected),
            "v1alpha: {expected} missing from {names:?}"
        );
    }
}
