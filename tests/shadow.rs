//! The shadow period of the cutover (docs/host-integration.md): the host
//! still calls agentex-auth inline *and* its writes are captured and
//! delivered by the worker. Both paths talk to agentex-auth-dev over the real
//! SpiceDB engine while it injects faults.
//!
//! The host's inline code is played exactly as it stood before the cutover:
//! register before the insert (a failed register aborts the create), delete
//! the row, then deregister once, best effort (a failure is logged and
//! ignored). The double delivery must be harmless: a register is an
//! idempotent TOUCH, a deregister of nothing succeeds. So the run must end
//! with no dead outbox row, and with zero drift once reconcile has removed
//! what only the inline path can leave behind (a register that agentex-auth
//! applied and then answered 503 for, whose create the host aborted: the
//! orphan the outbox was built to stop).

mod common;

use std::collections::HashMap;
use std::time::Duration;

use agentex_auth_dev::{DevServer, DevServerConfig, FaultRates, Faults};
use authz_outbox::capture;
use authz_outbox::domain::{ApiKeyType, Principal};
use authz_outbox::reconcile::{Finding, FindingKind, ReconcileOptions, SpiceDbConfig, reconcile};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

const CREATOR: &str = r#"{"user_id":"shadow-user"}"#;

/// The host's inline agentex-auth calls.
struct Inline {
    http: reqwest::Client,
    base: String,
    calls: u64,
    failures: u64,
}

impl Inline {
    async fn call(&mut self, path: &str, body: Value) -> bool {
        self.calls += 1;
        let ok = match self
            .http
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
        {
            Ok(response) => response.status().is_success(),
            Err(_) => false,
        };
        if !ok {
            self.failures += 1;
        }
        ok
    }

    async fn register(&mut self, kind: &str, id: &str, parent: Option<&str>) -> bool {
        let body = json!({
            "principal": {"user_id": "shadow-user"},
            "resource": {"type": kind, "selector": id},
            "parent": parent.map(|a| json!({"type": "agent", "selector": a})),
        });
        self.call("/v1/authz/register", body).await
    }

    async fn deregister(&mut self, kind: &str, id: &str) -> bool {
        let body = json!({
            "principal": {"user_id": "shadow-user"},
            "resource": {"type": kind, "selector": id},
        });
        self.call("/v1/authz/deregister", body).await
    }
}

fn faults() -> Faults {
    Faults {
        seed: Some(13),
        retry_after_secs: 0,
        all: FaultRates {
            status_500: 0.05,
            status_502: 0.04,
            status_503: 0.05,
            status_429: 0.03,
            applied_then_503: 0.05,
            ..FaultRates::default()
        },
        ..Faults::none()
    }
}

async fn reconcile_run(pool: &PgPool, dev: &DevServer, apply: bool) -> Vec<Finding> {
    let options = ReconcileOptions {
        apply,
        grace: Duration::ZERO,
        ..ReconcileOptions::default()
    };
    let mut findings = Vec::new();
    let report = reconcile(
        pool,
        &SpiceDbConfig::new(dev.grpc_endpoint()),
        &options,
        &mut |f| findings.push(f.clone()),
    )
    .await
    .expect("reconcile runs");
    assert!(report.refused.is_none(), "{report:?}");
    findings
}

async fn until_nothing_pending(pool: &PgPool) {
    common::until(Duration::from_secs(120), "the outbox to drain", || async {
        let pending: i64 =
            sqlx::query_scalar("SELECT count(*) FROM authz_outbox WHERE state = 'pending'")
                .fetch_one(pool)
                .await
                .expect("count");
        pending == 0
    })
    .await;
}

#[sqlx::test(migrations = false)]
async fn inline_calls_and_the_worker_together_end_consistent_under_faults(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let dev = DevServer::start(DevServerConfig {
        faults: faults(),
        ..DevServerConfig::ephemeral()
    })
    .await
    .unwrap_or_else(|e| panic!("agentex-auth-dev: {e}"));
    let mut inline = Inline {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .expect("client"),
        base: dev.base_url(),
        calls: 0,
        failures: 0,
    };
    let stop = CancellationToken::new();
    let worker = tokio::spawn(
        common::worker(&pool, &dev.base_url(), common::config("shadow")).run(stop.clone(), false),
    );
    let creator = Principal::parse(CREATOR).expect("principal");
    let mut rng = StdRng::seed_from_u64(42);

    // Agents, as the host creates them: register inline first, then the row.
    let mut agents = Vec::new();
    for i in 0..8 {
        let id = format!("agent-{i}");
        if !inline.register("agent", &id, None).await {
            continue; // fail-closed: the create is aborted
        }
        capture::create_agent(&pool, &id, &id, Some(&creator))
            .await
            .expect("agent row");
        agents.push(id);
    }
    assert!(agents.len() >= 4, "enough agents survived the faults");

    // Keys: creates, deletes by id and by (agent, name, type), interleaved.
    let mut live: HashMap<String, (String, String)> = HashMap::new();
    for n in 0..160 {
        let roll = rng.random_range(0..10);
        if roll < 6 || live.is_empty() {
            let agent = agents[rng.random_range(0..agents.len())].clone();
            let id = uuid::Uuid::new_v4().to_string();
            if !inline.register("api_key", &id, Some(&agent)).await {
                continue;
            }
            let mut tx = pool.begin().await.expect("begin");
            sqlx::query("SELECT set_config('authz_outbox.principal', $1, true)")
                .bind(CREATOR)
                .execute(&mut *tx)
                .await
                .expect("principal");
            sqlx::query(
                "INSERT INTO agent_api_keys (id, agent_id, name, api_key_type, api_key)
                 VALUES ($1, $2, $3, 'EXTERNAL', 'secret')",
            )
            .bind(&id)
            .bind(&agent)
            .bind(format!("key-{n}"))
            .execute(&mut *tx)
            .await
            .expect("key row");
            tx.commit().await.expect("commit");
            live.insert(id, (agent, format!("key-{n}")));
        } else {
            let id = live.keys().nth(rng.random_range(0..live.len())).cloned();
            let Some(id) = id else { continue };
            let (agent, name) = live.remove(&id).expect("live key");
            if roll < 8 {
                capture::delete_api_key(&pool, &id, Some(&creator))
                    .await
                    .expect("delete by id");
            } else {
                capture::delete_api_key_by_name(
                    &pool,
                    &agent,
                    &name,
                    ApiKeyType::External,
                    Some(&creator),
                )
                .await
                .expect("delete by name");
            }
            // Best effort, once; a failure only logs "entry may be orphaned".
            inline.deregister("api_key", &id).await;
        }
    }
    // One agent goes, its keys by cascade: the host deregisters the agent
    // inline, never its keys; only the captured deregisters reach those.
    let gone = agents[0].clone();
    sqlx::query("DELETE FROM agents WHERE id = $1")
        .bind(&gone)
        .execute(&pool)
        .await
        .expect("agent delete");
    inline.deregister("agent", &gone).await;
    live.retain(|_, (agent, _)| *agent != gone);

    until_nothing_pending(&pool).await;
    assert!(
        inline.failures > 0,
        "faults reached the inline path too ({} calls)",
        inline.calls
    );
    let injected = dev.stats();
    eprintln!(
        "inline calls {} ({} failed); agentex-auth-dev stats {injected:?}",
        inline.calls, inline.failures
    );

    // What the inline path alone can leave: orphans of aborted creates.
    let findings = reconcile_run(&pool, &dev, true).await;
    eprintln!(
        "first reconcile: {} orphans of the inline path",
        findings.len()
    );
    for f in &findings {
        assert_eq!(
            f.kind,
            FindingKind::Orphan,
            "the worker left nothing missing: {f:?}"
        );
        let id = f.resource.split_once(':').map(|(_, id)| id).unwrap_or("");
        assert!(
            !live.contains_key(id) && !agents[1..].iter().any(|a| a == id),
            "an orphan is never a live resource: {f:?}"
        );
    }
    until_nothing_pending(&pool).await;
    let after = reconcile_run(&pool, &dev, false).await;
    assert!(after.is_empty(), "zero drift: {after:#?}");

    let dead: Vec<(i64, String, Option<String>)> = sqlx::query_as(
        "SELECT id, resource_type || ':' || resource_id, last_error
         FROM authz_outbox WHERE state = 'dead'",
    )
    .fetch_all(&pool)
    .await
    .expect("dead rows");
    assert!(
        dead.is_empty(),
        "no row died of the double delivery: {dead:?}"
    );
    let delivered: i64 =
        sqlx::query_scalar("SELECT count(*) FROM authz_outbox WHERE state = 'delivered'")
            .fetch_one(&pool)
            .await
            .expect("count");
    assert!(
        delivered > 100,
        "the worker delivered alongside ({delivered})"
    );

    stop.cancel();
    worker.await.expect("worker stops");
    dev.shutdown().await;
}
