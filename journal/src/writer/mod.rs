//! The group commit: one task per server receives every write (from `WriteEvents` calls and
//! `WriteEventsStream`s), admits them into batches (`schedule`), and runs each batch against
//! MongoDB (`batch`) while the next ones form. Nothing waits for a timer: a write arriving
//! while no batch is in flight goes at once, alone; writes arriving while
//! `write-journal.max-batches-in-flight` batches are in flight go together in the next one.
//!
//! The task owns all shared state, so none of it is locked: the queue, which persistence ids
//! are in flight, what is known of each id's highest sequence number (`heads`), and the
//! requests waiting for their outcomes.
//!
//! Every write passes through several of the writer's maps and sets (keyed by its own counters
//! and by persistence ids), so they hash with `ahash` (randomly keyed, DoS-resistant, faster
//! than the standard SipHash on short keys).

mod batch;
mod heads;
mod schedule;
mod store;

use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::Poll;
use std::time::{Duration, Instant};

use ahash::{HashMap, HashMapExt, HashSet, HashSetExt};
use config::WriteJournalSettings;
use futures::FutureExt;
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use model::PersistentEvent;
use tokio::sync::{mpsc, oneshot};

use crate::document::EncodedEvent;
use crate::error::JournalError;
use crate::journal::WriteOutcome;
use crate::metrics;
use batch::{Batch, BatchWrite, Done, FailedWrite, poisoned_reason};
use heads::{Failure, Heads};
pub(crate) use schedule::Pid;
use schedule::{LightSeen, Limits, Queued, Schedule, WriteKey};
pub(crate) use store::EventStore;

/// Where writes come from: the producer they are scheduled fairly against (a stream, or a
/// client connection), and the chain a failure stops (a request, or a stream).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    producer: u64,
    /// The client the producer belongs to (a client's several connections are one group): a
    /// producer is not paced for its own group's light writes. Its producer unless the client
    /// names one.
    group: u64,
    chain: u64,
    /// For a request of a `WriteEventsStream`: where it stands in the stream.
    position: Option<StreamPosition>,
}

/// Where a request of a `WriteEventsStream` stands: the stream's responses are numbered from
/// 0, one per request, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamPosition {
    /// The number of this request's response.
    pub index: u64,
    /// How many of the stream's responses its sender had received when it sent it: a failure
    /// answered in one it had not received stops its writes of the failed id.
    pub responses_received: u64,
}

static NEXT_ORIGIN: AtomicU64 = AtomicU64::new(1);

/// A producer or group id for `value`, never equal to a counter value (high bit set).
fn hashed(value: impl std::hash::Hash) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault};
    BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(value)
        | 1 << 63
}

impl Origin {
    /// One `WriteEvents` call, from `connection` (calls of one connection are one producer),
    /// of the client that calls itself `group` on every connection, if it does.
    pub fn call(connection: Option<SocketAddr>, group: Option<u64>) -> Self {
        let chain = NEXT_ORIGIN.fetch_add(1, Ordering::Relaxed);
        let producer = connection.map_or(chain, hashed);
        // Named by the client, from its own address: another host cannot join the group.
        let group = match (group, connection) {
            (Some(group), Some(address)) => hashed((address.ip(), group)),
            _ => producer,
        };
        Self {
            producer,
            group,
            chain,
            position: None,
        }
    }

    /// One `WriteEventsStream`: a producer of its own, and one chain for all its requests
    /// (each submitted [`Origin::at`] its position).
    pub fn stream() -> Self {
        let id = NEXT_ORIGIN.fetch_add(1, Ordering::Relaxed);
        Self {
            producer: id,
            group: id,
            chain: id,
            position: None,
        }
    }

    /// A request of this stream, at `position`.
    pub fn at(self, position: StreamPosition) -> Self {
        Self {
            position: Some(position),
            ..self
        }
    }
}

/// A write ready for the writer, or rejected before reaching it (stopping the later writes of
/// the persistence id it names, if any, like any failed write).
pub(crate) enum Prepared {
    Rejected {
        named: Option<(Pid, Failure)>,
        reason: String,
    },
    Ready(Ready),
}

impl Prepared {
    /// Rejected for `reason`; with `pid`, a failed write of sequence numbers `first..=last`.
    pub fn rejected(pid: Option<Pid>, first: i64, last: i64, reason: String) -> Self {
        let named = pid.map(|pid| {
            let failure = Failure {
                first,
                last,
                reason: reason.clone(),
            };
            (pid, failure)
        });
        Self::Rejected { named, reason }
    }
}

pub(crate) struct Ready {
    pub pid: Pid,
    pub first: i64,
    pub last: i64,
    pub events: Vec<PersistentEvent>,
    pub documents: Vec<EncodedEvent>,
}

pub(crate) type Outcomes = Result<Vec<WriteOutcome>, JournalError>;

/// How long after a batch of light producers they count as writing (see `Limits`): heavy
/// producers are paced until then. A tuning constant, public for the benchmark, which waits
/// it out after its warm-up.
pub const LIGHT_ACTIVITY: Duration = Duration::from_millis(100);

/// While light producers write, a heavy producer's batch does not start beside one of theirs,
/// unless its last batch started this long ago (so it is slowed down, never starved).
const HEAVY_MAX_WAIT: Duration = Duration::from_millis(50);

/// Groups with a heavy batch remembered before old ones are pruned.
const MAX_HEAVY_GROUPS: usize = 64;

/// Pacing: while light producers write, a heavy producer waits this many times as long as its
/// last batch took before the next one, so it has MongoDB at most 1 / (1 + this) of the time.
const HEAVY_PAUSE_FACTOR: u32 = 8;

/// Whether light producers count as writing at `now`, as [`LightSeen::active`] says (`Some` of
/// their group when they were all of one), except that a client that writes heavy batches
/// itself gets no protection for its light writes: they do not pace other clients' heavy
/// producers.
fn light_activity(
    light_seen: &LightSeen,
    heavy_groups: &HashMap<u64, Instant>,
    now: Instant,
) -> Option<Option<u64>> {
    match light_seen.active(now, LIGHT_ACTIVITY) {
        Some(Some(group))
            if heavy_groups
                .get(&group)
                .is_some_and(|at| now.duration_since(*at) < LIGHT_ACTIVITY) =>
        {
            None
        }
        light => light,
    }
}

struct Submission {
    origin: Origin,
    writes: Vec<Prepared>,
    reply: oneshot::Sender<Outcomes>,
    caller: Caller,
}

/// Whether the caller of a request still waits for its outcomes: it has gone once the future
/// [`Writer::submit`] returned is dropped (the call was cancelled or passed its deadline, the
/// stream was closed). A request's writes not sent by then are not sent (nor sent again) at
/// all: nobody would get their outcome, and a caller that gave up cannot count on them being
/// stored (it retries them or recovers, and must not find them appearing later).
#[derive(Clone)]
pub(crate) struct Caller(Weak<()>);

/// The failure a write whose caller has gone leaves: it names it in the gap conflict of a
/// later write of its id from another caller. (The gone caller gets no outcome.)
pub(crate) const CALLER_GONE: &str = "its caller gave up on it (cancelled the call, passed \
                                      its deadline or closed its stream) before it was answered";

impl Caller {
    pub fn gone(&self) -> bool {
        self.0.strong_count() == 0
    }

    /// The outcome of a write dropped because its caller has gone (nobody receives it).
    pub fn gone_error() -> JournalError {
        JournalError::Internal("the caller has gone".to_owned())
    }
}

enum Message {
    Submit(Submission),
    /// A stream ended: forget its failures.
    StreamClosed {
        chain: u64,
        producer: u64,
    },
}

/// The handle the journal submits writes through.
#[derive(Clone)]
pub(crate) struct Writer {
    inbox: mpsc::UnboundedSender<Message>,
}

impl Writer {
    /// Starts the writer task; it ends once every handle is dropped and its work is done.
    pub fn start(store: Arc<EventStore>, settings: &WriteJournalSettings) -> Self {
        let (inbox, receiver) = mpsc::unbounded_channel();
        let until_insert = settings
            .purge_delay
            .saturating_sub(settings.sequence_nr_cache_validity)
            .max(settings.sequence_nr_cache_validity);
        // Knowledge is decided on for at most half the time it may be inserted on, so an insert
        // decided on it has the other half to be answered (`EventStore::insert`). With the
        // defaults (1 min, 5 s) that is the validity itself; with a purge delay of only twice the
        // validity, half of it.
        let validity = settings.sequence_nr_cache_validity.min(until_insert / 2);
        let committer = Committer {
            schedule: Schedule::default(),
            streams: HashMap::new(),
            heads: Heads::new(validity),
            entries: HashMap::new(),
            requests: HashMap::new(),
            next_key: 0,
            next_request: 0,
            limits: Limits {
                max_events: settings.max_batch_events as usize,
                max_bytes: settings.max_batch_bytes.as_u64() as usize,
                fair_share: settings.fair_share_events as usize,
                light_active: false,
                heavy_paused: false,
                light_only_group: None,
                exempt_busy: false,
            },
            light_seen: LightSeen::default(),
            heavy_groups: HashMap::new(),
            exempt_in_flight: 0,
            heavy_resume: None,
            light_in_flight: 0,
            heavy_started: None,
            answers: Vec::new(),
            spent: Vec::new(),
            max_in_flight: settings.max_batches_in_flight as usize,
            trust: batch::Trust {
                validity,
                until_insert,
            },
            store,
        };
        tokio::spawn(committer.run(receiver));
        Self { inbox }
    }

    /// Queues the writes now, in order; the future resolves to their outcomes in the same
    /// order. Dropping the future before its writes go to MongoDB drops them (see
    /// `Committer::next_batch`). Memory is bounded upstream: by the requests the server has
    /// read and not answered.
    pub fn submit(
        &self,
        origin: Origin,
        writes: Vec<Prepared>,
    ) -> impl Future<Output = Outcomes> + Send + 'static {
        let (reply, outcomes) = oneshot::channel();
        let waiting = Arc::new(());
        let queued = self
            .inbox
            .send(Message::Submit(Submission {
                origin,
                writes,
                reply,
                caller: Caller(Arc::downgrade(&waiting)),
            }))
            .is_ok();
        async move {
            // Held for as long as the caller waits (see `Caller`).
            let _waiting = waiting;
            let stopped = || JournalError::Internal("the journal writer has stopped".to_owned());
            if !queued {
                return Err(stopped());
            }
            outcomes.await.unwrap_or_else(|_| Err(stopped()))
        }
    }

    /// The stream of `origin` has ended.
    pub fn stream_closed(&self, origin: Origin) {
        // Gone only when the writer has stopped, with everything it knew.
        let _ = self.inbox.send(Message::StreamClosed {
            chain: origin.chain,
            producer: origin.producer,
        });
    }
}

/// One queued or in-flight write: which request it belongs to, and its content until a batch
/// takes it.
struct Entry {
    request: u64,
    index: usize,
    chain: u64,
    /// The number of its response in its stream, if it came on one.
    response: Option<u64>,
    ready: Option<Ready>,
}

/// A persistence id whose write failed on a stream: the stream's later writes of the id sent
/// before their sender had the answer are not stored (see `WriteEventsStream`).
struct StreamStop {
    failure: Failure,
    /// The last response that answers a write of the id as failed.
    until: u64,
}

/// A request (one call, or one message of a stream) waiting for its writes' outcomes.
struct Request {
    outcomes: Vec<Option<WriteOutcome>>,
    unsettled: usize,
    error: Option<JournalError>,
    reply: oneshot::Sender<Outcomes>,
    caller: Caller,
}

/// A batch that completed: its persistence ids and producers are free again.
struct Completed {
    pids: Vec<Pid>,
    producers: Vec<u64>,
    done: Done,
    /// A heavy producer's batch, and when it started (for pacing).
    heavy: bool,
    /// A heavy batch that sets the pacing (not one exempt from it, `Limits::light_only_group`).
    paces: bool,
    /// Counted in flight (`light_in_flight`, `exempt_in_flight`, pacing): it has writes to send.
    counted: bool,
    started: Instant,
}

struct Committer {
    schedule: Schedule,
    /// Per open stream (its chain), its persistence ids with a failed write.
    streams: HashMap<u64, HashMap<Pid, StreamStop>>,
    heads: Heads,
    entries: HashMap<WriteKey, Entry>,
    requests: HashMap<u64, Request>,
    next_key: WriteKey,
    next_request: u64,
    limits: Limits,
    max_in_flight: usize,
    trust: batch::Trust,
    store: Arc<EventStore>,
    /// Which light producers had writes in batches lately, and when.
    light_seen: LightSeen,
    /// When each group (client) last had a heavy batch (pruned past `MAX_HEAVY_GROUPS`).
    heavy_groups: HashMap<u64, Instant>,
    /// Exempt heavy batches at MongoDB (at most one).
    exempt_in_flight: usize,
    /// Pacing: while light producers write, a heavy producer's next batch waits until then.
    heavy_resume: Option<Instant>,
    /// Batches of light producers at MongoDB: no heavy batch starts beside them.
    light_in_flight: usize,
    /// When the last heavy batch started.
    heavy_started: Option<Instant>,
    /// Outcomes of completed batches not answered yet, and their writes (see `run`).
    answers: Vec<(WriteKey, Result<WriteOutcome, JournalError>)>,
    spent: Vec<BatchWrite>,
}

impl Committer {
    async fn run(mut self, mut inbox: mpsc::UnboundedReceiver<Message>) {
        let mut in_flight: FuturesUnordered<BoxFuture<'static, Completed>> =
            FuturesUnordered::new();
        let mut open = true;
        loop {
            // One clock reading per pass: what `next_batch` found paused, the wake-up below
            // is armed for (a later reading could find the pause just over, and arm nothing).
            let now = Instant::now();
            let mut started = false;
            while in_flight.len() < self.max_in_flight {
                match self.next_batch(now) {
                    Some(batch) => in_flight.push(batch),
                    None => break,
                }
                started = true;
            }
            if started && !self.answers.is_empty() {
                // The batches just formed go to MongoDB before the last batch's callers are
                // answered and its writes freed, which MongoDB need not wait for: they are
                // polled until they wait on it, once and again after the driver's connection
                // pool (a task of its own) has handed them a connection.
                let mut completed = Vec::new();
                poll_ready(&mut in_flight, &mut completed).await;
                tokio::task::yield_now().await;
                poll_ready(&mut in_flight, &mut completed).await;
                self.answer();
                for completed in completed {
                    self.complete(completed);
                }
                continue;
            }
            self.answer();
            metrics::BATCHES_IN_FLIGHT.set(in_flight.len() as i64);
            metrics::QUEUED_EVENTS.set(self.schedule.queued_events() as i64);
            let wake = self.heavy_wake(now);
            // Nothing in flight and writes queued: only a pause holds them, and its end wakes
            // the loop (nothing else may: a paced producer with a full window sends nothing).
            debug_assert!(
                !in_flight.is_empty() || self.schedule.is_empty() || wake.is_some(),
                "writes queued with nothing in flight and no wake-up armed"
            );
            tokio::select! {
                biased;
                Some(completed) = in_flight.next(), if !in_flight.is_empty() => {
                    self.complete(completed);
                }
                () = tokio::time::sleep_until(wake.unwrap_or(now).into()), if wake.is_some() => {}
                received = inbox.recv(), if open => match received {
                    Some(message) => {
                        self.receive(message);
                        // Everything queued meanwhile goes into the next batch together.
                        while let Ok(message) = inbox.try_recv() {
                            self.receive(message);
                        }
                    }
                    None => open = false,
                },
                else => return,
            }
        }
    }

    fn receive(&mut self, message: Message) {
        match message {
            Message::Submit(submission) => self.accept(submission),
            Message::StreamClosed { chain, producer } => {
                self.streams.remove(&chain);
                // Its client has gone: its writes still queued are dropped now, as a batch
                // forming would drop them (`next_batch`), so they neither wait for their turn
                // nor hold a new stream's writes of the same ids behind them.
                let (entries, requests) = (&self.entries, &self.requests);
                let gone = self.schedule.remove_producer(producer, |key| {
                    entries
                        .get(&key)
                        .and_then(|entry| requests.get(&entry.request))
                        .is_some_and(|request| request.caller.gone())
                });
                self.abandon(gone.into_iter().map(|write| write.key).collect());
            }
        }
    }

    fn accept(&mut self, submission: Submission) {
        let Submission {
            origin,
            writes,
            reply,
            caller,
        } = submission;
        let request_id = self.next_request;
        self.next_request += 1;
        let mut request = Request {
            outcomes: vec![None; writes.len()],
            unsettled: 0,
            error: None,
            reply,
            caller,
        };
        let response = origin.position.map(|position| position.index);
        // A write rejected on receipt stops the later writes of its id in this request; on a
        // stream, a failure answered in a response its sender had not received yet too.
        let mut failed: HashMap<Pid, Failure> = HashMap::new();
        if let Some(position) = origin.position {
            let stops = self.streams.entry(origin.chain).or_default();
            stops.retain(|_, stop| stop.until >= position.responses_received);
            for (pid, stop) in stops.iter() {
                failed.insert(pid.clone(), stop.failure.clone());
            }
        }
        for (index, write) in writes.into_iter().enumerate() {
            let ready = match write {
                Prepared::Rejected { named, reason } => {
                    request.outcomes[index] = Some(WriteOutcome::Rejected(reason));
                    if let Some((pid, failure)) = named {
                        self.heads.record_failure(&pid, failure.clone());
                        self.stop_on_stream(origin.chain, response, &pid, &failure);
                        failed.entry(pid).or_insert(failure);
                    }
                    continue;
                }
                Prepared::Ready(ready) => ready,
            };
            if let Some(failure) = failed.get(&ready.pid) {
                let reason = poisoned_reason(&ready.pid, failure);
                request.outcomes[index] = Some(WriteOutcome::Conflict(reason));
                continue;
            }
            let key = self.next_key;
            self.next_key += 1;
            self.schedule.push(Queued {
                key,
                producer: origin.producer,
                group: origin.group,
                pid: ready.pid.clone(),
                events: ready.events.len(),
                bytes: ready.documents.iter().map(EncodedEvent::len).sum(),
            });
            self.entries.insert(
                key,
                Entry {
                    request: request_id,
                    index,
                    chain: origin.chain,
                    response,
                    ready: Some(ready),
                },
            );
            request.unsettled += 1;
        }
        if request.unsettled == 0 {
            finish(request);
        } else {
            self.requests.insert(request_id, request);
        }
    }

    /// A write of `pid` failed on the stream `chain`, answered in `response`: the stream's
    /// writes of `pid` sent before that response was received are stopped. (Writes stopped
    /// by it do not extend that: a client that has the failure may write the id again.)
    fn stop_on_stream(&mut self, chain: u64, response: Option<u64>, pid: &Pid, failure: &Failure) {
        let (Some(response), Some(stops)) = (response, self.streams.get_mut(&chain)) else {
            return;
        };
        stops
            .entry(pid.clone())
            .and_modify(|stop| stop.until = stop.until.max(response))
            .or_insert_with(|| StreamStop {
                failure: failure.clone(),
                until: response,
            });
    }

    /// When a heavy producer paused at `now` (see [`Committer::next_batch`]) may start again,
    /// if later than `now`: at the end of its pacing pause, or `HEAVY_MAX_WAIT` after the last
    /// heavy batch started beside light ones in flight.
    fn heavy_wake(&self, now: Instant) -> Option<Instant> {
        let resume = self.heavy_resume.filter(|resume| *resume > now);
        let beside_light = self
            .heavy_started
            .map(|started| started + HEAVY_MAX_WAIT)
            .filter(|at| self.light_in_flight > 0 && *at > now);
        resume.into_iter().chain(beside_light).min()
    }

    /// The next admissible batch at `now`, as a future for [`Committer::run`] to poll.
    fn next_batch(&mut self, now: Instant) -> Option<BoxFuture<'static, Completed>> {
        let light = light_activity(&self.light_seen, &self.heavy_groups, now);
        let light_active = light.is_some();
        let limits = Limits {
            light_active,
            light_only_group: light.flatten(),
            exempt_busy: self.exempt_in_flight > 0,
            heavy_paused: light_active
                && (self.heavy_resume.is_some_and(|resume| now < resume)
                    || self.light_in_flight > 0
                        && self
                            .heavy_started
                            .is_some_and(|started| now.duration_since(started) < HEAVY_MAX_WAIT)),
            ..self.limits
        };
        let admitted = self.schedule.next_batch(limits);
        if admitted.is_empty() {
            return None;
        }
        let heavy = !self.schedule.served_light();
        let exempt = self.schedule.served_exempt();
        let mut heads = HashMap::new();
        let mut pids: Vec<Pid> = Vec::new();
        let mut producers: Vec<u64> = Vec::new();
        let mut groups: Vec<u64> = Vec::new();
        let mut seen = HashSet::new();
        let mut writes = Vec::with_capacity(admitted.len());
        let mut abandoned = Vec::new();
        for (order, queued) in admitted.into_iter().enumerate() {
            // Busy in the schedule from now on: released with the batch, whatever happens.
            if pids.last() != Some(&queued.pid) && seen.insert(queued.pid.clone()) {
                if let Some(head) = self.heads.valid(&queued.pid, now) {
                    heads.insert(queued.pid.clone(), head);
                }
                pids.push(queued.pid.clone());
            }
            if !producers.contains(&queued.producer) {
                producers.push(queued.producer);
            }
            if !groups.contains(&queued.group) {
                groups.push(queued.group);
            }
            let Some(entry) = self.entries.get_mut(&queued.key) else {
                continue;
            };
            // Its caller has gone while it waited: it is not sent (see `Caller`; a batch checks
            // again before each round and each insert, `batch::execute`).
            let Some(caller) = self
                .requests
                .get(&entry.request)
                .map(|request| request.caller.clone())
                .filter(|caller| !caller.gone())
            else {
                abandoned.push(queued.key);
                continue;
            };
            let Some(ready) = entry.ready.take() else {
                continue;
            };
            writes.push(BatchWrite {
                key: queued.key,
                order,
                chain: entry.chain,
                caller,
                pid: ready.pid,
                first: ready.first,
                last: ready.last,
                events: ready.events,
                documents: ready.documents,
            });
        }
        // A batch whose writes were all abandoned only releases its ids in the schedule when it
        // completes: it neither paces the heavy producer nor holds it back as one in flight,
        // nor counts as a light or heavy producer's activity.
        let counted = !writes.is_empty();
        let paces = counted && heavy && !exempt;
        if counted {
            if paces {
                self.heavy_started = Some(now);
            } else if heavy {
                self.exempt_in_flight += 1;
            } else {
                self.light_in_flight += 1;
            }
            if heavy {
                if self.heavy_groups.len() > MAX_HEAVY_GROUPS {
                    self.heavy_groups
                        .retain(|_, at| now.duration_since(*at) < LIGHT_ACTIVITY);
                }
                self.heavy_groups
                    .extend(groups.into_iter().map(|group| (group, now)));
            } else {
                for group in groups {
                    self.light_seen.saw(group, now);
                }
            }
        }
        // Recorded as their ids' failures first, so this batch's gap conflicts name them too.
        self.abandon(abandoned);
        let failures = pids
            .iter()
            .filter_map(|pid| Some((pid.clone(), self.heads.failure(pid)?.clone())))
            .collect();
        let panicked = Panicked::of(&writes);
        let store = self.store.clone();
        let trust = self.trust;
        let batch = Batch {
            writes,
            heads,
            failures,
        };
        // Polled by this task, not spawned: a lone write then costs two task wake-ups (to
        // here, and back to its caller) instead of four. A panic must not take the writer
        // down, so it becomes an error for the batch's writes.
        Some(Box::pin(async move {
            let running = AssertUnwindSafe(batch::execute(batch, &store, trust));
            let done = running
                .catch_unwind()
                .await
                .unwrap_or_else(|_| panicked.done());
            Completed {
                pids,
                producers,
                done,
                heavy,
                paces,
                counted,
                started: now,
            }
        }))
    }

    fn complete(&mut self, completed: Completed) {
        let Completed {
            pids,
            producers,
            done,
            heavy,
            paces,
            counted,
            started,
        } = completed;
        if counted && !heavy {
            self.light_in_flight -= 1;
        } else if counted && !paces {
            self.exempt_in_flight -= 1;
        }
        if paces {
            // Pacing: while light producers write, a heavy producer gets MongoDB at most a
            // ninth of the time (HEAVY_PAUSE_FACTOR), so their writes do not queue behind its
            // inserts for CPU and journal.
            let took = started.elapsed();
            self.heavy_resume = Some(Instant::now() + took * HEAVY_PAUSE_FACTOR);
        }
        // The failed writes' later writes of the same id and chain still queued fail too (and
        // on a stream, the ones its client sends before it has the failure's answer). Before
        // the outcomes are settled: the failed writes' entries say which response they are in.
        for ((chain, pid), FailedWrite { key, failure, .. }) in done.failed {
            let response = self.entries.get(&key).and_then(|entry| entry.response);
            self.stop_on_stream(chain, response, &pid, &failure);
            let entries = &self.entries;
            let stopped = self.schedule.remove_where(&pid, |key| {
                entries.get(&key).is_some_and(|entry| entry.chain == chain)
            });
            for write in stopped {
                let reason = poisoned_reason(&pid, &failure);
                self.settle(write.key, Ok(WriteOutcome::Conflict(reason)));
            }
        }
        // Answered once the next batches are on their way (see `run`).
        self.answers.extend(done.outcomes);
        self.spent.extend(done.spent);
        for (pid, head) in done.heads {
            match head {
                Some(head) => self.heads.set(&pid, head),
                None => self.heads.forget(&pid),
            }
        }
        for (pid, update) in done.failures {
            match update.apply(self.heads.failure(&pid)) {
                Some(failure) => self.heads.record_failure(&pid, failure),
                None => self.heads.clear_failure(&pid),
            }
        }
        self.schedule.release(&pids, producers);
    }

    /// Answers the outcomes of the batches completed, and frees their writes.
    fn answer(&mut self) {
        let mut answers = std::mem::take(&mut self.answers);
        for (key, outcome) in answers.drain(..) {
            self.settle(key, outcome);
        }
        self.answers = answers;
        self.spent.clear();
    }

    /// Settles writes not sent because their caller has gone (nobody gets the outcome), and
    /// records them as their ids' failures, as a batch does (`batch::Run::drop_abandoned`).
    fn abandon(&mut self, keys: Vec<WriteKey>) {
        metrics::ABANDONED_WRITES.inc_by(keys.len() as u64);
        for key in keys {
            if let Some(ready) = self
                .entries
                .get(&key)
                .and_then(|entry| entry.ready.as_ref())
            {
                let own = Failure {
                    first: ready.first,
                    last: ready.last,
                    reason: CALLER_GONE.to_owned(),
                };
                let failure = Failure::after(self.heads.failure(&ready.pid), own);
                self.heads.record_failure(&ready.pid, failure);
            }
            self.settle(key, Err(Caller::gone_error()));
        }
    }

    fn settle(&mut self, key: WriteKey, outcome: Result<WriteOutcome, JournalError>) {
        let Some(entry) = self.entries.remove(&key) else {
            return;
        };
        let Some(request) = self.requests.get_mut(&entry.request) else {
            return;
        };
        match outcome {
            Ok(outcome) => request.outcomes[entry.index] = Some(outcome),
            Err(error) => {
                request.error.get_or_insert(error);
            }
        }
        request.unsettled -= 1;
        if request.unsettled == 0
            && let Some(request) = self.requests.remove(&entry.request)
        {
            finish(request);
        }
    }
}

/// What a batch's writes become should it panic: an error each, their ids' knowledge
/// forgotten (an insert may have been applied), and the later writes of their chains stopped.
struct Panicked {
    /// `(key, order, chain, pid, first, last)` of each write, in batch order.
    writes: Vec<(WriteKey, usize, u64, Pid, i64, i64)>,
}

impl Panicked {
    fn of(writes: &[BatchWrite]) -> Self {
        let writes = writes
            .iter()
            .map(|write| {
                let BatchWrite {
                    key,
                    order,
                    chain,
                    first,
                    last,
                    ..
                } = *write;
                (key, order, chain, write.pid.clone(), first, last)
            })
            .collect();
        Self { writes }
    }

    fn done(self) -> Done {
        tracing::error!("a journal write batch panicked");
        let reason = "a journal write batch failed";
        let error = JournalError::Internal(reason.to_owned());
        let mut done = Done::default();
        for (key, order, chain, pid, first, last) in self.writes {
            done.outcomes.push((key, Err(error.clone())));
            done.heads.insert(pid.clone(), None);
            done.failed.entry((chain, pid)).or_insert(FailedWrite {
                key,
                order,
                failure: Failure {
                    first,
                    last,
                    reason: reason.to_owned(),
                },
            });
        }
        done
    }
}

/// Polls `batches` once, collecting the ones that complete.
async fn poll_ready(
    batches: &mut FuturesUnordered<BoxFuture<'static, Completed>>,
    completed: &mut Vec<Completed>,
) {
    std::future::poll_fn(|cx| {
        while let Poll::Ready(Some(batch)) = batches.poll_next_unpin(cx) {
            completed.push(batch);
        }
        Poll::Ready(())
    })
    .await;
}

/// Answers a request whose writes are all settled.
fn finish(request: Request) {
    let outcomes = match request.error {
        Some(error) => Err(error),
        None => request
            .outcomes
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| JournalError::Internal("a write was left without outcome".to_owned())),
    };
    // The caller may have gone (client cancelled) after its writes went to MongoDB; they stand.
    let _ = request.reply.send(outcomes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clients_connections_are_producers_of_one_group_from_its_own_host_only() {
        let address = |text: &str| Some(text.parse::<SocketAddr>().unwrap());
        let first = Origin::call(address("10.0.0.1:5000"), Some(7));
        let second = Origin::call(address("10.0.0.1:5001"), Some(7));
        assert_ne!(first.producer, second.producer, "a producer per connection");
        assert_eq!(first.group, second.group, "one group: the client's");
        let elsewhere = Origin::call(address("10.0.0.2:5000"), Some(7));
        assert_ne!(elsewhere.group, first.group, "another host cannot join it");
        let other = Origin::call(address("10.0.0.1:5002"), Some(8));
        assert_ne!(other.group, first.group);
        let unnamed = Origin::call(address("10.0.0.1:5003"), None);
        assert_eq!(
            unnamed.group, unnamed.producer,
            "without a name, a group of its own"
        );
        let again = Origin::call(address("10.0.0.1:5000"), Some(7));
        assert_eq!((again.producer, again.group), (first.producer, first.group));
        assert_ne!(again.chain, first.chain, "each call a chain of its own");
    }

    #[test]
    fn a_client_with_heavy_batches_of_its_own_gets_no_light_protection() {
        let start = Instant::now();
        let at = |millis: u64| start + Duration::from_millis(millis);
        let (client, other) = (1, 2);
        let mut seen = LightSeen::default();
        seen.saw(client, at(0));
        let mut heavy = HashMap::new();
        assert_eq!(
            light_activity(&seen, &heavy, at(10)),
            Some(Some(client)),
            "its light writes count while it has no heavy batches"
        );
        heavy.insert(other, at(5));
        assert_eq!(
            light_activity(&seen, &heavy, at(10)),
            Some(Some(client)),
            "another client's heavy batches change nothing"
        );
        heavy.insert(client, at(5));
        assert_eq!(
            light_activity(&seen, &heavy, at(10)),
            None,
            "its light writes pace nobody while it writes heavy batches too"
        );
        let later = at(5) + LIGHT_ACTIVITY;
        seen.saw(client, later);
        assert_eq!(
            light_activity(&seen, &heavy, later),
            Some(Some(client)),
            "its heavy batches are forgotten after the light-activity window"
        );
        seen.saw(other, later);
        assert_eq!(
            light_activity(&seen, &heavy, later),
            Some(None),
            "light writes of several clients always count"
        );
        assert_eq!(light_activity(&seen, &heavy, later + LIGHT_ACTIVITY), None);
    }
}
