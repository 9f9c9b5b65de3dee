//! Bearer-token authentication: every RPC checked, health open, roles enforced.

mod common;

use common::*;
use config::auth::{Role, Token};
use proto::v1 as pb;
use proto::v1::durable_state_store_client::DurableStateStoreClient;
use proto::v1::journal_client::JournalClient;
use proto::v1::read_journal_client::ReadJournalClient;
use proto::v1::snapshot_store_client::SnapshotStoreClient;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

const WRITER: &str = "writer-token-0123456789";
const READER: &str = "reader-token-0123456789";
const ADMIN: &str = "admin-token-0123456789";

async fn server() -> TestServer {
    TestServer::start_with("auth", |settings| {
        settings.auth.enabled = true;
        settings.auth.tokens = vec![
            Token::new("orders", &[Role::Write], WRITER),
            Token::new("projector", &[Role::Read], READER),
            Token::new("ops", &[Role::Admin], ADMIN),
        ];
    })
    .await
}

/// `message` with `authorization: <value>` when given.
fn with<T>(message: T, authorization: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(value) = authorization {
        request
            .metadata_mut()
            .insert("authorization", value.parse().unwrap());
    }
    request
}

fn bearer(token: &str) -> Option<String> {
    Some(format!("Bearer {token}"))
}

/// The outcome of one call of each kind (write, read, streaming read) with `authorization`.
async fn calls(
    channel: &Channel,
    authorization: Option<String>,
) -> Vec<(&'static str, Result<(), Status>)> {
    let authorization = authorization.as_deref();
    let mut journal = JournalClient::new(channel.clone());
    let mut snapshots = SnapshotStoreClient::new(channel.clone());
    let mut state = DurableStateStoreClient::new(channel.clone());
    let mut queries = ReadJournalClient::new(channel.clone());
    let write = journal
        .write_events(with(
            pb::WriteEventsRequest {
                writes: vec![atomic(vec![event("a", 1, "x")])],
                ..Default::default()
            },
            authorization,
        ))
        .await
        .map(|_| ());
    // The status of a streaming call comes with the response headers or the first message.
    let write_stream = async {
        let requests = tokio_stream::iter(vec![pb::WriteEventsRequest {
            writes: vec![atomic(vec![event("s", 1, "x")])],
            ..Default::default()
        }]);
        let mut stream = journal
            .write_events_stream(with(requests, authorization))
            .await?
            .into_inner();
        stream.message().await.map(|_| ())
    }
    .await;
    let replay = async {
        let mut stream = journal
            .replay_events(with(
                pb::ReplayEventsRequest {
                    persistence_id: "a".into(),
                    from_sequence_nr: 1,
                    to_sequence_nr: None,
                    max: None,
                },
                authorization,
            ))
            .await?
            .into_inner();
        stream.message().await.map(|_| ())
    }
    .await;
    let highest = journal
        .read_highest_sequence_nr(with(
            pb::ReadHighestSequenceNrRequest {
                persistence_id: "a".into(),
                from_sequence_nr: 0,
            },
            authorization,
        ))
        .await
        .map(|_| ());
    let save = snapshots
        .save_snapshot(with(
            pb::SaveSnapshotRequest {
                metadata: Some(pb::SnapshotMetadata {
                    persistence_id: "a".into(),
                    sequence_nr: 1,
                    timestamp_millis: 0,
                    metadata: None,
                }),
                snapshot: Some(payload("s")),
            },
            authorization,
        ))
        .await
        .map(|_| ());
    let load = snapshots
        .load_snapshot(with(
            pb::LoadSnapshotRequest {
                persistence_id: "a".into(),
                criteria: None,
                to_sequence_nr: None,
            },
            authorization,
        ))
        .await
        .map(|_| ());
    let get = state
        .get_object(with(
            pb::GetObjectRequest {
                persistence_id: "a".into(),
            },
            authorization,
        ))
        .await
        .map(|_| ());
    let current_by_tag = async {
        let mut stream = queries
            .current_events_by_tag(with(
                pb::EventsByTagRequest {
                    tag: "t".into(),
                    offset: String::new(),
                },
                authorization,
            ))
            .await?
            .into_inner();
        stream.message().await.map(|_| ())
    }
    .await;
    vec![
        ("WriteEvents", write),
        ("WriteEventsStream", write_stream),
        ("ReplayEvents", replay),
        ("ReadHighestSequenceNr", highest),
        ("SaveSnapshot", save),
        ("LoadSnapshot", load),
        ("GetObject", get),
        ("CurrentEventsByTag", current_by_tag),
    ]
}

fn codes(outcomes: &[(&'static str, Result<(), Status>)]) -> Vec<(&'static str, Code)> {
    outcomes
        .iter()
        .map(|(name, outcome)| {
            (
                *name,
                outcome.as_ref().map_or_else(Status::code, |()| Code::Ok),
            )
        })
        .collect()
}

#[tokio::test]
async fn calls_without_a_valid_token_are_unauthenticated() {
    let server = server().await;
    let channel = server.channel().await;
    for authorization in [
        None,
        bearer("not-a-configured-token"),
        bearer(&WRITER[..WRITER.len() - 1]),
        Some(format!("Basic {WRITER}")),
        Some(WRITER.to_owned()),
    ] {
        let outcomes = calls(&channel, authorization.clone()).await;
        for (name, outcome) in &outcomes {
            let status = outcome.as_ref().expect_err(name);
            assert_eq!(
                status.code(),
                Code::Unauthenticated,
                "{name} with {authorization:?}"
            );
            assert!(
                status.message().contains("authorization: Bearer <token>"),
                "{}",
                status.message()
            );
        }
    }
    let stored = server
        .mongodb()
        .await
        .collection::<mongodb::bson::Document>("journal")
        .count_documents(mongodb::bson::doc! {})
        .await
        .unwrap();
    assert_eq!(stored, 0, "nothing written without a token");
}

#[tokio::test]
async fn each_role_may_do_its_own_work_only() {
    let server = server().await;
    let channel = server.channel().await;
    use Code::{Ok as Allowed, PermissionDenied as Denied};
    assert_eq!(
        codes(&calls(&channel, bearer(WRITER)).await),
        [
            ("WriteEvents", Allowed),
            ("WriteEventsStream", Allowed),
            ("ReplayEvents", Denied),
            ("ReadHighestSequenceNr", Denied),
            ("SaveSnapshot", Allowed),
            ("LoadSnapshot", Denied),
            ("GetObject", Denied),
            ("CurrentEventsByTag", Denied),
        ]
    );
    assert_eq!(
        codes(&calls(&channel, bearer(READER)).await),
        [
            ("WriteEvents", Denied),
            ("WriteEventsStream", Denied),
            ("ReplayEvents", Allowed),
            ("ReadHighestSequenceNr", Allowed),
            ("SaveSnapshot", Denied),
            ("LoadSnapshot", Allowed),
            ("GetObject", Allowed),
            ("CurrentEventsByTag", Allowed),
        ]
    );
    let admin = codes(&calls(&channel, bearer(ADMIN)).await);
    assert!(admin.iter().all(|(_, code)| *code == Allowed), "{admin:?}");

    let denied = calls(&channel, bearer(READER))
        .await
        .remove(0)
        .1
        .unwrap_err();
    assert_eq!(
        denied.message(),
        "token \"projector\" lacks the write role that /eventjournal.v1.Journal/WriteEvents needs"
    );
    assert!(!denied.message().contains(READER));
}

#[tokio::test]
async fn health_stays_open_and_reflection_needs_a_token() {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let server = server().await;
    let channel = server.channel().await;
    HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health needs no token");

    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    let list = || ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut reflection = ServerReflectionClient::new(channel.clone());
    let refused = async {
        let mut stream = reflection
            .server_reflection_info(tokio_stream::once(list()))
            .await?
            .into_inner();
        stream.message().await
    }
    .await;
    assert_eq!(refused.unwrap_err().code(), Code::Unauthenticated);
    let mut request = Request::new(tokio_stream::once(list()));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {READER}").parse().unwrap());
    let mut stream = reflection
        .server_reflection_info(request)
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some());
}
