//! Connecting to PostgreSQL and applying the embedded migrations.

use std::time::Duration;

use sqlx::PgPool;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::mapping::Mappings;
use crate::mapping::install::{Change, InstallError};

/// The migrations in `migrations/`, compiled into the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("invalid DATABASE_URL: {0}")]
    BadUrl(String),
    #[error("cannot connect to PostgreSQL: {0}")]
    Connect(String),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(transparent)]
    Mappings(#[from] InstallError),
    #[error("database error: {0}")]
    Query(#[from] sqlx::Error),
}

/// Opens a pool. The URL is parsed first so a typo is reported as such, and
/// the password never appears in the error.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, DbError> {
    let options: PgConnectOptions = url
        .parse()
        .map_err(|e: sqlx::Error| DbError::BadUrl(redact(&e.to_string(), url)))?;
    open(url, options, max_connections).await
}

/// Opens a pool for `migrate`: PostgreSQL's notices ("… does not exist,
/// skipping") stay on the server, so an operator sees one line per change.
pub async fn connect_quiet(url: &str, max_connections: u32) -> Result<PgPool, DbError> {
    let options: PgConnectOptions = url
        .parse()
        .map_err(|e: sqlx::Error| DbError::BadUrl(redact(&e.to_string(), url)))?;
    open(
        url,
        options.options([("client_min_messages", "warning")]),
        max_connections,
    )
    .await
}

/// Opens the worker's pool, whose own commits (claims, outcomes) do not wait
/// for the WAL flush.
///
/// Safe because a crash can only lose a *suffix* of the WAL: a lost outcome
/// takes every later claim with it, so a row whose "delivered" was lost is
/// pending again together with everything claimed after it, and is simply
/// delivered again (register and deregister are idempotent), still in order.
/// Captured rows are written by the host's own, durable, transactions.
pub async fn connect_worker(url: &str, max_connections: u32) -> Result<PgPool, DbError> {
    let options: PgConnectOptions = url
        .parse()
        .map_err(|e: sqlx::Error| DbError::BadUrl(redact(&e.to_string(), url)))?;
    open(
        url,
        options.options([("synchronous_commit", "off")]),
        max_connections,
    )
    .await
}

async fn open(
    url: &str,
    options: PgConnectOptions,
    max_connections: u32,
) -> Result<PgPool, DbError> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .map_err(|e| DbError::Connect(redact(&e.to_string(), url)))
}

/// What `migrate` did: the migrations it applied and the mapping changes
/// it installed. Both empty when the database was already up to date.
#[derive(Debug, Default)]
pub struct MigrateReport {
    pub migrations: Vec<String>,
    pub mappings: Vec<Change>,
}

/// Applies the embedded migrations, then installs the built-in mappings.
pub async fn migrate(pool: &PgPool) -> Result<MigrateReport, DbError> {
    migrate_with(pool, &Mappings::builtin()).await
}

/// Applies the embedded migrations, then makes the installed capture match
/// `mappings` (see [`crate::mapping::install`]).
pub async fn migrate_with(pool: &PgPool, mappings: &Mappings) -> Result<MigrateReport, DbError> {
    let before = applied_versions(pool).await?;
    MIGRATOR.run(pool).await?;
    let after = applied_versions(pool).await?;
    let migrations = MIGRATOR
        .iter()
        .filter(|m| after.contains(&m.version) && !before.contains(&m.version))
        .map(|m| format!("{} {}", m.version, m.description))
        .collect();
    let mappings = crate::mapping::install::install(pool, mappings).await?;
    Ok(MigrateReport {
        migrations,
        mappings,
    })
}

async fn applied_versions(pool: &PgPool) -> Result<Vec<i64>, sqlx::Error> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(pool)
        .await?;
    if !exists {
        return Ok(Vec::new());
    }
    sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
        .fetch_all(pool)
        .await
}

/// Removes the URL (which may hold a password) from a driver message.
fn redact(message: &str, url: &str) -> String {
    let mut out = message.replace(url, "<DATABASE_URL>");
    if let Ok(parsed) = url::Url::parse(url)
        && let Some(password) = parsed.password()
        && !password.is_empty()
    {
        out = out.replace(password, "<redacted>");
    }
    out
}
