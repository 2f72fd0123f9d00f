//! The SQL half of reconcile: SpiceDB's relationships are staged in
//! TEMPORARY tables of one session, then classified against `agent_api_keys`,
//! `agents` and `authz_outbox` with joins, so a million keys and a million
//! relationships never sit in this process's memory at once.
//!
//! Everything here runs on one connection (temporary tables belong to it).

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgConnection;

use super::report::{FindingKind, Summary};
use super::spicedb::Tuple;

/// Relationships written to PostgreSQL per statement.
pub const INSERT_BATCH: usize = 5000;

/// Drops leftovers of an earlier run on this session and creates the
/// staging table.
pub async fn create(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    const SQL: &str = r#"
        DROP TABLE IF EXISTS pg_temp.reconcile_tuples, pg_temp.reconcile_held,
                             pg_temp.reconcile_findings;
        CREATE TEMPORARY TABLE reconcile_tuples (
            resource_type text NOT NULL,
            resource_id   text NOT NULL,
            relation      text NOT NULL,
            subject_type  text NOT NULL,
            subject_id    text NOT NULL
        );
    "#;
    sqlx::raw_sql(SQL).execute(conn).await?;
    Ok(())
}

/// Appends relationships to the staging table in one multi-row INSERT.
pub async fn insert(conn: &mut PgConnection, tuples: &[Tuple]) -> Result<(), sqlx::Error> {
    const SQL: &str = r#"
        INSERT INTO reconcile_tuples (resource_type, resource_id, relation, subject_type, subject_id)
        SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[])
    "#;
    if tuples.is_empty() {
        return Ok(());
    }
    let col = |f: fn(&Tuple) -> &str| tuples.iter().map(f).collect::<Vec<&str>>();
    sqlx::query(SQL)
        .bind(col(|t| &t.resource_type))
        .bind(col(|t| &t.resource_id))
        .bind(col(|t| &t.relation))
        .bind(col(|t| &t.subject_type))
        .bind(col(|t| &t.subject_id))
        .execute(conn)
        .await?;
    Ok(())
}

/// Folds the relationships into one row per resource (its owner, its parent
/// edges) and returns how many resources SpiceDB holds.
pub async fn fold(conn: &mut PgConnection) -> Result<u64, sqlx::Error> {
    const SQL: &str = r#"
        CREATE TEMPORARY TABLE reconcile_held AS
        SELECT resource_type, resource_id,
               (array_agg(subject_type ORDER BY subject_type, subject_id)
                    FILTER (WHERE relation = 'owner'))[1] AS owner_type,
               (array_agg(subject_id ORDER BY subject_type, subject_id)
                    FILTER (WHERE relation = 'owner'))[1] AS owner_id,
               coalesce(array_agg(DISTINCT subject_id)
                    FILTER (WHERE relation = 'parent_agent' AND subject_type = 'agent'),
                    '{}') AS parents
        FROM reconcile_tuples
        GROUP BY resource_type, resource_id;
        DROP TABLE reconcile_tuples;
        CREATE UNIQUE INDEX ON reconcile_held (resource_type, resource_id);
        ANALYZE reconcile_held;
    "#;
    sqlx::raw_sql(SQL).execute(&mut *conn).await?;
    let held: i64 = sqlx::query_scalar("SELECT count(*) FROM reconcile_held")
        .fetch_one(conn)
        .await?;
    Ok(held as u64)
}

/// Classifies every resource on either side and keeps what is not
/// consistent in `reconcile_findings`. Returns the count of consistent
/// resources and the database time the classification saw.
///
/// One statement, so one snapshot of keys, agents and the outbox; it runs
/// after SpiceDB was read, so a key committed during the read is a row here
/// (at worst "missing" and young), never an orphan whose tuples we revoke.
///
/// Precedence: drift is computed first; a drifted resource with a pending
/// outbox row is `in_flight` (the worker is about to change it), then one
/// younger than `grace` is `young`. Rows are aged by `created_at`; an orphan
/// has no age in SpiceDB, so it is young when any outbox row of its resource
/// was created within `grace` (a create or delete that is still settling).
pub async fn classify(
    conn: &mut PgConnection,
    grace: Duration,
) -> Result<(u64, DateTime<Utc>), sqlx::Error> {
    const SETUP: &str = r#"
        CREATE TEMPORARY TABLE reconcile_findings (
            seq           bigserial PRIMARY KEY,
            kind          text NOT NULL,
            drift_kind    text NOT NULL,
            resource_type text NOT NULL,
            resource_id   text NOT NULL,
            reason        text NOT NULL,
            row_parent    text,
            held_parents  text[] NOT NULL DEFAULT '{}',
            owner_type    text,
            owner_id      text,
            principal     jsonb
        );
    "#;
    const SQL: &str = r#"
        WITH host AS (
            SELECT 'api_key'::text AS rtype, k.id AS rid, min(k.agent_id)::text AS agent_id,
                   array_agg(k.agent_id::text) AS agent_ids, max(k.created_at) AS created_at
            FROM agent_api_keys k
            GROUP BY k.id
            UNION ALL
            SELECT 'agent', a.id::text, NULL, '{}'::text[], a.created_at
            FROM agents a
        ),
        joined AS (
            SELECT coalesce(h.rtype, s.resource_type) AS rtype,
                   coalesce(h.rid, s.resource_id) AS rid,
                   h.rid IS NOT NULL AS has_row, h.agent_id, h.agent_ids, h.created_at,
                   s.resource_id IS NOT NULL AS has_tuples,
                   s.owner_type, s.owner_id, coalesce(s.parents, '{}') AS parents
            FROM host h
            FULL JOIN reconcile_held s
                   ON s.resource_type = h.rtype AND s.resource_id = h.rid
        ),
        drift AS (
            SELECT j.*,
                   CASE
                       WHEN NOT j.has_row THEN 'orphan'
                       WHEN NOT j.has_tuples THEN 'missing'
                       WHEN j.rtype = 'api_key' AND NOT (j.parents <@ j.agent_ids) THEN 'parent_mismatch'
                       WHEN j.owner_id IS NULL THEN 'missing'
                       WHEN j.rtype = 'api_key' AND NOT (j.agent_ids <@ j.parents) THEN 'missing'
                   END AS drift_kind,
                   CASE
                       WHEN NOT j.has_row THEN 'relationships in SpiceDB, no row'
                       WHEN NOT j.has_tuples THEN 'row, no relationships in SpiceDB'
                       WHEN j.rtype = 'api_key' AND NOT (j.parents <@ j.agent_ids)
                           THEN 'parent edge points at another agent'
                       WHEN j.owner_id IS NULL THEN 'owner edge missing'
                       WHEN j.rtype = 'api_key' AND NOT (j.agent_ids <@ j.parents)
                           THEN 'parent edge missing'
                   END AS reason
            FROM joined j
        ),
        classified AS (
            SELECT d.*,
                   CASE
                       WHEN d.drift_kind IS NULL THEN 'consistent'
                       WHEN EXISTS (
                           SELECT 1 FROM authz_outbox o
                           WHERE o.state = 'pending'
                             AND o.resource_type = d.rtype AND o.resource_id = d.rid)
                           THEN 'in_flight'
                       WHEN d.has_row AND d.created_at > now() - $1 * interval '1 millisecond'
                           THEN 'young'
                       WHEN NOT d.has_row AND EXISTS (
                           SELECT 1 FROM authz_outbox o
                           WHERE o.resource_type = d.rtype AND o.resource_id = d.rid
                             AND o.created_at > now() - $1 * interval '1 millisecond')
                           THEN 'young'
                       ELSE d.drift_kind
                   END AS kind
            FROM drift d
        ),
        saved AS (
            INSERT INTO reconcile_findings (kind, drift_kind, resource_type, resource_id, reason,
                                            row_parent, held_parents, owner_type, owner_id)
            SELECT kind, drift_kind, rtype, rid, reason, agent_id, parents, owner_type, owner_id
            FROM classified
            WHERE kind <> 'consistent'
            ORDER BY rtype DESC, rid
            RETURNING 1
        )
        SELECT (SELECT count(*) FROM classified WHERE kind = 'consistent'),
               (SELECT count(*) FROM saved),
               now()
    "#;
    sqlx::raw_sql(SETUP).execute(&mut *conn).await?;
    let (consistent, _saved, at): (i64, i64, DateTime<Utc>) = sqlx::query_as(SQL)
        .bind(grace.as_millis() as i64)
        .fetch_one(conn)
        .await?;
    Ok((consistent as u64, at))
}

/// Decides whom each fix is sent as, and turns a registration nobody can be
/// named for into `needs_owner`.
///
/// - missing: the principal of the resource's latest register row (the
///   creator the host recorded), else the owner SpiceDB still holds, else
///   `owner_principal`;
/// - parent mismatch and orphan: the owner SpiceDB holds (`user:U` →
///   `{"user_id":"U"}`), else the latest register row's, else
///   `owner_principal`. An orphan with none is deregistered without one
///   (a deregister needs no creator).
pub async fn resolve_principals(
    conn: &mut PgConnection,
    owner_principal: Option<&Value>,
) -> Result<(), sqlx::Error> {
    const SQL: &str = r#"
        WITH resolved AS (
            SELECT f.seq,
                   CASE f.owner_type
                       WHEN 'user' THEN jsonb_build_object('user_id', f.owner_id)
                       WHEN 'service_account' THEN jsonb_build_object('service_account_id', f.owner_id)
                   END AS held_owner,
                   (SELECT o.principal FROM authz_outbox o
                    WHERE o.resource_type = f.resource_type AND o.resource_id = f.resource_id
                      AND o.operation = 'register' AND authz_outbox_has_creator(o.principal)
                    ORDER BY o.id DESC LIMIT 1) AS recorded
            FROM reconcile_findings f
            WHERE f.kind IN ('orphan', 'missing', 'parent_mismatch')
        )
        UPDATE reconcile_findings f
        SET principal = CASE WHEN f.kind = 'missing'
                             THEN coalesce(r.recorded, r.held_owner, $1::jsonb)
                             ELSE coalesce(r.held_owner, r.recorded, $1::jsonb) END
        FROM resolved r
        WHERE f.seq = r.seq
    "#;
    const NEEDS_OWNER: &str = r#"
        UPDATE reconcile_findings
        SET kind = 'needs_owner',
            reason = reason || '; no creator known (pass --owner-principal)'
        WHERE kind IN ('missing', 'parent_mismatch') AND principal IS NULL
    "#;
    sqlx::query(SQL)
        .bind(owner_principal)
        .execute(&mut *conn)
        .await?;
    sqlx::query(NEEDS_OWNER).execute(conn).await?;
    Ok(())
}

/// Adds the counts by kind to `summary`.
pub async fn count(conn: &mut PgConnection, summary: &mut Summary) -> Result<(), sqlx::Error> {
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT kind, count(*) FROM reconcile_findings GROUP BY kind")
            .fetch_all(conn)
            .await?;
    for (kind, n) in rows {
        let n = n as u64;
        match kind.as_str() {
            "orphan" => summary.orphan = n,
            "missing" => summary.missing = n,
            "parent_mismatch" => summary.parent_mismatch = n,
            "needs_owner" => summary.needs_owner = n,
            "in_flight" => summary.in_flight = n,
            "young" => summary.young = n,
            _ => {}
        }
    }
    Ok(())
}

/// A drifted resource as stored in `reconcile_findings`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StagedFinding {
    pub seq: i64,
    pub kind: String,
    pub resource_type: String,
    pub resource_id: String,
    pub reason: String,
    pub row_parent: Option<String>,
    pub held_parents: Vec<String>,
    pub owner_type: Option<String>,
    pub owner_id: Option<String>,
    pub principal: Option<Value>,
}

impl StagedFinding {
    pub fn kind(&self) -> Option<FindingKind> {
        FindingKind::parse(&self.kind)
    }
}

/// The next page of drift findings after `after` (keyset paging on `seq`).
pub async fn page(
    conn: &mut PgConnection,
    after: i64,
    limit: i64,
) -> Result<Vec<StagedFinding>, sqlx::Error> {
    sqlx::query_as(
        r#"
        SELECT seq, kind, resource_type, resource_id, reason, row_parent, held_parents,
               owner_type, owner_id, principal
        FROM reconcile_findings
        WHERE seq > $1 AND kind IN ('orphan', 'missing', 'parent_mismatch', 'needs_owner')
        ORDER BY seq
        LIMIT $2
        "#,
    )
    .bind(after)
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// Of the given resources, those the outbox touched since classification:
/// a pending row now, or any row created since `since`. Reconcile leaves
/// them to that row rather than race it.
pub async fn changed_since(
    conn: &mut PgConnection,
    resources: &[(&str, &str)],
    since: DateTime<Utc>,
) -> Result<Vec<(String, String)>, sqlx::Error> {
    const SQL: &str = r#"
        SELECT r.rtype, r.rid
        FROM unnest($1::text[], $2::text[]) AS r(rtype, rid)
        WHERE EXISTS (
            SELECT 1 FROM authz_outbox o
            WHERE o.resource_type = r.rtype AND o.resource_id = r.rid
              AND (o.state = 'pending' OR o.created_at >= $3))
    "#;
    if resources.is_empty() {
        return Ok(Vec::new());
    }
    let types: Vec<&str> = resources.iter().map(|r| r.0).collect();
    let ids: Vec<&str> = resources.iter().map(|r| r.1).collect();
    sqlx::query_as(SQL)
        .bind(&types)
        .bind(&ids)
        .bind(since)
        .fetch_all(conn)
        .await
}

/// Records the run; the worker exports the latest as metrics.
pub async fn record_run(
    conn: &mut PgConnection,
    started_at: DateTime<Utc>,
    applied: bool,
    summary: &Summary,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO authz_outbox_reconcile_runs (started_at, applied, drift, summary)
         VALUES ($1, $2, $3, $4) RETURNING id",
    )
    .bind(started_at)
    .bind(applied)
    .bind(summary.drift() as i64)
    .bind(serde_json::to_value(summary).unwrap_or(Value::Null))
    .fetch_one(conn)
    .await
}

/// Drops the temporary tables (they would go with the session anyway).
pub async fn drop_all(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(
        "DROP TABLE IF EXISTS pg_temp.reconcile_tuples, pg_temp.reconcile_held,
                              pg_temp.reconcile_findings",
    )
    .execute(conn)
    .await?;
    Ok(())
}
