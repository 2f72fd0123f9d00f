//! `/ui/`: the outbox at a glance, per resource type.

use axum::extract::State;
use axum::http::HeaderMap;
use maud::{Markup, html};

use super::super::layout::{self, Section, age, text};
use super::super::{UiError, UiState, auth, chart, queries};
use crate::delivery::gate::OpenReason;

pub async fn page(State(state): State<UiState>, headers: HeaderMap) -> Result<Markup, UiError> {
    let access = auth::access(&state, &headers);
    // Counted at most every 10 s whoever asks (`OVERVIEW_FIGURES_FOR`);
    // the reconcile runs are one indexed page, read each time.
    let (figures, runs) =
        tokio::try_join!(state.overview_figures(), queries::runs(&state.pool, None),)?;
    let (live, activity, rates, replicas) = (
        &figures.live,
        &figures.activity,
        &figures.rates,
        &figures.replicas,
    );
    let last_run = runs.first();
    let mut types: Vec<&String> = live.by_type.keys().chain(activity.keys()).collect();
    types.sort();
    types.dedup();
    let body = html! {
        p.muted data-refresh="10" hidden {
            label { input type="checkbox" checked; " refresh every 10 s" }
        }
        table #types {
            thead { tr {
                th { "Type" } th.num { "Pending" } th.num { "In flight" } th.num { "Dead" }
                th.num { "Delivered (1 h)" } th.num { "Oldest pending" }
            } }
            tbody {
                @for t in &types {
                    @let s = live.by_type.get(*t);
                    @let a = activity.get(*t).cloned().unwrap_or_default();
                    @let n = |state: &str| s.and_then(|s| s.counts.get(state)).copied().unwrap_or(0);
                    tr {
                        td { code { (text(t)) } }
                        td.num { (n("pending")) }
                        td.num { (a.in_flight) }
                        td.num class=[(n("dead") > 0).then_some("bad")] {
                            a href={ "/ui/dead?type=" (url_part(t)) } { (n("dead")) }
                        }
                        td.num { (a.delivered_last_hour) }
                        td.num { (age(s.map_or(0.0, |s| s.oldest_pending_age_seconds))) }
                    }
                }
                @if types.is_empty() {
                    tr { td colspan="6" .muted { "No mappings installed and no rows: run authz-outbox migrate." } }
                }
            }
        }
        p.muted { "Counts, replicas and charts as of " (figures.taken_at.format("%H:%M:%S UTC")) " (taken at most every 10 s)." }
        div.charts {
            (chart::bars("Delivered per minute, last hour", &rates.delivered, "rows"))
            (chart::bars("Capture-to-delivered latency (mean per minute)", &rates.latency_ms, "ms"))
        }
        h2 { "Replicas" }
        @if let Some(health) = &state.config.health {
            @let reason = health.gate.open_reason();
            p {
                "This worker: "
                @if health.ready() { span.good { "ready" } } @else { span.bad { "not ready" } }
                " · circuit "
                @match reason {
                    Some(OpenReason::Outage) => span.bad { "open (target failing)" },
                    Some(OpenReason::Credential) => span.bad { "open: credential refused, deliveries paused" },
                    None => span.good { "closed" },
                }
            }
        } @else {
            p.muted { "This page is not served by a worker; replicas are seen through the database only." }
        }
        table #replicas {
            thead { tr { th { "Worker" } th.num { "Leased rows" } th { "State" } } }
            tbody {
                @for r in replicas {
                    tr {
                        td { code { (text(&r.worker_id)) } }
                        td.num { (r.leased) }
                        td {
                            @if let Some(since) = r.asleep_since {
                                "idle since " (since.format("%H:%M:%S UTC"))
                            } @else if r.leased > 0 { "delivering" } @else { "awake" }
                        }
                    }
                }
                @if replicas.is_empty() {
                    tr { td colspan="3" .muted { "No worker holds a lease or waits for work." } }
                }
            }
        }
        p.muted { "A replica's circuit and credential state are known only to itself: open its own /ui/ or /readyz." }
        h2 { "Last reconcile" }
        @match last_run {
            None => p.muted { "No reconcile run recorded." },
            Some(run) => {
                p {
                    a href={ "/ui/reconcile/run/" (run.id) } { "Run #" (run.id) }
                    " finished " (run.finished_at.format("%Y-%m-%d %H:%M:%S UTC"))
                    @if run.applied { " (applied)" } @else { " (dry run)" }
                    " · drift "
                    span class=(if run.drift > 0 { "bad" } else { "good" }) { (run.drift) }
                }
                (super::reconcile::per_type(&run.summary))
            }
        }
    };
    Ok(layout::page("Overview", Section::Overview, &access, body))
}

pub fn url_part(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}
