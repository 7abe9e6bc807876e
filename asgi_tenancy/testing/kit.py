"""``TenancyKit``: what the test kit needs to know about an application, in a few lines.

The models, the strategy (a factory: each test database gets a fresh one), and optionally how
the application builds its ``TenantDatabase``, opens a tenant session, or provisions its
tables. Everything else (two tenants, their rows, the roles) the kit derives.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from sqlalchemy import MetaData, Table, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.schema import CreateTable

from ..errors import IsolationConfigError
from ..sqlalchemy import DatabasePerTenant, IsolationStrategy, SchemaPerTenant, TenantDatabase
from ..sqlalchemy.postgres import check_name, dml_grants
from ..tenant import Tenant
from .rows import RowFactory

__all__ = ["Layout", "Provision", "TenancyKit"]

#: Provisioning of a fresh database as its owner: ``(conn, strategy, tenants, app_role)``.
Provision = Callable[[AsyncConnection, IsolationStrategy, Sequence[Tenant], str], Awaitable[None]]
_VERSION = "1"  # bump when the kit's own provisioning or rows change: templates are rebuilt


def _default_database(url: str, strategy: IsolationStrategy) -> TenantDatabase:
    return TenantDatabase(url, strategy, engine_options={"pool_size": 2, "max_overflow": 0})


def _default_session(database: TenantDatabase) -> AbstractAsyncContextManager[AsyncSession]:
    return database.session()


class TenancyKit:
    """An application as the test kit sees it.

    ``models`` is the declarative base (its metadata and mapped classes); ``strategy`` builds
    the application's isolation strategy. ``database(url, strategy)`` and ``session(db)`` are
    how the application builds its ``TenantDatabase`` and opens a tenant session (defaults:
    ``TenantDatabase(url, strategy)`` and ``db.session()``); ``provision`` replaces the kit's
    own set-up of the tables (``create_all`` and ``install()``, or one schema per tenant).
    """

    def __init__(
        self,
        *,
        models: type[DeclarativeBase],
        strategy: Callable[[], IsolationStrategy],
        tenants: tuple[str, str] = ("acme", "globex"),
        attributes: Mapping[str, Mapping[str, Any]] | None = None,
        app_role: str = "tenancy_kit_app",
        database: Callable[[str, IsolationStrategy], TenantDatabase] = _default_database,
        session: Callable[[TenantDatabase], AbstractAsyncContextManager[AsyncSession]] = (
            _default_session
        ),
        provision: Provision | None = None,
        name: str = "app",
    ) -> None:
        if len(set(tenants)) != 2:
            raise IsolationConfigError("the kit needs two different tenant ids")
        self.models = models
        self.metadata: MetaData = models.metadata
        self.strategy = strategy
        self.tenants = tuple(Tenant(t, attributes=(attributes or {}).get(t, {})) for t in tenants)
        self.app_role = check_name(app_role, "application role")
        self.database = database
        self.session = session
        self.provision = provision
        self.name = check_name(name, "kit")
        self.layout = Layout.of(strategy())
        self.rows = RowFactory(tenants, self.layout.tenant_column, self.layout.shared(self))

    def __repr__(self) -> str:
        return f"TenancyKit({self.name!r}, layout={self.layout.name!r})"

    def tenant_models(self) -> list[type[Any]]:
        """The mapped classes whose table holds tenants' rows, in the metadata's order."""
        shared = self.layout.shared(self)
        order = {t: i for i, t in enumerate(self.metadata.sorted_tables)}
        found: list[tuple[int, type[Any]]] = []
        for mapper in self.models.registry.mappers:
            table = mapper.local_table
            if mapper.inherits is None and isinstance(table, Table) and table.name not in shared:
                found.append((order[table], mapper.class_))
        return [model for _, model in sorted(found, key=lambda pair: pair[0])]

    def fingerprint(self) -> str:
        """A digest of everything the template database is built from: the tables, the
        strategy's DDL, the tenants, the rows and the kit's version."""
        dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
        strategy = self.strategy()
        parts = [_VERSION, self.name, self.app_role, type(strategy).__qualname__, strategy.name]
        parts += [str(CreateTable(t).compile(dialect=dialect)) for t in self.metadata.sorted_tables]
        parts += strategy.ddl()
        parts += [repr((t.id, sorted(t.attributes.items()))) for t in self.tenants]
        parts.append(getattr(self.provision, "__qualname__", "default"))
        for table in self.metadata.sorted_tables:
            for owner in self.layout.owners(self, table):
                parts.append(repr(self.rows.rows(table, owner)))
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


class Layout:
    """Where a tenant's rows live: shared tables with a tenant column, a schema each, or a
    database each."""

    name = "row"

    def __init__(self, strategy: IsolationStrategy) -> None:
        self.tenant_column: str | None = getattr(strategy, "tenant_column", None)

    #: Whether each tenant has a database of its own (the kit then clones one per tenant).
    per_tenant_database = False

    @staticmethod
    def of(strategy: IsolationStrategy) -> Layout:
        if isinstance(strategy, DatabasePerTenant):
            return DatabaseLayout(strategy)
        if isinstance(strategy, SchemaPerTenant):
            return SchemaLayout(strategy)
        layout = Layout(strategy)
        if layout.tenant_column is None:
            raise IsolationConfigError("the strategy names no tenant column")
        return layout

    def shared(self, kit: TenancyKit) -> frozenset[str]:
        tables = kit.metadata.sorted_tables
        column = self.tenant_column
        return frozenset(t.name for t in tables if column is None or column not in t.c)

    def owners(self, kit: TenancyKit, table: Table) -> list[int | None]:
        """Whose rows ``table`` holds: tenant indexes, or ``None`` for a shared table."""
        return [None] if table.name in self.shared(kit) else [0, 1]

    def options(self, tenant: Tenant | None) -> dict[str, Any]:
        """Execution options that make an admin connection read ``tenant``'s tables."""
        return {}

    def where(self, table: Table, tenant: Tenant) -> Any:
        """The admin's predicate for ``tenant``'s rows of ``table`` (``None``: all of them)."""
        return table.c[self.tenant_column] == tenant.id if self.tenant_column else None

    async def provision(
        self, conn: AsyncConnection, strategy: IsolationStrategy, kit: TenancyKit
    ) -> None:
        """The tables in ``public``, the strategy's DDL, DML grants for the app role."""
        await conn.run_sync(kit.metadata.create_all)
        await strategy.install(conn)
        for statement in dml_grants("public", kit.app_role):
            await conn.execute(text(statement))


class SchemaLayout(Layout):
    """Schema isolation: each tenant's tables in its own schema, shared ones in one schema."""

    name = "schema"

    def __init__(self, strategy: SchemaPerTenant) -> None:
        self.tenant_column = None
        self.strategy = strategy

    def shared(self, kit: TenancyKit) -> frozenset[str]:
        return frozenset(t.name for t in self.strategy.shared_tables())

    def options(self, tenant: Tenant | None) -> dict[str, Any]:
        if tenant is None:
            return {}
        return {"schema_translate_map": {None: self.strategy.schema_for(tenant)}}

    async def provision(
        self, conn: AsyncConnection, strategy: IsolationStrategy, kit: TenancyKit
    ) -> None:
        """The shared schema, the strategy's DDL, then one schema per tenant."""
        assert isinstance(strategy, SchemaPerTenant)
        if strategy.shared_schema is not None:
            await strategy.create_shared_schema(conn, kit.app_role)
        await strategy.install(conn)
        for tenant in kit.tenants:
            await strategy.create_tenant_schema(conn, tenant, kit.app_role)


class DatabaseLayout(Layout):
    """A database per tenant: the same tables in each, every key colliding; the kit clones
    the template once per tenant (and once for the application's own database) and gives each
    tenant the URL of its clone in the attribute the strategy reads."""

    name = "database"
    per_tenant_database = True

    def __init__(self, strategy: DatabasePerTenant) -> None:
        if strategy.url_for is not None:
            raise IsolationConfigError(
                "the test kit places tenants through a tenant attribute, not url_for",
                hint="DatabasePerTenant(url_attribute=...) in the kit's strategy factory",
            )
        self.tenant_column = None
        self.url_attribute = strategy.url_attribute

    def shared(self, kit: TenancyKit) -> frozenset[str]:
        return frozenset()

    def placed(self, tenant: Tenant, url: str) -> Tenant:
        """``tenant`` as the application's store would hold it: its database's URL added."""
        return Tenant(tenant.id, attributes={**tenant.attributes, self.url_attribute: url})

    async def provision(
        self, conn: AsyncConnection, strategy: IsolationStrategy, kit: TenancyKit
    ) -> None:
        """The tables and DML grants; each tenant's clone of it gets that tenant's rows."""
        await conn.run_sync(kit.metadata.create_all)
        for statement in dml_grants("public", kit.app_role):
            await conn.execute(text(statement))
