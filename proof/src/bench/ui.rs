//! The operator page at size: `rows` outbox rows (most delivered over the
//! last week, some in the last hour, some pending), `dead` of them dead,
//! then every page of the real `authz-outbox ui` binary requested
//! `requests` times in turn, for its latency per page. The target is every
//! page under 200 ms.
//!
//! Loading is not measured: rows are generated with `generate_series`,
//! triggers off, then `VACUUM ANALYZE` (as autovacuum would have).
//!
//! Then, on the same outbox, whether serving the page slows delivery: the
//! worker's ceiling (`run --once` into an instant sink, as `ceiling`) with
//! and without `/ui/` requested from the worker's own HTTP server every
//! second, the two variants interleaved over `delivery_rounds` rounds (the
//! order alternating), each draining `delivery_rows` fresh registers.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tokio::process::Command;

use super::env::{Env, free_port, terminate, wait_for_port};
use super::sink::Sink;
use super::stats::{Summary, percentile};

#[derive(Debug, Clone)]
pub struct Config {
    pub rows: i64,
    pub dead: i64,
    pub requests: usize,
    /// Registers per drain of the delivery comparison.
    pub delivery_rows: i64,
    /// Rounds of the delivery comparison (each drains twice); 0 skips it.
    pub delivery_rounds: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct UiResult {
    pub rows: i64,
    pub dead: i64,
    pub pages: Vec<PageLatency>,
    pub delivery: Option<DeliveryWithPage>,
}

/// The worker's ceiling with and without the page polled every second.
#[derive(Debug, Clone, Serialize)]
pub struct DeliveryWithPage {
    pub rows: i64,
    pub rounds: usize,
    /// Rows per second of each round, in round order.
    pub without_page: Vec<f64>,
    pub with_page: Vec<f64>,
    /// Page requests answered during the polled drains, and their latency.
    pub page_latency: Summary,
}

impl DeliveryWithPage {
    /// The median; of an even count, the mean of the middle two (a few
    /// rounds: nearest-rank would report one round's figure as the median).
    pub fn median(samples: &[f64]) -> f64 {
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        if n > 0 && n.is_multiple_of(2) {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        } else {
            percentile(&sorted, 0.5)
        }
    }

    /// Median with the page over median without, minus one (negative: slower).
    pub fn change(&self) -> f64 {
        Self::median(&self.with_page) / Self::median(&self.without_page) - 1.0
    }

    /// Each round's change (its drain with the page against its own drain
    /// without, run back to back), so a machine getting busier or quieter
    /// over the run, which moves both drains of a round alike, cancels out.
    pub fn paired_changes(&self) -> Vec<f64> {
        self.with_page
            .iter()
            .zip(&self.without_page)
            .map(|(with, without)| with / without - 1.0)
            .collect()
    }

    /// The median of [`Self::paired_changes`]: the goal's figure.
    pub fn paired_change(&self) -> f64 {
        Self::median(&self.paired_changes())
    }

    /// The most the page may cost for "does not slow delivery measurably":
    /// below the round-to-round spread this machine shows between two
    /// drains of the same variant.
    pub const MEASURABLE: f64 = -0.05;
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
        if let Some(d) = &self.delivery {
            let spread = |v: &[f64]| {
                let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = v.iter().copied().fold(0.0, f64::max);
                format!("{lo:.0}-{hi:.0}")
            };
            println!(
                "Worker ceiling, {} rows per drain, {} interleaved rounds: without the page median {:.0}/s (rounds {}), \
                 with /ui/ every second {:.0}/s ({}); change {:+.1} %; per round {}, median {:+.1} %; page p50 {:.1} ms, max {:.1} ms over {} requests",
                d.rows,
                d.rounds,
                DeliveryWithPage::median(&d.without_page),
                spread(&d.without_page),
                DeliveryWithPage::median(&d.with_page),
                spread(&d.with_page),
                d.change() * 100.0,
                d.paired_changes()
                    .iter()
                    .map(|c| format!("{:+.1} %", c * 100.0))
                    .collect::<Vec<_>>()
                    .join(" / "),
                d.paired_change() * 100.0,
                d.page_latency.p50_ms,
                d.page_latency.max_ms,
                d.page_latency.count
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
    let delivery = if config.delivery_rounds > 0 {
        Some(delivery_with_page(env, config).await?)
    } else {
        None
    };
    Ok(UiResult {
        rows: config.rows,
        dead: config.dead,
        pages,
        delivery,
    })
}

/// One drain of `rows` fresh registers by `run --once` into the instant
/// sink; with `poll`, `/ui/` is requested from the worker every second.
/// Returns rows per second (process start to exit) and the page latencies.
async fn drain(
    env: &Env,
    sink: &Sink,
    prefix: &str,
    rows: i64,
    poll: bool,
) -> anyhow::Result<(f64, Vec<f64>)> {
    let pool = env.pool(1).await?;
    env.enqueue_registers(&pool, prefix, rows).await?;
    let port = free_port()?;
    let started = Instant::now();
    let mut worker = env.spawn_worker(&sink.base_url(), 512, 1000, true, port, None)?;
    let samples = Arc::new(Mutex::new(Vec::new()));
    let poller = poll.then(|| {
        let samples = samples.clone();
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let at = Instant::now();
                // Before the server listens, or after the drain, a request
                // fails: not a page answer, not counted.
                if let Ok(r) = client
                    .get(format!("http://127.0.0.1:{port}/ui/"))
                    .send()
                    .await
                    && r.status().is_success()
                    && r.bytes().await.is_ok()
                    && let Ok(mut s) = samples.lock()
                {
                    s.push(at.elapsed().as_secs_f64() * 1000.0);
                }
            }
        })
    });
    let status = worker.wait().await?;
    let seconds = started.elapsed().as_secs_f64();
    if let Some(task) = poller {
        task.abort();
    }
    let samples = samples.lock().map(|s| s.clone()).unwrap_or_default();
    anyhow::ensure!(
        status.success(),
        "authz-outbox run --once exited with {status}"
    );
    let delivered: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM authz_outbox WHERE state = 'delivered' AND resource_id LIKE $1 || '-%'",
    )
    .bind(prefix)
    .fetch_one(&pool)
    .await?;
    anyhow::ensure!(
        delivered == rows,
        "{delivered} of {rows} {prefix} rows delivered"
    );
    pool.close().await;
    Ok((rows as f64 / seconds, samples))
}

/// The ceiling with and without the page, interleaved: round `r` runs
/// "without" first when `r` is even, "with" first when odd, so a machine
/// getting busier or quieter over the run weighs on both alike. One
/// unmeasured drain first delivers the loaded outbox's own pending rows.
async fn delivery_with_page(env: &Env, config: &Config) -> anyhow::Result<DeliveryWithPage> {
    let sink = Sink::start(Duration::ZERO).await?;
    drain(env, &sink, "warm", 1000, false).await?;
    let (mut without_page, mut with_page, mut page) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..config.delivery_rounds {
        for poll in [round % 2 == 1, round % 2 == 0] {
            let prefix = format!("r{round}{}", if poll { "p" } else { "n" });
            let (per_second, samples) =
                drain(env, &sink, &prefix, config.delivery_rows, poll).await?;
            eprintln!("bench: ui delivery round {round} page={poll}: {per_second:.0}/s");
            if poll {
                with_page.push(per_second);
                page.extend(samples);
            } else {
                without_page.push(per_second);
            }
        }
    }
    Ok(DeliveryWithPage {
        rows: config.delivery_rows,
        rounds: config.delivery_rounds,
        without_page,
        with_page,
        page_latency: Summary::of(&page),
    })
}
