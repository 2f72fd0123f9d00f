use std::fmt;
use std::str::FromStr;

use serde::Serialize;

/// The resource types agentex-auth knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ResourceType {
    Agent,
    Task,
    ApiKey,
    Schedule,
}

impl ResourceType {
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceType::Agent => "agent",
            ResourceType::Task => "task",
            ResourceType::ApiKey => "api_key",
            ResourceType::Schedule => "schedule",
        }
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
        match s {
            "agent" => Ok(ResourceType::Agent),
            "task" => Ok(ResourceType::Task),
            "api_key" => Ok(ResourceType::ApiKey),
            "schedule" => Ok(ResourceType::Schedule),
            other => Err(ResourceRefError::UnknownType(other.to_string())),
        }
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
    #[error("unknown resource type {0:?} (expected agent, task, api_key or schedule)")]
    UnknownType(String),
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
        assert!("nope:k1".parse::<ResourceRef>().is_err());
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
}
