//! WAL capture (`migrate --capture wal`) against a real PostgreSQL with
//! `wal_level = logical` (scripts/test.sh starts its cluster so): captures
//! become logical messages, the relay moves them into the outbox exactly
//! once, a lost slot is a recorded gap that reconcile heals, and switching
//! modes with writes in flight loses nothing.
//!
//! Each test leaves table mode (dropping its slot) before it ends: a
//! database that a slot belongs to cannot be dropped.

mod common;

use std::process::Command;
use std::time::Duration;

use authz_outbox::relay::{self, StopAt};
use common::database_url;
use sqlx::{Connection, PgConnection, PgPool};

const BIN: &str = env!("CARGO_BIN_EXE_authz-outbox");

fn migrate(url: &str, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("migrate")
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", url)
        .output()
        .expect("migrate runs")
}

fn ok(out: &std::process::Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "migrate failed: {stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn wal_db(pool: PgPool) -> (PgPool, String) {
    let pool = common::host_db(pool).await;
    let url = database_url(&pool).await;
    let out = ok(&migrate(&url, &["--capture", "wal"]));
    assert!(out.contains("capture mode: wal (was table)"), "{out}");
    (pool, url)
}

async fn leave_wal(url: &str) {
    ok(&migrate(url, &["--capture", "table"]));
}

/// A key written as the host writes it (no library: its outbox id does not
/// exist in WAL mode until the relay inserts the row), flushed at commit so
/// a relay step right after decodes it.
async fn host_key(pool: &PgPool, id: &str, agent: &str) {
    host_key_with(pool, id, agent, "on").await;
}

async fn host_key_with(pool: &PgPool, id: &str, agent: &str, synchronous_commit: &str) {
    let mut tx = pool.begin().await.expect("begin");
    sqlx::query("SELECT set_config('authz_outbox.principal', '{\"user_id\":\"u1\"}', true), set_config('synchronous_commit', $1, true)")
        .bind(synchronous_commit)
        .execute(&mut *tx)
        .await
        .expect("principal");
    sqlx::query(
        "INSERT INTO agent_api_keys (id, agent_id, name, api_key_type, api_key)
         VALUES ($1, $2, $1, 'EXTERNAL', 'secret-' || $1)",
    )
    .bind(id)
    .bind(agent)
    .execute(&mut *tx)
    .await
    .expect("key");
    tx.commit().await.expect("commit");
}

async fn host_agent(pool: &PgPool, id: &str) {
    let mut tx = pool.begin().await.expect("begin");
    sqlx::query("SELECT set_config('authz_outbox.principal', '{\"user_id\":\"u1\"}', true), set_config('synchronous_commit', 'on', true)")
        .execute(&mut *tx)
        .await
        .expect("principal");
    sqlx::query("INSERT INTO agents (id, name, description, status) VALUES ($1, $1, '', 'READY')")
        .bind(id)
        .execute(&mut *tx)
        .await
        .expect("agent");
    tx.commit().await.expect("commit");
}

async fn outbox_count(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM authz_outbox")
        .fetch_one(pool)
        .await
        .expect("count")
}

async fn applied_lsn(pool: &PgPool) -> String {
    sqlx::query_scalar("SELECT applied_lsn::text FROM authz_outbox_relay")
        .fetch_one(pool)
        .await
        .expect("relay row")
}

/// A relay leading on `url`'s database until `cancel`, as `run` starts it
/// (fast polling where it polls).
fn spawn_relay(
    url: &str,
    pool: &PgPool,
    beside: relay::Beside,
    cancel: &tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(relay::run(
        relay::RelayConfig {
            database_url: url.to_string(),
            poll: Duration::from_millis(5),
            batch: 1000,
        },
        pool.clone(),
        beside,
        cancel.clone(),
    ))
}

async fn relay_conn(url: &str) -> (PgConnection, String) {
    let mut conn = PgConnection::connect(url).await.expect("connect");
    let slot = relay::slot_name(&mut conn)
        .await
        .expect("slot name")
        .expect("WAL capture installed");
    (conn, slot)
}

#[sqlx::test(migrations = false)]
async fn a_capture_is_a_message_until_the_relay_inserts_it_once(pool: PgPool) {
    let (pool, url) = wal_db(pool).await;
    host_agent(&pool, "a1").await;
    host_key(&pool, "k1", "a1").await;
    assert_eq!(outbox_count(&pool).await, 0, "WAL mode inserts no row");

    let (mut conn, slot) = relay_conn(&url).await;
    // Killed after its insert committed, before the slot moved: the next
    // relay reads the same transactions again and skips them.
    let first = relay::step(&mut conn, &slot, 1000, StopAt::BeforeAdvance)
        .await
        .expect("step");
    assert_eq!(first.relayed, 2);
    drop(conn);
    let (mut conn, slot) = relay_conn(&url).await;
    let second = relay::step(&mut conn, &slot, 1000, StopAt::Never)
        .await
        .expect("step");
    assert_eq!((second.relayed, second.skipped), (0, 2), "{second:?}");
    let rows: Vec<(String, String, String, Option<serde_json::Value>)> = sqlx::query_as(
        "SELECT resource_type, resource_id, operation, principal FROM authz_outbox ORDER BY id",
    )
    .fetch_all(&pool)
    .await
    .expect("rows");
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!((rows[0].0.as_str(), rows[0].1.as_str()), ("agent", "a1"));
    assert_eq!((rows[1].0.as_str(), rows[1].1.as_str()), ("api_key", "k1"));
    assert_eq!(rows[1].3, Some(serde_json::json!({"user_id": "u1"})));
    let secrets: i64 =
        sqlx::query_scalar("SELECT count(*) FROM authz_outbox WHERE attributes::text LIKE '%secret%' OR principal::text LIKE '%secret%'")
            .fetch_one(&pool)
            .await
            .expect("secrets");
    assert_eq!(secrets, 0, "no key secret in a relayed row");
    // A third step finds nothing new.
    let third = relay::step(&mut conn, &slot, 1000, StopAt::Never)
        .await
        .expect("step");
    assert_eq!((third.relayed, third.skipped), (0, 0), "{third:?}");
    drop(conn);
    leave_wal(&url).await;
}

#[sqlx::test(migrations = false)]
async fn rows_of_one_resource_keep_commit_order(pool: PgPool) {
    let (pool, url) = wal_db(pool).await;
    host_agent(&pool, "a1").await;
    host_agent(&pool, "a2").await;
    host_key(&pool, "k1", "a1").await;
    let mut tx = pool.begin().await.expect("begin");
    sqlx::query("SELECT set_config('authz_outbox.principal', '{\"user_id\":\"u2\"}', true), set_config('synchronous_commit', 'on', true)")
        .execute(&mut *tx)
        .await
        .expect("principal");
    sqlx::query("UPDATE agent_api_keys SET agent_id = 'a2' WHERE id = 'k1'")
        .execute(&mut *tx)
        .await
        .expect("re-parent");
    tx.commit().await.expect("commit");
    sqlx::raw_sql("SET synchronous_commit = on; DELETE FROM agent_api_keys WHERE id = 'k1'")
        .execute(&pool)
        .await
        .expect("delete");
    let (mut conn, slot) = relay_conn(&url).await;
    relay::step(&mut conn, &slot, 1000, StopAt::Never)
        .await
        .expect("step");
    let ops: Vec<(String, Option<String>, String)> = sqlx::query_as(
        "SELECT operation, parent_id, state FROM authz_outbox WHERE resource_id = 'k1' ORDER BY id",
    )
    .fetch_all(&pool)
    .await
    .expect("rows");
    let got: Vec<(&str, Option<&str>)> = ops
        .iter()
        .map(|(o, p, _)| (o.as_str(), p.as_deref()))
        .collect();
    assert_eq!(
        got,
        [
            ("register", Some("a1")),
            ("deregister", Some("a1")),
            ("register", Some("a2")),
            ("deregister", Some("a2")),
        ]
    );
    // The delete had no principal: it borrowed the register's creator.
    assert!(ops.iter().all(|(_, _, s)| s == "pending"), "{ops:?}");
    drop(conn);
    leave_wal(&url).await;
}

#[sqlx::test(migrations = false)]
async fn a_dropped_slot_is_recreated_and_recorded_as_a_gap(pool: PgPool) {
    let (pool, url) = wal_db(pool).await;
    host_agent(&pool, "a1").await;
    let (mut conn, slot) = relay_conn(&url).await;
    relay::step(&mut conn, &slot, 1000, StopAt::Never)
        .await
        .expect("step");
    sqlx::query("SELECT pg_drop_replication_slot($1)")
        .bind(&slot)
        .execute(&pool)
        .await
        .expect("drop the slot");
    // Lost with the slot: nothing decodes it any more.
    host_agent(&pool, "lost").await;
    let err = relay::step(&mut conn, &slot, 1000, StopAt::Never)
        .await
        .expect_err("the slot is gone");
    let relay::RelayError::SlotLost { reason, .. } = err else {
        panic!("not a lost slot: {err}");
    };
    relay::recover_lost_slot(&mut conn, &slot, &reason)
        .await
        .expect("recovered");
    let (gaps, pending): (i64, bool) =
        sqlx::query_as("SELECT gaps, reconcile_pending FROM authz_outbox_relay")
            .fetch_one(&pool)
            .await
            .expect("relay row");
    assert_eq!((gaps, pending), (1, true));
    // `status` says so, with what to run.
    let out = Command::new(BIN)
        .arg("status")
        .env("DATABASE_URL", &url)
        .output()
        .expect("status runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("capture: wal") && stdout.contains("gap"),
        "{stdout}"
    );
    // Captures after the new slot are relayed again.
    host_agent(&pool, "after").await;
    relay::step(&mut conn, &slot, 1000, StopAt::Never)
        .await
        .expect("step");
    let ids: Vec<String> = sqlx::query_scalar("SELECT resource_id FROM authz_outbox ORDER BY id")
        .fetch_all(&pool)
        .await
        .expect("ids");
    assert_eq!(
        ids,
        ["a1", "after"],
        "the gap's capture is lost, the next is not"
    );
    drop(conn);
    leave_wal(&url).await;
}

#[sqlx::test(migrations = false)]
async fn switching_modes_with_writes_in_flight_loses_nothing(pool: PgPool) {
    switch_with_writes_in_flight(pool, false).await;
}

/// The same with a relay running throughout: it streams in WAL mode, and
/// on the switch back lets go of the slot (draining it through the SQL
/// functions) so that `migrate` can drop it.
#[sqlx::test(migrations = false)]
async fn switching_modes_with_a_streaming_relay_running_loses_nothing(pool: PgPool) {
    switch_with_writes_in_flight(pool, true).await;
}

async fn switch_with_writes_in_flight(pool: PgPool, with_relay: bool) {
    let pool = common::host_db(pool).await;
    let url = database_url(&pool).await;
    host_agent(&pool, "a1").await;
    let cancel = tokio_util::sync::CancellationToken::new();
    let relay = with_relay.then(|| spawn_relay(&url, &pool, relay::Beside::default(), &cancel));
    let writing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let mut writers = Vec::new();
    for w in 0..3 {
        let (pool, writing) = (pool.clone(), writing.clone());
        writers.push(tokio::spawn(async move {
            let mut n = 0u32;
            while writing.load(std::sync::atomic::Ordering::SeqCst) {
                // Commits that return before their WAL is flushed, as a
                // host with synchronous_commit = off makes them.
                host_key_with(&pool, &format!("w{w}-{n}"), "a1", "off").await;
                n += 1;
            }
            n
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let url2 = url.clone();
    let out = tokio::task::spawn_blocking(move || migrate(&url2, &["--capture", "wal"]))
        .await
        .expect("join");
    ok(&out);
    // With a relay, long enough for it to find the slot and stream.
    let in_wal = if with_relay { 3000 } else { 300 };
    tokio::time::sleep(Duration::from_millis(in_wal)).await;
    if with_relay {
        let relayed: i64 = sqlx::query_scalar("SELECT relayed FROM authz_outbox_relay")
            .fetch_one(&pool)
            .await
            .expect("relay row");
        assert!(relayed > 0, "the relay streamed while in WAL mode");
    }
    let url2 = url.clone();
    let out = tokio::task::spawn_blocking(move || migrate(&url2, &["--capture", "table"]))
        .await
        .expect("join");
    ok(&out);
    tokio::time::sleep(Duration::from_millis(200)).await;
    writing.store(false, std::sync::atomic::Ordering::SeqCst);
    let mut written = 0u32;
    for w in writers {
        written += w.await.expect("writer");
    }
    let keys: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT resource_id) FROM authz_outbox WHERE resource_type = 'api_key'",
    )
    .fetch_one(&pool)
    .await
    .expect("count");
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM authz_outbox WHERE resource_type = 'api_key'")
            .fetch_one(&pool)
            .await
            .expect("count");
    cancel.cancel();
    if let Some(relay) = relay {
        relay.await.expect("relay stops");
    }
    assert!(written > 10, "the writers wrote through both switches");
    assert_eq!(
        (keys, rows),
        (i64::from(written), i64::from(written)),
        "every key captured exactly once"
    );
    let slots: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_replication_slots WHERE database = current_database()",
    )
    .fetch_one(&pool)
    .await
    .expect("slots");
    assert_eq!(slots, 0, "back in table mode, the slot is dropped");
}

#[sqlx::test(migrations = false)]
async fn a_role_without_replication_is_told_what_to_change(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let url = database_url(&pool).await;
    let role = format!("norepl_{}", std::process::id());
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN"
    )))
    .execute(&pool)
    .await
    .expect("role");
    let mut as_role = url::Url::parse(&url).expect("url");
    as_role.set_username(&role).expect("user");
    let out = migrate(as_role.as_str(), &["--capture", "wal"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!("ALTER ROLE {role} REPLICATION")),
        "{stderr}"
    );
    let slots: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_replication_slots WHERE database = current_database()",
    )
    .fetch_one(&pool)
    .await
    .expect("slots");
    assert_eq!(slots, 0, "nothing changed");
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP ROLE {role}")))
        .execute(&pool)
        .await
        .expect("drop role");
}

/// `migrate --capture wal` on a cluster below `wal_level = logical` (the
/// second cluster scripts/test.sh starts at `replica`,
/// `WAL_REPLICA_DATABASE_URL`): one line naming the setting to change and
/// what it is now, a non-zero exit, and the database left in table mode
/// with no slot.
#[tokio::test]
async fn a_cluster_below_logical_wal_level_is_told_what_to_change() {
    let admin_url = std::env::var("WAL_REPLICA_DATABASE_URL").expect(
        "WAL_REPLICA_DATABASE_URL: scripts/test.sh starts a cluster at wal_level = replica for this test",
    );
    let mut admin = PgConnection::connect(&admin_url).await.expect("connect");
    let level: String = sqlx::query_scalar("SHOW wal_level")
        .fetch_one(&mut admin)
        .await
        .expect("wal_level");
    assert_eq!(level, "replica", "the cluster this test needs");
    let db = format!("wal_level_{}", std::process::id());
    for statement in [
        format!("DROP DATABASE IF EXISTS {db}"),
        format!("CREATE DATABASE {db}"),
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
            .execute(&mut admin)
            .await
            .expect("database");
    }
    let mut url = url::Url::parse(&admin_url).expect("url");
    url.set_path(&db);
    let pool = PgPool::connect(url.as_str()).await.expect("connect");
    sqlx::raw_sql(common::HOST_SCHEMA)
        .execute(&pool)
        .await
        .expect("host schema");
    ok(&migrate(url.as_str(), &[]));

    let out = migrate(url.as_str(), &["--capture", "wal"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("wal_level = logical (it is replica)")
            && stderr.contains("restart PostgreSQL"),
        "{stderr}"
    );
    let mut conn = pool.acquire().await.expect("connection");
    let mode = authz_outbox::mapping::install::capture_mode(&mut conn)
        .await
        .expect("mode");
    assert_eq!(mode.as_str(), "table", "nothing changed");
    let slots: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_replication_slots")
        .fetch_one(&mut *conn)
        .await
        .expect("slots");
    assert_eq!(slots, 0);
    drop(conn);
    pool.close().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE {db}")))
        .execute(&mut admin)
        .await
        .expect("drop database");
}

/// Uninstall takes WAL capture's slot and publication with it (a slot left
/// behind keeps the primary's WAL forever), and the next `migrate` starts
/// in table mode.
#[sqlx::test(migrations = false)]
async fn uninstall_drops_the_slot_and_forgets_the_mode(pool: PgPool) {
    let (pool, url) = wal_db(pool).await;
    let out = Command::new(BIN)
        .args(["uninstall", "--apply"])
        .env("DATABASE_URL", &url)
        .output()
        .expect("uninstall runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (slots, publications): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM pg_replication_slots WHERE database = current_database()),
                (SELECT count(*) FROM pg_publication WHERE pubname = 'authz_outbox_relay')",
    )
    .fetch_one(&pool)
    .await
    .expect("slots");
    assert_eq!((slots, publications), (0, 0));
    let out = ok(&migrate(&url, &[]));
    assert!(!out.contains("capture mode"), "{out}");
    host_agent(&pool, "after").await;
    assert_eq!(
        outbox_count(&pool).await,
        1,
        "table mode again: the row is inserted"
    );
}

/// The gap heals: a delete captured while the slot was gone never reaches
/// the outbox, and the reconcile after the gap (here the command an
/// operator runs, `reconcile --apply`) finds the orphan and deregisters it
/// through the outbox; the reconcile clears the gap's warning.
#[sqlx::test(migrations = false)]
async fn reconcile_heals_a_delete_lost_in_the_gap(pool: PgPool) {
    let (pool, url) = wal_db(pool).await;
    let dev = common::dev_server().await;
    let grpc = dev.grpc_endpoint();
    host_agent(&pool, "a1").await;
    host_key(&pool, "k1", "a1").await;
    let (mut conn, slot) = relay_conn(&url).await;
    relay::step(&mut conn, &slot, 1000, StopAt::Never)
        .await
        .expect("step");
    common::run_once_spicedb(&pool, &grpc, common::config("w"), 50).await;
    assert!(
        !common::relationships_of(&grpc, "api_key", "k1")
            .await
            .is_empty(),
        "registered before the gap"
    );
    sqlx::query("SELECT pg_drop_replication_slot($1)")
        .bind(&slot)
        .execute(&pool)
        .await
        .expect("drop the slot");
    sqlx::raw_sql("SET synchronous_commit = on; DELETE FROM agent_api_keys WHERE id = 'k1'")
        .execute(&pool)
        .await
        .expect("delete, lost with the slot");
    let Err(relay::RelayError::SlotLost { reason, .. }) =
        relay::step(&mut conn, &slot, 1000, StopAt::Never).await
    else {
        panic!("the relay did not find its slot gone");
    };
    relay::recover_lost_slot(&mut conn, &slot, &reason)
        .await
        .expect("recovered");
    assert_eq!(
        outbox_count(&pool).await,
        2,
        "the delete never reached the outbox"
    );

    // Not blocking this runtime: the SpiceDB stand-in serves on it.
    let (url2, grpc2) = (url.clone(), grpc.clone());
    let out = tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            // --force: the one key is all SpiceDB holds of its type, which
            // the deregister cap would otherwise refuse.
            .args(["reconcile", "--apply", "--force", "--grace", "0s"])
            .env("DATABASE_URL", &url2)
            .env("SPICEDB_ENDPOINT", &grpc2)
            .env("AUTHZ_OUTBOX_TARGET", "spicedb")
            .output()
    })
    .await
    .expect("join")
    .expect("reconcile runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("orphan"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    common::run_once_spicedb(&pool, &grpc, common::config("w"), 50).await;
    assert!(
        common::relationships_of(&grpc, "api_key", "k1")
            .await
            .is_empty(),
        "the orphan the gap left is deregistered"
    );
    let pending: bool = sqlx::query_scalar("SELECT reconcile_pending FROM authz_outbox_relay")
        .fetch_one(&pool)
        .await
        .expect("relay row");
    assert!(!pending, "the reconcile cleared the gap's warning");
    drop(conn);
    dev.shutdown().await;
    leave_wal(&url).await;
}

/// Read-your-writes in WAL mode: a wait for a resource whose capture is
/// still in the slot waits for the relay to read past the caller's commit
/// and then finds the row (pending here, no worker runs: a timeout naming
/// it), instead of answering "none" at once.
#[sqlx::test(migrations = false)]
async fn a_wait_for_a_resource_waits_for_the_relay_first(pool: PgPool) {
    let (pool, url) = wal_db(pool).await;
    host_agent(&pool, "a1").await;
    host_key(&pool, "k1", "a1").await;
    let waiter = {
        let pool = pool.clone();
        tokio::spawn(async move {
            sqlx::query_as::<_, (String, Option<i64>)>(
                "SELECT outcome, outbox_id FROM authz_outbox_wait_for_resource('api_key', 'k1', interval '3 seconds')",
            )
            .fetch_one(&pool)
            .await
            .expect("wait")
        })
    };
    // The relay starts only once the wait is under way.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cancel = tokio_util::sync::CancellationToken::new();
    let relay = spawn_relay(&url, &pool, relay::Beside::default(), &cancel);
    let (outcome, id) = waiter.await.expect("join");
    cancel.cancel();
    relay.await.expect("relay stops");
    assert_eq!(outcome, "timeout", "the row was found, pending");
    assert!(id.is_some(), "with its id");
    leave_wal(&url).await;
}

/// A key written with `principal` as the writing transaction's setting
/// (NULL: not set), on `conn`.
async fn key_as(conn: &mut PgConnection, id: &str, principal: Option<&str>) {
    let mut tx = conn.begin().await.expect("begin");
    sqlx::query("SELECT set_config('synchronous_commit', 'on', true)")
        .execute(&mut *tx)
        .await
        .expect("commit setting");
    if let Some(p) = principal {
        sqlx::query("SELECT set_config('authz_outbox.principal', $1, true)")
            .bind(p)
            .execute(&mut *tx)
            .await
            .expect("principal");
    }
    sqlx::query(
        "INSERT INTO agent_api_keys (id, agent_id, name, api_key_type, api_key)
         VALUES ($1, 'a1', $1, 'EXTERNAL', 'secret-' || $1)",
    )
    .bind(id)
    .execute(&mut *tx)
    .await
    .expect("key");
    tx.commit().await.expect("commit");
}

#[sqlx::test(migrations = false)]
async fn the_relay_reduces_and_labels_the_principal_as_table_mode_does(pool: PgPool) {
    let (pool, url) = wal_db(pool).await;
    host_agent(&pool, "a1").await;
    // The login role's default principal for this database, which a
    // session that does not set one writes with.
    sqlx::query(
        r#"DO $$ BEGIN EXECUTE format('ALTER ROLE CURRENT_USER IN DATABASE %I SET authz_outbox.principal = %L',
                                      current_database(), '{"user_id":"svc"}'); END $$"#,
    )
    .execute(&pool)
    .await
    .expect("role default");
    let mut conn = PgConnection::connect(&url).await.expect("a new session");
    key_as(
        &mut conn,
        "k-cred",
        Some(r#"{"user_id":"u2","api_key":"sk-live-NOPE","account_id":"acc"}"#),
    )
    .await;
    key_as(&mut conn, "k-bad", Some("not json")).await;
    key_as(&mut conn, "k-role", None).await;
    key_as(&mut conn, "k-same", Some(r#"{"user_id":"svc"}"#)).await;
    key_as(&mut conn, "k-set", Some(r#"{"user_id":"u3"}"#)).await;
    drop(conn);

    let (mut relay_conn, slot) = relay_conn(&url).await;
    relay::step(&mut relay_conn, &slot, 1000, StopAt::Never)
        .await
        .expect("step");
    drop(relay_conn);
    let rows: Vec<(String, String, Option<serde_json::Value>, Option<String>)> = sqlx::query_as(
        "SELECT resource_id, state, principal, principal_source FROM authz_outbox
         WHERE resource_type = 'api_key' ORDER BY id",
    )
    .fetch_all(&pool)
    .await
    .expect("rows");
    use serde_json::json;
    let expected = vec![
        (
            "k-cred",
            "pending",
            Some(json!({"user_id": "u2", "account_id": "acc"})),
            Some("setting"),
        ),
        ("k-bad", "dead", None, Some("setting")),
        (
            "k-role",
            "pending",
            Some(json!({"user_id": "svc"})),
            Some("role_default"),
        ),
        (
            "k-same",
            "pending",
            Some(json!({"user_id": "svc"})),
            Some("role_default"),
        ),
        (
            "k-set",
            "pending",
            Some(json!({"user_id": "u3"})),
            Some("setting"),
        ),
    ];
    let got: Vec<(&str, &str, Option<serde_json::Value>, Option<&str>)> = rows
        .iter()
        .map(|(id, state, p, s)| (id.as_str(), state.as_str(), p.clone(), s.as_deref()))
        .collect();
    assert_eq!(got, expected);
    let leaked: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM authz_outbox WHERE principal::text LIKE '%NOPE%' OR last_error LIKE '%NOPE%'",
    )
    .fetch_one(&pool)
    .await
    .expect("leak check");
    assert_eq!(
        leaked, 0,
        "the credential field is dropped before any row holds it"
    );
    leave_wal(&url).await;
}
async fn slot_positions(pool: &PgPool) -> (String, String) {
    sqlx::query_as(
        "SELECT r.applied_lsn::text, s.confirmed_flush_lsn::text
         FROM authz_outbox_relay r JOIN pg_replication_slots s USING (slot_name)",
    )
    .fetch_one(pool)
    .await
    .expect("positions")
}

async fn confirmed_reached_applied(pool: &PgPool) -> bool {
    sqlx::query_scalar(
        "SELECT s.confirmed_flush_lsn >= r.applied_lsn
         FROM authz_outbox_relay r JOIN pg_replication_slots s USING (slot_name)",
    )
    .fetch_one(pool)
    .await
    .expect("positions")
}

/// Reads and applies streamed batches until `rows` rows and `skipped`
/// transactions are accounted for (or 10 s pass).
async fn stream_until(
    streamer: &mut relay::stream::Streamer,
    conn: &mut PgConnection,
    rows: u64,
    skipped: u64,
    stop: StopAt,
) -> relay::stream::Applied {
    let mut total = relay::stream::Applied::default();
    let started = std::time::Instant::now();
    while (total.relayed < rows || total.skipped < skipped)
        && started.elapsed() < Duration::from_secs(10)
    {
        let batch = streamer
            .read_batch(Duration::from_millis(500), 1000)
            .await
            .expect("read");
        let done = streamer.apply(conn, batch, stop).await.expect("apply");
        total.relayed += done.relayed;
        total.skipped += done.skipped;
    }
    total
}

/// The streaming relay's exactly-once: killed after its outbox commit and
/// before it told the walsender, it had not moved the slot (never a flush
/// position past what the outbox holds), and the next relay is sent the
/// same transactions again and skips them.
#[sqlx::test(migrations = false)]
async fn a_streaming_relay_killed_before_its_status_update_relays_nothing_twice(pool: PgPool) {
    let (pool, url) = wal_db(pool).await;
    host_agent(&pool, "a1").await;
    host_key(&pool, "k1", "a1").await;

    let (mut conn, slot) = relay_conn(&url).await;
    let mut streamer = relay::stream::Streamer::open(&mut conn, &url, &slot)
        .await
        .expect("stream");
    let first = stream_until(&mut streamer, &mut conn, 2, 0, StopAt::BeforeAdvance).await;
    assert_eq!((first.relayed, first.skipped), (2, 0), "{first:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (applied, confirmed) = slot_positions(&pool).await;
    assert!(
        !confirmed_reached_applied(&pool).await,
        "the slot moved before the walsender was told: applied {applied}, confirmed {confirmed}"
    );
    drop(streamer);
    drop(conn);

    let (mut conn, slot) = relay_conn(&url).await;
    let mut streamer = relay::stream::Streamer::open(&mut conn, &url, &slot)
        .await
        .expect("stream again");
    let again = stream_until(&mut streamer, &mut conn, 0, 2, StopAt::Never).await;
    assert_eq!((again.relayed, again.skipped), (0, 2), "{again:?}");
    host_key(&pool, "k2", "a1").await;
    let next = stream_until(&mut streamer, &mut conn, 1, 0, StopAt::Never).await;
    assert_eq!(next.relayed, 1, "{next:?}");
    let ids: Vec<String> = sqlx::query_scalar("SELECT resource_id FROM authz_outbox ORDER BY id")
        .fetch_all(&pool)
        .await
        .expect("ids");
    assert_eq!(
        ids,
        ["a1", "k1", "k2"],
        "each capture once, in commit order"
    );
    // Told after the commit, the walsender moves the slot to it.
    let started = std::time::Instant::now();
    while !confirmed_reached_applied(&pool).await {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the slot never reached the outbox's position: {:?}",
            slot_positions(&pool).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(streamer);
    drop(conn);
    leave_wal(&url).await;
}

/// A relay that finds the slot streamed by another client (a dead leader's
/// walsender not gone yet) waits for it to let go: not a gap, nothing
/// recreated, nothing lost.
#[sqlx::test(migrations = false)]
async fn a_relay_waits_while_another_client_streams_the_slot(pool: PgPool) {
    let (pool, url) = wal_db(pool).await;
    host_agent(&pool, "a1").await;
    let (mut holder_conn, slot) = relay_conn(&url).await;
    let holder = relay::stream::Streamer::open(&mut holder_conn, &url, &slot)
        .await
        .expect("the other client streams the slot");

    let cancel = tokio_util::sync::CancellationToken::new();
    let relay = spawn_relay(&url, &pool, relay::Beside::default(), &cancel);
    // It keeps its turn (the leader lock) and waits, rather than failing
    // and starting over, or recreating a slot it thinks lost.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..10 {
        let held: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_locks
                            WHERE locktype = 'advisory' AND granted
                              AND objid = hashtext('authz_outbox_relay')::oid)",
        )
        .fetch_one(&pool)
        .await
        .expect("locks");
        assert!(held, "the waiting relay let go of its turn");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let gaps: i64 = sqlx::query_scalar("SELECT gaps FROM authz_outbox_relay")
        .fetch_one(&pool)
        .await
        .expect("relay row");
    assert_eq!(gaps, 0, "a busy slot is not a gap");
    assert_eq!(outbox_count(&pool).await, 0, "the other client holds it");

    drop(holder);
    drop(holder_conn);
    let started = std::time::Instant::now();
    while outbox_count(&pool).await < 1 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the relay never took its turn"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cancel.cancel();
    relay.await.expect("relay stops");
    let gaps: i64 = sqlx::query_scalar("SELECT gaps FROM authz_outbox_relay")
        .fetch_one(&pool)
        .await
        .expect("relay row");
    assert_eq!(gaps, 0);
    leave_wal(&url).await;
}

/// A transaction is sent by the walsender once its commit record is
/// flushed, a moment before other sessions can see it. The relay inserts
/// its rows only once it is visible: a worker claiming the row must see the
/// key it registers (else it supersedes the register as a key that is
/// gone). Here a transaction still running stands for that moment: a batch
/// naming it is not inserted, nor its position recorded, until it commits.
#[sqlx::test(migrations = false)]
async fn the_relay_inserts_a_sent_commit_only_once_it_is_visible(pool: PgPool) {
    let (pool, url) = wal_db(pool).await;
    let mut running = pool.begin().await.expect("begin");
    let xid: i64 = sqlx::query_scalar("SELECT pg_current_xact_id()::text::bigint & 4294967295")
        .fetch_one(&mut *running)
        .await
        .expect("xid");
    let end: i64 = sqlx::query_scalar("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint")
        .fetch_one(&pool)
        .await
        .expect("lsn");
    let sent = relay::pgoutput::Transaction {
        xid: u32::try_from(xid).expect("32-bit xid"),
        end_lsn: u64::try_from(end).expect("lsn") + 1,
        committed_at: chrono::Utc::now(),
        messages: vec![
            br#"{"resource_type":"api_key","resource_id":"k1","parent_type":"agent","parent_id":"a1","operation":"register","principal":{"user_id":"u1"}}"#.to_vec(),
        ],
    };
    let applied_before = applied_lsn(&pool).await;
    let (mut conn, slot) = relay_conn(&url).await;
    let applier = tokio::spawn(async move {
        let applied = relay::apply(&mut conn, &slot, &[sent], 0).await;
        (applied.map(|(relayed, _, _)| relayed), conn)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !applier.is_finished(),
        "inserted before the commit was visible"
    );
    assert_eq!(outbox_count(&pool).await, 0);
    assert_eq!(
        applied_lsn(&pool).await,
        applied_before,
        "the batch's end was recorded before its rows"
    );
    running.commit().await.expect("commit");
    let (relayed, _conn) = tokio::time::timeout(Duration::from_secs(5), applier)
        .await
        .expect("inserts once visible")
        .expect("join");
    assert_eq!(relayed.expect("apply"), 1);
    assert_eq!(outbox_count(&pool).await, 1);
    assert_ne!(applied_lsn(&pool).await, applied_before);
    leave_wal(&url).await;
}

/// Counts wake-ups, standing for the worker's claimer.
#[derive(Default)]
struct Woken(std::sync::atomic::AtomicUsize);

impl authz_outbox::delivery::listener::Wake for Woken {
    fn wake(&self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The relay wakes the claimer of its own process directly once it has
/// committed rows (the `NOTIFY` is for other replicas): not woken while
/// nothing is relayed, woken once a capture is in the outbox.
#[sqlx::test(migrations = false)]
async fn the_relay_wakes_its_own_processs_claimer_once_rows_are_in(pool: PgPool) {
    let (pool, url) = wal_db(pool).await;
    let woken = std::sync::Arc::new(Woken::default());
    let cancel = tokio_util::sync::CancellationToken::new();
    let relay = spawn_relay(
        &url,
        &pool,
        relay::Beside {
            on_gap: None,
            wake: Some(woken.clone()),
        },
        &cancel,
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(woken.0.load(std::sync::atomic::Ordering::SeqCst), 0);
    host_agent(&pool, "a1").await;
    let started = std::time::Instant::now();
    while woken.0.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the relay never woke the claimer"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(outbox_count(&pool).await, 1, "woken once the row is in");
    cancel.cancel();
    relay.await.expect("relay stops");
    leave_wal(&url).await;
}
