//! `eventjournal.v1.DurableStateStore`: converts requests to domain types, calls
//! [`durable_state::DurableStateStore`], maps results back.

use durable_state::{DurableStateError, DurableStateStore};
use model::{DeleteObject, PersistenceId, UpsertObject};
use proto::v1 as pb;
use tonic::{Request, Response, Status};

use crate::status::{invalid_argument, storage_status};

pub(crate) struct DurableStateStoreService {
    store: DurableStateStore,
}

impl DurableStateStoreService {
    pub(crate) fn new(store: DurableStateStore) -> Self {
        Self { store }
    }
}

/// Runs a change on a task of its own: a cancelled call (a client's deadline, a reset) must not
/// drop the change's position stamp while MongoDB may still apply it.
async fn on_own_task(
    method: &'static str,
    change: impl Future<Output = Result<(), DurableStateError>> + Send + 'static,
) -> Result<(), Status> {
    tokio::spawn(change)
        .await
        .map_err(|_| Status::internal(format!("{method} failed; the server log has the details")))?
        .map_err(|error| storage_status(method, error))
}

#[tonic::async_trait]
impl pb::durable_state_store_server::DurableStateStore for DurableStateStoreService {
    #[tracing::instrument(name = "GetObject", skip_all, fields(pid))]
    async fn get_object(
        &self,
        request: Request<pb::GetObjectRequest>,
    ) -> Result<Response<pb::GetObjectResponse>, Status> {
        let pid = PersistenceId::parse("persistence_id", request.into_inner().persistence_id)
            .map_err(invalid_argument)?;
        tracing::Span::current().record("pid", pid.as_str());
        let object = self
            .store
            .get(&pid)
            .await
            .map_err(|error| storage_status("GetObject", error))?;
        Ok(Response::new(object.into()))
    }

    #[tracing::instrument(name = "UpsertObject", skip_all, fields(pid, revision))]
    async fn upsert_object(
        &self,
        request: Request<pb::UpsertObjectRequest>,
    ) -> Result<Response<pb::UpsertObjectResponse>, Status> {
        let command = UpsertObject::try_from(request.into_inner()).map_err(invalid_argument)?;
        let span = tracing::Span::current();
        span.record("pid", command.persistence_id.as_str());
        span.record("revision", command.revision.get());
        let store = self.store.clone();
        on_own_task("UpsertObject", async move { store.upsert(command).await }).await?;
        Ok(Response::new(pb::UpsertObjectResponse {}))
    }

    #[tracing::instrument(name = "DeleteObject", skip_all, fields(pid, revision))]
    async fn delete_object(
        &self,
        request: Request<pb::DeleteObjectRequest>,
    ) -> Result<Response<pb::DeleteObjectResponse>, Status> {
        let command = DeleteObject::try_from(request.into_inner()).map_err(invalid_argument)?;
        let span = tracing::Span::current();
        span.record("pid", command.persistence_id.as_str());
        span.record("revision", command.revision.get());
        let store = self.store.clone();
        on_own_task("DeleteObject", async move { store.delete(command).await }).await?;
        Ok(Response::new(pb::DeleteObjectResponse {}))
    }
}
