//! Reconcile: measure the drift between SpiceDB and PostgreSQL, and heal it
//! through the outbox.
//!
//! A run reads SpiceDB first ([`spicedb`]) for every resource type with an
//! installed resource mapping (or those `types` names), decodes object ids
//! into selectors ([`encoding`]), streams the relationships into a
//! temporary table ([`stage`]), classifies every resource with SQL joins
//! against `authz_outbox_desired` — what the mappings say SpiceDB should
//! hold: live rows, with their selector and parent — and the outbox, and
//! streams the findings out ([`report`]). With `apply` it enqueues fixes as ordinary
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
//! - Orphan deregisters are *guarded*: the worker re-checks at delivery,
//!   through the same mapping (`authz_outbox_resource_live`), that the
//!   resource is still not live, and supersedes the row if it is.
//! - `apply` refuses, for any one resource type, more than `max_deregisters`
//!   deregisters or more than half of what SpiceDB holds of that type,
//!   unless `force`: pointed at the wrong database, or with one host table
//!   emptied, reconcile must not revoke a whole type, even while the other
//!   types look fine.

pub mod encoding;
pub mod expected;
pub mod report;
pub mod spicedb;
pub mod stage;

use std::collections::HashSet;
use std::io::IsTerminal;
use std::time::Duration;

use chrono::Utc;
use indicatif::{ProgressBar, ProgressStyle};
use sqlx::{Acquire, PgPool};

use crate::domain::{Operation, Principal, ResourceRef, ResourceType};
use crate::outbox::enqueue::{NewRow, enqueue};
pub use encoding::SelectorEncoding;
pub use expected::Writer;
pub use report::{Finding, FindingKind, Printer, Summary, TypeCounts};
pub use spicedb::{SpiceDbConfig, SpiceDbError, SpiceDbReader};

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
    /// Owner edges beyond the registered principals are not drift (shares
    /// written through agentex-auth's grant endpoint).
    pub ignore_extra_owners: bool,
    /// Show a progress bar on stderr (the CLI sets it when stderr is a TTY).
    pub progress: bool,
    /// Compare only these types; empty = every type with an installed
    /// mapping. A type without one is an error.
    pub types: Vec<ResourceType>,
    /// How object ids read from SpiceDB decode into selectors.
    pub selector_encoding: SelectorEncoding,
    /// Whose relationships the resources are judged by (the target `run`
    /// delivers to).
    pub writer: Writer,
}

impl Default for ReconcileOptions {
    fn default() -> Self {
        ReconcileOptions {
            apply: false,
            force: false,
            grace: Duration::from_secs(300),
            max_deregisters: 1000,
            owner_principal: None,
            ignore_extra_owners: false,
            progress: false,
            types: Vec::new(),
            selector_encoding: SelectorEncoding::default(),
            writer: Writer::default(),
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
    #[error("no resource mappings are installed; run `authz-outbox migrate` first")]
    NoMappings,
    #[error("an installed resource mapping cannot be read: {0}")]
    Mapping(String),
    #[error(
        "no mapping is installed for type {requested} (installed: {installed}); \
         run `authz-outbox migrate` with a mapping for it, or leave it out of --type"
    )]
    NotInstalled {
        requested: String,
        installed: String,
    },
}

/// Why `apply` enqueued nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "refusing to apply: {count} {resource_type} deregisters exceed --max-deregisters \
         ({limit}); check DATABASE_URL, the {resource_type} mapping's table and the SpiceDB \
         endpoint, leave it out with --type, or pass --force"
    )]
    TooManyDeregisters {
        resource_type: String,
        count: u64,
        limit: u64,
    },
    #[error(
        "refusing to apply: {count} {resource_type} deregisters would revoke more than half of \
         the {held} {resource_type} resources SpiceDB holds; check DATABASE_URL, the \
         {resource_type} mapping's table and the SpiceDB endpoint, leave it out with --type, \
         or pass --force"
    )]
    MostOfSpiceDb {
        resource_type: String,
        count: u64,
        held: u64,
    },
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
    // Temporary tables live in one session; a detached connection closes
    // when the run ends, taking them with it even if the run fails.
    let mut conn = pool.acquire().await?.detach();
    let types = selected_types(&mut conn, &options.types).await?;
    let expectations = expected::load(&mut conn, &types, options.writer).await?;
    let reader = SpiceDbReader::connect(spicedb).await?;
    stage::create(&mut conn).await?;
    expected::stage(&mut conn, &expectations).await?;

    let bar = progress_bar(options.progress);
    let mut summary = Summary::for_types(&types);
    let mut batch = stage::Batch::with_capacity(stage::INSERT_BATCH);
    let mut undecodable = 0u64;
    for expectation in &expectations {
        let resource_type = &expectation.resource_type;
        let mut pages = reader.pages(resource_type);
        while let Some(page) = pages.next_page().await? {
            summary.spicedb_relationships += page.len() as u64;
            bar.inc(page.len() as u64);
            for tuple in page {
                let owner = expectation.is_owner_relation(&tuple.relation);
                let (tuple, bad) = decode(tuple, options.selector_encoding, owner);
                undecodable += u64::from(bad);
                batch.push(tuple, bad);
            }
            if batch.len() >= stage::INSERT_BATCH {
                stage::insert(&mut conn, &batch).await?;
                batch.clear();
                if summary.spicedb_relationships % 100_000 < stage::INSERT_BATCH as u64 {
                    tracing::info!(
                        relationships = summary.spicedb_relationships,
                        "reading SpiceDB"
                    );
                }
            }
        }
    }
    stage::insert(&mut conn, &batch).await?;
    drop(batch);
    bar.finish_and_clear();
    if undecodable > 0 {
        tracing::warn!(
            relationships = undecodable,
            encoding = %options.selector_encoding,
            "object ids not in the selector encoding; check --selector-encoding"
        );
    }
    stage::fold(&mut conn, &mut summary).await?;
    stage::registered(&mut conn).await?;
    summary.total();
    tracing::info!(
        relationships = summary.spicedb_relationships,
        resources = summary.spicedb_resources,
        types = ?types,
        "read SpiceDB; classifying against the resource mappings"
    );

    let classified_at = stage::classify(
        &mut conn,
        options.selector_encoding.as_str(),
        options.grace,
        !options.ignore_extra_owners,
        &mut summary,
    )
    .await?;
    let owner = options.owner_principal.as_ref().map(Principal::as_value);
    stage::resolve_principals(&mut conn, owner.as_ref()).await?;
    stage::count(&mut conn, &mut summary).await?;
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
                fix: describe(kind, staged.undecodable),
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

/// The resource types a run compares: every type with an installed mapping
/// (`authz_outbox_mappings`), or those of `requested`, each of which must
/// have one.
pub async fn selected_types(
    conn: &mut sqlx::PgConnection,
    requested: &[ResourceType],
) -> Result<Vec<String>, ReconcileError> {
    let installed = crate::outbox::stats::installed_types(&mut *conn).await?;
    if installed.is_empty() {
        return Err(ReconcileError::NoMappings);
    }
    if requested.is_empty() {
        return Ok(installed);
    }
    let mut types = Vec::new();
    for t in requested {
        let t = t.as_str().to_string();
        if !installed.contains(&t) {
            return Err(ReconcileError::NotInstalled {
                requested: t,
                installed: installed.join(", "),
            });
        }
        if !types.contains(&t) {
            types.push(t);
        }
    }
    types.sort();
    Ok(types)
}

/// A relationship with its resource's object id (and its subject's, where
/// it decodes) turned back into selectors. `true` when the resource's object
/// id is not in the encoding: it is staged as read and reported, never
/// healed (a deregister of it would name a different object). The subject
/// of an `owner` relation (one only the writer names) is a principal's id,
/// written as it is: it is compared with the registered principal as read.
fn decode(
    mut tuple: spicedb::Tuple,
    encoding: SelectorEncoding,
    owner: bool,
) -> (spicedb::Tuple, bool) {
    let bad = match encoding.decode(&tuple.resource_id) {
        Ok(Some(selector)) => {
            tuple.resource_id = selector;
            false
        }
        Ok(None) => false,
        Err(_) => true,
    };
    // Parents and column-named subjects decode the same way; a subject id
    // that does not decode is kept as read.
    if !owner && let Ok(Some(subject)) = encoding.decode(&tuple.subject_id) {
        tuple.subject_id = subject;
    }
    (tuple, bad)
}

/// The deregister limits `apply` respects unless forced, per resource type:
/// more than `max_deregisters`, or more than half of what SpiceDB holds of
/// that type, refuses the whole run (the first type in name order is named).
pub fn limit_check(summary: &Summary, max_deregisters: u64) -> Option<Refusal> {
    for (resource_type, counts) in &summary.by_type {
        let count = counts.deregisters();
        if count > max_deregisters {
            return Some(Refusal::TooManyDeregisters {
                resource_type: resource_type.clone(),
                count,
                limit: max_deregisters,
            });
        }
        if count * 2 > counts.spicedb_resources {
            return Some(Refusal::MostOfSpiceDb {
                resource_type: resource_type.clone(),
                count,
                held: counts.spicedb_resources,
            });
        }
    }
    None
}

fn describe(kind: FindingKind, undecodable: bool) -> String {
    match kind {
        FindingKind::Orphan if undecodable => "none: object id not in the selector encoding",
        FindingKind::Orphan => "deregister (guarded)",
        FindingKind::Missing => "register",
        FindingKind::ParentMismatch | FindingKind::SubjectMismatch | FindingKind::OwnerMismatch => {
            "deregister + register"
        }
        FindingKind::NeedsOwner => "none: needs --owner-principal",
    }
    .to_string()
}

/// The outbox rows that heal one finding.
fn fix_for(kind: FindingKind, f: &stage::StagedFinding) -> Vec<NewRow> {
    if f.undecodable {
        return Vec::new();
    }
    let Ok(resource) = ResourceRef::new(&f.resource_type, &f.resource_id) else {
        return Vec::new();
    };
    let principal = f
        .principal
        .clone()
        .and_then(|p| Principal::from_value(p).ok());
    // The parent the live row names, as its mapping reads it.
    let parent = match (&f.row_parent_type, &f.row_parent) {
        (Some(kind), Some(id)) => ResourceRef::new(kind, id).ok(),
        _ => None,
    };
    let deregister = |guarded| NewRow {
        operation: Operation::Deregister,
        resource: resource.clone(),
        parent: None,
        principal: principal.clone(),
        guarded,
        attributes: None,
    };
    let register_as = |principal: Option<Principal>| NewRow {
        operation: Operation::Register,
        resource: resource.clone(),
        parent: parent.clone(),
        principal,
        guarded: false,
        attributes: f.attributes.clone(),
    };
    let register = || register_as(principal.clone());
    match kind {
        // The row may come back before delivery: the worker re-checks.
        FindingKind::Orphan => vec![deregister(true)],
        // Without a principal only where the mapping needs none (`creator =
        // []`): every other such finding became `needs_owner`
        // (`stage::resolve_principals`).
        FindingKind::Missing => vec![register()],
        // The row exists, so the deregister must not be guarded (it would
        // always be superseded); the register right behind it restores it.
        FindingKind::ParentMismatch | FindingKind::SubjectMismatch => {
            vec![deregister(false), register()]
        }
        // SpiceDB is to hold exactly the registered owners again: the
        // deregister removes every owner edge (agentex-auth's removes all of
        // the resource's relationships; the SpiceDB target's swaps them for
        // the first register's), then each registered principal is
        // registered again, oldest first.
        FindingKind::OwnerMismatch => {
            let registered: Vec<Principal> = match &f.registered {
                Some(serde_json::Value::Array(principals)) => principals
                    .iter()
                    .filter_map(|p| Principal::from_value(p.clone()).ok())
                    .collect(),
                _ => Vec::new(),
            };
            if registered.is_empty() {
                return Vec::new();
            }
            std::iter::once(deregister(false))
                .chain(registered.into_iter().map(|p| register_as(Some(p))))
                .collect()
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

    fn summary(types: &[(&str, u64, u64)]) -> Summary {
        let mut s = Summary::default();
        for (t, orphan, held) in types {
            s.by_type.insert(
                t.to_string(),
                TypeCounts {
                    orphan: *orphan,
                    spicedb_resources: *held,
                    ..TypeCounts::default()
                },
            );
        }
        s.total();
        s
    }

    #[test]
    fn limits_refuse_many_or_most_per_type() {
        let s = summary(&[("api_key", 6, 100)]);
        assert_eq!(limit_check(&s, 1000), None);
        assert_eq!(
            limit_check(&s, 5),
            Some(Refusal::TooManyDeregisters {
                resource_type: "api_key".into(),
                count: 6,
                limit: 5
            })
        );
        // Most of the tasks, though few of everything SpiceDB holds.
        let s = summary(&[("agent", 0, 100), ("api_key", 0, 100), ("task", 3, 4)]);
        assert_eq!(
            limit_check(&s, 1000),
            Some(Refusal::MostOfSpiceDb {
                resource_type: "task".into(),
                count: 3,
                held: 4
            })
        );
        // The cap is per type, too.
        let s = summary(&[("agent", 4, 100), ("task", 4, 100)]);
        assert_eq!(limit_check(&s, 5), None);
    }
}
