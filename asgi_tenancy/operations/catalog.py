"""The catalog-only audits of schema and database tenancy: what the server alone tells.

Without the application, tenants are found by the marker comment the library puts on every
schema, role and database it makes for one (``asgi-tenancy tenant <id>``). A schema database is
then audited as ``SchemaPerTenant`` over the tables its tenant schemas hold, never as
row-level security (whose checks would call every table unprotected); a database per tenant by
what the application role (or the tenant's own role) may do in each tenant database.
"""

from __future__ import annotations

from sqlalchemy import Column, Integer, MetaData, Table, text
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine
from sqlalchemy.pool import NullPool

from ..checks import Finding
from ..errors import InvalidTenantIdentifier
from ..sqlalchemy.database_per_tenant.placement import USER_TABLES_SQL
from ..sqlalchemy.grants import GrantCodes, check_grants, in_database
from ..sqlalchemy.placement import AuditContext
from ..sqlalchemy.postgres import MARKER, superuser_fix
from ..sqlalchemy.schema import SchemaPerTenant
from ..sqlalchemy.strategy import IsolationStrategy
from ..tenant import Tenant

__all__ = ["catalog_databases", "catalog_schemas"]

_MARKED_SCHEMAS = (
    "SELECT n.nspname AS name, substr(obj_description(n.oid, 'pg_namespace'), :skip) AS tenant,"
    " EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = n.nspname"
    "  AND shobj_description(r.oid, 'pg_authid') = obj_description(n.oid, 'pg_namespace'))"
    "  AS has_role"
    " FROM pg_namespace n WHERE starts_with(obj_description(n.oid, 'pg_namespace'), :marker)"
    " ORDER BY 1"
)
_MARKED_DATABASES = (
    "SELECT d.datname AS name, substr(shobj_description(d.oid, 'pg_database'), :skip) AS tenant,"
    " (SELECT r.rolname FROM pg_roles r WHERE shobj_description(r.oid, 'pg_authid')"
    "  = shobj_description(d.oid, 'pg_database') LIMIT 1) AS role"
    " FROM pg_database d WHERE starts_with(shobj_description(d.oid, 'pg_database'), :marker)"
    " ORDER BY 1"
)
_MARKER_PARAMS = {"marker": MARKER, "skip": len(MARKER) + 1}


def _tenant(tenant_id: str, **attributes: str) -> Tenant | None:
    try:
        return Tenant(tenant_id, attributes=attributes)
    except (InvalidTenantIdentifier, ValueError):
        return None  # a marker edited by hand: not a tenant this audit can name


async def catalog_schemas(conn: AsyncConnection) -> tuple[SchemaPerTenant, list[Tenant]]:
    """``SchemaPerTenant`` over the tables of the marked schemas, and their tenants; the
    per-tenant roles are assumed when every marked schema has a marked role of its name."""
    rows = (await conn.execute(text(_MARKED_SCHEMAS), _MARKER_PARAMS)).all()
    tenants = [t for row in rows if (t := _tenant(row.tenant, schema=row.name)) is not None]
    names = (
        await conn.scalars(
            text(
                "SELECT DISTINCT c.relname FROM pg_class c"
                " JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = ANY(:schemas) AND c.relkind IN ('r', 'p')"
                " AND NOT c.relispartition AND c.relname <> 'alembic_version' ORDER BY 1"
            ),
            {"schemas": [t.attributes["schema"] for t in tenants]},
        )
    ).all()
    metadata = MetaData()
    for name in names:
        Table(name, metadata, Column("_", Integer))
    roles = bool(rows) and all(row.has_role for row in rows)
    return SchemaPerTenant(metadata=metadata, per_tenant_roles=roles), tenants


async def catalog_databases(
    conn: AsyncConnection, app_role: str
) -> tuple[IsolationStrategy, list[Tenant]]:
    """The marked databases as tenants, audited by ``_CatalogDatabases``."""
    rows = (await conn.execute(text(_MARKED_DATABASES), _MARKER_PARAMS)).all()
    tenants = []
    for row in rows:
        tenant = _tenant(row.tenant, database=row.name, role=row.role or app_role)
        if tenant is not None:
            tenants.append(tenant)
    return _CatalogDatabases(), tenants


class _CatalogDatabases(IsolationStrategy):
    """Database per tenant as the catalog shows it: the serving roles and their grants."""

    name = "database"
    title = "database isolation"

    async def audit(self, audit: AuditContext) -> list[Finding]:
        audit.revision_kind = "database"
        findings = await _superusers(audit.conn, {audit.app_role, *_roles(audit)})
        url = audit.conn.engine.url
        for tenant in audit.tenants:
            database, role = tenant.attributes["database"], tenant.attributes["role"]
            engine = create_async_engine(
                url.set(database=database), poolclass=NullPool, connect_args={"timeout": 10}
            )
            try:
                async with engine.connect() as conn:
                    names = [(r.schema, r.name) for r in await conn.execute(text(USER_TABLES_SQL))]
                    grants = await check_grants(conn, _GRANTS, tenant_tables=names, grantee=role)
                findings += in_database(database, grants)
            except Exception:  # the driver's message may carry the URL: never shown
                findings.append(
                    Finding(
                        "A010",
                        database,
                        f"tenant {tenant.id!r}'s database cannot be reached",
                        "check that the database exists and accepts the audit's connection",
                    )
                )
            finally:
                await engine.dispose()
        return findings


_GRANTS = GrantCodes(table="D006", sequence="D007")


def _roles(audit: AuditContext) -> set[str]:
    return {str(t.attributes["role"]) for t in audit.tenants}


async def _superusers(conn: AsyncConnection, roles: set[str]) -> list[Finding]:
    rows = await conn.execute(
        text(
            "SELECT rolname, oid = 10 AS bootstrap FROM pg_roles"
            " WHERE rolsuper AND rolname = ANY(:roles) ORDER BY 1"
        ),
        {"roles": sorted(roles)},
    )
    return [
        Finding(
            "D004",
            row.rolname,
            "a role serving tenants is a superuser, which can reach every database on the server",
            superuser_fix(row.rolname, bootstrap=row.bootstrap),
        )
        for row in rows
    ]
