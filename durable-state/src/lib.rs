//! Durable-state store over MongoDB, with Akka's `DurableStateUpdateStore` semantics: one
//! object per persistence id, changed only at exactly the stored revision + 1.
//!
//! One document per object:
//!
//! ```text
//! { _id: pid,
//!   revision: int64,
//!   payload: { data, serializerId, manifest },   absent once deleted
//!   tag: string,                                 absent when upserted without a tag
//!   timestamp: int64,                            ms since the epoch of the last change
//!   writtenAt: Date,                             when the server wrote the change (change-query order)
//!   deletedAt: Date }                            only on deleted objects, for TTL purging
//! ```
//!
//! A change is one conditional update, `{_id: pid, revision: r - 1}`, so among writers racing
//! at the same revision exactly one matches; an upsert at revision 1 inserts, and the unique
//! `_id` lets only one insert win. A change that matches nothing was either beaten by another
//! writer (a stale revision) or applied already by an earlier attempt of the same change whose
//! reply was lost: the stored object tells which, by content, as the journal does.

use config::Settings;
use model::{DeleteObject, Payload, PersistenceId, Revision, StoredObject, UpsertObject};
use mongo::{
    FailureKind, MongoError, PayloadDocument, Retry, StorageError, commit_quorum,
    encode_within_limit, is_duplicate_key,
};
use mongodb::bson::{DateTime, Document, doc, to_bson};
use mongodb::options::{
    CollectionOptions, CommitQuorum, IndexOptions, ReadConcern, ReadPreference, SelectionCriteria,
};
use mongodb::{Collection, Database, IndexModel};
use serde::Deserialize;

pub const REVISION: &str = "revision";
pub const PAYLOAD: &str = "payload";
pub const TAG: &str = "tag";
pub const TIMESTAMP: &str = "timestamp";
pub const WRITTEN_AT: &str = "writtenAt";
pub const DELETED_AT: &str = "deletedAt";

#[derive(Debug, thiserror::Error)]
pub enum DurableStateError {
    #[error(transparent)]
    Mongo(#[from] MongoError),
    #[error(
        "revision {requested} of persistence id {:?} does not follow the stored revision \
         {stored}: use revision {}",
        persistence_id.as_str(),
        stored.get() + 1
    )]
    StaleRevision {
        persistence_id: PersistenceId,
        requested: Revision,
        stored: Revision,
    },
    #[error("{0}")]
    TooLarge(String),
    #[error("corrupt durable-state data: {0}")]
    Corrupt(String),
}

impl StorageError for DurableStateError {
    fn kind(&self) -> FailureKind {
        match self {
            Self::Mongo(error) => error.kind(),
            Self::StaleRevision { .. } => FailureKind::Conflict,
            Self::TooLarge(_) => FailureKind::InvalidArgument,
            Self::Corrupt(_) => FailureKind::Internal,
        }
    }
}

#[derive(Debug, Deserialize)]
struct ObjectDocument {
    revision: i64,
    #[serde(default)]
    payload: Option<PayloadDocument>,
    #[serde(default)]
    tag: Option<String>,
    #[serde(rename = "deletedAt", default)]
    deleted_at: Option<DateTime>,
    #[serde(rename = "writtenAt", default)]
    written_at: Option<DateTime>,
}

/// What a stored object looks like once a change has been applied: how a change retried after
/// its reply was lost recognises itself.
enum Applied<'a> {
    Upsert {
        value: &'a Payload,
        tag: Option<&'a str>,
    },
    Delete,
}

impl Applied<'_> {
    fn matches(&self, stored: &ObjectDocument) -> bool {
        match self {
            Self::Upsert { value, tag } => {
                stored.deleted_at.is_none()
                    && stored.tag.as_deref() == *tag
                    && stored.payload.as_ref().is_some_and(|payload| {
                        payload.data.bytes == value.data
                            && payload.serializer_id == value.serializer_id
                            && payload.manifest == value.manifest
                    })
            }
            Self::Delete => stored.deleted_at.is_some() && stored.payload.is_none(),
        }
    }
}

/// The indexes the durable-state store needs: changes by tag, in change-query order, and all
/// changes in that order (the shared tail that feeds live change queries).
pub fn index_models() -> Vec<IndexModel> {
    let named = |name: &str| IndexOptions::builder().name(name.to_owned()).build();
    vec![
        IndexModel::builder()
            .keys(doc! { TAG: 1, WRITTEN_AT: 1, "_id": 1 })
            .options(named("tag_writtenAt"))
            .build(),
        IndexModel::builder()
            .keys(doc! { WRITTEN_AT: 1, "_id": 1 })
            .options(named("writtenAt_id"))
            .build(),
    ]
}

#[derive(Clone)]
pub struct DurableStateStore {
    objects: Collection<ObjectDocument>,
    /// Read with `local` concern from the primary, to find out why a conditional write did not
    /// match (the change that beat it may not be majority-committed yet).
    objects_on_primary: Collection<ObjectDocument>,
    retry: Retry,
    bypass_document_validation: bool,
    commit_quorum: CommitQuorum,
    /// Stamps `writtenAt` (change-query order) and holds it in flight until acknowledged.
    watermarks: mongo::Watermarks,
}

/// How often a change acknowledged late is moved forward at most.
const MAX_RESTAMPS: usize = 3;

impl DurableStateStore {
    /// `watermarks` stamps every change this server writes (see [`mongo::watermark`]).
    pub fn new(database: &Database, settings: &Settings, watermarks: mongo::Watermarks) -> Self {
        let name = &settings.mongodb.collections.durable_state;
        let primary_local = CollectionOptions::builder()
            .read_concern(ReadConcern::local())
            .selection_criteria(SelectionCriteria::ReadPreference(ReadPreference::Primary))
            .build();
        Self {
            objects: database.collection(name),
            objects_on_primary: database.collection_with_options(name, primary_local),
            retry: Retry::new(&settings.mongodb.retry),
            bypass_document_validation: settings.mongodb.bypass_document_validation,
            commit_quorum: commit_quorum(&settings.mongodb.index_commit_quorum),
            watermarks,
        }
    }

    /// Creates missing indexes: changes by tag, in change-query order.
    pub async fn create_indexes(&self) -> Result<(), DurableStateError> {
        let operation = "create durable-state indexes";
        self.retry
            .run(operation, || {
                self.objects
                    .create_indexes(index_models())
                    .commit_quorum(self.commit_quorum.clone())
            })
            .await
            .map_err(|error| self.retry.failure(operation, false, error))?;
        Ok(())
    }

    /// The object's value (none if missing or deleted) and revision (0 if missing).
    pub async fn get(
        &self,
        persistence_id: &PersistenceId,
    ) -> Result<StoredObject, DurableStateError> {
        let operation = "get object";
        let found = self
            .retry
            .run(operation, || {
                self.objects
                    .find_one(doc! { "_id": persistence_id.as_str() })
            })
            .await
            .map_err(|error| self.retry.failure(operation, false, error))?;
        Ok(match found {
            None => StoredObject {
                value: None,
                revision: Revision::ZERO,
            },
            Some(document) => StoredObject {
                revision: revision(persistence_id, document.revision)?,
                value: match document.deleted_at {
                    Some(_) => None,
                    None => document.payload.map(Payload::from),
                },
            },
        })
    }

    /// Stores the value at `revision`, which must be the stored revision + 1. Run it where it
    /// is not cancelled (the gRPC service spawns it): dropped midway, it releases the change's
    /// position stamp while MongoDB may still apply the change. The same holds for `delete`.
    pub async fn upsert(&self, command: UpsertObject) -> Result<(), DurableStateError> {
        let payload = PayloadDocument::from(&command.value);
        let what = format!(
            "the value of persistence id {:?}",
            command.persistence_id.as_str()
        );
        encode_within_limit(&payload, command.value.data.len())
            .map_err(|error| DurableStateError::TooLarge(error.describe(&what)))?;
        let payload = to_bson(&payload).map_err(|error| {
            DurableStateError::TooLarge(format!("{what} cannot be stored: {error}"))
        })?;
        let mut set = doc! { PAYLOAD: payload };
        let mut unset = doc! { DELETED_AT: "" };
        match &command.tag {
            Some(tag) => set.insert(TAG, tag.as_str()),
            None => unset.insert(TAG, ""),
        };
        let applied = Applied::Upsert {
            value: &command.value,
            tag: command.tag.as_ref().map(|tag| tag.as_str()),
        };
        self.change(
            "upsert object",
            &command.persistence_id,
            command.revision,
            set,
            unset,
            applied,
        )
        .await
    }

    /// Revision 0 removes the object completely. Otherwise it must be the stored revision + 1:
    /// the value goes, the revision (and tag) stay, and `deletedAt` marks it for purging.
    pub async fn delete(&self, command: DeleteObject) -> Result<(), DurableStateError> {
        if command.revision == Revision::ZERO {
            let operation = "delete object";
            let filter = doc! { "_id": command.persistence_id.as_str() };
            self.retry
                .run(operation, || self.objects.delete_one(filter.clone()))
                .await
                .map_err(|error| self.retry.failure(operation, true, error))?;
            return Ok(());
        }
        let set = doc! { DELETED_AT: DateTime::now() };
        let unset = doc! { PAYLOAD: "" };
        self.change(
            "delete object",
            &command.persistence_id,
            command.revision,
            set,
            unset,
            Applied::Delete,
        )
        .await
    }

    /// Applies one change at `revision` (1 or more) if the stored revision is `revision - 1`.
    async fn change(
        &self,
        operation: &'static str,
        persistence_id: &PersistenceId,
        revision: Revision,
        mut set: Document,
        unset: Document,
        applied: Applied<'_>,
    ) -> Result<(), DurableStateError> {
        let Some(previous) = revision.previous() else {
            return Err(DurableStateError::StaleRevision {
                persistence_id: persistence_id.clone(),
                requested: revision,
                stored: Revision::ZERO,
            });
        };
        let stamp = self.watermarks.stamp();
        let now = stamp.date_time();
        set.insert(REVISION, revision.get());
        set.insert(TIMESTAMP, now.timestamp_millis());
        set.insert(WRITTEN_AT, now);
        let update = doc! { "$set": set, "$unset": unset };
        // A missing object has revision 0: the upsert creates it, and only one creator wins the
        // unique `_id`.
        let filter = doc! { "_id": persistence_id.as_str(), REVISION: previous.get() };
        let result = self
            .retry
            .run(operation, || {
                self.objects
                    .update_one(filter.clone(), update.clone())
                    .upsert(previous == Revision::ZERO)
                    .bypass_document_validation(self.bypass_document_validation)
            })
            .await;
        match result {
            Ok(outcome) if outcome.matched_count == 1 || outcome.upserted_id.is_some() => {
                self.restamp_if_late(stamp, persistence_id, revision).await
            }
            Ok(_) => {
                self.stale_or_applied(persistence_id, revision, &applied)
                    .await
            }
            Err(error) if is_duplicate_key(&error) => {
                self.stale_or_applied(persistence_id, revision, &applied)
                    .await
            }
            Err(error) => {
                // It may still be applied: keep holding the horizon below it for a while.
                stamp.release_after_lease();
                Err(self.retry.failure(operation, true, error).into())
            }
        }
    }

    /// A change acknowledged late (this server's watermark lease may have lapsed meanwhile, or
    /// half the drift passed in fixed-drift mode) may have been passed over by change queries:
    /// it moves forward in change-query order, as late journal writes do.
    async fn restamp_if_late(
        &self,
        stamp: mongo::InFlight,
        persistence_id: &PersistenceId,
        revision: Revision,
    ) -> Result<(), DurableStateError> {
        if !self.watermarks.acknowledged(&stamp).is_late(stamp.millis()) {
            return Ok(());
        }
        self.move_forward(stamp.date_time(), persistence_id, revision)
            .await
    }

    /// Moves the change stored at `revision` and position `stored_at` to a fresh stamp, again
    /// while MongoDB acknowledges the move late (at most `MAX_RESTAMPS` times).
    async fn move_forward(
        &self,
        mut stored_at: DateTime,
        persistence_id: &PersistenceId,
        revision: Revision,
    ) -> Result<(), DurableStateError> {
        let operation = "re-stamp a late change";
        let began = std::time::Instant::now();
        for _ in 0..MAX_RESTAMPS {
            let later = self.watermarks.fresh_stamp(operation).await?;
            tracing::warn!(
                pid = persistence_id.as_str(),
                moved_by_ms = later.millis() - stored_at.timestamp_millis(),
                "change acknowledged late, or found stored by a retry at a position change \
                 queries may have passed; moving it forward in change-query order"
            );
            let filter = doc! {
                "_id": persistence_id.as_str(),
                REVISION: revision.get(),
                WRITTEN_AT: stored_at,
            };
            let update = doc! { "$set": { WRITTEN_AT: later.date_time() } };
            let result = self
                .retry
                .run(operation, || {
                    self.objects
                        .update_one(filter.clone(), update.clone())
                        .bypass_document_validation(self.bypass_document_validation)
                })
                .await;
            if let Err(error) = result {
                later.release_after_lease();
                return Err(self.retry.failure(operation, true, error).into());
            }
            if !self.watermarks.acknowledged(&later).is_late(later.millis()) {
                return Ok(());
            }
            stored_at = later.date_time();
        }
        self.watermarks.restamps_exhausted(operation, began)?;
        tracing::error!(
            pid = persistence_id.as_str(),
            "MongoDB stayed slow; live change queries may pass over this change"
        );
        Ok(())
    }

    /// The conditional write did not match: either this very change is stored already (an
    /// earlier attempt, by this call's retries or by a client retrying after `UNAVAILABLE`, was
    /// applied and its reply lost), or the revision is stale. Like the journal, it compares
    /// content: the stored object at the requested revision with this change's value and tag.
    /// A stored change whose position is older than the horizon waits for (the attempt that
    /// stored it gave up on it) moves forward, as the journal's identical retries do.
    async fn stale_or_applied(
        &self,
        persistence_id: &PersistenceId,
        requested: Revision,
        applied: &Applied<'_>,
    ) -> Result<(), DurableStateError> {
        let operation = "read stored revision";
        let stored = self
            .retry
            .run(operation, || {
                self.objects_on_primary
                    .find_one(doc! { "_id": persistence_id.as_str() })
            })
            .await
            .map_err(|error| self.retry.failure(operation, false, error))?;
        let (stored_revision, applied, stored_at) = match stored {
            None => (Revision::ZERO, false, None),
            Some(document) => {
                let applied = document.revision == requested.get() && applied.matches(&document);
                (
                    revision(persistence_id, document.revision)?,
                    applied,
                    document.written_at,
                )
            }
        };
        if applied {
            return match stored_at.filter(|at| self.watermarks.stored_late(at.timestamp_millis())) {
                Some(at) => self.move_forward(at, persistence_id, requested).await,
                None => Ok(()),
            };
        }
        Err(DurableStateError::StaleRevision {
            persistence_id: persistence_id.clone(),
            requested,
            stored: stored_revision,
        })
    }
}

fn revision(persistence_id: &PersistenceId, value: i64) -> Result<Revision, DurableStateError> {
    Revision::parse(REVISION, value).map_err(|error| {
        DurableStateError::Corrupt(format!("object {:?}: {error}", persistence_id.as_str()))
    })
}
