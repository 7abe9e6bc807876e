"""DatabasePerTenant: every tenant's data in a database of its own, possibly on its own server.

A session of a tenant leases that tenant's engine from a bounded ``EngineCache`` for its whole
lifetime. Before an engine serves anything, one connection checks where it really landed
(``current_database()`` and the server's ``system_identifier``) and that its role is not a
superuser; every later connection of the pool checks the database name again. Two tenants can
never share a database: the URL's target is claimed before any SQL, and the verified identity
after the first connection. Claims outlive evicted engines.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from sqlalchemy import event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ..errors import IsolationConfigError, TenancyUnavailable, TenantCapacityExceeded
from ..tenant import Tenant
from .binding import install_engine_hooks
from .engines import EngineCache
from .strategy import IsolationStrategy

if TYPE_CHECKING:
    from .database import TenantDatabase

__all__ = ["DatabasePerTenant"]

_CENTRAL = "\x00central"  # claims the application's own database: no tenant may use it
_RESERVED_OPTIONS = frozenset({"pool_size", "max_overflow", "poolclass"})
_IDENTITY_SQL = (
    "SELECT current_database() AS db,"
    " (SELECT system_identifier FROM pg_control_system())::text AS server,"
    " (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) AS superuser"
)

UrlFor = Callable[[Tenant], "str | URL"]


def _target(url: URL) -> tuple[str, ...]:
    """Where a URL points (hosts, ports, database), compared before any SQL is sent."""
    hosts = url.query.get("host") or url.host or ""
    return (url.get_backend_name(), str(hosts).lower(), str(url.port or 5432), url.database or "")


class DatabasePerTenant(IsolationStrategy):
    """Isolation by one database per tenant, from a bounded cache of engines.

    The URL comes from ``tenant.attributes[url_attribute]`` or ``url_for(tenant)``. At most
    ``max_engines`` engines, each with ``pool_size_per_engine`` connections and no overflow, and
    never more than ``max_connections`` connections in all (the engine cap is lowered to fit).
    """

    name = "database"

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
        )
        # Placement claims: URL target -> tenant id, verified identity -> tenant id.
        self._targets: dict[tuple[str, ...], str] = {}
        self._identities: dict[tuple[str, str], str] = {}

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
        """The tenant's database URL (``IsolationConfigError`` if absent or malformed)."""
        raw: object = (
            self.url_for(tenant)
            if self.url_for is not None
            else tenant.attributes.get(self.url_attribute)
        )
        if not isinstance(raw, str | URL):
            raise IsolationConfigError(
                "[D005] the tenant has no database URL",
                hint=f"set the tenant attribute {self.url_attribute!r} or pass url_for=",
            )
        try:
            url = make_url(raw)
        except ArgumentError:
            raise IsolationConfigError("[D005] the tenant's database URL is malformed") from None
        if url.get_backend_name() != "postgresql" or not url.database:
            raise IsolationConfigError(
                "[D005] the tenant's database URL must name a PostgreSQL database",
                hint="postgresql+asyncpg://user:password@host/database",
            )
        return url

    def _claim(self, claims: dict[Any, str], key: Any, tenant_id: str) -> None:
        owner = claims.get(key)
        if owner is not None and owner != tenant_id:
            raise IsolationConfigError(
                "[D002] two tenants map to one database",
                hint="give every tenant its own database (check the tenant store)",
            )
        if owner is None and len(claims) >= self.max_tenants:
            raise TenantCapacityExceeded("too many tenant databases", hint="raise max_tenants")
        claims[key] = tenant_id

    # -- engines ---------------------------------------------------------------------------

    @asynccontextmanager
    async def engine_for(
        self, database: TenantDatabase, tenant: Tenant
    ) -> AsyncIterator[AsyncEngine]:
        url = self.url_of(tenant)
        self._claim(self._targets, _target(url), tenant.id)  # before any SQL
        async with self._cache.lease(tenant.id, url) as engine:
            yield engine

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
                raise IsolationConfigError(
                    "[D001] the tenant's URL leads to another database than it names",
                    hint="check poolers, proxies and DNS in front of the tenant's database",
                )

        event.listen(engine.sync_engine, "connect", check_database)
        install_engine_hooks(engine)
        try:
            async with engine.connect() as conn:
                row = (await conn.execute(text(_IDENTITY_SQL))).one()
            if row.superuser:
                raise IsolationConfigError(
                    "[D004] the tenant's database role is a superuser",
                    hint="give each tenant a NOSUPERUSER role that can reach its database only",
                )
            self._claim(self._identities, (row.server, row.db), tenant_id)
        except IsolationConfigError:
            await engine.dispose()
            raise
        except Exception:
            await engine.dispose()
            # The driver's error may carry the DSN: keep it out of the message and the chain.
            raise TenancyUnavailable("[D003] the tenant's database cannot be reached") from None
        return engine

    # -- start-up and shutdown -------------------------------------------------------------

    def attach(self, database: TenantDatabase) -> None:
        self._targets[_target(database.engine.url)] = _CENTRAL

    async def validate(self, database: TenantDatabase) -> None:
        """Claim the application's own database, so no tenant can be placed on it."""
        try:
            async with database.engine.connect() as conn:
                row = (await conn.execute(text(_IDENTITY_SQL))).one()
        except Exception:
            raise IsolationConfigError(
                "[D003] the application's database cannot be reached",
                hint="check the URL given to TenantDatabase",
            ) from None
        self._claim(self._identities, (row.server, row.db), _CENTRAL)

    async def dispose(self) -> None:
        await self._cache.close()
