//! The shared harness: a fresh `DevServer` (its own in-memory SpiceDB) per
//! test, and small wire-format helpers.

use std::time::Duration;

use agentex_auth_dev::{DevServer, DevServerConfig, Faults, LIBRARY_PATH_ENV, SETUP_COMMAND};
use reqwest::StatusCode;
use serde_json::{Value, json};

pub struct TestServer {
    pub server: DevServer,
    pub http: reqwest::Client,
}

/// Starts a server with no faults. Fails (never skips) without the library.
pub async fn spawn() -> TestServer {
    spawn_with(Faults::none()).await
}

pub async fn spawn_with(faults: Faults) -> TestServer {
    spawn_config(DevServerConfig {
        faults,
        ..DevServerConfig::ephemeral()
    })
    .await
}

pub async fn spawn_config(config: DevServerConfig) -> TestServer {
    if std::env::var_os(LIBRARY_PATH_ENV).is_none_or(|v| v.is_empty()) {
        panic!(
            "{LIBRARY_PATH_ENV} is not set: these tests run against the real SpiceDB library; \
             run `{SETUP_COMMAND}` first"
        );
    }
    let server = DevServer::start(config)
        .await
        .unwrap_or_else(|e| panic!("cannot start agentex-auth-dev: {e}"));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client");
    TestServer { server, http }
}

pub fn user(id: &str) -> Value {
    json!({"user_id": id, "account_id": "acct-1"})
}

pub fn resource(ty: &str, id: &str) -> Value {
    json!({"type": ty, "selector": id})
}

impl TestServer {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.base_url())
    }

    /// POSTs JSON; returns the status and the JSON body (`Null` if none).
    pub async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let response = self
            .http
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        let status = response.status();
        let body = response.json().await.unwrap_or(Value::Null);
        (status, body)
    }

    pub async fn register(
        &self,
        principal: &Value,
        resource: Value,
        parent: Option<Value>,
    ) -> StatusCode {
        let body = json!({"principal": principal, "resource": resource, "parent": parent});
        self.post("/v1/authz/register", &body).await.0
    }

    pub async fn deregister(&self, principal: &Value, resource: Value) -> StatusCode {
        let body = json!({"principal": principal, "resource": resource});
        self.post("/v1/authz/deregister", &body).await.0
    }

    pub async fn check(&self, principal: &Value, resource: Value, operation: &str) -> StatusCode {
        let body = json!({"principal": principal, "resource": resource, "operation": operation});
        self.post("/v1/authz/check", &body).await.0
    }

    pub async fn search(&self, principal: &Value, ty: &str, operation: &str) -> Vec<String> {
        let body =
            json!({"principal": principal, "filter_resource": ty, "filter_operation": operation});
        let (status, body) = self.post("/v1/authz/search", &body).await;
        assert_eq!(status, StatusCode::OK, "search: {body}");
        serde_json::from_value(body["items"].clone()).expect("items is a list of ids")
    }

    pub async fn shutdown(self) {
        self.server.shutdown().await;
    }
}
