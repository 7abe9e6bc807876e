"""The asyncpg connection that carries a tenant binding inside the message that opens a transaction.

asyncpg opens every transaction with ``Connection.execute('BEGIN ...;')``, a simple-protocol
message that may hold several statements. Appending the binding there costs no round trip: the
transaction is bound before any statement of the application reaches the server.
"""

from __future__ import annotations

from typing import Any

import asyncpg

__all__ = ["TenancyConnection"]


class TenancyConnection(asyncpg.Connection):  # type: ignore[misc]
    """Pass as ``connect_args={"connection_class": TenancyConnection}`` (TenantDatabase does)."""

    _tenancy_pending: str | None = None

    def set_pending_binding(self, binding: str | None) -> None:
        """SQL to send with the next BEGIN only; ``None`` withdraws it."""
        self._tenancy_pending = binding

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:  # noqa: ASYNC109
        pending = self._tenancy_pending
        if pending is not None and not args and query.startswith("BEGIN"):
            self._tenancy_pending = None
            query = f"{query.rstrip().rstrip(';')};{pending}"
        result: str = await super().execute(query, *args, timeout=timeout)
        return result
