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
use mongodb::change_stream::event::{ChangeStreamEvent, ResumeToken};
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
/// MongoDB's code for a resume point that left the oplog.
const CHANGE_STREAM_HISTORY_LOST: i32 = 286;
/// Codes for a resume point a stream cannot be opened from: it left the oplog (286,
/// ChangeStreamHistoryLost; 136, CappedPositionLost), or it is not one of this collection's
/// (260, InvalidResumeToken; 280, ChangeStreamFatalError).
const RESUME_POINT_LOST: [i32; 4] = [CHANGE_STREAM_HISTORY_LOST, 136, 260, 280];

/// One journal change: the event, its position, and the change's resume token (hex).
#[derive(Debug)]
struct Changed {
    position: Position,
    event: PersistentEvent,
    token: String,
}

#[derive(Debug, Clone)]
enum Change {
    Event(Arc<Changed>),
    /// Changes may have been lost: subscribers resume from their own resume token.
    Gap,
}

struct SharedStream {
    changes: broadcast::Sender<Change>,
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
}

/// Where a private change stream starts.
enum PrivateStart {
    /// Right after this change.
    After(String),
    /// At this time (ms), skipping events the queries delivered: stamped at or before
    /// `horizon`, or at or before the position the queries started after.
    At {
        millis: i64,
        horizon: i64,
        after: Option<Position>,
    },
}

impl ChangeStreams {
    pub fn new(
        events: Collection<EventDocument>,
        backoff: BackoffSettings,
        polling: Polling,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            events,
            backoff,
            polling,
            shutdown,
            running: Mutex::new(Weak::new()),
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
        let stop = self.shutdown.child_token();
        tokio::spawn(watch_shared(
            self.events.clone(),
            self.backoff.clone(),
            changes.clone(),
            stop.clone(),
        ));
        let shared = Arc::new(SharedStream { changes, stop });
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
        let mut subscriber = Subscriber {
            feed,
            sink,
            cancel: self.shutdown.clone(),
            last: start,
            delivered: Delivered::new(2 * self.drift_millis()),
        };
        loop {
            let mut changes = shared.changes.subscribe();
            let from = match subscriber
                .last
                .as_ref()
                .and_then(|last| last.change.clone())
            {
                Some(token) => PrivateStart::After(token),
                None => {
                    let horizon = self.polling.horizon_millis();
                    let after = subscriber.last.as_ref().map(|last| last.position.clone());
                    if !subscriber.query(horizon, self.polling.batch_size).await {
                        return;
                    }
                    PrivateStart::At {
                        millis: horizon - self.drift_millis(),
                        horizon,
                        after,
                    }
                }
            };
            let caught_up = match self.private(&mut subscriber, from, &mut changes).await {
                Step::Over => return,
                Step::Again => continue,
                Step::Done(pending) => pending,
            };
            // The shared stream, from the change where the private one stopped.
            for change in caught_up {
                if !subscriber.offer(&change).await {
                    return;
                }
            }
            loop {
                let received = tokio::select! {
                    () = self.shutdown.cancelled() => return,
                    () = subscriber.sink.closed() => return,
                    received = changes.recv() => received,
                };
                match received {
                    Ok(Change::Event(change)) => {
                        if !subscriber.offer(&change).await {
                            return;
                        }
                    }
                    Ok(Change::Gap) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        metrics::CHANGE_STREAM_FALLBACKS.inc();
                        tracing::debug!(
                            "change-stream subscriber resumes from its own resume token"
                        );
                        break;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        }
    }

    fn drift_millis(&self) -> i64 {
        self.polling.allowed_time_drift.as_millis() as i64
    }

    /// Step 2: a private change stream until it reaches what the shared stream sends.
    async fn private(
        &self,
        subscriber: &mut Subscriber,
        from: PrivateStart,
        changes: &mut broadcast::Receiver<Change>,
    ) -> Step {
        let (resume_after, start_at, skip) = match from {
            PrivateStart::After(token) => match resume_token(&token) {
                Some(token) => (Some(token), None, None),
                None => return subscriber.fall_back(self.drift_millis()),
            },
            PrivateStart::At {
                millis,
                horizon,
                after,
            } => {
                // Cluster time counts seconds; a second earlier is safe (duplicates are skipped).
                let seconds = u32::try_from(millis.div_euclid(1000) - 1).unwrap_or(0);
                (
                    None,
                    Some(Timestamp {
                        time: seconds,
                        increment: 0,
                    }),
                    Some((horizon, after)),
                )
            }
        };
        let watch = self
            .events
            .watch()
            .pipeline(pipeline())
            .full_document(FullDocumentType::UpdateLookup)
            .resume_after(resume_after);
        let opened = match start_at {
            Some(time) => watch.start_at_operation_time(time).await,
            None => watch.await,
        };
        let resuming = skip.is_none();
        let private = match opened {
            Ok(stream) => stream,
            // The resume point left the oplog, or belongs to a dropped or renamed collection.
            Err(error) if resuming => {
                tracing::warn!(%error, "cannot resume the change stream; catching up with queries");
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
        let reader = AbortOnDrop(tokio::spawn(read_private(private, private_sender)));
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
                    let skipped = skip.as_ref().is_some_and(|(horizon, after)| {
                        change.position.written_at_millis <= *horizon
                            || after
                                .as_ref()
                                .is_some_and(|after| change.position <= *after)
                    });
                    if !skipped && !subscriber.offer(&change).await {
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
    Change(Box<Changed>),
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
                Some(change) => Private::Change(Box::new(change)),
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
                tracing::warn!(%error, "private change stream failed; resuming");
                Private::Failed
            }
        };
        let last = !matches!(message, Private::Change(_));
        if sender.send(message).await.is_err() || last {
            return;
        }
    }
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
    delivered: Delivered,
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
    async fn offer(&mut self, change: &Changed) -> bool {
        if self
            .last
            .as_ref()
            .and_then(|last| last.change.as_ref())
            .is_some_and(|last| &change.token <= last)
        {
            return true;
        }
        if !self.feed.selector.matches(&change.event) {
            self.last = Some(Offset {
                position: change.position.clone(),
                change: Some(change.token.clone()),
            });
            return true;
        }
        let offset = Offset {
            position: change.position.clone(),
            change: Some(change.token.clone()),
        };
        self.send(offset, change.event.clone()).await
    }

    async fn send(&mut self, offset: Offset, event: PersistentEvent) -> bool {
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
            sent = self.sink.send(Ok((offset, event))) => sent.is_ok(),
        }
    }

    /// The private stream saw everything up to the resume token `seen`: shared changes up to it
    /// are not offered again.
    fn seen_through(&mut self, seen: String) {
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
        self.last = self.last.take().map(|last| {
            Offset::from(Position {
                written_at_millis: last.position.written_at_millis.saturating_sub(drift_millis),
                persistence_id: String::new(),
                sequence_nr: 0,
            })
        });
        Step::Again
    }
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
    let token = token_hex(&change.id)?;
    let document = change.full_document?;
    if document.deleted_at.is_some() {
        return None;
    }
    match event_with_position(document) {
        Ok((position, event)) => Some(Changed {
            position,
            event,
            token,
        }),
        Err(error) => {
            tracing::error!(%error, "change stream: corrupt journal document");
            None
        }
    }
}

/// The shared change stream.
///
/// It always holds a resume point from the moment it opens (the post-batch resume token of
/// each batch, events or not), so a restart after an error resumes exactly. When it has to
/// open without one (at the start, or after its resume point was lost) it opens at "now" and
/// then publishes a gap: subscribers that followed it, or were about to, read what they may
/// have missed from their own resume tokens.
async fn watch_shared(
    events: Collection<EventDocument>,
    backoff: BackoffSettings,
    changes: broadcast::Sender<Change>,
    stop: CancellationToken,
) {
    let mut resume: Option<ResumeToken> = None;
    let mut pause = backoff.min_backoff;
    loop {
        let fresh = resume.is_none();
        let opened = events
            .watch()
            .pipeline(pipeline())
            .full_document(FullDocumentType::UpdateLookup)
            .resume_after(resume.clone())
            .await;
        match opened {
            Ok(stream) => {
                resume = stream.resume_token().or(resume);
                if fresh {
                    let _ = changes.send(Change::Gap);
                }
                let ended =
                    follow(stream, &changes, &stop, &mut resume, &mut pause, &backoff).await;
                if ended.is_none() {
                    return;
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot open the change stream; retrying");
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
    changes: &broadcast::Sender<Change>,
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
                    let _ = changes.send(Change::Event(Arc::new(change)));
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
                tracing::warn!(%error, "change stream failed; restarting");
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
