"""``TenantDatabase``: sessions bound to the current tenant, or an error before any SQL."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from ..context import current_tenant, in_central_scope
from ..errors import IsolationConfigError, TenancyError, TenancyUnavailable, TenantContextError
from .binding import (
    BINDING_KEY,
    SIGNER_KEY,
    TENANT_KEY,
    TenantBoundSession,
    install_engine_hooks,
)
from .strategy import IsolationStrategy

__all__ = ["TenantDatabase"]


class TenantDatabase:
    """The application's database, served one tenant at a time.

    ``async with db.session() as s`` yields an ``AsyncSession`` bound to ``current_tenant()``;
    outside a tenant scope it raises ``TenantContextError`` before a connection is taken.
    Sessions are refused until ``validate()`` has passed: a misconfigured deployment does not
    serve. Central work goes through ``admin_engine``, only inside ``central_scope``.
    """

    def __init__(
        self,
        engine: AsyncEngine | str | URL,
        strategy: IsolationStrategy,
        *,
        admin_engine: AsyncEngine | None = None,
        engine_options: Mapping[str, Any] | None = None,
        session_options: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(strategy, IsolationStrategy):
            raise IsolationConfigError(
                "strategy must be an isolation strategy",
                hint="pass RowLevelSecurity(), QueryScoping(), SchemaPerTenant() or "
                "DatabasePerTenant()",
            )
        if isinstance(engine, AsyncEngine):
            if engine_options:
                raise IsolationConfigError(
                    "engine_options apply only when TenantDatabase creates the engine"
                )
            self.engine = engine
        else:
            self.engine = create_async_engine(engine, **dict(engine_options or {}))
        if admin_engine is not None and admin_engine is self.engine:
            raise IsolationConfigError(
                "the admin engine must be separate from the tenant engine",
                hint="connect the admin engine as another role",
            )
        install_engine_hooks(self.engine)
        self.strategy = strategy
        self.admin_engine = admin_engine
        self._session_options = {"expire_on_commit": False, **dict(session_options or {})}
        self._validated = False
        strategy.attach(self)

    def __repr__(self) -> str:
        return f"TenantDatabase({self.engine.url!r}, strategy={self.strategy.name!r})"

    @property
    def validated(self) -> bool:
        return self._validated

    async def validate(self) -> None:
        """Check the live database for this strategy; sessions stay refused until it passes."""
        self._validated = False
        try:
            await self.strategy.validate(self)
        except TenancyError:
            raise
        except (OSError, TimeoutError, sa_exc.OperationalError, sa_exc.InterfaceError) as exc:
            # The cause (kept for the log) may name the host; the message never does.
            raise TenancyUnavailable(
                "the database could not be reached to validate isolation"
            ) from exc
        except sa_exc.DBAPIError as exc:
            raise IsolationConfigError(
                "validation could not read the catalog",
                hint=f"the database answered {type(exc.orig).__name__}; check the role's grants",
            ) from exc
        self._validated = True

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """A session of the current tenant; every transaction in it is bound to that tenant."""
        tenant = current_tenant()
        if not self._validated:
            raise IsolationConfigError(
                "TenantDatabase has not been validated",
                hint="await database.validate() at start-up (setup_tenancy does it for FastAPI)",
            )
        async with self.strategy.engine_for(self, tenant) as engine:
            strategy = self.strategy
            info: dict[str, Any] = {TENANT_KEY: tenant.id}
            if strategy.binds_to_backend:
                info[SIGNER_KEY] = functools.partial(strategy.backend_binding_sql, tenant)
            else:
                info[BINDING_KEY] = strategy.binding_sql(tenant)
            session = AsyncSession(
                engine, sync_session_class=TenantBoundSession, info=info, **self._session_options
            )
            self.strategy.configure_session(session.sync_session, tenant)
            try:
                yield session
            finally:
                # Shielded: a cancelled request still returns its connection, rolled back.
                await asyncio.shield(session.close())

    @asynccontextmanager
    async def admin_session(self) -> AsyncIterator[AsyncSession]:
        """A session on the admin engine, only inside ``central_scope``."""
        if not in_central_scope():
            raise TenantContextError("admin sessions open only inside central_scope()")
        if self.admin_engine is None:
            raise IsolationConfigError(
                "no admin engine configured", hint="TenantDatabase(..., admin_engine=...)"
            )
        session = AsyncSession(self.admin_engine, expire_on_commit=False)
        try:
            yield session
        finally:
            await asyncio.shield(session.close())

    async def dispose(self) -> None:
        """Close every pool this database opened (tenant, strategy-held and admin engines)."""
        self._validated = False
        await self.strategy.dispose()
        await self.engine.dispose()
        if self.admin_engine is not None:
            await self.admin_engine.dispose()
