//! The read journal end to end over gRPC, against the real mongod.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use proto::v1 as pb;
use proto::v1::read_journal_client::ReadJournalClient;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

/// Short drift and poll interval, so tests run fast; the logic is the same.
fn fast(settings: &mut config::Settings) {
    settings.read_journal.allowed_time_drift = Duration::from_millis(300);
    settings.read_journal.poll_interval = Duration::from_millis(50);
    settings.read_journal.batch_size = 50;
}

async fn start(prefix: &str) -> TestServer {
    TestServer::start_with(prefix, fast).await
}

fn tagged(pid: &str, sequence_nr: i64, tags: &[&str]) -> pb::PersistentEvent {
    pb::PersistentEvent {
        tags: tags.iter().map(|tag| tag.to_string()).collect(),
        ..event(pid, sequence_nr, &format!("{pid}-{sequence_nr}"))
    }
}

async fn read_all(mut stream: Streaming<pb::EventEnvelope>) -> Vec<pb::EventEnvelope> {
    let mut envelopes = Vec::new();
    while let Some(envelope) = stream.message().await.expect("query stream failed") {
        envelopes.push(envelope);
    }
    envelopes
}

async fn current_by_tag(
    client: &mut ReadJournalClient<Channel>,
    tag: &str,
    offset: &str,
) -> Vec<pb::EventEnvelope> {
    let request = pb::EventsByTagRequest {
        tag: tag.into(),
        offset: offset.into(),
    };
    read_all(
        client
            .current_events_by_tag(request)
            .await
            .unwrap()
            .into_inner(),
    )
    .await
}

/// Waits until the allowed time drift has passed over everything written so far.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(450)).await;
}

fn ids(envelopes: &[pb::EventEnvelope]) -> Vec<(String, i64)> {
    envelopes
        .iter()
        .map(|envelope| {
            let event = envelope.event.as_ref().unwrap();
            (event.persistence_id.clone(), event.sequence_nr)
        })
        .collect()
}

/// Reads `count` envelopes from a live stream, failing after `seconds`.
async fn take(
    stream: &mut Streaming<pb::EventEnvelope>,
    count: usize,
    seconds: u64,
) -> Vec<pb::EventEnvelope> {
    let mut envelopes = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
    while envelopes.len() < count {
        let next = tokio::time::timeout_at(deadline, stream.message()).await;
        match next {
            Ok(Ok(Some(envelope))) => envelopes.push(envelope),
            Ok(other) => panic!(
                "live stream ended or failed after {} envelopes: {other:?}",
                envelopes.len()
            ),
            Err(_) => panic!(
                "only {} of {count} envelopes within {seconds} s",
                envelopes.len()
            ),
        }
    }
    envelopes
}

#[tokio::test]
async fn offsets_are_exclusive() {
    let server = start("rj_offsets").await;
    let mut journal = server.journal().await;
    let mut queries = ReadJournalClient::new(server.channel().await);
    for n in 1..=3 {
        assert!(is_written(
            &write(&mut journal, vec![atomic(vec![tagged("a", n, &["blue"])])]).await[0]
        ));
    }
    settle().await;
    let all = current_by_tag(&mut queries, "blue", "").await;
    assert_eq!(
        ids(&all),
        [("a".into(), 1), ("a".into(), 2), ("a".into(), 3)]
    );
    let after_first = current_by_tag(&mut queries, "blue", &all[0].offset).await;
    assert_eq!(ids(&after_first), [("a".into(), 2), ("a".into(), 3)]);
    let after_third = current_by_tag(&mut queries, "blue", &all[2].offset).await;
    assert!(after_third.is_empty(), "{after_third:?}");
}

#[tokio::test]
async fn events_by_tag_are_complete_exact_and_skip_deleted_ones() {
    let server = start("rj_tags").await;
    let mut journal = server.journal().await;
    let mut queries = ReadJournalClient::new(server.channel().await);
    let mut with_metadata = tagged("m", 1, &["red", "green"]);
    with_metadata.metadata = Some(pb::Payload {
        data: vec![1, 2, 3],
        serializer_id: 9,
        manifest: "meta".into(),
    });
    let outcomes = write(
        &mut journal,
        vec![
            atomic(vec![with_metadata.clone()]),
            atomic(vec![tagged("m", 2, &["red"]), tagged("m", 3, &[])]),
            atomic(vec![tagged("n", 1, &["green"])]),
        ],
    )
    .await;
    assert!(outcomes.iter().all(is_written));
    journal
        .delete_events_to(pb::DeleteEventsToRequest {
            persistence_id: "m".into(),
            to_sequence_nr: 2,
        })
        .await
        .unwrap();
    assert!(is_written(
        &write(&mut journal, vec![atomic(vec![tagged("m", 4, &["red"])])]).await[0]
    ));
    settle().await;

    assert_eq!(
        ids(&current_by_tag(&mut queries, "red", "").await),
        [("m".into(), 4)]
    );
    assert_eq!(
        ids(&current_by_tag(&mut queries, "green", "").await),
        [("n".into(), 1)]
    );
    assert!(
        current_by_tag(&mut queries, "unknown-tag", "")
            .await
            .is_empty()
    );

    // Fields exactly as written (the timestamp was stamped by the service).
    assert!(is_written(
        &write(
            &mut journal,
            vec![atomic(vec![pb::PersistentEvent {
                persistence_id: "x".into(),
                ..with_metadata.clone()
            }])]
        )
        .await[0]
    ));
    settle().await;
    let found = current_by_tag(&mut queries, "red", "").await;
    let event = found
        .iter()
        .map(|e| e.event.clone().unwrap())
        .find(|e| e.persistence_id == "x")
        .unwrap();
    assert!(event.timestamp_millis > 0);
    assert_eq!(
        event,
        pb::PersistentEvent {
            persistence_id: "x".into(),
            timestamp_millis: event.timestamp_millis,
            ..with_metadata
        }
    );
}

#[tokio::test]
async fn events_by_persistence_id_current_and_live() {
    let server = start("rj_pid").await;
    let mut journal = server.journal().await;
    let mut queries = ReadJournalClient::new(server.channel().await);
    let writes = (1..=5).map(|n| atomic(vec![tagged("p", n, &[])])).collect();
    assert!(write(&mut journal, writes).await.iter().all(is_written));
    journal
        .delete_events_to(pb::DeleteEventsToRequest {
            persistence_id: "p".into(),
            to_sequence_nr: 1,
        })
        .await
        .unwrap();

    let request = |from, to| pb::EventsByPersistenceIdRequest {
        persistence_id: "p".into(),
        from_sequence_nr: from,
        to_sequence_nr: to,
    };
    let current = read_all(
        queries
            .current_events_by_persistence_id(request(0, None))
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    assert_eq!(
        ids(&current).iter().map(|(_, n)| *n).collect::<Vec<_>>(),
        [2, 3, 4, 5]
    );
    let current = read_all(
        queries
            .current_events_by_persistence_id(request(3, Some(4)))
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    assert_eq!(
        ids(&current).iter().map(|(_, n)| *n).collect::<Vec<_>>(),
        [3, 4]
    );

    let mut live = queries
        .events_by_persistence_id(request(4, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        ids(&take(&mut live, 2, 10).await),
        [("p".into(), 4), ("p".into(), 5)]
    );
    assert!(is_written(
        &write(
            &mut journal,
            vec![atomic(vec![tagged("p", 6, &[]), tagged("p", 7, &[])])]
        )
        .await[0]
    ));
    assert_eq!(
        ids(&take(&mut live, 2, 10).await),
        [("p".into(), 6), ("p".into(), 7)]
    );

    // A bounded live query completes once it reached `to`.
    let bounded = queries
        .events_by_persistence_id(request(6, Some(7)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        ids(&read_all(bounded).await),
        [("p".into(), 6), ("p".into(), 7)]
    );
}

#[tokio::test]
async fn events_by_slices_follow_akka_slices() {
    let server = start("rj_slices").await;
    let mut journal = server.journal().await;
    let mut queries = ReadJournalClient::new(server.channel().await);
    // Slices printed by Java: Math.abs("pid-1".hashCode() % 1024) == 111, "customer-42" → 307.
    let outcomes = write(
        &mut journal,
        vec![
            atomic(vec![tagged("pid-1", 1, &[])]),
            atomic(vec![tagged("customer-42", 1, &[])]),
        ],
    )
    .await;
    assert!(outcomes.iter().all(is_written));
    settle().await;
    let slices = |min, max| pb::EventsBySlicesRequest {
        min_slice: min,
        max_slice: max,
        offset: String::new(),
    };
    let current = |min, max| {
        let mut queries = queries.clone();
        async move {
            ids(&read_all(
                queries
                    .current_events_by_slices(slices(min, max))
                    .await
                    .unwrap()
                    .into_inner(),
            )
            .await)
        }
    };
    assert_eq!(current(111, 111).await, [("pid-1".into(), 1)]);
    assert_eq!(current(300, 310).await, [("customer-42".into(), 1)]);
    assert!(current(112, 306).await.is_empty());
    // A wide range (read through another index) finds both.
    assert_eq!(current(0, 1023).await.len(), 2);
    assert_eq!(current(0, 511).await.len(), 2);

    let mut live = queries
        .events_by_slices(slices(100, 200))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids(&take(&mut live, 1, 10).await), [("pid-1".into(), 1)]);
    assert!(is_written(
        &write(
            &mut journal,
            vec![
                atomic(vec![tagged("customer-42", 2, &[]),]),
                atomic(vec![tagged("pid-1", 2, &[])])
            ]
        )
        .await[1]
    ));
    assert_eq!(ids(&take(&mut live, 1, 10).await), [("pid-1".into(), 2)]);

    for (min, max, field) in [
        (-1, 5, "min_slice"),
        (0, 1024, "max_slice"),
        (10, 5, "max_slice"),
    ] {
        let status = queries
            .current_events_by_slices(slices(min, max))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().starts_with(field), "{}", status.message());
    }
}

#[tokio::test]
async fn persistence_ids_current_paged_and_live() {
    let server = start("rj_pids").await;
    let mut journal = server.journal().await;
    let mut queries = ReadJournalClient::new(server.channel().await);
    let writes = ["c", "a", "b", "d"]
        .iter()
        .map(|pid| atomic(vec![tagged(pid, 1, &[]), tagged(pid, 2, &[])]))
        .collect();
    assert!(write(&mut journal, writes).await.iter().all(is_written));
    let page = |after: &str, limit: Option<i64>| pb::CurrentPersistenceIdsRequest {
        after_id: after.into(),
        limit,
    };
    let current = |request| {
        let mut queries = queries.clone();
        async move {
            let mut stream = queries
                .current_persistence_ids(request)
                .await
                .unwrap()
                .into_inner();
            let mut found = Vec::new();
            while let Some(entry) = stream.message().await.unwrap() {
                found.push(entry.persistence_id);
            }
            found
        }
    };
    assert_eq!(current(page("", None)).await, ["a", "b", "c", "d"]);
    assert_eq!(current(page("", Some(2))).await, ["a", "b"]);
    assert_eq!(current(page("b", Some(10))).await, ["c", "d"]);
    assert!(current(page("d", None)).await.is_empty());
    let status = queries
        .current_persistence_ids(page("", Some(-1)))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (Code::InvalidArgument, "limit: must not be negative, got -1")
    );

    let mut live = queries
        .persistence_ids(pb::PersistenceIdsRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut seen = BTreeSet::new();
    while seen.len() < 4 {
        seen.insert(
            tokio::time::timeout(Duration::from_secs(10), live.message())
                .await
                .unwrap()
                .unwrap()
                .unwrap()
                .persistence_id,
        );
    }
    assert!(is_written(
        &write(&mut journal, vec![atomic(vec![tagged("e", 1, &[])])]).await[0]
    ));
    let next = tokio::time::timeout(Duration::from_secs(10), live.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(next.persistence_id, "e");
}

#[tokio::test]
async fn durable_state_changes_give_the_latest_change_per_object() {
    let server = start("rj_state").await;
    let mut state =
        proto::v1::durable_state_store_client::DurableStateStoreClient::new(server.channel().await);
    let mut queries = ReadJournalClient::new(server.channel().await);
    let upsert = |pid: &str, revision, value: &str, tag: &str| pb::UpsertObjectRequest {
        persistence_id: pid.into(),
        revision,
        value: Some(payload(value)),
        tag: tag.into(),
    };
    state
        .upsert_object(upsert("o1", 1, "o1-v1", "shop"))
        .await
        .unwrap();
    state
        .upsert_object(upsert("o2", 1, "o2-v1", "shop"))
        .await
        .unwrap();
    state
        .upsert_object(upsert("o1", 2, "o1-v2", "shop"))
        .await
        .unwrap();
    state
        .upsert_object(upsert("o3", 1, "other", "elsewhere"))
        .await
        .unwrap();
    state
        .delete_object(pb::DeleteObjectRequest {
            persistence_id: "o2".into(),
            revision: 2,
        })
        .await
        .unwrap();
    settle().await;

    let request = |offset: &str| pb::DurableStateChangesRequest {
        tag: "shop".into(),
        offset: offset.into(),
    };
    let mut stream = queries
        .current_durable_state_changes(request(""))
        .await
        .unwrap()
        .into_inner();
    let mut changes = Vec::new();
    while let Some(change) = stream.message().await.unwrap() {
        changes.push(change);
    }
    let summary: Vec<_> = changes
        .iter()
        .map(|c| {
            (
                c.persistence_id.clone(),
                c.revision,
                c.value.clone().map(|v| String::from_utf8(v.data).unwrap()),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("o1".into(), 2, Some("o1-v2".into())),
            ("o2".into(), 2, None)
        ]
    );
    assert!(changes.iter().all(|change| change.timestamp_millis > 0));

    let mut live = queries
        .durable_state_changes(request(&changes[1].offset))
        .await
        .unwrap()
        .into_inner();
    state
        .upsert_object(upsert("o1", 3, "o1-v3", "shop"))
        .await
        .unwrap();
    let next = tokio::time::timeout(Duration::from_secs(10), live.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!((next.persistence_id.as_str(), next.revision), ("o1", 3));
}

#[tokio::test]
async fn malformed_requests_are_invalid_argument() {
    let server = start("rj_invalid").await;
    let mut queries = ReadJournalClient::new(server.channel().await);
    for (tag, offset, expected) in [
        (
            "t",
            "garbage",
            "offset: is not an offset this service issued (unknown format): \"garbage\"",
        ),
        (
            "t",
            "p1.!!",
            "offset: is not an offset this service issued (not base64): \"p1.!!\"",
        ),
        ("", "", "tag: must not be empty"),
    ] {
        let request = pb::EventsByTagRequest {
            tag: tag.into(),
            offset: offset.into(),
        };
        let status = queries.events_by_tag(request.clone()).await.unwrap_err();
        assert_eq!(
            (status.code(), status.message()),
            (Code::InvalidArgument, expected)
        );
        let status = queries.current_events_by_tag(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
    }
    let status = queries
        .current_events_by_persistence_id(pb::EventsByPersistenceIdRequest {
            persistence_id: "p".into(),
            from_sequence_nr: -1,
            to_sequence_nr: None,
        })
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (
            Code::InvalidArgument,
            "from_sequence_nr: must not be negative, got -1"
        )
    );
}

/// Keeps the pairs for a tag, in delivery order, checking no pair repeats.
fn collect_unique(into: &mut BTreeMap<(String, i64), usize>, envelopes: &[pb::EventEnvelope]) {
    for (pid, sequence_nr) in ids(envelopes) {
        let count = into.entry((pid.clone(), sequence_nr)).or_default();
        *count += 1;
        assert_eq!(*count, 1, "{pid}/{sequence_nr} delivered twice");
    }
}
