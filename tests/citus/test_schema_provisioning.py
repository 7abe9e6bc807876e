"""Schema mode provisioned on the cluster: ``SchemaPerTenant(citus=True)`` makes every tenant
schema a distributed schema through ``TenantProvisioner.create_tenant`` and ``asgi-tenancy
tenants create``, each its own shard group; two tenants whose keys collide stay apart as the
app role; a drop removes it all; C001 and C008 found and fixed. Read back through the admin.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from io import StringIO

import pytest
from sqlalchemy import delete, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, ProgrammingError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from asgi_tenancy import (
    IsolationConfigError,
    Tenant,
    TenantContextError,
    tenant_scope,
)
from asgi_tenancy.cli import main
from asgi_tenancy.errors import TenantPlacementError
from asgi_tenancy.operations.audit import audit_provisioner
from asgi_tenancy.operations.provisioning import TenantProvisioner
from asgi_tenancy.sqlalchemy import SchemaPerTenant, TenantDatabase, tenants_table
from tests.citus.conftest import Cluster, admin_sql
from tests.citus.schema_models import (
    REGISTRY,
    Account,
    Base,
    Entry,
    reset,
    schema_of,
    schema_provisioner,
    schema_strategy,
    seed,
)
from tests.citus.test_checks import run_fix

pytestmark = pytest.mark.citus

TENANTS = ("acme", "globex")
ROWS = 20
PLAIN_DB = "tenancy_citus_schema_plain"


async def layout(admin: AsyncEngine, tenant: str) -> dict[str, tuple[str, str, int, int]]:
    """Per table of the tenant's schema: Citus method, replication model, colocation id, and
    the colocation id of the schema itself in ``pg_dist_schema``."""
    async with admin.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT c.relname, p.partmethod::text, p.repmodel::text, p.colocationid,"
                " s.colocationid AS schema_group"
                " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " JOIN pg_dist_schema s ON s.schemaid = n.oid"
                " LEFT JOIN pg_dist_partition p ON p.logicalrelid = c.oid"
                " WHERE n.nspname = :s AND c.relkind = 'r'"
            ),
            {"s": schema_of(tenant)},
        )
        return {row[0]: tuple(row[1:]) for row in rows}


async def node_of(admin: AsyncEngine, tenant: str) -> set[str]:
    async with admin.connect() as conn:
        return set(
            (
                await conn.execute(
                    text(
                        "SELECT DISTINCT l.nodename || ':' || l.nodeport"
                        " FROM pg_dist_schema s JOIN pg_dist_partition p"
                        " ON p.colocationid = s.colocationid"
                        " JOIN pg_dist_shard d ON d.logicalrelid = p.logicalrelid"
                        " JOIN pg_dist_shard_placement l ON l.shardid = d.shardid"
                        " WHERE s.schemaid = to_regnamespace(:s)"
                    ),
                    {"s": schema_of(tenant)},
                )
            ).scalars()
        )


async def memos(admin: AsyncEngine, tenant: str) -> dict[int, str]:
    async with admin.connect() as conn:
        rows = await conn.execute(text(f"SELECT id, memo FROM {schema_of(tenant)}.entries"))
        return dict(rows.all())


def cli(cluster: Cluster, *args: str) -> tuple[int, dict[str, object]]:
    out = StringIO()
    status = main([*args, "--json", "--app", "tests.citus.app:schema_provisioner"], out)
    return status, json.loads(out.getvalue())


@pytest.fixture
async def provisioner(
    cluster: Cluster, admin: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[TenantProvisioner]:
    """acme made through the Python API, globex through the CLI; both seeded as the admin."""
    monkeypatch.setenv("TENANCY_TEST_CITUS_ADMIN_URL", cluster.admin_url)
    await reset(admin, *TENANTS)
    made = schema_provisioner(
        create_async_engine(cluster.admin_url, poolclass=NullPool), cluster.app_role
    )
    await made.create_tenant(TENANTS[0])
    status, body = await asyncio.to_thread(cli, cluster, "tenants", "create", TENANTS[1])
    assert status == 0, body
    async with admin.begin() as conn:
        for tenant in TENANTS:
            await seed(conn, tenant, ROWS)
    yield made
    await reset(admin, *TENANTS)
    await made.dispose()


async def test_provisioned_tenant_schemas_are_distributed_each_its_own_shard_group(
    cluster: Cluster, admin: AsyncEngine, provisioner: TenantProvisioner
) -> None:
    groups = set()
    for tenant in TENANTS:
        tables = await layout(admin, tenant)
        assert set(tables) == {"accounts", "entries"}
        # Single-shard distributed tables ('n', 's'), in the schema's own colocation group.
        assert {(m, r) for m, r, _, _ in tables.values()} == {("n", "s")}
        (group,) = {g for _, _, g, _ in tables.values()}
        assert {s for _, _, _, s in tables.values()} == {group}
        groups.add(group)
        (node,) = await node_of(admin, tenant)  # one worker holds the whole schema
        assert node != cluster.coordinator
    assert len(groups) == len(TENANTS)


@pytest.mark.parametrize(("me", "other"), [TENANTS, TENANTS[::-1]])
async def test_two_provisioned_tenants_read_and_write_only_their_own_schema(
    cluster: Cluster,
    admin: AsyncEngine,
    provisioner: TenantProvisioner,
    me: str,
    other: str,
) -> None:
    before = await memos(admin, other)
    tenant = await provisioner.get(me)
    assert tenant is not None
    db = TenantDatabase(
        cluster.app_url, schema_strategy(), engine_options={"pool_size": 1, "max_overflow": 0}
    )
    await db.validate()
    try:
        async with tenant_scope(tenant), db.session() as s:
            orm = {e.id: e.memo for e in (await s.execute(select(Entry))).scalars()}
            joined = (
                await s.execute(
                    select(Account.name, Entry.memo).join(Entry, Entry.account_id == Account.id)
                )
            ).all()
            raw = dict((await s.execute(text("SELECT id, memo FROM entries"))).all())
            assert await s.get(Account, ROWS + 1) is None  # nobody's key, anywhere
            s.add(Account(id=ROWS + 1, name=f"{me}-new"))
            s.add(Entry(id=ROWS + 1, account_id=ROWS + 1, memo=f"{me}-new"))
            await s.execute(update(Entry).where(Entry.id <= ROWS).values(memo=f"{me}-changed"))
            await s.commit()
            after_commit = await s.scalar(text("SELECT count(*) FROM entries"))
            gone = await s.execute(delete(Entry).where(Entry.id == ROWS + 1))
            await s.rollback()
            after_rollback = await s.scalar(text("SELECT count(*) FROM entries"))
        assert (after_commit, gone.rowcount, after_rollback) == (ROWS + 1, 1, ROWS + 1)  # type: ignore[attr-defined]
        neighbour = await provisioner.get(other)
        assert neighbour is not None
        async with tenant_scope(neighbour), db.session() as s:  # the same pooled connection
            theirs = dict((await s.execute(text("SELECT id, memo FROM entries"))).all())
        assert theirs == before
        with pytest.raises(TenantContextError):
            async with db.session():
                pass
        async with db.engine.connect() as conn:  # no binding: no tenant schema on the path
            with pytest.raises(ProgrammingError, match="does not exist"):
                await conn.execute(text("SELECT id FROM entries"))
        # A forged record: this tenant's id pointing at the other's schema.
        forged = Tenant(me, attributes={"schema": schema_of(other)})
        with pytest.raises(TenantPlacementError):
            async with tenant_scope(forged), db.session() as s:
                await s.execute(select(Entry))
    finally:
        await db.dispose()
    expected = {i: f"{me}-entry-{i}" for i in range(1, ROWS + 1)}
    assert orm == raw == expected
    assert sorted(joined) == sorted(
        (f"{me}-account-{i}", f"{me}-entry-{i}") for i in range(1, ROWS + 1)
    )
    assert await memos(admin, me) == {
        **{i: f"{me}-changed" for i in range(1, ROWS + 1)},
        ROWS + 1: f"{me}-new",
    }
    assert await memos(admin, other) == before  # untouched, its colliding keys included


async def test_drop_tenant_removes_the_distributed_schema_and_its_shards(
    cluster: Cluster, admin: AsyncEngine, provisioner: TenantProvisioner
) -> None:
    await provisioner.drop_tenant(TENANTS[0], confirm=True)
    status, body = await asyncio.to_thread(cli, cluster, "tenants", "drop", TENANTS[1], "--yes")
    assert status == 0, body
    async with admin.connect() as conn:
        left = (
            await conn.execute(
                text(
                    "SELECT (SELECT count(*) FROM pg_namespace WHERE nspname = ANY(:s)),"
                    " (SELECT count(*) FROM pg_dist_schema WHERE schemaid::regnamespace::text"
                    "  = ANY(:s)),"
                    " (SELECT count(*) FROM pg_dist_partition"
                    "  WHERE logicalrelid::text LIKE 'citus\\_schema\\_%')"
                ),
                {"s": [schema_of(t) for t in TENANTS]},
            )
        ).one()
    assert tuple(left) == (0, 0, 0)
    assert await provisioner.list_tenants() == []


async def test_c008_a_tenant_schema_left_local_is_found_and_fixed(
    cluster: Cluster, admin: AsyncEngine, provisioner: TenantProvisioner
) -> None:
    schema = schema_of(TENANTS[0])
    await admin_sql(cluster.admin_url, f"SELECT citus_schema_undistribute('{schema}')")
    report = await audit_provisioner(provisioner)
    found = [f for f in report.findings if f.code == "C008"]
    assert [f.subject for f in found] == [schema]
    async with admin.connect() as conn:
        worker = await conn.scalar(
            text("SELECT node_name || ':' || node_port FROM citus_get_active_worker_nodes()")
        )
    with pytest.raises(IsolationConfigError, match="not a distributed schema"):
        await provisioner.move_tenant(TENANTS[0], str(worker), dry_run=True)
    await run_fix(cluster.admin_url, found[0].fix)
    assert [f for f in (await audit_provisioner(provisioner)).findings if f.code == "C008"] == []
    assert {m for m, _, _, _ in (await layout(admin, TENANTS[0])).values()} == {"n"}
    assert len(await memos(admin, TENANTS[0])) == ROWS  # the rows went along


@pytest.fixture
async def plain_database(cluster: Cluster) -> AsyncIterator[str]:
    """A database on the coordinator without the extension (as on a plain PostgreSQL)."""
    drop = f"DROP DATABASE IF EXISTS {PLAIN_DB} WITH (FORCE)"
    await admin_sql(
        cluster.admin_url,
        drop,
        f"CREATE DATABASE {PLAIN_DB}",
        f"REVOKE TEMPORARY ON DATABASE {PLAIN_DB} FROM PUBLIC",
    )
    yield PLAIN_DB
    await admin_sql(cluster.admin_url, drop)


async def test_c001_citus_mode_on_a_server_without_citus_is_refused(
    cluster: Cluster, plain_database: str
) -> None:
    url = make_url(cluster.app_url).set(database=plain_database).render_as_string(False)
    db = TenantDatabase(url, schema_strategy())
    try:
        with pytest.raises(IsolationConfigError, match="C001"):
            await db.validate()
    finally:
        await db.dispose()
    plain = TenantDatabase(url, SchemaPerTenant(metadata=Base.metadata, shared_schema=None))
    try:
        await plain.validate()  # the same server without citus=True: nothing to refuse
    finally:
        await plain.dispose()


def test_citus_mode_refuses_per_tenant_roles_and_the_hardened_mode() -> None:
    with pytest.raises(IsolationConfigError, match="per-tenant roles"):
        SchemaPerTenant(metadata=Base.metadata, citus=True, per_tenant_roles=True)
    with pytest.raises(IsolationConfigError, match="hardened"):
        SchemaPerTenant(metadata=Base.metadata, citus=True, hardened=True, signing_keys=["k" * 32])


async def test_the_hardened_policy_cannot_even_be_created_on_a_distributed_schema(
    cluster: Cluster, admin: AsyncEngine
) -> None:
    """Why citus=True refuses hardened: Citus rejects the hardened policy's sub-SELECT on a
    distributed table, so such a tenant could not be provisioned (nor verified on a worker)."""
    hardened = SchemaPerTenant(
        metadata=Base.metadata,
        naming="citus_hardened_{id}",
        shared_schema="citus_hardened_shared",
        hardened=True,
        signing_keys=["k" * 32],
    )
    drop = [
        "DROP SCHEMA IF EXISTS citus_hardened_acme CASCADE",
        "DROP SCHEMA IF EXISTS citus_hardened_shared CASCADE",
    ]
    await admin_sql(cluster.admin_url, *drop)
    try:
        async with admin.begin() as conn:
            await hardened.create_shared_schema(conn, cluster.app_role)
            await hardened.install(conn)
        async with admin.connect() as conn:
            auto = await conn.execution_options(isolation_level="AUTOCOMMIT")
            await auto.execute(text("SET citus.enable_schema_based_sharding = on"))
            with pytest.raises(DBAPIError, match="non-SELECT command in SubLink"):
                await hardened.create_tenant_schema(auto, Tenant("acme"), cluster.app_role)
    finally:
        await admin_sql(cluster.admin_url, *drop)


async def test_a_failed_onboarding_leaves_nothing_on_the_coordinator_or_the_workers(
    cluster: Cluster, admin: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step failing after the schema was distributed (here the last statement of
    ``create_tenant_schema``) rolls the whole transaction back, the workers' part included."""
    tenant = "initech"
    await reset(admin, tenant)
    strategy = schema_strategy()
    monkeypatch.setattr(strategy, "tenant_policies", lambda tenant: ["SELECT 1 / 0"])
    engine = create_async_engine(cluster.admin_url, poolclass=NullPool)
    made = TenantProvisioner(
        engine, strategy, app_role=cluster.app_role, table=tenants_table(name=REGISTRY)
    )
    try:
        with pytest.raises(DBAPIError, match="division by zero"):
            await made.create_tenant(tenant)
        assert await made.get(tenant) is None
    finally:
        await made.dispose()
    async with admin.connect() as conn:
        left = (
            await conn.execute(
                text(
                    "SELECT (SELECT count(*) FROM pg_namespace WHERE nspname = :s),"
                    " (SELECT count(*) FROM pg_dist_partition"
                    "  WHERE logicalrelid::text LIKE :s || '.%')"
                ),
                {"s": schema_of(tenant)},
            )
        ).one()
        on_workers = (
            await conn.execute(
                text(
                    "SELECT result FROM run_command_on_workers(format("
                    "'SELECT count(*) FROM pg_namespace WHERE nspname = %L', CAST(:s AS text)))"
                ),
                {"s": schema_of(tenant)},
            )
        ).scalars()
    assert tuple(left) == (0, 0)
    assert list(on_workers) == ["0", "0"]
