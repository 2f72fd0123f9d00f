"""Who is writing: the request's principal, wherever authentication puts it.

Inside an HTTP request the principal lives in a **per-request holder**, a
small mutable object that :class:`PrincipalMiddleware` creates and puts in a
context variable before it calls the rest of the app. Every context of that
request (inner middlewares, FastAPI dependencies, sync endpoints and
dependencies run in the thread pool, background tasks) sees the *same*
holder, so :func:`set_principal` called from any of them is seen by all the
others, whichever order the middlewares are wired in. A plain context
variable would not do: a value set in a thread-pool dependency, or below a
``BaseHTTPMiddleware``'s ``call_next``, never reaches the context the
endpoint writes from.

The session hook (:mod:`authz_outbox_host.session`) asks for the principal
when a transaction begins, and again right before a statement that writes.
Inside a request whose holder is still empty by then a write raises
:class:`PrincipalMissing`: a mis-wired host fails loudly instead of
registering every write to the role default. Outside any request (scripts,
jobs, alembic) nothing is set and the role default applies, as before.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Final, TypeAlias

Principal = Mapping[str, Any]


class _RoleDefault:
    """The type of :data:`USE_ROLE_DEFAULT`."""

    def __repr__(self) -> str:
        return "USE_ROLE_DEFAULT"


#: Says "this write is meant to carry the role default": inside a request that
#: writes on nobody's behalf (a public sign-up, a webhook), run the write
#: under ``principal_scope(USE_ROLE_DEFAULT)`` or call
#: ``set_principal(USE_ROLE_DEFAULT)``. Without it such a write raises.
USE_ROLE_DEFAULT: Final = _RoleDefault()

PrincipalOrDefault: TypeAlias = Principal | _RoleDefault


class PrincipalMissing(RuntimeError):
    """A write inside an HTTP request before anything told who is writing.

    Raised by the session hook instead of letting the write fall back to the
    role default. Usually a wiring error: the authentication step runs after
    the write, or never calls :func:`set_principal` (or stores the principal
    where the middleware's ``resolve`` does not look)."""

    def __init__(self, statement: str | None = None) -> None:
        what = f" ({statement})" if statement else ""
        super().__init__(
            f"a write inside an HTTP request{what}, but no principal was set for the request: "
            "call authz_outbox_host.set_principal(principal) where the request is "
            "authenticated (or make PrincipalMiddleware's resolve find it); a write that is "
            "meant to carry the role default runs under principal_scope(USE_ROLE_DEFAULT). "
            "See docs/host-integration.md, section 2.2."
        )


Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
#: ``resolve(scope)``: a plain function is read lazily, each time a
#: transaction asks (so it sees what an inner authentication step stored in
#: the scope); a coroutine function is the authentication itself and is
#: awaited once, before the rest of the app runs.
Resolver = Callable[[Scope], PrincipalOrDefault | None | Awaitable[PrincipalOrDefault | None]]


class _RequestPrincipal:
    """The holder: one per HTTP request, shared by every context of it."""

    __slots__ = ("principal", "resolvers")

    def __init__(self) -> None:
        #: What :func:`set_principal` (or an async ``resolve``) said.
        self.principal: PrincipalOrDefault | None = None
        #: Sync ``resolve`` functions with the scope each middleware saw,
        #: outermost first, read lazily.
        self.resolvers: list[tuple[Callable[[Scope], Any], Scope]] = []

    def get(self) -> PrincipalOrDefault | None:
        if self.principal is not None:
            return self.principal
        for resolve, scope in self.resolvers:
            found = resolve(scope)
            if inspect.isawaitable(found):
                close = getattr(found, "close", None)
                if close is not None:
                    close()
                raise TypeError(
                    f"{resolve!r} returned an awaitable; an async resolve must be an "
                    "`async def` (it is then awaited before the app runs)"
                )
            if found is not None:
                return found
        return None


class _Unset:
    pass


_UNSET: Final = _Unset()

#: The holder of the HTTP request being served, if any.
_request: ContextVar[_RequestPrincipal | None] = ContextVar("authz_outbox_request", default=None)
#: An explicit principal for a block (:func:`principal_scope`), or set outside
#: any request (:func:`set_principal`); it wins over the request's.
_explicit: ContextVar[PrincipalOrDefault | None | _Unset] = ContextVar(
    "authz_outbox_principal", default=_UNSET
)

#: The key under which the holder also rides in the ASGI scope, so that a
#: second PrincipalMiddleware on the same request shares it.
SCOPE_KEY: Final = "authz_outbox_host.request_principal"


def _effective() -> tuple[PrincipalOrDefault | None, bool]:
    """The principal in force and whether the code runs inside a request."""
    request = _request.get()
    explicit = _explicit.get()
    if not isinstance(explicit, _Unset):
        return explicit, request is not None
    if request is None:
        return None, False
    return request.get(), True


def transaction_principal(statement: str | None = None) -> Principal | None:
    """What a transaction must carry now: a principal, or ``None`` for the
    role default (outside a request, or under :data:`USE_ROLE_DEFAULT`).
    Raises :class:`PrincipalMissing` inside a request that has none."""
    principal, in_request = _effective()
    if isinstance(principal, _RoleDefault):
        return None
    if principal is None and in_request:
        raise PrincipalMissing(statement)
    return principal


def current_principal() -> Principal | None:
    """The principal of the code running now; ``None`` when there is none
    yet, or when the role default is meant."""
    principal, _ = _effective()
    return None if isinstance(principal, _RoleDefault) else principal


def in_request() -> bool:
    """Whether the code runs inside a request served by PrincipalMiddleware."""
    return _request.get() is not None


def set_principal(principal: PrincipalOrDefault | None) -> None:
    """Tells who the current request is: call it where the request is
    authenticated (a middleware, inside or outside PrincipalMiddleware, or a
    sync or async dependency), right after agentex-auth's ``/v1/authn``
    answered. The whole principal may be passed: only identity fields are
    ever stored. Inside a request it holds until the request ends, in every
    context of it; outside one (an authentication middleware that runs
    before PrincipalMiddleware, a script) it holds for the rest of the
    current context."""
    request = _request.get()
    if request is not None:
        request.principal = principal
    else:
        _explicit.set(principal)


@contextmanager
def principal_scope(principal: PrincipalOrDefault | None) -> Iterator[None]:
    """Runs a block as ``principal`` (background jobs, scripts, tests; or a
    part of a request that writes on someone else's behalf). ``None``
    means nobody: the role default outside a request, an error inside one."""
    token = _explicit.set(principal)
    try:
        yield
    finally:
        _explicit.reset(token)


def principal_json(principal: Principal) -> str:
    """The setting's value. The capture trigger keeps only the identity fields
    (``user_id``, ``service_account_id``, ``account_id``, ``principal_type``),
    so a credential that rides along in the provider's principal is dropped
    before anything is stored."""
    return json.dumps(dict(principal), separators=(",", ":"), sort_keys=True)


def _is_async(resolve: Resolver) -> bool:
    return inspect.iscoroutinefunction(resolve) or inspect.iscoroutinefunction(
        getattr(resolve, "__call__", None)  # noqa: B004 (an object with an async __call__)
    )


class PrincipalMiddleware:
    """Plain ASGI middleware (no framework needed) that marks "this code
    serves an HTTP request": it gives the request a principal holder that
    :func:`set_principal` fills, wherever it is called from. Wire it anywhere:
    around the app (``app = PrincipalMiddleware(app)``) or with
    ``app.add_middleware(PrincipalMiddleware)``, before or after the
    authentication middleware.

    ``resolve`` (optional) finds the principal from the ASGI scope. A plain
    function is called lazily, when a transaction begins or writes, so it
    sees what the authentication step stored in the scope even when that
    step runs inside this middleware. An ``async def`` is awaited once before
    the rest of the app (it authenticates by itself, e.g. calls
    ``/v1/authn``).

    A write in a request for which nothing found a principal raises
    :class:`PrincipalMissing`; anonymous endpoints that write say
    :data:`USE_ROLE_DEFAULT`.
    """

    def __init__(self, app: ASGIApp, resolve: Resolver | None = None) -> None:
        self.app = app
        self.resolve = resolve

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request = scope.get(SCOPE_KEY)
        if not isinstance(request, _RequestPrincipal):
            request = _RequestPrincipal()
            scope[SCOPE_KEY] = request
        if self.resolve is not None:
            if _is_async(self.resolve):
                found = await self.resolve(scope)  # type: ignore[misc]
                if found is not None and request.principal is None:
                    request.principal = found
            else:
                request.resolvers.append((self.resolve, scope))
        token = _request.set(request)
        try:
            await self.app(scope, receive, send)
        finally:
            _request.reset(token)
