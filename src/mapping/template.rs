//! Selector templates: how a row's columns become the resource's selector
//! (`{id}`, `run-schedule::{agent_id}::{id}`), and how a selector read back
//! (from an outbox row, from SpiceDB) finds its row again.

use std::collections::BTreeSet;

use super::predicate::{quote_ident, quote_literal};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TemplateError {
    #[error("selector template {0:?} names no column (write columns as {{column}})")]
    NoColumn(String),
    #[error("selector template {0:?} has an unclosed or empty {{…}}")]
    Unbalanced(String),
    #[error(
        "selector template {0:?} puts two columns side by side; separate them with literal text so the selector can be read back"
    )]
    Adjacent(String),
    #[error("selector template {0:?}: {1:?} is not a plain column name")]
    BadColumn(String, String),
}

/// A template, split into literal text and column placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectorTemplate {
    source: String,
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Column(String),
}

impl SelectorTemplate {
    pub fn parse(template: &str) -> Result<Self, TemplateError> {
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_string()));
            }
            let after = &rest[open + 1..];
            let close = after
                .find('}')
                .ok_or_else(|| TemplateError::Unbalanced(template.into()))?;
            let column = &after[..close];
            if column.is_empty() {
                return Err(TemplateError::Unbalanced(template.into()));
            }
            if !super::is_plain_identifier(column) {
                return Err(TemplateError::BadColumn(template.into(), column.into()));
            }
            if matches!(parts.last(), Some(Part::Column(_))) {
                return Err(TemplateError::Adjacent(template.into()));
            }
            parts.push(Part::Column(column.to_string()));
            rest = &after[close + 1..];
        }
        if rest.contains('}') {
            return Err(TemplateError::Unbalanced(template.into()));
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_string()));
        }
        if !parts.iter().any(|p| matches!(p, Part::Column(_))) {
            return Err(TemplateError::NoColumn(template.into()));
        }
        Ok(SelectorTemplate {
            source: template.to_string(),
            parts,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The columns the selector is made of, in template order.
    pub fn columns(&self) -> Vec<&str> {
        self.parts
            .iter()
            .filter_map(|p| match p {
                Part::Column(c) => Some(c.as_str()),
                Part::Literal(_) => None,
            })
            .collect()
    }

    pub fn column_set(&self) -> BTreeSet<String> {
        self.columns().into_iter().map(str::to_string).collect()
    }

    /// The SQL expression that builds the selector from a row reachable as
    /// `qualifier` (`NEW`, `OLD`, `t`). NULL when any column is NULL.
    pub fn sql(&self, qualifier: &str) -> String {
        let pieces: Vec<String> = self
            .parts
            .iter()
            .map(|p| match p {
                Part::Literal(text) => quote_literal(text),
                Part::Column(c) => format!("{qualifier}.{}::text", quote_ident(c)),
            })
            .collect();
        if pieces.len() == 1 {
            pieces[0].clone()
        } else {
            format!("({})", pieces.join(" || "))
        }
    }

    /// PL/pgSQL statements that split the text in `input` into one variable
    /// per column (`v_<column>`), or `RETURN false` when it does not have
    /// the template's shape. Each column's value runs up to the first
    /// occurrence of the literal that follows it (ids do not contain the
    /// host's `::` separators); the caller re-checks the rebuilt selector, so
    /// a value that did contain it is a miss, never a wrong match.
    pub fn plpgsql_split(&self, input: &str) -> String {
        let mut out = format!("rest := {input};\n");
        let mut i = 0;
        while i < self.parts.len() {
            match &self.parts[i] {
                Part::Literal(text) => {
                    let lit = quote_literal(text);
                    out.push_str(&format!(
                        "IF left(rest, {len}) IS DISTINCT FROM {lit} THEN RETURN false; END IF;\n\
                         rest := substr(rest, {next});\n",
                        len = text.chars().count(),
                        next = text.chars().count() + 1,
                    ));
                    i += 1;
                }
                Part::Column(column) => {
                    let var = format!("v_{column}");
                    match self.parts.get(i + 1) {
                        Some(Part::Literal(text)) => {
                            let lit = quote_literal(text);
                            out.push_str(&format!(
                                "pos := strpos(rest, {lit});\n\
                                 IF pos = 0 THEN RETURN false; END IF;\n\
                                 {var} := left(rest, pos - 1);\n\
                                 rest := substr(rest, pos + {len});\n",
                                len = text.chars().count(),
                            ));
                            i += 2;
                        }
                        _ => {
                            out.push_str(&format!("{var} := rest;\nrest := '';\n"));
                            i += 1;
                        }
                    }
                }
            }
        }
        out.push_str("IF rest <> '' THEN RETURN false; END IF;\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_columns_and_literals() {
        let t = SelectorTemplate::parse("run-schedule::{agent_id}::{id}").expect("valid");
        assert_eq!(t.columns(), vec!["agent_id", "id"]);
        assert_eq!(
            t.sql("NEW"),
            r#"(E'run-schedule::' || NEW."agent_id"::text || E'::' || NEW."id"::text)"#
        );
        assert_eq!(
            SelectorTemplate::parse("{id}").expect("valid").sql("t"),
            r#"t."id"::text"#
        );
    }

    #[test]
    fn rejects_templates_that_cannot_be_read_back() {
        assert!(matches!(
            SelectorTemplate::parse("{a}{b}"),
            Err(TemplateError::Adjacent(_))
        ));
        assert!(matches!(
            SelectorTemplate::parse("static"),
            Err(TemplateError::NoColumn(_))
        ));
        assert!(matches!(
            SelectorTemplate::parse("x{id"),
            Err(TemplateError::Unbalanced(_))
        ));
        assert!(matches!(
            SelectorTemplate::parse("{}"),
            Err(TemplateError::Unbalanced(_))
        ));
        assert!(matches!(
            SelectorTemplate::parse("{id; drop}"),
            Err(TemplateError::BadColumn(_, _))
        ));
    }

    #[test]
    fn split_walks_literals_and_columns_in_order() {
        let t = SelectorTemplate::parse("run-schedule::{agent_id}::{id}").expect("valid");
        let sql = t.plpgsql_split("p_selector");
        assert!(sql.contains("IF left(rest, 14) IS DISTINCT FROM E'run-schedule::'"));
        assert!(sql.contains("v_agent_id := left(rest, pos - 1);"));
        assert!(sql.contains("v_id := rest;"));
    }
}
