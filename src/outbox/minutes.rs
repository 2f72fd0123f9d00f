//! Deliveries per minute, resource type and worker
//! (`authz_outbox_delivery_minutes`): what the operator page charts for the
//! last hour, so that it never counts the outbox's delivered rows.
//!
//! Workers add their counts every few seconds ([`add`]) and delete minutes
//! past [`KEPT`] ([`prune`]); the page sums the minutes it shows
//! ([`since`]): at most 60 × types × workers rows, however many deliveries
//! they stand for.

use chrono::{DateTime, Duration, DurationRound, Utc};
use sqlx::PgPool;

/// How long minutes are kept: the page's hour and as much again, for a
/// worker whose clock or flush lags.
pub const KEPT: std::time::Duration = std::time::Duration::from_secs(2 * 3600);

/// One minute's deliveries of one resource type.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Minute {
    pub delivered: i64,
    /// The sum of the deliveries' capture-to-delivered latencies, in ms.
    pub latency_ms_sum: f64,
}

impl std::ops::AddAssign for Minute {
    fn add_assign(&mut self, other: Minute) {
        self.delivered += other.delivered;
        self.latency_ms_sum += other.latency_ms_sum;
    }
}

/// The start of the minute `t` falls in: the table's key, and the page's
/// chart column.
pub fn minute_of(t: DateTime<Utc>) -> DateTime<Utc> {
    t.duration_trunc(Duration::minutes(1)).unwrap_or(t)
}

/// Adds a worker's counts to the minutes they belong to (one statement for
/// all of them).
pub async fn add(
    pool: &PgPool,
    worker_id: &str,
    counts: &[(DateTime<Utc>, &str, Minute)],
) -> Result<(), sqlx::Error> {
    if counts.is_empty() {
        return Ok(());
    }
    let minutes: Vec<DateTime<Utc>> = counts.iter().map(|c| c.0).collect();
    let types: Vec<&str> = counts.iter().map(|c| c.1).collect();
    let delivered: Vec<i64> = counts.iter().map(|c| c.2.delivered).collect();
    let latency: Vec<f64> = counts.iter().map(|c| c.2.latency_ms_sum).collect();
    sqlx::query(
        r#"
        INSERT INTO authz_outbox_delivery_minutes AS m
               (minute, resource_type, worker_id, delivered, latency_ms_sum)
        SELECT c.minute, c.resource_type, $5, c.delivered, c.latency_ms_sum
        FROM unnest($1::timestamptz[], $2::text[], $3::bigint[], $4::float8[])
             AS c(minute, resource_type, delivered, latency_ms_sum)
        ON CONFLICT (minute, resource_type, worker_id) DO UPDATE
        SET delivered = m.delivered + excluded.delivered,
            latency_ms_sum = m.latency_ms_sum + excluded.latency_ms_sum
        "#,
    )
    .bind(minutes)
    .bind(types)
    .bind(delivered)
    .bind(latency)
    .bind(worker_id)
    .execute(pool)
    .await?;
    Ok(())
}

/// Every worker's deliveries per minute and type from `from` on.
pub async fn since(
    pool: &PgPool,
    from: DateTime<Utc>,
) -> Result<Vec<(DateTime<Utc>, String, Minute)>, sqlx::Error> {
    let rows: Vec<(DateTime<Utc>, String, i64, f64)> = sqlx::query_as(
        r#"
        SELECT minute, resource_type, sum(delivered)::bigint, sum(latency_ms_sum)::float8
        FROM authz_outbox_delivery_minutes
        WHERE minute >= $1
        GROUP BY 1, 2
        "#,
    )
    .bind(from)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(minute, t, delivered, latency_ms_sum)| {
            (
                minute,
                t,
                Minute {
                    delivered,
                    latency_ms_sum,
                },
            )
        })
        .collect())
}

/// Deletes minutes older than [`KEPT`]; returns how many rows went.
pub async fn prune(pool: &PgPool) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "DELETE FROM authz_outbox_delivery_minutes WHERE minute < now() - make_interval(secs => $1)",
    )
    .bind(KEPT.as_secs_f64())
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}
