//! The backup pipeline's stages, each alone and all together, over the same data: what
//! `docs/PERFORMANCE.md` reports ("wall time within 1.2x of the slowest stage alone").
//!
//! ```sh
//! cargo xtask mongod-start --instance bench      # prints URI
//! URI=mongodb://127.0.0.1:PORT/?replicaSet=rs0 MB=1024 \
//!   cargo run --release -p backup --example stages
//! ```
//!
//! Fills `stages.journal` with `MB` MiB of 10 KiB events (every other byte random) if it holds
//! less, then times: the source (a snapshot cursor into memory), SHA-256, each compressor and
//! age over the bytes in memory, and `backup::backup` to a local directory per compression, with
//! and without encryption. Prints an age recipient's public key for timing the binary too.

use std::io::{self, Write};
use std::time::Instant;

use backup::compress::{Compression, Finish};
use futures::TryStreamExt as _;
use mongodb::bson::{Binary, RawDocumentBuf, doc, spec::BinarySubtype};
use sha2::Digest as _;

/// CPU seconds this process has used (user + system).
fn cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let ticks = |index: usize| fields.get(index).and_then(|f| f.parse::<f64>().ok());
    (ticks(11).unwrap_or(0.0) + ticks(12).unwrap_or(0.0)) / 100.0
}

fn report(what: &str, started: Instant, cpu_before: f64) {
    println!(
        "{what:<28} {:>7.2} s wall {:>7.2} s cpu",
        started.elapsed().as_secs_f64(),
        cpu() - cpu_before
    );
}

/// Counts what it is given.
struct Sink;

impl Write for Sink {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Finish for Sink {
    fn finish(self: Box<Self>) -> io::Result<()> {
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let uri = std::env::var("URI").map_err(|_| anyhow::anyhow!("set URI"))?;
    let mebibytes: usize = std::env::var("MB")
        .unwrap_or_else(|_| "256".into())
        .parse()?;
    let client = mongodb::Client::with_uri_str(&uri).await?;
    let database = client.database("stages");
    let journal = database.collection::<mongodb::bson::Document>("journal");
    let stored = journal.estimated_document_count().await? as usize;
    let mut noise: u64 = 0x9e37_79b9_7f4a_7c15;
    // About a MiB per batch of 100 events.
    for batch in stored / 100..mebibytes {
        let events: Vec<_> = (0..100)
            .map(|n| {
                let data: Vec<u8> = (0..10 * 1024)
                    .map(|i| {
                        noise ^= noise << 13;
                        noise ^= noise >> 7;
                        noise ^= noise << 17;
                        if i % 2 == 0 {
                            (noise >> 32) as u8
                        } else {
                            b'a'
                        }
                    })
                    .collect();
                doc! {
                    "pid": format!("p{batch}"),
                    "seqNr": n as i64 + 1,
                    "payload": Binary { subtype: BinarySubtype::Generic, bytes: data },
                }
            })
            .collect();
        journal.insert_many(events).await?;
    }

    let (started, cpu_before) = (Instant::now(), cpu());
    let mut session = client.start_session().snapshot(true).await?;
    let mut cursor = database
        .collection::<RawDocumentBuf>("journal")
        .find(doc! {})
        .batch_size(200)
        .session(&mut session)
        .await?;
    let mut bytes = Vec::new();
    let mut documents = cursor.stream(&mut session);
    while let Some(document) = documents.try_next().await? {
        bytes.extend_from_slice(document.as_bytes());
    }
    drop(documents);
    report(
        &format!("source ({} MiB)", bytes.len() >> 20),
        started,
        cpu_before,
    );

    let (started, cpu_before) = (Instant::now(), cpu());
    std::hint::black_box(sha2::Sha256::digest(&bytes));
    report("sha-256", started, cpu_before);
    let identity = age::x25519::Identity::generate();
    let recipient = identity.to_public();
    for compression in [Compression::Zstd, Compression::Gzip] {
        let (started, cpu_before) = (Instant::now(), cpu());
        let mut writer = compression.compress(Box::new(Sink))?;
        for chunk in bytes.chunks(1 << 20) {
            writer.write_all(chunk)?;
        }
        writer.finish()?;
        report(&format!("{compression}"), started, cpu_before);
    }
    let (started, cpu_before) = (Instant::now(), cpu());
    let mut writer = backup::encrypt::encrypt(std::slice::from_ref(&recipient), Box::new(Sink))?;
    for chunk in bytes.chunks(1 << 20) {
        writer.write_all(chunk)?;
    }
    writer.finish()?;
    report("age", started, cpu_before);
    drop(bytes);

    for (compression, encrypted) in [
        (Compression::None, false),
        (Compression::Zstd, false),
        (Compression::Zstd, true),
    ] {
        let directory = std::env::temp_dir().join("eventjournal-stages");
        let _ = std::fs::remove_dir_all(&directory);
        let options = backup::BackupOptions {
            collections: backup::Collections {
                journal: "journal".into(),
                journal_metadata: "journal_metadata".into(),
                snapshots: "snapshots".into(),
                durable_state: "durable_state".into(),
            },
            selection: backup::Selection {
                collections: vec!["journal".into()],
                ..Default::default()
            },
            compression,
            recipients: if encrypted {
                vec![recipient.to_string()]
            } else {
                Vec::new()
            },
            part_bytes: 5 << 20,
            progress: None,
            incremental: false,
        };
        let store = backup::store::LocalDirectory::new(&directory);
        let (started, cpu_before) = (Instant::now(), cpu());
        backup::backup(&database, &store, &options).await?;
        report(
            &format!(
                "pipeline {compression}{}",
                if encrypted { " + age" } else { "" }
            ),
            started,
            cpu_before,
        );
        let _ = std::fs::remove_dir_all(&directory);
    }
    println!("recipient for timing the binary: {recipient}");
    client.shutdown().await;
    Ok(())
}
