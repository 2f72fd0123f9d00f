//! `authz-outbox migrate`: the embedded migrations and the resource
//! mappings, under the host's lock discipline; `--print-sql` for hosts that
//! apply schema changes through their own tooling.

use std::process::ExitCode;
use std::time::Duration;

use super::DbArgs;
use super::mappings::MappingArgs;
use crate::mapping::install::ChangeAction;
use crate::migrate::{MigrateOptions, migrate_with, print_sql};

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
        print!("{}", print_sql(&pool, &mappings, &options).await?);
        return Ok(ExitCode::SUCCESS);
    }
    let report = migrate_with(&pool, &mappings, &options).await?;
    for migration in &report.migrations {
        println!("applied migration {migration}");
    }
    for change in &report.mappings {
        if change.action != ChangeAction::SkippedNoTable {
            println!("{change}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
