//! Commit-to-delivered latency at a steady, moderate rate: keys created
//! through `create_api_key` at `rate` per second (each on its own task, on a
//! fixed schedule, so a slow one does not delay the next) while one
//! long-running worker delivers to a sink that answers at once.
//!
//! The latency of a row is `delivered_at - created_at` from the outbox:
//! `created_at` is `clock_timestamp()` when the trigger ran, just before the
//! commit; `delivered_at` is the start of the transaction that recorded the
//! delivery. The worker's own `authz_outbox_commit_to_delivered_seconds`
//! histogram is read from its `/metrics` as a cross-check (bucket bounds).
//!
//! The worker's memory is read idle (before the first key) and sampled
//! during the run.

use std::time::{Duration, Instant};

use anyhow::bail;
use authz_outbox::capture::{NewApiKey, create_api_key};
use authz_outbox::domain::{ApiKeyType, Principal};
use serde::Serialize;
use tokio::task::JoinSet;

use super::env::{AGENT, Env, PRINCIPAL, free_port, outbox_states, terminate, wait_for_port};
use super::footprint::{Memory, Sampler, mib, rss_kib};
use super::sink::Sink;
use super::stats::Summary;

#[derive(Debug, Clone)]
pub struct Config {
    pub rate: u32,
    pub duration: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct LatencyResult {
    pub rate_per_second: u32,
    pub seconds: f64,
    pub keys: usize,
    /// From the outbox rows: delivered_at - created_at.
    pub commit_to_delivered: Summary,
    /// The worker's histogram: the upper bound of the bucket holding each
    /// quantile (buckets 1, 2.5, 5, 10, 25, 50 ms...).
    pub histogram_p50_le_ms: Option<f64>,
    pub histogram_p95_le_ms: Option<f64>,
    pub histogram_p99_le_ms: Option<f64>,
    pub histogram_count: Option<u64>,
    /// Client-side create_api_key latency during the run.
    pub create: Summary,
    pub worker_idle_rss_mib: f64,
    pub worker_under_load: Memory,
    #[serde(skip)]
    pub samples_ms: Vec<f64>,
}

pub async fn run(env: &Env, config: &Config) -> anyhow::Result<LatencyResult> {
    let pool = env.pool(16).await?;
    env.reset(&pool).await?;
    let sink = Sink::start(Duration::ZERO).await?;
    let metrics_port = free_port()?;
    let mut worker = env.spawn_worker(&sink.base_url(), 32, 100, false, metrics_port, None)?;
    let pid = worker.id().unwrap_or_default();
    wait_for_port(metrics_port, Duration::from_secs(30)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = rss_kib(pid).map(|(rss, _)| mib(rss)).unwrap_or(0.0);

    let sampler = Sampler::start(pid);
    let principal = Principal::parse(PRINCIPAL)?;
    let total = (config.rate as f64 * config.duration.as_secs_f64()) as usize;
    let period = Duration::from_secs_f64(1.0 / config.rate as f64);
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut creates = JoinSet::new();
    for _ in 0..total {
        ticker.tick().await;
        let (pool, principal) = (pool.clone(), principal.clone());
        creates.spawn(async move {
            let key = NewApiKey {
                agent_id: AGENT.into(),
                name: "latency".into(),
                key_type: ApiKeyType::External,
                secret: None,
            };
            let t = Instant::now();
            create_api_key(&pool, key, Some(&principal)).await?;
            anyhow::Ok(t.elapsed().as_secs_f64() * 1000.0)
        });
    }
    let mut create_ms = Vec::with_capacity(total);
    while let Some(done) = creates.join_next().await {
        create_ms.push(done??);
    }
    let seconds = started.elapsed().as_secs_f64();

    // Let the worker finish the tail.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let pending: i64 =
            sqlx::query_scalar("SELECT count(*) FROM authz_outbox WHERE state = 'pending'")
                .fetch_one(&pool)
                .await?;
        if pending == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "{pending} rows still pending 30 s after the last key ({:?})",
                outbox_states(&pool).await?
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let under_load = sampler.stop();
    let histogram = scrape_histogram(metrics_port).await.ok();
    terminate(&mut worker).await;

    let samples_ms: Vec<f64> = sqlx::query_scalar(
        "SELECT (extract(epoch FROM delivered_at - created_at) * 1000)::float8
         FROM authz_outbox WHERE state = 'delivered' AND resource_type = 'api_key'",
    )
    .fetch_all(&pool)
    .await?;
    if samples_ms.len() != total {
        bail!(
            "{} of {total} keys delivered ({:?})",
            samples_ms.len(),
            outbox_states(&pool).await?
        );
    }
    let q = |p: f64| histogram.as_ref().and_then(|h| h.quantile_le_ms(p));
    Ok(LatencyResult {
        rate_per_second: config.rate,
        seconds,
        keys: total,
        commit_to_delivered: Summary::of(&samples_ms),
        histogram_p50_le_ms: q(0.50),
        histogram_p95_le_ms: q(0.95),
        histogram_p99_le_ms: q(0.99),
        histogram_count: histogram.as_ref().map(|h| h.count),
        create: Summary::of(&create_ms),
        worker_idle_rss_mib: idle,
        worker_under_load: under_load,
        samples_ms,
    })
}

/// The cumulative buckets of `authz_outbox_commit_to_delivered_seconds`.
struct Histogram {
    /// (upper bound in seconds, cumulative count), ascending.
    buckets: Vec<(f64, u64)>,
    count: u64,
}

impl Histogram {
    fn quantile_le_ms(&self, q: f64) -> Option<f64> {
        let target = (q * self.count as f64).ceil() as u64;
        self.buckets
            .iter()
            .find(|(_, cumulative)| *cumulative >= target)
            .map(|(le, _)| le * 1000.0)
    }
}

async fn scrape_histogram(port: u16) -> anyhow::Result<Histogram> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await?
        .text()
        .await?;
    let name = authz_outbox::metrics::COMMIT_TO_DELIVERED;
    let mut buckets = Vec::new();
    let mut count = 0;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix(&format!("{name}_bucket{{")) {
            // le="0.005"} 123
            let le = rest.split("le=\"").nth(1).and_then(|s| s.split('"').next());
            let value = rest.rsplit(' ').next().and_then(|v| v.parse::<u64>().ok());
            if let (Some(le), Some(value)) = (le, value)
                && let Ok(le) = le.parse::<f64>()
            {
                buckets.push((le, value));
            }
        } else if let Some(rest) = line.strip_prefix(&format!("{name}_count")) {
            count = rest
                .trim()
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    if count == 0 {
        bail!("no {name} samples in /metrics");
    }
    Ok(Histogram { buckets, count })
}
