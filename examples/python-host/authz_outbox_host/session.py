"""The hook: every transaction carries the creator of its writes.

When a transaction begins, the hook runs, on its connection::

    SELECT set_config('authz_outbox.principal', :principal, true)

``true`` makes the setting local to the transaction: PostgreSQL drops it at
COMMIT or ROLLBACK, so a pooled connection handed to the next request (or a
Session reused for the next request) starts without it, and the next
transaction gets the principal of *its* request, or none.

Right before each statement that writes (INSERT, UPDATE, DELETE, MERGE, or
SQL text that starts like one), the hook asks for the principal again:

- inside an HTTP request whose principal is still unknown, the write raises
  :class:`~authz_outbox_host.PrincipalMissing` (it would otherwise be
  registered to the role default);
- if the principal became known after the transaction began (authentication
  read the database in the same transaction, then called ``set_principal``),
  the setting is set then, before the write;
- outside any request with no principal, nothing is set, so a role default
  (``ALTER ROLE app SET authz_outbox.principal = ...``) applies.

Reads never raise: an anonymous request may read, and authentication may
read before it knows who is calling.

Two ways to install it (:func:`install`), both may be used at once:

- on an **engine** (``Engine`` or ``AsyncEngine``): every connection of it,
  ORM sessions and Core connections (``engine.begin()``,
  ``connection.execute(insert(...))``) alike;
- on a **Session class**, a ``sessionmaker`` or one session: the ORM only;
  each connection such a session begins a transaction on gets the same
  per-statement check.

Savepoints (``begin_nested``) run inside the transaction that already has the
setting; rolling one back leaves it in place. A setting the hook had to set
inside a savepoint is set again after it, since rolling the savepoint back
would undo it. Not detected as writes: a ``SELECT`` of a function that
writes. Its transaction still carries the principal when it was known at
BEGIN.
"""

from __future__ import annotations

import re
from typing import Any
from weakref import WeakKeyDictionary

from sqlalchemy import event, text
from sqlalchemy.engine import Connection, Engine, ExecutionContext
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

from .contract import PRINCIPAL_SETTING
from .principal import PrincipalMissing, principal_json, transaction_principal

_SET_PRINCIPAL = text(f"SELECT set_config('{PRINCIPAL_SETTING}', :principal, true)")

Target = (
    Engine
    | AsyncEngine
    | type[Session]
    | sessionmaker[Any]
    | Session
    | AsyncSession
    | type[AsyncSession]
)

#: What the hook set in each connection's current transaction (``None``:
#: nothing yet). Reset whenever a transaction begins.
_applied: WeakKeyDictionary[Connection, str | None] = WeakKeyDictionary()

# Comments, blanks and opening parentheses before a statement's first word.
_LEAD = r"(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/|\()*"
_WRITE_SQL = re.compile(
    _LEAD + r"(?:insert|update|delete|merge|truncate|call|do|copy\b[^;]*\bfrom)\b",
    re.IGNORECASE | re.DOTALL,
)
_WITH_SQL = re.compile(_LEAD + r"with\b", re.IGNORECASE | re.DOTALL)
_DML_WORD = re.compile(r"\b(?:insert|update|delete|merge)\b", re.IGNORECASE)


def writes(statement: str, context: ExecutionContext | None = None) -> bool:
    """Whether a statement about to run may write rows (and so fire capture)."""
    if context is not None:
        if context.isinsert or context.isupdate or context.isdelete:
            return True
        if context.isddl or not context.is_text:
            return False
    if _WRITE_SQL.match(statement):
        return True
    return bool(_WITH_SQL.match(statement) and _DML_WORD.search(statement))


def _set(connection: Connection, value: str) -> None:
    connection.execute(_SET_PRINCIPAL, {"principal": value})
    # A setting made inside a savepoint is undone if the savepoint rolls back:
    # remember only what holds for the whole transaction.
    if not connection.in_nested_transaction():
        _applied[connection] = value


def _on_begin(connection: Connection) -> None:
    """A transaction begins: set the principal if it is known already."""
    _applied[connection] = None
    try:
        principal = transaction_principal()
    except PrincipalMissing:
        return  # not known yet: reads may run; a write asks again
    if principal is not None:
        _set(connection, principal_json(principal))


def _before_statement(
    connection: Connection,
    cursor: Any,
    statement: str,
    parameters: Any,
    context: ExecutionContext | None,
    executemany: bool,
) -> None:
    """Before each statement: a write needs the principal in the setting."""
    if not writes(statement, context):
        return
    principal = transaction_principal(_summary(statement))
    if principal is None:
        return  # outside a request, or the role default on purpose
    value = principal_json(principal)
    if _applied.get(connection) != value:
        _set(connection, value)


def _summary(statement: str) -> str:
    one_line = " ".join(statement.split())
    return one_line if len(one_line) <= 60 else one_line[:57] + "..."


_CONNECTION_EVENTS = (("begin", _on_begin), ("before_cursor_execute", _before_statement))


def _listen(target: Engine | Connection) -> None:
    for name, fn in _CONNECTION_EVENTS:
        if not event.contains(target, name, fn):
            event.listen(target, name, fn)


def set_transaction_principal(
    session: Session, transaction: SessionTransaction, connection: Connection
) -> None:
    """The session's ``after_begin`` listener: hooks the connection the
    session's transaction runs on, unless its engine is hooked already."""
    if transaction.nested:
        return
    if event.contains(connection.engine, "begin", _on_begin) or event.contains(
        connection, "begin", _on_begin
    ):
        return  # the connection's begin event already ran the hook
    _listen(connection)
    _on_begin(connection)  # this transaction began before the listener existed


def install(target: Target) -> None:
    """Installs the hook on ``target``: an ``Engine`` or ``AsyncEngine``
    (every connection: ORM and Core), or for the ORM only a Session class
    (all its sessions, including the sync side of every AsyncSession built on
    it), a ``sessionmaker``, one Session, one AsyncSession, or an AsyncSession
    class (its ``sync_session_class``). Installing twice is harmless."""
    if isinstance(target, AsyncEngine | Engine):
        _listen(_sync_engine(target))
        return
    sync_target = _sync_target(target)
    if not event.contains(sync_target, "after_begin", set_transaction_principal):
        event.listen(sync_target, "after_begin", set_transaction_principal)


def uninstall(target: Target) -> None:
    """Removes the hook again (tests, or a staged rollback). Connections that
    a session already hooked keep their listeners until they are closed."""
    if isinstance(target, AsyncEngine | Engine):
        engine = _sync_engine(target)
        for name, fn in _CONNECTION_EVENTS:
            if event.contains(engine, name, fn):
                event.remove(engine, name, fn)
        return
    sync_target = _sync_target(target)
    if event.contains(sync_target, "after_begin", set_transaction_principal):
        event.remove(sync_target, "after_begin", set_transaction_principal)


def _sync_engine(target: Engine | AsyncEngine) -> Engine:
    """Connection events live on the sync engine behind an AsyncEngine."""
    return target.sync_engine if isinstance(target, AsyncEngine) else target


def _sync_target(target: Target) -> Any:
    """Session events live on the sync side: an AsyncSession runs its ORM work
    through a plain Session (``sync_session``), built from
    ``sync_session_class``."""
    if isinstance(target, AsyncSession):
        return target.sync_session
    if isinstance(target, type) and issubclass(target, AsyncSession):
        return target.sync_session_class
    return target
