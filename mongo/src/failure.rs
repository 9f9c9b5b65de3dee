//! What a driver error means to a caller.

use mongodb::error::{Error, ErrorKind, WriteFailure};

/// The kinds of failure a caller must tell apart; the server maps each to one gRPC status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The request is invalid; nothing was changed.
    InvalidArgument,
    /// The request conflicts with stored state (taken sequence number, stale revision).
    Conflict,
    /// MongoDB could not be reached or refused the operation after all retries; nothing was
    /// changed.
    Unavailable,
    /// A write failed in a way that leaves open whether it was applied (network error or
    /// write-concern timeout after sending it). Writes are idempotent, so retrying is safe.
    OutcomeUnknown,
    /// A bug or corrupt data: details go to the log, not to the client.
    Internal,
}

/// The error enum of each store implements this, so the server needs one mapping to gRPC.
pub trait StorageError: std::error::Error {
    fn kind(&self) -> FailureKind;
}

/// A MongoDB operation that failed for good (retries did not help), classified. Display texts
/// are safe to send to clients; the driver error is the `source`, for the log.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MongoError {
    #[error("{operation}: MongoDB is unavailable")]
    Unavailable {
        operation: &'static str,
        #[source]
        source: Error,
    },
    #[error(
        "{operation}: the write may or may not have been applied (MongoDB did not confirm it); \
         retrying the same write is safe"
    )]
    OutcomeUnknown {
        operation: &'static str,
        #[source]
        source: Error,
    },
    #[error(
        "{operation}: the write is stored, but this server could not renew its watermark lease \
         to place it where live queries will see it; retrying the same write is safe"
    )]
    NotLeased {
        operation: &'static str,
        #[source]
        source: crate::watermark::NotLeased,
    },
    #[error("{operation} failed")]
    Internal {
        operation: &'static str,
        #[source]
        source: Error,
    },
}

impl MongoError {
    /// Classifies an error that retries did not cure. A `write` that failed on the network or
    /// on its write concern may still have been applied.
    pub fn new(
        operation: &'static str,
        write: bool,
        retryable_codes: &[i32],
        source: Error,
    ) -> Self {
        match classify(&source, write, retryable_codes) {
            FailureKind::Unavailable => Self::Unavailable { operation, source },
            FailureKind::OutcomeUnknown => Self::OutcomeUnknown { operation, source },
            _ => Self::Internal { operation, source },
        }
    }
}

impl StorageError for MongoError {
    fn kind(&self) -> FailureKind {
        match self {
            Self::Unavailable { .. } => FailureKind::Unavailable,
            Self::OutcomeUnknown { .. } | Self::NotLeased { .. } => FailureKind::OutcomeUnknown,
            Self::Internal { .. } => FailureKind::Internal,
        }
    }
}

const DUPLICATE_KEY: i32 = 11000;
const WRITE_CONCERN_FAILED: i32 = 64;

/// Every server error code in the error: command, write, write-concern and bulk write errors.
pub fn error_codes(error: &Error) -> Vec<i32> {
    let mut codes = Vec::new();
    match error.kind.as_ref() {
        ErrorKind::Command(command) => codes.push(command.code),
        ErrorKind::Write(WriteFailure::WriteError(write)) => codes.push(write.code),
        ErrorKind::Write(WriteFailure::WriteConcernError(concern)) => codes.push(concern.code),
        ErrorKind::InsertMany(insert) => {
            codes.extend(insert.write_errors.iter().flatten().map(|write| write.code));
            codes.extend(
                insert
                    .write_concern_error
                    .iter()
                    .map(|concern| concern.code),
            );
        }
        _ => {}
    }
    codes
}

/// A unique index refused the write: for the journal, the sequence number is taken.
pub fn is_duplicate_key(error: &Error) -> bool {
    error_codes(error).contains(&DUPLICATE_KEY)
}

fn is_network(error: &Error) -> bool {
    matches!(
        error.kind.as_ref(),
        ErrorKind::Io(_) | ErrorKind::ConnectionPoolCleared { .. }
    ) || error.contains_label("NetworkError")
}

fn classify(error: &Error, write: bool, retryable_codes: &[i32]) -> FailureKind {
    if matches!(
        error.kind.as_ref(),
        ErrorKind::ServerSelection { .. } | ErrorKind::DnsResolve { .. }
    ) {
        return FailureKind::Unavailable;
    }
    let write_concern_failed = matches!(
        error.kind.as_ref(),
        ErrorKind::Write(WriteFailure::WriteConcernError(_))
    ) || matches!(error.kind.as_ref(), ErrorKind::InsertMany(insert) if insert.write_concern_error.is_some())
        || error_codes(error).contains(&WRITE_CONCERN_FAILED);
    if write
        && (is_network(error)
            || write_concern_failed
            || error.contains_label("UnknownTransactionCommitResult"))
    {
        return FailureKind::OutcomeUnknown;
    }
    if is_network(error)
        || error.contains_label("RetryableWriteError")
        || error.contains_label("TransientTransactionError")
        || error_codes(error)
            .iter()
            .any(|code| retryable_codes.contains(code))
    {
        return FailureKind::Unavailable;
    }
    FailureKind::Internal
}
