//! Shared pieces of the proof programs (`bench`, `chaos`).

/// The chaos convergence run (`src/bin/chaos.rs`, `tests/chaos_small.rs`).
pub mod chaos;

/// An instant SpiceDB read side (`bench` reconcile at a million keys;
/// `tests/reconcile_read.rs`).
pub mod export_source;
