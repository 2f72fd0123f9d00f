//! Fault injection: each kind as configured, reproducible for a seed.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use agentex_auth_dev::{Endpoint, Fault, FaultRates, Faults, Stats};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{TestServer, resource, spawn, spawn_with, user};

fn always(fault: Fault) -> Faults {
    Faults {
        all: FaultRates::always(fault),
        ..Faults::none()
    }
}

fn only(endpoint: Endpoint, rates: FaultRates) -> Faults {
    Faults {
        endpoints: BTreeMap::from([(endpoint, rates)]),
        ..Faults::none()
    }
}

async fn stats_over_http(t: &TestServer) -> Stats {
    let response = t
        .http
        .get(t.url("/_dev/stats"))
        .send()
        .await
        .expect("stats");
    response.json().await.expect("stats json")
}

#[tokio::test]
async fn plain_server_errors_do_nothing() {
    let t = spawn().await;
    let alice = user("alice");
    for (fault, status) in [
        (Fault::Status500, 500),
        (Fault::Status502, 502),
        (Fault::Status503, 503),
    ] {
        t.server.set_faults(always(fault));
        let answer = t.register(&alice, resource("agent", "a1"), None).await;
        assert_eq!(answer.as_u16(), status, "{fault}");
    }
    t.server.set_faults(Faults::none());
    assert_eq!(
        t.check(&alice, resource("agent", "a1"), "read").await,
        StatusCode::FORBIDDEN
    );
    let stats = stats_over_http(&t).await;
    assert_eq!(stats.writes_applied, 0);
    for outcome in ["500", "502", "503"] {
        assert_eq!(
            stats.count(Endpoint::Register, outcome),
            1,
            "{outcome}: {stats:?}"
        );
    }
    t.shutdown().await;
}

#[tokio::test]
async fn applied_then_503_really_applies_the_write() {
    let t = spawn().await;
    let alice = user("alice");
    t.register(&alice, resource("agent", "a1"), None).await;
    t.server.set_faults(only(
        Endpoint::Register,
        FaultRates::always(Fault::AppliedThen503),
    ));
    let (status, body) = t
        .post(
            "/v1/authz/register",
            &json!({"principal": alice, "resource": resource("api_key", "k1"), "parent": resource("agent", "a1")}),
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    // Other endpoints are unaffected, and the write is there.
    assert_eq!(
        t.check(&alice, resource("api_key", "k1"), "read").await,
        StatusCode::OK
    );
    let stats = t.server.stats();
    assert_eq!(stats.count(Endpoint::Register, "applied_then_503"), 1);
    assert_eq!(stats.writes_applied, 2);

    t.server.set_faults(only(
        Endpoint::Deregister,
        FaultRates::always(Fault::AppliedThen503),
    ));
    assert_eq!(
        t.deregister(&alice, resource("api_key", "k1")).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        t.check(&alice, resource("api_key", "k1"), "read").await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(t.server.stats().writes_applied, 3);
    t.shutdown().await;
}

#[tokio::test]
async fn rate_limit_sends_retry_after() {
    let t = spawn_with(Faults {
        retry_after_secs: 7,
        ..always(Fault::RateLimited)
    })
    .await;
    let response = t
        .http
        .post(t.url("/v1/authz/check"))
        .json(&json!({"principal": user("a"), "resource": resource("agent", "a"), "operation": "read"}))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["retry-after"], "7");
    t.shutdown().await;
}

#[tokio::test]
async fn hang_outlasts_the_client_timeout() {
    let t = spawn_with(Faults {
        hang_ms: 400,
        ..always(Fault::Hang)
    })
    .await;
    let body = json!({"principal": user("a"), "resource": resource("agent", "a"), "parent": null});
    let error = t
        .http
        .post(t.url("/v1/authz/register"))
        .timeout(Duration::from_millis(100))
        .json(&body)
        .send()
        .await
        .expect_err("the client gives up");
    assert!(error.is_timeout(), "{error}");
    // A patient client gets a 503 once the hang ends; nothing was written.
    let started = Instant::now();
    assert_eq!(
        t.post("/v1/authz/register", &body).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert!(started.elapsed() >= Duration::from_millis(400));
    let stats = t.server.stats();
    assert_eq!(stats.count(Endpoint::Register, "hang"), 2);
    assert_eq!(stats.writes_applied, 0);
    // Shutdown does not wait for a hang in flight.
    let t2 = spawn_with(always(Fault::Hang)).await; // default hang: 30 s
    let url = t2.url("/v1/authz/register");
    let http = t2.http.clone();
    let in_flight = tokio::spawn(async move { http.post(url).json(&body).send().await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    t2.shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        started.elapsed()
    );
    let _ = in_flight.await;
    t.shutdown().await;
}

#[tokio::test]
async fn latency_is_added() {
    let t = spawn().await;
    t.server.set_faults(Faults {
        all: FaultRates {
            latency_ms: 250,
            ..FaultRates::default()
        },
        ..Faults::none()
    });
    let started = Instant::now();
    assert_eq!(
        t.register(&user("a"), resource("agent", "a"), None).await,
        StatusCode::OK
    );
    assert!(started.elapsed() >= Duration::from_millis(250));
    t.shutdown().await;
}

#[tokio::test]
async fn unauthorized_mode_answers_401_to_everything() {
    let t = spawn_with(Faults {
        unauthorized: true,
        ..Faults::none()
    })
    .await;
    let a = user("a");
    assert_eq!(
        t.register(&a, resource("agent", "a"), None).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        t.deregister(&a, resource("agent", "a")).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        t.check(&a, resource("agent", "a"), "read").await,
        StatusCode::UNAUTHORIZED
    );
    let response = t
        .http
        .post(t.url("/v1/authz/search"))
        .bearer_auth("a-valid-looking-token")
        .json(&json!({"principal": a, "filter_resource": "agent", "filter_operation": "read"}))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(t.server.stats().writes_applied, 0);
    t.shutdown().await;
}

/// Sends the same request sequence and returns the statuses.
async fn statuses(t: &TestServer, n: usize) -> Vec<u16> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let status = if i % 2 == 0 {
            t.register(&user("a"), resource("agent", &format!("a{i}")), None)
                .await
        } else {
            t.check(&user("a"), resource("agent", "a0"), "read").await
        };
        out.push(status.as_u16());
    }
    out
}

#[tokio::test]
async fn same_seed_gives_same_faults_through_the_dev_endpoint() {
    let t = spawn().await;
    let config = json!({
        "seed": 1234,
        "retry_after_secs": 1,
        "all": {"status_500": 0.1, "status_502": 0.1, "status_503": 0.1, "status_429": 0.1, "applied_then_503": 0.1}
    });
    let set = t.post("/_dev/faults", &config).await;
    assert_eq!(set.0, StatusCode::OK, "{}", set.1);
    assert_eq!(set.1["seed"], 1234);
    let first = statuses(&t, 40).await;

    let response = t
        .http
        .get(t.url("/_dev/faults"))
        .send()
        .await
        .expect("get faults");
    let current: Value = response.json().await.expect("json");
    assert_eq!(current["all"]["status_429"], 0.1);
    // Posting what GET returned (it carries the seed) restarts the sequence.
    assert_eq!(t.post("/_dev/faults", &current).await.0, StatusCode::OK);
    let second = statuses(&t, 40).await;
    assert_eq!(first, second);
    for status in [500, 502, 503, 429] {
        assert!(first.contains(&status), "{status} in {first:?}");
    }
    assert!(first.iter().any(|s| *s == 200 || *s == 403), "{first:?}");

    // Another server with the same seed sees the same sequence.
    let other = spawn_with(serde_json::from_value(config).expect("faults")).await;
    assert_eq!(statuses(&other, 40).await, first);
    assert_eq!(
        t.post("/_dev/stats/reset", &json!({})).await.0,
        StatusCode::OK
    );
    assert_eq!(t.server.stats(), Stats::default());
    other.shutdown().await;
    t.shutdown().await;
}

#[tokio::test]
async fn fault_rate_is_roughly_honoured() {
    let t = spawn_with(Faults {
        seed: Some(5),
        endpoints: BTreeMap::from([(Endpoint::Check, FaultRates::server_errors(0.5))]),
        ..Faults::none()
    })
    .await;
    let mut failed = 0;
    for _ in 0..100 {
        if t.check(&user("a"), resource("agent", "a"), "read")
            .await
            .is_server_error()
        {
            failed += 1;
        }
    }
    assert!(
        (30..=70).contains(&failed),
        "{failed} of 100 failed at rate 0.5"
    );
    // Only check was configured.
    assert_eq!(
        t.register(&user("a"), resource("agent", "a"), None).await,
        StatusCode::OK
    );
    t.shutdown().await;
}
