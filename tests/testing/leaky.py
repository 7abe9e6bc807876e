"""Set-ups for the test kit's self-test: one correct per strategy, and deliberately leaky ones.

Each ``Setup`` is a ``TenancyKit`` on a one-table schema (notes whose keys collide across the
two tenants) and what each probe must report on it: ``pass``, ``leak`` (``LeakFound``, "LEAK
<model>, <probe>") or ``control`` (``LeakFound``, "CONTROL ...": the attacker could not even
use its own rows). Where the library's start-up checks would refuse a set-up before any probe
runs, its strategy skips them (an application that never checks): the probes, not
``validate()``, are under test; ``Setup.strict`` is the same strategy with its checks, and
``tests/testing/test_leaks.py`` shows they refuse those set-ups too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import Integer, MetaData, String, Table, Text, insert, text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from asgi_tenancy import Tenant
from asgi_tenancy.checks import Finding
from asgi_tenancy.sqlalchemy import (
    DatabasePerTenant,
    IsolationStrategy,
    QueryScoping,
    RowLevelSecurity,
    SchemaPerTenant,
)
from asgi_tenancy.sqlalchemy.postgres import dml_grants, quote_ident, quote_literal
from asgi_tenancy.sqlalchemy.rls.policies import POLICY_NAME
from asgi_tenancy.sqlalchemy.strategy import Binding
from asgi_tenancy.testing import PROBES, TenancyKit

Outcome = Literal["pass", "leak", "control"]


def notes_base(*, tenant_column: bool = True, table: str = "notes") -> type[DeclarativeBase]:
    """A fresh declarative base with one ``Note`` model (a fresh class per set-up)."""

    class Base(DeclarativeBase):
        metadata = MetaData()

    if tenant_column:

        class Note(Base):
            __tablename__ = table
            tenant_id: Mapped[str] = mapped_column(String(63), primary_key=True)
            id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
            body: Mapped[str] = mapped_column(Text)

    else:

        class Note(Base):  # type: ignore[no-redef]
            __tablename__ = table
            id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
            body: Mapped[str] = mapped_column(Text)

    _MODELS.append(Note)  # the registry holds its classes weakly
    return Base


_MODELS: list[type[Any]] = []


class UncheckedRls(RowLevelSecurity):
    """Row-level security whose start-up checks find nothing (an application that skips them)."""

    async def check(
        self, conn: AsyncConnection, tables: Sequence[Table] | None = None
    ) -> list[Finding]:
        return []


class PublicFirstSchemas(SchemaPerTenant):
    """Schema isolation whose search_path puts ``public`` before the tenant's schema (and
    whose start-up checks, which would refuse the table in public, find nothing)."""

    async def check(self, conn: AsyncConnection) -> list[Finding]:
        return []

    def binding(self, tenant: Tenant) -> Binding:
        path = f"public, {quote_ident(self.schema_for(tenant))}"
        return Binding(f"SELECT set_config('search_path', {quote_literal(path)}, true)")


class Provisioning:
    """The kit's row-strategy provisioning (tables, strategy DDL, grants) plus ``extra`` SQL.

    A class rather than a closure: its ``__qualname__`` carries a digest of the SQL, so a kept
    template is rebuilt when a set-up changes (the kit fingerprints the provision's name).
    """

    def __init__(
        self, metadata: MetaData, extra: Sequence[str] = (), *, public_copy: Any = None
    ) -> None:
        self.metadata = metadata
        self.extra = tuple(extra)
        self.public_copy = public_copy  # (table, rows): a table left in public, with rows
        digest = hashlib.sha256("\n".join(self.extra).encode()).hexdigest()[:12]
        self.__qualname__ = f"Provisioning:{digest}:{public_copy is not None}"

    async def __call__(
        self,
        conn: AsyncConnection,
        strategy: IsolationStrategy,
        tenants: Sequence[Tenant],
        app_role: str,
    ) -> None:
        if isinstance(strategy, SchemaPerTenant):
            await strategy.install(conn)
            for tenant in tenants:
                await strategy.create_tenant_schema(conn, tenant, app_role)
        else:
            await conn.run_sync(self.metadata.create_all)
            await strategy.install(conn)
        for statement in self.extra:
            await conn.execute(text(statement))
        if self.public_copy is not None:
            table, rows = self.public_copy()
            await conn.run_sync(lambda sync: table.create(sync))
            await conn.execute(insert(table), rows)
        for statement in dml_grants("public", app_role):
            await conn.execute(text(statement))


@dataclass
class Setup:
    """A kit and what each of the five probes must report on it."""

    name: str
    kit: TenancyKit
    expected: dict[str, Outcome]
    #: The same strategy with the library's start-up checks, when the set-up's own skips them
    #: (those checks refuse the set-up before a probe could run).
    strict: Callable[[], IsolationStrategy] | None = field(default=None)

    @property
    def model(self) -> type[Any]:
        (model,) = self.kit.tenant_models()
        return model


def _all(outcome: Outcome, **changes: Outcome) -> dict[str, Outcome]:
    expected: dict[str, Outcome] = dict.fromkeys(PROBES, outcome)
    expected.update(changes)
    return expected


def _rls(
    name: str, extra: Sequence[str], expected: dict[str, Outcome], *, orm_criteria: bool = False
) -> Setup:
    """Row-level security as the library installs it, then ``extra`` SQL run as the owner
    (none: the correct set-up, checked at start-up like an application's). Without the ORM
    criteria by default, so the policy alone stands between the tenants."""
    base = notes_base()
    metadata = base.metadata
    strategy = UncheckedRls if extra else RowLevelSecurity
    kit = TenancyKit(
        models=base,
        strategy=lambda: strategy(metadata=metadata, orm_criteria=orm_criteria),
        provision=Provisioning(metadata, extra),
        name=f"self_{name}",
    )
    strict = (lambda: RowLevelSecurity(metadata=metadata)) if extra else None
    return Setup(name, kit, expected, strict=strict)


_CONFINED = RowLevelSecurity().policy_predicate()  # the library's own USING predicate


def _view_escape() -> Setup:
    """A model mapped on a view made in raw SQL: the view runs as its owner (here the
    superuser that ran the migration), so row-level security on the table does not apply."""
    tables = notes_base()
    views = notes_base(table="note_view")
    metadata = tables.metadata
    kit = TenancyKit(
        models=views,
        strategy=lambda: UncheckedRls(metadata=metadata, orm_criteria=False),
        provision=Provisioning(
            metadata, ["CREATE VIEW note_view AS SELECT tenant_id, id, body FROM notes"]
        ),
        name="self_rls_view_escape",
    )
    # validate() refuses it (A012): the view is not security_invoker.
    strict = lambda: RowLevelSecurity(metadata=metadata, orm_criteria=False)  # noqa: E731
    return Setup("rls_view_escape", kit, _all("leak"), strict=strict)


def _query_unregistered() -> Setup:
    """QueryScoping given another metadata than the model's: it refuses every statement on a
    table it cannot place, so no probe leaks and every control reports the broken set-up."""
    registered = notes_base(table="projects")
    unregistered = notes_base()
    metadata = registered.metadata
    kit = TenancyKit(
        models=unregistered,
        strategy=lambda: QueryScoping(metadata=metadata),
        provision=Provisioning(unregistered.metadata),
        name="self_query_unregistered",
    )
    return Setup("query_unregistered", kit, _all("control"))


def _query(name: str) -> Setup:
    base = notes_base()
    metadata = base.metadata
    kit = TenancyKit(
        models=base,
        strategy=lambda: QueryScoping(metadata=metadata),
        provision=Provisioning(metadata),
        name=f"self_{name}",
    )
    return Setup(name, kit, _all("pass"))


def _schema(name: str, *, public_first: bool) -> Setup:
    """Schemas; ``public_first``: the victim's rows also sit in a table left in ``public``
    (as after a botched move from one schema to many), searched before the tenant's."""
    base = notes_base(tenant_column=False)
    metadata = base.metadata
    strategy = PublicFirstSchemas if public_first else SchemaPerTenant
    holder: list[TenancyKit] = []

    def public_copy() -> tuple[Any, Any]:
        kit = holder[0]
        (table,) = metadata.sorted_tables
        left = table.to_metadata(MetaData(), schema="public")
        return left, kit.rows.rows(table, 1)

    kit = TenancyKit(
        models=base,
        strategy=lambda: strategy(metadata=metadata, shared_schema=None),
        provision=Provisioning(metadata, public_copy=public_copy if public_first else None),
        name=f"self_{name}",
    )
    holder.append(kit)
    if not public_first:
        return Setup(name, kit, _all("pass"))
    # Only the read can see the victim's rows; the writes land in public, so the attacker's
    # own rows do not change and each write probe's control reports the broken set-up.
    expected = _all("control", read="leak")
    return Setup(
        name, kit, expected, strict=lambda: SchemaPerTenant(metadata=metadata, shared_schema=None)
    )


class MisroutedDatabases(DatabasePerTenant):
    """A database per tenant that sends every tenant to the first tenant's database (an
    engine cached for the process), with the placement claims that would refuse it removed."""

    def __init__(self) -> None:
        super().__init__(max_engines=4, max_connections=8)
        self._first: URL | None = None

    def url_of(self, tenant: Tenant) -> URL:
        if self._first is None:
            self._first = super().url_of(tenant)
        return self._first

    def _claim(self, claims: dict[Any, str], key: Any, tenant_id: str) -> None:
        return None


def _database(name: str, *, misrouted: bool) -> Setup:
    base = notes_base(tenant_column=False)
    strategy = MisroutedDatabases if misrouted else DatabasePerTenant
    kit = TenancyKit(models=base, strategy=strategy, name=f"self_{name}")
    # Misrouted: the first attacker stays home, the second works in the victim's database.
    return Setup(name, kit, _all("leak" if misrouted else "pass"))


def _setups() -> dict[str, Setup]:
    found = [
        _rls("rls_correct", [], _all("pass")),
        _rls(
            "rls_disabled",
            [
                "ALTER TABLE notes NO FORCE ROW LEVEL SECURITY",
                "ALTER TABLE notes DISABLE ROW LEVEL SECURITY",
                f"DROP POLICY {POLICY_NAME} ON notes",
            ],
            _all("leak"),
        ),
        # Forced row-level security without a policy denies everything: no leak, and every
        # control reports that the attacker cannot use its own rows either.
        _rls("rls_no_policy", [f"DROP POLICY {POLICY_NAME} ON notes"], _all("control")),
        _rls(
            # The ORM criteria keep the ORM's statements confined; SQL beside the ORM is not.
            "rls_disabled_orm_criteria",
            [
                "ALTER TABLE notes NO FORCE ROW LEVEL SECURITY",
                "ALTER TABLE notes DISABLE ROW LEVEL SECURITY",
                f"DROP POLICY {POLICY_NAME} ON notes",
            ],
            _all("pass", read="leak"),
            orm_criteria=True,
        ),
        _rls(
            "rls_open_policy",
            ["CREATE POLICY everyone ON notes AS PERMISSIVE FOR ALL USING (true)"],
            _all("leak"),
        ),
        _rls(
            "rls_open_select",
            ["CREATE POLICY peek ON notes AS PERMISSIVE FOR SELECT USING (true)"],
            _all("pass", read="leak"),
        ),
        _rls(
            "rls_no_write_check",
            [
                f"DROP POLICY {POLICY_NAME} ON notes",
                f"CREATE POLICY confined ON notes USING ({_CONFINED}) WITH CHECK (true)",
            ],
            # Moving a row needs an UPDATE, whose new row must still pass the SELECT policy
            # (it reads the table in its WHERE): only the INSERT gets through.
            _all("pass", insert="leak"),
        ),
        _view_escape(),
        _query("query_correct"),
        _query_unregistered(),
        _schema("schema_correct", public_first=False),
        _schema("schema_public_first", public_first=True),
        _database("database_correct", misrouted=False),
        _database("database_misrouted", misrouted=True),
    ]
    return {setup.name: setup for setup in found}


SETUPS = _setups()
