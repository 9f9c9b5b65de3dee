//! `eventjournal.v1.Journal`: converts requests to domain types, calls [`journal::Journal`],
//! maps results back.

use std::future::Future;
use std::time::Instant;

use futures::stream::FuturesOrdered;
use journal::{Journal, Origin, RefusedWrite, StreamPosition, WriteOutcome};
use model::{AtomicWrite, PersistenceId, ReplayRange, non_negative};
use proto::PRODUCER_GROUP_METADATA as PRODUCER_GROUP;
use proto::v1 as pb;
use proto::v1::atomic_write_result::Outcome;
use proto::v1::replay_events_response::Item;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::grpc::STREAM_BUFFER;
use crate::metrics::server as metrics;
use crate::request_memory::HeldMessages;
use crate::status::{invalid_argument, storage_status};

pub(crate) struct JournalService {
    journal: Journal,
    /// `WriteEventsStream`: requests read and not yet answered, per stream.
    stream_max_unacknowledged: usize,
    /// `WriteEventsStream`: a stream whose unanswered requests hold this many bytes of
    /// `server.max-request-memory` stops reading ahead.
    stream_max_held_bytes: u64,
}

impl JournalService {
    pub(crate) fn new(journal: Journal, settings: &config::Settings) -> Self {
        Self {
            journal,
            stream_max_unacknowledged: settings.write_journal.stream_max_unacknowledged as usize,
            stream_max_held_bytes: crate::request_memory::stream_share(&settings.server),
        }
    }
}

fn outcome(outcome: WriteOutcome) -> pb::AtomicWriteResult {
    let outcome = match outcome {
        WriteOutcome::Written => Outcome::Written(pb::Written {}),
        WriteOutcome::Rejected(reason) => Outcome::Rejected(pb::Rejected { reason }),
        WriteOutcome::Conflict(reason) => Outcome::Conflict(pb::Conflict { reason }),
    };
    pb::AtomicWriteResult {
        outcome: Some(outcome),
    }
}

/// One `WriteEventsRequest`, from `WriteEvents` or a `WriteEventsStream`, queued with the
/// journal now (so the writes of a stream keep its order): an invalid write is rejected on its
/// own (and, as a failed write of the persistence id it names, stops that id's later writes),
/// and the future answers with one result per write, in order. `refused`: a reason that
/// rejects every write of the request.
fn write_request(
    journal: &Journal,
    origin: Origin,
    request: pb::WriteEventsRequest,
    refused: Option<String>,
    rpc: &'static str,
) -> impl Future<Output = Result<pb::WriteEventsResponse, Status>> + Send + 'static {
    let received = Instant::now();
    let writes: Vec<Result<AtomicWrite, RefusedWrite>> = request
        .writes
        .into_iter()
        .map(|write| validate(write, refused.as_deref()))
        .collect();
    let sizes: Vec<(u64, u64)> = writes
        .iter()
        .map(|write| {
            let Ok(write) = write else {
                return (0, 0);
            };
            let events = write.events();
            (
                events.len() as u64,
                events.iter().map(metrics::event_bytes).sum(),
            )
        })
        .collect();
    let outcomes = journal.submit(origin, writes);
    async move {
        let outcomes = outcomes.await.map_err(|error| storage_status(rpc, error))?;
        let acknowledged = received.elapsed().as_nanos() as f64;
        let results = outcomes
            .into_iter()
            .zip(sizes)
            .map(|(written, (events, bytes))| {
                if matches!(written, WriteOutcome::Written) {
                    metrics::EVENTS_WRITTEN.inc_by(events);
                    metrics::EVENT_BYTES_WRITTEN.inc_by(bytes);
                    metrics::PERSISTENCE_TIME.observe(acknowledged);
                }
                outcome(written)
            })
            .collect();
        Ok(pb::WriteEventsResponse { results })
    }
}

/// The write, or why it is refused, with the persistence id and sequence numbers its events
/// give (kept before validation consumes them).
fn validate(write: pb::AtomicWrite, refused: Option<&str>) -> Result<AtomicWrite, RefusedWrite> {
    let named = write.events.first().map(|first| {
        let last = write.events.last().unwrap_or(first);
        (
            first.persistence_id.clone(),
            first.sequence_nr,
            last.sequence_nr,
        )
    });
    let reason = match refused {
        Some(reason) => reason.to_owned(),
        None => match AtomicWrite::try_from(write) {
            Ok(write) => return Ok(write),
            Err(error) => error.to_string(),
        },
    };
    let (persistence_id, first, last) = match named {
        Some((pid, first, last)) => (
            PersistenceId::parse("persistence_id", pid).ok(),
            first,
            last,
        ),
        None => (None, 0, 0),
    };
    Err(RefusedWrite {
        persistence_id,
        first,
        last,
        reason,
    })
}

/// The client's [`PRODUCER_GROUP`], if it sends one: 1 to 16 hex digits (see
/// `journal::Origin::call`).
fn producer_group(metadata: &tonic::metadata::MetadataMap) -> Result<Option<u64>, Status> {
    let Some(value) = metadata.get(PRODUCER_GROUP) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .filter(|text| {
            (1..=16).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_hexdigit())
        })
        .and_then(|text| u64::from_str_radix(text, 16).ok())
        .map(Some)
        .ok_or_else(|| {
            Status::invalid_argument(format!(
                "{PRODUCER_GROUP} (metadata): is {value:?}, expected 1 to 16 hex digits"
            ))
        })
}

/// The stream's next request; none once its inbound side has been dropped.
async fn next_request(
    inbound: &mut Option<Streaming<pb::WriteEventsRequest>>,
) -> Result<Option<pb::WriteEventsRequest>, Status> {
    match inbound {
        Some(inbound) => inbound.message().await,
        None => Ok(None),
    }
}

/// Tells the journal that a `WriteEventsStream` has ended, when dropped.
struct StreamClosed<'a>(&'a Journal, Origin);

impl Drop for StreamClosed<'_> {
    fn drop(&mut self) {
        self.0.stream_closed(self.1);
    }
}

#[tonic::async_trait]
impl pb::journal_server::Journal for JournalService {
    #[tracing::instrument(name = "WriteEvents", skip_all, fields(writes))]
    async fn write_events(
        &self,
        request: Request<pb::WriteEventsRequest>,
    ) -> Result<Response<pb::WriteEventsResponse>, Status> {
        // The calls of one connection are one producer for the group commit's fairness, of
        // the client (group) they name.
        let group = producer_group(request.metadata())?;
        let origin = Origin::call(request.remote_addr(), group);
        let request = request.into_inner();
        tracing::Span::current().record("writes", request.writes.len());
        write_request(&self.journal, origin, request, None, "WriteEvents")
            .await
            .map(Response::new)
    }

    type WriteEventsStreamStream = ReceiverStream<Result<pb::WriteEventsResponse, Status>>;

    #[tracing::instrument(name = "WriteEventsStream", skip_all)]
    async fn write_events_stream(
        &self,
        request: Request<Streaming<pb::WriteEventsRequest>>,
    ) -> Result<Response<Self::WriteEventsStreamStream>, Status> {
        // The requests' bytes stay counted against server.max-request-memory until answered.
        let held = request.extensions().get::<HeldMessages>().cloned();
        // `None` once reading has ended; dropped then, so after an early end HTTP/2 discards
        // what the client still sends instead of holding the connection's window while the
        // requests read are answered.
        let mut inbound = Some(request.into_inner());
        let origin = Origin::stream();
        let journal = self.journal.clone();
        let max_unacknowledged = self.stream_max_unacknowledged;
        let max_held_bytes = self.stream_max_held_bytes;
        let (sender, receiver) = mpsc::channel(STREAM_BUFFER);
        let producer = async move {
            // Its failures stop nothing once it has ended, however it ends.
            let _closed = StreamClosed(&journal, origin);
            let mut unanswered = FuturesOrdered::new();
            // Why reading ended early (a bad message, server.max-request-memory): sent once the
            // requests read before it are answered.
            let mut read_failure = None;
            // Requests read, and responses sent.
            let (mut read, mut sent) = (0, 0);
            loop {
                tokio::select! {
                    biased;
                    Some(response) = unanswered.next(), if !unanswered.is_empty() => {
                        if let Some(held) = &held {
                            held.release_oldest();
                        }
                        let failed = Result::is_err(&response);
                        // A failed send means the client left; a storage failure ends the stream.
                        if sender.send(response).await.is_err() || failed {
                            return;
                        }
                        sent += 1;
                    }
                    // Past the limits the request is left unread: HTTP/2 flow control then
                    // stops the client, and the server holds at most this many requests, and
                    // about this much of its request budget (see `stream_share`).
                    message = next_request(&mut inbound), if inbound.is_some()
                        && unanswered.len() < max_unacknowledged
                        && (unanswered.is_empty()
                            || held.as_ref().is_none_or(|held| held.bytes() < max_held_bytes)) => {
                        match message {
                            Ok(Some(request)) => {
                                let received = request.responses_received.unwrap_or(0);
                                let refused = (received > sent).then(|| format!(
                                    "responses_received: is {received} but the server has sent \
                                     {sent} responses on this stream"
                                ));
                                let position = StreamPosition {
                                    index: read,
                                    responses_received: received.min(sent),
                                };
                                read += 1;
                                unanswered.push_back(write_request(
                                    &journal,
                                    origin.at(position),
                                    request,
                                    refused,
                                    "WriteEventsStream",
                                ));
                            }
                            Ok(None) => inbound = None,
                            Err(status) => {
                                inbound = None;
                                read_failure = Some(status);
                            }
                        }
                    }
                    // The client cancelled the stream (or left): its requests' writes not sent
                    // to MongoDB yet go with it, as a cancelled `WriteEvents` call's do.
                    () = sender.closed(), if inbound.is_some() || !unanswered.is_empty() => return,
                    // Everything read is answered, and the client sends no more (or cannot).
                    else => {
                        if let Some(status) = read_failure {
                            let _ = sender.send(Err(status)).await;
                        }
                        return;
                    }
                }
            }
        };
        tokio::spawn(producer.in_current_span());
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    #[tracing::instrument(name = "DeleteEventsTo", skip_all, fields(pid))]
    async fn delete_events_to(
        &self,
        request: Request<pb::DeleteEventsToRequest>,
    ) -> Result<Response<pb::DeleteEventsToResponse>, Status> {
        let request = request.into_inner();
        let pid = PersistenceId::parse("persistence_id", request.persistence_id)
            .map_err(invalid_argument)?;
        tracing::Span::current().record("pid", pid.as_str());
        let to =
            non_negative("to_sequence_nr", request.to_sequence_nr).map_err(invalid_argument)?;
        self.journal
            .delete_to(&pid, to)
            .await
            .map_err(|error| storage_status("DeleteEventsTo", error))?;
        Ok(Response::new(pb::DeleteEventsToResponse {}))
    }

    #[tracing::instrument(name = "ReadHighestSequenceNr", skip_all, fields(pid))]
    async fn read_highest_sequence_nr(
        &self,
        request: Request<pb::ReadHighestSequenceNrRequest>,
    ) -> Result<Response<pb::ReadHighestSequenceNrResponse>, Status> {
        let request = request.into_inner();
        let pid = PersistenceId::parse("persistence_id", request.persistence_id)
            .map_err(invalid_argument)?;
        tracing::Span::current().record("pid", pid.as_str());
        // The hint is validated but not needed: the highest is found through an index.
        non_negative("from_sequence_nr", request.from_sequence_nr).map_err(invalid_argument)?;
        let highest_sequence_nr = self
            .journal
            .highest_sequence_nr(&pid)
            .await
            .map_err(|error| storage_status("ReadHighestSequenceNr", error))?;
        Ok(Response::new(pb::ReadHighestSequenceNrResponse {
            highest_sequence_nr,
        }))
    }

    type ReplayEventsStream = ReceiverStream<Result<pb::ReplayEventsResponse, Status>>;

    #[tracing::instrument(name = "ReplayEvents", skip_all, fields(pid))]
    async fn replay_events(
        &self,
        request: Request<pb::ReplayEventsRequest>,
    ) -> Result<Response<Self::ReplayEventsStream>, Status> {
        let range = ReplayRange::try_from(request.into_inner()).map_err(invalid_argument)?;
        tracing::Span::current().record("pid", range.persistence_id.as_str());
        let replay = self
            .journal
            .replay(range)
            .await
            .map_err(|error| storage_status("ReplayEvents", error))?;
        let (sender, receiver) = mpsc::channel(STREAM_BUFFER);
        let producer = async move {
            let mut events = replay.events;
            while let Some(event) = events.next().await {
                let message = match event {
                    Ok(event) => {
                        metrics::count_read("replay", &event);
                        Ok(pb::ReplayEventsResponse {
                            item: Some(Item::Event(event.into())),
                        })
                    }
                    Err(error) => Err(storage_status("ReplayEvents", error)),
                };
                let failed = message.is_err();
                // A failed send means the client went away: stop reading and free the cursor.
                if sender.send(message).await.is_err() || failed {
                    return;
                }
            }
            let last = Item::HighestSequenceNr(replay.highest_sequence_nr);
            let _ = sender
                .send(Ok(pb::ReplayEventsResponse { item: Some(last) }))
                .await;
        };
        tokio::spawn(producer.in_current_span());
        Ok(Response::new(ReceiverStream::new(receiver)))
    }
}
