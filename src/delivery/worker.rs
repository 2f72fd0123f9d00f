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
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use serde::Serialize;
use sqlx::PgPool;
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::claim::{Claim, Claimer};
use super::gate::{Admit, Gate, OpenReason};
use super::record::{Settled, recorder};
use super::target::Target;
use super::{housekeeping, listener, send, settle};
use crate::config::WorkerConfig;
use crate::domain::{Operation, PrincipalPolicy};

pub use super::settle::decide;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

/// What one run did, for `run --once` and tests.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunReport {
    pub delivered: u64,
    pub retried: u64,
    pub dead: u64,
    pub superseded: u64,
    pub released: u64,
    /// Outcomes dropped because the lease had passed to another worker.
    pub lost_lease: u64,
    /// agentex-auth was rejecting our credential when the run ended.
    pub credential_failure: bool,
    /// Why a `--once` run stopped early: the database refused a claim or an
    /// outcome in a way retrying does not fix (or stayed down through every
    /// retry). The rows it held return to pending when their lease expires.
    pub database_error: Option<String>,
}

/// Liveness facts the health endpoint reports.
#[derive(Debug)]
pub struct Health {
    pub(crate) database_ok: AtomicBool,
    pub(crate) gate: Arc<Gate>,
}

impl Health {
    /// Ready: the database answers and agentex-auth accepts our credential.
    pub fn ready(&self) -> bool {
        self.database_ok.load(Ordering::Relaxed)
            && self.gate.open_reason() != Some(OpenReason::Credential)
    }
}

/// What the claimer and the recorder both track. The recorder holds only
/// this (not [`Shared`]), so the outcome channel closes exactly when the
/// claimer and every delivery task are gone.
#[derive(Default)]
pub(super) struct Progress {
    /// Wakes the claimer.
    pub(super) wake: Notify,
    /// Rows claimed and not yet written back.
    pub(super) outstanding: AtomicUsize,
    report: Mutex<RunReport>,
}

impl Progress {
    pub(super) fn report(&self) -> std::sync::MutexGuard<'_, RunReport> {
        self.report.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a database error no retry could fix; a `--once` run stops on it.
    pub(super) fn give_up(&self, what: &str, e: &sqlx::Error) {
        self.report().database_error = Some(format!("{what}: {e}"));
        self.wake.notify_one();
    }

    pub(super) fn gave_up(&self) -> bool {
        self.report().database_error.is_some()
    }
}

impl listener::Wake for Progress {
    fn wake(&self) {
        self.wake.notify_one();
    }
}

/// State shared by the claimer and the delivery tasks.
pub(super) struct Shared {
    pub(super) pool: PgPool,
    pub(super) target: Target,
    pub(super) config: WorkerConfig,
    pub(super) gate: Arc<Gate>,
    pub(super) progress: Arc<Progress>,
    /// Rows whose request is in flight: released if shutdown cuts them off.
    pub(super) in_flight: Mutex<HashMap<i64, (Uuid, Operation, &'static str)>>,
    pub(super) settled: mpsc::UnboundedSender<Settled>,
    /// For `--once`: only rows due when the run started.
    pub(super) due_by: Option<chrono::DateTime<Utc>>,
    /// When the last credential failure was logged, to log it once per interval.
    pub(super) last_credential_log: Mutex<Option<Instant>>,
    /// What of a stored principal may be sent, by resource type, from the
    /// installed mappings' `principal_fields` (see [`Shared::principal_policy`]).
    pub(super) principal_policies: HashMap<String, PrincipalPolicy>,
    pub(super) default_policy: PrincipalPolicy,
}

pub struct Worker {
    pool: PgPool,
    target: Target,
    config: WorkerConfig,
    health: Arc<Health>,
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
        })
    }

    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    /// Delivers until `shutdown` fires, or — with `once` — until no row is due.
    pub async fn run(self, shutdown: CancellationToken, once: bool) -> RunReport {
        let principal_policies = settle::principal_policies(&self.pool).await;
        let (tx, rx) = mpsc::unbounded_channel();
        let progress = Arc::new(Progress::default());
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
        // Dropping the last sender ends the recorder once it has written
        // everything queued.
        drop(shared);
        for handle in [recorder, listener, housekeeping] {
            if let Err(e) = handle.await {
                tracing::error!(error = %e, "worker task ended abnormally");
            }
        }
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
        // Reap finished tasks so the set does not grow without bound.
        while let Some(done) = tasks.try_join_next() {
            if let Err(e) = done {
                tracing::error!(error = %e, "delivery task failed");
            }
        }
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
        if asleep {
            // Busy again: it claims by itself now, captures need not notify.
            if let Err(e) = listener::mark_awake(&shared.pool, &shared.config.worker_id).await {
                tracing::debug!(error = %e, "marking the worker awake failed");
            }
            asleep = false;
        }
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
