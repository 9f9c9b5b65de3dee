//! `eventjournal purge setup|status`: TTL indexes that purge deleted events (`deletedAt`), old
//! snapshots (`insertedAt`) and deleted durable-state objects (`deletedAt`).

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, bail};
use config::{DatabaseMode, Settings};
use mongodb::bson::{DateTime, doc};
use mongodb::options::IndexOptions;
use mongodb::{Database, IndexModel};

use super::{Purged, existing_indexes, index_name, short_duration};

/// How long each kind of document stays after it became eligible.
#[derive(Debug, Clone, Default)]
pub struct Expiry {
    pub journal: Option<Duration>,
    pub snapshots: Option<Duration>,
    pub state: Option<Duration>,
}

/// A collection purged by a TTL index: on its date field in mongo mode, on CosmosDB's `_ts` in
/// cosmos mode (CosmosDB ignores TTL indexes on other fields).
struct Target {
    kind: Purged,
    what: &'static str,
    collection: String,
    field: &'static str,
    /// `<field>_ttl`.
    index: String,
}

fn targets(settings: &Settings) -> [Target; 3] {
    let cosmos = settings.mongodb.database_mode == DatabaseMode::Cosmos;
    Purged::ALL.map(|kind| {
        let field = if cosmos { "_ts" } else { kind.date_field() };
        Target {
            kind,
            what: kind.what(),
            collection: kind.collection(settings).to_owned(),
            field,
            index: format!("{field}_ttl"),
        }
    })
}

/// CosmosDB's largest TTL (about 68 years). Its "TTL on, no default" is -1, which MongoDB and
/// DocumentDB reject; this value means the same in practice and every database accepts it.
const COSMOS_NO_DEFAULT_TTL: i32 = i32::MAX;

/// The TTL index one target gets for a requested expiry.
struct Plan {
    seconds: i32,
    /// How documents expire, as the operator reads it.
    expiry: String,
    /// Why it differs from mongo mode, if it does.
    why: Option<String>,
}

fn plan(settings: &Settings, target: &Target, requested: Duration) -> anyhow::Result<Plan> {
    let seconds = |duration: Duration| {
        i32::try_from(duration.as_secs()).with_context(|| {
            format!(
                "expiry {} for {} is too long (at most 2147483647s)",
                short_duration(duration),
                target.what
            )
        })
    };
    if settings.mongodb.database_mode == DatabaseMode::Mongo {
        return Ok(Plan {
            seconds: seconds(requested)?,
            expiry: format!("expire after {}", short_duration(requested)),
            why: None,
        });
    }
    match target.kind {
        Purged::Journal => {
            let Some(ttl) = settings.write_journal.cosmos_ttl else {
                bail!(
                    "in cosmos mode deleted events expire by their own ttl field: set \
                     write-journal.cosmos-ttl = \"{}\" for the servers and this command",
                    short_duration(requested)
                );
            };
            if ttl != requested {
                bail!(
                    "--journal-expire-after {} differs from write-journal.cosmos-ttl = {}, \
                     which the servers write into deleted events in cosmos mode",
                    short_duration(requested),
                    short_duration(ttl)
                );
            }
            Ok(Plan {
                seconds: COSMOS_NO_DEFAULT_TTL,
                expiry: format!(
                    "deleted events expire after their own ttl of {}",
                    short_duration(ttl)
                ),
                why: Some(
                    "cosmos mode: CosmosDB purges by _ts, the time of last modification, and \
                     honours a document's ttl only with a _ts TTL index; this one is \
                     2147483647s (68 years) so that live events stay"
                        .to_owned(),
                ),
            })
        }
        Purged::Snapshots => Ok(Plan {
            seconds: seconds(requested)?,
            expiry: format!("expire after {}", short_duration(requested)),
            why: Some(
                "cosmos mode: CosmosDB purges by _ts, the time of last modification, and a \
                 snapshot is not modified after it is saved"
                    .to_owned(),
            ),
        }),
        Purged::State => bail!(
            "--state-expire-after is not available in cosmos mode: CosmosDB purges by _ts, the \
             time of last modification, so a _ts TTL index would also remove live objects \
             unchanged for {}",
            short_duration(requested)
        ),
    }
}

/// Creates the TTL indexes, or changes their expiry in place (`collMod`); says what it did.
/// Every requested expiry is checked before anything changes.
pub async fn setup(
    database: &Database,
    settings: &Settings,
    expiry: &Expiry,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let wanted = [expiry.journal, expiry.snapshots, expiry.state];
    let mut plans = Vec::new();
    for (target, requested) in targets(settings).into_iter().zip(wanted) {
        if let Some(requested) = requested {
            let plan = plan(settings, &target, requested)?;
            plans.push((target, plan));
        }
    }
    for (target, plan) in plans {
        let existing = existing_indexes(database, &target.collection).await?;
        let current = existing
            .iter()
            .find(|index| index_name(index) == target.index)
            .and_then(|index| {
                index
                    .options
                    .as_ref()
                    .and_then(|options| options.expire_after)
            });
        let label = format!("{} ({}.{})", target.what, target.collection, target.field);
        let wanted = Duration::from_secs(u64::from(plan.seconds.unsigned_abs()));
        let did = match current {
            Some(current) if current == wanted => format!("unchanged, {}", plan.expiry),
            Some(current) => {
                database
                    .run_command(doc! {
                        "collMod": &target.collection,
                        "index": { "name": &target.index, "expireAfterSeconds": plan.seconds },
                    })
                    .await
                    .with_context(|| format!("changing the TTL index of {}", target.collection))?;
                format!(
                    "changed expire after from {} to {}",
                    short_duration(current),
                    short_duration(wanted)
                )
            }
            None => {
                let options = IndexOptions::builder()
                    .name(target.index.clone())
                    .expire_after(wanted)
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
                format!("created TTL index, {}", plan.expiry)
            }
        };
        match plan.why {
            Some(why) => writeln!(out, "{label}: {did} ({why})")?,
            None => writeln!(out, "{label}: {did}")?,
        }
    }
    Ok(())
}

/// The expiry of the TTL index on the target's field, if there is one.
async fn ttl_on(database: &Database, target: &Target) -> anyhow::Result<Option<Duration>> {
    let existing = existing_indexes(database, &target.collection).await?;
    Ok(existing
        .iter()
        .find(|index| index.keys == doc! { target.field: 1 })
        .and_then(|index| {
            index
                .options
                .as_ref()
                .and_then(|options| options.expire_after)
        }))
}

/// Per collection: the TTL configured, documents carrying the date field, and how many of
/// them are eligible for purging now.
pub async fn status(
    database: &Database,
    settings: &Settings,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    for target in targets(settings) {
        let ttl = ttl_on(database, &target).await?;
        let collection = database.collection::<mongodb::bson::Document>(&target.collection);
        let label = format!("{} ({}.{})", target.what, target.collection, target.field);
        if settings.mongodb.database_mode == DatabaseMode::Cosmos {
            cosmos_status(&collection, &target, &label, ttl, out).await?;
            continue;
        }
        let marked = collection
            .count_documents(doc! { target.field: { "$exists": true } })
            .await
            .with_context(|| format!("counting {}", target.collection))?;
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

/// CosmosDB does not show `_ts` to clients, so what is eligible cannot be counted; say what
/// the index does instead.
async fn cosmos_status(
    collection: &mongodb::Collection<mongodb::bson::Document>,
    target: &Target,
    label: &str,
    ttl: Option<Duration>,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let counted = |filter| async {
        collection
            .count_documents(filter)
            .await
            .with_context(|| format!("counting {}", target.collection))
    };
    let (count, what) = match target.kind {
        Purged::Journal => (
            counted(doc! { journal::document::TTL: { "$exists": true } }).await?,
            "deleted event(s) carry a ttl",
        ),
        Purged::Snapshots => (counted(doc! {}).await?, "snapshot(s)"),
        Purged::State => (
            counted(doc! { durable_state::PAYLOAD: { "$exists": false } }).await?,
            "deleted object(s), not purged in cosmos mode",
        ),
    };
    match ttl {
        Some(ttl) if target.kind == Purged::Journal => writeln!(
            out,
            "{label}: TTL index on ({}), documents expire by their own ttl; {count} {what}",
            short_duration(ttl)
        )?,
        Some(ttl) => writeln!(
            out,
            "{label}: TTL index, purged {} after their last change; {count} {what}",
            short_duration(ttl)
        )?,
        None => writeln!(
            out,
            "{label}: no TTL index (nothing is purged); {count} {what}"
        )?,
    }
    Ok(())
}

/// One collection's TTL index against `[purge]` (and, in cosmos mode, the journal's
/// `write-journal.cosmos-ttl`), for `eventjournal check`: `(status, message, fix)`.
pub(super) async fn compare_with_settings(
    database: &Database,
    settings: &Settings,
) -> anyhow::Result<Vec<(super::check::Status, String, Option<String>)>> {
    use super::check::Status;
    let purge = &settings.purge;
    let cosmos = settings.mongodb.database_mode == DatabaseMode::Cosmos;
    let configured = [
        purge.journal_expire_after.or(if cosmos {
            settings.write_journal.cosmos_ttl
        } else {
            None
        }),
        purge.snapshot_expire_after,
        purge.state_expire_after,
    ];
    let flags = [
        "--journal-expire-after",
        "--snapshot-expire-after",
        "--state-expire-after",
    ];
    let keys = [
        "purge.journal-expire-after",
        "purge.snapshot-expire-after",
        "purge.state-expire-after",
    ];
    let mut findings = Vec::new();
    for (((target, configured), flag), key) in targets(settings)
        .into_iter()
        .zip(configured)
        .zip(flags)
        .zip(keys)
    {
        let current = ttl_on(database, &target).await?;
        let label = format!("{} ({}.{})", target.what, target.collection, target.field);
        let finding = match (configured, current) {
            (None, None) => (
                Status::Ok,
                format!("{label}: not purged (no {key}, no TTL index)"),
                None,
            ),
            (None, Some(current)) => (
                Status::Warn,
                format!(
                    "{label}: a TTL index purges after {}, but {key} is not set, so nothing \
                     checks it against what you intend",
                    short_duration(current)
                ),
                Some(format!("set {key} = \"{}\"", short_duration(current))),
            ),
            (Some(requested), current) => {
                let fix = Some(format!(
                    "eventjournal purge setup {flag} {} (or with {key} set, no flag)",
                    short_duration(requested)
                ));
                match plan(settings, &target, requested) {
                    Err(error) => (Status::Fail, format!("{label}: {error:#}"), None),
                    Ok(plan) => {
                        let wanted = Duration::from_secs(u64::from(plan.seconds.unsigned_abs()));
                        match current {
                            Some(current) if current == wanted => {
                                (Status::Ok, format!("{label}: {}", plan.expiry), None)
                            }
                            Some(current) => (
                                Status::Fail,
                                format!(
                                    "{label}: the TTL index purges after {}, {key} says {}",
                                    short_duration(current),
                                    short_duration(wanted)
                                ),
                                fix,
                            ),
                            None => (
                                Status::Fail,
                                format!(
                                    "{label}: {key} is set but there is no TTL index: nothing is purged"
                                ),
                                fix,
                            ),
                        }
                    }
                }
            }
        };
        findings.push(finding);
    }
    Ok(findings)
}
