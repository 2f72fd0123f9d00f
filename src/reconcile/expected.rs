//! What SpiceDB should hold of each resource type, as reconcile judges it.
//!
//! The relationships a live row means depend on who writes them: through
//! agentex-auth, always its `owner` and `parent_<type>` edges (CONTRACT.md),
//! whatever a mapping lists; through the SpiceDB target, the relationships
//! the type's mapping lists. Reconcile must judge by the same ones the
//! worker writes, or a consistent graph reads as drift (a document's
//! `folder` edge is not a `parent_agent` edge).
//!
//! Each relationship is judged by what the row can tell
//! ([`Role`]): the parent exactly, a subject named by columns exactly, a
//! subject named by whoever wrote the row by its presence (the row does not
//! keep its writer) — and, where the resource's registrations are on record
//! (`authz_outbox_owners`), exactly: its [`OwnerRelation`]s name the
//! subjects each registered principal stands for.

use sqlx::PgConnection;

use crate::mapping::Mappings;
use crate::mapping::relationships::{DeregisterScope, Role};

/// Whose relationships a run judges by: the target `run` delivers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Writer {
    /// agentex-auth: the owner and the parent edge it writes for every
    /// register, whatever the mappings list.
    #[default]
    AgentexAuth,
    /// The SpiceDB target: each type's mapping's relationships.
    SpiceDb,
}

/// One type's expectations, as staged in `reconcile_types`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeExpectation {
    pub resource_type: String,
    /// A deregister deletes every relationship of the resource: any
    /// relationship of a resource with no live row is an orphan's. With
    /// `false` (the mapping's `deregister = "mapped"`), relationships the
    /// mapping does not list are someone else's, and ignored.
    pub scope_all: bool,
    /// Every relation the type's relationships use.
    pub relations: Vec<String>,
    /// The parent's relation and subject type.
    pub parent: Option<(String, String)>,
    /// Relations that must be held, by any subject.
    pub principal_relations: Vec<String>,
    /// Relations whose subjects the row names (compared edge by edge).
    pub column_relations: Vec<String>,
    /// Relations whose subject is the registering principal alone: compared
    /// edge by edge with the principals the resource was registered as.
    pub owners: Vec<OwnerRelation>,
}

/// A relation whose subject the writer names: for each principal, the first
/// alternative whose field is a non-empty string (as the writer resolves it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerRelation {
    pub relation: String,
    /// `(subject type, principal field)`, in order.
    pub subjects: Vec<(String, String)>,
}

impl OwnerRelation {
    /// agentex-auth's `owner`: `user:<user_id>`, else
    /// `service_account:<service_account_id>` (CONTRACT.md).
    fn agentex_auth() -> Self {
        OwnerRelation {
            relation: "owner".into(),
            subjects: vec![
                ("user".into(), "user_id".into()),
                ("service_account".into(), "service_account_id".into()),
            ],
        }
    }
}

impl TypeExpectation {
    /// Whether `relation` names the writer alone: its subjects' ids are the
    /// principal's, written as they are, never in the selector encoding.
    pub fn is_owner_relation(&self, relation: &str) -> bool {
        self.owners.iter().any(|o| o.relation == relation)
    }
}

/// The expectations of `types`, from the installed mappings. With several
/// mappings of one type, the first by name states them (`mappings check
/// --target spicedb` requires them to agree).
pub async fn load(
    conn: &mut PgConnection,
    types: &[String],
    writer: Writer,
) -> Result<Vec<TypeExpectation>, super::ReconcileError> {
    let definitions: Vec<serde_json::Value> = sqlx::query_scalar(
        "SELECT definition FROM authz_outbox_mappings WHERE resource_type = ANY ($1) ORDER BY name",
    )
    .bind(types)
    .fetch_all(conn)
    .await?;
    let mappings = Mappings::from_installed(&definitions)
        .map_err(|e| super::ReconcileError::Mapping(e.to_string()))?;
    Ok(types
        .iter()
        .map(|t| expectation(t, &mappings, writer))
        .collect())
}

fn expectation(resource_type: &str, mappings: &Mappings, writer: Writer) -> TypeExpectation {
    let mapping = mappings
        .iter()
        .find(|m| m.resource_type.as_str() == resource_type);
    let mut out = TypeExpectation {
        resource_type: resource_type.to_string(),
        scope_all: true,
        relations: Vec::new(),
        parent: None,
        principal_relations: Vec::new(),
        column_relations: Vec::new(),
        owners: Vec::new(),
    };
    let Some(mapping) = mapping else {
        return out;
    };
    match writer {
        Writer::AgentexAuth => {
            if let Some(parent) = &mapping.parent {
                let kind = parent.resource_type.to_string();
                out.parent = Some((format!("parent_{kind}"), kind));
            }
            out.principal_relations.push("owner".into());
            out.owners.push(OwnerRelation::agentex_auth());
        }
        Writer::SpiceDb => {
            out.scope_all = mapping.deregister == DeregisterScope::All;
            for r in &mapping.relationships {
                if let Some(owner) = owner_relation(r) {
                    out.owners.push(owner);
                }
                match r.role() {
                    Role::Parent if out.parent.is_none() => {
                        let subject = r
                            .subjects
                            .iter()
                            .find(|s| {
                                matches!(s.source, crate::mapping::relationships::Source::Parent(_))
                            })
                            .map(|s| s.subject_type.to_string())
                            .unwrap_or_default();
                        out.parent = Some((r.relation.clone(), subject));
                    }
                    // A second parent relationship is judged by presence.
                    Role::Parent | Role::Principal => {
                        out.principal_relations.push(r.relation.clone())
                    }
                    Role::Column => out.column_relations.push(r.relation.clone()),
                }
            }
        }
    }
    out.relations = out
        .parent
        .iter()
        .map(|(relation, _)| relation.clone())
        .chain(out.principal_relations.iter().cloned())
        .chain(out.column_relations.iter().cloned())
        .collect();
    out.relations.sort();
    out.relations.dedup();
    out.principal_relations.sort();
    out.principal_relations.dedup();
    out.column_relations.sort();
    out.column_relations.dedup();
    out
}

/// A relationship every alternative of which is a principal field (a mix
/// with columns is judged by presence alone: which alternative wins then
/// depends on the row).
fn owner_relation(r: &crate::mapping::relationships::Relationship) -> Option<OwnerRelation> {
    use crate::mapping::relationships::Source;
    let subjects = r
        .subjects
        .iter()
        .map(|s| match &s.source {
            Source::Principal(field) => Some((s.subject_type.to_string(), field.clone())),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()?;
    Some(OwnerRelation {
        relation: r.relation.clone(),
        subjects,
    })
}

/// Stages the expectations in `reconcile_types` (one row per type) and
/// their owner relations in `reconcile_owner_subjects` (one row per
/// alternative, in order).
pub async fn stage(
    conn: &mut PgConnection,
    expectations: &[TypeExpectation],
) -> Result<(), sqlx::Error> {
    const SQL: &str = r#"
        DROP TABLE IF EXISTS pg_temp.reconcile_types, pg_temp.reconcile_owner_subjects;
        CREATE TEMPORARY TABLE reconcile_types (
            resource_type        text PRIMARY KEY,
            scope_all            boolean NOT NULL,
            relations            text[] NOT NULL,
            parent_relation      text,
            parent_subject_type  text,
            principal_relations  text[] NOT NULL,
            column_relations     text[] NOT NULL,
            owner_relations      text[] NOT NULL
        );
        CREATE TEMPORARY TABLE reconcile_owner_subjects (
            resource_type  text NOT NULL,
            relation       text NOT NULL,
            position       integer NOT NULL,
            subject_type   text NOT NULL,
            field          text NOT NULL,
            PRIMARY KEY (resource_type, relation, position)
        );
    "#;
    sqlx::raw_sql(SQL).execute(&mut *conn).await?;
    for e in expectations {
        let owner_relations: Vec<&str> = e.owners.iter().map(|o| o.relation.as_str()).collect();
        sqlx::query("INSERT INTO reconcile_types VALUES ($1, $2, $3, $4, $5, $6, $7, $8)")
            .bind(&e.resource_type)
            .bind(e.scope_all)
            .bind(&e.relations)
            .bind(e.parent.as_ref().map(|p| &p.0))
            .bind(e.parent.as_ref().map(|p| &p.1))
            .bind(&e.principal_relations)
            .bind(&e.column_relations)
            .bind(&owner_relations)
            .execute(&mut *conn)
            .await?;
        for owner in &e.owners {
            for (position, (subject_type, field)) in owner.subjects.iter().enumerate() {
                sqlx::query("INSERT INTO reconcile_owner_subjects VALUES ($1, $2, $3, $4, $5)")
                    .bind(&e.resource_type)
                    .bind(&owner.relation)
                    .bind(position as i32)
                    .bind(subject_type)
                    .bind(field)
                    .execute(&mut *conn)
                    .await?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quickstart() -> Mappings {
        Mappings::from_toml(
            r#"
            [[mapping]]
            type = "document"
            table = "documents"
            parent = { type = "folder", column = "folder_id" }
            relationships = ["folder@folder:{folder_id}", "owner@user:{owner_id}", "creator@user:{principal.user_id}"]
            deregister = "mapped"
            "#,
        )
        .expect("mappings")
    }

    #[test]
    fn the_spicedb_target_is_judged_by_the_mappings_relationships() {
        let e = expectation("document", &quickstart(), Writer::SpiceDb);
        assert_eq!(e.parent, Some(("folder".into(), "folder".into())));
        assert_eq!(e.column_relations, ["owner"]);
        assert_eq!(e.principal_relations, ["creator"]);
        assert_eq!(e.relations, ["creator", "folder", "owner"]);
        assert!(!e.scope_all);
        assert_eq!(
            e.owners,
            [OwnerRelation {
                relation: "creator".into(),
                subjects: vec![("user".into(), "user_id".into())],
            }],
            "only the relation the writer alone names is an owner's"
        );
    }

    #[test]
    fn agentex_auth_is_judged_by_owner_and_parent_whatever_the_mapping_lists() {
        let e = expectation("document", &quickstart(), Writer::AgentexAuth);
        assert_eq!(e.parent, Some(("parent_folder".into(), "folder".into())));
        assert_eq!(e.principal_relations, ["owner"]);
        assert!(e.column_relations.is_empty());
        assert!(e.scope_all);
        assert_eq!(e.owners, [OwnerRelation::agentex_auth()]);
        assert!(e.is_owner_relation("owner") && !e.is_owner_relation("parent_folder"));
        let builtin = expectation("task", &Mappings::builtin(), Writer::AgentexAuth);
        assert_eq!(
            builtin.parent,
            Some(("parent_agent".into(), "agent".into()))
        );
        let agent = expectation("agent", &Mappings::builtin(), Writer::SpiceDb);
        assert_eq!(
            agent.owners,
            [OwnerRelation::agentex_auth()],
            "the built-in mappings name agentex-auth's owner"
        );
        assert_eq!(
            (agent.parent, agent.principal_relations),
            (None, vec!["owner".to_string()])
        );
    }
}
