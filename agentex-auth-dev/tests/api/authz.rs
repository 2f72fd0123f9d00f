//! The agentex-auth contract against the real engine.

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{resource, spawn, user};

#[tokio::test]
async fn key_is_readable_by_its_owner_only_once_its_agent_is_readable() {
    let t = spawn().await;
    let alice = user("alice");
    let bob = user("bob");
    let key = || resource("api_key", "key-1");

    assert_eq!(
        t.register(&alice, key(), Some(resource("agent", "agent-1")))
            .await,
        StatusCode::OK
    );
    // The parent agent is not registered yet: the key fails closed.
    assert_eq!(t.check(&alice, key(), "read").await, StatusCode::FORBIDDEN);

    assert_eq!(
        t.register(&alice, resource("agent", "agent-1"), None).await,
        StatusCode::OK
    );
    assert_eq!(t.check(&alice, key(), "read").await, StatusCode::OK);
    assert_eq!(t.check(&alice, key(), "delete").await, StatusCode::OK);
    assert_eq!(t.check(&bob, key(), "read").await, StatusCode::FORBIDDEN);
    // An operation api_key does not define is denied, not an error.
    assert_eq!(
        t.check(&alice, key(), "execute").await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(t.search(&alice, "api_key", "read").await, vec!["key-1"]);
    assert!(t.search(&bob, "api_key", "read").await.is_empty());
    assert!(t.search(&alice, "agent", "cancel").await.is_empty());
    t.shutdown().await;
}

#[tokio::test]
async fn key_without_parent_edge_is_denied() {
    let t = spawn().await;
    let alice = user("alice");
    assert_eq!(
        t.register(&alice, resource("agent", "agent-1"), None).await,
        StatusCode::OK
    );
    assert_eq!(
        t.register(&alice, resource("api_key", "orphan"), None)
            .await,
        StatusCode::OK
    );
    assert_eq!(
        t.check(&alice, resource("api_key", "orphan"), "read").await,
        StatusCode::FORBIDDEN
    );
    t.shutdown().await;
}

#[tokio::test]
async fn register_and_deregister_are_idempotent_and_deregister_removes_everything() {
    let t = spawn().await;
    let alice = user("alice");
    let key = || resource("api_key", "key-1");
    t.register(&alice, resource("agent", "agent-1"), None).await;
    for _ in 0..2 {
        let (status, body) = t
            .post(
                "/v1/authz/register",
                &json!({"principal": alice, "resource": key(), "parent": resource("agent", "agent-1")}),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            body["consistency_token"]
                .as_str()
                .is_some_and(|s| !s.is_empty()),
            "register answers a ZedToken: {body}"
        );
    }
    // A second owner, through the legacy grant.
    let (status, _) = t
        .post(
            "/v1/authz/grant",
            &json!({"principal": user("bob"), "resource": key(), "operation": "read"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        crate::grpc::relationships_of(&t, "api_key", "key-1")
            .await
            .len(),
        3,
        "owner alice, owner bob, parent agent"
    );

    for _ in 0..2 {
        let (status, body) = t
            .post(
                "/v1/authz/deregister",
                &json!({"principal": alice, "resource": key()}),
            )
            .await;
        assert_eq!(
            status,
            StatusCode::OK,
            "deleting nothing is success: {body}"
        );
        assert!(body["consistency_token"].is_string());
    }
    assert!(
        crate::grpc::relationships_of(&t, "api_key", "key-1")
            .await
            .is_empty()
    );
    assert_eq!(t.check(&alice, key(), "read").await, StatusCode::FORBIDDEN);
    // The agent is untouched.
    assert_eq!(
        t.check(&alice, resource("agent", "agent-1"), "read").await,
        StatusCode::OK
    );
    t.shutdown().await;
}

#[tokio::test]
async fn grant_and_revoke_touch_only_the_owner_edge() {
    let t = spawn().await;
    let bob = user("bob");
    let agent = || resource("agent", "agent-1");
    t.register(&user("alice"), agent(), None).await;
    let body = json!({"principal": bob, "resource": agent(), "operation": "read"});
    assert_eq!(t.check(&bob, agent(), "read").await, StatusCode::FORBIDDEN);
    assert_eq!(t.post("/v1/authz/grant", &body).await.0, StatusCode::OK);
    assert_eq!(t.check(&bob, agent(), "update").await, StatusCode::OK);
    assert_eq!(t.post("/v1/authz/revoke", &body).await.0, StatusCode::OK);
    assert_eq!(t.check(&bob, agent(), "read").await, StatusCode::FORBIDDEN);
    assert_eq!(
        t.post("/v1/authz/revoke", &body).await.0,
        StatusCode::OK,
        "revoking twice is fine"
    );
    assert_eq!(
        t.check(&user("alice"), agent(), "read").await,
        StatusCode::OK
    );
    t.shutdown().await;
}

#[tokio::test]
async fn service_accounts_and_all_resource_types_register() {
    let t = spawn().await;
    let sa = json!({"user_id": null, "service_account_id": "svc-1"});
    t.register(&sa, resource("agent", "agent-1"), None).await;
    for ty in ["api_key", "task", "schedule"] {
        assert_eq!(
            t.register(&sa, resource(ty, "x-1"), Some(resource("agent", "agent-1")))
                .await,
            StatusCode::OK,
            "{ty}"
        );
        assert_eq!(
            t.check(&sa, resource(ty, "x-1"), "read").await,
            StatusCode::OK,
            "{ty}"
        );
    }
    t.shutdown().await;
}

#[tokio::test]
async fn bad_requests_are_4xx_with_a_json_error() {
    let t = spawn().await;
    let alice = user("alice");
    let cases = [
        (
            "/v1/authz/register",
            json!({"principal": {"account_id": "a"}, "resource": resource("agent", "a")}),
            422,
        ),
        (
            "/v1/authz/register",
            json!({"principal": alice, "resource": resource("widget", "a")}),
            422,
        ),
        (
            "/v1/authz/register",
            json!({"principal": alice, "resource": resource("user", "a")}),
            422,
        ),
        // Selectors that no encoding can store: empty, or too long once
        // encoded (1,025 kept bytes; 342 colons need 1,026 characters).
        (
            "/v1/authz/register",
            json!({"principal": alice, "resource": resource("agent", "")}),
            400,
        ),
        (
            "/v1/authz/register",
            json!({"principal": alice, "resource": resource("agent", &"x".repeat(1025))}),
            400,
        ),
        (
            "/v1/authz/register",
            json!({"principal": alice, "resource": resource("schedule", &":".repeat(342)), "parent": resource("agent", "a")}),
            400,
        ),
        (
            "/v1/authz/register",
            json!({"principal": alice, "resource": resource("api_key", "k"), "parent": resource("agent", "")}),
            400,
        ),
        (
            "/v1/authz/deregister",
            json!({"principal": alice, "resource": resource("agent", "")}),
            400,
        ),
        (
            "/v1/authz/check",
            json!({"principal": alice, "resource": resource("agent", ""), "operation": "read"}),
            400,
        ),
        (
            "/v1/authz/grant",
            json!({"principal": alice, "resource": resource("agent", &"y".repeat(2000)), "operation": "read"}),
            400,
        ),
        (
            "/v1/authz/revoke",
            json!({"principal": alice, "resource": resource("agent", ""), "operation": "read"}),
            400,
        ),
        (
            "/v1/authz/register",
            json!({"principal": user("a@b.c"), "resource": resource("agent", "a")}),
            422,
        ),
        (
            "/v1/authz/register",
            json!({"principal": alice, "resource": resource("api_key", "k"), "parent": resource("task", "t")}),
            422,
        ),
        (
            "/v1/authz/register",
            json!({"principal": alice, "resource": resource("agent", "a"), "parent": resource("agent", "p")}),
            422,
        ),
        ("/v1/authz/register", json!({"principal": alice}), 422),
        (
            "/v1/authz/register",
            json!({"principal": alice, "resource": {"type": "agent", "selector": 7}}),
            422,
        ),
        ("/v1/authz/register", json!([1, 2]), 422),
        (
            "/v1/authz/deregister",
            json!({"resource": resource("agent", "a")}),
            422,
        ),
        (
            "/v1/authz/check",
            json!({"principal": alice, "resource": resource("agent", "a"), "operation": "fly"}),
            422,
        ),
        (
            "/v1/authz/check",
            json!({"principal": alice, "resource": resource("agent", "a")}),
            422,
        ),
        (
            "/v1/authz/search",
            json!({"principal": alice, "filter_resource": "widget", "filter_operation": "read"}),
            422,
        ),
        (
            "/v1/authz/grant",
            json!({"principal": "alice", "resource": resource("agent", "a"), "operation": "read"}),
            422,
        ),
        ("/_dev/faults", json!({"all": {"status_500": 2.0}}), 422),
        ("/_dev/faults", json!({"no_such_knob": true}), 422),
    ];
    for (path, body, expected) in cases {
        let (status, answer) = t.post(path, &body).await;
        assert_eq!(status.as_u16(), expected, "{path} {body} -> {answer}");
        assert!(answer["error"].is_string(), "{path} {body} -> {answer}");
    }
    for raw in ["{not json", "", "{,}", "{\"seed\": 1"] {
        for path in ["/v1/authz/register", "/v1/authz/check", "/_dev/faults"] {
            let response = t
                .http
                .post(t.url(path))
                .body(raw)
                .send()
                .await
                .expect("send");
            assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{path} {raw:?}");
            let answer: serde_json::Value = response.json().await.expect("json error body");
            assert!(answer["error"].is_string());
        }
    }
    // A body larger than the limit is refused before it is parsed.
    let huge = json!({"principal": alice, "resource": resource("agent", "a"), "pad": "p".repeat(70 * 1024)});
    let (status, answer) = t.post("/v1/authz/register", &huge).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
    assert!(answer["error"].is_string(), "{answer}");
    // Nothing was written, and the server still serves.
    assert_eq!(t.server.stats().writes_applied, 0);
    assert_eq!(
        t.register(&alice, resource("agent", "a"), None).await,
        StatusCode::OK
    );
    let health = t.http.get(t.url("/healthz")).send().await.expect("healthz");
    assert_eq!(health.status(), StatusCode::OK);
    t.shutdown().await;
}

#[tokio::test]
async fn headers_of_the_real_client_are_accepted() {
    let t = spawn().await;
    let response = t
        .http
        .post(t.url("/v1/authz/register"))
        .bearer_auth("some-token")
        .header("Idempotency-Key", "register:agent:a1")
        .json(&json!({"principal": user("alice"), "resource": resource("agent", "a1"), "parent": null}))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), StatusCode::OK);
    t.shutdown().await;
}

#[tokio::test]
async fn servers_in_one_process_have_separate_engines() {
    let (a, b) = tokio::join!(spawn(), spawn());
    let alice = user("alice");
    assert_eq!(
        a.register(&alice, resource("agent", "agent-1"), None).await,
        StatusCode::OK
    );
    assert_eq!(
        a.check(&alice, resource("agent", "agent-1"), "read").await,
        StatusCode::OK
    );
    assert_eq!(
        b.check(&alice, resource("agent", "agent-1"), "read").await,
        StatusCode::FORBIDDEN
    );
    a.shutdown().await;
    // b outlives a's disposal.
    assert_eq!(
        b.register(&alice, resource("agent", "agent-2"), None).await,
        StatusCode::OK
    );
    assert_eq!(
        b.check(&alice, resource("agent", "agent-2"), "read").await,
        StatusCode::OK
    );
    b.shutdown().await;
}

/// Concurrent registers (the worker sends many at once) must all be seen by
/// `ReadRelationships`. Without the engine's write serialisation, reads
/// through the streaming socket missed some of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_registers_are_all_applied() {
    let t = std::sync::Arc::new(spawn().await);
    let alice = user("alice");
    let mut tasks = Vec::new();
    for i in 0..40 {
        let (t, alice) = (t.clone(), alice.clone());
        tasks.push(tokio::spawn(async move {
            t.register(&alice, resource("agent", &format!("agent-{i}")), None)
                .await
        }));
    }
    for task in tasks {
        assert_eq!(task.await.expect("task"), StatusCode::OK);
    }
    // Read back through the gRPC endpoint, a whole type at once, as
    // reconcile does.
    assert_eq!(
        crate::grpc::relationships_of_type(&t, "agent").await.len(),
        40
    );
}

/// Tasks and schedules are registered like api keys: an owner edge and a
/// parent agent edge, readable only while the parent agent is readable.
#[tokio::test]
async fn tasks_and_schedules_follow_their_owner_and_parent_agent() {
    let t = spawn().await;
    let alice = user("alice");
    let bob = user("bob");
    for ty in ["task", "schedule"] {
        let item = || resource(ty, &format!("{ty}-1"));
        let agent_id = format!("agent-of-{ty}");
        let agent = || resource("agent", &agent_id);
        assert_eq!(
            t.register(&alice, item(), Some(agent())).await,
            StatusCode::OK,
            "{ty}"
        );
        // The parent agent is not registered yet: the read fails closed.
        assert_eq!(
            t.check(&alice, item(), "read").await,
            StatusCode::FORBIDDEN,
            "{ty} before its agent"
        );
        assert_eq!(t.register(&alice, agent(), None).await, StatusCode::OK);
        for operation in ["read", "update", "delete", "execute", "cancel"] {
            assert_eq!(
                t.check(&alice, item(), operation).await,
                StatusCode::OK,
                "{ty} {operation} by its owner"
            );
            assert_eq!(
                t.check(&bob, item(), operation).await,
                StatusCode::FORBIDDEN,
                "{ty} {operation} by someone else"
            );
        }
        // `create` is not modelled on an object: denied, not an error.
        assert_eq!(
            t.check(&alice, item(), "create").await,
            StatusCode::FORBIDDEN,
            "{ty} create"
        );
        assert_eq!(t.search(&alice, ty, "read").await, vec![format!("{ty}-1")]);
        assert_eq!(
            crate::grpc::relationships_of(&t, ty, &format!("{ty}-1")).await,
            vec![
                "owner@user:alice".to_string(),
                format!("parent_agent@agent:{agent_id}")
            ]
        );

        assert_eq!(t.deregister(&alice, item()).await, StatusCode::OK);
        assert_eq!(
            t.check(&alice, item(), "read").await,
            StatusCode::FORBIDDEN,
            "{ty} after deregister"
        );
        assert!(
            crate::grpc::relationships_of(&t, ty, &format!("{ty}-1"))
                .await
                .is_empty()
        );
        assert!(t.search(&alice, ty, "read").await.is_empty());
        assert_eq!(
            t.deregister(&alice, item()).await,
            StatusCode::OK,
            "deleting nothing is success"
        );
    }
    t.shutdown().await;
}

/// `read` follows the parent agent's `read`, `execute` and `cancel` its
/// `update`: an owner who may only view the agent may read its task but not
/// run or cancel it.
#[tokio::test]
async fn a_viewer_of_the_agent_reads_but_does_not_run_its_tasks() {
    let t = spawn().await;
    let carol = user("carol");
    t.register(&user("alice"), resource("agent", "agent-1"), None)
        .await;
    t.server
        .bulk_touch(vec![(
            "agent".into(),
            "agent-1".into(),
            "viewer".into(),
            "user".into(),
            "carol".into(),
        )])
        .await
        .expect("viewer edge");
    for ty in ["task", "schedule"] {
        assert_eq!(
            t.register(
                &carol,
                resource(ty, "x-1"),
                Some(resource("agent", "agent-1"))
            )
            .await,
            StatusCode::OK
        );
        assert_eq!(
            t.check(&carol, resource(ty, "x-1"), "read").await,
            StatusCode::OK,
            "{ty}"
        );
        for operation in ["update", "execute", "cancel"] {
            assert_eq!(
                t.check(&carol, resource(ty, "x-1"), operation).await,
                StatusCode::FORBIDDEN,
                "{ty} {operation} needs the agent's update"
            );
        }
    }
    t.shutdown().await;
}

/// The host's schedule selector holds `:`, which SpiceDB ids cannot: it is
/// stored in the authz-outbox encoding and every endpoint speaks selectors.
#[tokio::test]
async fn schedule_selectors_are_stored_encoded_and_searched_back_decoded() {
    let t = spawn().await;
    let alice = user("alice");
    let selector = "run-schedule::a1::s1";
    let schedule = || resource("schedule", selector);
    assert_eq!(
        t.register(&alice, resource("agent", "a1"), None).await,
        StatusCode::OK
    );
    assert_eq!(
        t.register(&alice, schedule(), Some(resource("agent", "a1")))
            .await,
        StatusCode::OK
    );
    assert_eq!(t.check(&alice, schedule(), "read").await, StatusCode::OK);
    assert_eq!(
        t.check(&user("bob"), schedule(), "read").await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(t.search(&alice, "schedule", "read").await, vec![selector]);
    // What SpiceDB holds, read over gRPC as reconcile reads it.
    assert_eq!(
        crate::grpc::relationships_of(&t, "schedule", "run-schedule=3A=3Aa1=3A=3As1").await,
        vec!["owner@user:alice", "parent_agent@agent:a1"]
    );
    assert_eq!(
        crate::grpc::resource_ids_of_type(&t, "schedule").await,
        vec!["run-schedule=3A=3Aa1=3A=3As1"]
    );

    // A parent selector is encoded too, and `=` is escaped.
    let odd_agent = "agent=with spaces";
    t.register(&alice, resource("agent", odd_agent), None).await;
    t.register(
        &alice,
        resource("task", "t::1"),
        Some(resource("agent", odd_agent)),
    )
    .await;
    assert_eq!(
        crate::grpc::relationships_of(&t, "task", "t=3A=3A1").await,
        vec![
            "owner@user:alice",
            "parent_agent@agent:agent=3Dwith=20spaces"
        ]
    );
    assert_eq!(
        t.check(&alice, resource("task", "t::1"), "execute").await,
        StatusCode::OK
    );
    assert_eq!(
        t.search(&alice, "agent", "read").await,
        vec!["a1", odd_agent]
    );

    // grant and revoke name the same object.
    let bob = user("bob");
    let body =
        json!({"principal": bob, "resource": resource("agent", odd_agent), "operation": "read"});
    assert_eq!(t.post("/v1/authz/grant", &body).await.0, StatusCode::OK);
    assert_eq!(
        t.check(&bob, resource("agent", odd_agent), "read").await,
        StatusCode::OK
    );
    assert_eq!(t.post("/v1/authz/revoke", &body).await.0, StatusCode::OK);
    assert_eq!(
        t.check(&bob, resource("agent", odd_agent), "read").await,
        StatusCode::FORBIDDEN
    );

    // An id not in the encoding (only a raw write can store one) is left out
    // of a search rather than failing it.
    t.server
        .bulk_touch(vec![(
            "agent".into(),
            "raw=zz".into(),
            "owner".into(),
            "user".into(),
            "alice".into(),
        )])
        .await
        .expect("raw write");
    assert_eq!(
        t.search(&alice, "agent", "read").await,
        vec!["a1", odd_agent]
    );

    assert_eq!(t.deregister(&alice, schedule()).await, StatusCode::OK);
    assert!(
        crate::grpc::relationships_of(&t, "schedule", "run-schedule=3A=3Aa1=3A=3As1")
            .await
            .is_empty()
    );
    assert_eq!(
        t.check(&alice, schedule(), "read").await,
        StatusCode::FORBIDDEN
    );
    t.shutdown().await;
}
