use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use super::{DbArgs, TargetKind, parse_duration};
use crate::auth_client::{AuthClient, BearerToken};
use crate::config::{WorkerConfig, default_worker_id};
use crate::delivery::spicedb::{DEFAULT_BATCH, SpiceDbTarget};
use crate::delivery::{Target, Worker};
use crate::spicedb_client::{SpiceDbClient, SpiceDbToken};

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    db: DbArgs,
    /// Drain every row due now, then exit (non-zero if any attempted row ended dead).
    #[arg(long)]
    once: bool,
    /// Where rows are delivered: agentex-auth's HTTP API, or SpiceDB itself
    /// over gRPC (relationships from the installed mappings).
    #[arg(
        long,
        env = "AUTHZ_OUTBOX_TARGET",
        value_enum,
        default_value = "agentex-auth"
    )]
    target: TargetKind,
    /// Base URL of agentex-auth (--target agentex-auth).
    #[arg(long, env = "AGENTEX_AUTH_URL")]
    agentex_auth_url: Option<String>,
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
    /// SpiceDB's gRPC endpoint (--target spicedb): http://host:port, or
    /// https://host:port for TLS.
    #[arg(long, env = "SPICEDB_ENDPOINT")]
    spicedb_endpoint: Option<String>,
    /// SpiceDB preshared key, sent as a bearer token.
    #[arg(
        long,
        env = "SPICEDB_TOKEN",
        hide_env_values = true,
        conflicts_with = "spicedb_token_file"
    )]
    spicedb_token: Option<String>,
    /// File holding the SpiceDB preshared key.
    #[arg(long, env = "SPICEDB_TOKEN_FILE")]
    spicedb_token_file: Option<PathBuf>,
    /// Rows (of different resources) per WriteRelationships (--target
    /// spicedb); 1 sends each row alone.
    #[arg(long, env = "AUTHZ_OUTBOX_SPICEDB_BATCH", default_value_t = DEFAULT_BATCH,
          value_parser = clap::builder::TypedValueParser::map(clap::value_parser!(u16).range(1..=500), usize::from))]
    spicedb_batch: usize,
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
            let text = read_secret(path)?;
            let token = BearerToken::new(text)
                .with_context(|| format!("the credential file {} is empty", path.display()))?;
            return Ok(Some(token));
        }
        Ok(self.agentex_auth_token.clone().and_then(BearerToken::new))
    }

    fn spicedb_token(&self) -> anyhow::Result<Option<SpiceDbToken>> {
        if let Some(path) = &self.spicedb_token_file {
            let token = SpiceDbToken::new(read_secret(path)?)
                .with_context(|| format!("the credential file {} is empty", path.display()))?;
            return Ok(Some(token));
        }
        Ok(self.spicedb_token.clone().and_then(SpiceDbToken::new))
    }

    /// The target's client, checked before anything connects (a bad URL
    /// or credential is a one-line error, whatever the database does).
    fn client(&self, config: &WorkerConfig) -> anyhow::Result<Client> {
        match self.target {
            TargetKind::AgentexAuth => {
                let url = self.agentex_auth_url.as_deref().context(
                    "--agentex-auth-url (AGENTEX_AUTH_URL) is required with --target agentex-auth",
                )?;
                let client = AuthClient::new(
                    url,
                    self.token()?,
                    config.request_timeout,
                    config.concurrency,
                )?;
                Ok(Client::AgentexAuth(client))
            }
            TargetKind::SpiceDb => {
                let endpoint = self.spicedb_endpoint.as_deref().context(
                    "--spicedb-endpoint (SPICEDB_ENDPOINT) is required with --target spicedb",
                )?;
                let client =
                    SpiceDbClient::new(endpoint, self.spicedb_token()?, config.request_timeout)?;
                Ok(Client::SpiceDb(client))
            }
        }
    }
}

enum Client {
    AgentexAuth(AuthClient),
    SpiceDb(SpiceDbClient),
}

impl Client {
    /// The SpiceDB target reads the mappings `migrate` installed.
    async fn target(self, pool: &sqlx::PgPool, batch: usize) -> anyhow::Result<Target> {
        Ok(match self {
            Client::AgentexAuth(client) => client.into(),
            Client::SpiceDb(client) => SpiceDbTarget::from_database(client, pool.clone(), batch)
                .await
                .context("the SpiceDB target")?
                .into(),
        })
    }
}

/// A credential file's text.
fn read_secret(path: &std::path::Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path)
        .with_context(|| format!("reading the credential file {}", path.display()))
}

pub async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let config = args.worker_config();
    config.validate()?;
    let client = args.client(&config)?;
    // Claims, records, the listener and housekeeping each need a connection
    // at times; deliveries themselves hold none (a SpiceDB re-parent reads
    // one row).
    let pool = crate::db::connect_worker(&args.db.database_url, 8).await?;
    let target = client.target(&pool, args.spicedb_batch).await?;
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
    let target_name = target.name();
    let worker = Worker::new(pool, target, config)?;

    let shutdown = CancellationToken::new();
    let http_cancel = CancellationToken::new();
    let http = tokio::spawn(crate::http::serve(
        listener,
        crate::http::router(worker.health(), metrics),
        http_cancel.clone(),
    ));
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    tracing::info!(addr = %args.metrics_addr, once, target = target_name, "worker started");

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
                "error: {target_name} rejected the credential (401 / UNAUTHENTICATED); nothing was dead-lettered"
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
