//! The write path: every write to `agent_api_keys` / `agents`, whichever code
//! path makes it, adds its outbox row in the same transaction.

mod common;

use authz_outbox::capture::{self, NewApiKey};
use authz_outbox::domain::ApiKeyType;
use common::{agent, key, principal, rows};
use sqlx::PgPool;

#[sqlx::test(migrations = false)]
async fn create_commits_row_and_register_together(pool: PgPool) {
    let pool = common::host_db(pool).await;
    agent(&pool, "a1").await;
    let created = key(&pool, "a1", "ci").await;

    let all = rows(&pool).await;
    let register = all
        .iter()
        .find(|r| r.id == created.outbox_id)
        .expect("outbox row");
    assert_eq!(register.operation, "register");
    assert_eq!(register.resource_type, "api_key");
    assert_eq!(register.resource_id, created.id);
    assert_eq!(register.parent_id.as_deref(), Some("a1"));
    assert_eq!(register.state, "pending");
    assert_eq!(
        register.principal,
        Some(serde_json::json!({"user_id": "u1"}))
    );
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM agent_api_keys WHERE id = $1")
        .bind(&created.id)
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(stored, 1);
}

#[sqlx::test(migrations = false)]
async fn rollback_leaves_neither_row_nor_outbox_row(pool: PgPool) {
    let pool = common::host_db(pool).await;
    agent(&pool, "a1").await;
    let before = rows(&pool).await.len();
    let mut tx = pool.begin().await.expect("begin");
    let created = capture::create_api_key_in(
        &mut tx,
        NewApiKey {
            agent_id: "a1".into(),
            name: "tmp".into(),
            key_type: ApiKeyType::Internal,
            secret: None,
        },
        Some(&principal("u1")),
    )
    .await
    .expect("insert inside the transaction");
    tx.rollback().await.expect("rollback");

    assert_eq!(rows(&pool).await.len(), before);
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM agent_api_keys WHERE id = $1")
        .bind(&created.id)
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(stored, 0);
}

#[sqlx::test(migrations = false)]
async fn an_insert_failing_after_capture_leaves_nothing(pool: PgPool) {
    let pool = common::host_db(pool).await;
    // The seed's orphan: register succeeded, then the insert failed. Here the
    // capture is part of the insert, so a failing statement takes it along.
    agent(&pool, "a1").await;
    let before = rows(&pool).await.len();
    let result = capture::create_api_key(
        &pool,
        NewApiKey {
            agent_id: "no-such-agent".into(),
            name: "k".into(),
            key_type: ApiKeyType::External,
            secret: None,
        },
        Some(&principal("u1")),
    )
    .await;
    assert!(matches!(
        result,
        Err(capture::CaptureError::UnknownAgent(_))
    ));
    assert_eq!(rows(&pool).await.len(), before);
}

async fn deregisters(pool: &PgPool, key_id: &str) -> Vec<common::Row> {
    rows(pool)
        .await
        .into_iter()
        .filter(|r| r.resource_id == key_id && r.operation == "deregister")
        .collect()
}

#[sqlx::test(migrations = false)]
async fn every_delete_path_enqueues_exactly_one_deregister(pool: PgPool) {
    let pool = common::host_db(pool).await;
    agent(&pool, "a1").await;
    agent(&pool, "a2").await;

    let by_id = key(&pool, "a1", "by-id").await;
    capture::delete_api_key(&pool, &by_id.id, None)
        .await
        .expect("delete");
    assert_eq!(deregisters(&pool, &by_id.id).await.len(), 1, "delete by id");

    let by_name = key(&pool, "a1", "by-name").await;
    capture::delete_api_key_by_name(&pool, "a1", "by-name", ApiKeyType::External, None)
        .await
        .expect("delete");
    assert_eq!(
        deregisters(&pool, &by_name.id).await.len(),
        1,
        "delete by name"
    );

    let plain = key(&pool, "a1", "plain").await;
    sqlx::query("DELETE FROM agent_api_keys WHERE id = $1")
        .bind(&plain.id)
        .execute(&pool)
        .await
        .expect("plain SQL delete");
    assert_eq!(
        deregisters(&pool, &plain.id).await.len(),
        1,
        "plain SQL delete"
    );

    let cascaded = key(&pool, "a2", "cascaded").await;
    sqlx::query("DELETE FROM agents WHERE id = 'a2'")
        .execute(&pool)
        .await
        .expect("agent delete cascades");
    let d = deregisters(&pool, &cascaded.id).await;
    assert_eq!(d.len(), 1, "cascade");
    // No principal was set for these deletes: the creator recorded at
    // registration is borrowed, so the deregister is deliverable.
    assert_eq!(d[0].state, "pending");
    assert_eq!(d[0].principal, Some(serde_json::json!({"user_id": "u1"})));
    let agent_deregisters = rows(&pool)
        .await
        .into_iter()
        .filter(|r| {
            r.resource_type == "agent" && r.resource_id == "a2" && r.operation == "deregister"
        })
        .count();
    assert_eq!(agent_deregisters, 1, "the agent itself is deregistered");
}

#[sqlx::test(migrations = false)]
async fn rekeying_a_row_deregisters_the_old_and_registers_the_new(pool: PgPool) {
    let pool = common::host_db(pool).await;
    agent(&pool, "a1").await;
    agent(&pool, "a2").await;
    let k = key(&pool, "a1", "moving").await;
    let before = rows(&pool).await.len();
    sqlx::query("UPDATE agent_api_keys SET name = 'renamed' WHERE id = $1")
        .bind(&k.id)
        .execute(&pool)
        .await
        .expect("rename");
    assert_eq!(rows(&pool).await.len(), before, "a rename captures nothing");

    sqlx::query("UPDATE agent_api_keys SET agent_id = 'a2' WHERE id = $1")
        .bind(&k.id)
        .execute(&pool)
        .await
        .expect("move");
    let all = rows(&pool).await;
    let new: Vec<_> = all[before..].iter().collect();
    assert_eq!(new.len(), 2);
    assert_eq!(
        (new[0].operation.as_str(), new[0].parent_id.as_deref()),
        ("deregister", Some("a1"))
    );
    assert_eq!(
        (new[1].operation.as_str(), new[1].parent_id.as_deref()),
        ("register", Some("a2"))
    );
}

#[sqlx::test(migrations = false)]
async fn missing_creator_is_a_dead_row_with_the_reason(pool: PgPool) {
    let pool = common::host_db(pool).await;
    agent(&pool, "a1").await;
    let created = capture::create_api_key(
        &pool,
        NewApiKey {
            agent_id: "a1".into(),
            name: "nobody".into(),
            key_type: ApiKeyType::Slack,
            secret: None,
        },
        None,
    )
    .await
    .expect("the write itself succeeds");
    let r = common::row(&pool, created.outbox_id).await;
    assert_eq!(r.state, "dead");
    assert!(
        r.last_error
            .as_deref()
            .unwrap_or("")
            .contains("no creator resolvable"),
        "{:?}",
        r.last_error
    );

    // A principal that is not JSON, or names no creator, is the same case and
    // never aborts the host's write.
    for bad in ["not json", r#"{"account_id":"acc"}"#, "[1,2]"] {
        let mut tx = pool.begin().await.expect("begin");
        sqlx::query("SELECT set_config('authz_outbox.principal', $1, true)")
            .bind(bad)
            .execute(&mut *tx)
            .await
            .expect("set");
        sqlx::query(
            "INSERT INTO agents (id, name, description, status) VALUES ($1, $1, '', 'READY')",
        )
        .bind(format!("agent-{}", bad.len()))
        .execute(&mut *tx)
        .await
        .expect("insert still works");
        tx.commit().await.expect("commit");
        let last = rows(&pool).await.pop().expect("a row");
        assert_eq!(last.state, "dead", "{bad}");
    }
}

#[sqlx::test(migrations = false)]
async fn credential_fields_of_a_principal_are_never_stored(pool: PgPool) {
    let pool = common::host_db(pool).await;
    // Straight through SQL, as a writer in another language would.
    let mut tx = pool.begin().await.expect("begin");
    sqlx::query("SELECT set_config('authz_outbox.principal', $1, true)")
        .bind(r#"{"user_id":"u9","account_id":"acc","api_key":"sk-live-SECRET","authorization":"Bearer SECRET","nested":{"token":"SECRET"}}"#)
        .execute(&mut *tx)
        .await
        .expect("set");
    sqlx::query(
        "INSERT INTO agents (id, name, description, status) VALUES ('a9', 'nine', '', 'READY')",
    )
    .execute(&mut *tx)
    .await
    .expect("insert");
    tx.commit().await.expect("commit");

    let dump: String =
        sqlx::query_scalar("SELECT string_agg(to_jsonb(o)::text, ' ') FROM authz_outbox o")
            .fetch_one(&pool)
            .await
            .expect("dump");
    assert!(!dump.contains("SECRET"), "{dump}");
    let r = rows(&pool).await.pop().expect("row");
    assert_eq!(
        r.principal,
        Some(serde_json::json!({"user_id": "u9", "account_id": "acc"}))
    );

    // Only allowlisted keys, and an allowlisted key only with a string (or
    // null) value: a credential hidden under an allowed name is dropped too.
    let mut tx = pool.begin().await.expect("begin");
    sqlx::query("SELECT set_config('authz_outbox.principal', $1, true)")
        .bind(r#"{"user_id":"u9","account_id":{"token":"SECRET"},"principal_type":null}"#)
        .execute(&mut *tx)
        .await
        .expect("set");
    sqlx::query(
        "INSERT INTO agents (id, name, description, status) VALUES ('a10', 'ten', '', 'READY')",
    )
    .execute(&mut *tx)
    .await
    .expect("insert");
    tx.commit().await.expect("commit");
    let r = rows(&pool).await.pop().expect("row");
    assert_eq!(
        r.principal,
        Some(serde_json::json!({"user_id": "u9", "principal_type": null}))
    );

    // The key secret itself never reaches the outbox either.
    let k = key(&pool, "a9", "s").await;
    let dump: String =
        sqlx::query_scalar("SELECT string_agg(to_jsonb(o)::text, ' ') FROM authz_outbox o")
            .fetch_one(&pool)
            .await
            .expect("dump");
    assert!(!dump.contains(&k.secret), "{dump}");
}

#[sqlx::test(migrations = false)]
async fn a_role_default_principal_covers_writers_that_cannot_set_it(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let db: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&pool)
        .await
        .expect("db");
    // The database name is generated by the harness, not user input.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        r#"ALTER DATABASE "{db}" SET authz_outbox.principal = '{{"service_account_id":"sa-host"}}'"#
    )))
    .execute(&pool)
    .await
    .expect("alter database");
    // A new connection picks the default up.
    let mut conn = sqlx::pool::PoolOptions::<sqlx::Postgres>::new()
        .max_connections(1)
        .connect_with((*pool.connect_options()).clone())
        .await
        .expect("connect");
    let _ = &mut conn;
    sqlx::query(
        "INSERT INTO agents (id, name, description, status) VALUES ('a5', 'five', '', 'READY')",
    )
    .execute(&conn)
    .await
    .expect("insert");
    let r = rows(&pool).await.pop().expect("row");
    assert_eq!(r.state, "pending");
    assert_eq!(
        r.principal,
        Some(serde_json::json!({"service_account_id": "sa-host"}))
    );
}

#[sqlx::test(migrations = false)]
async fn captures_notify_only_while_a_worker_is_asleep(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let mut listener = sqlx::postgres::PgListener::connect_with(&pool)
        .await
        .expect("listener");
    listener.listen("authz_outbox").await.expect("listen");
    let wait = std::time::Duration::from_millis(300);

    // Nobody asleep (workers busy, or none): no NOTIFY, whose global commit
    // lock would serialise the writers.
    agent(&pool, "a1").await;
    assert!(
        tokio::time::timeout(wait, listener.recv()).await.is_err(),
        "no notification while no worker sleeps"
    );

    authz_outbox::delivery::listener::mark_asleep(&pool, "idle-worker")
        .await
        .expect("mark");
    agent(&pool, "a2").await;
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), listener.recv())
        .await
        .expect("notified in time")
        .expect("notification");
    assert_eq!(n.channel(), "authz_outbox");

    authz_outbox::delivery::listener::mark_awake(&pool, "idle-worker")
        .await
        .expect("mark");
    agent(&pool, "a3").await;
    assert!(tokio::time::timeout(wait, listener.recv()).await.is_err());
}

#[sqlx::test(migrations = false)]
async fn wait_until_delivered_reports_terminal_states(pool: PgPool) {
    let pool = common::host_db(pool).await;
    agent(&pool, "a1").await;
    let k = key(&pool, "a1", "w").await;
    let timeout = std::time::Duration::from_millis(100);
    assert!(matches!(
        capture::wait_until_delivered(&pool, k.outbox_id, timeout).await,
        Err(capture::WaitError::Timeout { .. })
    ));
    sqlx::query("UPDATE authz_outbox SET state = 'delivered' WHERE id = $1")
        .bind(k.outbox_id)
        .execute(&pool)
        .await
        .expect("update");
    assert_eq!(
        capture::wait_until_delivered(&pool, k.outbox_id, timeout)
            .await
            .expect("ok"),
        capture::DeliveryState::Delivered
    );
    assert!(matches!(
        capture::wait_until_delivered(&pool, 999_999, timeout).await,
        Err(capture::WaitError::NoSuchRow(_))
    ));
}

/// A capture that straddles a switch from WAL back to table mode hands the
/// table-mode enqueue the WAL mode's unparsed principal (a JSON string):
/// it is parsed and reduced before the row is written, never stored raw.
#[sqlx::test(migrations = false)]
async fn an_unparsed_principal_reaching_the_table_mode_enqueue_is_reduced(pool: PgPool) {
    let pool = common::host_db(pool).await;
    agent(&pool, "a1").await;
    sqlx::query(
        "SELECT authz_outbox_capture_enqueue('register', 'api_key', 'k-raw', 'agent', 'a1',
                to_jsonb($1::text), 'setting', NULL)",
    )
    .bind(r#"{"user_id":"u9","token":"tok-NOPE"}"#)
    .execute(&pool)
    .await
    .expect("enqueue");
    let (state, principal): (String, Option<serde_json::Value>) =
        sqlx::query_as("SELECT state, principal FROM authz_outbox WHERE resource_id = 'k-raw'")
            .fetch_one(&pool)
            .await
            .expect("row");
    assert_eq!(state, "pending");
    assert_eq!(principal, Some(serde_json::json!({"user_id": "u9"})));
}
