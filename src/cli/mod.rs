//! The command line: argument parsing and one module per command. Each
//! command turns its flags into the library's typed settings and calls it.

mod agents;
mod keys;
mod mappings;
mod migrate;
mod reconcile;
mod replay;
mod run;
mod status;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sqlx::PgPool;

use crate::domain::Principal;

/// Keeps agentex-auth (SpiceDB) in step with PostgreSQL through a
/// transactional outbox.
#[derive(Debug, Parser)]
#[command(name = "authz-outbox", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Args)]
pub struct DbArgs {
    /// PostgreSQL connection URL.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub(crate) database_url: String,
}

impl DbArgs {
    async fn connect(&self, max_connections: u32) -> anyhow::Result<PgPool> {
        Ok(crate::db::connect(&self.database_url, max_connections).await?)
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Apply the embedded migrations and install the resource mappings
    /// (idempotent; one line per change, nothing when up to date).
    Migrate(migrate::MigrateArgs),
    /// Show or validate the resource mappings (which tables are captured, and how).
    Mappings {
        #[command(subcommand)]
        command: mappings::MappingsCommand,
    },
    /// Deliver the outbox to agentex-auth (long-running; `--once` to drain and exit).
    Run(run::RunArgs),
    /// Show outbox counts, the oldest pending age and the newest dead rows.
    Status(status::StatusArgs),
    /// Create and delete agent API keys (row and outbox row in one transaction).
    Keys {
        #[command(subcommand)]
        command: keys::KeysCommand,
    },
    /// Create and delete agents.
    Agents {
        #[command(subcommand)]
        command: agents::AgentsCommand,
    },
    /// Compare SpiceDB with PostgreSQL; exit 1 on drift; `--apply` heals through the outbox.
    Reconcile(reconcile::ReconcileArgs),
    /// Re-drive dead outbox rows, unless a later change overtook them.
    Replay(replay::ReplayArgs),
}

/// Parses arguments, runs the command, and maps the result to an exit code:
/// the command's own code, or 2 with a one-line error.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    crate::telemetry::init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            tracing::debug!(error = ?e, "command failed");
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Migrate(args) => migrate::migrate(args).await,
        Command::Mappings { command } => mappings::mappings(command).await,
        Command::Run(args) => run::run(args).await,
        Command::Status(args) => status::status(args).await,
        Command::Keys { command } => keys::keys(command).await,
        Command::Agents { command } => agents::agents(command).await,
        Command::Reconcile(args) => reconcile::reconcile_command(args).await,
        Command::Replay(args) => replay::replay_command(args).await,
    }
}

/// `--principal` / `--owner-principal` values.
pub(crate) fn parse_principal(s: &str) -> Result<Principal, String> {
    Principal::parse(s).map_err(|e| e.to_string())
}

/// Durations like `500ms`, `5s`, `24h`.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// Output formats of the reporting commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

pub(crate) fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!(
        "{}",
        serde_json::to_string_pretty(value).context("serializing the report")?
    );
    Ok(())
}
