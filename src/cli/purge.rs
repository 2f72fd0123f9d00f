use std::process::ExitCode;
use std::time::Duration;

use super::{DbArgs, Format, duration_up_to, print_json};
use crate::outbox::purge::{PurgeDead, purge_dead};

#[derive(Debug, clap::Args)]
pub struct PurgeArgs {
    #[command(flatten)]
    db: DbArgs,
    /// Delete dead rows (the only kind a purge deletes; required, so the
    /// command says what it removes).
    #[arg(long, required = true)]
    dead: bool,
    /// Only rows that went dead longer ago than this, e.g. `30d` (at most 3650d).
    #[arg(long, value_parser = duration_up_to(crate::config::limits::LOOKBACK))]
    older_than: Duration,
    /// Only rows of this resource type.
    #[arg(long = "type", value_name = "TYPE")]
    resource_type: Option<String>,
    /// Count the rows; delete nothing.
    #[arg(long)]
    dry_run: bool,
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
}

pub async fn purge_command(args: PurgeArgs) -> anyhow::Result<ExitCode> {
    let pool = args.db.connect(1).await?;
    let report = purge_dead(
        &pool,
        &PurgeDead {
            older_than: args.older_than,
            resource_type: args.resource_type,
            dry_run: args.dry_run,
        },
    )
    .await?;
    match args.format {
        Format::Json => print_json(&report)?,
        Format::Table if report.dry_run => {
            println!(
                "{} dead rows would be purged (dry run: nothing was changed)",
                report.rows
            )
        }
        Format::Table => println!("purged {} dead rows", report.rows),
    }
    Ok(ExitCode::SUCCESS)
}
