//! Live queries in polling mode: one shared tail per kind of query (journal events, durable-state
//! changes) that reads everything new and dispatches it to hubs by key (tag, slice range), and
//! the subscriber protocol that never misses an item and never repeats one.
//!
//! The tail reads the whole collection in position order up to the horizon, every poll
//! interval, however many subscribers there are: its MongoDB work grows with what is written,
//! not with subscribers. It hands each key's items to that key's hub, a bounded broadcast.
//!
//! A subscriber subscribes to its hub's broadcast first, then catches up with its own bounded
//! queries up to the current horizon, then follows the hub's batches, dropping anything at or
//! before the last position it delivered. Because the tail's previous horizon was computed before
//! the subscription and the catch-up horizon after it, the two overlap and nothing falls between
//! them. A subscriber that falls behind the hub's bounded broadcast (a slow reader) goes back to
//! catching up with its own queries, paced by its client, so server memory does not grow with
//! how far behind it is.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use mongo::Watermarks;

use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::error::QueryError;
use crate::feed::Feed;
use crate::offset::{Offset, Position};

/// Batches a hub keeps for subscribers that are a little behind; one further behind catches up
/// with its own queries.
const HUB_BATCHES: usize = 16;

/// Where each delivered item goes; a failed send means the client left. Items are boxed: a
/// channel allocates its first block of slots when it is created, and an idle live query
/// should cost a block of pointers, not of events.
pub type Sink<T> = mpsc::Sender<Result<Box<(Offset, T)>, QueryError>>;

type Batch<T> = Arc<Vec<(Position, T)>>;

#[derive(Clone)]
pub struct Polling {
    /// Where the horizon comes from (see [`mongo::watermark`]).
    pub watermarks: Watermarks,
    pub allowed_time_drift: Duration,
    pub poll_interval: Duration,
    pub batch_size: usize,
}

impl Polling {
    /// Items written up to here are safe to deliver: nothing stamped at or before it can still
    /// commit (the lowest published watermark, or `now - allowed-time-drift`).
    pub fn horizon_millis(&self) -> i64 {
        self.watermarks.live_horizon()
    }
}

/// The first position after everything written up to `horizon_millis` (a persistence id is
/// never empty, so every real position of the next millisecond sorts after it).
pub(crate) fn past(horizon_millis: i64) -> Position {
    Position {
        written_at_millis: horizon_millis + 1,
        persistence_id: String::new(),
        sequence_nr: 0,
    }
}

/// How the tail finds the hubs an item goes to. Keys of a lookup kind (a tag) are found from
/// the item; the others (slice ranges, few) are each matched against every item.
pub trait Route: Eq + Hash + Clone + Send + Sync + 'static {
    type Item: Clone + Send + Sync + 'static;

    /// Whether hubs of this key are found by [`Route::lookup_keys`].
    fn by_lookup(&self) -> bool;
    /// The lookup keys `item` belongs to.
    fn lookup_keys(item: &Self::Item) -> Vec<Self>;
    /// Whether `item` belongs to this key.
    fn matches(&self, item: &Self::Item) -> bool;
}

/// The live subscribers of one key (tag, slice range, ...): the tail's batches for that key.
pub struct Hub<T> {
    batches: broadcast::Sender<Batch<T>>,
}

struct Registry<K, T> {
    hubs: HashMap<K, Weak<Hub<T>>>,
    tail_running: bool,
}

/// The hubs of one kind of query, fed by one shared tail that runs while any hub has a
/// subscriber.
pub struct Hubs<K: Route, F: Feed<Item = K::Item>> {
    registry: Arc<Mutex<Registry<K, F::Item>>>,
    /// Reads everything of this kind in position order (the tail's feed).
    everything: F,
    polling: Polling,
    shutdown: CancellationToken,
}

fn lock<K, T>(registry: &Mutex<Registry<K, T>>) -> MutexGuard<'_, Registry<K, T>> {
    match registry.lock() {
        Ok(registry) => registry,
        Err(poisoned) => poisoned.into_inner(),
    }
}

impl<K: Route, F: Feed<Item = K::Item>> Hubs<K, F> {
    pub fn new(everything: F, polling: Polling, shutdown: CancellationToken) -> Self {
        Self {
            registry: Arc::new(Mutex::new(Registry {
                hubs: HashMap::new(),
                tail_running: false,
            })),
            everything,
            polling,
            shutdown,
        }
    }

    /// How many tails poll right now: 1 while anyone subscribes, else 0 (for tests and metrics).
    pub fn running(&self) -> usize {
        usize::from(lock(&self.registry).tail_running)
    }

    fn hub(&self, key: K) -> Arc<Hub<F::Item>> {
        let mut registry = lock(&self.registry);
        if let Some(hub) = registry.hubs.get(&key).and_then(Weak::upgrade) {
            return hub;
        }
        registry.hubs.retain(|_, hub| hub.strong_count() > 0);
        let (batches, _) = broadcast::channel(HUB_BATCHES);
        let hub = Arc::new(Hub { batches });
        registry.hubs.insert(key, Arc::downgrade(&hub));
        if !registry.tail_running {
            registry.tail_running = true;
            // The tail starts at the horizon of now, before this subscriber takes its own
            // catch-up horizon: the two overlap (the task might first run only after that).
            let start = past(self.polling.horizon_millis());
            tokio::spawn(tail(
                self.everything.clone(),
                self.polling.clone(),
                start,
                Arc::clone(&self.registry),
                self.shutdown.child_token(),
            ));
        }
        hub
    }

    /// A live subscription from `start` (exclusive): runs until the client leaves or the server
    /// shuts down. `feed` reads this key's items for catching up.
    pub async fn subscribe(&self, key: K, feed: F, start: Option<Position>, sink: Sink<F::Item>) {
        let hub = self.hub(key);
        let polling = &self.polling;
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
        sent = sink.send(Ok(Box::new((position.into(), item)))) => sent.is_ok(),
    }
}

/// The shared tail: every poll interval, reads what was written since its last position up to
/// the horizon, in batches, and hands each hub its items. Stops when no hub is left.
async fn tail<K: Route, F: Feed<Item = K::Item>>(
    feed: F,
    polling: Polling,
    start: Position,
    registry: Arc<Mutex<Registry<K, F::Item>>>,
    stop: CancellationToken,
) {
    // Subscribers catch up on their own; the tail starts at the horizon when it was started.
    let mut last = start;
    loop {
        tokio::select! {
            () = stop.cancelled() => {
                lock(&registry).tail_running = false;
                return;
            }
            () = tokio::time::sleep(polling.poll_interval) => {}
        }
        {
            let mut registry = lock(&registry);
            registry.hubs.retain(|_, hub| hub.strong_count() > 0);
            if registry.hubs.is_empty() {
                registry.tail_running = false;
                return;
            }
        }
        let horizon = polling.horizon_millis();
        loop {
            let batch = tokio::select! {
                () = stop.cancelled() => {
                    lock(&registry).tail_running = false;
                    return;
                }
                batch = feed.fetch(Some(&last), horizon, polling.batch_size) => batch,
            };
            match batch {
                Ok(batch) => {
                    let complete = batch.len() < polling.batch_size;
                    if let Some((position, _)) = batch.last() {
                        last = position.clone();
                    }
                    for (position, _) in &batch {
                        crate::metrics::observe_lag(
                            crate::metrics::POLLING,
                            position.written_at_millis,
                        );
                    }
                    dispatch(&registry, batch);
                    if complete {
                        // Everything up to the horizon is read: the next poll starts there,
                        // found something or not.
                        last = last.max(past(horizon));
                        break;
                    }
                }
                Err(error) => {
                    tracing::warn!(error = %mongo::describe_chain(&error), "live query poll failed; trying again next interval");
                    break;
                }
            }
        }
    }
}

/// Hands each hub the items of its key. No hub for an item is fine: a subscriber that comes
/// later catches up by itself.
fn dispatch<K: Route>(registry: &Mutex<Registry<K, K::Item>>, batch: Vec<(Position, K::Item)>) {
    if batch.is_empty() {
        return;
    }
    let registry = lock(registry);
    let matched: Vec<&K> = registry
        .hubs
        .keys()
        .filter(|key| !key.by_lookup())
        .collect();
    let mut out: HashMap<&K, Vec<(Position, K::Item)>> = HashMap::new();
    for (position, item) in batch {
        for key in K::lookup_keys(&item) {
            if let Some((key, _)) = registry.hubs.get_key_value(&key) {
                out.entry(key)
                    .or_default()
                    .push((position.clone(), item.clone()));
            }
        }
        for key in &matched {
            if key.matches(&item) {
                out.entry(*key)
                    .or_default()
                    .push((position.clone(), item.clone()));
            }
        }
    }
    for (key, items) in out {
        if let Some(hub) = registry.hubs.get(key).and_then(Weak::upgrade) {
            // No receiver right now is fine (see above).
            let _ = hub.batches.send(Arc::new(items));
        }
    }
}

/// A current query: everything after `start` up to the horizon at the time of the call, which
/// includes every write acknowledged before the call (see [`Watermarks::current_horizon`]).
pub async fn current<F: Feed>(
    feed: F,
    polling: &Polling,
    start: Option<Position>,
    sink: Sink<F::Item>,
    cancel: CancellationToken,
) {
    let horizon = match polling.watermarks.current_horizon().await {
        Ok(horizon) => horizon,
        Err(error) => {
            let _ = sink.send(Err(error.into())).await;
            return;
        }
    };
    let mut last = start;
    read_up_to(
        &feed,
        &mut last,
        horizon,
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
