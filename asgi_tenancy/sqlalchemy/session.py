"""``TenantBoundSession``: a Session that holds its tenant, binding and criteria, and refuses
every use outside that tenant's scope.

What runs SQL is checked by the hooks (``hooks.py``: ``do_orm_execute``, ``before_flush``,
``before_attach``, and every statement on the engine); what answers from memory without an
event is checked here: identity-map hits (``get``), merges, deletes and ``connection()``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.util import await_only

from ..context import current_tenant_or_none
from ..errors import DatabaseUnavailable, SessionTenantMismatch, TenancyError
from ..tenant import Tenant
from .failures import translate

if TYPE_CHECKING:
    from .criteria import TenantCriteria
    from .strategy import Binding

__all__ = ["TenantBoundSession", "begin_now", "check_owner", "check_scope"]

OWNER_KEY = "asgi_tenancy.owner"  # InstanceState.info: id of the tenant that loaded the object


def begin_now(connection: Connection) -> None:
    """Send the bound ``BEGIN`` of ``connection``'s transaction now, where the driver defers it
    to the first statement (SQLAlchemy's asyncpg adapter); a failure invalidates the connection
    and is ``DatabaseUnavailable``."""
    adapter = connection.connection.dbapi_connection
    start = getattr(adapter, "_start_transaction", None)
    if start is None or getattr(adapter, "_transaction", True) is not None:
        return  # another driver (BEGIN is already sent), or a transaction already open
    try:
        await_only(_start(adapter, start))
    except Exception as exc:
        connection.invalidate(exc)
        mapped = translate(exc)
        raise (
            mapped
            if isinstance(mapped, TenancyError)
            else DatabaseUnavailable("the database connection was lost")
        ) from exc


async def _start(adapter: Any, start: Callable[[], Awaitable[None]]) -> None:
    async with adapter._execute_mutex:  # what the adapter's own first statement would take
        if adapter._transaction is None:
            await start()


def check_scope(expected: str | None) -> None:
    """Raise unless the current scope is the tenant ``expected``."""
    current = current_tenant_or_none()
    if expected is None or current is None or current.id != expected:
        raise SessionTenantMismatch(
            "this session or connection belongs to another tenant scope, or its scope has ended"
        )


def check_owner(session: TenantBoundSession, instance: Any) -> None:
    """Raise when ``instance`` was loaded or persisted by a session of another tenant."""
    owner = instance_state(instance).info.get(OWNER_KEY)
    if owner is not None and owner != session.tenant.id:
        raise SessionTenantMismatch("this object was loaded for another tenant")


class TenantBoundSession(Session):
    """A Session tied to one tenant: outside that tenant's scope every operation raises.

    ``TenantDatabase.session()`` makes them; ``binding`` is sent with every transaction,
    ``criteria`` (if any) filters every ORM statement and stamps every new row.
    """

    tenant: Tenant
    binding: Binding | None
    criteria: TenantCriteria | None

    def __init__(
        self,
        *args: Any,
        tenant: Tenant,
        binding: Binding | None = None,
        criteria: TenantCriteria | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.tenant = tenant
        self.binding = binding
        self.criteria = criteria

    def check_scope(self) -> None:
        check_scope(self.tenant.id)

    def get(self, *args: Any, **kwargs: Any) -> Any:
        self.check_scope()
        return super().get(*args, **kwargs)

    def get_one(self, *args: Any, **kwargs: Any) -> Any:
        self.check_scope()
        return super().get_one(*args, **kwargs)

    def merge(self, instance: Any, *args: Any, **kwargs: Any) -> Any:
        self.check_scope()
        check_owner(self, instance)
        return super().merge(instance, *args, **kwargs)

    def delete(self, instance: object) -> None:
        self.check_scope()
        super().delete(instance)

    def connection(self, *args: Any, **kwargs: Any) -> Connection:
        """The session's connection, checked out and with its bound transaction begun: on
        asyncpg the ``BEGIN`` (binding inside) is sent now instead of with the first statement,
        the same round trip moved earlier, so a stream that asks for it before its status holds
        its connection and binding, and a dead connection fails here, not after the first byte."""
        self.check_scope()
        connection = super().connection(*args, **kwargs)
        begin_now(connection)
        return connection
