//! `eventjournal backup` and `restore`: the CLI side of the `backup` crate.

use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use backup::store::{LocalDirectory, Store};
use backup::{BackupOptions, Collections, RestoreOptions, Selection};
use config::Settings;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::cli::{BackupAction, CreateBackupArgs, IdentityArgs, RestoreArgs};

fn collections(settings: &Settings) -> Collections {
    let names = &settings.mongodb.collections;
    Collections {
        journal: names.journal.clone(),
        journal_metadata: names.journal_metadata.clone(),
        snapshots: names.snapshots.clone(),
        durable_state: names.durable_state.clone(),
    }
}

fn store(settings: &Settings, directory: Option<&Path>) -> LocalDirectory {
    LocalDirectory::new(directory.unwrap_or(&settings.backup.directory))
}

fn identities(args: &IdentityArgs) -> anyhow::Result<Vec<age::x25519::Identity>> {
    let Some(file) = &args.identity_file else {
        return Ok(Vec::new());
    };
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read the identity file {}", file.display()))?;
    let identities = backup::encrypt::identities(&text)
        .with_context(|| format!("identity file {}", file.display()))?;
    if identities.is_empty() {
        bail!("the identity file {} holds no identity", file.display());
    }
    Ok(identities)
}

/// `eventjournal backup`: takes one backup, prints its id and where it is.
pub async fn create(args: &CreateBackupArgs) -> anyhow::Result<String> {
    let settings = args.store.connection.settings(None)?;
    let compression = args
        .compression
        .as_deref()
        .unwrap_or(&settings.backup.compression)
        .parse()
        .map_err(|error: String| anyhow::anyhow!("--compression: {error}"))?;
    let recipients = if args.recipients.is_empty() {
        settings.backup.recipients.clone()
    } else {
        args.recipients.clone()
    };
    let options = BackupOptions {
        collections: collections(&settings),
        selection: Selection {
            collections: args
                .collections
                .iter()
                .map(|collection| collection.role().to_owned())
                .collect(),
            pid_prefix: args.pid_prefix.clone(),
            tag: args.tag.clone(),
        },
        compression,
        recipients,
        part_bytes: settings.backup.part_size.as_u64() as usize,
        progress: progress_display(),
    };
    let database = super::connect(&settings).await?;
    let store = store(&settings, args.store.directory.as_deref());
    let manifest = backup::backup(&database, &store, &options).await?;
    Ok(format!(
        "backup {} complete: {}\n",
        manifest.id,
        store.describe(&manifest.id)
    ))
}

/// A spinner per collection with documents and bytes read, when stderr is a terminal; otherwise
/// nothing here (the backup prints a line per collection as it completes).
fn progress_display() -> Option<backup::Progress> {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bars = std::sync::Mutex::new(std::collections::HashMap::<String, ProgressBar>::new());
    Some(std::sync::Arc::new(
        move |role: &str, documents: u64, bytes: u64| {
            let mut bars = bars.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let bar = bars.entry(role.to_owned()).or_insert_with(|| {
                let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
                bar.set_style(
                    ProgressStyle::with_template("{spinner} {prefix}: {msg} ({elapsed})")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
                bar.set_prefix(role.to_owned());
                bar
            });
            bar.set_message(format!(
                "{documents} documents, {}",
                indicatif::HumanBytes(bytes)
            ));
            bar.tick();
        },
    ))
}

/// `backup list`, `verify`, `prune`.
pub async fn action(action: &BackupAction) -> anyhow::Result<String> {
    match action {
        BackupAction::List(args) => {
            let settings = args.connection.settings(None)?;
            let store = store(&settings, args.directory.as_deref());
            let mut out = String::new();
            for id in store.complete_backups().await.context("listing backups")? {
                let manifest = backup::read_manifest(&store, &id).await?;
                let documents: u64 = manifest.collections.iter().map(|c| c.documents).sum();
                let bytes: u64 = manifest
                    .collections
                    .iter()
                    .flat_map(|c| &c.parts)
                    .map(|part| part.bytes)
                    .sum();
                out.push_str(&format!(
                    "{id}  {}  {}  {documents} documents  {bytes} bytes stored  {}{}\n",
                    manifest.created_at,
                    manifest.source_database,
                    manifest.compression,
                    if manifest.recipients.is_empty() {
                        ""
                    } else {
                        "  encrypted"
                    }
                ));
            }
            Ok(out)
        }
        BackupAction::Verify {
            id,
            store: args,
            identity,
        } => {
            let settings = args.connection.settings(None)?;
            let store = store(&settings, args.directory.as_deref());
            let manifest = backup::verify(&store, id, &identities(identity)?).await?;
            let parts: usize = manifest.collections.iter().map(|c| c.parts.len()).sum();
            Ok(format!(
                "backup {id} verified: {} collections, {parts} parts, every document as the \
                 manifest says\n",
                manifest.collections.len()
            ))
        }
        BackupAction::Prune {
            store: args,
            keep_last,
            keep_within,
            dry_run,
        } => {
            let settings = args.connection.settings(None)?;
            let store = store(&settings, args.directory.as_deref());
            let keep_last = keep_last.unwrap_or(settings.backup.keep_last);
            let keep_within = keep_within.unwrap_or(settings.backup.keep_within);
            let mut out = String::new();
            for id in prunable(&store, keep_last, keep_within, SystemTime::now()).await? {
                if !*dry_run {
                    store
                        .delete_backup(&id)
                        .await
                        .with_context(|| format!("deleting {}", store.describe(&id)))?;
                }
                out.push_str(&format!(
                    "{} {id}\n",
                    if *dry_run { "would delete" } else { "deleted" }
                ));
            }
            Ok(out)
        }
    }
}

/// The backups the policy does not keep: not among the newest `keep_last`, and older than
/// `keep_within` at `now`.
pub async fn prunable<S: Store>(
    store: &S,
    keep_last: u32,
    keep_within: Duration,
    now: SystemTime,
) -> anyhow::Result<Vec<String>> {
    let mut backups = Vec::new();
    for id in store.complete_backups().await.context("listing backups")? {
        let manifest = backup::read_manifest(store, &id).await?;
        let created = humantime::parse_rfc3339(&manifest.created_at)
            .with_context(|| format!("backup {id}: createdAt"))?;
        backups.push((created, id));
    }
    backups.sort();
    let newest_kept = backups.len().saturating_sub(keep_last as usize);
    Ok(backups
        .into_iter()
        .enumerate()
        .filter(|(index, (created, _))| {
            *index < newest_kept && now.duration_since(*created).unwrap_or_default() > keep_within
        })
        .map(|(_, (_, id))| id)
        .collect())
}

/// `eventjournal restore <id>`.
pub async fn restore(args: &RestoreArgs) -> anyhow::Result<String> {
    let settings = args.store.connection.settings(None)?;
    let store = store(&settings, args.store.directory.as_deref());
    let identities = identities(&args.identity)?;
    let database = super::connect(&settings).await?;
    let options = RestoreOptions {
        collections: collections(&settings),
        drop: args.drop,
    };
    let manifest = backup::restore(&store, &args.id, &identities, &database, &options).await?;
    super::indexes::create_missing(&database, &settings)
        .await
        .context("recreating the indexes")?;
    let documents: u64 = manifest.collections.iter().map(|c| c.documents).sum();
    Ok(format!(
        "restored backup {} into {}: {documents} documents, checked against the manifest; \
         indexes created\n",
        manifest.id,
        database.name()
    ))
}
