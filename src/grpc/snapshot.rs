//! `eventjournal.v1.SnapshotStore`: converts requests to domain types, calls
//! [`snapshot::SnapshotStore`], maps results back.

use model::{Snapshot, SnapshotMetadata, SnapshotQuery};
use proto::v1 as pb;
use snapshot::SnapshotStore;
use tonic::{Request, Response, Status};

use crate::status::{invalid_argument, storage_status};

pub(crate) struct SnapshotStoreService {
    store: SnapshotStore,
}

impl SnapshotStoreService {
    pub(crate) fn new(store: SnapshotStore) -> Self {
        Self { store }
    }
}

#[tonic::async_trait]
impl pb::snapshot_store_server::SnapshotStore for SnapshotStoreService {
    #[tracing::instrument(name = "SaveSnapshot", skip_all, fields(pid))]
    async fn save_snapshot(
        &self,
        request: Request<pb::SaveSnapshotRequest>,
    ) -> Result<Response<pb::SaveSnapshotResponse>, Status> {
        let snapshot = Snapshot::try_from(request.into_inner()).map_err(invalid_argument)?;
        tracing::Span::current().record("pid", snapshot.metadata.persistence_id.as_str());
        let stored = self
            .store
            .save(snapshot)
            .await
            .map_err(|error| storage_status("SaveSnapshot", error))?;
        Ok(Response::new(pb::SaveSnapshotResponse {
            metadata: Some(stored.into()),
        }))
    }

    #[tracing::instrument(name = "LoadSnapshot", skip_all, fields(pid))]
    async fn load_snapshot(
        &self,
        request: Request<pb::LoadSnapshotRequest>,
    ) -> Result<Response<pb::LoadSnapshotResponse>, Status> {
        let query = SnapshotQuery::try_from(request.into_inner()).map_err(invalid_argument)?;
        tracing::Span::current().record("pid", query.persistence_id.as_str());
        let found = self
            .store
            .load(&query)
            .await
            .map_err(|error| storage_status("LoadSnapshot", error))?;
        Ok(Response::new(pb::LoadSnapshotResponse {
            snapshot: found.map(pb::SelectedSnapshot::from),
        }))
    }

    #[tracing::instrument(name = "DeleteSnapshot", skip_all, fields(pid))]
    async fn delete_snapshot(
        &self,
        request: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        let metadata =
            SnapshotMetadata::try_from(request.into_inner()).map_err(invalid_argument)?;
        tracing::Span::current().record("pid", metadata.persistence_id.as_str());
        self.store
            .delete(&metadata)
            .await
            .map_err(|error| storage_status("DeleteSnapshot", error))?;
        Ok(Response::new(pb::DeleteSnapshotResponse {}))
    }

    #[tracing::instrument(name = "DeleteSnapshots", skip_all, fields(pid))]
    async fn delete_snapshots(
        &self,
        request: Request<pb::DeleteSnapshotsRequest>,
    ) -> Result<Response<pb::DeleteSnapshotsResponse>, Status> {
        let query = SnapshotQuery::try_from(request.into_inner()).map_err(invalid_argument)?;
        tracing::Span::current().record("pid", query.persistence_id.as_str());
        self.store
            .delete_matching(&query)
            .await
            .map_err(|error| storage_status("DeleteSnapshots", error))?;
        Ok(Response::new(pb::DeleteSnapshotsResponse {}))
    }
}
