"""QueryScoping on PostgreSQL (as the app role) and on SQLite: two tenants, colliding keys.

Every assertion on what a write did reads the rows back through an admin connection (the
superuser engine on PostgreSQL, a plain engine on the SQLite file).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Iterable
from contextlib import AsyncExitStack
from typing import Any

import pytest
from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    String,
    Table,
    column,
    delete,
    event,
    exists,
    func,
    insert,
    literal_column,
    or_,
    select,
    text,
    true,
    union_all,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import (
    aliased,
    joinedload,
    make_transient_to_detached,
    selectinload,
    subqueryload,
    with_loader_criteria,
    with_parent,
)
from sqlalchemy.sql.elements import quoted_name

from asgi_tenancy import (
    IsolationConfigError,
    SessionTenantMismatch,
    Tenant,
    TenantContextError,
    UnsafeQuery,
    central_scope,
    tenant_scope,
)
from asgi_tenancy.errors import DatabaseNotValidated
from asgi_tenancy.sqlalchemy import QueryScoping, TenantDatabase, allow_unscoped
from tests.adversarial import scoping
from tests.adversarial.models import (
    ROWS_PER_TENANT,
    Account,
    Base,
    Note,
    Project,
    Task,
    seed_rows,
)
from tests.adversarial.scoping import Backend, open_database, scoping_strategy

ACME, GLOBEX, INITECH = Tenant("acme"), Tenant("globex"), Tenant("initech")
PROJECTS = Base.metadata.tables["projects"]
TASKS = Base.metadata.tables["tasks"]
backend, admin, db = scoping.backend, scoping.admin, scoping.db  # the fixtures of both backends


def foreign_rows(rows: Iterable[Any], tenant: Tenant) -> list[Any]:
    """The suite's leak check: every row read that belongs to another tenant."""
    leaked = []
    for row in rows:
        owner = getattr(row, "tenant_id", None)
        label = getattr(row, "name", None) or getattr(row, "title", None) or ""
        if owner != tenant.id or not str(label).startswith(f"{tenant.id}-"):
            leaked.append(row)
    return leaked


async def _admin_rows(admin: AsyncEngine, table: Table) -> list[Any]:
    async with admin.connect() as conn:
        return list((await conn.execute(select(table).order_by(*table.primary_key))).all())


async def _admin_count(admin: AsyncEngine, table: Table, tenant: Tenant) -> int:
    async with admin.connect() as conn:
        count = await conn.scalar(
            select(func.count()).select_from(table).where(table.c.tenant_id == tenant.id)
        )
    return int(count or 0)


async def _unchanged(admin: AsyncEngine) -> bool:
    seed = seed_rows()
    projects = [dict(r._mapping) for r in await _admin_rows(admin, PROJECTS)]
    tasks = [dict(r._mapping) for r in await _admin_rows(admin, TASKS)]
    key = lambda r: (r["tenant_id"], r["id"])  # noqa: E731
    return sorted(projects, key=key) == sorted(seed["projects"], key=key) and sorted(
        tasks, key=key
    ) == sorted(seed["tasks"], key=key)


class _StatementLog:
    """Every statement the engine really sent (after_cursor_execute)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.statements: list[str] = []
        event.listen(engine.sync_engine, "after_cursor_execute", self._record)

    def _record(self, conn: Connection, cursor: Any, statement: str, *args: Any) -> None:
        self.statements.append(statement)


# -- case 1: reads -------------------------------------------------------------------------


async def test_reads_counts_aggregates_and_pages_see_only_own_rows(db: TenantDatabase) -> None:
    for tenant in (ACME, GLOBEX):
        async with tenant_scope(tenant), db.session() as s:
            projects = (await s.scalars(select(Project).order_by(Project.id))).all()
            count = await s.scalar(select(func.count()).select_from(Project))
            total = await s.scalar(select(func.sum(Task.id)))
            page = (await s.scalars(select(Project).order_by(Project.id).limit(5).offset(15))).all()
            by_id = (await s.scalars(select(Project).where(Project.id == 1))).all()
        assert foreign_rows(projects, tenant) == []
        assert len(projects) == count == ROWS_PER_TENANT
        assert total == sum(range(1, ROWS_PER_TENANT + 1))
        assert [p.id for p in page] == [16, 17, 18, 19, 20]
        assert foreign_rows(page, tenant) == []
        assert len(by_id) == 1
        assert foreign_rows(by_id, tenant) == []


async def test_joins_subqueries_and_ctes_see_only_own_rows(db: TenantDatabase) -> None:
    async with tenant_scope(GLOBEX), db.session() as s:
        joined = (await s.execute(select(Task, Project).join(Task.project))).all()
        explicit = (
            await s.execute(
                select(Task, Project).join(
                    Project, (Project.id == Task.project_id) & (Project.id == Task.project_id)
                )
            )
        ).all()
        inner = select(Task.project_id).where(Task.id > 10)
        sub = (await s.scalars(select(Project).where(Project.id.in_(inner)))).all()
        cte = select(Task.id, Task.title).cte("own_tasks")
        via_cte = (await s.execute(select(cte.c.title))).scalars().all()
        counts = select(Task.project_id, func.count().label("n")).group_by(Task.project_id)
        grouped = (await s.execute(counts)).all()
    assert len(joined) == ROWS_PER_TENANT
    for task, project in [*joined, *explicit]:
        assert foreign_rows([task, project], GLOBEX) == []
    assert len(explicit) == ROWS_PER_TENANT
    assert sub
    assert foreign_rows(sub, GLOBEX) == []
    assert len(via_cte) == ROWS_PER_TENANT
    assert all(t.startswith("globex-") for t in via_cte)
    assert sum(n for _, n in grouped) == ROWS_PER_TENANT


async def test_relationship_loads_stay_in_tenant(db: TenantDatabase) -> None:
    async with tenant_scope(ACME), db.session() as s:
        project = await s.get(Project, ("acme", 1))
        assert project is not None
        lazy = await s.run_sync(lambda _: list(project.tasks))
        selectin = (await s.scalars(select(Project).options(selectinload(Project.tasks)))).all()
        joined = (
            (await s.scalars(select(Project).options(joinedload(Project.tasks)).limit(3)))
            .unique()
            .all()
        )
        subq = (await s.scalars(select(Project).options(subqueryload(Project.tasks)))).all()
        parent = (await s.scalars(select(Task).where(with_parent(project, Project.tasks)))).all()
        task = await s.get(Task, ("acme", 7))
        assert task is not None
        owner = await s.run_sync(lambda _: task.project)
    assert lazy
    assert foreign_rows(lazy, ACME) == []
    for loaded in (selectin, joined, subq):
        tasks = [t for p in loaded for t in p.tasks]
        assert tasks
        assert foreign_rows(tasks, ACME) == []
        assert foreign_rows(loaded, ACME) == []
    assert sorted(t.id for t in parent) == sorted(t.id for t in lazy)
    assert foreign_rows([owner], ACME) == []


async def test_a_cached_statement_binds_each_tenant_anew(db: TenantDatabase) -> None:
    statement = select(Project).where(Project.id <= 3)
    seen = {}
    for tenant in (ACME, GLOBEX, ACME):
        async with tenant_scope(tenant), db.session() as s:
            rows = (await s.scalars(statement)).all()
        assert foreign_rows(rows, tenant) == []
        seen[tenant.id] = len(rows)
    assert seen == {"acme": 3, "globex": 3}


# -- case 2 and 3: other tenants' keys, bulk statements --------------------------------------


async def test_another_tenants_row_by_key_is_not_found(
    db: TenantDatabase, admin: AsyncEngine
) -> None:
    async with tenant_scope(ACME), db.session() as s:
        assert await s.get(Project, ("globex", 1)) is None
        where = (Project.tenant_id == "globex") & (Project.id == 1)
        updated = await s.execute(update(Project).where(where).values(name="pwned"))
        deleted = await s.execute(delete(Task).where(Task.tenant_id == "globex"))
        await s.commit()
    assert updated.rowcount == 0  # type: ignore[attr-defined]
    assert deleted.rowcount == 0  # type: ignore[attr-defined]
    assert await _unchanged(admin)


async def test_bulk_update_and_delete_touch_only_own_rows(
    db: TenantDatabase, admin: AsyncEngine
) -> None:
    async with tenant_scope(ACME), db.session() as s:
        updated = await s.execute(update(Task).values(title="acme-bulk"))
        deleted = await s.execute(delete(Project).where(Project.id > 100))
        removed = await s.execute(delete(Task).where(Task.id > 10))
        await s.commit()
    assert updated.rowcount == ROWS_PER_TENANT  # type: ignore[attr-defined]
    assert deleted.rowcount == 0  # type: ignore[attr-defined]
    assert removed.rowcount == ROWS_PER_TENANT - 10  # type: ignore[attr-defined]
    rows = await _admin_rows(admin, TASKS)
    assert [r.title for r in rows if r.tenant_id == "acme"] == ["acme-bulk"] * 10
    globex = [r for r in rows if r.tenant_id == "globex"]
    assert len(globex) == ROWS_PER_TENANT
    assert all(r.title.startswith("globex-task-") for r in globex)


# -- case 4: forged and changed tenant values ---------------------------------------------


async def test_forged_inserts_are_rejected(db: TenantDatabase, admin: AsyncEngine) -> None:
    async with tenant_scope(ACME), db.session() as s:
        s.add(Project(tenant_id="globex", id=99, name="forged"))
        with pytest.raises(TenantContextError):
            await s.flush()
    async with tenant_scope(ACME), db.session() as s:
        with pytest.raises(TenantContextError):
            await s.execute(insert(Project).values(tenant_id="globex", id=98, name="forged"))
        rows = [{"id": 97, "name": "a"}, {"tenant_id": "globex", "id": 96, "name": "b"}]
        with pytest.raises(TenantContextError):
            await s.execute(insert(Project), rows)
        with pytest.raises(TenantContextError):
            await s.execute(
                insert(Project).from_select(["tenant_id", "id", "name"], select(Project))
            )
    assert await _unchanged(admin)


async def test_upserts_that_update_are_rejected(
    backend: Backend, db: TenantDatabase, admin: AsyncEngine
) -> None:
    dialect_insert = postgresql.insert if backend.name == "postgresql" else sqlite.insert
    upsert = dialect_insert(Project).values(id=1, name="pwned")
    async with tenant_scope(ACME), db.session() as s:
        with pytest.raises(TenantContextError):
            await s.execute(
                upsert.on_conflict_do_update(
                    index_elements=["tenant_id", "id"], set_={"tenant_id": "globex"}
                )
            )
        await s.execute(upsert.on_conflict_do_nothing())
        await s.commit()
    assert await _unchanged(admin)


async def test_inserts_are_stamped(db: TenantDatabase, admin: AsyncEngine) -> None:
    async with tenant_scope(GLOBEX), db.session() as s:
        s.add(Project(id=500, name="globex-added"))
        s.add(Task(id=500, project_id=500, title="globex-cascade"))
        await s.execute(insert(Project), [{"id": 501, "name": "a"}, {"id": 502, "name": "b"}])
        await s.execute(insert(Project).values(id=503, name="c"))
        await s.commit()
    rows = [r for r in await _admin_rows(admin, PROJECTS) if r.id >= 500]
    assert [(r.tenant_id, r.id) for r in rows] == [("globex", i) for i in range(500, 504)]
    assert await _admin_count(admin, TASKS, GLOBEX) == ROWS_PER_TENANT + 1


async def test_the_tenant_of_a_row_cannot_change(db: TenantDatabase, admin: AsyncEngine) -> None:
    async with tenant_scope(ACME), db.session() as s:
        project = await s.get(Project, ("acme", 2))
        assert project is not None
        project.tenant_id = "globex"
        with pytest.raises(TenantContextError):
            await s.flush()
    async with tenant_scope(ACME), db.session() as s:
        with pytest.raises(TenantContextError):
            await s.execute(update(Project).values(tenant_id="globex"))
        with pytest.raises(TenantContextError):
            await s.execute(update(Project).values({Project.tenant_id: "acme"}))
        with pytest.raises(TenantContextError):
            await s.execute(update(Project), [{"tenant_id": "globex", "id": 1, "name": "x"}])
    assert await _unchanged(admin)


async def test_an_object_of_another_tenant_cannot_be_written(
    db: TenantDatabase, admin: AsyncEngine
) -> None:
    async with tenant_scope(GLOBEX), db.session() as s:
        theirs = await s.get(Project, ("globex", 3))
        task = await s.get(Task, ("globex", 3))
    assert theirs is not None
    assert task is not None
    async with tenant_scope(ACME), db.session() as s:
        with pytest.raises(SessionTenantMismatch):  # stamped as globex's when loaded
            await s.merge(theirs, load=False)
        with pytest.raises(SessionTenantMismatch):
            s.add(task)
    # Built by hand, never loaded, so not stamped: the flush refuses it instead.
    forged_project = Project(tenant_id="globex", id=3, name="globex-project-3")
    forged_task = Task(tenant_id="globex", id=3, project_id=4, title="globex-task-3")
    make_transient_to_detached(forged_project)
    make_transient_to_detached(forged_task)
    async with tenant_scope(ACME), db.session() as s:
        merged = await s.merge(forged_project, load=False)
        merged.name = "pwned"
        with pytest.raises(TenantContextError):
            await s.flush()
    async with tenant_scope(ACME), db.session() as s:
        s.add(forged_task)
        await s.delete(forged_task)
        with pytest.raises(TenantContextError):
            await s.flush()
    assert await _unchanged(admin)


async def test_an_expired_object_is_checked_against_the_database(
    backend: Backend, admin: AsyncEngine
) -> None:
    database = TenantDatabase(
        backend.app_url, scoping_strategy(), session_options={"expire_on_commit": True}
    )
    await database.validate()
    async with tenant_scope(ACME), database.session() as s:
        project = await s.get(Project, ("acme", 4))
        assert project is not None
        await s.commit()  # expires every attribute, the tenant column included
        project.name = "acme-renamed"
        await s.commit()
    await database.dispose()
    names = {(r.tenant_id, r.id): r.name for r in await _admin_rows(admin, PROJECTS)}
    assert names[("acme", 4)] == "acme-renamed"
    assert names[("globex", 4)] == "globex-project-4"


# -- case 5: raw SQL -------------------------------------------------------------------------


async def test_raw_sql_is_refused_in_a_scope(db: TenantDatabase, admin: AsyncEngine) -> None:
    log = _StatementLog(db.engine)
    async with tenant_scope(ACME), db.session() as s:
        with pytest.raises(UnsafeQuery) as refused:
            await s.execute(text("SELECT name FROM projects"))
        assert refused.value.reason == "raw_sql"
        with pytest.raises(UnsafeQuery):
            await s.execute(text("UPDATE projects SET name = 'pwned'"))
        with pytest.raises(UnsafeQuery) as core:
            await s.execute(select(PROJECTS))
        assert core.value.reason == "core_statement"
        with pytest.raises(UnsafeQuery):  # a Core write that reads another tenant table
            await s.execute(update(TASKS).where(TASKS.c.id.in_(select(PROJECTS.c.id))))
        conn = await s.connection()
        with pytest.raises(UnsafeQuery):
            await conn.execute(text("DELETE FROM tasks"))
        with pytest.raises(UnsafeQuery):
            await conn.exec_driver_sql("DELETE FROM tasks")
        with pytest.raises(UnsafeQuery):
            await conn.execute(select(Project))  # the ORM statement without the session
        currencies = (await s.execute(select(Base.metadata.tables["currencies"]))).all()
    assert len(currencies) == 2  # shared tables stay readable through Core
    assert not any("pwned" in st or "DELETE" in st for st in log.statements)
    assert await _unchanged(admin)


async def test_raw_sql_in_a_flush_hook_is_refused(db: TenantDatabase, admin: AsyncEngine) -> None:
    def hook(session: Any, flush_context: Any, instances: Any) -> None:
        session.connection().exec_driver_sql("DELETE FROM tasks")

    async with tenant_scope(ACME), db.session() as s:
        event.listen(s.sync_session, "before_flush", hook)
        s.add(Project(id=650, name="acme-hooked"))
        with pytest.raises(UnsafeQuery):
            await s.flush()
    assert await _unchanged(admin)


async def test_the_engine_itself_is_refused_in_a_scope(db: TenantDatabase) -> None:
    async with tenant_scope(ACME):
        async with db.engine.connect() as conn:
            with pytest.raises(UnsafeQuery):
                await conn.execute(select(Project))
        plain = AsyncSession(db.engine)
        with pytest.raises(UnsafeQuery):
            await plain.execute(select(Project))
        await plain.close()
    with central_scope(reason="test"):
        async with db.engine.connect() as conn:
            with pytest.raises(UnsafeQuery):
                await conn.execute(text("SELECT count(*) FROM projects"))


async def test_allow_unscoped_runs_a_statement_the_caller_confined(db: TenantDatabase) -> None:
    confined = allow_unscoped(
        text("SELECT name FROM projects WHERE tenant_id = :tenant ORDER BY id")
    )
    async with tenant_scope(GLOBEX), db.session() as s:
        names = (await s.execute(confined, {"tenant": "globex"})).scalars().all()
    assert len(names) == ROWS_PER_TENANT
    assert all(n.startswith("globex-") for n in names)


# -- issue 9, case 8: smuggled criteria ----------------------------------------------------


async def test_smuggled_criteria_stay_inside_the_tenant(db: TenantDatabase) -> None:
    async with tenant_scope(ACME), db.session() as s:
        with pytest.raises(UnsafeQuery):
            await s.execute(select(Project).where(text("1=1 OR 1=1")))
        with pytest.raises(UnsafeQuery):
            await s.execute(select(Project).where(literal_column("1=1 OR 1=1")))
        with pytest.raises(UnsafeQuery):
            await s.execute(select(Project).filter_by(id=1).where(text("true")).limit(1))
        alias = PROJECTS.alias("p2")
        with pytest.raises(UnsafeQuery):
            await s.execute(select(Project).join(alias, alias.c.id == Project.id))
        with pytest.raises(UnsafeQuery):
            await s.execute(select(Project.name, TASKS.c.title))
        smuggled_op = Project.id.op("= 0 OR 1 = 1 OR projects.id =", precedence=100)(1)
        with pytest.raises(UnsafeQuery):
            await s.execute(select(Project).where(smuggled_op))
        verbatim = column(quoted_name("1 = 1 OR 1 = 1", quote=False))
        with pytest.raises(UnsafeQuery):
            await s.execute(select(Project).where(verbatim))
        with pytest.raises(UnsafeQuery):
            await s.execute(select(Project).suffix_with("OR 1 = 1"))
        with pytest.raises(UnsafeQuery):
            await s.execute(select(Project).with_statement_hint("OR 1 = 1"))
        other_task = aliased(Task)
        with pytest.raises(UnsafeQuery):
            await s.execute(select(other_task.title, TASKS.c.title))
        with pytest.raises(UnsafeQuery):
            await s.execute(insert(Project).prefix_with("OR REPLACE").values(id=1, name="x"))
        ordered = (await s.scalars(select(Project).where(Project.id.op("<=")(3)))).all()
        assert len(ordered) == 3
        sneaky = Project.tasks.and_(Task.project_id.in_(select(PROJECTS.c.id)))
        with pytest.raises(UnsafeQuery):
            await s.execute(select(Project).options(selectinload(sneaky)))
        with pytest.raises(UnsafeQuery):  # an unfiltered subquery under a filtered entity
            await s.execute(select(Project).where(Project.id.in_(select(PROJECTS.c.id))))
        oracle = exists(select(PROJECTS.c.id).where(PROJECTS.c.name == "globex-project-1"))
        with pytest.raises(UnsafeQuery):
            await s.execute(select(Project).where(oracle))
        with pytest.raises(UnsafeQuery):
            await s.execute(select(Project).options(with_loader_criteria(Task, text("1=1"))))
        with pytest.raises(UnsafeQuery):
            await s.execute(select(Project).join(Project.tasks.and_(text("1=1 OR 1=1"))))
        beside = aliased(Project)
        with pytest.raises(UnsafeQuery):
            await s.execute(select(beside).join(PROJECTS, true()))
        ored = (
            await s.scalars(select(Project).where(or_(Project.tenant_id == "globex", true())))
        ).all()
        other = aliased(Project)
        via_alias = (await s.scalars(select(other).where(or_(other.id > 0, true())))).all()
        union = union_all(
            select(Project.name).where(Project.tenant_id == "globex"),
            select(Project.name).where(or_(Project.id > 0, Project.tenant_id != "acme")),
        )
        unioned = (await s.execute(union)).scalars().all()
        from_union = aliased(
            Project, union_all(select(Project), select(Project).where(true())).subquery()
        )
        rows = (await s.scalars(select(from_union))).all()
    assert len(ored) == len(via_alias) == ROWS_PER_TENANT
    assert foreign_rows([*ored, *via_alias, *rows], ACME) == []
    assert len(unioned) == ROWS_PER_TENANT
    assert all(n.startswith("acme-") for n in unioned)


async def test_aliases_named_only_by_columns_and_any_has_stay_inside_the_tenant(
    db: TenantDatabase,
) -> None:
    other = aliased(Task)
    async with tenant_scope(ACME), db.session() as s:
        titles = (await s.scalars(select(other.title))).all()
        named = select(Project.name).where(Project.id == other.project_id, other.id <= 5)
        joined = (await s.scalars(named)).all()
        theirs = select(Project).where(Project.tasks.any(Task.title.like("globex-%")))
        none = (await s.scalars(theirs)).all()
        mine = select(Task).where(Task.project.has(Project.name == "acme-project-2"))
        owned = (await s.scalars(mine)).all()
        with pytest.raises(UnsafeQuery):  # the aliased entity beside its raw table
            await s.execute(select(func.count()).select_from(other).select_from(TASKS))
    assert len(titles) == ROWS_PER_TENANT
    assert all(t.startswith("acme-") for t in titles)
    assert len(joined) == 5
    assert all(n.startswith("acme-") for n in joined)
    assert none == []
    assert sorted(t.id for t in owned) == [1, 6, 11, 16]
    assert foreign_rows(owned, ACME) == []


# -- issue 9, case 13: unregistered tables -------------------------------------------------


async def test_unregistered_tables_are_refused_in_a_scope(db: TenantDatabase) -> None:
    stray = Table("audit_log", MetaData(), Column("id", Integer, primary_key=True))
    async with tenant_scope(ACME), db.session() as s:
        with pytest.raises(UnsafeQuery) as refused:
            await s.execute(select(stray))
        assert refused.value.reason == "unregistered_table"


async def test_validate_refuses_unclassified_tables_without_touching_the_database() -> None:
    metadata = MetaData()
    Table("orders", metadata, Column("tenant_id", String(63), nullable=False))
    Table("audit_log", metadata, Column("id", Integer, primary_key=True))
    Table("plans", metadata, Column("tenant_id", String(63)))
    strategy = QueryScoping(metadata=metadata, shared_tables={"plans", "regions"})
    codes = sorted(f.code for f in strategy.check_metadata())
    assert codes == ["Q001", "Q002", "Q003"]
    # An unreachable database: validate() reads only configuration.
    unreachable = "sqlite+aiosqlite:////nonexistent/dir/tenancy.db"
    database = TenantDatabase(unreachable, strategy)
    with pytest.raises(IsolationConfigError, match="Q001"):
        await database.validate()
    with tenant_scope(ACME), pytest.raises(DatabaseNotValidated):
        async with database.session():
            pass  # pragma: no cover
    good = TenantDatabase(unreachable, scoping_strategy())
    await good.validate()
    assert good.validated
    await database.dispose()
    await good.dispose()


def test_strategy_needs_metadata() -> None:
    with pytest.raises(IsolationConfigError):
        QueryScoping(metadata=None)  # type: ignore[arg-type]


# -- case 6: commit and rollback ---------------------------------------------------------------


async def test_still_scoped_after_commit_and_rollback(
    db: TenantDatabase, admin: AsyncEngine
) -> None:
    async with tenant_scope(ACME), db.session() as s:
        assert await s.scalar(select(func.count()).select_from(Project)) == ROWS_PER_TENANT
        await s.commit()
        after_commit = (await s.scalars(select(Project))).all()
        assert len(after_commit) == ROWS_PER_TENANT
        assert foreign_rows(after_commit, ACME) == []
        with pytest.raises(UnsafeQuery):
            await s.execute(text("SELECT name FROM projects"))
        await s.rollback()
        after_rollback = (await s.scalars(select(Task))).all()
        assert len(after_rollback) == ROWS_PER_TENANT
        assert foreign_rows(after_rollback, ACME) == []
        s.add(Project(id=600, name="acme-after"))
        await s.commit()
        assert (await s.get(Project, ("globex", 600))) is None
    assert await _admin_count(admin, PROJECTS, ACME) == ROWS_PER_TENANT + 1


# -- case 8 and 9: no context, wrong context ---------------------------------------------


async def test_no_context_raises_before_any_sql(db: TenantDatabase) -> None:
    log = _StatementLog(db.engine)
    with pytest.raises(TenantContextError):
        async with db.session():
            pass  # pragma: no cover
    with central_scope(reason="test"), pytest.raises(TenantContextError):
        async with db.session():
            pass  # pragma: no cover
    async with tenant_scope(ACME), db.session() as s:
        await s.get(Project, ("acme", 1))
        leaked = s
    sent = len(log.statements)
    with pytest.raises(SessionTenantMismatch):
        await leaked.execute(select(Project))
    with pytest.raises(SessionTenantMismatch):
        await leaked.get(Project, ("acme", 2))
    assert len(log.statements) == sent == 1
    assert db.engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_session_used_in_another_scope_raises(db: TenantDatabase) -> None:
    async with tenant_scope(ACME), db.session() as s:
        await s.get(Project, ("acme", 1))

        async def other() -> None:
            async with tenant_scope(GLOBEX):
                with pytest.raises(SessionTenantMismatch):
                    await s.get(Project, ("acme", 1))
                with pytest.raises(SessionTenantMismatch):
                    await s.execute(select(Project))
                with pytest.raises(SessionTenantMismatch):
                    s.add(Project(id=700, name="globex-x"))

        await asyncio.create_task(other(), context=contextvars.Context())


# -- case 10: concurrency ------------------------------------------------------------------


async def test_concurrent_tenants_never_see_each_other(
    backend: Backend, admin: AsyncEngine
) -> None:
    # SQLite has one writer at a time: a single connection queues the tasks at the pool
    # instead of in SQLite's busy loop; PostgreSQL serves them on ten.
    size = 10 if backend.name == "postgresql" else 1
    database = await open_database(backend, scoping_strategy(), pool_size=size)
    tenants = (ACME, GLOBEX, INITECH)
    leaks: list[Any] = []

    async def work(i: int) -> None:
        tenant, key = tenants[i % 3], 1000 + i // 3  # the three tenants insert the same keys
        async with tenant_scope(tenant), database.session() as s:
            s.add(Project(id=key, name=f"{tenant.id}-concurrent-{i}"))
            await s.flush()
            same_key = (await s.scalars(select(Project).where(Project.id == key))).all()
            leaks.extend(foreign_rows(same_key, tenant))
            seeded = (await s.scalars(select(Project).where(Project.id <= 3))).all()
            leaks.extend(foreign_rows(seeded, tenant))
            await s.commit()
            tasks = (await s.scalars(select(Task).where(Task.id <= 3))).all()
            leaks.extend(foreign_rows(tasks, tenant))
            counts.append(len(same_key))

    counts: list[int] = []
    async with asyncio.TaskGroup() as group:
        for i in range(500):
            group.create_task(work(i))
    await database.dispose()
    assert leaks == []
    assert counts == [1] * 500
    rows = [r for r in await _admin_rows(admin, PROJECTS) if r.id >= 1000]
    expected = {(tenants[i % 3].id, 1000 + i // 3) for i in range(500)}
    assert {(r.tenant_id, r.id) for r in rows} == expected
    assert len(rows) == 500


# -- case 11: an error mid-transaction -----------------------------------------------------


async def test_error_mid_transaction_then_clean(db: TenantDatabase, admin: AsyncEngine) -> None:
    async with tenant_scope(ACME), db.session() as s:
        s.add(Project(id=800, name="acme-kept-out"))
        await s.flush()
        s.add(Project(id=1, name="acme-duplicate"))
        with pytest.raises(IntegrityError):
            await s.flush()
        await s.rollback()
        rows = (await s.scalars(select(Project))).all()
        assert len(rows) == ROWS_PER_TENANT
        assert foreign_rows(rows, ACME) == []
    async with tenant_scope(GLOBEX), db.session() as s:
        rows = (await s.scalars(select(Project))).all()
    assert len(rows) == ROWS_PER_TENANT
    assert foreign_rows(rows, GLOBEX) == []
    assert await _unchanged(admin)


# -- the suite can fail --------------------------------------------------------------------


class _Leaky(QueryScoping):
    """A deliberately broken configuration: sessions get no criteria and no guard."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.criteria = None
        self.statement_guard = None


async def test_the_leak_check_catches_a_leaky_configuration(
    backend: Backend, admin: AsyncEngine
) -> None:
    leaky = await open_database(
        backend, _Leaky(metadata=Base.metadata, shared_tables={"currencies"})
    )
    async with tenant_scope(ACME), leaky.session() as s:
        rows = (await s.scalars(select(Project))).all()
        raw = (await s.execute(text("SELECT tenant_id, id, title FROM tasks"))).all()
        s.add(Project(tenant_id="globex", id=900, name="forged"))
        await s.commit()
    assert len(foreign_rows(rows, ACME)) == ROWS_PER_TENANT  # reads
    assert len(foreign_rows(raw, ACME)) == ROWS_PER_TENANT  # raw SQL
    assert not await _unchanged(admin)  # writes
    async with admin.begin() as conn:
        await conn.execute(delete(PROJECTS).where(PROJECTS.c.id == 900))
    async with tenant_scope(ACME), leaky.session() as s:
        await s.execute(text("UPDATE tasks SET title = 'pwned'"))
        await s.commit()
    await leaky.dispose()
    assert not await _unchanged(admin)  # raw writes


# -- suite II, cases 4, 7, 9: objects, keys across tenants, results after the scope -------


async def test_identity_map_objects_never_cross_tenants(
    db: TenantDatabase, admin: AsyncEngine
) -> None:
    async with AsyncExitStack() as stack:
        async with tenant_scope(ACME):
            a = await stack.enter_async_context(db.session())
            mine = await a.get(Project, ("acme", 1))
            assert mine is not None
            await a.commit()
        async with tenant_scope(GLOBEX), db.session() as b:
            assert await b.get(Project, ("acme", 1)) is None
            with pytest.raises(SessionTenantMismatch):
                await a.refresh(mine)
            with pytest.raises(SessionTenantMismatch):
                await a.run_sync(lambda _: list(mine.tasks))
            await a.close()
            mine.name = "written-from-globex"
            with pytest.raises(SessionTenantMismatch):
                b.add(mine)
            with pytest.raises(SessionTenantMismatch):
                await b.merge(mine)
            await b.commit()
    assert await _unchanged(admin)


async def test_a_key_across_tenants_is_excluded_from_every_load(db: TenantDatabase) -> None:
    loads = [None, selectinload(Account.notes), joinedload(Account.notes)]
    loads.append(subqueryload(Account.notes))
    async with tenant_scope(ACME), db.session() as s:
        for option in loads:
            statement = select(Account).where(Account.id == 1)
            if option is not None:
                statement = statement.options(option)
            account = (await s.scalars(statement)).unique().one()
            notes = await s.run_sync(lambda _, a=account: list(a.notes))
            assert [n.body for n in notes] == ["acme-note-own"], option
            s.expunge_all()
        account = await s.get_one(Account, 1)
        parented = (await s.scalars(select(Note).where(with_parent(account, Account.notes)))).all()
        assert [n.body for n in parented] == ["acme-note-own"]
    async with tenant_scope(GLOBEX), db.session() as s:
        across = await s.get_one(Note, 12)  # globex's own note, on acme's account
        assert await s.run_sync(lambda _: across.account) is None  # the parent is not globex's


async def test_cascaded_children_are_stamped(db: TenantDatabase, admin: AsyncEngine) -> None:
    async with tenant_scope(GLOBEX), db.session() as s:
        s.add(Account(id=900, name="globex-account-900", notes=[Note(id=900, body="globex-n")]))
        await s.flush()
        (await s.get_one(Account, 900)).notes.append(Note(id=901, body="globex-n"))
        await s.commit()
    notes = Base.metadata.tables["notes"]
    async with admin.connect() as conn:
        owners = (await conn.scalars(select(notes.c.tenant_id).where(notes.c.id >= 900))).all()
    assert owners == ["globex", "globex"]


async def test_results_and_streams_used_after_the_scope_raise(db: TenantDatabase) -> None:
    async with AsyncExitStack() as stack:
        async with tenant_scope(ACME):
            s = await stack.enter_async_context(db.session())
            stream = await s.stream_scalars(select(Project.name).execution_options(yield_per=2))
            first = await stream.fetchmany(2)
            project = await s.get_one(Project, ("acme", 1))
        assert len(first) == 2
        with pytest.raises(SessionTenantMismatch):
            await stream.fetchmany(2)
        with pytest.raises(SessionTenantMismatch):
            await s.run_sync(lambda _: list(project.tasks))


def test_the_shape_cache_never_lends_a_safe_shape_to_a_smuggled_statement() -> None:
    from asgi_tenancy.sqlalchemy.query_scoping.shape import cached_shape as _cached_shape

    pairs = [
        (Project.name.op("~")("x"), Project.name.op("OR")("x")),
        (Project.id == 1, literal_column("1 OR 1") == 1),
        (Project.id == 2, text("1=1 OR 1=1")),
    ]
    for benign, smuggled in pairs:
        assert not _cached_shape(select(Project).where(benign)).fragment
        assert not _cached_shape(select(Project).where(benign)).fragment  # from the cache
        assert _cached_shape(select(Project).where(smuggled)).fragment
