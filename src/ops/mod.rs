//! Operator commands: index management and purging. Each takes the same connection settings
//! as `serve` and prints what it did on stdout.

pub mod backup;
pub mod check;
pub mod indexes;
pub mod migrate;
pub mod purge;
pub mod schedule;

use anyhow::Context;
use config::{Settings, redact_uri};
use mongodb::Database;

/// The configured database, reachable and of a kind eventjournal runs on (or one clear error
/// saying what to do); the server and every operator command connect through here.
pub async fn connect(settings: &Settings) -> anyhow::Result<Database> {
    let (database, deployment) = connect_and_detect(settings).await?;
    if let Some(why) = deployment.unsupported(&settings.mongodb) {
        anyhow::bail!(why);
    }
    Ok(database)
}

/// The configured database, reachable, and what kind of deployment it is, whether or not
/// eventjournal can run on it (`check` reports what [`connect`] refuses).
pub async fn connect_and_detect(
    settings: &Settings,
) -> anyhow::Result<(Database, mongo::deployment::Deployment)> {
    let mongodb = &settings.mongodb;
    let database = mongo::connect(mongodb)
        .await
        .context("invalid MongoDB connection settings")?;
    // `hello` is the round trip that finds out whether MongoDB is reachable.
    let deployment = mongo::deployment::detect(&database, &mongodb.uri)
        .await
        .with_context(|| {
            format!(
                "cannot reach MongoDB at {} (waited mongodb.server-selection-timeout = {})",
                redact_uri(&mongodb.uri),
                humantime::format_duration(mongodb.server_selection_timeout)
            )
        })?;
    Ok((database, deployment))
}

/// The collections purging works on, as operators name them (`--collection`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Purged {
    Journal,
    Snapshots,
    State,
}

impl Purged {
    pub const ALL: [Purged; 3] = [Purged::Journal, Purged::Snapshots, Purged::State];

    /// What of it is purged, for messages.
    pub fn what(self) -> &'static str {
        match self {
            Purged::Journal => "deleted events",
            Purged::Snapshots => "snapshots",
            Purged::State => "deleted durable-state objects",
        }
    }

    /// The date field its TTL index purges by on MongoDB.
    pub fn date_field(self) -> &'static str {
        match self {
            Purged::Journal => journal::document::DELETED_AT,
            Purged::Snapshots => snapshot::INSERTED_AT,
            Purged::State => durable_state::DELETED_AT,
        }
    }

    pub fn collection(self, settings: &Settings) -> &str {
        let names = &settings.mongodb.collections;
        match self {
            Purged::Journal => &names.journal,
            Purged::Snapshots => &names.snapshots,
            Purged::State => &names.durable_state,
        }
    }
}

/// MongoDB's code for a collection that does not exist (yet).
const NAMESPACE_NOT_FOUND: i32 = 26;

/// The indexes of `collection`, empty if the collection does not exist yet.
async fn existing_indexes(
    database: &Database,
    collection: &str,
) -> anyhow::Result<Vec<mongodb::IndexModel>> {
    use futures::TryStreamExt;
    let listed = database
        .collection::<mongodb::bson::Document>(collection)
        .list_indexes()
        .await;
    match listed {
        Ok(cursor) => cursor
            .try_collect()
            .await
            .with_context(|| format!("listing the indexes of {collection}")),
        Err(error) if mongo::error_codes(&error).contains(&NAMESPACE_NOT_FOUND) => Ok(Vec::new()),
        Err(error) => Err(error).with_context(|| format!("listing the indexes of {collection}")),
    }
}

fn index_name(index: &mongodb::IndexModel) -> String {
    index
        .options
        .as_ref()
        .and_then(|options| options.name.clone())
        .unwrap_or_default()
}

/// A TTL as operators write it: `365d`, `12h`, `90m` or `45s`.
fn short_duration(duration: std::time::Duration) -> String {
    let seconds = duration.as_secs();
    match seconds {
        0 => "0s".to_owned(),
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3_600 == 0 => format!("{}h", s / 3_600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::short_duration;
    use std::time::Duration;

    #[test]
    fn ttls_read_as_operators_write_them() {
        assert_eq!(short_duration(Duration::from_secs(365 * 86_400)), "365d");
        assert_eq!(short_duration(Duration::from_secs(7_200)), "2h");
        assert_eq!(short_duration(Duration::from_secs(90)), "90s");
        assert_eq!(short_duration(Duration::from_secs(120)), "2m");
    }
}
