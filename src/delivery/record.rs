//! Record: the recorder task that writes settled rows back to the outbox in
//! batches, and counts what each outcome was.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use sqlx::PgPool;
use tokio::sync::mpsc;

use super::state::{Progress, Settled};
use crate::metrics as m;
use crate::outbox::record::{Recorded, RowUpdate, record};

/// The most outcomes one recording transaction writes.
const RECORD_BATCH: usize = 512;
/// How long a small batch waits for outcomes still in flight to join it.
const RECORD_LINGER: Duration = Duration::from_millis(2);
/// A batch this large is written without waiting.
const RECORD_EAGER: usize = 32;

/// Writes settled rows in batches: whatever queued up while the previous
/// batch was written goes in the next one. While the worker is busy (at
/// least [`RECORD_EAGER`] rows outstanding) a small batch waits up to
/// [`RECORD_LINGER`] for more: at moderate concurrency outcomes arrive one
/// or two per write otherwise, and a commit per row is most of what
/// delivery costs PostgreSQL. A lightly loaded worker writes at once, so
/// commit-to-delivered latency does not pay the wait. Ends when every
/// sender is gone and the queue is empty, so shutdown writes every settled
/// row.
pub(super) async fn recorder(
    pool: PgPool,
    progress: Arc<Progress>,
    mut rx: mpsc::UnboundedReceiver<Settled>,
) {
    let mut batch = Vec::with_capacity(RECORD_BATCH);
    while rx.recv_many(&mut batch, RECORD_BATCH).await > 0 {
        if batch.len() < RECORD_EAGER && progress.outstanding.load(Ordering::SeqCst) >= RECORD_EAGER
        {
            let deadline = tokio::time::Instant::now() + RECORD_LINGER;
            while batch.len() < RECORD_EAGER {
                let room = RECORD_BATCH - batch.len();
                match tokio::time::timeout_at(deadline, rx.recv_many(&mut batch, room)).await {
                    Ok(n) if n > 0 => {}
                    _ => break,
                }
            }
        }
        write_batch(&pool, &progress, &mut batch).await;
    }
}

async fn write_batch(pool: &PgPool, progress: &Progress, batch: &mut Vec<Settled>) {
    let outcomes: Vec<Recorded> = batch.iter().map(|s| s.recorded.clone()).collect();
    let written = (|| record(pool, &outcomes))
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(50))
                .with_max_delay(Duration::from_secs(5))
                .with_max_times(12),
        )
        .when(crate::db::is_transient)
        .notify(
            |e, after| tracing::warn!(error = %e, ?after, "recording outcomes failed; retrying"),
        )
        .await;
    match written {
        Ok(written) => {
            let by_id: HashMap<i64, _> = written.into_iter().map(|w| (w.id, w)).collect();
            let mut report = progress.report();
            for s in batch.iter() {
                let op = s.operation.as_str();
                let Some(w) = by_id.get(&s.recorded.id) else {
                    report.lost_lease += 1;
                    tracing::warn!(
                        row_id = s.recorded.id,
                        "lease lost before the outcome was recorded; the new holder decides"
                    );
                    continue;
                };
                let outcome = match &s.recorded.update {
                    RowUpdate::Delivered { .. } => {
                        report.delivered += 1;
                        if let Some(finished) = w.finished_at {
                            let latency = (finished - w.created_at).to_std().unwrap_or_default();
                            metrics::histogram!(m::COMMIT_TO_DELIVERED)
                                .record(latency.as_secs_f64());
                            progress.tally.delivered(
                                s.resource_type,
                                finished,
                                latency.as_secs_f64() * 1000.0,
                            );
                        }
                        "delivered"
                    }
                    RowUpdate::Retry { .. } => {
                        report.retried += 1;
                        "retry"
                    }
                    RowUpdate::Release { .. } => {
                        report.released += 1;
                        "released"
                    }
                    RowUpdate::Dead { .. } => {
                        report.dead += 1;
                        metrics::counter!(m::DEAD_ROWS, "resource_type" => s.resource_type)
                            .increment(1);
                        "dead"
                    }
                    RowUpdate::Superseded { .. } => {
                        report.superseded += 1;
                        "superseded"
                    }
                };
                metrics::counter!(m::DELIVERIES, "operation" => op, "outcome" => outcome, "resource_type" => s.resource_type)
                    .increment(1);
            }
        }
        Err(e) => {
            // The rows stay leased; when the lease expires another claim
            // re-delivers them (requests are idempotent). Nothing is lost.
            tracing::error!(error = %e, rows = batch.len(), "could not record outcomes; rows return after their lease");
            progress.give_up("recording outcomes", &e);
        }
    }
    progress
        .outstanding
        .fetch_sub(batch.len(), Ordering::SeqCst);
    batch.clear();
    progress.wake.notify_one();
}
