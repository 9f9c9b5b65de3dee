//! `eventjournal indexes list|create`: the indexes each collection needs in the configured mode,
//! created by the same code the server runs at start-up.

use std::io::Write;

use anyhow::Context;
use config::Settings;
use mongodb::{Database, IndexModel};

use super::{existing_indexes, index_name, short_duration};

/// What each collection needs: (collection, indexes).
fn required(settings: &Settings) -> Vec<(String, Vec<IndexModel>)> {
    let names = &settings.mongodb.collections;
    vec![
        (names.journal.clone(), journal::index_models()),
        (names.snapshots.clone(), snapshot::index_models()),
        (names.durable_state.clone(), durable_state::index_models()),
    ]
}

/// Prints each collection's indexes: `ok` or `missing` for the needed ones, `other` for the
/// rest (TTL indexes from `purge setup`, or indexes someone else created). Returns how many
/// are missing.
pub async fn list(
    database: &Database,
    settings: &Settings,
    out: &mut impl Write,
) -> anyhow::Result<usize> {
    let mut missing = 0;
    for (collection, needed) in required(settings) {
        let existing = existing_indexes(database, &collection).await?;
        writeln!(out, "{collection}:")?;
        for index in &needed {
            let name = index_name(index);
            let present = existing
                .iter()
                .any(|candidate| index_name(candidate) == name && candidate.keys == index.keys);
            if !present {
                missing += 1;
            }
            let state = if present { "ok" } else { "missing" };
            writeln!(out, "  {state:<8} {name:<22} {}", index.keys)?;
        }
        for index in &existing {
            let name = index_name(index);
            if name == "_id_" || needed.iter().any(|needed| index_name(needed) == name) {
                continue;
            }
            let ttl = index
                .options
                .as_ref()
                .and_then(|options| options.expire_after);
            let note = ttl.map_or(String::new(), |ttl| {
                format!(" (TTL {})", short_duration(ttl))
            });
            writeln!(out, "  {:<8} {name:<22} {}{note}", "other", index.keys)?;
        }
    }
    if missing > 0 {
        writeln!(
            out,
            "{missing} index(es) missing: run `eventjournal indexes create`"
        )?;
    }
    Ok(missing)
}

/// The needed indexes that do not exist, as `collection.index`.
pub(super) async fn missing(
    database: &Database,
    settings: &Settings,
) -> anyhow::Result<Vec<String>> {
    let mut missing = Vec::new();
    for (collection, needed) in required(settings) {
        let existing = existing_indexes(database, &collection).await?;
        for index in &needed {
            let name = index_name(index);
            if !existing
                .iter()
                .any(|candidate| index_name(candidate) == name && candidate.keys == index.keys)
            {
                missing.push(format!("{collection}.{name}"));
            }
        }
    }
    Ok(missing)
}

/// Creates the missing collections (with `validationLevel: off`) and indexes; existing ones
/// are left alone. The server runs this at start-up when `mongodb.create-indexes` is on.
pub async fn create_missing(database: &Database, settings: &Settings) -> anyhow::Result<()> {
    let names = &settings.mongodb.collections;
    mongo::create_collections(
        database,
        &[
            &names.journal,
            &names.journal_metadata,
            &names.snapshots,
            &names.durable_state,
        ],
    )
    .await
    .context("creating the collections")?;
    // Creating indexes writes no positions: the fixed-drift clock is all it needs.
    let clock = mongo::Watermarks::fixed_drift(settings.read_journal.allowed_time_drift, 0);
    journal::Journal::new(database, settings, clock.clone())
        .create_indexes()
        .await
        .context("creating the journal indexes")?;
    snapshot::SnapshotStore::new(database, settings)
        .create_indexes()
        .await
        .context("creating the snapshot indexes")?;
    durable_state::DurableStateStore::new(database, settings, clock)
        .create_indexes()
        .await
        .context("creating the durable-state indexes")?;
    Ok(())
}

/// `indexes create`: [`create_missing`], then the resulting list.
pub async fn create(
    database: &Database,
    settings: &Settings,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    create_missing(database, settings).await?;
    writeln!(
        out,
        "indexes created (commit quorum {})",
        settings.mongodb.index_commit_quorum
    )?;
    list(database, settings, out).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use config::{DatabaseMode, Settings};

    /// CosmosDB and DocumentDB reject compound indexes over nested fields; none of ours is.
    #[test]
    fn no_index_spans_a_nested_field_in_either_mode() {
        for mode in [DatabaseMode::Mongo, DatabaseMode::Cosmos] {
            let mut settings = Settings::default();
            settings.mongodb.database_mode = mode;
            for (collection, indexes) in super::required(&settings) {
                for index in indexes {
                    for field in index.keys.keys() {
                        assert!(
                            !field.contains('.') && !field.starts_with('$'),
                            "{collection}: index {} is over nested field {field}",
                            super::index_name(&index)
                        );
                    }
                }
            }
        }
    }
}
