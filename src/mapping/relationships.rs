//! Relationships: what a live row means in SpiceDB, for the SpiceDB target.
//!
//! A mapping lists them as strings, one relationship each:
//!
//! ```text
//! api_key:{id}#parent_agent@agent:{agent_id}
//! api_key:{id}#owner@user:{principal.user_id}|service_account:{principal.service_account_id}
//! owner@user:{owner_id}                      # the resource part may be left out
//! ```
//!
//! The resource is always the mapping's own (its type and selector; written
//! out, it must say exactly that). A subject comes from a column of the row
//! (`{agent_id}`; the parent's column is read from the outbox row's
//! `parent_id`, others are captured into its `attributes`) or from a field of
//! the row's principal (`{principal.user_id}`). Alternatives separated by `|`
//! are tried in order and the first whose value is present wins: that is how
//! the owner is a `user` when the principal has a `user_id`, else a
//! `service_account`.
//!
//! Ids: a subject from a column is a selector like any other and is
//! written in the `authz-outbox` object-id encoding (`domain::object_id`),
//! as the parent is on the agentex path; a principal's id is written as it
//! is (agentex-auth does the same) and must already be a valid SpiceDB id.

use std::collections::BTreeSet;
use std::fmt;

use crate::domain::ResourceType;

/// One relationship of a mapping, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relationship {
    pub relation: String,
    /// Alternatives, first present wins.
    pub subjects: Vec<Subject>,
}

/// One way to name the subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    pub subject_type: ResourceType,
    pub source: Source,
}

/// Where a subject's id comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The mapping's parent column, named (its value is the outbox row's
    /// `parent_id`).
    Parent(String),
    /// Another column of the row, captured into the outbox row's `attributes`.
    Column(String),
    /// A field of the row's principal.
    Principal(String),
}

/// How reconcile can judge a relationship of a live row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Its subject is the row's parent: SpiceDB must hold exactly the
    /// parents the row names.
    Parent,
    /// Every alternative is a column of the row: SpiceDB must hold exactly
    /// the subject the row names.
    Column,
    /// The subject comes from whoever wrote the row (a principal field),
    /// which the row does not keep: SpiceDB must hold one, any one.
    Principal,
}

impl Relationship {
    /// How reconcile judges it: by the parent when any alternative is the
    /// parent, by the row when every alternative is a column, else by
    /// presence.
    pub fn role(&self) -> Role {
        let sources = || self.subjects.iter().map(|s| &s.source);
        if sources().any(|s| matches!(s, Source::Parent(_))) {
            Role::Parent
        } else if sources().all(|s| matches!(s, Source::Column(_))) {
            Role::Column
        } else {
            Role::Principal
        }
    }
}

/// What a deregister deletes in SpiceDB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeregisterScope {
    /// Every relationship of the resource, including ones the mapping does
    /// not know (shares granted elsewhere): agentex-auth's "removes the
    /// resource and all of its relationships".
    #[default]
    All,
    /// Only the relations the mapping lists; other relationships stay.
    Mapped,
}

impl fmt::Display for DeregisterScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeregisterScope::All => "all",
            DeregisterScope::Mapped => "mapped",
        })
    }
}

impl fmt::Display for Relationship {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@", self.relation)?;
        for (i, s) in self.subjects.iter().enumerate() {
            if i > 0 {
                f.write_str("|")?;
            }
            let source = match &s.source {
                Source::Parent(c) => c.clone(),
                Source::Column(c) => c.clone(),
                Source::Principal(p) => format!("principal.{p}"),
            };
            write!(f, "{}:{{{source}}}", s.subject_type)?;
        }
        Ok(())
    }
}

/// What a relationship string is checked against.
pub struct Context<'a> {
    pub resource_type: &'a ResourceType,
    pub selector: &'a str,
    pub parent_column: Option<&'a str>,
    pub principal_fields: &'a [String],
}

/// Parses one relationship string (see the module docs).
pub fn parse(text: &str, cx: &Context<'_>) -> Result<Relationship, String> {
    let bad = |why: &str| format!("relationship {text:?}: {why}");
    let (left, subjects) = text
        .rsplit_once('@')
        .ok_or_else(|| bad("expected RELATION@SUBJECT_TYPE:{SOURCE}"))?;
    let relation = match left.rsplit_once('#') {
        Some((resource, relation)) => {
            let (kind, selector) = resource
                .split_once(':')
                .ok_or_else(|| bad("the resource part must be TYPE:SELECTOR"))?;
            if kind != cx.resource_type.as_str() || selector != cx.selector {
                return Err(bad(&format!(
                    "the resource must be the mapping's own, {}:{}",
                    cx.resource_type, cx.selector
                )));
            }
            relation
        }
        None => left,
    };
    if !is_relation_name(relation) {
        return Err(bad(&format!(
            "relation {relation:?} is not a SpiceDB relation name ([a-z][a-z0-9_]{{1,62}}[a-z0-9])"
        )));
    }
    let mut alternatives = Vec::new();
    for alternative in subjects.split('|') {
        let (kind, source) = alternative
            .trim()
            .split_once(':')
            .ok_or_else(|| bad("a subject must be SUBJECT_TYPE:{SOURCE}"))?;
        let subject_type: ResourceType = kind.parse().map_err(|e| bad(&format!("{e}")))?;
        let inner = source
            .strip_prefix('{')
            .and_then(|s| s.strip_suffix('}'))
            .ok_or_else(|| bad("a subject's id must be {column} or {principal.FIELD}"))?;
        let source = match inner.strip_prefix("principal.") {
            Some(field) => {
                if !cx.principal_fields.iter().any(|f| f == field) {
                    return Err(bad(&format!(
                        "principal field {field:?} is not in principal_fields, so it is never stored"
                    )));
                }
                Source::Principal(field.to_string())
            }
            None if Some(inner) == cx.parent_column => Source::Parent(inner.to_string()),
            None if super::is_plain_identifier(inner) => Source::Column(inner.to_string()),
            None => return Err(bad(&format!("{inner:?} is not a plain column name"))),
        };
        alternatives.push(Subject {
            subject_type,
            source,
        });
    }
    Ok(Relationship {
        relation: relation.to_string(),
        subjects: alternatives,
    })
}

/// Whether any subject alternative reads the writer's principal.
pub fn names_principal(relationships: &[Relationship]) -> bool {
    relationships
        .iter()
        .flat_map(|r| &r.subjects)
        .any(|s| matches!(s.source, Source::Principal(_)))
}

/// The relationships a mapping that lists none means: what agentex-auth
/// writes for a register (CONTRACT.md): the creator as `owner` (a `user`,
/// else a `service_account`), and the parent as `parent_<type>`.
pub fn defaults(parent: Option<(&ResourceType, &str)>, principal_fields: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    if let Some((kind, column)) = parent {
        out.push(format!("parent_{kind}@{kind}:{{{column}}}"));
    }
    let owners: Vec<String> = [
        ("user", "user_id"),
        ("service_account", "service_account_id"),
    ]
    .iter()
    .filter(|(_, field)| principal_fields.iter().any(|f| f == field))
    .map(|(kind, field)| format!("{kind}:{{principal.{field}}}"))
    .collect();
    if !owners.is_empty() {
        out.push(format!("owner@{}", owners.join("|")));
    }
    out
}

/// The columns (other than the parent's) whose values the relationships
/// need: captured into the outbox row's `attributes`.
pub fn attribute_columns(relationships: &[Relationship]) -> BTreeSet<String> {
    relationships
        .iter()
        .flat_map(|r| &r.subjects)
        .filter_map(|s| match &s.source {
            Source::Column(c) => Some(c.clone()),
            _ => None,
        })
        .collect()
}

/// The names a SpiceDB schema defines: per definition, its relations (with
/// the subject types each allows) and its permissions. A light reading of
/// the schema text, enough to name what a mapping gets wrong in one line;
/// SpiceDB still judges every write.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SchemaNames {
    definitions: std::collections::BTreeMap<String, DefinitionNames>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct DefinitionNames {
    relations: std::collections::BTreeMap<String, BTreeSet<String>>,
    permissions: BTreeSet<String>,
}

impl SchemaNames {
    pub fn parse(text: &str) -> SchemaNames {
        // Comments out first: `//` to the end of the line, `/* ... */`.
        let mut clean = String::with_capacity(text.len());
        let mut rest = text;
        while !rest.is_empty() {
            if let Some(after) = rest.strip_prefix("/*") {
                rest = after.split_once("*/").map(|(_, r)| r).unwrap_or("");
            } else if let Some(after) = rest.strip_prefix("//") {
                rest = after.split_once('\n').map(|(_, r)| r).unwrap_or("");
                clean.push('\n');
            } else {
                let c = rest.chars().next().unwrap_or(' ');
                clean.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
        let mut names = SchemaNames::default();
        let mut current: Option<String> = None;
        // Statements end at a newline or a brace.
        for statement in clean.split(['\n', '{', '}']) {
            let words: Vec<&str> = statement.split_whitespace().collect();
            match words.as_slice() {
                ["definition", name, ..] => {
                    current = Some(name.to_string());
                    names.definitions.entry(name.to_string()).or_default();
                }
                ["caveat", ..] => current = None,
                ["relation", ..] => {
                    let Some(def) = current.as_ref().and_then(|c| names.definitions.get_mut(c))
                    else {
                        continue;
                    };
                    let body = statement.trim_start().trim_start_matches("relation");
                    let Some((name, types)) = body.split_once(':') else {
                        continue;
                    };
                    let allowed = types
                        .split('|')
                        .filter_map(|t| {
                            t.split(|c: char| c == ':' || c == '#' || c.is_whitespace())
                                .find(|w| !w.is_empty())
                                .map(str::to_string)
                        })
                        .collect();
                    def.relations.insert(name.trim().to_string(), allowed);
                }
                ["permission", name, ..] => {
                    if let Some(def) = current.as_ref().and_then(|c| names.definitions.get_mut(c)) {
                        let name = name.split('=').next().unwrap_or(name);
                        def.permissions.insert(name.to_string());
                    }
                }
                _ => {}
            }
        }
        names
    }

    /// Whether SpiceDB would accept `resource_type#relation@subject_type`.
    pub fn check(
        &self,
        resource_type: &str,
        relation: &str,
        subject_type: &str,
    ) -> Result<(), String> {
        let def = self
            .definitions
            .get(resource_type)
            .ok_or_else(|| format!("the SpiceDB schema has no definition {resource_type}"))?;
        let Some(allowed) = def.relations.get(relation) else {
            if def.permissions.contains(relation) {
                return Err(format!(
                    "{resource_type}#{relation} is a permission in the SpiceDB schema, not a relation"
                ));
            }
            return Err(format!(
                "definition {resource_type} in the SpiceDB schema has no relation {relation}"
            ));
        };
        if !self.definitions.contains_key(subject_type) {
            return Err(format!(
                "the SpiceDB schema has no definition {subject_type} (subject of {resource_type}#{relation})"
            ));
        }
        if !allowed.is_empty() && !allowed.contains(subject_type) {
            let allowed: Vec<&str> = allowed.iter().map(String::as_str).collect();
            return Err(format!(
                "{resource_type}#{relation} does not allow subject type {subject_type} (allows {})",
                allowed.join(", ")
            ));
        }
        Ok(())
    }
}

/// SpiceDB's relation-name syntax.
pub fn is_relation_name(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() >= 3
        && b.len() <= 64
        && b[0].is_ascii_lowercase()
        && b[1..b.len() - 1]
            .iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_')
        && (b[b.len() - 1].is_ascii_lowercase() || b[b.len() - 1].is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cx<'a>(fields: &'a [String]) -> Context<'a> {
        Context {
            resource_type: &ResourceType::ApiKey,
            selector: "{id}",
            parent_column: Some("agent_id"),
            principal_fields: fields,
        }
    }

    #[test]
    fn parses_the_issues_examples() {
        let fields = vec!["user_id".to_string(), "service_account_id".to_string()];
        let parent = parse("api_key:{id}#parent_agent@agent:{agent_id}", &cx(&fields)).expect("ok");
        assert_eq!(parent.relation, "parent_agent");
        assert_eq!(parent.subjects[0].source, Source::Parent("agent_id".into()));
        let owner = parse(
            "owner@user:{principal.user_id}|service_account:{principal.service_account_id}",
            &cx(&fields),
        )
        .expect("ok");
        assert_eq!(owner.subjects.len(), 2);
        assert_eq!(owner.subjects[1].subject_type.as_str(), "service_account");
        let column = parse("editor@user:{editor_id}", &cx(&fields)).expect("ok");
        assert_eq!(
            column.subjects[0].source,
            Source::Column("editor_id".into())
        );
        assert_eq!(
            (parent.role(), owner.role(), column.role()),
            (Role::Parent, Role::Principal, Role::Column)
        );
        let mixed = parse(
            "owner@user:{editor_id}|user:{principal.user_id}",
            &cx(&fields),
        )
        .expect("ok");
        assert_eq!(mixed.role(), Role::Principal);
        assert_eq!(attribute_columns(&[parent, owner, column]).len(), 1);
    }

    #[test]
    fn rejects_what_cannot_be_written() {
        let fields = vec!["user_id".to_string()];
        let err = |t: &str| parse(t, &cx(&fields)).expect_err(t);
        assert!(err("task:{id}#owner@user:{principal.user_id}").contains("mapping's own"));
        assert!(err("owner@user:{principal.tenant}").contains("principal_fields"));
        assert!(err("Owner@user:{x}").contains("relation name"));
        assert!(err("owner@User:{x}").contains("invalid resource type"));
        assert!(err("owner@user:x").contains("{column}"));
        assert!(err("owner").contains("RELATION@"));
    }

    #[test]
    fn defaults_match_agentex_auth() {
        let fields = vec!["user_id".to_string(), "service_account_id".to_string()];
        assert_eq!(
            defaults(Some((&ResourceType::Agent, "agent_id")), &fields),
            [
                "parent_agent@agent:{agent_id}",
                "owner@user:{principal.user_id}|service_account:{principal.service_account_id}"
            ]
        );
    }

    #[test]
    fn schema_names_say_what_a_mapping_gets_wrong() {
        let schema = SchemaNames::parse(
            "/* docs */\ndefinition user {}\ndefinition folder {\n  relation owner: user // who\n}\n\
             definition document {\n    relation parent: folder\n    relation owner: user | user:* | group#member\n    permission read = owner + parent->owner\n}",
        );
        assert_eq!(schema.check("document", "owner", "user"), Ok(()));
        assert_eq!(schema.check("document", "parent", "folder"), Ok(()));
        assert!(
            schema
                .check("doc", "owner", "user")
                .expect_err("x")
                .contains("no definition doc")
        );
        assert!(
            schema
                .check("document", "editor", "user")
                .expect_err("x")
                .contains("no relation editor")
        );
        assert!(
            schema
                .check("document", "read", "user")
                .expect_err("x")
                .contains("is a permission")
        );
        assert!(
            schema
                .check("document", "parent", "user")
                .expect_err("x")
                .contains("does not allow")
        );
        assert!(
            schema
                .check("document", "owner", "team")
                .expect_err("x")
                .contains("no definition team")
        );
    }
}
