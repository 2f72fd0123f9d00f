//! The capture's cost on the host's own writes, each measured two ways
//! (issue 24):
//!
//! - against **the same tables with our triggers disabled**
//!   (`ALTER TABLE … DISABLE TRIGGER authz_outbox__…`): the host's write on
//!   exactly the table definition it runs on, minus the capture;
//! - against **trigger-less copies** of the tables (`plain_*`, `LIKE …
//!   INCLUDING ALL` plus the same foreign keys, both ways): what earlier
//!   rounds compared with.
//!
//! Three writes, as the host makes them:
//!
//! - `key_creation`: BEGIN; (captured: set the principal;) INSERT into
//!   `agent_api_keys`; COMMIT;
//! - `task_creation`: `tasks`, then `task_agents`, then
//!   `agent_task_tracker`, in one transaction, which registers the task
//!   once, under its agent;
//! - `status_update`: the host's hottest write, a task's status changed
//!   between live statuses (RUNNING → COMPLETED → …, with its
//!   `updated_at`), one statement in its own transaction. Nothing is
//!   captured (0 outbox rows is checked): whatever it costs is the
//!   triggers' mere presence.
//!
//! Every variant takes a turn in every round, the order rotating, so a
//! neighbour's build slows all alike; ratios are taken per round (variants
//! side by side) and summarised by median and spread (min-max). Per write,
//! each round also reads the database's own account: executor time of the
//! round's statements (`pg_stat_statements`, BEGIN/COMMIT included where the
//! host sends them; the commit of a one-statement transaction is not in it)
//! and WAL bytes (`pg_current_wal_insert_lsn()` before and after, everything
//! the cluster wrote meanwhile, autovacuum included).
//!
//! The variant list is open to more capture modes: see [`variants`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::RngCore;
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

/// How the capture is installed on a captured variant's tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CaptureMode {
    /// `authz-outbox migrate` (the default): the triggers insert outbox rows.
    Table,
    /// `authz-outbox migrate --capture wal` on a database of its own: the
    /// triggers emit logical messages, and a worker's relay, running for the
    /// whole benchmark, moves them into that database's outbox.
    Wal,
}

/// One way of making the host's writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "variant", content = "mode")]
pub enum Variant {
    /// The host's tables with the capture installed and on.
    Captured(CaptureMode),
    /// The same tables, our triggers disabled.
    Disabled,
    /// Trigger-less copies of the tables.
    Copy,
}

impl Variant {
    pub fn name(self) -> String {
        match self {
            Variant::Captured(CaptureMode::Table) => "captured (table mode)".into(),
            Variant::Captured(CaptureMode::Wal) => "captured (wal mode)".into(),
            Variant::Disabled => "same tables, triggers disabled".into(),
            Variant::Copy => "trigger-less copy".into(),
        }
    }
}

/// The host writes measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Workload {
    KeyCreation,
    TaskCreation,
    StatusUpdate,
}

const WORKLOADS: [Workload; 3] = [
    Workload::StatusUpdate,
    Workload::KeyCreation,
    Workload::TaskCreation,
];

/// Where a variant writes: its database and its table names.
#[derive(Clone)]
struct Target {
    variant: Variant,
    pool: PgPool,
    keys: &'static str,
    tasks: &'static str,
    links: &'static str,
    tracker: &'static str,
    /// Sets the principal before a creation (the capture needs it; the host
    /// without capture would not send it).
    sets_principal: bool,
    /// Whether `pg_stat_statements` can be read in this database.
    statements: bool,
}

/// What keeps the wal variant's relay running for the whole benchmark.
pub struct WalVariant {
    worker: super::wal::Worker,
}

const HOST_TABLES: [&str; 4] = [
    "agent_api_keys",
    "tasks",
    "task_agents",
    "agent_task_tracker",
];

impl Target {
    fn host_tables(variant: Variant, pool: PgPool, statements: bool) -> Target {
        Target {
            variant,
            pool,
            keys: "agent_api_keys",
            tasks: "tasks",
            links: "task_agents",
            tracker: "agent_task_tracker",
            sets_principal: matches!(variant, Variant::Captured(_)),
            statements,
        }
    }

    /// Puts the shared tables in this variant's state before its turn (not
    /// timed): our triggers on for the captured variant, off for the
    /// disabled one.
    async fn prepare(&self) -> anyhow::Result<()> {
        let enable = match self.variant {
            Variant::Captured(_) => true,
            Variant::Disabled => false,
            Variant::Copy => return Ok(()),
        };
        set_our_triggers(&self.pool, enable).await
    }
}

/// The variants, each with its database. The captured and disabled variants
/// share the host's tables (their triggers toggled between turns); the copy
/// lives beside them.
///
/// With `wal_level = logical` (`scripts/bench.sh` sets it, so every variant
/// runs on that level and their WAL bytes stay comparable) the wal-mode
/// variant joins: its own database `bench_wal` with the host schema and
/// `authz-outbox migrate --capture wal`, and a worker (`authz-outbox run`,
/// its relay included; its delivery held back) on it for the whole run: the goals are "with the relay running". Its db time per
/// write is everything its database executed during its turn (the relay's
/// and the worker's statements included), and its turn lasts until the
/// relay has read to the WAL's end as the writers left it (see
/// [`measure_round`]): the relay's work is in its figures, not in the next
/// variant's turn.
async fn variants(
    env: &Env,
    main: &PgPool,
    statements: bool,
    concurrency: usize,
) -> anyhow::Result<(Vec<Target>, Option<WalVariant>)> {
    let captured = Target::host_tables(
        Variant::Captured(CaptureMode::Table),
        main.clone(),
        statements,
    );
    let disabled = Target::host_tables(Variant::Disabled, main.clone(), statements);
    let copy = Target {
        variant: Variant::Copy,
        pool: main.clone(),
        keys: "plain_keys",
        tasks: "plain_tasks",
        links: "plain_task_agents",
        tracker: "plain_agent_task_tracker",
        sets_principal: false,
        statements,
    };
    let mut targets = vec![captured, disabled, copy];
    if !super::wal::available(main).await? {
        eprintln!("bench: wal_level is not logical: no wal-mode variant");
        return Ok((targets, None));
    }
    let wal_env = super::wal::wal_env(env, "bench_wal").await?;
    let wal_pool = wal_env.pool(concurrency as u32 + 2).await?;
    wal_env.reset(&wal_pool).await?;
    sqlx::raw_sql("TRUNCATE tasks CASCADE")
        .execute(&wal_pool)
        .await?;
    let wal_statements = statements
        && sqlx::raw_sql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .execute(&wal_pool)
            .await
            .is_ok();
    // Delivery held back (one row in flight to a sink that answers after
    // 60 s), as table mode's rounds run with no worker: what the wal
    // variant pays beyond its own writes is the relay.
    let worker = super::wal::Worker::start(&wal_env, Duration::from_secs(60), 1, 1).await?;
    targets.push(Target::host_tables(
        Variant::Captured(CaptureMode::Wal),
        wal_pool,
        wal_statements,
    ));
    Ok((targets, Some(WalVariant { worker })))
}

/// Our triggers (`authz_outbox__…`, never a host's own or a foreign key's)
/// on the tables the workloads write.
async fn set_our_triggers(pool: &PgPool, enable: bool) -> anyhow::Result<()> {
    let triggers: Vec<(String, String)> = sqlx::query_as(
        r"SELECT t.tgname::text, format('%I.%I', n.nspname, c.relname)
          FROM pg_trigger t
          JOIN pg_class c ON c.oid = t.tgrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE NOT t.tgisinternal AND t.tgname LIKE 'authz\_outbox\_\_%'
            AND c.relname = ANY ($1)",
    )
    .bind(&HOST_TABLES[..])
    .fetch_all(pool)
    .await?;
    let verb = if enable { "ENABLE" } else { "DISABLE" };
    for (trigger, table) in triggers {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "ALTER TABLE {table} {verb} TRIGGER \"{trigger}\""
        )))
        .execute(pool)
        .await
        .with_context(|| format!("{verb} TRIGGER {trigger}"))?;
    }
    Ok(())
}

/// One variant's figures for one round.
#[derive(Debug, Clone, Serialize)]
pub struct RoundSample {
    /// WAL mode: how long after the writers stopped the relay had read
    /// everything they committed (inside the round's time).
    pub relay_catch_up_ms: Option<f64>,
    pub per_second: f64,
    /// Executor time per write, µs (`None` without `pg_stat_statements`).
    pub db_us_per_write: Option<f64>,
    pub wal_bytes_per_write: f64,
}

/// Median and spread of one figure over the rounds: the middle half
/// (p25-p75, linear interpolation) and the extremes. On a shared machine
/// one stalled round sets min or max; the middle half is the spread to read.
#[derive(Debug, Clone, Serialize)]
pub struct Spread {
    pub median: f64,
    pub p25: f64,
    pub p75: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    fn of(values: &[f64]) -> Option<Spread> {
        if values.is_empty() {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let at = |q: f64| {
            let k = (n - 1) as f64 * q;
            let (lo, hi) = (k.floor() as usize, k.ceil() as usize);
            v[lo] + (v[hi] - v[lo]) * (k - lo as f64)
        };
        Some(Spread {
            median: at(0.5),
            p25: at(0.25),
            p75: at(0.75),
            min: v[0],
            max: v[n - 1],
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct VariantFigures {
    pub variant: Variant,
    pub name: String,
    pub per_second: Option<Spread>,
    pub db_us_per_write: Option<Spread>,
    pub wal_bytes_per_write: Option<Spread>,
    pub rounds: Vec<RoundSample>,
}

/// `1 - variant / baseline` throughput, per round.
#[derive(Debug, Clone, Serialize)]
pub struct Cost {
    pub variant: Variant,
    pub baseline: Variant,
    pub cost: Option<Spread>,
}

#[derive(Debug, Clone, Serialize)]
pub struct WorkloadResult {
    pub workload: Workload,
    pub variants: Vec<VariantFigures>,
    pub costs: Vec<Cost>,
}

impl WorkloadResult {
    /// The median cost of `variant` against `baseline`.
    pub fn cost(&self, variant: Variant, baseline: Variant) -> Option<f64> {
        self.costs
            .iter()
            .find(|c| c.variant == variant && c.baseline == baseline)
            .and_then(|c| c.cost.as_ref())
            .map(|s| s.median)
    }
}

/// HOT share of the status updates, per table (a trigger never stops HOT;
/// an index on an updated column would).
#[derive(Debug, Clone, Serialize)]
pub struct HotUpdates {
    pub table: String,
    pub updates: i64,
    pub hot: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct HostWritesResult {
    pub concurrency: usize,
    pub rounds: usize,
    pub round_seconds: f64,
    pub workloads: Vec<WorkloadResult>,
    /// Outbox rows written by the status rounds (must be 0).
    pub status_outbox_rows: i64,
    /// In the wal database: outbox rows about the status rounds' tasks
    /// (must be 0).
    pub wal_status_outbox_rows: Option<i64>,
    pub hot_updates: Vec<HotUpdates>,
    /// Whether `pg_stat_statements` was loaded (db time per write).
    pub pg_stat_statements: bool,
    /// `/proc/loadavg`'s 1-minute figure at the start and the end.
    pub load_average: (f64, f64),
}

impl HostWritesResult {
    pub fn workload(&self, w: Workload) -> Option<&WorkloadResult> {
        self.workloads.iter().find(|r| r.workload == w)
    }

    /// The figures as BENCHMARKS.md shows them: median [p25, p75].
    pub fn print(&self) {
        let spread = |s: &Option<Spread>, scale: f64, digits: usize| match s {
            Some(s) => format!(
                "{:.d$} [{:.d$}, {:.d$}]",
                s.median * scale,
                s.p25 * scale,
                s.p75 * scale,
                d = digits
            ),
            None => "-".into(),
        };
        println!(
            "\nCapture cost on host writes ({} writers, {} interleaved rounds x {:.0} s, load average {:.1} -> {:.1})",
            self.concurrency,
            self.rounds,
            self.round_seconds,
            self.load_average.0,
            self.load_average.1
        );
        for w in &self.workloads {
            println!("  {:?}", w.workload);
            println!(
                "    {:<32} {:>24} {:>24} {:>24}",
                "variant (median [p25, p75])", "writes/s", "db us/write", "WAL B/write"
            );
            for v in &w.variants {
                println!(
                    "    {:<32} {:>24} {:>24} {:>24}",
                    v.name,
                    spread(&v.per_second, 1.0, 0),
                    spread(&v.db_us_per_write, 1.0, 1),
                    spread(&v.wal_bytes_per_write, 1.0, 0)
                );
            }
            for c in &w.costs {
                println!(
                    "    cost of {} vs {}: {} %",
                    c.variant.name(),
                    c.baseline.name(),
                    spread(&c.cost, 100.0, 1)
                );
            }
        }
        for h in &self.hot_updates {
            println!("  {}: {} updates, {} HOT", h.table, h.updates, h.hot);
        }
        println!(
            "  outbox rows from the status rounds: {} (wal database: {:?})",
            self.status_outbox_rows, self.wal_status_outbox_rows
        );
    }
}

/// The plain copies: same columns, indexes and foreign keys (both ways),
/// no triggers.
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

const LIVE: [&str; 4] = ["RUNNING", "COMPLETED", "FAILED", "TIMED_OUT"];

pub async fn run(env: &Env, config: &Config) -> anyhow::Result<HostWritesResult> {
    let load_before = load_average();
    let pool = env.pool(config.concurrency as u32 + 2).await?;
    env.reset(&pool).await?;
    sqlx::raw_sql("TRUNCATE tasks CASCADE")
        .execute(&pool)
        .await?;
    sqlx::raw_sql(PLAIN)
        .execute(&pool)
        .await
        .context("creating the plain copies")?;
    let statements = sqlx::raw_sql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .execute(&pool)
        .await
        .is_ok()
        && sqlx::raw_sql("SELECT pg_stat_statements_reset()")
            .execute(&pool)
            .await
            .is_ok();
    if !statements {
        eprintln!(
            "bench: pg_stat_statements is not loaded (shared_preload_libraries): no db time per write"
        );
    }
    let (targets, wal) = variants(env, &pool, statements, config.concurrency).await?;
    for target in &targets {
        seed(target, config.tasks).await?;
    }
    let hot_before = hot_updates(&pool).await?;
    let outbox_before = outbox_rows(&pool).await?;

    let counter = Arc::new(AtomicU64::new(0));
    let mut workloads = Vec::new();
    let mut status_outbox_rows = 0;
    for workload in WORKLOADS {
        eprintln!("bench: host writes: {workload:?}");
        let mut samples: Vec<Vec<RoundSample>> = vec![Vec::new(); targets.len()];
        for round in 0..config.rounds {
            for turn in 0..targets.len() {
                let index = (round + turn) % targets.len();
                let target = &targets[index];
                target.prepare().await?;
                let sample = measure_round(target, workload, config, counter.clone()).await?;
                samples[index].push(sample);
            }
        }
        // Our triggers stay on between workloads, as installed.
        for target in &targets {
            set_our_triggers(&target.pool, true).await?;
        }
        if workload == Workload::StatusUpdate {
            status_outbox_rows = outbox_rows(&pool).await? - outbox_before;
        }
        workloads.push(summarise(workload, &targets, samples));
    }
    let mut wal_status_outbox_rows = None;
    if let Some(wal) = wal {
        wal.worker.stop().await;
        if let Some(t) = targets
            .iter()
            .find(|t| t.variant == Variant::Captured(CaptureMode::Wal))
        {
            wal_status_outbox_rows = Some(
                sqlx::query_scalar(
                    "SELECT count(*) FROM authz_outbox WHERE resource_id LIKE 'st-%'",
                )
                .fetch_one(&t.pool)
                .await?,
            );
        }
    }
    let hot_after = hot_updates(&pool).await?;
    let hot_updates = hot_after
        .into_iter()
        .map(|(table, upd, hot)| {
            let (upd0, hot0) = hot_before
                .iter()
                .find(|(t, _, _)| *t == table)
                .map(|(_, u, h)| (*u, *h))
                .unwrap_or((0, 0));
            HotUpdates {
                table,
                updates: upd - upd0,
                hot: hot - hot0,
            }
        })
        .collect();
    Ok(HostWritesResult {
        concurrency: config.concurrency,
        rounds: config.rounds,
        round_seconds: config.round.as_secs_f64(),
        workloads,
        status_outbox_rows,
        wal_status_outbox_rows,
        hot_updates,
        pg_stat_statements: statements,
        load_average: (load_before, load_average()),
    })
}

/// The tasks the status rounds update, in the variant's tables (capture
/// off: the setup's registers are not what is measured), then fresh
/// statistics and a vacuumed heap.
async fn seed(target: &Target, tasks: usize) -> anyhow::Result<()> {
    let already: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT EXISTS (SELECT 1 FROM {} WHERE id = 'st-1')",
        target.tasks
    )))
    .fetch_one(&target.pool)
    .await?;
    if already {
        // The captured and disabled variants share their tables.
        return Ok(());
    }
    let mut tx = target.pool.begin().await?;
    sqlx::query("SET LOCAL session_replication_role = replica")
        .execute(&mut *tx)
        .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {} (id, name, status) SELECT 'st-' || g, 'st-' || g, 'RUNNING' FROM generate_series(1, $1::int) g",
        target.tasks
    )))
    .bind(tasks as i32)
    .execute(&mut *tx)
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {} (task_id, agent_id) SELECT 'st-' || g, $2 FROM generate_series(1, $1::int) g",
        target.links
    )))
    .bind(tasks as i32)
    .bind(AGENT)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    // One statement each: VACUUM cannot run in the implicit transaction of
    // a multi-statement query.
    for table in [target.tasks, target.links, target.keys] {
        sqlx::query(sqlx::AssertSqlSafe(format!("VACUUM ANALYZE {table}")))
            .execute(&target.pool)
            .await?;
    }
    Ok(())
}

/// The database's own account so far: executor ms of every statement
/// (ours excluded) and the WAL insert position.
async fn account(target: &Target) -> anyhow::Result<(Option<f64>, f64)> {
    let wal: f64 =
        sqlx::query_scalar("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::float8")
            .fetch_one(&target.pool)
            .await?;
    if !target.statements {
        return Ok((None, wal));
    }
    let ms: f64 = sqlx::query_scalar(
        "SELECT coalesce(sum(total_exec_time), 0)::float8 FROM pg_stat_statements
         WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
           AND query NOT LIKE '%pg\\_stat\\_statements%'
           AND query NOT LIKE '%pg\\_current\\_wal\\_insert\\_lsn%'",
    )
    .fetch_one(&target.pool)
    .await?;
    Ok((Some(ms), wal))
}

async fn measure_round(
    target: &Target,
    workload: Workload,
    config: &Config,
    counter: Arc<AtomicU64>,
) -> anyhow::Result<RoundSample> {
    let (ms_before, wal_before) = account(target).await?;
    let started = Instant::now();
    let writes = round_of(target, workload, config, counter).await?;
    // WAL mode: the turn ends when the relay has read everything the
    // writers committed (its inserts into the outbox done), so the
    // relay's work counts here.
    let mut relay_catch_up_ms = None;
    if target.variant == Variant::Captured(CaptureMode::Wal) {
        let end: String = sqlx::query_scalar("SELECT pg_current_wal_flush_lsn()::text")
            .fetch_one(&target.pool)
            .await?;
        let waited = super::wal::caught_up(&target.pool, &end, Duration::from_secs(120)).await?;
        relay_catch_up_ms = Some(waited.as_secs_f64() * 1000.0);
    }
    let seconds = started.elapsed().as_secs_f64();
    let (ms_after, wal_after) = account(target).await?;
    let n = writes.max(1) as f64;
    Ok(RoundSample {
        relay_catch_up_ms,
        per_second: writes as f64 / seconds,
        db_us_per_write: ms_before.zip(ms_after).map(|(b, a)| (a - b) * 1000.0 / n),
        wal_bytes_per_write: (wal_after - wal_before) / n,
    })
}

fn summarise(
    workload: Workload,
    targets: &[Target],
    samples: Vec<Vec<RoundSample>>,
) -> WorkloadResult {
    let variants: Vec<VariantFigures> = targets
        .iter()
        .zip(samples)
        .map(|(t, rounds)| {
            let of = |f: &dyn Fn(&RoundSample) -> Option<f64>| {
                Spread::of(&rounds.iter().filter_map(f).collect::<Vec<_>>())
            };
            VariantFigures {
                variant: t.variant,
                name: t.variant.name(),
                per_second: of(&|r| Some(r.per_second)),
                db_us_per_write: of(&|r| r.db_us_per_write),
                wal_bytes_per_write: of(&|r| Some(r.wal_bytes_per_write)),
                rounds,
            }
        })
        .collect();
    // Every variant against each uncaptured baseline, round by round (the
    // disabled table against the copy too: issue 24 saw the copy ahead).
    let mut costs = Vec::new();
    for baseline in [Variant::Disabled, Variant::Copy] {
        let Some(base) = variants.iter().find(|v| v.variant == baseline) else {
            continue;
        };
        // (The copy against the disabled table would only be the inverse.)
        for v in variants.iter().filter(|v| {
            v.variant != baseline && !(baseline == Variant::Disabled && v.variant == Variant::Copy)
        }) {
            let per_round: Vec<f64> = v
                .rounds
                .iter()
                .zip(&base.rounds)
                .filter(|(_, b)| b.per_second > 0.0)
                .map(|(r, b)| 1.0 - r.per_second / b.per_second)
                .collect();
            costs.push(Cost {
                variant: v.variant,
                baseline,
                cost: Spread::of(&per_round),
            });
        }
    }
    WorkloadResult {
        workload,
        variants,
        costs,
    }
}

async fn outbox_rows(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM authz_outbox")
        .fetch_one(pool)
        .await?)
}

async fn hot_updates(pool: &PgPool) -> anyhow::Result<Vec<(String, i64, i64)>> {
    Ok(sqlx::query_as(
        "SELECT relname::text, n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables
         WHERE relname IN ('tasks', 'plain_tasks') ORDER BY relname",
    )
    .fetch_all(pool)
    .await?)
}

fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Runs the workload from `concurrency` writers for one round; returns how
/// many writes completed.
async fn round_of(
    target: &Target,
    workload: Workload,
    config: &Config,
    counter: Arc<AtomicU64>,
) -> anyhow::Result<u64> {
    let deadline = Instant::now() + config.round;
    let mut writers = JoinSet::new();
    for _ in 0..config.concurrency {
        let (target, counter, tasks) = (target.clone(), counter.clone(), config.tasks);
        writers.spawn(async move {
            let mut done = 0u64;
            while Instant::now() < deadline {
                let i = counter.fetch_add(1, Ordering::Relaxed);
                match workload {
                    Workload::StatusUpdate => status_update(&target, i, tasks).await?,
                    Workload::KeyCreation => create_key(&target).await?,
                    Workload::TaskCreation => create_task(&target, i).await?,
                }
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

async fn status_update(target: &Target, i: u64, tasks: usize) -> anyhow::Result<()> {
    let id = format!("st-{}", i % tasks as u64 + 1);
    let status = LIVE[(i / tasks as u64 % LIVE.len() as u64) as usize];
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE {} SET status = $1::taskstatus, updated_at = now() WHERE id = $2",
        target.tasks
    )))
    .bind(status)
    .bind(id)
    .execute(&target.pool)
    .await?;
    Ok(())
}

async fn create_key(target: &Target) -> anyhow::Result<()> {
    let mut tx = target.pool.begin().await?;
    if target.sets_principal {
        sqlx::query("SELECT set_config('authz_outbox.principal', $1, true)")
            .bind(PRINCIPAL)
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {} (id, agent_id, name, api_key_type, api_key)
         VALUES ($1, $2, 'bench', 'EXTERNAL', $3)",
        target.keys
    )))
    .bind(uuid::Uuid::new_v4().to_string())
    .bind(AGENT)
    .bind(secret())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// A secret shaped like the product's (32 random bytes, hex).
fn secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("agx_{hex}")
}

async fn create_task(target: &Target, i: u64) -> anyhow::Result<()> {
    let id = format!("ct-{i}");
    let mut tx = target.pool.begin().await?;
    if target.sets_principal {
        sqlx::query("SELECT set_config('authz_outbox.principal', $1, true)")
            .bind(PRINCIPAL)
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {} (id, name, status, params) VALUES ($1, $1, 'RUNNING', '{{}}')",
        target.tasks
    )))
    .bind(&id)
    .execute(&mut *tx)
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {} (task_id, agent_id) VALUES ($1, $2)",
        target.links
    )))
    .bind(&id)
    .bind(AGENT)
    .execute(&mut *tx)
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {} (id, agent_id, task_id, status) VALUES ($1, $2, $3, 'ACTIVE')",
        target.tracker
    )))
    .bind(format!("tr-{id}"))
    .bind(AGENT)
    .bind(&id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Spread;

    #[test]
    fn spread_interpolates_its_quartiles() {
        let s = Spread::of(&[4.0, 1.0, 3.0, 2.0, 5.0]).expect("values");
        assert_eq!(
            (s.min, s.p25, s.median, s.p75, s.max),
            (1.0, 2.0, 3.0, 4.0, 5.0)
        );
        let s = Spread::of(&[1.0, 2.0]).expect("values");
        assert_eq!((s.p25, s.median, s.p75), (1.25, 1.5, 1.75));
        assert!(Spread::of(&[]).is_none());
    }
}
