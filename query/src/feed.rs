//! What a query reads: the journal by tag or slice range, or durable-state changes by tag, in
//! position order, one bounded batch at a time, never past a horizon.

use std::future::Future;

use futures::TryStreamExt;
use journal::document::{self as event_fields, EventDocument};
use model::{Payload, PersistenceId, PersistentEvent};
use mongo::{PayloadDocument, Retry};
use mongodb::Collection;
use mongodb::bson::{DateTime, Document, doc};
use mongodb::options::Hint;
use serde::Deserialize;

use crate::error::QueryError;
use crate::live::Route;
use crate::offset::Position;

/// The largest slice range read through the slice index with `$in` (MongoDB merges up to 200
/// index scans in order); wider ranges scan the `writtenAt` index and filter.
const MAX_SLICES_MERGED: i32 = 200;

/// A source of items in position order. `fetch` returns items with positions strictly after
/// `after` and `writtenAt <= horizon`, at most `limit`, in order.
pub trait Feed: Clone + Send + Sync + 'static {
    type Item: Clone + Send + Sync + 'static;

    fn fetch(
        &self,
        after: Option<&Position>,
        horizon_millis: i64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<(Position, Self::Item)>, QueryError>> + Send;
}

/// Which events an event feed selects; also the key of a live subscription's hub.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EventSelector {
    Tag(String),
    Slices {
        min: i32,
        max: i32,
    },
    /// The first event (sequence number 1) of each persistence id, deleted or not: how live
    /// `PersistenceIds` learns of new ids.
    FirstEvents,
    /// Every event that is not deleted: the shared tail that feeds live tag and slice queries.
    All,
}

impl EventSelector {
    /// Whether `event` is one this selector selects.
    pub fn matches(&self, event: &PersistentEvent) -> bool {
        match self {
            EventSelector::Tag(tag) => event.tags.iter().any(|candidate| candidate.as_str() == tag),
            EventSelector::Slices { min, max } => {
                (*min..=*max).contains(&event.persistence_id.slice())
            }
            EventSelector::FirstEvents => event.sequence_nr.get() == 1,
            EventSelector::All => true,
        }
    }
}

impl Route for EventSelector {
    type Item = PersistentEvent;

    fn by_lookup(&self) -> bool {
        matches!(self, EventSelector::Tag(_))
    }

    fn lookup_keys(event: &PersistentEvent) -> Vec<Self> {
        event
            .tags
            .iter()
            .map(|tag| EventSelector::Tag(tag.as_str().to_owned()))
            .collect()
    }

    fn matches(&self, event: &PersistentEvent) -> bool {
        EventSelector::matches(self, event)
    }
}

#[derive(Clone)]
pub struct EventFeed {
    pub(crate) events: Collection<EventDocument>,
    pub(crate) retry: Retry,
    pub selector: EventSelector,
}

/// The filter, sort and index hint of an event query: events of the selector strictly after
/// `after` (keyset paging on the position, so a page never re-reads what the last one
/// returned), up to the horizon.
pub fn event_query(
    selector: &EventSelector,
    after: Option<&Position>,
    horizon_millis: i64,
) -> (Document, Document, String) {
    let mut filter = match selector {
        EventSelector::Tag(tag) => doc! { event_fields::TAGS: tag },
        EventSelector::Slices { min, max } if max - min < MAX_SLICES_MERGED => {
            doc! { event_fields::SLICE: { "$in": (*min..=*max).collect::<Vec<i32>>() } }
        }
        EventSelector::Slices { min, max } => {
            doc! { event_fields::SLICE: { "$gte": min, "$lte": max } }
        }
        EventSelector::FirstEvents => doc! { event_fields::SEQUENCE_NR: 1_i64 },
        EventSelector::All => Document::new(),
    };
    filter.extend(after_position(
        after,
        horizon_millis,
        [
            event_fields::WRITTEN_AT,
            event_fields::PERSISTENCE_ID,
            event_fields::SEQUENCE_NR,
        ],
    ));
    // A persistence id exists even when its events are deleted.
    if *selector != EventSelector::FirstEvents {
        filter.insert(event_fields::DELETED_AT, doc! { "$exists": false });
    }
    let index = match selector {
        EventSelector::Tag(_) => "tags_writtenAt",
        EventSelector::Slices { min, max } if max - min < MAX_SLICES_MERGED => "slice_writtenAt",
        EventSelector::Slices { .. } | EventSelector::FirstEvents | EventSelector::All => {
            "writtenAt_pid_seqNr"
        }
    };
    let sort = doc! { event_fields::WRITTEN_AT: 1, event_fields::PERSISTENCE_ID: 1, event_fields::SEQUENCE_NR: 1 };
    (filter, sort, index.to_owned())
}

/// The keyset condition "position strictly after `after`, `writtenAt` at most the horizon" on
/// the fields `[writtenAt, id, number]`. The `writtenAt` range bounds the index scan; the `$or`
/// skips the rest of `after`'s millisecond, evaluated on the index keys (no document is
/// fetched for it).
fn after_position(
    after: Option<&Position>,
    horizon_millis: i64,
    [written_at, id, number]: [&str; 3],
) -> Document {
    let horizon = DateTime::from_millis(horizon_millis);
    let Some(after) = after else {
        return doc! { written_at: { "$lte": horizon } };
    };
    let at = DateTime::from_millis(after.written_at_millis);
    doc! {
        written_at: { "$gte": at, "$lte": horizon },
        "$or": [
            { written_at: { "$gt": at } },
            { id: { "$gt": &after.persistence_id } },
            { id: &after.persistence_id, number: { "$gt": after.sequence_nr } },
        ],
    }
}

impl Feed for EventFeed {
    type Item = PersistentEvent;

    async fn fetch(
        &self,
        after: Option<&Position>,
        horizon_millis: i64,
        limit: usize,
    ) -> Result<Vec<(Position, PersistentEvent)>, QueryError> {
        if after.is_some_and(|after| after.written_at_millis > horizon_millis) {
            return Ok(Vec::new());
        }
        let (filter, sort, index) = event_query(&self.selector, after, horizon_millis);
        let operation = "read events";
        let documents: Vec<EventDocument> = self
            .retry
            .run(operation, || async {
                self.events
                    .find(filter.clone())
                    .sort(sort.clone())
                    .hint(Hint::Name(index.clone()))
                    .limit(limit as i64)
                    .await?
                    .try_collect()
                    .await
            })
            .await
            .map_err(|error| self.retry.failure(operation, false, error))?;
        documents.into_iter().map(event_with_position).collect()
    }
}

pub(crate) fn event_with_position(
    document: EventDocument,
) -> Result<(Position, PersistentEvent), QueryError> {
    let position = Position {
        written_at_millis: document.written_at.timestamp_millis(),
        persistence_id: document.pid.clone(),
        sequence_nr: document.seq_nr,
    };
    let event = document.into_event().map_err(QueryError::Corrupt)?;
    Ok((position, event))
}

/// The latest change of a durable-state object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateChange {
    pub persistence_id: PersistenceId,
    pub revision: i64,
    /// `None`: the object is deleted.
    pub value: Option<Payload>,
    pub timestamp_millis: i64,
    /// The object's tag (how the shared tail finds its subscribers).
    pub tag: Option<String>,
}

#[derive(Debug, Deserialize)]
struct StateDocument {
    #[serde(rename = "_id")]
    pid: String,
    revision: i64,
    #[serde(default)]
    payload: Option<PayloadDocument>,
    timestamp: i64,
    #[serde(rename = "writtenAt")]
    written_at: DateTime,
    #[serde(rename = "deletedAt", default)]
    deleted_at: Option<DateTime>,
    #[serde(default)]
    tag: Option<String>,
}

/// Live durable-state change queries are keyed by tag.
impl Route for String {
    type Item = StateChange;

    fn by_lookup(&self) -> bool {
        true
    }

    fn lookup_keys(change: &StateChange) -> Vec<Self> {
        change.tag.iter().cloned().collect()
    }

    fn matches(&self, change: &StateChange) -> bool {
        change.tag.as_ref() == Some(self)
    }
}

#[derive(Clone)]
pub struct StateChangeFeed {
    pub(crate) objects: Collection<Document>,
    pub(crate) retry: Retry,
    /// `None`: changes of every object (the shared tail).
    pub(crate) tag: Option<String>,
}

impl Feed for StateChangeFeed {
    type Item = StateChange;

    async fn fetch(
        &self,
        after: Option<&Position>,
        horizon_millis: i64,
        limit: usize,
    ) -> Result<Vec<(Position, StateChange)>, QueryError> {
        if after.is_some_and(|after| after.written_at_millis > horizon_millis) {
            return Ok(Vec::new());
        }
        let (mut filter, index) = match &self.tag {
            Some(tag) => (doc! { durable_state::TAG: tag }, "tag_writtenAt"),
            None => (Document::new(), "writtenAt_id"),
        };
        filter.extend(after_position(
            after,
            horizon_millis,
            [durable_state::WRITTEN_AT, "_id", durable_state::REVISION],
        ));
        let sort = doc! { durable_state::WRITTEN_AT: 1, "_id": 1 };
        let objects = self.objects.clone_with_type::<StateDocument>();
        let operation = "read durable-state changes";
        let documents: Vec<StateDocument> = self
            .retry
            .run(operation, || async {
                objects
                    .find(filter.clone())
                    .sort(sort.clone())
                    .hint(Hint::Name(index.to_owned()))
                    .limit(limit as i64)
                    .await?
                    .try_collect()
                    .await
            })
            .await
            .map_err(|error| self.retry.failure(operation, false, error))?;
        documents.into_iter().map(change_with_position).collect()
    }
}

fn change_with_position(document: StateDocument) -> Result<(Position, StateChange), QueryError> {
    let position = Position {
        written_at_millis: document.written_at.timestamp_millis(),
        persistence_id: document.pid.clone(),
        sequence_nr: document.revision,
    };
    let persistence_id = PersistenceId::parse("_id", document.pid)
        .map_err(|error| QueryError::Corrupt(format!("durable-state document: {error}")))?;
    let value = match document.deleted_at {
        Some(_) => None,
        None => document.payload.map(Payload::from),
    };
    Ok((
        position,
        StateChange {
            persistence_id,
            revision: document.revision,
            value,
            timestamp_millis: document.timestamp,
            tag: document.tag,
        },
    ))
}
