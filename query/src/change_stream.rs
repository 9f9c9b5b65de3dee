//! Live queries in change-stream mode (`read-journal.use-change-streams`): one MongoDB change
//! stream on the journal per server feeds every live subscriber by tag or slice range, with the
//! latency of a commit rather than of a polling window.
//!
//! The shared stream restarts from its resume token (kept from the moment it opens) after an
//! error, backing off between `min-backoff` and `max-backoff` with `random-factor` jitter.
//! Whenever it opens without a resume point (at the start, or when the resume point left the
//! oplog or the stream was invalidated) it publishes a gap.
//!
//! Events arrive in commit order, so each envelope's offset carries the change's resume token.
//! A subscriber gets to the shared stream in three steps:
//!
//! 1. From the start or a position offset: queries in position order up to the safe horizon
//!    (`now - allowed-time-drift`), exactly as in polling mode.
//! 2. A private change stream: from the horizon minus the drift (skipping events at or before
//!    the horizon, which step 1 delivered), or from the offset's resume token. It runs until it
//!    reaches the first change the shared stream gave this subscriber.
//! 3. The shared stream, skipping what step 2 already delivered.
//!
//! After a gap, or when the subscriber falls more than the shared buffer behind, it returns to
//! step 2 from its last resume token. So a resume is exact. Only when the oplog no longer holds
//! the resume point does it fall back to position queries from the last position minus the
//! drift, where events of that window can come again.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use config::BackoffSettings;
use journal::document::EventDocument;
use model::PersistentEvent;
use mongodb::Collection;
use mongodb::bson::{Bson, Document, Timestamp, doc, from_document, to_bson};
use mongodb::change_stream::ChangeStream;
use mongodb::change_stream::event::{ChangeStreamEvent, OperationType, ResumeToken};
use mongodb::options::FullDocumentType;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::error::QueryError;
use crate::feed::{EventFeed, Feed, event_with_position};
use crate::live::{Polling, Sink};
use crate::metrics;
use crate::offset::{Offset, Position};

/// Changes a subscriber may be behind the shared stream before it reads a private one.
const STREAM_BUFFER: usize = 1024;
/// The shared stream keeps the changes of the last `2 x allowed-time-drift` plus this, so a
/// subscriber that joins (or rejoins after a gap or after falling behind) starts from them
/// rather than from a private change stream.
const HISTORY_EXTRA: Duration = Duration::from_secs(10);
/// A private stream's wait for new changes before it reports that it has caught up.
const PRIVATE_AWAIT: Duration = Duration::from_millis(100);
/// How long a subscriber waits for the shared stream to open before it reads a private one.
const OPEN_WAIT: Duration = Duration::from_secs(10);
/// MongoDB's code for a resume point that left the oplog.
const CHANGE_STREAM_HISTORY_LOST: i32 = 286;
/// Codes for a resume point a stream cannot be opened from: it left the oplog (286,
/// ChangeStreamHistoryLost; 136, CappedPositionLost), or it is not one of this collection's
/// (260, InvalidResumeToken; 280, ChangeStreamFatalError).
const RESUME_POINT_LOST: [i32; 4] = [CHANGE_STREAM_HISTORY_LOST, 136, 260, 280];

/// A cluster time as (seconds, increment), ordered like MongoDB's timestamps.
pub type ClusterTime = (u32, u32);

/// One journal change: the event, its position, the change's resume token (hex) and cluster
/// time.
#[derive(Debug)]
struct Changed {
    position: Position,
    event: PersistentEvent,
    token: String,
    cluster_time: ClusterTime,
    /// An update moving the event forward (a re-stamp of a write acknowledged late), not its
    /// insert.
    restamp: bool,
}

impl Changed {
    /// Roughly the memory it holds.
    fn bytes(&self) -> usize {
        let event = &self.event;
        256 + event.payload.data.len()
            + event
                .metadata
                .as_ref()
                .map_or(0, |metadata| metadata.data.len())
            + self.token.len()
            + 2 * event.persistence_id.as_str().len()
            + event
                .tags
                .iter()
                .map(|tag| tag.as_str().len() + 24)
                .sum::<usize>()
    }
}

/// The shared stream's recent changes, so joining subscribers start from memory.
struct History {
    /// At most this many bytes of recent changes are kept (`read-journal.change-stream-history`);
    /// past it the oldest go first and a subscriber that needs them reads a private stream.
    max_bytes: usize,
    /// Every change with a cluster time at or after this one is in `changes`; `None` while the
    /// stream is not open.
    complete_from: Option<ClusterTime>,
    changes: VecDeque<Arc<Changed>>,
    bytes: usize,
}

/// What a joining subscriber needs from the shared stream.
enum Need {
    /// Every change at or after this cluster time.
    Since(ClusterTime),
    /// Every change after this resume token.
    After(String),
}

impl History {
    /// The changes `need` asks for, or `None` if some may be missing.
    fn since(&self, need: &Need) -> Option<Vec<Arc<Changed>>> {
        let from = self.complete_from?;
        let covered = match need {
            Need::Since(time) => *time >= from,
            Need::After(token) => token_time(token).is_some_and(|time| time >= from),
        };
        if !covered {
            return None;
        }
        Some(
            self.changes
                .iter()
                .filter(|change| match need {
                    Need::Since(time) => change.cluster_time >= *time,
                    Need::After(token) => change.token > *token,
                })
                .cloned()
                .collect(),
        )
    }

    fn push(&mut self, change: Arc<Changed>, keep_since: ClusterTime) {
        self.bytes += change.bytes();
        self.changes.push_back(change);
        while let Some(oldest) = self.changes.front() {
            if oldest.cluster_time >= keep_since && self.bytes <= self.max_bytes {
                break;
            }
            let (seconds, increment) = oldest.cluster_time;
            self.complete_from = Some((seconds, increment.saturating_add(1)));
            self.bytes -= oldest.bytes();
            self.changes.pop_front();
        }
    }

    /// The stream (re)opened without its resume point: only changes from `from` on are known.
    fn restart(&mut self, from: Option<ClusterTime>) {
        self.changes.clear();
        self.bytes = 0;
        self.complete_from = from;
    }
}

/// The state the shared stream's task and its subscribers share.
struct Tail {
    changes: broadcast::Sender<Change>,
    history: Mutex<History>,
    /// True once the stream has opened (the history has a start).
    opened: tokio::sync::watch::Sender<bool>,
}

impl Tail {
    fn history(&self) -> std::sync::MutexGuard<'_, History> {
        match self.history.lock() {
            Ok(history) => history,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Publishes a change: kept in the history, then broadcast, under one lock so a joining
    /// subscriber sees each change either in the history or on its receiver, never both or
    /// neither.
    fn publish(&self, change: Arc<Changed>, keep_since: ClusterTime) {
        let mut history = self.history();
        history.push(Arc::clone(&change), keep_since);
        let _ = self.changes.send(Change::Event(change));
    }

    /// The stream opened without a resume point, complete from `from` on: history restarts
    /// and subscribers hear of a gap.
    fn gap(&self, from: ClusterTime) {
        let mut history = self.history();
        history.restart(Some(from));
        let _ = self.changes.send(Change::Gap);
        drop(history);
        self.opened.send_replace(true);
    }

    /// The changes `need` asks for and a receiver for every later one, or `None` when the
    /// history does not reach back far enough.
    fn join(&self, need: &Need) -> Option<(Vec<Arc<Changed>>, broadcast::Receiver<Change>)> {
        let history = self.history();
        let backlog = history.since(need)?;
        Some((backlog, self.changes.subscribe()))
    }
}

/// The cluster time (seconds, increment) at the start of a resume token (hex `_data`): a
/// KeyString starting with the timestamp type byte `0x82` and the timestamp's seconds and
/// increment, big-endian. `None` for any other shape.
pub fn token_time(hex: &str) -> Option<ClusterTime> {
    let head = hex.get(..18)?;
    if !head.starts_with("82") {
        return None;
    }
    let seconds = u32::from_str_radix(&head[2..10], 16).ok()?;
    let increment = u32::from_str_radix(&head[10..18], 16).ok()?;
    Some((seconds, increment))
}

#[derive(Debug, Clone)]
enum Change {
    Event(Arc<Changed>),
    /// Changes may have been lost: subscribers resume from their own resume token.
    Gap,
}

struct SharedStream {
    tail: Arc<Tail>,
    stop: CancellationToken,
}

impl Drop for SharedStream {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The server's one change stream on the journal, started with the first live subscriber and
/// stopped after the last.
pub struct ChangeStreams {
    events: Collection<EventDocument>,
    backoff: BackoffSettings,
    polling: Polling,
    shutdown: CancellationToken,
    running: Mutex<Weak<SharedStream>>,
    private_streams: Arc<tokio::sync::Semaphore>,
    history_bytes: usize,
}

impl ChangeStreams {
    /// `private_streams`: private change streams open at once (more subscribers catching up
    /// wait), so they hold at most that many of the read pool's connections.
    pub fn new(
        events: Collection<EventDocument>,
        backoff: BackoffSettings,
        polling: Polling,
        private_streams: usize,
        history_bytes: usize,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            events,
            backoff,
            polling,
            shutdown,
            running: Mutex::new(Weak::new()),
            private_streams: Arc::new(tokio::sync::Semaphore::new(private_streams)),
            history_bytes,
        }
    }

    /// Whether the shared stream runs (for tests and metrics).
    pub fn is_running(&self) -> bool {
        self.running
            .lock()
            .is_ok_and(|running| running.strong_count() > 0)
    }

    fn shared(&self) -> Arc<SharedStream> {
        let mut running = match self.running.lock() {
            Ok(running) => running,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(shared) = running.upgrade() {
            return shared;
        }
        let (changes, _) = broadcast::channel(STREAM_BUFFER);
        let tail = Arc::new(Tail {
            changes,
            history: Mutex::new(History {
                max_bytes: self.history_bytes,
                complete_from: None,
                changes: VecDeque::new(),
                bytes: 0,
            }),
            opened: tokio::sync::watch::Sender::new(false),
        });
        let stop = self.shutdown.child_token();
        tokio::spawn(watch_shared(
            self.events.clone(),
            self.backoff.clone(),
            self.history_span(),
            Arc::clone(&tail),
            stop.clone(),
        ));
        let shared = Arc::new(SharedStream { tail, stop });
        *running = Arc::downgrade(&shared);
        shared
    }

    /// A live subscription from `start` (exclusive), until the client leaves or the server
    /// shuts down.
    pub async fn subscribe(
        &self,
        feed: EventFeed,
        start: Option<Offset>,
        sink: Sink<PersistentEvent>,
    ) {
        let shared = self.shared();
        // From a client's change offset, what the earlier connection passed over is not known.
        let late = if start.as_ref().is_some_and(|start| start.change.is_some()) {
            LateInserts::Unknown
        } else {
            LateInserts::Known(HashSet::new())
        };
        let mut subscriber = Subscriber {
            feed,
            sink,
            cancel: self.shutdown.clone(),
            last: start,
            seen: None,
            skip: None,
            delivered: Delivered::new(2 * self.drift_millis()),
            late,
            late_since: 0,
        };
        loop {
            subscriber.settle_seen();
            let need = match subscriber
                .last
                .as_ref()
                .and_then(|last| last.change.clone())
            {
                Some(token) => Need::After(token),
                None => {
                    let horizon = self.polling.horizon_millis();
                    let after = subscriber.last.as_ref().map(|last| last.position.clone());
                    // An insert that committed before the queries ran is theirs to deliver;
                    // one committed later may be a late write they passed over. Commit times
                    // are MongoDB's clock in seconds: allow one second and half the drift
                    // (the skew the drift leaves room for).
                    subscriber.late_since = now_seconds().saturating_sub(
                        1 + u32::try_from(self.drift_millis() / 2000 + 1).unwrap_or(u32::MAX),
                    );
                    if !subscriber.query(horizon, self.polling.batch_size).await {
                        return;
                    }
                    // Cluster time counts seconds; a second earlier is safe (what the queries
                    // delivered is skipped, and repeats are dropped).
                    let millis = horizon - self.drift_millis();
                    let seconds = u32::try_from(millis.div_euclid(1000) - 1).unwrap_or(0);
                    // From here on, changes the queries delivered are passed over, whatever
                    // path brings them (the backlog, a private stream, the shared stream
                    // replaying the past after it opened afresh).
                    subscriber.skip = Some((horizon, after));
                    Need::Since((seconds, 0))
                }
            };
            // Step 2: from the shared stream's recent changes when they reach back far enough,
            // else from a private change stream.
            if !self.wait_until_open(&shared.tail, &subscriber).await {
                return;
            }
            let Some((backlog, mut changes)) = shared.tail.join(&need) else {
                let mut changes = shared.tail.changes.subscribe();
                let caught_up = match self.private(&mut subscriber, need, &mut changes).await {
                    Step::Over => return,
                    Step::Again => continue,
                    Step::Done(pending) => pending,
                };
                for change in caught_up {
                    if !subscriber.offer(&change).await {
                        return;
                    }
                }
                if !self.follow_shared(&mut subscriber, &mut changes).await {
                    return;
                }
                continue;
            };
            for change in backlog {
                if !subscriber.offer(&change).await {
                    return;
                }
            }
            // Step 3.
            if !self.follow_shared(&mut subscriber, &mut changes).await {
                return;
            }
        }
    }

    /// Waits until the shared stream has opened (so its history says what it holds), at most
    /// [`OPEN_WAIT`]; false when the subscription is over.
    async fn wait_until_open(&self, tail: &Tail, subscriber: &Subscriber) -> bool {
        let mut opened = tail.opened.subscribe();
        tokio::select! {
            () = self.shutdown.cancelled() => false,
            () = subscriber.sink.closed() => false,
            _ = tokio::time::timeout(OPEN_WAIT, opened.wait_for(|opened| *opened)) => true,
        }
    }

    /// Step 3: the shared stream, until a gap or falling behind (true: rejoin) or the end of
    /// the subscription (false).
    async fn follow_shared(
        &self,
        subscriber: &mut Subscriber,
        changes: &mut broadcast::Receiver<Change>,
    ) -> bool {
        loop {
            let received = tokio::select! {
                () = self.shutdown.cancelled() => return false,
                () = subscriber.sink.closed() => return false,
                received = changes.recv() => received,
            };
            match received {
                Ok(Change::Event(change)) => {
                    if !subscriber.offer(&change).await {
                        return false;
                    }
                }
                Ok(Change::Gap) | Err(broadcast::error::RecvError::Lagged(_)) => {
                    metrics::CHANGE_STREAM_FALLBACKS.inc();
                    tracing::debug!("change-stream subscriber rejoins from its own resume token");
                    return true;
                }
                Err(broadcast::error::RecvError::Closed) => return false,
            }
        }
    }

    /// How far back the shared stream keeps changes: a joining subscriber reads from
    /// `horizon - drift - 1 s`, with `horizon = now - drift`.
    fn history_span(&self) -> Duration {
        2 * self.polling.allowed_time_drift + HISTORY_EXTRA
    }

    fn drift_millis(&self) -> i64 {
        self.polling.allowed_time_drift.as_millis() as i64
    }

    /// Step 2: a private change stream from `need` until it reaches what the shared stream
    /// sends.
    async fn private(
        &self,
        subscriber: &mut Subscriber,
        need: Need,
        changes: &mut broadcast::Receiver<Change>,
    ) -> Step {
        let (resume_after, start_at) = match need {
            Need::After(token) => match resume_token(&token) {
                Some(token) => (Some(token), None),
                None => return subscriber.fall_back(self.drift_millis()),
            },
            Need::Since((time, increment)) => (None, Some(Timestamp { time, increment })),
        };
        let resuming = resume_after.is_some();
        // Bounded: subscribers catching up never hold more than a few connections.
        let permit = tokio::select! {
            () = self.shutdown.cancelled() => return Step::Over,
            () = subscriber.sink.closed() => return Step::Over,
            permit = Arc::clone(&self.private_streams).acquire_owned() => permit,
        };
        let Ok(permit) = permit else {
            return Step::Over;
        };
        metrics::PRIVATE_CHANGE_STREAMS.inc();
        let watch = self
            .events
            .watch()
            .pipeline(pipeline())
            .full_document(FullDocumentType::UpdateLookup)
            .max_await_time(PRIVATE_AWAIT)
            .resume_after(resume_after);
        let opened = match start_at {
            Some(time) => watch.start_at_operation_time(time).await,
            None => watch.await,
        };
        let private = match opened {
            Ok(stream) => stream,
            // The resume point left the oplog, or belongs to a dropped or renamed collection.
            Err(error) if resuming => {
                tracing::warn!(error = %mongo::describe_chain(&error), "cannot resume the change stream; catching up with queries");
                return subscriber.fall_back(self.drift_millis());
            }
            Err(error) => {
                let error = QueryError::from(mongo::MongoError::new(
                    "open change stream",
                    false,
                    &[],
                    error,
                ));
                let _ = subscriber.sink.send(Err(error)).await;
                return Step::Over;
            }
        };
        // The private stream is read by a task of its own, so waiting on it here can be given
        // up at any time without dropping a driver call half-way.
        let (private_sender, mut private_changes) = mpsc::channel(PRIVATE_BUFFER);
        let reader = AbortOnDrop(tokio::spawn(async move {
            read_private(private, private_sender).await;
            drop(permit);
        }));
        // Shared changes seen while the private stream catches up, at most STREAM_BUFFER: a
        // subscriber further behind stops listening to the shared stream, follows its private
        // one until it has caught up, and then starts step 2 again from there.
        let mut pending: VecDeque<Arc<Changed>> = VecDeque::new();
        let mut listening = true;
        loop {
            let private_change = tokio::select! {
                () = self.shutdown.cancelled() => return Step::Over,
                () = subscriber.sink.closed() => return Step::Over,
                received = changes.recv(), if listening => {
                    match received {
                        Ok(Change::Event(change)) if pending.len() < STREAM_BUFFER => {
                            pending.push_back(change)
                        }
                        Ok(Change::Event(_)) | Err(broadcast::error::RecvError::Lagged(_)) => {
                            tracing::debug!(
                                "change-stream subscriber past the shared buffer; catching up on its own"
                            );
                            pending.clear();
                            listening = false;
                        }
                        // The shared stream may have missed changes after the ones pending:
                        // start step 2 again, from what this subscriber has delivered.
                        Ok(Change::Gap) => {
                            tracing::debug!("gap in the shared change stream; the subscriber starts step 2 again");
                            return Step::Again;
                        }
                        Err(broadcast::error::RecvError::Closed) => return Step::Over,
                    }
                    continue;
                }
                private_change = private_changes.recv() => private_change,
            };
            match private_change {
                Some(Private::Change(change)) => {
                    if !subscriber.offer(&change).await {
                        return Step::Over;
                    }
                    if pending
                        .front()
                        .is_some_and(|first| first.token <= change.token)
                    {
                        return Step::Done(pending.into_iter().collect());
                    }
                }
                // Nothing more right now: everything up to `seen` went through the private
                // stream, and the shared one brings what comes after.
                Some(Private::CaughtUp(seen)) => {
                    subscriber.seen_through(seen);
                    drop(reader);
                    if !listening {
                        return Step::Again;
                    }
                    return Step::Done(pending.into_iter().collect());
                }
                Some(Private::HistoryLost) | Some(Private::Ended) | None => {
                    return subscriber.fall_back(self.drift_millis());
                }
                Some(Private::Failed) => {
                    tokio::time::sleep(self.backoff.min_backoff).await;
                    return Step::Again;
                }
            }
        }
    }
}

/// Changes waiting between a subscriber's private stream reader and the subscriber.
const PRIVATE_BUFFER: usize = 64;

enum Private {
    Change(Arc<Changed>),
    /// No change waits right now; the stream has seen everything up to this resume token.
    CaughtUp(String),
    HistoryLost,
    /// Invalidated (collection dropped or renamed): its resume tokens are dead.
    Ended,
    Failed,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn read_private(
    mut stream: ChangeStream<ChangeStreamEvent<EventDocument>>,
    sender: mpsc::Sender<Private>,
) {
    loop {
        let message = match stream.next_if_any().await {
            Ok(Some(change)) => match changed(change) {
                Some(change) => Private::Change(Arc::new(change)),
                None => continue,
            },
            Ok(None) if !stream.is_alive() => Private::Ended,
            Ok(None) => match stream.resume_token().as_ref().and_then(token_hex) {
                Some(seen) => Private::CaughtUp(seen),
                None => continue,
            },
            Err(error) if mongo::error_codes(&error).contains(&CHANGE_STREAM_HISTORY_LOST) => {
                tracing::warn!("resume point left the oplog; catching up with queries");
                Private::HistoryLost
            }
            Err(error) => {
                tracing::warn!(error = %mongo::describe_chain(&error), "private change stream failed; resuming");
                Private::Failed
            }
        };
        let last = !matches!(message, Private::Change(_));
        if sender.send(message).await.is_err() || last {
            return;
        }
    }
}

/// Whether a change was already delivered by the step 1 queries: stamped at or before their
/// horizon, or at or before the position they started after.
fn skipped(skip: &Option<(i64, Option<Position>)>, change: &Changed) -> bool {
    skip.as_ref().is_some_and(|(horizon, after)| {
        change.position.written_at_millis <= *horizon
            || after
                .as_ref()
                .is_some_and(|after| change.position <= *after)
    })
}

enum Step {
    Over,
    Again,
    Done(Vec<Arc<Changed>>),
}

struct Subscriber {
    feed: EventFeed,
    sink: Sink<PersistentEvent>,
    cancel: CancellationToken,
    last: Option<Offset>,
    /// The latest change passed over (not for this subscriber) since `last`: folded into `last`
    /// when needed, so following the shared stream costs no copy per change.
    seen: Option<Arc<Changed>>,
    /// What the step 1 queries delivered: changes stamped at or before this horizon, or at or
    /// before the position they started after, are passed over.
    skip: Option<(i64, Option<Position>)>,
    delivered: Delivered,
    late: LateInserts,
    /// Inserts passed over that committed at or after this (seconds) may be late writes the
    /// step 1 queries could not see.
    late_since: u32,
}

/// Which re-stamps a subscriber delivers. A re-stamp (an update moving a late write's events
/// forward) is for subscribers that passed over the event's insert: one stamped at or before
/// the step 1 horizon, which committed after the queries ran. Every other insert this
/// subscriber's streams brought was delivered, and so was every insert before them (by the
/// queries), so its re-stamp would be a repeat. Known only for what this subscription saw
/// from its start: one resuming from a client's change offset delivers every re-stamp.
enum LateInserts {
    /// Matching inserts passed over, by (pid, seqNr), until their re-stamp comes.
    Known(HashSet<(String, i64)>),
    /// Deliver every re-stamp (repeats within the drift window are still dropped).
    Unknown,
}

/// Passed-over inserts remembered at most (they come from the second or two around the step 1
/// queries); past it a subscriber delivers every re-stamp.
const LATE_INSERTS: usize = 1024;

impl LateInserts {
    fn passed_over(&mut self, id: (String, i64)) {
        if let Self::Known(ids) = self {
            ids.insert(id);
            if ids.len() > LATE_INSERTS {
                tracing::debug!(
                    "more than {LATE_INSERTS} late inserts passed over; delivering every re-stamp"
                );
                *self = Self::Unknown;
            }
        }
    }

    /// Whether the re-stamp of `id` goes to the subscriber (at most once when known).
    fn deliver_restamp(&mut self, id: &(String, i64)) -> bool {
        match self {
            Self::Known(ids) => ids.remove(id),
            Self::Unknown => true,
        }
    }
}

impl Subscriber {
    /// Step 1: position-ordered queries after `last` up to `horizon`; false when the
    /// subscription is over.
    async fn query(&mut self, horizon: i64, batch_size: usize) -> bool {
        let mut after = self.last.as_ref().map(|last| last.position.clone());
        loop {
            let batch = match self.feed.fetch(after.as_ref(), horizon, batch_size).await {
                Ok(batch) => batch,
                Err(error) => {
                    let _ = self.sink.send(Err(error)).await;
                    return false;
                }
            };
            let complete = batch.len() < batch_size;
            for (position, event) in batch {
                after = Some(position.clone());
                if !self.send(Offset::from(position), event).await {
                    return false;
                }
            }
            if complete {
                return true;
            }
        }
    }

    /// Delivers a change for this subscriber's selector unless it already went out.
    async fn offer(&mut self, change: &Arc<Changed>) -> bool {
        let newest = match &self.seen {
            Some(seen) => Some(&seen.token),
            None => self.last.as_ref().and_then(|last| last.change.as_ref()),
        };
        if newest.is_some_and(|newest| &change.token <= newest) {
            return true;
        }
        if !self.feed.selector.matches(&change.event) || self.delivered_already(change) {
            self.seen = Some(Arc::clone(change));
            return true;
        }
        self.seen = None;
        let offset = Offset {
            position: change.position.clone(),
            change: Some(change.token.clone()),
        };
        self.send(offset, change.event.clone()).await
    }

    /// Whether a matching change went out before: an insert the step 1 queries delivered (one
    /// that may be a late write they could not see is remembered), or a re-stamp of an insert
    /// this subscriber did not pass over.
    fn delivered_already(&mut self, change: &Changed) -> bool {
        let id = || {
            let event = &change.event;
            (
                event.persistence_id.as_str().to_owned(),
                event.sequence_nr.get(),
            )
        };
        if change.restamp {
            return !self.late.deliver_restamp(&id());
        }
        if !skipped(&self.skip, change) {
            return false;
        }
        if change.cluster_time.0 >= self.late_since {
            self.late.passed_over(id());
        }
        true
    }

    /// Folds the latest change passed over into `last`.
    fn settle_seen(&mut self) {
        if let Some(seen) = self.seen.take() {
            self.last = Some(Offset {
                position: seen.position.clone(),
                change: Some(seen.token.clone()),
            });
        }
    }

    async fn send(&mut self, offset: Offset, event: PersistentEvent) -> bool {
        self.seen = None;
        let id = (
            event.persistence_id.as_str().to_owned(),
            event.sequence_nr.get(),
        );
        if !self.delivered.insert(id, &offset.position) {
            self.last = Some(offset);
            return true;
        }
        self.last = Some(offset.clone());
        tokio::select! {
            () = self.cancel.cancelled() => false,
            sent = self.sink.send(Ok(Box::new((offset, event)))) => sent.is_ok(),
        }
    }

    /// The private stream saw everything up to the resume token `seen`: shared changes up to it
    /// are not offered again.
    fn seen_through(&mut self, seen: String) {
        self.settle_seen();
        match &mut self.last {
            Some(last) if last.change.as_ref().is_none_or(|change| *change < seen) => {
                last.change = Some(seen)
            }
            Some(_) => {}
            // Nothing delivered yet: a later fallback queries from the start, which is right.
            None => {
                let start = Position {
                    written_at_millis: 0,
                    persistence_id: String::new(),
                    sequence_nr: 0,
                };
                self.last = Some(Offset {
                    position: start,
                    change: Some(seen),
                });
            }
        }
    }

    /// The resume point is gone: position queries from the last position minus the drift, then
    /// a private stream from there. Events of that window this connection delivered are skipped;
    /// from a client's offset they can come again.
    fn fall_back(&mut self, drift_millis: i64) -> Step {
        self.settle_seen();
        self.last = self.last.take().map(|last| {
            Offset::from(Position {
                written_at_millis: resume_millis(&last).saturating_sub(drift_millis),
                persistence_id: String::new(),
                sequence_nr: 0,
            })
        });
        Step::Again
    }
}

/// Where position-ordered reading resumes for a change offset, before going back by the drift:
/// its position, or its change's cluster time if earlier (a re-stamped event's position lies
/// ahead of when it committed, and events committed after it may be stamped before it).
pub fn resume_millis(offset: &Offset) -> i64 {
    let committed = offset
        .change
        .as_deref()
        .and_then(token_time)
        .map(|(seconds, _)| i64::from(seconds) * 1000);
    committed.map_or(offset.position.written_at_millis, |committed| {
        committed.min(offset.position.written_at_millis)
    })
}

/// What a subscriber delivered lately, by (pid, seqNr): skips repeats where a fallback re-reads
/// the drift window. Entries older than the window are dropped.
struct Delivered {
    window_millis: i64,
    ids: HashSet<(String, i64)>,
    order: VecDeque<(i64, (String, i64))>,
    newest_millis: i64,
}

impl Delivered {
    fn new(window_millis: i64) -> Self {
        Self {
            window_millis,
            ids: HashSet::new(),
            order: VecDeque::new(),
            newest_millis: i64::MIN,
        }
    }

    /// False if `id` was delivered within the window.
    fn insert(&mut self, id: (String, i64), position: &Position) -> bool {
        if self.ids.contains(&id) {
            return false;
        }
        self.newest_millis = self.newest_millis.max(position.written_at_millis);
        self.ids.insert(id.clone());
        self.order.push_back((position.written_at_millis, id));
        while let Some((written_at, _)) = self.order.front() {
            if *written_at >= self.newest_millis.saturating_sub(self.window_millis) {
                break;
            }
            if let Some((_, old)) = self.order.pop_front() {
                self.ids.remove(&old);
            }
        }
        true
    }
}

/// Inserts and re-stamps (updates of `writtenAt`) of journal events.
fn pipeline() -> [Document; 1] {
    [doc! { "$match": { "operationType": { "$in": ["insert", "update", "replace"] } } }]
}

fn token_hex(token: &ResumeToken) -> Option<String> {
    match to_bson(token).ok()? {
        Bson::Document(document) => document.get_str("_data").ok().map(str::to_owned),
        _ => None,
    }
}

fn resume_token(hex: &str) -> Option<ResumeToken> {
    from_document(doc! { "_data": hex }).ok()
}

/// A live event's change, or `None` for a deleted event.
fn changed(change: ChangeStreamEvent<EventDocument>) -> Option<Changed> {
    let restamp = !matches!(change.operation_type, OperationType::Insert);
    let token = token_hex(&change.id)?;
    let cluster_time = change
        .cluster_time
        .map(|time| (time.time, time.increment))
        .or_else(|| token_time(&token))?;
    let document = change.full_document?;
    if document.deleted_at.is_some() {
        return None;
    }
    match event_with_position(document) {
        Ok((position, event)) => Some(Changed {
            position,
            event,
            token,
            cluster_time,
            restamp,
        }),
        Err(error) => {
            tracing::error!(error = %mongo::describe_chain(&error), "change stream: corrupt journal document");
            None
        }
    }
}

/// The shared change stream.
///
/// It always holds a resume point from the moment it opens (the post-batch resume token of
/// each batch, events or not), so a restart after an error resumes exactly. When it has to
/// open without one (at the start, or after its resume point was lost) it opens `span` in the
/// past (or at "now" if the oplog does not reach back that far), restarts its history there and
/// publishes a gap: subscribers that followed it rejoin from their own resume tokens.
async fn watch_shared(
    events: Collection<EventDocument>,
    backoff: BackoffSettings,
    span: Duration,
    tail: Arc<Tail>,
    stop: CancellationToken,
) {
    let mut resume: Option<ResumeToken> = None;
    let mut pause = backoff.min_backoff;
    // Whether a fresh open starts `span` in the past (false after the oplog did not reach).
    let mut look_back = true;
    loop {
        let fresh = resume.is_none();
        let start = (fresh && look_back).then(|| {
            let seconds = now_seconds().saturating_sub(span.as_secs() as u32);
            Timestamp {
                time: seconds,
                increment: 0,
            }
        });
        let watch = events
            .watch()
            .pipeline(pipeline())
            .full_document(FullDocumentType::UpdateLookup)
            .resume_after(resume.clone());
        let opened = match start {
            Some(start) => watch.start_at_operation_time(start).await,
            None => watch.await,
        };
        match opened {
            Ok(stream) => {
                if fresh {
                    let from = match start {
                        Some(start) => (start.time, start.increment),
                        // Opened at "now": complete from its first resume point on.
                        None => stream
                            .resume_token()
                            .as_ref()
                            .and_then(token_hex)
                            .and_then(|token| token_time(&token))
                            // Strictly after it: a change at that very time may be before it.
                            .map(|(seconds, increment)| (seconds, increment.saturating_add(1)))
                            .unwrap_or((u32::MAX, 0)),
                    };
                    tail.gap(from);
                    look_back = true;
                }
                resume = stream.resume_token().or(resume);
                let keep = span;
                let ended = follow(
                    stream,
                    &tail,
                    keep,
                    &stop,
                    &mut resume,
                    &mut pause,
                    &backoff,
                )
                .await;
                if ended.is_none() {
                    return;
                }
            }
            Err(error) if fresh && look_back => {
                // The oplog may not reach back `span` (a young replica set): open at "now"
                // (and look back again after that open).
                tracing::debug!(error = %mongo::describe_chain(&error), "change stream: cannot open in the past; opening at now");
                look_back = false;
                continue;
            }
            Err(error) => {
                tracing::warn!(error = %mongo::describe_chain(&error), "cannot open the change stream; retrying");
                if resume_point_lost(&error) {
                    // Start afresh (and publish a gap then).
                    resume = None;
                }
            }
        }
        metrics::CHANGE_STREAM_RESTARTS.inc();
        let jittered = jitter(pause, backoff.random_factor);
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(jittered) => {}
        }
        pause = (pause * 2).min(backoff.max_backoff);
    }
}

fn now_seconds() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u32::try_from(elapsed.as_secs()).unwrap_or(u32::MAX)
        })
}

/// The resume point left the oplog, or belongs to a dropped or renamed collection.
fn resume_point_lost(error: &mongodb::error::Error) -> bool {
    mongo::error_codes(error)
        .iter()
        .any(|code| RESUME_POINT_LOST.contains(code))
}

/// Publishes the stream's changes until it fails (`Some`) or `stop` (`None`), keeping
/// `resume` at the stream's latest resume point.
async fn follow(
    mut stream: ChangeStream<ChangeStreamEvent<EventDocument>>,
    tail: &Tail,
    keep: Duration,
    stop: &CancellationToken,
    resume: &mut Option<ResumeToken>,
    pause: &mut Duration,
    backoff: &BackoffSettings,
) -> Option<()> {
    loop {
        let next = tokio::select! {
            () = stop.cancelled() => return None,
            next = stream.next_if_any() => next,
        };
        match next {
            Ok(Some(change)) => {
                *pause = backoff.min_backoff;
                *resume = stream.resume_token().or(resume.take());
                if let Some(change) = changed(change) {
                    metrics::observe_lag(metrics::CHANGE_STREAM, change.position.written_at_millis);
                    let keep_since = (now_seconds().saturating_sub(keep.as_secs() as u32), 0);
                    tail.publish(Arc::new(change), keep_since);
                }
            }
            // An empty batch: the stream has seen the oplog up to its post-batch token.
            Ok(None) if stream.is_alive() => {
                *pause = backoff.min_backoff;
                *resume = stream.resume_token().or(resume.take());
            }
            Ok(None) => {
                tracing::warn!("change stream ended (invalidated); restarting");
                *resume = None;
                return Some(());
            }
            Err(error) => {
                tracing::warn!(error = %mongo::describe_chain(&error), "change stream failed; restarting");
                if resume_point_lost(&error) {
                    *resume = None;
                }
                return Some(());
            }
        }
    }
}

/// `pause` stretched by a random fraction up to `random_factor`.
fn jitter(pause: Duration, random_factor: f64) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.subsec_nanos());
    let fraction = f64::from(nanos % 1_000_000) / 1_000_000.0;
    pause.mul_f64(1.0 + random_factor * fraction)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(millis: i64) -> Position {
        Position {
            written_at_millis: millis,
            persistence_id: "p".into(),
            sequence_nr: 0,
        }
    }

    #[test]
    fn delivered_skips_repeats_within_the_window_and_forgets_older_ones() {
        let mut delivered = Delivered::new(100);
        assert!(delivered.insert(("a".into(), 1), &at(1_000)));
        assert!(!delivered.insert(("a".into(), 1), &at(1_000)));
        assert!(delivered.insert(("a".into(), 2), &at(1_050)));
        assert!(delivered.insert(("a".into(), 3), &at(1_200)));
        assert_eq!(
            delivered.ids.len(),
            1,
            "entries older than the window are dropped"
        );
    }

    fn change(millis: i64, token: &str) -> Arc<Changed> {
        Arc::new(Changed {
            position: Position {
                written_at_millis: millis,
                persistence_id: "p".into(),
                sequence_nr: millis,
            },
            event: PersistentEvent {
                persistence_id: model::PersistenceId::parse("pid", "p".into()).unwrap(),
                sequence_nr: model::SequenceNr::parse("seqNr", millis).unwrap(),
                payload: model::Payload::default(),
                writer_uuid: String::new(),
                timestamp_millis: 0,
                tags: vec![model::Tag::parse("tag", "t".into()).unwrap()],
                metadata: None,
            },
            token: token.into(),
            cluster_time: token_time(token).unwrap(),
            restamp: false,
        })
    }

    /// A subscriber of tag `t` whose step 1 queries ran up to horizon 1,000 ms at cluster time
    /// `late_since` (seconds), and what it delivers.
    async fn subscriber_after_queries(
        late_since: u32,
    ) -> (
        Subscriber,
        mpsc::Receiver<Result<Box<(Offset, PersistentEvent)>, QueryError>>,
    ) {
        let client = mongodb::Client::with_uri_str("mongodb://127.0.0.1:1")
            .await
            .unwrap();
        let (sink, delivered) = mpsc::channel(8);
        let subscriber = Subscriber {
            feed: EventFeed {
                events: client.database("unused").collection("journal"),
                retry: mongo::Retry::new(&config::RetrySettings::default()),
                selector: crate::feed::EventSelector::Tag("t".into()),
            },
            sink,
            cancel: CancellationToken::new(),
            last: None,
            seen: None,
            skip: Some((1_000, None)),
            delivered: Delivered::new(100),
            late: LateInserts::Known(HashSet::new()),
            late_since,
        };
        (subscriber, delivered)
    }

    /// Changes the step 1 queries delivered (stamped at or before their horizon) are passed over
    /// whatever brings them, also the shared stream after the subscriber joined it (a stream
    /// opened in the past replays them), and still move the subscriber's resume point on.
    #[tokio::test]
    async fn changes_the_queries_delivered_are_passed_over_on_every_path() {
        let (mut subscriber, mut delivered) = subscriber_after_queries(0).await;
        let old = change(900, "8200000001000000012B");
        let new = change(1_100, "8200000002000000012B");
        assert!(subscriber.offer(&old).await);
        assert!(
            delivered.try_recv().is_err(),
            "delivered by the queries already"
        );
        assert_eq!(
            subscriber.seen.as_ref().map(|seen| seen.token.as_str()),
            Some(old.token.as_str())
        );
        assert!(subscriber.offer(&new).await);
        let (offset, event) = *delivered.try_recv().unwrap().unwrap();
        assert_eq!(
            (offset.change.as_deref(), event.sequence_nr.get()),
            (Some(new.token.as_str()), 1_100)
        );
    }

    /// A re-stamp goes only to a subscriber that passed over the event's insert (a late write
    /// the step 1 queries could not see), once; one that delivered the insert does not get it
    /// again, however long after the re-stamp comes.
    #[tokio::test]
    async fn a_restamp_goes_only_to_subscribers_that_passed_over_the_insert() {
        let (mut subscriber, mut delivered) = subscriber_after_queries(2).await;
        let restamp = |sequence_nr: i64, millis: i64, token: &str| {
            let mut change = Arc::into_inner(change(sequence_nr, token)).unwrap();
            change.position.written_at_millis = millis;
            change.restamp = true;
            Arc::new(change)
        };
        // Stamped before the horizon, committed after the queries (cluster time 2 s): late.
        let late = change(900, "8200000002000000012B");
        // Stamped before the horizon, committed long before: the queries delivered it.
        let early = change(950, "8200000001000000022B");
        let on_time = change(1_100, "8200000002000000032B");
        for change in [&early, &late, &on_time] {
            assert!(subscriber.offer(change).await);
        }
        let (_, event) = *delivered.try_recv().unwrap().unwrap();
        assert_eq!(event.sequence_nr.get(), 1_100);
        assert!(delivered.try_recv().is_err());

        // Re-stamps far ahead (past the repeat window), in commit order.
        for change in [
            restamp(950, 90_000, "8200000005000000012B"),
            restamp(1_100, 90_001, "8200000005000000022B"),
            restamp(900, 90_002, "8200000005000000032B"),
            restamp(900, 90_003, "8200000006000000012B"),
        ] {
            assert!(subscriber.offer(&change).await);
        }
        let (offset, event) = *delivered.try_recv().unwrap().unwrap();
        assert_eq!(
            (event.sequence_nr.get(), offset.position.written_at_millis),
            (900, 90_002),
            "the late insert's first re-stamp, and only that"
        );
        assert!(delivered.try_recv().is_err());
    }

    /// A fallback from a change offset goes back from the change's commit (its token's cluster
    /// time) when that is earlier than its position (a re-stamped event lies ahead).
    #[test]
    fn a_fallback_goes_back_from_the_earlier_of_position_and_commit() {
        let restamped = Offset {
            position: at(1_000_000 * 1000),
            change: Some("8200000064000000012B".into()),
        };
        assert_eq!(resume_millis(&restamped), 100 * 1000);
        let plain = Offset {
            position: at(99_500),
            change: Some("8200000064000000012B".into()),
        };
        assert_eq!(resume_millis(&plain), 99_500);
    }

    #[test]
    fn jitter_stays_within_the_random_factor() {
        for _ in 0..100 {
            let stretched = jitter(Duration::from_secs(1), 0.2);
            assert!(
                stretched >= Duration::from_secs(1) && stretched <= Duration::from_millis(1_200)
            );
        }
    }

    #[test]
    fn resume_tokens_round_trip_through_hex() {
        let token = resume_token("8263A1B2C3000000012B").unwrap();
        assert_eq!(token_hex(&token).as_deref(), Some("8263A1B2C3000000012B"));
    }
}
