//! The write path for Rust writers: key and agent rows committed together
//! with their outbox rows, in one transaction.
//!
//! The capture itself is done by triggers (see `migrations/`), so the Python
//! host service and manual SQL are covered too; what this module adds is the
//! one line every writer must run — `set_config('authz_outbox.principal', …,
//! true)` — and [`wait_until_delivered`], the read-your-writes the old inline
//! register gave, without its orphans.

use std::time::Duration;

use rand::RngCore;
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::domain::{ApiKeyType, Principal};

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("agent {0:?} does not exist")]
    UnknownAgent(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// A key to create. `secret` is generated when `None`.
#[derive(Debug, Clone)]
pub struct NewApiKey {
    pub agent_id: String,
    pub name: String,
    pub key_type: ApiKeyType,
    pub secret: Option<String>,
}

/// A created key. `secret` is returned once, here, and never logged.
pub struct CreatedApiKey {
    pub id: String,
    pub agent_id: String,
    pub secret: String,
    /// The outbox row that registers it (dead if no creator was given).
    pub outbox_id: i64,
}

impl std::fmt::Debug for CreatedApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedApiKey")
            .field("id", &self.id)
            .field("agent_id", &self.agent_id)
            .field("secret", &"<redacted>")
            .field("outbox_id", &self.outbox_id)
            .finish()
    }
}

/// Sets the creator for the captures of this transaction. With `None` the
/// setting is left alone, so a role or database default (or its absence,
/// which the trigger records as a dead row) applies.
pub async fn set_principal(
    tx: &mut Transaction<'_, Postgres>,
    principal: Option<&Principal>,
) -> Result<(), sqlx::Error> {
    if let Some(principal) = principal {
        sqlx::query("SELECT set_config('authz_outbox.principal', $1, true)")
            .bind(principal.to_json())
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// Creates a key row and its register row in one transaction.
///
/// This is the hot path of the host service, so it costs two round trips
/// and one commit: a single INSERT (atomic on its own, trigger included)
/// that also sets the creator for its own implicit transaction, then the
/// session's `currval` of the outbox sequence, which is the row the trigger
/// just added.
pub async fn create_api_key(
    pool: &PgPool,
    key: NewApiKey,
    principal: Option<&Principal>,
) -> Result<CreatedApiKey, CaptureError> {
    const INSERT: &str = r#"
        INSERT INTO agent_api_keys (id, agent_id, name, api_key_type, api_key)
        SELECT $1, $2, $3, $4::agentapikeytype, $5
        FROM (SELECT CASE WHEN $6::text IS NULL THEN NULL
                          ELSE set_config('authz_outbox.principal', $6, true) END) AS creator
    "#;
    let mut conn = pool.acquire().await?;
    let id = Uuid::new_v4().to_string();
    let secret = key.secret.unwrap_or_else(generate_secret);
    sqlx::query(INSERT)
        .bind(&id)
        .bind(&key.agent_id)
        .bind(&key.name)
        .bind(key.key_type.as_db())
        .bind(&secret)
        .bind(principal.map(Principal::to_json))
        .execute(&mut *conn)
        .await
        .map_err(|e| insert_error(e, &key.agent_id))?;
    let outbox_id: i64 = sqlx::query_scalar("SELECT currval('authz_outbox_id_seq')")
        .fetch_one(&mut *conn)
        .await?;
    Ok(CreatedApiKey {
        id,
        agent_id: key.agent_id,
        secret,
        outbox_id,
    })
}

fn insert_error(e: sqlx::Error, agent_id: &str) -> CaptureError {
    match e.as_database_error().and_then(|d| d.code()) {
        Some(code) if code == "23503" => CaptureError::UnknownAgent(agent_id.to_string()),
        _ => CaptureError::Database(e),
    }
}

/// [`create_api_key`] inside a caller's transaction: nothing is captured
/// unless that transaction commits.
pub async fn create_api_key_in(
    tx: &mut Transaction<'_, Postgres>,
    key: NewApiKey,
    principal: Option<&Principal>,
) -> Result<CreatedApiKey, CaptureError> {
    set_principal(tx, principal).await?;
    let id = Uuid::new_v4().to_string();
    let secret = key.secret.unwrap_or_else(generate_secret);
    sqlx::query(
        "INSERT INTO agent_api_keys (id, agent_id, name, api_key_type, api_key)
         VALUES ($1, $2, $3, $4::agentapikeytype, $5)",
    )
    .bind(&id)
    .bind(&key.agent_id)
    .bind(&key.name)
    .bind(key.key_type.as_db())
    .bind(&secret)
    .execute(&mut **tx)
    .await
    .map_err(|e| insert_error(e, &key.agent_id))?;
    let outbox_id = latest_outbox_id(tx, "api_key", &id).await?;
    Ok(CreatedApiKey {
        id,
        agent_id: key.agent_id,
        secret,
        outbox_id,
    })
}

/// Creates an agent row (in the host's shape: `status` READY, an empty
/// description) and its register row in one transaction.
pub async fn create_agent(
    pool: &PgPool,
    id: &str,
    name: &str,
    principal: Option<&Principal>,
) -> Result<i64, CaptureError> {
    let mut tx = pool.begin().await?;
    set_principal(&mut tx, principal).await?;
    sqlx::query("INSERT INTO agents (id, name, description, status) VALUES ($1, $2, '', 'READY')")
        .bind(id)
        .bind(name)
        .execute(&mut *tx)
        .await
        .map_err(|e| match e.as_database_error().and_then(|d| d.code()) {
            Some(code) if code == "23505" => CaptureError::AlreadyExists(format!("agent {id:?}")),
            _ => CaptureError::Database(e),
        })?;
    let outbox_id = latest_outbox_id(&mut tx, "agent", id).await?;
    tx.commit().await?;
    Ok(outbox_id)
}

/// Deletes a key by id. Returns the outbox ids of the deregisters enqueued
/// (empty when no such key existed).
pub async fn delete_api_key(
    pool: &PgPool,
    id: &str,
    principal: Option<&Principal>,
) -> Result<Vec<i64>, CaptureError> {
    let mut tx = pool.begin().await?;
    set_principal(&mut tx, principal).await?;
    let deleted: Vec<String> =
        sqlx::query_scalar("DELETE FROM agent_api_keys WHERE id = $1 RETURNING id")
            .bind(id)
            .fetch_all(&mut *tx)
            .await?;
    let ids = deregisters_for(&mut tx, &deleted).await?;
    tx.commit().await?;
    Ok(ids)
}

/// Deletes keys by (agent, name, type), the host's other delete path.
pub async fn delete_api_key_by_name(
    pool: &PgPool,
    agent_id: &str,
    name: &str,
    key_type: ApiKeyType,
    principal: Option<&Principal>,
) -> Result<Vec<i64>, CaptureError> {
    let mut tx = pool.begin().await?;
    set_principal(&mut tx, principal).await?;
    let deleted: Vec<String> = sqlx::query_scalar(
        "DELETE FROM agent_api_keys
         WHERE agent_id = $1 AND name = $2 AND api_key_type = $3::agentapikeytype
         RETURNING id",
    )
    .bind(agent_id)
    .bind(name)
    .bind(key_type.as_db())
    .fetch_all(&mut *tx)
    .await?;
    let ids = deregisters_for(&mut tx, &deleted).await?;
    tx.commit().await?;
    Ok(ids)
}

async fn deregisters_for(
    tx: &mut Transaction<'_, Postgres>,
    key_ids: &[String],
) -> Result<Vec<i64>, sqlx::Error> {
    let mut ids = Vec::with_capacity(key_ids.len());
    for key_id in key_ids {
        ids.push(latest_outbox_id(tx, "api_key", key_id).await?);
    }
    Ok(ids)
}

/// The newest outbox row of a resource, as seen inside the writing
/// transaction: the one its trigger just added.
async fn latest_outbox_id(
    tx: &mut Transaction<'_, Postgres>,
    resource_type: &str,
    resource_id: &str,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT max(id) FROM authz_outbox WHERE resource_type = $1 AND resource_id = $2",
    )
    .bind(resource_type)
    .bind(resource_id)
    .fetch_one(&mut **tx)
    .await
}

/// 32 random bytes, hex encoded, prefixed so a leaked key is recognisable.
fn generate_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("agx_{hex}")
}

/// Where an outbox row ended up, as a waiting writer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryState {
    Delivered,
    Superseded,
    Dead { error: String },
}

#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error("outbox row {0} does not exist")]
    NoSuchRow(i64),
    #[error("outbox row {id} was not delivered within {timeout:?}")]
    Timeout { id: i64, timeout: Duration },
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// Read-your-writes with a token: waits as [`wait_until_delivered`] does,
/// then returns the row's `consistency_token` as well — the ZedToken of the
/// write that delivered it (SpiceDB target) or agentex-auth's token — so a
/// caller can ask SpiceDB for results at least as fresh as its own write
/// (`Consistency::AtLeastAsFresh`).
pub async fn wait_for_consistency_token(
    pool: &PgPool,
    outbox_id: i64,
    timeout: Duration,
) -> Result<(DeliveryState, Option<String>), WaitError> {
    let state = wait_until_delivered(pool, outbox_id, timeout).await?;
    let token: Option<String> =
        sqlx::query_scalar("SELECT consistency_token FROM authz_outbox WHERE id = $1")
            .bind(outbox_id)
            .fetch_optional(pool)
            .await?
            .flatten();
    Ok((state, token))
}

/// Waits until the worker has finished with an outbox row, polling with a
/// short, growing interval. Delivery normally takes milliseconds, so the
/// first checks are close together.
pub async fn wait_until_delivered(
    pool: &PgPool,
    outbox_id: i64,
    timeout: Duration,
) -> Result<DeliveryState, WaitError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut interval = Duration::from_millis(2);
    loop {
        let row: Option<(String, Option<String>)> =
            sqlx::query_as("SELECT state, last_error FROM authz_outbox WHERE id = $1")
                .bind(outbox_id)
                .fetch_optional(pool)
                .await?;
        match row {
            None => return Err(WaitError::NoSuchRow(outbox_id)),
            Some((state, error)) => match state.as_str() {
                "delivered" => return Ok(DeliveryState::Delivered),
                "superseded" => return Ok(DeliveryState::Superseded),
                "dead" => {
                    return Ok(DeliveryState::Dead {
                        error: error.unwrap_or_default(),
                    });
                }
                _ => {}
            },
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Err(WaitError::Timeout {
                id: outbox_id,
                timeout,
            });
        }
        tokio::time::sleep(interval.min(deadline - now)).await;
        interval = (interval * 2).min(Duration::from_millis(100));
    }
}
