//! The principal: who created (or deletes) a resource, as agentex-auth gets
//! it, and the policy that decides what of a stored principal is sent.

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
    #[error("principal field {0:?} is longer than {MAX_PRINCIPAL_VALUE_CHARS} characters")]
    TooLong(String),
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
                Value::String(s) if s.chars().count() > MAX_PRINCIPAL_VALUE_CHARS => {
                    return Err(PrincipalError::TooLong(key));
                }
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

/// The longest principal string value sent on (in characters). An
/// identifier is far shorter; a longer value is not an identity but a
/// payload (or a pasted token), and is dropped, not truncated, so an identity
/// is never silently altered into another one.
pub const MAX_PRINCIPAL_VALUE_CHARS: usize = 256;

/// Words that make a key a credential wherever they occur in its name,
/// once the name is folded to lower case and stripped of everything but
/// letters and digits (`clientSecret`, `access-token`, `password_hash`,
/// `X-Api-Key`, `secret_key`...). Never sent, whatever a policy keeps.
pub const CREDENTIAL_WORDS: &[&str] = &[
    "secret",
    "password",
    "passwd",
    "token",
    "credential",
    "apikey",
    "privatekey",
    "authorization",
    "cookie",
    "session",
    "jwt",
    "bearer",
];

/// Folded names that are credentials although they contain no word above.
pub const CREDENTIAL_NAMES: &[&str] = &["pwd"];

/// The longest `authz_outbox.principal` text the relay parses; a longer one
/// names no creator (its row is dead, `replay --principal` re-drives it).
/// The capture's own parse (table mode) has no such bound, but a principal
/// is a few identity fields: 64 KiB is not one a host meant.
pub const MAX_PRINCIPAL_SETTING_BYTES: usize = 64 * 1024;

/// The creator a WAL capture handed on unparsed (the text of the
/// `authz_outbox.principal` setting), reduced as the table-mode capture
/// reduces it (`authz_outbox_principal_from_text`): `None` for blank text,
/// text that is not JSON or not an object; else the object with only the
/// identity fields' scalar values, no credential-named key and no string
/// longer than [`MAX_PRINCIPAL_VALUE_CHARS`].
pub fn principal_from_setting(raw: &str) -> Option<Value> {
    if raw.trim().is_empty() || raw.len() > MAX_PRINCIPAL_SETTING_BYTES {
        return None;
    }
    let parsed: Value = serde_json::from_str(raw).ok()?;
    PrincipalPolicy::default().sanitize(&parsed)
}

/// Whether a principal names a creator: a non-empty `user_id` or
/// `service_account_id` string (the host's rule for a register).
pub fn names_a_creator(principal: &Value) -> bool {
    ["user_id", "service_account_id"].iter().any(|field| {
        principal
            .get(*field)
            .and_then(Value::as_str)
            .is_some_and(|id| !id.is_empty())
    })
}

/// Whether a principal key names a credential: its folded form (lower
/// case, letters and digits only) contains one of [`CREDENTIAL_WORDS`] or is
/// one of [`CREDENTIAL_NAMES`]. The capture trigger applies the same rule in
/// SQL (`authz_outbox_is_credential_field`; a test compares the two).
pub fn is_credential_key(key: &str) -> bool {
    let folded: String = key
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    CREDENTIAL_WORDS.iter().any(|w| folded.contains(w))
        || CREDENTIAL_NAMES.contains(&folded.as_str())
}

/// What of a stored principal may be sent to agentex-auth.
///
/// The worker applies it to every principal right before a request is
/// built, whatever wrote the row (the trigger, reconcile, replay, another
/// language's code, a hand-written INSERT), so a credential that reached the
/// outbox by some other path is still never forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrincipalPolicy {
    /// Fields kept; everything else is dropped.
    pub keep: Vec<String>,
}

impl Default for PrincipalPolicy {
    /// [`IDENTITY_FIELDS`], as the trigger keeps them.
    fn default() -> Self {
        PrincipalPolicy {
            keep: IDENTITY_FIELDS.iter().map(|f| f.to_string()).collect(),
        }
    }
}

impl PrincipalPolicy {
    /// The principal to send: only the kept fields whose values are scalars
    /// (string, number, bool, null; nested objects and arrays are dropped),
    /// never a credential-named key (even when listed in `keep`), and no
    /// string longer than [`MAX_PRINCIPAL_VALUE_CHARS`]. `None` when
    /// `value` is not a JSON object.
    pub fn sanitize(&self, value: &Value) -> Option<Value> {
        let Value::Object(object) = value else {
            return None;
        };
        let kept = object
            .iter()
            .filter(|(key, _)| self.keep.iter().any(|k| k == *key) && !is_credential_key(key))
            .filter(|(_, value)| match value {
                Value::String(s) => s.chars().count() <= MAX_PRINCIPAL_VALUE_CHARS,
                Value::Number(_) | Value::Bool(_) | Value::Null => true,
                Value::Array(_) | Value::Object(_) => false,
            })
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        Some(Value::Object(kept))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_setting_text_is_reduced_as_the_capture_reduces_it() {
        assert_eq!(
            principal_from_setting(r#"{"user_id":"u-1","principal_type":"user"}"#),
            Some(json!({"user_id": "u-1", "principal_type": "user"}))
        );
        assert_eq!(
            principal_from_setting(
                r#"{"user_id":"u-1","api_key":"sk-live-1","account_id":7,"nested":{"a":1}}"#
            ),
            Some(json!({"user_id": "u-1", "account_id": 7}))
        );
        let long = "x".repeat(MAX_PRINCIPAL_VALUE_CHARS + 1);
        assert_eq!(
            principal_from_setting(&format!(r#"{{"user_id":"{long}","account_id":"a"}}"#)),
            Some(json!({"account_id": "a"}))
        );
        for blank_or_bad in ["", "  ", "not json", "[1]", "\"u-1\"", "null"] {
            assert_eq!(
                principal_from_setting(blank_or_bad),
                None,
                "{blank_or_bad:?}"
            );
        }
        let huge = format!(
            r#"{{"user_id":"u-1","pad":"{}"}}"#,
            "p".repeat(MAX_PRINCIPAL_SETTING_BYTES)
        );
        assert_eq!(principal_from_setting(&huge), None);
    }

    #[test]
    fn the_policy_keeps_identity_scalars_only() {
        let policy = PrincipalPolicy::default();
        let sent = policy
            .sanitize(&json!({
                "user_id": "u",
                "account_id": 7,
                "principal_type": null,
                "service_account_id": true,
                "api_key": "sk-live-1",
                "nested": {"token": "t-1"},
                "extra": "x"
            }))
            .expect("an object");
        assert_eq!(
            sent,
            json!({"user_id": "u", "account_id": 7, "principal_type": null, "service_account_id": true})
        );
        let nested = policy
            .sanitize(&json!({"user_id": {"token": "t"}, "account_id": ["a"]}))
            .expect("an object");
        assert_eq!(nested, json!({}));
        assert_eq!(policy.sanitize(&json!("u")), None);
        assert_eq!(policy.sanitize(&json!(null)), None);
    }

    #[test]
    fn credentials_are_dropped_even_when_listed() {
        let policy = PrincipalPolicy {
            keep: [
                "user_id",
                "API_KEY",
                "Token",
                "github_token",
                "session",
                "cookie",
            ]
            .map(String::from)
            .to_vec(),
        };
        let sent = policy
            .sanitize(&json!({
                "user_id": "u", "API_KEY": "k", "Token": "t", "github_token": "g",
                "session": "s", "cookie": "c"
            }))
            .expect("an object");
        assert_eq!(sent, json!({"user_id": "u"}));
    }

    #[test]
    fn the_credential_rule() {
        for key in [
            "api_key",
            "APIKEY",
            "token",
            "Access_Token",
            "x_refresh_token",
            "secret",
            "client_secret",
            "password",
            "passwd",
            "Authorization",
            "cookie",
            "credential",
            "credentials",
            "private_key",
            "bearer",
            "session",
            "db_password",
            "jwt",
            // Any case or separator style, the word anywhere in the name.
            "clientSecret",
            "accessToken",
            "password_hash",
            "authToken",
            "secret_key",
            "X-Api-Key",
            "tokenizer",
        ] {
            assert!(is_credential_key(key), "{key}");
        }
        for key in [
            "user_id",
            "service_account_id",
            "account_id",
            "principal_type",
            "email",
        ] {
            assert!(!is_credential_key(key), "{key}");
        }
    }

    #[test]
    fn over_long_values_are_dropped_not_truncated() {
        let policy = PrincipalPolicy::default();
        let at_cap = "u".repeat(MAX_PRINCIPAL_VALUE_CHARS);
        let over = "é".repeat(MAX_PRINCIPAL_VALUE_CHARS + 1);
        let sent = policy
            .sanitize(&json!({"user_id": at_cap, "account_id": over}))
            .expect("an object");
        assert_eq!(sent, json!({"user_id": at_cap}));
    }

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
        let long = format!(
            r#"{{"user_id":"{}"}}"#,
            "u".repeat(MAX_PRINCIPAL_VALUE_CHARS + 1)
        );
        assert_eq!(
            Principal::parse(&long),
            Err(PrincipalError::TooLong("user_id".into()))
        );
    }
}
