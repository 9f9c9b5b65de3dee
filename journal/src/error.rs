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
    /// A write collided with an event that majority reads do not show yet, on every attempt.
    #[error("{0}")]
    Unseen(String),
}

impl StorageError for JournalError {
    fn kind(&self) -> FailureKind {
        match self {
            Self::Mongo(error) => error.kind(),
            Self::Corrupt(_) | Self::Internal(_) => FailureKind::Internal,
            Self::Unseen(_) => FailureKind::Unavailable,
        }
    }
}
