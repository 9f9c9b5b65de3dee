//! A mongod of a test's own, for tests that must kill or reconfigure MongoDB: the shared test
//! mongod must stay up for every other test. Same binary as `cargo xtask` installs, a
//! single-node replica set in a fresh directory, killed with the test.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use mongodb::bson::doc;

use super::free_port;

pub struct OwnMongod {
    child: Option<Child>,
    pub port: u16,
    directory: PathBuf,
    extra_args: Vec<String>,
    /// Options added to every connection string (e.g. TLS files).
    client_options: String,
    /// Started with `--replSet rs0` (else a standalone).
    replica_set: bool,
}

fn mongod_binary() -> PathBuf {
    let binary =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".local/mongodb/fiftyone/db/bin/mongod");
    assert!(
        binary.is_file(),
        "{} is missing: run the suite with `make test` (it installs mongod)",
        binary.display()
    );
    binary
}

/// A new directory for a mongod's data and log.
pub(crate) fn fresh_directory(name: &str) -> PathBuf {
    let directory = std::env::temp_dir().join(format!(
        "eventjournal-mongod-{name}-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(directory.join("data")).unwrap();
    directory
}

/// The command every test mongod starts with: data and log in `directory`, on loopback, a
/// 256 MB cache and a small journal. WiredTiger's default journal preallocates three 100 MB
/// files, 300 MB per mongod before it stores anything; a failover test runs three, and a CI
/// machine short of disk saw them abort at start (`No space left on device`) and refuse every
/// connection. 10 MB files, none preallocated: about 11 MB.
pub(crate) fn mongod_command(directory: &Path, port: u16, log: std::fs::File) -> Command {
    let mut command = Command::new(mongod_binary());
    command
        .args(["--bind_ip", "127.0.0.1"])
        .args(["--port", &port.to_string()])
        .arg("--dbpath")
        .arg(directory.join("data"))
        .args(["--wiredTigerCacheSizeGB", "0.25"])
        .args([
            "--wiredTigerEngineConfigString",
            "log=(file_max=10MB,prealloc=false)",
        ])
        .stdout(log)
        .stderr(Stdio::null());
    command
}

/// If `child` has exited: its exit status and the last errors of its log, for the panic of a
/// test that waited for it (the directory, log and all, is removed when the test ends).
pub(crate) fn exited(child: &mut Child, log: &Path) -> Option<String> {
    let status = child.try_wait().ok()??;
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let errors: Vec<&str> = text
        .lines()
        .filter(|line| line.contains(r#""s":"F""#) || line.contains(r#""s":"E""#))
        .filter(|line| !line.contains(r#""msg":"Frame""#) && !line.contains("BACKTRACE"))
        .collect();
    let last: Vec<String> = errors[errors.len().saturating_sub(4)..]
        .iter()
        .map(|line| line.chars().take(600).collect())
        .collect();
    Some(format!(
        "mongod exited ({status}); its last errors:\n{}",
        last.join("\n")
    ))
}

impl OwnMongod {
    /// Starts a single-node replica set and waits until it is PRIMARY.
    pub async fn start(name: &str, extra_args: &[String], client_options: &str) -> Self {
        let directory = fresh_directory(name);
        let mut mongod = Self {
            child: None,
            port: free_port(),
            directory,
            extra_args: extra_args.to_vec(),
            client_options: client_options.to_owned(),
            replica_set: true,
        };
        mongod.spawn();
        let admin = mongod.direct_client().await.database("admin");
        let initiate = doc! { "replSetInitiate": {
            "_id": "rs0",
            "members": [ { "_id": 0, "host": format!("127.0.0.1:{}", mongod.port) } ],
        } };
        let mut attempts = 0;
        while let Err(error) = admin.run_command(initiate.clone()).await {
            attempts += 1;
            mongod.assert_running();
            assert!(attempts < 100, "replSetInitiate failed: {error}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        mongod.wait_for_primary().await;
        mongod
    }

    /// A standalone mongod (no replica set), as a plain container starts it; waits until it
    /// answers.
    pub async fn start_standalone(name: &str) -> Self {
        let directory = fresh_directory(name);
        let mut mongod = Self {
            child: None,
            port: free_port(),
            directory,
            extra_args: Vec::new(),
            client_options: String::new(),
            replica_set: false,
        };
        mongod.spawn();
        let admin = mongod.direct_client().await.database("admin");
        for _ in 0..300 {
            if admin.run_command(doc! { "ping": 1 }).await.is_ok() {
                return mongod;
            }
            mongod.assert_running();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("standalone mongod did not answer");
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.directory.join("mongod.log")).unwrap();
        let mut command = mongod_command(&self.directory, self.port, log);
        if self.replica_set {
            command.args(["--replSet", "rs0"]);
        }
        let child = command.args(&self.extra_args).spawn().unwrap();
        self.child = Some(child);
    }

    /// The replica-set URI clients use.
    pub fn uri(&self) -> String {
        if !self.replica_set {
            return format!("mongodb://127.0.0.1:{}/{}", self.port, self.client_options);
        }
        format!(
            "mongodb://127.0.0.1:{}/?replicaSet=rs0{}",
            self.port, self.client_options
        )
    }

    async fn direct_client(&self) -> mongodb::Client {
        let uri = format!(
            "mongodb://127.0.0.1:{}/?directConnection=true&serverSelectionTimeoutMS=2000{}",
            self.port, self.client_options
        );
        mongodb::Client::with_uri_str(uri).await.unwrap()
    }

    /// Panics, saying why, if the process has exited.
    fn assert_running(&mut self) {
        let log = self.directory.join("mongod.log");
        if let Some(child) = self.child.as_mut()
            && let Some(why) = exited(child, &log)
        {
            panic!("own mongod on port {}: {why}", self.port);
        }
    }

    async fn wait_for_primary(&mut self) {
        let admin = self.direct_client().await.database("admin");
        for _ in 0..300 {
            if let Ok(reply) = admin.run_command(doc! { "hello": 1 }).await
                && reply.get_bool("isWritablePrimary").unwrap_or(false)
            {
                return;
            }
            self.assert_running();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!(
            "own mongod did not become PRIMARY; see {}",
            self.directory.join("mongod.log").display()
        );
    }

    /// SIGKILL: no shutdown, no flush beyond what the journal already holds.
    pub fn kill_9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// Starts again on the same port and data, and waits until it is PRIMARY.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "restart after kill_9");
        // The port is free again once the killed process is reaped.
        self.spawn();
        self.wait_for_primary().await;
    }
}

impl Drop for OwnMongod {
    fn drop(&mut self) {
        self.kill_9();
        let _ = std::fs::remove_dir_all(&self.directory);
    }
}
