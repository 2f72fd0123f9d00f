//! The SQL a mapping becomes. Everything here is generated from validated
//! names (plain identifiers, quoted anyway) and from the live predicate,
//! which PostgreSQL has compiled against the table before any of it runs
//! (see [`super::catalog`]).
//!
//! Per mapping `N` on table `T`:
//! - `authz_outbox_capture__N()`, fired by four triggers on `T`:
//!   `…__insert` (only for rows inserted live), `…__delete` (only for rows
//!   deleted live), `…__update` (only `OF` the live predicate's columns,
//!   only `WHEN` liveness changed) and `…__update_identity` (only `OF` the
//!   selector, parent and attribute columns, only `WHEN` one of them
//!   changed and liveness did not) — so the host's hottest writes (a task
//!   going RUNNING → COMPLETED, an `updated_at` touch) never call a
//!   function at all, and compile no more `WHEN` than the liveness test;
//! - with a join-table parent, `authz_outbox_capture__N__parent()` on the
//!   join table and its helper `authz_outbox_reparent__N(…)`;
//! - `authz_outbox_live__N(selector, parent)`: is this resource live (with
//!   this parent) right now? Used by the worker, replay and reconcile.
//!
//! And across all mappings: `authz_outbox_resource_live(type, selector,
//! parent)` and the view `authz_outbox_desired` (what SpiceDB should hold).

use super::catalog::Resolved;
use super::core::CaptureMode;
use super::quote::{dollar_quote, qualified, quote_ident, quote_literal};
use super::{CreatorSource, IDENTITY_FIELDS};

/// How every generated function that runs as its owner starts: it is
/// SECURITY DEFINER so a host writer needs no privilege on the outbox, and
/// its `search_path` holds only the system catalog (then `pg_temp`, named
/// last so a session's temporary table can never stand in for ours). Every
/// table and function it names carries its schema; operators and built-in
/// functions then resolve in `pg_catalog` alone, so nothing a caller
/// creates - a table, a function, an exact-type `=` on an enum - is ever
/// chosen in its place.
pub const DEFINER: &str = "SECURITY DEFINER SET search_path = pg_catalog, pg_temp";

/// One of our objects, by its qualified name.
fn ours(r: &Resolved, name: &str) -> String {
    qualified(&r.schema, name)
}

/// Names of what a mapping installs, so it can be removed again.
pub fn capture_function(name: &str) -> String {
    format!("authz_outbox_capture__{name}")
}
fn parent_function(name: &str) -> String {
    format!("authz_outbox_capture__{name}__parent")
}
fn reparent_function(name: &str) -> String {
    format!("authz_outbox_reparent__{name}")
}
pub fn live_function(name: &str) -> String {
    format!("authz_outbox_live__{name}")
}
fn truncate_function(name: &str) -> String {
    format!("authz_outbox_truncate__{name}")
}
fn parent_truncate_function(name: &str) -> String {
    format!("authz_outbox_truncate__{name}__parent")
}
fn trigger(name: &str, event: &str) -> String {
    format!("authz_outbox__{name}__{event}")
}

/// Every function and trigger name a mapping called `name` generates. Each
/// must fit PostgreSQL's 63 bytes (a longer one is silently cut, and two
/// cut names can meet) and differ from every other mapping's (a mapping
/// named `x__parent` would otherwise own `x`'s parent function).
pub fn generated_names(name: &str) -> Vec<String> {
    let mut names = vec![
        capture_function(name),
        parent_function(name),
        reparent_function(name),
        live_function(name),
        truncate_function(name),
        parent_truncate_function(name),
    ];
    for event in [
        "insert",
        "delete",
        "update",
        "update_identity",
        "truncate",
        "parent",
        "parent_truncate",
    ] {
        names.push(trigger(name, event));
    }
    names
}

/// PostgreSQL's longest identifier, in bytes.
pub const MAX_IDENTIFIER_BYTES: usize = 63;

/// `coalesce(<predicate>, false)` over the row `q`, or `true` when every
/// row is live. A predicate that is NULL for a row counts as not live.
pub fn live_sql(r: &Resolved, q: &str) -> String {
    match &r.mapping.live {
        None => "true".into(),
        Some(p) => format!(
            "coalesce(({}), false)",
            p.qualified(q, &r.table.column_names())
        ),
    }
}

fn parent_type_sql(r: &Resolved) -> String {
    match &r.mapping.parent {
        Some(p) => quote_literal(p.resource_type.as_str()),
        None => "NULL".into(),
    }
}

fn fields_sql(r: &Resolved) -> String {
    let fields: Vec<String> = r
        .mapping
        .principal_fields
        .iter()
        .map(|f| quote_literal(f))
        .collect();
    format!("ARRAY[{}]::text[]", fields.join(", "))
}

/// `principal_source` of the rows of a `creator = []` mapping.
pub const NO_CREATOR_NEEDED: &str = "not_needed";

/// PL/pgSQL statements that set `who` to the creator of a write to the row
/// `q`, reduced to the kept fields, and `src` to where it came from
/// (`setting`, `role_default`, `column:<name>`): recorded on the outbox row
/// as `principal_source`, so a host that writes everything as its role
/// default is visible at a glance.
fn creator_sql(r: &Resolved, q: &str, who: &str, src: &str) -> String {
    if r.mapping.creator.is_empty() {
        // `creator = []`: nobody to name. The source tells the enqueue that
        // a row without a creator is expected, not a writer's mistake.
        return format!(
            "{who} := NULL; {src} := {};",
            quote_literal(NO_CREATOR_NEEDED)
        );
    }
    let setting_source = format!("{}()", ours(r, "authz_outbox_setting_source"));
    if creator_is_the_setting(r) {
        // The common case keeps its fast path (no array, no loop).
        return format!(
            "{who} := {}(); {src} := {setting_source};",
            ours(r, "authz_outbox_current_principal")
        );
    }
    let (sources, labels): (Vec<String>, Vec<String>) = r
        .mapping
        .creator
        .iter()
        .map(|s| match s {
            CreatorSource::Setting => (
                format!("{}()", ours(r, "authz_outbox_setting_principal")),
                setting_source.clone(),
            ),
            CreatorSource::Column(c) => (
                format!(
                    "{}({q}.{}::text)",
                    ours(r, "authz_outbox_parse_jsonb"),
                    quote_ident(c)
                ),
                quote_literal(&format!("column:{c}")),
            ),
        })
        .unzip();
    format!(
        "SELECT c.who, c.source INTO {who}, {src} FROM {pick}(ARRAY[{}]::jsonb[], ARRAY[{}]::text[], {}) AS c;",
        sources.join(", "),
        labels.join(", "),
        fields_sql(r),
        pick = ours(r, "authz_outbox_pick_creator"),
    )
}

/// Whether the mapping's creator is the writing transaction's setting alone,
/// kept to the identity fields: the common case, with fast paths.
fn creator_is_the_setting(r: &Resolved) -> bool {
    r.mapping.creator == [CreatorSource::Setting]
        && r.mapping
            .principal_fields
            .iter()
            .map(String::as_str)
            .eq(IDENTITY_FIELDS.iter().copied())
}

/// PL/pgSQL statements that register the resource `sel` under `parent`
/// with the creator of the write to the row `q`. When the creator is the
/// setting alone: in WAL mode the message itself, emitted here (see
/// [`super::core::wal_register`]), in table mode one call of
/// [`super::core::REGISTER`], which resolves the creator. Else the creator
/// resolved here and [`super::core::ENQUEUE`].
fn register_sql(
    r: &Resolved,
    mode: CaptureMode,
    q: &str,
    sel: &str,
    parent: &str,
    attrs: &str,
) -> String {
    let rtype = quote_literal(r.mapping.resource_type.as_str());
    let ptype = parent_type_sql(r);
    if creator_is_the_setting(r) {
        return match mode {
            CaptureMode::Wal => super::core::wal_register(&rtype, sel, &ptype, parent, attrs),
            CaptureMode::Table => format!(
                "enqueued := {}({rtype}, {sel}, {ptype}, {parent}, {attrs});",
                ours(r, super::core::REGISTER)
            ),
        };
    }
    format!(
        "{}\n        enqueued := {}('register', {rtype}, {sel}, {ptype}, {parent}, who, src, {attrs});",
        creator_sql(r, q, "who", "src"),
        ours(r, super::core::ENQUEUE)
    )
}

/// The creator the row itself records (column sources only), for backfill.
fn row_creator_sql(r: &Resolved, q: &str) -> String {
    let sources: Vec<String> = r
        .mapping
        .creator
        .iter()
        .filter_map(|s| match s {
            CreatorSource::Column(c) => Some(format!(
                "{}({q}.{}::text)",
                ours(r, "authz_outbox_parse_jsonb"),
                quote_ident(c)
            )),
            CreatorSource::Setting => None,
        })
        .collect();
    if sources.is_empty() {
        "NULL::jsonb".into()
    } else {
        format!(
            "{}(ARRAY[{}]::jsonb[], {})",
            ours(r, "authz_outbox_first_creator"),
            sources.join(", "),
            fields_sql(r)
        )
    }
}

/// The columns (besides the parent's) whose values the mapping's
/// relationships need.
pub fn attribute_columns(r: &Resolved) -> Vec<String> {
    super::relationships::attribute_columns(&r.mapping.relationships)
        .into_iter()
        .collect()
}

/// `jsonb_build_object('col', q.col::text, ...)` of the attribute columns.
fn attributes_sql(r: &Resolved, q: &str) -> String {
    let pairs: Vec<String> = attribute_columns(r)
        .iter()
        .map(|c| format!("{}, {q}.{}::text", quote_literal(c), quote_ident(c)))
        .collect();
    format!("jsonb_build_object({})", pairs.join(", "))
}

/// Columns that make up the selector, lead to the parent, or name a
/// relationship's subject.
fn identity_columns(r: &Resolved) -> Vec<String> {
    let mut columns = r.mapping.selector.column_set();
    columns.extend(attribute_columns(r));
    if let Some(parent) = &r.mapping.parent {
        match &parent.join {
            None => {
                columns.insert(parent.column.clone());
            }
            Some(join) => {
                columns.insert(join.references.clone());
            }
        }
    }
    columns.into_iter().collect()
}

/// Statements that install a mapping's capture and lookup (run in order,
/// in one transaction, after [`drop_statements`] of its previous version).
pub fn install_statements(r: &Resolved, mode: CaptureMode) -> Vec<String> {
    let m = &r.mapping;
    let name = &m.name;
    let table = r.table.qualified();
    let rtype = quote_literal(m.resource_type.as_str());
    let ptype = parent_type_sql(r);
    let parent_old = r.parent_sql("OLD").unwrap_or_else(|| "NULL".into());
    let parent_new = r.parent_sql("NEW").unwrap_or_else(|| "NULL".into());
    // A resource with a parent is registered only once it has one: the host
    // inserts a task before its task_agents row.
    let has_parent = if m.parent.is_some() {
        " AND new_parent IS NOT NULL"
    } else {
        ""
    };
    // Columns the relationships need besides the parent's: captured into
    // `attributes` (and a change to one re-registers, like a new parent).
    let attrs = !attribute_columns(r).is_empty();
    let enqueue = ours(r, "authz_outbox_capture_enqueue");
    let mut out = Vec::new();
    let body = format!(
        r#"
DECLARE
    old_live   boolean := false;
    new_live   boolean := false;
    old_sel    text;
    new_sel    text;
    old_parent text;
    new_parent text;
    old_attrs  jsonb;
    new_attrs  jsonb;
    who        jsonb;
    src        text;
    raw        text;
    defaults   text;
    enqueued   boolean;
BEGIN
    -- A host's creation, the hot path: a register at most, and nothing to
    -- compare with (its trigger's WHEN has checked the predicate already;
    -- checked again here, as it costs next to nothing).
    IF TG_OP = 'INSERT' THEN
        new_sel := {sel_new};
        new_parent := {parent_new};{attrs_new}
        IF {live_new} AND new_sel IS NOT NULL{has_parent} THEN
            {register_new}
        END IF;
        RETURN NULL;
    END IF;
    old_live := {live_old};
    old_sel := {sel_old};
    old_parent := {parent_old};{attrs_old}
    IF TG_OP <> 'DELETE' THEN
        new_live := {live_new};
        new_sel := {sel_new};
        new_parent := {parent_new};{attrs_new}
    END IF;
    -- A live resource that stops being live, or moves, is deregistered
    -- (whether or not it had a parent: a cascade may have removed the link
    -- already, and a deregister of nothing is harmless).
    IF old_live AND old_sel IS NOT NULL
       AND (NOT new_live OR old_sel IS DISTINCT FROM new_sel OR old_parent IS DISTINCT FROM new_parent
            OR old_attrs IS DISTINCT FROM new_attrs) THEN
        {who_old}
        enqueued := {enqueue}('deregister', {rtype}, old_sel, {ptype}, old_parent, who, src, old_attrs);
    END IF;
    IF new_live AND new_sel IS NOT NULL{has_parent}
       AND (NOT old_live OR old_sel IS DISTINCT FROM new_sel OR old_parent IS DISTINCT FROM new_parent
            OR old_attrs IS DISTINCT FROM new_attrs) THEN
        {register_new}
    END IF;
    RETURN NULL;
END
"#,
        live_old = live_sql(r, "OLD"),
        live_new = live_sql(r, "NEW"),
        sel_old = m.selector.sql("OLD"),
        sel_new = m.selector.sql("NEW"),
        who_old = creator_sql(r, "OLD", "who", "src"),
        register_new = register_sql(r, mode, "NEW", "new_sel", "new_parent", "new_attrs"),
        attrs_old = if attrs {
            format!("\n        old_attrs := {};", attributes_sql(r, "OLD"))
        } else {
            String::new()
        },
        attrs_new = if attrs {
            format!("\n        new_attrs := {};", attributes_sql(r, "NEW"))
        } else {
            String::new()
        },
    );
    out.push(format!(
        "CREATE OR REPLACE FUNCTION {func}() RETURNS trigger\nLANGUAGE plpgsql {DEFINER} AS {body}",
        func = ours(r, &capture_function(name)),
        body = dollar_quote(&body),
    ));
    let func = ours(r, &capture_function(name));
    let when = |live: String| {
        if m.live.is_some() {
            format!(" WHEN ({live})")
        } else {
            String::new()
        }
    };
    out.push(format!(
        "CREATE TRIGGER {trg} AFTER INSERT ON {table} FOR EACH ROW{when} EXECUTE FUNCTION {func}()",
        trg = quote_ident(&trigger(name, "insert")),
        when = when(live_sql(r, "NEW")),
    ));
    out.push(format!(
        "CREATE TRIGGER {trg} AFTER DELETE ON {table} FOR EACH ROW{when} EXECUTE FUNCTION {func}()",
        trg = quote_ident(&trigger(name, "delete")),
        when = when(live_sql(r, "OLD")),
    ));
    out.extend(update_triggers(r, &func));
    out.extend(truncate_statements(r));
    if let (Some(parent), Some(join_table)) = (&m.parent, &r.join)
        && let Some(join) = &parent.join
    {
        out.extend(join_statements(r, mode, parent, join, join_table));
    }
    out.push(lookup_statement(r));
    out
}

/// The two update triggers, which never both fire for one row:
///
/// - `…__update`, `OF` the columns the live predicate reads, `WHEN` the
///   predicate's value changed;
/// - `…__update_identity`, `OF` the selector, parent and attribute columns,
///   `WHEN` one of them changed and the predicate's value did not.
///
/// Why two: PostgreSQL compiles a row trigger's `WHEN` clause once per
/// statement (it re-reads the stored expression tree and prepares it), and
/// every host write is its own one-row statement, so the compile is paid per
/// write whenever the statement's SET list names a column of the trigger's
/// `OF` list. The host's hottest write (`SET status = 'COMPLETED',
/// updated_at = now()`) names `status`; it now compiles only the liveness
/// test, as small as the predicate allows, and never the identity test (the
/// column check rejects that trigger before its `WHEN` is read). Measured:
/// the single trigger's larger `WHEN` cost a live→live update about 12 % of
/// its backend CPU (`BENCHMARKS.md`, issue 24).
///
/// The predicate is compared raw, not through `coalesce(…, false)`: the two
/// `WHEN`s stay exact complements, and a NULL ↔ false change (both not
/// live) only calls the function, which compares coalesced liveness itself
/// and enqueues nothing. As with any `OF` list, a column changed only by a
/// host's own BEFORE trigger, not named in the SET list, is not seen.
fn update_triggers(r: &Resolved, func: &str) -> Vec<String> {
    let table = r.table.qualified();
    let name = &r.mapping.name;
    let columns = r.table.column_names();
    let of = |cols: &[String]| {
        cols.iter()
            .map(|c| quote_ident(c))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out = Vec::new();
    // (predicate over OLD) IS DISTINCT FROM (predicate over NEW), when the
    // mapping has a predicate that reads columns.
    let live_changed = r.mapping.live.as_ref().and_then(|p| {
        let read: Vec<String> = p.columns(&columns).into_iter().collect();
        (!read.is_empty()).then(|| {
            (
                read,
                format!(
                    "({}) IS DISTINCT FROM ({})",
                    p.qualified("OLD", &columns),
                    p.qualified("NEW", &columns)
                ),
            )
        })
    });
    if let Some((read, changed)) = &live_changed {
        out.push(format!(
            "CREATE TRIGGER {trg} AFTER UPDATE OF {cols} ON {table} FOR EACH ROW WHEN ({changed}) EXECUTE FUNCTION {func}()",
            trg = quote_ident(&trigger(name, "update")),
            cols = of(read),
        ));
    }
    let identity = identity_columns(r);
    if !identity.is_empty() {
        let changed: Vec<String> = identity
            .iter()
            .map(|c| {
                let c = quote_ident(c);
                format!("OLD.{c} IS DISTINCT FROM NEW.{c}")
            })
            .collect();
        let when = match &live_changed {
            Some((_, live)) => format!("({}) AND NOT ({live})", changed.join(" OR ")),
            None => changed.join(" OR "),
        };
        out.push(format!(
            "CREATE TRIGGER {trg} AFTER UPDATE OF {cols} ON {table} FOR EACH ROW WHEN ({when}) EXECUTE FUNCTION {func}()",
            trg = quote_ident(&trigger(name, "update_identity")),
            cols = of(&identity),
        ));
    }
    out
}

/// `TRUNCATE` fires no row trigger: a statement trigger before it
/// deregisters every live resource the table holds, in the truncating
/// transaction (rolled back with it). Truncating a join table removes
/// every resource's parent, so it deregisters each linked live resource.
fn truncate_statements(r: &Resolved) -> Vec<String> {
    let m = &r.mapping;
    // The loop's query reads the table as `x`; its rows land in the
    // variable `t` (one name each: PL/pgSQL refuses an ambiguous one).
    let parent = r.parent_sql("x");
    let parent_value = r.parent_sql("t").unwrap_or_else(|| "NULL".into());
    let attrs = if attribute_columns(r).is_empty() {
        "NULL".to_string()
    } else {
        attributes_sql(r, "t")
    };
    let body = |require_parent: bool| {
        format!(
            r#"
DECLARE
    t        {table}%ROWTYPE;
    who      jsonb;
    src      text;
    enqueued boolean;
BEGIN
    FOR t IN SELECT x.* FROM {table} AS x WHERE {live} AND {sel_x} IS NOT NULL{parent_filter} LOOP
        {who}
        enqueued := {enqueue}('deregister', {rtype}, {sel}, {ptype}, {parent}, who, src, {attrs});
    END LOOP;
    RETURN NULL;
END
"#,
            table = r.table.qualified(),
            live = live_sql(r, "x"),
            sel_x = m.selector.sql("x"),
            sel = m.selector.sql("t"),
            parent_filter = match (&parent, require_parent) {
                (Some(p), true) => format!(" AND {p} IS NOT NULL"),
                _ => String::new(),
            },
            who = creator_sql(r, "t", "who", "src"),
            enqueue = ours(r, "authz_outbox_capture_enqueue"),
            rtype = quote_literal(m.resource_type.as_str()),
            ptype = parent_type_sql(r),
            parent = parent_value,
        )
    };
    let mut out = vec![
        format!(
            "CREATE OR REPLACE FUNCTION {func}() RETURNS trigger\nLANGUAGE plpgsql {DEFINER} AS {body}",
            func = ours(r, &truncate_function(&m.name)),
            body = dollar_quote(&body(false)),
        ),
        format!(
            "CREATE TRIGGER {trg} BEFORE TRUNCATE ON {table} FOR EACH STATEMENT EXECUTE FUNCTION {func}()",
            trg = quote_ident(&trigger(&m.name, "truncate")),
            table = r.table.qualified(),
            func = ours(r, &truncate_function(&m.name)),
        ),
    ];
    if let Some(join) = &r.join {
        out.push(format!(
            "CREATE OR REPLACE FUNCTION {func}() RETURNS trigger\nLANGUAGE plpgsql {DEFINER} AS {body}",
            func = ours(r, &parent_truncate_function(&m.name)),
            body = dollar_quote(&body(true)),
        ));
        out.push(format!(
            "CREATE TRIGGER {trg} BEFORE TRUNCATE ON {table} FOR EACH STATEMENT EXECUTE FUNCTION {func}()",
            trg = quote_ident(&trigger(&m.name, "parent_truncate")),
            table = join.qualified(),
            func = ours(r, &parent_truncate_function(&m.name)),
        ));
    }
    out
}

/// The join table's side: a link added, removed or changed re-parents a
/// live resource (deregister under the old parent, register under the new).
fn join_statements(
    r: &Resolved,
    mode: CaptureMode,
    parent: &super::Parent,
    join: &super::JoinSpec,
    join_table: &super::catalog::Table,
) -> Vec<String> {
    let m = &r.mapping;
    let name = &m.name;
    let key_type = &join_table.columns[&join.on];
    let col = quote_ident(&parent.column);
    let on = quote_ident(&join.on);
    let jt = join_table.qualified();
    let reparent = ours(r, &reparent_function(name));
    let enqueue = ours(r, "authz_outbox_capture_enqueue");
    let helper_body = format!(
        r#"
DECLARE
    t             {table}%ROWTYPE;
    before_parent text;
    after_parent  text;
    sel           text;
    who           jsonb;
    src           text;
    raw           text;
    defaults      text;
    enqueued      boolean;
BEGIN
    SELECT x.* INTO t FROM {table} AS x WHERE x.{refs} = p_ref AND {live_x};
    IF NOT FOUND THEN
        RETURN;  -- no live resource: nothing registered to move
    END IF;
    sel := {sel_t};
    IF sel IS NULL THEN
        RETURN;
    END IF;
    -- The parent now, and the parent before this change: the least of the
    -- links but the one added, and the one removed (one scan of the links).
    SELECT min(j.{col}::text),
           min(j.{col}::text) FILTER (WHERE p_added IS NULL OR j.{col}::text <> p_added)
    INTO after_parent, before_parent
    FROM {jt} AS j WHERE j.{on} = p_ref;
    before_parent := LEAST(before_parent, p_removed);
    IF before_parent IS NOT DISTINCT FROM after_parent THEN
        RETURN;
    END IF;
    IF before_parent IS NOT NULL THEN
        {who_t}
        enqueued := {enqueue}('deregister', {rtype}, sel, {ptype}, before_parent, who, src, NULL);
    END IF;
    IF after_parent IS NOT NULL THEN
        {register_t}
    END IF;
END
"#,
        sel_t = m.selector.sql("t"),
        who_t = creator_sql(r, "t", "who", "src"),
        register_t = register_sql(r, mode, "t", "sel", "after_parent", "NULL"),
        table = r.table.qualified(),
        refs = quote_ident(&join.references),
        live_x = live_sql(r, "x"),
        rtype = quote_literal(m.resource_type.as_str()),
        ptype = parent_type_sql(r),
    );
    // Runs only inside the join table's trigger (its owner, its pinned
    // search_path); EXECUTE is never granted to anyone else.
    let helper = format!(
        "CREATE OR REPLACE FUNCTION {reparent}(p_ref {key_type}, p_added text, p_removed text) RETURNS void\nLANGUAGE plpgsql AS {}",
        dollar_quote(&helper_body)
    );
    let func = ours(r, &parent_function(name));
    let trigger_body = format!(
        r#"
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM {reparent}(NEW.{on}, NEW.{col}::text, NULL);
    ELSIF TG_OP = 'DELETE' THEN
        PERFORM {reparent}(OLD.{on}, NULL, OLD.{col}::text);
    ELSIF OLD.{on} IS NOT DISTINCT FROM NEW.{on} THEN
        PERFORM {reparent}(NEW.{on}, NEW.{col}::text, OLD.{col}::text);
    ELSE
        PERFORM {reparent}(OLD.{on}, NULL, OLD.{col}::text);
        PERFORM {reparent}(NEW.{on}, NEW.{col}::text, NULL);
    END IF;
    RETURN NULL;
END
"#
    );
    let trigger_fn = format!(
        "CREATE OR REPLACE FUNCTION {func}() RETURNS trigger\nLANGUAGE plpgsql {DEFINER} AS {}",
        dollar_quote(&trigger_body)
    );
    let trg = format!(
        "CREATE TRIGGER {trg} AFTER INSERT OR DELETE OR UPDATE OF {on}, {col} ON {jt} FOR EACH ROW EXECUTE FUNCTION {func}()",
        trg = quote_ident(&trigger(name, "parent")),
    );
    vec![helper, trigger_fn, trg]
}

/// `authz_outbox_live__N(selector, parent)`: the row found from the
/// selector's parts (an index lookup), then re-checked in full.
/// SECURITY DEFINER (search path pinned), like the dispatcher: the worker
/// and replay roles then need no grant on the host's tables, only EXECUTE
/// on the dispatcher's yes/no answer; PUBLIC has none (it would tell any
/// role whether an id exists).
fn lookup_statement(r: &Resolved) -> String {
    let m = &r.mapping;
    let columns = m.selector.columns();
    let declare: String = columns
        .iter()
        .map(|c| format!("    v_{c} text;\n"))
        .collect();
    let conditions: Vec<String> = columns
        .iter()
        .map(|c| {
            let kind = &r.table.columns[*c];
            let text_like = kind == "text" || kind.starts_with("character");
            if text_like {
                format!("t.{} = v_{c}", quote_ident(c))
            } else {
                format!("t.{}::text = v_{c}", quote_ident(c))
            }
        })
        .collect();
    let parent_check = match r.parent_sql("t") {
        Some(parent) => format!(
            "\n          AND {parent} IS NOT NULL AND (p_parent_id IS NULL OR {parent} = p_parent_id)"
        ),
        None => String::new(),
    };
    let on_match = format!(
        "IF EXISTS (\n    SELECT 1 FROM {table} AS t\n    WHERE {conditions}\n      AND {selector} = p_selector\n      AND {live}{parent_check}) THEN\n    RETURN true;\nEND IF;",
        table = r.table.qualified(),
        conditions = conditions.join(" AND "),
        selector = m.selector.sql("t"),
        live = live_sql(r, "t"),
    );
    let (split_declarations, matcher) = m.selector.plpgsql_match("p_selector", &on_match);
    let body = format!(
        r#"
DECLARE
{declare}{split_declarations}BEGIN
    IF p_selector IS NULL THEN
        RETURN false;
    END IF;
{matcher}    RETURN false;
END
"#,
        split_declarations = indent(&split_declarations),
        matcher = indent(&matcher),
    );
    format!(
        "CREATE OR REPLACE FUNCTION {func}(p_selector text, p_parent_id text) RETURNS boolean\nLANGUAGE plpgsql STABLE {DEFINER} AS {}",
        dollar_quote(&body),
        func = ours(r, &live_function(&m.name)),
    )
}

fn indent(block: &str) -> String {
    block.lines().map(|l| format!("    {l}\n")).collect()
}

/// Statements that remove what [`install_statements`] created for the
/// mapping `name` on `table` (and `join_table`), given as qualified names
/// (`None`: the table is gone, only the functions are left to drop). Our
/// functions live in `schema`. Safe when absent.
pub fn drop_statements(
    schema: &str,
    name: &str,
    table: Option<&str>,
    join_table: Option<&str>,
) -> Vec<String> {
    // The table may be gone between planning and running (a host that
    // dropped a feature): guarded, as DROP TRIGGER IF EXISTS still needs
    // its table.
    let drop_trigger = |trigger_name: String, on: &str| {
        let body = format!(
            " BEGIN IF pg_catalog.to_regclass({lit}) IS NOT NULL THEN DROP TRIGGER IF EXISTS {trg} ON {on}; END IF; END ",
            lit = quote_literal(on),
            trg = quote_ident(&trigger_name),
        );
        format!("DO {}", dollar_quote(&body))
    };
    let mut out = Vec::new();
    if let Some(table) = table {
        for event in ["insert", "delete", "update", "update_identity", "truncate"] {
            out.push(drop_trigger(trigger(name, event), table));
        }
    }
    if let Some(join) = join_table {
        out.push(drop_trigger(trigger(name, "parent"), join));
        out.push(drop_trigger(trigger(name, "parent_truncate"), join));
    }
    for function in [
        parent_function(name),
        truncate_function(name),
        parent_truncate_function(name),
    ] {
        out.push(format!(
            "DROP FUNCTION IF EXISTS {}()",
            qualified(schema, &function)
        ));
    }
    let body = format!(
        " DECLARE f regprocedure; BEGIN FOR f IN SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p WHERE p.proname = {} AND p.pronamespace = pg_catalog.to_regnamespace({}) LOOP EXECUTE 'DROP FUNCTION ' || f; END LOOP; END ",
        quote_literal(&reparent_function(name)),
        quote_literal(&quote_ident(schema)),
    );
    out.push(format!("DO {}", dollar_quote(&body)));
    out.push(format!(
        "DROP FUNCTION IF EXISTS {}()",
        qualified(schema, &capture_function(name))
    ));
    out
}

/// The comment on `authz_outbox_desired`. It names the shape of the view
/// this release generates: `migrate` regenerates the view when the
/// installed one carries another comment, even if no mapping changed (an
/// upgrade that adds a column reconcile reads).
pub const DESIRED_VIEW_COMMENT: &str = "What SpiceDB should hold, by the resource mappings in force: every live row with its selector, parent, relationship attributes and column-named edges. Generated by authz-outbox migrate (view shape 2).";

/// `relation@subject_type:value` of every relationship whose subjects all
/// come from columns (the first alternative with a value), as SpiceDB
/// should hold it with the subject id decoded: what reconcile compares a
/// live row's column-named relationships with.
fn edges_sql(r: &Resolved, q: &str) -> String {
    use super::relationships::{Role, Source};
    let edges: Vec<String> = r
        .mapping
        .relationships
        .iter()
        .filter(|rel| rel.role() == Role::Column)
        .map(|rel| {
            let arms: String = rel
                .subjects
                .iter()
                .filter_map(|s| match &s.source {
                    Source::Column(c) => Some(format!(
                        " WHEN nullif({q}.{col}::text, '') IS NOT NULL THEN {prefix} || {q}.{col}::text",
                        col = quote_ident(c),
                        prefix = quote_literal(&format!("{}@{}:", rel.relation, s.subject_type)),
                    )),
                    _ => None,
                })
                .collect();
            format!("CASE{arms} END")
        })
        .collect();
    if edges.is_empty() {
        "'{}'::text[]".into()
    } else {
        format!("array_remove(ARRAY[{}]::text[], NULL)", edges.join(", "))
    }
}

/// What ties the installed mappings together: the live check by type and
/// the desired state. Regenerated whenever the set of mappings changes.
/// Types with no installed mapping count as live (nothing to judge by), as
/// before mappings existed.
pub fn shared_statements(schema: &str, resolved: &[Resolved]) -> Vec<String> {
    let mut by_type: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
    for r in resolved {
        by_type
            .entry(r.mapping.resource_type.as_str())
            .or_default()
            .push(format!(
                "{}(p_selector, p_parent_id)",
                ours(r, &live_function(&r.mapping.name))
            ));
    }
    let cases: String = by_type
        .iter()
        .map(|(kind, calls)| {
            format!(
                "    IF p_type = {} THEN\n        RETURN {};\n    END IF;\n",
                quote_literal(kind),
                calls.join(" OR ")
            )
        })
        .collect();
    let dispatch = format!(
        "CREATE OR REPLACE FUNCTION {func}(p_type text, p_selector text, p_parent_id text)\n\
         RETURNS boolean LANGUAGE plpgsql STABLE {DEFINER} AS {body}",
        func = qualified(schema, "authz_outbox_resource_live"),
        body = dollar_quote(&format!("\nBEGIN\n{cases}    RETURN true;\nEND\n")),
    );
    let selects: Vec<String> = resolved
        .iter()
        .map(|r| {
            let created = match &r.created_at {
                Some(c) => format!("t.{}::timestamptz", quote_ident(c)),
                None => "NULL::timestamptz".into(),
            };
            // The parent is computed once per row (a join-table lookup is a
            // subquery), then both returned and required.
            let parent = r.parent_sql("t");
            let parent_filter = if parent.is_some() {
                " AND p.parent_id IS NOT NULL"
            } else {
                ""
            };
            format!(
                "SELECT {name}::text AS mapping, {rtype}::text AS resource_type, {sel} AS resource_id, \
                 {ptype}::text AS parent_type, p.parent_id, {created} AS created_at, \
                 {creator} AS creator, {attributes} AS attributes, {edges} AS edges \
                 FROM {table} AS t \
                 CROSS JOIN LATERAL (SELECT {parent}::text AS parent_id) AS p \
                 WHERE {live} AND {sel} IS NOT NULL{parent_filter}",
                name = quote_literal(&r.mapping.name),
                rtype = quote_literal(r.mapping.resource_type.as_str()),
                sel = r.mapping.selector.sql("t"),
                ptype = parent_type_sql(r),
                parent = parent.clone().unwrap_or_else(|| "NULL".into()),
                creator = row_creator_sql(r, "t"),
                attributes = if attribute_columns(r).is_empty() {
                    "NULL::jsonb".to_string()
                } else {
                    attributes_sql(r, "t")
                },
                edges = edges_sql(r, "t"),
                table = r.table.qualified(),
                live = live_sql(r, "t"),
            )
        })
        .collect();
    let body = if selects.is_empty() {
        "SELECT NULL::text AS mapping, NULL::text AS resource_type, NULL::text AS resource_id, \
         NULL::text AS parent_type, NULL::text AS parent_id, NULL::timestamptz AS created_at, \
         NULL::jsonb AS creator, NULL::jsonb AS attributes, NULL::text[] AS edges WHERE false"
            .to_string()
    } else {
        selects.join("\nUNION ALL\n")
    };
    vec![
        dispatch,
        // Replaced, never dropped: the grants on it (the reconcile role's
        // SELECT) survive a mapping change. Its columns only ever grow at
        // the end, which is what CREATE OR REPLACE allows.
        format!(
            "CREATE OR REPLACE VIEW {} AS\n{body}",
            qualified(schema, "authz_outbox_desired")
        ),
        format!(
            "COMMENT ON VIEW {} IS {}",
            qualified(schema, "authz_outbox_desired"),
            quote_literal(DESIRED_VIEW_COMMENT)
        ),
    ]
}
