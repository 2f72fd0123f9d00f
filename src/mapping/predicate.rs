//! Rewriting a mapping's `live` predicate for the places it runs.
//!
//! An operator writes the predicate as they would in a `WHERE` clause on the
//! source table (`status IS DISTINCT FROM 'DELETED'`, `deleted_at IS NULL`).
//! It runs in three places that cannot see the columns bare: a trigger's
//! `WHEN` clause and body (`OLD.status`, `NEW.status`) and the lookups and
//! reconcile reads that join other tables (`t.status`). So every bare
//! identifier that names a column of the source table is qualified, and the
//! rest of the text is kept byte for byte. The lexer knows just enough SQL to
//! never rewrite inside a string literal or a quoted identifier, a type name
//! after `::`, a function name before `(`, or an already-qualified name.
//!
//! PostgreSQL itself has the last word: `mappings check` and `migrate`
//! compile the rewritten predicate, so a predicate that does not parse is
//! reported with PostgreSQL's own message, naming the mapping.

use std::collections::BTreeSet;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PredicateError {
    #[error("live predicate is empty")]
    Empty,
    #[error("live predicate has an unterminated {0}")]
    Unterminated(&'static str),
    #[error(
        "live predicate must not contain {0:?} (one boolean expression, no statements or comments)"
    )]
    Forbidden(&'static str),
    #[error("live predicate must be one expression over the table's columns, not a query ({0:?})")]
    Statement(String),
    #[error("live predicate is longer than {max} characters")]
    TooLong { max: usize },
}

/// Words that start or shape a query: a liveness rule reads its own row,
/// never another table (it runs with the installing role's privileges).
const STATEMENT_WORDS: &[&str] = &[
    "select",
    "with",
    "values",
    "table",
    "insert",
    "update",
    "delete",
    "returning",
    "union",
    "intersect",
    "except",
];

/// The longest predicate accepted; a liveness rule is a short expression.
pub const MAX_PREDICATE_LEN: usize = 2_000;

/// A parsed predicate: its text and the source-table columns it reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Predicate {
    tokens: Vec<Token>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    /// Text copied as is (operators, literals, keywords, whitespace...).
    Verbatim(String),
    /// An identifier that may name a column: as written, and as PostgreSQL
    /// resolves it (unquoted names fold to lower case).
    Ident { written: String, name: String },
}

impl Predicate {
    /// Splits the predicate into identifiers and everything else. Statement
    /// separators, comments and dollar quoting are refused: the predicate is
    /// pasted into generated functions and must stay one expression.
    pub fn parse(text: &str) -> Result<Self, PredicateError> {
        if text.trim().is_empty() {
            return Err(PredicateError::Empty);
        }
        if text.len() > MAX_PREDICATE_LEN {
            return Err(PredicateError::TooLong {
                max: MAX_PREDICATE_LEN,
            });
        }
        // A backslash means different things in `'…'` and `E'…'` and under
        // each `standard_conforming_strings`: where a literal ends must not
        // depend on any of that, so there is none, in a literal or out.
        if text.contains('\\') {
            return Err(PredicateError::Forbidden("\\"));
        }
        let chars: Vec<char> = text.chars().collect();
        let mut tokens = Vec::new();
        let mut verbatim = String::new();
        let mut i = 0;
        // What came before the current token, ignoring whitespace: `::` or `.`
        // means the next identifier is a type name or already qualified.
        let mut after_cast_or_dot = false;
        let mut depth = 0usize;
        while i < chars.len() {
            let c = chars[i];
            match c {
                ';' => return Err(PredicateError::Forbidden(";")),
                '$' => return Err(PredicateError::Forbidden("$")),
                '(' => {
                    depth += 1;
                    verbatim.push(c);
                    i += 1;
                    after_cast_or_dot = false;
                }
                ')' => {
                    // Never closes a parenthesis the predicate did not open.
                    depth = depth
                        .checked_sub(1)
                        .ok_or(PredicateError::Forbidden("an unbalanced )"))?;
                    verbatim.push(c);
                    i += 1;
                    after_cast_or_dot = false;
                }
                '-' if chars.get(i + 1) == Some(&'-') => {
                    return Err(PredicateError::Forbidden("--"));
                }
                '/' if chars.get(i + 1) == Some(&'*') => {
                    return Err(PredicateError::Forbidden("/*"));
                }
                '\'' => {
                    let end = closing_quote(&chars, i, '\'')
                        .ok_or(PredicateError::Unterminated("string literal"))?;
                    verbatim.extend(&chars[i..=end]);
                    i = end + 1;
                    after_cast_or_dot = false;
                }
                '"' => {
                    let end = closing_quote(&chars, i, '"')
                        .ok_or(PredicateError::Unterminated("quoted identifier"))?;
                    let quoted: String = chars[i + 1..end].iter().collect::<String>();
                    let name = quoted.replace("\"\"", "\"");
                    if after_cast_or_dot || next_non_space(&chars, end + 1) == Some('(') {
                        verbatim.extend(&chars[i..=end]);
                    } else {
                        flush(&mut tokens, &mut verbatim);
                        tokens.push(Token::Ident {
                            written: chars[i..=end].iter().collect(),
                            name,
                        });
                    }
                    i = end + 1;
                    after_cast_or_dot = false;
                }
                c if c.is_alphabetic() || c == '_' => {
                    let start = i;
                    while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                        i += 1;
                    }
                    let word: String = chars[start..i].iter().collect();
                    // B'...' / X'...' literals start with a letter; U&'...'
                    // has its own escape rules and is refused.
                    if word.eq_ignore_ascii_case("u") && chars.get(i) == Some(&'&') {
                        return Err(PredicateError::Forbidden("U&"));
                    }
                    if chars.get(i) == Some(&'\'') && word.len() == 1 {
                        verbatim.push_str(&word);
                        continue;
                    }
                    let is_call = next_non_space(&chars, i) == Some('(');
                    let is_qualifier = chars.get(i) == Some(&'.');
                    if after_cast_or_dot || is_call || is_qualifier {
                        verbatim.push_str(&word);
                    } else {
                        flush(&mut tokens, &mut verbatim);
                        tokens.push(Token::Ident {
                            name: word.to_lowercase(),
                            written: word,
                        });
                    }
                    after_cast_or_dot = false;
                }
                c if c.is_ascii_digit() => {
                    // A number, including forms like 1e5 and 1.5.
                    while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '.') {
                        verbatim.push(chars[i]);
                        i += 1;
                    }
                    after_cast_or_dot = false;
                }
                ':' if chars.get(i + 1) == Some(&':') => {
                    verbatim.push_str("::");
                    i += 2;
                    after_cast_or_dot = true;
                }
                '.' => {
                    verbatim.push('.');
                    i += 1;
                    after_cast_or_dot = true;
                }
                c if c.is_whitespace() => {
                    verbatim.push(c);
                    i += 1;
                }
                c => {
                    verbatim.push(c);
                    i += 1;
                    after_cast_or_dot = false;
                }
            }
        }
        if depth != 0 {
            return Err(PredicateError::Unterminated("parenthesis"));
        }
        flush(&mut tokens, &mut verbatim);
        for token in &tokens {
            if let Token::Ident { name, .. } = token
                && STATEMENT_WORDS.contains(&name.as_str())
            {
                return Err(PredicateError::Statement(name.clone()));
            }
        }
        Ok(Predicate { tokens })
    }

    /// The source-table columns the predicate reads (from `columns`, the
    /// table's column names).
    pub fn columns(&self, columns: &BTreeSet<String>) -> BTreeSet<String> {
        self.tokens
            .iter()
            .filter_map(|t| match t {
                Token::Ident { name, .. } if columns.contains(name) => Some(name.clone()),
                _ => None,
            })
            .collect()
    }

    /// The predicate with every column of the source table written as
    /// `qualifier."column"`; other identifiers (keywords, `true`) unchanged.
    pub fn qualified(&self, qualifier: &str, columns: &BTreeSet<String>) -> String {
        let mut out = String::new();
        for token in &self.tokens {
            match token {
                Token::Verbatim(text) => out.push_str(text),
                Token::Ident { name, .. } if columns.contains(name) => {
                    out.push_str(qualifier);
                    out.push('.');
                    out.push_str(&quote_ident(name));
                }
                Token::Ident { written, .. } => out.push_str(written),
            }
        }
        out
    }
}

fn flush(tokens: &mut Vec<Token>, verbatim: &mut String) {
    if !verbatim.is_empty() {
        tokens.push(Token::Verbatim(std::mem::take(verbatim)));
    }
}

/// Index of the quote closing the one at `start`; a doubled quote is an
/// escaped one.
fn closing_quote(chars: &[char], start: usize, quote: char) -> Option<usize> {
    let mut i = start + 1;
    while i < chars.len() {
        if chars[i] == quote {
            if chars.get(i + 1) == Some(&quote) {
                i += 2;
                continue;
            }
            return Some(i);
        }
        i += 1;
    }
    None
}

fn next_non_space(chars: &[char], from: usize) -> Option<char> {
    chars[from.min(chars.len())..]
        .iter()
        .copied()
        .find(|c| !c.is_whitespace())
}

pub use super::quote::{quote_ident, quote_literal};

#[cfg(test)]
mod tests {
    use super::*;

    fn cols(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn qualifies_columns_and_nothing_else() {
        let p = Predicate::parse("status IS DISTINCT FROM 'DELETED' AND deleted_at IS NULL")
            .expect("parses");
        let c = cols(&["status", "deleted_at", "id"]);
        assert_eq!(
            p.qualified("NEW", &c),
            r#"NEW."status" IS DISTINCT FROM 'DELETED' AND NEW."deleted_at" IS NULL"#
        );
        assert_eq!(p.columns(&c), cols(&["status", "deleted_at"]));
    }

    #[test]
    fn leaves_literals_types_calls_and_qualified_names_alone() {
        let p = Predicate::parse(
            r#"lower(status::text) <> 'status' AND x.status = 1 AND "Status" = E'it''s' AND status::name IS NOT NULL"#,
        )
        .expect("parses");
        let c = cols(&["status", "text", "lower", "name", "Status"]);
        assert_eq!(
            p.qualified("t", &c),
            r#"lower(t."status"::text) <> 'status' AND x.status = 1 AND t."Status" = E'it''s' AND t."status"::name IS NOT NULL"#
        );
    }

    #[test]
    fn upper_case_identifiers_fold_like_postgresql() {
        let p = Predicate::parse("STATUS <> 'x'").expect("parses");
        assert_eq!(
            p.qualified("OLD", &cols(&["status"])),
            r#"OLD."status" <> 'x'"#
        );
    }

    #[test]
    fn refuses_what_could_escape_one_expression() {
        assert_eq!(
            Predicate::parse("true; DROP TABLE agents"),
            Err(PredicateError::Forbidden(";"))
        );
        assert_eq!(
            Predicate::parse("true -- x"),
            Err(PredicateError::Forbidden("--"))
        );
        assert_eq!(
            Predicate::parse("$$x$$ = 'a'"),
            Err(PredicateError::Forbidden("$"))
        );
        assert_eq!(
            Predicate::parse("status = 'open"),
            Err(PredicateError::Unterminated("string literal"))
        );
        assert_eq!(Predicate::parse("  "), Err(PredicateError::Empty));
        // A semicolon inside a literal is data, not a separator.
        assert!(Predicate::parse("name <> 'a;b'").is_ok());
    }

    #[test]
    fn refuses_text_whose_end_depends_on_settings_or_leaves_its_parentheses() {
        // E'\'' ends at the second quote under E-string rules and at the
        // first under standard ones: the lexer must not have to guess.
        assert_eq!(
            Predicate::parse(r"status <> E'\'' OR true"),
            Err(PredicateError::Forbidden("\\"))
        );
        assert_eq!(
            Predicate::parse(r"name = U&'\0041'"),
            Err(PredicateError::Forbidden("\\"))
        );
        assert_eq!(
            Predicate::parse("name = U&'d0061'"),
            Err(PredicateError::Forbidden("U&"))
        );
        assert_eq!(
            Predicate::parse("true) OR (true"),
            Err(PredicateError::Forbidden("an unbalanced )"))
        );
        assert_eq!(
            Predicate::parse("(true"),
            Err(PredicateError::Unterminated("parenthesis"))
        );
        assert_eq!(
            Predicate::parse("EXISTS (SELECT 1 FROM pg_authid)"),
            Err(PredicateError::Statement("select".into()))
        );
        // IS DISTINCT FROM is an expression, not a query.
        assert!(
            Predicate::parse("status IS DISTINCT FROM 'DELETED' AND (deleted_at IS NULL)").is_ok()
        );
        // A dollar sign inside a literal is data.
        assert!(Predicate::parse("name <> '$fn$'").is_ok());
    }
}
