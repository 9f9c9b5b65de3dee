//! The service of the contract that is not built yet (the read journal): every call is `UNIMPLEMENTED`,
//! naming the RPC, so clients can already be generated and wired against the full contract.

use std::pin::Pin;

use proto::v1 as pb;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

type ServerStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn unimplemented<T>(rpc: &str) -> Result<T, Status> {
    Err(Status::unimplemented(format!(
        "{rpc} is not implemented yet"
    )))
}

pub(crate) struct ReadJournalService;

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

    async fn events_by_tag(
        &self,
        _: Request<pb::EventsByTagRequest>,
    ) -> Result<Response<Self::EventsByTagStream>, Status> {
        unimplemented("ReadJournal.EventsByTag")
    }
    async fn current_events_by_tag(
        &self,
        _: Request<pb::EventsByTagRequest>,
    ) -> Result<Response<Self::CurrentEventsByTagStream>, Status> {
        unimplemented("ReadJournal.CurrentEventsByTag")
    }
    async fn events_by_persistence_id(
        &self,
        _: Request<pb::EventsByPersistenceIdRequest>,
    ) -> Result<Response<Self::EventsByPersistenceIdStream>, Status> {
        unimplemented("ReadJournal.EventsByPersistenceId")
    }
    async fn current_events_by_persistence_id(
        &self,
        _: Request<pb::EventsByPersistenceIdRequest>,
    ) -> Result<Response<Self::CurrentEventsByPersistenceIdStream>, Status> {
        unimplemented("ReadJournal.CurrentEventsByPersistenceId")
    }
    async fn events_by_slices(
        &self,
        _: Request<pb::EventsBySlicesRequest>,
    ) -> Result<Response<Self::EventsBySlicesStream>, Status> {
        unimplemented("ReadJournal.EventsBySlices")
    }
    async fn current_events_by_slices(
        &self,
        _: Request<pb::EventsBySlicesRequest>,
    ) -> Result<Response<Self::CurrentEventsBySlicesStream>, Status> {
        unimplemented("ReadJournal.CurrentEventsBySlices")
    }
    async fn persistence_ids(
        &self,
        _: Request<pb::PersistenceIdsRequest>,
    ) -> Result<Response<Self::PersistenceIdsStream>, Status> {
        unimplemented("ReadJournal.PersistenceIds")
    }
    async fn current_persistence_ids(
        &self,
        _: Request<pb::CurrentPersistenceIdsRequest>,
    ) -> Result<Response<Self::CurrentPersistenceIdsStream>, Status> {
        unimplemented("ReadJournal.CurrentPersistenceIds")
    }
    async fn durable_state_changes(
        &self,
        _: Request<pb::DurableStateChangesRequest>,
    ) -> Result<Response<Self::DurableStateChangesStream>, Status> {
        unimplemented("ReadJournal.DurableStateChanges")
    }
    async fn current_durable_state_changes(
        &self,
        _: Request<pb::DurableStateChangesRequest>,
    ) -> Result<Response<Self::CurrentDurableStateChangesStream>, Status> {
        unimplemented("ReadJournal.CurrentDurableStateChanges")
    }
}
