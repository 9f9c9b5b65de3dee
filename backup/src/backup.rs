//! Taking a backup: per collection, the source (a cursor in a snapshot session, so every
//! collection is read at one cluster time), the encode step (raw BSON back to back, chunked),
//! compression and encryption on a blocking thread, and the store, all at once over bounded
//! channels.

use std::io::{self, Write};

use futures::TryStreamExt as _;
use mongodb::bson::RawDocumentBuf;
use mongodb::{ClientSession, Database};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::Collections;
use crate::compress::{Compression, Finish};
use crate::encrypt;
use crate::error::BackupError;
use crate::manifest::{
    ClusterTime, CollectionManifest, FORMAT_VERSION, MANIFEST, Manifest, Part, SelectionManifest,
};
use crate::store::{Store, Upload as _};

/// Documents per cursor batch: MongoDB's batches otherwise grow to 16 MiB, which the driver
/// holds twice (the reply and its documents).
const BATCH_DOCUMENTS: u32 = 200;
/// Encoded bytes handed from the cursor to compression at a time.
const CHUNK_BYTES: usize = 1 << 20;
/// Chunks and parts in flight between stages: what bounds memory.
const CHUNKS_IN_FLIGHT: usize = 4;
const PARTS_IN_FLIGHT: usize = 1;

/// What to back up: every collection unless narrowed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// Roles to back up (journal, journal_metadata, snapshots, durable_state); empty: all.
    pub collections: Vec<String>,
    pub pid_prefix: Option<String>,
    pub tag: Option<String>,
}

/// Told, as a backup goes, of each collection's documents and bytes read so far (about once
/// a MiB), for a progress display.
pub type Progress = std::sync::Arc<dyn Fn(&str, u64, u64) + Send + Sync>;

#[derive(Clone)]
pub struct BackupOptions {
    pub collections: Collections,
    pub selection: Selection,
    pub compression: Compression,
    /// age X25519 public keys (`age1...`); empty: not encrypted.
    pub recipients: Vec<String>,
    /// Stored bytes per part.
    pub part_bytes: usize,
    pub progress: Option<Progress>,
    /// Only what changed since the newest backup of the same database and selection.
    pub incremental: bool,
}

/// Takes one backup of `database` into `store` and returns its manifest. On failure nothing
/// complete-looking is left: the parts written are removed, and the manifest (written last)
/// was never stored.
pub async fn backup<S: Store>(
    database: &Database,
    store: &S,
    options: &BackupOptions,
) -> Result<Manifest, BackupError> {
    let recipients = encrypt::recipients(&options.recipients)?;
    let created = std::time::SystemTime::now();
    let id = format!(
        "{}-{}",
        humantime::format_rfc3339_seconds(created)
            .to_string()
            .replace([':', '-'], ""),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let taken = take(database, store, options, &recipients, &id, created).await;
    if taken.is_err()
        && let Err(error) = store.delete_backup(&id).await
    {
        tracing::warn!(%error, backup = %id, "could not remove the parts of a failed backup");
    }
    taken
}

async fn take<S: Store>(
    database: &Database,
    store: &S,
    options: &BackupOptions,
    recipients: &[age::x25519::Recipient],
    id: &str,
    created: std::time::SystemTime,
) -> Result<Manifest, BackupError> {
    let selected: Vec<_> = options
        .collections
        .all()
        .into_iter()
        .filter_map(|(role, name)| {
            crate::source::filter(role, &options.selection).map(|filter| (role, name, filter))
        })
        .collect();
    let base = if options.incremental {
        let roles: Vec<_> = selected.iter().map(|(role, _, _)| *role).collect();
        Some(
            crate::incremental::find_base(store, database.name(), &options.selection, &roles)
                .await?,
        )
    } else {
        None
    };
    // The point in time every collection is read at: the cluster's time now, given to the
    // snapshot session explicitly (a session left to pick its time at its first read gets none
    // when that read finds no collection).
    let snapshot_time = {
        let mut probe = database
            .client()
            .start_session()
            .await
            .map_err(|error| BackupError::mongo("start a session", error))?;
        database
            .run_command(mongodb::bson::doc! { "ping": 1 })
            .session(&mut probe)
            .await
            .map_err(|error| BackupError::mongo("read the cluster time", error))?;
        probe.operation_time().ok_or_else(|| {
            BackupError::Mongo(
                "MongoDB reported no cluster time (a replica set is needed for backups)".to_owned(),
            )
        })?
    };
    let mut session = database
        .client()
        .start_session()
        .snapshot(true)
        .snapshot_time(snapshot_time)
        .await
        .map_err(|error| BackupError::mongo("start a snapshot session", error))?;
    let span = match &base {
        Some(base) => {
            let since = crate::incremental::timestamp(base.cluster_time);
            crate::incremental::check_oplog_reaches(database, since, &base.id).await?;
            Some(crate::incremental::Span {
                base: base.id.clone(),
                since,
                until: snapshot_time,
            })
        }
        None => None,
    };
    let mut collections = Vec::new();
    for (role, name, filter) in selected {
        let total = match span {
            Some(_) => Some(
                snapshot_read(database, name)
                    .count_documents(filter.clone())
                    .session(&mut session)
                    .await
                    .map_err(|error| BackupError::mongo(&format!("count {name}"), error))?,
            ),
            None => None,
        };
        let mut collection = back_up_collection(
            database,
            &mut session,
            store,
            options,
            recipients,
            id,
            role,
            name,
            filter,
            span.as_ref(),
        )
        .await?;
        collection.total = total;
        eprintln!(
            "backup {id}: {role} ({name}): {} documents{}, {} bytes in {} part(s)",
            collection.documents,
            if span.is_some() {
                format!(" changed ({} deleted)", collection.deleted)
            } else {
                String::new()
            },
            collection.bytes,
            collection.parts.len()
        );
        collections.push(collection);
    }
    let cluster_time = ClusterTime {
        seconds: snapshot_time.time,
        increment: snapshot_time.increment,
    };
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        id: id.to_owned(),
        // Milliseconds: two backups of one unchanged database share their cluster time.
        created_at: humantime::format_rfc3339_millis(created).to_string(),
        source_database: database.name().to_owned(),
        cluster_time,
        compression: options.compression,
        recipients: options.recipients.clone(),
        selection: SelectionManifest {
            pid_prefix: options.selection.pid_prefix.clone(),
            tag: options.selection.tag.clone(),
        },
        base: base.as_ref().map(|base| base.id.clone()),
        since: base.as_ref().map(|base| base.cluster_time),
        collections,
    };
    let json = serde_json::to_vec_pretty(&manifest).map_err(io::Error::other);
    let json = json.map_err(BackupError::io("encode the manifest"))?;
    store
        .put(&format!("{id}/{MANIFEST}"), json)
        .await
        .map_err(BackupError::io(format!("store {}", store.describe(id))))?;
    Ok(manifest)
}

#[allow(clippy::too_many_arguments)]
async fn back_up_collection<S: Store>(
    database: &Database,
    session: &mut ClientSession,
    store: &S,
    options: &BackupOptions,
    recipients: &[age::x25519::Recipient],
    id: &str,
    role: &str,
    name: &str,
    filter: mongodb::bson::Document,
    changes: Option<&crate::incremental::Span>,
) -> Result<CollectionManifest, BackupError> {
    let (chunks, mut chunks_in) = mpsc::channel::<Vec<u8>>(CHUNKS_IN_FLIGHT);
    let (parts, parts_in) = mpsc::channel::<Vec<u8>>(PARTS_IN_FLIGHT);
    // Used buffers go back to where they are filled: a backup allocates its chunks and parts
    // once (re-allocating them faulted in fresh pages for every MiB, a third of the CPU time).
    let (used_chunks, chunks_back) = std::sync::mpsc::channel::<Vec<u8>>();
    let (used_parts, parts_back) = std::sync::mpsc::channel::<Vec<u8>>();
    // Compress and encrypt: CPU work, on a thread of its own.
    let compression = options.compression;
    let recipients_given = !recipients.is_empty();
    let recipients = recipients.to_vec();
    let part_bytes = options.part_bytes.max(1);
    let transform = tokio::task::spawn_blocking(move || -> io::Result<()> {
        let splitter = PartSplitter {
            buffer: Vec::with_capacity(part_bytes),
            part_bytes,
            parts,
            used: parts_back,
        };
        let mut writer =
            compression.compress(encrypt::encrypt(&recipients, Box::new(splitter))?)?;
        while let Some(chunk) = chunks_in.blocking_recv() {
            writer.write_all(&chunk)?;
            let _ = used_chunks.send(chunk);
        }
        writer.finish()
    });
    // Store the parts as they come, as one object.
    let object = format!(
        "{role}.bson{}{}",
        options.compression.extension(),
        if recipients_given { ".age" } else { "" }
    );
    let path = format!("{id}/{object}");
    let where_to = || format!("store {}/{object}", store.describe(id));
    let mut upload = store
        .upload(&path)
        .await
        .map_err(BackupError::io(where_to()))?;
    let stored = async {
        // Owned here: if storing fails, the compression thread sees the channel close.
        let mut parts_in = parts_in;
        let mut stored = Vec::new();
        let mut offset = 0;
        while let Some(bytes) = parts_in.recv().await {
            let part = Part {
                offset,
                bytes: bytes.len() as u64,
                sha256: hex::encode(Sha256::digest(&bytes)),
            };
            offset += part.bytes;
            if let Some(used) = upload.part(bytes).await? {
                let _ = used_parts.send(used);
            }
            stored.push(part);
        }
        Ok::<_, io::Error>(stored)
    };
    // Read and encode: the whole collection, or what changed since the base.
    let read = async {
        let mut encoder = Encoder::new(chunks, chunks_back, role, options.progress.as_ref());
        let what = format!("read {name}");
        match changes {
            None => {
                let mut cursor = snapshot_read(database, name)
                    .find(filter)
                    .batch_size(BATCH_DOCUMENTS)
                    .session(&mut *session)
                    .await
                    .map_err(|error| BackupError::mongo(&what, error))?;
                let mut stream = cursor.stream(&mut *session);
                while let Some(document) = stream
                    .try_next()
                    .await
                    .map_err(|error| BackupError::mongo(&what, error))?
                {
                    if !encoder.push(document.as_bytes()).await {
                        break;
                    }
                }
            }
            Some(span) => {
                crate::incremental::read_changes(
                    database,
                    session,
                    name,
                    filter,
                    span,
                    &mut encoder,
                )
                .await?;
                // The oplog may have been truncated past the base while this was read: then
                // entries were gone before they were seen.
                crate::incremental::check_oplog_reaches(database, span.since, &span.base).await?;
            }
        }
        Ok::<_, BackupError>(encoder.finish().await)
    };
    let (read, stored) = tokio::join!(read, stored);
    let transformed = transform
        .await
        .map_err(|error| BackupError::Mongo(format!("compression thread: {error}")));
    // The object is complete only when every stage was: otherwise its upload is aborted.
    let outcome = (|| {
        let encoded = read?;
        let parts = stored.map_err(BackupError::io(where_to()))?;
        transformed?.map_err(BackupError::io(format!("compress and encrypt {name}")))?;
        Ok::<_, BackupError>((encoded, parts))
    })();
    let (encoded, parts) = match outcome {
        Ok(outcome) => outcome,
        Err(error) => {
            eprintln!("backup {id}: {role} failed ({error}); aborting the upload of {object}");
            if let Err(abort) = upload.abort().await {
                eprintln!(
                    "backup {id}: could not abort the upload of {} ({abort}): its parts stay \
                     stored until the store expires incomplete uploads",
                    store.describe(id)
                );
            }
            return Err(error);
        }
    };
    upload.finish().await.map_err(BackupError::io(where_to()))?;
    Ok(CollectionManifest {
        role: role.to_owned(),
        name: name.to_owned(),
        object,
        documents: encoded.documents,
        deleted: encoded.deleted,
        total: None,
        bytes: encoded.bytes,
        sha256: encoded.sha256,
        parts,
    })
}

/// `name` read in the snapshot session: the read concern must say `snapshot` itself, or the
/// driver keeps the database's (e.g. `majority`) and the reads are not at one point in time.
pub(crate) fn snapshot_read(
    database: &Database,
    name: &str,
) -> mongodb::Collection<RawDocumentBuf> {
    database.collection_with_options(
        name,
        mongodb::options::CollectionOptions::builder()
            .read_concern(mongodb::options::ReadConcern::snapshot())
            .build(),
    )
}

/// The encode stage: documents back to back, in chunks handed to compression, counted and
/// hashed as they go.
pub(crate) struct Encoder<'a> {
    chunks: mpsc::Sender<Vec<u8>>,
    used: std::sync::mpsc::Receiver<Vec<u8>>,
    chunk: Vec<u8>,
    hasher: Sha256,
    documents: u64,
    deleted: u64,
    bytes: u64,
    role: &'a str,
    progress: Option<&'a Progress>,
}

pub(crate) struct Encoded {
    documents: u64,
    deleted: u64,
    bytes: u64,
    sha256: String,
}

impl<'a> Encoder<'a> {
    fn new(
        chunks: mpsc::Sender<Vec<u8>>,
        used: std::sync::mpsc::Receiver<Vec<u8>>,
        role: &'a str,
        progress: Option<&'a Progress>,
    ) -> Self {
        Self {
            chunks,
            used,
            chunk: Vec::with_capacity(CHUNK_BYTES),
            hasher: Sha256::new(),
            documents: 0,
            deleted: 0,
            bytes: 0,
            role,
            progress,
        }
    }

    /// Adds a document (raw BSON); false when the later stages stopped (their error says why).
    pub(crate) async fn push(&mut self, raw: &[u8]) -> bool {
        self.hasher.update(raw);
        self.documents += 1;
        self.bytes += raw.len() as u64;
        self.chunk.extend_from_slice(raw);
        if self.chunk.len() < CHUNK_BYTES {
            return true;
        }
        if let Some(progress) = self.progress {
            progress(self.role, self.documents, self.bytes);
        }
        let next = reuse(&self.used, CHUNK_BYTES);
        let full = std::mem::replace(&mut self.chunk, next);
        self.chunks.send(full).await.is_ok()
    }

    /// Adds a deletion record (an incremental backup's tombstone).
    pub(crate) async fn push_deleted(&mut self, raw: &[u8]) -> bool {
        self.deleted += 1;
        self.push(raw).await
    }

    async fn finish(mut self) -> Encoded {
        if let Some(progress) = self.progress {
            progress(self.role, self.documents, self.bytes);
        }
        if !self.chunk.is_empty() {
            let _ = self.chunks.send(std::mem::take(&mut self.chunk)).await;
        }
        Encoded {
            documents: self.documents,
            deleted: self.deleted,
            bytes: self.bytes,
            sha256: hex::encode(self.hasher.finalize()),
        }
    }
}

/// A buffer handed back after use, emptied, or a new one.
fn reuse(used: &std::sync::mpsc::Receiver<Vec<u8>>, capacity: usize) -> Vec<u8> {
    match used.try_recv() {
        Ok(mut buffer) => {
            buffer.clear();
            buffer
        }
        Err(_) => Vec::with_capacity(capacity),
    }
}

/// The last writer of the chain: cuts the stored stream into parts of `part_bytes` and hands
/// them to the store.
struct PartSplitter {
    buffer: Vec<u8>,
    part_bytes: usize,
    parts: mpsc::Sender<Vec<u8>>,
    used: std::sync::mpsc::Receiver<Vec<u8>>,
}

impl PartSplitter {
    fn send(&mut self) -> io::Result<()> {
        let next = reuse(&self.used, self.part_bytes);
        let part = std::mem::replace(&mut self.buffer, next);
        self.parts
            .blocking_send(part)
            .map_err(|_| io::Error::other("the store stopped"))
    }
}

impl Write for PartSplitter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = self.part_bytes - self.buffer.len();
        let taken = buf.len().min(room);
        self.buffer.extend_from_slice(&buf[..taken]);
        if self.buffer.len() == self.part_bytes {
            self.send()?;
        }
        Ok(taken)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Finish for PartSplitter {
    fn finish(mut self: Box<Self>) -> io::Result<()> {
        if !self.buffer.is_empty() {
            self.send()?;
        }
        Ok(())
    }
}
