//! `/ui/resource/{type}/{selector}`: one resource's outbox history, and what
//! SpiceDB holds for it now, with drift called out.
//!
//! The drift shown here is a quick look at one resource: the live row the
//! mappings see (`authz_outbox_desired`) against SpiceDB's relationships.
//! Reconcile remains the authority (it also judges owners and grace).

use std::time::Duration;

use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Redirect, Response};
use maud::{Markup, html};

use super::super::form::Fields;
use super::super::layout::{self, Section, short, text};
use super::super::queries::Desired;
use super::super::{UiError, UiState, auth, queries};
use super::dead::principal;
use crate::reconcile::SelectorEncoding;
use crate::spicedb_client::{SpiceDbClient, SpiceDbToken};

/// The longest SpiceDB read of one resource the page waits for.
const SPICEDB_TIMEOUT: Duration = Duration::from_secs(3);

/// The search box: `?type=T&selector=S`, or `?q=T:S`.
pub async fn search(
    State(state): State<UiState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, UiError> {
    let fields = Fields::from_query(query.as_deref());
    let pair = match (fields.one("type"), fields.one("selector"), fields.one("q")) {
        (Some(t), Some(s), _) => Some((t.to_string(), s.to_string())),
        (_, _, Some(q)) => q
            .split_once(':')
            .map(|(t, s)| (t.trim().to_string(), s.trim().to_string())),
        _ => None,
    };
    if let Some((t, s)) = pair.filter(|(t, s)| !t.is_empty() && !s.is_empty()) {
        return Ok(Redirect::to(&layout::resource_href(&t, &s)).into_response());
    }
    let access = auth::access(&state, &headers);
    let types = crate::outbox::stats::installed_types(&state.pool).await?;
    let body = html! {
        @if fields.one("q").is_some() {
            p.note.bad { "Write the resource as TYPE:SELECTOR, e.g. api_key:k1." }
        }
        (search_form(&types, None, None))
    };
    Ok(layout::page("Look up a resource", Section::Resource, &access, body).into_response())
}

fn search_form(types: &[String], current_type: Option<&str>, selector: Option<&str>) -> Markup {
    html! {
        form.filters method="get" action="/ui/resource" {
            label { "Type"
                select name="type" {
                    @for t in types {
                        option value=(t) selected[current_type == Some(t.as_str())] { (text(t)) }
                    }
                }
            }
            label { "Selector" input type="text" name="selector" value=[selector] size="40" required; }
            button type="submit" { "Look up" }
        }
    }
}

/// What SpiceDB holds for the resource, or why it is not shown.
enum Held {
    NotConfigured,
    Failed(String),
    Relationships(Vec<(String, String, String)>),
}

pub async fn page(
    State(state): State<UiState>,
    headers: HeaderMap,
    Path((resource_type, selector)): Path<(String, String)>,
) -> Result<Markup, UiError> {
    let access = auth::access(&state, &headers);
    if resource_type.len() > 200 || selector.len() > super::super::form::MAX_VALUE {
        return Err(UiError::BadRequest(
            "resource type or selector too long".into(),
        ));
    }
    let (history, desired, types) = tokio::try_join!(
        queries::history(&state.pool, &resource_type, &selector),
        queries::desired(&state.pool, &resource_type, &selector),
        crate::outbox::stats::installed_types(&state.pool),
    )?;
    let held = spicedb_holds(&state, &resource_type, &selector).await;
    let pending = history.iter().any(|r| r.state == "pending");
    let drift = drift(&desired, &held, &resource_type);
    let title = format!("{}:{}", text(&resource_type), text(&selector));
    let body = html! {
        (search_form(&types, Some(&resource_type), Some(&selector)))
        h2 { "In PostgreSQL" }
        @match &desired {
            Desired::Live(Some((pt, pid))) => p { "Live, parent " code { (text(pt)) ":" (text(pid)) } "." },
            Desired::Live(None) => p { "Live (no parent)." },
            Desired::Gone => p { "No live row maps to this resource (deleted, soft-deleted, or never created)." },
            Desired::Unreadable => p.muted {
                "This page's database role cannot read authz_outbox_desired (GRANT SELECT on it \
                 to compare the live row with SpiceDB)."
            },
        }
        h2 { "In SpiceDB now" }
        @match &held {
            Held::NotConfigured => p.muted { "No SpiceDB endpoint is configured for this page (SPICEDB_ENDPOINT)." },
            Held::Failed(e) => p.note.bad { "Could not read SpiceDB: " (short(e, 300)) },
            Held::Relationships(rels) if rels.is_empty() => p { "No relationships." },
            Held::Relationships(rels) => table #held {
                thead { tr { th { "Relation" } th { "Subject" } } }
                tbody { @for (relation, st, sid) in rels {
                    tr { td { code { (text(relation)) } } td { code { (text(st)) ":" (text(sid)) } } }
                } }
            },
        }
        @if let Some(drift) = &drift {
            div.drift #drift {
                strong { "Drift: " } (drift)
                @if pending { " A pending outbox row may settle it." }
                " Reconcile confirms and heals it."
            }
        }
        h2 { "Outbox history" }
        table #history {
            thead { tr {
                th { "Row" } th { "Op" } th { "State" } th.num { "Attempts" } th { "Parent" }
                th { "Principal" } th { "Origin" } th { "Last error" } th { "Created" } th { "Finished" }
            } }
            tbody {
                @for r in &history {
                    tr {
                        td.num { (r.id) }
                        td { (text(&r.operation)) }
                        td class=[state_class(&r.state)] {
                            (text(&r.state))
                            @if let Some(w) = &r.locked_by { br; span.muted { "leased by " (text(w)) } }
                        }
                        td.num { (r.attempts) }
                        td { @if let (Some(pt), Some(pid)) = (&r.parent_type, &r.parent_id) { code { (text(pt)) ":" (text(pid)) } } }
                        td { code { (principal(r.principal.as_ref())) } }
                        td { (text(&r.origin)) }
                        td {
                            @if let Some(status) = r.last_status { span.muted { (status) " " } }
                            (short(r.last_error.as_deref().unwrap_or(""), 400))
                        }
                        td { (r.created_at.format("%Y-%m-%d %H:%M:%S")) }
                        td { (r.finished_at.map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string()).unwrap_or_default()) }
                    }
                }
                @if history.is_empty() {
                    tr { td colspan="10" .muted { "No outbox rows for this resource." } }
                }
            }
        }
        @if history.len() as i64 == queries::HISTORY_LIMIT {
            p.muted { "Showing the newest " (queries::HISTORY_LIMIT) " rows." }
        }
    };
    Ok(layout::page(&title, Section::Resource, &access, body))
}

fn state_class(state: &str) -> Option<&'static str> {
    match state {
        "dead" => Some("bad"),
        "pending" => Some("warn"),
        "delivered" => Some("good"),
        _ => None,
    }
}

/// Reads the resource's relationships, fully consistent, within
/// [`SPICEDB_TIMEOUT`]; subjects decoded as reconcile decodes them.
async fn spicedb_holds(state: &UiState, resource_type: &str, selector: &str) -> Held {
    let Some(config) = &state.config.spicedb else {
        return Held::NotConfigured;
    };
    let encoding = state.config.selector_encoding;
    let object_id = match encoding {
        SelectorEncoding::Verbatim => selector.to_string(),
        SelectorEncoding::AuthzOutbox => match authz_object_id::encode(selector) {
            Ok(id) => id,
            Err(e) => return Held::Failed(format!("the selector cannot be an object id: {e}")),
        },
    };
    let token = config.token.clone().and_then(SpiceDbToken::new);
    let client = match SpiceDbClient::with_ca(
        &config.endpoint,
        token,
        SPICEDB_TIMEOUT,
        config.ca_pem.as_deref(),
    ) {
        Ok(c) => c,
        Err(e) => return Held::Failed(e.to_string()),
    };
    match client.read_resource(resource_type, &object_id).await {
        Err(e) => Held::Failed(e.to_string()),
        Ok(rels) => Held::Relationships(
            rels.into_iter()
                .take(500)
                .map(|r| {
                    let subject = r.subject.and_then(|s| s.object).unwrap_or_default();
                    let id = encoding
                        .decode(&subject.object_id)
                        .ok()
                        .flatten()
                        .unwrap_or(subject.object_id);
                    (r.relation, subject.object_type, id)
                })
                .collect(),
        ),
    }
}

/// What differs between the live row and SpiceDB, in one sentence.
fn drift(desired: &Desired, held: &Held, resource_type: &str) -> Option<String> {
    let Held::Relationships(rels) = held else {
        return None;
    };
    match desired {
        Desired::Unreadable => None,
        Desired::Gone if !rels.is_empty() => Some(format!(
            "SpiceDB holds {} relationship(s) of a resource that is not live (an orphan: \
             someone may keep access).",
            rels.len()
        )),
        Desired::Gone => None,
        Desired::Live(_) if rels.is_empty() => Some(
            "the resource is live but SpiceDB holds nothing for it (missing: access fails \
             closed)."
                .into(),
        ),
        Desired::Live(Some((pt, pid))) => {
            let parents: Vec<&(String, String, String)> =
                rels.iter().filter(|(_, st, _)| st == pt).collect();
            let has = parents.iter().any(|(_, _, sid)| sid == pid);
            (!has).then(|| {
                let shown: Vec<String> = parents
                    .iter()
                    .map(|(_, st, sid)| format!("{}:{}", text(st), text(sid)))
                    .collect();
                format!(
                    "the row's parent is {}:{}, SpiceDB's {} parent edge(s): {} (parent mismatch).",
                    text(pt),
                    text(pid),
                    text(resource_type),
                    if shown.is_empty() {
                        "none".into()
                    } else {
                        shown.join(", ")
                    }
                )
            })
        }
        Desired::Live(None) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(r: &str, t: &str, id: &str) -> (String, String, String) {
        (r.into(), t.into(), id.into())
    }

    #[test]
    fn drift_is_orphan_missing_or_parent() {
        let none = Held::Relationships(vec![]);
        let some = Held::Relationships(vec![
            rel("owner", "user", "u1"),
            rel("parent_agent", "agent", "a1"),
        ]);
        let live = Desired::Live(Some(("agent".to_string(), "a1".to_string())));
        assert!(drift(&Desired::Gone, &none, "api_key").is_none());
        let orphan = drift(&Desired::Gone, &some, "api_key").expect("orphan");
        assert!(orphan.contains("orphan"), "{orphan}");
        let missing = drift(&live, &none, "api_key").expect("missing");
        assert!(missing.contains("missing"), "{missing}");
        assert!(drift(&live, &some, "api_key").is_none());
        let moved = Desired::Live(Some(("agent".to_string(), "a2".to_string())));
        let parent = drift(&moved, &some, "api_key").expect("parent");
        assert!(parent.contains("parent mismatch"), "{parent}");
        assert!(drift(&live, &Held::NotConfigured, "api_key").is_none());
        assert!(drift(&Desired::Unreadable, &some, "api_key").is_none());
    }
}
