"""The suite's leak check: rows that name another tenant than the one asked for."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine


def foreign_rows(rows: Iterable[object], tenant_id: str) -> list[object]:
    """Rows whose owner (a ``tenant_id`` field, or a name prefixed by it) is another tenant."""
    found = []
    for row in rows:
        if isinstance(row, str):
            owner = row.split("-", 1)[0]
        elif (owner := getattr(row, "tenant_id", None)) is None:
            label = getattr(row, "name", None) or getattr(row, "title", None)
            owner = str(label).split("-", 1)[0]
        if owner != tenant_id:
            found.append(row)
    return found


def assert_no_foreign_rows(rows: Iterable[object], tenant_id: str) -> None:
    leaked = foreign_rows(rows, tenant_id)
    assert not leaked, f"{len(leaked)} rows of another tenant reached {tenant_id}"


async def foreign_writes(
    admin: AsyncEngine, table: str, tenant_id: str, marker: str, *, column: str = "tenant_id"
) -> int:
    """Rows of other tenants that carry ``marker``, read back as the admin: writes that leaked."""
    statement = text(f"SELECT count(*) FROM {table} WHERE {column} <> :t AND name = :m")
    async with admin.connect() as conn:
        return int(await conn.scalar(statement, {"t": tenant_id, "m": marker}) or 0)


async def assert_no_foreign_writes(
    admin: AsyncEngine, table: str, tenant_id: str, marker: str, *, column: str = "tenant_id"
) -> None:
    leaked = await foreign_writes(admin, table, tenant_id, marker, column=column)
    assert not leaked, f"{tenant_id} wrote {leaked} rows of another tenant in {table}"
