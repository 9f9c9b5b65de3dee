//! `eventjournal purge setup|status`: TTL indexes that purge deleted events (`deletedAt`), old
//! snapshots (`insertedAt`) and deleted durable-state objects (`deletedAt`).

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, bail};
use config::{DatabaseMode, Settings};
use mongodb::bson::{DateTime, doc};
use mongodb::options::IndexOptions;
use mongodb::{Database, IndexModel};

use super::{existing_indexes, index_name, short_duration};

/// How long each kind of document stays after it became eligible.
#[derive(Debug, Clone, Default)]
pub struct Expiry {
    pub journal: Option<Duration>,
    pub snapshots: Option<Duration>,
    pub state: Option<Duration>,
}

/// A collection purged by a TTL index on a date field.
struct Target {
    what: &'static str,
    collection: String,
    field: &'static str,
    index: &'static str,
}

fn targets(settings: &Settings) -> [Target; 3] {
    let names = &settings.mongodb.collections;
    [
        Target {
            what: "deleted events",
            collection: names.journal.clone(),
            field: "deletedAt",
            index: "deletedAt_ttl",
        },
        Target {
            what: "snapshots",
            collection: names.snapshots.clone(),
            field: "insertedAt",
            index: "insertedAt_ttl",
        },
        Target {
            what: "deleted durable-state objects",
            collection: names.durable_state.clone(),
            field: "deletedAt",
            index: "deletedAt_ttl",
        },
    ]
}

/// Creates the TTL indexes, or changes their expiry in place (`collMod`); says what it did.
pub async fn setup(
    database: &Database,
    settings: &Settings,
    expiry: &Expiry,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    if settings.mongodb.database_mode == DatabaseMode::Cosmos {
        bail!("purge setup in cosmos mode is not available yet; database-mode = mongo only");
    }
    let wanted = [expiry.journal, expiry.snapshots, expiry.state];
    for (target, expire_after) in targets(settings).into_iter().zip(wanted) {
        let Some(expire_after) = expire_after else {
            continue;
        };
        let seconds = i32::try_from(expire_after.as_secs()).with_context(|| {
            format!(
                "expiry {} for {} is too long",
                short_duration(expire_after),
                target.what
            )
        })?;
        let existing = existing_indexes(database, &target.collection).await?;
        let current = existing
            .iter()
            .find(|index| index_name(index) == target.index);
        let label = format!("{} ({}.{})", target.what, target.collection, target.field);
        match current.and_then(|index| {
            index
                .options
                .as_ref()
                .and_then(|options| options.expire_after)
        }) {
            Some(current) if current.as_secs() == u64::from(seconds.unsigned_abs()) => {
                writeln!(
                    out,
                    "{label}: unchanged, expire after {}",
                    short_duration(current)
                )?;
            }
            Some(current) => {
                database
                    .run_command(doc! {
                        "collMod": &target.collection,
                        "index": { "name": target.index, "expireAfterSeconds": seconds },
                    })
                    .await
                    .with_context(|| format!("changing the TTL index of {}", target.collection))?;
                writeln!(
                    out,
                    "{label}: changed expire after from {} to {}",
                    short_duration(current),
                    short_duration(expire_after)
                )?;
            }
            None => {
                let options = IndexOptions::builder()
                    .name(target.index.to_owned())
                    .expire_after(Duration::from_secs(u64::from(seconds.unsigned_abs())))
                    .build();
                let model = IndexModel::builder()
                    .keys(doc! { target.field: 1 })
                    .options(options)
                    .build();
                database
                    .collection::<mongodb::bson::Document>(&target.collection)
                    .create_index(model)
                    .commit_quorum(mongo::commit_quorum(&settings.mongodb.index_commit_quorum))
                    .await
                    .with_context(|| format!("creating the TTL index of {}", target.collection))?;
                writeln!(
                    out,
                    "{label}: created TTL index, expire after {}",
                    short_duration(expire_after)
                )?;
            }
        }
    }
    Ok(())
}

/// Per collection: the TTL configured, documents carrying the date field, and how many of
/// them are eligible for purging now.
pub async fn status(
    database: &Database,
    settings: &Settings,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    for target in targets(settings) {
        let existing = existing_indexes(database, &target.collection).await?;
        let ttl = existing
            .iter()
            .find(|index| index.keys == doc! { target.field: 1 })
            .and_then(|index| {
                index
                    .options
                    .as_ref()
                    .and_then(|options| options.expire_after)
            });
        let collection = database.collection::<mongodb::bson::Document>(&target.collection);
        let marked = collection
            .count_documents(doc! { target.field: { "$exists": true } })
            .await
            .with_context(|| format!("counting {}", target.collection))?;
        let label = format!("{} ({}.{})", target.what, target.collection, target.field);
        match ttl {
            Some(ttl) => {
                let cutoff = DateTime::from_millis(
                    DateTime::now().timestamp_millis() - ttl.as_millis() as i64,
                );
                let eligible = collection
                    .count_documents(doc! { target.field: { "$lte": cutoff } })
                    .await
                    .with_context(|| format!("counting {}", target.collection))?;
                writeln!(
                    out,
                    "{label}: TTL index, expire after {}; {marked} document(s) carry the field, {eligible} eligible now",
                    short_duration(ttl)
                )?;
            }
            None => writeln!(
                out,
                "{label}: no TTL index; {marked} document(s) carry the field (nothing is purged)"
            )?,
        }
    }
    Ok(())
}
