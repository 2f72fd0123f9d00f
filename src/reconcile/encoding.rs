//! How object ids read back from SpiceDB become selectors again.
//!
//! agentex-auth stores a resource under an object id derived from its
//! selector. Plain ids (UUIDs) are object ids as they are; a selector such
//! as `run-schedule::a1::s1` is not (SpiceDB allows only
//! `[a-zA-Z0-9/_|\-=+]`), so whatever writes it must encode it, and
//! reconcile must decode it the same way, or every such resource looks
//! orphaned (its object id matches no selector) and missing (its selector
//! matches no object id) at once.
//!
//! The encoding is a reconcile setting because the real agentex-auth may
//! encode differently from agentex-auth-dev, which uses the project's own
//! ([`crate::domain::object_id`]). docs/operations.md says what to check
//! before pointing reconcile at a real agentex-auth.

use crate::domain::object_id::{self, ObjectIdError};

/// The selector encoding of object ids (`--selector-encoding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SelectorEncoding {
    /// The project's reversible encoding (`crate::domain::object_id`):
    /// every byte outside `[a-zA-Z0-9/_|-+]` as `=XX`; plain ids unchanged.
    /// What agentex-auth-dev stores.
    #[default]
    AuthzOutbox,
    /// Object ids are selectors as they are (a service that only accepts
    /// selectors SpiceDB can hold verbatim).
    Verbatim,
}

impl SelectorEncoding {
    pub fn as_str(self) -> &'static str {
        match self {
            SelectorEncoding::AuthzOutbox => "authz-outbox",
            SelectorEncoding::Verbatim => "verbatim",
        }
    }

    /// The selector `object_id` was encoded from: `Ok(None)` when it is the
    /// object id itself (the common case, no allocation), an error when the
    /// object id is not in this encoding.
    pub fn decode(self, object_id: &str) -> Result<Option<String>, ObjectIdError> {
        match self {
            SelectorEncoding::Verbatim => Ok(None),
            // Only `=` starts an escape; an id without one decodes to itself
            // (every other character SpiceDB allows is kept verbatim).
            SelectorEncoding::AuthzOutbox if !object_id.contains('=') => Ok(None),
            SelectorEncoding::AuthzOutbox => object_id::decode(object_id).map(Some),
        }
    }
}

impl std::fmt::Display for SelectorEncoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_projects_encoding_and_leaves_plain_ids() {
        let e = SelectorEncoding::AuthzOutbox;
        assert_eq!(
            e.decode("run-schedule=3A=3Aa1=3A=3As1"),
            Ok(Some("run-schedule::a1::s1".into()))
        );
        assert_eq!(e.decode("3f2b8c1e-9a4d-4e8f"), Ok(None));
        assert!(e.decode("a=3a").is_err());
        assert_eq!(SelectorEncoding::Verbatim.decode("a=3A"), Ok(None));
    }
}
