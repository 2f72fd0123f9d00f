//! Settle: the outcome of each row — decided from the target's answer
//! ([`decide`]), or without a request at all (bad data, a key created and
//! deleted before delivery, a register whose row is gone) — logged the same
//! way and handed to the recorder.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use chrono::Utc;
use sqlx::PgPool;

use super::backoff::retry_delay;
use super::outcome::Verdict;
use super::prepare::{self, Deliverable};
use super::state::Settled;
use super::state::Shared;
use crate::config::WorkerConfig;
use crate::display::{self, Escaped};
use crate::domain::{Operation, PrincipalPolicy, ResourceRef, names_a_creator};
use crate::metrics as m;
use crate::outbox::record::{Recorded, RowUpdate};
use crate::outbox::{ClaimedRow, claim};

/// Each mapped type's kept principal fields (the union over its mappings),
/// read once at start: a mapping change is applied by `migrate` and picked
/// up by restarting the workers, as the operations guide says. Unreadable
/// (no mappings installed yet): every type gets the default.
pub(super) async fn principal_policies(pool: &PgPool) -> HashMap<String, PrincipalPolicy> {
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
    pub(super) fn principal_policy(&self, resource: &ResourceRef) -> &PrincipalPolicy {
        self.principal_policies
            .get(resource.kind.as_str())
            .unwrap_or(&self.default_policy)
    }

    /// Every outcome passes here, so every one is logged the same way: row
    /// id, resource, attempt — never the principal or a credential — and
    /// every error is stored and logged as one escaped, bounded line
    /// ([`display::error_line`]): it may quote a server, or the row itself.
    pub(super) fn settle(&self, row: &ClaimedRow, operation: Operation, update: RowUpdate) {
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
                created_at: row.created_at,
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

/// Checks the claimed rows and settles those that need no request; `None`
/// when the database could not answer the checks (every row is then
/// released, and a `--once` run stops on an error retrying does not fix).
pub(super) async fn without_request_or_release(
    shared: &Arc<Shared>,
    claimed: Vec<ClaimedRow>,
    is_probe: bool,
    once: bool,
) -> Option<Vec<Deliverable>> {
    match without_request(shared, claimed).await {
        Ok(deliverables) => Some(deliverables),
        Err(e) => {
            tracing::warn!(error = %e, "checking claimed rows failed; they are released");
            if is_probe {
                shared.gate.probe_unused();
            }
            if once && !crate::db::is_transient(&e) {
                shared.progress.give_up("checking claimed rows", &e);
            }
            None
        }
    }
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
async fn without_request(
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
    let registers: Vec<&ClaimedRow> = checked
        .iter()
        .filter(|d| d.operation == Operation::Register)
        .map(|d| &d.row)
        .collect();
    let guarded: Vec<&ClaimedRow> = checked
        .iter()
        .filter(|d| d.operation == Operation::Deregister && d.row.guarded)
        .map(|d| &d.row)
        .collect();
    let to_check: Vec<&ClaimedRow> = registers.iter().chain(&guarded).copied().collect();
    let found = claim::supersede_and_check(&shared.pool, &fresh_registers, &to_check).await?;
    // These were written by the statement itself; count them here.
    // The statement returns both rows of each pair; ours are the registers.
    let pairs: Vec<i64> = found
        .superseded
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
    let registers: Vec<&ClaimedRow> = registers
        .into_iter()
        .filter(|r| !pairs.contains(&r.id))
        .collect();
    let live = &found.live;

    let mut stale = pairs;
    for row in registers {
        if !live.contains(&row.id) {
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
        if live.contains(&row.id) {
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use uuid::Uuid;

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
