//! WAL capture (`migrate --capture wal`, issue 24) in the benchmarks: a
//! database of its own per benchmark, migrated with `--capture wal` on the
//! bench cluster (which `scripts/bench.sh` starts with `wal_level =
//! logical`, so table and wal mode run on the same cluster, same level), and
//! the relay's throughput: captured rows written with no relay running,
//! then the time a freshly started worker's relay takes to move them all
//! into `authz_outbox`.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use sqlx::PgPool;
use tokio::process::Command;
use tokio::task::JoinSet;

use super::env::{AGENT, Env, PRINCIPAL, free_port, terminate, wait_for_port};
use super::sink::Sink;

/// Whether the cluster can run WAL capture at all.
pub async fn available(pool: &PgPool) -> anyhow::Result<bool> {
    let level: String = sqlx::query_scalar("SHOW wal_level").fetch_one(pool).await?;
    Ok(level == "logical")
}

/// A fresh database `name` on the bench cluster with the host schema and
/// `authz-outbox migrate --capture wal` applied; its `Env`.
pub async fn wal_env(env: &Env, name: &str) -> anyhow::Result<Env> {
    let admin = env.pool(1).await?;
    // A slot holds its database: drop the previous run's first.
    sqlx::query(
        "SELECT pg_drop_replication_slot(s.slot_name) FROM pg_replication_slots s
         WHERE s.database = $1",
    )
    .bind(name)
    .execute(&admin)
    .await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&admin)
    .await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&admin)
        .await
        .with_context(|| format!("CREATE DATABASE {name}"))?;
    admin.close().await;
    let wal = Env {
        database_url: with_database(&env.database_url, name),
        bin_dir: env.bin_dir.clone(),
    };
    let pool = wal.pool(1).await?;
    authz_outbox_proof::load_host_schema(&pool)
        .await
        .context("loading the host's schema")?;
    pool.close().await;
    let status = Command::new(wal.authz_outbox())
        .args(["migrate", "--capture", "wal"])
        .env("DATABASE_URL", &wal.database_url)
        .stdout(std::process::Stdio::null())
        .status()
        .await
        .context("running authz-outbox migrate --capture wal")?;
    if !status.success() {
        bail!("authz-outbox migrate --capture wal failed: {status}");
    }
    Ok(wal)
}

/// `url` with its database replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let host_part = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{host_part}/{name}?{q}"),
        None => format!("{host_part}/{name}"),
    }
}

/// A worker (`authz-outbox run`, its relay included) on a wal database,
/// delivering to an in-process sink that answers after `delay`.
pub struct Worker {
    pub child: tokio::process::Child,
    _sink: Sink,
}

impl Worker {
    pub async fn start(
        env: &Env,
        delay: Duration,
        concurrency: usize,
        batch: usize,
    ) -> anyhow::Result<Worker> {
        let sink = Sink::start(delay).await?;
        let port = free_port()?;
        let child = env.spawn_worker(&sink.base_url(), concurrency, batch, false, port, None)?;
        wait_for_port(port, Duration::from_secs(30)).await?;
        Ok(Worker { child, _sink: sink })
    }

    pub async fn stop(mut self) {
        terminate(&mut self.child).await;
    }
}

/// Waits until the relay of `pool`'s database has read to `lsn` (its
/// slot's confirmed position); returns how long that took.
pub async fn caught_up(pool: &PgPool, lsn: &str, timeout: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        let done: Option<bool> = sqlx::query_scalar(
            "SELECT confirmed_flush_lsn >= $1::pg_lsn FROM pg_replication_slots
             WHERE database = current_database()",
        )
        .bind(lsn)
        .fetch_optional(pool)
        .await?
        .flatten();
        if done == Some(true) {
            return Ok(started.elapsed());
        }
        if done.is_none() {
            bail!("no replication slot for this database");
        }
        if started.elapsed() > timeout {
            bail!("the relay did not read to {lsn} within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub rows: i64,
    /// Captured rows per writing transaction (1: one key per transaction,
    /// as the host creates them).
    pub rows_per_tx: i64,
    pub rounds: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct RelayRound {
    /// Writing the rows (relay stopped; synchronous_commit off for the
    /// setup, not timed).
    pub write_seconds: f64,
    /// Worker start to the relay's count reaching the rows.
    pub seconds: f64,
    pub per_second: f64,
    /// First relayed batch to the last (excludes the worker's start).
    pub relaying_seconds: f64,
    pub relaying_per_second: f64,
    pub outbox_rows: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RelayResult {
    pub rows: i64,
    pub rows_per_tx: i64,
    pub rounds: Vec<RelayRound>,
    /// Median over the rounds, worker start to done.
    pub median_per_second: f64,
    pub min_per_second: f64,
    pub max_per_second: f64,
    pub median_relaying_per_second: f64,
    pub load_average: (f64, f64),
}

/// The relay's throughput: `rows` captured key creations in the slot, then
/// a worker started (delivery held back: one row in flight at a time to a
/// sink that answers after 60 s, so the relay has the machine) and timed
/// until `authz_outbox_relay.relayed` (the persisted count behind
/// `authz_outbox_relay_rows_total`) has them all.
pub async fn relay_throughput(env: &Env, config: &RelayConfig) -> anyhow::Result<RelayResult> {
    let load_before = load_average();
    let wal = wal_env(env, "bench_relay").await?;
    let pool = wal.pool(18).await?;
    wal.reset(&pool).await?;
    let mut rounds = Vec::new();
    for round in 0..config.rounds {
        eprintln!(
            "bench: relay throughput, round {}/{}: writing {} captured keys",
            round + 1,
            config.rounds,
            config.rows
        );
        sqlx::raw_sql(
            "SET session_replication_role = replica;
             TRUNCATE authz_outbox; TRUNCATE agent_api_keys;
             SET session_replication_role = origin",
        )
        .execute(&pool)
        .await?;
        let relayed_before: i64 = sqlx::query_scalar("SELECT relayed FROM authz_outbox_relay")
            .fetch_one(&pool)
            .await?;
        let started = Instant::now();
        write_captured(&pool, config.rows, config.rows_per_tx, round).await?;
        let write_seconds = started.elapsed().as_secs_f64();
        let lag: i64 = sqlx::query_scalar(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint
             FROM pg_replication_slots WHERE database = current_database()",
        )
        .fetch_one(&pool)
        .await?;
        eprintln!("bench: relay throughput: slot lag {lag} bytes; starting the worker");

        let started = Instant::now();
        let worker = Worker::start(&wal, Duration::from_secs(60), 1, 1).await?;
        let mut first = None;
        let deadline = started + Duration::from_secs(300);
        loop {
            let relayed: i64 = sqlx::query_scalar("SELECT relayed FROM authz_outbox_relay")
                .fetch_one(&pool)
                .await?;
            let done = relayed - relayed_before;
            if done > 0 && first.is_none() {
                first = Some(Instant::now());
            }
            if done >= config.rows {
                break;
            }
            if Instant::now() > deadline {
                bail!("the relay moved {done} of {} rows in 300 s", config.rows);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let seconds = started.elapsed().as_secs_f64();
        let relaying_seconds = first.map_or(seconds, |f| f.elapsed().as_secs_f64());
        worker.stop().await;
        let outbox_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM authz_outbox")
            .fetch_one(&pool)
            .await?;
        if outbox_rows != config.rows {
            bail!("{outbox_rows} outbox rows after relaying {}", config.rows);
        }
        let r = RelayRound {
            write_seconds,
            seconds,
            per_second: config.rows as f64 / seconds,
            relaying_seconds,
            // The first batch's rows are in before `first`: count the rest.
            relaying_per_second: config.rows as f64 / relaying_seconds.max(1e-6),
            outbox_rows,
        };
        eprintln!(
            "bench: relay throughput: {} rows in {:.2} s = {:.0}/s (first batch to last {:.0}/s)",
            config.rows, r.seconds, r.per_second, r.relaying_per_second
        );
        rounds.push(r);
    }
    let median = |f: &dyn Fn(&RelayRound) -> f64| {
        let mut v: Vec<f64> = rounds.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n == 0 {
            0.0
        } else if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    };
    let per: Vec<f64> = rounds.iter().map(|r| r.per_second).collect();
    Ok(RelayResult {
        rows: config.rows,
        rows_per_tx: config.rows_per_tx,
        median_per_second: median(&|r| r.per_second),
        min_per_second: per.iter().copied().fold(f64::INFINITY, f64::min),
        max_per_second: per.iter().copied().fold(0.0, f64::max),
        median_relaying_per_second: median(&|r| r.relaying_per_second),
        rounds,
        load_average: (load_before, load_average()),
    })
}

/// `rows` captured key creations, `per_tx` per transaction, from 16
/// connections.
async fn write_captured(pool: &PgPool, rows: i64, per_tx: i64, round: usize) -> anyhow::Result<()> {
    let txs = (rows + per_tx - 1) / per_tx;
    let writers = 16;
    let mut set = JoinSet::new();
    for w in 0..writers {
        let pool = pool.clone();
        set.spawn(async move {
            let mut t = w;
            while t < txs {
                let mut tx = pool.begin().await?;
                sqlx::query(
                    "SELECT set_config('synchronous_commit', 'off', true),
                            set_config('authz_outbox.principal', $1, true)",
                )
                .bind(PRINCIPAL)
                .execute(&mut *tx)
                .await?;
                let from = t * per_tx + 1;
                let to = ((t + 1) * per_tx).min(rows);
                sqlx::query(
                    "INSERT INTO agent_api_keys (id, agent_id, name, api_key_type, api_key)
                     SELECT $1 || g, $2, 'relay', 'EXTERNAL', md5(g::text)
                     FROM generate_series($3::bigint, $4::bigint) g",
                )
                .bind(format!("r{round}-"))
                .bind(AGENT)
                .bind(from)
                .bind(to)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                t += writers;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = set.join_next().await {
        done??;
    }
    // Everything written is flushed (the relay reads flushed WAL only).
    sqlx::raw_sql("CHECKPOINT").execute(pool).await?;
    Ok(())
}

fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn replaces_the_database() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5/postgres", "b"),
            "postgres://postgres@127.0.0.1:5/b"
        );
        assert_eq!(
            with_database("postgres://u@h/db?sslmode=disable", "b"),
            "postgres://u@h/b?sslmode=disable"
        );
        assert_eq!(with_database("postgres://u@h", "b"), "postgres://u@h/b");
    }
}
