//! Where rows are delivered: agentex-auth over HTTP (the default), or
//! SpiceDB itself over gRPC. The worker claims, checks, gates and records
//! the same way for both; only the send differs, and it goes through here.

use std::sync::Arc;

use super::outcome::{Verdict, classify};
use super::prepare::Deliverable;
use super::spicedb::SpiceDbTarget;
use crate::auth_client::AuthClient;

/// The delivery target a worker sends to.
#[derive(Debug, Clone)]
pub enum Target {
    /// `POST /v1/authz/register|deregister`, one row per request.
    AgentexAuth(AuthClient),
    /// `WriteRelationships` / `DeleteRelationships`, registers batched.
    SpiceDb(Arc<SpiceDbTarget>),
}

impl From<AuthClient> for Target {
    fn from(client: AuthClient) -> Self {
        Target::AgentexAuth(client)
    }
}

impl From<SpiceDbTarget> for Target {
    fn from(target: SpiceDbTarget) -> Self {
        Target::SpiceDb(Arc::new(target))
    }
}

impl Target {
    /// Its name in logs and messages.
    pub fn name(&self) -> &'static str {
        match self {
            Target::AgentexAuth(_) => "agentex-auth",
            Target::SpiceDb(_) => "SpiceDB",
        }
    }

    /// Where its credential is set, for the credential-pause log line.
    pub fn credential_hint(&self) -> &'static str {
        match self {
            Target::AgentexAuth(_) => "AGENTEX_AUTH_TOKEN / AGENTEX_AUTH_TOKEN_FILE",
            Target::SpiceDb(_) => "SPICEDB_TOKEN / SPICEDB_TOKEN_FILE",
        }
    }

    /// Whether it takes any resource type (SpiceDB) or only agentex-auth's four.
    pub fn open_types(&self) -> bool {
        matches!(self, Target::SpiceDb(_))
    }

    /// The most rows one request carries.
    pub fn rows_per_request(&self) -> usize {
        match self {
            Target::AgentexAuth(_) => 1,
            Target::SpiceDb(t) => t.batch(),
        }
    }

    /// The rows of a claim, split into requests.
    pub fn group(&self, deliverables: Vec<Deliverable>) -> Vec<Vec<Deliverable>> {
        match self {
            Target::AgentexAuth(_) => deliverables.into_iter().map(|d| vec![d]).collect(),
            Target::SpiceDb(t) => t.group(deliverables),
        }
    }

    /// Sends one group and answers a verdict per row.
    pub async fn send(&self, group: Vec<Deliverable>) -> Vec<(Deliverable, Verdict)> {
        match self {
            Target::AgentexAuth(client) => {
                let mut out = Vec::with_capacity(group.len());
                for d in group {
                    let answer = client.send(&d.request(), &d.idempotency_key()).await;
                    let verdict = classify(d.operation, answer);
                    out.push((d, verdict));
                }
                out
            }
            Target::SpiceDb(t) => t.send(group).await,
        }
    }
}
