//! `eventjournal.v1.Journal`: converts requests to domain types, calls [`journal::Journal`],
//! maps results back.

use journal::{Journal, WriteOutcome};
use model::{AtomicWrite, PersistenceId, ReplayRange, non_negative};
use proto::v1 as pb;
use proto::v1::atomic_write_result::Outcome;
use proto::v1::replay_events_response::Item;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::grpc::STREAM_BUFFER;
use crate::metrics::server as metrics;
use crate::status::{invalid_argument, storage_status};

pub(crate) struct JournalService {
    journal: Journal,
}

impl JournalService {
    pub(crate) fn new(journal: Journal) -> Self {
        Self { journal }
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

#[tonic::async_trait]
impl pb::journal_server::Journal for JournalService {
    #[tracing::instrument(name = "WriteEvents", skip_all, fields(writes))]
    async fn write_events(
        &self,
        request: Request<pb::WriteEventsRequest>,
    ) -> Result<Response<pb::WriteEventsResponse>, Status> {
        let received = std::time::Instant::now();
        let writes = request.into_inner().writes;
        tracing::Span::current().record("writes", writes.len());
        // Invalid writes are rejected on their own; the valid ones go to the journal together.
        let mut results: Vec<Option<pb::AtomicWriteResult>> = Vec::with_capacity(writes.len());
        let mut valid = Vec::with_capacity(writes.len());
        for (index, write) in writes.into_iter().enumerate() {
            match AtomicWrite::try_from(write) {
                Ok(write) => {
                    results.push(None);
                    valid.push((index, write));
                }
                Err(error) => {
                    results.push(Some(outcome(WriteOutcome::Rejected(error.to_string()))));
                }
            }
        }
        let (indexes, valid): (Vec<usize>, Vec<AtomicWrite>) = valid.into_iter().unzip();
        let sizes: Vec<(u64, u64)> = valid
            .iter()
            .map(|write| {
                let events = write.events();
                (
                    events.len() as u64,
                    events.iter().map(metrics::event_bytes).sum(),
                )
            })
            .collect();
        let outcomes = self
            .journal
            .write_batch(valid)
            .await
            .map_err(|error| storage_status("WriteEvents", error))?;
        let acknowledged = received.elapsed().as_nanos() as f64;
        for ((index, written), (events, bytes)) in indexes.into_iter().zip(outcomes).zip(sizes) {
            if matches!(written, WriteOutcome::Written) {
                metrics::EVENTS_WRITTEN.inc_by(events);
                metrics::EVENT_BYTES_WRITTEN.inc_by(bytes);
                metrics::PERSISTENCE_TIME.observe(acknowledged);
            }
            results[index] = Some(outcome(written));
        }
        Ok(Response::new(pb::WriteEventsResponse {
            results: results.into_iter().flatten().collect(),
        }))
    }

    type WriteEventsStreamStream = ReceiverStream<Result<pb::WriteEventsResponse, Status>>;

    async fn write_events_stream(
        &self,
        _request: Request<tonic::Streaming<pb::WriteEventsRequest>>,
    ) -> Result<Response<Self::WriteEventsStreamStream>, Status> {
        Err(Status::unimplemented("WriteEventsStream is being built"))
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
