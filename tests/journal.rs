//! The write journal end to end over gRPC, against the real mongod: Akka's journal TCK cases.

mod common;

use std::time::Duration;

use common::*;
use mongodb::bson::{Bson, doc};
use proto::v1 as pb;
use proto::v1::atomic_write_result::Outcome;
use tonic::Code;

/// Events 1..5 of `pid`, written as the atomic writes (1), (2), (3), (4, 5).
async fn write_five(
    client: &mut proto::v1::journal_client::JournalClient<tonic::transport::Channel>,
    pid: &str,
) {
    let outcomes = write(
        client,
        vec![
            atomic(vec![event(pid, 1, "e-1")]),
            atomic(vec![event(pid, 2, "e-2")]),
            atomic(vec![event(pid, 3, "e-3")]),
            atomic(vec![event(pid, 4, "e-4"), event(pid, 5, "e-5")]),
        ],
    )
    .await;
    assert!(outcomes.iter().all(is_written), "{outcomes:?}");
}

#[tokio::test]
async fn replay_follows_akka_semantics() {
    let server = TestServer::start("replay").await;
    let mut client = server.journal().await;
    write_five(&mut client, "p").await;

    // (from, to, max) → expected sequence numbers; every replay ends with highest = 5.
    type Case = (i64, Option<i64>, Option<i64>, &'static [i64]);
    let cases: &[Case] = &[
        (1, None, None, &[1, 2, 3, 4, 5]),
        (3, None, None, &[3, 4, 5]),
        (1, Some(3), None, &[1, 2, 3]),
        (1, None, Some(3), &[1, 2, 3]),
        (2, Some(3), None, &[2, 3]),
        (2, Some(5), Some(2), &[2, 3]),
        (2, Some(2), None, &[2]),
        (2, Some(4), Some(1), &[2]),
        (2, Some(4), Some(0), &[]),
        (3, Some(2), None, &[]),
        (0, Some(0), Some(1), &[]),
    ];
    for &(from, to, max, expected) in cases {
        let (events, highest) = replay(&mut client, "p", from, to, max).await;
        assert_eq!(
            sequence_nrs(&events),
            expected,
            "replay({from}, {to:?}, {max:?})"
        );
        assert_eq!(highest, 5, "highest of replay({from}, {to:?}, {max:?})");
    }
    let (events, highest) = replay(&mut client, "unknown", 1, None, None).await;
    assert!(events.is_empty());
    assert_eq!(highest, 0);
    assert_eq!(common::highest(&mut client, "p").await, 5);
    assert_eq!(common::highest(&mut client, "unknown").await, 0);
}

#[tokio::test]
async fn events_come_back_exactly_as_written() {
    let server = TestServer::start("roundtrip").await;
    let mut client = server.journal().await;
    let before = now_millis();
    let mut stamped = event("pid.$x\0{\"$gt\":1}", 1, "payload");
    stamped.tags = vec!["t1".into(), "$where".into(), "a.b".into()];
    stamped.metadata = Some(pb::Payload {
        data: vec![0, 255, 7],
        serializer_id: -5,
        manifest: "meta".into(),
    });
    stamped.writer_uuid = "9f3c-writer".into();
    let mut given = event("pid.$x\0{\"$gt\":1}", 2, "");
    given.timestamp_millis = 1_234_567;
    given.payload = Some(pb::Payload {
        data: vec![],
        serializer_id: 0,
        manifest: String::new(),
    });
    let outcomes = write(
        &mut client,
        vec![atomic(vec![stamped.clone(), given.clone()])],
    )
    .await;
    assert!(outcomes.iter().all(is_written), "{outcomes:?}");
    let after = now_millis();

    let (events, _) = replay(&mut client, "pid.$x\0{\"$gt\":1}", 1, None, None).await;
    assert_eq!(events.len(), 2);
    let timestamp = events[0].timestamp_millis;
    assert!(
        (before..=after).contains(&timestamp),
        "stamped {timestamp} not in {before}..={after}"
    );
    stamped.timestamp_millis = timestamp;
    assert_eq!(events[0], stamped);
    assert_eq!(events[1], given, "a timestamp given by the client is kept");
}

#[tokio::test]
async fn invalid_writes_are_rejected_without_affecting_the_others() {
    let server = TestServer::start("rejected").await;
    let mut client = server.journal().await;
    let mut no_payload = event("r", 7, "x");
    no_payload.payload = None;
    let mut bad_tag = event("r", 8, "x");
    bad_tag.tags = vec![String::new()];
    let too_large = pb::PersistentEvent {
        payload: Some(pb::Payload {
            data: vec![7; 17 << 20],
            serializer_id: 1,
            manifest: String::new(),
        }),
        ..event("r", 3, "")
    };
    let writes = vec![
        atomic(vec![event("r", 1, "ok")]),
        atomic(vec![event("", 2, "x")]),
        atomic(vec![event("r", 2, "x"), event("other", 3, "x")]),
        atomic(vec![event("r", 2, "x"), event("r", 4, "x")]),
        atomic(vec![event("r", 0, "x")]),
        atomic(vec![event("r", -1, "x")]),
        atomic(vec![]),
        atomic(vec![no_payload]),
        atomic(vec![bad_tag]),
        atomic(vec![event("r", 2, "ok"), too_large]),
        // Earlier writes of "r" failed, so this later write of "r" in the same request is not
        // stored: a persistence id never gets a later write after an earlier one failed (the
        // first failure is named).
        atomic(vec![event("r", 2, "ok")]),
        atomic(vec![event("other", 1, "ok")]),
    ];
    let outcomes = write(&mut client, writes).await;
    let reasons: Vec<String> = outcomes
        .iter()
        .map(|outcome| match outcome {
            Outcome::Written(_) => "written".to_owned(),
            Outcome::Rejected(rejected) => rejected.reason.clone(),
            Outcome::Conflict(conflict) => format!("conflict: {}", conflict.reason),
        })
        .collect();
    assert_eq!(reasons[0], "written");
    assert_eq!(reasons[1], "events[0].persistence_id: must not be empty");
    assert!(
        reasons[2].starts_with("events[1].persistence_id: is \"other\" but events[0] has \"r\""),
        "{}",
        reasons[2]
    );
    assert!(
        reasons[3].starts_with("events[1].sequence_nr: is 4 but must be 2 + 1"),
        "{}",
        reasons[3]
    );
    assert_eq!(
        reasons[4],
        "events[0].sequence_nr: must be 1 or more, got 0"
    );
    assert_eq!(
        reasons[5],
        "events[0].sequence_nr: must be 1 or more, got -1"
    );
    assert_eq!(
        reasons[6],
        "events: an atomic write needs at least one event"
    );
    assert_eq!(reasons[7], "events[0].payload: is required");
    assert_eq!(reasons[8], "events[0].tags[0]: must not be empty");
    assert!(
        reasons[9].contains("above the limit of 16777216 bytes (16 MiB)"),
        "{}",
        reasons[9]
    );
    assert!(
        reasons[9].starts_with("event 3 of persistence id \"r\""),
        "{}",
        reasons[9]
    );
    assert!(
        reasons[10].starts_with(
            "conflict: not stored: the write of sequence number(s) 2..3 of persistence id \"r\" \
             before it in this request or stream failed: events[1].persistence_id: is \"other\" \
             but events[0] has \"r\""
        ),
        "{}",
        reasons[10]
    );
    assert_eq!(reasons[11], "written", "other persistence ids go on");

    // The oversized write stored nothing, so 2 is still free for the next request.
    let retried = write(&mut client, vec![atomic(vec![event("r", 2, "ok")])]).await;
    assert!(is_written(&retried[0]), "{retried:?}");
    let (events, highest) = replay(&mut client, "r", 1, None, None).await;
    assert_eq!(sequence_nrs(&events), [1, 2]);
    assert_eq!(highest, 2);
    assert_eq!(common::highest(&mut client, "other").await, 1);
}

#[tokio::test]
async fn taken_sequence_numbers_conflict_and_identical_retries_succeed() {
    let server = TestServer::start("conflict").await;
    let mut client = server.journal().await;
    write_five(&mut client, "c").await;

    // A retry of exactly what is stored: Written, stored once.
    let retry = write(
        &mut client,
        vec![
            atomic(vec![event("c", 1, "e-1")]),
            atomic(vec![event("c", 4, "e-4"), event("c", 5, "e-5")]),
        ],
    )
    .await;
    assert!(retry.iter().all(is_written), "{retry:?}");

    let mut other_writer = event("c", 2, "e-2");
    other_writer.writer_uuid = "writer-2".into();
    let mut other_tags = event("c", 3, "e-3");
    other_tags.tags = vec!["x".into()];
    let conflicting = [
        atomic(vec![event("c", 1, "different")]),
        atomic(vec![other_writer]),
        atomic(vec![other_tags]),
        // Overlaps the stored (4, 5) with a different grouping: 6 must not be stored.
        atomic(vec![event("c", 5, "e-5"), event("c", 6, "e-6")]),
    ];
    // Each in a request of its own: in one request, the first conflict would stop the rest.
    for (index, conflicting) in conflicting.into_iter().enumerate() {
        match write(&mut client, vec![conflicting]).await.remove(0) {
            Outcome::Conflict(conflict) => {
                assert!(
                    conflict.reason.contains("already taken by other events"),
                    "{}",
                    conflict.reason
                )
            }
            other => panic!("write {index}: expected a conflict, got {other:?}"),
        }
    }
    // A stale writer's later write in the same request is not stored either, although 6 is
    // free: it would continue someone else's history.
    let stale = write(
        &mut client,
        vec![
            atomic(vec![event("c", 5, "stale")]),
            atomic(vec![event("c", 6, "stale")]),
        ],
    )
    .await;
    match &stale[1] {
        Outcome::Conflict(conflict) => assert_eq!(
            conflict.reason,
            "not stored: the write of sequence number(s) 5 of persistence id \"c\" before it in \
             this request or stream failed: sequence number(s) 5 of persistence id \"c\" are \
             already taken by other events"
        ),
        other => panic!("expected a conflict, got {other:?}"),
    }
    let outcomes = write(&mut client, vec![atomic(vec![event("c", 6, "new")])]).await;
    assert!(is_written(&outcomes[0]), "{:?}", outcomes[0]);

    let (events, highest) = replay(&mut client, "c", 1, None, None).await;
    let payloads: Vec<String> = events
        .iter()
        .map(|e| String::from_utf8(e.payload.clone().unwrap().data).unwrap())
        .collect();
    assert_eq!(payloads, ["e-1", "e-2", "e-3", "e-4", "e-5", "new"]);
    assert_eq!(highest, 6);
    let stored = server
        .mongodb()
        .await
        .collection::<mongodb::bson::Document>("journal");
    assert_eq!(
        stored.count_documents(doc! { "pid": "c" }).await.unwrap(),
        6
    );
}

#[tokio::test]
async fn concurrent_writers_racing_for_the_same_sequence_numbers_exactly_one_wins_each() {
    // Two servers on one database, two writers each sending single and two-event atomic writes
    // for the same sequence numbers at the same time.
    let first = TestServer::start("race").await;
    let second = TestServer::start_on_database(first.settings.clone()).await;
    const ROUNDS: i64 = 40;
    let racer = |server_url: String, writer: &'static str| async move {
        let channel = tonic::transport::Channel::from_shared(server_url)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = proto::v1::journal_client::JournalClient::new(channel);
        let mut wins = Vec::new();
        let mut seq_nr = 1;
        let mut round = 0;
        while seq_nr <= ROUNDS {
            // Alternate single events and pairs, so transactions race too.
            let size = if round % 2 == 0 { 1 } else { 2 };
            let events: Vec<_> = (seq_nr..seq_nr + size)
                .map(|n| pb::PersistentEvent {
                    writer_uuid: writer.into(),
                    ..event("race", n, writer)
                })
                .collect();
            let outcome = write(&mut client, vec![atomic(events)]).await.remove(0);
            match outcome {
                Outcome::Written(_) => wins.extend(seq_nr..seq_nr + size),
                Outcome::Conflict(_) => {}
                Outcome::Rejected(rejected) => panic!("unexpected rejection: {}", rejected.reason),
            }
            seq_nr += size;
            round += 1;
        }
        wins
    };
    let (wins_a, wins_b) = tokio::join!(
        tokio::spawn(racer(first.url(), "writer-a")),
        tokio::spawn(racer(second.url(), "writer-b"))
    );
    let (wins_a, wins_b) = (wins_a.unwrap(), wins_b.unwrap());
    let mut all: Vec<i64> = wins_a.iter().chain(&wins_b).copied().collect();
    all.sort();
    assert_eq!(
        all,
        (1..=ROUNDS).collect::<Vec<_>>(),
        "each sequence number won exactly once"
    );

    let mut client = first.journal().await;
    let (events, highest) = replay(&mut client, "race", 1, None, None).await;
    assert_eq!(highest, ROUNDS);
    for event in &events {
        let winner = if wins_a.contains(&event.sequence_nr) {
            "writer-a"
        } else {
            "writer-b"
        };
        assert_eq!(
            event.writer_uuid, winner,
            "event {} is the winner's",
            event.sequence_nr
        );
    }
    assert_eq!(events.len() as i64, ROUNDS);
}

#[tokio::test]
async fn delete_to_hides_events_and_keeps_the_highest_sequence_number() {
    let server = TestServer::start_with("delete", quick_purge).await;
    let mut client = server.journal().await;
    write_five(&mut client, "d").await;

    client
        .delete_events_to(pb::DeleteEventsToRequest {
            persistence_id: "d".into(),
            to_sequence_nr: 3,
        })
        .await
        .unwrap();
    let (events, highest) = replay(&mut client, "d", 1, None, None).await;
    assert_eq!(sequence_nrs(&events), [4, 5]);
    assert_eq!(highest, 5);

    let journal = server
        .mongodb()
        .await
        .collection::<mongodb::bson::Document>("journal");
    let deleted = journal
        .find_one(doc! { "pid": "d", "seqNr": 2_i64 })
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(deleted.get("deletedAt"), Some(Bson::DateTime(_))),
        "{deleted:?}"
    );
    assert!(deleted.get("ttl").is_none(), "no ttl outside cosmos mode");
    let live = journal
        .find_one(doc! { "pid": "d", "seqNr": 4_i64 })
        .await
        .unwrap()
        .unwrap();
    assert!(live.get("deletedAt").is_none());

    client
        .delete_events_to(pb::DeleteEventsToRequest {
            persistence_id: "d".into(),
            to_sequence_nr: i64::MAX,
        })
        .await
        .unwrap();
    let (events, highest) = replay(&mut client, "d", 1, None, None).await;
    assert!(events.is_empty());
    assert_eq!(highest, 5);
    assert_eq!(common::highest(&mut client, "d").await, 5);

    // Purge the deleted events with a TTL index, as an operator would.
    purge_deleted_events(&server.mongodb().await, "d", Duration::from_secs(90)).await;
    assert_eq!(
        common::highest(&mut client, "d").await,
        5,
        "highest survives the purge"
    );
    let (events, highest) = replay(&mut client, "d", 1, None, None).await;
    assert!(events.is_empty());
    assert_eq!(highest, 5);

    // The next write continues after the purged events; 5 is not reused by a restarted actor.
    let outcomes = write(
        &mut client,
        vec![atomic(vec![event("d", 6, "after purge")])],
    )
    .await;
    assert!(is_written(&outcomes[0]));
    assert_eq!(common::highest(&mut client, "d").await, 6);
}

#[tokio::test]
async fn delete_to_in_cosmos_mode_writes_a_ttl() {
    let server = TestServer::start_with("cosmos", |settings| {
        settings.mongodb.database_mode = config::DatabaseMode::Cosmos;
        settings.write_journal.cosmos_ttl = Some(Duration::from_secs(3600));
    })
    .await;
    let mut client = server.journal().await;
    write_five(&mut client, "k").await;
    client
        .delete_events_to(pb::DeleteEventsToRequest {
            persistence_id: "k".into(),
            to_sequence_nr: 2,
        })
        .await
        .unwrap();
    let journal = server
        .mongodb()
        .await
        .collection::<mongodb::bson::Document>("journal");
    let deleted = journal
        .find_one(doc! { "pid": "k", "seqNr": 1_i64 })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(deleted.get("ttl"), Some(&Bson::Int32(3600)));
    let live = journal
        .find_one(doc! { "pid": "k", "seqNr": 3_i64 })
        .await
        .unwrap()
        .unwrap();
    assert!(live.get("ttl").is_none());
}

#[tokio::test]
async fn bad_requests_get_invalid_argument_naming_the_field() {
    let server = TestServer::start("invalid").await;
    let mut client = server.journal().await;
    let status = client
        .delete_events_to(pb::DeleteEventsToRequest {
            persistence_id: "x".into(),
            to_sequence_nr: -1,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        status.message(),
        "to_sequence_nr: must not be negative, got -1"
    );

    let status = client
        .read_highest_sequence_nr(pb::ReadHighestSequenceNrRequest {
            persistence_id: String::new(),
            from_sequence_nr: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(status.message(), "persistence_id: must not be empty");

    for (request, message) in [
        (
            pb::ReplayEventsRequest {
                persistence_id: "x".into(),
                from_sequence_nr: 1,
                to_sequence_nr: None,
                max: Some(-1),
            },
            "max: must not be negative, got -1",
        ),
        (
            pb::ReplayEventsRequest {
                persistence_id: "x".into(),
                from_sequence_nr: -3,
                to_sequence_nr: None,
                max: None,
            },
            "from_sequence_nr: must not be negative, got -3",
        ),
        (
            pb::ReplayEventsRequest {
                persistence_id: "x".repeat(513),
                from_sequence_nr: 1,
                to_sequence_nr: None,
                max: None,
            },
            "persistence_id: is 513 bytes long, more than the limit of 512",
        ),
    ] {
        let status = client.replay_events(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), message);
    }
}

#[tokio::test]
async fn indexes_are_created_on_start_up() {
    let server = TestServer::start("indexes").await;
    let journal = server
        .mongodb()
        .await
        .collection::<mongodb::bson::Document>("journal");
    let names = journal.list_index_names().await.unwrap();
    for expected in ["pid_seqNr", "tags_writtenAt", "slice_writtenAt"] {
        assert!(
            names.contains(&expected.to_owned()),
            "{expected} missing from {names:?}"
        );
    }
    let mut indexes = journal.list_indexes().await.unwrap();
    use futures::TryStreamExt;
    let mut unique = false;
    while let Some(index) = indexes.try_next().await.unwrap() {
        if index.options.as_ref().and_then(|o| o.name.as_deref()) == Some("pid_seqNr") {
            unique = index.options.and_then(|o| o.unique) == Some(true);
        }
    }
    assert!(unique, "pid_seqNr must be unique");

    let without = TestServer::start_with("noindexes", |settings| {
        settings.mongodb.create_indexes = false
    })
    .await;
    let journal = without
        .mongodb()
        .await
        .collection::<mongodb::bson::Document>("journal");
    let names = journal.list_index_names().await.unwrap_or_default();
    assert!(
        !names.contains(&"pid_seqNr".to_owned()),
        "create-indexes = false created {names:?}"
    );
}

#[tokio::test]
async fn graceful_shutdown_returns_cleanly() {
    let server = TestServer::start("shutdown").await;
    let mut client = server.journal().await;
    write_five(&mut client, "s").await;
    server.stop().await.expect("server stopped with an error");
}

#[tokio::test]
async fn unreachable_mongodb_at_start_is_a_clear_error() {
    let closed_port = free_port();
    let mut settings = test_settings("unreachable");
    settings.mongodb.uri = format!("mongodb://127.0.0.1:{closed_port}/?directConnection=true");
    settings.mongodb.server_selection_timeout = Duration::from_millis(300);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let error = eventjournal::run(
        settings,
        listener,
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .unwrap_err();
    let message = format!("{error:#}");
    assert!(
        message.starts_with(&format!(
            "cannot reach MongoDB at mongodb://127.0.0.1:{closed_port}"
        )),
        "{message}"
    );
}

fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Writes events 1..=`count` of `pid`, each with a payload of `bytes`, one AtomicWrite each.
async fn write_big_events(
    client: &mut proto::v1::journal_client::JournalClient<tonic::transport::Channel>,
    pid: &str,
    count: i64,
    bytes: usize,
) {
    let big = |n: i64| {
        let mut event = event(pid, n, "");
        event.payload = Some(pb::Payload {
            data: vec![n as u8; bytes],
            serializer_id: 1,
            manifest: String::new(),
        });
        atomic(vec![event])
    };
    let results = write(client, (1..=count).map(big).collect()).await;
    assert!(results.iter().all(is_written), "{results:?}");
}

#[tokio::test]
async fn shutdown_lets_in_flight_replays_finish() {
    const EVENTS: i64 = 200;
    let server = TestServer::start("inflight").await;
    let database = server.database.clone();
    let mongodb = server.mongodb().await;
    let mut client = server.journal().await;
    // 200 events of 64 KiB: far more than the stream buffers and one cursor batch hold.
    write_big_events(&mut client, "f", EVENTS, 64 * 1024).await;

    let request = pb::ReplayEventsRequest {
        persistence_id: "f".into(),
        from_sequence_nr: 1,
        to_sequence_nr: None,
        max: None,
    };
    let mut stream = client.replay_events(request).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    // The replay is really in flight: its cursor is open on MongoDB, with events to fetch.
    let open_cursors = mongodb
        .client()
        .database("admin")
        .aggregate(vec![
            doc! { "$currentOp": { "idleCursors": true, "allUsers": true } },
            doc! { "$match": { "type": "idleCursor", "ns": format!("{database}.journal") } },
        ])
        .await
        .unwrap();
    use futures::TryStreamExt;
    let open_cursors: Vec<mongodb::bson::Document> = open_cursors.try_collect().await.unwrap();
    assert!(
        !open_cursors.is_empty(),
        "the replay's cursor is not open at stop()"
    );

    let stopping = tokio::spawn(server.stop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut received = 1;
    let mut highest = None;
    while let Some(message) = stream
        .message()
        .await
        .expect("the in-flight replay was cut off")
    {
        match message.item.unwrap() {
            pb::replay_events_response::Item::Event(event) => {
                received += 1;
                assert_eq!(event.sequence_nr, received, "in order");
            }
            pb::replay_events_response::Item::HighestSequenceNr(value) => highest = Some(value),
        }
    }
    assert!(matches!(
        first.item,
        Some(pb::replay_events_response::Item::Event(_))
    ));
    assert_eq!(received, EVENTS);
    assert_eq!(highest, Some(EVENTS));
    stopping
        .await
        .unwrap()
        .expect("server stopped with an error");
}

/// A client slower than the server: when the server stops, the last part of a long replay is
/// still in the server's socket buffer while the client reads and acknowledges (HTTP/2 window
/// updates) what came before. Closing a socket with unread input, or receiving input after
/// closing it, makes the kernel reset the connection and drop the unsent tail, so the server
/// must keep reading until the client closes. Driven with a raw HTTP/2 client to control its
/// receive buffer and flow-control window.
#[tokio::test]
async fn a_slow_reader_gets_the_whole_replay_across_shutdown() {
    use prost::Message;
    const EVENTS: i64 = 200;
    const EVENT_BYTES: usize = 64 * 1024;
    let server = TestServer::start("slowreader").await;
    let mut client = server.journal().await;
    write_big_events(&mut client, "s", EVENTS, EVENT_BYTES).await;

    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(64 * 1024).unwrap();
    let io = socket.connect(server.address).await.unwrap();
    let (mut h2, connection) = h2::client::Builder::new()
        .initial_window_size(1 << 20)
        .initial_connection_window_size(1 << 20)
        .handshake::<_, bytes::Bytes>(io)
        .await
        .unwrap();
    let mut connection = Box::pin(connection);
    let request = raw_grpc_request(server.address, "eventjournal.v1.Journal/ReplayEvents");
    let (response, mut send) = h2.send_request(request, false).unwrap();
    let message = pb::ReplayEventsRequest {
        persistence_id: "s".into(),
        from_sequence_nr: 1,
        to_sequence_nr: None,
        max: None,
    }
    .encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend((message.len() as u32).to_be_bytes());
    frame.extend(message);
    send.send_data(frame.into(), true).unwrap();
    let response = tokio::select! {
        response = response => response.unwrap(),
        _ = &mut connection => panic!("connection closed before the response"),
    };
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let first = tokio::select! {
        chunk = body.data() => chunk.unwrap().unwrap(),
        _ = &mut connection => panic!("connection closed before the first event"),
    };
    body.flow_control().release_capacity(first.len()).unwrap();

    let stopping = tokio::spawn(server.stop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    tokio::spawn(connection);
    let mut received = first.to_vec();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap_or_else(|error| {
            panic!(
                "the replay was cut off after {} of about {} bytes: {error}",
                received.len(),
                EVENTS as usize * EVENT_BYTES
            )
        });
        body.flow_control().release_capacity(chunk.len()).unwrap();
        received.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await.unwrap().expect("trailers");
    assert_eq!(trailers.get("grpc-status").unwrap(), "0", "{trailers:?}");
    let mut events = 0;
    let mut highest = None;
    let mut rest = &received[..];
    while !rest.is_empty() {
        let length = u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
        let message = pb::ReplayEventsResponse::decode(&rest[5..5 + length]).unwrap();
        rest = &rest[5 + length..];
        match message.item.unwrap() {
            pb::replay_events_response::Item::Event(event) => {
                events += 1;
                assert_eq!(event.sequence_nr, events, "in order");
            }
            pb::replay_events_response::Item::HighestSequenceNr(value) => highest = Some(value),
        }
    }
    assert_eq!(events, EVENTS);
    assert_eq!(highest, Some(EVENTS));
    stopping
        .await
        .unwrap()
        .expect("server stopped with an error");
}

#[tokio::test]
async fn writes_bypass_a_validator_when_configured() {
    // A validator added by someone else that rejects every document the service writes.
    let database = unique_database("bypass");
    let mongodb = mongodb::Client::with_uri_str(mongodb_uri())
        .await
        .unwrap()
        .database(&database);
    for collection in ["journal", "journal_metadata", "snapshots", "durable_state"] {
        mongodb
            .create_collection(collection)
            .validator(doc! { "$jsonSchema": { "required": ["notOurs"] } })
            .await
            .unwrap();
    }
    let mut settings = test_settings(&database);
    settings.mongodb.bypass_document_validation = true;
    let bypassing = TestServer::start_on_database(settings.clone()).await;
    let mut client = bypassing.journal().await;
    assert!(is_written(
        &write(&mut client, vec![atomic(vec![event("v", 1, "a")])]).await[0]
    ));
    client
        .delete_events_to(pb::DeleteEventsToRequest {
            persistence_id: "v".into(),
            to_sequence_nr: 1,
        })
        .await
        .unwrap();
    assert_eq!(highest(&mut client, "v").await, 1);
    proto::v1::snapshot_store_client::SnapshotStoreClient::new(bypassing.channel().await)
        .save_snapshot(pb::SaveSnapshotRequest {
            metadata: Some(pb::SnapshotMetadata {
                persistence_id: "v".into(),
                sequence_nr: 1,
                timestamp_millis: 0,
                metadata: None,
            }),
            snapshot: Some(payload("s")),
        })
        .await
        .unwrap();
    proto::v1::durable_state_store_client::DurableStateStoreClient::new(bypassing.channel().await)
        .upsert_object(pb::UpsertObjectRequest {
            persistence_id: "v".into(),
            revision: 1,
            value: Some(payload("o")),
            tag: String::new(),
        })
        .await
        .unwrap();

    // The same validator does reject a server that does not bypass it.
    settings.mongodb.bypass_document_validation = false;
    let validated = TestServer::start_on_database(settings).await;
    let mut client = validated.journal().await;
    let rejected = client
        .write_events(pb::WriteEventsRequest {
            writes: vec![atomic(vec![event("v", 2, "b")])],
            ..Default::default()
        })
        .await;
    // Refused by MongoDB: that one write is Rejected, naming the validation.
    match rejected.unwrap().into_inner().results[0]
        .outcome
        .as_ref()
        .unwrap()
    {
        Outcome::Rejected(rejected) => assert_eq!(
            rejected.reason,
            "MongoDB refused event 2 of persistence id \"v\": Document failed validation (code 121)"
        ),
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert_eq!(highest(&mut client, "v").await, 1, "nothing stored");
}
