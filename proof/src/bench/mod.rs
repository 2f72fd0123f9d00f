//! The benchmarks behind `BENCHMARKS.md`, one module per benchmark. Each
//! comparison is measured side by side in one run (variants interleaved in
//! rounds where it makes sense), so its ratio holds on a noisy machine even
//! when the absolute numbers move.
//!
//! Shared pieces: [`env`] (database, binaries, processes), [`stats`]
//! (percentiles), [`sink`] (a trivial in-process agentex-auth stand-in),
//! [`report`] (the table and `results.json`) and [`svg`] (the picture).

pub mod ceiling;
pub mod delivery;
pub mod env;
pub mod footprint;
pub mod host_writes;
pub mod latency;
pub mod pinning;
pub mod reconcile;
pub mod report;
pub mod sink;
pub mod stats;
pub mod svg;
pub mod target;
pub mod ui;
pub mod wal;
pub mod write_path;
