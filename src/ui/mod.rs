//! The operator page: server-rendered HTML under `/ui/`, served by the
//! worker's HTTP endpoint (`run`) and by `authz-outbox ui`.
//!
//! Every page reads fully without JavaScript; the one small script only
//! refreshes the overview and asks before a form is sent. Assets are
//! compiled into the binary ([`assets`]), and the Content-Security-Policy
//! forbids loading anything from elsewhere.
//!
//! Reads go through [`queries`], each one indexed and bounded. Actions
//! (replay, reconcile) call the same library functions as the CLI
//! ([`crate::outbox::replay`], [`crate::reconcile`]), so their rules are the
//! CLI's. They exist only when the page has a token ([`auth`]): without one
//! the page is read-only, with no form and every POST refused.

pub mod assets;
pub mod auth;
mod chart;
mod form;
pub mod hour;
mod layout;
mod pages;
pub mod queries;

use std::sync::Arc;

use axum::Router;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use sqlx::PgPool;

use crate::delivery::worker::Health;
use crate::reconcile::{SelectorEncoding, SpiceDbConfig, Writer};
pub use auth::UiToken;

/// What the page may do and reach.
#[derive(Debug, Clone)]
pub struct UiConfig {
    /// Actions need this token; `None` makes the page read-only.
    pub token: Option<UiToken>,
    /// Where "what SpiceDB holds" is read, and reconcile runs; `None` hides
    /// both.
    pub spicedb: Option<SpiceDbConfig>,
    /// How SpiceDB object ids encode selectors (reconcile's setting).
    pub selector_encoding: SelectorEncoding,
    /// Whose relationships reconcile judges resources by.
    pub writer: Writer,
    /// This worker's delivery health, when the page is served by `run`.
    pub health: Option<Arc<Health>>,
}

impl UiConfig {
    /// A read-only page over `spicedb` (if any), with no worker.
    pub fn read_only(spicedb: Option<SpiceDbConfig>) -> Self {
        UiConfig {
            token: None,
            spicedb,
            selector_encoding: SelectorEncoding::default(),
            writer: Writer::default(),
            health: None,
        }
    }
}

/// Shared by every handler.
#[derive(Clone)]
pub struct UiState {
    pub(crate) pool: PgPool,
    pub(crate) config: Arc<UiConfig>,
    pub(crate) sessions: Arc<auth::Sessions>,
    pub(crate) reconcile_running: Arc<tokio::sync::Mutex<()>>,
    /// What the last run started here came to (shown on the reconcile page).
    last_reconcile: Arc<std::sync::Mutex<Option<String>>>,
    /// The overview's figures, shared for [`OVERVIEW_FIGURES_FOR`].
    figures: Arc<tokio::sync::Mutex<Option<Arc<OverviewFigures>>>>,
}

/// How long the overview's figures are reused. They count the pending and
/// dead rows, the leases and the newest minutes' deliveries: during a
/// drain of a large backlog PostgreSQL answers the counts with a parallel
/// scan of the outbox (0.4 s on three processes at 1.4 M rows), and the
/// hour's deliveries grow with the drain. Computed for each request of a
/// page polled every second, they took 39 % to 45 % off the worker's
/// delivery ceiling (BENCHMARKS.md, issue 23). Reused for the page's own
/// refresh interval, any number of viewers cost one computation per 10 s.
pub const OVERVIEW_FIGURES_FOR: std::time::Duration = std::time::Duration::from_secs(10);

/// The overview's figures and when they were taken.
#[derive(Debug)]
pub struct OverviewFigures {
    pub taken: std::time::Instant,
    pub taken_at: chrono::DateTime<chrono::Utc>,
    pub live: crate::outbox::stats::OutboxStats,
    pub activity: std::collections::BTreeMap<String, queries::TypeActivity>,
    pub rates: hour::Rates,
    pub replicas: Vec<queries::Replica>,
}

impl UiState {
    pub fn new(pool: PgPool, config: UiConfig) -> Self {
        UiState {
            pool,
            config: Arc::new(config),
            sessions: Arc::new(auth::Sessions::default()),
            reconcile_running: Arc::new(tokio::sync::Mutex::new(())),
            last_reconcile: Arc::new(std::sync::Mutex::new(None)),
            figures: Arc::new(tokio::sync::Mutex::new(None)),
        }
    }

    /// The overview's figures, computed at most once per
    /// [`OVERVIEW_FIGURES_FOR`] whoever asks (the lock makes concurrent
    /// viewers wait for one computation rather than each run their own).
    pub(crate) async fn overview_figures(&self) -> Result<Arc<OverviewFigures>, sqlx::Error> {
        use crate::outbox::stats::{self, Scope};
        let mut cached = self.figures.lock().await;
        if let Some(f) = cached.as_ref()
            && f.taken.elapsed() < OVERVIEW_FIGURES_FOR
        {
            return Ok(Arc::clone(f));
        }
        let now = chrono::Utc::now();
        let (live, in_flight, read, replicas) = tokio::try_join!(
            stats::collect(&self.pool, Scope::Live, 0),
            queries::in_flight(&self.pool),
            crate::outbox::minutes::since(&self.pool, hour::first_minute(now)),
            queries::replicas(&self.pool),
        )?;
        let mut activity = std::collections::BTreeMap::<String, queries::TypeActivity>::new();
        for (t, n) in in_flight {
            activity.entry(t).or_default().in_flight = n;
        }
        for (t, n) in hour::delivered_by_type(&read, now) {
            activity.entry(t).or_default().delivered_last_hour = n;
        }
        let rates = hour::rates(&read, now);
        let fresh = Arc::new(OverviewFigures {
            taken: std::time::Instant::now(),
            taken_at: now,
            live,
            activity,
            rates,
            replicas,
        });
        *cached = Some(Arc::clone(&fresh));
        Ok(fresh)
    }

    pub(crate) fn last_reconcile_message(&self) -> Option<String> {
        self.last_reconcile
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn set_last_reconcile_message(&self, message: String) {
        *self
            .last_reconcile
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(message);
    }

    /// Whether actions exist at all (a token is configured).
    pub fn actions_enabled(&self) -> bool {
        self.config.token.is_some()
    }
}

/// The page's routes, all under `/ui`, to merge into a server's router.
pub fn router(state: UiState) -> Router {
    Router::new()
        .route(
            "/ui",
            get(|| async { axum::response::Redirect::permanent("/ui/") }),
        )
        .route("/ui/", get(pages::overview::page))
        .route("/ui/dead", get(pages::dead::page))
        .route("/ui/dead/replay", post(pages::dead::replay))
        .route("/ui/resource", get(pages::resource::search))
        .route(
            "/ui/resource/{type}/{*selector}",
            get(pages::resource::page),
        )
        .route("/ui/reconcile", get(pages::reconcile::page))
        .route("/ui/reconcile/run/{id}", get(pages::reconcile::run))
        .route("/ui/reconcile/dry-run", post(pages::reconcile::dry_run))
        .route("/ui/reconcile/apply", post(pages::reconcile::apply))
        .route("/ui/mappings", get(pages::mappings::page))
        .route(
            "/ui/login",
            get(pages::login::page).post(pages::login::login),
        )
        .route("/ui/logout", post(pages::login::logout))
        .route("/ui/assets/{name}", get(assets::serve))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(state)
}

/// Nothing but this server's own assets may load; the page may not be
/// framed; no referrer leaves it.
async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; \
             form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Why a request got no page.
#[derive(Debug, thiserror::Error)]
pub enum UiError {
    #[error("database error")]
    Database(#[from] sqlx::Error),
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("{0}")]
    BadRequest(String),
    #[error("not found")]
    NotFound,
}

impl IntoResponse for UiError {
    fn into_response(self) -> Response {
        let status = match &self {
            UiError::Database(e) => {
                // The cause goes to the log only: it may quote a row.
                tracing::warn!(error = %e, "operator page: database error");
                StatusCode::INTERNAL_SERVER_ERROR
            }
            UiError::Forbidden(_) => StatusCode::FORBIDDEN,
            UiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            UiError::NotFound => StatusCode::NOT_FOUND,
        };
        let title = status.canonical_reason().unwrap_or("error");
        let body = layout::bare(title, &self.to_string());
        (status, body).into_response()
    }
}
