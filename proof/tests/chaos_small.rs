//! A small chaos convergence run (the same program as `scripts/chaos.sh`,
//! about a thousand operations) as part of the test suite.
//!
//! It starts its own throwaway PostgreSQL cluster through `scripts/pg.sh`, so
//! it can restart PostgreSQL mid-run without disturbing the tests that share
//! the suite's cluster. It needs:
//!
//! - `SPICEDB_LIBRARY_PATH` (scripts/test.sh exports it) for agentex-auth-dev;
//! - the `authz-outbox` and `agentex-auth-dev` binaries in the target
//!   directory next to this test's (scripts/test.sh builds every target
//!   before testing);
//! - PostgreSQL's binaries (pg.sh finds them, or installs them).
//!
//! The workers and agentex-auth-dev are real processes: workers are
//! SIGKILLed every two seconds and restarted.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use authz_outbox_proof::chaos::{self, ChaosConfig};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("proof/ sits in the workspace")
        .to_path_buf()
}

/// A PostgreSQL cluster of our own, stopped (and removed) on drop.
struct PrivateCluster {
    database_url: String,
    pg_dir: String,
    pg_bin: String,
}

impl PrivateCluster {
    fn start() -> PrivateCluster {
        Self::start_with(std::env::var("PG_EXTRA_CONF").ok().as_deref())
    }

    /// A cluster with `extra` as its extra configuration (`None`: none).
    fn start_with(extra: Option<&str>) -> PrivateCluster {
        let script = workspace_root().join("scripts/pg.sh");
        // pg_start registers pg_stop on the shell's EXIT; lift that so the
        // cluster outlives this shell, and stop it from Drop instead.
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "source '{}' && pg_start && trap - EXIT && printf '%s\\n%s\\n%s\\n' \"$DATABASE_URL\" \"$PG_DIR\" \"$PG_BIN\"",
                script.display()
            ))
            .env_remove("PG_PORT")
            .env("PG_EXTRA_CONF", extra.unwrap_or(""))
            .output()
            .expect("running scripts/pg.sh");
        assert!(
            out.status.success(),
            "scripts/pg.sh could not start PostgreSQL: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let mut lines = text.lines();
        let mut next = || lines.next().expect("pg_start's three lines").to_string();
        PrivateCluster {
            database_url: next(),
            pg_dir: next(),
            pg_bin: next(),
        }
    }

    /// A shell command for the chaos run: `pg_restart` on this cluster.
    fn restart_command(&self) -> String {
        format!(
            "export PG_DIR='{}' PG_BIN='{}'; source '{}' && pg_restart",
            self.pg_dir,
            self.pg_bin,
            workspace_root().join("scripts/pg.sh").display()
        )
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "export PG_DIR='{}' PG_BIN='{}'; source '{}' && pg_stop",
                self.pg_dir,
                self.pg_bin,
                workspace_root().join("scripts/pg.sh").display()
            ))
            .status();
    }
}

fn small(cluster: &PrivateCluster) -> ChaosConfig {
    assert!(
        std::env::var_os("SPICEDB_LIBRARY_PATH").is_some(),
        "SPICEDB_LIBRARY_PATH is not set: export SPICEDB_LIBRARY_PATH=$(scripts/fetch-spicedb.sh), or run scripts/test.sh"
    );
    let mut config = ChaosConfig::full(cluster.database_url.clone());
    config.log_dir = std::env::temp_dir().join(format!(
        "authz-outbox-chaos-test-{}-{}",
        std::process::id(),
        cluster.pg_dir.rsplit('.').next().unwrap_or("x")
    ));
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_operations_under_faults_kills_and_a_restart_converge() {
    let cluster = PrivateCluster::start();
    let mut config = small(&cluster);
    config.ops = 1_000;
    config.rate = 50.0;
    config.keys = 200;
    config.agents = 10;
    config.users = 5;
    config.drivers = 4;
    config.kill_every = Duration::from_secs(2);
    config.pg_restart_cmd = Some(cluster.restart_command());
    config.quiesce_timeout = Duration::from_secs(60);
    config.seed = 7;

    let summary = chaos::run(config)
        .await
        .expect("the chaos run could be carried out");
    let json = serde_json::to_string_pretty(&summary).expect("summary serializes");
    eprintln!("{json}");
    assert!(
        summary.ok,
        "chaos run failed: {:?}\n{json}",
        summary.failures
    );
    assert_eq!(summary.ops_total, 1_000);
    assert_eq!(summary.drift, Some(0));
    assert_eq!(summary.pg_restarts, 1);
    assert!(
        summary.kills >= 3,
        "expected several kills, got {}",
        summary.kills
    );
    assert!(summary.faults_injected > 0, "no faults were injected");
    assert!(summary.checks.passed > 0 && summary.checks.failed == 0);
    drop(cluster);
}

/// The same run delivering straight to SpiceDB (`run --target spicedb`):
/// gRPC faults (UNAVAILABLE, INTERNAL, RESOURCE_EXHAUSTED, hangs past the
/// deadline, writes applied then UNAVAILABLE), kills and a PostgreSQL
/// restart, then zero drift by reconcile and every check as the rows say.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_operations_delivered_straight_to_spicedb_converge() {
    let cluster = PrivateCluster::start();
    let mut config = small(&cluster);
    config.target = chaos::Target::SpiceDb;
    config.ops = 1_000;
    config.rate = 50.0;
    config.keys = 200;
    config.agents = 10;
    config.users = 5;
    config.drivers = 4;
    config.kill_every = Duration::from_secs(2);
    config.pg_restart_cmd = Some(cluster.restart_command());
    config.quiesce_timeout = Duration::from_secs(60);
    config.seed = 7;

    let summary = chaos::run(config)
        .await
        .expect("the chaos run could be carried out");
    let json = serde_json::to_string_pretty(&summary).expect("summary serializes");
    eprintln!("{json}");
    assert!(
        summary.ok,
        "chaos run failed: {:?}\n{json}",
        summary.failures
    );
    assert_eq!(summary.drift, Some(0));
    assert!(summary.faults_injected > 0, "no faults were injected");
    assert!(summary.checks.passed > 0 && summary.checks.failed == 0);
    drop(cluster);
}

/// WAL capture (`migrate --capture wal`): every write reaches the outbox
/// through the workers' relay. The kills land between the relay's read and
/// its confirm, PostgreSQL restarts, and the relay's slot is dropped once
/// mid-run (its captures lost: a gap the workers' reconcile heals). Ends
/// with zero drift and every check as the rows say.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_operations_captured_through_the_wal_converge() {
    let cluster = PrivateCluster::start();
    let wal_level = Command::new("psql")
        .args([cluster.database_url.as_str(), "-Atc", "SHOW wal_level"])
        .output()
        .expect("psql runs");
    assert_eq!(
        String::from_utf8_lossy(&wal_level.stdout).trim(),
        "logical",
        "WAL capture needs a cluster with wal_level = logical: run scripts/test.sh (PG_EXTRA_CONF)"
    );
    let mut config = small(&cluster);
    config.target = chaos::Target::SpiceDb;
    config.capture_wal = true;
    config.drop_slot_at = Some(0.7);
    config.ops = 1_000;
    config.rate = 50.0;
    config.keys = 200;
    config.agents = 10;
    config.users = 5;
    config.drivers = 4;
    config.kill_every = Duration::from_secs(2);
    config.pg_restart_cmd = Some(cluster.restart_command());
    config.quiesce_timeout = Duration::from_secs(90);
    config.seed = 11;

    let summary = chaos::run(config)
        .await
        .expect("the chaos run could be carried out");
    let json = serde_json::to_string_pretty(&summary).expect("summary serializes");
    eprintln!("{json}");
    assert!(
        summary.ok,
        "chaos run failed: {:?}\n{json}",
        summary.failures
    );
    assert_eq!(summary.drift, Some(0));
    assert_eq!(summary.pg_restarts, 1);
    assert_eq!(summary.slot_drops, 1);
    assert!(
        summary.kills >= 3,
        "expected several kills, got {}",
        summary.kills
    );
    assert!(summary.checks.passed > 0 && summary.checks.failed == 0);
    drop(cluster);
}

/// `migrate --capture wal` on a cluster without `wal_level = logical` (the
/// default, `replica`) refuses in one line naming the setting, and changes
/// nothing: the capture stays in table mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_capture_without_logical_wal_is_refused_in_one_line() {
    let cluster = PrivateCluster::start_with(None);
    let pool = sqlx::PgPool::connect(&cluster.database_url)
        .await
        .expect("connects");
    authz_outbox_proof::load_host_schema(&pool)
        .await
        .expect("host schema");
    let bin = chaos::ChaosConfig::full(cluster.database_url.clone())
        .bin_dir
        .join("authz-outbox");
    let out = Command::new(&bin)
        .args(["migrate", "--capture", "wal"])
        .env("DATABASE_URL", &cluster.database_url)
        .output()
        .expect("migrate runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("wal_level = logical") && stderr.contains("(it is replica)"),
        "{stderr}"
    );
    let installed: bool = sqlx::query_scalar("SELECT to_regclass('authz_outbox') IS NOT NULL")
        .fetch_one(&pool)
        .await
        .expect("query");
    assert!(!installed, "refused before anything changed");
    pool.close().await;
    drop(cluster);
}

/// The assertions can fail: a key row removed behind the outbox's back
/// (triggers off, so no deregister) must show up as reconcile drift and as a
/// deleted key its creator can still read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_deleted_behind_the_outbox_fails_the_run() {
    let cluster = PrivateCluster::start();
    let mut config = small(&cluster);
    config.ops = 200;
    config.rate = 0.0;
    config.keys = 50;
    config.agents = 5;
    config.users = 3;
    config.drivers = 2;
    config.fault_rate = 0.0;
    config.kill_every = Duration::from_secs(3600);
    config.sabotage = true;

    let summary = chaos::run(config)
        .await
        .expect("the chaos run could be carried out");
    assert!(!summary.ok, "a sabotaged run passed");
    assert_eq!(summary.drift, Some(1), "{:?}", summary.reconcile);
    assert_eq!(summary.checks.failed, 1, "{:?}", summary.checks);
    drop(cluster);
}
