"""The DatabasePerTenant strategy: each tenant in a database of its own, maybe on its own server.

A session of a tenant leases that tenant's engine from a bounded ``EngineCache`` for its whole
lifetime. Before an engine serves anything, one connection checks where it really landed
(``current_database()`` and the server's ``system_identifier``) and that its role is not a
superuser; every later connection of the pool checks the database name again. Two tenants can
never share a database: the URL's target is claimed before any SQL, and the verified identity
after the first connection. Claims outlive evicted engines.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ...errors import (
    DatabaseUnavailable,
    IsolationConfigError,
    TenantCapacityExceeded,
    TenantPlacementError,
)
from ...tenant import Tenant
from .. import hooks
from ..hygiene import Hygiene
from ..placement import Placement
from ..strategy import IsolationStrategy
from .engines import EngineCache
from .placement import IDENTITY_SQL, DatabasePlacement, url_target

__all__ = ["DatabasePerTenant"]

_CENTRAL = "\x00central"  # claims the application's own database: no tenant may use it
_RESERVED_OPTIONS = frozenset({"pool_size", "max_overflow", "poolclass"})

UrlFor = Callable[[Tenant], "str | URL"]


_MAX_PLACED = 10_000  # parsed tenant URLs remembered (about 1 KB each)


class DatabasePerTenant(IsolationStrategy):
    """Isolation by one database per tenant, from a bounded cache of engines.

    The URL comes from ``tenant.attributes[url_attribute]`` or ``url_for(tenant)``. At most
    ``max_engines`` engines, each with ``pool_size_per_engine`` connections and no overflow, and
    never more than ``max_connections`` connections in all (the engine cap is lowered to fit).
    A tenant holds at most ``pool_size_per_engine`` sessions at once (its share: one more waits
    ``acquire_timeout``, then ``TenantOverShare``), and tenants waiting for an engine are
    served in arrival order (``engines.py``).
    """

    name = "database"
    title = "database isolation"

    def __init__(
        self,
        *,
        url_attribute: str = "database_url",
        url_for: UrlFor | None = None,
        max_engines: int = 50,
        max_connections: int = 100,
        pool_size_per_engine: int = 2,
        acquire_timeout: float = 1.0,
        engine_options: Mapping[str, Any] | None = None,
        max_tenants: int = 100_000,
    ) -> None:
        options = dict(engine_options or {})
        if _RESERVED_OPTIONS & options.keys():
            raise IsolationConfigError(
                "engine_options cannot set the pool size, overflow or class",
                hint="use pool_size_per_engine and max_connections",
            )
        if pool_size_per_engine < 1 or max_connections < pool_size_per_engine:
            raise IsolationConfigError(
                "max_connections must hold at least one engine's pool",
                hint="max_connections >= pool_size_per_engine >= 1",
            )
        if max_engines < 1 or max_tenants < 1 or acquire_timeout < 0:
            raise IsolationConfigError("caps must be positive and acquire_timeout not negative")
        self.url_attribute = url_attribute
        self.url_for = url_for
        self.pool_size_per_engine = pool_size_per_engine
        self.max_connections = max_connections
        self.max_tenants = max_tenants
        self._engine_options = options
        self._cache = EngineCache(
            self._create_engine,
            max_engines=min(max_engines, max_connections // pool_size_per_engine),
            acquire_timeout=acquire_timeout,
            per_key=pool_size_per_engine,  # a tenant's leases: its pool, never more
        )
        # Placement claims: URL target -> tenant id, verified identity -> tenant id.
        self._targets: dict[tuple[str, ...], str] = {}
        self._identities: dict[tuple[str, str], str] = {}
        # (tenant id, raw URL) -> (parsed URL, engine key): what engine_for claimed already.
        self._placed: dict[tuple[str, object], tuple[URL, str]] = {}
        self._hygiene: Hygiene | None = None

    def __repr__(self) -> str:
        return (
            f"DatabasePerTenant(max_engines={self._cache.max_engines}, "
            f"pool_size_per_engine={self.pool_size_per_engine}, "
            f"max_connections={self.max_connections})"
        )

    @property
    def engines(self) -> EngineCache:
        return self._cache

    # -- placement -------------------------------------------------------------------------

    def url_of(self, tenant: Tenant) -> URL:
        """The tenant's database URL (``TenantPlacementError`` if absent or malformed)."""
        raw: object = (
            self.url_for(tenant)
            if self.url_for is not None
            else tenant.attributes.get(self.url_attribute)
        )
        if not isinstance(raw, str | URL):
            raise TenantPlacementError(
                "the tenant has no database URL",
                hint=f"set the tenant attribute {self.url_attribute!r} or pass url_for=",
                check="D005",
            )
        try:
            url = make_url(raw)
        except ArgumentError:
            raise TenantPlacementError(
                "the tenant's database URL is malformed", check="D005"
            ) from None
        if url.get_backend_name() != "postgresql" or not url.database:
            raise TenantPlacementError(
                "the tenant's database URL must name a PostgreSQL database",
                hint="postgresql+asyncpg://user:password@host/database",
                check="D005",
            )
        return url

    def _claim(self, claims: dict[Any, str], key: Any, tenant_id: str) -> None:
        owner = claims.get(key)
        if owner is not None and owner != tenant_id:
            raise TenantPlacementError(
                "two tenants map to one database",
                hint="give every tenant its own database (check the tenant store)",
                check="D002",
            )
        if owner is None and len(claims) >= self.max_tenants:
            raise TenantCapacityExceeded("too many tenant databases", hint="raise max_tenants")
        claims[key] = tenant_id

    # -- engines ---------------------------------------------------------------------------

    def _place(self, tenant: Tenant) -> tuple[URL, str]:
        """The tenant's URL and engine key, claimed for it; parsed and rendered once per
        (tenant, raw URL), then remembered (bounded: ``_MAX_PLACED`` entries, oldest out)."""
        raw: object = (
            self.url_for(tenant)
            if self.url_for is not None
            else tenant.attributes.get(self.url_attribute)
        )
        memo_key = (tenant.id, raw) if isinstance(raw, str | URL) else None
        placed = self._placed.get(memo_key) if memo_key is not None else None
        if placed is not None:
            return placed
        url = self.url_of(tenant)
        self._claim(self._targets, url_target(url), tenant.id)  # before any SQL
        placed = (url, url.render_as_string(hide_password=False))
        if memo_key is not None:
            if len(self._placed) >= _MAX_PLACED:
                del self._placed[next(iter(self._placed))]
            self._placed[memo_key] = placed
        return placed

    def engine_for(
        self, engine: AsyncEngine, tenant: Tenant
    ) -> AbstractAsyncContextManager[AsyncEngine]:
        url, key = self._place(tenant)
        return self._cache.lease(tenant.id, url, key)

    async def _create_engine(self, tenant_id: str, url: URL) -> AsyncEngine:
        engine = create_async_engine(
            url, pool_size=self.pool_size_per_engine, max_overflow=0, **self._engine_options
        )
        expected = url.database

        def check_database(dbapi_connection: Any, record: Any) -> None:
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute("SELECT current_database()")
                actual = cursor.fetchone()[0]
            finally:
                cursor.close()
            if actual != expected:
                raise TenantPlacementError(
                    "the tenant's URL leads to another database than it names",
                    hint="check poolers, proxies and DNS in front of the tenant's database",
                    check="D001",
                )

        event.listen(engine.sync_engine, "connect", check_database)
        hooks.install(engine, hygiene=self._hygiene)
        try:
            async with engine.connect() as conn:
                row = (await conn.execute(text(IDENTITY_SQL))).one()
            if row.superuser:
                raise TenantPlacementError(
                    "the tenant's database role is a superuser",
                    hint="give each tenant a NOSUPERUSER role that can reach its database only",
                    check="D004",
                )
            self._claim(self._identities, (row.server, row.db), tenant_id)
        except TenantPlacementError:
            await engine.dispose()
            raise
        except Exception:
            await engine.dispose()
            # The driver's error may carry the DSN: keep it out of the message and the chain.
            raise DatabaseUnavailable("the tenant's database cannot be reached") from None
        return engine

    # -- start-up and shutdown -------------------------------------------------------------

    def attach(self, engine: AsyncEngine) -> None:
        self._targets[url_target(engine.url)] = _CENTRAL
        self._hygiene = hooks.hygiene_of(engine)  # the tenant engines share its allow-list

    async def validate(self, engine: AsyncEngine) -> None:
        """Claim the application's own database, so no tenant can be placed on it."""
        try:
            async with engine.connect() as conn:
                row = (await conn.execute(text(IDENTITY_SQL))).one()
        except Exception:
            raise DatabaseUnavailable(
                "the application's database cannot be reached",
                hint="check the URL given to TenantDatabase",
            ) from None
        try:
            self._claim(self._identities, (row.server, row.db), _CENTRAL)
        except TenantPlacementError as exc:
            raise IsolationConfigError(exc.message, hint=exc.hint) from None

    async def dispose(self) -> None:
        await self._cache.close()

    @property
    def placement(self) -> Placement:
        return DatabasePlacement(self)
