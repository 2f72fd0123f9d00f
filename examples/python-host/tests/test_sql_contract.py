"""The SQL the package relies on (``authz_outbox_host.contract``) against the
schema the built ``authz-outbox migrate`` installed: the setting the capture
triggers read, the wait function's signature and result, its timeout bound
and outcomes, and the SQLSTATE the package maps. Read from the catalog, then
exercised as the writer role, so the package and the binary cannot drift
apart unnoticed."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from authz_outbox_host import contract, wait

from .conftest import Database, outbox

INSERT_AGENT = (
    "INSERT INTO agents (id, name, description, status) "
    "VALUES ('a-contract', 'contract', '', 'READY')"
)


def writer(database: Database) -> psycopg.Connection[Any]:
    url = database.sqlalchemy("psycopg", as_writer=True).replace("postgresql+psycopg", "postgresql")
    return psycopg.connect(url)


def wait_functions(database: Database) -> list[dict[str, Any]]:
    """Every function named ``contract.WAIT_FUNCTION`` outside the system schemas."""
    rows = database.execute(
        """
        SELECT p.oid::regprocedure::text,
               p.proargtypes::oid[]::regtype[]::text[],
               p.pronargdefaults, p.prosecdef, p.proretset,
               (SELECT array_agg(a.name || ' ' || format_type(a.type, NULL) ORDER BY a.i)
                  FROM unnest(p.proargnames, p.proallargtypes, p.proargmodes)
                       WITH ORDINALITY AS a(name, type, mode, i)
                 WHERE a.mode = 't'),
               p.prosrc
          FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE p.proname = %s AND n.nspname NOT IN ('pg_catalog', 'information_schema')
        """,
        (contract.WAIT_FUNCTION,),
    )
    keys = ("signature", "arguments", "defaults", "definer", "returns_set", "result", "src")
    return [dict(zip(keys, row, strict=True)) for row in rows]


def test_the_wait_function_has_the_signature_and_result_the_package_calls(database: Database):
    (function,) = wait_functions(database)
    assert tuple(function["arguments"]) == contract.WAIT_ARGUMENTS
    # The package passes the first arguments only: the others have defaults.
    passed = contract.WAIT_ARGUMENTS_PASSED
    assert len(contract.WAIT_ARGUMENTS) - function["defaults"] <= passed
    assert passed <= len(contract.WAIT_ARGUMENTS)
    assert function["returns_set"]
    assert tuple(function["result"]) == tuple(f"{n} {t}" for n, t in contract.WAIT_RESULT)
    # SECURITY DEFINER: the writer needs EXECUTE on it, no grant on the outbox.
    assert function["definer"]


def test_the_wait_function_answers_only_outcomes_the_package_maps(database: Database):
    (function,) = wait_functions(database)
    literal = set(re.findall(r"'(\w+)'::text", function["src"]))
    assert literal, "no outcome literal found in the function's source"
    assert literal <= set(contract.WAIT_OUTCOMES), literal - set(contract.WAIT_OUTCOMES)
    # Settled without anything pending, it answers the newest row's state.
    (check,) = database.execute(
        "SELECT pg_get_constraintdef(c.oid) FROM pg_constraint c "
        "WHERE c.conrelid = 'authz_outbox'::regclass AND c.contype = 'c' "
        "AND pg_get_constraintdef(c.oid) LIKE '%%state%%'"
    )[0:1]
    states = set(re.findall(r"'(\w+)'", check[0])) - {"pending"}
    assert states <= set(contract.WAIT_OUTCOMES), states - set(contract.WAIT_OUTCOMES)
    assert set(contract.SETTLED_OUTCOMES) <= states


def test_the_timeout_bound_is_the_functions(database: Database):
    assert wait.MAX_TIMEOUT == contract.MAX_TIMEOUT
    call = f"SELECT outcome FROM {contract.WAIT_FUNCTION}('agent', 'nothing-here', %s)"
    with writer(database) as conn:
        conn.autocommit = True
        assert conn.execute(call, (contract.MAX_TIMEOUT,)).fetchone() == ("none",)
        with pytest.raises(psycopg.Error) as refused:
            conn.execute(call, (contract.MAX_TIMEOUT + timedelta(microseconds=1),))
        assert refused.value.sqlstate == "22023"


@pytest.mark.parametrize("why", ["has written", "repeatable read"])
def test_a_refusal_to_wait_has_the_sqlstate_the_package_maps(database: Database, why: str):
    with writer(database) as conn:
        if why == "repeatable read":
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        else:
            conn.execute(INSERT_AGENT)
        with pytest.raises(psycopg.Error) as refused:
            conn.execute(f"SELECT * FROM {contract.WAIT_FUNCTION}('agent', 'a-contract', '1s')")
        assert refused.value.sqlstate == contract.WAIT_REFUSED_SQLSTATE
        conn.rollback()


def test_the_capture_triggers_read_the_principal_setting(database: Database):
    readers = database.execute(
        "SELECT count(*) FROM pg_proc WHERE prosrc LIKE %s",
        (f"%current_setting('{contract.PRINCIPAL_SETTING}'%",),
    )
    assert readers[0][0] > 0, f"no function reads {contract.PRINCIPAL_SETTING}"
    principal = {"user_id": "u-contract"}
    with writer(database) as conn:
        conn.execute(
            "SELECT set_config(%s, %s, true)", (contract.PRINCIPAL_SETTING, json.dumps(principal))
        )
        conn.execute(INSERT_AGENT)
        conn.commit()
    (row,) = outbox(database)
    assert (row["resource_type"], row["resource_id"]) == ("agent", "a-contract")
    # Not the writer role's default ({"service_account_id": "sa-host"}).
    assert row["principal"] == principal


def test_the_writer_waits_with_execute_alone(database: Database):
    """docs/host-integration.md's grants: nothing on the outbox, EXECUTE on
    the wait function; that is all the package's wait needs."""
    role = database.writer_role
    (privileges,) = database.execute(
        "SELECT has_table_privilege(%s, 'authz_outbox', 'SELECT, INSERT, UPDATE, DELETE'), "
        f"has_function_privilege(%s, '{contract.WAIT_FUNCTION}"
        f"({', '.join(contract.WAIT_ARGUMENTS)})', 'EXECUTE')",
        (role, role),
    )
    assert privileges == (False, True)
    with writer(database) as conn:
        conn.autocommit = True
        call = f"SELECT outcome FROM {contract.WAIT_FUNCTION}('agent', 'nothing-here', '0s')"
        assert conn.execute(call).fetchone() == ("none",)
