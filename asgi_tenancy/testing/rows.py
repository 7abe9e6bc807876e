"""Rows for two tenants, generated from the tables: keys that collide, values that tell apart.

Where a table's key can collide (the tenant column is part of it, or each tenant has its own
schema) both tenants get the same key values; every other value carries the tenant, so a row
read back says whose it is. Foreign keys point at the first row of the same tenant, so the last
row of every table is referenced by nothing: the probes aim at it.
"""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import uuid
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Column, Enum, Table

from ..errors import IsolationConfigError

__all__ = ["ROWS_PER_TENANT", "Row", "RowFactory"]

ROWS_PER_TENANT = 3
_NAMESPACE = uuid.UUID("6f9c1b7e-4a51-4c1f-9d3e-2b8a0e5d7c11")
_EPOCH = dt.datetime(2000, 1, 1)  # naive: columns with a time zone get UTC

Row = dict[str, Any]


class RowFactory:
    """Deterministic rows per (table, tenant index, row number), computed on demand.

    ``tenant_column`` is the row strategies' column (``None`` for schema isolation, where every
    key collides); ``shared`` names tables that hold no tenant's rows.
    """

    def __init__(
        self, tenants: tuple[str, str], tenant_column: str | None, shared: frozenset[str]
    ) -> None:
        self.tenants = tenants
        self.tenant_column = tenant_column
        self.shared = shared

    def rows(self, table: Table, tenant: int | None) -> list[Row]:
        """The seeded rows of ``table`` for tenant ``tenant`` (``None``: a shared table)."""
        return [self.row(table, tenant, i) for i in range(1, ROWS_PER_TENANT + 1)]

    def row(self, table: Table, tenant: int | None, number: int) -> Row:
        """Row ``number`` (1-based); numbers past ``ROWS_PER_TENANT`` are fresh rows."""
        row: Row = {}
        fk_columns: dict[str, tuple[Table, str]] = {}
        for fk in table.foreign_keys:
            fk_columns[fk.parent.name] = (fk.column.table, fk.column.name)
        for column in table.columns:
            if column.computed is not None or _always_identity(column):
                continue
            if column.name == self.tenant_column and table.name not in self.shared:
                row[column.name] = self.tenants[tenant or 0]
            elif column.name in fk_columns:
                parent, name = fk_columns[column.name]
                owner = None if parent.name in self.shared else tenant
                if parent is table and number == 1:
                    row[column.name] = None  # filled below: the first row refers to itself
                else:
                    row[column.name] = self.row(parent, owner, 1)[name]
            else:
                row[column.name] = self._value(table, column, tenant, number)
        for name, (parent, target) in fk_columns.items():
            if parent is table and number == 1:
                row[name] = row[target]
        return row

    def collides(self, table: Table) -> bool:
        """Whether both tenants' keys are the same values in ``table``."""
        if table.name in self.shared or self.tenant_column is None:
            return True
        return self.tenant_column in table.primary_key.columns

    def _value(self, table: Table, column: Column[Any], tenant: int | None, number: int) -> Any:
        key = column.primary_key and self.collides(table)
        base = number if key else (1 + (tenant or 0)) * 1000 + number
        label = f"k{number}" if key else f"{self.tenants[tenant or 0][:8]}-{number}"
        return value_for(column, base, label)

    def update_column(self, table: Table) -> Column[Any] | None:
        """A plain column the probes may overwrite (no key, no foreign key, not the tenant's)."""
        for column in table.columns:
            if (
                column.primary_key
                or column.foreign_keys
                or column.computed is not None
                or column.name == self.tenant_column
            ):
                continue
            if _python_type(column) in (str, int):
                return column
        return None


def sentinel_for(column: Column[Any]) -> Any:
    """A value no seeded row holds in ``column``: what a forged update writes."""
    return value_for(column, 987_654, "kit-forged")


def value_for(column: Column[Any], base: int, label: str) -> Any:
    """A value of the column's type derived from ``base`` (numbers) or ``label`` (text)."""
    kind = _python_type(column)
    length = getattr(column.type, "length", None)
    if isinstance(column.type, Enum):
        choices = list(column.type.enums)
        if column.type.enum_class is not None:
            members = list(column.type.enum_class)
            return members[base % len(members)]
        return choices[base % len(choices)]
    makers: Mapping[type, Any] = {
        str: lambda: label[:length] if length else label,
        int: lambda: base,
        bool: lambda: base % 2 == 0,
        float: lambda: float(base) + 0.5,
        decimal.Decimal: lambda: decimal.Decimal(base),
        dt.datetime: lambda: _datetime(column, base),
        dt.date: lambda: (_EPOCH + dt.timedelta(days=base)).date(),
        dt.time: lambda: dt.time(base % 24, base % 60),
        dt.timedelta: lambda: dt.timedelta(seconds=base),
        uuid.UUID: lambda: uuid.uuid5(_NAMESPACE, f"{column.table.name}:{label}:{base}"),
        bytes: lambda: label.encode(),
        dict: lambda: {"kit": label, "n": base},
        list: lambda: [label, base],
    }
    maker = makers.get(kind) if isinstance(kind, type) else None
    if maker is not None:
        return maker()
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        members = list(kind)
        return members[base % len(members)]
    if column.nullable:
        return None
    raise IsolationConfigError(
        f"the test kit cannot make a value for {column.table.name}.{column.name}",
        hint="it fills text, numbers, booleans, dates, UUIDs, bytes, JSON and enums; make the "
        "column nullable or give it a server default",
    )


def _python_type(column: Column[Any]) -> object:
    try:
        return column.type.python_type
    except NotImplementedError:
        return None


def _datetime(column: Column[Any], base: int) -> dt.datetime:
    value = _EPOCH + dt.timedelta(minutes=base)
    return value.replace(tzinfo=dt.UTC) if getattr(column.type, "timezone", False) else value


def _always_identity(column: Column[Any]) -> bool:
    identity = column.identity
    return identity is not None and bool(identity.always)
