//! Claim: how many rows this worker may lease now (room in flight, the gate)
//! and leasing them, deregisters first.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::backoff::retry_delay;
use super::gate::Admit;
use super::state::Shared;
use crate::outbox::{ClaimedRow, claim};

/// Consecutive failed claims after which a `--once` run stops (about 15 s
/// of backoff); a long-running worker retries for as long as it runs.
const ONCE_DB_ATTEMPTS: u32 = 8;

/// What one claim step produced.
pub(super) enum Claim {
    /// Rows now leased to this worker.
    Rows {
        rows: Vec<ClaimedRow>,
        /// The gate admitted only this one row, to learn whether the target is back.
        is_probe: bool,
        claimed_at: Instant,
    },
    /// Nothing claimed: nothing due, no room, or the gate held back.
    Empty {
        admit: Admit,
        /// Nothing was outstanding before this step.
        idle_before: bool,
    },
    /// The claim failed and the pause before the next one has passed.
    Failed,
    /// A `--once` run gives up on a database that refuses its claims.
    GiveUp,
}

/// The claimer's sizing and its run of failed claims.
pub(super) struct Claimer {
    /// Rows this worker may hold: `concurrency` requests' rows in flight plus
    /// one batch claimed ahead.
    capacity: usize,
    /// While rows are in flight, the smallest claim worth a round trip.
    min_claim: usize,
    db_failures: u32,
}

impl Claimer {
    pub(super) fn new(shared: &Shared) -> Self {
        // A worker holds up to `concurrency` requests' rows in flight plus one
        // batch claimed ahead, waiting for permits: a busy worker then pays one
        // claim (and one set of checks) per batch, not one per few finished
        // requests, and the target is never idle while it claims. Rows, not
        // requests: a SpiceDB request carries up to `--spicedb-batch` of them.
        let capacity = shared
            .config
            .concurrency
            .saturating_mul(shared.target.rows_per_request())
            .saturating_add(shared.config.batch_size);
        Claimer {
            capacity,
            min_claim: (shared.config.batch_size / 4).max(1),
            db_failures: 0,
        }
    }

    /// One claim: as many rows as fit and the gate admits.
    pub(super) async fn next(
        &mut self,
        shared: &Shared,
        once: bool,
        shutdown: &CancellationToken,
    ) -> Claim {
        let outstanding = shared.progress.outstanding.load(Ordering::SeqCst);
        let idle_before = outstanding == 0;
        let room = self
            .capacity
            .saturating_sub(outstanding)
            .min(shared.config.batch_size);
        // Claim in batches: while rows are in flight, wait until a worthwhile
        // batch fits, so a busy worker pays one claim round trip per batch
        // instead of one per finished request.
        let admit = if idle_before || room >= self.min_claim {
            shared.gate.admit(Instant::now())
        } else {
            Admit::Nothing {
                until: Instant::now() + shared.config.poll_interval,
            }
        };
        let limit = match admit {
            Admit::All => room,
            Admit::Probe => room.min(1),
            Admit::Nothing { .. } => 0,
        };
        let claimed_at = Instant::now();
        let claimed = if limit > 0 {
            claim_batch(shared, limit).await
        } else {
            Ok(Vec::new())
        };
        match claimed {
            Ok(rows) if rows.is_empty() => {
                if limit > 0 {
                    self.db_failures = 0;
                }
                if admit == Admit::Probe {
                    shared.gate.probe_unused();
                }
                Claim::Empty { admit, idle_before }
            }
            Ok(rows) => {
                self.db_failures = 0;
                Claim::Rows {
                    rows,
                    is_probe: admit == Admit::Probe,
                    claimed_at,
                }
            }
            Err(e) => {
                self.db_failures += 1;
                if admit == Admit::Probe {
                    shared.gate.probe_unused();
                }
                // A one-shot run cannot wait out a database that refuses its
                // claims: it ends, non-zero, and the next run (or a
                // long-running worker) takes the rows once their lease expires.
                if once && (!crate::db::is_transient(&e) || self.db_failures >= ONCE_DB_ATTEMPTS) {
                    shared.progress.give_up("claiming rows", &e);
                    return Claim::GiveUp;
                }
                tracing::warn!(error = %e, "claiming rows failed; retrying");
                let pause = retry_delay(
                    self.db_failures,
                    Duration::from_millis(100),
                    Duration::from_secs(5),
                    None,
                    rand::random(),
                );
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = shutdown.cancelled() => {}
                }
                Claim::Failed
            }
        }
    }
}

/// Deregisters first (revoking access is more urgent than granting it), then
/// registers with the room left, in one statement.
async fn claim_batch(shared: &Shared, limit: usize) -> Result<Vec<ClaimedRow>, sqlx::Error> {
    let c = &shared.config;
    let rows = claim::claim_due(
        &shared.pool,
        &c.worker_id,
        c.lease,
        limit as i64,
        shared.due_by,
    )
    .await?;
    shared
        .progress
        .outstanding
        .fetch_add(rows.len(), Ordering::SeqCst);
    Ok(rows)
}
