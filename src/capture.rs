//! The write path for Rust writers: key and agent rows committed together
//! with their outbox rows, in one transaction.
//!
//! The capture itself is done by triggers (see `migrations/`), so the Python
//! host service and manual SQL are covered too; what this module adds is the
//! one line every writer must run — `set_config('authz_outbox.principal', …,
//! true)` — and [`wait_for_resource`] / [`wait_until_delivered`], the
//! read-your-writes the old inline register gave, without its orphans.

use std::time::Duration;

use rand::RngCore;
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::domain::{ApiKeyType, Principal, ResourceRef};

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("agent {0:?} does not exist")]
    UnknownAgent(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// A key to create. `secret` is generated when `None`. Its `Debug` never
/// shows the secret.
#[derive(Clone)]
pub struct NewApiKey {
    pub agent_id: String,
    pub name: String,
    pub key_type: ApiKeyType,
    pub secret: Option<String>,
}

impl std::fmt::Debug for NewApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewApiKey")
            .field("agent_id", &self.agent_id)
            .field("name", &self.name)
            .field("key_type", &self.key_type)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .finish()
    }
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
    // Through a function of ours: the writer has no grant on the outbox.
    let outbox_id: i64 = sqlx::query_scalar("SELECT authz_outbox_last_captured_id()")
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
    // Through a function of ours: the writer has no grant on the outbox.
    let id: Option<i64> = sqlx::query_scalar("SELECT authz_outbox_captured_id($1, $2)")
        .bind(resource_type)
        .bind(resource_id)
        .fetch_one(&mut **tx)
        .await?;
    id.ok_or_else(|| {
        sqlx::Error::Protocol(format!(
            "the write to {resource_type}:{resource_id} captured no outbox row"
        ))
    })
}

/// 32 random bytes, hex encoded, prefixed so a leaked key is recognisable.
fn generate_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("agx_{hex}")
}

/// Where a resource's (or an outbox row's) delivery ended up, as a waiting
/// writer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryState {
    /// Nothing pending; the newest row reached agentex-auth.
    Delivered,
    /// Nothing pending; the newest row was settled without a request (say,
    /// a key created and deleted before any delivery).
    Superseded,
    /// The newest row is dead; answered as soon as it is seen.
    Dead { error: String },
}

#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error("outbox row {0} does not exist")]
    NoSuchRow(i64),
    /// The resource has no outbox row at all: it was never captured (wrong
    /// type or id?), or its rows were pruned after retention.
    #[error("{0} has no outbox row")]
    NothingCaptured(ResourceRef),
    /// Still pending when the timeout passed: the worker may be slow or
    /// down; the write itself stands and will be delivered.
    #[error("{resource} still pending (outbox row {outbox_id}) after {timeout:?}")]
    Timeout {
        resource: String,
        outbox_id: i64,
        timeout: Duration,
    },
    /// The database refused to wait: the caller's transaction could never
    /// see the worker's progress (REPEATABLE READ or SERIALIZABLE, or a
    /// transaction that has written).
    #[error("cannot wait here: {0}")]
    Refused(String),
    #[error("timeout {0:?} is longer than the 5 minutes a wait may take")]
    TimeoutTooLong(Duration),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// The longest wait `authz_outbox_wait_for_resource` accepts.
pub const MAX_WAIT: Duration = Duration::from_secs(300);

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
    wait_for_row(pool, outbox_id, timeout).await
}

/// Waits until the worker has finished with an outbox row: the row is
/// delivered, superseded or dead. A later change to the same resource does
/// not lengthen the wait.
///
/// The waiting happens in PostgreSQL (`authz_outbox_wait_for_row`, which
/// waits as `authz_outbox_wait_for_resource` does through this row's id),
/// so it is one round trip, not a client-side loop, and the writer needs
/// EXECUTE on that function, no grant on the outbox.
pub async fn wait_until_delivered(
    pool: &PgPool,
    outbox_id: i64,
    timeout: Duration,
) -> Result<DeliveryState, WaitError> {
    wait_for_row(pool, outbox_id, timeout)
        .await
        .map(|(state, _)| state)
}

async fn wait_for_row(
    pool: &PgPool,
    outbox_id: i64,
    timeout: Duration,
) -> Result<(DeliveryState, Option<String>), WaitError> {
    if timeout > MAX_WAIT {
        return Err(WaitError::TimeoutTooLong(timeout));
    }
    type Row = (
        String,
        Option<String>,
        Option<String>,
        Option<i64>,
        Option<String>,
        Option<String>,
    );
    let (outcome, error, token, pending_id, resource_type, resource_id): Row = sqlx::query_as(
        "SELECT outcome, error, consistency_token, outbox_id, resource_type, resource_id
         FROM authz_outbox_wait_for_row($1, $2 * interval '1 second')",
    )
    .bind(outbox_id)
    .bind(timeout.as_secs_f64())
    .fetch_one(pool)
    .await
    .map_err(refusal)?;
    let state = match outcome.as_str() {
        "delivered" => DeliveryState::Delivered,
        "superseded" => DeliveryState::Superseded,
        "dead" => DeliveryState::Dead {
            error: error.unwrap_or_default(),
        },
        "timeout" => {
            return Err(WaitError::Timeout {
                resource: format!(
                    "{}:{}",
                    resource_type.unwrap_or_default(),
                    resource_id.unwrap_or_default()
                ),
                outbox_id: pending_id.unwrap_or(outbox_id),
                timeout,
            });
        }
        // No such row, or pruned while we looked: it had finished.
        "none" => return Err(WaitError::NoSuchRow(outbox_id)),
        other => {
            return Err(WaitError::Database(sqlx::Error::Protocol(format!(
                "authz_outbox_wait_for_row answered an unknown outcome {other:?}"
            ))));
        }
    };
    Ok((state, token))
}

/// Read-your-writes by resource: waits until `resource` has nothing pending
/// in the outbox, i.e. its newest captured change has been delivered (or
/// settled otherwise), without knowing any outbox id.
///
/// A dead newest row answers at once with its error; a pending one that
/// outlasts `timeout` (at most [`MAX_WAIT`]) is [`WaitError::Timeout`].
pub async fn wait_for_resource(
    pool: &PgPool,
    resource: &ResourceRef,
    timeout: Duration,
) -> Result<DeliveryState, WaitError> {
    let kind = resource.kind.as_str();
    match wait_sql(pool, kind, &resource.selector, None, timeout).await? {
        Answer::Nothing => Err(WaitError::NothingCaptured(resource.clone())),
        Answer::Finished(state) => Ok(state),
        Answer::Pending { outbox_id } => Err(WaitError::Timeout {
            resource: resource.to_string(),
            outbox_id,
            timeout,
        }),
    }
}

/// What `authz_outbox_wait_for_resource` answered.
enum Answer {
    Finished(DeliveryState),
    Pending { outbox_id: i64 },
    Nothing,
}

async fn wait_sql(
    pool: &PgPool,
    resource_type: &str,
    resource_id: &str,
    through_id: Option<i64>,
    timeout: Duration,
) -> Result<Answer, WaitError> {
    if timeout > MAX_WAIT {
        return Err(WaitError::TimeoutTooLong(timeout));
    }
    let row: (String, Option<String>, Option<i64>) = sqlx::query_as(
        "SELECT outcome, error, outbox_id
         FROM authz_outbox_wait_for_resource($1, $2, $3 * interval '1 second', $4)",
    )
    .bind(resource_type)
    .bind(resource_id)
    .bind(timeout.as_secs_f64())
    .bind(through_id)
    .fetch_one(pool)
    .await
    .map_err(refusal)?;
    let (outcome, error, outbox_id) = row;
    Ok(match outcome.as_str() {
        "delivered" => Answer::Finished(DeliveryState::Delivered),
        "superseded" => Answer::Finished(DeliveryState::Superseded),
        "dead" => Answer::Finished(DeliveryState::Dead {
            error: error.unwrap_or_default(),
        }),
        "timeout" => Answer::Pending {
            outbox_id: outbox_id.unwrap_or_default(),
        },
        "none" => Answer::Nothing,
        other => {
            return Err(WaitError::Database(sqlx::Error::Protocol(format!(
                "authz_outbox_wait_for_resource answered an unknown outcome {other:?}"
            ))));
        }
    })
}

/// The function's "cannot wait in this transaction" (SQLSTATE 25000) as
/// its own kind, so a caller can tell a misuse from a failing database.
fn refusal(e: sqlx::Error) -> WaitError {
    match e.as_database_error() {
        Some(d) if d.code().as_deref() == Some("25000") => {
            WaitError::Refused(d.message().to_string())
        }
        _ => WaitError::Database(e),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_new_keys_debug_never_shows_its_secret() {
        let key = super::NewApiKey {
            agent_id: "a1".into(),
            name: "ci".into(),
            key_type: crate::domain::ApiKeyType::External,
            secret: Some("agx_topsecret".into()),
        };
        let shown = format!("{key:?}");
        assert!(
            !shown.contains("topsecret") && shown.contains("<redacted>"),
            "{shown}"
        );
    }
}
