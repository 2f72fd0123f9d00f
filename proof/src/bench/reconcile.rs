//! Reconcile at scale: `keys` api keys (spread over `agents` agents) in
//! PostgreSQL and their relationships in SpiceDB, then one dry run of the
//! real `authz-outbox reconcile` binary under `/usr/bin/time -v` for its wall
//! time and peak resident memory.
//!
//! Loading is not measured: keys are generated with `generate_series` with
//! triggers off (`session_replication_role = replica`), and relationships go
//! into an agentex-auth-dev engine started in this process with
//! `DevServer::bulk_touch` (1,000 per WriteRelationships). Each consistent
//! key needs two relationships (owner and parent_agent), so `keys` keys are
//! `2 × keys` relationships. A little drift is planted (`drift` keys with no
//! relationships, `drift` orphans with no row) so the run has findings to
//! classify and print.

use std::process::Stdio;
use std::time::Instant;

use agentex_auth_dev::{DevServer, DevServerConfig};
use anyhow::{Context, bail};
use serde::Serialize;
use tokio::process::Command;

use super::env::Env;

#[derive(Debug, Clone)]
pub struct Config {
    pub keys: i64,
    pub agents: i64,
    pub drift: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReconcileResult {
    pub keys: i64,
    pub agents: i64,
    pub relationships: i64,
    pub drift_planted: i64,
    pub load_seconds: f64,
    pub seconds: f64,
    pub max_rss_mib: f64,
    pub exit_code: Option<i32>,
    /// The last line of the JSON report (the summary).
    pub summary: serde_json::Value,
}

type Rel = (String, String, String, String, String);

fn rel(rt: &str, rid: String, relation: &str, st: &str, sid: String) -> Rel {
    (rt.into(), rid, relation.into(), st.into(), sid)
}

pub async fn run(env: &Env, config: &Config) -> anyhow::Result<ReconcileResult> {
    let pool = env.pool(2).await?;
    env.reset(&pool).await?;
    let load_started = Instant::now();
    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL session_replication_role = replica")
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO agents (id, name, created_at)
         SELECT 'ra-' || g, 'ra-' || g, now() - interval '1 hour'
         FROM generate_series(1, $1::bigint) g",
    )
    .bind(config.agents)
    .execute(&mut *tx)
    .await
    .context("generating agents")?;
    sqlx::query(
        "INSERT INTO agent_api_keys (id, agent_id, created_at, name, api_key_type, api_key)
         SELECT 'rk-' || g, 'ra-' || (g % $2::bigint + 1), now() - interval '1 hour',
                'key-' || g, 'EXTERNAL', md5(g::text)
         FROM generate_series(1, $1::bigint) g",
    )
    .bind(config.keys)
    .bind(config.agents)
    .execute(&mut *tx)
    .await
    .context("generating keys")?;
    tx.commit().await?;
    sqlx::raw_sql("VACUUM ANALYZE agents, agent_api_keys")
        .execute(&pool)
        .await?;

    let server = DevServer::start(DevServerConfig::ephemeral())
        .await
        .context("starting agentex-auth-dev in the bench process")?;
    let agents: Vec<Rel> = (1..=config.agents)
        .map(|a| {
            rel(
                "agent",
                format!("ra-{a}"),
                "owner",
                "user",
                "bench-user".into(),
            )
        })
        .collect();
    server.bulk_touch(agents).await?;
    let mut relationships = config.agents;
    // Keys 1..=keys-drift are consistent; the last `drift` keys have no
    // relationships (missing); keys past `keys` have no row (orphans).
    const CHUNK: i64 = 100_000;
    let last_key = config.keys + config.drift;
    let mut start = 1;
    while start <= last_key {
        let end = (start + CHUNK - 1).min(last_key);
        let mut batch = Vec::with_capacity(2 * (end - start + 1) as usize);
        for k in start..=end {
            if k > config.keys - config.drift && k <= config.keys {
                continue;
            }
            let agent = format!("ra-{}", k % config.agents + 1);
            batch.push(rel(
                "api_key",
                format!("rk-{k}"),
                "owner",
                "user",
                "bench-user".into(),
            ));
            batch.push(rel(
                "api_key",
                format!("rk-{k}"),
                "parent_agent",
                "agent",
                agent,
            ));
        }
        relationships += batch.len() as i64;
        server.bulk_touch(batch).await?;
        start = end + 1;
    }
    let load_seconds = load_started.elapsed().as_secs_f64();
    eprintln!(
        "  reconcile: loaded {} keys and {relationships} relationships in {load_seconds:.1} s",
        config.keys
    );

    let started = Instant::now();
    let output = Command::new("/usr/bin/time")
        .arg("-v")
        .arg(env.authz_outbox())
        .args([
            "reconcile",
            "--format",
            "json",
            "--spicedb-endpoint",
            &server.grpc_endpoint(),
        ])
        .env("DATABASE_URL", &env.database_url)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .await
        .context("running /usr/bin/time -v authz-outbox reconcile")?;
    let seconds = started.elapsed().as_secs_f64();
    server.shutdown().await;

    let stderr = String::from_utf8_lossy(&output.stderr);
    let max_rss_kib: u64 = stderr
        .lines()
        .find_map(|l| l.trim().strip_prefix("Maximum resident set size (kbytes):"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no peak memory in /usr/bin/time output:\n{stderr}"))?;
    let code = output.status.code();
    // 0 consistent, 1 drift found; anything else is a failure.
    if !matches!(code, Some(0) | Some(1)) {
        bail!(
            "authz-outbox reconcile failed ({:?}):\n{stderr}",
            output.status
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let summary = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .unwrap_or(serde_json::Value::Null);
    Ok(ReconcileResult {
        keys: config.keys,
        agents: config.agents,
        relationships,
        drift_planted: 2 * config.drift,
        load_seconds,
        seconds,
        max_rss_mib: max_rss_kib as f64 / 1024.0,
        exit_code: code,
        summary,
    })
}
