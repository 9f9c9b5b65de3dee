use mongo::{FailureKind, Retry, StorageError, classify};

/// Failures of journal operations. Display texts are safe to send to clients; the MongoDB
/// error behind one is its `source`, for the log.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("{operation}: MongoDB is unavailable")]
    Unavailable {
        operation: &'static str,
        #[source]
        source: mongodb::error::Error,
    },
    #[error(
        "{operation}: the write may or may not have been applied (MongoDB did not confirm it); \
         retrying the same write is safe"
    )]
    OutcomeUnknown {
        operation: &'static str,
        #[source]
        source: mongodb::error::Error,
    },
    #[error("{operation} failed")]
    Internal {
        operation: &'static str,
        #[source]
        source: mongodb::error::Error,
    },
    #[error("corrupt journal data: {0}")]
    Corrupt(String),
}

impl JournalError {
    pub(crate) fn from_mongo(
        operation: &'static str,
        write: bool,
        retry: &Retry,
        source: mongodb::error::Error,
    ) -> Self {
        match classify(&source, write, retry.retryable_codes()) {
            FailureKind::Unavailable => Self::Unavailable { operation, source },
            FailureKind::OutcomeUnknown => Self::OutcomeUnknown { operation, source },
            _ => Self::Internal { operation, source },
        }
    }
}

impl StorageError for JournalError {
    fn kind(&self) -> FailureKind {
        match self {
            Self::Unavailable { .. } => FailureKind::Unavailable,
            Self::OutcomeUnknown { .. } => FailureKind::OutcomeUnknown,
            Self::Internal { .. } | Self::Corrupt(_) => FailureKind::Internal,
        }
    }
}
