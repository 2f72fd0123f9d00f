//! Migrations apply twice, and onto the host's existing database.

use authz_outbox::db::MIGRATOR;
use sqlx::PgPool;

#[sqlx::test(migrator = "authz_outbox::db::MIGRATOR")]
async fn migrations_run_twice(pool: PgPool) {
    MIGRATOR.run(&pool).await.expect("second run is a no-op");
    // Also when the bookkeeping is lost: every statement is idempotent itself.
    sqlx::query("DROP TABLE _sqlx_migrations")
        .execute(&pool)
        .await
        .expect("drop");
    MIGRATOR
        .run(&pool)
        .await
        .expect("re-applying every statement works");
}

#[sqlx::test(migrations = false)]
async fn migrations_apply_to_the_hosts_database_with_rows(pool: PgPool) {
    // The host's schema, as scale-agentex creates it, with data in it.
    sqlx::raw_sql(
        r#"
        CREATE TYPE agentapikeytype AS ENUM ('INTERNAL', 'EXTERNAL', 'GITHUB', 'SLACK');
        CREATE TABLE agents (
            id varchar(64) PRIMARY KEY, name varchar(256) NOT NULL UNIQUE,
            description text, status varchar(32), created_at timestamptz DEFAULT now());
        CREATE TABLE agent_api_keys (
            id text NOT NULL,
            agent_id varchar(64) NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
            created_at timestamptz DEFAULT now(),
            name varchar(256) NOT NULL,
            api_key_type agentapikeytype NOT NULL,
            api_key text NOT NULL,
            PRIMARY KEY (id, agent_id));
        INSERT INTO agents (id, name, description) VALUES ('a1', 'one', 'kept');
        INSERT INTO agent_api_keys (id, agent_id, name, api_key_type, api_key)
            VALUES ('k1', 'a1', 'old', 'GITHUB', 'gh-secret');
        "#,
    )
    .execute(&pool)
    .await
    .expect("host schema");

    MIGRATOR.run(&pool).await.expect("migrations apply");

    // The host's tables and rows are untouched (its extra columns survive)...
    let (desc, keys): (String, i64) = sqlx::query_as(
        "SELECT a.description, (SELECT count(*) FROM agent_api_keys) FROM agents a WHERE id = 'a1'",
    )
    .fetch_one(&pool)
    .await
    .expect("host data");
    assert_eq!((desc.as_str(), keys), ("kept", 1));
    // ...existing rows are not captured retroactively (reconcile's job)...
    let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM authz_outbox")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(outbox, 0);
    // ...and new writes are.
    let mut tx = pool.begin().await.expect("begin");
    sqlx::query("SELECT set_config('authz_outbox.principal', '{\"user_id\":\"u\"}', true)")
        .execute(&mut *tx)
        .await
        .expect("set");
    sqlx::query("DELETE FROM agent_api_keys WHERE id = 'k1'")
        .execute(&mut *tx)
        .await
        .expect("delete");
    tx.commit().await.expect("commit");
    let outbox: i64 =
        sqlx::query_scalar("SELECT count(*) FROM authz_outbox WHERE operation = 'deregister'")
            .fetch_one(&pool)
            .await
            .expect("count");
    assert_eq!(outbox, 1);
}

/// Someone else's database (no host tables): `migrate` installs authz-outbox
/// and creates nothing agentex-shaped - no host table, no host enum.
#[sqlx::test(migrations = false)]
async fn migrate_creates_no_host_table_or_type(pool: PgPool) {
    authz_outbox::db::migrate(&pool)
        .await
        .expect("migrate on a database without the host's tables");
    let outbox: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_class WHERE relname = 'authz_outbox'")
            .fetch_one(&pool)
            .await
            .expect("count");
    assert_eq!(outbox, 1, "authz-outbox itself is installed");
    let agentex: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_class c
         WHERE c.relname IN ('agents', 'agent_api_keys', 'tasks', 'task_agents', 'schedules')
         UNION ALL
         SELECT t.typname::text FROM pg_type t
         WHERE t.typname IN ('agentstatus', 'agentapikeytype', 'taskstatus')
         ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .expect("agentex-shaped objects");
    assert_eq!(agentex, Vec::<String>::new());
}
