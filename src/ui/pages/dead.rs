//! `/ui/dead`: dead rows, filtered and paged; replay of the ticked rows or
//! of a whole filter, with `replay`'s own rules, after a confirmation.
//!
//! The confirmation is a page, not only a script's dialog: the first POST
//! is a dry run of [`replay`] that shows what would happen to each row;
//! only its "Replay" button (the same fields plus `confirmed=yes`) changes
//! anything.

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use chrono::Utc;
use maud::{Markup, html};

use super::super::form::Fields;
use super::super::layout::{self, Section, csrf_field, short, text};
use super::super::queries::{self, DeadCursor, DeadFilter};
use super::super::{UiError, UiState, auth};
use super::overview::url_part;
use crate::domain::Principal;
use crate::outbox::replay::{
    ReplayAction, ReplayOptions, ReplayReport, Selector, replay as run_replay,
};

/// Rows one replay may touch; a larger filter must be narrowed first.
pub const MAX_REPLAY: usize = 10_000;

/// The filter as the form and links carry it.
#[derive(Debug, Clone, Default)]
struct Filter {
    resource_type: Option<String>,
    error: Option<String>,
    /// Dead for at least this long (`2h`).
    older_than: Option<String>,
    /// Dead for at most this long (`30m`).
    newer_than: Option<String>,
}

impl Filter {
    fn from(fields: &Fields) -> Self {
        let get = |name| fields.one(name).map(str::to_string);
        Filter {
            resource_type: get("type"),
            error: get("error"),
            older_than: get("older_than"),
            newer_than: get("newer_than"),
        }
    }

    fn resolve(&self) -> Result<DeadFilter, UiError> {
        let ago = |value: &Option<String>, what: &str| -> Result<_, UiError> {
            let Some(value) = value else { return Ok(None) };
            let d = humantime::parse_duration(value).map_err(|_| {
                UiError::BadRequest(format!("{what}: expected a duration like 30m or 2h"))
            })?;
            if d > crate::config::limits::LOOKBACK {
                return Err(UiError::BadRequest(format!("{what}: too far back")));
            }
            let d = chrono::Duration::from_std(d)
                .map_err(|_| UiError::BadRequest(format!("{what}: too far back")))?;
            Ok(Some(Utc::now() - d))
        };
        Ok(DeadFilter {
            resource_type: self.resource_type.clone(),
            error: self.error.clone(),
            since: ago(&self.newer_than, "newer than")?,
            until: ago(&self.older_than, "older than")?,
        })
    }

    fn query(&self) -> String {
        let mut parts = Vec::new();
        for (name, value) in self.pairs() {
            parts.push(format!("{name}={}", url_part(value)));
        }
        parts.join("&")
    }

    fn pairs(&self) -> Vec<(&'static str, &str)> {
        [
            ("type", &self.resource_type),
            ("error", &self.error),
            ("older_than", &self.older_than),
            ("newer_than", &self.newer_than),
        ]
        .into_iter()
        .filter_map(|(n, v)| v.as_deref().map(|v| (n, v)))
        .collect()
    }

    fn hidden(&self) -> Markup {
        html! {
            @for (name, value) in self.pairs() {
                input type="hidden" name=(name) value=(value);
            }
        }
    }
}

pub async fn page(
    State(state): State<UiState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Markup, UiError> {
    let access = auth::access(&state, &headers);
    let fields = Fields::from_query(query.as_deref());
    let filter = Filter::from(&fields);
    let resolved = filter.resolve()?;
    let after = fields.one("after").and_then(DeadCursor::parse);
    let (rows, types) = tokio::try_join!(
        queries::dead(&state.pool, &resolved, after),
        crate::outbox::stats::installed_types(&state.pool),
    )?;
    let next = (rows.len() as i64 == queries::DEAD_PAGE)
        .then(|| rows.last().and_then(DeadCursor::of))
        .flatten();
    let can_act = access.csrf().is_some();
    let table = html! {
    table #dead {
        thead { tr {
            @if can_act { th { input type="checkbox" data-select-all hidden aria-label="select all"; } }
            th { "Row" } th { "Resource" } th { "Op" } th.num { "Attempts" }
            th { "Last error" } th { "Principal" } th { "Came from" } th { "Dead since" }
        } }
        tbody {
            @for r in &rows {
                tr {
                    @if can_act { td { input type="checkbox" name="id" value=(r.id) aria-label={ "select row " (r.id) }; } }
                    td.num { (r.id) }
                    td {
                        a href=(layout::resource_href(&r.resource_type, &r.resource_id)) {
                            code { (text(&r.resource_type)) ":" (text(&r.resource_id)) }
                        }
                        @if let (Some(pt), Some(pid)) = (&r.parent_type, &r.parent_id) {
                            br; span.muted { "parent " code { (text(pt)) ":" (text(pid)) } }
                        }
                    }
                    td { (text(&r.operation)) }
                    td.num { (r.attempts) }
                    td {
                        @if let Some(status) = r.last_status { span.muted { "HTTP/gRPC " (status) " " } }
                        (short(r.last_error.as_deref().unwrap_or(""), 400))
                    }
                    td { code { (principal(r.principal.as_ref())) } }
                    td {
                        (text(&r.origin))
                        @if let Some(source) = &r.principal_source { br; span.muted { "principal: " (text(source)) } }
                    }
                    td { (r.finished_at.map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string()).unwrap_or_default()) }
                }
            }
            @if rows.is_empty() {
                tr { td colspan="9" .muted { "No dead rows match." } }
            }
        }
    }
    };
    let body = html! {
        form.filters method="get" action="/ui/dead" {
            label { "Type"
                select name="type" {
                    option value="" { "any" }
                    @for t in &types {
                        option value=(t) selected[filter.resource_type.as_deref() == Some(t.as_str())] { (text(t)) }
                    }
                }
            }
            label { "Error contains" input type="text" name="error" value=[filter.error.as_deref()] maxlength="200"; }
            label { "Dead for at least" input type="text" name="older_than" placeholder="e.g. 1h" value=[filter.older_than.as_deref()] size="8"; }
            label { "Dead for at most" input type="text" name="newer_than" placeholder="e.g. 2d" value=[filter.newer_than.as_deref()] size="8"; }
            button type="submit" { "Filter" }
            a href="/ui/dead" { "clear" }
        }
        (layout::no_actions(&access))
        @if can_act {
            form #replay method="post" action="/ui/dead/replay" {
                (csrf_field(&access))
                (filter.hidden())
                p {
                    button type="submit" name="scope" value="selected" { "Replay selected…" }
                    " "
                    button type="submit" name="scope" value="filter" { "Replay every row of this filter…" }
                    span.muted { " Each asks for confirmation and shows what replay will do first." }
                }
                (table)
            }
        } @else {
            (table)
        }
        div.pager {
            @if after.is_some() { a href={ "/ui/dead?" (filter.query()) } { "« newest" } }
            @if let Some(next) = next {
                a href={ "/ui/dead?" (filter.query()) "&after=" (next.encode()) } { "older »" }
            }
        }
    };
    Ok(layout::page("Dead rows", Section::Dead, &access, body))
}

/// A principal as compact JSON, control characters escaped. Principals are
/// identities (the allowlist drops anything credential-like).
pub fn principal(p: Option<&serde_json::Value>) -> String {
    p.map(|p| text(&p.to_string()))
        .unwrap_or_else(|| "—".into())
}

pub async fn replay(
    State(state): State<UiState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Markup, UiError> {
    let fields = Fields::parse(&body);
    auth::authorize(&state, &headers, &fields)?;
    let access = auth::access(&state, &headers);
    let filter = Filter::from(&fields);
    let whole_filter = fields.one("scope") == Some("filter");
    let ids: Vec<i64> = if whole_filter {
        let ids = queries::dead_ids(&state.pool, &filter.resolve()?, MAX_REPLAY as i64 + 1).await?;
        if ids.len() > MAX_REPLAY {
            return Err(UiError::BadRequest(format!(
                "more than {MAX_REPLAY} dead rows match: narrow the filter, or use the replay command"
            )));
        }
        ids
    } else {
        let ids: Result<Vec<i64>, _> = fields.all("id").map(str::parse).collect();
        ids.map_err(|_| UiError::BadRequest("a row id is not a number".into()))?
    };
    if ids.is_empty() {
        return Err(UiError::BadRequest(
            "no rows selected: tick rows, or replay the filter".into(),
        ));
    }
    if ids.len() > MAX_REPLAY {
        return Err(UiError::BadRequest(format!(
            "at most {MAX_REPLAY} rows at once"
        )));
    }
    let principal = match fields.one("principal") {
        None => None,
        Some(p) => {
            Some(Principal::parse(p).map_err(|e| UiError::BadRequest(format!("principal: {e}")))?)
        }
    };
    let confirmed = fields.one("confirmed") == Some("yes");
    let options = ReplayOptions {
        selector: Selector {
            ids: ids.clone(),
            ..Selector::default()
        },
        principal: principal.clone(),
        dry_run: !confirmed,
    };
    let report = run_replay(&state.pool, &options)
        .await
        .map_err(|e| match e {
            crate::outbox::replay::ReplayError::Database(e) => UiError::Database(e),
            other => UiError::BadRequest(other.to_string()),
        })?;
    if confirmed {
        tracing::info!(
            action = "replay",
            rows = ids.len(),
            replayed = report.count(ReplayAction::Replayed),
            superseded = report.count(ReplayAction::Superseded),
            skipped = report.count(ReplayAction::Skipped),
            with_principal = principal.is_some(),
            ids = ?&ids[..ids.len().min(50)],
            "operator page: replay"
        );
    }
    let body = html! {
        @if confirmed {
            p.note {
                "Replayed " (report.count(ReplayAction::Replayed)) ", superseded "
                (report.count(ReplayAction::Superseded)) ", skipped "
                (report.count(ReplayAction::Skipped)) ". The worker delivers replayed rows."
            }
        } @else {
            p.note {
                "Nothing has changed yet. Replay would act as follows (the same rules as "
                code { "authz-outbox replay" } ": the resource is re-checked, and a register of a resource "
                "that is no longer live, or one overtaken by a later change, is closed as superseded)."
            }
            form method="post" action="/ui/dead/replay"
                data-confirm={ "Replay " (ids.len()) " row(s)?" } {
                (csrf_field(&access))
                input type="hidden" name="confirmed" value="yes";
                @for id in &ids { input type="hidden" name="id" value=(id); }
                label { "Principal for rows without a creator (optional JSON, e.g. {\"user_id\":\"u1\"}) "
                    input type="text" name="principal" size="40" value=[fields.one("principal")]; }
                " "
                button.danger type="submit" { "Replay " (ids.len()) " row(s)" }
                " " a href={ "/ui/dead?" (filter.query()) } { "cancel" }
            }
        }
        (report_table(&report))
        p { a href={ "/ui/dead?" (filter.query()) } { "Back to the dead rows" } }
    };
    let title = if confirmed {
        "Replay done"
    } else {
        "Confirm replay"
    };
    Ok(layout::page(title, Section::Dead, &access, body))
}

fn report_table(report: &ReplayReport) -> Markup {
    html! {
        table #replay-report {
            thead { tr { th { "Row" } th { "Resource" } th { "Op" } th { "Action" } th { "Reason" } } }
            tbody {
                @for r in &report.rows {
                    tr {
                        td.num { (r.id) }
                        td { code { (text(&r.resource)) } }
                        td { (text(&r.operation)) }
                        td class=(match r.action { ReplayAction::Replayed => "good", ReplayAction::Superseded => "warn", ReplayAction::Skipped => "muted" }) {
                            (r.action.as_str())
                        }
                        td { (short(&r.reason, 300)) }
                    }
                }
            }
        }
    }
}
