"""The start-up checks of schema per tenant (S001-S007, and C001, C007 on Citus), read as the
application role."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from ...checks import Finding
from ..citus.checks import citus_version
from ..grants import GrantCodes, Name, check_grants
from ..postgres import qualified_name, quote_ident, superuser_fix
from ..rls.signing_checks import check_signer

if TYPE_CHECKING:
    from .strategy import SchemaPerTenant

__all__ = ["GRANTS", "check"]

#: Missing grants of the serving role: the app role, or a tenant's role (the audit).
GRANTS = GrantCodes(table="S008", sequence="S009")


async def check(schema: SchemaPerTenant, conn: AsyncConnection) -> list[Finding]:
    """Every finding on the live database, read as the application role (no binding)."""
    findings: list[Finding] = []
    role = (
        await conn.execute(
            text(
                "SELECT rolname, rolsuper, oid = 10 AS bootstrap, current_database() AS db,"
                " has_database_privilege(current_database(), 'TEMPORARY') AS temp"
                " FROM pg_roles WHERE rolname = current_user"
            )
        )
    ).one()
    app = quote_ident(role.rolname)
    if role.rolsuper:
        findings.append(
            Finding(
                "S001",
                role.rolname,
                "the application connects as a superuser: every schema is open to it",
                superuser_fix(role.rolname, bootstrap=role.bootstrap),
            )
        )
    if role.temp:
        findings.append(
            Finding(
                "S005",
                role.rolname,
                "the application role may create temporary tables, which outlive a "
                "transaction on a pooled connection and can shadow tenant tables",
                f"REVOKE TEMPORARY ON DATABASE {quote_ident(role.db)} FROM PUBLIC, {app}",
            )
        )
    if schema.citus:
        findings += await _check_citus_extension(conn)
    if schema.per_tenant_roles:
        findings += await _check_inheritance(conn)
        findings += await _check_citus_roles(conn)
    if schema.signer is not None and not findings:
        findings += await check_signer(schema.signer, conn)
    names = sorted({t.name for t in schema.tenant_tables()})
    if names:
        findings += await _check_shadowing(conn, names)
        findings += await _check_owned(conn, names, schema.shared_schema)
    shared: list[Name] = []
    for table in schema.shared_tables():
        qualified = qualified_name(table.schema, table.name)
        if await conn.scalar(text("SELECT to_regclass(:n)"), {"n": qualified}) is None:
            findings.append(
                Finding(
                    "S004",
                    qualified,
                    "shared table is missing or the role lacks USAGE on its schema",
                    "run create_shared_schema() as the table owner",
                )
            )
        else:
            shared.append((table.schema, table.name))
    # Tenant tables are judged per tenant schema by the audit (validate() knows no tenant).
    return findings + await check_grants(conn, GRANTS, shared_tables=shared)


async def _check_citus_extension(conn: AsyncConnection) -> list[Finding]:
    """C001: ``citus=True`` on a server without Citus: no schema would be distributed."""
    if await citus_version(conn) is not None:
        return []
    return [
        Finding(
            "C001",
            "extension citus",
            "SchemaPerTenant(citus=True) but this database has no Citus extension (create it on"
            " the coordinator and every worker, or drop citus=True on plain PostgreSQL)",
            "CREATE EXTENSION citus",
        )
    ]


async def _check_citus_roles(conn: AsyncConnection) -> list[Finding]:
    """C007: on Citus the coordinator reaches the workers as the transaction's current role; a
    tenant role is NOLOGIN, so every query on a distributed tenant schema would fail there."""
    if await citus_version(conn) is None:
        return []
    return [
        Finding(
            "C007",
            "per_tenant_roles",
            "per-tenant roles on Citus: the workers are reached as the tenant role, which cannot"
            " log in",
            "use SchemaPerTenant(citus=True) without per_tenant_roles on Citus",
        )
    ]


async def _check_shadowing(conn: AsyncConnection, names: Sequence[str]) -> list[Finding]:
    """A tenant table's name reachable without the binding: through the role's own
    search_path (``$user``, ``public``...) or sitting in ``public``."""
    findings = []
    who = (await conn.execute(text("SELECT current_user AS role, current_database() AS db"))).one()
    for name in names:
        found = await conn.scalar(
            text(
                "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c"
                " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass(:n)"
            ),
            {"n": quote_ident(name)},
        )
        if found is not None:
            findings.append(
                Finding(
                    "S003",
                    str(found),
                    f"tenant table {name!r} resolves through the role's default search_path",
                    f"ALTER ROLE {quote_ident(who.role)} IN DATABASE {quote_ident(who.db)}"
                    " SET search_path = ''",
                )
            )
    in_public = await conn.scalars(
        text(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = 'public' AND c.relname = ANY(:names)"
        ),
        {"names": list(names)},
    )
    for name in in_public:
        findings.append(
            Finding(
                "S002",
                f"public.{name}",
                "a tenant table's name exists in public: one search_path edit would expose it",
                "drop the table from public (tenant tables belong in tenant schemas)",
            )
        )
    return findings


async def _check_owned(
    conn: AsyncConnection, names: Sequence[str], shared: str | None
) -> list[Finding]:
    owned = await conn.execute(
        text(
            "SELECT n.nspname, c.relname FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE c.relname = ANY(:names) AND c.relkind IN ('r', 'p', 'v', 'm', 'f')"
            " AND n.nspname NOT LIKE 'pg\\_%' AND n.nspname <> 'information_schema'"
            " AND n.nspname IS DISTINCT FROM :shared"
            " AND pg_has_role(current_user, c.relowner, 'USAGE')"
        ),
        {"names": list(names), "shared": shared},
    )
    return [
        Finding(
            "S006",
            f"{row.nspname}.{row.relname}",
            "the application role owns a tenant table (owners can ALTER, DROP and GRANT it)",
            "create tenant tables as another role and grant the app role DML only",
        )
        for row in owned
    ]


async def _check_inheritance(conn: AsyncConnection) -> list[Finding]:
    """Per-tenant roles confine only if the app role does not inherit their privileges."""
    version = int(await conn.scalar(text("SHOW server_version_num")) or 0)
    # PostgreSQL 16+ records inheritance per membership; before, it is the member's attribute.
    inherits = "m.inherit_option" if version >= 160000 else "r.rolinherit"
    inheriting = await conn.scalar(
        text(
            "SELECT EXISTS (SELECT 1 FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.member"
            f" WHERE r.rolname = current_user AND {inherits})"
        )
    )
    if not inheriting:
        return []
    return [
        Finding(
            "S007",
            "current_user",
            "the application role inherits the privileges of the roles it is a member of, so "
            "per-tenant roles confine nothing: every tenant schema is open without SET ROLE",
            "PostgreSQL 16+: GRANT <tenant role> TO <app role> WITH INHERIT FALSE; "
            "before 16: ALTER ROLE <app role> NOINHERIT",
        )
    ]
