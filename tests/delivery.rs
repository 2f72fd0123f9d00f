//! The worker against a scripted agentex-auth: wire format, status classes,
//! retries, leases and fencing, per-resource order, pause and shutdown.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use authz_outbox::capture;
use authz_outbox::domain::Operation;
use authz_outbox::outbox::claim;
use authz_outbox::outbox::record::{Recorded, RowUpdate, record};
use common::scripted_auth::{Answer, ScriptedAuth, Seen};
use common::{Row, agent, config, key, live_tasks, make_due, row, rows, run_once};
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

#[sqlx::test(migrations = false)]
async fn sends_the_contract_wire_format(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let auth = ScriptedAuth::always(Answer::ok()).await;
    agent(&pool, "a1").await;
    let k = key(&pool, "a1", "wire").await;
    let client = authz_outbox::auth_client::AuthClient::new(
        &auth.url(),
        authz_outbox::auth_client::BearerToken::new("svc-token"),
        Duration::from_secs(2),
        4,
    )
    .expect("client");
    let worker =
        authz_outbox::delivery::Worker::new(pool.clone(), client, config("w")).expect("worker");
    common::run_worker_once(worker).await;
    capture::delete_api_key(&pool, &k.id, None)
        .await
        .expect("delete");
    run_once(&pool, &auth.url(), config("w")).await;

    let seen = auth.seen();
    // The agent's and the key's registers go out concurrently; find each.
    let find = |path: &str, kind: &str| {
        seen.iter()
            .find(|s| s.path == path && s.body["resource"]["type"] == kind)
            .cloned()
            .expect("request seen")
    };
    let agent_register = find("/v1/authz/register", "agent");
    assert_eq!(
        agent_register.body,
        json!({"principal": {"user_id": "u1"}, "resource": {"type": "agent", "selector": "a1"}, "parent": null})
    );
    let key_register = find("/v1/authz/register", "api_key");
    assert_eq!(
        key_register.body,
        json!({"principal": {"user_id": "u1"},
               "resource": {"type": "api_key", "selector": k.id},
               "parent": {"type": "agent", "selector": "a1"}})
    );
    assert_eq!(
        key_register
            .headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok()),
        Some(format!("authz-outbox-{}", k.outbox_id).as_str())
    );
    assert_eq!(
        key_register
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok()),
        Some("Bearer svc-token")
    );
    assert_eq!(
        key_register
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
    let deregister = find("/v1/authz/deregister", "api_key");
    assert_eq!(
        deregister.body,
        json!({"principal": {"user_id": "u1"}, "resource": {"type": "api_key", "selector": k.id}})
    );
    assert_eq!(seen.len(), 3);
    let r = row(&pool, k.outbox_id).await;
    assert_eq!(r.state, "delivered");
    assert_eq!(r.consistency_token.as_deref(), Some("zed-1"));
}

/// (status, operation) → final state, as the host service maps status codes.
#[sqlx::test(migrations = false)]
async fn each_status_class_ends_in_the_right_state(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let cases: &[(u16, &str, &str)] = &[
        (200, "register", "delivered"),
        // No body: not the contract's JSON answer, so not proof of a write.
        (204, "register", "dead"),
        (400, "register", "dead"),
        (403, "register", "dead"),
        (404, "register", "dead"),
        (404, "deregister", "delivered"),
        (409, "register", "dead"),
        (422, "register", "dead"),
        (418, "deregister", "dead"),
        (408, "register", "pending"),
        (429, "register", "pending"),
        (500, "deregister", "pending"),
        (502, "register", "pending"),
        (503, "register", "pending"),
    ];
    let statuses: Arc<HashMap<String, u16>> = Arc::new(
        cases
            .iter()
            .enumerate()
            .map(|(i, (status, _, _))| (format!("t{i}"), *status))
            .collect(),
    );
    let script = statuses.clone();
    let auth = ScriptedAuth::start(move |seen: &Seen, _| {
        let id = seen.body["resource"]["selector"]
            .as_str()
            .unwrap_or_default();
        Answer::status(*script.get(id).unwrap_or(&200))
    })
    .await;
    let ids: Vec<String> = (0..cases.len()).map(|i| format!("t{i}")).collect();
    live_tasks(&pool, &ids).await;
    for (i, (_, operation, _)) in cases.iter().enumerate() {
        sqlx::query(
            "INSERT INTO authz_outbox (resource_type, resource_id, operation, principal)
             VALUES ('task', $1, $2, '{\"user_id\":\"u\"}')",
        )
        .bind(format!("t{i}"))
        .bind(operation)
        .execute(&pool)
        .await
        .expect("insert");
    }
    run_once(&pool, &auth.url(), config("w")).await;
    let all = rows(&pool).await;
    for (i, (status, operation, expected)) in cases.iter().enumerate() {
        let r = all
            .iter()
            .find(|r| r.resource_id == format!("t{i}"))
            .expect("row");
        assert_eq!(&r.state, expected, "{status} on {operation}");
        assert_eq!(r.attempts, 1, "{status} on {operation}");
        if *expected != "delivered" {
            assert_eq!(r.last_status, Some(i32::from(*status)), "{status}");
            assert!(
                r.last_error
                    .as_deref()
                    .is_some_and(|e| e.contains(&status.to_string()))
            );
        }
    }
}

#[sqlx::test(migrations = false)]
async fn retries_are_persisted_with_backoff_and_retry_after(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let auth = ScriptedAuth::always(Answer::status(429).retry_after(30)).await;
    agent(&pool, "a1").await;
    let cfg = authz_outbox::config::WorkerConfig {
        backoff_cap: Duration::from_secs(60),
        ..config("w")
    };
    run_once(&pool, &auth.url(), cfg.clone()).await;
    let wait: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM next_attempt_at - now())::float8 FROM authz_outbox",
    )
    .fetch_one(&pool)
    .await
    .expect("row");
    assert!(
        (25.0..=31.0).contains(&wait),
        "Retry-After honoured: {wait}"
    );

    // Without Retry-After the delay grows with attempts but stays under the cap.
    auth.set_script(|_, _| Answer::status(503));
    let mut last = 0.0;
    for _ in 0..6 {
        make_due(&pool).await;
        run_once(&pool, &auth.url(), config("w")).await;
        let (wait, attempts): (f64, i32) = sqlx::query_as(
            "SELECT extract(epoch FROM next_attempt_at - now())::float8, attempts FROM authz_outbox",
        )
        .fetch_one(&pool)
        .await
        .expect("row");
        assert!(wait <= 0.1 + 0.01, "within the 100ms cap: {wait}");
        last = wait;
        assert!(attempts >= 2);
    }
    let _ = last;
    let r = rows(&pool).await.pop().expect("row");
    assert_eq!((r.state.as_str(), r.attempts), ("pending", 7));
}

/// A transient failure sends a row dead only once it has used max attempts
/// AND is older than --dead-after: each half alone keeps it pending.
#[sqlx::test(migrations = false)]
async fn a_row_goes_dead_only_after_max_attempts_and_max_age(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let auth = ScriptedAuth::always(Answer::status(503)).await;
    // Three tasks (no table, so never stale), each set up by hand:
    //   old:     48 h old, 1 attempt so far   (old, attempts left)
    //   retried: 1 min old, 5 attempts so far (out of attempts, young)
    //   both:    48 h old, 5 attempts so far  (out of attempts, old)
    for (id, age, attempts) in [
        ("old", "48 hours", 1),
        ("retried", "1 minute", 5),
        ("both", "48 hours", 5),
    ] {
        sqlx::query(
            "INSERT INTO authz_outbox (resource_type, resource_id, operation, principal, created_at, attempts)
             VALUES ('task', $1, 'register', '{\"user_id\":\"u\"}', now() - $2::interval, $3)",
        )
        .bind(id)
        .bind(age)
        .bind(attempts)
        .execute(&pool)
        .await
        .expect("insert");
    }
    common::planted_tasks_live(&pool).await;
    let cfg = authz_outbox::config::WorkerConfig {
        max_attempts: 3,
        dead_after: Duration::from_secs(24 * 3600),
        ..config("w")
    };
    let report = run_once(&pool, &auth.url(), cfg).await;
    let all = rows(&pool).await;
    let state = |id: &str| {
        let r = all.iter().find(|r| r.resource_id == id).expect("row");
        (r.state.clone(), r.attempts)
    };
    assert_eq!(state("old"), ("pending".into(), 2), "old but attempts left");
    assert_eq!(
        state("retried"),
        ("pending".into(), 6),
        "out of attempts but younger than --dead-after"
    );
    assert_eq!(state("both"), ("dead".into(), 6));
    assert_eq!(report.dead, 1);
    let both = all.iter().find(|r| r.resource_id == "both").expect("row");
    assert!(
        both.last_error
            .as_deref()
            .is_some_and(|e| e.contains("gave up after 6 attempts")),
        "{both:?}"
    );
}

#[sqlx::test(migrations = false)]
async fn an_expired_lease_hands_rows_to_another_worker(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let auth = ScriptedAuth::always(Answer::ok()).await;
    agent(&pool, "a1").await;
    // A worker claims and is then killed: it never records anything.
    let crashed = claim::claim(
        &pool,
        "crashed",
        Operation::Register,
        Duration::from_millis(300),
        10,
        None,
    )
    .await
    .expect("claim");
    assert_eq!(crashed.len(), 1);

    let report = run_once(&pool, &auth.url(), config("w2")).await;
    assert_eq!(report.delivered, 0, "a live lease is respected");
    assert!(auth.seen().is_empty());

    tokio::time::sleep(Duration::from_millis(400)).await;
    let report = run_once(&pool, &auth.url(), config("w2")).await;
    assert_eq!(report.delivered, 1, "the expired lease is taken over");
}

/// The fencing token: a stale holder records its outcome while the new
/// holder's lease is live and the row still pending. Its write must be
/// dropped, and the new holder's must land.
#[sqlx::test(migrations = false)]
async fn a_stale_worker_cannot_overwrite_the_new_holders_outcome(pool: PgPool) {
    let pool = common::host_db(pool).await;
    agent(&pool, "a1").await;
    let claim_as = |worker: &'static str, lease: Duration| {
        let pool = pool.clone();
        async move {
            claim::claim(&pool, worker, Operation::Register, lease, 10, None)
                .await
                .expect("claim")
        }
    };
    let stale = claim_as("stale", Duration::from_millis(200)).await;
    assert_eq!(stale.len(), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let holder = claim_as("holder", Duration::from_secs(60)).await;
    assert_eq!(holder.len(), 1, "the expired lease is claimed again");
    assert_eq!(holder[0].id, stale[0].id);

    // The stale worker wakes up mid-way through the new holder's lease.
    let written = record(
        &pool,
        &[Recorded {
            id: stale[0].id,
            created_at: stale[0].created_at,
            lease_token: stale[0].lease_token,
            update: RowUpdate::Dead {
                status: Some(500),
                error: "stale".into(),
            },
        }],
    )
    .await
    .expect("record");
    assert!(written.is_empty(), "the stale outcome is fenced off");
    let r = row(&pool, holder[0].id).await;
    assert_eq!(
        (
            r.state.as_str(),
            r.locked_by.as_deref(),
            r.last_error.as_deref()
        ),
        ("pending", Some("holder"), None),
        "the row is untouched: still the new holder's"
    );

    let written = record(
        &pool,
        &[Recorded {
            id: holder[0].id,
            created_at: holder[0].created_at,
            lease_token: holder[0].lease_token,
            update: RowUpdate::Delivered {
                consistency_token: None,
            },
        }],
    )
    .await
    .expect("record");
    assert_eq!(written.len(), 1, "the holder's outcome is written");
    assert_eq!(row(&pool, holder[0].id).await.state, "delivered");
}

/// Keys deleted while their register is in flight, with two workers racing:
/// the deregister must never reach agentex-auth before the register's answer.
/// A draining backlog: statistics taken while every row was pending, most
/// rows delivered since. The claim must still read due rows from the pending
/// index: served from the primary key, each claim would filter out every
/// row delivered so far (200 ms per claim at 150,000 of 200,000 delivered).
#[sqlx::test(migrations = false)]
async fn a_claim_reads_the_pending_index_whatever_the_statistics_say(pool: PgPool) {
    let pool = common::host_db(pool).await;
    sqlx::raw_sql(
        r#"
        INSERT INTO authz_outbox (resource_type, resource_id, operation, principal)
        SELECT 'api_key', 'k' || g, 'register', '{"user_id":"u"}' FROM generate_series(1, 3000) g;
        ANALYZE authz_outbox;
        UPDATE authz_outbox SET state = 'delivered', finished_at = now()
        WHERE id < (SELECT min(id) + 2500 FROM authz_outbox);
        "#,
    )
    .execute(&pool)
    .await
    .expect("a backlog, mostly drained since its statistics");
    let plan: Vec<String> =
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("EXPLAIN {}", claim::CLAIM_SQL)))
            .bind("register")
            .bind(100_i64)
            .bind("w")
            .bind(30_000_i64)
            .bind(None::<chrono::DateTime<chrono::Utc>>)
            .bind("register")
            .fetch_all(&pool)
            .await
            .expect("explain");
    let plan = plan.join("\n");
    assert!(
        // Today's open half's copy of `authz_outbox_pending_by_operation`.
        plan.contains("_open_pending_by_operation"),
        "the claim does not read the pending index:\n{plan}"
    );
}

#[sqlx::test(migrations = false)]
async fn two_workers_never_deliver_a_deregister_before_its_register(pool: PgPool) {
    let pool = common::host_db(pool).await;
    const IN_FLIGHT: Duration = Duration::from_millis(80);
    // Arrival time of each key's register, and order violations seen.
    let registered: Arc<std::sync::Mutex<HashMap<String, std::time::Instant>>> = Arc::default();
    let violations: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let (reg, bad) = (registered.clone(), violations.clone());
    let auth = ScriptedAuth::start(move |seen: &Seen, n| {
        let id = seen.body["resource"]["selector"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if seen.body["resource"]["type"] != "api_key" {
            return Answer::ok();
        }
        let now = std::time::Instant::now();
        if seen.path == "/v1/authz/register" {
            reg.lock().expect("lock").insert(id, now);
            // Jitter so the two workers interleave differently each time.
            return Answer::ok().delay(IN_FLIGHT + Duration::from_millis((n % 5) as u64));
        }
        match reg.lock().expect("lock").get(&id) {
            Some(at) if now.duration_since(*at) >= IN_FLIGHT => {}
            other => bad
                .lock()
                .expect("lock")
                .push(format!("{id}: deregister while register {other:?}")),
        }
        Answer::ok()
    })
    .await;
    agent(&pool, "a1").await;
    let mut ids = Vec::new();
    for i in 0..40 {
        ids.push(key(&pool, "a1", &format!("k{i}")).await.id);
    }
    let stop = CancellationToken::new();
    let w1 =
        tokio::spawn(common::worker(&pool, &auth.url(), config("w1")).run(stop.clone(), false));
    let w2 =
        tokio::spawn(common::worker(&pool, &auth.url(), config("w2")).run(stop.clone(), false));
    // Delete each key as soon as its register is on the wire.
    for id in &ids {
        tokio::time::timeout(Duration::from_secs(20), async {
            while !registered.lock().expect("lock").contains_key(id) {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await
        .expect("register sent");
        capture::delete_api_key(&pool, id, None)
            .await
            .expect("delete");
    }
    common::until(Duration::from_secs(30), "drained", || async {
        rows(&pool).await.iter().all(|r| r.state != "pending")
    })
    .await;
    stop.cancel();
    w1.await.expect("w1");
    w2.await.expect("w2");

    assert_eq!(
        violations.lock().expect("lock").clone(),
        Vec::<String>::new()
    );
    let mut per_key: HashMap<String, Vec<String>> = HashMap::new();
    for seen in auth.seen() {
        if seen.body["resource"]["type"] == "api_key" {
            let id = seen.body["resource"]["selector"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            per_key.entry(id).or_default().push(seen.path.clone());
        }
    }
    assert_eq!(per_key.len(), 40);
    for (id, paths) in per_key {
        assert_eq!(
            paths,
            ["/v1/authz/register", "/v1/authz/deregister"],
            "{id}"
        );
    }
    assert!(rows(&pool).await.iter().all(|r| r.state == "delivered"));
}

#[sqlx::test(migrations = false)]
async fn a_key_created_and_deleted_before_delivery_costs_nothing(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let auth = ScriptedAuth::always(Answer::ok()).await;
    agent(&pool, "a1").await;
    run_once(&pool, &auth.url(), config("w")).await;
    let before = auth.seen().len();
    let k = key(&pool, "a1", "short-lived").await;
    let d = capture::delete_api_key(&pool, &k.id, None)
        .await
        .expect("delete");
    let report = run_once(&pool, &auth.url(), config("w")).await;
    assert_eq!(auth.seen().len(), before, "nothing sent");
    assert_eq!(report.superseded, 2);
    assert_eq!(row(&pool, k.outbox_id).await.state, "superseded");
    assert_eq!(row(&pool, d[0]).await.state, "superseded");
}

#[sqlx::test(migrations = false)]
async fn an_attempted_register_of_a_deleted_key_is_superseded_and_its_deregister_sent(
    pool: PgPool,
) {
    let pool = common::host_db(pool).await;
    let auth = ScriptedAuth::always(Answer::status(503)).await;
    agent(&pool, "a1").await;
    let k = key(&pool, "a1", "k").await;
    run_once(&pool, &auth.url(), config("w")).await;
    // Another row for the same resource sits between, so the pair shortcut
    // does not apply: a re-parent (deregister + register), then a delete.
    let d = capture::delete_api_key(&pool, &k.id, None)
        .await
        .expect("delete");
    auth.set_script(|_, _| Answer::ok());
    make_due(&pool).await;
    run_once(&pool, &auth.url(), config("w")).await;
    let r = row(&pool, k.outbox_id).await;
    assert_eq!(r.state, "superseded");
    assert_eq!(
        r.last_error.as_deref(),
        Some("resource row no longer exists")
    );
    assert_eq!(row(&pool, d[0]).await.state, "delivered");
    let last = auth.seen().pop().expect("a request");
    assert_eq!(
        last.path, "/v1/authz/deregister",
        "the attempted register is cleaned up"
    );
}

/// A key created, then an older key of the same agent deleted: the new
/// key's register (the earlier id) and the old key's deregister wait
/// together; one worker, one request at a time, claiming `batch_size` rows
/// at once, delivers them. Returns the paths sent, in order.
async fn register_and_deregister_sent(pool: &PgPool, batch_size: usize) -> Vec<String> {
    let auth = ScriptedAuth::always(Answer::ok()).await;
    agent(pool, "a1").await;
    let old = key(pool, "a1", "old").await;
    run_once(pool, &auth.url(), config("w")).await;
    let _new = key(pool, "a1", "new").await;
    capture::delete_api_key(pool, &old.id, None)
        .await
        .expect("delete");
    let before = auth.seen().len();
    let one_request_at_a_time = authz_outbox::config::WorkerConfig {
        concurrency: 1,
        batch_size,
        ..config("w")
    };
    run_once(pool, &auth.url(), one_request_at_a_time).await;
    auth.seen()[before..]
        .iter()
        .map(|s| s.path.clone())
        .collect()
}

#[sqlx::test(migrations = false)]
async fn deregisters_are_delivered_before_registers(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let sent = register_and_deregister_sent(&pool, 1).await;
    assert_eq!(sent[0], "/v1/authz/deregister");
    assert_eq!(sent[1], "/v1/authz/register");
}

/// One claim takes the deregister and the register together (one
/// statement for both operations); the deregister still goes out first,
/// though its id is the later one.
#[sqlx::test(migrations = false)]
async fn deregisters_go_first_within_one_claim_too(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let sent = register_and_deregister_sent(&pool, 10).await;
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0], "/v1/authz/deregister");
    assert_eq!(sent[1], "/v1/authz/register");
}

#[sqlx::test(migrations = false)]
async fn a_guarded_deregister_of_a_row_that_exists_again_is_superseded(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let auth = ScriptedAuth::always(Answer::ok()).await;
    agent(&pool, "a1").await;
    let k = key(&pool, "a1", "k").await;
    run_once(&pool, &auth.url(), config("w")).await;
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO authz_outbox (resource_type, resource_id, operation, guarded, origin)
         VALUES ('api_key', $1, 'deregister', true, 'reconcile') RETURNING id",
    )
    .bind(&k.id)
    .fetch_one(&pool)
    .await
    .expect("insert");
    let before = auth.seen().len();
    run_once(&pool, &auth.url(), config("w")).await;
    assert_eq!(auth.seen().len(), before);
    assert_eq!(row(&pool, id).await.state, "superseded");
}

/// `n` task rows (their tasks live, so never stale), due now.
async fn tasks(pool: &PgPool, n: usize) {
    for i in 0..n {
        sqlx::query(
            "INSERT INTO authz_outbox (resource_type, resource_id, operation, principal)
             VALUES ('task', $1, 'register', '{\"user_id\":\"u\"}')",
        )
        .bind(format!("t{i}"))
        .execute(pool)
        .await
        .expect("insert");
    }
    common::planted_tasks_live(pool).await;
}

/// A scripted agentex-auth that also notes when each request arrived.
async fn timed(
    answer: impl Fn() -> Answer + Send + Sync + 'static,
) -> (ScriptedAuth, Arc<std::sync::Mutex<Vec<std::time::Instant>>>) {
    let arrivals: Arc<std::sync::Mutex<Vec<std::time::Instant>>> = Arc::default();
    let noted = arrivals.clone();
    let auth = ScriptedAuth::start(move |_, _| {
        noted.lock().expect("lock").push(std::time::Instant::now());
        answer()
    })
    .await;
    (auth, arrivals)
}

/// After a 401 no request goes out until the pause ends: not the rows
/// claimed ahead and waiting for a permit, not the rows the 401s released.
/// Then one probe per cool-down; `/readyz` is not ready meanwhile.
#[sqlx::test(migrations = false)]
async fn unauthorized_pauses_delivery_without_spending_attempts(pool: PgPool) {
    let pool = common::host_db(pool).await;
    const ANSWER_AFTER: Duration = Duration::from_millis(300);
    let (auth, arrivals) = timed(|| Answer::status(401).delay(ANSWER_AFTER)).await;
    tasks(&pool, 40).await;
    // 4 requests in flight, 16 more claimed ahead waiting for permits.
    let cfg = authz_outbox::config::WorkerConfig {
        concurrency: 4,
        batch_size: 16,
        ..config("w")
    };
    let worker = common::worker(&pool, &auth.url(), cfg);
    let health = worker.health();
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone(), false));
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert!(
        !health.ready(),
        "a rejected credential makes the worker not ready"
    );
    let all = rows(&pool).await;
    assert!(
        all.iter().all(|r| r.state == "pending" && r.attempts == 0),
        "{all:?}"
    );
    let times = arrivals.lock().expect("lock").clone();
    let first = *times.first().expect("the first requests went out");
    // The first four answer 401 at first + 300 ms; the pause lasts 1 s from
    // then. Nothing may arrive in between (the racy worker sent the rows
    // claimed ahead as permits freed, at + 300, 600, 900 ms).
    let during_pause = times
        .iter()
        .filter(|t| {
            let since = t.duration_since(first);
            since > ANSWER_AFTER + Duration::from_millis(50)
                && since < ANSWER_AFTER + Duration::from_millis(900)
        })
        .count();
    assert_eq!(during_pause, 0, "requests during the pause: {times:?}");
    assert!(
        (4..=6).contains(&times.len()),
        "the first four, then one probe per cool-down: {} requests",
        times.len()
    );

    auth.set_script(|_, _| Answer::ok());
    common::until(
        Duration::from_secs(10),
        "delivery resumes once the credential is accepted",
        || async { rows(&pool).await.iter().all(|r| r.state == "delivered") },
    )
    .await;
    assert!(
        health.ready(),
        "ready again once the credential is accepted"
    );
    stop.cancel();
    run.await.expect("worker");
    assert!(rows(&pool).await.iter().all(|r| r.attempts == 1));
}

/// An outage opens the circuit: then exactly one row per cool-down is sent
/// (the probe), the backlog keeps its attempts, and the circuit closes once
/// a probe succeeds.
#[sqlx::test(migrations = false)]
async fn an_outage_opens_the_circuit_and_holds_the_backlog(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let (auth, arrivals) = timed(|| Answer::status(503)).await;
    tasks(&pool, 60).await;
    let cfg = authz_outbox::config::WorkerConfig {
        circuit_threshold: 3,
        concurrency: 2,
        batch_size: 2,
        backoff_base: Duration::from_millis(1),
        backoff_cap: Duration::from_millis(1),
        ..config("w")
    };
    let worker = common::worker(&pool, &auth.url(), cfg);
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone(), false));
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let times = arrivals.lock().expect("lock").clone();
    assert!(
        times.len() < 12,
        "only probes once the circuit is open: {times:?}"
    );
    // The circuit opens after the first burst: the first gap of 500 ms.
    // Every request after it is a probe, a cool-down (1 s, then 2 s) apart:
    // one row each, never a batch.
    let opened = times
        .windows(2)
        .position(|w| w[1].duration_since(w[0]) > Duration::from_millis(500))
        .expect("the circuit opened");
    let probes = &times[opened + 1..];
    assert!(!probes.is_empty(), "a probe is sent once cooled down");
    for pair in probes.windows(2) {
        assert!(
            pair[1].duration_since(pair[0]) > Duration::from_millis(500),
            "one probe per cool-down: {times:?}"
        );
    }
    let untouched = rows(&pool).await.iter().filter(|r| r.attempts == 0).count();
    assert!(
        untouched >= 50,
        "the backlog kept its attempts: {untouched}"
    );

    // agentex-auth recovers: the next probe succeeds and the circuit
    // closes: requests go out two at a time again (concurrency 2), not one
    // probe after another.
    let recovered_at = arrivals.lock().expect("lock").len();
    let noted = arrivals.clone();
    auth.set_script(move |_, _| {
        noted.lock().expect("lock").push(std::time::Instant::now());
        Answer::ok().delay(Duration::from_millis(100))
    });
    common::until(Duration::from_secs(30), "the backlog drains", || async {
        rows(&pool).await.iter().all(|r| r.state == "delivered")
    })
    .await;
    stop.cancel();
    run.await.expect("worker");
    assert!(auth.seen().len() >= 60, "every row was sent");
    let after: Vec<_> = arrivals.lock().expect("lock")[recovered_at..].to_vec();
    let together = after
        .windows(2)
        .filter(|w| w[1].duration_since(w[0]) < Duration::from_millis(50))
        .count();
    assert!(
        together >= 10,
        "the circuit closed: requests in flight together again ({together} pairs)"
    );
}

/// Behind a single-sign-on ingress: `302 Location: /login` for every call.
/// Nothing is applied, so nothing may be recorded delivered, and the
/// redirect is not followed.
#[sqlx::test(migrations = false)]
async fn a_redirect_is_never_recorded_as_delivered(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let auth = ScriptedAuth::always(Answer::status(302).header("location", "/login")).await;
    sqlx::raw_sql(
        r#"INSERT INTO authz_outbox (resource_type, resource_id, operation, principal) VALUES
             ('task', 'reg', 'register', '{"user_id":"u"}'),
             ('task', 'dereg', 'deregister', '{"user_id":"u"}')"#,
    )
    .execute(&pool)
    .await
    .expect("insert");
    common::planted_tasks_live(&pool).await;
    let report = run_once(&pool, &auth.url(), config("w")).await;
    assert_eq!((report.delivered, report.dead), (0, 2));
    for r in rows(&pool).await {
        assert_eq!(r.state, "dead", "{r:?}");
        assert_eq!(r.last_status, Some(302), "{r:?}");
        let error = r.last_error.unwrap_or_default();
        assert!(
            error.contains("/login") && error.contains("not followed"),
            "{error}"
        );
    }
    let seen = auth.seen();
    assert!(
        seen.iter().all(|s| s.method == "POST"),
        "no redirect followed: {seen:?}"
    );
    assert_eq!(seen.len(), 2);
}

/// A 200 whose body is an HTML page (a proxy, a login screen) is not the
/// contract's answer.
#[sqlx::test(migrations = false)]
async fn a_success_status_without_the_contracts_body_is_not_delivered(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let auth =
        ScriptedAuth::always(Answer::status(200).raw("text/html", "<html>Sign in</html>")).await;
    tasks(&pool, 1).await;
    run_once(&pool, &auth.url(), config("w")).await;
    let r = rows(&pool).await.pop().expect("row");
    assert_eq!(r.state, "dead");
    assert!(
        r.last_error
            .as_deref()
            .is_some_and(|e| e.contains("not JSON")),
        "{r:?}"
    );
}

/// Whatever wrote the row, only identity fields reach agentex-auth.
#[sqlx::test(migrations = false)]
async fn the_worker_sends_only_identity_fields_whatever_wrote_the_row(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let auth = ScriptedAuth::always(Answer::ok()).await;
    let long = "u".repeat(authz_outbox::domain::MAX_PRINCIPAL_VALUE_CHARS + 1);
    sqlx::query(
        r#"INSERT INTO authz_outbox (resource_type, resource_id, operation, principal) VALUES
             ('task', 'direct', 'register',
              '{"user_id":"u","api_key":"sk-live-abc","nested":{"token":"tok-xyz"},"account_id":"acc"}'),
             ('task', 'too-long', 'register', jsonb_build_object('user_id', $1::text))"#,
    )
    .bind(&long)
    .execute(&pool)
    .await
    .expect("insert");
    common::planted_tasks_live(&pool).await;
    run_once(&pool, &auth.url(), config("w")).await;
    let seen = auth.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(
        seen[0].body["principal"],
        json!({"user_id": "u", "account_id": "acc"})
    );
    let text = serde_json::to_string(&seen[0].body).expect("json");
    assert!(
        !text.contains("sk-live-abc") && !text.contains("tok-xyz"),
        "{text}"
    );
    let all = rows(&pool).await;
    let too_long = all
        .iter()
        .find(|r| r.resource_id == "too-long")
        .expect("row");
    assert_eq!(too_long.state, "dead");
    assert!(
        too_long
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("no creator resolvable")),
        "{too_long:?}"
    );
}

/// An error body full of terminal escapes reaches last_error as one line,
/// each escape visible (`display::escape`), none a control character.
#[sqlx::test(migrations = false)]
async fn error_bodies_reach_last_error_without_control_characters(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let auth = ScriptedAuth::always(
        Answer::status(503).body(json!({"error": "down\u{1b}[2J\u{1b}]0;pwned\u{7}\r\nfor now"})),
    )
    .await;
    tasks(&pool, 1).await;
    run_once(&pool, &auth.url(), config("w")).await;
    let error = rows(&pool)
        .await
        .pop()
        .expect("row")
        .last_error
        .unwrap_or_default();
    assert!(
        error.contains(r"down\u{1b}[2J\u{1b}]0;pwned\u{7}\r\nfor now"),
        "{error:?}"
    );
    assert!(!error.chars().any(char::is_control), "{error:?}");
}

/// Runs a worker against an agentex-auth that never answers in time, stops
/// it once a request is in flight, and returns its report. The shutdown
/// deadline (200 ms) is far below the request timeout, so whatever the
/// worker holds must be released.
async fn stop_while_a_request_hangs(
    pool: &PgPool,
    base: authz_outbox::config::WorkerConfig,
) -> (ScriptedAuth, authz_outbox::delivery::RunReport) {
    let auth = ScriptedAuth::always(Answer::ok().delay(Duration::from_secs(30))).await;
    let cfg = authz_outbox::config::WorkerConfig {
        request_timeout: Duration::from_secs(40),
        lease: Duration::from_secs(120),
        shutdown_timeout: Duration::from_millis(200),
        ..base
    };
    let worker = common::worker(pool, &auth.url(), cfg);
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone(), false));
    common::until(Duration::from_secs(5), "request in flight", || async {
        !auth.seen().is_empty()
    })
    .await;
    stop.cancel();
    let report = tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .expect("shutdown within the deadline")
        .expect("worker");
    (auth, report)
}

#[sqlx::test(migrations = false)]
async fn shutdown_releases_in_flight_leases(pool: PgPool) {
    let pool = common::host_db(pool).await;
    agent(&pool, "a1").await;
    let (_auth, report) = stop_while_a_request_hangs(&pool, config("w")).await;
    assert_eq!(report.released, 1);
    let r = rows(&pool).await.pop().expect("row");
    assert_eq!(
        (r.state.as_str(), r.attempts, r.locked_by.as_deref()),
        ("pending", 0, None)
    );
}

#[sqlx::test(migrations = false)]
async fn shutdown_releases_rows_claimed_ahead_without_sending_them(pool: PgPool) {
    let pool = common::host_db(pool).await;
    agent(&pool, "a1").await;
    for n in 0..5 {
        key(&pool, "a1", &format!("k{n}")).await;
    }
    let cfg = authz_outbox::config::WorkerConfig {
        concurrency: 1,
        batch_size: 16,
        ..config("w")
    };
    let (auth, report) = stop_while_a_request_hangs(&pool, cfg).await;
    assert_eq!(auth.seen().len(), 1, "only the row in flight was sent");
    let all = rows(&pool).await;
    assert_eq!(all.len(), 6, "the agent's registration and five keys'");
    assert_eq!(
        report.released, 6,
        "the one in flight and those claimed ahead"
    );
    for r in all {
        assert_eq!(
            (r.state.as_str(), r.attempts, r.locked_by.as_deref()),
            ("pending", 0, None),
            "{r:?}"
        );
    }
}

#[sqlx::test(migrations = false)]
async fn a_row_claimed_ahead_is_not_sent_once_its_lease_could_run_out(pool: PgPool) {
    let pool = common::host_db(pool).await;
    // lease 3 s, request timeout 1 s: a claimed row may start its request
    // up to 1 s after the claim (lease - 2 x timeout). One request at a
    // time taking 700 ms: the first two (the agent's registration, then a
    // key's) start in time, the other three must not.
    let auth = ScriptedAuth::always(Answer::ok().delay(Duration::from_millis(700))).await;
    agent(&pool, "a1").await;
    for n in 0..4 {
        key(&pool, "a1", &format!("k{n}")).await;
    }
    let cfg = authz_outbox::config::WorkerConfig {
        concurrency: 1,
        batch_size: 16,
        request_timeout: Duration::from_secs(1),
        lease: Duration::from_secs(3),
        ..config("w")
    };
    let report = run_once(&pool, &auth.url(), cfg.clone()).await;
    assert_eq!(auth.seen().len(), 2, "no request started past the margin");
    assert_eq!((report.delivered, report.released), (2, 3));
    let held: Vec<Row> = rows(&pool)
        .await
        .into_iter()
        .filter(|r| r.state == "pending")
        .collect();
    assert_eq!(held.len(), 3);
    for r in &held {
        assert_eq!(r.attempts, 0, "an unsent row spends no attempt: {r:?}");
        assert!(r.locked_by.is_none(), "{r:?}");
        assert!(
            r.last_error
                .as_deref()
                .unwrap_or("")
                .contains("claimed ahead"),
            "{r:?}"
        );
    }
    // Later runs send them (two per run at this pace).
    for _ in 0..3 {
        make_due(&pool).await;
        run_once(&pool, &auth.url(), cfg.clone()).await;
    }
    assert!(rows(&pool).await.iter().all(|r| r.state == "delivered"));
    assert_eq!(auth.seen().len(), 5, "each row sent once");
}

#[sqlx::test(migrations = false)]
async fn malformed_rows_go_dead_and_the_worker_keeps_going(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let auth = ScriptedAuth::always(Answer::ok()).await;
    sqlx::raw_sql(
        r#"
        INSERT INTO authz_outbox (resource_type, resource_id, operation, principal) VALUES
          ('agent', 'bad-principal', 'register', '"just a string"'),
          ('widget', 'w1', 'register', '{"user_id":"u"}'),
          ('api_key', 'orphan-parent', 'register', '{"user_id":"u"}'),
          ('agent', 'good', 'register', '{"user_id":"u"}');
        "#,
    )
    .execute(&pool)
    .await
    .expect("insert");
    // A row for an agent that exists, so the register is not stale.
    sqlx::query(
        "INSERT INTO agents (id, name, description, status) VALUES ('good', 'good', '', 'READY')",
    )
    .execute(&pool)
    .await
    .expect("agent");
    let report = run_once(&pool, &auth.url(), config("w")).await;
    let all = rows(&pool).await;
    let state = |id: &str| {
        all.iter()
            .find(|r| r.resource_id == id)
            .map(|r| r.state.clone())
    };
    assert_eq!(state("bad-principal").as_deref(), Some("dead"));
    assert_eq!(state("w1").as_deref(), Some("dead"));
    assert_eq!(state("orphan-parent").as_deref(), Some("dead"));
    assert_eq!(state("good").as_deref(), Some("delivered"));
    assert_eq!(report.dead, 3);
    let errors: Vec<_> = all.iter().filter_map(|r| r.last_error.clone()).collect();
    assert!(
        errors.iter().any(|e| e.contains("JSON object")),
        "{errors:?}"
    );
    assert!(
        errors.iter().any(|e| e.contains("unknown resource type")),
        "{errors:?}"
    );
    assert!(
        errors.iter().any(|e| e.contains("parent agent")),
        "{errors:?}"
    );
}

/// Once an outcome is refused, a `--once` run stops claiming: it does not
/// go on sending every due row only to fail to record each one.
#[sqlx::test(migrations = false)]
async fn a_one_shot_run_stops_sending_at_the_first_refused_outcome(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let auth = ScriptedAuth::always(Answer::ok()).await;
    for i in 0..20 {
        agent(&pool, &format!("a{i}")).await;
    }
    common::refuse_delivered_outcomes(&pool).await;
    let one_at_a_time = authz_outbox::config::WorkerConfig {
        concurrency: 1,
        batch_size: 1,
        ..config("w")
    };
    let report = run_once(&pool, &auth.url(), one_at_a_time).await;
    assert!(report.database_error.is_some(), "{report:?}");
    let sent = auth.seen().len();
    assert!(sent < 10, "{sent} of 20 rows sent after the first refusal");
    assert!(rows(&pool).await.iter().all(|r| r.state == "pending"));
}

/// What a worker retries: an error the server may not repeat (a statement
/// cancelled by its timeout, as during a failover or under load, or a lost
/// connection), not one it always repeats (a division by zero stands for a
/// constraint, a type or a trigger).
#[sqlx::test(migrations = false)]
async fn only_database_errors_a_retry_can_fix_are_retried(pool: PgPool) {
    use authz_outbox::db::is_transient;
    let mut tx = pool.begin().await.expect("begin");
    sqlx::query("SET LOCAL statement_timeout = 1")
        .execute(&mut *tx)
        .await
        .expect("set");
    let cancelled = sqlx::query("SELECT pg_sleep(1)")
        .execute(&mut *tx)
        .await
        .expect_err("cancelled by the statement timeout");
    drop(tx);
    assert!(is_transient(&cancelled), "{cancelled}");
    let always = sqlx::query("SELECT 1 / 0")
        .execute(&pool)
        .await
        .expect_err("division by zero");
    assert!(!is_transient(&always), "{always}");
    let io = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
    assert!(is_transient(&io));
    assert!(is_transient(&sqlx::Error::PoolTimedOut));
    assert!(is_transient(&sqlx::Error::WorkerCrashed));
    assert!(!is_transient(&sqlx::Error::RowNotFound));
}

/// A `--once` run whose outcomes the database refuses (here a trigger; in
/// life a permission or a constraint) stops with the error instead of
/// re-claiming the same rows every lease until someone kills it, and loses
/// nothing: the row is delivered by the next run once the cause is gone.
#[sqlx::test(migrations = false)]
async fn a_one_shot_run_stops_when_the_database_refuses_its_outcomes(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let auth = ScriptedAuth::always(Answer::ok()).await;
    agent(&pool, "a1").await;
    common::refuse_delivered_outcomes(&pool).await;

    let report = run_once(&pool, &auth.url(), config("w")).await;
    let error = report
        .database_error
        .expect("the run reports why it stopped");
    assert!(
        error.contains("recording outcomes") && error.contains("outcomes refused by the test"),
        "{error}"
    );
    // Not retried: the same statement fails the same way every time.
    assert_eq!(
        common::refusals(&pool).await,
        1,
        "a refused outcome was written again"
    );
    assert_eq!(report.delivered, 0);
    let all = rows(&pool).await;
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].state, "pending", "nothing is lost");

    sqlx::raw_sql(
        "DROP TRIGGER refuse_delivered ON authz_outbox; \
         UPDATE authz_outbox SET locked_until = now() - interval '1 second'",
    )
    .execute(&pool)
    .await
    .expect("cause removed, lease expired");
    let report = run_once(&pool, &auth.url(), config("w")).await;
    assert_eq!(report.database_error, None);
    assert_eq!(report.delivered, 1);
    assert_eq!(rows(&pool).await[0].state, "delivered");
}

#[sqlx::test(migrations = false)]
async fn a_commit_wakes_an_idle_worker(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let auth = ScriptedAuth::always(Answer::ok()).await;
    agent(&pool, "a1").await;
    // A poll interval far longer than the test: only the notification can wake it.
    let cfg = authz_outbox::config::WorkerConfig {
        poll_interval: Duration::from_secs(600),
        ..config("w")
    };
    let worker = common::worker(&pool, &auth.url(), cfg);
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone(), false));
    common::until(
        Duration::from_secs(5),
        "backlog drained at start",
        || async { !auth.seen().is_empty() },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let k = key(&pool, "a1", "late").await;
    let state = capture::wait_until_delivered(&pool, k.outbox_id, Duration::from_secs(5)).await;
    assert_eq!(state.expect("delivered"), capture::DeliveryState::Delivered);
    stop.cancel();
    run.await.expect("worker");
}

/// The WAL relay beside a worker wakes it through [`Worker::waker`], not
/// through a `NOTIFY` (a row written without one stands for it here): an
/// idle worker with a poll interval far longer than the test delivers it.
#[sqlx::test(migrations = false)]
async fn the_waker_wakes_an_idle_worker_without_a_notification(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let auth = ScriptedAuth::always(Answer::ok()).await;
    live_tasks(&pool, &["t1".to_string()]).await;
    let cfg = authz_outbox::config::WorkerConfig {
        poll_interval: Duration::from_secs(600),
        ..config("w")
    };
    let worker = common::worker(&pool, &auth.url(), cfg);
    let waker = worker.waker();
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone(), false));
    common::until(Duration::from_secs(5), "the worker asleep", || async {
        sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM authz_outbox_listeners WHERE sleeping_since IS NOT NULL)",
        )
        .fetch_one(&pool)
        .await
        .expect("listeners")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    sqlx::query(
        "INSERT INTO authz_outbox (resource_type, resource_id, operation, principal)
         VALUES ('task', 't1', 'register', '{\"user_id\":\"u\"}')",
    )
    .execute(&pool)
    .await
    .expect("insert");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(auth.seen().is_empty(), "nothing woke it yet");
    waker.wake();
    common::until(Duration::from_secs(10), "the row sent", || async {
        !auth.seen().is_empty()
    })
    .await;
    stop.cancel();
    run.await.expect("worker");
}

#[sqlx::test(migrations = false)]
async fn pruning_removes_only_finished_rows_past_retention_in_batches(pool: PgPool) {
    let pool = common::host_db(pool).await;
    sqlx::raw_sql(
        r#"
        INSERT INTO authz_outbox (resource_type, resource_id, operation, principal, state, finished_at)
        SELECT 'task', 'old-' || i, 'register', '{"user_id":"u"}', 'delivered', now() - interval '8 days'
        FROM generate_series(1, 5) i;
        INSERT INTO authz_outbox (resource_type, resource_id, operation, principal, state, finished_at) VALUES
          ('task', 'old-superseded', 'register', '{"user_id":"u"}', 'superseded', now() - interval '8 days'),
          ('task', 'recent', 'register', '{"user_id":"u"}', 'delivered', now() - interval '1 day'),
          ('task', 'old-dead', 'register', '{"user_id":"u"}', 'dead', now() - interval '30 days'),
          ('task', 'pending', 'register', '{"user_id":"u"}', 'pending', NULL);
        "#,
    )
    .execute(&pool)
    .await
    .expect("insert");
    let week = Duration::from_secs(7 * 24 * 3600);
    let first = authz_outbox::outbox::prune::prune(&pool, week, 4)
        .await
        .expect("prune");
    assert_eq!(first, 4, "one small batch at a time");
    let second = authz_outbox::outbox::prune::prune(&pool, week, 4)
        .await
        .expect("prune");
    assert_eq!(second, 2);
    let left: Vec<String> = rows(&pool)
        .await
        .into_iter()
        .map(|r| r.resource_id)
        .collect();
    assert_eq!(left, ["recent", "old-dead", "pending"]);
}
