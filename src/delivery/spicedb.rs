//! The SpiceDB target: rows become relationship writes, straight to SpiceDB.
//!
//! Follow a row. A **register** means "the resource is live": its mapping's
//! relationships ([`crate::mapping::relationships`]) are computed from the
//! row (the parent from `parent_id`, column subjects from `attributes`,
//! principal subjects from `principal`) and TOUCHed in one
//! `WriteRelationships`. Registers of different resources claimed together
//! share one `WriteRelationships` (up to `batch` rows): SpiceDB applies all
//! of a call's updates or none, so when a shared call is refused for its
//! content, each row is sent again on its own and only the bad one goes dead.
//!
//! A **deregister** means "the resource is gone": `DeleteRelationships` by
//! filter on the resource, so relationships the mapping does not know
//! (shares granted elsewhere) go too, as agentex-auth's deregister removes
//! "the resource and all of its relationships" — or, with the mapping's
//! `deregister = "mapped"`, only its own relations.
//!
//! A **re-parent or new owner** reaches the outbox as a deregister followed,
//! in the same transaction, by a register of the same resource. Delivered
//! one after the other, the resource would have no relationships between
//! the two calls (its owner locked out) — so when the row after a
//! deregister is a register of the same resource, the deregister is sent as
//! one `WriteRelationships` that DELETEs the stale relationships and TOUCHes
//! the register's: read the resource's relationships (fully consistent),
//! delete those not wanted any more, touch the wanted ones, atomically.
//! Why this is correct under concurrency: rows of one resource are
//! delivered one at a time (the claim rule and the lease), so no other row
//! of ours writes the resource between the read and the write; a
//! relationship someone else writes in between survives, exactly as if it
//! had been written just after the swap; and a DELETE of a relationship
//! that vanished meanwhile is a no-op in SpiceDB. The register itself then
//! TOUCHes the same set again (idempotent). If the swap is refused (the
//! register's relationships do not fit the schema), the deregister falls
//! back to the plain delete, and the register fails on its own.
//!
//! Answers are gRPC codes ([`classify`]): `UNAVAILABLE`,
//! `DEADLINE_EXCEEDED`, `RESOURCE_EXHAUSTED`, `ABORTED` (and `INTERNAL`,
//! `UNKNOWN`, `CANCELLED`, a server's or the transport's failures) retry;
//! `UNAUTHENTICATED` is the credential pause; the rest
//! (`INVALID_ARGUMENT`, `FAILED_PRECONDITION` for a schema mismatch, ...) are
//! dead with SpiceDB's message. A row's `last_status` holds the gRPC code.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde_json::Value;
use spicedb_grpc_tonic::v1::relationship_update::Operation as UpdateOp;
use spicedb_grpc_tonic::v1::{
    ObjectReference, Relationship as Tuple, RelationshipFilter, RelationshipUpdate,
    SubjectReference,
};
use sqlx::PgPool;

use super::outcome::Verdict;
use super::prepare::Deliverable;
use crate::domain::{Operation, object_id};
use crate::mapping::relationships::{DeregisterScope, Relationship, Source};
use crate::mapping::{MappingError, Mappings};
use crate::spicedb_client::{CallError, SpiceDbClient};

/// The default number of rows one `WriteRelationships` carries.
pub const DEFAULT_BATCH: usize = 50;

#[derive(Debug, thiserror::Error)]
pub enum SpiceDbTargetError {
    #[error("reading the installed mappings (has `authz-outbox migrate` run?): {0}")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Mapping(#[from] MappingError),
}

/// What the mappings say about one resource type.
#[derive(Debug, Clone)]
struct TypeSpec {
    relationships: Vec<Relationship>,
    deregister: DeregisterScope,
    relations: BTreeSet<String>,
}

/// Delivers rows to SpiceDB (see the module docs).
#[derive(Debug, Clone)]
pub struct SpiceDbTarget {
    client: SpiceDbClient,
    pool: PgPool,
    /// The installed mappings' relationship sets by type, re-read from the
    /// database when a row of a type it does not know arrives: a mapping
    /// `migrate` installs while the worker runs is delivered by it, not
    /// dead-lettered until a restart.
    types: Arc<RwLock<Arc<TypeSpecs>>>,
    /// When `types` was last re-read (at most once per [`RELOAD_EVERY`]).
    reloaded: Arc<Mutex<Option<Instant>>>,
    batch: usize,
}

type TypeSpecs = HashMap<String, TypeSpec>;

/// The shortest pause between two re-reads of the installed mappings (a
/// stray type's rows must not make every claim read the catalog).
const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// The relationships one row means, as SpiceDB writes them.
type Desired = Vec<Tuple>;

impl SpiceDbTarget {
    /// A target writing what `mappings` say; `batch` rows at most per
    /// `WriteRelationships` (1: no batching).
    pub fn new(
        client: SpiceDbClient,
        pool: PgPool,
        mappings: &Mappings,
        batch: usize,
    ) -> Result<Self, MappingError> {
        Ok(SpiceDbTarget {
            client,
            pool,
            types: Arc::new(RwLock::new(Arc::new(type_specs(mappings)?))),
            reloaded: Arc::new(Mutex::new(None)),
            batch: batch.max(1),
        })
    }

    /// The relationship sets in force now.
    fn types(&self) -> Arc<TypeSpecs> {
        match self.types.read() {
            Ok(types) => types.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Re-reads the installed mappings when `group` holds a type not known
    /// yet (and the last re-read is older than [`RELOAD_EVERY`]). A failed
    /// re-read keeps what was known: the rows then go dead as before, with
    /// the reason, and `replay` re-drives them.
    async fn learn_new_types(&self, group: &[Deliverable]) {
        let known = self.types();
        if group
            .iter()
            .all(|d| known.contains_key(&d.row.resource_type))
        {
            return;
        }
        {
            let Ok(mut last) = self.reloaded.lock() else {
                return;
            };
            if last.is_some_and(|at| at.elapsed() < RELOAD_EVERY) {
                return;
            }
            *last = Some(Instant::now());
        }
        let read = async {
            let installed = crate::mapping::install::installed(&self.pool).await?;
            let definitions: Vec<Value> = installed.into_iter().map(|i| i.definition).collect();
            Ok::<_, SpiceDbTargetError>(type_specs(&Mappings::from_installed(&definitions)?)?)
        };
        match read.await {
            Ok(specs) => {
                tracing::info!(types = specs.len(), "re-read the installed mappings");
                if let Ok(mut types) = self.types.write() {
                    *types = Arc::new(specs);
                }
            }
            Err(e) => tracing::warn!(error = %e, "re-reading the installed mappings failed"),
        }
    }
}

/// The relationship set of each mapped type.
fn type_specs(mappings: &Mappings) -> Result<TypeSpecs, MappingError> {
    mappings.require_one_relationship_set_per_type()?;
    Ok(mappings
        .iter()
        .map(|m| {
            (
                m.resource_type.to_string(),
                TypeSpec {
                    relationships: m.relationships.clone(),
                    deregister: m.deregister,
                    relations: m.relationships.iter().map(|r| r.relation.clone()).collect(),
                },
            )
        })
        .collect())
}

impl SpiceDbTarget {
    /// The most rows one `WriteRelationships` carries.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// A target for the mappings `migrate` installed in this database (what
    /// capture follows, so what the rows were written by).
    pub async fn from_database(
        client: SpiceDbClient,
        pool: PgPool,
        batch: usize,
    ) -> Result<Self, SpiceDbTargetError> {
        let installed = crate::mapping::install::installed(&pool).await?;
        let definitions: Vec<Value> = installed.into_iter().map(|i| i.definition).collect();
        let mappings = Mappings::from_installed(&definitions)?;
        Ok(Self::new(client, pool, &mappings, batch)?)
    }

    pub fn client(&self) -> &SpiceDbClient {
        &self.client
    }

    /// Splits checked rows into requests: registers of distinct resources
    /// share one (up to `batch`); a deregister is a request of its own (a
    /// delete by filter names one resource).
    pub fn group(&self, deliverables: Vec<Deliverable>) -> Vec<Vec<Deliverable>> {
        let mut groups: Vec<Vec<Deliverable>> = Vec::new();
        let mut open: Vec<Deliverable> = Vec::new();
        let mut in_open: HashSet<(String, String)> = HashSet::new();
        for d in deliverables {
            if d.operation == Operation::Deregister {
                groups.push(vec![d]);
                continue;
            }
            // The claim rule leases one row per resource at a time; a second
            // one here would be a bug, and is simply not shared.
            let key = (d.row.resource_type.clone(), d.row.resource_id.clone());
            if open.len() >= self.batch || in_open.contains(&key) {
                groups.push(std::mem::take(&mut open));
                in_open.clear();
            }
            in_open.insert(key);
            open.push(d);
        }
        if !open.is_empty() {
            groups.push(open);
        }
        groups
    }

    /// Sends one group (see [`SpiceDbTarget::group`]) and answers a verdict
    /// per row.
    ///
    /// All of it — a re-parent's read and write, a refused batch's resends —
    /// ends within one request timeout, as one agentex-auth request does:
    /// the worker sends a row only while that much of its lease is left,
    /// and the lease (≥ 3× the timeout) is what keeps a second worker from
    /// delivering the same resource while this one still writes. A group cut
    /// off here is retried whole (its writes are idempotent).
    pub async fn send(&self, group: Vec<Deliverable>) -> Vec<(Deliverable, Verdict)> {
        let kept = group.clone();
        match tokio::time::timeout(self.client.timeout(), self.send_unbounded(group)).await {
            Ok(answered) => answered,
            Err(_) => kept
                .into_iter()
                .map(|d| {
                    let verdict = Verdict::Transient {
                        status: Some(tonic::Code::DeadlineExceeded as u16),
                        retry_after: None,
                        error: "SpiceDB DEADLINE_EXCEEDED: the request timeout passed".into(),
                    };
                    (d, verdict)
                })
                .collect(),
        }
    }

    async fn send_unbounded(&self, group: Vec<Deliverable>) -> Vec<(Deliverable, Verdict)> {
        self.learn_new_types(&group).await;
        if let [d] = group.as_slice()
            && d.operation == Operation::Deregister
        {
            let verdict = self.deregister(d).await;
            return group.into_iter().map(|d| (d, verdict.clone())).collect();
        }
        // Rows whose relationships cannot even be computed go dead unsent.
        let mut out = Vec::with_capacity(group.len());
        let mut ready: Vec<(Deliverable, Desired)> = Vec::with_capacity(group.len());
        for d in group {
            match self.desired_for(&d) {
                Ok(desired) => ready.push((d, desired)),
                Err(error) => out.push((d, not_sent(error))),
            }
        }
        if ready.is_empty() {
            return out;
        }
        let updates = ready
            .iter()
            .flat_map(|(_, desired)| desired.iter().cloned().map(touch))
            .collect();
        let answer = self.client.write(updates).await;
        match answer {
            Ok(token) => {
                out.extend(ready.into_iter().map(|(d, _)| (d, applied(&token))));
            }
            // The whole batch was refused for what one row wrote: each is
            // sent on its own, so only the bad one goes dead.
            Err(e) if ready.len() > 1 && matches!(classify(&e), Verdict::Permanent { .. }) => {
                tracing::debug!(rows = ready.len(), error = %e, "batched write refused; sending its rows one by one");
                for (d, desired) in ready {
                    let verdict = match self
                        .client
                        .write(desired.into_iter().map(touch).collect())
                        .await
                    {
                        Ok(token) => applied(&token),
                        Err(e) => classify(&e),
                    };
                    out.push((d, verdict));
                }
            }
            Err(e) => {
                let verdict = classify(&e);
                out.extend(ready.into_iter().map(|(d, _)| (d, verdict.clone())));
            }
        }
        out
    }

    /// A deregister: swapped for the next register of the resource when
    /// there is one (a re-parent), otherwise a delete by filter.
    async fn deregister(&self, d: &Deliverable) -> Verdict {
        let object_type = d.resource.kind.as_str();
        let object_id = match object_id::encode(&d.resource.selector) {
            Ok(id) => id,
            Err(e) => return not_sent(format!("resource id: {e}")),
        };
        match self.next_register(d).await {
            Ok(Some(desired)) => match self.swap(object_type, &object_id, desired).await {
                Ok(token) => return applied(&token),
                Err(e) => match classify(&e) {
                    Verdict::Permanent { .. } => tracing::debug!(
                        row_id = d.row.id, error = %e,
                        "the re-parent's new relationships were refused; deleting the old ones alone"
                    ),
                    other => return other,
                },
            },
            Ok(None) => {}
            Err(e) => {
                return Verdict::Transient {
                    status: None,
                    retry_after: None,
                    error: format!("looking up the resource's next row: {e}"),
                };
            }
        }
        let filter = |relation: &str| RelationshipFilter {
            resource_type: object_type.to_string(),
            optional_resource_id: object_id.clone(),
            optional_relation: relation.to_string(),
            ..Default::default()
        };
        let types = self.types();
        let scope = types.get(object_type).map(|t| (t.deregister, &t.relations));
        let result = match scope {
            Some((DeregisterScope::Mapped, relations)) => {
                let mut last = Ok(String::new());
                for relation in relations {
                    last = self.client.delete(filter(relation)).await;
                    if last.is_err() {
                        break;
                    }
                }
                last
            }
            // A type no mapping names any more still gets deleted whole.
            _ => self.client.delete(filter("")).await,
        };
        match result {
            Ok(token) => applied(&token),
            Err(e) => classify(&e),
        }
    }

    /// The relationships of the register that follows `d` directly in the
    /// resource's order, if the next pending row of the resource is one and
    /// they can be computed.
    ///
    /// That register is marked (`last_error`) before its relationships are
    /// written: the worker supersedes a *never attempted* register together
    /// with a deregister right after it, sending neither, which is right
    /// only while nothing of the register reached SpiceDB. Marked, it counts
    /// as attempted, so a later deregister is sent and deletes what the swap
    /// wrote. (The row is not leased by anyone: the claim rule keeps it
    /// waiting behind `d`, which this worker holds.)
    async fn next_register(&self, d: &Deliverable) -> Result<Option<Desired>, sqlx::Error> {
        type NextRow = (i64, String, Option<String>, Option<Value>, Option<Value>);
        let next: Option<NextRow> = sqlx::query_as(
            "SELECT id, operation, parent_id, principal, attributes FROM authz_outbox
             WHERE resource_type = $1 AND resource_id = $2 AND state = 'pending' AND id > $3
             ORDER BY id LIMIT 1",
        )
        .bind(&d.row.resource_type)
        .bind(&d.row.resource_id)
        .bind(d.row.id)
        .fetch_optional(&self.pool)
        .await?;
        let Some((id, operation, parent_id, principal, attributes)) = next else {
            return Ok(None);
        };
        if operation != Operation::Register.as_str() {
            return Ok(None);
        }
        let principal = principal.unwrap_or(Value::Null);
        let Ok(desired) = self.desired(
            d.resource.kind.as_str(),
            &d.resource.selector,
            parent_id.as_deref(),
            &principal,
            attributes.as_ref(),
        ) else {
            return Ok(None);
        };
        let marked = sqlx::query(
            "UPDATE authz_outbox SET last_error = coalesce(last_error, $2)
             WHERE id = $1 AND state = 'pending'",
        )
        .bind(id)
        .bind(format!(
            "relationships written early, by the re-parent of row {}",
            d.row.id
        ))
        .execute(&self.pool)
        .await?;
        Ok((marked.rows_affected() == 1).then_some(desired))
    }

    /// One `WriteRelationships`: DELETE what the resource holds and should
    /// not, TOUCH what it should (see the module docs for why it is safe).
    async fn swap(
        &self,
        object_type: &str,
        object_id: &str,
        desired: Desired,
    ) -> Result<String, CallError> {
        let held = self.client.read_resource(object_type, object_id).await?;
        let types = self.types();
        let scope = types.get(object_type);
        let wanted: HashSet<String> = desired.iter().map(tuple_key).collect();
        let stale = held.into_iter().filter(|t| {
            !wanted.contains(&tuple_key(t))
                && match scope {
                    Some(s) if s.deregister == DeregisterScope::Mapped => {
                        s.relations.contains(&t.relation)
                    }
                    _ => true,
                }
        });
        let updates = stale
            .map(|t| RelationshipUpdate {
                operation: UpdateOp::Delete as i32,
                relationship: Some(t),
            })
            .chain(desired.into_iter().map(touch))
            .collect();
        self.client.write(updates).await
    }

    fn desired_for(&self, d: &Deliverable) -> Result<Desired, String> {
        self.desired(
            d.resource.kind.as_str(),
            &d.resource.selector,
            d.parent.as_ref().map(|p| p.selector.as_str()),
            &d.principal,
            d.row.attributes.as_ref(),
        )
    }

    /// The relationships a live resource means by its type's mapping.
    pub fn desired(
        &self,
        resource_type: &str,
        selector: &str,
        parent_id: Option<&str>,
        principal: &Value,
        attributes: Option<&Value>,
    ) -> Result<Desired, String> {
        let types = self.types();
        let spec = types.get(resource_type).ok_or_else(|| {
            format!("no installed mapping for resource type {resource_type:?} (run `authz-outbox migrate`)")
        })?;
        let resource = ObjectReference {
            object_type: resource_type.to_string(),
            object_id: object_id::encode(selector).map_err(|e| format!("resource id: {e}"))?,
        };
        spec.relationships
            .iter()
            .map(|r| {
                let subject = subject(r, parent_id, principal, attributes)?;
                Ok(Tuple {
                    resource: Some(resource.clone()),
                    relation: r.relation.clone(),
                    subject: Some(SubjectReference {
                        object: Some(subject),
                        optional_relation: String::new(),
                    }),
                    ..Default::default()
                })
            })
            .collect()
    }
}

/// The first alternative of a relationship whose value the row has.
fn subject(
    r: &Relationship,
    parent_id: Option<&str>,
    principal: &Value,
    attributes: Option<&Value>,
) -> Result<ObjectReference, String> {
    for alternative in &r.subjects {
        let (value, encode) = match &alternative.source {
            Source::Parent(_) => (parent_id.map(str::to_string), true),
            Source::Column(c) => (
                attributes
                    .and_then(|a| a.get(c))
                    .and_then(Value::as_str)
                    .map(str::to_string),
                true,
            ),
            Source::Principal(f) => (
                principal.get(f).and_then(Value::as_str).map(str::to_string),
                false,
            ),
        };
        let Some(value) = value.filter(|v| !v.is_empty()) else {
            continue;
        };
        let object_id = if encode {
            object_id::encode(&value).map_err(|e| format!("relationship {r}: {e}"))?
        } else if is_object_id(&value) {
            value
        } else {
            return Err(format!(
                "relationship {r}: principal id {value:?} is not a valid SpiceDB object id"
            ));
        };
        return Ok(ObjectReference {
            object_type: alternative.subject_type.to_string(),
            object_id,
        });
    }
    if r.subjects
        .iter()
        .any(|s| matches!(s.source, Source::Principal(_)))
        && !names_a_creator(principal)
    {
        return Err(format!(
            "no creator resolvable: relationship {r} names the writer's principal and the row has none"
        ));
    }
    Err(format!(
        "relationship {r}: the row has no value for any of its subjects"
    ))
}

/// SpiceDB's object-id alphabet, at most 1,024 characters.
fn is_object_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= object_id::MAX_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/_|-=+".contains(&b))
}

fn touch(t: Tuple) -> RelationshipUpdate {
    RelationshipUpdate {
        operation: UpdateOp::Touch as i32,
        relationship: Some(t),
    }
}

fn tuple_key(t: &Tuple) -> String {
    let object = |o: &Option<ObjectReference>| {
        o.as_ref()
            .map(|o| format!("{}:{}", o.object_type, o.object_id))
            .unwrap_or_default()
    };
    let subject = t.subject.as_ref();
    format!(
        "{}#{}@{}#{}",
        object(&t.resource),
        t.relation,
        subject.map(|s| object(&s.object)).unwrap_or_default(),
        subject.map(|s| s.optional_relation.as_str()).unwrap_or("")
    )
}

fn applied(token: &str) -> Verdict {
    Verdict::Applied {
        consistency_token: (!token.is_empty()).then(|| token.to_string()),
    }
}

/// A row that cannot become a valid write: dead, nothing sent.
fn not_sent(error: String) -> Verdict {
    Verdict::Permanent {
        status: tonic::Code::InvalidArgument as u16,
        error: format!("not sent: {error}"),
    }
}

/// What a gRPC failure means for a row (the issue's classes; see the
/// module docs).
pub fn classify(e: &CallError) -> Verdict {
    use tonic::Code;
    let status = e.code as u16;
    let error = format!("SpiceDB {e}");
    match e.code {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::ResourceExhausted
        | Code::Aborted
        | Code::Internal
        | Code::Unknown
        | Code::Cancelled => Verdict::Transient {
            status: Some(status),
            retry_after: e.retry_after,
            error,
        },
        Code::Unauthenticated => Verdict::Unauthorized { status, error },
        _ => Verdict::Permanent { status, error },
    }
}

/// Whether a principal names someone (`user_id` or `service_account_id`).
fn names_a_creator(principal: &Value) -> bool {
    ["user_id", "service_account_id"].iter().any(|f| {
        principal
            .get(*f)
            .and_then(Value::as_str)
            .is_some_and(|s| !s.is_empty())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tonic::Code;

    fn e(code: Code) -> CallError {
        CallError {
            code,
            message: "m".into(),
            retry_after: None,
        }
    }

    #[test]
    fn grpc_codes_map_to_the_issues_classes() {
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
            Code::Aborted,
            Code::Internal,
        ] {
            assert!(
                matches!(classify(&e(code)), Verdict::Transient { .. }),
                "{code:?}"
            );
        }
        for code in [
            Code::InvalidArgument,
            Code::FailedPrecondition,
            Code::NotFound,
        ] {
            assert!(
                matches!(classify(&e(code)), Verdict::Permanent { .. }),
                "{code:?}"
            );
        }
        assert!(matches!(
            classify(&e(Code::Unauthenticated)),
            Verdict::Unauthorized { status: 16, .. }
        ));
        let pushed = CallError {
            retry_after: Some(Duration::from_secs(2)),
            ..e(Code::ResourceExhausted)
        };
        assert!(matches!(
            classify(&pushed),
            Verdict::Transient { retry_after: Some(d), status: Some(8), .. } if d == Duration::from_secs(2)
        ));
        match classify(&e(Code::FailedPrecondition)) {
            Verdict::Permanent { error, .. } => assert_eq!(error, "SpiceDB FAILED_PRECONDITION: m"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn principal_ids_must_already_be_object_ids() {
        assert!(is_object_id("u-1_a|b=c+d/e"));
        assert!(!is_object_id("a b"));
        assert!(!is_object_id("a@b"));
        assert!(!is_object_id(""));
    }
}
