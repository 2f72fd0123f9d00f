//! The worker loop.
//!
//! One claimer loop leases rows in batches while there is room (up to
//! `concurrency` in flight, gated by a semaphore, plus one batch claimed
//! ahead); each row is sent by its own task; outcomes go through one
//! channel to a recorder task that writes them in batches. The
//! claimer wakes on a capture's notification, on a recorded outcome (which
//! may unblock the next row of a resource), or on the poll interval.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use chrono::Utc;
use serde::Serialize;
use sqlx::PgPool;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::backoff::retry_delay;
use super::gate::{Admit, Gate, OpenReason, Signal};
use super::outcome::Verdict;
use super::prepare::{self, Deliverable};
use super::target::Target;
use super::{housekeeping, listener};
use crate::config::WorkerConfig;
use crate::display::{self, Escaped};
use crate::domain::{Operation, PrincipalPolicy, ResourceRef, names_a_creator};
use crate::metrics as m;
use crate::outbox::record::{Recorded, RowUpdate, record};
use crate::outbox::{ClaimedRow, claim};

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

/// A row settled by a delivery task (or without one), waiting to be written.
struct Settled {
    recorded: Recorded,
    operation: Operation,
    /// The row's resource type, as the metrics label it.
    resource_type: &'static str,
}

/// What the claimer and the recorder both track. The recorder holds only
/// this (not [`Shared`]), so the outcome channel closes exactly when the
/// claimer and every delivery task are gone.
#[derive(Default)]
struct Progress {
    /// Wakes the claimer.
    wake: Notify,
    /// Rows claimed and not yet written back.
    outstanding: AtomicUsize,
    report: Mutex<RunReport>,
}

impl Progress {
    fn report(&self) -> std::sync::MutexGuard<'_, RunReport> {
        self.report.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a database error no retry could fix; a `--once` run stops on it.
    fn give_up(&self, what: &str, e: &sqlx::Error) {
        self.report().database_error = Some(format!("{what}: {e}"));
        self.wake.notify_one();
    }

    fn gave_up(&self) -> bool {
        self.report().database_error.is_some()
    }
}

impl listener::Wake for Progress {
    fn wake(&self) {
        self.wake.notify_one();
    }
}

/// State shared by the claimer and the delivery tasks.
struct Shared {
    pool: PgPool,
    target: Target,
    config: WorkerConfig,
    gate: Arc<Gate>,
    progress: Arc<Progress>,
    /// Rows whose request is in flight: released if shutdown cuts them off.
    in_flight: Mutex<HashMap<i64, (Uuid, Operation, &'static str)>>,
    settled: mpsc::UnboundedSender<Settled>,
    /// For `--once`: only rows due when the run started.
    due_by: Option<chrono::DateTime<Utc>>,
    /// When the last credential failure was logged, to log it once per interval.
    last_credential_log: Mutex<Option<Instant>>,
    /// What of a stored principal may be sent, by resource type, from the
    /// installed mappings' `principal_fields` (see [`Shared::principal_policy`]).
    principal_policies: HashMap<String, PrincipalPolicy>,
    default_policy: PrincipalPolicy,
}

/// Each mapped type's kept principal fields (the union over its mappings),
/// read once at start: a mapping change is applied by `migrate` and picked
/// up by restarting the workers, as the operations guide says. Unreadable
/// (no mappings installed yet): every type gets the default.
async fn principal_policies(pool: &PgPool) -> HashMap<String, PrincipalPolicy> {
    let installed = match crate::mapping::install::installed(pool).await {
        Ok(installed) => installed,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the installed mappings; sending identity fields only");
            return HashMap::new();
        }
    };
    let mut policies: HashMap<String, PrincipalPolicy> = HashMap::new();
    for m in installed {
        let fields = m
            .definition
            .get("principal_fields")
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|f| f.as_str().map(str::to_string))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        let policy = policies
            .entry(m.resource_type.clone())
            .or_insert_with(|| PrincipalPolicy { keep: Vec::new() });
        for field in fields {
            if !policy.keep.contains(&field) {
                policy.keep.push(field);
            }
        }
    }
    policies.retain(|_, p| !p.keep.is_empty());
    policies
}

impl Shared {
    /// The policy applied to the principal of a request for `resource`: its
    /// type's mapping's kept fields (the capture kept the same), else the
    /// identity fields. Credential-looking fields never pass either way.
    fn principal_policy(&self, resource: &ResourceRef) -> &PrincipalPolicy {
        self.principal_policies
            .get(resource.kind.as_str())
            .unwrap_or(&self.default_policy)
    }

    /// Every outcome passes here, so every one is logged the same way: row
    /// id, resource, attempt — never the principal or a credential — and
    /// every error is stored and logged as one escaped, bounded line
    /// ([`display::error_line`]): it may quote a server, or the row itself.
    fn settle(&self, row: &ClaimedRow, operation: Operation, update: RowUpdate) {
        let update = one_line_errors(update);
        let resource = format_args!(
            "{}:{}",
            Escaped(&row.resource_type),
            Escaped(&row.resource_id)
        );
        let (id, attempt, op) = (row.id, row.attempts, operation.as_str());
        match &update {
            RowUpdate::Delivered { .. } => {
                tracing::debug!(row_id = id, %resource, attempt, operation = op, "delivered")
            }
            RowUpdate::Retry { error, at, .. } => {
                tracing::info!(row_id = id, %resource, attempt, operation = op, %error, retry_at = %at, "delivery failed; will retry")
            }
            RowUpdate::Dead { error, .. } => {
                tracing::warn!(row_id = id, %resource, attempt, operation = op, %error, "row is dead")
            }
            RowUpdate::Superseded { reason } => {
                tracing::debug!(row_id = id, %resource, attempt, operation = op, %reason, "superseded")
            }
            RowUpdate::Release { error, .. } => {
                tracing::debug!(row_id = id, %resource, attempt, operation = op, error = error.as_deref().unwrap_or(""), "released")
            }
        }
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&row.id);
        let settled = Settled {
            recorded: Recorded {
                id: row.id,
                lease_token: row.lease_token,
                update,
            },
            operation,
            resource_type: m::type_label(&row.resource_type),
        };
        // The recorder outlives every sender; if it is gone the process is
        // ending and the lease will hand the row to another worker.
        let _ = self.settled.send(settled);
    }
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
        let principal_policies = principal_policies(&self.pool).await;
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
        finish_in_flight(&shared, &mut tasks).await;

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

/// Claims and dispatches until shutdown (or, with `once`, until idle).
async fn claim_loop(shared: &Arc<Shared>, shutdown: &CancellationToken, once: bool) -> JoinSet<()> {
    let permits = Arc::new(Semaphore::new(shared.config.concurrency));
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
    let min_claim = (shared.config.batch_size / 4).max(1);
    let mut asleep = false;
    let mut tasks = JoinSet::new();
    let mut db_failures = 0u32;
    loop {
        if shutdown.is_cancelled() {
            break;
        }
        // A one-shot run cannot wait out a database that refuses its writes:
        // it ends, non-zero, and the next run (or a long-running worker)
        // takes the rows once their lease expires.
        if once && shared.progress.gave_up() {
            break;
        }
        // Reap finished tasks so the set does not grow without bound.
        while let Some(done) = tasks.try_join_next() {
            if let Err(e) = done {
                tracing::error!(error = %e, "delivery task failed");
            }
        }
        let outstanding = shared.progress.outstanding.load(Ordering::SeqCst);
        let idle_before = outstanding == 0;
        let room = capacity
            .saturating_sub(outstanding)
            .min(shared.config.batch_size);
        // Claim in batches: while rows are in flight, wait until a worthwhile
        // batch fits, so a busy worker pays one claim round trip per batch
        // instead of one per finished request.
        let admit = if idle_before || room >= min_claim {
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
            match claim_batch(shared, limit).await {
                Ok(rows) => {
                    db_failures = 0;
                    rows
                }
                Err(e) => {
                    db_failures += 1;
                    if admit == Admit::Probe {
                        shared.gate.probe_unused();
                    }
                    if once && (!crate::db::is_transient(&e) || db_failures >= ONCE_DB_ATTEMPTS) {
                        shared.progress.give_up("claiming rows", &e);
                        break;
                    }
                    tracing::warn!(error = %e, "claiming rows failed; retrying");
                    let pause = retry_delay(
                        db_failures,
                        Duration::from_millis(100),
                        Duration::from_secs(5),
                        None,
                        rand::random(),
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = shutdown.cancelled() => {}
                    }
                    continue;
                }
            }
        } else {
            Vec::new()
        };

        if claimed.is_empty() {
            if admit == Admit::Probe {
                shared.gate.probe_unused();
            }
            // Going idle: mark this worker asleep so captures notify, then
            // claim once more before waiting (see `listener`).
            if !once && !asleep && matches!(admit, Admit::All) {
                match listener::mark_asleep(&shared.pool, &shared.config.worker_id).await {
                    Ok(()) => {
                        asleep = true;
                        continue;
                    }
                    Err(e) => tracing::debug!(error = %e, "marking the worker asleep failed"),
                }
            }
            // A one-shot run ends when nothing it may send is due. While the
            // gate is open (an outage, a rejected credential) that includes
            // the rows held back: a one-shot run cannot wait either out.
            if once && idle_before {
                if let Some(reason) = shared.gate.open_reason() {
                    tracing::warn!(
                        ?reason,
                        "agentex-auth unavailable; rows held back for the next run"
                    );
                }
                break;
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
            continue;
        }

        if asleep {
            // Busy again: it claims by itself now, captures need not notify.
            if let Err(e) = listener::mark_awake(&shared.pool, &shared.config.worker_id).await {
                tracing::debug!(error = %e, "marking the worker awake failed");
            }
            asleep = false;
        }
        let is_probe = admit == Admit::Probe;
        let deliverables = match settle_without_request(shared, claimed).await {
            Ok(deliverables) => deliverables,
            Err(e) => {
                tracing::warn!(error = %e, "checking claimed rows failed; they are released");
                if is_probe {
                    shared.gate.probe_unused();
                }
                if once && !crate::db::is_transient(&e) {
                    shared.progress.give_up("checking claimed rows", &e);
                }
                continue;
            }
        };
        if is_probe && deliverables.is_empty() {
            shared.gate.probe_unused();
        }
        // A row claimed ahead is sent only while its request still ends
        // well inside the lease; otherwise another worker could claim it
        // again while our request is in flight, and order per resource
        // would rest on timing.
        let margin = shared
            .config
            .lease
            .saturating_sub(shared.config.request_timeout.saturating_mul(2));
        let send_by = claimed_at.checked_add(margin).unwrap_or(claimed_at);
        // One request per group: a row alone for agentex-auth, registers of
        // several resources together for SpiceDB.
        let mut queue = shared.target.group(deliverables).into_iter();
        while let Some(group) = queue.next() {
            let permit = tokio::select! {
                permit = permits.clone().acquire_owned() => permit.ok(),
                _ = shutdown.cancelled() => None,
            };
            let reason = match permit {
                // The gate may have opened while this row waited for a
                // permit (the requests ahead of it answered 401, or failed
                // past the threshold): it is held back unsent, its attempt
                // refunded, like the rest of its batch. Only a probe goes out
                // while the gate is open.
                Some(_) if !is_probe && shared.gate.open_reason().is_some() => {
                    match shared.gate.open_reason() {
                        Some(OpenReason::Credential) => {
                            "held back: the target rejected the credential (401 / UNAUTHENTICATED)"
                        }
                        _ => "held back: the target looks down (circuit open)",
                    }
                }
                Some(permit) if Instant::now() < send_by => {
                    let mut in_flight = shared.in_flight.lock().unwrap_or_else(|p| p.into_inner());
                    for d in &group {
                        in_flight.insert(
                            d.row.id,
                            (
                                d.row.lease_token,
                                d.operation,
                                m::type_label(&d.row.resource_type),
                            ),
                        );
                    }
                    drop(in_flight);
                    tasks.spawn(deliver(shared.clone(), group, is_probe, permit));
                    continue;
                }
                Some(_) => "claimed ahead too long to send within its lease",
                None => "released at shutdown",
            };
            for unsent in std::iter::once(group).chain(queue.by_ref()).flatten() {
                shared.settle(
                    &unsent.row,
                    unsent.operation,
                    RowUpdate::Release {
                        at: Utc::now(),
                        status: None,
                        error: Some(reason.into()),
                    },
                );
            }
        }
    }
    tasks
}

/// The update with its error (or reason) as `last_error` may hold it.
fn one_line_errors(update: RowUpdate) -> RowUpdate {
    match update {
        RowUpdate::Retry { at, status, error } => RowUpdate::Retry {
            at,
            status,
            error: display::error_line(&error),
        },
        RowUpdate::Release { at, status, error } => RowUpdate::Release {
            at,
            status,
            error: error.as_deref().map(display::error_line),
        },
        RowUpdate::Dead { status, error } => RowUpdate::Dead {
            status,
            error: display::error_line(&error),
        },
        RowUpdate::Superseded { reason } => RowUpdate::Superseded {
            reason: display::error_line(&reason),
        },
        delivered @ RowUpdate::Delivered { .. } => delivered,
    }
}

/// Deregisters first (revoking access is more urgent than granting it), then
/// registers with the room left.
async fn claim_batch(shared: &Shared, limit: usize) -> Result<Vec<ClaimedRow>, sqlx::Error> {
    let c = &shared.config;
    let mut rows = claim::claim(
        &shared.pool,
        &c.worker_id,
        Operation::Deregister,
        c.lease,
        limit as i64,
        shared.due_by,
    )
    .await?;
    let left = limit.saturating_sub(rows.len());
    if left > 0 {
        rows.extend(
            claim::claim(
                &shared.pool,
                &c.worker_id,
                Operation::Register,
                c.lease,
                left as i64,
                shared.due_by,
            )
            .await?,
        );
    }
    shared
        .progress
        .outstanding
        .fetch_add(rows.len(), Ordering::SeqCst);
    Ok(rows)
}

/// Settles what needs no request and returns the rest.
///
/// - bad data (from any writer) goes dead with the reason;
/// - a never-attempted register followed directly by a deregister: both
///   superseded, nothing sent;
/// - a register whose key or agent row is gone: superseded (the delete's
///   deregister cleans up whatever an earlier attempt applied);
/// - a guarded deregister (from reconcile) whose row exists again: superseded.
///
/// On a database error every claimed row is released, not left leased.
async fn settle_without_request(
    shared: &Arc<Shared>,
    claimed: Vec<ClaimedRow>,
) -> Result<Vec<Deliverable>, sqlx::Error> {
    let mut checked = Vec::with_capacity(claimed.len());
    for row in claimed {
        let checked_row = prepare::check(row, shared.target.open_types()).and_then(|d| {
            let policy = shared.principal_policy(&d.resource);
            apply_principal_policy(policy, d, shared.target.open_types())
        });
        match checked_row {
            Ok(d) => checked.push(d),
            Err((row, reason)) => {
                let operation = row.operation.parse().unwrap_or(Operation::Register);
                shared.settle(
                    &row,
                    operation,
                    RowUpdate::Dead {
                        status: None,
                        error: reason,
                    },
                );
            }
        }
    }
    match settle_stale(shared, &checked).await {
        Ok(stale) => Ok(checked
            .into_iter()
            .filter(|d| !stale.contains(&d.row.id))
            .collect()),
        Err(e) => {
            for d in &checked {
                shared.settle(
                    &d.row,
                    d.operation,
                    RowUpdate::Release {
                        at: Utc::now(),
                        status: None,
                        error: None,
                    },
                );
            }
            Err(e)
        }
    }
}

/// Replaces the row's principal with what `policy` lets through, right
/// before the request is built, whatever wrote the row. A register whose
/// principal names no creator once sanitized cannot be sent to
/// agentex-auth; on SpiceDB (`open_types`) the mapping's relationships
/// decide whether one is needed (a `creator = []` mapping names nobody).
fn apply_principal_policy(
    policy: &PrincipalPolicy,
    mut d: Deliverable,
    open_types: bool,
) -> Result<Deliverable, (Box<ClaimedRow>, String)> {
    let Some(principal) = policy.sanitize(&d.principal) else {
        return Err((Box::new(d.row), "principal must be a JSON object".into()));
    };
    if d.operation == Operation::Register && !open_types && !names_a_creator(&principal) {
        return Err((
            Box::new(d.row),
            "no creator resolvable: no user_id or service_account_id left once the \
             principal policy dropped credential, non-identity, nested and over-long fields"
                .into(),
        ));
    }
    d.principal = principal;
    Ok(d)
}

/// Returns the ids of rows settled as superseded.
async fn settle_stale(
    shared: &Arc<Shared>,
    checked: &[Deliverable],
) -> Result<Vec<i64>, sqlx::Error> {
    let fresh_registers: Vec<&ClaimedRow> = checked
        .iter()
        .filter(|d| d.operation == Operation::Register && d.row.never_attempted())
        .map(|d| &d.row)
        .collect();
    // These were written by the statement itself; count them here.
    // The statement returns both rows of each pair; ours are the registers.
    let pairs: Vec<i64> = claim::supersede_create_then_delete(&shared.pool, &fresh_registers)
        .await?
        .into_iter()
        .filter(|id| fresh_registers.iter().any(|r| r.id == *id))
        .collect();
    if !pairs.is_empty() {
        let n = pairs.len() as u64;
        // Each pair is two rows: the claimed register and its deregister.
        shared.progress.report().superseded += 2 * n;
        for id in &pairs {
            let kind = fresh_registers
                .iter()
                .find(|r| r.id == *id)
                .map_or("unknown", |r| m::type_label(&r.resource_type));
            for op in ["register", "deregister"] {
                metrics::counter!(m::DELIVERIES, "operation" => op, "outcome" => "superseded", "resource_type" => kind)
                    .increment(1);
            }
        }
        shared
            .progress
            .outstanding
            .fetch_sub(pairs.len(), Ordering::SeqCst);
        shared.progress.wake.notify_one();
    }
    let registers: Vec<&ClaimedRow> = checked
        .iter()
        .filter(|d| d.operation == Operation::Register && !pairs.contains(&d.row.id))
        .map(|d| &d.row)
        .collect();
    let guarded: Vec<&ClaimedRow> = checked
        .iter()
        .filter(|d| d.operation == Operation::Deregister && d.row.guarded)
        .map(|d| &d.row)
        .collect();
    let existing_registers = claim::existing_resources(&shared.pool, &registers).await?;
    let existing_guarded = claim::existing_resources(&shared.pool, &guarded).await?;

    let mut stale = pairs;
    for row in registers {
        if !existing_registers.contains(&row.id) {
            stale.push(row.id);
            shared.settle(
                row,
                Operation::Register,
                RowUpdate::Superseded {
                    reason: "resource row no longer exists".into(),
                },
            );
        }
    }
    for row in guarded {
        if existing_guarded.contains(&row.id) {
            stale.push(row.id);
            shared.settle(
                row,
                Operation::Deregister,
                RowUpdate::Superseded {
                    reason: "guarded deregister: resource row exists again".into(),
                },
            );
        }
    }
    Ok(stale)
}

/// Sends one group (one request) and settles its rows.
async fn deliver(
    shared: Arc<Shared>,
    group: Vec<Deliverable>,
    is_probe: bool,
    _permit: OwnedSemaphorePermit,
) {
    for d in &group {
        metrics::counter!(m::ATTEMPTS, "operation" => d.operation.as_str()).increment(1);
    }
    let started = Instant::now();
    let answered = shared.target.send(group).await;
    let elapsed = started.elapsed().as_secs_f64();

    // The gate hears one signal per request: the target was up if any row
    // got an answer of its own, and refused our credential if any was.
    let mut signal = Signal::Transient;
    for (d, verdict) in &answered {
        metrics::histogram!(m::DELIVERY_DURATION, "operation" => d.operation.as_str())
            .record(elapsed);
        match verdict {
            Verdict::Unauthorized { .. } => signal = Signal::Unauthorized,
            Verdict::Applied { .. } | Verdict::Permanent { .. }
                if signal != Signal::Unauthorized =>
            {
                signal = Signal::Answered
            }
            _ => {}
        }
    }
    if let Some(reason) = shared.gate.record(signal, is_probe, Instant::now()) {
        match reason {
            OpenReason::Outage => tracing::warn!(
                cooldown = ?shared.gate.cooldown(),
                target = shared.target.name(),
                "the delivery target looks down; circuit open, probing with one row"
            ),
            OpenReason::Credential => log_credential_failure(&shared),
        }
    }
    for (d, verdict) in answered {
        let update = decide(&shared.config, &d.row, verdict, rand::random());
        shared.settle(&d.row, d.operation, update);
    }
}

fn log_credential_failure(shared: &Shared) {
    let mut last = shared
        .last_credential_log
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let now = Instant::now();
    if last.is_none_or(|at| now.duration_since(at) >= Duration::from_secs(60)) {
        *last = Some(now);
        tracing::error!(
            target_name = shared.target.name(),
            "the delivery target rejected our credential (401 / UNAUTHENTICATED); delivery is \
             paused and the worker is not ready. Check {}",
            shared.target.credential_hint()
        );
    }
}

/// The row's next state from the answer's class, its attempts and its age.
pub fn decide(config: &WorkerConfig, row: &ClaimedRow, verdict: Verdict, jitter: f64) -> RowUpdate {
    let now = Utc::now();
    match verdict {
        Verdict::Applied { consistency_token } => RowUpdate::Delivered { consistency_token },
        Verdict::Permanent { status, error } => RowUpdate::Dead {
            status: Some(status),
            error,
        },
        Verdict::Unauthorized { status, error } => RowUpdate::Release {
            at: now,
            status: Some(status),
            error: Some(error),
        },
        Verdict::Transient {
            status,
            retry_after,
            error,
        } => {
            let attempts = u32::try_from(row.attempts).unwrap_or(0);
            let age = (now - row.created_at).to_std().unwrap_or_default();
            if attempts >= config.max_attempts && age >= config.dead_after {
                RowUpdate::Dead {
                    status,
                    error: format!("gave up after {attempts} attempts: {error}"),
                }
            } else {
                let delay = retry_delay(
                    attempts,
                    config.backoff_base,
                    config.backoff_cap,
                    retry_after,
                    jitter,
                );
                // The delay is bounded by the backoff cap, itself bounded
                // by the configuration; checked anyway, so no setting can
                // panic a delivery task.
                let at = chrono::Duration::from_std(delay)
                    .ok()
                    .and_then(|delay| now.checked_add_signed(delay))
                    .unwrap_or_else(|| now + chrono::Duration::hours(24));
                RowUpdate::Retry { at, status, error }
            }
        }
    }
}

/// Lets in-flight deliveries finish within the shutdown deadline, then
/// releases whatever is still in flight so another worker can take it at once.
async fn finish_in_flight(shared: &Arc<Shared>, tasks: &mut JoinSet<()>) {
    let deadline = tokio::time::sleep(shared.config.shutdown_timeout);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            next = tasks.join_next() => if next.is_none() { return },
            _ = &mut deadline => break,
        }
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    let cut_off: Vec<(i64, Uuid, Operation, &'static str)> = shared
        .in_flight
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(id, (token, op, kind))| (*id, *token, *op, *kind))
        .collect();
    tracing::info!(
        rows = cut_off.len(),
        "shutdown deadline reached; releasing in-flight rows"
    );
    for (id, lease_token, operation, resource_type) in cut_off {
        shared
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        let _ = shared.settled.send(Settled {
            recorded: Recorded {
                id,
                lease_token,
                update: RowUpdate::Release {
                    at: Utc::now(),
                    status: None,
                    error: Some("released at shutdown".into()),
                },
            },
            operation,
            resource_type,
        });
    }
}

/// The most outcomes one recording transaction writes.
const RECORD_BATCH: usize = 512;
/// How long a small batch waits for outcomes still in flight to join it.
const RECORD_LINGER: Duration = Duration::from_millis(2);
/// Consecutive failed claims after which a `--once` run stops (about 15 s
/// of backoff); a long-running worker retries for as long as it runs.
const ONCE_DB_ATTEMPTS: u32 = 8;

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
async fn recorder(pool: PgPool, progress: Arc<Progress>, mut rx: mpsc::UnboundedReceiver<Settled>) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn row(attempts: i32) -> ClaimedRow {
        ClaimedRow {
            id: 1,
            resource_type: "task".into(),
            resource_id: "t1".into(),
            parent_type: None,
            parent_id: None,
            operation: "register".into(),
            principal: None,
            attempts,
            created_at: Utc::now(),
            lease_token: Uuid::new_v4(),
            guarded: false,
            origin: "capture".into(),
            last_error: None,
            attributes: None,
        }
    }

    /// The library does not trust its caller to have validated: a backoff
    /// cap and a `Retry-After` far past any date still schedule a retry.
    #[test]
    fn no_setting_can_panic_the_retry_schedule() {
        let huge = Duration::from_secs(2_000_000 * 365 * 86_400);
        let config = WorkerConfig {
            backoff_cap: huge,
            backoff_base: huge,
            ..WorkerConfig::default()
        };
        let verdict = Verdict::Transient {
            status: Some(429),
            retry_after: Some(huge),
            error: "slow down".into(),
        };
        match decide(&config, &row(3), verdict, 1.0) {
            RowUpdate::Retry { at, .. } => assert!(at > Utc::now()),
            other => panic!("{other:?}"),
        }
    }

    /// Whatever a target or a check put in an error, `last_error` and the
    /// log get one escaped line of at most [`display::MAX_ERROR_CHARS`].
    #[test]
    fn every_stored_error_is_one_bounded_escaped_line() {
        let hostile = format!("bad\u{1b}[2J\nforged\u{202e}{}", "x".repeat(2000));
        let at = Utc::now();
        let updates = [
            RowUpdate::Retry {
                at,
                status: None,
                error: hostile.clone(),
            },
            RowUpdate::Dead {
                status: Some(400),
                error: hostile.clone(),
            },
            RowUpdate::Release {
                at,
                status: None,
                error: Some(hostile.clone()),
            },
            RowUpdate::Superseded {
                reason: hostile.clone(),
            },
        ];
        for update in updates {
            let error = match one_line_errors(update) {
                RowUpdate::Retry { error, .. } | RowUpdate::Dead { error, .. } => error,
                RowUpdate::Release { error, .. } => error.unwrap_or_default(),
                RowUpdate::Superseded { reason } => reason,
                other => panic!("{other:?}"),
            };
            assert!(
                error.starts_with("bad\\u{1b}[2J\\nforged\\u{202e}x"),
                "{error}"
            );
            assert!(!error.chars().any(display::needs_escape), "{error:?}");
            assert_eq!(error.chars().count(), display::MAX_ERROR_CHARS);
            assert!(error.ends_with(display::ELLIPSIS));
        }
        let delivered = RowUpdate::Delivered {
            consistency_token: Some("z".into()),
        };
        assert_eq!(one_line_errors(delivered.clone()), delivered);
    }
}
