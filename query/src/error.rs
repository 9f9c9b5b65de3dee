use mongo::{FailureKind, MongoError, StorageError};

/// Failures of read-journal queries. Display texts are safe to send to clients. Small (the
/// MongoDB error is boxed): every live query's channel has slots of this size.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error(transparent)]
    Mongo(Box<MongoError>),
    #[error("corrupt journal data: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Horizon(#[from] mongo::HorizonUnavailable),
}

impl StorageError for QueryError {
    fn kind(&self) -> FailureKind {
        match self {
            Self::Mongo(error) => error.kind(),
            Self::Corrupt(_) => FailureKind::Internal,
            Self::Horizon(_) => FailureKind::Unavailable,
        }
    }
}

impl From<MongoError> for QueryError {
    fn from(error: MongoError) -> Self {
        Self::Mongo(Box::new(error))
    }
}
