//! The chaos convergence run: random host writes against three worker
//! processes while agentex-auth fails a fifth of its requests, workers are
//! SIGKILLed and PostgreSQL restarts; then, with the faults off, everything
//! must converge: no pending or dead rows, no drift, and every `check`
//! answering as the rows say.
//!
//! Access model (why a creator can read its key at all): the schema says
//! `api_key.read = owner & parent_agent->read`. The agents are created by
//! one `admin` principal, and before the storm every user of the pool is
//! granted the (legacy owner) edge on every agent, so `parent_agent->read`
//! holds for all of them; what decides a check is then exactly the key's own
//! `owner` edge, i.e. whether the outbox delivered the register and the
//! deregister in the right order. The parent edge itself is verified by
//! reconcile (a key under the wrong agent is `parent_mismatch` drift).
//!
//! - [`procs`]: the agentex-auth-dev and worker processes;
//! - [`driver`]: the random operations and what should exist afterwards;
//! - [`verify`]: the assertions.

pub mod driver;
pub mod procs;
pub mod verify;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use authz_outbox::capture;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::watch;

use driver::{DriverOutcome, DriverPlan, OpKind};
use procs::{AuthServer, Worker};

/// Where the workers deliver: agentex-auth-dev's HTTP API, or the same
/// engine's SpiceDB gRPC port (`run --target spicedb`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    #[value(name = "agentex-auth")]
    AgentexAuth,
    #[value(name = "spicedb")]
    SpiceDb,
}

/// Everything a run needs; the `chaos` binary's flags map onto it.
#[derive(Debug, Clone)]
pub struct ChaosConfig {
    /// A fresh (empty) database; the run applies the migrations.
    pub database_url: String,
    /// Where `authz-outbox` and `agentex-auth-dev` are.
    pub bin_dir: PathBuf,
    /// `libspicedb.so`; `None` leaves SPICEDB_LIBRARY_PATH to the environment.
    pub spicedb_library: Option<PathBuf>,
    /// Worker and server logs.
    pub log_dir: PathBuf,
    pub ops: u64,
    /// Operations per second (0: unpaced).
    pub rate: f64,
    pub keys: usize,
    pub agents: usize,
    pub users: usize,
    /// Concurrent driver tasks (each owns a share of the key slots).
    pub drivers: usize,
    pub workers: usize,
    /// Probability of a fault per agentex-auth request while the storm lasts.
    pub fault_rate: f64,
    pub hang: Duration,
    pub seed: u64,
    /// One worker is SIGKILLed (and restarted) this often.
    pub kill_every: Duration,
    pub request_timeout: Duration,
    pub lease: Duration,
    /// A shell command restarting PostgreSQL, run once when `pg_restart_at`
    /// of the operations are done; `None` skips the restart.
    pub pg_restart_cmd: Option<String>,
    pub pg_restart_at: f64,
    /// WAL capture (`migrate --capture wal`): captures reach the outbox
    /// through the workers' relay, which the kills hit between read and
    /// confirm like anything else.
    pub capture_wal: bool,
    /// With `capture_wal`: the relay's slot is dropped once when this
    /// fraction of the operations is done (a gap the workers' reconcile
    /// heals); `None` drops nothing.
    pub drop_slot_at: Option<f64>,
    /// How long the outbox gets to drain once the faults are off.
    pub quiesce_timeout: Duration,
    /// Self-test of the assertions: after the drain, delete one live key's
    /// row with the capture triggers disabled (no deregister), so SpiceDB
    /// keeps a tuple PostgreSQL no longer has. The run must then fail.
    pub sabotage: bool,
    /// Where the workers deliver. The faults, checks and reconcile are the
    /// same either way: both write into one SpiceDB engine.
    pub target: Target,
}

impl ChaosConfig {
    /// The full-size defaults of the issue: 10,000 operations, 2,000 key
    /// slots, 50 agents, 20% faults, three workers.
    pub fn full(database_url: String) -> ChaosConfig {
        ChaosConfig {
            database_url,
            bin_dir: procs::default_bin_dir(),
            spicedb_library: None,
            log_dir: std::env::temp_dir()
                .join(format!("authz-outbox-chaos-{}", std::process::id())),
            ops: 10_000,
            rate: 200.0,
            keys: 2_000,
            agents: 50,
            users: 20,
            drivers: 8,
            workers: 3,
            fault_rate: 0.2,
            hang: Duration::from_millis(1500),
            seed: 42,
            kill_every: Duration::from_secs(3),
            request_timeout: Duration::from_secs(1),
            lease: Duration::from_secs(3),
            pg_restart_cmd: None,
            pg_restart_at: 0.5,
            capture_wal: false,
            drop_slot_at: None,
            quiesce_timeout: Duration::from_secs(180),
            sabotage: false,
            target: Target::AgentexAuth,
        }
    }

    /// The fault configuration for `POST /_dev/faults`: the rate spread over
    /// every kind, a quarter of it writes that commit and then answer 503.
    pub fn faults(&self) -> Value {
        let r = self.fault_rate;
        json!({
            "seed": self.seed,
            "hang_ms": self.hang.as_millis() as u64,
            "retry_after_secs": 1,
            "all": {
                "status_500": r * 0.15,
                "status_502": r * 0.15,
                "status_503": r * 0.20,
                "status_429": r * 0.10,
                "hang": r * 0.15,
                "applied_then_503": r * 0.25,
            }
        })
    }
}

/// The JSON summary the run prints.
#[derive(Debug, Clone, Serialize)]
pub struct ChaosSummary {
    pub ok: bool,
    pub failures: Vec<String>,
    pub target: Target,
    pub seed: u64,
    pub ops: BTreeMap<OpKind, u64>,
    pub ops_total: u64,
    pub driver_retries: u64,
    pub keys_live: usize,
    pub keys_deleted: usize,
    pub outbox: verify::OutboxTotals,
    pub kills: u64,
    pub worker_starts: u64,
    /// Workers that ended with a failure status (a product crash: fails the run).
    pub worker_crashes: Vec<String>,
    /// Workers that shut down gracefully on a signal the run did not send
    /// (another process on the machine); restarted, reported, not a failure.
    pub workers_terminated_from_outside: Vec<String>,
    pub pg_restarts: u64,
    /// WAL capture: times the relay's slot was dropped under it.
    pub slot_drops: u64,
    pub faults_injected: u64,
    pub faults_by_kind: BTreeMap<String, u64>,
    pub checks: verify::CheckResults,
    pub reconcile: Option<verify::ReconcileResult>,
    pub drift: Option<u64>,
    /// Dead rows (every one needs an explanation) and rows still pending.
    pub unfinished_rows: Vec<verify::UnfinishedRow>,
    pub table_mismatches: Vec<String>,
    pub elapsed_seconds: BTreeMap<&'static str, f64>,
    pub log_dir: String,
}

fn progress(message: impl AsRef<str>) {
    eprintln!("chaos: {}", message.as_ref());
}

/// Runs the whole thing. An error means the run could not be carried out;
/// a run that found a problem returns a summary with `ok: false`.
pub async fn run(config: ChaosConfig) -> anyhow::Result<ChaosSummary> {
    let started = Instant::now();
    let mut elapsed = BTreeMap::new();
    std::fs::create_dir_all(&config.log_dir)
        .with_context(|| format!("creating {}", config.log_dir.display()))?;
    let pool = authz_outbox::db::connect(&config.database_url, (config.drivers + 4) as u32).await?;
    crate::load_host_schema(&pool).await?;
    authz_outbox::db::migrate(&pool).await?;
    if config.capture_wal {
        let mut conn = pool.acquire().await?;
        authz_outbox::relay::setup::enable_wal(&mut conn).await?;
        drop(conn);
        // The capture functions, generated again for WAL mode.
        authz_outbox::db::migrate(&pool).await?;
    }
    let existing: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM authz_outbox) + (SELECT count(*) FROM agents)",
    )
    .fetch_one(&pool)
    .await?;
    if existing > 0 {
        bail!(
            "the database is not empty ({existing} outbox rows and agents); the chaos run needs a fresh one"
        );
    }

    let auth = AuthServer::start(&config).await?;
    progress(format!(
        "agentex-auth-dev at {} (gRPC {}); logs in {}",
        auth.base_url,
        auth.grpc_endpoint,
        config.log_dir.display()
    ));
    let mut workers = Vec::new();
    for i in 0..config.workers {
        let mut w = Worker::new(i)?;
        w.spicedb_endpoint = auth.grpc_endpoint.clone();
        w.spawn(&config, &auth.base_url)?;
        workers.push(w);
    }

    let result = storm_and_verify(&config, &pool, &auth, &mut workers, &mut elapsed).await;
    for w in &mut workers {
        w.stop().await;
    }
    auth.stop().await;
    let mut summary = result?;
    elapsed.insert("total", started.elapsed().as_secs_f64());
    summary.elapsed_seconds = elapsed;
    summary.worker_starts = workers.iter().map(|w| w.starts).sum();
    Ok(summary)
}

async fn storm_and_verify(
    config: &ChaosConfig,
    pool: &sqlx::PgPool,
    auth: &AuthServer,
    workers: &mut Vec<Worker>,
    elapsed: &mut BTreeMap<&'static str, f64>,
) -> anyhow::Result<ChaosSummary> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let setup = Instant::now();
    setup_agents(config, pool, &http, &auth.base_url).await?;
    elapsed.insert("setup", setup.elapsed().as_secs_f64());

    post_json(
        &http,
        &format!("{}/_dev/faults", auth.base_url),
        &config.faults(),
    )
    .await?;
    post_json(
        &http,
        &format!("{}/_dev/stats/reset", auth.base_url),
        &json!({}),
    )
    .await?;
    progress(format!(
        "storm: {} ops ({}/s) over {} key slots and {} agents, {} drivers, {} workers, {:.0}% faults, a kill every {:?}{}",
        config.ops,
        config.rate,
        config.keys,
        config.agents,
        config.drivers,
        config.workers,
        config.fault_rate * 100.0,
        config.kill_every,
        if config.pg_restart_cmd.is_some() {
            ", one PostgreSQL restart"
        } else {
            ", no PostgreSQL restart"
        }
    ));

    // The storm: drivers, the killer and the PostgreSQL restart at once.
    let storm = Instant::now();
    let done = Arc::new(AtomicU64::new(0));
    let paused = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let plan = Arc::new(DriverPlan {
        pool: pool.clone(),
        tasks: config.drivers,
        ops: config.ops,
        slots: config.keys,
        agents: config.agents,
        users: config.users,
        seed: config.seed,
        done: done.clone(),
        retry_for: Duration::from_secs(90),
        rate: config.rate,
        wal: config.capture_wal,
        paused: paused.clone(),
    });
    let mut drivers = tokio::task::JoinSet::new();
    for task in 0..config.drivers {
        drivers.spawn(driver::drive(plan.clone(), task));
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let killer = tokio::spawn(killer(
        config.clone(),
        auth.base_url.clone(),
        std::mem::take(workers),
        stop_rx.clone(),
    ));
    let restarter = tokio::spawn(pg_restarter(config.clone(), done.clone(), stop_rx.clone()));
    let slot_dropper = tokio::spawn(slot_dropper(
        config.clone(),
        pool.clone(),
        done.clone(),
        paused,
        stop_rx,
    ));
    let reporter = {
        let done = done.clone();
        let total = config.ops;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                progress(format!("{} / {total} ops", done.load(Ordering::Relaxed)));
            }
        })
    };

    let mut outcome = DriverOutcome::default();
    let mut driver_error = None;
    while let Some(joined) = drivers.join_next().await {
        match joined.context("a driver task panicked")? {
            Ok(o) => {
                for (k, n) in o.ops {
                    *outcome.ops.entry(k).or_default() += n;
                }
                outcome.live.extend(o.live);
                outcome.deleted.extend(o.deleted);
                outcome.expectations.extend(o.expectations);
                outcome.retries += o.retries;
            }
            Err(e) => driver_error = Some(e),
        }
    }
    reporter.abort();
    let _ = stop_tx.send(true);
    let (returned, kills, exits) = killer.await.context("the killer panicked")??;
    *workers = returned;
    let pg_restarts = restarter.await.context("the restarter panicked")??;
    let slot_drops = slot_dropper.await.context("the slot dropper panicked")??;
    elapsed.insert("storm", storm.elapsed().as_secs_f64());
    if let Some(e) = driver_error {
        return Err(e.context("the driver could not carry out its operations"));
    }
    let ops_total: u64 = outcome.ops.values().sum();
    progress(format!(
        "storm over: {ops_total} ops, {kills} kills, {pg_restarts} PostgreSQL restarts; faults off, draining"
    ));

    // Faults off, then let the outbox drain.
    let stats: Value = http
        .get(format!("{}/_dev/stats", auth.base_url))
        .send()
        .await?
        .json()
        .await?;
    post_json(&http, &format!("{}/_dev/faults", auth.base_url), &json!({})).await?;
    let drain = Instant::now();
    if config.capture_wal {
        // Everything captured is in the outbox (the relay read past the
        // writes), and a gap's reconcile has run, before "quiet" means
        // anything.
        verify::wait_for_relay(pool, config.quiesce_timeout).await?;
    }
    let quiet = verify::wait_for_quiescence(pool, config.quiesce_timeout).await?;
    elapsed.insert("drain", drain.elapsed().as_secs_f64());
    let (faults_injected, faults_by_kind) = verify::faults_injected(&stats);
    if config.sabotage
        && let Some(key) = outcome.live.pop()
    {
        progress(format!(
            "sabotage: deleting api_key {} behind the outbox's back",
            key.id
        ));
        let mut tx = pool.begin().await?;
        sqlx::query("SET LOCAL session_replication_role = replica")
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM agent_api_keys WHERE id = $1")
            .bind(&key.id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        outcome.deleted.push(driver::DeletedKey {
            id: key.id,
            creator: key.creator,
        });
    }

    let mut failures = Vec::new();
    if !quiet {
        failures.push(format!(
            "the outbox did not drain within {:?} with faults off",
            config.quiesce_timeout
        ));
    }
    if config.pg_restart_cmd.is_some() && pg_restarts == 0 {
        failures.push("PostgreSQL was not restarted".into());
    }
    if !exits.crashed.is_empty() {
        failures.push(format!("{} worker processes crashed", exits.crashed.len()));
    }
    let outbox = verify::outbox_totals(pool).await?;
    if outbox.pending > 0 {
        failures.push(format!("{} rows still pending", outbox.pending));
    }
    if outbox.dead > 0 {
        failures.push(format!(
            "{} dead rows (faults are transient and a row dies only after 1,000 attempts and 24 h: none expected)",
            outbox.dead
        ));
    }
    let unfinished_rows = verify::unfinished_rows(pool).await?;
    let table_mismatches = verify::table_mismatches(pool, &outcome.live).await?;
    if !table_mismatches.is_empty() {
        failures.push(format!(
            "{} keys differ between the table and the driver's record",
            table_mismatches.len()
        ));
    }

    progress("reconcile --grace 0s");
    let reconcile = verify::reconcile(config, &auth.grpc_endpoint).await?;
    if reconcile.exit_code != Some(0) || reconcile.drift != Some(0) {
        failures.push(format!(
            "reconcile: exit {:?}, drift {:?}{}",
            reconcile.exit_code,
            reconcile.drift,
            if reconcile.stderr.is_empty() {
                String::new()
            } else {
                format!(" ({})", reconcile.stderr)
            }
        ));
    }
    progress(format!(
        "checking {} live and {} deleted keys through /v1/authz/check",
        outcome.live.len(),
        outcome.deleted.len()
    ));
    let checks = verify::check_access(
        &auth.base_url,
        &outcome.live,
        &outcome.deleted,
        &outcome.expectations,
        config.users,
    )
    .await?;
    if checks.failed > 0 {
        failures.push(format!("{} access checks failed", checks.failed));
    }

    Ok(ChaosSummary {
        ok: failures.is_empty(),
        failures,
        target: config.target,
        seed: config.seed,
        ops: outcome.ops,
        ops_total,
        driver_retries: outcome.retries,
        keys_live: outcome.live.len(),
        keys_deleted: outcome.deleted.len(),
        outbox,
        kills,
        worker_starts: 0,
        worker_crashes: exits.crashed,
        workers_terminated_from_outside: exits.terminated_from_outside,
        pg_restarts,
        slot_drops,
        faults_injected,
        faults_by_kind,
        checks,
        drift: reconcile.drift,
        reconcile: Some(reconcile),
        unfinished_rows,
        table_mismatches: table_mismatches.into_iter().take(30).collect(),
        elapsed_seconds: BTreeMap::new(),
        log_dir: config.log_dir.display().to_string(),
    })
}

/// The agents (owner `admin`), and every user's edge on every agent, with
/// no faults on: the fixture the storm runs against.
async fn setup_agents(
    config: &ChaosConfig,
    pool: &sqlx::PgPool,
    http: &reqwest::Client,
    base_url: &str,
) -> anyhow::Result<()> {
    let admin = driver::principal("admin");
    for a in 0..config.agents {
        let id = driver::agent_id(a);
        if config.capture_wal {
            // The host's own SQL: in WAL mode the library's outbox ids
            // exist only once the relay inserts the rows.
            let mut tx = pool.begin().await?;
            capture::set_principal(&mut tx, Some(&admin)).await?;
            sqlx::query(
                "INSERT INTO agents (id, name, description, status) VALUES ($1, $2, '', 'READY')",
            )
            .bind(&id)
            .bind(format!("chaos agent {a}"))
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
        } else {
            capture::create_agent(pool, &id, &format!("chaos agent {a}"), Some(&admin)).await?;
        }
    }
    let url = format!("{base_url}/v1/authz/grant");
    let mut set = tokio::task::JoinSet::new();
    for u in 0..config.users {
        let (http, url, agents) = (http.clone(), url.clone(), config.agents);
        set.spawn(async move {
            for a in 0..agents {
                let body = json!({
                    "principal": {"user_id": driver::user(u)},
                    "resource": {"type": "agent", "selector": driver::agent_id(a)},
                    "operation": "read",
                });
                post_json(&http, &url, &body).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(())
}

async fn post_json(http: &reqwest::Client, url: &str, body: &Value) -> anyhow::Result<()> {
    let resp = http
        .post(url)
        .json(body)
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        bail!("POST {url}: {status}: {text}");
    }
    Ok(())
}

/// SIGKILLs a random worker every `kill_every` and starts it again; also
/// restarts (and reports) any worker that ended on its own.
async fn killer(
    config: ChaosConfig,
    auth_url: String,
    mut workers: Vec<Worker>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<(Vec<Worker>, u64, Exits)> {
    let mut rng = StdRng::seed_from_u64(config.seed ^ 0x6b69_6c6c);
    let mut kills = 0;
    let mut exits = Exits::default();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(config.kill_every) => {}
            _ = stop.changed() => break,
        }
        restart_exited(&config, &auth_url, &mut workers, &mut exits).await?;
        if workers.is_empty() {
            continue;
        }
        let i = rng.random_range(0..workers.len());
        workers[i].kill().await;
        kills += 1;
        tracing::debug!(worker = %workers[i].id, "killed");
        tokio::time::sleep(Duration::from_millis(300)).await;
        workers[i].spawn(&config, &auth_url)?;
    }
    restart_exited(&config, &auth_url, &mut workers, &mut exits).await?;
    Ok((workers, kills, exits))
}

/// Workers that ended without being killed by us. `authz-outbox run` only
/// ends with status 0 after SIGTERM/SIGINT (a graceful shutdown), which the
/// run never sends mid-storm: someone else on the machine did. Any other
/// status is a crash of the product.
#[derive(Debug, Default)]
pub struct Exits {
    pub crashed: Vec<String>,
    pub terminated_from_outside: Vec<String>,
}

async fn restart_exited(
    config: &ChaosConfig,
    auth_url: &str,
    workers: &mut [Worker],
    exits: &mut Exits,
) -> anyhow::Result<()> {
    for w in workers {
        if let Some(status) = w.exited() {
            let line = format!("{} ended with {status}; see {}.log", w.id, w.id);
            if status.success() {
                exits.terminated_from_outside.push(line);
            } else {
                exits.crashed.push(line);
            }
            w.kill().await;
            w.spawn(config, auth_url)?;
        }
    }
    Ok(())
}

/// Drops the relay's slot once, when enough operations are done (WAL
/// capture only), as an operator's mistake or a failover before
/// PostgreSQL 17 would take it; whoever holds it is terminated first.
///
/// The writes pause around the drop, and the relay has read everything
/// before it: a capture made while no slot exists is lost with its creator
/// (who wrote it lives only in the writing transaction), which no reconcile
/// can restore — a lost creation comes back as `needs_owner` drift for an
/// operator (tests/wal_capture.rs shows that, and the healing of lost
/// deletes and moves). What this run proves is the rest: the relay finds
/// its slot gone under load, recreates it, records the gap, runs the
/// reconcile, and every later capture is relayed.
async fn slot_dropper(
    config: ChaosConfig,
    pool: sqlx::PgPool,
    done: Arc<AtomicU64>,
    paused: Arc<std::sync::atomic::AtomicBool>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<u64> {
    let (true, Some(fraction)) = (config.capture_wal, config.drop_slot_at) else {
        return Ok(0);
    };
    let at = (config.ops as f64 * fraction) as u64;
    while done.load(Ordering::Relaxed) < at {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            _ = stop.changed() => return Ok(0),
        }
    }
    paused.store(true, Ordering::SeqCst);
    let result = drop_slot_between_writes(&config, &pool, at).await;
    paused.store(false, Ordering::SeqCst);
    result
}

async fn drop_slot_between_writes(
    config: &ChaosConfig,
    pool: &sqlx::PgPool,
    at: u64,
) -> anyhow::Result<u64> {
    // Writes in progress end (a retried one within its retry window).
    tokio::time::sleep(Duration::from_secs(2)).await;
    verify::wait_for_relay(pool, config.quiesce_timeout).await?;
    for _ in 0..200 {
        let _ = sqlx::query(
            "SELECT pg_terminate_backend(s.active_pid) FROM pg_replication_slots s
             JOIN authz_outbox_relay r ON r.slot_name = s.slot_name
             WHERE s.active_pid IS NOT NULL",
        )
        .execute(pool)
        .await;
        let dropped: Result<Option<String>, _> = sqlx::query_scalar(
            "SELECT s.slot_name::text FROM pg_replication_slots s
             JOIN authz_outbox_relay r ON r.slot_name = s.slot_name,
             LATERAL pg_drop_replication_slot(s.slot_name) d",
        )
        .fetch_optional(pool)
        .await;
        match dropped {
            Ok(Some(slot)) => {
                progress(format!("dropped the relay's slot {slot} after {at} ops"));
                // Writes resume once the relay has found it gone and made
                // a new one.
                let started = Instant::now();
                loop {
                    let gaps: Option<i64> =
                        sqlx::query_scalar("SELECT gaps FROM authz_outbox_relay")
                            .fetch_optional(pool)
                            .await
                            .unwrap_or(None);
                    let recreated: bool = sqlx::query_scalar(
                        "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
                    )
                    .bind(&slot)
                    .fetch_one(pool)
                    .await
                    .unwrap_or(false);
                    if gaps.unwrap_or(0) >= 1 && recreated {
                        break;
                    }
                    if started.elapsed() > config.quiesce_timeout {
                        bail!(
                            "the relay did not recreate its slot within {:?}",
                            config.quiesce_timeout
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                return Ok(1);
            }
            Ok(None) => return Ok(0),
            Err(e) => {
                tracing::debug!(error = %e, "dropping the slot failed; again");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    bail!("could not drop the relay's slot in 200 tries")
}

/// Runs the restart command once, when enough operations are done.
async fn pg_restarter(
    config: ChaosConfig,
    done: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<u64> {
    let Some(cmd) = config.pg_restart_cmd.clone() else {
        return Ok(0);
    };
    let at = (config.ops as f64 * config.pg_restart_at) as u64;
    while done.load(Ordering::Relaxed) < at {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            _ = stop.changed() => return Ok(0),
        }
    }
    progress(format!("restarting PostgreSQL after {at} ops: {cmd}"));
    let started = Instant::now();
    let status = tokio::process::Command::new("bash")
        .args(["-c", &cmd])
        .status()
        .await
        .context("running the PostgreSQL restart command")?;
    if !status.success() {
        bail!("the PostgreSQL restart command failed ({status}): {cmd}");
    }
    progress(format!(
        "PostgreSQL back after {:.1}s",
        started.elapsed().as_secs_f64()
    ));
    Ok(1)
}
