//! What every benchmark needs: the database, the release binaries, free
//! ports, and the two processes under test (`authz-outbox run` and
//! `agentex-auth-dev`), started as separate processes exactly as deployed.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::process::{Child, Command};

use super::pinning::Pinning;

/// The agent every benchmark key belongs to.
pub const AGENT: &str = "bench-agent";
/// The creator every benchmark row is registered as.
pub const PRINCIPAL: &str = r#"{"user_id":"bench-user"}"#;

#[derive(Debug, Clone)]
pub struct Env {
    pub database_url: String,
    /// Directory holding the release `authz-outbox` and `agentex-auth-dev`.
    pub bin_dir: PathBuf,
}

impl Env {
    pub fn authz_outbox(&self) -> PathBuf {
        self.bin_dir.join("authz-outbox")
    }

    pub fn auth_dev(&self) -> PathBuf {
        self.bin_dir.join("agentex-auth-dev")
    }

    pub async fn pool(&self, connections: u32) -> anyhow::Result<PgPool> {
        PgPoolOptions::new()
            .max_connections(connections)
            .min_connections(connections)
            .acquire_timeout(Duration::from_secs(30))
            .connect(&self.database_url)
            .await
            .context("connecting to PostgreSQL")
    }

    /// Applies the product's migrations with the product binary.
    pub async fn migrate(&self) -> anyhow::Result<()> {
        let pool = self.pool(1).await?;
        authz_outbox_proof::load_host_schema(&pool)
            .await
            .context("loading the host's schema")?;
        pool.close().await;
        let status = Command::new(self.authz_outbox())
            .arg("migrate")
            .env("DATABASE_URL", &self.database_url)
            .status()
            .await
            .with_context(|| format!("running {}", self.authz_outbox().display()))?;
        if !status.success() {
            bail!("authz-outbox migrate failed: {status}");
        }
        Ok(())
    }

    /// Empties the tables a benchmark fills and creates the bench agent
    /// (triggers off: its own register row would only be noise).
    pub async fn reset(&self, pool: &PgPool) -> anyhow::Result<()> {
        sqlx::raw_sql(
            "TRUNCATE authz_outbox, agent_api_keys, agents CASCADE;
             CREATE TABLE IF NOT EXISTS plain_keys (LIKE agent_api_keys INCLUDING ALL);
             TRUNCATE plain_keys;
             SET session_replication_role = replica;
             INSERT INTO agents (id, name, description, status) VALUES ('bench-agent', 'bench-agent', '', 'READY');
             SET session_replication_role = origin;
             CHECKPOINT;",
        )
        .execute(pool)
        .await
        .context("resetting the bench tables")?;
        // The copy table gets the foreign key LIKE does not copy, so a plain
        // insert does the same checks as a captured one, minus the trigger.
        sqlx::raw_sql(
            "DO $$ BEGIN
                 IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'plain_keys_agent_fk') THEN
                     ALTER TABLE plain_keys ADD CONSTRAINT plain_keys_agent_fk
                         FOREIGN KEY (agent_id) REFERENCES agents (id) ON DELETE CASCADE;
                 END IF;
             END $$;",
        )
        .execute(pool)
        .await?;
        Ok(())
    }

    /// Creates `n` api keys `prefix-1..n` in one transaction with the
    /// capture trigger on, so each gets its pending register row exactly as
    /// a host's write would (the worker supersedes a register whose key row
    /// is gone, so the rows must exist).
    pub async fn enqueue_registers(
        &self,
        pool: &PgPool,
        prefix: &str,
        n: i64,
    ) -> anyhow::Result<()> {
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT set_config('authz_outbox.principal', $1, true)")
            .bind(PRINCIPAL)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO agent_api_keys (id, agent_id, name, api_key_type, api_key)
             SELECT $1 || '-' || g, $2, 'bench', 'EXTERNAL', md5(g::text)
             FROM generate_series(1, $3::bigint) g",
        )
        .bind(prefix)
        .bind(AGENT)
        .bind(n)
        .execute(&mut *tx)
        .await
        .context("creating keys")?;
        tx.commit().await?;
        sqlx::raw_sql("VACUUM ANALYZE authz_outbox")
            .execute(pool)
            .await?;
        Ok(())
    }

    /// Starts `authz-outbox run` against `auth_url`. With `once` it exits
    /// when the rows due at its start are drained.
    pub fn spawn_worker(
        &self,
        auth_url: &str,
        concurrency: usize,
        batch_size: usize,
        once: bool,
        metrics_port: u16,
        cpus: Option<&str>,
    ) -> anyhow::Result<Child> {
        let mut cmd = match cpus {
            Some(cpus) => Pinning::command(cpus, &self.authz_outbox()),
            None => Command::new(self.authz_outbox()),
        };
        cmd.arg("run")
            .args(["--concurrency", &concurrency.to_string()])
            .args(["--batch-size", &batch_size.to_string()])
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            .env("DATABASE_URL", &self.database_url)
            .env("AGENTEX_AUTH_URL", auth_url)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .kill_on_drop(true);
        if once {
            cmd.arg("--once");
        }
        cmd.spawn().context("starting authz-outbox run")
    }

    /// Starts the agentex-auth-dev release binary (a fresh in-memory SpiceDB),
    /// on `cpus` if given, and waits until it answers.
    pub async fn spawn_auth_dev(&self, cpus: Option<&str>) -> anyhow::Result<AuthDev> {
        let http = free_port()?;
        let grpc = free_port()?;
        let mut cmd = match cpus {
            Some(cpus) => Pinning::command(cpus, &self.auth_dev()),
            None => Command::new(self.auth_dev()),
        };
        let child = cmd
            .args(["--listen", &format!("127.0.0.1:{http}")])
            .args(["--grpc-listen", &format!("127.0.0.1:{grpc}")])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting agentex-auth-dev")?;
        let base_url = format!("http://127.0.0.1:{http}");
        wait_for_port(http, Duration::from_secs(30)).await?;
        Ok(AuthDev { child, base_url })
    }
}

pub struct AuthDev {
    pub child: Child,
    pub base_url: String,
}

impl AuthDev {
    pub async fn stop(mut self) {
        terminate(&mut self.child).await;
    }
}

/// SIGTERM by pid (a graceful stop), then wait; SIGKILL if it lingers.
pub async fn terminate(child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
    }
    if tokio::time::timeout(Duration::from_secs(25), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

/// A port the OS considers free right now.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub async fn wait_for_port(port: u16, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if Instant::now() > deadline {
            bail!("nothing listens on 127.0.0.1:{port} after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// How many outbox rows are in each state.
pub async fn outbox_states(pool: &PgPool) -> anyhow::Result<Vec<(String, i64)>> {
    Ok(
        sqlx::query_as("SELECT state, count(*) FROM authz_outbox GROUP BY state ORDER BY state")
            .fetch_all(pool)
            .await?,
    )
}

pub async fn delivered_count(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM authz_outbox WHERE state = 'delivered'")
            .fetch_one(pool)
            .await?,
    )
}

/// Transactions committed in this database so far (`pg_stat_database`):
/// the difference over a drain, divided by its rows, is the worker's
/// commits (and so WAL flushes, with synchronous_commit on) per row.
pub async fn commits(pool: &PgPool) -> anyhow::Result<i64> {
    // The statistics are sent at transaction end, at most every 10 ms or so.
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    Ok(sqlx::query_scalar(
        "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(pool)
    .await?)
}
