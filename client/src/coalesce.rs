//! Write coalescing: the atomic writes of concurrent [`Client::write_events`] calls share one
//! `WriteEvents` call.
//!
//! An application with many persistent actors on one client writes from many tasks at once,
//! each one write at a time. Each call to the service costs CPU on both ends (HTTP/2 stream,
//! headers, one response) that a write of one event cannot amortise. So a client keeps at most
//! [`WriteCoalescing::max_calls_in_flight`] `WriteEvents` calls open, each on a connection
//! (a *lane*) of its own; writes that come while they are all taken wait and go together in
//! the next call, as many as fit ([`WriteCoalescing::max_writes_per_call`],
//! [`WriteCoalescing::max_bytes_per_call`]). There is no linger: a write that finds a lane free
//! is sent at once, in the caller's own task.
//!
//! Why a connection per lane: the server's group commit takes the calls of one connection as
//! one producer, whose writes go to MongoDB one batch at a time. Two lanes are two producers,
//! so one combined call's insert runs while the next call is on its way, and MongoDB is not
//! left waiting for the round trip. Every call names the client (`eventjournal-producer-group`
//! metadata, random per `Client`), so the server does not pace one lane for the other's small
//! calls as it would for another client's.
//!
//! The server then sees one request where there were many. That changes nothing a caller can
//! see: a request's writes are answered one by one, each with its own outcome; the writes of
//! one caller stay together and in order; and one call never carries the writes of two callers
//! for the same persistence id (in one request a failed write of an id stops the later writes
//! of that id, which must not reach across callers), so a caller whose id is already in the
//! call waits for the next. Every write is idempotent, so a combined call that fails with
//! `UNAVAILABLE` is retried as a whole, and each caller gets the answer to its own writes. A
//! combined call that still fails is not one caller's failure for all: each caller's writes go
//! again in a call of their own, so one caller's failing write (the service fails a request
//! when a write ends in an error) does not fail the others'.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use prost::Message as _;
use proto::v1 as pb;
use tokio::sync::oneshot;

use crate::{Client, Error, Result};

/// How concurrent writes of one [`Client`] share calls; see [`crate::ClientBuilder::write_coalescing`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteCoalescing {
    /// `WriteEvents` calls open at once, each on a connection of its own (the first is the
    /// client's connection, the others are opened at their first use); writes that come while
    /// all are open wait for the next call. 0 turns coalescing off: every `write_events` is a
    /// call of its own, on the client's connection.
    pub max_calls_in_flight: usize,
    /// Atomic writes one combined call carries at most. A single `write_events` with more
    /// is sent alone, as given.
    pub max_writes_per_call: usize,
    /// Encoded bytes one combined call carries at most (keep it under the server's
    /// `server.max-message-size`, 1 MiB at the least). A single `write_events` with more is
    /// sent alone, as given.
    pub max_bytes_per_call: usize,
}

impl Default for WriteCoalescing {
    fn default() -> Self {
        Self {
            max_calls_in_flight: 2,
            max_writes_per_call: 1000,
            max_bytes_per_call: 512 << 10,
        }
    }
}

impl WriteCoalescing {
    /// Every `write_events` is a call of its own.
    pub fn off() -> Self {
        Self {
            max_calls_in_flight: 0,
            ..Self::default()
        }
    }
}

/// The answer to one caller's writes.
type Answer = Result<Vec<pb::AtomicWriteResult>>;

/// The writes of one waiting caller.
struct Waiting {
    id: u64,
    writes: Vec<pb::AtomicWrite>,
    /// The persistence ids its writes name.
    pids: Vec<String>,
    bytes: usize,
    answer: oneshot::Sender<Answer>,
}

impl Waiting {
    /// `writes` ready to wait (its `id` is given when queued), and where its answer comes.
    fn new(writes: Vec<pb::AtomicWrite>) -> (Self, oneshot::Receiver<Answer>) {
        // Each write as the request encodes it: its field's tag, length and content.
        let bytes = writes
            .iter()
            .map(|write| {
                let length = write.encoded_len();
                1 + prost::encoding::encoded_len_varint(length as u64) + length
            })
            .sum();
        let mut pids: Vec<String> = writes
            .iter()
            .flat_map(|write| &write.events)
            .map(|event| event.persistence_id.clone())
            .collect();
        pids.sort_unstable();
        pids.dedup();
        let (answer, receiver) = oneshot::channel();
        let waiting = Self {
            id: 0,
            writes,
            pids,
            bytes,
            answer,
        };
        (waiting, receiver)
    }
}

/// A lane: an index into `Client::write_lanes`.
pub(crate) type Lane = usize;

struct State {
    /// Lanes without a call, the last given back on top (a lone writer keeps its connection).
    free: Vec<Lane>,
    waiting: VecDeque<Waiting>,
    next_id: u64,
}

/// The calls of one client (shared by its clones).
pub(crate) struct Coalescer {
    settings: WriteCoalescing,
    state: Mutex<State>,
}

impl Coalescer {
    pub(crate) fn new(settings: WriteCoalescing) -> Arc<Self> {
        Arc::new(Self {
            settings,
            state: Mutex::new(State {
                free: (0..settings.max_calls_in_flight).rev().collect(),
                waiting: VecDeque::new(),
                next_id: 0,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is consistent between statements: a panic elsewhere leaves it usable.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Sends `writes`, alone or with other callers' writes, and answers for them.
    pub(crate) async fn write(
        self: &Arc<Self>,
        client: &Client,
        writes: Vec<pb::AtomicWrite>,
    ) -> Answer {
        if self.settings.max_calls_in_flight == 0 {
            return client
                .write_call(None, &writes, client.retry.max_attempts)
                .await;
        }
        // A lane free and nobody waiting: a call of its own, in this task. The lane is given
        // back (and the writes that wait meanwhile sent) even if this future is dropped half
        // way.
        let free = {
            let mut state = self.lock();
            state.waiting.is_empty().then(|| state.free.pop()).flatten()
        };
        if let Some(lane) = free {
            let _lane = LaneTaken(self, client, lane);
            return client
                .write_call(Some(lane), &writes, client.retry.max_attempts)
                .await;
        }
        let (waiting, mut receiver) = Waiting::new(writes);
        let (id, batch) = {
            let mut state = self.lock();
            let id = state.next_id;
            state.next_id += 1;
            state.waiting.push_back(Waiting { id, ..waiting });
            // A lane may have come free since: then the waiting writes, these among them, go.
            let batch = state.free.pop().map(|lane| (lane, self.take(&mut state)));
            (id, batch)
        };
        if let Some((lane, batch)) = batch {
            tokio::spawn(Arc::clone(self).send(client.clone(), lane, batch));
        }
        let dropped = |_| {
            Err(Error::Other {
                code: tonic::Code::Cancelled,
                message: "the combined WriteEvents call was dropped with its runtime".into(),
            })
        };
        let timeout = client.call_timeout;
        tokio::select! {
            answer = &mut receiver => return answer.unwrap_or_else(dropped),
            () = tokio::time::sleep(timeout) => {}
        }
        // No lane came free within a call's whole timeout: give up, unless already sent.
        {
            let mut state = self.lock();
            if let Some(index) = state.waiting.iter().position(|waiting| waiting.id == id) {
                state.waiting.remove(index);
                return Err(Error::DeadlineExceeded(format!(
                    "no WriteEvents call came free within the call timeout ({timeout:?}); \
                     nothing was sent"
                )));
            }
        }
        receiver.await.unwrap_or_else(dropped)
    }

    /// The waiting writes the next call carries: the first in any case, then, in order, as
    /// many as fit, up to the first caller naming a persistence id already taken.
    fn take(&self, state: &mut State) -> Vec<Waiting> {
        let mut batch = Vec::new();
        let mut pids = HashSet::new();
        let (mut writes, mut bytes) = (0, 0);
        while let Some(next) = state.waiting.front() {
            if next.answer.is_closed() {
                // Its caller stopped waiting before the writes were sent: they are not.
                state.waiting.pop_front();
                continue;
            }
            let fits = writes + next.writes.len() <= self.settings.max_writes_per_call
                && bytes + next.bytes <= self.settings.max_bytes_per_call
                && next.pids.iter().all(|pid| !pids.contains(pid));
            if !batch.is_empty() && !fits {
                break;
            }
            writes += next.writes.len();
            bytes += next.bytes;
            pids.extend(next.pids.iter().cloned());
            batch.extend(state.waiting.pop_front());
        }
        batch
    }

    /// Sends combined calls on `lane` in a task of their own (a caller that stops waiting
    /// must not take the others' answers with it) while writes wait, then gives it back.
    async fn send(self: Arc<Self>, client: Client, lane: Lane, mut batch: Vec<Waiting>) {
        // Should this task be dropped (its runtime shutting down), the lane is still given back.
        let mut held = LaneHeld {
            coalescer: Arc::clone(&self),
            lane,
            held: true,
        };
        loop {
            let mut writes = Vec::with_capacity(batch.iter().map(|w| w.writes.len()).sum());
            let mut callers = Vec::with_capacity(batch.len());
            for waiting in batch {
                callers.push((waiting.writes.len(), waiting.answer));
                writes.extend(waiting.writes);
            }
            let answer = client
                .write_call(Some(lane), &writes, client.retry.max_attempts)
                .await;
            if answer.is_err() && callers.len() > 1 {
                resend_alone(&client, lane, callers, writes).await;
            } else {
                answer_each(callers, writes.len(), answer);
            }
            // The callers just answered usually write again at once: let them queue first, so
            // the next call carries them too instead of leaving with the first of them.
            tokio::task::yield_now().await;
            let mut state = self.lock();
            batch = self.take(&mut state);
            if batch.is_empty() {
                // Under the lock, so a caller queueing now finds the lane free.
                state.free.push(lane);
                held.held = false;
                return;
            }
        }
    }

    /// Gives `lane` back, or sends the writes waiting on it.
    fn give_back(self: &Arc<Self>, client: &Client, lane: Lane) {
        let mut state = self.lock();
        let batch = self.take(&mut state);
        if batch.is_empty() {
            state.free.push(lane);
            return;
        }
        drop(state);
        // Outside a runtime (the caller's runtime shutting down) the waiting callers' senders
        // are dropped with the batch: they answer that the call was dropped.
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn(Arc::clone(self).send(client.clone(), lane, batch))),
            Err(_) => {
                drop(batch);
                self.lock().free.push(lane);
            }
        }
    }
}

/// A combined call failed as a whole. The service fails a request when one of its writes ends
/// in an error rather than an outcome (MongoDB refused one id's transaction, a write it could
/// not decide safely), so the other callers' writes may well be stored, or fine to store: each
/// caller's writes go again in a call of their own, all at once, each with one attempt (the
/// combined call had the retries), and each caller gets the answer to its own writes. Every
/// write is idempotent: one already stored is answered `Written` again.
async fn resend_alone(
    client: &Client,
    lane: Lane,
    callers: Vec<(usize, oneshot::Sender<Answer>)>,
    writes: Vec<pb::AtomicWrite>,
) {
    let mut writes = writes.into_iter();
    let calls = callers.into_iter().map(|(count, answer)| {
        let own: Vec<pb::AtomicWrite> = writes.by_ref().take(count).collect();
        async move {
            if answer.is_closed() {
                return;
            }
            let result = client.write_call(Some(lane), &own, 1).await;
            answer_each(vec![(count, answer)], count, result);
        }
    });
    futures::future::join_all(calls).await;
}

/// Splits a combined call's answer between its callers (each with its number of writes), in
/// order. A caller that stopped waiting is skipped.
fn answer_each(callers: Vec<(usize, oneshot::Sender<Answer>)>, sent: usize, answer: Answer) {
    let error = match answer {
        Ok(results) if results.len() == sent => {
            let mut results = results.into_iter();
            for (count, answer) in callers {
                let _ = answer.send(Ok(results.by_ref().take(count).collect()));
            }
            return;
        }
        Ok(results) => Error::Other {
            code: tonic::Code::Internal,
            message: format!(
                "the service answered {} results for the {sent} writes of a request",
                results.len()
            ),
        },
        Err(error) => error,
    };
    for (_, answer) in callers {
        let _ = answer.send(Err(error.clone()));
    }
}

/// A lane held by a `send` task; given back if the task is dropped half way.
struct LaneHeld {
    coalescer: Arc<Coalescer>,
    lane: Lane,
    held: bool,
}

impl Drop for LaneHeld {
    fn drop(&mut self) {
        if self.held {
            self.coalescer.lock().free.push(self.lane);
        }
    }
}

/// A lane taken by a caller sending its own writes; given back when dropped.
struct LaneTaken<'a>(&'a Arc<Coalescer>, &'a Client, Lane);

impl Drop for LaneTaken<'_> {
    fn drop(&mut self) {
        self.0.give_back(self.1, self.2);
    }
}
