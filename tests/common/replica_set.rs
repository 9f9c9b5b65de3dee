//! A three-member (or n-member) replica set of a test's own, for failover tests: members can be
//! stepped down, killed with SIGKILL, restarted, and cut off from replication. Same binary and
//! the same replica-set settings as `cargo xtask mongod-start --members 3`: equal priorities (no
//! priority takeover after a member rejoins, so one election per fault) and a 1 s election
//! timeout, so a failover takes a second or two instead of ten.

use std::path::PathBuf;
use std::process::Child;
use std::time::Duration;

use mongodb::bson::{Document, doc};

use super::free_port;
use super::own_mongod::{exited, fresh_directory, mongod_command};

/// `electionTimeoutMillis` and `heartbeatIntervalMillis` of the test sets (MongoDB's defaults
/// are 10 s and 2 s).
pub const ELECTION_TIMEOUT: Duration = Duration::from_millis(1000);
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(500);

struct Member {
    port: u16,
    child: Option<Child>,
}

pub struct ReplicaSet {
    directory: PathBuf,
    members: Vec<Member>,
}

impl ReplicaSet {
    /// Starts `members` mongods, initiates the set and waits until it has a primary and every
    /// member is PRIMARY or SECONDARY.
    pub async fn start(name: &str, members: usize) -> Self {
        let directory = fresh_directory(name);
        let mut set = Self {
            directory,
            members: (0..members)
                .map(|_| Member {
                    port: free_port(),
                    child: None,
                })
                .collect(),
        };
        for index in 0..members {
            set.spawn(index);
        }
        let hosts: Vec<Document> = set
            .members
            .iter()
            .enumerate()
            .map(|(id, member)| doc! { "_id": id as i32, "host": format!("127.0.0.1:{}", member.port) })
            .collect();
        let initiate = doc! { "replSetInitiate": {
            "_id": "rs0",
            "members": hosts,
            "settings": {
                "electionTimeoutMillis": ELECTION_TIMEOUT.as_millis() as i32,
                "heartbeatIntervalMillis": HEARTBEAT_INTERVAL.as_millis() as i32,
            },
        } };
        let admin = set.admin(0).await;
        let mut attempts = 0;
        while let Err(error) = admin.run_command(initiate.clone()).await {
            attempts += 1;
            set.assert_running();
            assert!(attempts < 150, "replSetInitiate failed: {error}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        set.primary().await;
        for index in 0..members {
            set.wait_until_member(index).await;
        }
        set
    }

    fn member_directory(&self, index: usize) -> PathBuf {
        self.directory.join(format!("member-{index}"))
    }

    fn spawn(&mut self, index: usize) {
        let directory = self.member_directory(index);
        std::fs::create_dir_all(directory.join("data")).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(directory.join("mongod.log"))
            .unwrap();
        let member = &mut self.members[index];
        let child = mongod_command(&directory, member.port, log)
            .args(["--replSet", "rs0", "--oplogSize", "256"])
            .args(["--setParameter", "enableTestCommands=1"])
            .spawn()
            .unwrap();
        member.child = Some(child);
    }

    /// Panics, saying why, if a member that should be running has exited.
    fn assert_running(&mut self) {
        for index in 0..self.members.len() {
            let log = self.log(index);
            if let Some(child) = self.members[index].child.as_mut()
                && let Some(why) = exited(child, &log)
            {
                panic!("member {index} (port {}): {why}", self.members[index].port);
            }
        }
    }

    /// The connection string clients use: every member, as production URIs list them.
    pub fn uri(&self) -> String {
        let hosts: Vec<String> = self
            .members
            .iter()
            .map(|member| format!("127.0.0.1:{}", member.port))
            .collect();
        format!("mongodb://{}/?replicaSet=rs0", hosts.join(","))
    }

    /// `admin` on one member alone (a direct connection).
    pub async fn admin(&self, index: usize) -> mongodb::Database {
        self.direct(index).await.database("admin")
    }

    /// A direct connection to one member: reads see what that member has (`local`), even on
    /// a secondary.
    pub async fn direct(&self, index: usize) -> mongodb::Client {
        let uri = format!(
            "mongodb://127.0.0.1:{}/?directConnection=true&serverSelectionTimeoutMS=2000&connectTimeoutMS=2000",
            self.members[index].port
        );
        mongodb::Client::with_uri_str(uri).await.unwrap()
    }

    async fn hello(&self, index: usize) -> Option<Document> {
        self.members[index].child.as_ref()?;
        self.admin(index)
            .await
            .run_command(doc! { "hello": 1 })
            .await
            .ok()
    }

    /// Waits (up to 60 s) until one member is primary, and returns it.
    pub async fn primary(&self) -> usize {
        for _ in 0..300 {
            for index in 0..self.members.len() {
                if let Some(hello) = self.hello(index).await
                    && hello.get_bool("isWritablePrimary").unwrap_or(false)
                {
                    return index;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!(
            "no primary within 60 s; see the logs under {}",
            self.directory.display()
        );
    }

    /// A running member other than the primary.
    pub async fn a_secondary(&self) -> usize {
        let primary = self.primary().await;
        (0..self.members.len())
            .find(|index| *index != primary && self.members[*index].child.is_some())
            .expect("a running secondary")
    }

    /// Waits (up to 60 s) until member `index` is PRIMARY or SECONDARY.
    pub async fn wait_until_member(&self, index: usize) {
        for _ in 0..300 {
            if let Some(hello) = self.hello(index).await
                && (hello.get_bool("isWritablePrimary").unwrap_or(false)
                    || hello.get_bool("secondary").unwrap_or(false))
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!(
            "member {index} did not become PRIMARY or SECONDARY within 60 s; see {}",
            self.member_directory(index).join("mongod.log").display()
        );
    }

    /// `replSetStepDown` on the primary: it steps down once a secondary has caught up and is not
    /// electable for `seconds`.
    pub async fn step_down(&self, index: usize, seconds: i32) {
        let reply = self
            .admin(index)
            .await
            .run_command(doc! { "replSetStepDown": seconds, "secondaryCatchUpPeriodSecs": 10 })
            .await;
        // MongoDB closes connections as it steps down: an error here can be success.
        if let Err(error) = reply {
            let stepped_down = self
                .hello(index)
                .await
                .is_some_and(|hello| !hello.get_bool("isWritablePrimary").unwrap_or(true));
            assert!(stepped_down, "replSetStepDown failed: {error}");
        }
    }

    /// SIGKILL: no shutdown, no step-down, no flush beyond what the journal already holds.
    pub fn kill_9(&mut self, index: usize) {
        if let Some(mut child) = self.members[index].child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// Starts a killed member again on its port and data (it rejoins as a secondary, rolling
    /// back what it had alone); does not wait.
    pub fn restart(&mut self, index: usize) {
        assert!(self.members[index].child.is_none(), "restart after kill_9");
        self.spawn(index);
    }

    /// Stops member `index` from fetching the oplog (the `stopReplProducer` fail point, as
    /// MongoDB's own rollback tests do): writes on the primary stop reaching it.
    pub async fn stop_replication(&self, index: usize) {
        self.fail_point(index, "stopReplProducer", "alwaysOn").await;
    }

    pub async fn resume_replication(&self, index: usize) {
        self.fail_point(index, "stopReplProducer", "off").await;
    }

    async fn fail_point(&self, index: usize, name: &str, mode: &str) {
        self.admin(index)
            .await
            .run_command(doc! { "configureFailPoint": name, "mode": mode })
            .await
            .unwrap_or_else(|error| panic!("configureFailPoint {name} {mode}: {error}"));
    }

    /// Where member `index` logs (to look for its rollback).
    pub fn log(&self, index: usize) -> PathBuf {
        self.member_directory(index).join("mongod.log")
    }
}

impl Drop for ReplicaSet {
    fn drop(&mut self) {
        for index in 0..self.members.len() {
            self.kill_9(index);
        }
        let _ = std::fs::remove_dir_all(&self.directory);
    }
}
