//! `authz-outbox migrate`: the embedded migrations and the resource
//! mappings, under the host's lock discipline; `--print-sql` for hosts that
//! apply schema changes through their own tooling.

use std::process::ExitCode;
use std::time::Duration;

use super::DbArgs;
use super::mappings::MappingArgs;
use crate::alembic::{Revision, revision_file};
use crate::mapping::core::CaptureMode;
use crate::mapping::install::ChangeAction;
use crate::migrate::{MigrateOptions, migrate_with, print_sql};
use crate::relay::setup;

#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    db: DbArgs,
    #[command(flatten)]
    mappings: MappingArgs,
    /// The longest any lock on a host table is waited for; the host's
    /// writers queue behind a waiting DDL statement at most this long.
    #[arg(long, env = "AUTHZ_OUTBOX_LOCK_TIMEOUT", default_value = "3s",
          value_parser = bounded(Duration::from_millis(10), Duration::from_secs(60)))]
    lock_timeout: Duration,
    /// The longest any one statement may run.
    #[arg(long, env = "AUTHZ_OUTBOX_STATEMENT_TIMEOUT", default_value = "30s",
          value_parser = bounded(Duration::from_secs(1), Duration::from_secs(3600)))]
    statement_timeout: Duration,
    /// How many times a step that timed out on a lock is retried (after
    /// 1 s, 2 s, 4 s, … at most 30 s) before `migrate` gives up, exit 2.
    #[arg(long, env = "AUTHZ_OUTBOX_LOCK_RETRIES", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(0..=100))]
    lock_retries: u32,
    /// Print the SQL `migrate` would run on this database (with the
    /// mappings in force), in order, instead of running it.
    #[arg(long)]
    print_sql: bool,
    /// With `--print-sql`: `sql`, a file to apply as is (psql), or
    /// `alembic`, a revision file whose upgrade() runs the same statements
    /// one by one (under psycopg or asyncpg alike) and whose downgrade()
    /// removes everything authz-outbox installs, outbox rows included.
    #[arg(long, value_enum, default_value_t = Format::Sql, requires = "print_sql")]
    format: Format,
    /// With `--format alembic`: the revision's id (`revision = ...`).
    #[arg(long, value_name = "ID", required_if_eq("format", "alembic"),
          requires = "print_sql", value_parser = revision_id)]
    alembic_revision: Option<String>,
    /// With `--format alembic`: the revision it follows, the host's current
    /// head (`alembic heads`); without it the revision starts a new base.
    #[arg(long, value_name = "ID", requires = "alembic_revision", value_parser = revision_id)]
    alembic_down_revision: Option<String>,
    /// How captures reach the outbox: `table` (an outbox row inserted in
    /// the writing transaction; works everywhere) or `wal` (a logical
    /// message, one WAL record; needs wal_level = logical and a role with
    /// REPLICATION; a relay in the worker moves them into the outbox).
    /// Without it, the installed mode is kept (`table` on a new database).
    #[arg(long, value_enum, conflicts_with = "print_sql")]
    capture: Option<CaptureArg>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum CaptureArg {
    Table,
    Wal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    Sql,
    Alembic,
}

/// An alembic revision id: letters, digits, `_` and `-` (what alembic's
/// own ids and file names are made of).
fn revision_id(s: &str) -> Result<String, String> {
    if s.is_empty()
        || !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err("letters, digits, '_' and '-' only".into());
    }
    Ok(s.to_string())
}

/// A duration flag within `[min, max]`.
fn bounded(
    min: Duration,
    max: Duration,
) -> impl Fn(&str) -> Result<Duration, String> + Clone + Send + Sync + 'static {
    move |s| {
        let d = super::parse_duration(s)?;
        if d < min || d > max {
            return Err(format!("must be between {min:?} and {max:?}"));
        }
        Ok(d)
    }
}

pub async fn migrate(args: MigrateArgs) -> anyhow::Result<ExitCode> {
    let mappings = args.mappings.load()?;
    let options = MigrateOptions {
        lock_timeout: args.lock_timeout,
        statement_timeout: args.statement_timeout,
        lock_retries: args.lock_retries,
        ..MigrateOptions::default()
    };
    let pool = crate::db::connect_quiet(&args.db.database_url.0, 2).await?;
    if args.print_sql {
        let sql = print_sql(&pool, &mappings, &options).await?;
        match (args.format, &args.alembic_revision) {
            (Format::Alembic, Some(id)) => {
                let revision = Revision {
                    id,
                    down_revision: args.alembic_down_revision.as_deref(),
                };
                print!("{}", revision_file(&sql, &revision)?);
            }
            (Format::Alembic, None) => anyhow::bail!("--format alembic needs --alembic-revision"),
            (Format::Sql, Some(_)) => anyhow::bail!("--alembic-revision is for --format alembic"),
            (Format::Sql, None) => print!("{sql}"),
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut conn = pool.acquire().await?;
    if args.capture == Some(CaptureArg::Wal) {
        // Refused before anything changes, each in one line.
        setup::check_wal_ready(&mut conn).await?;
    }
    let installed = crate::mapping::install::capture_mode(&mut conn).await?;
    let wanted = match args.capture {
        Some(CaptureArg::Wal) => CaptureMode::Wal,
        Some(CaptureArg::Table) => CaptureMode::Table,
        None => installed,
    };
    let mut report = migrate_with(&pool, &mappings, &options).await?;
    if wanted != installed {
        match wanted {
            CaptureMode::Wal => {
                for advice in setup::enable_wal(&mut conn).await? {
                    eprintln!("{advice}");
                }
            }
            CaptureMode::Table => setup::set_mode(&mut conn, CaptureMode::Table).await?,
        }
        // The capture functions, regenerated for the mode.
        let again = migrate_with(&pool, &mappings, &options).await?;
        report.mappings.extend(again.mappings);
        if wanted == CaptureMode::Table {
            let mut relay_conn = crate::db::connect_one(&args.db.database_url.0).await?;
            setup::finish_leaving_wal(&mut conn, &mut relay_conn, Duration::from_secs(300)).await?;
        }
        println!(
            "capture mode: {} (was {})",
            wanted.as_str(),
            installed.as_str()
        );
    }
    drop(conn);
    let switched = wanted != installed;
    for migration in &report.migrations {
        println!("applied migration {migration}");
    }
    let mut changed = switched || !report.migrations.is_empty();
    for change in &report.mappings {
        if change.action != ChangeAction::SkippedNoTable {
            println!("{change}");
            changed = true;
        }
    }
    if !changed {
        println!("nothing to do: every migration is applied and the capture matches the mappings");
    }
    Ok(ExitCode::SUCCESS)
}
