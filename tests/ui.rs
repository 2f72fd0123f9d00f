//! The operator page over plain HTTP against a real PostgreSQL (and the
//! real SpiceDB engine behind agentex-auth-dev where an action needs it):
//! every page renders, hostile values render as text, actions need the
//! token, a session and the CSRF token and are absent when read-only, a
//! replay through the page gets a dead row delivered, and a dry-run
//! reconcile started from the page shows its findings.

mod common;
mod ui_support;

use std::time::Duration;

use authz_outbox::ui::UiConfig;
use common::scripted_auth::{Answer, ScriptedAuth};
use common::{agent, dev_server, key, plant_register, row, run_once};
use sqlx::PgPool;
use ui_support::{TOKEN, csrf, get, post, serve, sign_in, with_token};

const HOSTILE: &str = "<script>alert(1)</script>";

/// Dead rows with hostile ids and errors, written straight into the outbox
/// (as any writer with access could).
async fn hostile_rows(pool: &PgPool) -> String {
    let control = "ctl\u{1b}[31mred\u{7}";
    let long = "L".repeat(1024);
    for id in [HOSTILE, control, long.as_str()] {
        sqlx::query(
            "INSERT INTO authz_outbox (resource_type, resource_id, operation, state, finished_at, \
             last_error, principal) VALUES ('api_key', $1, 'register', 'dead', now(), $2, $3)",
        )
        .bind(id)
        .bind(format!("agentex-auth said {HOSTILE} \u{1b}[2J"))
        .bind(serde_json::json!({ "user_id": HOSTILE }))
        .execute(pool)
        .await
        .expect("hostile row");
    }
    long
}

fn assert_inert(page: &str, path: &str) {
    assert!(
        !page.contains(HOSTILE),
        "{path}: a hostile value rendered as markup"
    );
    assert!(
        !page.contains('\u{1b}') && !page.contains('\u{7}'),
        "{path}: a control character reached the page"
    );
}

#[sqlx::test(migrations = false)]
async fn every_page_renders_and_hostile_values_are_text(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let long = hostile_rows(&pool).await;
    let served = serve(&pool, UiConfig::read_only(None)).await;
    let hostile_path = format!(
        "/ui/resource/api_key/{}",
        url::form_urlencoded::byte_serialize(HOSTILE.as_bytes()).collect::<String>()
    );
    for path in [
        "/ui/",
        "/ui/dead",
        "/ui/dead?type=api_key&error=said&newer_than=1h",
        "/ui/reconcile",
        "/ui/mappings",
        "/ui/resource",
        hostile_path.as_str(),
    ] {
        let (status, page) = get(&served.base, path, None).await;
        assert_eq!(status, 200, "{path}: {page}");
        assert_inert(&page, path);
    }
    let (_, dead) = get(&served.base, "/ui/dead", None).await;
    assert!(
        dead.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{dead}"
    );
    assert!(dead.contains(r"ctl\u{1b}[31mred\u{7}"), "{dead}");
    assert!(dead.contains(&long), "the 1 KB id is shown whole");
    let (_, resource) = get(&served.base, &hostile_path, None).await;
    assert!(
        resource.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{resource}"
    );
    assert!(resource.contains("id=\"history\""), "{resource}");
    let (_, overview) = get(&served.base, "/ui/", None).await;
    assert!(overview.contains("<svg"), "charts are drawn: {overview}");
}

#[sqlx::test(migrations = false)]
async fn actions_need_the_token_a_session_and_the_csrf_token(pool: PgPool) {
    let pool = common::host_db(pool).await;
    hostile_rows(&pool).await;
    let id: i64 = sqlx::query_scalar("SELECT min(id) FROM authz_outbox WHERE state = 'dead'")
        .fetch_one(&pool)
        .await
        .expect("a dead row");
    let id = id.to_string();
    let served = serve(&pool, with_token(None)).await;
    let base = &served.base;

    let (_, signed_out) = get(base, "/ui/dead", None).await;
    assert!(!signed_out.contains("Replay selected"), "{signed_out}");
    let replay = [
        ("scope", "selected"),
        ("id", id.as_str()),
        ("confirmed", "yes"),
    ];
    let (status, _) = post(base, "/ui/dead/replay", None, &replay).await;
    assert_eq!(status, 403, "no session");

    assert_eq!(sign_in(base, "not-the-token").await, None, "wrong token");
    let cookie = sign_in(base, TOKEN).await.expect("signed in");
    let (_, page) = get(base, "/ui/dead", Some(&cookie)).await;
    assert!(page.contains("Replay selected"), "{page}");
    assert!(!page.contains(TOKEN), "the token is never shown");
    let token = csrf(&page);

    let (status, _) = post(base, "/ui/dead/replay", Some(&cookie), &replay).await;
    assert_eq!(status, 403, "no CSRF token");
    let mut forged = replay.to_vec();
    forged.push(("csrf", "0000"));
    let (status, _) = post(base, "/ui/dead/replay", Some(&cookie), &forged).await;
    assert_eq!(status, 403, "a wrong CSRF token");
    let (status, _) = post(base, "/ui/reconcile/dry-run", Some(&cookie), &[]).await;
    assert_eq!(status, 403, "reconcile without the CSRF token");

    // With everything, unconfirmed: a dry run that changes nothing.
    let confirm = [
        ("scope", "selected"),
        ("id", id.as_str()),
        ("csrf", token.as_str()),
    ];
    let (status, page) = post(base, "/ui/dead/replay", Some(&cookie), &confirm).await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("Nothing has changed yet"), "{page}");
    assert_inert(&page, "confirmation");
    assert_eq!(row(&pool, id.parse().expect("id")).await.state, "dead");
}

#[sqlx::test(migrations = false)]
async fn a_read_only_page_offers_no_action_and_refuses_every_post(pool: PgPool) {
    let pool = common::host_db(pool).await;
    hostile_rows(&pool).await;
    let served = serve(&pool, UiConfig::read_only(None)).await;
    let base = &served.base;
    for path in ["/ui/", "/ui/dead", "/ui/reconcile", "/ui/login"] {
        let (_, page) = get(base, path, None).await;
        assert!(
            !page.contains("method=\"post\""),
            "{path} has a form: {page}"
        );
    }
    assert_eq!(sign_in(base, TOKEN).await, None, "nothing to sign in to");
    for path in [
        "/ui/dead/replay",
        "/ui/reconcile/dry-run",
        "/ui/reconcile/apply",
        "/ui/login",
    ] {
        let (status, _) = post(base, path, None, &[("scope", "filter"), ("token", TOKEN)]).await;
        assert_eq!(status, 403, "{path}");
    }
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM authz_outbox WHERE state = 'dead'")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(dead, 3, "nothing was replayed");
}

#[sqlx::test(migrations = false)]
async fn a_row_replayed_through_the_page_is_delivered(pool: PgPool) {
    let pool = common::host_db(pool).await;
    // An agent and a key whose registers died from a 403.
    let refusing = ScriptedAuth::always(Answer::status(403)).await;
    agent(&pool, "a1").await;
    let k = key(&pool, "a1", "ci").await;
    let report = run_once(&pool, &refusing.url(), common::config("w")).await;
    assert_eq!(report.dead, 2, "{report:?}");

    let dev = dev_server().await;
    let served = serve(&pool, with_token(Some(&dev.grpc_endpoint()))).await;
    let base = &served.base;
    let cookie = sign_in(base, TOKEN).await.expect("signed in");
    let (_, page) = get(base, "/ui/dead?error=403", Some(&cookie)).await;
    assert!(page.contains(&k.id), "the key's dead row is listed: {page}");
    let token = csrf(&page);
    let (status, page) = post(
        base,
        "/ui/dead/replay",
        Some(&cookie),
        &[
            ("scope", "filter"),
            ("error", "403"),
            ("confirmed", "yes"),
            ("csrf", &token),
        ],
    )
    .await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("Replayed 2"), "{page}");
    assert_eq!(row(&pool, k.outbox_id).await.state, "pending");

    let report = run_once(&pool, &dev.base_url(), common::config("w")).await;
    assert_eq!(report.delivered, 2, "{report:?}");
    assert_eq!(row(&pool, k.outbox_id).await.state, "delivered");
    let (_, page) = get(base, &format!("/ui/resource/api_key/{}", k.id), None).await;
    assert!(page.contains("delivered"), "{page}");
    assert!(
        page.contains("id=\"held\""),
        "SpiceDB's relationships are shown: {page}"
    );
    assert!(
        !page.contains("id=\"drift\""),
        "no drift once delivered: {page}"
    );
}

#[sqlx::test(migrations = false)]
async fn a_dry_run_reconcile_started_from_the_page_shows_its_findings(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let dev = dev_server().await;
    // Tuples in SpiceDB, no row: an orphan.
    plant_register(&dev.base_url(), "u9", "api_key", "ghost", None).await;
    let served = serve(&pool, with_token(Some(&dev.grpc_endpoint()))).await;
    let base = &served.base;
    let cookie = sign_in(base, TOKEN).await.expect("signed in");
    let (_, page) = get(base, "/ui/reconcile", Some(&cookie)).await;
    let token = csrf(&page);
    let (status, _) = post(
        base,
        "/ui/reconcile/dry-run",
        Some(&cookie),
        &[("csrf", &token)],
    )
    .await;
    assert_eq!(status, 303);

    let mut run_id = None;
    for _ in 0..300 {
        run_id = sqlx::query_scalar("SELECT max(id) FROM authz_outbox_reconcile_runs")
            .fetch_one(&pool)
            .await
            .expect("runs");
        let (_, page) = get(base, "/ui/reconcile", None).await;
        if run_id.is_some() && page.contains("id=\"last-outcome\"") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let run_id: i64 = run_id.expect("the run finished");
    let (status, page) = get(base, &format!("/ui/reconcile/run/{run_id}"), None).await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("Dry run"), "{page}");
    assert!(page.contains("orphan"), "{page}");
    assert!(page.contains("api_key:ghost"), "{page}");
    let enqueued: i64 = sqlx::query_scalar("SELECT count(*) FROM authz_outbox")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(enqueued, 0, "a dry run enqueues nothing");
    let (_, page) = get(base, "/ui/resource/api_key/ghost", None).await;
    assert!(page.contains("id=\"drift\""), "{page}");
    assert!(page.contains("orphan"), "{page}");
}

/// The worker's database role as the operations guide grants it: no read
/// of reconcile's findings or of `authz_outbox_desired`. Every page still
/// answers, saying what it cannot show.
#[sqlx::test(migrations = false)]
async fn every_page_renders_for_the_workers_database_role(pool: PgPool) {
    let pool = common::host_db(pool).await;
    hostile_rows(&pool).await;
    sqlx::query(
        "INSERT INTO authz_outbox_reconcile_runs (started_at, applied, drift, summary) \
         VALUES (now(), false, 0, '{}')",
    )
    .execute(&pool)
    .await
    .expect("a run");
    let role = format!("ui_worker_{}", uuid::Uuid::new_v4().simple());
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE ROLE {role} LOGIN;
         GRANT USAGE ON SCHEMA public TO {role};
         GRANT SELECT, UPDATE, DELETE ON authz_outbox TO {role};
         GRANT EXECUTE ON FUNCTION authz_outbox_resource_live(text, text, text),
                                   authz_outbox_has_creator(jsonb) TO {role};
         GRANT SELECT ON authz_outbox_mappings TO {role};
         GRANT SELECT ON authz_outbox_reconcile_runs TO {role};
         GRANT SELECT, INSERT, UPDATE, DELETE ON authz_outbox_listeners TO {role};
         GRANT SELECT, INSERT, UPDATE, DELETE ON authz_outbox_delivery_minutes TO {role};"
    )))
    .execute(&pool)
    .await
    .expect("the worker's role");
    let options = pool.connect_options().as_ref().clone().username(&role);
    let worker_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_with(options)
        .await
        .expect("connected as the worker's role");
    let served = serve(&worker_pool, UiConfig::read_only(None)).await;
    for path in [
        "/ui/",
        "/ui/dead",
        "/ui/reconcile",
        "/ui/reconcile/run/1",
        "/ui/mappings",
        "/ui/resource/api_key/k1",
    ] {
        let (status, page) = get(&served.base, path, None).await;
        assert_eq!(status, 200, "{path}: {page}");
    }
    let (_, page) = get(&served.base, "/ui/reconcile", None).await;
    assert!(page.contains("no-findings-grant"), "{page}");
    let (_, page) = get(&served.base, "/ui/resource/api_key/k1", None).await;
    assert!(page.contains("cannot read authz_outbox_desired"), "{page}");
    worker_pool.close().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP OWNED BY {role}; DROP ROLE {role};"
    )))
    .execute(&pool)
    .await
    .expect("role dropped");
}

/// Kills a child process when the test ends, pass or fail.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// The first answer of `path` on `port`, waiting for the process to listen.
async fn first_answer(port: u16, path: &str) -> (u16, String) {
    for _ in 0..500 {
        if let Ok(r) = reqwest::get(format!("http://127.0.0.1:{port}{path}")).await {
            let status = r.status().as_u16();
            return (status, r.text().await.expect("body"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("nothing answered on port {port}");
}

/// `run` mounts the page beside /metrics, with this worker's state and the
/// sign-in when it has a token; `--no-ui` removes it; `authz-outbox ui`
/// serves it read-only.
#[sqlx::test(migrations = false)]
async fn the_worker_and_the_ui_command_serve_the_page(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let url = common::database_url(&pool).await;
    let auth = ScriptedAuth::always(Answer::ok()).await;
    let worker = |port: u16, extra: &[&str]| {
        Child(
            std::process::Command::new(env!("CARGO_BIN_EXE_authz-outbox"))
                .args(["run", "--metrics-addr", &format!("127.0.0.1:{port}")])
                .args(extra)
                .env("DATABASE_URL", &url)
                .env("AGENTEX_AUTH_URL", auth.url())
                .env("AUTHZ_OUTBOX_UI_TOKEN", TOKEN)
                .env("RUST_LOG", "warn")
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("worker starts"),
        )
    };
    let port = free_port();
    let _worker = worker(port, &[]);
    let (status, page) = first_answer(port, "/ui/").await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("This worker:"), "{page}");
    assert!(page.contains("Sign in"), "actions need a sign-in: {page}");
    let cookie = sign_in(&format!("http://127.0.0.1:{port}"), TOKEN).await;
    assert!(cookie.is_some(), "the worker's token signs in");
    assert!(
        first_answer(port, "/metrics")
            .await
            .1
            .contains("authz_outbox_")
    );

    let port = free_port();
    let _quiet = worker(port, &["--no-ui"]);
    assert_eq!(first_answer(port, "/ui/").await.0, 404);
    assert_eq!(first_answer(port, "/healthz").await.0, 200);

    let port = free_port();
    let _page = Child(
        std::process::Command::new(env!("CARGO_BIN_EXE_authz-outbox"))
            .args(["ui", "--listen", &format!("127.0.0.1:{port}")])
            .env("DATABASE_URL", &url)
            .env("AUTHZ_OUTBOX_UI_TOKEN", TOKEN)
            .env("RUST_LOG", "warn")
            .spawn()
            .expect("ui starts"),
    );
    let (status, page) = first_answer(port, "/ui/dead").await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("read-only"), "{page}");
    assert_eq!(
        sign_in(&format!("http://127.0.0.1:{port}"), TOKEN).await,
        None,
        "`authz-outbox ui` ignores a token: it is read-only"
    );
}

/// The overview's figures are computed once per 10 s whoever polls it: a
/// delivery and a dead row recorded between two loads within that time do
/// not show on the second (the queries that would count them did not run).
#[sqlx::test(migrations = false)]
async fn the_overview_counts_at_most_once_per_ten_seconds(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let served = serve(&pool, UiConfig::read_only(None)).await;
    let delivered = |page: &str| -> String {
        // The "Delivered (1 h)" cell of the api_key row.
        let row = page
            .split("<tr>")
            .find(|r| r.contains("<code>api_key</code>"))
            .unwrap_or("")
            .to_string();
        // Cells: type, pending, in flight, dead, delivered (1 h), oldest.
        let cell = row.split("<td").nth(5).unwrap_or("");
        let after = cell.split_once('>').map_or("", |(_, rest)| rest);
        after.chars().take_while(|c| c.is_ascii_digit()).collect()
    };
    // A worker's count of one delivery this minute.
    let count_one = || {
        sqlx::query(
            "INSERT INTO authz_outbox_delivery_minutes AS m VALUES (date_trunc('minute', now()), 'api_key', 'w', 1, 5)
             ON CONFLICT (minute, resource_type, worker_id) DO UPDATE SET delivered = m.delivered + 1",
        )
        .execute(&pool)
    };
    count_one().await.expect("a delivery counted");
    let (_, first) = get(&served.base, "/ui/", None).await;
    assert_eq!(delivered(&first), "1", "{first}");
    count_one().await.expect("another delivery counted");
    sqlx::query(
        "INSERT INTO authz_outbox (resource_type, resource_id, operation, principal, state, delivered_at, finished_at)
         VALUES ('api_key', 'k3', 'register', '{\"user_id\":\"u1\"}', 'dead', NULL, now())",
    )
    .execute(&pool)
    .await
    .expect("a dead row");
    let (_, second) = get(&served.base, "/ui/", None).await;
    assert_eq!(delivered(&second), "1", "reused within 10 s: {second}");
    assert!(
        second.contains("dead?type=api_key\">0<"),
        "the pending and dead counts are reused too: {second}"
    );
}

/// What a worker delivers is in the overview's last hour, counted by the
/// worker (the page no longer counts the outbox's delivered rows): the
/// per-type cell and the chart's total.
#[sqlx::test(migrations = false)]
async fn deliveries_by_the_worker_show_in_the_overviews_hour(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let auth = ScriptedAuth::always(Answer::ok()).await;
    agent(&pool, "a1").await;
    key(&pool, "a1", "one").await;
    key(&pool, "a1", "two").await;
    let report = run_once(&pool, &auth.url(), common::config("w")).await;
    assert_eq!(report.delivered, 3, "{report:?}");
    let counted: Vec<(String, i64)> = sqlx::query_as(
        "SELECT resource_type, sum(delivered)::bigint FROM authz_outbox_delivery_minutes
         WHERE worker_id = 'w' GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .expect("the worker's minutes");
    assert_eq!(
        counted,
        vec![("agent".to_string(), 1), ("api_key".to_string(), 2)],
        "counted per type by the run that delivered them"
    );
    let served = serve(&pool, UiConfig::read_only(None)).await;
    let (_, page) = get(&served.base, "/ui/", None).await;
    let key_row = page
        .split("<tr>")
        .find(|r| r.contains("<code>api_key</code>"))
        .unwrap_or("");
    let cell = key_row.split("<td").nth(5).unwrap_or("");
    assert!(
        cell.contains(">2<"),
        "two keys delivered in the hour: {key_row}"
    );
    // The chart's bars ("N min ago: M rows"), summed: the three deliveries
    // may straddle a minute.
    let charted: u64 = page
        .split(" min ago: ")
        .skip(1)
        .filter_map(|rest| rest.split_once(" rows<"))
        .filter_map(|(n, _)| n.parse::<u64>().ok())
        .sum();
    assert_eq!(charted, 3, "the chart counts all three: {page}");
}
