//! Resource mappings on the host's real schema: capture follows liveness
//! (soft deletes included) for agents, api keys, tasks and schedules; a new
//! table is covered by a mapping file alone; `mappings check` names what is
//! wrong; an existing outbox survives the upgrade in order.

mod common;

use std::process::Command;

use authz_outbox::mapping::Mappings;
use common::{config, rows, run_once};
use serde_json::json;
use sqlx::PgPool;

/// Runs `statements` in one transaction, as the host would, with its
/// request's principal set (or none).
async fn host_tx(pool: &PgPool, principal: Option<&str>, statements: &[&str]) {
    let mut tx = pool.begin().await.expect("begin");
    if let Some(p) = principal {
        sqlx::query("SELECT set_config('authz_outbox.principal', $1, true)")
            .bind(p)
            .execute(&mut *tx)
            .await
            .expect("principal");
    }
    for s in statements {
        sqlx::raw_sql(sqlx::AssertSqlSafe(s.to_string()))
            .execute(&mut *tx)
            .await
            .expect(s);
    }
    tx.commit().await.expect("commit");
}

const U1: Option<&str> = Some(r#"{"user_id":"u1"}"#);

/// (operation, resource, parent) of every outbox row, in order.
async fn ops(pool: &PgPool) -> Vec<(String, String, Option<String>)> {
    rows(pool)
        .await
        .into_iter()
        .map(|r| {
            (
                r.operation,
                format!("{}:{}", r.resource_type, r.resource_id),
                r.parent_id,
            )
        })
        .collect()
}

fn op(o: &str, r: &str, p: Option<&str>) -> (String, String, Option<String>) {
    (o.into(), r.into(), p.map(Into::into))
}

async fn new_agent(pool: &PgPool, id: &str) {
    host_tx(
        pool,
        U1,
        &[&format!(
            "INSERT INTO agents (id, name, description, status) VALUES ('{id}', '{id}', 'd', 'READY')"
        )],
    )
    .await;
}

#[sqlx::test(migrations = false)]
async fn agent_soft_delete_deregisters_and_undelete_registers_again(pool: PgPool) {
    let pool = common::host_db(pool).await;
    new_agent(&pool, "a1").await;
    // Status changes between live statuses are not the authorization graph's business.
    host_tx(
        &pool,
        U1,
        &["UPDATE agents SET status = 'BUILDING' WHERE id = 'a1'"],
    )
    .await;
    host_tx(
        &pool,
        U1,
        &["UPDATE agents SET status = 'DELETED' WHERE id = 'a1'"],
    )
    .await;
    // A soft-deleted agent touched again stays deregistered.
    host_tx(
        &pool,
        U1,
        &["UPDATE agents SET description = 'x' WHERE id = 'a1'"],
    )
    .await;
    host_tx(
        &pool,
        U1,
        &["UPDATE agents SET status = 'READY' WHERE id = 'a1'"],
    )
    .await;
    assert_eq!(
        ops(&pool).await,
        [
            op("register", "agent:a1", None),
            op("deregister", "agent:a1", None),
            op("register", "agent:a1", None),
        ]
    );
    // Inserted already deleted: nothing to register.
    host_tx(
        &pool,
        U1,
        &["INSERT INTO agents (id, name, description, status) VALUES ('a2', 'a2', '', 'DELETED')"],
    )
    .await;
    assert_eq!(ops(&pool).await.len(), 3);
}

/// The host creates a task as tasks, then task_agents, then
/// agent_task_tracker, in one transaction.
async fn host_creates_task(pool: &PgPool, task: &str, agent: &str) {
    host_tx(
        pool,
        U1,
        &[
            &format!("INSERT INTO tasks (id, name, status) VALUES ('{task}', '{task}', 'RUNNING')"),
            &format!("INSERT INTO task_agents (task_id, agent_id) VALUES ('{task}', '{agent}')"),
            &format!(
                "INSERT INTO agent_task_tracker (id, agent_id, task_id) VALUES ('tr-{task}', '{agent}', '{task}')"
            ),
        ],
    )
    .await;
}

#[sqlx::test(migrations = false)]
async fn a_task_registers_once_under_its_agent_and_soft_delete_deregisters(pool: PgPool) {
    let pool = common::host_db(pool).await;
    new_agent(&pool, "a1").await;
    new_agent(&pool, "a2").await;
    host_creates_task(&pool, "t1", "a1").await;
    assert_eq!(
        ops(&pool).await[2..],
        [op("register", "task:t1", Some("a1"))]
    );
    // Re-parented behind the task's back: deregister, register under the new agent.
    host_tx(
        &pool,
        U1,
        &["UPDATE task_agents SET agent_id = 'a2' WHERE task_id = 't1'"],
    )
    .await;
    host_tx(
        &pool,
        U1,
        &["UPDATE tasks SET status = 'DELETED' WHERE id = 't1'"],
    )
    .await;
    assert_eq!(
        ops(&pool).await[2..],
        [
            op("register", "task:t1", Some("a1")),
            op("deregister", "task:t1", Some("a1")),
            op("register", "task:t1", Some("a2")),
            op("deregister", "task:t1", Some("a2")),
        ]
    );
    // A hard delete of a soft-deleted task (and its links, by cascade) changes nothing more.
    host_tx(&pool, U1, &["DELETE FROM tasks WHERE id = 't1'"]).await;
    assert_eq!(ops(&pool).await.len(), 6);
    // A live task deleted hard (links by cascade) is deregistered exactly
    // once (the cascade may remove the link first, so the deregister may
    // not name the parent; a deregister removes everything anyway).
    host_creates_task(&pool, "t2", "a1").await;
    host_tx(&pool, U1, &["DELETE FROM tasks WHERE id = 't2'"]).await;
    let tail: Vec<(String, String)> = ops(&pool).await[6..]
        .iter()
        .map(|(o, r, _)| (o.clone(), r.clone()))
        .collect();
    assert_eq!(
        tail,
        [
            ("register".to_string(), "task:t2".to_string()),
            ("deregister".to_string(), "task:t2".to_string()),
        ]
    );
}

#[sqlx::test(migrations = false)]
async fn the_hosts_hottest_task_writes_fire_no_capture_at_all(pool: PgPool) {
    let pool = common::host_db(pool).await;
    new_agent(&pool, "a1").await;
    host_creates_task(&pool, "t1", "a1").await;
    let before = rows(&pool).await.len();
    let mut conn = pool.acquire().await.expect("conn");
    // Count PL/pgSQL calls in this session: the WHEN clause of the update
    // trigger must keep the capture function from running at all.
    sqlx::query("SET track_functions = 'pl'")
        .execute(&mut *conn)
        .await
        .expect("track");
    for status in ["COMPLETED", "FAILED", "RUNNING", "TIMED_OUT", "CANCELED"] {
        sqlx::query("UPDATE tasks SET status = $1::taskstatus WHERE id = 't1'")
            .bind(status)
            .execute(&mut *conn)
            .await
            .expect("status change");
    }
    sqlx::query("UPDATE tasks SET status = NULL WHERE id = 't1'")
        .execute(&mut *conn)
        .await
        .expect("NULL is live");
    sqlx::query("UPDATE tasks SET updated_at = now(), params = '{\"a\":1}' WHERE id = 't1'")
        .execute(&mut *conn)
        .await
        .expect("touch");
    let calls: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_xact_user_functions
         WHERE funcname LIKE 'authz_outbox%'",
    )
    .fetch_one(&mut *conn)
    .await
    .expect("stats");
    // Autocommit: each statement was its own transaction; read the session's totals.
    let session_calls: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_user_functions
         WHERE funcname LIKE 'authz_outbox%'",
    )
    .fetch_one(&mut *conn)
    .await
    .expect("stats");
    assert_eq!(calls + session_calls, 0, "capture functions ran");
    assert_eq!(rows(&pool).await.len(), before, "nothing enqueued");
}

#[sqlx::test(migrations = false)]
async fn a_live_to_live_status_update_can_fire_only_the_liveness_test(pool: PgPool) {
    let pool = common::host_db(pool).await;
    // PostgreSQL compiles the WHEN clause of every row trigger whose OF
    // list the statement's SET list names, once per statement: the hot
    // `SET status = …, updated_at = now()` must reach no WHEN but the
    // liveness test (issue 24: the identity test beside it cost a
    // live-to-live update about a tenth of its CPU).
    let whens: Vec<String> = sqlx::query_scalar(
        "SELECT pg_get_triggerdef(t.oid) FROM pg_trigger t
         WHERE t.tgrelid = 'tasks'::regclass AND NOT t.tgisinternal
           AND t.tgtype & 16 <> 0
           AND (SELECT array_agg(a.attname::text) FROM pg_attribute a
                WHERE a.attrelid = t.tgrelid AND a.attnum = ANY (t.tgattr))
               && ARRAY['status', 'updated_at']",
    )
    .fetch_all(&pool)
    .await
    .expect("triggers");
    assert_eq!(whens.len(), 1, "{whens:#?}");
    assert!(
        whens[0].contains("(old.status IS DISTINCT FROM")
            && !whens[0].contains("old.id")
            && !whens[0].contains("COALESCE"),
        "{}",
        whens[0]
    );
}

#[sqlx::test(migrations = false)]
async fn an_update_calls_the_capture_once_whichever_columns_it_changes(pool: PgPool) {
    let pool = common::host_db(pool).await;
    new_agent(&pool, "a1").await;
    host_tx(
        &pool,
        None,
        &[
            r#"INSERT INTO agent_run_schedules (id, agent_id, name, creator_principal)
             VALUES ('s1', 'a1', 'nightly', '{"user_id":"u1"}')"#,
        ],
    )
    .await;
    let mut conn = pool.acquire().await.expect("conn");
    sqlx::query("SET track_functions = 'pl'")
        .execute(&mut *conn)
        .await
        .expect("track");
    // (statement, capture calls it makes): the selector alone, the selector
    // and liveness together (both update triggers' columns), liveness
    // alone, neither.
    let cases = [
        (
            "UPDATE agent_run_schedules SET id = 's2' WHERE id = 's1'",
            1,
        ),
        (
            "UPDATE agent_run_schedules SET id = 's3', deleted_at = now() WHERE id = 's2'",
            1,
        ),
        (
            "UPDATE agent_run_schedules SET deleted_at = NULL WHERE id = 's3'",
            1,
        ),
        (
            "UPDATE agent_run_schedules SET version = 2, deleted_at = NULL WHERE id = 's3'",
            0,
        ),
    ];
    // Calls so far by this backend: the ones not yet flushed to the shared
    // statistics plus the flushed ones (read without a cached snapshot).
    sqlx::query("SET stats_fetch_consistency = none")
        .execute(&mut *conn)
        .await
        .expect("no snapshot");
    let total = "SELECT ((SELECT coalesce(sum(calls), 0) FROM pg_stat_xact_user_functions
                           WHERE funcname = 'authz_outbox_capture__schedule')
                       + (SELECT coalesce(sum(calls), 0) FROM pg_stat_user_functions
                           WHERE funcname = 'authz_outbox_capture__schedule'))::bigint";
    for (sql, expected) in cases {
        let before: i64 = sqlx::query_scalar(total)
            .fetch_one(&mut *conn)
            .await
            .expect("stats");
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut *conn)
            .await
            .expect(sql);
        let after: i64 = sqlx::query_scalar(total)
            .fetch_one(&mut *conn)
            .await
            .expect("stats");
        assert_eq!(after - before, expected, "{sql}");
    }
    let schedules: Vec<_> = ops(&pool)
        .await
        .into_iter()
        .filter(|(_, r, _)| r.starts_with("schedule:"))
        .map(|(o, _, _)| o)
        .collect();
    // s1 registered; moved to s2 (deregister, register); s2 moved and
    // deleted at once (deregister only); s3 undeleted (register).
    assert_eq!(
        schedules,
        [
            "register",
            "deregister",
            "register",
            "deregister",
            "register"
        ]
    );
}

#[sqlx::test(migrations = false)]
async fn a_schedule_registers_with_its_own_creator_and_soft_delete_deregisters(pool: PgPool) {
    let pool = common::host_db(pool).await;
    new_agent(&pool, "a1").await;
    // No transaction setting: the row's creator_principal is the creator
    // (and a credential in it is never stored).
    host_tx(
        &pool,
        None,
        &[r#"INSERT INTO agent_run_schedules (id, agent_id, name, creator_principal)
             VALUES ('s1', 'a1', 'nightly', '{"user_id":"owner-7","account_id":"acc","api_key":"sk-live-1"}')"#],
    )
    .await;
    host_tx(
        &pool,
        None,
        &["UPDATE agent_run_schedules SET next_run_at = now(), version = 2 WHERE id = 's1'"],
    )
    .await;
    host_tx(
        &pool,
        None,
        &["UPDATE agent_run_schedules SET deleted_at = now() WHERE id = 's1'"],
    )
    .await;
    let all = rows(&pool).await;
    let schedule: Vec<_> = all
        .iter()
        .filter(|r| r.resource_type == "schedule")
        .collect();
    assert_eq!(schedule.len(), 2, "{schedule:?}");
    assert_eq!(schedule[0].operation, "register");
    assert_eq!(schedule[0].resource_id, "run-schedule::a1::s1");
    assert_eq!(schedule[0].parent_id.as_deref(), Some("a1"));
    assert_eq!(
        schedule[0].principal,
        Some(json!({"user_id": "owner-7", "account_id": "acc"}))
    );
    assert_eq!(schedule[0].state, "pending");
    assert_eq!(schedule[1].operation, "deregister");
    assert_eq!(schedule[1].resource_id, "run-schedule::a1::s1");
}

#[sqlx::test(migrations = false)]
async fn the_worker_judges_staleness_by_liveness_for_every_type(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let dev = common::dev_server().await;
    new_agent(&pool, "a1").await;
    new_agent(&pool, "a2").await;
    // Registered, then soft-deleted before any delivery: the register is
    // settled without a request (superseded), the deregister delivered.
    host_tx(
        &pool,
        U1,
        &["UPDATE agents SET status = 'DELETED' WHERE id = 'a2'"],
    )
    .await;
    let report = run_once(&pool, &dev.base_url(), config("w")).await;
    let a2: Vec<String> = rows(&pool)
        .await
        .into_iter()
        .filter(|r| r.resource_id == "a2")
        .map(|r| r.state)
        .collect();
    assert_eq!(a2, ["superseded", "superseded"], "{report:?}");
    // A planted register of an agent that is soft-deleted is stale.
    sqlx::query(
        "INSERT INTO authz_outbox (resource_type, resource_id, operation, principal)
         VALUES ('agent', 'a2', 'register', '{\"user_id\":\"u1\"}')",
    )
    .execute(&pool)
    .await
    .expect("planted");
    run_once(&pool, &dev.base_url(), config("w")).await;
    let planted = rows(&pool).await.into_iter().last().expect("row");
    assert_eq!(planted.state, "superseded");
    assert!(
        planted
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("no longer")),
        "{planted:?}"
    );
    dev.shutdown().await;
}

/// A table the built-ins know nothing about, covered by a file alone.
const SERVICE_KEYS: &str = r#"
[[mapping]]
name = "service_api_keys"
type = "api_key"
table = "service_api_keys"
live = "revoked_at IS NULL"
parent = { type = "agent", column = "agent_id" }
"#;

async fn check(base_url: &str, user: &str, kind: &str, id: &str) -> bool {
    let response = reqwest::Client::new()
        .post(format!("{base_url}/v1/authz/check"))
        .json(&json!({
            "principal": {"user_id": user},
            "resource": {"type": kind, "selector": id},
            "operation": "read"
        }))
        .send()
        .await
        .expect("check answers");
    match response.status().as_u16() {
        200 => true,
        403 => false,
        other => panic!("unexpected check status {other}"),
    }
}

#[sqlx::test(migrations = false)]
async fn a_mapping_file_covers_a_new_table_end_to_end(pool: PgPool) {
    let pool = common::host_db(pool).await;
    sqlx::raw_sql(
        "CREATE TABLE service_api_keys (
             id text PRIMARY KEY, agent_id varchar(64) NOT NULL REFERENCES agents (id),
             secret text NOT NULL, revoked_at timestamptz, created_at timestamptz DEFAULT now())",
    )
    .execute(&pool)
    .await
    .expect("new table");
    let mappings = Mappings::from_toml(SERVICE_KEYS).expect("valid file");
    let report = authz_outbox::migrate::migrate_with(&pool, &mappings, &Default::default())
        .await
        .expect("migrate");
    assert_eq!(
        report
            .mappings
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>(),
        ["mapping service_api_keys: installed"]
    );
    let dev = common::dev_server().await;
    new_agent(&pool, "a1").await;
    host_tx(
        &pool,
        U1,
        &["INSERT INTO service_api_keys (id, agent_id, secret) VALUES ('sk1', 'a1', 'hidden')"],
    )
    .await;
    run_once(&pool, &dev.base_url(), config("w")).await;
    assert!(check(&dev.base_url(), "u1", "api_key", "sk1").await);
    host_tx(
        &pool,
        U1,
        &["UPDATE service_api_keys SET revoked_at = now() WHERE id = 'sk1'"],
    )
    .await;
    run_once(&pool, &dev.base_url(), config("w")).await;
    assert!(!check(&dev.base_url(), "u1", "api_key", "sk1").await);
    assert!(
        rows(&pool).await.iter().all(|r| r.state == "delivered"),
        "{:?}",
        rows(&pool).await
    );
    // Migrating again with the same file changes nothing; without it, the
    // mapping is removed and the table is no longer captured.
    let again = authz_outbox::migrate::migrate_with(&pool, &mappings, &Default::default())
        .await
        .expect("migrate");
    assert!(again.mappings.is_empty() && again.migrations.is_empty());
    let removed = authz_outbox::db::migrate(&pool).await.expect("migrate");
    assert_eq!(
        removed
            .mappings
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>(),
        ["mapping service_api_keys: removed"]
    );
    let before = rows(&pool).await.len();
    host_tx(
        &pool,
        U1,
        &["INSERT INTO service_api_keys (id, agent_id, secret) VALUES ('sk2', 'a1', 'x')"],
    )
    .await;
    assert_eq!(rows(&pool).await.len(), before);
    dev.shutdown().await;
}

fn binary(
    database_url: &str,
    args: &[&str],
    mappings: Option<&std::path::Path>,
) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_authz-outbox"));
    cmd.args(args)
        .env("DATABASE_URL", database_url)
        .env_remove("AUTHZ_OUTBOX_MAPPINGS");
    if let Some(path) = mappings {
        cmd.env("AUTHZ_OUTBOX_MAPPINGS", path);
    }
    let out = cmd.output().expect("binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[sqlx::test(migrations = false)]
async fn mappings_check_names_each_kind_of_bad_mapping(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let url = common::database_url(&pool).await;
    let dir = std::env::temp_dir().join(format!("mappings-check-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("dir");
    let cases = [
        (
            "[[mapping]]\nname = \"m\"\ntype = \"task\"\ntable = \"no_such_table\"",
            "mapping m: table no_such_table does not exist",
        ),
        (
            "[[mapping]]\ntype = \"task\"\ntable = \"tasks\"\nenabled = false\n\n[[mapping]]\nname = \"m\"\ntype = \"task\"\ntable = \"tasks\"\nselector = \"{nope}\"",
            "mapping m: selector column nope does not exist in table tasks",
        ),
        (
            "[[mapping]]\ntype = \"task\"\ntable = \"tasks\"\nenabled = false\n\n[[mapping]]\nname = \"m\"\ntype = \"task\"\ntable = \"tasks\"\nparent = { type = \"agent\", column = \"params\" }",
            "mapping m: parent column tasks.params is jsonb",
        ),
        (
            "[[mapping]]\ntype = \"task\"\ntable = \"tasks\"\nenabled = false\n\n[[mapping]]\nname = \"m\"\ntype = \"task\"\ntable = \"tasks\"\nlive = \"status IS NOT DELETED\"",
            "mapping m: live predicate does not compile",
        ),
        (
            "[[mapping]]\ntype = \"task\"\ntable = \"tasks\"\nenabled = false\n\n[[mapping]]\nname = \"m\"\ntype = \"task\"\ntable = \"tasks\"\nlive = \"status\"",
            "mapping m: live predicate is public.taskstatus, not boolean",
        ),
        (
            "[[mapping]]\ntype = \"task\"\ntable = \"tasks\"\nenabled = false\n\n[[mapping]]\nname = \"m\"\ntype = \"task\"\ntable = \"tasks\"\nlive = \"status = 1; DROP TABLE tasks\"",
            "mapping m: live predicate must not contain \";\"",
        ),
        (
            // A probe that would run long is cut off, not waited for.
            "[[mapping]]\ntype = \"task\"\ntable = \"tasks\"\nenabled = false\n\n[[mapping]]\nname = \"m\"\ntype = \"task\"\ntable = \"tasks\"\nlive = \"pg_sleep(60) IS NULL\"",
            "mapping m: live predicate does not compile: canceling statement due to statement timeout",
        ),
        (
            "[[mapping]]\nname = \"tsk\"\ntype = \"task\"\ntable = \"tasks\"\nenabled = false",
            "mapping tsk: enabled = false names no built-in mapping",
        ),
        (
            "[[mapping]]\nname = \"a_mapping_name_of_thirty_three_ch\"\ntype = \"task\"\ntable = \"agent_task_tracker\"",
            "mapping a_mapping_name_of_thirty_three_ch: name is too long: it generates authz_outbox_truncate__a_mapping_name_of_thirty_three_ch__parent",
        ),
        (
            "[[mapping]]\nname = \"x\"\ntype = \"task\"\ntable = \"agent_task_tracker\"\n\n[[mapping]]\nname = \"x__parent\"\ntype = \"task\"\ntable = \"agent_run_schedules\"",
            "mapping x__parent: it generates authz_outbox_capture__x__parent, as mapping x does",
        ),
        (
            "[[mapping]]\nname = \"m\"\ntype = \"task\"\ntable = \"tasks\"",
            "mapping task: mapping m already maps table tasks to type task",
        ),
    ];
    for (i, (toml, expected)) in cases.iter().enumerate() {
        let path = dir.join(format!("bad{i}.toml"));
        std::fs::write(&path, toml).expect("write");
        for command in [&["mappings", "check"][..], &["migrate"][..]] {
            let (code, _, stderr) = binary(&url, command, Some(&path));
            assert_eq!(code, 2, "{command:?} {toml}: {stderr}");
            assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
            assert!(
                stderr.contains(expected),
                "{command:?} {toml}: expected {expected:?} in {stderr:?}"
            );
        }
    }
    // Nothing was half-installed by the failed migrates.
    let installed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM authz_outbox_mappings WHERE name = 'm'")
            .fetch_one(&pool)
            .await
            .expect("count");
    assert_eq!(installed, 0);
    let triggers: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'authz_outbox__m__%'",
    )
    .fetch_one(&pool)
    .await
    .expect("count");
    assert_eq!(triggers, 0);
    // The good built-ins check out, and list shows what is in force.
    let (code, stdout, stderr) = binary(&url, &["mappings", "check"], None);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("ok      schedule (schedule on agent_run_schedules)"),
        "{stdout}"
    );
    let (code, stdout, _) = binary(&url, &["mappings", "list"], None);
    assert_eq!(code, 0);
    assert!(
        stdout.contains("task: type=task table=tasks selector={id} parent=agent from task_agents.agent_id (on task_id = id) live=status IS DISTINCT FROM 'DELETED'"),
        "{stdout}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[sqlx::test(migrations = false)]
async fn migrate_names_what_it_changed_and_says_when_nothing(pool: PgPool) {
    sqlx::raw_sql(common::HOST_SCHEMA)
        .execute(&pool)
        .await
        .expect("host schema");
    let url = common::database_url(&pool).await;
    let (code, stdout, stderr) = binary(&url, &["migrate"], None);
    assert_eq!(code, 0, "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("applied migration 20261201000001")),
        "{stdout}"
    );
    for name in ["agent", "api_key", "task", "schedule"] {
        assert!(
            lines.contains(&format!("mapping {name}: installed").as_str()),
            "{stdout}"
        );
    }
    assert!(
        !stderr.contains("NOTICE") && !stderr.contains("skipping"),
        "{stderr}"
    );
    assert!(
        lines.contains(&"applied migration 20261123000001 (retired: recorded, changes nothing)"),
        "a retired migration is not called a change: {stdout}"
    );
    let (code, stdout, stderr) = binary(&url, &["migrate"], None);
    assert_eq!(code, 0);
    assert_eq!(
        stdout, "nothing to do: every migration is applied and the capture matches the mappings\n",
        "second migrate says it changed nothing"
    );
    assert_eq!(stderr, "");
}

#[sqlx::test(migrations = false)]
async fn an_outbox_from_before_the_upgrade_drains_in_order(pool: PgPool) {
    // The previous release: its three migrations, its own triggers.
    sqlx::raw_sql(common::HOST_SCHEMA)
        .execute(&pool)
        .await
        .expect("host");
    for sql in [
        include_str!("../migrations/20261123000001_retired_host_tables.sql"),
        include_str!("../migrations/20261123000002_authz_outbox.sql"),
        include_str!("../migrations/20261123000003_capture_fast_path.sql"),
    ] {
        sqlx::raw_sql(sql)
            .execute(&pool)
            .await
            .expect("old migration");
    }
    new_agent(&pool, "a1").await;
    for k in ["k1", "k2"] {
        host_tx(&pool, U1, &[&format!(
            "INSERT INTO agent_api_keys (id, agent_id, name, api_key_type, api_key) VALUES ('{k}', 'a1', '{k}', 'EXTERNAL', 's')"
        )]).await;
    }
    host_tx(&pool, U1, &["DELETE FROM agent_api_keys WHERE id = 'k1'"]).await;
    let before = ops(&pool).await;
    assert_eq!(before.len(), 4, "captured by the old triggers");

    authz_outbox::db::migrate(&pool).await.expect("upgrade");
    let legacy: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_trigger WHERE tgname IN ('authz_outbox_capture_insert_delete', 'authz_outbox_capture_rekey')",
    )
    .fetch_one(&pool)
    .await
    .expect("count");
    assert_eq!(legacy, 0, "old triggers replaced");
    assert_eq!(ops(&pool).await, before, "existing rows untouched");
    // New writes are captured once, by the mappings, after the old rows.
    host_tx(&pool, U1, &["DELETE FROM agent_api_keys WHERE id = 'k2'"]).await;
    assert_eq!(
        ops(&pool).await[4..],
        [op("deregister", "api_key:k2", Some("a1"))]
    );

    let dev = common::dev_server().await;
    run_once(&pool, &dev.base_url(), config("w")).await;
    let done: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT resource_id, operation, state FROM authz_outbox ORDER BY delivered_at NULLS LAST, id",
    )
    .fetch_all(&pool)
    .await
    .expect("rows");
    assert!(
        done.iter()
            .all(|(_, _, s)| s == "delivered" || s == "superseded"),
        "{done:?}"
    );
    assert!(!check(&dev.base_url(), "u1", "api_key", "k1").await);
    assert!(!check(&dev.base_url(), "u1", "api_key", "k2").await);
    dev.shutdown().await;
}

/// The agent mapping keeps the provider's `tenant` claim; api keys keep the
/// identity fields only.
const AGENT_KEEPS_TENANT: &str = r#"
[[mapping]]
type = "agent"
table = "agents"
live = "status IS DISTINCT FROM 'DELETED'"
principal_fields = ["user_id", "tenant"]
"#;

#[sqlx::test(migrations = false)]
async fn each_type_keeps_its_mappings_principal_fields_in_capture_and_worker(pool: PgPool) {
    use common::scripted_auth::{Answer, ScriptedAuth};
    let pool = common::host_db(pool).await;
    let mappings = Mappings::from_toml(AGENT_KEEPS_TENANT).expect("valid");
    authz_outbox::migrate::migrate_with(&pool, &mappings, &Default::default())
        .await
        .expect("migrate");
    let who =
        Some(r#"{"user_id":"u1","tenant":"t-9","account_id":"acc","refresh_token":"rt-secret"}"#);
    host_tx(
        &pool,
        who,
        &["INSERT INTO agents (id, name, description, status) VALUES ('a1', 'a1', '', 'READY')"],
    )
    .await;
    host_tx(
        &pool,
        who,
        &["INSERT INTO agent_api_keys (id, agent_id, name, api_key_type, api_key) VALUES ('k1', 'a1', 'k', 'EXTERNAL', 's')"],
    )
    .await;
    let stored: Vec<(String, serde_json::Value)> = rows(&pool)
        .await
        .into_iter()
        .map(|r| (r.resource_type, r.principal.unwrap_or_default()))
        .collect();
    assert_eq!(
        stored,
        [
            (
                "agent".to_string(),
                json!({"user_id": "u1", "tenant": "t-9"})
            ),
            (
                "api_key".to_string(),
                json!({"user_id": "u1", "account_id": "acc"})
            ),
        ]
    );
    // Whatever a writer puts straight into the outbox, the worker sends
    // only what the type's mapping keeps.
    sqlx::query(
        "UPDATE authz_outbox SET principal = principal || '{\"tenant\":\"t-9\",\"token\":\"tk\"}'",
    )
    .execute(&pool)
    .await
    .expect("tampered");
    let auth = ScriptedAuth::always(Answer::ok()).await;
    run_once(&pool, &auth.url(), config("w")).await;
    let sent: Vec<(String, serde_json::Value)> = auth
        .seen()
        .into_iter()
        .map(|s| {
            (
                s.body["resource"]["type"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                s.body["principal"].clone(),
            )
        })
        .collect();
    assert!(
        sent.contains(&("agent".into(), json!({"user_id": "u1", "tenant": "t-9"}))),
        "{sent:?}"
    );
    assert!(
        sent.contains(&(
            "api_key".into(),
            json!({"user_id": "u1", "account_id": "acc"})
        )),
        "{sent:?}"
    );
}

#[sqlx::test(migrations = false)]
async fn the_capture_and_the_worker_agree_on_what_a_credential_is(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let mut names: Vec<String> = Vec::new();
    for word in authz_outbox::domain::CREDENTIAL_WORDS
        .iter()
        .chain(authz_outbox::domain::CREDENTIAL_NAMES)
    {
        names.push(word.to_string());
        names.push(word.to_uppercase());
        names.push(format!(" {word} "));
        names.push(format!("github_{word}"));
        names.push(format!("x-{word}-v2"));
    }
    // Every style a provider may write a credential in: each is dropped
    // by both sides (these five were stored and sent before the rule
    // folded case and separators).
    let credentials = [
        "clientSecret",
        "accessToken",
        "password_hash",
        "authToken",
        "secret_key",
        "api_key",
        "ApiKey",
        "X-API-KEY",
        "private.key",
        "Pwd",
    ];
    for name in credentials {
        assert!(
            authz_outbox::domain::is_credential_key(name),
            "{name} is a credential"
        );
        let sql: bool = sqlx::query_scalar("SELECT authz_outbox_is_credential_field($1)")
            .bind(name)
            .fetch_one(&pool)
            .await
            .expect("query");
        assert!(sql, "{name} is a credential to the trigger");
        names.push(name.to_string());
    }
    let identities = [
        "user_id",
        "tenant",
        "account_id",
        "service_account_id",
        "principal_type",
        "email",
    ];
    for name in identities {
        assert!(
            !authz_outbox::domain::is_credential_key(name),
            "{name} is kept"
        );
        names.push(name.to_string());
    }
    for name in names {
        let sql: bool = sqlx::query_scalar("SELECT authz_outbox_is_credential_field($1)")
            .bind(&name)
            .fetch_one(&pool)
            .await
            .expect("query");
        assert_eq!(
            sql,
            authz_outbox::domain::is_credential_key(&name),
            "{name:?}"
        );
    }
}

/// `authz_outbox_desired` is what the reconcile role reads: a mapping
/// change must not take its grant away (the view is replaced, not dropped),
/// and an upgrade that changes the view's shape regenerates it even when
/// no mapping changed.
#[sqlx::test(migrations = false)]
async fn the_desired_view_keeps_its_grants_and_follows_upgrades(pool: PgPool) {
    let pool = common::host_db(pool).await;
    host_tx(
        &pool,
        None,
        &[
            // Roles outlive the test's database: one left by an earlier run is fine.
            "DO $$ BEGIN CREATE ROLE desired_reader; EXCEPTION WHEN duplicate_object THEN NULL; END $$",
            "GRANT SELECT ON authz_outbox_desired TO desired_reader",
        ],
    )
    .await;
    let can_read = || async {
        sqlx::query_scalar::<_, bool>(
            "SELECT has_table_privilege('desired_reader', 'authz_outbox_desired', 'SELECT')",
        )
        .fetch_one(&pool)
        .await
        .expect("privilege")
    };
    let without_schedules = Mappings::from_toml(
        "[[mapping]]\ntype = \"schedule\"\ntable = \"agent_run_schedules\"\nenabled = false",
    )
    .expect("mappings");
    let report =
        authz_outbox::migrate::migrate_with(&pool, &without_schedules, &Default::default())
            .await
            .expect("migrate");
    assert!(!report.mappings.is_empty(), "a mapping was removed");
    assert!(can_read().await, "the grant survives the mapping change");

    // The view as a release before relationship-aware reconcile left it.
    host_tx(
        &pool,
        None,
        &[
            "DROP VIEW authz_outbox_desired",
            "CREATE VIEW authz_outbox_desired AS SELECT NULL::text AS mapping, NULL::text AS resource_type, NULL::text AS resource_id, NULL::text AS parent_type, NULL::text AS parent_id, NULL::timestamptz AS created_at, NULL::jsonb AS creator WHERE false",
            "GRANT SELECT ON authz_outbox_desired TO desired_reader",
        ],
    )
    .await;
    let report =
        authz_outbox::migrate::migrate_with(&pool, &without_schedules, &Default::default())
            .await
            .expect("migrate");
    assert!(report.mappings.is_empty(), "no mapping changed");
    let columns: Vec<String> = sqlx::query_scalar(
        "SELECT attname::text FROM pg_attribute WHERE attrelid = 'authz_outbox_desired'::regclass AND attnum > 0 ORDER BY attnum",
    )
    .fetch_all(&pool)
    .await
    .expect("columns");
    assert_eq!(columns[7..], ["attributes", "edges"], "regenerated");
    assert!(can_read().await, "and still readable");
}

/// A selector whose column values hold the template's own separator
/// (`run-schedule::{agent_id}::{id}` with `::` inside the agent id, or the
/// schedule id) still finds its row: every split is tried, and only the
/// row that rebuilds the exact selector matches. The worker then delivers
/// the register instead of settling it as stale.
#[sqlx::test(migrations = false)]
async fn a_selector_whose_values_hold_the_separator_finds_its_row(pool: PgPool) {
    let pool = common::host_db(pool).await;
    sqlx::raw_sql(
        r#"INSERT INTO agents (id, name, description, status) VALUES
               ('team::a1', 'n1', '', 'READY'), ('team', 'n2', '', 'READY'), ('a::', 'n3', '', 'READY');
           INSERT INTO agent_run_schedules (id, agent_id, name, creator_principal) VALUES
               ('s1', 'team::a1', 'x', '{"user_id":"u1"}'),
               ('x::y', 'team', 'y', '{"user_id":"u1"}'),
               (':s', 'a::', 'z', '{"user_id":"u1"}');"#,
    )
    .execute(&pool)
    .await
    .expect("rows");
    for (selector, parent, live) in [
        ("run-schedule::team::a1::s1", Some("team::a1"), true),
        ("run-schedule::team::x::y", Some("team"), true),
        ("run-schedule::a:::::s", Some("a::"), true),
        ("run-schedule::team::a1::s1", None, true),
        // Near misses: no row rebuilds these.
        ("run-schedule::team::a1::s1", Some("team"), false),
        ("run-schedule::team::a1", None, false),
        ("run-schedule::team::x", None, false),
    ] {
        let found: bool = sqlx::query_scalar("SELECT authz_outbox_live__schedule($1, $2)")
            .bind(selector)
            .bind(parent)
            .fetch_one(&pool)
            .await
            .expect("lookup");
        assert_eq!(found, live, "{selector} under {parent:?}");
    }
    let dev = common::dev_server().await;
    let report = common::run_once(&pool, &dev.base_url(), common::config("w1")).await;
    let delivered: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM authz_outbox WHERE resource_type = 'schedule' AND state = 'delivered'",
    )
    .fetch_one(&pool)
    .await
    .expect("count");
    assert_eq!(delivered, 3, "{report:?}");
    dev.shutdown().await;
}

/// A table keyed by a type of the host's own (a domain): the generated
/// functions name it with its schema, as they run with only the catalog on
/// their search path; `check` and `migrate` both accept it, and a write
/// through the join table is captured.
#[sqlx::test(migrations = false)]
async fn a_key_of_the_hosts_own_type_is_named_with_its_schema(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let url = common::database_url(&pool).await;
    sqlx::raw_sql(
        r#"CREATE DOMAIN public.doc_ref AS varchar(64);
           CREATE TABLE public.docs (id public.doc_ref PRIMARY KEY, title text);
           CREATE TABLE public.doc_links (doc_id public.doc_ref REFERENCES public.docs (id),
                                          agent_id varchar REFERENCES agents (id),
                                          PRIMARY KEY (doc_id, agent_id));"#,
    )
    .execute(&pool)
    .await
    .expect("tables");
    let path = std::env::temp_dir().join(format!("domain-{}.toml", uuid::Uuid::new_v4()));
    std::fs::write(
        &path,
        r#"[[mapping]]
name = "docs"
type = "task"
table = "docs"
parent = { type = "agent", column = "agent_id", join = { table = "doc_links", on = "doc_id", references = "id" } }
"#,
    )
    .expect("write");
    for command in [&["mappings", "check"][..], &["migrate"][..]] {
        let (code, stdout, stderr) = binary(&url, command, Some(&path));
        assert_eq!(code, 0, "{command:?}: {stdout}{stderr}");
    }
    new_agent(&pool, "a1").await;
    host_tx(
        &pool,
        U1,
        &[
            "INSERT INTO docs (id, title) VALUES ('d1', 't')",
            "INSERT INTO doc_links (doc_id, agent_id) VALUES ('d1', 'a1')",
        ],
    )
    .await;
    let registered: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM authz_outbox WHERE resource_id = 'd1' AND operation = 'register' AND parent_id = 'a1'",
    )
    .fetch_one(&pool)
    .await
    .expect("count");
    assert_eq!(registered, 1);
    std::fs::remove_file(&path).ok();
}

/// A table in a schema of its own (`crm.accounts`), named `schema.table`
/// in the mapping: checked, installed, captured (TRUNCATE too), and
/// removed again, quoted throughout.
#[sqlx::test(migrations = false)]
async fn a_table_in_another_schema_is_mapped_as_schema_dot_table(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let url = common::database_url(&pool).await;
    sqlx::raw_sql(
        r#"CREATE SCHEMA crm;
           CREATE TABLE crm.accounts (id text PRIMARY KEY, deleted_at timestamptz);
           CREATE TABLE public.accounts (id text PRIMARY KEY);"#,
    )
    .execute(&pool)
    .await
    .expect("tables");
    let path = std::env::temp_dir().join(format!("schema-{}.toml", uuid::Uuid::new_v4()));
    std::fs::write(
        &path,
        "[[mapping]]\nname = \"accounts\"\ntype = \"agent\"\ntable = \"crm.accounts\"\nlive = \"deleted_at IS NULL\"\n",
    )
    .expect("write");
    for command in [&["mappings", "check"][..], &["migrate"][..]] {
        let (code, stdout, stderr) = binary(&url, command, Some(&path));
        assert_eq!(code, 0, "{command:?}: {stdout}{stderr}");
    }
    host_tx(
        &pool,
        U1,
        &[
            "INSERT INTO crm.accounts (id) VALUES ('acc1')",
            // The same name in the search path is another table: not captured.
            "INSERT INTO public.accounts (id) VALUES ('acc2')",
            "UPDATE crm.accounts SET deleted_at = now() WHERE id = 'acc1'",
            "INSERT INTO crm.accounts (id) VALUES ('acc3')",
            "TRUNCATE crm.accounts",
        ],
    )
    .await;
    let captured: Vec<(String, String)> = sqlx::query_as(
        "SELECT resource_id, operation FROM authz_outbox WHERE resource_id LIKE 'acc%' ORDER BY id",
    )
    .fetch_all(&pool)
    .await
    .expect("rows");
    let expected: Vec<(String, String)> = [
        ("acc1", "register"),
        ("acc1", "deregister"),
        ("acc3", "register"),
        ("acc3", "deregister"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(captured, expected);
    // Removing the mapping drops its triggers from the right table.
    std::fs::write(&path, "").expect("write");
    let (code, _, stderr) = binary(&url, &["migrate"], Some(&path));
    assert_eq!(code, 0, "{stderr}");
    let left: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'crm.accounts'::regclass AND NOT tgisinternal",
    )
    .fetch_one(&pool)
    .await
    .expect("count");
    assert_eq!(left, 0);
    std::fs::remove_file(&path).ok();
}

/// `mappings init`'s output as printed, written to a file.
fn init_file(url: &str, args: &[&str], target: Option<&str>) -> (std::path::PathBuf, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_authz-outbox"));
    cmd.args(["mappings", "init"])
        .args(args)
        .env("DATABASE_URL", url)
        .env_remove("AUTHZ_OUTBOX_MAPPINGS")
        .env_remove("AUTHZ_OUTBOX_TARGET");
    if let Some(target) = target {
        cmd.env("AUTHZ_OUTBOX_TARGET", target);
    }
    let out = cmd.output().expect("binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = std::env::temp_dir().join(format!("mappings-init-{}.toml", uuid::Uuid::new_v4()));
    std::fs::write(&path, &stdout).expect("write");
    (path, stdout)
}

/// `migrate` then `mappings check`, both for the SpiceDB target with `path`:
/// the stdout of the check.
fn migrate_and_check(url: &str, path: &std::path::Path) -> String {
    let (code, _, stderr) = binary(url, &["migrate", "--target", "spicedb"], Some(path));
    assert_eq!(code, 0, "migrate: {stderr}");
    let (code, stdout, stderr) = binary(
        url,
        &["mappings", "check", "--target", "spicedb"],
        Some(path),
    );
    assert_eq!(code, 0, "check: {stderr}");
    stdout
}

#[sqlx::test(migrations = false)]
async fn mappings_init_on_the_quickstart_tables_prints_a_file_check_accepts(pool: PgPool) {
    sqlx::raw_sql(include_str!("../examples/spicedb-app/app.sql"))
        .execute(&pool)
        .await
        .expect("app tables");
    let url = common::database_url(&pool).await;
    // The target read from AUTHZ_OUTBOX_TARGET, as other commands read it.
    let (path, text) = init_file(
        &url,
        &["--table", "folders", "--table", "documents"],
        Some("spicedb"),
    );
    for expected in [
        "type = \"folder\"\ntable = \"folders\"\nselector = \"{id}\"\n",
        "type = \"document\"\ntable = \"documents\"\nselector = \"{id}\"\nparent = { type = \"folder\", column = \"folder_id\" }\nlive = \"deleted_at IS NULL\"\n",
        "\"folder:{id}#owner@user:{owner_id}\"",
        "\"document:{id}#owner@user:{owner_id}\"",
        "]\n# The owner is a column: no writer needs naming (no set_config).\ncreator = []\n",
        "type = \"agent\"\ntable = \"agents\"\nenabled = false",
        "type = \"schedule\"\ntable = \"agent_run_schedules\"\nenabled = false",
    ] {
        assert!(text.contains(expected), "{expected:?} in:\n{text}");
    }
    let stdout = migrate_and_check(&url, &path);
    assert!(
        stdout.contains("ok      document (document on documents)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("ok      folder (folder on folders)"),
        "{stdout}"
    );
    // The built-ins are off, not merely skipped.
    assert!(!stdout.contains("agent"), "{stdout}");
    std::fs::remove_file(&path).ok();
}

#[sqlx::test(migrations = false)]
async fn mappings_init_refuses_an_unknown_table_in_one_line(pool: PgPool) {
    sqlx::raw_sql(include_str!("../examples/spicedb-app/app.sql"))
        .execute(&pool)
        .await
        .expect("app tables");
    let url = common::database_url(&pool).await;
    for (table, expected) in [
        ("no_such_table", "error: table no_such_table does not exist"),
        ("crm.folders", "error: table crm.folders does not exist"),
        (
            "Folders\nx",
            "error: table \"Folders\\nx\" must be a plain lower-case SQL name",
        ),
    ] {
        let (code, stdout, stderr) = binary(
            &url,
            &["mappings", "init", "--table", "folders", "--table", table],
            None,
        );
        assert_eq!(code, 2, "{table}: {stderr}");
        assert_eq!(stdout, "", "nothing printed for {table}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(stderr.starts_with(expected), "{expected:?} in {stderr:?}");
    }
}

#[sqlx::test(migrations = false)]
async fn mappings_init_reads_a_composite_key_foreign_keys_and_deleted_at(pool: PgPool) {
    sqlx::raw_sql(
        r#"CREATE SCHEMA crm;
        CREATE TABLE crm.orgs (id text PRIMARY KEY);
        CREATE TABLE crm.teams (org_id text, id text, PRIMARY KEY (org_id, id));
        CREATE TABLE crm.memberships (
            org_id     text NOT NULL,
            member     text NOT NULL,
            team_id    text,
            "odd""
name"  text,
            status     text,
            created_by text,
            deleted_at timestamptz,
            PRIMARY KEY (org_id, member),
            CONSTRAINT a_odd FOREIGN KEY ("odd""
name") REFERENCES crm.orgs (id),
            CONSTRAINT b_org FOREIGN KEY (org_id) REFERENCES crm.orgs (id),
            CONSTRAINT c_team FOREIGN KEY (org_id, team_id) REFERENCES crm.teams (org_id, id)
        );
        CREATE TABLE widgets (id bigint PRIMARY KEY, deleted_at timestamp);
        CREATE TABLE gadgets (id uuid PRIMARY KEY, deleted_at timestamptz NOT NULL);"#,
    )
    .execute(&pool)
    .await
    .expect("tables");
    let url = common::database_url(&pool).await;
    let (path, text) = init_file(
        &url,
        &[
            "--target",
            "spicedb",
            "--table",
            "crm.orgs",
            "--table",
            "crm.memberships",
            "--table",
            "widgets",
            "--table",
            "gadgets",
        ],
        None,
    );
    for expected in [
        // The composite key, joined by a literal.
        "table = \"crm.memberships\"\n# The composite primary key, joined by a literal \"::\".\nselector = \"{org_id}::{member}\"\n",
        // The first single-column foreign key to a plain column, typed as
        // the referenced table's mapping.
        "parent = { type = \"org\", column = \"org_id\" }\n",
        // The others, as comments (a newline in a name stays escaped).
        "# another foreign key: (\"odd\\\"\\nname\") -> crm.orgs\n",
        "# another foreign key: (org_id, team_id) -> crm.teams\n",
        "live = \"deleted_at IS NULL\"\n# A status column",
        "# live = \"status IS DISTINCT FROM 'DELETED'\"\n",
        // An owner column, and a resource part left out for a composite selector.
        "    \"owner@user:{created_by}\",\n",
        "    # \"org@org:{org_id}\",\n",
        // No owner column: the principal.
        "\"org:{id}#owner@user:{principal.user_id}\"",
        "type = \"widget\"\ntable = \"widgets\"\nselector = \"{id}\"\nlive = \"deleted_at IS NULL\"\n",
        // A deleted_at that is never NULL is no live predicate.
        "type = \"gadget\"\ntable = \"gadgets\"\nselector = \"{id}\"\nrelationships",
    ] {
        assert!(text.contains(expected), "{expected:?} in:\n{text}");
    }
    let stdout = migrate_and_check(&url, &path);
    assert!(
        stdout.contains("ok      membership (membership on crm.memberships)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("ok      widget (widget on widgets)"),
        "{stdout}"
    );
    std::fs::remove_file(&path).ok();
}

/// `mappings check` before the first `migrate` (the order the guides give:
/// check the file, then migrate): the catalog checks run, the trial install
/// waits for authz-outbox's own migrations, and the check passes.
#[sqlx::test(migrations = false)]
async fn mappings_check_runs_before_the_first_migrate(pool: PgPool) {
    sqlx::raw_sql(common::HOST_SCHEMA)
        .execute(&pool)
        .await
        .expect("host schema");
    let url = common::database_url(&pool).await;
    let (code, stdout, stderr) = binary(&url, &["mappings", "check"], None);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("ok      task (task on tasks)"), "{stdout}");
    assert!(
        stderr.contains("migrations are not all applied"),
        "{stderr}"
    );
    let outbox: bool = sqlx::query_scalar("SELECT to_regclass('authz_outbox') IS NOT NULL")
        .fetch_one(&pool)
        .await
        .expect("catalog");
    assert!(!outbox, "check changed nothing");
}
