"""RowLevelSecurity on a real PostgreSQL, as a role that is not superuser, BYPASSRLS or owner."""

from __future__ import annotations

import asyncio
import contextvars
from contextlib import AsyncExitStack, suppress

import pytest
from sqlalchemy import Column, MetaData, String, Table, delete, event, func, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import joinedload, selectinload, subqueryload, with_parent

from asgi_tenancy import (
    IsolationConfigError,
    SessionTenantMismatch,
    TenancyUnavailable,
    Tenant,
    TenantContextError,
    central_scope,
    tenant_scope,
)
from asgi_tenancy._asgi import problem_response
from asgi_tenancy.errors import DatabaseNotValidated
from asgi_tenancy.sqlalchemy import RowLevelSecurity, TenantDatabase
from tests.adversarial.leaks import assert_no_foreign_rows, assert_no_foreign_writes, foreign_rows
from tests.adversarial.models import ROWS_PER_TENANT, Account, Base, Note, Project, Task
from tests.conftest import PgDatabase

ACME, GLOBEX = Tenant("acme"), Tenant("globex")


@pytest.fixture(scope="module")
def rls_strategy() -> RowLevelSecurity:
    return RowLevelSecurity(metadata=Base.metadata, shared_tables={"currencies"})


async def _admin_count(admin: AsyncEngine, sql: str) -> int:
    async with admin.connect() as conn:
        return int(await conn.scalar(text(sql)) or 0)


async def test_reads_see_only_own_rows(db: TenantDatabase) -> None:
    for tenant in (ACME, GLOBEX):
        async with tenant_scope(tenant), db.session() as s:
            names = (await s.scalars(select(Project.name))).all()
            raw = (await s.execute(text("SELECT name FROM projects"))).scalars().all()
        assert len(names) == ROWS_PER_TENANT
        assert all(n.startswith(f"{tenant.id}-") for n in names)
        assert sorted(raw) == sorted(names)


async def test_the_setting_survives_commit_and_rollback(db: TenantDatabase) -> None:
    async with tenant_scope(ACME), db.session() as s:
        assert await s.scalar(select(func.count()).select_from(Project)) == ROWS_PER_TENANT
        await s.commit()
        assert await s.scalar(text("SELECT count(*) FROM projects")) == ROWS_PER_TENANT
        await s.rollback()
        assert await s.scalar(text("SELECT count(*) FROM projects")) == ROWS_PER_TENANT


async def test_update_of_another_tenants_key_changes_nothing(
    db: TenantDatabase, admin_engine: AsyncEngine
) -> None:
    async with tenant_scope(ACME), db.session() as s:
        result = await s.execute(
            text("UPDATE projects SET name = 'pwned' WHERE tenant_id = 'globex' AND id = 1")
        )
        await s.commit()
    assert result.rowcount == 0  # type: ignore[attr-defined]
    assert (
        await _admin_count(admin_engine, "SELECT count(*) FROM projects WHERE name = 'pwned'") == 0
    )


async def test_forged_insert_is_rejected(db: TenantDatabase, admin_engine: AsyncEngine) -> None:
    async with tenant_scope(ACME), db.session() as s:
        s.add(Project(tenant_id="globex", id=99, name="forged"))
        with pytest.raises(TenantContextError):
            await s.flush()
    async with tenant_scope(ACME), db.session() as s:
        with pytest.raises(DBAPIError, match="row-level security"):
            await s.execute(
                text("INSERT INTO projects (tenant_id, id, name) VALUES ('globex', 98, 'forged')")
            )
    assert await _admin_count(admin_engine, "SELECT count(*) FROM projects WHERE id >= 98") == 0


async def test_inserts_are_stamped(db: TenantDatabase, admin_engine: AsyncEngine) -> None:
    async with tenant_scope(GLOBEX), db.session() as s:
        s.add(Project(id=500, name="stamped"))
        await s.commit()
    async with admin_engine.begin() as conn:
        owner = await conn.scalar(text("SELECT tenant_id FROM projects WHERE id = 500"))
        await conn.execute(text("DELETE FROM projects WHERE id = 500"))
    assert owner == "globex"


async def test_tenant_column_cannot_change(db: TenantDatabase) -> None:
    async with tenant_scope(ACME), db.session() as s:
        project = await s.get(Project, ("acme", 2))
        assert project is not None
        project.tenant_id = "globex"
        with pytest.raises(TenantContextError):
            await s.flush()


async def test_no_context_raises_before_any_connection(db: TenantDatabase) -> None:
    with pytest.raises(TenantContextError):
        async with db.session():
            pass  # pragma: no cover
    assert db.engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    with central_scope(reason="test"), pytest.raises(TenantContextError):
        async with db.session():
            pass  # pragma: no cover


async def test_session_used_in_another_scope_or_after_its_own_raises(db: TenantDatabase) -> None:
    async with tenant_scope(ACME), db.session() as s:
        await s.get(Project, ("acme", 1))
        leaked = s

        async def other() -> None:
            async with tenant_scope(GLOBEX):
                with pytest.raises(SessionTenantMismatch):
                    await leaked.get(Project, ("acme", 1))
                with pytest.raises(SessionTenantMismatch):
                    await leaked.execute(select(Project))

        await asyncio.create_task(other(), context=contextvars.Context())
    with pytest.raises(SessionTenantMismatch):
        await leaked.execute(select(Project))


async def test_pool_reuse_leaves_nothing_behind(db: TenantDatabase) -> None:
    pids = []
    for tenant in (ACME, GLOBEX):
        async with tenant_scope(tenant), db.session() as s:
            pids.append(await s.scalar(text("SELECT pg_backend_pid()")))
            bound = await s.scalar(
                text("SELECT split_part(current_setting('app.tenant_id'), ':', 1)")
            )
            assert bound == tenant.id
    async with db.engine.connect() as conn:
        pids.append(await conn.scalar(text("SELECT pg_backend_pid()")))
        assert await conn.scalar(text("SELECT current_setting('app.tenant_id', true)")) == ""
        with pytest.raises(DBAPIError, match="no tenant is bound"):
            await conn.scalar(text("SELECT count(*) FROM projects"))
    assert len(set(pids)) == 1  # one backend served all three


async def test_validate_refuses_a_superuser(
    rls_database: PgDatabase, rls_strategy: RowLevelSecurity
) -> None:
    database = TenantDatabase(rls_database.admin_url, rls_strategy)
    with pytest.raises(IsolationConfigError, match="R001"):
        await database.validate()
    with tenant_scope(ACME), pytest.raises(DatabaseNotValidated):
        async with database.session():
            pass  # pragma: no cover
    await database.dispose()


async def test_relationship_loads_stay_in_tenant(db: TenantDatabase) -> None:
    async with tenant_scope(ACME), db.session() as s:
        project = await s.get(Project, ("acme", 1))
        assert project is not None
        tasks = await s.run_sync(lambda _: list(project.tasks))
        assert tasks
        assert all(t.title.startswith("acme-") for t in tasks)
        bulk = await s.execute(update(Task).values(title="bulk"))
        await s.rollback()
    assert bulk.rowcount == ROWS_PER_TENANT  # type: ignore[attr-defined]


async def test_aggregates_joins_subqueries_ctes_and_pagination(
    db: TenantDatabase, admin_engine: AsyncEngine
) -> None:
    expected = await _admin_count(
        admin_engine,
        "SELECT (SELECT count(*) FROM tasks WHERE tenant_id = 'globex')"
        " * (SELECT count(*) FROM projects WHERE tenant_id = 'globex')",
    )
    async with tenant_scope(GLOBEX), db.session() as s:
        joined = (await s.execute(select(Project, Task).join(Project.tasks))).all()
        assert len(joined) == ROWS_PER_TENANT
        for project, task in joined:
            assert_no_foreign_rows([project, task], "globex")
        sub = select(Task.project_id).where(Task.title.like("%-task-1%")).scalar_subquery()
        names = (await s.scalars(select(Project.name).where(Project.id.in_(sub)))).all()
        assert_no_foreign_rows(names, "globex")
        cte = select(Project.id, Project.name).cte("p")
        via_cte = (await s.execute(select(cte.c.name).order_by(cte.c.id).limit(5).offset(5))).all()
        assert [r.name for r in via_cte] == [f"globex-project-{i}" for i in range(6, 11)]
        total = await s.scalar(
            text(
                "WITH t AS (SELECT * FROM tasks) "
                "SELECT count(*) FROM t JOIN projects p USING (tenant_id)"
            )
        )
        assert total == expected
        raw_join = (
            await s.execute(text("SELECT t.title FROM tasks t, projects p LIMIT 1000"))
        ).all()
        assert_no_foreign_rows([r.title for r in raw_join], "globex")


async def test_selectin_and_joined_loads_stay_in_tenant(db: TenantDatabase) -> None:
    async with tenant_scope(ACME), db.session() as s:
        for option in (selectinload(Project.tasks), joinedload(Project.tasks)):
            projects = (await s.scalars(select(Project).options(option))).unique().all()
            assert len(projects) == ROWS_PER_TENANT
            tasks = [t for p in projects for t in p.tasks]
            assert len(tasks) == ROWS_PER_TENANT
            assert_no_foreign_rows(tasks, "acme")
            s.expunge_all()


async def test_get_update_delete_another_tenants_key_find_nothing(
    db: TenantDatabase, admin_engine: AsyncEngine
) -> None:
    async with tenant_scope(ACME), db.session() as s:
        assert await s.get(Project, ("globex", 3)) is None
        deleted = await s.execute(delete(Task).where(Task.tenant_id == "globex"))
        updated = await s.execute(
            update(Project).where(Project.tenant_id == "globex").values(name="x")
        )
        await s.commit()
    assert deleted.rowcount == 0  # type: ignore[attr-defined]
    assert updated.rowcount == 0  # type: ignore[attr-defined]
    globex = "SELECT count(*) FROM tasks WHERE tenant_id = 'globex'"
    assert await _admin_count(admin_engine, globex) == ROWS_PER_TENANT


async def test_bulk_update_and_delete_touch_only_own_rows(
    db: TenantDatabase, admin_engine: AsyncEngine
) -> None:
    async with tenant_scope(ACME), db.session() as s:
        await s.execute(text("UPDATE tasks SET title = title || '!'"))
        await s.execute(delete(Task).where(Task.id > 15))
        await s.rollback()  # read back the effect inside, then leave the data as it was
    async with tenant_scope(ACME), db.session() as s:
        await s.execute(text("UPDATE tasks SET title = title || '!' WHERE id = 1"))
        await s.commit()
    async with admin_engine.begin() as conn:
        changed = (
            (await conn.execute(text("SELECT tenant_id FROM tasks WHERE title LIKE '%!'")))
            .scalars()
            .all()
        )
        await conn.execute(text("UPDATE tasks SET title = rtrim(title, '!')"))
    assert changed == ["acme"]


async def test_error_mid_transaction_leaves_the_next_one_clean(db: TenantDatabase) -> None:
    async with tenant_scope(ACME), db.session() as s:
        with pytest.raises(DBAPIError):
            await s.execute(text("SELECT 1/0"))
        await s.rollback()
        assert await s.scalar(text("SELECT count(*) FROM projects")) == ROWS_PER_TENANT
    async with tenant_scope(GLOBEX), db.session() as s:
        names = (await s.execute(text("SELECT name FROM projects"))).scalars().all()
    assert len(names) == ROWS_PER_TENANT
    assert_no_foreign_rows(names, "globex")


async def test_cancelled_task_and_killed_backend_fail_cleanly(
    db: TenantDatabase, admin_engine: AsyncEngine
) -> None:
    started = asyncio.Event()

    async def slow() -> None:
        async with tenant_scope(ACME), db.session() as s:
            await s.execute(text("SELECT count(*) FROM projects"))
            started.set()
            await s.execute(text("SELECT pg_sleep(30)"))

    task = asyncio.create_task(slow())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    async with tenant_scope(GLOBEX), db.session() as s:
        pid = await s.scalar(text("SELECT pg_backend_pid()"))
        async with admin_engine.connect() as admin:
            await admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        with pytest.raises(DBAPIError):
            await s.execute(text("SELECT count(*) FROM projects"))

    async with tenant_scope(GLOBEX), db.session() as s:
        names = (await s.execute(text("SELECT name FROM projects"))).scalars().all()
    assert len(names) == ROWS_PER_TENANT
    assert_no_foreign_rows(names, "globex")


async def test_concurrent_tasks_across_three_tenants_see_only_their_rows(
    rls_database: PgDatabase, rls_strategy: RowLevelSecurity
) -> None:
    database = TenantDatabase(
        rls_database.app_url, rls_strategy, engine_options={"pool_size": 8, "max_overflow": 0}
    )
    await database.validate()
    tenants = [ACME, GLOBEX, Tenant("initech")]
    foreign = 0

    async def request(i: int) -> int:
        tenant = tenants[i % 3]
        async with tenant_scope(tenant), database.session() as s:
            first = (await s.execute(text("SELECT name FROM projects"))).scalars().all()
            await asyncio.sleep(0)
            second = (await s.scalars(select(Project.name).where(Project.id <= 3))).all()
            return len(foreign_rows([*first, *second], tenant.id))

    try:
        foreign = sum(await asyncio.gather(*(request(i) for i in range(500))))
    finally:
        await database.dispose()
    assert foreign == 0


async def test_the_leak_check_catches_a_leaky_configuration(
    rls_database: PgDatabase, admin_engine: AsyncEngine, rls_strategy: RowLevelSecurity
) -> None:
    """A table without a policy is what a forgotten migration looks like: the check must fire.

    Its owner column is not named ``tenant_id``, so ``validate()`` (R015) cannot spot it either.
    """
    async with admin_engine.begin() as conn:
        await conn.execute(
            text(
                "CREATE TABLE IF NOT EXISTS leaky AS"
                " SELECT tenant_id AS owner_id, id, name FROM projects"
            )
        )
        await conn.execute(text("GRANT SELECT, UPDATE ON leaky TO tenancy_app"))
    database = TenantDatabase(rls_database.app_url, rls_strategy)
    await database.validate()  # leaky is not in the metadata: validate cannot know it
    try:
        async with tenant_scope(ACME), database.session() as s:
            rows = (await s.execute(text("SELECT name FROM leaky"))).scalars().all()
    finally:
        await database.dispose()
    assert foreign_rows(rows, "acme")
    with pytest.raises(AssertionError):
        assert_no_foreign_rows(rows, "acme")
    # Writes through raw SQL: the admin read-back must see globex's rows changed by acme.
    database = TenantDatabase(rls_database.app_url, rls_strategy)
    await database.validate()
    try:
        async with tenant_scope(ACME), database.session() as s:
            await s.execute(text("UPDATE leaky SET name = 'acme-wrote' WHERE id = 1"))
            await s.commit()
    finally:
        await database.dispose()
    with pytest.raises(AssertionError):
        await assert_no_foreign_writes(
            admin_engine, "leaky", "acme", "acme-wrote", column="owner_id"
        )
    async with admin_engine.begin() as conn:
        await conn.execute(text("DROP TABLE leaky"))


async def test_validate_refuses_each_unsafe_set_up(
    rls_database: PgDatabase, admin_engine: AsyncEngine, rls_strategy: RowLevelSecurity
) -> None:
    meta = MetaData()
    for name in ("bad_owned", "bad_unforced", "bad_nocheck", "bad_nopolicy", "bad_permissive"):
        Table(name, meta, Column("tenant_id", String, primary_key=True))
    strategy = RowLevelSecurity(metadata=meta)
    async with admin_engine.begin() as conn:
        await conn.execute(
            text(
                "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tenancy_bypass')"
                " THEN CREATE ROLE tenancy_bypass LOGIN NOSUPERUSER BYPASSRLS; END IF; END $$"
            )
        )
        await conn.execute(
            text("GRANT CONNECT ON DATABASE " + rls_database.name + " TO tenancy_bypass")
        )
        await conn.run_sync(meta.create_all)
        for statement in strategy.ddl():
            await conn.execute(text(statement))
        await conn.execute(text("ALTER TABLE bad_owned OWNER TO tenancy_app"))
        await conn.execute(text("ALTER TABLE bad_unforced NO FORCE ROW LEVEL SECURITY"))
        await conn.execute(text("DROP POLICY tenancy_isolation ON bad_nocheck"))
        await conn.execute(
            text(
                "CREATE POLICY p ON bad_nocheck USING "
                "(tenant_id = (SELECT public.tenancy_current_tenant()))"
            )
        )
        await conn.execute(text("DROP POLICY tenancy_isolation ON bad_nopolicy"))
        await conn.execute(text("CREATE POLICY open ON bad_permissive USING (true)"))
        # Not in the metadata: a table a migration created by hand, reachable, unprotected.
        await conn.execute(text("CREATE TABLE bad_unlisted (tenant_id text, body text)"))
    database = TenantDatabase(rls_database.app_url, strategy)
    with pytest.raises(IsolationConfigError) as info:
        await database.validate()
    await database.dispose()
    message = str(info.value)
    for code, table in (
        ("R003", "bad_owned"),
        ("R005", "bad_unforced"),
        ("R007", "bad_nocheck"),
        ("R006", "bad_nopolicy"),
        ("A002", "bad_permissive"),
        ("R015", "public.bad_unlisted"),
    ):
        assert f"[{code}] {table}" in message
    bypass_url = make_url(rls_database.app_url).set(username="tenancy_bypass", password=None)
    bypass = TenantDatabase(bypass_url, rls_strategy)
    with pytest.raises(IsolationConfigError, match="R002"):
        await bypass.validate()
    await bypass.dispose()
    async with admin_engine.begin() as conn:
        await conn.run_sync(meta.drop_all)
        await conn.execute(text("DROP TABLE bad_unlisted"))


async def test_unsigned_binding_can_be_rewritten_by_raw_sql(db: TenantDatabase) -> None:
    """Documents the hole that ``signed=True`` closes: unsigned, the setting is only a setting."""
    if getattr(db.strategy, "signed", False):
        return  # the signed module runs this file's tests too; see test_rls_signed.py
    async with tenant_scope(ACME), db.session() as s:
        await s.execute(text("SELECT set_config('app.tenant_id', 'globex', true)"))
        rows = (await s.execute(text("SELECT name FROM projects"))).scalars().all()
    assert foreign_rows(rows, "acme")


@pytest.mark.parametrize(
    "leftover",
    [
        "SELECT set_config('app.tenant_id', current_setting('app.tenant_id'), false)",
        "SET app.tenant_id = 'acme'",
        "SET search_path = pg_catalog",
    ],
)
async def test_session_state_left_by_raw_sql_is_not_inherited(
    db: TenantDatabase, leftover: str
) -> None:
    async with tenant_scope(ACME), db.session() as s:
        first_pid = await s.scalar(text("SELECT pg_backend_pid()"))
        await s.execute(text(leftover))
        await s.commit()
    async with db.engine.connect() as conn:  # the next checkout, for no tenant (pool_size=1)
        assert await conn.scalar(text("SELECT pg_backend_pid()")) != first_pid
        assert await conn.scalar(text("SELECT current_setting('app.tenant_id', true)")) in (
            "",
            None,
        )
        with pytest.raises(DBAPIError, match="no tenant is bound"):
            await conn.scalar(text("SELECT count(*) FROM projects"))
    async with tenant_scope(GLOBEX), db.session() as s:
        names = (await s.execute(text("SELECT name FROM projects"))).scalars().all()
    assert_no_foreign_rows(names, "globex")


async def test_central_work_goes_through_the_admin_engine_only(
    rls_database: PgDatabase, rls_strategy: RowLevelSecurity
) -> None:
    admin = create_async_engine(rls_database.admin_url)
    database = TenantDatabase(rls_database.app_url, rls_strategy, admin_engine=admin)
    await database.validate()
    try:
        with pytest.raises(TenantContextError):
            async with database.admin_session():
                pass  # pragma: no cover
        async with tenant_scope(ACME):
            with pytest.raises(TenantContextError):
                async with database.admin_session():
                    pass  # pragma: no cover
        with central_scope(reason="cross-tenant report"):
            async with database.admin_session() as s:
                owners = set(
                    (await s.execute(text("SELECT DISTINCT tenant_id FROM projects"))).scalars()
                )
            with pytest.raises(TenantContextError):
                async with database.session():
                    pass  # pragma: no cover
    finally:
        await database.dispose()
    assert {"acme", "globex"} <= owners
    with pytest.raises(IsolationConfigError):
        TenantDatabase(admin, rls_strategy, admin_engine=admin)


async def test_savepoints_keep_the_binding(db: TenantDatabase) -> None:
    async with tenant_scope(ACME), db.session() as s:
        async with s.begin_nested():
            inside = await s.scalar(text("SELECT count(*) FROM projects"))
        savepoint = await s.begin_nested()
        with pytest.raises(DBAPIError):
            await s.execute(text("SELECT 1/0"))
        await savepoint.rollback()  # ROLLBACK TO SAVEPOINT: the binding predates it
        after = (await s.execute(text("SELECT name FROM projects"))).scalars().all()
    assert inside == ROWS_PER_TENANT
    assert len(after) == ROWS_PER_TENANT
    assert_no_foreign_rows(after, "acme")


async def test_upsert_and_returning_touch_only_own_rows(
    db: TenantDatabase, admin_engine: AsyncEngine
) -> None:
    async with tenant_scope(ACME), db.session() as s:
        with pytest.raises(DBAPIError, match="row-level security"):
            await s.execute(
                text(
                    "INSERT INTO projects (tenant_id, id, name) VALUES ('globex', 1, 'x') "
                    "ON CONFLICT (tenant_id, id) DO UPDATE SET name = 'pwned'"
                )
            )
        await s.rollback()
        returned = (
            await s.execute(text("UPDATE projects SET name = name RETURNING tenant_id, id"))
        ).all()
        deleted = (
            (await s.execute(text("DELETE FROM tasks WHERE id > 0 RETURNING tenant_id")))
            .scalars()
            .all()
        )
        await s.rollback()
    assert {r.tenant_id for r in returned} == {"acme"}
    assert set(deleted) == {"acme"}
    pwned = "SELECT count(*) FROM projects WHERE name = 'pwned'"
    assert await _admin_count(admin_engine, pwned) == 0


# -- suite II, cases 4, 7, 9, 10: objects, keys across tenants, results and nesting -------


async def test_identity_map_objects_never_cross_tenants(
    db: TenantDatabase, admin_engine: AsyncEngine
) -> None:
    async with AsyncExitStack() as stack:
        async with tenant_scope(ACME):
            a = await stack.enter_async_context(db.session())
            mine = await a.get(Project, ("acme", 1))
            assert mine is not None
            await a.commit()  # A's session stays open and holds the object, not the connection
        async with tenant_scope(GLOBEX), db.session() as b:
            assert await b.get(Project, ("acme", 1)) is None  # not in B's map, not in B's rows
            theirs = await b.get(Project, ("globex", 1))
            assert theirs is not None
            assert theirs is not mine
            with pytest.raises(SessionTenantMismatch):
                await a.refresh(mine)  # A's session, B's scope
            with pytest.raises(SessionTenantMismatch):
                await a.run_sync(lambda _: list(mine.tasks))  # a lazy load through A's session
            await a.close()
            mine.name = "written-from-globex"
            with pytest.raises(SessionTenantMismatch):
                b.add(mine)  # A's detached object into B's session
            with pytest.raises(SessionTenantMismatch):
                await b.merge(mine)
            await b.commit()
    changed = "SELECT count(*) FROM projects WHERE name = 'written-from-globex'"
    assert await _admin_count(admin_engine, changed) == 0


async def test_a_key_across_tenants_is_excluded_from_every_load(db: TenantDatabase) -> None:
    loads = [None, selectinload(Account.notes), joinedload(Account.notes)]
    loads.append(subqueryload(Account.notes))
    async with tenant_scope(ACME), db.session() as s:
        for option in loads:
            statement = (
                select(Account).where(Account.id == 1).execution_options(populate_existing=True)
            )
            if option is not None:
                statement = statement.options(option)
            account = (await s.scalars(statement)).unique().one()
            notes = await s.run_sync(lambda _, a=account: list(a.notes))
            assert [n.body for n in notes] == ["acme-note-own"], option
            s.expunge_all()
        account = await s.get_one(Account, 1)
        parented = (await s.scalars(select(Note).where(with_parent(account, Account.notes)))).all()
        raw = (await s.execute(text("SELECT body FROM notes WHERE account_id = 1"))).scalars()
        assert [n.body for n in parented] == ["acme-note-own"]
        assert list(raw) == ["acme-note-own"]


async def test_cascaded_children_are_stamped(db: TenantDatabase, admin_engine: AsyncEngine) -> None:
    async with tenant_scope(GLOBEX), db.session() as s:
        s.add(Account(id=900, name="globex-account-900", notes=[Note(id=900, body="globex-n")]))
        await s.flush()
        (await s.get_one(Account, 900)).notes.append(Note(id=901, body="globex-n"))
        await s.commit()
    owners = "SELECT count(*) FROM notes WHERE id IN (900, 901) AND tenant_id = 'globex'"
    assert await _admin_count(admin_engine, owners) == 2
    async with tenant_scope(GLOBEX), db.session() as s:
        await s.delete(await s.get_one(Account, 900))  # cascades to the notes
        await s.commit()
    assert await _admin_count(admin_engine, "SELECT count(*) FROM notes WHERE id >= 900") == 0


async def test_results_and_streams_used_after_the_scope_raise(db: TenantDatabase) -> None:
    async with AsyncExitStack() as stack:
        async with tenant_scope(ACME):
            s = await stack.enter_async_context(db.session())
            stream = await s.stream_scalars(select(Project.name).execution_options(yield_per=2))
            first = await stream.fetchmany(2)
            project = await s.get_one(Project, ("acme", 1))
        assert len(first) == 2
        with pytest.raises(SessionTenantMismatch):
            await stream.fetchmany(2)  # more rows of A's, fetched outside A's scope
        with pytest.raises(SessionTenantMismatch):
            await s.run_sync(lambda _: list(project.tasks))
        with pytest.raises(SessionTenantMismatch):
            await s.execute(select(Project))


async def test_nested_scopes_never_reuse_the_open_transaction(db: TenantDatabase) -> None:
    async with tenant_scope(ACME), db.session() as s:
        await s.execute(text("SELECT 1"))  # A's transaction is open on the connection
        with pytest.raises(TenantContextError):
            async with tenant_scope(GLOBEX):
                pass
        with pytest.raises(TenantContextError), central_scope(reason="nested"):
            pass
        async with tenant_scope(ACME):  # the same tenant nests, as a savepoint
            async with s.begin_nested():
                await s.execute(text("UPDATE projects SET name = 'nested' WHERE id = 1"))
                inner = await s.begin_nested()
                await s.execute(text("UPDATE projects SET name = 'rolled-back' WHERE id = 1"))
                await inner.rollback()  # ROLLBACK TO SAVEPOINT
            names = (await s.execute(text("SELECT name FROM projects WHERE id = 1"))).scalars()
            assert list(names) == ["nested"]
        await s.rollback()
        bound = await s.scalar(text("SELECT split_part(current_setting('app.tenant_id'), ':', 1)"))
        assert bound == "acme"


# -- suite II, case 12: the start-up gate ------------------------------------------------


async def test_the_start_up_gate_locks_until_validated_and_again_on_failure(
    rls_database: PgDatabase, rls_strategy: RowLevelSecurity, admin_engine: AsyncEngine
) -> None:
    database = TenantDatabase(rls_database.app_url, rls_strategy)
    connects: list[object] = []
    event.listen(database.engine.sync_engine, "connect", lambda *_: connects.append(1))
    try:
        async with tenant_scope(ACME):
            with pytest.raises(DatabaseNotValidated, match="not been validated"):
                async with database.session():
                    pass  # pragma: no cover
        assert connects == []  # refused before any connection
        await database.validate()
        async with tenant_scope(ACME), database.session() as s:
            assert await s.scalar(text("SELECT count(*) FROM projects")) == ROWS_PER_TENANT
        async with admin_engine.begin() as conn:
            await conn.execute(text("ALTER TABLE projects NO FORCE ROW LEVEL SECURITY"))
        try:
            with pytest.raises(IsolationConfigError) as failed:
                await database.validate()
            assert not database.validated
            async with tenant_scope(ACME):
                with pytest.raises(DatabaseNotValidated):
                    async with database.session():
                        pass  # pragma: no cover
        finally:
            async with admin_engine.begin() as conn:
                await conn.execute(text("ALTER TABLE projects FORCE ROW LEVEL SECURITY"))
        body = problem_response(failed.value).body.decode()
        assert "projects" in str(failed.value)  # the operator's log names the table...
        assert "projects" not in body  # ...a client never sees the catalog
        assert "tenancy_app" not in body
    finally:
        await database.dispose()


async def test_an_unreachable_database_fails_validation_without_its_dsn(
    rls_strategy: RowLevelSecurity,
) -> None:
    database = TenantDatabase(
        "postgresql+asyncpg://tenancy_app:s3cret-pw@127.0.0.1:1/tenancy_db", rls_strategy
    )
    try:
        with pytest.raises(TenancyUnavailable) as failed:
            await database.validate()
        assert not database.validated
        for text_ in (
            str(failed.value),
            repr(database),
            problem_response(failed.value).body.decode(),
        ):
            assert "s3cret" not in text_
            assert "127.0.0.1" not in text_ or text_ == repr(database)
    finally:
        await database.dispose()


@pytest.mark.parametrize(
    ("attack", "refusal"),
    [
        ("SET LOCAL ROLE {owner}", "permission denied"),  # become the owner: not a member
        ("SELECT set_config('role', '{owner}', true)", "permission denied"),
        ("SET LOCAL search_path TO pg_catalog, public", None),  # RLS ignores the path
        ("RESET ALL", "no tenant is bound"),  # drops the binding itself
        ("SELECT set_config('app.tenant_id', '', true)", "no tenant is bound"),
    ],
)
async def test_raw_sql_that_changes_role_path_or_settings_never_widens(
    db: TenantDatabase, admin_engine: AsyncEngine, attack: str, refusal: str | None
) -> None:
    async with admin_engine.connect() as conn:
        owner = await conn.scalar(
            text("SELECT tableowner FROM pg_tables WHERE tablename = 'projects'")
        )
    async with tenant_scope(ACME), db.session() as s:
        if refusal is not None:
            with pytest.raises(DBAPIError, match=refusal):  # noqa: PT012 (either step may refuse)
                await s.execute(text(attack.format(owner=owner)))
                await s.execute(text("SELECT name FROM projects"))
            return
        await s.execute(text(attack.format(owner=owner)))
        rows = (await s.execute(text("SELECT name FROM projects"))).scalars().all()
    assert len(rows) == ROWS_PER_TENANT
    assert_no_foreign_rows(rows, "acme")


async def test_going_around_the_library_inside_a_scope_reaches_nothing(
    db: TenantDatabase, admin_engine: AsyncEngine
) -> None:
    async with tenant_scope(ACME):
        async with AsyncSession(db.engine) as plain:  # a second session, without the binding
            with pytest.raises(DBAPIError, match="no tenant is bound"):
                await plain.execute(select(Project))
        async with db.engine.connect() as conn:  # the base engine itself
            with pytest.raises(DBAPIError, match="no tenant is bound"):
                await conn.execute(
                    text("INSERT INTO projects (tenant_id, id, name) VALUES ('acme', 500, 'x')")
                )
    assert await _admin_count(admin_engine, "SELECT count(*) FROM projects WHERE id = 500") == 0


async def test_a_cancellation_at_any_point_of_a_session_leaves_nothing_behind(
    db: TenantDatabase, admin_engine: AsyncEngine
) -> None:
    """Cancelled after 0, 1, 2, ... turns of the event loop (so inside BEGIN, the write, the
    read, the ROLLBACK and the release in turn): no write lands, the only pooled connection is
    free for the next session, and no server backend of the app is left inside a transaction."""

    async def request() -> None:
        async with tenant_scope(ACME), db.session() as s:
            await s.execute(
                text(
                    "INSERT INTO projects (tenant_id, id, name) VALUES ('acme', 9001, 'cancelled')"
                )
            )
            await s.execute(text("SELECT count(*) FROM projects"))

    turns, completed = 0, False
    while not completed:
        assert turns < 500, "the request never ran to completion"
        task = asyncio.create_task(request())
        for _ in range(turns):
            await asyncio.sleep(0)  # one turn of the loop: the point of cancellation, not a wait
        completed = task.done()
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
        # pool_size=1, max_overflow=0: a connection left checked out would time this out.
        async with tenant_scope(GLOBEX), db.session() as s:
            assert await s.scalar(text("SELECT count(*) FROM projects")) == ROWS_PER_TENANT
        stuck = await _admin_count(
            admin_engine,
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'tenancy_app'"
            " AND state LIKE 'idle in transaction%'",
        )
        assert stuck == 0, f"cancelled after {turns} turns: a backend stayed in a transaction"
        turns += 1
    assert await _admin_count(admin_engine, "SELECT count(*) FROM projects WHERE id = 9001") == 0
    assert turns > 3  # the enumeration reached past the first statements


async def test_an_app_listener_that_could_run_statements_first_is_refused_at_start_up(
    rls_database: PgDatabase, rls_strategy: RowLevelSecurity
) -> None:
    """A do_execute listener that returns True ends the dispatch: one that would run before
    the statement check (on the engine before the TenantDatabase, or on the dialect class) is
    refused at construction or validation, before any tenant statement."""

    def run_it_myself(cursor: object, statement: str, parameters: object, context: object) -> bool:
        cursor.execute(statement, parameters)  # type: ignore[attr-defined]
        return True

    for name in ("do_execute", "do_executemany"):
        engine = create_async_engine(rls_database.app_url)
        event.listen(engine.sync_engine, name, run_it_myself)
        with pytest.raises(IsolationConfigError, match=name):
            TenantDatabase(engine, rls_strategy)
        await engine.dispose()

    engine = create_async_engine(rls_database.app_url)
    database = TenantDatabase(engine, rls_strategy)
    dialect_class = type(engine.sync_engine.dialect)
    event.listen(dialect_class, "do_execute_no_params", run_it_myself)
    try:
        with pytest.raises(IsolationConfigError, match="do_execute_no_params"):
            await database.validate()
        assert not database.validated
    finally:
        event.remove(dialect_class, "do_execute_no_params", run_it_myself)
        await database.dispose()


async def test_an_app_listener_that_runs_statements_itself_skips_no_check(
    rls_database: PgDatabase,
    rls_strategy: RowLevelSecurity,
    admin_engine: AsyncEngine,
) -> None:
    """The per-statement check is a dialect ``do_execute`` listener; one of the app's that
    executes the statement itself and returns True, added after the TenantDatabase, runs
    after it: a connection kept past its scope still raises on a single statement, an
    executemany and a statement without parameters, before the app's listener sees them."""
    engine = create_async_engine(rls_database.app_url, pool_size=1, max_overflow=0)
    sent: list[str] = []

    def run_it_myself(cursor: object, statement: str, parameters: object, context: object) -> bool:
        sent.append(statement)
        cursor.execute(statement, parameters)  # type: ignore[attr-defined]
        return True

    def run_many_myself(
        cursor: object, statement: str, parameters: object, context: object
    ) -> bool:
        sent.append(statement)
        cursor.executemany(statement, parameters)  # type: ignore[attr-defined]
        return True

    def listen() -> None:
        event.listen(engine.sync_engine, "do_execute", run_it_myself)
        event.listen(engine.sync_engine, "do_executemany", run_many_myself)

    database = TenantDatabase(engine, rls_strategy)
    listen()
    await database.validate()
    try:
        async with tenant_scope(ACME), database.session() as s:
            conn = await s.connection()
            assert await conn.scalar(select(func.count()).select_from(Project)) == ROWS_PER_TENANT
            sent.clear()

            async def other() -> None:
                async with tenant_scope(GLOBEX):
                    with pytest.raises(SessionTenantMismatch):
                        await conn.execute(text("UPDATE projects SET name = 'pwned'"))
                    with pytest.raises(SessionTenantMismatch):
                        await conn.execute(
                            text("UPDATE projects SET name = :n WHERE id = :i"),
                            [{"n": "pwned", "i": 1}, {"n": "pwned", "i": 2}],
                        )
                    with pytest.raises(SessionTenantMismatch):
                        await conn.exec_driver_sql("UPDATE projects SET name = 'pwned'")

            await asyncio.create_task(other(), context=contextvars.Context())
            await s.rollback()
        assert sent == []  # refused before the app's listener saw them
    finally:
        await database.dispose()
    assert (
        await _admin_count(admin_engine, "SELECT count(*) FROM projects WHERE name = 'pwned'") == 0
    )


@pytest.mark.parametrize("kind", ["view", "materialized view"])
async def test_a_view_that_reads_past_the_policy_is_refused_until_it_reads_as_the_caller(
    rls_database: PgDatabase, rls_strategy: RowLevelSecurity, admin_engine: AsyncEngine, kind: str
) -> None:
    """A view reads its tables as its owner: one made by a superuser (or a BYPASSRLS role)
    returns every tenant's rows to the app role, and a materialized view has no policy at
    all. Shown to leak, refused by validate() as A012, accepted once fixed."""
    create = f"CREATE {kind.upper()} leaky_projects AS SELECT tenant_id, name FROM projects"
    fix = (
        "ALTER VIEW leaky_projects SET (security_invoker = true)"
        if kind == "view"
        else "REVOKE ALL ON leaky_projects FROM tenancy_app"
    )
    async with admin_engine.begin() as conn:
        await conn.execute(text(create))
        await conn.execute(text("GRANT SELECT ON leaky_projects TO tenancy_app"))
    database = TenantDatabase(rls_database.app_url, rls_strategy)
    try:
        async with database.engine.connect() as conn:  # the attack, with no check in the way
            await conn.execute(text("SELECT set_config('app.tenant_id', 'acme', true)"))
            owners = set((await conn.scalars(text("SELECT tenant_id FROM leaky_projects"))).all())
        assert {"acme", "globex"} <= owners  # every tenant's rows
        with pytest.raises(IsolationConfigError, match="A012"):
            await database.validate()
        async with admin_engine.begin() as conn:
            await conn.execute(text(fix))
        await database.validate()
        if kind == "view":
            async with tenant_scope(ACME), database.session() as s:
                rows = (await s.scalars(text("SELECT tenant_id FROM leaky_projects"))).all()
            assert set(rows) == {"acme"}
    finally:
        await database.dispose()
        async with admin_engine.begin() as conn:
            await conn.execute(text(f"DROP {kind.upper()} IF EXISTS leaky_projects"))
