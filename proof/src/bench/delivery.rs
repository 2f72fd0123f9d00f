//! Delivery: how much of agentex-auth-dev's own capacity the worker uses.
//!
//! The same register requests reach a fresh `agentex-auth-dev` process two
//! ways: straight from a load generator with `concurrency` requests in flight
//! (the server's capacity), and from the outbox through the real
//! `authz-outbox run --once` binary, as one process with `--concurrency C`
//! and as two processes with `C/2` each (the same total in flight). Each
//! drain starts a fresh server so every variant writes into an empty
//! in-memory SpiceDB; variants take turns over `rounds`. Each round runs
//! twice: with every process free to use every CPU, and with the server
//! pinned to a CPU of its own ([`Pinning`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Instant;

use anyhow::bail;
use serde::Serialize;
use tokio::task::JoinSet;

use super::env::{AGENT, Env, PRINCIPAL, commits, delivered_count, free_port, outbox_states};
use super::pinning::Pinning;

#[derive(Debug, Clone)]
pub struct Config {
    pub rows: i64,
    pub concurrency: usize,
    pub rounds: usize,
    /// `--batch-size` of each worker process.
    pub batch_size: usize,
    /// Also measure with agentex-auth-dev pinned to a CPU of its own.
    pub pinned: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Drain {
    /// `shared` (every process on every CPU) or `pinned`.
    pub mode: &'static str,
    pub variant: String,
    pub round: usize,
    pub rows: i64,
    pub seconds: f64,
    pub per_second: f64,
    /// PostgreSQL commits per row during the drain (all sessions).
    pub commits_per_row: f64,
}

/// The three variants in one CPU arrangement, over all rounds.
#[derive(Debug, Clone, Serialize)]
pub struct ModeResult {
    pub direct_per_second: f64,
    pub one_worker_per_second: f64,
    pub two_workers_per_second: f64,
    pub one_worker_ratio: f64,
    pub two_workers_ratio: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeliveryResult {
    pub rows: i64,
    pub concurrency: usize,
    pub drains: Vec<Drain>,
    /// Every process free to use every CPU.
    pub shared: ModeResult,
    /// agentex-auth-dev alone on one CPU, the rest on the others
    /// (see [`Pinning`]); `None` where pinning is unavailable or off.
    pub pinned: Option<ModeResult>,
    pub pinning: Option<String>,
}

const DIRECT: &str = "direct load generator";
const ONE: &str = "1 worker process";
const TWO: &str = "2 worker processes";

pub async fn run(env: &Env, config: &Config) -> anyhow::Result<DeliveryResult> {
    let pool = env.pool(4).await?;
    let pinning = if config.pinned {
        Pinning::for_this_machine()
    } else {
        None
    };
    let mut modes: Vec<(&'static str, Option<&Pinning>)> = vec![("shared", None)];
    if let Some(p) = &pinning {
        modes.push(("pinned", Some(p)));
    }
    let mut drains = Vec::new();
    for round in 0..config.rounds {
        for &(mode, pin) in &modes {
            if let Some(p) = pin {
                p.pin_running().await?;
            }
            let result = round_of(env, &pool, config, round, mode, pin, &mut drains).await;
            if let Some(p) = pin {
                p.unpin_running().await?;
            }
            result?;
        }
    }
    let shared = summarise(&drains, "shared");
    let pinned = pinning.as_ref().map(|_| summarise(&drains, "pinned"));
    Ok(DeliveryResult {
        rows: config.rows,
        concurrency: config.concurrency,
        drains,
        shared,
        pinned,
        pinning: pinning.map(|p| {
            format!(
                "agentex-auth-dev on CPU {}, PostgreSQL, workers and load generator on CPU {}",
                p.server, p.rest
            )
        }),
    })
}

/// One drain of each variant in one CPU arrangement.
async fn round_of(
    env: &Env,
    pool: &sqlx::PgPool,
    config: &Config,
    round: usize,
    mode: &'static str,
    pin: Option<&Pinning>,
    drains: &mut Vec<Drain>,
) -> anyhow::Result<()> {
    let server_cpus = pin.map(|p| p.server.as_str());
    let rest_cpus = pin.map(|p| p.rest.as_str());
    for (variant, workers) in [(DIRECT, 0), (ONE, 1), (TWO, 2)] {
        env.reset(pool).await?;
        let prefix = format!("d{round}{workers}{}", &mode[..1]);
        if workers > 0 {
            env.enqueue_registers(pool, &prefix, config.rows).await?;
        }
        let server = env.spawn_auth_dev(server_cpus).await?;
        let commits_before = commits(pool).await?;
        let seconds = if workers == 0 {
            direct(&server.base_url, &prefix, config.rows, config.concurrency).await?
        } else {
            let s = through_workers(env, &server.base_url, workers, config, rest_cpus).await?;
            let delivered = delivered_count(pool).await?;
            if delivered != config.rows {
                bail!(
                    "{variant}: {delivered} of {} rows delivered ({:?})",
                    config.rows,
                    outbox_states(pool).await?
                );
            }
            s
        };
        server.stop().await;
        let commits_per_row = (commits(pool).await? - commits_before) as f64 / config.rows as f64;
        eprintln!(
            "  delivery round {round}, {mode}: {variant}: {:.0}/s",
            config.rows as f64 / seconds
        );
        drains.push(Drain {
            mode,
            variant: variant.into(),
            round,
            rows: config.rows,
            seconds,
            per_second: config.rows as f64 / seconds,
            commits_per_row,
        });
    }
    Ok(())
}

fn summarise(drains: &[Drain], mode: &str) -> ModeResult {
    let rate = |variant: &str| {
        let (rows, secs) = drains
            .iter()
            .filter(|d| d.mode == mode && d.variant == variant)
            .fold((0i64, 0.0), |(r, s), d| (r + d.rows, s + d.seconds));
        rows as f64 / secs
    };
    let (direct, one, two) = (rate(DIRECT), rate(ONE), rate(TWO));
    ModeResult {
        direct_per_second: direct,
        one_worker_per_second: one,
        two_workers_per_second: two,
        one_worker_ratio: one / direct,
        two_workers_ratio: two / direct,
    }
}

async fn direct(
    base_url: &str,
    prefix: &str,
    rows: i64,
    concurrency: usize,
) -> anyhow::Result<f64> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()?;
    let url = format!("{base_url}/v1/authz/register");
    let principal: serde_json::Value = serde_json::from_str(PRINCIPAL)?;
    let next = Arc::new(AtomicI64::new(1));
    let started = Instant::now();
    let mut clients = JoinSet::new();
    for _ in 0..concurrency {
        let (http, url, principal, next) =
            (http.clone(), url.clone(), principal.clone(), next.clone());
        let prefix = prefix.to_string();
        clients.spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n > rows {
                    return anyhow::Ok(());
                }
                let body = serde_json::json!({
                    "principal": principal,
                    "resource": {"type": "api_key", "selector": format!("{prefix}-{n}")},
                    "parent": {"type": "agent", "selector": AGENT},
                });
                http.post(&url)
                    .json(&body)
                    .send()
                    .await?
                    .error_for_status()?;
            }
        });
    }
    while let Some(client) = clients.join_next().await {
        client??;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// Runs `workers` `authz-outbox run --once` processes sharing `concurrency`;
/// returns the wall time until the last one exits.
async fn through_workers(
    env: &Env,
    auth_url: &str,
    workers: usize,
    config: &Config,
    cpus: Option<&str>,
) -> anyhow::Result<f64> {
    let per_worker = (config.concurrency / workers).max(1);
    let started = Instant::now();
    let mut children = Vec::new();
    for _ in 0..workers {
        children.push(env.spawn_worker(
            auth_url,
            per_worker,
            config.batch_size,
            true,
            free_port()?,
            cpus,
        )?);
    }
    for mut child in children {
        let status = child.wait().await?;
        if !status.success() {
            bail!("authz-outbox run --once exited with {status}");
        }
    }
    Ok(started.elapsed().as_secs_f64())
}
