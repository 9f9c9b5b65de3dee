//! Events of one persistence id in sequence order, and the persistence ids themselves.

use std::collections::HashSet;

use futures::TryStreamExt;
use journal::document::{self as fields, EventDocument};
use model::PersistentEvent;
use mongo::Retry;
use mongodb::Collection;
use mongodb::bson::{Document, doc};
use tokio_util::sync::CancellationToken;

use crate::error::QueryError;
use crate::feed::event_with_position;
use crate::live::{Polling, Sink, deliver};
use crate::offset::Position;

/// Events `from..=to` of `pid` in sequence order. Current: completes after what is stored now,
/// skipping deleted events. Live: then stays open for new events. A live query does not skip a
/// gap in the sequence numbers until the event after it is older than the allowed time drift,
/// so an earlier event that commits late is not passed over; gaps of deleted events are
/// skipped then.
#[allow(clippy::too_many_arguments)]
pub async fn events(
    events: Collection<EventDocument>,
    retry: Retry,
    pid: String,
    from: i64,
    to: i64,
    live: bool,
    polling: Polling,
    sink: Sink<PersistentEvent>,
    cancel: CancellationToken,
) {
    let mut next = from.max(1);
    loop {
        if next > to {
            return;
        }
        let filter = doc! {
            fields::PERSISTENCE_ID: &pid,
            fields::SEQUENCE_NR: { "$gte": next, "$lte": to },
            fields::DELETED_AT: { "$exists": false },
        };
        let operation = "read events by persistence id";
        let batch: Result<Vec<EventDocument>, _> = retry
            .run(operation, || async {
                events
                    .find(filter.clone())
                    .sort(doc! { fields::SEQUENCE_NR: 1 })
                    .limit(polling.batch_size as i64)
                    .await?
                    .try_collect()
                    .await
            })
            .await;
        let batch = match batch {
            Ok(batch) => batch,
            Err(error) => {
                let _ = sink
                    .send(Err(retry.failure(operation, false, error).into()))
                    .await;
                return;
            }
        };
        let full = batch.len() == polling.batch_size;
        let horizon = polling.horizon_millis();
        let mut waiting_on_gap = false;
        for document in batch {
            let item = match event_with_position(document) {
                Ok(item) => item,
                Err(error) => {
                    let _ = sink.send(Err(error)).await;
                    return;
                }
            };
            let sequence_nr = item.1.sequence_nr.get();
            if live && sequence_nr != next && item.0.written_at_millis > horizon {
                waiting_on_gap = true;
                break;
            }
            if !deliver(&sink, &cancel, item).await {
                return;
            }
            next = sequence_nr + 1;
        }
        if full && !waiting_on_gap {
            continue;
        }
        if !live {
            return;
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = sink.closed() => return,
            () = tokio::time::sleep(polling.poll_interval) => {}
        }
    }
}

/// Distinct persistence ids after `after_id` in sorted order, at most `limit`: one index seek
/// per id on `(pid, seqNr)`, so memory stays flat however many ids there are. Persistence ids
/// whose events are all deleted are included: the actor still exists.
///
/// Returns `None` when the subscription is over, else the ids delivered whose first event was
/// written after `recent_after` (a live query's overlap with what it reads next; few ids).
pub async fn persistence_ids(
    events: Collection<Document>,
    retry: Retry,
    after_id: String,
    limit: u64,
    recent_after: i64,
    sink: Sink<String>,
    cancel: CancellationToken,
) -> Option<HashSet<String>> {
    let mut last = after_id;
    let mut delivered = 0;
    let mut recent = HashSet::new();
    while delivered < limit {
        let operation = "read persistence ids";
        let filter = doc! { fields::PERSISTENCE_ID: { "$gt": &last } };
        let found = retry
            .run(operation, || {
                events
                    .find_one(filter.clone())
                    .sort(doc! { fields::PERSISTENCE_ID: 1, fields::SEQUENCE_NR: 1 })
                    .projection(doc! { fields::PERSISTENCE_ID: 1, fields::WRITTEN_AT: 1, "_id": 0 })
            })
            .await;
        let (pid, written_at) = match found {
            Ok(Some(document)) => match (
                document.get_str(fields::PERSISTENCE_ID),
                document.get_datetime(fields::WRITTEN_AT),
            ) {
                (Ok(pid), Ok(written_at)) => (pid.to_owned(), written_at.timestamp_millis()),
                _ => {
                    let error = QueryError::Corrupt(format!(
                        "journal document without pid or writtenAt: {document}"
                    ));
                    let _ = sink.send(Err(error)).await;
                    return None;
                }
            },
            Ok(None) => break,
            Err(error) => {
                let _ = sink
                    .send(Err(retry.failure(operation, false, error).into()))
                    .await;
                return None;
            }
        };
        let position = Position {
            written_at_millis: written_at,
            persistence_id: pid.clone(),
            sequence_nr: 0,
        };
        if !deliver(&sink, &cancel, (position, pid.clone())).await {
            return None;
        }
        if written_at > recent_after {
            recent.insert(pid.clone());
        }
        last = pid;
        delivered += 1;
    }
    Some(recent)
}
