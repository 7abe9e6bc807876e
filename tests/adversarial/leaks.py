"""The suite's leak check: rows that name another tenant than the one asked for."""

from __future__ import annotations

from collections.abc import Iterable


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
