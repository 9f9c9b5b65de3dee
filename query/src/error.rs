use mongo::{FailureKind, MongoError, StorageError};

/// Failures of read-journal queries. Display texts are safe to send to clients.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error(transparent)]
    Mongo(#[from] MongoError),
    #[error("corrupt journal data: {0}")]
    Corrupt(String),
}

impl StorageError for QueryError {
    fn kind(&self) -> FailureKind {
        match self {
            Self::Mongo(error) => error.kind(),
            Self::Corrupt(_) => FailureKind::Internal,
        }
    }
}
