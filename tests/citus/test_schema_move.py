"""Moving a schema-mode tenant to the other worker while it serves: its distributed schema goes
with ``citus_schema_move``. Readers of the moving tenant and of its neighbour run throughout as
the app role, a writer commits all along; zero wrong answers, zero errors, and every write
acknowledged is there afterwards (read as the admin). Then the CLI, its dry run, and refusals.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from io import StringIO

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from asgi_tenancy import IsolationConfigError, tenant_scope
from asgi_tenancy.cli import main
from asgi_tenancy.operations.provisioning import TenantProvisioner
from asgi_tenancy.sqlalchemy import SchemaPerTenant, TenantDatabase
from asgi_tenancy.sqlalchemy.moves import TenantMove
from tests.citus.conftest import Cluster
from tests.citus.schema_models import (
    Account,
    Base,
    Entry,
    reset,
    schema_of,
    schema_provisioner,
    schema_strategy,
    seed,
)
from tests.citus.test_schema_provisioning import node_of

pytestmark = pytest.mark.citus

MOVER, NEIGHBOUR = "mover", "neighbour"
ROWS = 3000
WRITES_FROM = 100_000


async def truth(admin: AsyncEngine, tenant: str) -> dict[int, str]:
    async with admin.connect() as conn:
        rows = await conn.execute(
            text(f"SELECT id, name FROM {schema_of(tenant)}.accounts WHERE id < :w"),
            {"w": WRITES_FROM},
        )
        return dict(rows.all())


async def other_worker(admin: AsyncEngine, tenant: str) -> str:
    (here,) = await node_of(admin, tenant)
    async with admin.connect() as conn:
        nodes = (
            await conn.execute(
                text("SELECT node_name || ':' || node_port FROM citus_get_active_worker_nodes()")
            )
        ).scalars()
        return next(n for n in nodes if n != here)


@pytest.fixture
async def provisioner(
    cluster: Cluster, admin: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[TenantProvisioner]:
    """The mover and its neighbour provisioned, 3,000 accounts and entries each, same keys."""
    monkeypatch.setenv("TENANCY_TEST_CITUS_ADMIN_URL", cluster.admin_url)
    await reset(admin, MOVER, NEIGHBOUR)
    made = schema_provisioner(
        create_async_engine(cluster.admin_url, poolclass=NullPool), cluster.app_role
    )
    for tenant in (MOVER, NEIGHBOUR):
        await made.create_tenant(tenant)
    async with admin.begin() as conn:
        for tenant in (MOVER, NEIGHBOUR):
            await seed(conn, tenant, ROWS)
    yield made
    await reset(admin, MOVER, NEIGHBOUR)
    await made.dispose()


async def test_a_schema_tenant_moves_to_the_other_worker_while_readers_and_a_writer_run(
    cluster: Cluster, admin: AsyncEngine, provisioner: TenantProvisioner
) -> None:
    expected = {t: await truth(admin, t) for t in (MOVER, NEIGHBOUR)}
    neighbour_node = await node_of(admin, NEIGHBOUR)
    target = await other_worker(admin, MOVER)
    db = TenantDatabase(
        cluster.app_url, schema_strategy(), engine_options={"pool_size": 6, "max_overflow": 0}
    )
    await db.validate()
    tenants = {t.id: t for t in await provisioner.list_tenants()}
    moving = asyncio.Event()
    done = asyncio.Event()
    reads = {"during": 0, "wrong": 0}
    written: list[int] = []
    errors: list[BaseException] = []
    steps: list[str] = []

    async def reader(tenant: str) -> None:
        while not done.is_set():
            try:
                async with tenant_scope(tenants[tenant]), db.session() as s:
                    got = dict(
                        (
                            await s.execute(
                                select(Account.id, Account.name).where(Account.id < WRITES_FROM)
                            )
                        ).all()
                    )
                    entries = await s.scalar(select(func.count()).select_from(Entry))
                    raw = await s.scalar(text("SELECT count(*) FROM entries"))
            except Exception as exc:  # counted and asserted on below, never swallowed
                errors.append(exc)
                continue
            if got != expected[tenant] or entries != ROWS or raw != ROWS:
                reads["wrong"] += 1
            if moving.is_set():
                reads["during"] += 1

    async def writer() -> None:
        n = WRITES_FROM
        while not done.is_set():
            try:
                async with tenant_scope(tenants[MOVER]), db.session() as s:
                    s.add(Account(id=n, name=f"{MOVER}-write-{n}"))
                    await s.commit()
            except Exception as exc:
                errors.append(exc)
                continue
            written.append(n)  # acknowledged: the commit returned
            n += 1

    async def move() -> TenantMove:
        moving.set()
        try:
            return await provisioner.move_tenant(MOVER, target, progress=steps.append)
        finally:
            done.set()

    readers = [reader(MOVER), reader(MOVER), reader(NEIGHBOUR), reader(NEIGHBOUR)]
    try:
        result, *_ = await asyncio.gather(move(), *readers, writer())
    finally:
        await db.dispose()
    assert errors == []
    assert reads["wrong"] == 0
    assert reads["during"] > 0
    assert await node_of(admin, MOVER) == {target}  # every shard of the schema
    assert await node_of(admin, NEIGHBOUR) == neighbour_node  # the neighbour stayed
    assert (result.target, result.details["schema"]) == (target, schema_of(MOVER))
    assert result.strategy == "schema"
    assert not result.dry_run
    assert any("moving schema" in step for step in steps)
    assert steps[-1].startswith("done")
    async with admin.connect() as conn:
        kept = set(
            (
                await conn.execute(
                    text(f"SELECT id FROM {schema_of(MOVER)}.accounts WHERE id >= :w"),
                    {"w": WRITES_FROM},
                )
            ).scalars()
        )
    assert written
    assert set(written) <= kept  # no acknowledged write lost
    for tenant in (MOVER, NEIGHBOUR):
        assert await truth(admin, tenant) == expected[tenant]


def cli(*args: str) -> tuple[int, dict[str, object]]:
    out = StringIO()
    status = main(
        ["tenants", "move", *args, "--json", "--app", "tests.citus.app:schema_provisioner"], out
    )
    return status, json.loads(out.getvalue())


async def test_a_dry_run_changes_nothing_and_the_cli_moves_the_schema(
    admin: AsyncEngine, provisioner: TenantProvisioner
) -> None:
    (source,) = await node_of(admin, MOVER)
    target = await other_worker(admin, MOVER)
    status, body = await asyncio.to_thread(cli, MOVER, "--to", target, "--dry-run")
    assert status == 0, body
    plan = body["move"]
    assert isinstance(plan, dict)
    assert plan["dry_run"] is True
    assert (plan["source"], plan["target"]) == (source, target)
    assert plan["statements"] == [
        f"SELECT citus_schema_move('{schema_of(MOVER)}', '{target.split(':')[0]}',"
        f" {target.split(':')[1]}, shard_transfer_mode => 'block_writes')"
    ]
    assert await node_of(admin, MOVER) == {source}  # nothing moved

    status, body = await asyncio.to_thread(cli, MOVER, "--to", target)
    assert status == 0, body
    moved = body["move"]
    assert isinstance(moved, dict)
    assert moved["target"] == target
    assert moved["checksums_match"] is True
    schema = schema_of(MOVER)
    assert moved["rows_after"] == {f"{schema}.accounts": ROWS, f"{schema}.entries": ROWS}
    assert moved["details"]["schema"] == schema
    assert await node_of(admin, MOVER) == {target}

    status, body = await asyncio.to_thread(cli, MOVER, "--to", target, "--dry-run")
    assert status == 0
    assert body["move"]["statements"] == []


async def test_a_schema_move_is_refused_without_citus_mode_or_to_a_node_that_is_no_worker(
    cluster: Cluster, admin: AsyncEngine, provisioner: TenantProvisioner
) -> None:
    target = await other_worker(admin, MOVER)
    plain = TenantProvisioner(
        provisioner.admin_engine,
        SchemaPerTenant(metadata=Base.metadata, naming="citus_schema_{id}", shared_schema=None),
        app_role=cluster.app_role,
        table=provisioner.table,
    )
    with pytest.raises(IsolationConfigError, match="citus=True"):
        await plain.move_tenant(MOVER, target)
    for node in (cluster.coordinator, "127.0.0.1:1", "no-such-node"):  # coordinator: no shards
        with pytest.raises(IsolationConfigError, match="no active node"):
            await provisioner.move_tenant(MOVER, node)
    status, body = await asyncio.to_thread(cli, MOVER, "--to", "127.0.0.1:1")
    assert status != 0
    assert body["ok"] is False
