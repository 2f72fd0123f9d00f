//! Delivery: claim → send to the target → record, for one worker process.
//!
//! Follow a row: [`worker`] runs the loop; its `claim` step leases it
//! (`outbox::claim`), its `settle` step checks it
//! ([`prepare`]: bad data goes dead, a key created and deleted before
//! delivery is superseded), sends it through its [`target`] (agentex-auth
//! with `auth_client`, or SpiceDB itself: [`spicedb`]), turns the answer into
//! an outcome ([`outcome`], [`backoff`]) and hands that to the recorder
//! (the `record` step), which writes outcomes in batches (`outbox::record`). [`gate`] decides how
//! much may be claimed while agentex-auth is down or rejects our credential;
//! [`listener`] wakes the claimer when a capture commits; [`housekeeping`]
//! keeps the gauges fresh and prunes finished rows.

pub mod backoff;
mod claim;
pub mod gate;
pub mod housekeeping;
pub mod listener;
pub mod outcome;
pub mod prepare;
mod record;
mod send;
mod settle;
pub mod spicedb;
mod state;
mod tally;
pub mod target;
pub mod worker;

pub use target::Target;
pub use worker::{RunReport, Worker, WorkerError};
