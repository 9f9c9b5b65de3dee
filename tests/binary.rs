//! The `eventjournal` binary as an operator runs it: signals, exit codes, error lines.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{free_port, mongodb_uri, unique_database};

const BINARY: &str = env!("CARGO_BIN_EXE_eventjournal");

#[test]
fn sigterm_stops_the_server_with_exit_code_zero() {
    let mut child = Command::new(BINARY)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--mongodb-uri",
            &mongodb_uri(),
        ])
        .args(["--database", &unique_database("sigterm")])
        .env("RUST_LOG", "info")
        .env("EVENTJOURNAL_SERVER__METRICS_LISTEN", "127.0.0.1:0")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read the log on a thread, so a server that never logs fails the test instead of hanging it.
    let log = BufReader::new(child.stderr.take().unwrap());
    let (lines, received) = mpsc::channel();
    std::thread::spawn(move || {
        for line in log.lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                return;
            }
        }
    });
    let next_line = |what: &str| match received.recv_timeout(Duration::from_secs(60)) {
        Ok(line) => line,
        Err(_) => panic!("no log line while waiting for {what:?}"),
    };
    let serving = loop {
        let line = next_line("eventjournal serving gRPC");
        if line.contains("eventjournal serving gRPC") {
            break line;
        }
    };
    assert!(
        !serving.contains('\u{1b}'),
        "no terminal colour codes in piped logs: {serving:?}"
    );
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    while !next_line("SIGTERM received").contains("SIGTERM received") {}
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the server did not exit within 30 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM");
}

#[test]
fn bad_configuration_is_one_clear_error_and_a_non_zero_exit() {
    let output = Command::new(BINARY)
        .args(["serve", "--mongodb-uri", &mongodb_uri()])
        .env("EVENTJOURNAL_MONGODB__RETRY__MAX_ATTEMPTS", "0")
        .env("EVENTJOURNAL_READ_JOURNAL__POLL_INTERVAL", "0s")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(
        stderr,
        "error: invalid configuration:\n  \
         - mongodb.retry.max-attempts = 0: must be 1 to 100 (it counts the first attempt)\n  \
         - read-journal.poll-interval = \"0s\": must be above 0\n"
    );
}

#[test]
fn unreachable_mongodb_is_one_clear_error_and_a_non_zero_exit() {
    let closed_port = free_port();
    let output = Command::new(BINARY)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args([
            "--mongodb-uri",
            &format!("mongodb://127.0.0.1:{closed_port}/?directConnection=true"),
        ])
        .env("EVENTJOURNAL_MONGODB__SERVER_SELECTION_TIMEOUT", "300ms")
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.starts_with(&format!(
            "error: cannot reach MongoDB at mongodb://127.0.0.1:{closed_port}/?directConnection=true \
             (waited mongodb.server-selection-timeout = 300ms): "
        )),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // What the server answered, not the driver's topology report.
    assert!(stderr.contains("Connection refused"), "{stderr}");
    for dump in ["Kind:", "labels:", "Topology:", "RawDocumentBuf"] {
        assert!(!stderr.contains(dump), "{dump:?} in {stderr}");
    }
}

#[test]
fn help_describes_serve() {
    let output = Command::new(BINARY)
        .args(["serve", "--help"])
        .output()
        .unwrap();
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    for flag in [
        "--config <FILE>",
        "--listen <ADDR>",
        "--mongodb-uri <URI>",
        "--database <NAME>",
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
}
