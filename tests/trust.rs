//! The trust boundary (CONTRACT.md, "Who may write what"), tried as an
//! attacker would on a database set up as the docs say: host roles hold
//! no privilege on any `authz_outbox*` object and their writes are still
//! captured; nothing a caller creates (an operator, a temporary table) can
//! stand in for ours; PUBLIC executes none of our functions; TRUNCATE is
//! captured; mapping text cannot leave its quoting.

mod common;

use std::process::Command;

use sqlx::{Connection, PgConnection, PgPool};

/// A login role unique to this test's database (roles are cluster-wide).
async fn role(pool: &PgPool, base: &str) -> String {
    let db: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(pool)
        .await
        .expect("db");
    let name = format!("{base}_{}", db.trim_start_matches('_'));
    let name: String = name.chars().take(60).collect();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DO $$ BEGIN CREATE ROLE \"{name}\" LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
         ALTER ROLE \"{name}\" NOSUPERUSER"
    )))
    .execute(pool)
    .await
    .expect("role");
    name
}

async fn connect_as(pool: &PgPool, user: &str) -> PgConnection {
    let mut url = url::Url::parse(&common::database_url(pool).await).expect("url");
    url.set_username(user).expect("user");
    PgConnection::connect(url.as_str())
        .await
        .expect("connect as role")
}

fn sqlstate(e: &sqlx::Error) -> Option<String> {
    e.as_database_error()
        .and_then(|d| d.code())
        .map(|c| c.to_string())
}

async fn exec(conn: &mut PgConnection, sql: &str) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
        .execute(conn)
        .await
        .map(|_| ())
}

async fn outbox(pool: &PgPool) -> Vec<(String, String, String, Option<String>, Option<String>)> {
    sqlx::query_as(
        "SELECT resource_type, resource_id, operation, principal ->> 'user_id', principal_source
         FROM authz_outbox ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .expect("outbox")
}

async fn new_agent(pool: &PgPool, id: &str) {
    sqlx::query("INSERT INTO agents (id, name, description, status) VALUES ($1, $1, '', 'READY')")
        .bind(id)
        .execute(pool)
        .await
        .expect("agent");
}

/// A role that may write only tasks writes them after `migrate` with no
/// grant on any of our objects; its writes are captured under its user and
/// delivered. It cannot add, change or remove an outbox row itself, nor
/// call the functions that write one.
#[sqlx::test(migrations = false)]
async fn a_tasks_only_writer_is_captured_and_cannot_forge_a_row(pool: PgPool) {
    let pool = common::host_db(pool).await;
    new_agent(&pool, "a1").await;
    let writer = role(&pool, "tasks_writer").await;
    exec(
        &mut pool.acquire().await.expect("conn"),
        &format!(
            "GRANT USAGE ON SCHEMA public TO \"{writer}\";
             GRANT SELECT, INSERT, UPDATE, DELETE ON tasks, task_agents, agent_task_tracker TO \"{writer}\";"
        ),
    )
    .await
    .expect("grants");
    let mut conn = connect_as(&pool, &writer).await;
    // It cannot even read agents.
    let e = exec(&mut conn, "SELECT count(*) FROM agents")
        .await
        .expect_err("no grant");
    assert_eq!(sqlstate(&e).as_deref(), Some("42501"));
    exec(
        &mut conn,
        r#"BEGIN;
           SELECT set_config('authz_outbox.principal', '{"user_id":"u-task"}', true);
           INSERT INTO tasks (id, name, status) VALUES ('t1', 't1', 'RUNNING');
           INSERT INTO task_agents (task_id, agent_id) VALUES ('t1', 'a1');
           INSERT INTO agent_task_tracker (id, agent_id, task_id) VALUES ('tr1', 'a1', 't1');
           COMMIT;"#,
    )
    .await
    .expect("a writer with grants on its own tables only writes tasks");
    let rows = outbox(&pool).await;
    assert!(
        rows.contains(&(
            "task".into(),
            "t1".into(),
            "register".into(),
            Some("u-task".into()),
            Some("setting".into())
        )),
        "{rows:?}"
    );

    // Forgeries: a register making it the owner of an agent it cannot see,
    // a deregister revoking a real owner, and the same through our functions.
    let forged = [
        r#"INSERT INTO authz_outbox (resource_type, resource_id, operation, principal)
           VALUES ('agent', 'a1', 'register', '{"user_id":"mallory"}')"#,
        "UPDATE authz_outbox SET principal = '{\"user_id\":\"mallory\"}'",
        "DELETE FROM authz_outbox",
        "SELECT count(*) FROM authz_outbox",
        r#"SELECT authz_outbox_capture_enqueue('deregister', 'agent', 'a1', NULL, NULL,
               '{"user_id":"mallory"}'::jsonb, 'setting', NULL)"#,
        r#"SELECT authz_outbox_enqueue_as('register', 'agent', 'a1', NULL, NULL,
               '{"user_id":"mallory"}'::jsonb)"#,
        "SELECT authz_outbox_enqueue_row('deregister', 'agent', 'a1', NULL, NULL)",
    ];
    for sql in forged {
        let e = exec(&mut conn, sql).await.expect_err(sql);
        assert_eq!(sqlstate(&e).as_deref(), Some("42501"), "{sql}: {e}");
    }
    assert_eq!(
        outbox(&pool).await,
        rows,
        "nothing forged reached the outbox"
    );

    let dev = common::dev_server().await;
    let report = common::run_once(&pool, &dev.base_url(), common::config("w1")).await;
    assert_eq!(report.dead, 0, "{report:?}");
    let delivered: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM authz_outbox WHERE resource_id = 't1' AND state = 'delivered'",
    )
    .fetch_one(&pool)
    .await
    .expect("count");
    assert_eq!(delivered, 1, "the task writer's register is delivered");
    dev.shutdown().await;
}

/// A role that may CREATE in a schema on everyone's search path plants an
/// exact-type `=` and `<>` on `agentstatus`: resolved through that path they
/// win over the built-in enum operators. Inside our functions (which run
/// as their owner, here a superuser) they are never chosen.
#[sqlx::test(migrations = false)]
async fn an_operator_planted_in_a_writable_schema_never_runs_as_the_owner(pool: PgPool) {
    let pool = common::host_db(pool).await;
    new_agent(&pool, "a1").await;
    let mallory = role(&pool, "mallory").await;
    exec(
        &mut pool.acquire().await.expect("conn"),
        &format!(
            "GRANT USAGE, CREATE ON SCHEMA public TO \"{mallory}\";
             CREATE TABLE public.hijacks (by_role text);
             GRANT INSERT ON public.hijacks TO PUBLIC;"
        ),
    )
    .await
    .expect("setup");
    let mut conn = connect_as(&pool, &mallory).await;
    exec(
        &mut conn,
        &format!(
            r#"CREATE FUNCTION public.hijack_eq(agentstatus, agentstatus) RETURNS boolean
               LANGUAGE plpgsql AS $f$
               BEGIN
                   INSERT INTO public.hijacks VALUES (current_user);
                   BEGIN
                       EXECUTE 'ALTER ROLE "{mallory}" SUPERUSER';
                   EXCEPTION WHEN insufficient_privilege THEN NULL;
                   END;
                   RETURN $1::text = $2::text;
               END $f$;
               CREATE FUNCTION public.hijack_ne(agentstatus, agentstatus) RETURNS boolean
               LANGUAGE sql AS $f$ SELECT NOT public.hijack_eq($1, $2) $f$;
               CREATE OPERATOR public.= (LEFTARG = agentstatus, RIGHTARG = agentstatus, FUNCTION = public.hijack_eq);
               CREATE OPERATOR public.<> (LEFTARG = agentstatus, RIGHTARG = agentstatus, FUNCTION = public.hijack_ne);"#
        ),
    )
    .await
    .expect("plant");
    // The planted operator does win where the path is not pinned.
    exec(
        &mut conn,
        "SELECT 'READY'::agentstatus = 'DELETED'::agentstatus",
    )
    .await
    .expect("resolves");
    let mine: Vec<String> = sqlx::query_scalar("SELECT by_role FROM public.hijacks")
        .fetch_all(&pool)
        .await
        .expect("read");
    assert_eq!(
        mine,
        vec![mallory.clone()],
        "the planted operator is the one resolved"
    );

    // Everything of ours that reads agents' status, as the host and the
    // worker would: a capture, a soft delete, the liveness lookups, the
    // desired-state view, and a new session planning them afresh.
    exec(
        &mut pool.acquire().await.expect("conn"),
        r#"BEGIN;
           SELECT set_config('authz_outbox.principal', '{"user_id":"u1"}', true);
           INSERT INTO agents (id, name, description, status) VALUES ('a2', 'a2', '', 'READY');
           UPDATE agents SET status = 'DELETED' WHERE id = 'a1';
           COMMIT;
           SELECT authz_outbox_resource_live('agent', 'a2', NULL);
           SELECT authz_outbox_live__agent('a2', NULL);
           SELECT count(*) FROM authz_outbox_desired;"#,
    )
    .await
    .expect("our functions run");
    let after: Vec<String> = sqlx::query_scalar("SELECT by_role FROM public.hijacks")
        .fetch_all(&pool)
        .await
        .expect("read");
    assert_eq!(
        after,
        vec![mallory.clone()],
        "the planted operator ran inside our functions"
    );
    let superuser: bool = sqlx::query_scalar("SELECT rolsuper FROM pg_roles WHERE rolname = $1")
        .bind(&mallory)
        .fetch_one(&pool)
        .await
        .expect("role");
    assert!(!superuser, "mallory made itself superuser");
}

/// PUBLIC executes none of our functions: a role with only CONNECT learns
/// nothing about which ids exist.
#[sqlx::test(migrations = false)]
async fn no_function_of_ours_answers_a_role_that_was_granted_nothing(pool: PgPool) {
    let pool = common::host_db(pool).await;
    new_agent(&pool, "a1").await;
    let executable: Vec<String> = sqlx::query_scalar(
        "SELECT p.oid::regprocedure::text FROM pg_proc p
         WHERE p.proname LIKE 'authz\\_outbox%' AND p.pronamespace = 'public'::regnamespace
           AND has_function_privilege('public', p.oid, 'EXECUTE')
         ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .expect("catalog");
    assert!(executable.is_empty(), "PUBLIC may execute {executable:?}");
    let nobody = role(&pool, "nobody").await;
    let mut conn = connect_as(&pool, &nobody).await;
    for sql in [
        "SELECT authz_outbox_resource_live('agent', 'a1', NULL)",
        "SELECT authz_outbox_live__agent('a1', NULL)",
        "SELECT authz_outbox_live__api_key('k1', NULL)",
        "SELECT authz_outbox_has_creator('{}'::jsonb)",
        "SELECT * FROM authz_outbox_wait_for_resource('agent', 'a1', interval '0')",
    ] {
        let e = exec(&mut conn, sql).await.expect_err(sql);
        assert_eq!(sqlstate(&e).as_deref(), Some("42501"), "{sql}: {e}");
    }
}

/// A session's temporary table named like ours never receives a captured
/// row: the capture names the outbox with its schema.
#[sqlx::test(migrations = false)]
async fn a_temporary_table_cannot_stand_in_for_the_outbox(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let mut conn = pool.acquire().await.expect("conn");
    exec(
        &mut conn,
        r#"CREATE TEMP TABLE authz_outbox (LIKE public.authz_outbox INCLUDING DEFAULTS);
           CREATE TEMP TABLE authz_outbox_listeners (worker_id text, sleeping_since timestamptz);
           BEGIN;
           SELECT set_config('authz_outbox.principal', '{"user_id":"u1"}', true);
           INSERT INTO agents (id, name, description, status) VALUES ('a9', 'a9', '', 'READY');
           COMMIT;"#,
    )
    .await
    .expect("write");
    let temp: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_temp.authz_outbox")
        .fetch_one(&mut *conn)
        .await
        .expect("temp");
    assert_eq!(temp, 0, "the captured row went to the session's temp table");
    drop(conn);
    let rows = outbox(&pool).await;
    assert_eq!(
        rows,
        vec![(
            "agent".into(),
            "a9".into(),
            "register".into(),
            Some("u1".into()),
            Some("setting".into())
        )]
    );
}

/// TRUNCATE fires no row trigger; it is captured anyway: every live key
/// it removes is deregistered in the truncating transaction (and a
/// rollback takes the deregisters back with it). Truncating the join
/// table takes every task's parent away.
#[sqlx::test(migrations = false)]
async fn truncate_deregisters_every_live_resource_it_removes(pool: PgPool) {
    let pool = common::host_db(pool).await;
    new_agent(&pool, "a1").await;
    let mut conn = pool.acquire().await.expect("conn");
    exec(
        &mut conn,
        r#"BEGIN;
           SELECT set_config('authz_outbox.principal', '{"user_id":"u1"}', true);
           INSERT INTO agent_api_keys (id, agent_id, name, api_key_type, api_key)
               VALUES ('k1', 'a1', 'n1', 'INTERNAL', 's1'), ('k2', 'a1', 'n2', 'INTERNAL', 's2');
           INSERT INTO tasks (id, name, status) VALUES ('t1', 't1', 'RUNNING'), ('t2', 't2', 'DELETED');
           INSERT INTO task_agents (task_id, agent_id) VALUES ('t1', 'a1'), ('t2', 'a1');
           COMMIT;"#,
    )
    .await
    .expect("seed");
    let before = outbox(&pool).await.len();

    exec(&mut conn, "BEGIN; TRUNCATE agent_api_keys; ROLLBACK;")
        .await
        .expect("truncate");
    assert_eq!(
        outbox(&pool).await.len(),
        before,
        "a rolled-back truncate enqueues nothing"
    );

    exec(&mut conn, "TRUNCATE agent_api_keys; TRUNCATE task_agents;")
        .await
        .expect("truncate");
    let added: Vec<_> = outbox(&pool).await.into_iter().skip(before).collect();
    assert_eq!(
        added,
        vec![
            (
                "api_key".into(),
                "k1".into(),
                "deregister".into(),
                Some("u1".into()),
                Some("setting".into())
            ),
            (
                "api_key".into(),
                "k2".into(),
                "deregister".into(),
                Some("u1".into()),
                Some("setting".into())
            ),
            // t2 is soft-deleted: not live, nothing registered to remove.
            (
                "task".into(),
                "t1".into(),
                "deregister".into(),
                Some("u1".into()),
                Some("setting".into())
            ),
        ]
    );
}

fn binary(database_url: &str, args: &[&str], mappings: &std::path::Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_authz-outbox"))
        .args(args)
        .env("DATABASE_URL", database_url)
        .env("AUTHZ_OUTBOX_MAPPINGS", mappings)
        .output()
        .expect("binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Mapping text that tries to end a function body (`$fn$`) or a literal
/// is data: `check` and `migrate` either refuse it or install it quoted,
/// and `--print-sql`, applied with `check_function_bodies = off` (how a
/// host's tooling may apply it), runs nothing the mapping wrote.
#[sqlx::test(migrations = false)]
async fn mapping_text_never_leaves_its_quoting(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let url = common::database_url(&pool).await;
    let dir = std::env::temp_dir().join(format!("trust-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("dir");
    let injected = "$fn$; CREATE TABLE public.pwned_fn (); CREATE OR REPLACE FUNCTION public.f() RETURNS int LANGUAGE sql AS $fn$ SELECT 1";
    let quote = r"x\'; CREATE TABLE public.pwned_quote (); --";
    let files = [
        format!(
            "[[mapping]]\nname = \"docs\"\ntype = \"task\"\ntable = \"tasks\"\nselector = {sel:?}\nprincipal_fields = [\"user_id\", {inj:?}, {q:?}]\n",
            sel = format!("doc{injected}{{id}}"),
            inj = injected,
            q = quote,
        ),
        format!(
            "[[mapping]]\nname = \"docs\"\ntype = \"task\"\ntable = \"tasks\"\nlive = {live:?}\n",
            live = "name <> '$fn$; CREATE TABLE public.pwned_live (); $fn$'"
        ),
    ];
    for (i, toml) in files.iter().enumerate() {
        let path = dir.join(format!("m{i}.toml"));
        std::fs::write(&path, toml).expect("write");
        let (check, _, check_err) = binary(&url, &["mappings", "check"], &path);
        let (print, sql, print_err) = binary(&url, &["migrate", "--print-sql"], &path);
        if check == 0 {
            assert_eq!(print, 0, "{print_err}");
            // Applied as a host's tooling would, with bodies unchecked.
            let mut conn = pool.acquire().await.expect("conn");
            exec(
                &mut conn,
                "SET check_function_bodies = off; SET standard_conforming_strings = off",
            )
            .await
            .expect("settings");
            exec(&mut conn, &sql)
                .await
                .expect("the printed SQL applies");
            drop(conn);
            let (code, _, err) = binary(&url, &["migrate"], &path);
            assert_eq!(code, 0, "check passed, so migrate must: {err}");
        } else {
            assert_eq!(check_err.lines().count(), 1, "{check_err}");
        }
        let pwned: Vec<String> = sqlx::query_scalar(
            "SELECT relname::text FROM pg_class WHERE relname LIKE 'pwned%'
             UNION ALL SELECT proname::text FROM pg_proc WHERE proname = 'f'",
        )
        .fetch_all(&pool)
        .await
        .expect("catalog");
        assert!(
            pwned.is_empty(),
            "file {i}: mapping text ran as SQL: {pwned:?}"
        );
    }
}

/// An upgrade from a release whose docs granted host roles INSERT on the
/// outbox: `status` names the role until the documented statements revoke
/// the grant. And `status` tells writes made under a role default from
/// writes that carried the request's user (`by_principal_source`).
#[sqlx::test(migrations = false)]
async fn status_names_old_grants_and_where_principals_came_from(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let url = common::database_url(&pool).await;
    let app = role(&pool, "old_app").await;
    let db: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&pool)
        .await
        .expect("db");
    // The grants earlier releases documented, and a role default.
    exec(
        &mut pool.acquire().await.expect("conn"),
        &format!(
            r#"GRANT USAGE ON SCHEMA public TO "{app}";
               GRANT SELECT, INSERT, UPDATE, DELETE ON agents TO "{app}";
               GRANT INSERT, SELECT ON authz_outbox TO "{app}";
               GRANT USAGE ON SEQUENCE authz_outbox_id_seq TO "{app}";
               ALTER ROLE "{app}" IN DATABASE "{db}" SET authz_outbox.principal = '{{"service_account_id":"sa-host"}}';"#
        ),
    )
    .await
    .expect("old grants");
    let mut conn = connect_as(&pool, &app).await;
    exec(
        &mut conn,
        r#"INSERT INTO agents (id, name, description, status) VALUES ('a1', 'a1', '', 'READY');
           BEGIN;
           SELECT set_config('authz_outbox.principal', '{"user_id":"u1"}', true);
           INSERT INTO agents (id, name, description, status) VALUES ('a2', 'a2', '', 'READY');
           COMMIT;"#,
    )
    .await
    .expect("writes");
    drop(conn);

    let status = |url: String| {
        let out = Command::new(env!("CARGO_BIN_EXE_authz-outbox"))
            .args(["status", "--format", "json"])
            .env("DATABASE_URL", url)
            .output()
            .expect("status runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("json")
    };
    let before = status(url.clone());
    assert_eq!(
        before["by_type"]["agent"]["by_principal_source"],
        serde_json::json!({"role_default": 1, "setting": 1}),
        "{before}"
    );
    let writers = before["direct_writers"].as_array().expect("list").clone();
    assert!(writers.contains(&serde_json::json!(app)), "{writers:?}");

    exec(
        &mut pool.acquire().await.expect("conn"),
        &format!(
            r#"REVOKE ALL ON authz_outbox FROM "{app}";
               REVOKE ALL ON SEQUENCE authz_outbox_id_seq FROM "{app}";"#
        ),
    )
    .await
    .expect("documented revoke");
    let after = status(url);
    let writers = after["direct_writers"].as_array().expect("list").clone();
    assert!(!writers.contains(&serde_json::json!(app)), "{writers:?}");
}

/// The Rust library's writes, made by a role with grants on its own tables
/// and EXECUTE on the four functions the docs name for it, and none on the
/// outbox: it still learns its rows' ids and waits for their delivery.
#[sqlx::test(migrations = false)]
async fn the_rust_library_writes_and_waits_without_a_grant_on_the_outbox(pool: PgPool) {
    use authz_outbox::capture::{self, DeliveryState, NewApiKey};
    use authz_outbox::domain::ApiKeyType;
    let pool = common::host_db(pool).await;
    let writer = role(&pool, "rust_writer").await;
    exec(
        &mut pool.acquire().await.expect("conn"),
        &format!(
            r#"GRANT USAGE ON SCHEMA public TO "{writer}";
               GRANT SELECT, INSERT, UPDATE, DELETE ON agents, agent_api_keys TO "{writer}";
               GRANT EXECUTE ON FUNCTION authz_outbox_last_captured_id(),
                                         authz_outbox_captured_id(text, text),
                                         authz_outbox_wait_for_row(bigint, interval),
                                         authz_outbox_wait_for_resource(text, text, interval, bigint)
                   TO "{writer}";"#
        ),
    )
    .await
    .expect("grants");
    let mut url = url::Url::parse(&common::database_url(&pool).await).expect("url");
    url.set_username(&writer).expect("user");
    let as_writer = PgPool::connect(url.as_str()).await.expect("pool");
    let creator = common::principal("u1");
    let agent_row = capture::create_agent(&as_writer, "a1", "a1", Some(&creator))
        .await
        .expect("agent");
    let key = capture::create_api_key(
        &as_writer,
        NewApiKey {
            agent_id: "a1".into(),
            name: "ci".into(),
            key_type: ApiKeyType::External,
            secret: None,
        },
        Some(&creator),
    )
    .await
    .expect("key");
    let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM authz_outbox ORDER BY id")
        .fetch_all(&pool)
        .await
        .expect("ids");
    assert_eq!(
        ids,
        vec![agent_row, key.outbox_id],
        "the ids the writer was told"
    );

    let dev = common::dev_server().await;
    common::run_once(&pool, &dev.base_url(), common::config("w1")).await;
    let state =
        capture::wait_until_delivered(&as_writer, key.outbox_id, std::time::Duration::from_secs(5))
            .await
            .expect("waits");
    assert_eq!(state, DeliveryState::Delivered);
    let deregisters = capture::delete_api_key(&as_writer, &key.id, Some(&creator))
        .await
        .expect("delete");
    assert_eq!(deregisters.len(), 1);
    // The function that names a resource's rows answers only for the
    // caller's own transaction.
    let foreign: Option<i64> = sqlx::query_scalar("SELECT authz_outbox_captured_id('agent', 'a1')")
        .fetch_one(&as_writer)
        .await
        .expect("call");
    assert_eq!(foreign, None, "another transaction's rows stay unknown");
    dev.shutdown().await;
}

/// `status` shows what any writer or role name may hold (a type, a
/// principal source, a role name with terminal escapes) escaped: nothing
/// reaches the operator's terminal raw.
#[sqlx::test(migrations = false)]
async fn status_shows_outside_text_escaped(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let url = common::database_url(&pool).await;
    let db: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&pool)
        .await
        .expect("db");
    let evil_role = format!("evil\u{1b}[2J{}", &db[db.len().saturating_sub(20)..]);
    sqlx::query(
        "INSERT INTO authz_outbox (resource_type, resource_id, operation, principal_source, state, last_error, finished_at)
         VALUES ($1, $2, 'register', $3, 'dead', $4, now())",
    )
    .bind("type\u{1b}[31m")
    .bind("id\u{1b}]0;pwned\u{7}")
    .bind("column:\u{1b}[2J")
    .bind("boom\r\nforged line")
    .execute(&pool)
    .await
    .expect("row");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        r#"DO $$ BEGIN CREATE ROLE "{evil_role}"; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
           GRANT INSERT ON authz_outbox TO "{evil_role}";"#
    )))
    .execute(&pool)
    .await
    .expect("role");
    let out = Command::new(env!("CARGO_BIN_EXE_authz-outbox"))
        .args(["status"])
        .env("DATABASE_URL", &url)
        .output()
        .expect("status runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !stdout.contains('\u{1b}'),
        "a raw escape reached the terminal:\n{stdout:?}"
    );
    assert!(!stdout.contains('\u{7}'), "{stdout:?}");
    assert!(!stdout.contains("\r\nforged"), "{stdout:?}");
    assert!(stdout.contains("type\\u{1b}[31m"), "{stdout}");
    assert!(
        stdout.contains("evil\\u{1b}[2J"),
        "the role is still named:\n{stdout}"
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        r#"REVOKE ALL ON authz_outbox FROM "{evil_role}"; DROP ROLE "{evil_role}";"#
    )))
    .execute(&pool)
    .await
    .expect("cleanup");
}
