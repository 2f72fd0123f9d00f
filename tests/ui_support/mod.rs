//! The operator page served in-process on a free port, and a client that
//! signs in and reads the CSRF token from the page, as a browser would.
#![allow(dead_code)]

use authz_outbox::reconcile::SpiceDbConfig;
use authz_outbox::ui::{UiConfig, UiState, UiToken, router};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub const TOKEN: &str = "ui-test-token-5f1c";

/// A served page; stops when dropped.
pub struct Served {
    pub base: String,
    cancel: CancellationToken,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Actions on (with [`TOKEN`]) and SpiceDB at `spicedb` if given.
pub fn with_token(spicedb: Option<&str>) -> UiConfig {
    let mut config = UiConfig::read_only(spicedb.map(SpiceDbConfig::new));
    config.token = UiToken::new(TOKEN);
    config
}

pub async fn serve(pool: &PgPool, config: UiConfig) -> Served {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("free port");
    let addr = listener.local_addr().expect("address");
    let cancel = CancellationToken::new();
    tokio::spawn(authz_outbox::http::serve(
        listener,
        router(UiState::new(pool.clone(), config)),
        cancel.clone(),
    ));
    Served {
        base: format!("http://{addr}"),
        cancel,
    }
}

/// A client that never follows redirects (a test reads them).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

pub async fn get(base: &str, path: &str, cookie: Option<&str>) -> (u16, String) {
    let mut request = client().get(format!("{base}{path}"));
    if let Some(cookie) = cookie {
        request = request.header("cookie", cookie);
    }
    let response = request.send().await.expect("GET answers");
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

pub async fn post(
    base: &str,
    path: &str,
    cookie: Option<&str>,
    form: &[(&str, &str)],
) -> (u16, String) {
    let body: String = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form)
        .finish();
    let mut request = client()
        .post(format!("{base}{path}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body);
    if let Some(cookie) = cookie {
        request = request.header("cookie", cookie);
    }
    let response = request.send().await.expect("POST answers");
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

/// Signs in with `token`: the session cookie, or `None` when refused.
pub async fn sign_in(base: &str, token: &str) -> Option<String> {
    let body: String = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("token", token)
        .finish();
    let response = client()
        .post(format!("{base}/ui/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .expect("sign-in answers");
    let cookie = response
        .headers()
        .get("set-cookie")?
        .to_str()
        .ok()?
        .split(';')
        .next()?
        .to_string();
    Some(cookie)
}

/// The CSRF token a page's forms carry.
pub fn csrf(html: &str) -> String {
    let at = html
        .find(r#"name="csrf" value=""#)
        .unwrap_or_else(|| panic!("no CSRF field in the page: {html}"));
    let rest = &html[at + r#"name="csrf" value=""#.len()..];
    rest[..rest.find('"').expect("closing quote")].to_string()
}
