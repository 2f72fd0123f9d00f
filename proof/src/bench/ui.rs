//! The operator page at size: `rows` outbox rows (most delivered over the
//! last week, some in the last hour, some pending), `dead` of them dead,
//! then every page of the real `authz-outbox ui` binary requested
//! `requests` times in turn, for its latency per page. The target is every
//! page under 200 ms.
//!
//! Loading is not measured: rows are generated with `generate_series`,
//! triggers off, then `VACUUM ANALYZE` (as autovacuum would have).

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tokio::process::Command;

use super::env::{Env, free_port, terminate, wait_for_port};
use super::stats::Summary;

#[derive(Debug, Clone)]
pub struct Config {
    pub rows: i64,
    pub dead: i64,
    pub requests: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct UiResult {
    pub rows: i64,
    pub dead: i64,
    pub pages: Vec<PageLatency>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PageLatency {
    pub path: String,
    pub latency: Summary,
}

impl UiResult {
    /// The slowest page's p99.
    pub fn worst_p99_ms(&self) -> f64 {
        self.pages
            .iter()
            .map(|p| p.latency.p99_ms)
            .fold(0.0, f64::max)
    }

    pub fn print(&self) {
        println!(
            "\nOperator page ({} outbox rows, {} dead; `authz-outbox ui`, sequential requests)",
            self.rows, self.dead
        );
        println!(
            "{:<44} {:>8} {:>8} {:>8}",
            "page", "p50 ms", "p99 ms", "max ms"
        );
        for p in &self.pages {
            println!(
                "{:<44} {:>8.1} {:>8.1} {:>8.1}",
                p.path, p.latency.p50_ms, p.latency.p99_ms, p.latency.max_ms
            );
        }
    }
}

/// Fills the outbox. Rows `1..=dead` are dead (a tenth of them 'timeout'
/// errors), 1,000 pending, 20,000 delivered within the last hour, the rest
/// delivered over the last 7 days; four resource types in turn.
async fn load(env: &Env, config: &Config) -> anyhow::Result<()> {
    let pool = env.pool(1).await?;
    env.reset(&pool).await?;
    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL session_replication_role = replica")
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO authz_outbox (resource_type, resource_id, parent_type, parent_id, operation,
                                   principal, state, attempts, created_at, delivered_at,
                                   finished_at, last_error, last_status)
         SELECT (ARRAY['agent','api_key','task','schedule'])[1 + g % 4],
                'bench-' || g, 'agent', 'bench-agent', 'register',
                '{\"user_id\":\"bench-user\"}'::jsonb,
                CASE WHEN g <= $2 THEN 'dead'
                     WHEN g <= $2 + 1000 THEN 'pending'
                     ELSE 'delivered' END,
                CASE WHEN g <= $2 THEN 20 ELSE 1 END,
                t - interval '150 milliseconds',
                CASE WHEN g > $2 + 1000 THEN t END,
                CASE WHEN g <= $2 OR g > $2 + 1000 THEN t END,
                CASE WHEN g <= $2 AND g % 10 = 0 THEN 'request timed out after 5s'
                     WHEN g <= $2 THEN 'HTTP 403 principal not allowed' END,
                CASE WHEN g <= $2 THEN 403 END
         FROM generate_series(1, $1::bigint) g,
              LATERAL (SELECT CASE WHEN g > $1 - 20000
                                   THEN now() - (($1 - g) * interval '180 milliseconds')
                                   ELSE now() - interval '1 hour' - (g % 604800) * interval '1 second'
                              END AS t) AS times",
    )
    .bind(config.rows)
    .bind(config.dead)
    .execute(&mut *tx)
    .await
    .context("loading the outbox")?;
    tx.commit().await?;
    sqlx::raw_sql("VACUUM ANALYZE authz_outbox")
        .execute(&pool)
        .await?;
    pool.close().await;
    Ok(())
}

pub async fn run(env: &Env, config: &Config) -> anyhow::Result<UiResult> {
    env.migrate().await?;
    load(env, config).await?;
    let port = free_port()?;
    let mut child = Command::new(env.authz_outbox())
        .args(["ui", "--listen", &format!("127.0.0.1:{port}")])
        .env("DATABASE_URL", &env.database_url)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("starting authz-outbox ui")?;
    wait_for_port(port, Duration::from_secs(30)).await?;
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    // A cursor deep in the dead rows: the 100th page.
    // (microseconds since the epoch, id), as the pager's cursor writes it.
    let deep: (i64, i64) = {
        let pool = env.pool(1).await?;
        let row: (i64, i64) = sqlx::query_as(
            "SELECT (extract(epoch FROM finished_at) * 1000000)::bigint, id FROM authz_outbox
             WHERE state = 'dead' ORDER BY finished_at DESC, id DESC OFFSET 5000 LIMIT 1",
        )
        .fetch_one(&pool)
        .await
        .context("a deep cursor")?;
        pool.close().await;
        (row.0, row.1)
    };
    let paths = [
        "/ui/".to_string(),
        "/ui/dead".to_string(),
        "/ui/dead?type=task".to_string(),
        "/ui/dead?error=timeout".to_string(),
        "/ui/dead?newer_than=30d&older_than=1m".to_string(),
        format!("/ui/dead?after={}.{}", deep.0, deep.1),
        "/ui/resource/api_key/bench-500001".to_string(),
        "/ui/reconcile".to_string(),
        "/ui/mappings".to_string(),
    ];
    let mut pages = Vec::new();
    for path in &paths {
        // One request first, unmeasured: connections and caches warm.
        client.get(format!("{base}{path}")).send().await?;
        let mut samples = Vec::with_capacity(config.requests);
        for _ in 0..config.requests {
            let started = Instant::now();
            let response = client.get(format!("{base}{path}")).send().await?;
            let status = response.status();
            response.bytes().await?;
            samples.push(started.elapsed().as_secs_f64() * 1000.0);
            anyhow::ensure!(status.is_success(), "{path} answered {status}");
        }
        pages.push(PageLatency {
            path: path.clone(),
            latency: Summary::of(&samples),
        });
    }
    terminate(&mut child).await;
    Ok(UiResult {
        rows: config.rows,
        dead: config.dead,
        pages,
    })
}
