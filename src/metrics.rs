//! Metric names (a public contract: dashboards and alerts in `deploy/` use
//! them) and the Prometheus recorder.
//!
//! Labels: `resource_type` on [`ROWS`] (with `state`), [`OLDEST_PENDING_AGE`],
//! [`DELIVERIES`] (with `operation`, `outcome`) and [`DEAD_ROWS`], so an
//! operator sees which type is backing up. Every labelled series a
//! dashboard or an alert reads is created at zero when the worker starts
//! ([`init_series`]), for every installed mapping type, operation and
//! outcome: a fresh deployment's panels show zero, not "no data", and an
//! `increase()` over a counter sees its first step.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const ROWS: &str = "authz_outbox_rows";
pub const OLDEST_PENDING_AGE: &str = "authz_outbox_oldest_pending_age_seconds";
pub const LEASED_ROWS: &str = "authz_outbox_leased_rows";
pub const DELIVERIES: &str = "authz_outbox_deliveries_total";
pub const DELIVERY_DURATION: &str = "authz_outbox_delivery_duration_seconds";
pub const COMMIT_TO_DELIVERED: &str = "authz_outbox_commit_to_delivered_seconds";
pub const ATTEMPTS: &str = "authz_outbox_attempts_total";
pub const DEAD_ROWS: &str = "authz_outbox_dead_rows_total";
pub const READY: &str = "authz_outbox_ready";
pub const CREDENTIAL_FAILURE: &str = "authz_outbox_credential_failure";
pub const CIRCUIT_OPEN: &str = "authz_outbox_circuit_open";
pub const RECONCILE_DRIFT: &str = "authz_outbox_reconcile_drift_resources";
pub const RECONCILE_LAST_RUN: &str = "authz_outbox_reconcile_last_run_timestamp_seconds";

/// Every series the worker serves, for docs and the test that keeps
/// `deploy/` honest.
pub const ALL: &[&str] = &[
    ROWS,
    OLDEST_PENDING_AGE,
    LEASED_ROWS,
    DELIVERIES,
    DELIVERY_DURATION,
    COMMIT_TO_DELIVERED,
    ATTEMPTS,
    DEAD_ROWS,
    READY,
    CREDENTIAL_FAILURE,
    CIRCUIT_OPEN,
    RECONCILE_DRIFT,
    RECONCILE_LAST_RUN,
];

/// The resource types a label can take (`unknown` for anything else, so a
/// bad row cannot mint series).
pub const RESOURCE_TYPES: &[&str] = &["agent", "api_key", "schedule", "task"];

/// Every `operation` label.
pub const OPERATIONS: &[&str] = &["register", "deregister"];

/// Every `outcome` label of [`DELIVERIES`].
pub const OUTCOMES: &[&str] = &["delivered", "retry", "released", "dead", "superseded"];

/// The `resource_type` label for a row's type: a known type, or `unknown`.
pub fn type_label(resource_type: &str) -> &'static str {
    RESOURCE_TYPES
        .iter()
        .find(|t| **t == resource_type)
        .copied()
        .unwrap_or("unknown")
}

/// Creates every labelled series at zero for `types` (the installed
/// mapping types): deliveries by operation and outcome, dead rows, rows by
/// state, the oldest pending age; attempts and latency by operation.
/// Idempotent: a counter only ever grows by zero here.
pub fn init_series<S: AsRef<str>>(types: &[S]) {
    for t in types {
        let t = type_label(t.as_ref());
        for op in OPERATIONS {
            for outcome in OUTCOMES {
                metrics::counter!(DELIVERIES, "operation" => *op, "outcome" => *outcome, "resource_type" => t)
                    .increment(0);
            }
        }
        metrics::counter!(DEAD_ROWS, "resource_type" => t).increment(0);
    }
    for op in OPERATIONS {
        metrics::counter!(ATTEMPTS, "operation" => *op).increment(0);
        // A registered histogram is served with empty buckets.
        let _ = metrics::histogram!(DELIVERY_DURATION, "operation" => *op);
    }
    let _ = metrics::histogram!(COMMIT_TO_DELIVERED);
}

/// Sets the outbox gauges from `stats`: rows by type and state (every
/// installed type, zero or not), the oldest pending age by type, leased
/// rows.
pub fn set_outbox_gauges(stats: &crate::outbox::stats::OutboxStats) {
    for (resource_type, t) in &stats.by_type {
        let label = type_label(resource_type);
        for (state, n) in &t.counts {
            metrics::gauge!(ROWS, "state" => state.clone(), "resource_type" => label)
                .set(*n as f64);
        }
        metrics::gauge!(OLDEST_PENDING_AGE, "resource_type" => label)
            .set(t.oldest_pending_age_seconds);
    }
    metrics::gauge!(LEASED_ROWS).set(stats.leased as f64);
}

/// Sets the reconcile gauges from the latest recorded run (zero when none).
pub fn set_reconcile_gauges(last: Option<&crate::outbox::stats::LastReconcile>) {
    let (drift, at) = last.map_or((0.0, 0.0), |r| {
        (r.drift as f64, r.finished_at.timestamp() as f64)
    });
    metrics::gauge!(RECONCILE_DRIFT).set(drift);
    metrics::gauge!(RECONCILE_LAST_RUN).set(at);
}

/// Makes every series a dashboard or alert reads present before the
/// endpoint serves its first scrape: counters and histograms at zero for
/// the installed mapping types, gauges from the database as it is now,
/// health gauges at "not ready yet". Housekeeping keeps them current.
pub async fn prime(pool: &sqlx::PgPool) -> Result<(), sqlx::Error> {
    metrics::gauge!(READY).set(0.0);
    metrics::gauge!(CREDENTIAL_FAILURE).set(0.0);
    metrics::gauge!(CIRCUIT_OPEN).set(0.0);
    let stats = crate::outbox::stats::collect(pool, crate::outbox::stats::Scope::All, 0).await?;
    let types: Vec<&String> = stats.by_type.keys().collect();
    init_series(&types);
    set_outbox_gauges(&stats);
    let last = crate::outbox::stats::last_reconcile(pool).await?;
    set_reconcile_gauges(last.as_ref());
    Ok(())
}

/// Latency buckets, 1 ms to 60 s: delivery is milliseconds when healthy and
/// minutes during an outage; both ends must be visible.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Installs the process-wide recorder once and returns its handle. Later
/// calls (several workers in one test process) share it.
pub fn install() -> Result<PrometheusHandle, String> {
    static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .map_err(|e| e.to_string())?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).map_err(|e| e.to_string())?;
            describe();
            Ok(handle)
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(ROWS, "Outbox rows by state and resource type.");
    describe_gauge!(
        OLDEST_PENDING_AGE,
        "Age of the oldest pending outbox row, by resource type."
    );
    describe_gauge!(LEASED_ROWS, "Pending rows currently leased by a worker.");
    describe_counter!(
        DELIVERIES,
        "Delivery outcomes by operation, outcome and resource type."
    );
    describe_histogram!(DELIVERY_DURATION, "Duration of agentex-auth requests.");
    describe_histogram!(COMMIT_TO_DELIVERED, "From capture to recorded delivery.");
    describe_counter!(ATTEMPTS, "Delivery attempts by operation.");
    describe_counter!(
        DEAD_ROWS,
        "Rows this worker moved to dead, by resource type."
    );
    describe_gauge!(READY, "1 when the worker is ready to deliver.");
    describe_gauge!(
        CREDENTIAL_FAILURE,
        "1 while agentex-auth rejects our credential."
    );
    describe_gauge!(
        CIRCUIT_OPEN,
        "1 while agentex-auth looks down and only probes go out."
    );
    describe_gauge!(
        RECONCILE_DRIFT,
        "Drifted resources found by the latest reconcile run."
    );
    describe_gauge!(
        RECONCILE_LAST_RUN,
        "When the latest reconcile run finished."
    );
}
