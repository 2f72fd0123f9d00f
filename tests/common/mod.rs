//! The one test harness: fresh databases come from `#[sqlx::test]` (each test
//! gets its own, migrated with the embedded migrations); this module adds the
//! fixtures and a scripted agentex-auth for exact status-code cases.
#![allow(dead_code)]

pub mod scripted_auth;

use std::time::Duration;

use authz_outbox::auth_client::AuthClient;
use authz_outbox::capture::{self, NewApiKey};
use authz_outbox::config::WorkerConfig;
use authz_outbox::delivery::{RunReport, Worker};
use authz_outbox::domain::{ApiKeyType, Principal};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub fn principal(user: &str) -> Principal {
    Principal::parse(&format!(r#"{{"user_id":"{user}"}}"#)).expect("valid principal")
}

pub async fn agent(pool: &PgPool, id: &str) {
    capture::create_agent(pool, id, &format!("agent {id}"), Some(&principal("u1")))
        .await
        .expect("agent created");
}

pub async fn key(pool: &PgPool, agent_id: &str, name: &str) -> capture::CreatedApiKey {
    capture::create_api_key(
        pool,
        NewApiKey {
            agent_id: agent_id.into(),
            name: name.into(),
            key_type: ApiKeyType::External,
            secret: Some(format!("secret-{name}")),
        },
        Some(&principal("u1")),
    )
    .await
    .expect("key created")
}

/// One outbox row, as tests look at it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Row {
    pub id: i64,
    pub resource_type: String,
    pub resource_id: String,
    pub parent_id: Option<String>,
    pub operation: String,
    pub state: String,
    pub attempts: i32,
    pub principal: Option<serde_json::Value>,
    pub last_error: Option<String>,
    pub last_status: Option<i32>,
    pub consistency_token: Option<String>,
    pub locked_by: Option<String>,
}

pub async fn rows(pool: &PgPool) -> Vec<Row> {
    sqlx::query_as(
        "SELECT id, resource_type, resource_id, parent_id, operation, state, attempts, principal,
                last_error, last_status, consistency_token, locked_by
         FROM authz_outbox ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .expect("outbox readable")
}

pub async fn row(pool: &PgPool, id: i64) -> Row {
    rows(pool)
        .await
        .into_iter()
        .find(|r| r.id == id)
        .expect("row exists")
}

/// A config for tests: fast backoff, short poll.
pub fn config(worker_id: &str) -> WorkerConfig {
    WorkerConfig {
        worker_id: worker_id.into(),
        concurrency: 8,
        batch_size: 16,
        lease: Duration::from_secs(6),
        request_timeout: Duration::from_secs(2),
        backoff_base: Duration::from_millis(10),
        backoff_cap: Duration::from_millis(100),
        poll_interval: Duration::from_millis(50),
        shutdown_timeout: Duration::from_secs(5),
        ..WorkerConfig::default()
    }
}

pub fn worker(pool: &PgPool, url: &str, config: WorkerConfig) -> Worker {
    let client = AuthClient::new(url, None, config.request_timeout, config.concurrency)
        .expect("client builds");
    Worker::new(pool.clone(), client, config).expect("valid config")
}

/// `run --once`.
pub async fn run_once(pool: &PgPool, url: &str, config: WorkerConfig) -> RunReport {
    worker(pool, url, config)
        .run(CancellationToken::new(), true)
        .await
}

/// Makes every pending row due now (skips the backoff wait in tests).
pub async fn make_due(pool: &PgPool) {
    sqlx::query("UPDATE authz_outbox SET next_attempt_at = now() WHERE state = 'pending'")
        .execute(pool)
        .await
        .expect("update");
}
