//! Write path: the cost of creating one api key, three ways, at a fixed
//! client concurrency.
//!
//! - `capture`: this project, `authz_outbox::capture::create_api_key`
//!   (BEGIN; set the principal; INSERT, whose trigger adds the outbox row and
//!   notifies; read the outbox id; COMMIT).
//! - `plain`: the same row inserted into `plain_keys`, a copy of
//!   `agent_api_keys` made with `LIKE … INCLUDING ALL` plus the same foreign
//!   key but no trigger, in the same BEGIN; INSERT; COMMIT a host would run.
//! - `inline`: the seed's dual write: register over HTTP with a sink that
//!   answers after 5 ms, then the plain insert.
//!
//! Variants take turns in short rounds (the order rotating each round) so a
//! neighbour's compile slows all three alike.

use std::sync::Arc;
use std::time::{Duration, Instant};

use authz_outbox::capture::{NewApiKey, create_api_key};
use authz_outbox::domain::{ApiKeyType, Principal};
use rand::RngCore;
use serde::Serialize;
use sqlx::PgPool;
use tokio::task::JoinSet;

use super::env::{AGENT, Env, PRINCIPAL};
use super::sink::Sink;
use super::stats::Summary;

#[derive(Debug, Clone)]
pub struct Config {
    pub concurrency: usize,
    pub rounds: usize,
    pub round: Duration,
    /// How long the inline variant's remote register takes.
    pub remote_delay: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Variant {
    Capture,
    Plain,
    Inline,
}

pub const VARIANTS: [Variant; 3] = [Variant::Capture, Variant::Plain, Variant::Inline];

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::Capture => "capture",
            Variant::Plain => "plain",
            Variant::Inline => "inline",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct VariantResult {
    pub variant: Variant,
    pub operations: usize,
    pub seconds: f64,
    pub per_second: f64,
    pub latency: Summary,
    #[serde(skip)]
    pub samples_ms: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct WritePathResult {
    pub concurrency: usize,
    pub rounds: usize,
    pub round_seconds: f64,
    pub remote_delay_ms: f64,
    pub plain_table: &'static str,
    pub variants: Vec<VariantResult>,
    /// capture throughput / plain throughput.
    pub capture_vs_plain_throughput: f64,
    /// inline p50 / capture p50.
    pub inline_vs_capture_p50: f64,
}

struct Shared {
    pool: PgPool,
    http: reqwest::Client,
    register_url: String,
    principal: Principal,
}

pub async fn run(env: &Env, config: &Config) -> anyhow::Result<WritePathResult> {
    let pool = env.pool(config.concurrency as u32 + 2).await?;
    env.reset(&pool).await?;
    let sink = Sink::start(config.remote_delay).await?;
    let shared = Arc::new(Shared {
        pool: pool.clone(),
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(config.concurrency)
            .build()?,
        register_url: format!("{}/v1/authz/register", sink.base_url()),
        principal: Principal::parse(PRINCIPAL)?,
    });

    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); VARIANTS.len()];
    let mut elapsed = vec![Duration::ZERO; VARIANTS.len()];
    for round in 0..config.rounds {
        for turn in 0..VARIANTS.len() {
            let index = (round + turn) % VARIANTS.len();
            let started = Instant::now();
            let latencies = round_of(&shared, VARIANTS[index], config).await?;
            elapsed[index] += started.elapsed();
            samples[index].extend(latencies);
        }
    }

    let variants: Vec<VariantResult> = VARIANTS
        .iter()
        .zip(samples)
        .zip(elapsed)
        .map(|((&variant, samples_ms), time)| VariantResult {
            variant,
            operations: samples_ms.len(),
            seconds: time.as_secs_f64(),
            per_second: samples_ms.len() as f64 / time.as_secs_f64(),
            latency: Summary::of(&samples_ms),
            samples_ms,
        })
        .collect();
    let by = |v: Variant| variants.iter().find(|r| r.variant == v).expect("variant");
    let (capture, plain, inline) = (
        by(Variant::Capture),
        by(Variant::Plain),
        by(Variant::Inline),
    );
    Ok(WritePathResult {
        concurrency: config.concurrency,
        rounds: config.rounds,
        round_seconds: config.round.as_secs_f64(),
        remote_delay_ms: config.remote_delay.as_secs_f64() * 1000.0,
        plain_table: "plain_keys: LIKE agent_api_keys INCLUDING ALL + the same FK, no triggers",
        capture_vs_plain_throughput: capture.per_second / plain.per_second,
        inline_vs_capture_p50: inline.latency.p50_ms / capture.latency.p50_ms,
        variants,
    })
}

/// `concurrency` clients creating keys back to back for one round; returns
/// each creation's latency in ms.
async fn round_of(
    shared: &Arc<Shared>,
    variant: Variant,
    config: &Config,
) -> anyhow::Result<Vec<f64>> {
    let deadline = Instant::now() + config.round;
    let mut clients = JoinSet::new();
    for _ in 0..config.concurrency {
        let shared = shared.clone();
        clients.spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let started = Instant::now();
                create(&shared, variant).await?;
                latencies.push(started.elapsed().as_secs_f64() * 1000.0);
            }
            anyhow::Ok(latencies)
        });
    }
    let mut all = Vec::new();
    while let Some(client) = clients.join_next().await {
        all.extend(client??);
    }
    Ok(all)
}

async fn create(shared: &Shared, variant: Variant) -> anyhow::Result<()> {
    match variant {
        Variant::Capture => {
            let key = NewApiKey {
                agent_id: AGENT.into(),
                name: "bench".into(),
                key_type: ApiKeyType::External,
                secret: None,
            };
            create_api_key(&shared.pool, key, Some(&shared.principal)).await?;
        }
        Variant::Plain => plain_insert(&shared.pool, &uuid::Uuid::new_v4().to_string()).await?,
        Variant::Inline => {
            // The seed: register first (fail-closed), then write the row.
            let id = uuid::Uuid::new_v4().to_string();
            let body = serde_json::json!({
                "principal": serde_json::from_str::<serde_json::Value>(PRINCIPAL)?,
                "resource": {"type": "api_key", "selector": id},
                "parent": {"type": "agent", "selector": AGENT},
            });
            shared
                .http
                .post(&shared.register_url)
                .json(&body)
                .send()
                .await?
                .error_for_status()?;
            plain_insert(&shared.pool, &id).await?;
        }
    }
    Ok(())
}

async fn plain_insert(pool: &PgPool, id: &str) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO plain_keys (id, agent_id, name, api_key_type, api_key)
         VALUES ($1, $2, $3, $4::agentapikeytype, $5)",
    )
    .bind(id)
    .bind(AGENT)
    .bind("bench")
    .bind("EXTERNAL")
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
