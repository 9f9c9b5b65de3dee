//! Incremental backups: the source stage for "what changed since the base".
//!
//! A backup is read at one cluster time T (a snapshot session). An incremental backup on a base
//! read at B holds, per collection, every document whose `_id` was written (inserted, updated,
//! replaced, deleted, purged by TTL) in (B, T], as it is at T, and a tombstone
//! `{"$deleted": <_id>}` for each of those that no longer exists at T. Restoring the base and
//! then replacing those documents (and deleting the tombstoned ones) gives the state at T.
//!
//! Which `_id`s were written comes from the oplog (`local.oplog.rs`, entries with `ts` in
//! (B, T], transactions' `applyOps` unwound): it names every write, whatever wrote it. An `_id`
//! named twice is harmless (its state at T is written twice), so the ids are deduplicated per
//! batch only and memory stays bounded. The oplog must still reach back to B; a collection
//! dropped or renamed since B cannot be followed; both say to take a full backup.

use std::collections::HashSet;

use futures::TryStreamExt as _;
use mongodb::bson::{Bson, Document, RawBson, RawDocumentBuf, Timestamp, doc};
use mongodb::{ClientSession, Database};

use crate::backup::Encoder;
use crate::error::BackupError;
use crate::manifest::{ClusterTime, Manifest};
use crate::store::Store;

/// `_id`s looked up at once.
const LOOKUP_BATCH: usize = 1_000;
/// The field of a tombstone (`$`-prefixed: no stored document of ours has such a field).
pub const DELETED: &str = "$deleted";

/// The interval an incremental backup covers.
#[derive(Debug, Clone)]
pub struct Span {
    /// The base backup.
    pub base: String,
    pub since: Timestamp,
    pub until: Timestamp,
}

pub(crate) fn timestamp(time: ClusterTime) -> Timestamp {
    Timestamp {
        time: time.seconds,
        increment: time.increment,
    }
}

/// The backup an incremental builds on: the newest complete one of the same database and
/// selection.
pub(crate) async fn find_base<S: Store>(
    store: &S,
    database: &str,
    selection: &crate::backup::Selection,
    roles: &[&str],
) -> Result<Manifest, BackupError> {
    let ids = store
        .complete_backups()
        .await
        .map_err(BackupError::io("list the backups"))?;
    // The newest by cluster time (ids order by start time, to the second only).
    let mut newest: Option<Manifest> = None;
    for id in &ids {
        let manifest = crate::restore::read_manifest(store, id).await?;
        let same_roles = manifest.collections.len() == roles.len()
            && manifest
                .collections
                .iter()
                .all(|collection| roles.contains(&collection.role.as_str()));
        let matches = manifest.source_database == database
            && manifest.selection.pid_prefix == selection.pid_prefix
            && manifest.selection.tag == selection.tag
            && same_roles;
        // Two backups of an unchanged database share their cluster time: then the later one.
        let time = |manifest: &Manifest| {
            (
                manifest.cluster_time.seconds,
                manifest.cluster_time.increment,
                humantime::parse_rfc3339(&manifest.created_at).ok(),
            )
        };
        if matches
            && newest
                .as_ref()
                .is_none_or(|newest| time(&manifest) > time(newest))
        {
            newest = Some(manifest);
        }
    }
    if let Some(base) = newest {
        return Ok(base);
    }
    Err(BackupError::NoBase(database.to_owned()))
}

/// The oplog, read on the primary: the backup's time T is majority-committed, so the primary
/// holds every entry up to T (a lagging secondary might not).
fn oplog(database: &Database) -> mongodb::Collection<Document> {
    database.client().database("local").collection_with_options(
        "oplog.rs",
        mongodb::options::CollectionOptions::builder()
            .selection_criteria(mongodb::options::SelectionCriteria::ReadPreference(
                mongodb::options::ReadPreference::Primary,
            ))
            .build(),
    )
}

/// Fails unless the oplog still holds every entry after `since`.
pub(crate) async fn check_oplog_reaches(
    database: &Database,
    since: Timestamp,
    base: &str,
) -> Result<(), BackupError> {
    let oplog = oplog(database);
    let first = oplog
        .find_one(doc! {})
        .sort(doc! { "$natural": 1 })
        .projection(doc! { "ts": 1 })
        .await
        .map_err(|error| {
            BackupError::mongo(
                "read the oplog (an incremental backup needs read access to local.oplog.rs; \
                 the backup role has it)",
                error,
            )
        })?
        .ok_or_else(|| BackupError::Refused("the oplog is empty".to_owned()))?;
    let first = first.get_timestamp("ts").map_err(|error| {
        BackupError::Mongo(format!("the oplog's first entry has no timestamp: {error}"))
    })?;
    if (first.time, first.increment) > (since.time, since.increment) {
        return Err(BackupError::Refused(format!(
            "the oplog no longer reaches back to the base backup {base} (its oldest entry is \
             from {} s after the epoch, the base was read at {}): take a full backup, and back \
             up more often than the oplog window",
            first.time, since.time
        )));
    }
    Ok(())
}

/// Encodes the documents of `name` written in `span`, as they are at `span.until` (the
/// session's snapshot time), and tombstones for those gone.
pub(crate) async fn read_changes(
    database: &Database,
    session: &mut ClientSession,
    name: &str,
    filter: Document,
    span: &Span,
    encoder: &mut Encoder<'_>,
) -> Result<(), BackupError> {
    let namespace = format!("{}.{name}", database.name());
    let commands = format!("{}.$cmd", database.name());
    let what = format!("read the oplog for {name}");
    let oplog = oplog(database);
    let mut entries = oplog
        .find(doc! {
            "ts": { "$gt": span.since, "$lte": span.until },
            "$or": [
                { "ns": &namespace },
                { "o.applyOps.ns": &namespace },
                { "op": "c", "ns": &commands, "o.drop": name },
                { "op": "c", "ns": &commands, "o.dropDatabase": { "$exists": true } },
                { "op": "c", "o.renameCollection": &namespace },
                { "op": "c", "o.to": &namespace },
            ],
        })
        .projection(doc! {
            "op": 1, "ns": 1, "o._id": 1, "o2._id": 1,
            "o.applyOps.op": 1, "o.applyOps.ns": 1, "o.applyOps.o._id": 1,
            "o.applyOps.o2._id": 1,
            "o.drop": 1, "o.dropDatabase": 1, "o.renameCollection": 1, "o.to": 1,
        })
        .await
        .map_err(|error| BackupError::mongo(&what, error))?;
    let mut batch = Vec::new();
    let mut seen = HashSet::new();
    while let Some(entry) = entries
        .try_next()
        .await
        .map_err(|error| BackupError::mongo(&what, error))?
    {
        let mut ids = Vec::new();
        written_ids(&entry, &namespace, &mut ids).map_err(|command| {
            BackupError::Refused(format!(
                "collection {name} was dropped or renamed since the base backup ({command}): \
                 take a full backup"
            ))
        })?;
        for id in ids {
            if seen.insert(key(&id)) {
                batch.push(id);
            }
        }
        if batch.len() >= LOOKUP_BATCH {
            if !look_up(database, session, name, &filter, &batch, encoder).await? {
                return Ok(());
            }
            batch.clear();
            seen.clear();
        }
    }
    if !batch.is_empty() {
        look_up(database, session, name, &filter, &batch, encoder).await?;
    }
    Ok(())
}

/// The `_id`s an oplog entry writes in `namespace`; a command that drops or renames it is an
/// error (its description).
fn written_ids(entry: &Document, namespace: &str, ids: &mut Vec<Bson>) -> Result<(), String> {
    let op = entry.get_str("op").unwrap_or_default();
    let object = entry.get_document("o").ok();
    if op == "c" {
        let Some(object) = object else {
            return Ok(());
        };
        if let Ok(operations) = object.get_array("applyOps") {
            for operation in operations {
                if let Bson::Document(operation) = operation {
                    written_ids(operation, namespace, ids)?;
                }
            }
            return Ok(());
        }
        // Creating the collection (inside a transaction too) changes nothing of its documents;
        // dropping or renaming it does.
        let (database, collection) = namespace.split_once('.').unwrap_or_default();
        let this_database = entry.get_str("ns").ok() == Some(&format!("{database}.$cmd"));
        let dropped = this_database
            && (object.get_str("drop").ok() == Some(collection)
                || object.contains_key("dropDatabase"));
        let renamed = object.get_str("renameCollection").ok() == Some(namespace)
            || object.get_str("to").ok() == Some(namespace);
        if dropped || renamed {
            return Err(format!("{object}"));
        }
        return Ok(());
    }
    if entry.get_str("ns").ok() != Some(namespace) {
        return Ok(());
    }
    let holder = match op {
        "i" | "d" => object,
        "u" => entry.get_document("o2").ok(),
        _ => None,
    };
    if let Some(id) = holder.and_then(|holder| holder.get("_id")) {
        ids.push(id.clone());
    }
    Ok(())
}

fn key(id: &Bson) -> Vec<u8> {
    mongodb::bson::to_vec(&doc! { "k": id }).unwrap_or_default()
}

/// Encodes the documents of `ids` at the snapshot time, and a tombstone for each one gone;
/// false when the later stages stopped.
async fn look_up(
    database: &Database,
    session: &mut ClientSession,
    name: &str,
    filter: &Document,
    ids: &[Bson],
    encoder: &mut Encoder<'_>,
) -> Result<bool, BackupError> {
    let what = format!("read {name}");
    let wanted = doc! { "$and": [{ "_id": { "$in": ids } }, filter.clone()] };
    let mut cursor = crate::backup::snapshot_read(database, name)
        .find(wanted)
        .session(&mut *session)
        .await
        .map_err(|error| BackupError::mongo(&what, error))?;
    let mut found = HashSet::new();
    let mut stream = cursor.stream(&mut *session);
    while let Some(document) = stream
        .try_next()
        .await
        .map_err(|error| BackupError::mongo(&what, error))?
    {
        if let Some(id) = document
            .get("_id")
            .ok()
            .flatten()
            .and_then(|id| Bson::try_from(id.to_raw_bson()).ok())
        {
            found.insert(key(&id));
        }
        if !encoder.push(document.as_bytes()).await {
            return Ok(false);
        }
    }
    for id in ids {
        if found.contains(&key(id)) {
            continue;
        }
        let mut tombstone = RawDocumentBuf::new();
        let raw = RawBson::try_from(id.clone())
            .map_err(|error| BackupError::Mongo(format!("an _id in the oplog: {error}")))?;
        tombstone.append(DELETED, raw);
        if !encoder.push_deleted(tombstone.as_bytes()).await {
            return Ok(false);
        }
    }
    Ok(true)
}
