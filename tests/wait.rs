//! Read-your-writes by resource: `authz_outbox_wait_for_resource` (the SQL
//! any driver calls) and the Rust library's `wait_for_resource` /
//! `wait_until_delivered` on top of it, against a real PostgreSQL and a
//! worker delivering to a scripted agentex-auth.

mod common;

use std::time::{Duration, Instant};

use authz_outbox::capture::{self, DeliveryState, WaitError, wait_for_resource};
use authz_outbox::domain::ResourceRef;
use common::scripted_auth::{Answer, ScriptedAuth, Seen};
use common::{agent, config, key};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio_util::sync::CancellationToken;

fn api_key(id: &str) -> ResourceRef {
    ResourceRef::new("api_key", id).expect("valid resource")
}

/// A long-running worker (`authz-outbox run`) in the background.
struct Running {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<authz_outbox::delivery::RunReport>,
}

fn start_worker(pool: &PgPool, url: &str) -> Running {
    let stop = CancellationToken::new();
    let worker = common::worker(pool, url, config("waiter-test"));
    let task = tokio::spawn(worker.run(stop.clone(), false));
    Running { stop, task }
}

impl Running {
    async fn stop(self) {
        self.stop.cancel();
        self.task.await.expect("worker ends");
    }
}

/// Marks rows finished as a worker would, without one.
async fn set_state(pool: &PgPool, id: i64, state: &str, token: Option<&str>) {
    sqlx::query(
        "UPDATE authz_outbox
         SET state = $2, consistency_token = $3, finished_at = now(),
             delivered_at = CASE WHEN $2 = 'delivered' THEN now() END
         WHERE id = $1",
    )
    .bind(id)
    .bind(state)
    .bind(token)
    .execute(pool)
    .await
    .expect("update");
}

/// What the SQL function answers, as any driver sees it.
async fn sql_wait(
    pool: &PgPool,
    resource_type: &str,
    resource_id: &str,
    timeout: &str,
) -> (String, Option<String>, Option<String>) {
    sqlx::query_as(
        "SELECT outcome, error, consistency_token
         FROM authz_outbox_wait_for_resource($1, $2, $3::interval)",
    )
    .bind(resource_type)
    .bind(resource_id)
    .bind(timeout)
    .fetch_one(pool)
    .await
    .expect("the wait answers")
}

#[sqlx::test(migrations = false)]
async fn a_write_is_waited_for_until_the_worker_delivered_it(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let auth = ScriptedAuth::always(Answer::ok()).await;
    let worker = start_worker(&pool, &auth.url());
    agent(&pool, "a1").await;
    let k = key(&pool, "a1", "k").await;

    let state = wait_for_resource(&pool, &api_key(&k.id), Duration::from_secs(10)).await;
    assert_eq!(state.expect("delivered"), DeliveryState::Delivered);
    let row = common::row(&pool, k.outbox_id).await;
    assert_eq!(row.state, "delivered", "the wait returned because it was");
    assert!(
        auth.seen()
            .iter()
            .any(|s| s.body["resource"]["selector"] == k.id.as_str()),
        "agentex-auth saw the register"
    );
    // Any driver: the same answer, with the ZedToken agentex-auth returned.
    assert_eq!(
        sql_wait(&pool, "api_key", &k.id, "1 second").await,
        ("delivered".into(), None, Some("zed-1".into()))
    );
    let agent_state = wait_for_resource(
        &pool,
        &ResourceRef::new("agent", "a1").expect("valid"),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(agent_state.expect("agent"), DeliveryState::Delivered);
    worker.stop().await;
}

#[sqlx::test(migrations = false)]
async fn a_dead_row_answers_with_its_error_instead_of_waiting(pool: PgPool) {
    let pool = common::host_db(pool).await;
    // agentex-auth rejects the key's register for good (422 is permanent).
    let auth = ScriptedAuth::start(|seen: &Seen, _| {
        if seen.body["resource"]["type"] == "api_key" {
            Answer::status(422).body(serde_json::json!({"detail": "parent agent unknown"}))
        } else {
            Answer::ok()
        }
    })
    .await;
    let worker = start_worker(&pool, &auth.url());
    agent(&pool, "a1").await;
    let k = key(&pool, "a1", "k").await;

    let timeout = Duration::from_secs(60);
    let started = Instant::now();
    let state = wait_for_resource(&pool, &api_key(&k.id), timeout).await;
    eprintln!(
        "dead answered after {:?} (timeout {timeout:?})",
        started.elapsed()
    );
    match state {
        Ok(DeliveryState::Dead { error }) => assert!(error.contains("422"), "{error}"),
        other => panic!("expected the dead row's error, got {other:?}"),
    }
    worker.stop().await;
}

#[sqlx::test(migrations = false)]
async fn a_dead_newest_row_answers_even_while_an_older_row_is_pending(pool: PgPool) {
    let pool = common::host_db(pool).await;
    agent(&pool, "a1").await;
    let k = key(&pool, "a1", "k").await;
    // A newer operation on the same key that went dead (as a write with no
    // creator does at capture); the older register is still pending and no
    // worker runs, so only the dead row can end this wait before its timeout.
    sqlx::query(
        "INSERT INTO authz_outbox (resource_type, resource_id, parent_type, parent_id, operation,
                                   state, finished_at, last_error)
         VALUES ('api_key', $1, 'agent', 'a1', 'register', 'dead', now(), 'no creator resolvable')",
    )
    .bind(&k.id)
    .execute(&pool)
    .await
    .expect("dead row");
    let state = wait_for_resource(&pool, &api_key(&k.id), Duration::from_secs(30)).await;
    assert_eq!(
        state.expect("answered"),
        DeliveryState::Dead {
            error: "no creator resolvable".into()
        }
    );
    // The register itself is still pending: waiting on that row times out.
    let by_row = capture::wait_until_delivered(&pool, k.outbox_id, Duration::from_millis(50)).await;
    assert!(
        matches!(by_row, Err(WaitError::Timeout { .. })),
        "{by_row:?}"
    );
}

#[sqlx::test(migrations = false)]
async fn a_timeout_is_reported_as_such(pool: PgPool) {
    let pool = common::host_db(pool).await;
    agent(&pool, "a1").await;
    let k = key(&pool, "a1", "k").await;
    // No worker: the register stays pending.
    match wait_for_resource(&pool, &api_key(&k.id), Duration::from_millis(100)).await {
        Err(WaitError::Timeout {
            resource,
            outbox_id,
            timeout,
        }) => {
            assert_eq!(resource, format!("api_key:{}", k.id));
            assert_eq!(outbox_id, k.outbox_id);
            assert_eq!(timeout, Duration::from_millis(100));
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    let (outcome, error, token) = sql_wait(&pool, "api_key", &k.id, "20 ms").await;
    assert_eq!(outcome, "timeout");
    assert!(
        error.is_some_and(|e| e.contains("pending")),
        "says what is pending"
    );
    assert_eq!(token, None);
    // A zero timeout is a single look.
    assert_eq!(sql_wait(&pool, "api_key", &k.id, "0").await.0, "timeout");
}

#[sqlx::test(migrations = false)]
async fn a_pending_deregister_after_a_delivered_register_is_not_done(pool: PgPool) {
    let pool = common::host_db(pool).await;
    agent(&pool, "a1").await;
    let k = key(&pool, "a1", "k").await;
    set_state(&pool, k.outbox_id, "delivered", Some("zed-register")).await;
    assert_eq!(
        wait_for_resource(&pool, &api_key(&k.id), Duration::from_secs(1))
            .await
            .expect("delivered"),
        DeliveryState::Delivered
    );

    let deregisters = capture::delete_api_key(&pool, &k.id, None)
        .await
        .expect("delete");
    let waited = wait_for_resource(&pool, &api_key(&k.id), Duration::from_millis(100)).await;
    assert!(
        matches!(&waited, Err(WaitError::Timeout { outbox_id, .. }) if *outbox_id == deregisters[0]),
        "the newest row (the deregister) is pending: {waited:?}"
    );
    // Waiting on the register's own row is not lengthened by the later change.
    assert_eq!(
        capture::wait_until_delivered(&pool, k.outbox_id, Duration::from_millis(100))
            .await
            .expect("register row finished"),
        DeliveryState::Delivered
    );

    let auth = ScriptedAuth::always(Answer::ok()).await;
    let worker = start_worker(&pool, &auth.url());
    assert_eq!(
        wait_for_resource(&pool, &api_key(&k.id), Duration::from_secs(10))
            .await
            .expect("deregister delivered"),
        DeliveryState::Delivered
    );
    assert_eq!(common::row(&pool, deregisters[0]).await.state, "delivered");
    worker.stop().await;
}

#[sqlx::test(migrations = false)]
async fn a_key_created_and_deleted_before_delivery_ends_superseded(pool: PgPool) {
    let pool = common::host_db(pool).await;
    agent(&pool, "a1").await;
    let k = key(&pool, "a1", "k").await;
    capture::delete_api_key(&pool, &k.id, None)
        .await
        .expect("delete");
    let auth = ScriptedAuth::always(Answer::ok()).await;
    let worker = start_worker(&pool, &auth.url());
    assert_eq!(
        wait_for_resource(&pool, &api_key(&k.id), Duration::from_secs(10))
            .await
            .expect("settled"),
        DeliveryState::Superseded
    );
    worker.stop().await;
}

#[sqlx::test(migrations = false)]
async fn the_wait_sees_commits_made_while_it_sleeps(pool: PgPool) {
    let pool = common::host_db(pool).await;
    agent(&pool, "a1").await;
    let k = key(&pool, "a1", "k").await;
    // Another session delivers the row while the function is already waiting:
    // each of its statements must take a fresh snapshot to see that.
    let other = pool.clone();
    let id = k.outbox_id;
    let deliver = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        set_state(&other, id, "delivered", Some("zed-late")).await;
    });
    let (outcome, _, token) = sql_wait(&pool, "api_key", &k.id, "20 seconds").await;
    assert_eq!(
        (outcome.as_str(), token.as_deref()),
        ("delivered", Some("zed-late"))
    );
    deliver.await.expect("delivered meanwhile");
}

#[sqlx::test(migrations = false)]
async fn a_transaction_that_cannot_see_progress_is_refused(pool: PgPool) {
    let pool = common::host_db(pool).await;
    agent(&pool, "a1").await;
    let k = key(&pool, "a1", "k").await;

    // A role or database whose default isolation is REPEATABLE READ: even an
    // autocommit call runs in one snapshot that would never change.
    for level in ["repeatable read", "serializable"] {
        let options: PgConnectOptions = common::database_url(&pool)
            .await
            .parse::<PgConnectOptions>()
            .expect("url")
            .options([("default_transaction_isolation", level)]);
        let strict = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .expect("connect");
        match wait_for_resource(&strict, &api_key(&k.id), Duration::from_secs(30)).await {
            Err(WaitError::Refused(message)) => {
                assert!(message.contains(&level.to_uppercase()), "{message}")
            }
            other => panic!("{level}: expected a refusal, got {other:?}"),
        }
        strict.close().await;
    }

    // A transaction that has written: its own rows are invisible to the worker.
    let mut tx = pool.begin().await.expect("begin");
    sqlx::query("SELECT set_config('authz_outbox.principal', '{\"user_id\":\"u1\"}', true)")
        .execute(&mut *tx)
        .await
        .expect("principal");
    sqlx::query(
        "INSERT INTO agents (id, name, description, status) VALUES ('a2', 'a2', '', 'READY')",
    )
    .execute(&mut *tx)
    .await
    .expect("insert");
    let refused =
        sqlx::query("SELECT * FROM authz_outbox_wait_for_resource('agent', 'a2', '30 s')")
            .execute(&mut *tx)
            .await
            .expect_err("refused");
    let db = refused.as_database_error().expect("database error");
    assert_eq!(db.code().as_deref(), Some("25000"));
    assert!(db.message().contains("has written"), "{}", db.message());
    tx.rollback().await.expect("rollback");

    // A READ COMMITTED transaction that has only read may wait.
    let mut tx = pool.begin().await.expect("begin");
    let outcome: String = sqlx::query_scalar(
        "SELECT outcome FROM authz_outbox_wait_for_resource('api_key', $1, '0')",
    )
    .bind(&k.id)
    .fetch_one(&mut *tx)
    .await
    .expect("answers");
    assert_eq!(outcome, "timeout");
    tx.rollback().await.expect("rollback");
}

#[sqlx::test(migrations = false)]
async fn bad_arguments_and_unknown_resources_are_told_apart(pool: PgPool) {
    let pool = common::host_db(pool).await;
    match wait_for_resource(&pool, &api_key("never-written"), Duration::from_millis(10)).await {
        Err(WaitError::NothingCaptured(r)) => assert_eq!(r.to_string(), "api_key:never-written"),
        other => panic!("expected NothingCaptured, got {other:?}"),
    }
    assert!(matches!(
        wait_for_resource(&pool, &api_key("x"), Duration::from_secs(301)).await,
        Err(WaitError::TimeoutTooLong(_))
    ));
    for timeout in ["6 minutes", "-1 second"] {
        let e = sqlx::query(
            "SELECT * FROM authz_outbox_wait_for_resource('api_key', 'x', $1::interval)",
        )
        .bind(timeout)
        .execute(&pool)
        .await
        .expect_err("bounded timeout");
        assert_eq!(
            e.as_database_error().and_then(|d| d.code()).as_deref(),
            Some("22023"),
            "{timeout}: {e}"
        );
    }
}

#[sqlx::test(migrations = false)]
async fn a_writer_role_needs_only_execute(pool: PgPool) {
    let pool = common::host_db(pool).await;
    agent(&pool, "a1").await;
    // Roles are cluster-wide: a name of this test's database's own.
    let db: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&pool)
        .await
        .expect("name");
    let role = format!(
        "waiter_{}",
        db.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP ROLE IF EXISTS {role}; CREATE ROLE {role}"
    )))
    .execute(&pool)
    .await
    .expect("role");
    let as_role = |sql: &'static str| {
        let pool = pool.clone();
        let role = role.clone();
        async move {
            let mut tx = pool.begin().await.expect("begin");
            sqlx::query(sqlx::AssertSqlSafe(format!("SET LOCAL ROLE {role}")))
                .execute(&mut *tx)
                .await
                .expect("set role");
            let r: Result<String, sqlx::Error> = sqlx::query_scalar(sql).fetch_one(&mut *tx).await;
            tx.rollback().await.expect("rollback");
            r
        }
    };
    const WAIT: &str = "SELECT outcome FROM authz_outbox_wait_for_resource('agent', 'a1', '0')";
    let denied = as_role(WAIT).await.expect_err("not granted to PUBLIC");
    assert_eq!(
        denied.as_database_error().and_then(|d| d.code()).as_deref(),
        Some("42501")
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "GRANT EXECUTE ON FUNCTION authz_outbox_wait_for_resource(text, text, interval, bigint) TO {role}"
    )))
    .execute(&pool)
    .await
    .expect("grant");
    assert_eq!(
        as_role(WAIT)
            .await
            .expect("granted; no SELECT on authz_outbox needed"),
        "timeout"
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "REVOKE ALL ON FUNCTION authz_outbox_wait_for_resource(text, text, interval, bigint) FROM {role}; DROP ROLE {role}"
    )))
    .execute(&pool)
    .await
    .expect("cleanup");
}
