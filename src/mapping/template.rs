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

    /// PL/pgSQL that tries every way the text in `input` splits into the
    /// template's parts, setting one variable per column (`v_<column>`) and
    /// running `on_match` for each complete split. A column's value may
    /// itself contain the literal that follows it (an agent id holding the
    /// `::` of `run-schedule::{agent_id}::{id}`): every occurrence is tried,
    /// not only the first, so such a selector still finds its row; the
    /// caller re-checks the rebuilt selector, so no split can match a wrong
    /// row. Returns the declarations the code needs and the code.
    pub fn plpgsql_match(&self, input: &str, on_match: &str) -> (String, String) {
        let mut declarations = String::new();
        let mut code = String::new();
        self.split_from(0, input, 0, on_match, &mut declarations, &mut code);
        (declarations, code)
    }

    fn split_from(
        &self,
        i: usize,
        rest: &str,
        depth: usize,
        on_match: &str,
        declarations: &mut String,
        code: &mut String,
    ) {
        let next = format!("r_{}", depth + 1);
        match self.parts.get(i) {
            None => code.push_str(&format!("IF {rest} = '' THEN\n{on_match}\nEND IF;\n")),
            Some(Part::Literal(text)) => {
                let len = text.chars().count();
                declarations.push_str(&format!("{next} text;\n"));
                code.push_str(&format!(
                    "IF left({rest}, {len}) = {lit} THEN\n{next} := substr({rest}, {after});\n",
                    lit = quote_literal(text),
                    after = len + 1,
                ));
                self.split_from(i + 1, &next, depth + 1, on_match, declarations, code);
                code.push_str("END IF;\n");
            }
            Some(Part::Column(column)) => match self.parts.get(i + 1) {
                Some(Part::Literal(text)) => {
                    let len = text.chars().count();
                    let (off, pos) = (format!("off_{depth}"), format!("pos_{depth}"));
                    declarations
                        .push_str(&format!("{off} integer;\n{pos} integer;\n{next} text;\n"));
                    code.push_str(&format!(
                        "{off} := 0;\nLOOP\n{pos} := strpos(substr({rest}, {off} + 1), {lit});\n\
                         EXIT WHEN {pos} = 0;\n\
                         v_{column} := left({rest}, {off} + {pos} - 1);\n\
                         {next} := substr({rest}, {off} + {pos} + {len});\n",
                        lit = quote_literal(text),
                    ));
                    self.split_from(i + 2, &next, depth + 1, on_match, declarations, code);
                    code.push_str(&format!("{off} := {off} + {pos};\nEND LOOP;\n"));
                }
                // The last part: the column takes the rest.
                _ => code.push_str(&format!("v_{column} := {rest};\n{on_match}\n")),
            },
        }
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
    fn matching_tries_every_occurrence_of_a_separator() {
        let t = SelectorTemplate::parse("run-schedule::{agent_id}::{id}").expect("valid");
        let (declarations, sql) = t.plpgsql_match("p_selector", "RETURN true;");
        assert!(
            sql.contains("IF left(p_selector, 14) = E'run-schedule::' THEN"),
            "{sql}"
        );
        assert!(sql.contains("LOOP"), "{sql}");
        assert!(
            sql.contains("v_agent_id := left(r_1, off_1 + pos_1 - 1);"),
            "{sql}"
        );
        assert!(sql.contains("v_id := r_2;"), "{sql}");
        assert!(declarations.contains("off_1 integer;"), "{declarations}");
    }
}
