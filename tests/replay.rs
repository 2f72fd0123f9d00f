//! Replay of dead rows: what it revives, what it refuses (and why), and a
//! row that died from a fault being delivered once the fault is cleared.

mod common;

use authz_outbox::capture::{self, NewApiKey};
use authz_outbox::domain::{ApiKeyType, Operation, Principal, ResourceRef};
use authz_outbox::outbox::enqueue::{NewRow, enqueue};
use authz_outbox::outbox::replay::{
    ReplayAction, ReplayError, ReplayOptions, ReplayReport, Selector, replay,
};
use common::scripted_auth::{Answer, ScriptedAuth};
use common::{agent, key, principal, row, run_once};
use sqlx::PgPool;

fn by_ids(ids: &[i64]) -> ReplayOptions {
    ReplayOptions {
        selector: Selector {
            ids: ids.to_vec(),
            ..Selector::default()
        },
        ..ReplayOptions::default()
    }
}

async fn replay_ok(pool: &PgPool, options: &ReplayOptions) -> ReplayReport {
    replay(pool, options).await.expect("replay runs")
}

/// An agent and a key whose registers died from a 403; the auth server
/// still answers 403.
async fn dead_key(pool: &PgPool) -> (ScriptedAuth, capture::CreatedApiKey) {
    let auth = ScriptedAuth::always(Answer::status(403)).await;
    agent(pool, "a1").await;
    let k = key(pool, "a1", "ci").await;
    let report = run_once(pool, &auth.url(), common::config("w")).await;
    assert_eq!(report.dead, 2, "{report:?}");
    (auth, k)
}

#[sqlx::test(migrations = false)]
async fn replayed_rows_are_delivered_once_the_fault_is_cleared(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let (auth, k) = dead_key(&pool).await;

    let all_dead = ReplayOptions {
        selector: Selector {
            all_dead: true,
            ..Selector::default()
        },
        dry_run: true,
        ..ReplayOptions::default()
    };
    let report = replay_ok(&pool, &all_dead).await;
    assert_eq!(report.count(ReplayAction::Replayed), 2, "{report:?}");
    assert_eq!(
        row(&pool, k.outbox_id).await.state,
        "dead",
        "a dry run changes nothing"
    );

    let report = replay_ok(
        &pool,
        &ReplayOptions {
            dry_run: false,
            ..all_dead
        },
    )
    .await;
    assert_eq!(report.count(ReplayAction::Replayed), 2);
    let revived = row(&pool, k.outbox_id).await;
    assert_eq!(revived.state, "pending");
    assert_eq!(revived.attempts, 0);
    assert_eq!(revived.locked_by, None);

    auth.set_script(|_, _| Answer::ok());
    let delivered = run_once(&pool, &auth.url(), common::config("w")).await;
    assert_eq!(delivered.delivered, 2, "{delivered:?}");
    assert_eq!(row(&pool, k.outbox_id).await.state, "delivered");
}

#[sqlx::test(migrations = false)]
async fn selectors_narrow_and_one_is_required(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let (_auth, k) = dead_key(&pool).await;
    assert!(matches!(
        replay(&pool, &ReplayOptions::default()).await,
        Err(ReplayError::NoSelector)
    ));

    let by_resource = ReplayOptions {
        selector: Selector {
            resource: Some(ResourceRef::new("api_key", &k.id).expect("resource")),
            since: Some(chrono::Utc::now() - chrono::Duration::hours(1)),
            error_contains: Some("403".into()),
            ..Selector::default()
        },
        dry_run: true,
        ..ReplayOptions::default()
    };
    let report = replay_ok(&pool, &by_resource).await;
    assert_eq!(report.rows.len(), 1, "{report:?}");
    assert_eq!(report.rows[0].id, k.outbox_id);

    let too_late = ReplayOptions {
        selector: Selector {
            until: Some(chrono::Utc::now() - chrono::Duration::hours(1)),
            ..Selector::default()
        },
        ..ReplayOptions::default()
    };
    assert!(replay_ok(&pool, &too_late).await.rows.is_empty());

    let no_match = ReplayOptions {
        selector: Selector {
            error_contains: Some("no such error".into()),
            ..Selector::default()
        },
        ..ReplayOptions::default()
    };
    assert!(replay_ok(&pool, &no_match).await.rows.is_empty());
}

#[sqlx::test(migrations = false)]
async fn refuses_a_register_whose_key_is_gone(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let (_auth, k) = dead_key(&pool).await;
    capture::delete_api_key(&pool, &k.id, Some(&principal("u1")))
        .await
        .expect("deleted");

    let report = replay_ok(&pool, &by_ids(&[k.outbox_id])).await;
    assert_eq!(report.rows.len(), 1);
    assert_eq!(report.rows[0].action, ReplayAction::Superseded);
    assert!(report.rows[0].reason.starts_with("resource is not live"));
    let r = row(&pool, k.outbox_id).await;
    assert_eq!(r.state, "superseded");
    assert!(
        r.last_error
            .as_deref()
            .is_some_and(|e| e.starts_with("replay: resource is not live")),
        "{:?}",
        r.last_error
    );
}

#[sqlx::test(migrations = false)]
async fn refuses_a_register_overtaken_by_a_later_deregister(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let (_auth, k) = dead_key(&pool).await;
    // A later deregister of the same resource (here one reconcile enqueued).
    let mut tx = pool.begin().await.expect("begin");
    let later = enqueue(
        &mut tx,
        &[NewRow {
            operation: Operation::Deregister,
            resource: ResourceRef::new("api_key", &k.id).expect("resource"),
            parent: None,
            principal: Some(principal("u1")),
            guarded: false,
            attributes: None,
        }],
        "reconcile",
    )
    .await
    .expect("enqueued");
    tx.commit().await.expect("commit");

    let report = replay_ok(&pool, &by_ids(&[k.outbox_id])).await;
    assert_eq!(report.rows[0].action, ReplayAction::Superseded);
    assert_eq!(
        report.rows[0].reason,
        format!("overtaken by later deregister #{}", later[0])
    );
    assert_eq!(row(&pool, k.outbox_id).await.state, "superseded");
}

#[sqlx::test(migrations = false)]
async fn refuses_a_deregister_overtaken_by_a_later_register(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let auth = ScriptedAuth::always(Answer::ok()).await;
    agent(&pool, "a1").await;
    let k = key(&pool, "a1", "ci").await;
    run_once(&pool, &auth.url(), common::config("w")).await;
    auth.set_script(|_, _| Answer::status(403));
    let deregisters = capture::delete_api_key(&pool, &k.id, Some(&principal("u1")))
        .await
        .expect("deleted");
    run_once(&pool, &auth.url(), common::config("w")).await;
    assert_eq!(row(&pool, deregisters[0]).await.state, "dead");

    // The key is restored with the same id: its register is pending.
    let mut tx = pool.begin().await.expect("begin");
    capture::set_principal(&mut tx, Some(&principal("u1")))
        .await
        .expect("principal");
    sqlx::query(
        "INSERT INTO agent_api_keys (id, agent_id, name, api_key_type, api_key)
         VALUES ($1, 'a1', 'ci', 'EXTERNAL', 's')",
    )
    .bind(&k.id)
    .execute(&mut *tx)
    .await
    .expect("restored");
    tx.commit().await.expect("commit");

    let report = replay_ok(&pool, &by_ids(&[deregisters[0]])).await;
    assert_eq!(
        report.rows[0].action,
        ReplayAction::Superseded,
        "{report:?}"
    );
    assert!(
        report.rows[0]
            .reason
            .starts_with("overtaken by later register #"),
        "{report:?}"
    );
}

#[sqlx::test(migrations = false)]
async fn no_creator_rows_need_a_principal(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let auth = ScriptedAuth::always(Answer::ok()).await;
    agent(&pool, "a1").await;
    let k = capture::create_api_key(
        &pool,
        NewApiKey {
            agent_id: "a1".into(),
            name: "legacy".into(),
            key_type: ApiKeyType::External,
            secret: None,
        },
        None,
    )
    .await
    .expect("created");
    assert_eq!(row(&pool, k.outbox_id).await.state, "dead");

    let selector = Selector {
        error_contains: Some("NO CREATOR".into()),
        ..Selector::default()
    };
    let report = replay_ok(
        &pool,
        &ReplayOptions {
            selector: selector.clone(),
            ..ReplayOptions::default()
        },
    )
    .await;
    assert_eq!(report.rows.len(), 1);
    assert_eq!(report.rows[0].action, ReplayAction::Skipped);
    assert!(report.rows[0].reason.contains("--principal"));
    assert_eq!(row(&pool, k.outbox_id).await.state, "dead");

    let owner =
        Principal::parse(r#"{"user_id":"u5","api_key":"sk-never-stored"}"#).expect("principal");
    let report = replay_ok(
        &pool,
        &ReplayOptions {
            selector,
            principal: Some(owner),
            dry_run: false,
        },
    )
    .await;
    assert_eq!(report.rows[0].action, ReplayAction::Replayed);
    let revived = row(&pool, k.outbox_id).await;
    assert_eq!(revived.state, "pending");
    assert_eq!(
        revived.principal,
        Some(serde_json::json!({"user_id": "u5"}))
    );
    let source: Option<String> =
        sqlx::query_scalar("SELECT principal_source FROM authz_outbox WHERE id = $1")
            .bind(k.outbox_id)
            .fetch_one(&pool)
            .await
            .expect("source");
    assert_eq!(
        source.as_deref(),
        Some("replay"),
        "the principal is replay's word"
    );

    let delivered = run_once(&pool, &auth.url(), common::config("w")).await;
    assert_eq!(delivered.delivered, 2, "agent and key: {delivered:?}");
    let sent = auth.seen();
    let key_register = sent
        .iter()
        .find(|s| s.body["resource"]["selector"] == k.id.as_str())
        .expect("key register sent");
    assert_eq!(
        key_register.body["principal"],
        serde_json::json!({"user_id": "u5"})
    );
}

#[sqlx::test(migrations = false)]
async fn rows_selected_by_id_that_are_not_dead_are_skipped(pool: PgPool) {
    let pool = common::host_db(pool).await;
    agent(&pool, "a1").await;
    let k = key(&pool, "a1", "ci").await;
    let report = replay_ok(&pool, &by_ids(&[k.outbox_id])).await;
    assert_eq!(report.rows[0].action, ReplayAction::Skipped);
    assert_eq!(report.rows[0].reason, "row is pending, not dead");
}

#[sqlx::test(migrations = false)]
async fn cli_reports_per_row_and_requires_a_selector(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let (_auth, k) = dead_key(&pool).await;
    let url = common::database_url(&pool).await;
    let run = |args: Vec<String>| {
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_authz-outbox"))
                .args(args)
                .env("DATABASE_URL", url)
                .env("RUST_LOG", "warn")
                .output()
                .expect("binary runs")
        })
    };
    let out = run(vec!["replay".into()]).await.expect("join");
    assert_eq!(out.status.code(), Some(2));

    let out = run(vec![
        "replay".into(),
        "--id".into(),
        k.outbox_id.to_string(),
        "--format".into(),
        "json".into(),
    ])
    .await
    .expect("join");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(json["rows"][0]["id"], k.outbox_id);
    assert_eq!(json["rows"][0]["action"], "replayed");
    assert_eq!(json["rows"][0]["resource"], format!("api_key:{}", k.id));
    assert_eq!(row(&pool, k.outbox_id).await.state, "pending");
}

/// Replay judges liveness by each type's mapping: a register of a
/// soft-deleted agent, task or schedule is refused (and says why), a live
/// one is re-driven.
#[sqlx::test(migrations = false)]
async fn refuses_to_resurrect_a_soft_deleted_resource_of_any_type(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let auth = ScriptedAuth::always(Answer::status(403)).await;
    let mut tx = pool.begin().await.expect("begin");
    for sql in [
        r#"SELECT set_config('authz_outbox.principal', '{"user_id":"u1"}', true)"#,
        "INSERT INTO agents (id, name, description, status) VALUES ('a1', 'a1', 'd', 'READY'), ('a2', 'a2', 'd', 'READY')",
        "INSERT INTO tasks (id, name, status) VALUES ('t1', 't1', 'RUNNING')",
        "INSERT INTO task_agents (task_id, agent_id) VALUES ('t1', 'a1')",
        r#"INSERT INTO agent_run_schedules (id, agent_id, name, creator_principal) VALUES ('s1', 'a1', 'n', '{"user_id":"u1"}')"#,
    ] {
        sqlx::query(sql).execute(&mut *tx).await.expect(sql);
    }
    tx.commit().await.expect("commit");
    let report = run_once(&pool, &auth.url(), common::config("w")).await;
    assert_eq!(report.dead, 4, "{report:?}");
    // Soft-deleted behind the outbox (no deregister row to overtake them).
    common::uncaptured(
        &pool,
        "UPDATE agents SET status = 'DELETED' WHERE id = 'a2'",
        &[],
    )
    .await;
    common::uncaptured(
        &pool,
        "UPDATE tasks SET status = 'DELETED' WHERE id = 't1'",
        &[],
    )
    .await;
    common::uncaptured(
        &pool,
        "UPDATE agent_run_schedules SET deleted_at = now() WHERE id = 's1'",
        &[],
    )
    .await;

    let all_dead = ReplayOptions {
        selector: Selector {
            all_dead: true,
            ..Selector::default()
        },
        ..ReplayOptions::default()
    };
    let report = replay_ok(&pool, &all_dead).await;
    let action = |resource: &str| {
        report
            .rows
            .iter()
            .find(|r| r.resource == resource)
            .map(|r| (r.action, r.reason.clone()))
            .unwrap_or_else(|| panic!("{resource} not selected: {report:?}"))
    };
    assert_eq!(action("agent:a1").0, ReplayAction::Replayed);
    for (resource, kind) in [
        ("agent:a2", "agent"),
        ("task:t1", "task"),
        ("schedule:run-schedule::a1::s1", "schedule"),
    ] {
        let (act, reason) = action(resource);
        assert_eq!(act, ReplayAction::Superseded, "{resource}");
        assert!(
            reason.starts_with(&format!("resource is not live by its {kind} mapping")),
            "{resource}: {reason}"
        );
    }
    let states: Vec<(String, String)> =
        sqlx::query_as("SELECT resource_type, state FROM authz_outbox ORDER BY id")
            .fetch_all(&pool)
            .await
            .expect("rows");
    assert_eq!(
        states.iter().filter(|(_, s)| s == "pending").count(),
        1,
        "only the live agent is re-driven: {states:?}"
    );
}

/// Replay locks the rows it decides on. A selected row that another
/// transaction finishes meanwhile (here an operator's update; a second
/// replay or a worker does the same) moves to its day's `_done` half, which
/// PostgreSQL reports to the waiting replay as a serialization failure.
/// Replay runs again from the start and reports the row as it now is,
/// instead of failing.
#[sqlx::test(migrations = false)]
async fn a_replay_racing_a_move_of_its_row_runs_again(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let (_auth, k) = dead_key(&pool).await;
    let id = k.outbox_id;
    let mut other = pool.begin().await.expect("begin");
    sqlx::query(
        "UPDATE authz_outbox SET state = 'superseded', finished_at = now(), last_error = 'by hand'
         WHERE id = $1",
    )
    .bind(id)
    .execute(&mut *other)
    .await
    .expect("the other transaction finishes the row");
    let replaying = tokio::spawn({
        let pool = pool.clone();
        async move { replay(&pool, &by_ids(&[id])).await }
    });
    common::until_a_session_waits_for_a_lock(&pool, "replay waits for the row").await;
    other.commit().await.expect("commit");

    let report = replaying
        .await
        .expect("replay task")
        .expect("replay runs again, not failed");
    assert_eq!(report.count(ReplayAction::Skipped), 1, "{report:?}");
    assert_eq!(row(&pool, id).await.state, "superseded");
}
