//! Reconcile: measure the drift between SpiceDB and PostgreSQL, and heal it
//! through the outbox.
//!
//! A run reads SpiceDB first ([`spicedb`]), streams its relationships into
//! a temporary table ([`stage`]), classifies every `api_key` and `agent` with
//! SQL joins against the host's tables and the outbox, and streams the
//! findings out ([`report`]). With `apply` it enqueues fixes as ordinary
//! outbox rows (origin `reconcile`), so the worker delivers them with its
//! ordering and retries; reconcile never calls agentex-auth itself.
//!
//! ```no_run
//! # async fn demo(pool: sqlx::PgPool) -> Result<(), authz_outbox::reconcile::ReconcileError> {
//! use authz_outbox::reconcile::{ReconcileOptions, SpiceDbConfig, reconcile};
//!
//! let spicedb = SpiceDbConfig::new("http://127.0.0.1:50051");
//! let report = reconcile(&pool, &spicedb, &ReconcileOptions::default(), &mut |f| println!("{f:?}")).await?;
//! std::process::exit(report.exit_code().into());
//! # }
//! ```
//!
//! # Why it cannot revoke a key that is being created
//!
//! - SpiceDB is read (fully consistent) *before* PostgreSQL is classified, in
//!   one statement and so one snapshot: a key whose create commits during the
//!   read is seen as a row, never as an orphan.
//! - Resources younger than `grace` are left alone; for an orphan (SpiceDB
//!   has no ages) "young" means an outbox row of it was created within
//!   `grace`. Resources with a pending outbox row are left to that row.
//! - Orphan deregisters are *guarded*: the worker re-checks at delivery that
//!   the row still does not exist and supersedes the row if it does.
//! - `apply` refuses more than `max_deregisters` deregisters, or more than
//!   half of what SpiceDB holds, unless `force`: pointed at the wrong or an
//!   empty database, reconcile must not revoke everything.

pub mod report;
pub mod spicedb;
pub mod stage;

use std::collections::HashSet;
use std::io::IsTerminal;
use std::time::Duration;

use chrono::Utc;
use indicatif::{ProgressBar, ProgressStyle};
use sqlx::{Acquire, PgPool};

use crate::domain::{Operation, Principal, ResourceRef};
use crate::outbox::enqueue::{NewRow, enqueue};
pub use report::{Finding, FindingKind, Printer, Summary};
pub use spicedb::{SpiceDbConfig, SpiceDbError, SpiceDbReader};

/// The resource types reconcile compares (those with a table here).
pub const RESOURCE_TYPES: [&str; 2] = ["api_key", "agent"];

/// The `origin` of the rows reconcile enqueues.
pub const ORIGIN: &str = "reconcile";

/// Findings handled (reported, and enqueued with `apply`) per round trip.
const FINDINGS_PAGE: i64 = 1000;

/// How a run behaves. The default is a dry run with the CLI's defaults.
#[derive(Debug, Clone)]
pub struct ReconcileOptions {
    /// Enqueue fixes; otherwise only report.
    pub apply: bool,
    /// Lift the deregister limits.
    pub force: bool,
    /// Leave resources younger than this alone.
    pub grace: Duration,
    /// `apply` refuses to enqueue more deregisters than this without `force`.
    pub max_deregisters: u64,
    /// Whom to register missing resources as when no creator is recorded.
    pub owner_principal: Option<Principal>,
    /// Show a progress bar on stderr (the CLI sets it when stderr is a TTY).
    pub progress: bool,
}

impl Default for ReconcileOptions {
    fn default() -> Self {
        ReconcileOptions {
            apply: false,
            force: false,
            grace: Duration::from_secs(300),
            max_deregisters: 1000,
            owner_principal: None,
            progress: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    SpiceDb(#[from] SpiceDbError),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("writing the report: {0}")]
    Output(#[from] std::io::Error),
}

/// Why `apply` enqueued nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "refusing to apply: {count} deregisters exceed --max-deregisters ({limit}); \
         check DATABASE_URL and the SpiceDB endpoint, or pass --force"
    )]
    TooManyDeregisters { count: u64, limit: u64 },
    #[error(
        "refusing to apply: {count} deregisters would revoke more than half of the {held} \
         resources SpiceDB holds; check DATABASE_URL and the SpiceDB endpoint, or pass --force"
    )]
    MostOfSpiceDb { count: u64, held: u64 },
}

/// The outcome of one run.
#[derive(Debug, Clone)]
pub struct ReconcileReport {
    pub summary: Summary,
    /// Fixes were enqueued (apply, not refused).
    pub applied: bool,
    /// Outbox rows enqueued.
    pub enqueued: u64,
    /// Drifted resources left alone because the outbox touched them after
    /// classification.
    pub changed_meanwhile: u64,
    pub refused: Option<Refusal>,
    /// The row in `authz_outbox_reconcile_runs`.
    pub run_id: i64,
}

impl ReconcileReport {
    /// 0 consistent, 1 drift found, 2 refused to apply.
    pub fn exit_code(&self) -> u8 {
        if self.refused.is_some() {
            2
        } else if self.summary.drift > 0 {
            1
        } else {
            0
        }
    }
}

/// Runs reconcile once; each drift finding goes to `on_finding` as it
/// streams out of PostgreSQL (at most one page in memory).
pub async fn reconcile(
    pool: &PgPool,
    spicedb: &SpiceDbConfig,
    options: &ReconcileOptions,
    on_finding: &mut dyn FnMut(&Finding),
) -> Result<ReconcileReport, ReconcileError> {
    let started_at = Utc::now();
    let reader = SpiceDbReader::connect(spicedb).await?;
    // Temporary tables live in one session; a detached connection closes
    // when the run ends, taking them with it even if the run fails.
    let mut conn = pool.acquire().await?.detach();
    stage::create(&mut conn).await?;

    let bar = progress_bar(options.progress);
    let mut summary = Summary::default();
    let mut buffer = Vec::with_capacity(stage::INSERT_BATCH);
    for resource_type in RESOURCE_TYPES {
        let mut pages = reader.pages(resource_type);
        while let Some(page) = pages.next_page().await? {
            summary.spicedb_relationships += page.len() as u64;
            bar.inc(page.len() as u64);
            buffer.extend(page);
            if buffer.len() >= stage::INSERT_BATCH {
                stage::insert(&mut conn, &buffer).await?;
                buffer.clear();
                if summary.spicedb_relationships % 100_000 < stage::INSERT_BATCH as u64 {
                    tracing::info!(
                        relationships = summary.spicedb_relationships,
                        "reading SpiceDB"
                    );
                }
            }
        }
    }
    stage::insert(&mut conn, &buffer).await?;
    drop(buffer);
    bar.finish_and_clear();
    summary.spicedb_resources = stage::fold(&mut conn).await?;
    tracing::info!(
        relationships = summary.spicedb_relationships,
        resources = summary.spicedb_resources,
        "read SpiceDB; classifying against PostgreSQL"
    );

    let (consistent, classified_at) = stage::classify(&mut conn, options.grace).await?;
    summary.consistent = consistent;
    let owner = options.owner_principal.as_ref().map(Principal::as_value);
    stage::resolve_principals(&mut conn, owner.as_ref()).await?;
    stage::count(&mut conn, &mut summary).await?;
    summary.drift = summary.drift();
    tracing::info!(?summary, "classified");

    let refused = if options.apply && !options.force {
        limit_check(&summary, options.max_deregisters)
    } else {
        None
    };
    let apply = options.apply && refused.is_none();

    let mut enqueued = 0;
    let mut changed_meanwhile = 0;
    let mut after = 0;
    loop {
        let page = stage::page(&mut conn, after, FINDINGS_PAGE).await?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        let skip: HashSet<(String, String)> = if apply {
            let resources: Vec<(&str, &str)> = page
                .iter()
                .map(|f| (f.resource_type.as_str(), f.resource_id.as_str()))
                .collect();
            stage::changed_since(&mut conn, &resources, classified_at)
                .await?
                .into_iter()
                .collect()
        } else {
            HashSet::new()
        };
        let mut rows = Vec::new();
        let mut findings = Vec::with_capacity(page.len());
        for staged in &page {
            let Some(kind) = staged.kind() else { continue };
            let fix = fix_for(kind, staged);
            let changed =
                skip.contains(&(staged.resource_type.clone(), staged.resource_id.clone()));
            changed_meanwhile += u64::from(changed);
            let will_enqueue = apply && !changed && !fix.is_empty();
            if will_enqueue {
                rows.extend(fix.iter().cloned());
            }
            findings.push(Finding {
                kind,
                resource: format!("{}:{}", staged.resource_type, staged.resource_id),
                reason: staged.reason.clone(),
                row_parent: staged.row_parent.clone(),
                spicedb_parents: staged.held_parents.clone(),
                owner: staged
                    .owner_type
                    .as_ref()
                    .zip(staged.owner_id.as_ref())
                    .map(|(t, i)| format!("{t}:{i}")),
                fix: describe(kind),
                enqueued: will_enqueue,
            });
        }
        if !rows.is_empty() {
            let mut tx = conn.begin().await?;
            enqueued += enqueue(&mut tx, &rows, ORIGIN).await?.len() as u64;
            tx.commit().await?;
        }
        for finding in &findings {
            on_finding(finding);
        }
    }
    if changed_meanwhile > 0 {
        tracing::info!(
            changed_meanwhile,
            "left resources the outbox touched during the run to their rows"
        );
    }

    let run_id = stage::record_run(&mut conn, started_at, apply, &summary).await?;
    stage::drop_all(&mut conn).await?;
    tracing::info!(
        run_id,
        applied = apply,
        enqueued,
        drift = summary.drift,
        "reconcile done"
    );
    Ok(ReconcileReport {
        summary,
        applied: apply,
        enqueued,
        changed_meanwhile,
        refused,
        run_id,
    })
}

/// The deregister limits `apply` respects unless forced.
pub fn limit_check(summary: &Summary, max_deregisters: u64) -> Option<Refusal> {
    let count = summary.deregisters();
    if count > max_deregisters {
        return Some(Refusal::TooManyDeregisters {
            count,
            limit: max_deregisters,
        });
    }
    if count * 2 > summary.spicedb_resources {
        return Some(Refusal::MostOfSpiceDb {
            count,
            held: summary.spicedb_resources,
        });
    }
    None
}

fn describe(kind: FindingKind) -> String {
    match kind {
        FindingKind::Orphan => "deregister (guarded)",
        FindingKind::Missing => "register",
        FindingKind::ParentMismatch => "deregister + register",
        FindingKind::NeedsOwner => "none: needs --owner-principal",
    }
    .to_string()
}

/// The outbox rows that heal one finding.
fn fix_for(kind: FindingKind, f: &stage::StagedFinding) -> Vec<NewRow> {
    let Ok(resource) = ResourceRef::new(&f.resource_type, &f.resource_id) else {
        return Vec::new();
    };
    let principal = f
        .principal
        .clone()
        .and_then(|p| Principal::from_value(p).ok());
    let parent = match &f.row_parent {
        Some(agent) if resource.kind == crate::domain::ResourceType::API_KEY => {
            ResourceRef::new("agent", agent).ok()
        }
        _ => None,
    };
    let deregister = |guarded| NewRow {
        operation: Operation::Deregister,
        resource: resource.clone(),
        parent: None,
        principal: principal.clone(),
        guarded,
    };
    let register = || NewRow {
        operation: Operation::Register,
        resource: resource.clone(),
        parent: parent.clone(),
        principal: principal.clone(),
        guarded: false,
    };
    match kind {
        // The row may come back before delivery: the worker re-checks.
        FindingKind::Orphan => vec![deregister(true)],
        FindingKind::Missing if principal.is_some() => vec![register()],
        // The row exists, so the deregister must not be guarded (it would
        // always be superseded); the register right behind it restores it.
        FindingKind::ParentMismatch if principal.is_some() => {
            vec![deregister(false), register()]
        }
        _ => Vec::new(),
    }
}

fn progress_bar(enabled: bool) -> ProgressBar {
    if !enabled || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} reading SpiceDB: {human_pos} relationships ({per_sec})",
    ) {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_refuse_many_or_most() {
        let s = Summary {
            orphan: 6,
            spicedb_resources: 100,
            ..Summary::default()
        };
        assert_eq!(limit_check(&s, 1000), None);
        assert_eq!(
            limit_check(&s, 5),
            Some(Refusal::TooManyDeregisters { count: 6, limit: 5 })
        );
        let s = Summary {
            orphan: 6,
            spicedb_resources: 11,
            ..Summary::default()
        };
        assert_eq!(
            limit_check(&s, 1000),
            Some(Refusal::MostOfSpiceDb { count: 6, held: 11 })
        );
    }
}
