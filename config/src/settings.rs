use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::env::EnvProvider;
use crate::validate::ConfigError;

/// All settings of an eventjournal process (server and ops CLI).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct Settings {
    pub server: ServerSettings,
    pub mongodb: MongoSettings,
    pub write_journal: WriteJournalSettings,
    pub read_journal: ReadJournalSettings,
    pub auth: AuthSettings,
    pub backup: BackupSettings,
    pub purge: PurgeSettings,
    pub check: CheckSettings,
    pub testing: TestingSettings,
}

/// Settings that exist for tests only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct TestingSettings {
    /// Added to this server's clock (milliseconds, may be negative) wherever it stamps a
    /// position or computes a read horizon: how tests run servers whose clocks disagree.
    pub clock_offset_millis: i64,
}

/// How long purged documents stay: `eventjournal purge setup` creates the TTL indexes from
/// these when its flags are not given, and `eventjournal check` reports a TTL index whose
/// expiry differs. Unset: purging of that collection is not configured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct PurgeSettings {
    /// Deleted events are purged this long after `DeleteEventsTo`.
    #[serde(with = "humantime_serde")]
    pub journal_expire_after: Option<Duration>,
    /// Snapshots are purged this long after they were saved.
    #[serde(with = "humantime_serde")]
    pub snapshot_expire_after: Option<Duration>,
    /// Deleted durable-state objects are purged this long after their deletion.
    #[serde(with = "humantime_serde")]
    pub state_expire_after: Option<Duration>,
}

/// `eventjournal check`: what the deployment is checked against.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct CheckSettings {
    /// The longest a projector (a change-stream subscriber) may be away and still resume its
    /// offset exactly: the oplog must reach back at least this far.
    #[serde(with = "humantime_serde")]
    pub longest_projector_downtime: Duration,
}

impl Default for CheckSettings {
    fn default() -> Self {
        Self {
            longest_projector_downtime: Duration::from_secs(24 * 3600),
        }
    }
}

/// Backups (`eventjournal backup`, `restore`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct BackupSettings {
    /// Where backups go: `directory` (below) or `s3` (`[backup.s3]`).
    pub store: BackupStoreKind,
    /// The local directory backups go to, one subdirectory per backup.
    pub directory: PathBuf,
    /// Parts of an object uploaded at once (S3 multipart upload).
    pub upload_parallelism: usize,
    pub s3: S3Settings,
    /// `eventjournal backup schedule`.
    pub schedule: BackupScheduleSettings,
    /// zstd, gzip or none.
    pub compression: String,
    /// age X25519 public keys (`age1...`) the backups are encrypted to; empty: not encrypted.
    pub recipients: Vec<String>,
    /// Stored bytes per part of a collection.
    pub part_size: ByteSize,
    /// `backup prune`: keep the newest this many backups (0: no count rule) ...
    pub keep_last: u32,
    /// ... and every backup younger than this.
    #[serde(with = "humantime_serde")]
    pub keep_within: Duration,
}

impl Default for BackupSettings {
    fn default() -> Self {
        Self {
            store: BackupStoreKind::Directory,
            directory: PathBuf::from("backups"),
            upload_parallelism: 4,
            s3: S3Settings::default(),
            schedule: BackupScheduleSettings::default(),
            compression: "zstd".to_owned(),
            recipients: Vec::new(),
            part_size: ByteSize::mib(5),
            keep_last: 0,
            keep_within: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// When `eventjournal backup schedule` takes backups: cron expressions (5 fields, or 6 with
/// seconds first), in UTC; empty: never.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct BackupScheduleSettings {
    pub full: String,
    pub incremental: String,
    /// Prune per the retention policy after each successful backup.
    pub prune: bool,
    /// HTTP listener serving the scheduler's Prometheus metrics on `/metrics`; unset: none.
    pub metrics_listen: Option<SocketAddr>,
}

/// A schedule's cron expression parsed; `None` when empty (never).
pub fn cron(expression: &str) -> Result<Option<croner::Cron>, String> {
    if expression.trim().is_empty() {
        return Ok(None);
    }
    expression
        .parse::<croner::Cron>()
        .map(Some)
        .map_err(|error| {
            format!(
                "is not a cron expression ({error}): 5 fields (minute hour day month weekday) or 6 \
             with seconds first, e.g. \"0 2 * * *\""
            )
        })
}

impl Default for BackupScheduleSettings {
    fn default() -> Self {
        Self {
            full: "0 2 * * *".to_owned(),
            incremental: String::new(),
            prune: true,
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9465))),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackupStoreKind {
    #[default]
    Directory,
    S3,
}

/// An S3-compatible bucket for backups. Unset credentials and region come from the usual AWS
/// environment variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
/// `AWS_REGION`, `AWS_ENDPOINT_URL`) or the instance's role.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct S3Settings {
    pub bucket: String,
    /// Key prefix the backups go under, e.g. `eventjournal/prod`; empty: the bucket's root.
    pub prefix: String,
    pub region: Option<String>,
    /// A custom endpoint for S3-compatible stores (MinIO, Ceph, R2, ...); `http://` allowed.
    pub endpoint: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// How long a failing request (a part, the manifest, an abort) is retried before the
    /// backup gives up.
    #[serde(with = "humantime_serde")]
    pub retry_timeout: Duration,
}

impl Default for S3Settings {
    fn default() -> Self {
        Self {
            bucket: String::new(),
            prefix: String::new(),
            region: None,
            endpoint: None,
            access_key_id: None,
            secret_access_key: None,
            retry_timeout: Duration::from_secs(180),
        }
    }
}

impl std::fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Settings")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "<redacted>"),
            )
            .field("retry_timeout", &self.retry_timeout)
            .finish()
    }
}

/// Bearer-token authentication of gRPC calls (health stays open).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct AuthSettings {
    /// Off by default. On, every call but health needs `authorization: Bearer <token>`.
    pub enabled: bool,
    /// File of tokens, one `<name> <roles> <token>` per line (see [`crate::auth`]); tokens can
    /// also come from the `EVENTJOURNAL_AUTH_TOKENS` environment variable.
    pub tokens_file: Option<PathBuf>,
    /// Loaded from the file and the environment when `enabled`; never serialized or logged.
    #[serde(skip)]
    pub tokens: Vec<crate::auth::Token>,
}

/// TLS of the gRPC listener (rustls).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct ServerTlsSettings {
    pub enabled: bool,
    /// PEM certificate chain of the server.
    pub certificate_file: Option<PathBuf>,
    /// PEM private key of the server.
    pub key_file: Option<PathBuf>,
    /// PEM CA certificates; set, clients must present a certificate it signed (mutual TLS).
    pub client_ca_file: Option<PathBuf>,
}

/// Values given on the command line; they win over every other source.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub mongodb_uri: Option<String>,
    pub database: Option<String>,
}

impl Settings {
    /// Loads and validates the settings. `env` is the process environment (or a test's map);
    /// only `EVENTJOURNAL_<SECTION>__<KEY>` entries are read.
    pub fn load(
        file: Option<&Path>,
        env: &HashMap<String, String>,
        overrides: &Overrides,
    ) -> Result<Settings, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        if let Some(file) = file {
            if !file.is_file() {
                return Err(ConfigError::MissingFile(file.to_path_buf()));
            }
            figment = figment.merge(Toml::file_exact(file));
        }
        figment = figment.merge(EnvProvider::new(env));
        let mut settings: Settings = figment
            .extract_lossy()
            .map_err(|error| ConfigError::Parse(Box::new(error)))?;
        if let Some(listen) = overrides.listen {
            settings.server.listen = listen;
        }
        if let Some(uri) = &overrides.mongodb_uri {
            settings.mongodb.uri = uri.clone();
        }
        if let Some(database) = &overrides.database {
            settings.mongodb.database = database.clone();
        }
        settings.validate()?;
        if settings.auth.enabled {
            settings.auth.tokens = crate::auth::load_tokens(
                settings.auth.tokens_file.as_deref(),
                env.get(crate::auth::TOKENS_ENV).map(String::as_str),
            )
            .map_err(|reason| ConfigError::invalid("auth.tokens-file", "(tokens)", reason))?;
            if settings.auth.tokens.is_empty() {
                return Err(ConfigError::invalid(
                    "auth.enabled",
                    "true",
                    format!(
                        "no tokens configured: set auth.tokens-file or {}",
                        crate::auth::TOKENS_ENV
                    ),
                ));
            }
        }
        Ok(settings)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct ServerSettings {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Largest gRPC message accepted or sent. Must exceed MongoDB's 16 MiB document limit so
    /// an oversized event is answered with a clear rejection rather than a transport error.
    pub max_message_size: ByteSize,
    /// Most bytes of request messages the server holds at once, over all calls and
    /// connections: messages being received and decoded, waiting in their call's handler, or
    /// read from a `WriteEventsStream` and not answered yet. A message the budget cannot cover
    /// fails its call at once with UNAVAILABLE (nothing of it is read or written), so a burst
    /// of large requests cannot exhaust the server's memory. One `WriteEventsStream` reads
    /// ahead only while its unanswered requests hold less than a quarter of it. At least
    /// `max_message_size`.
    pub max_request_memory: ByteSize,
    /// How long a request message that has begun to arrive may go without any more of its
    /// bytes while the server waits for them. Past it the call fails with UNAVAILABLE and the
    /// message's share of `max_request_memory` is free again: a client that stalls in the
    /// middle of a message cannot hold it for as long as its connection lives. A slow client
    /// that keeps sending is not cut, and a client idle between messages holds nothing. Keep it
    /// above MongoDB's longest wait (`mongodb.write-concern.timeout` + `mongodb.retry.max-attempts`
    /// × (`mongodb.server-selection-timeout` + `mongodb.retry.delay`), about 41 s by default):
    /// `WriteEventsStream`s waiting that long for their answers can together fill their
    /// connection's HTTP/2 window (`http2_connection_window`), and another call's message on
    /// that connection then waits with them.
    #[serde(with = "humantime_serde")]
    pub message_idle_timeout: Duration,
    /// HTTP/2 flow control: the bytes of one call's request the client may send ahead of what
    /// the call has read. A `WriteEventsStream` that stops reading ahead (its requests wait for
    /// MongoDB) holds up to this much in the server's HTTP/2 buffers. Also the most a single
    /// message travels per round trip of the network: a 32 MiB message over a 10 ms link takes
    /// at least 32 MiB / this × 10 ms. At least 64 KiB, at most 1 GiB.
    pub http2_stream_window: ByteSize,
    /// HTTP/2 flow control: the bytes of all calls' requests on one connection the client may
    /// send ahead of what the calls have read; the most the server's HTTP/2 buffers hold per
    /// connection (not counted in `max_request_memory`). Keep it several times
    /// `http2_stream_window`: streams that stopped reading hold their windows of it, and once
    /// they hold it all, every other call on their connection waits for them (most gRPC
    /// clients send all their calls on one connection; the Rust client sends its streams, reads
    /// and first write calls on one). At least `http2_stream_window`, at most 1 GiB.
    pub http2_connection_window: ByteSize,
    /// On SIGTERM/SIGINT, how long in-flight calls may take before the process exits anyway.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace_period: Duration,
    /// HTTP listener serving Prometheus metrics on `/metrics`; unset: no metrics listener.
    pub metrics_listen: Option<SocketAddr>,
    /// How often the server pings MongoDB to report `grpc.health.v1` SERVING or NOT_SERVING.
    #[serde(with = "humantime_serde")]
    pub health_check_interval: Duration,
    /// How often the server pings each client connection (HTTP/2 PING); `0s`: never. A
    /// connection whose ping is not answered within `keep_alive_timeout` is closed, with its
    /// calls and live queries: a client that vanished without closing (its host gone, a NAT or
    /// load balancer that dropped the connection silently) no longer keeps a live query
    /// polling MongoDB for nobody, which an idle query otherwise does for ever.
    #[serde(with = "humantime_serde")]
    pub keep_alive_interval: Duration,
    /// How long a ping of `keep_alive_interval` may go unanswered.
    #[serde(with = "humantime_serde")]
    pub keep_alive_timeout: Duration,
    /// Threads running the server's tasks; 0: chosen from the CPU cores (see
    /// [`ServerSettings::worker_threads_for`]).
    pub worker_threads: usize,
    pub tls: ServerTlsSettings,
}

/// Up to this many CPU cores, `worker-threads = 0` runs one worker thread.
pub const SINGLE_WORKER_MAX_CORES: usize = 2;

impl ServerSettings {
    /// The worker threads to run on a machine with `cores` CPU cores: `worker-threads` when
    /// set; else one per core, but one on a machine of [`SINGLE_WORKER_MAX_CORES`] or fewer.
    /// There the server shares its cores with MongoDB and the clients (a small container, a
    /// development machine), and a second worker mostly wakes up on the other core to take a
    /// task from the first: in the benchmark (docs/PERFORMANCE.md) one worker cut a single
    /// write's latency by about 15% (P1 1.21x–1.27x of the raw driver instead of 1.35x–1.45x)
    /// and left throughput where it was. One core serves about 30,000 unary writes a second,
    /// more than MongoDB on such a machine stores.
    pub fn worker_threads_for(&self, cores: usize) -> usize {
        match self.worker_threads {
            0 if cores <= SINGLE_WORKER_MAX_CORES => 1,
            0 => cores,
            set => set,
        }
    }
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            max_message_size: ByteSize::mib(32),
            max_request_memory: ByteSize::mib(256),
            message_idle_timeout: Duration::from_secs(60),
            http2_stream_window: ByteSize::mib(1),
            http2_connection_window: ByteSize::mib(4),
            shutdown_grace_period: Duration::from_secs(30),
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
            health_check_interval: Duration::from_secs(5),
            keep_alive_interval: Duration::from_secs(30),
            keep_alive_timeout: Duration::from_secs(10),
            worker_threads: 0,
            tls: ServerTlsSettings::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DatabaseMode {
    /// MongoDB 4.4 or later (replica set or sharded cluster).
    #[default]
    Mongo,
    /// Azure CosmosDB's MongoDB API, AWS DocumentDB and similar: no compound indexes over
    /// nested fields; `ttl` fields for purging.
    Cosmos,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct MongoSettings {
    /// MongoDB connection string.
    pub uri: String,
    pub database: String,
    pub database_mode: DatabaseMode,
    pub bypass_document_validation: bool,
    /// Create missing indexes when the server starts.
    pub create_indexes: bool,
    /// `commitQuorum` of index builds: "votingMembers", "majority" or a number of members.
    pub index_commit_quorum: String,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long an operation waits for a usable server before failing with UNAVAILABLE.
    #[serde(with = "humantime_serde")]
    pub server_selection_timeout: Duration,
    /// Read concern level of reads: "local", "majority", "linearizable" or "available".
    pub read_concern: String,
    /// Most connections the server opens to each MongoDB server; operations wait for a free one.
    pub max_pool_size: u32,
    /// Connections kept open to each MongoDB server even when idle.
    pub min_pool_size: u32,
    pub write_concern: WriteConcernSettings,
    pub tls: MongoTlsSettings,
    pub retry: RetrySettings,
    pub collections: CollectionNames,
}

impl Default for MongoSettings {
    fn default() -> Self {
        Self {
            uri: "mongodb://127.0.0.1:27017".to_owned(),
            database: "eventjournal".to_owned(),
            database_mode: DatabaseMode::Mongo,
            bypass_document_validation: false,
            create_indexes: true,
            index_commit_quorum: "votingMembers".to_owned(),
            connect_timeout: Duration::from_secs(10),
            server_selection_timeout: Duration::from_secs(10),
            read_concern: "majority".to_owned(),
            max_pool_size: 20,
            min_pool_size: 2,
            write_concern: WriteConcernSettings::default(),
            tls: MongoTlsSettings::default(),
            retry: RetrySettings::default(),
            collections: CollectionNames::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct WriteConcernSettings {
    /// "majority", a number of members, or a replica-set tag name.
    pub w: String,
    /// Wait for the on-disk journal before acknowledging.
    pub journal: bool,
    /// `wtimeout`: how long to wait for the acknowledgement. A write that times out may or may
    /// not have been applied; clients retry it safely because writes are idempotent.
    #[serde(with = "humantime_serde")]
    pub timeout: Option<Duration>,
}

impl Default for WriteConcernSettings {
    fn default() -> Self {
        Self {
            w: "majority".to_owned(),
            journal: true,
            timeout: Some(Duration::from_secs(10)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct MongoTlsSettings {
    pub enabled: bool,
    /// PEM file of the certificate authorities that sign the MongoDB server certificates.
    pub ca_file: Option<PathBuf>,
    /// PEM file holding the client certificate followed by its private key (MongoDB's
    /// `tlsCertificateKeyFile`).
    pub certificate_key_file: Option<PathBuf>,
}

/// MongoDB error codes that are transient and retried by default.
pub const DEFAULT_RETRYABLE_ERROR_CODES: &[i32] = &[
    6,     // HostUnreachable
    7,     // HostNotFound
    89,    // NetworkTimeout
    91,    // ShutdownInProgress
    112,   // WriteConflict
    189,   // PrimarySteppedDown
    262,   // ExceededTimeLimit
    9001,  // SocketException
    10107, // NotWritablePrimary
    11600, // InterruptedAtShutdown
    11602, // InterruptedDueToReplStateChange
    13435, // NotPrimaryNoSecondaryOk
    13436, // NotPrimaryOrSecondary
    16500, // CosmosDB: request rate is too large
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct RetrySettings {
    /// Attempts per operation, including the first.
    pub max_attempts: u32,
    pub retryable_error_codes: Vec<i32>,
    /// Pause between attempts when the error carries no backoff hint of its own.
    #[serde(with = "humantime_serde")]
    pub delay: Duration,
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            retryable_error_codes: DEFAULT_RETRYABLE_ERROR_CODES.to_vec(),
            delay: Duration::from_millis(200),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct CollectionNames {
    pub journal: String,
    /// Per persistence id: the highest sequence number, kept when events are deleted so it
    /// survives purging.
    pub journal_metadata: String,
    pub snapshots: String,
    pub durable_state: String,
    /// One document per running server: its published low watermark and lease (see
    /// `read-journal.horizon`).
    pub watermarks: String,
}

impl Default for CollectionNames {
    fn default() -> Self {
        Self {
            journal: "journal".to_owned(),
            journal_metadata: "journal_metadata".to_owned(),
            snapshots: "snapshots".to_owned(),
            durable_state: "durable_state".to_owned(),
            watermarks: "watermarks".to_owned(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct WriteJournalSettings {
    /// In `cosmos` mode: deleted events get a root-level `ttl` field of this many seconds.
    #[serde(with = "humantime_serde")]
    pub cosmos_ttl: Option<Duration>,
    /// Group commit: the most events one MongoDB insert carries.
    pub max_batch_events: u32,
    /// Group commit: the most bytes (as BSON) one MongoDB insert carries; a larger single
    /// event goes alone.
    pub max_batch_bytes: ByteSize,
    /// Group commit: how many batches may be at MongoDB at once. A batch is one ordered insert
    /// of its single-event writes plus a transaction per id with a multi-event write, each on
    /// a connection of its own.
    pub max_batches_in_flight: u32,
    /// Fairness: a producer (stream or connection) with this many events queued is heavy: it
    /// gets batches of its own, capped at this many events and paced while light producers
    /// write.
    pub fair_share_events: u32,
    /// `WriteEventsStream`: requests read from a stream and not yet answered; past it the
    /// server stops reading and HTTP/2 flow control pushes back on the client.
    pub stream_max_unacknowledged: u32,
    /// How long a server relies on the highest sequence number it knows for a persistence id
    /// (from its own last write or a read) before reading it from MongoDB again. At most half of
    /// `purge_delay` less it is used, so an insert decided on the knowledge has the other half to
    /// be answered in (see `purge_delay`).
    #[serde(with = "humantime_serde")]
    pub sequence_nr_cache_validity: Duration,
    /// Deleted events become eligible for purging this long after `DeleteEventsTo`: their
    /// `deletedAt` lies this far ahead. It must be at least twice `sequence-nr-cache-validity`, so a
    /// sequence number is never purged while a server may still rely on knowing it is taken. A
    /// write is inserted on knowledge at most this long less the validity after it was confirmed:
    /// older knowledge is read again first, and an insert still unanswered by then is dropped and
    /// its outcome read back. Keep it well above MongoDB's longest insert (server selection, a
    /// wait for a pooled connection, the write concern's timeout).
    #[serde(with = "humantime_serde")]
    pub purge_delay: Duration,
}

impl Default for WriteJournalSettings {
    fn default() -> Self {
        Self {
            cosmos_ttl: None,
            max_batch_events: 1000,
            max_batch_bytes: ByteSize::mib(16),
            max_batches_in_flight: 4,
            fair_share_events: 100,
            stream_max_unacknowledged: 8,
            sequence_nr_cache_validity: Duration::from_secs(5),
            purge_delay: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct ReadJournalSettings {
    /// Feed live queries from a MongoDB change stream instead of polling.
    pub use_change_streams: bool,
    /// How far queries read: `watermarks` (up to what every running server has published as
    /// settled) or `fixed-drift` (up to `now - allowed-time-drift`). Unset: `watermarks` on
    /// MongoDB, `fixed-drift` in `cosmos` database mode.
    pub horizon: Option<HorizonMode>,
    /// Watermarks: how often each server publishes its low watermark and renews its lease.
    #[serde(with = "humantime_serde")]
    pub watermark_interval: Duration,
    /// Watermarks: a server that has not renewed its lease for this long (by MongoDB's clock)
    /// stops holding queries back; its writes still in flight are settled first.
    #[serde(with = "humantime_serde")]
    pub watermark_lease: Duration,
    /// Fixed drift: polling reads only events written before `now - allowed-time-drift`, so
    /// events committed late by slow or clock-skewed writers are not passed over. Both modes:
    /// the margin of change-stream subscribers joining the shared stream.
    #[serde(with = "humantime_serde")]
    pub allowed_time_drift: Duration,
    /// Events read per query batch.
    pub batch_size: u32,
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Connections of the read journal's own pool (live and current queries), apart from
    /// `mongodb.max-pool-size`: subscribers catching up wait for these, never for the
    /// connections writes use.
    pub max_pool_size: u32,
    /// Change-stream mode: memory for the shared stream's recent changes (payloads included),
    /// from which subscribers join it; one further behind reads a private change stream.
    pub change_stream_history: ByteSize,
    pub change_stream_restart: BackoffSettings,
}

impl Default for ReadJournalSettings {
    fn default() -> Self {
        Self {
            use_change_streams: false,
            horizon: None,
            watermark_interval: Duration::from_millis(50),
            watermark_lease: Duration::from_secs(5),
            allowed_time_drift: Duration::from_secs(2),
            batch_size: 500,
            poll_interval: Duration::from_secs(1),
            max_pool_size: 10,
            change_stream_history: ByteSize::mib(16),
            change_stream_restart: BackoffSettings::default(),
        }
    }
}

/// How far a query may read without missing a write still in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HorizonMode {
    /// Up to the lowest low watermark the running servers published.
    Watermarks,
    /// Up to `now - allowed-time-drift`.
    FixedDrift,
}

impl Settings {
    /// The horizon mode in effect (`read-journal.horizon`, or the database mode's default).
    pub fn horizon_mode(&self) -> HorizonMode {
        self.read_journal
            .horizon
            .unwrap_or(match self.mongodb.database_mode {
                DatabaseMode::Mongo => HorizonMode::Watermarks,
                DatabaseMode::Cosmos => HorizonMode::FixedDrift,
            })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct BackoffSettings {
    #[serde(with = "humantime_serde")]
    pub min_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Jitter: each backoff is stretched by a random fraction up to this factor (0.0..=1.0).
    pub random_factor: f64,
}

impl Default for BackoffSettings {
    fn default() -> Self {
        Self {
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            random_factor: 0.2,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_threads_follow_the_cores_unless_set() {
        let automatic = ServerSettings::default();
        assert_eq!(automatic.worker_threads_for(1), 1);
        assert_eq!(automatic.worker_threads_for(2), 1);
        assert_eq!(automatic.worker_threads_for(3), 3);
        assert_eq!(automatic.worker_threads_for(16), 16);
        let set = ServerSettings {
            worker_threads: 2,
            ..ServerSettings::default()
        };
        assert_eq!(set.worker_threads_for(2), 2);
        assert_eq!(set.worker_threads_for(16), 2);
    }
}
