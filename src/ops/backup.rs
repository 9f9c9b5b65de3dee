//! `eventjournal backup` and `restore`: the CLI side of the `backup` crate.

use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use backup::store::{AnyStore, LocalDirectory, S3, S3Options, Store};
use backup::{BackupOptions, Collections, RestoreOptions, Selection};
use config::{BackupStoreKind, Settings};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::cli::{BackupAction, BackupStoreArgs, CreateBackupArgs, IdentityArgs, RestoreArgs};

pub fn collections(settings: &Settings) -> Collections {
    let names = &settings.mongodb.collections;
    Collections {
        journal: names.journal.clone(),
        journal_metadata: names.journal_metadata.clone(),
        snapshots: names.snapshots.clone(),
        durable_state: names.durable_state.clone(),
    }
}

/// The store the flags or the configuration name.
pub fn store(settings: &Settings, args: &BackupStoreArgs) -> anyhow::Result<AnyStore> {
    store_at(settings, args.directory.as_deref(), args.s3.as_deref())
}

/// The store the configuration names.
pub fn configured_store(settings: &Settings) -> anyhow::Result<AnyStore> {
    store_at(settings, None, None)
}

fn store_at(
    settings: &Settings,
    directory: Option<&std::path::Path>,
    s3: Option<&str>,
) -> anyhow::Result<AnyStore> {
    let backup = &settings.backup;
    if let Some(directory) = directory {
        return Ok(AnyStore::Local(LocalDirectory::new(directory)));
    }
    let (bucket, prefix) = match s3 {
        Some(url) => {
            let Some(rest) = url.strip_prefix("s3://").filter(|rest| !rest.is_empty()) else {
                bail!("--s3 {url:?}: expected s3://BUCKET or s3://BUCKET/PREFIX");
            };
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            (bucket.to_owned(), prefix.to_owned())
        }
        None if backup.store == BackupStoreKind::S3 => {
            (backup.s3.bucket.clone(), backup.s3.prefix.clone())
        }
        None => return Ok(AnyStore::Local(LocalDirectory::new(&backup.directory))),
    };
    if !(5 << 20..=5 << 30).contains(&backup.part_size.as_u64()) {
        bail!(
            "backup.part-size is {}: S3 needs parts of 5MiB to 5GiB",
            backup.part_size
        );
    }
    let s3 = S3::new(&S3Options {
        bucket,
        prefix,
        region: backup.s3.region.clone(),
        endpoint: backup.s3.endpoint.clone(),
        access_key_id: backup.s3.access_key_id.clone(),
        secret_access_key: backup.s3.secret_access_key.clone(),
        parallelism: backup.upload_parallelism,
        retry_timeout: Some(backup.s3.retry_timeout),
    })?;
    Ok(AnyStore::S3(s3))
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
        incremental: args.incremental,
    };
    let database = super::connect(&settings).await?;
    let store = store(&settings, &args.store)?;
    let taken = backup::backup(&database, &store, &options).await;
    // Ended here, on the runtime: a client dropped as the runtime stops panicked in the driver.
    database.client().clone().shutdown().await;
    let manifest = taken?;
    let mut out = format!(
        "backup {} complete: {}\n",
        manifest.id,
        store.describe(&manifest.id)
    );
    if args.prune {
        out.push_str(&prune(&store, &settings).await?);
    }
    Ok(out)
}

/// The options of a backup of everything as the configuration says (a scheduled one).
pub fn configured_options(settings: &Settings, incremental: bool) -> anyhow::Result<BackupOptions> {
    Ok(BackupOptions {
        collections: collections(settings),
        selection: Selection::default(),
        compression: settings
            .backup
            .compression
            .parse()
            .map_err(|error: String| anyhow::anyhow!("backup.compression: {error}"))?,
        recipients: settings.backup.recipients.clone(),
        part_bytes: settings.backup.part_size.as_u64() as usize,
        progress: None,
        incremental,
    })
}

/// Deletes what the configured retention policy does not keep; one line per backup deleted.
pub async fn prune<S: Store>(store: &S, settings: &Settings) -> anyhow::Result<String> {
    let mut out = String::new();
    let now = SystemTime::now();
    for id in prunable(
        store,
        settings.backup.keep_last,
        settings.backup.keep_within,
        now,
    )
    .await?
    {
        store
            .delete_backup(&id)
            .await
            .with_context(|| format!("deleting {}", store.describe(&id)))?;
        out.push_str(&format!("deleted {id}\n"));
    }
    Ok(out)
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
            let store = store(&settings, args)?;
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
                    "{id}  {}  {}  {documents} documents  {bytes} bytes stored  {}{}{}\n",
                    manifest.created_at,
                    manifest.source_database,
                    manifest.compression,
                    if manifest.recipients.is_empty() {
                        ""
                    } else {
                        "  encrypted"
                    },
                    match &manifest.base {
                        Some(base) => format!("  incremental on {base}"),
                        None => "  full".to_owned(),
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
            let store = store(&settings, args)?;
            let manifest = backup::verify(&store, id, &identities(identity)?).await?;
            let parts: usize = manifest.collections.iter().map(|c| c.parts.len()).sum();
            let chain = match &manifest.base {
                Some(_) => format!(
                    " (and the {} backups it builds on)",
                    backup::chain(&store, id).await?.len() - 1
                ),
                None => String::new(),
            };
            Ok(format!(
                "backup {id} verified{chain}: {} collections, {parts} parts, every document as \
                 the manifest says\n",
                manifest.collections.len()
            ))
        }
        BackupAction::Schedule(args) => super::schedule::run(args).await,
        BackupAction::Prune {
            store: args,
            keep_last,
            keep_within,
            dry_run,
        } => {
            let settings = args.connection.settings(None)?;
            let store = store(&settings, args)?;
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

/// The backups the policy does not keep: not among the newest `keep_last`, older than
/// `keep_within` at `now`, and not a base that a kept incremental backup builds on (directly or
/// through other incrementals).
pub async fn prunable<S: Store>(
    store: &S,
    keep_last: u32,
    keep_within: Duration,
    now: SystemTime,
) -> anyhow::Result<Vec<String>> {
    let mut backups = Vec::new();
    let mut bases = std::collections::HashMap::new();
    for id in store.complete_backups().await.context("listing backups")? {
        let manifest = backup::read_manifest(store, &id).await?;
        let created = humantime::parse_rfc3339(&manifest.created_at)
            .with_context(|| format!("backup {id}: createdAt"))?;
        if let Some(base) = manifest.base {
            bases.insert(id.clone(), base);
        }
        // Newest by the cluster time it was read at, then (the same time: nothing changed in
        // between) by when it was taken.
        let time = (
            manifest.cluster_time.seconds,
            manifest.cluster_time.increment,
        );
        backups.push((time, created, id));
    }
    backups.sort();
    let newest_kept = backups.len().saturating_sub(keep_last as usize);
    let (mut prunable, kept): (Vec<_>, Vec<_>) =
        backups
            .into_iter()
            .enumerate()
            .partition(|(index, (_, created, _))| {
                *index < newest_kept
                    && now.duration_since(*created).unwrap_or_default() > keep_within
            });
    // Every base of a kept backup is kept, and the bases of those.
    let mut needed = std::collections::HashSet::new();
    for (_, (_, _, id)) in &kept {
        let mut next = bases.get(id);
        while let Some(base) = next {
            if !needed.insert(base.clone()) {
                break;
            }
            next = bases.get(base);
        }
    }
    prunable.retain(|(_, (_, _, id))| !needed.contains(id));
    Ok(prunable.into_iter().map(|(_, (_, _, id))| id).collect())
}

/// `eventjournal restore <id>`.
pub async fn restore(args: &RestoreArgs) -> anyhow::Result<String> {
    let settings = args.store.connection.settings(None)?;
    let store = store(&settings, &args.store)?;
    let identities = identities(&args.identity)?;
    let database = super::connect(&settings).await?;
    let options = RestoreOptions {
        collections: collections(&settings),
        drop: args.drop,
    };
    let restored = async {
        let manifest = backup::restore(&store, &args.id, &identities, &database, &options).await?;
        super::indexes::create_missing(&database, &settings)
            .await
            .context("recreating the indexes")?;
        anyhow::Ok(manifest)
    }
    .await;
    database.client().clone().shutdown().await;
    let manifest = restored?;
    let chain = match &manifest.base {
        Some(_) => format!(
            " (incremental: with the {} backups it builds on)",
            backup::chain(&store, &args.id).await?.len() - 1
        ),
        None => String::new(),
    };
    let documents: u64 = manifest.collections.iter().map(|c| c.documents).sum();
    Ok(format!(
        "restored backup {}{chain} into {}: {documents} documents, checked against the \
         manifest; indexes created\n",
        manifest.id,
        database.name()
    ))
}
