//! The read scenarios: many live `EventsByTag` subscribers on one server, measured in both
//! live-query modes (polling, change streams). Service only: the raw driver has no live query
//! to compare with.
//!
//! Each (scenario, mode) runs on a fresh server process per round, so one mode's pollers or
//! change stream, and the memory the previous scenario left, cannot bill the other; tags are
//! fresh per round, so every subscription starts on an empty tag. A round opens the
//! subscriptions, waits for the server to go quiet, measures its idle CPU and memory, then
//! writes one event to each tag and times each subscriber's arrival against its write's
//! acknowledgement.
//!
//! The client side is built not to be the bottleneck of delivery on a small machine shared
//! with the server and mongod: one task per subscription, each recording its own arrivals in
//! its own `Vec`, and nothing shared per message but relaxed atomic counters touched once per
//! subscriber.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use futures::{StreamExt, TryStreamExt};
use proto::v1 as pb;
use proto::v1::journal_client::JournalClient;
use proto::v1::read_journal_client::ReadJournalClient;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};

use crate::cpu::{cpu_ticks, percent_of_core};
use crate::report::{Met, Row, number};
use crate::scenarios::Scenario;
use crate::server::Server;
use crate::service;
use crate::stats::{median, percentile};
use crate::workload::Workload;

/// Subscriptions multiplexed on one HTTP/2 connection. The server (tonic) advertises no
/// SETTINGS_MAX_CONCURRENT_STREAMS unless configured to, and hyper's own default would be
/// 200; a lower limit would hold streams back on the client without an error, which the open
/// step turns into a failure naming how many subscriptions opened.
const SUBSCRIPTIONS_PER_CONNECTION: usize = 100;
/// Unary writes unanswered at once in the delivery step.
const WRITES_IN_FLIGHT: usize = 16;
const OPEN_TIMEOUT: Duration = Duration::from_secs(60);
/// The server has settled when its CPU over one window is under this share of one core.
const SETTLED_CPU_PERCENT: f64 = 10.0;
const SETTLE_WINDOW: Duration = Duration::from_secs(1);
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the server's CPU is measured with subscribers connected and nothing written.
const IDLE_WINDOW: Duration = Duration::from_secs(10);
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(60);
/// After every subscriber has its event: how long to wait for copies or strays.
const AFTER_DELIVERY: Duration = Duration::from_secs(1);
/// How often waiting loops look at the counters; arrival times are taken by the subscribers,
/// so this bounds only how long a wait overshoots.
const CHECK_EVERY: Duration = Duration::from_millis(10);
/// Every mode's bound on delivery (the issue: every subscriber within 5 s).
const DELIVERY_LIMIT: Duration = Duration::from_secs(5);
const CHANGE_STREAMS_ENV: &str = "EVENTJOURNAL_READ_JOURNAL__USE_CHANGE_STREAMS";

/// How live queries are fed: the server's two `read-journal` modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Polling,
    ChangeStreams,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Polling => "polling",
            Mode::ChangeStreams => "change streams",
        }
    }

    /// For tag names.
    fn slug(self) -> &'static str {
        match self {
            Mode::Polling => "poll",
            Mode::ChangeStreams => "cs",
        }
    }

    /// The server's environment on top of its defaults.
    fn env(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Mode::Polling => &[],
            Mode::ChangeStreams => &[(CHANGE_STREAMS_ENV, "true")],
        }
    }
}

/// Subscribers and the tags they spread over (subscriber `i` follows tag `i % tags`, so every
/// connection carries every tag it can).
#[derive(Debug, Clone, Copy)]
struct Shape {
    subscribers: usize,
    tags: usize,
}

fn shape(scenario: Scenario) -> Shape {
    match scenario {
        Scenario::R10k => Shape {
            subscribers: 10_000,
            tags: 100,
        },
        _ => Shape {
            subscribers: 1_000,
            tags: 1_000,
        },
    }
}

fn label(scenario: Scenario) -> &'static str {
    match scenario {
        Scenario::R10k => "R10k",
        _ => "R1k",
    }
}

/// What the read scenarios run against.
pub struct Plan<'a> {
    pub server_binary: &'a Path,
    pub mongodb_uri: &'a str,
    pub database: &'a str,
    pub run_id: &'a str,
    pub rounds: u32,
}

/// One round of one (scenario, mode).
struct Round {
    round: u32,
    open: Duration,
    /// `None`: the server did not settle within `SETTLE_TIMEOUT`.
    settle: Option<Duration>,
    idle_cpu_percent: f64,
    rss_before_mb: f64,
    rss_after_mb: f64,
    peak_rss_mb: f64,
    /// Why delivery failed: missed, stray or repeated events, a failed write or stream.
    delivery: Result<Delivery, String>,
}

struct Delivery {
    max: Duration,
    p99: Duration,
    /// Subscribers whose event arrived before its write was acknowledged (latency clamped to 0).
    before_ack: usize,
}

struct Series {
    scenario: Scenario,
    mode: Mode,
    rounds: Vec<Round>,
    /// The failure that stopped it; it is not run again in later rounds.
    error: Option<String>,
}

impl Series {
    fn label(&self) -> String {
        format!("{} {}", label(self.scenario), self.mode.name())
    }
}

pub struct ReadResults {
    series: Vec<Series>,
    rounds: u32,
    allowed_time_drift: Duration,
    poll_interval: Duration,
}

/// All rounds of the read `scenarios`, each in both modes; which mode goes first alternates by
/// round. A failing (scenario, mode) is reported and skipped from then on.
pub async fn measure(plan: &Plan<'_>, scenarios: &[Scenario]) -> ReadResults {
    // The server runs with its defaults (only the mode is set), so these are its values.
    let defaults = config::ReadJournalSettings::default();
    let mut results = ReadResults {
        series: scenarios
            .iter()
            .flat_map(|&scenario| {
                [Mode::Polling, Mode::ChangeStreams].map(|mode| Series {
                    scenario,
                    mode,
                    rounds: Vec::new(),
                    error: None,
                })
            })
            .collect(),
        rounds: plan.rounds,
        allowed_time_drift: defaults.allowed_time_drift,
        poll_interval: defaults.poll_interval,
    };
    let workload = Workload::new(plan.run_id);
    for round in 1..=plan.rounds {
        let modes = if round % 2 == 1 {
            [Mode::Polling, Mode::ChangeStreams]
        } else {
            [Mode::ChangeStreams, Mode::Polling]
        };
        for &scenario in scenarios {
            for mode in modes {
                let Some(series) = results
                    .series
                    .iter_mut()
                    .find(|series| series.scenario == scenario && series.mode == mode)
                else {
                    continue;
                };
                if series.error.is_some() {
                    continue;
                }
                let progress = format!(
                    "read round {round}/{} {} {}",
                    plan.rounds,
                    scenario.name(),
                    mode.name()
                );
                match run_round(plan, &workload, scenario, mode, round, &progress).await {
                    Ok(measured) => series.rounds.push(measured),
                    Err(error) => {
                        eprintln!("{progress}: FAILED: {error:#}");
                        series.error = Some(format!("{error:#}"));
                    }
                }
            }
        }
    }
    results
}

async fn run_round(
    plan: &Plan<'_>,
    workload: &Workload,
    scenario: Scenario,
    mode: Mode,
    round: u32,
    progress: &str,
) -> anyhow::Result<Round> {
    let shape = shape(scenario);
    let prefix = format!(
        "{}-{}-{}-r{round}",
        scenario.name(),
        plan.run_id,
        mode.slug()
    );
    let tags: Vec<String> = (0..shape.tags)
        .map(|index| format!("{prefix}-tag{index}"))
        .collect();
    let pids: Vec<String> = (0..shape.tags)
        .map(|index| format!("{prefix}-pid{index}"))
        .collect();
    let mut server = Server::start_with_env(
        plan.server_binary,
        plan.mongodb_uri,
        plan.database,
        mode.env(),
    )
    .await
    .context("starting the service")?;
    let measured = measure_round(&server, workload, shape, &tags, &pids, round, progress).await;
    if measured.is_err() {
        // A dead server explains the failure better than what the client saw.
        server.check_alive()?;
    }
    measured
}

async fn measure_round(
    server: &Server,
    workload: &Workload,
    shape: Shape,
    tags: &[String],
    pids: &[String],
    round: u32,
    progress: &str,
) -> anyhow::Result<Round> {
    let pid = server.pid();
    let rss_before_mb = memory_mb(pid, "VmRSS").await?;
    let url = server.url();
    let endpoint = Endpoint::from_shared(url.clone())?;
    // Connected now, so connecting is not billed to idle CPU or to delivery.
    let writer = endpoint
        .connect()
        .await
        .with_context(|| format!("connecting to the service at {url}"))?;
    let (subscribers, open) = Subscribers::open(&endpoint, tags, shape.subscribers).await?;
    let settle = settle(pid).await?;
    let idle_cpu_percent = cpu_percent(pid, IDLE_WINDOW).await?;
    let rss_after_mb = memory_mb(pid, "VmRSS").await?;
    eprintln!(
        "{progress}: {} subscriptions on {} connections open in {:.1} s, {}; idle CPU {:.1}% \
         of a core; RSS {:.0} → {:.0} MB",
        number(shape.subscribers as f64),
        shape.subscribers.div_ceil(SUBSCRIPTIONS_PER_CONNECTION),
        open.as_secs_f64(),
        match settle {
            Some(settle) => format!("settled in {:.1} s", settle.as_secs_f64()),
            None => format!("not settled within {SETTLE_TIMEOUT:?}"),
        },
        idle_cpu_percent,
        rss_before_mb,
        rss_after_mb,
    );

    // CPU of both ends while events flow, to tell a slow server from a slow client.
    let cpu_before = (cpu_ticks(pid).await?, cpu_ticks(std::process::id()).await?);
    let delivering = Instant::now();
    let acks = write_one_per_tag(writer, workload, tags, pids).await;
    let all_received = acks.is_ok() && subscribers.wait_for_delivery().await;
    let cpu_after = (cpu_ticks(pid).await?, cpu_ticks(std::process::id()).await?);
    let delivering = delivering.elapsed();
    let cpu_during = (
        percent_of_core(cpu_before.0, cpu_after.0, delivering),
        percent_of_core(cpu_before.1, cpu_after.1, delivering),
    );
    if all_received {
        // Copies and strays would come now.
        tokio::time::sleep(AFTER_DELIVERY).await;
    }
    let arrivals = subscribers.finish().await;
    let peak_rss_mb = memory_mb(pid, "VmHWM").await?;
    let delivery = match acks {
        Ok(acks) => judge(tags, pids, &acks, arrivals),
        Err(error) => Err(format!("writing the events: {error:#}")),
    };
    let outcome = match &delivery {
        Ok(delivery) => format!(
            "delivery max {:.3} s, p99 {:.3} s ({} before the ack)",
            delivery.max.as_secs_f64(),
            delivery.p99.as_secs_f64(),
            delivery.before_ack,
        ),
        Err(error) => format!("delivery FAILED: {error}"),
    };
    eprintln!(
        "{progress}: {outcome}; CPU while delivering: server {:.0}%, benchmark {:.0}% of a core \
         over {:.1} s; peak RSS {peak_rss_mb:.0} MB",
        cpu_during.0,
        cpu_during.1,
        delivering.as_secs_f64(),
    );
    Ok(Round {
        round,
        open,
        settle,
        idle_cpu_percent,
        rss_before_mb,
        rss_after_mb,
        peak_rss_mb,
        delivery,
    })
}

/// One event received by a subscriber, with when it arrived.
struct Arrival {
    at: Instant,
    persistence_id: String,
    sequence_nr: i64,
    tags: Vec<String>,
}

impl Arrival {
    /// Takes the fields out of the envelope: no copy per message.
    fn new(at: Instant, envelope: pb::EventEnvelope) -> Self {
        let event = envelope.event.unwrap_or_default();
        Self {
            at,
            persistence_id: event.persistence_id,
            sequence_nr: event.sequence_nr,
            tags: event.tags,
        }
    }
}

/// Counters the subscriber tasks bump once each, for the waits of the round.
#[derive(Default)]
struct Progress {
    opened: AtomicUsize,
    /// Subscribers that received at least one event.
    received: AtomicUsize,
    failed: AtomicUsize,
}

/// The live subscriptions of one round. Dropped, they stop (an error in the round must not
/// leave 10,000 streams behind).
struct Subscribers {
    tasks: Vec<JoinHandle<anyhow::Result<Vec<Arrival>>>>,
    progress: Arc<Progress>,
    stop: watch::Sender<bool>,
}

impl Subscribers {
    /// Opens `count` `EventsByTag` subscriptions from the start of their tags, subscriber `i`
    /// on `tags[i % tags.len()]`, `SUBSCRIPTIONS_PER_CONNECTION` per connection, and waits until
    /// the server has answered every call. Returns them and how long opening took.
    async fn open(
        endpoint: &Endpoint,
        tags: &[String],
        count: usize,
    ) -> anyhow::Result<(Self, Duration)> {
        let started = Instant::now();
        let connections = count.div_ceil(SUBSCRIPTIONS_PER_CONNECTION);
        let channels: Vec<Channel> =
            futures::future::try_join_all((0..connections).map(|_| endpoint.connect()))
                .await
                .context("connecting the subscribers")?;
        let (stop, stopped) = watch::channel(false);
        let progress = Arc::new(Progress::default());
        let tasks = (0..count)
            .map(|index| {
                let client =
                    ReadJournalClient::new(channels[index / SUBSCRIPTIONS_PER_CONNECTION].clone());
                let request = pb::EventsByTagRequest {
                    tag: tags[index % tags.len()].clone(),
                    offset: String::new(),
                };
                tokio::spawn(subscriber(
                    client,
                    request,
                    Arc::clone(&progress),
                    stopped.clone(),
                ))
            })
            .collect();
        let subscribers = Self {
            tasks,
            progress,
            stop,
        };
        let deadline = started + OPEN_TIMEOUT;
        loop {
            let opened = subscribers.progress.opened.load(Ordering::Relaxed);
            let failed = subscribers.progress.failed.load(Ordering::Relaxed);
            if failed > 0 {
                let first = subscribers
                    .finish()
                    .await
                    .into_iter()
                    .find_map(Result::err)
                    .unwrap_or_else(|| anyhow!("no error kept"));
                return Err(first.context(format!(
                    "{failed} of {count} subscriptions failed to open; the first"
                )));
            }
            if opened == count {
                return Ok((subscribers, started.elapsed()));
            }
            if Instant::now() > deadline {
                bail!(
                    "{opened} of {count} subscriptions opened within {OPEN_TIMEOUT:?} (the \
                     others got no answer: a limit on concurrent streams?)"
                );
            }
            tokio::time::sleep(CHECK_EVERY).await;
        }
    }

    /// Until every subscriber has received something or failed, at most `DELIVERY_TIMEOUT`.
    /// True when every one has received something.
    async fn wait_for_delivery(&self) -> bool {
        let count = self.tasks.len();
        let deadline = Instant::now() + DELIVERY_TIMEOUT;
        loop {
            let received = self.progress.received.load(Ordering::Relaxed);
            let failed = self.progress.failed.load(Ordering::Relaxed);
            if received == count {
                return true;
            }
            if received + failed >= count || Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(CHECK_EVERY).await;
        }
    }

    /// Stops every subscriber and returns what each received (or why it failed), in
    /// subscriber order.
    async fn finish(mut self) -> Vec<anyhow::Result<Vec<Arrival>>> {
        let _ = self.stop.send(true);
        let mut outcomes = Vec::with_capacity(self.tasks.len());
        for task in std::mem::take(&mut self.tasks) {
            outcomes.push(match task.await {
                Ok(outcome) => outcome,
                Err(panicked) => Err(anyhow!(panicked).context("subscriber task")),
            });
        }
        outcomes
    }
}

impl Drop for Subscribers {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// One live subscription: records every envelope with the time it arrived until `stop`.
async fn subscriber(
    mut client: ReadJournalClient<Channel>,
    request: pb::EventsByTagRequest,
    progress: Arc<Progress>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<Vec<Arrival>> {
    let opened = tokio::select! {
        opened = client.events_by_tag(request) => opened,
        _ = stop.wait_for(|stop| *stop) => return Ok(Vec::new()),
    };
    let mut stream = match opened {
        Ok(response) => response.into_inner(),
        Err(status) => {
            progress.failed.fetch_add(1, Ordering::Relaxed);
            return Err(anyhow!(status).context("opening EventsByTag"));
        }
    };
    progress.opened.fetch_add(1, Ordering::Relaxed);
    let mut arrivals = Vec::with_capacity(1);
    loop {
        tokio::select! {
            // An envelope already here is recorded before a stop is seen.
            biased;
            message = stream.message() => {
                let at = Instant::now();
                match message {
                    Ok(Some(envelope)) => {
                        if arrivals.is_empty() {
                            progress.received.fetch_add(1, Ordering::Relaxed);
                        }
                        arrivals.push(Arrival::new(at, envelope));
                    }
                    Ok(None) => {
                        progress.failed.fetch_add(1, Ordering::Relaxed);
                        bail!("EventsByTag ended, but a live query never ends");
                    }
                    Err(status) => {
                        progress.failed.fetch_add(1, Ordering::Relaxed);
                        return Err(anyhow!(status).context("EventsByTag failed"));
                    }
                }
            }
            _ = stop.wait_for(|stop| *stop) => return Ok(arrivals),
        }
    }
}

/// Event 1 of `pids[i]`, tagged `tags[i]`, for every `i`: unary `WriteEvents`,
/// `WRITES_IN_FLIGHT` at once. Returns when each write was acknowledged, in tag order.
async fn write_one_per_tag(
    channel: Channel,
    workload: &Workload,
    tags: &[String],
    pids: &[String],
) -> anyhow::Result<Vec<Instant>> {
    let client = JournalClient::new(channel);
    futures::stream::iter(tags.iter().zip(pids))
        .map(|(tag, pid)| {
            let mut client = client.clone();
            let request = pb::WriteEventsRequest {
                writes: vec![pb::AtomicWrite {
                    events: vec![workload.tagged_event(pid, 1, tag)],
                }],
                ..Default::default()
            };
            async move {
                service::write(&mut client, request)
                    .await
                    .with_context(|| format!("event 1 of {pid}"))?;
                anyhow::Ok(Instant::now())
            }
        })
        .buffered(WRITES_IN_FLIGHT)
        .try_collect()
        .await
}

/// Every subscriber must have received exactly its tag's event, once. Latency of a subscriber:
/// its event's arrival minus its write's acknowledgement, clamped at 0.
fn judge(
    tags: &[String],
    pids: &[String],
    acks: &[Instant],
    outcomes: Vec<anyhow::Result<Vec<Arrival>>>,
) -> Result<Delivery, String> {
    let count = outcomes.len();
    let mut latencies = Vec::with_capacity(count);
    let (mut missed, mut strays, mut repeated, mut failed, mut before_ack) = (0, 0, 0, 0, 0);
    let mut first_error = None;
    for (index, outcome) in outcomes.into_iter().enumerate() {
        let arrivals = match outcome {
            Ok(arrivals) => arrivals,
            Err(error) => {
                failed += 1;
                first_error.get_or_insert(error);
                continue;
            }
        };
        let tag_index = index % tags.len();
        let (tag, pid, ack) = (&tags[tag_index], &pids[tag_index], acks[tag_index]);
        let own = |arrival: &&Arrival| {
            arrival.persistence_id == *pid
                && arrival.sequence_nr == 1
                && arrival.tags.iter().any(|arrival_tag| arrival_tag == tag)
        };
        let copies = arrivals.iter().filter(own).count();
        if copies < arrivals.len() {
            strays += 1;
        }
        if copies > 1 {
            repeated += 1;
        }
        match arrivals.iter().find(own) {
            Some(arrival) => {
                if arrival.at < ack {
                    before_ack += 1;
                }
                latencies.push(arrival.at.saturating_duration_since(ack));
            }
            None => missed += 1,
        }
    }
    let max = latencies.iter().max().copied().unwrap_or_default();
    if missed + strays + repeated + failed > 0 {
        let mut why = format!(
            "{missed} of {count} subscribers did not get their event within \
             {DELIVERY_TIMEOUT:?}, {strays} got another event, {repeated} got theirs more than \
             once, {failed} failed"
        );
        if !latencies.is_empty() {
            let _ = write!(
                why,
                " (the {} that got theirs: max {:.3} s)",
                latencies.len(),
                max.as_secs_f64()
            );
        }
        if let Some(error) = first_error {
            let _ = write!(why, "; the first failure: {error:#}");
        }
        return Err(why);
    }
    Ok(Delivery {
        max,
        p99: percentile(&mut latencies, 0.99),
        before_ack,
    })
}

/// Waits until the server's CPU over `SETTLE_WINDOW` is under `SETTLED_CPU_PERCENT`, at most
/// `SETTLE_TIMEOUT`. Returns how long it took to the start of that quiet window, `None` if it
/// never came.
async fn settle(pid: u32) -> anyhow::Result<Option<Duration>> {
    let started = Instant::now();
    loop {
        let window_start = started.elapsed();
        if cpu_percent(pid, SETTLE_WINDOW).await? < SETTLED_CPU_PERCENT {
            return Ok(Some(window_start));
        }
        if started.elapsed() >= SETTLE_TIMEOUT {
            return Ok(None);
        }
    }
}

/// The CPU process `pid` used over the next `window`, in % of one core.
async fn cpu_percent(pid: u32, window: Duration) -> anyhow::Result<f64> {
    let before = cpu_ticks(pid).await?;
    let started = Instant::now();
    tokio::time::sleep(window).await;
    Ok(percent_of_core(
        before,
        cpu_ticks(pid).await?,
        started.elapsed(),
    ))
}

/// A memory figure of `/proc/<pid>/status` (`VmRSS`, `VmHWM`: kB there) in MB (10^6 bytes).
async fn memory_mb(pid: u32, field: &str) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/status");
    let status = tokio::fs::read_to_string(&path)
        .await
        .with_context(|| format!("reading {path}"))?;
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("{path}: no {field}"))?;
    Ok(kib * 1024.0 / 1e6)
}

impl ReadResults {
    /// The bound on delivery in `mode`, and how the target column says it.
    fn delivery_target(&self, mode: Mode) -> (Duration, String) {
        // The default horizon is the servers' watermarks: an event is due within a poll
        // interval and 100 ms, at the p99.
        let polling = self.poll_interval + Duration::from_millis(100);
        match mode {
            Mode::Polling if polling < DELIVERY_LIMIT => (
                polling,
                format!(
                    "p99 <= {} s (poll {} s + 100 ms)",
                    seconds(polling),
                    seconds(self.poll_interval)
                ),
            ),
            _ => (DELIVERY_LIMIT, format!("<= {} s", seconds(DELIVERY_LIMIT))),
        }
    }

    /// Four rows per (scenario, mode): delivery, idle CPU, memory, and opening and settling.
    pub fn rows(&self) -> Vec<Row> {
        let mut rows = Vec::new();
        for series in &self.series {
            let scenario = series.label();
            let (delivery_bound, delivery_target) = self.delivery_target(series.mode);
            let (cpu_bound, cpu_target) = match series.scenario {
                Scenario::R1k => (Some(5.0), "<= 5% of a core"),
                _ => (None, "—"),
            };
            let (rss_bound, rss_target) = match series.scenario {
                Scenario::R1k => (300.0, "<= 300 MB (peak)"),
                _ => (500.0, "<= 500 MB (peak)"),
            };
            let delivery_metric = "delivery s, max (p99)";
            let cpu_metric = "idle server CPU, % of one core";
            let rss_metric = "server RSS MB: before → after subscribing → peak";
            let setup_metric = "s to open all subscriptions, then to settle (CPU < 10%)";
            let row = |metric: &str, service: String, target: &str, met: Met| Row {
                scenario: scenario.clone(),
                metric: metric.to_owned(),
                service,
                raw: "n/a (service only)".to_owned(),
                ratio: "—".to_owned(),
                target: target.to_owned(),
                met,
            };
            if series.error.is_some() || series.rounds.is_empty() {
                let why = if series.error.is_some() {
                    "FAILED (see below)"
                } else {
                    "no rounds"
                };
                rows.push(Row::not_measured(
                    &scenario,
                    delivery_metric,
                    why,
                    &delivery_target,
                ));
                if cpu_bound.is_some() {
                    rows.push(Row::not_measured(&scenario, cpu_metric, why, cpu_target));
                }
                rows.push(Row::not_measured(&scenario, rss_metric, why, rss_target));
                continue;
            }
            let rounds = &series.rounds;
            let of = |get: fn(&Round) -> f64| -> f64 {
                median(&rounds.iter().map(get).collect::<Vec<_>>()).unwrap_or(f64::NAN)
            };

            let failed = rounds
                .iter()
                .filter(|round| round.delivery.is_err())
                .count();
            rows.push(if failed > 0 {
                row(
                    delivery_metric,
                    format!(
                        "FAILED in {failed} of {} round(s) (see below)",
                        rounds.len()
                    ),
                    &delivery_target,
                    Met::No,
                )
            } else {
                let delivered = |get: fn(&Delivery) -> Duration| -> f64 {
                    let values: Vec<f64> = rounds
                        .iter()
                        .filter_map(|round| round.delivery.as_ref().ok())
                        .map(|delivery| get(delivery).as_secs_f64())
                        .collect();
                    median(&values).unwrap_or(f64::NAN)
                };
                let max = delivered(|delivery| delivery.max);
                let p99 = delivered(|delivery| delivery.p99);
                // Polling's target is on the p99 (issue 15); change streams' on the maximum.
                let judged = match series.mode {
                    Mode::Polling => p99,
                    Mode::ChangeStreams => max,
                };
                row(
                    delivery_metric,
                    format!("{max:.3} ({p99:.3})"),
                    &delivery_target,
                    Met::from(judged <= delivery_bound.as_secs_f64()),
                )
            });

            let cpu = of(|round| round.idle_cpu_percent);
            rows.push(row(
                cpu_metric,
                format!("{cpu:.1}"),
                cpu_target,
                cpu_bound.map_or(Met::NoTarget, |bound| Met::from(cpu <= bound)),
            ));

            let peak = of(|round| round.peak_rss_mb);
            rows.push(row(
                rss_metric,
                format!(
                    "{:.0} → {:.0} → {peak:.0}",
                    of(|round| round.rss_before_mb),
                    of(|round| round.rss_after_mb)
                ),
                rss_target,
                Met::from(peak <= rss_bound),
            ));

            let unsettled = rounds.iter().filter(|round| round.settle.is_none()).count();
            let settle = of(|round| round.settle.unwrap_or(SETTLE_TIMEOUT).as_secs_f64());
            rows.push(row(
                setup_metric,
                format!(
                    "{:.1}, {settle:.1}{}",
                    of(|round| round.open.as_secs_f64()),
                    if unsettled > 0 {
                        format!(" (not settled within {SETTLE_TIMEOUT:?} in {unsettled} round(s))")
                    } else {
                        String::new()
                    }
                ),
                "—",
                Met::NoTarget,
            ));
        }
        rows
    }

    /// What the table cannot say: how the read scenarios ran, early arrivals, failures.
    pub fn notes(&self) -> String {
        let mut out = String::new();
        if self.series.is_empty() {
            return out;
        }
        let _ = writeln!(
            out,
            "Read scenarios (R1k: 1,000 live EventsByTag subscribers, one tag each; R10k: 10,000 \
             on 100 tags): medians over {} round(s) (--read-rounds). Each (scenario, mode) runs \
             on a fresh server per round with default settings (change streams: \
             {CHANGE_STREAMS_ENV}=true; polling: allowed-time-drift {} s, poll-interval {} s), on \
             fresh empty tags, from offset \"\", {SUBSCRIPTIONS_PER_CONNECTION} subscriptions per \
             HTTP/2 connection. After the subscriptions open, the server settles (CPU under \
             {SETTLED_CPU_PERCENT}% of a core over {} s, at most {} s), then its idle CPU is \
             measured over {} s with nothing written (/proc/<pid>/stat). Delivery: event 1 of a \
             fresh persistence id per tag (unary WriteEvents, {WRITES_IN_FLIGHT} in flight); a \
             subscriber's latency is its event's arrival minus that write's acknowledgement, \
             clamped at 0; every subscriber must get its own event exactly once within {} s and \
             nothing else ({} s more are watched). RSS: VmRSS before subscribing and after the \
             idle window, VmHWM (peak) at the end; MB = 10^6 bytes.",
            self.rounds,
            seconds(self.allowed_time_drift),
            seconds(self.poll_interval),
            seconds(SETTLE_WINDOW),
            seconds(SETTLE_TIMEOUT),
            seconds(IDLE_WINDOW),
            seconds(DELIVERY_TIMEOUT),
            seconds(AFTER_DELIVERY),
        );
        for series in &self.series {
            let early: Vec<String> = series
                .rounds
                .iter()
                .filter_map(|round| round.delivery.as_ref().ok())
                .filter(|delivery| delivery.before_ack > 0)
                .map(|delivery| number(delivery.before_ack as f64))
                .collect();
            if !early.is_empty() {
                let _ = writeln!(
                    out,
                    "{}: events that arrived before their write's acknowledgement (latency 0), \
                     per round: {} of {}.",
                    series.label(),
                    early.join(", "),
                    number(shape(series.scenario).subscribers as f64)
                );
            }
            for round in &series.rounds {
                if let Err(why) = &round.delivery {
                    let _ = writeln!(
                        out,
                        "{} round {} delivery FAILED: {why}",
                        series.label(),
                        round.round
                    );
                }
            }
            if let Some(error) = &series.error {
                let _ = writeln!(out, "{} FAILED: {error}", series.label());
            }
        }
        out
    }
}

/// A whole or fractional number of seconds, as short as it goes (`2`, `0.5`).
fn seconds(duration: Duration) -> String {
    let seconds = duration.as_secs_f64();
    if seconds.fract() == 0.0 {
        format!("{seconds:.0}")
    } else {
        format!("{seconds}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arrival(at: Instant, pid: &str, tag: &str) -> Arrival {
        Arrival {
            at,
            persistence_id: pid.to_owned(),
            sequence_nr: 1,
            tags: vec![tag.to_owned()],
        }
    }

    #[test]
    fn delivery_is_latency_from_the_ack_clamped_at_zero() {
        let tags = ["a".to_owned(), "b".to_owned()];
        let pids = ["pa".to_owned(), "pb".to_owned()];
        let ack = Instant::now();
        let acks = [ack, ack];
        // Subscribers 0 and 2 follow tag a, 1 and 3 tag b.
        let outcomes = vec![
            Ok(vec![arrival(ack + Duration::from_millis(300), "pa", "a")]),
            Ok(vec![arrival(ack, "pb", "b")]),
            Ok(vec![arrival(ack + Duration::from_millis(100), "pa", "a")]),
            Ok(vec![arrival(ack - Duration::from_millis(5), "pb", "b")]),
        ];
        let delivery = judge(&tags, &pids, &acks, outcomes).expect("all delivered");
        assert_eq!(delivery.max, Duration::from_millis(300));
        assert_eq!(delivery.before_ack, 1);
    }

    #[test]
    fn missed_stray_and_repeated_events_fail_delivery() {
        let tags = ["a".to_owned(), "b".to_owned()];
        let pids = ["pa".to_owned(), "pb".to_owned()];
        let ack = Instant::now();
        let acks = [ack, ack];
        let judged = |outcomes| judge(&tags, &pids, &acks, outcomes);
        let missed = judged(vec![Ok(vec![arrival(ack, "pa", "a")]), Ok(Vec::new())]);
        assert!(missed.is_err_and(|why| why.starts_with("1 of 2 subscribers did not get")));
        let stray = judged(vec![
            Ok(vec![arrival(ack, "pa", "a"), arrival(ack, "pb", "b")]),
            Ok(vec![arrival(ack, "pb", "b")]),
        ]);
        assert!(stray.is_err_and(|why| why.contains("1 got another event")));
        let repeated = judged(vec![
            Ok(vec![arrival(ack, "pa", "a"), arrival(ack, "pa", "a")]),
            Ok(vec![arrival(ack, "pb", "b")]),
        ]);
        assert!(repeated.is_err_and(|why| why.contains("1 got theirs more than once")));
        let failed = judged(vec![
            Ok(vec![arrival(ack, "pa", "a")]),
            Err(anyhow!("stream reset")),
        ]);
        assert!(failed.is_err_and(|why| why.contains("1 failed") && why.contains("stream reset")));
    }
}
