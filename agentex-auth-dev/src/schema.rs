//! The SpiceDB schema the server writes, and the names it defines.
//!
//! The HTTP layer needs to know, before it asks SpiceDB, whether a resource
//! type exists and which operations it defines: an unknown type is the
//! caller's mistake (4xx), and an operation a type does not define is a plain
//! "denied" (403), whereas SpiceDB would answer both with an error. So the
//! schema text is scanned once for its `definition`, `relation` and
//! `permission` names. SpiceDB itself still validates the full text.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};

/// The schema shipped in the repository (`agentex-auth-dev/schema.zed`).
pub const DEFAULT_SCHEMA: &str = include_str!("../schema.zed");

/// The names one `definition` block declares.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Definition {
    pub relations: BTreeSet<String>,
    pub permissions: BTreeSet<String>,
}

impl Definition {
    pub fn has_relation(&self, name: &str) -> bool {
        self.relations.contains(name)
    }

    pub fn has_permission(&self, name: &str) -> bool {
        self.permissions.contains(name)
    }
}

#[derive(Debug, Clone)]
pub struct Schema {
    definitions: BTreeMap<String, Definition>,
}

impl Schema {
    pub fn parse(text: &str) -> Schema {
        let mut definitions = BTreeMap::new();
        let mut current: Option<(String, Definition)> = None;
        for line in text.lines() {
            let line = line.split("//").next().unwrap_or_default();
            let mut words = line.split(|c: char| c.is_whitespace() || "{}:=".contains(c));
            let words: Vec<&str> = words.by_ref().filter(|w| !w.is_empty()).collect();
            match words.as_slice() {
                ["definition", name, ..] => {
                    if let Some((name, definition)) = current.take() {
                        definitions.insert(name, definition);
                    }
                    current = Some((name.to_string(), Definition::default()));
                }
                ["relation", name, ..] => {
                    if let Some((_, definition)) = current.as_mut() {
                        definition.relations.insert(name.to_string());
                    }
                }
                ["permission", name, ..] => {
                    if let Some((_, definition)) = current.as_mut() {
                        definition.permissions.insert(name.to_string());
                    }
                }
                _ => {}
            }
        }
        if let Some((name, definition)) = current {
            definitions.insert(name, definition);
        }
        Schema { definitions }
    }

    pub fn definition(&self, name: &str) -> Option<&Definition> {
        self.definitions.get(name)
    }
}

impl Default for Schema {
    fn default() -> Self {
        Schema::parse(DEFAULT_SCHEMA)
    }
}

/// The schema the engine enforces now, shared by both ports: a `WriteSchema`
/// over gRPC replaces it, so the HTTP API judges types and operations by what
/// SpiceDB holds, not by the schema it started with.
#[derive(Clone)]
pub struct LiveSchema(Arc<RwLock<Arc<Schema>>>);

impl LiveSchema {
    pub fn new(schema: Schema) -> LiveSchema {
        LiveSchema(Arc::new(RwLock::new(Arc::new(schema))))
    }

    pub fn current(&self) -> Arc<Schema> {
        // Replaced whole under the lock, so a poisoned lock holds a whole
        // schema.
        Arc::clone(&self.0.read().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn replace(&self, schema: Schema) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(schema);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_schema_defines_the_contract_types() {
        let schema = Schema::default();
        for ty in ["agent", "api_key", "task", "schedule"] {
            let definition = schema.definition(ty).expect(ty);
            assert!(definition.has_relation("owner"), "{ty} has owner");
            assert!(definition.has_permission("read"), "{ty} has read");
        }
        let agent = schema.definition("agent").expect("agent");
        assert!(!agent.has_relation("parent_agent"));
        assert!(!agent.has_permission("execute"));
        let key = schema.definition("api_key").expect("api_key");
        assert!(key.has_relation("parent_agent"));
        assert!(key.has_permission("delete"));
        for ty in ["task", "schedule"] {
            let definition = schema.definition(ty).expect(ty);
            assert!(definition.has_relation("parent_agent"), "{ty}");
            for permission in ["read", "update", "delete", "execute", "cancel"] {
                assert!(definition.has_permission(permission), "{ty}#{permission}");
            }
        }
        for ty in ["agent", "api_key", "task", "schedule"] {
            let definition = schema.definition(ty).expect(ty);
            assert!(!definition.has_permission("create"), "{ty} has no create");
        }
        assert!(
            schema
                .definition("user")
                .is_some_and(|d| d.relations.is_empty())
        );
    }

    #[test]
    fn comments_are_ignored() {
        let schema = Schema::parse(
            "// definition ghost {}\ndefinition a { // relation x: a\n relation y: a\n}",
        );
        assert!(schema.definition("ghost").is_none());
        let a = schema.definition("a").expect("a");
        assert!(!a.has_relation("x"));
        assert!(a.has_relation("y"));
    }
}
