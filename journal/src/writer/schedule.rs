//! Which queued writes go into the next batch: the group commit's admission order.
//!
//! Three rules decide it:
//! - **Per persistence id, arrival order, one batch at a time.** A write is admitted only when
//!   every write of its persistence id that arrived before it is admitted too (into this batch,
//!   ahead of it, or an earlier one that has completed), and while no batch holding its
//!   persistence id is in flight. So a write never overtakes an earlier one of its id, and the
//!   outcome of write N is known before write N + 1 goes to MongoDB.
//! - **Per producer, one batch at a time.** A producer is one `WriteEventsStream`, or the
//!   `WriteEvents` calls of one connection. While a batch holding its writes is in flight, the
//!   writes it sends meanwhile wait and then go together: a busy producer gets big batches,
//!   which is what MongoDB does best, and cannot take more than one of the
//!   `max-batches-in-flight` slots. A heavy producer's batches are balanced: each takes at
//!   most half of what it has queued plus what its last batch held, so a stream's window
//!   splits into two halves that alternate, one inserted while the other waits (see
//!   `Producer::balanced`).
//! - **Light producers are never batched behind a heavy one.** A producer with at least
//!   `fair_share` events waiting is heavy: it gets batches of its own. The writes of the light
//!   producers (fewer waiting) are combined into batches of their own, so a producer writing
//!   now and then waits for one small insert, not for someone else's thousand events. When both
//!   kinds wait, batches alternate between them, so neither starves. While light producers
//!   other than itself are writing (its own small requests compete with nobody), a heavy
//!   producer's batch holds at most `fair_share` events, and `writer`
//!   paces heavy producers: after each of their batches they pause eight times as long as it
//!   took, and do not start beside a light batch (unless their last batch started 50 ms ago),
//!   so the light producers' inserts do not queue in MongoDB behind long ones.
//!
//! This module is plain data, no I/O: `writer` runs it, and its tests drive it with random
//! interleavings.

use std::collections::VecDeque;
use std::sync::Arc;

use ahash::{HashMap, HashSet};

/// Identifies a queued write inside the writer.
pub(crate) type WriteKey = u64;

/// A persistence id, shared by the writer's structures without copying.
pub(crate) type Pid = Arc<str>;

/// What the schedule needs to know of a queued write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Queued {
    pub key: WriteKey,
    pub producer: u64,
    /// The client the producer belongs to (`Origin`'s group).
    pub group: u64,
    pub pid: Pid,
    pub events: usize,
    pub bytes: usize,
}

/// Bounds of one batch.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub max_events: usize,
    pub max_bytes: usize,
    /// Waiting events from which a producer is heavy.
    pub fair_share: usize,
    /// Light producers are writing: a heavy producer's batch holds at most `fair_share`
    /// events, so the inserts running beside theirs in MongoDB stay short.
    pub light_active: bool,
    /// Heavy producers wait (see `writer`'s pacing).
    pub heavy_paused: bool,
    /// The group (client) all of the recent light writes came from, if one did: its own
    /// light writes neither cap nor pause its producers when they are heavy. (A client that
    /// sends a big request and then a small one, on one connection or two, competes with
    /// nobody.)
    pub light_only_group: Option<u64>,
    /// An exempt batch is in flight: no other starts (a client's several connections get one
    /// uncapped batch at a time, not one each).
    pub exempt_busy: bool,
}

/// The groups (clients) of the light producers seen writing lately: the latest, and the
/// latest other than it.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct LightSeen {
    latest: Option<(u64, std::time::Instant)>,
    other: Option<(u64, std::time::Instant)>,
}

impl LightSeen {
    /// A producer of `group` had a write in a light batch formed `at`.
    pub fn saw(&mut self, group: u64, at: std::time::Instant) {
        match self.latest {
            Some((latest, _)) if latest == group => {}
            latest => self.other = latest.or(self.other),
        }
        self.latest = Some((group, at));
    }

    /// Light producers wrote in the `window` before `now`: `Some` of the group they all
    /// belonged to, or `Some(None)` when they were of several. `None`: no light writes then.
    pub fn active(
        &self,
        now: std::time::Instant,
        window: std::time::Duration,
    ) -> Option<Option<u64>> {
        let recent = |seen: Option<(u64, std::time::Instant)>| {
            seen.filter(|(_, at)| now.duration_since(*at) < window)
        };
        match (recent(self.latest), recent(self.other)) {
            (None, _) => None,
            (Some((latest, _)), None) => Some(Some(latest)),
            (Some(_), Some(_)) => Some(None),
        }
    }
}

#[derive(Default)]
struct Producer {
    /// Its queued writes in arrival order.
    queue: VecDeque<WriteKey>,
    queued_events: usize,
    /// A batch holding its writes is in flight.
    busy: bool,
    /// In `Schedule::ring` (exactly when its queue is not empty).
    in_ring: bool,
    /// Events of its last batch (see [`Producer::balanced`]).
    last_batch: usize,
    /// Its client (`Queued::group`).
    group: u64,
}

impl Producer {
    /// The most a heavy producer's next batch takes: half of what it has queued and what its
    /// last batch answered (which it is sending again), so two batches of about equal size
    /// alternate. A producer with a window of unanswered requests (a `WriteEventsStream`)
    /// then keeps MongoDB busy: while one half is inserted, the other half is queued, and the
    /// answered half's successors arrive. Taking everything queued instead locks in whatever
    /// split the start gave (say 100 and 700 events), and the small batch's insert leaves
    /// MongoDB underused. Never below `fair_share`.
    fn balanced(&self, fair_share: usize) -> usize {
        (self.queued_events + self.last_batch)
            .div_ceil(2)
            .max(fair_share)
    }
}

#[derive(Default)]
pub(crate) struct Schedule {
    queued: HashMap<WriteKey, Queued>,
    producers: HashMap<u64, Producer>,
    /// Producers with queued writes, in round-robin order: the front is served first.
    ring: VecDeque<u64>,
    /// Per persistence id, its queued writes in arrival order (across producers).
    by_pid: HashMap<Pid, VecDeque<WriteKey>>,
    /// Persistence ids in a batch in flight.
    busy_pids: HashSet<Pid>,
    queued_events: usize,
    /// When light and heavy producers both wait, whose turn it is.
    heavy_next: bool,
    /// The last batch formed was of light producers.
    served_light: bool,
    /// The last batch formed was of a heavy producer exempt from pacing (`light_only_group`).
    served_exempt: bool,
}

impl Schedule {
    pub fn push(&mut self, write: Queued) {
        let producer = self.producers.entry(write.producer).or_default();
        producer.group = write.group;
        if !producer.in_ring {
            producer.in_ring = true;
            self.ring.push_back(write.producer);
        }
        producer.queue.push_back(write.key);
        producer.queued_events += write.events;
        self.by_pid
            .entry(write.pid.clone())
            .or_default()
            .push_back(write.key);
        self.queued_events += write.events;
        self.queued.insert(write.key, write);
    }

    /// Whether the last batch formed held light producers' writes.
    pub fn served_light(&self) -> bool {
        self.served_light
    }

    /// Whether the last batch formed was a heavy producer's, exempt from pacing because the
    /// recent light writes were all its own: it neither waits for the pacing nor sets it.
    pub fn served_exempt(&self) -> bool {
        self.served_exempt
    }

    pub fn queued_events(&self) -> usize {
        self.queued_events
    }

    pub fn is_empty(&self) -> bool {
        self.queued.is_empty()
    }

    /// Whether `key` may go into a batch now (given what this batch already took).
    fn admissible(&self, key: WriteKey) -> bool {
        let write = &self.queued[&key];
        !self.busy_pids.contains(&write.pid)
            && self.by_pid.get(&write.pid).and_then(VecDeque::front) == Some(&key)
    }

    /// Whether `producer` is free and has a write that may go into a batch now: `Some(heavy)`.
    fn ready(&self, producer: u64, fair_share: usize) -> Option<bool> {
        let state = self.producers.get(&producer)?;
        if state.busy || !state.queue.iter().any(|key| self.admissible(*key)) {
            return None;
        }
        Some(state.queued_events >= fair_share)
    }

    /// The next batch, in the order its writes must be applied; its persistence ids and
    /// producers are busy until [`Schedule::release`]. Empty when nothing is admissible.
    pub fn next_batch(&mut self, limits: Limits) -> Vec<Queued> {
        let mut light = Vec::new();
        let mut heavies = Vec::new();
        for producer in &self.ring {
            match self.ready(*producer, limits.fair_share) {
                Some(false) => light.push(*producer),
                Some(true) => heavies.push(*producer),
                None => {}
            }
        }
        // A producer whose client's light writes are the only recent ones, while no other
        // client's light producer waits, competes with nobody: neither paused nor capped (nor
        // pacing others).
        let group = |producer: &u64| self.producers[producer].group;
        let exempt = |producer: u64| {
            !limits.exempt_busy
                && limits.light_only_group == Some(group(&producer))
                && light.iter().all(|light| group(light) == group(&producer))
        };
        let heavy = heavies
            .into_iter()
            .find(|producer| !limits.heavy_paused || exempt(*producer));
        let heavy_exempt = heavy.is_some_and(exempt);
        let serve: Vec<u64> = match (light.is_empty(), heavy) {
            (true, None) => return Vec::new(),
            (true, Some(heavy)) => vec![heavy],
            (false, None) => light,
            (false, Some(heavy)) => {
                self.heavy_next = !self.heavy_next;
                if self.heavy_next { vec![heavy] } else { light }
            }
        };
        self.served_light = heavy.is_none_or(|heavy| serve != [heavy]);
        self.served_exempt = heavy_exempt && !self.served_light;
        let max_events = if self.served_light {
            limits.max_events
        } else if limits.light_active && !self.served_exempt {
            limits.max_events.min(limits.fair_share)
        } else {
            limits
                .max_events
                .min(self.producers[&serve[0]].balanced(limits.fair_share))
        };
        let mut batch: Vec<Queued> = Vec::new();
        // Per producer served: the events taken.
        let mut served: Vec<(u64, usize)> = Vec::new();
        let (mut events, mut bytes) = (0, 0);
        // Every write of a batch passes here, so the loop walks the producers' queues with as
        // few lookups as it can: its persistence id is looked up once per run of writes of one
        // id (runs are the rule: a request or stream writing one id), not once per write.
        let Self {
            queued,
            producers,
            by_pid,
            busy_pids,
            queued_events,
            ..
        } = self;
        'producers: for producer in serve {
            let state = producers.get_mut(&producer).expect("producer");
            let mut taken = 0;
            // The id of the writes being taken, and its queue: not busy, and taken up to here.
            let mut run: Option<(Pid, &mut VecDeque<WriteKey>)> = None;
            let mut index = 0;
            while let Some(&key) = state.queue.get(index) {
                let write = &queued[&key];
                if run.as_ref().is_none_or(|(pid, _)| *pid != write.pid) {
                    run = None;
                    if !busy_pids.contains(&write.pid) {
                        run = by_pid
                            .get_mut(&write.pid)
                            .map(|pid_queue| (write.pid.clone(), pid_queue));
                    }
                }
                // Admissible: the first of its id still queued, and the id not in flight.
                let Some((_, pid_queue)) = run
                    .as_mut()
                    .filter(|(_, pid_queue)| pid_queue.front() == Some(&key))
                else {
                    index += 1;
                    continue;
                };
                if !batch.is_empty()
                    && (events + write.events > max_events
                        || bytes + write.bytes > limits.max_bytes)
                {
                    served.push((producer, taken));
                    break 'producers;
                }
                pid_queue.pop_front();
                state.queue.remove(index);
                let write = queued.remove(&key).expect("queued write");
                if pid_queue.is_empty() {
                    run = None;
                    by_pid.remove(&write.pid);
                }
                state.queued_events -= write.events;
                *queued_events -= write.events;
                taken += write.events;
                events += write.events;
                bytes += write.bytes;
                batch.push(write);
            }
            served.push((producer, taken));
        }
        // The producers served go to the back of the ring, if they have writes left.
        // (Every write has an event at least: `model::AtomicWrite::new`.)
        served.retain(|(_, taken)| *taken > 0);
        let served_set: HashSet<u64> = served.iter().map(|(producer, ..)| *producer).collect();
        self.ring.retain(|producer| !served_set.contains(producer));
        for (producer, taken) in served {
            let state = self.producers.get_mut(&producer).expect("producer");
            state.last_batch = taken;
            state.busy = true;
            state.in_ring = !state.queue.is_empty();
            if state.in_ring {
                self.ring.push_back(producer);
            }
        }
        let mut last: Option<&Pid> = None;
        for write in &batch {
            if last != Some(&write.pid) {
                self.busy_pids.insert(write.pid.clone());
                last = Some(&write.pid);
            }
        }
        batch
    }

    /// A batch completed: its persistence ids and producers may go into batches again.
    pub fn release<'a>(
        &mut self,
        pids: impl IntoIterator<Item = &'a Pid>,
        producers: impl IntoIterator<Item = u64>,
    ) {
        for pid in pids {
            self.busy_pids.remove(pid);
        }
        for producer in producers {
            if let Some(state) = self.producers.get_mut(&producer) {
                state.busy = false;
            }
        }
        self.forget_idle_producers();
    }

    /// Removes and returns the queued writes of `pid` that `belongs` selects (in arrival
    /// order): how a failed write takes the later writes of its request or stream with it.
    pub fn remove_where(&mut self, pid: &str, belongs: impl Fn(WriteKey) -> bool) -> Vec<Queued> {
        let keys = self.by_pid.get(pid).map_or_else(Vec::new, |queue| {
            queue.iter().copied().filter(|key| belongs(*key)).collect()
        });
        self.take_out(keys)
    }

    /// Removes and returns the queued writes of `producer` that `belongs` selects (in its
    /// order): how a stream whose client has gone takes its writes out at once.
    pub fn remove_producer(
        &mut self,
        producer: u64,
        belongs: impl Fn(WriteKey) -> bool,
    ) -> Vec<Queued> {
        let keys = self
            .producers
            .get(&producer)
            .map_or_else(Vec::new, |state| {
                state
                    .queue
                    .iter()
                    .copied()
                    .filter(|key| belongs(*key))
                    .collect()
            });
        self.take_out(keys)
    }

    /// Takes the queued writes `keys` (in that order) out of every queue and count.
    fn take_out(&mut self, keys: Vec<WriteKey>) -> Vec<Queued> {
        if keys.is_empty() {
            return Vec::new();
        }
        let removed: Vec<Queued> = keys
            .into_iter()
            .filter_map(|key| self.queued.remove(&key))
            .collect();
        let gone: HashSet<WriteKey> = removed.iter().map(|write| write.key).collect();
        for write in &removed {
            self.queued_events -= write.events;
            if let Some(state) = self.producers.get_mut(&write.producer) {
                state.queue.retain(|key| !gone.contains(key));
                state.queued_events -= write.events;
            }
            if let Some(pid_queue) = self.by_pid.get_mut(&write.pid) {
                pid_queue.retain(|key| !gone.contains(key));
                if pid_queue.is_empty() {
                    self.by_pid.remove(&write.pid);
                }
            }
        }
        self.forget_idle_producers();
        removed
    }

    /// Producers with nothing queued leave the ring; with nothing in flight either, the map.
    fn forget_idle_producers(&mut self) {
        let producers = &mut self.producers;
        self.ring
            .retain(|producer| match producers.get_mut(producer) {
                Some(state) if !state.queue.is_empty() => true,
                Some(state) => {
                    state.in_ring = false;
                    false
                }
                None => false,
            });
        producers.retain(|_, state| state.busy || !state.queue.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ahash::{HashMapExt, HashSetExt};
    use proptest::prelude::*;

    const LIMITS: Limits = Limits {
        max_events: 10,
        max_bytes: 1_000,
        fair_share: 5,
        light_active: false,
        heavy_paused: false,
        light_only_group: None,
        exempt_busy: false,
    };

    fn write(key: WriteKey, producer: u64, pid: &str, events: usize) -> Queued {
        Queued {
            key,
            producer,
            group: producer,
            pid: pid.into(),
            events,
            bytes: events * 10,
        }
    }

    fn keys(batch: &[Queued]) -> Vec<WriteKey> {
        batch.iter().map(|write| write.key).collect()
    }

    fn release(schedule: &mut Schedule, batch: &[Queued]) {
        let pids: Vec<Pid> = batch.iter().map(|write| write.pid.clone()).collect();
        schedule.release(&pids, batch.iter().map(|write| write.producer));
    }

    /// A gone stream's queued writes leave at once: a later producer's write of the same id,
    /// queued behind them, is the next of that id, and nothing of the gone one is counted.
    #[test]
    fn a_removed_producers_writes_leave_the_queues_they_held_up() {
        let mut schedule = Schedule::default();
        schedule.push(write(0, 1, "p", 1));
        schedule.push(write(1, 1, "q", 2));
        schedule.push(write(2, 1, "p", 1));
        schedule.push(write(3, 2, "p", 1));
        let removed = schedule.remove_producer(1, |key| key != 1);
        assert_eq!(keys(&removed), [0, 2]);
        assert_eq!(schedule.queued_events(), 3);
        assert_eq!(keys(&schedule.next_batch(LIMITS)), [1, 3]);
        assert!(
            schedule.remove_producer(1, |_| true).is_empty(),
            "nothing queued"
        );
        assert!(schedule.remove_producer(7, |_| true).is_empty(), "unknown");
    }

    #[test]
    fn a_producer_gets_one_batch_at_a_time_holding_what_it_sent_meanwhile() {
        let mut schedule = Schedule::default();
        schedule.push(write(0, 1, "p0", 1));
        let first = schedule.next_batch(LIMITS);
        assert_eq!(keys(&first), [0]);
        for key in 1..5 {
            schedule.push(write(key, 1, &format!("p{}", key % 4), 1));
        }
        assert!(
            schedule.next_batch(LIMITS).is_empty(),
            "its batch is in flight"
        );
        release(&mut schedule, &first);
        assert_eq!(
            keys(&schedule.next_batch(LIMITS)),
            [1, 2, 3, 4],
            "a light producer's writes go together"
        );
    }

    #[test]
    fn a_heavy_producers_batch_takes_half_of_its_queue_and_last_batch_within_the_limit() {
        let roomy = Limits {
            max_events: 100,
            ..LIMITS
        };
        let mut schedule = Schedule::default();
        schedule.push(write(0, 1, "p0", 1));
        let first = schedule.next_batch(roomy);
        for key in 1..22 {
            schedule.push(write(key, 1, &format!("p{}", key % 4), 1));
        }
        release(&mut schedule, &first);
        // 21 queued and 1 answered: half of 22.
        let second = schedule.next_batch(roomy);
        assert_eq!(keys(&second), (1..12).collect::<Vec<_>>());
        release(&mut schedule, &second);
        // 10 queued and 11 answered would allow all 10; the batch limit (5) still applies.
        let limited = Limits {
            max_events: 5,
            ..LIMITS
        };
        assert_eq!(
            keys(&schedule.next_batch(limited)),
            (12..17).collect::<Vec<_>>()
        );
    }

    /// A stream keeps a window of unanswered writes: whatever a batch answered, it sends again.
    /// Started with one write in the first batch and the rest of the window in the second,
    /// taking everything queued would alternate 1 and 15 for ever; balanced, the batches
    /// settle at half the window each.
    #[test]
    fn a_streams_window_splits_into_two_halves() {
        let limits = Limits {
            max_events: 1_000,
            fair_share: 2,
            ..LIMITS
        };
        const WINDOW: usize = 16;
        let mut schedule = Schedule::default();
        let mut next_key = 0;
        let mut send = |schedule: &mut Schedule, count: usize| {
            for _ in 0..count {
                schedule.push(write(next_key, 1, "p", 1));
                next_key += 1;
            }
        };
        send(&mut schedule, 1);
        let mut in_flight = schedule.next_batch(limits);
        send(&mut schedule, WINDOW - 1);
        let mut sizes = Vec::new();
        for _ in 0..8 {
            release(&mut schedule, &in_flight);
            let answered = in_flight.len();
            // The next batch goes at once; the answered writes' successors arrive during it.
            in_flight = schedule.next_batch(limits);
            send(&mut schedule, answered);
            sizes.push(in_flight.len());
        }
        assert_eq!(sizes[4..], [WINDOW / 2; 4], "batch sizes: {sizes:?}");
    }

    #[test]
    fn light_producers_are_never_batched_behind_a_heavy_one() {
        let mut schedule = Schedule::default();
        for key in 0..20 {
            schedule.push(write(key, 1, &format!("bulk{key}"), 1));
        }
        schedule.push(write(100, 2, "modest-a", 1));
        schedule.push(write(101, 3, "modest-b", 1));
        // Both kinds wait: the heavy producer's batch, then one of the light ones together.
        let heavy = schedule.next_batch(LIMITS);
        assert_eq!(keys(&heavy), (0..10).collect::<Vec<_>>());
        let light = schedule.next_batch(LIMITS);
        assert_eq!(
            keys(&light),
            [100, 101],
            "light writes go in a batch of their own"
        );
        // The heavy producer's next batch waits for its first; a new light write does not.
        schedule.push(write(102, 4, "modest-c", 1));
        assert_eq!(keys(&schedule.next_batch(LIMITS)), [102]);
        assert!(schedule.next_batch(LIMITS).is_empty());
        release(&mut schedule, &heavy);
        assert_eq!(
            keys(&schedule.next_batch(LIMITS)),
            (10..20).collect::<Vec<_>>()
        );
    }

    #[test]
    fn while_light_producers_write_a_heavy_batch_is_capped_at_the_fair_share() {
        let mut schedule = Schedule::default();
        for key in 0..20 {
            schedule.push(write(key, 1, &format!("bulk{key}"), 1));
        }
        let limits = Limits {
            light_active: true,
            ..LIMITS
        };
        let batch = schedule.next_batch(limits);
        assert_eq!(keys(&batch), (0..5).collect::<Vec<_>>());
        assert!(!schedule.served_light());
        release(&mut schedule, &batch);
        assert_eq!(
            keys(&schedule.next_batch(LIMITS)),
            (5..15).collect::<Vec<_>>()
        );
    }

    /// A client whose own small requests (on this connection or its other one) are the only
    /// light writes lately is neither paused nor capped when a producer of it is heavy: it
    /// competes with nobody.
    #[test]
    fn a_clients_own_light_writes_neither_pause_nor_cap_it() {
        const CLIENT: u64 = 7;
        let mut schedule = Schedule::default();
        let of_client = |key, producer, pid: &str| Queued {
            group: CLIENT,
            ..write(key, producer, pid, 1)
        };
        for key in 0..20 {
            schedule.push(of_client(key, 1, &format!("bulk{key}")));
        }
        let paused_by = |group| Limits {
            light_active: true,
            heavy_paused: true,
            light_only_group: group,
            ..LIMITS
        };
        assert!(
            schedule.next_batch(paused_by(Some(2))).is_empty(),
            "paused by another client's light writes"
        );
        assert!(schedule.next_batch(paused_by(None)).is_empty());
        // The client's other connection has a light write waiting: still its own.
        schedule.push(of_client(50, 2, "own"));
        let batch = schedule.next_batch(paused_by(Some(CLIENT)));
        let heavy = if batch[0].producer == 1 {
            batch
        } else {
            assert_eq!(keys(&batch), [50]);
            schedule.next_batch(paused_by(Some(CLIENT)))
        };
        assert_eq!(keys(&heavy), (0..10).collect::<Vec<_>>(), "not capped at 5");
        assert!(
            schedule.served_exempt(),
            "so it does not set the pacing either"
        );
        release(&mut schedule, &heavy);
        for key in 20..30 {
            schedule.push(of_client(key, 1, &format!("bulk{key}")));
        }
        // Another client's light producer waits now: the heavy one is paused again.
        schedule.push(write(100, 3, "modest", 1));
        let batch = schedule.next_batch(paused_by(Some(CLIENT)));
        assert!(keys(&batch).contains(&100), "{:?}", keys(&batch));
        assert!(!schedule.served_exempt());
        // The writer now has the other client among the recent light ones too.
        assert!(schedule.next_batch(paused_by(None)).is_empty());
    }

    /// While a client's exempt batch is in flight, its other connections are not exempt too:
    /// one uncapped batch at a time, not one per connection.
    #[test]
    fn one_exempt_batch_at_a_time() {
        let mut schedule = Schedule::default();
        for key in 0..20 {
            schedule.push(Queued {
                group: 7,
                ..write(key, 4, &format!("more{key}"), 1)
            });
        }
        let exempt = Limits {
            light_active: true,
            heavy_paused: true,
            light_only_group: Some(7),
            ..LIMITS
        };
        let busy = Limits {
            exempt_busy: true,
            ..exempt
        };
        assert!(schedule.next_batch(busy).is_empty());
        assert_eq!(
            keys(&schedule.next_batch(exempt)),
            (0..10).collect::<Vec<_>>()
        );
    }

    #[test]
    fn light_seen_tells_one_recent_light_producer_from_several() {
        let start = std::time::Instant::now();
        let window = std::time::Duration::from_millis(100);
        let at = |millis| start + std::time::Duration::from_millis(millis);
        let mut seen = LightSeen::default();
        assert_eq!(seen.active(at(0), window), None);
        seen.saw(1, at(0));
        seen.saw(1, at(10));
        assert_eq!(seen.active(at(50), window), Some(Some(1)));
        seen.saw(2, at(60));
        assert_eq!(seen.active(at(70), window), Some(None), "1 and 2");
        seen.saw(2, at(150));
        assert_eq!(seen.active(at(170), window), Some(Some(2)), "1 is too old");
        seen.saw(1, at(175));
        assert_eq!(seen.active(at(180), window), Some(None), "2 and 1");
        assert_eq!(seen.active(at(300), window), None);
    }

    #[test]
    fn light_and_heavy_batches_alternate_when_both_wait() {
        let mut schedule = Schedule::default();
        let mut key = 0;
        let mut push = |schedule: &mut Schedule, producer: u64, pid: String| {
            schedule.push(write(key, producer, &pid, 1));
            key += 1;
        };
        for n in 0..30 {
            push(&mut schedule, 1, format!("heavy{n}"));
        }
        let mut kinds = Vec::new();
        for round in 0..4 {
            // A new light producer each round, so a light write is always waiting.
            push(&mut schedule, 10 + round, format!("light{round}"));
            let batch = schedule.next_batch(LIMITS);
            kinds.push(if batch[0].producer == 1 {
                "heavy"
            } else {
                "light"
            });
            release(&mut schedule, &batch);
        }
        assert_eq!(kinds, ["heavy", "light", "heavy", "light"]);
    }

    #[test]
    fn a_write_never_overtakes_an_earlier_one_of_its_pid() {
        let mut schedule = Schedule::default();
        schedule.push(write(1, 1, "p", 1));
        schedule.push(write(2, 2, "p", 1));
        schedule.push(write(3, 2, "q", 1));
        schedule.push(write(4, 1, "p", 1));
        // Both light: producer 1's p-write, then producer 2's (it came second), q; producer
        // 1's second p-write came after producer 2's, but the batch took that one already.
        assert_eq!(keys(&schedule.next_batch(LIMITS)), [1, 2, 3]);
        assert!(schedule.next_batch(LIMITS).is_empty(), "p is in flight");
    }

    #[test]
    fn an_oversized_write_goes_alone() {
        let mut schedule = Schedule::default();
        schedule.push(write(1, 1, "p", 50));
        schedule.push(write(2, 2, "q", 1));
        let first = schedule.next_batch(LIMITS);
        assert_eq!(keys(&first), [1]);
        assert_eq!(keys(&schedule.next_batch(LIMITS)), [2]);
    }

    #[test]
    fn removing_a_chain_keeps_the_others_in_order() {
        let mut schedule = Schedule::default();
        schedule.push(write(1, 1, "p", 1));
        schedule.push(write(2, 2, "p", 1));
        schedule.push(write(3, 1, "p", 1));
        let removed = schedule.remove_where("p", |key| key % 2 == 1);
        assert_eq!(keys(&removed), [1, 3]);
        assert_eq!(keys(&schedule.next_batch(LIMITS)), [2]);
        assert!(schedule.is_empty());
    }

    #[derive(Debug, Clone)]
    enum Step {
        Push {
            producer: u64,
            pid: u8,
            events: usize,
        },
        Batch,
        Complete {
            first: bool,
        },
        Remove {
            pid: u8,
        },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (0u64..4, 0u8..6, 1usize..5).prop_map(|(producer, pid, events)| Step::Push { producer, pid, events }),
            2 => Just(Step::Batch),
            2 => any::<bool>().prop_map(|first| Step::Complete { first }),
            1 => (0u8..6).prop_map(|pid| Step::Remove { pid }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Random interleavings of arrivals, batches, completions and removals: per pid,
        /// writes are admitted in arrival order; neither a pid nor a producer is in two
        /// batches in flight; a batch holds only light or only one heavy producer's writes;
        /// batches respect their limits; nothing is lost or admitted twice.
        #[test]
        fn admission_keeps_per_pid_order(steps in proptest::collection::vec(step(), 1..120)) {
            let mut schedule = Schedule::default();
            let mut next_key = 0;
            let mut arrivals: HashMap<String, Vec<WriteKey>> = HashMap::new();
            let mut admitted: HashMap<String, Vec<WriteKey>> = HashMap::new();
            let mut in_flight: VecDeque<Vec<Queued>> = VecDeque::new();
            let mut outstanding: HashSet<WriteKey> = HashSet::new();
            for step in steps {
                match step {
                    Step::Push { producer, pid, events } => {
                        let pid = format!("p{pid}");
                        schedule.push(write(next_key, producer, &pid, events));
                        arrivals.entry(pid).or_default().push(next_key);
                        outstanding.insert(next_key);
                        next_key += 1;
                    }
                    Step::Batch => {
                        let batch = schedule.next_batch(LIMITS);
                        if batch.is_empty() {
                            continue;
                        }
                        let total: usize = batch.iter().map(|write| write.events).sum();
                        prop_assert!(batch.len() == 1 || total <= LIMITS.max_events, "{batch:?}");
                        for write in &batch {
                            for other in &in_flight {
                                prop_assert!(other.iter().all(|busy| busy.pid != write.pid), "pid {} in two batches", write.pid);
                                prop_assert!(other.iter().all(|busy| busy.producer != write.producer), "producer {} in two batches", write.producer);
                            }
                            prop_assert!(outstanding.remove(&write.key), "admitted twice or unknown");
                            admitted.entry(write.pid.to_string()).or_default().push(write.key);
                        }
                        in_flight.push_back(batch);
                    }
                    Step::Complete { first } => {
                        let done = if first { in_flight.pop_front() } else { in_flight.pop_back() };
                        if let Some(batch) = done {
                            release(&mut schedule, &batch);
                        }
                    }
                    Step::Remove { pid } => {
                        let pid = format!("p{pid}");
                        for write in schedule.remove_where(&pid, |key| key % 3 == 0) {
                            prop_assert!(outstanding.remove(&write.key));
                            arrivals.get_mut(&pid).unwrap().retain(|key| *key != write.key);
                        }
                    }
                }
            }
            // Drain: everything left is admitted eventually.
            while let Some(batch) = in_flight.pop_front() {
                release(&mut schedule, &batch);
            }
            loop {
                let batch = schedule.next_batch(LIMITS);
                if batch.is_empty() {
                    break;
                }
                for write in &batch {
                    prop_assert!(outstanding.remove(&write.key));
                    admitted.entry(write.pid.to_string()).or_default().push(write.key);
                }
                release(&mut schedule, &batch);
            }
            prop_assert!(outstanding.is_empty(), "never admitted: {outstanding:?}");
            prop_assert!(schedule.is_empty());
            for (pid, order) in arrivals {
                prop_assert_eq!(admitted.remove(&pid).unwrap_or_default(), order, "pid {}", pid);
            }
        }
    }
}
