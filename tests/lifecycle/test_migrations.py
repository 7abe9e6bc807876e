"""``migrate_tenants`` on a real PostgreSQL with a real Alembic project (schema per tenant)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_tenancy import HeaderResolver, TenancyMiddleware, Tenant, TenantStatus
from asgi_tenancy.errors import IsolationConfigError
from asgi_tenancy.operations import TenantProvisioner
from asgi_tenancy.operations.migrations import (
    MigrationResult,
    MigrationStatus,
    env_template,
    migrate_tenants,
)
from asgi_tenancy.sqlalchemy import SqlAlchemyTenantStore
from tests.conftest import PgDatabase, PgServer, create_database, drop_database
from tests.lifecycle.migration_scripts import (
    R1,
    R2,
    SHARED_REVISION,
    add_tenants,
    columns_of,
    make_provisioner,
    schema_of,
    status_of,
    tables_of,
    unique,
    version_of,
    write_project,
)


@pytest.fixture
async def provisioner(admin_engine: AsyncEngine) -> TenantProvisioner:
    return await make_provisioner(admin_engine)


@pytest.fixture
def ini(tmp_path: Path) -> Path:
    return write_project(tmp_path)


class Recorder:
    """Counts migrations in flight: the concurrency bound, measured without a clock."""

    def __init__(self) -> None:
        self.total = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.started_ids: list[str] = []
        self.results: list[MigrationResult] = []

    def begin(self, total: int) -> None:
        self.total = total

    def started(self, tenant_id: str) -> None:
        self.started_ids.append(tenant_id)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def finished(self, result: MigrationResult) -> None:
        if result.tenant_id in self.started_ids:
            self.in_flight -= 1
        self.results.append(result)


async def test_all_tenants_reach_head_each_with_its_own_version_table(
    provisioner: TenantProvisioner, ini: Path
) -> None:
    tenants = await add_tenants(provisioner, 3)
    report = await migrate_tenants(provisioner, ini, concurrency=1)
    assert report.ok
    assert report.head == R2
    assert [r.status for r in report.results] == [MigrationStatus.OK] * 3
    assert all(r.from_revision is None and r.to_revision == R2 for r in report.results)
    async with provisioner.admin_engine.connect() as conn:
        for tenant in tenants:
            schema = schema_of(provisioner, tenant)
            assert await version_of(conn, schema) == R2
            assert await tables_of(conn, schema) == {"alembic_version", "items", "prices"}
            assert await columns_of(conn, schema, "items") == {"id", "name", "price"}
        # Nothing landed in public: the translate map and search_path placed every object.
        assert not {"items", "prices", "alembic_version"} & await tables_of(conn, "public")
    for tenant in tenants:
        assert await status_of(provisioner, tenant) == "active"


async def test_rerun_skips_tenants_at_head_and_migrates_only_the_behind(
    provisioner: TenantProvisioner, tmp_path: Path
) -> None:
    first = write_project(tmp_path / "v1", revisions=(R1,))
    tenants = await add_tenants(provisioner, 2)
    assert (await migrate_tenants(provisioner, first, concurrency=1)).ok
    late = await add_tenants(provisioner, 1)
    second = write_project(tmp_path / "v2")
    recorder = Recorder()
    report = await migrate_tenants(provisioner, second, concurrency=1, observer=recorder)
    by_id = {r.tenant_id: r for r in report.results}
    for tenant in tenants:
        assert (by_id[tenant.id].from_revision, by_id[tenant.id].to_revision) == (R1, R2)
    assert (by_id[late[0].id].from_revision, by_id[late[0].id].to_revision) == (None, R2)
    again = Recorder()
    rerun = await migrate_tenants(provisioner, second, concurrency=1, observer=again)
    assert [r.status for r in rerun.results] == [MigrationStatus.SKIPPED] * 3
    assert all(r.from_revision == R2 == r.to_revision for r in rerun.results)
    assert again.started_ids == []  # skipped from the version table alone: no Alembic run
    assert again.total == 3
    assert len(again.results) == 3


async def test_a_failing_tenant_fails_alone_and_keeps_no_partial_ddl(
    provisioner: TenantProvisioner, ini: Path, admin_engine: AsyncEngine
) -> None:
    good = await add_tenants(provisioner, 2)
    (bad,) = await add_tenants(provisioner, 1)
    bad_schema = schema_of(provisioner, bad)
    async with admin_engine.begin() as conn:  # r2 will collide with this table
        await conn.execute(sa.text(f'CREATE TABLE "{bad_schema}".prices (note text)'))
    report = await migrate_tenants(provisioner, ini, concurrency=1)
    by_id = {r.tenant_id: r for r in report.results}
    assert not report.ok
    assert by_id[bad.id].status is MigrationStatus.FAILED
    assert by_id[bad.id].from_revision is None
    assert by_id[bad.id].to_revision is None
    error = by_id[bad.id].error
    assert error is not None
    assert "prices" in error
    assert error.startswith("DuplicateTableError: [42P07] ")
    assert "postgresql" not in error  # no DSN in the report
    assert all(by_id[t.id].status is MigrationStatus.OK for t in good)
    async with admin_engine.connect() as conn:
        # r1 ran before r2 failed, in the same transaction: items must not exist.
        assert await tables_of(conn, bad_schema) == {"prices"}
        assert await version_of(conn, bad_schema) is None
        for tenant in good:
            assert await version_of(conn, schema_of(provisioner, tenant)) == R2
    assert await status_of(provisioner, bad) == "active"


async def test_a_failure_leaves_the_tenant_at_its_previous_revision(
    provisioner: TenantProvisioner, tmp_path: Path, admin_engine: AsyncEngine
) -> None:
    (tenant,) = await add_tenants(provisioner, 1)
    schema = schema_of(provisioner, tenant)
    assert (await migrate_tenants(provisioner, write_project(tmp_path / "a", revisions=(R1,)))).ok
    async with admin_engine.begin() as conn:
        await conn.execute(sa.text(f'CREATE TABLE "{schema}".prices (note text)'))
    report = await migrate_tenants(provisioner, write_project(tmp_path / "b"), concurrency=1)
    (result,) = report.results
    assert result.status is MigrationStatus.FAILED
    assert (result.from_revision, result.to_revision) == (R1, R1)
    async with admin_engine.connect() as conn:
        assert await version_of(conn, schema) == R1
        assert await columns_of(conn, schema, "items") == {"id", "name"}  # no price column


async def test_canary_failure_stops_the_rest(
    provisioner: TenantProvisioner, ini: Path, admin_engine: AsyncEngine
) -> None:
    tenants = await add_tenants(provisioner, 4)
    ordered = sorted(tenants, key=lambda t: t.id)  # the registry lists tenants by id
    async with admin_engine.begin() as conn:
        schema = schema_of(provisioner, ordered[1])
        await conn.execute(sa.text(f'CREATE TABLE "{schema}".prices (note text)'))
    report = await migrate_tenants(provisioner, ini, concurrency=1, canary=2)
    statuses = [r.status for r in report.results]
    assert statuses == [
        MigrationStatus.OK,
        MigrationStatus.FAILED,
        MigrationStatus.NOT_RUN,
        MigrationStatus.NOT_RUN,
    ]
    async with admin_engine.connect() as conn:
        for tenant in ordered[2:]:
            assert await version_of(conn, schema_of(provisioner, tenant)) is None


async def test_canary_success_lets_the_rest_run(provisioner: TenantProvisioner, ini: Path) -> None:
    await add_tenants(provisioner, 3)
    report = await migrate_tenants(provisioner, ini, concurrency=1, canary=1)
    assert [r.status for r in report.results] == [MigrationStatus.OK] * 3


async def test_dry_run_changes_nothing(
    provisioner: TenantProvisioner, tmp_path: Path, admin_engine: AsyncEngine
) -> None:
    tenants = await add_tenants(provisioner, 2)
    assert (await migrate_tenants(provisioner, write_project(tmp_path / "a", revisions=(R1,)))).ok
    fresh = await add_tenants(provisioner, 1)

    async def catalog() -> list[tuple[str, str, str]]:
        async with admin_engine.connect() as conn:
            rows = await conn.execute(
                sa.text(
                    "SELECT table_schema, table_name, column_name FROM information_schema.columns"
                    " WHERE table_schema = ANY(:s) ORDER BY 1, 2, 3"
                ),
                {"s": [schema_of(provisioner, t) for t in [*tenants, *fresh]]},
            )
            return [tuple(row) for row in rows]

    before = await catalog()
    recorder = Recorder()
    report = await migrate_tenants(
        provisioner, write_project(tmp_path / "b"), dry_run=True, observer=recorder
    )
    by_id = {r.tenant_id: r for r in report.results}
    assert {r.status for r in report.results} == {MigrationStatus.DRY_RUN}
    assert (by_id[fresh[0].id].from_revision, by_id[fresh[0].id].to_revision) == (None, R2)
    assert (by_id[tenants[0].id].from_revision, by_id[tenants[0].id].to_revision) == (R1, R2)
    assert recorder.started_ids == []
    assert await catalog() == before
    async with admin_engine.connect() as conn:
        for tenant in tenants:
            assert await version_of(conn, schema_of(provisioner, tenant)) == R1
        assert await version_of(conn, schema_of(provisioner, fresh[0])) is None


async def test_concurrency_bound_is_respected_across_worker_processes(
    provisioner: TenantProvisioner, ini: Path, admin_engine: AsyncEngine
) -> None:
    tenants = await add_tenants(provisioner, 5)
    recorder = Recorder()
    report = await migrate_tenants(provisioner, ini, concurrency=2, observer=recorder)
    assert report.ok
    assert report.concurrency == 2
    assert recorder.max_in_flight == 2
    assert sorted(recorder.started_ids) == sorted(t.id for t in tenants)
    async with admin_engine.connect() as conn:
        for tenant in tenants:
            assert await version_of(conn, schema_of(provisioner, tenant)) == R2


async def test_default_concurrency_is_the_admin_pool_size(
    provisioner: TenantProvisioner, ini: Path
) -> None:
    report = await migrate_tenants(provisioner, ini, dry_run=True)
    assert report.concurrency == provisioner.admin_engine.pool.size()  # type: ignore[attr-defined]


async def test_suspended_tenant_is_migrated_and_stays_suspended(
    provisioner: TenantProvisioner, ini: Path
) -> None:
    (tenant,) = await add_tenants(provisioner, 1, status=TenantStatus.SUSPENDED)
    report = await migrate_tenants(provisioner, ini, concurrency=1)
    assert report.results[0].status is MigrationStatus.OK
    assert await status_of(provisioner, tenant) == "suspended"


async def test_one_tenant_by_id(provisioner: TenantProvisioner, ini: Path) -> None:
    one, other = await add_tenants(provisioner, 2)
    report = await migrate_tenants(provisioner, ini, tenants=[one.id])
    assert [r.tenant_id for r in report.results] == [one.id]
    async with provisioner.admin_engine.connect() as conn:
        assert await version_of(conn, schema_of(provisioner, other)) is None
    with pytest.raises(IsolationConfigError):
        await migrate_tenants(provisioner, ini, tenants=["nobody"])


async def test_shared_branch_migrates_the_shared_schema_first(
    admin_engine: AsyncEngine, tmp_path: Path
) -> None:
    from asgi_tenancy.sqlalchemy import SchemaPerTenant, tenants_table

    shared = "shared_mig"
    table = tenants_table(name="tenants_shared_case")
    async with admin_engine.begin() as conn:
        await conn.run_sync(table.create)
    provisioner = TenantProvisioner(
        admin_engine, SchemaPerTenant(shared_schema=shared), app_role="tenancy_app", table=table
    )
    (tenant,) = await add_tenants(provisioner, 1)
    ini = write_project(tmp_path, shared=True)
    report = await migrate_tenants(provisioner, ini, concurrency=1)
    assert report.ok
    assert report.shared is not None
    assert report.shared.status is MigrationStatus.OK
    async with admin_engine.connect() as conn:
        assert await version_of(conn, shared) == SHARED_REVISION
        assert await tables_of(conn, shared) == {"alembic_version", "plans"}
        schema = schema_of(provisioner, tenant)
        assert await version_of(conn, schema) == R2
        assert "plans" not in await tables_of(conn, schema)
    rerun = await migrate_tenants(provisioner, ini, concurrency=1)
    assert rerun.shared is not None
    assert rerun.shared.status is MigrationStatus.SKIPPED


async def test_env_py_refuses_a_plain_alembic_run(ini: Path) -> None:
    from alembic import command
    from alembic.config import Config

    config = Config(str(ini))
    config.set_main_option("script_location", str(ini.parent / "migrations"))
    with pytest.raises(IsolationConfigError):
        command.upgrade(config, "head")


def test_env_template_is_shipped_and_calls_run_target() -> None:
    text = env_template()
    assert "run_target(target_metadata)" in text
    compile(text, "env.py", "exec")


# -- 503 while migrating --------------------------------------------------------------------


def _app(store: SqlAlchemyTenantStore) -> Starlette:
    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse(request.state.tenant.id)

    app = Starlette(routes=[Route("/", hello)])
    app.add_middleware(TenancyMiddleware, resolvers=[HeaderResolver()], store=store)
    return app


async def test_requests_get_503_with_retry_after_while_the_tenant_migrates(
    provisioner: TenantProvisioner, ini: Path, app_engine: AsyncEngine, admin_engine: AsyncEngine
) -> None:
    (tenant,) = await add_tenants(provisioner, 1)
    (suspended,) = await add_tenants(provisioner, 1, status=TenantStatus.SUSPENDED)
    app = _app(SqlAlchemyTenantStore(app_engine, table=provisioner.table))
    transport = httpx.ASGITransport(app=app)
    marked = asyncio.Event()
    during: dict[str, httpx.Response] = {}

    class Probe(Recorder):
        def started(self, tenant_id: str) -> None:
            super().started(tenant_id)
            if tenant_id == tenant.id:
                marked.set()

    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get("/", headers={"x-tenant-id": tenant.id})).status_code == 200
        # Hold the runner's per-tenant lock, so its migration waits while the tenant is marked.
        async with admin_engine.connect() as blocker:
            await blocker.execute(
                sa.text("SELECT pg_advisory_lock(hashtext('asgi-tenancy migrate ' || :k))"),
                {"k": tenant.id},
            )
            run = asyncio.create_task(
                migrate_tenants(
                    provisioner,
                    ini,
                    tenants=[tenant.id, suspended.id],
                    concurrency=1,
                    observer=Probe(),
                )
            )
            await asyncio.wait_for(marked.wait(), timeout=30)
            during["migrating"] = await client.get("/", headers={"x-tenant-id": tenant.id})
            during["suspended"] = await client.get("/", headers={"x-tenant-id": suspended.id})
            during["unknown"] = await client.get("/", headers={"x-tenant-id": "nobody"})
            await blocker.execute(
                sa.text("SELECT pg_advisory_unlock(hashtext('asgi-tenancy migrate ' || :k))"),
                {"k": tenant.id},
            )
            report = await asyncio.wait_for(run, timeout=60)
        after = await client.get("/", headers={"x-tenant-id": tenant.id})

    migrating = during["migrating"]
    assert migrating.status_code == 503
    assert migrating.headers["retry-after"] == "5"
    assert migrating.headers["content-type"] == "application/problem+json"
    assert migrating.json()["code"] == "tenant_migrating"
    assert tenant.id not in migrating.text
    # Suspended stays indistinguishable from unknown, even mid-migration.
    assert during["suspended"].status_code == during["unknown"].status_code == 404
    assert during["suspended"].content == during["unknown"].content
    assert report.ok
    assert after.status_code == 200
    assert after.text == tenant.id
    assert await status_of(provisioner, suspended) == "suspended"


def test_error_text_never_carries_credentials() -> None:
    from asgi_tenancy.sqlalchemy.failures import describe as describe_error

    text = describe_error(OSError("connect to postgresql+asyncpg://owner:s3cret@db/x failed"))
    assert "s3cret" not in text
    assert "owner" not in text
    assert text.startswith("OSError: ")


# -- database per tenant --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tenant_databases(pg_server: PgServer) -> Iterator[list[PgDatabase]]:
    databases = [create_database(pg_server, f"mig_dpt_{i}") for i in range(3)]
    try:
        yield databases
    finally:
        for database in databases:
            drop_database(pg_server, database)


async def test_database_per_tenant_migrates_each_database_alone(
    admin_engine: AsyncEngine, tenant_databases: list[PgDatabase], ini: Path
) -> None:
    from asgi_tenancy.sqlalchemy import DatabasePerTenant, tenants_table

    table = tenants_table(name="tenants_dpt_case")
    async with admin_engine.begin() as conn:
        await conn.run_sync(table.create)
        for i, database in enumerate(tenant_databases):
            # The application's URL (app role); the runner connects as the owner instead.
            attributes = {"database_url": database.app_url}
            await conn.execute(table.insert().values(id=f"db{i}", attributes=attributes))
    provisioner = TenantProvisioner(
        admin_engine, DatabasePerTenant(), app_role="tenancy_app", table=table
    )
    broken = create_async_engine(tenant_databases[2].admin_url)
    async with broken.begin() as conn:
        await conn.execute(sa.text("CREATE TABLE prices (note text)"))
    await broken.dispose()

    report = await migrate_tenants(provisioner, ini, concurrency=2)
    statuses = {r.tenant_id: r.status for r in report.results}
    assert statuses == {
        "db0": MigrationStatus.OK,
        "db1": MigrationStatus.OK,
        "db2": MigrationStatus.FAILED,
    }
    assert "tenancy-app-test" not in report.to_json()
    for database, expected in zip(tenant_databases, (R2, R2, None), strict=True):
        engine = create_async_engine(database.admin_url)
        async with engine.connect() as conn:
            assert await version_of(conn, "public") == expected
            tables = await tables_of(conn, "public")
        await engine.dispose()
        assert ("items" in tables) is (expected is not None)
    rerun = await migrate_tenants(provisioner, ini, tenants=["db0", "db1"], concurrency=1)
    assert [r.status for r in rerun.results] == [MigrationStatus.SKIPPED] * 2


async def test_lock_timeout_fails_a_tenant_whose_tables_stay_locked(
    provisioner: TenantProvisioner, tmp_path: Path, admin_engine: AsyncEngine
) -> None:
    busy, free = sorted(await add_tenants(provisioner, 2), key=lambda t: t.id)
    assert (await migrate_tenants(provisioner, write_project(tmp_path / "a", revisions=(R1,)))).ok
    ini = write_project(tmp_path / "b")
    async with admin_engine.connect() as reader, reader.begin():
        # A long request: its open transaction holds ACCESS SHARE on the busy tenant's items.
        await reader.execute(sa.text(f'SELECT * FROM "{schema_of(provisioner, busy)}".items'))
        report = await migrate_tenants(provisioner, ini, concurrency=1, lock_timeout=0.2)
    by_id = {r.tenant_id: r for r in report.results}
    assert by_id[busy.id].status is MigrationStatus.FAILED
    assert "lock" in (by_id[busy.id].error or "").lower()
    assert by_id[free.id].status is MigrationStatus.OK
    async with admin_engine.connect() as conn:
        assert await version_of(conn, schema_of(provisioner, busy)) == R1
    assert await status_of(provisioner, busy) == "active"


async def test_a_non_member_gets_the_unknown_tenant_404_during_a_migration() -> None:
    from asgi_tenancy import InMemoryTenantStore

    store = InMemoryTenantStore([Tenant("acme", TenantStatus.MIGRATING)])

    def members_only(connection: HTTPConnection, tenant: Tenant) -> bool:
        return connection.headers.get("x-user") == "member"

    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse("hello")

    app = Starlette(routes=[Route("/", hello)])
    app.add_middleware(
        TenancyMiddleware, resolvers=[HeaderResolver()], store=store, authorize=members_only
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t"
    ) as client:
        member = await client.get("/", headers={"x-tenant-id": "acme", "x-user": "member"})
        stranger = await client.get("/", headers={"x-tenant-id": "acme", "x-user": "other"})
        unknown = await client.get("/", headers={"x-tenant-id": "nobody", "x-user": "member"})
    assert member.status_code == 503
    assert member.headers["retry-after"] == "5"
    assert stranger.status_code == unknown.status_code == 404
    assert stranger.content == unknown.content
    assert "retry-after" not in stranger.headers


async def test_the_cache_holds_migrating_no_longer_than_unknown() -> None:
    from asgi_tenancy import CachedTenantStore, InMemoryTenantStore

    now = [0.0]
    inner = InMemoryTenantStore([Tenant("acme", TenantStatus.MIGRATING)])
    cached = CachedTenantStore(inner, ttl=60, negative_ttl=5, clock=lambda: now[0])
    assert (await cached.get("acme")).status is TenantStatus.MIGRATING  # type: ignore[union-attr]
    inner.put(Tenant("acme"))
    now[0] = 4.9
    assert (await cached.get("acme")).status is TenantStatus.MIGRATING  # type: ignore[union-attr]
    now[0] = 5.1
    assert (await cached.get("acme")).status is TenantStatus.ACTIVE  # type: ignore[union-attr]
    now[0] = 60.0
    assert (await cached.get("acme")).status is TenantStatus.ACTIVE  # type: ignore[union-attr]


async def test_an_autocommit_block_fails_the_tenant_and_commits_nothing(
    provisioner: TenantProvisioner, tmp_path: Path, admin_engine: AsyncEngine
) -> None:
    (tenant,) = await add_tenants(provisioner, 1)
    report = await migrate_tenants(provisioner, write_project(tmp_path, autocommit=True))
    assert report.results[0].status is MigrationStatus.FAILED
    assert "autocommit_block" in (report.results[0].error or "")
    async with admin_engine.connect() as conn:
        schema = schema_of(provisioner, tenant)
        assert await version_of(conn, schema) is None
        assert await tables_of(conn, schema) == set()


async def test_a_mark_left_by_a_killed_run_is_cleared_even_at_head(
    provisioner: TenantProvisioner, ini: Path, admin_engine: AsyncEngine
) -> None:
    behind, at_head = sorted(await add_tenants(provisioner, 2), key=lambda t: t.id)
    assert (await migrate_tenants(provisioner, ini, tenants=[at_head.id])).ok
    async with admin_engine.begin() as conn:  # as a run killed mid-way would leave them
        await conn.execute(provisioner.table.update().values(status="migrating"))
    dry = await migrate_tenants(provisioner, ini, dry_run=True)
    assert [r.status for r in dry.results] == [MigrationStatus.DRY_RUN, MigrationStatus.SKIPPED]
    assert await status_of(provisioner, at_head) == "migrating"  # a dry run changes nothing
    report = await migrate_tenants(provisioner, ini, concurrency=1)
    assert [r.status for r in report.results] == [MigrationStatus.OK, MigrationStatus.SKIPPED]
    assert await status_of(provisioner, behind) == "active"
    assert await status_of(provisioner, at_head) == "active"


async def test_shared_table_strategies_are_refused(admin_engine: AsyncEngine, ini: Path) -> None:
    from asgi_tenancy.sqlalchemy import QueryScoping

    strategy = QueryScoping(metadata=sa.MetaData())
    provisioner = TenantProvisioner(admin_engine, strategy, app_role="tenancy_app")
    with pytest.raises(IsolationConfigError, match="schema or database tenants"):
        await migrate_tenants(provisioner, ini)


async def test_tables_a_revision_adds_are_granted_to_the_serving_role(
    admin_engine: AsyncEngine, ini: Path
) -> None:
    from asgi_tenancy.sqlalchemy import SchemaPerTenant, tenants_table

    role = unique("mig_app_")  # no default privileges: only the runner's grants can help
    async with admin_engine.begin() as conn:
        await conn.execute(sa.text(f'CREATE ROLE "{role}" NOLOGIN'))
    table = tenants_table(name=unique("tenants_"))
    async with admin_engine.begin() as conn:
        await conn.run_sync(table.create)
    provisioner = TenantProvisioner(
        admin_engine, SchemaPerTenant(shared_schema=None), app_role=role, table=table
    )
    granted, bare = await add_tenants(provisioner, 2)
    assert (await migrate_tenants(provisioner, ini, tenants=[granted.id])).ok
    assert (await migrate_tenants(provisioner, ini, tenants=[bare.id], grant=False)).ok

    async def may(tenant: Tenant, privilege: str) -> bool:
        async with admin_engine.connect() as conn:
            allowed = await conn.scalar(
                sa.text("SELECT has_table_privilege(:r, :t, :p)"),
                {"r": role, "t": f'"{schema_of(provisioner, tenant)}".prices', "p": privilege},
            )
        return bool(allowed)

    assert await may(granted, "SELECT")
    assert await may(granted, "INSERT")
    assert not await may(granted, "TRUNCATE")  # DML only, never ownership-like rights
    assert not await may(bare, "SELECT")


async def _advisory_waiters(conn: AsyncConnection) -> int:
    count = await conn.scalar(
        sa.text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
    )
    return int(count or 0)


async def test_tenants_really_run_in_parallel_after_the_shared_schema(
    admin_engine: AsyncEngine, tmp_path: Path
) -> None:
    from asgi_tenancy.sqlalchemy import SchemaPerTenant, tenants_table

    table = tenants_table(name=unique("tenants_"))
    async with admin_engine.begin() as conn:
        await conn.run_sync(table.create)
    provisioner = TenantProvisioner(
        admin_engine,
        SchemaPerTenant(shared_schema=unique("shared_")),
        app_role="tenancy_app",
        table=table,
    )
    first, second = await add_tenants(provisioner, 2)
    ini = write_project(tmp_path, shared=True)
    lock = "SELECT pg_advisory_lock(hashtext('asgi-tenancy migrate ' || :k))"
    async with admin_engine.connect() as blocker, admin_engine.connect() as watcher:
        for tenant in (first, second):
            await blocker.execute(sa.text(lock), {"k": tenant.id})
        await blocker.commit()
        run = asyncio.create_task(migrate_tenants(provisioner, ini, concurrency=2))
        # Both tenants wait on their lock at once only if two migrations run side by side;
        # run one after the other, the second never reaches its lock while the first waits.
        async with asyncio.timeout(60):
            while await _advisory_waiters(watcher) < 2:
                await watcher.rollback()  # a fresh snapshot of pg_locks each time
                await asyncio.sleep(0.05)  # polling a condition, bounded by the timeout
        await blocker.execute(sa.text("SELECT pg_advisory_unlock_all()"))
        report = await asyncio.wait_for(run, timeout=60)
    assert report.ok
    assert report.shared is not None
    assert report.shared.status is MigrationStatus.OK
    assert [r.status for r in report.results] == [MigrationStatus.OK] * 2


async def test_a_failed_registry_reset_is_reported_and_cleared_by_a_rerun(
    provisioner: TenantProvisioner, ini: Path, admin_engine: AsyncEngine
) -> None:
    (tenant,) = await add_tenants(provisioner, 1)
    name = provisioner.table.name
    async with admin_engine.begin() as conn:  # the registry refuses the reset, for real
        await conn.execute(
            sa.text(
                "CREATE FUNCTION refuse_reset() RETURNS trigger LANGUAGE plpgsql AS"
                " $$ BEGIN RAISE EXCEPTION 'registry is read-only'; END $$"
            )
        )
        await conn.execute(
            sa.text(
                f'CREATE TRIGGER refuse_reset BEFORE UPDATE ON "{name}" FOR EACH ROW'
                " WHEN (NEW.status = 'active') EXECUTE FUNCTION refuse_reset()"
            )
        )
    report = await migrate_tenants(provisioner, ini, concurrency=1)
    (result,) = report.results
    assert result.status is MigrationStatus.FAILED
    assert result.to_revision == R2
    assert "registry still says migrating" in (result.error or "")
    assert "read-only" in (result.error or "")
    assert await status_of(provisioner, tenant) == "migrating"
    async with admin_engine.begin() as conn:
        await conn.execute(sa.text(f'DROP TRIGGER refuse_reset ON "{name}"'))
        await conn.execute(sa.text("DROP FUNCTION refuse_reset()"))
    rerun = await migrate_tenants(provisioner, ini, concurrency=1)
    assert rerun.results[0].status is MigrationStatus.SKIPPED
    assert await status_of(provisioner, tenant) == "active"


async def test_tenants_created_from_metadata_are_adopted_at_head(
    admin_engine: AsyncEngine, tmp_path: Path
) -> None:
    from asgi_tenancy.sqlalchemy import SchemaPerTenant, tenants_table

    # The metadata the application creates new tenants from: what r1 + r2 build.
    metadata = sa.MetaData()
    sa.Table(
        "items",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(50), nullable=False),
        sa.Column("price", sa.Integer),
    )
    sa.Table("prices", metadata, sa.Column("id", sa.Integer, primary_key=True))
    table = tenants_table(name=unique("tenants_"))
    async with admin_engine.begin() as conn:
        await conn.run_sync(table.create)
    provisioner = TenantProvisioner(
        admin_engine,
        SchemaPerTenant(metadata=metadata, shared_schema=None),
        app_role="tenancy_app",
        table=table,
    )
    tenant = await provisioner.create_tenant(unique("new"))
    ini = write_project(tmp_path)

    replayed = await migrate_tenants(provisioner, ini, concurrency=1)
    assert replayed.results[0].status is MigrationStatus.FAILED  # r1 meets the existing items
    dry = await migrate_tenants(provisioner, ini, adopt=True, dry_run=True)
    assert dry.results[0].status is MigrationStatus.DRY_RUN
    adopted = await migrate_tenants(provisioner, ini, concurrency=1, adopt=True)
    (result,) = adopted.results
    assert result.status is MigrationStatus.STAMPED
    assert (result.from_revision, result.to_revision) == (None, R2)
    assert adopted.ok
    async with admin_engine.connect() as conn:
        schema = schema_of(provisioner, tenant)
        assert await version_of(conn, schema) == R2
        assert await columns_of(conn, schema, "items") == {"id", "name", "price"}
    again = await migrate_tenants(provisioner, ini, adopt=True)
    assert again.results[0].status is MigrationStatus.SKIPPED
