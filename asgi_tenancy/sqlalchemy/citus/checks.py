"""Start-up checks of row tenancy on Citus (C001-C006), read as the application's role.

C001-C003 refuse what would fail or not hold on a cluster: Citus mode without Citus, tenant
tables distributed while the binding stays on the coordinator, and the signed binding on a
cluster (its key is the coordinator's backend pid, which names no backend on a worker, and its
spent-token table lives on the coordinator only: workers could verify nothing).

C004-C006 judge the layout in Citus mode, each with the SQL that fixes it, in the order the
fixes apply: keys that lack the tenant column first (Citus cannot distribute a table whose
primary, unique or foreign key leaves it out), then shared tables made reference tables (a
tenant table's foreign key to a shared table needs it), then tenant tables left local or
distributed by another column (a local one is unsharded, and a query on it never routes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import Table, text
from sqlalchemy.ext.asyncio import AsyncConnection

from ...checks import Finding
from ..postgres import qualified, quote_ident, quote_literal

if TYPE_CHECKING:
    from ..rls.strategy import RowLevelSecurity

__all__ = ["check_citus", "citus_version", "distributed_tables"]

# Primary, unique and foreign keys of the given tables that leave the tenant column out;
# a foreign key to a table without the tenant column (a shared one) is fine as it is.
_KEYS = """
SELECT k AS name, c.conname, c.contype::text AS kind,
  ARRAY(SELECT a.attname::text FROM unnest(c.conkey) WITH ORDINALITY u(n, o)
        JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = u.n ORDER BY u.o) AS cols,
  c.confrelid::regclass::text AS target,
  ARRAY(SELECT a.attname::text FROM unnest(c.confkey) WITH ORDINALITY u(n, o)
        JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = u.n ORDER BY u.o)
    AS target_cols
FROM unnest(CAST(:names AS text[])) WITH ORDINALITY t(k, o)
JOIN pg_constraint c ON c.conrelid = to_regclass(t.k) AND c.contype IN ('p', 'u', 'f')
WHERE NOT EXISTS (SELECT 1 FROM unnest(c.conkey) n JOIN pg_attribute a
                  ON a.attrelid = c.conrelid AND a.attnum = n WHERE a.attname = :col)
  AND (c.contype <> 'f' OR EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.confrelid
                                   AND a.attname = :col AND NOT a.attisdropped))
ORDER BY c.contype = 'f', t.o, c.conname
"""

# How Citus holds each existing table: method (NULL: local) and the distribution column's
# name; ``n`` with replication model ``t`` is a reference table (``s``: a table on one node).
_LAYOUT = """
SELECT k AS name,
  CASE WHEN p.partmethod = 'n' AND p.repmodel = 't' THEN 'reference' ELSE p.partmethod::text END
    AS method,
  CASE WHEN p.partmethod = 'h' THEN column_to_column_name(p.logicalrelid, p.partkey) END
    AS column
FROM unnest(CAST(:names AS text[])) k
LEFT JOIN pg_dist_partition p ON p.logicalrelid = to_regclass(k)
WHERE to_regclass(k) IS NOT NULL
"""


async def citus_version(conn: AsyncConnection) -> str | None:
    """The installed Citus extension's version, or ``None`` on plain PostgreSQL."""
    version = await conn.scalar(text("SELECT extversion FROM pg_extension WHERE extname = 'citus'"))
    return None if version is None else str(version)


async def distributed_tables(conn: AsyncConnection, tables: Sequence[Table]) -> dict[str, str]:
    """``{qualified name: method}`` of the tables Citus knows (``h`` hash, ``reference``,
    ``n`` a table on one node); the others are local."""
    layout = await _layout(conn, tables)
    return {name: method for name, (method, _) in layout.items() if method is not None}


async def _layout(
    conn: AsyncConnection, tables: Sequence[Table]
) -> dict[str, tuple[str | None, Any]]:
    names = [qualified(t) for t in tables]
    if not names:
        return {}
    rows = await conn.execute(text(_LAYOUT), {"names": names})
    return {row.name: (row.method, row.column) for row in rows}


async def check_citus(
    rls: RowLevelSecurity, conn: AsyncConnection, tables: Sequence[Table]
) -> list[Finding]:
    """C001-C006 for the strategy's tenant tables ``tables``."""
    version = await citus_version(conn)
    if version is None:
        if rls.citus:
            return [
                Finding(
                    "C001",
                    "extension citus",
                    "RowLevelSecurity(citus=True) but this database has no Citus extension"
                    " (create it on the coordinator and every worker, or drop citus=True on"
                    " plain PostgreSQL)",
                    "CREATE EXTENSION citus",
                )
            ]
        return []
    distributed = sorted(await distributed_tables(conn, tables))
    if rls.signer is not None and distributed:
        return [
            Finding(
                "C003",
                ", ".join(distributed),
                "the signed binding cannot be verified on Citus workers: its key is the"
                " coordinator's backend pid and its spent tokens live on the coordinator",
                "use RowLevelSecurity(citus=True) without signed=True on a cluster (or keep"
                " these tables local)",
            )
        ]
    if not rls.citus:
        if not distributed:
            return []
        return [
            Finding(
                "C002",
                ", ".join(distributed),
                "tenant tables are distributed but the binding stays on the coordinator:"
                " every query on them fails on the workers",
                "RowLevelSecurity(..., citus=True), then install() again for the policies"
                " Citus accepts",
            )
        ]
    return await _check_layout(rls, conn, tables)


async def _check_layout(
    rls: RowLevelSecurity, conn: AsyncConnection, tables: Sequence[Table]
) -> list[Finding]:
    column = rls.tenant_column
    findings = await _check_keys(conn, tables, column)
    shared = rls.shared_metadata_tables()
    layout = await _layout(conn, [*shared, *tables])
    for table in shared:
        name = qualified(table)
        if name not in layout:
            continue  # missing: R008 and the audit say so
        method, _ = layout[name]
        if method != "reference":
            undo = "" if method is None else f"SELECT undistribute_table({quote_literal(name)}); "
            findings.append(
                Finding(
                    "C005",
                    name,
                    "a shared table that is not a reference table: a join of a tenant table"
                    " with it leaves the tenant's node, or fails",
                    f"{undo}SELECT create_reference_table({quote_literal(name)})",
                )
            )
    wrong = []
    for table in tables:
        name = qualified(table)
        if name in layout and layout[name] != ("h", column):
            wrong.append(name)
    if wrong:
        assert rls.distribution is not None
        first = qualified(tables[0])
        findings.append(
            Finding(
                "C006",
                ", ".join(wrong),
                "tenant tables not distributed by the tenant column: their queries are not"
                " routed to the tenant's shard, and the tenant cannot move with the others",
                rls.distribution.fix_distribute(wrong, None if first in wrong else first),
            )
        )
    return findings


async def _check_keys(conn: AsyncConnection, tables: Sequence[Table], column: str) -> list[Finding]:
    names = [qualified(t) for t in tables]
    if not names:
        return []
    rows = await conn.execute(text(_KEYS), {"names": names, "col": column})
    findings = []
    for row in rows:
        constraint = quote_ident(row.conname)
        cols = ", ".join(quote_ident(c) for c in (column, *row.cols))
        if row.kind == "f":
            targets = ", ".join(quote_ident(c) for c in (column, *row.target_cols))
            key = f"FOREIGN KEY ({cols}) REFERENCES {row.target} ({targets})"
            what = "a foreign key"
        else:
            key = f"{'PRIMARY KEY' if row.kind == 'p' else 'UNIQUE'} ({cols})"
            what = "a primary key" if row.kind == "p" else "a unique key"
        findings.append(
            Finding(
                "C004",
                f"{row.name}.{row.conname}",
                f"{what} without the tenant column: Citus cannot distribute the table by"
                " the tenant (and the key would span tenants)",
                # CASCADE: a foreign key leaning on the old key goes too; its own finding
                # (this tenant table's or another's) adds it back with the tenant column.
                f"ALTER TABLE {row.name} DROP CONSTRAINT IF EXISTS {constraint} CASCADE,"
                f" ADD CONSTRAINT {constraint} {key}",
            )
        )
    return findings
