//! Wakes the claimer when a capture commits (`pg_notify` from the trigger).
//!
//! `PgListener` drops notifications sent while it reconnects, so this is a
//! latency optimisation only; the claimer's poll interval is the guarantee.
//!
//! Captures notify only while some worker is marked asleep in
//! `authz_outbox_listeners` (NOTIFY serialises the writers' commits, so a
//! busy system should not pay for it). A worker marks itself asleep before
//! it waits and claims once more after marking, so a capture that committed
//! without notifying in between is still found; the remaining window (a
//! writer that read "nobody asleep" just before the mark and commits after
//! the re-check) costs at most one poll interval.

use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;

use crate::outbox::NOTIFY_CHANNEL;

/// Something to wake.
pub trait Wake: Send + Sync {
    fn wake(&self);
}

pub async fn listen(pool: PgPool, target: Arc<dyn Wake>, cancel: CancellationToken) {
    loop {
        let connect = || async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(NOTIFY_CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let listener = tokio::select! {
            l = connect
                .retry(ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(100))
                    .with_max_delay(Duration::from_secs(10))
                    .without_max_times())
                .notify(|e, after| tracing::warn!(error = %e, ?after, "LISTEN connection failed; retrying")) => l,
            _ = cancel.cancelled() => return,
        };
        let Ok(mut listener) = listener else { continue };
        // Anything committed while we were not listening is picked up now.
        target.wake();
        loop {
            tokio::select! {
                n = listener.try_recv() => match n {
                    Ok(Some(_)) => target.wake(),
                    // The connection dropped; the next loop reconnects.
                    Ok(None) => { target.wake(); break }
                    Err(e) => {
                        tracing::warn!(error = %e, "LISTEN connection lost; reconnecting");
                        break;
                    }
                },
                _ = cancel.cancelled() => return,
            }
        }
    }
}

/// Marks this worker asleep: captures committed from now on notify.
pub async fn mark_asleep(pool: &PgPool, worker_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO authz_outbox_listeners (worker_id, sleeping_since) VALUES ($1, now())
         ON CONFLICT (worker_id) DO UPDATE SET sleeping_since = now()",
    )
    .bind(worker_id)
    .execute(pool)
    .await?;
    Ok(())
}

/// Marks this worker busy: it claims again by itself, no wake-up needed.
pub async fn mark_awake(pool: &PgPool, worker_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE authz_outbox_listeners SET sleeping_since = NULL WHERE worker_id = $1")
        .bind(worker_id)
        .execute(pool)
        .await?;
    Ok(())
}

/// Removes this worker's mark (graceful shutdown).
pub async fn forget(pool: &PgPool, worker_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM authz_outbox_listeners WHERE worker_id = $1")
        .bind(worker_id)
        .execute(pool)
        .await?;
    Ok(())
}

/// Keeps a sleeping worker's mark fresh and drops marks of workers that
/// vanished (killed, not shut down) ten minutes ago, so writers stop paying
/// for wake-ups nobody listens to.
pub async fn refresh(pool: &PgPool, worker_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE authz_outbox_listeners SET sleeping_since = now()
         WHERE worker_id = $1 AND sleeping_since IS NOT NULL",
    )
    .bind(worker_id)
    .execute(pool)
    .await?;
    sqlx::query(
        "DELETE FROM authz_outbox_listeners WHERE sleeping_since < now() - interval '10 minutes'",
    )
    .execute(pool)
    .await?;
    Ok(())
}
