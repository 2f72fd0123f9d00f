//! The binary as operators meet it: one-line errors and exit codes for bad
//! input, no secret in any message, and the main job — two `run` replicas
//! draining what `keys create`/`keys delete` enqueued.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::scripted_auth::{Answer, ScriptedAuth};
use sqlx::PgPool;

const BIN: &str = env!("CARGO_BIN_EXE_authz-outbox");

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("DATABASE_URL")
        .envs(env.iter().copied())
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("binary runs")
}

/// [`run`] off the test's runtime thread, so the in-process scripted server
/// keeps answering while the child process waits on it.
async fn run_async(args: &[&str], env: &[(&str, &str)]) -> Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        run(&args, &env)
    })
    .await
    .expect("command thread")
}

fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn assert_one_line_error(out: &Output, expected: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    let first = stderr.lines().next().unwrap_or_default();
    assert!(first.starts_with("error:"), "{stderr}");
    assert!(
        first.contains(expected),
        "expected {expected:?} in {stderr}"
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("stack backtrace"),
        "{stderr}"
    );
}

#[test]
fn bad_input_gets_a_one_line_error_and_exit_2() {
    let out = run(&["status"], &[("DATABASE_URL", "not a url")]);
    assert_one_line_error(&out, "invalid DATABASE_URL");

    let out = run(
        &["status"],
        &[("DATABASE_URL", "postgres://app:hunter2@127.0.0.1:1/db")],
    );
    assert_one_line_error(&out, "cannot connect to PostgreSQL");
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("hunter2"),
        "password leaked"
    );

    let key = ["keys", "create", "--agent-id", "a", "--name", "n"];
    let out = run(
        &[
            &key[..],
            &["--type", "oauth", "--principal", r#"{"user_id":"u"}"#],
        ]
        .concat(),
        &[("DATABASE_URL", "postgres://x@127.0.0.1:1/db")],
    );
    assert_one_line_error(&out, "unknown key type");

    let out = run(
        &[
            &key[..],
            &["--type", "external", "--principal", "{not json"],
        ]
        .concat(),
        &[("DATABASE_URL", "postgres://x@127.0.0.1:1/db")],
    );
    assert_one_line_error(&out, "principal is not valid JSON");

    let out = run(
        &["run", "--lease", "5s", "--request-timeout", "5s"],
        &[
            ("DATABASE_URL", "postgres://x@127.0.0.1:1/db"),
            ("AGENTEX_AUTH_URL", "http://127.0.0.1:1"),
        ],
    );
    assert_one_line_error(&out, "must be at least 3x the request timeout");

    let out = run(
        &["run"],
        &[
            ("DATABASE_URL", "postgres://x@127.0.0.1:1/db"),
            ("AGENTEX_AUTH_URL", "ftp//nope"),
            ("AGENTEX_AUTH_TOKEN", "tok-SECRET-123"),
        ],
    );
    assert_one_line_error(&out, "invalid agentex-auth URL");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("tok-SECRET-123"));
}

#[test]
fn every_command_has_help() {
    for args in [
        vec!["--help"],
        vec!["migrate", "--help"],
        vec!["run", "--help"],
        vec!["status", "--help"],
        vec!["keys", "create", "--help"],
        vec!["keys", "delete", "--help"],
        vec!["agents", "create", "--help"],
        vec!["reconcile", "--help"],
        vec!["replay", "--help"],
        vec!["purge", "--help"],
        vec!["uninstall", "--help"],
    ] {
        let out = run(&args, &[]);
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage"),
            "{args:?}"
        );
    }
}

/// The database URL of a `#[sqlx::test]` database, for child processes.
async fn url_of(pool: &PgPool) -> String {
    let db: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(pool)
        .await
        .expect("db");
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL");
    let mut url = url::Url::parse(&base).expect("url");
    url.set_path(&db);
    url.to_string()
}

/// Kills a child process when a failing assertion unwinds past it, so a
/// failed test never leaves workers behind.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port")
}

#[sqlx::test(migrations = false)]
async fn two_replicas_drain_what_the_cli_enqueued(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let auth = ScriptedAuth::start(|_, n| {
        // Some transient failures on the way, as in production.
        if n % 5 == 3 {
            Answer::status(503)
        } else {
            Answer::ok()
        }
    })
    .await;
    let db = url_of(&pool).await;
    let env = [
        ("DATABASE_URL", db.as_str()),
        ("AUTHZ_OUTBOX_PRINCIPAL", r#"{"user_id":"u1"}"#),
    ];

    let out = run(&["migrate"], &env);
    assert_ok(&out);
    let out = run(&["agents", "create", "--id", "a1", "--name", "one"], &env);
    assert_ok(&out);
    let mut keys = Vec::new();
    for i in 0..12 {
        let name = format!("k{i}");
        let out = run(
            &[
                "keys",
                "create",
                "--agent-id",
                "a1",
                "--name",
                &name,
                "--type",
                "external",
            ],
            &env,
        );
        assert_ok(&out);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("secret=agx_"),
            "generated secret printed once"
        );
        let id = stdout
            .split_whitespace()
            .find_map(|w| w.strip_prefix("key_id="))
            .expect("key id printed")
            .to_string();
        keys.push(id);
    }
    for id in &keys[..4] {
        let out = run(&["keys", "delete", "--id", id], &env);
        assert_ok(&out);
    }

    let ports = [free_port(), free_port()];
    let workers: Vec<_> = ports
        .iter()
        .enumerate()
        .map(|(i, port)| {
            let port = port.to_string();
            Command::new(BIN)
                .args([
                    "run",
                    "--worker-id",
                    &format!("replica-{i}"),
                    "--metrics-addr",
                    &format!("127.0.0.1:{port}"),
                ])
                .args([
                    "--backoff-base",
                    "10ms",
                    "--backoff-cap",
                    "50ms",
                    "--poll-interval",
                    "50ms",
                ])
                .env("DATABASE_URL", &db)
                .env("AGENTEX_AUTH_URL", auth.url())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map(Reaped)
                .expect("worker starts")
        })
        .collect();
    // Read-your-writes: with replicas running, --wait returns once delivered.
    let out = run(
        &[
            "keys",
            "create",
            "--agent-id",
            "a1",
            "--name",
            "waited",
            "--type",
            "github",
            "--wait",
            "20s",
        ],
        &env,
    );
    assert_ok(&out);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(" delivered"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let out = run_async(&["status", "--format", "json"], &env).await;
            let status: serde_json::Value =
                serde_json::from_slice(&out.stdout).expect("status json");
            if status["counts"]["pending"] == 0 {
                assert!(status["oldest_pending_age_seconds"].is_number());
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("backlog drained by two replicas");
    // SIGTERM before a replica has installed its handler (a loaded machine
    // may still be starting one after the other drained the backlog) kills
    // it outright: wait until both serve their endpoint.
    for port in ports {
        let healthz = format!("http://127.0.0.1:{port}/healthz");
        common::until(Duration::from_secs(30), "replica started", || async {
            reqwest::get(&healthz).await.is_ok()
        })
        .await;
    }
    for mut w in workers {
        let _ = Command::new("kill")
            .args(["-TERM", &w.0.id().to_string()])
            .status();
        let status = w.0.wait().expect("worker exits");
        assert!(status.success(), "graceful shutdown exits 0: {status:?}");
    }
    let (delivered, dead): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE state IN ('delivered', 'superseded')), count(*) FILTER (WHERE state = 'dead') FROM authz_outbox",
    )
    .fetch_one(&pool)
    .await
    .expect("counts");
    assert_eq!((delivered, dead), (1 + 13 + 4, 0));
    let holders: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT locked_by FROM authz_outbox WHERE locked_by IS NOT NULL",
    )
    .fetch_all(&pool)
    .await
    .expect("holders");
    assert!(holders.is_empty(), "no lease left behind: {holders:?}");
}

/// Every duration and size flag has a maximum, checked at parse time: the
/// exact values that wrapped a lease, panicked a delivery task or `replay`.
#[test]
fn settings_past_their_maximum_are_refused_with_a_one_line_error() {
    let env = [
        ("DATABASE_URL", "postgres://x@127.0.0.1:1/db"),
        ("AGENTEX_AUTH_URL", "http://127.0.0.1:1"),
    ];
    for (args, expected) in [
        (
            &["run", "--lease", "18446744073709551615s"][..],
            "at most 1h",
        ),
        (&["run", "--backoff-cap", "2000000y"][..], "at most 1d"),
        (
            &["run", "--concurrency", "99999999999999999999"][..],
            "1 to 4096",
        ),
        (&["run", "--concurrency", "0"][..], "1 to 4096"),
        (&["run", "--batch-size", "10001"][..], "1 to 10000"),
        (&["run", "--max-attempts", "4294967295"][..], "1 to 1000"),
        (&["run", "--request-timeout", "6m"][..], "at most 5m"),
        (&["run", "--dead-after", "366d"][..], "at most 365d"),
        (&["run", "--retention", "3651d"][..], "at most 3650d"),
        (&["run", "--poll-interval", "2h"][..], "at most 1h"),
        (&["run", "--shutdown-timeout", "2h"][..], "at most 1h"),
        (&["replay", "--since", "300000y"][..], "at most 3650d ago"),
        (&["replay", "--until", "300000y"][..], "at most 3650d ago"),
        (
            &["keys", "delete", "--id", "k", "--wait", "300000y"][..],
            "at most 1h",
        ),
    ] {
        let out = run(args, &env);
        assert_one_line_error(&out, expected);
    }
}

/// `Retry-After` at its largest with the largest backoff cap: the retry is
/// scheduled (capped), nothing panics, and `run --once` exits.
#[sqlx::test(migrations = false)]
async fn the_largest_settings_and_a_huge_retry_after_do_not_panic(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let auth = ScriptedAuth::always(Answer::status(429).retry_after(u64::MAX)).await;
    sqlx::raw_sql(
        r#"INSERT INTO authz_outbox (resource_type, resource_id, operation, principal)
           VALUES ('task', 't1', 'register', '{"user_id":"u"}')"#,
    )
    .execute(&pool)
    .await
    .expect("insert");
    common::planted_tasks_live(&pool).await;
    let db = url_of(&pool).await;
    let port = free_port().to_string();
    let out = run_async(
        &[
            "run",
            "--once",
            "--backoff-cap",
            "24h",
            "--backoff-base",
            "1h",
            "--lease",
            "1h",
            "--request-timeout",
            "5m",
            "--dead-after",
            "365d",
            "--retention",
            "3650d",
            "--concurrency",
            "4096",
            "--batch-size",
            "10000",
            "--max-attempts",
            "1000",
            "--metrics-addr",
            &format!("127.0.0.1:{port}"),
        ],
        &[
            ("DATABASE_URL", db.as_str()),
            ("AGENTEX_AUTH_URL", &auth.url()),
        ],
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let wait: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM next_attempt_at - now())::float8 FROM authz_outbox",
    )
    .fetch_one(&pool)
    .await
    .expect("row");
    assert!(
        (86_000.0..=86_400.0).contains(&wait),
        "capped at 24h: {wait}"
    );
}

#[sqlx::test(migrations = false)]
async fn postgres_sslmode_is_honoured_never_downgraded(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let db = url_of(&pool).await;
    // The throwaway cluster has no TLS: asking for it must fail, not
    // quietly connect in clear.
    for mode in ["require", "verify-ca", "verify-full"] {
        let url = format!("{db}?sslmode={mode}");
        let out = run_async(&["status"], &[("DATABASE_URL", url.as_str())]).await;
        assert_one_line_error(&out, "cannot connect to PostgreSQL");
        let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
        assert!(
            stderr.contains("tls") || stderr.contains("ssl"),
            "{mode}: says why: {stderr}"
        );
    }
    let url = format!("{db}?sslmode=prefer");
    let out = run_async(&["status"], &[("DATABASE_URL", url.as_str())]).await;
    assert_ok(&out);
}

#[test]
fn a_password_in_a_url_is_never_echoed() {
    let db = ("DATABASE_URL", "postgres://x@127.0.0.1:1/db");
    // The refused URL is shown as far as it holds no secret, so the
    // operator can still tell which one it was.
    for (url, shown) in [
        (
            "http://svc:pa55word@auth:notaport",
            "http://<redacted>@auth:notaport",
        ),
        ("svc:pa55word@auth", "<redacted>"),
        ("pa55word@auth", "<redacted>"),
        ("ftp://svc:pa55word@auth/", "ftp://auth/"),
        ("ftp://:pa55word@auth/", "ftp://auth/"),
        // A token in the user-name place, no password.
        ("ftp://pa55word@auth/", "ftp://auth/"),
        ("ftp//nope", "ftp//nope"),
    ] {
        let out = run(&["run"], &[db, ("AGENTEX_AUTH_URL", url)]);
        assert_one_line_error(&out, &format!("invalid agentex-auth URL {shown:?}"));
        assert!(
            !String::from_utf8_lossy(&out.stderr).contains("pa55word"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = run(
        &["reconcile"],
        &[
            db,
            ("SPICEDB_ENDPOINT", "http://svc:pa55word@spicedb:notaport"),
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("pa55word"));
    let out = run(
        &["status"],
        &[(
            "DATABASE_URL",
            "postgres://app:pa55word@127.0.0.1:notaport/db",
        )],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("pa55word"));
}

/// Inserts task rows (their tasks live, so never stale) answered by `script_for` per id.
/// The tasks go live first: a worker already running may claim a row the
/// moment it commits, and would supersede it as stale if its task were not
/// there yet.
async fn task_rows(pool: &PgPool, ids: &[String]) {
    common::live_tasks(pool, ids).await;
    for id in ids {
        sqlx::query(
            "INSERT INTO authz_outbox (resource_type, resource_id, operation, principal)
             VALUES ('task', $1, 'register', '{\"user_id\":\"u\"}')",
        )
        .bind(id)
        .execute(pool)
        .await
        .expect("insert");
    }
}

/// The scripted answer for a task id: its suffix names the status.
fn answer_by_suffix(seen: &common::scripted_auth::Seen, _: usize) -> Answer {
    let id = seen.body["resource"]["selector"]
        .as_str()
        .unwrap_or_default();
    match id.rsplit('-').next() {
        Some("503") => Answer::status(503),
        Some("400") => Answer::status(400).body(serde_json::json!({"error": "bad"})),
        Some("401") => Answer::status(401),
        _ => Answer::ok(),
    }
}

#[sqlx::test(migrations = false)]
async fn run_once_exits_1_when_a_row_it_attempted_went_dead_and_2_on_a_rejected_credential_or_a_refused_outcome(
    pool: PgPool,
) {
    let pool = common::host_db(pool).await;
    let auth = ScriptedAuth::start(answer_by_suffix).await;
    let db = url_of(&pool).await;
    let port = free_port().to_string();
    let args = [
        "run",
        "--once",
        "--concurrency",
        "1",
        "--metrics-addr",
        &format!("127.0.0.1:{port}"),
    ];
    let env = [
        ("DATABASE_URL", db.as_str()),
        ("AGENTEX_AUTH_URL", &auth.url()),
    ];
    let ids = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<Vec<_>>();

    task_rows(&pool, &ids(&["a-ok", "a-503"])).await;
    let out = run_async(&args, &env).await;
    assert_eq!(out.status.code(), Some(0), "a retry is not a failure");

    task_rows(&pool, &ids(&["b-ok", "b-400"])).await;
    let out = run_async(&args, &env).await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("dead=1"));

    task_rows(&pool, &ids(&["c-ok", "c-401"])).await;
    let out = run_async(&args, &env).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("rejected the credential"));

    // The database refuses the outcome: exit 2 with the reason, at once.
    sqlx::query("UPDATE authz_outbox SET state = 'delivered' WHERE state = 'pending'")
        .execute(&pool)
        .await
        .expect("earlier rows settled");
    common::refuse_delivered_outcomes(&pool).await;
    task_rows(&pool, &ids(&["d-ok"])).await;
    let out = run_async(&args, &env).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("the run stopped early: recording outcomes")
            && stderr.contains("outcomes refused by the test"),
        "{stderr}"
    );
}

/// `RUST_LOG=debug`, both log formats, the credential from the environment
/// and from a file, through a success, a retry, a dead row and a 401: no log
/// line holds the token or a key's secret.
#[sqlx::test(migrations = false)]
async fn no_secret_reaches_the_logs(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let auth = ScriptedAuth::start(answer_by_suffix).await;
    common::agent(&pool, "a1").await;
    let secrets: Vec<String> = (0..3)
        .map(|i| format!("agx_known_key_secret_{i}_do_not_log"))
        .collect();
    for (i, secret) in secrets.iter().enumerate() {
        authz_outbox::capture::create_api_key(
            &pool,
            authz_outbox::capture::NewApiKey {
                agent_id: "a1".into(),
                name: format!("k{i}"),
                key_type: authz_outbox::domain::ApiKeyType::External,
                secret: Some(secret.clone()),
            },
            Some(&common::principal("u1")),
        )
        .await
        .expect("key");
    }
    const TOKEN: &str = "svc-token-from-env-do-not-log";
    const FILE_TOKEN: &str = "svc-token-from-file-do-not-log";
    let dir = std::env::temp_dir().join(format!("authz-outbox-logs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let token_file = dir.join("token");
    std::fs::write(&token_file, format!("{FILE_TOKEN}\n")).expect("token file");
    let db = url_of(&pool).await;
    let token_file = token_file.to_string_lossy().to_string();

    for (round, (format, credential)) in [
        ("json", "env"),
        ("text", "env"),
        ("json", "file"),
        ("text", "file"),
    ]
    .into_iter()
    .enumerate()
    {
        task_rows(
            &pool,
            &["ok", "503", "400", "401"].map(|s| format!("r{round}-{s}")),
        )
        .await;
        let port = free_port().to_string();
        let mut env = vec![
            ("DATABASE_URL", db.as_str()),
            ("AGENTEX_AUTH_URL", auth.url().leak() as &str),
            ("RUST_LOG", "debug"),
            ("LOG_FORMAT", format),
        ];
        match credential {
            "env" => env.push(("AGENTEX_AUTH_TOKEN", TOKEN)),
            _ => env.push(("AGENTEX_AUTH_TOKEN_FILE", token_file.as_str())),
        }
        let out = run_async(
            &[
                "run",
                "--once",
                "--concurrency",
                "1",
                "--metrics-addr",
                &format!("127.0.0.1:{port}"),
            ],
            &env,
        )
        .await;
        let logs = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            logs.contains("DEBUG") || logs.contains("\"DEBUG\""),
            "debug logs on: {logs}"
        );
        assert!(
            logs.contains("401") || logs.contains("credential"),
            "{logs}"
        );
        for secret in secrets
            .iter()
            .map(String::as_str)
            .chain([TOKEN, FILE_TOKEN])
        {
            assert!(
                !logs.contains(secret),
                "{format}/{credential}: {secret} in the logs"
            );
        }
    }
    // The requests did carry the credential: the check above is not vacuous.
    let seen = auth.seen();
    for expected in [TOKEN, FILE_TOKEN] {
        assert!(
            seen.iter().any(
                |s| s.headers.get("authorization").and_then(|v| v.to_str().ok())
                    == Some(format!("Bearer {expected}").as_str())
            ),
            "{expected} was sent"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[sqlx::test(migrations = false)]
async fn run_warns_once_when_no_credential_is_configured(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let auth = ScriptedAuth::always(Answer::ok()).await;
    let db = url_of(&pool).await;
    let port = free_port().to_string();
    let args = [
        "run",
        "--once",
        "--metrics-addr",
        &format!("127.0.0.1:{port}"),
    ];
    let warning = "no agentex-auth credential configured";
    let out = run_async(
        &args,
        &[
            ("DATABASE_URL", db.as_str()),
            ("AGENTEX_AUTH_URL", &auth.url()),
        ],
    )
    .await;
    assert_ok(&out);
    assert_eq!(
        String::from_utf8_lossy(&out.stderr)
            .matches(warning)
            .count(),
        1
    );
    let out = run_async(
        &args,
        &[
            ("DATABASE_URL", db.as_str()),
            ("AGENTEX_AUTH_URL", &auth.url()),
            ("AGENTEX_AUTH_TOKEN", "t"),
        ],
    )
    .await;
    assert_ok(&out);
    assert!(!String::from_utf8_lossy(&out.stderr).contains(warning));
}

/// `/readyz` answers 503 while a rejected credential pauses delivery, and
/// 200 again once it is accepted.
#[sqlx::test(migrations = false)]
async fn readyz_is_503_while_the_credential_is_rejected(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let auth = ScriptedAuth::always(Answer::ok()).await;
    let db = url_of(&pool).await;
    let port = free_port();
    let worker = Command::new(BIN)
        .args([
            "run",
            "--poll-interval",
            "50ms",
            "--metrics-addr",
            &format!("127.0.0.1:{port}"),
        ])
        .env("DATABASE_URL", &db)
        .env("AGENTEX_AUTH_URL", auth.url())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(Reaped)
        .expect("worker starts");
    let readyz = format!("http://127.0.0.1:{port}/readyz");
    let until_status = |code: u16| {
        let readyz = readyz.clone();
        async move {
            let client = reqwest::Client::new();
            // Generous: a loaded CI machine may take a while to start it.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while tokio::time::Instant::now() < deadline {
                if let Ok(r) = client.get(&readyz).send().await
                    && r.status().as_u16() == code
                {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            false
        }
    };
    assert!(until_status(200).await, "ready with a working credential");
    auth.set_script(|_, _| Answer::status(401));
    task_rows(&pool, &["t-1".to_string()]).await;
    assert!(until_status(503).await, "not ready while paused");
    auth.set_script(|_, _| Answer::ok());
    assert!(until_status(200).await, "ready again once accepted");
    drop(worker);
}

/// `status` shows a stored error terminal-safe, whatever wrote it.
#[sqlx::test(migrations = false)]
async fn status_shows_errors_without_control_characters(pool: PgPool) {
    let pool = common::host_db(pool).await;
    sqlx::query(
        "INSERT INTO authz_outbox (resource_type, resource_id, operation, principal, state, last_error, finished_at)
         VALUES ('task', 't1', 'register', '{\"user_id\":\"u\"}', 'dead', $1, now())",
    )
    .bind("boom\u{1b}[2J\u{1b}]0;pwned\u{7}\r\nagain")
    .execute(&pool)
    .await
    .expect("insert");
    let db = url_of(&pool).await;
    let out = run_async(&["status"], &[("DATABASE_URL", db.as_str())]).await;
    assert_ok(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(r"boom\u{1b}[2J\u{1b}]0;pwned\u{7}\r\nagain"),
        "{stdout}"
    );
    assert!(
        !stdout.chars().any(|c| c.is_control() && c != '\n'),
        "{stdout:?}"
    );
}

// --- Output an attacker cannot steer (issue 21, item 9) ---

/// Whether `text` holds a character a terminal or a log viewer acts on,
/// besides the newlines that end its lines.
fn steerable(text: &str) -> bool {
    text.chars()
        .any(|c| c != '\n' && authz_outbox::display::needs_escape(c))
}

/// A throwaway directory for files a test hands the binary.
fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "authz-outbox-cli-{name}-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4()
    ));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// An agentex-auth error body, a resource id from a hand-written row, a
/// TOML error: each reaches `last_error`, the text log, `replay`'s table
/// and the CLI's `error:` line escaped, one line each.
#[sqlx::test(migrations = false)]
async fn text_from_a_server_or_a_row_is_shown_escaped(pool: PgPool) {
    let pool = common::host_db(pool).await;
    const BODY: &str = "bad\u{1b}[2J\n2026-01-01T00:00:00Z  INFO forged line\u{202e}";
    let auth =
        ScriptedAuth::always(Answer::status(400).body(serde_json::json!({ "error": BODY }))).await;
    task_rows(&pool, &["t-hostile".to_string()]).await;
    // A row no trigger wrote: its type and id hold escape sequences and a
    // newline, and its type is long (it goes dead for its type, with an
    // error quoting it that must still fit in one bounded line).
    sqlx::query(
        "INSERT INTO authz_outbox (resource_type, resource_id, operation, principal)
         VALUES ($1, $2, 'register', '{\"user_id\":\"u\"}')",
    )
    .bind(format!("task\u{1b}[31m{}", "z".repeat(1000)))
    .bind("t\u{1b}]0;pwned\u{7}\nx")
    .execute(&pool)
    .await
    .expect("hand-written row");
    let db = url_of(&pool).await;
    let port = free_port().to_string();
    let out = run_async(
        &[
            "run",
            "--once",
            "--metrics-addr",
            &format!("127.0.0.1:{port}"),
        ],
        &[
            ("DATABASE_URL", db.as_str()),
            ("AGENTEX_AUTH_URL", &auth.url()),
            ("AGENTEX_AUTH_TOKEN", "t"),
            ("RUST_LOG", "info"),
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let logs = String::from_utf8_lossy(&out.stderr);
    assert!(!steerable(&logs), "{logs:?}");
    assert!(
        logs.contains(r"bad\u{1b}[2J\n2026-01-01T00:00:00Z  INFO forged line\u{202e}"),
        "{logs}"
    );
    assert!(
        !logs.lines().any(|l| l.starts_with("2026-01-01")),
        "a forged log line: {logs}"
    );

    let errors: Vec<(String, String)> = sqlx::query_as(
        "SELECT resource_id, last_error FROM authz_outbox WHERE state = 'dead' ORDER BY id",
    )
    .fetch_all(&pool)
    .await
    .expect("dead rows");
    assert_eq!(errors.len(), 2, "{errors:?}");
    for (id, error) in &errors {
        assert!(
            !steerable(error) && !error.contains('\n'),
            "{id:?}: {error:?}"
        );
        assert!(
            error.chars().count() <= authz_outbox::display::MAX_ERROR_CHARS,
            "{error}"
        );
    }
    assert!(errors[0].1.contains(r"bad\u{1b}[2J\n2026"), "{errors:?}");

    let out = run_async(
        &["replay", "--all-dead", "--dry-run"],
        &[("DATABASE_URL", db.as_str())],
    )
    .await;
    assert_ok(&out);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(!steerable(&table), "{table:?}");
    assert!(
        table.contains(r"task\u{1b}[31mzzz") && table.contains(r"z:t\u{1b}]0;pwned\u{7}\nx"),
        "{table}"
    );
    // A header, two rows and the dry-run note.
    assert_eq!(table.lines().count(), 4, "{table}");

    // A TOML error quotes the offending line.
    let dir = scratch("toml");
    let file = dir.join("mappings.toml");
    std::fs::write(&file, "[[mapping]]\nname = \"a\" \u{1b}[2J\u{202e} oops\n").expect("file");
    let out = run(
        &["mappings", "check", "--mappings", &file.to_string_lossy()],
        &[("DATABASE_URL", db.as_str())],
    );
    assert_one_line_error(&out, "mappings");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(!steerable(&stderr), "{stderr:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The SpiceDB endpoint is shown like every other URL: without its password.
#[test]
fn the_spicedb_endpoint_is_shown_without_its_password() {
    let db = ("DATABASE_URL", "not-a-url");
    for endpoint in [
        "http://svc:pa55word@spicedb:notaport",
        "http://svc:pa55word@127.0.0.1:1",
    ] {
        for args in [
            &["run", "--once", "--target", "spicedb"][..],
            &["mappings", "check", "--target", "spicedb"][..],
        ] {
            let out = run(
                args,
                &[db, ("SPICEDB_ENDPOINT", endpoint), ("RUST_LOG", "debug")],
            );
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{args:?} {endpoint}: {stderr}");
            assert!(!stderr.contains("pa55word"), "{args:?}: {stderr}");
        }
    }
}

/// A SpiceDB token over plain http to another machine warns at start, as
/// the agentex-auth credential does; loopback, https and no token do not.
#[test]
fn a_spicedb_token_in_clear_to_another_host_warns() {
    let warning = "SPICEDB_ENDPOINT is plain http to another host";
    // Refused at once, after the warning.
    let db = ("DATABASE_URL", "not-a-url");
    let commands: [&[&str]; 3] = [
        &["run", "--once", "--target", "spicedb"],
        &["reconcile"],
        // The schema read fails fast (nothing listens on the address);
        // the warning comes first.
        &["mappings", "check", "--target", "spicedb"],
    ];
    for args in commands {
        for (endpoint, token, warns) in [
            ("http://spicedb.invalid:50051", Some("psk"), true),
            ("http://192.0.2.1:50051", Some("psk"), true),
            ("http://127.0.0.1:1", Some("psk"), false),
            ("http://localhost:1", Some("psk"), false),
            ("https://spicedb.invalid:50051", Some("psk"), false),
            ("http://spicedb.invalid:50051", None, false),
        ] {
            let mut env = vec![db, ("SPICEDB_ENDPOINT", endpoint), ("RUST_LOG", "warn")];
            if let Some(token) = token {
                env.push(("SPICEDB_TOKEN", token));
            }
            // Short: the mapping check's schema read must not wait long on
            // an unroutable address.
            let out = run_with_deadline(args, &env, Duration::from_secs(30));
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                stderr.matches(warning).count(),
                usize::from(warns),
                "{args:?} {endpoint} {token:?}: {stderr}"
            );
            assert!(
                !stderr.contains("psk\n") && !stderr.contains("Bearer"),
                "{stderr}"
            );
        }
    }
}

/// [`run`], killed (and failed) if it has not ended by `deadline`.
fn run_with_deadline(args: &[&str], env: &[(&str, &str)], deadline: Duration) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .env_remove("DATABASE_URL")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("binary starts");
    let started = std::time::Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if started.elapsed() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "{args:?} still running after {deadline:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

/// `--mappings` takes a regular file: a FIFO is refused at once (opening
/// one would wait for a writer forever), a device or a directory too.
#[test]
fn the_mappings_file_must_be_a_regular_file() {
    let dir = scratch("fifo");
    let fifo = dir.join("mappings.toml");
    let made = Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo runs");
    assert!(made.success());
    let db = ("DATABASE_URL", "postgres://x@127.0.0.1:1/db");
    for (path, kind) in [
        (fifo.to_string_lossy().to_string(), "a FIFO"),
        ("/dev/zero".to_string(), "a device"),
        ("/dev/null".to_string(), "a device"),
        (dir.to_string_lossy().to_string(), "a directory"),
    ] {
        for args in [
            &["mappings", "check", "--mappings", path.as_str()][..],
            &["migrate", "--mappings", path.as_str()][..],
        ] {
            let out = run_with_deadline(args, &[db], Duration::from_secs(20));
            assert_one_line_error(
                &out,
                &format!("is {kind}; --mappings takes a regular TOML file"),
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A test CA certificate (self-signed, no key anywhere): a CA file that
/// does hold a certificate.
const TEST_CA: &str = "-----BEGIN CERTIFICATE-----
MIIBlTCCATugAwIBAgIUJMnAkayJnUUp2l1iHO0rW7p2JNAwCgYIKoZIzj0EAwIw
HzEdMBsGA1UEAwwUYXV0aHotb3V0Ym94IHRlc3QgQ0EwIBcNMjYxMjA1MTc0OTA0
WhgPMjEyNjExMTExNzQ5MDRaMB8xHTAbBgNVBAMMFGF1dGh6LW91dGJveCB0ZXN0
IENBMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEbsl10THjOaBvciBGJhqYdfW5
plHV+s9XDHjD3FROXCdi4nryrh5eQIdiRshP4BPNL9MDEsy49mb7FsrnrpV51KNT
MFEwHQYDVR0OBBYEFLiDYAYdmAVCuYq5lUIuiqmP9FcaMB8GA1UdIwQYMBaAFLiD
YAYdmAVCuYq5lUIuiqmP9FcaMA8GA1UdEwEB/wQFMAMBAf8wCgYIKoZIzj0EAwID
SAAwRQIhAO2wE5wezMgrVhTKrFSwsOwTCMqo3yiAXPv/ZRn3PmusAiAA+UXtaaoz
OX1CNW9K6WXY9KVPxQM2zHOF0ueeXU62tg==
-----END CERTIFICATE-----
";

/// A CA file without a certificate in it is a one-line error, wherever a
/// CA file is taken; `mappings check` takes SPICEDB_CA_FILE as `run` does.
#[test]
fn a_ca_file_must_hold_a_certificate() {
    let dir = scratch("ca");
    let empty = dir.join("empty.pem");
    std::fs::write(&empty, "").expect("file");
    let key = dir.join("key.pem");
    std::fs::write(
        &key,
        "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n",
    )
    .expect("file");
    let db = ("DATABASE_URL", "postgres://x@127.0.0.1:1/db");
    let https = ("SPICEDB_ENDPOINT", "https://127.0.0.1:1");
    for file in [&empty, &key] {
        let file = file.to_string_lossy().to_string();
        let ca = ("SPICEDB_CA_FILE", file.as_str());
        for args in [
            &["run", "--once", "--target", "spicedb"][..],
            &["reconcile"][..],
            &["mappings", "check", "--target", "spicedb"][..],
        ] {
            let out = run(args, &[db, https, ca]);
            assert_one_line_error(&out, "no PEM certificate");
        }
        let out = run(
            &["run", "--once"],
            &[
                db,
                ("AGENTEX_AUTH_URL", "https://127.0.0.1:1"),
                ("AGENTEX_AUTH_CA_FILE", file.as_str()),
            ],
        );
        assert_one_line_error(&out, "no PEM certificate");
    }
    // Honoured by `mappings check`: a CA file says TLS, so an http://
    // endpoint is refused rather than dialled in clear.
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, TEST_CA).expect("file");
    let ca = ca.to_string_lossy().to_string();
    let out = run(
        &["mappings", "check", "--target", "spicedb"],
        &[
            db,
            ("SPICEDB_ENDPOINT", "http://127.0.0.1:1"),
            ("SPICEDB_CA_FILE", ca.as_str()),
        ],
    );
    assert_one_line_error(&out, "use https://");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A metrics port already taken is one line naming the flag and the
/// environment variable that set it, exit 2.
#[sqlx::test(migrations = false)]
async fn a_metrics_port_in_use_is_one_line_naming_the_flag_and_the_variable(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let db = url_of(&pool).await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let out = run_with_deadline(
        &["run", "--agentex-auth-url", "http://127.0.0.1:1"],
        &[
            ("DATABASE_URL", &db),
            ("AGENTEX_AUTH_TOKEN", "t"),
            ("METRICS_ADDR", &addr),
        ],
        Duration::from_secs(20),
    );
    assert_one_line_error(&out, "--metrics-addr / METRICS_ADDR");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains(&addr), "{stderr}");
    drop(taken);
}

/// The default does not take Prometheus's own port.
#[test]
fn the_default_metrics_port_is_not_prometheus_s() {
    let out = run(&["run", "--help"], &[]);
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("127.0.0.1:9464"), "{help}");
    assert!(!help.contains(":9090"), "{help}");
}

/// Inserts `n` rows of `resource_type` in `state`, finished `days_ago`.
async fn finished_rows(pool: &PgPool, resource_type: &str, state: &str, days_ago: i32, n: i32) {
    sqlx::query(
        r#"INSERT INTO authz_outbox (resource_type, resource_id, operation, principal, state,
                                     finished_at, last_error)
           SELECT $1, 'purge-' || $2 || '-' || $3 || '-' || g, 'register', '{"user_id":"u1"}', $2,
                  now() - $3 * interval '1 day', 'refused'
           FROM generate_series(1, $4) g"#,
    )
    .bind(resource_type)
    .bind(state)
    .bind(days_ago)
    .bind(n)
    .execute(pool)
    .await
    .expect("rows inserted");
}

async fn count(pool: &PgPool, resource_type: &str, state: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM authz_outbox WHERE resource_type = $1 AND state = $2")
        .bind(resource_type)
        .bind(state)
        .fetch_one(pool)
        .await
        .expect("count")
}

/// `purge --dead` deletes dead rows past the age asked for, of the type
/// asked for, all of them however many batches that takes, and nothing
/// else: not a newer dead row, not a pending or delivered one. A dry run
/// counts and deletes nothing; a purge without `--dead` or past the age
/// limit is refused with one line.
#[sqlx::test(migrations = false)]
async fn purge_deletes_only_the_dead_rows_it_is_asked_to(pool: PgPool) {
    let pool = common::host_db(pool).await;
    let url = url_of(&pool).await;
    let env = [("DATABASE_URL", url.as_str())];
    finished_rows(&pool, "task", "dead", 40, 2_500).await;
    finished_rows(&pool, "task", "dead", 1, 3).await;
    finished_rows(&pool, "agent", "dead", 40, 2).await;
    finished_rows(&pool, "task", "delivered", 40, 5).await;
    finished_rows(&pool, "task", "pending", 40, 4).await;

    let out = run_async(
        &[
            "purge",
            "--dead",
            "--older-than",
            "30d",
            "--type",
            "task",
            "--dry-run",
        ],
        &env,
    )
    .await;
    assert_ok(&out);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("2500 dead rows would be purged"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(count(&pool, "task", "dead").await, 2_503);

    let out = run_async(
        &["purge", "--dead", "--older-than", "30d", "--type", "task"],
        &env,
    )
    .await;
    assert_ok(&out);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("purged 2500 dead rows"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        count(&pool, "task", "dead").await,
        3,
        "the newer dead rows stay"
    );
    assert_eq!(
        count(&pool, "agent", "dead").await,
        2,
        "another type's stay"
    );
    assert_eq!(count(&pool, "task", "delivered").await, 5);
    assert_eq!(count(&pool, "task", "pending").await, 4);

    let out = run_async(
        &["purge", "--dead", "--older-than", "30d", "--format", "json"],
        &env,
    )
    .await;
    assert_ok(&out);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(report["rows"], 2, "{report}");
    assert_eq!(count(&pool, "agent", "dead").await, 0);
    assert_eq!(count(&pool, "task", "dead").await, 3);

    assert_one_line_error(
        &run_async(&["purge", "--older-than", "30d"], &env).await,
        "required arguments were not provided",
    );
    assert_one_line_error(
        &run_async(&["purge", "--dead", "--older-than", "3651d"], &env).await,
        "at most 3650d",
    );
}
