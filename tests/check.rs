//! `eventjournal check` and the first-run errors, against real mongods: the test replica set,
//! a standalone mongod of the test's own, and an address where nothing listens.

mod common;

use std::process::Command;

use common::own_mongod::OwnMongod;
use common::{free_port, mongodb_uri, unique_database};
use serde_json::Value;

const BINARY: &str = env!("CARGO_BIN_EXE_eventjournal");

struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn eventjournal(args: &[&str], env: &[(&str, &str)]) -> Ran {
    let output = Command::new(BINARY)
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "off")
        .env("EVENTJOURNAL_MONGODB__SERVER_SELECTION_TIMEOUT", "2s")
        .output()
        .unwrap();
    Ran {
        code: output.status.code(),
        stdout: String::from_utf8(output.stdout).unwrap(),
        stderr: String::from_utf8(output.stderr).unwrap(),
    }
}

/// `eventjournal <args> --mongodb-uri <uri> --database <database>`.
fn run_on(args: &[&str], uri: &str, database: &str, env: &[(&str, &str)]) -> Ran {
    let mut all = args.to_vec();
    all.extend(["--mongodb-uri", uri, "--database", database]);
    eventjournal(&all, env)
}

/// `check --json`: the exit code and the report.
fn check(uri: &str, database: &str, env: &[(&str, &str)]) -> (Option<i32>, Value) {
    let ran = run_on(&["check", "--json"], uri, database, env);
    let report: Value = serde_json::from_str(&ran.stdout)
        .unwrap_or_else(|error| panic!("not JSON ({error}): {}\n{}", ran.stdout, ran.stderr));
    (ran.code, report)
}

fn create_indexes(uri: &str, database: &str) {
    let created = run_on(&["indexes", "create"], uri, database, &[]);
    assert_eq!(created.code, Some(0), "{}", created.stderr);
}

/// The findings of one check.
fn findings<'a>(report: &'a Value, name: &str) -> Vec<&'a Value> {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|finding| finding["check"] == name)
        .collect()
}

fn status_of(report: &Value, name: &str) -> String {
    let found = findings(report, name);
    assert_eq!(found.len(), 1, "one {name} finding in {report:#}");
    found[0]["status"].as_str().unwrap().to_owned()
}

/// No driver report in text meant for people.
fn assert_no_driver_dump(text: &str) {
    for dump in [
        "RawDocumentBuf",
        "Kind:",
        "labels:",
        "Topology:",
        "server response",
    ] {
        assert!(!text.contains(dump), "{dump:?} in {text}");
    }
}

/// A short downtime, so the test mongod's young oplog passes.
const SHORT_DOWNTIME: (&str, &str) = ("EVENTJOURNAL_CHECK__LONGEST_PROJECTOR_DOWNTIME", "1m");

#[test]
fn a_ready_replica_set_passes_with_a_warning_for_its_single_member() {
    let database = unique_database("check_ready");
    let uri = mongodb_uri();
    create_indexes(&uri, &database);

    let (code, report) = check(&uri, &database, &[SHORT_DOWNTIME]);
    assert_eq!(code, Some(0), "{report:#}");
    assert_eq!(report["ok"], true);
    for name in [
        "connection",
        "server",
        "write-concern",
        "read-concern",
        "indexes",
        "oplog",
        "clock",
    ] {
        assert_eq!(status_of(&report, name), "ok", "{name}: {report:#}");
    }
    let topology = &findings(&report, "topology")[0];
    assert_eq!(topology["status"], "warn", "{report:#}");
    assert!(
        topology["message"].as_str().unwrap().contains("PRIMARY"),
        "{report:#}"
    );
    assert!(topology["fix"].as_str().unwrap().contains("three"));

    // The text form: one line per finding, the fix under it, and the totals.
    let text = run_on(&["check"], &uri, &database, &[SHORT_DOWNTIME]);
    assert_eq!(text.code, Some(0), "{}", text.stdout);
    assert!(text.stdout.contains("\nok    indexes "), "{}", text.stdout);
    assert!(text.stdout.contains("\nwarn  topology "), "{}", text.stdout);
    assert!(
        text.stdout.contains("fix: fine for development"),
        "{}",
        text.stdout
    );
    assert!(
        text.stdout.ends_with(" ok, 1 warn, 0 fail\n"),
        "{}",
        text.stdout
    );
}

#[test]
fn a_missing_index_fails_the_check_until_it_is_created() {
    let database = unique_database("check_indexes");
    let uri = mongodb_uri();
    let (code, report) = check(&uri, &database, &[SHORT_DOWNTIME]);
    assert_eq!(code, Some(1), "{report:#}");
    assert_eq!(report["ok"], false);
    let indexes = &findings(&report, "indexes")[0];
    assert_eq!(indexes["status"], "fail");
    assert!(
        indexes["message"]
            .as_str()
            .unwrap()
            .contains("journal.pid_seqNr"),
        "{report:#}"
    );
    assert!(
        indexes["fix"]
            .as_str()
            .unwrap()
            .contains("eventjournal indexes create")
    );
    create_indexes(&uri, &database);
    let (code, report) = check(&uri, &database, &[SHORT_DOWNTIME]);
    assert_eq!(status_of(&report, "indexes"), "ok", "{report:#}");
    assert_eq!(code, Some(0), "{report:#}");
}

#[test]
fn an_oplog_shorter_than_the_longest_projector_downtime_fails() {
    let database = unique_database("check_oplog");
    let uri = mongodb_uri();
    // The test mongod's oplog reaches back hours at most, never a century.
    let (code, report) = check(
        &uri,
        &database,
        &[("EVENTJOURNAL_CHECK__LONGEST_PROJECTOR_DOWNTIME", "100years")],
    );
    assert_eq!(code, Some(1));
    let oplog = &findings(&report, "oplog")[0];
    assert_eq!(oplog["status"], "fail", "{report:#}");
    assert!(
        oplog["fix"]
            .as_str()
            .unwrap()
            .contains("replSetResizeOplog")
    );
}

#[test]
fn a_ttl_index_that_differs_from_the_purge_settings_fails() {
    let database = unique_database("check_purge");
    let uri = mongodb_uri();
    let expire = ("EVENTJOURNAL_PURGE__JOURNAL_EXPIRE_AFTER", "1day");
    let purge_finding = |report: &Value| {
        findings(report, "purge")
            .into_iter()
            .find(|finding| {
                finding["message"]
                    .as_str()
                    .unwrap()
                    .contains("journal.deletedAt")
            })
            .cloned()
            .unwrap()
    };
    let (_, report) = check(&uri, &database, &[SHORT_DOWNTIME, expire]);
    let journal = purge_finding(&report);
    assert_eq!(journal["status"], "fail", "{report:#}");
    assert!(
        journal["message"]
            .as_str()
            .unwrap()
            .contains("no TTL index")
    );

    // `purge setup` without flags creates what [purge] configures.
    let setup = run_on(&["purge", "setup"], &uri, &database, &[expire]);
    assert_eq!(setup.code, Some(0), "{}", setup.stderr);
    let (_, report) = check(&uri, &database, &[SHORT_DOWNTIME, expire]);
    assert_eq!(purge_finding(&report)["status"], "ok", "{report:#}");

    // The setting changes, the index does not: fail, naming both.
    let (code, report) = check(
        &uri,
        &database,
        &[
            SHORT_DOWNTIME,
            ("EVENTJOURNAL_PURGE__JOURNAL_EXPIRE_AFTER", "2days"),
        ],
    );
    assert_eq!(code, Some(1));
    let journal = purge_finding(&report);
    assert_eq!(journal["status"], "fail", "{report:#}");
    let message = journal["message"].as_str().unwrap();
    assert!(
        message.contains("1d") && message.contains("2d"),
        "{message}"
    );

    // A TTL index no setting describes: a warning.
    let (_, report) = check(&uri, &database, &[SHORT_DOWNTIME]);
    assert_eq!(purge_finding(&report)["status"], "warn", "{report:#}");
}

#[test]
fn cosmos_mode_checks_the_ts_index_its_ttl_needs() {
    let database = unique_database("check_cosmos");
    let uri = mongodb_uri();
    let cosmos = [
        SHORT_DOWNTIME,
        ("EVENTJOURNAL_MONGODB__DATABASE_MODE", "cosmos"),
        ("EVENTJOURNAL_WRITE_JOURNAL__COSMOS_TTL", "1h"),
    ];
    let journal_ttl = |report: &Value| {
        findings(report, "purge")
            .into_iter()
            .find(|finding| finding["message"].as_str().unwrap().contains("journal._ts"))
            .cloned()
            .unwrap()
    };
    let (code, report) = check(&uri, &database, &cosmos);
    assert_eq!(code, Some(1));
    assert_eq!(journal_ttl(&report)["status"], "fail", "{report:#}");
    // A genuine MongoDB in cosmos mode works, with a warning.
    assert_eq!(status_of(&report, "server"), "warn", "{report:#}");
    let setup = run_on(
        &["purge", "setup", "--journal-expire-after", "1h"],
        &uri,
        &database,
        &cosmos,
    );
    assert_eq!(setup.code, Some(0), "{}", setup.stderr);
    let (_, report) = check(&uri, &database, &cosmos);
    assert_eq!(journal_ttl(&report)["status"], "ok", "{report:#}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_standalone_mongod_is_refused_with_the_commands_that_make_it_a_replica_set() {
    let mongod = OwnMongod::start_standalone("standalone").await;
    let uri = mongod.uri();
    let database = unique_database("standalone");

    let served = run_on(&["serve", "--listen", "127.0.0.1:0"], &uri, &database, &[]);
    assert_eq!(served.code, Some(1), "{}", served.stderr);
    let error = &served.stderr;
    assert!(error.starts_with("error: MongoDB at "), "{error}");
    assert!(error.contains("is a standalone server"), "{error}");
    assert!(error.contains("mongod --replSet rs0"), "{error}");
    assert!(error.contains("rs.initiate()"), "{error}");
    assert_no_driver_dump(error);

    // The operator commands say the same (not MongoDB's "Standalones can't specify
    // commitQuorum").
    let indexes = run_on(&["indexes", "create"], &uri, &database, &[]);
    assert_eq!(indexes.code, Some(1));
    assert!(
        indexes.stderr.contains("is a standalone server"),
        "{}",
        indexes.stderr
    );

    let (code, report) = check(&uri, &database, &[SHORT_DOWNTIME]);
    assert_eq!(code, Some(1));
    let topology = &findings(&report, "topology")[0];
    assert_eq!(topology["status"], "fail", "{report:#}");
    assert!(topology["fix"].as_str().unwrap().contains("rs.initiate()"));
}

#[test]
fn a_write_concern_the_set_cannot_satisfy_is_refused_at_start_up() {
    let database = unique_database("unsatisfiable_w");
    let uri = mongodb_uri();
    let three = ("EVENTJOURNAL_MONGODB__WRITE_CONCERN__W", "3");
    let served = run_on(
        &["serve", "--listen", "127.0.0.1:0"],
        &uri,
        &database,
        &[three],
    );
    assert_eq!(served.code, Some(1));
    assert!(
        served.stderr.contains("mongodb.write-concern.w = 3")
            && served.stderr.contains("1 data-bearing member"),
        "{}",
        served.stderr
    );
    let (code, report) = check(&uri, &database, &[SHORT_DOWNTIME, three]);
    assert_eq!(code, Some(1));
    assert_eq!(status_of(&report, "write-concern"), "fail", "{report:#}");
}

#[test]
fn an_unreachable_mongodb_fails_the_check_with_the_servers_answer() {
    let closed_port = free_port();
    let uri = format!("mongodb://127.0.0.1:{closed_port}/?directConnection=true");
    let (code, report) = check(&uri, "unreachable", &[]);
    assert_eq!(code, Some(1));
    let findings = report["findings"].as_array().unwrap();
    assert_eq!(findings.len(), 1, "nothing else can be checked: {report:#}");
    assert_eq!(findings[0]["check"], "connection");
    assert_eq!(findings[0]["status"], "fail");
    let message = findings[0]["message"].as_str().unwrap();
    assert!(message.contains("Connection refused"), "{message}");
    assert_no_driver_dump(message);
}

#[test]
fn a_command_mongodb_refuses_is_its_message_and_code_name_not_the_drivers_report() {
    let database = unique_database("refused_command");
    let uri = mongodb_uri();
    // One member cannot make up a commit quorum of five.
    let created = run_on(
        &["indexes", "create", "--commit-quorum", "5"],
        &uri,
        &database,
        &[],
    );
    assert_eq!(created.code, Some(1));
    let error = &created.stderr;
    assert!(
        error.starts_with("error: creating the journal indexes: "),
        "{error}"
    );
    assert!(
        error.contains("(UnsatisfiableCommitQuorum, code 278)"),
        "{error}"
    );
    assert_eq!(error.lines().count(), 1, "{error}");
    assert_no_driver_dump(error);
}
