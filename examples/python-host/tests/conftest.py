"""A fresh database for the run: the host's tables (tests/fixtures/host_schema.sql),
then the built ``authz-outbox migrate``; engines for both drivers; a writer
role shaped as docs/host-integration.md grants it, with a role default
principal."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
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
        # The writer role as the guide grants it (nothing on the outbox: the
        # capture functions are SECURITY DEFINER), and its default creator.
        db.execute(
            f"""
            GRANT SELECT, INSERT, UPDATE, DELETE ON agents, agent_api_keys TO "{role}";
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
        "SELECT id, resource_type, resource_id, parent_id, operation, state, principal, last_error "
        "FROM authz_outbox ORDER BY id"
    )
    keys = (
        "id",
        "resource_type",
        "resource_id",
        "parent_id",
        "operation",
        "state",
        "principal",
        "last_error",
    )
    return [dict(zip(keys, row, strict=True)) for row in rows]


# --- The real worker and agentex-auth-dev ---------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_post(url: str, body: dict[str, Any]) -> int:
    """POSTs JSON; the status code (error statuses included)."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return e.code


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except (urllib.error.URLError, OSError):
        return False


@dataclass(frozen=True)
class Delivery:
    #: agentex-auth-dev's HTTP base URL (the agentex-auth contract).
    auth_url: str
    #: Its SpiceDB gRPC endpoint (what reconcile reads).
    spicedb_endpoint: str


@pytest.fixture
def delivery(database: Database, tmp_path: Path) -> Iterator[Delivery]:
    """agentex-auth-dev over the real SpiceDB engine and one `authz-outbox run`,
    started as scripts/demo.sh starts them."""
    if not os.environ.get("SPICEDB_LIBRARY_PATH"):
        pytest.fail("SPICEDB_LIBRARY_PATH is not set (scripts/test.sh sets it)")
    http, grpc = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    env = {**os.environ, "RUST_LOG": "warn", "DATABASE_URL": database.url}
    log_path = tmp_path / "processes.log"
    log = log_path.open("w")
    auth = subprocess.Popen(
        [binary("agentex-auth-dev"), "--listen", http, "--grpc-listen", grpc],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    worker = None
    try:
        deadline = time.monotonic() + 30
        while not answers(f"http://{http}/_dev/stats"):
            if time.monotonic() > deadline or auth.poll() is not None:
                log.flush()
                pytest.fail(f"agentex-auth-dev did not start: {log_path.read_text()}")
            time.sleep(0.1)
        worker = subprocess.Popen(
            [
                binary("authz-outbox"),
                "run",
                "--metrics-addr",
                f"127.0.0.1:{free_port()}",
                "--poll-interval",
                "200ms",
            ],
            env={**env, "AGENTEX_AUTH_URL": f"http://{http}"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        yield Delivery(auth_url=f"http://{http}", spicedb_endpoint=f"http://{grpc}")
    finally:
        for process in (worker, auth):
            if process is not None:
                process.terminate()
                process.wait(timeout=30)
        log.close()


def until_nothing_pending(database: Database, limit: float = 60) -> None:
    deadline = time.monotonic() + limit
    while database.execute("SELECT count(*) FROM authz_outbox WHERE state = 'pending'")[0][0]:
        if time.monotonic() > deadline:
            raise AssertionError(f"outbox still pending after {limit}s: {outbox(database)}")
        time.sleep(0.05)
