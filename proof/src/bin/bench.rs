//! `bench`: the benchmarks behind BENCHMARKS.md. Run through
//! `scripts/bench.sh`, which provides a durable PostgreSQL (fsync and
//! synchronous_commit on), the SpiceDB library and release binaries.

#[path = "../bench/mod.rs"]
mod bench;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};

use bench::report::{Machine, Results};
use bench::svg::{Series, cdf_chart};
use bench::{
    ceiling, delivery, env::Env, host_writes, latency, reconcile, target, ui, wal, write_path,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Which {
    Write,
    HostWrites,
    Delivery,
    /// `run --target spicedb` vs the engine's own write capacity.
    Target,
    Ceiling,
    Latency,
    /// WAL capture: the relay's throughput into the outbox.
    Relay,
    /// WAL capture: commit-to-delivered latency (as `latency`, on a
    /// database migrated with `--capture wal`).
    LatencyWal,
    Reconcile,
    /// The operator page's latency per page at a million outbox rows.
    Ui,
}

#[derive(Debug, Parser)]
#[command(about = "authz-outbox benchmarks")]
struct Args {
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// Directory of the release `authz-outbox` and `agentex-auth-dev` binaries.
    #[arg(long, env = "BENCH_BIN_DIR", default_value = "target/release")]
    bin_dir: PathBuf,
    /// Benchmarks to run (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Which>,
    /// Where results.json and latency.svg go.
    #[arg(long, default_value = "docs/bench")]
    out_dir: PathBuf,

    #[arg(long, default_value_t = 8)]
    write_concurrency: usize,
    /// Rounds per write-path variant (the ratio moves by several points
    /// between runs on a shared machine; more rounds steady it).
    #[arg(long, default_value_t = 8)]
    write_rounds: usize,
    #[arg(long, default_value_t = 2.0)]
    write_round_secs: f64,

    /// Interleaved rounds per host write (key creation, task creation,
    /// live-to-live status update), each giving every variant (captured,
    /// same tables with our triggers disabled, trigger-less copy) a turn.
    #[arg(long, default_value_t = 10)]
    host_write_rounds: usize,
    #[arg(long, default_value_t = 2.0)]
    host_write_round_secs: f64,

    /// Rows per delivery drain (agentex-auth-dev does about 1,500-2,000 registers/s here).
    #[arg(long, default_value_t = 50_000)]
    delivery_rows: i64,
    #[arg(long, default_value_t = 16)]
    delivery_concurrency: usize,
    #[arg(long, default_value_t = 2)]
    delivery_rounds: usize,
    /// `--batch-size` of the worker processes (the worker's default: 100).
    #[arg(long, default_value_t = 100)]
    delivery_batch_size: usize,
    /// Skip the second arrangement (agentex-auth-dev pinned to a CPU of its
    /// own, everything else on the others).
    #[arg(long)]
    delivery_no_pinning: bool,

    /// Rows per delivery-target drain (`--only target`).
    #[arg(long, default_value_t = 20_000)]
    target_rows: i64,
    #[arg(long, default_value_t = 16)]
    target_concurrency: usize,
    #[arg(long, default_value_t = 2)]
    target_rounds: usize,
    /// `--spicedb-batch` of the batching variant.
    #[arg(long, default_value_t = 50)]
    target_batch: usize,

    #[arg(long, default_value_t = 50_000)]
    ceiling_rows: i64,
    /// The ceiling is about the worker's own overhead, so it runs wide:
    /// with an instant sink, small batches measure round trips, not the worker.
    #[arg(long, default_value_t = 512)]
    ceiling_concurrency: usize,
    #[arg(long, default_value_t = 1000)]
    ceiling_batch_size: usize,

    /// Captured rows the relay benchmark writes with no relay running,
    /// then times the relay on.
    #[arg(long, default_value_t = 100_000)]
    relay_rows: i64,
    /// Captured rows per writing transaction (1: a key per transaction).
    #[arg(long, default_value_t = 1)]
    relay_rows_per_tx: i64,
    #[arg(long, default_value_t = 3)]
    relay_rounds: usize,

    #[arg(long, default_value_t = 200)]
    latency_rate: u32,
    #[arg(long, default_value_t = 20.0)]
    latency_secs: f64,

    /// Keys for the full-size reconcile run against the instant read source
    /// (each key has 2 relationships); 0 skips it.
    #[arg(long, default_value_t = 1_000_000)]
    reconcile_keys: i64,
    /// Keys for the reconcile run against agentex-auth-dev's real engine,
    /// whose in-memory datastore reads in O(N²); 0 skips it.
    #[arg(long, default_value_t = 200_000)]
    reconcile_engine_keys: i64,
    /// Tasks beside the keys in the instant-source run (2 relationships
    /// each, the parent through `task_agents`); the engine run gets the same
    /// share of its keys.
    #[arg(long, default_value_t = 1_000_000)]
    reconcile_tasks: i64,
    #[arg(long, default_value_t = 1000)]
    reconcile_agents: i64,
    #[arg(long, default_value_t = 100)]
    reconcile_drift: i64,
    /// `authz-outbox reconcile --page-size`.
    #[arg(long, default_value_t = 1000)]
    reconcile_page_size: u32,

    /// Outbox rows behind the operator page (`--only ui`).
    #[arg(long, default_value_t = 1_000_000)]
    ui_rows: i64,
    /// Dead rows among them.
    #[arg(long, default_value_t = 10_000)]
    ui_dead: i64,
    /// Requests per page.
    #[arg(long, default_value_t = 50)]
    ui_requests: usize,
    /// Registers per drain when measuring delivery with and without the page.
    #[arg(long, default_value_t = 50_000)]
    ui_delivery_rows: i64,
    /// Interleaved rounds of that comparison (0 skips it).
    #[arg(long, default_value_t = 3)]
    ui_delivery_rounds: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let env = Env {
        database_url: args.database_url.clone(),
        bin_dir: args.bin_dir.clone(),
    };
    let runs = |w: Which| args.only.is_empty() || args.only.contains(&w);
    env.migrate().await?;
    let mut results = Results {
        machine: Some(machine(&env).await?),
        ..Results::default()
    };

    if runs(Which::Write) {
        eprintln!("bench: write path");
        results.write_path = Some(
            write_path::run(
                &env,
                &write_path::Config {
                    concurrency: args.write_concurrency,
                    rounds: args.write_rounds,
                    round: Duration::from_secs_f64(args.write_round_secs),
                    remote_delay: Duration::from_millis(5),
                },
            )
            .await
            .context("write path")?,
        );
    }
    if runs(Which::HostWrites) {
        eprintln!("bench: capture cost on host writes (keys, tasks, status updates)");
        results.host_writes = Some(
            host_writes::run(
                &env,
                &host_writes::Config {
                    concurrency: args.write_concurrency,
                    rounds: args.host_write_rounds,
                    round: Duration::from_secs_f64(args.host_write_round_secs),
                    tasks: 10_000,
                },
            )
            .await
            .context("host writes")?,
        );
    }
    if runs(Which::Delivery) {
        eprintln!("bench: delivery");
        let config = delivery::Config {
            rows: args.delivery_rows,
            concurrency: args.delivery_concurrency,
            rounds: args.delivery_rounds,
            batch_size: args.delivery_batch_size,
            pinned: !args.delivery_no_pinning,
        };
        results.delivery = Some(delivery::run(&env, &config).await.context("delivery")?);
    }
    if runs(Which::Target) {
        eprintln!("bench: delivery targets");
        let config = target::Config {
            rows: args.target_rows,
            concurrency: args.target_concurrency,
            rounds: args.target_rounds,
            batch: args.target_batch,
            batch_size: args.delivery_batch_size,
        };
        results.delivery_target = Some(
            target::run(&env, &config)
                .await
                .context("delivery targets")?,
        );
    }
    if runs(Which::Ceiling) {
        eprintln!("bench: worker ceiling");
        let config = ceiling::Config {
            rows: args.ceiling_rows,
            concurrency: args.ceiling_concurrency,
            batch_size: args.ceiling_batch_size,
        };
        results.ceiling = Some(
            ceiling::run(&env, &config)
                .await
                .context("worker ceiling")?,
        );
    }
    if runs(Which::Latency) {
        eprintln!("bench: latency");
        let config = latency::Config {
            rate: args.latency_rate,
            duration: Duration::from_secs_f64(args.latency_secs),
            wal: false,
        };
        results.latency = Some(latency::run(&env, &config).await.context("latency")?);
    }
    if runs(Which::Relay) || runs(Which::LatencyWal) {
        let pool = env.pool(1).await?;
        let available = wal::available(&pool).await?;
        pool.close().await;
        if !available {
            eprintln!("bench: wal_level is not logical: no wal-mode relay or latency run");
        } else {
            if runs(Which::Relay) {
                eprintln!("bench: WAL relay throughput");
                let config = wal::RelayConfig {
                    rows: args.relay_rows,
                    rows_per_tx: args.relay_rows_per_tx,
                    rounds: args.relay_rounds,
                };
                results.relay = Some(
                    wal::relay_throughput(&env, &config)
                        .await
                        .context("relay throughput")?,
                );
            }
            if runs(Which::LatencyWal) {
                eprintln!("bench: latency, wal mode");
                let wal_env = wal::wal_env(&env, "bench_wal_latency").await?;
                let config = latency::Config {
                    rate: args.latency_rate,
                    duration: Duration::from_secs_f64(args.latency_secs),
                    wal: true,
                };
                results.latency_wal = Some(
                    latency::run(&wal_env, &config)
                        .await
                        .context("latency, wal mode")?,
                );
            }
        }
    }
    if runs(Which::Reconcile) {
        let runs = [
            (reconcile::Source::Engine, args.reconcile_engine_keys),
            (reconcile::Source::Instant, args.reconcile_keys),
        ];
        for (source, keys) in runs.into_iter().filter(|(_, keys)| *keys > 0) {
            eprintln!("bench: reconcile, {keys} keys, {source:?} source");
            // The engine run keeps the instant run's ratio of tasks to keys.
            let tasks = match source {
                reconcile::Source::Instant => args.reconcile_tasks,
                reconcile::Source::Engine if args.reconcile_keys > 0 => {
                    args.reconcile_tasks * keys / args.reconcile_keys
                }
                reconcile::Source::Engine => 0,
            };
            let config = reconcile::Config {
                keys,
                tasks,
                agents: args.reconcile_agents,
                drift: args.reconcile_drift,
                page_size: args.reconcile_page_size,
                source,
            };
            let result = reconcile::run(&env, &config)
                .await
                .with_context(|| format!("reconcile ({source:?} source)"))?;
            results.reconcile.push(result);
        }
    }

    if runs(Which::Ui) {
        eprintln!("bench: operator page");
        let config = ui::Config {
            rows: args.ui_rows,
            dead: args.ui_dead,
            requests: args.ui_requests,
            delivery_rows: args.ui_delivery_rows,
            delivery_rounds: args.ui_delivery_rounds,
        };
        results.ui = Some(ui::run(&env, &config).await.context("operator page")?);
    }

    results.judge();
    results.print();
    std::fs::create_dir_all(&args.out_dir)?;
    let json = args.out_dir.join("results.json");
    std::fs::write(&json, serde_json::to_string_pretty(&results)? + "\n")?;
    let svg = picture(&results);
    if let Some(svg) = svg {
        std::fs::write(args.out_dir.join("latency.svg"), svg)?;
    }
    eprintln!("bench: wrote {}", json.display());
    Ok(())
}

/// Write-path latencies and commit-to-delivered latency in one chart.
fn picture(results: &Results) -> Option<String> {
    let mut series = Vec::new();
    if let Some(w) = &results.write_path {
        for (v, colour) in w.variants.iter().zip(["#1f77b4", "#2ca02c", "#d62728"]) {
            series.push(Series {
                label: format!(
                    "create, {} (p50 {:.1} ms)",
                    v.variant.name(),
                    v.latency.p50_ms
                ),
                samples_ms: &v.samples_ms,
                colour,
            });
        }
    }
    if let Some(l) = &results.latency {
        series.push(Series {
            label: format!(
                "commit→delivered (p50 {:.1} ms)",
                l.commit_to_delivered.p50_ms
            ),
            samples_ms: &l.samples_ms,
            colour: "#9467bd",
        });
    }
    (!series.is_empty()).then(|| {
        cdf_chart(
            "authz-outbox: key creation (8 clients) and commit-to-delivered (200 keys/s)",
            &series,
        )
    })
}

async fn machine(env: &Env) -> anyhow::Result<Machine> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let git = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let pool = env.pool(1).await?;
    let setting = |name: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, String>("SELECT current_setting($1)")
                .bind(name)
                .fetch_one(&pool)
                .await
                .unwrap_or_default()
        }
    };
    Ok(Machine {
        nproc: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        cpu,
        memory_gib: mem_kib / 1024.0 / 1024.0,
        date,
        git_commit: git,
        postgres_fsync: setting("fsync").await,
        postgres_synchronous_commit: setting("synchronous_commit").await,
    })
}
