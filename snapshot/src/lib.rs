//! Snapshot store over MongoDB, with Akka Persistence's `SnapshotStore` semantics: save
//! (replacing a snapshot at the same sequence number), load the youngest snapshot matching
//! selection criteria, delete one or all matching.
//!
//! One document per snapshot, unique on `(pid, seqNr)`:
//!
//! ```text
//! { _id: ObjectId, pid: string, seqNr: int64, timestamp: int64 (ms),
//!   payload: { data, serializerId, manifest },
//!   metadata: { data, serializerId, manifest },   only when the snapshot has metadata
//!   insertedAt: Date }                             time of the save, for TTL purging
//! ```

use config::Settings;
use model::{Payload, PersistenceId, Snapshot, SnapshotMetadata, SnapshotQuery};
use mongo::{
    FailureKind, MongoError, PayloadDocument, Retry, StorageError, commit_quorum,
    encode_within_limit,
};
use mongodb::bson::{DateTime, Document, doc};
use mongodb::options::{CommitQuorum, IndexOptions};
use mongodb::{Collection, Database, IndexModel};
use serde::{Deserialize, Serialize};

pub const PERSISTENCE_ID: &str = "pid";
pub const SEQUENCE_NR: &str = "seqNr";
pub const TIMESTAMP: &str = "timestamp";
pub const INSERTED_AT: &str = "insertedAt";

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Mongo(#[from] MongoError),
    #[error("{0}")]
    TooLarge(String),
    #[error("corrupt snapshot data: {0}")]
    Corrupt(String),
}

impl StorageError for SnapshotError {
    fn kind(&self) -> FailureKind {
        match self {
            Self::Mongo(error) => error.kind(),
            Self::TooLarge(_) => FailureKind::InvalidArgument,
            Self::Corrupt(_) => FailureKind::Internal,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SnapshotDocument {
    pid: String,
    #[serde(rename = "seqNr")]
    seq_nr: i64,
    timestamp: i64,
    payload: PayloadDocument,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    metadata: Option<PayloadDocument>,
    #[serde(rename = "insertedAt")]
    inserted_at: DateTime,
}

impl SnapshotDocument {
    fn into_snapshot(self) -> Result<Snapshot, SnapshotError> {
        let persistence_id = PersistenceId::parse(PERSISTENCE_ID, self.pid)
            .map_err(|error| SnapshotError::Corrupt(format!("snapshot document: {error}")))?;
        Ok(Snapshot {
            metadata: SnapshotMetadata {
                persistence_id,
                sequence_nr: self.seq_nr,
                timestamp_millis: self.timestamp,
                metadata: self.metadata.map(Payload::from),
            },
            payload: self.payload.into(),
        })
    }
}

/// The indexes the snapshot store needs: unique `(pid, seqNr)`, which also serves loads.
pub fn index_models() -> Vec<IndexModel> {
    let options = IndexOptions::builder()
        .name("pid_seqNr".to_owned())
        .unique(true)
        .build();
    vec![
        IndexModel::builder()
            .keys(doc! { PERSISTENCE_ID: 1, SEQUENCE_NR: 1 })
            .options(options)
            .build(),
    ]
}

#[derive(Clone)]
pub struct SnapshotStore {
    snapshots: Collection<SnapshotDocument>,
    retry: Retry,
    bypass_document_validation: bool,
    commit_quorum: CommitQuorum,
}

impl SnapshotStore {
    pub fn new(database: &Database, settings: &Settings) -> Self {
        Self {
            snapshots: database.collection(&settings.mongodb.collections.snapshots),
            retry: Retry::new(&settings.mongodb.retry),
            bypass_document_validation: settings.mongodb.bypass_document_validation,
            commit_quorum: commit_quorum(&settings.mongodb.index_commit_quorum),
        }
    }

    /// Creates missing indexes: unique `(pid, seqNr)`, which also serves loads (read backwards).
    pub async fn create_indexes(&self) -> Result<(), SnapshotError> {
        let operation = "create snapshot indexes";
        self.retry
            .run(operation, || {
                self.snapshots
                    .create_indexes(index_models())
                    .commit_quorum(self.commit_quorum.clone())
            })
            .await
            .map_err(|error| self.retry.failure(operation, false, error))?;
        Ok(())
    }

    /// Saves the snapshot, replacing one at the same sequence number; returns the metadata as
    /// stored (a timestamp of 0 is stamped now).
    pub async fn save(&self, mut snapshot: Snapshot) -> Result<SnapshotMetadata, SnapshotError> {
        if snapshot.metadata.timestamp_millis == 0 {
            snapshot.metadata.timestamp_millis = DateTime::now().timestamp_millis();
        }
        let metadata = &snapshot.metadata;
        let document = SnapshotDocument {
            pid: metadata.persistence_id.as_str().to_owned(),
            seq_nr: metadata.sequence_nr,
            timestamp: metadata.timestamp_millis,
            payload: PayloadDocument::from(&snapshot.payload),
            metadata: metadata.metadata.as_ref().map(PayloadDocument::from),
            inserted_at: DateTime::now(),
        };
        check_size(&document, metadata)?;
        let operation = "save snapshot";
        let filter = doc! { PERSISTENCE_ID: &document.pid, SEQUENCE_NR: document.seq_nr };
        self.retry
            .run(operation, || {
                self.snapshots
                    .replace_one(filter.clone(), &document)
                    .upsert(true)
                    .bypass_document_validation(self.bypass_document_validation)
            })
            .await
            .map_err(|error| self.retry.failure(operation, true, error))?;
        Ok(snapshot.metadata)
    }

    /// The youngest matching snapshot: highest sequence number (unique per persistence id).
    pub async fn load(&self, query: &SnapshotQuery) -> Result<Option<Snapshot>, SnapshotError> {
        let operation = "load snapshot";
        let found = self
            .retry
            .run(operation, || {
                self.snapshots
                    .find_one(filter(query))
                    .sort(doc! { SEQUENCE_NR: -1 })
            })
            .await
            .map_err(|error| self.retry.failure(operation, false, error))?;
        found.map(SnapshotDocument::into_snapshot).transpose()
    }

    /// Deletes the snapshot at (pid, sequence number); a timestamp other than 0 must match too.
    pub async fn delete(&self, metadata: &SnapshotMetadata) -> Result<(), SnapshotError> {
        let mut filter = doc! {
            PERSISTENCE_ID: metadata.persistence_id.as_str(),
            SEQUENCE_NR: metadata.sequence_nr,
        };
        if metadata.timestamp_millis != 0 {
            filter.insert(TIMESTAMP, metadata.timestamp_millis);
        }
        self.delete_many("delete snapshot", filter).await
    }

    /// Deletes every snapshot matching the query.
    pub async fn delete_matching(&self, query: &SnapshotQuery) -> Result<(), SnapshotError> {
        self.delete_many("delete snapshots", filter(query)).await
    }

    async fn delete_many(
        &self,
        operation: &'static str,
        filter: Document,
    ) -> Result<(), SnapshotError> {
        self.retry
            .run(operation, || self.snapshots.delete_many(filter.clone()))
            .await
            .map_err(|error| self.retry.failure(operation, true, error))?;
        Ok(())
    }
}

fn filter(query: &SnapshotQuery) -> Document {
    let criteria = &query.criteria;
    doc! {
        PERSISTENCE_ID: query.persistence_id.as_str(),
        SEQUENCE_NR: { "$gte": criteria.min_sequence_nr, "$lte": criteria.max_sequence_nr },
        TIMESTAMP: { "$gte": criteria.min_timestamp_millis, "$lte": criteria.max_timestamp_millis },
    }
}

fn check_size(
    document: &SnapshotDocument,
    metadata: &SnapshotMetadata,
) -> Result<(), SnapshotError> {
    let binary_bytes = document.payload.data.bytes.len()
        + document
            .metadata
            .as_ref()
            .map_or(0, |metadata| metadata.data.bytes.len());
    encode_within_limit(document, binary_bytes)
        .map(|_| ())
        .map_err(|error| {
            SnapshotError::TooLarge(error.describe(&format!(
                "the snapshot of persistence id {:?} at sequence number {}",
                metadata.persistence_id.as_str(),
                metadata.sequence_nr
            )))
        })
}
