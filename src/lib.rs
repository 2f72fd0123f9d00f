//! authz-outbox keeps agentex-auth (SpiceDB) in step with the PostgreSQL rows
//! it describes, through a transactional outbox.
//!
//! - **capture**: triggers (see `migrations/`) add an `authz_outbox` row in
//!   the same transaction as every write to `agents` / `agent_api_keys`;
//!   [`capture`] is the Rust writer's side of it.
//! - **delivery**: [`delivery::Worker`] claims rows with leases, sends them
//!   with [`auth_client`], records the outcome ([`outbox`]).
//! - **reconcile** / **replay**: measure and heal drift; re-drive dead rows.
//!
//! A Rust host embeds the write path in three lines:
//!
//! ```no_run
//! # async fn demo(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! use authz_outbox::capture::{NewApiKey, create_api_key, wait_until_delivered};
//! use authz_outbox::domain::{ApiKeyType, Principal};
//!
//! let creator = Principal::parse(r#"{"user_id": "u1"}"#)?;
//! let key = NewApiKey { agent_id: "a1".into(), name: "ci".into(), key_type: ApiKeyType::External, secret: None };
//! let created = create_api_key(&pool, key, Some(&creator)).await?;
//! wait_until_delivered(&pool, created.outbox_id, std::time::Duration::from_secs(5)).await?;
//! # Ok(()) }
//! ```

pub mod alembic;
pub mod auth_client;
pub mod capture;
pub mod cli;
pub mod config;
pub mod db;
pub mod delivery;
pub mod display;
pub mod domain;
pub mod http;
pub mod mapping;
pub mod metrics;
pub mod migrate;
pub mod outbox;
pub mod reconcile;
pub mod relay;
pub mod spicedb_client;
pub mod telemetry;
pub mod ui;
pub mod uninstall;
