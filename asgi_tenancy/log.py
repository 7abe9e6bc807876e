"""Stamp the current tenant on log records, so every line of a request says whose it was."""

from __future__ import annotations

import logging

from .context import current_tenant_or_none

__all__ = ["TenantLogFilter"]


class TenantLogFilter(logging.Filter):
    """Set ``record.tenant_id`` to the current tenant's id, or ``"-"`` outside a tenant scope.

    Attach it to a handler and use ``%(tenant_id)s`` in the format; it never drops a record.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        tenant = current_tenant_or_none()
        record.tenant_id = "-" if tenant is None else tenant.id
        return True
