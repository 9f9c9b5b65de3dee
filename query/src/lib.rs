//! The read journal: live and current queries over the journal and the durable-state store.
//!
//! Where a live query is fed: [`live::Hubs::subscribe`] (one shared tail of the journal per
//! server, dispatching to a hub per tag or slice range, `live.rs`), reading through a [`feed::Feed`] (`feed.rs`), positioned by
//! [`offset::Position`] tokens (`offset.rs`). Queries by persistence id and of persistence ids
//! are in `by_pid.rs`. `docs/READ_JOURNAL.md` explains the guarantees.

mod by_pid;
pub mod change_stream;
mod error;
pub mod feed;
pub mod live;
pub mod metrics;
pub mod offset;

use config::Settings;
use feed::{EventFeed, EventSelector, Feed, StateChange, StateChangeFeed};
use journal::document::EventDocument;
use model::PersistentEvent;
use mongo::Retry;
use mongodb::bson::Document;
use mongodb::{Collection, Database};
use tokio_util::sync::CancellationToken;

pub use error::QueryError;
use live::{Hubs, Polling, Sink};
use offset::{Offset, Position};

/// The read journal's queries. Each method is the producer of one server-streaming call: it
/// writes into `sink` until the query completes, the client leaves, or the server shuts down.
pub struct ReadJournal {
    events: Collection<EventDocument>,
    objects: Collection<Document>,
    /// The journal metadata: persistence ids whose first events were purged.
    metadata: Collection<Document>,
    retry: Retry,
    polling: Polling,
    event_hubs: Hubs<EventSelector, EventFeed>,
    /// `Some` in change-stream mode: feeds live queries by tag and slice range.
    change_streams: Option<change_stream::ChangeStreams>,
    state_hubs: Hubs<String, StateChangeFeed>,
    /// Wakes live queries by persistence id.
    pid_watch: by_pid::PidWatch,
    shutdown: CancellationToken,
}

impl ReadJournal {
    /// `watermarks` gives the horizon queries read up to (see [`mongo::watermark`]).
    pub fn new(
        database: &Database,
        settings: &Settings,
        watermarks: mongo::Watermarks,
        shutdown: CancellationToken,
    ) -> Self {
        let read = &settings.read_journal;
        let polling = Polling {
            watermarks,
            allowed_time_drift: read.allowed_time_drift,
            poll_interval: read.poll_interval,
            batch_size: read.batch_size as usize,
        };
        let names = &settings.mongodb.collections;
        let retry = Retry::new(&settings.mongodb.retry);
        let journal_tail = EventFeed {
            events: database.collection(&names.journal),
            retry: retry.clone(),
            selector: EventSelector::All,
        };
        let state_tail = StateChangeFeed {
            objects: database.collection(&names.durable_state),
            retry: retry.clone(),
            tag: None,
        };
        Self {
            events: database.collection(&names.journal),
            objects: database.collection(&names.durable_state),
            metadata: database.collection(&names.journal_metadata),
            retry: retry.clone(),
            polling: polling.clone(),
            event_hubs: Hubs::new(journal_tail, polling.clone(), shutdown.clone()),
            change_streams: read.use_change_streams.then(|| {
                change_stream::ChangeStreams::new(
                    database.collection(&names.journal),
                    read.change_stream_restart.clone(),
                    polling.clone(),
                    // Half the read pool, so queries and the shared tails always find a
                    // connection.
                    (read.max_pool_size as usize / 2).max(1),
                    read.change_stream_history.as_u64() as usize,
                    shutdown.clone(),
                )
            }),
            state_hubs: Hubs::new(state_tail, polling.clone(), shutdown.clone()),
            pid_watch: by_pid::PidWatch::new(
                database.collection(&names.journal),
                retry.clone(),
                polling,
                shutdown.clone(),
            ),
            shutdown,
        }
    }

    /// How many shared tails poll: one for the journal while it has live tag or slice
    /// subscribers, one for durable state while it has live change subscribers.
    pub fn running_pollers(&self) -> usize {
        self.event_hubs.running()
            + self.state_hubs.running()
            + usize::from(self.pid_watch.is_running())
    }

    /// The change stream of change-stream mode (`None` when polling).
    pub fn change_streams(&self) -> Option<&change_stream::ChangeStreams> {
        self.change_streams.as_ref()
    }

    fn event_feed(&self, selector: EventSelector) -> EventFeed {
        EventFeed {
            events: self.events.clone(),
            retry: self.retry.clone(),
            selector,
        }
    }

    /// Events by tag or slice range after `start`: current ones, then (if `live`) new ones.
    pub async fn events(
        &self,
        selector: EventSelector,
        start: Option<Offset>,
        live: bool,
        sink: Sink<PersistentEvent>,
    ) {
        let feed = self.event_feed(selector.clone());
        if live && let Some(streams) = &self.change_streams {
            streams.subscribe(feed, start, sink).await;
            return;
        }
        let start = start.map(|offset| self.position_to_resume_after(offset));
        if live {
            self.event_hubs.subscribe(selector, feed, start, sink).await;
        } else {
            live::current(feed, &self.polling, start, sink, self.shutdown.clone()).await;
        }
    }

    /// Where position-ordered reading resumes for `offset`. An offset from a change stream is in
    /// commit order, so an event stamped a little before it may have committed after it: such a
    /// resume goes back by the drift (events in that window can come again).
    fn position_to_resume_after(&self, offset: Offset) -> Position {
        match offset.change {
            None => offset.position,
            Some(_) => Position {
                written_at_millis: change_stream::resume_millis(&offset)
                    - self.polling.allowed_time_drift.as_millis() as i64,
                persistence_id: String::new(),
                sequence_nr: 0,
            },
        }
    }

    /// Events `from..=to` of one persistence id, in sequence order.
    pub async fn events_by_persistence_id(
        &self,
        pid: String,
        from: i64,
        to: i64,
        live: bool,
        sink: Sink<PersistentEvent>,
    ) {
        by_pid::events(
            self.events.clone(),
            self.retry.clone(),
            pid,
            from,
            to,
            live.then_some(&self.pid_watch),
            self.polling.clone(),
            sink,
            self.shutdown.clone(),
        )
        .await;
    }

    /// Latest change per durable-state object carrying `tag`, after `start`.
    pub async fn state_changes(
        &self,
        tag: String,
        start: Option<Offset>,
        live: bool,
        sink: Sink<StateChange>,
    ) {
        let start = start.map(|offset| self.position_to_resume_after(offset));
        let feed = StateChangeFeed {
            objects: self.objects.clone(),
            retry: self.retry.clone(),
            tag: Some(tag.clone()),
        };
        if live {
            self.state_hubs.subscribe(tag, feed, start, sink).await;
        } else {
            live::current(feed, &self.polling, start, sink, self.shutdown.clone()).await;
        }
    }

    /// Persistence ids after `after_id` in sorted order, at most `limit`.
    pub async fn current_persistence_ids(&self, after_id: String, limit: u64, sink: Sink<String>) {
        by_pid::persistence_ids(
            self.events.clone_with_type(),
            self.metadata.clone(),
            self.retry.clone(),
            after_id,
            limit,
            i64::MAX,
            sink,
            self.shutdown.clone(),
        )
        .await;
    }

    /// Every persistence id, then new ones as their first event (sequence number 1) is
    /// written; each once.
    pub async fn persistence_ids(&self, sink: Sink<String>) {
        // New ids are read from here on; ids the scan below delivers that were created after it
        // are remembered (few), so they are not delivered again.
        let start = self.polling.horizon_millis();
        let Some(already_delivered) = by_pid::persistence_ids(
            self.events.clone_with_type(),
            self.metadata.clone(),
            self.retry.clone(),
            String::new(),
            u64::MAX,
            start,
            sink.clone(),
            self.shutdown.clone(),
        )
        .await
        else {
            return;
        };
        // New persistence ids: first events, read as a live query reads, up to the horizon.
        let feed = self.event_feed(EventSelector::FirstEvents);
        let batch_size = self.polling.batch_size;
        let mut last = Some(Position {
            written_at_millis: start,
            persistence_id: String::new(),
            sequence_nr: 0,
        });
        loop {
            let horizon = self.polling.horizon_millis();
            let batch = match feed.fetch(last.as_ref(), horizon, batch_size).await {
                Ok(batch) => batch,
                Err(error) => {
                    let _ = sink.send(Err(error)).await;
                    return;
                }
            };
            let complete = batch.len() < batch_size;
            for (position, event) in batch {
                last = Some(position.clone());
                let pid = event.persistence_id.into_string();
                if already_delivered.contains(&pid) {
                    continue;
                }
                if !live::deliver(&sink, &self.shutdown, (position, pid)).await {
                    return;
                }
            }
            if complete {
                // Everything up to the horizon is read: the next poll starts there, whether it
                // found new ids or not.
                last = last.max(Some(live::past(horizon)));
                tokio::select! {
                    () = self.shutdown.cancelled() => return,
                    () = sink.closed() => return,
                    () = tokio::time::sleep(self.polling.poll_interval) => {}
                }
            }
        }
    }
}
