"""Read-your-writes by resource, from Python.

After committing a write, wait until agentex-auth has it::

    await session.commit()
    await wait_for_resource_async(session, "api_key", key.id, timeout=5)

This calls the SQL function ``authz_outbox_wait_for_resource`` (one round
trip; the waiting happens in PostgreSQL, polling the resource's few outbox
rows with a short sleep, never a client-side loop). It answers once the
resource's newest captured change is delivered (or settled without a
request), at once when that change is dead, or when the timeout passes.

Call it **after** commit: in a transaction that has itself written, the
rows to wait for are invisible to the worker, and PostgreSQL refuses
(:class:`WaitRefused`); so it does under REPEATABLE READ or SERIALIZABLE,
where no progress could ever be seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection, Row
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Session

from .contract import (
    MAX_TIMEOUT,
    SETTLED_OUTCOMES,
    WAIT_FUNCTION,
    WAIT_REFUSED_SQLSTATE,
    WAIT_RESULT,
)

_WAIT = text(
    f"SELECT {', '.join(name for name, _ in WAIT_RESULT)} "
    f"FROM {WAIT_FUNCTION}("
    ":resource_type, :resource_id, CAST(:seconds AS double precision) * interval '1 second')"
)


@dataclass(frozen=True)
class Delivered:
    """Nothing is pending for the resource any more."""

    resource: str
    #: ``delivered``, or ``superseded`` (settled without a request, e.g. a key
    #: created and deleted before any delivery).
    outcome: str
    #: The ZedToken agentex-auth answered for the newest change, if any.
    consistency_token: str | None
    outbox_id: int


class WaitError(Exception):
    """The resource's change is not (yet) in agentex-auth."""


class DeliveryTimeout(WaitError):
    """Still pending when the timeout passed. The write stands; the worker
    delivers it later (or is down: see ``authz-outbox status``)."""

    def __init__(self, resource: str, timeout: timedelta, detail: str | None) -> None:
        super().__init__(detail or f"{resource} still pending after {timeout}")
        self.resource = resource
        self.timeout = timeout


class DeliveryDead(WaitError):
    """The newest change is dead: it will not be delivered until its cause is
    fixed and it is replayed (``authz-outbox replay --resource TYPE:ID``)."""

    def __init__(self, resource: str, error: str, outbox_id: int) -> None:
        super().__init__(f"{resource}: outbox row {outbox_id} is dead: {error}")
        self.resource = resource
        self.error = error
        self.outbox_id = outbox_id


class NothingCaptured(WaitError):
    """No outbox row exists for the resource: a wrong type or id, a table
    that is not captured, or rows pruned after their retention."""


class WaitRefused(WaitError):
    """PostgreSQL refused to wait in this transaction (see the module's
    docstring); commit first, or use a READ COMMITTED connection."""


def wait_for_resource(
    bind: Session | Connection,
    resource_type: str,
    resource_id: str,
    timeout: float | timedelta = 5.0,
) -> Delivered:
    """Blocks until ``resource_type:resource_id`` has nothing pending."""
    seconds, window = _seconds(timeout)
    try:
        row = bind.execute(_WAIT, _params(resource_type, resource_id, seconds)).one()
    except DBAPIError as e:
        _raise_if_refused(e)
        raise
    return _answer(f"{resource_type}:{resource_id}", window, row)


async def wait_for_resource_async(
    bind: AsyncSession | AsyncConnection,
    resource_type: str,
    resource_id: str,
    timeout: float | timedelta = 5.0,
) -> Delivered:
    """:func:`wait_for_resource` for asyncio sessions and connections."""
    seconds, window = _seconds(timeout)
    try:
        result = await bind.execute(_WAIT, _params(resource_type, resource_id, seconds))
    except DBAPIError as e:
        _raise_if_refused(e)
        raise
    return _answer(f"{resource_type}:{resource_id}", window, result.one())


def _seconds(timeout: float | timedelta) -> tuple[float, timedelta]:
    window = timeout if isinstance(timeout, timedelta) else timedelta(seconds=timeout)
    if window < timedelta(0) or window > MAX_TIMEOUT:
        raise ValueError(f"timeout must be between 0 and {MAX_TIMEOUT}, got {window}")
    return window.total_seconds(), window


def _params(resource_type: str, resource_id: str, seconds: float) -> dict[str, Any]:
    return {"resource_type": resource_type, "resource_id": resource_id, "seconds": seconds}


def _answer(resource: str, window: timedelta, row: Row[Any]) -> Delivered:
    outcome, error, token, outbox_id = row
    if outcome in SETTLED_OUTCOMES:
        return Delivered(resource, outcome, token, outbox_id)
    if outcome == "dead":
        raise DeliveryDead(resource, error or "", outbox_id)
    if outcome == "timeout":
        raise DeliveryTimeout(resource, window, error)
    if outcome == "none":
        raise NothingCaptured(f"{resource} has no outbox row")
    raise WaitError(f"{resource}: unknown outcome {outcome!r}")


def _raise_if_refused(e: DBAPIError) -> None:
    """SQLSTATE 25000 (invalid transaction state) is the function's refusal;
    anything else is the database's own error, left to propagate as is."""
    code = getattr(e.orig, "sqlstate", None) or getattr(e.orig, "pgcode", None)
    if code == WAIT_REFUSED_SQLSTATE:
        raise WaitRefused(str(e.orig).splitlines()[0]) from e
