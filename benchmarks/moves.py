"""Moving a DatabasePerTenant tenant of 100,000 rows to a second PostgreSQL server.

Two servers: ``DATABASE_URL`` (a superuser URL) or a throwaway pgserver PostgreSQL 16 as the
source, and always a second throwaway pgserver as the target (fsync off on both throwaway
servers, as in the test suite). One tenant is provisioned with two tables (``items``, 100,000
rows, and ``notes``, 1,000) and moved with ``TenantProvisioner.move_tenant`` (what
``asgi-tenancy tenants move`` calls) while one reader reads it through the request path
(``SqlAlchemyTenantStore`` then a ``TenantDatabase`` session, as the app role).

Prints one JSON object: the move's total seconds, how long writes were paused (lock granted
to registry switched), each step's seconds (from the progress lines), and the reads served
during the move with their wrong answers and errors (both must be 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Column, Integer, MetaData, Table, Text, func, select, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import create_async_engine

from asgi_tenancy import Tenant, tenant_scope
from asgi_tenancy.operations import TenantProvisioner
from asgi_tenancy.sqlalchemy import (
    DatabasePerTenant,
    SqlAlchemyTenantStore,
    TenantDatabase,
    create_tenants_table,
)
from benchmarks.common import APP_ROLE, create_app_role, machine, postgres

ROWS, NOTES = 100_000, 1_000
TENANT = "bench_mover"
_STEP = {
    "creating": "create_target",
    "pausing": "lock_and_fingerprint_source",
    "copying": "copy_and_fingerprint_target",
    "verified:": "switch_registry",
    "switched;": "drain_and_drop_source",
    "done:": "done",
}

metadata = MetaData()
items = Table(
    "items",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", Text, nullable=False),
    Column("qty", Integer, nullable=False),
)
notes = Table(
    "notes",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("body", Text, nullable=False),
)


@contextlib.contextmanager
def _second_server() -> Iterator[URL]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR as root
        import pgserver

        folder = tempfile.mkdtemp(prefix="tenancy-bench-target-")
        server = pgserver.get_server(folder, cleanup_mode="delete")
    try:
        yield make_url(server.get_uri()).set(drivername="postgresql+asyncpg")
    finally:
        server.cleanup()
        shutil.rmtree(folder, ignore_errors=True)


async def _scratch(url: URL) -> None:
    engine = create_async_engine(url, isolation_level="AUTOCOMMIT")
    async with engine.connect() as conn:
        await conn.execute(text("ALTER SYSTEM SET fsync = off"))
        await conn.execute(text("SELECT pg_reload_conf()"))
    await engine.dispose()


async def run(source: URL, target: URL, *, throwaway_source: bool) -> dict[str, Any]:
    await _scratch(target)
    if throwaway_source:
        await _scratch(source)
    app_url = await create_app_role(source)
    await create_app_role(target)  # the same role and password on the target server
    admin = create_async_engine(source)
    await create_tenants_table(admin)
    provisioner = TenantProvisioner(
        admin,
        DatabasePerTenant(),
        app_role=APP_ROLE,
        metadata=metadata,
        app_url=app_url,
        database_naming="bench_move_{id}",
    )
    if await provisioner.get(TENANT) is not None:  # a run that stopped part way
        await provisioner.drop_tenant(TENANT, confirm=True)
    tenant = await provisioner.create_tenant(TENANT)
    tenant_admin = provisioner.placement.target(tenant, provisioner.context)
    assert tenant_admin is not None
    seed = create_async_engine(tenant_admin.url)
    async with seed.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO items (name, qty) SELECT 'item-' || i, i % 97"
                " FROM generate_series(1, :n) i"
            ),
            {"n": ROWS},
        )
        await conn.execute(
            text("INSERT INTO notes SELECT i, 'note-' || i FROM generate_series(1, :n) i"),
            {"n": NOTES},
        )
    await seed.dispose()

    store_engine = create_async_engine(app_url)
    store = SqlAlchemyTenantStore(store_engine)
    db = TenantDatabase(app_url, DatabasePerTenant())
    await db.validate()
    done = asyncio.Event()
    reads = {"during": 0, "wrong": 0, "errors": 0}

    async def reader() -> None:
        while not done.is_set():
            try:
                found: Tenant | None = await store.get(TENANT)
                assert found is not None
                async with tenant_scope(found), db.session() as s:
                    count = await s.scalar(select(func.count()).select_from(notes))
            except Exception:
                reads["errors"] += 1
                continue
            reads["during"] += 1
            if count != NOTES:
                reads["wrong"] += 1

    marks: list[tuple[float, str]] = []

    async def move() -> Any:
        try:
            return await provisioner.move_tenant(
                TENANT,
                target.render_as_string(hide_password=False),
                progress=lambda step: marks.append((time.perf_counter(), step)),
            )
        finally:
            done.set()

    started = time.perf_counter()
    moved, _ = await asyncio.gather(move(), reader())
    ended = time.perf_counter()
    # Each step lasts from its progress line to the next one (the last, to the move's end).
    bounds = [started, *(at for at, _ in marks), ended]
    names = ["plan", *(_STEP.get(step.split(" ")[0], step) for _, step in marks)]
    steps = {name: round(bounds[i + 1] - bounds[i], 3) for i, name in enumerate(names)}
    await db.dispose()
    await store_engine.dispose()
    await provisioner.drop_tenant(TENANT, confirm=True)  # on the server it is on now
    await admin.dispose()
    return {
        "rows": {"items": ROWS, "notes": NOTES},
        "move_s": moved.seconds,
        "writes_paused_s": moved.details["writes_paused_seconds"],
        "steps_s": steps,
        "rows_after": dict(moved.rows_after),
        "checksums_match": moved.checksums_match,
        "reads_during_move": reads,
        "machine": machine(),
    }


def main() -> None:
    with postgres() as source, _second_server() as target:
        import os

        throwaway = "DATABASE_URL" not in os.environ
        result = asyncio.run(run(source, target, throwaway_source=throwaway))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
