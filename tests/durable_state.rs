//! The durable-state store end to end over gRPC, against the real mongod.

mod common;

use std::sync::Arc;

use common::*;
use mongodb::bson::{Bson, doc};
use proto::v1 as pb;
use proto::v1::durable_state_store_client::DurableStateStoreClient;
use tonic::transport::Channel;
use tonic::{Code, Status};

type Client = DurableStateStoreClient<Channel>;

async fn get(client: &mut Client, pid: &str) -> (Option<String>, i64) {
    let response = client
        .get_object(pb::GetObjectRequest {
            persistence_id: pid.into(),
        })
        .await
        .expect("GetObject failed")
        .into_inner();
    (
        response
            .value
            .map(|value| String::from_utf8(value.data).unwrap()),
        response.revision,
    )
}

async fn upsert(
    client: &mut Client,
    pid: &str,
    revision: i64,
    value: &str,
    tag: &str,
) -> Result<(), Status> {
    let request = pb::UpsertObjectRequest {
        persistence_id: pid.into(),
        revision,
        value: Some(payload(value)),
        tag: tag.into(),
    };
    client.upsert_object(request).await.map(|_| ())
}

async fn delete(client: &mut Client, pid: &str, revision: i64) -> Result<(), Status> {
    client
        .delete_object(pb::DeleteObjectRequest {
            persistence_id: pid.into(),
            revision,
        })
        .await
        .map(|_| ())
}

fn assert_aborted(result: Result<(), Status>, message: &str) {
    let status = result.expect_err("expected ABORTED");
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert_eq!(status.message(), message);
}

#[tokio::test]
async fn upserts_must_follow_the_stored_revision() {
    let server = TestServer::start("state_upsert").await;
    let mut client = DurableStateStoreClient::new(server.channel().await);
    assert_eq!(get(&mut client, "o").await, (None, 0));

    assert_aborted(
        upsert(&mut client, "o", 2, "v2", "").await,
        "revision 2 of persistence id \"o\" does not follow the stored revision 0: use revision 1",
    );
    upsert(&mut client, "o", 1, "v1", "shop").await.unwrap();
    assert_eq!(get(&mut client, "o").await, (Some("v1".into()), 1));
    assert_aborted(
        upsert(&mut client, "o", 1, "again", "").await,
        "revision 1 of persistence id \"o\" does not follow the stored revision 1: use revision 2",
    );
    assert_aborted(
        upsert(&mut client, "o", 3, "skip", "").await,
        "revision 3 of persistence id \"o\" does not follow the stored revision 1: use revision 2",
    );
    assert_eq!(
        get(&mut client, "o").await,
        (Some("v1".into()), 1),
        "failed upserts change nothing"
    );
    upsert(&mut client, "o", 2, "v2", "shop").await.unwrap();
    assert_eq!(get(&mut client, "o").await, (Some("v2".into()), 2));

    let objects = server
        .mongodb()
        .await
        .collection::<mongodb::bson::Document>("durable_state");
    let stored = objects
        .find_one(doc! { "_id": "o" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.get_str("tag").unwrap(), "shop");
    assert_eq!(stored.get_i64("revision").unwrap(), 2);
    assert!(
        matches!(stored.get("writtenAt"), Some(Bson::DateTime(_))),
        "{stored:?}"
    );
    assert!(stored.get_i64("timestamp").unwrap() > 0);
    // An upsert without a tag leaves the object untagged.
    upsert(&mut client, "o", 3, "v3", "").await.unwrap();
    let stored = objects
        .find_one(doc! { "_id": "o" })
        .await
        .unwrap()
        .unwrap();
    assert!(stored.get("tag").is_none(), "{stored:?}");
}

#[tokio::test]
async fn deletes_remove_or_keep_the_revision() {
    let server = TestServer::start("state_delete").await;
    let mut client = DurableStateStoreClient::new(server.channel().await);
    let objects = server
        .mongodb()
        .await
        .collection::<mongodb::bson::Document>("durable_state");

    // Revision 0: gone completely.
    upsert(&mut client, "gone", 1, "v1", "").await.unwrap();
    upsert(&mut client, "gone", 2, "v2", "").await.unwrap();
    delete(&mut client, "gone", 0).await.unwrap();
    assert_eq!(get(&mut client, "gone").await, (None, 0));
    assert_eq!(
        objects
            .count_documents(doc! { "_id": "gone" })
            .await
            .unwrap(),
        0
    );
    upsert(&mut client, "gone", 1, "reborn", "").await.unwrap();
    assert_eq!(get(&mut client, "gone").await, (Some("reborn".into()), 1));

    // Another revision: must be stored + 1; the revision stays, the value goes.
    upsert(&mut client, "kept", 1, "v1", "tagged")
        .await
        .unwrap();
    upsert(&mut client, "kept", 2, "v2", "tagged")
        .await
        .unwrap();
    assert_aborted(
        delete(&mut client, "kept", 2).await,
        "revision 2 of persistence id \"kept\" does not follow the stored revision 2: use revision 3",
    );
    assert_eq!(get(&mut client, "kept").await, (Some("v2".into()), 2));
    delete(&mut client, "kept", 3).await.unwrap();
    assert_eq!(get(&mut client, "kept").await, (None, 3));
    let stored = objects
        .find_one(doc! { "_id": "kept" })
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(stored.get("deletedAt"), Some(Bson::DateTime(_))),
        "{stored:?}"
    );
    assert_eq!(
        stored.get_str("tag").unwrap(),
        "tagged",
        "changes queries still see the deletion under its tag"
    );
    upsert(&mut client, "kept", 4, "v4", "").await.unwrap();
    assert_eq!(get(&mut client, "kept").await, (Some("v4".into()), 4));
    let stored = objects
        .find_one(doc! { "_id": "kept" })
        .await
        .unwrap()
        .unwrap();
    assert!(
        stored.get("deletedAt").is_none(),
        "an upsert revives the object: {stored:?}"
    );

    // A missing object deleted at revision 1.
    delete(&mut client, "never", 1).await.unwrap();
    assert_eq!(get(&mut client, "never").await, (None, 1));
    upsert(&mut client, "never", 2, "v2", "").await.unwrap();
    assert_eq!(get(&mut client, "never").await, (Some("v2".into()), 2));
}

#[tokio::test]
async fn racing_upserts_at_the_same_revision_exactly_one_wins() {
    const RACERS: usize = 24;
    const ROUNDS: i64 = 10;
    let server = TestServer::start("state_race").await;
    let channel = server.channel().await;
    for round in 1..=ROUNDS {
        let barrier = Arc::new(tokio::sync::Barrier::new(RACERS));
        let racers: Vec<_> = (0..RACERS)
            .map(|racer| {
                let mut client = DurableStateStoreClient::new(channel.clone());
                let barrier = barrier.clone();
                tokio::spawn(async move {
                    barrier.wait().await;
                    let value = format!("round {round} racer {racer}");
                    (
                        value.clone(),
                        upsert(&mut client, "contended", round, &value, "").await,
                    )
                })
            })
            .collect();
        let mut winners = Vec::new();
        for racer in racers {
            let (value, result) = racer.await.unwrap();
            match result {
                Ok(()) => winners.push(value),
                Err(status) => {
                    assert_eq!(status.code(), Code::Aborted, "round {round}: {status:?}");
                    assert!(
                        status
                            .message()
                            .contains(&format!("stored revision {round}")),
                        "{}",
                        status.message()
                    );
                }
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
        let mut client = DurableStateStoreClient::new(channel.clone());
        assert_eq!(
            get(&mut client, "contended").await,
            (Some(winners.remove(0)), round),
            "no lost update"
        );
    }
}

#[tokio::test]
async fn bad_durable_state_requests_are_rejected_and_change_nothing() {
    let server = TestServer::start("state_invalid").await;
    let mut client = DurableStateStoreClient::new(server.channel().await);
    upsert(&mut client, "o", 1, "v1", "").await.unwrap();

    let status = upsert(&mut client, "o", 0, "v", "").await.unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (
            Code::InvalidArgument,
            "revision: must be 1 or more (the stored revision + 1), got 0"
        )
    );
    let status = delete(&mut client, "o", -1).await.unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (
            Code::InvalidArgument,
            "revision: must not be negative, got -1"
        )
    );
    let status = client
        .upsert_object(pb::UpsertObjectRequest {
            persistence_id: "o".into(),
            revision: 2,
            value: None,
            tag: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (Code::InvalidArgument, "value: is required")
    );
    let status = client
        .get_object(pb::GetObjectRequest {
            persistence_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (Code::InvalidArgument, "persistence_id: must not be empty")
    );

    let huge = pb::Payload {
        data: vec![0; 17 << 20],
        serializer_id: 1,
        manifest: String::new(),
    };
    let status = client
        .upsert_object(pb::UpsertObjectRequest {
            persistence_id: "o".into(),
            revision: 2,
            value: Some(huge),
            tag: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        status.message(),
        "the value of persistence id \"o\" is at least 17825792 bytes as a MongoDB document, above the \
         limit of 16777216 bytes (16 MiB)"
    );
    assert_eq!(get(&mut client, "o").await, (Some("v1".into()), 1));
}

/// The test mongod has one `failCommand` fail point: tests that set it take turns.
static FAIL_POINT: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Makes MongoDB apply the next `command` of `app` but answer that the write concern timed out:
/// the outcome is unknown to the server, which answers UNAVAILABLE ("retrying is safe").
async fn lose_next_reply(app: &str, command: &str) {
    fail_next(
        app,
        1,
        command,
        doc! { "writeConcernError": {
            "code": 64,
            "codeName": "WriteConcernFailed",
            "errmsg": "waiting for replication timed out",
            "errInfo": { "wtimeout": true },
        } },
    )
    .await;
}

#[tokio::test]
async fn a_change_retried_after_its_reply_was_lost_succeeds() {
    let _failpoint = failpoint_turn().await;
    const APP: &str = "state_lost_reply";
    let _turn = FAIL_POINT.lock().await;
    let server = TestServer::start_with("state_lost_reply", |settings| {
        settings.mongodb.uri = format!("{}&appName={APP}", mongodb_uri());
    })
    .await;
    let mut client = DurableStateStoreClient::new(server.channel().await);
    let lose_next_reply = || lose_next_reply(APP, "update");

    lose_next_reply().await;
    let status = upsert(&mut client, "lost", 1, "v1", "shop")
        .await
        .expect_err("the reply was lost");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    // It was applied (visible to majority reads once the commit point moves past it).
    let reader = client.clone();
    wait_until(
        "the first attempt is stored",
        std::time::Duration::from_secs(10),
        || {
            let mut reader = reader.clone();
            async move { get(&mut reader, "lost").await == (Some("v1".into()), 1) }
        },
    )
    .await;
    // The client retries the very same change: it is stored, so it succeeds.
    upsert(&mut client, "lost", 1, "v1", "shop").await.unwrap();
    // Anything else at that revision is still stale.
    assert_aborted(
        upsert(&mut client, "lost", 1, "other", "shop").await,
        "revision 1 of persistence id \"lost\" does not follow the stored revision 1: use revision 2",
    );
    assert_aborted(
        upsert(&mut client, "lost", 1, "v1", "other-tag").await,
        "revision 1 of persistence id \"lost\" does not follow the stored revision 1: use revision 2",
    );

    lose_next_reply().await;
    let status = delete(&mut client, "lost", 2)
        .await
        .expect_err("the reply was lost");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    delete(&mut client, "lost", 2).await.unwrap();
    assert_eq!(get(&mut client, "lost").await, (None, 2));
    assert_aborted(
        upsert(&mut client, "lost", 2, "v1", "shop").await,
        "revision 2 of persistence id \"lost\" does not follow the stored revision 2: use revision 3",
    );
    upsert(&mut client, "lost", 3, "v3", "").await.unwrap();
    assert_eq!(get(&mut client, "lost").await, (Some("v3".into()), 3));
}

/// A retry that finds its change stored long after the lost reply (later than the watermark
/// lease: the first attempt's stamp no longer holds the horizon, so change queries may have read
/// past its position) moves the change forward, as the journal does for an identical retry; a
/// prompt retry leaves it where it is.
#[tokio::test]
async fn a_change_found_stored_by_a_late_retry_moves_forward_in_change_order() {
    let _failpoint = failpoint_turn().await;
    const APP: &str = "state_late_retry";
    const LEASE: std::time::Duration = std::time::Duration::from_secs(2);
    let _turn = FAIL_POINT.lock().await;
    let server = TestServer::start_with(APP, |settings| {
        settings.mongodb.uri = format!("{}&appName={APP}", mongodb_uri());
        settings.read_journal.watermark_lease = LEASE;
    })
    .await;
    let mut client = DurableStateStoreClient::new(server.channel().await);
    let objects = server
        .mongodb()
        .await
        .collection::<mongodb::bson::Document>("durable_state");
    let position = || async {
        let stored = objects.find_one(doc! { "_id": "late" }).await.unwrap();
        stored.map(|document| *document.get_datetime("writtenAt").unwrap())
    };

    lose_next_reply(APP, "update").await;
    let status = upsert(&mut client, "late", 1, "v1", "shop")
        .await
        .expect_err("the reply was lost");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let first = position().await.expect("the first attempt was applied");
    upsert(&mut client, "late", 1, "v1", "shop").await.unwrap();
    assert_eq!(
        position().await,
        Some(first),
        "a prompt retry keeps the position"
    );

    lose_next_reply(APP, "update").await;
    let status = upsert(&mut client, "late", 2, "v2", "shop")
        .await
        .expect_err("the reply was lost");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let second = position().await.expect("the first attempt was applied");
    tokio::time::sleep(LEASE + std::time::Duration::from_millis(500)).await;
    upsert(&mut client, "late", 2, "v2", "shop").await.unwrap();
    let moved = position().await.unwrap();
    assert!(
        moved > second,
        "a late retry moves the change forward: stored at {second}, now at {moved}"
    );
    assert_eq!(get(&mut client, "late").await, (Some("v2".into()), 2));
}

/// A client gives up on an upsert (its deadline passes) while MongoDB holds the update for
/// 1.5 s: the change applies anyway, after changes made meanwhile. Its position stamp stays in
/// flight until MongoDB answers (the change runs on a task of its own, not in the cancelled
/// call), so a live change query waits for it and delivers it with the others.
#[tokio::test]
async fn a_change_whose_call_was_cancelled_while_mongodb_held_it_is_still_delivered() {
    let _failpoint = failpoint_turn().await;
    const APP: &str = "state_cancelled";
    const TAG: &str = "held";
    let _turn = FAIL_POINT.lock().await;
    let server = TestServer::start_with(APP, |settings| {
        common::read::fast(settings);
        settings.mongodb.uri = format!("{}&appName={APP}", mongodb_uri());
    })
    .await;
    let mut client = DurableStateStoreClient::new(server.channel().await);
    let mut live = proto::v1::read_journal_client::ReadJournalClient::new(server.channel().await)
        .durable_state_changes(pb::DurableStateChangesRequest {
            tag: TAG.into(),
            offset: String::new(),
        })
        .await
        .unwrap()
        .into_inner();

    hold_next(APP, "update", 1_500).await;
    let mut request = tonic::Request::new(pb::UpsertObjectRequest {
        persistence_id: "held".into(),
        revision: 1,
        value: Some(payload("held")),
        tag: TAG.into(),
    });
    request.set_timeout(std::time::Duration::from_millis(300));
    let status = client.upsert_object(request).await.unwrap_err();
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    let mut expected = std::collections::BTreeSet::from(["held".to_owned()]);
    for n in 1..=20 {
        let pid = format!("after-{n}");
        upsert(&mut client, &pid, 1, "v", TAG).await.unwrap();
        expected.insert(pid);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(get(&mut client, "held").await, (Some("held".into()), 1));
    let mut delivered = std::collections::BTreeSet::new();
    while delivered.len() < expected.len() {
        let change = tokio::time::timeout(std::time::Duration::from_secs(10), live.message())
            .await
            .unwrap_or_else(|_| panic!("delivered {delivered:?}, expected {expected:?}"))
            .unwrap()
            .unwrap();
        assert!(
            delivered.insert(change.persistence_id.clone()),
            "{} twice",
            change.persistence_id
        );
    }
    assert_eq!(delivered, expected);
}
