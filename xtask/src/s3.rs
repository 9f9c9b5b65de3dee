//! The S3-compatible server the backup tests upload to: moto in server mode, installed from
//! PyPI (pinned in `xtask/s3-test-server.txt`) into `.local/moto` on first use and never
//! committed. It runs as a child of `cargo xtask test` on a free local port and dies with it.

use std::io::Read as _;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::mongod::{pip_install, workspace_root};

pub struct S3TestServer {
    child: Child,
    pub endpoint: String,
}

impl S3TestServer {
    pub fn start() -> anyhow::Result<Self> {
        let install_dir = install()?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let log = workspace_root().join(".local/moto.log");
        let mut child = Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .env("PYTHONPATH", &install_dir)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting the S3 test server (python3 -m moto.server)")?;
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = child.try_wait()? {
                let mut output = String::new();
                std::fs::File::open(&log)?.read_to_string(&mut output)?;
                bail!("the S3 test server exited with {status}: {output}");
            }
            if started.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                bail!("the S3 test server did not listen on port {port} within 60 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(Self {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        })
    }
}

impl Drop for S3TestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// moto and its dependencies, pinned, installed with `--no-deps` when missing.
fn install() -> anyhow::Result<PathBuf> {
    install_requirements("moto", "xtask/s3-test-server.txt")
}

/// The packages pinned in `requirements` (a path from the workspace root) installed with
/// `--no-deps` into `.local/<name>` when missing or when the pins changed.
pub fn install_requirements(name: &str, requirements: &str) -> anyhow::Result<PathBuf> {
    let root = workspace_root();
    let install_dir = root.join(".local").join(name);
    let requirements = root.join(requirements);
    // A marker naming the requirements installed: a changed pin reinstalls.
    let pins = std::fs::read_to_string(&requirements)
        .with_context(|| format!("reading {}", requirements.display()))?;
    let marker = install_dir.join(".installed");
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(pins.as_str()) {
        return Ok(install_dir);
    }
    eprintln!("xtask: installing {name} into {}", install_dir.display());
    if install_dir.exists() {
        std::fs::remove_dir_all(&install_dir)?;
    }
    let status = pip_install(
        &install_dir,
        &[std::ffi::OsStr::new("-r"), requirements.as_os_str()],
    )?;
    if !status.success() {
        bail!("installing {name} failed ({status})");
    }
    std::fs::write(&marker, pins)?;
    Ok(install_dir)
}
