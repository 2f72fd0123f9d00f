use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;

use super::{DbArgs, Format, parse_duration, parse_principal};
use crate::domain::Principal;
use crate::reconcile::{Printer, ReconcileOptions, SpiceDbConfig, reconcile};

#[derive(Debug, clap::Args)]
pub struct ReconcileArgs {
    #[command(flatten)]
    db: DbArgs,
    /// SpiceDB's gRPC endpoint, read directly (read-only).
    #[arg(long, env = "SPICEDB_ENDPOINT")]
    spicedb_endpoint: String,
    /// SpiceDB preshared key, sent as a bearer token.
    #[arg(long, env = "SPICEDB_TOKEN", hide_env_values = true)]
    spicedb_token: Option<String>,
    /// Enqueue fixes (origin `reconcile`); without it, only report.
    #[arg(long)]
    apply: bool,
    /// Apply even past --max-deregisters or half of what SpiceDB holds.
    #[arg(long, requires = "apply")]
    force: bool,
    /// Leave resources younger than this alone (rows by created_at; orphans
    /// by their newest outbox row).
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    grace: Duration,
    /// --apply refuses to enqueue more deregisters than this without --force.
    #[arg(long, default_value_t = 1000)]
    max_deregisters: u64,
    /// Owner for missing registrations with no recorded creator, e.g.
    /// '{"service_account_id":"backfill"}'. Without it they are reported as needs_owner.
    #[arg(long, value_parser = parse_principal)]
    owner_principal: Option<Principal>,
    /// Relationships per batch read from SpiceDB (SpiceDB caps it, 1,000 by default).
    #[arg(long, default_value_t = 1000)]
    page_size: u32,
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
}

pub async fn reconcile_command(args: ReconcileArgs) -> anyhow::Result<ExitCode> {
    let pool = args.db.connect(2).await?;
    let spicedb = SpiceDbConfig {
        endpoint: args.spicedb_endpoint.clone(),
        token: args.spicedb_token.clone(),
        page_size: args.page_size,
    };
    let options = ReconcileOptions {
        apply: args.apply,
        force: args.force,
        grace: args.grace,
        max_deregisters: args.max_deregisters,
        owner_principal: args.owner_principal.clone(),
        progress: std::io::stderr().is_terminal(),
    };
    let stdout = std::io::stdout();
    let mut printer = Printer::new(stdout.lock(), args.format == Format::Json);
    let mut write_error = None;
    let report = reconcile(&pool, &spicedb, &options, &mut |finding| {
        if write_error.is_none()
            && let Err(e) = printer.finding(finding)
        {
            write_error = Some(e);
        }
    })
    .await
    .context("reconcile")?;
    if let Some(e) = write_error {
        return Err(e).context("writing the report");
    }
    let mut extra = serde_json::Map::new();
    extra.insert("applied".into(), report.applied.into());
    extra.insert("enqueued".into(), report.enqueued.into());
    extra.insert("run_id".into(), report.run_id.into());
    if let Some(refused) = &report.refused {
        extra.insert("refused".into(), refused.to_string().into());
    }
    printer
        .finish(&report.summary, extra)
        .context("writing the report")?;
    if let Some(refused) = report.refused {
        return Err(refused.into());
    }
    Ok(ExitCode::from(report.exit_code()))
}
