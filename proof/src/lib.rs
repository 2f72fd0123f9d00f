//! Shared pieces of the proof programs (`bench`, `chaos`).
