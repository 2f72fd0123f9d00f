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
    #[error("live predicate is longer than {max} characters")]
    TooLong { max: usize },
}

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
        let chars: Vec<char> = text.chars().collect();
        let mut tokens = Vec::new();
        let mut verbatim = String::new();
        let mut i = 0;
        // What came before the current token, ignoring whitespace: `::` or `.`
        // means the next identifier is a type name or already qualified.
        let mut after_cast_or_dot = false;
        while i < chars.len() {
            let c = chars[i];
            match c {
                ';' => return Err(PredicateError::Forbidden(";")),
                '$' => return Err(PredicateError::Forbidden("$")),
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
                    // E'...' / B'...' / X'...' / U&'...' literals start with a letter.
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
        flush(&mut tokens, &mut verbatim);
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

/// `name` as a quoted SQL identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `text` as a SQL string literal.
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

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
}
