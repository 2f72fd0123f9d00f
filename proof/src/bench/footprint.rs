//! Resident memory of a child process, from `/proc/<pid>/status`: `VmRSS`
//! now and `VmHWM` (the peak so far). A [`Sampler`] polls while a process
//! works, because a process that exits takes its `VmHWM` with it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio::task::JoinHandle;

/// Kibibytes of (`VmRSS`, `VmHWM`), or `None` once the process is gone.
pub fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Memory {
    /// Largest `VmRSS` seen while sampling, MiB.
    pub peak_rss_mib: f64,
    /// `VmHWM` at the last sample, MiB (the kernel's own peak).
    pub hwm_mib: f64,
}

/// Polls a process's memory every 50 ms until stopped or the process exits.
pub struct Sampler {
    peak_rss: Arc<AtomicU64>,
    hwm: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Sampler {
    pub fn start(pid: u32) -> Sampler {
        let peak_rss = Arc::new(AtomicU64::new(0));
        let hwm = Arc::new(AtomicU64::new(0));
        let (p, h) = (peak_rss.clone(), hwm.clone());
        let task = tokio::spawn(async move {
            while let Some((rss, high)) = rss_kib(pid) {
                p.fetch_max(rss, Ordering::Relaxed);
                h.fetch_max(high, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Sampler {
            peak_rss,
            hwm,
            task,
        }
    }

    pub fn stop(self) -> Memory {
        self.task.abort();
        Memory {
            peak_rss_mib: mib(self.peak_rss.load(Ordering::Relaxed)),
            hwm_mib: mib(self.hwm.load(Ordering::Relaxed)),
        }
    }
}

pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}
