//! Delivery targets: how much of the SpiceDB engine's own write capacity
//! `run --target spicedb` uses, with and without batching, next to the same
//! drain through agentex-auth-dev's HTTP API.
//!
//! Each drain starts a fresh agentex-auth-dev (a fresh in-memory engine)
//! and writes `rows` api keys' relationships (owner + parent_agent, two per
//! key) one of five ways, taking turns over `rounds`:
//!
//! - **direct, 1 row per call**: a load generator with `concurrency`
//!   `WriteRelationships` in flight on the gRPC port, one key's two TOUCHes
//!   per call — the engine's capacity for what the unbatched worker sends;
//! - **direct, `batch` rows per call**: the same with `batch` keys per call
//!   — the capacity for what the batching worker sends;
//! - **worker, `--spicedb-batch 1`** and **worker, `--spicedb-batch B`**:
//!   `authz-outbox run --once --target spicedb --concurrency C` draining the
//!   outbox (claims, records, the swap lookups: the whole product path);
//! - **worker, agentex-auth**: `--target agentex-auth`, the same rows
//!   through agentex-auth-dev's HTTP API into the same kind of engine.
//!
//! Each round runs twice: every process free to use every CPU ("shared"),
//! and agentex-auth-dev alone on one CPU with PostgreSQL, the worker and the
//! load generator on the others ("pinned", see [`Pinning`]). Shared, on a
//! two-core machine, the direct generator costs the engine almost nothing
//! while the worker path runs PostgreSQL and a worker process on the
//! engine's cores; pinned, the engine has the same CPU in both variants and
//! the ratio says whether the worker keeps it busy, as it would a SpiceDB on
//! machines of its own.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use spicedb_grpc_tonic::v1::permissions_service_client::PermissionsServiceClient;
use spicedb_grpc_tonic::v1::relationship_update::Operation;
use spicedb_grpc_tonic::v1::{
    ObjectReference, Relationship, RelationshipUpdate, SubjectReference, WriteRelationshipsRequest,
};
use tokio::process::{Child, Command};
use tokio::task::JoinSet;

use super::env::{AGENT, Env, delivered_count, free_port, outbox_states, terminate, wait_for_port};
use super::pinning::Pinning;

#[derive(Debug, Clone)]
pub struct Config {
    pub rows: i64,
    pub concurrency: usize,
    pub rounds: usize,
    /// `--spicedb-batch` of the batching variant (and keys per direct batched call).
    pub batch: usize,
    /// `--batch-size` (rows per claim) of every worker.
    pub batch_size: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Drain {
    /// "shared" or "pinned".
    pub mode: &'static str,
    pub variant: String,
    pub round: usize,
    pub rows: i64,
    pub seconds: f64,
    pub per_second: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TargetResult {
    pub rows: i64,
    pub concurrency: usize,
    pub batch: usize,
    pub drains: Vec<Drain>,
    /// Every process free to use every CPU.
    #[serde(flatten)]
    pub shared: TargetMode,
    /// agentex-auth-dev alone on one CPU; `None` where pinning is unavailable.
    pub pinned: Option<TargetMode>,
    pub pinning: Option<String>,
}

/// The variants' rates in one CPU arrangement, over all rounds.
#[derive(Debug, Clone, Serialize)]
pub struct TargetMode {
    pub direct_per_second: f64,
    pub direct_batched_per_second: f64,
    pub spicedb_per_second: f64,
    pub spicedb_batched_per_second: f64,
    pub agentex_auth_per_second: f64,
    /// Worker unbatched / direct unbatched (target ≥ 0.9).
    pub spicedb_ratio: f64,
    /// Worker batched / direct batched (target ≥ 0.9).
    pub spicedb_batched_ratio: f64,
}

const DIRECT: &str = "direct gRPC, 1 row per call";
const DIRECT_BATCHED: &str = "direct gRPC, batched";
const SPICEDB: &str = "run --target spicedb --spicedb-batch 1";
const SPICEDB_BATCHED: &str = "run --target spicedb (batched)";
const AGENTEX: &str = "run --target agentex-auth";

pub async fn run(env: &Env, config: &Config) -> anyhow::Result<TargetResult> {
    let pool = env.pool(4).await?;
    let pinning = Pinning::for_this_machine();
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
    Ok(TargetResult {
        rows: config.rows,
        concurrency: config.concurrency,
        batch: config.batch,
        shared: summarise(&drains, "shared"),
        pinned: pinning.as_ref().map(|_| summarise(&drains, "pinned")),
        pinning: pinning.map(|p| {
            format!(
                "agentex-auth-dev on CPU {}, PostgreSQL, the worker and the load generator on CPU {}",
                p.server, p.rest
            )
        }),
        drains,
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
    for variant in [DIRECT, SPICEDB, DIRECT_BATCHED, SPICEDB_BATCHED, AGENTEX] {
        env.reset(pool).await?;
        let prefix = format!("t{round}{}{}", &mode[..1], variant.len());
        let worker = !variant.starts_with("direct");
        if worker {
            env.enqueue_registers(pool, &prefix, config.rows).await?;
        }
        let server = Engine::start(env, server_cpus).await?;
        let drain = |batch| drain(env, &server, config, batch, rest_cpus);
        let seconds = match variant {
            DIRECT => direct(&server.grpc, &prefix, config.rows, config.concurrency, 1).await?,
            DIRECT_BATCHED => {
                direct(
                    &server.grpc,
                    &prefix,
                    config.rows,
                    config.concurrency,
                    config.batch,
                )
                .await?
            }
            SPICEDB => drain(Some(1)).await?,
            SPICEDB_BATCHED => drain(Some(config.batch)).await?,
            _ => drain(None).await?,
        };
        server.stop().await;
        if worker {
            let delivered = delivered_count(pool).await?;
            if delivered != config.rows {
                bail!(
                    "{variant}: {delivered} of {} rows delivered ({:?})",
                    config.rows,
                    outbox_states(pool).await?
                );
            }
        }
        eprintln!(
            "  target round {round}, {mode}: {variant}: {:.0}/s",
            config.rows as f64 / seconds
        );
        drains.push(Drain {
            mode,
            variant: variant.into(),
            round,
            rows: config.rows,
            seconds,
            per_second: config.rows as f64 / seconds,
        });
    }
    Ok(())
}

fn summarise(drains: &[Drain], mode: &str) -> TargetMode {
    let rate = |variant: &str| {
        let (rows, secs) = drains
            .iter()
            .filter(|d| d.mode == mode && d.variant == variant)
            .fold((0i64, 0.0), |(r, s), d| (r + d.rows, s + d.seconds));
        rows as f64 / secs
    };
    TargetMode {
        direct_per_second: rate(DIRECT),
        direct_batched_per_second: rate(DIRECT_BATCHED),
        spicedb_per_second: rate(SPICEDB),
        spicedb_batched_per_second: rate(SPICEDB_BATCHED),
        agentex_auth_per_second: rate(AGENTEX),
        spicedb_ratio: rate(SPICEDB) / rate(DIRECT),
        spicedb_batched_ratio: rate(SPICEDB_BATCHED) / rate(DIRECT_BATCHED),
    }
}

/// A fresh agentex-auth-dev: its HTTP base URL and its gRPC endpoint.
struct Engine {
    child: Child,
    http: String,
    grpc: String,
}

impl Engine {
    async fn start(env: &Env, cpus: Option<&str>) -> anyhow::Result<Engine> {
        let (http, grpc) = (free_port()?, free_port()?);
        let mut cmd = match cpus {
            Some(cpus) => Pinning::command(cpus, &env.auth_dev()),
            None => Command::new(env.auth_dev()),
        };
        let child = cmd
            .args(["--listen", &format!("127.0.0.1:{http}")])
            .args(["--grpc-listen", &format!("127.0.0.1:{grpc}")])
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting agentex-auth-dev")?;
        wait_for_port(http, Duration::from_secs(30)).await?;
        wait_for_port(grpc, Duration::from_secs(30)).await?;
        Ok(Engine {
            child,
            http: format!("http://127.0.0.1:{http}"),
            grpc: format!("http://127.0.0.1:{grpc}"),
        })
    }

    async fn stop(mut self) {
        terminate(&mut self.child).await;
    }
}

/// One `run --once` process; `spicedb_batch` None: the agentex-auth target.
async fn drain(
    env: &Env,
    server: &Engine,
    config: &Config,
    spicedb_batch: Option<usize>,
    cpus: Option<&str>,
) -> anyhow::Result<f64> {
    // Batched, a claim must hold enough rows to fill every request in
    // flight, as the direct load generator does.
    let claim = match spicedb_batch {
        Some(batch) if batch > 1 => (config.concurrency * batch).clamp(config.batch_size, 1000),
        _ => config.batch_size,
    };
    let mut cmd = match cpus {
        Some(cpus) => Pinning::command(cpus, &env.authz_outbox()),
        None => Command::new(env.authz_outbox()),
    };
    cmd.args(["run", "--once"])
        .args(["--concurrency", &config.concurrency.to_string()])
        .args(["--batch-size", &claim.to_string()])
        .args(["--metrics-addr", &format!("127.0.0.1:{}", free_port()?)])
        .env("DATABASE_URL", &env.database_url)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true);
    match spicedb_batch {
        Some(batch) => cmd
            .args(["--target", "spicedb", "--spicedb-endpoint", &server.grpc])
            .args(["--spicedb-batch", &batch.to_string()]),
        None => cmd.args(["--agentex-auth-url", &server.http]),
    };
    let started = Instant::now();
    let status = cmd
        .spawn()
        .context("starting authz-outbox run")?
        .wait()
        .await?;
    if !status.success() {
        bail!("authz-outbox run --once exited with {status}");
    }
    Ok(started.elapsed().as_secs_f64())
}

/// `concurrency` writers, each `WriteRelationships` carrying `batch` keys'
/// owner and parent relationships, until `rows` keys are written.
async fn direct(
    endpoint: &str,
    prefix: &str,
    rows: i64,
    concurrency: usize,
    batch: usize,
) -> anyhow::Result<f64> {
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_string())?
        .connect()
        .await?;
    let next = Arc::new(AtomicI64::new(1));
    let started = Instant::now();
    let mut writers = JoinSet::new();
    for _ in 0..concurrency {
        let mut client = PermissionsServiceClient::new(channel.clone());
        let (next, prefix) = (next.clone(), prefix.to_string());
        writers.spawn(async move {
            loop {
                let first = next.fetch_add(batch as i64, Ordering::Relaxed);
                if first > rows {
                    return anyhow::Ok(());
                }
                let last = (first + batch as i64 - 1).min(rows);
                let updates = (first..=last)
                    .flat_map(|n| {
                        let id = format!("{prefix}-{n}");
                        [
                            touch(&id, "owner", "user", "bench-user"),
                            touch(&id, "parent_agent", "agent", AGENT),
                        ]
                    })
                    .collect();
                client
                    .write_relationships(WriteRelationshipsRequest {
                        updates,
                        ..Default::default()
                    })
                    .await?;
            }
        });
    }
    while let Some(writer) = writers.join_next().await {
        writer??;
    }
    Ok(started.elapsed().as_secs_f64())
}

fn touch(id: &str, relation: &str, subject_type: &str, subject_id: &str) -> RelationshipUpdate {
    RelationshipUpdate {
        operation: Operation::Touch as i32,
        relationship: Some(Relationship {
            resource: Some(ObjectReference {
                object_type: "api_key".into(),
                object_id: id.into(),
            }),
            relation: relation.into(),
            subject: Some(SubjectReference {
                object: Some(ObjectReference {
                    object_type: subject_type.into(),
                    object_id: subject_id.into(),
                }),
                optional_relation: String::new(),
            }),
            ..Default::default()
        }),
    }
}
