//! Every row of docs/BAD_INPUT.md, run against a real server: the status (or per-write
//! outcome) each bad input gets, and that nothing stored changes. A test also checks that the
//! document and this list name the same cases.

mod common;

use std::collections::BTreeSet;

use common::*;
use futures::future::BoxFuture;
use proto::v1 as pb;
use proto::v1::atomic_write_result::Outcome;
use proto::v1::durable_state_store_client::DurableStateStoreClient;
use proto::v1::journal_client::JournalClient;
use proto::v1::read_journal_client::ReadJournalClient;
use proto::v1::snapshot_store_client::SnapshotStoreClient;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// What a call came back with.
#[derive(Debug)]
enum Got {
    Status(Status),
    Rejected(String),
    Conflict(String),
    /// Success, with the number of items a stream or read returned.
    Items(usize),
}

/// What a case expects: a status code and a fragment of its message, a per-write outcome,
/// or success with a number of items.
#[derive(Debug, Clone, Copy)]
enum Expect {
    Status(Code, &'static str),
    Rejected(&'static str),
    Conflict(&'static str),
    Items(usize),
}

#[derive(Clone)]
struct Clients {
    journal: JournalClient<Channel>,
    snapshots: SnapshotStoreClient<Channel>,
    state: DurableStateStoreClient<Channel>,
    queries: ReadJournalClient<Channel>,
}

type Run = fn(Clients) -> BoxFuture<'static, Got>;

struct Case {
    id: &'static str,
    expect: Expect,
    run: Run,
}

fn long(bytes: usize) -> String {
    "x".repeat(bytes)
}

async fn write_one(mut clients: Clients, events: Vec<pb::PersistentEvent>) -> Got {
    match clients
        .journal
        .write_events(pb::WriteEventsRequest {
            writes: vec![atomic(events)],
            ..Default::default()
        })
        .await
    {
        Err(status) => Got::Status(status),
        Ok(response) => match response.into_inner().results[0].outcome.clone().unwrap() {
            Outcome::Written(_) => Got::Items(1),
            Outcome::Rejected(rejected) => Got::Rejected(rejected.reason),
            Outcome::Conflict(conflict) => Got::Conflict(conflict.reason),
        },
    }
}

/// A valid write of `w`, sent with `eventjournal-producer-group: group`.
async fn write_with_group(mut clients: Clients, group: &str) -> Got {
    let mut request = tonic::Request::new(pb::WriteEventsRequest {
        writes: vec![atomic(vec![event("w", 1, "e")])],
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert(proto::PRODUCER_GROUP_METADATA, group.parse().unwrap());
    unary(clients.journal.write_events(request).await)
}

/// The outcome of the second of two atomic writes sent in one request.
async fn second_of_two(
    mut clients: Clients,
    first: Vec<pb::PersistentEvent>,
    second: Vec<pb::PersistentEvent>,
) -> Got {
    match clients
        .journal
        .write_events(pb::WriteEventsRequest {
            writes: vec![atomic(first), atomic(second)],
            ..Default::default()
        })
        .await
    {
        Err(status) => Got::Status(status),
        Ok(response) => match response.into_inner().results[1].outcome.clone().unwrap() {
            Outcome::Written(_) => Got::Items(1),
            Outcome::Rejected(rejected) => Got::Rejected(rejected.reason),
            Outcome::Conflict(conflict) => Got::Conflict(conflict.reason),
        },
    }
}

fn unary<T>(result: Result<tonic::Response<T>, Status>) -> Got {
    match result {
        Ok(_) => Got::Items(1),
        Err(status) => Got::Status(status),
    }
}

/// Items of a finite stream, or its error.
async fn drain<T>(result: Result<tonic::Response<tonic::Streaming<T>>, Status>) -> Got {
    let mut stream = match result {
        Ok(response) => response.into_inner(),
        Err(status) => return Got::Status(status),
    };
    let mut items = 0;
    loop {
        match stream.message().await {
            Ok(Some(_)) => items += 1,
            Ok(None) => return Got::Items(items),
            Err(status) => return Got::Status(status),
        }
    }
}

/// The first answer of a live stream: an error, or (after a short wait) none.
async fn first_of_live<T>(result: Result<tonic::Response<tonic::Streaming<T>>, Status>) -> Got {
    let mut stream = match result {
        Ok(response) => response.into_inner(),
        Err(status) => return Got::Status(status),
    };
    match tokio::time::timeout(std::time::Duration::from_millis(300), stream.message()).await {
        Ok(Err(status)) => Got::Status(status),
        Ok(Ok(Some(_))) => Got::Items(1),
        _ => Got::Items(0),
    }
}

fn replay_request(from: i64, to: Option<i64>, max: Option<i64>) -> pb::ReplayEventsRequest {
    pb::ReplayEventsRequest {
        persistence_id: "stored".into(),
        from_sequence_nr: from,
        to_sequence_nr: to,
        max,
    }
}

fn snapshot(pid: &str, sequence_nr: i64, bytes: usize) -> pb::SaveSnapshotRequest {
    pb::SaveSnapshotRequest {
        metadata: Some(pb::SnapshotMetadata {
            persistence_id: pid.into(),
            sequence_nr,
            timestamp_millis: 0,
            metadata: None,
        }),
        snapshot: Some(pb::Payload {
            data: vec![7; bytes],
            serializer_id: 1,
            manifest: "m".into(),
        }),
    }
}

fn criteria(min: i64, max: Option<i64>) -> pb::SnapshotSelectionCriteria {
    pb::SnapshotSelectionCriteria {
        max_sequence_nr: max,
        max_timestamp_millis: None,
        min_sequence_nr: min,
        min_timestamp_millis: 0,
    }
}

fn upsert(pid: &str, revision: i64) -> pb::UpsertObjectRequest {
    pb::UpsertObjectRequest {
        persistence_id: pid.into(),
        revision,
        value: Some(payload("v")),
        tag: String::new(),
    }
}

fn by_tag(tag: &str, offset: &str) -> pb::EventsByTagRequest {
    pb::EventsByTagRequest {
        tag: tag.into(),
        offset: offset.into(),
    }
}

fn slices(min_slice: i32, max_slice: i32) -> pb::EventsBySlicesRequest {
    pb::EventsBySlicesRequest {
        min_slice,
        max_slice,
        offset: String::new(),
    }
}

/// Writes `pid` 1 with `tag`, then reads it back by replay and by tag; Items(2) when both
/// return it byte for byte.
async fn round_trip(mut clients: Clients, pid: &str, tag: &str) -> Got {
    let mut written = event(pid, 1, pid);
    written.tags = vec![tag.to_owned()];
    written.payload.as_mut().unwrap().manifest = pid.to_owned();
    if let Got::Rejected(reason) = write_one(clients.clone(), vec![written.clone()]).await {
        return Got::Rejected(reason);
    }
    let (events, _) = replay(&mut clients.journal, pid, 1, None, None).await;
    let replayed = events.len() == 1
        && events[0].persistence_id == pid
        && events[0].tags == [tag]
        && events[0].payload == written.payload;
    // Current queries end `allowed-time-drift` before now: wait until the event is inside.
    let mut tagged = 0;
    for _ in 0..50 {
        let stream = clients.queries.current_events_by_tag(by_tag(tag, "")).await;
        if let Got::Items(found) = drain(stream).await
            && found > 0
        {
            tagged = found;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Got::Items(usize::from(replayed) + tagged)
}

macro_rules! case {
    ($id:literal, $expect:expr, |$clients:ident| $body:block) => {
        Case {
            id: $id,
            expect: $expect,
            run: |$clients| Box::pin(async move $body),
        }
    };
}

fn cases() -> Vec<Case> {
    use Code::{Aborted, InvalidArgument, OutOfRange};
    use Expect::*;
    vec![
        case!(
            "write-empty-pid",
            Rejected("events[0].persistence_id: must not be empty"),
            |c| { write_one(c, vec![event("", 1, "e")]).await }
        ),
        case!(
            "write-long-pid",
            Rejected("events[0].persistence_id: is 513 bytes long, more than the limit of 512"),
            |c| { write_one(c, vec![event(&long(513), 1, "e")]).await }
        ),
        case!(
            "write-seq-zero",
            Rejected("events[0].sequence_nr: must be 1 or more, got 0"),
            |c| { write_one(c, vec![event("w", 0, "e")]).await }
        ),
        case!(
            "write-seq-negative",
            Rejected("events[0].sequence_nr: must be 1 or more, got -5"),
            |c| { write_one(c, vec![event("w", -5, "e")]).await }
        ),
        case!(
            "write-seq-gap",
            Rejected("events[1].sequence_nr: is 3 but must be 1 + 1"),
            |c| { write_one(c, vec![event("w", 1, "a"), event("w", 3, "b")]).await }
        ),
        case!(
            "write-seq-backwards",
            Rejected("events[1].sequence_nr: is 1 but must be 2 + 1"),
            |c| { write_one(c, vec![event("w", 2, "a"), event("w", 1, "b")]).await }
        ),
        case!(
            "write-mixed-pids",
            Rejected("an atomic write is for one persistence id"),
            |c| { write_one(c, vec![event("w", 1, "a"), event("v", 2, "b")]).await }
        ),
        case!(
            "write-bad-producer-group",
            Status(
                InvalidArgument,
                "eventjournal-producer-group (metadata): is \"not-hex\", expected 1 to 16 hex digits"
            ),
            |c| { write_with_group(c, "not-hex").await }
        ),
        case!(
            "write-no-events",
            Rejected("events: an atomic write needs at least one event"),
            |c| { write_one(c, vec![]).await }
        ),
        case!(
            "write-no-payload",
            Rejected("events[0].payload: is required"),
            |c| {
                let mut bare = event("w", 1, "e");
                bare.payload = None;
                write_one(c, vec![bare]).await
            }
        ),
        case!(
            "write-empty-tag",
            Rejected("events[0].tags[0]: must not be empty"),
            |c| {
                let mut tagged = event("w", 1, "e");
                tagged.tags = vec![String::new()];
                write_one(c, vec![tagged]).await
            }
        ),
        case!(
            "write-long-tag",
            Rejected("events[0].tags[0]: is 513 bytes long, more than the limit of 512"),
            |c| {
                let mut tagged = event("w", 1, "e");
                tagged.tags = vec![long(513)];
                write_one(c, vec![tagged]).await
            }
        ),
        case!(
            "write-too-many-tags",
            Rejected("events[0].tags: has 257 tags, more than the limit of 256"),
            |c| {
                let mut tagged = event("w", 1, "e");
                tagged.tags = (0..257).map(|tag| tag.to_string()).collect();
                write_one(c, vec![tagged]).await
            }
        ),
        case!(
            "write-long-writer-uuid",
            Rejected("events[0].writer_uuid: is 513 bytes long, more than the limit of 512"),
            |c| {
                let mut odd = event("w", 1, "e");
                odd.writer_uuid = long(513);
                write_one(c, vec![odd]).await
            }
        ),
        case!(
            "write-over-16-mib",
            Rejected("above the limit of 16777216 bytes (16 MiB)"),
            |c| {
                let mut huge = event("w", 1, "e");
                huge.payload.as_mut().unwrap().data = vec![0; 17 << 20];
                write_one(c, vec![huge]).await
            }
        ),
        case!(
            "write-over-message-limit",
            Status(OutOfRange, "decoded message length too large"),
            |c| {
                let mut huge = event("w", 1, "e");
                huge.payload.as_mut().unwrap().data = vec![0; 33 << 20];
                write_one(c, vec![huge]).await
            }
        ),
        case!(
            "write-taken-sequence-nr",
            Conflict("sequence number(s) 1 of persistence id \"stored\" are already taken"),
            |c| { write_one(c, vec![event("stored", 1, "another")]).await }
        ),
        case!(
            "write-leaves-gap",
            Conflict(
                "sequence number 3 of persistence id \"stored\" does not follow its highest \
                 stored sequence number 1: the next write must start at 2"
            ),
            |c| { write_one(c, vec![event("stored", 3, "skipping 2")]).await }
        ),
        case!(
            "write-after-failed-write",
            Conflict(
                "not stored: the write of sequence number(s) 1 of persistence id \"stored\" \
                 before it in this request or stream failed"
            ),
            |c| {
                second_of_two(
                    c,
                    vec![event("stored", 1, "another")],
                    vec![event("stored", 2, "next")],
                )
                .await
            }
        ),
        case!(
            "delete-to-negative",
            Status(
                InvalidArgument,
                "to_sequence_nr: must not be negative, got -1"
            ),
            |c| {
                let mut journal = c.journal;
                unary(
                    journal
                        .delete_events_to(pb::DeleteEventsToRequest {
                            persistence_id: "stored".into(),
                            to_sequence_nr: -1,
                        })
                        .await,
                )
            }
        ),
        case!(
            "highest-empty-pid",
            Status(InvalidArgument, "persistence_id: must not be empty"),
            |c| {
                let mut journal = c.journal;
                unary(
                    journal
                        .read_highest_sequence_nr(pb::ReadHighestSequenceNrRequest {
                            persistence_id: String::new(),
                            from_sequence_nr: 0,
                        })
                        .await,
                )
            }
        ),
        case!(
            "replay-negative-from",
            Status(InvalidArgument, "from_sequence_nr: must not be negative"),
            |c| {
                let mut journal = c.journal;
                drain(journal.replay_events(replay_request(-1, None, None)).await).await
            }
        ),
        case!(
            "replay-negative-max",
            Status(InvalidArgument, "max: must not be negative"),
            |c| {
                let mut journal = c.journal;
                drain(
                    journal
                        .replay_events(replay_request(1, None, Some(-1)))
                        .await,
                )
                .await
            }
        ),
        case!("replay-inverted-range", Items(1), |c| {
            // Nothing between 5 and 2: only the highest sequence number comes back.
            let mut journal = c.journal;
            drain(
                journal
                    .replay_events(replay_request(5, Some(2), None))
                    .await,
            )
            .await
        }),
        case!(
            "snapshot-no-metadata",
            Status(InvalidArgument, "metadata: is required"),
            |c| {
                let mut snapshots = c.snapshots;
                let mut request = snapshot("s", 1, 1);
                request.metadata = None;
                unary(snapshots.save_snapshot(request).await)
            }
        ),
        case!(
            "snapshot-negative-seq",
            Status(
                InvalidArgument,
                "metadata.sequence_nr: must not be negative"
            ),
            |c| {
                let mut snapshots = c.snapshots;
                unary(snapshots.save_snapshot(snapshot("s", -1, 1)).await)
            }
        ),
        case!(
            "snapshot-over-16-mib",
            Status(
                InvalidArgument,
                "above the limit of 16777216 bytes (16 MiB)"
            ),
            |c| {
                let mut snapshots = c.snapshots;
                unary(
                    snapshots
                        .save_snapshot(snapshot("stored", 1, 17 << 20))
                        .await,
                )
            }
        ),
        case!(
            "snapshot-negative-criteria",
            Status(
                InvalidArgument,
                "criteria.min_sequence_nr: must not be negative"
            ),
            |c| {
                let mut snapshots = c.snapshots;
                unary(
                    snapshots
                        .load_snapshot(pb::LoadSnapshotRequest {
                            persistence_id: "stored".into(),
                            criteria: Some(criteria(-1, None)),
                            to_sequence_nr: None,
                        })
                        .await,
                )
            }
        ),
        case!("snapshot-inverted-criteria", Items(0), |c| {
            let mut snapshots = c.snapshots;
            let loaded = snapshots
                .load_snapshot(pb::LoadSnapshotRequest {
                    persistence_id: "stored".into(),
                    criteria: Some(criteria(5, Some(2))),
                    to_sequence_nr: None,
                })
                .await;
            match loaded {
                Ok(response) => Got::Items(usize::from(response.into_inner().snapshot.is_some())),
                Err(status) => Got::Status(status),
            }
        }),
        case!(
            "upsert-revision-zero",
            Status(
                InvalidArgument,
                "revision: must be 1 or more (the stored revision + 1), got 0"
            ),
            |c| {
                let mut state = c.state;
                unary(state.upsert_object(upsert("o", 0)).await)
            }
        ),
        case!(
            "upsert-negative-revision",
            Status(
                InvalidArgument,
                "revision: must be 1 or more (the stored revision + 1), got -3"
            ),
            |c| {
                let mut state = c.state;
                unary(state.upsert_object(upsert("o", -3)).await)
            }
        ),
        case!(
            "upsert-stale-revision",
            Status(
                Aborted,
                "does not follow the stored revision 1: use revision 2"
            ),
            |c| {
                let mut state = c.state;
                // Different content: the stored value itself would be a successful retry.
                let mut request = upsert("stored", 1);
                request.value = Some(payload("another value"));
                unary(state.upsert_object(request).await)
            }
        ),
        case!(
            "upsert-no-value",
            Status(InvalidArgument, "value: is required"),
            |c| {
                let mut state = c.state;
                let mut request = upsert("o", 1);
                request.value = None;
                unary(state.upsert_object(request).await)
            }
        ),
        case!(
            "get-empty-pid",
            Status(InvalidArgument, "persistence_id: must not be empty"),
            |c| {
                let mut state = c.state;
                unary(
                    state
                        .get_object(pb::GetObjectRequest {
                            persistence_id: String::new(),
                        })
                        .await,
                )
            }
        ),
        case!(
            "delete-object-negative-revision",
            Status(InvalidArgument, "revision: must not be negative"),
            |c| {
                let mut state = c.state;
                unary(
                    state
                        .delete_object(pb::DeleteObjectRequest {
                            persistence_id: "stored".into(),
                            revision: -1,
                        })
                        .await,
                )
            }
        ),
        case!(
            "query-malformed-offset",
            Status(InvalidArgument, "offset: "),
            |c| {
                let mut queries = c.queries;
                drain(
                    queries
                        .current_events_by_tag(by_tag("t", "not-an-offset"))
                        .await,
                )
                .await
            }
        ),
        case!(
            "query-offset-garbage-base64",
            Status(InvalidArgument, "offset: "),
            |c| {
                let mut queries = c.queries;
                drain(queries.current_events_by_tag(by_tag("t", "p1.$$$$")).await).await
            }
        ),
        case!(
            "query-empty-tag",
            Status(InvalidArgument, "tag: must not be empty"),
            |c| {
                let mut queries = c.queries;
                first_of_live(queries.events_by_tag(by_tag("", "")).await).await
            }
        ),
        case!("query-unknown-tag", Items(0), |c| {
            let mut queries = c.queries;
            drain(
                queries
                    .current_events_by_tag(by_tag("no-such-tag", ""))
                    .await,
            )
            .await
        }),
        case!(
            "query-slice-above-1023",
            Status(InvalidArgument, "max_slice: must be 0 to 1023, got 1024"),
            |c| {
                let mut queries = c.queries;
                drain(queries.current_events_by_slices(slices(0, 1024)).await).await
            }
        ),
        case!(
            "query-slice-negative",
            Status(InvalidArgument, "min_slice: must be 0 to 1023, got -1"),
            |c| {
                let mut queries = c.queries;
                drain(queries.current_events_by_slices(slices(-1, 3)).await).await
            }
        ),
        case!(
            "query-slices-inverted",
            Status(
                InvalidArgument,
                "max_slice: must not be below min_slice (9), got 3"
            ),
            |c| {
                let mut queries = c.queries;
                drain(queries.current_events_by_slices(slices(9, 3)).await).await
            }
        ),
        case!(
            "query-negative-limit",
            Status(InvalidArgument, "limit: must not be negative"),
            |c| {
                let mut queries = c.queries;
                drain(
                    queries
                        .current_persistence_ids(pb::CurrentPersistenceIdsRequest {
                            after_id: String::new(),
                            limit: Some(-1),
                        })
                        .await,
                )
                .await
            }
        ),
        case!(
            "query-by-pid-negative-from",
            Status(InvalidArgument, "from_sequence_nr: must not be negative"),
            |c| {
                let mut queries = c.queries;
                drain(
                    queries
                        .current_events_by_persistence_id(pb::EventsByPersistenceIdRequest {
                            persistence_id: "stored".into(),
                            from_sequence_nr: -1,
                            to_sequence_nr: None,
                        })
                        .await,
                )
                .await
            }
        ),
        case!("verbatim-dollar-and-dot", Items(2), |c| {
            round_trip(c, "$where.a.b", "$in.x").await
        }),
        case!("verbatim-operator-syntax", Items(2), |c| {
            round_trip(c, "{\"$gt\": \"\"}", "{\"$ne\": null}").await
        }),
        case!("verbatim-nul", Items(2), |c| {
            round_trip(c, "nul\0inside", "tag\0nul").await
        }),
        case!("verbatim-unicode", Items(2), |c| {
            round_trip(c, "größe-😀", "タグ").await
        }),
    ]
}

fn outcome_matches(got: &Got, expect: Expect) -> bool {
    match (got, expect) {
        (Got::Status(status), Expect::Status(code, fragment)) => {
            status.code() == code && status.message().contains(fragment)
        }
        (Got::Rejected(reason), Expect::Rejected(fragment)) => reason.contains(fragment),
        (Got::Conflict(reason), Expect::Conflict(fragment)) => reason.contains(fragment),
        (Got::Items(items), Expect::Items(expected)) => *items == expected,
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_bad_input_gets_its_documented_answer_and_changes_nothing() {
    let server = TestServer::start_with("bad_input", common::read::fast).await;
    let channel = server.channel().await;
    let clients = Clients {
        journal: server.journal().await,
        snapshots: SnapshotStoreClient::new(channel.clone()).max_encoding_message_size(64 << 20),
        state: DurableStateStoreClient::new(channel.clone()),
        queries: ReadJournalClient::new(channel),
    };
    // What must survive every case unchanged.
    let mut setup = clients.clone();
    assert!(is_written(
        &write(
            &mut setup.journal,
            vec![atomic(vec![event("stored", 1, "original")])]
        )
        .await[0]
    ));
    setup
        .snapshots
        .save_snapshot(snapshot("stored", 1, 10))
        .await
        .unwrap();
    setup
        .state
        .upsert_object(upsert("stored", 1))
        .await
        .unwrap();
    let database = server.mongodb().await;
    let before = stored(&database).await;

    let mut failures = Vec::new();
    for case in cases() {
        let got = (case.run)(clients.clone()).await;
        if !outcome_matches(&got, case.expect) {
            failures.push(format!(
                "{}: expected {:?}, got {got:?}",
                case.id, case.expect
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    let after = stored(&database).await;
    for (collection, documents) in &before {
        let now: Vec<_> = after[collection]
            .iter()
            .filter(|document| document.get_str("pid").or(document.get_str("_id")) == Ok("stored"))
            .collect();
        let then: Vec<_> = documents
            .iter()
            .filter(|document| document.get_str("pid").or(document.get_str("_id")) == Ok("stored"))
            .collect();
        assert_eq!(now, then, "{collection}: stored documents changed");
    }
    // The server is still up and answering.
    assert_eq!(highest(&mut setup.journal, "stored").await, 1);
}

async fn stored(
    database: &mongodb::Database,
) -> std::collections::BTreeMap<String, Vec<mongodb::bson::Document>> {
    use futures::TryStreamExt;
    let mut all = std::collections::BTreeMap::new();
    for collection in ["journal", "snapshots", "durable_state"] {
        let documents = database
            .collection::<mongodb::bson::Document>(collection)
            .find(mongodb::bson::doc! {})
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        all.insert(collection.to_owned(), documents);
    }
    all
}

#[test]
fn the_document_lists_exactly_these_cases_and_at_least_30() {
    let document =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/BAD_INPUT.md")).unwrap();
    let documented: BTreeSet<&str> = document
        .lines()
        .filter_map(|line| line.strip_prefix("| `")?.split('`').next())
        .collect();
    let tested: BTreeSet<&str> = cases().iter().map(|case| case.id).collect();
    assert_eq!(
        documented, tested,
        "docs/BAD_INPUT.md and tests/bad_input.rs differ"
    );
    assert!(tested.len() >= 30, "{} cases", tested.len());
}
