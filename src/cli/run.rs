use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use super::{DbArgs, parse_duration};
use crate::auth_client::{AuthClient, BearerToken};
use crate::config::{WorkerConfig, default_worker_id};
use crate::delivery::Worker;

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    db: DbArgs,
    /// Drain every row due now, then exit (non-zero if any attempted row ended dead).
    #[arg(long)]
    once: bool,
    /// Base URL of agentex-auth.
    #[arg(long, env = "AGENTEX_AUTH_URL")]
    agentex_auth_url: String,
    /// Service credential, sent as a bearer token.
    #[arg(
        long,
        env = "AGENTEX_AUTH_TOKEN",
        hide_env_values = true,
        conflicts_with = "agentex_auth_token_file"
    )]
    agentex_auth_token: Option<String>,
    /// File holding the service credential (e.g. a mounted Secret).
    #[arg(long, env = "AGENTEX_AUTH_TOKEN_FILE")]
    agentex_auth_token_file: Option<PathBuf>,
    /// Requests in flight at once.
    #[arg(long, env = "AUTHZ_OUTBOX_CONCURRENCY", default_value_t = 32)]
    concurrency: usize,
    /// Rows claimed per round trip.
    #[arg(long, env = "AUTHZ_OUTBOX_BATCH_SIZE", default_value_t = 100)]
    batch_size: usize,
    /// How long a claim holds its rows; at least 3x the request timeout.
    #[arg(long, env = "AUTHZ_OUTBOX_LEASE", default_value = "30s", value_parser = parse_duration)]
    lease: Duration,
    #[arg(long, env = "AUTHZ_OUTBOX_REQUEST_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    request_timeout: Duration,
    /// Attempts before a failing row may go dead (it must also be older than --dead-after).
    #[arg(long, env = "AUTHZ_OUTBOX_MAX_ATTEMPTS", default_value_t = 20)]
    max_attempts: u32,
    /// Age a failing row must reach before it may go dead.
    #[arg(long, env = "AUTHZ_OUTBOX_DEAD_AFTER", default_value = "24h", value_parser = parse_duration)]
    dead_after: Duration,
    #[arg(long, env = "AUTHZ_OUTBOX_BACKOFF_BASE", default_value = "500ms", value_parser = parse_duration)]
    backoff_base: Duration,
    #[arg(long, env = "AUTHZ_OUTBOX_BACKOFF_CAP", default_value = "5m", value_parser = parse_duration)]
    backoff_cap: Duration,
    /// Fallback poll when no notification arrives.
    #[arg(long, env = "AUTHZ_OUTBOX_POLL_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    poll_interval: Duration,
    /// Delivered and superseded rows older than this are pruned.
    #[arg(long, env = "AUTHZ_OUTBOX_RETENTION", default_value = "7d", value_parser = parse_duration)]
    retention: Duration,
    /// Time in-flight rows get to finish on SIGTERM before they are released.
    #[arg(long, env = "AUTHZ_OUTBOX_SHUTDOWN_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    shutdown_timeout: Duration,
    /// Consecutive transient failures that open the circuit.
    #[arg(long, env = "AUTHZ_OUTBOX_CIRCUIT_THRESHOLD", default_value_t = 10)]
    circuit_threshold: u32,
    /// The lease holder's name; defaults to hostname-pid.
    #[arg(long, env = "AUTHZ_OUTBOX_WORKER_ID")]
    worker_id: Option<String>,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "METRICS_ADDR", default_value = "127.0.0.1:9090")]
    metrics_addr: SocketAddr,
}

impl RunArgs {
    fn worker_config(&self) -> WorkerConfig {
        WorkerConfig {
            worker_id: self.worker_id.clone().unwrap_or_else(default_worker_id),
            concurrency: self.concurrency,
            batch_size: self.batch_size,
            lease: self.lease,
            request_timeout: self.request_timeout,
            max_attempts: self.max_attempts,
            dead_after: self.dead_after,
            backoff_base: self.backoff_base,
            backoff_cap: self.backoff_cap,
            poll_interval: self.poll_interval,
            retention: self.retention,
            shutdown_timeout: self.shutdown_timeout,
            circuit_threshold: self.circuit_threshold,
        }
    }

    fn token(&self) -> anyhow::Result<Option<BearerToken>> {
        if let Some(path) = &self.agentex_auth_token_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the credential file {}", path.display()))?;
            let token = BearerToken::new(text)
                .with_context(|| format!("the credential file {} is empty", path.display()))?;
            return Ok(Some(token));
        }
        Ok(self.agentex_auth_token.clone().and_then(BearerToken::new))
    }
}

pub async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let config = args.worker_config();
    config.validate()?;
    let client = AuthClient::new(
        &args.agentex_auth_url,
        args.token()?,
        config.request_timeout,
        config.concurrency,
    )?;
    // Claims, records, the listener and housekeeping each need a connection
    // at times; deliveries themselves hold none.
    let pool = crate::db::connect_worker(&args.db.database_url, 8).await?;
    let metrics = crate::metrics::install().map_err(|e| anyhow::anyhow!("metrics: {e}"))?;
    // Every series the dashboard and the alerts read exists from the first
    // scrape; a database that is down now only delays them to housekeeping.
    if let Err(e) = crate::metrics::prime(&pool).await {
        tracing::warn!(error = %e, "could not read the outbox for the first metrics");
    }
    let listener = crate::http::bind(args.metrics_addr)
        .await
        .with_context(|| format!("binding the metrics endpoint on {}", args.metrics_addr))?;
    let once = args.once;
    let worker = Worker::new(pool, client, config)?;

    let shutdown = CancellationToken::new();
    let http_cancel = CancellationToken::new();
    let http = tokio::spawn(crate::http::serve(
        listener,
        crate::http::router(worker.health(), metrics),
        http_cancel.clone(),
    ));
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    tracing::info!(addr = %args.metrics_addr, once, "worker started");

    let report = worker.run(shutdown, once).await;
    http_cancel.cancel();
    let _ = http.await;
    tracing::info!(?report, "worker stopped");
    if once {
        println!(
            "delivered={} retried={} dead={} superseded={} released={}",
            report.delivered, report.retried, report.dead, report.superseded, report.released
        );
        if report.credential_failure {
            eprintln!(
                "error: agentex-auth rejected the credential (401); nothing was dead-lettered"
            );
            return Ok(ExitCode::from(2));
        }
        if report.dead > 0 {
            return Ok(ExitCode::from(1));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// SIGTERM (Kubernetes) or SIGINT (a terminal) starts a graceful shutdown.
async fn cancel_on_signal(shutdown: CancellationToken) {
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
    tracing::info!("shutdown requested; finishing in-flight rows");
    shutdown.cancel();
}
