//! Many live subscribers of one tag share one poller; it stops when the last one leaves.

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

#[tokio::test]
async fn a_thousand_subscribers_of_one_tag_share_one_poller() {
    let settings = settings();
    let database = mongo::connect(&settings.mongodb).await.unwrap();
    let queries = std::sync::Arc::new(ReadJournal::new(
        &database,
        &settings,
        CancellationToken::new(),
    ));
    let mut receivers = Vec::new();
    for subscriber in 0..1_000 {
        let (sink, receiver) = tokio::sync::mpsc::channel(4);
        let tag = if subscriber % 100 == 0 {
            "other"
        } else {
            "shared"
        };
        let queries = queries.clone();
        tokio::spawn(async move {
            queries
                .events(EventSelector::Tag(tag.into()), None, true, sink)
                .await
        });
        receivers.push(receiver);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while queries.running_pollers() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "pollers did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        queries.running_pollers(),
        2,
        "one poller per tag, not per subscriber"
    );

    // Clients leaving free everything: the pollers stop with the last subscriber.
    drop(receivers);
    while queries.running_pollers() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline + Duration::from_secs(10),
            "pollers still running"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn subscribers_share_one_change_stream_which_stops_with_the_last() {
    let mut settings = settings();
    settings.read_journal.use_change_streams = true;
    let database = mongo::connect(&settings.mongodb).await.unwrap();
    let queries = std::sync::Arc::new(ReadJournal::new(
        &database,
        &settings,
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
