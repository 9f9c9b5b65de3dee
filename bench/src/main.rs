//! `eventjournal-bench`: the benchmark. The write scenarios start the service (`server.rs`)
//! against a MongoDB, run each scenario (`scenarios.rs`) through the service and through the
//! raw driver (`raw.rs`) doing the same inserts, in alternating rounds; the read scenarios
//! (`read.rs`) measure many live subscribers on servers of their own, in both live-query
//! modes. Everything ends in one markdown table of medians against the targets (`report.rs`).
//!
//! Machines running it are shared and noisy, so nothing here is judged by one absolute time
//! where a comparison can be had: both sides run in the same process against the same mongod,
//! interleaved, which side goes first alternates by round, and a write target is a ratio of
//! medians. `cargo xtask bench` starts a fresh mongod and runs this; `--check` makes a missed
//! target the exit code.

mod cpu;
mod raw;
mod read;
mod report;
mod scenarios;
mod server;
mod service;
mod stats;
mod workload;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, ValueEnum};

use cpu::Usage;
use raw::RawDriver;
use report::{Met, Row, number, optional_number, table};
use scenarios::{Bench, FairnessRound, Measured, Scenario};
use server::Server;
use stats::median;
use workload::{PAYLOAD_BYTES, Side, Workload};

/// Metrics of the group-commit write path, printed below the table when the server has them.
const WRITE_BATCH_METRICS: &str = "eventjournal_write_batch";

#[derive(Parser)]
#[command(
    name = "eventjournal-bench",
    about = "The benchmark: each write scenario through the service and through the raw mongodb \
             driver, in alternating rounds, and the read scenarios' live subscribers in both \
             live-query modes; prints medians and ratios against the targets"
)]
struct Args {
    /// MongoDB to run against (a replica set: the service needs transactions).
    #[arg(long)]
    mongodb_uri: String,
    /// The `eventjournal` binary to benchmark (a release build).
    #[arg(long)]
    server_binary: PathBuf,
    /// Rounds per scenario; each side runs once per round.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Scenarios to run (repeatable); all when none is given.
    #[arg(long = "scenario", value_enum)]
    scenarios: Vec<Scenario>,
    /// Length of each of the two fairness phases (alone, next to the prolific producer).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    fairness_seconds: u64,
    /// Fairness rounds [default: --rounds]; each takes two phases of --fairness-seconds, so
    /// fewer shorten a long run.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    fairness_rounds: Option<u32>,
    /// Rounds of the read scenarios (r1k, r10k); each runs both live-query modes on fresh
    /// servers and takes tens of seconds.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    read_rounds: u32,
    /// Exit with 1 when a target is missed (or could not be measured); without it the exit
    /// code is 0 whenever the table was printed.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let outcome = tokio::runtime::Runtime::new()
        .context("starting the async runtime")
        .and_then(|runtime| {
            runtime.block_on(async {
                tokio::select! {
                    outcome = run(args) => outcome,
                    signal = stop_signal() => Err(anyhow::anyhow!("stopped by {signal}")),
                }
            })
        });
    match outcome {
        Ok(code) => code,
        Err(error) => {
            eprintln!("eventjournal-bench: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// SIGINT or SIGTERM. `main` then drops `run`'s future, and with it the servers it started
/// (`Server`'s `Drop` kills its process): a signal's default action would end this process
/// alone and leave them running (Ctrl-C reaches them too, a `kill` of this process does not).
async fn stop_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut interrupt), Ok(mut terminate)) => tokio::select! {
            _ = interrupt.recv() => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
        },
        // Not listening: the default actions stay, as before.
        _ => std::future::pending().await,
    }
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let mut scenarios = if args.scenarios.is_empty() {
        Scenario::value_variants().to_vec()
    } else {
        args.scenarios.clone()
    };
    scenarios.sort();
    scenarios.dedup();
    let (read_scenarios, write_scenarios): (Vec<Scenario>, Vec<Scenario>) =
        scenarios.iter().partition(|scenario| scenario.is_read());
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let service_database = format!("bench_{run_id}");
    let raw_database = format!("bench_raw_{run_id}");

    let raw = Arc::new(RawDriver::connect(&args.mongodb_uri, &raw_database).await?);
    let mongod_version = raw.mongod_version().await?;
    let header = header(&args, &mongod_version, &service_database, &raw_database);

    let write = if write_scenarios.is_empty() {
        print!("{header}");
        None
    } else {
        let write = run_write_scenarios(
            &args,
            &raw,
            &run_id,
            &write_scenarios,
            &header,
            [&service_database, &raw_database],
        )
        .await;
        match write {
            Ok(write) => Some(write),
            Err(error) => {
                drop_databases(&raw, [&service_database, &raw_database]).await;
                return Err(error);
            }
        }
    };
    // After the write scenarios and their server are done, so neither disturbs the other.
    let read = read::measure(
        &read::Plan {
            server_binary: &args.server_binary,
            mongodb_uri: &args.mongodb_uri,
            database: &service_database,
            run_id: &run_id,
            rounds: args.read_rounds,
        },
        &read_scenarios,
    )
    .await;
    drop_databases(&raw, [&service_database, &raw_database]).await;

    let mut rows = write
        .as_ref()
        .map(|write| rows(&write.results))
        .unwrap_or_default();
    rows.extend(read.rows());
    println!();
    print!("{}", table(&rows));
    println!();
    if let Some(write) = &write {
        print!("{}", notes(&args, &write.results, write.fairness_rounds));
        print!("{}", cpu_notes(&write.results));
    }
    print!("{}", read.notes());
    if let Some(write) = &write {
        println!();
        print_write_metrics(&write.metrics);
    }
    println!(
        "\nTotal time: {:.0} s.",
        started.elapsed().as_secs_f64().ceil()
    );
    let missed = rows.iter().filter(|row| row.met.missed()).count();
    if args.check && missed > 0 {
        eprintln!("eventjournal-bench: {missed} target(s) missed or not measured (--check)");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// What the write scenarios leave for the report.
struct WriteRun {
    results: Results,
    fairness_rounds: u32,
    /// The server's Prometheus text at the end of the write scenarios.
    metrics: anyhow::Result<String>,
}

/// The write scenarios on one server, started here and stopped before returning. Prints the
/// header once the warm-up has shown both sides store the same documents.
async fn run_write_scenarios(
    args: &Args,
    raw: &Arc<RawDriver>,
    run_id: &str,
    scenarios: &[Scenario],
    header: &str,
    [service_database, raw_database]: [&str; 2],
) -> anyhow::Result<WriteRun> {
    let fairness_rounds = args.fairness_rounds.unwrap_or(args.rounds);
    let mut server = Server::start(&args.server_binary, &args.mongodb_uri, service_database)
        .await
        .context("starting the service")?;
    let measured = async {
        let bench = Bench::new(
            Workload::new(run_id),
            &server.url(),
            Arc::clone(raw),
            service_database,
        )
        .await?;
        bench.warm_up().await.context("warming up")?;
        let service_shape = raw
            .stored_shape(service_database, &bench.warm_up_pid(Side::Service))
            .await?;
        let raw_shape = raw
            .stored_shape(raw_database, &bench.warm_up_pid(Side::Raw))
            .await?;
        print!("{header}");
        if service_shape == raw_shape {
            println!(
                "- documents: the same shape on both sides ({} fields and types compared)",
                service_shape.len()
            );
        } else {
            println!(
                "- documents: **shapes differ**, the comparison is off: service stores {{{}}}, \
                 the raw driver {{{}}}",
                service_shape.join(", "),
                raw_shape.join(", ")
            );
        }
        let mongod = cpu::local_process(raw.mongod_pid().await.ok(), "mongod").await;
        measure(
            &bench,
            args,
            scenarios,
            fairness_rounds,
            &mut server,
            mongod,
        )
        .await
    }
    .await;
    let metrics = server.metrics().await;
    drop(server);
    Ok(WriteRun {
        results: measured?,
        fairness_rounds,
        metrics,
    })
}

fn print_write_metrics(metrics: &anyhow::Result<String>) {
    match metrics {
        Ok(text) => {
            let lines: Vec<&str> = text
                .lines()
                .filter(|line| line.starts_with(WRITE_BATCH_METRICS))
                .collect();
            if lines.is_empty() {
                println!("Server metrics: no {WRITE_BATCH_METRICS}* metrics exposed.");
            } else {
                println!("Server metrics ({WRITE_BATCH_METRICS}*, write scenarios):\n```");
                for line in lines {
                    println!("{line}");
                }
                println!("```");
            }
        }
        Err(error) => println!("Server metrics: not scraped: {error:#}"),
    }
}

/// Leaves the MongoDB as the benchmark found it (it may be a shared one, not xtask's).
async fn drop_databases(raw: &RawDriver, databases: [&str; 2]) {
    for database in databases {
        if let Err(error) = raw.drop_database(database).await {
            eprintln!("eventjournal-bench: warning: {error:#}");
        }
    }
}

/// One figure per round, for each side.
struct PerSide<T> {
    service: Vec<T>,
    raw: Vec<T>,
}

impl<T> Default for PerSide<T> {
    fn default() -> Self {
        Self {
            service: Vec::new(),
            raw: Vec::new(),
        }
    }
}

impl<T> PerSide<T> {
    fn push(&mut self, side: Side, value: T) {
        match side {
            Side::Service => self.service.push(value),
            Side::Raw => self.raw.push(value),
        }
    }
}

/// Per-round numbers of one scenario, per side.
#[derive(Default)]
struct Series {
    values: PerSide<f64>,
    /// Where the CPU went in each round, per side (scenarios with `Scenario::events`).
    cpu: PerSide<Usage>,
    unimplemented: bool,
    /// The failure that stopped the scenario; it is not run again in later rounds.
    error: Option<String>,
    /// Per round, the service's floor for the scenario, µs (`Bench::floor`; P1 and P3).
    floor: Vec<f64>,
    /// The failure that stopped the floor's measurement (the scenario itself goes on).
    floor_error: Option<String>,
    /// Per round, beside P1: the p50 of one read of MongoDB through the service and by the
    /// raw driver, µs (`Bench::read_round_trips`).
    reads: PerSide<f64>,
    /// Per round and side, P1 and P3: mongod's own mean time per write command while the side
    /// wrote, µs (`Bench::mongod_writes`).
    mongod: PerSide<f64>,
}

#[derive(Default)]
struct Results {
    series: BTreeMap<Scenario, Series>,
    fairness: Vec<FairnessRound>,
    fairness_error: Option<String>,
    fairness_selected: bool,
}

/// All rounds. A scenario that fails is reported and skipped from then on, unless the
/// server died, which ends the benchmark with the server's stderr.
async fn measure(
    bench: &Bench,
    args: &Args,
    scenarios: &[Scenario],
    fairness_rounds: u32,
    server: &mut Server,
    mongod: Option<u32>,
) -> anyhow::Result<Results> {
    let mut results = Results {
        fairness_selected: scenarios.contains(&Scenario::Fairness),
        ..Results::default()
    };
    let processes = cpu::Processes {
        server: server.pid(),
        client: std::process::id(),
        mongod,
    };
    for round in 1..=args.rounds {
        // Whoever goes second may find mongod busier (checkpoints, a fuller cache): alternate.
        let sides = Side::in_order(round % 2 == 1);
        for &scenario in scenarios {
            if scenario == Scenario::Fairness {
                continue;
            }
            let series = results.series.entry(scenario).or_default();
            if series.error.is_some() || series.unimplemented {
                continue;
            }
            let mut progress = format!("round {round}/{} {:<4}", args.rounds, scenario.name());
            for side in sides {
                // A diagnostic, read outside the CPU readings: a failed reading is left out.
                let mongod_before = match scenario {
                    Scenario::P1 | Scenario::P3 => bench.mongod_writes().await.ok(),
                    _ => None,
                };
                let before = match scenario.events() {
                    Some(events) => Some((events, cpu::Reading::take(&processes).await?)),
                    None => None,
                };
                match bench.run(scenario, side, round).await {
                    Ok(Measured::Value(value)) => {
                        series.values.push(side, value);
                        if let Some((events, before)) = &before {
                            let after = cpu::Reading::take(&processes).await?;
                            series
                                .cpu
                                .push(side, Usage::between(before, &after, *events));
                        }
                        let _ = write!(progress, "  {side} {value:.0} {}", scenario.unit());
                        if let Some(before) = mongod_before
                            && let Ok(after) = bench.mongod_writes().await
                            && let Some(mean) = after.mean_since(&before)
                        {
                            series.mongod.push(side, mean);
                            let _ = write!(progress, " (mongod {mean:.0} µs)");
                        }
                    }
                    Ok(Measured::Unimplemented) => {
                        series.unimplemented = true;
                        let _ = write!(progress, "  {side} n/a (UNIMPLEMENTED)");
                        break;
                    }
                    Err(error) => {
                        server.check_alive()?;
                        let _ = write!(progress, "  {side} FAILED: {error:#}");
                        series.error = Some(format!("{error:#}"));
                        break;
                    }
                }
            }
            if series.error.is_none() && series.floor_error.is_none() {
                match bench.floor(scenario, round).await {
                    Ok(Some(floor)) => {
                        let floor = stats::micros(floor);
                        series.floor.push(floor);
                        let _ = write!(progress, "  floor {floor:.0} µs");
                    }
                    Ok(None) => {}
                    Err(error) => {
                        server.check_alive()?;
                        let _ = write!(progress, "  floor FAILED: {error:#}");
                        series.floor_error = Some(format!("{error:#}"));
                    }
                }
            }
            if scenario == Scenario::P1 && series.error.is_none() && series.floor_error.is_none() {
                match bench.read_round_trips(round).await {
                    Ok(reads) => {
                        let (service, raw) =
                            (stats::micros(reads.service), stats::micros(reads.raw));
                        let _ = write!(progress, "  read {service:.0}/{raw:.0} µs");
                        series.reads.push(Side::Service, service);
                        series.reads.push(Side::Raw, raw);
                    }
                    Err(error) => {
                        server.check_alive()?;
                        let _ = write!(progress, "  read FAILED: {error:#}");
                        series.floor_error = Some(format!("{error:#}"));
                    }
                }
            }
            eprintln!("{progress}");
        }
        if results.fairness_selected && round <= fairness_rounds && results.fairness_error.is_none()
        {
            let phase = Duration::from_secs(args.fairness_seconds);
            match bench.fairness(round, phase).await {
                Ok(fairness) => {
                    eprintln!(
                        "round {round}/{} fairness  modest p99 {:.0} µs alone, {:.0} µs next to \
                         prolific ({:.0} events/s){}",
                        args.rounds,
                        fairness.alone_p99_us,
                        fairness.loaded_p99_us,
                        fairness.prolific_events_per_second,
                        if fairness.over_stream {
                            ""
                        } else {
                            "; unary: WriteEventsStream UNIMPLEMENTED"
                        }
                    );
                    results.fairness.push(fairness);
                }
                Err(error) => {
                    server.check_alive()?;
                    eprintln!("round {round}/{} fairness  FAILED: {error:#}", args.rounds);
                    results.fairness_error = Some(format!("{error:#}"));
                }
            }
        }
    }
    Ok(results)
}

/// About what each scenario with a floor (`Bench::floor`) could reach this run: the raw
/// driver's median plus the floor.
fn floor_notes(results: &Results) -> Vec<String> {
    let of = |scenario| {
        let series = results.series.get(&scenario)?;
        Some((median(&series.floor)?, median(&series.values.raw)?))
    };
    let mut notes = Vec::new();
    for (scenario, series) in &results.series {
        if let Some(error) = &series.floor_error {
            notes.push(format!("{}'s floor FAILED: {error}", scenario.label()));
        }
    }
    if let Some((floor, raw)) = of(Scenario::P1) {
        notes.push(format!(
            "P1: a do-nothing unary call (`grpc.health.v1` check) takes {floor:.0} µs, so P1 can be \
             expected at about ({raw:.0} + {floor:.0}) / {raw:.0} = {:.2}x raw",
            (raw + floor) / raw
        ));
        let reads = results
            .series
            .get(&Scenario::P1)
            .and_then(|series| Some((median(&series.reads.service)?, median(&series.reads.raw)?)));
        if let Some((service, raw_read)) = reads {
            let hop = service - raw_read;
            notes.push(format!(
                "P1 beside a read: one `find_one` by `_id` takes {service:.0} µs through the \
                 service (`DurableStateStore/GetObject` of an id with no object: no write path) \
                 and {raw_read:.0} µs by the raw driver (paired call by call), so a unary call \
                 that waits on MongoDB pays {hop:.0} µs for gRPC and the server's process, and P1 \
                 can be expected at about ({raw:.0} + {hop:.0}) / {raw:.0} = {:.2}x raw",
                (raw + hop) / raw
            ));
        }
    }
    if let Some((floor, raw)) = of(Scenario::P3) {
        let raw_request = scenarios::P3_WRITES_PER_REQUEST as f64 / raw * 1e6;
        notes.push(format!(
            "P3: a request of its 100 writes that the server refuses on receipt (sequence \
             number 0: decoded and answered, nothing stored) takes {floor:.0} µs, and the raw \
             insert_many {raw_request:.0} µs, so P3 can be expected at about {raw_request:.0} / \
             ({raw_request:.0} + {floor:.0}) = {:.2}x raw",
            raw_request / (raw_request + floor)
        ));
    }
    notes
}

/// What mongod itself took per insert of each side, P1 and P3 (`Bench::mongod_writes`).
fn mongod_notes(results: &Results) -> Vec<String> {
    [Scenario::P1, Scenario::P3]
        .into_iter()
        .filter_map(|scenario| {
            let series = results.series.get(&scenario)?;
            let (service, raw) = (median(&series.mongod.service)?, median(&series.mongod.raw)?);
            Some(format!(
                "{}: {service:.0} µs per insert of the service's, {raw:.0} µs per insert of the \
                 raw driver's ({:+.0} µs)",
                scenario.label(),
                service - raw
            ))
        })
        .collect()
}

/// About what P3s's window leaves the service this run, from the raw driver's two insert rates
/// of one id (P3's 100-event inserts and P3s's ceiling of the writer's largest batch): see
/// `stats::window_estimate`. P3s's target is against P3, so it also says how fast P3 may be for
/// both targets to hold.
fn window_note(results: &Results) -> Option<String> {
    let raw = |scenario| median(&results.series.get(&scenario)?.values.raw);
    let (small_rate, large_rate) = (raw(Scenario::P3)?, raw(Scenario::P3s)?);
    let small = scenarios::P3_WRITES_PER_REQUEST as f64;
    let large = f64::from(config::WriteJournalSettings::default().max_batch_events);
    let window = (scenarios::STREAM_WINDOW as i64 * scenarios::P3_WRITES_PER_REQUEST) as f64;
    let bound = stats::window_estimate(small, small_rate, large, large_rate, window)?;
    let of_raw = bound / small_rate;
    Some(format!(
        "P3s's window: from the raw inserts of one id this run ({small:.0} events at \
         {small_rate:.0} events/s, {large:.0} at {large_rate:.0}), {window:.0} events \
         unanswered, inserted a batch at a time, let one id reach about {bound:.0} events/s \
         (two consecutive batches share the window), {of_raw:.2}x the raw insert_many of P3; \
         for P3s >= 1.5x P3, P3 must then stay at or below about {:.2}x raw. An estimate too: \
         the raw rates include building each document in the loop, which the stream overlaps \
         with the inserts, so the service can come out above it",
        of_raw / 1.5
    ))
}

/// The table's rows, from the medians across rounds; ratios are of the medians.
fn rows(results: &Results) -> Vec<Row> {
    let mut rows = Vec::new();
    let medians = |scenario| {
        results.series.get(&scenario).map(|series| {
            (
                median(&series.values.service),
                median(&series.values.raw),
                series.error.as_deref(),
                series.unimplemented,
            )
        })
    };
    // (scenario, metric, target text, target as a predicate on service/raw)
    type Target = (&'static str, Option<fn(f64) -> bool>);
    let compared: [(Scenario, &'static str, &str, Target); 4] = [
        (
            Scenario::P1,
            "P1",
            "p50 latency µs, 1 actor, 300 sequential single-event writes",
            ("<= 1.25x raw insert_one", Some(|ratio| ratio <= 1.25)),
        ),
        (
            Scenario::P2,
            "P2",
            "events/s, 100 actors x 100 events, 1 write in flight each, one eventjournal-client",
            (">= 4x raw insert_one", Some(|ratio| ratio >= 4.0)),
        ),
        (
            Scenario::P2Unary,
            "P2 unary",
            "events/s, P2 with a gRPC call per write (no client coalescing)",
            ("none (for comparison)", None),
        ),
        (
            Scenario::P3,
            "P3",
            "events/s, 1 pid, 100 requests x 100 writes, 1 in flight",
            (">= 0.9x raw insert_many", Some(|ratio| ratio >= 0.9)),
        ),
    ];
    for (scenario, name, metric, (target, met)) in compared {
        let Some((service, raw, error, _)) = medians(scenario) else {
            continue;
        };
        let row = match (service, raw, error) {
            (_, _, Some(_)) => Row::not_measured(name, metric, "FAILED (see below)", target),
            (Some(service), Some(raw), None) => Row {
                scenario: name.to_owned(),
                metric: metric.to_owned(),
                service: number(service),
                raw: number(raw),
                ratio: format!("{:.2}x", service / raw),
                target: target.to_owned(),
                met: met.map_or(Met::NoTarget, |met| Met::from(met(service / raw))),
            },
            _ => Row::not_measured(name, metric, "no rounds", target),
        };
        rows.push(row);
        if scenario == Scenario::P2 {
            let target = ">= 20,000 events/s";
            rows.push(match (service, error) {
                (Some(service), None) => Row {
                    scenario: "P2".to_owned(),
                    metric: "events/s, absolute (this machine)".to_owned(),
                    service: number(service),
                    raw: "—".to_owned(),
                    ratio: "—".to_owned(),
                    target: target.to_owned(),
                    met: Met::from(service >= 20_000.0),
                },
                _ => Row::not_measured("P2", "events/s, absolute", "n/a", target),
            });
        }
    }
    if let Some((service, raw, error, unimplemented)) = medians(Scenario::P3s) {
        let metric = "events/s, P3 over WriteEventsStream, <= 8 unacknowledged";
        let target = ">= 1.5x P3";
        let p3 = medians(Scenario::P3).and_then(|(p3, _, error, _)| p3.filter(|_| error.is_none()));
        rows.push(match (service, raw, error) {
            (_, _, Some(_)) => Row::not_measured("P3s", metric, "FAILED (see below)", target),
            _ if unimplemented => Row::not_measured("P3s", metric, "n/a (UNIMPLEMENTED)", target),
            (Some(service), Some(raw), None) => Row {
                scenario: "P3s".to_owned(),
                metric: metric.to_owned(),
                service: number(service),
                raw: number(raw),
                ratio: match p3 {
                    Some(p3) => format!("{:.2}x raw, {:.2}x P3", service / raw, service / p3),
                    None => format!("{:.2}x raw (P3 not run)", service / raw),
                },
                target: target.to_owned(),
                met: p3.map_or(Met::NotAvailable, |p3| Met::from(service / p3 >= 1.5)),
            },
            _ => Row::not_measured("P3s", metric, "no rounds", target),
        });
    }
    if results.fairness_selected {
        let metric = "modest producers' p99 µs: alone → next to a prolific one";
        let target = "<= 2x (B/A)";
        let alone = median(&field(&results.fairness, |round| round.alone_p99_us));
        let loaded = median(&field(&results.fairness, |round| round.loaded_p99_us));
        rows.push(match (alone, loaded, &results.fairness_error) {
            (_, _, Some(_)) => Row::not_measured("fairness", metric, "FAILED (see below)", target),
            (Some(alone), Some(loaded), None) => Row {
                scenario: "fairness".to_owned(),
                metric: metric.to_owned(),
                service: format!("{} → {}", number(alone), number(loaded)),
                raw: "n/a (service only)".to_owned(),
                ratio: format!("{:.2}x", loaded / alone),
                target: target.to_owned(),
                met: Met::from(loaded / alone <= 2.0),
            },
            _ => Row::not_measured("fairness", metric, "no rounds", target),
        });
    }
    rows
}

fn field(rounds: &[FairnessRound], get: fn(&FairnessRound) -> f64) -> Vec<f64> {
    rounds.iter().map(get).collect()
}

/// Where the machine's CPU went in the scenarios long enough to tell: per side, the median
/// over the rounds of each process's CPU per event, and how busy all cores were.
fn cpu_notes(results: &Results) -> String {
    let mut lines = Vec::new();
    for (scenario, series) in &results.series {
        for (side, usage) in [
            (Side::Service, &series.cpu.service),
            (Side::Raw, &series.cpu.raw),
        ] {
            if usage.is_empty() {
                continue;
            }
            let of = |get: fn(&Usage) -> f64| {
                optional_number(median(&usage.iter().map(get).collect::<Vec<_>>()))
            };
            let mongod: Vec<f64> = usage.iter().filter_map(|usage| usage.mongod_us).collect();
            lines.push(format!(
                "| {} | {side} | {} | {} | {} | {}% |",
                scenario.label(),
                of(|usage| usage.server_us),
                of(|usage| usage.client_us),
                optional_number(median(&mongod)),
                of(|usage| usage.machine_busy * 100.0),
            ));
        }
    }
    if lines.is_empty() {
        return String::new();
    }
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let mut out = format!(
        "\nCPU per event while each side wrote (µs of CPU time per event, medians of the \
         rounds; `/proc`, 10 ms ticks; busy: share of all {cores} cores of the machine, whoever \
         used them):\n\n\
         | scenario | side | eventjournal serve | benchmark client | mongod | machine busy |\n\
         |---|---|---:|---:|---:|---:|\n"
    );
    for line in lines {
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// What the table cannot say: round counts, fairness details, failures.
fn notes(args: &Args, results: &Results, fairness_rounds: u32) -> String {
    let mut out = String::new();
    if !results.series.is_empty() {
        let _ = writeln!(
            out,
            "Medians over {} round(s) (service and raw driver alternate going first); ratios are \
         service/raw of the medians (P1: lower is better, the rest: higher is better). P3s's raw \
         side is the ceiling for one persistence id: the same events as ordered insert_many's of \
         the writer's largest batch ({} events), back to back (one id's inserts are never in \
         flight together); its target is against P3.",
            args.rounds,
            config::WriteJournalSettings::default().max_batch_events
        );
    }
    let floors = floor_notes(results);
    if !floors.is_empty() {
        let _ = writeln!(
            out,
            "Floors (medians of the rounds, measured beside each scenario): {}. These are \
             estimates, not bounds: the floor is timed beside the scenario, and its refused \
             writes are not a real write's work (validation stops at the sequence number, each \
             answer carries a reason). Measured ratios often come out better than them (by up to \
             about a tenth so far); a target far beyond one is out of the service's reach in \
             this run.",
            floors.join("; ")
        );
    }
    let mongod = mongod_notes(results);
    if !mongod.is_empty() {
        let _ = writeln!(
            out,
            "Inside mongod (serverStatus opLatencies.writes: from receipt to reply, write concern \
             included; the mean over each side's run, the median of the rounds): {}. The same \
             documents, indexes and write concern either way, one insert at a time: a difference \
             is time mongod itself took longer over one side's inserts, not time in the service.",
            mongod.join("; ")
        );
    }
    if let Some(note) = window_note(results) {
        let _ = writeln!(out, "{note}.");
    }
    if results.fairness_selected && !results.fairness.is_empty() {
        let rounds = results.fairness.len();
        let _ = writeln!(
            out,
            "Fairness: {rounds} round(s) of two {} s phases (A: 10 modest producers, one write \
             every 20 ms each; B: the same next to a prolific producer, 100-write requests, up to \
             8 unanswered){}. Modest p50: {} µs alone, {} µs next to the prolific producer; \
             prolific producer: {} events/s (medians). Transport: {}.",
            args.fairness_seconds,
            if fairness_rounds < args.rounds {
                format!("; fewer than --rounds {} (--fairness-rounds)", args.rounds)
            } else {
                String::new()
            },
            optional_number(median(&field(&results.fairness, |r| r.alone_p50_us))),
            optional_number(median(&field(&results.fairness, |r| r.loaded_p50_us))),
            optional_number(median(&field(&results.fairness, |r| {
                r.prolific_events_per_second
            }))),
            if results.fairness.iter().all(|round| round.over_stream) {
                "WriteEventsStream, one per producer, each on its own connection"
            } else {
                "unary WriteEvents (WriteEventsStream is UNIMPLEMENTED), each producer on its \
                 own connection; modest producers wait for each answer"
            }
        );
    }
    for (scenario, series) in &results.series {
        if let Some(error) = &series.error {
            let _ = writeln!(out, "{} FAILED: {error}", scenario.name());
        }
    }
    if let Some(error) = &results.fairness_error {
        let _ = writeln!(out, "fairness FAILED: {error}");
    }
    out
}

fn header(args: &Args, mongod_version: &str, service_database: &str, raw_database: &str) -> String {
    let settings = RawDriver::settings(&args.mongodb_uri, raw_database);
    let concern = &settings.write_concern;
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    format!(
        "# eventjournal benchmark\n\n\
         - machine: {cpus} CPUs (nproc), {}, {} memory\n\
         - idle cores: {}\n\
         - mongod {mongod_version}, single-node replica set, {}\n\
         - write concern, both sides: w: {}, j: {}, wtimeout: {}\n\
         - service: {} (database {service_database}); raw driver: database {raw_database}, the \
         service's client options (max pool size {}) and journal indexes\n\
         - write workload: {PAYLOAD_BYTES}-byte payloads, 1 tag, one writer uuid, fresh persistence ids \
         per round and side\n",
        cpu_model(&cpuinfo),
        total_memory(),
        cpu::idle_policy(&cpuinfo),
        config::redact_uri(&args.mongodb_uri),
        concern.w,
        concern.journal,
        concern
            .timeout
            .map_or("none".to_owned(), |timeout| format!("{timeout:?}")),
        args.server_binary.display(),
        settings.max_pool_size,
    )
}

/// The CPU's model name from `/proc/cpuinfo`'s text.
fn cpu_model(cpuinfo: &str) -> String {
    cpuinfo
        .lines()
        .find(|line| line.starts_with("model name"))
        .and_then(|line| line.split_once(':'))
        .map_or_else(
            || "unknown CPU".to_owned(),
            |(_, model)| model.trim().to_owned(),
        )
}

fn total_memory() -> String {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            let line = info.lines().find(|line| line.starts_with("MemTotal:"))?;
            let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(format!("{:.1} GiB", kib / (1024.0 * 1024.0)))
        })
        .unwrap_or_else(|| "unknown".to_owned())
}
