//! The one test harness: fresh databases come from `#[sqlx::test]` (each test
//! gets its own, migrated with the embedded migrations); this module adds the
//! fixtures and a scripted agentex-auth for exact status-code cases.
#![allow(dead_code)]

pub mod scripted_auth;

use std::time::Duration;

use authz_outbox::auth_client::AuthClient;
use authz_outbox::capture::{self, NewApiKey};
use authz_outbox::config::WorkerConfig;
use authz_outbox::delivery::{RunReport, Worker};
use authz_outbox::domain::{ApiKeyType, Principal};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// A fresh test database shaped like the host's: its tables as its own
/// migrations build them (`tests/fixtures/host_schema.sql`), then
/// authz-outbox's `migrate`, exactly as an operator would run it there.
pub async fn host_db(pool: PgPool) -> PgPool {
    sqlx::raw_sql(HOST_SCHEMA)
        .execute(&pool)
        .await
        .expect("host schema fixture loads");
    authz_outbox::db::migrate(&pool)
        .await
        .expect("authz-outbox migrates the host's database");
    pool
}

/// The host's schema (see the file's header).
pub const HOST_SCHEMA: &str = include_str!("../fixtures/host_schema.sql");

/// Live tasks (each linked to agent `seed-agent`) written with capture
/// switched off, for tests that put their own rows into the outbox and
/// need the worker to find the resource live.
pub async fn live_tasks(pool: &PgPool, ids: &[String]) {
    let mut tx = pool.begin().await.expect("begin");
    sqlx::query("SET LOCAL session_replication_role = replica")
        .execute(&mut *tx)
        .await
        .expect("capture off");
    sqlx::query(
        "INSERT INTO agents (id, name, description, status) VALUES ('seed-agent', 'seed-agent', '', 'READY')
         ON CONFLICT DO NOTHING",
    )
    .execute(&mut *tx)
    .await
    .expect("agent");
    sqlx::query(
        "INSERT INTO tasks (id, name, status) SELECT id, id, 'RUNNING' FROM unnest($1::text[]) AS id;
         ",
    )
    .bind(ids)
    .execute(&mut *tx)
    .await
    .expect("tasks");
    sqlx::query(
        "INSERT INTO task_agents (task_id, agent_id) SELECT id, 'seed-agent' FROM unnest($1::text[]) AS id",
    )
    .bind(ids)
    .execute(&mut *tx)
    .await
    .expect("links");
    tx.commit().await.expect("commit");
}

/// Makes every task the outbox names live (a row in `tasks`, linked to
/// `seed-agent`), written with capture switched off: tests that plant raw
/// task rows to exercise delivery itself need the worker's liveness check
/// (the task mapping) to find them live, or it supersedes them as stale.
pub async fn planted_tasks_live(pool: &PgPool) {
    let ids: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT resource_id FROM authz_outbox o
         WHERE resource_type = 'task' AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.id = o.resource_id)",
    )
    .fetch_all(pool)
    .await
    .expect("planted task ids");
    live_tasks(pool, &ids).await;
}

pub fn principal(user: &str) -> Principal {
    Principal::parse(&format!(r#"{{"user_id":"{user}"}}"#)).expect("valid principal")
}

pub async fn agent(pool: &PgPool, id: &str) {
    capture::create_agent(pool, id, &format!("agent {id}"), Some(&principal("u1")))
        .await
        .expect("agent created");
}

pub async fn key(pool: &PgPool, agent_id: &str, name: &str) -> capture::CreatedApiKey {
    capture::create_api_key(
        pool,
        NewApiKey {
            agent_id: agent_id.into(),
            name: name.into(),
            key_type: ApiKeyType::External,
            secret: Some(format!("secret-{name}")),
        },
        Some(&principal("u1")),
    )
    .await
    .expect("key created")
}

/// One outbox row, as tests look at it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Row {
    pub id: i64,
    pub resource_type: String,
    pub resource_id: String,
    pub parent_id: Option<String>,
    pub operation: String,
    pub state: String,
    pub attempts: i32,
    pub principal: Option<serde_json::Value>,
    pub last_error: Option<String>,
    pub last_status: Option<i32>,
    pub consistency_token: Option<String>,
    pub locked_by: Option<String>,
}

pub async fn rows(pool: &PgPool) -> Vec<Row> {
    sqlx::query_as(
        "SELECT id, resource_type, resource_id, parent_id, operation, state, attempts, principal,
                last_error, last_status, consistency_token, locked_by
         FROM authz_outbox ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .expect("outbox readable")
}

pub async fn row(pool: &PgPool, id: i64) -> Row {
    rows(pool)
        .await
        .into_iter()
        .find(|r| r.id == id)
        .expect("row exists")
}

/// A config for tests: fast backoff, short poll.
pub fn config(worker_id: &str) -> WorkerConfig {
    WorkerConfig {
        worker_id: worker_id.into(),
        concurrency: 8,
        batch_size: 16,
        lease: Duration::from_secs(6),
        request_timeout: Duration::from_secs(2),
        backoff_base: Duration::from_millis(10),
        backoff_cap: Duration::from_millis(100),
        poll_interval: Duration::from_millis(50),
        shutdown_timeout: Duration::from_secs(5),
        ..WorkerConfig::default()
    }
}

pub fn worker(pool: &PgPool, url: &str, config: WorkerConfig) -> Worker {
    let client = AuthClient::new(url, None, config.request_timeout, config.concurrency)
        .expect("client builds");
    Worker::new(pool.clone(), client, config).expect("valid config")
}

/// Longer than any test's `run --once` takes, even on a loaded machine.
pub const RUN_ONCE_LIMIT: Duration = Duration::from_secs(60);

/// `run --once` of `worker`. A run that never ends (it must, once nothing
/// is due) fails the test after [`RUN_ONCE_LIMIT`] instead of hanging the
/// test binary.
pub async fn run_worker_once(worker: Worker) -> RunReport {
    tokio::time::timeout(RUN_ONCE_LIMIT, worker.run(CancellationToken::new(), true))
        .await
        .unwrap_or_else(|_| panic!("run --once did not end within {RUN_ONCE_LIMIT:?}"))
}

/// `run --once`.
pub async fn run_once(pool: &PgPool, url: &str, config: WorkerConfig) -> RunReport {
    run_worker_once(worker(pool, url, config)).await
}

/// Makes every pending row due now (skips the backoff wait in tests).
pub async fn make_due(pool: &PgPool) {
    sqlx::query("UPDATE authz_outbox SET next_attempt_at = now() WHERE state = 'pending'")
        .execute(pool)
        .await
        .expect("update");
}

// ---------------------------------------------------------------------------
// Reconcile and replay helpers: the real SpiceDB behind agentex-auth-dev, and
// drift planted behind the outbox's back.

/// An agentex-auth-dev with its own in-memory SpiceDB. Needs
/// `SPICEDB_LIBRARY_PATH=$(scripts/fetch-spicedb.sh)`.
pub async fn dev_server() -> agentex_auth_dev::DevServer {
    agentex_auth_dev::DevServer::start(agentex_auth_dev::DevServerConfig::ephemeral())
        .await
        .unwrap_or_else(|e| panic!("agentex-auth-dev: {e}"))
}

/// Registers `TYPE:ID` (with an optional parent agent) straight in SpiceDB
/// through agentex-auth-dev, with no outbox row: how orphans and mismatches
/// are planted.
pub async fn plant_register(
    base_url: &str,
    user: &str,
    resource_type: &str,
    id: &str,
    parent_agent: Option<&str>,
) {
    let body = serde_json::json!({
        "principal": {"user_id": user},
        "resource": {"type": resource_type, "selector": id},
        "parent": parent_agent.map(|a| serde_json::json!({"type": "agent", "selector": a})),
    });
    let status = reqwest::Client::new()
        .post(format!("{base_url}/v1/authz/register"))
        .json(&body)
        .send()
        .await
        .expect("register request")
        .status();
    assert_eq!(status, 200, "planting register of {resource_type}:{id}");
}

/// Deletes every relationship of `TYPE:ID` straight in SpiceDB.
pub async fn plant_deregister(base_url: &str, resource_type: &str, id: &str) {
    let body = serde_json::json!({
        "principal": {"user_id": "u1"},
        "resource": {"type": resource_type, "selector": id},
    });
    let status = reqwest::Client::new()
        .post(format!("{base_url}/v1/authz/deregister"))
        .json(&body)
        .send()
        .await
        .expect("deregister request")
        .status();
    assert_eq!(status, 200, "planting deregister of {resource_type}:{id}");
}

/// Runs `sql` with the capture triggers off (as a legacy writer or a restore
/// would): no outbox row is written.
pub async fn uncaptured(pool: &PgPool, sql: &'static str, binds: &[&str]) {
    let mut tx = pool.begin().await.expect("begin");
    sqlx::query("SET LOCAL session_replication_role = replica")
        .execute(&mut *tx)
        .await
        .expect("replica role");
    let mut q = sqlx::query(sql);
    for b in binds {
        q = q.bind(*b);
    }
    q.execute(&mut *tx).await.expect("uncaptured statement");
    tx.commit().await.expect("commit");
}

/// A key row with no outbox row (a legacy key, or one restored from backup).
pub async fn insert_key_uncaptured(pool: &PgPool, id: &str, agent_id: &str) {
    uncaptured(
        pool,
        "INSERT INTO agent_api_keys (id, agent_id, name, api_key_type, api_key)
         VALUES ($1, $2, $1, 'EXTERNAL', 'secret')",
        &[id, agent_id],
    )
    .await;
}

/// Deletes a key row without capturing the deregister.
pub async fn delete_key_uncaptured(pool: &PgPool, id: &str) {
    uncaptured(pool, "DELETE FROM agent_api_keys WHERE id = $1", &[id]).await;
}

/// The URL of the test's own database (for running the binary against it).
pub async fn database_url(pool: &PgPool) -> String {
    let name: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(pool)
        .await
        .expect("database name");
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL is set for sqlx::test");
    let mut url = url::Url::parse(&base).expect("DATABASE_URL is a URL");
    url.set_path(&name);
    url.to_string()
}

/// Waits until a session of this test's database is blocked on a lock (the
/// statement a race test started and wants waiting before it lets go).
pub async fn until_a_session_waits_for_a_lock(pool: &PgPool, what: &str) {
    until(Duration::from_secs(10), what, || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(pool)
        .await
        .expect("activity");
        waiting == 1
    })
    .await;
}

/// The host's schema and authz-outbox's migrations up to `version`: a
/// database as an earlier release left it, for upgrade tests.
pub async fn host_db_at(pool: &PgPool, version: i64) {
    sqlx::raw_sql(HOST_SCHEMA)
        .execute(pool)
        .await
        .expect("host schema");
    authz_outbox::migrate::MIGRATOR
        .run_to(version, pool)
        .await
        .expect("the earlier release's migrations");
}

/// Polls `done` every 10 ms until it holds; panics naming `what` after `limit`.
pub async fn until<F, Fut>(limit: Duration, what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let polled = async {
        while !done().await {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    if tokio::time::timeout(limit, polled).await.is_err() {
        panic!("timed out after {limit:?} waiting for {what}");
    }
}

// ---------------------------------------------------------------------------
// The SpiceDB target: a worker writing straight to the engine behind
// agentex-auth-dev's gRPC port, and an independent read-back.

/// A worker delivering to SpiceDB at `endpoint`, with the mappings
/// installed in the test's database; `batch` rows per WriteRelationships.
pub async fn spicedb_worker(
    pool: &PgPool,
    endpoint: &str,
    config: WorkerConfig,
    batch: usize,
) -> Worker {
    use authz_outbox::delivery::spicedb::SpiceDbTarget;
    use authz_outbox::spicedb_client::SpiceDbClient;
    let client =
        SpiceDbClient::new(endpoint, None, config.request_timeout).expect("SpiceDB client builds");
    let target = SpiceDbTarget::from_database(client, pool.clone(), batch)
        .await
        .expect("installed mappings read");
    Worker::new(pool.clone(), target, config).expect("valid config")
}

/// `run --once --target spicedb`.
pub async fn run_once_spicedb(
    pool: &PgPool,
    endpoint: &str,
    config: WorkerConfig,
    batch: usize,
) -> RunReport {
    run_worker_once(spicedb_worker(pool, endpoint, config, batch).await).await
}

/// Every relationship SpiceDB holds for `TYPE:ID` (the id as stored, i.e.
/// encoded), fully consistent, as `relation@subject_type:subject_id`.
/// Read with a plain client, not the product's.
pub async fn relationships_of(
    endpoint: &str,
    resource_type: &str,
    object_id: &str,
) -> std::collections::BTreeSet<String> {
    use spicedb_grpc_tonic::v1::permissions_service_client::PermissionsServiceClient;
    use spicedb_grpc_tonic::v1::{
        Consistency, ReadRelationshipsRequest, RelationshipFilter, consistency::Requirement,
    };
    let mut client = PermissionsServiceClient::connect(endpoint.to_string())
        .await
        .expect("gRPC connects");
    let mut stream = client
        .read_relationships(ReadRelationshipsRequest {
            consistency: Some(Consistency {
                requirement: Some(Requirement::FullyConsistent(true)),
            }),
            relationship_filter: Some(RelationshipFilter {
                resource_type: resource_type.into(),
                optional_resource_id: object_id.into(),
                ..Default::default()
            }),
            optional_limit: 0,
            optional_cursor: None,
        })
        .await
        .expect("ReadRelationships")
        .into_inner();
    let mut out = std::collections::BTreeSet::new();
    while let Some(item) = stream.message().await.expect("stream reads") {
        let r = item.relationship.expect("relationship");
        let s = r.subject.and_then(|s| s.object).expect("subject");
        out.insert(format!("{}@{}:{}", r.relation, s.object_type, s.object_id));
    }
    out
}

/// Writes relationships straight into SpiceDB (TOUCH), behind the outbox's
/// back: a share granted elsewhere.
pub async fn touch_relationship(
    endpoint: &str,
    resource: (&str, &str),
    relation: &str,
    subject: (&str, &str),
) {
    use spicedb_grpc_tonic::v1::relationship_update::Operation;
    change_relationship(endpoint, Operation::Touch, resource, relation, subject).await;
}

/// Deletes a relationship straight from SpiceDB, behind the outbox's back:
/// drift.
pub async fn delete_relationship(
    endpoint: &str,
    resource: (&str, &str),
    relation: &str,
    subject: (&str, &str),
) {
    use spicedb_grpc_tonic::v1::relationship_update::Operation;
    change_relationship(endpoint, Operation::Delete, resource, relation, subject).await;
}

async fn change_relationship(
    endpoint: &str,
    operation: spicedb_grpc_tonic::v1::relationship_update::Operation,
    resource: (&str, &str),
    relation: &str,
    subject: (&str, &str),
) {
    use spicedb_grpc_tonic::v1::permissions_service_client::PermissionsServiceClient;
    use spicedb_grpc_tonic::v1::{
        ObjectReference, Relationship, RelationshipUpdate, SubjectReference,
        WriteRelationshipsRequest,
    };
    let mut client = PermissionsServiceClient::connect(endpoint.to_string())
        .await
        .expect("gRPC connects");
    client
        .write_relationships(WriteRelationshipsRequest {
            updates: vec![RelationshipUpdate {
                operation: operation as i32,
                relationship: Some(Relationship {
                    resource: Some(ObjectReference {
                        object_type: resource.0.into(),
                        object_id: resource.1.into(),
                    }),
                    relation: relation.into(),
                    subject: Some(SubjectReference {
                        object: Some(ObjectReference {
                            object_type: subject.0.into(),
                            object_id: subject.1.into(),
                        }),
                        optional_relation: String::new(),
                    }),
                    ..Default::default()
                }),
            }],
            ..Default::default()
        })
        .await
        .expect("relationship written behind the outbox's back");
}

/// Replaces the engine's schema through the gRPC port.
pub async fn write_schema(endpoint: &str, schema: &str) {
    use spicedb_grpc_tonic::v1::WriteSchemaRequest;
    use spicedb_grpc_tonic::v1::schema_service_client::SchemaServiceClient;
    SchemaServiceClient::connect(endpoint.to_string())
        .await
        .expect("gRPC connects")
        .write_schema(WriteSchemaRequest {
            schema: schema.into(),
        })
        .await
        .expect("schema written");
}

/// Makes the database refuse every outcome that marks a row delivered (a
/// trigger raising "outcomes refused by the test"), as a revoked grant or a
/// constraint would; `refusals()` counts the refused writes.
pub async fn refuse_delivered_outcomes(pool: &PgPool) {
    sqlx::raw_sql(
        r#"
        CREATE SEQUENCE refusals;
        CREATE FUNCTION refuse_delivered() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          -- A sequence counts the refusals: it survives the rollback.
          PERFORM nextval('refusals');
          RAISE EXCEPTION 'outcomes refused by the test';
        END $$;
        CREATE TRIGGER refuse_delivered BEFORE UPDATE OF state ON authz_outbox
          FOR EACH ROW WHEN (NEW.state = 'delivered') EXECUTE FUNCTION refuse_delivered();
        "#,
    )
    .execute(pool)
    .await
    .expect("refusing trigger");
}

/// How many writes [`refuse_delivered_outcomes`] refused.
pub async fn refusals(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM refusals")
        .fetch_one(pool)
        .await
        .expect("refusals")
}
