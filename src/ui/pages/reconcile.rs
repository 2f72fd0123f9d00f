//! `/ui/reconcile`: past runs with their findings; start a dry run; apply.
//!
//! A run started here is [`crate::reconcile::reconcile`] itself, run in the
//! background (one at a time) with the CLI's defaults: a five-minute grace,
//! at most 1,000 deregisters per type, never more than half of what SpiceDB
//! holds of a type, and no `--force` (a refused apply is shown with the
//! CLI's reason, and the CLI is the place to force). "Apply" runs reconcile
//! again with `apply`: findings are recomputed at that moment, so nothing
//! stale from an earlier dry run is ever enqueued. The first
//! [`queries::FINDINGS_KEPT`] findings of each run are kept for this page.

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Redirect, Response};
use maud::{Markup, html};
use serde_json::Value;

use super::super::form::Fields;
use super::super::layout::{self, Section, csrf_field, short, text};
use super::super::{UiError, UiState, auth, queries};
use crate::reconcile::{ReconcileOptions, reconcile};

/// The counts of a run's summary shown per type.
const KINDS: [&str; 6] = [
    "orphan",
    "missing",
    "parent_mismatch",
    "subject_mismatch",
    "owner_mismatch",
    "needs_owner",
];

const UNREADABLE_FINDINGS: &str = "This page's database role cannot read \
     authz_outbox_reconcile_findings (GRANT SELECT on it to see kept findings).";

/// A run summary's counts per type, as a table.
pub fn per_type(summary: &Value) -> Markup {
    let by_type = summary.get("by_type").and_then(Value::as_object);
    let n = |t: &Value, k: &str| t.get(k).and_then(Value::as_u64).unwrap_or(0);
    html! {
        @if let Some(by_type) = by_type {
            table.per-type {
                thead { tr {
                    th { "Type" } th.num { "Drift" }
                    @for k in KINDS { th.num { (k.replace('_', " ")) } }
                    th.num { "Consistent" } th.num { "In flight" } th.num { "Young" }
                } }
                tbody { @for (t, counts) in by_type {
                    tr {
                        td { code { (text(t)) } }
                        td.num class=[(n(counts, "drift") > 0).then_some("bad")] { (n(counts, "drift")) }
                        @for k in KINDS { td.num { (n(counts, k)) } }
                        td.num { (n(counts, "consistent")) }
                        td.num { (n(counts, "in_flight")) }
                        td.num { (n(counts, "young")) }
                    }
                } }
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
    let before = fields.one("before").and_then(|s| s.parse::<i64>().ok());
    let runs = queries::runs(&state.pool, before).await?;
    let ids: Vec<i64> = runs.iter().map(|r| r.id).collect();
    let kept = queries::findings_kept(&state.pool, &ids).await?;
    let running = state.reconcile_running.try_lock().is_err();
    let last = state.last_reconcile_message();
    let body = html! {
        @if running { p.note data-refresh="3" { "A run started here is in progress; reload to see it." } }
        @if let Some(message) = &last { p.note #last-outcome { (text(message)) } }
        @if state.config.spicedb.is_none() {
            p.muted { "No SpiceDB endpoint is configured for this page (SPICEDB_ENDPOINT): runs cannot start here." }
        } @else if access.csrf().is_some() {
            div {
                form.inline method="post" action="/ui/reconcile/dry-run" {
                    (csrf_field(&access))
                    button type="submit" disabled[running] { "Start a dry run" }
                }
                " "
                form.inline method="post" action="/ui/reconcile/apply" {
                    (csrf_field(&access))
                    button.danger type="submit" disabled[running] { "Apply (enqueue fixes)…" }
                }
            }
        } @else {
            (layout::no_actions(&access))
        }
        table #runs {
            thead { tr {
                th { "Run" } th { "Started" } th { "Finished" } th { "Mode" } th.num { "Drift" } th.num { "Findings kept" }
            } }
            tbody {
                @for r in &runs {
                    tr {
                        td { a href={ "/ui/reconcile/run/" (r.id) } { "#" (r.id) } }
                        td { (r.started_at.format("%Y-%m-%d %H:%M:%S")) }
                        td { (r.finished_at.format("%Y-%m-%d %H:%M:%S")) }
                        td { @if r.applied { "applied" } @else { "dry run" } }
                        td.num class=[(r.drift > 0).then_some("bad")] { (r.drift) }
                        td.num {
                            @match &kept {
                                Some(kept) => (kept.get(&r.id).copied().unwrap_or(0)),
                                None => span.muted { "?" },
                            }
                        }
                    }
                }
                @if runs.is_empty() { tr { td colspan="6" .muted { "No runs recorded." } } }
            }
        }
        @if runs.len() as i64 == queries::RUNS_PAGE {
            @if let Some(last) = runs.last() {
                div.pager { a href={ "/ui/reconcile?before=" (last.id) } { "older »" } }
            }
        }
        p.muted { "Runs of the reconcile command show their counts; the findings of runs started here are kept too." }
        @if kept.is_none() { p.muted #no-findings-grant { (UNREADABLE_FINDINGS) } }
    };
    Ok(layout::page("Reconcile", Section::Reconcile, &access, body))
}

pub async fn run(
    State(state): State<UiState>,
    headers: HeaderMap,
    Path(id): Path<i64>,
) -> Result<Markup, UiError> {
    let access = auth::access(&state, &headers);
    let (run, findings) = tokio::try_join!(
        queries::run(&state.pool, id),
        queries::findings(&state.pool, id)
    )?;
    let run = run.ok_or(UiError::NotFound)?;
    let body = html! {
        p {
            @if run.applied { "Applied" } @else { "Dry run" }
            ", started " (run.started_at.format("%Y-%m-%d %H:%M:%S UTC"))
            ", finished " (run.finished_at.format("%Y-%m-%d %H:%M:%S UTC"))
            ". Drift: " span class=(if run.drift > 0 { "bad" } else { "good" }) { (run.drift) }
        }
        (per_type(&run.summary))
        h2 { "Findings" }
        @if let Some(findings) = &findings {
        @if findings.is_empty() {
            p.muted {
                @if run.drift > 0 { "This run's findings were not kept (a run of the reconcile command)." }
                @else { "No drift." }
            }
        } @else {
            table #findings {
                thead { tr { th { "Kind" } th { "Resource" } th { "Reason" } th { "Fix" } th { "Enqueued" } } }
                tbody { @for f in findings.iter() {
                    tr {
                        td.bad { (text(&f.kind)) }
                        td {
                            @if let Some((t, s)) = f.resource.split_once(':') {
                                a href=(layout::resource_href(t, s)) { code { (text(&f.resource)) } }
                            } @else { code { (text(&f.resource)) } }
                        }
                        td { (short(&f.reason, 400)) }
                        td { (text(&f.fix)) }
                        td { @if f.enqueued { "yes" } @else { "no" } }
                    }
                } }
            }
            @if (findings.len() as i64) < run.drift {
                p.muted { "Showing the first " (findings.len()) " of " (run.drift) " findings." }
            }
        }
        } @else {
            p.muted { (UNREADABLE_FINDINGS) }
        }
        p { a href="/ui/reconcile" { "All runs" } }
    };
    Ok(layout::page(
        &format!("Reconcile run #{id}"),
        Section::Reconcile,
        &access,
        body,
    ))
}

pub async fn dry_run(
    State(state): State<UiState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, UiError> {
    let fields = Fields::parse(&body);
    auth::authorize(&state, &headers, &fields)?;
    start(&state, false)?;
    Ok(Redirect::to("/ui/reconcile").into_response())
}

pub async fn apply(
    State(state): State<UiState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, UiError> {
    let fields = Fields::parse(&body);
    auth::authorize(&state, &headers, &fields)?;
    if fields.one("confirmed") != Some("yes") {
        let access = auth::access(&state, &headers);
        let body = html! {
            p.note {
                "Apply runs reconcile again and enqueues a fix for every drift it finds now, as "
                code { "authz-outbox reconcile --apply" } " does: it refuses, for any type, more than "
                "1,000 deregisters or more than half of what SpiceDB holds of that type "
                "(the CLI's --force is not offered here). The worker delivers the fixes."
            }
            form method="post" action="/ui/reconcile/apply" data-confirm="Enqueue reconcile's fixes?" {
                (csrf_field(&access))
                input type="hidden" name="confirmed" value="yes";
                button.danger type="submit" { "Apply" }
                " " a href="/ui/reconcile" { "cancel" }
            }
        };
        return Ok(
            layout::page("Confirm apply", Section::Reconcile, &access, body).into_response(),
        );
    }
    start(&state, true)?;
    Ok(Redirect::to("/ui/reconcile").into_response())
}

/// Starts one run in the background; refuses while one is in progress.
fn start(state: &UiState, apply: bool) -> Result<(), UiError> {
    let Some(spicedb) = state.config.spicedb.clone() else {
        return Err(UiError::BadRequest(
            "no SpiceDB endpoint is configured for this page (SPICEDB_ENDPOINT)".into(),
        ));
    };
    let guard = state
        .reconcile_running
        .clone()
        .try_lock_owned()
        .map_err(|_| UiError::BadRequest("a reconcile run is already in progress".into()))?;
    let options = ReconcileOptions {
        apply,
        selector_encoding: state.config.selector_encoding,
        writer: state.config.writer,
        ..ReconcileOptions::default()
    };
    let state = state.clone();
    tracing::info!(
        action = "reconcile",
        apply,
        "operator page: reconcile started"
    );
    // reconcile's finding callback is not Send, so the run drives its own
    // future on a blocking thread of this runtime.
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let _running = guard;
        handle.block_on(async move {
            let mut findings = Vec::new();
            let result = reconcile(&state.pool, &spicedb, &options, &mut |f| {
                if findings.len() < queries::FINDINGS_KEPT {
                    findings.push(f.clone());
                }
            })
            .await;
            let message = match result {
                Ok(report) => {
                    let stored = queries::store_findings(&state.pool, report.run_id, &findings).await;
                    if let Err(e) = stored {
                        tracing::warn!(error = %e, "operator page: keeping the run's findings failed");
                    }
                    tracing::info!(
                        action = "reconcile",
                        run_id = report.run_id,
                        apply,
                        applied = report.applied,
                        enqueued = report.enqueued,
                        drift = report.summary.drift,
                        refused = report.refused.as_ref().map(|r| r.to_string()),
                        "operator page: reconcile finished"
                    );
                    match &report.refused {
                        Some(refused) => format!("Run #{}: {refused}", report.run_id),
                        None if report.applied => format!(
                            "Run #{} applied: drift {}, {} outbox rows enqueued.",
                            report.run_id, report.summary.drift, report.enqueued
                        ),
                        None => format!(
                            "Run #{} (dry run): drift {}.",
                            report.run_id, report.summary.drift
                        ),
                    }
                }
                Err(e) => {
                    tracing::warn!(action = "reconcile", error = %e, "operator page: reconcile failed");
                    format!("The run failed: {}", crate::display::error_line(&e.to_string()))
                }
            };
            state.set_last_reconcile_message(message);
        });
    });
    Ok(())
}
