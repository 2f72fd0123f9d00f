use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;

use super::{
    DbArgs, Format, Secret, TargetKind, duration_up_to, number_in, parse_principal, parse_secret,
};
use crate::config::limits;
use crate::domain::{Principal, ResourceType};
use crate::reconcile::{
    Printer, ReconcileOptions, SelectorEncoding, SpiceDbConfig, Writer, reconcile,
};

#[derive(Debug, clap::Args)]
pub struct ReconcileArgs {
    #[command(flatten)]
    db: DbArgs,
    /// The target `run` delivers to, whose relationships the resources are
    /// judged by: agentex-auth writes an `owner` and a `parent_<type>` edge
    /// per resource; spicedb writes the relationships each mapping lists.
    #[arg(
        long,
        env = "AUTHZ_OUTBOX_TARGET",
        value_enum,
        default_value = "agentex-auth"
    )]
    target: TargetKind,
    /// SpiceDB's gRPC endpoint, read directly (read-only). `https://` is
    /// dialled with TLS (system roots plus --spicedb-ca-file), never in clear.
    #[arg(long, env = "SPICEDB_ENDPOINT")]
    spicedb_endpoint: String,
    /// SpiceDB preshared key, sent as a bearer token. Prefer the environment:
    /// a flag's value is visible in `ps`.
    #[arg(long, env = "SPICEDB_TOKEN", hide_env_values = true, value_parser = parse_secret)]
    spicedb_token: Option<Secret>,
    /// PEM file of CA certificates trusted for an https:// SpiceDB endpoint,
    /// besides the system's roots.
    #[arg(long, env = "SPICEDB_CA_FILE")]
    spicedb_ca_file: Option<std::path::PathBuf>,
    /// Deadline of the whole SpiceDB read, every type included (at most 24h).
    #[arg(long, env = "SPICEDB_READ_TIMEOUT", default_value = "30m",
          value_parser = duration_up_to(limits::SPICEDB_READ_TIMEOUT))]
    spicedb_read_timeout: Duration,
    /// Longest wait for the next message of a SpiceDB stream (at most 1h).
    #[arg(long, env = "SPICEDB_MESSAGE_TIMEOUT", default_value = "60s",
          value_parser = duration_up_to(limits::SPICEDB_MESSAGE_TIMEOUT))]
    spicedb_message_timeout: Duration,
    /// Enqueue fixes (origin `reconcile`); without it, only report.
    #[arg(long)]
    apply: bool,
    /// Apply even past --max-deregisters or half of what SpiceDB holds.
    #[arg(long, requires = "apply")]
    force: bool,
    /// Leave resources younger than this alone (rows by created_at; orphans
    /// by their newest outbox row).
    #[arg(long, default_value = "5m", value_parser = duration_up_to(limits::LOOKBACK))]
    grace: Duration,
    /// --apply refuses to enqueue more deregisters than this of any one
    /// resource type without --force (it also refuses to deregister more than
    /// half of what SpiceDB holds of a type).
    #[arg(long, default_value_t = 1000, value_parser = number_in(0u64, 1_000_000_000))]
    max_deregisters: u64,
    /// Owner for missing registrations (legacy rows) whose creator nothing
    /// records: not the row's own creator column (a schedule's
    /// creator_principal), not a register row, not SpiceDB. E.g.
    /// '{"service_account_id":"backfill"}'. Without it they are reported as needs_owner.
    #[arg(long, value_parser = parse_principal)]
    owner_principal: Option<Principal>,
    /// Owner edges SpiceDB holds beyond the registered principals are not
    /// drift (for a host that shares resources through agentex-auth's
    /// /v1/authz/grant, which writes owner edges the outbox never sees); a
    /// registered owner SpiceDB lacks still is.
    #[arg(long)]
    ignore_extra_owners: bool,
    /// Compare only these resource types (comma-separated, e.g. agent,task);
    /// default: every type with an installed mapping.
    #[arg(long = "type", value_delimiter = ',', value_parser = parse_type)]
    types: Vec<ResourceType>,
    /// How object ids read from SpiceDB decode into selectors: the encoding
    /// the agentex-auth in front of it stores selectors SpiceDB cannot hold
    /// verbatim (`run-schedule::A::S`) with. authz-outbox: the project's
    /// own, as agentex-auth-dev stores them; verbatim: object ids are
    /// selectors. Check docs/operations.md before using a real agentex-auth.
    #[arg(
        long,
        value_enum,
        env = "AUTHZ_OUTBOX_SELECTOR_ENCODING",
        default_value = "authz-outbox"
    )]
    selector_encoding: SelectorEncoding,
    /// Relationships per batch read from SpiceDB (SpiceDB caps it, 1,000 by default).
    #[arg(long, default_value_t = 1000, value_parser = number_in(1, limits::PAGE_SIZE))]
    page_size: u32,
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
}

fn parse_type(s: &str) -> Result<ResourceType, String> {
    s.trim().parse().map_err(|e| format!("{e}"))
}

pub async fn reconcile_command(args: ReconcileArgs) -> anyhow::Result<ExitCode> {
    // Settings first: a bad CA file is a one-line error whatever the
    // database does.
    let ca_pem = args
        .spicedb_ca_file
        .as_deref()
        .map(crate::spicedb_client::read_ca_file)
        .transpose()?;
    let has_token = args.spicedb_token.as_ref().is_some_and(|t| !t.0.is_empty());
    super::warn_if_sent_in_clear(
        has_token,
        "SPICEDB_ENDPOINT",
        "preshared key",
        &args.spicedb_endpoint,
    );
    let pool = args.db.connect(2).await?;
    let spicedb = SpiceDbConfig {
        endpoint: args.spicedb_endpoint.clone(),
        token: args.spicedb_token.as_ref().map(|t| t.0.clone()),
        page_size: args.page_size,
        ca_pem,
        read_timeout: args.spicedb_read_timeout,
        message_timeout: args.spicedb_message_timeout,
    };
    let options = ReconcileOptions {
        apply: args.apply,
        force: args.force,
        grace: args.grace,
        max_deregisters: args.max_deregisters,
        owner_principal: args.owner_principal.clone(),
        ignore_extra_owners: args.ignore_extra_owners,
        progress: std::io::stderr().is_terminal(),
        types: args.types.clone(),
        selector_encoding: args.selector_encoding,
        writer: match args.target {
            TargetKind::AgentexAuth => Writer::AgentexAuth,
            TargetKind::SpiceDb => Writer::SpiceDb,
        },
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
    if options.apply && options.types.is_empty() {
        // A WAL relay's gap waits for exactly this run.
        if let Err(e) = crate::relay::reconciled(&pool).await {
            eprintln!(
                "warning: could not mark the WAL relay's gap reconciled \
                 (GRANT UPDATE ON authz_outbox_relay to this role): {e}"
            );
        }
    }
    Ok(ExitCode::from(report.exit_code()))
}
