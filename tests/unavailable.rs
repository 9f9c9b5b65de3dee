//! MongoDB unreachable after retries: calls fail with UNAVAILABLE, promptly, and the server
//! recovers by itself when MongoDB is back.

mod common;

use std::time::{Duration, Instant};

use common::proxy::CuttableProxy;
use common::*;
use proto::v1 as pb;
use tonic::Code;

#[tokio::test]
async fn calls_fail_with_unavailable_while_mongodb_is_unreachable_and_work_again_after() {
    let proxy = CuttableProxy::start(mongodb_address()).await;
    let server = TestServer::start_with("unavailable", |settings| {
        settings.mongodb.uri = format!("mongodb://{}/?directConnection=true", proxy.address);
        settings.mongodb.server_selection_timeout = Duration::from_secs(1);
        settings.mongodb.retry.delay = Duration::from_millis(50);
    })
    .await;
    let mut client = server.journal().await;
    assert!(is_written(
        &write(&mut client, vec![atomic(vec![event("u", 1, "before")])]).await[0]
    ));

    proxy.cut();
    let started = Instant::now();
    let status = client
        .write_events(pb::WriteEventsRequest {
            writes: vec![atomic(vec![event("u", 2, "during")])],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().starts_with("write events: "),
        "{}",
        status.message()
    );
    let status = client
        .read_highest_sequence_nr(pb::ReadHighestSequenceNrRequest {
            persistence_id: "u".into(),
            from_sequence_nr: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(
        status.message(),
        "read highest sequence number: MongoDB is unavailable"
    );
    // Bounded by the server-selection timeout and the retries, not a hang.
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );

    proxy.restore();
    // The write whose outcome was unknown is retried as is: idempotent, so it succeeds.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let request = pb::WriteEventsRequest {
            writes: vec![atomic(vec![event("u", 2, "during")])],
            ..Default::default()
        };
        match client.write_events(request).await {
            Ok(response) => {
                let outcome = response.into_inner().results.remove(0).outcome.unwrap();
                assert!(is_written(&outcome), "{outcome:?}");
                break;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                assert!(Instant::now() < deadline, "no recovery within 30 s");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let (events, highest) = replay(&mut client, "u", 1, None, None).await;
    assert_eq!(sequence_nrs(&events), [1, 2]);
    assert_eq!(highest, 2);
}

#[tokio::test]
async fn request_rate_too_large_is_retried_after_the_hinted_delay() {
    const APP: &str = "retry_after_hint";
    let server = TestServer::start_with("rate_limited", |settings| {
        settings.mongodb.uri = format!("{}&appName={APP}", mongodb_uri());
        // Far shorter than the hint, so the wait shows which one was used.
        settings.mongodb.retry.delay = Duration::from_millis(1);
    })
    .await;
    let mut client = server.journal().await;

    fail_next(
        APP,
        1,
        "insert",
        mongodb::bson::doc! { "writeConcernError": {
            "code": 16500,
            "errmsg": "Request rate is large. More Request Units may be needed, so no changes were made. Please retry this request later. RetryAfterMs=700",
        } },
    )
    .await;
    let started = Instant::now();
    let outcomes = write(&mut client, vec![atomic(vec![event("r", 1, "rated")])]).await;
    assert!(is_written(&outcomes[0]), "{outcomes:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(700),
        "retried after {:?}, before the hinted 700 ms",
        started.elapsed()
    );

    // Without a hint, the configured delay; 16500 is retryable by default.
    fail_next(APP, 2, "find", mongodb::bson::doc! { "errorCode": 16500 }).await;
    let (events, highest) = replay(&mut client, "r", 1, None, None).await;
    assert_eq!(sequence_nrs(&events), [1]);
    assert_eq!(highest, 1);
}

#[tokio::test]
async fn health_is_not_serving_while_mongodb_is_unreachable() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let proxy = CuttableProxy::start(mongodb_address()).await;
    let server = TestServer::start_with("health", |settings| {
        settings.mongodb.uri = format!("mongodb://{}/?directConnection=true", proxy.address);
        settings.mongodb.server_selection_timeout = Duration::from_millis(500);
        settings.server.health_check_interval = Duration::from_millis(100);
    })
    .await;
    let health = HealthClient::new(server.channel().await);
    let status = |service: &'static str| {
        let mut health = health.clone();
        async move {
            let response = health
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .expect("health stays open and answers");
            ServingStatus::try_from(response.into_inner().status).unwrap()
        }
    };
    for service in ["", "eventjournal.v1.Journal", "eventjournal.v1.ReadJournal"] {
        assert_eq!(status(service).await, ServingStatus::Serving, "{service:?}");
    }

    proxy.cut();
    wait_until("health NOT_SERVING", Duration::from_secs(10), || async {
        status("").await == ServingStatus::NotServing
    })
    .await;
    assert_eq!(
        status("eventjournal.v1.SnapshotStore").await,
        ServingStatus::NotServing
    );

    proxy.restore();
    wait_until("health SERVING again", Duration::from_secs(30), || async {
        status("eventjournal.v1.Journal").await == ServingStatus::Serving
    })
    .await;
}
