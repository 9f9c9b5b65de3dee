//! Events of one persistence id in sequence order, and the persistence ids themselves.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::TryStreamExt;
use journal::document::{self as fields, EventDocument};
use model::PersistentEvent;
use mongo::Retry;
use mongodb::Collection;
use mongodb::bson::{DateTime, Document, doc};
use mongodb::options::Hint;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::error::QueryError;
use crate::feed::event_with_position;
use crate::live::{Polling, Sink, deliver};
use crate::offset::Position;

/// Wakes live by-persistence-id queries when their persistence id has new events: one poller
/// per server (while anyone watches) reads which persistence ids were written lately, a covered
/// scan of the `writtenAt` index, and wakes their watchers. Its MongoDB work grows with what is
/// written, not with the number of watchers. Each poll reads from the previous one's start
/// minus the allowed time drift, so a write that commits late (stamped earlier) still wakes.
pub struct PidWatch {
    registry: Arc<Mutex<WatchRegistry>>,
    events: Collection<Document>,
    retry: Retry,
    polling: Polling,
    shutdown: CancellationToken,
}

#[derive(Default)]
struct WatchRegistry {
    /// Per watched persistence id, a counter bumped when it has new events.
    watched: HashMap<String, watch::Sender<u64>>,
    running: bool,
}

impl PidWatch {
    pub fn new(
        events: Collection<Document>,
        retry: Retry,
        polling: Polling,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            registry: Arc::default(),
            events,
            retry,
            polling,
            shutdown,
        }
    }

    fn registry(&self) -> MutexGuard<'_, WatchRegistry> {
        lock_registry(&self.registry)
    }

    /// Whether the poller runs (for tests).
    pub fn is_running(&self) -> bool {
        self.registry().running
    }

    /// A receiver that changes when `pid` has new events, from now on.
    fn watch(&self, pid: &str) -> watch::Receiver<u64> {
        let mut registry = self.registry();
        let receiver = registry
            .watched
            .entry(pid.to_owned())
            .or_insert_with(|| watch::Sender::new(0))
            .subscribe();
        if !registry.running {
            registry.running = true;
            tokio::spawn(poll_written_pids(
                self.events.clone(),
                self.retry.clone(),
                self.polling.clone(),
                Arc::clone(&self.registry),
                self.shutdown.child_token(),
            ));
        }
        receiver
    }
}

fn lock_registry(registry: &Mutex<WatchRegistry>) -> MutexGuard<'_, WatchRegistry> {
    match registry.lock() {
        Ok(registry) => registry,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// The watch's poller: stops when nobody watches.
async fn poll_written_pids(
    events: Collection<Document>,
    retry: Retry,
    polling: Polling,
    registry: Arc<Mutex<WatchRegistry>>,
    stop: CancellationToken,
) {
    // Each poll reads the ids written after the previous poll's horizon: anything stamped at
    // or before it had committed by then, so the previous poll saw it.
    let mut previous_start = polling.horizon_millis();
    loop {
        tokio::select! {
            () = stop.cancelled() => {
                lock_registry(&registry).running = false;
                return;
            }
            () = tokio::time::sleep(polling.poll_interval) => {}
        }
        let pids: HashSet<String> = {
            let mut registry = lock_registry(&registry);
            registry
                .watched
                .retain(|_, sender| sender.receiver_count() > 0);
            if registry.watched.is_empty() {
                registry.running = false;
                return;
            }
            registry.watched.keys().cloned().collect()
        };
        let start = polling.horizon_millis();
        let from = DateTime::from_millis(previous_start);
        let operation = "read recently written persistence ids";
        // Streamed into a set of the watched ids: memory stays flat however long the window
        // (after failed polls it reaches back to the last good one).
        let woken: Result<HashSet<String>, _> = retry
            .run(operation, || async {
                let mut cursor = events
                    .find(doc! { fields::WRITTEN_AT: { "$gte": from } })
                    .projection(doc! { fields::PERSISTENCE_ID: 1, "_id": 0 })
                    .hint(Hint::Name("writtenAt_pid_seqNr".to_owned()))
                    .await?;
                let mut woken = HashSet::new();
                while let Some(document) = cursor.try_next().await? {
                    if let Ok(pid) = document.get_str(fields::PERSISTENCE_ID)
                        && pids.contains(pid)
                        && !woken.contains(pid)
                    {
                        woken.insert(pid.to_owned());
                    }
                }
                Ok(woken)
            })
            .await;
        let woken = match woken {
            Ok(woken) => woken,
            Err(error) => {
                tracing::warn!(error = %mongo::describe_chain(&error), "live by-persistence-id poll failed; trying again next interval");
                continue;
            }
        };
        previous_start = start;
        let registry = lock_registry(&registry);
        for pid in &woken {
            if let Some(sender) = registry.watched.get(pid) {
                sender.send_modify(|version| *version += 1);
            }
        }
    }
}

/// Events `from..=to` of `pid` in sequence order. Current (`watch` is `None`): completes after
/// what is stored now, skipping deleted events. Live: then stays open for new events, reading
/// again when the watch says `pid` was written. A live query does not skip a gap in the
/// sequence numbers until the event after it is older than the allowed time drift, so an
/// earlier event that commits late is not passed over; gaps of deleted events are skipped
/// then.
#[allow(clippy::too_many_arguments)]
pub async fn events(
    events: Collection<EventDocument>,
    retry: Retry,
    pid: String,
    from: i64,
    to: i64,
    watch: Option<&PidWatch>,
    polling: Polling,
    sink: Sink<PersistentEvent>,
    cancel: CancellationToken,
) {
    // Watching starts before the first read: a write after that read wakes it.
    let mut written = watch.map(|watch| watch.watch(&pid));
    let live = written.is_some();
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
        if next > to {
            // A bounded query is complete once `to` is delivered: nothing to wait for.
            return;
        }
        if full && !waiting_on_gap {
            continue;
        }
        let Some(written) = written.as_mut() else {
            return;
        };
        // Waiting on a gap: read again when the event after it has aged past the drift.
        let recheck = async {
            if waiting_on_gap {
                tokio::time::sleep(polling.poll_interval).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            () = cancel.cancelled() => return,
            () = sink.closed() => return,
            () = recheck => {}
            changed = written.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

/// Persistence ids read per round trip (and per collection) by `persistence_ids`.
const IDS_PAGE: u64 = 1_000;

/// Distinct persistence ids after `after_id` in sorted order, at most `limit`, paged so that
/// the work is proportional to the ids returned, however many ids or events there are. Every
/// persistence id starts at sequence number 1 (writes never leave a gap), so an id is either
/// in the journal with its first event (an index seek per id on `(pid, seqNr)`, returned a
/// page at a time), or its first event was deleted and purged, and then the journal metadata
/// has it (`DeleteEventsTo` records the highest sequence number before marking). Persistence
/// ids whose events are all deleted are included: the actor still exists.
///
/// Returns `None` when the subscription is over, else the ids delivered whose first event was
/// written at or after `recent_after` (a live query's overlap with what it reads next; few ids).
#[allow(clippy::too_many_arguments)]
pub async fn persistence_ids(
    events: Collection<Document>,
    metadata: Collection<Document>,
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
        let page = (limit - delivered).min(IDS_PAGE);
        let found = match ids_page(&events, &metadata, &retry, &last, page).await {
            Ok(found) => found,
            Err(error) => {
                let _ = sink.send(Err(error)).await;
                return None;
            }
        };
        let Some(found) = found else {
            break;
        };
        for (pid, first_written_at) in found {
            let position = Position {
                written_at_millis: first_written_at.unwrap_or(0),
                persistence_id: pid.clone(),
                sequence_nr: 0,
            };
            if !deliver(&sink, &cancel, (position, pid.clone())).await {
                return None;
            }
            if first_written_at.is_some_and(|written_at| written_at >= recent_after) {
                recent.insert(pid.clone());
            }
            last = pid;
            delivered += 1;
        }
    }
    Some(recent)
}

/// The next ids after `last` in order, at most `page`, each with the `writtenAt` of its first
/// event if the journal still has it; `None` when there are no more.
async fn ids_page(
    events: &Collection<Document>,
    metadata: &Collection<Document>,
    retry: &Retry,
    last: &str,
    page: u64,
) -> Result<Option<Vec<(String, Option<i64>)>>, QueryError> {
    let operation = "read persistence ids";
    let first_events = doc! { fields::PERSISTENCE_ID: { "$gt": last }, fields::SEQUENCE_NR: 1_i64 };
    let firsts: Vec<Document> = retry
        .run(operation, || async {
            events
                .find(first_events.clone())
                .sort(doc! { fields::PERSISTENCE_ID: 1, fields::SEQUENCE_NR: 1 })
                .projection(doc! { fields::PERSISTENCE_ID: 1, fields::WRITTEN_AT: 1, "_id": 0 })
                .hint(Hint::Name("pid_seqNr".to_owned()))
                .limit(page as i64)
                .await?
                .try_collect()
                .await
        })
        .await
        .map_err(|error| QueryError::from(retry.failure(operation, false, error)))?;
    let purged: Vec<Document> = retry
        .run(operation, || async {
            metadata
                .find(doc! { "_id": { "$gt": last } })
                .sort(doc! { "_id": 1 })
                .projection(doc! { "_id": 1 })
                .limit(page as i64)
                .await?
                .try_collect()
                .await
        })
        .await
        .map_err(|error| QueryError::from(retry.failure(operation, false, error)))?;
    let mut ids = std::collections::BTreeMap::new();
    for document in &firsts {
        match (
            document.get_str(fields::PERSISTENCE_ID),
            document.get_datetime(fields::WRITTEN_AT),
        ) {
            (Ok(pid), Ok(written_at)) => {
                ids.insert(pid.to_owned(), Some(written_at.timestamp_millis()));
            }
            _ => {
                return Err(QueryError::Corrupt(format!(
                    "journal document without pid or writtenAt: {document}"
                )));
            }
        }
    }
    for document in &purged {
        let Ok(pid) = document.get_str("_id") else {
            return Err(QueryError::Corrupt(format!(
                "journal metadata document without a string _id: {document}"
            )));
        };
        ids.entry(pid.to_owned()).or_insert(None);
    }
    if ids.is_empty() {
        return Ok(None);
    }
    // A full page may stop before ids the other one has: keep only what both pages cover.
    let full = |documents: &[Document], key: &str| {
        (documents.len() as u64 == page)
            .then(|| documents.last().and_then(|last| last.get_str(key).ok()))
            .flatten()
            .map(str::to_owned)
    };
    let bound = [full(&firsts, fields::PERSISTENCE_ID), full(&purged, "_id")]
        .into_iter()
        .flatten()
        .min();
    Ok(Some(
        ids.into_iter()
            .filter(|(pid, _)| bound.as_ref().is_none_or(|bound| pid <= bound))
            .take(page as usize)
            .collect(),
    ))
}
