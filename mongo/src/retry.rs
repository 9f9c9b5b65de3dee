//! The retry policy of every MongoDB operation: `max-attempts` including the first,
//! `retryable-error-codes`, and `delay` unless the error carries a backoff hint.
//! Retrying writes is safe because journal writes are idempotent.

use std::future::IntoFuture;
use std::time::Duration;

use config::RetrySettings;
use mongodb::error::{Error, ErrorKind};

use crate::failure::{MongoError, error_codes, is_duplicate_key};

#[derive(Debug, Clone)]
pub struct Retry {
    max_attempts: u32,
    retryable_codes: Vec<i32>,
    delay: Duration,
}

impl Retry {
    pub fn new(settings: &RetrySettings) -> Self {
        Self {
            max_attempts: settings.max_attempts.max(1),
            retryable_codes: settings.retryable_error_codes.clone(),
            delay: settings.delay,
        }
    }

    /// The error of an operation whose retries are used up, classified.
    pub fn failure(&self, operation: &'static str, write: bool, error: Error) -> MongoError {
        MongoError::new(operation, write, &self.retryable_codes, error)
    }

    /// Transient errors: network failures, errors MongoDB labels retryable or transient, and
    /// the configured codes. Server selection timeouts are not retried: they already waited
    /// `server-selection-timeout`.
    pub fn is_retryable(&self, error: &Error) -> bool {
        if is_duplicate_key(error)
            || matches!(error.kind.as_ref(), ErrorKind::ServerSelection { .. })
        {
            return false;
        }
        matches!(
            error.kind.as_ref(),
            ErrorKind::Io(_) | ErrorKind::ConnectionPoolCleared { .. }
        ) || error.contains_label("RetryableWriteError")
            || error.contains_label("TransientTransactionError")
            || error.contains_label("NetworkError")
            || error_codes(error)
                .iter()
                .any(|code| self.retryable_codes.contains(code))
    }

    /// Runs `attempt` (a future or a driver action) until it succeeds, fails with a non-retryable error, or `max-attempts`
    /// are used up; returns the last error then.
    pub async fn run<T, Fut>(
        &self,
        operation: &'static str,
        mut attempt: impl FnMut() -> Fut,
    ) -> Result<T, Error>
    where
        Fut: IntoFuture<Output = Result<T, Error>>,
    {
        let mut attempts = 1;
        loop {
            match attempt().await {
                Ok(value) => return Ok(value),
                Err(error) if attempts < self.max_attempts && self.is_retryable(&error) => {
                    self.pause_before_retry(operation, attempts, &error).await;
                    attempts += 1;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Attempts per operation, including the first.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// For callers running their own attempt loop: counts and logs the retry of a failed
    /// `attempt` (1 for the first) and waits the error's backoff hint or the configured delay.
    pub async fn pause_before_retry(&self, operation: &'static str, attempt: u32, error: &Error) {
        let pause = backoff_hint(error).unwrap_or(self.delay);
        let codes = error_codes(error);
        let code = codes
            .first()
            .map_or_else(|| "network".to_owned(), i32::to_string);
        crate::metrics::RETRIES
            .with_label_values(&[operation, &code])
            .inc();
        tracing::warn!(
            operation,
            attempt,
            ?codes,
            pause_ms = pause.as_millis() as u64,
            error = %crate::describe(error),
            "retrying mongodb operation"
        );
        tokio::time::sleep(pause).await;
    }
}

/// CosmosDB's "request rate is too large" (16500) says how long to wait: `RetryAfterMs=123`.
fn backoff_hint(error: &Error) -> Option<Duration> {
    let text = error.to_string();
    let start = text.find("RetryAfterMs=")? + "RetryAfterMs=".len();
    let digits: String = text[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse::<u64>().ok().map(Duration::from_millis)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn policy(max_attempts: u32) -> Retry {
        Retry::new(&RetrySettings {
            max_attempts,
            retryable_error_codes: vec![91],
            delay: Duration::from_millis(1),
        })
    }

    fn io_error() -> Error {
        Error::from(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset",
        ))
    }

    #[tokio::test]
    async fn retries_transient_errors_up_to_max_attempts_including_the_first() {
        let calls = AtomicU32::new(0);
        let result: Result<(), _> = policy(3)
            .run("test", || {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err(io_error()) }
            })
            .await;
        assert!(result.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn stops_at_the_first_success() {
        let calls = AtomicU32::new(0);
        let result = policy(5)
            .run("test", || {
                let call = calls.fetch_add(1, Ordering::SeqCst);
                async move { if call < 2 { Err(io_error()) } else { Ok(call) } }
            })
            .await;
        assert_eq!(result.unwrap(), 2);
    }

    #[tokio::test]
    async fn does_not_retry_other_errors() {
        let calls = AtomicU32::new(0);
        let result: Result<(), _> = policy(5)
            .run("test", || {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err(Error::custom("not transient")) }
            })
            .await;
        assert!(result.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
