//! The assertions after the storm: the outbox drained, nothing dead,
//! PostgreSQL holds exactly the keys the driver believes in, reconcile sees
//! no drift, and agentex-auth answers `check` as the rows say.

use std::collections::{BTreeMap, HashSet};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::PgPool;

use super::ChaosConfig;
use super::driver::{DeletedKey, Expectation, LiveKey};

/// Outbox totals by state, and attempts.
#[derive(Debug, Default, Clone, Serialize)]
pub struct OutboxTotals {
    pub rows: i64,
    pub delivered: i64,
    pub superseded: i64,
    pub dead: i64,
    pub pending: i64,
    /// Claims counted over every row (a claim cut off by a kill counts too).
    pub attempts: i64,
    /// Claims beyond each row's first.
    pub retries: i64,
}

pub async fn outbox_totals(pool: &PgPool) -> anyhow::Result<OutboxTotals> {
    let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "SELECT state, count(*), coalesce(sum(attempts), 0)::bigint,
                coalesce(sum(greatest(attempts - 1, 0)), 0)::bigint
         FROM authz_outbox GROUP BY state",
    )
    .fetch_all(pool)
    .await?;
    let mut t = OutboxTotals::default();
    for (state, n, attempts, retries) in rows {
        t.rows += n;
        t.attempts += attempts;
        t.retries += retries;
        match state.as_str() {
            "delivered" => t.delivered = n,
            "superseded" => t.superseded = n,
            "dead" => t.dead = n,
            "pending" => t.pending = n,
            _ => {}
        }
    }
    Ok(t)
}

/// Waits until no row is pending, up to `timeout`. Returns whether it did.
/// WAL capture: waits until the relay has read past everything written
/// so far and no gap awaits its reconcile.
pub async fn wait_for_relay(pool: &PgPool, timeout: Duration) -> anyhow::Result<()> {
    let target: String = sqlx::query_scalar("SELECT pg_current_wal_flush_lsn()::text")
        .fetch_one(pool)
        .await?;
    let started = std::time::Instant::now();
    loop {
        let done: Option<bool> = sqlx::query_scalar(
            "SELECT s.confirmed_flush_lsn >= $1::pg_lsn AND NOT r.reconcile_pending
             FROM authz_outbox_relay r JOIN pg_replication_slots s ON s.slot_name = r.slot_name",
        )
        .bind(&target)
        .fetch_optional(pool)
        .await?;
        if done == Some(true) {
            return Ok(());
        }
        if started.elapsed() > timeout {
            anyhow::bail!("the WAL relay did not catch up (or heal a gap) within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn wait_for_quiescence(pool: &PgPool, timeout: Duration) -> anyhow::Result<bool> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let pending: i64 =
            sqlx::query_scalar("SELECT count(*) FROM authz_outbox WHERE state = 'pending'")
                .fetch_one(pool)
                .await?;
        if pending == 0 {
            return Ok(true);
        }
        if tokio::time::Instant::now() > deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A row that did not finish cleanly (dead, or still pending).
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct UnfinishedRow {
    pub id: i64,
    pub state: String,
    pub operation: String,
    pub resource_id: String,
    pub parent_id: Option<String>,
    pub attempts: i32,
    pub last_status: Option<i32>,
    pub last_error: Option<String>,
    pub origin: String,
    pub locked_by: Option<String>,
}

pub async fn unfinished_rows(pool: &PgPool) -> anyhow::Result<Vec<UnfinishedRow>> {
    Ok(sqlx::query_as(
        "SELECT id, state, operation, resource_id, parent_id, attempts, last_status, last_error,
                origin, locked_by
         FROM authz_outbox WHERE state IN ('dead', 'pending') ORDER BY id LIMIT 200",
    )
    .fetch_all(pool)
    .await?)
}

/// Differences between the keys the driver tracked and the table.
pub async fn table_mismatches(pool: &PgPool, live: &[LiveKey]) -> anyhow::Result<Vec<String>> {
    let rows: Vec<(String, String)> = sqlx::query_as("SELECT id, agent_id FROM agent_api_keys")
        .fetch_all(pool)
        .await?;
    let table: HashSet<(String, String)> = rows.into_iter().collect();
    let tracked: HashSet<(String, String)> = live
        .iter()
        .map(|k| (k.id.clone(), k.agent_id.clone()))
        .collect();
    let mut out: Vec<String> = table
        .difference(&tracked)
        .map(|(id, a)| {
            format!("row api_key {id} under {a} exists but the driver deleted or moved it")
        })
        .chain(tracked.difference(&table).map(|(id, a)| {
            format!("driver expects api_key {id} under {a}; the table has no such row")
        }))
        .collect();
    out.sort();
    Ok(out)
}

/// `authz-outbox reconcile --grace 0s --format json`, the real CLI.
#[derive(Debug, Clone, Serialize)]
pub struct ReconcileResult {
    pub exit_code: Option<i32>,
    pub drift: Option<u64>,
    pub summary: Value,
    /// The first findings, if any.
    pub findings: Vec<Value>,
    pub stderr: String,
}

pub async fn reconcile(
    config: &ChaosConfig,
    grpc_endpoint: &str,
) -> anyhow::Result<ReconcileResult> {
    let bin = config.bin_dir.join("authz-outbox");
    let out = tokio::process::Command::new(&bin)
        // The fixture shares every agent with every user through
        // agentex-auth's /v1/authz/grant (owner edges the outbox never
        // sees): those are not drift here; a registered owner SpiceDB
        // lacks still is.
        .args([
            "reconcile",
            "--grace",
            "0s",
            "--format",
            "json",
            "--ignore-extra-owners",
        ])
        // Judged by the relationships the run's target wrote.
        .env(
            "AUTHZ_OUTBOX_TARGET",
            match config.target {
                super::Target::AgentexAuth => "agentex-auth",
                super::Target::SpiceDb => "spicedb",
            },
        )
        .env("DATABASE_URL", &config.database_url)
        .env("SPICEDB_ENDPOINT", grpc_endpoint)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {} reconcile", bin.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    let findings = report["findings"]
        .as_array()
        .map(|f| f.iter().take(20).cloned().collect())
        .unwrap_or_default();
    Ok(ReconcileResult {
        exit_code: out.status.code(),
        drift: report["summary"]["drift"].as_u64(),
        summary: report["summary"].clone(),
        findings,
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

/// The results of the `/v1/authz/check` calls.
#[derive(Debug, Default, Clone, Serialize)]
pub struct CheckResults {
    pub passed: u64,
    pub failed: u64,
    /// The first failures: what was asked, what was expected, what came back.
    pub failures: Vec<String>,
}

/// For every live key: its creator may read it and another user may not.
/// For every deleted key: its creator may not read it.
/// And every task, schedule and agent as the driver's expectations say.
pub async fn check_access(
    base_url: &str,
    live: &[LiveKey],
    deleted: &[DeletedKey],
    others: &[Expectation],
    users: usize,
) -> anyhow::Result<CheckResults> {
    let mut cases: Vec<(String, &'static str, String, bool)> = others
        .iter()
        .map(|e| {
            (
                e.user.clone(),
                e.resource_type,
                e.selector.clone(),
                e.allowed,
            )
        })
        .collect();
    for k in live {
        cases.push((k.creator.clone(), "api_key", k.id.clone(), true));
        if users > 1 {
            let other = (k
                .creator
                .trim_start_matches('u')
                .parse::<usize>()
                .unwrap_or(0)
                + 1)
                % users;
            cases.push((super::driver::user(other), "api_key", k.id.clone(), false));
        }
    }
    for k in deleted {
        cases.push((k.creator.clone(), "api_key", k.id.clone(), false));
    }
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let url = format!("{base_url}/v1/authz/check");
    let cases = Arc::new(cases);
    let parallel = 16;
    let mut set = tokio::task::JoinSet::new();
    for shard in 0..parallel {
        let (client, url, cases) = (client.clone(), url.clone(), cases.clone());
        set.spawn(async move {
            let mut r = CheckResults::default();
            for (user, kind, key, allowed) in cases.iter().skip(shard).step_by(parallel) {
                let body = json!({
                    "principal": {"user_id": user},
                    "resource": {"type": kind, "selector": key},
                    "operation": "read",
                });
                let got = match client.post(&url).json(&body).send().await {
                    Ok(resp) => resp.status().as_u16(),
                    Err(e) => {
                        r.failed += 1;
                        r.failures
                            .push(format!("check {user} read {kind}:{key}: {e}"));
                        continue;
                    }
                };
                let want = if *allowed { 200 } else { 403 };
                if got == want {
                    r.passed += 1;
                } else {
                    r.failed += 1;
                    if r.failures.len() < 10 {
                        r.failures.push(format!(
                            "check {user} read {kind}:{key}: expected {want}, got {got}"
                        ));
                    }
                }
            }
            r
        });
    }
    let mut total = CheckResults::default();
    while let Some(r) = set.join_next().await {
        let r = r?;
        total.passed += r.passed;
        total.failed += r.failed;
        total.failures.extend(r.failures);
    }
    total.failures.truncate(30);
    Ok(total)
}

/// Faults the dev server injected, by kind, from `GET /_dev/stats`.
pub fn faults_injected(stats: &Value) -> (u64, BTreeMap<String, u64>) {
    let mut by_kind: BTreeMap<String, u64> = BTreeMap::new();
    if let Some(endpoints) = stats["endpoints"].as_object() {
        for outcomes in endpoints.values() {
            if let Some(outcomes) = outcomes.as_object() {
                for (kind, n) in outcomes {
                    // HTTP statuses, and the gRPC writes' injected codes
                    // (`run --target spicedb`); hangs and applied-then-fail
                    // by kind on both.
                    if [
                        "500",
                        "502",
                        "503",
                        "429",
                        "INTERNAL",
                        "UNAVAILABLE",
                        "RESOURCE_EXHAUSTED",
                        "hang",
                        "applied_then_503",
                    ]
                    .contains(&kind.as_str())
                    {
                        *by_kind.entry(kind.clone()).or_default() += n.as_u64().unwrap_or(0);
                    }
                }
            }
        }
    }
    (by_kind.values().sum(), by_kind)
}
