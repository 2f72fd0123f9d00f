"""Who is writing: the request's principal, carried in a context variable.

The request's middleware (or the dependency that authenticates it) puts the
principal that agentex-auth's ``/v1/authn`` returned here; the session hook
(:mod:`authz_outbox_host.session`) reads it whenever a transaction begins.

A :class:`contextvars.ContextVar` rather than a global or a session attribute
because each asyncio task and each request gets its own value: concurrent
requests on one event loop never see each other's principal, and FastAPI's
thread pool (``run_in_threadpool``) copies the context into the thread that
runs a sync endpoint.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from contextvars import ContextVar, Token
from typing import Any

Principal = Mapping[str, Any]

_current: ContextVar[Principal | None] = ContextVar("authz_outbox_principal", default=None)


def current_principal() -> Principal | None:
    """The principal of the code running now, or ``None`` outside a request."""
    return _current.get()


def set_principal(principal: Principal | None) -> Token[Principal | None]:
    """Sets the principal for the current context; undo with :func:`reset_principal`."""
    return _current.set(principal)


def reset_principal(token: Token[Principal | None]) -> None:
    _current.reset(token)


@contextmanager
def principal_scope(principal: Principal | None) -> Iterator[None]:
    """Runs a block as ``principal`` (background jobs, scripts, tests)."""
    token = _current.set(principal)
    try:
        yield
    finally:
        _current.reset(token)


def principal_json(principal: Principal) -> str:
    """The setting's value. The capture trigger keeps only the identity fields
    (``user_id``, ``service_account_id``, ``account_id``, ``principal_type``),
    so a credential that rides along in the provider's principal is dropped
    before anything is stored."""
    return json.dumps(dict(principal), separators=(",", ":"), sort_keys=True)


Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Resolver = Callable[[Scope], Awaitable[Principal | None]]


class PrincipalMiddleware:
    """Plain ASGI middleware (no framework needed): resolves the request's
    principal with ``resolve(scope)`` and runs the rest of the request with it
    set. ``resolve`` returns ``None`` for anonymous requests; their writes
    then fall back to the role default (or become dead rows that say so).

    With FastAPI: ``app.add_middleware(PrincipalMiddleware, resolve=...)``.
    A host that authenticates in a dependency instead calls
    :func:`set_principal` there; the value lives until the request ends.
    """

    def __init__(self, app: ASGIApp, resolve: Resolver) -> None:
        self.app = app
        self.resolve = resolve

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        token = _current.set(await self.resolve(scope))
        try:
            await self.app(scope, receive, send)
        finally:
            _current.reset(token)
