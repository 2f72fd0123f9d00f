//! `authz-outbox uninstall`: the dry run changes nothing; `--apply
//! --drop-outbox` leaves the host's schema exactly as it was before
//! `migrate` (compared by `pg_dump --schema-only`); `--apply` alone stops
//! capture and keeps the outbox's rows, and a later `migrate` captures
//! again.

mod common;

use std::process::{Command, Output};

use authz_outbox::mapping::{Mappings, ddl};
use sqlx::PgPool;

const BIN: &str = env!("CARGO_BIN_EXE_authz-outbox");

fn authz_outbox(url: &str, args: &[&str]) -> Output {
    let out = Command::new(BIN)
        .args(args)
        .env("DATABASE_URL", url)
        .output()
        .expect("binary runs");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `pg_dump` of the server's major version when several are installed
/// (Debian's `/usr/lib/postgresql/<major>/bin`), else the one on the path.
async fn pg_dump_binary(pool: &PgPool) -> String {
    let version: i32 = sqlx::query_scalar("SELECT current_setting('server_version_num')::int")
        .fetch_one(pool)
        .await
        .expect("version");
    let candidate = format!("/usr/lib/postgresql/{}/bin/pg_dump", version / 10000);
    if std::path::Path::new(&candidate).exists() {
        candidate
    } else {
        "pg_dump".into()
    }
}

async fn schema_dump(pool: &PgPool) -> String {
    let url = common::database_url(pool).await;
    let out = Command::new(pg_dump_binary(pool).await)
        .args(["--schema-only", "--no-comments", "--dbname", &url])
        .output()
        .expect("pg_dump runs");
    assert!(
        out.status.success(),
        "pg_dump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // pg_dump 15.14+ brackets its output with a random `\restrict` key.
    String::from_utf8(out.stdout)
        .expect("utf-8 dump")
        .lines()
        .filter(|l| !l.starts_with("\\restrict ") && !l.starts_with("\\unrestrict "))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// The lines one dump has and the other lacks, for a readable failure.
fn dump_difference(a: &str, b: &str) -> String {
    let only = |x: &str, y: &str| -> Vec<String> {
        let ys: std::collections::BTreeSet<&str> = y.lines().collect();
        x.lines()
            .filter(|l| !ys.contains(l))
            .map(str::to_string)
            .collect()
    };
    format!(
        "only before: {:#?}\nonly after: {:#?}",
        only(a, b),
        only(b, a)
    )
}

async fn outbox_rows(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM authz_outbox")
        .fetch_one(pool)
        .await
        .expect("outbox readable")
}

/// A write of the host's, with a principal, outside the library (whose
/// helpers call functions an uninstall removes).
async fn write_agent(pool: &PgPool, id: &str) {
    let mut tx = pool.begin().await.expect("begin");
    sqlx::query("SELECT set_config('authz_outbox.principal', '{\"user_id\":\"u1\"}', true)")
        .execute(&mut *tx)
        .await
        .expect("principal");
    sqlx::query("INSERT INTO agents (id, name, description, status) VALUES ($1, $1, '', 'READY')")
        .bind(id)
        .execute(&mut *tx)
        .await
        .expect("insert");
    tx.commit().await.expect("commit");
}

async fn ours_left(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT proname::text FROM pg_proc WHERE proname::text LIKE 'authz\\_outbox%'
         UNION ALL SELECT tgname::text FROM pg_trigger WHERE tgname::text LIKE 'authz\\_outbox%'
         UNION ALL SELECT relname::text FROM pg_class WHERE relname::text LIKE 'authz\\_outbox%'
         ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .expect("catalog")
}

#[sqlx::test(migrations = false)]
async fn apply_with_drop_outbox_leaves_the_host_schema_as_before_migrate(pool: PgPool) {
    sqlx::raw_sql(common::HOST_SCHEMA)
        .execute(&pool)
        .await
        .expect("host schema");
    let before = schema_dump(&pool).await;
    authz_outbox::db::migrate(&pool).await.expect("migrate");
    write_agent(&pool, "a1").await;
    assert_eq!(outbox_rows(&pool).await, 1);
    assert_ne!(schema_dump(&pool).await, before, "migrate changed nothing?");

    let url = common::database_url(&pool).await;
    let out = authz_outbox(&url, &["uninstall", "--apply", "--drop-outbox"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("removed table \"public\".\"authz_outbox\""),
        "{stdout}"
    );
    assert!(stdout.contains("_sqlx_migrations"), "{stdout}");

    let after = schema_dump(&pool).await;
    assert!(
        after == before,
        "uninstall --apply --drop-outbox left the schema different from before migrate: {}",
        dump_difference(&before, &after)
    );
    assert!(
        ours_left(&pool).await.is_empty(),
        "{:?}",
        ours_left(&pool).await
    );
    // The host's rows are untouched.
    let agents: i64 = sqlx::query_scalar("SELECT count(*) FROM agents")
        .fetch_one(&pool)
        .await
        .expect("agents");
    assert_eq!(agents, 1);
}

#[sqlx::test(migrations = false)]
async fn the_dry_run_lists_every_object_and_changes_nothing(pool: PgPool) {
    let pool = common::host_db(pool).await;
    write_agent(&pool, "a1").await;
    let before = schema_dump(&pool).await;
    let url = common::database_url(&pool).await;

    let out = authz_outbox(&url, &["uninstall"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    for expected in [
        "would remove trigger \"authz_outbox__agent__insert\" on \"public\".\"agents\"",
        "would remove view \"public\".\"authz_outbox_desired\"",
        "would remove function \"public\".\"authz_outbox_capture__agent\"()",
        "would remove function \"public\".\"authz_outbox_capture_enqueue\"(",
        "would remove rows of \"public\".\"authz_outbox_mappings\"",
        "kept authz_outbox with 1 pending rows",
        "dry run: nothing was changed",
    ] {
        assert!(
            stdout.contains(expected),
            "{expected:?} missing from:\n{stdout}"
        );
    }
    assert!(
        !stdout.contains("table \"public\".\"authz_outbox\""),
        "{stdout}"
    );
    // Every name a built-in mapping generates is listed, or absent here.
    for mapping in Mappings::builtin().iter() {
        for name in ddl::generated_names(&mapping.name) {
            let exists: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM pg_proc WHERE proname = $1)
                     OR EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = $1)",
            )
            .bind(&name)
            .fetch_one(&pool)
            .await
            .expect("catalog");
            assert_eq!(
                exists,
                stdout.contains(&format!("\"{name}\"")),
                "{name} in:\n{stdout}"
            );
        }
    }

    let out = authz_outbox(&url, &["uninstall", "--drop-outbox"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("would remove table \"public\".\"authz_outbox\""),
        "{stdout}"
    );
    assert!(
        stdout.contains("would remove table \"public\".\"_sqlx_migrations\""),
        "{stdout}"
    );

    assert_eq!(
        schema_dump(&pool).await,
        before,
        "a dry run changed the schema"
    );
    assert_eq!(outbox_rows(&pool).await, 1);
    write_agent(&pool, "a2").await;
    assert_eq!(
        outbox_rows(&pool).await,
        2,
        "capture still runs after a dry run"
    );
}

#[sqlx::test(migrations = false)]
async fn apply_stops_capture_keeps_the_rows_and_migrate_captures_again(pool: PgPool) {
    let pool = common::host_db(pool).await;
    write_agent(&pool, "a1").await;
    assert_eq!(outbox_rows(&pool).await, 1);
    let url = common::database_url(&pool).await;

    let out = authz_outbox(&url, &["uninstall", "--apply"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("removed trigger \"authz_outbox__agent__insert\" on \"public\".\"agents\""),
        "{stdout}"
    );
    assert!(
        stdout.contains("kept authz_outbox with 1 pending rows"),
        "{stdout}"
    );

    assert_eq!(outbox_rows(&pool).await, 1, "the pending row is kept");
    write_agent(&pool, "a2").await;
    assert_eq!(
        outbox_rows(&pool).await,
        1,
        "a write after uninstall was captured"
    );
    // Only the outbox's own tables and what keeps them are left.
    let left: Vec<String> = ours_left(&pool)
        .await
        .into_iter()
        .filter(|n| !n.starts_with("authz_outbox_owners") && !n.ends_with("_pkey"))
        .collect();
    assert!(
        left.iter().all(|n| !n.starts_with("authz_outbox__")
            && !n.starts_with("authz_outbox_capture")
            && n != "authz_outbox_desired"),
        "{left:?}"
    );

    // A second uninstall finds capture gone.
    let out = authz_outbox(&url, &["uninstall", "--apply"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.contains("removed trigger \"authz_outbox__"),
        "{stdout}"
    );

    // `migrate` installs capture again; a2, written meanwhile, stays
    // uncaptured (reconcile's to heal).
    authz_outbox(&url, &["migrate"]);
    write_agent(&pool, "a3").await;
    let ids: Vec<String> = sqlx::query_scalar("SELECT resource_id FROM authz_outbox ORDER BY id")
        .fetch_all(&pool)
        .await
        .expect("rows");
    assert_eq!(ids, ["a1", "a3"]);
}

/// `--apply` waits for a host transaction's lock at most `--lock-timeout`,
/// retries `--lock-retries` times, then gives up naming the holder, one
/// line, exit 2, with nothing removed.
#[sqlx::test(migrations = false)]
async fn a_held_lock_is_waited_for_briefly_then_named_and_nothing_changes(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let before = schema_dump(&pool).await;
    let mut holder = pool.begin().await.expect("begin");
    sqlx::query("LOCK TABLE tasks IN ROW EXCLUSIVE MODE")
        .execute(&mut *holder)
        .await
        .expect("host writer's lock");
    let url = common::database_url(&pool).await;
    let out = tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args([
                "uninstall",
                "--apply",
                "--lock-timeout",
                "100ms",
                "--lock-retries",
                "0",
            ])
            .env("DATABASE_URL", url)
            .output()
            .expect("binary runs")
    })
    .await
    .expect("thread");
    holder.rollback().await.expect("rollback");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("gave up after 1 attempts"), "{stderr}");
    assert!(stderr.contains("table tasks: pid"), "{stderr}");
    let after = schema_dump(&pool).await;
    assert!(after == before, "{}", dump_difference(&before, &after));
}

/// `_sqlx_migrations` shared with another sqlx-migrated tool: only our
/// versions' rows go; the table and the other tool's row stay.
#[sqlx::test(migrations = false)]
async fn another_tools_migration_records_are_kept(pool: PgPool) {
    let pool = common::host_db(pool).await;
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES (1, 'the host''s own', true, '\\x00', 0)",
    )
    .execute(&pool)
    .await
    .expect("another tool's record");
    let url = common::database_url(&pool).await;
    let out = authz_outbox(&url, &["uninstall", "--apply", "--drop-outbox"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("1 other rows kept"), "{stdout}");
    let versions: Vec<i64> = sqlx::query_scalar("SELECT version FROM _sqlx_migrations")
        .fetch_all(&pool)
        .await
        .expect("the table stays");
    assert_eq!(versions, [1]);
}
