"""authz-outbox for a Python (SQLAlchemy) host.

- :mod:`.principal`: the request's principal, in a per-request holder that a
  plain ASGI middleware creates and ``set_principal`` fills from wherever
  the request is authenticated;
- :mod:`.session`: the hook that makes every transaction carry it
  (``set_config('authz_outbox.principal', ..., true)``), and makes a write
  in a request without a principal raise instead of using the role default;
- :mod:`.wait`: read-your-writes by resource after commit;
- :mod:`.contract`: the SQL it relies on (setting name, function signature,
  SQLSTATE), as ``authz-outbox migrate`` of the same version installs it.

The package is versioned with the ``authz-outbox`` binary: use the release
of the binary that migrated the database.
"""

from importlib.metadata import PackageNotFoundError, version

from .principal import (
    USE_ROLE_DEFAULT,
    Principal,
    PrincipalMiddleware,
    PrincipalMissing,
    current_principal,
    in_request,
    principal_scope,
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

try:
    __version__ = version("authz-outbox-host")
except PackageNotFoundError:  # a vendored copy, not installed
    __version__ = "0+unknown"

__all__ = [
    "USE_ROLE_DEFAULT",
    "Delivered",
    "DeliveryDead",
    "DeliveryTimeout",
    "NothingCaptured",
    "Principal",
    "PrincipalMiddleware",
    "PrincipalMissing",
    "WaitError",
    "WaitRefused",
    "current_principal",
    "in_request",
    "install",
    "principal_scope",
    "set_principal",
    "set_transaction_principal",
    "uninstall",
    "wait_for_resource",
    "wait_for_resource_async",
]
