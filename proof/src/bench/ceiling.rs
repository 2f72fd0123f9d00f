//! Worker ceiling: one `authz-outbox run --once` process draining the outbox
//! into a sink that answers 200 at once, so the worker (and PostgreSQL under
//! it) is the only bottleneck. Its memory is sampled during the drain: that
//! is the "under load" footprint.

use std::time::Instant;

use anyhow::bail;
use serde::Serialize;

use super::env::{Env, commits, delivered_count, free_port, outbox_states};
use super::footprint::{Memory, Sampler};
use super::sink::Sink;

#[derive(Debug, Clone)]
pub struct Config {
    pub rows: i64,
    pub concurrency: usize,
    pub batch_size: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct CeilingResult {
    pub rows: i64,
    pub concurrency: usize,
    pub batch_size: usize,
    /// Process start to exit.
    pub seconds: f64,
    pub per_second: f64,
    /// First to last `delivered_at` (excludes start-up and the final check).
    pub delivering_seconds: f64,
    pub delivering_per_second: f64,
    pub memory: Memory,
    /// PostgreSQL commits per row during the drain.
    pub commits_per_row: f64,
}

pub async fn run(env: &Env, config: &Config) -> anyhow::Result<CeilingResult> {
    let pool = env.pool(2).await?;
    env.reset(&pool).await?;
    env.enqueue_registers(&pool, "ceiling", config.rows).await?;
    let sink = Sink::start(std::time::Duration::ZERO).await?;

    let commits_before = commits(&pool).await?;
    let started = Instant::now();
    let mut worker = env.spawn_worker(
        &sink.base_url(),
        config.concurrency,
        config.batch_size,
        true,
        free_port()?,
        None,
    )?;
    let sampler = Sampler::start(worker.id().unwrap_or_default());
    let status = worker.wait().await?;
    let seconds = started.elapsed().as_secs_f64();
    let memory = sampler.stop();
    if !status.success() {
        bail!("authz-outbox run --once exited with {status}");
    }
    let commits_per_row = (commits(&pool).await? - commits_before) as f64 / config.rows as f64;
    let delivered = delivered_count(&pool).await?;
    if delivered != config.rows {
        bail!(
            "{delivered} of {} rows delivered ({:?})",
            config.rows,
            outbox_states(&pool).await?
        );
    }
    let delivering_seconds: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM max(delivered_at) - min(delivered_at))::float8
         FROM authz_outbox WHERE state = 'delivered'",
    )
    .fetch_one(&pool)
    .await?;
    Ok(CeilingResult {
        rows: config.rows,
        concurrency: config.concurrency,
        batch_size: config.batch_size,
        seconds,
        per_second: config.rows as f64 / seconds,
        delivering_seconds,
        delivering_per_second: config.rows as f64 / delivering_seconds,
        memory,
        commits_per_row,
    })
}
