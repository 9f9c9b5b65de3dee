//! `WriteEventsStream` end to end: one response per request, in order, with the outcomes
//! `WriteEvents` gives; a failure stops the later writes of its persistence id on the stream;
//! and a flooding client is held back by HTTP/2 flow control, so the server never holds more
//! than `stream-max-unacknowledged` requests of one stream plus what the transport buffers,
//! while the other calls on its connection go on.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use futures::StreamExt;
use mongodb::bson::doc;
use proto::v1 as pb;
use proto::v1::atomic_write_result::Outcome;
use tokio::task::JoinHandle;

fn request(writes: Vec<pb::AtomicWrite>) -> pb::WriteEventsRequest {
    pb::WriteEventsRequest {
        writes,
        ..Default::default()
    }
}

/// A request sent having received `responses` of the stream's responses.
fn sent_after(responses: u64, writes: Vec<pb::AtomicWrite>) -> pb::WriteEventsRequest {
    pb::WriteEventsRequest {
        writes,
        responses_received: Some(responses),
    }
}

/// A server on which "p" has its event 1, and a client of it.
async fn p_stored_once(
    name: &str,
) -> (
    TestServer,
    proto::v1::journal_client::JournalClient<tonic::transport::Channel>,
) {
    let server = TestServer::start(name).await;
    let mut client = server.journal().await;
    assert!(is_written(
        &write(&mut client, vec![atomic(vec![event("p", 1, "first")])]).await[0]
    ));
    (server, client)
}

/// A stream driven step by step: send a request, read its response.
struct Conversation {
    requests: tokio::sync::mpsc::Sender<pb::WriteEventsRequest>,
    responses: tonic::Streaming<pb::WriteEventsResponse>,
}

impl Conversation {
    async fn open(
        client: &mut proto::v1::journal_client::JournalClient<tonic::transport::Channel>,
    ) -> Self {
        let (requests, receiver) = tokio::sync::mpsc::channel(8);
        let responses = client
            .write_events_stream(tokio_stream::wrappers::ReceiverStream::new(receiver))
            .await
            .unwrap()
            .into_inner();
        Self {
            requests,
            responses,
        }
    }

    async fn ask(&mut self, request: pb::WriteEventsRequest) -> Vec<String> {
        self.requests.send(request).await.unwrap();
        let response = tokio::time::timeout(Duration::from_secs(30), self.responses.message())
            .await
            .expect("a response within 30 s")
            .unwrap()
            .expect("a response");
        outcomes(&response)
    }
}

const STALE_CONFLICT: &str =
    "conflict: sequence number(s) 1 of persistence id \"p\" are already taken by other events";
const STOPPED: &str = "conflict: not stored: the write of sequence number(s) 1 of persistence id \
                       \"p\" before it in this request or stream failed: sequence number(s) 1 \
                       of persistence id \"p\" are already taken by other events";

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
    let mut no_payload = event("z", 1, "x");
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
    let (_server, mut client) = p_stored_once("stream_poison").await;
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
    assert_eq!(answers[0], [STALE_CONFLICT]);
    assert_eq!(answers[1], [STOPPED, "written"]);
    assert_eq!(answers[2], [STOPPED]);
    let (events, highest) = replay(&mut client, "p", 1, None, None).await;
    assert_eq!(sequence_nrs(&events), [1]);
    assert_eq!(highest, 1);
}

/// A write the client sent before it had the failure's response is stopped, also when it
/// reaches the server after that response was sent (pipelined, or held up on the way); one
/// sent once the client has the response (it recovered) is stored.
#[tokio::test]
async fn a_failure_stops_the_writes_sent_before_its_response_was_received() {
    let (_server, mut client) = p_stored_once("stream_received").await;
    let mut stream = Conversation::open(&mut client).await;
    let stale = stream
        .ask(sent_after(0, vec![atomic(vec![event("p", 1, "stale")])]))
        .await;
    assert_eq!(stale, [STALE_CONFLICT]);
    // Sent right after the stale write, before its response came back: it arrives only now.
    let pipelined = stream
        .ask(sent_after(
            0,
            vec![atomic(vec![event("p", 2, "pipelined")])],
        ))
        .await;
    assert_eq!(pipelined, [STOPPED]);
    // The client has both responses, has recovered, and goes on from the stored highest.
    let recovered = stream
        .ask(sent_after(
            2,
            vec![atomic(vec![event("p", 2, "recovered")])],
        ))
        .await;
    assert_eq!(recovered, ["written"]);
    // A client cannot have received more responses than the server sent.
    let impossible = stream
        .ask(sent_after(9, vec![atomic(vec![event("q", 1, "q")])]))
        .await;
    assert_eq!(
        impossible,
        ["rejected: responses_received: is 9 but the server has sent 3 responses on this stream"]
    );
    let (events, top) = replay(&mut client, "p", 1, None, None).await;
    assert_eq!(sequence_nrs(&events), [1, 2]);
    assert_eq!(events[1].payload, Some(payload("recovered")));
    assert_eq!(top, 2);
    assert_eq!(highest(&mut client, "q").await, 0);
}

/// Without `responses_received` the server cannot tell a recovered write from a pipelined one:
/// a failed id stays stopped for the rest of the stream; other ids go on.
#[tokio::test]
async fn without_responses_received_a_failed_id_stays_stopped_on_the_stream() {
    let (_server, mut client) = p_stored_once("stream_unsaid").await;
    let mut stream = Conversation::open(&mut client).await;
    let stale = stream
        .ask(request(vec![atomic(vec![event("p", 1, "stale")])]))
        .await;
    assert_eq!(stale, [STALE_CONFLICT]);
    let later = stream
        .ask(request(vec![
            atomic(vec![event("p", 2, "later")]),
            atomic(vec![event("q", 1, "q")]),
        ]))
        .await;
    assert_eq!(later, [STOPPED, "written"]);
    // A new stream starts afresh.
    let mut fresh = Conversation::open(&mut client).await;
    let next = fresh
        .ask(request(vec![atomic(vec![event("p", 2, "next")])]))
        .await;
    assert_eq!(next, ["written"]);
}

/// The payload bytes of each of [`flood`]'s requests.
const FLOOD_PAYLOAD: usize = 64 * 1024;

/// A producer with an endless supply of requests of one [`FLOOD_PAYLOAD`] event each, of id
/// "flood", sending as fast as it may; `produced` counts the requests the client has taken.
fn flood(
    produced: &Arc<AtomicUsize>,
) -> impl futures::Stream<Item = pb::WriteEventsRequest> + use<> {
    let counter = produced.clone();
    futures::stream::iter(1..).map(move |sequence_nr: i64| {
        counter.fetch_add(1, Ordering::Relaxed);
        large("flood", sequence_nr, FLOOD_PAYLOAD)
    })
}

/// A server (`configure`d) whose inserts MongoDB holds for `millis` each, and a
/// `WriteEventsStream` on it fed by [`flood`].
struct Flooded {
    server: TestServer,
    client: proto::v1::journal_client::JournalClient<tonic::transport::Channel>,
    produced: Arc<AtomicUsize>,
    responses: tonic::Streaming<pb::WriteEventsResponse>,
}

impl Flooded {
    async fn start(app: &str, millis: i32, configure: impl FnOnce(&mut config::Settings)) -> Self {
        let server = TestServer::start_with(app, |settings| {
            settings.mongodb.uri = format!("{}&appName={app}", mongodb_uri());
            configure(settings);
        })
        .await;
        let mut client = server.journal().await;
        fail_next(
            app,
            1_000,
            "insert",
            doc! { "blockConnection": true, "blockTimeMS": millis },
        )
        .await;
        let produced = Arc::new(AtomicUsize::new(0));
        let responses = client
            .write_events_stream(flood(&produced))
            .await
            .unwrap()
            .into_inner();
        Self {
            server,
            client,
            produced,
            responses,
        }
    }
}

#[tokio::test]
async fn a_flooding_client_is_held_back_by_flow_control() {
    const APP: &str = "stream_flood";
    const UNACKNOWLEDGED: usize = 4;
    let _failpoint = failpoint_turn().await;
    // MongoDB holds every insert for 3 s: nothing is answered meanwhile.
    let flooded = Flooded::start(APP, 3_000, |settings| {
        settings.write_journal.stream_max_unacknowledged = UNACKNOWLEDGED as u32;
        // The stream stops reading for seconds at a time with a message begun: that time is
        // not the client's and must not cut the call.
        settings.server.message_idle_timeout = Duration::from_secs(1);
    })
    .await;
    let Flooded {
        server,
        mut client,
        produced,
        mut responses,
    } = flooded;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The server reads UNACKNOWLEDGED requests; then the stream's 1 MiB HTTP/2 window fills
    // (16 requests) and the client's send waits. Without flow control it would be thousands.
    let taken = produced.load(Ordering::Relaxed);
    let window = server.settings.server.http2_stream_window.as_u64() as usize / FLOOD_PAYLOAD;
    assert!(
        taken <= UNACKNOWLEDGED + window + 8,
        "the client could send {taken} requests while none was answered"
    );
    // Once MongoDB answers, everything flows, in order.
    failpoint_off().await;
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

#[tokio::test]
async fn a_stream_held_back_by_flow_control_does_not_hold_up_the_other_calls_on_its_connection() {
    const APP: &str = "stream_flood_shared_connection";
    let _failpoint = failpoint_turn().await;
    // MongoDB holds every insert for 10 s: the stream stops reading ahead, and what its client
    // goes on sending stays in HTTP/2 until then.
    let Flooded {
        server,
        client,
        produced,
        mut responses,
    } = Flooded::start(APP, 10_000, |_| {}).await;
    // Until the client can send no more: the stream's HTTP/2 window is full.
    let mut taken = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = produced.load(Ordering::Relaxed);
        if now == taken {
            break;
        }
        taken = now;
    }
    // Read ahead, then the stream's window: with the defaults, 8 requests and 1 MiB of 64 KiB.
    let settings = &server.settings;
    let window = settings.server.http2_stream_window.as_u64() as usize / FLOOD_PAYLOAD;
    let read_ahead = settings.write_journal.stream_max_unacknowledged as usize;
    assert!(
        taken >= read_ahead + window - 2,
        "the stream's window is not full: the client sent {taken} requests"
    );
    // Another call on the same connection (a clone of the client shares its channel) is
    // answered at once, not after MongoDB lets the stream's inserts go: the stream's data
    // fills its own window (server.http2-stream-window, 1 MiB), not its connection's
    // (server.http2-connection-window, 4 MiB).
    let started = std::time::Instant::now();
    let mut other = client.clone();
    let other_call = tokio::time::timeout(Duration::from_secs(4), highest(&mut other, "other"));
    let answered = other_call.await;
    let waited = started.elapsed();
    failpoint_off().await;
    assert_eq!(
        answered.unwrap_or_else(|_| panic!(
            "another call on the stream's connection waited {waited:?} for the stream"
        )),
        0
    );
    // And the stream goes on once MongoDB answers.
    for sequence_nr in 1..=taken {
        let response = tokio::time::timeout(Duration::from_secs(30), responses.message())
            .await
            .expect("responses flow again")
            .unwrap()
            .unwrap_or_else(|| panic!("a response to request {sequence_nr}"));
        assert_eq!(outcomes(&response), ["written"], "request {sequence_nr}");
    }
}

/// A request of one event of `bytes` payload bytes.
fn large(pid: &str, sequence_nr: i64, bytes: usize) -> pb::WriteEventsRequest {
    let mut large = event(pid, sequence_nr, "");
    large.payload = Some(pb::Payload {
        data: vec![1; bytes],
        serializer_id: 1,
        manifest: String::new(),
    });
    request(vec![atomic(vec![large])])
}

/// Writes events of `bytes` payload bytes, each of an id of its own, until `server` refuses
/// one for want of room in its request budget (`server.max-request-memory`), as it does once
/// another call's message holds enough of it (until the server has received that message's
/// prefix, the writes fit). Fails when that takes longer than `within`.
async fn until_the_budget_refuses(server: &TestServer, bytes: usize, within: Duration) {
    let started = std::time::Instant::now();
    let mut client = server.journal().await;
    for attempt in 1.. {
        match client
            .write_events(large(&format!("probe-{attempt}"), 1, bytes))
            .await
        {
            Err(refused) => {
                assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
                assert!(
                    refused.message().contains("server.max-request-memory"),
                    "{refused:?}"
                );
                return;
            }
            Ok(_) => assert!(
                started.elapsed() < within,
                "no message was seen holding the budget within {within:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `server.max-request-memory` of 2 MiB, with messages of at most 1 MiB, and a connection's
/// HTTP/2 window no larger than a stream's (1 MiB): a call that keeps what it does not read
/// holds up every other call on its connection, as a test of discarding needs.
fn small_budget(settings: &mut config::Settings) {
    settings.server.max_message_size = bytesize::ByteSize::mib(1);
    settings.server.max_request_memory = bytesize::ByteSize::mib(2);
    settings.server.http2_stream_window = bytesize::ByteSize::mib(1);
    settings.server.http2_connection_window = bytesize::ByteSize::mib(1);
}

#[tokio::test]
async fn an_answered_request_gives_its_bytes_back_to_the_server_budget() {
    let server = TestServer::start_with("stream_budget_release", small_budget).await;
    let mut client = server.journal().await;
    let mut stream = Conversation::open(&mut client).await;
    // Each request takes 40% of the budget while it is held: a stream that kept them after
    // their response would be refused at the third.
    for sequence_nr in 1..=10 {
        assert_eq!(
            stream.ask(large("p", sequence_nr, 800 << 10)).await,
            ["written"],
            "request {sequence_nr}"
        );
    }
}

/// Writes `pid`'s event 1 of `bytes` payload bytes in a unary call on a connection of its own;
/// the call holds its bytes of the server's budget until answered.
async fn unary_large(
    server: &TestServer,
    pid: &'static str,
    bytes: usize,
) -> JoinHandle<Vec<Outcome>> {
    let mut client = server.journal().await;
    tokio::spawn(async move { write(&mut client, large(pid, 1, bytes).writes).await })
}

/// A server with messages of at most 1 MiB and a request budget of `budget`, whose inserts
/// MongoDB holds for `millis` each.
async fn server_with_inserts_held(
    app: &str,
    budget: bytesize::ByteSize,
    millis: i32,
) -> TestServer {
    let server = TestServer::start_with(app, |settings| {
        small_budget(settings);
        settings.server.max_request_memory = budget;
        settings.mongodb.uri = format!("{}&appName={app}", mongodb_uri());
    })
    .await;
    fail_next(
        app,
        100,
        "insert",
        doc! { "blockConnection": true, "blockTimeMS": millis },
    )
    .await;
    server
}

/// Waits until MongoDB holds an insert into `server`'s journal (the `failCommand` hold of
/// `app_name`): the writes in it are still waiting for their answer.
async fn wait_for_held_insert(server: &TestServer, app_name: &str) {
    let journal = server.settings.mongodb.collections.journal.clone();
    let admin = mongodb::Client::with_uri_str(mongodb_uri())
        .await
        .unwrap()
        .database("admin");
    let held = || async {
        let pipeline = [
            doc! { "$currentOp": { "allUsers": true } },
            doc! { "$match": { "appName": app_name, "command.insert": &journal } },
        ];
        let mut operations = admin.aggregate(pipeline).await.unwrap();
        operations.next().await.is_some()
    };
    wait_until("MongoDB holds the insert", Duration::from_secs(30), held).await;
}

#[tokio::test]
async fn a_request_over_the_server_budget_ends_the_stream_after_the_ones_before_it_are_answered() {
    const APP: &str = "stream_budget_refused";
    let _failpoint = failpoint_turn().await;
    // What the server reads stays held while MongoDB holds its inserts, 8 s.
    let server = server_with_inserts_held(APP, bytesize::ByteSize::kib(1536), 8_000).await;
    // A unary write takes 900 KiB of the 1.5 MiB.
    let unary = unary_large(&server, "a", 900 << 10).await;
    wait_for_held_insert(&server, APP).await;
    // On a stream, request 1 (100 KiB) fits; request 2 (600 KiB) does not.
    let mut client = server.journal().await;
    let requests = vec![
        large("p", 1, 100 << 10),
        large("p", 2, 600 << 10),
        large("p", 3, 600 << 10),
    ];
    let mut responses = client
        .write_events_stream(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    // While the stream waits for MongoDB, the client goes on sending the refused request and
    // the next: the server discards them, and another call on the connection is not held up
    // behind them (kept, they would fill the connection's 1 MiB HTTP/2 window).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut other = client.clone();
    let other_call = tokio::time::timeout(Duration::from_secs(4), highest(&mut other, "other"));
    assert_eq!(
        other_call.await.expect("another call answered meanwhile"),
        0
    );
    let first = tokio::time::timeout(Duration::from_secs(30), responses.message())
        .await
        .expect("a response within 30 s")
        .unwrap_or_else(|status| panic!("request 1: {status:?}"))
        .expect("a response");
    assert_eq!(outcomes(&first), ["written"]);
    let refused = tokio::time::timeout(Duration::from_secs(30), responses.message())
        .await
        .expect("the stream ends within 30 s")
        .expect_err("request 2 does not fit");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("server.max-request-memory is 1.5 MiB")
            && refused.message().contains("retrying is safe"),
        "{refused:?}"
    );
    failpoint_off().await;
    assert!(unary.await.unwrap().iter().all(is_written));
    // Stored: the request answered, nothing of the refused one; it can be sent again.
    let (events, highest) = replay(&mut client, "p", 1, None, None).await;
    assert_eq!((sequence_nrs(&events), highest), (vec![1], 1));
    let mut again = Conversation::open(&mut client).await;
    assert_eq!(again.ask(large("p", 2, 600 << 10)).await, ["written"]);
}

#[tokio::test]
async fn one_stream_does_not_take_the_whole_server_budget() {
    let _failpoint = failpoint_turn().await;
    let server =
        server_with_inserts_held("stream_budget_share", bytesize::ByteSize::mib(2), 6_000).await;
    // A stream of 300 KiB requests reads ahead only while it holds less than a quarter of the
    // 2 MiB: two, 600 KiB (without that, all five: 1.5 MiB).
    let mut client = server.journal().await;
    let requests = (1..=5).map(|sequence_nr| large("p", sequence_nr, 300 << 10));
    let mut responses = client
        .write_events_stream(tokio_stream::iter(requests.collect::<Vec<_>>()))
        .await
        .unwrap()
        .into_inner();
    tokio::time::sleep(Duration::from_secs(1)).await;
    // So a unary write of 900 KiB still fits.
    let unary = unary_large(&server, "q", 900 << 10).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    failpoint_off().await;
    let unary = tokio::time::timeout(Duration::from_secs(30), unary)
        .await
        .expect("answered within 30 s")
        .expect("not refused: the stream holds at most a quarter of the budget and one request");
    assert!(unary.iter().all(is_written));
    for sequence_nr in 1..=5 {
        let response = tokio::time::timeout(Duration::from_secs(30), responses.message())
            .await
            .expect("a response within 30 s")
            .unwrap_or_else(|status| panic!("request {sequence_nr}: {status:?}"))
            .expect("a response");
        assert_eq!(outcomes(&response), ["written"], "request {sequence_nr}");
    }
}

#[tokio::test]
async fn a_client_that_stalls_inside_a_message_loses_the_call_and_its_share_of_the_budget() {
    const IDLE: Duration = Duration::from_secs(2);
    let server = TestServer::start_with("stream_budget_stall", |settings| {
        small_budget(settings);
        settings.server.max_request_memory = bytesize::ByteSize::kib(1536);
        settings.server.message_idle_timeout = IDLE;
    })
    .await;
    // A client sends the prefix of a 900 KiB request and its first KiB, then stalls.
    let (response, _send, _connection) =
        stalled_request(&server, WRITE_EVENTS, 900 << 10, 1 << 10).await;
    let stalled = std::time::Instant::now();
    // Meanwhile its 900 KiB are held: another 900 KiB request does not fit.
    until_the_budget_refuses(&server, 900 << 10, IDLE / 2).await;
    let mut client = server.journal().await;
    // After the timeout, the stalled call fails, naming the setting.
    let response = tokio::time::timeout(IDLE * 5, response)
        .await
        .expect("the stalled call ends within five times the timeout")
        .unwrap();
    assert!(
        stalled.elapsed() >= IDLE,
        "ended after {:?}",
        stalled.elapsed()
    );
    let (code, message) = grpc_status(response).await;
    assert_eq!(code, "14", "UNAVAILABLE: {message}");
    assert!(message.contains("server.message-idle-timeout"), "{message}");
    // And its share of the budget is free again.
    let written = write(&mut client, large("after", 1, 900 << 10).writes).await;
    assert!(written.iter().all(is_written), "{written:?}");
}
