//! Reconcile at scale: `keys` api keys and `tasks` tasks (spread over
//! `agents` agents; a task's agent through the host's `task_agents` join
//! table) in PostgreSQL and their relationships on the SpiceDB side, then one dry run
//! of the real `authz-outbox reconcile` binary under `/usr/bin/time -v` for
//! its wall time and peak resident memory.
//!
//! Two sources for the SpiceDB side ([`Source`]): the real engine
//! (relationships loaded into an agentex-auth-dev engine started in this
//! process with `DevServer::bulk_touch`, 1,000 per WriteRelationships), and
//! the instant `authz_outbox_proof::export_source`, which serves the same
//! relationships computed on the fly so the figure is reconcile's own cost at
//! sizes the in-memory engine cannot serve.
//!
//! Loading is not measured: keys are generated with `generate_series` with
//! triggers off (`session_replication_role = replica`). Each consistent key
//! or task has two relationships (owner and parent_agent), so `keys` keys
//! and `tasks` tasks are `2 × (keys + tasks)` relationships. Reconcile reads
//! and classifies every type with an installed mapping, as in production. A little drift is planted (`drift` keys with no
//! relationships, `drift` orphans with no row) so the run has findings to
//! classify and print.

use std::process::Stdio;
use std::time::Instant;

use agentex_auth_dev::{DevServer, DevServerConfig};
use anyhow::{Context, bail};
use serde::Serialize;
use tokio::process::Command;

use super::env::Env;
use authz_outbox_proof::export_source::{Dataset, ExportSource};

/// What answers reconcile's reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// agentex-auth-dev's embedded SpiceDB (in-memory datastore).
    Engine,
    /// The instant in-process source.
    Instant,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub keys: i64,
    pub tasks: i64,
    pub agents: i64,
    pub drift: i64,
    pub page_size: u32,
    pub source: Source,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReconcileResult {
    pub source: Source,
    pub keys: i64,
    pub tasks: i64,
    pub agents: i64,
    pub relationships: i64,
    pub drift_planted: i64,
    pub load_seconds: f64,
    pub seconds: f64,
    pub max_rss_mib: f64,
    pub exit_code: Option<i32>,
    /// The report's `summary` object.
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
        "INSERT INTO agents (id, name, description, status, created_at)
         SELECT 'ra-' || g, 'ra-' || g, '', 'READY', now() - interval '1 hour'
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
    sqlx::query("TRUNCATE tasks CASCADE")
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO tasks (id, name, status, created_at)
         SELECT 'rt-' || g, 'rt-' || g, 'RUNNING', now() - interval '1 hour'
         FROM generate_series(1, $1::bigint) g",
    )
    .bind(config.tasks)
    .execute(&mut *tx)
    .await
    .context("generating tasks")?;
    sqlx::query(
        "INSERT INTO task_agents (task_id, agent_id)
         SELECT 'rt-' || g, 'ra-' || (g % $2::bigint + 1)
         FROM generate_series(1, $1::bigint) g",
    )
    .bind(config.tasks)
    .bind(config.agents)
    .execute(&mut *tx)
    .await
    .context("linking tasks to agents")?;
    tx.commit().await?;
    sqlx::raw_sql("VACUUM ANALYZE agents, agent_api_keys, tasks, task_agents")
        .execute(&pool)
        .await?;

    // Keys 1..=keys-drift are consistent; the last `drift` keys have no
    // relationships (missing); keys past `keys` have no row (orphans).
    let dataset = Dataset {
        agents: config.agents,
        last_key: config.keys + config.drift,
        missing: (config.keys - config.drift + 1, config.keys),
        tasks: config.tasks,
    };
    let (endpoint, server, _source) = match config.source {
        Source::Engine => {
            let server = load_engine(&dataset).await?;
            (server.grpc_endpoint(), Some(server), None)
        }
        Source::Instant => {
            let source = ExportSource::start(dataset).await?;
            (source.endpoint(), None, Some(source))
        }
    };
    let relationships = dataset.total();
    let load_seconds = load_started.elapsed().as_secs_f64();
    eprintln!(
        "  reconcile: loaded {} keys, {} tasks and {relationships} relationships in {load_seconds:.1} s",
        config.keys, config.tasks
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
            &endpoint,
            "--page-size",
            &config.page_size.to_string(),
        ])
        .env("DATABASE_URL", &env.database_url)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .await
        .context("running /usr/bin/time -v authz-outbox reconcile")?;
    let seconds = started.elapsed().as_secs_f64();
    if let Some(server) = server {
        server.shutdown().await;
    }

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
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)
        .context("authz-outbox reconcile --format json printed no JSON document")?;
    let summary = report.get("summary").cloned().unwrap_or_default();
    // A fast run that read half the relationships would be no figure: the
    // classification must come out exactly as planted.
    let count = |kind: &str| summary.get(kind).and_then(serde_json::Value::as_i64);
    // Agents count as resources too; keys without relationships and
    // without a recorded creator are `needs_owner`.
    let expected = [
        (
            "consistent",
            config.keys - config.drift + config.agents + config.tasks,
        ),
        ("needs_owner", config.drift),
        ("orphan", config.drift),
    ];
    for (kind, want) in expected {
        if count(kind) != Some(want) {
            bail!(
                "reconcile found {:?} {kind}, planted {want}: {summary}",
                count(kind)
            );
        }
    }
    Ok(ReconcileResult {
        source: config.source,
        keys: config.keys,
        tasks: config.tasks,
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

/// Loads `dataset` into a fresh agentex-auth-dev engine in this process.
async fn load_engine(dataset: &Dataset) -> anyhow::Result<DevServer> {
    let server = DevServer::start(DevServerConfig::ephemeral())
        .await
        .context("starting agentex-auth-dev in the bench process")?;
    let agents: Vec<Rel> = (1..=dataset.agents)
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
    const CHUNK: i64 = 100_000;
    let mut start = 1;
    while start <= dataset.last_key {
        let end = (start + CHUNK - 1).min(dataset.last_key);
        let mut batch = Vec::with_capacity(2 * (end - start + 1) as usize);
        for k in start..=end {
            if (dataset.missing.0..=dataset.missing.1).contains(&k) {
                continue;
            }
            let agent = format!("ra-{}", k % dataset.agents + 1);
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
        server.bulk_touch(batch).await?;
        start = end + 1;
    }
    let mut start = 1;
    while start <= dataset.tasks {
        let end = (start + CHUNK - 1).min(dataset.tasks);
        let mut batch = Vec::with_capacity(2 * (end - start + 1) as usize);
        for t in start..=end {
            let agent = format!("ra-{}", t % dataset.agents + 1);
            batch.push(rel(
                "task",
                format!("rt-{t}"),
                "owner",
                "user",
                "bench-user".into(),
            ));
            batch.push(rel(
                "task",
                format!("rt-{t}"),
                "parent_agent",
                "agent",
                agent,
            ));
        }
        server.bulk_touch(batch).await?;
        start = end + 1;
    }
    Ok(server)
}
