//! What the worker's steps share: the run's state ([`Shared`]), the
//! progress the claimer and the recorder both track ([`Progress`]), the
//! outcome message between them ([`Settled`]), and what a run reports
//! ([`RunReport`], [`Health`]). Every step (claim, settle, send, record)
//! depends on this module and on no other step's state, so the steps read
//! top to bottom and none reaches back into the loop.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use chrono::Utc;
use serde::Serialize;
use sqlx::PgPool;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use uuid::Uuid;

use super::gate::{Gate, OpenReason};
use super::listener;
use super::target::Target;
use crate::config::WorkerConfig;
use crate::domain::{Operation, PrincipalPolicy};
use crate::outbox::record::Recorded;

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
    /// Deliveries per minute not yet added to the database.
    pub(super) tally: super::tally::Tally,
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
    pub(super) in_flight: Mutex<HashMap<i64, InFlight>>,
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

/// What releasing an in-flight row at shutdown needs of it.
#[derive(Debug, Clone, Copy)]
pub(super) struct InFlight {
    pub(super) created_at: chrono::DateTime<Utc>,
    pub(super) lease_token: Uuid,
    pub(super) operation: Operation,
    pub(super) resource_type: &'static str,
}

/// A row settled by a delivery task (or without one), waiting to be written.
pub(super) struct Settled {
    pub(super) recorded: Recorded,
    pub(super) operation: Operation,
    /// The row's resource type, as the metrics label it.
    pub(super) resource_type: &'static str,
}
