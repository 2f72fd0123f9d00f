//! CPU pinning for the delivery comparison: agentex-auth-dev alone on the
//! last CPU, everything else (PostgreSQL, the worker processes, this bench
//! process with its load generator) on the others.
//!
//! Why: "the server's own capacity" is what it does with the CPU it has.
//! Unpinned on a small machine, the direct load generator costs almost
//! nothing while the worker path runs PostgreSQL and a worker process on the
//! same cores as the server, so the comparison also measures how much CPU
//! the server lost. Pinned, the server has the same core in both variants
//! and the ratio says whether the worker keeps it busy. Both are reported.
//!
//! Uses `taskset` (util-linux): children are started through it; processes
//! already running (this one, PostgreSQL's postmaster and backends, found by
//! name) are moved with `taskset -a -p`. New PostgreSQL backends inherit the
//! postmaster's set.

use std::path::Path;
use std::process::Stdio;

use anyhow::{Context, bail};
use tokio::process::Command;

#[derive(Debug, Clone)]
pub struct Pinning {
    /// CPU list for agentex-auth-dev, e.g. `1`.
    pub server: String,
    /// CPU list for everything else, e.g. `0`.
    pub rest: String,
    /// Every CPU, to undo the pinning, e.g. `0-1`.
    pub all: String,
}

impl Pinning {
    /// `None` on a single-CPU machine or without `taskset`.
    pub fn for_this_machine() -> Option<Pinning> {
        let cpus = std::thread::available_parallelism().ok()?.get();
        if cpus < 2 || !Path::new("/usr/bin/taskset").exists() {
            return None;
        }
        let last = cpus - 1;
        let rest = if last == 1 {
            "0".to_string()
        } else {
            format!("0-{}", last - 1)
        };
        Some(Pinning {
            server: last.to_string(),
            rest,
            all: format!("0-{last}"),
        })
    }

    /// `program` started on `cpus`.
    pub fn command(cpus: &str, program: &Path) -> Command {
        let mut cmd = Command::new("taskset");
        cmd.arg("-c").arg(cpus).arg(program);
        cmd
    }

    /// Moves this process and PostgreSQL onto `rest`.
    pub async fn pin_running(&self) -> anyhow::Result<()> {
        self.move_running(&self.rest).await
    }

    /// Lets this process and PostgreSQL use every CPU again.
    pub async fn unpin_running(&self) -> anyhow::Result<()> {
        self.move_running(&self.all).await
    }

    async fn move_running(&self, cpus: &str) -> anyhow::Result<()> {
        let mut pids = vec![std::process::id().to_string()];
        let found = Command::new("pgrep")
            .args(["-x", "postgres"])
            .output()
            .await
            .context("pgrep -x postgres")?;
        pids.extend(
            String::from_utf8_lossy(&found.stdout)
                .split_whitespace()
                .map(str::to_string),
        );
        if pids.len() == 1 {
            bail!("no PostgreSQL process found to pin");
        }
        for pid in pids {
            // A backend may exit between pgrep and taskset; that is fine.
            let _ = Command::new("taskset")
                .args(["-a", "-p", "-c", cpus, &pid])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .await;
        }
        Ok(())
    }
}
