//! Persistent actors on [`ractor`]: a [`PersistentActor`] runs a [`Behaviour`]'s
//! [`PersistentEntity`]: recovered in `pre_start`, one command at a time, the reply sent after
//! the write is acknowledged, and the actor stopped on a failed or conflicting write.
//!
//! ```no_run
//! use eventjournal_client::actor::{PersistentActor, ask};
//! # use eventjournal_client::persistent::{Behaviour, PersistenceSettings};
//! # async fn example<B: Behaviour>(client: eventjournal_client::Client, behaviour: B, command: B::Command) {
//! let (actor, _handle) = ractor::Actor::spawn(
//!     None,
//!     PersistentActor::<B>::new(),
//!     (client, "cart-1".to_owned(), behaviour, PersistenceSettings::default()),
//! )
//! .await
//! .expect("recovered");
//! let reply = ask(&actor, command).await;
//! # }
//! ```

use std::marker::PhantomData;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::durable::{DurableStateEntity, StateBehaviour};
use crate::persistent::{Behaviour, PersistenceSettings, PersistentEntity};
use crate::{Client, Error, Result};

/// A command and where its reply goes.
pub struct Command<B: Behaviour>(pub B::Command, pub RpcReplyPort<Result<B::Reply>>);

/// The actor; spawn it with `(client, persistence id, behaviour, settings)`.
pub struct PersistentActor<B>(PhantomData<fn() -> B>);

impl<B> PersistentActor<B> {
    /// The actor definition.
    pub fn new() -> Self {
        Self(PhantomData)
    }
}

impl<B> Default for PersistentActor<B> {
    fn default() -> Self {
        Self::new()
    }
}

impl<B: Behaviour> Actor for PersistentActor<B> {
    type Msg = Command<B>;
    type State = PersistentEntity<B>;
    type Arguments = (Client, String, B, PersistenceSettings);

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        (client, persistence_id, behaviour, settings): Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(PersistentEntity::recover(client, persistence_id, behaviour, settings).await?)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        Command(command, reply): Self::Msg,
        entity: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let outcome = entity.handle(command).await;
        let failed = outcome.as_ref().err().map(ToString::to_string);
        let _ = reply.send(outcome);
        if let Some(why) = failed {
            // The state may be behind the journal: no further command is handled.
            myself.stop(Some(why));
        }
        Ok(())
    }
}

/// Sends `command` and waits for the reply (after its events are stored). An actor that
/// stopped answers [`Error::Unavailable`].
pub async fn ask<B: Behaviour>(
    actor: &ActorRef<Command<B>>,
    command: B::Command,
) -> Result<B::Reply> {
    match actor.call(|reply| Command(command, reply), None).await {
        Ok(ractor::rpc::CallResult::Success(reply)) => reply,
        Ok(_) | Err(_) => Err(Error::Unavailable {
            attempts: 1,
            message: "the persistent actor stopped".into(),
        }),
    }
}

/// A command to a durable-state actor and where its reply goes.
pub struct StateCommand<B: StateBehaviour>(pub B::Command, pub RpcReplyPort<Result<B::Reply>>);

/// A durable-state actor; spawn it with `(client, persistence id, behaviour)`.
pub struct DurableStateActor<B>(PhantomData<fn() -> B>);

impl<B> DurableStateActor<B> {
    /// The actor definition.
    pub fn new() -> Self {
        Self(PhantomData)
    }
}

impl<B> Default for DurableStateActor<B> {
    fn default() -> Self {
        Self::new()
    }
}

impl<B: StateBehaviour> Actor for DurableStateActor<B> {
    type Msg = StateCommand<B>;
    type State = DurableStateEntity<B>;
    type Arguments = (Client, String, B);

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        (client, persistence_id, behaviour): Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(DurableStateEntity::recover(client, persistence_id, behaviour).await?)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        StateCommand(command, reply): Self::Msg,
        entity: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let outcome = entity.handle(command).await;
        let failed = outcome.as_ref().err().map(ToString::to_string);
        let _ = reply.send(outcome);
        if let Some(why) = failed {
            myself.stop(Some(why));
        }
        Ok(())
    }
}

/// Sends `command` to a durable-state actor and waits for the reply (after the state is
/// stored).
pub async fn ask_state<B: StateBehaviour>(
    actor: &ActorRef<StateCommand<B>>,
    command: B::Command,
) -> Result<B::Reply> {
    match actor.call(|reply| StateCommand(command, reply), None).await {
        Ok(ractor::rpc::CallResult::Success(reply)) => reply,
        Ok(_) | Err(_) => Err(Error::Unavailable {
            attempts: 1,
            message: "the durable-state actor stopped".into(),
        }),
    }
}
