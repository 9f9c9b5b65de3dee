//! The read horizon: how far a query may read without passing over a write still in flight.
//!
//! Every event and durable-state change gets its position stamp (`writtenAt`) from its
//! eventjournal server before it goes to MongoDB, and becomes visible when it commits, a little
//! later. So a query must not read past a stamp whose write may still commit.
//!
//! [`Watermarks`] is the one clock positions are stamped with, and it knows which of this
//! server's stamps are still in flight ([`InFlight`], held from stamping until the write is
//! acknowledged or has certainly failed). In watermark mode each server publishes, every
//! `read-journal.watermark-interval`, one document in the `watermarks` collection:
//!
//! ```text
//! { _id: <server>, seq, watermark, clock, leaseMillis, renewedAt: $$NOW }
//! ```
//!
//! `watermark` says "every write I stamped at or before this has committed or failed, and I
//! stamp nothing at or before it again"; `renewedAt` (MongoDB's clock) is its lease. A query
//! reads up to the lowest watermark of the servers whose documents it sees, this server's own
//! value taken fresh. A server whose lease ran out is retired by the next server that notices:
//! a majority-acknowledged delete of its document, after which every write the dead server had
//! applied in MongoDB is majority-committed (it precedes the delete in the oplog), so nothing
//! of it can commit behind a query any more. `docs/READ_JOURNAL.md` has the whole argument and
//! the test of each case.
//!
//! In fixed-drift mode (`read-journal.horizon = "fixed-drift"`, and CosmosDB) the horizon is
//! `now - allowed-time-drift` and nothing is published.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::TryStreamExt;
use mongodb::bson::{DateTime, Document, doc};
use mongodb::{Collection, Database};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use config::{HorizonMode, Settings};

use crate::MongoError;
use crate::retry::Retry;

/// Fields of a watermark document.
const SEQ: &str = "seq";
const WATERMARK: &str = "watermark";
const CLOCK: &str = "clock";
const LEASE_MILLIS: &str = "leaseMillis";
const RENEWED_AT: &str = "renewedAt";
/// The `renewedAt` of the renewal acknowledged before this publication was computed: a
/// publication whose `basedOn` is later than a moment was computed after that moment.
const BASED_ON: &str = "basedOn";

/// A server trusts its own lease for this part of it: the rest covers the clock rates of this
/// host and MongoDB's (and a new primary's) disagreeing while a renewal ages.
const LEASE_TRUSTED_FRACTION: f64 = 0.8;

/// The one clock of this server's position stamps, which writes are in flight, and (in
/// watermark mode) the watermarks every server published. Cheap to clone.
#[derive(Clone)]
pub struct Watermarks {
    inner: Arc<Inner>,
}

struct Inner {
    offset_millis: i64,
    mode: Mode,
    state: Mutex<State>,
    /// The latest round of the publisher (watermark mode).
    rounds: watch::Sender<Round>,
    /// The publisher's task, awaited before leaving.
    publishing: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

enum Mode {
    FixedDrift { drift: Duration },
    Published(Publisher),
}

struct Publisher {
    watermarks: Collection<Document>,
    retry: Retry,
    server: String,
    interval: Duration,
    lease: Duration,
}

struct State {
    /// The last millisecond the clock gave: it never goes back, and follows the clocks other
    /// servers publish when they run ahead (so clock skew does not hold queries back).
    clock: i64,
    /// Stamps of this epoch still in flight, with how many writes hold each.
    in_flight: BTreeMap<i64, usize>,
    /// Changes when this server finds it was retired and when it has joined again: a write
    /// stamped in an earlier epoch may have been passed over by queries and is re-stamped when
    /// it is acknowledged.
    epoch: u64,
    /// Until when this server's lease certainly holds (no other server may retire it before).
    lease_holds_until: Option<Instant>,
    /// The `seq` of this server's latest publication attempt (it only grows).
    seq: i64,
    /// The `clock` of this server's last acknowledged publication: the furthest its own
    /// contribution to a horizon may reach (a server joining reads it as its floor).
    published_clock: i64,
    /// The current epoch took its floor from the other servers' clocks (`join` finished).
    joined: bool,
    /// The highest live horizon given so far: horizons never go back (a subscriber that
    /// catches up to one joins a tail that may have read up to another).
    horizon: i64,
    /// `renewedAt` of this server's last acknowledged renewal, published as `basedOn`.
    based_on: Option<DateTime>,
}

impl State {
    fn tick(&mut self, offset_millis: i64) -> i64 {
        self.clock = self.clock.max(system_millis() + offset_millis);
        self.clock
    }

    /// Everything this server stamped at or before the result is settled, and it stamps
    /// nothing at or before it again.
    fn watermark(&mut self, offset_millis: i64) -> i64 {
        let now = self.tick(offset_millis);
        let oldest = self.in_flight.keys().next().copied().unwrap_or(now);
        oldest.min(now) - 1
    }

    /// This server's document certainly exists with a watermark other servers respect, and
    /// its clock is above every horizon computed without it.
    fn lease_holds(&self) -> bool {
        self.joined
            && self
                .lease_holds_until
                .is_some_and(|until| Instant::now() <= until)
    }

    /// A new epoch: stamps of the old one stop holding the watermark (their writes are
    /// re-stamped when acknowledged, see [`Watermarks::acknowledged`]).
    fn new_epoch(&mut self) {
        self.epoch += 1;
        self.in_flight.clear();
        self.lease_holds_until = None;
        self.joined = false;
        self.based_on = None;
    }
}

/// What one publisher round saw: the other servers' published watermarks.
#[derive(Debug, Clone, Default)]
struct Round {
    /// When its read of the watermarks collection started.
    read_started: Option<Instant>,
    /// MongoDB's time during that read (none when no other server was there).
    read_at: Option<DateTime>,
    /// This server's last acknowledged publication's clock before that read.
    own_cap: i64,
    peers: Vec<Peer>,
}

#[derive(Debug, Clone)]
struct Peer {
    server: String,
    watermark: i64,
    clock: i64,
    based_on: Option<DateTime>,
}

/// A position stamp, holding this server's watermark below it while its write is in flight.
/// Dropping it says the write was acknowledged or certainly failed.
pub struct InFlight {
    inner: Option<Arc<Inner>>,
    millis: i64,
    epoch: u64,
    /// Handed to a task by a panic, to hold the watermark for a lease. Dropped again during a
    /// panic (the runtime shutting down cancels that task), it lets go at once.
    held_after_panic: bool,
}

impl InFlight {
    pub fn millis(&self) -> i64 {
        self.millis
    }

    pub fn date_time(&self) -> DateTime {
        DateTime::from_millis(self.millis)
    }

    /// The write's outcome is unknown (it may still commit): keep holding the watermark for a
    /// lease, the time another server would take to stop counting this one, then let go.
    pub fn release_after_lease(self) {
        let Some(inner) = &self.inner else {
            return;
        };
        let Mode::Published(publisher) = &inner.mode else {
            return;
        };
        let lease = publisher.lease;
        tokio::spawn(async move {
            tokio::time::sleep(lease).await;
            drop(self);
        });
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let Some(inner) = self.inner.take() else {
            return;
        };
        if std::thread::panicking() && !self.held_after_panic {
            // A panic unwinds through the code that held the write: its outcome is unknown.
            if let (Mode::Published(publisher), Ok(runtime)) =
                (&inner.mode, tokio::runtime::Handle::try_current())
            {
                let lease = publisher.lease;
                let held = InFlight {
                    inner: Some(inner),
                    millis: self.millis,
                    epoch: self.epoch,
                    held_after_panic: true,
                };
                runtime.spawn(async move {
                    tokio::time::sleep(lease).await;
                    drop(held);
                });
                return;
            }
        }
        let mut state = lock(&inner.state);
        if state.epoch != self.epoch {
            return;
        }
        if let Some(count) = state.in_flight.get_mut(&self.millis) {
            *count -= 1;
            if *count == 0 {
                state.in_flight.remove(&self.millis);
            }
        }
    }
}

/// When a write was acknowledged, as far as lateness goes: a write stamped before
/// `late_before` may have been passed over by queries and must be re-stamped.
#[derive(Debug, Clone, Copy)]
pub struct Acknowledged {
    late_before: i64,
}

impl Acknowledged {
    pub fn is_late(&self, stamped_millis: i64) -> bool {
        stamped_millis < self.late_before
    }
}

/// This server could not hold its watermark lease, so it cannot place a late write where live
/// queries will see it.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "this server could not renew its watermark lease within {waited:?} (MongoDB is not \
     accepting its watermark)"
)]
pub struct NotLeased {
    pub waited: Duration,
}

/// The horizon of a current query could not be settled in time.
#[derive(Debug, thiserror::Error)]
#[error(
    "the read horizon did not reach this query's start within {waited:?}: MongoDB is not \
     accepting the servers' watermarks"
)]
pub struct HorizonUnavailable {
    pub waited: Duration,
}

fn not_leased(operation: &'static str, since: Instant) -> MongoError {
    MongoError::NotLeased {
        operation,
        source: NotLeased {
            waited: since.elapsed(),
        },
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn system_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as i64)
}

impl Watermarks {
    fn with_mode(mode: Mode, offset_millis: i64) -> Self {
        let (rounds, _) = watch::channel(Round::default());
        Self {
            inner: Arc::new(Inner {
                offset_millis,
                mode,
                state: Mutex::new(State {
                    clock: i64::MIN,
                    in_flight: BTreeMap::new(),
                    epoch: 0,
                    lease_holds_until: None,
                    seq: 0,
                    published_clock: i64::MIN,
                    joined: false,
                    horizon: i64::MIN,
                    based_on: None,
                }),
                rounds,
                publishing: Mutex::new(None),
            }),
        }
    }

    /// Fixed-drift mode: the horizon is `now - drift`; nothing is published.
    pub fn fixed_drift(drift: Duration, offset_millis: i64) -> Self {
        Self::with_mode(Mode::FixedDrift { drift }, offset_millis)
    }

    /// The stamps and horizons of a server with `settings`: in watermark mode it joins (its
    /// document is written and the others are read) before this returns, and publishes every
    /// `watermark-interval` until `shutdown`.
    pub async fn start(
        database: &Database,
        settings: &Settings,
        shutdown: CancellationToken,
    ) -> Result<Self, MongoError> {
        let read = &settings.read_journal;
        let offset = settings.testing.clock_offset_millis;
        if settings.horizon_mode() == HorizonMode::FixedDrift {
            return Ok(Self::fixed_drift(read.allowed_time_drift, offset));
        }
        let publisher = Publisher {
            watermarks: database.collection(&settings.mongodb.collections.watermarks),
            retry: Retry::new(&settings.mongodb.retry),
            server: uuid::Uuid::new_v4().to_string(),
            interval: read.watermark_interval,
            lease: read.watermark_lease,
        };
        let retry = publisher.retry.clone();
        let watermarks = Self::with_mode(Mode::Published(publisher), offset);
        let operation = "join the servers publishing watermarks";
        retry
            .run(operation, || watermarks.join())
            .await
            .map_err(|error| retry.failure(operation, true, error))?;
        let task = tokio::spawn(watermarks.clone().publish(shutdown));
        *lock(&watermarks.inner.publishing) = Some(task);
        Ok(watermarks)
    }

    fn publisher(&self) -> Option<&Publisher> {
        match &self.inner.mode {
            Mode::Published(publisher) => Some(publisher),
            Mode::FixedDrift { .. } => None,
        }
    }

    /// Whether the horizon is `now - allowed-time-drift` (nothing published).
    pub fn is_fixed_drift(&self) -> bool {
        self.publisher().is_none()
    }

    /// This server's id in the watermarks collection (`None` in fixed-drift mode).
    pub fn server_id(&self) -> Option<&str> {
        self.publisher().map(|publisher| publisher.server.as_str())
    }

    /// The clock positions are stamped with, in milliseconds (never goes back).
    pub fn now_millis(&self) -> i64 {
        lock(&self.inner.state).tick(self.inner.offset_millis)
    }

    /// A position stamp for a write about to be sent, held in flight until dropped.
    pub fn stamp(&self) -> InFlight {
        let mut state = lock(&self.inner.state);
        let millis = state.tick(self.inner.offset_millis);
        if self.publisher().is_none() {
            return InFlight {
                inner: None,
                millis,
                epoch: 0,
                held_after_panic: false,
            };
        }
        *state.in_flight.entry(millis).or_default() += 1;
        InFlight {
            inner: Some(Arc::clone(&self.inner)),
            millis,
            epoch: state.epoch,
            held_after_panic: false,
        }
    }

    /// A stamp for `operation`, moving a late write forward: in watermark mode, taken once
    /// this server holds its lease in a joined epoch (waiting up to a lease for that), so it
    /// lies above every horizon any server may compute before this server publishes again.
    pub async fn fresh_stamp(&self, operation: &'static str) -> Result<InFlight, MongoError> {
        let Some(publisher) = self.publisher() else {
            return Ok(self.stamp());
        };
        let asked = Instant::now();
        let limit = publisher.lease + 4 * publisher.interval;
        let mut rounds = self.inner.rounds.subscribe();
        loop {
            if lock(&self.inner.state).lease_holds() {
                return Ok(self.stamp());
            }
            if wait_for_change(&mut rounds, asked, limit).await.is_err() {
                return Err(not_leased(operation, asked));
            }
        }
    }

    /// Every move of a late write, begun at `began`, was acknowledged late too: in watermark
    /// mode the call fails (the write is stored; a retry moves it again); with the fixed drift
    /// it stays where it is (`Ok`, for the caller to log).
    pub fn restamps_exhausted(
        &self,
        operation: &'static str,
        began: Instant,
    ) -> Result<(), MongoError> {
        match self.publisher() {
            // Each move was stamped under a holding lease and still acknowledged after it
            // lapsed: the client hears that the write is stored and may retry it.
            Some(_) => Err(not_leased(operation, began)),
            None => Ok(()),
        }
    }

    /// Call when `stamp`'s write was acknowledged: which of its stamps are late.
    /// Fixed drift: stamps more than half the drift old (the other half is left for clock
    /// skew). Watermarks: all of them if this server's lease may have lapsed since it stamped
    /// (another server may have retired it and read past the stamp), none otherwise.
    pub fn acknowledged(&self, stamp: &InFlight) -> Acknowledged {
        let mut state = lock(&self.inner.state);
        match &self.inner.mode {
            Mode::FixedDrift { drift } => Acknowledged {
                late_before: state.tick(self.inner.offset_millis) - (*drift / 2).as_millis() as i64,
            },
            Mode::Published(_) => Acknowledged {
                late_before: if state.epoch == stamp.epoch && state.lease_holds() {
                    i64::MIN
                } else {
                    i64::MAX
                },
            },
        }
    }

    /// Whether an event found stored with stamp `stored_millis` (a retried write) may have been
    /// passed over by queries: it is older than what the horizon waits for (half the drift, or
    /// a lease: a server that gave up on a write holds it that long), or this server's lease
    /// may have lapsed.
    pub fn stored_late(&self, stored_millis: i64) -> bool {
        let mut state = lock(&self.inner.state);
        let now = state.tick(self.inner.offset_millis);
        match &self.inner.mode {
            Mode::FixedDrift { drift } => now - stored_millis > (*drift / 2).as_millis() as i64,
            Mode::Published(publisher) => {
                now - stored_millis > publisher.lease.as_millis() as i64 || !state.lease_holds()
            }
        }
    }

    /// How far a live query may read now: every position at or before it that will ever exist
    /// is visible to majority reads.
    pub fn live_horizon(&self) -> i64 {
        let mut state = lock(&self.inner.state);
        match &self.inner.mode {
            Mode::FixedDrift { drift } => {
                state.tick(self.inner.offset_millis) - drift.as_millis() as i64
            }
            Mode::Published(_) => {
                // Without a holding lease this server may have been retired, and a server
                // joining meanwhile is not in its round: it stays where it was.
                if !state.lease_holds() {
                    return state.horizon;
                }
                let own = state.watermark(self.inner.offset_millis);
                let round = self.inner.rounds.borrow();
                let peers = round.peers.iter().map(|peer| peer.watermark).min();
                let horizon = own.min(round.own_cap).min(peers.unwrap_or(i64::MAX));
                drop(round);
                state.horizon = state.horizon.max(horizon);
                state.horizon
            }
        }
    }

    /// How far a current query issued now reads: the live horizon, once it has passed every
    /// write any server acknowledged before now (read-your-writes). Takes about two
    /// publication intervals with other servers running; longer while a server that stopped
    /// is still leased, at most about a lease.
    pub async fn current_horizon(&self) -> Result<i64, HorizonUnavailable> {
        let Some(publisher) = self.publisher() else {
            return Ok(self.live_horizon());
        };
        let asked = Instant::now();
        let mut target = self.now_millis();
        let limit = 2 * publisher.lease + 10 * publisher.interval;
        let mut rounds = self.inner.rounds.subscribe();
        // 1. The servers' documents and MongoDB's time, read after this call: every server that
        //    acknowledged a write before it is there (it joined before that write).
        let (first, read_at) = match self.read_peers(publisher).await {
            Ok(peers) => {
                let read_at = mongo_time(&peers);
                (peers.into_iter().map(Peer::from).collect(), read_at)
            }
            // MongoDB is failing: go by the publisher's rounds instead.
            Err(_) => loop {
                {
                    let round = rounds.borrow_and_update();
                    if round.read_started.is_some_and(|started| started > asked) {
                        break (round.peers.clone(), round.read_at);
                    }
                }
                wait_for_change(&mut rounds, asked, limit).await?;
            },
        };
        let first_read = Instant::now();
        // 2. Per such server, a publication computed after this call: based on a renewal
        //    MongoDB applied after the read above. Its clock then is at least the stamp of any
        //    write that server acknowledged before the call. A server missing from a round read
        //    after step 1 was retired: it is settled.
        let mut pending: Vec<String> = if read_at.is_some() {
            first.into_iter().map(|peer| peer.server).collect()
        } else {
            Vec::new()
        };
        while !pending.is_empty() {
            {
                let round = rounds.borrow_and_update();
                let read_after = round
                    .read_started
                    .is_some_and(|started| started > first_read);
                pending.retain(|server| {
                    match round.peers.iter().find(|peer| peer.server == *server) {
                        None => !read_after,
                        Some(peer) if peer.based_on > read_at => {
                            target = target.max(peer.clock);
                            false
                        }
                        Some(_) => true,
                    }
                });
            }
            if !pending.is_empty() {
                wait_for_change(&mut rounds, asked, limit).await?;
            }
        }
        // 3. Every server's watermark (this one's included) past those clocks.
        loop {
            let horizon = self.live_horizon();
            if horizon >= target {
                return Ok(horizon);
            }
            wait_for_change(&mut rounds, asked, limit).await?;
        }
    }

    /// Removes this server's document so it holds nobody back; call when its writes are over.
    /// With writes of this server possibly still in flight (their outcome unknown), it stays,
    /// and the others retire it when its lease runs out. Call after the publisher was told to
    /// stop.
    pub async fn leave(&self) {
        let Some(publisher) = self.publisher() else {
            return;
        };
        let task = lock(&self.inner.publishing).take();
        if let Some(task) = task {
            let _ = task.await;
        }
        let in_flight: usize = lock(&self.inner.state).in_flight.values().sum();
        if in_flight > 0 {
            tracing::info!(
                in_flight,
                "writes of this server may still commit; its watermark stays until its lease \
                 runs out"
            );
            return;
        }
        if let Err(error) = publisher
            .watermarks
            .delete_one(doc! { "_id": &publisher.server })
            .await
        {
            tracing::warn!(error = %crate::describe_chain(&error), "could not remove this server's watermark; other servers retire it when its lease runs out");
        }
    }

    /// Writes this server's document anew (a new epoch) and takes the other servers' clocks
    /// as its floor, so it stamps nothing at or below a horizon a query computed without it.
    async fn join(&self) -> Result<(), mongodb::error::Error> {
        let Some(publisher) = self.publisher() else {
            return Ok(());
        };
        let (seq, watermark, clock) = {
            let mut state = lock(&self.inner.state);
            state.new_epoch();
            state.seq += 1;
            let watermark = state.watermark(self.inner.offset_millis);
            (state.seq, watermark, state.clock)
        };
        let sent = Instant::now();
        publisher
            .watermarks
            .update_one(
                doc! { "_id": &publisher.server },
                vec![doc! { "$replaceWith": {
                    "_id": &publisher.server,
                    SEQ: seq,
                    WATERMARK: watermark,
                    CLOCK: clock,
                    LEASE_MILLIS: publisher.lease.as_millis() as i64,
                    RENEWED_AT: "$$NOW",
                } }],
            )
            .upsert(true)
            .await?;
        let peers = self.read_peers(publisher).await?;
        let mut state = lock(&self.inner.state);
        // Strictly above: a query on another server may have read up to its published clock.
        let floor = peers.iter().map(|peer| peer.clock.saturating_add(1)).max();
        state.clock = state.clock.max(floor.unwrap_or(i64::MIN));
        // Stamps given while joining were taken below that floor: a new epoch re-stamps them.
        state.new_epoch();
        state.joined = true;
        state.published_clock = clock.max(floor.unwrap_or(i64::MIN));
        state.lease_holds_until = Some(sent + publisher.lease.mul_f64(LEASE_TRUSTED_FRACTION));
        drop(state);
        self.inner.rounds.send_modify(|round| {
            round.read_started = Some(sent);
            round.read_at = mongo_time(&peers);
            round.own_cap = clock;
            round.peers = peers
                .into_iter()
                .filter(|peer| !peer.expired)
                .map(Peer::from)
                .collect();
        });
        Ok(())
    }

    /// Every `watermark-interval`: publish, then read the others (retiring expired ones).
    async fn publish(self, shutdown: CancellationToken) {
        let Some(publisher) = self.publisher() else {
            return;
        };
        let mut failures = 0_u32;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(publisher.interval) => {}
            }
            match self.round(publisher).await {
                Ok(()) => failures = 0,
                Err(error) => {
                    failures += 1;
                    // Once, then every 100 failures: MongoDB being away is reported elsewhere.
                    if failures % 100 == 1 {
                        tracing::warn!(error = %crate::describe_chain(&error), failures, "could not publish this server's watermark; queries wait for it");
                    }
                }
            }
        }
    }

    async fn round(&self, publisher: &Publisher) -> Result<(), mongodb::error::Error> {
        if !lock(&self.inner.state).joined {
            // A join that failed halfway (its document may exist, its floor was not taken).
            return self.join().await;
        }
        let (seq, watermark, clock, based_on) = {
            let mut state = lock(&self.inner.state);
            let watermark = state.watermark(self.inner.offset_millis);
            // A new number per attempt: one that failed may still have been applied.
            state.seq += 1;
            (state.seq, watermark, state.clock, state.based_on)
        };
        let sent = Instant::now();
        // The document is this server's as long as it exists: retiring deletes it. An earlier
        // attempt applied late (after a later one) does not match: values never go back.
        let renewed = publisher
            .watermarks
            .find_one_and_update(
                doc! { "_id": &publisher.server, SEQ: { "$lt": seq } },
                vec![doc! { "$set": {
                    SEQ: seq,
                    WATERMARK: watermark,
                    CLOCK: clock,
                    LEASE_MILLIS: publisher.lease.as_millis() as i64,
                    BASED_ON: based_on,
                    RENEWED_AT: "$$NOW",
                } }],
            )
            .projection(doc! { RENEWED_AT: 1 })
            .return_document(mongodb::options::ReturnDocument::After)
            .await?;
        let Some(renewed) = renewed else {
            tracing::warn!(
                server = %publisher.server,
                "this server's lease ran out and another server retired it; joining again \
                 (writes in flight are re-stamped when acknowledged)"
            );
            crate::metrics::WATERMARK_REJOINS.inc();
            lock(&self.inner.state).new_epoch();
            return self.join().await;
        };
        {
            let mut state = lock(&self.inner.state);
            if let Ok(renewed_at) = renewed.get_datetime(RENEWED_AT) {
                state.based_on = Some(*renewed_at);
            }
            state.published_clock = state.published_clock.max(clock);
            let until = sent + publisher.lease.mul_f64(LEASE_TRUSTED_FRACTION);
            state.lease_holds_until = Some(
                state
                    .lease_holds_until
                    .map_or(until, |held| held.max(until)),
            );
        }
        let read_started = Instant::now();
        let own_cap = lock(&self.inner.state).published_clock;
        let mut peers = Vec::new();
        let documents = self.read_peers(publisher).await?;
        let read_at = mongo_time(&documents);
        for peer in documents {
            if peer.expired && self.retire(publisher, &peer).await {
                continue;
            }
            peers.push(Peer::from(peer));
        }
        {
            // Follow a clock that runs ahead: stamps only ever move up, and a server whose
            // clock is behind then does not hold every query back by its skew.
            let mut state = lock(&self.inner.state);
            if let Some(ahead) = peers.iter().map(|peer| peer.clock).max() {
                state.clock = state.clock.max(ahead);
            }
        }
        crate::metrics::WATERMARK_SERVERS.set(peers.len() as i64 + 1);
        self.inner.rounds.send_replace(Round {
            read_started: Some(read_started),
            read_at,
            own_cap,
            peers,
        });
        Ok(())
    }

    /// The other servers' documents, each with whether its lease ran out by MongoDB's clock.
    async fn read_peers(
        &self,
        publisher: &Publisher,
    ) -> Result<Vec<PeerDocument>, mongodb::error::Error> {
        let pipeline = vec![
            doc! { "$match": { "_id": { "$ne": &publisher.server } } },
            doc! { "$project": {
                SEQ: 1, WATERMARK: 1, CLOCK: 1, BASED_ON: 1,
                "expired": lease_expired(),
                "now": "$$NOW",
            } },
        ];
        let documents: Vec<Document> = publisher
            .watermarks
            .aggregate(pipeline)
            .await?
            .try_collect()
            .await?;
        Ok(documents.iter().filter_map(PeerDocument::parse).collect())
    }

    /// Removes an expired server's document, majority-acknowledged, unless it renewed
    /// meanwhile. True once it is gone: everything that server had applied in MongoDB precedes
    /// the delete in the oplog, so it is majority-committed too.
    async fn retire(&self, publisher: &Publisher, peer: &PeerDocument) -> bool {
        let filter = doc! {
            "_id": &peer.server,
            SEQ: peer.seq,
            "$expr": lease_expired(),
        };
        match publisher.watermarks.delete_one(filter).await {
            Ok(deleted) if deleted.deleted_count == 1 => {
                tracing::warn!(server = %peer.server, watermark = peer.watermark, "retired a server whose watermark lease ran out; queries no longer wait for it");
                crate::metrics::WATERMARK_RETIREMENTS.inc();
                true
            }
            // Renewed, or retired by another server (seen gone in a later majority read).
            Ok(_) => false,
            Err(error) => {
                tracing::debug!(error = %crate::describe_chain(&error), "could not retire an expired server yet");
                false
            }
        }
    }
}

/// Whether a watermark document's lease ran out, by MongoDB's clock.
fn lease_expired() -> Document {
    doc! { "$lt": [ { "$add": [ format!("${RENEWED_AT}"), format!("${LEASE_MILLIS}") ] }, "$$NOW" ] }
}

/// Waits for the next publisher round (or a moment, since this server's own watermark moves
/// without one), failing once `limit` has passed since `asked`.
async fn wait_for_change(
    rounds: &mut watch::Receiver<Round>,
    asked: Instant,
    limit: Duration,
) -> Result<(), HorizonUnavailable> {
    let waited = asked.elapsed();
    if waited > limit {
        return Err(HorizonUnavailable { waited });
    }
    tokio::select! {
        _ = rounds.changed() => {}
        () = tokio::time::sleep(Duration::from_millis(5)) => {}
    }
    Ok(())
}

struct PeerDocument {
    server: String,
    seq: i64,
    watermark: i64,
    clock: i64,
    based_on: Option<DateTime>,
    expired: bool,
    /// MongoDB's time when it was read.
    now: Option<DateTime>,
}

/// MongoDB's time when `documents` were read (none when there were none).
fn mongo_time(documents: &[PeerDocument]) -> Option<DateTime> {
    documents.iter().filter_map(|document| document.now).max()
}

impl PeerDocument {
    fn parse(document: &Document) -> Option<Self> {
        Some(Self {
            server: document.get_str("_id").ok()?.to_owned(),
            seq: document.get_i64(SEQ).ok()?,
            watermark: document.get_i64(WATERMARK).ok()?,
            clock: document.get_i64(CLOCK).ok()?,
            based_on: document.get_datetime(BASED_ON).ok().copied(),
            expired: document.get_bool("expired").unwrap_or(false),
            now: document.get_datetime("now").ok().copied(),
        })
    }
}

impl From<PeerDocument> for Peer {
    fn from(document: PeerDocument) -> Self {
        Self {
            server: document.server,
            watermark: document.watermark,
            clock: document.clock,
            based_on: document.based_on,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn published() -> Watermarks {
        published_with_lease(Duration::from_secs(5))
    }

    fn published_with_lease(lease: Duration) -> Watermarks {
        let settings = Settings::default();
        // A collection handle is never used by these tests (nothing is published).
        let client =
            mongodb::Client::with_options(mongodb::options::ClientOptions::builder().build())
                .unwrap();
        Watermarks::with_mode(
            Mode::Published(Publisher {
                watermarks: client.database("unused").collection("watermarks"),
                retry: Retry::new(&settings.mongodb.retry),
                server: "me".into(),
                interval: Duration::from_millis(50),
                lease,
            }),
            0,
        )
    }

    /// As after a join and a renewal.
    fn leased(watermarks: &Watermarks) {
        let mut state = lock(&watermarks.inner.state);
        state.joined = true;
        state.lease_holds_until = Some(Instant::now() + Duration::from_secs(60));
    }

    fn round_with_peer(watermarks: &Watermarks, watermark: i64) {
        watermarks.inner.rounds.send_replace(Round {
            read_started: Some(Instant::now()),
            read_at: None,
            own_cap: i64::MAX,
            peers: vec![Peer {
                server: "other".into(),
                watermark,
                clock: watermark,
                based_on: None,
            }],
        });
    }

    #[tokio::test]
    async fn the_live_horizon_never_goes_back_and_stays_put_without_a_lease() {
        let watermarks = published();
        leased(&watermarks);
        let now = watermarks.now_millis();
        round_with_peer(&watermarks, now - 100);
        assert_eq!(watermarks.live_horizon(), now - 100);
        // A peer published a lower watermark (a server joined with a clock behind).
        round_with_peer(&watermarks, now - 5_000);
        assert_eq!(watermarks.live_horizon(), now - 100);
        round_with_peer(&watermarks, now - 50);
        assert_eq!(watermarks.live_horizon(), now - 50);
        // The lease lapsed: this server may have been retired and miss a joining server.
        lock(&watermarks.inner.state).lease_holds_until = None;
        round_with_peer(&watermarks, now);
        assert_eq!(watermarks.live_horizon(), now - 50);
        // A join that failed halfway: a renewal alone does not make the lease hold.
        let mut state = lock(&watermarks.inner.state);
        state.new_epoch();
        state.lease_holds_until = Some(Instant::now() + Duration::from_secs(60));
        drop(state);
        assert_eq!(watermarks.live_horizon(), now - 50);
        let stamp = watermarks.stamp();
        assert!(watermarks.acknowledged(&stamp).is_late(stamp.millis()));
    }

    #[tokio::test]
    async fn a_fresh_stamp_waits_for_a_holding_lease_for_a_while_then_fails() {
        let watermarks = published_with_lease(Duration::from_millis(300));
        let asked = Instant::now();
        let failed = watermarks.fresh_stamp("a test").await;
        assert!(failed.is_err(), "no lease: no fresh stamp");
        assert!(asked.elapsed() >= Duration::from_millis(300));
        let waiting = tokio::spawn({
            let watermarks = watermarks.clone();
            async move {
                watermarks
                    .fresh_stamp("a test")
                    .await
                    .map(|stamp| stamp.millis())
            }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        leased(&watermarks);
        assert!(waiting.await.unwrap().is_ok(), "a lease that holds again");
    }

    #[tokio::test]
    async fn a_stamp_dropped_by_a_panic_holds_the_watermark_for_a_lease() {
        let watermarks = published_with_lease(Duration::from_millis(300));
        let stamp = watermarks.stamp();
        let millis = stamp.millis();
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _held = stamp;
            panic!("a bug while the write was in flight");
        }));
        assert!(unwound.is_err());
        assert_eq!(lock(&watermarks.inner.state).watermark(0), millis - 1);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(lock(&watermarks.inner.state).watermark(0) >= millis);
    }

    /// A panic that unwinds through the runtime's owner shuts the runtime down while a task
    /// still holds a stamp: the stamp is dropped during the panic, on a runtime that cancels
    /// whatever is spawned on it. Handing itself to a new task again and again overflowed the
    /// stack (and aborted the process) instead of letting the panic through.
    #[test]
    fn a_stamp_dropped_by_a_panic_while_the_runtime_shuts_down_lets_go() {
        let unwound = std::panic::catch_unwind(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let watermarks = runtime.block_on(async { published() });
            let stamp = watermarks.stamp();
            runtime.spawn(async move {
                let _held = stamp;
                std::future::pending::<()>().await
            });
            runtime.block_on(tokio::task::yield_now());
            panic!("a bug while a write was in flight");
        });
        assert!(unwound.is_err());
    }

    #[tokio::test]
    async fn the_watermark_stays_below_the_oldest_write_in_flight() {
        let watermarks = published();
        let first = watermarks.stamp();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let second = watermarks.stamp();
        assert!(second.millis() > first.millis());
        let mut state = lock(&watermarks.inner.state);
        assert_eq!(state.watermark(0), first.millis() - 1);
        drop(state);
        drop(first);
        let mut state = lock(&watermarks.inner.state);
        assert_eq!(state.watermark(0), second.millis() - 1);
        drop(state);
        drop(second);
        let now = watermarks.now_millis();
        let watermark = lock(&watermarks.inner.state).watermark(0);
        assert!(watermark >= now - 1, "{watermark} < {now} - 1");
    }

    #[tokio::test]
    async fn a_stamp_from_an_earlier_epoch_is_late_and_does_not_hold_the_watermark() {
        let watermarks = published();
        leased(&watermarks);
        let held = watermarks.stamp();
        assert!(!watermarks.acknowledged(&held).is_late(held.millis()));
        lock(&watermarks.inner.state).new_epoch();
        leased(&watermarks);
        assert!(watermarks.acknowledged(&held).is_late(held.millis()));
        let now = watermarks.now_millis();
        assert!(lock(&watermarks.inner.state).watermark(0) >= now - 1);
        drop(held);
        let fresh = watermarks.stamp();
        assert!(!watermarks.acknowledged(&fresh).is_late(fresh.millis()));
    }

    #[tokio::test]
    async fn without_a_holding_lease_every_acknowledgement_is_late() {
        let watermarks = published();
        let stamp = watermarks.stamp();
        assert!(watermarks.acknowledged(&stamp).is_late(stamp.millis()));
    }

    #[test]
    fn the_clock_never_goes_back_and_carries_the_offset() {
        let ahead = Watermarks::fixed_drift(Duration::from_secs(2), 60_000);
        let first = ahead.now_millis();
        assert!(first >= system_millis() + 59_000);
        lock(&ahead.inner.state).clock = first + 10_000;
        assert_eq!(ahead.now_millis(), first + 10_000);
        assert_eq!(ahead.live_horizon(), first + 10_000 - 2_000);
    }
}
