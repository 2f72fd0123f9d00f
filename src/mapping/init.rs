//! `mappings init`: a starting mapping file read from existing tables, for
//! an operator to edit. The primary key becomes the selector, the first
//! single-column foreign key the parent, a nullable `deleted_at` timestamp
//! the live predicate; what cannot be decided from the catalog is printed
//! as a comment.
//!
//! Every name comes from the catalog, where anyone with CREATE could have
//! put anything: every value is written as an escaped TOML string, and a
//! name in a comment is written plain only when it is a plain identifier.

use std::collections::BTreeSet;

use sqlx::PgConnection;

use super::is_plain_identifier;

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("table {0} must be a plain lower-case SQL name, or schema.name (letters, digits, _)")]
    NotPlain(String),
    #[error("table {0} does not exist")]
    Missing(String),
    #[error("reading the catalog: {0}")]
    Database(#[from] sqlx::Error),
}

/// What the catalog says about one table.
#[derive(Debug, Clone)]
struct TableInfo {
    /// As given on the command line (`documents`, `crm.accounts`).
    written: String,
    schema: String,
    relname: String,
    /// (name, type as `format_type` writes it, NOT NULL), in column order.
    columns: Vec<(String, String, bool)>,
    primary_key: Vec<String>,
    /// (columns, referenced schema, referenced table), by constraint name.
    foreign_keys: Vec<(Vec<String>, String, String)>,
}

impl TableInfo {
    fn column(&self, name: &str) -> Option<&(String, String, bool)> {
        self.columns.iter().find(|c| c.0 == name)
    }
}

/// `s` as a TOML basic string: `"` and `\` escaped, every control
/// character (newline included) written as an escape.
pub fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A catalog name shown in a comment: as it is when plain, else quoted.
fn shown(s: &str) -> String {
    if is_plain_identifier(s) {
        s.to_string()
    } else {
        toml_string(s)
    }
}

fn is_table_name(s: &str) -> bool {
    match s.split_once('.') {
        Some((schema, table)) => is_plain_identifier(schema) && is_plain_identifier(table),
        None => is_plain_identifier(s),
    }
}

/// A SpiceDB definition name (what a mapping's type must be) that is also
/// a mapping name (at most 40).
fn is_type_name(s: &str) -> bool {
    s.len() >= 3
        && s.len() <= 40
        && is_plain_identifier(s)
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
}

/// The singular of a table name when it is obvious (`documents` →
/// `document`, `categories` → `category`), else the name itself.
fn singular(name: &str) -> String {
    if let Some(stem) = name.strip_suffix("ies")
        && !stem.is_empty()
    {
        return format!("{stem}y");
    }
    if name.ends_with("ss") || name.ends_with("us") || name.ends_with("is") {
        return name.to_string();
    }
    for suffix in ["ches", "shes", "xes", "sses"] {
        if let Some(stem) = name.strip_suffix(suffix) {
            return format!("{stem}{}", &suffix[..suffix.len() - 2]);
        }
    }
    match name.strip_suffix('s') {
        Some(stem) if !stem.is_empty() => stem.to_string(),
        _ => name.to_string(),
    }
}

/// A type name for a table: its singular, else its name, else one made to
/// fit (trimmed, lengthened).
pub fn type_name(relname: &str) -> String {
    let one = singular(relname);
    if is_type_name(&one) {
        return one;
    }
    if is_type_name(relname) {
        return relname.to_string();
    }
    let mut made: String = relname
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(30)
        .collect();
    made = made
        .trim_matches(|c: char| c == '_' || c.is_ascii_digit())
        .to_string();
    if made.is_empty() {
        made = "resource".into();
    }
    while made.starts_with(|c: char| !c.is_ascii_lowercase()) {
        made.remove(0);
    }
    if !is_type_name(&made) {
        made = format!("{made}_resource")
            .trim_start_matches('_')
            .to_string();
    }
    made
}

async fn read_table(conn: &mut PgConnection, written: &str) -> Result<TableInfo, InitError> {
    if !is_table_name(written) {
        return Err(InitError::NotPlain(toml_string(written)));
    }
    let found: Option<(i64, String, String)> = sqlx::query_as(
        "SELECT c.oid::bigint, n.nspname::text, c.relname::text
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.oid = to_regclass($1) AND c.relkind IN ('r', 'p')
           AND n.nspname NOT LIKE 'pg\\_temp\\_%'",
    )
    .bind(super::quote::table_name(written))
    .fetch_optional(&mut *conn)
    .await?;
    let Some((oid, schema, relname)) = found else {
        return Err(InitError::Missing(written.to_string()));
    };
    let columns: Vec<(String, String, bool)> = sqlx::query_as(
        "SELECT a.attname::text, pg_catalog.format_type(a.atttypid, a.atttypmod), a.attnotnull
         FROM pg_catalog.pg_attribute a
         WHERE a.attrelid = $1::bigint::oid AND a.attnum > 0 AND NOT a.attisdropped
         ORDER BY a.attnum",
    )
    .bind(oid)
    .fetch_all(&mut *conn)
    .await?;
    let primary_key: Vec<String> = sqlx::query_scalar(
        "SELECT a.attname::text
         FROM pg_catalog.pg_index i
         CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
         JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
         WHERE i.indrelid = $1::bigint::oid AND i.indisprimary
         ORDER BY k.ord",
    )
    .bind(oid)
    .fetch_all(&mut *conn)
    .await?;
    let foreign_keys: Vec<(Vec<String>, String, String)> = sqlx::query_as(
        "SELECT ARRAY(SELECT a.attname::text
                      FROM unnest(con.conkey) WITH ORDINALITY AS k(attnum, ord)
                      JOIN pg_catalog.pg_attribute a
                        ON a.attrelid = con.conrelid AND a.attnum = k.attnum
                      ORDER BY k.ord),
                rn.nspname::text, rc.relname::text
         FROM pg_catalog.pg_constraint con
         JOIN pg_catalog.pg_class rc ON rc.oid = con.confrelid
         JOIN pg_catalog.pg_namespace rn ON rn.oid = rc.relnamespace
         WHERE con.conrelid = $1::bigint::oid AND con.contype = 'f'
         ORDER BY con.conname",
    )
    .bind(oid)
    .fetch_all(&mut *conn)
    .await?;
    Ok(TableInfo {
        written: written.to_string(),
        schema,
        relname,
        columns,
        primary_key,
        foreign_keys,
    })
}

/// Columns that name a row's owner, in order of preference.
const OWNER_COLUMNS: [&str; 3] = ["owner_id", "user_id", "created_by"];

/// The starting mapping file for `tables`; with `spicedb`, relationships
/// and the switching off of built-ins whose table is missing.
pub async fn init(
    conn: &mut PgConnection,
    tables: &[String],
    spicedb: bool,
) -> Result<String, InitError> {
    let mut infos = Vec::new();
    for written in tables {
        infos.push(read_table(conn, written).await?);
    }
    // One type per table, distinct.
    let mut used = BTreeSet::new();
    let mut types = Vec::new();
    for info in &infos {
        let base = type_name(&info.relname);
        let mut name = base.clone();
        let mut n = 2;
        while !used.insert(name.clone()) {
            name = format!("{base}{n}");
            n += 1;
        }
        types.push(name);
    }
    let type_of = |schema: &str, relname: &str| {
        infos
            .iter()
            .zip(&types)
            .find(|(i, _)| i.schema == schema && i.relname == relname)
            .map(|(_, t)| t.clone())
            .unwrap_or_else(|| type_name(relname))
    };

    let mut out = String::from(
        "# A starting point written by `authz-outbox mappings init` from the\n\
         # tables' catalog: edit it, then `authz-outbox mappings check --mappings FILE`.\n",
    );
    if !spicedb {
        out.push_str(
            "# The agentex-auth target accepts only the types agent, api_key, task and\n\
             # schedule; other types need `--target spicedb`.\n",
        );
    }
    for (info, kind) in infos.iter().zip(&types) {
        out.push('\n');
        out.push_str(&format!(
            "# Table {}.{}.\n[[mapping]]\ntype = {}\ntable = {}\n",
            shown(&info.schema),
            shown(&info.relname),
            toml_string(kind),
            toml_string(&info.written),
        ));
        // The selector: the primary key.
        let key = &info.primary_key;
        let selector = if key.is_empty() {
            out.push_str("# No primary key: say which column(s) identify a row.\n");
            None
        } else if key.iter().all(|c| is_plain_identifier(c)) {
            let template = key
                .iter()
                .map(|c| format!("{{{c}}}"))
                .collect::<Vec<_>>()
                .join("::");
            if key.len() > 1 {
                out.push_str("# The composite primary key, joined by a literal \"::\".\n");
            }
            out.push_str(&format!("selector = {}\n", toml_string(&template)));
            Some(template)
        } else {
            let list: Vec<String> = key.iter().map(|c| shown(c)).collect();
            out.push_str(&format!(
                "# The primary key ({}) is not made of plain column names; a selector cannot name it.\n",
                list.join(", ")
            ));
            None
        };
        // The parent: the first single-column foreign key to a plain column.
        let mut parent: Option<(String, String)> = None;
        let mut others = Vec::new();
        for (cols, ref_schema, ref_table) in &info.foreign_keys {
            let target = format!("{}.{}", shown(ref_schema), shown(ref_table));
            if parent.is_none() && cols.len() == 1 && is_plain_identifier(&cols[0]) {
                parent = Some((type_of(ref_schema, ref_table), cols[0].clone()));
            } else {
                let list: Vec<String> = cols.iter().map(|c| shown(c)).collect();
                others.push(format!("({}) -> {target}", list.join(", ")));
            }
        }
        if let Some((ptype, column)) = &parent {
            out.push_str(&format!(
                "parent = {{ type = {}, column = {} }}\n",
                toml_string(ptype),
                toml_string(column)
            ));
        }
        for other in &others {
            out.push_str(&format!("# another foreign key: {other}\n"));
        }
        // Liveness.
        if let Some((_, ty, not_null)) = info.column("deleted_at")
            && ty.starts_with("timestamp")
            && !not_null
        {
            out.push_str("live = \"deleted_at IS NULL\"\n");
        }
        if info.column("status").is_some() {
            out.push_str(
                "# A status column: say which statuses are live, e.g.\n\
                 # live = \"status IS DISTINCT FROM 'DELETED'\"\n",
            );
        }
        if spicedb {
            let resource = match &selector {
                Some(s) if key.len() == 1 => format!("{kind}:{s}#"),
                _ => String::new(),
            };
            let owner_column = OWNER_COLUMNS.iter().find(|c| info.column(c).is_some());
            let owner = owner_column
                .map(|c| format!("{{{c}}}"))
                .unwrap_or_else(|| "{principal.user_id}".into());
            out.push_str(&format!(
                "relationships = [\n    {},\n",
                toml_string(&format!("{resource}owner@user:{owner}"))
            ));
            if let Some((ptype, column)) = &parent {
                out.push_str(&format!(
                    "    # {},\n",
                    toml_string(&format!("{resource}{ptype}@{ptype}:{{{column}}}"))
                ));
            }
            out.push_str("]\n");
            if owner_column.is_some() {
                out.push_str(
                    "# The owner is a column: no writer needs naming (no set_config).\n\
                     creator = []\n",
                );
            }
        }
    }
    if spicedb {
        let mut first = true;
        for builtin in super::Mappings::builtin().iter() {
            if used.contains(&builtin.name) {
                continue;
            }
            let exists: Option<i64> =
                sqlx::query_scalar("SELECT 1::bigint WHERE to_regclass($1) IS NOT NULL")
                    .bind(super::quote::table_name(&builtin.table))
                    .fetch_optional(&mut *conn)
                    .await?;
            if exists.is_some() {
                continue;
            }
            if first {
                out.push_str(
                    "\n# This database has none of these agentex tables: the built-in\n\
                     # mappings for them are switched off.\n",
                );
                first = false;
            }
            out.push_str(&format!(
                "[[mapping]]\ntype = {}\ntable = {}\nenabled = false\n\n",
                toml_string(builtin.resource_type.as_str()),
                toml_string(&builtin.table),
            ));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_survive_toml() {
        for s in ["plain", "a\"b", "a\\b", "line\nbreak", "\u{7f}\u{1}x", "é"] {
            let doc = format!("v = {}", toml_string(s));
            let back: toml::Table = toml::from_str(&doc).expect(&doc);
            assert_eq!(back["v"].as_str(), Some(s), "{doc}");
        }
    }

    #[test]
    fn type_names_are_singular_when_obvious() {
        assert_eq!(type_name("documents"), "document");
        assert_eq!(type_name("categories"), "category");
        assert_eq!(type_name("boxes"), "box");
        assert_eq!(type_name("status"), "status");
        assert_eq!(type_name("staff"), "staff");
        assert_eq!(type_name("ab"), "ab_resource");
        assert_eq!(type_name("x_"), "x_resource");
    }
}
