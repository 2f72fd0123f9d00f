//! The one path by which configuration text reaches SQL.
//!
//! Mapping names, table and column names, templates, principal fields and
//! type names are data until they pass through here. Each form is chosen to
//! mean the same thing whatever the session settings of whoever runs the
//! SQL later (`migrate --print-sql` output applied by a host's own tooling):
//! - identifiers are always double-quoted;
//! - literals are `E'…'` strings with both `\` and `'` escaped, so
//!   `standard_conforming_strings` cannot change where they end;
//! - function bodies are dollar-quoted with a tag the body does not
//!   contain, so no text inside a body can end it.

/// `name` as a quoted SQL identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `schema.name`, both quoted.
pub fn qualified(schema: &str, name: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(name))
}

/// A table named as a mapping names it (`table` or `schema.table`), each
/// part quoted: `"crm"."accounts"`, or `"tasks"` (resolved through the
/// search path).
pub fn table_name(written: &str) -> String {
    match written.split_once('.') {
        Some((schema, table)) => qualified(schema, table),
        None => quote_ident(written),
    }
}

/// `text` as a SQL string literal that ends where it is meant to under any
/// `standard_conforming_strings`. A NUL (which PostgreSQL text cannot hold)
/// is dropped.
pub fn quote_literal(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 3);
    out.push_str("E'");
    for c in text.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            '\0' => {}
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// `body` dollar-quoted with the first tag of `$fn$`, `$fn1$`, `$fn2$`, …
/// that does not occur in it: nothing in the body can close the quote.
pub fn dollar_quote(body: &str) -> String {
    let mut n = 0usize;
    loop {
        let tag = if n == 0 {
            "$fn$".to_string()
        } else {
            format!("$fn{n}$")
        };
        if !body.contains(&tag) {
            return format!("{tag}{body}{tag}");
        }
        n += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_literal_ends_where_it_should_whatever_the_backslashes() {
        assert_eq!(quote_literal("it's"), "E'it''s'");
        assert_eq!(quote_literal(r"a\'; DROP"), r"E'a\\''; DROP'");
        assert_eq!(quote_literal("a\0b"), "E'ab'");
    }

    #[test]
    fn a_body_cannot_close_its_own_quote() {
        assert_eq!(dollar_quote("SELECT 1"), "$fn$SELECT 1$fn$");
        let quoted = dollar_quote("x $fn$ y $fn1$ z");
        assert_eq!(quoted, "$fn2$x $fn$ y $fn1$ z$fn2$");
    }

    #[test]
    fn identifiers_are_always_quoted() {
        assert_eq!(quote_ident(r#"a"b"#), r#""a""b""#);
        assert_eq!(qualified("public", "t"), r#""public"."t""#);
    }
}
