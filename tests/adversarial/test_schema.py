"""SchemaPerTenant on a real PostgreSQL, as a role that is not superuser and owns no table.

Every tenant schema holds the same table names and the same primary keys; names carry the
owner, so a leaked row is visible. What really happened is read back as the admin.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import pytest
from sqlalchemy import (
    ForeignKey,
    MetaData,
    String,
    Text,
    delete,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.exc import DBAPIError, ProgrammingError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    joinedload,
    mapped_column,
    relationship,
    selectinload,
)

from asgi_tenancy import (
    IsolationConfigError,
    SessionTenantMismatch,
    TenancyUnavailable,
    Tenant,
    TenantContextError,
    central_scope,
    tenant_scope,
)
from asgi_tenancy.errors import DatabaseNotValidated, TenantPlacementError
from asgi_tenancy.sqlalchemy import Binding, FairShares, SchemaPerTenant, TenantDatabase
from tests.conftest import APP_ROLE, PgDatabase, admin_run

ROWS = 20
ACME, GLOBEX, INITECH = Tenant("acme"), Tenant("globex"), Tenant("initech")
TENANTS = (ACME, GLOBEX, INITECH)
ROLE_PREFIX = "tenancy_rt_"  # per-tenant roles are cluster-wide: one fixed family of names


class Base(DeclarativeBase):
    metadata = MetaData()


class Project(Base):
    __tablename__ = "projects"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(Text)
    tasks: Mapped[list[Task]] = relationship(back_populates="project", lazy="select")


class Task(Base):
    __tablename__ = "tasks"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    title: Mapped[str] = mapped_column(Text)
    project: Mapped[Project] = relationship(back_populates="tasks")


class Currency(Base):
    __tablename__ = "currencies"
    __table_args__ = {"schema": "shared"}  # noqa: RUF012

    code: Mapped[str] = mapped_column(String(3), primary_key=True)


def _strategy(**options: Any) -> SchemaPerTenant:
    return SchemaPerTenant(metadata=Base.metadata, **options)


def _role_tenant(tenant: Tenant) -> Tenant:
    return Tenant(
        tenant.id,
        attributes={"schema": f"rt_{tenant.id}", "role": f"{ROLE_PREFIX}{tenant.id}"},
    )


async def _seed(conn: Any, schema: str, owner: str) -> None:
    await conn.execute(
        text(
            f"INSERT INTO \"{schema}\".projects (id, name) SELECT i, :o || '-project-' || i"
            " FROM generate_series(1, :n) i"
        ),
        {"o": owner, "n": ROWS},
    )
    await conn.execute(
        text(
            f'INSERT INTO "{schema}".tasks (id, project_id, title)'
            " SELECT i, i % 5 + 1, :o || '-task-' || i FROM generate_series(1, :n) i"
        ),
        {"o": owner, "n": ROWS},
    )


async def _set_up(url: str, name: str) -> None:
    engine = create_async_engine(url)
    plain, roles = _strategy(), _strategy(per_tenant_roles=True, role_attribute="role")
    async with engine.begin() as conn:
        await conn.execute(text(f'REVOKE TEMPORARY ON DATABASE "{name}" FROM PUBLIC, {APP_ROLE}'))
        await plain.create_shared_schema(conn, APP_ROLE)
        await conn.execute(insert(Currency), [{"code": "EUR"}, {"code": "USD"}])
        for tenant in TENANTS:
            await plain.create_tenant_schema(conn, tenant, APP_ROLE)
            await _seed(conn, plain.schema_for(tenant), tenant.id)
        for tenant in (ACME, GLOBEX):
            role_tenant = _role_tenant(tenant)
            await roles.create_tenant_schema(conn, role_tenant, APP_ROLE)
            await _seed(conn, roles.schema_for(role_tenant), tenant.id)
        await conn.execute(
            text("INSERT INTO \"tenant_globex\".projects VALUES (999, 'globex-only')")
        )
        # A table that exists only in public: a tenant must never read it.
        await conn.execute(text("CREATE TABLE public.notes (body text)"))
        await conn.execute(text("INSERT INTO public.notes VALUES ('public-row')"))
        await conn.execute(text(f"GRANT SELECT ON public.notes TO {APP_ROLE}"))
        # Prepared-statement probe: one table name, a different shape in each schema.
        for schema, ddl, row in (
            ("ps_a", "id int, label text", "1, 'a-label'"),
            ("ps_b", "id int, label int", "1, 42"),
            ("ps_c", "label text, id int", "'c-label', 1"),
        ):
            await conn.execute(text(f"CREATE SCHEMA {schema}"))
            await conn.execute(text(f"CREATE TABLE {schema}.items ({ddl})"))
            await conn.execute(text(f"INSERT INTO {schema}.items VALUES ({row})"))
            await conn.execute(text(f"GRANT USAGE ON SCHEMA {schema} TO {APP_ROLE}"))
            await conn.execute(text(f"GRANT SELECT ON {schema}.items TO {APP_ROLE}"))
    await engine.dispose()


@pytest.fixture(scope="module")
def schema_database(pg_database: PgDatabase) -> PgDatabase:
    asyncio.run(_set_up(pg_database.admin_url, pg_database.name))
    return pg_database


async def _database(url: str, strategy: SchemaPerTenant, pool_size: int = 1) -> TenantDatabase:
    database = TenantDatabase(
        url, strategy, engine_options={"pool_size": pool_size, "max_overflow": 0}
    )
    await database.validate()
    return database


@pytest.fixture
async def db(schema_database: PgDatabase) -> AsyncIterator[TenantDatabase]:
    database = await _database(schema_database.app_url, _strategy())
    yield database
    await database.dispose()


async def _server_version(admin_url: str) -> int:
    engine = create_async_engine(admin_url)
    try:
        async with engine.connect() as conn:
            return int(await conn.scalar(text("SHOW server_version_num")) or 0)
    finally:
        await engine.dispose()


async def _set_inherit(admin_url: str, inherit: bool) -> None:
    await admin_run(admin_url, f"ALTER ROLE {APP_ROLE} {'INHERIT' if inherit else 'NOINHERIT'}")


@pytest.fixture
async def role_db(schema_database: PgDatabase) -> AsyncIterator[TenantDatabase]:
    # Before PostgreSQL 16 a membership cannot be granted WITH INHERIT FALSE: the app role
    # itself must be NOINHERIT, or validate() refuses per-tenant roles (S007).
    legacy = await _server_version(schema_database.admin_url) < 160000
    if legacy:
        await _set_inherit(schema_database.admin_url, inherit=False)
    strategy = _strategy(per_tenant_roles=True, role_attribute="role")
    try:
        database = await _database(schema_database.app_url, strategy)
        yield database
        await database.dispose()
    finally:
        if legacy:
            await _set_inherit(schema_database.admin_url, inherit=True)


async def test_validate_refuses_roles_the_app_role_inherits(
    role_db: TenantDatabase, schema_database: PgDatabase
) -> None:
    legacy = await _server_version(schema_database.admin_url) < 160000
    engine = create_async_engine(schema_database.admin_url, isolation_level="AUTOCOMMIT")
    role = f'"{ROLE_PREFIX}acme"'
    async with engine.connect() as conn:
        if legacy:
            await conn.execute(text(f"ALTER ROLE {APP_ROLE} INHERIT"))
        else:
            await conn.execute(text(f"GRANT {role} TO {APP_ROLE} WITH INHERIT TRUE"))
    try:
        with pytest.raises(IsolationConfigError, match="S007"):
            await role_db.validate()
    finally:
        async with engine.connect() as conn:
            if legacy:
                await conn.execute(text(f"ALTER ROLE {APP_ROLE} NOINHERIT"))
            else:
                await conn.execute(text(f"GRANT {role} TO {APP_ROLE} WITH INHERIT FALSE"))
        await engine.dispose()


async def _admin_rows(admin: AsyncEngine, sql: str) -> list[Any]:
    async with admin.connect() as conn:
        return list((await conn.execute(text(sql))).all())


def _own(tenant: Tenant, values: list[str]) -> bool:
    return bool(values) and all(v.startswith(f"{tenant.id}-") for v in values)


async def test_reads_joins_ctes_and_loads_see_only_own_rows(db: TenantDatabase) -> None:
    for tenant in (ACME, GLOBEX):
        async with tenant_scope(tenant), db.session() as s:
            names = list((await s.scalars(select(Project.name).order_by(Project.id))).all())
            assert len(names) == ROWS + (tenant is GLOBEX)
            assert _own(tenant, names[:ROWS])
            assert await s.scalar(select(func.count()).select_from(Task)) == ROWS
            page = (await s.scalars(select(Task.title).order_by(Task.id).limit(5).offset(5))).all()
            assert _own(tenant, list(page))
            joined = (await s.execute(select(Project.name, Task.title).join(Task))).all()
            assert _own(tenant, [r[0] for r in joined] + [r[1] for r in joined])
            sub = select(Task.project_id).where(Task.id > 10).scalar_subquery()
            assert _own(
                tenant,
                list((await s.scalars(select(Project.name).where(Project.id.in_(sub)))).all()),
            )
            cte = select(Task.title).where(Task.id <= 3).cte("few")
            assert _own(tenant, list((await s.scalars(select(cte.c.title))).all()))
            total = await s.scalar(select(func.sum(Project.id)))
            assert total == ROWS * (ROWS + 1) // 2 + (999 if tenant is GLOBEX else 0)
            project = await s.get(Project, 1)
            assert project is not None
            lazy = await s.run_sync(lambda _, p=project: list(p.tasks))
            assert _own(tenant, [t.title for t in lazy])
            selected = (await s.scalars(select(Project).options(selectinload(Project.tasks)))).all()
            assert _own(tenant, [t.title for p in selected for t in p.tasks])
            eager = (await s.scalars(select(Task).options(joinedload(Task.project)))).all()
            assert _own(tenant, [t.project.name for t in eager])
            shared = (await s.scalars(select(Currency.code))).all()
            assert sorted(shared) == ["EUR", "USD"]


async def test_another_tenants_key_is_not_found_nor_changed(
    db: TenantDatabase, admin_engine: AsyncEngine
) -> None:
    async with tenant_scope(ACME), db.session() as s:
        assert await s.get(Project, 999) is None
        changed = await s.execute(update(Project).where(Project.id == 999).values(name="pwned"))
        removed = await s.execute(delete(Project).where(Project.id == 999))
        raw = await s.execute(text("UPDATE projects SET name = 'pwned' WHERE id = 999"))
        await s.commit()
    assert changed.rowcount == removed.rowcount == raw.rowcount == 0  # type: ignore[attr-defined]
    rows = await _admin_rows(admin_engine, "SELECT name FROM tenant_globex.projects WHERE id = 999")
    assert rows == [("globex-only",)]


async def test_bulk_update_and_delete_touch_only_own_rows(
    db: TenantDatabase, admin_engine: AsyncEngine
) -> None:
    async with tenant_scope(ACME), db.session() as s:
        result = await s.execute(update(Task).values(title=Task.title + "!"))
        await s.commit()
        assert result.rowcount == ROWS  # type: ignore[attr-defined]
        gone = await s.execute(delete(Task).where(Task.id > 100))
        assert gone.rowcount == 0  # type: ignore[attr-defined]
    marked = await _admin_rows(
        admin_engine,
        "SELECT (SELECT count(*) FROM tenant_acme.tasks WHERE title LIKE '%!'),"
        " (SELECT count(*) FROM tenant_globex.tasks WHERE title LIKE '%!'),"
        " (SELECT count(*) FROM tenant_initech.tasks WHERE title LIKE '%!')",
    )
    assert marked == [(ROWS, 0, 0)]
    async with tenant_scope(ACME), db.session() as s:
        await s.execute(update(Task).values(title=func.rtrim(Task.title, "!")))
        await s.commit()


async def test_raw_sql_reads_the_tenant_schema_only(db: TenantDatabase) -> None:
    async with tenant_scope(GLOBEX), db.session() as s:
        raw = (await s.execute(text("SELECT name FROM projects WHERE id <= 20"))).scalars().all()
        assert _own(GLOBEX, list(raw))
        path = await s.scalar(text("SHOW search_path"))
        assert path == "tenant_globex, pg_temp"


async def test_a_missing_table_errors_instead_of_reading_public(db: TenantDatabase) -> None:
    async with tenant_scope(ACME), db.session() as s:
        with pytest.raises(ProgrammingError, match="does not exist"):
            await s.execute(text("SELECT body FROM notes"))


async def test_the_binding_survives_commit_and_rollback(db: TenantDatabase) -> None:
    async with tenant_scope(ACME), db.session() as s:
        assert await s.scalar(select(func.count()).select_from(Project)) == ROWS
        await s.commit()
        names = (await s.execute(text("SELECT name FROM projects"))).scalars().all()
        assert _own(ACME, list(names))
        await s.rollback()
        assert await s.scalar(text("SHOW search_path")) == "tenant_acme, pg_temp"


async def test_pool_reuse_leaves_nothing_behind(role_db: TenantDatabase) -> None:
    pids = []
    for tenant in (ACME, GLOBEX):
        async with tenant_scope(_role_tenant(tenant)), role_db.session() as s:
            row = (await s.execute(text("SELECT pg_backend_pid(), current_user"))).one()
            pids.append(row[0])
            assert row[1] == f"{ROLE_PREFIX}{tenant.id}"
            assert await s.scalar(text("SHOW search_path")) == f"rt_{tenant.id}, pg_temp"
    async with role_db.engine.connect() as conn:
        row = (await conn.execute(text("SELECT pg_backend_pid(), current_user"))).one()
        pids.append(row[0])
        assert row[1] == APP_ROLE
        assert await conn.scalar(text("SHOW search_path")) == '"$user", public'
        with pytest.raises(ProgrammingError, match="does not exist"):
            await conn.execute(text("SELECT count(*) FROM projects"))
    assert len(set(pids)) == 1  # one backend served all three


async def test_no_context_raises_before_any_sql(db: TenantDatabase) -> None:
    statements: list[str] = []

    def record(*args: Any) -> None:
        statements.append(args[2])

    event.listen(db.engine.sync_engine, "before_cursor_execute", record)
    try:
        with pytest.raises(TenantContextError):
            async with db.session():
                pass  # pragma: no cover
        with central_scope(reason="test"), pytest.raises(TenantContextError):
            async with db.session():
                pass  # pragma: no cover
    finally:
        event.remove(db.engine.sync_engine, "before_cursor_execute", record)
    assert statements == []
    assert db.engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_session_used_in_another_scope_or_after_its_own_raises(db: TenantDatabase) -> None:
    async with tenant_scope(ACME), db.session() as s:
        await s.get(Project, 1)
        leaked = s

        async def other() -> None:
            async with tenant_scope(GLOBEX):
                with pytest.raises(SessionTenantMismatch):
                    await leaked.get(Project, 1)
                with pytest.raises(SessionTenantMismatch):
                    await leaked.execute(select(Project))

        await asyncio.create_task(other(), context=contextvars.Context())
    with pytest.raises(SessionTenantMismatch):
        await leaked.execute(select(Project))


async def test_concurrent_tasks_across_three_tenants_see_no_foreign_rows(
    schema_database: PgDatabase,
) -> None:
    database = await _database(schema_database.app_url, _strategy(), pool_size=8)
    foreign: list[str] = []

    async def one(i: int) -> None:
        tenant = TENANTS[i % 3]
        async with tenant_scope(tenant), database.session() as s:
            first = (await s.scalars(select(Task.title).where(Task.id == i % ROWS + 1))).all()
            await asyncio.sleep(0)  # yield mid-transaction: other tenants' tasks run here
            second = (await s.execute(text("SELECT name FROM projects WHERE id <= 3"))).all()
            await s.commit()
            third = (await s.scalars(select(Project.name).where(Project.id == 2))).all()
        seen = [*first, *(r[0] for r in second), *third]
        assert len(seen) == 5
        foreign.extend(v for v in seen if not v.startswith(f"{tenant.id}-"))

    try:
        await asyncio.gather(*(one(i) for i in range(500)))
    finally:
        await database.dispose()
    assert foreign == []


async def test_an_error_mid_transaction_leaves_the_next_one_clean(db: TenantDatabase) -> None:
    async with tenant_scope(GLOBEX), db.session() as s:
        with pytest.raises(DBAPIError, match="division by zero"):
            await s.execute(text("SELECT 1 / 0 FROM projects"))
        await s.rollback()
        names = (await s.scalars(select(Project.name).where(Project.id <= ROWS))).all()
        assert _own(GLOBEX, list(names))
    async with tenant_scope(ACME), db.session() as s:
        assert _own(ACME, list((await s.scalars(select(Project.name))).all()))


async def test_cancellation_and_a_killed_backend_fail_cleanly(
    db: TenantDatabase, admin_engine: AsyncEngine
) -> None:
    started, never = asyncio.Event(), asyncio.Event()

    async def stuck() -> None:
        async with tenant_scope(ACME), db.session() as s:
            await s.execute(update(Project).where(Project.id == 1).values(name="cancelled"))
            started.set()
            await never.wait()

    task = asyncio.create_task(stuck())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with tenant_scope(GLOBEX), db.session() as s:
        pid = await s.scalar(text("SELECT pg_backend_pid()"))
        async with admin_engine.connect() as admin:
            await admin.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
        with pytest.raises(DBAPIError):
            await s.execute(text("SELECT name FROM projects"))
    async with tenant_scope(GLOBEX), db.session() as s:
        names = (await s.scalars(select(Project.name).where(Project.id <= ROWS))).all()
        assert _own(GLOBEX, list(names))
    rows = await _admin_rows(admin_engine, "SELECT name FROM tenant_acme.projects WHERE id = 1")
    assert rows == [("acme-project-1",)]


async def test_per_tenant_roles_refuse_another_tenants_schema(role_db: TenantDatabase) -> None:
    async with tenant_scope(_role_tenant(ACME)), role_db.session() as s:
        assert _own(ACME, list((await s.scalars(select(Project.name))).all()))
        with pytest.raises(ProgrammingError, match="permission denied"):
            await s.execute(text("SELECT name FROM rt_globex.projects"))
        await s.rollback()
        # Without the role, the application role itself has no privilege on tenant schemas.
        await s.execute(text("RESET ROLE"))
        with pytest.raises(ProgrammingError, match="permission denied"):
            await s.execute(text("SELECT name FROM rt_acme.projects"))


async def test_schema_qualified_access_without_roles_is_not_confined(db: TenantDatabase) -> None:
    # Documented limit: without per-tenant roles one role holds every schema's privileges.
    async with tenant_scope(ACME), db.session() as s:
        names = (await s.scalars(text("SELECT name FROM tenant_globex.projects"))).all()
    assert _own(GLOBEX, list(names)[:ROWS])


async def test_validate_detects_shadowing_tables(
    schema_database: PgDatabase, admin_engine: AsyncEngine
) -> None:
    async with admin_engine.begin() as conn:
        await conn.execute(text("CREATE TABLE public.projects (id int)"))
    try:
        database = TenantDatabase(schema_database.app_url, _strategy())
        with pytest.raises(IsolationConfigError, match="S003") as caught:
            await database.validate()
        assert "S002" in str(caught.value)
        with tenant_scope(ACME), pytest.raises(DatabaseNotValidated):
            async with database.session():
                pass  # pragma: no cover
        await database.dispose()
    finally:
        async with admin_engine.begin() as conn:
            await conn.execute(text("DROP TABLE public.projects"))


async def test_validate_refuses_a_superuser_with_temporary_tables(
    schema_database: PgDatabase,
) -> None:
    database = TenantDatabase(schema_database.admin_url, _strategy())
    with pytest.raises(IsolationConfigError, match="S001") as caught:
        await database.validate()
    assert "S005" in str(caught.value)
    await database.dispose()


async def test_a_tenant_without_its_schema_fails_closed(db: TenantDatabase) -> None:
    with tenant_scope(Tenant("hooli")), pytest.raises(TenancyUnavailable):
        async with db.session():
            pass  # pragma: no cover


async def test_two_tenants_on_one_schema_are_refused_in_either_order(db: TenantDatabase) -> None:
    thief = Tenant("thief", attributes={"schema": "tenant_acme"})
    async with tenant_scope(ACME), db.session() as s:
        await s.scalar(select(func.count()).select_from(Project))
    with tenant_scope(thief), pytest.raises(TenantPlacementError, match="two tenants"):
        async with db.session():
            pass  # pragma: no cover
    fresh = SchemaPerTenant(metadata=Base.metadata)
    database = TenantDatabase(db.engine, fresh)
    await database.validate()
    # Claimed first by the impostor: the schema's owner mark in the catalogue refuses it.
    with tenant_scope(thief), pytest.raises(TenantPlacementError, match="two tenants"):
        async with database.session():
            pass  # pragma: no cover


def test_invalid_schema_names_and_fixed_schema_models_are_refused() -> None:
    strategy = _strategy()
    for bad in ("Tenant", "a-b", "x" * 64, "public", "pg_x", "shared", 'a"b'):
        with pytest.raises(TenantPlacementError):
            strategy.schema_for(Tenant("t", attributes={"schema": bad}))
    with pytest.raises(TenantPlacementError):
        strategy.schema_for(Tenant("Upper"))

    class Other(DeclarativeBase):
        metadata = MetaData()

    class Fixed(Other):
        __tablename__ = "fixed"
        __table_args__ = {"schema": "tenant_acme"}  # noqa: RUF012
        id: Mapped[int] = mapped_column(primary_key=True)

    with pytest.raises(IsolationConfigError, match="fixed schema"):
        SchemaPerTenant(metadata=Other.metadata)


async def test_prepared_statements_never_cross_schemas(schema_database: PgDatabase) -> None:
    strategy = SchemaPerTenant()
    database = await _database(schema_database.app_url, strategy)
    tenants = {
        "a": Tenant("pa", attributes={"schema": "ps_a"}),
        "b": Tenant("pb", attributes={"schema": "ps_b"}),
        "c": Tenant("pc", attributes={"schema": "ps_c"}),
    }
    expected = {"a": (1, "a-label"), "b": (1, 42), "c": (1, "c-label")}
    outcomes: list[tuple[str, object]] = []
    try:
        for key in ("a", "b", "c", "a", "c", "b", "a"):
            async with tenant_scope(tenants[key]), database.session() as s:
                try:
                    row = (await s.execute(text("SELECT id, label FROM items"))).one()
                except DBAPIError as exc:
                    outcomes.append((key, type(exc.orig).__name__))
                else:
                    outcomes.append((key, tuple(row)))
    finally:
        await database.dispose()
    for key, outcome in outcomes:
        # Either the schema's own row, or asyncpg's clean "cached statement" error.
        assert outcome == expected[key] or outcome == "InvalidCachedStatementError", outcomes


async def test_session_level_raw_settings_never_outlive_into_the_next_binding(
    db: TenantDatabase,
) -> None:
    async with tenant_scope(ACME), db.session() as s:
        await s.execute(text("SET search_path TO tenant_globex"))  # session level, not LOCAL
        await s.commit()
        assert _own(ACME, list((await s.scalars(select(Project.name))).all()))
    async with tenant_scope(INITECH), db.session() as s:  # same pooled backend (pool_size=1)
        assert _own(INITECH, list((await s.scalars(select(Project.name))).all()))


async def test_raw_sql_can_move_the_path_only_within_its_roles_privileges(
    db: TenantDatabase, role_db: TenantDatabase
) -> None:
    # Documented limit: schema isolation holds against mistakes, not against injected SQL.
    async with tenant_scope(ACME), db.session() as s:
        await s.execute(text("SET LOCAL search_path TO tenant_globex"))
        moved = (await s.scalars(select(Project.name).where(Project.id == 1))).all()
    assert moved == ["globex-project-1"]
    async with tenant_scope(_role_tenant(ACME)), role_db.session() as s:
        await s.execute(text("SET LOCAL search_path TO rt_globex"))
        # No USAGE on the schema: the path skips it, the table does not resolve.
        with pytest.raises(ProgrammingError, match="does not exist"):
            await s.execute(select(Project.name))
        await s.rollback()
        # The app role is a member of every tenant role, so SET ROLE reaches another tenant.
        await s.execute(text(f"SET LOCAL ROLE {ROLE_PREFIX}globex"))
        await s.execute(text("SET LOCAL search_path TO rt_globex"))
        moved = (await s.scalars(select(Project.name).where(Project.id == 1))).all()
    assert moved == ["globex-project-1"]


class _LeakyPath(SchemaPerTenant):
    """Deliberately broken: every tenant's path is globex's schema."""

    def binding(self, tenant: Tenant) -> Binding:
        return Binding("SELECT set_config('search_path', 'tenant_globex', true)")


async def test_the_leak_check_catches_a_leaky_configuration(schema_database: PgDatabase) -> None:
    database = await _database(schema_database.app_url, _LeakyPath(metadata=Base.metadata))
    try:
        async with tenant_scope(ACME), database.session() as s:
            names = list(
                (
                    await s.scalars(
                        select(Project.name).where(Project.id <= 3).order_by(Project.id)
                    )
                ).all()
            )
            changed = await s.execute(update(Task).where(Task.id == 1).values(title=Task.title))
            await s.rollback()
    finally:
        await database.dispose()
    assert not _own(ACME, names)  # the suite's own check sees the foreign rows
    assert names == ["globex-project-1", "globex-project-2", "globex-project-3"]
    assert changed.rowcount == 1  # type: ignore[attr-defined]


async def test_concurrent_cold_requests_read_the_catalogue_once(
    schema_database: PgDatabase,
) -> None:
    database = await _database(schema_database.app_url, _strategy(), pool_size=4)
    reads: list[str] = []

    def record(*args: Any) -> None:
        if "pg_namespace" in args[2]:
            reads.append(args[2])

    event.listen(database.engine.sync_engine, "before_cursor_execute", record)

    async def one() -> int:
        async with tenant_scope(INITECH), database.session() as s:
            return int(await s.scalar(select(func.count()).select_from(Project)) or 0)

    try:
        counts = await asyncio.gather(*(one() for _ in range(100)))
        await one()  # warm: cached, no read
    finally:
        event.remove(database.engine.sync_engine, "before_cursor_execute", record)
        await database.dispose()
    assert counts == [ROWS] * 100
    assert len(reads) == 1


async def test_identity_map_objects_never_cross_tenants(
    db: TenantDatabase, admin_engine: AsyncEngine
) -> None:
    # Primary keys collide across schemas, so A's Project 1 and B's share one identity key.
    async with AsyncExitStack() as stack:
        async with tenant_scope(ACME):
            a = await stack.enter_async_context(db.session())
            mine = await a.get(Project, 1)
            assert mine is not None
            await a.commit()
        async with tenant_scope(GLOBEX), db.session() as b:
            theirs = await b.get(Project, 1)
            assert theirs is not None
            assert theirs is not mine
            assert theirs.name == "globex-project-1"
            with pytest.raises(SessionTenantMismatch):
                await a.refresh(mine)
            with pytest.raises(SessionTenantMismatch):
                await a.run_sync(lambda _: list(mine.tasks))
            await a.close()
            b.expunge(theirs)
            mine.name = "written-from-globex"
            with pytest.raises(SessionTenantMismatch):
                b.add(mine)  # would otherwise UPDATE globex's project 1
            with pytest.raises(SessionTenantMismatch):
                await b.merge(mine)
            await b.commit()
    rows = await _admin_rows(
        admin_engine,
        "SELECT count(*) FROM tenant_globex.projects p, tenant_acme.projects q"
        " WHERE 'written-from-globex' IN (p.name, q.name)",
    )
    assert rows == [(0,)]


async def test_going_around_the_library_inside_a_scope_reaches_no_tenant_schema(
    db: TenantDatabase,
) -> None:
    async with tenant_scope(ACME):
        async with AsyncSession(db.engine) as plain:  # a second session, without the binding
            with pytest.raises(ProgrammingError, match="does not exist"):
                await plain.execute(select(Project))
        async with db.engine.connect() as conn:  # the base engine: no tenant on its path
            with pytest.raises(ProgrammingError, match="does not exist"):
                await conn.execute(text("SELECT name FROM projects"))


async def test_a_fair_share_timeout_rides_with_the_schema_binding(
    schema_database: PgDatabase,
) -> None:
    database = TenantDatabase(
        schema_database.app_url,
        _strategy(),
        engine_options={"pool_size": 2, "max_overflow": 0},
        shares=FairShares(connections=1, statement_timeout=2500),
    )
    await database.validate()
    try:
        for tenant in (ACME, GLOBEX, ACME):
            async with tenant_scope(tenant), database.session() as s:
                for _ in range(2):  # each transaction of the session, after a commit too
                    assert await s.scalar(text("SHOW statement_timeout")) == "2500ms"
                    schema = f"tenant_{tenant.id}, pg_temp"
                    assert await s.scalar(text("SHOW search_path")) == schema
                    names = (await s.execute(text("SELECT name FROM projects"))).scalars()
                    assert _own(tenant, list(names))
                    await s.commit()
    finally:
        await database.dispose()
