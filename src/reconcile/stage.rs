//! The SQL half of reconcile: SpiceDB's relationships are staged in
//! TEMPORARY tables of one session, then classified against
//! `authz_outbox_desired` (what the installed resource mappings say SpiceDB
//! should hold: every live row with its selector and parent) and
//! `authz_outbox` with joins, so a million resources and their
//! relationships never sit in this process's memory at once.
//!
//! Everything here runs on one connection (temporary tables belong to it).

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgConnection;

use super::report::{FindingKind, Summary, TypeCounts};
use super::spicedb::Tuple;

/// Relationships written to PostgreSQL per statement.
pub const INSERT_BATCH: usize = 5000;

/// Drops leftovers of an earlier run on this session and creates the
/// staging table.
pub async fn create(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    const SQL: &str = r#"
        DROP TABLE IF EXISTS pg_temp.reconcile_tuples, pg_temp.reconcile_held,
                             pg_temp.reconcile_registered, pg_temp.reconcile_findings;
        CREATE TEMPORARY TABLE reconcile_tuples (
            resource_type text NOT NULL,
            resource_id   text NOT NULL,
            relation      text NOT NULL,
            subject_type  text NOT NULL,
            subject_id    text NOT NULL,
            undecodable   boolean NOT NULL
        );
    "#;
    sqlx::raw_sql(SQL).execute(conn).await?;
    Ok(())
}

/// Relationships with their object ids decoded into selectors, ready to
/// stage. `undecodable[i]` marks a tuple whose resource object id is not in
/// the selector encoding (kept as read, so it is reported, never healed).
#[derive(Debug, Default)]
pub struct Batch {
    pub tuples: Vec<Tuple>,
    pub undecodable: Vec<bool>,
}

impl Batch {
    pub fn with_capacity(n: usize) -> Self {
        Batch {
            tuples: Vec::with_capacity(n),
            undecodable: Vec::with_capacity(n),
        }
    }

    pub fn len(&self) -> usize {
        self.tuples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tuples.is_empty()
    }

    pub fn push(&mut self, tuple: Tuple, undecodable: bool) {
        self.tuples.push(tuple);
        self.undecodable.push(undecodable);
    }

    pub fn clear(&mut self) {
        self.tuples.clear();
        self.undecodable.clear();
    }
}

/// Appends relationships to the staging table in one multi-row INSERT.
pub async fn insert(conn: &mut PgConnection, batch: &Batch) -> Result<(), sqlx::Error> {
    const SQL: &str = r#"
        INSERT INTO reconcile_tuples (resource_type, resource_id, relation, subject_type, subject_id,
                                      undecodable)
        SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bool[])
    "#;
    if batch.is_empty() {
        return Ok(());
    }
    let tuples = &batch.tuples;
    let col = |f: fn(&Tuple) -> &str| tuples.iter().map(f).collect::<Vec<&str>>();
    sqlx::query(SQL)
        .bind(col(|t| &t.resource_type))
        .bind(col(|t| &t.resource_id))
        .bind(col(|t| &t.relation))
        .bind(col(|t| &t.subject_type))
        .bind(col(|t| &t.subject_id))
        .bind(&batch.undecodable)
        .execute(conn)
        .await?;
    Ok(())
}

/// Folds the relationships into one row per resource (its owner, its parent
/// edges, every edge of its owner relations) and adds how many resources
/// SpiceDB holds, per type, to `summary`.
pub async fn fold(conn: &mut PgConnection, summary: &mut Summary) -> Result<(), sqlx::Error> {
    // Relationships the type's mapping does not list count only where a
    // deregister deletes them too (`scope_all`); the owner is read from
    // `owner` whatever its role (whom a fix is sent as).
    const SQL: &str = r#"
        CREATE TEMPORARY TABLE reconcile_held AS
        SELECT t.resource_type, t.resource_id,
               (array_agg(t.subject_type ORDER BY t.subject_type, t.subject_id)
                    FILTER (WHERE t.relation = 'owner'))[1] AS owner_type,
               (array_agg(t.subject_id ORDER BY t.subject_type, t.subject_id)
                    FILTER (WHERE t.relation = 'owner'))[1] AS owner_id,
               coalesce(array_agg(DISTINCT t.subject_id)
                    FILTER (WHERE t.relation = ty.parent_relation
                              AND t.subject_type = ty.parent_subject_type),
                    '{}') AS parents,
               coalesce(array_agg(DISTINCT t.relation)
                    FILTER (WHERE t.relation = ANY (ty.principal_relations)),
                    '{}') AS principal_held,
               coalesce(array_agg(DISTINCT t.relation || '@' || t.subject_type || ':' || t.subject_id)
                    FILTER (WHERE t.relation = ANY (ty.column_relations)),
                    '{}') AS edges,
               -- SpiceDB holds a relationship once: no DISTINCT (a sort per
               -- resource) needed.
               coalesce(array_agg(t.relation || '@' || t.subject_type || ':' || t.subject_id)
                    FILTER (WHERE t.relation = ANY (ty.owner_relations)),
                    '{}') AS owners,
               bool_or(t.undecodable) AS undecodable
        FROM reconcile_tuples t
        JOIN reconcile_types ty ON ty.resource_type = t.resource_type
        WHERE ty.scope_all OR t.relation = ANY (ty.relations)
        GROUP BY t.resource_type, t.resource_id;
        DROP TABLE reconcile_tuples;
        CREATE UNIQUE INDEX ON reconcile_held (resource_type, resource_id);
        ANALYZE reconcile_held;
    "#;
    sqlx::raw_sql(SQL).execute(&mut *conn).await?;
    let held: Vec<(String, i64)> =
        sqlx::query_as("SELECT resource_type, count(*) FROM reconcile_held GROUP BY resource_type")
            .fetch_all(conn)
            .await?;
    for (resource_type, n) in held {
        summary
            .by_type
            .entry(resource_type)
            .or_default()
            .spicedb_resources = n as u64;
    }
    Ok(())
}

/// Stages the owner edges each resource of the compared types was
/// registered with (`authz_outbox_owners`, kept past retention) in
/// `reconcile_registered`: per registered principal and owner relation
/// (`reconcile_owner_subjects`), the first alternative whose field is a
/// non-empty string, as the writer chose it. A resource the registry does
/// not know (registered before it existed, its rows pruned since), or of a
/// type without owner relations, has no row here, and its owners are not
/// judged.
///
/// Grouped under the "C" collation: only equality matters here, and the
/// host's collation made the grouping of 1M registrations 2.3 times slower.
pub async fn registered(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    const SQL: &str = r#"
        DROP TABLE IF EXISTS pg_temp.reconcile_registered;
        CREATE TEMPORARY TABLE reconcile_registered AS
        SELECT g.t COLLATE "default" AS resource_type, g.i COLLATE "default" AS resource_id,
               g.edges
        FROM (
            SELECT w.resource_type COLLATE "C" AS t, w.resource_id COLLATE "C" AS i,
                   array_agg(s.relation || '@' || s.subject_type || ':' || (w.principal ->> s.field))
                       AS edges
            FROM authz_outbox_owners w
            JOIN reconcile_owner_subjects s ON s.resource_type = w.resource_type
            WHERE jsonb_typeof(w.principal -> s.field) = 'string'
              AND w.principal ->> s.field <> ''
              AND NOT EXISTS (
                  SELECT 1 FROM reconcile_owner_subjects e
                  WHERE e.resource_type = s.resource_type AND e.relation = s.relation
                    AND e.position < s.position
                    AND jsonb_typeof(w.principal -> e.field) = 'string'
                    AND w.principal ->> e.field <> '')
            GROUP BY 1, 2
        ) AS g;
        CREATE UNIQUE INDEX ON reconcile_registered (resource_type, resource_id);
        ANALYZE reconcile_registered;
    "#;
    sqlx::raw_sql(SQL).execute(conn).await?;
    Ok(())
}

/// Classifies every resource of `types` on either side and keeps what is
/// not consistent in `reconcile_findings`. Adds the consistent resources per
/// type to `summary`; returns the database time the classification saw.
///
/// The desired side is `authz_outbox_desired`, generated by `migrate` from
/// the resource mappings: a row that is not live (a soft-deleted agent,
/// task or schedule) is not desired, so its relationships are an orphan;
/// its parent is the one the mapping reads (a task's `task_agents` row).
///
/// One statement, so one snapshot of the host's tables and the outbox; it
/// runs after SpiceDB was read, so a resource committed during the read is
/// a row here (at worst "missing" and young), never an orphan whose tuples
/// we revoke.
///
/// A live resource whose registrations are on record
/// ([`registered`]) is judged by its owners last: an owner edge SpiceDB
/// holds that no registration stands for, or one a registration stands for
/// that SpiceDB lacks (while it holds another), is `owner_mismatch`.
///
/// Precedence: drift is computed first; a drifted resource with a pending
/// outbox row is `in_flight` (the worker is about to change it), then one
/// younger than `grace` is `young`. Rows are aged by their mapping's
/// `created_at`; an orphan has no age in SpiceDB, so it is young when any
/// outbox row of its resource was created within `grace` (a create or
/// delete that is still settling).
pub async fn classify(
    conn: &mut PgConnection,
    encoding: &str,
    grace: Duration,
    extra_owners_are_drift: bool,
    summary: &mut Summary,
) -> Result<DateTime<Utc>, sqlx::Error> {
    const SETUP: &str = r#"
        CREATE TEMPORARY TABLE reconcile_findings (
            seq              bigserial PRIMARY KEY,
            kind             text NOT NULL,
            drift_kind       text NOT NULL,
            resource_type    text NOT NULL,
            resource_id      text NOT NULL,
            reason           text NOT NULL,
            row_parent_type  text,
            row_parent       text,
            held_parents     text[] NOT NULL DEFAULT '{}',
            owner_type       text,
            owner_id         text,
            row_creator      jsonb,
            attributes       jsonb,
            undecodable      boolean NOT NULL DEFAULT false,
            principal        jsonb,
            registered       jsonb
        );
    "#;
    // Several rows may desire one resource (an api key id under two agents,
    // two mappings of one type): they are folded into one, with every
    // parent and every column-named edge they name.
    const SQL: &str = r#"
        WITH desired AS (
            SELECT d.resource_type AS rtype, d.resource_id AS rid,
                   min(d.parent_type) AS parent_type,
                   min(d.parent_id) AS parent_id,
                   coalesce(array_agg(d.parent_id) FILTER (WHERE d.parent_id IS NOT NULL),
                            '{}') AS parent_ids,
                   max(d.created_at) AS created_at,
                   (array_agg(d.creator) FILTER (WHERE d.creator IS NOT NULL))[1] AS creator,
                   (array_agg(d.attributes) FILTER (WHERE d.attributes IS NOT NULL))[1] AS attributes,
                   -- No DISTINCT (it would sort every desired row): a
                   -- repeated edge compares the same under <@.
                   coalesce(array_agg(e.edge)
                                FILTER (WHERE split_part(e.edge, '@', 1) = ANY (ty.column_relations)),
                            '{}') AS edges
            FROM authz_outbox_desired d
            JOIN reconcile_types ty ON ty.resource_type = d.resource_type
            LEFT JOIN LATERAL unnest(d.edges) AS e(edge) ON true
            GROUP BY d.resource_type, d.resource_id
        ),
        joined AS (
            SELECT coalesce(h.rtype, s.resource_type) AS rtype,
                   coalesce(h.rid, s.resource_id) AS rid,
                   h.rid IS NOT NULL AS has_row, h.parent_type, h.parent_id,
                   coalesce(h.parent_ids, '{}') AS parent_ids, h.created_at, h.creator,
                   h.attributes, coalesce(h.edges, '{}') AS row_edges,
                   s.resource_id IS NOT NULL AS has_tuples,
                   coalesce(s.undecodable, false) AS undecodable,
                   s.owner_type, s.owner_id, coalesce(s.parents, '{}') AS parents,
                   coalesce(s.principal_held, '{}') AS principal_held,
                   coalesce(s.edges, '{}') AS held_edges,
                   ty.parent_relation IS NOT NULL AND h.parent_type IS NOT NULL AS judge_parent,
                   ty.parent_relation, ty.principal_relations,
                   coalesce(s.owners, '{}') AS held_owners,
                   coalesce(r.edges, '{}') AS registered_owners,
                   r.resource_id IS NOT NULL AS judge_owner
            FROM desired h
            FULL JOIN reconcile_held s
                   ON s.resource_type = h.rtype AND s.resource_id = h.rid
            JOIN reconcile_types ty ON ty.resource_type = coalesce(h.rtype, s.resource_type)
            LEFT JOIN reconcile_registered r
                   ON r.resource_type = h.rtype AND r.resource_id = h.rid
        ),
        drift AS (
            SELECT j.*,
                   CASE
                       WHEN NOT j.has_row THEN 'orphan'
                       WHEN NOT j.has_tuples THEN 'missing'
                       WHEN j.judge_parent AND NOT (j.parents <@ j.parent_ids)
                           THEN 'parent_mismatch'
                       WHEN NOT (j.held_edges <@ j.row_edges) THEN 'subject_mismatch'
                       WHEN NOT (j.principal_relations <@ j.principal_held) THEN 'missing'
                       WHEN j.judge_parent AND NOT (j.parent_ids <@ j.parents) THEN 'missing'
                       WHEN NOT (j.row_edges <@ j.held_edges) THEN 'missing'
                       WHEN j.judge_owner AND $3 AND NOT (j.held_owners <@ j.registered_owners)
                           THEN 'owner_mismatch'
                       WHEN j.judge_owner AND NOT (j.registered_owners <@ j.held_owners)
                           THEN 'owner_mismatch'
                   END AS drift_kind,
                   CASE
                       WHEN NOT j.has_row AND j.undecodable
                           THEN 'object id is not in the ' || $2 || ' selector encoding; '
                                'check --selector-encoding, or remove it by hand'
                       WHEN NOT j.has_row
                           THEN 'relationships in SpiceDB, no live row (deleted, soft-deleted or moved)'
                       WHEN NOT j.has_tuples THEN 'live row, no relationships in SpiceDB'
                       WHEN j.judge_parent AND NOT (j.parents <@ j.parent_ids)
                           THEN 'parent edge points at another ' || j.parent_type
                                || ' than the row''s'
                       WHEN NOT (j.held_edges <@ j.row_edges)
                           THEN 'SpiceDB holds '
                                || (SELECT min(x) FROM unnest(j.held_edges) x
                                    WHERE NOT x = ANY (j.row_edges))
                                || ', the row names '
                                || coalesce(nullif(array_to_string(j.row_edges, ', '), ''), 'none')
                       WHEN NOT (j.principal_relations <@ j.principal_held)
                           THEN (SELECT min(x) FROM unnest(j.principal_relations) x
                                 WHERE NOT x = ANY (j.principal_held)) || ' edge missing'
                       WHEN j.judge_parent AND NOT (j.parent_ids <@ j.parents)
                           THEN 'parent edge missing'
                       WHEN NOT (j.row_edges <@ j.held_edges)
                           THEN (SELECT min(x) FROM unnest(j.row_edges) x
                                 WHERE NOT x = ANY (j.held_edges)) || ' missing'
                       WHEN j.judge_owner AND NOT (j.held_owners <@ j.registered_owners
                                                   AND j.registered_owners <@ j.held_owners)
                           THEN concat_ws('; ',
                                    'SpiceDB holds '
                                    || (SELECT min(x) FROM unnest(j.held_owners) x
                                        WHERE NOT x = ANY (j.registered_owners))
                                    || ', never registered through the outbox',
                                    'registered '
                                    || (SELECT min(x) FROM unnest(j.registered_owners) x
                                        WHERE NOT x = ANY (j.held_owners))
                                    || ' not in SpiceDB')
                                || CASE
                                       WHEN j.registered_owners <@ j.held_owners
                                           THEN ' (registered: '
                                                || array_to_string(ARRAY(
                                                       SELECT DISTINCT x
                                                       FROM unnest(j.registered_owners) x
                                                       ORDER BY x), ', ') || ')'
                                       WHEN j.held_owners <@ j.registered_owners
                                           THEN ' (SpiceDB holds: '
                                                || array_to_string(ARRAY(
                                                       SELECT x FROM unnest(j.held_owners) x
                                                       ORDER BY x), ', ') || ')'
                                       ELSE ''
                                   END
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
                                            row_parent_type, row_parent, held_parents,
                                            owner_type, owner_id, row_creator, attributes,
                                            undecodable, registered)
            SELECT kind, drift_kind, rtype, rid, reason, parent_type, parent_id, parents,
                   owner_type, owner_id, creator, attributes, undecodable,
                   (SELECT jsonb_agg(w.principal ORDER BY w.outbox_id)
                    FROM authz_outbox_owners w
                    WHERE w.resource_type = rtype AND w.resource_id = rid)
            FROM classified
            WHERE kind <> 'consistent'
            ORDER BY rtype, rid
            RETURNING 1
        )
        SELECT c.rtype, count(*), (SELECT count(*) FROM saved), now()
        FROM classified c
        WHERE c.kind = 'consistent'
        GROUP BY c.rtype
        UNION ALL
        SELECT NULL, 0, (SELECT count(*) FROM saved), now()
    "#;
    sqlx::raw_sql(SETUP).execute(&mut *conn).await?;
    let rows: Vec<(Option<String>, i64, i64, DateTime<Utc>)> = sqlx::query_as(SQL)
        .bind(grace.as_millis() as i64)
        .bind(encoding)
        .bind(extra_owners_are_drift)
        .fetch_all(conn)
        .await?;
    let mut at = Utc::now();
    for (resource_type, consistent, _saved, now) in rows {
        at = now;
        if let Some(resource_type) = resource_type {
            summary.by_type.entry(resource_type).or_default().consistent = consistent as u64;
        }
    }
    Ok(at)
}

/// Decides whom each fix is sent as, and turns a registration nobody can be
/// named for into `needs_owner` (unless its mapping says `creator = []`:
/// its relationships name nobody, so it is sent with no principal).
///
/// Where the resource's registrations are on record, the latest registered
/// principal comes first for every live resource: a fix sent as the owner
/// SpiceDB holds would register, and so record, an owner someone wrote
/// behind the outbox.
///
/// - missing (a legacy row, or one whose relationships vanished): the
///   registered principal, else the creator the row itself records (the
///   mapping's column sources, such as a schedule's `creator_principal`),
///   else the principal of the resource's latest register row (the creator
///   capture recorded), else the owner SpiceDB still holds, else
///   `owner_principal`;
/// - parent, subject and owner mismatch: the registered principal, else the
///   owner SpiceDB holds (`user:U` → `{"user_id":"U"}`), else the latest
///   register row's, else the row's own, else `owner_principal`;
/// - orphan: the owner SpiceDB holds, else the latest register row's, else
///   the row's own, else `owner_principal`. An orphan with none is
///   deregistered without one (a deregister needs no creator).
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
                   CASE WHEN authz_outbox_has_creator(f.row_creator) THEN f.row_creator END AS row_creator,
                   (SELECT o.principal FROM authz_outbox o
                    WHERE o.resource_type = f.resource_type AND o.resource_id = f.resource_id
                      AND o.operation = 'register' AND authz_outbox_has_creator(o.principal)
                    ORDER BY o.id DESC LIMIT 1) AS recorded
            FROM reconcile_findings f
            WHERE f.kind IN ('orphan', 'missing', 'parent_mismatch', 'subject_mismatch',
                             'owner_mismatch')
        )
        UPDATE reconcile_findings f
        SET principal = CASE f.kind
                            WHEN 'missing'
                                THEN coalesce(f.registered -> -1, r.row_creator, r.recorded,
                                              r.held_owner, $1::jsonb)
                            WHEN 'orphan'
                                THEN coalesce(r.held_owner, r.recorded, r.row_creator, $1::jsonb)
                            ELSE coalesce(f.registered -> -1, r.held_owner, r.recorded,
                                          r.row_creator, $1::jsonb)
                        END
        FROM resolved r
        WHERE f.seq = r.seq
    "#;
    const NEEDS_OWNER: &str = r#"
        UPDATE reconcile_findings
        SET kind = 'needs_owner',
            reason = reason || '; no creator known (pass --owner-principal)'
        WHERE kind IN ('missing', 'parent_mismatch', 'subject_mismatch') AND principal IS NULL
          AND NOT EXISTS (SELECT 1 FROM authz_outbox_mappings m
                          WHERE m.resource_type = reconcile_findings.resource_type
                            AND m.definition -> 'creator' = '[]'::jsonb)
    "#;
    sqlx::query(SQL)
        .bind(owner_principal)
        .execute(&mut *conn)
        .await?;
    sqlx::query(NEEDS_OWNER).execute(conn).await?;
    Ok(())
}

/// Adds the counts by type and kind to `summary`, and the totals.
pub async fn count(conn: &mut PgConnection, summary: &mut Summary) -> Result<(), sqlx::Error> {
    let rows: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT resource_type, kind, count(*) FROM reconcile_findings GROUP BY 1, 2",
    )
    .fetch_all(conn)
    .await?;
    for (resource_type, kind, n) in rows {
        let counts: &mut TypeCounts = summary.by_type.entry(resource_type).or_default();
        let n = n as u64;
        match kind.as_str() {
            "orphan" => counts.orphan = n,
            "missing" => counts.missing = n,
            "parent_mismatch" => counts.parent_mismatch = n,
            "subject_mismatch" => counts.subject_mismatch = n,
            "owner_mismatch" => counts.owner_mismatch = n,
            "needs_owner" => counts.needs_owner = n,
            "in_flight" => counts.in_flight = n,
            "young" => counts.young = n,
            _ => {}
        }
    }
    summary.total();
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
    pub row_parent_type: Option<String>,
    pub row_parent: Option<String>,
    pub held_parents: Vec<String>,
    pub owner_type: Option<String>,
    pub owner_id: Option<String>,
    pub undecodable: bool,
    pub principal: Option<Value>,
    /// The row's columns its relationships name (for a register's fix).
    pub attributes: Option<Value>,
    /// The principals the resource was registered as (a JSON array, oldest
    /// first), when on record.
    pub registered: Option<Value>,
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
        SELECT seq, kind, resource_type, resource_id, reason, row_parent_type, row_parent,
               held_parents, owner_type, owner_id, undecodable, principal, attributes, registered
        FROM reconcile_findings
        WHERE seq > $1
          AND kind IN ('orphan', 'missing', 'parent_mismatch', 'subject_mismatch',
                       'owner_mismatch', 'needs_owner')
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
                              pg_temp.reconcile_registered, pg_temp.reconcile_findings,
                              pg_temp.reconcile_types, pg_temp.reconcile_owner_subjects",
    )
    .execute(conn)
    .await?;
    Ok(())
}
