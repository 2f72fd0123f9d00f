//! Periodic work beside delivery: gauges from the outbox, database health for
//! `/readyz`, the outbox's partitions created ahead, the deliveries per
//! minute added for the operator page, and retention: whole days dropped,
//! then the rows of the days retention had to keep pruned.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::gate::OpenReason;
use super::state::{Health, Progress};
use crate::metrics as m;
use crate::outbox::stats::{self, Scope};
use crate::outbox::{minutes, partitions, prune};

const TICK: Duration = Duration::from_secs(1);
const STATS_EVERY: u32 = 5;
/// Delivered and superseded rows are counted this often (see [`Scope`]).
const ALL_STATS_EVERY: u32 = 60;
const PRUNE_EVERY: u32 = 60;
const PRUNE_BATCH: i64 = 1000;
/// Partitions are created ahead at start and this often after: days ahead,
/// so a missed tick or many costs nothing; a failure is counted and logged,
/// and the alert on `authz_outbox_partitions_ahead_seconds` fires if it lasts.
const PARTITIONS_EVERY: u32 = 300;

pub(super) async fn run(
    pool: PgPool,
    health: Arc<Health>,
    progress: Arc<Progress>,
    worker_id: String,
    retention: Duration,
    prune_enabled: bool,
    cancel: CancellationToken,
) {
    let mut tick = 0u32;
    loop {
        let gate = health.gate.open_reason();
        metrics::gauge!(m::CREDENTIAL_FAILURE)
            .set(f64::from(u8::from(gate == Some(OpenReason::Credential))));
        metrics::gauge!(m::CIRCUIT_OPEN).set(f64::from(u8::from(gate == Some(OpenReason::Outage))));
        if tick.is_multiple_of(PARTITIONS_EVERY) {
            create_ahead(&pool).await;
        }
        if tick.is_multiple_of(STATS_EVERY) {
            let scope = if tick.is_multiple_of(ALL_STATS_EVERY) {
                Scope::All
            } else {
                Scope::Live
            };
            refresh_gauges(&pool, &health, scope).await;
            progress.tally.flush(&pool, &worker_id).await;
            if let Err(e) = super::listener::refresh(&pool, &worker_id).await {
                tracing::debug!(error = %e, "refreshing wake-up marks failed");
            }
        }
        metrics::gauge!(m::READY).set(f64::from(u8::from(health.ready())));
        m::upkeep();
        if tick.is_multiple_of(PRUNE_EVERY)
            && let Err(e) = minutes::prune(&pool).await
        {
            tracing::debug!(error = %e, "deleting old deliveries per minute failed");
        }
        if prune_enabled && tick % PRUNE_EVERY == PRUNE_EVERY - 1 {
            prune_all(&pool, retention, &cancel).await;
        }
        tick = tick.wrapping_add(1);
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = cancel.cancelled() => return,
        }
    }
}

async fn refresh_gauges(pool: &PgPool, health: &Health, scope: Scope) {
    // A mapping installed after start gets its own label here.
    if let Err(e) = m::register_installed_types(pool).await {
        tracing::debug!(error = %e, "reading the installed mapping types failed");
    }
    match stats::collect(pool, scope, 0).await {
        Ok(s) => {
            health.database_ok.store(true, Ordering::Relaxed);
            // Every installed mapping type has its series (a mapping
            // installed after start gets them here).
            let types: Vec<&String> = s.by_type.keys().collect();
            m::init_series(&types);
            m::set_outbox_gauges(&s);
            if scope == Scope::All {
                m::set_principal_source_gauges(&s);
            }
        }
        Err(e) => {
            health.database_ok.store(false, Ordering::Relaxed);
            tracing::warn!(error = %e, "database unreachable; worker not ready");
            return;
        }
    }
    match partitions::list(pool).await {
        Ok(parts) => m::set_partition_gauges(&parts),
        Err(e) => tracing::debug!(error = %e, "listing the outbox partitions failed"),
    }
    match stats::last_reconcile(pool).await {
        Ok(last) => m::set_reconcile_gauges(last.as_ref()),
        Err(e) => tracing::debug!(error = %e, "reading the last reconcile run failed"),
    }
}

async fn create_ahead(pool: &PgPool) {
    match partitions::create_ahead(pool).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(partitions = n, "created outbox partitions ahead"),
        Err(e) => {
            metrics::counter!(m::PARTITION_CREATE_FAILURES).increment(1);
            tracing::warn!(error = %e, "creating outbox partitions ahead failed; captures land in the default partition once the last one ends");
        }
    }
}

async fn prune_all(pool: &PgPool, retention: Duration, cancel: &CancellationToken) {
    match partitions::drop_expired(pool, retention).await {
        Ok(dropped) if !dropped.is_empty() => {
            tracing::info!(partitions = ?dropped, "dropped outbox partitions past retention")
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "dropping outbox partitions past retention failed"),
    }
    loop {
        match prune::prune_kept(pool, retention, PRUNE_BATCH).await {
            Ok(n) if n == PRUNE_BATCH as u64 && !cancel.is_cancelled() => {
                tracing::debug!(rows = n, "pruned finished rows");
            }
            Ok(n) => {
                if n > 0 {
                    tracing::debug!(rows = n, "pruned finished rows");
                }
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "pruning failed");
                return;
            }
        }
    }
}
