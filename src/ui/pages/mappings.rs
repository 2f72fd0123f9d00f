//! `/ui/mappings`: the resource mappings `migrate` installed, their tables
//! and the objects generated for them.

use axum::extract::State;
use axum::http::HeaderMap;
use maud::{Markup, html};

use super::super::layout::{self, Section, text};
use super::super::{UiError, UiState, auth, queries};

/// The generated objects a mapping's DDL creates, named from its
/// `CREATE ...` statements (functions, triggers, views).
fn generated_objects(ddl: &str) -> Vec<String> {
    let mut out: Vec<String> = ddl
        .lines()
        .filter_map(|line| {
            let line = line.trim_start();
            let rest = line
                .strip_prefix("CREATE OR REPLACE ")
                .or_else(|| line.strip_prefix("CREATE "))?;
            let mut words = rest.split_whitespace();
            let kind = words.next()?;
            let kind = if kind == "CONSTRAINT" {
                words.next()?
            } else {
                kind
            };
            let name = words.next()?;
            let name = name.split('(').next().unwrap_or(name);
            Some(format!("{} {}", kind.to_lowercase(), name))
        })
        .collect();
    out.dedup();
    out
}

pub async fn page(State(state): State<UiState>, headers: HeaderMap) -> Result<Markup, UiError> {
    let access = auth::access(&state, &headers);
    let mappings = queries::mappings(&state.pool).await?;
    let body = html! {
        @if mappings.is_empty() { p.muted { "No mappings installed: run authz-outbox migrate." } }
        table #mappings {
            thead { tr { th { "Mapping" } th { "Type" } th { "Table" } th { "Join table" } th { "Generated objects" } th { "Installed" } } }
            tbody { @for m in &mappings {
                tr {
                    td { code { (text(&m.name)) } }
                    td { code { (text(&m.resource_type)) } }
                    td { code { (text(&m.table_name)) } }
                    td { @if let Some(j) = &m.join_table { code { (text(j)) } } }
                    td { @for o in generated_objects(&m.ddl) { code { (text(&o)) } br; } }
                    td { (m.installed_at.format("%Y-%m-%d %H:%M")) }
                }
            } }
        }
        @for m in &mappings {
            details {
                summary { "Definition and DDL of " code { (text(&m.name)) } }
                pre { (text(&serde_json::to_string_pretty(&m.definition).unwrap_or_default())) }
                pre { (m.ddl.chars().take(20_000).collect::<String>()) }
            }
        }
    };
    Ok(layout::page("Mappings", Section::Mappings, &access, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_created_objects() {
        let ddl = "CREATE OR REPLACE FUNCTION public.authz_outbox_capture_x() RETURNS trigger\n\
                   DROP TRIGGER IF EXISTS t ON x;\n  CREATE TRIGGER authz_outbox_t AFTER INSERT ON x\n\
                   CREATE CONSTRAINT TRIGGER c AFTER";
        assert_eq!(
            generated_objects(ddl),
            [
                "function public.authz_outbox_capture_x",
                "trigger authz_outbox_t",
                "trigger c"
            ]
        );
    }
}
