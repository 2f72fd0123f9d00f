//! Leasing due rows to one worker, in per-resource order.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::{ClaimedRow, moved};
use crate::domain::Operation;

/// The claim statement (public so a test can check its plan): binds the
/// first operation, the limit, the worker id, the lease in milliseconds, the
/// optional `due_by` and the last operation.
///
/// `operation BETWEEN $1 AND $6` and `ORDER BY operation, id` are on
/// purpose. From `deregister` to `register` they claim every due deregister
/// before any register (revoking access is more urgent than granting it) in
/// one statement: a woken worker's first claim is one round trip, not two.
/// And a range, even of one operation, keeps the plan on the pending index. With `operation = $1` the planner treats the operation as fixed
/// and may serve `ORDER BY id` from the primary key, filtering out every
/// finished row on the way. It does so when its statistics were taken while
/// a backlog was pending (it assumes the pending rows are spread through the
/// table, not behind the delivered ones), and then each claim of a draining
/// backlog reads every row delivered so far: 200 ms per claim once 150,000
/// of 200,000 rows are delivered, where the pending index takes 10 ms (and
/// under 1 ms once vacuumed). The range keeps the order that only
/// `authz_outbox_pending_by_operation (operation, id) WHERE state =
/// 'pending'` provides.
///
/// The update joins on `created_at` as well as `id`: `created_at` is the
/// partition key, so each claimed row is looked up in its own day's
/// partition (run-time pruning) instead of in the primary key of every
/// partition, a cost that grew with retention (BENCHMARKS.md, issue 25).
/// And it names the state the locked rows are in, `pending`, so the planner
/// leaves out every day's `_done` half (migration 20261207000001).
pub const CLAIM_SQL: &str = r#"
        WITH due AS (
            SELECT o.id, o.created_at
            FROM authz_outbox o
            WHERE o.state = 'pending'
              AND o.operation BETWEEN $1 AND $6
              AND o.next_attempt_at <= least(now(), coalesce($5, now()))
              AND (o.locked_until IS NULL OR o.locked_until < now())
              AND NOT EXISTS (
                  SELECT 1 FROM authz_outbox e
                  WHERE e.state = 'pending'
                    AND e.resource_type = o.resource_type
                    AND e.resource_id = o.resource_id
                    AND e.id < o.id)
            ORDER BY o.operation, o.id
            LIMIT $2
            FOR UPDATE OF o SKIP LOCKED
        )
        UPDATE authz_outbox o
        SET locked_by = $3,
            locked_until = now() + $4 * interval '1 millisecond',
            lease_token = gen_random_uuid(),
            attempts = o.attempts + 1
        FROM due
        WHERE o.id = due.id AND o.created_at = due.created_at AND o.state = 'pending'
        RETURNING o.id, o.resource_type, o.resource_id, o.parent_type, o.parent_id,
                  o.operation, o.principal, o.attempts, o.created_at, o.lease_token,
                  o.guarded, o.origin, o.last_error, o.attributes
"#;

/// Leases up to `limit` due rows to `worker_id`: deregisters first, then
/// registers, in one statement.
pub async fn claim_due(
    pool: &PgPool,
    worker_id: &str,
    lease: Duration,
    limit: i64,
    due_by: Option<DateTime<Utc>>,
) -> Result<Vec<ClaimedRow>, sqlx::Error> {
    claim_range(
        pool,
        worker_id,
        (Operation::Deregister, Operation::Register),
        lease,
        limit,
        due_by,
    )
    .await
}

/// Leases up to `limit` due rows of one operation to `worker_id`.
///
/// A row is due when it is pending, its `next_attempt_at` has passed, no live
/// lease holds it, and no *earlier* row of the same resource is still pending
/// (leased or not, due or not): that last rule is what keeps a resource's
/// operations in order across any number of replicas. `SKIP LOCKED` lets
/// concurrent claimers pass over each other's rows instead of queueing; the
/// row-level re-check PostgreSQL does after locking sees a lease another
/// worker committed meanwhile, so a row is never leased twice.
///
/// The attempt is counted here, at claim time, so a row that crashes its
/// worker every time still runs out of attempts.
///
/// `due_by` narrows "due" to rows due at that instant: a one-shot run passes
/// its start time so rows it retried (due again later) end the run instead
/// of being retried until they die.
pub async fn claim(
    pool: &PgPool,
    worker_id: &str,
    operation: Operation,
    lease: Duration,
    limit: i64,
    due_by: Option<DateTime<Utc>>,
) -> Result<Vec<ClaimedRow>, sqlx::Error> {
    claim_range(
        pool,
        worker_id,
        (operation, operation),
        lease,
        limit,
        due_by,
    )
    .await
}

async fn claim_range(
    pool: &PgPool,
    worker_id: &str,
    (first, last): (Operation, Operation),
    lease: Duration,
    limit: i64,
    due_by: Option<DateTime<Utc>>,
) -> Result<Vec<ClaimedRow>, sqlx::Error> {
    if limit <= 0 {
        return Ok(Vec::new());
    }
    let mut rows: Vec<ClaimedRow> = moved::retry(|| {
        sqlx::query_as(CLAIM_SQL)
            .bind(first.as_str())
            .bind(limit)
            .bind(worker_id)
            .bind(lease.as_millis() as i64)
            .bind(due_by)
            .bind(last.as_str())
            .fetch_all(pool)
    })
    .await?;
    // As claimed: deregisters first, each operation in id order.
    rows.sort_by_key(|r| (r.operation != Operation::Deregister.as_str(), r.id));
    Ok(rows)
}

/// What one look at a claim's rows before any request finds
/// ([`supersede_and_check`]).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Checked {
    /// Every row superseded as a create-then-delete pair: the claimed
    /// registers and the deregisters paired with them.
    pub superseded: Vec<i64>,
    /// Of the rows to check (and not superseded), those whose resource is
    /// live right now.
    pub live: Vec<i64>,
}

/// Supersedes pairs of a never-attempted register (`fresh`) and the
/// deregister that directly follows it for the same resource: a key created
/// and deleted before delivery costs agentex-auth nothing. And tells which
/// of the rows in `check` are of a resource live right now, as its resource
/// mapping defines it (`authz_outbox_resource_live`, generated by
/// `migrate`): the row exists, is not soft-deleted, and has the parent the
/// outbox row names — so a register for a key that moved to another agent,
/// or for an agent deleted since, is stale. Types without a mapping always
/// count as live.
///
/// Only the *next* pending row counts for a pair: in register, register,
/// deregister the second register must still be delivered before the
/// deregister.
///
/// One statement, not two: on a woken worker's path to its first request
/// each round trip is latency (BENCHMARKS.md, issue 24).
pub async fn supersede_and_check(
    pool: &PgPool,
    fresh: &[&ClaimedRow],
    check: &[&ClaimedRow],
) -> Result<Checked, sqlx::Error> {
    const SQL: &str = r#"
        WITH claimed AS (
            SELECT * FROM unnest($1::bigint[], $2::uuid[]) AS c(id, token)
        ),
        pairs AS (
            SELECT r.id AS register_id, n.id AS deregister_id
            FROM claimed c
            JOIN authz_outbox r ON r.id = c.id AND r.lease_token = c.token AND r.state = 'pending'
            CROSS JOIN LATERAL (
                SELECT e.id, e.operation
                FROM authz_outbox e
                WHERE e.state = 'pending'
                  AND e.resource_type = r.resource_type
                  AND e.resource_id = r.resource_id
                  AND e.id > r.id
                ORDER BY e.id
                LIMIT 1
            ) n
            WHERE n.operation = 'deregister'
        ),
        superseded AS (
            UPDATE authz_outbox o
            SET state = 'superseded', finished_at = now(),
                locked_by = NULL, locked_until = NULL, lease_token = NULL,
                last_error = 'created and deleted before delivery'
            FROM pairs
            WHERE (o.id = pairs.register_id OR o.id = pairs.deregister_id) AND o.state = 'pending'
            RETURNING o.id
        )
        SELECT true AS superseded, s.id FROM superseded s
        UNION ALL
        SELECT false, c.id
        FROM unnest($3::bigint[], $4::text[], $5::text[], $6::text[]) AS c(id, rtype, rid, pid)
        WHERE c.id NOT IN (SELECT s.id FROM superseded s)
          AND authz_outbox_resource_live(c.rtype, c.rid, c.pid)
    "#;
    if fresh.is_empty() && check.is_empty() {
        return Ok(Checked::default());
    }
    let fresh_ids: Vec<i64> = fresh.iter().map(|r| r.id).collect();
    let tokens: Vec<uuid::Uuid> = fresh.iter().map(|r| r.lease_token).collect();
    let ids: Vec<i64> = check.iter().map(|r| r.id).collect();
    let types: Vec<&str> = check.iter().map(|r| r.resource_type.as_str()).collect();
    let rids: Vec<&str> = check.iter().map(|r| r.resource_id.as_str()).collect();
    let pids: Vec<Option<&str>> = check.iter().map(|r| r.parent_id.as_deref()).collect();
    let rows: Vec<(bool, i64)> = moved::retry(|| {
        sqlx::query_as(SQL)
            .bind(&fresh_ids)
            .bind(&tokens)
            .bind(&ids)
            .bind(&types)
            .bind(&rids)
            .bind(&pids)
            .fetch_all(pool)
    })
    .await?;
    let mut checked = Checked::default();
    for (superseded, id) in rows {
        if superseded {
            checked.superseded.push(id);
        } else {
            checked.live.push(id);
        }
    }
    Ok(checked)
}
