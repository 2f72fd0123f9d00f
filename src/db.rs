//! Connecting to PostgreSQL (the schema itself is `migrate`'s).

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

pub use crate::migrate::{MIGRATOR, migrate};

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("invalid DATABASE_URL: {0}")]
    BadUrl(String),
    #[error("cannot connect to PostgreSQL: {0}")]
    Connect(String),
}

/// Opens a pool. The URL is parsed first so a typo is reported as such, and
/// the password never appears in the error.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, DbError> {
    let options: PgConnectOptions = url
        .parse()
        .map_err(|e: sqlx::Error| DbError::BadUrl(redact(&e.to_string(), url)))?;
    open(url, options, max_connections, Duration::ZERO).await
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
        Duration::ZERO,
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
///
/// Its statements never take parallel workers ([`SERIAL`]).
pub async fn connect_worker(url: &str, max_connections: u32) -> Result<PgPool, DbError> {
    let options: PgConnectOptions = url
        .parse()
        .map_err(|e: sqlx::Error| DbError::BadUrl(redact(&e.to_string(), url)))?;
    open(
        url,
        options.options([("synchronous_commit", "off"), SERIAL]),
        max_connections,
        WORKER_PATIENCE,
    )
    .await
}

/// No parallel workers for a session's statements.
///
/// The worker's and the operator page's reads are answered from partial
/// indexes, but during a large backlog PostgreSQL prices a parallel scan of
/// the whole outbox below them (a parallel plan's cost is split across its
/// workers): the live counts at 1.4 M rows with 50 k pending took 534 ms on
/// three processes against 34 ms for the bitmap scan of the pending index,
/// beside a delivery that needs those cores (BENCHMARKS.md, issue 23).
pub const SERIAL: (&str, &str) = ("max_parallel_workers_per_gather", "0");

/// Opens the operator page's pool: patient as a worker's ([`WORKER_PATIENCE`])
/// and [`SERIAL`], so however often the page is read it takes no parallel
/// workers from the delivery beside it.
pub async fn connect_page(url: &str, max_connections: u32) -> Result<PgPool, DbError> {
    let options: PgConnectOptions = url
        .parse()
        .map_err(|e: sqlx::Error| DbError::BadUrl(redact(&e.to_string(), url)))?;
    open(
        url,
        options.options([SERIAL]),
        max_connections,
        WORKER_PATIENCE,
    )
    .await
}

async fn open(
    url: &str,
    options: PgConnectOptions,
    max_connections: u32,
    patience: Duration,
) -> Result<PgPool, DbError> {
    // A slow statement is logged at debug: at warn, sqlx would print the
    // statement's whole text (a mapping's generated SQL, a long claim) on
    // the operator's terminal beside the one-line error that matters.
    let options = sqlx::ConnectOptions::log_slow_statements(
        options,
        log::LevelFilter::Debug,
        Duration::from_secs(1),
    );
    let started = std::time::Instant::now();
    loop {
        let opened = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options.clone())
            .await;
        match opened {
            Ok(pool) => return Ok(pool),
            Err(e) if is_transient(&e) && started.elapsed() < patience => {
                tracing::warn!(error = %redact(&e.to_string(), url), "PostgreSQL is not reachable yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(DbError::Connect(redact(&e.to_string(), url))),
        }
    }
}

/// How long a long-running worker waits for PostgreSQL at start (a restart,
/// a failover) before it gives up: a one-shot command fails at once.
pub const WORKER_PATIENCE: Duration = Duration::from_secs(30);

/// Opens a pool for a long-running process, waiting out a PostgreSQL that
/// is restarting ([`WORKER_PATIENCE`]).
pub async fn connect_patient(url: &str, max_connections: u32) -> Result<PgPool, DbError> {
    let options: PgConnectOptions = url
        .parse()
        .map_err(|e: sqlx::Error| DbError::BadUrl(redact(&e.to_string(), url)))?;
    open(url, options, max_connections, WORKER_PATIENCE).await
}

/// Opens one connection of its own (the WAL relay's, which holds a session
/// lock), with the same redaction as the pools: the password never appears
/// in the error.
pub async fn connect_one(url: &str) -> Result<sqlx::PgConnection, DbError> {
    let options: PgConnectOptions = url
        .parse()
        .map_err(|e: sqlx::Error| DbError::BadUrl(redact(&e.to_string(), url)))?;
    sqlx::ConnectOptions::connect(&options)
        .await
        .map_err(|e| DbError::Connect(redact(&e.to_string(), url)))
}

/// Removes the URL (which may hold a password) from a driver message.
pub(crate) fn redact(message: &str, url: &str) -> String {
    let mut out = message.replace(url, "<DATABASE_URL>");
    if let Ok(parsed) = url::Url::parse(url)
        && let Some(password) = parsed.password()
        && !password.is_empty()
    {
        out = out.replace(password, "<redacted>");
    }
    out
}

/// Whether retrying the same statement can succeed: the connection, the
/// pool or the server was briefly unavailable (SQLSTATE classes 08
/// connection, 40 serialization/deadlock, 53 insufficient resources, 57
/// operator intervention such as a restart or a statement timeout, 58
/// system error).
/// Anything else — a constraint, a type, a privilege, a trigger raising —
/// fails the same way every time, so a retry only delays the error.
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        // A connection that broke (or a driver that lost track of one): a
        // new connection may well succeed.
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(d) => d.code().is_some_and(|code| {
            ["08", "40", "53", "57", "58"]
                .iter()
                .any(|c| code.starts_with(c))
        }),
        _ => false,
    }
}
