//! Turning a claimed row into a request, or settling it without one.

use serde_json::Value;

use crate::auth_client::AuthRequest;
use crate::domain::{Operation, ResourceRef, ResourceType};
use crate::outbox::ClaimedRow;

/// A claimed row checked and ready to send.
#[derive(Debug, Clone)]
pub struct Deliverable {
    pub row: ClaimedRow,
    pub operation: Operation,
    pub resource: ResourceRef,
    pub parent: Option<ResourceRef>,
    pub principal: Value,
}

impl Deliverable {
    pub fn request(&self) -> AuthRequest<'_> {
        match self.operation {
            Operation::Register => AuthRequest::Register {
                principal: &self.principal,
                resource: &self.resource,
                parent: self.parent.as_ref(),
            },
            Operation::Deregister => AuthRequest::Deregister {
                principal: &self.principal,
                resource: &self.resource,
            },
        }
    }

    /// The key agentex-auth may use to recognise a retry of this row.
    pub fn idempotency_key(&self) -> String {
        format!("authz-outbox-{}", self.row.id)
    }
}

/// Checks a row written by any writer (the triggers, reconcile, another
/// language's code, a hand-written INSERT). Returns the reason it can never
/// be delivered, which sends it dead without stopping the worker.
/// `open_types`: the target accepts any SpiceDB definition name (the
/// SpiceDB target), not only agentex-auth's four types.
pub fn check(row: ClaimedRow, open_types: bool) -> Result<Deliverable, (Box<ClaimedRow>, String)> {
    match parse(&row, open_types) {
        Ok((operation, resource, parent, principal)) => Ok(Deliverable {
            row,
            operation,
            resource,
            parent,
            principal,
        }),
        Err(reason) => Err((Box::new(row), reason)),
    }
}

type Parsed = (Operation, ResourceRef, Option<ResourceRef>, Value);

fn parse(row: &ClaimedRow, open_types: bool) -> Result<Parsed, String> {
    let operation: Operation = row.operation.parse()?;
    let resource = ResourceRef::new(&row.resource_type, &row.resource_id)
        .map_err(|e| format!("bad resource: {e}"))?;
    if !open_types {
        resource
            .kind
            .require_agentex()
            .map_err(|e| format!("bad resource: {e}"))?;
    }
    let parent = match (&row.parent_type, &row.parent_id) {
        (Some(kind), Some(id)) => {
            Some(ResourceRef::new(kind, id).map_err(|e| format!("bad parent: {e}"))?)
        }
        (None, None) => None,
        _ => {
            return Err(
                "bad parent: parent_type and parent_id must both be set or both null".into(),
            );
        }
    };
    if operation == Operation::Register && resource.kind == ResourceType::ApiKey {
        match &parent {
            Some(p) if p.kind == ResourceType::Agent => {}
            Some(p) => {
                return Err(format!(
                    "an api_key's parent must be an agent, not {}",
                    p.kind
                ));
            }
            // Without the parent edge the key fails closed on every read.
            None => return Err("an api_key register needs a parent agent".into()),
        }
    }
    let principal = match (&row.principal, operation) {
        (Some(Value::Object(p)), _) => Value::Object(p.clone()),
        // A deregister removes everything of the resource, whoever asks.
        (None | Some(Value::Null), Operation::Deregister) => Value::Object(Default::default()),
        // SpiceDB: the mapping's relationships decide whether anyone must
        // be named (a `creator = []` mapping's subjects are all columns);
        // one that reads the principal fails the row there.
        (None | Some(Value::Null), Operation::Register) if open_types => {
            Value::Object(Default::default())
        }
        (None | Some(Value::Null), Operation::Register) => {
            return Err("no creator resolvable: the row has no principal".into());
        }
        (Some(_), _) => return Err("principal must be a JSON object".into()),
    };
    if operation == Operation::Register && !open_types {
        let has_creator = ["user_id", "service_account_id"].iter().any(|f| {
            principal
                .get(*f)
                .and_then(Value::as_str)
                .is_some_and(|s| !s.is_empty())
        });
        if !has_creator {
            return Err(
                "no creator resolvable: principal has no user_id or service_account_id".into(),
            );
        }
    }
    Ok((operation, resource, parent, principal))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(
        operation: &str,
        rtype: &str,
        parent: Option<&str>,
        principal: Option<Value>,
    ) -> ClaimedRow {
        ClaimedRow {
            id: 1,
            resource_type: rtype.into(),
            resource_id: "r1".into(),
            parent_type: parent.map(|_| "agent".into()),
            parent_id: parent.map(Into::into),
            operation: operation.into(),
            principal,
            attempts: 1,
            created_at: chrono::Utc::now(),
            lease_token: uuid::Uuid::new_v4(),
            guarded: false,
            origin: "capture".into(),
            last_error: None,
            attributes: None,
        }
    }

    fn reason(r: ClaimedRow) -> String {
        match check(r, false) {
            Ok(_) => panic!("expected a bad row"),
            Err((_, reason)) => reason,
        }
    }

    #[test]
    fn accepts_a_well_formed_key_register() {
        let ok = check(
            row(
                "register",
                "api_key",
                Some("a1"),
                Some(json!({"user_id": "u"})),
            ),
            false,
        );
        assert!(ok.is_ok());
    }

    #[test]
    fn bad_rows_get_a_clear_reason() {
        let p = Some(json!({"user_id": "u"}));
        assert!(
            reason(row("register", "widget", None, p.clone())).contains("unknown resource type")
        );
        assert!(
            reason(row("register", "api_key", None, p.clone())).contains("needs a parent agent")
        );
        assert!(reason(row("register", "agent", None, Some(json!("u")))).contains("JSON object"));
        assert!(reason(row("register", "agent", None, None)).contains("no creator resolvable"));
        assert!(
            reason(row(
                "register",
                "agent",
                None,
                Some(json!({"account_id": "x"}))
            ))
            .contains("no creator")
        );
        assert!(reason(row("upsert", "agent", None, p.clone())).contains("unknown operation"));
        // The SpiceDB target takes any definition name, still not a bad one.
        assert!(check(row("register", "widget", None, p.clone()), true).is_ok());
        assert!(check(row("register", "Widget", None, p), true).is_err());
    }

    #[test]
    fn a_deregister_needs_no_creator() {
        let d = check(row("deregister", "api_key", None, None), false).expect("deliverable");
        assert_eq!(d.principal, json!({}));
    }
}
