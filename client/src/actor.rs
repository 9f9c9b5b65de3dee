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

use ractor::{Actor, ActorProcessingErr, ActorRef, Message, RpcReplyPort};

use crate::durable::{DurableStateEntity, StateBehaviour};
use crate::persistent::{Behaviour, PersistenceSettings, PersistentEntity};
use crate::{Client, Error, Result};

/// A command and where its reply goes.
pub struct Ask<C, R>(pub C, pub RpcReplyPort<Result<R>>);

/// A persistent actor's message.
pub type Command<B> = Ask<<B as Behaviour>::Command, <B as Behaviour>::Reply>;

/// A durable-state actor's message.
pub type StateCommand<B> = Ask<<B as StateBehaviour>::Command, <B as StateBehaviour>::Reply>;

/// The persistent actor; spawn it with `(client, persistence id, behaviour, settings)`.
pub struct PersistentActor<B>(PhantomData<fn() -> B>);

/// A durable-state actor; spawn it with `(client, persistence id, behaviour)`.
pub struct DurableStateActor<B>(PhantomData<fn() -> B>);

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

/// Sends an entity's answer; a failed one stops the actor, whose state may be behind the
/// journal, so no further command is handled.
fn answer<M: Message, R>(myself: &ActorRef<M>, outcome: Result<R>, reply: RpcReplyPort<Result<R>>) {
    let failed = outcome.as_ref().err().map(ToString::to_string);
    let _ = reply.send(outcome);
    if let Some(why) = failed {
        myself.stop(Some(why));
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
        Ask(command, reply): Self::Msg,
        entity: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        answer(&myself, entity.handle(command).await, reply);
        Ok(())
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
        Ask(command, reply): Self::Msg,
        entity: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        answer(&myself, entity.handle(command).await, reply);
        Ok(())
    }
}

/// Sends `command` and waits for the reply (after what it changed is stored). An actor that
/// stopped answers [`Error::Unavailable`].
pub async fn ask<C: Send + 'static, R: Send + 'static>(
    actor: &ActorRef<Ask<C, R>>,
    command: C,
) -> Result<R> {
    match actor.call(|reply| Ask(command, reply), None).await {
        Ok(ractor::rpc::CallResult::Success(reply)) => reply,
        Ok(_) | Err(_) => Err(Error::Unavailable {
            attempts: 1,
            message: "the actor stopped".into(),
        }),
    }
}

/// [`ask`], by the name a durable-state actor's caller may look for.
pub use self::ask as ask_state;
