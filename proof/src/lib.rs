//! Shared pieces of the proof programs (`bench`, `chaos`).

/// The chaos convergence run (`src/bin/chaos.rs`, `tests/chaos_small.rs`).
pub mod chaos;
