"""The session hook: every transaction a Session begins carries the creator.

``after_begin`` fires when a Session's transaction first takes a connection
(autobegin included), before any statement of that transaction runs. The
hook then runs, on that connection::

    SELECT set_config('authz_outbox.principal', :principal, true)

``true`` makes the setting local to the transaction: PostgreSQL drops it at
COMMIT or ROLLBACK, so a pooled connection handed to the next request (or a
Session reused for the next request) starts without it, and the next
transaction gets the principal of *its* request, or none. With no principal
in context nothing is set, so a role default
(``ALTER ROLE app SET authz_outbox.principal = ...``) applies.

Savepoints (``begin_nested``) run inside the transaction that already has the
setting, so the hook does nothing for them; rolling one back leaves the
setting in place.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

from .principal import current_principal, principal_json

_SET_PRINCIPAL = text("SELECT set_config('authz_outbox.principal', :principal, true)")

Target = type[Session] | sessionmaker[Any] | Session | AsyncSession | type[AsyncSession]


def set_transaction_principal(
    session: Session, transaction: SessionTransaction, connection: Connection
) -> None:
    """The ``after_begin`` listener (see the module's docstring)."""
    if transaction.nested:
        return
    principal = current_principal()
    if principal is None:
        return
    connection.execute(_SET_PRINCIPAL, {"principal": principal_json(principal)})


def install(target: Target) -> None:
    """Installs the hook on ``target``: a Session class (all its sessions,
    including the sync side of every AsyncSession built on it), a
    ``sessionmaker``, one Session, one AsyncSession, or an AsyncSession class
    (its ``sync_session_class``). Installing twice is harmless."""
    sync_target = _sync_target(target)
    if not event.contains(sync_target, "after_begin", set_transaction_principal):
        event.listen(sync_target, "after_begin", set_transaction_principal)


def uninstall(target: Target) -> None:
    """Removes the hook again (tests, or a staged rollback)."""
    sync_target = _sync_target(target)
    if event.contains(sync_target, "after_begin", set_transaction_principal):
        event.remove(sync_target, "after_begin", set_transaction_principal)


def _sync_target(target: Target) -> Any:
    """Session events live on the sync side: an AsyncSession runs its ORM work
    through a plain Session (``sync_session``), built from
    ``sync_session_class``."""
    if isinstance(target, AsyncSession):
        return target.sync_session
    if isinstance(target, type) and issubclass(target, AsyncSession):
        return target.sync_session_class
    return target
