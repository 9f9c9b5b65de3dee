//! The operator commands, run as an operator runs them, against the real mongod.

mod common;

use std::process::{Command, Output};

use common::{mongodb_uri, unique_database};
use mongodb::bson::doc;

const BINARY: &str = env!("CARGO_BIN_EXE_eventjournal");

fn run(database: &str, args: &[&str]) -> Output {
    Command::new(BINARY)
        .args(args)
        .args(["--mongodb-uri", &mongodb_uri(), "--database", database])
        .env("RUST_LOG", "off")
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
    ] {
        assert!(
            created.contains(expected),
            "{expected:?} missing from:\n{created}"
        );
    }
    assert!(!created.contains("missing"), "{created}");
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
    assert_eq!(
        output.status.code(),
        Some(2),
        "at least one expiry is required"
    );

    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
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
