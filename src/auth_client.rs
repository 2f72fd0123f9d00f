//! The agentex-auth client: the wire format of `/v1/authz/register` and
//! `/v1/authz/deregister` (see CONTRACT.md) and nothing else. Deciding what an
//! answer *means* for a row is the delivery module's job.

use std::fmt;
use std::time::Duration;

use reqwest::header::{AUTHORIZATION, HeaderValue, LOCATION, RETRY_AFTER};
use serde::Serialize;
use serde_json::Value;
use url::Url;

use crate::display;
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

/// The most of any response body the client reads; the rest is discarded
/// unread (the connection is dropped). The contract's answers are a few
/// dozen bytes (`{"success": true}`, a short error); a misbehaving server
/// or proxy streaming megabytes must not cost the worker memory.
pub const MAX_BODY_BYTES: usize = 8 * 1024;

/// The longest `Retry-After` taken from a server; the worker's backoff cap
/// bounds it further.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// What came back, before any interpretation.
#[derive(Debug, Clone, PartialEq)]
pub enum AuthAnswer {
    /// 2xx with the contract's JSON object body. The consistency token, if
    /// the body carried one.
    Success { consistency_token: Option<String> },
    /// 2xx that is not the contract's answer: no body, not JSON, not an
    /// object, `"success"` other than `true`, or too large. Nothing says
    /// the write was applied, so it must never count as delivered.
    NotTheContract { status: u16, reason: String },
    /// 3xx. Redirects are never followed: a register sent to a login page
    /// is not applied, whatever that page answers.
    Redirect { status: u16, location: String },
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
    /// The URL is shown without its user-info, so a password in it never
    /// reaches a terminal or a log.
    #[error("invalid agentex-auth URL {0:?}: {1}")]
    BadUrl(String, String),
    #[error("cannot read the agentex-auth CA file {0}: {1}")]
    CaFile(String, String),
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
        Self::with_ca(base_url, token, request_timeout, max_idle_connections, None)
    }

    /// As [`AuthClient::new`], trusting the PEM certificates in `ca_pem`
    /// besides the system's roots (a private CA in front of agentex-auth).
    pub fn with_ca(
        base_url: &str,
        token: Option<BearerToken>,
        request_timeout: Duration,
        max_idle_connections: usize,
        ca_pem: Option<(&str, &[u8])>,
    ) -> Result<Self, ClientError> {
        let mut base = Url::parse(base_url)
            .map_err(|e| ClientError::BadUrl(redact_url(base_url), e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") || base.host().is_none() {
            return Err(ClientError::BadUrl(
                redact_url(base_url),
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
        // Redirects are answers, not detours: following one turned a
        // register into `GET /login` behind a single-sign-on ingress, and
        // could carry the bearer token to another host or down to http.
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(request_timeout)
            .connect_timeout(request_timeout)
            .pool_max_idle_per_host(max_idle_connections)
            .tcp_nodelay(true);
        if let Some((path, pem)) = ca_pem {
            let certificates = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| ClientError::CaFile(path.to_string(), e.to_string()))?;
            if certificates.is_empty() {
                return Err(ClientError::CaFile(
                    path.to_string(),
                    "no PEM certificate in it".into(),
                ));
            }
            for certificate in certificates {
                builder = builder.add_root_certificate(certificate);
            }
        }
        let http = builder
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
            Err(e) => return AuthAnswer::Network(display::line(&error_chain(&e), 300)),
        };
        let status = response.status();
        let code = status.as_u16();
        if status.is_redirection() {
            let location = response
                .headers()
                .get(LOCATION)
                .map(|v| display::line(&String::from_utf8_lossy(v.as_bytes()), 200))
                .unwrap_or_default();
            return AuthAnswer::Redirect {
                status: code,
                location,
            };
        }
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let body = match read_capped(response, MAX_BODY_BYTES).await {
            Ok(body) => body,
            Err(e) if e.is_timeout() => return AuthAnswer::Timeout,
            Err(e) => return AuthAnswer::Network(display::line(&error_chain(&e), 300)),
        };
        if status.is_success() {
            return success(code, &body);
        }
        AuthAnswer::Status {
            status: code,
            retry_after,
            message: short_message(&String::from_utf8_lossy(&body.bytes)),
        }
    }
}

/// At most `limit` bytes of a body, and whether there was more. The rest is
/// never read: dropping the response closes the connection.
struct Capped {
    bytes: Vec<u8>,
    truncated: bool,
}

async fn read_capped(mut response: reqwest::Response, limit: usize) -> reqwest::Result<Capped> {
    let mut bytes = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = limit.saturating_sub(bytes.len());
        if chunk.len() > room {
            bytes.extend_from_slice(&chunk[..room]);
            return Ok(Capped {
                bytes,
                truncated: true,
            });
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(Capped {
        bytes,
        truncated: false,
    })
}

/// A 2xx counts only with the contract's answer: a JSON object (whose
/// `success`, when present, is `true`). An empty body, an HTML page from a
/// proxy or a login screen, or anything cut off is not proof of a write.
fn success(status: u16, body: &Capped) -> AuthAnswer {
    let not = |reason: &str| AuthAnswer::NotTheContract {
        status,
        reason: reason.to_string(),
    };
    if body.truncated {
        return not("body larger than the contract's answer (over 8 KiB)");
    }
    if body.bytes.iter().all(u8::is_ascii_whitespace) {
        return not("empty body where the contract answers a JSON object");
    }
    let Ok(value) = serde_json::from_slice::<Value>(&body.bytes) else {
        return not("body is not JSON (a proxy or login page?)");
    };
    if !value.is_object() {
        return not("body is JSON but not an object");
    }
    match value.get("success") {
        None | Some(Value::Bool(true)) => AuthAnswer::Success {
            consistency_token: consistency_token(&value),
        },
        Some(_) => not("body says success is not true"),
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
    value
        .trim()
        .parse::<u64>()
        .ok()
        .map(|secs| Duration::from_secs(secs).min(MAX_RETRY_AFTER))
}

/// One line, at most 200 characters, of an error body, escaped
/// ([`display::line`]): it reaches a terminal, a log line and `last_error`.
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
    display::line(&detail, 200)
}

/// Text from a server as one line of at most `max` characters, escaped
/// ([`crate::display::line`]). Kept for the callers that still name it here.
pub fn one_line(text: &str, max: usize) -> String {
    crate::display::line(text, max)
}

pub use crate::display::redact_url;

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

    fn capped(body: &str) -> Capped {
        Capped {
            bytes: body.as_bytes().to_vec(),
            truncated: false,
        }
    }

    #[test]
    fn only_the_contracts_json_object_is_a_success() {
        assert_eq!(
            success(200, &capped(r#"{"success": true, "zedtoken": "z1"}"#)),
            AuthAnswer::Success {
                consistency_token: Some("z1".into())
            }
        );
        assert_eq!(
            success(200, &capped("{}")),
            AuthAnswer::Success {
                consistency_token: None
            }
        );
        for (body, reason) in [
            ("", "empty body"),
            ("  \n", "empty body"),
            ("<html>login</html>", "not JSON"),
            ("[true]", "not an object"),
            ("true", "not an object"),
            (r#"{"success": false}"#, "success is not true"),
            (r#"{"success": "yes"}"#, "success is not true"),
        ] {
            match success(204, &capped(body)) {
                AuthAnswer::NotTheContract {
                    status: 204,
                    reason: r,
                } => {
                    assert!(r.contains(reason), "{body:?}: {r}")
                }
                other => panic!("{body:?}: {other:?}"),
            }
        }
        let mut cut = capped(r#"{"success": true}"#);
        cut.truncated = true;
        assert!(matches!(
            success(200, &cut),
            AuthAnswer::NotTheContract { .. }
        ));
    }

    #[test]
    fn server_text_is_terminal_safe() {
        assert_eq!(
            short_message(r#"{"error":"bad\u001b]0;pwned\u0007"}"#),
            "bad\\u{1b}]0;pwned\\u{7}"
        );
        assert_eq!(short_message("\u{9b}2J"), "\\u{9b}2J");
        assert_eq!(short_message("x\u{202e}evil\r\n"), "x\\u{202e}evil");
    }

    #[test]
    fn urls_are_shown_without_their_password() {
        assert_eq!(
            redact_url("https://svc:hunter2@auth.example/x"),
            "https://auth.example/x"
        );
        assert!(!redact_url("http://svc:hunter2@auth:notaport").contains("hunter2"));
        assert!(!redact_url("svc:hunter2@auth").contains("hunter2"));
        assert_eq!(redact_url("http://auth:8080"), "http://auth:8080/");
        let error = AuthClient::new(
            "http://svc:hunter2@auth:notaport",
            None,
            Duration::from_secs(1),
            1,
        )
        .expect_err("bad port");
        assert!(!error.to_string().contains("hunter2"), "{error}");
    }

    #[test]
    fn retry_after_is_capped() {
        assert_eq!(
            parse_retry_after("18446744073709551615"),
            Some(Duration::from_secs(86_400))
        );
        assert_eq!(MAX_BODY_BYTES, 8192, "the README documents 8 KiB");
    }

    #[test]
    fn each_request_goes_to_its_contract_path() {
        let principal = json!({"user_id": "u1"});
        let resource = ResourceRef::new("api_key", "k1").expect("valid");
        let register = AuthRequest::Register {
            principal: &principal,
            resource: &resource,
            parent: None,
        };
        let deregister = AuthRequest::Deregister {
            principal: &principal,
            resource: &resource,
        };
        assert_eq!(register.path(), "v1/authz/register");
        assert_eq!(deregister.path(), "v1/authz/deregister");
    }

    #[test]
    fn error_bodies_become_one_short_line() {
        assert_eq!(short_message(r#"{"error":"bad\nthing"}"#), "bad\\nthing");
        let long = short_message(&"x".repeat(500));
        assert_eq!(long.chars().count(), 200);
        assert!(long.ends_with(display::ELLIPSIS), "{long}");
        assert_eq!(parse_retry_after(" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }
}
