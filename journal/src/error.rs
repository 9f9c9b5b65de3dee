use mongo::{FailureKind, MongoError, StorageError};

/// Failures of journal operations. Display texts are safe to send to clients.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JournalError {
    #[error(transparent)]
    Mongo(#[from] MongoError),
    #[error("corrupt journal data: {0}")]
    Corrupt(String),
    #[error("internal error: {0}")]
    Internal(String),
    /// A write the server could not decide safely, round after round (an event majority reads
    /// did not show, or reads too slow to trust); it was not stored.
    #[error("{0}")]
    Undecided(String),
}

impl StorageError for JournalError {
    fn kind(&self) -> FailureKind {
        match self {
            Self::Mongo(error) => error.kind(),
            Self::Corrupt(_) | Self::Internal(_) => FailureKind::Internal,
            Self::Undecided(_) => FailureKind::Unavailable,
        }
    }
}
