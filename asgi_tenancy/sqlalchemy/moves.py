"""What moving a tenant did: one record for every strategy, and the fingerprint it is checked by.

A move copies a tenant's data somewhere else while it keeps serving reads. Whatever the
strategy (a shard group between Citus nodes, a distributed schema, a database between
servers), its rows are counted and checksummed per table before and after, as the owner, and the
move reports both: with writes held meanwhile they must match.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from .postgres import quote_ident

__all__ = ["Fingerprint", "Progress", "TenantMove", "fingerprint"]

#: Called with one line per step of a move ("copying 3 tables", ...).
Progress = Callable[[str], None]

#: Per table: the tenant's row count and an order-independent checksum of its rows.
Fingerprint = dict[str, tuple[int, str]]


@dataclass(frozen=True)
class TenantMove:
    """What a move did, or would do (``dry_run``).

    ``source`` and ``target`` name where the tenant was and is (``host:port`` of a Citus node,
    or a server's URL without its password); ``statements`` are what the move runs, in order;
    ``details`` holds what only one strategy has (a shard id, a schema name).
    """

    tenant_id: str
    strategy: str
    source: str
    target: str
    statements: tuple[str, ...]
    dry_run: bool
    rows_before: Mapping[str, int] = field(default_factory=dict)
    rows_after: Mapping[str, int] = field(default_factory=dict)
    checksums_match: bool | None = None
    seconds: float = 0.0
    details: Mapping[str, object] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        body = asdict(self)
        body["statements"] = list(self.statements)
        return body


async def fingerprint(
    conn: AsyncConnection, tables: Sequence[str], where: Mapping[str, str] | None = None
) -> Fingerprint:
    """Count and checksum each of ``tables`` (already quoted and qualified), restricted to
    ``where`` (column: value) when the tables are shared with other tenants."""
    condition = ""
    params: dict[str, str] = {}
    if where:
        terms = []
        for i, (column, value) in enumerate(where.items()):
            terms.append(f"t.{quote_ident(column)} = :v{i}")
            params[f"v{i}"] = value
        condition = " WHERE " + " AND ".join(terms)
    found: Fingerprint = {}
    for table in tables:
        row = (
            await conn.execute(
                text(
                    "SELECT count(*) AS n, coalesce(md5(string_agg(md5(t::text), ''"
                    f" ORDER BY md5(t::text))), '') AS sum FROM {table} t{condition}"
                ),
                params,
            )
        ).one()
        found[table] = (int(row.n), str(row.sum))
    return found


def rows(found: Fingerprint) -> dict[str, int]:
    """The row counts of a fingerprint, for ``TenantMove.rows_before``/``rows_after``."""
    return {table: n for table, (n, _) in found.items()}
