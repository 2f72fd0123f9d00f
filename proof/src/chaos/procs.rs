//! The processes a chaos run drives: `agentex-auth-dev` and the
//! `authz-outbox run` workers, each a real binary in its own process so a
//! SIGKILL is a real crash (no destructors, leases left behind, requests cut
//! off mid-flight).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

use super::ChaosConfig;

/// A free TCP port on 127.0.0.1 (bound, read, released).
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// Where the binaries of this workspace are: next to the running executable
/// (`target/<profile>/chaos`), or one level up for a test executable
/// (`target/<profile>/deps/chaos_small-…`).
pub fn default_bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().map(Path::to_path_buf).unwrap_or(dir)
    } else {
        dir
    }
}

fn binary(config: &ChaosConfig, name: &str) -> anyhow::Result<PathBuf> {
    let path = config.bin_dir.join(name);
    if !path.is_file() {
        bail!(
            "{} not found; build it first (cargo build -p {} --bin {name}) or pass --bin-dir",
            path.display(),
            if name == "agentex-auth-dev" {
                "agentex-auth-dev"
            } else {
                "authz-outbox"
            }
        );
    }
    Ok(path)
}

fn log_file(dir: &Path, name: &str) -> anyhow::Result<std::fs::File> {
    let path = dir.join(name);
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening the log {}", path.display()))
}

/// The agentex-auth stand-in, started without faults (the run sets them
/// once its fixtures are in place).
pub struct AuthServer {
    child: Child,
    pub base_url: String,
    pub grpc_endpoint: String,
}

impl AuthServer {
    pub async fn start(config: &ChaosConfig) -> anyhow::Result<AuthServer> {
        let bin = binary(config, "agentex-auth-dev")?;
        let (http, grpc) = (free_port()?, free_port()?);
        let mut command = Command::new(bin);
        command
            .arg("--listen")
            .arg(format!("127.0.0.1:{http}"))
            .arg("--grpc-listen")
            .arg(format!("127.0.0.1:{grpc}"))
            .arg("--seed")
            .arg(config.seed.to_string())
            .stdin(Stdio::null())
            .stdout(log_file(&config.log_dir, "agentex-auth-dev.log")?)
            .stderr(log_file(&config.log_dir, "agentex-auth-dev.log")?)
            .kill_on_drop(true);
        if let Some(lib) = &config.spicedb_library {
            command.env("SPICEDB_LIBRARY_PATH", lib);
        }
        let child = command.spawn().context("starting agentex-auth-dev")?;
        let mut server = AuthServer {
            child,
            base_url: format!("http://127.0.0.1:{http}"),
            grpc_endpoint: format!("http://127.0.0.1:{grpc}"),
        };
        let client = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = client
                .get(format!("{}/_dev/stats", server.base_url))
                .send()
                .await
                && r.status().is_success()
            {
                return Ok(server);
            }
            if let Some(status) = server.child.try_wait()? {
                bail!(
                    "agentex-auth-dev exited at start ({status}); see {}",
                    config.log_dir.join("agentex-auth-dev.log").display()
                );
            }
            if tokio::time::Instant::now() > deadline {
                bail!("agentex-auth-dev did not answer within 30s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// One `authz-outbox run` replica, restartable under the same id and port.
pub struct Worker {
    pub id: String,
    metrics_port: u16,
    child: Option<Child>,
    /// How many times this worker has been started.
    pub starts: u64,
    /// The SpiceDB gRPC endpoint, for `Target::SpiceDb`.
    pub spicedb_endpoint: String,
}

impl Worker {
    pub fn new(index: usize) -> anyhow::Result<Worker> {
        Ok(Worker {
            id: format!("chaos-w{index}"),
            metrics_port: free_port()?,
            child: None,
            starts: 0,
            spicedb_endpoint: String::new(),
        })
    }

    pub fn spawn(&mut self, config: &ChaosConfig, auth_url: &str) -> anyhow::Result<()> {
        let bin = binary(config, "authz-outbox")?;
        let log = format!("{}.log", self.id);
        let target: Vec<&str> = match config.target {
            super::Target::AgentexAuth => vec!["--agentex-auth-url", auth_url],
            super::Target::SpiceDb => vec![
                "--target",
                "spicedb",
                "--spicedb-endpoint",
                &self.spicedb_endpoint,
            ],
        };
        let child = Command::new(bin)
            .arg("run")
            .args(["--worker-id", &self.id])
            .args([
                "--metrics-addr",
                &format!("127.0.0.1:{}", self.metrics_port),
            ])
            .args(&target)
            .args([
                "--request-timeout",
                &humantime::format_duration(config.request_timeout).to_string(),
            ])
            .args([
                "--lease",
                &humantime::format_duration(config.lease).to_string(),
            ])
            .args(["--backoff-base", "20ms", "--backoff-cap", "500ms"])
            // Transient failures never go dead here: any dead row is a finding.
            .args(["--max-attempts", "1000", "--dead-after", "24h"])
            .args(["--poll-interval", "200ms", "--shutdown-timeout", "2s"])
            .args(["--concurrency", "16", "--batch-size", "50"])
            .env("DATABASE_URL", &config.database_url)
            .env(
                "RUST_LOG",
                std::env::var("CHAOS_WORKER_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log_file(&config.log_dir, &log)?)
            .stderr(log_file(&config.log_dir, &log)?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting worker {}", self.id))?;
        self.child = Some(child);
        self.starts += 1;
        Ok(())
    }

    /// SIGKILL: no graceful shutdown, leases stay until they expire.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    /// Whether the process ended on its own (it should never).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGTERM and wait for the graceful shutdown.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status();
            }
            if tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .is_err()
            {
                let _ = child.start_kill();
                let _ = child.wait().await;
            }
        }
    }
}
