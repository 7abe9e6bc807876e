"""Where a tenant's data lives under each strategy, and how the provisioner creates and removes it.

Every schema, role and database created here carries a comment naming its tenant (the marker
``SchemaPerTenant`` already writes on schemas); drop removes only what carries the marker of the
tenant being dropped, so a tampered registry row can never point a ``DROP`` elsewhere.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine
from sqlalchemy.pool import NullPool

from ..errors import IsolationConfigError, TenantExists
from ..tenant import Tenant, TenantStatus
from ._registry import Registry
from .database_per_tenant import DatabasePerTenant, _target
from .schema import _MARKER, SchemaPerTenant, _check_name, _grants
from .strategy import quote_ident, quote_literal

if TYPE_CHECKING:
    from .provisioning import TenantProvisioner

# The catalogue row of a schema, role or database by name, with its comment.
_CATALOG = {
    "schema": "SELECT obj_description(oid, 'pg_namespace') FROM pg_namespace WHERE nspname = :n",
    "role": "SELECT shobj_description(oid, 'pg_authid') FROM pg_roles WHERE rolname = :n",
    "database": "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = :n",
}


async def _exists(conn: AsyncConnection, kind: str, name: str) -> bool:
    return (await conn.execute(text(_CATALOG[kind]), {"n": name})).first() is not None


async def _require_own(conn: AsyncConnection, kind: str, name: str, tenant: Tenant) -> bool:
    """Whether the object exists; refuses one that does not carry this tenant's marker."""
    row = (await conn.execute(text(_CATALOG[kind]), {"n": name})).first()
    if row is None:
        return False
    if row[0] != _MARKER + tenant.id:
        raise IsolationConfigError(
            f"the tenant's {kind} was not created for this tenant: it is left in place",
            hint=f"check the tenant's attributes; remove the {kind} by hand if it is stale",
        )
    return True


def _comment(kind: str, name: str, tenant: Tenant) -> str:
    return f"COMMENT ON {kind.upper()} {quote_ident(name)} IS {quote_literal(_MARKER + tenant.id)}"


class RegistryPlacement:
    """A registry row and nothing else: the row-level strategies share their tables."""

    def __init__(self, provisioner: TenantProvisioner) -> None:
        self.admin = provisioner.admin_engine
        self.app_role = provisioner.app_role
        self.registry = Registry(provisioner.table)

    def attributes(self, tenant: Tenant) -> dict[str, Any]:
        """The attributes to register: the caller's, plus where the strategy places the tenant."""
        return dict(tenant.attributes)

    async def create(self, tenant: Tenant) -> None:
        async with self.admin.begin() as conn:  # one transaction: a failure leaves nothing
            await self.registry.claim(conn, tenant, TenantStatus.ACTIVE)
            await self.create_in(conn, tenant)

    async def create_in(self, conn: AsyncConnection, tenant: Tenant) -> None:
        """Objects created in the registry row's transaction."""

    async def drop(self, tenant_id: str) -> None:
        async with self.admin.begin() as conn:
            tenant = await self.registry.lock(conn, tenant_id)
            await self.drop_in(conn, tenant)
            await self.registry.remove(conn, tenant_id)

    async def drop_in(self, conn: AsyncConnection, tenant: Tenant) -> None:
        """Objects removed in the registry row's transaction."""


class SchemaPlacement(RegistryPlacement):
    """A schema (and optionally a NOLOGIN role) per tenant, created with the registry row."""

    def __init__(self, provisioner: TenantProvisioner, strategy: SchemaPerTenant) -> None:
        super().__init__(provisioner)
        self.strategy = strategy

    def attributes(self, tenant: Tenant) -> dict[str, Any]:
        # Pin the names in the registry: a later change of naming never moves a tenant.
        attributes = dict(tenant.attributes)
        schema, role = self.strategy.schema_for(tenant), self.strategy.role_for(tenant)
        if self.strategy.schema_attribute is not None:
            attributes.setdefault(self.strategy.schema_attribute, schema)
        if self.strategy.role_attribute is not None:
            attributes.setdefault(self.strategy.role_attribute, role)
        return attributes

    async def create_in(self, conn: AsyncConnection, tenant: Tenant) -> None:
        schema, role = self.strategy.schema_for(tenant), self.strategy.role_for(tenant)
        if await _exists(conn, "schema", schema):
            raise TenantExists("the tenant's schema already exists")
        if role is not None and await _exists(conn, "role", role):
            raise TenantExists("the tenant's role already exists")
        await self.strategy.create_tenant_schema(conn, tenant, self.app_role)
        if role is not None:
            await conn.execute(text(_comment("role", role, tenant)))

    async def drop_in(self, conn: AsyncConnection, tenant: Tenant) -> None:
        schema, role = self.strategy.schema_for(tenant), self.strategy.role_for(tenant)
        if await _require_own(conn, "schema", schema, tenant):
            await conn.execute(text(f"DROP SCHEMA {quote_ident(schema)} CASCADE"))
        if role is not None and await _require_own(conn, "role", role, tenant):
            # Its grants on the shared schema go first; membership goes with the role.
            await conn.execute(text(f"DROP OWNED BY {quote_ident(role)}"))
            await conn.execute(text(f"DROP ROLE {quote_ident(role)}"))


class DatabasePlacement(RegistryPlacement):
    """A database per tenant on the admin engine's server.

    ``CREATE DATABASE`` cannot run in a transaction, so the row is registered ``suspended``
    (never served), the database built, then the row activated; a failure undoes each step.
    """

    def __init__(self, provisioner: TenantProvisioner, strategy: DatabasePerTenant) -> None:
        super().__init__(provisioner)
        self.strategy = strategy
        self.metadata = provisioner.metadata
        self.app_url = provisioner.app_url
        self.naming = provisioner.database_naming

    def attributes(self, tenant: Tenant) -> dict[str, Any]:
        attributes = dict(tenant.attributes)
        attributes.setdefault("database", self.naming.format(id=tenant.id))
        url_attribute = self.strategy.url_attribute
        if self.strategy.url_for is None and url_attribute not in attributes:
            if self.app_url is None:
                raise IsolationConfigError(
                    "the provisioner needs app_url to write the tenant's database URL",
                    hint="TenantProvisioner(..., app_url=<app role URL>) or "
                    "DatabasePerTenant(url_for=...)",
                )
            url = self.app_url.set(database=attributes["database"])
            attributes[url_attribute] = url.render_as_string(hide_password=False)
        attributes["database"] = self.database_of(Tenant(tenant.id, attributes=attributes))
        return attributes

    def database_of(self, tenant: Tenant) -> str:
        """The database the strategy will connect the tenant to, on the admin's server only."""
        url = self.strategy.url_of(tenant)
        if _target(url)[:3] != _target(self.admin.url)[:3]:
            raise IsolationConfigError(
                "the tenant's database would live on another server than the admin engine's",
                hint="provision it with an admin engine connected to that server",
            )
        return _check_name(url.database, "database")

    async def create(self, tenant: Tenant) -> None:
        name = self.database_of(tenant)
        done: list[str] = []
        try:
            async with self.admin.begin() as conn:
                await self.registry.claim(conn, tenant, TenantStatus.SUSPENDED)
            done.append("registry row")
            async with self._autocommit() as conn:
                if await _exists(conn, "database", name):
                    raise TenantExists("the tenant's database already exists")
                await conn.execute(text(f"CREATE DATABASE {quote_ident(name)}"))
                done.append("database")
                for statement in self._database_sql(name, tenant):
                    await conn.execute(text(statement))
            await self._create_tables(name)
            async with self.admin.begin() as conn:
                await self.registry.set_status(conn, tenant.id, TenantStatus.ACTIVE)
        except BaseException as exc:
            await self._undo(tenant.id, name, done, exc)
            raise

    def _database_sql(self, name: str, tenant: Tenant) -> list[str]:
        database, app = quote_ident(name), quote_ident(self.app_role)
        return [
            _comment("database", name, tenant),
            f"REVOKE CONNECT, TEMPORARY ON DATABASE {database} FROM PUBLIC",
            f"GRANT CONNECT ON DATABASE {database} TO {app}",
        ]

    async def _create_tables(self, name: str) -> None:
        """The tables of ``metadata``, owned by the admin role; the app role gets DML only."""
        engine = create_async_engine(self.admin.url.set(database=name), poolclass=NullPool)
        schemas = {"public"}
        try:
            async with engine.begin() as conn:
                await conn.execute(text("REVOKE CREATE ON SCHEMA public FROM PUBLIC"))
                if self.metadata is not None:
                    metadata = self.metadata
                    for table in metadata.tables.values():
                        if table.schema not in (None, "public"):
                            schema = _check_name(table.schema, "table schema")
                            if schema not in schemas:
                                await conn.execute(
                                    text(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema)}")
                                )
                            schemas.add(schema)
                    await conn.run_sync(metadata.create_all)
                for schema in sorted(schemas):
                    for statement in _grants(quote_ident(schema), quote_ident(self.app_role)):
                        await conn.execute(text(statement))
        finally:
            await engine.dispose()

    async def _undo(self, tenant_id: str, name: str, done: list[str], exc: BaseException) -> None:
        """Remove what ``create`` made, newest first; the original error is what propagates."""
        for step in reversed(done):
            try:
                if step == "database":
                    async with self._autocommit() as conn:
                        await conn.execute(
                            text(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")
                        )
                else:
                    async with self.admin.begin() as conn:
                        await self.registry.remove(conn, tenant_id)
            except Exception as cleanup:
                exc.add_note(f"asgi-tenancy: removing the {step} failed ({type(cleanup).__name__})")

    async def drop(self, tenant_id: str) -> None:
        # Suspended first, so a failure part way leaves a tenant that is not served and that
        # another drop_tenant() can finish.
        async with self.admin.begin() as conn:
            tenant = await self.registry.lock(conn, tenant_id)
            name = self.database_of(tenant)
            exists = await _require_own(conn, "database", name, tenant)
            await self.registry.set_status(conn, tenant_id, TenantStatus.SUSPENDED)
        if exists:
            async with self._autocommit() as conn:
                await conn.execute(text(f"DROP DATABASE {quote_ident(name)} WITH (FORCE)"))
        async with self.admin.begin() as conn:
            await self.registry.remove(conn, tenant_id)

    @asynccontextmanager
    async def _autocommit(self) -> AsyncIterator[AsyncConnection]:
        async with self.admin.connect() as conn:
            yield await conn.execution_options(isolation_level="AUTOCOMMIT")
