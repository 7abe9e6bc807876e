"""The QueryScoping strategy: shared tables on any SQLAlchemy dialect, confined by the ORM alone.

No database feature backs it, so it holds against mistakes in ORM code, not against SQL the
application writes by hand (or that an attacker injects into it). One rule for every statement
a tenant's session or connection sends, whatever API built it: every reference to a tenant
table is scoped, or the statement is refused (``UnsafeQuery`` with a stable reason, or
``TenantContextError``) before any SQL is sent.

- ORM statements (``do_orm_execute``): every tenant entity they can reach, in subqueries, CTEs,
  set operations, ``values()`` and ``RETURNING`` included, gets the tenant predicate
  (``with_loader_criteria``, the tenant a bound parameter), ANDed around the whole WHERE; the
  other entities of an UPDATE ... FROM or DELETE ... USING get it explicitly; new rows are
  stamped and a forged or changed tenant refused; what cannot be confined is refused: SQL
  fragments, raw tables, tables neither tenant nor shared, DML nested in a CTE.
- Everything else (``gate.py``, on the engine, in the one hook no API skips): the unit of work,
  the legacy bulk methods and Core writes are scoped by what the statement is, or refused.

A statement that confines itself (the SQL guard's output, or one you checked) can be run with
``allow_unscoped(statement)``: the decision is visible in the code, never a default.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from sqlalchemy import MetaData, Table
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.orm import Mapper, ORMExecuteState
from sqlalchemy.sql.base import Executable

from ..._options import ALLOW_UNSCOPED
from ...checks import Finding
from ...errors import IsolationConfigError, UnsafeQuery
from ..criteria import TenantCriteria
from ..grants import GrantCodes, check_grants, names_of
from ..strategy import IsolationStrategy, raise_findings
from .gate import APPROVED, TOKEN, ScopingGate
from .shape import Shape, cached_shape

__all__ = ["ALLOW_UNSCOPED", "QueryScoping", "allow_unscoped"]

_E = TypeVar("_E", bound=Executable)


def allow_unscoped(statement: _E) -> _E:
    """Mark ``statement`` as confined by its author; QueryScoping then lets it run in a scope."""
    return statement.execution_options(**{ALLOW_UNSCOPED: True})


class _ScopedCriteria(TenantCriteria):
    """TenantCriteria that also refuses what it cannot confine, then approves the statement."""

    refuse_unchecked = True

    def __init__(self, strategy: QueryScoping) -> None:
        super().__init__(strategy.tenant_column)
        self._strategy = strategy

    def apply(
        self,
        state: ORMExecuteState,
        tenant_id: str,
        extra: Iterable[Mapper[Any]] = (),
        *,
        beside: bool = False,
        entities: Iterable[Mapper[Any]] | None = None,
    ) -> None:
        if not state.is_orm_statement:
            return  # Core statements: the engine decides by what they are (gate.py)
        shape = cached_shape(state.statement)
        if not state.execution_options.get(ALLOW_UNSCOPED):
            self._strategy._refuse_unconfined(shape)
        if state.is_update and state.is_executemany:
            # By primary key: loader criteria do not reach it; its per-row UPDATEs are scoped
            # on the engine (gate.py) like those of the unit of work.
            self._check_update(state, tenant_id)
            return
        # An INSERT gets criteria only for what it reads (subqueries in values(), RETURNING).
        found = shape.mappers if shape.beside or not state.is_insert else ()
        if shape.entities is None:  # the statement's own entities, once per shape
            shape.entities = tuple(state.all_mappers)
        super().apply(
            state,
            tenant_id,
            extra=(*extra, *found),
            beside=bool(shape.beside),
            entities=shape.entities if entities is None else entities,
        )
        state.update_execution_options(**{APPROVED: TOKEN})


class QueryScoping(IsolationStrategy):
    """Isolation by the ORM on tables shared by all tenants; any SQLAlchemy dialect.

    ``metadata`` lists the application's tables: those with ``tenant_column`` are tenant
    tables; every other one must be named in ``shared_tables`` (``validate()`` refuses an
    unclassified table, and a statement on one is refused inside a tenant scope).
    """

    name = "query"
    title = "query scoping"

    def __init__(
        self,
        *,
        metadata: MetaData,
        tenant_column: str = "tenant_id",
        shared_tables: Iterable[str] = (),
    ) -> None:
        if not isinstance(metadata, MetaData):
            raise IsolationConfigError(
                "QueryScoping needs the application's MetaData",
                hint="QueryScoping(metadata=Base.metadata, shared_tables={...})",
            )
        if not tenant_column:
            raise IsolationConfigError("the tenant column name cannot be empty")
        self.metadata = metadata
        self.tenant_column = tenant_column
        self.shared_tables = frozenset(shared_tables)
        self.criteria = _ScopedCriteria(self)
        self.statement_guard = ScopingGate(self)

    # -- classification --------------------------------------------------------------------

    def _tables(self) -> Mapping[str, Table]:
        return {t.fullname: t for t in self.metadata.sorted_tables}

    def _is_shared(self, name: str) -> bool:
        table = self.metadata.tables.get(name)
        return (
            table is not None
            and self.tenant_column not in table.c
            and (name in self.shared_tables or table.name in self.shared_tables)
        )

    def is_tenant_table(self, name: str) -> bool:
        table = self.metadata.tables.get(name)
        return table is not None and self.tenant_column in table.c

    @staticmethod
    def raw_sql() -> UnsafeQuery:
        return UnsafeQuery(
            "raw_sql",
            "raw SQL (text(), literal_column(), a SQL string) is refused in a tenant scope",
            hint="write it with the ORM, or run a statement you confined yourself through "
            "allow_unscoped()",
        )

    def refuse_unreadable(self, shape: Shape) -> None:
        """Raise ``UnsafeQuery`` for SQL the library cannot read, or a table it cannot place."""
        if shape.fragment:
            raise self.raw_sql()
        for name in sorted(shape.tables):
            if not self.is_tenant_table(name) and not self._is_shared(name):
                raise UnsafeQuery(
                    "unregistered_table",
                    "a table that is neither a tenant table nor declared shared was refused",
                    hint="add the tenant column to it, or list it in shared_tables",
                )

    def _refuse_unconfined(self, shape: Shape) -> None:
        """Raise ``UnsafeQuery`` unless the ORM criteria can confine every part of a statement."""
        self.refuse_unreadable(shape)
        if shape.nested_dml and any(self.is_tenant_table(name) for name in shape.nested_dml):
            raise UnsafeQuery(
                "nested_dml",
                "an INSERT, UPDATE or DELETE of a tenant table inside a CTE is refused",
                hint="run it as a statement of its own",
            )
        for name in sorted(shape.raw_tables):
            if self.is_tenant_table(name):
                raise UnsafeQuery(
                    "core_statement",
                    "a Core statement or raw table on a tenant table is refused in a tenant scope",
                    hint="query the mapped class instead of its Table",
                )

    # -- checks ----------------------------------------------------------------------------

    async def validate(self, engine: AsyncEngine) -> None:
        """The metadata decides; on PostgreSQL the role's grants are read too (Q005, Q006)."""
        findings = self.check_metadata()
        if engine.dialect.name == "postgresql":
            async with engine.connect() as conn:
                findings += await self._check_grants(conn)
        raise_findings(self.title, findings)

    async def check(self, conn: AsyncConnection) -> list[Finding]:
        findings = self.check_metadata()
        if conn.dialect.name == "postgresql":
            findings += await self._check_grants(conn)
        return findings

    async def _check_grants(self, conn: AsyncConnection) -> list[Finding]:
        tables = self._tables().values()
        return await check_grants(
            conn,
            GrantCodes(table="Q005", sequence="Q006"),
            tenant_tables=names_of(t for t in tables if self.tenant_column in t.c),
            shared_tables=names_of(t for t in tables if self.tenant_column not in t.c),
        )

    def check_metadata(self) -> list[Finding]:
        """Every configuration finding; reads no database."""
        findings: list[Finding] = []
        tables = self._tables()
        for name, table in tables.items():
            tenant = self.tenant_column in table.c
            declared = name in self.shared_tables or table.name in self.shared_tables
            if tenant and declared:
                findings.append(
                    Finding(
                        "Q002",
                        name,
                        "declared shared but has the tenant column",
                        "remove it from shared_tables (or drop the column)",
                    )
                )
            elif not tenant and not declared:
                findings.append(
                    Finding(
                        "Q001",
                        name,
                        "table has no tenant column and is not declared shared",
                        f"add a {self.tenant_column} column, or list it in shared_tables",
                    )
                )
            elif tenant and table.c[self.tenant_column].nullable:
                findings.append(
                    Finding(
                        "Q004",
                        name,
                        "the tenant column is nullable",
                        f"declare {self.tenant_column} NOT NULL",
                    )
                )
        names = set(tables) | {t.name for t in tables.values()}
        for name in sorted(self.shared_tables - names):
            findings.append(
                Finding(
                    "Q003",
                    name,
                    "listed in shared_tables but not in the metadata",
                    "fix the name, or add the table to the metadata",
                )
            )
        return findings
