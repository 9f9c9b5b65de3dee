//! One batch against MongoDB: decide each write against its persistence id's highest sequence
//! number, insert the ones that continue it in one ordered insert, settle the others.
//!
//! Each round:
//! 1. **Know**: read the highest of every persistence id whose knowledge is missing, older than
//!    `sequence-nr-cache-validity`, or not continued by its next write (see `heads`).
//! 2. **Decide**, in batch order, per persistence id: a write starting at `highest + 1` is
//!    inserted (and the next write of the id is decided against its last number); one starting
//!    at or below `highest` is compared with what is stored; one starting above `highest + 1`
//!    would leave a gap and is a `Conflict`. Once a write fails, the later writes of its
//!    persistence id from the same request or stream are not stored (`Conflict` naming it).
//! 3. **Compare**: identical stored events make a retried write `Written`; anything else is a
//!    `Conflict`.
//! 4. **Insert** the decided writes, stamped `writtenAt` now (no earlier than the id's last
//!    event): the ids with only single-event writes as one ordered `insert_many`, and each id
//!    with a multi-event write in a transaction of its own, so that write is all-or-nothing,
//!    all at once. MongoDB stops at the first failing document: the writes before it are
//!    stored (none, in a transaction), the failing one is settled (a duplicate is compared next
//!    round, a refused document is `Rejected`), and the rest go round again.
//!
//! A round that settles nothing because MongoDB failed transiently is retried per
//! `mongodb.retry`, reading the highest sequence numbers again first, so a write whose attempt
//! was applied after all is recognised by content instead of being inserted twice. Before each
//! round, and before each insert, the writes whose caller has gone meanwhile are dropped (see
//! `Caller`).

use std::time::{Duration, Instant};

use ahash::{HashMap, HashMapExt, HashSet, HashSetExt};
use model::PersistentEvent;
use mongo::{Acknowledged, InFlight, MongoError};
use mongodb::bson::{DateTime, RawDocumentBuf};
use mongodb::error::{Error, ErrorKind};

use crate::document::EncodedEvent;
use crate::error::JournalError;
use crate::journal::WriteOutcome;
use crate::metrics;
use crate::writer::heads::{Failure, Head};
use crate::writer::schedule::{Pid, WriteKey};
use crate::writer::store::EventStore;
use crate::writer::{CALLER_GONE, Caller};

const DUPLICATE_KEY: i32 = 11000;
const OPERATION: &str = "write events";

/// A write in a batch, with what is needed to insert it and to compare it with stored events.
pub(crate) struct BatchWrite {
    pub key: WriteKey,
    /// Position in the batch: the order writes are decided and inserted in.
    pub order: usize,
    /// The request or stream it came with: a failure stops the later writes of its id there.
    pub chain: u64,
    /// Whether its caller still waits: checked before each round and before its insert.
    pub caller: Caller,
    pub pid: Pid,
    pub first: i64,
    pub last: i64,
    pub events: Vec<PersistentEvent>,
    pub documents: Vec<EncodedEvent>,
}

pub(crate) struct Batch {
    pub writes: Vec<BatchWrite>,
    /// Valid knowledge of the batch's persistence ids, where the writer has some.
    pub heads: HashMap<Pid, Head>,
    /// The last failure of the batch's persistence ids, to name it in a gap conflict.
    pub failures: HashMap<Pid, Failure>,
}

/// What a batch found out: an outcome per write, and what the writer learnt.
#[derive(Default)]
pub(crate) struct Done {
    pub outcomes: Vec<(WriteKey, Result<WriteOutcome, JournalError>)>,
    /// New knowledge (`None`: forget what was known).
    pub heads: HashMap<Pid, Option<Head>>,
    /// New last failures, or the id was written since.
    pub failures: HashMap<Pid, FailureUpdate>,
    /// Per `(chain, pid)` with a failed write, the earliest one: the later writes of that id
    /// and chain still queued fail too.
    pub failed: HashMap<(u64, Pid), FailedWrite>,
    /// The settled writes, their events and documents: freed by the writer once the next
    /// batches are on their way, not while MongoDB waits for them.
    pub spent: Vec<BatchWrite>,
}

/// What a batch found of an id's last failure.
#[derive(Debug, Clone)]
pub(crate) enum FailureUpdate {
    /// A write of it failed: its last failure now.
    Failed(Failure),
    /// Written up to this sequence number: a failure before it is history.
    Written { last: i64 },
}

impl FailureUpdate {
    /// The id's failure once this is known, where `recorded` is what the writer recorded
    /// meanwhile: a failure of writes after the batch's (queued writes of a stream that closed
    /// while the batch was out, `Committer::receive` and `abandon`) stays, continuing the
    /// batch's own.
    pub fn apply(self, recorded: Option<&Failure>) -> Option<Failure> {
        let batch_last = match &self {
            Self::Failed(failure) => failure.last,
            Self::Written { last } => *last,
        };
        let later = recorded
            .filter(|recorded| recorded.first > batch_last)
            .cloned();
        match (self, later) {
            (Self::Failed(failure), Some(later)) => Some(Failure::after(Some(&failure), later)),
            (Self::Failed(failure), None) => Some(failure),
            (Self::Written { .. }, later) => later,
        }
    }
}

/// The earliest failed write of a chain and persistence id in a batch.
#[derive(Debug, Clone)]
pub(crate) struct FailedWrite {
    pub key: WriteKey,
    /// Its position in the batch.
    pub order: usize,
    /// Its own sequence numbers and reason (not merged with other chains' failures).
    pub failure: Failure,
}

/// How long knowledge of an id's highest sequence number is trusted (see `heads.rs`).
#[derive(Clone, Copy)]
pub(crate) struct Trust {
    /// To decide a write on it without reading: `sequence-nr-cache-validity`.
    pub validity: Duration,
    /// To send an insert decided on it: `purge-delay` less the validity. Events another server
    /// writes, deletes and has purged after the knowledge was confirmed leave the unique index
    /// no sooner than the purge delay after that; the validity is the margin for clocks.
    pub until_insert: Duration,
}

pub(crate) async fn execute(batch: Batch, store: &EventStore, trust: Trust) -> Done {
    let mut run = Run {
        store,
        trust,
        heads: batch.heads,
        failures: batch.failures,
        done: Done::default(),
        held: Vec::new(),
        uncertain: false,
        maybe_applied: HashSet::new(),
        restamp_failed: None,
        compare_failed: None,
    };
    let mut remaining = batch.writes;
    let mut must_read: HashSet<Pid> = HashSet::new();
    let mut attempt = 1;
    // Per write, the rounds that could not decide it safely (see `undecided`), and how many
    // it gets: at least two, also with `max-attempts = 1`.
    let mut undecided_rounds: HashMap<WriteKey, u32> = HashMap::new();
    let rounds = store.retry.max_attempts().max(2);
    while !remaining.is_empty() {
        // A round after a retry pause tries MongoDB and the lease afresh.
        run.restamp_failed = None;
        run.compare_failed = None;
        // Its caller may have gone while a write went round (waiting out a retry pause, say).
        remaining = run.drop_abandoned(remaining);
        if remaining.is_empty() {
            break;
        }
        let fresh = match run.know(&remaining, &must_read).await {
            Ok(fresh) => fresh,
            Err(error) => {
                run.fail_all(remaining, error);
                break;
            }
        };
        must_read.clear();
        let Decided {
            mut insert,
            compare,
            mut next,
        } = run.decide(remaining);
        for write in compare {
            run.compare(write).await;
        }
        // This round's reads and compares (with their retries) may have taken so long that
        // the knowledge a write was decided on is too old to insert on (`Trust::until_insert`):
        // such an id's writes go round again, its highest read first.
        let now = Instant::now();
        let heads = &run.heads;
        let expired: Vec<BatchWrite> = insert
            .extract_if(.., |write| {
                heads.get(&write.pid).is_none_or(|head| {
                    now.saturating_duration_since(head.confirmed) >= trust.until_insert
                })
            })
            .collect();
        for write in expired {
            if fresh.contains(&write.pid) && undecided(&mut undecided_rounds, &write) >= rounds {
                let reason = format!(
                    "sequence number(s) {} of persistence id {:?}: reading its highest \
                     sequence number and deciding took longer than {} (write-journal.purge-delay \
                     less sequence-nr-cache-validity) {rounds} times (is MongoDB overloaded?); \
                     {}",
                    range(write.first, write.last),
                    write.pid,
                    humantime::format_duration(trust.until_insert),
                    run.whether_stored(&write),
                );
                run.undecided(write, reason);
                continue;
            }
            must_read.insert(write.pid.clone());
            next.push(write);
        }
        // A caller may also have gone while this round read or compared (a retry pause inside
        // them, say): its id's writes go round again, where its writes are dropped. Not here:
        // a later write of the id in `insert` was decided to follow the gone one.
        let gone: HashSet<Pid> = insert
            .iter()
            .filter(|write| write.caller.gone())
            .map(|write| write.pid.clone())
            .collect();
        if !gone.is_empty() {
            next.extend(insert.extract_if(.., |write| gone.contains(&write.pid)));
        }
        let mut transient = None;
        let mut unseen = Vec::new();
        if !insert.is_empty() {
            let inserted = run.insert(insert, &fresh).await;
            for write in &inserted.retry {
                must_read.insert(write.pid.clone());
            }
            next.extend(inserted.retry);
            transient = inserted.failed_transiently;
            unseen = inserted.unseen;
        }
        remaining = next;
        remaining.sort_by_key(|write| write.order);
        if let Some(error) = transient {
            if attempt >= store.retry.max_attempts() {
                let error = JournalError::from(store.retry.failure(OPERATION, true, error));
                run.fail_all(remaining, error);
                break;
            }
            store
                .retry
                .pause_before_retry(OPERATION, attempt, &error)
                .await;
            attempt += 1;
        } else if !unseen.is_empty() {
            // Usually a race: another writer stored the event after this batch read the highest.
            // The next read is causal (it waits until majority reads show what MongoDB had
            // when it refused the insert), so it finds the event, and the write is compared.
            // If a write keeps colliding, only it fails (and, through its failure, the later
            // writes of its id); the others were not refused. Nothing of it was stored.
            let (colliding, rest): (Vec<_>, Vec<_>) = remaining.into_iter().partition(|write| {
                unseen.contains(&write.key) && undecided(&mut undecided_rounds, write) >= rounds
            });
            for write in colliding {
                let reason = format!(
                    "sequence number(s) {} of persistence id {:?} collide with an event MongoDB \
                     holds but majority reads did not show ({rounds} reads; is replication \
                     behind?); {}",
                    range(write.first, write.last),
                    write.pid,
                    run.whether_stored(&write),
                );
                run.undecided(write, reason);
            }
            remaining = rest;
        }
    }
    // Stamps of inserts that may have been applied after all stay in flight until the batch is
    // decided; with an outcome left unknown, for a lease longer (see `InFlight`).
    for stamp in run.held.drain(..) {
        if run.uncertain {
            stamp.release_after_lease();
        }
    }
    run.done
}

struct Run<'a> {
    store: &'a EventStore,
    trust: Trust,
    heads: HashMap<Pid, Head>,
    failures: HashMap<Pid, Failure>,
    done: Done,
    /// Stamps of inserts that failed in a way that may have applied them.
    held: Vec<InFlight>,
    /// A write ended with an error: its outcome may be unknown.
    uncertain: bool,
    /// Writes an insert of which failed in a way that may have applied it (it went round again
    /// to be read back).
    maybe_applied: HashSet<WriteKey>,
    /// A re-stamp in this round failed for want of a lease or of MongoDB: the round's later
    /// re-stamps fail with the same error at once instead of each waiting as long again, so
    /// the last id's write is not kept waiting once per id before it.
    restamp_failed: Option<JournalError>,
    /// A read of stored events to compare with found MongoDB unavailable after its retries:
    /// the round's later compares fail with it at once, for the same reason (after a failover,
    /// a batch can be many clients' retries, each a compare).
    compare_failed: Option<JournalError>,
}

struct Decided {
    insert: Vec<BatchWrite>,
    compare: Vec<BatchWrite>,
    /// Decided next round: writes behind one being compared or overlapping one being inserted.
    next: Vec<BatchWrite>,
}

/// The writes of one MongoDB insert, stamped.
struct Group {
    writes: Vec<BatchWrite>,
    /// Per write, its stamp (before [`Group::stamp`]: its id's last stamp, if known).
    stamps: Vec<Option<DateTime>>,
    transactional: bool,
}

impl Group {
    /// Stamps the writes `now`, but never before their id's last event, so read-journal order
    /// follows sequence numbers.
    fn stamp(&mut self, now: DateTime) {
        for (write, stamp) in self.writes.iter_mut().zip(&mut self.stamps) {
            let given = stamp.map_or(now, |last| last.max(now));
            for document in &mut write.documents {
                document.stamp(given);
            }
            *stamp = Some(given);
        }
    }
}

struct Inserted {
    /// Writes to decide again (knowledge of their ids is read first).
    retry: Vec<BatchWrite>,
    /// The error, when MongoDB failed in a way worth retrying.
    failed_transiently: Option<Error>,
    /// Writes refused as duplicates although their id's highest was just read: they collided
    /// with an event the read did not show. Decided again after another read; if that keeps
    /// happening, only they fail.
    unseen: Vec<WriteKey>,
}

impl Run<'_> {
    /// Reads the highest sequence number where knowledge is missing, expired, not continued by
    /// the id's next write, or in doubt (`must_read`). Returns the ids read.
    async fn know(
        &mut self,
        writes: &[BatchWrite],
        must_read: &HashSet<Pid>,
    ) -> Result<HashSet<Pid>, JournalError> {
        let now = Instant::now();
        let mut to_read: Vec<Pid> = Vec::new();
        let mut seen: HashSet<&str> = HashSet::new();
        let mut last: Option<&Pid> = None;
        for write in writes {
            if last == Some(&write.pid) || !seen.insert(&write.pid) {
                continue;
            }
            last = Some(&write.pid);
            let known = self.heads.get(&write.pid).filter(|head| {
                now.saturating_duration_since(head.confirmed) < self.trust.validity
                    && head.highest.checked_add(1) == Some(write.first)
            });
            if known.is_none() || must_read.contains(&write.pid) {
                to_read.push(write.pid.clone());
            }
        }
        if to_read.is_empty() {
            return Ok(HashSet::new());
        }
        metrics::SEQUENCE_NR_READS.inc_by(to_read.len() as u64);
        let started = Instant::now();
        let found = self.store.read_heads(&to_read).await?;
        for pid in &to_read {
            let stored = found.get(pid).copied().unwrap_or_default();
            self.learn(
                pid,
                Head {
                    highest: stored.highest,
                    written_at: stored.written_at,
                    confirmed: started,
                },
            );
        }
        Ok(to_read.into_iter().collect())
    }

    fn decide(&mut self, writes: Vec<BatchWrite>) -> Decided {
        let mut decided = Decided {
            insert: Vec::new(),
            compare: Vec::new(),
            next: Vec::new(),
        };
        // Per id: the highest once this round's inserts are stored.
        let mut running: HashMap<Pid, i64> = HashMap::new();
        let mut waiting: HashSet<Pid> = HashSet::new();
        for write in writes {
            // (The key costs a `Pid` clone: not built while nothing has failed.)
            if !self.done.failed.is_empty()
                && let Some(failed) = self
                    .done
                    .failed
                    .get(&(write.chain, write.pid.clone()))
                    .filter(|failed| failed.order < write.order)
            {
                let failure = failed.failure.clone();
                self.poisoned(write, &failure);
                continue;
            }
            if waiting.contains(&write.pid) {
                decided.next.push(write);
                continue;
            }
            let stored = self.heads.get(&write.pid).map_or(0, |head| head.highest);
            let highest = running.get(&write.pid).copied().unwrap_or(stored);
            if write.first <= highest {
                waiting.insert(write.pid.clone());
                if running.contains_key(&write.pid) {
                    // Overlaps a write going in this round: compare once that one is stored.
                    decided.next.push(write);
                } else {
                    decided.compare.push(write);
                }
            } else if highest.checked_add(1) == Some(write.first) {
                running.insert(write.pid.clone(), write.last);
                decided.insert.push(write);
            } else if running.contains_key(&write.pid) {
                // A gap after a write going in this round: decided once that write's outcome
                // is known (failed, it leaves the highest in doubt, and stops this write if
                // it is of the same chain).
                waiting.insert(write.pid.clone());
                decided.next.push(write);
            } else {
                self.gap(write, highest);
            }
        }
        decided
    }

    /// A write at or below the highest: written already (a retry) or a conflict.
    async fn compare(&mut self, write: BatchWrite) {
        if let Some(failed) = &self.compare_failed {
            return self.error(write, failed.clone());
        }
        let stored = match self
            .store
            .read_stored(&write.pid, write.first, write.last)
            .await
        {
            Ok(stored) => stored,
            Err(error) => {
                let unavailable = matches!(error, MongoError::Unavailable { .. });
                let error = JournalError::from(error);
                if unavailable {
                    self.compare_failed = Some(error.clone());
                }
                return self.error(write, error);
            }
        };
        let range = range(write.first, write.last);
        let pid = write.pid.clone();
        let identical = stored.len() == write.events.len()
            && stored.iter().zip(&write.events).all(|(document, event)| {
                document.deleted_at.is_none()
                    && document
                        .clone()
                        .into_event()
                        .is_ok_and(|stored| stored.same_content_as(event))
            });
        if identical {
            // The first attempt's call may have failed before it could check for lateness.
            let stored_at = stored.iter().map(|document| document.written_at).min();
            if stored_at.is_some_and(|at| self.store.watermarks.stored_late(at.timestamp_millis()))
            {
                match self.restamp(&pid, write.first, None).await {
                    Ok(moved) => self.moved(&pid, moved),
                    Err(error) => return self.error(write, error),
                }
            }
            return self.settle(write, Ok(WriteOutcome::Written));
        }
        let reason = if stored.is_empty() {
            let highest = self.heads.get(&pid).map_or(0, |head| head.highest);
            format!(
                "sequence number(s) {range} of persistence id {pid:?} are at or below its highest \
                 sequence number {highest}, whose events were deleted and purged; a sequence \
                 number is never written twice"
            )
        } else if stored.iter().any(|document| document.deleted_at.is_some()) {
            format!(
                "sequence number(s) {range} of persistence id {pid:?} belong to deleted events; a \
                 sequence number is never written twice"
            )
        } else {
            format!(
                "sequence number(s) {range} of persistence id {pid:?} are already taken by other \
                 events"
            )
        };
        self.failed(write, WriteOutcome::Conflict(reason));
    }

    /// Inserts the decided writes: the persistence ids with only single-event writes together
    /// in one ordered insert, and each id with a multi-event write in a transaction of its own
    /// (so that a transaction left open by a crashed server blocks only that id until MongoDB
    /// aborts it), all at once.
    async fn insert(&mut self, writes: Vec<BatchWrite>, fresh: &HashSet<Pid>) -> Inserted {
        let transactional: HashSet<Pid> = writes
            .iter()
            .filter(|write| write.documents.len() > 1)
            .map(|write| write.pid.clone())
            .collect();
        let mut plain = Vec::new();
        let mut per_pid: Vec<(Pid, Vec<BatchWrite>)> = Vec::new();
        for write in writes {
            if !transactional.contains(&write.pid) {
                plain.push(write);
            } else if let Some((_, group)) = per_pid.iter_mut().find(|(pid, _)| *pid == write.pid) {
                group.push(write);
            } else {
                per_pid.push((write.pid.clone(), vec![write]));
            }
        }
        let mut groups: Vec<Group> = Vec::new();
        if !plain.is_empty() {
            groups.push(self.group(plain, false));
        }
        for (_, writes) in per_pid {
            groups.push(self.group(writes, true));
        }
        let sent = Instant::now();
        let store = self.store;
        // One stamp for the whole round, in flight until its inserts are settled.
        let stamp = store.watermarks.stamp();
        for group in &mut groups {
            group.stamp(stamp.date_time());
        }
        let results = futures::future::join_all(groups.iter().map(|group| {
            let documents: Vec<&RawDocumentBuf> = group
                .writes
                .iter()
                .flat_map(|write| write.documents.iter().map(EncodedEvent::document))
                .collect();
            metrics::BATCH_EVENTS.observe(documents.len() as f64);
            // The knowledge the group was decided on: checked young enough just before, but
            // the insert may still wait for a server and a connection (a failover, a pool in
            // use); see `EventStore::insert`.
            let decided_on = group
                .writes
                .iter()
                .filter_map(|write| self.heads.get(&write.pid))
                .map(|head| head.confirmed)
                .min()
                .unwrap_or(sent);
            let answer_by = tokio::time::Instant::from_std(decided_on + self.trust.until_insert);
            async move {
                store
                    .insert(&documents, group.transactional, answer_by)
                    .await
            }
        }))
        .await;
        let acknowledged = store.watermarks.acknowledged(&stamp);
        let mut inserted = Inserted {
            retry: Vec::new(),
            failed_transiently: None,
            unseen: Vec::new(),
        };
        for (group, result) in groups.into_iter().zip(results) {
            let settled = self
                .settle_group(group, result, fresh, sent, acknowledged)
                .await;
            inserted.retry.extend(settled.retry);
            inserted.failed_transiently =
                inserted.failed_transiently.or(settled.failed_transiently);
            inserted.unseen.extend(settled.unseen);
        }
        if inserted.failed_transiently.is_some() || !inserted.retry.is_empty() || self.uncertain {
            self.held.push(stamp);
        }
        inserted
    }

    /// The writes of one insert, with the last stamp of each id (stamped in [`Group::stamp`]).
    fn group(&self, writes: Vec<BatchWrite>, transactional: bool) -> Group {
        let last_stamps = writes
            .iter()
            .map(|write| self.heads.get(&write.pid).and_then(|head| head.written_at))
            .collect();
        Group {
            writes,
            stamps: last_stamps,
            transactional,
        }
    }

    /// What one insert's result means for each of its writes.
    async fn settle_group(
        &mut self,
        group: Group,
        result: Result<(), Error>,
        fresh: &HashSet<Pid>,
        sent: Instant,
        acknowledged: Acknowledged,
    ) -> Inserted {
        let Group {
            writes,
            stamps,
            transactional,
        } = group;
        let stamps: Vec<DateTime> = stamps
            .into_iter()
            .map(|stamp| stamp.unwrap_or(DateTime::MIN))
            .collect();
        let error = match result {
            Ok(()) => {
                let writes = writes.into_iter().zip(stamps).collect();
                self.inserted(writes, sent, acknowledged).await;
                return Inserted {
                    retry: Vec::new(),
                    failed_transiently: None,
                    unseen: Vec::new(),
                };
            }
            Err(error) => error,
        };
        let mut retry = Vec::new();
        let Some(failure) = document_failure(&error) else {
            if self.store.retry.is_retryable(&error) {
                // Maybe applied, maybe not: knowledge is read again before anything is decided.
                self.maybe_applied
                    .extend(writes.iter().map(|write| write.key));
                return Inserted {
                    retry: writes,
                    failed_transiently: Some(error),
                    unseen: Vec::new(),
                };
            }
            let error = JournalError::from(self.store.retry.failure(OPERATION, true, error));
            for write in writes {
                self.error(write, error.clone());
            }
            return Inserted {
                retry,
                failed_transiently: None,
                unseen: Vec::new(),
            };
        };
        // Without a transaction, the writes before the failing document are stored.
        let mut writes: Vec<(BatchWrite, DateTime)> = writes.into_iter().zip(stamps).collect();
        let mut stored_documents = 0;
        let mut stored = 0;
        if !transactional {
            for (write, _) in &writes {
                if stored_documents + write.documents.len() > failure.index {
                    break;
                }
                stored_documents += write.documents.len();
                stored += 1;
            }
        }
        let rest = writes.split_off(stored);
        self.inserted(writes, sent, acknowledged).await;
        let mut failed_transiently = None;
        let mut unseen = Vec::new();
        let mut offset = stored_documents;
        for (write, _) in rest {
            let documents = offset..offset + write.documents.len();
            offset = documents.end;
            if documents.contains(&failure.index) {
                if failure.code == DUPLICATE_KEY && !fresh.contains(&write.pid) {
                    // Someone else wrote it: compare once the highest is read again.
                    retry.push(write);
                } else if failure.code == DUPLICATE_KEY {
                    // A duplicate although the highest was just read: what it collided with was
                    // not in the read. Read again, then decide.
                    unseen.push(write.key);
                    retry.push(write);
                } else if self.store.retry.is_retryable(&error) {
                    retry.push(write);
                    failed_transiently = Some(error.clone());
                } else {
                    let index = failure.index - documents.start;
                    let reason = format!(
                        "MongoDB refused event {} of persistence id {:?}: {}",
                        write.first + index as i64,
                        write.pid,
                        failure.message
                    );
                    self.failed(write, WriteOutcome::Rejected(reason));
                }
            } else {
                // After the failing document, or in the aborted transaction: not stored.
                retry.push(write);
            }
        }
        Inserted {
            retry,
            failed_transiently,
            unseen,
        }
    }

    /// Moves `pid`'s events from `first` on forward in read-journal order (see
    /// [`EventStore::restamp`]), unless a re-stamp of this round found no lease or no MongoDB
    /// already: then with that failure, at once. The events are stored either way; a retry of
    /// the write moves them.
    async fn restamp(
        &mut self,
        pid: &str,
        first: i64,
        acknowledged_late: Option<DateTime>,
    ) -> Result<Option<DateTime>, JournalError> {
        if let Some(failed) = &self.restamp_failed {
            return Err(failed.clone());
        }
        let restamped = self.store.restamp(pid, first, acknowledged_late).await;
        restamped.map_err(|error| {
            // Not an error of this id's own (MongoDB refusing its update): that fails it alone.
            let unavailable = !matches!(error, MongoError::Internal { .. });
            let error = JournalError::from(error);
            if unavailable {
                self.restamp_failed = Some(error.clone());
            }
            error
        })
    }

    /// Writes one insert stored (with their stamps): `Written`, and per persistence id once,
    /// knowledge of its new highest, re-stamped first if the insert was acknowledged late.
    async fn inserted(
        &mut self,
        writes: Vec<(BatchWrite, DateTime)>,
        sent: Instant,
        acknowledged: Acknowledged,
    ) {
        // Per id, in order: the first sequence number stored, the last, and the stamp.
        let mut stored: Vec<(Pid, i64, i64, DateTime)> = Vec::new();
        for (write, stamp) in &writes {
            match stored.iter_mut().find(|(pid, ..)| *pid == write.pid) {
                Some((_, _, last, _)) => *last = write.last,
                None => stored.push((write.pid.clone(), write.first, write.last, *stamp)),
            }
        }
        let mut failed: HashMap<Pid, JournalError> = HashMap::new();
        for (pid, first, last, stamp) in stored {
            let mut head = Head {
                highest: last,
                written_at: Some(stamp),
                confirmed: sent,
            };
            if acknowledged.is_late(stamp.timestamp_millis()) {
                match self.restamp(&pid, first, Some(stamp)).await {
                    Ok(moved) => head.written_at = moved.or(head.written_at),
                    Err(error) => {
                        failed.insert(pid.clone(), error);
                    }
                }
            }
            self.learn(&pid, head);
            // A failure the stored events reached past is history; one after them (a write
            // stored when it went round again, behind a failed one) still explains a gap.
            if self
                .failures
                .get(&pid)
                .is_none_or(|failure| failure.first <= last)
            {
                self.failures.remove(&pid);
                self.done
                    .failures
                    .insert(pid, FailureUpdate::Written { last });
            }
        }
        for (write, _) in writes {
            match failed.get(&write.pid) {
                // Stored, but maybe passed over by live queries: the client retries it.
                Some(error) => self.error(write, error.clone()),
                None => self.settle(write, Ok(WriteOutcome::Written)),
            }
        }
    }

    /// A write that does not continue the highest: it would leave a gap.
    fn gap(&mut self, write: BatchWrite, highest: i64) {
        let first = write.first;
        let pid = write.pid.clone();
        let reason = match self.failures.get(&pid) {
            Some(failure)
                if failure.last.checked_add(1) == Some(first) && failure.first > highest =>
            {
                format!(
                    "sequence number {first} of persistence id {pid:?} does not follow its highest \
                 stored sequence number {highest}, because the write of sequence number(s) {} \
                 before it failed: {}",
                    range(failure.first, failure.last),
                    failure.reason
                )
            }
            _ => format!(
                "sequence number {first} of persistence id {pid:?} does not follow its highest \
                 stored sequence number {highest}: the next write must start at {} (a persistence \
                 id's events have no gaps)",
                highest + 1
            ),
        };
        self.failed(write, WriteOutcome::Conflict(reason));
    }

    /// A later write of a failed write's id and chain.
    fn poisoned(&mut self, write: BatchWrite, failure: &Failure) {
        let reason = poisoned_reason(&write.pid, failure);
        self.failed(write, WriteOutcome::Conflict(reason));
    }

    /// A write that is not stored: `Rejected` or `Conflict`.
    fn failed(&mut self, write: BatchWrite, outcome: WriteOutcome) {
        let reason = match &outcome {
            WriteOutcome::Rejected(reason) | WriteOutcome::Conflict(reason) => reason.clone(),
            WriteOutcome::Written => String::new(),
        };
        self.record_failure(&write, reason);
        self.settle(write, Ok(outcome));
    }

    /// MongoDB failed for this write: knowledge of its id is in doubt, and so is its outcome.
    fn error(&mut self, write: BatchWrite, error: JournalError) {
        self.uncertain = true;
        self.given_up(write, error);
    }

    /// A write given up without being stored: knowledge of its id is in doubt.
    fn given_up(&mut self, write: BatchWrite, error: JournalError) {
        self.heads.remove(&write.pid);
        self.done.heads.insert(write.pid.clone(), None);
        self.record_failure(&write, error.to_string());
        self.settle(write, Err(error));
    }

    /// What a write given up undecided is told of its storage.
    fn whether_stored(&self, write: &BatchWrite) -> &'static str {
        if self.maybe_applied.contains(&write.key) {
            "an earlier insert of it may have been applied (MongoDB did not answer it), and \
             retrying it is safe"
        } else {
            "this write was not stored, and retrying it is safe"
        }
    }

    /// A write given up undecided; if an earlier insert of it may have been applied, its
    /// outcome is unknown.
    fn undecided(&mut self, write: BatchWrite, reason: String) {
        let error = JournalError::Undecided(reason);
        if self.maybe_applied.contains(&write.key) {
            self.error(write, error);
        } else {
            self.given_up(write, error);
        }
    }

    /// Gives up the writes whose caller has gone (see `Caller`) instead of sending them again.
    /// They are failures like any other: a later write of the same id from another request or
    /// stream finds a gap that names this. Knowledge of their ids is read again (an earlier
    /// insert of one may have been applied: then its stamp is held too, as for an error).
    fn drop_abandoned(&mut self, writes: Vec<BatchWrite>) -> Vec<BatchWrite> {
        if !writes.iter().any(|write| write.caller.gone()) {
            return writes;
        }
        let (gone, kept): (Vec<_>, Vec<_>) =
            writes.into_iter().partition(|write| write.caller.gone());
        metrics::ABANDONED_WRITES.inc_by(gone.len() as u64);
        for write in gone {
            // Nobody gets the error; the reason names it in a later writer's gap conflict.
            self.uncertain |= self.maybe_applied.contains(&write.key);
            self.heads.remove(&write.pid);
            self.done.heads.insert(write.pid.clone(), None);
            self.record_failure(&write, CALLER_GONE.to_owned());
            self.settle(write, Err(Caller::gone_error()));
        }
        kept
    }

    fn fail_all(&mut self, writes: Vec<BatchWrite>, error: JournalError) {
        for write in writes {
            self.error(write, error.clone());
        }
    }

    /// Remembers the failure: for the id (a run of failures is named by its first, in a later
    /// gap conflict), and for its chain, where it stops the later writes of the id.
    fn record_failure(&mut self, write: &BatchWrite, reason: String) {
        let own = Failure {
            first: write.first,
            last: write.last,
            reason,
        };
        let run = Failure::after(self.failures.get(&write.pid), own.clone());
        self.failures.insert(write.pid.clone(), run.clone());
        self.done
            .failures
            .insert(write.pid.clone(), FailureUpdate::Failed(run));
        // The earliest failed write of the chain stops the writes after it. Failures are not
        // always found in batch order: a write MongoDB refuses inside a transaction is settled
        // at once, the earlier writes of that transaction only when they go round again.
        let chain = (write.chain, write.pid.clone());
        if self
            .done
            .failed
            .get(&chain)
            .is_none_or(|failed| write.order < failed.order)
        {
            self.done.failed.insert(
                chain,
                FailedWrite {
                    key: write.key,
                    order: write.order,
                    failure: own,
                },
            );
        }
    }

    fn learn(&mut self, pid: &Pid, head: Head) {
        self.heads.insert(pid.clone(), head);
        self.done.heads.insert(pid.clone(), Some(head));
    }

    fn moved(&mut self, pid: &Pid, moved: Option<DateTime>) {
        if let (Some(moved), Some(head)) = (moved, self.heads.get(pid).copied()) {
            let written_at = head.written_at.map_or(moved, |at| at.max(moved));
            self.learn(
                pid,
                Head {
                    written_at: Some(written_at),
                    ..head
                },
            );
        }
    }

    fn settle(&mut self, write: BatchWrite, outcome: Result<WriteOutcome, JournalError>) {
        self.done.outcomes.push((write.key, outcome));
        self.done.spent.push(write);
    }
}

/// The reason given to a write not stored because an earlier one of its id and chain failed.
pub(crate) fn poisoned_reason(pid: &str, failure: &Failure) -> String {
    format!(
        "not stored: the write of sequence number(s) {} of persistence id {pid:?} before it in \
         this request or stream failed: {}",
        range(failure.first, failure.last),
        failure.reason
    )
}

fn range(first: i64, last: i64) -> String {
    if first == last {
        first.to_string()
    } else {
        format!("{first}..{last}")
    }
}

/// The document an ordered insert stopped at, when MongoDB refused one document (rather than
/// failing as a whole or on its write concern, which leaves open what was applied).
struct DocumentFailure {
    index: usize,
    code: i32,
    message: String,
}

/// Counts one more round that could not decide `write` safely, and returns the count.
fn undecided(counts: &mut HashMap<WriteKey, u32>, write: &BatchWrite) -> u32 {
    let count = counts.entry(write.key).or_default();
    *count += 1;
    *count
}

fn document_failure(error: &Error) -> Option<DocumentFailure> {
    let ErrorKind::InsertMany(insert) = error.kind.as_ref() else {
        return None;
    };
    if insert.write_concern_error.is_some() {
        return None;
    }
    let first = insert
        .write_errors
        .as_ref()?
        .iter()
        .min_by_key(|e| e.index)?;
    let code = match first.code_name.as_deref() {
        Some(name) => format!("{name}, code {}", first.code),
        None => format!("code {}", first.code),
    };
    Some(DocumentFailure {
        index: first.index,
        code: first.code,
        message: format!("{} ({code})", first.message),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(first: i64, last: i64, reason: &str) -> Failure {
        Failure {
            first,
            last,
            reason: reason.to_owned(),
        }
    }

    #[test]
    fn a_failure_recorded_while_the_batch_was_out_outlives_its_update_when_later() {
        let gone = failure(7, 8, "gone");
        // Written up to 6: the recorded failure of 7..8 still explains a gap at 9.
        let update = FailureUpdate::Written { last: 6 };
        assert_eq!(update.apply(Some(&gone)), Some(gone.clone()));
        // Written up to 7: it is history.
        let update = FailureUpdate::Written { last: 7 };
        assert_eq!(update.apply(Some(&gone)), None);
        assert_eq!(FailureUpdate::Written { last: 7 }.apply(None), None);
        // The batch's failure of 5..6 comes before it: one run, named by the batch's.
        let update = FailureUpdate::Failed(failure(5, 6, "refused"));
        assert_eq!(update.apply(Some(&gone)), Some(failure(5, 8, "refused")));
        // Not continued by it: the later one names the gap after both.
        let update = FailureUpdate::Failed(failure(4, 5, "refused"));
        assert_eq!(update.apply(Some(&gone)), Some(gone.clone()));
        // What the batch started from (not later than its own): replaced.
        let update = FailureUpdate::Failed(failure(7, 7, "refused"));
        assert_eq!(update.apply(Some(&gone)), Some(failure(7, 7, "refused")));
        let update = FailureUpdate::Failed(failure(9, 9, "refused"));
        assert_eq!(update.apply(Some(&gone)), Some(failure(9, 9, "refused")));
    }
}
