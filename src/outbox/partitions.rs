//! The outbox's daily partitions (migration 20261205200003): creating them
//! ahead, dropping them whole once retention has passed, and listing them
//! for `status` and the metrics.
//!
//! Why partitions: deleting finished rows one by one costs the worker as
//! many deletes as captures and leaves dead tuples to vacuum; dropping a
//! day's partition is one catalog change. A partition holding a pending or a
//! dead row is never dropped (see `authz_outbox_drop_partitions`): a dead
//! row waits for `replay` or an explicit purge, never for retention.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

/// The longest a partition change waits for a lock: captures queue behind a
/// waiting DROP or ATTACH, so it gives up quickly and tries at the next tick.
const LOCK_TIMEOUT: &str = "2s";

/// How many days after today the worker and `migrate` keep partitions for.
pub const DAYS_AHEAD: i32 = 3;

/// One partition of `authz_outbox`.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Partition {
    pub name: String,
    /// `None` for the partition of everything before the upgrade (its range
    /// starts at -infinity) and for the default partition.
    pub lower_bound: Option<DateTime<Utc>>,
    /// `None` for the default partition.
    pub upper_bound: Option<DateTime<Utc>>,
    pub is_default: bool,
    /// Table, indexes and TOAST (of both halves of a day split by state).
    pub bytes: i64,
    /// The planner's estimate (`reltuples`, summed over a day's open and
    /// done halves), free to read; -1 if never analyzed.
    pub rows_estimate: i64,
}

/// The partitions, oldest first, the default partition last.
pub async fn list(pool: &PgPool) -> Result<Vec<Partition>, sqlx::Error> {
    const SQL: &str = r#"
        SELECT p.name,
               nullif(p.lower_bound, '-infinity') AS lower_bound,
               p.upper_bound, p.is_default, p.bytes,
               coalesce((SELECT CASE WHEN bool_and(c.reltuples < 0) THEN -1
                                     ELSE sum(greatest(c.reltuples, 0))::bigint END
                         FROM pg_catalog.pg_partition_tree(to_regclass(quote_ident(p.name))) t
                         JOIN pg_catalog.pg_class c ON c.oid = t.relid
                         WHERE t.isleaf), -1) AS rows_estimate
        FROM authz_outbox_partitions() p
    "#;
    sqlx::query_as(SQL).fetch_all(pool).await
}

/// Creates the partitions up to [`DAYS_AHEAD`] days after today; returns how
/// many it created.
pub async fn create_ahead(pool: &PgPool) -> Result<i32, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT set_config('lock_timeout', $1, true)")
        .bind(LOCK_TIMEOUT)
        .execute(&mut *tx)
        .await?;
    let made: i32 = sqlx::query_scalar("SELECT authz_outbox_create_partitions($1)")
        .bind(DAYS_AHEAD)
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(made)
}

/// Drops every partition past `retention` whose rows are all finished past
/// it; returns their names.
///
/// Two transactions (migration 20261206100001): the first checks each
/// expired day and detaches it, the only step holding the outbox's lock
/// (milliseconds); the second drops the detached days, whose files the file
/// system frees after its commit (seconds for a large day: this call waits
/// for that, no capture or claim does).
pub async fn drop_expired(pool: &PgPool, retention: Duration) -> Result<Vec<String>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT set_config('lock_timeout', $1, true)")
        .bind(LOCK_TIMEOUT)
        .execute(&mut *tx)
        .await?;
    let retired: Vec<String> =
        sqlx::query_scalar("SELECT authz_outbox_drop_partitions($1 * interval '1 millisecond')")
            .bind(retention.as_millis() as i64)
            .fetch_all(&mut *tx)
            .await?;
    tx.commit().await?;
    drop_retired(pool).await?;
    Ok(retired)
}

/// Drops the days an earlier [`drop_expired`] detached (also those a worker
/// that died between its two steps left behind); returns their table names.
pub async fn drop_retired(pool: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT set_config('lock_timeout', $1, true)")
        .bind(LOCK_TIMEOUT)
        .execute(&mut *tx)
        .await?;
    let dropped: Vec<String> = sqlx::query_scalar("SELECT authz_outbox_drop_retired()")
        .fetch_all(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(dropped)
}

/// How far ahead partitions exist: the latest upper bound minus `now`
/// (negative when captures already land in the default partition).
pub fn ahead(partitions: &[Partition], now: DateTime<Utc>) -> Option<chrono::Duration> {
    partitions
        .iter()
        .filter(|p| !p.is_default)
        .filter_map(|p| p.upper_bound)
        .max()
        .map(|upper| upper - now)
}

/// The oldest partition's start (the old table's: its oldest row's time is
/// not known without a scan, so `None`).
pub fn oldest(partitions: &[Partition]) -> Option<&Partition> {
    partitions.iter().find(|p| !p.is_default)
}
