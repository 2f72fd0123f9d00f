//! Read-only summaries of the outbox, for `status` and the metrics endpoint.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use std::collections::BTreeMap;

/// Counts and ages an operator looks at first.
#[derive(Debug, Clone, Serialize, Default)]
pub struct OutboxStats {
    /// Rows per state; every state is present, zero or not.
    pub counts: BTreeMap<String, i64>,
    /// Rows per state and operation (`"pending"` → `"register"` → N).
    pub by_operation: BTreeMap<String, BTreeMap<String, i64>>,
    /// Age of the oldest pending row, 0 when nothing is pending.
    pub oldest_pending_age_seconds: f64,
    /// Pending rows currently leased by a live worker.
    pub leased: i64,
    /// The same per resource type: every type with an installed mapping
    /// (every state present, zero or not), and any other type the outbox
    /// holds rows of.
    pub by_type: BTreeMap<String, TypeStats>,
    /// The newest dead rows, newest first.
    pub recent_dead: Vec<DeadRow>,
    /// Roles that can INSERT, UPDATE or DELETE `authz_outbox` directly
    /// besides its owner, superusers and the documented worker and
    /// reconcile roles: each could forge who owns what (`status` only).
    pub direct_writers: Vec<String>,
    /// The outbox's partitions, oldest first (`status` only).
    pub partitions: Vec<super::partitions::Partition>,
}

/// The roles the operations guide grants outbox writes to.
pub const DOCUMENTED_ROLES: [&str; 2] = ["authz_outbox_worker", "authz_outbox_reconcile"];

/// See [`OutboxStats::direct_writers`]. A role that holds a grant through
/// membership counts (PostgreSQL's own privilege check decides).
pub async fn direct_writers(pool: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        r#"
        SELECT r.rolname::text
        FROM pg_roles r, (SELECT c.oid, c.relowner FROM pg_class c
                          WHERE c.oid = to_regclass('authz_outbox')) AS o
        WHERE NOT r.rolsuper
          AND r.oid <> o.relowner
          AND r.rolname NOT LIKE 'pg\_%'
          AND r.rolname <> ALL ($1)
          AND (has_table_privilege(r.oid, o.oid, 'INSERT')
               OR has_table_privilege(r.oid, o.oid, 'UPDATE')
               OR has_table_privilege(r.oid, o.oid, 'DELETE'))
        ORDER BY 1
        "#,
    )
    .bind(DOCUMENTED_ROLES)
    .fetch_all(pool)
    .await
}

/// Counts and the oldest pending age of one resource type.
#[derive(Debug, Clone, Serialize, Default, PartialEq)]
pub struct TypeStats {
    /// Rows per state; every state is present.
    pub counts: BTreeMap<String, i64>,
    /// Age of the type's oldest pending row, 0 when none is pending.
    pub oldest_pending_age_seconds: f64,
    /// Rows per source of their principal (`setting`, `role_default`,
    /// `column:<name>`, `reconcile`, `replay`; `none` when unrecorded): a
    /// type whose rows all say `role_default` is not getting its users.
    pub by_principal_source: BTreeMap<String, i64>,
}

impl TypeStats {
    fn zero(states: &[&str]) -> Self {
        TypeStats {
            counts: states.iter().map(|s| (s.to_string(), 0)).collect(),
            oldest_pending_age_seconds: 0.0,
            by_principal_source: BTreeMap::new(),
        }
    }
}

/// Which rows a collection counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every state: `status`, and the metrics now and then.
    All,
    /// Pending and dead rows only, read through their partial indexes: what
    /// alerts watch, cheap enough for every few seconds. Counting delivered
    /// and superseded rows reads the whole table (the rows kept for
    /// `--retention`): 0.4 s at a million rows, against under 1 ms for these.
    Live,
}

impl Scope {
    fn states(self) -> &'static [&'static str] {
        match self {
            Scope::All => &super::STATES,
            Scope::Live => &["pending", "dead"],
        }
    }
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct DeadRow {
    pub id: i64,
    pub operation: String,
    pub resource_type: String,
    pub resource_id: String,
    pub attempts: i32,
    pub last_status: Option<i32>,
    pub last_error: Option<String>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// Collects [`OutboxStats`] over `scope` (the counts hold exactly its
/// states), with up to `dead_limit` recent dead rows.
pub async fn collect(
    pool: &PgPool,
    scope: Scope,
    dead_limit: i64,
) -> Result<OutboxStats, sqlx::Error> {
    const COUNTS: &str = r#"
        SELECT resource_type, state, operation, coalesce(principal_source, 'none'), count(*)::bigint,
               coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8
        FROM authz_outbox
        GROUP BY resource_type, state, operation, principal_source
    "#;
    // An OR of the two partial indexes' predicates, so both are used.
    const LIVE_COUNTS: &str = r#"
        SELECT resource_type, state, operation, coalesce(principal_source, 'none'), count(*)::bigint,
               coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8
        FROM authz_outbox
        WHERE state = 'pending' OR state = 'dead'
        GROUP BY resource_type, state, operation, principal_source
    "#;
    const PENDING: &str = r#"
        SELECT coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8,
               count(*) FILTER (WHERE locked_until > now())::bigint
        FROM authz_outbox
        WHERE state = 'pending'
    "#;
    const DEAD: &str = r#"
        SELECT id, operation, resource_type, resource_id, attempts, last_status, last_error, finished_at
        FROM authz_outbox
        WHERE state = 'dead'
        ORDER BY finished_at DESC NULLS LAST, id DESC
        LIMIT $1
    "#;
    let states = scope.states();
    let mut stats = OutboxStats::default();
    for state in states {
        stats.counts.insert(state.to_string(), 0);
    }
    for resource_type in installed_types(pool).await? {
        stats.by_type.insert(resource_type, TypeStats::zero(states));
    }
    let counts = match scope {
        Scope::All => COUNTS,
        Scope::Live => LIVE_COUNTS,
    };
    let rows: Vec<(String, String, String, String, i64, f64)> =
        sqlx::query_as(counts).fetch_all(pool).await?;
    for (resource_type, state, operation, source, n, age) in rows {
        *stats.counts.entry(state.clone()).or_default() += n;
        *stats
            .by_operation
            .entry(state.clone())
            .or_default()
            .entry(operation)
            .or_default() += n;
        let by_type = stats
            .by_type
            .entry(resource_type)
            .or_insert_with(|| TypeStats::zero(states));
        *by_type.counts.entry(state.clone()).or_default() += n;
        *by_type.by_principal_source.entry(source).or_default() += n;
        if state == "pending" {
            by_type.oldest_pending_age_seconds = by_type.oldest_pending_age_seconds.max(age);
        }
    }
    let (age, leased): (f64, i64) = sqlx::query_as(PENDING).fetch_one(pool).await?;
    stats.oldest_pending_age_seconds = age.max(0.0);
    stats.leased = leased;
    stats.recent_dead = sqlx::query_as(DEAD)
        .bind(dead_limit)
        .fetch_all(pool)
        .await?;
    Ok(stats)
}

/// The resource types with an installed mapping (`authz_outbox_mappings`,
/// written by `migrate`), in name order.
pub async fn installed_types<'e, E: sqlx::PgExecutor<'e>>(
    executor: E,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT DISTINCT resource_type FROM authz_outbox_mappings ORDER BY resource_type",
    )
    .fetch_all(executor)
    .await
}

/// The outcome of the latest reconcile run, if any ran.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct LastReconcile {
    pub drift: i64,
    pub finished_at: DateTime<Utc>,
}

pub async fn last_reconcile(pool: &PgPool) -> Result<Option<LastReconcile>, sqlx::Error> {
    sqlx::query_as(
        "SELECT drift, finished_at FROM authz_outbox_reconcile_runs ORDER BY id DESC LIMIT 1",
    )
    .fetch_optional(pool)
    .await
}
