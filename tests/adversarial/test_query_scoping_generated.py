"""Generated UPDATE and DELETE shapes under QueryScoping, on PostgreSQL and SQLite.

Each example draws a target (projects or tasks), an API (ORM statement, legacy ``Query``, Core
through the session, Core through its connection), up to two filters, a SET value and a
RETURNING clause, mixing the other tenant table in through subqueries, ``EXISTS``, CTEs, set
operations, UPDATE ... FROM / DELETE ... USING and ``aliased()``. The oracle: an ORM shape is
scoped (SQLite lacks DELETE ... USING and RETURNING from a FROM table: SQLAlchemy or SQLite
refuse those); a Core shape is scoped when it names no tenant table but its target, refused
(``core_statement``) otherwise. A filter on the other tenant's values (the ``globex-`` ones) is
ANDed in, so acme's rows must not change when it is drawn; whatever ran, the admin engine must
read back every globex row as seeded and no globex value in acme's rows or in what returned.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st
from sqlalchemy import delete, exists, func, select, union, update
from sqlalchemy.exc import CompileError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import aliased

from asgi_tenancy import UnsafeQuery, tenant_scope
from asgi_tenancy.sqlalchemy import TenantDatabase
from tests.adversarial import scoping
from tests.adversarial.models import Base, Note, Project, Task
from tests.adversarial.scoping import (
    ACME,
    Backend,
    assert_isolated,
    matches_seed,
    reseed,
    snapshot,
    unchanged,
)

backend, admin, db = scoping.backend, scoping.admin, scoping.db  # the fixtures of both backends

PROJECTS, TASKS, NOTES = (Base.metadata.tables[t] for t in ("projects", "tasks", "notes"))


@dataclass(frozen=True)
class Side:
    """One table as a statement names it: an ORM entity (or alias) or a Core table."""

    entity: Any
    id: Any
    tenant: Any
    label: Any  # name or title: carries its tenant's prefix
    link: Any  # projects.id = tasks.project_id


def _orm(entity: Any) -> Side:
    label = entity.name if hasattr(entity, "name") else entity.title
    link = entity.id if hasattr(entity, "name") else entity.project_id
    return Side(entity, entity.id, entity.tenant_id, label, link)


def _core(table: Any) -> Side:
    label = table.c.name if "name" in table.c else table.c.title
    link = table.c.id if "name" in table.c else table.c.project_id
    return Side(table, table.c.id, table.c.tenant_id, label, link)


@dataclass(frozen=True)
class Shape:
    kind: str  # update, delete
    api: str  # orm, query, core, connection
    target: str  # projects, tasks
    filters: tuple[str, ...]
    value: str  # update only
    returning: str

    @property
    def orm(self) -> bool:
        return self.api in ("orm", "query")

    @property
    def multi_table(self) -> bool:
        return bool({"from_theirs", "from_own", "alias_theirs"} & set(self.filters)) or (
            self.kind == "update" and self.value == "other_column"
        )

    @property
    def names_other(self) -> bool:
        """Whether anything but the target is named (a Core shape is refused then)."""
        alone = {"own_id", "their_tenant"}
        return (
            bool(set(self.filters) - alone)
            or (self.kind == "update" and self.value != "literal")
            or self.returning in ("subquery", "other")
        )

    @property
    def theirs(self) -> bool:
        """A filter that only the other tenant's rows satisfy is ANDed in."""
        return any(f.endswith("theirs") or f == "their_tenant" for f in self.filters)


FILTERS = (
    "own_id",
    "their_tenant",
    "in_theirs",
    "in_own",
    "exists_theirs",
    "from_theirs",
    "from_own",
    "alias_theirs",
    "cte_theirs",
    "union_theirs",
)


@st.composite
def shapes(draw: st.DrawFn) -> Shape:
    kind = draw(st.sampled_from(["update", "delete"]))
    api = draw(st.sampled_from(["orm", "query", "core", "connection"]))
    # Deleting projects would break the tasks' foreign key; tasks are deleted instead.
    target = "tasks" if kind == "delete" else draw(st.sampled_from(["projects", "tasks"]))
    filters = tuple(draw(st.lists(st.sampled_from(FILTERS), max_size=2, unique=True)))
    value = draw(st.sampled_from(["literal", "other_column", "aggregate", "correlated"]))
    returning = "none" if api == "query" else draw(st.sampled_from(["none", "target", "subquery"]))
    if returning == "none" and api != "query" and draw(st.booleans()) and filters:
        returning = "other" if {"from_theirs", "from_own"} & set(filters) else "none"
    joined = bool({"from_theirs", "from_own"} & set(filters))
    if value == "other_column" and not joined:
        value = "literal"  # a second FROM without a join condition: a cartesian product
    if joined and value in ("aggregate", "correlated"):
        value = "other_column"  # a subquery on the joined table would correlate it away
    if joined and returning == "subquery":
        returning = "target"
    return Shape(kind, api, target, filters, value if kind == "update" else "literal", returning)


def _filter(name: str, t: Side, o: Side, alias: Side, notes: Any) -> Any:
    theirs, own = o.label.like("globex-%"), o.label.like("acme-%")
    if name == "own_id":
        return t.id <= 3
    if name == "their_tenant":
        return t.tenant == "globex"
    if name == "in_theirs":
        return t.link.in_(select(o.link).where(theirs))
    if name == "in_own":
        return t.link.in_(select(o.link).where(own, o.id <= 3))
    if name == "exists_theirs":
        return exists().where(o.tenant == "globex")
    if name == "from_theirs":
        return (t.link == o.link) & theirs
    if name == "from_own":
        return (t.link == o.link) & own & (o.id <= 2)
    if name == "alias_theirs":
        return (t.link == alias.link) & alias.label.like("globex-%")
    if name == "cte_theirs":
        cte = select(o.link.label("k")).where(theirs).cte()
        return t.link.in_(select(cte.c.k))
    assert name == "union_theirs"
    return t.id.in_(
        union(select(o.id).where(theirs), select(notes.id).where(notes.body.like("globex-%")))
    )


def build(shape: Shape) -> tuple[Any, Callable[[Any], Any] | None]:
    """The statement (ORM, Core) or, for the legacy ``Query``, the function that runs it."""
    if shape.orm:
        t, o = (
            (_orm(Project), _orm(Task))
            if shape.target == "projects"
            else (_orm(Task), _orm(Project))
        )
        alias = _orm(aliased(o.entity))
        notes: Any = Note
    else:
        t, o = (
            (_core(PROJECTS), _core(TASKS))
            if shape.target == "projects"
            else (_core(TASKS), _core(PROJECTS))
        )
        alias = _core(o.entity.alias())
        notes = NOTES.c
    criteria = [_filter(f, t, o, alias, notes) for f in shape.filters]
    values = {
        "literal": "acme-generated",
        "other_column": o.label,
        "aggregate": select(func.max(o.label)).scalar_subquery(),
        "correlated": func.coalesce(  # a project without tasks keeps a name
            select(o.label).where(o.link == t.link).order_by(o.id).limit(1).scalar_subquery(),
            t.label,
        ),
    }
    if shape.api == "query":
        value = values[shape.value]

        def run(session: Any) -> Any:
            query = session.query(t.entity).filter(*criteria)
            if shape.kind == "delete":
                return query.delete(synchronize_session=False)
            return query.update({t.label: value}, synchronize_session=False)

        return None, run
    statement: Any = (
        delete(t.entity)
        if shape.kind == "delete"
        else update(t.entity).values({t.label: values[shape.value]})
    )
    statement = statement.where(*criteria)
    if shape.returning == "target":
        statement = statement.returning(t.tenant, t.label)
    elif shape.returning == "subquery":
        statement = statement.returning(select(func.max(o.label)).scalar_subquery())
    elif shape.returning == "other":
        statement = statement.returning(o.tenant, o.label)
    return statement, None


def _expected_refusal(shape: Shape, backend: str) -> tuple[type[BaseException], ...] | None:
    if backend == "sqlite" and shape.kind == "delete" and shape.multi_table:
        return (CompileError, NotImplementedError)  # no DELETE ... USING in SQLite
    if not shape.orm and shape.names_other:
        return (UnsafeQuery,)
    if backend == "sqlite" and shape.returning == "other":
        return (OperationalError,)  # SQLite's RETURNING cannot name the FROM table
    return None


async def _execute(shape: Shape, s: AsyncSession) -> Any:
    """Run the shape on acme's session; what RETURNING gave, if anything."""
    statement, run = build(shape)
    if run is not None:
        return await s.run_sync(run)
    if shape.api == "connection":
        result = await (await s.connection()).execute(statement)
    else:
        result = await s.execute(statement)
    return result.all() if shape.returning != "none" else None


@settings(max_examples=120, database=None, deadline=None)
@given(shape=shapes())
async def test_generated_update_and_delete_shapes(
    shape: Shape, backend: Backend, db: TenantDatabase, admin: AsyncEngine
) -> None:
    note(repr(shape))
    refusal = _expected_refusal(shape, backend.name)
    async with tenant_scope(ACME), db.session() as s:
        if refusal is None:
            returned = await _execute(shape, s)
            await s.commit()
        else:
            with pytest.raises(refusal) as refused:
                await _execute(shape, s)
            if isinstance(refused.value, UnsafeQuery):
                assert refused.value.reason == "core_statement"
            returned = None
            await s.rollback()
    after = await snapshot(admin)
    assert_isolated(after, returned)
    if refusal is not None or shape.theirs:
        unchanged(after)
    if not matches_seed(after):
        await reseed(admin)
