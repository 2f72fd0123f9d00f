use std::fmt;
use std::str::FromStr;

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

/// A resource type: a SpiceDB definition name, optionally with a prefix
/// (`document`, `tenant1/document`).
///
/// Open, so an application that is not agentex (documents, folders) can use
/// its own types with the SpiceDB target; the agentex host's four are
/// associated constants ([`ResourceType::Agent`], ...) and
/// [`ResourceType::is_agentex`] tells the agentex-auth target which it may
/// send. Parsing checks SpiceDB's definition-name syntax, so a type that
/// parses is one SpiceDB can hold.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct ResourceType(Cow<'static, str>);

/// The agentex host's types, the only ones agentex-auth knows.
const AGENTEX_TYPES: [&str; 4] = ["agent", "task", "api_key", "schedule"];

// Named like the enum variants they replace, so code written against the
// closed enum (`ResourceType::ApiKey`) reads, and compiles, the same.
#[allow(non_upper_case_globals)]
impl ResourceType {
    pub const Agent: ResourceType = ResourceType(Cow::Borrowed("agent"));
    pub const Task: ResourceType = ResourceType(Cow::Borrowed("task"));
    pub const ApiKey: ResourceType = ResourceType(Cow::Borrowed("api_key"));
    pub const Schedule: ResourceType = ResourceType(Cow::Borrowed("schedule"));

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// One of the agentex host's four types (what agentex-auth accepts).
    pub fn is_agentex(&self) -> bool {
        AGENTEX_TYPES.contains(&self.as_str())
    }

    /// Rejects a type agentex-auth does not know, naming the four it does.
    pub fn require_agentex(&self) -> Result<(), ResourceRefError> {
        if self.is_agentex() {
            Ok(())
        } else {
            Err(ResourceRefError::UnknownType(self.to_string()))
        }
    }
}

/// SpiceDB's definition-name syntax: `([a-z][a-z0-9_]{1,61}[a-z0-9]/)?[a-z][a-z0-9_]{1,62}[a-z0-9]`.
fn is_definition_name(s: &str) -> bool {
    fn part(p: &str, max_middle: usize) -> bool {
        let b = p.as_bytes();
        b.len() >= 3
            && b.len() <= max_middle + 2
            && b[0].is_ascii_lowercase()
            && b[1..b.len() - 1]
                .iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_')
            && (b[b.len() - 1].is_ascii_lowercase() || b[b.len() - 1].is_ascii_digit())
    }
    match s.split_once('/') {
        Some((prefix, name)) => part(prefix, 61) && part(name, 62),
        None => part(s, 62),
    }
}

impl fmt::Display for ResourceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ResourceType {
    type Err = ResourceRefError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(known) = AGENTEX_TYPES.iter().find(|t| **t == s) {
            return Ok(ResourceType(Cow::Borrowed(known)));
        }
        if is_definition_name(s) {
            Ok(ResourceType(Cow::Owned(s.to_string())))
        } else {
            Err(ResourceRefError::BadType(s.to_string()))
        }
    }
}

impl<'de> Deserialize<'de> for ResourceType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A resource as agentex-auth addresses it: `{"type": TYPE, "selector": ID}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct ResourceRef {
    #[serde(rename = "type")]
    pub kind: ResourceType,
    pub selector: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResourceRefError {
    #[error(
        "unknown resource type {0:?} (agentex-auth knows agent, task, api_key and schedule; other types need the SpiceDB target)"
    )]
    UnknownType(String),
    #[error(
        "invalid resource type {0:?}: a SpiceDB definition name is [a-z][a-z0-9_]{{1,62}}[a-z0-9], optionally with a prefix/"
    )]
    BadType(String),
    #[error("resource id must not be empty")]
    EmptyId,
    #[error("resource must look like TYPE:ID, got {0:?}")]
    Malformed(String),
}

impl ResourceRef {
    pub fn new(kind: &str, selector: &str) -> Result<Self, ResourceRefError> {
        if selector.is_empty() {
            return Err(ResourceRefError::EmptyId);
        }
        Ok(ResourceRef {
            kind: kind.parse()?,
            selector: selector.to_string(),
        })
    }
}

impl fmt::Display for ResourceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.selector)
    }
}

impl FromStr for ResourceRef {
    type Err = ResourceRefError;

    /// Parses the `TYPE:ID` form used on the command line and in reports.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, id) = s
            .split_once(':')
            .ok_or_else(|| ResourceRefError::Malformed(s.to_string()))?;
        ResourceRef::new(kind, id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_type_colon_id() {
        let r: ResourceRef = "api_key:k1".parse().expect("valid");
        assert_eq!(r.kind, ResourceType::ApiKey);
        assert_eq!(r.to_string(), "api_key:k1");
        assert!("No pe:k1".parse::<ResourceRef>().is_err());
        assert!("api_key".parse::<ResourceRef>().is_err());
        assert_eq!(
            "agent:".parse::<ResourceRef>(),
            Err(ResourceRefError::EmptyId)
        );
    }

    #[test]
    fn serializes_as_the_wire_format() {
        let r = ResourceRef::new("agent", "a1").expect("valid");
        assert_eq!(
            serde_json::to_value(&r).expect("serializes"),
            serde_json::json!({"type": "agent", "selector": "a1"})
        );
    }

    #[test]
    fn types_are_open_but_follow_spicedb_syntax() {
        let doc: ResourceType = "document".parse().expect("valid");
        assert!(!doc.is_agentex());
        assert!(doc.require_agentex().is_err());
        assert!(ResourceType::ApiKey.is_agentex());
        assert_eq!("api_key".parse::<ResourceType>(), Ok(ResourceType::ApiKey));
        assert!("tenant1/document".parse::<ResourceType>().is_ok());
        for bad in [
            "",
            "ab",
            "Document",
            "doc-ument",
            "1doc",
            "doc_",
            "a/document",
            "x/y/zzz",
        ] {
            assert!(
                matches!(
                    bad.parse::<ResourceType>(),
                    Err(ResourceRefError::BadType(_))
                ),
                "{bad}"
            );
        }
        assert_eq!(
            serde_json::to_value(&doc).expect("serializes"),
            serde_json::json!("document")
        );
        let back: ResourceType =
            serde_json::from_value(serde_json::json!("folder")).expect("parses");
        assert_eq!(back.as_str(), "folder");
    }
}
