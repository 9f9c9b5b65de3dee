//! Prometheus metrics on their own listener. In a test binary of its own: the registry is
//! global to the process, so the counts here are this test's only.

mod common;

use std::time::Duration;

use common::read::{fast, tagged, take};
use common::*;
use proto::v1 as pb;
use proto::v1::read_journal_client::ReadJournalClient;

#[tokio::test]
async fn calls_events_bytes_persistence_time_subscribers_and_retries_are_measured() {
    const APP: &str = "metrics_test";
    let port = free_port();
    let server = TestServer::start_with("metrics", |settings| {
        fast(settings);
        settings.server.metrics_listen = Some(([127, 0, 0, 1], port).into());
        settings.mongodb.uri = format!("{}&appName={APP}", mongodb_uri());
        settings.mongodb.retry.delay = Duration::from_millis(1);
    })
    .await;
    let mut journal = server.journal().await;
    let mut queries = ReadJournalClient::new(server.channel().await);

    let mut live = queries
        .events_by_tag(pb::EventsByTagRequest {
            tag: "m".into(),
            offset: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let text = fetch_metrics(port).await;
    assert_eq!(
        metric(
            &text,
            "eventjournal_live_subscribers{query=\"EventsByTag\"}"
        ),
        Some(1.0),
        "{text}"
    );

    // One atomic write of two events with 2 + 3 payload bytes.
    let mut first = tagged("p", 1, &["m"]);
    first.payload = Some(payload("ab"));
    let mut second = tagged("p", 2, &["m"]);
    second.payload = Some(payload("cde"));
    assert!(is_written(
        &write(&mut journal, vec![atomic(vec![first, second])]).await[0]
    ));
    take(&mut live, 2, 10).await;
    let (events, _) = replay(&mut journal, "p", 1, None, None).await;
    assert_eq!(events.len(), 2);
    let status = journal
        .delete_events_to(pb::DeleteEventsToRequest {
            persistence_id: String::new(),
            to_sequence_nr: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    // A retryable error from MongoDB, once: 16500 (the driver itself retries 91 and the like).
    fail_next(APP, 1, "insert", mongodb::bson::doc! { "errorCode": 16500 }).await;
    assert!(is_written(
        &write(&mut journal, vec![atomic(vec![tagged("p", 3, &[])])]).await[0]
    ));

    drop(live);
    // A closed stream is noticed asynchronously.
    wait_until(
        "the subscriber is gone",
        Duration::from_secs(10),
        || async {
            let text = fetch_metrics(port).await;
            metric(
                &text,
                "eventjournal_live_subscribers{query=\"EventsByTag\"}",
            ) == Some(0.0)
        },
    )
    .await;
    let text = fetch_metrics(port).await;
    for (sample, expected) in [
        ("eventjournal_events_written_total", 3.0),
        ("eventjournal_event_bytes_written_total", 2.0 + 3.0 + 3.0),
        ("eventjournal_events_read_total{source=\"query\"}", 2.0),
        ("eventjournal_events_read_total{source=\"replay\"}", 2.0),
        (
            "eventjournal_event_bytes_read_total{source=\"replay\"}",
            5.0,
        ),
        ("akka_event_persistence_time_ns_count", 2.0),
        (
            "eventjournal_grpc_calls_total{code=\"Ok\",method=\"WriteEvents\",service=\"eventjournal.v1.Journal\"}",
            2.0,
        ),
        (
            "eventjournal_grpc_calls_total{code=\"Ok\",method=\"ReplayEvents\",service=\"eventjournal.v1.Journal\"}",
            1.0,
        ),
        (
            "eventjournal_grpc_calls_total{code=\"InvalidArgument\",method=\"DeleteEventsTo\",service=\"eventjournal.v1.Journal\"}",
            1.0,
        ),
        (
            "eventjournal_grpc_calls_total{code=\"Cancelled\",method=\"EventsByTag\",service=\"eventjournal.v1.ReadJournal\"}",
            1.0,
        ),
        (
            "eventjournal_grpc_call_duration_seconds_count{method=\"WriteEvents\",service=\"eventjournal.v1.Journal\"}",
            2.0,
        ),
        (
            "eventjournal_mongodb_retries_total{code=\"16500\",operation=\"write events\"}",
            1.0,
        ),
    ] {
        assert_eq!(
            metric(&text, sample),
            Some(expected),
            "{sample} in:\n{text}"
        );
    }
    assert!(
        metric(
            &text,
            "eventjournal_read_journal_delivery_lag_seconds_count{mode=\"polling\"}"
        )
        .is_some_and(|count| count >= 2.0),
        "{text}"
    );
}
