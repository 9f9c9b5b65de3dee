//! The service under test, run the way operators run it: the release `eventjournal serve`
//! binary as a child process with its own runtime and threads, not an in-process server
//! sharing the benchmark's runtime (which would bill the clients' work to the service and
//! vice versa). The guard kills it when dropped, so an error or a panic in the benchmark never
//! leaves a server behind.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Lines of the server's stderr kept to explain its death.
const STDERR_LINES_KEPT: usize = 40;
const START_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Server {
    child: Child,
    grpc_port: u16,
    metrics_port: u16,
    stderr: Arc<Mutex<VecDeque<String>>>,
}

impl Server {
    /// Starts `binary serve` on free local ports against `database` and waits until
    /// `grpc.health.v1` says SERVING.
    pub async fn start(binary: &Path, mongodb_uri: &str, database: &str) -> anyhow::Result<Self> {
        Self::start_with_env(binary, mongodb_uri, database, &[]).await
    }

    /// [`Server::start`] with extra environment variables (settings such as
    /// `EVENTJOURNAL_READ_JOURNAL__USE_CHANGE_STREAMS`), on top of the benchmark's own.
    pub async fn start_with_env(
        binary: &Path,
        mongodb_uri: &str,
        database: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let grpc_port = free_port()?;
        let metrics_port = free_port()?;
        let mut child = Command::new(binary)
            .arg("serve")
            .args(["--listen", &format!("127.0.0.1:{grpc_port}")])
            .args(["--mongodb-uri", mongodb_uri, "--database", database])
            .env(
                "EVENTJOURNAL_SERVER__METRICS_LISTEN",
                format!("127.0.0.1:{metrics_port}"),
            )
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        // Drained all the time: a full pipe would block the server's logging, and with it
        // the server.
        let stderr = Arc::new(Mutex::new(VecDeque::new()));
        if let Some(pipe) = child.stderr.take() {
            let kept = Arc::clone(&stderr);
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let mut kept = kept.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                    if kept.len() == STDERR_LINES_KEPT {
                        kept.pop_front();
                    }
                    kept.push_back(line);
                }
            });
        }
        let mut server = Self {
            child,
            grpc_port,
            metrics_port,
            stderr,
        };
        server.wait_until_serving().await?;
        Ok(server)
    }

    /// The server's process id, for its CPU time and memory in `/proc`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }

    /// A new HTTP/2 connection to the server.
    pub async fn connect(&self) -> anyhow::Result<Channel> {
        Channel::from_shared(self.url())?
            .connect()
            .await
            .with_context(|| format!("connecting to the service at {}", self.url()))
    }

    async fn wait_until_serving(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            self.check_alive()?;
            if self.serving().await {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the service did not report SERVING within {START_TIMEOUT:?}; its stderr:\n{}",
                    self.stderr_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn serving(&self) -> bool {
        let Ok(channel) = self.connect().await else {
            return false;
        };
        let request = HealthCheckRequest {
            service: String::new(),
        };
        match HealthClient::new(channel).check(request).await {
            Ok(response) => response.into_inner().status == ServingStatus::Serving as i32,
            Err(_) => false,
        }
    }

    /// An error carrying the server's stderr if it has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait().context("checking on the service")? {
            None => Ok(()),
            Some(status) => {
                // Let the drain thread catch the last lines.
                std::thread::sleep(Duration::from_millis(100));
                bail!(
                    "the service exited ({status}); its stderr:\n{}",
                    self.stderr_tail()
                )
            }
        }
    }

    fn stderr_tail(&self) -> String {
        let kept = self
            .stderr
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if kept.is_empty() {
            return "(nothing)".to_owned();
        }
        kept.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// The Prometheus text from the server's metrics listener.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        let mut connection = tokio::net::TcpStream::connect(("127.0.0.1", self.metrics_port))
            .await
            .with_context(|| format!("connecting to the metrics port {}", self.metrics_port))?;
        connection
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .context("sending GET /metrics")?;
        let mut response = String::new();
        connection
            .read_to_string(&mut response)
            .await
            .context("reading /metrics")?;
        let Some((head, body)) = response.split_once("\r\n\r\n") else {
            bail!("GET /metrics: no HTTP response: {response:?}");
        };
        if !head.starts_with("HTTP/1.1 200") {
            bail!("GET /metrics: {}", head.lines().next().unwrap_or_default());
        }
        Ok(body.to_owned())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port free right now (the server binds it a moment later; a clash fails its start loudly).
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")
        .context("finding a free port")?
        .local_addr()?
        .port())
}
