use serde::Serialize;
use serde_json::{Map, Value};

/// The fields of a principal that identify a creator and may be stored.
///
/// The capture trigger applies the same list (`authz_outbox_current_principal`
/// in the migrations), so whatever path a principal takes into the outbox,
/// nothing outside this list — an api key, a bearer token — is ever stored.
pub const IDENTITY_FIELDS: &[&str] = &[
    "user_id",
    "service_account_id",
    "account_id",
    "principal_type",
];

/// Whether a principal field name looks like a credential. Such a field is
/// dropped from every principal, whatever a mapping's `principal_fields`
/// list says (the capture's SQL applies the same rule:
/// `authz_outbox_is_credential_field`).
pub fn is_credential_field(field: &str) -> bool {
    const EXACT: &[&str] = &[
        "api_key",
        "apikey",
        "token",
        "secret",
        "password",
        "passwd",
        "authorization",
        "cookie",
        "credential",
        "credentials",
        "private_key",
        "client_secret",
        "bearer",
        "session",
        "jwt",
    ];
    let f = field.to_ascii_lowercase();
    EXACT.contains(&f.as_str())
        || f.ends_with("_token")
        || f.contains("secret")
        || f.contains("password")
        || f.contains("api_key")
}

/// The identity of whoever created (or deletes) a resource, as agentex-auth
/// expects it in the `principal` field: a JSON object naming a user or a
/// service account.
///
/// Parsing keeps only [`IDENTITY_FIELDS`], so a `Principal` cannot hold a
/// credential, and requires a creator, so it can always be registered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Principal(Map<String, Value>);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PrincipalError {
    #[error("principal is not valid JSON: {0}")]
    NotJson(String),
    #[error("principal must be a JSON object")]
    NotAnObject,
    #[error("principal field {0:?} must be a string or null")]
    NotAString(String),
    #[error("no creator resolvable: principal needs a non-empty user_id or service_account_id")]
    NoCreator,
}

impl Principal {
    /// Parses a principal from its JSON text (a CLI flag, a config value).
    pub fn parse(json: &str) -> Result<Self, PrincipalError> {
        let value: Value =
            serde_json::from_str(json).map_err(|e| PrincipalError::NotJson(e.to_string()))?;
        Self::from_value(value)
    }

    /// Parses a principal from a JSON value, dropping every field outside
    /// [`IDENTITY_FIELDS`].
    pub fn from_value(value: Value) -> Result<Self, PrincipalError> {
        let Value::Object(object) = value else {
            return Err(PrincipalError::NotAnObject);
        };
        let mut kept = Map::new();
        for (key, value) in object {
            if !IDENTITY_FIELDS.contains(&key.as_str()) {
                continue;
            }
            match value {
                Value::String(_) | Value::Null => {
                    kept.insert(key, value);
                }
                _ => return Err(PrincipalError::NotAString(key)),
            }
        }
        let principal = Principal(kept);
        if principal.creator().is_none() {
            return Err(PrincipalError::NoCreator);
        }
        Ok(principal)
    }

    /// The subject that will own the resource: the user if there is one,
    /// else the service account (the host service's order).
    pub fn creator(&self) -> Option<&str> {
        ["user_id", "service_account_id"].iter().find_map(|field| {
            self.0
                .get(*field)
                .and_then(Value::as_str)
                .filter(|id| !id.is_empty())
        })
    }

    /// The JSON text, as set in `authz_outbox.principal`.
    pub fn to_json(&self) -> String {
        Value::Object(self.0.clone()).to_string()
    }

    pub fn as_value(&self) -> Value {
        Value::Object(self.0.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_identity_fields_and_drops_credentials() {
        let p = Principal::parse(
            r#"{"user_id":"u1","account_id":"a1","api_key":"sk-secret","token":"t","service_account_id":null}"#,
        )
        .expect("valid principal");
        let json = p.to_json();
        assert!(!json.contains("sk-secret"), "{json}");
        assert!(!json.contains("token"), "{json}");
        assert_eq!(p.creator(), Some("u1"));
        assert!(json.contains("account_id"));
    }

    #[test]
    fn service_account_is_a_creator_when_there_is_no_user() {
        let p = Principal::parse(r#"{"user_id":"","service_account_id":"sa"}"#).expect("valid");
        assert_eq!(p.creator(), Some("sa"));
    }

    #[test]
    fn rejects_bad_input_with_a_reason() {
        assert!(matches!(
            Principal::parse("{"),
            Err(PrincipalError::NotJson(_))
        ));
        assert_eq!(Principal::parse("[1]"), Err(PrincipalError::NotAnObject));
        assert_eq!(
            Principal::parse(r#"{"user_id":5}"#),
            Err(PrincipalError::NotAString("user_id".into()))
        );
        assert_eq!(
            Principal::parse(r#"{"account_id":"a"}"#),
            Err(PrincipalError::NoCreator)
        );
    }
}
