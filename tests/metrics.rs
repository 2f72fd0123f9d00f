//! The metrics endpoint serves the named series (labelled by resource
//! type, present from a fresh worker's first scrape), `deploy/` (alerts,
//! dashboard) uses only names the worker really serves, and `status` shows
//! each resource type.

mod common;

use std::collections::BTreeSet;

use authz_outbox::metrics::ALL;
use common::scripted_auth::{Answer, ScriptedAuth};
use common::{agent, config, key};
use sqlx::PgPool;

fn names_in(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (start, _) in text.match_indices("authz_outbox_") {
        let name: String = text[start..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        names.insert(name);
    }
    names
}

/// The series name without the suffixes Prometheus adds to histograms.
fn base(name: &str) -> &str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .unwrap_or(name)
}

#[sqlx::test(migrations = false)]
async fn metrics_endpoint_serves_every_named_series(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let handle = authz_outbox::metrics::install().expect("recorder");
    let auth = ScriptedAuth::always(Answer::ok()).await;
    agent(&pool, "a1").await;
    key(&pool, "a1", "k").await;
    let worker = common::worker(&pool, &auth.url(), config("w"));
    let app = authz_outbox::http::router(worker.health(), handle);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let cancel = tokio_util::sync::CancellationToken::new();
    tokio::spawn(authz_outbox::http::serve(listener, app, cancel.clone()));
    let report = worker.run(cancel.child_token(), true).await;
    assert_eq!(report.delivered, 2);

    let client = reqwest::Client::new();
    let body = client
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .expect("scrape")
        .text()
        .await
        .expect("body");
    let served: BTreeSet<String> = names_in(&body)
        .iter()
        .map(|n| base(n).to_string())
        .collect();
    for name in ALL {
        assert!(
            served.contains(*name),
            "{name} missing from /metrics:\n{body}"
        );
    }
    assert!(
        body.contains(
            r#"authz_outbox_deliveries_total{operation="register",outcome="delivered",resource_type="api_key"} 1"#
        ),
        "{body}"
    );
    assert!(
        body.contains("authz_outbox_commit_to_delivered_seconds_bucket"),
        "histograms, not summaries"
    );

    let healthz = client
        .get(format!("http://{addr}/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(healthz.status(), 200);
    cancel.cancel();
}

#[test]
fn alerts_and_dashboard_use_only_served_metric_names() {
    let root = env!("CARGO_MANIFEST_DIR");
    for file in [
        "deploy/prometheus/alerts.yaml",
        "deploy/grafana/authz-outbox.json",
    ] {
        let text = std::fs::read_to_string(format!("{root}/{file}")).expect("deploy file");
        let used = names_in(&text);
        assert!(!used.is_empty(), "{file} uses no metric");
        for name in &used {
            assert!(
                ALL.contains(&base(name)),
                "{file} uses {name}, which the worker does not serve"
            );
        }
    }
}

/// A free port on localhost (bound, then released for the child to bind).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Kills the child worker when the test ends, pass or fail.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[sqlx::test(migrations = false)]
async fn a_fresh_worker_serves_every_series_from_its_first_scrape(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let auth = ScriptedAuth::always(Answer::ok()).await;
    let port = free_port();
    let _worker = Child(
        std::process::Command::new(env!("CARGO_BIN_EXE_authz-outbox"))
            .args(["run", "--metrics-addr", &format!("127.0.0.1:{port}")])
            .env("DATABASE_URL", common::database_url(&pool).await)
            .env("AGENTEX_AUTH_URL", auth.url())
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("worker starts"),
    );
    // The first answer the endpoint gives, before any delivery.
    let client = reqwest::Client::new();
    let mut body = None;
    for _ in 0..500 {
        if let Ok(r) = client
            .get(format!("http://127.0.0.1:{port}/metrics"))
            .send()
            .await
        {
            body = Some(r.text().await.expect("body"));
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let body = body.expect("the worker serves /metrics");
    let served: BTreeSet<String> = names_in(&body)
        .iter()
        .map(|n| base(n).to_string())
        .collect();
    for name in ALL {
        assert!(
            served.contains(*name),
            "{name} missing from the first scrape:\n{body}"
        );
    }
    for t in ["agent", "api_key", "task", "schedule"] {
        for op in ["register", "deregister"] {
            for outcome in ["delivered", "retry", "released", "dead", "superseded"] {
                let series = format!(
                    r#"authz_outbox_deliveries_total{{operation="{op}",outcome="{outcome}",resource_type="{t}"}} 0"#
                );
                assert!(body.contains(&series), "{series} missing:\n{body}");
            }
        }
        for series in [
            format!(r#"authz_outbox_dead_rows_total{{resource_type="{t}"}} 0"#),
            format!(r#"authz_outbox_rows{{state="pending",resource_type="{t}"}} 0"#),
            format!(r#"authz_outbox_oldest_pending_age_seconds{{resource_type="{t}"}} 0"#),
        ] {
            assert!(body.contains(&series), "{series} missing:\n{body}");
        }
    }
}

#[sqlx::test(migrations = false)]
async fn status_shows_counts_and_oldest_pending_age_per_type(pool: PgPool) {
    let pool = common::host_db(pool).await;
    agent(&pool, "a1").await;
    key(&pool, "a1", "k").await;
    // The agent's register has waited ten minutes.
    sqlx::query(
        "UPDATE authz_outbox SET created_at = now() - interval '10 minutes'
         WHERE resource_type = 'agent'",
    )
    .execute(&pool)
    .await
    .expect("age the agent row");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_authz-outbox"))
        .args(["status", "--format", "json"])
        .env("DATABASE_URL", common::database_url(&pool).await)
        .output()
        .expect("status runs");
    assert!(out.status.success(), "{out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    // Today's fields stay.
    assert_eq!(json["counts"]["pending"], 2);
    assert!(json["oldest_pending_age_seconds"].as_f64() >= Some(600.0));
    let by_type = &json["by_type"];
    assert_eq!(by_type["agent"]["counts"]["pending"], 1, "{json}");
    assert_eq!(by_type["api_key"]["counts"]["pending"], 1);
    assert_eq!(
        by_type["task"]["counts"]["pending"], 0,
        "installed types are shown at zero"
    );
    assert_eq!(by_type["schedule"]["counts"]["dead"], 0);
    assert!(by_type["agent"]["oldest_pending_age_seconds"].as_f64() >= Some(600.0));
    assert!(by_type["api_key"]["oldest_pending_age_seconds"].as_f64() < Some(600.0));
    assert_eq!(by_type["task"]["oldest_pending_age_seconds"], 0.0);

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_authz-outbox"))
        .args(["status"])
        .env("DATABASE_URL", common::database_url(&pool).await)
        .output()
        .expect("status runs");
    let table = String::from_utf8_lossy(&out.stdout);
    let row = |t: &str| {
        table
            .lines()
            .find(|l| l.split_whitespace().next() == Some(t))
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
    };
    // TYPE PENDING DELIVERED DEAD SUPERSEDED OLDEST
    assert_eq!(row("TYPE").map(|r| r.len()), Some(6), "{table}");
    assert_eq!(
        row("task").map(|r| r[1].to_string()),
        Some("0".into()),
        "{table}"
    );
    assert_eq!(
        row("agent").map(|r| r[1].to_string()),
        Some("1".into()),
        "{table}"
    );
}

/// The gauges refreshed every few seconds count only pending and dead rows
/// (through their partial indexes); the rows kept for `--retention` are
/// counted by the full collection alone, which `status` and the worker's
/// once-a-minute refresh use.
#[sqlx::test(migrations = false)]
async fn the_frequent_refresh_counts_only_pending_and_dead_rows(pool: PgPool) {
    use authz_outbox::outbox::stats::{Scope, collect};
    let pool = common::host_db(pool).await;
    sqlx::raw_sql(
        r#"
        INSERT INTO authz_outbox (resource_type, resource_id, operation, principal, state, finished_at)
        SELECT 'task', 't' || g, 'register', '{"user_id":"u"}', s, CASE WHEN s = 'pending' THEN NULL ELSE now() END
        FROM generate_series(1, 2) g,
             unnest(ARRAY['pending', 'delivered', 'dead', 'superseded', 'delivered']) s;
        "#,
    )
    .execute(&pool)
    .await
    .expect("rows in every state");
    let counts = |c: &std::collections::BTreeMap<String, i64>| {
        c.iter().map(|(k, v)| (k.clone(), *v)).collect::<Vec<_>>()
    };
    let live = collect(&pool, Scope::Live, 0).await.expect("live");
    let expected = vec![("dead".to_string(), 2), ("pending".to_string(), 2)];
    assert_eq!(counts(&live.counts), expected);
    assert_eq!(counts(&live.by_type["task"].counts), expected);
    assert_eq!(
        counts(&live.by_type["agent"].counts),
        vec![("dead".to_string(), 0), ("pending".to_string(), 0)]
    );
    let all = collect(&pool, Scope::All, 0).await.expect("all");
    assert_eq!(
        counts(&all.by_type["task"].counts),
        vec![
            ("dead".to_string(), 2),
            ("delivered".to_string(), 4),
            ("pending".to_string(), 2),
            ("superseded".to_string(), 2)
        ]
    );
}

#[test]
fn the_dashboard_selects_by_resource_type() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/grafana/authz-outbox.json"
    ))
    .expect("dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("variables");
    assert!(
        variables.iter().any(|v| v["name"] == "resource_type"
            && v["definition"]
                .as_str()
                .is_some_and(|d| d.contains("resource_type"))),
        "no resource_type variable"
    );
    // Every query over a series labelled by type honours the selector.
    let labelled = [
        "authz_outbox_rows",
        "authz_outbox_oldest_pending_age_seconds",
        "authz_outbox_deliveries_total",
        "authz_outbox_dead_rows_total",
    ];
    let mut checked = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap_or_default();
            for metric in labelled {
                for (at, _) in expr.match_indices(&format!("{metric}{{")) {
                    let selector = &expr[at..expr[at..].find('}').map_or(expr.len(), |e| at + e)];
                    assert!(
                        selector.contains(r#"resource_type=~"$resource_type""#),
                        "{}: {expr}",
                        panel["title"]
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(checked >= 8, "{checked}");
}

/// Custom SpiceDB types each keep their own `resource_type` label: a
/// worker's first metrics (and every refresh) register the installed
/// mappings' types, so two custom types' gauges do not overwrite each
/// other under `unknown`. Rows of a type no mapping names still share
/// `unknown`, added up.
#[sqlx::test(migrations = false)]
async fn each_installed_custom_type_has_its_own_label(pool: PgPool) {
    let pool = common::host_db(pool).await;
    sqlx::raw_sql(
        "CREATE TABLE wiki_pages (id text PRIMARY KEY, owner_id text NOT NULL);
         CREATE TABLE wiki_spaces (id text PRIMARY KEY, owner_id text NOT NULL);",
    )
    .execute(&pool)
    .await
    .expect("custom tables");
    let mappings = authz_outbox::mapping::Mappings::from_toml(
        "[[mapping]]\ntype = \"wiki_page\"\ntable = \"wiki_pages\"\nrelationships = [\"owner@user:{owner_id}\"]\n\
         [[mapping]]\ntype = \"wiki_space\"\ntable = \"wiki_spaces\"\nrelationships = [\"owner@user:{owner_id}\"]\n",
    )
    .expect("mappings parse");
    authz_outbox::migrate::migrate_with(&pool, &mappings, &Default::default())
        .await
        .expect("custom mappings installed");
    sqlx::raw_sql(
        r#"
        INSERT INTO authz_outbox (resource_type, resource_id, operation, principal)
        SELECT t, t || g, 'register', '{"user_id":"u"}'
        FROM (VALUES ('wiki_page', 3), ('wiki_space', 5), ('stray_alpha', 2), ('stray_beta', 4)) AS v(t, n),
             generate_series(1, n) g;
        "#,
    )
    .execute(&pool)
    .await
    .expect("pending rows");
    let handle = authz_outbox::metrics::install().expect("recorder");
    authz_outbox::metrics::prime(&pool).await.expect("prime");
    let body = handle.render();
    for series in [
        r#"authz_outbox_rows{state="pending",resource_type="wiki_page"} 3"#,
        r#"authz_outbox_rows{state="pending",resource_type="wiki_space"} 5"#,
        r#"authz_outbox_dead_rows_total{resource_type="wiki_page"} 0"#,
        r#"authz_outbox_dead_rows_total{resource_type="wiki_space"} 0"#,
        r#"authz_outbox_rows{state="pending",resource_type="unknown"} 6"#,
    ] {
        assert!(body.contains(series), "{series} missing:\n{body}");
    }
    assert!(!body.contains("stray_"), "{body}");
}
