"""SchemaPerTenant: one PostgreSQL schema per tenant, chosen by a transaction-local search_path.

Every transaction of a tenant's session starts with
``SELECT set_config('search_path', '"tenant_x", pg_temp', true)`` (plus ``set_config('role', ...)``
when per-tenant roles are on), sent inside the BEGIN message. The tenant schema is the only
schema searched for tables: no ``public`` fallback, so a table missing from the tenant schema is
an error, never another schema's rows. ``pg_catalog`` is searched implicitly; ``pg_temp`` is
listed last so a temporary table can never shadow a tenant table (``validate()`` also refuses a
role that may create temporary tables). Shared tables live in one schema and are always
qualified by it (``__table_args__ = {"schema": "shared"}``).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from sqlalchemy import MetaData, Table, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ..errors import IsolationConfigError, TenancyUnavailable
from ..tenant import Tenant
from .rls import Finding
from .strategy import IsolationStrategy, quote_ident, quote_literal

if TYPE_CHECKING:
    from .database import TenantDatabase

__all__ = ["SchemaPerTenant"]

# Lower-case, unquoted-style identifiers only: no case folding surprises, no quoting games.
_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}\Z")
_RESERVED = frozenset({"public", "information_schema", "pg_catalog", "pg_toast", "pg_temp"})
_MARKER = "asgi-tenancy tenant "  # schema comment written by create_tenant_schema()

Naming = str | Callable[[Tenant], str]


def _check_name(name: object, what: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise IsolationConfigError(
            f"the tenant's {what} name is not a plain lower-case identifier",
            hint="use 1-63 characters from a-z, 0-9 and '_', not starting with a digit",
        )
    if name in _RESERVED or name.startswith("pg_"):
        raise IsolationConfigError(
            f"the tenant's {what} name is reserved", hint="choose a name outside public and pg_*"
        )
    return name


class _BoundedMap:
    """Name -> tenant id claims, oldest forgotten first once ``limit`` entries are held."""

    def __init__(self, limit: int) -> None:
        self._items: OrderedDict[str, str] = OrderedDict()
        self._limit = limit

    def claim(self, name: str, tenant_id: str, what: str) -> None:
        owner = self._items.get(name)
        if owner is not None and owner != tenant_id:
            raise IsolationConfigError(
                f"two tenants map to one {what}",
                hint=f"give every tenant its own {what} (check the tenant store)",
            )
        self._items[name] = tenant_id
        self._items.move_to_end(name)
        if len(self._items) > self._limit:
            self._items.popitem(last=False)


class SchemaPerTenant(IsolationStrategy):
    """Isolation by one schema per tenant (PostgreSQL).

    The schema comes from ``tenant.attributes[schema_attribute]`` when present, else from
    ``naming`` (a format string with ``{id}``, or a callable). Tables of ``metadata`` without a
    schema are tenant tables; those in ``shared_schema`` are shared; any other schema is refused.
    ``per_tenant_roles=True`` also sets a transaction-local role: the role named by
    ``tenant.attributes[role_attribute]``, or the schema's name.
    """

    name = "schema"

    def __init__(
        self,
        *,
        metadata: MetaData | None = None,
        schema_attribute: str | None = "schema",
        naming: Naming = "tenant_{id}",
        shared_schema: str | None = "shared",
        per_tenant_roles: bool = False,
        role_attribute: str | None = None,
        existence_ttl: float = 60.0,
        max_cached_tenants: int = 10_000,
        max_claims: int = 100_000,
    ) -> None:
        if shared_schema is not None:
            _check_name(shared_schema, "shared schema")
        if isinstance(naming, str) and "{id}" not in naming:
            raise IsolationConfigError(
                "a naming format must contain {id}", hint="for example 'tenant_{id}'"
            )
        if role_attribute is not None and not per_tenant_roles:
            raise IsolationConfigError(
                "role_attribute needs per_tenant_roles=True", hint="set per_tenant_roles=True"
            )
        if existence_ttl < 0 or max_cached_tenants < 1 or max_claims < 1:
            raise IsolationConfigError("cache sizes must be positive and the TTL not negative")
        self.metadata = metadata
        self.schema_attribute = schema_attribute
        self.naming = naming
        self.shared_schema = shared_schema
        self.per_tenant_roles = per_tenant_roles
        self.role_attribute = role_attribute
        self.existence_ttl = existence_ttl
        self._max_cached = max_cached_tenants
        self._schemas = _BoundedMap(max_claims)
        self._roles = _BoundedMap(max_claims)
        # tenant id -> (binding SQL, expiry on the monotonic clock) for tenants whose schema
        # was seen in the catalogue; LRU, at most ``max_cached_tenants`` entries.
        self._known: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._checking: dict[str, asyncio.Future[None]] = {}
        if metadata is not None:
            self.tenant_tables()  # refuses fixed-schema tenant tables at construction

    # -- placement -------------------------------------------------------------------------

    def schema_for(self, tenant: Tenant) -> str:
        """The tenant's schema name, validated (``IsolationConfigError`` if unusable)."""
        name: object = None
        if self.schema_attribute is not None:
            name = tenant.attributes.get(self.schema_attribute)
        if name is None:
            name = (
                self.naming.format(id=tenant.id)
                if isinstance(self.naming, str)
                else self.naming(tenant)
            )
        schema = _check_name(name, "schema")
        if schema == self.shared_schema:
            raise IsolationConfigError(
                "a tenant cannot use the shared schema", hint="give the tenant its own schema"
            )
        return schema

    def role_for(self, tenant: Tenant) -> str | None:
        """The tenant's transaction-local role, or ``None`` when per-tenant roles are off."""
        if not self.per_tenant_roles:
            return None
        name: object = None
        if self.role_attribute is not None:
            name = tenant.attributes.get(self.role_attribute)
        return _check_name(name if name is not None else self.schema_for(tenant), "role")

    def _place(self, tenant: Tenant) -> str:
        """Claim the tenant's schema (and role) and build its binding; raises on a collision."""
        schema = self.schema_for(tenant)
        role = self.role_for(tenant)
        self._schemas.claim(schema, tenant.id, "schema")
        path = quote_literal(f'"{schema}", pg_temp')
        sql = f"SELECT set_config('search_path', {path}, true)"
        if role is not None:
            self._roles.claim(role, tenant.id, "role")
            sql += f", set_config('role', {quote_literal(role)}, true)"
        return sql

    # -- binding ---------------------------------------------------------------------------

    def binding_sql(self, tenant: Tenant) -> str:
        return self._place(tenant)

    @asynccontextmanager
    async def engine_for(
        self, database: TenantDatabase, tenant: Tenant
    ) -> AsyncIterator[AsyncEngine]:
        sql = self._place(tenant)
        known = self._known.get(tenant.id)
        if known is None or known[0] != sql or known[1] < time.monotonic():
            await asyncio.shield(self._check_once(database.engine, tenant, sql))
        yield database.engine

    def _check_once(self, engine: AsyncEngine, tenant: Tenant, sql: str) -> asyncio.Future[None]:
        """Single flight: concurrent cold requests of one tenant share one catalogue read."""
        pending = self._checking.get(tenant.id)
        if pending is not None:
            return pending
        pending = asyncio.ensure_future(self._check_schema(engine, tenant))
        self._checking[tenant.id] = pending

        def done(future: asyncio.Future[None]) -> None:
            del self._checking[tenant.id]
            if not future.cancelled() and future.exception() is None:
                self._known[tenant.id] = (sql, time.monotonic() + self.existence_ttl)
                self._known.move_to_end(tenant.id)
                if len(self._known) > self._max_cached:
                    self._known.popitem(last=False)

        pending.add_done_callback(done)
        return pending

    async def _check_schema(self, engine: AsyncEngine, tenant: Tenant) -> None:
        """One catalogue read per tenant and TTL: the schema exists and is not another's."""
        schema = self.schema_for(tenant)
        async with engine.connect() as conn:
            row = (
                await conn.execute(
                    text(
                        "SELECT n.oid IS NOT NULL AS found,"
                        " obj_description(n.oid, 'pg_namespace') AS note"
                        " FROM (SELECT 1) AS one"
                        " LEFT JOIN pg_namespace n ON n.nspname = :schema"
                    ),
                    {"schema": schema},
                )
            ).one()
        if not row.found:
            raise TenancyUnavailable("the tenant's schema does not exist")
        note = row.note or ""
        if note.startswith(_MARKER) and note != _MARKER + tenant.id:
            raise IsolationConfigError(
                "two tenants map to one schema",
                hint="the schema was created for another tenant; check the tenant store",
            )

    # -- tables ----------------------------------------------------------------------------

    def tenant_tables(self) -> list[Table]:
        """Tables of ``metadata`` without a schema; refuses tables in any foreign schema."""
        if self.metadata is None:
            return []
        tables = []
        for table in self.metadata.sorted_tables:
            if "." in table.name:
                raise IsolationConfigError(
                    f"table {table.name!r} has a schema-qualified name",
                    hint="name tables plainly; put shared tables in the shared schema",
                )
            if table.schema is None:
                tables.append(table)
            elif table.schema != self.shared_schema:
                raise IsolationConfigError(
                    f"table {table.fullname!r} has a fixed schema: a tenant table cannot",
                    hint=f"remove the schema, or use {self.shared_schema!r} for shared tables",
                )
        return tables

    def shared_tables(self) -> list[Table]:
        if self.metadata is None:
            return []
        return [t for t in self.metadata.sorted_tables if t.schema == self.shared_schema]

    # -- DDL -------------------------------------------------------------------------------

    async def create_shared_schema(self, admin: AsyncConnection, app_role: str) -> None:
        """Create the shared schema and its tables, readable by ``app_role`` (run as owner)."""
        if self.shared_schema is None:
            raise IsolationConfigError("no shared schema configured")
        schema = f'"{self.shared_schema}"'
        role = f'"{_check_name(app_role, "application role")}"'
        await admin.execute(text(f"CREATE SCHEMA IF NOT EXISTS {schema}"))
        tables = self.shared_tables()
        await admin.run_sync(lambda c: self._require_metadata().create_all(c, tables=tables))
        for statement in _grants(schema, role):
            await admin.execute(text(statement))

    async def create_tenant_schema(
        self, admin: AsyncConnection, tenant: Tenant, app_role: str
    ) -> None:
        """Create the tenant's schema, its tables from ``metadata`` and the grants.

        Run as the owner of the tables (never the application role). With per-tenant roles the
        tenant role is created (NOLOGIN) and granted to ``app_role``; only it gets privileges.
        """
        schema = self.schema_for(tenant)
        quoted = f'"{schema}"'
        app = f'"{_check_name(app_role, "application role")}"'
        role = self.role_for(tenant)
        await admin.execute(text(f"CREATE SCHEMA IF NOT EXISTS {quoted}"))
        await admin.execute(
            text(f"COMMENT ON SCHEMA {quoted} IS {quote_literal(_MARKER + tenant.id)}")
        )
        tables = self.tenant_tables()
        translate = {None: schema}

        def create(sync: Connection) -> None:
            branch = sync.execution_options(schema_translate_map=translate)
            self._require_metadata().create_all(branch, tables=tables)

        await admin.run_sync(create)
        grantee = app
        if role is not None:
            grantee = f'"{role}"'
            exists = await admin.scalar(
                text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": role}
            )
            if not exists:
                await admin.execute(text(f"CREATE ROLE {grantee} NOLOGIN"))
            version = int(await admin.scalar(text("SHOW server_version_num")) or 0)
            # PostgreSQL 16+: membership without inheritance, so the app role alone (no SET
            # ROLE) cannot read tenant tables; before 16 make the app role NOINHERIT instead.
            suffix = " WITH INHERIT FALSE" if version >= 160000 else ""
            await admin.execute(text(f"GRANT {grantee} TO {app}{suffix}"))
            if self.shared_schema is not None:
                for statement in _grants(f'"{self.shared_schema}"', grantee):
                    await admin.execute(text(statement))
        for statement in _grants(quoted, grantee):
            await admin.execute(text(statement))

    def _require_metadata(self) -> MetaData:
        if self.metadata is None:
            raise IsolationConfigError(
                "SchemaPerTenant needs metadata to create tables", hint="pass metadata=..."
            )
        return self.metadata

    # -- start-up validation ---------------------------------------------------------------

    async def validate(self, database: TenantDatabase) -> None:
        async with database.engine.connect() as conn:
            findings = await self.check(conn)
        if findings:
            raise IsolationConfigError(
                "schema isolation would not hold: " + "; ".join(str(f) for f in findings),
                hint=findings[0].fix,
            )

    async def check(self, conn: AsyncConnection) -> list[Finding]:
        """Every finding on the live database, read as the application role (no binding)."""
        findings: list[Finding] = []
        role = (
            await conn.execute(
                text(
                    "SELECT rolname, rolsuper, current_database() AS db,"
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
                    f"ALTER ROLE {app} NOSUPERUSER",
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
        if self.per_tenant_roles:
            findings += await _check_inheritance(conn)
        names = sorted({t.name for t in self.tenant_tables()})
        if names:
            findings += await _check_shadowing(conn, names)
            findings += await _check_owned(conn, names, self.shared_schema)
        for table in self.shared_tables():
            qualified = f'"{table.schema}"."{table.name}"'
            if await conn.scalar(text("SELECT to_regclass(:n)"), {"n": qualified}) is None:
                findings.append(
                    Finding(
                        "S004",
                        qualified,
                        "shared table is missing or the role lacks USAGE on its schema",
                        "run create_shared_schema() as the table owner",
                    )
                )
        return findings


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
            {"n": f'"{name}"'},
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


def _grants(schema: str, grantee: str) -> list[str]:
    return [
        f"GRANT USAGE ON SCHEMA {schema} TO {grantee}",
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {grantee}",
        f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {schema} TO {grantee}",
    ]
