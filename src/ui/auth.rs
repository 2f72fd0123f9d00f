//! Who may act on the page: the UI token, sessions, and CSRF.
//!
//! An operator signs in once with `AUTHZ_OUTBOX_UI_TOKEN` (a form; the
//! token is compared in constant time, never stored in a cookie, never
//! logged). Signing in creates a session held in this process's memory: a
//! random id in an `HttpOnly`, `SameSite=Strict` cookie, and a random CSRF
//! token that every action form carries in a hidden field and that must
//! match the session's (the synchronizer-token pattern). A restart signs
//! everyone out, which is what a restart of the only holder of the state
//! should do.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use subtle::ConstantTimeEq;

use super::{UiError, UiState};

/// The cookie holding the session id.
pub const SESSION_COOKIE: &str = "authz_outbox_ui";

/// The form field carrying the CSRF token.
pub const CSRF_FIELD: &str = "csrf";

/// How long a session lasts after sign-in.
const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);

/// Sessions held at once; the oldest goes when a new one would pass it, so
/// repeated sign-ins cannot grow memory.
const MAX_SESSIONS: usize = 256;

/// The longest token accepted from a form (a longer one cannot match).
const MAX_TOKEN_LEN: usize = 4096;

/// The token actions need. Its `Debug` never shows it.
#[derive(Clone)]
pub struct UiToken(String);

impl std::fmt::Debug for UiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UiToken(<redacted>)")
    }
}

impl UiToken {
    /// `None` for an empty or blank value: an empty token must never open
    /// the actions.
    pub fn new(value: impl Into<String>) -> Option<Self> {
        let value = value.into().trim().to_string();
        (!value.is_empty()).then_some(UiToken(value))
    }

    /// Constant time in the bytes compared (a different length answers at
    /// once, which reveals the length only).
    pub fn matches(&self, given: &str) -> bool {
        given.len() <= MAX_TOKEN_LEN && bool::from(self.0.as_bytes().ct_eq(given.trim().as_bytes()))
    }
}

struct Session {
    csrf: String,
    expires: Instant,
}

/// Signed-in sessions of this process.
#[derive(Default)]
pub struct Sessions {
    inner: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new session: its id (for the cookie).
    pub fn create(&self) -> String {
        let id = random_hex();
        let now = Instant::now();
        let mut sessions = self.lock();
        sessions.retain(|_, s| s.expires > now);
        if sessions.len() >= MAX_SESSIONS
            && let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| k.clone())
        {
            sessions.remove(&oldest);
        }
        sessions.insert(
            id.clone(),
            Session {
                csrf: random_hex(),
                expires: now + SESSION_TTL,
            },
        );
        id
    }

    /// The CSRF token of a live session.
    fn csrf(&self, id: &str) -> Option<String> {
        let sessions = self.lock();
        sessions
            .get(id)
            .filter(|s| s.expires > Instant::now())
            .map(|s| s.csrf.clone())
    }

    pub fn remove(&self, id: &str) {
        self.lock().remove(id);
    }
}

fn random_hex() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What the visitor of a page may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// No token is configured: no action exists.
    ReadOnly,
    /// Actions exist; sign in first.
    SignedOut,
    /// Signed in: forms carry this CSRF token.
    SignedIn { session: String, csrf: String },
}

impl Access {
    pub fn csrf(&self) -> Option<&str> {
        match self {
            Access::SignedIn { csrf, .. } => Some(csrf),
            _ => None,
        }
    }
}

/// The session id from the request's cookies.
pub fn session_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value.to_string())
        .filter(|v| v.len() == 64)
}

pub fn access(state: &UiState, headers: &HeaderMap) -> Access {
    if !state.actions_enabled() {
        return Access::ReadOnly;
    }
    match session_id(headers).and_then(|id| state.sessions.csrf(&id).map(|csrf| (id, csrf))) {
        Some((session, csrf)) => Access::SignedIn { session, csrf },
        None => Access::SignedOut,
    }
}

/// Lets an action through only with actions enabled, a live session and
/// the session's CSRF token in the form.
pub fn authorize(
    state: &UiState,
    headers: &HeaderMap,
    form: &super::form::Fields,
) -> Result<(), UiError> {
    match access(state, headers) {
        Access::ReadOnly => Err(UiError::Forbidden(
            "this page is read-only: actions need AUTHZ_OUTBOX_UI_TOKEN on the worker",
        )),
        Access::SignedOut => Err(UiError::Forbidden(
            "sign in with the UI token first (/ui/login)",
        )),
        Access::SignedIn { csrf, .. } => {
            let given = form.one(CSRF_FIELD).unwrap_or("");
            if bool::from(csrf.as_bytes().ct_eq(given.as_bytes())) {
                Ok(())
            } else {
                Err(UiError::Forbidden(
                    "missing or stale form token (CSRF); reload the page and try again",
                ))
            }
        }
    }
}

/// The `Set-Cookie` value that starts a session.
pub fn session_cookie(id: &str) -> String {
    format!(
        "{SESSION_COOKIE}={id}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={}",
        SESSION_TTL.as_secs()
    )
}

/// The `Set-Cookie` value that ends one.
pub fn cleared_cookie() -> String {
    format!("{SESSION_COOKIE}=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_exactly_and_never_show() {
        let token = UiToken::new("s3cret-token").expect("token");
        assert!(token.matches("s3cret-token"));
        assert!(!token.matches("s3cret-tokeN"));
        assert!(!token.matches("s3cret"));
        assert!(!token.matches(""));
        assert!(UiToken::new("  ").is_none());
        assert!(!format!("{token:?}").contains("s3cret"));
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let id = "a".repeat(64);
        let mut headers = HeaderMap::new();
        headers.insert(
            axum::http::header::COOKIE,
            format!("x=1; {SESSION_COOKIE}={id}; y=2")
                .parse()
                .expect("header"),
        );
        assert_eq!(session_id(&headers), Some(id));
        headers.insert(
            axum::http::header::COOKIE,
            format!("{SESSION_COOKIE}=short").parse().expect("header"),
        );
        assert_eq!(session_id(&headers), None);
    }
}
