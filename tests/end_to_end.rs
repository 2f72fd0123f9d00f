//! The worker against `agentex-auth-dev` and its real SpiceDB engine: every
//! created key becomes readable by its creator, every deleted key unreadable,
//! checked through `/v1/authz/check` as the host service would.

mod common;

use authz_outbox::capture;
use common::{agent, config, key, run_once};
use serde_json::json;
use sqlx::PgPool;

async fn can_read(base_url: &str, user: &str, key_id: &str) -> bool {
    let response = reqwest::Client::new()
        .post(format!("{base_url}/v1/authz/check"))
        .json(&json!({
            "principal": {"user_id": user},
            "resource": {"type": "api_key", "selector": key_id},
            "operation": "read"
        }))
        .send()
        .await
        .expect("check answers");
    match response.status().as_u16() {
        200 => true,
        403 => false,
        other => panic!("unexpected check status {other}"),
    }
}

#[sqlx::test(migrations = false)]
async fn created_keys_become_readable_and_deleted_keys_unreadable(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let dev = common::dev_server().await;
    agent(&pool, "a1").await;
    let mut keys = Vec::new();
    for i in 0..6 {
        keys.push(key(&pool, "a1", &format!("k{i}")).await);
    }
    assert!(
        !can_read(&dev.base_url(), "u1", &keys[0].id).await,
        "nothing delivered yet"
    );

    let report = run_once(&pool, &dev.base_url(), config("w")).await;
    assert_eq!(report.delivered, 7, "{report:?}");
    for k in &keys {
        assert!(
            can_read(&dev.base_url(), "u1", &k.id).await,
            "{} readable by its creator",
            k.id
        );
        assert!(!can_read(&dev.base_url(), "someone-else", &k.id).await);
    }

    for k in &keys[..3] {
        capture::delete_api_key(&pool, &k.id, None)
            .await
            .expect("delete");
    }
    let report = run_once(&pool, &dev.base_url(), config("w")).await;
    assert_eq!(report.delivered, 3, "{report:?}");
    for k in &keys[..3] {
        assert!(
            !can_read(&dev.base_url(), "u1", &k.id).await,
            "{} deleted, unreadable",
            k.id
        );
    }
    for k in &keys[3..] {
        assert!(
            can_read(&dev.base_url(), "u1", &k.id).await,
            "{} still readable",
            k.id
        );
    }
    let tokens: Vec<Option<String>> =
        sqlx::query_scalar("SELECT consistency_token FROM authz_outbox WHERE state = 'delivered'")
            .fetch_all(&pool)
            .await
            .expect("tokens");
    assert!(
        tokens.iter().all(Option::is_some),
        "the ZedToken of each write is kept"
    );
    dev.shutdown().await;
}
