//! Changing the schema without stalling the host: the embedded migrations,
//! then the resource mappings, each applied whole or not at all, under a
//! short lock timeout with bounded retries.
//!
//! Why: `CREATE TRIGGER` on a host table needs a lock that conflicts with
//! every writer. Waiting for it behind one long host transaction would
//! queue every later writer behind `migrate` — a write outage caused by
//! installing the tool. So every lock is waited for at most
//! `lock_timeout`; on a timeout everything of that step is rolled back,
//! the sessions holding the tables are logged, and the step is retried
//! after a pause, `lock_retries` times, then given up with their names.
//!
//! [`print_sql`] writes the same statements, in the same order, for hosts
//! that change their schema only through their own tooling (alembic),
//! including the bookkeeping that makes a later `migrate` a no-op.

use std::fmt::Write as _;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::{AssertSqlSafe, PgConnection, PgPool};

use crate::mapping::Mappings;
use crate::mapping::install::{self, Change, InstallError};

/// The migrations in `migrations/`, compiled into the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// How patient a `migrate` is with the host's transactions.
#[derive(Debug, Clone, Copy)]
pub struct MigrateOptions {
    /// The longest any lock is waited for (host writers queue behind the
    /// waiting DDL at most this long).
    pub lock_timeout: Duration,
    /// The longest any one statement runs.
    pub statement_timeout: Duration,
    /// Attempts after the first one that timed out on a lock.
    pub lock_retries: u32,
    /// The first pause between attempts (doubling, at most 30 s).
    pub retry_pause: Duration,
}

impl Default for MigrateOptions {
    /// The host's own migration runner's settings.
    fn default() -> Self {
        MigrateOptions {
            lock_timeout: Duration::from_secs(3),
            statement_timeout: Duration::from_secs(30),
            lock_retries: 5,
            retry_pause: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    #[error(transparent)]
    Mappings(#[from] InstallError),
    #[error(
        "gave up after {attempts} attempts waiting {timeout:?} for a lock ({step}); held by {blockers}; nothing was changed by that step"
    )]
    Blocked {
        step: &'static str,
        attempts: u32,
        timeout: Duration,
        blockers: String,
    },
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// What `migrate` did: the migrations it applied and the mapping changes
/// it installed. Both empty when the database was already up to date.
#[derive(Debug, Default)]
pub struct MigrateReport {
    pub migrations: Vec<String>,
    pub mappings: Vec<Change>,
}

/// Migrations whose text changed after release, each with the checksums of
/// its released texts. A database that applied a released text has its
/// recorded checksum moved to today's, so sqlx does not take them for
/// modified migrations. Two kinds of change, neither undoing what a
/// database already has:
/// - linter exclusions added as comments (1-3, first releases);
/// - host tables no longer created or altered (1, 2 and 20261201000001,
///   second releases): authz-outbox never puts agentex-shaped tables or
///   types into someone else's database; what an older release created
///   stays.
const REVISED: &[(i64, &str)] = &[
    (
        20261123000001,
        "afcb6d2193d3ba44009d4536600284e0c85bd312084ceb8d39df2bdb8280ca18f8755c78f1da8b33a4ddb4679ee51474",
    ),
    (
        20261123000001,
        "1e73f71d02699d6a54c634a3f02d8798988b6e4731aed95fedca3c7a10433daa0a1f8f28754caca87a3db5a6c5493349",
    ),
    (
        20261123000002,
        "5a6ef8d00c64d860631fae99dfdb1bafb8f85eb94f357e8412b972076354e584a2faf7ecf697c2c4c592a85c37a730c1",
    ),
    (
        20261201000001,
        "206a1dc32582e9c071512633a51f7bbfd20ac4fc305f9b270601ec42db299363cc0bfba5d050890550bc8e1205637f6b",
    ),
    (
        20261123000002,
        "86b2d3569fc8eaaff6997ced17457318911fb563109ecb0f4dbce18fab5c870cc75db4faf44c1a7a3e8761134399a59a",
    ),
    (
        20261123000003,
        "f4faffe0716af5b8d8e265a6395551ac0a269159589827380950560a54b42b4d9068e86e6b4f1b7473cfc4733e6faa49",
    ),
];

/// Applies the embedded migrations, then the built-in mappings, with the
/// default lock discipline.
pub async fn migrate(pool: &PgPool) -> Result<MigrateReport, MigrateError> {
    migrate_with(pool, &Mappings::builtin(), &MigrateOptions::default()).await
}

/// Applies the embedded migrations, then makes the installed capture match
/// `mappings` (see [`crate::mapping::install`]).
pub async fn migrate_with(
    pool: &PgPool,
    mappings: &Mappings,
    options: &MigrateOptions,
) -> Result<MigrateReport, MigrateError> {
    let mut conn = pool.acquire().await?;
    configure(&mut conn, options).await?;
    let result = run(&mut conn, mappings, options).await;
    // The connection goes back to a pool others use.
    let _ = sqlx::raw_sql("RESET lock_timeout; RESET statement_timeout; RESET client_min_messages")
        .execute(&mut *conn)
        .await;
    result
}

async fn configure(conn: &mut PgConnection, options: &MigrateOptions) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(AssertSqlSafe(format!(
        "SET client_min_messages = warning; SET lock_timeout = {}; SET statement_timeout = {}",
        millis(options.lock_timeout),
        millis(options.statement_timeout)
    )))
    .execute(conn)
    .await?;
    Ok(())
}

fn millis(d: Duration) -> u128 {
    d.as_millis().clamp(1, i32::MAX as u128)
}

async fn run(
    conn: &mut PgConnection,
    mappings: &Mappings,
    options: &MigrateOptions,
) -> Result<MigrateReport, MigrateError> {
    repair_revised_checksums(conn).await?;
    let before = applied_versions(conn).await?;
    let mut attempt = 0;
    loop {
        match MIGRATOR.run(&mut *conn).await {
            Ok(()) => break,
            Err(e) if is_lock_timeout_migrate(&e) => {
                attempt += 1;
                wait_or_give_up(conn, mappings, options, attempt, "applying migrations").await?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    // Partitions ahead, as the worker keeps them: a database migrated and
    // left without a running worker still takes captures in dated
    // partitions for the days ahead. Best effort under the lock timeout:
    // a busy parent only delays it to the worker's next try.
    if let Err(e) = sqlx::query("SELECT authz_outbox_create_partitions($1)")
        .bind(crate::outbox::partitions::DAYS_AHEAD)
        .execute(&mut *conn)
        .await
    {
        tracing::warn!(error = %e, "creating outbox partitions ahead failed; the worker retries");
    }
    let after = applied_versions(conn).await?;
    let migrations = MIGRATOR
        .iter()
        .filter(|m| after.contains(&m.version) && !before.contains(&m.version))
        .map(|m| {
            if m.description.starts_with("retired") {
                format!("{} (retired: recorded, changes nothing)", m.version)
            } else {
                format!("{} {}", m.version, m.description)
            }
        })
        .collect();
    let mut attempt = 0;
    let changes = loop {
        match install::install(&mut *conn, mappings, Some(options.lock_timeout)).await {
            Ok(changes) => break changes,
            Err(InstallError::LockTimeout) => {
                attempt += 1;
                wait_or_give_up(conn, mappings, options, attempt, "installing mappings").await?;
            }
            Err(e) => return Err(e.into()),
        }
    };
    Ok(MigrateReport {
        migrations,
        mappings: changes,
    })
}

fn is_lock_timeout(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|code| code == "55P03")
}

fn is_lock_timeout_migrate(e: &sqlx::migrate::MigrateError) -> bool {
    match e {
        sqlx::migrate::MigrateError::Execute(e)
        | sqlx::migrate::MigrateError::ExecuteMigration(e, _) => is_lock_timeout(e),
        _ => false,
    }
}

/// Logs who holds the tables, then pauses before the next attempt, or
/// gives up naming them.
async fn wait_or_give_up(
    conn: &mut PgConnection,
    mappings: &Mappings,
    options: &MigrateOptions,
    attempt: u32,
    step: &'static str,
) -> Result<(), MigrateError> {
    let blockers = blockers(conn, mappings).await?;
    let described = if blockers.is_empty() {
        "a session that has since finished".to_string()
    } else {
        blockers.join("; ")
    };
    if attempt > options.lock_retries {
        return Err(MigrateError::Blocked {
            step,
            attempts: attempt,
            timeout: options.lock_timeout,
            blockers: described,
        });
    }
    let pause = options
        .retry_pause
        .saturating_mul(1 << attempt.saturating_sub(1).min(5))
        .min(Duration::from_secs(30));
    tracing::warn!(
        step,
        attempt,
        retries = options.lock_retries,
        blockers = %described,
        "a lock was not granted within the lock timeout; rolled back, retrying in {pause:?}"
    );
    tokio::time::sleep(pause).await;
    Ok(())
}

/// Sessions holding a lock that conflicts with DDL on the tables
/// `migrate` changes: table, pid, application, state, transaction age.
/// Never the query text: it may carry a host's data.
async fn blockers(
    conn: &mut PgConnection,
    mappings: &Mappings,
) -> Result<Vec<String>, sqlx::Error> {
    let mut tables: Vec<String> = vec![
        "authz_outbox".into(),
        "authz_outbox_mappings".into(),
        "agents".into(),
        "agent_api_keys".into(),
    ];
    for m in mappings.iter() {
        tables.push(m.table.clone());
        if let Some(join) = m.parent.as_ref().and_then(|p| p.join.as_ref()) {
            tables.push(join.table.clone());
        }
    }
    let rows: Vec<(String, i32, String, String, i64)> = sqlx::query_as(
        "SELECT DISTINCT c.relname::text, l.pid, coalesce(a.application_name, ''),
                coalesce(a.state, '?'),
                coalesce(extract(epoch FROM now() - a.xact_start), 0)::bigint
         FROM pg_locks l
         JOIN pg_class c ON c.oid = l.relation
         LEFT JOIN pg_stat_activity a ON a.pid = l.pid
         WHERE l.granted AND l.pid <> pg_backend_pid()
           AND l.mode NOT IN ('AccessShareLock', 'RowShareLock')
           AND c.relname = ANY($1)
         ORDER BY 1, 2",
    )
    .bind(&tables)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(table, pid, app, state, age)| {
            let app = if app.is_empty() {
                String::new()
            } else {
                format!(" {app:?}")
            };
            format!("table {table}: pid {pid}{app} ({state}, transaction open {age}s)")
        })
        .collect())
}

/// Whether this release's migrations are all applied here (what the
/// generated capture needs before it can be installed, or tried).
pub async fn all_applied(conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
    let applied = applied_versions(conn).await?;
    Ok(MIGRATOR.iter().all(|m| applied.contains(&m.version)))
}

async fn applied_versions(conn: &mut PgConnection) -> Result<Vec<i64>, sqlx::Error> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(&mut *conn)
        .await?;
    if !exists {
        return Ok(Vec::new());
    }
    sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
        .fetch_all(conn)
        .await
}

/// Versions recorded with the checksum of their released (uncommented) text.
async fn recorded_with_old_checksum(conn: &mut PgConnection) -> Result<Vec<i64>, sqlx::Error> {
    if applied_versions(conn).await?.is_empty() {
        return Ok(Vec::new());
    }
    let versions: Vec<i64> = REVISED.iter().map(|(v, _)| *v).collect();
    let olds: Vec<&str> = REVISED.iter().map(|(_, c)| *c).collect();
    sqlx::query_scalar(
        "SELECT m.version FROM _sqlx_migrations m
         JOIN unnest($1::bigint[], $2::text[]) AS r(version, old) ON r.version = m.version
         WHERE m.checksum = decode(r.old, 'hex')",
    )
    .bind(&versions)
    .bind(&olds)
    .fetch_all(conn)
    .await
}

async fn repair_revised_checksums(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    if applied_versions(conn).await?.is_empty() {
        return Ok(());
    }
    for (version, old) in REVISED {
        let Some(current) = MIGRATOR.iter().find(|m| m.version == *version) else {
            continue;
        };
        sqlx::query(
            "UPDATE _sqlx_migrations SET checksum = $1
             WHERE version = $2 AND checksum = decode($3, 'hex')",
        )
        .bind(current.checksum.as_ref())
        .bind(version)
        .bind(old)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Exactly what `migrate` would run on this database, in order, as SQL a
/// host's migration tool can embed: the pending migrations (each in its
/// own transaction, unless it must run outside one), recorded in
/// `_sqlx_migrations` as sqlx records them; then the mapping changes in one
/// transaction that takes its table locks up front and records them in
/// `authz_outbox_mappings`. Applying it makes a later `migrate` a no-op.
pub async fn print_sql(
    pool: &PgPool,
    mappings: &Mappings,
    options: &MigrateOptions,
) -> Result<String, MigrateError> {
    let mut conn = pool.acquire().await?;
    let applied = applied_versions(&mut conn).await?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "-- Generated by authz-outbox {} (`migrate --print-sql`): what `authz-outbox migrate`\n\
         -- would run on this database, in order. Apply it once, as is.\n\
         SET client_min_messages = warning;\nSET lock_timeout = '{}ms';\nSET statement_timeout = '{}ms';\n",
        env!("CARGO_PKG_VERSION"),
        millis(options.lock_timeout),
        millis(options.statement_timeout),
    );
    let revised = recorded_with_old_checksum(&mut conn).await?;
    if !revised.is_empty() {
        out.push_str(
            "-- Migrations revised after release: their recorded checksums move to today's text.\n",
        );
        for (version, old) in REVISED {
            if !revised.contains(version) {
                continue;
            }
            if let Some(m) = MIGRATOR.iter().find(|m| m.version == *version) {
                let new: String = m.checksum.iter().map(|b| format!("{b:02x}")).collect();
                let _ = writeln!(
                    out,
                    "UPDATE _sqlx_migrations SET checksum = decode('{new}', 'hex') WHERE version = {version} AND checksum = decode('{old}', 'hex');"
                );
            }
        }
        out.push('\n');
    }
    let pending: Vec<_> = MIGRATOR
        .iter()
        .filter(|m| !applied.contains(&m.version))
        .collect();
    if !pending.is_empty() {
        out.push_str(
            "-- sqlx's bookkeeping, so `authz-outbox migrate` knows these are applied.\n\
             CREATE TABLE IF NOT EXISTS _sqlx_migrations (\n    version BIGINT PRIMARY KEY,\n    \
             description TEXT NOT NULL,\n    installed_on TIMESTAMPTZ NOT NULL DEFAULT now(),\n    \
             success BOOLEAN NOT NULL,\n    checksum BYTEA NOT NULL,\n    execution_time BIGINT NOT NULL\n);\n\n",
        );
    }
    for m in &pending {
        let _ = writeln!(out, "-- migration {} {}", m.version, m.description);
        if !m.no_tx {
            out.push_str("BEGIN;\n");
        }
        out.push_str(m.sql.as_str().trim_end());
        out.push('\n');
        let hex: String = m.checksum.iter().map(|b| format!("{b:02x}")).collect();
        let _ = writeln!(
            out,
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)\n\
             VALUES ({}, {}, true, decode('{hex}', 'hex'), 0);",
            m.version,
            crate::mapping::predicate::quote_literal(&m.description),
        );
        if !m.no_tx {
            out.push_str("COMMIT;\n");
        }
        out.push('\n');
    }
    let mut tx = sqlx::Acquire::begin(&mut *conn).await?;
    let plan = install::plan(&mut tx, mappings, !pending.is_empty()).await?;
    tx.rollback().await?;
    if !plan.is_empty() {
        out.push_str("-- resource mappings: ");
        let names: Vec<String> = plan
            .changes
            .iter()
            .filter(|c| c.action != install::ChangeAction::SkippedNoTable)
            .map(|c| c.to_string())
            .collect();
        out.push_str(&names.join(", "));
        out.push_str("\nBEGIN;\n");
        if let Some(lock) = install::lock_statement(&plan) {
            let _ = writeln!(out, "{lock};");
        }
        out.push_str("SET LOCAL search_path = pg_catalog, pg_temp;\n");
        for s in &plan.statements {
            // The linter's rule is about objects clients use; these are the
            // tool's own generated objects, replaced in this transaction.
            if s.sql.starts_with("DROP FUNCTION") || s.sql.contains("EXECUTE 'DROP FUNCTION '") {
                out.push_str("-- squawk-ignore ban-drop-function\n");
            } else if s.sql.starts_with("DROP VIEW") {
                out.push_str("-- squawk-ignore ban-drop-view\n");
            }
            let _ = writeln!(out, "{};", s.sql);
        }
        out.push_str("COMMIT;\n");
    }
    Ok(out)
}
