//! `authz-outbox uninstall`: what authz-outbox installed, listed (the
//! default) or removed (`--apply`) in one transaction under `migrate`'s
//! lock discipline; `--drop-outbox` takes the outbox's tables too.

use std::process::ExitCode;
use std::time::Duration;

use super::DbArgs;
use crate::migrate::MigrateOptions;
use crate::uninstall::{UninstallOptions, plan, uninstall};

#[derive(Debug, clap::Args)]
pub struct UninstallArgs {
    #[command(flatten)]
    db: DbArgs,
    /// Remove them; without it, only list what would be removed.
    #[arg(long)]
    apply: bool,
    /// Also drop the outbox's tables with every row they hold (pending
    /// rows included) and sqlx's record of our migrations.
    #[arg(long)]
    drop_outbox: bool,
    /// The longest any lock on a table is waited for; the host's writers
    /// queue behind a waiting DROP TRIGGER at most this long.
    #[arg(long, env = "AUTHZ_OUTBOX_LOCK_TIMEOUT", default_value = "3s",
          value_parser = bounded(Duration::from_millis(10), Duration::from_secs(60)))]
    lock_timeout: Duration,
    /// The longest any one statement may run.
    #[arg(long, env = "AUTHZ_OUTBOX_STATEMENT_TIMEOUT", default_value = "30s",
          value_parser = bounded(Duration::from_secs(1), Duration::from_secs(3600)))]
    statement_timeout: Duration,
    /// How many times an attempt that timed out on a lock is retried
    /// (after 1 s, 2 s, 4 s, … at most 30 s) before giving up, exit 2.
    #[arg(long, env = "AUTHZ_OUTBOX_LOCK_RETRIES", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(0..=100))]
    lock_retries: u32,
}

/// A duration flag within `[min, max]` (as `migrate`'s).
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

pub async fn uninstall_command(args: UninstallArgs) -> anyhow::Result<ExitCode> {
    let options = UninstallOptions {
        drop_outbox: args.drop_outbox,
        lock: MigrateOptions {
            lock_timeout: args.lock_timeout,
            statement_timeout: args.statement_timeout,
            lock_retries: args.lock_retries,
            ..MigrateOptions::default()
        },
    };
    let pool = crate::db::connect_quiet(&args.db.database_url.0, 2).await?;
    let (done, verb) = if args.apply {
        (uninstall(&pool, &options).await?, "removed")
    } else {
        (plan(&pool, &options).await?, "would remove")
    };
    for removal in &done.removals {
        println!("{verb} {removal}");
    }
    if done.removals.is_empty() {
        println!("nothing of authz-outbox's is installed here");
    }
    if done.outbox_kept {
        // The truth about what stays: nothing delivers these any more.
        println!(
            "kept authz_outbox with {} pending rows: nothing delivers them until `migrate` and \
             `run` again (writes from now on are not captured; `reconcile --apply` heals that)",
            done.pending_rows
        );
    }
    if !args.apply && !done.removals.is_empty() {
        println!("dry run: nothing was changed; --apply removes the above");
    }
    Ok(ExitCode::SUCCESS)
}
