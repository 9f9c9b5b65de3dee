//! Helpers for read-journal tests, shared by the suites that need them.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::v1 as pb;
use proto::v1::read_journal_client::ReadJournalClient;
use tonic::Streaming;
use tonic::transport::Channel;

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

/// Everything a current (completing) query stream returns.
pub async fn read_all(mut stream: Streaming<pb::EventEnvelope>) -> Vec<pb::EventEnvelope> {
    let mut envelopes = Vec::new();
    while let Some(envelope) = stream.message().await.expect("query stream failed") {
        envelopes.push(envelope);
    }
    envelopes
}

pub async fn current_by_tag(
    client: &mut ReadJournalClient<Channel>,
    tag: &str,
    offset: &str,
) -> Vec<pb::EventEnvelope> {
    let request = pb::EventsByTagRequest {
        tag: tag.into(),
        offset: offset.into(),
    };
    read_all(
        client
            .current_events_by_tag(request)
            .await
            .unwrap()
            .into_inner(),
    )
    .await
}

/// `CurrentEventsByTag` from the start, once it returns at least `count` events (it ends at
/// `now - allowed-time-drift`), failing after 30 s: `(pid, seqNr)` in read-journal order.
pub async fn current_ids_once(channel: &Channel, tag: &str, count: usize) -> Vec<(String, i64)> {
    let mut client = ReadJournalClient::new(channel.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let found = ids(&current_by_tag(&mut client, tag, "").await);
        if found.len() >= count {
            return found;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "CurrentEventsByTag({tag}) returned {} of {count} events within 30 s",
            found.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Read-journal order agrees with sequence-number order: per persistence id, its events come
/// as 1, 2, 3, ... (or from where `first` says), each once.
pub fn assert_in_sequence_order(events: &[(String, i64)]) {
    let mut next: std::collections::HashMap<&str, i64> = std::collections::HashMap::new();
    for (pid, sequence_nr) in events {
        let expected = next.entry(pid.as_str()).or_insert(1);
        assert_eq!(
            sequence_nr, expected,
            "{pid}: read-journal order {events:?} does not follow sequence numbers"
        );
        *expected += 1;
    }
}

/// `(pid, seqNr, writtenAt of the position it was delivered at)`, in delivery order.
pub type Received = Arc<Mutex<Vec<(String, i64, i64)>>>;

/// A live `EventsByTag` subscriber that resumes from its last offset whenever its stream
/// breaks (the server went away or failed it), until `stop`.
pub struct ResumingSubscriber {
    /// Every event received, in order, repeats included.
    pub received: Received,
    /// How often its stream broke and it resumed.
    pub reconnects: Arc<Mutex<usize>>,
    pub task: tokio::task::JoinHandle<()>,
}

impl ResumingSubscriber {
    pub fn start(
        channel: Channel,
        tag: &'static str,
        stop: tokio_util::sync::CancellationToken,
    ) -> Self {
        let received = Received::default();
        let reconnects = Arc::new(Mutex::new(0));
        let task = {
            let received = received.clone();
            let reconnects = reconnects.clone();
            tokio::spawn(async move {
                let mut client = ReadJournalClient::new(channel);
                let mut offset = String::new();
                let mut first = true;
                while !stop.is_cancelled() {
                    if !first {
                        *reconnects.lock().unwrap() += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    first = false;
                    let request = pb::EventsByTagRequest {
                        tag: tag.into(),
                        offset: offset.clone(),
                    };
                    let Ok(response) = client.events_by_tag(request).await else {
                        continue;
                    };
                    let mut stream = response.into_inner();
                    loop {
                        tokio::select! {
                            () = stop.cancelled() => break,
                            message = stream.message() => match message {
                                Ok(Some(envelope)) => {
                                    let event = envelope.event.unwrap();
                                    let position = query::offset::Position::parse_offset(
                                        "offset",
                                        &envelope.offset,
                                    )
                                    .unwrap()
                                    .unwrap();
                                    received.lock().unwrap().push((
                                        event.persistence_id,
                                        event.sequence_nr,
                                        position.written_at_millis,
                                    ));
                                    offset = envelope.offset;
                                }
                                _ => break,
                            },
                        }
                    }
                }
            })
        };
        Self {
            received,
            reconnects,
            task,
        }
    }
}

/// `(seqNr, writtenAt in ms)` of each stored event of `pid`, by sequence number.
pub async fn stamps_of(server: &super::TestServer, pid: &str) -> Vec<(i64, i64)> {
    use futures::TryStreamExt;
    use mongodb::bson::{Document, doc};
    server
        .mongodb()
        .await
        .collection::<Document>("journal")
        .find(doc! { "pid": pid })
        .sort(doc! { "seqNr": 1 })
        .await
        .unwrap()
        .map_ok(|document| {
            let written_at = document.get_datetime("writtenAt").unwrap();
            (
                document.get_i64("seqNr").unwrap(),
                written_at.timestamp_millis(),
            )
        })
        .try_collect()
        .await
        .unwrap()
}
