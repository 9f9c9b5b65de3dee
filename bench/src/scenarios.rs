//! The scenarios of the write benchmark, each a function of (side, round) returning one number,
//! so `main` can alternate sides and rounds without knowing what a scenario does. Every
//! scenario writes fresh persistence ids from sequence number 1, and both sides write the same
//! events in the same pattern: only what carries them differs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use mongodb::Collection;
use mongodb::bson::{Document, doc};
use proto::v1::GetObjectRequest;
use proto::v1::durable_state_store_client::DurableStateStoreClient;
use proto::v1::journal_client::JournalClient;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::raw::{MongodWrites, RawDriver};
use crate::service::{self, EventStream};
use crate::stats::{micros, percentile};
use crate::workload::{Side, Workload};

/// P1: sequential single-event writes of one actor.
const P1_WRITES: i64 = 300;
/// P2: concurrent actors, each writing one event at a time.
const P2_ACTORS: usize = 100;
const P2_EVENTS_PER_ACTOR: i64 = 100;
/// P3 and P3s: requests of single-event writes of one persistence id.
const P3_REQUESTS: i64 = 100;
pub const P3_WRITES_PER_REQUEST: i64 = 100;
/// P3s and the prolific producer: requests sent and not yet answered.
pub const STREAM_WINDOW: usize = 8;
/// Fairness: producers writing at a modest rate, and that rate.
const MODEST_PRODUCERS: usize = 10;
const MODEST_INTERVAL: Duration = Duration::from_millis(20);
/// Fairness: persistence ids of the prolific producer (each request has one write of each).
const PROLIFIC_PIDS: usize = 100;
/// Fairness: how long the prolific producer runs before the modest producers start measuring.
const PROLIFIC_RAMP_UP: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Scenario {
    P1,
    /// 100 actors sharing one `eventjournal_client::Client`, whose concurrent writes share calls.
    P2,
    /// P2 with a gRPC call of its own for every write (what a client without coalescing does).
    P2Unary,
    P3,
    P3s,
    Fairness,
    /// Read side (`read.rs`): 1,000 live `EventsByTag` subscribers, one per tag.
    R1k,
    /// Read side (`read.rs`): 10,000 live `EventsByTag` subscribers on 100 tags.
    R10k,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::P1 => "p1",
            Scenario::P2 => "p2",
            Scenario::P2Unary => "p2-unary",
            Scenario::P3 => "p3",
            Scenario::P3s => "p3s",
            Scenario::Fairness => "fairness",
            Scenario::R1k => "r1k",
            Scenario::R10k => "r10k",
        }
    }

    /// The scenario as the table names it.
    pub fn label(self) -> &'static str {
        match self {
            Scenario::P1 => "P1",
            Scenario::P2 => "P2",
            Scenario::P2Unary => "P2 unary",
            Scenario::P3 => "P3",
            Scenario::P3s => "P3s",
            Scenario::Fairness => "fairness",
            Scenario::R1k => "R1k",
            Scenario::R10k => "R10k",
        }
    }

    /// A read scenario: service only, on servers of its own (`read.rs`).
    pub fn is_read(self) -> bool {
        matches!(self, Scenario::R1k | Scenario::R10k)
    }

    /// Events one side writes in a round, for scenarios long enough that CPU per event from
    /// `/proc` (10 ms ticks) means something.
    pub fn events(self) -> Option<u64> {
        match self {
            Scenario::P2 | Scenario::P2Unary => Some(P2_ACTORS as u64 * P2_EVENTS_PER_ACTOR as u64),
            Scenario::P3 | Scenario::P3s => Some((P3_REQUESTS * P3_WRITES_PER_REQUEST) as u64),
            Scenario::P1 | Scenario::Fairness | Scenario::R1k | Scenario::R10k => None,
        }
    }

    /// The unit of the scenario's number, for progress lines.
    pub fn unit(self) -> &'static str {
        match self {
            Scenario::P1 | Scenario::Fairness => "µs",
            Scenario::P2 | Scenario::P2Unary | Scenario::P3 | Scenario::P3s => "events/s",
            Scenario::R1k | Scenario::R10k => "s",
        }
    }
}

/// One side's number for one round of a scenario.
#[derive(Debug, Clone, Copy)]
pub enum Measured {
    Value(f64),
    /// The service does not offer the RPC yet (`WriteEventsStream` while it is being built).
    Unimplemented,
}

/// One round of the fairness scenario: the modest producers' latencies alone (phase A) and
/// next to the prolific producer (phase B).
#[derive(Debug, Clone, Copy)]
pub struct FairnessRound {
    pub alone_p50_us: f64,
    pub alone_p99_us: f64,
    pub loaded_p50_us: f64,
    pub loaded_p99_us: f64,
    pub prolific_events_per_second: f64,
    /// false: the server lacks `WriteEventsStream` and every producer used unary calls.
    pub over_stream: bool,
}

pub struct Bench {
    workload: Arc<Workload>,
    /// The connection P1 to P3s share (HTTP/2 multiplexes their calls).
    channel: Channel,
    /// For producers that need a connection of their own (fairness).
    endpoint: Endpoint,
    /// The project's client on a connection of its own (P2: its concurrent writes share calls).
    client: eventjournal_client::Client,
    raw: Arc<RawDriver>,
    /// The service's durable-state collection: the raw side of [`Bench::read_round_trips`]
    /// reads it (the same collection and index the service reads).
    service_objects: Collection<Document>,
}

/// One round of [`Bench::read_round_trips`]: p50 latencies of the same read of MongoDB, through
/// the service and by the raw driver.
#[derive(Debug, Clone, Copy)]
pub struct ReadRoundTrips {
    pub service: Duration,
    pub raw: Duration,
}

impl Bench {
    pub async fn new(
        workload: Workload,
        server_url: &str,
        raw: Arc<RawDriver>,
        service_database: &str,
    ) -> anyhow::Result<Self> {
        let endpoint = Endpoint::from_shared(server_url.to_owned())?;
        let channel = endpoint
            .connect()
            .await
            .with_context(|| format!("connecting to the service at {server_url}"))?;
        let client = eventjournal_client::Client::builder(server_url)
            .connect()
            .await
            .with_context(|| format!("connecting eventjournal-client to {server_url}"))?;
        Ok(Self {
            workload: Arc::new(workload),
            channel,
            endpoint,
            client,
            service_objects: raw.objects(service_database),
            raw,
        })
    }

    /// mongod's counters of its own time in write commands, read before and after each side of
    /// P1 and P3: one insert at a time, so their mean is what mongod itself took per insert.
    pub async fn mongod_writes(&self) -> anyhow::Result<MongodWrites> {
        self.raw.mongod_writes().await
    }

    /// Writes a little on both sides before anything is measured: connection pools fill, the
    /// server's first-call paths run, and mongod has seen both collections being written.
    pub async fn warm_up(&self) -> anyhow::Result<()> {
        for side in [Side::Service, Side::Raw] {
            let pid = self.workload.pid("warm-up", 0, side, 0);
            self.single_writes(side, &pid, 1..=20).await?;
            let pid = self.workload.pid("warm-up", 0, side, 1);
            self.batches(side, &pid, 2, P3_WRITES_PER_REQUEST).await?;
        }
        let pid = self.workload.pid("warm-up", 0, Side::Service, 2);
        for sequence_nr in 1..=20 {
            let event = self.workload.client_event(&pid, sequence_nr);
            service::write_through(&self.client, event).await?;
        }
        // Small writes make the server pace producers of large batches for a while after them
        // (fairness, `journal::LIGHT_ACTIVITY`): the first round must not pay for the warm-up's.
        tokio::time::sleep(journal::LIGHT_ACTIVITY * 2).await;
        Ok(())
    }

    /// What a call shaped like `scenario`'s costs the service with no MongoDB work in it, in
    /// this round: an estimate of the least the service's side takes, whatever its write path
    /// does. P1: the p50 of 300 sequential `grpc.health.v1` checks (the cheapest unary call).
    /// P3: the p50 of 100 requests of P3's 100 writes, each refused on receipt (sequence number
    /// 0), so the server decodes and answers them (validation stops at the sequence number, each
    /// answer carries a reason) and stores nothing. `None` for the other scenarios.
    pub async fn floor(&self, scenario: Scenario, round: u32) -> anyhow::Result<Option<Duration>> {
        let mut latencies = Vec::new();
        match scenario {
            Scenario::P1 => {
                let mut health = HealthClient::new(self.channel.clone());
                for _ in 0..P1_WRITES {
                    let start = Instant::now();
                    health
                        .check(HealthCheckRequest::default())
                        .await
                        .context("floor: grpc.health.v1 check")?;
                    latencies.push(start.elapsed());
                }
            }
            Scenario::P3 => {
                let pid = self.workload.pid("p3-floor", round, Side::Service, 0);
                let mut request = self.workload.request(
                    (1..=P3_WRITES_PER_REQUEST).map(|sequence_nr| (pid.as_str(), sequence_nr)),
                );
                for write in &mut request.writes {
                    for event in &mut write.events {
                        event.sequence_nr = 0;
                    }
                }
                let mut client = JournalClient::new(self.channel.clone());
                for _ in 0..P3_REQUESTS {
                    let start = Instant::now();
                    let response = client
                        .write_events(request.clone())
                        .await
                        .context("floor: WriteEvents of refused writes")?;
                    latencies.push(start.elapsed());
                    service::check_rejected(response.get_ref(), request.writes.len())?;
                }
            }
            _ => return Ok(None),
        }
        Ok(Some(percentile(&mut latencies, 0.50)))
    }

    /// Beside P1: what the service's hop adds to a call that waits on MongoDB, with no write
    /// path in it. 300 `DurableStateStore/GetObject` calls of an id that has no object (one
    /// `find_one` by `_id` in the server) and 300 raw `find_one`s of it in the same collection,
    /// paired one after the other (the order alternating), so both sides see the same moment of
    /// a noisy machine. The service's p50 minus the raw p50 is what any unary call that waits
    /// on MongoDB pays for gRPC and the server's process; P1 pays it too.
    pub async fn read_round_trips(&self, round: u32) -> anyhow::Result<ReadRoundTrips> {
        let id = self
            .workload
            .pid("read-round-trip", round, Side::Service, 0);
        let mut client = DurableStateStoreClient::new(self.channel.clone());
        let mut service = Vec::with_capacity(P1_WRITES as usize);
        let mut raw = Vec::with_capacity(P1_WRITES as usize);
        for call in 0..P1_WRITES {
            for side in Side::in_order(call % 2 == 0) {
                let start = Instant::now();
                match side {
                    Side::Service => {
                        let request = GetObjectRequest {
                            persistence_id: id.clone(),
                        };
                        let response = client
                            .get_object(request)
                            .await
                            .context("read round trip: DurableStateStore/GetObject")?;
                        service.push(start.elapsed());
                        if response.get_ref().revision != 0 {
                            bail!("read round trip: {id} has an object; it must have none");
                        }
                    }
                    Side::Raw => {
                        let found = self
                            .service_objects
                            .find_one(doc! { "_id": &id })
                            .await
                            .context("read round trip: raw find_one")?;
                        raw.push(start.elapsed());
                        if found.is_some() {
                            bail!("read round trip: raw find_one found an object for {id}");
                        }
                    }
                }
            }
        }
        Ok(ReadRoundTrips {
            service: percentile(&mut service, 0.50),
            raw: percentile(&mut raw, 0.50),
        })
    }

    /// A persistence id `warm_up` wrote on `side`.
    pub fn warm_up_pid(&self, side: Side) -> String {
        self.workload.pid("warm-up", 0, side, 0)
    }

    /// One round of P1 to P3s on one side (fairness has its own method, the read scenarios
    /// their own module: they are service-only).
    pub async fn run(
        &self,
        scenario: Scenario,
        side: Side,
        round: u32,
    ) -> anyhow::Result<Measured> {
        match scenario {
            Scenario::P1 => self.p1(side, round).await.map(Measured::Value),
            Scenario::P2 => self.p2(side, round, true).await.map(Measured::Value),
            Scenario::P2Unary => self.p2(side, round, false).await.map(Measured::Value),
            Scenario::P3 => self.p3(side, round).await.map(Measured::Value),
            Scenario::P3s => self.p3s(side, round).await,
            Scenario::Fairness => Err(anyhow!("fairness runs through Bench::fairness")),
            Scenario::R1k | Scenario::R10k => Err(anyhow!("read scenarios run through read.rs")),
        }
    }

    /// P1: p50 latency in µs of 300 sequential single-event writes of one actor.
    async fn p1(&self, side: Side, round: u32) -> anyhow::Result<f64> {
        let pid = self.workload.pid("p1", round, side, 0);
        let mut latencies = self.single_writes(side, &pid, 1..=P1_WRITES).await?;
        Ok(micros(percentile(&mut latencies, 0.50)))
    }

    /// Sequential single-event writes of `pid`, each timed from sending to its durable
    /// acknowledgement.
    async fn single_writes(
        &self,
        side: Side,
        pid: &str,
        sequence_nrs: std::ops::RangeInclusive<i64>,
    ) -> anyhow::Result<Vec<Duration>> {
        let mut latencies = Vec::with_capacity(sequence_nrs.clone().count());
        let mut client = JournalClient::new(self.channel.clone());
        for sequence_nr in sequence_nrs {
            let start = Instant::now();
            match side {
                Side::Service => {
                    service::write(&mut client, self.workload.request([(pid, sequence_nr)])).await
                }
                Side::Raw => {
                    let document = self.workload.document(pid, sequence_nr)?;
                    self.raw.insert_one(&document).await
                }
            }
            .with_context(|| format!("{side}: event {sequence_nr} of {pid}"))?;
            latencies.push(start.elapsed());
        }
        Ok(latencies)
    }

    /// P2: events/s of 100 concurrent actors, each writing 100 events one at a time. On the
    /// service side the actors share one `eventjournal_client::Client` (`coalesced`: its
    /// concurrent writes share calls) or make a gRPC call of their own for every write.
    async fn p2(&self, side: Side, round: u32, coalesced: bool) -> anyhow::Result<f64> {
        let scenario = if coalesced { "p2" } else { "p2-unary" };
        let shared = self.client.clone();
        let start = Instant::now();
        let actors = (0..P2_ACTORS)
            .map(|actor| {
                let workload = Arc::clone(&self.workload);
                let raw = Arc::clone(&self.raw);
                let mut client = JournalClient::new(self.channel.clone());
                let shared = shared.clone();
                tokio::spawn(async move {
                    let pid = workload.pid(scenario, round, side, actor);
                    for sequence_nr in 1..=P2_EVENTS_PER_ACTOR {
                        match side {
                            Side::Service if coalesced => {
                                let event = workload.client_event(&pid, sequence_nr);
                                service::write_through(&shared, event).await
                            }
                            Side::Service => {
                                let request = workload.request([(pid.as_str(), sequence_nr)]);
                                service::write(&mut client, request).await
                            }
                            Side::Raw => {
                                let document = workload.document(&pid, sequence_nr)?;
                                raw.insert_one(&document).await
                            }
                        }
                        .with_context(|| format!("{side}: event {sequence_nr} of {pid}"))?;
                    }
                    Ok(())
                })
            })
            .collect();
        join_all(actors, "actors").await?;
        let events = P2_ACTORS as f64 * P2_EVENTS_PER_ACTOR as f64;
        Ok(events / start.elapsed().as_secs_f64())
    }

    /// P3: events/s of one persistence id written as 100 requests of 100 single-event writes,
    /// one request at a time (raw: one ordered `insert_many` of the same 100 documents).
    async fn p3(&self, side: Side, round: u32) -> anyhow::Result<f64> {
        let pid = self.workload.pid("p3", round, side, 0);
        self.events_per_second(side, &pid, P3_REQUESTS, P3_WRITES_PER_REQUEST)
            .await
    }

    /// Events/s of [`Bench::batches`].
    async fn events_per_second(
        &self,
        side: Side,
        pid: &str,
        requests: i64,
        size: i64,
    ) -> anyhow::Result<f64> {
        let start = Instant::now();
        self.batches(side, pid, requests, size).await?;
        Ok((requests * size) as f64 / start.elapsed().as_secs_f64())
    }

    /// `requests` requests of `size` consecutive events of `pid`, one at a time.
    async fn batches(&self, side: Side, pid: &str, requests: i64, size: i64) -> anyhow::Result<()> {
        let mut client = JournalClient::new(self.channel.clone());
        for request in 0..requests {
            let sequence_nrs = request * size + 1..=(request + 1) * size;
            match side {
                Side::Service => {
                    let request = self
                        .workload
                        .request(sequence_nrs.clone().map(|sequence_nr| (pid, sequence_nr)));
                    service::write(&mut client, request).await
                }
                Side::Raw => {
                    let documents = sequence_nrs
                        .clone()
                        .map(|sequence_nr| self.workload.document(pid, sequence_nr))
                        .collect::<anyhow::Result<Vec<_>>>()?;
                    self.raw.insert_many(&documents).await
                }
            }
            .with_context(|| format!("{side}: events {sequence_nrs:?} of {pid}"))?;
        }
        Ok(())
    }

    /// P3s: P3's events through `WriteEventsStream` with up to 8 requests unanswered.
    ///
    /// The raw side is the ceiling for one persistence id: the same events as ordered
    /// `insert_many`s as large as the writer's largest batch (`write-journal.max-batch-events`),
    /// one at a time. The service cannot have two inserts of one id in flight (write N + 1 must
    /// not be stored if write N fails), so one id's events go to MongoDB one insert at a time,
    /// and nothing carries them faster than the driver sending the largest inserts back to back.
    async fn p3s(&self, side: Side, round: u32) -> anyhow::Result<Measured> {
        if side == Side::Raw {
            let pid = self.workload.pid("p3s", round, side, 0);
            let size = i64::from(config::WriteJournalSettings::default().max_batch_events);
            let requests = P3_REQUESTS * P3_WRITES_PER_REQUEST / size;
            return self
                .events_per_second(side, &pid, requests, size)
                .await
                .map(Measured::Value);
        }
        if !service::stream_implemented(&self.channel).await? {
            return Ok(Measured::Unimplemented);
        }
        let pid = self.workload.pid("p3s", round, side, 0);
        let request = |index: i64| {
            let first = index * P3_WRITES_PER_REQUEST + 1;
            self.workload.request(
                (first..first + P3_WRITES_PER_REQUEST)
                    .map(|sequence_nr| (pid.as_str(), sequence_nr)),
            )
        };
        let start = Instant::now();
        let opening = (0..P3_REQUESTS.min(STREAM_WINDOW as i64))
            .map(request)
            .collect::<Vec<_>>();
        let mut sent = opening.len() as i64;
        let mut stream = EventStream::open(&self.channel, STREAM_WINDOW, opening).await?;
        for answered in 0..P3_REQUESTS {
            stream
                .next_written(P3_WRITES_PER_REQUEST as usize)
                .await
                .with_context(|| format!("service: stream request {answered} of {pid}"))?;
            if sent < P3_REQUESTS {
                stream.send(request(sent)).await?;
                sent += 1;
            }
        }
        Ok(Measured::Value(
            (P3_REQUESTS * P3_WRITES_PER_REQUEST) as f64 / start.elapsed().as_secs_f64(),
        ))
    }

    /// One round of fairness: the modest producers alone and next to the prolific one, in an
    /// order that alternates with the round.
    pub async fn fairness(&self, round: u32, phase: Duration) -> anyhow::Result<FairnessRound> {
        let over_stream = service::stream_implemented(&self.channel).await?;
        let (alone, loaded) = if round % 2 == 1 {
            let alone = self
                .fairness_phase(round, false, phase, over_stream)
                .await?;
            (
                alone,
                self.fairness_phase(round, true, phase, over_stream).await?,
            )
        } else {
            let loaded = self.fairness_phase(round, true, phase, over_stream).await?;
            (
                self.fairness_phase(round, false, phase, over_stream)
                    .await?,
                loaded,
            )
        };
        let (mut alone, _) = alone;
        let (mut loaded, prolific) = loaded;
        Ok(FairnessRound {
            alone_p50_us: micros(percentile(&mut alone, 0.50)),
            alone_p99_us: micros(percentile(&mut alone, 0.99)),
            loaded_p50_us: micros(percentile(&mut loaded, 0.50)),
            loaded_p99_us: micros(percentile(&mut loaded, 0.99)),
            prolific_events_per_second: prolific.unwrap_or(0.0),
            over_stream,
        })
    }

    /// The modest producers' latencies over `duration`, with the prolific producer running
    /// throughout when `with_prolific` (then also its events/s).
    async fn fairness_phase(
        &self,
        round: u32,
        with_prolific: bool,
        duration: Duration,
        over_stream: bool,
    ) -> anyhow::Result<(Vec<Duration>, Option<f64>)> {
        let scenario = if with_prolific { "fair-b" } else { "fair-a" };
        let stop = Arc::new(AtomicBool::new(false));
        let prolific = if with_prolific {
            let pids = (0..PROLIFIC_PIDS)
                .map(|index| {
                    self.workload
                        .pid("fair-prolific", round, Side::Service, index)
                })
                .collect::<Vec<_>>();
            let producer = tokio::spawn(prolific_producer(
                self.endpoint.clone(),
                Arc::clone(&self.workload),
                pids,
                Arc::clone(&stop),
                over_stream,
            ));
            tokio::time::sleep(PROLIFIC_RAMP_UP).await;
            Some(producer)
        } else {
            None
        };
        let modest = (0..MODEST_PRODUCERS)
            .map(|index| {
                let pid = self.workload.pid(scenario, round, Side::Service, index);
                tokio::spawn(modest_producer(
                    self.endpoint.clone(),
                    Arc::clone(&self.workload),
                    pid,
                    duration,
                    over_stream,
                ))
            })
            .collect();
        let latencies = join_all(modest, "modest producers").await;
        stop.store(true, Ordering::Relaxed);
        let prolific = match prolific {
            Some(producer) => {
                let (events, elapsed) = producer
                    .await
                    .context("the prolific producer panicked")?
                    .context("the prolific producer failed")?;
                Some(events as f64 / elapsed.as_secs_f64())
            }
            None => None,
        };
        Ok((latencies?.into_iter().flatten().collect(), prolific))
    }
}

/// One modest producer: a single-event write to `pid` every 20 ms for `duration`, each timed
/// from when it was due to its response. Over a stream the writes do not wait for each other
/// (a producer that waited would send less exactly when the server is slow, hiding the delay
/// it is meant to measure); the unary fallback has to wait, as the service orders a
/// persistence id's writes only within one request or stream. The first write (connection and
/// stream set-up) is not counted.
async fn modest_producer(
    endpoint: Endpoint,
    workload: Arc<Workload>,
    pid: String,
    duration: Duration,
    over_stream: bool,
) -> anyhow::Result<Vec<Duration>> {
    let channel = endpoint
        .connect()
        .await
        .context("modest producer: connecting")?;
    let latencies = if over_stream {
        modest_over_stream(&channel, &workload, &pid, duration).await
    } else {
        modest_over_unary(&channel, &workload, &pid, duration).await
    };
    latencies.with_context(|| format!("modest producer {pid}"))
}

async fn modest_over_stream(
    channel: &Channel,
    workload: &Workload,
    pid: &str,
    duration: Duration,
) -> anyhow::Result<Vec<Duration>> {
    let mut stream = EventStream::open(channel, 64, vec![workload.request([(pid, 1)])]).await?;
    stream.next_written(1).await.context("first write")?;
    let EventStream {
        sender,
        mut responses,
    } = stream;
    // When each write was due, in order; the reader pairs them with the responses.
    let (due_sender, mut due_receiver) = mpsc::unbounded_channel::<Instant>();
    let reader = tokio::spawn(async move {
        let mut latencies = Vec::new();
        while let Some(due) = due_receiver.recv().await {
            let response = responses
                .message()
                .await
                .context("WriteEventsStream failed")?
                .context("WriteEventsStream ended before answering every request")?;
            service::check_written(&response, 1)?;
            latencies.push(due.elapsed());
        }
        anyhow::Ok(latencies)
    });
    let mut ticks = tokio::time::interval(MODEST_INTERVAL);
    // Late ticks fire at once, each still timed from when it was due.
    ticks.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let deadline = Instant::now() + duration;
    let mut sequence_nr = 2;
    loop {
        let due = ticks.tick().await.into_std();
        if due >= deadline {
            break;
        }
        if due_sender.send(due).is_err() {
            // The reader failed; its error says why.
            break;
        }
        if sender
            .send(workload.request([(pid, sequence_nr)]))
            .await
            .is_err()
        {
            break;
        }
        sequence_nr += 1;
    }
    drop(due_sender);
    drop(sender);
    reader.await.context("stream reader panicked")?
}

async fn modest_over_unary(
    channel: &Channel,
    workload: &Workload,
    pid: &str,
    duration: Duration,
) -> anyhow::Result<Vec<Duration>> {
    let mut client = JournalClient::new(channel.clone());
    service::write(&mut client, workload.request([(pid, 1)]))
        .await
        .context("first write")?;
    let mut latencies = Vec::new();
    let mut ticks = tokio::time::interval(MODEST_INTERVAL);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let deadline = Instant::now() + duration;
    let mut sequence_nr = 2;
    loop {
        ticks.tick().await;
        let start = Instant::now();
        if start >= deadline {
            break;
        }
        service::write(&mut client, workload.request([(pid, sequence_nr)]))
            .await
            .with_context(|| format!("event {sequence_nr}"))?;
        latencies.push(start.elapsed());
        sequence_nr += 1;
    }
    Ok(latencies)
}

/// The prolific producer: requests of one write to each of `pids`, as fast as the service
/// takes them, with up to 8 unanswered, until `stop`. Returns the events acknowledged and
/// the time it took.
async fn prolific_producer(
    endpoint: Endpoint,
    workload: Arc<Workload>,
    pids: Vec<String>,
    stop: Arc<AtomicBool>,
    over_stream: bool,
) -> anyhow::Result<(u64, Duration)> {
    let channel = endpoint
        .connect()
        .await
        .context("prolific producer: connecting")?;
    let start = Instant::now();
    let events = if over_stream {
        prolific_over_stream(&channel, &workload, &pids, &stop).await?
    } else {
        // Without the stream, 8 requests in flight need 8 callers, each with its own ids:
        // two unary requests of one id in flight could arrive out of order.
        let callers = pids
            .chunks(pids.len().div_ceil(STREAM_WINDOW))
            .map(|pids| {
                let channel = channel.clone();
                let workload = Arc::clone(&workload);
                let pids = pids.to_vec();
                let stop = Arc::clone(&stop);
                tokio::spawn(async move {
                    let mut client = JournalClient::new(channel);
                    let mut events = 0;
                    let mut sequence_nr = 1;
                    while !stop.load(Ordering::Relaxed) {
                        let request =
                            workload.request(pids.iter().map(|pid| (pid.as_str(), sequence_nr)));
                        service::write(&mut client, request).await?;
                        events += pids.len() as u64;
                        sequence_nr += 1;
                    }
                    anyhow::Ok(events)
                })
            })
            .collect();
        join_all(callers, "prolific callers")
            .await?
            .into_iter()
            .sum()
    };
    Ok((events, start.elapsed()))
}

async fn prolific_over_stream(
    channel: &Channel,
    workload: &Workload,
    pids: &[String],
    stop: &AtomicBool,
) -> anyhow::Result<u64> {
    // Request k carries event k + 1 of every id.
    let request =
        |index: usize| workload.request(pids.iter().map(|pid| (pid.as_str(), index as i64 + 1)));
    let opening = (0..STREAM_WINDOW).map(request).collect();
    let mut stream = EventStream::open(channel, STREAM_WINDOW, opening).await?;
    let mut sent = STREAM_WINDOW;
    let mut answered = 0;
    while answered < sent {
        stream
            .next_written(pids.len())
            .await
            .with_context(|| format!("prolific producer: request {answered}"))?;
        answered += 1;
        if !stop.load(Ordering::Relaxed) {
            stream.send(request(sent)).await?;
            sent += 1;
        }
    }
    Ok((answered * pids.len()) as u64)
}

/// Waits for every task; fails naming how many failed and the first failure, so one bad
/// write among 100 actors is reported once instead of 100 times or not at all.
async fn join_all<T>(
    tasks: Vec<JoinHandle<anyhow::Result<T>>>,
    what: &str,
) -> anyhow::Result<Vec<T>> {
    let total = tasks.len();
    let mut values = Vec::with_capacity(total);
    let mut failed = 0;
    let mut first_error = None;
    for task in tasks {
        match task.await {
            Ok(Ok(value)) => values.push(value),
            Ok(Err(error)) => {
                failed += 1;
                first_error.get_or_insert(error);
            }
            Err(panicked) => {
                failed += 1;
                first_error.get_or_insert(anyhow!(panicked));
            }
        }
    }
    match first_error {
        None => Ok(values),
        Some(error) => Err(error.context(format!("{failed} of {total} {what} failed; the first"))),
    }
}
