"""The session hook against the real PostgreSQL and the real capture triggers:
every ORM write is captured with its request's creator, and the setting never
reaches another request's transaction (reused sessions, pooled connections,
savepoints, concurrent asyncio requests)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

import authz_outbox_host
from authz_outbox_host import (
    USE_ROLE_DEFAULT,
    PrincipalMiddleware,
    PrincipalMissing,
    current_principal,
    principal_scope,
    set_principal,
)
from authz_outbox_host.session import writes

from .conftest import ROLE_DEFAULT, Database, outbox
from .host_models import AgentAPIKeyORM, AgentAPIKeyType, AgentORM, HostSession

ALICE = {"user_id": "alice", "account_id": "acc-1"}
BOB = {"service_account_id": "sa-bob"}
SETTING = text("SELECT current_setting('authz_outbox.principal', true)")


def sessions(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, class_=HostSession, expire_on_commit=False)


def async_sessions(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, sync_session_class=HostSession, expire_on_commit=False)


def principals_by_resource(database: Database) -> dict[str, Any]:
    return {f"{r['resource_type']}:{r['resource_id']}": r["principal"] for r in outbox(database)}


def test_an_orm_write_is_captured_with_the_request_principal(database: Database, engine: Engine):
    with_credential = {**ALICE, "api_key": "agx_secret", "token": "bearer-xyz"}
    with principal_scope(with_credential), sessions(engine)() as session:
        agent = AgentORM(id="a1", name="agent one")
        session.add(agent)
        session.flush()
        key = AgentAPIKeyORM(
            agent_id="a1", name="ci", api_key_type=AgentAPIKeyType.EXTERNAL, api_key="s"
        )
        session.add(key)
        session.commit()
    rows = outbox(database)
    assert [(r["resource_type"], r["operation"], r["state"]) for r in rows] == [
        ("agent", "register", "pending"),
        ("api_key", "register", "pending"),
    ]
    # Only identity fields are stored: the credentials never reach the outbox.
    assert all(r["principal"] == ALICE for r in rows), rows


async def test_an_async_orm_write_is_captured_with_the_request_principal(
    database: Database, async_engine: AsyncEngine
):
    with principal_scope(ALICE):
        async with async_sessions(async_engine)() as session:
            session.add(AgentORM(id="a1", name="agent one"))
            await session.commit()
    assert principals_by_resource(database) == {"agent:a1": ALICE}


def test_without_a_principal_nothing_is_set_and_the_role_default_applies(
    database: Database, engine: Engine
):
    assert current_principal() is None
    with sessions(engine)() as session:
        # The role's default, untouched by the hook.
        assert session.execute(SETTING).scalar_one() == '{"service_account_id":"sa-host"}'
        session.add(AgentORM(id="a1", name="agent one"))
        session.commit()
    assert principals_by_resource(database) == {"agent:a1": ROLE_DEFAULT}


def test_without_the_hook_the_request_principal_is_not_used(database: Database, engine: Engine):
    """The counter-check: what the hook adds is exactly the request's creator."""
    plain = sessionmaker(engine, class_=Session)
    with principal_scope(ALICE), plain() as session:
        session.add(AgentORM(id="a1", name="agent one"))
        session.commit()
    assert principals_by_resource(database) == {"agent:a1": ROLE_DEFAULT}


def test_a_session_reused_across_requests_never_carries_a_principal_over(
    database: Database, engine: Engine
):
    session = sessions(engine)()
    # Request 1: alice.
    with principal_scope(ALICE):
        session.add(AgentORM(id="a1", name="one"))
        session.commit()
    # Request 2: anonymous, same Session object.
    assert session.execute(SETTING).scalar_one() == '{"service_account_id":"sa-host"}'
    session.add(AgentORM(id="a2", name="two"))
    session.commit()
    # Request 3: bob.
    with principal_scope(BOB):
        session.add(AgentORM(id="a3", name="three"))
        session.commit()
    # Request 4: alice's request failed and rolled back; the next one is anonymous.
    with principal_scope(ALICE):
        session.add(AgentORM(id="a4", name="four"))
        session.flush()
        session.rollback()
    session.add(AgentORM(id="a5", name="five"))
    session.commit()
    session.close()
    assert principals_by_resource(database) == {
        "agent:a1": ALICE,
        "agent:a2": ROLE_DEFAULT,
        "agent:a3": BOB,
        "agent:a5": ROLE_DEFAULT,
    }


def test_a_pooled_connection_reaches_the_next_request_without_the_setting(database: Database):
    # One connection in the pool, so both requests get the same backend.
    single = create_engine(
        database.sqlalchemy("psycopg", as_writer=True), pool_size=1, max_overflow=0
    )
    make = sessions(single)
    with principal_scope(ALICE), make() as first:
        pid = first.execute(text("SELECT pg_backend_pid()")).scalar_one()
        assert first.execute(SETTING).scalar_one() == '{"account_id":"acc-1","user_id":"alice"}'
        first.add(AgentORM(id="a1", name="one"))
        first.commit()
    with make() as second:
        assert second.execute(text("SELECT pg_backend_pid()")).scalar_one() == pid
        assert second.execute(SETTING).scalar_one() == '{"service_account_id":"sa-host"}'
        second.add(AgentORM(id="a2", name="two"))
        second.commit()
    single.dispose()
    assert principals_by_resource(database) == {"agent:a1": ALICE, "agent:a2": ROLE_DEFAULT}


def test_a_rolled_back_savepoint_keeps_the_setting(database: Database, engine: Engine):
    with principal_scope(ALICE), sessions(engine)() as session:
        # The savepoint is the transaction's first use of the connection.
        with session.begin_nested() as savepoint:
            session.add(AgentORM(id="a1", name="rolled back"))
            session.flush()
            savepoint.rollback()
        assert session.execute(SETTING).scalar_one() == '{"account_id":"acc-1","user_id":"alice"}'
        session.add(AgentORM(id="a2", name="kept"))
        session.flush()
        # A savepoint after other work, rolled back by an error inside it.
        try:
            with session.begin_nested():
                session.add(AgentORM(id="a3", name="kept"))  # duplicate name
                session.flush()
        except Exception:
            pass
        session.add(AgentORM(id="a4", name="four"))
        session.commit()
    assert principals_by_resource(database) == {"agent:a2": ALICE, "agent:a4": ALICE}


async def test_async_savepoint_rollback_keeps_the_setting(
    database: Database, async_engine: AsyncEngine
):
    with principal_scope(BOB):
        async with async_sessions(async_engine)() as session:
            savepoint = await session.begin_nested()
            session.add(AgentORM(id="a1", name="rolled back"))
            await session.flush()
            await savepoint.rollback()
            session.add(AgentORM(id="a2", name="kept"))
            await session.commit()
    assert principals_by_resource(database) == {"agent:a2": BOB}


async def test_concurrent_async_requests_each_write_as_their_own_principal(
    database: Database, async_engine: AsyncEngine
):
    make = async_sessions(async_engine)
    async with make() as session:
        session.add(AgentORM(id="shared", name="shared"))
        await session.commit()

    async def request(n: int) -> None:
        who = {"user_id": f"user-{n}"} if n % 3 else None  # every third is anonymous
        with principal_scope(who):
            async with make() as s:
                await asyncio.sleep(0.001 * (n % 4))
                s.add(
                    AgentAPIKeyORM(
                        id=f"k{n}",
                        agent_id="shared",
                        name=f"k{n}",
                        api_key_type=AgentAPIKeyType.EXTERNAL,
                        api_key="s",
                    )
                )
                await s.flush()
                await asyncio.sleep(0.001 * (n % 5))
                await s.commit()

    await asyncio.gather(*(request(n) for n in range(30)))
    got = principals_by_resource(database)
    for n in range(30):
        want = {"user_id": f"user-{n}"} if n % 3 else ROLE_DEFAULT
        assert got[f"api_key:k{n}"] == want, n


async def test_the_middleware_scopes_the_principal_to_its_request(
    database: Database, async_engine: AsyncEngine
):
    make = async_sessions(async_engine)
    seen: list[Any] = []

    async def resolve(scope: dict[str, Any]) -> dict[str, str] | None:
        # A host calls agentex-auth's /v1/authn here; the test reads a header.
        user = dict(scope["headers"]).get(b"x-user")
        return {"user_id": user.decode()} if user else None

    async def endpoint(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(current_principal())
        async with make() as s:
            s.add(AgentORM(id=scope["path"].strip("/"), name=scope["path"]))
            await s.commit()

    app = PrincipalMiddleware(endpoint, resolve=resolve)

    async def call(path: str, headers: list[tuple[bytes, bytes]]) -> None:
        scope = {"type": "http", "path": path, "headers": headers}
        await app(scope, receive=_never, send=_discard)

    # In this task's own context first: nothing of the request may remain.
    await call("/a1", [(b"x-user", b"carol")])
    assert current_principal() is None, "reset after the request"
    assert not authz_outbox_host.in_request()
    # An anonymous request that writes: loud, not the role default.
    with pytest.raises(PrincipalMissing, match="INSERT INTO agents"):
        await asyncio.gather(call("/a2", []))
    assert sorted(map(str, seen)) == sorted(map(str, [{"user_id": "carol"}, None]))
    assert principals_by_resource(database) == {"agent:a1": {"user_id": "carol"}}


def test_install_targets(engine: Engine):
    """A sessionmaker, one AsyncSession and an AsyncSession class can carry
    the hook too; installing twice adds it once."""
    maker = sessionmaker(engine)
    authz_outbox_host.install(maker)
    authz_outbox_host.install(maker)
    with principal_scope(ALICE), maker() as session:
        assert session.execute(SETTING).scalar_one() == '{"account_id":"acc-1","user_id":"alice"}'
    authz_outbox_host.uninstall(maker)
    with principal_scope(ALICE), maker() as session:
        assert session.execute(SETTING).scalar_one() == '{"service_account_id":"sa-host"}'


async def _never() -> dict[str, Any]:
    return {"type": "http.disconnect"}


async def _discard(message: Any) -> None:
    return None


# --- Inside a request: late principals, Core, SQL text, nesting -------------

AGENTS = AgentORM.__table__


def serve_request(body: Callable[[], None], *, layers: int = 1, resolve: Any = None) -> None:
    """Runs ``body`` (sync code) as the endpoint of an HTTP request served
    through ``layers`` PrincipalMiddlewares."""

    async def endpoint(scope: dict[str, Any], receive: Any, send: Any) -> None:
        body()

    app: Any = endpoint
    for _ in range(layers):
        app = PrincipalMiddleware(app, resolve=resolve)
    scope = {"type": "http", "path": "/", "headers": []}
    asyncio.run(app(scope, _never, _discard))


@pytest.fixture
def hooked_engine(database: Database) -> Iterator[Engine]:
    """An engine with the hook on it: Core connections carry the principal."""
    eng = create_engine(database.sqlalchemy("psycopg", as_writer=True), pool_size=2)
    authz_outbox_host.install(eng)
    authz_outbox_host.install(eng)  # twice: harmless
    yield eng
    eng.dispose()


def agent_row(agent_id: str) -> dict[str, str]:
    return {"id": agent_id, "name": agent_id, "description": "", "status": "READY"}


def test_core_connections_of_a_hooked_engine_carry_the_principal(
    database: Database, hooked_engine: Engine
):
    with principal_scope(ALICE), hooked_engine.begin() as conn:
        assert conn.execute(SETTING).scalar_one() == '{"account_id":"acc-1","user_id":"alice"}'
        conn.execute(insert(AGENTS).values(**agent_row("a1")))
    # One connection, several transactions (commit-as-you-go).
    with hooked_engine.connect() as conn:
        with principal_scope(BOB):
            conn.execute(insert(AGENTS).values(**agent_row("a2")))
            conn.commit()
        conn.execute(insert(AGENTS).values(**agent_row("a3")))  # a job: the role default
        conn.commit()
    assert principals_by_resource(database) == {
        "agent:a1": ALICE,
        "agent:a2": BOB,
        "agent:a3": ROLE_DEFAULT,
    }


def test_in_a_request_a_core_write_without_a_principal_raises(
    database: Database, hooked_engine: Engine
):
    def body() -> None:
        with hooked_engine.begin() as conn:
            assert conn.execute(select(AGENTS.c.id)).all() == []  # reads are fine
            conn.execute(insert(AGENTS).values(**agent_row("a1")))

    with pytest.raises(PrincipalMissing):
        serve_request(body)
    assert principals_by_resource(database) == {}


def test_a_principal_set_after_begin_reaches_the_write(
    database: Database, engine: Engine, hooked_engine: Engine
):
    """Authentication reads first (the transaction begins without a
    principal), then says who is calling; the write in the same transaction
    carries it. Both hooks: Core on the engine, the ORM on the session class."""

    def body() -> None:
        with hooked_engine.begin() as conn:
            conn.execute(select(AGENTS.c.id)).all()
            assert conn.execute(SETTING).scalar_one() == '{"service_account_id":"sa-host"}'
            set_principal(ALICE)
            conn.execute(insert(AGENTS).values(**agent_row("core")))
        set_principal(None)
        with sessions(engine)() as session:
            session.execute(select(AgentORM.id)).all()
            set_principal(BOB)
            session.add(AgentORM(id="orm", name="orm"))
            session.commit()

    serve_request(body)
    assert principals_by_resource(database) == {"agent:core": ALICE, "agent:orm": BOB}


def test_a_late_principal_set_inside_a_rolled_back_savepoint_is_set_again(
    database: Database, engine: Engine
):
    def body() -> None:
        with sessions(engine)() as session:
            session.execute(select(AgentORM.id)).all()
            set_principal(ALICE)
            with session.begin_nested() as savepoint:
                session.add(AgentORM(id="a1", name="rolled back"))
                session.flush()  # the setting is made here, inside the savepoint
                savepoint.rollback()  # ... and undone here
            session.add(AgentORM(id="a2", name="kept"))
            session.commit()

    serve_request(body)
    assert principals_by_resource(database) == {"agent:a2": ALICE}


def test_sql_text_writes_are_checked_too(database: Database, hooked_engine: Engine):
    statements = [
        lambda c: c.execute(
            text(
                "INSERT INTO agents (id, name, description, status) VALUES ('t', 't', '', 'READY')"
            )
        ),
        lambda c: c.exec_driver_sql(
            "/* raw */ insert into agents (id, name, description, status) "
            "values ('d', 'd', '', 'READY')"
        ),
        lambda c: c.execute(
            text(
                "WITH new AS (SELECT 'w' AS id) INSERT INTO agents (id, name, description, status) "
                "SELECT id, id, '', 'READY' FROM new"
            )
        ),
    ]
    for statement in statements:

        def body(statement: Any = statement) -> None:
            with hooked_engine.begin() as conn:
                conn.execute(text("SELECT count(*) FROM agents")).scalar_one()  # a read: fine
                statement(conn)

        with pytest.raises(PrincipalMissing):
            serve_request(body)
    assert principals_by_resource(database) == {}
    # The same statements, once the request has a principal.
    for statement in statements:

        def authenticated(statement: Any = statement) -> None:
            set_principal(ALICE)
            with hooked_engine.begin() as conn:
                statement(conn)

        serve_request(authenticated)
    assert principals_by_resource(database) == {f"agent:{i}": ALICE for i in "tdw"}


def test_which_statements_count_as_writes():
    for sql in [
        "INSERT INTO agents VALUES (1)",
        "  update agents SET name = 'x'",
        "-- comment\nDELETE FROM agents",
        "/* a */ (MERGE INTO agents USING x ON true WHEN MATCHED THEN DELETE)",
        "WITH gone AS (DELETE FROM agents RETURNING id) SELECT count(*) FROM gone",
        "COPY agents FROM STDIN",
        "TRUNCATE agents",
        "CALL refresh_agents()",
    ]:
        assert writes(sql), sql
    for sql in [
        "SELECT set_config('authz_outbox.principal', '{}', true)",
        "select * from agents",
        "WITH a AS (SELECT 1) SELECT * FROM a",
        "COPY agents TO STDOUT",
        "SHOW search_path",
        "",
    ]:
        assert not writes(sql), sql


def test_nested_middlewares_share_one_request(database: Database, engine: Engine):
    """A second PrincipalMiddleware (e.g. around the app and added with
    add_middleware) shares the request's holder: a principal set between the
    two is seen by the write inside both."""

    async def endpoint(scope: dict[str, Any], receive: Any, send: Any) -> None:
        with sessions(engine)() as session:
            session.add(AgentORM(id="a1", name="one"))
            session.commit()

    inner = PrincipalMiddleware(endpoint)

    async def authenticate(scope: dict[str, Any], receive: Any, send: Any) -> None:
        set_principal(ALICE)
        await inner(scope, receive, send)

    app = PrincipalMiddleware(authenticate)
    asyncio.run(app({"type": "http", "path": "/", "headers": []}, _never, _discard))
    assert principals_by_resource(database) == {"agent:a1": ALICE}


def test_a_lazy_resolve_is_read_when_the_write_happens(database: Database, engine: Engine):
    """A plain-function resolve is not read up front: it finds what the
    authentication step stored in the scope after the middleware ran."""

    def body() -> None:
        with sessions(engine)() as session:
            scope_state["principal"] = ALICE  # what authentication stores, later
            session.add(AgentORM(id="a1", name="one"))
            session.commit()

    scope_state: dict[str, Any] = {}
    serve_request(body, resolve=lambda scope: scope_state.get("principal"))
    assert principals_by_resource(database) == {"agent:a1": ALICE}

    def coroutine_from_a_plain_function(scope: Any) -> Any:
        return asyncio.sleep(0, ALICE)

    def writes_once() -> None:
        with sessions(engine)() as session:
            session.add(AgentORM(id="a2", name="two"))
            session.commit()

    with pytest.raises(TypeError, match="async def"):
        serve_request(writes_once, resolve=coroutine_from_a_plain_function)


def test_a_request_may_write_as_the_role_default_on_purpose(database: Database, engine: Engine):
    def body() -> None:
        set_principal(USE_ROLE_DEFAULT)
        with sessions(engine)() as session:
            session.add(AgentORM(id="a1", name="one"))
            session.commit()
        with principal_scope(BOB), sessions(engine)() as session:
            session.add(AgentORM(id="a2", name="two"))
            session.commit()

    serve_request(body, layers=2)
    assert principals_by_resource(database) == {"agent:a1": ROLE_DEFAULT, "agent:a2": BOB}
