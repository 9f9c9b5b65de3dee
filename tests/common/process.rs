//! The `eventjournal` binary as a child process, for tests that kill it or measure it alone.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{answers_health, mongodb_uri, wait_until};

/// A running `eventjournal serve`; killed when dropped.
pub struct ServerProcess(Child);

impl ServerProcess {
    /// `eventjournal serve` on `port` against `database`, with the suite's fast read-journal
    /// settings (500 ms drift, 50 ms polls) and `env` on top (`EVENTJOURNAL_...` settings).
    pub fn spawn(port: u16, database: &str, env: &[(&str, &str)]) -> Self {
        Self::spawn_on(&mongodb_uri(), port, database, env)
    }

    /// The same against the MongoDB at `uri` (a replica set of the test's own, or the test
    /// mongod with an `appName` a fail point picks out).
    pub fn spawn_on(uri: &str, port: u16, database: &str, env: &[(&str, &str)]) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_eventjournal"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--mongodb-uri", uri, "--database", database])
            .env("RUST_LOG", "warn")
            .env("EVENTJOURNAL_SERVER__METRICS_LISTEN", "127.0.0.1:0")
            .env("EVENTJOURNAL_READ_JOURNAL__ALLOWED_TIME_DRIFT", "500ms")
            .env("EVENTJOURNAL_READ_JOURNAL__POLL_INTERVAL", "50ms")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        Self(child)
    }

    /// SIGKILL, and wait until it is gone.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// The server's resident memory (VmRSS), in bytes.
    pub fn resident_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.0.id())).unwrap();
        let line = status
            .lines()
            .find(|line| line.starts_with("VmRSS:"))
            .unwrap();
        line.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
            * 1024
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until the server at `url` answers health checks.
pub async fn wait_until_serving(url: &str) {
    wait_until(
        "the server answers health checks",
        Duration::from_secs(30),
        || answers_health(url),
    )
    .await;
}
