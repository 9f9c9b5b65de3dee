//! Projections: a handler run over a live query (`EventsByTag` or `EventsBySlices`), with its
//! offset stored so that a restart resumes where it stopped.
//!
//! Delivery is at least once: the offset is committed after the events before it were handled,
//! every `commit_every` events or `commit_interval`, whichever comes first (and when the
//! projection stops). A projection that dies between handling an event and the next commit
//! handles the events after the last commit again when it restarts. With the offset, the
//! `(persistence_id, sequence_nr)` of the last `dedup_window` events handled are committed, and
//! an event among them is never handed to the handler again, whatever the query delivers.
//!
//! Offsets go to the service's own durable-state store by default ([`DurableStateOffsets`],
//! object `projection-offset|<name>`), so a projection needs nothing but the service; any other
//! [`OffsetStore`] can take its place.
//!
//! ```no_run
//! use eventjournal_client::projection::{Projection, Source};
//! use eventjournal_client::{Client, EventEnvelope};
//!
//! # async fn example(client: Client) -> eventjournal_client::Result<()> {
//! let mut sold = 0_u64;
//! let handle = Projection::new("sales", Source::Tag("cart".into()))
//!     .run(client, move |envelope: EventEnvelope| {
//!         sold += 1;
//!         println!("{} sold so far ({})", sold, envelope.event.persistence_id);
//!         async { Ok(()) }
//!     })
//!     .await?;
//! println!("lag: {:?}", handle.lag());
//! handle.stop().await?;
//! # Ok(())
//! # }
//! ```

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::TryStreamExt as _;
use tokio::sync::watch;

use crate::{Client, Error, EventEnvelope, Offset, Payload, Result};

/// What a projection reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Events with this tag (`EventsByTag`).
    Tag(String),
    /// Events of persistence ids in these slices (`EventsBySlices`).
    Slices {
        /// The first slice.
        min: i32,
        /// The last slice, included.
        max: i32,
    },
}

/// Where a projection resumes: the offset after the last event committed, and the events
/// handled just before it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Committed {
    /// Resume after this.
    pub offset: Offset,
    /// `(persistence_id, sequence_nr)` of the last events handled, oldest first.
    pub recent: Vec<(String, i64)>,
}

/// Stores a projection's [`Committed`] state.
pub trait OffsetStore: Send + Sync + 'static {
    /// The state last saved for `projection`, if any.
    fn load(&self, projection: &str) -> impl Future<Output = Result<Option<Committed>>> + Send;
    /// Saves the state of `projection`.
    fn save(
        &self,
        projection: &str,
        committed: &Committed,
    ) -> impl Future<Output = Result<()>> + Send;
}

/// Offsets in the service's durable-state store: one object per projection,
/// `projection-offset|<name>`, its revision guarding against two instances of one projection
/// (the second one's commit is a [`Error::Conflict`], and it stops).
pub struct DurableStateOffsets {
    client: Client,
    revisions: Mutex<std::collections::HashMap<String, i64>>,
}

impl DurableStateOffsets {
    /// Offsets stored through `client`.
    pub fn new(client: Client) -> Self {
        Self {
            client,
            revisions: Mutex::default(),
        }
    }

    fn object(projection: &str) -> String {
        format!("projection-offset|{projection}")
    }
}

/// `offset\npid\tseq\n...`: the offset, then one handled event per line.
fn encode(committed: &Committed) -> Vec<u8> {
    let mut text = committed.offset.0.clone();
    for (pid, sequence_nr) in &committed.recent {
        text.push('\n');
        text.push_str(&sequence_nr.to_string());
        text.push('\t');
        text.push_str(pid);
    }
    text.into_bytes()
}

fn decode(bytes: &[u8]) -> Result<Committed> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| Error::Configuration("a stored projection offset is not UTF-8".into()))?;
    let mut lines = text.split('\n');
    let offset = Offset(lines.next().unwrap_or_default().to_owned());
    let recent = lines
        .map(|line| {
            let (sequence_nr, pid) = line.split_once('\t').unwrap_or(("", line));
            sequence_nr
                .parse()
                .map(|sequence_nr| (pid.to_owned(), sequence_nr))
                .map_err(|_| {
                    Error::Configuration(format!("a stored projection offset line {line:?}"))
                })
        })
        .collect::<Result<_>>()?;
    Ok(Committed { offset, recent })
}

impl OffsetStore for DurableStateOffsets {
    async fn load(&self, projection: &str) -> Result<Option<Committed>> {
        let stored = self.client.get_object(&Self::object(projection)).await?;
        self.revisions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(projection.to_owned(), stored.revision);
        stored.value.map(|value| decode(&value.data)).transpose()
    }

    async fn save(&self, projection: &str, committed: &Committed) -> Result<()> {
        let revision = self
            .revisions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(projection)
            .copied()
            .unwrap_or(0)
            + 1;
        self.client
            .upsert_object(
                &Self::object(projection),
                revision,
                Payload::new(encode(committed), 0, "ProjectionOffset"),
                "",
            )
            .await?;
        self.revisions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(projection.to_owned(), revision);
        Ok(())
    }
}

/// A projection's settings; [`Projection::run`] starts it.
#[derive(Debug, Clone)]
pub struct Projection {
    name: String,
    source: Source,
    commit_every: usize,
    commit_interval: Duration,
    dedup_window: usize,
}

/// What a running projection reports.
#[derive(Debug, Clone, Default)]
struct Progress {
    handled: u64,
    skipped: u64,
    committed: Offset,
    /// The service's timestamp of the last event handled.
    last_event_millis: i64,
}

/// A running projection: its progress, and the way to stop it.
pub struct ProjectionHandle {
    progress: Arc<Mutex<Progress>>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<()>>,
}

impl ProjectionHandle {
    fn progress(&self) -> Progress {
        self.progress
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// How far behind the projection is: now minus the time the last event it handled was
    /// written (zero before the first event).
    pub fn lag(&self) -> Duration {
        let last = self.progress().last_event_millis;
        if last == 0 {
            return Duration::ZERO;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|now| now.as_millis() as i64)
            .unwrap_or(last);
        Duration::from_millis((now - last).max(0) as u64)
    }

    /// Events handed to the handler since this run started.
    pub fn handled(&self) -> u64 {
        self.progress().handled
    }

    /// Events skipped because they were among the recent ones already handled.
    pub fn skipped(&self) -> u64 {
        self.progress().skipped
    }

    /// The offset last committed.
    pub fn committed(&self) -> Offset {
        self.progress().committed
    }

    /// Whether the projection stopped by itself (a handler or commit error; see
    /// [`ProjectionHandle::stop`] for which).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Stops after the event being handled, commits, and returns how the run ended.
    pub async fn stop(self) -> Result<()> {
        let _ = self.stop.send(true);
        self.task.await.unwrap_or_else(|error| {
            Err(Error::Configuration(format!(
                "the projection task failed: {error}"
            )))
        })
    }

    /// Ends the run at once, without a last commit (as a crash would).
    pub fn abort(self) {
        self.task.abort();
    }
}

impl Projection {
    /// Projection `name` (its offset's key) over `source`: commits every 100 events or
    /// second, remembers the last 10,000 events handled.
    pub fn new(name: impl Into<String>, source: Source) -> Self {
        Self {
            name: name.into(),
            source,
            commit_every: 100,
            commit_interval: Duration::from_secs(1),
            dedup_window: 10_000,
        }
    }

    /// Commits after this many events (at least 1).
    pub fn commit_every(mut self, events: usize) -> Self {
        self.commit_every = events.max(1);
        self
    }

    /// Commits at least this often while events are handled.
    pub fn commit_interval(mut self, interval: Duration) -> Self {
        self.commit_interval = interval;
        self
    }

    /// How many recently handled events are remembered (and committed) to skip a redelivery.
    pub fn dedup_window(mut self, events: usize) -> Self {
        self.dedup_window = events;
        self
    }

    /// Runs the projection with offsets in the service's durable-state store.
    pub async fn run<H, F>(self, client: Client, handler: H) -> Result<ProjectionHandle>
    where
        H: FnMut(EventEnvelope) -> F + Send + 'static,
        F: Future<Output = Result<()>> + Send,
    {
        let offsets = DurableStateOffsets::new(client.clone());
        self.run_with(client, offsets, handler).await
    }

    /// Runs the projection with offsets in `offsets`. Fails at once if the stored offset
    /// cannot be read or the query not opened; afterwards a handler error, a failed commit or
    /// a broken query ends the run (see [`ProjectionHandle::stop`]).
    pub async fn run_with<S, H, F>(
        self,
        client: Client,
        offsets: S,
        mut handler: H,
    ) -> Result<ProjectionHandle>
    where
        S: OffsetStore,
        H: FnMut(EventEnvelope) -> F + Send + 'static,
        F: Future<Output = Result<()>> + Send,
    {
        let committed = offsets.load(&self.name).await?.unwrap_or_default();
        let mut events = match &self.source {
            Source::Tag(tag) => client.events_by_tag(tag, committed.offset.clone()).await?,
            Source::Slices { min, max } => {
                client
                    .events_by_slices(*min, *max, committed.offset.clone(), true)
                    .await?
            }
        };
        let progress = Arc::new(Mutex::new(Progress {
            committed: committed.offset.clone(),
            ..Progress::default()
        }));
        let (stop, mut stopped) = watch::channel(false);
        let reported = progress.clone();
        let task = tokio::spawn(async move {
            let report = |change: &dyn Fn(&mut Progress)| {
                change(
                    &mut reported
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner()),
                );
            };
            let mut recent: VecDeque<(String, i64)> = committed.recent.into_iter().collect();
            let mut seen: HashSet<(String, i64)> = recent.iter().cloned().collect();
            let mut offset = committed.offset;
            let mut pending = 0_usize;
            let mut ticks = tokio::time::interval(self.commit_interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let commit = |offset: &Offset, recent: &VecDeque<(String, i64)>| Committed {
                offset: offset.clone(),
                recent: recent.iter().cloned().collect(),
            };
            let outcome = loop {
                tokio::select! {
                    _ = stopped.changed() => break Ok(()),
                    _ = ticks.tick() => {
                        if pending > 0 {
                            if let Err(error) = offsets.save(&self.name, &commit(&offset, &recent)).await {
                                break Err(error);
                            }
                            pending = 0;
                            report(&|progress| progress.committed = offset.clone());
                        }
                    }
                    next = events.try_next() => {
                        let envelope = match next {
                            Ok(Some(envelope)) => envelope,
                            Ok(None) => break Ok(()),
                            Err(error) => break Err(error),
                        };
                        let key = (envelope.event.persistence_id.clone(), envelope.event.sequence_nr);
                        let next_offset = envelope.offset.clone();
                        let written = envelope.event.timestamp_millis;
                        if seen.contains(&key) {
                            report(&|progress| progress.skipped += 1);
                        } else {
                            if let Err(error) = handler(envelope).await {
                                break Err(error);
                            }
                            seen.insert(key.clone());
                            recent.push_back(key);
                            while recent.len() > self.dedup_window {
                                if let Some(old) = recent.pop_front() {
                                    seen.remove(&old);
                                }
                            }
                            report(&|progress| {
                                progress.handled += 1;
                                progress.last_event_millis = written;
                            });
                        }
                        offset = next_offset;
                        pending += 1;
                        if pending >= self.commit_every {
                            if let Err(error) = offsets.save(&self.name, &commit(&offset, &recent)).await {
                                break Err(error);
                            }
                            pending = 0;
                            report(&|progress| progress.committed = offset.clone());
                        }
                    }
                }
            };
            // What was handled is committed before the run ends, however it ends.
            if pending > 0 {
                let saved = offsets.save(&self.name, &commit(&offset, &recent)).await;
                if saved.is_ok() {
                    report(&|progress| progress.committed = offset.clone());
                }
                outcome.and(saved)
            } else {
                outcome
            }
        });
        Ok(ProjectionHandle {
            progress,
            stop,
            task,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_committed_state_survives_its_encoding() {
        let committed = Committed {
            offset: Offset("p1.abc".into()),
            recent: vec![("cart|1".into(), 3), ("with\ttab? no: spaces ok".into(), 7)],
        };
        assert_eq!(decode(&encode(&committed)).unwrap(), committed);
        assert_eq!(
            decode(&encode(&Committed::default())).unwrap(),
            Committed::default()
        );
    }
}
