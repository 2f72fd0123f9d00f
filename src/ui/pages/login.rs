//! Signing in with the UI token, and out.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{Markup, html};

use super::super::form::Fields;
use super::super::layout::{self, Section};
use super::super::{UiError, UiState, auth};

/// How long a refused sign-in waits before it answers.
const WRONG_TOKEN_DELAY: std::time::Duration = std::time::Duration::from_millis(500);

pub async fn page(State(state): State<UiState>, headers: HeaderMap) -> Markup {
    let access = auth::access(&state, &headers);
    layout::page("Sign in", Section::Login, &access, form(&access, false))
}

fn form(access: &auth::Access, refused: bool) -> Markup {
    html! {
        @match access {
            auth::Access::ReadOnly => p { "This page is read-only: there is nothing to sign in to." },
            auth::Access::SignedIn { .. } => p { "Signed in. " a href="/ui/" { "Overview" } },
            auth::Access::SignedOut => {
                @if refused { p.note.bad #refused { "That is not the UI token." } }
                form method="post" action="/ui/login" {
                    label { "UI token (AUTHZ_OUTBOX_UI_TOKEN) "
                        input type="password" name="token" autocomplete="current-password" required; }
                    " " button type="submit" { "Sign in" }
                }
            }
        }
    }
}

pub async fn login(
    State(state): State<UiState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, UiError> {
    let Some(token) = &state.config.token else {
        return Err(UiError::Forbidden("this page is read-only"));
    };
    let fields = Fields::parse(&body);
    if !token.matches(fields.one("token").unwrap_or("")) {
        tracing::warn!(
            action = "sign-in",
            "operator page: sign-in refused (wrong token)"
        );
        // A wrong guess costs the guesser time: guessing a token one
        // request at a time stays slow.
        tokio::time::sleep(WRONG_TOKEN_DELAY).await;
        let access = auth::access(&state, &headers);
        let page = layout::page("Sign in", Section::Login, &access, form(&access, true));
        return Ok((StatusCode::FORBIDDEN, page).into_response());
    }
    let session = state.sessions.create();
    tracing::info!(action = "sign-in", "operator page: signed in");
    Ok((
        [(header::SET_COOKIE, auth::session_cookie(&session))],
        Redirect::to("/ui/"),
    )
        .into_response())
}

pub async fn logout(
    State(state): State<UiState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, UiError> {
    let fields = Fields::parse(&body);
    auth::authorize(&state, &headers, &fields)?;
    if let Some(id) = auth::session_id(&headers) {
        state.sessions.remove(&id);
    }
    tracing::info!(action = "sign-out", "operator page: signed out");
    Ok((
        [(header::SET_COOKIE, auth::cleared_cookie())],
        Redirect::to("/ui/"),
    )
        .into_response())
}
