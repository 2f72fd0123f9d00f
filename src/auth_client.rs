//! The agentex-auth client: the wire format of `/v1/authz/register` and
//! `/v1/authz/deregister` (see CONTRACT.md) and nothing else. Deciding what an
//! answer *means* for a row is the delivery module's job.

use std::fmt;
use std::time::Duration;

use reqwest::header::{AUTHORIZATION, HeaderValue, RETRY_AFTER};
use serde::Serialize;
use serde_json::Value;
use url::Url;

use crate::domain::ResourceRef;

/// The service credential. Its `Debug` never shows the value, so it cannot
/// reach a log line by accident.
#[derive(Clone)]
pub struct BearerToken(String);

impl BearerToken {
    pub fn new(token: impl Into<String>) -> Option<Self> {
        let token = token.into().trim().to_string();
        (!token.is_empty()).then_some(BearerToken(token))
    }
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

/// A request body, exactly as agentex-auth expects it.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum AuthRequest<'a> {
    Register {
        principal: &'a Value,
        resource: &'a ResourceRef,
        parent: Option<&'a ResourceRef>,
    },
    Deregister {
        principal: &'a Value,
        resource: &'a ResourceRef,
    },
}

impl AuthRequest<'_> {
    fn path(&self) -> &'static str {
        match self {
            AuthRequest::Register { .. } => "v1/authz/register",
            AuthRequest::Deregister { .. } => "v1/authz/deregister",
        }
    }
}

/// What came back, before any interpretation.
#[derive(Debug, Clone, PartialEq)]
pub enum AuthAnswer {
    /// 2xx. The consistency token, if the body carried one.
    Success { consistency_token: Option<String> },
    /// Any other HTTP status.
    Status {
        status: u16,
        retry_after: Option<Duration>,
        message: String,
    },
    /// The request timed out.
    Timeout,
    /// Connection refused, reset, DNS, TLS...
    Network(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid agentex-auth URL {0:?}: {1}")]
    BadUrl(String, String),
    #[error("invalid agentex-auth credential: {0}")]
    BadCredential(String),
    #[error("cannot build HTTP client: {0}")]
    Build(String),
}

/// A pooled HTTP client bound to one agentex-auth base URL.
#[derive(Clone)]
pub struct AuthClient {
    http: reqwest::Client,
    base: Url,
    authorization: Option<HeaderValue>,
}

impl fmt::Debug for AuthClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthClient")
            .field("base", &self.base.as_str())
            .finish_non_exhaustive()
    }
}

impl AuthClient {
    pub fn new(
        base_url: &str,
        token: Option<BearerToken>,
        request_timeout: Duration,
        max_idle_connections: usize,
    ) -> Result<Self, ClientError> {
        let mut base = Url::parse(base_url)
            .map_err(|e| ClientError::BadUrl(base_url.to_string(), e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") || base.host().is_none() {
            return Err(ClientError::BadUrl(
                base_url.to_string(),
                "expected http(s)://host[:port]".into(),
            ));
        }
        // Join relative paths under the base, whatever the operator wrote.
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        let authorization = token
            .map(|t| {
                let mut value =
                    HeaderValue::from_str(&format!("Bearer {}", t.0)).map_err(|_| {
                        ClientError::BadCredential(
                            "contains characters not allowed in a header".into(),
                        )
                    })?;
                value.set_sensitive(true);
                Ok(value)
            })
            .transpose()?;
        let http = reqwest::Client::builder()
            .timeout(request_timeout)
            .connect_timeout(request_timeout)
            .pool_max_idle_per_host(max_idle_connections)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| ClientError::Build(e.to_string()))?;
        Ok(AuthClient {
            http,
            base,
            authorization,
        })
    }

    /// Sends one request. `idempotency_key` lets agentex-auth (or a proxy)
    /// recognise a retry of the same outbox row.
    pub async fn send(&self, request: &AuthRequest<'_>, idempotency_key: &str) -> AuthAnswer {
        let url = match self.base.join(request.path()) {
            Ok(url) => url,
            Err(e) => return AuthAnswer::Network(e.to_string()),
        };
        let mut builder = self
            .http
            .post(url)
            .header("Idempotency-Key", idempotency_key)
            .json(request);
        if let Some(auth) = &self.authorization {
            builder = builder.header(AUTHORIZATION, auth.clone());
        }
        let response = match builder.send().await {
            Ok(response) => response,
            Err(e) if e.is_timeout() => return AuthAnswer::Timeout,
            Err(e) => return AuthAnswer::Network(error_chain(&e)),
        };
        let status = response.status();
        if status.is_success() {
            // The body is JSON by contract; a missing or odd body still means
            // the write was applied, so only the token is optional here.
            let consistency_token = match response.json::<Value>().await {
                Ok(body) => consistency_token(&body),
                Err(e) if e.is_timeout() => return AuthAnswer::Timeout,
                Err(_) => None,
            };
            return AuthAnswer::Success { consistency_token };
        }
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let message = match response.text().await {
            Ok(body) => short_message(&body),
            Err(_) => String::new(),
        };
        AuthAnswer::Status {
            status: status.as_u16(),
            retry_after,
            message,
        }
    }
}

/// The token field names agentex-auth and SpiceDB-style proxies use.
fn consistency_token(body: &Value) -> Option<String> {
    ["consistency_token", "zedtoken", "zed_token", "written_at"]
        .iter()
        .find_map(|k| body.get(*k).and_then(Value::as_str))
        .map(str::to_string)
}

/// `Retry-After` as delta-seconds (the HTTP-date form is rare from APIs and
/// falls back to our own backoff).
fn parse_retry_after(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// One line, at most 200 characters, of an error body.
fn short_message(body: &str) -> String {
    let detail = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| {
            ["error", "detail", "message"].iter().find_map(|k| {
                v.get(*k)
                    .map(|d| d.as_str().map_or(d.to_string(), str::to_string))
            })
        })
        .unwrap_or_else(|| body.to_string());
    let line = detail.split_whitespace().collect::<Vec<_>>().join(" ");
    line.chars().take(200).collect()
}

/// reqwest's top-level message hides the cause ("error sending request");
/// the chain names it (connection refused, reset...).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn register_body_matches_the_contract() {
        let principal = json!({"user_id": "u1"});
        let resource = ResourceRef::new("api_key", "k1").expect("valid");
        let parent = ResourceRef::new("agent", "a1").expect("valid");
        let body = serde_json::to_value(AuthRequest::Register {
            principal: &principal,
            resource: &resource,
            parent: Some(&parent),
        })
        .expect("serializes");
        assert_eq!(
            body,
            json!({"principal": {"user_id": "u1"},
                   "resource": {"type": "api_key", "selector": "k1"},
                   "parent": {"type": "agent", "selector": "a1"}})
        );
        let agent = serde_json::to_value(AuthRequest::Register {
            principal: &principal,
            resource: &parent,
            parent: None,
        })
        .expect("serializes");
        assert_eq!(agent["parent"], Value::Null, "parent is sent as null");
    }

    #[test]
    fn deregister_body_has_no_parent() {
        let principal = json!({"user_id": "u1"});
        let resource = ResourceRef::new("api_key", "k1").expect("valid");
        let body = serde_json::to_value(AuthRequest::Deregister {
            principal: &principal,
            resource: &resource,
        })
        .expect("serializes");
        assert_eq!(
            body,
            json!({"principal": {"user_id": "u1"}, "resource": {"type": "api_key", "selector": "k1"}})
        );
    }

    #[test]
    fn token_is_redacted_in_debug() {
        let token = BearerToken::new("s3cr3t").expect("non-empty");
        assert!(!format!("{token:?}").contains("s3cr3t"));
        assert!(BearerToken::new("  ").is_none());
    }

    #[test]
    fn error_bodies_become_one_short_line() {
        assert_eq!(short_message(r#"{"error":"bad\nthing"}"#), "bad thing");
        assert_eq!(short_message(&"x".repeat(500)).len(), 200);
        assert_eq!(parse_retry_after(" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }
}
