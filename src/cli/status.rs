use std::process::ExitCode;

use super::{DbArgs, Format, print_json};
use crate::outbox::stats;

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    db: DbArgs,
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
    /// How many of the newest dead rows to show.
    #[arg(long, default_value_t = 10)]
    dead: i64,
}

pub async fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let pool = args.db.connect(2).await?;
    let mut s = stats::collect(&pool, stats::Scope::All, args.dead).await?;
    s.direct_writers = stats::direct_writers(&pool).await?;
    s.partitions = crate::outbox::partitions::list(&pool).await?;
    let capture = crate::relay::capture_status(&pool).await?;
    match args.format {
        Format::Json => print_json(&WithCapture { stats: &s, capture })?,
        Format::Table => {
            println!(
                "{:<12} {:>10} {:>10} {:>10}",
                "STATE", "TOTAL", "REGISTER", "DEREGISTER"
            );
            for (state, total) in &s.counts {
                let by_op = s.by_operation.get(state);
                let n = |op: &str| by_op.and_then(|m| m.get(op)).copied().unwrap_or(0);
                println!(
                    "{state:<12} {total:>10} {:>10} {:>10}",
                    n("register"),
                    n("deregister")
                );
            }
            println!();
            println!(
                "{:<12} {:>10} {:>10} {:>10} {:>10} {:>12}",
                "TYPE", "PENDING", "DELIVERED", "DEAD", "SUPERSEDED", "OLDEST"
            );
            // Types, sources and role names come from rows and the catalog,
            // which any writer may have filled: shown terminal-safe.
            let safe = |text: &str| crate::display::line(text, 300);
            for (resource_type, t) in &s.by_type {
                let n = |state: &str| t.counts.get(state).copied().unwrap_or(0);
                let resource_type = safe(resource_type);
                println!(
                    "{resource_type:<12} {:>10} {:>10} {:>10} {:>10} {:>11.1}s",
                    n("pending"),
                    n("delivered"),
                    n("dead"),
                    n("superseded"),
                    t.oldest_pending_age_seconds
                );
            }
            println!();
            println!("{:<12} PRINCIPAL SOURCES", "TYPE");
            for (resource_type, t) in &s.by_type {
                let sources: Vec<String> = t
                    .by_principal_source
                    .iter()
                    .map(|(source, n)| format!("{}={n}", safe(source)))
                    .collect();
                println!("{:<12} {}", safe(resource_type), sources.join(" "));
            }
            println!();
            println!("oldest pending age: {:.1}s", s.oldest_pending_age_seconds);
            println!("leased now:         {}", s.leased);
            print_partitions(&s.partitions);
            print_capture(&capture);
            if !s.direct_writers.is_empty() {
                println!();
                println!(
                    "WARNING: these roles can write authz_outbox directly and so forge owners: {} \
                     (revoke: docs/operations.md, Upgrade)",
                    safe(&s.direct_writers.join(", "))
                );
            }
            if !s.recent_dead.is_empty() {
                println!();
                println!("newest dead rows:");
                // Rows come from any writer and errors from a server: shown
                // terminal-safe, whatever an older version stored.
                for d in &s.recent_dead {
                    println!(
                        "  #{} {} {}:{} attempts={} status={} {}",
                        d.id,
                        safe(&d.operation),
                        safe(&d.resource_type),
                        safe(&d.resource_id),
                        d.attempts,
                        d.last_status.map_or("-".into(), |s| s.to_string()),
                        crate::display::error_line(d.last_error.as_deref().unwrap_or(""))
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(serde::Serialize)]
struct WithCapture<'a> {
    #[serde(flatten)]
    stats: &'a stats::OutboxStats,
    capture: crate::relay::CaptureStatus,
}

/// The capture mode and, in WAL mode, the relay's slot, lag and gaps.
fn print_capture(c: &crate::relay::CaptureStatus) {
    println!();
    let Some(slot) = &c.slot else {
        println!("capture: {}", c.mode);
        return;
    };
    println!(
        "capture: {} (slot {}, {} relayed, lag {})",
        c.mode,
        crate::display::line(slot, 100),
        c.relayed.unwrap_or(0),
        c.lag_bytes
            .map_or("unknown: the slot is missing".into(), |b| format!(
                "{b} bytes"
            ))
    );
    if c.gaps.unwrap_or(0) > 0 {
        println!(
            "relay gaps:         {} (last {}: {})",
            c.gaps.unwrap_or(0),
            c.last_gap_at.map_or("-".into(), |t| t.to_rfc3339()),
            crate::display::error_line(c.last_gap_reason.as_deref().unwrap_or(""))
        );
    }
    if c.reconcile_pending {
        println!(
            "WARNING: the relay's slot was lost and recreated (a gap): captures made meanwhile \
             are missing until a reconcile of every type runs — the worker runs it when it has \
             --spicedb-endpoint; else run `authz-outbox reconcile --apply`"
        );
    }
}

/// The partitions with their ranges and sizes, the oldest's age and how far
/// ahead they exist, warning when captures land in the default partition.
fn print_partitions(parts: &[crate::outbox::partitions::Partition]) {
    use crate::outbox::partitions::{ahead, oldest};
    let now = chrono::Utc::now();
    let day = |t: Option<chrono::DateTime<chrono::Utc>>, none: &str| {
        t.map_or(none.to_string(), |t| t.format("%Y-%m-%d %H:%M").to_string())
    };
    println!();
    println!(
        "{:<28} {:>16} {:>16} {:>12} {:>12}",
        "PARTITION", "FROM", "TO", "ROWS~", "SIZE"
    );
    for p in parts {
        let (from, to) = if p.is_default {
            ("default".to_string(), "-".to_string())
        } else {
            (day(p.lower_bound, "-infinity"), day(p.upper_bound, "-"))
        };
        println!(
            "{:<28} {from:>16} {to:>16} {:>12} {:>10.1}MB",
            p.name,
            p.rows_estimate.max(0),
            p.bytes as f64 / 1_048_576.0
        );
    }
    if let Some(o) = oldest(parts) {
        let age = o.lower_bound.map_or("before the upgrade".to_string(), |l| {
            format!("{:.1} days", (now - l).num_seconds() as f64 / 86_400.0)
        });
        println!("oldest partition:   {} ({age})", o.name);
    }
    match ahead(parts, now) {
        Some(a) if a >= chrono::Duration::days(1) => {
            println!(
                "partitions ahead:   {:.1} days",
                a.num_seconds() as f64 / 86_400.0
            )
        }
        Some(a) => println!(
            "WARNING: partitions exist only {:.1} hours ahead: creating ahead is falling behind \
             (captures land in the default partition once they end)",
            a.num_seconds() as f64 / 3_600.0
        ),
        None => {
            println!("WARNING: no dated partition: every capture lands in the default partition")
        }
    }
}
