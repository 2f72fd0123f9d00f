//! Deleting dead rows on an operator's word (`authz-outbox purge --dead`).
//!
//! Retention never removes a dead row (a day holding one is kept whole, see
//! [`super::partitions`]): a dead row is a change SpiceDB never received, and
//! only an operator can decide it no longer matters. Once purged, what it
//! would have changed is left to `reconcile`, which compares SpiceDB with the
//! host's tables, not with the outbox. Once a day has no dead row left, the
//! next retention run can drop it whole.

use std::time::Duration;

use serde::Serialize;
use sqlx::PgPool;

/// Rows deleted per transaction: each batch holds few row locks and commits
/// on its own, so a large purge never blocks the worker for long.
pub const BATCH: i64 = 1_000;

/// Which dead rows to purge.
#[derive(Debug, Clone)]
pub struct PurgeDead {
    /// Only rows that went dead longer ago than this.
    pub older_than: Duration,
    /// Only rows of this resource type.
    pub resource_type: Option<String>,
    /// Count them; delete nothing.
    pub dry_run: bool,
}

/// What a purge did (or, in a dry run, would do).
#[derive(Debug, Clone, Serialize)]
pub struct PurgeReport {
    pub rows: u64,
    pub dry_run: bool,
}

/// Deletes the dead rows `what` selects, [`BATCH`] at a time, each batch its
/// own transaction; returns how many. A row being replayed meanwhile (no
/// longer `dead`, or locked) is left alone.
pub async fn purge_dead(pool: &PgPool, what: &PurgeDead) -> Result<PurgeReport, sqlx::Error> {
    let older_ms = i64::try_from(what.older_than.as_millis()).unwrap_or(i64::MAX);
    if what.dry_run {
        const COUNT: &str = r#"
            SELECT count(*) FROM authz_outbox
            WHERE state = 'dead'
              AND finished_at < now() - $1 * interval '1 millisecond'
              AND ($2::text IS NULL OR resource_type = $2)
        "#;
        let n: i64 = sqlx::query_scalar(COUNT)
            .bind(older_ms)
            .bind(what.resource_type.as_deref())
            .fetch_one(pool)
            .await?;
        return Ok(PurgeReport {
            rows: n.max(0) as u64,
            dry_run: true,
        });
    }
    // Served by each partition's `dead_by_time` partial index.
    const DELETE: &str = r#"
        DELETE FROM authz_outbox
        WHERE id IN (
            SELECT id FROM authz_outbox
            WHERE state = 'dead'
              AND finished_at < now() - $1 * interval '1 millisecond'
              AND ($2::text IS NULL OR resource_type = $2)
            LIMIT $3
            FOR UPDATE SKIP LOCKED)
          AND state = 'dead'
    "#;
    let mut rows = 0u64;
    loop {
        let done = sqlx::query(DELETE)
            .bind(older_ms)
            .bind(what.resource_type.as_deref())
            .bind(BATCH)
            .execute(pool)
            .await?
            .rows_affected();
        rows += done;
        if done < BATCH as u64 {
            return Ok(PurgeReport {
                rows,
                dry_run: false,
            });
        }
    }
}
