//! What a call can fail with.

use tonic::Code;

/// A failed call, by what the caller can do about it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The request was wrong (the message names what); retrying cannot help.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The stored state is not what the call expected (a durable-state revision, a sequence
    /// number taken): read, decide again.
    #[error("conflict: {0}")]
    Conflict(String),
    /// What the call names does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The service or MongoDB could not be reached, after the configured retries.
    #[error("unavailable after {attempts} attempt(s): {message}")]
    Unavailable {
        /// Attempts made, the first included.
        attempts: u32,
        /// The last failure.
        message: String,
    },
    /// No bearer token, or one the service does not know.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The token lacks the role the call needs (read, write, admin).
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// No answer came within the client's call timeout, in the last attempt the retry policy
    /// allows; or a write waited that long for a free `WriteEvents` call and was not sent. The
    /// call may have been applied; sending it again is safe.
    #[error("deadline exceeded: {0}")]
    DeadlineExceeded(String),
    /// Anything else the service answered.
    #[error("{code:?}: {message}")]
    Other {
        /// The gRPC status code.
        code: Code,
        /// The service's message.
        message: String,
    },
    /// The endpoint or TLS settings cannot be used.
    #[error("configuration: {0}")]
    Configuration(String),
}

impl Error {
    /// Whether a status means the call may not have reached the service: `UNAVAILABLE`, a
    /// connection broken under the call (tonic's `UNKNOWN` "transport error" or `CANCELLED`
    /// "operation was canceled", which carry the transport's error as their source; the
    /// service's own statuses carry none), or the client's call timeout running out
    /// ([`Error::timed_out`]). Such a call is sent again while attempts remain.
    pub(crate) fn unreachable(status: &tonic::Status) -> bool {
        if Self::timed_out(status) {
            return true;
        }
        match status.code() {
            Code::Unavailable => true,
            Code::Unknown | Code::Cancelled => std::error::Error::source(status).is_some(),
            _ => false,
        }
    }

    /// Whether a status is the call timeout running out: the client's own (tonic's `CANCELLED`
    /// "Timeout expired", with [`tonic::TimeoutExpired`] as its source), the server's
    /// enforcement of the same deadline (that status as it comes over the wire: the service
    /// itself never answers `CANCELLED`), or `DEADLINE_EXCEEDED` (from a proxy on the way).
    pub(crate) fn timed_out(status: &tonic::Status) -> bool {
        match status.code() {
            Code::DeadlineExceeded => return true,
            Code::Cancelled if status.message() == "Timeout expired" => return true,
            _ => {}
        }
        let mut source = std::error::Error::source(status);
        while let Some(error) = source {
            if error.is::<tonic::TimeoutExpired>() {
                return true;
            }
            source = error.source();
        }
        false
    }

    pub(crate) fn from_status(status: tonic::Status, attempts: u32) -> Self {
        let message = status.message().to_owned();
        if Self::unreachable(&status) {
            return Self::Unavailable { attempts, message };
        }
        match status.code() {
            Code::InvalidArgument | Code::OutOfRange => Self::InvalidArgument(message),
            Code::Aborted | Code::AlreadyExists | Code::FailedPrecondition => {
                Self::Conflict(message)
            }
            Code::NotFound => Self::NotFound(message),
            Code::Unavailable => Self::Unavailable { attempts, message },
            Code::Unauthenticated => Self::Unauthenticated(message),
            Code::PermissionDenied => Self::PermissionDenied(message),
            Code::DeadlineExceeded => Self::DeadlineExceeded(message),
            code => Self::Other { code, message },
        }
    }

    /// Whether the same call may be sent again: the service was not reached, or answered that
    /// it could not reach MongoDB, or did not answer in time. Every write of the contract is
    /// idempotent, so a retry of one whose first attempt was in fact applied gets the same
    /// answer.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable { .. } | Self::DeadlineExceeded(_))
    }
}

/// A call's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_call_timeout_is_recognised_however_it_comes() {
        // The client's own timer: tonic's status with `TimeoutExpired` as its source.
        let own = tonic::Status::from_error(Box::new(tonic::TimeoutExpired(())));
        // The server's enforcement of the same deadline, as it comes over the wire (no source),
        // and a proxy's DEADLINE_EXCEEDED.
        let server = tonic::Status::cancelled("Timeout expired");
        let proxy = tonic::Status::deadline_exceeded("upstream request timeout");
        for status in [&own, &server, &proxy] {
            assert!(Error::timed_out(status), "{status:?}");
            assert!(Error::unreachable(status), "retried: {status:?}");
        }
        // A service's own CANCELLED is neither.
        let other = tonic::Status::cancelled("the service's own reason");
        assert!(!Error::timed_out(&other) && !Error::unreachable(&other));
        assert!(!Error::timed_out(&tonic::Status::unavailable("down")));
    }
}
