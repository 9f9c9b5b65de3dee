//! Helpers for read-journal tests, shared by the suites that need them.

use std::time::Duration;

use proto::v1 as pb;
use tonic::Streaming;

use super::event;

/// Short drift and poll interval, so tests run fast; the logic is the same.
pub fn fast(settings: &mut config::Settings) {
    settings.read_journal.allowed_time_drift = Duration::from_millis(500);
    settings.read_journal.poll_interval = Duration::from_millis(50);
    settings.read_journal.batch_size = 50;
}

pub fn tagged(pid: &str, sequence_nr: i64, tags: &[&str]) -> pb::PersistentEvent {
    pb::PersistentEvent {
        tags: tags.iter().map(|tag| tag.to_string()).collect(),
        ..event(pid, sequence_nr, &format!("{pid}-{sequence_nr}"))
    }
}

pub fn ids(envelopes: &[pb::EventEnvelope]) -> Vec<(String, i64)> {
    envelopes
        .iter()
        .map(|envelope| {
            let event = envelope.event.as_ref().unwrap();
            (event.persistence_id.clone(), event.sequence_nr)
        })
        .collect()
}

/// Reads `count` envelopes from a live stream, failing after `seconds`.
pub async fn take(
    stream: &mut Streaming<pb::EventEnvelope>,
    count: usize,
    seconds: u64,
) -> Vec<pb::EventEnvelope> {
    let mut envelopes = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
    while envelopes.len() < count {
        let next = tokio::time::timeout_at(deadline, stream.message()).await;
        match next {
            Ok(Ok(Some(envelope))) => envelopes.push(envelope),
            Ok(other) => panic!(
                "live stream ended or failed after {} envelopes: {other:?}",
                envelopes.len()
            ),
            Err(_) => panic!(
                "only {} of {count} envelopes within {seconds} s",
                envelopes.len()
            ),
        }
    }
    envelopes
}

pub fn change_streams(settings: &mut config::Settings) {
    fast(settings);
    settings.read_journal.use_change_streams = true;
    settings.read_journal.change_stream_restart.min_backoff = Duration::from_millis(50);
    settings.read_journal.change_stream_restart.max_backoff = Duration::from_millis(500);
}
