//! `agentex-auth-dev`: serve the agentex-auth contract over an embedded
//! SpiceDB, with fault injection. See the library docs for the details.

use std::net::SocketAddr;
use std::path::PathBuf;

use agentex_auth_dev::{DEFAULT_SCHEMA, DevServer, DevServerConfig, FaultRates, Faults};
use anyhow::Context;
use clap::Parser;

/// An agentex-auth stand-in backed by a real (embedded, in-memory) SpiceDB,
/// with fault injection. Needs libspicedb.so:
/// `export SPICEDB_LIBRARY_PATH=$(scripts/fetch-spicedb.sh)`.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// HTTP address of the agentex-auth API and the /_dev endpoints.
    #[arg(
        long,
        env = "AGENTEX_AUTH_DEV_LISTEN",
        default_value = "127.0.0.1:8181"
    )]
    listen: SocketAddr,

    /// SpiceDB gRPC address: PermissionsService and SchemaService (unary and
    /// streaming), Watch.
    #[arg(
        long,
        env = "AGENTEX_AUTH_DEV_GRPC_LISTEN",
        default_value = "127.0.0.1:50051"
    )]
    grpc_listen: SocketAddr,

    /// Path of libspicedb.so.
    #[arg(long, env = "SPICEDB_LIBRARY_PATH")]
    library: Option<PathBuf>,

    /// SpiceDB schema file [default: the built-in agentex-auth-dev/schema.zed].
    #[arg(long, env = "AGENTEX_AUTH_DEV_SCHEMA")]
    schema: Option<PathBuf>,

    /// Bearer token every authz request (HTTP Authorization header) and every
    /// gRPC call (authorization metadata) must carry [default: none, accept
    /// every caller].
    #[arg(long, env = "AGENTEX_AUTH_DEV_TOKEN", hide_env_values = true)]
    token: Option<String>,

    /// Fault configuration as JSON (the shape GET /_dev/faults returns);
    /// endpoints: register deregister check search grant revoke
    /// write_relationships delete_relationships (the last two are gRPC).
    #[arg(long, env = "AGENTEX_AUTH_DEV_FAULTS")]
    faults: Option<String>,

    /// Probability of a plain server error (500/502/503, evenly; on gRPC
    /// writes INTERNAL/UNAVAILABLE) on every endpoint; replaces the "all"
    /// rates of --faults.
    #[arg(long, value_parser = probability)]
    fault_rate: Option<f64>,

    /// Probability that a write commits but answers 503 (UNAVAILABLE on gRPC),
    /// on every endpoint.
    #[arg(long, value_parser = probability)]
    applied_then_503_rate: Option<f64>,

    /// Latency added to every authz request, in milliseconds.
    #[arg(long)]
    latency_ms: Option<u64>,

    /// Answer 401 to every authz request (UNAUTHENTICATED to gRPC writes).
    #[arg(long)]
    unauthorized: bool,

    /// Seed of the fault RNG, for reproducible runs.
    #[arg(long, env = "AGENTEX_AUTH_DEV_SEED")]
    seed: Option<u64>,
}

fn probability(s: &str) -> Result<f64, String> {
    let p: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if (0.0..=1.0).contains(&p) {
        Ok(p)
    } else {
        Err(format!("{p} is not within 0..=1"))
    }
}

impl Args {
    fn into_config(self) -> anyhow::Result<DevServerConfig> {
        let mut faults: Faults = match &self.faults {
            Some(json) => {
                serde_json::from_str(json).context("--faults is not a valid fault configuration")?
            }
            None => Faults::none(),
        };
        if let Some(rate) = self.fault_rate {
            faults.all = FaultRates {
                latency_ms: faults.all.latency_ms,
                ..FaultRates::server_errors(rate)
            };
        }
        if let Some(rate) = self.applied_then_503_rate {
            faults.all.applied_then_503 = rate;
        }
        if let Some(ms) = self.latency_ms {
            faults.all.latency_ms = ms;
        }
        faults.unauthorized |= self.unauthorized;
        if self.seed.is_some() {
            faults.seed = self.seed;
        }
        faults
            .validate()
            .map_err(anyhow::Error::msg)
            .context("invalid fault configuration")?;
        let schema = match &self.schema {
            Some(path) => std::fs::read_to_string(path)
                .with_context(|| format!("cannot read schema {}", path.display()))?,
            None => DEFAULT_SCHEMA.to_string(),
        };
        Ok(DevServerConfig {
            listen: self.listen,
            grpc_listen: self.grpc_listen,
            library_path: self.library,
            schema,
            faults,
            token: self.token,
        })
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::debug!("{error:?}");
            eprintln!("agentex-auth-dev: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let server = DevServer::start(args.into_config()?).await?;
    println!(
        "agentex-auth-dev: http {} grpc {}",
        server.base_url(),
        server.grpc_endpoint()
    );
    server.run_until(shutdown_signal()).await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::warn!(%error, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
}
