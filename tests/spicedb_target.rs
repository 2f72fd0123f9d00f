//! The SpiceDB delivery target against the real SpiceDB engine, through
//! agentex-auth-dev's gRPC port: what a row becomes in SpiceDB (read back
//! fully consistent), batching and its fallback, each gRPC code class, and
//! the command line. Needs `SPICEDB_LIBRARY_PATH=$(scripts/fetch-spicedb.sh)`.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use agentex_auth_dev::{Endpoint, Fault, FaultRates, Faults};
use authz_outbox::capture;
use authz_outbox::delivery::Worker;
use authz_outbox::delivery::spicedb::SpiceDbTarget;
use authz_outbox::mapping::Mappings;
use authz_outbox::reconcile::{
    Finding, ReconcileOptions, ReconcileReport, SpiceDbConfig, Writer, reconcile,
};
use authz_outbox::spicedb_client::SpiceDbClient;
use common::{agent, config, key, relationships_of, row, rows, run_once_spicedb};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

const BIN: &str = env!("CARGO_BIN_EXE_authz-outbox");

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// Runs `sql` in a transaction whose writer is `user`.
async fn as_user(pool: &PgPool, user: &str, sql: &'static str, bind: &str) {
    let mut tx = pool.begin().await.expect("begin");
    capture::set_principal(&mut tx, Some(&common::principal(user)))
        .await
        .expect("principal set");
    sqlx::query(sql)
        .bind(bind)
        .execute(&mut *tx)
        .await
        .expect("statement");
    tx.commit().await.expect("commit");
}

#[sqlx::test(migrations = false)]
async fn register_reparent_delete_and_soft_delete_end_in_exactly_the_mapped_relationships(
    pool: PgPool,
) {
    let pool = common::host_db(pool).await;
    let dev = common::dev_server().await;
    let grpc = dev.grpc_endpoint();
    agent(&pool, "a1").await;
    agent(&pool, "a2").await;
    let k = key(&pool, "a1", "k").await;

    let report = run_once_spicedb(&pool, &grpc, config("w"), 50).await;
    assert_eq!(report.delivered, 3, "{report:?}");
    assert_eq!(
        relationships_of(&grpc, "api_key", &k.id).await,
        set(&["owner@user:u1", "parent_agent@agent:a1"])
    );
    assert_eq!(
        relationships_of(&grpc, "agent", "a1").await,
        set(&["owner@user:u1"])
    );
    // Read-your-writes: the ZedToken of the write is the row's, and SpiceDB
    // answers at least as fresh as it.
    let (state, token) =
        capture::wait_for_consistency_token(&pool, k.outbox_id, Duration::from_secs(1))
            .await
            .expect("row finished");
    assert_eq!(state, capture::DeliveryState::Delivered);
    let token = token.expect("the write's ZedToken is kept");
    assert!(
        check(&grpc, ("api_key", &k.id), "read", "u1", Some(&token)).await,
        "readable by its creator at the write's token"
    );

    // A share granted elsewhere, then a re-parent by another user: one
    // request deletes the stale relationships and touches the new ones.
    common::touch_relationship(&grpc, ("api_key", &k.id), "owner", ("user", "u9")).await;
    as_user(
        &pool,
        "u2",
        "UPDATE agent_api_keys SET agent_id = 'a2' WHERE id = $1",
        &k.id,
    )
    .await;
    dev.reset_stats();
    let report = run_once_spicedb(&pool, &grpc, config("w"), 50).await;
    assert_eq!(report.delivered, 2, "{report:?}");
    assert_eq!(
        relationships_of(&grpc, "api_key", &k.id).await,
        set(&["owner@user:u2", "parent_agent@agent:a2"]),
        "the old parent, owner and the share are gone, the new ones there"
    );
    let stats = dev.stats();
    assert_eq!(
        stats.count(Endpoint::DeleteRelationships, "OK"),
        0,
        "the re-parent's deregister was no delete by filter: {stats:?}"
    );
    assert_eq!(
        stats.count(Endpoint::WriteRelationships, "OK"),
        2,
        "one DELETE+TOUCH write, then the register's TOUCH: {stats:?}"
    );

    // A hard delete removes every relationship, the ones the mapping does
    // not know included.
    common::touch_relationship(&grpc, ("api_key", &k.id), "owner", ("user", "u9")).await;
    capture::delete_api_key(&pool, &k.id, None)
        .await
        .expect("delete");
    // A soft delete (agents go to DELETED) deregisters the agent.
    as_user(
        &pool,
        "u1",
        "UPDATE agents SET status = 'DELETED' WHERE id = $1",
        "a1",
    )
    .await;
    let report = run_once_spicedb(&pool, &grpc, config("w"), 50).await;
    assert_eq!(report.delivered, 2, "{report:?}");
    assert!(relationships_of(&grpc, "api_key", &k.id).await.is_empty());
    assert!(relationships_of(&grpc, "agent", "a1").await.is_empty());
    assert_eq!(
        relationships_of(&grpc, "agent", "a2").await,
        set(&["owner@user:u1"]),
        "untouched"
    );
    let all = rows(&pool).await;
    assert!(all.iter().all(|r| r.state == "delivered"), "{all:?}");
    assert!(
        all.iter().all(|r| r.consistency_token.is_some()),
        "every write's ZedToken kept: {all:?}"
    );
    dev.shutdown().await;
}

/// CheckPermission, optionally at least as fresh as `token`.
async fn check(
    endpoint: &str,
    resource: (&str, &str),
    permission: &str,
    user: &str,
    token: Option<&str>,
) -> bool {
    use spicedb_grpc_tonic::v1::check_permission_response::Permissionship;
    use spicedb_grpc_tonic::v1::permissions_service_client::PermissionsServiceClient;
    use spicedb_grpc_tonic::v1::{
        CheckPermissionRequest, Consistency, ObjectReference, SubjectReference, ZedToken,
        consistency::Requirement,
    };
    let requirement = match token {
        Some(t) => Requirement::AtLeastAsFresh(ZedToken { token: t.into() }),
        None => Requirement::FullyConsistent(true),
    };
    let answer = PermissionsServiceClient::connect(endpoint.to_string())
        .await
        .expect("connects")
        .check_permission(CheckPermissionRequest {
            consistency: Some(Consistency {
                requirement: Some(requirement),
            }),
            resource: Some(ObjectReference {
                object_type: resource.0.into(),
                object_id: resource.1.into(),
            }),
            permission: permission.into(),
            subject: Some(SubjectReference {
                object: Some(ObjectReference {
                    object_type: "user".into(),
                    object_id: user.into(),
                }),
                optional_relation: String::new(),
            }),
            ..Default::default()
        })
        .await
        .expect("check answers")
        .into_inner();
    answer.permissionship == Permissionship::HasPermission as i32
}

/// A live task with a pending register, after the engine's schema lost
/// `definition task`: SpiceDB refuses that one relationship.
async fn a_task_the_schema_does_not_define(pool: &PgPool, grpc: &str) {
    common::live_tasks(pool, &["t1".to_string()]).await;
    sqlx::query(
        "INSERT INTO authz_outbox (resource_type, resource_id, parent_type, parent_id, operation, principal)
         VALUES ('task', 't1', 'agent', 'seed-agent', 'register', '{\"user_id\": \"u1\"}')",
    )
    .execute(pool)
    .await
    .expect("task row");
    let schema = agentex_auth_dev::DEFAULT_SCHEMA;
    let start = schema.find("definition task").expect("task in schema");
    let end = start
        + schema[start..]
            .find("definition schedule")
            .expect("schedule");
    common::write_schema(grpc, &format!("{}{}", &schema[..start], &schema[end..])).await;
}

#[sqlx::test(migrations = false)]
async fn a_batch_with_one_relationship_the_schema_rejects_delivers_the_others(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let dev = common::dev_server().await;
    let grpc = dev.grpc_endpoint();
    agent(&pool, "a1").await;
    let mut keys = Vec::new();
    for i in 0..5 {
        keys.push(key(&pool, "a1", &format!("k{i}")).await);
    }
    a_task_the_schema_does_not_define(&pool, &grpc).await;

    dev.reset_stats();
    let report = run_once_spicedb(&pool, &grpc, config("w"), 50).await;
    assert_eq!((report.delivered, report.dead), (6, 1), "{report:?}");
    let all = rows(&pool).await;
    for r in &all {
        let expected = if r.resource_type == "task" {
            "dead"
        } else {
            "delivered"
        };
        assert_eq!(r.state, expected, "{r:?}");
    }
    let task = all
        .iter()
        .find(|r| r.resource_type == "task")
        .expect("task");
    assert_eq!(task.last_status, Some(9), "FAILED_PRECONDITION: {task:?}");
    assert!(
        task.last_error
            .as_deref()
            .is_some_and(|e| e.contains("FAILED_PRECONDITION")),
        "{task:?}"
    );
    for k in &keys {
        assert_eq!(
            relationships_of(&grpc, "api_key", &k.id).await,
            set(&["owner@user:u1", "parent_agent@agent:a1"])
        );
    }
    let stats = dev.stats();
    assert_eq!(
        stats.count(Endpoint::WriteRelationships, "FAILED_PRECONDITION"),
        2,
        "the shared write, then the bad row alone: {stats:?}"
    );
    assert_eq!(
        stats.count(Endpoint::WriteRelationships, "OK"),
        6,
        "the others one by one: {stats:?}"
    );
    dev.shutdown().await;
}

#[sqlx::test(migrations = false)]
async fn rows_of_different_resources_share_one_write(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let dev = common::dev_server().await;
    let grpc = dev.grpc_endpoint();
    agent(&pool, "a1").await;
    for i in 0..15 {
        key(&pool, "a1", &format!("k{i}")).await;
    }
    let report = run_once_spicedb(&pool, &grpc, config("w"), 50).await;
    assert_eq!(report.delivered, 16, "{report:?}");
    let batched = dev.stats().count(Endpoint::WriteRelationships, "OK");
    assert!(
        batched <= 2,
        "16 rows in one claim of 16: one write (two if the claim split): {batched}"
    );
    for i in 15..30 {
        key(&pool, "a1", &format!("k{i}")).await;
    }
    dev.reset_stats();
    let report = run_once_spicedb(&pool, &grpc, config("w"), 1).await;
    assert_eq!(report.delivered, 15, "{report:?}");
    assert_eq!(dev.stats().count(Endpoint::WriteRelationships, "OK"), 15);
    dev.shutdown().await;
}

/// `deregister = "mapped"` deletes only the mapping's relations: a share
/// granted elsewhere survives the delete (the default, "all", is in the
/// first test).
#[sqlx::test(migrations = false)]
async fn a_mapped_deregister_leaves_relationships_the_mapping_does_not_know(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let dev = common::dev_server().await;
    let grpc = dev.grpc_endpoint();
    agent(&pool, "a1").await;
    let k = key(&pool, "a1", "k").await;
    let mappings = "[[mapping]]\ntype = \"api_key\"\ntable = \"agent_api_keys\"\nparent = { type = \"agent\", column = \"agent_id\" }\nrelationships = [\"parent_agent@agent:{agent_id}\"]\nderegister = \"mapped\"";
    worker_with(&pool, &grpc, mappings)
        .run(CancellationToken::new(), true)
        .await;
    common::touch_relationship(&grpc, ("api_key", &k.id), "owner", ("user", "u9")).await;
    assert_eq!(
        relationships_of(&grpc, "api_key", &k.id).await,
        set(&["owner@user:u9", "parent_agent@agent:a1"])
    );
    capture::delete_api_key(&pool, &k.id, None)
        .await
        .expect("delete");
    let report = worker_with(&pool, &grpc, mappings)
        .run(CancellationToken::new(), true)
        .await;
    assert_eq!(report.delivered, 1, "{report:?}");
    assert_eq!(
        relationships_of(&grpc, "api_key", &k.id).await,
        set(&["owner@user:u9"]),
        "only the mapped relation deleted"
    );
    dev.shutdown().await;
}

/// A worker with mappings of the test's own (not the installed ones).
fn worker_with(pool: &PgPool, grpc: &str, mappings: &str) -> Worker {
    let cfg = config("w");
    let client = SpiceDbClient::new(grpc, None, cfg.request_timeout).expect("client");
    let mappings = Mappings::from_toml(mappings).expect("mappings parse");
    let target = SpiceDbTarget::new(client, pool.clone(), &mappings, 50).expect("target");
    Worker::new(pool.clone(), target, cfg).expect("worker")
}

#[sqlx::test(migrations = false)]
async fn each_grpc_code_class_ends_in_the_right_state(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let dev = common::dev_server().await;
    let grpc = dev.grpc_endpoint();
    agent(&pool, "a1").await;
    run_once_spicedb(&pool, &grpc, config("w"), 50).await;

    let faulted = |fault: Fault| Faults {
        hang_ms: 4_000,
        retry_after_secs: 7,
        endpoints: [(Endpoint::WriteRelationships, FaultRates::always(fault))].into(),
        ..Faults::none()
    };
    // (fault, state, last_status as the gRPC code, attempts left counted)
    let cases: &[(&str, Faults, &str, Option<i32>, i32)] = &[
        (
            "unavailable",
            faulted(Fault::Status503),
            "pending",
            Some(14),
            1,
        ),
        (
            "internal",
            faulted(Fault::Status500),
            "pending",
            Some(13),
            1,
        ),
        (
            "exhausted",
            faulted(Fault::RateLimited),
            "pending",
            Some(8),
            1,
        ),
        (
            "unauthenticated",
            Faults {
                unauthorized: true,
                ..Faults::none()
            },
            "pending",
            Some(16),
            0,
        ),
    ];
    // A cap above the server's pushback, so the pushback shows.
    let patient = authz_outbox::config::WorkerConfig {
        backoff_cap: Duration::from_secs(60),
        ..config("w")
    };
    for (name, faults, state, status, attempts) in cases {
        let k = key(&pool, "a1", name).await;
        dev.set_faults(faults.clone());
        let report = run_once_spicedb(&pool, &grpc, patient.clone(), 50).await;
        let r = row(&pool, k.outbox_id).await;
        assert_eq!(r.state, *state, "{name}: {r:?}");
        assert_eq!(r.last_status, *status, "{name}: {r:?}");
        assert_eq!(r.attempts, *attempts, "{name}: {r:?}");
        assert_eq!(
            report.credential_failure,
            *name == "unauthenticated",
            "{name}"
        );
        if *name == "exhausted" {
            let wait: f64 = sqlx::query_scalar(
                "SELECT extract(epoch FROM next_attempt_at - now())::float8 FROM authz_outbox WHERE id = $1",
            )
            .bind(k.outbox_id)
            .fetch_one(&pool)
            .await
            .expect("next attempt");
            assert!(
                wait > 5.0,
                "the server's pushback (7 s) is honoured: {wait}"
            );
        }
        dev.set_faults(Faults::none());
        sqlx::query("UPDATE authz_outbox SET state = 'superseded' WHERE id = $1")
            .bind(k.outbox_id)
            .execute(&pool)
            .await
            .expect("out of the way");
    }

    // A deadline: the server hangs past the request timeout.
    let k = key(&pool, "a1", "hang").await;
    dev.set_faults(faulted(Fault::Hang));
    let cfg = authz_outbox::config::WorkerConfig {
        request_timeout: Duration::from_millis(500),
        ..config("w")
    };
    run_once_spicedb(&pool, &grpc, cfg, 50).await;
    let r = row(&pool, k.outbox_id).await;
    assert_eq!(r.state, "pending", "{r:?}");
    assert!(
        matches!(r.last_status, Some(4) | Some(1)),
        "DEADLINE_EXCEEDED (or the client's CANCELLED): {r:?}"
    );
    dev.set_faults(Faults::none());
    sqlx::query("UPDATE authz_outbox SET state = 'superseded' WHERE id = $1")
        .bind(k.outbox_id)
        .execute(&pool)
        .await
        .expect("out of the way");

    // What the schema refuses is dead, with SpiceDB's message.
    for (name, relationship, status, words) in [
        (
            "wrong-subject",
            "owner@agent:{principal.user_id}",
            3,
            "INVALID_ARGUMENT",
        ),
        (
            "unknown-relation",
            "reader@user:{principal.user_id}",
            9,
            "FAILED_PRECONDITION",
        ),
    ] {
        let k = key(&pool, "a1", name).await;
        let mappings = format!(
            "[[mapping]]\ntype = \"api_key\"\ntable = \"agent_api_keys\"\nparent = {{ type = \"agent\", column = \"agent_id\" }}\nrelationships = [\"{relationship}\"]"
        );
        let report = worker_with(&pool, &grpc, &mappings)
            .run(CancellationToken::new(), true)
            .await;
        assert_eq!(report.dead, 1, "{name}: {report:?}");
        let r = row(&pool, k.outbox_id).await;
        assert_eq!(r.state, "dead", "{name}: {r:?}");
        assert_eq!(r.last_status, Some(status), "{name}: {r:?}");
        assert!(
            r.last_error.as_deref().is_some_and(|e| e.contains(words)),
            "{name}: {r:?}"
        );
    }
    dev.shutdown().await;
}

#[sqlx::test(migrations = false)]
async fn the_command_line_checks_relationships_and_targets(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let dev = common::dev_server().await;
    let grpc = dev.grpc_endpoint();
    let url = common::database_url(&pool).await;
    sqlx::raw_sql("CREATE TABLE documents (id text PRIMARY KEY, owner_id text NOT NULL)")
        .execute(&pool)
        .await
        .expect("table");
    let dir = tempdir();
    let file = dir.join("mappings.toml");
    let write = |relationship: &str| {
        std::fs::write(
            &file,
            format!("[[mapping]]\ntype = \"api_key\"\ntable = \"agent_api_keys\"\nparent = {{ type = \"agent\", column = \"agent_id\" }}\nrelationships = [\"{relationship}\"]\n"),
        )
        .expect("file written");
    };
    // Off the runtime's thread: the dev server answers from this process.
    let run = |args: &[&str]| {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let url = url.clone();
        std::thread::spawn(move || {
            Command::new(BIN)
                .args(&args)
                .env("DATABASE_URL", &url)
                .env_remove("SPICEDB_ENDPOINT")
                .env_remove("AUTHZ_OUTBOX_TARGET")
                .output()
                .expect("binary runs")
        })
    };
    let run = |args: &[&str]| {
        let handle = run(args);
        async move {
            loop {
                if handle.is_finished() {
                    return handle.join().expect("command thread");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let mappings = file.to_str().expect("utf-8 path");
    let check = async |target: &str| {
        let out = run(&[
            "mappings",
            "check",
            "--mappings",
            mappings,
            "--target",
            target,
            "--spicedb-endpoint",
            &grpc,
        ])
        .await;
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    write("api_key:{id}#parent_agent@agent:{agent_id}");
    let (code, stdout, stderr) = check("spicedb").await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("relationships fit the schema"), "{stdout}");
    write("api_key:{id}#reader@user:{principal.user_id}");
    let (code, _, stderr) = check("spicedb").await;
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("definition api_key in the SpiceDB schema has no relation reader"),
        "{stderr}"
    );
    write("api_key:{id}#owner@team:{principal.user_id}");
    let (code, _, stderr) = check("spicedb").await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("no definition team"), "{stderr}");

    // A type agentex-auth does not know: refused for that target only.
    std::fs::write(
        &file,
        "[[mapping]]\ntype = \"document\"\ntable = \"documents\"\nrelationships = [\"owner@user:{owner_id}\"]\n",
    )
    .expect("file written");
    let out = run(&["mappings", "check", "--mappings", mappings]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("unknown resource type \"document\""),
        "{stderr}"
    );
    let out = run(&["migrate", "--mappings", mappings]).await;
    assert_eq!(out.status.code(), Some(2));
    let out = run(&[
        "mappings",
        "check",
        "--mappings",
        mappings,
        "--target",
        "spicedb",
    ])
    .await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // `run --target spicedb` needs an endpoint: one line, exit 2.
    let out = run(&["run", "--once", "--target", "spicedb"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--spicedb-endpoint"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
    dev.shutdown().await;
}

/// A private temporary directory.
fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "authz-outbox-spicedb-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// The quickstart (docs/quickstart-spicedb.md): its script, run as a user
/// would against an empty database and a SpiceDB holding the example's
/// schema, ends in exactly the relationships the mapping file says.
#[sqlx::test(migrations = false)]
async fn the_quickstart_runs(pool: PgPool) {
    let dev = common::dev_server().await;
    let grpc = dev.grpc_endpoint();
    common::write_schema(
        &grpc,
        &std::fs::read_to_string("examples/spicedb-app/schema.zed").expect("schema"),
    )
    .await;
    let url = common::database_url(&pool).await;
    let grpc_for_script = grpc.clone();
    let script = std::thread::spawn(move || {
        Command::new("examples/spicedb-app/quickstart.sh")
            .env("DATABASE_URL", &url)
            .env("SPICEDB_ENDPOINT", &grpc_for_script)
            .env("AUTHZ_OUTBOX", BIN)
            .env("METRICS_ADDR", "127.0.0.1:0")
            .env("RUST_LOG", "warn")
            .output()
            .expect("the script runs")
    });
    while !script.is_finished() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = script.join().expect("script thread");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("delivered=4 "), "{stdout}");
    // Its reconcile step (a failing exit would have failed the script)
    // finds the folders and the documents left consistent.
    // The last reconcile (after the backfill's) prints the last summary.
    let summary = |name: &str| {
        stdout
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix(name).map(|n| n.trim().to_string()))
            .unwrap_or_default()
    };
    assert_eq!(
        (summary("drift "), summary("consistent ")),
        ("0".to_string(), "6".to_string()),
        "{stdout}"
    );
    // The look-in-SpiceDB step: two reads allowed, the deleted one denied.
    let answers: Vec<&str> = stdout
        .lines()
        .filter(|l| *l == "allowed" || *l == "denied")
        .collect();
    assert_eq!(answers, ["allowed", "allowed", "denied"], "{stdout}");
    // Rows from before capture, backfilled with no placeholder owner.
    assert_eq!(
        relationships_of(&grpc, "document", "minutes-2025").await,
        set(&["folder@folder:archive", "owner@user:carol"])
    );
    assert_eq!(
        relationships_of(&grpc, "folder", "archive").await,
        set(&["owner@user:carol"])
    );
    // `creator = []`: nobody was named, on any row, and none went dead.
    let named: i64 =
        sqlx::query_scalar("SELECT count(*) FROM authz_outbox WHERE principal IS NOT NULL")
            .fetch_one(&pool)
            .await
            .expect("principals");
    assert_eq!(named, 0, "no placeholder principal");
    assert_eq!(
        relationships_of(&grpc, "folder", "plans").await,
        set(&["owner@user:alice"])
    );
    assert_eq!(
        relationships_of(&grpc, "folder", "bobs").await,
        set(&["owner@user:bob"])
    );
    assert_eq!(
        relationships_of(&grpc, "document", "notes").await,
        set(&["folder@folder:bobs", "owner@user:bob"]),
        "moved"
    );
    assert!(
        relationships_of(&grpc, "document", "roadmap")
            .await
            .is_empty(),
        "deleted softly"
    );
    let states: Vec<String> = sqlx::query_scalar("SELECT DISTINCT state FROM authz_outbox")
        .fetch_all(&pool)
        .await
        .expect("states");
    assert_eq!(states, ["delivered"]);
    dev.shutdown().await;
}

/// A re-parent writes the new relationships with the deregister before it;
/// a delete right after must still remove them (the register the swap
/// wrote early is never superseded as "created and deleted before
/// delivery"). Found by the chaos run.
#[sqlx::test(migrations = false)]
async fn a_reparent_then_a_delete_leaves_nothing(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let dev = common::dev_server().await;
    let grpc = dev.grpc_endpoint();
    agent(&pool, "a1").await;
    agent(&pool, "a2").await;
    let k = key(&pool, "a1", "k").await;
    run_once_spicedb(&pool, &grpc, config("w"), 50).await;
    as_user(
        &pool,
        "u2",
        "UPDATE agent_api_keys SET agent_id = 'a2' WHERE id = $1",
        &k.id,
    )
    .await;
    capture::delete_api_key(&pool, &k.id, None)
        .await
        .expect("delete");
    let report = run_once_spicedb(&pool, &grpc, config("w"), 50).await;
    // The swap, then the register is superseded (its key row is gone) and
    // the delete is sent: never "created and deleted", both unsent.
    assert_eq!((report.delivered, report.superseded), (2, 1), "{report:?}");
    assert!(
        relationships_of(&grpc, "api_key", &k.id).await.is_empty(),
        "the re-parent's relationships deleted"
    );
    dev.shutdown().await;
}

/// The swap's mark on the register it wrote early survives the register
/// being released unsent (here: the liveness check fails, as it does while
/// PostgreSQL restarts). Cleared, the register looked never attempted and
/// was superseded together with the delete after it, leaving the
/// re-parent's relationships in SpiceDB. Found by the chaos run.
#[sqlx::test(migrations = false)]
async fn a_register_released_after_the_swap_wrote_it_is_still_deleted(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let dev = common::dev_server().await;
    let grpc = dev.grpc_endpoint();
    agent(&pool, "a1").await;
    agent(&pool, "a2").await;
    let k = key(&pool, "a1", "k").await;
    run_once_spicedb(&pool, &grpc, config("w"), 50).await;
    as_user(
        &pool,
        "u2",
        "UPDATE agent_api_keys SET agent_id = 'a2' WHERE id = $1",
        &k.id,
    )
    .await;
    capture::delete_api_key(&pool, &k.id, None)
        .await
        .expect("delete");
    // The liveness check the register needs fails: the swap is delivered,
    // then the register is claimed and released.
    let away =
        "ALTER FUNCTION authz_outbox_resource_live(text, text, text) RENAME TO resource_live_away";
    sqlx::query(away).execute(&pool).await.expect("rename");
    run_once_spicedb(&pool, &grpc, config("w"), 50).await;
    let (state, error): (String, Option<String>) = sqlx::query_as(
        "SELECT state, last_error FROM authz_outbox
         WHERE resource_id = $1 AND operation = 'register' ORDER BY id DESC LIMIT 1",
    )
    .bind(&k.id)
    .fetch_one(&pool)
    .await
    .expect("the re-parent's register");
    assert_eq!(state, "pending", "the register was released, not settled");
    assert!(
        error.is_some_and(|e| e.contains("written early")),
        "the swap's mark survived the release"
    );
    let back =
        "ALTER FUNCTION resource_live_away(text, text, text) RENAME TO authz_outbox_resource_live";
    sqlx::query(back).execute(&pool).await.expect("rename back");
    run_once_spicedb(&pool, &grpc, config("w"), 50).await;
    assert!(
        relationships_of(&grpc, "api_key", &k.id).await.is_empty(),
        "the re-parent's relationships deleted"
    );
    dev.shutdown().await;
}

/// A group's calls together end within one request timeout (the lease is
/// sized for one request): a refused batch whose resends would outlast it
/// is cut off and retried whole, not left writing past the timeout.
#[sqlx::test(migrations = false)]
async fn a_group_never_outlasts_the_request_timeout(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let dev = common::dev_server().await;
    let grpc = dev.grpc_endpoint();
    agent(&pool, "a1").await;
    run_once_spicedb(&pool, &grpc, config("w"), 50).await;
    for i in 0..2 {
        key(&pool, "a1", &format!("k{i}")).await;
    }
    a_task_the_schema_does_not_define(&pool, &grpc).await;
    // Each write takes 300 ms: the shared write and its resends, 1.2 s.
    dev.set_faults(Faults {
        endpoints: [(
            Endpoint::WriteRelationships,
            FaultRates {
                latency_ms: 300,
                ..FaultRates::default()
            },
        )]
        .into(),
        ..Faults::none()
    });
    let cfg = authz_outbox::config::WorkerConfig {
        request_timeout: Duration::from_millis(700),
        ..config("w")
    };
    let started = std::time::Instant::now();
    let report = run_once_spicedb(&pool, &grpc, cfg, 50).await;
    assert_eq!(report.retried, 3, "{report:?}");
    let pending = rows(&pool)
        .await
        .into_iter()
        .filter(|r| r.state == "pending")
        .collect::<Vec<_>>();
    assert_eq!(pending.len(), 3, "{pending:?}");
    assert!(
        pending.iter().all(|r| r.last_status == Some(4)),
        "DEADLINE_EXCEEDED: {pending:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    dev.shutdown().await;
}

/// The quickstart's application (examples/spicedb-app): its tables, its
/// mapping file installed by `migrate`, its schema in the engine.
async fn quickstart_app(pool: PgPool, grpc: &str) -> PgPool {
    let dir = "examples/spicedb-app";
    common::write_schema(
        grpc,
        &std::fs::read_to_string(format!("{dir}/schema.zed")).expect("schema"),
    )
    .await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(
        std::fs::read_to_string(format!("{dir}/app.sql")).expect("app.sql"),
    ))
    .execute(&pool)
    .await
    .expect("the app's tables");
    let mappings =
        Mappings::load(Some(std::path::Path::new(&format!("{dir}/mappings.toml")))).expect("file");
    authz_outbox::migrate::migrate_with(&pool, &mappings, &Default::default())
        .await
        .expect("migrate with the app's mappings");
    pool
}

/// Reconcile now (no grace), judging by `writer`'s relationships.
async fn reconcile_as(
    pool: &PgPool,
    grpc: &str,
    writer: Writer,
    apply: bool,
) -> (ReconcileReport, Vec<Finding>) {
    let options = ReconcileOptions {
        apply,
        grace: Duration::ZERO,
        writer,
        ..ReconcileOptions::default()
    };
    let mut findings = Vec::new();
    let report = reconcile(pool, &SpiceDbConfig::new(grpc), &options, &mut |f| {
        findings.push(f.clone())
    })
    .await
    .expect("reconcile runs");
    (report, findings)
}

fn kinds(findings: &[Finding]) -> BTreeSet<String> {
    findings
        .iter()
        .map(|f| format!("{} {} ({})", f.kind.as_str(), f.resource, f.reason))
        .collect()
}

/// An application that is not agentex gets the agentex path's proof:
/// reconcile judges each type by the relationships its mapping lists (a
/// document's `folder` edge to its parent, its `owner` named by a column),
/// finds every kind of drift in them, and `--apply` heals it through the
/// SpiceDB target.
#[sqlx::test(migrations = false)]
async fn reconcile_judges_an_application_by_its_mappings_relationships(pool: PgPool) {
    let dev = common::dev_server().await;
    let grpc = dev.grpc_endpoint();
    let pool = quickstart_app(pool, &grpc).await;
    for sql in [
        "INSERT INTO folders (id, name, owner_id) VALUES ('plans', 'Plans', $1)",
        "INSERT INTO documents (id, folder_id, owner_id, title) VALUES ('roadmap', 'plans', $1, 'R')",
        "INSERT INTO documents (id, folder_id, owner_id, title) VALUES ('spec', 'plans', $1, 'S')",
    ] {
        as_user(&pool, "alice", sql, "alice").await;
    }
    as_user(
        &pool,
        "alice",
        "INSERT INTO documents (id, folder_id, owner_id, title) VALUES ('notes', 'plans', $1, 'N')",
        "bob",
    )
    .await;
    let report = run_once_spicedb(&pool, &grpc, config("w"), 50).await;
    assert_eq!(report.delivered, 4, "{report:?}");
    // A share granted elsewhere is no drift of a live document.
    common::touch_relationship(&grpc, ("document", "roadmap"), "viewer", ("user", "carol")).await;

    let (report, findings) = reconcile_as(&pool, &grpc, Writer::SpiceDb, false).await;
    assert_eq!(report.summary.drift, 0, "{:#?}", kinds(&findings));
    assert_eq!(report.summary.by_type["document"].consistent, 3);
    assert_eq!(report.summary.by_type["folder"].consistent, 1);
    // Judged by agentex-auth's edges instead, every document lacks its
    // `parent_folder` edge: the writer decides what consistent means.
    let (report, _) = reconcile_as(&pool, &grpc, Writer::AgentexAuth, false).await;
    assert_eq!(report.summary.by_type["document"].missing, 3);

    // Drift behind the outbox's back, one of each kind.
    common::delete_relationship(&grpc, ("document", "spec"), "owner", ("user", "alice")).await;
    common::touch_relationship(&grpc, ("document", "spec"), "owner", ("user", "mallory")).await;
    common::delete_relationship(&grpc, ("document", "notes"), "folder", ("folder", "plans")).await;
    common::touch_relationship(&grpc, ("document", "ghost"), "owner", ("user", "x")).await;
    common::delete_relationship(&grpc, ("folder", "plans"), "owner", ("user", "alice")).await;
    common::touch_relationship(&grpc, ("folder", "plans"), "viewer", ("user", "carol")).await;
    let (report, findings) = reconcile_as(&pool, &grpc, Writer::SpiceDb, true).await;
    assert_eq!(
        kinds(&findings),
        set(&[
            "missing document:notes (parent edge missing)",
            "missing folder:plans (owner@user:alice missing)",
            "orphan document:ghost (relationships in SpiceDB, no live row (deleted, soft-deleted or moved))",
            "subject_mismatch document:spec (SpiceDB holds owner@user:mallory, the row names owner@user:alice)",
        ])
    );
    assert!(report.applied && report.refused.is_none(), "{report:?}");
    assert_eq!(report.summary.subject_mismatch, 1);
    assert_eq!(
        report.enqueued, 5,
        "deregister, deregister + register, two registers"
    );

    let report = run_once_spicedb(&pool, &grpc, config("w"), 50).await;
    assert_eq!(report.delivered, 5, "{report:?}");
    assert_eq!(
        relationships_of(&grpc, "document", "spec").await,
        set(&["folder@folder:plans", "owner@user:alice"])
    );
    assert_eq!(
        relationships_of(&grpc, "document", "notes").await,
        set(&["folder@folder:plans", "owner@user:bob"])
    );
    assert!(
        relationships_of(&grpc, "document", "ghost")
            .await
            .is_empty()
    );
    assert_eq!(
        relationships_of(&grpc, "folder", "plans").await,
        set(&["owner@user:alice", "viewer@user:carol"])
    );
    let (report, findings) = reconcile_as(&pool, &grpc, Writer::SpiceDb, false).await;
    assert_eq!(report.summary.drift, 0, "{:#?}", kinds(&findings));
    dev.shutdown().await;
}

/// With `deregister = "mapped"`, relationships the mapping does not list
/// are someone else's: a resource that holds only those is no orphan to
/// reconcile (its deregister would not remove them, so "healing" it would
/// never end), while with the default scope it is.
#[sqlx::test(migrations = false)]
async fn reconcile_leaves_relationships_a_mapped_deregister_does_not_own(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let dev = common::dev_server().await;
    let grpc = dev.grpc_endpoint();
    let mapped = "[[mapping]]\ntype = \"api_key\"\ntable = \"agent_api_keys\"\nparent = { type = \"agent\", column = \"agent_id\" }\nrelationships = [\"parent_agent@agent:{agent_id}\"]\nderegister = \"mapped\"";
    authz_outbox::migrate::migrate_with(
        &pool,
        &Mappings::from_toml(mapped).expect("mappings"),
        &Default::default(),
    )
    .await
    .expect("migrate");
    agent(&pool, "a1").await;
    let k = key(&pool, "a1", "k").await;
    run_once_spicedb(&pool, &grpc, config("w"), 50).await;
    common::touch_relationship(&grpc, ("api_key", &k.id), "owner", ("user", "u9")).await;
    capture::delete_api_key(&pool, &k.id, None)
        .await
        .expect("delete");
    run_once_spicedb(&pool, &grpc, config("w"), 50).await;
    assert_eq!(
        relationships_of(&grpc, "api_key", &k.id).await,
        set(&["owner@user:u9"])
    );
    let (report, findings) = reconcile_as(&pool, &grpc, Writer::SpiceDb, false).await;
    assert_eq!(
        report.summary.by_type["api_key"].orphan,
        0,
        "{:#?}",
        kinds(&findings)
    );
    let (report, _) = reconcile_as(&pool, &grpc, Writer::AgentexAuth, false).await;
    assert_eq!(report.summary.by_type["api_key"].orphan, 1);
    dev.shutdown().await;
}

/// A batched worker keeps the engine busy: while `concurrency` requests of
/// `--spicedb-batch` rows each are in flight, it has already claimed the
/// next batch (counted in rows, not requests), so no request waits for a
/// claim round trip once one finishes.
#[sqlx::test(migrations = false)]
async fn a_batched_worker_claims_ahead_while_its_requests_are_in_flight(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let dev = common::dev_server().await;
    let grpc = dev.grpc_endpoint();
    agent(&pool, "a1").await;
    run_once_spicedb(&pool, &grpc, config("w"), 5).await;
    for i in 0..40 {
        key(&pool, "a1", &format!("k{i}")).await;
    }
    dev.set_faults(Faults {
        endpoints: [(
            Endpoint::WriteRelationships,
            FaultRates {
                latency_ms: 1500,
                ..FaultRates::default()
            },
        )]
        .into(),
        ..Faults::none()
    });
    // Two requests of five rows in flight, claims of ten.
    let cfg = authz_outbox::config::WorkerConfig {
        concurrency: 2,
        batch_size: 10,
        ..config("w")
    };
    let worker = common::spicedb_worker(&pool, &grpc, cfg, 5).await;
    let run = tokio::spawn(async move { worker.run(CancellationToken::new(), true).await });
    let claimed = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM authz_outbox WHERE state = 'pending' AND locked_by IS NOT NULL",
        )
        .fetch_one(&pool)
        .await
        .expect("count")
    };
    let mut most = 0;
    for _ in 0..50 {
        most = most.max(claimed().await);
        if most >= 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        most, 20,
        "2 requests x 5 rows in flight plus one claim of 10 ahead"
    );
    let report = run.await.expect("worker");
    assert_eq!(report.delivered, 40, "{report:?}");
    dev.shutdown().await;
}

/// A mapping `migrate` installs while a worker runs is delivered by that
/// worker: a row of a type it did not know makes it re-read the installed
/// mappings, instead of going dead until a restart.
#[sqlx::test(migrations = false)]
async fn a_mapping_installed_while_the_worker_runs_is_delivered(pool: PgPool) {
    let dev = common::dev_server().await;
    let grpc = dev.grpc_endpoint();
    let dir = "examples/spicedb-app";
    common::write_schema(
        &grpc,
        &std::fs::read_to_string(format!("{dir}/schema.zed")).expect("schema"),
    )
    .await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(
        std::fs::read_to_string(format!("{dir}/app.sql")).expect("app.sql"),
    ))
    .execute(&pool)
    .await
    .expect("the app's tables");
    let full = std::fs::read_to_string(format!("{dir}/mappings.toml")).expect("file");
    // The file without its documents mapping: folders only, at first.
    let start = full
        .find("[[mapping]]\ntype = \"document\"")
        .expect("documents mapping");
    let end = start + full[start + 1..].find("[[mapping]]").expect("next mapping") + 1;
    let folders_only = format!("{}{}", &full[..start], &full[end..]);
    let first = Mappings::from_toml(&folders_only).expect("folders only");
    assert!(first.iter().all(|m| m.resource_type.as_str() != "document"));
    authz_outbox::migrate::migrate_with(&pool, &first, &Default::default())
        .await
        .expect("migrate");
    let worker = common::spicedb_worker(&pool, &grpc, config("w1"), 1).await;

    let all = Mappings::from_toml(&full).expect("full file");
    authz_outbox::migrate::migrate_with(&pool, &all, &Default::default())
        .await
        .expect("migrate adds documents");
    as_user(
        &pool,
        "u1",
        "INSERT INTO folders (id, name, owner_id) VALUES ('plans', 'Plans', $1)",
        "u1",
    )
    .await;
    as_user(
        &pool,
        "u1",
        "INSERT INTO documents (id, folder_id, owner_id, title) VALUES ('roadmap', 'plans', $1, 'R')",
        "u1",
    )
    .await;
    let report = common::run_worker_once(worker).await;
    assert_eq!(report.dead, 0, "{report:?}: {:?}", rows(&pool).await);
    let held = relationships_of(&grpc, "document", "roadmap").await;
    assert!(held.contains("owner@user:u1"), "{held:?}");
    dev.shutdown().await;
}
