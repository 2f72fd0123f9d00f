//! Graceful shutdown on a signal, for the long-running commands.

use tokio_util::sync::CancellationToken;

/// SIGTERM (Kubernetes) or SIGINT (a terminal) starts a graceful shutdown,
/// logged as `message`.
pub(super) async fn cancel_on_signal(shutdown: CancellationToken, message: &'static str) {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
    tracing::info!("{message}");
    shutdown.cancel();
}
