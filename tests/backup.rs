//! Backups end to end through the binary: `eventjournal backup`, `backup list|verify|prune` and
//! `restore`, against the test mongod, into a temporary directory.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::proxy::CuttableProxy;
use common::read::tagged;
use common::*;
use futures::TryStreamExt;
use mongodb::bson::{Document, doc};
use proto::v1 as pb;

const BINARY: &str = env!("CARGO_BIN_EXE_eventjournal");
const COLLECTIONS: [&str; 4] = ["journal", "journal_metadata", "snapshots", "durable_state"];

fn run(database: &str, args: &[&str]) -> Output {
    Command::new(BINARY)
        .args(args)
        .args(["--mongodb-uri", &mongodb_uri(), "--database", database])
        .env("RUST_LOG", "off")
        // Small parts: every collection spans several.
        .env("EVENTJOURNAL_BACKUP__PART_SIZE", "1KiB")
        .output()
        .unwrap()
}

fn succeeded(output: &Output) -> String {
    assert!(
        output.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

/// The one `error:` line of a failed command.
fn failed(output: &Output) -> String {
    assert!(
        !output.status.success(),
        "succeeded: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8(output.stderr.clone()).unwrap()
}

fn scratch(name: &str) -> PathBuf {
    let directory = std::env::temp_dir().join(format!(
        "ej_backup_{name}_{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&directory).unwrap();
    directory
}

/// A local backup's manifest.
fn manifest(directory: &Path, id: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(directory.join(id).join("manifest.json")).unwrap())
        .unwrap()
}

/// The backup id from `backup`'s output line.
fn backup_id(out: &str) -> String {
    out.split_whitespace().nth(1).unwrap().to_owned()
}

/// An age identity and its recipient, as `age-keygen` would make them.
fn key_pair(directory: &Path) -> (PathBuf, String) {
    let identity = age::x25519::Identity::generate();
    let recipient = identity.to_public().to_string();
    let file = directory.join("key.txt");
    use age::secrecy::ExposeSecret;
    std::fs::write(
        &file,
        format!("# test key\n{}\n", identity.to_string().expose_secret()),
    )
    .unwrap();
    (file, recipient)
}

/// Events (some deleted, leaving metadata), snapshots and durable state, through the service.
async fn populate(server: &TestServer) {
    let mut journal = server.journal().await;
    for pid in ["a", "b", "c"] {
        let writes = (1..=100)
            .map(|n| atomic(vec![tagged(pid, n, &["t", pid])]))
            .collect();
        assert!(write(&mut journal, writes).await.iter().all(is_written));
    }
    journal
        .delete_events_to(pb::DeleteEventsToRequest {
            persistence_id: "b".into(),
            to_sequence_nr: 5,
        })
        .await
        .unwrap();
    let mut snapshots =
        proto::v1::snapshot_store_client::SnapshotStoreClient::new(server.channel().await);
    for (pid, sequence_nr) in [("a", 10), ("c", 20)] {
        snapshots
            .save_snapshot(pb::SaveSnapshotRequest {
                metadata: Some(pb::SnapshotMetadata {
                    persistence_id: pid.into(),
                    sequence_nr,
                    timestamp_millis: 0,
                    metadata: None,
                }),
                snapshot: Some(payload(&format!("{pid}-{sequence_nr}"))),
            })
            .await
            .unwrap();
    }
    let mut state =
        proto::v1::durable_state_store_client::DurableStateStoreClient::new(server.channel().await);
    for (pid, tag) in [("s1", "t"), ("s2", "")] {
        state
            .upsert_object(pb::UpsertObjectRequest {
                persistence_id: pid.into(),
                revision: 1,
                value: Some(payload(pid)),
                tag: tag.into(),
            })
            .await
            .unwrap();
    }
}

async fn documents(database: &str, collection: &str) -> Vec<Document> {
    mongodb::Client::with_uri_str(mongodb_uri())
        .await
        .unwrap()
        .database(database)
        .collection::<Document>(collection)
        .find(doc! {})
        .sort(doc! { "_id": 1 })
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap()
}

/// Every document of every collection, field by field with its type, is what it was.
async fn assert_same(original: &str, restored: &str) {
    for collection in COLLECTIONS {
        let before = documents(original, collection).await;
        let after = documents(restored, collection).await;
        assert!(!before.is_empty(), "{collection} has test data");
        assert_eq!(after, before, "{collection} restored bit-exact");
    }
}

#[tokio::test]
async fn a_compressed_encrypted_backup_restores_bit_exact_and_verifies() {
    let server = TestServer::start("bk_roundtrip").await;
    populate(&server).await;
    let directory = scratch("roundtrip");
    let dir = directory.to_str().unwrap();
    let (key, recipient) = key_pair(&directory);
    for (compression, encrypted) in [("zstd", true), ("gzip", false)] {
        let mut args = vec!["backup", "--directory", dir, "--compression", compression];
        if encrypted {
            args.extend(["--recipient", &recipient]);
        }
        let out = succeeded(&run(&server.database, &args));
        assert!(out.contains("complete:") && out.contains(dir), "{out}");
        let id = backup_id(&out);
        let journal_parts = manifest(&directory, &id)["collections"][0]["parts"]
            .as_array()
            .unwrap()
            .len();
        assert!(journal_parts > 1, "{journal_parts} journal parts");
        let listed = succeeded(&run(
            &server.database,
            &["backup", "list", "--directory", dir],
        ));
        assert!(listed.contains(&id), "{listed}");
        let key_args = ["--identity-file", key.to_str().unwrap()];
        let mut verify = vec!["backup", "verify", &id, "--directory", dir];
        if encrypted {
            verify.extend(key_args);
        }
        assert!(succeeded(&run(&server.database, &verify)).contains("verified"));
        let target = unique_database(&format!("bk_rt_{compression}"));
        let mut restore = vec!["restore", &id, "--directory", dir];
        if encrypted {
            restore.extend(key_args);
        }
        let out = succeeded(&run(&target, &restore));
        assert!(out.contains("checked against the manifest"), "{out}");
        assert_same(&server.database, &target).await;
        let indexes = succeeded(&run(&target, &["indexes", "list"]));
        assert!(!indexes.contains("missing"), "{indexes}");
    }
    std::fs::remove_dir_all(directory).unwrap();
}

#[tokio::test]
async fn bad_keys_bad_parts_and_bad_targets_are_clear_errors_and_change_nothing() {
    let server = TestServer::start("bk_faults").await;
    populate(&server).await;
    let directory = scratch("faults");
    let dir = directory.to_str().unwrap();
    let (key, recipient) = key_pair(&directory);
    let out = succeeded(&run(
        &server.database,
        &["backup", "--directory", dir, "--recipient", &recipient],
    ));
    let id = backup_id(&out);

    // No key, and a key that is not a recipient.
    let error = failed(&run(
        &server.database,
        &["backup", "verify", &id, "--directory", dir],
    ));
    assert!(
        error.contains("is encrypted") && error.contains(&recipient),
        "{error}"
    );
    let other = scratch("other_key");
    let (other_key, _) = key_pair(&other);
    let error = failed(&run(
        &server.database,
        &[
            "backup",
            "verify",
            &id,
            "--directory",
            dir,
            "--identity-file",
            other_key.to_str().unwrap(),
        ],
    ));
    assert!(
        error.contains("none of the given identities is a recipient"),
        "{error}"
    );

    // A non-empty target without --drop is refused, and left as it was.
    let error = failed(&run(
        &server.database,
        &[
            "restore",
            &id,
            "--directory",
            dir,
            "--identity-file",
            key.to_str().unwrap(),
        ],
    ));
    assert!(
        error.contains("is not empty") && error.contains("--drop"),
        "{error}"
    );
    assert_eq!(documents(&server.database, "journal").await.len(), 300);

    // A corrupted part and a truncated one are named.
    let part = directory.join(&id).join("journal.bson.zst.age");
    let original = std::fs::read(&part).unwrap();
    let mut corrupted = original.clone();
    let middle = corrupted.len() / 2;
    corrupted[middle] ^= 0xff;
    std::fs::write(&part, &corrupted).unwrap();
    let key_arg = ["--identity-file", key.to_str().unwrap()];
    let verify = |args: &[&str]| run(&server.database, args);
    let error = failed(&verify(
        &[
            &["backup", "verify", &id, "--directory", dir][..],
            &key_arg[..],
        ]
        .concat(),
    ));
    assert!(
        error.contains("journal.bson.zst.age") && error.contains("is corrupted"),
        "{error}"
    );
    // The corrupted byte's part, by number and byte range.
    let parts = manifest(&directory, &id)["collections"][0]["parts"].clone();
    let broken = parts
        .as_array()
        .unwrap()
        .iter()
        .position(|part| {
            let offset = part["offset"].as_u64().unwrap() as usize;
            (offset..offset + part["bytes"].as_u64().unwrap() as usize).contains(&middle)
        })
        .unwrap();
    assert!(
        error.contains(&format!("part {} of journal.bson.zst.age", broken + 1)),
        "{error}"
    );
    std::fs::write(&part, &original[..original.len() - 10]).unwrap();
    let error = failed(&verify(
        &[
            &["backup", "verify", &id, "--directory", dir][..],
            &key_arg[..],
        ]
        .concat(),
    ));
    let last = parts.as_array().unwrap().len();
    assert!(
        error.contains(&format!("part {last} of journal.bson.zst.age"))
            && error.contains("truncated"),
        "{error}"
    );
    // A restore of the damaged backup stops with the same message.
    let target = unique_database("bk_damaged");
    let error = failed(&run(
        &target,
        &[&["restore", &id, "--directory", dir][..], &key_arg[..]].concat(),
    ));
    assert!(
        error.contains("journal.bson.zst.age") && error.contains("truncated"),
        "{error}"
    );
    std::fs::write(&part, &original).unwrap();

    // A manifest of a newer format is refused by name.
    let manifest = directory.join(&id).join("manifest.json");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(
        &manifest,
        text.replace("\"formatVersion\": 2", "\"formatVersion\": 3"),
    )
    .unwrap();
    let error = failed(&verify(
        &[
            &["backup", "verify", &id, "--directory", dir][..],
            &key_arg[..],
        ]
        .concat(),
    ));
    assert!(error.contains("format version 3 is newer"), "{error}");

    // An unknown backup.
    let error = failed(&run(
        &server.database,
        &["backup", "verify", "nope", "--directory", dir],
    ));
    assert!(error.contains("no backup nope"), "{error}");
    std::fs::remove_dir_all(directory).unwrap();
    std::fs::remove_dir_all(other).unwrap();
}

/// Writers keep writing during the backup: every persistence id restores to a gapless prefix
/// of its events (the collections are read at one cluster time).
#[tokio::test]
async fn a_backup_under_concurrent_writes_restores_gapless_prefixes() {
    let server = TestServer::start("bk_load").await;
    let directory = scratch("load");
    let dir = directory.to_str().unwrap().to_owned();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for writer in 0..4 {
        let mut journal = server.journal().await;
        let mut state = proto::v1::durable_state_store_client::DurableStateStoreClient::new(
            server.channel().await,
        );
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let pid = format!("w{writer}");
            let mut next = 1;
            let mut revision = 1;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let size = 1 + next % 3;
                let events = (next..next + size)
                    .map(|n| tagged(&pid, n, &["load"]))
                    .collect();
                let outcome = write(&mut journal, vec![atomic(events)]).await;
                assert!(is_written(&outcome[0]), "{outcome:?}");
                next += size;
                // A second collection changing all the while.
                state
                    .upsert_object(pb::UpsertObjectRequest {
                        persistence_id: pid.clone(),
                        revision,
                        value: Some(payload(&format!("{pid} at {next}"))),
                        tag: String::new(),
                    })
                    .await
                    .unwrap();
                revision += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let database = server.database.clone();
    let out = tokio::task::spawn_blocking(move || {
        succeeded(&run(
            &database,
            &["backup", "--directory", &dir, "--compression", "none"],
        ))
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for writer in writers {
        writer.await.unwrap();
    }
    let target = unique_database("bk_load_restored");
    succeeded(&run(
        &target,
        &[
            "restore",
            &backup_id(&out),
            "--directory",
            directory.to_str().unwrap(),
        ],
    ));
    let restored = documents(&target, "journal").await;
    let mut by_pid: std::collections::BTreeMap<String, Vec<i64>> = Default::default();
    for event in &restored {
        by_pid
            .entry(event.get_str("pid").unwrap().to_owned())
            .or_default()
            .push(event.get_i64("seqNr").unwrap());
    }
    let written = documents(&server.database, "journal").await.len();
    assert!(
        restored.len() < written,
        "the writers went on after the backup's cluster time"
    );
    for (pid, mut numbers) in by_pid {
        numbers.sort();
        assert_eq!(
            numbers,
            (1..=numbers.len() as i64).collect::<Vec<_>>(),
            "{pid}: a gapless prefix"
        );
    }
    // Every collection is the source as it was at the manifest's cluster time: one point in
    // time for all, not each read when its turn came.
    let time = &manifest(&directory, &backup_id(&out))["clusterTime"];
    let at = mongodb::bson::Timestamp {
        time: time["seconds"].as_u64().unwrap() as u32,
        increment: time["increment"].as_u64().unwrap() as u32,
    };
    for collection in ["journal", "durable_state"] {
        let then = documents_at(&server.database, collection, at).await;
        let restored = documents(&target, collection).await;
        assert!(!then.is_empty(), "{collection} had documents");
        assert!(
            then == restored,
            "{collection}: {} documents at the backup's time, {} restored",
            then.len(),
            restored.len()
        );
    }
    std::fs::remove_dir_all(directory).unwrap();
}

/// A collection's documents as they were at cluster time `at` (a snapshot read).
async fn documents_at(
    database: &str,
    collection: &str,
    at: mongodb::bson::Timestamp,
) -> Vec<Document> {
    let client = mongodb::Client::with_uri_str(mongodb_uri()).await.unwrap();
    let mut session = client
        .start_session()
        .snapshot(true)
        .snapshot_time(at)
        .await
        .unwrap();
    let collection = client
        .database(database)
        .collection_with_options::<Document>(
            collection,
            mongodb::options::CollectionOptions::builder()
                .read_concern(mongodb::options::ReadConcern::snapshot())
                .build(),
        );
    let mut cursor = collection
        .find(doc! {})
        .sort(doc! { "_id": 1 })
        .session(&mut session)
        .await
        .unwrap();
    cursor.stream(&mut session).try_collect().await.unwrap()
}

#[tokio::test]
async fn a_selection_backs_up_only_what_it_names() {
    let server = TestServer::start("bk_select").await;
    populate(&server).await;
    let directory = scratch("select");
    let dir = directory.to_str().unwrap();
    let out = succeeded(&run(
        &server.database,
        &[
            "backup",
            "--directory",
            dir,
            "--collection",
            "journal",
            "--pid-prefix",
            "a",
        ],
    ));
    let target = unique_database("bk_select_restored");
    succeeded(&run(
        &target,
        &["restore", &backup_id(&out), "--directory", dir],
    ));
    let restored = documents(&target, "journal").await;
    assert_eq!(restored.len(), 100);
    assert!(
        restored
            .iter()
            .all(|event| event.get_str("pid").unwrap() == "a")
    );
    assert!(documents(&target, "snapshots").await.is_empty());
    std::fs::remove_dir_all(directory).unwrap();
}

/// Retention with a clock moved forward: keep-last and keep-within keep exactly what they say.
#[tokio::test]
async fn prune_keeps_what_the_policy_says() {
    let server = TestServer::start("bk_prune").await;
    populate(&server).await;
    let directory = scratch("prune");
    let dir = directory.to_str().unwrap();
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(backup_id(&succeeded(&run(
            &server.database,
            &["backup", "--directory", dir],
        ))));
        // Backup times have second resolution.
        tokio::time::sleep(Duration::from_millis(1_100)).await;
    }
    let store = backup::store::LocalDirectory::new(&directory);
    let now = std::time::SystemTime::now();
    let hour = Duration::from_secs(3600);
    let prunable = |keep_last, keep_within, now| {
        eventjournal::ops::backup::prunable(&store, keep_last, keep_within, now)
    };
    assert!(
        prunable(0, hour, now).await.unwrap().is_empty(),
        "all younger than an hour"
    );
    assert_eq!(
        prunable(1, hour, now + 2 * hour).await.unwrap(),
        ids[..2],
        "keep the last one"
    );
    assert_eq!(
        prunable(0, hour, now + 2 * hour).await.unwrap(),
        ids,
        "all too old"
    );
    assert_eq!(
        prunable(5, hour, now + 2 * hour).await.unwrap(),
        Vec::<String>::new()
    );
    // The command deletes what the policy does not keep.
    let out = succeeded(&run(
        &server.database,
        &[
            "backup",
            "prune",
            "--directory",
            dir,
            "--keep-last",
            "1",
            "--keep-within",
            "0s",
        ],
    ));
    assert_eq!(out.lines().count(), 2, "{out}");
    let listed = succeeded(&run(
        &server.database,
        &["backup", "list", "--directory", dir],
    ));
    assert!(
        listed.contains(&ids[2]) && !listed.contains(&ids[0]),
        "{listed}"
    );
    std::fs::remove_dir_all(directory).unwrap();
}

/// Makes MongoDB fail the third `find` of clients named by the connection string returned (a
/// backup's third collection: the journal and its metadata are read first).
async fn fail_third_find(name: &str) -> String {
    fail_command_after(name, "find", 2).await
}

/// Makes MongoDB fail `command` after `skip` successes, for clients named by the connection
/// string returned.
async fn fail_command_after(name: &str, command: &str, skip: i32) -> String {
    let app = format!("{name}_{}", std::process::id());
    fail_after(&app, skip, command, doc! { "errorCode": 2 }).await;
    let separator = if mongodb_uri().contains('?') {
        '&'
    } else {
        '?'
    };
    format!("{}{separator}appName={app}", mongodb_uri())
}

/// MongoDB failing mid-backup (the third collection's read, after the journal's parts were
/// stored): the backup fails with the error, and nothing of it is left or listed.
#[tokio::test]
async fn a_backup_failing_midway_leaves_nothing_that_looks_complete() {
    let _failpoint = failpoint_turn().await;
    let server = TestServer::start("bk_midway").await;
    populate(&server).await;
    let directory = scratch("midway");
    let dir = directory.to_str().unwrap();
    let uri = fail_third_find("bk_midway").await;
    let output = Command::new(BINARY)
        .args(["backup", "--directory", dir, "--mongodb-uri", &uri])
        .args(["--database", &server.database])
        .env("RUST_LOG", "off")
        .env("EVENTJOURNAL_BACKUP__PART_SIZE", "1KiB")
        .output()
        .unwrap();
    failpoint_off().await;
    let error = failed(&output);
    assert!(error.contains("read snapshots"), "{error}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("journal (journal)"),
        "the journal was stored first: {stderr}"
    );
    let left: Vec<_> = std::fs::read_dir(&directory).unwrap().collect();
    assert!(
        left.is_empty(),
        "parts of the failed backup were left: {left:?}"
    );
    let listed = succeeded(&run(
        &server.database,
        &["backup", "list", "--directory", dir],
    ));
    assert!(listed.is_empty(), "{listed}");
    std::fs::remove_dir_all(directory).unwrap();
}

/// Memory stays flat whatever the data size: a backup of 128 MiB of incompressible events,
/// compressed and encrypted, peaks well under 100 MB of resident memory (the process's
/// high-water mark, read while it runs), and its restore too.
#[tokio::test]
async fn backing_up_128_mib_keeps_memory_flat() {
    use rand_like::Noise;
    let database = unique_database("bk_memory");
    let client = mongodb::Client::with_uri_str(mongodb_uri()).await.unwrap();
    let journal = client.database(&database).collection::<Document>("journal");
    let mut noise = Noise(0x9e37_79b9_7f4a_7c15);
    for batch in 0..128 {
        let documents: Vec<Document> = (0..100)
            .map(|n| {
                let data: Vec<u8> = (0..10 * 1024).map(|_| noise.byte()).collect();
                doc! {
                    "pid": format!("m{batch}"),
                    "seqNr": n as i64 + 1,
                    "payload": mongodb::bson::Binary { subtype: mongodb::bson::spec::BinarySubtype::Generic, bytes: data },
                }
            })
            .collect();
        journal.insert_many(documents).await.unwrap();
    }
    let directory = scratch("memory");
    let dir = directory.to_str().unwrap().to_owned();
    let (key, recipient) = key_pair(&std::env::temp_dir());
    let args = ["backup", "--directory", &dir, "--recipient", &recipient];
    let (out, peak) = run_measured(&database, &args).await;
    eprintln!("backup of 128 MiB: peak RSS {peak} bytes");
    assert!(
        peak < 100_000_000,
        "backup peaked at {peak} bytes of resident memory"
    );
    let id = backup_id(&out);
    let target = unique_database("bk_memory_restored");
    let key = key.to_str().unwrap().to_owned();
    let (_, peak) = run_measured(
        &target,
        &["restore", &id, "--directory", &dir, "--identity-file", &key],
    )
    .await;
    eprintln!("restore of 128 MiB: peak RSS {peak} bytes");
    assert!(
        peak < 100_000_000,
        "restore peaked at {peak} bytes of resident memory"
    );
    std::fs::remove_dir_all(directory).unwrap();
}

/// Runs the binary, reading its resident high-water mark while it runs; its stdout and peak.
async fn run_measured(database: &str, args: &[&str]) -> (String, u64) {
    let mut child = Command::new(BINARY)
        .args(args)
        .args(["--mongodb-uri", &mongodb_uri(), "--database", database])
        .env("RUST_LOG", "off")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak = 0;
    while child.try_wait().unwrap().is_none() {
        if let Ok(status) = std::fs::read_to_string(&status_file)
            && let Some(line) = status.lines().find(|line| line.starts_with("VmHWM:"))
        {
            let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
            peak = peak.max(kib * 1024);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let output = child.wait_with_output().unwrap();
    (succeeded(&output), peak)
}

mod rand_like {
    /// A xorshift generator: incompressible test bytes without a dependency.
    pub struct Noise(pub u64);

    impl Noise {
        pub fn byte(&mut self) -> u8 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 32) as u8
        }
    }
}

/// The S3-compatible test server (`cargo xtask test` starts moto and sets this).
fn s3_endpoint() -> String {
    std::env::var("EVENTJOURNAL_TEST_S3_ENDPOINT").expect(
        "EVENTJOURNAL_TEST_S3_ENDPOINT is not set: run the suite with `cargo xtask test` \
         (it starts the S3 test server)",
    )
}

/// A new bucket on the S3 test server (which does not check signatures: plain requests do).
async fn new_bucket(name: &str) -> String {
    let bucket = format!("{name}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let response = http()
        .put(format!("{}/{bucket}", s3_endpoint()))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{response:?}");
    bucket
}

/// A plain HTTP client (reqwest's TLS, unused here, wants the process's crypto provider).
fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

async fn s3_text(url: String) -> String {
    http().get(url).send().await.unwrap().text().await.unwrap()
}

/// Multipart uploads begun and neither completed nor aborted in `bucket`.
async fn uploads_in_progress(bucket: &str) -> Vec<String> {
    let listing = s3_text(format!("{}/{bucket}?uploads", s3_endpoint())).await;
    listing
        .split("<Upload>")
        .skip(1)
        .map(|upload| upload.split("</Upload>").next().unwrap().to_owned())
        .collect()
}

/// The keys of the objects under `prefix` in `bucket`.
async fn s3_keys(bucket: &str, prefix: &str) -> Vec<String> {
    let listing = s3_text(format!(
        "{}/{bucket}?list-type=2&prefix={prefix}",
        s3_endpoint()
    ))
    .await;
    listing
        .split("<Key>")
        .skip(1)
        .map(|key| key.split("</Key>").next().unwrap().to_owned())
        .collect()
}

/// No multipart upload in progress in `bucket`, no object under `b/`, and no backup listed at
/// `location`: what a failed backup to S3 leaves.
async fn assert_nothing_left(database: &str, bucket: &str, location: &str, context: &str) {
    assert!(uploads_in_progress(bucket).await.is_empty(), "{context}");
    assert_eq!(s3_keys(bucket, "b/").await, Vec::<String>::new());
    let listed = succeeded(&run_s3(database, &["backup", "list", "--s3", location]));
    assert!(listed.is_empty(), "{listed}");
}

/// The binary with an S3 store at `endpoint` (credentials from the AWS environment variables,
/// as a deployment would give them), parts of 5 MiB (S3's smallest).
fn s3_command(database: &str, endpoint: &str, args: &[&str]) -> Command {
    s3_command_on(&mongodb_uri(), database, endpoint, args)
}

fn s3_command_on(uri: &str, database: &str, endpoint: &str, args: &[&str]) -> Command {
    let mut command = Command::new(BINARY);
    command
        .args(args)
        .args(["--mongodb-uri", uri, "--database", database])
        .env("RUST_LOG", "off")
        .env("EVENTJOURNAL_BACKUP__S3__ENDPOINT", endpoint)
        .env("EVENTJOURNAL_BACKUP__S3__RETRY_TIMEOUT", "3s")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1");
    command
}

fn run_s3(database: &str, args: &[&str]) -> Output {
    s3_command(database, &s3_endpoint(), args).output().unwrap()
}

/// `count` events of 64 KiB of noise for `pid`: about 6 MB per 100, so a collection spans
/// several 5 MiB parts even compressed.
async fn write_noise(server: &TestServer, pid: &str, count: i64) {
    use rand_like::Noise;
    let mut noise = Noise(0x2545_f491_4f6c_dd1d ^ count as u64);
    let mut journal = server.journal().await;
    for from in (1..=count).step_by(20) {
        let writes = (from..(from + 20).min(count + 1))
            .map(|n| {
                let mut event = tagged(pid, n, &["noise"]);
                event.payload = Some(pb::Payload {
                    data: (0..64 * 1024).map(|_| noise.byte()).collect(),
                    serializer_id: 1,
                    manifest: String::new(),
                });
                atomic(vec![event])
            })
            .collect();
        assert!(write(&mut journal, writes).await.iter().all(is_written));
    }
}

/// The same round trip to an S3-compatible server: the backup is uploaded as multipart uploads
/// of 5 MiB parts, listed, verified and restored bit-exact from the bucket.
#[tokio::test]
async fn a_backup_to_s3_restores_bit_exact_and_verifies() {
    let server = TestServer::start("bk_s3").await;
    populate(&server).await;
    write_noise(&server, "big", 200).await;
    let bucket = new_bucket("roundtrip").await;
    let location = format!("s3://{bucket}/nightly");
    let keys = scratch("s3_keys");
    let (key, recipient) = key_pair(&keys);
    let out = succeeded(&run_s3(
        &server.database,
        &["backup", "--s3", &location, "--recipient", &recipient],
    ));
    assert!(out.contains(&format!("{location}/")), "{out}");
    let id = backup_id(&out);
    // One object per collection, the journal's a multipart upload of several parts (S3 gives
    // a multipart object the ETag "<md5 of the parts' md5s>-<parts>").
    let listing = s3_text(format!(
        "{}/{bucket}?list-type=2&prefix=nightly/{id}/",
        s3_endpoint()
    ))
    .await;
    let journal = listing
        .split("<Contents>")
        .find(|object| object.contains("/journal.bson.zst.age</Key>"))
        .unwrap_or_else(|| panic!("no journal object: {listing}"));
    let parts: u32 = journal
        .split("<ETag>")
        .nth(1)
        .and_then(|etag| etag.split("</ETag>").next())
        .and_then(|etag| etag.trim_end_matches("&#34;").rsplit('-').next())
        .and_then(|parts| parts.parse().ok())
        .unwrap_or_else(|| panic!("not a multipart object: {journal}"));
    assert!(parts >= 2, "{parts} parts: {journal}");
    assert_eq!(s3_keys(&bucket, &format!("nightly/{id}/")).await.len(), 5);
    assert!(uploads_in_progress(&bucket).await.is_empty());

    let listed = succeeded(&run_s3(
        &server.database,
        &["backup", "list", "--s3", &location],
    ));
    assert!(listed.contains(&id), "{listed}");
    let key_args = ["--identity-file", key.to_str().unwrap()];
    let verified = succeeded(&run_s3(
        &server.database,
        &[
            &["backup", "verify", &id, "--s3", &location][..],
            &key_args[..],
        ]
        .concat(),
    ));
    assert!(verified.contains("verified"), "{verified}");
    let target = unique_database("bk_s3_restored");
    let out = succeeded(&run_s3(
        &target,
        &[&["restore", &id, "--s3", &location][..], &key_args[..]].concat(),
    ));
    assert!(out.contains("checked against the manifest"), "{out}");
    assert_same(&server.database, &target).await;
    std::fs::remove_dir_all(keys).unwrap();
}

/// MongoDB failing mid-backup with an S3 store: the upload under way is aborted (no
/// multipart upload left), the objects already stored are deleted, nothing is listed.
#[tokio::test]
async fn a_failed_backup_to_s3_aborts_its_upload_and_leaves_nothing() {
    let _failpoint = failpoint_turn().await;
    let server = TestServer::start("bk_s3_fail").await;
    populate(&server).await;
    let bucket = new_bucket("failing").await;
    let location = format!("s3://{bucket}/b");
    let uri = fail_third_find("bk_s3_fail").await;
    let output = s3_command_on(
        &uri,
        &server.database,
        &s3_endpoint(),
        &["backup", "--s3", &location],
    )
    .output()
    .unwrap();
    failpoint_off().await;
    let error = failed(&output);
    assert!(error.contains("read snapshots"), "{error}");
    assert!(
        error.contains("aborting the upload of snapshots.bson.zst"),
        "{error}"
    );
    assert_nothing_left(&server.database, &bucket, &location, "").await;
}

/// The S3 store becoming unreachable while a part is uploading: the backup fails naming the
/// store, aborts its multipart upload once the store answers again, and nothing of it is
/// listed or left in the bucket.
#[tokio::test]
async fn an_s3_store_unreachable_mid_upload_leaves_no_complete_backup() {
    use std::io::BufRead as _;
    let server = TestServer::start("bk_s3_cut").await;
    write_noise(&server, "big", 300).await;
    let bucket = new_bucket("cut").await;
    let location = format!("s3://{bucket}/b");
    let moto: std::net::SocketAddr = s3_endpoint().trim_start_matches("http://").parse().unwrap();
    let proxy = CuttableProxy::start(moto).await;
    // Parts one at a time, slowed down: the cut falls between the first part and the last.
    proxy.set_delay(Duration::from_millis(20));
    let mut child = s3_command(
        &server.database,
        &format!("http://{}", proxy.address),
        &["backup", "--s3", &location],
    )
    .env("EVENTJOURNAL_BACKUP__UPLOAD_PARALLELISM", "1")
    .stderr(std::process::Stdio::piped())
    .stdout(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let (lines, mut lines_in) = tokio::sync::mpsc::unbounded_channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let _ = lines.send(line.unwrap());
        }
    });
    // Wait until the journal's upload holds a part, then cut.
    wait_until("a part uploaded", Duration::from_secs(60), || async {
        let uploads = uploads_in_progress(&bucket).await;
        let Some(upload) = uploads.first() else {
            return false;
        };
        let field = |name: &str| {
            upload
                .split(&format!("<{name}>"))
                .nth(1)
                .and_then(|rest| rest.split(&format!("</{name}>")).next())
                .unwrap()
                .to_owned()
        };
        let parts = s3_text(format!(
            "{}/{bucket}/{}?uploadId={}",
            s3_endpoint(),
            field("Key"),
            field("UploadId")
        ))
        .await;
        parts.contains("<Part>")
    })
    .await;
    proxy.cut();
    let mut seen = Vec::new();
    loop {
        let line = tokio::time::timeout(Duration::from_secs(60), lines_in.recv())
            .await
            .expect("the backup reports its failure")
            .expect("the backup reports its failure before exiting");
        seen.push(line.clone());
        if line.contains("aborting the upload") {
            break;
        }
    }
    // The store answers again: the abort and the clean-up go through.
    proxy.restore();
    proxy.set_delay(Duration::ZERO);
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    while let Ok(Some(line)) = tokio::time::timeout(Duration::from_secs(5), lines_in.recv()).await {
        seen.push(line);
    }
    let stderr = seen.join("\n");
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("error:") && stderr.contains(&format!("s3://{bucket}/b/")),
        "{stderr}"
    );
    assert_nothing_left(&server.database, &bucket, &location, &stderr).await;
}

/// Incremental backups: a chain full -> incremental -> incremental, with new events, deleted and
/// purged events, saved and deleted snapshots, changed and deleted durable state between them,
/// restores to the same state as a full backup taken at the same moment (and as the source);
/// retention keeps every base of a kept incremental; a missing base is a clear error.
#[tokio::test]
async fn an_incremental_chain_restores_what_a_full_backup_restores() {
    let server = TestServer::start_with("bk_incr", quick_purge).await;
    let directory = scratch("incremental");
    let dir = directory.to_str().unwrap();
    let backup = |args: &[&str]| {
        let mut all = vec!["backup", "--directory", dir];
        all.extend_from_slice(args);
        backup_id(&succeeded(&run(&server.database, &all)))
    };
    // Nothing to build on yet.
    let error = failed(&run(
        &server.database,
        &["backup", "--directory", dir, "--incremental"],
    ));
    assert!(error.contains("take a full backup first"), "{error}");

    populate(&server).await;
    let full = backup(&[]);

    let mut journal = server.journal().await;
    let mut snapshots =
        proto::v1::snapshot_store_client::SnapshotStoreClient::new(server.channel().await);
    let mut state =
        proto::v1::durable_state_store_client::DurableStateStoreClient::new(server.channel().await);
    let more = |pid: &'static str, range: std::ops::RangeInclusive<i64>| {
        range
            .map(|n| atomic(vec![tagged(pid, n, &["t", pid])]))
            .collect::<Vec<_>>()
    };
    assert!(
        write(&mut journal, more("a", 101..=150))
            .await
            .iter()
            .all(is_written)
    );
    assert!(
        write(&mut journal, more("d", 1..=20))
            .await
            .iter()
            .all(is_written)
    );
    journal
        .delete_events_to(pb::DeleteEventsToRequest {
            persistence_id: "c".into(),
            to_sequence_nr: 50,
        })
        .await
        .unwrap();
    let snapshot = |pid: &str, sequence_nr| pb::SnapshotMetadata {
        persistence_id: pid.into(),
        sequence_nr,
        timestamp_millis: 0,
        metadata: None,
    };
    snapshots
        .save_snapshot(pb::SaveSnapshotRequest {
            metadata: Some(snapshot("a", 120)),
            snapshot: Some(payload("a-120")),
        })
        .await
        .unwrap();
    snapshots
        .delete_snapshot(pb::DeleteSnapshotRequest {
            metadata: Some(snapshot("c", 20)),
        })
        .await
        .unwrap();
    state
        .upsert_object(pb::UpsertObjectRequest {
            persistence_id: "s1".into(),
            revision: 2,
            value: Some(payload("s1 again")),
            tag: "t".into(),
        })
        .await
        .unwrap();
    state
        .delete_object(pb::DeleteObjectRequest {
            persistence_id: "s2".into(),
            revision: 0,
        })
        .await
        .unwrap();
    let first = backup(&["--incremental"]);

    // Events written, deleted and purged by TTL between the two incrementals.
    assert!(
        write(&mut journal, more("e", 1..=10))
            .await
            .iter()
            .all(is_written)
    );
    journal
        .delete_events_to(pb::DeleteEventsToRequest {
            persistence_id: "e".into(),
            to_sequence_nr: 10,
        })
        .await
        .unwrap();
    let database = server.mongodb().await;
    purge_deleted_events(&database, "e", Duration::from_secs(60)).await;
    let deleted = database.collection::<Document>("journal");
    wait_until(
        "every deleted event purged",
        Duration::from_secs(60),
        || async {
            deleted
                .count_documents(doc! { "deletedAt": { "$exists": true } })
                .await
                .unwrap()
                == 0
        },
    )
    .await;
    assert!(
        write(&mut journal, more("a", 151..=160))
            .await
            .iter()
            .all(is_written)
    );
    state
        .upsert_object(pb::UpsertObjectRequest {
            persistence_id: "s3".into(),
            revision: 1,
            value: Some(payload("s3")),
            tag: String::new(),
        })
        .await
        .unwrap();
    let second = backup(&["--incremental"]);
    let full_now = backup(&[]);

    // Each incremental names its base and holds only what changed.
    let first_manifest = manifest(&directory, &first);
    assert_eq!(first_manifest["base"], full.as_str());
    assert_eq!(manifest(&directory, &second)["base"], first.as_str());
    let journal_records = first_manifest["collections"][0]["documents"]
        .as_u64()
        .unwrap();
    assert_eq!(journal_records, 50 + 20 + 50, "new a, new d, deleted c");
    let snapshot_records = &first_manifest["collections"][2];
    assert_eq!(snapshot_records["deleted"], 1, "{snapshot_records}");
    let listed = succeeded(&run(
        &server.database,
        &["backup", "list", "--directory", dir],
    ));
    assert!(
        listed.contains(&format!("{second}  "))
            && listed.contains(&format!("incremental on {first}")),
        "{listed}"
    );

    // The chain restores to what the full backup restores, which is the source.
    let verified = succeeded(&run(
        &server.database,
        &["backup", "verify", &second, "--directory", dir],
    ));
    assert!(
        verified.contains("and the 2 backups it builds on"),
        "{verified}"
    );
    let chained = unique_database("bk_incr_chain");
    let out = succeeded(&run(&chained, &["restore", &second, "--directory", dir]));
    assert!(out.contains("incremental: with the 2 backups"), "{out}");
    let whole = unique_database("bk_incr_full");
    succeeded(&run(&whole, &["restore", &full_now, "--directory", dir]));
    assert_same(&whole, &chained).await;
    assert_same(&server.database, &chained).await;

    // Retention keeps the bases of a kept incremental.
    let store = backup::store::LocalDirectory::new(&directory);
    let later = std::time::SystemTime::now() + Duration::from_secs(3600);
    let prunable =
        |keep_last| eventjournal::ops::backup::prunable(&store, keep_last, Duration::ZERO, later);
    assert_eq!(
        prunable(2).await.unwrap(),
        Vec::<String>::new(),
        "the second needs both"
    );
    let mut not_needed = vec![full.clone(), first.clone(), second.clone()];
    not_needed.sort();
    let mut pruned = prunable(1).await.unwrap();
    pruned.sort();
    assert_eq!(pruned, not_needed, "only the newest full backup is kept");

    // A chain with a missing link is refused by name.
    std::fs::remove_dir_all(directory.join(&first)).unwrap();
    let error = failed(&run(
        &unique_database("bk_incr_broken"),
        &["restore", &second, "--directory", dir],
    ));
    assert!(
        error.contains(&format!("is incremental on {first}, which is missing")),
        "{error}"
    );
    std::fs::remove_dir_all(directory).unwrap();
}

/// `backup schedule`: full backups every 3 s and incremental ones every second (cron with
/// seconds), pruned to the last 3 and their bases after each. The process is stopped (SIGSTOP)
/// for a few seconds: the runs it slept through are logged and counted as missed, and it goes
/// on. SIGTERM ends it.
#[tokio::test]
async fn the_schedule_takes_full_and_incremental_backups_and_counts_missed_runs() {
    let server = TestServer::start("bk_schedule").await;
    populate(&server).await;
    let directory = scratch("schedule");
    let dir = directory.to_str().unwrap();
    let port = free_port();
    let log = directory.join("schedule.log");
    let child = Command::new(BINARY)
        .args(["backup", "schedule", "--directory", dir])
        .args([
            "--mongodb-uri",
            &mongodb_uri(),
            "--database",
            &server.database,
        ])
        .env("RUST_LOG", "off")
        .env("EVENTJOURNAL_BACKUP__PART_SIZE", "1KiB")
        .env("EVENTJOURNAL_BACKUP__SCHEDULE__FULL", "*/3 * * * * *")
        .env("EVENTJOURNAL_BACKUP__SCHEDULE__INCREMENTAL", "* * * * * *")
        .env(
            "EVENTJOURNAL_BACKUP__SCHEDULE__METRICS_LISTEN",
            format!("127.0.0.1:{port}"),
        )
        .env("EVENTJOURNAL_BACKUP__KEEP_LAST", "3")
        .env("EVENTJOURNAL_BACKUP__KEEP_WITHIN", "0s")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    // A failing assertion must not leave the scheduler running.
    struct KillOnDrop(String);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = Command::new("kill")
                .args(["-9", &self.0])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
    let _guard = KillOnDrop(pid.clone());
    let list = || {
        succeeded(&run(
            &server.database,
            &["backup", "list", "--directory", dir],
        ))
    };
    wait_until(
        "full and incremental backups",
        Duration::from_secs(60),
        || async {
            let listed = list();
            listed.contains("  full") && listed.contains("incremental on")
        },
    )
    .await;
    let signal = |name: &str| {
        assert!(
            Command::new("kill")
                .args([name, &pid])
                .status()
                .unwrap()
                .success()
        );
    };
    signal("-STOP");
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    signal("-CONT");
    let missed = |metrics: &str| {
        ["full", "incremental"]
            .iter()
            .filter_map(|kind| {
                metric(
                    metrics,
                    &format!("eventjournal_backup_missed_runs_total{{kind=\"{kind}\"}}"),
                )
            })
            .sum::<f64>()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let metrics = loop {
        let metrics = fetch_metrics(port).await;
        if missed(&metrics) >= 2.0 {
            break metrics;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no missed runs: {metrics}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let ran = |kind: &str, outcome: &str| {
        metric(
            &metrics,
            &format!("eventjournal_backup_runs_total{{kind=\"{kind}\",outcome=\"{outcome}\"}}"),
        )
        .unwrap_or(0.0)
    };
    assert!(ran("full", "success") >= 1.0, "{metrics}");
    assert!(ran("incremental", "success") >= 1.0, "{metrics}");
    assert_eq!(ran("full", "failure") + ran("incremental", "failure"), 0.0);

    signal("-TERM");
    let output = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(output.status.success(), "{log}");
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("backup schedule stopped"),
        "{log}"
    );
    assert!(log.contains("missed the"), "{log}");
    // Pruned after each run: the last three, and every base a kept incremental needs.
    let listed = list();
    let ids: Vec<&str> = listed
        .lines()
        .map(|line| line.split("  ").next().unwrap())
        .collect();
    for line in listed.lines() {
        if let Some(base) = line.split("incremental on ").nth(1) {
            assert!(ids.contains(&base.trim()), "{base} pruned: {listed}");
        }
    }
    let newest = ids.last().unwrap();
    assert!(
        ids.len() < 10,
        "pruned to the last 3 and their bases: {listed}"
    );
    succeeded(&run(
        &server.database,
        &["backup", "verify", newest, "--directory", dir],
    ));
    std::fs::remove_dir_all(directory).unwrap();
}

/// The gRPC `BackupService`, admin role only: a backup started over gRPC runs as a job with
/// progress, is listed, and restores (as a job too) into another database bit-exact; bad
/// requests are clear errors.
#[tokio::test]
async fn the_backup_service_backs_up_and_restores_for_admins_only() {
    use config::auth::{Role, Token};
    use proto::v1::backup_service_client::BackupServiceClient;
    use tonic::{Code, Request};
    const ADMIN: &str = "admin-token-0123456789";
    const READER: &str = "reader-token-0123456789";
    let writer = TestServer::start("bk_grpc").await;
    populate(&writer).await;
    let directory = scratch("grpc");
    let mut settings = test_settings(&writer.database);
    settings.auth.enabled = true;
    settings.auth.tokens = vec![
        Token::new("projector", &[Role::Read], READER),
        Token::new("ops", &[Role::Admin], ADMIN),
    ];
    settings.backup.directory = directory.clone();
    settings.backup.part_size = bytesize::ByteSize::kib(1);
    let server = TestServer::start_on_database(settings).await;
    let mut client = BackupServiceClient::new(server.channel().await);
    fn with<T>(token: &str, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        request
    }

    let denied = client
        .start_backup(with(READER, pb::StartBackupRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains("admin"), "{denied:?}");

    let job = client
        .start_backup(with(ADMIN, pb::StartBackupRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (job.kind.as_str(), job.state.as_str()),
        ("backup", "running")
    );
    let finished = |client: &mut BackupServiceClient<tonic::transport::Channel>, id: String| {
        let mut client = client.clone();
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            loop {
                let job = client
                    .get_job(with(ADMIN, pb::GetJobRequest { job_id: id.clone() }))
                    .await
                    .unwrap()
                    .into_inner();
                if job.state != "running" {
                    return job;
                }
                assert!(std::time::Instant::now() < deadline, "{job:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let done = finished(&mut client, job.job_id.clone()).await;
    assert_eq!(done.state, "succeeded", "{done:?}");
    assert!(done.finished_at_millis >= done.started_at_millis);
    let journal = done
        .progress
        .iter()
        .find(|progress| progress.collection == "journal")
        .unwrap_or_else(|| panic!("{done:?}"));
    assert_eq!(journal.documents, 300);

    let listed = client
        .list_backups(with(ADMIN, pb::ListBackupsRequest {}))
        .await
        .unwrap()
        .into_inner()
        .backups;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, done.backup_id);
    assert_eq!(listed[0].source_database, writer.database);

    // Bad requests: the served database, no target, an unknown backup, an unknown job.
    for (request, code, says) in [
        (
            pb::StartRestoreRequest {
                backup_id: done.backup_id.clone(),
                target_database: writer.database.clone(),
                ..Default::default()
            },
            Code::InvalidArgument,
            "is the database this server serves",
        ),
        (
            pb::StartRestoreRequest {
                backup_id: done.backup_id.clone(),
                ..Default::default()
            },
            Code::InvalidArgument,
            "target_database",
        ),
        (
            pb::StartRestoreRequest {
                backup_id: "20260101T000000Z-00000000".into(),
                target_database: "elsewhere".into(),
                ..Default::default()
            },
            Code::NotFound,
            "no complete backup",
        ),
    ] {
        let error = client
            .start_restore(with(ADMIN, request))
            .await
            .unwrap_err();
        assert_eq!(error.code(), code, "{error:?}");
        assert!(error.message().contains(says), "{error:?}");
    }
    let error = client
        .get_job(with(
            ADMIN,
            pb::GetJobRequest {
                job_id: "nope".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::NotFound, "{error:?}");

    let target = unique_database("bk_grpc_restored");
    let job = client
        .start_restore(with(
            ADMIN,
            pb::StartRestoreRequest {
                backup_id: done.backup_id.clone(),
                target_database: target.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let restored = finished(&mut client, job.job_id).await;
    assert_eq!(restored.state, "succeeded", "{restored:?}");
    assert_same(&writer.database, &target).await;
    let indexes = succeeded(&run(&target, &["indexes", "list"]));
    assert!(!indexes.contains("missing"), "{indexes}");
    // Into a database that now has data: the job fails, saying why.
    let job = client
        .start_restore(with(
            ADMIN,
            pb::StartRestoreRequest {
                backup_id: done.backup_id,
                target_database: target,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let failed_job = finished(&mut client, job.job_id).await;
    assert_eq!(failed_job.state, "failed");
    assert!(failed_job.error.contains("is not empty"), "{failed_job:?}");
    std::fs::remove_dir_all(directory).unwrap();
}

/// MongoDB failing an insert in the middle of a restore: the restore stops with the error
/// (it used to wait for ever, its decoding thread blocked on a batch nobody would take).
#[tokio::test]
async fn a_restore_failing_midway_reports_the_failure_and_does_not_hang() {
    let _failpoint = failpoint_turn().await;
    let server = TestServer::start("bk_restore_fail").await;
    write_noise(&server, "big", 200).await;
    let directory = scratch("restore_fail");
    let dir = directory.to_str().unwrap();
    let id = backup_id(&succeeded(&run(
        &server.database,
        &["backup", "--directory", dir],
    )));
    let uri = fail_command_after("bk_restore_fail", "insert", 1).await;
    let target = unique_database("bk_restore_fail_target");
    let mut child = Command::new(BINARY)
        .args(["restore", &id, "--directory", dir])
        .args(["--mongodb-uri", &uri, "--database", &target])
        .env("RUST_LOG", "off")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    failpoint_off().await;
    if child.try_wait().unwrap().is_none() {
        child.kill().unwrap();
        panic!("the restore did not end within 60 s of MongoDB failing an insert");
    }
    let output = child.wait_with_output().unwrap();
    let error = failed(&output);
    assert!(error.contains("write into journal"), "{error}");
    std::fs::remove_dir_all(directory).unwrap();
}
