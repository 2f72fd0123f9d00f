//! Reconcile verifies owners: who each resource was registered as is kept
//! (`authz_outbox_owners`) after retention prunes its outbox rows, and
//! reconcile compares it with the owner edges SpiceDB holds — agentex-auth's
//! `owner`, or a SpiceDB mapping's `{principal.*}` subjects. Against the real
//! SpiceDB engine (agentex-auth-dev) and a real PostgreSQL; needs
//! `SPICEDB_LIBRARY_PATH=$(scripts/fetch-spicedb.sh)`.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use agentex_auth_dev::DevServer;
use authz_outbox::capture;
use authz_outbox::domain::{Operation, ResourceRef};
use authz_outbox::outbox::enqueue::{NewRow, enqueue};
use authz_outbox::outbox::prune::prune;
use authz_outbox::reconcile::{
    Finding, FindingKind, ReconcileOptions, ReconcileReport, SpiceDbConfig, Writer, reconcile,
};
use common::{agent, dev_server, key, plant_register, relationships_of};
use serde_json::{Value, json};
use sqlx::PgPool;

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// `TYPE:ID` → the principals it is registered as, oldest first, with where
/// each came from.
async fn registry(pool: &PgPool) -> Vec<(String, Value, Option<String>)> {
    sqlx::query_as(
        "SELECT resource_type || ':' || resource_id, principal, principal_source
         FROM authz_outbox_owners ORDER BY resource_type, resource_id, outbox_id",
    )
    .fetch_all(pool)
    .await
    .expect("registry readable")
}

async fn pending(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM authz_outbox WHERE state = 'pending'")
        .fetch_one(pool)
        .await
        .expect("count")
}

/// Delivers until nothing is pending, to `writer`'s target.
async fn deliver_all(pool: &PgPool, dev: &DevServer, writer: Writer) {
    for _ in 0..50 {
        let config = common::config("w");
        match writer {
            Writer::AgentexAuth => common::run_once(pool, &dev.base_url(), config).await,
            Writer::SpiceDb => {
                common::run_once_spicedb(pool, &dev.grpc_endpoint(), config, 50).await
            }
        };
        if pending(pool).await == 0 {
            return;
        }
        common::make_due(pool).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("outbox did not drain");
}

/// Retention of zero: every finished row goes.
async fn prune_everything(pool: &PgPool) {
    let pruned = prune(pool, Duration::ZERO, 10_000).await.expect("prune");
    assert!(pruned > 0);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM authz_outbox")
        .fetch_one(pool)
        .await
        .expect("count");
    assert_eq!(left, 0, "the outbox keeps nothing of these resources");
}

async fn check(
    pool: &PgPool,
    dev: &DevServer,
    writer: Writer,
    apply: bool,
) -> (ReconcileReport, Vec<Finding>) {
    let options = ReconcileOptions {
        apply,
        grace: Duration::ZERO,
        writer,
        ..ReconcileOptions::default()
    };
    let mut spicedb = SpiceDbConfig::new(dev.grpc_endpoint());
    spicedb.page_size = 2;
    let mut findings = Vec::new();
    let report = reconcile(pool, &spicedb, &options, &mut |f| findings.push(f.clone()))
        .await
        .expect("reconcile runs");
    (report, findings)
}

fn described(findings: &[Finding]) -> BTreeSet<String> {
    findings
        .iter()
        .map(|f| format!("{} {} ({})", f.kind.as_str(), f.resource, f.reason))
        .collect()
}

#[sqlx::test(migrations = false)]
async fn delivery_records_who_each_resource_is_registered_as_and_pruning_keeps_it(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let dev = dev_server().await;
    agent(&pool, "a1").await;
    let k1 = key(&pool, "a1", "k1").await;
    let k2 = key(&pool, "a1", "k2").await;
    // Nothing is recorded before delivery.
    assert!(registry(&pool).await.is_empty());
    deliver_all(&pool, &dev, Writer::AgentexAuth).await;
    let u1 = json!({"user_id": "u1"});
    let setting = Some("setting".to_string());
    let mut expected = vec![
        ("agent:a1".to_string(), u1.clone(), setting.clone()),
        (format!("api_key:{}", k1.id), u1.clone(), setting.clone()),
        (format!("api_key:{}", k2.id), u1.clone(), setting.clone()),
    ];
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(registry(&pool).await, expected);

    prune_everything(&pool).await;
    assert_eq!(registry(&pool).await.len(), 3, "pruning keeps the registry");

    // A delivered deregister forgets the resource; a key created and deleted
    // before delivery (both rows superseded) never reached SpiceDB.
    capture::delete_api_key(&pool, &k1.id, Some(&common::principal("u2")))
        .await
        .expect("delete");
    let k3 = key(&pool, "a1", "k3").await;
    capture::delete_api_key(&pool, &k3.id, Some(&common::principal("u2")))
        .await
        .expect("delete");
    deliver_all(&pool, &dev, Writer::AgentexAuth).await;
    let superseded: i64 =
        sqlx::query_scalar("SELECT count(*) FROM authz_outbox WHERE state = 'superseded'")
            .fetch_one(&pool)
            .await
            .expect("count");
    assert_eq!(superseded, 2);
    assert_eq!(
        registry(&pool).await,
        vec![
            ("agent:a1".into(), u1.clone(), setting.clone()),
            (format!("api_key:{}", k2.id), u1.clone(), setting.clone()),
        ]
    );
    dev.shutdown().await;
}

/// Plants, behind the outbox's back, an extra owner on `extra` and a
/// replaced owner on `replaced` (both registered as u1 through the outbox),
/// removes the owner of agent `a2` entirely, and one of agent `a3`'s two
/// registered owners.
async fn plant_owner_drift(dev: &DevServer, writer: Writer, extra: &str, replaced: &str) {
    let grpc = dev.grpc_endpoint();
    match writer {
        // Another writer registering the key as someone else, as an inline
        // call of the shadow period would.
        Writer::AgentexAuth => {
            plant_register(&dev.base_url(), "u9", "api_key", extra, Some("a1")).await
        }
        Writer::SpiceDb => {
            common::touch_relationship(&grpc, ("api_key", extra), "owner", ("user", "u9")).await
        }
    }
    common::delete_relationship(&grpc, ("api_key", replaced), "owner", ("user", "u1")).await;
    common::touch_relationship(&grpc, ("api_key", replaced), "owner", ("user", "u8")).await;
    common::delete_relationship(&grpc, ("agent", "a2"), "owner", ("user", "u1")).await;
    common::delete_relationship(&grpc, ("agent", "a3"), "owner", ("user", "u2")).await;
}

/// The proof of issue 21, item 6, on one target: an extra owner and a
/// missing owner, after the resources' outbox rows were pruned, are
/// reported as `owner_mismatch` and healed by `--apply` through the outbox.
async fn reports_and_heals_owner_drift_after_pruning(pool: PgPool, writer: Writer) {
    let pool = common::host_db(pool).await;
    let dev = dev_server().await;
    let grpc = dev.grpc_endpoint();
    agent(&pool, "a1").await;
    agent(&pool, "a2").await;
    agent(&pool, "a3").await;
    let extra = key(&pool, "a1", "extra").await.id;
    let replaced = key(&pool, "a1", "replaced").await.id;
    // Enough untouched keys that healing two is not "most of SpiceDB".
    for name in ["kept1", "kept2", "kept3"] {
        key(&pool, "a1", name).await;
    }
    deliver_all(&pool, &dev, writer).await;
    // a3 registered a second time, as u2, with no deregister between (as a
    // `reconcile --owner-principal` register or a replay does): SpiceDB
    // holds both owners, and both are on record.
    let mut tx = pool.begin().await.expect("begin");
    enqueue(
        &mut tx,
        &[NewRow {
            operation: Operation::Register,
            resource: ResourceRef::new("agent", "a3").expect("resource"),
            parent: None,
            principal: Some(common::principal("u2")),
            guarded: false,
            attributes: None,
        }],
        "replay",
    )
    .await
    .expect("enqueued");
    tx.commit().await.expect("commit");
    deliver_all(&pool, &dev, writer).await;
    assert_eq!(
        relationships_of(&grpc, "agent", "a3").await,
        set(&["owner@user:u1", "owner@user:u2"])
    );
    prune_everything(&pool).await;
    let (report, findings) = check(&pool, &dev, writer, false).await;
    assert_eq!(report.summary.drift, 0, "{:#?}", described(&findings));

    plant_owner_drift(&dev, writer, &extra, &replaced).await;
    let (report, findings) = check(&pool, &dev, writer, false).await;
    assert_eq!(
        described(&findings),
        set(&[
            &format!(
                "owner_mismatch api_key:{extra} (SpiceDB holds owner@user:u9, never registered \
                 through the outbox (registered: owner@user:u1))"
            ),
            &format!(
                "owner_mismatch api_key:{replaced} (SpiceDB holds owner@user:u8, never registered \
                 through the outbox; registered owner@user:u1 not in SpiceDB)"
            ),
            "owner_mismatch agent:a3 (registered owner@user:u2 not in SpiceDB (SpiceDB holds: \
             owner@user:u1))",
            // No owner edge at all is `missing`, as before; its creator is
            // still known although its rows are gone.
            "missing agent:a2 (live row, no relationships in SpiceDB)",
        ])
    );
    // A host that shares through agentex-auth's grant endpoint: an owner
    // edge beyond the registered ones is not drift there; a registered
    // owner SpiceDB lacks still is.
    let lenient = ReconcileOptions {
        grace: Duration::ZERO,
        writer,
        ignore_extra_owners: true,
        ..ReconcileOptions::default()
    };
    let mut lenient_findings = Vec::new();
    reconcile(
        &pool,
        &SpiceDbConfig::new(dev.grpc_endpoint()),
        &lenient,
        &mut |f| lenient_findings.push(f.clone()),
    )
    .await
    .expect("reconcile runs");
    let judged: BTreeSet<String> = lenient_findings
        .iter()
        .map(|f| format!("{} {}", f.kind.as_str(), f.resource))
        .collect();
    assert_eq!(
        judged,
        set(&[
            &format!("owner_mismatch api_key:{replaced}"),
            "owner_mismatch agent:a3",
            "missing agent:a2",
        ]),
        "the extra owner on {extra} is not drift with --ignore-extra-owners"
    );
    let s = &report.summary;
    assert_eq!(
        (s.owner_mismatch, s.missing, s.needs_owner, s.drift),
        (3, 1, 0, 4)
    );
    assert_eq!(s.by_type["api_key"].owner_mismatch, 2);
    assert_eq!(s.by_type["api_key"].consistent, 3);
    assert_eq!(report.exit_code(), 1);
    assert!(
        findings
            .iter()
            .filter(|f| f.kind == FindingKind::OwnerMismatch)
            .all(|f| f.fix == "deregister + register" && !f.enqueued)
    );

    let (report, findings) = check(&pool, &dev, writer, true).await;
    assert!(report.applied, "{report:?}");
    assert_eq!(report.enqueued, 8, "{:#?}", described(&findings));
    let rows: Vec<(String, String, Value, bool, Option<String>)> = sqlx::query_as(
        "SELECT resource_type || ':' || resource_id, operation, principal, guarded, principal_source
         FROM authz_outbox WHERE origin = 'reconcile' ORDER BY id",
    )
    .fetch_all(&pool)
    .await
    .expect("rows");
    let u1 = json!({"user_id": "u1"});
    let from_reconcile = Some("reconcile".to_string());
    let of = |resource: &str| -> Vec<(String, Value, bool, Option<String>)> {
        rows.iter()
            .filter(|r| r.0 == resource)
            .map(|r| (r.1.clone(), r.2.clone(), r.3, r.4.clone()))
            .collect()
    };
    for resource in [format!("api_key:{extra}"), format!("api_key:{replaced}")] {
        assert_eq!(
            of(&resource),
            vec![
                (
                    "deregister".into(),
                    u1.clone(),
                    false,
                    from_reconcile.clone()
                ),
                ("register".into(), u1.clone(), false, from_reconcile.clone()),
            ],
            "sent as the registered owner, not the one SpiceDB holds"
        );
    }
    assert_eq!(
        of("agent:a2"),
        vec![("register".into(), u1.clone(), false, from_reconcile.clone())]
    );
    assert_eq!(
        of("agent:a3"),
        vec![
            (
                "deregister".into(),
                json!({"user_id": "u2"}),
                false,
                from_reconcile.clone()
            ),
            ("register".into(), u1.clone(), false, from_reconcile.clone()),
            (
                "register".into(),
                json!({"user_id": "u2"}),
                false,
                from_reconcile.clone()
            ),
        ],
        "every registered owner again, oldest first"
    );

    deliver_all(&pool, &dev, writer).await;
    for id in [&extra, &replaced] {
        assert_eq!(
            relationships_of(&grpc, "api_key", id).await,
            set(&["owner@user:u1", "parent_agent@agent:a1"]),
            "{id}"
        );
    }
    assert_eq!(
        relationships_of(&grpc, "agent", "a2").await,
        set(&["owner@user:u1"])
    );
    assert_eq!(
        relationships_of(&grpc, "agent", "a3").await,
        set(&["owner@user:u1", "owner@user:u2"])
    );
    let (report, findings) = check(&pool, &dev, writer, false).await;
    assert_eq!(report.summary.drift, 0, "{:#?}", described(&findings));
    assert_eq!(report.exit_code(), 0);
    dev.shutdown().await;
}

#[sqlx::test(migrations = false)]
async fn owner_drift_after_pruning_is_reported_and_healed_through_agentex_auth(pool: PgPool) {
    reports_and_heals_owner_drift_after_pruning(pool, Writer::AgentexAuth).await;
}

#[sqlx::test(migrations = false)]
async fn owner_drift_after_pruning_is_reported_and_healed_through_the_spicedb_target(pool: PgPool) {
    reports_and_heals_owner_drift_after_pruning(pool, Writer::SpiceDb).await;
}

/// The mis-wired shadow period: the host registers inline as the user, but
/// its captured writes carry the role default (the setting was never set
/// where the host learns who is writing). Each resource then has an owner
/// the outbox never registered.
#[sqlx::test(migrations = false)]
async fn a_mis_wired_shadow_period_shows_as_owner_mismatch(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let dev = dev_server().await;
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
    .expect("role default");
    // The host's connections, opened after the default was set.
    let host = sqlx::pool::PoolOptions::<sqlx::Postgres>::new()
        .max_connections(1)
        .connect_with((*pool.connect_options()).clone())
        .await
        .expect("connect");
    for id in ["a1", "a2"] {
        plant_register(&dev.base_url(), "u1", "agent", id, None).await;
        sqlx::query(
            "INSERT INTO agents (id, name, description, status) VALUES ($1, $1, '', 'READY')",
        )
        .bind(id)
        .execute(&host)
        .await
        .expect("agent row");
    }
    deliver_all(&pool, &dev, Writer::AgentexAuth).await;
    let sources: Vec<(String, Value, Option<String>)> = registry(&pool).await;
    assert!(
        sources
            .iter()
            .all(|(_, p, s)| *p == json!({"service_account_id": "sa-host"})
                && s.as_deref() == Some("role_default")),
        "{sources:?}"
    );
    let (report, findings) = check(&pool, &dev, Writer::AgentexAuth, false).await;
    assert_eq!(
        described(&findings),
        set(&[
            "owner_mismatch agent:a1 (SpiceDB holds owner@user:u1, never registered through the \
             outbox (registered: owner@service_account:sa-host))",
            "owner_mismatch agent:a2 (SpiceDB holds owner@user:u1, never registered through the \
             outbox (registered: owner@service_account:sa-host))",
        ])
    );
    assert_eq!(report.exit_code(), 1);
    host.close().await;
    dev.shutdown().await;
}

/// A resource registered as two principals with no deregister between them
/// (two rows of one key id, a replay) has both owner edges in SpiceDB:
/// both are recorded, and both are expected.
#[sqlx::test(migrations = false)]
async fn every_principal_registered_since_the_last_deregister_is_an_owner(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let dev = dev_server().await;
    agent(&pool, "a1").await;
    agent(&pool, "a2").await;
    let k = key(&pool, "a1", "k").await;
    deliver_all(&pool, &dev, Writer::AgentexAuth).await;
    // The same key id under a second agent, written by another user.
    let mut tx = pool.begin().await.expect("begin");
    capture::set_principal(&mut tx, Some(&common::principal("u2")))
        .await
        .expect("principal");
    sqlx::query(
        "INSERT INTO agent_api_keys (id, agent_id, name, api_key_type, api_key)
         VALUES ($1, 'a2', 'k', 'EXTERNAL', 'secret')",
    )
    .bind(&k.id)
    .execute(&mut *tx)
    .await
    .expect("second row");
    tx.commit().await.expect("commit");
    deliver_all(&pool, &dev, Writer::AgentexAuth).await;
    let resource = format!("api_key:{}", k.id);
    let owners: Vec<Value> = registry(&pool)
        .await
        .into_iter()
        .filter(|r| r.0 == resource)
        .map(|r| r.1)
        .collect();
    assert_eq!(
        owners,
        vec![json!({"user_id": "u1"}), json!({"user_id": "u2"})]
    );
    let (_, findings) = check(&pool, &dev, Writer::AgentexAuth, false).await;
    assert!(
        findings.iter().all(|f| f.resource != resource),
        "{:#?}",
        described(&findings)
    );
    dev.shutdown().await;
}

/// `migrate` on an install with history: the registry is filled from the
/// delivered rows still present — every principal registered after the
/// resource's last delivered deregister; rows that never reached SpiceDB
/// count for nothing.
#[sqlx::test(migrations = false)]
async fn the_migration_backfills_the_registry_from_delivered_rows(pool: PgPool) {
    let pool = common::host_db(pool).await;
    sqlx::raw_sql(
        r#"
        TRUNCATE authz_outbox_owners;
        INSERT INTO authz_outbox (resource_type, resource_id, operation, principal, state,
                                  delivered_at, finished_at, principal_source) VALUES
          ('api_key', 'k1', 'register',   '{"user_id":"u1"}', 'delivered', now(), now(), 'setting'),
          ('api_key', 'k2', 'register',   '{"user_id":"u1"}', 'delivered', now(), now(), NULL),
          ('api_key', 'k2', 'deregister', '{"user_id":"u1"}', 'delivered', now(), now(), NULL),
          ('api_key', 'k3', 'register',   '{"user_id":"u1"}', 'delivered', now(), now(), NULL),
          ('api_key', 'k3', 'deregister', '{"user_id":"u1"}', 'delivered', now(), now(), NULL),
          ('api_key', 'k3', 'register',   '{"user_id":"u2"}', 'delivered', now(), now(), NULL),
          ('api_key', 'k3', 'register',   '{"user_id":"u3"}', 'delivered', now(), now(), NULL),
          ('api_key', 'k3', 'register',   '{"user_id":"u2"}', 'delivered', now(), now(), 'replay'),
          ('api_key', 'k4', 'register',   '{"user_id":"u1"}', 'superseded', NULL, now(), NULL),
          ('api_key', 'k5', 'register',   '{"user_id":"u1"}', 'dead', NULL, now(), NULL),
          ('api_key', 'k6', 'register',   '{"user_id":"u1"}', 'pending', NULL, NULL, NULL);
        "#,
    )
    .execute(&pool)
    .await
    .expect("history");
    assert!(
        registry(&pool).await.is_empty(),
        "inserted rows fire nothing"
    );
    sqlx::raw_sql(include_str!(
        "../migrations/20261205000003_owners_backfill.sql"
    ))
    .execute(&pool)
    .await
    .expect("the backfill runs again");
    assert_eq!(
        registry(&pool).await,
        vec![
            (
                "api_key:k1".into(),
                json!({"user_id": "u1"}),
                Some("setting".into())
            ),
            ("api_key:k3".into(), json!({"user_id": "u3"}), None),
            (
                "api_key:k3".into(),
                json!({"user_id": "u2"}),
                Some("replay".into())
            ),
        ]
    );
}

/// A principal's id is written to SpiceDB as it is (agentex-auth and the
/// SpiceDB target alike), so an owner edge is compared as read: an id that
/// happens to look like the selector encoding (`team=3Aa`, which would
/// decode to `team:a`) is no mismatch.
#[sqlx::test(migrations = false)]
async fn an_owner_id_is_compared_as_written_never_decoded(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let dev = dev_server().await;
    capture::create_agent(&pool, "a1", "a1", Some(&common::principal("team=3Aa")))
        .await
        .expect("agent created");
    deliver_all(&pool, &dev, Writer::AgentexAuth).await;
    assert_eq!(
        relationships_of(&dev.grpc_endpoint(), "agent", "a1").await,
        set(&["owner@user:team=3Aa"])
    );
    let (report, findings) = check(&pool, &dev, Writer::AgentexAuth, false).await;
    assert_eq!(report.summary.drift, 0, "{:#?}", described(&findings));
    assert_eq!(report.summary.consistent, 1);
    dev.shutdown().await;
}

/// One statement may deliver several rows of a resource (a hand-written
/// UPDATE; the worker never does, since a resource's rows are claimed one
/// at a time): they count in their order, and the same principal twice is
/// one owner.
#[sqlx::test(migrations = false)]
async fn one_statement_delivering_several_rows_of_a_resource_counts_them_in_order(pool: PgPool) {
    let pool = common::host_db(pool).await;
    sqlx::raw_sql(
        r#"
        INSERT INTO authz_outbox (resource_type, resource_id, operation, principal) VALUES
          ('agent', 'gone', 'register',   '{"user_id":"u1"}'),
          ('agent', 'gone', 'deregister', '{"user_id":"u1"}'),
          ('agent', 'back', 'deregister', '{"user_id":"u1"}'),
          ('agent', 'back', 'register',   '{"user_id":"u2"}'),
          ('agent', 'twice', 'register',  '{"user_id":"u3"}'),
          ('agent', 'twice', 'register',  '{"user_id":"u3"}');
        UPDATE authz_outbox SET state = 'delivered', delivered_at = now(), finished_at = now();
        "#,
    )
    .execute(&pool)
    .await
    .expect("delivered by hand");
    assert_eq!(
        registry(&pool).await,
        vec![
            ("agent:back".into(), json!({"user_id": "u2"}), None),
            ("agent:twice".into(), json!({"user_id": "u3"}), None),
        ]
    );
}
