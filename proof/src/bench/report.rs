//! The results of one run: printed as a table, written as `results.json`.

use serde::Serialize;

use super::ceiling::CeilingResult;
use super::delivery::DeliveryResult;
use super::latency::LatencyResult;
use super::reconcile::ReconcileResult;
use super::write_path::WritePathResult;

#[derive(Debug, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu: String,
    pub memory_gib: f64,
    pub date: String,
    pub git_commit: String,
    pub postgres_fsync: String,
    pub postgres_synchronous_commit: String,
}

#[derive(Debug, Serialize, Default)]
pub struct Results {
    pub machine: Option<Machine>,
    pub write_path: Option<WritePathResult>,
    pub host_writes: Option<super::host_writes::HostWritesResult>,
    pub delivery: Option<DeliveryResult>,
    /// `run --target spicedb` against the engine's own write capacity.
    pub delivery_target: Option<super::target::TargetResult>,
    pub ceiling: Option<CeilingResult>,
    pub latency: Option<LatencyResult>,
    /// WAL capture: the relay's throughput into the outbox.
    pub relay: Option<super::wal::RelayResult>,
    /// WAL capture: the latency benchmark on a `--capture wal` database.
    pub latency_wal: Option<LatencyResult>,
    pub reconcile: Vec<ReconcileResult>,
    /// The operator page at size (`--only ui`).
    pub ui: Option<super::ui::UiResult>,
    pub targets: Vec<Target>,
}

#[derive(Debug, Serialize)]
pub struct Target {
    pub name: String,
    pub target: String,
    pub measured: String,
    pub met: bool,
}

impl Results {
    /// Checks each measured figure against its target.
    pub fn judge(&mut self) {
        let mut t = Vec::new();
        let mut add = |name: &str, target: &str, measured: String, met: bool| {
            t.push(Target {
                name: name.into(),
                target: target.into(),
                measured,
                met,
            })
        };
        if let Some(ui) = &self.ui {
            let worst = ui.worst_p99_ms();
            add(
                "operator page, slowest page's p99 (1M outbox rows, 10k dead)",
                "< 200 ms",
                format!("{worst:.1} ms"),
                worst < 200.0,
            );
            if let Some(d) = &ui.delivery {
                add(
                    "worker ceiling with /ui/ polled every second vs without (median of the interleaved rounds' paired changes)",
                    "no slowdown beyond 5 %",
                    format!("{:+.1} %", d.paired_change() * 100.0),
                    d.paired_change() >= super::ui::DeliveryWithPage::MEASURABLE,
                );
            }
        }
        if let Some(w) = &self.write_path {
            let cost = 1.0 - w.capture_vs_plain_throughput;
            add(
                "capture cost vs plain insert (throughput)",
                "<= 15%",
                format!("{:.1}%", cost * 100.0),
                cost <= 0.15,
            );
            add(
                "inline p50 / capture p50",
                ">= 3x",
                format!("{:.2}x", w.inline_vs_capture_p50),
                w.inline_vs_capture_p50 >= 3.0,
            );
        }
        if let Some(h) = &self.host_writes {
            use super::host_writes::{CaptureMode, Variant, Workload};
            let table = Variant::Captured(CaptureMode::Table);
            let cost = |w: Workload, base: Variant| h.workload(w).and_then(|r| r.cost(table, base));
            if let Some(c) = cost(Workload::StatusUpdate, Variant::Copy) {
                add(
                    "table mode: live->live task status updates vs the trigger-less copy (median cost)",
                    "<= 5%",
                    format!("{:.1}% ({} outbox rows)", c * 100.0, h.status_outbox_rows),
                    c <= 0.05 && h.status_outbox_rows == 0,
                );
            }
            if let Some(c) = cost(Workload::StatusUpdate, Variant::Disabled) {
                add(
                    "table mode: live->live task status updates vs the same table, triggers disabled",
                    "<= 5%",
                    format!("{:.1}%", c * 100.0),
                    c <= 0.05,
                );
            }
            if let Some(c) = cost(Workload::TaskCreation, Variant::Disabled) {
                add(
                    "table mode: task creation (tasks, task_agents, agent_task_tracker) vs triggers disabled",
                    "<= 15%",
                    format!("{:.1}%", c * 100.0),
                    c <= 0.15,
                );
            }
            if let Some(c) = cost(Workload::KeyCreation, Variant::Disabled) {
                add(
                    "table mode: key creation vs triggers disabled",
                    "<= 15%",
                    format!("{:.1}%", c * 100.0),
                    c <= 0.15,
                );
            }
            let wal = Variant::Captured(CaptureMode::Wal);
            let wal_cost =
                |w: Workload, base: Variant| h.workload(w).and_then(|r| r.cost(wal, base));
            if let Some(c) = wal_cost(Workload::KeyCreation, Variant::Disabled) {
                add(
                    "wal mode (relay running): key creation vs triggers disabled",
                    "<= 10%",
                    format!("{:.1}%", c * 100.0),
                    c <= 0.10,
                );
            }
            if let Some(c) = wal_cost(Workload::TaskCreation, Variant::Disabled) {
                add(
                    "wal mode (relay running): task creation vs triggers disabled",
                    "<= 15%",
                    format!("{:.1}%", c * 100.0),
                    c <= 0.15,
                );
            }
            if let Some(c) = wal_cost(Workload::StatusUpdate, Variant::Copy) {
                add(
                    "wal mode: live->live task status updates vs the trigger-less copy",
                    "<= 5%",
                    format!(
                        "{:.1}% ({:?} outbox rows)",
                        c * 100.0,
                        h.wal_status_outbox_rows
                    ),
                    c <= 0.05 && h.wal_status_outbox_rows == Some(0),
                );
            }
        }
        if let Some(d) = &self.delivery_target {
            let modes = [
                ("shared CPUs", Some(&d.shared)),
                ("engine pinned", d.pinned.as_ref()),
            ];
            for (mode, m) in modes {
                let Some(m) = m else { continue };
                add(
                    &format!("--target spicedb vs the engine (1 row per write), {mode}"),
                    ">= 90%",
                    pct(m.spicedb_ratio),
                    m.spicedb_ratio >= 0.9,
                );
                add(
                    &format!("--target spicedb vs the engine (batched writes), {mode}"),
                    ">= 90%",
                    pct(m.spicedb_batched_ratio),
                    m.spicedb_batched_ratio >= 0.9,
                );
            }
        }
        if let Some(d) = &self.delivery {
            let modes = [
                ("shared CPUs", Some(&d.shared)),
                ("server pinned", d.pinned.as_ref()),
            ];
            for (mode, m) in modes {
                let Some(m) = m else { continue };
                add(
                    &format!("1 worker / server capacity, {mode}"),
                    ">= 80%",
                    pct(m.one_worker_ratio),
                    m.one_worker_ratio >= 0.8,
                );
                add(
                    &format!("2 workers / server capacity, {mode}"),
                    ">= 80%",
                    pct(m.two_workers_ratio),
                    m.two_workers_ratio >= 0.8,
                );
            }
        }
        if let Some(c) = &self.ceiling {
            add(
                "worker ceiling (1 process, wall)",
                ">= 10,000/s",
                format!("{:.0}/s", c.per_second),
                c.per_second >= 10_000.0,
            );
            add(
                "worker RSS under full load",
                "< 50 MiB",
                format!("{:.1} MiB", c.memory.peak_rss_mib),
                c.memory.peak_rss_mib < 50.0,
            );
        }
        if let Some(r) = &self.relay {
            add(
                "wal mode: relay, captured writes/s into the outbox (median)",
                ">= 20,000/s",
                format!("{:.0}/s", r.median_per_second),
                r.median_per_second >= 20_000.0,
            );
        }
        if let Some(l) = &self.latency_wal {
            let s = &l.commit_to_delivered;
            add(
                "wal mode: commit-to-delivered p50",
                "<= 5 ms",
                format!("{:.2} ms", s.p50_ms),
                s.p50_ms <= 5.0,
            );
            add(
                "wal mode: commit-to-delivered p95",
                "<= 25 ms",
                format!("{:.2} ms", s.p95_ms),
                s.p95_ms <= 25.0,
            );
        }
        if let Some(l) = &self.latency {
            let s = &l.commit_to_delivered;
            add(
                "commit-to-delivered p50",
                "<= 5 ms",
                format!("{:.2} ms", s.p50_ms),
                s.p50_ms <= 5.0,
            );
            add(
                "commit-to-delivered p95",
                "<= 25 ms",
                format!("{:.2} ms", s.p95_ms),
                s.p95_ms <= 25.0,
            );
            let w = &l.commit_to_wait_returned;
            add(
                "wait_for_resource over delivery, p50",
                "<= 2 ms more",
                format!("{:.2} ms more", w.p50_ms - s.p50_ms),
                w.p50_ms - s.p50_ms <= 2.0,
            );
            add(
                "worker RSS idle / at 200 keys/s",
                "< 50 MiB",
                format!(
                    "{:.1} / {:.1} MiB",
                    l.worker_idle_rss_mib, l.worker_under_load.peak_rss_mib
                ),
                l.worker_under_load.peak_rss_mib < 50.0,
            );
        }
        for r in &self.reconcile {
            add(
                &format!(
                    "reconcile {} keys + {} tasks ({:?}) wall time",
                    r.keys, r.tasks, r.source
                ),
                "< 60 s",
                format!("{:.1} s", r.seconds),
                r.seconds < 60.0,
            );
            add(
                &format!(
                    "reconcile {} keys + {} tasks ({:?}) peak RSS",
                    r.keys, r.tasks, r.source
                ),
                "< 200 MiB",
                format!("{:.1} MiB", r.max_rss_mib),
                r.max_rss_mib < 200.0,
            );
        }
        self.targets = t;
    }

    pub fn print(&self) {
        if let Some(ui) = &self.ui {
            ui.print();
        }
        if let Some(h) = &self.host_writes {
            h.print();
        }
        if let Some(w) = &self.write_path {
            println!(
                "\nWrite path ({} clients, {} rounds x {:.0} s, fsync+synchronous_commit on)",
                w.concurrency, w.rounds, w.round_seconds
            );
            println!(
                "{:<10} {:>10} {:>10} {:>10} {:>10}",
                "variant", "keys/s", "p50 ms", "p95 ms", "p99 ms"
            );
            for v in &w.variants {
                println!(
                    "{:<10} {:>10.0} {:>10.2} {:>10.2} {:>10.2}",
                    v.variant.name(),
                    v.per_second,
                    v.latency.p50_ms,
                    v.latency.p95_ms,
                    v.latency.p99_ms
                );
            }
        }
        if let Some(t) = &self.delivery_target {
            println!(
                "\nDelivery targets ({} rows per drain, {} in flight, batches of {})",
                t.rows, t.concurrency, t.batch
            );
            for (mode, d) in [
                ("shared CPUs", Some(&t.shared)),
                ("engine pinned", t.pinned.as_ref()),
            ] {
                let Some(d) = d else { continue };
                println!("  {mode}:");
                for (name, rate) in [
                    ("direct gRPC, 1 row per write", d.direct_per_second),
                    (
                        "run --target spicedb --spicedb-batch 1",
                        d.spicedb_per_second,
                    ),
                    ("direct gRPC, batched writes", d.direct_batched_per_second),
                    (
                        "run --target spicedb (batched)",
                        d.spicedb_batched_per_second,
                    ),
                    (
                        "run --target agentex-auth (HTTP)",
                        d.agentex_auth_per_second,
                    ),
                ] {
                    println!("    {name:<42} {rate:>8.0} rows/s");
                }
            }
        }
        if let Some(d) = &self.delivery {
            println!(
                "\nDelivery into agentex-auth-dev ({} rows per drain, {} in flight)",
                d.rows, d.concurrency
            );
            let modes = [
                ("shared CPUs", Some(&d.shared)),
                ("server pinned", d.pinned.as_ref()),
            ];
            for (mode, m) in modes {
                let Some(m) = m else { continue };
                println!(
                    "  {mode}: direct {:.0}/s, 1 worker {:.0}/s ({}), 2 workers {:.0}/s ({})",
                    m.direct_per_second,
                    m.one_worker_per_second,
                    pct(m.one_worker_ratio),
                    m.two_workers_per_second,
                    pct(m.two_workers_ratio)
                );
            }
        }
        if let Some(c) = &self.ceiling {
            println!(
                "\nWorker ceiling: {} rows in {:.2} s = {:.0}/s (first-to-last delivery {:.0}/s); peak RSS {:.1} MiB; {:.2} commits/row",
                c.rows,
                c.seconds,
                c.per_second,
                c.delivering_per_second,
                c.memory.peak_rss_mib,
                c.commits_per_row
            );
        }
        if let Some(l) = &self.latency {
            let s = &l.commit_to_delivered;
            println!(
                "\nLatency at {} keys/s for {:.0} s: commit-to-delivered p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms (histogram p50<={:?} p95<={:?} p99<={:?} ms)",
                l.rate_per_second,
                l.seconds,
                s.p50_ms,
                s.p95_ms,
                s.p99_ms,
                l.histogram_p50_le_ms,
                l.histogram_p95_le_ms,
                l.histogram_p99_le_ms
            );
            let (w, a) = (&l.commit_to_wait_returned, &l.wait_added);
            println!(
                "  commit-to-wait-returned p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms; added per key over delivered_at p50 {:.2} ms, p95 {:.2} ms",
                w.p50_ms, w.p95_ms, w.p99_ms, a.p50_ms, a.p95_ms
            );
            println!(
                "  worker RSS idle {:.1} MiB, under load {:.1} MiB",
                l.worker_idle_rss_mib, l.worker_under_load.peak_rss_mib
            );
        }
        if let Some(r) = &self.relay {
            println!(
                "\nWAL relay: {} captured rows ({} per transaction), {} rounds: median {:.0}/s [min {:.0}, max {:.0}] worker start to done; first batch to last median {:.0}/s (load average {:.1} -> {:.1})",
                r.rows,
                r.rows_per_tx,
                r.rounds.len(),
                r.median_per_second,
                r.min_per_second,
                r.max_per_second,
                r.median_relaying_per_second,
                r.load_average.0,
                r.load_average.1
            );
        }
        if let Some(l) = &self.latency_wal {
            let s = &l.commit_to_delivered;
            println!(
                "\nLatency, wal mode, at {} keys/s for {:.0} s: commit-to-delivered p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms (histogram p50<={:?} p95<={:?} p99<={:?} ms)",
                l.rate_per_second,
                l.seconds,
                s.p50_ms,
                s.p95_ms,
                s.p99_ms,
                l.histogram_p50_le_ms,
                l.histogram_p95_le_ms,
                l.histogram_p99_le_ms
            );
            let w = &l.commit_to_wait_returned;
            println!(
                "  commit-to-wait-returned p50 {:.2} ms, p95 {:.2} ms; create p50 {:.2} ms",
                w.p50_ms, w.p95_ms, l.create.p50_ms
            );
        }
        for r in &self.reconcile {
            println!(
                "\nReconcile ({:?} source): {} keys, {} tasks, {} relationships: {:.1} s, peak RSS {:.1} MiB (exit {:?})",
                r.source, r.keys, r.tasks, r.relationships, r.seconds, r.max_rss_mib, r.exit_code
            );
        }
        println!("\n{:<42} {:>12} {:>22}  met", "target", "goal", "measured");
        for t in &self.targets {
            println!(
                "{:<42} {:>12} {:>22}  {}",
                t.name,
                t.target,
                t.measured,
                if t.met { "yes" } else { "NO" }
            );
        }
    }
}

fn pct(ratio: f64) -> String {
    format!("{:.1}%", ratio * 100.0)
}
