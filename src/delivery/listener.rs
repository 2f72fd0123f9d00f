//! Wakes the claimer when a capture commits (`pg_notify` from the trigger).
//!
//! `PgListener` drops notifications sent while it reconnects, so this is a
//! latency optimisation only; the claimer's poll interval is the guarantee.

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
