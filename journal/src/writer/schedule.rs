//! Which queued writes go into the next batch: the group commit's admission order.
//!
//! Two rules, and nothing else, decide it:
//! - **Per persistence id, arrival order, one batch at a time.** A write is admitted only when
//!   every write of its persistence id that arrived before it is admitted too (into this batch,
//!   ahead of it, or an earlier one that has completed), and while no batch holding its
//!   persistence id is in flight. So a write never overtakes an earlier one of its id, and the
//!   outcome of write N is known before write N + 1 goes to MongoDB.
//! - **Round robin over producers.** A producer is one `WriteEventsStream`, or the `WriteEvents`
//!   calls of one connection. Each producer adds at most `fair_share` events per turn; when
//!   more than one producer contributed, the batch closes after one turn each, so a prolific
//!   producer cannot make the others wait behind a batch of its own events. A producer alone
//!   fills the batch up to its limits.
//!
//! This module is plain data, no I/O: `writer` runs it, and its tests drive it with random
//! interleavings.

use std::collections::{HashMap, HashSet, VecDeque};

/// Identifies a queued write inside the writer.
pub(crate) type WriteKey = u64;

/// What the schedule needs to know of a queued write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Queued {
    pub key: WriteKey,
    pub producer: u64,
    pub pid: String,
    pub events: usize,
    pub bytes: usize,
}

/// Bounds of one batch.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub max_events: usize,
    pub max_bytes: usize,
    pub fair_share: usize,
}

#[derive(Default)]
pub(crate) struct Schedule {
    queued: HashMap<WriteKey, Queued>,
    /// Per producer, its queued writes in arrival order.
    producers: HashMap<u64, VecDeque<WriteKey>>,
    /// Producers with queued writes, in round-robin order: the front is served first.
    ring: VecDeque<u64>,
    /// Per persistence id, its queued writes in arrival order (across producers).
    by_pid: HashMap<String, VecDeque<WriteKey>>,
    /// Persistence ids in a batch in flight.
    busy: HashSet<String>,
    queued_events: usize,
}

impl Schedule {
    pub fn push(&mut self, write: Queued) {
        let queue = self.producers.entry(write.producer).or_default();
        if queue.is_empty() {
            self.ring.push_back(write.producer);
        }
        queue.push_back(write.key);
        self.by_pid
            .entry(write.pid.clone())
            .or_default()
            .push_back(write.key);
        self.queued_events += write.events;
        self.queued.insert(write.key, write);
    }

    pub fn queued_events(&self) -> usize {
        self.queued_events
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.queued.is_empty()
    }

    /// The next batch, in the order its writes must be applied; its persistence ids are busy
    /// until [`Schedule::release`]. Empty when nothing is admissible.
    pub fn next_batch(&mut self, limits: Limits) -> Vec<Queued> {
        let mut batch: Vec<Queued> = Vec::new();
        let (mut events, mut bytes) = (0, 0);
        let mut full = false;
        loop {
            let mut contributors = 0;
            for _ in 0..self.ring.len() {
                let Some(producer) = self.ring.pop_front() else {
                    break;
                };
                let mut share = 0;
                let mut index = 0;
                let queue = self.producers.entry(producer).or_default();
                while index < queue.len() && share < limits.fair_share {
                    let key = queue[index];
                    let write = &self.queued[&key];
                    let admissible = !self.busy.contains(&write.pid)
                        && self.by_pid.get(&write.pid).and_then(VecDeque::front) == Some(&key);
                    if !admissible {
                        index += 1;
                        continue;
                    }
                    if !batch.is_empty()
                        && (events + write.events > limits.max_events
                            || bytes + write.bytes > limits.max_bytes)
                    {
                        full = true;
                        break;
                    }
                    queue.remove(index);
                    let write = self.queued.remove(&key).expect("queued write");
                    let pid_queue = self.by_pid.get_mut(&write.pid).expect("pid queue");
                    pid_queue.pop_front();
                    if pid_queue.is_empty() {
                        self.by_pid.remove(&write.pid);
                    }
                    events += write.events;
                    bytes += write.bytes;
                    share += write.events;
                    self.queued_events -= write.events;
                    batch.push(write);
                }
                if share > 0 {
                    contributors += 1;
                }
                if queue.is_empty() {
                    self.producers.remove(&producer);
                } else {
                    self.ring.push_back(producer);
                }
                if full {
                    break;
                }
            }
            // Another turn only for a producer alone, and only while it adds something.
            if full || contributors != 1 {
                break;
            }
        }
        for write in &batch {
            self.busy.insert(write.pid.clone());
        }
        batch
    }

    /// The batch holding these persistence ids completed: their next writes are admissible.
    pub fn release<'a>(&mut self, pids: impl IntoIterator<Item = &'a str>) {
        for pid in pids {
            self.busy.remove(pid);
        }
    }

    /// Removes and returns the queued writes of `pid` that `belongs` selects (in arrival
    /// order): how a failed write takes the later writes of its request or stream with it.
    pub fn remove_where(&mut self, pid: &str, belongs: impl Fn(WriteKey) -> bool) -> Vec<Queued> {
        let Some(pid_queue) = self.by_pid.get_mut(pid) else {
            return Vec::new();
        };
        let (removed, kept): (Vec<WriteKey>, Vec<WriteKey>) =
            pid_queue.iter().partition(|key| belongs(**key));
        if kept.is_empty() {
            self.by_pid.remove(pid);
        } else {
            *pid_queue = kept.into();
        }
        let removed: Vec<Queued> = removed
            .into_iter()
            .filter_map(|key| self.queued.remove(&key))
            .collect();
        for write in &removed {
            self.queued_events -= write.events;
            if let Some(queue) = self.producers.get_mut(&write.producer) {
                queue.retain(|key| *key != write.key);
                if queue.is_empty() {
                    self.producers.remove(&write.producer);
                    self.ring.retain(|producer| *producer != write.producer);
                }
            }
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMITS: Limits = Limits {
        max_events: 10,
        max_bytes: 1_000,
        fair_share: 3,
    };

    fn write(key: WriteKey, producer: u64, pid: &str, events: usize) -> Queued {
        Queued {
            key,
            producer,
            pid: pid.to_owned(),
            events,
            bytes: events * 10,
        }
    }

    fn keys(batch: &[Queued]) -> Vec<WriteKey> {
        batch.iter().map(|write| write.key).collect()
    }

    #[test]
    fn a_producer_alone_fills_the_batch_in_order() {
        let mut schedule = Schedule::default();
        for key in 0..12 {
            schedule.push(write(key, 1, &format!("p{}", key % 4), 1));
        }
        assert_eq!(
            keys(&schedule.next_batch(LIMITS)),
            (0..10).collect::<Vec<_>>()
        );
        // Every pid is busy now; the rest waits for the release.
        assert!(schedule.next_batch(LIMITS).is_empty());
        schedule.release(["p0", "p1", "p2", "p3"]);
        assert_eq!(keys(&schedule.next_batch(LIMITS)), [10, 11]);
    }

    #[test]
    fn several_producers_get_one_fair_share_each() {
        let mut schedule = Schedule::default();
        for key in 0..20 {
            schedule.push(write(key, 1, &format!("bulk{key}"), 1));
        }
        schedule.push(write(100, 2, "modest-a", 1));
        schedule.push(write(101, 3, "modest-b", 1));
        let batch = keys(&schedule.next_batch(LIMITS));
        assert_eq!(
            batch,
            [0, 1, 2, 100, 101],
            "one turn each, then the batch closes"
        );
        let batch = keys(&schedule.next_batch(LIMITS));
        assert_eq!(
            batch,
            (3..13).collect::<Vec<_>>(),
            "alone again: it fills the batch"
        );
    }

    #[test]
    fn a_write_never_overtakes_an_earlier_one_of_its_pid() {
        let mut schedule = Schedule::default();
        schedule.push(write(1, 1, "p", 1));
        schedule.push(write(2, 2, "p", 1));
        schedule.push(write(3, 2, "q", 1));
        schedule.push(write(4, 1, "p", 1));
        // Producer 2 is served second, but its p-write came after producer 1's first; producer
        // 1's second p-write came after producer 2's, so it waits for the next batch.
        assert_eq!(keys(&schedule.next_batch(LIMITS)), [1, 2, 3]);
        assert!(schedule.next_batch(LIMITS).is_empty(), "p is in flight");
        schedule.release(["p", "q"]);
        assert_eq!(keys(&schedule.next_batch(LIMITS)), [4]);
    }

    #[test]
    fn an_oversized_write_goes_alone() {
        let mut schedule = Schedule::default();
        schedule.push(write(1, 1, "p", 50));
        schedule.push(write(2, 1, "q", 1));
        assert_eq!(keys(&schedule.next_batch(LIMITS)), [1]);
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
        /// writes are admitted in arrival order; a pid is never in two batches in flight;
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
                            }
                            prop_assert!(outstanding.remove(&write.key), "admitted twice or unknown");
                            admitted.entry(write.pid.clone()).or_default().push(write.key);
                        }
                        in_flight.push_back(batch);
                    }
                    Step::Complete { first } => {
                        let done = if first { in_flight.pop_front() } else { in_flight.pop_back() };
                        if let Some(batch) = done {
                            schedule.release(batch.iter().map(|write| write.pid.as_str()));
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
                schedule.release(batch.iter().map(|write| write.pid.as_str()));
            }
            loop {
                let batch = schedule.next_batch(LIMITS);
                if batch.is_empty() {
                    break;
                }
                for write in &batch {
                    prop_assert!(outstanding.remove(&write.key));
                    admitted.entry(write.pid.clone()).or_default().push(write.key);
                }
                schedule.release(batch.iter().map(|write| write.pid.as_str()));
            }
            prop_assert!(outstanding.is_empty(), "never admitted: {outstanding:?}");
            prop_assert!(schedule.is_empty());
            for (pid, order) in arrivals {
                prop_assert_eq!(admitted.remove(&pid).unwrap_or_default(), order, "pid {}", pid);
            }
        }
    }
}
