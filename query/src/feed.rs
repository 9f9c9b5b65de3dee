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

/// Which events an event feed selects.
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
}

#[derive(Clone)]
pub struct EventFeed {
    pub(crate) events: Collection<EventDocument>,
    pub(crate) retry: Retry,
    pub selector: EventSelector,
}

/// The filter, sort and index hint of an event query: events of the selector after the start
/// of `after`'s millisecond (the rest of that millisecond is skipped in code), up to the horizon.
pub fn event_query(
    selector: &EventSelector,
    after: Option<&Position>,
    horizon_millis: i64,
) -> (Document, Document, String) {
    let from = after.map_or(0, |position| position.written_at_millis);
    let mut filter = match selector {
        EventSelector::Tag(tag) => doc! { event_fields::TAGS: tag },
        EventSelector::Slices { min, max } if max - min < MAX_SLICES_MERGED => {
            doc! { event_fields::SLICE: { "$in": (*min..=*max).collect::<Vec<i32>>() } }
        }
        EventSelector::Slices { min, max } => {
            doc! { event_fields::SLICE: { "$gte": min, "$lte": max } }
        }
        EventSelector::FirstEvents => doc! { event_fields::SEQUENCE_NR: 1_i64 },
    };
    filter.insert(
        event_fields::WRITTEN_AT,
        doc! { "$gte": DateTime::from_millis(from), "$lte": DateTime::from_millis(horizon_millis) },
    );
    // A persistence id exists even when its events are deleted.
    if *selector != EventSelector::FirstEvents {
        filter.insert(event_fields::DELETED_AT, doc! { "$exists": false });
    }
    let index = match selector {
        EventSelector::Tag(_) => "tags_writtenAt",
        EventSelector::Slices { min, max } if max - min < MAX_SLICES_MERGED => "slice_writtenAt",
        EventSelector::Slices { .. } | EventSelector::FirstEvents => "writtenAt_pid_seqNr",
    };
    let sort = doc! { event_fields::WRITTEN_AT: 1, event_fields::PERSISTENCE_ID: 1, event_fields::SEQUENCE_NR: 1 };
    (filter, sort, index.to_owned())
}

/// Reads sorted batches from `after`'s millisecond on and drops what is not strictly after
/// `after`. Returns `limit` items unless fewer exist: a short result means "caught up", so a
/// read that lost items to that millisecond is widened until it has `limit` or is complete.
async fn fetch_after<T, F, Fut>(
    after: Option<&Position>,
    limit: usize,
    mut read: F,
) -> Result<Vec<(Position, T)>, QueryError>
where
    F: FnMut(i64) -> Fut,
    Fut: Future<Output = Result<Vec<(Position, T)>, QueryError>>,
{
    let mut read_limit = limit;
    loop {
        let batch = read(read_limit as i64).await?;
        let complete = batch.len() < read_limit;
        let fresh: Vec<_> = batch
            .into_iter()
            .filter(|(position, _)| after.is_none_or(|after| position > after))
            .take(limit)
            .collect();
        if fresh.len() == limit || complete {
            return Ok(fresh);
        }
        read_limit = read_limit.saturating_mul(2);
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
        fetch_after(after, limit, |read_limit| {
            let (filter, sort, index) = (filter.clone(), sort.clone(), index.clone());
            async move {
                let operation = "read events";
                let documents: Vec<EventDocument> = self
                    .retry
                    .run(operation, || async {
                        self.events
                            .find(filter.clone())
                            .sort(sort.clone())
                            .hint(Hint::Name(index.clone()))
                            .limit(read_limit)
                            .await?
                            .try_collect()
                            .await
                    })
                    .await
                    .map_err(|error| self.retry.failure(operation, false, error))?;
                documents.into_iter().map(event_with_position).collect()
            }
        })
        .await
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
}

#[derive(Clone)]
pub struct StateChangeFeed {
    pub(crate) objects: Collection<Document>,
    pub(crate) retry: Retry,
    pub(crate) tag: String,
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
        let from = after.map_or(0, |position| position.written_at_millis);
        let filter = doc! {
            durable_state::TAG: &self.tag,
            durable_state::WRITTEN_AT: { "$gte": DateTime::from_millis(from), "$lte": DateTime::from_millis(horizon_millis) },
        };
        let sort = doc! { durable_state::WRITTEN_AT: 1, "_id": 1 };
        let objects = self.objects.clone_with_type::<StateDocument>();
        fetch_after(after, limit, |read_limit| {
            let (filter, sort, objects) = (filter.clone(), sort.clone(), objects.clone());
            async move {
                let operation = "read durable-state changes";
                let documents: Vec<StateDocument> = self
                    .retry
                    .run(operation, || async {
                        objects
                            .find(filter.clone())
                            .sort(sort.clone())
                            .limit(read_limit)
                            .await?
                            .try_collect()
                            .await
                    })
                    .await
                    .map_err(|error| self.retry.failure(operation, false, error))?;
                documents.into_iter().map(change_with_position).collect()
            }
        })
        .await
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
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(sequence_nr: i64) -> Position {
        Position {
            written_at_millis: 5,
            persistence_id: "a".into(),
            sequence_nr,
        }
    }

    /// Ten items in one millisecond, read as MongoDB would: from that millisecond, sorted.
    async fn read(limit: i64) -> Result<Vec<(Position, i64)>, QueryError> {
        Ok((1..=10).take(limit as usize).map(|n| (at(n), n)).collect())
    }

    #[tokio::test]
    async fn a_full_batch_is_returned_even_when_the_offset_millisecond_is_crowded() {
        let after = at(3);
        let batch = fetch_after(Some(&after), 2, read).await.unwrap();
        assert_eq!(batch.iter().map(|(_, n)| *n).collect::<Vec<_>>(), [4, 5]);
        let rest = fetch_after(Some(&at(8)), 5, read).await.unwrap();
        assert_eq!(
            rest.iter().map(|(_, n)| *n).collect::<Vec<_>>(),
            [9, 10],
            "short only when complete"
        );
        assert!(
            fetch_after(Some(&at(10)), 5, read)
                .await
                .unwrap()
                .is_empty()
        );
    }
}
