//! Metric names (a public contract: dashboards and alerts in `deploy/` use
//! them) and the Prometheus recorder.
//!
//! Labels: `resource_type` on [`ROWS`] (with `state`), [`OLDEST_PENDING_AGE`],
//! [`DELIVERIES`] (with `operation`, `outcome`) and [`DEAD_ROWS`], so an
//! operator sees which type is backing up: the built-in types and each
//! installed mapping's type (up to [`MAX_CUSTOM_TYPES`]); rows of any other
//! type share `unknown`. Every labelled series a
//! dashboard or an alert reads is created at zero when the worker starts
//! ([`init_series`]), for every installed mapping type, operation and
//! outcome: a fresh deployment's panels show zero, not "no data", and an
//! `increase()` over a counter sees its first step.

use std::collections::BTreeMap;
use std::sync::{OnceLock, RwLock};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const ROWS: &str = "authz_outbox_rows";
/// Retained rows by type and where their principal came from (`setting`,
/// `role_default`, `column:<name>`, `reconcile`, `replay`, `none`): a host
/// whose writes all carry `role_default` is not passing its users through.
pub const ROWS_BY_PRINCIPAL_SOURCE: &str = "authz_outbox_rows_by_principal_source";
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
pub const PARTITIONS: &str = "authz_outbox_partitions";
pub const PARTITION_BYTES: &str = "authz_outbox_partition_bytes";
pub const OLDEST_PARTITION_AGE: &str = "authz_outbox_oldest_partition_age_seconds";
pub const PARTITIONS_AHEAD: &str = "authz_outbox_partitions_ahead_seconds";
pub const DEFAULT_PARTITION_ROWS: &str = "authz_outbox_default_partition_rows";
pub const PARTITION_CREATE_FAILURES: &str = "authz_outbox_partition_create_failures_total";
/// WAL capture: rows the relay moved from the slot into the outbox.
pub const RELAYED: &str = "authz_outbox_relay_rows_total";
/// WAL capture: WAL between the slot's confirmed position and the end.
pub const RELAY_LAG_BYTES: &str = "authz_outbox_relay_lag_bytes";
/// WAL capture: how long since the relay last read to the WAL's end.
pub const RELAY_LAG_SECONDS: &str = "authz_outbox_relay_lag_seconds";
/// WAL capture: 1 on the replica whose relay reads the slot.
pub const RELAY_LEADER: &str = "authz_outbox_relay_leader";
/// WAL capture: slots found dropped or invalidated and recreated.
pub const RELAY_GAPS: &str = "authz_outbox_relay_gaps_total";

/// Every series the worker serves, for docs and the test that keeps
/// `deploy/` honest.
pub const ALL: &[&str] = &[
    ROWS,
    ROWS_BY_PRINCIPAL_SOURCE,
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
    PARTITIONS,
    PARTITION_BYTES,
    OLDEST_PARTITION_AGE,
    PARTITIONS_AHEAD,
    DEFAULT_PARTITION_ROWS,
    PARTITION_CREATE_FAILURES,
    RELAYED,
    RELAY_LAG_BYTES,
    RELAY_LAG_SECONDS,
    RELAY_LEADER,
    RELAY_GAPS,
];

/// The built-in resource types, always a label of their own.
pub const RESOURCE_TYPES: &[&str] = &["agent", "api_key", "schedule", "task"];

/// The most other types (custom SpiceDB definitions with an installed
/// mapping) that get a label of their own. Types come from installed
/// mappings, a set an operator writes by hand; the cap only matters if
/// something installs mappings by the thousand, and then keeps the series
/// count (and the memory each label holds) bounded.
pub const MAX_CUSTOM_TYPES: usize = 64;

/// The label of every type not registered: rows of a type no mapping
/// names (a hand-written INSERT), and types past [`MAX_CUSTOM_TYPES`].
pub const UNKNOWN_TYPE: &str = "unknown";

/// Every `operation` label.
pub const OPERATIONS: &[&str] = &["register", "deregister"];

/// Every `outcome` label of [`DELIVERIES`].
pub const OUTCOMES: &[&str] = &["delivered", "retry", "released", "dead", "superseded"];

/// The custom types with a label of their own, registered from the
/// installed mappings. Each name is leaked once, so a label is a
/// `&'static str` like the built-ins; the set only grows, never past `max`.
struct TypeLabels {
    custom: RwLock<Vec<&'static str>>,
    max: usize,
}

impl TypeLabels {
    const fn new(max: usize) -> Self {
        TypeLabels {
            custom: RwLock::new(Vec::new()),
            max,
        }
    }

    fn register<S: AsRef<str>>(&self, types: &[S]) -> Vec<String> {
        let mut refused = Vec::new();
        let mut custom = self.custom.write().unwrap_or_else(|p| p.into_inner());
        for t in types {
            let t = t.as_ref();
            if RESOURCE_TYPES.contains(&t) || custom.contains(&t) {
                continue;
            }
            if t.parse::<crate::domain::ResourceType>().is_err() || custom.len() >= self.max {
                refused.push(t.to_string());
                continue;
            }
            custom.push(Box::leak(t.to_string().into_boxed_str()));
        }
        refused
    }

    fn label(&self, resource_type: &str) -> &'static str {
        if let Some(t) = RESOURCE_TYPES.iter().find(|t| **t == resource_type) {
            return t;
        }
        self.custom
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|t| **t == resource_type)
            .copied()
            .unwrap_or(UNKNOWN_TYPE)
    }
}

static TYPE_LABELS: TypeLabels = TypeLabels::new(MAX_CUSTOM_TYPES);

/// Gives each of `types` (the installed mappings' types) a label of its
/// own: a valid SpiceDB definition name, up to [`MAX_CUSTOM_TYPES`] besides
/// the built-ins. Idempotent; returns the types left at `unknown`.
pub fn register_types<S: AsRef<str>>(types: &[S]) -> Vec<String> {
    TYPE_LABELS.register(types)
}

/// The `resource_type` label for a row's type: a built-in or registered
/// type, or [`UNKNOWN_TYPE`] (so a bad row cannot mint series).
pub fn type_label(resource_type: &str) -> &'static str {
    TYPE_LABELS.label(resource_type)
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
///
/// Types that share a label (every type at `unknown`) are added up, their
/// ages the oldest of them: set one after the other, the last would
/// overwrite the others' counts.
pub fn set_outbox_gauges(stats: &crate::outbox::stats::OutboxStats) {
    let mut by_label: BTreeMap<&'static str, (BTreeMap<&str, i64>, f64)> = BTreeMap::new();
    for (resource_type, t) in &stats.by_type {
        let (counts, age) = by_label.entry(type_label(resource_type)).or_default();
        for (state, n) in &t.counts {
            *counts.entry(state.as_str()).or_default() += n;
        }
        *age = age.max(t.oldest_pending_age_seconds);
    }
    for (label, (counts, age)) in by_label {
        for (state, n) in counts {
            metrics::gauge!(ROWS, "state" => state.to_string(), "resource_type" => label)
                .set(n as f64);
        }
        metrics::gauge!(OLDEST_PENDING_AGE, "resource_type" => label).set(age);
    }
    metrics::gauge!(LEASED_ROWS).set(stats.leased as f64);
}

/// The `principal_source` label of a recorded source: the known ones and a
/// mapping's `column:<name>` (names are plain identifiers from installed
/// mappings, a bounded set) as they are; anything else a hand-written row
/// may hold shares `other`, so the series stay few and well-formed.
fn source_label(source: &str) -> String {
    const KNOWN: &[&str] = &["setting", "role_default", "reconcile", "replay", "none"];
    let column = source.strip_prefix("column:").is_some_and(|c| {
        !c.is_empty()
            && c.len() <= 63
            && c.chars()
                .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_')
    });
    if KNOWN.contains(&source) || column {
        source.to_string()
    } else {
        "other".to_string()
    }
}

/// Sets [`ROWS_BY_PRINCIPAL_SOURCE`] from a collection over every state
/// (the once-a-minute refresh: the frequent one counts pending and dead
/// rows only). Every type has `setting` and `role_default` series, zero or
/// not, so a ratio of the two always has both sides.
pub fn set_principal_source_gauges(stats: &crate::outbox::stats::OutboxStats) {
    let mut by_label: BTreeMap<(&'static str, String), i64> = BTreeMap::new();
    for (resource_type, t) in &stats.by_type {
        let label = type_label(resource_type);
        for source in ["setting", "role_default"] {
            by_label.entry((label, source.to_string())).or_default();
        }
        for (source, n) in &t.by_principal_source {
            *by_label.entry((label, source_label(source))).or_default() += n;
        }
    }
    for ((label, source), n) in by_label {
        metrics::gauge!(ROWS_BY_PRINCIPAL_SOURCE, "resource_type" => label, "principal_source" => source)
            .set(n as f64);
    }
}

/// Registers the installed mappings' types ([`register_types`]), warning
/// once per type that must share `unknown`.
pub async fn register_installed_types(pool: &sqlx::PgPool) -> Result<(), sqlx::Error> {
    let installed = crate::outbox::stats::installed_types(pool).await?;
    let refused = register_types(&installed);
    if !refused.is_empty() {
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| {
            tracing::warn!(
                types = %crate::display::Escaped(&refused.join(",")),
                max = MAX_CUSTOM_TYPES,
                "more installed resource types than metric labels; these share resource_type=\"unknown\""
            )
        });
    }
    Ok(())
}

/// Sets the reconcile gauges from the latest recorded run (zero when none).
pub fn set_reconcile_gauges(last: Option<&crate::outbox::stats::LastReconcile>) {
    let (drift, at) = last.map_or((0.0, 0.0), |r| {
        (r.drift as f64, r.finished_at.timestamp() as f64)
    });
    metrics::gauge!(RECONCILE_DRIFT).set(drift);
    metrics::gauge!(RECONCILE_LAST_RUN).set(at);
}

/// Sets the partition gauges from [`crate::outbox::partitions::list`].
/// Sizes are summed, not labelled by partition: a series per day would
/// outlive its dropped partition in the exporter, one more every day the
/// worker runs (`status` lists each partition).
pub fn set_partition_gauges(parts: &[crate::outbox::partitions::Partition]) {
    use crate::outbox::partitions::{ahead, oldest};
    let now = chrono::Utc::now();
    metrics::gauge!(PARTITIONS).set(parts.len() as f64);
    metrics::gauge!(PARTITION_BYTES).set(parts.iter().map(|p| p.bytes as f64).sum::<f64>());
    for p in parts.iter().filter(|p| p.is_default) {
        metrics::gauge!(DEFAULT_PARTITION_ROWS).set(p.rows_estimate.max(0) as f64);
    }
    let age = oldest(parts)
        .and_then(|p| p.lower_bound)
        .map_or(0.0, |lower| (now - lower).num_seconds().max(0) as f64);
    metrics::gauge!(OLDEST_PARTITION_AGE).set(age);
    let ahead = ahead(parts, now).map_or(0.0, |d| d.num_seconds() as f64);
    metrics::gauge!(PARTITIONS_AHEAD).set(ahead);
}

/// Makes every series a dashboard or alert reads present before the
/// endpoint serves its first scrape: counters and histograms at zero for
/// the installed mapping types, gauges from the database as it is now,
/// health gauges at "not ready yet". Housekeeping keeps them current.
pub async fn prime(pool: &sqlx::PgPool) -> Result<(), sqlx::Error> {
    metrics::gauge!(READY).set(0.0);
    metrics::gauge!(CREDENTIAL_FAILURE).set(0.0);
    metrics::gauge!(CIRCUIT_OPEN).set(0.0);
    metrics::counter!(RELAYED).increment(0);
    metrics::counter!(RELAY_GAPS).increment(0);
    metrics::gauge!(RELAY_LAG_BYTES).set(0.0);
    metrics::gauge!(RELAY_LAG_SECONDS).set(0.0);
    metrics::gauge!(RELAY_LEADER).set(0.0);
    register_installed_types(pool).await?;
    let stats = crate::outbox::stats::collect(pool, crate::outbox::stats::Scope::All, 0).await?;
    let types: Vec<&String> = stats.by_type.keys().collect();
    init_series(&types);
    set_outbox_gauges(&stats);
    set_principal_source_gauges(&stats);
    let last = crate::outbox::stats::last_reconcile(pool).await?;
    set_reconcile_gauges(last.as_ref());
    metrics::gauge!(DEFAULT_PARTITION_ROWS).set(0.0);
    metrics::counter!(PARTITION_CREATE_FAILURES).increment(0);
    set_partition_gauges(&crate::outbox::partitions::list(pool).await?);
    Ok(())
}

/// Latency buckets, 1 ms to 60 s: delivery is milliseconds when healthy and
/// minutes during an outage; both ends must be visible.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();

/// Folds the histogram samples recorded since the last call into their
/// buckets. The exporter keeps every raw sample (value and instant) until
/// upkeep or a scrape drains it, so without this a worker's memory grew with
/// every row it delivered between scrapes — a 50,000-row drain adds two
/// samples per row — and without bound when nothing scrapes. The
/// housekeeping calls it every second; a no-op when no recorder is installed.
pub fn upkeep() {
    if let Some(Ok(handle)) = HANDLE.get() {
        handle.run_upkeep();
    }
}

/// Installs the process-wide recorder once and returns its handle. Later
/// calls (several workers in one test process) share it.
pub fn install() -> Result<PrometheusHandle, String> {
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
    describe_counter!(
        RELAYED,
        "WAL capture: rows moved from the slot into the outbox."
    );
    describe_gauge!(
        RELAY_LAG_BYTES,
        "WAL capture: bytes of WAL the relay's slot has not confirmed."
    );
    describe_gauge!(
        RELAY_LAG_SECONDS,
        "WAL capture: seconds since the relay last read to the WAL's end."
    );
    describe_gauge!(
        RELAY_LEADER,
        "WAL capture: 1 where the relay reads the slot."
    );
    describe_counter!(
        RELAY_GAPS,
        "WAL capture: relay slots found dropped or invalidated and recreated."
    );
    describe_gauge!(ROWS, "Outbox rows by state and resource type.");
    describe_gauge!(
        PARTITIONS,
        "Partitions of authz_outbox, the default one included."
    );
    describe_gauge!(
        PARTITION_BYTES,
        "Size of each outbox partition with its indexes."
    );
    describe_gauge!(
        OLDEST_PARTITION_AGE,
        "Age of the oldest dated partition's lower bound (0 for the pre-upgrade table)."
    );
    describe_gauge!(
        PARTITIONS_AHEAD,
        "How far beyond now partitions exist; below a day, creating ahead is falling behind."
    );
    describe_gauge!(
        DEFAULT_PARTITION_ROWS,
        "Rows (estimated) that landed in the default partition because their day had none."
    );
    describe_counter!(
        PARTITION_CREATE_FAILURES,
        "Failed attempts to create the outbox partitions ahead."
    );
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

/// Counts a relay slot found lost and recreated.
pub fn relay_gap() {
    metrics::counter!(RELAY_GAPS).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::stats::{OutboxStats, TypeStats};

    fn type_stats(pending: i64, age: f64) -> TypeStats {
        TypeStats {
            counts: [("pending".to_string(), pending), ("dead".to_string(), 0)]
                .into_iter()
                .collect(),
            oldest_pending_age_seconds: age,
            ..Default::default()
        }
    }

    /// The gauges as one recorder of the test's own sees them.
    fn rendered(stats: &OutboxStats) -> String {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || set_outbox_gauges(stats));
        handle.render()
    }

    #[test]
    fn each_installed_custom_type_keeps_its_own_label() {
        assert!(register_types(&["document", "folder"]).is_empty());
        assert_eq!(type_label("document"), "document");
        assert_eq!(type_label("folder"), "folder");
        assert_eq!(type_label("api_key"), "api_key");
        assert_eq!(type_label("never_installed"), UNKNOWN_TYPE);
        let mut stats = OutboxStats::default();
        stats.by_type.insert("document".into(), type_stats(2, 5.0));
        stats.by_type.insert("folder".into(), type_stats(7, 9.0));
        stats.by_type.insert("stray_one".into(), type_stats(3, 1.0));
        stats.by_type.insert("stray_two".into(), type_stats(4, 8.0));
        let body = rendered(&stats);
        for series in [
            r#"authz_outbox_rows{state="pending",resource_type="document"} 2"#,
            r#"authz_outbox_rows{state="pending",resource_type="folder"} 7"#,
            r#"authz_outbox_oldest_pending_age_seconds{resource_type="document"} 5"#,
            r#"authz_outbox_oldest_pending_age_seconds{resource_type="folder"} 9"#,
            // Types without a label of their own add up, not overwrite.
            r#"authz_outbox_rows{state="pending",resource_type="unknown"} 7"#,
            r#"authz_outbox_oldest_pending_age_seconds{resource_type="unknown"} 8"#,
        ] {
            assert!(body.contains(series), "{series} missing:\n{body}");
        }
    }

    #[test]
    fn labels_stay_few_and_well_formed() {
        let labels = TypeLabels::new(4);
        let refused = labels.register(&["Bad Type", "x\u{1b}[2J", "ok_type/nested_type", "agent"]);
        assert_eq!(
            refused,
            vec!["Bad Type".to_string(), "x\u{1b}[2J".to_string()]
        );
        assert_eq!(labels.label("Bad Type"), UNKNOWN_TYPE);
        assert_eq!(labels.label("ok_type/nested_type"), "ok_type/nested_type");
        assert_eq!(labels.label("agent"), "agent");
        let many: Vec<String> = (0..10).map(|i| format!("bulk_{i:03}")).collect();
        assert_eq!(
            labels.register(&many).len(),
            7,
            "past the cap, types share unknown"
        );
        let labelled = |l: &TypeLabels| many.iter().filter(|t| l.label(t) != UNKNOWN_TYPE).count();
        assert_eq!(labelled(&labels), 3);
        // Registering again changes nothing.
        labels.register(&many);
        assert_eq!(labelled(&labels), 3);
        assert_eq!(labels.custom.read().map(|c| c.len()).unwrap_or(0), 4);
    }

    #[test]
    fn rows_carry_where_their_principal_came_from() {
        let mut stats = OutboxStats::default();
        let mut agent = type_stats(0, 0.0);
        agent.by_principal_source = [
            ("role_default".to_string(), 5),
            ("column:creator_principal".to_string(), 2),
            ("x\u{1b}[2J".to_string(), 1),
            ("hand written".to_string(), 1),
        ]
        .into_iter()
        .collect();
        stats.by_type.insert("agent".into(), agent);
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || set_principal_source_gauges(&stats));
        let body = handle.render();
        for series in [
            r#"authz_outbox_rows_by_principal_source{resource_type="agent",principal_source="role_default"} 5"#,
            // Present at zero, so a ratio of the two always has both sides.
            r#"authz_outbox_rows_by_principal_source{resource_type="agent",principal_source="setting"} 0"#,
            r#"authz_outbox_rows_by_principal_source{resource_type="agent",principal_source="column:creator_principal"} 2"#,
            // Anything else shares one label.
            r#"authz_outbox_rows_by_principal_source{resource_type="agent",principal_source="other"} 2"#,
        ] {
            assert!(body.contains(series), "{series} missing:\n{body}");
        }
    }
}
