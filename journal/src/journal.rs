//! Journal operations: writes (handed to the group-commit writer, see [`crate::writer`]),
//! delete-to, the highest sequence number, and replay.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use config::{DatabaseMode, Settings};
use futures::stream::{self, BoxStream, StreamExt};
use model::{AtomicWrite, PersistenceId, PersistentEvent, ReplayRange};
use mongo::{Retry, commit_quorum};
use mongodb::bson::{DateTime, Document, doc};
use mongodb::options::CommitQuorum;
use mongodb::{Collection, Database};

use crate::document::{
    DELETED_AT, EncodedEvent, EventDocument, HIGHEST_SEQUENCE_NR, PERSISTENCE_ID, SEQUENCE_NR, TTL,
};
use crate::error::JournalError;
use crate::indexes::journal_indexes;
use crate::writer::{EventStore, Origin, Pid, Prepared, Ready, Writer};

/// The result of one atomic write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Durable, or identical to what was already stored.
    Written,
    /// Invalid content; nothing stored.
    Rejected(String),
    /// Does not fit the stored history (sequence numbers taken, at or below the highest, or
    /// leaving a gap), or an earlier write of the same id in the request failed; nothing
    /// stored.
    Conflict(String),
}

/// A write that failed validation before it reached the journal: answered `Rejected` with
/// `reason`. When its first event names a valid persistence id, it is a failed write of that
/// id like any other: the later writes of the id in its request or stream are not stored.
#[derive(Debug, Clone)]
pub struct RefusedWrite {
    pub persistence_id: Option<PersistenceId>,
    /// The sequence numbers its first and last events give.
    pub first: i64,
    pub last: i64,
    pub reason: String,
}

/// A replay: the highest sequence number (read first, as Akka does) and the events.
pub struct Replay {
    pub highest_sequence_nr: i64,
    pub events: BoxStream<'static, Result<PersistentEvent, JournalError>>,
}

#[derive(Clone)]
pub struct Journal {
    events: Collection<EventDocument>,
    metadata: Collection<Document>,
    store: Arc<EventStore>,
    writer: Writer,
    retry: Retry,
    bypass_document_validation: bool,
    cosmos_ttl_seconds: Option<i32>,
    commit_quorum: CommitQuorum,
    /// Deleted events are marked purgeable this far ahead (see `write-journal.purge-delay`).
    purge_delay: Duration,
}

impl Journal {
    /// The journal over `database`; starts the group-commit writer (needs a Tokio runtime).
    /// `watermarks` stamps every position this server writes (see [`mongo::watermark`]).
    pub fn new(database: &Database, settings: &Settings, watermarks: mongo::Watermarks) -> Self {
        let names = &settings.mongodb.collections;
        let store = Arc::new(EventStore::new(database, settings, watermarks));
        let writer = Writer::start(store.clone(), &settings.write_journal);
        Self {
            events: database.collection(&names.journal),
            metadata: database.collection(&names.journal_metadata),
            store,
            writer,
            retry: Retry::new(&settings.mongodb.retry),
            bypass_document_validation: settings.mongodb.bypass_document_validation,
            cosmos_ttl_seconds: cosmos_ttl_seconds(settings),
            commit_quorum: commit_quorum(&settings.mongodb.index_commit_quorum),
            purge_delay: settings.write_journal.purge_delay,
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

    /// Stores each write all-or-nothing; outcomes come back in input order. Fails as a whole
    /// only when MongoDB fails; every write is idempotent, so the caller can retry the batch.
    pub async fn write_batch(
        &self,
        writes: Vec<AtomicWrite>,
    ) -> Result<Vec<WriteOutcome>, JournalError> {
        let writes = writes.into_iter().map(Ok).collect();
        self.submit(Origin::call(None, None), writes).await
    }

    /// Queues the writes with the group-commit writer now, in order (events with timestamp 0
    /// are stamped now), and returns the future of their outcomes. Per persistence id, writes
    /// are applied in the order they are submitted; once one fails, the later ones of its id
    /// from the same `origin` chain (request or stream) are not stored (on a stream: the ones
    /// sent before the client had the failure's response, see [`crate::StreamPosition`]).
    pub fn submit(
        &self,
        origin: Origin,
        writes: Vec<Result<AtomicWrite, RefusedWrite>>,
    ) -> impl Future<Output = Result<Vec<WriteOutcome>, JournalError>> + Send + 'static {
        let now = now_millis();
        // Writes of one id in a row share its `Pid`.
        let mut previous_pid: Option<Pid> = None;
        let writes = writes
            .into_iter()
            .map(|write| match write {
                Ok(write) => prepare(write, now, &mut previous_pid),
                Err(refused) => Prepared::rejected(
                    refused.persistence_id.map(|pid| pid.as_str().into()),
                    refused.first,
                    refused.last,
                    refused.reason,
                ),
            })
            .collect();
        self.writer.submit(origin, writes)
    }

    /// The `WriteEventsStream` of `origin` has ended: its failures stop nothing any more.
    pub fn stream_closed(&self, origin: Origin) {
        self.writer.stream_closed(origin);
    }

    /// The highest sequence number ever written for `pid`, 0 if none; deleted and purged events
    /// count.
    pub async fn highest_sequence_nr(&self, pid: &PersistenceId) -> Result<i64, JournalError> {
        let pids: [Pid; 1] = [pid.as_str().into()];
        let heads = self.store.read_heads(&pids).await?;
        Ok(heads.get(pid.as_str()).map_or(0, |head| head.highest))
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
        // Purgeable only after the purge delay: until then no server can be relying on
        // knowledge of these sequence numbers that is older than the delete (see `writer`).
        let purgeable_from = DateTime::from_millis(
            DateTime::now().timestamp_millis() + self.purge_delay.as_millis() as i64,
        );
        let mut mark = doc! { DELETED_AT: purgeable_from };
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

fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as i64)
}

/// Stamps the timestamps and encodes the events, or rejects the write naming the event that
/// does not fit in a MongoDB document.
fn prepare(write: AtomicWrite, now: i64, previous_pid: &mut Option<Pid>) -> Prepared {
    let pid: Pid = match previous_pid {
        Some(pid) if **pid == *write.persistence_id().as_str() => pid.clone(),
        _ => previous_pid
            .insert(write.persistence_id().as_str().into())
            .clone(),
    };
    let (first, last) = (
        write.first_sequence_nr().get(),
        write.last_sequence_nr().get(),
    );
    let mut events = write.into_events();
    let mut documents = Vec::with_capacity(events.len());
    for event in &mut events {
        if event.timestamp_millis == 0 {
            event.timestamp_millis = now;
        }
        match EncodedEvent::new(event) {
            Ok(document) => documents.push(document),
            Err(error) => {
                let what = format!("event {} of persistence id {pid:?}", event.sequence_nr);
                return Prepared::rejected(Some(pid), first, last, error.describe(&what));
            }
        }
    }
    Prepared::Ready(Ready {
        pid,
        first,
        last,
        events,
        documents,
    })
}
