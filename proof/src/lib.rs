//! Shared pieces of the proof programs (`bench`, `chaos`).

/// The chaos convergence run (`src/bin/chaos.rs`, `tests/chaos_small.rs`).
pub mod chaos;

/// An instant SpiceDB read side (`bench` reconcile at a million keys;
/// `tests/reconcile_read.rs`).
pub mod export_source;

/// The host's tables as its own migrations build them; loaded before
/// `authz-outbox migrate` so the proofs run on the host's real shapes.
pub const HOST_SCHEMA: &str = include_str!("../../tests/fixtures/host_schema.sql");

/// Loads [`HOST_SCHEMA`] (idempotent).
pub async fn load_host_schema(pool: &sqlx::PgPool) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(HOST_SCHEMA).execute(pool).await.map(|_| ())
}
