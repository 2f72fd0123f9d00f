//! What the live database says about a mapping's tables, and whether the
//! mapping fits them. Reading the catalog and compiling the mapping's
//! expressions take only the locks a plain `SELECT` takes, so
//! `mappings check` is safe to run against a busy host.

use std::collections::{BTreeMap, BTreeSet};

// Dynamic SQL here is built from a validated mapping: identifiers are plain
// lower-case names (quoted anyway) and the predicate is an operator's own
// configuration, lexed to one expression (see `predicate`).
use sqlx::{AssertSqlSafe, PgConnection};

use super::{CreatorSource, Mapping};

/// The columns of one table, with their types as `format_type` writes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub name: String,
    pub columns: BTreeMap<String, String>,
}

impl Table {
    pub fn column_names(&self) -> BTreeSet<String> {
        self.columns.keys().cloned().collect()
    }

    pub fn has(&self, column: &str) -> bool {
        self.columns.contains_key(column)
    }
}

/// A mapping with the tables it reads, checked against each other.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub mapping: Mapping,
    pub table: Table,
    pub join: Option<Table>,
    /// The creation-time column, if any (explicit, or `created_at`).
    pub created_at: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("mapping {name}: {message}")]
    Mismatch { name: String, message: String },
    #[error("mapping {name}: table {table} does not exist")]
    MissingTable { name: String, table: String },
    #[error("reading the catalog: {0}")]
    Database(#[from] sqlx::Error),
}

fn mismatch(mapping: &Mapping, message: impl Into<String>) -> CatalogError {
    CatalogError::Mismatch {
        name: mapping.name.clone(),
        message: message.into(),
    }
}

/// Reads a table (in the search path) or `None` when there is none.
pub async fn table(conn: &mut PgConnection, name: &str) -> Result<Option<Table>, sqlx::Error> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod)
         FROM pg_attribute a
         WHERE a.attrelid = to_regclass(quote_ident($1))
           AND a.attnum > 0 AND NOT a.attisdropped
           AND (SELECT relkind FROM pg_class WHERE oid = a.attrelid) IN ('r', 'p')
         ORDER BY a.attnum",
    )
    .bind(name)
    .fetch_all(conn)
    .await?;
    if rows.is_empty() {
        return Ok(None);
    }
    Ok(Some(Table {
        name: name.to_string(),
        columns: rows.into_iter().collect(),
    }))
}

/// Resolves a mapping against the database: `Ok(None)` for an optional
/// mapping whose table is absent (a host without that feature).
pub async fn resolve(
    conn: &mut PgConnection,
    mapping: &Mapping,
) -> Result<Option<Resolved>, CatalogError> {
    let Some(main) = table(conn, &mapping.table).await? else {
        if mapping.optional {
            return Ok(None);
        }
        return Err(CatalogError::MissingTable {
            name: mapping.name.clone(),
            table: mapping.table.clone(),
        });
    };
    for column in mapping.selector.columns() {
        require_column(mapping, &main, column, "selector column")?;
        require_scalar(mapping, &main, column, "selector column")?;
    }
    for column in super::relationships::attribute_columns(&mapping.relationships) {
        require_column(mapping, &main, &column, "relationship subject column")?;
        require_scalar(mapping, &main, &column, "relationship subject column")?;
    }
    for source in &mapping.creator {
        if let CreatorSource::Column(column) = source {
            require_column(mapping, &main, column, "creator column")?;
            let kind = &main.columns[column];
            if !matches!(kind.as_str(), "json" | "jsonb" | "text") && !kind.starts_with("character")
            {
                return Err(mismatch(
                    mapping,
                    format!(
                        "creator column {column} is {kind}; it must hold a JSON object (json, jsonb or text)"
                    ),
                ));
            }
        }
    }
    let join = match &mapping.parent {
        None => None,
        Some(parent) => match &parent.join {
            None => {
                require_column(mapping, &main, &parent.column, "parent column")?;
                require_scalar(mapping, &main, &parent.column, "parent column")?;
                None
            }
            Some(spec) => {
                let Some(join) = table(conn, &spec.table).await? else {
                    return Err(mismatch(
                        mapping,
                        format!("parent join table {} does not exist", spec.table),
                    ));
                };
                require_column(mapping, &join, &spec.on, "parent join column")?;
                require_column(mapping, &join, &parent.column, "parent column")?;
                require_scalar(mapping, &join, &parent.column, "parent column")?;
                require_column(
                    mapping,
                    &main,
                    &spec.references,
                    "parent join's referenced column",
                )?;
                if join.columns[&spec.on] != main.columns[&spec.references] {
                    return Err(mismatch(
                        mapping,
                        format!(
                            "{}.{} is {} but {}.{} is {}; the join needs the same type",
                            join.name,
                            spec.on,
                            join.columns[&spec.on],
                            main.name,
                            spec.references,
                            main.columns[&spec.references]
                        ),
                    ));
                }
                Some(join)
            }
        },
    };
    let created_at = match &mapping.created_at {
        Some(column) => {
            require_column(mapping, &main, column, "created_at column")?;
            Some(column.clone())
        }
        None => main.has("created_at").then(|| "created_at".to_string()),
    };
    let resolved = Resolved {
        mapping: mapping.clone(),
        table: main,
        join,
        created_at,
    };
    compile(conn, &resolved).await?;
    Ok(Some(resolved))
}

fn require_column(
    mapping: &Mapping,
    table: &Table,
    column: &str,
    what: &str,
) -> Result<(), CatalogError> {
    if table.has(column) {
        Ok(())
    } else {
        Err(mismatch(
            mapping,
            format!("{what} {column} does not exist in table {}", table.name),
        ))
    }
}

/// Selectors and parents are one value each: not an array, a JSON document
/// or a composite.
fn require_scalar(
    mapping: &Mapping,
    table: &Table,
    column: &str,
    what: &str,
) -> Result<(), CatalogError> {
    let kind = &table.columns[column];
    if kind.ends_with("[]") || matches!(kind.as_str(), "json" | "jsonb" | "bytea" | "xml") {
        return Err(mismatch(
            mapping,
            format!(
                "{what} {}.{column} is {kind}; it must hold one id (text, varchar, uuid or an integer)",
                table.name
            ),
        ));
    }
    Ok(())
}

/// Has PostgreSQL compile the mapping's expressions against the real
/// tables (no row is read): a predicate that does not parse, names a
/// column that is not there, or is not boolean fails here with
/// PostgreSQL's own words.
async fn compile(conn: &mut PgConnection, resolved: &Resolved) -> Result<(), CatalogError> {
    let live = match &resolved.mapping.live {
        Some(p) => p.qualified("t", &resolved.table.column_names()),
        None => "true".into(),
    };
    let sql = format!(
        "SELECT pg_typeof(({live}))::text FROM (SELECT 1) AS one LEFT JOIN {table} AS t ON false",
        table = super::predicate::quote_ident(&resolved.table.name),
    );
    let kind: String = match sqlx::query_scalar(AssertSqlSafe(sql))
        .fetch_one(&mut *conn)
        .await
    {
        Ok(kind) => kind,
        Err(e) => {
            let message = e
                .as_database_error()
                .map(|d| d.message().to_string())
                .unwrap_or_else(|| e.to_string());
            return Err(mismatch(
                &resolved.mapping,
                format!("live predicate does not compile: {message}"),
            ));
        }
    };
    if kind != "boolean" {
        return Err(mismatch(
            &resolved.mapping,
            format!("live predicate is {kind}, not boolean"),
        ));
    }
    let probe = format!(
        "SELECT {selector}, {parent} FROM {table} AS t LIMIT 0",
        selector = resolved.mapping.selector.sql("t"),
        parent = super::ddl::parent_sql(resolved, "t").unwrap_or_else(|| "NULL".into()),
        table = super::predicate::quote_ident(&resolved.table.name),
    );
    if let Err(e) = sqlx::query(AssertSqlSafe(probe)).execute(&mut *conn).await {
        let message = e
            .as_database_error()
            .map(|d| d.message().to_string())
            .unwrap_or_else(|| e.to_string());
        return Err(mismatch(
            &resolved.mapping,
            format!("selector or parent does not compile: {message}"),
        ));
    }
    Ok(())
}
