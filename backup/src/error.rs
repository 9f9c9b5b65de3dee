use std::io;

/// What can go wrong in a backup, restore or verify; each message says what and where.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0}")]
    Mongo(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("no backup {0} (no manifest: missing, or not complete)")]
    NotFound(String),
    #[error("backup {backup}: {problem}")]
    Invalid { backup: String, problem: String },
    #[error("{0}")]
    Refused(String),
    /// An incremental backup with no backup to build on.
    #[error(
        "no complete backup of database {0} with the same selection to build an incremental \
         backup on: take a full backup first (without --incremental)"
    )]
    NoBase(String),
}

impl BackupError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }

    /// MongoDB's message and code name; the driver's whole report goes to the debug log.
    pub(crate) fn mongo(what: &str, error: mongodb::error::Error) -> Self {
        tracing::debug!(?error, what, "mongodb failure");
        Self::Mongo(format!("{what}: {}", mongo::describe(&error)))
    }
}
