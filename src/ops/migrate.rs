//! `eventjournal purge migrate`: sets the purge date field on documents written before purging
//! was set up, so the TTL indexes see them.
//!
//! Only documents that may be purged are marked, because on the journal and on durable state
//! the mark is itself a deletion (replay and `GetObject` skip marked documents):
//! - journal: deleted events, that is events at or below their persistence id's deletion mark
//!   in the metadata collection (`DeleteEventsTo` records it there before it marks events),
//!   that lack `deletedAt`. A live event is never marked, and the highest sequence number of
//!   every persistence id whose events are marked is already in the metadata collection, so
//!   it survives the purge. In cosmos mode they also get `ttl` (`write-journal.cosmos-ttl`).
//! - snapshots: every snapshot without `insertedAt` (new snapshots get it when saved).
//! - state: deleted objects (no payload) without `deletedAt`. A live object is never marked.
//!
//! Work goes in batches of `--batch-size` with `--pause` between them, so the database is not
//! loaded by one huge update and later by one huge purge. Every update re-checks that the field
//! is still missing, so an interrupted run can simply be started again: it continues with what
//! is left and never changes a document that already has the field.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, bail};
use config::Settings;
use futures::stream::{self, BoxStream};
use futures::{StreamExt, TryStreamExt, future};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use mongodb::bson::{Bson, DateTime, Document, doc};
use mongodb::{Collection, Database};

use super::Purged;

#[derive(Debug, Clone)]
pub struct Options {
    pub target: Purged,
    /// The value written into the field; the TTL index purges at `date + expire after`.
    pub date: DateTime,
    pub only_deleted: bool,
    pub batch_size: u32,
    pub pause: Duration,
    pub dry_run: bool,
    /// Draw a progress bar on stderr (when it is a terminal).
    pub progress: bool,
}

/// What one run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Documents that lacked the field when counted at the start.
    pub found: u64,
    /// Documents this run marked (0 in a dry run).
    pub marked: u64,
    pub batches: u64,
}

/// A selection of documents to mark in the target collection.
struct Selection {
    filter: Document,
    /// Index to walk, so a selection inside one persistence id never scans the collection.
    hint: Option<Document>,
}

pub async fn migrate(
    database: &Database,
    settings: &Settings,
    options: &Options,
    out: &mut impl Write,
) -> anyhow::Result<Outcome> {
    let (collection_name, field, what) = (
        options.target.collection(settings),
        options.target.date_field(),
        options.target.what(),
    );
    if options.only_deleted && options.target == Purged::Snapshots {
        bail!(
            "--only-deleted does not apply to snapshots: a deleted snapshot is removed at once, \
             so every snapshot left is one to mark"
        );
    }
    let collection = database.collection::<Document>(collection_name);
    let mut mark = doc! { field: options.date };
    if options.target == Purged::Journal
        && let Some(ttl) = journal::cosmos_ttl_seconds(settings)
    {
        mark.insert(journal::document::TTL, ttl);
    }
    let mut found = 0;
    let mut counting = selections(database, settings, options.target, field).await?;
    while let Some(selection) = counting.try_next().await? {
        found += collection
            .count_documents(selection.filter.clone())
            .await
            .with_context(|| format!("counting {collection_name}"))?;
    }
    let date = options.date.try_to_rfc3339_string().unwrap_or_default();
    if options.dry_run {
        writeln!(
            out,
            "dry run: {found} {what} in {collection_name} lack {field} and would be marked \
             {field} = {date}; nothing changed"
        )?;
        return Ok(Outcome {
            found,
            marked: 0,
            batches: 0,
        });
    }

    let progress = progress_bar(found, options.progress);
    let mut marked = 0;
    let mut batches = 0;
    let mut batch: Vec<Bson> = Vec::with_capacity(options.batch_size as usize);
    let mut marking = selections(database, settings, options.target, field).await?;
    while let Some(selection) = marking.try_next().await? {
        let mut find = collection
            .find(selection.filter.clone())
            .projection(doc! { "_id": 1 })
            .batch_size(options.batch_size);
        if let Some(hint) = &selection.hint {
            find = find.hint(mongodb::options::Hint::Keys(hint.clone()));
        }
        let mut ids = find
            .await
            .with_context(|| format!("reading {collection_name}"))?;
        while let Some(document) = ids
            .try_next()
            .await
            .with_context(|| format!("reading {collection_name}"))?
        {
            if let Some(id) = document.get("_id") {
                batch.push(id.clone());
            }
            if batch.len() >= options.batch_size as usize {
                let done = mark_batch(&collection, field, &mark, &mut batch).await?;
                marked += done;
                batches += 1;
                progress.inc(done);
                tokio::time::sleep(options.pause).await;
            }
        }
    }
    if !batch.is_empty() {
        let done = mark_batch(&collection, field, &mark, &mut batch).await?;
        marked += done;
        batches += 1;
        progress.inc(done);
    }
    progress.finish_and_clear();
    writeln!(
        out,
        "marked {marked} {what} in {collection_name} with {field} = {date} in {batches} \
         batch(es) of at most {}",
        options.batch_size
    )?;
    Ok(Outcome {
        found,
        marked,
        batches,
    })
}

/// Sets the mark on the documents of `batch` that still lack the field; how many it marked.
async fn mark_batch(
    collection: &Collection<Document>,
    field: &str,
    mark: &Document,
    batch: &mut Vec<Bson>,
) -> anyhow::Result<u64> {
    let ids = std::mem::take(batch);
    let result = collection
        .update_many(
            doc! { "_id": { "$in": ids }, field: { "$exists": false } },
            doc! { "$set": mark.clone() },
        )
        .await
        .context("marking a batch")?;
    Ok(result.modified_count)
}

/// The documents to mark, as a stream of selections (the journal: one per persistence id with
/// a deletion mark, read from the metadata collection as it goes).
async fn selections(
    database: &Database,
    settings: &Settings,
    target: Purged,
    field: &'static str,
) -> anyhow::Result<BoxStream<'static, anyhow::Result<Selection>>> {
    let names = &settings.mongodb.collections;
    let missing = doc! { "$exists": false };
    let single = |filter: Document| {
        stream::once(future::ready(Ok(Selection { filter, hint: None }))).boxed()
    };
    Ok(match target {
        Purged::Snapshots => single(doc! { field: missing }),
        Purged::State => single(doc! { durable_state::PAYLOAD: missing.clone(), field: missing }),
        Purged::Journal => {
            use journal::document::{HIGHEST_SEQUENCE_NR, PERSISTENCE_ID, SEQUENCE_NR};
            database
                .collection::<Document>(&names.journal_metadata)
                .find(doc! {})
                .sort(doc! { "_id": 1 })
                .await
                .context("reading the journal's deletion marks")?
                .map_err(|error| {
                    anyhow::Error::new(error).context("reading the journal's deletion marks")
                })
                .try_filter_map(move |mark| {
                    let selection = match (mark.get_str("_id"), mark.get_i64(HIGHEST_SEQUENCE_NR)) {
                        (Ok(pid), Ok(deleted_to)) => Some(Selection {
                            filter: doc! {
                                PERSISTENCE_ID: pid,
                                SEQUENCE_NR: { "$lte": deleted_to },
                                field: { "$exists": false },
                            },
                            hint: Some(doc! { PERSISTENCE_ID: 1, SEQUENCE_NR: 1 }),
                        }),
                        _ => None,
                    };
                    future::ready(Ok(selection))
                })
                .boxed()
        }
    })
}

fn progress_bar(total: u64, visible: bool) -> ProgressBar {
    if !visible {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} marked ({eta} left)",
    ) {
        bar.set_style(style);
    }
    bar
}
