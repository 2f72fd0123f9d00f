//! Send: hands each request's rows to a delivery task under a concurrency
//! permit, tells the gate what the target answered, and at shutdown releases
//! whatever is still in flight.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::gate::{OpenReason, Signal};
use super::outcome::Verdict;
use super::prepare::Deliverable;
use super::settle::decide;
use super::state::{InFlight, Settled, Shared};
use crate::metrics as m;
use crate::outbox::record::{Recorded, RowUpdate};

/// Sends the checked rows of one claim, one request per group (a row alone
/// for agentex-auth, registers of several resources together for SpiceDB),
/// each in its own task once a permit frees up. A group that can no longer
/// go out (the gate opened, its lease is too close, shutdown) is released
/// unsent, with the rest of the claim.
pub(super) async fn dispatch(
    shared: &Arc<Shared>,
    permits: &Arc<Semaphore>,
    tasks: &mut JoinSet<()>,
    deliverables: Vec<Deliverable>,
    is_probe: bool,
    claimed_at: Instant,
    shutdown: &CancellationToken,
) {
    // A row claimed ahead is sent only while its request still ends
    // well inside the lease; otherwise another worker could claim it
    // again while our request is in flight, and order per resource
    // would rest on timing.
    let margin = shared
        .config
        .lease
        .saturating_sub(shared.config.request_timeout.saturating_mul(2));
    let send_by = claimed_at.checked_add(margin).unwrap_or(claimed_at);
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
                        InFlight {
                            created_at: d.row.created_at,
                            lease_token: d.row.lease_token,
                            operation: d.operation,
                            resource_type: m::type_label(&d.row.resource_type),
                        },
                    );
                }
                drop(in_flight);
                tasks.spawn(deliver(shared.clone(), group, is_probe, permit));
                reap(tasks);
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

/// Frees the tasks that have finished. A finished task keeps its memory
/// (sized for the whole request future, a few KiB) until it is joined, so
/// reaping only between claims let a 1,000-row claim hold up to 1,000 of
/// them at once: the worker's peak memory grew with the batch size
/// (BENCHMARKS.md, issue 25). Reaped after every spawn, the set holds
/// about as many tasks as there are requests in flight.
pub(super) fn reap(tasks: &mut JoinSet<()>) {
    while let Some(done) = tasks.try_join_next() {
        if let Err(e) = done {
            tracing::error!(error = %e, "delivery task failed");
        }
    }
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

/// Lets in-flight deliveries finish within the shutdown deadline, then
/// releases whatever is still in flight so another worker can take it at once.
pub(super) async fn finish_in_flight(shared: &Arc<Shared>, tasks: &mut JoinSet<()>) {
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
    let cut_off: Vec<(i64, InFlight)> = shared
        .in_flight
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(id, row)| (*id, *row))
        .collect();
    tracing::info!(
        rows = cut_off.len(),
        "shutdown deadline reached; releasing in-flight rows"
    );
    for (id, row) in cut_off {
        shared
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        let _ = shared.settled.send(Settled {
            recorded: Recorded {
                id,
                created_at: row.created_at,
                lease_token: row.lease_token,
                update: RowUpdate::Release {
                    at: Utc::now(),
                    status: None,
                    error: Some("released at shutdown".into()),
                },
            },
            operation: row.operation,
            resource_type: row.resource_type,
        });
    }
}
