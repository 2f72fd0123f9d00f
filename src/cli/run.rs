use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use super::{DbArgs, Secret, TargetKind, duration_up_to, number_in, parse_secret};
use crate::auth_client::{AuthClient, BearerToken};
use crate::config::limits;
use crate::config::{WorkerConfig, default_worker_id};
use crate::delivery::spicedb::{DEFAULT_BATCH, SpiceDbTarget};
use crate::delivery::{Target, Worker};
use crate::spicedb_client::{SpiceDbClient, SpiceDbToken};

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    db: DbArgs,
    /// Drain every row due now, then exit: 1 if any attempted row ended dead,
    /// 2 if the target rejected the credential or the database refused the
    /// run's claims or outcomes.
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
    /// Service credential, sent as a bearer token. Prefer the environment or
    /// --agentex-auth-token-file: a flag's value is visible in `ps`.
    #[arg(
        long,
        env = "AGENTEX_AUTH_TOKEN",
        hide_env_values = true,
        conflicts_with = "agentex_auth_token_file",
        value_parser = parse_secret
    )]
    agentex_auth_token: Option<Secret>,
    /// File holding the service credential (e.g. a mounted Secret).
    #[arg(long, env = "AGENTEX_AUTH_TOKEN_FILE")]
    agentex_auth_token_file: Option<PathBuf>,
    /// PEM file of extra CA certificates trusted for an https://
    /// AGENTEX_AUTH_URL (the system's roots are always trusted).
    #[arg(long, env = "AGENTEX_AUTH_CA_FILE")]
    agentex_auth_ca_file: Option<PathBuf>,
    /// SpiceDB's gRPC endpoint (--target spicedb): http://host:port, or
    /// https://host:port for TLS.
    #[arg(long, env = "SPICEDB_ENDPOINT")]
    spicedb_endpoint: Option<String>,
    /// SpiceDB preshared key, sent as a bearer token. Prefer the environment
    /// or --spicedb-token-file: a flag's value is visible in `ps`.
    #[arg(
        long,
        env = "SPICEDB_TOKEN",
        hide_env_values = true,
        conflicts_with = "spicedb_token_file",
        value_parser = parse_secret
    )]
    spicedb_token: Option<Secret>,
    /// File holding the SpiceDB preshared key.
    #[arg(long, env = "SPICEDB_TOKEN_FILE")]
    spicedb_token_file: Option<PathBuf>,
    /// PEM file of extra CA certificates trusted for an https://
    /// SPICEDB_ENDPOINT (the system's roots are always trusted).
    #[arg(long, env = "SPICEDB_CA_FILE")]
    spicedb_ca_file: Option<PathBuf>,
    /// Rows (of different resources) per WriteRelationships (--target
    /// spicedb), 1 to 500; 1 sends each row alone.
    #[arg(long, env = "AUTHZ_OUTBOX_SPICEDB_BATCH", default_value_t = DEFAULT_BATCH,
          value_parser = number_in(1usize, 500))]
    spicedb_batch: usize,
    /// Requests in flight at once (1 to 4096).
    #[arg(long, env = "AUTHZ_OUTBOX_CONCURRENCY", default_value_t = 32,
          value_parser = number_in(1, limits::CONCURRENCY))]
    concurrency: usize,
    /// Rows claimed per round trip (1 to 10000).
    #[arg(long, env = "AUTHZ_OUTBOX_BATCH_SIZE", default_value_t = 100,
          value_parser = number_in(1, limits::BATCH_SIZE))]
    batch_size: usize,
    /// How long a claim holds its rows; at least 3x the request timeout, at most 1h.
    #[arg(long, env = "AUTHZ_OUTBOX_LEASE", default_value = "30s",
          value_parser = duration_up_to(limits::LEASE))]
    lease: Duration,
    /// One request's deadline (at most 5m).
    #[arg(long, env = "AUTHZ_OUTBOX_REQUEST_TIMEOUT", default_value = "5s",
          value_parser = duration_up_to(limits::REQUEST_TIMEOUT))]
    request_timeout: Duration,
    /// Attempts before a failing row may go dead (it must also be older than
    /// --dead-after); 1 to 1000.
    #[arg(long, env = "AUTHZ_OUTBOX_MAX_ATTEMPTS", default_value_t = 20,
          value_parser = number_in(1, limits::MAX_ATTEMPTS))]
    max_attempts: u32,
    /// Age a failing row must reach before it may go dead (at most 365d).
    #[arg(long, env = "AUTHZ_OUTBOX_DEAD_AFTER", default_value = "24h",
          value_parser = duration_up_to(limits::DEAD_AFTER))]
    dead_after: Duration,
    /// First retry delay, doubled per attempt (at most 1h).
    #[arg(long, env = "AUTHZ_OUTBOX_BACKOFF_BASE", default_value = "500ms",
          value_parser = duration_up_to(limits::BACKOFF_BASE))]
    backoff_base: Duration,
    /// Longest retry delay, `Retry-After` included (at most 24h).
    #[arg(long, env = "AUTHZ_OUTBOX_BACKOFF_CAP", default_value = "5m",
          value_parser = duration_up_to(limits::BACKOFF_CAP))]
    backoff_cap: Duration,
    /// Fallback poll when no notification arrives (at most 1h).
    #[arg(long, env = "AUTHZ_OUTBOX_POLL_INTERVAL", default_value = "1s",
          value_parser = duration_up_to(limits::POLL_INTERVAL))]
    poll_interval: Duration,
    /// Delivered and superseded rows older than this are pruned (at most 3650d).
    #[arg(long, env = "AUTHZ_OUTBOX_RETENTION", default_value = "7d",
          value_parser = duration_up_to(limits::RETENTION))]
    retention: Duration,
    /// Time in-flight rows get to finish on SIGTERM before they are released (at most 1h).
    #[arg(long, env = "AUTHZ_OUTBOX_SHUTDOWN_TIMEOUT", default_value = "20s",
          value_parser = duration_up_to(limits::SHUTDOWN_TIMEOUT))]
    shutdown_timeout: Duration,
    /// Consecutive transient failures that open the circuit (1 to 10000).
    #[arg(long, env = "AUTHZ_OUTBOX_CIRCUIT_THRESHOLD", default_value_t = 10,
          value_parser = number_in(1, limits::CIRCUIT_THRESHOLD))]
    circuit_threshold: u32,
    /// The lease holder's name; defaults to hostname-pid.
    #[arg(long, env = "AUTHZ_OUTBOX_WORKER_ID")]
    worker_id: Option<String>,
    /// Address of /healthz, /readyz and /metrics. Port 9464 (the
    /// OpenTelemetry Prometheus exporter's), not 9090: that is Prometheus's
    /// own, often on the same machine or pod network.
    #[arg(long, env = "METRICS_ADDR", default_value = "127.0.0.1:9464")]
    metrics_addr: SocketAddr,
    #[command(flatten)]
    ui: super::ui::WorkerUiArgs,
    /// WAL capture (`migrate --capture wal`): do not run the relay that
    /// moves captured messages from the slot into the outbox here (another
    /// replica's does; one reads at a time). Idle in table mode.
    #[arg(long, env = "AUTHZ_OUTBOX_NO_RELAY")]
    no_relay: bool,
    /// WAL capture: where the relay reads its slot through PostgreSQL's SQL
    /// functions (no replication connection to be had, a switch back to
    /// table mode in progress), its pause after a read that found nothing
    /// (1 ms to 1 s). A relay streaming the slot is pushed each commit and
    /// does not poll.
    #[arg(long, env = "AUTHZ_OUTBOX_RELAY_POLL_INTERVAL", default_value = "5ms",
          value_parser = relay_poll)]
    relay_poll_interval: Duration,
}

fn relay_poll(s: &str) -> Result<Duration, String> {
    let d = super::parse_duration(s)?;
    if d < Duration::from_millis(1) || d > Duration::from_secs(1) {
        return Err("must be between 1ms and 1s".into());
    }
    Ok(d)
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
        Ok(self
            .agentex_auth_token
            .as_ref()
            .and_then(|t| BearerToken::new(t.0.clone())))
    }

    fn ca_file(&self) -> anyhow::Result<Option<(String, Vec<u8>)>> {
        let Some(path) = &self.agentex_auth_ca_file else {
            return Ok(None);
        };
        let pem = std::fs::read(path)
            .with_context(|| format!("reading the agentex-auth CA file {}", path.display()))?;
        Ok(Some((path.display().to_string(), pem)))
    }

    fn spicedb_token(&self) -> anyhow::Result<Option<SpiceDbToken>> {
        if let Some(path) = &self.spicedb_token_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the credential file {}", path.display()))?;
            let token = SpiceDbToken::new(text)
                .with_context(|| format!("the credential file {} is empty", path.display()))?;
            return Ok(Some(token));
        }
        Ok(self
            .spicedb_token
            .as_ref()
            .and_then(|t| SpiceDbToken::new(t.0.clone())))
    }

    /// The target's client, checked before anything connects (a bad URL
    /// or credential is a one-line error, whatever the database does).
    fn client(&self, config: &WorkerConfig) -> anyhow::Result<Client> {
        match self.target {
            TargetKind::AgentexAuth => {
                let url = self.agentex_auth_url.as_deref().context(
                    "--agentex-auth-url (AGENTEX_AUTH_URL) is required with --target agentex-auth",
                )?;
                let token = self.token()?;
                let ca = self.ca_file()?;
                let client = AuthClient::with_ca(
                    url,
                    token.clone(),
                    config.request_timeout,
                    config.concurrency,
                    ca.as_ref()
                        .map(|(path, pem)| (path.as_str(), pem.as_slice())),
                )?;
                warn_about_the_credential(token.is_some(), url);
                Ok(Client::AgentexAuth(client))
            }
            TargetKind::SpiceDb => {
                let endpoint = self.spicedb_endpoint.as_deref().context(
                    "--spicedb-endpoint (SPICEDB_ENDPOINT) is required with --target spicedb",
                )?;
                let ca = self
                    .spicedb_ca_file
                    .as_deref()
                    .map(crate::spicedb_client::read_ca_file)
                    .transpose()?;
                let token = self.spicedb_token()?;
                let has_token = token.is_some();
                let client =
                    SpiceDbClient::with_ca(endpoint, token, config.request_timeout, ca.as_deref())?;
                super::warn_if_sent_in_clear(
                    has_token,
                    "SPICEDB_ENDPOINT",
                    "preshared key",
                    endpoint,
                );
                Ok(Client::SpiceDb(client))
            }
        }
    }
}

impl RunArgs {
    /// Where the operator page reads SpiceDB and starts reconcile runs:
    /// the SpiceDB settings, whatever the target (an agentex-auth worker
    /// given SPICEDB_ENDPOINT uses it for the page only).
    fn ui_spicedb(&self) -> anyhow::Result<Option<crate::reconcile::SpiceDbConfig>> {
        let Some(endpoint) = &self.spicedb_endpoint else {
            return Ok(None);
        };
        let mut config = crate::reconcile::SpiceDbConfig::new(endpoint.clone());
        config.token = match &self.spicedb_token_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading the credential file {}", path.display()))?
                    .trim()
                    .to_string(),
            ),
            None => self.spicedb_token.as_ref().map(|t| t.0.clone()),
        };
        config.ca_pem = self
            .spicedb_ca_file
            .as_deref()
            .map(crate::spicedb_client::read_ca_file)
            .transpose()?;
        Ok(Some(config))
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

pub async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let config = args.worker_config();
    config.validate()?;
    let client = args.client(&config)?;
    // Claims, records, the listener and housekeeping each need a connection
    // at times; deliveries themselves hold none (a SpiceDB re-parent reads
    // one row).
    let pool = crate::db::connect_worker(&args.db.database_url.0, 8).await?;
    let target = client.target(&pool, args.spicedb_batch).await?;
    let metrics = crate::metrics::install().map_err(|e| anyhow::anyhow!("metrics: {e}"))?;
    // Every series the dashboard and the alerts read exists from the first
    // scrape; a database that is down now only delays them to housekeeping.
    if let Err(e) = crate::metrics::prime(&pool).await {
        tracing::warn!(error = %e, "could not read the outbox for the first metrics");
    }
    // A port in use is an operator's mistake: said in one line naming where
    // the address came from.
    let listener = crate::http::bind(args.metrics_addr).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on {} for /metrics (--metrics-addr / METRICS_ADDR): {e}",
            args.metrics_addr
        )
    })?;
    let once = args.once;
    let target_name = target.name();
    // The page reads through a pool of its own: however many operators
    // refresh it, it never takes a connection the claims and outcomes need.
    let ui_pool = if args.ui.no_ui {
        None
    } else {
        Some(crate::db::connect_page(&args.db.database_url.0, 2).await?)
    };
    let relay_pool = pool.clone();
    let spicedb_for_gaps = args.ui_spicedb()?;
    let worker = Worker::new(pool, target, config)?;
    let ui = match (
        ui_pool,
        args.ui
            .config(args.ui_spicedb()?, args.target, worker.health()),
    ) {
        (Some(pool), Some(ui)) => Some(crate::ui::UiState::new(pool, ui)),
        _ => None,
    };

    let shutdown = CancellationToken::new();
    let http_cancel = CancellationToken::new();
    let http = tokio::spawn(crate::http::serve(
        listener,
        crate::http::router_with_ui(worker.health(), metrics, ui),
        http_cancel.clone(),
    ));
    tokio::spawn(super::signal::cancel_on_signal(
        shutdown.clone(),
        "shutdown requested; finishing in-flight rows",
    ));
    tracing::info!(addr = %args.metrics_addr, once, target = target_name, "worker started");

    let relay_config = crate::relay::RelayConfig {
        database_url: args.db.database_url.0.clone(),
        poll: args.relay_poll_interval,
        batch: 5_000,
    };
    if once {
        // What the slot holds now is captured already: relayed first, so
        // a one-shot run delivers it as it would in table mode.
        if let Err(e) = crate::relay::drain_once(&relay_config).await {
            eprintln!("error: the WAL relay could not drain the slot: {e}");
            return Ok(ExitCode::from(2));
        }
    }
    let relay = (!once && !args.no_relay).then(|| {
        tokio::spawn(crate::relay::run(
            relay_config,
            relay_pool.clone(),
            crate::relay::Beside {
                on_gap: gap_handler(relay_pool.clone(), spicedb_for_gaps.clone(), args.target),
                wake: Some(worker.waker()),
            },
            shutdown.clone(),
        ))
    });
    let report = worker.run(shutdown, once).await;
    if let Some(relay) = relay {
        let _ = relay.await;
    }
    http_cancel.cancel();
    let _ = http.await;
    tracing::info!(?report, "worker stopped");
    if once {
        println!(
            "delivered={} retried={} dead={} superseded={} released={}",
            report.delivered, report.retried, report.dead, report.superseded, report.released
        );
        if let Some(error) = &report.database_error {
            eprintln!(
                "error: the run stopped early: {error}; the rows it held return to pending when their lease expires"
            );
            return Ok(ExitCode::from(2));
        }
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

/// Once, at start: a worker without a credential is either a dev set-up or
/// a forgotten Secret, and a token sent over plain http to another machine
/// is readable on the wire.
fn warn_about_the_credential(has_token: bool, url: &str) {
    if !has_token {
        tracing::warn!(
            "no agentex-auth credential configured (AGENTEX_AUTH_TOKEN or \
             AGENTEX_AUTH_TOKEN_FILE): requests are sent without Authorization"
        );
        return;
    }
    super::warn_if_sent_in_clear(has_token, "AGENTEX_AUTH_URL", "bearer token", url);
}

/// After the relay recreated a lost slot: a reconcile of every type, applied
/// through the outbox, when this worker can read SpiceDB
/// (`--spicedb-endpoint`); otherwise none, and `status` tells the operator
/// to run `authz-outbox reconcile --apply`.
fn gap_handler(
    pool: sqlx::PgPool,
    spicedb: Option<crate::reconcile::SpiceDbConfig>,
    target: TargetKind,
) -> Option<crate::relay::GapHandler> {
    let spicedb = spicedb?;
    Some(std::sync::Arc::new(move || {
        let (pool, spicedb) = (pool.clone(), spicedb.clone());
        Box::pin(async move {
            let options = crate::reconcile::ReconcileOptions {
                apply: true,
                grace: Duration::ZERO,
                writer: super::ui::writer(target),
                ..crate::reconcile::ReconcileOptions::default()
            };
            // reconcile's finding callback is not Send: the run drives its
            // own future on a blocking thread of this runtime.
            let handle = tokio::runtime::Handle::current();
            let report = tokio::task::spawn_blocking(move || {
                handle.block_on(async move {
                    crate::reconcile::reconcile(&pool, &spicedb, &options, &mut |_| {}).await
                })
            })
            .await?
            .map_err(|e| anyhow::anyhow!("{e}"))?;
            tracing::info!(?report, "reconciled every type after the relay's gap");
            Ok(())
        })
    }))
}
