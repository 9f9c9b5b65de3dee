//! Group commit seen through the server's metrics: concurrent writes from many requests share
//! MongoDB inserts, a lone write goes alone and at once, and `WriteEventsStream` is measured
//! like `WriteEvents`. In a test binary of its own: the metrics registry is global to the
//! process, so the counts here are this test's only.

mod common;

use std::sync::Arc;

use common::*;
use proto::v1 as pb;
use proto::v1::journal_client::JournalClient;

async fn sample(port: u16, name: &str) -> f64 {
    metric(&fetch_metrics(port).await, name).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writes_share_inserts_and_streams_are_measured() {
    const WRITERS: usize = 100;
    let port = free_port();
    let server = TestServer::start_with("group_commit", |settings| {
        settings.server.metrics_listen = Some(([127, 0, 0, 1], port).into());
    })
    .await;
    let channel = server.channel().await;

    // A lone write: one insert of one event.
    let mut client = JournalClient::new(channel.clone());
    assert!(is_written(
        &write(&mut client, vec![atomic(vec![event("lone", 1, "x")])]).await[0]
    ));
    assert_eq!(
        sample(port, "eventjournal_write_batch_events_count").await,
        1.0
    );
    assert_eq!(
        sample(port, "eventjournal_write_batch_events_sum").await,
        1.0
    );

    // A hundred requests of one write each, all at once: far fewer inserts than requests.
    let start = Arc::new(tokio::sync::Barrier::new(WRITERS));
    let writers: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let mut client = JournalClient::new(channel.clone());
            let start = start.clone();
            tokio::spawn(async move {
                start.wait().await;
                let pid = format!("w{writer}");
                write(&mut client, vec![atomic(vec![event(&pid, 1, "x")])]).await
            })
        })
        .collect();
    for writer in writers {
        let outcomes = writer.await.unwrap();
        assert!(is_written(&outcomes[0]), "{outcomes:?}");
    }
    let inserts = sample(port, "eventjournal_write_batch_events_count").await - 1.0;
    let events = sample(port, "eventjournal_write_batch_events_sum").await - 1.0;
    assert_eq!(events, WRITERS as f64);
    assert!(
        inserts < (WRITERS / 2) as f64,
        "{WRITERS} concurrent writes took {inserts} inserts"
    );

    // A stream of three requests counts like three WriteEvents calls, and as one stream call.
    let requests: Vec<_> = (1..=3)
        .map(|n| pb::WriteEventsRequest {
            writes: vec![atomic(vec![event("streamed", n, "ab")])],
            ..Default::default()
        })
        .collect();
    let mut responses = client
        .write_events_stream(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    while responses.message().await.unwrap().is_some() {}
    let text = fetch_metrics(port).await;
    for (name, expected) in [
        (
            "eventjournal_events_written_total",
            1.0 + WRITERS as f64 + 3.0,
        ),
        (
            "akka_event_persistence_time_ns_count",
            1.0 + WRITERS as f64 + 3.0,
        ),
        (
            "eventjournal_grpc_calls_total{code=\"Ok\",method=\"WriteEventsStream\",service=\"eventjournal.v1.Journal\"}",
            1.0,
        ),
    ] {
        assert_eq!(metric(&text, name), Some(expected), "{name} in:\n{text}");
    }
}
