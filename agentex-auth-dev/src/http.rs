//! The agentex-auth HTTP contract (see `shared/CONTRACT.md`) and the `/_dev`
//! control endpoints.
//!
//! Each authz request goes: fault decision → parse the body into domain types
//! (so a bad request is a 4xx, never a SpiceDB error) → one SpiceDB operation
//! → answer, with every outcome counted in the stats.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::engine::{Engine, Object, Tuple, WriteKind};
use crate::faults::{Endpoint, Fault, FaultInjector, Faults};
use crate::schema::{LiveSchema, Schema};
use crate::stats::StatsRecorder;
use crate::token::BearerToken;
use authz_object_id as object_id;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub engine: Engine,
    pub schema: LiveSchema,
    pub token: BearerToken,
    pub faults: Arc<FaultInjector>,
    pub stats: Arc<StatsRecorder>,
    /// Turns true at shutdown, cutting injected sleeps short.
    pub shutdown: watch::Receiver<bool>,
}

pub fn router(state: AppState) -> Router {
    let authz = Router::new()
        .route("/v1/authz/register", post(register))
        .route("/v1/authz/deregister", post(deregister))
        .route("/v1/authz/check", post(check))
        .route("/v1/authz/search", post(search))
        .route("/v1/authz/grant", post(grant))
        .route("/v1/authz/revoke", post(revoke))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .merge(authz)
        .route(
            "/healthz",
            get(|| async { axum::Json(json!({"status": "ok"})) }),
        )
        .route("/_dev/faults", get(get_faults).post(set_faults))
        .route("/_dev/stats", get(get_stats))
        .route("/_dev/stats/reset", post(reset_stats))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// The largest request body read. Every body of the contract is a few
/// hundred bytes (the principal is an open object, so leave it room); a
/// larger one is refused with 413 before it is buffered whole.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Rejects an authz request without the configured bearer token with 401, as
/// the real service answers a caller whose credential is missing or wrong.
/// It is counted as the endpoint's `"401"`, and draws no fault. `/healthz` and
/// `/_dev` stay open: they are the test harness's, not the contract's.
async fn require_token(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if state
        .token
        .accepts(request.headers().get(header::AUTHORIZATION))
    {
        return next.run(request).await;
    }
    let endpoint = request.uri().path().rsplit('/').next();
    if let Some(endpoint) = endpoint.and_then(|name| name.parse::<Endpoint>().ok()) {
        state.stats.record(endpoint, "401");
    }
    ApiError::new(StatusCode::UNAUTHORIZED, "missing or invalid bearer token").into_response()
}

// ---------------------------------------------------------------------------
// Answers and errors

/// An error answer: `{"error": "..."}` with a status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }

    fn unprocessable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(json!({"error": self.message}))).into_response()
    }
}

/// A successful (or, for `check`, denied) answer.
struct Answer {
    status: StatusCode,
    body: Value,
}

impl Answer {
    fn ok(body: Value) -> Answer {
        Answer {
            status: StatusCode::OK,
            body,
        }
    }

    fn written(token: String) -> Answer {
        Answer::ok(json!({"consistency_token": token}))
    }
}

/// The raw request body, at most [`MAX_BODY_BYTES`]; a refused body is
/// answered like every other error, `{"error": "..."}` (413 when too large).
struct Body(Bytes);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        Bytes::from_request(request, state)
            .await
            .map(Body)
            .map_err(|rejection| ApiError::new(rejection.status(), rejection.body_text()))
    }
}

/// Parses a JSON body: malformed JSON is 400, well-formed JSON of the wrong
/// shape (missing field, wrong type) is 422.
fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|error| {
        let status = match error.classify() {
            serde_json::error::Category::Data => StatusCode::UNPROCESSABLE_ENTITY,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError::new(status, format!("invalid request body: {error}"))
    })
}

// ---------------------------------------------------------------------------
// Wire types, parsed into domain objects at the boundary

#[derive(Deserialize)]
struct ResourceBody {
    #[serde(rename = "type")]
    resource_type: String,
    selector: String,
}

#[derive(Deserialize)]
struct RegisterBody {
    principal: Value,
    resource: ResourceBody,
    #[serde(default)]
    parent: Option<ResourceBody>,
}

#[derive(Deserialize)]
struct DeregisterBody {
    #[allow(dead_code)] // required by the contract, not needed to delete
    principal: Value,
    resource: ResourceBody,
}

#[derive(Deserialize)]
struct OperationBody {
    principal: Value,
    resource: ResourceBody,
    operation: Operation,
}

#[derive(Deserialize)]
struct SearchBody {
    principal: Value,
    filter_resource: String,
    filter_operation: Operation,
}

/// The operations of the contract; each maps to the permission of the same
/// name.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Operation {
    Create,
    Read,
    Update,
    Delete,
    Execute,
    Cancel,
}

impl Operation {
    fn permission(self) -> &'static str {
        match self {
            Operation::Create => "create",
            Operation::Read => "read",
            Operation::Update => "update",
            Operation::Delete => "delete",
            Operation::Execute => "execute",
            Operation::Cancel => "cancel",
        }
    }
}

/// SpiceDB's object id syntax: `[a-zA-Z0-9/_|\-=+]{1,1024}` (the wildcard
/// `*` is not an id a caller may register).
fn valid_object_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 1024
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/_|-=+".contains(&b))
}

/// A principal's id as a subject id. Principals are not selectors: they are
/// stored verbatim, so an id SpiceDB cannot hold is the caller's mistake (422).
fn subject_id(what: &str, id: &str) -> Result<String, ApiError> {
    if valid_object_id(id) {
        Ok(id.to_string())
    } else {
        Err(ApiError::unprocessable(format!(
            "{what} {id:?} is not a valid id (1 to 1024 of a-z A-Z 0-9 / _ | - = +)"
        )))
    }
}

/// A resource of a type the schema defines with an `owner` relation.
fn resource(schema: &Schema, body: &ResourceBody) -> Result<Object, ApiError> {
    resource_type(schema, &body.resource_type)?;
    Ok(Object::new(
        body.resource_type.as_str(),
        selector_id("resource selector", &body.selector)?,
    ))
}

/// A selector as a SpiceDB object id, in the authz-outbox encoding (see
/// [`object_id`]): any selector is stored, `run-schedule::a1::s1` included,
/// except an empty one or one whose encoding exceeds SpiceDB's 1,024
/// characters, which no encoding can store: 400. The selector is not echoed,
/// since it may be huge.
fn selector_id(what: &str, selector: &str) -> Result<String, ApiError> {
    object_id::encode(selector)
        .map_err(|error| ApiError::new(StatusCode::BAD_REQUEST, format!("{what}: {error}")))
}

fn resource_type<'s>(
    schema: &'s Schema,
    name: &str,
) -> Result<&'s crate::schema::Definition, ApiError> {
    schema
        .definition(name)
        .filter(|definition| definition.has_relation("owner"))
        .ok_or_else(|| ApiError::unprocessable(format!("unknown resource type {name:?}")))
}

/// The subject a principal stands for: `user:<user_id>` when `user_id` is a
/// non-empty string, else `service_account:<service_account_id>`.
fn subject(principal: &Value) -> Result<Object, ApiError> {
    let Value::Object(fields) = principal else {
        return Err(ApiError::unprocessable("principal must be a JSON object"));
    };
    let field = |name: &str| {
        fields
            .get(name)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    if let Some(user) = field("user_id") {
        Ok(Object::new("user", subject_id("principal.user_id", user)?))
    } else if let Some(account) = field("service_account_id") {
        Ok(Object::new(
            "service_account",
            subject_id("principal.service_account_id", account)?,
        ))
    } else {
        Err(ApiError::unprocessable(
            "no creator resolvable: principal has neither user_id nor service_account_id",
        ))
    }
}

// ---------------------------------------------------------------------------
// The authz endpoints

async fn register(State(state): State<AppState>, Body(body): Body) -> Response {
    serve(
        state,
        Endpoint::Register,
        body,
        |state, body: RegisterBody| async move {
            let schema = state.schema.current();
            let resource = resource(&schema, &body.resource)?;
            let owner = subject(&body.principal)?;
            let mut tuples = vec![Tuple {
                resource: resource.clone(),
                relation: "owner".into(),
                subject: owner,
            }];
            if let Some(parent) = &body.parent {
                if parent.resource_type != "agent" {
                    return Err(ApiError::unprocessable(format!(
                        "parent must be an agent, got {:?}",
                        parent.resource_type
                    )));
                }
                let has_parent = schema
                    .definition(&resource.object_type)
                    .is_some_and(|d| d.has_relation("parent_agent"));
                if !has_parent {
                    return Err(ApiError::unprocessable(format!(
                        "resource type {:?} has no parent",
                        resource.object_type
                    )));
                }
                tuples.push(Tuple {
                    resource,
                    relation: "parent_agent".into(),
                    subject: Object::new(
                        "agent",
                        selector_id("parent selector", &parent.selector)?,
                    ),
                });
            }
            let token = state.write(WriteKind::Touch, &tuples).await?;
            Ok(Answer::written(token))
        },
    )
    .await
}

async fn deregister(State(state): State<AppState>, Body(body): Body) -> Response {
    serve(
        state,
        Endpoint::Deregister,
        body,
        |state, body: DeregisterBody| async move {
            let schema = state.schema.current();
            let resource = resource(&schema, &body.resource)?;
            let token = state
                .engine
                .delete_resource(&resource)
                .await
                .map_err(engine_error)?;
            state.stats.write_applied();
            Ok(Answer::written(token))
        },
    )
    .await
}

async fn check(State(state): State<AppState>, Body(body): Body) -> Response {
    serve(
        state,
        Endpoint::Check,
        body,
        |state, body: OperationBody| async move {
            let schema = state.schema.current();
            let resource = resource(&schema, &body.resource)?;
            let subject = subject(&body.principal)?;
            let permission = body.operation.permission();
            let defined = schema
                .definition(&resource.object_type)
                .is_some_and(|d| d.has_permission(permission) || d.has_relation(permission));
            let allowed = defined
                && state
                    .engine
                    .check(&resource, permission, &subject)
                    .await
                    .map_err(engine_error)?;
            Ok(Answer {
                status: if allowed {
                    StatusCode::OK
                } else {
                    StatusCode::FORBIDDEN
                },
                body: json!({"allowed": allowed}),
            })
        },
    )
    .await
}

async fn search(State(state): State<AppState>, Body(body): Body) -> Response {
    serve(
        state,
        Endpoint::Search,
        body,
        |state, body: SearchBody| async move {
            let schema = state.schema.current();
            let definition = resource_type(&schema, &body.filter_resource)?;
            let subject = subject(&body.principal)?;
            let permission = body.filter_operation.permission();
            let ids =
                if definition.has_permission(permission) || definition.has_relation(permission) {
                    state
                        .engine
                        .lookup(&body.filter_resource, permission, &subject)
                        .await
                        .map_err(engine_error)?
                } else {
                    Vec::new()
                };
            Ok(Answer::ok(json!({"items": selectors(ids)})))
        },
    )
    .await
}

/// The selectors object ids encode, sorted. An id not in the encoding (only
/// a raw gRPC write can store one) is no selector this API registered, so it
/// is left out, with a warning, rather than failing every search.
fn selectors(ids: Vec<String>) -> Vec<String> {
    let mut selectors: Vec<String> = ids
        .into_iter()
        .filter_map(|id| match object_id::decode(&id) {
            Ok(selector) => Some(selector),
            Err(error) => {
                tracing::warn!(%id, %error, "search: object id is not in the authz-outbox encoding; left out");
                None
            }
        })
        .collect();
    selectors.sort();
    selectors
}

async fn grant(State(state): State<AppState>, Body(body): Body) -> Response {
    owner_edge(state, Endpoint::Grant, WriteKind::Touch, body).await
}

async fn revoke(State(state): State<AppState>, Body(body): Body) -> Response {
    owner_edge(state, Endpoint::Revoke, WriteKind::Delete, body).await
}

/// grant/revoke: the legacy owner-only edge, no parent.
async fn owner_edge(state: AppState, endpoint: Endpoint, kind: WriteKind, body: Bytes) -> Response {
    serve(
        state,
        endpoint,
        body,
        move |state, body: OperationBody| async move {
            let _ = body.operation; // validated; the edge is the same for every operation
            let tuple = Tuple {
                resource: resource(&state.schema.current(), &body.resource)?,
                relation: "owner".into(),
                subject: subject(&body.principal)?,
            };
            let token = state.write(kind, &[tuple]).await?;
            Ok(Answer::written(token))
        },
    )
    .await
}

impl AppState {
    async fn write(&self, kind: WriteKind, tuples: &[Tuple]) -> Result<String, ApiError> {
        let token = self
            .engine
            .write(kind, tuples)
            .await
            .map_err(engine_error)?;
        self.stats.write_applied();
        Ok(token)
    }

    /// Sleeps, unless the server shuts down first.
    async fn pause(&self, duration: Duration) {
        if duration.is_zero() {
            return;
        }
        let mut shutdown = self.shutdown.clone();
        tokio::select! {
            _ = tokio::time::sleep(duration) => {}
            _ = shutdown.wait_for(|stop| *stop) => {}
        }
    }
}

/// A valid request SpiceDB still failed: a bug or an engine problem, not the
/// caller's fault.
fn engine_error(error: crate::engine::EngineError) -> ApiError {
    tracing::error!(%error, "SpiceDB operation failed");
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, error.to_string())
}

/// Runs one authz request through fault injection, parsing and `handle`, and
/// counts its outcome.
async fn serve<B, F, Fut>(state: AppState, endpoint: Endpoint, body: Bytes, handle: F) -> Response
where
    B: DeserializeOwned,
    F: FnOnce(AppState, B) -> Fut,
    Fut: Future<Output = Result<Answer, ApiError>>,
{
    let decision = state.faults.decide(endpoint);
    let stats = Arc::clone(&state.stats);
    let record = |outcome: &str| stats.record(endpoint, outcome);

    if decision.unauthorized {
        record("401");
        return ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized (injected)").into_response();
    }
    state.pause(decision.latency).await;

    let injected = |status: StatusCode| {
        ApiError::new(status, format!("injected fault: {}", status.as_u16())).into_response()
    };
    match decision.fault {
        Some(Fault::Status500) => {
            record("500");
            return injected(StatusCode::INTERNAL_SERVER_ERROR);
        }
        Some(Fault::Status502) => {
            record("502");
            return injected(StatusCode::BAD_GATEWAY);
        }
        Some(Fault::Status503) => {
            record("503");
            return injected(StatusCode::SERVICE_UNAVAILABLE);
        }
        Some(Fault::RateLimited) => {
            record("429");
            let mut response = injected(StatusCode::TOO_MANY_REQUESTS);
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(decision.retry_after_secs),
            );
            return response;
        }
        Some(Fault::Hang) => {
            // Counted before the sleep: the client usually gives up first.
            record("hang");
            state.pause(decision.hang).await;
            return injected(StatusCode::SERVICE_UNAVAILABLE);
        }
        Some(Fault::AppliedThen503) | None => {}
    }

    let result = match parse_body::<B>(&body) {
        Ok(body) => handle(state.clone(), body).await,
        Err(error) => Err(error),
    };
    match result {
        Ok(_) if decision.fault == Some(Fault::AppliedThen503) => {
            record("applied_then_503");
            injected(StatusCode::SERVICE_UNAVAILABLE)
        }
        Ok(answer) => {
            record(answer.status.as_str());
            (answer.status, axum::Json(answer.body)).into_response()
        }
        Err(error) => {
            record(error.status.as_str());
            error.into_response()
        }
    }
}

// ---------------------------------------------------------------------------
// /_dev control endpoints

async fn get_faults(State(state): State<AppState>) -> axum::Json<Faults> {
    axum::Json(state.faults.get())
}

async fn set_faults(
    State(state): State<AppState>,
    Body(body): Body,
) -> Result<axum::Json<Faults>, ApiError> {
    let faults: Faults = parse_body(&body)?;
    faults.validate().map_err(ApiError::unprocessable)?;
    tracing::info!(?faults, "fault configuration changed");
    state.faults.set(faults);
    Ok(axum::Json(state.faults.get()))
}

async fn get_stats(State(state): State<AppState>) -> axum::Json<crate::stats::Stats> {
    axum::Json(state.stats.snapshot())
}

async fn reset_stats(State(state): State<AppState>) -> axum::Json<crate::stats::Stats> {
    state.stats.reset();
    axum::Json(state.stats.snapshot())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principal_resolves_user_before_service_account() {
        let user = subject(&json!({"user_id": "u1", "service_account_id": "s1"})).expect("user");
        assert_eq!(user, Object::new("user", "u1"));
        let account = subject(&json!({"user_id": "", "service_account_id": "s1"})).expect("sa");
        assert_eq!(account, Object::new("service_account", "s1"));
        let account = subject(&json!({"user_id": null, "service_account_id": "s1"})).expect("sa");
        assert_eq!(account, Object::new("service_account", "s1"));
        let none = subject(&json!({"account_id": "a"})).expect_err("no creator");
        assert_eq!(none.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(none.message.contains("no creator resolvable"));
        assert!(subject(&json!("u1")).is_err());
    }

    #[test]
    fn object_ids_follow_spicedb_syntax() {
        assert!(valid_object_id("0b7e2c1e-5d3f-4f6a-9a57-1d2c3b4a5f60"));
        assert!(valid_object_id("a/b_c|d=e+f"));
        assert!(!valid_object_id(""));
        assert!(!valid_object_id("*"));
        assert!(!valid_object_id("a b"));
        assert!(!valid_object_id("user@example.com"));
        assert!(!valid_object_id(&"x".repeat(1025)));
    }

    #[test]
    fn malformed_json_is_400_and_wrong_shape_is_422() {
        let malformed = parse_body::<RegisterBody>(b"{not json")
            .err()
            .expect("fails");
        assert_eq!(malformed.status, StatusCode::BAD_REQUEST);
        let missing = parse_body::<RegisterBody>(br#"{"principal":{}}"#)
            .err()
            .expect("fails");
        assert_eq!(missing.status, StatusCode::UNPROCESSABLE_ENTITY);
        let bad_op = parse_body::<OperationBody>(
            br#"{"principal":{},"resource":{"type":"agent","selector":"a"},"operation":"fly"}"#,
        )
        .err()
        .expect("fails");
        assert_eq!(bad_op.status, StatusCode::UNPROCESSABLE_ENTITY);
    }
}
