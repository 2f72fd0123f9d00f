"""Read-your-writes by resource from Python: the contract of
``authz_outbox_wait_for_resource`` through both drivers, and one run end to
end with the real worker and agentex-auth-dev (over the real SpiceDB engine)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
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

from .conftest import Database, binary, outbox
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_post(url: str, body: dict[str, Any]) -> int:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return e.code


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture
def delivery(database: Database, tmp_path: Any) -> Iterator[str]:
    """agentex-auth-dev and one `authz-outbox run`, as in scripts/demo.sh;
    yields agentex-auth's base URL."""
    if not os.environ.get("SPICEDB_LIBRARY_PATH"):
        pytest.fail("SPICEDB_LIBRARY_PATH is not set (scripts/test.sh sets it)")
    auth_url = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, "RUST_LOG": "warn", "DATABASE_URL": database.url}
    log = (tmp_path / "processes.log").open("w")
    auth = subprocess.Popen(
        [
            binary("agentex-auth-dev"),
            "--listen",
            auth_url.removeprefix("http://"),
            "--grpc-listen",
            f"127.0.0.1:{free_port()}",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    worker = None
    try:
        deadline = time.monotonic() + 30
        while not answers(f"{auth_url}/_dev/stats"):
            if time.monotonic() > deadline or auth.poll() is not None:
                log.flush()
                pytest.fail(
                    f"agentex-auth-dev did not start: {(tmp_path / 'processes.log').read_text()}"
                )
            time.sleep(0.1)
        worker = subprocess.Popen(
            [
                binary("authz-outbox"),
                "run",
                "--metrics-addr",
                f"127.0.0.1:{free_port()}",
                "--poll-interval",
                "200ms",
            ],
            env={**env, "AGENTEX_AUTH_URL": auth_url},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        yield auth_url
    finally:
        for process in (worker, auth):
            if process is not None:
                process.terminate()
                process.wait(timeout=30)
        log.close()


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
    database: Database, async_engine: AsyncEngine, delivery: str
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
    assert can_read(delivery, "alice", key.id)
    assert not can_read(delivery, "mallory", key.id)

    with principal_scope(ALICE):
        async with make() as session:
            await session.delete(await session.get(AgentAPIKeyORM, (key.id, "a1")))
            await session.commit()
            gone = await wait_for_resource_async(session, "api_key", key.id, timeout=30)
    assert gone.outcome == "delivered"
    assert not can_read(delivery, "alice", key.id)
