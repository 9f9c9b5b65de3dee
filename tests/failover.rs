//! Replica-set failover under load: a three-member set (`common::replica_set`), two eventjournal
//! servers writing to it (one following live queries by polling, one by change streams), and
//! each fault production sees: a step-down, kill -9 of the primary, a secondary lost, the
//! majority lost. After each, every acknowledged event is stored exactly once, no atomic write
//! is half stored, live subscribers of both modes got every event in per-pid order, a current
//! query returns them all, and neither server was restarted. Writes whose outcome was unknown
//! (`UNAVAILABLE`) are retried with the same content and answered `Written`. A last test shows
//! that a write MongoDB rolls back is never delivered.
//!
//! The tests take turns (one replica set at a time): elections need the CPU on time.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::read::{ResumingSubscriber, assert_in_sequence_order, current_ids_once, tagged};
use common::replica_set::ReplicaSet;
use common::*;
use futures::TryStreamExt;
use mongodb::bson::{Document, doc};
use proto::v1 as pb;
use proto::v1::journal_client::JournalClient;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const TAG: &str = "failover";
const ELECTIONS: &str = "eventjournal_mongodb_elections_total";
const WRITABLE_PRIMARY: &str = "eventjournal_mongodb_writable_primary";
const WRITERS_PER_SERVER: usize = 3;
/// The servers' bounds on a call's wait (see `settings`). A write in flight when the primary
/// goes waits for its write concern (`WRITE_CONCERN_TIMEOUT`) at most; each retry then waits for
/// a primary (`SERVER_SELECTION_TIMEOUT`) at most, after `RETRY_DELAY`; a write queued behind a
/// batch in flight waits for that batch too, which the third attempt's allowance covers. A
/// batch MongoDB acknowledged after the server's watermark lease lapsed (around the majority's
/// loss or return) is moved forward in read-journal order first, under a holding lease: that
/// waits for the lease once per round of the batch (usually one), `WATERMARK_LEASE` and four
/// `WATERMARK_INTERVAL`s at most. The README's faults section gives the same bound.
const WRITE_CONCERN_TIMEOUT: Duration = Duration::from_secs(4);
const SERVER_SELECTION_TIMEOUT: Duration = Duration::from_secs(3);
const RETRY_DELAY: Duration = Duration::from_millis(100);
const MAX_ATTEMPTS: u32 = 3;
const WATERMARK_LEASE: Duration = Duration::from_secs(5);
const WATERMARK_INTERVAL: Duration = Duration::from_millis(50);
/// What a failing call may take at most: the bound above plus 2 s of scheduling slack.
const CALL_BOUND: Duration = Duration::from_millis(
    WRITE_CONCERN_TIMEOUT.as_millis() as u64
        + MAX_ATTEMPTS as u64
            * (SERVER_SELECTION_TIMEOUT.as_millis() as u64 + RETRY_DELAY.as_millis() as u64)
        + WATERMARK_LEASE.as_millis() as u64
        + 4 * WATERMARK_INTERVAL.as_millis() as u64
        + 2_000,
);

static ONE_SET_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Server settings for the set at `uri`: short bounds, fast read journal, `change_streams` or
/// polling.
fn settings(settings: &mut config::Settings, uri: &str, change_streams: bool) {
    if change_streams {
        common::read::change_streams(settings);
    } else {
        common::read::fast(settings);
    }
    settings.mongodb.uri = uri.to_owned();
    settings.mongodb.server_selection_timeout = SERVER_SELECTION_TIMEOUT;
    settings.mongodb.connect_timeout = Duration::from_secs(2);
    settings.mongodb.write_concern.timeout = Some(WRITE_CONCERN_TIMEOUT);
    settings.mongodb.retry.delay = RETRY_DELAY;
    settings.mongodb.retry.max_attempts = MAX_ATTEMPTS;
    settings.read_journal.watermark_lease = WATERMARK_LEASE;
    settings.read_journal.watermark_interval = WATERMARK_INTERVAL;
    settings.server.health_check_interval = Duration::from_millis(200);
}

/// One atomic write a writer was told about.
#[derive(Debug, Clone)]
struct Acked {
    pid: String,
    first: i64,
    events: i64,
    /// Earlier attempts of this very write failed (its outcome was unknown), and a retry with
    /// the same content was answered `Written`.
    after_unknown: bool,
}

#[derive(Default)]
struct Record {
    acked: Vec<Acked>,
    /// Failed calls: status code, how long the call took, and which server took it.
    failures: Vec<(Code, Duration, usize)>,
    /// The longest a successful call took.
    slowest_written: Duration,
}

/// A live subscriber on one of the servers, and which live mode that server runs.
struct Subscriber {
    mode: &'static str,
    stream: ResumingSubscriber,
}

/// Two servers on one replica set, writers on both, one live subscriber on each.
struct Load {
    set: ReplicaSet,
    servers: Vec<TestServer>,
    channels: Vec<Channel>,
    record: Arc<Mutex<Record>>,
    stop_writing: CancellationToken,
    stop_reading: CancellationToken,
    writers: Vec<tokio::task::JoinHandle<()>>,
    subscribers: Vec<Subscriber>,
    metrics_port: u16,
}

impl Load {
    async fn start(name: &str) -> Self {
        let set = ReplicaSet::start(name, 3).await;
        let uri = set.uri();
        let metrics_port = free_port();
        let polling = TestServer::start_with(name, |s| {
            settings(s, &uri, false);
            s.server.metrics_listen = Some(([127, 0, 0, 1], metrics_port).into());
        })
        .await;
        let mut second = polling.settings.clone();
        settings(&mut second, &uri, true);
        second.server.metrics_listen = None;
        let change_streams = TestServer::start_on_database(second).await;
        let servers = vec![polling, change_streams];
        let mut channels = Vec::new();
        for server in &servers {
            channels.push(server.channel().await);
        }
        let stop_reading = CancellationToken::new();
        let subscribers = channels
            .iter()
            .zip(["polling", "change streams"])
            .map(|(channel, mode)| subscribe(channel.clone(), mode, TAG, stop_reading.clone()))
            .collect();
        let record = Arc::new(Mutex::new(Record::default()));
        let stop_writing = CancellationToken::new();
        let mut writers = Vec::new();
        for (server, channel) in channels.iter().enumerate() {
            for writer in 0..WRITERS_PER_SERVER {
                writers.push(write(
                    JournalClient::new(channel.clone()),
                    server,
                    format!("s{server}-w{writer}"),
                    record.clone(),
                    stop_writing.clone(),
                ));
            }
        }
        let load = Self {
            set,
            servers,
            channels,
            record,
            stop_writing,
            stop_reading,
            writers,
            subscribers,
            metrics_port,
        };
        load.progress("writes before the fault").await;
        load
    }

    fn acked(&self, server: usize) -> usize {
        self.record
            .lock()
            .unwrap()
            .acked
            .iter()
            .filter(|write| write.pid.starts_with(&format!("s{server}-")))
            .count()
    }

    /// Waits until writers on both servers got 20 more writes acknowledged: both servers
    /// work, without a restart.
    async fn progress(&self, what: &str) {
        let before = [self.acked(0), self.acked(1)];
        wait_until(what, Duration::from_secs(60), || async {
            (0..2).all(|server| self.acked(server) >= before[server] + 20)
        })
        .await;
    }

    async fn health(&self, server: usize) -> ServingStatus {
        let response = HealthClient::new(self.channels[server].clone())
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("health answers");
        ServingStatus::try_from(response.into_inner().status).unwrap()
    }

    async fn metrics(&self) -> String {
        fetch_metrics(self.metrics_port).await
    }

    /// A sample of the metrics (the registry is the process's: both servers count in it).
    async fn metric(&self, sample: &str) -> f64 {
        metric(&self.metrics().await, sample).unwrap_or(0.0)
    }

    /// Stops the writers (each finishes the write it is on) and checks everything.
    async fn finish(self) -> Record {
        let metrics = self.metrics().await;
        eprintln!(
            "metrics: elections {:?}, change-stream restarts {:?}, retries by code {:?}",
            metric(&metrics, ELECTIONS),
            metric(
                &metrics,
                "eventjournal_read_journal_change_stream_restarts_total"
            ),
            retries_by_code(&metrics)
        );
        self.stop_writing.cancel();
        for writer in self.writers {
            writer.await.unwrap();
        }
        let record = std::mem::take(&mut *self.record.lock().unwrap());
        for (code, took, server) in &record.failures {
            assert_eq!(
                *code,
                Code::Unavailable,
                "server {server}: a call failed with {code:?}, not UNAVAILABLE"
            );
            assert!(
                *took < CALL_BOUND,
                "server {server}: a failing call took {took:?}"
            );
        }

        // Stored: every acknowledged event exactly once, nothing else.
        let journal = mongodb::Client::with_uri_str(self.set.uri())
            .await
            .unwrap()
            .database(&self.servers[0].database)
            .collection::<Document>("journal");
        let mut stored: BTreeMap<(String, i64), i64> = BTreeMap::new();
        let mut documents = journal.find(doc! {}).await.unwrap();
        let mut count = 0;
        while let Some(document) = documents.try_next().await.unwrap() {
            count += 1;
            let event = (
                document.get_str("pid").unwrap().to_owned(),
                document.get_i64("seqNr").unwrap(),
            );
            let written_at = document.get_datetime("writtenAt").unwrap();
            stored.insert(event, written_at.timestamp_millis());
        }
        assert_eq!(count, stored.len(), "an event is stored twice");
        let acked: BTreeSet<(String, i64)> = record
            .acked
            .iter()
            .flat_map(|write| {
                (write.first..write.first + write.events).map(|nr| (write.pid.clone(), nr))
            })
            .collect();
        let acked_events: i64 = record.acked.iter().map(|write| write.events).sum();
        assert_eq!(
            acked.len() as i64,
            acked_events,
            "a sequence number acknowledged twice"
        );
        let stored_keys: BTreeSet<(String, i64)> = stored.keys().cloned().collect();
        let missing: Vec<_> = acked.difference(&stored_keys).collect();
        let extra: Vec<_> = stored_keys.difference(&acked).collect();
        assert!(
            missing.is_empty(),
            "acknowledged but not stored: {missing:?}"
        );
        // Writers finish every write they start, so a stored event that was never acknowledged
        // would be half of an atomic write or a ghost.
        assert!(extra.is_empty(), "stored but never acknowledged: {extra:?}");

        // Live subscribers: every event, per pid in sequence order; change streams exactly
        // once, polling at most again at a later position after a late write was re-stamped.
        let subscribers = self.subscribers;
        for subscriber in &subscribers {
            wait_until(
                &format!("the {} subscriber catches up", subscriber.mode),
                Duration::from_secs(60),
                || async {
                    let received = subscriber.stream.received.lock().unwrap();
                    let distinct: BTreeSet<(&str, i64)> = received
                        .iter()
                        .map(|(pid, nr, _)| (pid.as_str(), *nr))
                        .collect();
                    distinct.len() >= stored.len()
                },
            )
            .await;
        }
        self.stop_reading.cancel();
        for subscriber in subscribers {
            subscriber.stream.task.await.unwrap();
            let received = subscriber.stream.received.lock().unwrap().clone();
            check_deliveries(subscriber.mode, &received, &stored);
            eprintln!(
                "{}: {} deliveries of {} events, {} reconnects",
                subscriber.mode,
                received.len(),
                stored.len(),
                subscriber.stream.reconnects.lock().unwrap()
            );
        }

        // A current query afterwards, on each server: everything, once, in per-pid order.
        for (server, channel) in self.channels.iter().enumerate() {
            let current = current_ids_once(channel, TAG, stored.len()).await;
            assert_eq!(
                current.iter().cloned().collect::<BTreeSet<_>>(),
                stored_keys,
                "server {server}: CurrentEventsByTag"
            );
            assert_eq!(current.len(), stored.len(), "server {server}: duplicates");
            assert_in_sequence_order(&current);
        }
        let unknown = record.acked.iter().filter(|w| w.after_unknown).count();
        let slowest = record.failures.iter().map(|(_, took, _)| *took).max();
        eprintln!(
            "slowest failing call: {slowest:?}, slowest written: {:?}",
            record.slowest_written
        );
        eprintln!(
            "{} writes acknowledged ({acked_events} events), {} failed calls, {unknown} writes \
             retried after an unknown outcome and answered Written",
            record.acked.len(),
            record.failures.len()
        );
        for server in self.servers {
            server.stop().await.unwrap();
        }
        record
    }
}

/// Every stored event delivered, in per-pid sequence order; a repeat only at a later position
/// and only in polling mode, ending where the event is stored now.
fn check_deliveries(
    mode: &str,
    received: &[(String, i64, i64)],
    stored: &BTreeMap<(String, i64), i64>,
) {
    let mut deliveries: HashMap<(String, i64), Vec<i64>> = HashMap::new();
    let mut first_deliveries = Vec::new();
    for (pid, nr, written_at) in received {
        let positions = deliveries.entry((pid.clone(), *nr)).or_default();
        if positions.is_empty() {
            first_deliveries.push((pid.clone(), *nr));
        }
        positions.push(*written_at);
    }
    let distinct: BTreeSet<&(String, i64)> = deliveries.keys().collect();
    assert_eq!(
        distinct,
        stored.keys().collect::<BTreeSet<_>>(),
        "{mode}: delivered events differ from the stored ones"
    );
    assert_in_sequence_order(&first_deliveries);
    for (event, positions) in &deliveries {
        if mode == "change streams" {
            assert_eq!(positions.len(), 1, "{mode}: {event:?} delivered twice");
            continue;
        }
        assert!(
            positions.windows(2).all(|pair| pair[0] < pair[1]),
            "{mode}: {event:?} delivered twice at one position: {positions:?}"
        );
        assert_eq!(
            positions.last(),
            stored.get(event),
            "{mode}: {event:?} last delivered at {positions:?}, not where it is stored"
        );
    }
}

/// Writes atomic writes of 1 to 3 tagged events for `pid` until `stop`, finishing the write it
/// is on. A failed call is retried with the very same events until it is answered.
fn write(
    mut client: JournalClient<Channel>,
    server: usize,
    pid: String,
    record: Arc<Mutex<Record>>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut next = 1;
        let mut size = 0;
        while !stop.is_cancelled() {
            size = size % 3 + 1;
            let events: Vec<_> = (next..next + size)
                .map(|nr| tagged(&pid, nr, &[TAG]))
                .collect();
            let mut after_unknown = false;
            loop {
                let started = Instant::now();
                let call = client.write_events(pb::WriteEventsRequest {
                    writes: vec![atomic(events.clone())],
                    ..Default::default()
                });
                let outcome = tokio::time::timeout(CALL_BOUND * 2, call)
                    .await
                    .unwrap_or_else(|_| panic!("{pid} {next}: a write hung"));
                match outcome {
                    Ok(response) => {
                        let outcome = response.into_inner().results[0].outcome.clone();
                        assert!(
                            is_written(outcome.as_ref().unwrap()),
                            "{pid} {next} (retried after an unknown outcome: {after_unknown}): \
                             {outcome:?}"
                        );
                        let mut record = record.lock().unwrap();
                        record.slowest_written = record.slowest_written.max(started.elapsed());
                        record.acked.push(Acked {
                            pid: pid.clone(),
                            first: next,
                            events: size,
                            after_unknown,
                        });
                        break;
                    }
                    Err(status) => {
                        record.lock().unwrap().failures.push((
                            status.code(),
                            started.elapsed(),
                            server,
                        ));
                        after_unknown = true;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
            next += size;
        }
    })
}

fn subscribe(
    channel: Channel,
    mode: &'static str,
    tag: &'static str,
    stop: CancellationToken,
) -> Subscriber {
    Subscriber {
        mode,
        stream: ResumingSubscriber::start(channel, tag, stop),
    }
}

/// `eventjournal_mongodb_retries_total` summed over operations, by error code.
fn retries_by_code(metrics: &str) -> BTreeMap<String, f64> {
    let mut codes = BTreeMap::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("eventjournal_mongodb_retries_total{") else {
            continue;
        };
        let code = rest
            .split("code=\"")
            .nth(1)
            .and_then(|tail| tail.split('"').next())
            .unwrap()
            .to_owned();
        let value: f64 = rest.rsplit(' ').next().unwrap().parse().unwrap();
        *codes.entry(code).or_default() += value;
    }
    codes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_step_down_under_load_loses_nothing_and_shows_the_election_in_the_metrics() {
    let _turn = ONE_SET_AT_A_TIME.lock().await;
    let load = Load::start("stepdown").await;
    let elections = load.metric(ELECTIONS).await;
    let primary = load.set.primary().await;
    load.set.step_down(primary, 30).await;
    let new_primary = load.set.primary().await;
    assert_ne!(new_primary, primary, "a new primary was elected");
    load.progress("writes on the new primary").await;
    wait_until(
        "the election in the metrics",
        Duration::from_secs(10),
        || async {
            // Each of the two servers' clients sees it.
            load.metric(ELECTIONS).await >= elections + 2.0
        },
    )
    .await;
    load.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_the_primary_under_load_loses_nothing_and_it_rejoins_as_a_secondary() {
    let _turn = ONE_SET_AT_A_TIME.lock().await;
    let mut load = Load::start("killprimary").await;
    let elections = load.metric(ELECTIONS).await;
    let primary = load.set.primary().await;
    load.set.kill_9(primary);
    let new_primary = load.set.primary().await;
    assert_ne!(new_primary, primary);
    load.progress("writes on the new primary").await;
    wait_until(
        "the election in the metrics",
        Duration::from_secs(10),
        || async { load.metric(ELECTIONS).await >= elections + 2.0 },
    )
    .await;
    load.set.restart(primary);
    load.set.wait_until_member(primary).await;
    load.progress("writes with the old primary back").await;
    load.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_secondary_lost_under_load_changes_nothing_for_clients() {
    let _turn = ONE_SET_AT_A_TIME.lock().await;
    let mut load = Load::start("killsecondary").await;
    let primary = load.set.primary().await;
    let secondary = load.set.a_secondary().await;
    load.set.kill_9(secondary);
    load.progress("writes on two members").await;
    load.progress("more writes on two members").await;
    assert_eq!(load.set.primary().await, primary, "no election was needed");
    let failures = load.record.lock().unwrap().failures.len();
    assert_eq!(failures, 0, "no call failed with a majority still up");
    load.set.restart(secondary);
    load.set.wait_until_member(secondary).await;
    load.progress("writes with three members again").await;
    load.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_a_majority_writes_fail_promptly_health_says_so_and_all_resumes() {
    let _turn = ONE_SET_AT_A_TIME.lock().await;
    let mut load = Load::start("nomajority").await;
    let primary = load.set.primary().await;
    let secondary = load.set.a_secondary().await;
    let third = (0..3).find(|m| *m != primary && *m != secondary).unwrap();
    assert_eq!(load.metric(WRITABLE_PRIMARY).await, 1.0);
    let retries = retries_by_code(&load.metrics().await);
    load.set.kill_9(secondary);
    load.set.kill_9(third);
    wait_until(
        "health NOT_SERVING on both servers",
        Duration::from_secs(30),
        || async {
            load.health(0).await == ServingStatus::NotServing
                && load.health(1).await == ServingStatus::NotServing
        },
    )
    .await;
    wait_until(
        "the metrics say there is no primary",
        Duration::from_secs(10),
        || async { load.metric(WRITABLE_PRIMARY).await == 0.0 },
    )
    .await;
    // Calls keep failing, each within the bound (checked in `finish`), for a while.
    let failures = load.record.lock().unwrap().failures.len();
    wait_until(
        "calls failing with UNAVAILABLE",
        Duration::from_secs(30),
        || async {
            load.record.lock().unwrap().failures.len() >= failures + 2 * WRITERS_PER_SERVER
        },
    )
    .await;
    load.set.restart(secondary);
    load.set.primary().await;
    wait_until("health SERVING again", Duration::from_secs(30), || async {
        load.health(0).await == ServingStatus::Serving
            && load.health(1).await == ServingStatus::Serving
    })
    .await;
    load.progress("writes with a majority again").await;
    assert_eq!(load.metric(WRITABLE_PRIMARY).await, 1.0);
    // Writes in flight when the majority went were interrupted and retried.
    let after = retries_by_code(&load.metrics().await);
    eprintln!("retries by code before {retries:?} after {after:?}");
    assert!(
        after
            .iter()
            .any(|(code, count)| retries.get(code).copied().unwrap_or(0.0) < *count),
        "the lost majority shows as retries by error code: {after:?}"
    );
    load.set.restart(third);
    load.set.wait_until_member(third).await;
    let record = load.finish().await;
    assert!(
        record
            .failures
            .iter()
            .any(|(code, _, _)| *code == Code::Unavailable),
        "writes failed while there was no majority"
    );
    assert!(
        record.acked.iter().any(|write| write.after_unknown),
        "writes answered UNAVAILABLE were retried and answered Written"
    );
}

/// Writes `events` through `client` until it is answered (retrying `UNAVAILABLE` with the same
/// content), and checks the answer is `Written`.
async fn write_until_answered(
    client: &mut JournalClient<Channel>,
    events: Vec<pb::PersistentEvent>,
) {
    for _ in 0..60 {
        let request = pb::WriteEventsRequest {
            writes: vec![atomic(events.clone())],
            ..Default::default()
        };
        match client.write_events(request).await {
            Ok(response) => {
                let outcome = response.into_inner().results[0].outcome.clone().unwrap();
                assert!(is_written(&outcome), "{outcome:?}");
                return;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
    panic!("a write was not answered within a minute");
}

fn delivered(subscriber: &Subscriber, pid: &str) -> Vec<i64> {
    subscriber
        .stream
        .received
        .lock()
        .unwrap()
        .iter()
        .filter(|(received, _, _)| received == pid)
        .map(|(_, nr, _)| *nr)
        .collect()
}

/// The primary is cut off from replication (the secondaries' `stopReplProducer` fail point), a
/// write reaches it alone and is never acknowledged, the primary is killed, the others elect a
/// new one, and the old primary rejoins and rolls the write back. Majority reads (the default
/// `mongodb.read-concern`) and change streams never deliver it; a server reading with `local`
/// (and a fixed drift) does, which shows what the test guards against. The client's retry of that write then
/// stores it for real, and it is delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_rolled_back_on_an_isolated_primary_is_never_delivered() {
    const ROLLBACK_TAG: &str = "rollback";
    let _turn = ONE_SET_AT_A_TIME.lock().await;
    let mut set = ReplicaSet::start("rollback", 3).await;
    let uri = set.uri();
    let polling = TestServer::start_with("rollback", |s| settings(s, &uri, false)).await;
    let mut change_streams = polling.settings.clone();
    settings(&mut change_streams, &uri, true);
    let change_streams = TestServer::start_on_database(change_streams).await;
    let mut local = polling.settings.clone();
    local.mongodb.read_concern = "local".into();
    // With watermarks the writing server holds every horizon below its unacknowledged write, so
    // even a `local` reader waits; the fixed drift shows what majority reads guard against.
    local.read_journal.horizon = Some(config::HorizonMode::FixedDrift);
    let local = TestServer::start_on_database(local).await;
    // Writes the doomed event and does not retry it: its one attempt reaches the isolated
    // primary only.
    let mut no_retry = polling.settings.clone();
    no_retry.mongodb.retry.max_attempts = 1;
    let no_retry = TestServer::start_on_database(no_retry).await;

    let stop = CancellationToken::new();
    let subscribers = [
        subscribe(
            polling.channel().await,
            "polling",
            ROLLBACK_TAG,
            stop.clone(),
        ),
        subscribe(
            change_streams.channel().await,
            "change streams",
            ROLLBACK_TAG,
            stop.clone(),
        ),
        subscribe(
            local.channel().await,
            "polling, read concern local",
            ROLLBACK_TAG,
            stop.clone(),
        ),
    ];
    let mut client = polling.journal().await;
    write_until_answered(&mut client, vec![tagged("kept", 1, &[ROLLBACK_TAG])]).await;
    for subscriber in &subscribers {
        wait_until("kept 1 delivered", Duration::from_secs(30), || async {
            delivered(subscriber, "kept") == [1]
        })
        .await;
    }

    let primary = set.primary().await;
    let secondaries: Vec<usize> = (0..3).filter(|member| *member != primary).collect();
    for secondary in &secondaries {
        set.stop_replication(*secondary).await;
    }
    let doomed = tagged("doomed", 1, &[ROLLBACK_TAG]);
    let doomed_call = {
        let mut client = no_retry.journal().await;
        let doomed = doomed.clone();
        tokio::spawn(async move {
            client
                .write_events(pb::WriteEventsRequest {
                    writes: vec![atomic(vec![doomed])],
                    ..Default::default()
                })
                .await
        })
    };
    // The write is on the primary (a local read there sees it), and nowhere else.
    let on_primary = set
        .direct(primary)
        .await
        .database(&polling.database)
        .collection::<Document>("journal");
    wait_until(
        "the doomed write on the primary",
        Duration::from_secs(10),
        || async {
            on_primary
                .find_one(doc! { "pid": "doomed" })
                .await
                .unwrap()
                .is_some()
        },
    )
    .await;
    // Long enough for any poller to pass it (drift 500 ms, polls every 50 ms): the server
    // reading with `local` delivers it.
    wait_until(
        "the local reader delivers the doomed write",
        Duration::from_secs(10),
        || async { delivered(&subscribers[2], "doomed") == [1] },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    set.kill_9(primary);
    let answer = doomed_call.await.unwrap();
    let status = answer.expect_err("the doomed write cannot have been acknowledged");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    for secondary in &secondaries {
        set.resume_replication(*secondary).await;
    }
    let new_primary = set.primary().await;
    assert!(secondaries.contains(&new_primary));
    write_until_answered(&mut client, vec![tagged("kept", 2, &[ROLLBACK_TAG])]).await;
    set.restart(primary);
    set.wait_until_member(primary).await;
    wait_until(
        "the old primary rolled the doomed write back",
        Duration::from_secs(60),
        || async {
            let member = set.direct(primary).await;
            let journal = member
                .database(&polling.database)
                .collection::<Document>("journal");
            journal
                .find_one(doc! { "pid": "doomed" })
                .await
                .is_ok_and(|found| found.is_none())
        },
    )
    .await;
    let log = std::fs::read_to_string(set.log(primary)).unwrap();
    assert!(
        log.contains("Rollback"),
        "the old primary's log shows a rollback"
    );

    for subscriber in &subscribers[..2] {
        wait_until("kept 2 delivered", Duration::from_secs(30), || async {
            delivered(subscriber, "kept") == [1, 2]
        })
        .await;
        assert!(
            delivered(subscriber, "doomed").is_empty(),
            "{}: delivered a write that was rolled back",
            subscriber.mode
        );
    }
    for server in [&polling, &change_streams] {
        let current = current_ids_once(&server.channel().await, ROLLBACK_TAG, 2).await;
        assert_eq!(current, [("kept".to_owned(), 1), ("kept".to_owned(), 2)]);
    }

    // The client never got an answer for the doomed write: retrying it is safe, and stores it.
    write_until_answered(&mut client, vec![doomed]).await;
    for subscriber in &subscribers[..2] {
        wait_until(
            "the retried write delivered once",
            Duration::from_secs(30),
            || async { delivered(subscriber, "doomed") == [1] },
        )
        .await;
    }
    stop.cancel();
    for subscriber in subscribers {
        subscriber.stream.task.await.unwrap();
    }
}
