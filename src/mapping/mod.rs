//! Resource mappings: the one description of each resource type, read by
//! capture, delivery, reconcile, replay and status.
//!
//! A mapping says which table holds a resource, how its selector is built,
//! who its parent is, when a row counts as **live**, and where the creator
//! comes from. `migrate` turns every mapping into PostgreSQL objects
//! ([`ddl`]) — capture triggers that follow liveness, a lookup "is this
//! resource live with this parent?", and the `authz_outbox_desired` view of
//! what SpiceDB should hold — so the worker, reconcile and replay all judge
//! by the same generated SQL, and a host writer in any language is captured.
//!
//! The agentex host's four types are built in ([`Mappings::builtin`]); an
//! operator adds or replaces mappings with a TOML file:
//!
//! ```toml
//! [[mapping]]
//! name = "service_api_keys"          # unique; defaults to the type
//! type = "api_key"
//! table = "service_api_keys"
//! selector = "{id}"                  # or a template: "run-schedule::{agent_id}::{id}"
//! live = "revoked_at IS NULL"        # SQL over the table's columns; absent = every row
//! creator = ["setting"]              # "setting" and/or "column:NAME", first that names a creator wins;
//!                                     # [] when the relationships name no principal (all from columns)
//! principal_fields = ["user_id", "service_account_id", "account_id"]
//! parent = { type = "agent", column = "agent_id" }
//! # a parent reached through a join table:
//! # parent = { type = "agent", column = "agent_id", join = { table = "task_agents", on = "task_id", references = "id" } }
//! # For the SpiceDB target: the relationships a live row means (see
//! # `relationships`); absent = the owner and parent edges agentex-auth writes.
//! relationships = [
//!     "api_key:{id}#parent_agent@agent:{agent_id}",
//!     "api_key:{id}#owner@user:{principal.user_id}|service_account:{principal.service_account_id}",
//! ]
//! deregister = "all"                 # what a deregister deletes: "all" relationships of the resource (default), or only the "mapped" relations
//! ```
//!
//! Types: any SpiceDB definition name for the SpiceDB target; the
//! agentex-auth target knows only the host's four (`migrate` and `mappings
//! check` refuse others with `--target agentex-auth`).

pub mod catalog;
pub mod core;
pub mod ddl;
pub mod init;
pub mod install;
pub mod predicate;
pub mod quote;
pub mod relationships;
pub mod template;

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::domain::{IDENTITY_FIELDS, ResourceType};
use predicate::{Predicate, PredicateError};
use relationships::{DeregisterScope, Relationship};
use template::{SelectorTemplate, TemplateError};

/// A mapping as written in a file (and stored, as JSON, in
/// `authz_outbox_mappings.definition`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MappingSpec {
    /// Unique name; defaults to the resource type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(rename = "type")]
    pub resource_type: String,
    pub table: String,
    #[serde(default = "default_selector")]
    pub selector: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentSpec>,
    /// When a row is live. Absent: every row is (hard deletes only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live: Option<String>,
    /// Creator sources in order of precedence: `setting` (the transaction
    /// setting `authz_outbox.principal`) and `column:NAME` (a JSON column of
    /// the row). Default: `["setting"]`.
    #[serde(default = "default_creator")]
    pub creator: Vec<String>,
    /// Principal fields kept (credential-looking fields are always dropped).
    #[serde(default = "default_fields")]
    pub principal_fields: Vec<String>,
    /// The column holding the row's creation time (reconcile's grace for
    /// young resources); default `created_at` when the table has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    /// A file entry with `enabled = false` removes a built-in mapping.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Built-ins are skipped when their table does not exist (a host
    /// without schedules); a file's mappings must find their table.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub optional: bool,
    /// For the SpiceDB target: the relationships a live row means (see
    /// [`relationships`]). Absent: the owner and parent edges agentex-auth
    /// writes for a register.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relationships: Option<Vec<String>>,
    /// For the SpiceDB target: what a deregister deletes (default `all`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deregister: Option<DeregisterScope>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParentSpec {
    #[serde(rename = "type")]
    pub resource_type: String,
    /// The column holding the parent's selector: on the source table, or on
    /// the join table when `join` is set.
    pub column: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join: Option<JoinSpec>,
}

/// A parent reached through a join table: `join.table.on = table.references`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinSpec {
    pub table: String,
    pub on: String,
    #[serde(default = "default_references")]
    pub references: String,
}

fn default_selector() -> String {
    "{id}".into()
}
fn default_creator() -> Vec<String> {
    vec!["setting".into()]
}
fn default_fields() -> Vec<String> {
    IDENTITY_FIELDS.iter().map(|s| s.to_string()).collect()
}
fn default_references() -> String {
    "id".into()
}
fn default_true() -> bool {
    true
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MappingError {
    #[error("mapping {name}: {message}")]
    Invalid { name: String, message: String },
    #[error("mapping file {path}: {message}")]
    File { path: String, message: String },
    #[error("two mappings are named {0:?}")]
    Duplicate(String),
}

fn invalid(name: &str, message: impl std::fmt::Display) -> MappingError {
    MappingError::Invalid {
        name: name.to_string(),
        message: message.to_string(),
    }
}

/// Where a creator comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreatorSource {
    /// The transaction-local setting `authz_outbox.principal`.
    Setting,
    /// A JSON (or JSON-text) column of the row, such as `creator_principal`.
    Column(String),
}

/// A validated mapping: every name is a plain identifier, the template and
/// predicate parse. What the database must confirm (tables, columns, types)
/// is [`catalog`]'s job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub name: String,
    pub resource_type: ResourceType,
    pub table: String,
    pub selector: SelectorTemplate,
    pub parent: Option<Parent>,
    pub live: Option<Predicate>,
    pub creator: Vec<CreatorSource>,
    pub principal_fields: Vec<String>,
    pub created_at: Option<String>,
    pub optional: bool,
    /// What a live row means in SpiceDB (stated, or the defaults).
    pub relationships: Vec<Relationship>,
    pub deregister: DeregisterScope,
    /// What it was parsed from (stored with the installed mapping).
    pub spec: MappingSpec,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parent {
    pub resource_type: ResourceType,
    pub column: String,
    pub join: Option<JoinSpec>,
}

impl Mapping {
    pub fn from_spec(spec: MappingSpec) -> Result<Self, MappingError> {
        let name = spec
            .name
            .clone()
            .unwrap_or_else(|| spec.resource_type.clone());
        if !is_plain_identifier(&name) || name.len() > 40 {
            return Err(invalid(
                &name,
                "name must be lower-case letters, digits and _ (at most 40), starting with a letter",
            ));
        }
        let resource_type: ResourceType =
            spec.resource_type.parse().map_err(|e| invalid(&name, e))?;
        check_table_name(&name, "table", &spec.table)?;
        let selector = SelectorTemplate::parse(&spec.selector)
            .map_err(|e: TemplateError| invalid(&name, e))?;
        let parent = match &spec.parent {
            None => None,
            Some(p) => {
                check_identifier(&name, "parent column", &p.column)?;
                if let Some(join) = &p.join {
                    check_table_name(&name, "parent join table", &join.table)?;
                    check_identifier(&name, "parent join column `on`", &join.on)?;
                    check_identifier(&name, "parent join column `references`", &join.references)?;
                }
                Some(Parent {
                    resource_type: p.resource_type.parse().map_err(|e| invalid(&name, e))?,
                    column: p.column.clone(),
                    join: p.join.clone(),
                })
            }
        };
        let live = spec
            .live
            .as_deref()
            .map(Predicate::parse)
            .transpose()
            .map_err(|e: PredicateError| invalid(&name, e))?;
        let creator = spec
            .creator
            .iter()
            .map(|source| match source.as_str() {
                "setting" => Ok(CreatorSource::Setting),
                other => match other.strip_prefix("column:") {
                    Some(column) => {
                        check_identifier(&name, "creator column", column)?;
                        Ok(CreatorSource::Column(column.to_string()))
                    }
                    None => Err(invalid(
                        &name,
                        format!(
                            "creator source {other:?} is neither \"setting\" nor \"column:NAME\""
                        ),
                    )),
                },
            })
            .collect::<Result<Vec<_>, _>>()?;
        if spec.principal_fields.is_empty() {
            return Err(invalid(
                &name,
                "principal_fields must keep at least one field",
            ));
        }
        for field in &spec.principal_fields {
            if crate::domain::is_credential_key(field) {
                return Err(invalid(
                    &name,
                    format!(
                        "principal field {field:?} looks like a credential and is never stored"
                    ),
                ));
            }
            if field.is_empty() || field.len() > 64 || field.chars().any(char::is_control) {
                return Err(invalid(
                    &name,
                    format!("principal field {field:?} is not a field name"),
                ));
            }
        }
        if !spec
            .principal_fields
            .iter()
            .any(|f| f == "user_id" || f == "service_account_id")
        {
            return Err(invalid(
                &name,
                "principal_fields must keep user_id or service_account_id (the creator)",
            ));
        }
        if let Some(column) = &spec.created_at {
            check_identifier(&name, "created_at column", column)?;
        }
        let texts = match &spec.relationships {
            Some(stated) => stated.clone(),
            None => relationships::defaults(
                parent
                    .as_ref()
                    .map(|p| (&p.resource_type, p.column.as_str())),
                &spec.principal_fields,
            ),
        };
        let cx = relationships::Context {
            resource_type: &resource_type,
            selector: selector.as_str(),
            parent_column: parent.as_ref().map(|p| p.column.as_str()),
            principal_fields: &spec.principal_fields,
        };
        let relationships = texts
            .iter()
            .map(|t| relationships::parse(t, &cx))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(&name, e))?;
        if relationships.is_empty() {
            return Err(invalid(
                &name,
                "relationships must list at least one (a live row with none would be invisible in SpiceDB)",
            ));
        }
        // No creator at all is for relationships that are all columns and
        // parents: such a write needs nobody to be named, and a principal
        // the relationships never read would only be a placeholder.
        if creator.is_empty() && relationships::names_principal(&relationships) {
            return Err(invalid(
                &name,
                "creator = [] is only for relationships that name no principal;                  these read {principal.FIELD} (list where the creator comes from, e.g. creator = [\"setting\"])",
            ));
        }
        if parent.as_ref().is_some_and(|p| p.join.is_some())
            && !relationships::attribute_columns(&relationships).is_empty()
        {
            // The join-table capture re-parents from the join table alone.
            return Err(invalid(
                &name,
                "with a join-table parent, relationship subjects come from the parent or the principal only",
            ));
        }
        Ok(Mapping {
            name,
            resource_type,
            table: spec.table.clone(),
            selector,
            parent,
            live,
            creator,
            principal_fields: spec.principal_fields.clone(),
            created_at: spec.created_at.clone(),
            optional: spec.optional,
            relationships,
            deregister: spec.deregister.unwrap_or_default(),
            spec,
        })
    }
}

fn check_identifier(name: &str, what: &str, value: &str) -> Result<(), MappingError> {
    if is_plain_identifier(value) {
        Ok(())
    } else {
        Err(invalid(
            name,
            format!("{what} {value:?} must be a plain lower-case SQL name (letters, digits, _)"),
        ))
    }
}

/// A table as a mapping names it: `table`, or `schema.table` for a table
/// outside the search path; each part a plain identifier.
fn check_table_name(name: &str, what: &str, value: &str) -> Result<(), MappingError> {
    let plain = match value.split_once('.') {
        Some((schema, table)) => is_plain_identifier(schema) && is_plain_identifier(table),
        None => is_plain_identifier(value),
    };
    if plain {
        Ok(())
    } else {
        Err(invalid(
            name,
            format!(
                "{what} {value:?} must be a plain lower-case SQL name, or schema.name (letters, digits, _)"
            ),
        ))
    }
}

/// A lower-case SQL identifier that needs no quoting: what every name in a
/// mapping must be, so generated SQL never carries an operator's quoting.
pub fn is_plain_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && s.len() <= 63
}

/// The mappings in force: the built-ins, changed by an optional file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mappings {
    mappings: Vec<Mapping>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MappingFile {
    #[serde(default)]
    mapping: Vec<MappingSpec>,
}

/// The largest mapping file read; a mapping file is a few hundred lines.
const MAX_FILE_BYTES: u64 = 1024 * 1024;

impl Mappings {
    /// The agentex host's four types, as its own code treats them
    /// (CONTRACT.md, "Every resource the host registers").
    pub fn builtin() -> Self {
        Mappings {
            mappings: builtin_specs()
                .into_iter()
                .map(|spec| Mapping::from_spec(spec).expect("built-in mappings are valid"))
                .collect(),
        }
    }

    /// The built-ins, changed by `file` when given: an entry with a
    /// built-in's name replaces it (`enabled = false` removes it), other
    /// entries are added.
    pub fn load(file: Option<&Path>) -> Result<Self, MappingError> {
        let Some(path) = file else {
            return Ok(Self::builtin());
        };
        let shown = path.display().to_string();
        let file_error = |message: String| MappingError::File {
            path: shown.clone(),
            message,
        };
        let size = std::fs::metadata(path)
            .map_err(|e| file_error(e.to_string()))?
            .len();
        if size > MAX_FILE_BYTES {
            return Err(file_error(format!("larger than {MAX_FILE_BYTES} bytes")));
        }
        let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
        Self::from_toml(&text).map_err(|e| match e {
            MappingError::File { message, .. } => file_error(message),
            other => other,
        })
    }

    /// The built-ins changed by a TOML document (see [`Mappings::load`]).
    pub fn from_toml(text: &str) -> Result<Self, MappingError> {
        let file: MappingFile = toml::from_str(text).map_err(|e| MappingError::File {
            path: String::new(),
            message: one_line(&e.to_string()),
        })?;
        let mut specs: BTreeMap<String, MappingSpec> = builtin_specs()
            .into_iter()
            .map(|s| (s.name.clone().unwrap_or_else(|| s.resource_type.clone()), s))
            .collect();
        let mut seen = std::collections::BTreeSet::new();
        for spec in file.mapping {
            let name = spec
                .name
                .clone()
                .unwrap_or_else(|| spec.resource_type.clone());
            if !seen.insert(name.clone()) {
                return Err(MappingError::Duplicate(name));
            }
            if spec.enabled {
                specs.insert(name, spec);
            } else if specs.remove(&name).is_none() {
                // A typo here would leave the built-in it meant installed.
                return Err(invalid(
                    &name,
                    "enabled = false names no built-in mapping (built-ins: agent, api_key, task, schedule)",
                ));
            }
        }
        let mappings = specs
            .into_values()
            .map(Mapping::from_spec)
            .collect::<Result<Vec<_>, _>>()?;
        let mappings = Mappings { mappings };
        mappings.require_installable_names()?;
        mappings.require_one_mapping_per_type_and_table()?;
        Ok(mappings)
    }

    /// Every generated name fits PostgreSQL's identifier length and no two
    /// mappings generate the same one (see [`ddl::generated_names`]).
    fn require_installable_names(&self) -> Result<(), MappingError> {
        let mut owners: BTreeMap<String, &str> = BTreeMap::new();
        for m in &self.mappings {
            for generated in ddl::generated_names(&m.name) {
                if generated.len() > ddl::MAX_IDENTIFIER_BYTES {
                    return Err(invalid(
                        &m.name,
                        format!(
                            "name is too long: it generates {generated}, longer than PostgreSQL's {} bytes",
                            ddl::MAX_IDENTIFIER_BYTES
                        ),
                    ));
                }
                if let Some(other) = owners.insert(generated.clone(), &m.name) {
                    return Err(invalid(
                        &m.name,
                        format!("it generates {generated}, as mapping {other} does; rename one"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Two mappings of one type on one table would capture every write
    /// twice.
    fn require_one_mapping_per_type_and_table(&self) -> Result<(), MappingError> {
        for (i, a) in self.mappings.iter().enumerate() {
            for b in &self.mappings[i + 1..] {
                if a.resource_type == b.resource_type && a.table == b.table {
                    return Err(invalid(
                        &b.name,
                        format!(
                            "mapping {} already maps table {} to type {}",
                            a.name, a.table, a.resource_type
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    pub fn iter(&self) -> impl Iterator<Item = &Mapping> {
        self.mappings.iter()
    }

    pub fn get(&self, name: &str) -> Option<&Mapping> {
        self.mappings.iter().find(|m| m.name == name)
    }

    /// The agentex-auth target knows only the host's four types: any other
    /// type (or parent type) is refused here, before anything is installed,
    /// rather than dead-lettered at delivery.
    pub fn require_agentex_types(&self) -> Result<(), MappingError> {
        for m in &self.mappings {
            m.resource_type
                .require_agentex()
                .map_err(|e| invalid(&m.name, e))?;
            if let Some(p) = &m.parent {
                p.resource_type
                    .require_agentex()
                    .map_err(|e| invalid(&m.name, format!("parent: {e}")))?;
            }
        }
        Ok(())
    }

    /// The SpiceDB target writes one relationship set per resource type, so
    /// every mapping of a type must mean the same relationships.
    pub fn require_one_relationship_set_per_type(&self) -> Result<(), MappingError> {
        for (i, a) in self.mappings.iter().enumerate() {
            for b in &self.mappings[i + 1..] {
                if a.resource_type == b.resource_type
                    && (a.relationships != b.relationships || a.deregister != b.deregister)
                {
                    return Err(invalid(
                        &b.name,
                        format!(
                            "its relationships differ from mapping {}'s, for the same type {}; the SpiceDB target needs one set per type",
                            a.name, a.resource_type
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Checks every mapping's relationships against a SpiceDB schema's text.
    pub fn check_schema(&self, schema: &str) -> Result<(), MappingError> {
        let names = relationships::SchemaNames::parse(schema);
        for m in &self.mappings {
            for r in &m.relationships {
                for s in &r.subjects {
                    names
                        .check(
                            m.resource_type.as_str(),
                            &r.relation,
                            s.subject_type.as_str(),
                        )
                        .map_err(|e| invalid(&m.name, e))?;
                }
            }
        }
        Ok(())
    }

    /// The mappings as recorded by `migrate` (`authz_outbox_mappings`), for
    /// the worker: the same parse as a file's, so a definition written by an
    /// older release gets today's defaults.
    pub fn from_installed(definitions: &[serde_json::Value]) -> Result<Self, MappingError> {
        let mappings = definitions
            .iter()
            .map(|d| {
                let spec: MappingSpec =
                    serde_json::from_value(d.clone()).map_err(|e| MappingError::File {
                        path: "authz_outbox_mappings".into(),
                        message: one_line(&e.to_string()),
                    })?;
                Mapping::from_spec(spec)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Mappings { mappings })
    }
}

fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn builtin_specs() -> Vec<MappingSpec> {
    let base = |resource_type: &str, table: &str| MappingSpec {
        name: None,
        resource_type: resource_type.into(),
        table: table.into(),
        selector: default_selector(),
        parent: None,
        live: None,
        creator: default_creator(),
        principal_fields: default_fields(),
        created_at: None,
        enabled: true,
        optional: true,
        relationships: None,
        deregister: None,
    };
    // What agentex-auth writes for each (CONTRACT.md), so the SpiceDB target
    // produces the same graph.
    let owner = "owner@user:{principal.user_id}|service_account:{principal.service_account_id}";
    let relationships = |kind: &str, selector: &str, parent: bool| {
        let mut out = Vec::new();
        if parent {
            out.push(format!("{kind}:{selector}#parent_agent@agent:{{agent_id}}"));
        }
        out.push(format!("{kind}:{selector}#{owner}"));
        Some(out)
    };
    let agent_parent = |join: Option<JoinSpec>| {
        Some(ParentSpec {
            resource_type: "agent".into(),
            column: "agent_id".into(),
            join,
        })
    };
    vec![
        // Deleted softly: `status` set to DELETED, the row kept.
        MappingSpec {
            live: Some("status IS DISTINCT FROM 'DELETED'".into()),
            relationships: relationships("agent", "{id}", false),
            ..base("agent", "agents")
        },
        // Deleted hard, by id, by (agent, name, type), or by cascade.
        MappingSpec {
            parent: agent_parent(None),
            relationships: relationships("api_key", "{id}", true),
            ..base("api_key", "agent_api_keys")
        },
        // Deleted softly; NULL and every other status are live. The parent
        // is the task_agents row the host inserts right after the task.
        MappingSpec {
            parent: agent_parent(Some(JoinSpec {
                table: "task_agents".into(),
                on: "task_id".into(),
                references: "id".into(),
            })),
            live: Some("status IS DISTINCT FROM 'DELETED'".into()),
            relationships: relationships("task", "{id}", true),
            ..base("task", "tasks")
        },
        // Deleted softly by `deleted_at`; the row records its own creator.
        MappingSpec {
            selector: "run-schedule::{agent_id}::{id}".into(),
            parent: agent_parent(None),
            live: Some("deleted_at IS NULL".into()),
            creator: vec!["column:creator_principal".into(), "setting".into()],
            relationships: relationships("schedule", "run-schedule::{agent_id}::{id}", true),
            ..base("schedule", "agent_run_schedules")
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_cover_the_hosts_four_types() {
        let m = Mappings::builtin();
        let names: Vec<&str> = m.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["agent", "api_key", "task", "schedule"]);
        let schedule = m.get("schedule").expect("schedule");
        assert_eq!(
            schedule.creator,
            [
                CreatorSource::Column("creator_principal".into()),
                CreatorSource::Setting
            ]
        );
    }

    #[test]
    fn a_file_adds_replaces_and_removes() {
        let m = Mappings::from_toml(
            r#"
            [[mapping]]
            name = "service_keys"
            type = "api_key"
            table = "service_api_keys"
            live = "revoked_at IS NULL"
            parent = { type = "agent", column = "agent_id" }

            [[mapping]]
            type = "task"
            table = "tasks"
            enabled = false

            [[mapping]]
            type = "agent"
            table = "agents"
            principal_fields = ["user_id", "tenant"]
            "#,
        )
        .expect("valid file");
        let names: Vec<&str> = m.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["agent", "api_key", "schedule", "service_keys"]);
        assert_eq!(
            m.get("agent").expect("agent").principal_fields,
            ["user_id", "tenant"]
        );
        assert!(!m.get("service_keys").expect("added").optional);
    }

    #[test]
    fn bad_mappings_name_themselves() {
        let err = |toml: &str| Mappings::from_toml(toml).expect_err("invalid").to_string();
        assert!(
            err("[[mapping]]\nname = \"x\"\ntype = \"Widget\"\ntable = \"w\"")
                .contains("invalid resource type")
        );
        let widget = Mappings::from_toml("[[mapping]]\ntype = \"widget\"\ntable = \"w\"")
            .expect("any definition name parses");
        assert!(
            widget
                .require_agentex_types()
                .expect_err("agentex-auth knows four types")
                .to_string()
                .contains("unknown resource type")
        );
        assert!(
            err("[[mapping]]\nname = \"x\"\ntype = \"task\"\ntable = \"t\"\nrelationships = [\"owner@user:{principal.tenant}\"]")
                .contains("principal_fields")
        );
        assert!(
            err("[[mapping]]\nname = \"x\"\ntype = \"task\"\ntable = \"t\"\nrelationships = []")
                .contains("at least one")
        );
        assert!(
            err("[[mapping]]\nname = \"x\"\ntype = \"task\"\ntable = \"Tasks\"")
                .starts_with("mapping x: table \"Tasks\"")
        );
        assert!(
            err("[[mapping]]\nname = \"x\"\ntype = \"task\"\ntable = \"t\"\nprincipal_fields = [\"user_id\", \"api_key\"]")
                .contains("looks like a credential")
        );
        assert!(
            err("[[mapping]]\nname = \"x\"\ntype = \"task\"\ntable = \"t\"\nlive = \"a; drop\"")
                .contains("must not contain")
        );
        assert!(
            err(
                "[[mapping]]\nname = \"x\"\ntype = \"task\"\ntable = \"t\"\ncreator = [\"header\"]"
            )
            .contains("neither")
        );
        assert!(err("[[mapping]]\ntype = \"task\"\ntable = \"t\"\nbogus = 1").contains("bogus"));
        assert!(
            err("[[mapping]]\nname = \"x\"\ntype = \"task\"\ntable = \"t\"\n[[mapping]]\nname = \"x\"\ntype = \"task\"\ntable = \"t\"")
                .contains("two mappings")
        );
    }

    #[test]
    fn builtins_state_what_agentex_auth_writes() {
        let m = Mappings::builtin();
        let key = m.get("api_key").expect("api_key");
        let shown: Vec<String> = key.relationships.iter().map(|r| r.to_string()).collect();
        assert_eq!(
            shown,
            [
                "parent_agent@agent:{agent_id}",
                "owner@user:{principal.user_id}|service_account:{principal.service_account_id}"
            ]
        );
        assert_eq!(m.get("agent").expect("agent").relationships.len(), 1);
        assert_eq!(key.deregister, DeregisterScope::All);
        // A definition stored by a release before relationships existed
        // means the same.
        let mut old = serde_json::to_value(&key.spec).expect("json");
        old.as_object_mut().expect("object").remove("relationships");
        let again = Mappings::from_installed(&[old]).expect("parses");
        assert_eq!(
            again.iter().next().expect("one").relationships,
            key.relationships
        );
        m.require_one_relationship_set_per_type()
            .expect("one set per type");
    }

    #[test]
    fn creator_empty_is_only_for_relationships_that_name_no_principal() {
        let parse = |creator: &str, rel: &str| {
            Mappings::from_toml(&format!(
                "[[mapping]]\ntype = \"folder\"\ntable = \"folders\"\ncreator = {creator}\nrelationships = [\"{rel}\"]"
            ))
        };
        let ok = parse("[]", "owner@user:{owner_id}").expect("columns only");
        let folder = ok.get("folder").expect("folder");
        assert!(folder.creator.is_empty());
        let err = parse("[]", "owner@user:{principal.user_id}")
            .expect_err("reads the principal")
            .to_string();
        assert!(err.contains("creator = [] is only for"), "{err}");
    }
}
