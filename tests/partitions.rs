//! The time-partitioned outbox (issue 25): a resource whose rows fall in
//! different partitions keeps its order and its supersede, retention never
//! drops a dead or pending row, a partition that cannot be created ahead
//! refuses no capture and stops no delivery, and the upgrade from the single
//! table loses, duplicates and reorders nothing while writers and a worker run.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use authz_outbox::outbox::partitions;
use chrono::{DateTime, Utc};
use common::scripted_auth::{Answer, ScriptedAuth};
use common::{config, run_once};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// The first dated partition starts where the pre-upgrade table's range ends.
async fn legacy_end(pool: &PgPool) -> DateTime<Utc> {
    sqlx::query_scalar(
        "SELECT upper_bound FROM authz_outbox_partitions() WHERE name = 'authz_outbox_legacy'",
    )
    .fetch_one(pool)
    .await
    .expect("the pre-upgrade table is the first partition")
}

/// Inserts one row with a forced `created_at` (so a forced partition);
/// returns its id.
async fn put(
    pool: &PgPool,
    operation: &str,
    resource_id: &str,
    created_at: DateTime<Utc>,
    origin: &str,
) -> i64 {
    sqlx::query_scalar(
        r#"INSERT INTO authz_outbox (resource_type, resource_id, operation, principal, created_at, origin)
           VALUES ('agent', $1, $2, '{"user_id":"u1"}', $3, $4) RETURNING id"#,
    )
    .bind(resource_id)
    .bind(operation)
    .bind(created_at)
    .bind(origin)
    .fetch_one(pool)
    .await
    .expect("row inserted")
}

/// The day (the outbox's partition) that holds a row: the table itself, or
/// the day whose open or done half holds it.
async fn partition_of(pool: &PgPool, id: i64) -> String {
    sqlx::query_scalar(
        "SELECT a.relid::regclass::text
         FROM authz_outbox o
         CROSS JOIN LATERAL pg_partition_ancestors(o.tableoid) a
         JOIN pg_inherits i ON i.inhrelid = a.relid AND i.inhparent = 'authz_outbox'::regclass
         WHERE o.id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .expect("row exists")
}

/// The table that stores a row: a day's `_open` or `_done` half, or a day
/// of the old shape.
async fn stored_in(pool: &PgPool, id: i64) -> String {
    sqlx::query_scalar("SELECT tableoid::regclass::text FROM authz_outbox WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .expect("row exists")
}

async fn relkind(pool: &PgPool, table: &str) -> String {
    sqlx::query_scalar("SELECT relkind::text FROM pg_class WHERE oid = to_regclass($1)")
        .bind(table)
        .fetch_one(pool)
        .await
        .expect("relkind")
}

async fn state(pool: &PgPool, id: i64) -> String {
    sqlx::query_scalar("SELECT state FROM authz_outbox WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .expect("row exists")
}

/// Ids follow the sequence, partitions follow `created_at`; at a partition
/// boundary two concurrent captures can disagree (the later id, the earlier
/// time). Order is by id whatever partition holds the row, and a register
/// followed by its deregister in another partition is still superseded.
#[sqlx::test(migrations = false)]
async fn a_resources_rows_in_different_partitions_keep_order_and_supersede(pool: PgPool) {
    let pool = common::host_db(pool).await;
    common::uncaptured(
        &pool,
        "INSERT INTO agents (id, name, description, status) VALUES ($1, $1, '', 'READY')",
        &["a1"],
    )
    .await;
    let later = legacy_end(&pool).await + chrono::Duration::hours(30);
    let earlier = Utc::now() - chrono::Duration::hours(1);

    // a1: the first row (by id) sits in a later partition than the next two.
    let first = put(&pool, "register", "a1", later, "replay").await;
    let second = put(&pool, "deregister", "a1", earlier, "replay").await;
    let third = put(&pool, "register", "a1", earlier, "replay").await;
    assert_ne!(
        partition_of(&pool, first).await,
        partition_of(&pool, second).await
    );
    // Each request says which row it came from.
    for (id, user) in [(first, "first"), (second, "second"), (third, "third")] {
        sqlx::query("UPDATE authz_outbox SET principal = jsonb_build_object('user_id', $2::text) WHERE id = $1")
            .bind(id)
            .bind(user)
            .execute(&pool)
            .await
            .expect("principal");
    }
    // a2 (no agent row): created, then deleted, before any delivery; the
    // deregister lands in a later partition than its register.
    let created = put(&pool, "register", "a2", earlier, "capture").await;
    let deleted = put(&pool, "deregister", "a2", later, "capture").await;
    assert_ne!(
        partition_of(&pool, created).await,
        partition_of(&pool, deleted).await
    );

    let auth = ScriptedAuth::always(Answer::ok()).await;
    for _ in 0..4 {
        run_once(&pool, &auth.url(), config("w")).await;
    }
    let a1: Vec<String> = auth
        .seen()
        .iter()
        .filter(|s| s.body["resource"]["selector"] == "a1")
        .map(|s| {
            format!(
                "{} {}",
                s.path,
                s.body["principal"]["user_id"].as_str().unwrap_or("?")
            )
        })
        .collect();
    assert_eq!(
        a1,
        [
            "/v1/authz/register first",
            "/v1/authz/deregister second",
            "/v1/authz/register third"
        ],
        "a1's rows went out out of id order"
    );
    for id in [first, second, third] {
        assert_eq!(state(&pool, id).await, "delivered");
    }
    assert!(
        !auth
            .seen()
            .iter()
            .any(|s| s.body["resource"]["selector"] == "a2"),
        "a created-then-deleted resource was sent"
    );
    assert_eq!(state(&pool, created).await, "superseded");
    assert_eq!(state(&pool, deleted).await, "superseded");
}

/// Retention drops a day whose rows are all finished and keeps a day that
/// holds a dead row (or a pending one) whole, however old.
#[sqlx::test(migrations = false)]
async fn a_dead_row_survives_retention(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let start = legacy_end(&pool).await;
    let hour = chrono::Duration::hours(1);
    let day = chrono::Duration::days(1);
    let dead = put(&pool, "register", "dead", start + hour, "capture").await;
    let pending = put(&pool, "register", "pending", Utc::now(), "capture").await;
    let finished = put(&pool, "register", "done", start + day + hour, "capture").await;
    sqlx::query(
        "UPDATE authz_outbox SET state = 'dead', finished_at = now() - interval '30 days',
                last_error = 'refused' WHERE id = $1",
    )
    .bind(dead)
    .execute(&pool)
    .await
    .expect("dead");
    sqlx::query(
        "UPDATE authz_outbox SET state = 'delivered', finished_at = now() - interval '30 days'
         WHERE id = $1",
    )
    .bind(finished)
    .execute(&pool)
    .await
    .expect("delivered");
    let (dead_part, pending_part, finished_part) = (
        partition_of(&pool, dead).await,
        partition_of(&pool, pending).await,
        partition_of(&pool, finished).await,
    );

    assert!(
        finished_part.starts_with("authz_outbox_p"),
        "{finished_part}"
    );
    assert!(dead_part.starts_with("authz_outbox_p"), "{dead_part}");
    // These days are ahead of now: a negative retention puts them past it.
    let dropped: Vec<String> =
        sqlx::query_scalar("SELECT authz_outbox_drop_partitions(interval '-10 days')")
            .fetch_all(&pool)
            .await
            .expect("retention runs");

    assert!(dropped.contains(&finished_part), "{dropped:?}");
    assert!(!dropped.contains(&dead_part), "{dropped:?}");
    assert!(!dropped.contains(&pending_part), "{dropped:?}");
    assert_eq!(state(&pool, dead).await, "dead");

    // The day left the outbox detached; its files go in a second
    // transaction that holds no lock a capture or a claim needs: while it is
    // open, a capture and a read of the outbox go through at once.
    let mut dropping = pool.begin().await.expect("begin");
    let gone: Vec<String> = sqlx::query_scalar("SELECT authz_outbox_drop_retired()")
        .fetch_all(&mut *dropping)
        .await
        .expect("the retired days are dropped");
    let mut other = pool.acquire().await.expect("connection");
    sqlx::query("SET lock_timeout = '1s'")
        .execute(&mut *other)
        .await
        .expect("lock timeout");
    sqlx::query(
        r#"INSERT INTO authz_outbox (resource_type, resource_id, operation, principal)
           VALUES ('agent', 'during-drop', 'register', '{"user_id":"u1"}')"#,
    )
    .execute(&mut *other)
    .await
    .expect("a capture does not wait for the retired day's files");
    sqlx::query("SELECT count(*) FROM authz_outbox WHERE state = 'pending'")
        .execute(&mut *other)
        .await
        .expect("a claim's read does not wait either");
    drop(other);
    dropping.commit().await.expect("commit");
    assert!(
        gone.contains(&format!("{finished_part}_retired")),
        "{gone:?}"
    );
    assert!(!gone.contains(&format!("{dead_part}_retired")), "{gone:?}");
    let still: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
        .bind(format!("{finished_part}_retired"))
        .fetch_one(&pool)
        .await
        .expect("regclass");
    assert_eq!(still, None, "the retired day is dropped");
    let kept = partitions::list(&pool).await.expect("list");
    assert!(kept.iter().any(|p| p.name == dead_part), "{kept:?}");
    assert_eq!(state(&pool, pending).await, "pending");
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM authz_outbox WHERE id = $1")
        .bind(finished)
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(left, 0);
}

/// Retention does not wait for a day someone else holds (an autovacuum, a
/// long reader): it holds the outbox's own lock meanwhile, so waiting would
/// stall every capture. The day is skipped and dropped by a later run.
#[sqlx::test(migrations = false)]
async fn retention_skips_a_busy_day_instead_of_waiting_for_it(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let start = legacy_end(&pool).await;
    let finished = put(
        &pool,
        "register",
        "done",
        start + chrono::Duration::hours(1),
        "capture",
    )
    .await;
    sqlx::query(
        "UPDATE authz_outbox SET state = 'delivered', finished_at = now() - interval '30 days'
         WHERE id = $1",
    )
    .bind(finished)
    .execute(&pool)
    .await
    .expect("delivered");
    let day = partition_of(&pool, finished).await;
    let mut reader = pool.begin().await.expect("begin");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "LOCK TABLE {day} IN ACCESS SHARE MODE"
    )))
    .execute(&mut *reader)
    .await
    .expect("a reader holds the day");

    let retire = |pool: PgPool| async move {
        let mut tx = pool.begin().await.expect("begin");
        sqlx::query("SET LOCAL lock_timeout = '20s'")
            .execute(&mut *tx)
            .await
            .expect("lock timeout");
        let started = std::time::Instant::now();
        let retired: Vec<String> =
            sqlx::query_scalar("SELECT authz_outbox_drop_partitions(interval '-10 days')")
                .fetch_all(&mut *tx)
                .await
                .expect("retention runs");
        tx.commit().await.expect("commit");
        (retired, started.elapsed())
    };
    let (retired, took) = retire(pool.clone()).await;
    assert!(!retired.contains(&day), "{retired:?}");
    assert!(
        took < Duration::from_secs(5),
        "waited {took:?} for the busy day"
    );
    reader.rollback().await.expect("the reader is done");
    let (retired, _) = retire(pool.clone()).await;
    assert!(retired.contains(&day), "dropped once free: {retired:?}");
}

/// A table squatting on the next partition's name: creating ahead fails and
/// says so, a capture for that day lands in the default partition instead
/// of failing, the worker keeps delivering, and once the name is free the
/// day is created with its row moved in, same id.
#[sqlx::test(migrations = false)]
async fn a_partition_that_cannot_be_created_refuses_no_capture(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let parts = partitions::list(&pool).await.expect("list");
    let last = parts
        .iter()
        .rfind(|p| !p.is_default)
        .expect("a dated partition")
        .clone();
    let ahead_before = partitions::ahead(&parts, Utc::now()).expect("ahead");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP TABLE {0}; CREATE TABLE {0} (squatter int)",
        last.name
    )))
    .execute(&pool)
    .await
    .expect("squat");

    assert!(partitions::create_ahead(&pool).await.is_err());
    let parts = partitions::list(&pool).await.expect("list");
    let ahead_after = partitions::ahead(&parts, Utc::now()).expect("ahead");
    assert!(
        ahead_after <= ahead_before - chrono::Duration::hours(23),
        "{ahead_before} -> {ahead_after}"
    );

    let lower = last.lower_bound.expect("a dated partition has a start");
    let stray = put(
        &pool,
        "register",
        "stray",
        lower + chrono::Duration::hours(2),
        "capture",
    )
    .await;
    assert_eq!(partition_of(&pool, stray).await, "authz_outbox_default");

    // Delivery goes on (the worker's own create-ahead fails again meanwhile).
    common::agent(&pool, "a1").await;
    let auth = ScriptedAuth::always(Answer::ok()).await;
    let report = run_once(&pool, &auth.url(), config("w")).await;
    assert!(report.delivered >= 1, "{report:?}");

    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP TABLE {}", last.name)))
        .execute(&pool)
        .await
        .expect("unsquat");
    assert!(partitions::create_ahead(&pool).await.expect("creates") >= 1);
    assert_eq!(partition_of(&pool, stray).await, last.name);
}

/// The upgrade from the single table on a live database: writers insert and
/// a worker delivers throughout `migrate`; every row written is there once,
/// and each resource's rows reached agentex-auth in the order written.
#[sqlx::test(migrations = false)]
async fn the_upgrade_under_load_loses_duplicates_and_reorders_nothing(pool: PgPool) {
    common::host_db_at(&pool, 20261205000003).await;
    let relkind: String = sqlx::query_scalar(
        "SELECT relkind::text FROM pg_class WHERE oid = 'authz_outbox'::regclass",
    )
    .fetch_one(&pool)
    .await
    .expect("relkind");
    assert_eq!(relkind, "r");
    // The worker's role as documented, granted on the old table.
    let db: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&pool)
        .await
        .expect("db");
    let role: String = format!("u_{}", db.trim_start_matches('_'))
        .chars()
        .take(60)
        .collect();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        r#"DO $$ BEGIN CREATE ROLE "{role}" LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
           GRANT SELECT, UPDATE, DELETE ON authz_outbox TO "{role}";"#
    )))
    .execute(&pool)
    .await
    .expect("worker role");
    // Rows from before the upgrade, some of them pending.
    let before: Vec<i64> = sqlx::query_scalar(
        r#"INSERT INTO authz_outbox (resource_type, resource_id, operation, principal)
           SELECT 'agent', 'old' || (g % 10), 'deregister', jsonb_build_object('user_id', 's' || g)
           FROM generate_series(1, 200) g RETURNING id"#,
    )
    .fetch_all(&pool)
    .await
    .expect("old rows");

    let auth = ScriptedAuth::always(Answer::ok()).await;
    let stop = CancellationToken::new();
    let worker =
        tokio::spawn(common::worker(&pool, &auth.url(), config("w")).run(stop.clone(), false));
    let writing = Arc::new(AtomicBool::new(true));
    let mut writers = Vec::new();
    for w in 0..4 {
        let (pool, writing) = (pool.clone(), writing.clone());
        writers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            let mut seq = 0;
            while writing.load(Ordering::Relaxed) {
                seq += 1;
                let id: i64 = sqlx::query_scalar(
                    r#"INSERT INTO authz_outbox (resource_type, resource_id, operation, principal)
                       VALUES ('agent', $1, 'deregister', jsonb_build_object('user_id', 's' || $2::int))
                       RETURNING id"#,
                )
                .bind(format!("w{w}"))
                .bind(seq)
                .fetch_one(&pool)
                .await
                .expect("a capture is never refused during the upgrade");
                ids.push(id);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            ids
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    authz_outbox::db::migrate(&pool)
        .await
        .expect("the upgrade applies under load");
    tokio::time::sleep(Duration::from_millis(300)).await;
    writing.store(false, Ordering::Relaxed);
    let mut written = before.clone();
    for w in writers {
        written.extend(w.await.expect("writer"));
    }
    common::until(Duration::from_secs(60), "every row delivered", || async {
        let pending: i64 =
            sqlx::query_scalar("SELECT count(*) FROM authz_outbox WHERE state = 'pending'")
                .fetch_one(&pool)
                .await
                .expect("count");
        pending == 0
    })
    .await;
    stop.cancel();
    worker.await.expect("worker");

    let relkind: String = sqlx::query_scalar(
        "SELECT relkind::text FROM pg_class WHERE oid = 'authz_outbox'::regclass",
    )
    .fetch_one(&pool)
    .await
    .expect("relkind");
    assert_eq!(relkind, "p", "the outbox is partitioned after the upgrade");
    let keeps: bool =
        sqlx::query_scalar("SELECT has_table_privilege($1, 'authz_outbox', 'UPDATE')")
            .bind(&role)
            .fetch_one(&pool)
            .await
            .expect("privilege");
    assert!(keeps, "the worker's role lost its grant on the outbox");
    let mut stored: Vec<i64> = sqlx::query_scalar("SELECT id FROM authz_outbox ORDER BY id")
        .fetch_all(&pool)
        .await
        .expect("ids");
    written.sort_unstable();
    let n = stored.len();
    stored.dedup();
    assert_eq!(stored.len(), n, "a row is duplicated");
    assert_eq!(stored, written, "a row was lost or appeared");
    let delivered: i64 =
        sqlx::query_scalar("SELECT count(*) FROM authz_outbox WHERE state = 'delivered'")
            .fetch_one(&pool)
            .await
            .expect("count");
    assert_eq!(delivered as usize, written.len());

    // Per resource, the principals' sequence numbers arrive increasing.
    let mut last: HashMap<String, (i64, i64)> = HashMap::new();
    for s in auth.seen() {
        let resource = s.body["resource"]["selector"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let seq: i64 = s.body["principal"]["user_id"]
            .as_str()
            .and_then(|u| u.trim_start_matches('s').parse().ok())
            .unwrap_or(-1);
        let (prev, count) = last.get(&resource).copied().unwrap_or((i64::MIN, 0));
        assert!(seq > prev, "{resource}: {seq} after {prev}");
        last.insert(resource, (seq.max(prev), count + 1));
    }
    assert!(last.len() >= 4, "{last:?}");
}

/// The worker's documented role (no DDL, docs/operations.md) creates the
/// days ahead and drops the days past retention through the functions,
/// which run as the outbox's owner.
#[sqlx::test(migrations = false)]
async fn the_worker_role_manages_partitions_without_ddl(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let db: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&pool)
        .await
        .expect("db");
    let role: String = format!("w_{}", db.trim_start_matches('_'))
        .chars()
        .take(60)
        .collect();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        r#"DO $$ BEGIN CREATE ROLE "{role}" LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
           GRANT USAGE ON SCHEMA public TO "{role}";
           GRANT SELECT, UPDATE, DELETE ON authz_outbox TO "{role}";
           GRANT EXECUTE ON FUNCTION authz_outbox_create_partitions(integer),
                                     authz_outbox_drop_partitions(interval),
                                     authz_outbox_drop_retired(),
                                     authz_outbox_partitions() TO "{role}";"#
    )))
    .execute(&pool)
    .await
    .expect("worker role");
    let last = partitions::list(&pool)
        .await
        .expect("list")
        .into_iter()
        .rfind(|p| !p.is_default)
        .expect("a dated partition");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP TABLE {}", last.name)))
        .execute(&pool)
        .await
        .expect("drop the last day");
    // A pending row from before the first day: the pre-upgrade table,
    // whose range has ended, is held by it.
    put(
        &pool,
        "register",
        "old",
        legacy_end(&pool).await - chrono::Duration::hours(1),
        "capture",
    )
    .await;

    let mut url = url::Url::parse(&common::database_url(&pool).await).expect("url");
    url.set_username(&role).expect("user");
    let worker = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(url.as_str())
        .await
        .expect("connect as the worker role");
    let owns: bool = sqlx::query_scalar(
        "SELECT pg_has_role(current_user, (SELECT relowner FROM pg_class WHERE oid = 'authz_outbox'::regclass), 'USAGE')",
    )
    .fetch_one(&worker)
    .await
    .expect("owner");
    assert!(!owns, "the worker role must not own the outbox");

    assert_eq!(partitions::create_ahead(&worker).await.expect("creates"), 1);
    let after = partitions::list(&worker).await.expect("list");
    assert!(after.iter().any(|p| p.name == last.name), "{after:?}");
    let dropped = partitions::drop_expired(&worker, Duration::ZERO)
        .await
        .expect("retention runs");
    assert!(
        dropped.is_empty(),
        "nothing is past retention yet: {dropped:?}"
    );
    worker.close().await;
}

/// The lines of a plan that look a row up by id in a partition's primary
/// key and ran: with run-time pruning, every other partition's lookup
/// says "never executed".
fn executed_key_lookups(plan: &[String]) -> Vec<String> {
    plan.iter()
        .filter(|l| l.contains("_pkey on authz_outbox_") && !l.contains("never executed"))
        .cloned()
        .collect()
}

async fn lookups_by_key(tx: &mut sqlx::PgConnection) {
    sqlx::raw_sql("SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off; SET LOCAL enable_material = off")
        .execute(tx)
        .await
        .expect("planner settings");
}

/// The claim reads none of the history: a finished row is in its day's
/// `_done` half, and the claim names the state of what it locks and
/// updates (`pending`), so the planner leaves every `_done` half out of the
/// plan, however many days retention keeps. What it does read, it finds by
/// key in one partition (it joins on `created_at`, the partition key).
#[sqlx::test(migrations = false)]
async fn a_claim_reads_only_the_days_open_halves(pool: PgPool) {
    use authz_outbox::outbox::claim;
    let pool = common::host_db(pool).await;
    sqlx::query("SELECT authz_outbox_create_partitions(6)")
        .execute(&pool)
        .await
        .expect("days created ahead");
    let start = legacy_end(&pool).await;
    for i in 0..5 {
        put(
            &pool,
            "register",
            &format!("a{i}"),
            start + chrono::Duration::hours(2),
            "test",
        )
        .await;
    }
    // History in every day. At a day's real size (millions of rows) the
    // planner looks the claimed rows up by key; on a test's few thousand it
    // may hash-join instead, so the lookups are asked for below
    // (`enable_hashjoin`/`enable_mergejoin` off), and what is checked is
    // that a lookup by key touches one partition.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "INSERT INTO authz_outbox (resource_type, resource_id, operation, principal, state, finished_at, created_at)
         SELECT 'agent', 'h' || g, 'register', '{{\"user_id\":\"u1\"}}', 'delivered', now(),
                '{start}'::timestamptz + (g % 6) * interval '1 day' + interval '1 hour'
         FROM generate_series(1, 6000) g;
         ANALYZE authz_outbox;",
        start = start.to_rfc3339()
    )))
    .execute(&pool)
    .await
    .expect("history in every day");
    let partitions: i64 = sqlx::query_scalar("SELECT count(*) FROM authz_outbox_partitions()")
        .fetch_one(&pool)
        .await
        .expect("partitions");
    assert!(partitions >= 6, "{partitions} partitions");

    let mut tx = pool.begin().await.expect("tx");
    lookups_by_key(&mut tx).await;
    let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) {}",
        claim::CLAIM_SQL
    )))
    .bind("register")
    .bind(100_i64)
    .bind("w")
    .bind(30_000_i64)
    .bind(None::<DateTime<Utc>>)
    .bind("register")
    .fetch_all(&mut *tx)
    .await
    .expect("explain the claim");
    tx.rollback().await.expect("rolled back");
    assert!(
        plan.iter().any(|l| l.contains("_open")),
        "the open halves are read:\n{}",
        plan.join("\n")
    );
    let history: Vec<&String> = plan.iter().filter(|l| l.contains("_done")).collect();
    assert!(
        history.is_empty(),
        "the claim reaches into the history: {history:?}\n{}",
        plan.join("\n")
    );
    let ran = executed_key_lookups(&plan);
    assert!(
        ran.len() <= 1,
        "at most one partition looked up by key:\n{}",
        plan.join("\n")
    );
}

/// A day is split by state: a row is written pending into the day's `_open`
/// half, and written once more, when it finishes, into its `_done` half,
/// where nothing updates it again (the week's bloat, BENCHMARKS.md). The
/// move is the update it is to everything that reads the outbox: the
/// delivered register is recorded as its resource's owner.
#[sqlx::test(migrations = false)]
async fn a_finished_row_is_written_once_into_its_days_done_half(pool: PgPool) {
    let pool = common::host_db(pool).await;
    common::uncaptured(
        &pool,
        "INSERT INTO agents (id, name, description, status) VALUES ($1, $1, '', 'READY')",
        &["a1"],
    )
    .await;
    let id = put(&pool, "register", "a1", Utc::now(), "replay").await;
    let dead = put(&pool, "register", "gone", Utc::now(), "replay").await;
    let day = partition_of(&pool, id).await;
    assert_eq!(relkind(&pool, &day).await, "p", "{day} is split by state");
    assert_eq!(stored_in(&pool, id).await, format!("{day}_open"));

    let auth = ScriptedAuth::always(Answer::ok()).await;
    run_once(&pool, &auth.url(), config("w")).await;
    assert_eq!(state(&pool, id).await, "delivered");
    assert_eq!(stored_in(&pool, id).await, format!("{day}_done"));
    assert_eq!(partition_of(&pool, id).await, day, "the row kept its day");
    let owner: Option<i64> = sqlx::query_scalar(
        "SELECT outbox_id FROM authz_outbox_owners WHERE resource_type = 'agent' AND resource_id = 'a1'",
    )
    .fetch_optional(&pool)
    .await
    .expect("owners");
    assert_eq!(
        owner,
        Some(id),
        "the moved row's delivery recorded its owner"
    );

    // A dead row waits in the open half (replay turns it pending again).
    sqlx::query("UPDATE authz_outbox SET state = 'dead', finished_at = now() WHERE id = $1")
        .bind(dead)
        .execute(&pool)
        .await
        .expect("dead");
    assert_eq!(stored_in(&pool, dead).await, format!("{day}_open"));
    let open: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {day}_open WHERE state = 'pending'"
    )))
    .fetch_one(&pool)
    .await
    .expect("count");
    assert_eq!(open, 0, "no finished or pending row left in {day}_open");
}

/// A worker records an outcome for a row that someone else finishes at the
/// same moment (here an operator's update, committed while the record
/// waits for the row). The row has moved to its day's `_done` half, which
/// PostgreSQL reports as a serialization failure; the record runs again,
/// finds the row finished and drops the outcome, as for a lost lease,
/// instead of failing.
#[sqlx::test(migrations = false)]
async fn a_record_racing_a_move_of_its_row_drops_the_outcome_without_failing(pool: PgPool) {
    use authz_outbox::domain::Operation;
    use authz_outbox::outbox::claim::claim;
    use authz_outbox::outbox::record::{Recorded, RowUpdate, record};
    let pool = common::host_db(pool).await;
    let id = put(&pool, "register", "a1", Utc::now(), "replay").await;
    let claimed = claim(
        &pool,
        "w",
        Operation::Register,
        Duration::from_secs(60),
        10,
        None,
    )
    .await
    .expect("claimed");
    assert_eq!(claimed.len(), 1);
    let row = &claimed[0];

    let mut operator = pool.begin().await.expect("begin");
    sqlx::query(
        "UPDATE authz_outbox SET state = 'superseded', finished_at = now(), last_error = 'by hand'
         WHERE id = $1",
    )
    .bind(id)
    .execute(&mut *operator)
    .await
    .expect("the operator's update");
    let outcome = vec![Recorded {
        id,
        created_at: row.created_at,
        lease_token: row.lease_token,
        update: RowUpdate::Delivered {
            consistency_token: None,
        },
    }];
    let recording = tokio::spawn({
        let pool = pool.clone();
        async move { record(&pool, &outcome).await }
    });
    common::until_a_session_waits_for_a_lock(&pool, "the record waits for the row").await;
    operator.commit().await.expect("the operator commits");

    let written = recording
        .await
        .expect("record task")
        .expect("the record is run again, not failed");
    assert!(written.is_empty(), "{written:?}");
    assert_eq!(state(&pool, id).await, "superseded");
}

/// `migrate` on a live outbox: the days from today on that are still
/// empty are created again split by state; a day that already holds rows
/// keeps its single table (and its rows), as do the days before it and the
/// pre-upgrade table.
#[sqlx::test(migrations = false)]
async fn the_reshape_replaces_only_empty_days(pool: PgPool) {
    common::host_db_at(&pool, 20261206200001).await;
    let old = put(&pool, "register", "a1", Utc::now(), "capture").await;
    let kept = put(
        &pool,
        "register",
        "a2",
        legacy_end(&pool).await + chrono::Duration::hours(1),
        "capture",
    )
    .await;
    let kept_day = partition_of(&pool, kept).await;
    assert_eq!(partition_of(&pool, old).await, "authz_outbox_legacy");
    assert_eq!(relkind(&pool, &kept_day).await, "r");
    authz_outbox::db::migrate(&pool).await.expect("migrate");

    assert_eq!(partition_of(&pool, old).await, "authz_outbox_legacy");
    assert_eq!(partition_of(&pool, kept).await, kept_day);
    assert_eq!(
        relkind(&pool, &kept_day).await,
        "r",
        "a day with rows is kept"
    );
    assert_eq!(relkind(&pool, "authz_outbox_legacy").await, "r");
    let parts = partitions::list(&pool).await.expect("list");
    let kept_end = parts
        .iter()
        .find(|p| p.name == kept_day)
        .and_then(|p| p.upper_bound)
        .expect("the kept day");
    let later: Vec<&partitions::Partition> = parts
        .iter()
        .filter(|p| !p.is_default && p.lower_bound.is_some_and(|l| l >= kept_end))
        .collect();
    assert!(!later.is_empty(), "{parts:?}");
    for p in later {
        assert_eq!(relkind(&pool, &p.name).await, "p", "{} is split", p.name);
    }
    // The days stay contiguous: nothing falls into the default partition.
    let dated: Vec<&partitions::Partition> = parts.iter().filter(|p| !p.is_default).collect();
    for pair in dated.windows(2) {
        assert_eq!(
            pair[0].upper_bound, pair[1].lower_bound,
            "a gap between days: {dated:?}"
        );
    }
}

/// A fresh install's pre-upgrade table is empty and its range reached past
/// tomorrow; `migrate` cuts it back so today is already a day split by
/// state.
#[sqlx::test(migrations = false)]
async fn a_fresh_install_splits_today(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let id = put(&pool, "register", "a1", Utc::now(), "capture").await;
    let day = partition_of(&pool, id).await;
    assert_eq!(relkind(&pool, &day).await, "p", "{day}");
    assert!(legacy_end(&pool).await <= Utc::now());
}
