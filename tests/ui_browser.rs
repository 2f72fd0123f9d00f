//! The operator page driven in a real headless browser (Chromium through
//! chromedriver, both from Debian's packages) against a real PostgreSQL and
//! agentex-auth-dev: load the overview, filter dead rows, replay one and see
//! it delivered, look a resource up, start a dry-run reconcile and read its
//! findings, be refused without the token and in read-only mode, and see a
//! hostile id rendered as text. Each page's screenshot is saved under
//! `target/tmp/ui-screenshots/` (docs/ui/ holds copies for the README).
//!
//! Needs `chromedriver` (and `chromium`): `apt-get install -y chromium
//! chromium-driver`, which scripts/test.sh runs when they are missing. A
//! missing driver fails the test; it never skips.

mod common;
mod ui_support;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use authz_outbox::ui::UiConfig;
use common::scripted_auth::{Answer, ScriptedAuth};
use common::{agent, dev_server, key, plant_register, row, run_once};
use fantoccini::{Client, ClientBuilder, Locator};
use sqlx::PgPool;
use ui_support::{TOKEN, serve, with_token};

const HOSTILE: &str = "<script>alert(1)</script>";

/// chromedriver on a free port, stopped when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn find_program(name: &str, fallback: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .chain([PathBuf::from(fallback)])
        .find(|p| p.is_file())
}

async fn start_driver() -> Driver {
    let Some(chromedriver) = find_program("chromedriver", "/usr/bin/chromedriver") else {
        panic!(
            "chromedriver not found: install Chromium and its driver with \
             `apt-get install -y chromium chromium-driver` (scripts/test.sh does it)"
        );
    };
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let child = Command::new(&chromedriver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", chromedriver.display()));
    let driver = Driver {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    for _ in 0..100 {
        if reqwest::get(format!("{}/status", driver.url)).await.is_ok() {
            return driver;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("chromedriver did not answer on port {port}");
}

async fn browser(driver: &Driver) -> Client {
    let chromium = find_program("chromium", "/usr/bin/chromium")
        .expect("chromium not found: `apt-get install -y chromium chromium-driver`");
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1360,900"],
        }),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector)
        .capabilities(capabilities)
        .connect(&driver.url)
        .await
        .unwrap_or_else(|e| panic!("a Chromium session: {e}"))
}

fn screenshots() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots");
    std::fs::create_dir_all(&dir).expect("screenshot directory");
    dir
}

async fn screenshot(client: &Client, name: &str) {
    let png = client.screenshot().await.expect("screenshot");
    std::fs::write(screenshots().join(format!("{name}.png")), png).expect("screenshot saved");
}

/// The text of the first `css` element, waiting up to 5 s for a page that
/// is still loading (a form's redirect).
async fn text_of(client: &Client, css: &str) -> String {
    for _ in 0..50 {
        if let Ok(element) = client.find(Locator::Css(css)).await
            && let Ok(text) = element.text().await
        {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    match client.find(Locator::Css(css)).await {
        Ok(element) => element.text().await.expect("text"),
        Err(e) => {
            let url = client.current_url().await.map(|u| u.to_string());
            let page = client.source().await.unwrap_or_default();
            panic!("{css} not found on {url:?}: {e}\n{page}")
        }
    }
}

/// Waits until the browser shows `path`.
/// The page now shown, to tell with [`until_replaced`] when the next one
/// has arrived.
async fn this_page(client: &Client) -> fantoccini::elements::Element {
    client
        .find(Locator::Css("html"))
        .await
        .expect("the page's root")
}

/// Waits until `page` has been replaced by the answer to a form sent from
/// it. A click that sends a form does not always wait for the answer, and
/// a page opened before the answer arrives cancels the request (the
/// browser drops it: the server never acts).
async fn until_replaced(page: &fantoccini::elements::Element, what: &str) {
    for _ in 0..100 {
        if page.tag_name().await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: the answer's page never came");
}

async fn wait_for_path(client: &Client, path: &str) {
    for _ in 0..50 {
        if client.current_url().await.is_ok_and(|u| u.path() == path) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "the browser never reached {path}: {:?}",
        client.current_url().await
    );
}

async fn sign_in(client: &Client, base: &str, token: &str) {
    client
        .goto(&format!("{base}/ui/login"))
        .await
        .expect("login page");
    let form = client
        .form(Locator::Css("form[action='/ui/login']"))
        .await
        .expect("form");
    client
        .find(Locator::Css("input[name=token]"))
        .await
        .expect("token field")
        .send_keys(token)
        .await
        .expect("token typed");
    form.submit().await.expect("sent");
    // Submitting does not wait for the answer: a page opened before it
    // arrives cancels it, cookie and all. It has arrived once the page
    // offers to sign out, or says the token was refused.
    client
        .wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css("form[action='/ui/logout'], #refused"))
        .await
        .expect("the sign-in answered");
}

#[sqlx::test(migrations = false)]
async fn an_operator_works_through_the_page_in_a_browser(pool: PgPool) {
    let pool = common::host_db(pool).await;
    // An agent and a key whose registers died from a 403.
    let refusing = ScriptedAuth::always(Answer::status(403)).await;
    agent(&pool, "a1").await;
    let k = key(&pool, "a1", "ci").await;
    let report = run_once(&pool, &refusing.url(), common::config("w")).await;
    assert_eq!(report.dead, 2, "{report:?}");
    let agent_row: i64 = sqlx::query_scalar(
        "SELECT id FROM authz_outbox WHERE resource_type = 'agent' AND state = 'dead'",
    )
    .fetch_one(&pool)
    .await
    .expect("the agent's dead row");
    // A hostile id, dead too.
    sqlx::query(
        "INSERT INTO authz_outbox (resource_type, resource_id, operation, state, finished_at, \
         last_error) VALUES ('task', $1, 'register', 'dead', now(), 'planted \u{1b}[2J')",
    )
    .bind(HOSTILE)
    .execute(&pool)
    .await
    .expect("hostile row");
    let dev = dev_server().await;
    // An orphan for reconcile to find.
    plant_register(&dev.base_url(), "u9", "api_key", "ghost", None).await;
    let served = serve(&pool, with_token(Some(&dev.grpc_endpoint()))).await;
    let read_only = serve(&pool, UiConfig::read_only(None)).await;
    let base = served.base.as_str();

    let driver = start_driver().await;
    let client = browser(&driver).await;

    // The overview.
    client.goto(&format!("{base}/ui/")).await.expect("overview");
    let types = text_of(&client, "#types").await;
    assert!(
        types.contains("api_key") && types.contains("agent"),
        "{types}"
    );
    screenshot(&client, "overview").await;

    // Signed out, and with a wrong token: no action.
    client
        .goto(&format!("{base}/ui/dead"))
        .await
        .expect("dead rows");
    assert!(
        client.find(Locator::Css("form#replay")).await.is_err(),
        "signed out: no replay form"
    );
    sign_in(&client, base, "not-the-token").await;
    assert!(
        text_of(&client, "#refused")
            .await
            .contains("not the UI token")
    );
    // Read-only: no form, nothing to sign in to.
    client
        .goto(&format!("{}/ui/dead", read_only.base))
        .await
        .expect("read-only page");
    assert!(client.find(Locator::Css("form#replay")).await.is_err());
    assert!(
        client.find(Locator::Css("header .muted")).await.is_ok(),
        "marked read-only"
    );
    client
        .goto(&format!("{}/ui/login", read_only.base))
        .await
        .expect("read-only login");
    assert!(
        client
            .find(Locator::Css("form[action='/ui/login']"))
            .await
            .is_err(),
        "read-only: nothing to sign in to"
    );

    // Sign in; filter the dead rows by type and error text.
    sign_in(&client, base, TOKEN).await;
    client
        .goto(&format!("{base}/ui/dead"))
        .await
        .expect("dead rows");
    let filters = client
        .form(Locator::Css("form.filters"))
        .await
        .expect("filters");
    client
        .find(Locator::Css("select[name=type]"))
        .await
        .expect("type select")
        .select_by_value("agent")
        .await
        .expect("type chosen");
    filters
        .set_by_name("error", "403")
        .await
        .expect("error typed");
    filters.submit().await.expect("filtered");
    for _ in 0..50 {
        if client
            .current_url()
            .await
            .is_ok_and(|u| u.query().is_some_and(|q| q.contains("error=403")))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let listed = text_of(&client, "#dead tbody").await;
    assert!(listed.contains("agent:a1"), "{listed}");
    assert!(!listed.contains(&k.id), "the key is filtered out: {listed}");
    assert!(
        !listed.contains("<script>"),
        "the task is filtered out: {listed}"
    );
    screenshot(&client, "dead").await;

    // Replay the agent's row: tick it, confirm on the next page and in the
    // script's dialog.
    client
        .find(Locator::Css(&format!(
            "input[name=id][value='{agent_row}']"
        )))
        .await
        .expect("the row's box")
        .click()
        .await
        .expect("ticked");
    client
        .find(Locator::Css("button[value=selected]"))
        .await
        .expect("replay button")
        .click()
        .await
        .expect("clicked");
    assert!(
        text_of(&client, "#replay-report")
            .await
            .contains("replayed")
    );
    screenshot(&client, "replay-confirm").await;
    let confirm_page = this_page(&client).await;
    client
        .find(Locator::Css("button.danger"))
        .await
        .expect("confirm button")
        .click()
        .await
        .expect("clicked");
    client
        .accept_alert()
        .await
        .expect("the confirmation dialog");
    until_replaced(&confirm_page, "replay").await;
    assert!(text_of(&client, "main").await.contains("Replayed 1"));
    assert_eq!(row(&pool, agent_row).await.state, "pending");
    let report = run_once(&pool, &dev.base_url(), common::config("w")).await;
    assert!(report.delivered >= 1, "{report:?}");
    assert_eq!(row(&pool, agent_row).await.state, "delivered");
    client.goto(&format!("{base}/ui/")).await.expect("overview");
    let delivered = text_of(&client, "#types").await;
    assert!(delivered.contains("agent"), "{delivered}");
    screenshot(&client, "overview-delivered").await;

    // Look the agent up with the search box.
    client
        .goto(&format!("{base}/ui/resource"))
        .await
        .expect("lookup");
    let search = client
        .form(Locator::Css("form.filters"))
        .await
        .expect("search");
    client
        .find(Locator::Css("select[name=type]"))
        .await
        .expect("type select")
        .select_by_value("agent")
        .await
        .expect("type chosen");
    search.set_by_name("selector", "a1").await.expect("typed");
    search.submit().await.expect("looked up");
    wait_for_path(&client, "/ui/resource/agent/a1").await;
    assert_eq!(text_of(&client, "h1").await, "agent:a1");
    assert!(text_of(&client, "#history").await.contains("delivered"));
    assert!(text_of(&client, "#held").await.contains("owner"));
    screenshot(&client, "resource").await;

    // A dry-run reconcile and its findings.
    client
        .goto(&format!("{base}/ui/reconcile"))
        .await
        .expect("reconcile");
    let reconcile_page = this_page(&client).await;
    client
        .find(Locator::Css("form[action='/ui/reconcile/dry-run'] button"))
        .await
        .expect("dry-run button")
        .click()
        .await
        .expect("started");
    until_replaced(&reconcile_page, "the dry run's start").await;
    let mut done = false;
    for _ in 0..100 {
        client
            .goto(&format!("{base}/ui/reconcile"))
            .await
            .expect("reconcile");
        if client.find(Locator::Css("#last-outcome")).await.is_ok() {
            done = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(done, "the dry run finished");
    client
        .find(Locator::Css("#runs tbody a"))
        .await
        .expect("the run's link")
        .click()
        .await
        .expect("opened");
    let findings = text_of(&client, "#findings").await;
    assert!(
        findings.contains("orphan") && findings.contains("api_key:ghost"),
        "{findings}"
    );
    screenshot(&client, "reconcile").await;

    // The hostile id is text: shown as written, never run.
    client
        .goto(&format!("{base}/ui/dead?type=task"))
        .await
        .expect("dead tasks");
    let listed = text_of(&client, "#dead tbody").await;
    assert!(listed.contains(&format!("task:{HOSTILE}")), "{listed}");
    assert!(listed.contains(r"\u{1b}[2J"), "{listed}");
    let scripts = client
        .execute("return document.scripts.length", vec![])
        .await
        .expect("script count");
    assert_eq!(scripts, serde_json::json!(1), "only the page's own script");
    assert!(client.get_alert_text().await.is_err(), "no alert ran");
    screenshot(&client, "hostile").await;

    client
        .goto(&format!("{base}/ui/mappings"))
        .await
        .expect("mappings");
    assert!(
        text_of(&client, "#mappings")
            .await
            .contains("agent_api_keys")
    );
    screenshot(&client, "mappings").await;
    client.close().await.expect("browser closed");
}
