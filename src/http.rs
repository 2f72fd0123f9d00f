//! The worker's HTTP endpoint: `/healthz` (alive), `/readyz` (database
//! reachable, credential accepted), `/metrics` (Prometheus text), and the
//! operator page under `/ui/` ([`crate::ui`]) when one is given.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::delivery::worker::Health;

#[derive(Clone)]
struct AppState {
    health: Arc<Health>,
    metrics: PrometheusHandle,
}

pub fn router(health: Arc<Health>, metrics: PrometheusHandle) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render))
        .with_state(AppState { health, metrics })
}

/// [`router`] with the operator page mounted under `/ui/`.
pub fn router_with_ui(
    health: Arc<Health>,
    metrics: PrometheusHandle,
    ui: Option<crate::ui::UiState>,
) -> Router {
    let app = router(health, metrics);
    match ui {
        Some(ui) => app.merge(crate::ui::router(ui)),
        None => app,
    }
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, &'static str) {
    if state.health.ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn render(State(state): State<AppState>) -> String {
    state.metrics.render()
}

/// Binds first (so a taken port fails start-up, not later), then serves
/// until `cancel` fires.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

pub async fn serve(listener: TcpListener, app: Router, cancel: CancellationToken) {
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "HTTP endpoint failed");
    }
}
