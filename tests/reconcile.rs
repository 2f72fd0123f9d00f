//! Reconcile against the real SpiceDB engine (agentex-auth-dev) and a real
//! PostgreSQL: each kind of drift is planted behind the outbox's back, then
//! classified, healed through the outbox, and re-checked.

mod common;

use std::time::Duration;

use agentex_auth_dev::DevServer;
use authz_outbox::domain::{Principal, ResourceType};
use authz_outbox::reconcile::{
    Finding, FindingKind, ReconcileOptions, ReconcileReport, Refusal, SelectorEncoding,
    SpiceDbConfig, TypeCounts, reconcile,
};
use common::{
    agent, delete_key_uncaptured, dev_server, insert_key_uncaptured, key, plant_deregister,
    plant_register, run_once,
};
use sqlx::PgPool;

fn options() -> ReconcileOptions {
    ReconcileOptions {
        grace: Duration::ZERO,
        ..ReconcileOptions::default()
    }
}

async fn check(
    pool: &PgPool,
    dev: &DevServer,
    options: &ReconcileOptions,
) -> (ReconcileReport, Vec<Finding>) {
    let mut spicedb = SpiceDbConfig::new(dev.grpc_endpoint());
    // Small pages, so the cursor paging is exercised.
    spicedb.page_size = 2;
    let mut findings = Vec::new();
    let report = reconcile(pool, &spicedb, options, &mut |f| findings.push(f.clone()))
        .await
        .expect("reconcile runs");
    (report, findings)
}

fn find<'a>(findings: &'a [Finding], resource: &str) -> &'a Finding {
    findings
        .iter()
        .find(|f| f.resource == resource)
        .unwrap_or_else(|| panic!("no finding for {resource}: {findings:#?}"))
}

async fn reconcile_rows(pool: &PgPool) -> Vec<(String, String, String, bool)> {
    sqlx::query_as(
        "SELECT operation, resource_type || ':' || resource_id, state, guarded
         FROM authz_outbox WHERE origin = 'reconcile' ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .expect("outbox readable")
}

/// Runs the worker until nothing is pending: under load a delivery may time
/// out and be retried later, which a single `run --once` would not wait for.
async fn deliver_all(pool: &PgPool, dev: &DevServer) -> authz_outbox::delivery::RunReport {
    let mut total = authz_outbox::delivery::RunReport::default();
    for _ in 0..50 {
        let r = run_once(pool, &dev.base_url(), common::config("w")).await;
        total.delivered += r.delivered;
        total.dead += r.dead;
        total.superseded += r.superseded;
        let pending: i64 =
            sqlx::query_scalar("SELECT count(*) FROM authz_outbox WHERE state = 'pending'")
                .fetch_one(pool)
                .await
                .expect("count");
        if pending == 0 {
            return total;
        }
        common::make_due(pool).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("outbox did not drain");
}

/// Agents a1, a2 and three keys under a1, all delivered: 5 resources in SpiceDB.
async fn consistent_world(pool: &PgPool, dev: &DevServer) -> Vec<String> {
    agent(pool, "a1").await;
    agent(pool, "a2").await;
    let mut keys = Vec::new();
    for name in ["k1", "k2", "k3"] {
        keys.push(key(pool, "a1", name).await.id);
    }
    let report = deliver_all(pool, dev).await;
    assert_eq!(report.delivered, 5, "{report:?}");
    keys
}

/// One of each kind of drift. Returns the resource of each.
struct Planted {
    orphan: String,
    missing_tuples: String,
    missing_parent: String,
    missing_agent: String,
    mismatch: String,
    legacy: String,
}

async fn plant_drift(pool: &PgPool, dev: &DevServer, keys: &[String]) -> Planted {
    let url = dev.base_url();
    // Tuples, no row: the create failed after its register (the seed's bug).
    plant_register(&url, "u9", "api_key", "ghost", Some("a1")).await;
    // A row whose tuples vanished; its creator is on record in the outbox.
    plant_deregister(&url, "api_key", &keys[0]).await;
    // A legacy row registered without its parent edge (fails closed).
    insert_key_uncaptured(pool, "no-parent", "a1").await;
    plant_register(&url, "u7", "api_key", "no-parent", None).await;
    // An agent whose owner edge is gone.
    plant_deregister(&url, "agent", "a2").await;
    // A key registered under the wrong agent.
    insert_key_uncaptured(pool, "moved", "a1").await;
    plant_register(&url, "u8", "api_key", "moved", Some("a2")).await;
    // A legacy key nobody ever registered, with no creator on record.
    insert_key_uncaptured(pool, "legacy", "a1").await;
    Planted {
        orphan: "api_key:ghost".into(),
        missing_tuples: format!("api_key:{}", keys[0]),
        missing_parent: "api_key:no-parent".into(),
        missing_agent: "agent:a2".into(),
        mismatch: "api_key:moved".into(),
        legacy: "api_key:legacy".into(),
    }
}

#[sqlx::test(migrations = false)]
async fn consistent_world_reports_no_drift_and_exits_zero(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let dev = dev_server().await;
    consistent_world(&pool, &dev).await;
    let (report, findings) = check(&pool, &dev, &options()).await;
    assert!(findings.is_empty(), "{findings:#?}");
    assert_eq!(report.summary.consistent, 5);
    assert_eq!(report.summary.drift, 0);
    assert_eq!(report.summary.spicedb_resources, 5);
    assert_eq!(report.exit_code(), 0);
    let (drift, applied): (i64, bool) =
        sqlx::query_as("SELECT drift, applied FROM authz_outbox_reconcile_runs WHERE id = $1")
            .bind(report.run_id)
            .fetch_one(&pool)
            .await
            .expect("run recorded");
    assert_eq!((drift, applied), (0, false));
    dev.shutdown().await;
}

#[sqlx::test(migrations = false)]
async fn classifies_each_kind_of_drift(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let dev = dev_server().await;
    let keys = consistent_world(&pool, &dev).await;
    let p = plant_drift(&pool, &dev, &keys).await;

    let (report, findings) = check(&pool, &dev, &options()).await;
    let s = &report.summary;
    assert_eq!(
        (s.orphan, s.missing, s.parent_mismatch, s.needs_owner),
        (1, 3, 1, 1),
        "{s:?} {findings:#?}"
    );
    assert_eq!(s.consistent, 3, "a1, k2, k3");
    assert_eq!(s.drift, 6);
    assert_eq!(report.exit_code(), 1);
    assert!(!report.applied);
    assert_eq!(report.enqueued, 0);

    let orphan = find(&findings, &p.orphan);
    assert_eq!(orphan.kind, FindingKind::Orphan);
    assert_eq!(orphan.owner.as_deref(), Some("user:u9"));
    assert_eq!(
        find(&findings, &p.missing_tuples).kind,
        FindingKind::Missing
    );
    let no_parent = find(&findings, &p.missing_parent);
    assert_eq!(no_parent.kind, FindingKind::Missing);
    assert_eq!(no_parent.reason, "parent edge missing");
    assert_eq!(find(&findings, &p.missing_agent).kind, FindingKind::Missing);
    let mismatch = find(&findings, &p.mismatch);
    assert_eq!(mismatch.kind, FindingKind::ParentMismatch);
    assert_eq!(mismatch.row_parent.as_deref(), Some("a1"));
    assert_eq!(mismatch.spicedb_parents, vec!["a2".to_string()]);
    assert_eq!(find(&findings, &p.legacy).kind, FindingKind::NeedsOwner);

    // A dry run changes nothing.
    assert!(reconcile_rows(&pool).await.is_empty());
    dev.shutdown().await;
}

#[sqlx::test(migrations = false)]
async fn apply_then_delivery_leaves_zero_drift(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let dev = dev_server().await;
    let keys = consistent_world(&pool, &dev).await;
    let p = plant_drift(&pool, &dev, &keys).await;

    let backfill = Principal::parse(r#"{"service_account_id":"backfill"}"#).expect("principal");
    let apply = ReconcileOptions {
        apply: true,
        owner_principal: Some(backfill),
        ..options()
    };
    let (report, findings) = check(&pool, &dev, &apply).await;
    assert!(report.applied);
    assert_eq!(
        report.summary.needs_owner, 0,
        "the backfill owner covers it"
    );
    assert_eq!(report.summary.drift, 6);
    assert_eq!(report.exit_code(), 1, "drift was found, even if healed");
    assert!(findings.iter().all(|f| f.enqueued), "{findings:#?}");

    let rows = reconcile_rows(&pool).await;
    assert_eq!(report.enqueued as usize, rows.len());
    let ops_of = |resource: &str| -> Vec<(String, bool)> {
        rows.iter()
            .filter(|r| r.1 == resource)
            .map(|r| (r.0.clone(), r.3))
            .collect()
    };
    assert_eq!(ops_of(&p.orphan), vec![("deregister".into(), true)]);
    assert_eq!(
        ops_of(&p.mismatch),
        vec![("deregister".into(), false), ("register".into(), false)],
        "a mismatch's deregister is not guarded: its row exists"
    );
    assert_eq!(ops_of(&p.legacy), vec![("register".into(), false)]);
    assert_eq!(ops_of(&p.missing_tuples), vec![("register".into(), false)]);
    // The recorded creator is used, not the backfill owner.
    let principal: serde_json::Value = sqlx::query_scalar(
        "SELECT principal FROM authz_outbox WHERE origin = 'reconcile'
           AND resource_type || ':' || resource_id = $1",
    )
    .bind(&p.missing_tuples)
    .fetch_one(&pool)
    .await
    .expect("row");
    assert_eq!(principal, serde_json::json!({"user_id": "u1"}));
    // An orphan's and a mismatch's fixes are sent as the owner SpiceDB holds;
    // the legacy key with no creator on record gets the backfill owner.
    let principals: Vec<(String, serde_json::Value)> = sqlx::query_as(
        "SELECT DISTINCT resource_type || ':' || resource_id, principal FROM authz_outbox
         WHERE origin = 'reconcile' ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .expect("rows");
    let principal_of = |resource: &str| {
        principals
            .iter()
            .filter(|(r, _)| r == resource)
            .map(|(_, p)| p.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        principal_of(&p.orphan),
        vec![serde_json::json!({"user_id": "u9"})]
    );
    assert_eq!(
        principal_of(&p.mismatch),
        vec![serde_json::json!({"user_id": "u8"})]
    );
    assert_eq!(
        principal_of(&p.legacy),
        vec![serde_json::json!({"service_account_id": "backfill"})]
    );

    let delivered = deliver_all(&pool, &dev).await;
    assert_eq!(delivered.dead, 0, "{delivered:?}");
    assert!(
        reconcile_rows(&pool)
            .await
            .iter()
            .all(|r| r.2 == "delivered"),
        "{:?}",
        reconcile_rows(&pool).await
    );

    let (after, findings) = check(&pool, &dev, &options()).await;
    assert_eq!(after.summary.drift, 0, "{findings:#?}");
    assert_eq!(after.exit_code(), 0);
    assert_eq!(after.summary.consistent, 8);
    let runs: Vec<(bool, i64)> =
        sqlx::query_as("SELECT applied, drift FROM authz_outbox_reconcile_runs ORDER BY id")
            .fetch_all(&pool)
            .await
            .expect("runs");
    assert_eq!(runs, vec![(true, 6), (false, 0)]);
    dev.shutdown().await;
}

#[sqlx::test(migrations = false)]
async fn in_flight_and_young_resources_are_left_alone(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let dev = dev_server().await;
    consistent_world(&pool, &dev).await;
    // A row created just now with no tuples (its create may be committing).
    insert_key_uncaptured(&pool, "fresh", "a1").await;
    // Tuples with no row, but its outbox history is recent.
    let recent = key(&pool, "a1", "recent").await;
    deliver_all(&pool, &dev).await;
    delete_key_uncaptured(&pool, &recent.id).await;
    // Captured, not yet delivered: a pending row will register it.
    let pending_after = key(&pool, "a1", "pending").await;

    let young = ReconcileOptions {
        apply: true,
        grace: Duration::from_secs(3600),
        ..ReconcileOptions::default()
    };
    let (report, findings) = check(&pool, &dev, &young).await;
    assert!(findings.is_empty(), "{findings:#?}");
    assert_eq!(report.summary.in_flight, 1, "{:?}", report.summary);
    assert_eq!(report.summary.young, 2, "{:?}", report.summary);
    assert_eq!(report.summary.drift, 0);
    assert_eq!(report.enqueued, 0);
    assert!(reconcile_rows(&pool).await.is_empty());

    // With no grace the young ones are drift; the in-flight one still is not.
    let (report, findings) = check(&pool, &dev, &options()).await;
    assert_eq!(report.summary.in_flight, 1);
    assert_eq!(
        find(&findings, &format!("api_key:{}", recent.id)).kind,
        FindingKind::Orphan
    );
    assert_eq!(
        find(&findings, "api_key:fresh").kind,
        FindingKind::NeedsOwner
    );
    assert!(
        !findings
            .iter()
            .any(|f| f.resource == format!("api_key:{}", pending_after.id))
    );
    dev.shutdown().await;
}

#[sqlx::test(migrations = false)]
async fn guarded_deregister_of_a_recreated_key_is_superseded(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let dev = dev_server().await;
    consistent_world(&pool, &dev).await;
    let k = key(&pool, "a1", "flapping").await;
    deliver_all(&pool, &dev).await;
    delete_key_uncaptured(&pool, &k.id).await;

    let apply = ReconcileOptions {
        apply: true,
        ..options()
    };
    let (report, _) = check(&pool, &dev, &apply).await;
    assert_eq!(report.summary.orphan, 1);
    assert_eq!(report.enqueued, 1);

    // The key comes back (a restore, a create with the same id) before the
    // worker delivers the deregister.
    insert_key_uncaptured(&pool, &k.id, "a1").await;
    let delivered = deliver_all(&pool, &dev).await;
    assert_eq!(delivered.superseded, 1, "{delivered:?}");
    let (state, error): (String, Option<String>) =
        sqlx::query_as("SELECT state, last_error FROM authz_outbox WHERE origin = 'reconcile'")
            .fetch_one(&pool)
            .await
            .expect("row");
    assert_eq!(state, "superseded");
    assert!(error.unwrap_or_default().contains("exists again"));

    // Its tuples survived.
    let (after, findings) = check(&pool, &dev, &options()).await;
    assert_eq!(after.summary.drift, 0, "{findings:#?}");
    dev.shutdown().await;
}

#[sqlx::test(migrations = false)]
async fn apply_refuses_mass_deregisters_unless_forced(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let dev = dev_server().await;
    let keys = consistent_world(&pool, &dev).await;
    // As if pointed at the wrong (or a restored, older) database: every key
    // row is gone, so all 3 keys SpiceDB holds look orphaned.
    for k in &keys {
        delete_key_uncaptured(&pool, k).await;
    }
    let apply = ReconcileOptions {
        apply: true,
        ..options()
    };
    let (report, findings) = check(&pool, &dev, &apply).await;
    assert_eq!(
        report.refused,
        Some(Refusal::MostOfSpiceDb {
            resource_type: "api_key".into(),
            count: 3,
            held: 3
        })
    );
    assert_eq!(report.exit_code(), 2);
    assert!(!report.applied);
    assert_eq!(findings.len(), 3, "the findings are still reported");
    assert!(findings.iter().all(|f| !f.enqueued));
    assert!(reconcile_rows(&pool).await.is_empty());
    assert!(
        report
            .refused
            .as_ref()
            .is_some_and(|r| r.to_string().contains("more than half"))
    );

    let capped = ReconcileOptions {
        max_deregisters: 2,
        ..apply.clone()
    };
    let (report, _) = check(&pool, &dev, &capped).await;
    assert_eq!(
        report.refused,
        Some(Refusal::TooManyDeregisters {
            resource_type: "api_key".into(),
            count: 3,
            limit: 2
        })
    );
    assert!(reconcile_rows(&pool).await.is_empty());

    let forced = ReconcileOptions {
        force: true,
        ..capped
    };
    let (report, _) = check(&pool, &dev, &forced).await;
    assert_eq!(report.refused, None);
    assert_eq!(report.enqueued, 3);
    assert_eq!(report.exit_code(), 1);
    let rows = reconcile_rows(&pool).await;
    assert!(rows.iter().all(|r| r.0 == "deregister" && r.3), "{rows:?}");
    dev.shutdown().await;
}

/// Runs the binary against the test's database; returns (exit code, stdout, stderr).
async fn cli(pool: &PgPool, args: &[&str]) -> (i32, String, String) {
    let url = common::database_url(pool).await;
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    // Blocking on the child inside the runtime would starve the dev server.
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_authz-outbox"))
            .args(&args)
            .env("DATABASE_URL", url)
            .env("RUST_LOG", "warn")
            .output()
            .expect("binary runs")
    })
    .await
    .expect("join");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[sqlx::test(migrations = false)]
async fn cli_exits_zero_when_consistent_one_on_drift_two_when_refused(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let dev = dev_server().await;
    consistent_world(&pool, &dev).await;
    let endpoint = dev.grpc_endpoint();
    let base = [
        "reconcile",
        "--spicedb-endpoint",
        &endpoint,
        "--grace",
        "0s",
    ];

    let (code, stdout, stderr) = cli(&pool, &[&base[..], &["--format", "json"]].concat()).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    let json: serde_json::Value = serde_json::from_str(&stdout).expect("JSON report");
    assert_eq!(json["summary"]["drift"], 0);
    assert_eq!(json["findings"], serde_json::json!([]));

    plant_register(&dev.base_url(), "u9", "api_key", "ghost", Some("a1")).await;
    let (code, stdout, stderr) = cli(&pool, &[&base[..], &["--format", "json"]].concat()).await;
    assert_eq!(code, 1, "{stdout}{stderr}");
    let json: serde_json::Value = serde_json::from_str(&stdout).expect("JSON report");
    assert_eq!(json["summary"]["orphan"], 1);
    assert_eq!(json["findings"][0]["kind"], "orphan");
    assert_eq!(json["findings"][0]["resource"], "api_key:ghost");

    let (code, stdout, stderr) = cli(&pool, &base).await;
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(stdout.contains("api_key:ghost"), "{stdout}");

    let (code, _, stderr) = cli(
        &pool,
        &[&base[..], &["--apply", "--max-deregisters", "0"]].concat(),
    )
    .await;
    assert_eq!(code, 2, "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error:") && last.contains("--max-deregisters (0)"),
        "{stderr}"
    );
    dev.shutdown().await;
}

// ---------------------------------------------------------------------------
// Every resource type, judged by its mapping (agents, api keys, tasks and
// schedules on the host's own table shapes).

const U1: Option<&str> = Some(r#"{"user_id":"u1"}"#);

/// Runs `statements` in one transaction as the host would: captured, with
/// its request's principal set (or none).
async fn host_tx(pool: &PgPool, principal: Option<&str>, statements: &[String]) {
    let mut tx = pool.begin().await.expect("begin");
    if let Some(p) = principal {
        sqlx::query("SELECT set_config('authz_outbox.principal', $1, true)")
            .bind(p)
            .execute(&mut *tx)
            .await
            .expect("principal");
    }
    for s in statements {
        sqlx::raw_sql(sqlx::AssertSqlSafe(s.clone()))
            .execute(&mut *tx)
            .await
            .expect(s);
    }
    tx.commit().await.expect("commit");
}

/// The same behind the outbox's back: capture triggers off.
async fn behind_the_outbox(pool: &PgPool, statements: &[String]) {
    let mut all = vec!["SET LOCAL session_replication_role = replica".to_string()];
    all.extend(statements.iter().cloned());
    host_tx(pool, None, &all).await;
}

fn agent_sql(id: &str) -> String {
    format!(
        "INSERT INTO agents (id, name, description, status) VALUES ('{id}', '{id}', 'd', 'READY')"
    )
}

fn key_sql(id: &str, agent: &str) -> String {
    format!(
        "INSERT INTO agent_api_keys (id, agent_id, name, api_key_type, api_key)
         VALUES ('{id}', '{agent}', '{id}', 'EXTERNAL', 'secret')"
    )
}

/// The host's task creation: the task, its agent link, its tracker row.
fn task_sql(id: &str, agent: &str) -> Vec<String> {
    vec![
        format!("INSERT INTO tasks (id, name, status) VALUES ('{id}', '{id}', 'RUNNING')"),
        format!("INSERT INTO task_agents (task_id, agent_id) VALUES ('{id}', '{agent}')"),
        format!(
            "INSERT INTO agent_task_tracker (id, agent_id, task_id) VALUES ('tr-{id}', '{agent}', '{id}')"
        ),
    ]
}

fn schedule_sql(id: &str, agent: &str, creator: &str) -> String {
    format!(
        r#"INSERT INTO agent_run_schedules (id, agent_id, name, creator_principal)
           VALUES ('{id}', '{agent}', '{id}', '{{"user_id":"{creator}"}}')"#
    )
}

/// Agents a1..a3, keys k1 k2 under a1, tasks t1..t5 (t5 under a2), all
/// created the host's way and delivered: 10 resources in SpiceDB.
async fn host_world(pool: &PgPool, dev: &DevServer) {
    host_tx(
        pool,
        U1,
        &[agent_sql("a1"), agent_sql("a2"), agent_sql("a3")],
    )
    .await;
    host_tx(pool, U1, &[key_sql("k1", "a1"), key_sql("k2", "a1")]).await;
    for (task, agent) in [
        ("t1", "a1"),
        ("t2", "a1"),
        ("t3", "a1"),
        ("t4", "a1"),
        ("t5", "a2"),
    ] {
        host_tx(pool, U1, &task_sql(task, agent)).await;
    }
    let report = deliver_all(pool, dev).await;
    assert_eq!((report.delivered, report.dead), (10, 0), "{report:?}");
}

fn counts<'a>(report: &'a ReconcileReport, resource_type: &str) -> &'a TypeCounts {
    report
        .summary
        .by_type
        .get(resource_type)
        .unwrap_or_else(|| panic!("no counts for {resource_type}: {:?}", report.summary))
}

#[sqlx::test(migrations = false)]
async fn agents_keys_and_tasks_drift_is_found_by_their_mappings_and_healed(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let dev = dev_server().await;
    host_world(&pool, &dev).await;
    let (report, findings) = check(&pool, &dev, &options()).await;
    assert_eq!(report.summary.drift, 0, "{findings:#?}");
    assert_eq!(report.summary.consistent, 10);
    assert_eq!(
        report.summary.by_type.keys().collect::<Vec<_>>(),
        ["agent", "api_key", "schedule", "task"],
        "every installed type is read"
    );

    behind_the_outbox(
        &pool,
        &[
            // A soft-deleted agent and task still registered.
            "UPDATE agents SET status = 'DELETED' WHERE id = 'a3'".into(),
            "UPDATE tasks SET status = 'DELETED' WHERE id = 't2'".into(),
            // A task re-parented: its task_agents row now points at a2.
            "UPDATE task_agents SET agent_id = 'a2' WHERE task_id = 't1'".into(),
            // Legacy rows from before the outbox, never registered.
            agent_sql("legacy-agent"),
            key_sql("legacy-key", "a1"),
        ],
    )
    .await;
    behind_the_outbox(&pool, &task_sql("legacy-task", "a1")).await;

    let (report, findings) = check(&pool, &dev, &options()).await;
    let kind_of = |r: &str| find(&findings, r).kind;
    assert_eq!(kind_of("agent:a3"), FindingKind::Orphan, "{findings:#?}");
    assert!(find(&findings, "agent:a3").reason.contains("no live row"));
    assert_eq!(kind_of("task:t2"), FindingKind::Orphan);
    let moved = find(&findings, "task:t1");
    assert_eq!(moved.kind, FindingKind::ParentMismatch);
    assert_eq!(moved.row_parent.as_deref(), Some("a2"));
    assert_eq!(moved.spicedb_parents, vec!["a1".to_string()]);
    for legacy in [
        "agent:legacy-agent",
        "api_key:legacy-key",
        "task:legacy-task",
    ] {
        assert_eq!(kind_of(legacy), FindingKind::NeedsOwner, "{legacy}");
    }
    assert_eq!(findings.len(), 6, "{findings:#?}");
    let agent = counts(&report, "agent");
    assert_eq!(
        (agent.orphan, agent.needs_owner, agent.consistent),
        (1, 1, 2)
    );
    let task = counts(&report, "task");
    assert_eq!(
        (
            task.orphan,
            task.parent_mismatch,
            task.needs_owner,
            task.consistent
        ),
        (1, 1, 1, 3)
    );
    assert_eq!(counts(&report, "api_key").needs_owner, 1);
    assert_eq!(report.exit_code(), 1);

    // --type limits the run.
    let only_tasks = ReconcileOptions {
        types: vec![ResourceType::Task],
        ..options()
    };
    let (report, findings) = check(&pool, &dev, &only_tasks).await;
    assert_eq!(report.summary.by_type.keys().collect::<Vec<_>>(), ["task"]);
    assert!(findings.iter().all(|f| f.resource.starts_with("task:")));
    assert_eq!(report.summary.drift, 3);

    let backfill = Principal::parse(r#"{"service_account_id":"backfill"}"#).expect("principal");
    let apply = ReconcileOptions {
        apply: true,
        owner_principal: Some(backfill),
        ..options()
    };
    let (report, findings) = check(&pool, &dev, &apply).await;
    assert!(report.applied, "{:?}", report.refused);
    assert!(findings.iter().all(|f| f.enqueued), "{findings:#?}");
    let fixes: Vec<(String, String, Option<String>, bool, serde_json::Value)> = sqlx::query_as(
        "SELECT operation, resource_type || ':' || resource_id, parent_id, guarded, principal
         FROM authz_outbox WHERE origin = 'reconcile' ORDER BY id",
    )
    .fetch_all(&pool)
    .await
    .expect("rows");
    let fixes_of = |r: &str| {
        fixes
            .iter()
            .filter(|f| f.1 == r)
            .map(|f| (f.0.as_str(), f.2.as_deref(), f.3))
            .collect::<Vec<_>>()
    };
    assert_eq!(fixes_of("agent:a3"), [("deregister", None, true)]);
    assert_eq!(fixes_of("task:t2"), [("deregister", None, true)]);
    assert_eq!(
        fixes_of("task:t1"),
        [("deregister", None, false), ("register", Some("a2"), false)]
    );
    assert_eq!(
        fixes_of("task:legacy-task"),
        [("register", Some("a1"), false)]
    );
    for legacy in [
        "agent:legacy-agent",
        "api_key:legacy-key",
        "task:legacy-task",
    ] {
        let principal = &fixes.iter().find(|f| f.1 == legacy).expect(legacy).4;
        assert_eq!(
            principal,
            &serde_json::json!({"service_account_id": "backfill"}),
            "{legacy}: no creator is known, so the backfill owner"
        );
    }

    let delivered = deliver_all(&pool, &dev).await;
    assert_eq!(delivered.dead, 0, "{delivered:?}");
    let (after, findings) = check(&pool, &dev, &options()).await;
    assert_eq!(after.summary.drift, 0, "{findings:#?}");
    assert_eq!(after.exit_code(), 0);
    assert_eq!(counts(&after, "agent").consistent, 3, "a1 a2 legacy-agent");
    assert_eq!(
        counts(&after, "task").consistent,
        5,
        "t1 t3 t4 t5 legacy-task"
    );
    dev.shutdown().await;
}

#[sqlx::test(migrations = false)]
async fn the_deregister_limits_hold_per_type(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let dev = dev_server().await;
    host_world(&pool, &dev).await;
    // The tasks table emptied behind the outbox (a bad restore); agents and
    // keys untouched. 5 of the 10 resources SpiceDB holds: not more than
    // half of all, but every task.
    behind_the_outbox(
        &pool,
        &[
            "DELETE FROM agent_task_tracker".into(),
            "DELETE FROM task_agents".into(),
            "DELETE FROM tasks".into(),
        ],
    )
    .await;
    let apply = ReconcileOptions {
        apply: true,
        ..options()
    };
    let (report, findings) = check(&pool, &dev, &apply).await;
    assert_eq!(
        report.refused,
        Some(Refusal::MostOfSpiceDb {
            resource_type: "task".into(),
            count: 5,
            held: 5
        })
    );
    assert_eq!(report.exit_code(), 2);
    assert_eq!(findings.len(), 5);
    assert!(reconcile_rows(&pool).await.is_empty());
    let message = report
        .refused
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default();
    assert!(message.contains("5 task deregisters"), "{message}");

    let capped = ReconcileOptions {
        max_deregisters: 4,
        ..apply.clone()
    };
    let (report, _) = check(&pool, &dev, &capped).await;
    assert_eq!(
        report.refused,
        Some(Refusal::TooManyDeregisters {
            resource_type: "task".into(),
            count: 5,
            limit: 4
        })
    );
    assert!(reconcile_rows(&pool).await.is_empty());

    // The other types can still be reconciled.
    let others = ReconcileOptions {
        types: vec![ResourceType::Agent, ResourceType::ApiKey],
        ..apply
    };
    let (report, _) = check(&pool, &dev, &others).await;
    assert_eq!(report.refused, None);
    assert_eq!(report.exit_code(), 0);
    dev.shutdown().await;
}

/// Schedules: selectors SpiceDB cannot hold verbatim (`run-schedule::A::S`)
/// are stored encoded by agentex-auth and decoded by reconcile.
#[sqlx::test(migrations = false)]
async fn schedule_drift_is_found_by_its_mapping_and_healed(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let dev = dev_server().await;
    host_tx(&pool, U1, &[agent_sql("a1")]).await;
    for s in ["s1", "s2", "s3", "s4"] {
        host_tx(&pool, None, &[schedule_sql(s, "a1", "sched-owner")]).await;
    }
    let report = deliver_all(&pool, &dev).await;
    assert_eq!((report.delivered, report.dead), (5, 0), "{report:?}");

    let schedules = ReconcileOptions {
        types: vec![ResourceType::Schedule],
        ..options()
    };
    let (report, findings) = check(&pool, &dev, &schedules).await;
    assert_eq!(report.summary.drift, 0, "{findings:#?}");
    assert_eq!(counts(&report, "schedule").consistent, 4);
    // Read back without decoding, every schedule looks orphaned and missing.
    let verbatim = ReconcileOptions {
        selector_encoding: SelectorEncoding::Verbatim,
        ..schedules.clone()
    };
    let (report, _) = check(&pool, &dev, &verbatim).await;
    assert_eq!(counts(&report, "schedule").consistent, 0);
    assert_eq!(counts(&report, "schedule").orphan, 4);

    // Registered under a selector no live row produces.
    plant_register(
        &dev.base_url(),
        "u9",
        "schedule",
        "run-schedule::a1::gone",
        Some("a1"),
    )
    .await;
    behind_the_outbox(
        &pool,
        &[
            // Soft-deleted, still registered.
            "UPDATE agent_run_schedules SET deleted_at = now() WHERE id = 's2'".into(),
            // A legacy schedule: its row names its creator.
            schedule_sql("legacy", "a1", "sched-legacy"),
        ],
    )
    .await;
    let (report, findings) = check(&pool, &dev, &schedules).await;
    assert_eq!(
        find(&findings, "schedule:run-schedule::a1::gone").kind,
        FindingKind::Orphan
    );
    assert_eq!(
        find(&findings, "schedule:run-schedule::a1::s2").kind,
        FindingKind::Orphan
    );
    assert_eq!(
        find(&findings, "schedule:run-schedule::a1::legacy").kind,
        FindingKind::Missing,
        "its creator_principal names the creator: no --owner-principal needed"
    );
    assert_eq!(report.summary.drift, 3, "{findings:#?}");

    let backfill = Principal::parse(r#"{"service_account_id":"backfill"}"#).expect("principal");
    let apply = ReconcileOptions {
        apply: true,
        owner_principal: Some(backfill),
        ..schedules.clone()
    };
    let (report, _) = check(&pool, &dev, &apply).await;
    assert!(report.applied, "{:?}", report.refused);
    let principal: serde_json::Value = sqlx::query_scalar(
        "SELECT principal FROM authz_outbox WHERE origin = 'reconcile'
           AND resource_id = 'run-schedule::a1::legacy'",
    )
    .fetch_one(&pool)
    .await
    .expect("row");
    assert_eq!(
        principal,
        serde_json::json!({"user_id": "sched-legacy"}),
        "the row's own creator, not --owner-principal"
    );
    let delivered = deliver_all(&pool, &dev).await;
    assert_eq!(delivered.dead, 0, "{delivered:?}");
    let (after, findings) = check(&pool, &dev, &schedules).await;
    assert_eq!(after.summary.drift, 0, "{findings:#?}");
    assert_eq!(after.exit_code(), 0);
    assert_eq!(counts(&after, "schedule").consistent, 4, "s1 s3 s4 legacy");
    dev.shutdown().await;
}

#[sqlx::test(migrations = false)]
async fn cli_type_is_validated_and_the_json_report_has_per_type_counts(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let dev = dev_server().await;
    host_world(&pool, &dev).await;
    behind_the_outbox(
        &pool,
        &["UPDATE agents SET status = 'DELETED' WHERE id = 'a3'".into()],
    )
    .await;
    let endpoint = dev.grpc_endpoint();
    let base = [
        "reconcile",
        "--spicedb-endpoint",
        &endpoint,
        "--grace",
        "0s",
    ];

    let (code, stdout, stderr) = cli(
        &pool,
        &[&base[..], &["--type", "agent,task", "--format", "json"]].concat(),
    )
    .await;
    assert_eq!(code, 1, "{stdout}{stderr}");
    let json: serde_json::Value = serde_json::from_str(&stdout).expect("JSON report");
    assert_eq!(json["findings"][0]["kind"], "orphan");
    assert_eq!(json["findings"][0]["resource"], "agent:a3");
    assert_eq!(json["summary"]["orphan"], 1);
    assert_eq!(json["summary"]["by_type"]["agent"]["orphan"], 1);
    assert_eq!(json["summary"]["by_type"]["agent"]["spicedb_resources"], 3);
    assert_eq!(json["summary"]["by_type"]["task"]["consistent"], 5);
    assert!(
        json["summary"]["by_type"].get("api_key").is_none(),
        "{json}"
    );

    let (code, stdout, _) = cli(&pool, &[&base[..], &["--type", "task"]].concat()).await;
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("TYPE"), "per-type table: {stdout}");

    // Any SpiceDB definition name is a type (the SpiceDB target's open
    // types); one without an installed mapping is refused by name.
    let (code, _, stderr) = cli(&pool, &[&base[..], &["--type", "widget"]].concat()).await;
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("no mapping is installed for type widget"),
        "{stderr}"
    );
    let (code, _, stderr) = cli(&pool, &[&base[..], &["--type", "Widget"]].concat()).await;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("invalid resource type"), "{stderr}");

    sqlx::query("DELETE FROM authz_outbox_mappings WHERE resource_type = 'schedule'")
        .execute(&pool)
        .await
        .expect("forget the schedule mapping");
    let (code, _, stderr) = cli(&pool, &[&base[..], &["--type", "schedule"]].concat()).await;
    assert_eq!(code, 2, "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error:") && last.contains("no mapping is installed for type schedule"),
        "{stderr}"
    );
    dev.shutdown().await;
}
