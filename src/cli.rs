//! The command line: `eventjournal serve` (and, later, the ops subcommands).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use config::{ConfigError, Overrides, Settings};

#[derive(Debug, Parser)]
#[command(
    name = "eventjournal",
    version,
    about = "Akka-style event journal, snapshot and durable-state store over MongoDB, served over gRPC"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the gRPC API (Journal, SnapshotStore, DurableStateStore, ReadJournal, health,
    /// reflection) until SIGTERM or SIGINT.
    Serve(ServeArgs),
}

/// How to reach the database; every subcommand takes these, as well as the environment
/// (`EVENTJOURNAL_<SECTION>__<KEY>`).
#[derive(Debug, Args)]
pub struct ConnectionArgs {
    /// TOML configuration file (see config/eventjournal.example.toml).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// MongoDB connection string; overrides mongodb.uri.
    #[arg(long, value_name = "URI")]
    pub mongodb_uri: Option<String>,
    /// Database name; overrides mongodb.database.
    #[arg(long, value_name = "NAME")]
    pub database: Option<String>,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub connection: ConnectionArgs,
    /// gRPC listen address; overrides server.listen.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
}

impl ServeArgs {
    /// Settings from defaults, the file, the process environment and these flags.
    pub fn settings(&self) -> Result<Settings, ConfigError> {
        let environment: HashMap<String, String> = std::env::vars().collect();
        let overrides = Overrides {
            listen: self.listen,
            mongodb_uri: self.connection.mongodb_uri.clone(),
            database: self.connection.database.clone(),
        };
        Settings::load(self.connection.config.as_deref(), &environment, &overrides)
    }
}
