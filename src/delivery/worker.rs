//! The worker loop.
//!
//! One claimer loop leases rows in batches while there is room (up to
//! `concurrency` in flight, gated by a semaphore, plus one batch claimed
//! ahead); each row is sent by its own task; outcomes go through one
//! channel to a recorder task that writes them in batches. The
//! claimer wakes on a capture's notification, on a recorded outcome (which
//! may unblock the next row of a resource), or on the poll interval.
//!
//! The steps live in files of their own, in the order a row meets them:
//! [`claim`](super::claim) → [`settle`](super::settle) (what needs no
//! request) → [`send`](super::send) → [`settle`](super::settle) (the
//! answer) → [`record`](super::record).

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use sqlx::PgPool;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::claim::{Claim, Claimer};
use super::gate::{Admit, Gate, OpenReason};
use super::record::recorder;
pub use super::state::{Health, RunReport};
use super::state::{Progress, Shared};
use super::target::Target;
use super::{housekeeping, listener, send, settle};
use crate::config::WorkerConfig;
use crate::domain::PrincipalPolicy;

pub use super::settle::decide;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

pub struct Worker {
    pool: PgPool,
    target: Target,
    config: WorkerConfig,
    health: Arc<Health>,
    progress: Arc<Progress>,
}

impl Worker {
    /// A worker delivering to `target` (an `AuthClient` for agentex-auth,
    /// or a `SpiceDbTarget`).
    pub fn new(
        pool: PgPool,
        target: impl Into<Target>,
        config: WorkerConfig,
    ) -> Result<Self, WorkerError> {
        config.validate()?;
        let gate = Arc::new(Gate::new(
            config.circuit_threshold,
            Duration::from_secs(1),
            Duration::from_secs(60).max(config.poll_interval),
        ));
        let health = Arc::new(Health {
            database_ok: AtomicBool::new(false),
            gate,
        });
        Ok(Worker {
            pool,
            target: target.into(),
            config,
            health,
            progress: Arc::new(Progress::default()),
        })
    }

    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    /// Wakes this worker's claimer from inside the process: the WAL relay
    /// beside it calls this once it has committed new rows, so the claim
    /// does not wait for its own `NOTIFY` to come back through the
    /// listening connection (other replicas still get the `NOTIFY`).
    pub fn waker(&self) -> Arc<dyn listener::Wake> {
        self.progress.clone()
    }

    /// Delivers until `shutdown` fires, or — with `once` — until no row is due.
    pub async fn run(self, shutdown: CancellationToken, once: bool) -> RunReport {
        let principal_policies = settle::principal_policies(&self.pool).await;
        let (tx, rx) = mpsc::unbounded_channel();
        let progress = self.progress;
        let shared = Arc::new(Shared {
            pool: self.pool.clone(),
            target: self.target,
            config: self.config,
            gate: self.health.gate.clone(),
            progress: progress.clone(),
            in_flight: Mutex::new(HashMap::new()),
            settled: tx,
            due_by: once.then(Utc::now),
            last_credential_log: Mutex::new(None),
            principal_policies,
            default_policy: PrincipalPolicy::default(),
        });
        let background = CancellationToken::new();
        let recorder = tokio::spawn(recorder(self.pool.clone(), progress.clone(), rx));
        let listener = tokio::spawn(listener::listen(
            self.pool.clone(),
            progress.clone() as Arc<dyn listener::Wake>,
            background.clone(),
        ));
        let housekeeping = tokio::spawn(housekeeping::run(
            self.pool.clone(),
            self.health.clone(),
            progress.clone(),
            shared.config.worker_id.clone(),
            shared.config.retention,
            !once,
            background.clone(),
        ));

        let mut tasks = claim_loop(&shared, &shutdown, once).await;
        send::finish_in_flight(&shared, &mut tasks).await;

        background.cancel();
        if let Err(e) = listener::forget(&self.pool, &shared.config.worker_id).await {
            tracing::debug!(error = %e, "removing the worker's wake-up mark failed");
        }
        let credential_failure = shared.gate.open_reason() == Some(OpenReason::Credential);
        let worker_id = shared.config.worker_id.clone();
        // Dropping the last sender ends the recorder once it has written
        // everything queued.
        drop(shared);
        for handle in [recorder, listener, housekeeping] {
            if let Err(e) = handle.await {
                tracing::error!(error = %e, "worker task ended abnormally");
            }
        }
        // Every outcome is written: the last deliveries per minute with them.
        progress.tally.flush(&self.pool, &worker_id).await;
        let mut report = progress.report().clone();
        report.credential_failure = credential_failure;
        report
    }
}

/// Claims, settles what needs no request, and sends the rest, until shutdown
/// (or, with `once`, until idle).
async fn claim_loop(shared: &Arc<Shared>, shutdown: &CancellationToken, once: bool) -> JoinSet<()> {
    let permits = Arc::new(Semaphore::new(shared.config.concurrency));
    let mut claimer = Claimer::new(shared);
    let mut asleep = false;
    let mut tasks = JoinSet::new();
    // A one-shot run cannot wait out a database that refuses its writes: it
    // ends, non-zero, and the next run (or a long-running worker) takes the
    // rows once their lease expires.
    while !(shutdown.is_cancelled() || once && shared.progress.gave_up()) {
        send::reap(&mut tasks);
        let (claimed, is_probe, claimed_at) = match claimer.next(shared, once, shutdown).await {
            Claim::Rows {
                rows,
                is_probe,
                claimed_at,
            } => (rows, is_probe, claimed_at),
            Claim::Empty { admit, idle_before } => {
                let step = wait_for_work(shared, admit, idle_before, once, &mut asleep, shutdown);
                match step.await {
                    ControlFlow::Continue(()) => continue,
                    ControlFlow::Break(()) => break,
                }
            }
            Claim::Failed => continue,
            Claim::GiveUp => break,
        };
        let Some(deliverables) =
            settle::without_request_or_release(shared, claimed, is_probe, once).await
        else {
            continue;
        };
        if is_probe && deliverables.is_empty() {
            shared.gate.probe_unused();
        }
        send::dispatch(
            shared,
            &permits,
            &mut tasks,
            deliverables,
            is_probe,
            claimed_at,
            shutdown,
        )
        .await;
        if asleep {
            // Busy again: it claims by itself now, captures need not
            // notify. Marked once the requests are on their way, not before:
            // a woken worker's first row should not wait for this write.
            if let Err(e) = listener::mark_awake(&shared.pool, &shared.config.worker_id).await {
                tracing::debug!(error = %e, "marking the worker awake failed");
            }
            asleep = false;
        }
    }
    tasks
}

/// Nothing was claimed: mark this worker asleep (so captures notify) and
/// claim once more, or wait for a wake-up or the poll interval. `Break`
/// when a one-shot run has nothing left it may send.
async fn wait_for_work(
    shared: &Shared,
    admit: Admit,
    idle_before: bool,
    once: bool,
    asleep: &mut bool,
    shutdown: &CancellationToken,
) -> ControlFlow<()> {
    // Going idle: mark this worker asleep so captures notify, then claim
    // once more before waiting (see `listener`).
    if !once && !*asleep && matches!(admit, Admit::All) {
        match listener::mark_asleep(&shared.pool, &shared.config.worker_id).await {
            Ok(()) => {
                *asleep = true;
                return ControlFlow::Continue(());
            }
            Err(e) => tracing::debug!(error = %e, "marking the worker asleep failed"),
        }
    }
    // A one-shot run ends when nothing it may send is due. While the gate
    // is open (an outage, a rejected credential) that includes the rows
    // held back: a one-shot run cannot wait either out.
    if once && idle_before {
        if let Some(reason) = shared.gate.open_reason() {
            tracing::warn!(
                ?reason,
                "agentex-auth unavailable; rows held back for the next run"
            );
        }
        return ControlFlow::Break(());
    }
    let wait = match admit {
        Admit::Nothing { until } => until
            .saturating_duration_since(Instant::now())
            .min(shared.config.poll_interval),
        _ => shared.config.poll_interval,
    };
    tokio::select! {
        _ = shared.progress.wake.notified() => {}
        _ = tokio::time::sleep(wait) => {}
        _ = shutdown.cancelled() => {}
    }
    ControlFlow::Continue(())
}
