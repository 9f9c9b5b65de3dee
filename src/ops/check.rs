//! `eventjournal check`: is this deployment ready for eventjournal? One finding per line, `ok`,
//! `warn` or `fail` with the reason and the fix; the command exits non-zero on any `fail`, so
//! it can gate a deployment. Run it before going live and after every change.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use config::{DatabaseMode, Settings, redact_uri};
use mongo::deployment::{
    Deployment, Flavor, MINIMUM_VERSION, STANDALONE_FIX, Topology, major_minor,
};
use mongodb::Database;
use mongodb::bson::{Bson, Document, doc};
use mongodb::options::ReadConcern;
use serde::Serialize;

use super::short_duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "fail",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub check: &'static str,
    pub status: Status,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Finding {
    fn new(check: &'static str, (status, message, fix): Assessment) -> Self {
        Self {
            check,
            status,
            message,
            fix,
        }
    }
}

type Assessment = (Status, String, Option<String>);

fn ok(message: impl Into<String>) -> Assessment {
    (Status::Ok, message.into(), None)
}

fn warn(message: impl Into<String>, fix: impl Into<String>) -> Assessment {
    (Status::Warn, message.into(), Some(fix.into()))
}

fn fail(message: impl Into<String>, fix: impl Into<String>) -> Assessment {
    (Status::Fail, message.into(), Some(fix.into()))
}

/// Every check against the configured deployment. Only an unreachable MongoDB ends it early
/// (nothing else can be checked).
pub async fn run(settings: &Settings) -> Vec<Finding> {
    let uri = redact_uri(&settings.mongodb.uri);
    let (database, deployment) = match super::connect_and_detect(settings).await {
        Ok(reached) => reached,
        Err(error) => {
            return vec![Finding::new(
                "connection",
                fail(
                    mongo::describe_chain(error.as_ref()),
                    "check mongodb.uri (and mongodb.tls, the user and password) and that \
                     MongoDB is running and reachable from this host",
                ),
            )];
        }
    };
    let mut findings = vec![Finding::new("connection", ok(format!("reached {uri}")))];
    findings.push(Finding::new("server", server(&deployment, settings)));
    // One replSetGetStatus for the topology and the write concern.
    let members = match deployment.topology {
        Topology::ReplicaSet { .. } => members(&database).await,
        _ => None,
    };
    findings.push(Finding::new(
        "topology",
        topology(members.as_deref(), &deployment),
    ));
    findings.push(Finding::new(
        "write-concern",
        write_concern(members.as_deref(), &deployment, settings),
    ));
    findings.push(Finding::new(
        "read-concern",
        read_concern(&database, settings).await,
    ));
    findings.push(Finding::new(
        "indexes",
        match super::indexes::missing(&database, settings).await {
            Ok(missing) if missing.is_empty() => {
                ok("every index the journal, snapshots and durable state need exists")
            }
            Ok(missing) => fail(
                format!("missing: {}", missing.join(", ")),
                "eventjournal indexes create (the server creates them at start-up unless \
                 mongodb.create-indexes = false)",
            ),
            Err(error) => fail(
                format!(
                    "cannot list the indexes: {}",
                    mongo::describe_chain(error.as_ref())
                ),
                "grant the user listIndexes on the database",
            ),
        },
    ));
    match super::purge::compare_with_settings(&database, settings).await {
        Ok(ttls) => findings.extend(ttls.into_iter().map(|ttl| Finding::new("purge", ttl))),
        Err(error) => findings.push(Finding::new(
            "purge",
            fail(
                format!(
                    "cannot list the TTL indexes: {}",
                    mongo::describe_chain(error.as_ref())
                ),
                "grant the user listIndexes on the database",
            ),
        )),
    }
    if settings.mongodb.database_mode == DatabaseMode::Mongo {
        findings.push(Finding::new(
            "oplog",
            oplog(&database, &deployment, settings).await,
        ));
    }
    findings.push(Finding::new("clock", clock(&database, settings).await));
    findings
}

/// The report for people: `status  check  message`, the fix on the next line.
pub fn render_text(findings: &[Finding]) -> String {
    let mut out = String::new();
    for finding in findings {
        out.push_str(&format!(
            "{:<5} {:<14} {}\n",
            finding.status.label(),
            finding.check,
            finding.message
        ));
        if let Some(fix) = &finding.fix {
            for (index, line) in fix.lines().enumerate() {
                let lead = if index == 0 { "fix: " } else { "     " };
                out.push_str(&format!("{:<20.}{lead}{line}\n", ""));
            }
        }
    }
    let count = |status| findings.iter().filter(|f| f.status == status).count();
    out.push_str(&format!(
        "{} ok, {} warn, {} fail\n",
        count(Status::Ok),
        count(Status::Warn),
        count(Status::Fail)
    ));
    out
}

/// The report for machines: `{"ok": bool, "findings": [...]}`.
pub fn render_json(findings: &[Finding]) -> String {
    let report = serde_json::json!({
        "ok": passed(findings),
        "findings": findings,
    });
    format!("{report:#}\n")
}

/// No finding failed.
pub fn passed(findings: &[Finding]) -> bool {
    findings
        .iter()
        .all(|finding| finding.status != Status::Fail)
}

fn server(deployment: &Deployment, settings: &Settings) -> Assessment {
    let mode = settings.mongodb.database_mode;
    match (deployment.flavor, mode) {
        (Flavor::MongoDb, DatabaseMode::Mongo) => {}
        (Flavor::MongoDb, DatabaseMode::Cosmos) => {
            return warn(
                format!("MongoDB {} in cosmos mode", deployment.version),
                "cosmos mode works on MongoDB but gives up what CosmosDB lacks (change streams \
                 as MongoDB has them, retryable writes); set mongodb.database-mode = \"mongo\"",
            );
        }
        (flavor, DatabaseMode::Mongo) => {
            return fail(
                format!("{} in mongo mode", flavor.name()),
                "set mongodb.database-mode = \"cosmos\" (see docs/DATA_LIFECYCLE.md)",
            );
        }
        (flavor, DatabaseMode::Cosmos) => {
            return ok(format!("{} in cosmos mode", flavor.name()));
        }
    }
    if deployment.too_old() {
        return fail(
            format!(
                "MongoDB {}, older than {}.{}",
                deployment.version, MINIMUM_VERSION.0, MINIMUM_VERSION.1
            ),
            "upgrade MongoDB",
        );
    }
    match major_minor(&deployment.version) {
        Some(_) => ok(format!("MongoDB {}", deployment.version)),
        None => warn(
            format!("MongoDB of unknown version ({:?})", deployment.version),
            "grant the user buildInfo so the version can be checked",
        ),
    }
}

/// A replica-set member: name, state (`PRIMARY`, `SECONDARY`, ...) and whether it is healthy.
type Member = (String, String, bool);

/// Members and their states from `replSetGetStatus` (`name`, `stateStr`, `health`), or none
/// when the user may not run it.
async fn members(database: &Database) -> Option<Vec<Member>> {
    let status = database
        .client()
        .database("admin")
        .run_command(doc! { "replSetGetStatus": 1 })
        .await
        .ok()?;
    let members = status.get_array("members").ok()?;
    Some(
        members
            .iter()
            .filter_map(Bson::as_document)
            .map(|member| {
                let healthy = member.get("health").and_then(as_f64).unwrap_or(0.0) >= 1.0;
                (
                    member.get_str("name").unwrap_or("?").to_owned(),
                    member.get_str("stateStr").unwrap_or("?").to_owned(),
                    healthy,
                )
            })
            .collect(),
    )
}

fn topology(members: Option<&[Member]>, deployment: &Deployment) -> Assessment {
    match &deployment.topology {
        Topology::Standalone => fail(
            "a standalone mongod: transactions and change streams need a replica set",
            STANDALONE_FIX,
        ),
        Topology::Sharded => ok("a sharded cluster (through mongos)"),
        Topology::ReplicaSet {
            name,
            primary,
            hosts,
            passives,
            arbiters,
        } => {
            let listed = match members {
                Some(members) => members
                    .iter()
                    .map(|(member, state, _)| format!("{member} {state}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                None => hosts
                    .iter()
                    .chain(passives)
                    .chain(arbiters)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
            };
            let Some(primary) = primary else {
                return fail(
                    format!("replica set {name} ({listed}) has no primary"),
                    "bring a majority of the members up; writes wait for a primary",
                );
            };
            let message = format!("replica set {name}: {listed}; primary {primary}");
            if deployment.data_bearing_members() < 3 {
                warn(
                    message,
                    "fine for development; in production run three data-bearing members, so \
                     a member can fail without stopping writes",
                )
            } else {
                ok(message)
            }
        }
    }
}

fn write_concern(
    members: Option<&[Member]>,
    deployment: &Deployment,
    settings: &Settings,
) -> Assessment {
    let concern = &settings.mongodb.write_concern;
    let configured = format!("w = {}, journal = {}", concern.w, concern.journal);
    let Topology::ReplicaSet { .. } = deployment.topology else {
        return warn(
            format!("{configured}: not checked on this topology"),
            "run check against the replica set's members to check the write concern",
        );
    };
    let Some(members) = members else {
        return warn(
            format!("{configured}: cannot read the members' states"),
            "grant the user replSetGetStatus (role clusterMonitor) so check can see them",
        );
    };
    match (assess_write_concern(&concern.w, members), concern.journal) {
        ((Status::Ok, message, _), false) => warn(
            format!(
                "{configured}: {message}; journal = false: an acknowledged write can be lost if \
                 mongod crashes"
            ),
            "set mongodb.write-concern.journal = true",
        ),
        ((status, message, fix), _) => (status, format!("{configured}: {message}"), fix),
    }
}

/// Whether `w` can be acknowledged by the healthy data-bearing members now.
fn assess_write_concern(w: &str, members: &[Member]) -> Assessment {
    let voting = members.len();
    let acknowledging = members
        .iter()
        .filter(|(_, state, healthy)| *healthy && (state == "PRIMARY" || state == "SECONDARY"))
        .count();
    let needed = match w {
        "majority" => voting / 2 + 1,
        number => match number.parse::<usize>() {
            Ok(number) => number,
            Err(_) => {
                return warn(
                    format!("tag set {w:?}: not checked"),
                    "check by hand that members carrying the tag are up",
                );
            }
        },
    };
    let message =
        format!("{acknowledging} of {voting} member(s) can acknowledge writes, {needed} needed");
    if acknowledging >= needed {
        ok(message)
    } else {
        fail(
            message,
            "bring members back (writes fail after mongodb.write-concern.timeout until then), \
             or lower mongodb.write-concern.w",
        )
    }
}

async fn read_concern(database: &Database, settings: &Settings) -> Assessment {
    let read = database
        .collection::<Document>(&settings.mongodb.collections.journal)
        .find_one(doc! {})
        .projection(doc! { "_id": 1 })
        .read_concern(ReadConcern::majority())
        .await;
    match read {
        Err(error) => fail(
            format!("a majority read failed: {}", mongo::describe(&error)),
            "read concern majority needs a replica set with majority reads enabled",
        ),
        Ok(_) if settings.mongodb.read_concern != "majority" => warn(
            format!(
                "majority reads work, but mongodb.read-concern = {:?}",
                settings.mongodb.read_concern
            ),
            "set mongodb.read-concern = \"majority\": otherwise a query can deliver an event \
             that a rollback after a failover removes",
        ),
        Ok(_) => ok("majority reads work (mongodb.read-concern = \"majority\")"),
    }
}

fn as_f64(value: &Bson) -> Option<f64> {
    match value {
        Bson::Double(value) => Some(*value),
        Bson::Int32(value) => Some(f64::from(*value)),
        Bson::Int64(value) => Some(*value as f64),
        _ => None,
    }
}

async fn oplog(database: &Database, deployment: &Deployment, settings: &Settings) -> Assessment {
    if !matches!(deployment.topology, Topology::ReplicaSet { .. }) {
        return ok("no oplog to check on this topology");
    }
    let local = database.client().database("local");
    let entries = local.collection::<Document>("oplog.rs");
    let time = |entry: Option<Document>| {
        entry.and_then(|entry| match entry.get("ts") {
            Some(Bson::Timestamp(ts)) => Some(u64::from(ts.time)),
            _ => None,
        })
    };
    let first = entries
        .find_one(doc! {})
        .sort(doc! { "$natural": 1 })
        .await
        .map(time);
    let last = entries
        .find_one(doc! {})
        .sort(doc! { "$natural": -1 })
        .await
        .map(time);
    let stats = local.run_command(doc! { "collStats": "oplog.rs" }).await;
    let downtime = settings.check.longest_projector_downtime;
    match (first, last, stats) {
        (Ok(Some(first)), Ok(Some(last)), Ok(stats)) => {
            let used = stats.get("size").and_then(as_f64).unwrap_or(0.0);
            let capacity = stats.get("maxSize").and_then(as_f64).unwrap_or(0.0);
            assess_oplog(
                Duration::from_secs(last.saturating_sub(first)),
                used,
                capacity,
                downtime,
            )
        }
        (Err(error), _, _) | (_, Err(error), _) | (_, _, Err(error)) => warn(
            format!("cannot read the oplog: {}", mongo::describe(&error)),
            "grant the user read on the local database (role clusterMonitor) so check can \
             measure the oplog window",
        ),
        _ => warn(
            "the oplog is empty",
            "run check again once the set has been written to",
        ),
    }
}

/// The oplog's window against the longest projector downtime. An oplog that is not full yet
/// reaches back to the set's start; its window is estimated from how fast it fills.
fn assess_oplog(window: Duration, used: f64, capacity: f64, downtime: Duration) -> Assessment {
    let mib = |bytes: f64| bytes / (1024.0 * 1024.0);
    let full = capacity > 0.0 && used >= capacity * 0.9;
    let (window, how) = if full || used <= 0.0 {
        (
            window,
            format!("window {}", humantime::format_duration(window)),
        )
    } else {
        let estimate = Duration::from_secs_f64(window.as_secs_f64() * capacity / used);
        (
            estimate,
            format!(
                "{:.0} of {:.0} MiB used in {}: a full oplog would reach back about {} at this rate",
                mib(used),
                mib(capacity),
                humantime::format_duration(window),
                short_duration_rounded(estimate)
            ),
        )
    };
    let message = format!(
        "{how}; check.longest-projector-downtime = {}",
        humantime::format_duration(downtime)
    );
    if window >= downtime {
        ok(message)
    } else {
        fail(
            message,
            "grow the oplog (replSetResizeOplog, or --oplogSize) or set \
             oplogMinRetentionHours: a projector away longer cannot resume its change-stream \
             offset exactly and falls back to a query-based catch-up",
        )
    }
}

/// An estimate, rounded to what is worth saying: days, hours or minutes.
fn short_duration_rounded(duration: Duration) -> String {
    let seconds = duration.as_secs();
    let unit = match seconds {
        s if s >= 2 * 86_400 => 86_400,
        s if s >= 2 * 3_600 => 3_600,
        _ => 60,
    };
    short_duration(Duration::from_secs((seconds + unit / 2) / unit * unit))
}

async fn clock(database: &Database, settings: &Settings) -> Assessment {
    let millis = |time: SystemTime| {
        time.duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_millis() as i64)
    };
    let before = millis(SystemTime::now());
    let hello = database.run_command(doc! { "hello": 1 }).await;
    let after = millis(SystemTime::now());
    let server = match hello.as_ref().map(|hello| hello.get_datetime("localTime")) {
        Ok(Ok(time)) => time.timestamp_millis(),
        Ok(Err(_)) => return warn("the server did not say its time", "none: not checked"),
        Err(error) => {
            return warn(
                format!("cannot ask the server's time: {}", mongo::describe(error)),
                "run check again",
            );
        }
    };
    assess_clock(
        server - (before + after) / 2,
        (after - before) / 2 + 1,
        settings.read_journal.allowed_time_drift,
    )
}

/// `skew_ms` (the server's clock minus this host's, give or take `uncertainty_ms`) against
/// the polling window: two servers whose clocks differ by more than
/// `read-journal.allowed-time-drift` can make polling live queries miss events, so each host
/// may be off by at most half of it.
fn assess_clock(skew_ms: i64, uncertainty_ms: i64, drift: Duration) -> Assessment {
    let off = skew_ms
        .unsigned_abs()
        .saturating_sub(uncertainty_ms.unsigned_abs());
    let limit = drift.as_millis() as u64 / 2;
    let message = format!(
        "this host's clock is {} ms {} MongoDB's (± {uncertainty_ms} ms); \
         read-journal.allowed-time-drift = {}",
        skew_ms.unsigned_abs(),
        if skew_ms > 0 { "behind" } else { "ahead of" },
        humantime::format_duration(drift)
    );
    let fix = "synchronise the clocks (NTP, chrony) of every eventjournal host and MongoDB, \
               or raise read-journal.allowed-time-drift";
    if off > limit {
        fail(message, fix)
    } else if off > limit / 2 {
        warn(message, fix)
    } else {
        ok(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(state: &str, healthy: bool) -> Member {
        ("h:1".to_owned(), state.to_owned(), healthy)
    }

    #[test]
    fn a_majority_needs_that_many_acknowledging_members() {
        let three = [
            member("PRIMARY", true),
            member("SECONDARY", true),
            member("SECONDARY", true),
        ];
        assert_eq!(assess_write_concern("majority", &three).0, Status::Ok);
        assert_eq!(assess_write_concern("3", &three).0, Status::Ok);
        let one_down = [
            member("PRIMARY", true),
            member("(not reachable/healthy)", false),
            member("SECONDARY", true),
        ];
        assert_eq!(assess_write_concern("majority", &one_down).0, Status::Ok);
        assert_eq!(assess_write_concern("3", &one_down).0, Status::Fail);
        // Primary, secondary and arbiter with the secondary down: the arbiter votes but
        // cannot acknowledge, so majority writes block.
        let arbiter = [
            member("PRIMARY", true),
            member("(not reachable/healthy)", false),
            member("ARBITER", true),
        ];
        assert_eq!(assess_write_concern("majority", &arbiter).0, Status::Fail);
        assert_eq!(assess_write_concern("dc", &three).0, Status::Warn);
    }

    #[test]
    fn an_oplog_shorter_than_the_downtime_fails() {
        let hour = Duration::from_secs(3600);
        let day = 24 * hour;
        // Full: the window is what it is.
        assert_eq!(assess_oplog(2 * day, 990.0, 1000.0, day).0, Status::Ok);
        assert_eq!(assess_oplog(hour, 990.0, 1000.0, day).0, Status::Fail);
        // A tenth full after an hour: about ten hours when full.
        let (status, message, _) = assess_oplog(hour, 100.0, 1000.0, day);
        assert_eq!(status, Status::Fail, "{message}");
        assert!(message.contains("about 10h"), "{message}");
        assert_eq!(assess_oplog(hour, 10.0, 1000.0, day).0, Status::Ok);
    }

    #[test]
    fn a_clock_off_by_more_than_half_the_drift_fails() {
        let drift = Duration::from_secs(2);
        assert_eq!(assess_clock(3, 1, drift).0, Status::Ok);
        assert_eq!(assess_clock(-600, 1, drift).0, Status::Warn);
        assert_eq!(assess_clock(1_500, 1, drift).0, Status::Fail);
        assert_eq!(assess_clock(-1_500, 1, drift).0, Status::Fail);
        // Within the measurement's uncertainty: not held against the clock.
        assert_eq!(assess_clock(1_500, 1_000, drift).0, Status::Ok);
    }
}
