"""The isolation audit, per tenant: its own schema or database, complete and migrated alike.

The strategies check placement one tenant at a time while serving (a schema claimed twice, a
URL leading elsewhere). The audit reads the whole registry at once, so it also sees what only
shows across tenants: two tenants on one schema or database, a tenant left at another Alembic
revision than the rest, a schema missing tables its siblings have.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence

from sqlalchemy import MetaData, Table, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine
from sqlalchemy.pool import NullPool
from sqlalchemy.schema import CreateIndex, CreateTable

from ..errors import IsolationConfigError
from ..tenant import Tenant
from .database_per_tenant import _IDENTITY_SQL, DatabasePerTenant, _target
from .rls import Finding
from .schema import _MARKER, SchemaPerTenant, _grants
from .strategy import quote_ident, quote_literal

__all__ = ["audit_databases", "audit_schemas", "compare_revisions"]

_CENTRAL = "the application's own database"
_MISSING_DATABASE = "3D000"  # invalid_catalog_name
_UNREADABLE = "(unreadable)"  # an alembic_version the tenant's role may not read


async def audit_schemas(
    conn: AsyncConnection,
    strategy: SchemaPerTenant,
    tenants: Sequence[Tenant],
    app_role: str,
    registry: Table | None,
) -> list[Finding]:
    """A006, A007, A008, A009, A011 for schema-per-tenant, read as the owner (``conn``)."""
    findings: list[Finding] = []
    placed: dict[str, list[Tenant]] = {}
    for tenant in tenants:
        try:
            placed.setdefault(strategy.schema_for(tenant), []).append(tenant)
        except IsolationConfigError:
            findings.append(
                Finding(
                    "A011",
                    f"tenant {tenant.id}",
                    "the tenant's schema name is unusable: not a plain lower-case name, "
                    "reserved, or the shared schema",
                    _move_tenant(registry, strategy, tenant),
                )
            )
    names = sorted(placed)
    notes = {
        row.nspname: row.note or ""
        for row in await conn.execute(
            text(
                "SELECT nspname, obj_description(oid, 'pg_namespace') AS note"
                " FROM pg_namespace WHERE nspname = ANY(:names)"
            ),
            {"names": names},
        )
    }
    present: dict[str, set[str]] = {name: set() for name in names}
    for row in await conn.execute(
        text(
            "SELECT n.nspname, c.relname FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = ANY(:names) AND c.relkind IN ('r', 'p', 'v', 'm', 'f')"
        ),
        {"names": names},
    ):
        present[row.nspname].add(row.relname)
    expected = [t.name for t in strategy.tenant_tables()]
    revisions: dict[str, str | None] = {}
    for schema in names:
        first, *others = placed[schema]
        for other in others:
            findings.append(
                Finding(
                    "A009",
                    schema,
                    f"tenants {first.id!r} and {other.id!r} map to one schema: each reads and "
                    "writes the other's rows",
                    _move_tenant(registry, strategy, other),
                )
            )
        if schema not in notes:
            findings.append(
                Finding(
                    "A006",
                    schema,
                    f"tenant {first.id!r} has no schema: its requests fail",
                    ";\n".join(
                        [
                            f"CREATE SCHEMA {quote_ident(schema)}",
                            f"COMMENT ON SCHEMA {quote_ident(schema)} IS "
                            + quote_literal(_MARKER + first.id),
                            *_create_tables(strategy, schema, set(expected), app_role),
                        ]
                    ),
                )
            )
            continue
        note = notes[schema]
        if note.startswith(_MARKER) and note != _MARKER + first.id:
            findings.append(
                Finding(
                    "A009",
                    schema,
                    f"the schema was created for another tenant than {first.id!r}",
                    _move_tenant(registry, strategy, first),
                )
            )
        missing = [name for name in expected if name not in present[schema]]
        if missing:
            findings.append(
                Finding(
                    "A007",
                    schema,
                    f"the tenant schema lacks tables: {', '.join(missing)}",
                    ";\n".join(_create_tables(strategy, schema, set(missing), app_role)),
                )
            )
        revisions[schema] = None
        if "alembic_version" in present[schema]:
            revisions[schema] = await _revision(conn, f"{quote_ident(schema)}.alembic_version")
    return findings + compare_revisions(revisions, "schema")


async def audit_databases(
    conn: AsyncConnection,
    strategy: DatabasePerTenant,
    tenants: Sequence[Tenant],
) -> list[Finding]:
    """A008, A010, D002, D004, D005 for database-per-tenant; ``conn`` is the central database."""
    central = (await conn.execute(text(_IDENTITY_SQL))).one()
    identities: dict[tuple[str, str], str] = {(central.server, central.db): _CENTRAL}
    targets: dict[tuple[str, ...], str] = {}
    findings: list[Finding] = []
    revisions: dict[str, str | None] = {}
    for tenant in tenants:
        try:
            url = strategy.url_of(tenant)
        except IsolationConfigError:
            findings.append(
                Finding(
                    "D005",
                    f"tenant {tenant.id}",
                    "the tenant has no usable PostgreSQL database URL",
                    f"set the tenant attribute {strategy.url_attribute!r} in the tenant store",
                )
            )
            continue
        database = url.database or ""
        owner = targets.setdefault(_target(url), tenant.id)
        if owner != tenant.id:
            findings.append(_shared_database(database, owner, tenant))
            continue
        try:
            identity, superuser, revision = await _inspect_database(url)
        except _Unreachable as exc:
            findings.append(
                Finding(
                    "A010",
                    database,
                    f"tenant {tenant.id!r}'s database "
                    + ("does not exist" if exc.missing else "cannot be reached"),
                    f"CREATE DATABASE {quote_ident(database)}"
                    if exc.missing
                    else "check the host, port and credentials of the tenant's database URL",
                )
            )
            continue
        owner = identities.setdefault(identity, tenant.id)
        if owner != tenant.id:
            findings.append(_shared_database(database, owner, tenant))
        if superuser:
            findings.append(
                Finding(
                    "D004",
                    database,
                    f"tenant {tenant.id!r} connects as a superuser, which can reach every "
                    "database on the server",
                    f"ALTER ROLE {quote_ident(url.username or 'CURRENT_USER')} NOSUPERUSER",
                )
            )
        revisions[database] = revision
    return findings + compare_revisions(revisions, "database")


def compare_revisions(revisions: Mapping[str, str | None], what: str) -> list[Finding]:
    """A008: every schema or database at the revision most of them are at.

    Nothing is reported when none has an ``alembic_version`` table (no Alembic in use).
    """
    known = Counter(r for r in revisions.values() if r not in (None, _UNREADABLE))
    if not known:
        return []
    reference = sorted(known.items(), key=lambda item: (-item[1], item[0]))[0][0]
    return [
        Finding(
            "A008",
            subject,
            f"the {what} is at revision {revision or '(none)'} while the others are at "
            f"{reference}: a query for one tenant's model may not match its tables",
            f"upgrade this {what} to {reference} (alembic upgrade, asgi-tenancy migrate)",
        )
        for subject, revision in revisions.items()
        if revision != reference
    ]


class _Unreachable(Exception):
    """A tenant database the audit could not connect to; ``missing`` when it does not exist."""

    def __init__(self, missing: bool) -> None:
        super().__init__()
        self.missing = missing


async def _inspect_database(url: URL) -> tuple[tuple[str, str], bool, str | None]:
    """Identity, superuser flag and Alembic revision of one tenant database."""
    engine = create_async_engine(url, poolclass=NullPool, connect_args={"timeout": 10})
    try:
        try:
            conn = await engine.connect()
        except Exception as exc:
            # The driver's message may carry the URL: only the SQLSTATE is kept, never the text.
            raise _Unreachable(_sqlstate(exc) == _MISSING_DATABASE) from None
        try:
            row = (await conn.execute(text(_IDENTITY_SQL))).one()
            table = await conn.scalar(text("SELECT to_regclass('alembic_version')::text"))
            revision = None
            if table is not None:
                try:
                    revision = await _revision(conn, str(table))
                except DBAPIError:  # the tenant's role may not read it: a revision unknown
                    revision = _UNREADABLE
        finally:
            await conn.close()
    finally:
        await engine.dispose()
    return (row.server, row.db), bool(row.superuser), revision


def _sqlstate(exc: BaseException | None) -> str | None:
    while exc is not None:
        state = getattr(exc, "sqlstate", None)
        if isinstance(state, str):
            return state
        exc = getattr(exc, "orig", None) or exc.__cause__
    return None


async def _revision(conn: AsyncConnection, table: str) -> str | None:
    value = await conn.scalar(
        text(f"SELECT string_agg(version_num, ',' ORDER BY version_num) FROM {table}")
    )
    return None if value is None else str(value)


def _shared_database(database: str, owner: str, tenant: Tenant) -> Finding:
    other = "the application's own database" if owner == _CENTRAL else f"tenant {owner!r}"
    return Finding(
        "D002",
        database,
        f"tenant {tenant.id!r} is placed on the database of {other}",
        "give every tenant its own database (fix its URL in the tenant store)",
    )


def _create_tables(
    strategy: SchemaPerTenant, schema: str, names: set[str], app_role: str
) -> list[str]:
    """``CREATE TABLE`` (and index) statements for ``names`` in ``schema``, then the grants."""
    metadata = MetaData()
    for table in strategy.shared_tables():
        table.to_metadata(metadata)
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    statements = []
    for table in strategy.tenant_tables():
        copy = table.to_metadata(metadata, schema=schema)
        if table.name in names:
            statements.append(str(CreateTable(copy).compile(dialect=dialect)).strip())
            statements += [str(CreateIndex(i).compile(dialect=dialect)) for i in copy.indexes]
    grantee = quote_ident(app_role)
    return statements + _grants(quote_ident(schema), grantee)


def _move_tenant(registry: Table | None, strategy: SchemaPerTenant, tenant: Tenant) -> str:
    """The registry update giving ``tenant`` a schema of its own (then create it: A006)."""
    suggested = "tenant_" + re.sub(r"[^a-z0-9_]", "_", tenant.id.lower())[:56]
    if registry is None or strategy.schema_attribute is None:
        return f"place tenant {tenant.id!r} in a schema of its own, e.g. {suggested}"
    name = quote_ident(registry.name)
    if registry.schema:
        name = f"{quote_ident(registry.schema)}.{name}"
    path = quote_literal("{" + strategy.schema_attribute + "}")
    return (
        f"UPDATE {name} SET attributes = jsonb_set(attributes::jsonb, {path}, "
        f"to_jsonb({quote_literal(suggested)}::text)) WHERE id = {quote_literal(tenant.id)}"
    )
