"""A small FastAPI host, served over real HTTP by uvicorn, wired to the
session hook in each of the ways a host may wire it.

Authentication is played by the host's usual pieces: a ``BaseHTTPMiddleware``
(which stores the principal on ``request.state``, or calls
``set_principal``), or a FastAPI dependency, sync (run in the thread pool)
or async. The principal it finds is what agentex-auth's ``/v1/authn`` would
answer for the ``x-user`` header: identity fields plus the caller's api key,
which must never reach the outbox.

Every wiring serves the same endpoints, one per way of writing: the async
ORM, async Core (``engine.begin()``), and the same two from sync endpoints
(FastAPI runs those in its thread pool).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy import Engine, create_engine, func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import sessionmaker
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.responses import Response

import authz_outbox_host
from authz_outbox_host import USE_ROLE_DEFAULT, PrincipalMiddleware, PrincipalMissing

from .conftest import Database
from .host_models import AgentORM, HostSession

AGENTS = AgentORM.__table__
#: The kinds of write every wiring serves: ``POST /{kind}/{agent_id}``.
WRITE_KINDS = ("orm", "core", "sync-orm", "sync-core")


def authn(headers: Any) -> dict[str, str] | None:
    """What agentex-auth's /v1/authn answers for the request (the test's
    stand-in reads a header); ``None`` for an anonymous request."""
    user = headers.get("x-user")
    if not user:
        return None
    return {"user_id": user, "account_id": "acc-1", "api_key": "agx_secret"}


def request_principal(scope: Any) -> Any:
    """A lazy ``resolve``: what the authentication middleware stored."""
    return scope.get("state", {}).get("principal")


async def authenticating_resolve(scope: Any) -> Any:
    """An async ``resolve`` that authenticates by itself."""
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
    return authn(headers)


class AuthenticateToState(BaseHTTPMiddleware):
    """The host's authentication middleware, storing the principal on the request."""

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        request.state.principal = authn(request.headers)
        return await call_next(request)


class AuthenticateAndSet(BaseHTTPMiddleware):
    """The host's authentication middleware with the guide's one added call."""

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        principal = authn(request.headers)
        if principal is not None:
            authz_outbox_host.set_principal(principal)
        return await call_next(request)


def authenticate_sync(request: Request) -> None:
    """A sync dependency: FastAPI runs it in the thread pool, in a copy of
    the request's context, so a context variable it sets is lost."""
    principal = authn(request.headers)
    if principal is not None:
        authz_outbox_host.set_principal(principal)


async def authenticate_async(request: Request) -> None:
    principal = authn(request.headers)
    if principal is not None:
        authz_outbox_host.set_principal(principal)


@dataclass
class Engines:
    """What the endpoints write with. The ORM goes through sessions built on
    ``HostSession`` (the hook on the session class) over engines without the
    hook; Core through engines with the hook (``install(engine)``)."""

    database: Database
    sync_orm: Engine
    sync_core: Engine
    async_sessions: async_sessionmaker[AsyncSession] | None = None
    async_core: Any = None


def router(engines: Engines, dependencies: list[Any]) -> APIRouter:
    api = APIRouter(dependencies=dependencies)
    sync_sessions = sessionmaker(engines.sync_orm, class_=HostSession)

    def agent(agent_id: str) -> dict[str, str]:
        return {"id": agent_id, "name": agent_id, "description": "", "status": "READY"}

    @api.post("/orm/{agent_id}")
    async def orm(agent_id: str) -> dict[str, str]:
        assert engines.async_sessions is not None
        async with engines.async_sessions() as session:
            session.add(AgentORM(id=agent_id, name=agent_id))
            await session.commit()
        return {"written": agent_id}

    @api.post("/core/{agent_id}")
    async def core(agent_id: str) -> dict[str, str]:
        async with engines.async_core.begin() as conn:
            await conn.execute(insert(AGENTS).values(**agent(agent_id)))
        return {"written": agent_id}

    @api.post("/sync-orm/{agent_id}")
    def sync_orm(agent_id: str) -> dict[str, str]:
        with sync_sessions() as session:
            session.add(AgentORM(id=agent_id, name=agent_id))
            session.commit()
        return {"written": agent_id}

    @api.post("/sync-core/{agent_id}")
    def sync_core(agent_id: str) -> dict[str, str]:
        with engines.sync_core.begin() as conn:
            conn.execute(insert(AGENTS).values(**agent(agent_id)))
        return {"written": agent_id}

    @api.post("/public/{agent_id}")
    async def public(agent_id: str) -> dict[str, str]:
        """Writes on nobody's behalf, on purpose: the role default."""
        assert engines.async_sessions is not None
        with authz_outbox_host.principal_scope(USE_ROLE_DEFAULT):
            async with engines.async_sessions() as session:
                session.add(AgentORM(id=agent_id, name=agent_id))
                await session.commit()
        return {"written": agent_id}

    @api.get("/count")
    async def count() -> dict[str, int]:
        """A read: needs no principal, anonymous or not."""
        assert engines.async_sessions is not None
        async with engines.async_sessions() as session:
            n = (await session.execute(select(func.count()).select_from(AGENTS))).scalar_one()
        async with engines.async_core.connect() as conn:
            await conn.execute(select(func.count()).select_from(AGENTS))
        return {"agents": n}

    return api


def fastapi_app(engines: Engines, dependencies: list[Any] | None = None) -> FastAPI:
    """The host's app: engines opened on the server's event loop."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        url = engines.database.sqlalchemy("asyncpg", as_writer=True)
        orm_engine = create_async_engine(url, pool_size=4)
        core_engine = create_async_engine(url, pool_size=4)
        authz_outbox_host.install(core_engine)
        engines.async_sessions = async_sessionmaker(
            orm_engine, sync_session_class=HostSession, expire_on_commit=False
        )
        engines.async_core = core_engine
        try:
            yield
        finally:
            await orm_engine.dispose()
            await core_engine.dispose()

    app = FastAPI(lifespan=lifespan)
    app.include_router(router(engines, dependencies or []))

    @app.exception_handler(PrincipalMissing)
    async def principal_missing(request: Request, exc: PrincipalMissing) -> JSONResponse:
        return JSONResponse({"error": "PrincipalMissing", "detail": str(exc)}, status_code=500)

    return app


def sync_engines(database: Database) -> tuple[Engine, Engine]:
    """psycopg engines as the writer role: one plain (the ORM's sessions
    carry the hook), one with the hook installed (Core)."""
    url = database.sqlalchemy("psycopg", as_writer=True)
    core = create_engine(url, pool_size=4)
    authz_outbox_host.install(core)
    return create_engine(url, pool_size=4), core


Wiring = Callable[[Engines], Any]


def wrapper_around_state_auth(engines: Engines) -> Any:
    """(a) ``app = PrincipalMiddleware(app, resolve=...)``, authentication inside."""
    app = fastapi_app(engines)
    app.add_middleware(AuthenticateToState)
    return PrincipalMiddleware(app, resolve=request_principal)


def wrapper_around_set_auth(engines: Engines) -> Any:
    """(a) ``app = PrincipalMiddleware(app)``, authentication inside calls set_principal."""
    app = fastapi_app(engines)
    app.add_middleware(AuthenticateAndSet)
    return PrincipalMiddleware(app)


def added_before_state_auth(engines: Engines) -> Any:
    """(b) ``add_middleware(PrincipalMiddleware)`` first: authentication is outside it."""
    app = fastapi_app(engines)
    app.add_middleware(PrincipalMiddleware, resolve=request_principal)
    app.add_middleware(AuthenticateToState)
    return app


def added_before_set_auth(engines: Engines) -> Any:
    app = fastapi_app(engines)
    app.add_middleware(PrincipalMiddleware)
    app.add_middleware(AuthenticateAndSet)
    return app


def added_after_state_auth(engines: Engines) -> Any:
    """(c) ``add_middleware(PrincipalMiddleware)`` last: authentication is inside it."""
    app = fastapi_app(engines)
    app.add_middleware(AuthenticateToState)
    app.add_middleware(PrincipalMiddleware, resolve=request_principal)
    return app


def added_after_set_auth(engines: Engines) -> Any:
    app = fastapi_app(engines)
    app.add_middleware(AuthenticateAndSet)
    app.add_middleware(PrincipalMiddleware)
    return app


def sync_dependency(engines: Engines) -> Any:
    """(d) a sync dependency authenticates (in the thread pool)."""
    app = fastapi_app(engines, [Depends(authenticate_sync)])
    app.add_middleware(PrincipalMiddleware)
    return app


def async_dependency(engines: Engines) -> Any:
    """(e) an async dependency authenticates."""
    app = fastapi_app(engines, [Depends(authenticate_async)])
    app.add_middleware(PrincipalMiddleware)
    return app


def async_resolve(engines: Engines) -> Any:
    """The middleware's own async ``resolve`` authenticates."""
    return PrincipalMiddleware(fastapi_app(engines), resolve=authenticating_resolve)


WIRINGS: dict[str, Wiring] = {
    "a-wrapper-state": wrapper_around_state_auth,
    "a-wrapper-set": wrapper_around_set_auth,
    "b-added-before-auth-state": added_before_state_auth,
    "b-added-before-auth-set": added_before_set_auth,
    "c-added-after-auth-state": added_after_state_auth,
    "c-added-after-auth-set": added_after_set_auth,
    "d-sync-dependency": sync_dependency,
    "e-async-dependency": async_dependency,
    "async-resolve": async_resolve,
}


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """Serves ``app`` with uvicorn on a free port, in a thread with its own
    event loop; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
