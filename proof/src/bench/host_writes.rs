//! The capture's cost on the host's own writes to tasks, side by side with
//! the same writes on copies of the tables that carry no trigger:
//!
//! - `status`: the host's hottest write, a task's status changed between
//!   live statuses (RUNNING → COMPLETED → …, with its `updated_at`). The
//!   mapping's update trigger fires `OF` the columns it reads and only
//!   `WHEN` liveness changes, so no capture function should run at all.
//! - `create`: a task created the way the host creates it — `tasks`, then
//!   `task_agents`, then `agent_task_tracker`, in one transaction — which
//!   registers the task once, under its agent.
//!
//! Captured and plain variants take turns in short rounds (the order
//! alternating) so a neighbour's load slows both alike.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use sqlx::PgPool;
use tokio::task::JoinSet;

use super::env::{AGENT, Env, PRINCIPAL};

#[derive(Debug, Clone)]
pub struct Config {
    pub concurrency: usize,
    pub rounds: usize,
    pub round: Duration,
    /// Tasks the status updates cycle over (spread so writers rarely
    /// contend for one row).
    pub tasks: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Pair {
    pub captured_per_second: f64,
    pub plain_per_second: f64,
    /// 1 - captured / plain.
    pub cost: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct HostWritesResult {
    pub concurrency: usize,
    pub rounds: usize,
    pub round_seconds: f64,
    pub status_updates: Pair,
    pub task_creation: Pair,
    /// Outbox rows written by the status rounds (must be 0).
    pub status_outbox_rows: i64,
}

const LIVE: [&str; 4] = ["RUNNING", "COMPLETED", "FAILED", "TIMED_OUT"];

/// The plain copies: same columns, indexes and foreign keys, no triggers.
const PLAIN: &str = "
    DROP TABLE IF EXISTS plain_agent_task_tracker, plain_task_agents, plain_tasks;
    CREATE TABLE plain_tasks (LIKE tasks INCLUDING ALL);
    CREATE TABLE plain_task_agents (LIKE task_agents INCLUDING ALL);
    ALTER TABLE plain_task_agents
        ADD FOREIGN KEY (task_id) REFERENCES plain_tasks (id) ON DELETE CASCADE,
        ADD FOREIGN KEY (agent_id) REFERENCES agents (id) ON DELETE CASCADE;
    CREATE TABLE plain_agent_task_tracker (LIKE agent_task_tracker INCLUDING ALL);
    ALTER TABLE plain_agent_task_tracker
        ADD FOREIGN KEY (task_id) REFERENCES plain_tasks (id) ON DELETE CASCADE,
        ADD FOREIGN KEY (agent_id) REFERENCES agents (id) ON DELETE CASCADE;
";

pub async fn run(env: &Env, config: &Config) -> anyhow::Result<HostWritesResult> {
    let pool = env.pool(config.concurrency as u32 + 2).await?;
    env.reset(&pool).await?;
    sqlx::raw_sql("TRUNCATE tasks CASCADE")
        .execute(&pool)
        .await?;
    sqlx::raw_sql(PLAIN)
        .execute(&pool)
        .await
        .context("creating the plain copies")?;
    // The tasks the status rounds update, in both tables (capture off: the
    // setup's registers are not what is measured).
    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL session_replication_role = replica")
        .execute(&mut *tx)
        .await?;
    for table in ["tasks", "plain_tasks"] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO {table} (id, name, status) SELECT 'st-' || g, 'st-' || g, 'RUNNING' FROM generate_series(1, $1::int) g"
        )))
        .bind(config.tasks as i32)
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query("INSERT INTO task_agents (task_id, agent_id) SELECT 'st-' || g, $2 FROM generate_series(1, $1::int) g")
        .bind(config.tasks as i32)
        .bind(AGENT)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    // One statement each: VACUUM cannot run in the implicit transaction of
    // a multi-statement query.
    for table in ["tasks", "plain_tasks", "task_agents", "authz_outbox"] {
        sqlx::query(sqlx::AssertSqlSafe(format!("VACUUM ANALYZE {table}")))
            .execute(&pool)
            .await?;
    }
    let outbox_before: i64 = sqlx::query_scalar("SELECT count(*) FROM authz_outbox")
        .fetch_one(&pool)
        .await?;

    let counter = Arc::new(AtomicU64::new(0));
    let mut status = [0u64, 0u64];
    let mut status_time = [Duration::ZERO, Duration::ZERO];
    for round in 0..config.rounds {
        for turn in 0..2 {
            let plain = (round + turn) % 2 == 1;
            let started = Instant::now();
            let n = round_of(&pool, config, counter.clone(), move |pool, i, tasks| {
                status_update(pool, plain, i, tasks)
            })
            .await?;
            status_time[usize::from(plain)] += started.elapsed();
            status[usize::from(plain)] += n;
        }
    }
    let status_outbox_rows = sqlx::query_scalar::<_, i64>("SELECT count(*) FROM authz_outbox")
        .fetch_one(&pool)
        .await?
        - outbox_before;

    let mut create = [0u64, 0u64];
    let mut create_time = [Duration::ZERO, Duration::ZERO];
    for round in 0..config.rounds {
        for turn in 0..2 {
            let plain = (round + turn) % 2 == 1;
            let started = Instant::now();
            let n = round_of(&pool, config, counter.clone(), move |pool, i, _| {
                create_task(pool, plain, i)
            })
            .await?;
            create_time[usize::from(plain)] += started.elapsed();
            create[usize::from(plain)] += n;
        }
    }
    let pair = |ops: [u64; 2], time: [Duration; 2]| {
        let captured = ops[0] as f64 / time[0].as_secs_f64();
        let plain = ops[1] as f64 / time[1].as_secs_f64();
        Pair {
            captured_per_second: captured,
            plain_per_second: plain,
            cost: 1.0 - captured / plain,
        }
    };
    Ok(HostWritesResult {
        concurrency: config.concurrency,
        rounds: config.rounds,
        round_seconds: config.round.as_secs_f64(),
        status_updates: pair(status, status_time),
        task_creation: pair(create, create_time),
        status_outbox_rows,
    })
}

/// Runs `op` from `concurrency` writers for one round; returns how many
/// completed.
async fn round_of<F, Fut>(
    pool: &PgPool,
    config: &Config,
    counter: Arc<AtomicU64>,
    op: F,
) -> anyhow::Result<u64>
where
    F: Fn(PgPool, u64, usize) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let deadline = Instant::now() + config.round;
    let mut writers = JoinSet::new();
    for _ in 0..config.concurrency {
        let (pool, counter, op, tasks) = (pool.clone(), counter.clone(), op.clone(), config.tasks);
        writers.spawn(async move {
            let mut done = 0u64;
            while Instant::now() < deadline {
                let i = counter.fetch_add(1, Ordering::Relaxed);
                op(pool.clone(), i, tasks).await?;
                done += 1;
            }
            anyhow::Ok(done)
        });
    }
    let mut total = 0;
    while let Some(done) = writers.join_next().await {
        total += done??;
    }
    Ok(total)
}

async fn status_update(pool: PgPool, plain: bool, i: u64, tasks: usize) -> anyhow::Result<()> {
    let id = format!("st-{}", i % tasks as u64 + 1);
    let status = LIVE[(i / tasks as u64 % LIVE.len() as u64) as usize];
    let sql = if plain {
        "UPDATE plain_tasks SET status = $1::taskstatus, updated_at = now() WHERE id = $2"
    } else {
        "UPDATE tasks SET status = $1::taskstatus, updated_at = now() WHERE id = $2"
    };
    sqlx::query(sql)
        .bind(status)
        .bind(id)
        .execute(&pool)
        .await?;
    Ok(())
}

async fn create_task(pool: PgPool, plain: bool, i: u64) -> anyhow::Result<()> {
    let id = format!("ct-{i}");
    let (tasks, links, tracker) = if plain {
        (
            "plain_tasks",
            "plain_task_agents",
            "plain_agent_task_tracker",
        )
    } else {
        ("tasks", "task_agents", "agent_task_tracker")
    };
    let mut tx = pool.begin().await?;
    if !plain {
        sqlx::query("SELECT set_config('authz_outbox.principal', $1, true)")
            .bind(PRINCIPAL)
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {tasks} (id, name, status, params) VALUES ($1, $1, 'RUNNING', '{{}}')"
    )))
    .bind(&id)
    .execute(&mut *tx)
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {links} (task_id, agent_id) VALUES ($1, $2)"
    )))
    .bind(&id)
    .bind(AGENT)
    .execute(&mut *tx)
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {tracker} (id, agent_id, task_id, status) VALUES ($1, $2, $3, 'ACTIVE')"
    )))
    .bind(format!("tr-{id}"))
    .bind(AGENT)
    .bind(&id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}
