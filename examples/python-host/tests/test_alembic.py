"""``authz-outbox migrate --print-sql --format alembic``: the revision file it
writes, run by alembic itself on the host-shaped schema
(tests/fixtures/host_schema.sql), once with psycopg 3 under a synchronous
env.py and once with asyncpg under alembic's async template.

``upgrade head`` installs what ``authz-outbox migrate`` installs (a later
``migrate`` has nothing to do, and a write is captured); ``downgrade`` to the
host's previous head leaves ``pg_dump --schema-only`` exactly as it was; the
round trip can be made again."""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from alembic import command
from alembic.config import Config

from .conftest import HOST_SCHEMA, binary, with_db

#: The host's history before authz-outbox: its head, which our revision follows.
HOST_HEAD = '''"""The host's own last revision."""

revision = "host_0042"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
'''

ENV_PSYCOPG = """
from alembic import context
from sqlalchemy import create_engine

engine = create_engine(context.config.get_main_option("sqlalchemy.url"))
with engine.connect() as connection:
    context.configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
"""

# alembic's `async` template (alembic init -t async), online mode.
ENV_ASYNCPG = """
import asyncio

from alembic import context
from sqlalchemy.ext.asyncio import create_async_engine


def do_run_migrations(connection):
    context.configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations():
    engine = create_async_engine(context.config.get_main_option("sqlalchemy.url"))
    async with engine.connect() as connection:
        await connection.run_sync(do_run_migrations)
    await engine.dispose()


asyncio.run(run_async_migrations())
"""


@pytest.fixture
def fresh_database() -> Iterator[str]:
    """A database with the host's tables only (no ``migrate``): its libpq URL."""
    admin = os.environ["DATABASE_URL"]
    name = f"authz_outbox_alembic_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = with_db(admin, scheme="postgresql", database=name)
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(HOST_SCHEMA.read_text())
        yield url
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def schema_dump(url: str) -> str:
    """``pg_dump --schema-only`` by the server's major version's pg_dump."""
    with psycopg.connect(url) as conn:
        major = int(conn.execute("SHOW server_version_num").fetchone()[0]) // 10000
    pg_dump = Path(f"/usr/lib/postgresql/{major}/bin/pg_dump")
    out = subprocess.run(
        [str(pg_dump) if pg_dump.exists() else "pg_dump", "--schema-only", "--dbname", url],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    # pg_dump 15.14+ brackets its output with a random `\restrict` key.
    return "".join(
        line
        for line in out.splitlines(keepends=True)
        if not line.startswith(("\\restrict ", "\\unrestrict "))
    )


def authz_outbox(url: str, *args: str) -> str:
    return subprocess.run(
        [binary("authz-outbox"), *args],
        env={**os.environ, "DATABASE_URL": url, "RUST_LOG": "warn"},
        check=True,
        capture_output=True,
        text=True,
    ).stdout


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
def test_revision_upgrades_and_downgrades_to_the_same_schema(
    driver: str, fresh_database: str, tmp_path: Path
) -> None:
    url = fresh_database
    scripts = tmp_path / "alembic"
    (scripts / "versions").mkdir(parents=True)
    (scripts / "env.py").write_text(ENV_ASYNCPG if driver == "asyncpg" else ENV_PSYCOPG)
    (scripts / "versions" / "host_0042.py").write_text(HOST_HEAD)
    config = Config()
    config.set_main_option("script_location", str(scripts))
    config.set_main_option(
        "sqlalchemy.url", url.replace("postgresql://", f"postgresql+{driver}://", 1)
    )
    command.upgrade(config, "head")
    before = schema_dump(url)

    revision = authz_outbox(
        url,
        "migrate",
        "--print-sql",
        "--format",
        "alembic",
        "--alembic-revision",
        "authz_outbox_0001",
        "--alembic-down-revision",
        "host_0042",
    )
    assert re.search(r'^down_revision = "host_0042"$', revision, re.M), revision
    (scripts / "versions" / "authz_outbox_0001.py").write_text(revision)

    for _ in range(2):
        command.upgrade(config, "head")
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [
                ("authz_outbox_0001",)
            ]
            # Statements ran one by one, `:true` and `%` untouched: capture is on.
            conn.execute(
                "SELECT set_config('authz_outbox.principal', "
                """'{"user_id":"u-1","admin":true}', true)"""
            )
            conn.execute(
                "INSERT INTO agents (id, name, description, status) "
                "VALUES ('a-1', 'a-1', '', 'READY')"
            )
            assert conn.execute(
                "SELECT resource_type, resource_id, operation, principal FROM authz_outbox"
            ).fetchall() == [("agent", "a-1", "register", {"user_id": "u-1"})]
            conn.rollback()
        # Exactly what `migrate` would have done: it has nothing left to do.
        assert authz_outbox(url, "migrate") == (
            "nothing to do: every migration is applied and the capture matches the mappings\n"
        )
        assert authz_outbox(url, "migrate", "--print-sql").count(";") == 3

        command.downgrade(config, "host_0042")
        after = schema_dump(url)
        assert after == before, "\n".join(
            [f"- {line}" for line in set(before.splitlines()) - set(after.splitlines())]
            + [f"+ {line}" for line in set(after.splitlines()) - set(before.splitlines())]
        )
