//! Event sourcing over the service, independent of any actor crate: a [`Behaviour`] decides
//! events from commands and folds them into state; a [`PersistentEntity`] recovers that state
//! (latest snapshot plus the events after it), persists what the behaviour decides (all the
//! events of a command as one atomic write, the reply only after the write is acknowledged),
//! snapshots every N events and deletes what retention no longer needs. The actor integration
//! ([`crate::actor`], on `ractor`) is one module around it; another actor crate is another.
//!
//! A write that fails or conflicts is an error and the entity must stop: its state may be
//! behind the journal. In particular a second incarnation of a persistence id (another node,
//! a split brain) gets `Conflict` on its first write and stops, so history has no gap and no
//! fork.

use futures::TryStreamExt as _;

use crate::{
    Client, Error, Event, Payload, Replayed, Result, SnapshotCriteria, SnapshotMetadata,
    WriteOutcome,
};

/// What a command leads to.
pub enum Effect<E, R> {
    /// Persist these events (one atomic write), apply them, then reply.
    Persist(Vec<E>, R),
    /// Reply without persisting anything.
    Reply(R),
}

/// An event-sourced behaviour: the command handler, the event handler, and how events and
/// state are serialized.
pub trait Behaviour: Send + 'static {
    /// What the entity is asked to do.
    type Command: Send + 'static;
    /// What it records.
    type Event: Send + 'static;
    /// What it knows; `Default` is the state before any event.
    type State: Default + Send + 'static;
    /// What a command is answered.
    type Reply: Send + 'static;

    /// Decides what a command leads to, given the current state.
    fn command(
        &self,
        state: &Self::State,
        command: Self::Command,
    ) -> Effect<Self::Event, Self::Reply>;
    /// Folds an event into the state (on recovery and after each persist).
    fn apply(state: &mut Self::State, event: &Self::Event);
    /// Serializes an event.
    fn encode_event(event: &Self::Event) -> Payload;
    /// Deserializes an event.
    fn decode_event(payload: &Payload) -> Result<Self::Event>;
    /// Serializes the state (snapshots).
    fn encode_state(state: &Self::State) -> Payload;
    /// Deserializes the state.
    fn decode_state(payload: &Payload) -> Result<Self::State>;
    /// The tags of an event (read-journal queries by tag find it by them).
    fn tags(_event: &Self::Event) -> Vec<String> {
        Vec::new()
    }
}

/// Snapshots and retention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PersistenceSettings {
    /// Save a snapshot after every this many events; 0: never.
    pub snapshot_every: i64,
    /// Snapshots kept (the newest); older ones are deleted after a snapshot is saved.
    pub keep_snapshots: i64,
    /// After a snapshot, delete the events older than the oldest snapshot kept.
    pub delete_events: bool,
}

impl Default for PersistenceSettings {
    fn default() -> Self {
        Self {
            snapshot_every: 100,
            keep_snapshots: 2,
            delete_events: false,
        }
    }
}

/// A behaviour's entity, recovered and ready for commands.
pub struct PersistentEntity<B: Behaviour> {
    client: Client,
    persistence_id: String,
    behaviour: B,
    settings: PersistenceSettings,
    state: B::State,
    sequence_nr: i64,
}

impl<B: Behaviour> PersistentEntity<B> {
    /// Recovers `persistence_id`: the latest snapshot, then the events after it.
    pub async fn recover(
        client: Client,
        persistence_id: impl Into<String>,
        behaviour: B,
        settings: PersistenceSettings,
    ) -> Result<Self> {
        let persistence_id = persistence_id.into();
        let (mut state, mut sequence_nr) = match client
            .load_snapshot(&persistence_id, SnapshotCriteria::all())
            .await?
        {
            Some(snapshot) => (
                B::decode_state(&snapshot.snapshot)?,
                snapshot.metadata.sequence_nr,
            ),
            None => (B::State::default(), 0),
        };
        let mut replay = client
            .replay(&persistence_id, sequence_nr + 1, None, None)
            .await?;
        while let Some(item) = replay.try_next().await? {
            match item {
                Replayed::Event(event) => {
                    B::apply(&mut state, &B::decode_event(&event.payload)?);
                    sequence_nr = event.sequence_nr;
                }
                Replayed::HighestSequenceNr(highest) => sequence_nr = sequence_nr.max(highest),
            }
        }
        Ok(Self {
            client,
            persistence_id,
            behaviour,
            settings,
            state,
            sequence_nr,
        })
    }

    /// The current state.
    pub fn state(&self) -> &B::State {
        &self.state
    }

    /// The sequence number of the last event.
    pub fn sequence_nr(&self) -> i64 {
        self.sequence_nr
    }

    /// Handles a command: persists what it decides and replies once the write is acknowledged.
    /// An error means the entity must stop (see the module documentation).
    pub async fn handle(&mut self, command: B::Command) -> Result<B::Reply> {
        let (events, reply) = match self.behaviour.command(&self.state, command) {
            Effect::Reply(reply) => return Ok(reply),
            Effect::Persist(events, reply) => (events, reply),
        };
        if events.is_empty() {
            return Ok(reply);
        }
        let first = self.sequence_nr + 1;
        let write: Vec<Event> = events
            .iter()
            .enumerate()
            .map(|(index, event)| {
                Event::new(
                    &self.persistence_id,
                    first + index as i64,
                    B::encode_event(event),
                )
                .tagged(B::tags(event))
            })
            .collect();
        let outcome = self
            .client
            .write_events(vec![write])
            .await?
            .pop()
            .unwrap_or(WriteOutcome::Rejected("no outcome".into()));
        match outcome {
            WriteOutcome::Written => {}
            WriteOutcome::Conflict(reason) => {
                return Err(Error::Conflict(format!(
                    "{} (another incarnation of {} wrote sequence number {first})",
                    reason, self.persistence_id
                )));
            }
            WriteOutcome::Rejected(reason) => return Err(Error::InvalidArgument(reason)),
        }
        let before = self.sequence_nr;
        for event in &events {
            B::apply(&mut self.state, event);
        }
        self.sequence_nr += events.len() as i64;
        let every = self.settings.snapshot_every;
        if every > 0 && self.sequence_nr / every > before / every {
            self.snapshot().await?;
        }
        Ok(reply)
    }

    /// Saves a snapshot of the current state and applies retention.
    async fn snapshot(&mut self) -> Result<()> {
        let metadata = SnapshotMetadata {
            persistence_id: self.persistence_id.clone(),
            sequence_nr: self.sequence_nr,
            ..SnapshotMetadata::default()
        };
        self.client
            .save_snapshot(metadata, B::encode_state(&self.state))
            .await?;
        let every = self.settings.snapshot_every.max(1);
        let keep = self.settings.keep_snapshots.max(1);
        let oldest_kept = self.sequence_nr - (keep - 1) * every;
        if oldest_kept > 1 {
            self.client
                .delete_snapshots(
                    &self.persistence_id,
                    SnapshotCriteria::up_to(oldest_kept - 1),
                )
                .await?;
            if self.settings.delete_events {
                self.client
                    .delete_events_to(&self.persistence_id, oldest_kept)
                    .await?;
            }
        }
        Ok(())
    }
}
