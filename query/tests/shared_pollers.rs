//! Many live subscribers share one tail of the journal; it stops when the last one leaves.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use config::{Overrides, Settings};
use query::ReadJournal;
use query::feed::EventSelector;
use tokio_util::sync::CancellationToken;

fn settings() -> Settings {
    let uri = std::env::var("EVENTJOURNAL_TEST_MONGODB_URI")
        .expect("EVENTJOURNAL_TEST_MONGODB_URI is not set: run the suite with `make test`");
    let database = format!("t_shared_pollers_{}", std::process::id());
    let overrides = Overrides {
        listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        mongodb_uri: Some(uri),
        database: Some(database),
    };
    let mut settings = Settings::load(None, &HashMap::new(), &overrides).unwrap();
    settings.read_journal.poll_interval = Duration::from_millis(20);
    settings
}

/// An event of `pid` with sequence number 1 and `tag`, stamped now.
fn event(pid: &str, tag: &str) -> model::PersistentEvent {
    model::PersistentEvent {
        persistence_id: model::PersistenceId::parse("pid", pid.to_owned()).unwrap(),
        sequence_nr: model::SequenceNr::parse("seqNr", 1).unwrap(),
        payload: model::Payload {
            data: pid.as_bytes().to_vec(),
            serializer_id: 1,
            manifest: String::new(),
        },
        writer_uuid: "w".into(),
        timestamp_millis: 1,
        tags: vec![model::Tag::parse("tag", tag.to_owned()).unwrap()],
        metadata: None,
    }
}

/// 1,000 subscribers on 100 tags and a few slice ranges: one tail of the journal feeds them all,
/// each gets the event of its tag (or slice range) and nothing else, and the tail stops with the
/// last subscriber.
#[tokio::test]
async fn a_thousand_subscribers_on_a_hundred_tags_share_one_tail() {
    let settings = settings();
    let database = mongo::connect(&settings.mongodb).await.unwrap();
    let watermarks = mongo::Watermarks::start(&database, &settings, CancellationToken::new())
        .await
        .unwrap();
    journal::Journal::new(&database, &settings, watermarks.clone())
        .create_indexes()
        .await
        .unwrap();
    let queries = std::sync::Arc::new(ReadJournal::new(
        &database,
        &settings,
        watermarks,
        CancellationToken::new(),
    ));
    let run = std::process::id();
    let tag = |n: usize| format!("tail-{run}-{n}");
    let pid = |n: usize| format!("tail-{run}-pid-{n}");
    let mut receivers = Vec::new();
    for subscriber in 0..1_000 {
        let (sink, receiver) = tokio::sync::mpsc::channel(4);
        let selector = EventSelector::Tag(tag(subscriber % 100));
        let queries = queries.clone();
        tokio::spawn(async move { queries.events(selector, None, true, sink).await });
        receivers.push((subscriber % 100, receiver));
    }
    let slice = model::PersistenceId::parse("pid", pid(7)).unwrap().slice();
    let mut slice_receivers = Vec::new();
    for _ in 0..5 {
        let (sink, receiver) = tokio::sync::mpsc::channel(200);
        let selector = EventSelector::Slices {
            min: slice,
            max: slice,
        };
        let queries = queries.clone();
        tokio::spawn(async move { queries.events(selector, None, true, sink).await });
        slice_receivers.push(receiver);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while queries.running_pollers() < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the tail did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        queries.running_pollers(),
        1,
        "one tail for every tag and slice range, not one per subscriber or per key"
    );

    // One event per tag, each of its own persistence id.
    let documents: Vec<_> = (0..100)
        .map(|n| {
            journal::document::EventDocument::new(
                &event(&pid(n), &tag(n)),
                mongodb::bson::DateTime::now(),
            )
        })
        .collect();
    database
        .collection::<journal::document::EventDocument>(&settings.mongodb.collections.journal)
        .insert_many(documents)
        .await
        .unwrap();
    for (n, receiver) in &mut receivers {
        let (_, event) = *tokio::time::timeout(Duration::from_secs(10), receiver.recv())
            .await
            .unwrap_or_else(|_| panic!("a subscriber of {} got nothing", tag(*n)))
            .unwrap()
            .unwrap();
        assert_eq!(
            event.persistence_id.as_str(),
            pid(*n),
            "the event of its own tag"
        );
    }
    for receiver in &mut slice_receivers {
        let mut pids = Vec::new();
        while let Ok(Some(Ok(delivered))) =
            tokio::time::timeout(Duration::from_millis(300), receiver.recv()).await
        {
            let (_, event) = *delivered;
            pids.push(event.persistence_id.as_str().to_owned());
        }
        assert!(pids.contains(&pid(7)), "{pids:?}");
        pids.sort();
        let mut expected: Vec<String> = (0..100)
            .map(pid)
            .filter(|candidate| {
                model::PersistenceId::parse("pid", candidate.clone())
                    .unwrap()
                    .slice()
                    == slice
            })
            .collect();
        expected.sort();
        assert_eq!(pids, expected, "exactly the events of its slice, once");
    }
    for (_, receiver) in &mut receivers {
        assert!(receiver.try_recv().is_err(), "one event per subscriber");
    }

    // Clients leaving free everything: the tail stops with the last subscriber.
    drop(receivers);
    drop(slice_receivers);
    while queries.running_pollers() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline + Duration::from_secs(10),
            "the tail is still running"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn subscribers_share_one_change_stream_which_stops_with_the_last() {
    let mut settings = settings();
    settings.read_journal.use_change_streams = true;
    let database = mongo::connect(&settings.mongodb).await.unwrap();
    let watermarks = mongo::Watermarks::start(&database, &settings, CancellationToken::new())
        .await
        .unwrap();
    let queries = std::sync::Arc::new(ReadJournal::new(
        &database,
        &settings,
        watermarks,
        CancellationToken::new(),
    ));
    let streams = queries.change_streams().expect("change-stream mode");
    assert!(!streams.is_running());
    let mut receivers = Vec::new();
    for subscriber in 0..200 {
        let (sink, receiver) = tokio::sync::mpsc::channel(4);
        let queries = queries.clone();
        let tag = format!("tag-{}", subscriber % 7);
        tokio::spawn(async move {
            queries
                .events(EventSelector::Tag(tag), None, true, sink)
                .await
        });
        receivers.push(receiver);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !queries.change_streams().unwrap().is_running() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the change stream did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        queries.running_pollers(),
        0,
        "change-stream mode does not poll for live tag queries"
    );
    // Every subscriber joins from the shared stream's recent changes: none opens a change stream
    // of its own (the counter is process-wide, and no other test here uses change streams).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        query::metrics::PRIVATE_CHANGE_STREAMS.get(),
        0,
        "subscribers opened private change streams"
    );
    // Idle subscribers hand over to the shared stream: MongoDB holds about one change-stream
    // cursor on the journal, not one per subscriber.
    let namespace = format!(
        "{}.{}",
        settings.mongodb.database, settings.mongodb.collections.journal
    );
    let mut cursors = usize::MAX;
    while tokio::time::Instant::now() < deadline {
        cursors = open_change_streams(&database, &namespace).await;
        if (1..=2).contains(&cursors) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        (1..=2).contains(&cursors),
        "{cursors} change-stream cursors for 200 idle subscribers (the shared one must show)"
    );
    drop(receivers);
    while queries.change_streams().unwrap().is_running() {
        assert!(
            tokio::time::Instant::now() < deadline + Duration::from_secs(10),
            "the change stream kept running"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Change-stream cursors open on `namespace`, idle or busy.
async fn open_change_streams(database: &mongodb::Database, namespace: &str) -> usize {
    use futures::TryStreamExt;
    let _ = database;
    let plain =
        mongodb::Client::with_uri_str(std::env::var("EVENTJOURNAL_TEST_MONGODB_URI").unwrap())
            .await
            .unwrap();
    let admin = plain.database("admin");
    let pipeline = [
        mongodb::bson::doc! { "$currentOp": { "idleCursors": true, "allUsers": true } },
        mongodb::bson::doc! { "$match": { "ns": namespace, "cursor.tailable": true } },
    ];
    let operations: Vec<_> = admin
        .aggregate(pipeline)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    operations.len()
}

/// The shared stream's history says which resume tokens it covers by the cluster time at the
/// start of a token: check that reading against tokens MongoDB hands out.
#[tokio::test]
async fn resume_tokens_start_with_their_cluster_time() {
    let settings = settings();
    let database = mongo::connect(&settings.mongodb).await.unwrap();
    let collection = database.collection::<mongodb::bson::Document>("token_times");
    let mut stream = collection.watch().await.unwrap();
    for n in 0..3 {
        collection
            .insert_one(mongodb::bson::doc! { "n": n })
            .await
            .unwrap();
        let change = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(change) = stream.next_if_any().await.unwrap() {
                    return change;
                }
            }
        })
        .await
        .unwrap();
        let token = match mongodb::bson::to_bson(&change.id).unwrap() {
            mongodb::bson::Bson::Document(document) => {
                document.get_str("_data").unwrap().to_owned()
            }
            other => panic!("{other:?}"),
        };
        let time = change.cluster_time.unwrap();
        assert_eq!(
            query::change_stream::token_time(&token),
            Some((time.time, time.increment)),
            "{token}"
        );
    }
}
