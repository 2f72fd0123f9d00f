//! `migrate --print-sql --format alembic`: the same statements as
//! `--print-sql`, as an alembic revision file whose `upgrade()` applies them
//! and whose `downgrade()` removes everything `migrate` installs.
//!
//! Why a generated file and not `op.execute(SQL)`: SQLAlchemy reads `:name`
//! inside any text it compiles as a bind parameter (a JSON literal's
//! `:true` fails), and asyncpg prepares every statement, which refuses
//! several commands at once. So the SQL is split here, where its statement
//! boundaries are known ([`split_statements`]: quotes, dollar quotes and
//! comments respected), and each statement is run alone, through the
//! driver, with no parameter parsing: `exec_driver_sql(statement,
//! execution_options={"no_parameters": True})`, which psycopg (v3, and 2)
//! and asyncpg accept alike. Every statement is written as a Python string
//! literal by [`python_str`], correct for any content.

use std::fmt::Write as _;

use crate::migrate::MIGRATOR;
use crate::uninstall::OUTBOX_TABLES;

#[derive(Debug, thiserror::Error)]
pub enum AlembicError {
    #[error(
        "a statement has an unterminated {0} (the SQL cannot be split into statements): {1:.80}"
    )]
    Unterminated(&'static str, String),
    #[error(
        "a statement has a SQL-standard function body (BEGIN ATOMIC), which cannot be split safely: {0:.80}"
    )]
    BeginAtomic(String),
}

/// The statements of `sql`, in order, each without its terminating `;`.
/// A `;` ends a statement only outside `'…'` and `E'…'` strings, `"…"`
/// identifiers, `$tag$…$tag$` dollar quotes, `--` and (nested) `/* */`
/// comments. Comments stay with the statement that follows them; a piece
/// holding nothing but comments and whitespace is dropped.
pub fn split_statements(sql: &str) -> Result<Vec<String>, AlembicError> {
    let chars: Vec<char> = sql.chars().collect();
    let mut statements = Vec::new();
    let mut start = 0;
    let mut has_code = false;
    let mut i = 0;
    let ident = |c: char| c.is_alphanumeric() || c == '_' || c == '$';
    let unterminated = |what: &'static str, from: usize| {
        AlembicError::Unterminated(what, chars[from..].iter().collect())
    };
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        match c {
            '-' if next == Some('-') => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
                continue;
            }
            '/' if next == Some('*') => {
                let from = i;
                let mut depth = 0;
                loop {
                    if i >= chars.len() {
                        return Err(unterminated("comment", from));
                    }
                    if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                        depth += 1;
                        i += 2;
                    } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
                continue;
            }
            '\'' | '"' => {
                let from = i;
                // E'…' (not the end of a longer word): backslash escapes.
                let escapes = c == '\''
                    && i > 0
                    && matches!(chars[i - 1], 'e' | 'E')
                    && (i < 2 || !ident(chars[i - 2]));
                i += 1;
                loop {
                    match chars.get(i) {
                        None => {
                            let what = if c == '"' { "identifier" } else { "string" };
                            return Err(unterminated(what, from));
                        }
                        Some('\\') if escapes => i += 2,
                        Some(&q) if q == c => {
                            if chars.get(i + 1) == Some(&c) {
                                i += 2;
                            } else {
                                i += 1;
                                break;
                            }
                        }
                        Some(_) => i += 1,
                    }
                }
                has_code = true;
                continue;
            }
            '$' if i == 0 || !ident(chars[i - 1]) => {
                // $tag$ or $$ (a tag never starts with a digit: $1 is a parameter).
                let mut j = i + 1;
                while j < chars.len()
                    && (chars[j].is_alphanumeric() || chars[j] == '_')
                    && !(j == i + 1 && chars[j].is_ascii_digit())
                {
                    j += 1;
                }
                if chars.get(j) == Some(&'$') {
                    let tag: Vec<char> = chars[i..=j].to_vec();
                    let from = i;
                    i = j + 1;
                    loop {
                        if i + tag.len() > chars.len() {
                            return Err(unterminated("dollar quote", from));
                        }
                        if chars[i..i + tag.len()] == tag[..] {
                            i += tag.len();
                            break;
                        }
                        i += 1;
                    }
                    has_code = true;
                    continue;
                }
            }
            ';' => {
                if has_code {
                    statements.push(finish(&chars[start..i])?);
                }
                start = i + 1;
                has_code = false;
                i += 1;
                continue;
            }
            _ => {}
        }
        if !c.is_whitespace() {
            has_code = true;
        }
        i += 1;
    }
    if has_code {
        statements.push(finish(&chars[start..])?);
    }
    Ok(statements)
}

fn finish(piece: &[char]) -> Result<String, AlembicError> {
    let statement: String = piece.iter().collect::<String>().trim().to_string();
    // BEGIN ATOMIC … END holds bare semicolons; psql tracks it, this does
    // not: refused rather than cut in the wrong place (any mention, even in
    // a comment or a string: a loud failure, never a wrong split).
    let upper = statement.to_ascii_uppercase();
    if upper
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .any(|w| w[0] == "BEGIN" && w[1].starts_with("ATOMIC"))
    {
        return Err(AlembicError::BeginAtomic(statement));
    }
    Ok(statement)
}

/// `s` as a Python string literal that evaluates to exactly `s`, whatever
/// it holds: a short printable line without `"` or `\` as `"s"`, anything
/// else as a triple-quoted string in which every backslash and double
/// quote is escaped (so no run of quotes can end it early), carriage
/// returns and other control characters are `\xNN` (Python would turn a
/// raw CR into a newline), and anything outside ASCII is a `\u`/`\U`
/// escape (the file's encoding never matters). Newlines and tabs stay as
/// they are, so the SQL reads as SQL.
pub fn python_str(s: &str) -> String {
    // Short and plain (a revision id): "as is".
    if !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ')
    {
        return format!("\"{s}\"");
    }
    let mut out = String::with_capacity(s.len() + 8);
    out.push_str("\"\"\"");
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' | '\t' => out.push(c),
            c if (c as u32) < 0x20 || c == '\x7f' => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if c.is_ascii() => out.push(c),
            c if (c as u32) <= 0xffff => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => {
                let _ = write!(out, "\\U{:08x}", c as u32);
            }
        }
    }
    out.push_str("\"\"\"");
    out
}

/// What `downgrade()` runs: the removal `authz-outbox uninstall --apply
/// --drop-outbox` computes (see [`crate::uninstall`]), found in the
/// catalog when the downgrade runs, so it removes what is there then (a
/// mapping added after this revision included): every trigger calling a
/// function `authz_outbox*` of the outbox's schema, the views and
/// functions of that prefix, the outbox's tables and sequences, and sqlx's
/// record of our migrations (the table too when nothing else is recorded
/// in it). Never `CASCADE`: a host object depending on one of ours fails
/// the downgrade, naming it, and nothing changes. The tables are locked up
/// front, under the lock timeout set before it.
pub fn downgrade_statement() -> String {
    let tables: Vec<String> = OUTBOX_TABLES.iter().map(|t| format!("'{t}'")).collect();
    let versions: Vec<String> = MIGRATOR.iter().map(|m| m.version.to_string()).collect();
    format!(
        r#"DO $authz_outbox_downgrade$
DECLARE
    s text := coalesce(
        (SELECT n.nspname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.oid = to_regclass('authz_outbox') AND n.nspname NOT LIKE 'pg\_temp\_%'),
        current_schema()::text);
    ours_tables text[] := ARRAY[{tables}];
    ours_versions bigint[] := ARRAY[{versions}]::bigint[];
    locked text;
    r record;
    t text;
    sqlx regclass := to_regclass('_sqlx_migrations');
    sqlx_empty boolean;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('authz_outbox_mappings'));
    SELECT string_agg(q, ', ' ORDER BY q) INTO locked FROM (
        SELECT DISTINCT format('%I.%I', n.nspname, c.relname) AS q
        FROM pg_trigger tg
        JOIN pg_class c ON c.oid = tg.tgrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        JOIN pg_proc p ON p.oid = tg.tgfoid
        WHERE NOT tg.tgisinternal AND p.pronamespace = to_regnamespace(quote_ident(s))
          AND p.proname::text LIKE 'authz\_outbox%'
        UNION
        SELECT format('%I.%I', s, c.relname)
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = s AND c.relname = ANY(ours_tables) AND c.relkind IN ('r', 'p')
    ) AS tables;
    IF locked IS NOT NULL THEN
        EXECUTE 'LOCK TABLE ' || locked || ' IN ACCESS EXCLUSIVE MODE';
    END IF;
    FOR r IN
        SELECT tg.tgname::text AS name, n.nspname::text AS nsp, c.relname::text AS rel
        FROM pg_trigger tg
        JOIN pg_class c ON c.oid = tg.tgrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        JOIN pg_proc p ON p.oid = tg.tgfoid
        WHERE NOT tg.tgisinternal AND p.pronamespace = to_regnamespace(quote_ident(s))
          AND p.proname::text LIKE 'authz\_outbox%'
        ORDER BY 2, 3, 1
    LOOP
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %I.%I', r.name, r.nsp, r.rel);
    END LOOP;
    FOR r IN
        SELECT c.relname::text AS name, c.relkind = 'm' AS materialized
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('v', 'm') AND n.nspname = s AND c.relname::text LIKE 'authz\_outbox%'
        ORDER BY 1
    LOOP
        EXECUTE format('DROP %s %I.%I',
            CASE WHEN r.materialized THEN 'MATERIALIZED VIEW' ELSE 'VIEW' END, s, r.name);
    END LOOP;
    FOR r IN
        SELECT p.proname::text AS name, pg_get_function_identity_arguments(p.oid) AS args
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = s AND p.proname::text LIKE 'authz\_outbox%'
        ORDER BY 1, 2
    LOOP
        EXECUTE format('DROP FUNCTION %I.%I(%s)', s, r.name, r.args);
    END LOOP;
    FOREACH t IN ARRAY ours_tables LOOP
        IF EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                   WHERE n.nspname = s AND c.relname = t AND c.relkind IN ('r', 'p')) THEN
            EXECUTE format('DROP TABLE %I.%I', s, t);
        END IF;
    END LOOP;
    FOR r IN
        SELECT c.relname::text AS name
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind = 'S' AND n.nspname = s AND c.relname::text LIKE 'authz\_outbox%'
        ORDER BY 1
    LOOP
        EXECUTE format('DROP SEQUENCE IF EXISTS %I.%I', s, r.name);
    END LOOP;
    IF sqlx IS NOT NULL THEN
        EXECUTE format('DELETE FROM %s WHERE version = ANY($1)', sqlx) USING ours_versions;
        EXECUTE format('SELECT NOT EXISTS (SELECT 1 FROM %s)', sqlx) INTO sqlx_empty;
        IF sqlx_empty THEN
            EXECUTE format('DROP TABLE %s', sqlx);
        END IF;
    END IF;
END
$authz_outbox_downgrade$"#,
        tables = tables.join(", "),
        versions = versions.join(", "),
    )
}

/// The revision's identity in the host's history.
#[derive(Debug, Clone)]
pub struct Revision<'a> {
    /// `revision = "…"`.
    pub id: &'a str,
    /// `down_revision`: the host's head it follows; `None` for a new base.
    pub down_revision: Option<&'a str>,
}

/// The alembic revision file for `sql` (the output of
/// [`crate::migrate::print_sql`]).
pub fn revision_file(sql: &str, revision: &Revision<'_>) -> Result<String, AlembicError> {
    let mut upgrade = split_statements(sql)?;
    upgrade.extend(reset());
    let mut downgrade: Vec<String> = Vec::new();
    // The same lock and statement timeouts as the upgrade (its first SETs).
    downgrade.extend(
        upgrade
            .iter()
            .map(|s| strip_comments(s))
            .take_while(|s| s.to_ascii_uppercase().starts_with("SET "))
            .map(str::to_string),
    );
    downgrade.push("BEGIN".into());
    downgrade.push(downgrade_statement());
    downgrade.push("COMMIT".into());
    downgrade.extend(reset());

    let mut out = String::new();
    let _ = write!(
        out,
        r#""""authz-outbox {version}: transactional capture (what `authz-outbox migrate` installs).

Generated by `authz-outbox migrate --print-sql --format alembic` against a
database shaped as the one it is applied to; regenerate it rather than edit
it. upgrade() runs exactly what `authz-outbox migrate` would have run there
(each migration and the mapping changes in their own short transaction,
recorded as `migrate` records them: a later `migrate` has nothing to do).
downgrade() removes everything authz-outbox installed, as `authz-outbox
uninstall --apply --drop-outbox` does: its triggers on the host's tables,
its functions and views, and the outbox's tables WITH THEIR ROWS.

Each statement runs alone through the driver with no parameter parsing,
outside alembic's transaction (the statements bring their own BEGIN/COMMIT):
the same under psycopg and asyncpg.
"""

from collections.abc import Sequence

from alembic import op

revision = {id}
down_revision = {down}
branch_labels = None
depends_on = None


def _run(statements: Sequence[str]) -> None:
    with op.get_context().autocommit_block():
        bind = op.get_bind()
        for statement in statements:
            bind.exec_driver_sql(statement, execution_options={{"no_parameters": True}})


def upgrade() -> None:
    _run(UPGRADE)


def downgrade() -> None:
    _run(DOWNGRADE)

"#,
        version = env!("CARGO_PKG_VERSION"),
        id = python_str(revision.id),
        down = revision
            .down_revision
            .map(python_str)
            .unwrap_or_else(|| "None".into()),
    );
    for (name, statements) in [("UPGRADE", &upgrade), ("DOWNGRADE", &downgrade)] {
        let _ = writeln!(out, "\n{name} = [");
        for s in statements {
            let _ = writeln!(out, "    {},", python_str(s));
        }
        out.push_str("]\n");
    }
    Ok(out)
}

/// The session settings the statements change, back to the connection's
/// defaults for whatever alembic runs next.
fn reset() -> [String; 3] {
    [
        "RESET client_min_messages".into(),
        "RESET lock_timeout".into(),
        "RESET statement_timeout".into(),
    ]
}

fn strip_comments(statement: &str) -> &str {
    let mut rest = statement.trim_start();
    while let Some(after) = rest.strip_prefix("--") {
        rest = after.split_once('\n').map_or("", |(_, r)| r).trim_start();
    }
    rest
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(sql: &str) -> Vec<String> {
        split_statements(sql).expect("splits")
    }

    #[test]
    fn splits_at_top_level_semicolons_only() {
        assert_eq!(split("SELECT 1; SELECT 2;\n"), ["SELECT 1", "SELECT 2"]);
        assert_eq!(split("SELECT 1"), ["SELECT 1"]);
        assert_eq!(
            split("SELECT 'a;b', \"c;\"\"d\"; SELECT 'it''s;'"),
            ["SELECT 'a;b', \"c;\"\"d\"", "SELECT 'it''s;'"]
        );
        assert_eq!(
            split("SELECT E'\\';'; SELECT 2"),
            ["SELECT E'\\';'", "SELECT 2"]
        );
        // Not E'': a word ending in e, then a plain string.
        assert_eq!(
            split("SELECT name'\\'; SELECT 2"),
            ["SELECT name'\\'", "SELECT 2"]
        );
    }

    #[test]
    fn dollar_quotes_hold_semicolons() {
        let f = "CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $$\nBEGIN\n  PERFORM 1; RETURN 2;\nEND\n$$";
        let d = "DO $body$ BEGIN EXECUTE $q$SELECT ';'$q$; RAISE NOTICE '$$'; END $body$";
        let sql = format!("{f};\n{d};\nSELECT $1, a$b$c FROM t;");
        assert_eq!(split(&sql), [f, d, "SELECT $1, a$b$c FROM t"]);
    }

    #[test]
    fn comments_hold_semicolons_and_alone_are_dropped() {
        assert_eq!(
            split("-- one; two\nSELECT 1 /* a; /* nested; */ b; */ ;\n-- trailing;\n;;  \n"),
            ["-- one; two\nSELECT 1 /* a; /* nested; */ b; */"]
        );
        assert_eq!(
            split("SELECT '--;' ; SELECT 2"),
            ["SELECT '--;'", "SELECT 2"]
        );
    }

    #[test]
    fn refuses_what_it_cannot_split() {
        assert!(split_statements("SELECT 'open; SELECT 1").is_err());
        assert!(split_statements("DO $x$ BEGIN; END $y$").is_err());
        assert!(split_statements("SELECT 1 /* open").is_err());
        assert!(
            split_statements("CREATE FUNCTION f() RETURNS int BEGIN ATOMIC SELECT 1; END").is_err()
        );
    }

    #[test]
    fn splits_every_embedded_migration_without_losing_code() {
        for m in MIGRATOR.iter() {
            let statements = split(m.sql.as_str());
            assert!(!statements.is_empty(), "{}", m.description);
            // No statement ends inside a dollar quote: each tag opens and closes.
            for statement in &statements {
                let mut tags = std::collections::BTreeMap::<String, usize>::new();
                let mut rest = statement.as_str();
                while let Some(at) = rest.find('$') {
                    let after = &rest[at + 1..];
                    let len = after
                        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                        .unwrap_or(after.len());
                    if after[len..].starts_with('$')
                        && !after.starts_with(|c: char| c.is_ascii_digit())
                    {
                        *tags.entry(after[..len].to_string()).or_default() += 1;
                        rest = &after[len + 1..];
                    } else {
                        rest = after;
                    }
                }
                assert!(
                    tags.values().all(|n| n % 2 == 0),
                    "{}: {tags:?} in {statement}",
                    m.description
                );
            }
            // Joined back, nothing but comments and separators is lost.
            let squash = |s: &str| {
                s.lines()
                    .filter(|l| !l.trim_start().starts_with("--"))
                    .flat_map(|l| l.split_whitespace())
                    .collect::<String>()
                    .replace(';', "")
            };
            assert_eq!(
                squash(&statements.join(";\n")),
                squash(m.sql.as_str()),
                "{}",
                m.description
            );
        }
    }

    #[test]
    fn python_literals_escape_what_python_would_misread() {
        assert_eq!(python_str("a b_1"), r#""a b_1""#);
        assert_eq!(python_str(""), r#""""""""#);
        assert_eq!(python_str(r#"say "hi"\n"#), r#""""say \"hi\"\\n""""#);
        assert_eq!(python_str("x\"\"\""), r#""""x\"\"\"""""#);
        assert_eq!(
            python_str("line\r\nnext\ttab"),
            "\"\"\"line\\x0d\nnext\ttab\"\"\""
        );
        assert_eq!(python_str("\0\x7f"), r#""""\x00\x7f""""#);
        assert_eq!(python_str("é😀"), r#""""\u00e9\U0001f600""""#);
        assert_eq!(python_str("{:true}"), r#""{:true}""#);
        assert_eq!(python_str("a\nb"), "\"\"\"a\nb\"\"\"");
    }

    /// The literals evaluated by Python itself, when it is here (CI and
    /// run-tests.sh have it).
    #[test]
    fn python_reads_back_exactly_the_string() {
        let samples = [
            "",
            "\"",
            "\\",
            "ends with a quote\"",
            "ends with a backslash\\",
            "'''\"\"\"''' \"\"\"\"",
            "\r\n\r\x0c\x0b\x1b\x00 \u{2028}\u{85} é 😀",
            "SELECT '{\"a\":true}'::jsonb, $$%s %(x)s :name$$",
            "\\N{BULLET} \\u00e9 \\x41",
        ];
        let program: String = samples
            .iter()
            .map(|s| format!("print(ascii({}))\n", python_str(s)))
            .collect();
        let out = match std::process::Command::new("python3")
            .args(["-c", &program])
            .output()
        {
            Ok(out) => out,
            Err(e) => panic!("python3 is needed for this test: {e}"),
        };
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let printed = String::from_utf8_lossy(&out.stdout);
        let expected: Vec<String> = samples.iter().map(|s| python_ascii(s)).collect();
        assert_eq!(printed.lines().collect::<Vec<_>>(), expected);
    }

    /// Python's `ascii()` of a str (single quotes unless it holds one and
    /// no double quote).
    fn python_ascii(s: &str) -> String {
        let quote = if s.contains('\'') && !s.contains('"') {
            '"'
        } else {
            '\''
        };
        let mut out = String::from(quote);
        for c in s.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c if c == quote => {
                    out.push('\\');
                    out.push(c);
                }
                c if (c as u32) < 0x20 || (0x7f..0x100).contains(&(c as u32)) => {
                    let _ = write!(out, "\\x{:02x}", c as u32);
                }
                c if c.is_ascii() => out.push(c),
                c if (c as u32) <= 0xffff => {
                    let _ = write!(out, "\\u{:04x}", c as u32);
                }
                c => {
                    let _ = write!(out, "\\U{:08x}", c as u32);
                }
            }
        }
        out.push(quote);
        out
    }

    #[test]
    fn revision_file_names_its_place_and_runs_each_statement() {
        let file = revision_file(
            "SET lock_timeout = '3000ms';\nBEGIN;\nSELECT '{\"a\":true}';\nCOMMIT;\n",
            &Revision {
                id: "abc123",
                down_revision: Some("host_head"),
            },
        )
        .expect("renders");
        assert!(file.contains("\nrevision = \"abc123\"\n"), "{file}");
        assert!(file.contains("\ndown_revision = \"host_head\"\n"), "{file}");
        assert!(
            file.contains("    \"\"\"SELECT '{\\\"a\\\":true}'\"\"\",\n"),
            "{file}"
        );
        let downgrade = file.split("\nDOWNGRADE = [").nth(1).expect("downgrade");
        assert!(
            downgrade.starts_with("\n    \"SET lock_timeout = '3000ms'\",\n    \"BEGIN\",\n"),
            "{downgrade}"
        );
        let with_comment = revision_file(
            "-- generated\nSET lock_timeout = '1ms';\nSELECT 1",
            &Revision {
                id: "x",
                down_revision: None,
            },
        )
        .expect("renders");
        let downgrade = with_comment
            .split("\nDOWNGRADE = [")
            .nth(1)
            .expect("downgrade");
        assert!(
            downgrade.starts_with("\n    \"SET lock_timeout = '1ms'\",\n    \"BEGIN\",\n"),
            "{downgrade}"
        );
        let none = revision_file(
            "SELECT 1",
            &Revision {
                id: "x",
                down_revision: None,
            },
        )
        .expect("renders");
        assert!(none.contains("down_revision = None\n"));
    }
}
