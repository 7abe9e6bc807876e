"""Every write path of a QueryScoping session (issue 14), on PostgreSQL and SQLite.

acme writes; globex holds the same primary keys. After each case an admin connection reads
every table back: no row of globex was written, changed or deleted, no acme row (and nothing
returned) holds a value of globex, and a refused case sent no write to the database. Each case
that runs also asserts its own effect on acme's rows, so a case that silently did nothing fails.
The table of shapes and outcomes in docs/strategies/query-scoping.md names these cases.
"""

from __future__ import annotations

import asyncio
import contextvars
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import pytest
from sqlalchemy import (
    bindparam,
    delete,
    event,
    exists,
    func,
    insert,
    lambda_stmt,
    literal_column,
    select,
    text,
    union,
    union_all,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import (
    CompileError,
    IntegrityError,
    InvalidRequestError,
    OperationalError,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.orm import Session, aliased, make_transient_to_detached
from sqlalchemy.orm.exc import StaleDataError

from asgi_tenancy import (
    SessionTenantMismatch,
    TenancyError,
    Tenant,
    TenantContextError,
    UnsafeQuery,
    tenant_scope,
)
from asgi_tenancy.sqlalchemy import QueryScoping, TenantDatabase
from tests.adversarial import scoping
from tests.adversarial.models import Account, Base, Currency, Note, Project, Task
from tests.adversarial.scoping import (
    ACME,
    Backend,
    Snapshot,
    assert_as_seeded,
    assert_isolated,
    open_database,
    own,
    reseed,
    seeded,
    snapshot,
    unchanged,
)

backend, admin, db = scoping.backend, scoping.admin, scoping.db  # the fixtures of both backends

PROJECTS, TASKS = Base.metadata.tables["projects"], Base.metadata.tables["tasks"]
ACCOUNTS, CURRENCIES = Base.metadata.tables["accounts"], Base.metadata.tables["currencies"]
NO_DELETE_USING = (CompileError, NotImplementedError)  # SQLAlchemy's refusal on SQLite

Outcome = Literal["scoped", "stamped", "refused"]


@dataclass
class Ctx:
    """What a case runs with: acme's session, its database, the backend."""

    s: AsyncSession
    db: TenantDatabase
    backend: Backend

    async def conn(self) -> AsyncConnection:
        return await self.s.connection()

    def insert(self, table: Any) -> Any:
        """The backend's own INSERT (for upserts)."""
        return (postgresql if self.backend.name == "postgresql" else sqlite).insert(table)

    async def sync(self, work: Callable[[Session], Any]) -> Any:
        return await self.s.run_sync(work)


@dataclass(frozen=True)
class Case:
    name: str
    shape: str  # for the docs table
    outcome: Outcome
    run: Callable[[Ctx], Awaitable[Any]]
    effect: Callable[[Snapshot, Any], None] | None = None  # on acme's rows; None: unchanged
    error: type[BaseException] | tuple[type[BaseException], ...] = TenancyError
    reason: str | None = None  # UnsafeQuery's reason
    sent: bool = False  # a refused case may have sent SQL (the database refused it)
    # A scoped write that matched no row, which SQLAlchemy reports (StaleDataError).
    raises: type[BaseException] | None = None
    # SQLite lacks the shape (DELETE ... USING): SQLAlchemy refuses it there, with this error.
    sqlite_refusal: type[BaseException] | tuple[type[BaseException], ...] | None = None

    def on(self, backend: str) -> Case:
        """The case as it plays on ``backend``."""
        if backend == "sqlite" and self.sqlite_refusal is not None:
            return replace(self, outcome="refused", error=self.sqlite_refusal, reason=None)
        return self


def renamed(table: str, column: str, expected: dict[int, str]) -> Callable[[Snapshot, Any], None]:
    """acme's rows ``expected`` now hold those values; every other acme row is as seeded."""

    def check(after: Snapshot, returned: Any) -> None:
        rows, before = own(after, table), seeded(table)
        assert {i: rows[i][column] for i in expected} == expected
        assert {i: r for i, r in rows.items() if i not in expected} == {
            i: r for i, r in before.items() if i not in expected
        }

    return check


def added(table: str, **values: Any) -> Callable[[Snapshot, Any], None]:
    """One new acme row in ``table`` (by id) with ``values``."""

    def check(after: Snapshot, returned: Any) -> None:
        rows = own(after, table)
        new = rows[values["id"]]
        assert {k: new[k] for k in values} == values
        assert set(rows) - set(seeded(table)) == {values["id"]}

    return check


def added_rows(table: str, *ids: int) -> Callable[[Snapshot, Any], None]:
    def check(after: Snapshot, returned: Any) -> None:
        assert set(own(after, table)) - set(seeded(table)) == set(ids)

    return check


def removed(table: str, ids: Iterable[int]) -> Callable[[Snapshot, Any], None]:
    def check(after: Snapshot, returned: Any) -> None:
        assert set(seeded(table)) - set(own(after, table)) == set(ids)

    return check


def currency_added(code: str) -> Callable[[Snapshot, Any], None]:
    def check(after: Snapshot, returned: Any) -> None:
        assert code in {c["code"] for c in after["currencies"]}
        unchanged(after)

    return check


def returned_as(expected: list[Any], then: Callable[[Snapshot, Any], None] | None = None) -> Any:
    def check(after: Snapshot, returned: Any) -> None:
        assert sorted(tuple(r) for r in returned) == sorted(expected)
        (then or unchanged)(after, returned)

    return check


def _detached(obj: Any) -> Any:
    make_transient_to_detached(obj)
    return obj


async def _all(result: Any) -> list[Any]:
    return list((await result).all())


async def _flush(c: Ctx, *objects: Any) -> None:
    c.s.add_all(objects)
    await c.s.flush()


# -- the cases ----------------------------------------------------------------------------------

MAX_TITLE = "acme-task-9"  # max() of acme's titles; every tenant's together would give globex's


async def _uow_update(c: Ctx) -> None:
    project = await c.s.get_one(Project, ("acme", 1))
    project.name = "acme-renamed"
    await c.s.flush()


async def _uow_update_surrogate(c: Ctx) -> None:
    account = await c.s.get_one(Account, 1)
    account.name = "acme-renamed"
    await c.s.flush()


async def _uow_change_tenant(c: Ctx) -> None:
    project = await c.s.get_one(Project, ("acme", 1))
    project.tenant_id = "globex"
    await c.s.flush()


async def _uow_merge_forged_detached(c: Ctx) -> None:
    forged = _detached(Project(tenant_id="globex", id=3, name="globex-project-3"))
    merged = await c.s.merge(forged, load=False)
    merged.name = "pwned"
    await c.s.flush()


async def _uow_detached_without_tenant(c: Ctx) -> None:
    theirs = _detached(Account(id=11, name="globex-account-11"))
    c.s.add(theirs)
    theirs.name = "pwned"
    await c.s.flush()


async def _uow_delete_detached_without_tenant(c: Ctx) -> None:
    theirs = _detached(Account(id=11, name="globex-account-11"))
    c.s.add(theirs)
    await c.s.delete(theirs)
    await c.s.flush()


async def _uow_delete_forged(c: Ctx) -> None:
    forged = _detached(Task(tenant_id="globex", id=3, project_id=4, title="globex-task-3"))
    c.s.add(forged)
    await c.s.delete(forged)
    await c.s.flush()


async def _uow_from_other_session(c: Ctx) -> None:
    async def load() -> Project:
        async with tenant_scope(Tenant("globex")), c.db.session() as theirs:
            return await theirs.get_one(Project, ("globex", 1))

    # globex's request, elsewhere: a task of its own context (and its own connection)
    project = await asyncio.create_task(load(), context=contextvars.Context())
    project.name = "pwned"
    c.s.add(project)


async def _uow_delete(c: Ctx) -> None:
    await c.s.delete(await c.s.get_one(Task, ("acme", 1)))
    await c.s.flush()


async def _uow_delete_orphans(c: Ctx) -> None:
    account = await c.s.get_one(Account, 1)
    await c.s.run_sync(lambda _: account.notes.clear())  # globex's note on it is not loaded
    await c.s.flush()


async def _uow_reassign_parent(c: Ctx) -> None:
    task = await c.s.get_one(Task, ("acme", 1))
    task.project = await c.s.get_one(Project, ("acme", 2))
    await c.s.flush()


async def _uow_append_child(c: Ctx) -> None:
    account = await c.s.get_one(Account, 2)
    await c.s.run_sync(lambda _: account.notes.append(Note(id=100, body="acme-n")))
    await c.s.flush()


async def _merge(c: Ctx, obj: Any) -> None:
    await c.s.merge(obj)
    await c.s.flush()


async def _flush_hook_core_write(c: Ctx) -> None:
    def hook(session: Session, *_: Any) -> None:
        session.connection().execute(update(TASKS).where(TASKS.c.id == 1).values(title="acme-h"))

    event.listen(c.s.sync_session, "before_flush", hook)
    await _flush(c, Project(id=100, name="acme-hooked"))


async def _engine_write(c: Ctx) -> None:
    async with c.db.engine.connect() as conn:  # not the session's: no bound transaction
        await conn.execute(update(PROJECTS).values(name="pwned"))


def _from_cte() -> Any:
    titles = select(Task.project_id).where(Task.title == "acme-task-3").cte("titles")
    return update(Project).where(Project.id.in_(select(titles.c.project_id))).add_cte(titles)


def _ab_ids() -> Any:
    return select(Task.project_id).where(Task.title.like("globex%"))


_other = aliased(Task)
_self = aliased(Project)
_substr = func.substr(Project.name, 1, 3)

INSERTS = [
    # unit of work
    Case(
        "uow_add",
        "`session.add(obj)`, flush",
        "stamped",
        lambda c: _flush(c, Project(id=100, name="acme-new")),
        added("projects", id=100, tenant_id="acme"),
    ),
    Case(
        "uow_add_forged",
        "`session.add(obj)` naming another tenant",
        "refused",
        lambda c: _flush(c, Project(tenant_id="globex", id=100, name="forged")),
        error=TenantContextError,
    ),
    Case(
        "uow_cascade",
        "a new parent with new children (save-update cascade)",
        "stamped",
        lambda c: _flush(c, Account(id=100, name="acme-a", notes=[Note(id=100, body="acme-n")])),
        lambda after, _: (added("accounts", id=100)(after, _), added("notes", id=100)(after, _)),
    ),
    Case(
        "uow_cascade_forged",
        "a new child naming another tenant (cascade)",
        "refused",
        lambda c: _flush(
            c, Account(id=100, name="a", notes=[Note(id=100, tenant_id="globex", body="x")])
        ),
        error=TenantContextError,
    ),
    Case(
        "uow_append_child",
        "a child appended to a loaded parent's collection",
        "stamped",
        _uow_append_child,
        added("notes", id=100, account_id=2),
    ),
    Case(
        "merge_new",
        "`session.merge(new object)`",
        "stamped",
        lambda c: _merge(c, Project(id=100, name="acme-m")),
        added("projects", id=100),
    ),
    Case(
        "merge_forged",
        "`session.merge()` of an object naming another tenant",
        "refused",
        lambda c: _merge(c, Project(tenant_id="globex", id=1, name="pwned")),
        error=TenantContextError,
    ),
    Case(
        "merge_their_surrogate_key",
        "`session.merge()` with another tenant's surrogate key",
        "refused",
        lambda c: _merge(c, Account(id=11, name="acme-x")),
        error=IntegrityError,
        sent=True,
    ),
    # ORM statements
    Case(
        "orm_insert_values",
        "`insert(Model).values(...)`",
        "stamped",
        lambda c: c.s.execute(insert(Project).values(id=100, name="acme-v")),
        added("projects", id=100, name="acme-v"),
    ),
    Case(
        "orm_insert_values_forged",
        "`insert(Model).values(tenant_id=other)`",
        "refused",
        lambda c: c.s.execute(insert(Project).values(tenant_id="globex", id=100, name="x")),
        error=TenantContextError,
    ),
    Case(
        "orm_insert_values_expression",
        "`insert(Model).values(tenant_id=<SQL expression>)`",
        "refused",
        lambda c: c.s.execute(
            insert(Project).values(tenant_id=func.lower("GLOBEX"), id=100, name="x")
        ),
        error=TenantContextError,
    ),
    Case(
        "orm_insert_rows",
        "`execute(insert(Model), rows)` (ORM bulk INSERT)",
        "stamped",
        lambda c: c.s.execute(insert(Project), [{"id": 100, "name": "acme-b"}]),
        added("projects", id=100),
    ),
    Case(
        "orm_insert_rows_forged",
        "ORM bulk INSERT with a row of another tenant",
        "refused",
        lambda c: c.s.execute(
            insert(Project),
            [{"id": 100, "name": "a"}, {"tenant_id": "globex", "id": 101, "name": "b"}],
        ),
        error=TenantContextError,
    ),
    Case(
        "orm_insert_rows_returning",
        "ORM bulk INSERT ... RETURNING",
        "stamped",
        lambda c: _all(
            c.s.execute(
                insert(Project).returning(Project.tenant_id, Project.id),
                [{"id": 100, "name": "acme-r"}],
            )
        ),
        returned_as([("acme", 100)], added("projects", id=100)),
    ),
    Case(
        "orm_insert_multi_values",
        "`insert(Model).values([row, row])` naming the tenant",
        "stamped",
        lambda c: c.s.execute(
            insert(Project).values([{"tenant_id": "acme", "id": 100, "name": "acme-a"}])
        ),
        added("projects", id=100),
    ),
    Case(
        "orm_insert_multi_values_unnamed",
        "`insert(Model).values([row, row])` without it",
        "refused",
        lambda c: c.s.execute(
            insert(Project).values([{"id": 100, "name": "a"}, {"id": 101, "name": "b"}])
        ),
        error=TenantContextError,
    ),
    Case(
        "orm_insert_scalar_subquery",
        "`values(col=select(...).scalar_subquery())`",
        "scoped",
        lambda c: c.s.execute(
            insert(Project).values(
                id=100, name=select(Task.title).where(Task.id == 1).scalar_subquery()
            )
        ),
        added("projects", id=100, name="acme-task-1"),
    ),
    Case(
        "orm_insert_aggregate_subquery",
        "`values(col=select(max(...)).scalar_subquery())`",
        "scoped",
        lambda c: c.s.execute(
            insert(Project).values(id=100, name=select(func.max(Task.title)).scalar_subquery())
        ),
        added("projects", id=100, name=MAX_TITLE),
    ),
    Case(
        "orm_insert_returning_subquery",
        "`insert(...).returning(<scalar subquery>)`",
        "scoped",
        lambda c: _all(
            c.s.execute(
                insert(Project)
                .values(id=100, name="acme-r")
                .returning(select(func.count()).select_from(Task).scalar_subquery())
            )
        ),
        returned_as([(20,)], added("projects", id=100)),
    ),
    Case(
        "orm_insert_from_select",
        "`insert(Model).from_select(...)` into a tenant table",
        "refused",
        lambda c: c.s.execute(
            insert(Project).from_select(
                ["tenant_id", "id", "name"], select(Task.tenant_id, Task.id + 100, Task.title)
            )
        ),
        error=TenantContextError,
    ),
    Case(
        "orm_insert_shared_from_select",
        "`insert(Shared).from_select(select(TenantModel))`",
        "scoped",
        lambda c: c.s.execute(
            insert(Currency).from_select(
                ["code"], select(func.substr(func.max(Project.name), 1, 3))
            )
        ),
        currency_added("acm"),
    ),
    Case(
        "orm_insert_shared_scalar_subquery",
        "`insert(Shared).values(select(TenantModel))`",
        "scoped",
        lambda c: c.s.execute(
            insert(Currency).values(
                code=select(func.substr(func.max(Task.title), 1, 3)).scalar_subquery()
            )
        ),
        currency_added("acm"),
    ),
    Case(
        "orm_insert_shared_from_union",
        "`insert(Shared).from_select(union(...))`",
        "scoped",
        lambda c: c.s.execute(
            insert(Currency).from_select(
                ["code"],
                union(
                    select(func.substr(func.max(Project.name), 1, 3)),
                    select(func.substr(func.max(Task.title), 1, 3)),
                ),
            )
        ),
        currency_added("acm"),
    ),
    Case(
        "orm_insert_shared_from_cte",
        "`insert(Shared).from_select(...)` with a CTE",
        "scoped",
        lambda c: c.s.execute(
            insert(Currency)
            .from_select(
                ["code"],
                select(
                    (cte := select(func.substr(func.max(Note.body), 1, 3).label("c")).cte("n")).c.c
                ),
            )
            .add_cte(cte)
        ),
        currency_added("acm"),
    ),
    Case(
        "upsert_do_nothing",
        "`on_conflict_do_nothing()`, a new key",
        "stamped",
        lambda c: c.s.execute(
            c.insert(Project).values(id=100, name="acme-u").on_conflict_do_nothing()
        ),
        added("projects", id=100),
    ),
    Case(
        "upsert_do_nothing_colliding",
        "`on_conflict_do_nothing()`, a key both tenants hold",
        "scoped",
        lambda c: c.s.execute(
            c.insert(Project).values(id=1, name="pwned").on_conflict_do_nothing()
        ),
        unchanged,
    ),
    Case(
        "upsert_do_update",
        "`on_conflict_do_update()` on a tenant table",
        "refused",
        lambda c: c.s.execute(
            c.insert(Project)
            .values(id=1, name="pwned")
            .on_conflict_do_update(index_elements=["tenant_id", "id"], set_={"name": "pwned"})
        ),
        error=TenantContextError,
    ),
    Case(
        "upsert_do_update_surrogate",
        "`on_conflict_do_update()` on another tenant's key",
        "refused",
        lambda c: c.s.execute(
            c.insert(Account)
            .values(id=11, name="pwned")
            .on_conflict_do_update(index_elements=["id"], set_={"name": "pwned"})
        ),
        error=TenantContextError,
    ),
    Case(
        "insert_prefix",
        "`insert(...).prefix_with('OR REPLACE')`",
        "refused",
        lambda c: c.s.execute(insert(Project).prefix_with("OR REPLACE").values(id=1, name="x")),
        error=UnsafeQuery,
        reason="raw_sql",
    ),
    Case(
        "orm_insert_lambda",
        "`lambda_stmt(lambda: insert(Model).values(...))`",
        "stamped",
        lambda c: c.s.execute(lambda_stmt(lambda: insert(Project).values(id=100, name="acme-l"))),
        added("projects", id=100),
    ),
    Case(
        "insert_in_cte",
        "INSERT in a CTE of a SELECT",
        "refused",
        lambda c: c.s.execute(
            select(Project.id).add_cte(
                insert(Task).values(id=100, project_id=1, title="x").returning(Task.id).cte("i")
            )
        ),
        error=UnsafeQuery,
        reason="nested_dml",
    ),
    # Core
    Case(
        "core_insert_rows",
        "`execute(insert(table), rows)`",
        "stamped",
        lambda c: c.s.execute(
            insert(PROJECTS), [{"id": 100, "name": "acme-c"}, {"id": 101, "name": "acme-d"}]
        ),
        added_rows("projects", 100, 101),
    ),
    Case(
        "core_insert_rows_some_named",
        "`execute(insert(table), rows)`, the tenant in some rows only",
        "stamped",
        lambda c: c.s.execute(
            insert(PROJECTS),
            [{"tenant_id": "acme", "id": 100, "name": "a"}, {"id": 101, "name": "b"}],
        ),
        added_rows("projects", 100, 101),
    ),
    Case(
        "core_insert_connection",
        "`session.connection().execute(insert(table).values())`",
        "stamped",
        lambda c: _core(c, insert(PROJECTS).values(id=100, name="acme-c")),
        added("projects", id=100, name="acme-c"),
    ),
    Case(
        "orm_insert_on_connection",
        "an ORM `insert(Model)` run on `session.connection()`",
        "stamped",
        lambda c: _core(c, insert(Project).values(id=100, name="acme-oc")),
        added("projects", id=100, name="acme-oc"),
    ),
    Case(
        "core_insert_returning",
        "`insert(table).values(...).returning(...)`",
        "stamped",
        lambda c: _all(
            c.s.execute(
                insert(PROJECTS).values(id=100, name="acme-c").returning(PROJECTS.c.tenant_id)
            )
        ),
        returned_as([("acme",)], added("projects", id=100)),
    ),
    Case(
        "core_insert_forged",
        "`insert(table).values(tenant_id=other)`",
        "refused",
        lambda c: c.s.execute(insert(PROJECTS).values(tenant_id="globex", id=100, name="x")),
        error=TenantContextError,
    ),
    Case(
        "core_insert_parameter_override",
        "`values(tenant_id=ours)` overridden by a parameter",
        "refused",
        lambda c: c.s.execute(
            insert(PROJECTS).values(tenant_id="acme", id=100, name="x"), {"tenant_id": "globex"}
        ),
        error=TenantContextError,
    ),
    Case(
        "core_insert_named_parameters",
        "the tenant column bound to a parameter of another name",
        "refused",
        lambda c: c.s.execute(
            insert(PROJECTS).values(tenant_id=bindparam("x"), id=100, name=bindparam("tenant_id")),
            {"x": "globex", "tenant_id": "acme"},
        ),
        error=TenantContextError,
    ),
    Case(
        "core_insert_multi_values",
        "`insert(table).values([row, row])` naming the tenant",
        "stamped",
        lambda c: c.s.execute(
            insert(PROJECTS).values(
                [
                    {"tenant_id": "acme", "id": 100, "name": "a"},
                    {"tenant_id": "acme", "id": 101, "name": "b"},
                ]
            )
        ),
        added_rows("projects", 100, 101),
    ),
    Case(
        "core_insert_multi_values_override",
        "multi-row VALUES, a row overridden by a parameter",
        "refused",
        lambda c: c.s.execute(
            insert(PROJECTS).values(
                [
                    {"tenant_id": "acme", "id": 100, "name": "a"},
                    {"tenant_id": "acme", "id": 101, "name": "b"},
                ]
            ),
            {"tenant_id_m1": "globex"},
        ),
        error=TenantContextError,
    ),
    Case(
        "core_insert_multi_values_unnamed",
        "multi-row VALUES without the tenant",
        "refused",
        lambda c: c.s.execute(insert(PROJECTS).values([{"id": 100, "name": "a"}])),
        error=TenantContextError,
    ),
    Case(
        "core_insert_from_select",
        "`insert(table).from_select(...)`",
        "refused",
        lambda c: c.s.execute(
            insert(PROJECTS).from_select(
                ["tenant_id", "id", "name"],
                select(TASKS.c.tenant_id, TASKS.c.id + 100, TASKS.c.title),
            )
        ),
        error=TenantContextError,
    ),
    Case(
        "core_insert_subquery",
        "`insert(table).values(col=<subquery on a tenant table>)`",
        "refused",
        lambda c: c.s.execute(
            insert(PROJECTS).values(id=100, name=select(func.max(TASKS.c.title)).scalar_subquery())
        ),
        error=UnsafeQuery,
        reason="core_statement",
    ),
    Case(
        "core_upsert_do_update",
        "Core `on_conflict_do_update()`",
        "refused",
        lambda c: c.s.execute(
            c.insert(PROJECTS)
            .values(id=1, name="x")
            .on_conflict_do_update(index_elements=["tenant_id", "id"], set_={"name": "pwned"})
        ),
        error=TenantContextError,
    ),
    Case(
        "core_insert_shared",
        "`insert(shared table)`",
        "scoped",
        lambda c: c.s.execute(insert(CURRENCIES).values(code="CHF")),
        currency_added("CHF"),
    ),
    Case(
        "core_insert_shared_reading_tenant",
        "`insert(shared).from_select(<tenant table>)`",
        "refused",
        lambda c: c.s.execute(
            insert(CURRENCIES).from_select(
                ["code"], select(func.substr(func.max(PROJECTS.c.name), 1, 3))
            )
        ),
        error=UnsafeQuery,
        reason="core_statement",
    ),
    Case(
        "driver_sql_insert",
        "`exec_driver_sql('INSERT ...')`",
        "refused",
        lambda c: _driver(c, "INSERT INTO projects VALUES ('globex', 100, 'x')"),
        error=UnsafeQuery,
        reason="raw_sql",
    ),
    Case(
        "engine_insert",
        "the engine's own connection in a tenant scope",
        "refused",
        _engine_write,
        error=UnsafeQuery,
        reason="core_statement",
    ),
    # legacy bulk
    Case(
        "bulk_insert_mappings",
        "`bulk_insert_mappings(Model, rows)`",
        "stamped",
        lambda c: c.sync(lambda s: s.bulk_insert_mappings(Project, [{"id": 100, "name": "b"}])),
        added("projects", id=100),
    ),
    Case(
        "bulk_insert_mappings_defaults",
        "`bulk_insert_mappings(..., return_defaults=True)`",
        "stamped",
        lambda c: c.sync(
            lambda s: s.bulk_insert_mappings(
                Account, [{"id": 100, "name": "acme-b"}], return_defaults=True
            )
        ),
        added("accounts", id=100),
    ),
    Case(
        "bulk_insert_mappings_forged",
        "`bulk_insert_mappings()` naming another tenant",
        "refused",
        lambda c: c.sync(
            lambda s: s.bulk_insert_mappings(
                Project, [{"tenant_id": "globex", "id": 100, "name": "x"}]
            )
        ),
        error=TenantContextError,
    ),
    Case(
        "bulk_save_objects_new",
        "`bulk_save_objects([new objects])`",
        "stamped",
        lambda c: c.sync(lambda s: s.bulk_save_objects([Project(id=100, name="acme-b")])),
        added("projects", id=100),
    ),
    Case(
        "bulk_save_objects_forged",
        "`bulk_save_objects()` of an object of another tenant",
        "refused",
        lambda c: c.sync(
            lambda s: s.bulk_save_objects([Project(tenant_id="globex", id=100, name="x")])
        ),
        error=TenantContextError,
    ),
]


async def _core(c: Ctx, statement: Any, *params: Any) -> Any:
    return await (await c.conn()).execute(statement, *params)


async def _driver(c: Ctx, sql: str) -> Any:
    return await (await c.conn()).exec_driver_sql(sql)


UPDATES = [
    # unit of work
    Case(
        "uow_update",
        "change a loaded object, flush",
        "scoped",
        _uow_update,
        renamed("projects", "name", {1: "acme-renamed"}),
    ),
    Case(
        "uow_update_surrogate_key",
        "change a loaded object keyed by a surrogate id",
        "scoped",
        _uow_update_surrogate,
        renamed("accounts", "name", {1: "acme-renamed"}),
    ),
    Case(
        "uow_change_tenant",
        "change an object's tenant",
        "refused",
        _uow_change_tenant,
        error=TenantContextError,
    ),
    Case(
        "uow_merge_forged_detached",
        "`merge(load=False)` of another tenant's key, changed",
        "refused",
        _uow_merge_forged_detached,
        error=TenantContextError,
    ),
    Case(
        "uow_detached_without_tenant",
        "another tenant's surrogate key added detached, changed",
        "refused",
        _uow_detached_without_tenant,
        error=TenantContextError,
    ),
    Case(
        "uow_object_of_another_session",
        "an object another tenant's session loaded",
        "refused",
        _uow_from_other_session,
        error=SessionTenantMismatch,
    ),
    Case(
        "uow_reassign_parent",
        "many-to-one reassigned (relationship)",
        "scoped",
        _uow_reassign_parent,
        renamed("tasks", "project_id", {1: 2}),
    ),
    Case(
        "flush_hook_core_write",
        "a Core UPDATE inside a `before_flush` hook",
        "scoped",
        _flush_hook_core_write,
        lambda after, _: (
            renamed("tasks", "title", {1: "acme-h"})(after, _),
            added("projects", id=100)(after, _),
        ),
    ),
    # ORM statements
    Case(
        "orm_update",
        "`update(Model).where(...).values(...)`",
        "scoped",
        lambda c: c.s.execute(update(Project).where(Project.id <= 2).values(name="acme-u")),
        renamed("projects", "name", {1: "acme-u", 2: "acme-u"}),
    ),
    Case(
        "orm_update_their_tenant",
        "`update(Model).where(tenant_id == other)`",
        "scoped",
        lambda c: c.s.execute(
            update(Project).where(Project.tenant_id == "globex").values(name="pwned")
        ),
        unchanged,
    ),
    Case(
        "orm_update_tenant",
        "`update(Model).values(tenant_id=...)`",
        "refused",
        lambda c: c.s.execute(update(Project).values(tenant_id="globex")),
        error=TenantContextError,
    ),
    Case(
        "orm_update_from",
        "UPDATE ... FROM a second entity (`values(col=Other.col)`)",
        "scoped",
        lambda c: c.s.execute(
            update(Project)
            .where(Project.id == Task.project_id, Task.id <= 5)
            .values(name=Task.title)
        ),
        renamed("projects", "name", {i % 5 + 1: f"acme-task-{i}" for i in range(1, 6)}),
    ),
    Case(
        "orm_update_from_aliased",
        "UPDATE ... FROM an `aliased()` entity",
        "scoped",
        lambda c: c.s.execute(
            update(Project)
            .where(Project.id == _other.project_id, _other.id <= 5)
            .values(name=_other.title)
        ),
        renamed("projects", "name", {i % 5 + 1: f"acme-task-{i}" for i in range(1, 6)}),
    ),
    Case(
        "orm_update_from_self",
        "UPDATE ... FROM an alias of its own entity",
        "scoped",
        lambda c: c.s.execute(
            update(Project).where(Project.id == _self.id - 10).values(name=_self.name)
        ),
        renamed("projects", "name", {i: f"acme-project-{i + 10}" for i in range(1, 11)}),
    ),
    Case(
        "orm_update_from_their_values",
        "UPDATE ... FROM filtered on another tenant's values",
        "scoped",
        lambda c: c.s.execute(
            update(Project)
            .where(Project.id == Task.project_id, Task.title == "globex-task-3")
            .values(name="pwned")
        ),
        unchanged,
    ),
    Case(
        "orm_update_scalar_subquery",
        "`values(col=select(max(...)).scalar_subquery())`",
        "scoped",
        lambda c: c.s.execute(
            update(Project)
            .where(Project.id == 1)
            .values(name=select(func.max(Task.title)).scalar_subquery())
        ),
        renamed("projects", "name", {1: MAX_TITLE}),
    ),
    Case(
        "orm_update_correlated_subquery",
        "`values(col=<correlated subquery>)`",
        "scoped",
        lambda c: c.s.execute(
            update(Project)
            .where(Project.id == 2)
            .values(
                name=select(Task.title)
                .where(Task.project_id == Project.id)
                .order_by(Task.id)
                .limit(1)
                .scalar_subquery()
            )
        ),
        renamed("projects", "name", {2: "acme-task-1"}),
    ),
    Case(
        "orm_update_where_in",
        "`where(col.in_(select(Other...)))`",
        "scoped",
        lambda c: c.s.execute(
            update(Project).where(Project.id.in_(_ab_ids())).values(name="pwned")
        ),
        unchanged,
    ),
    Case(
        "orm_update_where_exists",
        "`where(exists()...)` / `relationship.any()`",
        "scoped",
        lambda c: c.s.execute(
            update(Project)
            .where(
                Project.tasks.any(Task.title.like("globex%"))
                | exists().where(Note.body.like("globex%"), Note.id == Project.id)
            )
            .values(name="pwned")
        ),
        unchanged,
    ),
    Case(
        "orm_update_cte",
        "`update(...).add_cte(cte)`",
        "scoped",
        lambda c: c.s.execute(_from_cte().values(name="acme-cte")),
        renamed("projects", "name", {4: "acme-cte"}),
    ),
    Case(
        "orm_update_union",
        "`where(col.in_(union_all(...)))`",
        "scoped",
        lambda c: c.s.execute(
            update(Project)
            .where(
                Project.id.in_(
                    union_all(_ab_ids(), select(Note.account_id).where(Note.body.like("globex%")))
                )
            )
            .values(name="pwned")
        ),
        unchanged,
    ),
    Case(
        "orm_update_returning",
        "`update(...).returning(Model.cols)`",
        "scoped",
        lambda c: _all(
            c.s.execute(
                update(Project)
                .where(Project.id <= 2)
                .values(name="acme-r")
                .returning(Project.tenant_id, Project.id)
            )
        ),
        returned_as(
            [("acme", 1), ("acme", 2)], renamed("projects", "name", {1: "acme-r", 2: "acme-r"})
        ),
    ),
    Case(
        "orm_update_returning_subquery",
        "`update(...).returning(<scalar subquery>)`",
        "scoped",
        lambda c: _all(
            c.s.execute(
                update(Project)
                .where(Project.id == 1)
                .values(name="acme-r")
                .returning(select(func.max(Task.title)).scalar_subquery())
            )
        ),
        returned_as([(MAX_TITLE,)], renamed("projects", "name", {1: "acme-r"})),
    ),
    Case(
        "orm_update_returning_from",
        "UPDATE ... FROM ... RETURNING the second entity",
        "scoped",
        lambda c: _all(
            c.s.execute(
                update(Project)
                .where(Project.id == Task.project_id, Task.id == 1)
                .values(name=Task.title)
                .returning(Task.tenant_id, Task.title)
            )
        ),
        returned_as([("acme", "acme-task-1")], renamed("projects", "name", {2: "acme-task-1"})),
        sqlite_refusal=OperationalError,  # SQLite's RETURNING cannot name the FROM table
    ),
    *[
        Case(
            f"orm_update_synchronize_{mode}",
            f"`synchronize_session={mode!r}`",
            "scoped",
            lambda c, mode=mode: c.s.execute(
                update(Project)
                .where(Project.id == 1)
                .values(name="acme-s")
                .execution_options(synchronize_session=mode)
            ),
            renamed("projects", "name", {1: "acme-s"}),
        )
        for mode in ("auto", "evaluate", "fetch", False)
    ],
    Case(
        "orm_update_ordered_values",
        "`update(...).ordered_values(...)`",
        "scoped",
        lambda c: c.s.execute(
            update(Project).where(Project.id == 1).ordered_values((Project.name, "acme-o"))
        ),
        renamed("projects", "name", {1: "acme-o"}),
    ),
    Case(
        "orm_update_by_primary_key",
        "`execute(update(Model), rows)` (bulk by primary key)",
        "scoped",
        lambda c: c.s.execute(update(Project), [{"tenant_id": "acme", "id": 1, "name": "acme-k"}]),
        renamed("projects", "name", {1: "acme-k"}),
    ),
    Case(
        "orm_update_by_their_primary_key",
        "bulk UPDATE by primary key naming another tenant",
        "refused",
        lambda c: c.s.execute(update(Project), [{"tenant_id": "globex", "id": 1, "name": "pwned"}]),
        error=TenantContextError,
    ),
    Case(
        "orm_update_by_their_surrogate_key",
        "bulk UPDATE by another tenant's surrogate key",
        "scoped",
        lambda c: c.s.execute(update(Account), [{"id": 11, "name": "pwned"}]),
        unchanged,
        raises=StaleDataError,
    ),
    Case(
        "orm_update_shared_from_tenant",
        "`update(Shared).values(select(TenantModel))`",
        "scoped",
        lambda c: c.s.execute(
            update(Currency)
            .where(Currency.code == "EUR")
            .values(code=select(func.substr(func.max(Project.name), 1, 3)).scalar_subquery())
        ),
        currency_added("acm"),
    ),
    Case(
        "orm_update_shared_from_tenant_entity",
        "`update(Shared)` ... FROM a tenant entity",
        "scoped",
        lambda c: c.s.execute(
            update(Currency)
            .where(Currency.code == "EUR", Currency.code != Project.name, Project.id == 1)
            .values(code=func.substr(Project.name, 1, 3))
        ),
        currency_added("acm"),
    ),
    Case(
        "orm_update_on_connection",
        "an ORM `update(Model)` run on `session.connection()`",
        "scoped",
        lambda c: _core(c, update(Project).where(Project.id == 1).values(name="acme-oc")),
        renamed("projects", "name", {1: "acme-oc"}),
    ),
    Case(
        "orm_update_text",
        "`update(Model).where(text(...))`",
        "refused",
        lambda c: c.s.execute(update(Project).where(text("1 = 1")).values(name="x")),
        error=UnsafeQuery,
        reason="raw_sql",
    ),
    Case(
        "orm_update_literal_column",
        "`values(col=literal_column(...))`",
        "refused",
        lambda c: c.s.execute(update(Project).values(name=literal_column("name"))),
        error=UnsafeQuery,
        reason="raw_sql",
    ),
    Case(
        "query_update",
        "legacy `Query.update()`",
        "scoped",
        lambda c: c.sync(
            lambda s: s.query(Project).filter(Project.id == 1).update({"name": "acme-q"})
        ),
        renamed("projects", "name", {1: "acme-q"}),
    ),
    Case(
        "query_update_from",
        "legacy `Query.update()` naming a second entity",
        "scoped",
        lambda c: c.sync(
            lambda s: (
                s.query(Project)
                .filter(Project.id == Task.project_id, Task.title.like("globex%"))
                .update({"name": "pwned"}, synchronize_session=False)
            )
        ),
        unchanged,
    ),
    Case(
        "orm_update_lambda",
        "`lambda_stmt(lambda: update(Model)...)`",
        "scoped",
        lambda c: c.s.execute(
            lambda_stmt(lambda: update(Project).where(Project.id == 1).values(name="acme-l"))
        ),
        renamed("projects", "name", {1: "acme-l"}),
    ),
    Case(
        "update_in_cte",
        "UPDATE in a CTE of a SELECT",
        "refused",
        lambda c: c.s.execute(
            select(Project.id).add_cte(
                update(Task).values(title="pwned").returning(Task.id).cte("u")
            )
        ),
        error=UnsafeQuery,
        reason="nested_dml",
    ),
    Case(
        "from_statement_update",
        "`select(Model).from_statement(update(...).returning(Model))`",
        "refused",
        lambda c: c.s.execute(
            select(Project).from_statement(update(Project).values(name="pwned").returning(Project))
        ),
        error=UnsafeQuery,
        reason="nested_dml",
    ),
    # Core
    Case(
        "core_update",
        "`update(table).where(...).values(...)`",
        "scoped",
        lambda c: c.s.execute(update(PROJECTS).where(PROJECTS.c.id == 1).values(name="acme-c")),
        renamed("projects", "name", {1: "acme-c"}),
    ),
    Case(
        "core_update_connection",
        "`session.connection().execute(update(table))`",
        "scoped",
        lambda c: _core(c, update(TASKS).values(title="acme-all")),
        renamed("tasks", "title", dict.fromkeys(range(1, 21), "acme-all")),
    ),
    Case(
        "core_update_executemany",
        "`execute(update(table).where(col == bindparam()), rows)`",
        "scoped",
        lambda c: c.s.execute(
            update(PROJECTS).where(PROJECTS.c.id == bindparam("pid")).values(name=bindparam("n")),
            [{"pid": 1, "n": "acme-1"}, {"pid": 2, "n": "acme-2"}],
        ),
        renamed("projects", "name", {1: "acme-1", 2: "acme-2"}),
    ),
    Case(
        "core_update_tenant",
        "`update(table).values(tenant_id=other)`",
        "refused",
        lambda c: c.s.execute(update(PROJECTS).values(tenant_id="globex")),
        error=TenantContextError,
    ),
    Case(
        "core_update_tenant_parameter",
        "SET tenant_id from a parameter",
        "refused",
        lambda c: c.s.execute(update(PROJECTS).values(tenant_id="acme"), {"tenant_id": "globex"}),
        error=TenantContextError,
    ),
    Case(
        "core_update_predicate_override",
        "the scope's own parameter overridden",
        "refused",
        lambda c: c.s.execute(
            update(PROJECTS).values(name="pwned"), {"asgi_tenancy_tenant": "globex"}
        ),
        error=UnsafeQuery,
        reason="core_statement",
    ),
    Case(
        "core_update_from",
        "Core UPDATE ... FROM a second tenant table",
        "refused",
        lambda c: c.s.execute(
            update(PROJECTS).where(PROJECTS.c.id == TASKS.c.project_id).values(name=TASKS.c.title)
        ),
        error=UnsafeQuery,
        reason="core_statement",
    ),
    Case(
        "core_update_subquery",
        "Core `values(col=<subquery on a tenant table>)`",
        "refused",
        lambda c: c.s.execute(
            update(PROJECTS).values(name=select(func.max(PROJECTS.c.name)).scalar_subquery())
        ),
        error=UnsafeQuery,
        reason="core_statement",
    ),
    Case(
        "core_update_shared",
        "`update(shared table)`",
        "scoped",
        lambda c: c.s.execute(
            update(CURRENCIES).where(CURRENCIES.c.code == "EUR").values(code="EUX")
        ),
        currency_added("EUX"),
    ),
    Case(
        "driver_sql_update",
        "`exec_driver_sql('UPDATE ...')`",
        "refused",
        lambda c: _driver(c, "UPDATE projects SET name = 'pwned'"),
        error=UnsafeQuery,
        reason="raw_sql",
    ),
    # legacy bulk
    Case(
        "bulk_update_mappings",
        "`bulk_update_mappings(Model, rows)`",
        "scoped",
        lambda c: c.sync(
            lambda s: s.bulk_update_mappings(
                Project, [{"tenant_id": "acme", "id": 1, "name": "acme-b"}]
            )
        ),
        renamed("projects", "name", {1: "acme-b"}),
    ),
    Case(
        "bulk_update_mappings_their_key",
        "`bulk_update_mappings()` of another tenant's key",
        "scoped",
        lambda c: c.sync(
            lambda s: s.bulk_update_mappings(
                Project, [{"tenant_id": "globex", "id": 1, "name": "pwned"}]
            )
        ),
        unchanged,
        raises=StaleDataError,
    ),
    Case(
        "bulk_update_mappings_their_surrogate_key",
        "`bulk_update_mappings()` by surrogate id",
        "scoped",
        lambda c: c.sync(lambda s: s.bulk_update_mappings(Account, [{"id": 11, "name": "pwned"}])),
        unchanged,
        raises=StaleDataError,
    ),
    Case(
        "bulk_update_mappings_steal",
        "`bulk_update_mappings()` setting our tenant on theirs",
        "scoped",
        lambda c: c.sync(
            lambda s: s.bulk_update_mappings(
                Account, [{"id": 11, "tenant_id": "acme", "name": "acme-stolen"}]
            )
        ),
        unchanged,
        raises=StaleDataError,
    ),
    Case(
        "bulk_update_mappings_give_away",
        "`bulk_update_mappings()` moving a row to another",
        "refused",
        lambda c: c.sync(
            lambda s: s.bulk_update_mappings(Account, [{"id": 1, "tenant_id": "globex"}])
        ),
        error=TenantContextError,
    ),
    Case(
        "bulk_save_objects_update",
        "`bulk_save_objects([detached object of another tenant])`",
        "scoped",
        lambda c: c.sync(
            lambda s: s.bulk_save_objects(
                [_detached(Account(id=11, tenant_id="acme", name="pwned"))]
            )
        ),
        unchanged,
    ),
]


DELETES = [
    Case(
        "uow_delete", "`session.delete(obj)`, flush", "scoped", _uow_delete, removed("tasks", [1])
    ),
    Case(
        "uow_delete_orphans",
        "delete-orphan cascade (collection cleared)",
        "scoped",
        _uow_delete_orphans,
        removed("notes", [1]),
    ),
    Case(
        "uow_delete_forged",
        "`session.delete()` of a forged detached object",
        "refused",
        _uow_delete_forged,
        error=TenantContextError,
    ),
    Case(
        "uow_delete_detached_without_tenant",
        "delete another tenant's surrogate key, detached",
        "refused",
        _uow_delete_detached_without_tenant,
        error=TenantContextError,
    ),
    Case(
        "orm_delete",
        "`delete(Model).where(...)`",
        "scoped",
        lambda c: c.s.execute(delete(Task).where(Task.id > 15)),
        removed("tasks", range(16, 21)),
    ),
    Case(
        "orm_delete_their_tenant",
        "`delete(Model).where(tenant_id == other)`",
        "scoped",
        lambda c: c.s.execute(delete(Task).where(Task.tenant_id == "globex")),
        unchanged,
    ),
    Case(
        "orm_delete_using",
        "DELETE ... USING a second entity",
        "scoped",
        lambda c: c.s.execute(
            delete(Task).where(Task.project_id == Project.id, Project.name == "acme-project-2")
        ),
        removed("tasks", [1, 6, 11, 16]),
        sqlite_refusal=NO_DELETE_USING,
    ),
    Case(
        "orm_delete_using_their_values",
        "DELETE ... USING filtered on another tenant's values",
        "scoped",
        lambda c: c.s.execute(
            delete(Task).where(Task.project_id == Project.id, Project.name == "globex-project-2")
        ),
        unchanged,
        sqlite_refusal=NO_DELETE_USING,
    ),
    Case(
        "orm_delete_using_aliased",
        "DELETE ... USING an `aliased()` entity",
        "scoped",
        lambda c: c.s.execute(
            delete(Task).where(
                Task.project_id == (p := aliased(Project)).id, p.name.like("globex%")
            )
        ),
        unchanged,
        sqlite_refusal=NO_DELETE_USING,
    ),
    Case(
        "orm_delete_where_in",
        "`delete(...).where(col.in_(select(Other...)))`",
        "scoped",
        lambda c: c.s.execute(
            delete(Task).where(
                Task.project_id.in_(select(Project.id).where(Project.name == "globex-project-2"))
            )
        ),
        unchanged,
    ),
    Case(
        "orm_delete_has",
        "`delete(...).where(relationship.has(...))`",
        "scoped",
        lambda c: c.s.execute(
            delete(Task).where(Task.project.has(Project.name == "globex-project-2"))
        ),
        unchanged,
    ),
    Case(
        "orm_delete_returning",
        "`delete(...).returning(...)`",
        "scoped",
        lambda c: _all(
            c.s.execute(delete(Task).where(Task.id > 18).returning(Task.tenant_id, Task.id))
        ),
        returned_as([("acme", 19), ("acme", 20)], removed("tasks", [19, 20])),
    ),
    Case(
        "orm_delete_cte",
        "`delete(...).add_cte(cte)`",
        "scoped",
        lambda c: c.s.execute(
            delete(Task)
            .where(
                Task.project_id.in_(
                    select(
                        (
                            cte := select(Project.id)
                            .where(Project.name.like("%-project-2"))
                            .cte("p")
                        ).c.id
                    )
                )
            )
            .add_cte(cte)
        ),
        removed("tasks", [1, 6, 11, 16]),
    ),
    Case(
        "orm_delete_union",
        "`delete(...).where(col.in_(union(...)))`",
        "scoped",
        lambda c: c.s.execute(
            delete(Task).where(
                Task.id.in_(
                    union(
                        select(Project.id).where(Project.name == "globex-project-2"),
                        select(Note.id).where(Note.body.like("globex%")),
                    )
                )
            )
        ),
        unchanged,
    ),
    Case(
        "query_delete",
        "legacy `Query.delete()`",
        "scoped",
        lambda c: c.sync(lambda s: s.query(Task).filter(Task.id == 20).delete()),
        removed("tasks", [20]),
    ),
    Case(
        "delete_in_cte",
        "DELETE in a CTE of a SELECT",
        "refused",
        lambda c: c.s.execute(select(Project.id).add_cte(delete(Task).returning(Task.id).cte("d"))),
        error=UnsafeQuery,
        reason="nested_dml",
    ),
    Case(
        "core_delete",
        "`delete(table).where(...)`",
        "scoped",
        lambda c: c.s.execute(delete(TASKS).where(TASKS.c.id > 15)),
        removed("tasks", range(16, 21)),
    ),
    Case(
        "core_delete_connection",
        "`session.connection().execute(delete(table))`",
        "scoped",
        lambda c: _core(c, delete(TASKS).where(TASKS.c.id == 1)),
        removed("tasks", [1]),
    ),
    Case(
        "core_delete_returning",
        "`delete(table).returning(...)`",
        "scoped",
        lambda c: _all(c.s.execute(delete(TASKS).where(TASKS.c.id > 18).returning(TASKS.c.title))),
        returned_as([("acme-task-19",), ("acme-task-20",)], removed("tasks", [19, 20])),
    ),
    Case(
        "orm_delete_by_primary_key",
        "`execute(delete(Model), rows)` (SQLAlchemy has no bulk DELETE by primary key)",
        "refused",
        lambda c: c.s.execute(delete(Task), [{"tenant_id": "globex", "id": 1}]),
        error=InvalidRequestError,
    ),
    Case(
        "core_delete_executemany",
        "`connection().execute(delete(table).where(col == bindparam()), rows)`",
        "scoped",
        lambda c: _core(c, delete(TASKS).where(TASKS.c.id == bindparam("i")), [{"i": 1}, {"i": 2}]),
        removed("tasks", [1, 2]),
    ),
    Case(
        "core_delete_predicate_override",
        "the scope's own parameter overridden",
        "refused",
        lambda c: c.s.execute(delete(TASKS), {"asgi_tenancy_tenant": "globex"}),
        error=UnsafeQuery,
        reason="core_statement",
    ),
    Case(
        "core_delete_using",
        "Core DELETE ... USING a second tenant table",
        "refused",
        lambda c: c.s.execute(delete(TASKS).where(TASKS.c.project_id == PROJECTS.c.id)),
        error=UnsafeQuery,
        reason="core_statement",
        sqlite_refusal=NO_DELETE_USING,
    ),
    Case(
        "core_delete_subquery",
        "Core `delete(...).where(<subquery on a tenant table>)`",
        "refused",
        lambda c: c.s.execute(delete(TASKS).where(TASKS.c.project_id.in_(select(PROJECTS.c.id)))),
        error=UnsafeQuery,
        reason="core_statement",
    ),
    Case(
        "driver_sql_delete",
        "`exec_driver_sql('DELETE ...')`",
        "refused",
        lambda c: _driver(c, "DELETE FROM tasks"),
        error=UnsafeQuery,
        reason="raw_sql",
    ),
]

CASES = [*INSERTS, *UPDATES, *DELETES]
WRITES = {"INSERT", "UPDATE", "DELETE", "WITH", "MERGE"}


class _Sent:
    """The writes the engine really sent (after_cursor_execute)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.writes: list[str] = []
        event.listen(engine.sync_engine, "after_cursor_execute", self._record)

    def _record(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().split(None, 1)[0].upper() in WRITES:
            self.writes.append(statement)


async def _run_and_flush(case: Case, ctx: Ctx) -> None:
    await case.run(ctx)
    await ctx.s.flush()


async def run_case(case: Case, database: TenantDatabase, backend: Backend) -> Any:
    """Run ``case`` as acme; commit what runs, roll back what is refused."""
    sent = _Sent(database.engine)
    async with tenant_scope(ACME), database.session() as s:
        ctx = Ctx(s, database, backend)
        if case.outcome == "refused":
            with pytest.raises(case.error) as refused:
                await _run_and_flush(case, ctx)
            if case.reason is not None:
                assert isinstance(refused.value, UnsafeQuery)
                assert refused.value.reason == case.reason
            if not case.sent:
                assert sent.writes == [], "a refused statement reached the database"
            await s.rollback()
            return None
        if case.raises is not None:
            with pytest.raises(case.raises):
                await _run_and_flush(case, ctx)
            assert sent.writes, "the scoped write was not sent"
            await s.rollback()
            return None
        returned = await case.run(ctx)
        await s.commit()
        return returned


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in CASES])
async def test_write_path(
    case: Case, backend: Backend, db: TenantDatabase, admin: AsyncEngine
) -> None:
    case = case.on(backend.name)
    returned = await run_case(case, db, backend)
    after = await snapshot(admin)
    assert_isolated(after, returned)
    if case.outcome == "refused":
        assert_as_seeded(after)
    else:
        (case.effect or unchanged)(after, returned)


def test_case_names_are_unique_and_every_outcome_is_met() -> None:
    assert len({c.name for c in CASES}) == len(CASES)
    assert {c.outcome for c in CASES} == {"scoped", "stamped", "refused"}


class _Leaky(QueryScoping):
    """A deliberately broken configuration: sessions get no criteria and no engine check."""

    def __init__(self) -> None:
        super().__init__(metadata=Base.metadata, shared_tables={"currencies"})
        self.criteria = None
        self.statement_guard = None


async def _leak_by_subquery(c: Ctx) -> None:
    top = select(func.max(Task.title)).scalar_subquery()
    await c.s.execute(insert(Project).values(tenant_id="acme", id=100, name=top))


# One write of each leak issue 14 reported: a subquery in values(), UPDATE ... FROM, legacy
# bulk; and a RETURNING that reads.
LEAKS: tuple[Callable[[Ctx], Awaitable[Any]], ...] = (
    _leak_by_subquery,
    *(
        c.run
        for c in CASES
        if c.name
        in (
            "orm_update_from_their_values",
            "orm_update_returning_subquery",
            "bulk_update_mappings_their_surrogate_key",
        )
    ),
)


async def test_the_isolation_check_catches_a_leaky_configuration(
    backend: Backend, admin: AsyncEngine
) -> None:
    assert len(LEAKS) == 4
    leaky = await open_database(backend, _Leaky())
    try:
        for run in LEAKS:
            async with tenant_scope(ACME), leaky.session() as s:
                returned = await run(Ctx(s, leaky, backend))
                await s.commit()
            with pytest.raises(AssertionError):
                assert_isolated(await snapshot(admin), returned)
            await reseed(admin)
    finally:
        await leaky.dispose()


def test_the_docs_table_names_every_case() -> None:
    """docs/strategies/query-scoping.md lists each case once, with the outcome it asserts."""
    page = Path(__file__).resolve().parents[2] / "docs" / "strategies" / "query-scoping.md"
    text = page.read_text()
    section = text[text.index("## Every write path") : text.index("## Start-up validation")]
    rows = re.findall(r"^\| .+ \| (\w+)\S* .*\| `(\w+)` \|$", section, re.MULTILINE)
    assert sorted(name for _, name in rows) == sorted(c.name for c in CASES)
    outcomes = {c.name: c.outcome for c in CASES}
    assert all(outcomes[name] == outcome for outcome, name in rows)
