//! `chaos`: the convergence run. Random host writes against three
//! `authz-outbox run` processes while agentex-auth-dev fails a fifth of its
//! requests, a worker is SIGKILLed every few seconds and PostgreSQL restarts
//! once; then everything must converge. Prints a JSON summary on stdout and
//! exits 1 if any assertion failed (2 if the run could not be carried out).
//!
//! Usually started by `scripts/chaos.sh`, which provides the database and
//! the PostgreSQL restart command.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use authz_outbox_proof::chaos::{self, ChaosConfig};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(about = "Chaos convergence run for authz-outbox")]
struct Args {
    /// A fresh, empty database (the run applies the migrations).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// Random operations in all.
    #[arg(long, default_value_t = 10_000)]
    ops: u64,
    /// Operations per second over all drivers (0: as fast as possible).
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Key slots the operations are spread over.
    #[arg(long, default_value_t = 2_000)]
    keys: usize,
    #[arg(long, default_value_t = 50)]
    agents: usize,
    /// Creator principals ({"user_id":"uN"}).
    #[arg(long, default_value_t = 20)]
    users: usize,
    /// Concurrent driver tasks.
    #[arg(long, default_value_t = 8)]
    drivers: usize,
    /// `authz-outbox run` processes.
    #[arg(long, default_value_t = 3)]
    workers: usize,
    /// Probability of an injected fault per agentex-auth request.
    #[arg(long, default_value_t = 0.2)]
    fault_rate: f64,
    /// Where the workers deliver: agentex-auth (HTTP) or spicedb (gRPC, the same engine).
    #[arg(long, value_enum, default_value = "agentex-auth")]
    target: chaos::Target,
    /// How long an injected hang lasts (longer than --request-timeout).
    #[arg(long, default_value = "1500ms", value_parser = humantime::parse_duration)]
    hang: Duration,
    /// Seeds the operations, the kills and agentex-auth-dev's faults.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// SIGKILL one worker (and restart it) this often.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    kill_every: Duration,
    /// The workers' --request-timeout.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    request_timeout: Duration,
    /// The workers' --lease (at least 3x the request timeout).
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    lease: Duration,
    /// Shell command that restarts PostgreSQL, run once mid-run (without it
    /// there is no restart).
    #[arg(long)]
    pg_restart_cmd: Option<String>,
    /// Fraction of the operations done when PostgreSQL restarts.
    #[arg(long, default_value_t = 0.5)]
    pg_restart_at: f64,
    /// Bound on the drain once the faults are off.
    #[arg(long, default_value = "180s", value_parser = humantime::parse_duration)]
    quiesce_timeout: Duration,
    /// Where authz-outbox and agentex-auth-dev are [default: next to this binary].
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// libspicedb.so for agentex-auth-dev.
    #[arg(long, env = "SPICEDB_LIBRARY_PATH")]
    spicedb_library: Option<PathBuf>,
    /// Self-test of the assertions: remove one key row behind the outbox's
    /// back after the drain; the run must then report drift and fail.
    #[arg(long)]
    sabotage: bool,
    /// Worker and server logs [default: a new temporary directory].
    #[arg(long)]
    log_dir: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let mut config = ChaosConfig::full(args.database_url);
    config.ops = args.ops;
    config.rate = args.rate;
    config.keys = args.keys;
    config.agents = args.agents;
    config.users = args.users;
    config.drivers = args.drivers;
    config.workers = args.workers;
    config.fault_rate = args.fault_rate;
    config.target = args.target;
    config.hang = args.hang;
    config.seed = args.seed;
    config.kill_every = args.kill_every;
    config.request_timeout = args.request_timeout;
    config.lease = args.lease;
    config.pg_restart_cmd = args.pg_restart_cmd;
    config.pg_restart_at = args.pg_restart_at;
    config.quiesce_timeout = args.quiesce_timeout;
    config.spicedb_library = args.spicedb_library;
    config.sabotage = args.sabotage;
    if let Some(dir) = args.bin_dir {
        config.bin_dir = dir;
    }
    if let Some(dir) = args.log_dir {
        config.log_dir = dir;
    }
    match chaos::run(config).await {
        Ok(summary) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&summary).unwrap_or_default()
            );
            if summary.ok {
                ExitCode::SUCCESS
            } else {
                for f in &summary.failures {
                    eprintln!("chaos: FAILED: {f}");
                }
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("chaos: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
