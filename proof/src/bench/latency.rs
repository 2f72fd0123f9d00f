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
//! Read-your-writes: each writer then calls `wait_for_resource` (the SQL
//! function `authz_outbox_wait_for_resource`) for its key, as a host that
//! wants the old inline register's guarantee would, and notes the wall-clock
//! time it returned. `commit_to_wait_returned` is that time minus the row's
//! `created_at`; `wait_added` is that time minus `delivered_at`: what waiting
//! adds over the delivery itself (the recorder's commit, the poll step, one
//! round trip). Same clock: client and server share the machine.
//!
//! The worker's memory is read idle (before the first key) and sampled
//! during the run.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::bail;
use authz_outbox::capture::{DeliveryState, NewApiKey, create_api_key, wait_for_resource};
use authz_outbox::domain::{ApiKeyType, Principal, ResourceRef};
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
    /// The database is migrated with `--capture wal`: `create_api_key`
    /// (which reads the outbox id the trigger inserted) and
    /// `wait_for_resource` (which needs the row in the outbox) do not apply
    /// there yet, so each key is created by the host's own INSERT with the
    /// principal set, and no wait follows (the wait figures stay empty).
    pub wal: bool,
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
    /// Commit to `authz_outbox_wait_for_resource` returning `delivered`.
    pub commit_to_wait_returned: Summary,
    /// What the wait adds over commit-to-delivered (per key: the wait's
    /// return minus `delivered_at`).
    pub wait_added: Summary,
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
        let wal = config.wal;
        creates.spawn(async move {
            if wal {
                let t = Instant::now();
                let id = uuid::Uuid::new_v4().to_string();
                let mut tx = pool.begin().await?;
                sqlx::query("SELECT set_config('authz_outbox.principal', $1, true)")
                    .bind(PRINCIPAL)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(
                    "INSERT INTO agent_api_keys (id, agent_id, name, api_key_type, api_key)
                     VALUES ($1, $2, 'latency', 'EXTERNAL', md5($1))",
                )
                .bind(&id)
                .bind(AGENT)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                let create_ms = t.elapsed().as_secs_f64() * 1000.0;
                return anyhow::Ok((create_ms, id, None));
            }
            let key = NewApiKey {
                agent_id: AGENT.into(),
                name: "latency".into(),
                key_type: ApiKeyType::External,
                secret: None,
            };
            let t = Instant::now();
            let created = create_api_key(&pool, key, Some(&principal)).await?;
            let create_ms = t.elapsed().as_secs_f64() * 1000.0;
            let resource = ResourceRef::new("api_key", &created.id)?;
            let state = wait_for_resource(&pool, &resource, Duration::from_secs(30)).await?;
            let returned = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64();
            if state != DeliveryState::Delivered {
                bail!("{resource}: waited for delivery, got {state:?}");
            }
            anyhow::Ok((create_ms, created.id, Some(returned)))
        });
    }
    let mut create_ms = Vec::with_capacity(total);
    let mut wait_returned = HashMap::with_capacity(total);
    while let Some(done) = creates.join_next().await {
        let (ms, id, returned) = done??;
        create_ms.push(ms);
        if let Some(returned) = returned {
            wait_returned.insert(id, returned);
        }
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

    let rows: Vec<(String, f64, f64)> = sqlx::query_as(
        "SELECT resource_id, extract(epoch FROM created_at)::float8,
                extract(epoch FROM delivered_at)::float8
         FROM authz_outbox WHERE state = 'delivered' AND resource_type = 'api_key'",
    )
    .fetch_all(&pool)
    .await?;
    let samples_ms: Vec<f64> = rows
        .iter()
        .map(|(_, created, delivered)| (delivered - created) * 1000.0)
        .collect();
    let mut to_wait_ms = Vec::with_capacity(rows.len());
    let mut added_ms = Vec::with_capacity(rows.len());
    for (id, created, delivered) in rows.iter().filter(|_| !config.wal) {
        let Some(returned) = wait_returned.get(id) else {
            bail!("key {id} was delivered but its wait never returned");
        };
        to_wait_ms.push((returned - created) * 1000.0);
        added_ms.push((returned - delivered) * 1000.0);
    }
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
        commit_to_wait_returned: Summary::of(&to_wait_ms),
        wait_added: Summary::of(&added_ms),
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
