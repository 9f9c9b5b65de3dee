//! What this server knows of each persistence id's highest stored sequence number, so that a
//! write continuing it directly (the common case: an actor persisting its next event) needs no
//! read before its insert.
//!
//! Why trusting it for a while is safe: a write goes to MongoDB only if it starts exactly at
//! `highest + 1` as known here. If another server has written further since, that sequence
//! number is in the journal and the unique `(pid, seqNr)` index refuses the insert, unless it
//! was deleted *and purged*. Deleted events become purgeable only `write-journal.purge-delay`
//! after the delete, and knowledge is used for at most `sequence-nr-cache-validity` (at most
//! half the purge delay) after it was confirmed, so within that time no sequence number this
//! server might write can have been purged. Any other case (no knowledge, stale knowledge, a
//! write that does not continue the highest) reads the highest first.

use std::time::{Duration, Instant};

use ahash::{HashMap, HashMapExt};
use mongodb::bson::DateTime;

use crate::writer::schedule::Pid;

/// The highest stored sequence number of one persistence id, as known at `confirmed`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Head {
    /// 0 when nothing was ever written.
    pub highest: i64,
    /// `writtenAt` of the highest event (when known): a later write of the same id is stamped
    /// no earlier, so read-journal order agrees with sequence-number order.
    pub written_at: Option<DateTime>,
    /// When it was last known to be true: the start of the read that found it, or the moment
    /// before this server sent the insert that wrote it.
    pub confirmed: Instant,
}

/// Why a persistence id's last write failed, to name it when a later write of the id is
/// refused for leaving a gap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    pub first: i64,
    pub last: i64,
    pub reason: String,
}

impl Failure {
    /// The id's failure once `own` failed too: a run of failures (each continuing the one
    /// before) is named by its first.
    pub fn after(earlier: Option<&Failure>, own: Failure) -> Failure {
        match earlier {
            Some(earlier) if earlier.last.checked_add(1) == Some(own.first) => Failure {
                first: earlier.first,
                last: own.last,
                reason: earlier.reason.clone(),
            },
            _ => own,
        }
    }
}

/// Bounded: entries older than the validity are swept once the map has grown.
pub(crate) struct Heads {
    validity: Duration,
    heads: HashMap<Pid, Head>,
    failures: HashMap<Pid, Failure>,
    sweep_above: usize,
}

/// Entries kept before the first sweep; sweeps happen when the map doubles since the last.
const INITIAL_SWEEP: usize = 4096;
/// Failures remembered at most (they only make messages better).
const MAX_FAILURES: usize = 4096;

impl Heads {
    pub fn new(validity: Duration) -> Self {
        Self {
            validity,
            heads: HashMap::new(),
            failures: HashMap::new(),
            sweep_above: INITIAL_SWEEP,
        }
    }

    /// The head of `pid` if it is still valid at `now`.
    pub fn valid(&self, pid: &str, now: Instant) -> Option<Head> {
        self.heads
            .get(pid)
            .filter(|head| now.saturating_duration_since(head.confirmed) < self.validity)
            .copied()
    }

    pub fn set(&mut self, pid: &Pid, head: Head) {
        self.heads.insert(pid.clone(), head);
        if self.heads.len() > self.sweep_above {
            let now = Instant::now();
            let validity = self.validity;
            self.heads
                .retain(|_, head| now.saturating_duration_since(head.confirmed) < validity);
            self.sweep_above = (self.heads.len() * 2).max(INITIAL_SWEEP);
        }
    }

    pub fn forget(&mut self, pid: &str) {
        self.heads.remove(pid);
    }

    pub fn failure(&self, pid: &str) -> Option<&Failure> {
        self.failures.get(pid)
    }

    pub fn record_failure(&mut self, pid: &Pid, failure: Failure) {
        if self.failures.len() >= MAX_FAILURES && !self.failures.contains_key(pid) {
            self.failures.clear();
        }
        self.failures.insert(pid.clone(), failure);
    }

    pub fn clear_failure(&mut self, pid: &str) {
        self.failures.remove(pid);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.heads.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(confirmed: Instant) -> Head {
        Head {
            highest: 3,
            written_at: None,
            confirmed,
        }
    }

    #[test]
    fn knowledge_expires_after_the_validity() {
        let mut heads = Heads::new(Duration::from_secs(5));
        let then = Instant::now();
        heads.set(&"p".into(), head(then));
        assert_eq!(
            heads.valid("p", then + Duration::from_secs(4)),
            Some(head(then))
        );
        assert_eq!(heads.valid("p", then + Duration::from_secs(5)), None);
        assert_eq!(heads.valid("q", then), None);
    }

    #[test]
    fn expired_entries_are_swept_as_the_map_grows() {
        let mut heads = Heads::new(Duration::from_millis(1));
        let old = Instant::now() - Duration::from_secs(1);
        for n in 0..=INITIAL_SWEEP {
            heads.set(&format!("p{n}").into(), head(old));
        }
        assert!(heads.len() <= 1, "{} entries left", heads.len());
    }
}
