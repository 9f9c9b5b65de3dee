//! `eventjournal backup schedule`: backups at the times of `[backup.schedule]`'s cron
//! expressions, until SIGTERM or SIGINT.
//!
//! The loop sleeps until the next time either schedule names (a full backup wins a tie), takes
//! that backup, prunes, and goes on from the time it finished. Every scheduled time that passed
//! meanwhile (a long backup, the process stopped or starved) is a missed run: logged as a
//! warning and counted in `eventjournal_backup_missed_runs_total`; a missed full backup turns the
//! next incremental one into a full one. An incremental backup with nothing to build on is taken
//! as a full one.

use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use croner::Cron;
use tokio_util::sync::CancellationToken;

use crate::cli::BackupStoreArgs;
use crate::metrics::backup as metrics;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Full,
    Incremental,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Incremental => "incremental",
        }
    }
}

/// The two schedules.
pub struct Plan {
    pub full: Option<Cron>,
    pub incremental: Option<Cron>,
}

impl Plan {
    fn schedules(&self) -> impl Iterator<Item = (Kind, &Cron)> {
        [
            (Kind::Full, self.full.as_ref()),
            (Kind::Incremental, self.incremental.as_ref()),
        ]
        .into_iter()
        .filter_map(|(kind, cron)| cron.map(|cron| (kind, cron)))
    }

    /// The first scheduled time after `after`, and its kind (full when both fall then).
    pub fn next(&self, after: DateTime<Utc>) -> Option<(DateTime<Utc>, Kind)> {
        self.schedules()
            .filter_map(|(kind, cron)| {
                cron.find_next_occurrence(&after, false)
                    .ok()
                    .map(|at| (at, kind))
            })
            .min_by_key(|(at, kind)| (*at, *kind == Kind::Incremental))
    }

    /// The scheduled times in `(from, to]`, each once, in order.
    pub fn between(&self, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<(DateTime<Utc>, Kind)> {
        let mut times = Vec::new();
        let mut at = from;
        while let Some((next, kind)) = self.next(at) {
            if next > to || times.len() >= 10_000 {
                break;
            }
            times.push((next, kind));
            at = next;
        }
        times
    }
}

/// Runs until a signal; returns what it did, in a line.
pub async fn run(args: &BackupStoreArgs) -> anyhow::Result<String> {
    let settings = args.connection.settings(None)?;
    let schedule = &settings.backup.schedule;
    let plan = Plan {
        full: config::cron(&schedule.full)
            .map_err(|error| anyhow::anyhow!("backup.schedule.full {:?} {error}", schedule.full))?,
        incremental: config::cron(&schedule.incremental).map_err(|error| {
            anyhow::anyhow!(
                "backup.schedule.incremental {:?} {error}",
                schedule.incremental
            )
        })?,
    };
    if plan.full.is_none() && plan.incremental.is_none() {
        anyhow::bail!(
            "backup.schedule.full and backup.schedule.incremental are both empty: nothing to \
             schedule"
        );
    }
    let store = super::backup::store(&settings, args)?;
    let database = super::connect(&settings).await?;
    let shutdown = CancellationToken::new();
    tokio::spawn(crate::signal::cancel_on_signal(shutdown.clone()));
    if let Some(address) = schedule.metrics_listen {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| {
                format!("cannot listen on {address} (backup.schedule.metrics-listen)")
            })?;
        tokio::spawn(crate::metrics::serve(listener, shutdown.clone()));
    }
    // Counters at zero from the start, so a dashboard sees them before the first run.
    for kind in [Kind::Full, Kind::Incremental] {
        metrics::MISSED.with_label_values(&[kind.name()]);
        for outcome in ["success", "failure"] {
            metrics::RUNS.with_label_values(&[kind.name(), outcome]);
        }
    }
    let (mut taken, mut failed) = (0_u64, 0_u64);
    let mut from = Utc::now();
    // A full backup missed while the previous one ran makes the next run a full one.
    let mut full_missed = false;
    while let Some((at, mut kind)) = plan.next(from) {
        tracing::info!(at = %at, kind = kind.name(), "next scheduled backup");
        let wait = (at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(wait) => {}
        }
        // Times that passed while this process could not run (stopped, starved).
        let started = Utc::now();
        if missed(&plan, at, started, "the process was not running") || full_missed {
            kind = Kind::Full;
        }
        let outcome = take(&database, &store, &settings, kind).await;
        let finished = Utc::now();
        if let Ok((taken_kind, _)) = &outcome {
            kind = *taken_kind;
        }
        let duration = (finished - started).to_std().unwrap_or_default();
        metrics::LAST_DURATION
            .with_label_values(&[kind.name()])
            .set(duration.as_secs_f64());
        match outcome {
            Ok((_, line)) => {
                taken += 1;
                metrics::RUNS
                    .with_label_values(&[kind.name(), "success"])
                    .inc();
                metrics::LAST_SUCCESS
                    .with_label_values(&[kind.name()])
                    .set(finished.timestamp_millis() as f64 / 1000.0);
                tracing::info!("{line}");
                eprint!("{line}");
            }
            Err(error) => {
                failed += 1;
                metrics::RUNS
                    .with_label_values(&[kind.name(), "failure"])
                    .inc();
                tracing::error!(
                    error = mongo::describe_chain(error.as_ref()),
                    kind = kind.name(),
                    "scheduled backup failed"
                );
                eprintln!(
                    "scheduled {} backup failed: {}",
                    kind.name(),
                    mongo::describe_chain(error.as_ref())
                );
            }
        }
        full_missed = missed(
            &plan,
            started,
            finished,
            "the backup before it was still running",
        );
        from = finished.max(at);
        if shutdown.is_cancelled() {
            break;
        }
    }
    database.client().clone().shutdown().await;
    Ok(format!(
        "backup schedule stopped: {taken} backups taken, {failed} failed\n"
    ))
}

/// Logs and counts the scheduled times in `(after, now]`; true if a full backup is among them.
fn missed(plan: &Plan, after: DateTime<Utc>, now: DateTime<Utc>, why: &str) -> bool {
    let mut full = false;
    for (at, kind) in plan.between(after, now) {
        full |= kind == Kind::Full;
        metrics::MISSED.with_label_values(&[kind.name()]).inc();
        tracing::warn!(at = %at, kind = kind.name(), "missed a scheduled backup: {why}");
        eprintln!("missed the {} backup scheduled at {at}: {why}", kind.name());
    }
    full
}

/// One scheduled backup and the pruning after it; the kind taken (an incremental one with
/// nothing to build on is full) and the lines to print.
async fn take(
    database: &mongodb::Database,
    store: &backup::store::AnyStore,
    settings: &config::Settings,
    kind: Kind,
) -> anyhow::Result<(Kind, String)> {
    let options = super::backup::configured_options(settings, kind == Kind::Incremental)?;
    let manifest = match backup::backup(database, store, &options).await {
        // Nothing to build on, or the oplog no longer reaches the base, or a collection was
        // dropped since: a full backup is what can be taken.
        Err(error @ (backup::BackupError::NoBase(_) | backup::BackupError::Refused(_)))
            if kind == Kind::Incremental =>
        {
            tracing::info!(%error, "cannot take an incremental backup: taking a full one");
            eprintln!("cannot take an incremental backup ({error}): taking a full one");
            let options = super::backup::configured_options(settings, false)?;
            backup::backup(database, store, &options).await?
        }
        other => other?,
    };
    let taken = if manifest.base.is_some() {
        Kind::Incremental
    } else {
        Kind::Full
    };
    let mut line = format!(
        "{} backup {} complete: {}\n",
        taken.name(),
        manifest.id,
        backup::store::Store::describe(store, &manifest.id)
    );
    if settings.backup.schedule.prune {
        // The backup is taken whatever pruning does: a failure here is logged, not the run's.
        match super::backup::prune(store, settings).await {
            Ok(pruned) => line.push_str(&pruned),
            Err(error) => {
                tracing::error!(
                    error = mongo::describe_chain(error.as_ref()),
                    "pruning after a backup failed"
                );
                line.push_str(&format!(
                    "pruning failed: {}\n",
                    mongo::describe_chain(error.as_ref())
                ));
            }
        }
    }
    Ok((taken, line))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().unwrap()
    }

    fn plan(full: &str, incremental: &str) -> Plan {
        Plan {
            full: config::cron(full).unwrap(),
            incremental: config::cron(incremental).unwrap(),
        }
    }

    #[test]
    fn the_next_time_is_the_earliest_of_both_and_a_tie_is_full() {
        let plan = plan("0 2 * * *", "0 */6 * * *");
        assert_eq!(
            plan.next(at("2026-11-22T01:00:00Z")),
            Some((at("2026-11-22T02:00:00Z"), Kind::Full))
        );
        assert_eq!(
            plan.next(at("2026-11-22T02:00:00Z")),
            Some((at("2026-11-22T06:00:00Z"), Kind::Incremental))
        );
        let tie = self::plan("0 0 * * *", "0 */6 * * *");
        assert_eq!(
            tie.next(at("2026-11-22T23:00:00Z")),
            Some((at("2026-11-23T00:00:00Z"), Kind::Full))
        );
        assert_eq!(self::plan("", "").next(at("2026-11-22T23:00:00Z")), None);
    }

    #[test]
    fn the_times_between_two_instants_are_each_counted_once() {
        let plan = plan("0 0 * * *", "0 */6 * * *");
        let missed = plan.between(at("2026-11-22T05:00:00Z"), at("2026-11-23T06:00:00Z"));
        assert_eq!(
            missed,
            vec![
                (at("2026-11-22T06:00:00Z"), Kind::Incremental),
                (at("2026-11-22T12:00:00Z"), Kind::Incremental),
                (at("2026-11-22T18:00:00Z"), Kind::Incremental),
                (at("2026-11-23T00:00:00Z"), Kind::Full),
                (at("2026-11-23T06:00:00Z"), Kind::Incremental),
            ]
        );
        assert!(
            plan.between(at("2026-11-22T06:00:00Z"), at("2026-11-22T06:00:00Z"))
                .is_empty()
        );
    }
}
