//! `eventjournal.v1.ReadJournal`: validates requests, spawns one producer per call
//! ([`query::ReadJournal`]) writing into a bounded channel, and converts what it sends.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use model::{NUMBER_OF_SLICES, PersistenceId, Tag, ValidationError, non_negative};
use proto::v1 as pb;
use query::ReadJournal;
use query::feed::{EventSelector, StateChange};
use query::live::Sink;
use query::offset::Offset;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::grpc::STREAM_BUFFER;
use crate::metrics::server as metrics;
use crate::status::{invalid_argument, storage_status};

type ServerStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

pub(crate) struct ReadJournalService {
    queries: Arc<ReadJournal>,
}

impl ReadJournalService {
    pub(crate) fn new(queries: Arc<ReadJournal>) -> Self {
        Self { queries }
    }
}

/// Runs `produce` as the call's producer task and streams what it sends, converted.
fn stream<T, U, P, Fut>(
    rpc: &'static str,
    produce: P,
    convert: fn(Offset, T) -> U,
) -> ServerStream<U>
where
    T: Send + 'static,
    U: Send + 'static,
    P: FnOnce(Sink<T>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (sender, receiver) = mpsc::channel(STREAM_BUFFER);
    tokio::spawn(produce(sender).in_current_span());
    // Live queries are counted while their stream is open (dropped when the client leaves).
    let subscriber = (!rpc.starts_with("Current")).then(|| metrics::Subscriber::open(rpc));
    Box::pin(ReceiverStream::new(receiver).map(move |item| {
        let _open = &subscriber;
        match item {
            Ok(delivered) => {
                let (offset, item) = *delivered;
                Ok(convert(offset, item))
            }
            Err(error) => Err(storage_status(rpc, error)),
        }
    }))
}

fn envelope(offset: Offset, event: model::PersistentEvent) -> pb::EventEnvelope {
    metrics::count_read("query", &event);
    pb::EventEnvelope {
        offset: offset.token(),
        event: Some(event.into()),
    }
}

fn change(offset: Offset, change: StateChange) -> pb::DurableStateChange {
    pb::DurableStateChange {
        offset: offset.token(),
        persistence_id: change.persistence_id.into_string(),
        revision: change.revision,
        value: change.value.map(pb::Payload::from),
        timestamp_millis: change.timestamp_millis,
    }
}

fn entry(_: Offset, persistence_id: String) -> pb::PersistenceIdEntry {
    pb::PersistenceIdEntry { persistence_id }
}

fn tag_request(
    request: pb::EventsByTagRequest,
) -> Result<(EventSelector, Option<Offset>), ValidationError> {
    let tag = Tag::parse("tag", request.tag)?;
    let start = Offset::parse("offset", &request.offset)?;
    Ok((EventSelector::Tag(tag.into_string()), start))
}

fn slices_request(
    request: pb::EventsBySlicesRequest,
) -> Result<(EventSelector, Option<Offset>), ValidationError> {
    let range = 0..NUMBER_OF_SLICES;
    for (field, value) in [
        ("min_slice", request.min_slice),
        ("max_slice", request.max_slice),
    ] {
        if !range.contains(&value) {
            return Err(ValidationError::new(
                field,
                format!("must be 0 to {}, got {value}", NUMBER_OF_SLICES - 1),
            ));
        }
    }
    if request.min_slice > request.max_slice {
        return Err(ValidationError::new(
            "max_slice",
            format!(
                "must not be below min_slice ({}), got {}",
                request.min_slice, request.max_slice
            ),
        ));
    }
    let start = Offset::parse("offset", &request.offset)?;
    Ok((
        EventSelector::Slices {
            min: request.min_slice,
            max: request.max_slice,
        },
        start,
    ))
}

fn pid_request(
    request: pb::EventsByPersistenceIdRequest,
) -> Result<(String, i64, i64), ValidationError> {
    let pid = PersistenceId::parse("persistence_id", request.persistence_id)?;
    let from = non_negative("from_sequence_nr", request.from_sequence_nr)?;
    let to = non_negative("to_sequence_nr", request.to_sequence_nr.unwrap_or(i64::MAX))?;
    Ok((pid.into_string(), from, to))
}

fn state_request(
    request: pb::DurableStateChangesRequest,
) -> Result<(String, Option<Offset>), ValidationError> {
    let tag = Tag::parse("tag", request.tag)?;
    let start = Offset::parse("offset", &request.offset)?;
    Ok((tag.into_string(), start))
}

#[tonic::async_trait]
impl pb::read_journal_server::ReadJournal for ReadJournalService {
    type EventsByTagStream = ServerStream<pb::EventEnvelope>;
    type CurrentEventsByTagStream = ServerStream<pb::EventEnvelope>;
    type EventsByPersistenceIdStream = ServerStream<pb::EventEnvelope>;
    type CurrentEventsByPersistenceIdStream = ServerStream<pb::EventEnvelope>;
    type EventsBySlicesStream = ServerStream<pb::EventEnvelope>;
    type CurrentEventsBySlicesStream = ServerStream<pb::EventEnvelope>;
    type PersistenceIdsStream = ServerStream<pb::PersistenceIdEntry>;
    type CurrentPersistenceIdsStream = ServerStream<pb::PersistenceIdEntry>;
    type DurableStateChangesStream = ServerStream<pb::DurableStateChange>;
    type CurrentDurableStateChangesStream = ServerStream<pb::DurableStateChange>;

    #[tracing::instrument(name = "EventsByTag", skip_all, fields(tag = %request.get_ref().tag))]
    async fn events_by_tag(
        &self,
        request: Request<pb::EventsByTagRequest>,
    ) -> Result<Response<Self::EventsByTagStream>, Status> {
        let (selector, start) = tag_request(request.into_inner()).map_err(invalid_argument)?;
        let queries = self.queries.clone();
        let produce = move |sink| async move { queries.events(selector, start, true, sink).await };
        Ok(Response::new(stream("EventsByTag", produce, envelope)))
    }

    #[tracing::instrument(name = "CurrentEventsByTag", skip_all, fields(tag = %request.get_ref().tag))]
    async fn current_events_by_tag(
        &self,
        request: Request<pb::EventsByTagRequest>,
    ) -> Result<Response<Self::CurrentEventsByTagStream>, Status> {
        let (selector, start) = tag_request(request.into_inner()).map_err(invalid_argument)?;
        let queries = self.queries.clone();
        let produce = move |sink| async move { queries.events(selector, start, false, sink).await };
        Ok(Response::new(stream(
            "CurrentEventsByTag",
            produce,
            envelope,
        )))
    }

    #[tracing::instrument(name = "EventsByPersistenceId", skip_all, fields(pid = %request.get_ref().persistence_id))]
    async fn events_by_persistence_id(
        &self,
        request: Request<pb::EventsByPersistenceIdRequest>,
    ) -> Result<Response<Self::EventsByPersistenceIdStream>, Status> {
        let (pid, from, to) = pid_request(request.into_inner()).map_err(invalid_argument)?;
        let queries = self.queries.clone();
        let produce = move |sink| async move {
            queries
                .events_by_persistence_id(pid, from, to, true, sink)
                .await
        };
        Ok(Response::new(stream(
            "EventsByPersistenceId",
            produce,
            envelope,
        )))
    }

    #[tracing::instrument(name = "CurrentEventsByPersistenceId", skip_all, fields(pid = %request.get_ref().persistence_id))]
    async fn current_events_by_persistence_id(
        &self,
        request: Request<pb::EventsByPersistenceIdRequest>,
    ) -> Result<Response<Self::CurrentEventsByPersistenceIdStream>, Status> {
        let (pid, from, to) = pid_request(request.into_inner()).map_err(invalid_argument)?;
        let queries = self.queries.clone();
        let produce = move |sink| async move {
            queries
                .events_by_persistence_id(pid, from, to, false, sink)
                .await
        };
        Ok(Response::new(stream(
            "CurrentEventsByPersistenceId",
            produce,
            envelope,
        )))
    }

    #[tracing::instrument(name = "EventsBySlices", skip_all)]
    async fn events_by_slices(
        &self,
        request: Request<pb::EventsBySlicesRequest>,
    ) -> Result<Response<Self::EventsBySlicesStream>, Status> {
        let (selector, start) = slices_request(request.into_inner()).map_err(invalid_argument)?;
        let queries = self.queries.clone();
        let produce = move |sink| async move { queries.events(selector, start, true, sink).await };
        Ok(Response::new(stream("EventsBySlices", produce, envelope)))
    }

    #[tracing::instrument(name = "CurrentEventsBySlices", skip_all)]
    async fn current_events_by_slices(
        &self,
        request: Request<pb::EventsBySlicesRequest>,
    ) -> Result<Response<Self::CurrentEventsBySlicesStream>, Status> {
        let (selector, start) = slices_request(request.into_inner()).map_err(invalid_argument)?;
        let queries = self.queries.clone();
        let produce = move |sink| async move { queries.events(selector, start, false, sink).await };
        Ok(Response::new(stream(
            "CurrentEventsBySlices",
            produce,
            envelope,
        )))
    }

    #[tracing::instrument(name = "PersistenceIds", skip_all)]
    async fn persistence_ids(
        &self,
        _request: Request<pb::PersistenceIdsRequest>,
    ) -> Result<Response<Self::PersistenceIdsStream>, Status> {
        let queries = self.queries.clone();
        let produce = move |sink| async move { queries.persistence_ids(sink).await };
        Ok(Response::new(stream("PersistenceIds", produce, entry)))
    }

    #[tracing::instrument(name = "CurrentPersistenceIds", skip_all)]
    async fn current_persistence_ids(
        &self,
        request: Request<pb::CurrentPersistenceIdsRequest>,
    ) -> Result<Response<Self::CurrentPersistenceIdsStream>, Status> {
        let request = request.into_inner();
        let limit = non_negative("limit", request.limit.unwrap_or(i64::MAX))
            .map_err(invalid_argument)? as u64;
        let queries = self.queries.clone();
        let after_id = request.after_id;
        let produce =
            move |sink| async move { queries.current_persistence_ids(after_id, limit, sink).await };
        Ok(Response::new(stream(
            "CurrentPersistenceIds",
            produce,
            entry,
        )))
    }

    #[tracing::instrument(name = "DurableStateChanges", skip_all, fields(tag = %request.get_ref().tag))]
    async fn durable_state_changes(
        &self,
        request: Request<pb::DurableStateChangesRequest>,
    ) -> Result<Response<Self::DurableStateChangesStream>, Status> {
        let (tag, start) = state_request(request.into_inner()).map_err(invalid_argument)?;
        let queries = self.queries.clone();
        let produce =
            move |sink| async move { queries.state_changes(tag, start, true, sink).await };
        Ok(Response::new(stream(
            "DurableStateChanges",
            produce,
            change,
        )))
    }

    #[tracing::instrument(name = "CurrentDurableStateChanges", skip_all, fields(tag = %request.get_ref().tag))]
    async fn current_durable_state_changes(
        &self,
        request: Request<pb::DurableStateChangesRequest>,
    ) -> Result<Response<Self::CurrentDurableStateChangesStream>, Status> {
        let (tag, start) = state_request(request.into_inner()).map_err(invalid_argument)?;
        let queries = self.queries.clone();
        let produce =
            move |sink| async move { queries.state_changes(tag, start, false, sink).await };
        Ok(Response::new(stream(
            "CurrentDurableStateChanges",
            produce,
            change,
        )))
    }
}
