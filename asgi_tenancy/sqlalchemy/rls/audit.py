"""What the isolation audit adds for row-level security, read from the catalog.

``RowLevelSecurity.check`` knows the tables of the application's metadata; here the catalog's
tables join them (every table with the tenant column the role can reach), and what a start-up
check does not judge is judged: whether an index serves the tenant predicate (A005). Views
that read around the policies (A012) are judged by the strategy's own checks, as the app role.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from sqlalchemy import Column, MetaData, Table, text
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.types import NullType

from ...checks import Finding
from ..placement import AuditContext
from ..postgres import qualified
from .signing import KEY_SCHEMA

if TYPE_CHECKING:
    from .strategy import RowLevelSecurity

__all__ = ["audit_rls", "catalog_tables"]


async def audit_rls(rls: RowLevelSecurity, audit: AuditContext) -> list[Finding]:
    """A005 as the owner, then the strategy's checks (A012 among them) over its metadata and
    the catalog's tables, as the app role."""
    conn = audit.conn
    tables = await catalog_tables(conn, audit.app_role, audit.schemas, rls, audit.shared_tables)
    tenant_tables = [t for t in tables if rls.tenant_column in t.c]
    audit.inspected.extend(t.fullname for t in [*rls.tenant_tables(), *tenant_tables])
    findings = await _audit_indexes(conn, rls, tables)
    # One pass of the strategy's own checks over its metadata and what the catalog adds
    # (catalog_tables leaves out the tables the metadata already names).
    own = [] if rls.metadata is None else rls.metadata.sorted_tables
    async with audit.as_app_role():
        findings += await rls.check(conn, [*own, *tables])
    return findings


async def catalog_tables(
    conn: AsyncConnection,
    role: str,
    schemas: Sequence[str] | None,
    rls: RowLevelSecurity,
    shared: frozenset[str],
) -> list[Table]:
    """The tables the role can reach, as column-only ``Table`` stubs for ``rls.check``.

    Partitions are included: one queried directly is held to its own policies only. Tables
    the application's metadata already names are left to ``strategy.check``.
    """
    rows = (
        await conn.execute(
            text(
                "SELECT n.nspname AS schema, c.relname AS name,"
                " array_agg(a.attname::text ORDER BY a.attnum) AS columns"
                " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0"
                " AND NOT a.attisdropped"
                " WHERE c.relkind IN ('r', 'p') AND n.nspname NOT LIKE 'pg\\_%'"
                " AND n.nspname NOT IN ('information_schema', :private)"
                " AND has_schema_privilege(:role, n.oid, 'USAGE')"
                " GROUP BY n.nspname, c.relname ORDER BY n.nspname, c.relname"
            ),
            {"role": role, "private": KEY_SCHEMA},
        )
    ).all()
    known = set()
    if rls.metadata is not None:
        known = {(t.schema or "public", t.name) for t in rls.metadata.sorted_tables}
    metadata = MetaData()
    tables = []
    for row in rows:
        skip = (
            (schemas is not None and row.schema not in schemas)
            or (row.schema, row.name) in known
            or row.name in shared
            or f"{row.schema}.{row.name}" in shared
        )
        if not skip:
            columns = [Column(c, NullType()) for c in row.columns]
            tables.append(Table(row.name, metadata, *columns, schema=row.schema))
    return tables


async def _audit_indexes(
    conn: AsyncConnection, rls: RowLevelSecurity, tables: Sequence[Table]
) -> list[Finding]:
    """A005: without an index led by the tenant column every query scans the whole table."""
    findings = []
    for table in [*[t for t in tables if rls.tenant_column in t.c], *rls.tenant_tables()]:
        name = qualified(table)
        indexed = await conn.scalar(
            text(
                "SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a"
                " ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]"
                " WHERE i.indrelid = to_regclass(:name) AND a.attname = :column)"
                " OR to_regclass(:name) IS NULL"
            ),
            {"name": name, "column": rls.tenant_column},
        )
        if not indexed:
            create = [s for s in rls.table_ddl(table) if s.startswith("CREATE INDEX")]
            findings.append(
                Finding(
                    "A005",
                    name,
                    f"no index starts with {rls.tenant_column}: every tenant's query scans "
                    "every tenant's rows",
                    ";\n".join(create),
                )
            )
    return findings
