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

    let workers: Vec<_> = (0..2)
        .map(|i| {
            let port = free_port().to_string();
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
