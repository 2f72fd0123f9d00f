//! The page's reads. Each one is answered from an index and bounded (a
//! LIMIT, keyset pages, or a window of one hour), so a page costs the same
//! with a million rows in the outbox as with ten.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;

/// Rows per page of the dead-row list.
pub const DEAD_PAGE: i64 = 50;
/// Rows of one resource's history shown (newest first).
pub const HISTORY_LIMIT: i64 = 200;
/// Reconcile runs per page.
pub const RUNS_PAGE: i64 = 30;
/// Findings kept (and shown) per run started from the page.
pub const FINDINGS_KEPT: usize = 1000;

/// Per resource type, what the overview's table shows besides the
/// pending/dead counts `outbox::stats` gives.
#[derive(Debug, Clone, Default)]
pub struct TypeActivity {
    pub in_flight: i64,
    pub delivered_last_hour: i64,
}

/// Leased pending rows per type (the pending rows' partial indexes).
pub async fn in_flight(
    pool: &PgPool,
) -> Result<std::collections::BTreeMap<String, i64>, sqlx::Error> {
    const SQL: &str = r#"
        SELECT resource_type, count(*)::bigint FROM authz_outbox
        WHERE state = 'pending' AND locked_until > now()
        GROUP BY resource_type
    "#;
    let rows: Vec<(String, i64)> = sqlx::query_as(SQL).fetch_all(pool).await?;
    Ok(rows.into_iter().collect())
}

/// A worker seen through the database: holding leases now, or asleep
/// waiting for work.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Replica {
    pub worker_id: String,
    pub leased: i64,
    pub asleep_since: Option<DateTime<Utc>>,
}

pub async fn replicas(pool: &PgPool) -> Result<Vec<Replica>, sqlx::Error> {
    const SQL: &str = r#"
        SELECT coalesce(l.worker_id, h.locked_by) AS worker_id,
               coalesce(h.leased, 0)::bigint AS leased,
               l.sleeping_since AS asleep_since
        FROM (SELECT locked_by, count(*) AS leased FROM authz_outbox
              WHERE state = 'pending' AND locked_until > now() AND locked_by IS NOT NULL
              GROUP BY locked_by) h
        FULL JOIN authz_outbox_listeners l ON l.worker_id = h.locked_by
        ORDER BY 1
        LIMIT 100
    "#;
    sqlx::query_as(SQL).fetch_all(pool).await
}

/// A reconcile run's record.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Run {
    pub id: i64,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub applied: bool,
    pub drift: i64,
    pub summary: Value,
}

/// The columns of [`Run`], as a macro so the statements stay literals.
macro_rules! run_columns {
    () => {
        "r.id, r.started_at, r.finished_at, r.applied, r.drift, r.summary"
    };
}

/// Runs newest first, `RUNS_PAGE` of them with ids below `before`.
pub async fn runs(pool: &PgPool, before: Option<i64>) -> Result<Vec<Run>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        run_columns!(),
        " FROM authz_outbox_reconcile_runs r \
         WHERE ($1::bigint IS NULL OR r.id < $1) ORDER BY r.id DESC LIMIT $2"
    ))
    .bind(before)
    .bind(RUNS_PAGE)
    .fetch_all(pool)
    .await
}

pub async fn run(pool: &PgPool, id: i64) -> Result<Option<Run>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        run_columns!(),
        " FROM authz_outbox_reconcile_runs r WHERE r.id = $1"
    ))
    .bind(id)
    .fetch_optional(pool)
    .await
}

/// Whether the page's database role lacks a grant (SQLSTATE 42501): the
/// worker's role, by design, cannot read what only reconcile needs, and
/// the page then says so instead of failing.
pub fn permission_denied(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().as_deref() == Some("42501"))
}

/// How many findings are kept per run, for these runs; `None` when the
/// page's role cannot read them.
pub async fn findings_kept(
    pool: &PgPool,
    run_ids: &[i64],
) -> Result<Option<std::collections::HashMap<i64, i64>>, sqlx::Error> {
    let counts: Result<Vec<(i64, i64)>, _> = sqlx::query_as(
        "SELECT run_id, count(*)::bigint FROM authz_outbox_reconcile_findings \
         WHERE run_id = ANY($1) GROUP BY run_id",
    )
    .bind(run_ids)
    .fetch_all(pool)
    .await;
    match counts {
        Ok(counts) => Ok(Some(counts.into_iter().collect())),
        Err(e) if permission_denied(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// One stored finding of a run.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StoredFinding {
    pub kind: String,
    pub resource: String,
    pub reason: String,
    pub fix: String,
    pub enqueued: bool,
}

/// A run's kept findings; `None` when the page's role cannot read them.
pub async fn findings(
    pool: &PgPool,
    run_id: i64,
) -> Result<Option<Vec<StoredFinding>>, sqlx::Error> {
    let found = sqlx::query_as(
        "SELECT kind, resource, reason, fix, enqueued FROM authz_outbox_reconcile_findings \
         WHERE run_id = $1 ORDER BY seq LIMIT $2",
    )
    .bind(run_id)
    .bind(FINDINGS_KEPT as i64)
    .fetch_all(pool)
    .await;
    match found {
        Ok(found) => Ok(Some(found)),
        Err(e) if permission_denied(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Keeps the first [`FINDINGS_KEPT`] findings of a run.
pub async fn store_findings(
    pool: &PgPool,
    run_id: i64,
    findings: &[crate::reconcile::Finding],
) -> Result<(), sqlx::Error> {
    let kept = &findings[..findings.len().min(FINDINGS_KEPT)];
    let seq: Vec<i32> = (0..kept.len() as i32).collect();
    let kinds: Vec<&str> = kept.iter().map(|f| f.kind.as_str()).collect();
    let resources: Vec<&str> = kept.iter().map(|f| f.resource.as_str()).collect();
    let reasons: Vec<&str> = kept.iter().map(|f| f.reason.as_str()).collect();
    let fixes: Vec<&str> = kept.iter().map(|f| f.fix.as_str()).collect();
    let enqueued: Vec<bool> = kept.iter().map(|f| f.enqueued).collect();
    sqlx::query(
        "INSERT INTO authz_outbox_reconcile_findings (run_id, seq, kind, resource, reason, fix, enqueued) \
         SELECT $1, * FROM unnest($2::int[], $3::text[], $4::text[], $5::text[], $6::text[], $7::bool[])",
    )
    .bind(run_id)
    .bind(&seq)
    .bind(&kinds)
    .bind(&resources)
    .bind(&reasons)
    .bind(&fixes)
    .bind(&enqueued)
    .execute(pool)
    .await?;
    Ok(())
}

/// What the dead-row list is narrowed by.
#[derive(Debug, Clone, Default)]
pub struct DeadFilter {
    pub resource_type: Option<String>,
    /// Case-insensitive substring of the last error.
    pub error: Option<String>,
    /// Went dead at or after.
    pub since: Option<DateTime<Utc>>,
    /// Went dead at or before.
    pub until: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeadRow {
    pub id: i64,
    pub resource_type: String,
    pub resource_id: String,
    pub parent_type: Option<String>,
    pub parent_id: Option<String>,
    pub operation: String,
    pub principal: Option<Value>,
    pub principal_source: Option<String>,
    pub origin: String,
    pub attempts: i32,
    pub last_status: Option<i32>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// Where a page of dead rows starts: after this row (the last of the
/// previous page) in the list's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeadCursor {
    pub finished_at: DateTime<Utc>,
    pub id: i64,
}

impl DeadCursor {
    /// `MICROS.ID`, as the pager's link writes it.
    pub fn parse(s: &str) -> Option<Self> {
        let (micros, id) = s.split_once('.')?;
        Some(DeadCursor {
            finished_at: DateTime::from_timestamp_micros(micros.parse().ok()?)?,
            id: id.parse().ok()?,
        })
    }

    pub fn of(row: &DeadRow) -> Option<Self> {
        Some(DeadCursor {
            finished_at: row.finished_at?,
            id: row.id,
        })
    }

    pub fn encode(&self) -> String {
        format!("{}.{}", self.finished_at.timestamp_micros(), self.id)
    }
}

/// One page of dead rows, newest dead first, after `after`. Walks the dead
/// rows' partial index by time (authz_outbox_dead_by_time) backwards; the
/// filters narrow within it, so a page reads at most the dead rows.
pub async fn dead(
    pool: &PgPool,
    filter: &DeadFilter,
    after: Option<DeadCursor>,
) -> Result<Vec<DeadRow>, sqlx::Error> {
    const SQL: &str = r#"
        SELECT id, resource_type, resource_id, parent_type, parent_id, operation, principal,
               principal_source, origin, attempts, last_status, last_error, created_at, finished_at
        FROM authz_outbox
        WHERE state = 'dead'
          AND ($1::text IS NULL OR resource_type = $1)
          AND ($2::text IS NULL OR strpos(lower(coalesce(last_error, '')), lower($2)) > 0)
          AND ($3::timestamptz IS NULL OR finished_at >= $3)
          AND ($4::timestamptz IS NULL OR finished_at <= $4)
          AND ($5::timestamptz IS NULL OR (finished_at, id) < ($5, $6))
        ORDER BY finished_at DESC, id DESC
        LIMIT $7
    "#;
    sqlx::query_as(SQL)
        .bind(filter.resource_type.as_deref())
        .bind(filter.error.as_deref())
        .bind(filter.since)
        .bind(filter.until)
        .bind(after.map(|c| c.finished_at))
        .bind(after.map(|c| c.id))
        .bind(DEAD_PAGE)
        .fetch_all(pool)
        .await
}

/// The ids of every dead row the filter selects, newest first, at most
/// `limit` (a whole-filter replay passes them to replay, which re-checks
/// each under its lock).
pub async fn dead_ids(
    pool: &PgPool,
    filter: &DeadFilter,
    limit: i64,
) -> Result<Vec<i64>, sqlx::Error> {
    const SQL: &str = r#"
        SELECT id FROM authz_outbox
        WHERE state = 'dead'
          AND ($1::text IS NULL OR resource_type = $1)
          AND ($2::text IS NULL OR strpos(lower(coalesce(last_error, '')), lower($2)) > 0)
          AND ($3::timestamptz IS NULL OR finished_at >= $3)
          AND ($4::timestamptz IS NULL OR finished_at <= $4)
        ORDER BY finished_at DESC, id DESC
        LIMIT $5
    "#;
    sqlx::query_scalar(SQL)
        .bind(filter.resource_type.as_deref())
        .bind(filter.error.as_deref())
        .bind(filter.since)
        .bind(filter.until)
        .bind(limit)
        .fetch_all(pool)
        .await
}

/// One row of a resource's history.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct HistoryRow {
    pub id: i64,
    pub operation: String,
    pub state: String,
    pub attempts: i32,
    pub parent_type: Option<String>,
    pub parent_id: Option<String>,
    pub principal: Option<Value>,
    pub origin: String,
    pub last_status: Option<i32>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub locked_by: Option<String>,
}

/// A resource's outbox rows, newest first (authz_outbox_by_resource).
pub async fn history(
    pool: &PgPool,
    resource_type: &str,
    selector: &str,
) -> Result<Vec<HistoryRow>, sqlx::Error> {
    sqlx::query_as(
        r#"
        SELECT id, operation, state, attempts, parent_type, parent_id, principal, origin,
               last_status, last_error, created_at, finished_at,
               CASE WHEN locked_until > now() THEN locked_by END AS locked_by
        FROM authz_outbox
        WHERE resource_type = $1 AND resource_id = $2
        ORDER BY id DESC
        LIMIT $3
        "#,
    )
    .bind(resource_type)
    .bind(selector)
    .bind(HISTORY_LIMIT)
    .fetch_all(pool)
    .await
}

/// What the mappings say SpiceDB should hold for one resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Desired {
    /// A live row maps to it, with this parent (type, id) if any.
    Live(Option<(String, String)>),
    /// No live row maps to it.
    Gone,
    /// The page's role cannot read `authz_outbox_desired`.
    Unreadable,
}

pub async fn desired(
    pool: &PgPool,
    resource_type: &str,
    selector: &str,
) -> Result<Desired, sqlx::Error> {
    let found: Result<Option<(Option<String>, Option<String>)>, _> = sqlx::query_as(
        "SELECT parent_type, parent_id FROM authz_outbox_desired \
         WHERE resource_type = $1 AND resource_id = $2 LIMIT 1",
    )
    .bind(resource_type)
    .bind(selector)
    .fetch_optional(pool)
    .await;
    match found {
        Ok(Some((Some(t), Some(id)))) => Ok(Desired::Live(Some((t, id)))),
        Ok(Some(_)) => Ok(Desired::Live(None)),
        Ok(None) => Ok(Desired::Gone),
        Err(e) if permission_denied(&e) => Ok(Desired::Unreadable),
        Err(e) => Err(e),
    }
}

/// An installed mapping.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct InstalledMapping {
    pub name: String,
    pub resource_type: String,
    pub table_name: String,
    pub join_table: Option<String>,
    pub definition: Value,
    pub ddl: String,
    pub installed_at: DateTime<Utc>,
}

pub async fn mappings(pool: &PgPool) -> Result<Vec<InstalledMapping>, sqlx::Error> {
    sqlx::query_as(
        "SELECT name, resource_type, table_name, join_table, definition, ddl, installed_at \
         FROM authz_outbox_mappings ORDER BY resource_type, name LIMIT 500",
    )
    .fetch_all(pool)
    .await
}
