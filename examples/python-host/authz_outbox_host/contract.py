"""The SQL this package relies on, in one place.

``authz-outbox migrate`` installs the other side of each of these; the
package's tests (``tests/test_sql_contract.py``) compare them with the
catalog of a migrated database, so the package and the binary cannot drift
apart unnoticed.
"""

from __future__ import annotations

from datetime import timedelta

#: The transaction-local setting the capture triggers read the creator of a
#: write from (``set_config(PRINCIPAL_SETTING, json, true)``).
PRINCIPAL_SETTING = "authz_outbox.principal"

#: Read-your-writes by resource: the function, its argument types (in
#: order; the package passes the first three, the last has a default) and
#: the columns of its one result row.
WAIT_FUNCTION = "authz_outbox_wait_for_resource"
WAIT_ARGUMENTS = ("text", "text", "interval", "bigint")
WAIT_ARGUMENTS_PASSED = 3
WAIT_RESULT = (
    ("outcome", "text"),
    ("error", "text"),
    ("consistency_token", "text"),
    ("outbox_id", "bigint"),
)

#: The outcomes the function answers, as the package maps them: settled
#: (returned), dead / timeout / none (raised).
SETTLED_OUTCOMES = ("delivered", "superseded")
WAIT_OUTCOMES = (*SETTLED_OUTCOMES, "dead", "timeout", "none")

#: The longest wait the function accepts (a longer one is refused with
#: SQLSTATE 22023, invalid_parameter_value; the package refuses it first).
MAX_TIMEOUT = timedelta(minutes=5)

#: SQLSTATE 25000 (invalid_transaction_state): the function refuses to wait
#: in a transaction that has written, or under REPEATABLE READ / SERIALIZABLE.
#: The package raises it as ``WaitRefused``.
WAIT_REFUSED_SQLSTATE = "25000"
