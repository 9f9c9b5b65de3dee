//! The one mapping from failures to gRPC statuses. Internal details are logged here, once,
//! and never sent to clients.

use std::error::Error;

use model::ValidationError;
use mongo::{FailureKind, StorageError};
use tonic::Status;

/// Bad input: `INVALID_ARGUMENT`, naming the field.
pub(crate) fn invalid_argument(error: ValidationError) -> Status {
    Status::invalid_argument(error.to_string())
}

/// A store's failure as the status a client can act on.
pub(crate) fn storage_status<E: StorageError + 'static>(rpc: &'static str, error: E) -> Status {
    let cause = causes(&error);
    match error.kind() {
        FailureKind::InvalidArgument => Status::invalid_argument(error.to_string()),
        FailureKind::Conflict => Status::aborted(error.to_string()),
        FailureKind::Unavailable => {
            tracing::warn!(rpc, error = %error, cause, "mongodb unavailable");
            Status::unavailable(error.to_string())
        }
        FailureKind::OutcomeUnknown => {
            tracing::warn!(rpc, error = %error, cause, "write outcome unknown");
            Status::unavailable(error.to_string())
        }
        FailureKind::Internal => {
            tracing::error!(rpc, error = %error, cause, "internal error");
            Status::internal(format!(
                "{rpc} failed with an internal error; the server log has the details"
            ))
        }
    }
}

/// The causes for the log line, as a person reads them; the driver's full report is logged at
/// debug level.
fn causes(error: &(dyn Error + 'static)) -> String {
    tracing::debug!(error = ?error, "storage failure");
    error
        .source()
        .map(mongo::describe_chain)
        .unwrap_or_default()
}
