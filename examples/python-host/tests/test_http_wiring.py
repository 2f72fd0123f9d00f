"""Mis-ordered wiring cannot go silent: a real FastAPI app over HTTP (uvicorn),
a real PostgreSQL and the real capture triggers, for every way a host may
wire the principal (tests/http_host.py: the middleware around the app, added
before or after the authentication middleware, a sync or an async
dependency, an async ``resolve``), and every way of writing (async and sync
ORM, async and sync Core).

In every wiring a write is registered to the request's user, and a write in
a request that has no principal fails loudly (``PrincipalMissing``) instead
of being registered to the role default. Before, the middleware read the
principal before authentication had set it (or a context variable set in the
thread pool never came back), and every such write went to the role default.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from fastapi import Depends, Request
from sqlalchemy import Engine, func, select
from sqlalchemy.ext.asyncio import AsyncSession

import authz_outbox_host
from authz_outbox_host import PrincipalMiddleware

from .conftest import ROLE_DEFAULT, Database, outbox
from .host_models import AgentORM
from .http_host import (
    AGENTS,
    WIRINGS,
    WRITE_KINDS,
    Engines,
    authn,
    fastapi_app,
    serve,
    sync_engines,
)

ALICE = {"user_id": "alice", "account_id": "acc-1"}


def principals(database: Database) -> dict[str, Any]:
    return {f"{r['resource_type']}:{r['resource_id']}": r["principal"] for r in outbox(database)}


def agent_ids(database: Database) -> list[str]:
    return [row[0] for row in database.execute("SELECT id FROM agents ORDER BY id")]


@pytest.fixture(scope="module")
def sync_pair(database: Database) -> Iterator[tuple[Engine, Engine]]:
    orm, core = sync_engines(database)
    yield orm, core
    orm.dispose()
    core.dispose()


@pytest.fixture(scope="module", params=list(WIRINGS))
def host(
    request: pytest.FixtureRequest, database: Database, sync_pair: tuple[Engine, Engine]
) -> Iterator[httpx.Client]:
    """The host app in one wiring, served by uvicorn; a client for it."""
    engines = Engines(database, *sync_pair)
    with (
        serve(WIRINGS[request.param](engines)) as url,
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        yield client


@pytest.mark.parametrize("kind", WRITE_KINDS)
def test_a_write_is_registered_to_the_requests_user(
    host: httpx.Client, database: Database, kind: str
):
    response = host.post(f"/{kind}/a1", headers={"x-user": "alice"})
    assert response.status_code == 200, response.text
    # The user, not the role default; the api key in the principal is dropped.
    assert principals(database) == {"agent:a1": ALICE}


@pytest.mark.parametrize("kind", WRITE_KINDS)
def test_a_write_without_a_principal_fails_loudly(
    host: httpx.Client, database: Database, kind: str
):
    response = host.post(f"/{kind}/a1")
    assert response.status_code == 500, response.text
    assert response.json()["error"] == "PrincipalMissing", response.text
    # Nothing was written, so nothing is registered to the role default.
    assert agent_ids(database) == []
    assert outbox(database) == []


def test_reads_and_deliberate_role_default_writes_need_no_principal(
    host: httpx.Client, database: Database
):
    response = host.get("/count")
    assert (response.status_code, response.json()) == (200, {"agents": 0}), response.text
    response = host.post("/public/p1")
    assert response.status_code == 200, response.text
    assert principals(database) == {"agent:p1": ROLE_DEFAULT}


def test_concurrent_requests_each_write_as_their_own_user(host: httpx.Client, database: Database):
    def call(n: int) -> int:
        user = None if n % 4 == 0 else f"user-{n % 3}"
        headers = {"x-user": user} if user else {}
        kind = WRITE_KINDS[n % len(WRITE_KINDS)]
        return host.post(f"/{kind}/a{n}", headers=headers).status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(call, range(32)))
    assert statuses == [500 if n % 4 == 0 else 200 for n in range(32)]
    assert principals(database) == {
        f"agent:a{n}": {"user_id": f"user-{n % 3}", "account_id": "acc-1"}
        for n in range(32)
        if n % 4
    }


# --- Authentication that reads the database first ---------------------------


@pytest.fixture
def late_host(database: Database, sync_pair: tuple[Engine, Engine]) -> Iterator[httpx.Client]:
    """Authentication looks the caller up in the request's own session (so
    the transaction begins before anyone knows who is calling), then the
    endpoint writes in that same transaction."""
    engines = Engines(database, *sync_pair)
    app = fastapi_app(engines)

    async def session() -> AsyncIterator[AsyncSession]:
        assert engines.async_sessions is not None
        async with engines.async_sessions() as s:
            yield s

    async def authenticate(request: Request, s: AsyncSession = Depends(session)) -> None:  # noqa: B008
        await s.execute(select(func.count()).select_from(AGENTS))
        principal = authn(request.headers)
        if principal is not None:
            authz_outbox_host.set_principal(principal)

    @app.post("/late/{agent_id}", dependencies=[Depends(authenticate)])
    async def late(agent_id: str, s: AsyncSession = Depends(session)) -> dict[str, str]:  # noqa: B008
        assert s.in_transaction(), "the same transaction as the authentication's read"
        s.add(AgentORM(id=agent_id, name=agent_id))
        await s.commit()
        return {"written": agent_id}

    app.add_middleware(PrincipalMiddleware)
    with serve(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


def test_a_principal_set_after_the_transaction_began_still_reaches_the_write(
    late_host: httpx.Client, database: Database
):
    response = late_host.post("/late/a1", headers={"x-user": "alice"})
    assert response.status_code == 200, response.text
    assert principals(database) == {"agent:a1": ALICE}
    response = late_host.post("/late/a2")
    assert response.status_code == 500, response.text
    assert response.json()["error"] == "PrincipalMissing", response.text
    assert principals(database) == {"agent:a1": ALICE}
