use std::process::ExitCode;

use chrono::{DateTime, Utc};

use super::{DbArgs, Format, parse_principal, print_json};
use crate::display::{self, Escaped};
use crate::domain::{Principal, ResourceRef};
use crate::outbox::replay::{ReplayOptions, Selector, replay};

#[derive(Debug, clap::Args)]
#[command(group(
    clap::ArgGroup::new("selector")
        .required(true)
        .multiple(true)
        .args(["id", "all_dead", "since", "until", "resource", "error_contains"])
))]
pub struct ReplayArgs {
    #[command(flatten)]
    db: DbArgs,
    /// A row to replay (repeatable).
    #[arg(long)]
    id: Vec<i64>,
    /// Every dead row (other selectors narrow it).
    #[arg(long)]
    all_dead: bool,
    /// Rows that went dead since: RFC 3339, or a duration ago like `2h`.
    #[arg(long, value_parser = parse_time)]
    since: Option<DateTime<Utc>>,
    /// Rows that went dead until: RFC 3339, or a duration ago like `30m`.
    #[arg(long, value_parser = parse_time)]
    until: Option<DateTime<Utc>>,
    /// Rows of one resource, e.g. `api_key:ID`.
    #[arg(long)]
    resource: Option<ResourceRef>,
    /// Rows whose last error contains this text (case-insensitive).
    #[arg(long)]
    error_contains: Option<String>,
    /// Creator for rows that died for "no creator resolvable", e.g. '{"user_id":"u1"}'.
    #[arg(long, value_parser = parse_principal)]
    principal: Option<Principal>,
    /// Show what would happen; change nothing.
    #[arg(long)]
    dry_run: bool,
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
}

pub async fn replay_command(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let pool = args.db.connect(2).await?;
    let options = ReplayOptions {
        selector: Selector {
            ids: args.id,
            all_dead: args.all_dead,
            since: args.since,
            until: args.until,
            resource: args.resource,
            error_contains: args.error_contains,
        },
        principal: args.principal,
        dry_run: args.dry_run,
    };
    let report = replay(&pool, &options).await?;
    match args.format {
        Format::Json => print_json(&report)?,
        Format::Table => {
            println!(
                "{:>10} {:<48} {:<11} {:<11} REASON",
                "ID", "RESOURCE", "OPERATION", "ACTION"
            );
            // Rows come from any writer: their resource, operation and
            // reason are shown escaped, one line per row.
            for r in &report.rows {
                println!(
                    "{:>10} {:<48} {:<11} {:<11} {}",
                    r.id,
                    Escaped(&r.resource),
                    Escaped(&r.operation),
                    r.action.as_str(),
                    display::error_line(&r.reason)
                );
            }
            if report.rows.is_empty() {
                println!("(no rows selected)");
            }
            if report.dry_run {
                println!("dry run: nothing was changed");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// RFC 3339 (`2026-01-02T03:04:05Z`) or a duration ago (`2h`, `30m`).
fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    let ago = humantime::parse_duration(s)
        .map_err(|_| format!("invalid time {s:?}: expected RFC 3339 or a duration ago like 2h"))?;
    let max = crate::config::limits::LOOKBACK;
    if ago > max {
        return Err(format!(
            "invalid time {s:?}: at most {} ago",
            super::short_duration(max)
        ));
    }
    chrono::Duration::from_std(ago)
        .ok()
        .and_then(|ago| Utc::now().checked_sub_signed(ago))
        .ok_or_else(|| format!("invalid time {s:?}: too far back"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_or_durations_ago() {
        let t = parse_time("2026-01-02T03:04:05Z").expect("rfc3339");
        assert_eq!(t.to_rfc3339(), "2026-01-02T03:04:05+00:00");
        let ago = parse_time("2h").expect("duration");
        let delta = Utc::now() - ago;
        assert!(delta.num_minutes() >= 119 && delta.num_minutes() <= 121);
        assert!(parse_time("yesterday").is_err());
        assert!(parse_time("3650d").is_ok());
        assert!(parse_time("3651d").is_err());
        assert!(parse_time("300000y").is_err());
    }
}
