//! Durable-state entities, the way [`crate::persistent`] does event sourcing: a
//! [`StateBehaviour`] turns a command into a new state (or a reply); a [`DurableStateEntity`]
//! gets the object on start and stores each new state as the next revision, replying after the
//! write is acknowledged. A conflicting revision (another writer) is an error, and the entity
//! must stop. [`crate::actor::DurableStateActor`] runs one on `ractor`.

use crate::{Client, Payload, Result};

/// What a command leads to.
pub enum StateEffect<S, R> {
    /// Store this state as the next revision, then reply.
    Store(S, R),
    /// Reply without storing.
    Reply(R),
}

/// A durable-state behaviour: the command handler and how the state is serialized.
pub trait StateBehaviour: Send + 'static {
    /// What the entity is asked to do.
    type Command: Send + 'static;
    /// What it holds; `Default` is the state of an object never stored.
    type State: Default + Send + 'static;
    /// What a command is answered.
    type Reply: Send + 'static;

    /// Decides what a command leads to.
    fn command(
        &self,
        state: &Self::State,
        command: Self::Command,
    ) -> StateEffect<Self::State, Self::Reply>;
    /// Serializes the state.
    fn encode(state: &Self::State) -> Payload;
    /// Deserializes the state.
    fn decode(payload: &Payload) -> Result<Self::State>;
    /// The tag stored with the object (durable-state change queries select by it).
    fn tag() -> String {
        String::new()
    }
}

/// A durable-state behaviour's entity.
pub struct DurableStateEntity<B: StateBehaviour> {
    client: Client,
    persistence_id: String,
    behaviour: B,
    state: B::State,
    revision: i64,
}

impl<B: StateBehaviour> DurableStateEntity<B> {
    /// Gets the object (the default state when there is none).
    pub async fn recover(
        client: Client,
        persistence_id: impl Into<String>,
        behaviour: B,
    ) -> Result<Self> {
        let persistence_id = persistence_id.into();
        let stored = client.get_object(&persistence_id).await?;
        let state = match &stored.value {
            Some(value) => B::decode(value)?,
            None => B::State::default(),
        };
        Ok(Self {
            client,
            persistence_id,
            behaviour,
            state,
            revision: stored.revision,
        })
    }

    /// The current state.
    pub fn state(&self) -> &B::State {
        &self.state
    }

    /// The stored revision.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// Handles a command; an error means the entity must stop.
    pub async fn handle(&mut self, command: B::Command) -> Result<B::Reply> {
        match self.behaviour.command(&self.state, command) {
            StateEffect::Reply(reply) => Ok(reply),
            StateEffect::Store(state, reply) => {
                let revision = self.revision + 1;
                self.client
                    .upsert_object(&self.persistence_id, revision, B::encode(&state), &B::tag())
                    .await?;
                self.state = state;
                self.revision = revision;
                Ok(reply)
            }
        }
    }
}
