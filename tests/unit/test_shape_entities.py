"""QueryScoping keeps a statement's entities on its cached shape, keyed by SQLAlchemy's cache
key: so two statements with one cache key must have the same entities
(``ORMExecuteState.all_mappers``), whatever spelling built them. Generated statements, each
built twice independently; the entities read by SQLAlchemy itself inside ``do_orm_execute``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, delete, event, func, literal_column, select, update
from sqlalchemy.orm import ORMExecuteState, Session, aliased, with_polymorphic

from tests.adversarial.models import Account, Note, Project, Task


class _Seen(Exception):
    """Raised by the listener: the statement is read, never run."""


def _entities_of(statement: Any) -> tuple[Any, ...]:
    engine = create_engine("sqlite://")
    seen: list[tuple[Any, ...]] = []

    def capture(state: ORMExecuteState) -> None:
        seen.append(tuple(state.all_mappers))
        raise _Seen

    with Session(engine) as session:
        event.listen(session, "do_orm_execute", capture)
        with contextlib.suppress(_Seen):
            session.execute(statement)
    assert len(seen) == 1
    return seen[0]


# Each builder makes a fresh statement (fresh aliases too) from the drawn choices.
_COLUMNS: list[Callable[[Any, Any], Any]] = [
    lambda p, t: p,
    lambda p, t: t,
    lambda p, t: p.id,
    lambda p, t: t.title,
    lambda p, t: func.count(p.id),
    lambda p, t: literal_column("1"),
    lambda p, t: Account,
    lambda p, t: Note.body,
]


@st.composite
def _statements(draw: st.DrawFn) -> Callable[[], Any]:
    kind = draw(st.sampled_from(["select", "update", "delete"]))
    aliasing = draw(st.sampled_from(["plain", "aliased", "named", "polymorphic"]))
    columns = draw(st.lists(st.integers(0, len(_COLUMNS) - 1), min_size=1, max_size=3))
    join = draw(st.booleans())
    select_from = draw(st.booleans())

    def entities() -> tuple[Any, Any]:
        if aliasing == "aliased":
            return aliased(Project), aliased(Task)
        if aliasing == "named":
            return aliased(Project, name="p"), aliased(Task, name="t")
        if aliasing == "polymorphic":
            return with_polymorphic(Project, []), Task
        return Project, Task

    def build() -> Any:
        p, t = entities()
        if kind == "update":
            return update(Project).where(Project.id == 1).values(name="x")
        if kind == "delete":
            return delete(Task).where(Task.id == 2)
        statement = select(*(_COLUMNS[i](p, t) for i in columns))
        if select_from:
            statement = statement.select_from(p)
        if join:
            statement = statement.join(t, t.project_id == p.id)
        return statement.where(p.id == 3)

    return build


@settings(max_examples=150, deadline=None)
@given(build=_statements(), other=_statements())
def test_one_cache_key_means_one_set_of_entities(
    build: Callable[[], Any], other: Callable[[], Any]
) -> None:
    first, again, different = build(), build(), other()
    assert first._generate_cache_key() == again._generate_cache_key()
    assert _entities_of(first) == _entities_of(again)
    if first._generate_cache_key() == different._generate_cache_key():
        assert _entities_of(first) == _entities_of(different)
