//! Live queries in change-stream mode (`read-journal.use-change-streams`): one MongoDB change
//! stream on the journal per server feeds every live subscriber by tag or slice range, with the
//! latency of a commit rather than of a polling window.
//!
//! The stream restarts from its resume token after an error, backing off between
//! `min-backoff` and `max-backoff` with `random-factor` jitter. When it cannot resume (the
//! resume point left the oplog, or the stream was invalidated) it publishes a gap.
//!
//! A subscriber subscribes to the stream first, then catches up with its own queries over
//! everything visible (no horizon: the stream brings whatever commits after it subscribed), then
//! follows the stream, skipping what the catch-up delivered. On a gap, or when it falls behind
//! the stream's bounded buffer, it goes back to queries from its last position minus the
//! allowed drift (an event stamped earlier may have committed later), skipping what it already
//! delivered, then follows the stream again.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use config::BackoffSettings;
use futures::StreamExt;
use journal::document::EventDocument;
use model::PersistentEvent;
use mongodb::Collection;
use mongodb::bson::doc;
use mongodb::change_stream::event::ResumeToken;
use mongodb::options::FullDocumentType;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::feed::{EventFeed, EventSelector, Feed, event_with_position};
use crate::live::{Polling, Sink};
use crate::offset::Position;

/// Changes a subscriber may be behind the stream before it goes back to queries.
const STREAM_BUFFER: usize = 1024;
/// `MongoDB`'s code for a resume point that left the oplog.
const CHANGE_STREAM_HISTORY_LOST: i32 = 286;

#[derive(Debug, Clone)]
enum Change {
    Event(Arc<(Position, PersistentEvent)>),
    /// Changes may have been lost: subscribers catch up with queries.
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
    restarts: Arc<std::sync::atomic::AtomicU64>,
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
            restarts: Arc::default(),
        }
    }

    /// Whether the shared stream runs (for tests and metrics).
    pub fn is_running(&self) -> bool {
        self.running
            .lock()
            .is_ok_and(|running| running.strong_count() > 0)
    }

    /// How often the stream was restarted after an error.
    pub fn restarts(&self) -> u64 {
        self.restarts.load(std::sync::atomic::Ordering::Relaxed)
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
        tokio::spawn(watch(
            self.events.clone(),
            self.backoff.clone(),
            changes.clone(),
            stop.clone(),
            self.restarts.clone(),
        ));
        let shared = Arc::new(SharedStream { changes, stop });
        *running = Arc::downgrade(&shared);
        shared
    }

    /// A live subscription fed by the change stream, from `start` (exclusive).
    pub async fn subscribe(
        &self,
        feed: EventFeed,
        start: Option<Position>,
        sink: Sink<PersistentEvent>,
    ) {
        let shared = self.shared();
        let drift = self.polling.allowed_time_drift.as_millis() as i64;
        let mut delivered = Delivered::new(2 * drift);
        // Where the next catch-up starts: back by the drift from the last position, since in
        // commit order an event stamped a little before it can commit after it. What this
        // connection delivered is skipped; from a client's offset, events written within the
        // drift before it can come again (clients de-duplicate by pid and sequence number).
        let back_by_drift = true;
        let mut resume_from = start;
        'catch_up: loop {
            let mut changes = shared.changes.subscribe();
            let mut after = resume_from.clone().map(|position| {
                if back_by_drift {
                    Position {
                        written_at_millis: position.written_at_millis.saturating_sub(drift),
                        persistence_id: String::new(),
                        sequence_nr: 0,
                    }
                } else {
                    position
                }
            });
            loop {
                let batch = match feed
                    .fetch(after.as_ref(), i64::MAX, self.polling.batch_size)
                    .await
                {
                    Ok(batch) => batch,
                    Err(error) => {
                        let _ = sink.send(Err(error)).await;
                        return;
                    }
                };
                let complete = batch.len() < self.polling.batch_size;
                after = batch.last().map(|(position, _)| position.clone()).or(after);
                for item in batch {
                    if !self
                        .deliver(&sink, &mut delivered, &mut resume_from, item)
                        .await
                    {
                        return;
                    }
                }
                if complete {
                    break;
                }
            }
            loop {
                let received = tokio::select! {
                    () = self.shutdown.cancelled() => return,
                    () = sink.closed() => return,
                    received = changes.recv() => received,
                };
                match received {
                    Ok(Change::Event(change)) => {
                        if !matches(&feed.selector, &change.1) {
                            continue;
                        }
                        if !self
                            .deliver(&sink, &mut delivered, &mut resume_from, (*change).clone())
                            .await
                        {
                            return;
                        }
                    }
                    Ok(Change::Gap) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        tracing::debug!("change-stream subscriber falls back to queries");
                        continue 'catch_up;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        }
    }

    /// Sends one event unless it was delivered already; false when the subscription is over.
    async fn deliver(
        &self,
        sink: &Sink<PersistentEvent>,
        delivered: &mut Delivered,
        resume_from: &mut Option<Position>,
        (position, event): (Position, PersistentEvent),
    ) -> bool {
        let id = (
            event.persistence_id.as_str().to_owned(),
            event.sequence_nr.get(),
        );
        if !delivered.insert(id, &position) {
            return true;
        }
        if resume_from.as_ref().is_none_or(|last| &position > last) {
            *resume_from = Some(position.clone());
        }
        tokio::select! {
            () = self.shutdown.cancelled() => false,
            sent = sink.send(Ok((position, event))) => sent.is_ok(),
        }
    }
}

/// What a subscriber delivered lately, by (pid, seqNr): enough to skip repeats within the window
/// where the catch-up and the stream overlap. Entries older than the window are dropped.
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

fn matches(selector: &EventSelector, event: &PersistentEvent) -> bool {
    match selector {
        EventSelector::Tag(tag) => event.tags.iter().any(|candidate| candidate.as_str() == tag),
        EventSelector::Slices { min, max } => (*min..=*max).contains(&event.persistence_id.slice()),
    }
}

/// The shared change stream: inserts and re-stamps (updates of `writtenAt`) of live events.
async fn watch(
    events: Collection<EventDocument>,
    backoff: BackoffSettings,
    changes: broadcast::Sender<Change>,
    stop: CancellationToken,
    restarts: Arc<std::sync::atomic::AtomicU64>,
) {
    let mut resume: Option<ResumeToken> = None;
    let mut pause = backoff.min_backoff;
    loop {
        let pipeline =
            [doc! { "$match": { "operationType": { "$in": ["insert", "update", "replace"] } } }];
        let opened = events
            .watch()
            .pipeline(pipeline)
            .full_document(FullDocumentType::UpdateLookup)
            .resume_after(resume.clone())
            .await;
        match opened {
            Ok(mut stream) => loop {
                let next = tokio::select! {
                    () = stop.cancelled() => return,
                    next = stream.next() => next,
                };
                match next {
                    Some(Ok(change)) => {
                        pause = backoff.min_backoff;
                        resume = stream.resume_token();
                        let Some(document) = change.full_document else {
                            continue;
                        };
                        if document.deleted_at.is_some() {
                            continue;
                        }
                        match event_with_position(document) {
                            Ok(item) => {
                                let _ = changes.send(Change::Event(Arc::new(item)));
                            }
                            Err(error) => {
                                tracing::error!(%error, "change stream: corrupt journal document")
                            }
                        }
                    }
                    Some(Err(error)) => {
                        tracing::warn!(%error, "change stream failed; restarting");
                        if mongo::error_codes(&error).contains(&CHANGE_STREAM_HISTORY_LOST) {
                            resume = None;
                            let _ = changes.send(Change::Gap);
                        }
                        break;
                    }
                    None => {
                        tracing::warn!("change stream ended (invalidated); restarting");
                        resume = None;
                        let _ = changes.send(Change::Gap);
                        break;
                    }
                }
            },
            Err(error) => {
                tracing::warn!(%error, "cannot open the change stream; retrying");
                if resume.is_some() {
                    // The resume point may be gone: start afresh, and let subscribers catch up.
                    resume = None;
                    let _ = changes.send(Change::Gap);
                }
            }
        }
        restarts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let jittered = jitter(pause, backoff.random_factor);
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(jittered) => {}
        }
        pause = (pause * 2).min(backoff.max_backoff);
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
}
