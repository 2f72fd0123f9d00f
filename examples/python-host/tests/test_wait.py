"""Read-your-writes by resource from Python: the contract of
``authz_outbox_wait_for_resource`` through both drivers, and one run end to
end with the real worker and agentex-auth-dev (over the real SpiceDB engine)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlalchemy.orm import sessionmaker

from authz_outbox_host import (
    DeliveryDead,
    DeliveryTimeout,
    NothingCaptured,
    WaitRefused,
    principal_scope,
    wait_for_resource,
    wait_for_resource_async,
)

from .conftest import Database, Delivery, http_post, outbox
from .host_models import AgentAPIKeyORM, AgentAPIKeyType, AgentORM, HostSession

ALICE = {"user_id": "alice"}


def create_key(engine: Engine, key_id: str = "k1", principal: Any = ALICE) -> str:
    make = sessionmaker(engine, class_=HostSession)
    with make() as session:
        session.add(AgentORM(id="a1", name="agent one"))
        session.commit()
    with principal_scope(principal), make() as session:
        session.add(
            AgentAPIKeyORM(
                id=key_id,
                agent_id="a1",
                name=key_id,
                api_key_type=AgentAPIKeyType.EXTERNAL,
                api_key="s",
            )
        )
        session.commit()
    return key_id


def mark_delivered_later(database: Database, key_id: str, after: float) -> threading.Thread:
    """Plays the worker: records the key's register as delivered, from another
    connection, while the wait is already running."""

    def deliver() -> None:
        time.sleep(after)
        database.execute(
            "UPDATE authz_outbox SET state = 'delivered', consistency_token = 'zed-py', "
            "delivered_at = now(), finished_at = now() "
            "WHERE resource_type = 'api_key' AND resource_id = %s",
            (key_id,),
        )

    thread = threading.Thread(target=deliver)
    thread.start()
    return thread


def test_returns_once_the_row_is_delivered(database: Database, engine: Engine):
    key = create_key(engine)
    worker = mark_delivered_later(database, key, after=0.3)
    started = time.monotonic()
    with engine.connect() as conn:
        done = wait_for_resource(conn, "api_key", key, timeout=20)
    waited = time.monotonic() - started
    worker.join()
    assert (done.outcome, done.consistency_token) == ("delivered", "zed-py")
    assert done.resource == f"api_key:{key}"
    assert waited >= 0.3, "it waited for the delivery"


async def test_returns_once_the_row_is_delivered_async(
    database: Database, engine: Engine, async_engine: AsyncEngine
):
    key = create_key(engine)
    worker = mark_delivered_later(database, key, after=0.2)
    async with async_sessionmaker(async_engine, sync_session_class=HostSession)() as session:
        done = await wait_for_resource_async(session, "api_key", key, timeout=20)
    await asyncio.to_thread(worker.join)
    assert (done.outcome, done.consistency_token) == ("delivered", "zed-py")


def test_a_timeout_is_its_own_exception(engine: Engine):
    key = create_key(engine)
    with engine.connect() as conn, pytest.raises(DeliveryTimeout) as caught:
        wait_for_resource(conn, "api_key", key, timeout=0.05)
    assert caught.value.resource == f"api_key:{key}"
    assert "pending" in str(caught.value)


def test_a_dead_write_answers_at_once_with_its_error(database: Database, engine: Engine):
    # A principal naming no creator overrides the role default: a dead row.
    key = create_key(engine, principal={"user_id": ""})
    assert [r["state"] for r in outbox(database) if r["resource_id"] == key] == ["dead"]
    with engine.connect() as conn, pytest.raises(DeliveryDead) as caught:
        wait_for_resource(conn, "api_key", key, timeout=60)
    assert "no creator resolvable" in caught.value.error


def test_an_unknown_resource_is_not_a_timeout(engine: Engine):
    with engine.connect() as conn, pytest.raises(NothingCaptured):
        wait_for_resource(conn, "api_key", "never-written", timeout=30)


def test_waiting_inside_the_writing_transaction_is_refused(engine: Engine):
    create_key(engine)
    make = sessionmaker(engine, class_=HostSession)
    with principal_scope(ALICE), make() as session:
        session.add(
            AgentAPIKeyORM(
                id="k2",
                agent_id="a1",
                name="k2",
                api_key_type=AgentAPIKeyType.EXTERNAL,
                api_key="s",
            )
        )
        session.flush()  # written, not committed: no worker can see it
        with pytest.raises(WaitRefused, match="has written"):
            wait_for_resource(session, "api_key", "k2", timeout=30)
        session.rollback()
    with engine.connect() as conn:
        conn.execution_options(isolation_level="REPEATABLE READ")
        with pytest.raises(WaitRefused, match="REPEATABLE READ"):
            wait_for_resource(conn, "api_key", "k1", timeout=30)


def test_a_timeout_out_of_bounds_is_refused_before_asking(engine: Engine):
    with engine.connect() as conn, pytest.raises(ValueError, match="timeout"):
        wait_for_resource(conn, "api_key", "k1", timeout=301)


# --- End to end: the real worker and agentex-auth-dev -----------------------


def can_read(auth_url: str, user: str, key_id: str) -> bool:
    status = http_post(
        f"{auth_url}/v1/authz/check",
        {
            "principal": {"user_id": user},
            "resource": {"type": "api_key", "selector": key_id},
            "operation": "read",
        },
    )
    assert status in (200, 403), status
    return status == 200


async def test_end_to_end_a_created_key_is_readable_when_the_wait_returns(
    database: Database, async_engine: AsyncEngine, delivery: Delivery
):
    make = async_sessionmaker(async_engine, sync_session_class=HostSession, expire_on_commit=False)
    with principal_scope(ALICE):
        async with make() as session:
            session.add(AgentORM(id="a1", name="agent one"))
            await session.commit()
            key = AgentAPIKeyORM(
                agent_id="a1", name="ci", api_key_type=AgentAPIKeyType.EXTERNAL, api_key="s"
            )
            session.add(key)
            await session.commit()
            done = await wait_for_resource_async(session, "api_key", key.id, timeout=30)
    assert done.outcome == "delivered"
    assert done.consistency_token, "agentex-auth's ZedToken"
    assert can_read(delivery.auth_url, "alice", key.id)
    assert not can_read(delivery.auth_url, "mallory", key.id)

    with principal_scope(ALICE):
        async with make() as session:
            await session.delete(await session.get(AgentAPIKeyORM, (key.id, "a1")))
            await session.commit()
            gone = await wait_for_resource_async(session, "api_key", key.id, timeout=30)
    assert gone.outcome == "delivered"
    assert not can_read(delivery.auth_url, "alice", key.id)
