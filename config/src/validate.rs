//! The one validation pass over loaded settings.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::HorizonMode;
use crate::settings::Settings;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {0} does not exist")]
    MissingFile(PathBuf),
    /// A value of the wrong type, an unknown key or unreadable TOML; figment's message names
    /// the key and where it came from.
    #[error("invalid configuration: {0}")]
    Parse(Box<figment::Error>),
    #[error("invalid configuration:\n{}", list(.0))]
    Invalid(Vec<InvalidSetting>),
}

impl ConfigError {
    /// One bad setting.
    pub fn invalid(key: &'static str, value: &str, reason: impl Into<String>) -> Self {
        ConfigError::Invalid(vec![InvalidSetting {
            key,
            value: value.to_owned(),
            reason: reason.into(),
        }])
    }
}

fn list(problems: &[InvalidSetting]) -> String {
    problems
        .iter()
        .map(|problem| format!("  - {problem}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// One bad setting: the key, the value it had, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidSetting {
    pub key: &'static str,
    pub value: String,
    pub reason: String,
}

impl fmt::Display for InvalidSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} = {}: {}", self.key, self.value, self.reason)
    }
}

/// Collects every problem, so one run of the server reports them all.
#[derive(Default)]
struct Problems(Vec<InvalidSetting>);

impl Problems {
    fn check(&mut self, ok: bool, key: &'static str, value: impl fmt::Debug, reason: &str) {
        if !ok {
            self.0.push(InvalidSetting {
                key,
                value: format!("{value:?}"),
                reason: reason.to_owned(),
            });
        }
    }

    fn positive(&mut self, key: &'static str, value: Duration) {
        self.check(
            !value.is_zero(),
            key,
            humantime::format_duration(value).to_string(),
            "must be above 0",
        );
    }
}

const READ_CONCERNS: &[&str] = &["local", "majority", "linearizable", "available"];

impl Settings {
    /// Checks every setting; the error lists all problems, each with key and value.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Problems::default();
        let server = &self.server;
        problems.check(
            (1 << 20..=1 << 31).contains(&server.max_message_size.as_u64()),
            "server.max-message-size",
            server.max_message_size.to_string(),
            "must be between 1 MiB and 2 GiB",
        );
        problems.check(
            server.max_request_memory >= server.max_message_size,
            "server.max-request-memory",
            server.max_request_memory.to_string(),
            &format!(
                "must be at least server.max-message-size ({}), so that a message of that size \
                 can be received",
                server.max_message_size
            ),
        );
        problems.check(
            server.message_idle_timeout >= Duration::from_millis(10),
            "server.message-idle-timeout",
            humantime::format_duration(server.message_idle_timeout).to_string(),
            "must be at least 10ms",
        );
        let windows = 64 << 10..=1 << 30;
        problems.check(
            windows.contains(&server.http2_stream_window.as_u64()),
            "server.http2-stream-window",
            server.http2_stream_window.to_string(),
            "must be between 64 KiB and 1 GiB",
        );
        problems.check(
            windows.contains(&server.http2_connection_window.as_u64())
                && server.http2_connection_window >= server.http2_stream_window,
            "server.http2-connection-window",
            server.http2_connection_window.to_string(),
            &format!(
                "must be at least 64 KiB and server.http2-stream-window ({}), at most 1 GiB",
                server.http2_stream_window
            ),
        );
        let tls = &server.tls;
        if tls.enabled {
            problems.check(
                tls.certificate_file.is_some() && tls.key_file.is_some(),
                "server.tls.enabled",
                true,
                "needs server.tls.certificate-file and server.tls.key-file",
            );
        }
        for (key, file) in [
            ("server.tls.certificate-file", &tls.certificate_file),
            ("server.tls.key-file", &tls.key_file),
            ("server.tls.client-ca-file", &tls.client_ca_file),
            ("auth.tokens-file", &self.auth.tokens_file),
        ] {
            if let Some(file) = file {
                problems.check(file.is_file(), key, file, "is not a readable file");
            }
        }
        problems.check(
            server.health_check_interval >= Duration::from_millis(10),
            "server.health-check-interval",
            humantime::format_duration(server.health_check_interval).to_string(),
            "must be at least 10ms",
        );
        problems.check(
            server.keep_alive_interval.is_zero()
                || server.keep_alive_interval >= Duration::from_millis(10),
            "server.keep-alive-interval",
            humantime::format_duration(server.keep_alive_interval).to_string(),
            "must be \"0s\" (no pings) or at least 10ms",
        );
        problems.check(
            server.keep_alive_interval.is_zero()
                || server.keep_alive_timeout >= Duration::from_millis(10),
            "server.keep-alive-timeout",
            humantime::format_duration(server.keep_alive_timeout).to_string(),
            "must be at least 10ms (or server.keep-alive-interval \"0s\": no pings)",
        );

        let mongodb = &self.mongodb;
        problems.check(
            mongodb.uri.starts_with("mongodb://") || mongodb.uri.starts_with("mongodb+srv://"),
            "mongodb.uri",
            redact_uri(&mongodb.uri),
            "must start with mongodb:// or mongodb+srv://",
        );
        problems.check(
            is_valid_database_name(&mongodb.database),
            "mongodb.database",
            &mongodb.database,
            "must be 1 to 63 characters without / \\ . \" $ space or NUL",
        );
        problems.check(
            !mongodb.index_commit_quorum.trim().is_empty(),
            "mongodb.index-commit-quorum",
            &mongodb.index_commit_quorum,
            "must be \"votingMembers\", \"majority\", a number or a replica-set tag",
        );
        problems.check(
            READ_CONCERNS.contains(&mongodb.read_concern.as_str()),
            "mongodb.read-concern",
            &mongodb.read_concern,
            "must be one of local, majority, linearizable, available",
        );
        problems.positive("mongodb.connect-timeout", mongodb.connect_timeout);
        problems.positive(
            "mongodb.server-selection-timeout",
            mongodb.server_selection_timeout,
        );
        let w = mongodb.write_concern.w.trim();
        problems.check(
            !w.is_empty()
                && (w.parse::<u32>().is_ok()
                    || !w.starts_with(|c: char| c.is_ascii_digit() || c == '-')),
            "mongodb.write-concern.w",
            &mongodb.write_concern.w,
            "must be \"majority\", a number of members (0 or more) or a replica-set tag",
        );
        if let Some(timeout) = mongodb.write_concern.timeout {
            problems.positive("mongodb.write-concern.timeout", timeout);
        }
        if self.horizon_mode() == HorizonMode::Watermarks {
            // A stamp is released when its write is acknowledged, and a retired server's
            // writes count as settled once the retiring delete is: both need majority.
            problems.check(
                !matches!(w, "0" | "1"),
                "mongodb.write-concern.w",
                &mongodb.write_concern.w,
                "must be \"majority\" (or more than one member) with read-journal.horizon = \
                 \"watermarks\": a write acknowledged by one member may be rolled back",
            );
            problems.check(
                matches!(mongodb.read_concern.as_str(), "majority" | "linearizable"),
                "mongodb.read-concern",
                &mongodb.read_concern,
                "must be majority (or linearizable) with read-journal.horizon = \"watermarks\": \
                 queries must not see writes that may be rolled back",
            );
        }

        let tls = &mongodb.tls;
        for (key, file) in [
            ("mongodb.tls.ca-file", &tls.ca_file),
            (
                "mongodb.tls.certificate-key-file",
                &tls.certificate_key_file,
            ),
        ] {
            if let Some(path) = file {
                problems.check(
                    tls.enabled,
                    key,
                    path,
                    "is set but mongodb.tls.enabled is false",
                );
                problems.check(path.is_file(), key, path, "file does not exist");
            }
        }

        let retry = &mongodb.retry;
        problems.check(
            (1..=100).contains(&retry.max_attempts),
            "mongodb.retry.max-attempts",
            retry.max_attempts,
            "must be 1 to 100 (it counts the first attempt)",
        );

        let collections = &mongodb.collections;
        let names = [
            ("mongodb.collections.journal", &collections.journal),
            (
                "mongodb.collections.journal-metadata",
                &collections.journal_metadata,
            ),
            ("mongodb.collections.snapshots", &collections.snapshots),
            (
                "mongodb.collections.durable-state",
                &collections.durable_state,
            ),
        ];
        for (index, (key, name)) in names.iter().enumerate() {
            problems.check(
                is_valid_collection_name(name),
                key,
                name,
                "must be a non-empty name without $ or NUL, not starting with \"system.\"",
            );
            let clash = names[..index].iter().find(|(_, other)| other == name);
            if let Some((other_key, _)) = clash {
                problems.check(
                    false,
                    key,
                    name,
                    &format!("is also the name of {other_key}"),
                );
            }
        }

        problems.check(
            mongodb.max_pool_size >= 1,
            "mongodb.max-pool-size",
            mongodb.max_pool_size,
            "must be 1 or more",
        );
        problems.check(
            mongodb.min_pool_size <= mongodb.max_pool_size,
            "mongodb.min-pool-size",
            mongodb.min_pool_size,
            "must not be above mongodb.max-pool-size",
        );

        let write = &self.write_journal;
        if let Some(ttl) = write.cosmos_ttl {
            problems.check(
                (1..=i32::MAX as u64).contains(&ttl.as_secs()),
                "write-journal.cosmos-ttl",
                humantime::format_duration(ttl).to_string(),
                "must be between 1s and 2147483647s (it is written as int32 seconds)",
            );
            problems.check(
                ttl >= write.purge_delay,
                "write-journal.cosmos-ttl",
                humantime::format_duration(ttl).to_string(),
                "must not be below write-journal.purge-delay",
            );
        }
        problems.check(
            (1..=100_000).contains(&write.max_batch_events),
            "write-journal.max-batch-events",
            write.max_batch_events,
            "must be 1 to 100000",
        );
        problems.check(
            (1 << 20..=64 << 20).contains(&write.max_batch_bytes.as_u64()),
            "write-journal.max-batch-bytes",
            write.max_batch_bytes.to_string(),
            "must be between 1 MiB and 64 MiB",
        );
        problems.check(
            (1..=64).contains(&write.max_batches_in_flight),
            "write-journal.max-batches-in-flight",
            write.max_batches_in_flight,
            "must be 1 to 64",
        );
        problems.check(
            write.max_batches_in_flight < mongodb.max_pool_size,
            "write-journal.max-batches-in-flight",
            write.max_batches_in_flight,
            "must be below mongodb.max-pool-size, so writes leave connections for reads",
        );
        problems.check(
            write.fair_share_events >= 1,
            "write-journal.fair-share-events",
            write.fair_share_events,
            "must be 1 or more",
        );
        problems.check(
            (1..=1024).contains(&write.stream_max_unacknowledged),
            "write-journal.stream-max-unacknowledged",
            write.stream_max_unacknowledged,
            "must be 1 to 1024",
        );
        problems.positive(
            "write-journal.sequence-nr-cache-validity",
            write.sequence_nr_cache_validity,
        );
        problems.check(
            write.purge_delay >= write.sequence_nr_cache_validity * 2,
            "write-journal.purge-delay",
            humantime::format_duration(write.purge_delay).to_string(),
            "must be at least twice write-journal.sequence-nr-cache-validity",
        );

        problems.check(
            ["zstd", "gzip", "none"].contains(&self.backup.compression.as_str()),
            "backup.compression",
            &self.backup.compression,
            "must be zstd, gzip or none",
        );
        problems.check(
            self.backup.part_size.as_u64() >= 1024,
            "backup.part-size",
            self.backup.part_size,
            "must be at least 1KiB",
        );
        problems.check(
            (1..=64).contains(&self.backup.upload_parallelism),
            "backup.upload-parallelism",
            self.backup.upload_parallelism,
            "must be 1 to 64",
        );
        for (key, expression) in [
            ("backup.schedule.full", &self.backup.schedule.full),
            (
                "backup.schedule.incremental",
                &self.backup.schedule.incremental,
            ),
        ] {
            if let Err(error) = crate::settings::cron(expression) {
                problems.check(false, key, expression, &error);
            }
        }
        if self.backup.store == crate::settings::BackupStoreKind::S3 {
            problems.check(
                !self.backup.s3.bucket.is_empty(),
                "backup.s3.bucket",
                &self.backup.s3.bucket,
                "must name the bucket when backup.store is s3",
            );
            problems.check(
                (5 << 20..=5 << 30).contains(&self.backup.part_size.as_u64()),
                "backup.part-size",
                self.backup.part_size,
                "must be 5MiB to 5GiB when backup.store is s3 (S3's multipart part sizes)",
            );
        }

        let read = &self.read_journal;
        problems.check(
            (1..=100_000).contains(&read.batch_size),
            "read-journal.batch-size",
            read.batch_size,
            "must be 1 to 100000",
        );
        problems.positive("read-journal.poll-interval", read.poll_interval);
        problems.positive("read-journal.watermark-interval", read.watermark_interval);
        problems.check(
            read.watermark_lease >= 4 * read.watermark_interval,
            "read-journal.watermark-lease",
            humantime::format_duration(read.watermark_lease).to_string(),
            "must be at least 4 x read-journal.watermark-interval (a lease outlives a few missed renewals)",
        );
        problems.check(
            read.max_pool_size >= 1,
            "read-journal.max-pool-size",
            read.max_pool_size,
            "must be at least 1",
        );
        let backoff = &read.change_stream_restart;
        problems.positive(
            "read-journal.change-stream-restart.min-backoff",
            backoff.min_backoff,
        );
        problems.check(
            backoff.max_backoff >= backoff.min_backoff,
            "read-journal.change-stream-restart.max-backoff",
            humantime::format_duration(backoff.max_backoff).to_string(),
            "must not be below min-backoff",
        );
        problems.check(
            (0.0..=1.0).contains(&backoff.random_factor),
            "read-journal.change-stream-restart.random-factor",
            backoff.random_factor,
            "must be between 0.0 and 1.0",
        );

        if problems.0.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems.0))
        }
    }
}

fn is_valid_database_name(name: &str) -> bool {
    (1..64).contains(&name.len()) && !name.contains(['/', '\\', '.', '"', '$', ' ', '\0'])
}

fn is_valid_collection_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(['$', '\0']) && !name.starts_with("system.")
}

/// The URI without its password, for error messages and logs.
pub fn redact_uri(uri: &str) -> String {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return uri.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let user = rest[..at].split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:****@{}", &rest[at + 1..])
        }
        None => uri.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(
            redact_uri("mongodb://app:s3cret@db1:27017/?tls=true"),
            "mongodb://app:****@db1:27017/?tls=true"
        );
        assert_eq!(redact_uri("mongodb://db1:27017"), "mongodb://db1:27017");
    }
}
