//! Restore and verify: the backup's stages backwards. Per collection, the parts are fetched
//! (each checked against its SHA-256 in the manifest, so a corrupted or truncated part is named),
//! decrypted, decompressed and split into BSON documents on a blocking thread, and inserted in
//! batches; what was read is checked against the manifest's count and SHA-256.

use std::io::{self, Read};

use age::x25519::Identity;
use mongodb::Database;
use mongodb::bson::RawDocumentBuf;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use std::collections::HashMap;

use mongodb::bson::Bson;

use crate::error::BackupError;
use crate::incremental::DELETED;
use crate::manifest::{CollectionManifest, MANIFEST, Manifest};
use crate::store::Store;
use crate::{Collections, encrypt};

/// Documents (or bytes) inserted per `insert_many`; with a part and a batch waiting between
/// stages, what bounds a restore's memory.
const BATCH_DOCUMENTS: usize = 1_000;
const BATCH_BYTES: usize = 2 << 20;

#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// The collection names in the target database, by role.
    pub collections: Collections,
    /// Drop the target's collections first; without it a non-empty target is refused.
    pub drop: bool,
}

/// Reads a backup's manifest.
pub async fn read_manifest<S: Store>(store: &S, id: &str) -> Result<Manifest, BackupError> {
    let bytes = store
        .get(&format!("{id}/{MANIFEST}"))
        .await
        .map_err(|error| match error.kind() {
            io::ErrorKind::NotFound => BackupError::NotFound(id.to_owned()),
            _ => BackupError::Io {
                what: format!("read the manifest of {}", store.describe(id)),
                source: error,
            },
        })?;
    Manifest::parse(id, &bytes)
}

/// Reads, decrypts, decompresses and checks every part of backup `id` without restoring; of an
/// incremental backup, of its whole chain.
pub async fn verify<S: Store>(
    store: &S,
    id: &str,
    identities: &[Identity],
) -> Result<Manifest, BackupError> {
    let mut chain = chain(store, id).await?;
    for manifest in &chain {
        check_identities(manifest, identities)?;
        for collection in &manifest.collections {
            read_collection(store, manifest, collection, identities, None).await?;
        }
    }
    chain
        .pop()
        .ok_or_else(|| BackupError::NotFound(id.to_owned()))
}

/// The backups to restore for `id`, oldest first: the full backup its chain starts with, then
/// each incremental on the one before, `id` last.
pub async fn chain<S: Store>(store: &S, id: &str) -> Result<Vec<Manifest>, BackupError> {
    let mut chain = vec![read_manifest(store, id).await?];
    while let Some(base) = chain.last().and_then(|last| last.base.clone()) {
        if chain.len() > 10_000 || chain.iter().any(|manifest| manifest.id == base) {
            return Err(BackupError::Invalid {
                backup: id.to_owned(),
                problem: format!("its chain of bases loops at {base}"),
            });
        }
        let builds_on = chain.last().map(|last| last.id.clone()).unwrap_or_default();
        let manifest = read_manifest(store, &base)
            .await
            .map_err(|error| match error {
                BackupError::NotFound(_) => BackupError::Invalid {
                    backup: id.to_owned(),
                    problem: format!(
                        "{builds_on} is incremental on {base}, which is missing (deleted, or not \
                     complete): the chain cannot be restored"
                    ),
                },
                other => other,
            })?;
        chain.push(manifest);
    }
    chain.reverse();
    Ok(chain)
}

/// Restores backup `id` into `database` (an incremental one: its whole chain, the full backup
/// first) and checks what it restored against the manifests. The caller creates the indexes
/// afterwards.
pub async fn restore<S: Store>(
    store: &S,
    id: &str,
    identities: &[Identity],
    database: &Database,
    options: &RestoreOptions,
) -> Result<Manifest, BackupError> {
    let mut chain = chain(store, id).await?;
    for manifest in &chain {
        check_identities(manifest, identities)?;
    }
    let targets = options.collections.all();
    for (role, name) in targets {
        let collection = database.collection::<RawDocumentBuf>(name);
        if options.drop {
            collection
                .drop()
                .await
                .map_err(|error| BackupError::mongo(&format!("drop {name}"), error))?;
        } else if collection
            .estimated_document_count()
            .await
            .map_err(|error| BackupError::mongo(&format!("count {name}"), error))?
            > 0
        {
            return Err(BackupError::Refused(format!(
                "the target database {} is not empty ({role} collection {name} has documents); \
                 restore into an empty database, or pass --drop to replace its collections",
                database.name()
            )));
        }
    }
    for manifest in &chain {
        let apply = manifest.base.is_some();
        for collection in &manifest.collections {
            let Some((_, name)) = targets.iter().find(|(role, _)| *role == collection.role) else {
                return Err(BackupError::Invalid {
                    backup: manifest.id.clone(),
                    problem: format!("unknown collection role {:?}", collection.role),
                });
            };
            let target = Target {
                collection: database.collection::<RawDocumentBuf>(name),
                apply,
            };
            read_collection(store, manifest, collection, identities, Some(target)).await?;
            if let Some(total) = collection.total {
                let restored = database
                    .collection::<RawDocumentBuf>(name)
                    .count_documents(mongodb::bson::doc! {})
                    .await
                    .map_err(|error| BackupError::mongo(&format!("count {name}"), error))?;
                if restored != total {
                    return Err(BackupError::Invalid {
                        backup: manifest.id.clone(),
                        problem: format!(
                            "{} holds {restored} documents after applying it, the manifest says \
                             {total}",
                            collection.role
                        ),
                    });
                }
            }
            eprintln!(
                "restore {}: {} ({name}): {} documents{}",
                manifest.id,
                collection.role,
                collection.documents,
                if apply {
                    format!(" changed ({} deleted)", collection.deleted)
                } else {
                    String::new()
                }
            );
        }
    }
    chain
        .pop()
        .ok_or_else(|| BackupError::NotFound(id.to_owned()))
}

/// Where a collection's records go: inserted (a full backup), or applied over what is there (an
/// incremental one: each record replaces the document of its `_id`, a tombstone deletes it).
struct Target {
    collection: mongodb::Collection<RawDocumentBuf>,
    apply: bool,
}

impl Target {
    async fn write(&self, batch: Vec<RawDocumentBuf>) -> Result<(), BackupError> {
        let name = self.collection.name();
        let failed = |error| BackupError::mongo(&format!("write into {name}"), error);
        if !self.apply {
            self.collection.insert_many(batch).await.map_err(failed)?;
            return Ok(());
        }
        // The last record of an _id wins (the same _id twice holds the same state anyway).
        let mut latest: HashMap<Vec<u8>, Option<RawDocumentBuf>> = HashMap::new();
        let mut ids = Vec::new();
        for record in batch {
            let (id, deleted) = match record.get(DELETED) {
                Ok(Some(id)) => (id.to_raw_bson(), true),
                _ => match record.get("_id") {
                    Ok(Some(id)) => (id.to_raw_bson(), false),
                    _ => {
                        return Err(BackupError::Mongo(format!(
                            "a record without _id for {name}"
                        )));
                    }
                },
            };
            let mut key = RawDocumentBuf::new();
            key.append("k", id.clone());
            let key = key.into_bytes();
            if !latest.contains_key(&key) {
                ids.push(id);
            }
            latest.insert(key, (!deleted).then_some(record));
        }
        let ids = ids
            .into_iter()
            .map(Bson::try_from)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| BackupError::Mongo(format!("an _id of {name}: {error}")))?;
        let filter = mongodb::bson::doc! { "_id": { "$in": ids } };
        self.collection.delete_many(filter).await.map_err(failed)?;
        let documents: Vec<_> = latest.into_values().flatten().collect();
        if !documents.is_empty() {
            self.collection
                .insert_many(documents)
                .await
                .map_err(failed)?;
        }
        Ok(())
    }
}

fn check_identities(manifest: &Manifest, identities: &[Identity]) -> Result<(), BackupError> {
    if !manifest.recipients.is_empty() && identities.is_empty() {
        return Err(BackupError::Refused(format!(
            "backup {} is encrypted (to {}): give an identity file with one of its keys",
            manifest.id,
            manifest.recipients.join(", ")
        )));
    }
    Ok(())
}

/// Reads one collection's parts through the stages; inserts into `target` if given.
async fn read_collection<S: Store>(
    store: &S,
    manifest: &Manifest,
    collection: &CollectionManifest,
    identities: &[Identity],
    target: Option<Target>,
) -> Result<(), BackupError> {
    let id = manifest.id.clone();
    let invalid = |problem: String| BackupError::Invalid {
        backup: id.clone(),
        problem,
    };
    let (parts, parts_in) = mpsc::channel::<io::Result<Vec<u8>>>(1);
    let (batches, batches_in) = mpsc::channel::<Vec<RawDocumentBuf>>(1);
    let fetch = async {
        // Owned here, so the channel closes when the last part is sent.
        let parts = parts;
        let object = format!("{}/{}", manifest.id, collection.object);
        for (number, part) in collection.parts.iter().enumerate() {
            let named = format!(
                "part {} of {} (bytes {}..{})",
                number + 1,
                collection.object,
                part.offset,
                part.offset + part.bytes
            );
            let fetched = match store
                .get_range(&object, part.offset..part.offset + part.bytes)
                .await
            {
                Err(error) => Err(invalid(format!("{named}: {error}"))),
                Ok(bytes) if bytes.len() as u64 != part.bytes => Err(invalid(format!(
                    "{named} is truncated: {} bytes stored, the manifest says {}",
                    bytes.len(),
                    part.bytes
                ))),
                Ok(bytes) if hex::encode(Sha256::digest(&bytes)) != part.sha256 => Err(invalid(
                    format!("{named} is corrupted (its SHA-256 differs from the manifest's)"),
                )),
                Ok(bytes) => Ok(bytes),
            };
            match fetched {
                Ok(bytes) => {
                    if parts.send(Ok(bytes)).await.is_err() {
                        break;
                    }
                }
                Err(error) => {
                    let _ = parts.send(Err(io::Error::other("part check failed"))).await;
                    return Err(error);
                }
            }
        }
        Ok(())
    };
    let recipients = !manifest.recipients.is_empty();
    let identities = identities.to_vec();
    let compression = manifest.compression;
    let decode = tokio::task::spawn_blocking(move || -> Result<(u64, String), String> {
        let input: Box<dyn Read + Send> = Box::new(PartsReader {
            parts: parts_in,
            current: io::Cursor::new(Vec::new()),
        });
        let input = if recipients {
            encrypt::decrypt(&identities, input)?
        } else {
            input
        };
        let mut input = compression
            .decompress(input)
            .map_err(|error| format!("decompress: {error}"))?;
        let mut hasher = Sha256::new();
        let mut documents = 0;
        let mut batch = Vec::new();
        let mut batch_bytes = 0;
        loop {
            let mut length = [0_u8; 4];
            match read_exact_or_end(&mut input, &mut length) {
                Ok(false) => break,
                Ok(true) => {}
                Err(error) => return Err(format!("read: {error}")),
            }
            let size = i32::from_le_bytes(length);
            if !(5..=48 << 20).contains(&size) {
                return Err(format!("a document of {size} bytes: not BSON"));
            }
            let mut bytes = vec![0_u8; size as usize];
            bytes[..4].copy_from_slice(&length);
            input
                .read_exact(&mut bytes[4..])
                .map_err(|error| format!("read: {error}"))?;
            hasher.update(&bytes);
            documents += 1;
            let document =
                RawDocumentBuf::from_bytes(bytes).map_err(|error| format!("not BSON: {error}"))?;
            batch_bytes += document.as_bytes().len();
            batch.push(document);
            if batch.len() >= BATCH_DOCUMENTS || batch_bytes >= BATCH_BYTES {
                batch_bytes = 0;
                if batches.blocking_send(std::mem::take(&mut batch)).is_err() {
                    return Err("the restore stopped".to_owned());
                }
            }
        }
        if !batch.is_empty() {
            let _ = batches.blocking_send(batch);
        }
        Ok((documents, hex::encode(hasher.finalize())))
    });
    let insert = async {
        // Owned here: if a write fails, the decode thread sees the channel close (borrowed, it
        // blocked on a full channel for ever, and the fetch behind it).
        let mut batches_in = batches_in;
        while let Some(batch) = batches_in.recv().await {
            if let Some(target) = &target {
                target.write(batch).await?;
            }
        }
        Ok::<_, BackupError>(())
    };
    let (fetched, inserted) = tokio::join!(fetch, insert);
    let decoded = decode
        .await
        .map_err(|error| invalid(format!("decode thread: {error}")))?;
    fetched?;
    inserted?;
    let (documents, sha256) = decoded.map_err(|problem| {
        invalid(format!(
            "{} ({}): {problem}",
            collection.role, collection.name
        ))
    })?;
    if documents != collection.documents || sha256 != collection.sha256 {
        return Err(invalid(format!(
            "{}: read {documents} documents (SHA-256 {sha256}), the manifest says {} ({})",
            collection.role, collection.documents, collection.sha256
        )));
    }
    Ok(())
}

/// Fills `buffer` unless the input ends right at its start (false).
fn read_exact_or_end(input: &mut impl Read, buffer: &mut [u8]) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buffer.len() {
        match input.read(&mut buffer[filled..])? {
            0 if filled == 0 => return Ok(false),
            0 => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "truncated")),
            read => filled += read,
        }
    }
    Ok(true)
}

/// The parts of a collection as one reader.
struct PartsReader {
    parts: mpsc::Receiver<io::Result<Vec<u8>>>,
    current: io::Cursor<Vec<u8>>,
}

impl Read for PartsReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let read = self.current.read(buf)?;
            if read > 0 || buf.is_empty() {
                return Ok(read);
            }
            match self.parts.blocking_recv() {
                Some(part) => self.current = io::Cursor::new(part?),
                None => return Ok(0),
            }
        }
    }
}
