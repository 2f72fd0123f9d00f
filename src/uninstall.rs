//! Taking authz-outbox out of a database: every trigger, function and view
//! it installed and, when asked, the outbox's own tables — never a host
//! table's definition.
//!
//! What counts as ours is read from the catalog, not from a list kept here:
//! every function in the outbox's schema whose name starts with
//! `authz_outbox` (the prefix `migrate` already claims when it takes
//! EXECUTE from PUBLIC on exactly those), every trigger that calls one of
//! them (on whichever table it sits), and every view of that prefix. So
//! what a mapping generated ([`crate::mapping::ddl::generated_names`]), the
//! capture core, the functions of older releases' migrations and
//! `authz_outbox_desired` are all found, including those of a mapping whose
//! registry row is gone.
//!
//! Nothing is dropped with `CASCADE`: an object of the host's that depends
//! on one of ours (a view over `authz_outbox_desired`, a foreign key to
//! `authz_outbox`) makes the removal fail, naming it, and nothing changes.
//! On a host table the only statement run is `DROP TRIGGER`.
//!
//! It runs in one transaction under `migrate`'s lock discipline
//! ([`MigrateOptions`]): the tables whose triggers go are locked up front,
//! waiting at most `lock_timeout`; a timeout rolls everything back and is
//! retried after a pause, `lock_retries` times.

use std::collections::BTreeSet;
use std::time::Duration;

use sqlx::{Acquire, AssertSqlSafe, PgConnection, PgPool, Postgres, Transaction};

use crate::mapping::catalog;
use crate::mapping::quote::{qualified, quote_ident};
use crate::migrate::{MIGRATOR, MigrateOptions};

/// The outbox's own tables, dropped only with `--drop-outbox` (children
/// first; their sequences go with them).
pub const OUTBOX_TABLES: &[&str] = &[
    "authz_outbox_relay",
    "authz_outbox_settings",
    "authz_outbox_owners",
    "authz_outbox_reconcile_findings",
    "authz_outbox_reconcile_runs",
    "authz_outbox_listeners",
    "authz_outbox_delivery_minutes",
    "authz_outbox_mappings",
    "authz_outbox",
];

/// The function that keeps `authz_outbox_owners` from `authz_outbox`'s
/// outcomes, through a trigger on `authz_outbox` itself. It belongs to the
/// outbox's data, not to capture: kept with the tables, as no later
/// `migrate` (whose migrations are recorded as applied) would create the
/// trigger again.
const OWNERS_FUNCTION: &str = "authz_outbox_record_owner";

#[derive(Debug, Clone, Copy, Default)]
pub struct UninstallOptions {
    /// Also drop the outbox's tables (and the rows they hold) and sqlx's
    /// record of our migrations.
    pub drop_outbox: bool,
    /// Lock and statement timeouts, retries: as `migrate`.
    pub lock: MigrateOptions,
}

#[derive(Debug, thiserror::Error)]
pub enum UninstallError {
    #[error(
        "gave up after {attempts} attempts waiting {timeout:?} for a lock; held by {blockers}; nothing was changed"
    )]
    Blocked {
        attempts: u32,
        timeout: Duration,
        blockers: String,
    },
    #[error("removing {object} failed, nothing was changed: {message}")]
    Statement { object: String, message: String },
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// One object to remove (or rows of ours to delete), as the operator reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removal {
    /// `trigger "x" on "public"."tasks"`, `function "public"."f"(text)`, …
    pub object: String,
    sql: String,
}

impl std::fmt::Display for Removal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.object)
    }
}

/// What an uninstall removes, in the order it runs (triggers, views, then
/// functions, then the tables), and the tables it locks first.
#[derive(Debug, Default)]
pub struct Plan {
    pub removals: Vec<Removal>,
    /// Rows still waiting for delivery in `authz_outbox` (kept, or dropped
    /// with it).
    pub pending_rows: i64,
    /// Whether `authz_outbox` (and so its rows) stays.
    pub outbox_kept: bool,
    tables: BTreeSet<String>,
}

/// Works out what [`uninstall`] would remove, changing nothing.
pub async fn plan(pool: &PgPool, options: &UninstallOptions) -> Result<Plan, UninstallError> {
    let mut conn = pool.acquire().await?;
    let mut tx = conn.begin().await?;
    sqlx::query("SET TRANSACTION READ ONLY")
        .execute(&mut *tx)
        .await?;
    let plan = plan_in(&mut tx, options).await?;
    tx.rollback().await?;
    Ok(plan)
}

/// Removes what [`plan`] lists, in one transaction; returns what it removed.
pub async fn uninstall(pool: &PgPool, options: &UninstallOptions) -> Result<Plan, UninstallError> {
    let mut conn = pool.acquire().await?;
    let mut attempt = 0;
    loop {
        match attempt_once(&mut conn, options).await {
            Err(Attempt::LockTimeout(tables)) => {
                attempt += 1;
                let blockers = blockers(&mut conn, &tables).await?;
                let described = if tables.is_empty() {
                    // The advisory lock every install and uninstall takes.
                    "another `migrate` or `uninstall` in progress".to_string()
                } else if blockers.is_empty() {
                    "a session that has since finished".to_string()
                } else {
                    blockers.join("; ")
                };
                if attempt > options.lock.lock_retries {
                    return Err(UninstallError::Blocked {
                        attempts: attempt,
                        timeout: options.lock.lock_timeout,
                        blockers: described,
                    });
                }
                let pause = options
                    .lock
                    .retry_pause
                    .saturating_mul(1 << attempt.saturating_sub(1).min(5))
                    .min(Duration::from_secs(30));
                tracing::warn!(
                    attempt,
                    retries = options.lock.lock_retries,
                    blockers = %described,
                    "a lock was not granted within the lock timeout; rolled back, retrying in {pause:?}"
                );
                tokio::time::sleep(pause).await;
            }
            Err(Attempt::Failed(e)) => return Err(e),
            Ok(plan) => return Ok(plan),
        }
    }
}

enum Attempt {
    /// A lock wait ran out; the tables the attempt was locking.
    LockTimeout(Vec<String>),
    Failed(UninstallError),
}

impl From<sqlx::Error> for Attempt {
    fn from(e: sqlx::Error) -> Self {
        Attempt::Failed(e.into())
    }
}

fn is_lock_timeout(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|code| code == "55P03")
}

async fn attempt_once(
    conn: &mut PgConnection,
    options: &UninstallOptions,
) -> Result<Plan, Attempt> {
    let mut tx = conn.begin().await?;
    let lock_ms = millis(options.lock.lock_timeout);
    sqlx::raw_sql(AssertSqlSafe(format!(
        "SET LOCAL client_min_messages = warning; SET LOCAL lock_timeout = {lock_ms}; \
         SET LOCAL statement_timeout = {}",
        millis(options.lock.statement_timeout)
    )))
    .execute(&mut *tx)
    .await?;
    // Not while a `migrate` installs (the lock its install takes).
    if let Err(e) = sqlx::query("SELECT pg_advisory_xact_lock(hashtext('authz_outbox_mappings'))")
        .execute(&mut *tx)
        .await
    {
        return Err(if is_lock_timeout(&e) {
            Attempt::LockTimeout(Vec::new())
        } else {
            e.into()
        });
    }
    let plan = plan_in(&mut tx, options).await.map_err(Attempt::Failed)?;
    if !plan.tables.is_empty() {
        // Every table at once, in a fixed order: a blocked uninstall holds
        // nothing while it waits, and two cannot deadlock.
        let tables: Vec<&str> = plan.tables.iter().map(String::as_str).collect();
        let lock = format!("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE", tables.join(", "));
        if let Err(e) = sqlx::raw_sql(AssertSqlSafe(lock)).execute(&mut *tx).await {
            return Err(if is_lock_timeout(&e) {
                Attempt::LockTimeout(plan.tables.iter().cloned().collect())
            } else {
                e.into()
            });
        }
    }
    sqlx::query("SET LOCAL search_path = pg_catalog, pg_temp")
        .execute(&mut *tx)
        .await?;
    for removal in &plan.removals {
        if let Err(e) = sqlx::raw_sql(AssertSqlSafe(removal.sql.as_str()))
            .execute(&mut *tx)
            .await
        {
            if is_lock_timeout(&e) {
                return Err(Attempt::LockTimeout(plan.tables.iter().cloned().collect()));
            }
            return Err(Attempt::Failed(match e.as_database_error() {
                Some(d) => UninstallError::Statement {
                    object: removal.object.clone(),
                    message: d.message().to_string(),
                },
                None => e.into(),
            }));
        }
    }
    tx.commit().await?;
    Ok(plan)
}

fn millis(d: Duration) -> u128 {
    d.as_millis().clamp(1, i32::MAX as u128)
}

async fn plan_in(
    tx: &mut Transaction<'_, Postgres>,
    options: &UninstallOptions,
) -> Result<Plan, UninstallError> {
    let schema = catalog::outbox_schema(&mut *tx).await?;
    let mut plan = Plan::default();

    // Triggers calling one of our functions, wherever they sit.
    let triggers: Vec<(String, String, String, bool)> = sqlx::query_as(
        "SELECT t.tgname::text, n.nspname::text, c.relname::text,
                n.oid = p.pronamespace AND c.relname = ANY($2)
         FROM pg_trigger t
         JOIN pg_class c ON c.oid = t.tgrelid
         JOIN pg_namespace n ON n.oid = c.relnamespace
         JOIN pg_proc p ON p.oid = t.tgfoid
         WHERE NOT t.tgisinternal
           AND p.pronamespace = to_regnamespace(quote_ident($1))
           AND p.proname::text LIKE 'authz\\_outbox%'
         ORDER BY 2, 1",
    )
    .bind(&schema)
    .bind(OUTBOX_TABLES)
    .fetch_all(&mut **tx)
    .await?;
    for (trigger, table_schema, table, on_ours) in &triggers {
        if *on_ours && !options.drop_outbox {
            continue;
        }
        let table = qualified(table_schema, table);
        plan.tables.insert(table.clone());
        plan.removals.push(Removal {
            object: format!("trigger {} on {table}", quote_ident(trigger)),
            sql: format!("DROP TRIGGER IF EXISTS {} ON {table}", quote_ident(trigger)),
        });
    }

    let views: Vec<(String, bool)> = sqlx::query_as(
        "SELECT c.relname::text, c.relkind = 'm'
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind IN ('v', 'm') AND n.nspname = $1
           AND c.relname::text LIKE 'authz\\_outbox%'
         ORDER BY 1",
    )
    .bind(&schema)
    .fetch_all(&mut **tx)
    .await?;
    for (view, materialized) in views {
        let view = qualified(&schema, &view);
        let kind = if materialized {
            "MATERIALIZED VIEW"
        } else {
            "VIEW"
        };
        plan.removals.push(Removal {
            object: format!("{} {view}", kind.to_lowercase()),
            sql: format!("DROP {kind} {view}"),
        });
    }

    let functions: Vec<(String, String)> = sqlx::query_as(
        "SELECT p.proname::text, pg_get_function_identity_arguments(p.oid)
         FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname = $1 AND p.proname::text LIKE 'authz\\_outbox%'
         ORDER BY 1, 2",
    )
    .bind(&schema)
    .fetch_all(&mut **tx)
    .await?;
    for (name, arguments) in functions {
        if name == OWNERS_FUNCTION && !options.drop_outbox {
            continue;
        }
        let signature = format!("{}({arguments})", qualified(&schema, &name));
        plan.removals.push(Removal {
            object: format!("function {signature}"),
            sql: format!("DROP FUNCTION {signature}"),
        });
    }

    let ours: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = $1 AND c.relname = ANY($2) AND c.relkind IN ('r', 'p')",
    )
    .bind(&schema)
    .bind(OUTBOX_TABLES)
    .fetch_all(&mut **tx)
    .await?;
    // WAL capture's slot and publication go with the capture: a slot left
    // behind would keep the primary's WAL forever. (Messages still in it
    // are lost: `migrate --capture table` first drains them.)
    if ours.iter().any(|t| t == "authz_outbox_relay") {
        let slots: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT r.slot_name FROM {} r JOIN pg_replication_slots s ON s.slot_name = r.slot_name ORDER BY 1",
            qualified(&schema, "authz_outbox_relay")
        )))
        .fetch_all(&mut **tx)
        .await?;
        for slot in slots {
            plan.removals.push(Removal {
                object: format!("replication slot {slot}"),
                sql: format!(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = {}",
                    crate::mapping::quote::quote_literal(&slot)
                ),
            });
        }
    }
    let publication: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)")
            .bind(crate::relay::PUBLICATION)
            .fetch_one(&mut **tx)
            .await?;
    if publication {
        plan.removals.push(Removal {
            object: format!("publication {}", crate::relay::PUBLICATION),
            sql: format!("DROP PUBLICATION IF EXISTS {}", crate::relay::PUBLICATION),
        });
    }
    plan.outbox_kept = !options.drop_outbox && ours.iter().any(|t| t == "authz_outbox");
    if ours.iter().any(|t| t == "authz_outbox") {
        plan.pending_rows = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT count(*) FROM {} WHERE state = 'pending'",
            qualified(&schema, "authz_outbox")
        )))
        .fetch_one(&mut **tx)
        .await?;
    }

    if !options.drop_outbox {
        // The capture mode and the relay's slot go with the capture: the
        // next `migrate` starts in table mode.
        for table in ["authz_outbox_settings", "authz_outbox_relay"] {
            if ours.iter().any(|t| t == table) {
                let q = qualified(&schema, table);
                plan.removals.push(Removal {
                    object: format!("rows of {q}"),
                    sql: format!("DELETE FROM {q}"),
                });
            }
        }
        // The registry says what is installed; emptied, so that the next
        // `migrate` installs every mapping again instead of finding them
        // recorded as they are.
        if ours.iter().any(|t| t == "authz_outbox_mappings") {
            let registry = qualified(&schema, "authz_outbox_mappings");
            let names: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
                "SELECT name FROM {registry} ORDER BY name"
            )))
            .fetch_all(&mut **tx)
            .await?;
            if !names.is_empty() {
                plan.removals.push(Removal {
                    object: format!(
                        "rows of {registry} (mappings recorded as installed: {})",
                        names.join(", ")
                    ),
                    sql: format!("DELETE FROM {registry}"),
                });
            }
        }
        return Ok(plan);
    }

    for table in OUTBOX_TABLES {
        if !ours.iter().any(|t| t == table) {
            continue;
        }
        let q = qualified(&schema, table);
        plan.tables.insert(q.clone());
        plan.removals.push(Removal {
            object: format!("table {q}"),
            sql: format!("DROP TABLE {q}"),
        });
    }
    // Owned by a table's column (dropped with it) or left over: named, and
    // dropped if still there.
    let sequences: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind = 'S' AND n.nspname = $1 AND c.relname::text LIKE 'authz\\_outbox%'
         ORDER BY 1",
    )
    .bind(&schema)
    .fetch_all(&mut **tx)
    .await?;
    for sequence in sequences {
        let sequence = qualified(&schema, &sequence);
        plan.removals.push(Removal {
            object: format!("sequence {sequence}"),
            sql: format!("DROP SEQUENCE IF EXISTS {sequence}"),
        });
    }
    migration_records(tx, &mut plan).await?;
    Ok(plan)
}

/// sqlx's record of our migrations. `_sqlx_migrations` is shared by name
/// with any other sqlx migrator using the same schema: only the rows of
/// our versions are deleted, and the table itself only when no other row
/// is left in it (it was then ours alone; another tool's rows keep it).
async fn migration_records(
    tx: &mut Transaction<'_, Postgres>,
    plan: &mut Plan,
) -> Result<(), sqlx::Error> {
    let table: Option<(String, String)> = sqlx::query_as(
        "SELECT n.nspname::text, c.relname::text
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.oid = to_regclass('_sqlx_migrations')",
    )
    .fetch_optional(&mut **tx)
    .await?;
    let Some((schema, name)) = table else {
        return Ok(());
    };
    let table = qualified(&schema, &name);
    let versions: Vec<i64> = MIGRATOR.iter().map(|m| m.version).collect();
    let (ours, others): (i64, i64) = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT count(*) FILTER (WHERE version = ANY($1)), count(*) FILTER (WHERE NOT version = ANY($1))
         FROM {table}"
    )))
    .bind(&versions)
    .fetch_one(&mut **tx)
    .await?;
    if others == 0 {
        plan.tables.insert(table.clone());
        plan.removals.push(Removal {
            object: format!("table {table} (it records authz-outbox's migrations only)"),
            sql: format!("DROP TABLE {table}"),
        });
    } else if ours > 0 {
        let list: Vec<String> = versions.iter().map(i64::to_string).collect();
        plan.removals.push(Removal {
            object: format!(
                "{ours} rows of {table} (authz-outbox's migrations; {others} other rows kept)"
            ),
            sql: format!("DELETE FROM {table} WHERE version IN ({})", list.join(", ")),
        });
    }
    Ok(())
}

/// Sessions holding a lock on `tables` that `LOCK … ACCESS EXCLUSIVE`
/// waits for: table, pid, application, state, transaction age. Never the
/// query text: it may carry a host's data.
async fn blockers(conn: &mut PgConnection, tables: &[String]) -> Result<Vec<String>, sqlx::Error> {
    let rows: Vec<(String, i32, String, String, i64)> = sqlx::query_as(
        "SELECT DISTINCT l.relation::regclass::text, l.pid, coalesce(a.application_name, ''),
                coalesce(a.state, '?'),
                coalesce(extract(epoch FROM now() - a.xact_start), 0)::bigint
         FROM pg_locks l
         LEFT JOIN pg_stat_activity a ON a.pid = l.pid
         WHERE l.granted AND l.pid <> pg_backend_pid()
           AND l.relation IN (SELECT to_regclass(t) FROM unnest($1::text[]) AS t)
         ORDER BY 1, 2",
    )
    .bind(tables)
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
