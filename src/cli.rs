//! The command line: `eventjournal serve`, and the operator commands `indexes`, `purge`,
//! `backup` and `restore`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use config::{ConfigError, Overrides, Settings};

#[derive(Debug, Parser)]
#[command(
    name = "eventjournal",
    version,
    about = "Akka-style event journal, snapshot and durable-state store over MongoDB, served over gRPC"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the gRPC API (Journal, SnapshotStore, DurableStateStore, ReadJournal, health,
    /// reflection) until SIGTERM or SIGINT.
    Serve(ServeArgs),
    /// Show or create the indexes eventjournal needs.
    #[command(subcommand)]
    Indexes(IndexesCommand),
    /// Set up and inspect purging of deleted events, old snapshots and deleted objects.
    #[command(subcommand)]
    Purge(PurgeCommand),
    /// Back up the journal, its metadata, snapshots and durable state (or a selection) into the
    /// backup directory, compressed and optionally encrypted; prints where it went. Also
    /// `backup list`, `backup verify <ID>` and `backup prune`. See docs/BACKUP.md.
    Backup(Box<BackupArgs>),
    /// Restore a backup into a database (empty, unless --drop), recreate the indexes and check
    /// what was restored against the backup's manifest.
    Restore(RestoreArgs),
    /// Check that the deployment is ready: topology, write and read concern, indexes, purge
    /// TTLs, the oplog window, the clock. One line per finding (ok, warn or fail, with the
    /// fix); exits with 1 when any fails. Run it before going live and after every change.
    Check(CheckArgs),
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub connection: ConnectionArgs,
    /// Print the findings as JSON: {"ok": bool, "findings": [{check, status, message, fix}]}.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BackupArgs {
    #[command(subcommand)]
    pub action: Option<BackupAction>,
    #[command(flatten)]
    pub create: CreateBackupArgs,
}

#[derive(Debug, Subcommand)]
pub enum BackupAction {
    /// List the complete backups, oldest first.
    List(BackupStoreArgs),
    /// Read, decrypt, decompress and check every part of a backup without restoring it.
    Verify {
        /// The backup's id (see `backup list`).
        id: String,
        #[command(flatten)]
        store: BackupStoreArgs,
        #[command(flatten)]
        identity: IdentityArgs,
    },
    /// Take backups on the schedule of [backup.schedule] (cron expressions for full and
    /// incremental backups, UTC) until SIGTERM or SIGINT, pruning after each; missed runs are
    /// logged and counted in the metrics on backup.schedule.metrics-listen.
    Schedule(BackupStoreArgs),
    /// Delete the backups the retention policy (backup.keep-last, backup.keep-within) does not
    /// keep.
    Prune {
        #[command(flatten)]
        store: BackupStoreArgs,
        /// Keep the newest N backups; overrides backup.keep-last.
        #[arg(long, value_name = "N")]
        keep_last: Option<u32>,
        /// Keep every backup younger than this, e.g. 7d; overrides backup.keep-within.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        keep_within: Option<Duration>,
        /// Only list what would be deleted.
        #[arg(long)]
        dry_run: bool,
    },
}

/// Where backups are.
#[derive(Debug, Args)]
pub struct BackupStoreArgs {
    #[command(flatten)]
    pub connection: ConnectionArgs,
    /// The backup directory; overrides backup.store and backup.directory.
    #[arg(long, value_name = "DIR", conflicts_with = "s3")]
    pub directory: Option<PathBuf>,
    /// An S3 bucket and key prefix, s3://BUCKET[/PREFIX]; overrides backup.store and
    /// backup.s3.bucket/prefix (endpoint, region and credentials from [backup.s3] or the AWS
    /// environment).
    #[arg(long, value_name = "s3://BUCKET/PREFIX")]
    pub s3: Option<String>,
}

#[derive(Debug, Args)]
pub struct IdentityArgs {
    /// File of age identities (AGE-SECRET-KEY-1..., one per line, as age-keygen writes) for an
    /// encrypted backup.
    #[arg(long, value_name = "FILE")]
    pub identity_file: Option<PathBuf>,
}

/// The collections a backup can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackedUp {
    Journal,
    JournalMetadata,
    Snapshots,
    DurableState,
}

impl BackedUp {
    pub fn role(self) -> &'static str {
        match self {
            Self::Journal => "journal",
            Self::JournalMetadata => "journal_metadata",
            Self::Snapshots => "snapshots",
            Self::DurableState => "durable_state",
        }
    }
}

#[derive(Debug, Args)]
pub struct CreateBackupArgs {
    #[command(flatten)]
    pub store: BackupStoreArgs,
    /// zstd, gzip or none; overrides backup.compression.
    #[arg(long, value_name = "NAME")]
    pub compression: Option<String>,
    /// Encrypt to this age public key (age1...); repeatable; replaces backup.recipients.
    #[arg(long = "recipient", value_name = "AGE1...")]
    pub recipients: Vec<String>,
    /// Back up only these collections (repeatable); default: all four.
    #[arg(long = "collection", value_enum, value_name = "COLLECTION")]
    pub collections: Vec<BackedUp>,
    /// Only persistence ids starting with this.
    #[arg(long, value_name = "PREFIX")]
    pub pid_prefix: Option<String>,
    /// Only events and durable-state objects with this tag (no metadata, no snapshots).
    #[arg(long, value_name = "TAG")]
    pub tag: Option<String>,
    /// Only what changed since the newest backup of the same database and selection (read
    /// from the oplog, which must still reach back to it); restoring it restores that chain.
    #[arg(long)]
    pub incremental: bool,
    /// After the backup, delete what the retention policy does not keep (as `backup prune`):
    /// a one-shot for a Kubernetes CronJob.
    #[arg(long)]
    pub prune: bool,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The backup's id (see `backup list`).
    pub id: String,
    /// The target database and where backups are (--database names the target).
    #[command(flatten)]
    pub store: BackupStoreArgs,
    #[command(flatten)]
    pub identity: IdentityArgs,
    /// Drop the target's journal, metadata, snapshot and durable-state collections first.
    #[arg(long)]
    pub drop: bool,
}

#[derive(Debug, Subcommand)]
pub enum IndexesCommand {
    /// List each collection's indexes: needed ones as ok or missing, others as other.
    List(ConnectionArgs),
    /// Create the missing indexes (the server does the same at start-up when
    /// mongodb.create-indexes is on).
    Create {
        #[command(flatten)]
        connection: ConnectionArgs,
        /// commitQuorum of the index builds: "votingMembers", "majority" or a number;
        /// overrides mongodb.index-commit-quorum.
        #[arg(long, value_name = "Q")]
        commit_quorum: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum PurgeCommand {
    /// Create the TTL indexes that purge deleted events (deletedAt), snapshots (insertedAt) and
    /// deleted durable-state objects (deletedAt); run again with other values to change the
    /// expiry in place. The same values again change nothing. Without flags, the expiries
    /// set in [purge] (purge.journal-expire-after, ...); flags win over them.
    ///
    /// In cosmos mode the indexes are on CosmosDB's _ts instead, deleted events expire by their
    /// own ttl (write-journal.cosmos-ttl, which --journal-expire-after must equal), and
    /// --state-expire-after is refused; see docs/DATA_LIFECYCLE.md.
    Setup {
        #[command(flatten)]
        connection: ConnectionArgs,
        #[command(flatten)]
        expiry: ExpiryArgs,
    },
    /// Show the TTL configured per collection and how many documents are eligible now.
    Status(ConnectionArgs),
    /// Set the purge date on documents written before purging was set up (they lack the
    /// field, so TTL ignores them), in batches with a pause between them. Interrupted, run it
    /// again: it continues with the documents still lacking the field and never changes one
    /// that has it.
    ///
    /// journal: deleted events (at or below their persistence id's delete-to mark) lacking
    /// deletedAt; the highest sequence number survives in the metadata collection.
    /// snapshots: every snapshot lacking insertedAt. state: deleted objects lacking deletedAt.
    /// Live events and objects are never marked: here the mark itself deletes.
    Migrate(MigrateArgs),
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub connection: ConnectionArgs,
    /// The collection to migrate.
    #[arg(long, value_enum, value_name = "COLLECTION")]
    pub collection: crate::ops::Purged,
    /// The date written into the field (RFC 3339, e.g. 2027-01-17T03:00:00Z); the TTL index
    /// purges the documents at this date plus its expire-after, so pick a quiet hour.
    #[arg(long, value_name = "RFC3339", value_parser = humantime::parse_rfc3339)]
    pub date: std::time::SystemTime,
    /// Mark deleted documents only. The journal and state never mark anything else, so this
    /// only states it; snapshots have no deleted documents and refuse it.
    #[arg(long)]
    pub only_deleted: bool,
    /// Documents per update.
    #[arg(long, value_name = "N", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch_size: u32,
    /// Pause between batches, e.g. 100ms or 2s.
    #[arg(long, value_name = "DURATION", default_value = "100ms",
          value_parser = humantime::parse_duration)]
    pub pause: Duration,
    /// Only count the documents that would be marked; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
#[group(multiple = true)]
pub struct ExpiryArgs {
    /// Keep deleted events this long, e.g. 365d.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub journal_expire_after: Option<Duration>,
    /// Keep snapshots this long after they were saved, e.g. 365d.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub snapshot_expire_after: Option<Duration>,
    /// Keep deleted durable-state objects (and their revision) this long.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub state_expire_after: Option<Duration>,
}

/// How to reach the database; every subcommand takes these, as well as the environment
/// (`EVENTJOURNAL_<SECTION>__<KEY>`).
#[derive(Debug, Args)]
pub struct ConnectionArgs {
    /// TOML configuration file (see config/eventjournal.example.toml).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// MongoDB connection string; overrides mongodb.uri.
    #[arg(long, value_name = "URI")]
    pub mongodb_uri: Option<String>,
    /// Database name; overrides mongodb.database.
    #[arg(long, value_name = "NAME")]
    pub database: Option<String>,
}

impl ConnectionArgs {
    /// Settings from defaults, the file, the process environment and these flags.
    pub fn settings(&self, listen: Option<SocketAddr>) -> Result<Settings, ConfigError> {
        let environment: HashMap<String, String> = std::env::vars().collect();
        let overrides = Overrides {
            listen,
            mongodb_uri: self.mongodb_uri.clone(),
            database: self.database.clone(),
        };
        Settings::load(self.config.as_deref(), &environment, &overrides)
    }
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub connection: ConnectionArgs,
    /// gRPC listen address; overrides server.listen.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
}
