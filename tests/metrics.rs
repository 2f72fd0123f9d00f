//! The metrics endpoint serves the named series, and `deploy/` (alerts,
//! dashboard) uses only names the worker really serves.

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
        body.contains(r#"authz_outbox_deliveries_total{operation="register",outcome="delivered"}"#),
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
