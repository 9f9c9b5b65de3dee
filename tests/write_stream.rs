//! `WriteEventsStream` end to end: one response per request, in order, with the outcomes
//! `WriteEvents` gives; a failure stops the later writes of its persistence id on the stream;
//! and a flooding client is held back by HTTP/2 flow control, so the server never holds more
//! than `stream-max-unacknowledged` requests of one stream plus what the transport buffers.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use futures::StreamExt;
use mongodb::bson::doc;
use proto::v1 as pb;
use proto::v1::atomic_write_result::Outcome;

fn request(writes: Vec<pb::AtomicWrite>) -> pb::WriteEventsRequest {
    pb::WriteEventsRequest { writes }
}

/// `written`, `rejected: <reason>` or `conflict: <reason>`, per write of a response.
fn outcomes(response: &pb::WriteEventsResponse) -> Vec<String> {
    response
        .results
        .iter()
        .map(|result| match result.outcome.as_ref().unwrap() {
            Outcome::Written(_) => "written".to_owned(),
            Outcome::Rejected(rejected) => format!("rejected: {}", rejected.reason),
            Outcome::Conflict(conflict) => format!("conflict: {}", conflict.reason),
        })
        .collect()
}

/// Sends `requests` on one WriteEventsStream and returns the outcomes of every response.
async fn stream_all(
    client: &mut proto::v1::journal_client::JournalClient<tonic::transport::Channel>,
    requests: Vec<pb::WriteEventsRequest>,
) -> Vec<Vec<String>> {
    let mut responses = client
        .write_events_stream(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let mut answers = Vec::new();
    while let Some(response) = responses.message().await.unwrap() {
        answers.push(outcomes(&response));
    }
    answers
}

#[tokio::test]
async fn responses_come_in_order_with_the_outcomes_write_events_gives() {
    let server = TestServer::start("stream_order").await;
    let mut client = server.journal().await;
    let mut no_payload = event("a", 3, "x");
    no_payload.payload = None;
    let requests = vec![
        request(vec![atomic(vec![event("a", 1, "a-1")])]),
        request(vec![
            atomic(vec![event("a", 2, "a-2")]),
            atomic(vec![event("b", 1, "b-1"), event("b", 2, "b-2")]),
        ]),
        request(vec![
            atomic(vec![no_payload]),
            atomic(vec![event("c", 1, "c-1")]),
        ]),
        // A retry of what is stored, and a conflict with it.
        request(vec![atomic(vec![event("a", 1, "a-1")])]),
        request(vec![atomic(vec![event("b", 2, "other")])]),
        request(vec![]),
    ];
    let answers = stream_all(&mut client, requests).await;
    assert_eq!(answers.len(), 6, "one response per request: {answers:?}");
    assert_eq!(answers[0], ["written"]);
    assert_eq!(answers[1], ["written", "written"]);
    assert_eq!(
        answers[2],
        ["rejected: events[0].payload: is required", "written"]
    );
    assert_eq!(answers[3], ["written"], "an identical retry");
    assert_eq!(
        answers[4],
        [
            "conflict: sequence number(s) 2 of persistence id \"b\" are already taken by other events"
        ]
    );
    assert!(answers[5].is_empty());
    let (events, _) = replay(&mut client, "a", 1, None, None).await;
    assert_eq!(sequence_nrs(&events), [1, 2]);
}

#[tokio::test]
async fn a_failure_stops_the_later_writes_of_its_pid_on_the_stream() {
    let server = TestServer::start("stream_poison").await;
    let mut client = server.journal().await;
    assert!(is_written(
        &write(&mut client, vec![atomic(vec![event("p", 1, "first")])]).await[0]
    ));
    // A stale producer pipelines 1 (taken by another event), 2 and 3, and some other id.
    let requests = vec![
        request(vec![atomic(vec![event("p", 1, "stale")])]),
        request(vec![
            atomic(vec![event("p", 2, "stale")]),
            atomic(vec![event("q", 1, "q")]),
        ]),
        request(vec![atomic(vec![event("p", 3, "stale")])]),
    ];
    let answers = stream_all(&mut client, requests).await;
    assert_eq!(
        answers[0],
        [
            "conflict: sequence number(s) 1 of persistence id \"p\" are already taken by other events"
        ]
    );
    let stopped = "conflict: not stored: the write of sequence number(s) 1 of persistence id \"p\" \
                   before it in this request or stream failed: sequence number(s) 1 of \
                   persistence id \"p\" are already taken by other events";
    assert_eq!(answers[1], [stopped, "written"]);
    assert_eq!(answers[2], [stopped]);
    let (events, highest) = replay(&mut client, "p", 1, None, None).await;
    assert_eq!(sequence_nrs(&events), [1]);
    assert_eq!(highest, 1);
}

#[tokio::test]
async fn a_flooding_client_is_held_back_by_flow_control() {
    const APP: &str = "stream_flood";
    const UNACKNOWLEDGED: usize = 4;
    const PAYLOAD: usize = 64 * 1024;
    let server = TestServer::start_with("stream_flood", |settings| {
        settings.mongodb.uri = format!("{}&appName={APP}", mongodb_uri());
        settings.write_journal.stream_max_unacknowledged = UNACKNOWLEDGED as u32;
    })
    .await;
    let mut client = server.journal().await;
    // MongoDB holds every insert of this server for 3 s: nothing is answered meanwhile.
    fail_next(
        APP,
        1_000,
        "insert",
        doc! { "blockConnection": true, "blockTimeMS": 3_000 },
    )
    .await;
    // A producer with an endless supply of 64 KiB requests, sending as fast as it may.
    let produced = Arc::new(AtomicUsize::new(0));
    let counter = produced.clone();
    let requests = futures::stream::iter(1..).map(move |sequence_nr: i64| {
        counter.fetch_add(1, Ordering::Relaxed);
        let mut flood = event("flood", sequence_nr, "");
        flood.payload = Some(pb::Payload {
            data: vec![7; PAYLOAD],
            serializer_id: 1,
            manifest: String::new(),
        });
        request(vec![atomic(vec![flood])])
    });
    let mut responses = client
        .write_events_stream(requests)
        .await
        .unwrap()
        .into_inner();
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The server reads UNACKNOWLEDGED requests; then the stream's 1 MiB HTTP/2 window fills
    // (16 requests) and the client's send waits. Without flow control it would be thousands.
    let taken = produced.load(Ordering::Relaxed);
    let window = (1 << 20) / PAYLOAD;
    assert!(
        taken <= UNACKNOWLEDGED + window + 8,
        "the client could send {taken} requests while none was answered"
    );
    // Once MongoDB answers, everything flows, in order.
    mongodb::Client::with_uri_str(mongodb_uri())
        .await
        .unwrap()
        .database("admin")
        .run_command(doc! { "configureFailPoint": "failCommand", "mode": "off" })
        .await
        .unwrap();
    for _ in 0..3 * taken {
        let response = tokio::time::timeout(Duration::from_secs(30), responses.message())
            .await
            .expect("responses flow again")
            .unwrap()
            .unwrap();
        assert_eq!(outcomes(&response), ["written"]);
    }
    drop(responses);
    // Requests already read may still be landing: a replay reads the highest, then up to it.
    let (events, highest) = replay(&mut client, "flood", 1, None, None).await;
    assert!(highest >= 3 * taken as i64, "{highest}");
    assert_eq!(
        sequence_nrs(&events),
        (1..=highest).collect::<Vec<_>>(),
        "in order, no gap"
    );
}
