use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use eventjournal::cli::{
    BackupAction, BackupArgs, CheckArgs, Cli, Command, IndexesCommand, PurgeCommand, ServeArgs,
};
use eventjournal::ops;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// The server allocates and frees a buffer per message, document and response; glibc's malloc
/// spent a fifth of the server's CPU on that under load, mimalloc far less.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Logs go to stderr, keeping stdout for what a command prints as its result.
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let result = match cli.command {
        Command::Check(args) => return check(args),
        Command::Serve(args) => serve(args),
        Command::Indexes(command) => indexes(command),
        Command::Purge(command) => purge(command),
        Command::Backup(args) => backup(args),
        Command::Restore(args) => {
            purge_freed_memory_at_once();
            run_printing(ops::backup::restore(&args))
        }
    };
    exit_code(result)
}

fn exit_code(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One clear line (with its causes), never a backtrace or a driver's report; the
            // whole chain, as the driver tells it, goes to the debug log.
            tracing::debug!(error = ?error, "command failed");
            eprintln!("error: {}", mongo::describe_chain(error.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// mimalloc's `purge_delay` option (index 15 in both of its versions' `mi_option_e`).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Restores (and verify) stream gigabytes through batches of documents freed on other threads
/// than the ones that allocated them; mimalloc holds such memory a while before returning it,
/// which took a 1 GB restore to 114 MB of resident memory (69 MB returning it at once, for
/// 1.7x the time). A backup reuses its buffers instead and needs none of this (returning its
/// memory at once made it 40% slower, faulting fresh pages in for every MiB).
fn purge_freed_memory_at_once() {
    // SAFETY: sets a mimalloc option (an integer) before the command's work starts.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
}

/// `eventjournal check`: the findings on stdout, exit code 1 when any failed.
fn check(args: CheckArgs) -> ExitCode {
    let findings = (|| {
        let settings = args.connection.settings(None)?;
        let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
        Ok(runtime.block_on(ops::check::run(&settings)))
    })();
    match findings {
        Ok(findings) => {
            if args.json {
                print!("{}", ops::check::render_json(&findings));
            } else {
                print!("{}", ops::check::render_text(&findings));
            }
            if ops::check::passed(&findings) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(error) => exit_code(Err(error)),
    }
}

fn backup(args: Box<BackupArgs>) -> anyhow::Result<()> {
    match &args.action {
        Some(action) => {
            if matches!(action, BackupAction::Verify { .. }) {
                purge_freed_memory_at_once();
            }
            run_printing(ops::backup::action(action))
        }
        None => run_printing(ops::backup::create(&args.create)),
    }
}

/// Runs an operator command on a runtime of its own and prints what it returns on stdout.
fn run_printing(command: impl Future<Output = anyhow::Result<String>>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let out = runtime.block_on(command)?;
    print!("{out}");
    Ok(())
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let settings = args.connection.settings(args.listen)?;
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let worker_threads = settings.server.worker_threads_for(cores);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        tracing::info!(worker_threads, cores, "async runtime started");
        let listener = tokio::net::TcpListener::bind(settings.server.listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {} (server.listen)",
                    settings.server.listen
                )
            })?;
        let shutdown = CancellationToken::new();
        tokio::spawn(eventjournal::signal::cancel_on_signal(shutdown.clone()));
        eventjournal::run(settings, listener, shutdown).await
    })
}

fn indexes(command: IndexesCommand) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let mut out = std::io::stdout();
    match command {
        IndexesCommand::List(connection) => {
            let settings = connection.settings(None)?;
            runtime.block_on(async {
                let database = ops::connect(&settings).await?;
                ops::indexes::list(&database, &settings, &mut out)
                    .await
                    .map(|_| ())
            })
        }
        IndexesCommand::Create {
            connection,
            commit_quorum,
        } => {
            let mut settings = connection.settings(None)?;
            if let Some(quorum) = commit_quorum {
                settings.mongodb.index_commit_quorum = quorum;
            }
            runtime.block_on(async {
                let database = ops::connect(&settings).await?;
                ops::indexes::create(&database, &settings, &mut out).await
            })
        }
    }
}

fn purge(command: PurgeCommand) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let mut out = std::io::stdout();
    match command {
        PurgeCommand::Setup { connection, expiry } => {
            let settings = connection.settings(None)?;
            // Flags win; without them, what [purge] configures.
            let configured = &settings.purge;
            let expiry = ops::purge::Expiry {
                journal: expiry
                    .journal_expire_after
                    .or(configured.journal_expire_after),
                snapshots: expiry
                    .snapshot_expire_after
                    .or(configured.snapshot_expire_after),
                state: expiry.state_expire_after.or(configured.state_expire_after),
            };
            if expiry.journal.is_none() && expiry.snapshots.is_none() && expiry.state.is_none() {
                anyhow::bail!(
                    "nothing to set up: give --journal-expire-after, --snapshot-expire-after or \
                     --state-expire-after, or set them in [purge] (purge.journal-expire-after ...)"
                );
            }
            runtime.block_on(async {
                let database = ops::connect(&settings).await?;
                ops::purge::setup(&database, &settings, &expiry, &mut out).await
            })
        }
        PurgeCommand::Migrate(args) => {
            let settings = args.connection.settings(None)?;
            let options = ops::migrate::Options {
                target: args.collection,
                date: mongodb::bson::DateTime::from_system_time(args.date),
                only_deleted: args.only_deleted,
                batch_size: args.batch_size,
                pause: args.pause,
                dry_run: args.dry_run,
                progress: std::io::stderr().is_terminal(),
            };
            runtime.block_on(async {
                let database = ops::connect(&settings).await?;
                ops::migrate::migrate(&database, &settings, &options, &mut out)
                    .await
                    .map(|_| ())
            })
        }
        PurgeCommand::Status(connection) => {
            let settings = connection.settings(None)?;
            runtime.block_on(async {
                let database = ops::connect(&settings).await?;
                ops::purge::status(&database, &settings, &mut out).await
            })
        }
    }
}
