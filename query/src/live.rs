//! Live queries in polling mode: one shared poller (a hub) per query key, and the subscriber
//! protocol that never misses an item and never repeats one.
//!
//! A subscriber subscribes to the hub's broadcast first, then catches up with its own bounded
//! queries up to the current horizon, then follows the hub's batches, dropping anything at or
//! before the last position it delivered. Because the hub's previous horizon was computed before
//! the subscription and the catch-up horizon after it, the two overlap and nothing falls between
//! them. A subscriber that falls behind the hub's bounded broadcast (a slow reader) goes back to
//! catching up with its own queries, paced by its client, so server memory does not grow with
//! how far behind it is.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::error::QueryError;
use crate::feed::Feed;
use crate::offset::{Offset, Position};

/// Batches a hub keeps for subscribers that are a little behind; one further behind catches up
/// with its own queries.
const HUB_BATCHES: usize = 16;

/// Where each delivered item goes; a failed send means the client left.
pub type Sink<T> = mpsc::Sender<Result<(Offset, T), QueryError>>;

type Batch<T> = Arc<Vec<(Position, T)>>;

#[derive(Debug, Clone, Copy)]
pub struct Polling {
    pub allowed_time_drift: Duration,
    pub poll_interval: Duration,
    pub batch_size: usize,
}

impl Polling {
    /// Items written up to here are safe to deliver: a later commit stamped earlier than this
    /// is outside the allowed drift.
    pub fn horizon_millis(&self) -> i64 {
        now_millis() - self.allowed_time_drift.as_millis() as i64
    }
}

fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as i64)
}

/// One poller shared by every live subscriber of one key (tag, slice range, ...). It stops
/// when the last subscriber drops it.
pub struct Hub<T> {
    batches: broadcast::Sender<Batch<T>>,
    stop: CancellationToken,
}

impl<T> Drop for Hub<T> {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The running hubs of one kind of query, by key.
pub struct Hubs<K, F: Feed> {
    running: Mutex<HashMap<K, Weak<Hub<F::Item>>>>,
    polling: Polling,
    shutdown: CancellationToken,
}

impl<K: Eq + Hash + Clone, F: Feed> Hubs<K, F> {
    pub fn new(polling: Polling, shutdown: CancellationToken) -> Self {
        Self {
            running: Mutex::new(HashMap::new()),
            polling,
            shutdown,
        }
    }

    /// How many hubs poll right now (for tests and metrics).
    pub fn running(&self) -> usize {
        self.running.lock().map_or(0, |running| {
            running
                .values()
                .filter(|hub| hub.strong_count() > 0)
                .count()
        })
    }

    fn hub(&self, key: K, feed: &F) -> Arc<Hub<F::Item>> {
        let mut running = match self.running.lock() {
            Ok(running) => running,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(hub) = running.get(&key).and_then(Weak::upgrade) {
            return hub;
        }
        running.retain(|_, hub| hub.strong_count() > 0);
        let (batches, _) = broadcast::channel(HUB_BATCHES);
        let stop = self.shutdown.child_token();
        tokio::spawn(poll(
            feed.clone(),
            self.polling,
            batches.clone(),
            stop.clone(),
        ));
        let hub = Arc::new(Hub { batches, stop });
        running.insert(key, Arc::downgrade(&hub));
        hub
    }

    /// A live subscription from `start` (exclusive): runs until the client leaves or the server
    /// shuts down.
    pub async fn subscribe(&self, key: K, feed: F, start: Option<Position>, sink: Sink<F::Item>) {
        let hub = self.hub(key, &feed);
        let polling = self.polling;
        let cancel = self.shutdown.clone();
        let mut last = start;
        'catch_up: loop {
            let mut batches = hub.batches.subscribe();
            let horizon = polling.horizon_millis();
            if !read_up_to(
                &feed,
                &mut last,
                horizon,
                polling.batch_size,
                &sink,
                &cancel,
            )
            .await
            {
                return;
            }
            loop {
                let received = tokio::select! {
                    () = cancel.cancelled() => return,
                    () = sink.closed() => return,
                    received = batches.recv() => received,
                };
                match received {
                    Ok(batch) => {
                        for (position, item) in batch.iter() {
                            if last.as_ref().is_some_and(|last| position <= last) {
                                continue;
                            }
                            if !deliver(&sink, &cancel, (position.clone(), item.clone())).await {
                                return;
                            }
                            last = Some(position.clone());
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(skipped)) => {
                        tracing::debug!(
                            skipped,
                            "live subscriber fell behind; catching up with queries"
                        );
                        continue 'catch_up;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        }
    }
}

/// Sends one item unless the server shuts down; false when the subscription is over.
pub(crate) async fn deliver<T>(
    sink: &Sink<T>,
    cancel: &CancellationToken,
    (position, item): (Position, T),
) -> bool {
    tokio::select! {
        () = cancel.cancelled() => false,
        sent = sink.send(Ok((position.into(), item))) => sent.is_ok(),
    }
}

/// The hub's poller: every poll interval, publishes what was written since its last position
/// up to the horizon, in batches.
async fn poll<F: Feed>(
    feed: F,
    polling: Polling,
    batches: broadcast::Sender<Batch<F::Item>>,
    stop: CancellationToken,
) {
    // Subscribers catch up on their own; the hub starts at the current horizon.
    let mut last = Some(Position {
        written_at_millis: polling.horizon_millis(),
        persistence_id: String::new(),
        sequence_nr: 0,
    });
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(polling.poll_interval) => {}
        }
        let horizon = polling.horizon_millis();
        loop {
            let batch = tokio::select! {
                () = stop.cancelled() => return,
                batch = feed.fetch(last.as_ref(), horizon, polling.batch_size) => batch,
            };
            match batch {
                Ok(batch) if batch.is_empty() => break,
                Ok(batch) => {
                    let complete = batch.len() < polling.batch_size;
                    last = batch.last().map(|(position, _)| position.clone());
                    for (position, _) in &batch {
                        crate::metrics::observe_lag(
                            crate::metrics::POLLING,
                            position.written_at_millis,
                        );
                    }
                    // No receiver right now is fine: a new subscriber catches up by itself.
                    let _ = batches.send(Arc::new(batch));
                    if complete {
                        break;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "live query poll failed; trying again next interval");
                    break;
                }
            }
        }
    }
}

/// A current query: everything after `start` up to the horizon at the time of the call.
pub async fn current<F: Feed>(
    feed: F,
    polling: Polling,
    start: Option<Position>,
    sink: Sink<F::Item>,
    cancel: CancellationToken,
) {
    let mut last = start;
    read_up_to(
        &feed,
        &mut last,
        polling.horizon_millis(),
        polling.batch_size,
        &sink,
        &cancel,
    )
    .await;
}

/// Delivers everything after `last` up to `horizon`, batch by batch, moving `last` along;
/// false when the subscription is over (client gone, shutdown, or an error sent to it).
async fn read_up_to<F: Feed>(
    feed: &F,
    last: &mut Option<Position>,
    horizon: i64,
    batch_size: usize,
    sink: &Sink<F::Item>,
    cancel: &CancellationToken,
) -> bool {
    loop {
        let batch = match feed.fetch(last.as_ref(), horizon, batch_size).await {
            Ok(batch) => batch,
            Err(error) => {
                let _ = sink.send(Err(error)).await;
                return false;
            }
        };
        let complete = batch.len() < batch_size;
        for item in batch {
            let position = item.0.clone();
            if !deliver(sink, cancel, item).await {
                return false;
            }
            *last = Some(position);
        }
        if complete {
            return true;
        }
    }
}
