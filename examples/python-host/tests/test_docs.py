"""docs/host-integration.md, run: every fenced block of the guide is marked
``<!-- tested: NAME -->`` and run here, in the guide's order, against a fresh
database, the real worker and agentex-auth-dev, as the host's role ``app``.

Each NAME has a runner below that runs the block as written (shell through
bash, SQL through psql-like connections, Python through ``exec`` with
top-level ``await``) and then checks what the block is meant to achieve. A
block without a mark, or a mark without a runner, fails the test, so the
guide cannot grow an untested snippet.
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from fastapi import FastAPI, Request
from sqlalchemy import insert, text
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint

from authz_outbox_host import PrincipalMissing

from . import host_models
from .conftest import (
    REPO,
    Database,
    Delivery,
    binary,
    http_post,
    outbox,
    until_nothing_pending,
    with_db,
)

GUIDE = REPO / "docs" / "host-integration.md"
ROLE = "app"


@dataclass(frozen=True)
class Block:
    name: str
    language: str
    code: str
    line: int


def blocks(text: str) -> list[Block]:
    """Marked blocks, in order; fails on any fenced block without a mark."""
    found: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)", lines[i])
        if not fence:
            i += 1
            continue
        mark = re.match(r"^<!-- tested: ([\w-]+) -->$", lines[i - 1] if i else "")
        assert mark, f"{GUIDE.name}:{i + 1}: fenced block without <!-- tested: NAME -->"
        end = lines.index("```", i + 1)
        found.append(Block(mark.group(1), fence.group(1), "\n".join(lines[i + 1 : end]), i + 1))
        i = end + 1
    return found


@dataclass
class Guide:
    """What the guide's blocks run against, and what they leave behind."""

    database: Database
    delivery: Delivery
    workdir: Path
    namespace: dict[str, Any] = field(default_factory=dict)
    told: dict[str, str] = field(default_factory=dict)

    @property
    def app_url(self) -> str:
        return with_db(
            self.database.url, scheme="postgresql", database=self.database.name, user=ROLE
        )

    def yours(self) -> dict[str, str]:
        """The values a reader types where the guide says ``yours``."""
        return {
            "DATABASE_URL": self.database.url,
            "AGENTEX_AUTH_URL": self.delivery.auth_url,
            "SPICEDB_ENDPOINT": self.delivery.spicedb_endpoint,
        }

    def sh(self, code: str) -> subprocess.CompletedProcess[str]:
        """Runs a block as a reader's terminal would: an environment holding
        only what the guide has told the reader to set so far (``told``, kept
        from block to block as a shell keeps its exports), the binary on
        ``PATH`` as the guide says to install it, nothing else of this
        process's environment. An ``export NAME=... # yours: ...`` line is
        the reader's own value, here the test's."""
        lines = []
        for line in code.splitlines():
            m = re.match(r"^export (\w+)=\S+\s+# yours: ", line)
            if m:
                name = m.group(1)
                assert name in self.yours(), f"no value of ours for {name}"
                self.told[name] = self.yours()[name]
                continue
            lines.append(line)
        env = {
            "HOME": os.environ.get("HOME", "/root"),
            "LANG": "C.UTF-8",
            "PATH": f"{binary('authz-outbox').parent}:/usr/local/bin:/usr/bin:/bin",
            **self.told,
        }
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", "\n".join(lines)],
            env=env,
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
        return done

    def sql_as_owner(self, code: str) -> None:
        self.database.execute(code)

    def sql_as_app(self, code: str) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.app_url, autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(code.encode())
            return cur.fetchall() if cur.description else []

    async def python(self, code: str, name: str) -> None:
        compiled = compile(code, f"<{name}>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        result = eval(compiled, self.namespace)
        if inspect.iscoroutine(result):
            await result

    def principal_of(self, resource: str, operation: str = "register") -> Any:
        rows = [
            r
            for r in outbox(self.database)
            if f"{r['resource_type']}:{r['resource_id']}" == resource
            and r["operation"] == operation
        ]
        assert rows, f"no {operation} row for {resource}: {outbox(self.database)}"
        return rows[-1]["principal"]


Runner = Callable[[Guide, Block], Awaitable[None]]


async def migrate(g: Guide, b: Block) -> None:
    assert "pending" in g.sh(b.code).stdout, "status prints the counts"


async def grants(g: Guide, b: Block) -> None:
    g.sql_as_owner(b.code)
    # The host's role can now capture and wait, without reading anything else.
    assert g.sql_as_app(
        "SELECT has_function_privilege(current_user, "
        "'authz_outbox_wait_for_resource(text,text,interval,bigint)', 'EXECUTE')"
    ) == [(True,)]


async def role_default(g: Guide, b: Block) -> None:
    g.sql_as_owner(b.code)
    assert g.sql_as_app("SELECT current_setting('authz_outbox.principal')") == [
        ('{"service_account_id":"agentex-host"}',)
    ]


async def session_hook(g: Guide, b: Block) -> None:
    os.environ["ASYNC_DATABASE_URL"] = with_db(
        g.database.url, scheme="postgresql+asyncpg", database=g.database.name, user=ROLE
    )
    await g.python(b.code, b.name)
    assert "AsyncSessionLocal" in g.namespace


async def middleware(g: Guide, b: Block) -> None:
    """The block wraps the host's FastAPI app, whose authentication
    middleware (added with ``add_middleware``) runs inside the wrapper: the
    wiring that used to register every write to the role default."""
    make = g.namespace["AsyncSessionLocal"]
    engine = g.namespace["async_engine"]
    api = FastAPI()

    class Authenticate(BaseHTTPMiddleware):
        """The host's authentication middleware (agentex-auth's /v1/authn,
        played by a header), storing the principal on the request."""

        async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Any:
            user = request.headers.get("x-user")
            request.state.principal = (
                {"user_id": user, "account_id": "acc-1", "api_key": "agx_secret"} if user else None
            )
            return await call_next(request)

    @api.post("/orm/{agent_id}")
    async def orm_write(agent_id: str) -> None:
        async with make() as session:
            session.add(host_models.AgentORM(id=agent_id, name=agent_id))
            await session.commit()

    @api.post("/core/{agent_id}")
    async def core_write(agent_id: str) -> None:
        async with engine.begin() as conn:
            await conn.execute(
                insert(host_models.AgentORM.__table__).values(
                    id=agent_id, name=agent_id, description="", status="READY"
                )
            )

    @api.get("/read")
    async def read() -> int:
        async with make() as session:
            return (await session.execute(text("SELECT count(*) FROM agents"))).scalar_one()

    api.add_middleware(Authenticate)
    g.namespace["app"] = api
    await g.python(b.code, b.name)
    transport = httpx.ASGITransport(app=g.namespace["app"])
    async with httpx.AsyncClient(transport=transport, base_url="http://host") as client:
        for kind in ("orm", "core"):
            response = await client.post(f"/{kind}/{kind}-agent", headers={"x-user": "u-mw"})
            assert response.status_code == 200, response.text
            user = {"user_id": "u-mw", "account_id": "acc-1"}  # no api key
            assert g.principal_of(f"agent:{kind}-agent") == user
            with pytest.raises(PrincipalMissing):
                await client.post(f"/{kind}/anon-{kind}-agent")
            assert not [r for r in outbox(g.database) if r["resource_id"] == f"anon-{kind}-agent"]
        assert (await client.get("/read")).status_code == 200, "an anonymous read is fine"


async def sql_writer(g: Guide, b: Block) -> None:
    g.sql_as_app(b.code)
    assert g.principal_of("api_key:key-from-sql") == {"user_id": "u-123"}


async def read_your_writes(g: Guide, b: Block) -> None:
    await g.python(b.code, b.name)
    done, key = g.namespace["done"], g.namespace["key"]
    assert done.outcome == "delivered" and done.consistency_token, done
    states = {r["state"] for r in outbox(g.database) if r["resource_id"] == key.id}
    assert states == {"delivered"}


async def sql_wait(g: Guide, b: Block) -> None:
    [(outcome, error, token)] = g.sql_as_app(b.code)
    assert (outcome, error) == ("delivered", None) and token


async def agent_self_registration(g: Guide, b: Block) -> None:
    await g.python(b.code, b.name)
    assert g.principal_of("agent:agent-2") == {"service_account_id": "sa-agent-pod"}


def operations(g: Guide, resource: str) -> list[tuple[str, Any]]:
    return [
        (r["operation"], r["parent_id"])
        for r in outbox(g.database)
        if f"{r['resource_type']}:{r['resource_id']}" == resource
    ]


async def agent_soft_delete(g: Guide, b: Block) -> None:
    await g.python(b.code, b.name)
    assert operations(g, "agent:agent-2") == [("register", None), ("deregister", None)]


async def task_create(g: Guide, b: Block) -> None:
    await g.python(b.code, b.name)
    assert operations(g, "task:task-1") == [("register", "agent-1")]


async def task_soft_delete(g: Guide, b: Block) -> None:
    await g.python(b.code, b.name)
    # The live-to-live status change added nothing; the soft delete, one row.
    assert operations(g, "task:task-1") == [("register", "agent-1"), ("deregister", "agent-1")]


async def schedule_create(g: Guide, b: Block) -> None:
    g.sql_as_app(b.code)
    resource = "schedule:run-schedule::agent-1::sched-1"
    assert operations(g, resource) == [("register", "agent-1")]
    assert g.principal_of(resource) == {"user_id": "u-456"}


async def schedule_soft_delete(g: Guide, b: Block) -> None:
    g.sql_as_app(b.code)
    resource = "schedule:run-schedule::agent-1::sched-1"
    assert operations(g, resource) == [("register", "agent-1"), ("deregister", "agent-1")]


async def mappings(g: Guide, b: Block) -> None:
    out = g.sh(b.code).stdout
    for kind in ("agent", "api_key", "task", "schedule"):
        assert f"{kind}: type={kind}" in out, out
        assert f"ok      {kind} " in out, out


async def api_key_delete(g: Guide, b: Block) -> None:
    key = g.namespace["key"]
    await g.python(b.code, b.name)
    # No request principal in this snippet: the role default is the creator.
    assert g.principal_of(f"api_key:{key.id}", "deregister") == {
        "service_account_id": "agentex-host"
    }


async def shadow_idempotent(g: Guide, b: Block) -> None:
    assert g.sh(b.code).stdout.split() == ["200"] * 4


async def shadow_watch(g: Guide, b: Block) -> None:
    until_nothing_pending(g.database)
    g.sh(b.code)  # reconcile exits 0: consistent


async def backfill(g: Guide, b: Block) -> None:
    # Before capture: a key registered inline at the time, one whose register
    # was skipped, and a deleted key whose deregister failed (an orphan).
    g.sql_as_owner(
        """
        SET session_replication_role = replica;
        INSERT INTO agent_api_keys (id, agent_id, name, api_key_type, api_key, created_at) VALUES
            ('legacy-registered', 'agent-1', 'old-1', 'EXTERNAL', 's', now() - interval '90 days'),
            ('legacy-skipped', 'agent-1', 'old-2', 'EXTERNAL', 's', now() - interval '90 days');
        UPDATE agents SET created_at = now() - interval '90 days';
        """
    )
    for key in ("legacy-registered", "legacy-deleted"):
        body = {
            "principal": {"user_id": "u-old"},
            "resource": {"type": "api_key", "selector": key},
            "parent": {"type": "agent", "selector": "agent-1"},
        }
        assert http_post(f"{g.delivery.auth_url}/v1/authz/register", body) == 200
    g.sh(b.code)
    drift = (g.workdir / "drift.json").read_text()
    assert "legacy-skipped" in drift and "legacy-deleted" in drift, drift
    assert "legacy-registered" not in drift, drift
    until_nothing_pending(g.database)
    g.sh("authz-outbox reconcile")  # exit 0 now


RUNNERS: dict[str, Runner] = {
    "migrate": migrate,
    "grants": grants,
    "role-default": role_default,
    "session-hook": session_hook,
    "middleware": middleware,
    "sql-writer": sql_writer,
    "read-your-writes": read_your_writes,
    "sql-wait": sql_wait,
    "agent-self-registration": agent_self_registration,
    "agent-soft-delete": agent_soft_delete,
    "api-key-delete": api_key_delete,
    "task-create": task_create,
    "task-soft-delete": task_soft_delete,
    "schedule-create": schedule_create,
    "schedule-soft-delete": schedule_soft_delete,
    "mappings": mappings,
    "shadow-idempotent": shadow_idempotent,
    "shadow-watch": shadow_watch,
    "backfill": backfill,
}


def test_every_block_of_the_guide_is_marked_and_has_a_runner():
    names = [b.name for b in blocks(GUIDE.read_text())]
    assert len(names) == len(set(names)), "block names are unique"
    assert set(names) == set(RUNNERS), set(names) ^ set(RUNNERS)


@pytest.fixture
def app_role(database: Database) -> None:
    """The host's role, with what it already has before the cutover: its tables."""
    database.execute(
        f"""
        DO $$ BEGIN
            IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{ROLE}') THEN
                CREATE ROLE {ROLE} LOGIN;
            END IF;
        END $$;
        GRANT SELECT, INSERT, UPDATE, DELETE
            ON agents, agent_api_keys, tasks, task_agents, agent_task_tracker, agent_run_schedules
            TO {ROLE};
        """
    )


async def test_the_guide_runs_top_to_bottom(
    database: Database, delivery: Delivery, app_role: None, tmp_path: Path
):
    guide = Guide(database, delivery, tmp_path)
    guide.namespace.update(
        AgentORM=host_models.AgentORM,
        AgentAPIKeyORM=host_models.AgentAPIKeyORM,
        AgentAPIKeyType=host_models.AgentAPIKeyType,
    )
    # An agent the host already has (the snippets write keys for it).
    database.execute(
        "SELECT set_config('authz_outbox.principal', '{\"user_id\":\"u-123\"}', false);"
        "INSERT INTO agents (id, name, description, status)"
        " VALUES ('agent-1', 'agent-1', '', 'READY')"
    )
    try:
        for block in blocks(GUIDE.read_text()):
            try:
                await RUNNERS[block.name](guide, block)
            except BaseException as e:
                e.add_note(f"in {GUIDE.name}:{block.line} ({block.name})")
                raise
    finally:
        engine = guide.namespace.get("async_engine")
        if engine is not None:
            await engine.dispose()
        os.environ.pop("ASYNC_DATABASE_URL", None)
