"""A fresh database for the run: the host's tables (tests/fixtures/host_schema.sql),
then the built ``authz-outbox migrate``; engines for both drivers; a writer
role shaped as docs/host-integration.md grants it, with a role default
principal."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from sqlalchemy import Engine, create_engine
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

REPO = Path(__file__).resolve().parents[3]
HOST_SCHEMA = REPO / "tests" / "fixtures" / "host_schema.sql"
#: The role default of the writer role: who writes when no request principal is set.
ROLE_DEFAULT = {"service_account_id": "sa-host"}


def binary(name: str) -> Path:
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    path = target / "debug" / name
    if not path.exists():
        pytest.exit(f"{path} is missing: run `cargo build` first (scripts/test.sh does)", 2)
    return path


def with_db(url: str, *, scheme: str, database: str, user: str | None = None) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc
    if user is not None:
        netloc = f"{user}@{netloc.split('@', 1)[-1]}"
    return urlunsplit((scheme, netloc, f"/{database}", parts.query, ""))


@dataclass(frozen=True)
class Database:
    name: str
    #: libpq URL of the owner (the cluster's superuser here).
    url: str
    writer_role: str

    def sqlalchemy(self, driver: str, *, as_writer: bool = False) -> str:
        user = self.writer_role if as_writer else None
        return with_db(self.url, scheme=f"postgresql+{driver}", database=self.name, user=user)

    def execute(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url, autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []


@pytest.fixture(scope="session")
def database() -> Iterator[Database]:
    admin = os.environ.get("DATABASE_URL")
    if not admin:
        pytest.exit("DATABASE_URL (a PostgreSQL superuser URL) is required", 2)
    suffix = uuid.uuid4().hex[:10]
    name, role = f"authz_outbox_py_{suffix}", f"py_writer_{suffix}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
        conn.execute(f'CREATE ROLE "{role}" LOGIN')
    db = Database(
        name=name, url=with_db(admin, scheme="postgresql", database=name), writer_role=role
    )
    try:
        with psycopg.connect(db.url, autocommit=True) as conn:
            conn.execute(HOST_SCHEMA.read_text())
        subprocess.run(
            [binary("authz-outbox"), "migrate"],
            env={**os.environ, "DATABASE_URL": db.url, "RUST_LOG": "warn"},
            check=True,
        )
        # The writer role as the guide grants it, and its default creator.
        db.execute(
            f"""
            GRANT SELECT, INSERT, UPDATE, DELETE ON agents, agent_api_keys TO "{role}";
            GRANT INSERT, SELECT ON authz_outbox TO "{role}";
            GRANT USAGE ON SEQUENCE authz_outbox_id_seq TO "{role}";
            GRANT EXECUTE ON FUNCTION
                authz_outbox_wait_for_resource(text, text, interval, bigint) TO "{role}";
            ALTER ROLE "{role}" IN DATABASE "{name}"
                SET authz_outbox.principal = '{{"service_account_id":"sa-host"}}';
            """
        )
        yield db
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'DROP ROLE IF EXISTS "{role}"')


@pytest.fixture(autouse=True)
def empty_tables(database: Database) -> None:
    database.execute(
        "TRUNCATE authz_outbox, agent_api_keys, agents, tasks, task_agents, "
        "agent_task_tracker, agent_run_schedules RESTART IDENTITY CASCADE"
    )


@pytest.fixture(scope="session")
def engine(database: Database) -> Iterator[Engine]:
    """psycopg 3, connected as the writer role."""
    eng = create_engine(database.sqlalchemy("psycopg", as_writer=True), pool_size=2)
    yield eng
    eng.dispose()


@pytest.fixture
async def async_engine(database: Database) -> AsyncIterator[AsyncEngine]:
    """asyncpg, connected as the writer role (one per test: asyncpg
    connections belong to the event loop that opened them)."""
    eng = create_async_engine(database.sqlalchemy("asyncpg", as_writer=True), pool_size=3)
    yield eng
    await eng.dispose()


def outbox(database: Database) -> list[dict[str, Any]]:
    """Every outbox row, oldest first."""
    rows = database.execute(
        "SELECT id, resource_type, resource_id, operation, state, principal, last_error "
        "FROM authz_outbox ORDER BY id"
    )
    keys = ("id", "resource_type", "resource_id", "operation", "state", "principal", "last_error")
    return [dict(zip(keys, row, strict=True)) for row in rows]
