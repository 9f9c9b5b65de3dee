//! Journal operations: the path of a write (`write_batch` → `write` → `insert_events`), of a
//! delete, of the highest sequence number, and of a replay.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use config::{DatabaseMode, Settings};
use futures::stream::{self, BoxStream, StreamExt, TryStreamExt};
use model::{AtomicWrite, PersistenceId, PersistentEvent, ReplayRange};
use mongo::{Retry, commit_quorum, encode_within_limit, is_duplicate_key};
use mongodb::bson::{DateTime, Document, RawDocumentBuf, doc};
use mongodb::options::{
    CollectionOptions, CommitQuorum, ReadConcern, ReadPreference, SelectionCriteria,
};
use mongodb::{Client, Collection, Database};

use crate::document::{
    DELETED_AT, EventDocument, HIGHEST_SEQUENCE_NR, PERSISTENCE_ID, SEQUENCE_NR, TTL, WRITTEN_AT,
};
use crate::error::JournalError;
use crate::indexes::journal_indexes;

/// How often one late write is moved forward at most (see `restamp_if_late`).
const MAX_RESTAMPS: usize = 3;

/// How many atomic writes of one request are in flight at once.
const WRITE_CONCURRENCY: usize = 8;

/// The result of one atomic write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Durable, or identical to what was already stored.
    Written,
    /// Invalid content; nothing stored.
    Rejected(String),
    /// The sequence numbers are taken by different events; nothing stored.
    Conflict(String),
}

/// A replay: the highest sequence number (read first, as Akka does) and the events.
pub struct Replay {
    pub highest_sequence_nr: i64,
    pub events: BoxStream<'static, Result<PersistentEvent, JournalError>>,
}

#[derive(Clone)]
pub struct Journal {
    client: Client,
    events: Collection<EventDocument>,
    /// The same collection read with `local` concern from the primary: what a duplicate key
    /// error collided with may not be majority-committed yet.
    events_on_primary: Collection<EventDocument>,
    metadata: Collection<Document>,
    retry: Retry,
    bypass_document_validation: bool,
    cosmos_ttl_seconds: Option<i32>,
    commit_quorum: CommitQuorum,
    /// A write acknowledged this long after its `writtenAt` stamp is re-stamped.
    late_after: Duration,
}

impl Journal {
    pub fn new(database: &Database, settings: &Settings) -> Self {
        let names = &settings.mongodb.collections;
        let primary_local = CollectionOptions::builder()
            .read_concern(ReadConcern::local())
            .selection_criteria(SelectionCriteria::ReadPreference(ReadPreference::Primary))
            .build();
        let cosmos_ttl_seconds = cosmos_ttl_seconds(settings);
        Self {
            client: database.client().clone(),
            events: database.collection(&names.journal),
            events_on_primary: database.collection_with_options(&names.journal, primary_local),
            metadata: database.collection(&names.journal_metadata),
            retry: Retry::new(&settings.mongodb.retry),
            bypass_document_validation: settings.mongodb.bypass_document_validation,
            cosmos_ttl_seconds,
            commit_quorum: commit_quorum(&settings.mongodb.index_commit_quorum),
            late_after: settings.read_journal.allowed_time_drift / 2,
        }
    }

    /// Creates missing indexes (existing ones are left as they are).
    pub async fn create_indexes(&self) -> Result<(), JournalError> {
        self.retry
            .run("create journal indexes", || {
                self.events
                    .create_indexes(journal_indexes())
                    .commit_quorum(self.commit_quorum.clone())
            })
            .await
            .map(|_| ())
            .map_err(|error| {
                JournalError::from(self.retry.failure("create journal indexes", false, error))
            })
    }

    /// Stores each write all-or-nothing, several at once; outcomes come back in input order.
    /// Fails as a whole only when MongoDB fails; every write is idempotent, so the caller can
    /// retry the whole batch.
    pub async fn write_batch(
        &self,
        writes: Vec<AtomicWrite>,
    ) -> Result<Vec<WriteOutcome>, JournalError> {
        let results: Vec<Result<WriteOutcome, JournalError>> = stream::iter(writes)
            .map(|write| self.write(write))
            .buffered(WRITE_CONCURRENCY)
            .collect()
            .await;
        results.into_iter().collect()
    }

    /// Stores one atomic write. Events with timestamp 0 are stamped now.
    pub async fn write(&self, write: AtomicWrite) -> Result<WriteOutcome, JournalError> {
        let now = now_millis();
        let mut events = write.into_events();
        for event in &mut events {
            if event.timestamp_millis == 0 {
                event.timestamp_millis = now;
            }
        }
        let mut stamped = DateTime::now();
        let documents = match encode(&events, stamped) {
            Ok(documents) => documents,
            Err(rejection) => return Ok(rejection),
        };
        let mut first_attempt = Some(documents);
        let result = self
            .retry
            .run("write events", || {
                // Later attempts stamp `writtenAt` anew, as late as possible: the read journal
                // orders by it. The content is unchanged, so encoding cannot fail this time.
                let documents = first_attempt.take().map_or_else(
                    || {
                        stamped = DateTime::now();
                        encode(&events, stamped)
                            .map_err(|_| mongodb::error::Error::custom("re-encoding events failed"))
                    },
                    Ok,
                );
                async move { self.insert_events(documents?).await }
            })
            .await;
        match result {
            Ok(()) => {
                self.restamp_if_late(&events, stamped).await?;
                Ok(WriteOutcome::Written)
            }
            Err(error) if is_duplicate_key(&error) => self.resolve_duplicate(&events).await,
            Err(error) => Err(JournalError::from(self.retry.failure(
                "write events",
                true,
                error,
            ))),
        }
    }

    /// One event is one insert; several are one transaction.
    async fn insert_events(
        &self,
        documents: Vec<RawDocumentBuf>,
    ) -> Result<(), mongodb::error::Error> {
        let raw = self.events.clone_with_type::<RawDocumentBuf>();
        if documents.len() == 1 {
            raw.insert_one(&documents[0])
                .bypass_document_validation(self.bypass_document_validation)
                .await?;
            return Ok(());
        }
        let mut session = self.client.start_session().await?;
        session.start_transaction().await?;
        let inserted = raw
            .insert_many(&documents)
            .bypass_document_validation(self.bypass_document_validation)
            .session(&mut session)
            .await;
        match inserted {
            Ok(_) => session.commit_transaction().await,
            Err(error) => {
                // The server aborted it already on most errors; this makes sure.
                let _ = session.abort_transaction().await;
                Err(error)
            }
        }
    }

    /// The sequence numbers are taken: by this very write (a retry, so `Written`) or by
    /// different events (`Conflict`).
    async fn resolve_duplicate(
        &self,
        events: &[PersistentEvent],
    ) -> Result<WriteOutcome, JournalError> {
        let (first, last) = (
            events[0].sequence_nr.get(),
            events[events.len() - 1].sequence_nr.get(),
        );
        let pid = events[0].persistence_id.as_str();
        let filter = doc! { PERSISTENCE_ID: pid, SEQUENCE_NR: { "$gte": first, "$lte": last } };
        let stored: Vec<EventDocument> = self
            .retry
            .run("check stored events", || async {
                self.events_on_primary
                    .find(filter.clone())
                    .sort(doc! { SEQUENCE_NR: 1 })
                    .await?
                    .try_collect()
                    .await
            })
            .await
            .map_err(|error| {
                JournalError::from(self.retry.failure("check stored events", false, error))
            })?;
        let stored_written_at = stored.iter().map(|document| document.written_at).min();
        let identical = stored.len() == events.len()
            && stored.into_iter().zip(events).all(|(document, event)| {
                document.deleted_at.is_none()
                    && document
                        .into_event()
                        .is_ok_and(|stored| stored.same_content_as(event))
            });
        if identical {
            // The first attempt's call may have failed before it could check for lateness.
            if let Some(stored_at) = stored_written_at {
                self.restamp_if_late(events, stored_at).await?;
            }
            return Ok(WriteOutcome::Written);
        }
        let range = if first == last {
            format!("{first}")
        } else {
            format!("{first}..{last}")
        };
        Ok(WriteOutcome::Conflict(format!(
            "sequence number(s) {range} of persistence id {pid:?} are already taken by other events"
        )))
    }

    /// Live queries read only up to `now - allowed-time-drift`, assuming an event stamped
    /// `writtenAt = t` is visible by then. A write that became durable long after its stamp
    /// (server selection, failover, slow replication) may have been passed over; its events are
    /// moved forward, so subscribers that missed them get them. One that did see them gets them
    /// twice: clients de-duplicate by (pid, seqNr). Half the drift is left for clock skew.
    ///
    /// While MongoDB stays slow the move itself is late, so each new stamp lies ahead of now by
    /// the lateness just seen; after [`MAX_RESTAMPS`] the events stay where they are, logged.
    async fn restamp_if_late(
        &self,
        events: &[PersistentEvent],
        stamped: DateTime,
    ) -> Result<(), JournalError> {
        let pid = events[0].persistence_id.as_str();
        let (first, last) = (
            events[0].sequence_nr.get(),
            events[events.len() - 1].sequence_nr.get(),
        );
        let operation = "re-stamp late events";
        let mut stamped = stamped;
        for _ in 0..MAX_RESTAMPS {
            let now = DateTime::now();
            if !is_late(stamped, now, self.late_after) {
                return Ok(());
            }
            let lateness = now.timestamp_millis() - stamped.timestamp_millis();
            let restamp = DateTime::from_millis(now.timestamp_millis() + lateness);
            tracing::warn!(
                pid,
                first,
                last,
                lateness_ms = lateness,
                "write acknowledged late; moving its events forward in read-journal order"
            );
            let filter = doc! {
                PERSISTENCE_ID: pid,
                SEQUENCE_NR: { "$gte": first, "$lte": last },
                WRITTEN_AT: { "$lt": restamp },
            };
            let update = doc! { "$set": { WRITTEN_AT: restamp } };
            self.retry
                .run(operation, || {
                    self.events
                        .update_many(filter.clone(), update.clone())
                        .bypass_document_validation(self.bypass_document_validation)
                })
                .await
                .map_err(|error| self.retry.failure(operation, true, error))?;
            // Late only if it became durable after the new stamp minus the allowed lateness.
            stamped = DateTime::from_millis(
                restamp
                    .timestamp_millis()
                    .min(DateTime::now().timestamp_millis()),
            );
        }
        tracing::error!(
            pid,
            first,
            last,
            "MongoDB stayed slow; live queries in polling mode may pass over these events"
        );
        Ok(())
    }

    /// The highest sequence number ever written for `pid`, 0 if none; deleted and purged events
    /// count.
    pub async fn highest_sequence_nr(&self, pid: &PersistenceId) -> Result<i64, JournalError> {
        let operation = "read highest sequence number";
        let events = self.events.clone_with_type::<Document>();
        let (in_journal, in_metadata) = self
            .retry
            .run(operation, || async {
                let top = events
                    .find_one(doc! { PERSISTENCE_ID: pid.as_str() })
                    .sort(doc! { SEQUENCE_NR: -1 })
                    .projection(doc! { SEQUENCE_NR: 1, "_id": 0 });
                let kept = self.metadata.find_one(doc! { "_id": pid.as_str() });
                futures::try_join!(top.into_future(), kept.into_future())
            })
            .await
            .map_err(|error| JournalError::from(self.retry.failure(operation, false, error)))?;
        let read = |document: Option<Document>, field: &str| -> Result<i64, JournalError> {
            match document {
                None => Ok(0),
                Some(document) => document.get_i64(field).map_err(|error| {
                    JournalError::Corrupt(format!("{field} of persistence id {pid:?}: {error}"))
                }),
            }
        };
        Ok(read(in_journal, SEQUENCE_NR)?.max(read(in_metadata, HIGHEST_SEQUENCE_NR)?))
    }

    /// Logically deletes events `1..=to_sequence_nr` (at most up to the current highest).
    pub async fn delete_to(
        &self,
        pid: &PersistenceId,
        to_sequence_nr: i64,
    ) -> Result<(), JournalError> {
        let highest = self.highest_sequence_nr(pid).await?;
        // Events written after this call started are not this call's to delete.
        let to = to_sequence_nr.min(highest);
        if to <= 0 {
            return Ok(());
        }
        // Remember the highest sequence number first: once the events are marked, a TTL index
        // may purge them at any time.
        let operation = "delete events";
        self.retry
            .run(operation, || {
                self.metadata
                    .update_one(
                        doc! { "_id": pid.as_str() },
                        doc! { "$max": { HIGHEST_SEQUENCE_NR: to } },
                    )
                    .upsert(true)
                    .bypass_document_validation(self.bypass_document_validation)
            })
            .await
            .map_err(|error| JournalError::from(self.retry.failure(operation, true, error)))?;
        let mut mark = doc! { DELETED_AT: DateTime::now() };
        if let Some(ttl) = self.cosmos_ttl_seconds {
            mark.insert(TTL, ttl);
        }
        let filter = doc! {
            PERSISTENCE_ID: pid.as_str(),
            SEQUENCE_NR: { "$lte": to },
            DELETED_AT: { "$exists": false },
        };
        let update = doc! { "$set": mark };
        self.retry
            .run(operation, || {
                self.events
                    .update_many(filter.clone(), update.clone())
                    .bypass_document_validation(self.bypass_document_validation)
            })
            .await
            .map(|_| ())
            .map_err(|error| JournalError::from(self.retry.failure(operation, true, error)))
    }

    /// Akka's replay: the highest sequence number first, then the live events
    /// `from..=min(to, highest)`, at most `max`, in order.
    pub async fn replay(&self, range: ReplayRange) -> Result<Replay, JournalError> {
        let highest_sequence_nr = self.highest_sequence_nr(&range.persistence_id).await?;
        let to = range.to_sequence_nr.min(highest_sequence_nr);
        let from = range.from_sequence_nr.max(1);
        if to < from || range.max == 0 {
            return Ok(Replay {
                highest_sequence_nr,
                events: stream::empty().boxed(),
            });
        }
        let filter = doc! {
            PERSISTENCE_ID: range.persistence_id.as_str(),
            SEQUENCE_NR: { "$gte": from, "$lte": to },
            DELETED_AT: { "$exists": false },
        };
        let operation = "replay events";
        let cursor = self
            .retry
            .run(operation, || {
                let find = self
                    .events
                    .find(filter.clone())
                    .sort(doc! { SEQUENCE_NR: 1 });
                if range.max < i64::MAX {
                    find.limit(range.max)
                } else {
                    find
                }
            })
            .await
            .map_err(|error| JournalError::from(self.retry.failure(operation, false, error)))?;
        let retry = self.retry.clone();
        let events = cursor
            .map(move |document| match document {
                Ok(document) => document.into_event().map_err(JournalError::Corrupt),
                Err(error) => Err(JournalError::from(retry.failure(operation, false, error))),
            })
            .boxed();
        Ok(Replay {
            highest_sequence_nr,
            events,
        })
    }
}

/// The root-level `ttl` that deleted events carry: `write-journal.cosmos-ttl` in cosmos mode,
/// none otherwise.
pub fn cosmos_ttl_seconds(settings: &Settings) -> Option<i32> {
    match settings.mongodb.database_mode {
        // Validation guarantees it fits an int32.
        DatabaseMode::Cosmos => settings
            .write_journal
            .cosmos_ttl
            .and_then(|ttl| i32::try_from(ttl.as_secs()).ok()),
        DatabaseMode::Mongo => None,
    }
}

/// Whether a write stamped at `stamped` and durable at `durable` came too late for the
/// read journal's drift window.
fn is_late(stamped: DateTime, durable: DateTime, late_after: Duration) -> bool {
    durable.timestamp_millis() - stamped.timestamp_millis() > late_after.as_millis() as i64
}

fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as i64)
}

/// The events as BSON, or a rejection naming the event that does not fit in a document.
fn encode(
    events: &[PersistentEvent],
    written_at: DateTime,
) -> Result<Vec<RawDocumentBuf>, WriteOutcome> {
    events
        .iter()
        .map(|event| {
            let binary_bytes = event.payload.data.len()
                + event
                    .metadata
                    .as_ref()
                    .map_or(0, |metadata| metadata.data.len());
            encode_within_limit(&EventDocument::new(event, written_at), binary_bytes).map_err(
                |error| {
                    WriteOutcome::Rejected(error.describe(&format!(
                        "event {} of persistence id {:?}",
                        event.sequence_nr,
                        event.persistence_id.as_str()
                    )))
                },
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_is_late_when_it_became_durable_after_half_the_drift() {
        let stamped = DateTime::from_millis(10_000);
        let half_drift = Duration::from_millis(1_000);
        assert!(!is_late(stamped, DateTime::from_millis(10_999), half_drift));
        assert!(!is_late(stamped, DateTime::from_millis(11_000), half_drift));
        assert!(is_late(stamped, DateTime::from_millis(11_001), half_drift));
    }
}
