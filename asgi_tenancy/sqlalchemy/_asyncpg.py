"""The asyncpg connection that carries a tenant binding inside the message that opens a transaction.

asyncpg opens every transaction with ``Connection.execute('BEGIN ...;')``, a simple-protocol
message that may hold several statements. Appending the binding there costs no round trip: the
transaction is bound before any statement of the application reaches the server. A binding
that must be a message of its own (``Binding.alone``, Citus) follows as a second message.
"""

from __future__ import annotations

import contextlib
import select
from collections.abc import Callable
from typing import Any

import asyncpg

__all__ = ["TenancyConnection"]


class TenancyConnection(asyncpg.Connection):  # type: ignore[misc]
    """Pass as ``connect_args={"connection_class": TenancyConnection}`` (TenantDatabase does)."""

    _tenancy_pending: str | None = None
    _tenancy_alone: str | None = None
    _tenancy_sent: Callable[[], None] | None = None

    def set_pending_binding(
        self,
        binding: str | None,
        alone: str | None = None,
        sent: Callable[[], None] | None = None,
    ) -> None:
        """SQL to send with the next BEGIN only, and SQL sent alone right after it; ``None``
        withdraws both. ``sent`` is called once the server has run them."""
        self._tenancy_pending = binding
        self._tenancy_alone = alone
        self._tenancy_sent = sent

    def closed_by_server(self) -> bool:
        """Whether the server has ended this idle connection (a restart, a terminated backend):
        it is closed, or its socket is readable, since the server sends an idle connection
        nothing but its FATAL error before it hangs up. One ``poll`` call, no round trip."""
        if self.is_closed():
            return True
        transport = self._transport
        sock = None if transport is None else transport.get_extra_info("socket")
        if sock is None:
            return False
        try:
            poller = select.poll()
            poller.register(sock.fileno(), select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):  # the socket is already gone
            return True

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:  # noqa: ASYNC109
        pending, alone = self._tenancy_pending, self._tenancy_alone
        if (pending is None and alone is None) or args or not query.startswith("BEGIN"):
            result: str = await super().execute(query, *args, timeout=timeout)
            return result
        sent = self._tenancy_sent
        self._tenancy_pending = self._tenancy_alone = self._tenancy_sent = None
        message = query if pending is None else f"{query.rstrip().rstrip(';')};{pending}"
        try:
            bound: str = await super().execute(message, timeout=timeout)
            if sent is not None:
                sent()
            if alone is not None:
                await super().execute(alone, timeout=timeout)
        except BaseException as exc:
            # BEGIN ran, the binding did not: the server holds a transaction the driver does
            # not know it started. End it, so nothing runs in it and a pooler frees the server.
            if not self.is_closed():
                with contextlib.suppress(Exception):  # broken: closed below all the same
                    await super().execute("ROLLBACK")
            # Whether the server ran the binding is unknown (a signed binding's counter may
            # have moved), or it refused it (no signing session, a tenant role gone): this
            # connection is closed and replaced.
            self.terminate()
            if isinstance(exc, asyncpg.PostgresError):
                raise asyncpg.ConnectionDoesNotExistError(
                    "the connection could not bind its transaction; it is replaced"
                ) from exc
            raise
        return bound
