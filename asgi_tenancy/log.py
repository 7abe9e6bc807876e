"""Stamp the current tenant on log records, so every line of a request or job says whose it was.

Two doors, one field: ``TenantLogFilter`` for the standard library's ``logging`` and
``add_tenant_id`` for structlog. Both read the library's own context variable at the moment a
line is logged, so a reused worker thread or task can never log a previous job's tenant.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

from .context import current_tenant_or_none

__all__ = ["NO_TENANT", "TENANT_FIELD", "TenantLogFilter", "add_tenant_id"]

TENANT_FIELD = "tenant_id"  # the record attribute and the structlog key
NO_TENANT = "-"  # outside a tenant scope (the central scope included)


def _tenant_id() -> str:
    tenant = current_tenant_or_none()
    return NO_TENANT if tenant is None else tenant.id


class TenantLogFilter(logging.Filter):
    """Set ``record.tenant_id`` to the current tenant's id, or ``"-"`` outside a tenant scope.

    Attach it to a handler and use ``%(tenant_id)s`` in the format; it never drops a record.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        setattr(record, TENANT_FIELD, _tenant_id())
        return True


def add_tenant_id(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """A structlog processor: ``event_dict["tenant_id"]``, as the stdlib filter sets it.

    Place it next to ``structlog.contextvars.merge_contextvars``. It overwrites a bound
    ``tenant_id``: the field says whose scope the line was logged in, never what code claimed.
    """
    event_dict[TENANT_FIELD] = _tenant_id()
    return event_dict
