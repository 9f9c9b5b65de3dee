//! The writer's MongoDB operations: read the highest sequence numbers, read stored events to
//! compare, insert a batch, move late events forward.

use std::sync::atomic::{AtomicU64, Ordering};

use ahash::HashMap;
use futures::{StreamExt, TryStreamExt, stream};

use mongodb::bson::{DateTime, Document, RawDocumentBuf, Timestamp, doc};
use mongodb::error::ErrorKind;
use mongodb::options::{CollectionOptions, ReadPreference, SelectionCriteria};
use mongodb::{Client, ClientSession, Collection, Database};

use config::Settings;
use mongo::{MongoError, Retry, Watermarks};

use crate::document::{
    EventDocument, HIGHEST_SEQUENCE_NR, PERSISTENCE_ID, SEQUENCE_NR, WRITTEN_AT,
};
use crate::writer::schedule::Pid;

/// How many persistence ids' highest sequence numbers are read at once.
const HEAD_READS_IN_PARALLEL: usize = 8;

/// How often one late write is moved forward at most (see [`EventStore::restamp`]).
const MAX_RESTAMPS: usize = 3;

/// How long ending a transaction whose commit failed may take (see
/// [`EventStore::end_transaction`]).
const END_TRANSACTION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The stored highest of a persistence id: the journal's top event (with its `writtenAt`), or
/// the metadata's record when its events were deleted and purged.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct StoredHead {
    pub highest: i64,
    pub written_at: Option<DateTime>,
}

/// Whether a failed commit may have left its transaction open on the server: MongoDB answered
/// the commit with an error it did not label. Not after a network error or a timeout (MongoDB
/// is likely out of reach, and ending the transaction would only wait for it too, while the
/// write's caller waits), and not when the error says the transaction is over or its commit may
/// have run (`TransientTransactionError`: aborted; `UnknownTransactionCommitResult`: the commit
/// may still apply, and the write is then decided by reading what is stored).
fn may_hold_transaction(error: &mongodb::error::Error) -> bool {
    matches!(*error.kind, ErrorKind::Command(_))
        && !error.contains_label("TransientTransactionError")
        && !error.contains_label("UnknownTransactionCommitResult")
}

pub(crate) struct EventStore {
    client: Client,
    /// Inserts: the encoded documents go out as they are.
    raw: Collection<RawDocumentBuf>,
    /// Reads from the primary with the configured read concern (majority by default): what
    /// is compared or counted as stored is durable.
    events: Collection<EventDocument>,
    /// The same, untyped: the highest sequence number is read with a projection.
    tops: Collection<Document>,
    metadata: Collection<Document>,
    pub retry: Retry,
    bypass_document_validation: bool,
    /// Stamps positions, holds them in flight, says which acknowledgements came late.
    pub watermarks: Watermarks,
    /// The latest operation time MongoDB gave this server's inserts. The reads a write is
    /// decided on (highest sequence numbers, stored events) are causally consistent after it
    /// (`readConcern.afterClusterTime`): right after an election, the new primary's majority
    /// snapshot can lag writes the old one acknowledged, and a read of it would call the next
    /// write of an id a gap. Such a read waits until the snapshot has this server's writes.
    /// Packed as `time << 32 | increment`, which orders as timestamps do; 0: none yet.
    answered_at: AtomicU64,
}

impl EventStore {
    pub fn new(database: &Database, settings: &Settings, watermarks: Watermarks) -> Self {
        let names = &settings.mongodb.collections;
        let primary = CollectionOptions::builder()
            .selection_criteria(SelectionCriteria::ReadPreference(ReadPreference::Primary))
            .build();
        Self {
            client: database.client().clone(),
            raw: database.collection(&names.journal),
            events: database.collection_with_options(&names.journal, primary.clone()),
            tops: database.collection_with_options(&names.journal, primary),
            metadata: database.collection(&names.journal_metadata),
            retry: Retry::new(&settings.mongodb.retry),
            bypass_document_validation: settings.mongodb.bypass_document_validation,
            watermarks,
            answered_at: AtomicU64::new(0),
        }
    }

    /// A session whose reads see at least every write of this server MongoDB has answered.
    async fn causal_session(&self) -> Result<ClientSession, mongodb::error::Error> {
        let mut session = self.client.start_session().causal_consistency(true).await?;
        let after = self.answered_at.load(Ordering::Relaxed);
        if after != 0 {
            session.advance_operation_time(Timestamp {
                time: (after >> 32) as u32,
                increment: after as u32,
            });
        }
        Ok(session)
    }

    /// Remembers the operation time of a write's answer (success or not: a duplicate key
    /// answer says what the server had, too).
    fn answered(&self, session: &ClientSession) {
        if let Some(time) = session.operation_time() {
            let packed = u64::from(time.time) << 32 | u64::from(time.increment);
            self.answered_at.fetch_max(packed, Ordering::Relaxed);
        }
    }

    /// The stored head of each persistence id (a missing one has highest 0).
    pub async fn read_heads(&self, pids: &[Pid]) -> Result<HashMap<Pid, StoredHead>, MongoError> {
        let operation = "read highest sequence number";
        // Owned futures (not closures over borrowed ids), so this stays `Send` for any caller.
        let reads: Vec<_> = pids.iter().map(|pid| self.read_top(pid.clone())).collect();
        let tops: Vec<(Pid, StoredHead)> = stream::iter(reads)
            .buffer_unordered(HEAD_READS_IN_PARALLEL)
            .try_collect()
            .await?;
        let mut heads: HashMap<Pid, StoredHead> = tops.into_iter().collect();
        let ids: Vec<&str> = pids.iter().map(|pid| &**pid).collect();
        let recorded: Vec<Document> = self
            .retry
            .run(operation, || async {
                let mut session = self.causal_session().await?;
                self.metadata
                    .find(doc! { "_id": { "$in": &ids } })
                    .session(&mut session)
                    .await?
                    .stream(&mut session)
                    .try_collect()
                    .await
            })
            .await
            .map_err(|error| self.retry.failure(operation, false, error))?;
        for record in recorded {
            let (Ok(pid), Ok(highest)) =
                (record.get_str("_id"), record.get_i64(HIGHEST_SEQUENCE_NR))
            else {
                continue;
            };
            // Above the journal's top when the events up to it were deleted and purged.
            if let Some(head) = heads.get_mut(pid) {
                head.highest = head.highest.max(highest);
            }
        }
        Ok(heads)
    }

    /// The journal's highest event of `pid`.
    async fn read_top(&self, pid: Pid) -> Result<(Pid, StoredHead), MongoError> {
        let operation = "read highest sequence number";
        let top = self
            .retry
            .run(operation, || async {
                let mut session = self.causal_session().await?;
                self.tops
                    .find_one(doc! { PERSISTENCE_ID: &*pid })
                    .sort(doc! { SEQUENCE_NR: -1 })
                    .projection(doc! { SEQUENCE_NR: 1, WRITTEN_AT: 1, "_id": 0 })
                    .session(&mut session)
                    .await
            })
            .await
            .map_err(|error| self.retry.failure(operation, false, error))?;
        let head = top.map_or_else(StoredHead::default, |top| StoredHead {
            highest: top.get_i64(SEQUENCE_NR).unwrap_or(0),
            written_at: top.get_datetime(WRITTEN_AT).ok().copied(),
        });
        Ok((pid, head))
    }

    /// The stored events of `pid` with sequence numbers `first..=last`, deleted ones included.
    pub async fn read_stored(
        &self,
        pid: &str,
        first: i64,
        last: i64,
    ) -> Result<Vec<EventDocument>, MongoError> {
        let operation = "check stored events";
        let filter = doc! { PERSISTENCE_ID: pid, SEQUENCE_NR: { "$gte": first, "$lte": last } };
        self.retry
            .run(operation, || async {
                let mut session = self.causal_session().await?;
                self.events
                    .find(filter.clone())
                    .sort(doc! { SEQUENCE_NR: 1 })
                    .session(&mut session)
                    .await?
                    .stream(&mut session)
                    .try_collect()
                    .await
            })
            .await
            .map_err(|error| self.retry.failure(operation, false, error))
    }

    /// One ordered insert of `documents`: MongoDB stops at the first failing document, so
    /// nothing after it is stored. `transactional`: all or nothing, as one transaction.
    ///
    /// `answer_by`: when the knowledge the insert was decided on becomes too old to insert on.
    /// An insert still unanswered then (it may have waited for a server or a pooled connection)
    /// is dropped, so what it had not sent never goes out: a sequence number another server
    /// wrote and deleted meanwhile may have been purged by then, and the unique index would no
    /// longer refuse it. It fails as a lost connection does (maybe applied: its outcome is read
    /// back). In a transaction, only the insert is bound: once it has run, its documents hold
    /// their index keys until the commit, which may come later; a transaction whose insert was
    /// dropped is ended, so it does not hold them.
    pub async fn insert(
        &self,
        documents: &[&RawDocumentBuf],
        transactional: bool,
        answer_by: tokio::time::Instant,
    ) -> Result<(), mongodb::error::Error> {
        let insert = self
            .raw
            .insert_many(documents.iter().copied())
            .ordered(true)
            .bypass_document_validation(self.bypass_document_validation);
        // An explicit session (an implicit one otherwise), for the answer's operation time.
        let mut session = self.client.start_session().await?;
        if transactional {
            session.start_transaction().await?;
        }
        let inserted = tokio::time::timeout_at(answer_by, insert.session(&mut session)).await;
        let Ok(inserted) = inserted else {
            if transactional {
                // Not started as far as the driver knows (this only resets it); MongoDB may
                // have started it.
                let _ = session.abort_transaction().await;
                self.end_transaction(&mut session).await;
            }
            return Err(not_answered_in_time());
        };
        let result = if !transactional {
            inserted.map(|_| ())
        } else {
            match inserted {
                Ok(_) => {
                    let committed = session.commit_transaction().await;
                    if let Err(error) = &committed
                        && may_hold_transaction(error)
                    {
                        self.end_transaction(&mut session).await;
                    }
                    committed
                }
                Err(error) => {
                    // The server aborted it already on most errors; this makes sure.
                    let _ = session.abort_transaction().await;
                    Err(error)
                }
            }
        };
        self.answered(&session);
        result
    }

    /// Ends the transaction of `session` after its commit failed (or its insert was dropped).
    /// MongoDB may have refused the commit without running it (a failed command, an
    /// interrupted one): the transaction then stays open on the server, holding its documents,
    /// until its lifetime runs out (a minute by default), and every other session's write of
    /// its ids fails with a write conflict. The driver cannot abort a transaction once it has
    /// sent the commit; a newer transaction of the same session ends it (MongoDB aborts the
    /// older one when the newer one sends its first command), and is aborted in turn. A
    /// transaction that did commit stays committed. This works wherever transactions do and
    /// needs no privilege. Only after an error that may have left it open
    /// ([`may_hold_transaction`]), or an insert dropped unanswered. Best effort, bounded by
    /// [`END_TRANSACTION_TIMEOUT`]: a failure is logged.
    async fn end_transaction(&self, session: &mut ClientSession) {
        let ended = async {
            session.start_transaction().await?;
            self.raw
                .find_one(doc! { "_id": 0 })
                .session(&mut *session)
                .await?;
            session.abort_transaction().await
        };
        match tokio::time::timeout(END_TRANSACTION_TIMEOUT, ended).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(%error, "could not end the transaction of a failed commit or a dropped insert")
            }
            Err(_) => tracing::warn!(
                "could not end the transaction of a failed commit or a dropped insert in time"
            ),
        }
    }

    /// Moves the events of `pid` from `first` on forward in read-journal order: their write
    /// was acknowledged late (see [`Watermarks::acknowledged`]), or a retry found them stored at
    /// a position queries may have passed ([`Watermarks::stored_late`]). Subscribers that
    /// missed them get them at the new stamp; one that did see them gets them twice: clients
    /// de-duplicate by (pid, seqNr).
    ///
    /// Events of the same persistence id after `first` move too (any that exist were written
    /// after it), so read-journal order keeps agreeing with sequence-number order.
    ///
    /// `acknowledged_late`: the stamp of the insert MongoDB just acknowledged late, or `None`
    /// when a retry found the events stored. The move is a write too, and can itself be late;
    /// after [`MAX_RESTAMPS`] late moves the events stay where they are, logged. Returns the
    /// last stamp given, if any.
    ///
    /// In fixed-drift mode, while MongoDB stays slow, the moves of a late insert lie ahead of
    /// now by the lateness just seen (the insert's, then each move's). Only this server knows
    /// the id's highest with the insert's stamp: it learns the new one, and other servers read
    /// it before writing the id again. Events a retry found stored are moved to now, in both
    /// modes and every time. Any server may make that move, while the server that stored them
    /// may still know the id's highest from its own insert, with the old position, and stamp
    /// the id's next write now without reading: it would land before events moved ahead of
    /// now. (And the time since the events were written says nothing of how slow MongoDB is:
    /// a retry an hour later would have hidden them from live queries for an hour.)
    pub async fn restamp(
        &self,
        pid: &str,
        first: i64,
        acknowledged_late: Option<DateTime>,
    ) -> Result<Option<DateTime>, MongoError> {
        let operation = "re-stamp late events";
        let began = std::time::Instant::now();
        // The stamp of the last write of these events that MongoDB acknowledged late (after a
        // late insert only: see above).
        let mut late = acknowledged_late.map(|stamp| stamp.timestamp_millis());
        let mut moved = None;
        for _ in 0..MAX_RESTAMPS {
            let stamp = self.watermarks.fresh_stamp(operation).await?;
            let lateness = late.map_or(0, |late| (stamp.millis() - late).max(0));
            let restamp = if self.watermarks.is_fixed_drift() {
                stamp.millis() + lateness
            } else {
                stamp.millis()
            };
            if late.is_some() {
                tracing::warn!(
                    pid,
                    first,
                    lateness_ms = lateness,
                    "write acknowledged late; moving its events forward in read-journal order"
                );
            } else {
                tracing::warn!(
                    pid,
                    first,
                    "retry found the events stored at a position live queries may have passed; \
                     moving them forward in read-journal order"
                );
            }
            let restamp = DateTime::from_millis(restamp);
            let filter = doc! {
                PERSISTENCE_ID: pid,
                SEQUENCE_NR: { "$gte": first },
                WRITTEN_AT: { "$lt": restamp },
            };
            let update = doc! { "$set": { WRITTEN_AT: restamp } };
            let result = self
                .retry
                .run(operation, || {
                    self.raw
                        .update_many(filter.clone(), update.clone())
                        .bypass_document_validation(self.bypass_document_validation)
                })
                .await;
            if let Err(error) = result {
                // It may still be applied: keep holding the horizon below it for a while.
                stamp.release_after_lease();
                return Err(self.retry.failure(operation, true, error));
            }
            moved = Some(restamp);
            let stamped = restamp.timestamp_millis().min(self.watermarks.now_millis());
            if !self.watermarks.acknowledged(&stamp).is_late(stamped) {
                return Ok(moved);
            }
            if late.is_some() {
                late = Some(stamped);
            }
        }
        self.watermarks.restamps_exhausted(operation, began)?;
        tracing::error!(
            pid,
            first,
            "MongoDB stayed slow; live queries may pass over these events"
        );
        Ok(moved)
    }
}

/// The error of an insert dropped unanswered when the knowledge it was decided on became too
/// old to insert on ([`EventStore::insert`]): maybe sent and applied, maybe never sent. An I/O
/// error, so it is handled (and retried) as a connection lost during an insert is: the highest
/// sequence numbers are read again first.
fn not_answered_in_time() -> mongodb::error::Error {
    tracing::warn!(
        "an insert was not answered before the knowledge it was decided on became too old to \
         insert on; dropped, its outcome is read back"
    );
    mongodb::error::Error::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "the insert was not answered within write-journal.purge-delay less \
         sequence-nr-cache-validity of the knowledge it was decided on, and was dropped",
    ))
}
