"""authz-outbox for a Python (SQLAlchemy) host.

- :mod:`.principal`: the request's principal in a context variable, and a
  plain ASGI middleware that fills it;
- :mod:`.session`: the ``after_begin`` hook that makes every transaction
  carry it (``set_config('authz_outbox.principal', ..., true)``);
- :mod:`.wait`: read-your-writes by resource after commit.
"""

from .principal import (
    Principal,
    PrincipalMiddleware,
    current_principal,
    principal_scope,
    reset_principal,
    set_principal,
)
from .session import install, set_transaction_principal, uninstall
from .wait import (
    Delivered,
    DeliveryDead,
    DeliveryTimeout,
    NothingCaptured,
    WaitError,
    WaitRefused,
    wait_for_resource,
    wait_for_resource_async,
)

__all__ = [
    "Delivered",
    "DeliveryDead",
    "DeliveryTimeout",
    "NothingCaptured",
    "Principal",
    "PrincipalMiddleware",
    "WaitError",
    "WaitRefused",
    "current_principal",
    "install",
    "principal_scope",
    "reset_principal",
    "set_principal",
    "set_transaction_principal",
    "uninstall",
    "wait_for_resource",
    "wait_for_resource_async",
]
