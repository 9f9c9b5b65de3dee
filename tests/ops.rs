//! The operator commands, run as an operator runs them, against the real mongod.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::{
    TestServer, atomic, event, free_port, highest, is_written, mongodb_uri, payload, replay,
    sequence_nrs, unique_database, wait_until, write,
};
use mongodb::bson::{Bson, DateTime, Document, doc};
use proto::v1 as pb;

const BINARY: &str = env!("CARGO_BIN_EXE_eventjournal");

fn run(database: &str, args: &[&str]) -> Output {
    run_with_env(database, args, &[])
}

fn run_with_env(database: &str, args: &[&str], environment: &[(&str, &str)]) -> Output {
    Command::new(BINARY)
        .args(args)
        .args(["--mongodb-uri", &mongodb_uri(), "--database", database])
        .env("RUST_LOG", "off")
        .envs(environment.iter().copied())
        .output()
        .unwrap()
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

async fn ttl_seconds(database: &str, collection: &str, index: &str) -> Option<u64> {
    let client = mongodb::Client::with_uri_str(mongodb_uri()).await.unwrap();
    let names = client
        .database(database)
        .collection::<mongodb::bson::Document>(collection);
    let mut cursor = names.list_indexes().await.ok()?;
    use futures::TryStreamExt;
    while let Some(model) = cursor.try_next().await.unwrap() {
        let options = model.options.unwrap_or_default();
        if options.name.as_deref() == Some(index) {
            return options.expire_after.map(|ttl| ttl.as_secs());
        }
    }
    None
}

#[tokio::test]
async fn purge_setup_creates_changes_and_leaves_ttl_indexes() {
    let database = unique_database("ops_purge");
    let setup = [
        "purge",
        "setup",
        "--journal-expire-after",
        "365d",
        "--snapshot-expire-after",
        "30d",
    ];
    let created = stdout(&run(&database, &setup));
    assert!(
        created
            .contains("deleted events (journal.deletedAt): created TTL index, expire after 365d"),
        "{created}"
    );
    assert!(
        created.contains("snapshots (snapshots.insertedAt): created TTL index, expire after 30d"),
        "{created}"
    );
    assert!(
        !created.contains("durable-state"),
        "not asked for: {created}"
    );
    assert_eq!(
        ttl_seconds(&database, "journal", "deletedAt_ttl").await,
        Some(365 * 86_400)
    );
    assert_eq!(
        ttl_seconds(&database, "snapshots", "insertedAt_ttl").await,
        Some(30 * 86_400)
    );

    let again = stdout(&run(&database, &setup));
    assert!(
        again.contains("deleted events (journal.deletedAt): unchanged, expire after 365d"),
        "{again}"
    );
    assert!(
        again.contains("snapshots (snapshots.insertedAt): unchanged"),
        "{again}"
    );

    let changed = stdout(&run(
        &database,
        &[
            "purge",
            "setup",
            "--journal-expire-after",
            "400d",
            "--state-expire-after",
            "7d",
        ],
    ));
    assert!(
        changed
            .contains("deleted events (journal.deletedAt): changed expire after from 365d to 400d"),
        "{changed}"
    );
    assert!(
        changed
            .contains("deleted durable-state objects (durable_state.deletedAt): created TTL index"),
        "{changed}"
    );
    assert_eq!(
        ttl_seconds(&database, "journal", "deletedAt_ttl").await,
        Some(400 * 86_400)
    );
    assert_eq!(
        ttl_seconds(&database, "snapshots", "insertedAt_ttl").await,
        Some(30 * 86_400),
        "left alone"
    );
}

#[tokio::test]
async fn purge_status_counts_what_is_marked_and_eligible() {
    let database = unique_database("ops_status");
    let client = mongodb::Client::with_uri_str(mongodb_uri()).await.unwrap();
    let journal = client
        .database(&database)
        .collection::<mongodb::bson::Document>("journal");
    let old = mongodb::bson::DateTime::from_millis(
        mongodb::bson::DateTime::now().timestamp_millis() - 10 * 86_400_000,
    );
    journal
        .insert_many([
            doc! { "pid": "a", "seqNr": 1_i64, "deletedAt": old },
            doc! { "pid": "a", "seqNr": 2_i64, "deletedAt": mongodb::bson::DateTime::now() },
            doc! { "pid": "a", "seqNr": 3_i64 },
        ])
        .await
        .unwrap();
    let before = stdout(&run(&database, &["purge", "status"]));
    assert!(
        before.contains(
            "deleted events (journal.deletedAt): no TTL index; 2 document(s) carry the field"
        ),
        "{before}"
    );
    stdout(&run(
        &database,
        &["purge", "setup", "--journal-expire-after", "365d"],
    ));
    let after = stdout(&run(&database, &["purge", "status"]));
    assert!(
        after.contains("expire after 365d; 2 document(s) carry the field, 0 eligible now"),
        "{after}"
    );
    stdout(&run(
        &database,
        &["purge", "setup", "--journal-expire-after", "5days"],
    ));
    let after = stdout(&run(&database, &["purge", "status"]));
    // The TTL monitor may already have removed the old one: 1 eligible, or 0 of 1 left.
    assert!(
        after.contains("2 document(s) carry the field, 1 eligible now")
            || after.contains("1 document(s) carry the field, 0 eligible now"),
        "{after}"
    );
}

#[tokio::test]
async fn indexes_list_shows_missing_ones_and_create_makes_them() {
    let database = unique_database("ops_indexes");
    let listed = stdout(&run(&database, &["indexes", "list"]));
    assert!(listed.contains("  missing  pid_seqNr"), "{listed}");
    assert!(
        listed.contains("index(es) missing: run `eventjournal indexes create`"),
        "{listed}"
    );
    let created = stdout(&run(
        &database,
        &["indexes", "create", "--commit-quorum", "majority"],
    ));
    assert!(
        created.contains("indexes created (commit quorum majority)"),
        "{created}"
    );
    for expected in [
        "journal:",
        "  ok       pid_seqNr",
        "  ok       tags_writtenAt",
        "  ok       writtenAt_pid_seqNr",
        "snapshots:",
        "durable_state:",
        "  ok       tag_writtenAt",
        "  ok       writtenAt_id",
    ] {
        assert!(
            created.contains(expected),
            "{expected:?} missing from:\n{created}"
        );
    }
    assert!(!created.contains("missing"), "{created}");
    let client = mongodb::Client::with_uri_str(mongodb_uri()).await.unwrap();
    let specifications: Vec<_> = {
        use futures::TryStreamExt;
        client
            .database(&database)
            .list_collections()
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap()
    };
    for name in ["journal", "journal_metadata", "snapshots", "durable_state"] {
        let specification = specifications
            .iter()
            .find(|specification| specification.name == name)
            .unwrap_or_else(|| panic!("{name} was not created"));
        assert_eq!(
            specification.options.validation_level,
            Some(mongodb::options::ValidationLevel::Off),
            "{name}"
        );
    }
    stdout(&run(
        &database,
        &["purge", "setup", "--snapshot-expire-after", "30d"],
    ));
    let listed = stdout(&run(&database, &["indexes", "list"]));
    assert!(listed.contains("  other    insertedAt_ttl"), "{listed}");
    assert!(listed.contains("(TTL 30d)"), "{listed}");
}

#[test]
fn operator_commands_explain_themselves_and_reject_bad_input_in_one_line() {
    for args in [
        ["purge", "setup"],
        ["purge", "status"],
        ["purge", "migrate"],
        ["indexes", "list"],
        ["indexes", "create"],
    ] {
        let output = Command::new(BINARY)
            .args(args)
            .arg("--help")
            .output()
            .unwrap();
        let help = String::from_utf8(output.stdout).unwrap();
        assert!(
            output.status.success() && help.contains("--mongodb-uri <URI>"),
            "{args:?}: {help}"
        );
    }
    let help = String::from_utf8(
        Command::new(BINARY)
            .args(["purge", "setup", "--help"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(help.contains("--journal-expire-after <DURATION>"), "{help}");

    let output = Command::new(BINARY)
        .args(["purge", "setup", "--journal-expire-after", "soon"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains("invalid value 'soon' for '--journal-expire-after <DURATION>'"),
        "{stderr}"
    );

    let output = Command::new(BINARY)
        .args(["purge", "setup"])
        .output()
        .unwrap();
    // Neither flags nor [purge]: refused before connecting, saying where expiries come from.
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.starts_with("error: nothing to set up: give --journal-expire-after")
            && stderr.contains("[purge]"),
        "{stderr}"
    );

    let closed_port = free_port();
    let output = Command::new(BINARY)
        .args([
            "purge",
            "status",
            "--mongodb-uri",
            &format!("mongodb://127.0.0.1:{closed_port}/?directConnection=true"),
        ])
        .env("EVENTJOURNAL_MONGODB__SERVER_SELECTION_TIMEOUT", "300ms")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.starts_with(&format!(
            "error: cannot reach MongoDB at mongodb://127.0.0.1:{closed_port}"
        )),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

async fn collection(database: &str, name: &str) -> mongodb::Collection<Document> {
    mongodb::Client::with_uri_str(mongodb_uri())
        .await
        .unwrap()
        .database(database)
        .collection(name)
}

fn date(rfc3339: &str) -> DateTime {
    DateTime::parse_rfc3339_str(rfc3339).unwrap()
}

/// `field` of each document, by `key`.
async fn field_by(
    documents: &mongodb::Collection<Document>,
    key: &str,
    field: &str,
) -> std::collections::BTreeMap<String, Option<Bson>> {
    use futures::TryStreamExt;
    documents
        .find(doc! {})
        .await
        .unwrap()
        .map_ok(|document| {
            (
                document.get(key).unwrap().to_string(),
                document.get(field).cloned(),
            )
        })
        .try_collect()
        .await
        .unwrap()
}

#[tokio::test]
async fn migrate_marks_exactly_the_snapshots_lacking_the_field_in_batches() {
    let database = unique_database("ops_migrate");
    let snapshots = collection(&database, "snapshots").await;
    let already = date("2026-01-01T00:00:00Z");
    let mut documents: Vec<Document> = (1..=25_i64)
        .map(|seq_nr| doc! { "pid": "s", "seqNr": seq_nr, "timestamp": 0_i64 })
        .collect();
    documents.extend((26..=28_i64).map(
        |seq_nr| doc! { "pid": "s", "seqNr": seq_nr, "timestamp": 0_i64, "insertedAt": already },
    ));
    snapshots.insert_many(documents).await.unwrap();
    let before = field_by(&snapshots, "seqNr", "insertedAt").await;

    let migrate = |extra: &[&str]| {
        let mut args = vec![
            "purge",
            "migrate",
            "--collection",
            "snapshots",
            "--date",
            "2027-01-17T03:00:00Z",
            "--batch-size",
            "10",
            "--pause",
            "10ms",
        ];
        args.extend_from_slice(extra);
        run(&database, &args)
    };
    let dry = stdout(&migrate(&["--dry-run"]));
    assert!(
        dry.contains("dry run: 25 snapshots in snapshots lack insertedAt"),
        "{dry}"
    );
    assert_eq!(field_by(&snapshots, "seqNr", "insertedAt").await, before);

    let done = stdout(&migrate(&[]));
    assert!(
        done.contains(
            "marked 25 snapshots in snapshots with insertedAt = 2027-01-17T03:00:00Z in 3 \
             batch(es) of at most 10"
        ),
        "{done}"
    );
    let after = field_by(&snapshots, "seqNr", "insertedAt").await;
    for (seq_nr, value) in &after {
        let expected = if seq_nr.parse::<i64>().unwrap() <= 25 {
            date("2027-01-17T03:00:00Z")
        } else {
            already
        };
        assert_eq!(value, &Some(Bson::DateTime(expected)), "snapshot {seq_nr}");
    }
    let again = stdout(&migrate(&[]));
    assert!(again.contains("marked 0 snapshots"), "{again}");

    let refused = migrate(&["--only-deleted"]);
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("--only-deleted does not apply to snapshots"),
        "{stderr}"
    );
}

#[tokio::test]
async fn migrate_interrupted_and_run_again_continues_without_touching_marked_documents() {
    let database = unique_database("ops_resume");
    let snapshots = collection(&database, "snapshots").await;
    snapshots
        .insert_many((1..=60_i64).map(|seq_nr| doc! { "pid": "r", "seqNr": seq_nr }))
        .await
        .unwrap();
    let args = |when: &'static str, pause: &'static str| {
        [
            "purge",
            "migrate",
            "--collection",
            "snapshots",
            "--date",
            when,
            "--batch-size",
            "5",
            "--pause",
            pause,
            "--mongodb-uri",
        ]
    };
    let mut first = Command::new(BINARY)
        .args(args("2027-01-01T00:00:00Z", "300ms"))
        .args([&mongodb_uri(), "--database", &database])
        .env("RUST_LOG", "off")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let marked = doc! { "insertedAt": { "$exists": true } };
    wait_until(
        "the first batches are marked",
        Duration::from_secs(30),
        || async { snapshots.count_documents(marked.clone()).await.unwrap() >= 10 },
    )
    .await;
    first.kill().unwrap();
    first.wait().unwrap();
    let interrupted = field_by(&snapshots, "seqNr", "insertedAt").await;
    let first_run = interrupted.values().filter(|value| value.is_some()).count();
    assert!(
        (10..60).contains(&first_run),
        "interrupted after {first_run}"
    );

    let second = stdout(
        &Command::new(BINARY)
            .args(args("2028-01-01T00:00:00Z", "0s"))
            .args([&mongodb_uri(), "--database", &database])
            .env("RUST_LOG", "off")
            .output()
            .unwrap(),
    );
    assert!(
        second.contains(&format!("marked {} snapshots", 60 - first_run)),
        "{second}"
    );
    let resumed = field_by(&snapshots, "seqNr", "insertedAt").await;
    for (seq_nr, value) in &resumed {
        let expected = match &interrupted[seq_nr] {
            Some(earlier) => earlier.clone(),
            None => Bson::DateTime(date("2028-01-01T00:00:00Z")),
        };
        assert_eq!(value, &Some(expected), "snapshot {seq_nr}");
    }
}

#[tokio::test]
async fn migrate_marks_deleted_events_only_and_the_highest_survives_the_purge() {
    let server = TestServer::start("ops_migrate_journal").await;
    let mut client = server.journal().await;
    for pid in ["partly", "fully", "live"] {
        let events = (1..=7).map(|seq_nr| event(pid, seq_nr, "e")).collect();
        assert!(is_written(
            &write(&mut client, vec![atomic(events)]).await[0]
        ));
    }
    for (pid, to) in [("partly", 5), ("fully", i64::MAX)] {
        client
            .delete_events_to(pb::DeleteEventsToRequest {
                persistence_id: pid.into(),
                to_sequence_nr: to,
            })
            .await
            .unwrap();
    }
    // As written before deletedAt existed: deleted (the metadata records it), not dated.
    let journal = server.mongodb().await.collection::<Document>("journal");
    journal
        .update_many(doc! {}, doc! { "$unset": { "deletedAt": "" } })
        .await
        .unwrap();
    let database = server.mongodb().await.name().to_owned();

    let migrate = |extra: &[&str]| {
        let mut args = vec![
            "purge",
            "migrate",
            "--collection",
            "journal",
            "--date",
            "2020-01-01T00:00:00Z",
        ];
        args.extend_from_slice(extra);
        stdout(&run(&database, &args))
    };
    let dry = migrate(&["--dry-run"]);
    assert!(
        dry.contains("dry run: 12 deleted events in journal lack deletedAt"),
        "{dry}"
    );
    let done = migrate(&["--only-deleted", "--batch-size", "4", "--pause", "0s"]);
    assert!(done.contains("marked 12 deleted events"), "{done}");
    assert!(done.contains("in 3 batch(es) of at most 4"), "{done}");
    let marked = |pid: &str| {
        let journal = journal.clone();
        let pid = pid.to_owned();
        async move {
            let mut seq_nrs: Vec<i64> = Vec::new();
            for seq_nr in 1..=7_i64 {
                let document = journal
                    .find_one(
                        doc! { "pid": &pid, "seqNr": seq_nr, "deletedAt": { "$exists": true } },
                    )
                    .await
                    .unwrap();
                if document.is_some() {
                    seq_nrs.push(seq_nr);
                }
            }
            seq_nrs
        }
    };
    assert_eq!(marked("partly").await, [1, 2, 3, 4, 5]);
    assert_eq!(marked("fully").await, [1, 2, 3, 4, 5, 6, 7]);
    assert!(
        marked("live").await.is_empty(),
        "live events are never marked"
    );

    stdout(&run(
        &database,
        &["purge", "setup", "--journal-expire-after", "1s"],
    ));
    wait_until(
        "TTL purges the marked events",
        Duration::from_secs(90),
        || async {
            journal
                .count_documents(doc! { "deletedAt": { "$exists": true } })
                .await
                .unwrap()
                == 0
        },
    )
    .await;
    assert_eq!(journal.count_documents(doc! {}).await.unwrap(), 2 + 7);
    let (events, highest_in_replay) = replay(&mut client, "partly", 1, None, None).await;
    assert_eq!(sequence_nrs(&events), [6, 7]);
    assert_eq!(highest_in_replay, 7);
    let (events, highest_in_replay) = replay(&mut client, "fully", 1, None, None).await;
    assert!(events.is_empty());
    assert_eq!(highest_in_replay, 7, "the highest survives a full purge");
    assert_eq!(highest(&mut client, "fully").await, 7);
    let (events, _) = replay(&mut client, "live", 1, None, None).await;
    assert_eq!(events.len(), 7);
}

#[tokio::test]
async fn migrate_marks_deleted_state_objects_only() {
    use proto::v1::durable_state_store_client::DurableStateStoreClient;
    let server = TestServer::start("ops_migrate_state").await;
    let mut client = DurableStateStoreClient::new(server.channel().await);
    for pid in ["kept", "gone"] {
        client
            .upsert_object(pb::UpsertObjectRequest {
                persistence_id: pid.into(),
                revision: 1,
                value: Some(payload("v")),
                tag: String::new(),
            })
            .await
            .unwrap();
    }
    client
        .delete_object(pb::DeleteObjectRequest {
            persistence_id: "gone".into(),
            revision: 2,
        })
        .await
        .unwrap();
    let objects = server
        .mongodb()
        .await
        .collection::<Document>("durable_state");
    objects
        .update_many(doc! {}, doc! { "$unset": { "deletedAt": "" } })
        .await
        .unwrap();
    let database = server.mongodb().await.name().to_owned();
    let done = stdout(&run(
        &database,
        &[
            "purge",
            "migrate",
            "--collection",
            "state",
            "--date",
            "2027-01-17T03:00:00Z",
        ],
    ));
    assert!(
        done.contains("marked 1 deleted durable-state objects in durable_state"),
        "{done}"
    );
    let marked = field_by(&objects, "_id", "deletedAt").await;
    assert_eq!(
        marked["\"gone\""],
        Some(Bson::DateTime(date("2027-01-17T03:00:00Z")))
    );
    assert_eq!(marked["\"kept\""], None, "a live object is never marked");
    let kept = client
        .get_object(pb::GetObjectRequest {
            persistence_id: "kept".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kept.revision, 1);
    assert!(kept.value.is_some());
}

#[tokio::test]
async fn ttl_removes_old_snapshots() {
    use proto::v1::snapshot_store_client::SnapshotStoreClient;
    let server = TestServer::start("ops_snapshot_ttl").await;
    let mut client = SnapshotStoreClient::new(server.channel().await);
    for sequence_nr in [3, 6] {
        client
            .save_snapshot(pb::SaveSnapshotRequest {
                metadata: Some(pb::SnapshotMetadata {
                    persistence_id: "old".into(),
                    sequence_nr,
                    timestamp_millis: 0,
                    metadata: None,
                }),
                snapshot: Some(payload("state")),
            })
            .await
            .unwrap();
    }
    let database = server.mongodb().await.name().to_owned();
    let load = |mut client: SnapshotStoreClient<tonic::transport::Channel>| async move {
        client
            .load_snapshot(pb::LoadSnapshotRequest {
                persistence_id: "old".into(),
                criteria: None,
                to_sequence_nr: None,
            })
            .await
            .unwrap()
            .into_inner()
            .snapshot
    };
    assert!(load(client.clone()).await.is_some());
    stdout(&run(
        &database,
        &["purge", "setup", "--snapshot-expire-after", "1s"],
    ));
    wait_until("TTL purges the snapshots", Duration::from_secs(90), || {
        let client = client.clone();
        async move { load(client).await.is_none() }
    })
    .await;
}

#[tokio::test]
async fn purge_setup_in_cosmos_mode_uses_ts_and_says_why() {
    let database = unique_database("ops_cosmos");
    const COSMOS: (&str, &str) = ("EVENTJOURNAL_MONGODB__DATABASE_MODE", "cosmos");
    const TTL: (&str, &str) = ("EVENTJOURNAL_WRITE_JOURNAL__COSMOS_TTL", "365d");
    let setup = [
        "purge",
        "setup",
        "--journal-expire-after",
        "365d",
        "--snapshot-expire-after",
        "30d",
    ];

    let refused = run_with_env(&database, &setup, &[COSMOS]);
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("set write-journal.cosmos-ttl = \"365d\""),
        "{stderr}"
    );
    let refused = run_with_env(
        &database,
        &["purge", "setup", "--state-expire-after", "7d"],
        &[COSMOS, TTL],
    );
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("would also remove live objects"),
        "{stderr}"
    );
    assert_eq!(
        ttl_seconds(&database, "journal", "_ts_ttl").await,
        None,
        "nothing changed"
    );

    let created = stdout(&run_with_env(&database, &setup, &[COSMOS, TTL]));
    assert!(
        created.contains(
            "deleted events (journal._ts): created TTL index, deleted events expire after \
             their own ttl of 365d (cosmos mode: CosmosDB purges by _ts"
        ),
        "{created}"
    );
    assert!(
        created.contains(
            "snapshots (snapshots._ts): created TTL index, expire after 30d (cosmos mode: \
             CosmosDB purges by _ts, the time of last modification, and a snapshot is not \
             modified after it is saved)"
        ),
        "{created}"
    );
    assert_eq!(
        ttl_seconds(&database, "journal", "_ts_ttl").await,
        Some(i32::MAX as u64)
    );
    assert_eq!(
        ttl_seconds(&database, "snapshots", "_ts_ttl").await,
        Some(30 * 86_400)
    );
    assert_eq!(
        ttl_seconds(&database, "journal", "deletedAt_ttl").await,
        None,
        "no date-field index in cosmos mode"
    );
    let again = stdout(&run_with_env(&database, &setup, &[COSMOS, TTL]));
    assert!(
        again.contains("deleted events (journal._ts): unchanged"),
        "{again}"
    );
    assert!(
        again.contains("snapshots (snapshots._ts): unchanged"),
        "{again}"
    );

    let status = stdout(&run_with_env(
        &database,
        &["purge", "status"],
        &[COSMOS, TTL],
    ));
    assert!(
        status.contains("snapshots (snapshots._ts): TTL index, purged 30d after their last change"),
        "{status}"
    );
}
