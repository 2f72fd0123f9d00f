//! The quickstart guide, run as a newcomer types it: every fenced block of
//! docs/quickstart-spicedb.md, in order, in one fresh `bash` whose
//! environment holds only `HOME` and the system `PATH` (with `cargo`'s
//! directory, as rustup's profile sets it). Nothing the guide does not say
//! is set: no `DATABASE_URL`, no `SPICEDB_ENDPOINT`, no binary on `PATH`
//! until a block puts it there. Shell blocks run as written; a SQL block is
//! typed into `psql "$DATABASE_URL"`, as the guide says; the mapping file's
//! block must be what the example's file says.
//!
//! The guide builds the release binaries itself (`cargo build --release`):
//! in CI `.ci/run` has built them just before, so that block finds them up
//! to date. The release profile has its own lock, so it never waits on the
//! debug build running these tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const GUIDE: &str = "docs/quickstart-spicedb.md";
const MAPPINGS: &str = "examples/spicedb-app/mappings.toml";

#[derive(Debug)]
struct Block {
    language: String,
    code: String,
    line: usize,
}

/// Every fenced block, in order.
fn blocks(markdown: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut lines = markdown.lines().enumerate();
    while let Some((i, line)) = lines.next() {
        let Some(language) = line.strip_prefix("```") else {
            continue;
        };
        let mut code = Vec::new();
        for (_, inner) in lines.by_ref() {
            if inner == "```" {
                break;
            }
            code.push(inner);
        }
        out.push(Block {
            language: language.trim().to_string(),
            code: code.join("\n"),
            line: i + 1,
        });
    }
    out
}

/// Lines that are neither blank nor comments.
fn statements(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .collect()
}

/// The shell script the guide amounts to, each block followed by a marker
/// with its exit status.
fn script(blocks: &[Block], repo: &Path) -> String {
    let mut out = format!("cd '{}'\n", repo.display());
    for (n, b) in blocks.iter().enumerate() {
        match b.language.as_str() {
            "sh" => out.push_str(&b.code),
            "sql" => out.push_str(&format!(
                "psql \"$DATABASE_URL\" -X -q -v ON_ERROR_STOP=1 <<'GUIDE_SQL'\n{}\nGUIDE_SQL",
                b.code
            )),
            // Shown, not typed: checked against the file below.
            "toml" => out.push_str("true"),
            other => panic!("{GUIDE}:{}: a ```{other} block the test cannot run", b.line),
        }
        out.push_str(&format!(
            "\necho \"@@ block {n} line {} exit $?\"\n",
            b.line
        ));
    }
    // The harness's own checks and clean-up, after the guide.
    out.push_str(
        "echo \"@@ agentex objects $(psql \"$DATABASE_URL\" -X -At -c \"SELECT count(*) FROM pg_class \
         WHERE relname IN ('agents', 'agent_api_keys', 'tasks', 'task_agents', 'agent_run_schedules') \
         OR oid IN (SELECT typrelid FROM pg_type WHERE typname IN ('agentstatus', 'agentapikeytype', 'taskstatus'))\") \
         $(psql \"$DATABASE_URL\" -X -At -c \"SELECT count(*) FROM pg_type WHERE typname IN ('agentstatus', 'agentapikeytype', 'taskstatus')\")\"\n\
         kill $(jobs -p) 2>/dev/null\nwait 2>/dev/null\n",
    );
    out
}

fn cargo_dir() -> PathBuf {
    let cargo = std::env::var_os("CARGO")
        .map(PathBuf::from)
        .unwrap_or_else(|| "cargo".into());
    cargo
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/usr/bin"))
}

#[test]
fn the_quickstart_guide_runs_as_written() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let guide = std::fs::read_to_string(repo.join(GUIDE)).expect("guide");
    let blocks = blocks(&guide);
    assert!(blocks.len() >= 6, "{blocks:?}");

    // The mapping block is the example's file, comments aside.
    let file = std::fs::read_to_string(repo.join(MAPPINGS)).expect("mappings file");
    let file_lines = statements(&file);
    for b in blocks.iter().filter(|b| b.language == "toml") {
        let shown = statements(&b.code);
        assert!(
            file_lines
                .windows(shown.len())
                .any(|w| w == shown.as_slice()),
            "{GUIDE}:{}: the mapping block is not what {MAPPINGS} says",
            b.line
        );
    }

    let dir = std::env::temp_dir().join(format!("authz-outbox-guide-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("work dir");
    let script_path = dir.join("quickstart.sh");
    std::fs::write(&script_path, script(&blocks, &repo)).expect("script");
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let path = format!(
        "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        cargo_dir().display()
    );
    let mut child = Command::new("bash")
        .args(["--noprofile", "--norc"])
        .arg(&script_path)
        .env_clear()
        .env("HOME", home)
        .env("PATH", path)
        .env("LANG", "C.UTF-8")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("bash");
    let stdout = child.stdout.take().expect("stdout");
    let stderr = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || std::io::read_to_string(stdout).unwrap_or_default());
    let err = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    // A cold release build takes minutes; in CI it is already there.
    let deadline = Instant::now() + Duration::from_secs(1800);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the guide did not finish in 30 minutes");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let stdout = out.join().expect("stdout");
    let stderr = err.join().expect("stderr");
    let shown = format!("--- stdout\n{stdout}\n--- stderr\n{stderr}");
    assert!(status.success(), "{shown}");

    // Every block ran, and its last command succeeded.
    let markers: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("@@ block "))
        .collect();
    assert_eq!(markers.len(), blocks.len(), "{shown}");
    for m in &markers {
        assert!(m.ends_with(" exit 0"), "{m}\n{shown}");
    }
    // No command failed in the middle of a block either: authz-outbox's
    // one-line errors, psql's, the shell's.
    for line in stderr.lines() {
        assert!(
            !(line.starts_with("error:")
                || line.contains("ERROR:")
                || line.contains("command not found")
                || line.contains("No such file")),
            "a failing command: {line}\n{shown}"
        );
    }
    // Step 5 answers as the guide's comments say.
    let answers: Vec<&str> = stdout
        .lines()
        .filter(|l| *l == "allowed" || *l == "denied")
        .collect();
    assert_eq!(answers, ["allowed", "denied", "allowed"], "{shown}");
    // Step 6: reconcile found nothing to heal.
    assert!(
        stdout
            .lines()
            .any(|l| l.split_whitespace().eq(["drift", "0"])),
        "{shown}"
    );
    // The application's database holds nothing agentex-shaped.
    assert!(stdout.contains("@@ agentex objects 0 0"), "{shown}");
    std::fs::remove_dir_all(&dir).ok();
}
