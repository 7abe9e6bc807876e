"""Where SchemaPerTenant keeps a tenant: its schema (and role), made, dropped, migrated and
audited as the owner.

Every schema and role made here carries the marker comment of its tenant; a drop removes only
what carries the marker of the tenant being dropped, so a tampered registry row can never point
a ``DROP`` elsewhere. The audit reads the whole registry at once, so it also sees what only
shows across tenants: two tenants on one schema, a schema missing tables its siblings have.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import MetaData, Table, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.schema import CreateIndex, CreateTable

from ...checks import Finding
from ...errors import IsolationConfigError, TenantExists, TenantPlacementError
from ...tenant import Tenant
from ..citus.schema_sharding import audit_distributed, move_schema
from ..grants import check_grants
from ..migrations import read_revision
from ..moves import Progress, TenantMove
from ..placement import AuditContext, Placement, PlacementContext, Target
from ..postgres import (
    MARKER,
    comment_sql,
    dml_grants,
    exists,
    marker,
    owned_by,
    qualified,
    quote_ident,
    quote_literal,
)
from . import hardened
from .checks import GRANTS

if TYPE_CHECKING:
    from .strategy import SchemaPerTenant

__all__ = ["SchemaPlacement"]


class SchemaPlacement(Placement):
    """A schema (and optionally a NOLOGIN role) per tenant, made in the registry row's
    transaction."""

    per_tenant = True

    def __init__(self, strategy: SchemaPerTenant) -> None:
        self.strategy = strategy

    def configure(self, context: PlacementContext) -> None:
        if context.metadata is not None and context.metadata is not self.strategy.metadata:
            raise IsolationConfigError(
                "SchemaPerTenant creates the tables of its own metadata",
                hint="pass metadata to SchemaPerTenant(metadata=...), not to the provisioner",
            )

    def attributes(self, tenant: Tenant, context: PlacementContext) -> dict[str, Any]:
        # Pin the names in the registry: a later change of naming never moves a tenant.
        attributes = dict(tenant.attributes)
        schema, role = self.strategy.schema_for(tenant), self.strategy.role_for(tenant)
        if self.strategy.schema_attribute is not None:
            attributes.setdefault(self.strategy.schema_attribute, schema)
        if self.strategy.role_attribute is not None:
            attributes.setdefault(self.strategy.role_attribute, role)
        return attributes

    async def create(
        self, context: PlacementContext, conn: AsyncConnection | None, tenant: Tenant
    ) -> None:
        assert conn is not None
        schema, role = self.strategy.schema_for(tenant), self.strategy.role_for(tenant)
        if await exists(conn, "schema", schema):
            raise TenantExists("the tenant's schema already exists")
        if role is not None and await exists(conn, "role", role):
            raise TenantExists("the tenant's role already exists")
        await self.strategy.create_tenant_schema(conn, tenant, context.app_role)
        if role is not None:
            await conn.execute(text(comment_sql("role", role, tenant.id)))

    async def drop(
        self, context: PlacementContext, conn: AsyncConnection | None, tenant: Tenant
    ) -> None:
        assert conn is not None
        schema, role = self.strategy.schema_for(tenant), self.strategy.role_for(tenant)
        if await owned_by(conn, "schema", schema, tenant.id):
            await conn.execute(text(f"DROP SCHEMA {quote_ident(schema)} CASCADE"))
        if role is not None and await owned_by(conn, "role", role, tenant.id):
            # Its grants on the shared schema go first; membership goes with the role.
            await conn.execute(text(f"DROP OWNED BY {quote_ident(role)}"))
            await conn.execute(text(f"DROP ROLE {quote_ident(role)}"))

    def target(self, tenant: Tenant, context: PlacementContext) -> Target:
        return Target(context.admin_engine.url, self.strategy.schema_for(tenant))

    def shared_target(self, context: PlacementContext) -> Target:
        return Target(context.admin_engine.url, self.strategy.shared_schema)

    def grants(self, tenant: Tenant | None, context: PlacementContext) -> list[str]:
        """DML on the target's tables for the role that serves it (the tenant role, if any)."""
        if tenant is None:
            shared = self.strategy.shared_schema
            return [] if shared is None else dml_grants(shared, context.app_role)
        grantee = self.strategy.role_for(tenant) or context.app_role
        grants = dml_grants(self.strategy.schema_for(tenant), grantee)
        return grants + self.strategy.tenant_policies(tenant)  # new tables get the policy too

    async def audit(self, audit: AuditContext) -> list[Finding]:
        audit.inspected.extend(t.name for t in self.strategy.tenant_tables())
        audit.revision_kind = "schema"
        findings = await _audit_schemas(self.strategy, audit)
        if self.strategy.citus:
            findings += await audit_distributed(audit.conn, _schemas(self.strategy, audit.tenants))
        return findings + await self._audit_hardened(audit)

    async def move(
        self,
        context: PlacementContext,
        tenant: Tenant,
        to: str,
        *,
        dry_run: bool = False,
        progress: Progress | None = None,
    ) -> TenantMove:
        """Move the tenant's distributed schema to Citus node ``to`` (``citus_schema_move``)."""
        if not self.strategy.citus:
            raise IsolationConfigError(
                "moving a tenant schema between nodes needs SchemaPerTenant(citus=True)",
                hint="docs/scale-out.md",
            )
        return await move_schema(
            context.admin_engine,
            tenant.id,
            self.strategy.name,
            self.strategy.schema_for(tenant),
            to,
            dry_run=dry_run,
            progress=progress,
        )

    async def _audit_hardened(self, audit: AuditContext) -> list[Finding]:
        """A013: in the hardened mode every table of a tenant schema has the signed policy."""
        if self.strategy.signer is None:
            return []
        findings = []
        for tenant in audit.tenants:
            try:
                schema = self.strategy.schema_for(tenant)
            except TenantPlacementError:
                continue  # A011 already
            names = (
                await audit.conn.execute(
                    text(hardened.unguarded_sql()),
                    {"schema": schema, "literal": quote_literal(tenant.id)},
                )
            ).scalars()
            missing = sorted(names)
            if missing:
                findings.append(
                    Finding(
                        "A013",
                        schema,
                        f"tables without the signed policy of tenant {tenant.id!r}: "
                        + ", ".join(missing),
                        ";\n".join(self.strategy.tenant_policies(tenant)),
                    )
                )
        return findings


async def _audit_schemas(strategy: SchemaPerTenant, audit: AuditContext) -> list[Finding]:
    """A006, A007, A009, A011, S008, S009 for schema-per-tenant, read as the owner (the grants
    of the role serving each schema: the tenant's role, or the app role); each schema's revision
    goes to ``audit.revisions`` (A008 compares them)."""
    conn, tenants, app_role, registry = audit.conn, audit.tenants, audit.app_role, audit.registry
    findings: list[Finding] = []
    placed: dict[str, list[Tenant]] = {}
    for tenant in tenants:
        try:
            placed.setdefault(strategy.schema_for(tenant), []).append(tenant)
        except TenantPlacementError:
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
                            comment_sql("schema", schema, first.id),
                            *_create_tables(strategy, schema, set(expected), app_role),
                        ]
                    ),
                )
            )
            continue
        note = notes[schema]
        if note.startswith(MARKER) and note != marker(first.id):
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
        try:
            grantee = strategy.role_for(first) or app_role
        except TenantPlacementError:
            grantee = app_role  # an unusable role name: the binding fails before any grant
        findings += await check_grants(
            conn,
            GRANTS,
            tenant_tables=[(schema, name) for name in expected if name in present[schema]],
            grantee=grantee,
        )
        audit.revisions[schema] = None
        if "alembic_version" in present[schema]:
            audit.revisions[schema] = await conn.run_sync(read_revision, schema)
    return findings


def _schemas(strategy: SchemaPerTenant, tenants: Sequence[Tenant]) -> list[str]:
    """The usable schema names of ``tenants`` (an unusable one is A011 already)."""
    names = []
    for tenant in tenants:
        try:
            names.append(strategy.schema_for(tenant))
        except TenantPlacementError:
            continue
    return sorted(set(names))


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
    return statements + dml_grants(schema, app_role)


def _move_tenant(registry: Table | None, strategy: SchemaPerTenant, tenant: Tenant) -> str:
    """The registry update giving ``tenant`` a schema of its own (then create it: A006)."""
    suggested = "tenant_" + re.sub(r"[^a-z0-9_]", "_", tenant.id.lower())[:56]
    if registry is None or strategy.schema_attribute is None:
        return f"place tenant {tenant.id!r} in a schema of its own, e.g. {suggested}"
    name = qualified(registry)
    path = quote_literal("{" + strategy.schema_attribute + "}")
    return (
        f"UPDATE {name} SET attributes = jsonb_set(attributes::jsonb, {path}, "
        f"to_jsonb({quote_literal(suggested)}::text)) WHERE id = {quote_literal(tenant.id)}"
    )
