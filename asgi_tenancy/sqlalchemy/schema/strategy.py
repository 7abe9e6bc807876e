"""SchemaPerTenant: one PostgreSQL schema per tenant, chosen by a transaction-local search_path.

Every transaction of a tenant's session starts with
``SET LOCAL search_path = "tenant_x", pg_temp`` (plus ``SET LOCAL ROLE ...`` when per-tenant
roles are on; the hardened mode selects the same settings through its signed binding), sent
inside the BEGIN message. The tenant schema is the only
schema searched for tables: no ``public`` fallback, so a table missing from the tenant schema is
an error, never another schema's rows. ``pg_catalog`` is searched implicitly; ``pg_temp`` is
listed last so a temporary table can never shadow a tenant table (``validate()`` also refuses a
role that may create temporary tables). Shared tables live in one schema and are always
qualified by it (``__table_args__ = {"schema": "shared"}``).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext

from sqlalchemy import MetaData, Table, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ...checks import Finding
from ...errors import IsolationConfigError, TenantPlacementError, TenantSchemaMissing
from ...tenant import Tenant
from ..citus.schema_sharding import distribute_sql as citus_distribute_sql
from ..placement import Placement
from ..postgres import (
    MARKER,
    check_name,
    comment_sql,
    dml_grants,
    exists,
    marker,
    quote_ident,
    quote_literal,
)
from ..rls.signing import Pooling, Signer
from ..strategy import Binding, IsolationStrategy
from . import checks, hardened
from .placement import SchemaPlacement

__all__ = ["SchemaPerTenant"]

Naming = str | Callable[[Tenant], str]


class _BoundedMap:
    """Name -> tenant id claims, oldest forgotten first once ``limit`` entries are held."""

    def __init__(self, limit: int) -> None:
        self._items: OrderedDict[str, str] = OrderedDict()
        self._limit = limit

    def claim(self, name: str, tenant_id: str, what: str) -> None:
        owner = self._items.get(name)
        if owner is not None and owner != tenant_id:
            raise TenantPlacementError(
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

    ``hardened=True`` holds against injected SQL too (``hardened.py``): every tenant table's
    policy admits only the schema's own tenant, named by a signed binding (``signing_keys``,
    ``pooling`` and ``token_window`` as for ``RowLevelSecurity(signed=True)``); its functions
    live in ``function_schema`` (default: the shared schema).

    ``citus=True`` serves tenant schemas on Citus schema-based sharding: each is created as a
    distributed schema (its own shard group, on one worker) and can be moved to another node
    (``docs/scale-out.md``); not with per-tenant roles or ``hardened``.
    """

    name = "schema"
    title = "schema isolation"

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
        hardened: bool = False,
        signing_keys: Sequence[str | bytes] = (),
        pooling: Pooling = "none",
        token_window: float = 10.0,
        function_schema: str | None = None,
        setting: str = "app.tenant_id",
        citus: bool = False,
    ) -> None:
        if shared_schema is not None:
            check_name(shared_schema, "shared schema")
        if isinstance(naming, str) and "{id}" not in naming:
            raise IsolationConfigError(
                "a naming format must contain {id}", hint="for example 'tenant_{id}'"
            )
        if role_attribute is not None and not per_tenant_roles:
            raise IsolationConfigError(
                "role_attribute needs per_tenant_roles=True", hint="set per_tenant_roles=True"
            )
        if citus and per_tenant_roles:
            raise IsolationConfigError(
                "per-tenant roles cannot serve a Citus cluster: the coordinator reaches the"
                " workers as the tenant role, which cannot log in (C007)",
                hint="SchemaPerTenant(citus=True) without per_tenant_roles",
            )
        if citus and hardened:
            raise IsolationConfigError(
                "the hardened mode cannot serve a Citus cluster: Citus refuses its policy (a"
                " sub-SELECT) on distributed tables, and its signed binding is keyed on the"
                " coordinator's backend, so a worker could verify nothing",
                hint="SchemaPerTenant(citus=True) without hardened (docs/scale-out.md)",
            )
        if existence_ttl < 0 or max_cached_tenants < 1 or max_claims < 1:
            raise IsolationConfigError("cache sizes must be positive and the TTL not negative")
        self.metadata = metadata
        self.schema_attribute = schema_attribute
        self.naming = naming
        self.shared_schema = shared_schema
        self.per_tenant_roles = per_tenant_roles
        self.role_attribute = role_attribute
        self.citus = citus
        self.existence_ttl = existence_ttl
        self._max_cached = max_cached_tenants
        self._schemas = _BoundedMap(max_claims)
        self._roles = _BoundedMap(max_claims)
        # tenant id -> (binding SQL, expiry on the monotonic clock) for tenants whose schema
        # was seen in the catalogue; LRU, at most ``max_cached_tenants`` entries.
        self._known: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._placed: dict[
            tuple[str, object, object], tuple[str, Binding]
        ] = {}  # FIFO, max_cached_tenants
        self._checking: dict[str, asyncio.Future[None]] = {}
        if metadata is not None:
            self.tenant_tables()  # refuses fixed-schema tenant tables at construction
        self.hardened = hardened
        self.signer: Signer | None = None
        if hardened:
            functions = function_schema or shared_schema
            if functions is None:
                raise IsolationConfigError(
                    "the hardened mode needs a schema for its functions",
                    hint="pass function_schema= (or keep a shared schema)",
                )
            self.signer = Signer(
                setting,
                signing_keys,
                function_schema=check_name(functions, "function schema"),
                pooling=pooling,
                window=token_window,
            )
            self.connect_sql = self.signer.connect_sql
        elif signing_keys:
            raise IsolationConfigError("signing_keys need hardened=True")

    # -- names -----------------------------------------------------------------------------

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
        schema = check_name(name, "tenant's schema", error=TenantPlacementError)
        if schema == self.shared_schema:
            raise TenantPlacementError(
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
        if name is None:
            name = self.schema_for(tenant)
        return check_name(name, "tenant's role", error=TenantPlacementError)

    def _place(self, tenant: Tenant) -> tuple[str, Binding]:
        """What the tenant's signed binding selects, and its unsigned binding: cached per
        tenant and naming attributes (LRU, ``max_cached_tenants``), one dict lookup a request."""
        attributes = tenant.attributes
        key = (
            tenant.id,
            attributes.get(self.schema_attribute) if self.schema_attribute else None,
            attributes.get(self.role_attribute) if self.role_attribute else None,
        )
        placed = self._placed.get(key)
        if placed is None:
            placed = self._placed[key] = self._claim(tenant)
            if len(self._placed) > self._max_cached:
                del self._placed[next(iter(self._placed))]
        return placed

    def _claim(self, tenant: Tenant) -> tuple[str, Binding]:
        """Claim the tenant's schema (and role); build what its bindings run. Unsigned, plain
        ``SET LOCAL`` statements: a utility statement costs the server about 12 µs less than a
        ``SELECT set_config(...)`` (no plan, no row to send), and means the same."""
        schema = self.schema_for(tenant)
        role = self.role_for(tenant)
        self._schemas.claim(schema, tenant.id, "schema")
        path = quote_literal(f"{quote_ident(schema)}, pg_temp")
        targets = f"set_config('search_path', {path}, true)"
        local = f"SET LOCAL search_path = {quote_ident(schema)}, pg_temp"
        if role is not None:
            self._roles.claim(role, tenant.id, "role")
            targets += f", set_config('role', {quote_literal(role)}, true)"
            local += f";SET LOCAL ROLE {quote_ident(role)}"
        return targets, Binding(local)

    # -- binding ---------------------------------------------------------------------------

    def binding(self, tenant: Tenant) -> Binding:
        targets, unsigned = self._place(tenant)
        if self.signer is not None:
            return self.signer.binding(tenant.id, extra=f", {targets}")
        return unsigned

    def engine_for(
        self, engine: AsyncEngine, tenant: Tenant
    ) -> AbstractAsyncContextManager[AsyncEngine]:
        sql = self._place(tenant)[0]
        known = self._known.get(tenant.id)
        if known is None or known[0] != sql or known[1] < time.monotonic():
            return self._checked(engine, tenant, sql)
        return nullcontext(engine)

    @asynccontextmanager
    async def _checked(
        self, engine: AsyncEngine, tenant: Tenant, sql: str
    ) -> AsyncIterator[AsyncEngine]:
        await asyncio.shield(self._check_once(engine, tenant, sql))
        yield engine

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
            raise TenantSchemaMissing("the tenant's schema does not exist")
        note = row.note or ""
        if note.startswith(MARKER) and note != marker(tenant.id):
            raise TenantPlacementError(
                "two tenants map to one schema",
                hint="the schema was created for another tenant; check the tenant store",
            )
        if self.signer is not None:
            async with engine.connect() as conn:
                unguarded = (
                    await conn.execute(
                        text(hardened.unguarded_sql()),
                        {"schema": schema, "literal": quote_literal(tenant.id)},
                    )
                ).first()
            if unguarded is not None:
                raise TenantPlacementError(
                    "a table of the tenant's schema lacks the hardened policy",
                    hint="re-run the migrations (asgi-tenancy migrate) or the audit's fix",
                    check="A013",
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
        if self.metadata is None or self.shared_schema is None:
            return []
        return [t for t in self.metadata.sorted_tables if t.schema == self.shared_schema]

    # -- DDL -------------------------------------------------------------------------------

    async def create_shared_schema(self, admin: AsyncConnection, app_role: str) -> None:
        """Create the shared schema and its tables, readable by ``app_role`` (run as owner)."""
        if self.shared_schema is None:
            raise IsolationConfigError("no shared schema configured")
        role = check_name(app_role, "application role")
        await admin.execute(text(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(self.shared_schema)}"))
        tables = self.shared_tables()
        await admin.run_sync(lambda c: self._require_metadata().create_all(c, tables=tables))
        for statement in dml_grants(self.shared_schema, role):
            await admin.execute(text(statement))

    async def create_tenant_schema(
        self, admin: AsyncConnection, tenant: Tenant, app_role: str
    ) -> None:
        """Create the tenant's schema, its tables from ``metadata`` and the grants.

        Run as the owner of the tables (never the application role). With per-tenant roles the
        tenant role is created (NOLOGIN) and granted to ``app_role``; only it gets privileges.
        With ``citus=True`` the schema is made a distributed schema once its tables exist.
        """
        schema = self.schema_for(tenant)
        app = check_name(app_role, "application role")
        role = self.role_for(tenant)
        await admin.execute(text(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema)}"))
        await admin.execute(text(comment_sql("schema", schema, tenant.id)))
        tables = self.tenant_tables()
        translate = {None: schema}

        def create(sync: Connection) -> None:
            branch = sync.execution_options(schema_translate_map=translate)
            self._require_metadata().create_all(branch, tables=tables)

        await admin.run_sync(create)
        if self.citus:
            # Before the grants: Citus gives a shard the grants its table has from then on.
            await admin.execute(text(citus_distribute_sql(schema)))
        grantee = app
        if role is not None:
            grantee = role
            if not await exists(admin, "role", role):
                await admin.execute(text(f"CREATE ROLE {quote_ident(role)} NOLOGIN"))
            version = int(await admin.scalar(text("SHOW server_version_num")) or 0)
            # PostgreSQL 16+: membership without inheritance, so the app role alone (no SET
            # ROLE) cannot read tenant tables; before 16 make the app role NOINHERIT instead.
            suffix = " WITH INHERIT FALSE" if version >= 160000 else ""
            await admin.execute(text(f"GRANT {quote_ident(role)} TO {quote_ident(app)}{suffix}"))
            if self.shared_schema is not None:
                for statement in dml_grants(self.shared_schema, grantee):
                    await admin.execute(text(statement))
        for statement in dml_grants(schema, grantee):
            await admin.execute(text(statement))
        for statement in self.tenant_policies(tenant):
            await admin.execute(text(statement))

    def tenant_policies(self, tenant: Tenant) -> list[str]:
        """The hardened policy on every table of the tenant's schema (none unless hardened)."""
        if self.signer is None:
            return []
        return [hardened.policies_sql(self.schema_for(tenant), tenant.id, self.signer.function)]

    def ddl(self) -> list[str]:
        """Hardened: the signed binding's schema, key table and functions (as the owner)."""
        return [] if self.signer is None else self.signer.ddl()

    async def install(self, admin: AsyncConnection) -> None:
        """Run ``ddl()`` and install the signing keys (after ``create_shared_schema``)."""
        await super().install(admin)
        if self.signer is not None:
            await self.signer.install_keys(admin)

    def _require_metadata(self) -> MetaData:
        if self.metadata is None:
            raise IsolationConfigError(
                "SchemaPerTenant needs metadata to create tables", hint="pass metadata=..."
            )
        return self.metadata

    # -- checks and placement --------------------------------------------------------------

    async def check(self, conn: AsyncConnection) -> list[Finding]:
        """Every finding on the live database, read as the application role (no binding)."""
        return await checks.check(self, conn)

    @property
    def placement(self) -> Placement:
        return SchemaPlacement(self)
