//! The command line: argument parsing and one module per command. Each
//! command turns its flags into the library's typed settings and calls it.

mod agents;
mod check;
mod keys;
mod mappings;
mod migrate;
mod purge;
mod reconcile;
mod replay;
mod run;
mod signal;
mod status;
mod ui;
mod uninstall;

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
    /// PostgreSQL connection URL; `?sslmode=verify-full` (or `require`) for
    /// TLS, `&sslrootcert=/path/ca.pem` for a private CA.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, value_parser = parse_secret)]
    pub(crate) database_url: Secret,
}

impl DbArgs {
    async fn connect(&self, max_connections: u32) -> anyhow::Result<PgPool> {
        Ok(crate::db::connect(&self.database_url.0, max_connections).await?)
    }
}

/// A secret from a flag, the environment or a file (a token, a URL that may
/// hold a password). Its `Debug` never shows the value, so no argument
/// struct can print it.
#[derive(Clone)]
pub(crate) struct Secret(pub(crate) String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

pub(crate) fn parse_secret(s: &str) -> Result<Secret, String> {
    Ok(Secret(s.to_string()))
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
    /// Deliver the outbox to agentex-auth or SpiceDB (long-running; `--once` to drain and exit).
    Run(Box<run::RunArgs>),
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
    /// Delete dead rows past an age (`--dead --older-than 30d`): what they
    /// would have changed is then left to `reconcile`.
    Purge(purge::PurgeArgs),
    /// List (default) or remove (`--apply`) every trigger, function and view
    /// authz-outbox installed; `--drop-outbox` also its tables and rows.
    Uninstall(uninstall::UninstallArgs),
    /// Ask SpiceDB whether a subject has a permission on a resource
    /// (`check document:roadmap view user:alice`): exit 0 allowed, 1 denied.
    Check(check::CheckArgs),
    /// Serve the operator page, read-only, without a worker (loopback by default).
    Ui(ui::UiArgs),
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
            // One bounded line, escaped: the chain may quote a server, a
            // row or a configuration file (a TOML error shows the line).
            eprintln!("error: {}", crate::display::error_line(&format!("{e:#}")));
            ExitCode::from(2)
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Migrate(args) => migrate::migrate(args).await,
        Command::Mappings { command } => mappings::mappings(command).await,
        Command::Run(args) => run::run(*args).await,
        Command::Status(args) => status::status(args).await,
        Command::Keys { command } => keys::keys(command).await,
        Command::Agents { command } => agents::agents(command).await,
        Command::Reconcile(args) => reconcile::reconcile_command(args).await,
        Command::Replay(args) => replay::replay_command(args).await,
        Command::Purge(args) => purge::purge_command(args).await,
        Command::Uninstall(args) => uninstall::uninstall_command(args).await,
        Command::Check(args) => check::check_command(args).await,
        Command::Ui(args) => ui::ui_command(args).await,
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

/// Where `run` delivers, and what `migrate` / `mappings check` hold the
/// mappings to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TargetKind {
    /// agentex-auth's HTTP API (the agentex host's four resource types).
    #[value(name = "agentex-auth")]
    AgentexAuth,
    /// SpiceDB itself, over gRPC (any resource types, relationships from the mappings).
    #[value(name = "spicedb")]
    SpiceDb,
}

/// A duration flag bounded at parse time (limits in `config::limits`).
pub(crate) fn duration_up_to(
    max: Duration,
) -> impl Fn(&str) -> Result<Duration, String> + Clone + Send + Sync + 'static {
    move |s| {
        let duration = parse_duration(s)?;
        if duration > max {
            return Err(format!("must be at most {}", short_duration(max)));
        }
        Ok(duration)
    }
}

/// `3650d`, `24h`, `5m`, `90s`: a limit as an operator would write it.
pub(crate) fn short_duration(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        0 => format!("{}ms", d.as_millis()),
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// A number flag within `min..=max`, checked at parse time.
pub(crate) fn number_in<T>(
    min: T,
    max: T,
) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy + Send + Sync + 'static,
{
    move |s| match s.trim().parse::<T>() {
        Ok(n) if n >= min && n <= max => Ok(n),
        _ => Err(format!("must be a whole number from {min} to {max}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsed_arguments_never_print_a_secret() {
        let cli = Cli::try_parse_from([
            "authz-outbox",
            "run",
            "--database-url",
            "postgres://app:pg-pass-1@db/app",
            "--agentex-auth-url",
            "http://auth",
            "--agentex-auth-token",
            "tok-secret-1",
        ])
        .expect("parses");
        let shown = format!("{cli:?}");
        assert!(!shown.contains("pg-pass-1"), "{shown}");
        assert!(!shown.contains("tok-secret-1"), "{shown}");
        let cli = Cli::try_parse_from([
            "authz-outbox",
            "reconcile",
            "--database-url",
            "postgres://db/app",
            "--spicedb-endpoint",
            "http://spicedb:50051",
            "--spicedb-token",
            "psk-secret-1",
        ])
        .expect("parses");
        assert!(!format!("{cli:?}").contains("psk-secret-1"));
        let cli = Cli::try_parse_from([
            "authz-outbox",
            "keys",
            "create",
            "--database-url",
            "postgres://db/app",
            "--agent-id",
            "a",
            "--name",
            "n",
            "--type",
            "external",
            "--secret",
            "agx_key_secret_1",
        ])
        .expect("parses");
        assert!(!format!("{cli:?}").contains("agx_key_secret_1"));
    }

    #[test]
    fn only_plain_http_to_another_host_is_in_clear() {
        for url in [
            "http://spicedb:50051",
            "http://10.0.0.7:50051",
            "http://[2001:db8::1]:50051",
            "http://localhost.evil.example:1",
        ] {
            assert!(in_clear_to_another_host(url), "{url}");
        }
        for url in [
            "https://spicedb:50051",
            "http://localhost:50051",
            "http://LOCALHOST:50051",
            "http://127.0.0.1:50051",
            "http://127.1.2.3:50051",
            "http://[::1]:50051",
            "not a url",
        ] {
            assert!(!in_clear_to_another_host(url), "{url}");
        }
    }

    #[test]
    fn bounded_flags() {
        let lease = duration_up_to(crate::config::limits::LEASE);
        assert!(lease("1h").is_ok());
        assert!(lease("61m").is_err());
        assert!(lease("18446744073709551615s").is_err());
        let concurrency = number_in(1usize, 4096);
        assert_eq!(concurrency("4096"), Ok(4096));
        assert!(concurrency("0").is_err());
        assert!(concurrency("4097").is_err());
        assert!(concurrency("99999999999999999999999").is_err());
    }
}

/// Whether a credential sent to `url` crosses the network in clear: plain
/// `http://` to anything but this machine.
pub(crate) fn in_clear_to_another_host(url: &str) -> bool {
    let Ok(parsed) = url::Url::parse(url) else {
        return false;
    };
    parsed.scheme() == "http"
        && !parsed.host().is_some_and(|h| match h {
            url::Host::Domain(d) => d.eq_ignore_ascii_case("localhost"),
            url::Host::Ipv4(ip) => ip.is_loopback(),
            url::Host::Ipv6(ip) => ip.is_loopback(),
        })
}

/// Once, at start: a token sent over plain http to another machine is
/// readable on the wire. `setting` names where the URL came from
/// (`AGENTEX_AUTH_URL`), `credential` what is exposed.
pub(crate) fn warn_if_sent_in_clear(has_token: bool, setting: &str, credential: &str, url: &str) {
    if has_token && in_clear_to_another_host(url) {
        tracing::warn!(
            "{setting} is plain http to another host: the {credential} is readable on the \
             wire; use https://"
        );
    }
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
