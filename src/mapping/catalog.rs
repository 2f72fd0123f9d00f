//! What the live database says about a mapping's tables, and whether the
//! mapping fits them. Reading the catalog and compiling the mapping's
//! expressions take only the locks a plain `SELECT` takes, so
//! `mappings check` is safe to run against a busy host.

use std::collections::{BTreeMap, BTreeSet};

// Dynamic SQL here is built from a validated mapping: identifiers are plain
// lower-case names (quoted anyway) and the predicate is an operator's own
// configuration, lexed to one expression (see `predicate`).
use sqlx::{AssertSqlSafe, PgConnection};

use super::quote::quote_ident;
use super::{CreatorSource, Mapping};

/// The columns of one table, with their types as `format_type` writes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// As the mapping names it (`tasks`, `crm.accounts`).
    pub name: String,
    /// The table's own name in its schema.
    pub relname: String,
    /// The schema the name resolved to when the mapping was checked: the
    /// generated SQL names the table with it, never through a search path.
    pub schema: String,
    pub columns: BTreeMap<String, String>,
}

impl Table {
    /// `"schema"."name"`.
    pub fn qualified(&self) -> String {
        super::quote::qualified(&self.schema, &self.relname)
    }

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
    /// The schema of authz-outbox's own objects (where `authz_outbox` is).
    pub schema: String,
    pub mapping: Mapping,
    pub table: Table,
    pub join: Option<Table>,
    /// The creation-time column, if any (explicit, or `created_at`).
    pub created_at: Option<String>,
}

impl Resolved {
    /// The parent's selector for the row `q`, or `None` for a parentless type.
    /// Through a join table, the lowest linked id (the host links a task to
    /// one agent; the rule only makes more links deterministic).
    pub fn parent_sql(&self, q: &str) -> Option<String> {
        let parent = self.mapping.parent.as_ref()?;
        Some(match &parent.join {
            None => format!("{q}.{}::text", quote_ident(&parent.column)),
            Some(join) => format!(
                "(SELECT min(j.{col}::text) FROM {jt} AS j WHERE j.{on} = {q}.{refs})",
                col = quote_ident(&parent.column),
                jt = self
                    .join
                    .as_ref()
                    .map(|t| t.qualified())
                    .unwrap_or_else(|| quote_ident(&join.table)),
                on = quote_ident(&join.on),
                refs = quote_ident(&join.references),
            ),
        })
    }
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
    // The name resolves through the caller's search path (a host names its
    // tables as its own code does); the column types are then written as
    // the generated functions will read them, with only the catalog on the
    // path, so a type of the host's own (a domain, an enum) comes back
    // qualified (`public.taskstatus`).
    let oid: Option<i64> = sqlx::query_scalar(
        "SELECT c.oid::bigint FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.oid = to_regclass($1) AND c.relkind IN ('r', 'p')
           AND n.nspname NOT LIKE 'pg\\_temp\\_%'",
    )
    .bind(super::quote::table_name(name))
    .fetch_optional(&mut *conn)
    .await?;
    let Some(oid) = oid else {
        return Ok(None);
    };
    let saved = pin_path(conn).await?;
    let rows: Vec<(String, String, String, String)> = sqlx::query_as(
        "SELECT a.attname::text, pg_catalog.format_type(a.atttypid, a.atttypmod), n.nspname::text,
                c.relname::text
         FROM pg_catalog.pg_attribute a
         JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
         WHERE a.attrelid = $1::bigint::oid AND a.attnum > 0 AND NOT a.attisdropped
         ORDER BY a.attnum",
    )
    .bind(oid)
    .fetch_all(&mut *conn)
    .await?;
    restore_path(conn, saved).await?;
    let Some((schema, relname)) = rows.first().map(|r| (r.2.clone(), r.3.clone())) else {
        return Ok(None);
    };
    Ok(Some(Table {
        name: name.to_string(),
        relname,
        schema,
        columns: rows.into_iter().map(|(c, t, _, _)| (c, t)).collect(),
    }))
}

/// The schema of authz-outbox's own objects: where `authz_outbox` is, or
/// (before the migrations ran, for `--print-sql`) where they will be.
pub async fn outbox_schema(conn: &mut PgConnection) -> Result<String, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT coalesce(
            (SELECT n.nspname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.oid = to_regclass('authz_outbox') AND n.nspname NOT LIKE 'pg\\_temp\\_%'),
            current_schema()::text)",
    )
    .fetch_one(conn)
    .await
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
        schema: outbox_schema(conn).await?,
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
    // Compiled as the generated functions will run it: with only the
    // system catalog on the search path, so a predicate that needs a type
    // or function of another schema says so here, and names it.
    let sql = format!(
        "SELECT pg_catalog.pg_typeof(({live}))::text FROM (SELECT 1) AS one LEFT JOIN {table} AS t ON false",
        table = resolved.table.qualified(),
    );
    let saved = pin_path(conn).await?;
    let compiled: Result<String, sqlx::Error> = sqlx::query_scalar(AssertSqlSafe(sql))
        .fetch_one(&mut *conn)
        .await;
    let compiled = match compiled {
        Ok(kind) => restore_path(conn, saved.clone()).await.map(|_| kind),
        Err(e) => Err(e),
    };
    let kind: String = match compiled {
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
        parent = resolved.parent_sql("t").unwrap_or_else(|| "NULL".into()),
        table = resolved.table.qualified(),
    );
    pin_path(conn).await?;
    let probed = sqlx::query(AssertSqlSafe(probe)).execute(&mut *conn).await;
    let probed = match probed {
        Ok(_) => restore_path(conn, saved).await,
        Err(e) => Err(e),
    };
    if let Err(e) = probed {
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

/// Sets `search_path` to the system catalog alone (what every generated
/// function pins) and a statement timeout (a predicate probe never blocks
/// a check); returns what to restore.
async fn pin_path(conn: &mut PgConnection) -> Result<(String, String), sqlx::Error> {
    sqlx::query_as(
        "SELECT current_setting('search_path'), current_setting('statement_timeout'),
                set_config('search_path', 'pg_catalog, pg_temp', false),
                set_config('statement_timeout', '5s', false)",
    )
    .fetch_one(conn)
    .await
    .map(|(path, timeout, _, _): (String, String, String, String)| (path, timeout))
}

async fn restore_path(conn: &mut PgConnection, saved: (String, String)) -> Result<(), sqlx::Error> {
    sqlx::query(
        "SELECT set_config('search_path', $1, false), set_config('statement_timeout', $2, false)",
    )
    .bind(saved.0)
    .bind(saved.1)
    .execute(conn)
    .await
    .map(|_| ())
}
