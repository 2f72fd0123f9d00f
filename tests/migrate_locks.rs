//! Installing or upgrading on a busy host: `migrate` waits for a lock at
//! most `--lock-timeout`, retries a bounded number of times, names the
//! session holding the table, never queues the host's writers for longer
//! than the timeout, and applies each step whole or not at all.
//! `--print-sql` is the same change for the host's own migration tool.

mod common;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use sqlx::PgPool;

/// The api_key mapping with a different principal allowlist: a real change
/// that needs the trigger lock on `agent_api_keys`.
const API_KEY_CHANGE: &str = r#"
[[mapping]]
type = "api_key"
table = "agent_api_keys"
parent = { type = "agent", column = "agent_id" }
principal_fields = ["user_id", "service_account_id"]
"#;

const AGENT_AND_TASK_CHANGE: &str = r#"
[[mapping]]
type = "agent"
table = "agents"
live = "status IS DISTINCT FROM 'DELETED'"
principal_fields = ["user_id", "service_account_id"]

[[mapping]]
type = "task"
table = "tasks"
live = "status IS DISTINCT FROM 'DELETED'"
principal_fields = ["user_id", "service_account_id"]
parent = { type = "agent", column = "agent_id", join = { table = "task_agents", on = "task_id", references = "id" } }
"#;

fn mappings_file(text: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("mappings-{}.toml", uuid::Uuid::new_v4()));
    std::fs::write(&path, text).expect("write mappings");
    path
}

fn migrate_binary(url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_authz-outbox"))
        .arg("migrate")
        .args(args)
        .env("DATABASE_URL", url)
        .env_remove("AUTHZ_OUTBOX_MAPPINGS")
        .output()
        .expect("binary runs")
}

async fn agent_and_key_uncaptured(pool: &PgPool) {
    common::uncaptured(
        pool,
        "INSERT INTO agents (id, name, description, status) VALUES ($1, $1, '', 'READY')",
        &["a1"],
    )
    .await;
}

#[sqlx::test(migrations = false)]
async fn a_blocked_migrate_gives_up_in_bounded_retries_without_queueing_writers(pool: PgPool) {
    let pool = common::host_db(pool).await;
    agent_and_key_uncaptured(&pool).await;
    let url = common::database_url(&pool).await;
    let file = mappings_file(API_KEY_CHANGE);

    // A host transaction that wrote a key and stays open.
    let mut blocker = pool.begin().await.expect("begin");
    sqlx::query(
        "INSERT INTO agent_api_keys (id, agent_id, name, api_key_type, api_key)
         VALUES ('held', 'a1', 'held', 'EXTERNAL', 's')",
    )
    .execute(&mut *blocker)
    .await
    .expect("blocker writes");

    // The host transaction ends by itself after 4 s, long after a
    // well-behaved migrate has given up; a migrate (or an insert) that
    // waited for it instead shows up as a success or a long delay.
    let blocker_task = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(4)).await;
        blocker.commit().await.expect("blocker commits");
    });
    let url2 = url.clone();
    let file2 = file.clone();
    let migrate = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let out = migrate_binary(
            &url2,
            &[
                "--mappings",
                file2.to_str().expect("utf-8 path"),
                "--lock-timeout",
                "400ms",
                "--lock-retries",
                "1",
            ],
        );
        (out, started.elapsed())
    });
    // An ordinary host insert while migrate waits: delayed at most about
    // the lock timeout, not until the blocker ends.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let started = Instant::now();
    sqlx::query(
        "INSERT INTO agent_api_keys (id, agent_id, name, api_key_type, api_key)
         VALUES ('meanwhile', 'a1', 'meanwhile', 'EXTERNAL', 's')",
    )
    .execute(&pool)
    .await
    .expect("ordinary insert");
    let insert_delay = started.elapsed();

    let (out, _) = migrate.await.expect("migrate thread");
    let stderr = String::from_utf8_lossy(&out.stderr);
    blocker_task.await.expect("blocker task");
    assert!(
        insert_delay < Duration::from_millis(1500),
        "ordinary insert waited {insert_delay:?}"
    );
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: gave up after 2 attempts")
            && last.contains("table agent_api_keys: pid"),
        "{stderr}"
    );

    // With the blocker gone, the same migrate completes and capture follows
    // the new mapping.
    let out = migrate_binary(&url, &["--mappings", file.to_str().expect("utf-8 path")]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "mapping api_key: updated\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut tx = pool.begin().await.expect("begin");
    sqlx::query("SELECT set_config('authz_outbox.principal', '{\"user_id\":\"u\",\"account_id\":\"acc\"}', true)")
        .execute(&mut *tx)
        .await
        .expect("principal");
    sqlx::query(
        "INSERT INTO agent_api_keys (id, agent_id, name, api_key_type, api_key)
         VALUES ('after', 'a1', 'after', 'EXTERNAL', 's')",
    )
    .execute(&mut *tx)
    .await
    .expect("insert");
    tx.commit().await.expect("commit");
    let principal: serde_json::Value =
        sqlx::query_scalar("SELECT principal FROM authz_outbox WHERE resource_id = 'after'")
            .fetch_one(&pool)
            .await
            .expect("captured");
    assert_eq!(principal, serde_json::json!({"user_id": "u"}));
    std::fs::remove_file(file).ok();
}

/// Every function and trigger authz-outbox owns, with its definition.
async fn owned_objects(pool: &PgPool) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT 'function ' || p.oid::regprocedure::text, pg_get_functiondef(p.oid)
         FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname = 'public' AND p.proname LIKE 'authz_outbox%'
         UNION ALL
         SELECT 'trigger ' || t.tgname || ' on ' || c.relname, pg_get_triggerdef(t.oid)
         FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
         WHERE NOT t.tgisinternal
         UNION ALL
         SELECT 'index ' || indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'
         UNION ALL
         SELECT 'view ' || viewname, definition FROM pg_views WHERE schemaname = 'public'
         UNION ALL
         SELECT 'column ' || table_name || '.' || column_name, data_type || ' ' || is_nullable || ' ' || coalesce(column_default, '')
         FROM information_schema.columns WHERE table_schema = 'public'
         UNION ALL
         SELECT 'mapping ' || name, ddl FROM authz_outbox_mappings
         ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .expect("catalog")
}

#[sqlx::test(migrations = false)]
async fn a_mapping_change_is_applied_whole_or_not_at_all(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let url = common::database_url(&pool).await;
    let before = owned_objects(&pool).await;
    let file = mappings_file(AGENT_AND_TASK_CHANGE);
    // agents is free, tasks is held: the agent part must not land alone.
    let mut blocker = pool.begin().await.expect("begin");
    sqlx::query("INSERT INTO tasks (id, name, status) VALUES ('t', 't', 'RUNNING')")
        .execute(&mut *blocker)
        .await
        .expect("blocker writes");
    let out = migrate_binary(
        &url,
        &[
            "--mappings",
            file.to_str().expect("utf-8 path"),
            "--lock-timeout",
            "200ms",
            "--lock-retries",
            "0",
        ],
    );
    blocker.rollback().await.expect("rollback");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("table tasks: pid"), "{stderr}");
    assert_eq!(owned_objects(&pool).await, before, "nothing changed");
    let out = migrate_binary(&url, &["--mappings", file.to_str().expect("utf-8 path")]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "mapping agent: updated\nmapping task: updated\n"
    );
    assert_ne!(owned_objects(&pool).await, before);
    std::fs::remove_file(file).ok();
}

fn psql() -> String {
    std::env::var("PG_BIN")
        .map(|bin| format!("{bin}/psql"))
        .unwrap_or_else(|_| "psql".into())
}

#[sqlx::test(migrations = false)]
async fn print_sql_applied_with_psql_matches_migrate(pool: PgPool) {
    // `pool` gets `migrate`; a second database gets the printed SQL.
    let migrated = common::host_db(pool).await;
    let url = common::database_url(&migrated).await;
    let other = format!("print_sql_{}", uuid::Uuid::new_v4().simple());
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {other}")))
        .execute(&migrated)
        .await
        .expect("second database");
    let mut other_url = url::Url::parse(&url).expect("url");
    other_url.set_path(&other);
    let other_url = other_url.to_string();
    let printed_pool = sqlx::PgPool::connect(&other_url).await.expect("connect");
    sqlx::raw_sql(common::HOST_SCHEMA)
        .execute(&printed_pool)
        .await
        .expect("host schema");

    let out = migrate_binary(&other_url, &["--print-sql"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sql_path = std::env::temp_dir().join(format!("{other}.sql"));
    std::fs::write(&sql_path, &out.stdout).expect("write sql");
    let applied = Command::new(psql())
        .args(["-q", "-v", "ON_ERROR_STOP=1", "-d", &other_url, "-f"])
        .arg(&sql_path)
        .output()
        .expect("psql runs");
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );

    let (printed, expected) = (
        owned_objects(&printed_pool).await,
        owned_objects(&migrated).await,
    );
    let differ: Vec<&(String, String)> = printed
        .iter()
        .filter(|o| !expected.contains(o))
        .chain(expected.iter().filter(|o| !printed.contains(o)))
        .collect();
    assert!(differ.is_empty(), "catalogs differ: {differ:#?}");
    // `migrate` afterwards has nothing to do, and `mappings check` agrees.
    let out = migrate_binary(&other_url, &[]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "nothing to do: every migration is applied and the capture matches the mappings\n"
    );
    let check = Command::new(env!("CARGO_BIN_EXE_authz-outbox"))
        .args(["mappings", "check"])
        .env("DATABASE_URL", &other_url)
        .output()
        .expect("check runs");
    assert!(check.status.success());

    printed_pool.close().await;
    std::fs::remove_file(sql_path).ok();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE {other} WITH (FORCE)"
    )))
    .execute(&migrated)
    .await
    .expect("drop");
}

/// A host database migrated, then recorded as if `released` (version,
/// checksum of the released text) had been applied; `migrate` must accept it.
async fn upgrade_from_released(pool: &PgPool, released: &[(i64, &str)]) {
    sqlx::raw_sql(common::HOST_SCHEMA)
        .execute(pool)
        .await
        .expect("host");
    authz_outbox::db::migrate(pool).await.expect("migrate");
    for (version, checksum) in released {
        sqlx::query("UPDATE _sqlx_migrations SET checksum = decode($2, 'hex') WHERE version = $1")
            .bind(version)
            .bind(checksum)
            .execute(pool)
            .await
            .expect("pretend the released text was applied");
    }
    authz_outbox::db::migrate(pool)
        .await
        .expect("migrate accepts the released checksums");
}

#[sqlx::test(migrations = false)]
async fn migrations_released_when_they_created_host_tables_still_apply(pool: PgPool) {
    // A database that applied the releases whose migrations still created
    // (1), triggered on (2) or altered (20261201000001) the host's tables
    // upgrades without sqlx calling them modified, and keeps its tables.
    let released = [
        (
            20261123000001_i64,
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
    ];
    upgrade_from_released(&pool, &released).await;
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_class WHERE relname IN ('agents', 'agent_api_keys')",
    )
    .fetch_one(&pool)
    .await
    .expect("count");
    assert_eq!(tables, 2, "the host's tables stay");
}

#[sqlx::test(migrations = false)]
async fn migrations_released_before_their_lint_comments_still_apply(pool: PgPool) {
    // A database that applied the released text of migrations 1-3 (before
    // the linter's comments were added) upgrades without sqlx calling them
    // modified.
    let released = [
        (
            20261123000001_i64,
            "afcb6d2193d3ba44009d4536600284e0c85bd312084ceb8d39df2bdb8280ca18f8755c78f1da8b33a4ddb4679ee51474",
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
    upgrade_from_released(&pool, &released).await;
}
