"""Grant checks every strategy shares: the serving role can use the tables it is meant to.

A policy that holds is no use if the first ``INSERT`` fails for want of a sequence grant, or
every request answers 503 because the tenant registry is unreadable. Read from the catalog for
the serving role (``current_user``, or a named grantee such as a per-tenant role): tenant
tables need ``SELECT, INSERT, UPDATE, DELETE`` and ``USAGE`` on the sequences their defaults
draw from (serial, or a ``nextval`` default; an identity column needs no grant); shared tables
need ``SELECT``; the schemas of both ``USAGE``. Each finding's fix is the ``GRANT`` naming the
role.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import Table, text
from sqlalchemy.ext.asyncio import AsyncConnection

from ..checks import Finding
from .postgres import qualified, quote_ident

__all__ = [
    "DML",
    "READ",
    "GrantCodes",
    "Name",
    "check_grants",
    "check_registry",
    "in_database",
    "names_of",
    "unusable_schemas",
]

DML: tuple[str, ...] = ("SELECT", "INSERT", "UPDATE", "DELETE")
READ: tuple[str, ...] = ("SELECT",)


@dataclass(frozen=True, slots=True)
class GrantCodes:
    """The codes a strategy reports missing grants under: tables (and schemas), sequences."""

    table: str
    sequence: str


# A table by (schema, name), found without to_regclass: that raises on a schema the role may
# not use, and this check is the one that should say so. No schema: the search_path's.
_FOUND = (
    " FROM unnest(CAST(:schemas AS text[]), CAST(:names AS text[])) AS t(schema, name)"
    " JOIN pg_class c ON c.oid = CASE WHEN t.schema IS NULL"
    "  THEN to_regclass(quote_ident(t.name))"
    "  ELSE (SELECT k.oid FROM pg_class k JOIN pg_namespace kn ON kn.oid = k.relnamespace"
    "   WHERE kn.nspname = t.schema AND k.relname = t.name) END"
)

# One row per table that exists: its schema's usage and each privilege, for the role.
_TABLES_SQL = (
    "SELECT t.schema AS given, t.name,"
    " format('%I.%I', n.nspname, c.relname) AS qualified, n.nspname AS schema,"
    " has_schema_privilege(CAST(:role AS name), n.oid, 'USAGE') AS usage,"
    " has_table_privilege(CAST(:role AS name), c.oid, 'SELECT') AS select,"
    " has_table_privilege(CAST(:role AS name), c.oid, 'INSERT') AS insert,"
    " has_table_privilege(CAST(:role AS name), c.oid, 'UPDATE') AS update,"
    " has_table_privilege(CAST(:role AS name), c.oid, 'DELETE') AS delete"
    + _FOUND
    + " JOIN pg_namespace n ON n.oid = c.relnamespace"
)

# The sequences a table's inserts draw from: a default calling nextval (serial, or by hand)
# depends on its sequence. Identity columns are left out: PostgreSQL draws from their
# sequence without checking the inserting role's privileges on it.
_SEQUENCES_SQL = (
    "SELECT DISTINCT format('%I.%I', sn.nspname, s.relname) AS sequence,"
    " has_sequence_privilege(CAST(:role AS name), s.oid, 'USAGE') AS usable"
    + _FOUND
    + " JOIN pg_attrdef ad ON ad.adrelid = c.oid"
    " JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass AND d.objid = ad.oid"
    " AND d.refclassid = 'pg_class'::regclass"
    " JOIN pg_class s ON s.oid = d.refobjid AND s.relkind = 'S'"
    " JOIN pg_namespace sn ON sn.oid = s.relnamespace"
    " ORDER BY 1"
)

Name = tuple[str | None, str]  # (schema or None for the search_path's, table)


async def check_grants(
    conn: AsyncConnection,
    codes: GrantCodes,
    *,
    tenant_tables: Sequence[Name] = (),
    shared_tables: Sequence[Name] = (),
    grantee: str | None = None,
) -> list[Finding]:
    """Missing grants of ``grantee`` (default: ``current_user``) on the tables named; tables
    that do not exist are other checks' to report."""
    role = grantee or str(await conn.scalar(text("SELECT current_user")))
    to = quote_ident(role)
    needs: dict[Name, tuple[str, ...]] = {name: DML for name in tenant_tables}
    for name in shared_tables:
        needs.setdefault(name, READ)
    if not needs:
        return []
    rows = (await conn.execute(text(_TABLES_SQL), {"role": role, **_arrays(needs)})).all()
    findings: list[Finding] = []
    schemas: set[str] = set()
    for row in rows:
        if not row.usage and row.schema not in schemas:
            schemas.add(row.schema)
            findings.append(
                Finding(
                    codes.table,
                    row.schema,
                    f"the role {role} has no USAGE on the schema of {row.qualified}: "
                    "every statement on its tables fails",
                    f"GRANT USAGE ON SCHEMA {quote_ident(row.schema)} TO {to}",
                )
            )
        held = {"SELECT": row.select, "INSERT": row.insert, "UPDATE": row.update}
        held["DELETE"] = row.delete
        missing = [p for p in needs[row.given, row.name] if not held[p]]
        if missing:
            findings.append(
                Finding(
                    codes.table,
                    row.qualified,
                    f"the role {role} lacks {', '.join(missing)} on the table: "
                    "those statements fail with permission denied",
                    f"GRANT {', '.join(missing)} ON {row.qualified} TO {to}",
                )
            )
    if tenant_tables:
        for seq in await conn.execute(
            text(_SEQUENCES_SQL), {"role": role, **_arrays(tenant_tables)}
        ):
            if not seq.usable:
                findings.append(
                    Finding(
                        codes.sequence,
                        seq.sequence,
                        f"the role {role} cannot use the sequence a tenant table's inserts "
                        "draw from: the first INSERT fails",
                        f"GRANT USAGE, SELECT ON SEQUENCE {seq.sequence} TO {to}",
                    )
                )
    return findings


def _arrays(names: Iterable[Name]) -> dict[str, list[str | None] | list[str]]:
    pairs = list(names)
    return {"schemas": [schema for schema, _ in pairs], "names": [name for _, name in pairs]}


async def unusable_schemas(conn: AsyncConnection, schemas: Iterable[str]) -> set[str]:
    """The schemas of ``schemas`` that exist and ``current_user`` may not use."""
    names = sorted(schemas)
    if not names:
        return set()
    rows = await conn.scalars(
        text(
            "SELECT nspname FROM pg_namespace WHERE nspname = ANY(CAST(:names AS text[]))"
            " AND NOT has_schema_privilege(oid, 'USAGE')"
        ),
        {"names": names},
    )
    return set(rows)


def in_database(database: str, findings: Iterable[Finding]) -> list[Finding]:
    """Findings of another database than the audit's, named as ``database.schema.table``;
    the fix is run there."""
    return [
        Finding(f.code, f"{database}.{f.subject}", f"in database {database}: {f.message}", f.fix)
        for f in findings
    ]


def names_of(tables: Iterable[Table]) -> list[Name]:
    """``(schema, name)`` of SQLAlchemy tables, for ``check_grants``."""
    return [(table.schema, table.name) for table in tables]


async def check_registry(conn: AsyncConnection, table: Table) -> list[Finding]:
    """T001: the role the tenant store connects as can read its registry table."""
    row = (
        await conn.execute(
            text(
                "SELECT current_user AS role, c.oid IS NOT NULL AS found,"
                " has_schema_privilege(c.relnamespace, 'USAGE') AS usage,"
                " has_table_privilege(c.oid, 'SELECT') AS select"
                " FROM (SELECT 1) AS one LEFT JOIN (SELECT c.oid, c.relnamespace"
                + _FOUND
                + ") AS c ON true"
            ),
            _arrays([(table.schema, table.name)]),
        )
    ).one()
    if row.found and row.usage and row.select:
        return []
    name, to = qualified(table), quote_ident(row.role)
    grants = [f"GRANT SELECT ON {name} TO {to}"]
    if table.schema is not None and not row.usage:
        grants.insert(0, f"GRANT USAGE ON SCHEMA {quote_ident(table.schema)} TO {to}")
    if not row.found:
        message = "the tenant registry table does not exist"
        grants.insert(0, "create it as the owner (create_tenants_table(), or a migration)")
    else:
        message = "the store's role cannot read the tenant registry: every request answers 503"
    return [Finding("T001", name, message, ";\n".join(grants))]
