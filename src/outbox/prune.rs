//! Deleting finished rows past retention, in small batches so a prune never
//! holds many locks or bloats one transaction.

use std::time::Duration;

use sqlx::PgPool;

/// Deletes up to `batch` delivered or superseded rows that finished more than
/// `retention` ago. Dead rows are kept: they wait for an operator.
///
/// Who each resource was registered as outlives its rows: that lives in
/// `authz_outbox_owners` (written when a row is delivered, see
/// [`super::record`]), which pruning never touches, so reconcile still
/// judges the owners of a resource whose register was pruned long ago.
pub async fn prune(pool: &PgPool, retention: Duration, batch: i64) -> Result<u64, sqlx::Error> {
    const SQL: &str = r#"
        DELETE FROM authz_outbox
        WHERE id IN (
            SELECT id FROM authz_outbox
            WHERE state IN ('delivered', 'superseded')
              AND finished_at < now() - $1 * interval '1 millisecond'
            LIMIT $2
            FOR UPDATE SKIP LOCKED)
    "#;
    let done = sqlx::query(SQL)
        .bind(retention.as_millis() as i64)
        .bind(batch)
        .execute(pool)
        .await?;
    Ok(done.rows_affected())
}

/// The housekeeping's prune once partitions drop whole days
/// ([`super::partitions::drop_expired`]): only rows of partitions that
/// retention had to keep (for a pending or dead row of theirs) or that predate
/// the upgrade, i.e. created over a day (a partition's width) before the
/// retention horizon. Rows of a day that will be dropped whole are left to
/// the drop, so they leave no dead tuples behind.
pub async fn prune_kept(
    pool: &PgPool,
    retention: Duration,
    batch: i64,
) -> Result<u64, sqlx::Error> {
    const SQL: &str = r#"
        DELETE FROM authz_outbox
        WHERE id IN (
            SELECT id FROM authz_outbox
            WHERE state IN ('delivered', 'superseded')
              AND finished_at < now() - $1 * interval '1 millisecond'
              AND created_at < now() - $1 * interval '1 millisecond' - interval '1 day'
            LIMIT $2
            FOR UPDATE SKIP LOCKED)
    "#;
    let done = sqlx::query(SQL)
        .bind(retention.as_millis() as i64)
        .bind(batch)
        .execute(pool)
        .await?;
    Ok(done.rows_affected())
}
